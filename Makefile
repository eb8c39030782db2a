# Two commands for a newcomer: `make demo` (the main job on an embedded local datastore)
# and `make test` (installs what the tests need, Azurite included, then runs them).

TOOLS        := .tools
AZURITE      := $(TOOLS)/node_modules/.bin/azurite-blob
AZURITE_VER  := 3.35.0
VENV         := $(TOOLS)/venv
KVALIDATE    := $(VENV)/bin/kubernetes-validate
KVALIDATE_VER:= 1.35.0
K8S_VERSION  := 1.30.0
BIN          := target/release/datastore
DEMO         := target/demo
DS_FILE      := examples/datastores-local.yaml

.PHONY: demo test test-deps crds bench build lint

build:
	cargo build --release

# Upload the sample data to the embedded `local` datastore, then download it back, as
# Datastore.upload(...) and Datastore.download(...) do. No cloud account, no cluster.
demo: build
	rm -rf $(DEMO)/downloads
	mkdir -p $(DEMO)/datastore
	$(BIN) upload --datastores $(DS_FILE) --datastore local-ds --src-dir examples/data --target-path /data/files --progress
	$(BIN) download --datastores $(DS_FILE) --datastore local-ds --target-path $(DEMO)/downloads --prefix /data --progress
	@echo; echo "The datastore ($(DEMO)/datastore) and what was downloaded from it ($(DEMO)/downloads):"
	@find $(DEMO) -type f | sort

$(AZURITE):
	npm install --prefix $(TOOLS) --no-audit --no-fund --loglevel=error azurite@$(AZURITE_VER)

$(KVALIDATE):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet kubernetes-validate==$(KVALIDATE_VER)

test-deps: $(AZURITE) $(KVALIDATE)

test: test-deps
	cargo test --all-targets
	$(KVALIDATE) --strict --kubernetes-version $(K8S_VERSION) crds/*.yaml

# Regenerate crds/ from the code (a test fails while they differ).
crds:
	UPDATE_CRDS=1 cargo test --test crds

bench: build $(AZURITE)
	python3 bench/run.py

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
