//! Resolving a datastore through the Kubernetes API, against a mocked apiserver
//! (`tower_test::mock::pair`). Every request the code makes is checked (method and path, in
//! order) and nothing more may be asked once the scenario's script is done.

mod common;

use std::time::Duration;

use common::apiserver::{Exchange, expect, start};
use common::objects::secret;
use datastore_operator::error::Error;
use datastore_operator::store::resolve::{Resolved, Scope, resolve_with_client};
use datastore_operator::store::{AzureBlobConfig, AzureCredential, Secret, StoreConfig};
use http::StatusCode;
use serde_json::{Value, json};

const GROUP: &str = "/apis/datastore.dev/v1alpha1";
const OPERATOR_NS: &str = "datastore-operator";
/// Not a real key: base64 of "not-a-real-account-key".
const ACCOUNT_KEY: &str = "bm90LWEtcmVhbC1hY2NvdW50LWtleQ==";
const SAS: &str = "sv=2024-11-04&ss=b&srt=co&sp=rl&se=2030-01-01T00:00:00Z&sig=c2ln";

fn get(path: impl Into<String>, status: StatusCode, body: Value) -> Exchange {
    let path = path.into();
    // The list calls end in `?`: the script compares paths; queries are not at stake here.
    expect(&format!("GET {}", path.trim_end_matches('?'))).reply(status, body)
}

fn found(path: impl Into<String>, body: Value) -> Exchange {
    get(path, StatusCode::OK, body)
}

/// A 404 as a real apiserver sends it: a `Status` object, so `get_opt` returns `None`.
fn not_found(path: impl Into<String>) -> Exchange {
    expect(&format!("GET {}", path.into())).not_found()
}

fn scope() -> Scope {
    Scope {
        namespace: "default".into(),
        operator_namespace: OPERATOR_NS.into(),
    }
}

/// Runs `resolve_with_client` against the scripted apiserver.
async fn resolve(name: &str, script: Vec<Exchange>) -> Result<Resolved, Error> {
    let (client, server) = start(script);
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        resolve_with_client(client, name, &scope()),
    )
    .await
    .expect("resolution finishes");
    server.done().await;
    result
}

fn datastore_path(ns: &str, name: &str) -> String {
    format!("{GROUP}/namespaces/{ns}/datastores/{name}")
}

fn cluster_datastore_path(name: &str) -> String {
    format!("{GROUP}/clusterdatastores/{name}")
}

fn secret_path(ns: &str, name: &str) -> String {
    format!("/api/v1/namespaces/{ns}/secrets/{name}")
}

fn azure_spec(account: &str, container: &str, secret: &str) -> Value {
    json!({
        "azureBlob": {
            "accountName": account,
            "containerName": container,
            "credentials": {"secretRef": {"name": secret}},
        }
    })
}

fn datastore(ns: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "datastore.dev/v1alpha1",
        "kind": "Datastore",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"), "resourceVersion": "7"},
        "spec": spec,
    })
}

fn cluster_datastore(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "datastore.dev/v1alpha1",
        "kind": "ClusterDatastore",
        "metadata": {"name": name, "uid": format!("uid-{name}"), "resourceVersion": "8"},
        "spec": spec,
    })
}

fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({
        "apiVersion": "datastore.dev/v1alpha1",
        "kind": format!("{kind}List"),
        "metadata": {"resourceVersion": "10"},
        "items": items,
    })
}

fn config_error(result: Result<Resolved, Error>) -> String {
    match result {
        Err(Error::Config(message)) => message,
        other => panic!("expected a Config error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_datastore_in_the_namespace_and_its_secret() {
    let resolved = resolve(
        "blob-ds",
        vec![
            found(
                datastore_path("default", "blob-ds"),
                datastore(
                    "default",
                    "blob-ds",
                    azure_spec("mlstorage", "training-data", "blob-creds"),
                ),
            ),
            found(
                secret_path("default", "blob-creds"),
                secret("default", "blob-creds", "accountKey", ACCOUNT_KEY),
            ),
        ],
    )
    .await
    .expect("the datastore resolves");
    assert_eq!(
        resolved,
        Resolved {
            label: "Datastore default/blob-ds".into(),
            config: StoreConfig::AzureBlob(AzureBlobConfig {
                account: "mlstorage".into(),
                container: "training-data".into(),
                endpoint: url::Url::parse("https://mlstorage.blob.core.windows.net").unwrap(),
                credential: AzureCredential::AccountKey(Secret::new(ACCOUNT_KEY)),
                credential_source: "Secret default/blob-creds".into(),
                read_only: false,
            }),
            cache_downloads: false,
        }
    );
}

#[tokio::test]
async fn a_cluster_datastore_reads_its_secret_from_the_operator_namespace() {
    let mut spec = azure_spec("sharedstore", "datasets", "shared-creds");
    spec["azureBlob"]["endpoint"] = json!("https://sharedstore.blob.core.chinacloudapi.cn");
    spec["cacheDownloads"] = json!(true);
    let resolved = resolve(
        "shared",
        vec![
            not_found(datastore_path("default", "shared")),
            found(
                cluster_datastore_path("shared"),
                cluster_datastore("shared", spec),
            ),
            found(
                secret_path(OPERATOR_NS, "shared-creds"),
                secret(OPERATOR_NS, "shared-creds", "sasToken", SAS),
            ),
        ],
    )
    .await
    .expect("the cluster datastore resolves");
    assert_eq!(
        resolved,
        Resolved {
            label: "ClusterDatastore shared".into(),
            config: StoreConfig::AzureBlob(AzureBlobConfig {
                account: "sharedstore".into(),
                container: "datasets".into(),
                endpoint: url::Url::parse("https://sharedstore.blob.core.chinacloudapi.cn")
                    .unwrap(),
                credential: AzureCredential::SasToken(Secret::new(SAS)),
                credential_source: format!("Secret {OPERATOR_NS}/shared-creds"),
                read_only: false,
            }),
            cache_downloads: true,
        }
    );
}

#[tokio::test]
async fn a_datastore_wins_over_a_cluster_datastore_of_the_same_name() {
    // Only the Datastore is read: the script has no ClusterDatastore request, and any extra
    // request fails the test.
    let resolved = resolve(
        "data",
        vec![found(
            datastore_path("default", "data"),
            datastore("default", "data", json!({"local": {"path": "/srv/data"}})),
        )],
    )
    .await
    .expect("the datastore resolves");
    assert_eq!(resolved.label, "Datastore default/data");
    assert_eq!(
        resolved.config,
        StoreConfig::Local {
            path: "/srv/data".into(),
            read_only: false
        }
    );
}

#[tokio::test]
async fn workload_identity_reads_no_secret() {
    let spec = json!({
        "azureBlob": {
            "accountName": "mlstorage",
            "containerName": "data",
            "credentials": {"workloadIdentity": {"clientId": "11111111-2222-3333-4444-555555555555"}},
        }
    });
    let resolved = resolve(
        "wi",
        vec![found(
            datastore_path("default", "wi"),
            datastore("default", "wi", spec),
        )],
    )
    .await
    .expect("the datastore resolves");
    let StoreConfig::AzureBlob(config) = resolved.config else {
        panic!("an Azure Blob datastore")
    };
    assert_eq!(
        config.credential,
        AzureCredential::WorkloadIdentity {
            client_id: "11111111-2222-3333-4444-555555555555".into()
        }
    );
}

#[tokio::test]
async fn neither_kind_found_lists_the_names_the_cluster_has() {
    let message = config_error(
        resolve(
            "nope",
            vec![
                not_found(datastore_path("default", "nope")),
                not_found(cluster_datastore_path("nope")),
                found(
                    format!("{GROUP}/namespaces/default/datastores?"),
                    list(
                        "Datastore",
                        vec![
                            datastore("default", "blob-ds", azure_spec("mlstorage", "data", "c")),
                            datastore("default", "scratch", json!({"local": {"path": "/tmp"}})),
                        ],
                    ),
                ),
                found(
                    format!("{GROUP}/clusterdatastores?"),
                    list(
                        "ClusterDatastore",
                        vec![cluster_datastore(
                            "shared",
                            azure_spec("sharedstore", "data", "c"),
                        )],
                    ),
                ),
            ],
        )
        .await,
    );
    for part in [
        "'nope'",
        "namespace 'default'",
        "blob-ds (Datastore)",
        "scratch (Datastore)",
        "shared (ClusterDatastore)",
    ] {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
}

#[tokio::test]
async fn neither_kind_found_in_an_empty_cluster_says_none() {
    let message = config_error(
        resolve(
            "nope",
            vec![
                not_found(datastore_path("default", "nope")),
                not_found(cluster_datastore_path("nope")),
                found(
                    format!("{GROUP}/namespaces/default/datastores?"),
                    list("Datastore", vec![]),
                ),
                found(
                    format!("{GROUP}/clusterdatastores?"),
                    list("ClusterDatastore", vec![]),
                ),
            ],
        )
        .await,
    );
    assert!(message.ends_with("the cluster has: none"), "{message}");
}

#[tokio::test]
async fn a_missing_secret_is_named_with_its_namespace() {
    let message = config_error(
        resolve(
            "blob-ds",
            vec![
                found(
                    datastore_path("default", "blob-ds"),
                    datastore(
                        "default",
                        "blob-ds",
                        azure_spec("mlstorage", "data", "blob-creds"),
                    ),
                ),
                not_found(secret_path("default", "blob-creds")),
            ],
        )
        .await,
    );
    for part in [
        "Datastore default/blob-ds",
        "Secret 'blob-creds'",
        "namespace 'default'",
    ] {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
}

#[tokio::test]
async fn a_cluster_datastore_secret_missing_from_the_operator_namespace() {
    let message = config_error(
        resolve(
            "shared",
            vec![
                not_found(datastore_path("default", "shared")),
                found(
                    cluster_datastore_path("shared"),
                    cluster_datastore("shared", azure_spec("sharedstore", "data", "shared-creds")),
                ),
                not_found(secret_path(OPERATOR_NS, "shared-creds")),
            ],
        )
        .await,
    );
    for part in [
        "ClusterDatastore shared",
        "Secret 'shared-creds'",
        &format!("namespace '{OPERATOR_NS}'"),
    ] {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
}

#[tokio::test]
async fn a_datastore_with_both_kinds_of_storage_is_refused() {
    // The apiserver's CEL rule forbids it, but objects created before the CRD was updated (or
    // with validation off) can still hold it.
    let spec = json!({
        "azureBlob": {"accountName": "mlstorage", "containerName": "data"},
        "local": {"path": "/tmp"},
    });
    let message = config_error(
        resolve(
            "both",
            vec![found(
                datastore_path("default", "both"),
                datastore("default", "both", spec),
            )],
        )
        .await,
    );
    assert!(message.contains("Datastore default/both"), "{message}");
    assert!(message.contains("keep exactly one"), "{message}");
}

#[tokio::test]
async fn a_forbidden_read_is_reported_not_mistaken_for_absence() {
    let result = resolve(
        "blob-ds",
        vec![get(
            datastore_path("default", "blob-ds"),
            StatusCode::FORBIDDEN,
            json!({
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": "datastores.datastore.dev \"blob-ds\" is forbidden: User \"alice\" cannot get resource \"datastores\" in API group \"datastore.dev\" in the namespace \"default\"",
                "reason": "Forbidden",
                "details": {"name": "blob-ds", "group": "datastore.dev", "kind": "datastores"},
                "code": 403,
            }),
        )],
    )
    .await;
    let err = result.expect_err("a forbidden read is an error");
    let message = err.to_string();
    assert!(matches!(err, Error::Auth(_)), "{err:?}");
    assert!(message.contains("forbidden"), "{message}");
    assert!(
        message.contains("ask for get/list on datastores"),
        "{message}"
    );
}

#[tokio::test]
async fn crds_not_installed_is_an_error_not_an_absent_datastore() {
    // Without the CRDs the apiserver answers the group's paths with a plain-text 404, not a
    // Status: the code must stop there, not go on as if the datastore did not exist.
    let result = resolve(
        "blob-ds",
        vec![get(
            datastore_path("default", "blob-ds"),
            StatusCode::NOT_FOUND,
            json!("404 page not found"),
        )],
    )
    .await;
    let err = result.expect_err("missing CRDs are an error");
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("CRDs are not installed"), "{message}");
    assert!(
        message.contains("datastore crds | kubectl apply -f -"),
        "{message}"
    );
}
