//! Mounts: the driver is chosen from what the cluster has (CSI drivers, the namespace's Pod
//! Security level), recorded in the status, or refused; Azure Files shares through their driver.

use std::sync::{Arc, Mutex};

use datastore_operator::api::{ExperimentStatus, MountDriver, MountRecord, Phase};
use datastore_operator::controller::experiment::{ACTIVE_RECHECK, BLOCKED_RECHECK, reconcile};
use datastore_operator::render::BuildContext;
use kube::runtime::controller::Action;
use serde_json::{Value, json};

use crate::common;
use crate::common::apiserver::{Exchange, apply, expect, start_as_controller};
use crate::fixtures::*;

const BLOB_CSI: &str = "/apis/storage.k8s.io/v1/csidrivers/blob.csi.azure.com";

const FILE_CSI: &str = "/apis/storage.k8s.io/v1/csidrivers/file.csi.azure.com";

const NAMESPACE: &str = "/api/v1/namespaces/ml";

/// A mount of `blob-ds` (read-only unless the reference says otherwise) and a plain value.
fn mount_spec(reference: &str) -> String {
    format!(
        r#"
image: python:3.12-slim
entryScript: train.py
scriptParams:
  - name: --images
    dataReference: {{datastore: blob-ds, path: datasets/images, mode: mount, pathOnCompute: images{reference}}}
  - name: --epochs
    value: "3"
"#
    )
}

/// The operator with a blobfuse2 image (the chart's default gives it one).
fn with_blobfuse() -> BuildContext {
    BuildContext {
        blobfuse_image: Some("registry.example.com/ml/blobfuse2:2.5.1".into()),
        ..BuildContext::default()
    }
}

fn csi_driver(name: &str) -> Value {
    json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "CSIDriver",
        "metadata": {"name": name, "resourceVersion": "3"},
        "spec": {"attachRequired": false, "podInfoOnMount": true, "volumeLifecycleModes": ["Persistent", "Ephemeral"]},
    })
}

/// The refusal a status patch carries: Pending, Accepted False with this reason, no start, no
/// mounts recorded.
fn refused_with(
    status: &Arc<Mutex<Option<ExperimentStatus>>>,
    reason: &'static str,
    says: &'static [&'static str],
) -> Exchange {
    status_patch(status, move |s| {
        assert_eq!(s.phase, Some(Phase::Pending));
        assert_eq!(s.start_time, None, "nothing started");
        assert!(
            s.mounts.is_empty(),
            "no driver is recorded for a refused run"
        );
        let accepted = s.conditions.iter().find(|c| c.type_ == "Accepted").unwrap();
        assert_eq!(
            (accepted.status.as_str(), accepted.reason.as_str()),
            ("False", reason)
        );
        for said in says {
            assert!(accepted.message.contains(said), "{}", accepted.message);
        }
    })
}

#[tokio::test]
async fn a_sidecar_in_a_restricted_namespace_is_refused_and_nothing_is_created() {
    let exp = experiment(&mount_spec(", mountDriver: sidecar"));
    let status = Arc::default();
    let mut script = vec![expect(&format!("GET {RUN}")).not_found()];
    script.extend(resolution());
    script.extend([
        expect(&format!("GET {BLOB_CSI}")).ok(csi_driver("blob.csi.azure.com")),
        expect(&format!("GET {NAMESPACE}")).ok(namespace(json!({
            "pod-security.kubernetes.io/enforce": "restricted",
            "team": "vision",
        }))),
        refused_with(
            &status,
            "PrivilegedForbidden",
            &[
                "parameter --images: the blobfuse2 sidecar must run privileged, which namespace ml forbids (pod-security.kubernetes.io/enforce: restricted)",
                "use mountDriver: csi",
            ],
        ),
        event_about("Warning", "PrivilegedForbidden", "must run privileged"),
    ]);
    // No Secret, no Job: the namespace's admission would refuse the pod anyway, later and
    // less clearly (the Job would just never get one).
    let action = reconcile_with(&exp, script, with_blobfuse()).await;
    assert_eq!(
        action,
        Action::requeue(BLOCKED_RECHECK),
        "an admin may relabel the namespace: it waits and looks again"
    );
}

#[tokio::test]
async fn csi_requested_without_the_driver_waits_for_it() {
    let exp = experiment(&mount_spec(", mountDriver: csi"));
    let status = Arc::default();
    let mut script = vec![expect(&format!("GET {RUN}")).not_found()];
    script.extend(resolution());
    script.extend([
        expect(&format!("GET {BLOB_CSI}")).not_found(),
        expect(&format!("GET {NAMESPACE}")).ok(namespace(json!({}))),
        refused_with(
            &status,
            "CsiDriverMissing",
            &[
                "needs the CSIDriver blob.csi.azure.com, which this cluster does not have",
                "az aks update --enable-blob-driver",
            ],
        ),
        event_about("Warning", "CsiDriverMissing", "blob.csi.azure.com"),
    ]);
    let action = reconcile_with(&exp, script, with_blobfuse()).await;
    assert_eq!(action, Action::requeue(BLOCKED_RECHECK));
}

fn share_datastore() -> Value {
    json!({
        "apiVersion": "datastore.dev/v1alpha1",
        "kind": "Datastore",
        "metadata": {"name": "share-ds", "namespace": NS, "uid": "uid-share", "resourceVersion": "7", "generation": 1},
        "spec": {"azureFile": {
            "accountName": "mlstorage",
            "shareName": "datasets",
            "credentials": {"secretRef": {"name": "mlstorage-key"}},
        }},
    })
}

/// The requests that resolve `share-ds` (an Azure Files share with an account key).
fn share_resolution() -> Vec<Exchange> {
    vec![
        expect(&format!("GET {GROUP}/namespaces/ml/datastores/share-ds")).ok(share_datastore()),
        expect("GET /api/v1/namespaces/ml/secrets/mlstorage-key").ok(secret(
            NS,
            "mlstorage-key",
            "accountKey",
            ACCOUNT_KEY,
        )),
    ]
}

#[tokio::test]
async fn a_download_from_a_share_waits_for_the_file_driver() {
    let exp = experiment(
        r#"
image: python:3.12-slim
entryScript: train.py
scriptParams:
  - name: --data
    dataReference: {datastore: share-ds, path: tables, mode: download}
"#,
    );
    let status = Arc::default();
    let mut script = vec![expect(&format!("GET {RUN}")).not_found()];
    script.extend(share_resolution());
    script.extend([
        // No mount: neither the blob driver nor the namespace is asked about.
        expect(&format!("GET {FILE_CSI}")).not_found(),
        refused_with(
            &status,
            "CsiDriverMissing",
            &[
                "parameter --data: datastore share-ds is an Azure Files share",
                "file.csi.azure.com",
                "--enable-file-driver",
            ],
        ),
        event_about("Warning", "CsiDriverMissing", "file.csi.azure.com"),
    ]);
    let action = reconcile_once(&exp, script).await;
    assert_eq!(action, Action::requeue(BLOCKED_RECHECK));
}

const MOUNT_SECRET: &str = "/api/v1/namespaces/ml/secrets/train-mount-0";

/// The one status patch of a created run with mounts: Pending, started, Accepted True, the
/// message counting the mount, and `check` on the mounts recorded.
fn created_with_mounts(
    status: &Arc<Mutex<Option<ExperimentStatus>>>,
    check: impl FnOnce(&[MountRecord]) + Send + 'static,
) -> Exchange {
    status_patch(status, move |s| {
        assert_eq!(s.phase, Some(Phase::Pending));
        assert!(s.start_time.is_some());
        let accepted = s.conditions.iter().find(|c| c.type_ == "Accepted").unwrap();
        assert_eq!(accepted.status, "True");
        assert_eq!(
            s.message.as_deref(),
            Some(
                "created Job train-run (0 download(s), 1 mount(s), 0 upload(s)); waiting for its pod to start"
            )
        );
        check(&s.mounts);
    })
}

/// The run pod's spec of an applied Job.
fn pod_spec(job: &Value) -> &Value {
    &job["spec"]["template"]["spec"]
}

/// No container but the sidecars sees a Secret, and `main` none at all.
fn main_sees_no_secret(pod: &Value) {
    let main = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "main")
        .unwrap();
    assert!(
        !main.to_string().contains("train-mount-0") && !main.to_string().contains("credentials"),
        "the script's container gets no credentials: {main}"
    );
}

#[tokio::test]
async fn a_csi_mount_checks_the_cluster_applies_its_secret_and_records_the_driver() {
    let exp = experiment(&mount_spec(""));
    let status = Arc::default();
    let mut script = vec![expect(&format!("GET {RUN}")).not_found()];
    script.extend(resolution());
    script.extend([
        expect(&format!("GET {BLOB_CSI}")).ok(csi_driver("blob.csi.azure.com")),
        expect(&format!("GET {NAMESPACE}")).ok(namespace(json!({
            "pod-security.kubernetes.io/enforce": "restricted",
        }))),
        // The volume's Secret, before the Job: a SAS for reading and listing, never the key.
        apply(MOUNT_SECRET).body(|secret| {
            assert_eq!(secret["metadata"]["ownerReferences"][0]["uid"], UID);
            let data = common::secret_values(secret);
            assert_eq!(data["azurestorageaccountname"], "mlstorage");
            let sas = data["azurestorageaccountsastoken"].as_str();
            assert!(sas.contains("sp=rl"), "read and list only: {sas}");
            assert!(!data.values().any(|v| v.contains(ACCOUNT_KEY)), "{data:?}");
        }),
        apply(RUN).body(|job| {
            let pod = pod_spec(job);
            let volume = pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == "mount-0")
                .expect("the mount's volume");
            assert_eq!(volume["csi"]["driver"], "blob.csi.azure.com");
            assert_eq!(volume["csi"]["readOnly"], true);
            assert_eq!(
                volume["csi"]["volumeAttributes"]["secretName"],
                "train-mount-0"
            );
            // Unprivileged: no sidecar, so the restricted namespace admits the pod.
            assert!(pod["initContainers"].is_null(), "{pod}");
            main_sees_no_secret(pod);
            let main = &pod["containers"][0];
            assert_eq!(
                main["args"],
                json!(["--images", "/mnt/datastore/images", "--epochs", "3"])
            );
        }),
        created_with_mounts(&status, |mounts| {
            assert_eq!(
                mounts,
                [MountRecord {
                    name: "--images".into(),
                    datastore: "blob-ds".into(),
                    path: "datasets/images".into(),
                    driver: MountDriver::Csi,
                    read_only: true,
                    reason: "the cluster has the CSIDriver blob.csi.azure.com".into(),
                }]
            );
        }),
        event_about("Normal", "Created", "1 mount(s)"),
    ]);
    let action = reconcile_with(&exp, script, with_blobfuse()).await;
    assert_eq!(action, Action::requeue(ACTIVE_RECHECK));

    // Following the run reads the Job and its pods only: the driver stays what was recorded.
    let started = with_status(exp, written(&status));
    let action = reconcile_once(
        &started,
        vec![
            expect(&format!("GET {RUN}")).ok(active_job("train-run")),
            run_pods(running()),
            status_patch(&Arc::default(), |s| {
                assert_eq!(s.phase, Some(Phase::Running));
                assert_eq!(s.mounts.len(), 1, "the record is kept");
                assert_eq!(s.mounts[0].driver, MountDriver::Csi);
            }),
            event_about("Normal", "Running", "the script is running"),
        ],
    )
    .await;
    assert_eq!(action, Action::requeue(ACTIVE_RECHECK));
}

#[tokio::test]
async fn without_the_blob_driver_auto_chooses_the_sidecar_and_says_why() {
    let exp = experiment(&mount_spec(""));
    let status = Arc::default();
    let mut script = vec![expect(&format!("GET {RUN}")).not_found()];
    script.extend(resolution());
    script.extend([
        expect(&format!("GET {BLOB_CSI}")).not_found(),
        // No Pod Security label: the namespace admits privileged pods.
        expect(&format!("GET {NAMESPACE}")).ok(namespace(json!({"team": "vision"}))),
        // The blobfuse2 config, with its SAS, in the sidecar's Secret.
        apply(MOUNT_SECRET).body(|secret| {
            assert_eq!(secret["metadata"]["ownerReferences"][0]["uid"], UID);
            let data = common::secret_values(secret);
            assert!(!data.values().any(|v| v.contains(ACCOUNT_KEY)), "{data:?}");
        }),
        apply(RUN).body(|job| {
            let pod = pod_spec(job);
            let sidecar = &pod["initContainers"][0];
            assert_eq!(sidecar["name"], "mount-0");
            assert_eq!(sidecar["restartPolicy"], "Always", "a native sidecar");
            assert_eq!(sidecar["image"], "registry.example.com/ml/blobfuse2:2.5.1");
            assert_eq!(sidecar["securityContext"]["privileged"], true);
            let propagation = |container: &Value| {
                container["volumeMounts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|m| m["mountPath"] == "/mnt/datastore/images")
                    .map(|m| m["mountPropagation"].clone())
            };
            let main = &pod["containers"][0];
            assert_eq!(propagation(main), Some(json!("HostToContainer")), "{main}");
            assert!(
                sidecar["volumeMounts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|m| m["mountPropagation"] == "Bidirectional"),
                "{sidecar}"
            );
            main_sees_no_secret(pod);
        }),
        created_with_mounts(&status, |mounts| {
            assert_eq!(mounts.len(), 1);
            assert_eq!(mounts[0].driver, MountDriver::Sidecar);
            assert_eq!(
                mounts[0].reason,
                "the cluster has no CSIDriver blob.csi.azure.com, so a privileged blobfuse2 sidecar mounts it"
            );
        }),
        event_about("Normal", "Created", "1 mount(s)"),
    ]);
    let action = reconcile_with(&exp, script, with_blobfuse()).await;
    assert_eq!(action, Action::requeue(ACTIVE_RECHECK));
}

#[tokio::test]
async fn a_csi_driver_the_controller_may_not_read_is_not_checked_and_the_status_says_so() {
    let exp = experiment(&mount_spec(""));
    let status = Arc::default();
    let mut script = vec![expect(&format!("GET {RUN}")).not_found()];
    script.extend(resolution());
    script.extend([
        expect(&format!("GET {BLOB_CSI}")).reply(
            http::StatusCode::FORBIDDEN,
            json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "code": 403, "reason": "Forbidden",
                "message": "csidrivers.storage.k8s.io \"blob.csi.azure.com\" is forbidden",
            }),
        ),
        expect(&format!("GET {NAMESPACE}")).ok(namespace(json!({}))),
        apply(MOUNT_SECRET),
        apply(RUN),
        created_with_mounts(&status, |mounts| {
            assert_eq!(mounts[0].driver, MountDriver::Csi);
            assert!(
                mounts[0].reason.contains("was not checked"),
                "{}",
                mounts[0].reason
            );
        }),
        event_about("Normal", "Created", "1 mount(s)"),
    ]);
    let action = reconcile_with(&exp, script, with_blobfuse()).await;
    assert_eq!(action, Action::requeue(ACTIVE_RECHECK));
}

#[tokio::test]
async fn a_mount_of_a_cluster_datastore_reads_the_namespace_once() {
    let exp = experiment(&mount_spec(", mountDriver: sidecar"));
    let status = Arc::default();
    let script = vec![
        expect(&format!("GET {RUN}")).not_found(),
        expect(&format!("GET {GROUP}/namespaces/ml/datastores/blob-ds")).not_found(),
        expect(&format!("GET {GROUP}/clusterdatastores/blob-ds")).ok(cluster_datastore(
            json!({"matchLabels": {"team": "vision"}}),
        )),
        expect(&format!("GET {NAMESPACE}")).ok(namespace(json!({
            "team": "vision",
            "pod-security.kubernetes.io/enforce": "baseline",
        }))),
        expect(&format!(
            "GET /api/v1/namespaces/{OPERATOR_NS}/secrets/shared-key"
        ))
        .ok(secret(OPERATOR_NS, "shared-key", "accountKey", ACCOUNT_KEY)),
        expect(&format!("GET {BLOB_CSI}")).ok(csi_driver("blob.csi.azure.com")),
        // The labels read for allowedNamespaces decide the Pod Security level too.
        refused_with(
            &status,
            "PrivilegedForbidden",
            &["(pod-security.kubernetes.io/enforce: baseline)"],
        ),
        event_about("Warning", "PrivilegedForbidden", "must run privileged"),
    ];
    let action = reconcile_with(&exp, script, with_blobfuse()).await;
    assert_eq!(action, Action::requeue(BLOCKED_RECHECK));
}

/// An upload to an Azure Files share: the run and the upload Job mount the share through
/// file.csi.azure.com with its Secret; the upload rebuild applies that Secret again.
#[tokio::test]
async fn uploads_to_a_share_apply_the_share_secret_for_the_run_and_the_upload() {
    let exp = experiment(
        r#"
image: python:3.12-slim
entryScript: train.py
scriptParams:
  - name: --out
    dataReference: {datastore: share-ds, path: results, mode: upload, pathOnCompute: out}
"#,
    );
    const SHARE_SECRET: &str = "/api/v1/namespaces/ml/secrets/train-share-0";
    let status = Arc::default();
    let mut script = vec![expect(&format!("GET {RUN}")).not_found()];
    script.extend(share_resolution());
    script.extend([
        // No mount: the file driver only, no namespace.
        expect(&format!("GET {FILE_CSI}")).ok(csi_driver("file.csi.azure.com")),
        apply(CREDENTIALS),
        apply(SHARE_SECRET).body(|secret| {
            let data = common::secret_values(secret);
            assert_eq!(data["azurestorageaccountname"], "mlstorage");
        }),
        apply(PVC),
        apply(RUN),
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Pending));
            assert!(s.mounts.is_empty());
            assert!(
                s.message
                    .as_deref()
                    .unwrap()
                    .contains("(0 download(s), 0 mount(s), 1 upload(s))")
            );
        }),
        event_about("Normal", "Created", "created Job train-run"),
    ]);
    let action = reconcile_once(&exp, script).await;
    assert_eq!(action, Action::requeue(ACTIVE_RECHECK));
    let started = with_status(exp, written(&status));

    let status = Arc::default();
    let mut script = vec![
        run_completed(),
        expect(&format!("GET {PODS}"))
            .query("labelSelector=batch.kubernetes.io%2Fjob-name%3Dtrain-run")
            .ok(pods(vec![pod(
                vec![],
                vec![container("main", terminated(0, ""))],
            )])),
        expect(&format!("GET {UPLOAD}")).not_found(),
    ];
    script.extend(share_resolution());
    script.extend([
        apply(CREDENTIALS),
        apply(SHARE_SECRET),
        apply(UPLOAD).body(|job| {
            let pod = pod_spec(job);
            let share = pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["csi"]["driver"] == "file.csi.azure.com")
                .expect("the share's volume");
            assert_eq!(
                share["csi"]["volumeAttributes"]["secretName"],
                "train-share-0"
            );
        }),
        status_patch(&status, |s| assert_eq!(s.phase, Some(Phase::Uploading))),
        event_about("Normal", "Uploading", "train-upload"),
    ]);
    let action = reconcile_once(&started, script).await;
    assert_eq!(action, Action::requeue(ACTIVE_RECHECK));
}

#[tokio::test]
async fn an_operator_without_a_blobfuse_image_refuses_the_sidecar_auto_would_choose() {
    let exp = experiment(&mount_spec(""));
    let status = Arc::default();
    let mut script = vec![expect(&format!("GET {RUN}")).not_found()];
    script.extend(resolution());
    script.extend([
        expect(&format!("GET {BLOB_CSI}")).not_found(),
        expect(&format!("GET {NAMESPACE}")).ok(namespace(json!({}))),
        refused_with(
            &status,
            "NoBlobfuseImage",
            &["set --blobfuse-image (Helm value blobfuseImage)"],
        ),
        event_about("Warning", "NoBlobfuseImage", "blobfuse2 image"),
    ]);
    // BuildContext::default(): no --blobfuse-image.
    let action = reconcile_once(&exp, script).await;
    assert_eq!(action, Action::requeue(BLOCKED_RECHECK));
}

#[tokio::test]
async fn a_failed_csi_driver_lookup_is_retried_not_guessed() {
    let exp = experiment(&mount_spec(""));
    let mut script = vec![expect(&format!("GET {RUN}")).not_found()];
    script.extend(resolution());
    script.push(expect(&format!("GET {BLOB_CSI}")).reply(
        http::StatusCode::SERVICE_UNAVAILABLE,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "code": 503, "reason": "ServiceUnavailable", "message": "etcd is unavailable",
        }),
    ));
    // The choice is final once recorded: no status, no event, an error (retried after
    // ERROR_RETRY) rather than a driver picked without knowing.
    let (client, server) = start_as_controller(script, OPERATOR_NS);
    let result = reconcile(Arc::new(exp), context(client, with_blobfuse())).await;
    server.done().await;
    let error = result.expect_err("the reconcile fails");
    assert_eq!(error.reason(), "KubeServiceUnavailable");
}
