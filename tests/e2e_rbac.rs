//! Proof that the real control plane judges the chart's RBAC: installed with one verb removed
//! from its ClusterRole (`create` on secrets, what the operator lacked before: an apply that
//! creates is authorized as `create`), the controller cannot start an Experiment, and says so
//! in its status (Forbidden, retried) instead of creating anything. A control plane of its own
//! (one per test binary), so the trimmed role touches no other scenario.

mod common;

use std::time::Duration;

use common::cluster::cluster;
use common::operator::{self, eventually};
use datastore_operator::api::Experiment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn without_create_on_secrets_the_first_apply_is_forbidden_and_said() {
    let token = std::thread::spawn(|| {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(operator::install(cluster(), |object| {
                if object["kind"] != "ClusterRole" {
                    return;
                }
                for rule in object["rules"].as_array_mut().unwrap() {
                    if rule["resources"] == json!(["secrets"]) {
                        let verbs = rule["verbs"].as_array_mut().unwrap();
                        verbs.retain(|v| v != "create");
                        assert!(!verbs.is_empty());
                    }
                }
            }))
    })
    .join()
    .unwrap();
    operator::start_controller(cluster(), &token, "trimmed", &[]);

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
