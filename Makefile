# Two commands for a newcomer: `make demo` (the main job on an embedded local datastore)
# and `make test` (installs what the tests need, Azurite included, then runs them).

TOOLS        := .tools
AZURITE      := $(TOOLS)/node_modules/.bin/azurite-blob
AZURITE_VER  := 3.35.0
VENV         := $(TOOLS)/venv
KVALIDATE    := $(VENV)/bin/kubernetes-validate
KVALIDATE_VER:= 1.35.0
K8S_VERSION  := 1.30.0
HELM_SDK_VER := 0.2.2
HELM_SDK     := $(VENV)/.helm-python-sdk-$(HELM_SDK_VER)
# The real control plane of the end-to-end tests (tests/e2e*.rs), built from Go modules: the
# Kubernetes release tests/cluster/go.mod pins (tests/common/cluster.rs reads the same line).
K8S_E2E      := $(shell awk '$$1 == "k8s.io/kubernetes" {print $$2}' tests/cluster/go.mod)
KUBE         := $(TOOLS)/k8s-$(K8S_E2E)/kube
# csi-sanity, the CSI conformance suite the CSI node plugin's tests run, built from Go modules:
# the csi-test release tests/csi/go.mod pins (tests/common/csi.rs reads the same line).
CSI_TEST_VER := $(shell awk '{sub(/^require[ \t]+/, "")} $$1 == "github.com/kubernetes-csi/csi-test/v5" {print $$2; exit}' tests/csi/go.mod)
CSI_SANITY   := $(TOOLS)/csi-sanity-$(CSI_TEST_VER)/csi-sanity
VERSION      := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
IMAGE        := ghcr.io/datastore-operator/datastore:$(VERSION)
# The blobfuse2 sidecar image the chart's blobfuseImage names (images/blobfuse2).
BLOBFUSE2_VERSION := 2.5.1
BLOBFUSE_IMAGE    := ghcr.io/datastore-operator/blobfuse2:$(BLOBFUSE2_VERSION)
BIN          := target/release/datastore
DEMO         := target/demo
DS_FILE      := examples/datastores-local.yaml
AZ_FILE      := examples/datastores-azurite.yaml

.PHONY: demo demo-azurite test test-deps crds bench build lint image image-blobfuse2 e2e

build:
	cargo build --release

# The seed's example end to end on the embedded `local` datastore (no cloud account, no
# cluster): upload the sample data, run examples/experiment.yaml here (its script lists the
# downloaded data folder), and show the outputs the run uploaded.
demo: build
	rm -rf $(DEMO)
	mkdir -p $(DEMO)/datastore
	$(BIN) upload --datastores $(DS_FILE) --datastore workspace-ds --src-dir examples/data --target-path data/files --progress
	$(BIN) run examples/experiment.yaml --local --datastores $(DS_FILE) --progress
	@echo; echo "The run's outputs, uploaded to the datastore ($(DEMO)/datastore/outputs/run1):"
	@find $(DEMO)/datastore/outputs -type f | sort

# The same on Azurite (the Azure Storage emulator): started on 127.0.0.1:10000, a container
# `data` created, then upload, run and download of the outputs; Azurite is stopped at the end.
demo-azurite: build $(AZURITE)
	rm -rf $(DEMO)/azurite && mkdir -p $(DEMO)/azurite
	$(AZURITE) --blobHost 127.0.0.1 --blobPort 10000 --disableTelemetry --inMemoryPersistence --silent & echo $$! > $(DEMO)/azurite/pid; \
	trap 'kill $$(cat $(DEMO)/azurite/pid)' EXIT; \
	python3 examples/azurite_container.py data && \
	$(BIN) upload --datastores $(AZ_FILE) --datastore workspace-ds --src-dir examples/data --target-path data/files && \
	$(BIN) run examples/experiment.yaml --local --datastores $(AZ_FILE) && \
	$(BIN) download --datastores $(AZ_FILE) --datastore workspace-ds --prefix outputs --target-path $(DEMO)/azurite/downloads && \
	find $(DEMO)/azurite/downloads -type f | sort

$(AZURITE):
	npm install --prefix $(TOOLS) --no-audit --no-fund --loglevel=error azurite@$(AZURITE_VER)

$(KVALIDATE):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet kubernetes-validate==$(KVALIDATE_VER)

# Helm v4 as a library (the chart tests lint and render with it; no helm binary needed).
$(HELM_SDK): $(KVALIDATE)
	$(VENV)/bin/pip install --quiet helm-python-sdk==$(HELM_SDK_VER)
	touch $@

# etcd, kube-apiserver, kube-controller-manager, kube-scheduler (and kubectl) in one binary:
# about 7 minutes and 140 MB of modules the first time, then cached by version.
# With them the kubelet and kube-proxy of the real node (tests/e2e_node.rs, tests/common/real_node.rs).
$(KUBE): tests/cluster/go.mod tests/cluster/go.sum $(wildcard tests/cluster/*.go) tests/cluster/build.sh
	bash tests/cluster/build.sh $@

# About a minute and ~20 MB of modules the first time, then cached by version.
$(CSI_SANITY): tests/csi/go.mod tests/csi/go.sum $(wildcard tests/csi/*.go) tests/csi/build.sh
	bash tests/csi/build.sh $@

test-deps: $(AZURITE) $(KVALIDATE) $(HELM_SDK) $(KUBE) $(CSI_SANITY)

# Just the end-to-end scenarios on the real control plane, from the working tree as it is.
e2e: $(AZURITE) $(KUBE)
	cargo test --test e2e --test e2e_rbac --test e2e_run --test e2e_leader --test e2e_node

test: test-deps
	cargo test --all-targets
	$(KVALIDATE) --strict --kubernetes-version $(K8S_VERSION) crds/*.yaml

# Regenerate crds/ from the code, then the chart's copy and deploy/ (tests fail while they differ).
crds:
	UPDATE_CRDS=1 cargo test --test crds
	UPDATE_CHART=1 cargo test --test chart

# The container image (needs a Docker engine): controller, agent and CLI in one.
image:
	docker build -t $(IMAGE) .

image-blobfuse2:
	docker build -t $(BLOBFUSE_IMAGE) --build-arg BLOBFUSE2_VERSION=$(BLOBFUSE2_VERSION) images/blobfuse2

bench: build $(AZURITE)
	python3 bench/run.py

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
