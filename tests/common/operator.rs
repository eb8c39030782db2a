//! The operator installed on the real control plane ([`super::cluster`]) as a user installs it:
//! `deploy/` (the chart rendered with its default values, kept equal to the chart by
//! tests/chart.rs) applied by an admin, except the Deployment, whose pod no node here would run.
//! In its place `datastore controller` runs on this machine **as the chart's ServiceAccount**
//! (a token the TokenRequest API issued for it), so every call it makes is authorized by the
//! chart's RBAC, by the real apiserver.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;

use super::cluster::{Cluster, kubeconfig};

/// Where the chart installs the operator.
pub const NAMESPACE: &str = "datastore-operator";
/// The chart's ServiceAccount (and ClusterRole) name with default values.
pub const SERVICE_ACCOUNT: &str = "datastore-operator";

/// The objects of a multi-document YAML file.
pub fn documents(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    datastore_operator::yaml::documents::<serde_json::Value>(&text)
        .unwrap()
        .into_iter()
        .filter(|d| !d.is_null())
        .map(|d| serde_json::to_value(d).unwrap())
        .collect()
}

/// The CSIDriver of the node cache, as the chart's `nodeCache` creates it (its DaemonSet is the
/// e2e node's part).
pub async fn node_cache_driver(client: &kube::Client) {
    apply(
        client,
        &serde_json::json!({"apiVersion": "storage.k8s.io/v1", "kind": "CSIDriver",
                "metadata": {"name": datastore_operator::plan::contract::NODE_CACHE_DRIVER},
                "spec": {"attachRequired": false, "podInfoOnMount": true,
                         "volumeLifecycleModes": ["Ephemeral"], "fsGroupPolicy": "None"}}),
    )
    .await;
}

/// Server-side applies `object` as the admin, whatever its kind.
pub async fn apply(client: &kube::Client, object: &serde_json::Value) {
    let (group, version) = match object["apiVersion"].as_str().unwrap().split_once('/') {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (
            String::new(),
            object["apiVersion"].as_str().unwrap().to_string(),
        ),
    };
    let gvk = GroupVersionKind::gvk(&group, &version, object["kind"].as_str().unwrap());
    let (resource, caps) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .unwrap_or_else(|e| panic!("discover {gvk:?}: {e}"));
    let name = object["metadata"]["name"].as_str().unwrap();
    let api: Api<DynamicObject> = match (caps.scope, object["metadata"]["namespace"].as_str()) {
        (kube::discovery::Scope::Namespaced, Some(ns)) => {
            Api::namespaced_with(client.clone(), ns, &resource)
        }
        (kube::discovery::Scope::Namespaced, None) => {
            Api::default_namespaced_with(client.clone(), &resource)
        }
        (kube::discovery::Scope::Cluster, _) => Api::all_with(client.clone(), &resource),
    };
    api.patch(
        name,
        &PatchParams::apply("e2e").force(),
        &Patch::Apply(object),
    )
    .await
    .unwrap_or_else(|e| panic!("apply {} {name}: {e}", gvk.kind));
}

/// Polls `check` every 250 ms until it gives `Some`, for at most `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Installs the CRDs and the chart's objects (all but the Deployment, after `edit` saw each),
/// waits for the CRDs to be established, and returns a token of the chart's ServiceAccount.
pub async fn install(cluster: &Cluster, edit: impl Fn(&mut serde_json::Value)) -> String {
    let admin = cluster.admin();
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    for crd in documents(&deploy.join("crds.yaml")) {
        apply(&admin, &crd).await;
    }
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    for name in [
        "experiments.datastore.dev",
        "datastores.datastore.dev",
        "clusterdatastores.datastore.dev",
    ] {
        eventually(
            &format!("CRD {name} established"),
            Duration::from_secs(30),
            || {
                let crds = crds.clone();
                async move {
                    let crd = crds.get(name).await.ok()?;
                    crd.status?
                        .conditions?
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                        .then_some(())
                }
            },
        )
        .await;
    }
    for mut object in documents(&deploy.join("datastore-operator.yaml")) {
        if object["kind"] == "Deployment" {
            continue;
        }
        edit(&mut object);
        apply(&admin, &object).await;
    }
    // The ServiceAccount's token, as a pod of the chart's Deployment would have it.
    let accounts: Api<ServiceAccount> = Api::namespaced(admin, NAMESPACE);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(3 * 3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let issued: TokenRequest = accounts
        .create_subresource("token", SERVICE_ACCOUNT, &PostParams::default(), &request)
        .await
        .expect("a token for the chart's ServiceAccount");
    issued
        .status
        .and_then(|s| s.token)
        .expect("an issued token")
}

/// A running `datastore controller` process.
pub struct Controller {
    /// Where it serves /healthz, /readyz and /metrics.
    pub port: u16,
    pub pid: u32,
}

/// A `datastore controller` process running as `token`'s user against `cluster`, once it is
/// ready. `extra` are more flags.
pub fn start_controller(cluster: &Cluster, token: &str, name: &str, extra: &[&str]) -> Controller {
    let config = cluster.dir.join(format!("{name}.kubeconfig"));
    kubeconfig(&config, &cluster.server, &cluster.ca, token);
    let port = super::free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_datastore"));
    cmd.arg("controller")
        .arg(format!("--operator-namespace={NAMESPACE}"))
        .arg(format!("--http-addr=127.0.0.1:{port}"))
        .args(["--log-format=text", "--log-level=info,kube=warn"])
        .args(extra)
        .env_clear()
        .env("KUBECONFIG", &config)
        .env("POD_NAME", name);
    let pid = super::cluster::spawn_logged(cmd, &cluster.dir.join(format!("{name}.log")));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = Command::new("curl")
            .args(["-sf", "-o", "/dev/null", "--max-time", "2"])
            .arg(format!("http://127.0.0.1:{port}/readyz"))
            .status()
            .is_ok_and(|s| s.success());
        if ready {
            return Controller { port, pid };
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(cluster.dir.join(format!("{name}.log")))
                .unwrap_or_default();
            panic!("datastore controller {name} was not ready within 60s:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
