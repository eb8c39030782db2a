//! Two `datastore controller` replicas on the real control plane, both as the chart's
//! ServiceAccount: one holds the chart's Lease and reconciles; on SIGTERM it releases the Lease
//! and the other takes over and reconciles what comes next. A control plane of its own.

mod common;

use std::time::Duration;

use common::cluster::cluster;
use common::operator::{self, eventually};
use datastore_operator::api::Datastore;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use serde_json::json;

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get("datastore-operator")
        .await
        .ok()?
        .spec?
        .holder_identity
}

#[tokio::test(flavor = "multi_thread")]
async fn the_standby_takes_over_when_the_leader_is_stopped() {
    let token = std::thread::spawn(|| {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(operator::install(cluster(), |_| {}))
    })
    .join()
    .unwrap();
    let first = operator::start_controller(cluster(), &token, "replica-a", &[]);
    let client = cluster().admin();
    let leases: Api<Lease> = Api::namespaced(client.clone(), operator::NAMESPACE);
    eventually("replica-a leads", Duration::from_secs(30), || async {
        (holder(&leases).await? == "replica-a").then_some(())
    })
    .await;
    // The second replica is ready as a standby.
    operator::start_controller(cluster(), &token, "replica-b", &[]);
    assert_eq!(holder(&leases).await.as_deref(), Some("replica-a"));

    unsafe {
        libc::kill(first.pid as i32, libc::SIGTERM);
    }
    eventually("replica-b takes over", Duration::from_secs(60), || async {
        (holder(&leases).await? == "replica-b").then_some(())
    })
    .await;

    // The new leader reconciles: a Datastore created now gets its Ready condition.
    let ns = "leader";
    operator::apply(
        &client,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
    )
    .await;
    operator::apply(
        &client,
        &json!({"apiVersion": "datastore.dev/v1alpha1", "kind": "Datastore",
                "metadata": {"name": "public", "namespace": ns},
                "spec": {"azureBlob": {"accountName": common::ACCOUNT, "containerName": "nowhere",
                                       "endpoint": common::endpoint()}}}),
    )
    .await;
    let datastores: Api<Datastore> = Api::namespaced(client, ns);
    eventually(
        "the Datastore checked by replica-b",
        Duration::from_secs(60),
        || async {
            let ds = datastores.get("public").await.ok()?;
            (!ds.status?.conditions.is_empty()).then_some(())
        },
    )
    .await;
}
