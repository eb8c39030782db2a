//! The Helm chart `charts/datastore-operator` and the plain manifests in `deploy/`, checked with
//! Helm v4 itself (helm-python-sdk: Helm's Go SDK as a library, driven by tests/chart/helm.py)
//! and `kubernetes-validate`, both installed into .tools/venv by `make test-deps`:
//! - it lints and renders with default values and with every option on, and every rendered
//!   object is valid for Kubernetes 1.30;
//! - values.schema.json refuses mistyped values at install time;
//! - the controller's pod meets Pod Security "restricted" and the process's contract (args,
//!   environment, port, probes);
//! - its RBAC is exactly `controller::rbac::RULES`, without wildcards;
//! - its crds/ are the generated CRDs, and deploy/ is the chart rendered with default values.
//!
//! `UPDATE_CHART=1 cargo test --test chart` rewrites the chart's crds/ and deploy/ instead of
//! failing on them (`make crds` runs it after regenerating crds/).

use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use datastore_operator::controller::rbac::{LEASE_NAME, RULES, Scope};
use datastore_operator::render::{
    BLOB_CSI_DRIVER, DEFAULT_AGENT_CPU_LIMIT, DEFAULT_AGENT_CPU_REQUEST, DEFAULT_AGENT_IMAGE,
    DEFAULT_AGENT_MEMORY_LIMIT, DEFAULT_AGENT_MEMORY_REQUEST, DEFAULT_OUTPUTS_SIZE,
    DEFAULT_SIDECAR_CPU, DEFAULT_SIDECAR_MEMORY, DEFAULT_STAGING_SIZE, FILE_CSI_DRIVER,
    RUN_AS_USER,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, EnvVar, Service};
use serde_json::{Value, json};

const K8S_VERSION: &str = "1.30.0";
const RELEASE: &str = "datastore-operator";
const NAMESPACE: &str = "datastore-operator";
const HINT: &str = "run `make crds` (UPDATE_CHART=1 cargo test --test chart) to regenerate";

/// Every value set to something other than its default.
const EVERY_OPTION: &str = r#"
replicas: 2
image: {repository: registry.example.com/ml/datastore, tag: 0.1.0-rc.1, pullPolicy: Always}
imagePullSecrets: [registry-credentials]
agentImage: registry.example.com/ml/datastore-agent:0.1.0
blobfuseImage: registry.example.com/ml/blobfuse2:2.5.1
mount: {defaultDriver: csi, sidecarMemory: 2Gi, sidecarCpu: 1500m}
agent: {resources: {requests: {cpu: 250m, memory: 256Mi}, limits: {cpu: "4", memory: 1Gi}}}
startTimeout: 1h
progressPeriod: 30s
retryBudget: 10m
nodeCache: {enabled: true, hostPath: /mnt/datastore-cache, size: 200Gi, kubeletDir: /var/lib/kubelet}
staging: {size: 200Gi}
outputs: {size: 50Gi, storageClassName: managed-csi-premium}
logLevel: debug
logFormat: text
leaderElection: {enabled: true}
serviceAccount:
  create: true
  name: ml-datastore-controller
  annotations: {azure.workload.identity/client-id: 00000000-0000-0000-0000-000000000000}
metrics:
  service: {port: 9090, annotations: {example.com/scrape: "true"}}
serviceMonitor: {enabled: true, interval: 1m, scrapeTimeout: 15s, labels: {release: prometheus}}
resources:
  requests: {cpu: 100m, memory: 128Mi}
  limits: {cpu: "1", memory: 512Mi}
nodeSelector: {kubernetes.io/os: linux}
tolerations: [{key: dedicated, operator: Equal, value: ml, effect: NoSchedule}]
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector: {matchLabels: {app.kubernetes.io/name: datastore-operator}}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: topology.kubernetes.io/zone
    whenUnsatisfiable: ScheduleAnyway
    labelSelector: {matchLabels: {app.kubernetes.io/name: datastore-operator}}
priorityClassName: ml-platform
podAnnotations: {example.com/team: ml}
podLabels: {example.com/team: ml}
nameOverride: datastore
fullnameOverride: ml-datastore
"#;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chart_dir() -> PathBuf {
    repo().join("charts/datastore-operator")
}

fn update_requested() -> bool {
    std::env::var_os("UPDATE_CHART").is_some_and(|v| v == "1")
}

/// The venv's python with helm-python-sdk, or a failure saying how to install it.
fn python() -> PathBuf {
    let bin = repo().join(".tools/venv/bin/python");
    assert!(
        bin.exists(),
        "{} is missing: run `make test-deps` (it installs helm-python-sdk and kubernetes-validate into .tools/venv)",
        bin.display()
    );
    bin
}

/// Runs tests/chart/helm.py; a missing SDK (exit 3) fails the test with its message.
fn helm(args: &[&str], values: Option<&str>) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(python());
    cmd.arg(repo().join("tests/chart/helm.py"))
        .args(args)
        .arg(chart_dir())
        .args(["--release", RELEASE, "--namespace", NAMESPACE]);
    if let Some(values) = values {
        let file = dir.path().join("values.yaml");
        std::fs::write(&file, values).unwrap();
        cmd.arg("--values").arg(file);
    }
    let out = cmd.output().expect("run tests/chart/helm.py");
    assert_ne!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[derive(Deserialize)]
struct Rendered {
    manifests: Vec<Manifest>,
    notes: String,
}

#[derive(Deserialize)]
struct Manifest {
    source: String,
    yaml: String,
}

impl Rendered {
    /// The objects, as `kubectl apply -f` reads them.
    fn objects(&self) -> Vec<Value> {
        self.manifests
            .iter()
            .map(|m| {
                let doc: serde_json::Value = serde_saphyr::from_str(&m.yaml)
                    .unwrap_or_else(|e| panic!("{} is not YAML ({e}):\n{}", m.source, m.yaml));
                serde_json::to_value(doc).unwrap()
            })
            .collect()
    }

    fn of_kind(&self, kind: &str) -> Vec<Value> {
        self.objects()
            .into_iter()
            .filter(|o| o["kind"] == kind)
            .collect()
    }

    /// The one object of `kind`.
    fn one(&self, kind: &str) -> Value {
        let mut found = self.of_kind(kind);
        assert_eq!(found.len(), 1, "one {kind} is rendered");
        found.remove(0)
    }

    fn deployment(&self) -> Deployment {
        serde_json::from_value(self.one("Deployment")).expect("a Deployment")
    }

    /// A multi-document YAML stream, each document headed by its template (as `helm template`).
    fn stream(&self) -> String {
        self.manifests
            .iter()
            .map(|m| format!("# Source: {}\n{}", m.source, m.yaml))
            .collect::<Vec<_>>()
            .join("---\n")
    }
}

/// What `helm install` with `values` would create.
fn render(values: Option<&str>) -> Rendered {
    let out = helm(&["render"], values);
    assert!(
        out.status.success(),
        "the chart does not render:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("helm.py render prints JSON")
}

fn controller(deployment: &Deployment) -> Container {
    let pod = deployment.spec.template.spec.as_ref().expect("a pod spec");
    assert_eq!(pod.containers.len(), 1, "one container");
    pod.containers[0].clone()
}

/// The container's environment: name -> value, or `fieldRef:<path>`.
fn env(container: &Container) -> BTreeMap<String, String> {
    container
        .env
        .iter()
        .flatten()
        .map(
            |EnvVar {
                 name,
                 value,
                 value_from,
             }| {
                let value = match (value, value_from) {
                    (Some(v), None) => v.clone(),
                    (None, Some(from)) => format!(
                        "fieldRef:{}",
                        from.field_ref.as_ref().expect("a fieldRef").field_path
                    ),
                    other => panic!("env {name}: {other:?}"),
                };
                (name.clone(), value)
            },
        )
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Lint, render, validate

#[test]
fn the_chart_lints_with_default_values_and_with_every_option() {
    for (what, values) in [
        ("default values", None),
        ("every option", Some(EVERY_OPTION)),
    ] {
        let out = helm(&["lint"], values);
        assert!(
            out.status.success(),
            "helm lint --strict --kube-version {K8S_VERSION} with {what} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_rendered_object_is_valid_for_the_lowest_supported_kubernetes() {
    let validator = repo().join(".tools/venv/bin/kubernetes-validate");
    assert!(
        validator.exists(),
        "{} is missing: run `make test-deps`",
        validator.display()
    );
    for (what, values) in [
        ("default values", None),
        ("every option", Some(EVERY_OPTION)),
    ] {
        let rendered = render(values);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("rendered.yaml");
        std::fs::write(&file, rendered.stream()).unwrap();
        let out = Command::new(&validator)
            .args(["--strict", "--kubernetes-version", K8S_VERSION])
            .arg(&file)
            .output()
            .expect("run kubernetes-validate");
        let report = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "kubernetes-validate refused the chart rendered with {what}:\n{report}"
        );
        // Each object passed, except the ServiceMonitor: a CRD kind the validator has no schema
        // for (it only warns); its shape is checked below instead.
        let objects = rendered.objects();
        let builtin = objects
            .iter()
            .filter(|o| o["kind"] != "ServiceMonitor")
            .count();
        assert_eq!(
            report.matches(" passed for resource ").count(),
            builtin,
            "with {what}, every built-in object passes:\n{report}"
        );
        for line in report.lines().filter(|l| !l.starts_with("INFO")) {
            assert!(
                line.contains("kind ServiceMonitor with api version monitoring.coreos.com/v1"),
                "with {what}: {line}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// values.schema.json

#[test]
fn values_schema_refuses_mistyped_values_at_install_time() {
    let cases = [
        ("replicas: two", "at '/replicas': got string, want integer"),
        ("replicas: -1", "/replicas"),
        ("logFormat: xml", "at '/logFormat': value must be one of"),
        (
            "logLevel: verbose",
            "at '/logLevel': 'verbose' does not match pattern",
        ),
        ("logLevel: \"info,kube=loud\"", "/logLevel"),
        ("replica: 2", "additional properties 'replica' not allowed"),
        (
            "image: {tag: 1.0}",
            "at '/image/tag': got number, want string",
        ),
        ("image: {pullPolicy: always}", "/image/pullPolicy"),
        (
            "serviceMonitor: {enabled: \"yes\"}",
            "at '/serviceMonitor/enabled': got string, want boolean",
        ),
        ("serviceMonitor: {interval: 30}", "/serviceMonitor/interval"),
        (
            "serviceMonitor: {enable: true}",
            "additional properties 'enable'",
        ),
        ("outputs: {size: 10GB}", "/outputs/size"),
        (
            "outputs: {storageClass: premium}",
            "additional properties 'storageClass'",
        ),
        (
            "leaderElection: true",
            "at '/leaderElection': got boolean, want object",
        ),
        ("metrics: {service: {port: 80800}}", "/metrics/service/port"),
        (
            "resources: {request: {cpu: 1}}",
            "additional properties 'request'",
        ),
        ("agentImage: \"has spaces:1\"", "/agentImage"),
        ("blobfuseImage: \"has spaces:1\"", "/blobfuseImage"),
        (
            "mount: {defaultDriver: fuse}",
            "at '/mount/defaultDriver': value must be one of",
        ),
        (
            "mount: {defaultDriver: CSI}",
            "at '/mount/defaultDriver': value must be one of",
        ),
        ("mount: {driver: csi}", "additional properties 'driver'"),
        ("mount: {sidecarMemory: 1.5Gi}", "/mount/sidecarMemory"),
        ("mount: {sidecarMemory: 1GB}", "/mount/sidecarMemory"),
        ("mount: {sidecarCpu: two}", "/mount/sidecarCpu"),
        ("startTimeout: 15min", "/startTimeout"),
        ("progressPeriod: 10", "/progressPeriod"),
        ("retryBudget: 5min", "/retryBudget"),
        (
            "agent: {resources: {limits: {memory: 1.5Gi}}}",
            "/agent/resources/limits/memory",
        ),
        (
            "agent: {resources: {limits: {gpu: \"1\"}}}",
            "/agent/resources/limits",
        ),
        (
            "mount: {sidecarMemory: 1024}",
            "at '/mount/sidecarMemory': got number, want string",
        ),
        ("nodeSelector: {disk: 1}", "/nodeSelector/disk"),
        // Two replicas that would both reconcile.
        (
            "replicas: 2\nleaderElection: {enabled: false}",
            "'allOf' failed",
        ),
    ];
    // One Helm process each, side by side.
    let outputs: Vec<Output> = std::thread::scope(|s| {
        let running: Vec<_> = cases
            .iter()
            .map(|(values, _)| s.spawn(move || helm(&["render"], Some(values))))
            .collect();
        running.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for ((values, expected), out) in cases.iter().zip(outputs) {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "`{values}` was accepted");
        assert!(
            stderr.contains("HelmValuesError") && stderr.contains(expected),
            "`{values}` was refused, but not saying `{expected}`:\n{stderr}"
        );
    }
    // What is right passes (the default values pass in every other test).
    render(Some(
        "replicas: 3\nlogLevel: \"info,kube=warn,datastore_operator::controller=debug\"\nlogFormat: auto\noutputs: {size: 1.5Ti}",
    ));
    render(Some("replicas: 1\nleaderElection: {enabled: false}"));
    let no_sidecar = render(Some(
        "blobfuseImage: \"\"\nmount: {defaultDriver: sidecar, sidecarMemory: 512Mi}",
    ));
    let env = env(&controller(&no_sidecar.deployment()));
    assert_eq!(
        env["DATASTORE_BLOBFUSE_IMAGE"], "",
        "empty: the controller has none"
    );
    assert_eq!(env["DATASTORE_DEFAULT_MOUNT_DRIVER"], "sidecar");
    assert_eq!(env["DATASTORE_SIDECAR_MEMORY"], "512Mi");
}

// ---------------------------------------------------------------------------------------------
// The controller's pod

#[test]
fn the_controller_pod_is_restricted_and_follows_the_process_contract() {
    let rendered = render(None);
    let deployment = rendered.deployment();
    let spec = &deployment.spec;
    assert_eq!(spec.replicas, Some(1));
    let pod = spec.template.spec.as_ref().unwrap();
    let pod_labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    let selector = spec.selector.match_labels.clone().unwrap();
    assert!(
        selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
        "the selector selects the pod"
    );

    // Pod Security "restricted", and more: a read-only root file system.
    let psc = pod
        .security_context
        .as_ref()
        .expect("a pod securityContext");
    assert_eq!(psc.run_as_non_root, Some(true), "runAsNonRoot");
    assert_eq!(psc.run_as_user, Some(RUN_AS_USER), "runAsUser");
    assert_eq!(
        psc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
        Some("RuntimeDefault"),
        "seccompProfile"
    );
    let c = controller(&deployment);
    let sc = c
        .security_context
        .as_ref()
        .expect("a container securityContext");
    assert_eq!(
        sc.allow_privilege_escalation,
        Some(false),
        "allowPrivilegeEscalation"
    );
    assert_eq!(
        sc.read_only_root_filesystem,
        Some(true),
        "readOnlyRootFilesystem"
    );
    assert_eq!(
        sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_string()]),
        "capabilities drop ALL"
    );
    assert!(sc.privileged.is_none() && sc.capabilities.as_ref().unwrap().add.is_none());
    assert!(pod.host_network.is_none() && pod.host_pid.is_none() && pod.host_ipc.is_none());
    for volume in pod.volumes.iter().flatten() {
        assert!(volume.host_path.is_none(), "no hostPath volume");
    }
    let tmp = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/tmp");
    assert!(tmp.is_some(), "a writable /tmp beside the read-only root");

    // The process: `datastore controller`, the image that is also the agent image.
    assert_eq!(c.args, Some(vec!["controller".to_string()]));
    assert!(c.command.is_none(), "the image's entrypoint is the binary");
    assert_eq!(c.image.as_deref(), Some(DEFAULT_AGENT_IMAGE));
    let env = env(&c);
    let expected: BTreeMap<String, String> = [
        (
            "DATASTORE_OPERATOR_NAMESPACE",
            "fieldRef:metadata.namespace",
        ),
        ("POD_NAME", "fieldRef:metadata.name"),
        ("DATASTORE_AGENT_IMAGE", DEFAULT_AGENT_IMAGE),
        (
            "DATASTORE_BLOBFUSE_IMAGE",
            "ghcr.io/datastore-operator/blobfuse2:2.5.1",
        ),
        ("DATASTORE_DEFAULT_MOUNT_DRIVER", "auto"),
        ("DATASTORE_SIDECAR_MEMORY", DEFAULT_SIDECAR_MEMORY),
        ("DATASTORE_SIDECAR_CPU", DEFAULT_SIDECAR_CPU),
        ("DATASTORE_AGENT_CPU_REQUEST", DEFAULT_AGENT_CPU_REQUEST),
        (
            "DATASTORE_AGENT_MEMORY_REQUEST",
            DEFAULT_AGENT_MEMORY_REQUEST,
        ),
        ("DATASTORE_AGENT_CPU_LIMIT", DEFAULT_AGENT_CPU_LIMIT),
        ("DATASTORE_AGENT_MEMORY_LIMIT", DEFAULT_AGENT_MEMORY_LIMIT),
        ("DATASTORE_START_TIMEOUT", "15m"),
        ("DATASTORE_PROGRESS_PERIOD", "10s"),
        ("DATASTORE_RETRY_BUDGET", "5m"),
        ("DATASTORE_STAGING_SIZE", DEFAULT_STAGING_SIZE),
        ("DATASTORE_OUTPUTS_SIZE", DEFAULT_OUTPUTS_SIZE),
        ("DATASTORE_LOG", "info"),
        ("DATASTORE_LOG_FORMAT", "json"),
        ("DATASTORE_LEADER_ELECTION", "true"),
        ("DATASTORE_CACHE_DOWNLOADS", "false"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(
        env, expected,
        "the controller's environment is the process's (DATASTORE_OUTPUTS_STORAGE_CLASS only when set)"
    );
    // Each variable is one `datastore controller` reads (POD_NAME names the events' reporter),
    // with the binary's own default.
    let flags = controller_flags();
    for (name, value) in &env {
        if name == "POD_NAME" || value.starts_with("fieldRef:") {
            continue;
        }
        let default = flags.get(name).unwrap_or_else(|| {
            panic!("the chart sets {name}, which `datastore controller` does not read")
        });
        // The chart deliberately logs JSON, names a blobfuse2 image, and leaves the level to
        // the binary's per-command default.
        if ![
            "DATASTORE_LOG",
            "DATASTORE_LOG_FORMAT",
            "DATASTORE_BLOBFUSE_IMAGE",
        ]
        .contains(&name.as_str())
        {
            assert_eq!(
                default.as_deref(),
                Some(value.as_str()),
                "the chart's default of {name} is the binary's"
            );
        }
    }

    // One port, `http` 8080: probes and the metrics Service use it.
    let ports = c.ports.clone().unwrap_or_default();
    assert_eq!(ports.len(), 1);
    assert_eq!(
        (ports[0].name.as_deref(), ports[0].container_port),
        (Some("http"), 8080)
    );
    for (probe, path) in [
        (c.liveness_probe.as_ref(), "/healthz"),
        (c.readiness_probe.as_ref(), "/readyz"),
    ] {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("an HTTP probe on {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            serde_json::to_value(&get.port).unwrap(),
            json!("http"),
            "{path}"
        );
    }
    let service: Service = serde_json::from_value(rendered.one("Service")).unwrap();
    let service_spec = service.spec.unwrap();
    let port = &service_spec.ports.unwrap()[0];
    assert_eq!(port.name.as_deref(), Some("metrics"));
    assert_eq!(
        serde_json::to_value(&port.target_port).unwrap(),
        json!("http")
    );
    assert!(
        service_spec
            .selector
            .unwrap()
            .iter()
            .all(|(k, v)| pod_labels.get(k) == Some(v)),
        "the metrics Service selects the controller's pods"
    );

    // Namespaced objects are in the release namespace (deploy/ has no other way to say it).
    for object in rendered.objects() {
        let cluster_scoped =
            ["ClusterRole", "ClusterRoleBinding"].contains(&object["kind"].as_str().unwrap());
        assert_eq!(
            object["metadata"]["namespace"].as_str(),
            (!cluster_scoped).then_some(NAMESPACE),
            "{}",
            object["kind"]
        );
    }

    // Off by default: the ServiceMonitor, and the PodDisruptionBudget of several replicas.
    assert!(rendered.of_kind("ServiceMonitor").is_empty());
    assert!(rendered.of_kind("PodDisruptionBudget").is_empty());
}

/// The environment variables `datastore controller` reads, with their defaults.
fn controller_flags() -> BTreeMap<String, Option<String>> {
    use clap::CommandFactory;
    let mut cli = datastore_operator::cli::Cli::command();
    cli.build();
    let controller = cli
        .find_subcommand("controller")
        .expect("a controller subcommand");
    controller
        .get_arguments()
        .filter_map(|arg| {
            let env = arg.get_env()?.to_string_lossy().into_owned();
            let default = arg
                .get_default_values()
                .first()
                .map(|v| v.to_string_lossy().into_owned());
            Some((env, default))
        })
        .collect()
}

/// values.yaml's comments, as one line of text.
fn values_comments() -> String {
    std::fs::read_to_string(chart_dir().join("values.yaml"))
        .unwrap()
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix('#'))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn the_values_warn_that_the_sidecar_is_privileged_and_never_the_default_where_csi_exists() {
    let comments = values_comments();
    for wanted in [
        "The sidecar runs PRIVILEGED",
        "it is never the default where the CSI driver exists",
        "Pod Security level is baseline or restricted refuse it",
        "status.mounts says which driver and why",
    ] {
        assert!(
            comments.contains(wanted),
            "values.yaml says `{wanted}`:\n{comments}"
        );
    }
    let values: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(chart_dir().join("values.yaml")).unwrap())
            .unwrap();
    assert_eq!(values["mount"]["defaultDriver"].as_str(), Some("auto"));
    for (notes, says) in [
        (render(None).notes, "where the cluster has it"),
        (
            render(Some("mount: {defaultDriver: sidecar}")).notes,
            "runs PRIVILEGED (mount.defaultDriver: sidecar)",
        ),
        (
            render(Some("mount: {defaultDriver: csi}")).notes,
            "a cluster without it refuses",
        ),
    ] {
        let notes = notes.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(notes.contains(says), "NOTES.txt says `{says}`:\n{notes}");
        assert!(notes.contains(FILE_CSI_DRIVER), "{notes}");
        assert!(
            notes.contains(BLOB_CSI_DRIVER) || says.contains("sidecar"),
            "{notes}"
        );
    }
}

#[test]
fn every_option_reaches_the_objects() {
    let rendered = render(Some(EVERY_OPTION));
    let deployment = rendered.deployment();
    let spec = &deployment.spec;
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.as_ref().unwrap();
    let meta = spec.template.metadata.as_ref().unwrap();
    assert_eq!(
        meta.labels
            .as_ref()
            .unwrap()
            .get("example.com/team")
            .map(String::as_str),
        Some("ml")
    );
    assert_eq!(
        meta.annotations
            .as_ref()
            .unwrap()
            .get("example.com/team")
            .map(String::as_str),
        Some("ml")
    );
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some("ml-datastore-controller")
    );
    assert_eq!(pod.priority_class_name.as_deref(), Some("ml-platform"));
    assert_eq!(
        pod.image_pull_secrets.as_ref().unwrap()[0].name,
        "registry-credentials"
    );
    assert_eq!(
        pod.node_selector
            .as_ref()
            .unwrap()
            .get("kubernetes.io/os")
            .map(String::as_str),
        Some("linux")
    );
    assert_eq!(
        pod.tolerations.as_ref().unwrap()[0].value.as_deref(),
        Some("ml")
    );
    assert!(pod.affinity.as_ref().unwrap().pod_anti_affinity.is_some());
    assert_eq!(pod.topology_spread_constraints.as_ref().unwrap().len(), 1);

    let c = controller(&deployment);
    assert_eq!(
        c.image.as_deref(),
        Some("registry.example.com/ml/datastore:0.1.0-rc.1")
    );
    assert_eq!(c.image_pull_policy.as_deref(), Some("Always"));
    let resources = c.resources.as_ref().unwrap();
    assert_eq!(resources.limits.as_ref().unwrap()["memory"].0, "512Mi");
    let env = env(&c);
    for (name, value) in [
        (
            "DATASTORE_AGENT_IMAGE",
            "registry.example.com/ml/datastore-agent:0.1.0",
        ),
        (
            "DATASTORE_BLOBFUSE_IMAGE",
            "registry.example.com/ml/blobfuse2:2.5.1",
        ),
        ("DATASTORE_DEFAULT_MOUNT_DRIVER", "csi"),
        ("DATASTORE_SIDECAR_MEMORY", "2Gi"),
        ("DATASTORE_SIDECAR_CPU", "1500m"),
        ("DATASTORE_AGENT_CPU_REQUEST", "250m"),
        ("DATASTORE_AGENT_MEMORY_REQUEST", "256Mi"),
        ("DATASTORE_AGENT_CPU_LIMIT", "4"),
        ("DATASTORE_AGENT_MEMORY_LIMIT", "1Gi"),
        ("DATASTORE_START_TIMEOUT", "1h"),
        ("DATASTORE_PROGRESS_PERIOD", "30s"),
        ("DATASTORE_RETRY_BUDGET", "10m"),
        ("DATASTORE_STAGING_SIZE", "200Gi"),
        ("DATASTORE_OUTPUTS_SIZE", "50Gi"),
        ("DATASTORE_OUTPUTS_STORAGE_CLASS", "managed-csi-premium"),
        ("DATASTORE_LOG", "debug"),
        ("DATASTORE_LOG_FORMAT", "text"),
        ("DATASTORE_LEADER_ELECTION", "true"),
    ] {
        assert_eq!(env.get(name).map(String::as_str), Some(value), "{name}");
    }

    let sa = rendered.one("ServiceAccount");
    assert_eq!(sa["metadata"]["name"], "ml-datastore-controller");
    assert_eq!(
        sa["metadata"]["annotations"]["azure.workload.identity/client-id"],
        "00000000-0000-0000-0000-000000000000"
    );
    for binding in ["ClusterRoleBinding", "RoleBinding"] {
        let b = rendered.one(binding);
        assert_eq!(
            b["subjects"],
            json!([{"kind": "ServiceAccount", "name": "ml-datastore-controller", "namespace": NAMESPACE}]),
            "{binding} binds the controller's ServiceAccount"
        );
        assert_eq!(b["roleRef"]["name"], "ml-datastore");
    }

    let service = rendered.one("Service");
    assert_eq!(service["spec"]["ports"][0]["port"], 9090);
    assert_eq!(
        service["metadata"]["annotations"]["example.com/scrape"],
        "true"
    );

    // Two replicas: a drain takes one at a time.
    let pdb = rendered.one("PodDisruptionBudget");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        serde_json::to_value(spec.selector.match_labels.as_ref().unwrap()).unwrap()
    );

    // The ServiceMonitor scrapes the metrics Service (kubernetes-validate has no schema for it:
    // the fields are the Prometheus Operator's monitoring.coreos.com/v1 ones).
    let monitor = rendered.one("ServiceMonitor");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], service["spec"]["ports"][0]["name"]);
    assert_eq!(
        (
            endpoint["path"].as_str(),
            endpoint["interval"].as_str(),
            endpoint["scrapeTimeout"].as_str()
        ),
        (Some("/metrics"), Some("1m"), Some("15s"))
    );
    let service_labels = service["metadata"]["labels"].as_object().unwrap();
    let wanted = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap();
    assert!(
        !wanted.is_empty() && wanted.iter().all(|(k, v)| service_labels.get(k) == Some(v)),
        "the ServiceMonitor selects the metrics Service"
    );
    assert_eq!(
        monitor["spec"]["namespaceSelector"],
        json!({"matchNames": [NAMESPACE]})
    );
    let known: BTreeSet<&str> = ["port", "path", "interval", "scrapeTimeout"].into();
    for key in endpoint.as_object().unwrap().keys() {
        assert!(known.contains(key.as_str()), "endpoint field {key}");
    }
}

// ---------------------------------------------------------------------------------------------
// RBAC

/// (scope, group, resource, resourceNames) -> verbs.
type Grants = BTreeMap<(Scope, String, String, Vec<String>), BTreeSet<String>>;

fn strings(value: &Value, what: &str) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("{what} is a list: {value}"))
        .iter()
        .map(|v| v.as_str().expect("strings").to_string())
        .collect()
}

/// The chart's grants, failing on a wildcard, and on a rule without a comment saying why.
fn chart_grants(rendered: &Rendered) -> Grants {
    let mut grants = Grants::new();
    for (kind, scope) in [
        ("ClusterRole", Scope::Cluster),
        ("Role", Scope::OperatorNamespace),
    ] {
        for role in rendered.of_kind(kind) {
            for rule in role["rules"].as_array().expect("rules") {
                let groups = strings(&rule["apiGroups"], "apiGroups");
                let resources = strings(&rule["resources"], "resources");
                let verbs = strings(&rule["verbs"], "verbs");
                let names = match &rule["resourceNames"] {
                    Value::Null => Vec::new(),
                    names => strings(names, "resourceNames"),
                };
                assert!(rule.get("nonResourceURLs").is_none(), "{kind}: {rule}");
                for field in groups.iter().chain(&resources).chain(&verbs).chain(&names) {
                    assert!(!field.contains('*'), "{kind} has a wildcard: {rule}");
                }
                for group in &groups {
                    for resource in &resources {
                        grants
                            .entry((scope, group.clone(), resource.clone(), names.clone()))
                            .or_default()
                            .extend(verbs.iter().cloned());
                    }
                }
            }
        }
    }
    // A comment saying why precedes each rule.
    for manifest in &rendered.manifests {
        let lines: Vec<&str> = manifest.yaml.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.trim_start().starts_with("- apiGroups:") {
                assert!(
                    i > 0 && lines[i - 1].trim_start().starts_with('#'),
                    "{}: the rule `{}` has no comment saying why",
                    manifest.source,
                    line.trim()
                );
            }
        }
    }
    grants
}

fn rules_grants() -> Grants {
    let mut grants = Grants::new();
    for rule in RULES {
        let names = rule.names.iter().map(|n| n.to_string()).collect();
        grants
            .entry((rule.scope, rule.group.into(), rule.resource.into(), names))
            .or_default()
            .extend(rule.verbs.iter().map(|v| v.to_string()));
    }
    grants
}

/// What one set grants that the other does not, one line each ("nothing" when none).
fn difference(a: &Grants, b: &Grants) -> Vec<String> {
    let mut lines = Vec::new();
    for (key, verbs) in a {
        let extra: Vec<&String> = verbs
            .iter()
            .filter(|v| !b.get(key).is_some_and(|w| w.contains(*v)))
            .collect();
        if !extra.is_empty() {
            let (scope, group, resource, names) = key;
            lines.push(format!(
                "{extra:?} on {resource} (group \"{group}\", {scope:?}{})",
                if names.is_empty() {
                    String::new()
                } else {
                    format!(", names {names:?}")
                }
            ));
        }
    }
    if lines.is_empty() {
        lines.push("nothing".to_string());
    }
    lines
}

#[test]
fn rbac_grants_exactly_the_controllers_calls() {
    let rendered = render(None);
    let chart = chart_grants(&rendered);
    let rules = rules_grants();
    let extra = difference(&chart, &rules);
    let missing = difference(&rules, &chart);
    assert!(
        extra == ["nothing"] && missing == ["nothing"],
        "the chart's RBAC differs from controller::rbac::RULES (src/controller/rbac.rs):\n  \
         the chart grants what the controller never calls:\n    {}\n  \
         the chart lacks what the controller calls:\n    {}",
        extra.join("\n    "),
        missing.join("\n    ")
    );

    // Bound to the controller's ServiceAccount, in the release namespace for the Lease.
    let account = rendered
        .deployment()
        .spec
        .template
        .spec
        .unwrap()
        .service_account_name;
    for (binding, role) in [
        ("ClusterRoleBinding", "ClusterRole"),
        ("RoleBinding", "Role"),
    ] {
        let b = rendered.one(binding);
        let r = rendered.one(role);
        assert_eq!(b["roleRef"]["kind"], role);
        assert_eq!(b["roleRef"]["name"], r["metadata"]["name"]);
        assert_eq!(
            b["subjects"],
            json!([{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}])
        );
    }
    let lease_names = &rendered.one("Role")["rules"][1]["resourceNames"];
    assert_eq!(lease_names, &json!([LEASE_NAME]));
}

#[test]
fn without_leader_election_there_is_no_lease_role() {
    let rendered = render(Some("leaderElection: {enabled: false}"));
    assert!(rendered.of_kind("Role").is_empty() && rendered.of_kind("RoleBinding").is_empty());
    let chart = chart_grants(&rendered);
    let cluster_rules: Grants = rules_grants()
        .into_iter()
        .filter(|((scope, ..), _)| *scope == Scope::Cluster)
        .collect();
    assert_eq!(chart, cluster_rules);
    let env = env(&controller(&rendered.deployment()));
    assert_eq!(env["DATASTORE_LEADER_ELECTION"], "false");
}

// ---------------------------------------------------------------------------------------------
// NOTES.txt, versions, image

#[test]
fn notes_say_what_to_apply_next() {
    let notes = render(None).notes;
    for wanted in [
        "namespace datastore-operator",
        "rollout status deployment/datastore-operator",
        "kubectl get exp",
        "service/datastore-operator-metrics",
    ] {
        assert!(
            notes.contains(wanted),
            "NOTES.txt says `{wanted}`:\n{notes}"
        );
    }
    // The example files it points at exist.
    for example in [
        "examples/datastores-azurite.yaml",
        "examples/experiment.yaml",
    ] {
        assert!(notes.contains(example), "NOTES.txt names {example}");
        assert!(repo().join(example).exists(), "{example} exists");
    }
    let example: serde_json::Value = serde_saphyr::from_str(
        &std::fs::read_to_string(repo().join("examples/experiment.yaml")).unwrap(),
    )
    .unwrap();
    let name = example["metadata"]["name"]
        .as_str()
        .expect("the example is named");
    assert!(
        notes.contains(&format!("kubectl describe exp {name}")),
        "NOTES.txt describes the example Experiment by its name, {name}"
    );
    assert!(render(Some(EVERY_OPTION)).notes.contains("ServiceMonitor"));
}

/// The chart, the crate and the image agree on the version and on the user.
#[test]
fn chart_crate_and_image_agree() {
    let chart: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap())
            .unwrap();
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(env!("CARGO_PKG_VERSION")),
        "Chart.yaml appVersion is the crate's version"
    );
    assert!(
        DEFAULT_AGENT_IMAGE.ends_with(&format!(":{}", env!("CARGO_PKG_VERSION"))),
        "the default agent image is this version's"
    );
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("a Dockerfile");
    assert!(
        dockerfile.contains(&format!("\nUSER {RUN_AS_USER}:{RUN_AS_USER}\n")),
        "the image runs as the user the pods set ({RUN_AS_USER})"
    );
    assert!(dockerfile.contains("\nENTRYPOINT [\"/datastore\"]\n"));
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).expect("a .dockerignore");
    for path in ["/target", "/.tools", "/.git"] {
        assert!(
            ignore.lines().any(|l| l == path),
            ".dockerignore leaves {path} out of the build context"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Generated files: the chart's crds/, deploy/

/// Writes `content` to `path` when updating; else returns a problem when they differ.
fn in_sync(path: &Path, content: &str) -> Option<String> {
    let shown = path
        .strip_prefix(repo())
        .unwrap_or(path)
        .display()
        .to_string();
    if update_requested() {
        if std::fs::read_to_string(path).ok().as_deref() != Some(content) {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
            eprintln!("wrote {shown}");
        }
        return None;
    }
    match std::fs::read_to_string(path) {
        Ok(committed) if committed == content => None,
        Ok(committed) => {
            let line = committed
                .lines()
                .zip(content.lines())
                .position(|(a, b)| a != b)
                .map_or(
                    committed.lines().count().min(content.lines().count()),
                    |i| i,
                )
                + 1;
            Some(format!(
                "{shown} is out of date (first difference at line {line})"
            ))
        }
        Err(e) => Some(format!("{shown} cannot be read ({e})")),
    }
}

/// The generated CRD files of crds/, by name.
fn generated_crds() -> BTreeMap<String, String> {
    std::fs::read_dir(repo().join("crds"))
        .expect("crds/")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

#[test]
fn chart_crds_are_the_generated_ones() {
    let dir = chart_dir().join("crds");
    let crds = generated_crds();
    assert!(!crds.is_empty(), "crds/ holds the generated CRDs");
    let mut problems: Vec<String> = crds
        .iter()
        .filter_map(|(name, yaml)| in_sync(&dir.join(name), yaml))
        .collect();
    for entry in std::fs::read_dir(&dir).expect("the chart's crds/") {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !crds.contains_key(&name) {
            if update_requested() {
                std::fs::remove_file(&path).unwrap();
                eprintln!("removed {}", path.display());
            } else {
                problems.push(format!(
                    "charts/datastore-operator/crds/{name} is not in crds/"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}; {HINT}", problems.join("; "));
}

/// deploy/datastore-operator.yaml: the namespace, then the chart rendered with default values.
fn expected_deploy_manifest() -> String {
    let rendered = render(None);
    format!(
        "# datastore-operator {version}: the Helm chart charts/datastore-operator rendered with\n\
         # its default values as release {RELEASE} in namespace {NAMESPACE}, for\n\
         # `kubectl apply -f deploy/` without Helm (the CRDs are in crds.yaml beside it).\n\
         # Generated by `make crds` (UPDATE_CHART=1 cargo test --test chart): change the chart, not this.\n\
         apiVersion: v1\n\
         kind: Namespace\n\
         metadata:\n  \
           name: {NAMESPACE}\n  \
           labels:\n    \
             app.kubernetes.io/part-of: datastore-operator\n    \
             # The controller's pod meets the restricted Pod Security Standard.\n    \
             pod-security.kubernetes.io/enforce: restricted\n\
         ---\n{}",
        rendered.stream(),
        version = env!("CARGO_PKG_VERSION"),
    )
}

/// deploy/crds.yaml: the generated CRDs, one stream.
fn expected_deploy_crds() -> String {
    let docs: Vec<String> = generated_crds().into_values().collect();
    format!(
        "# The datastore.dev CRDs: crds/*.yaml (generated from the code) as one file.\n\
         # Generated by `make crds` (UPDATE_CHART=1 cargo test --test chart).\n{}",
        docs.join("---\n")
    )
}

#[test]
fn deploy_is_the_chart_rendered_with_default_values() {
    let dir = repo().join("deploy");
    let problems: Vec<String> = [
        in_sync(
            &dir.join("datastore-operator.yaml"),
            &expected_deploy_manifest(),
        ),
        in_sync(&dir.join("crds.yaml"), &expected_deploy_crds()),
    ]
    .into_iter()
    .flatten()
    .collect();
    assert!(problems.is_empty(), "{}; {HINT}", problems.join("; "));

    // And what kubectl applies is valid: the Namespace and every object.
    let manifest = std::fs::read_to_string(dir.join("datastore-operator.yaml")).unwrap();
    let kinds: Vec<String> = datastore_operator::yaml::documents::<serde_json::Value>(&manifest)
        .expect("deploy/ is YAML")
        .into_iter()
        .map(|v| v["kind"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        kinds.first().map(String::as_str),
        Some("Namespace"),
        "the namespace first"
    );
    let validator = repo().join(".tools/venv/bin/kubernetes-validate");
    let out = Command::new(&validator)
        .args(["--strict", "--kubernetes-version", K8S_VERSION])
        .arg(dir.join("datastore-operator.yaml"))
        .arg(dir.join("crds.yaml"))
        .output()
        .unwrap_or_else(|e| panic!("run {} ({e}): run `make test-deps`", validator.display()));
    assert!(
        out.status.success(),
        "kubernetes-validate refused deploy/:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// `nodeCache.enabled`: the CSIDriver serves ephemeral volumes only, the DaemonSet runs the
/// plugin with the cache's size on every node (the only privileged pod of the release), and
/// the controller's Service does not select its pods. Off by default.
#[test]
fn the_node_cache_is_an_opt_in_daemonset_and_csidriver() {
    let default = render(None);
    assert!(default.of_kind("DaemonSet").is_empty() && default.of_kind("CSIDriver").is_empty());

    let rendered = render(Some(EVERY_OPTION));
    let driver = rendered.one("CSIDriver");
    assert_eq!(driver["metadata"]["name"], datastore_operator::csi::DRIVER);
    assert_eq!(driver["spec"]["volumeLifecycleModes"], json!(["Ephemeral"]));
    assert_eq!(driver["spec"]["attachRequired"], false);

    let daemonset = rendered.one("DaemonSet");
    let pod = &daemonset["spec"]["template"];
    let plugin = &pod["spec"]["containers"][0];
    assert_eq!(
        plugin["args"],
        json!([
            "csi-node",
            "--endpoint=unix:///csi/csi.sock",
            "--cache-dir=/cache",
            "--cache-size=200Gi"
        ])
    );
    assert_eq!(plugin["securityContext"]["privileged"], true);
    // Its metrics and health on the plugin's default --http-addr port.
    assert_eq!(plugin["ports"][0]["containerPort"], 9810);
    assert_eq!(plugin["livenessProbe"]["httpGet"]["path"], "/healthz");
    let cache = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "cache")
        .unwrap();
    assert_eq!(cache["hostPath"]["path"], "/mnt/datastore-cache");
    // The controller's pods stay unprivileged.
    let controller = controller(&rendered.deployment());
    assert_ne!(
        controller.security_context.and_then(|s| s.privileged),
        Some(true)
    );
    // The controller's Service selects none of the node plugin's pods.
    let service = rendered.one("Service");
    let selector = service["spec"]["selector"].as_object().unwrap();
    let labels = pod["metadata"]["labels"].as_object().unwrap();
    assert!(
        !selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
        "{selector:?} selects {labels:?}"
    );
}
