//! Proof that the real control plane judges the chart's RBAC: installed with two verbs removed
//! from its ClusterRole (`create` on secrets, what the operator lacked before: an apply that
//! creates is authorized as `create`; and `get` on clusterdatastores), the controller cannot
//! start an Experiment, and says so in its status (Forbidden, retried) instead of creating
//! anything; a lookup it is refused says so too (a Reconciled condition with the apiserver's
//! answer). A control plane of its own (one per test binary), so the trimmed role touches no
//! other scenario.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::cluster::cluster;
use common::operator::{self, eventually};
use datastore_operator::api::Experiment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use serde_json::json;

/// The operator with the trimmed ClusterRole, installed and started once for this binary.
fn trimmed_operator() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        std::thread::spawn(|| {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            let token = runtime.block_on(operator::install(cluster(), |object| {
                if object["kind"] != "ClusterRole" {
                    return;
                }
                for rule in object["rules"].as_array_mut().unwrap() {
                    let trimmed = if rule["resources"] == json!(["secrets"]) {
                        "create"
                    } else if rule["resources"] == json!(["clusterdatastores"]) {
                        "get"
                    } else {
                        continue;
                    };
                    let verbs = rule["verbs"].as_array_mut().unwrap();
                    verbs.retain(|v| v != trimmed);
                    assert!(!verbs.is_empty());
                }
            }));
            operator::start_controller(cluster(), &token, "trimmed", &[]);
        })
        .join()
        .unwrap()
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn without_create_on_secrets_the_first_apply_is_forbidden_and_said() {
    trimmed_operator();
    let client = cluster().admin();
    let ns = "e2e-trimmed";
    operator::apply(
        &client,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
    )
    .await;
    operator::apply(
        &client,
        &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "key", "namespace": ns},
                "stringData": {"accountKey": common::KEY}}),
    )
    .await;
    operator::apply(
        &client,
        &json!({"apiVersion": "datastore.dev/v1alpha1", "kind": "Datastore",
                "metadata": {"name": "blob-ds", "namespace": ns},
                "spec": {"azureBlob": {"accountName": common::ACCOUNT, "containerName": "data",
                                       "endpoint": "http://127.0.0.1:9/devstoreaccount1",
                                       "credentials": {"secretRef": {"name": "key"}}}}}),
    )
    .await;
    operator::apply(
        &client,
        &json!({"apiVersion": "datastore.dev/v1alpha1", "kind": "Experiment",
                "metadata": {"name": "train", "namespace": ns},
                "spec": {"image": "i", "entryScript": "t.py", "scriptParams": [
                    {"name": "--d", "dataReference": {"datastore": "blob-ds", "path": "p", "mode": "download"}}]}}),
    )
    .await;
    let experiments: Api<Experiment> = Api::namespaced(client.clone(), ns);
    let refusal = eventually("the refusal", Duration::from_secs(60), || {
        let experiments = experiments.clone();
        async move {
            let status = experiments.get("train").await.ok()?.status?;
            status
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Accepted" && c.status == "False")
        }
    })
    .await;
    assert_eq!(refusal.reason, "Forbidden", "{refusal:?}");
    // The apiserver's words carry no reason for a refused create inside an apply
    // (`secrets "train-credentials" is forbidden: `): the controller says what it means.
    assert!(
        refusal
            .message
            .contains("secrets \"train-credentials\" is forbidden: (no reason given: an apply that creates an object is authorized as create"),
        "{}",
        refusal.message
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    assert!(
        secrets
            .get_opt("train-credentials")
            .await
            .unwrap()
            .is_none()
    );
    let jobs: Api<Job> = Api::namespaced(client, ns);
    assert!(jobs.get_opt("train-run").await.unwrap().is_none());
}

/// A lookup the apiserver refuses every time (here `get` on the ClusterDatastore the Experiment
/// names, trimmed from the role) does not leave the Experiment blank: from the second failed
/// pass its status has a phase, a Reconciled condition False with the apiserver's reason and
/// its own words, and a Warning event says the same.
#[tokio::test(flavor = "multi_thread")]
async fn a_lookup_refused_every_time_is_said_in_the_status_and_an_event() {
    trimmed_operator();
    let client = cluster().admin();
    let ns = "e2e-refused-lookup";
    operator::apply(
        &client,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
    )
    .await;
    operator::apply(
        &client,
        &json!({"apiVersion": "datastore.dev/v1alpha1", "kind": "Experiment",
                "metadata": {"name": "train", "namespace": ns},
                "spec": {"image": "i", "entryScript": "t.py", "scriptParams": [
                    {"name": "--d", "dataReference": {"datastore": "shared", "path": "p", "mode": "download"}}]}}),
    )
    .await;
    let experiments: Api<Experiment> = Api::namespaced(client.clone(), ns);
    // Two passes 30 s apart, then the write.
    let status = eventually("the Reconciled condition", Duration::from_secs(120), || {
        let experiments = experiments.clone();
        async move {
            let status = experiments.get("train").await.ok()?.status?;
            status
                .conditions
                .iter()
                .any(|c| c.type_ == "Reconciled")
                .then_some(status)
        }
    })
    .await;
    assert_eq!(status.phase, Some(datastore_operator::api::Phase::Pending));
    let failing = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Reconciled")
        .unwrap();
    assert_eq!(
        (failing.status.as_str(), failing.reason.as_str()),
        ("False", "KubeForbidden")
    );
    assert!(
        failing.message.starts_with(
            "the controller cannot reconcile this Experiment and retries every 30s: the Kubernetes API answered 403 Forbidden: clusterdatastores.datastore.dev \"shared\" is forbidden: User "
        ) && failing
            .message
            .contains("cannot get resource \"clusterdatastores\" in API group \"datastore.dev\" at the cluster scope"),
        "{}",
        failing.message
    );
    assert_eq!(status.message.as_ref(), Some(&failing.message));
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client, ns);
    let event = eventually("the Warning event", Duration::from_secs(30), || {
        let events = events.clone();
        async move {
            events
                .list(&Default::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|e| e.reason.as_deref() == Some("KubeForbidden"))
        }
    })
    .await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(event.note.as_ref(), Some(&failing.message));
}
