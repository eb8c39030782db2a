//! The Datastore controller: Ready checks against a real Azurite (a wrong key, a missing
//! container, a closed port, a missing Secret) and a ClusterDatastore's Secret.

use std::sync::{Arc, Mutex};

use base64::Engine;
use datastore_operator::api::{ClusterDatastore, Datastore};
use datastore_operator::controller::datastore::{
    NOT_READY_RECHECK, READY_RECHECK, reconcile_cluster_datastore, reconcile_datastore,
};
use datastore_operator::render::BuildContext;
use kube::runtime::controller::Action;
use serde_json::{Value, json};

use crate::common;
use crate::common::apiserver::{apply, expect, start_as_controller};
use crate::fixtures::*;

fn azurite_datastore(container: &str, secret_name: &str, endpoint: &str) -> Datastore {
    serde_json::from_value(json!({
        "apiVersion": "datastore.dev/v1alpha1",
        "kind": "Datastore",
        "metadata": {"name": "blob-ds", "namespace": NS, "uid": "uid-ds", "resourceVersion": "7", "generation": 3},
        "spec": {"azureBlob": {
            "accountName": common::ACCOUNT,
            "containerName": container,
            "endpoint": endpoint,
            "credentials": {"secretRef": {"name": secret_name}},
        }},
    }))
    .unwrap()
}

const DS_STATUS: &str = "/apis/datastore.dev/v1alpha1/namespaces/ml/datastores/blob-ds/status";

/// Reconciles `ds` with its Secret holding `key`; returns the action and the Ready condition
/// written (`None`: nothing written).
async fn check_datastore(ds: Datastore, key: &str) -> (Action, Option<Value>) {
    let written: Arc<Mutex<Option<Value>>> = Arc::default();
    let into = written.clone();
    let mut script = vec![
        expect("GET /api/v1/namespaces/ml/secrets/ds-key").ok(secret(
            NS,
            "ds-key",
            "accountKey",
            key,
        )),
    ];
    let expect_write = ds.status.is_none();
    if expect_write {
        script.push(
            apply(DS_STATUS)
                .body(move |body| {
                    assert_eq!(body["kind"], "Datastore");
                    assert_eq!(body["status"]["observedGeneration"], 3);
                    *into.lock().unwrap() = Some(body["status"]["conditions"][0].clone());
                })
                .ok(blob_datastore(NS, "blob-ds")),
        );
    }
    let (client, server) = start_as_controller(script, OPERATOR_NS);
    let action = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        reconcile_datastore(Arc::new(ds), context(client, BuildContext::default())),
    )
    .await
    .expect("a check is bounded")
    .expect("the reconcile succeeds");
    server.done().await;
    let condition = written.lock().unwrap().take();
    (action, condition)
}

fn reason(condition: &Option<Value>) -> (String, String) {
    let c = condition.as_ref().expect("a Ready condition was written");
    (
        c["status"].as_str().unwrap().into(),
        c["reason"].as_str().unwrap().into(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reachable_datastore_is_ready_and_an_unchanged_one_is_not_rewritten() {
    let container = common::unique_container();
    common::client(&container).create_container().await.unwrap();
    let ds = azurite_datastore(&container, "ds-key", &common::endpoint());
    let (action, condition) = check_datastore(ds.clone(), common::KEY).await;
    assert_eq!(reason(&condition), ("True".into(), "Reachable".into()));
    assert_eq!(action, Action::requeue(READY_RECHECK));

    // Checked again later: still ready, same condition, no write.
    let mut checked = ds;
    checked.status = Some(
        serde_json::from_value(json!({
            "conditions": [condition.unwrap()], "observedGeneration": 3
        }))
        .unwrap(),
    );
    let (client, server) = start_as_controller(
        vec![
            expect("GET /api/v1/namespaces/ml/secrets/ds-key").ok(secret(
                NS,
                "ds-key",
                "accountKey",
                common::KEY,
            )),
        ],
        OPERATOR_NS,
    );
    let action = reconcile_datastore(Arc::new(checked), context(client, BuildContext::default()))
        .await
        .unwrap();
    server.done().await;
    assert_eq!(action, Action::requeue(READY_RECHECK));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_key_is_auth_failed() {
    let container = common::unique_container();
    common::client(&container).create_container().await.unwrap();
    let wrong = base64::engine::general_purpose::STANDARD.encode([7u8; 64]);
    let (action, condition) = check_datastore(
        azurite_datastore(&container, "ds-key", &common::endpoint()),
        &wrong,
    )
    .await;
    assert_eq!(reason(&condition), ("False".into(), "AuthFailed".into()));
    assert_eq!(
        action,
        Action::requeue(NOT_READY_RECHECK),
        "not ready: rechecked on a bounded period"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_container_is_container_not_found() {
    let (_, condition) = check_datastore(
        azurite_datastore(&common::unique_container(), "ds-key", &common::endpoint()),
        common::KEY,
    )
    .await;
    assert_eq!(
        reason(&condition),
        ("False".into(), "ContainerNotFound".into())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_closed_port_is_unreachable() {
    let endpoint = format!(
        "http://127.0.0.1:{}/{}",
        common::free_port(),
        common::ACCOUNT
    );
    let (_, condition) =
        check_datastore(azurite_datastore("data", "ds-key", &endpoint), common::KEY).await;
    assert_eq!(reason(&condition), ("False".into(), "Unreachable".into()));
}

#[tokio::test]
async fn a_missing_secret_is_invalid_config_not_a_retry_loop() {
    let ds = azurite_datastore("data", "ds-key", "http://127.0.0.1:9/devstoreaccount1");
    let written: Arc<Mutex<Option<Value>>> = Arc::default();
    let into = written.clone();
    let (client, server) = start_as_controller(
        vec![
            expect("GET /api/v1/namespaces/ml/secrets/ds-key").not_found(),
            apply(DS_STATUS)
                .body(move |body| {
                    *into.lock().unwrap() = Some(body["status"]["conditions"][0].clone())
                })
                .ok(blob_datastore(NS, "blob-ds")),
        ],
        OPERATOR_NS,
    );
    let action = reconcile_datastore(Arc::new(ds), context(client, BuildContext::default()))
        .await
        .unwrap();
    server.done().await;
    let condition = written.lock().unwrap().take();
    assert_eq!(reason(&condition), ("False".into(), "InvalidConfig".into()));
    let message = condition.unwrap()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("Secret 'ds-key'") && message.contains("create it"),
        "{message}"
    );
    assert_eq!(action, Action::requeue(NOT_READY_RECHECK));
}

#[tokio::test]
async fn a_cluster_datastore_reads_its_secret_in_the_operator_namespace() {
    let cds: ClusterDatastore = serde_json::from_value(cluster_datastore(json!({}))).unwrap();
    let (client, server) = start_as_controller(
        vec![
            expect(&format!(
                "GET /api/v1/namespaces/{OPERATOR_NS}/secrets/shared-key"
            ))
            .not_found(),
            apply("/apis/datastore.dev/v1alpha1/clusterdatastores/blob-ds/status")
                .body(|body| {
                    assert_eq!(body["kind"], "ClusterDatastore");
                    assert_eq!(body["status"]["conditions"][0]["reason"], "InvalidConfig");
                })
                .ok(cluster_datastore(json!({}))),
        ],
        OPERATOR_NS,
    );
    reconcile_cluster_datastore(Arc::new(cds), context(client, BuildContext::default()))
        .await
        .unwrap();
    server.done().await;
}
