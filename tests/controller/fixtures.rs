//! What the controller scenarios share: the Experiment under test and its clock, one reconcile
//! against a script, the status patches and events it must send, and the objects the scripted
//! apiserver hands back (datastores, Jobs, pods).

use std::sync::{Arc, Mutex};

use chrono::{DateTime, TimeZone, Utc};
use datastore_operator::api::{Experiment, ExperimentSpec, ExperimentStatus, Phase};
use datastore_operator::controller::Context;
use datastore_operator::controller::experiment::{ACTIVE_RECHECK, reconcile};
use datastore_operator::render::BuildContext;
use kube::runtime::controller::Action;
use serde_json::{Value, json};

use crate::common;
use crate::common::apiserver::{Exchange, apply, event, expect, start_as_controller};
pub use crate::common::objects::secret;

pub const NS: &str = "ml";

pub const OPERATOR_NS: &str = "datastore-operator";

pub const UID: &str = "6a1f0e52-0000-4000-8000-000000000001";

pub const GROUP: &str = "/apis/datastore.dev/v1alpha1";

pub const RUN: &str = "/apis/batch/v1/namespaces/ml/jobs/train-run";

pub const UPLOAD: &str = "/apis/batch/v1/namespaces/ml/jobs/train-upload";

pub const PODS: &str = "/api/v1/namespaces/ml/pods";

pub const PVC: &str = "/api/v1/namespaces/ml/persistentvolumeclaims/train-outputs";

pub const CREDENTIALS: &str = "/api/v1/namespaces/ml/secrets/train-credentials";

pub const STATUS: &str = "/apis/datastore.dev/v1alpha1/namespaces/ml/experiments/train/status";

pub const EXAMPLE: &str = r#"
image: python:3.12-slim
entryScript: training_script.py
scriptParams:
  - name: --data_folder
    dataReference: {datastore: blob-ds, path: data/files, mode: download, pathOnCompute: training_data}
  - name: --output_dir
    dataReference: {datastore: blob-ds, path: outputs/run1, mode: upload, pathOnCompute: outputs}
  - name: --regularization
    value: "0.1"
"#;

pub fn experiment(spec: &str) -> Experiment {
    let spec: ExperimentSpec = serde_saphyr::from_str(spec).unwrap();
    let mut exp = Experiment::new("train", spec);
    exp.metadata.namespace = Some(NS.into());
    exp.metadata.uid = Some(UID.into());
    exp.metadata.generation = Some(1);
    exp.metadata.resource_version = Some("100".into());
    exp
}

pub fn with_status(mut exp: Experiment, status: ExperimentStatus) -> Experiment {
    exp.status = Some(status);
    exp
}

pub fn the_clock() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 0).unwrap()
}

pub fn context(client: kube::Client, build: BuildContext) -> Arc<Context> {
    let mut ctx = Context::new(client, OPERATOR_NS.into(), build);
    ctx.clock = the_clock;
    Arc::new(ctx)
}

/// Runs one reconcile against the script; returns its action.
pub async fn reconcile_once(exp: &Experiment, script: Vec<Exchange>) -> Action {
    reconcile_with(exp, script, BuildContext::default()).await
}

/// [`reconcile_once`] with these operator settings.
pub async fn reconcile_with(
    exp: &Experiment,
    script: Vec<Exchange>,
    build: BuildContext,
) -> Action {
    let (client, server) = start_as_controller(script, OPERATOR_NS);
    let result = reconcile(Arc::new(exp.clone()), context(client, build)).await;
    server.done().await;
    result.expect("the reconcile succeeds")
}

/// A status patch (server-side apply of the status subresource) whose body `check` inspects;
/// the status it carries is stored in `into` for the next scenario.
pub fn status_patch(
    into: &Arc<Mutex<Option<ExperimentStatus>>>,
    check: impl FnOnce(&ExperimentStatus) + Send + 'static,
) -> Exchange {
    let into = into.clone();
    apply(STATUS)
        .body(move |body| {
            assert_eq!(body["apiVersion"], "datastore.dev/v1alpha1");
            assert_eq!(body["kind"], "Experiment");
            let status: ExperimentStatus = serde_json::from_value(body["status"].clone()).unwrap();
            check(&status);
            *into.lock().unwrap() = Some(status);
        })
        // What the apiserver answers: the whole object.
        .ok(serde_json::to_value(experiment(EXAMPLE)).unwrap())
}

/// An event about the experiment with this type and reason; `note` must contain `says`.
pub fn event_about(type_: &'static str, reason: &'static str, says: &'static str) -> Exchange {
    event(NS).body(move |e| {
        assert_eq!(e["regarding"]["kind"], "Experiment");
        assert_eq!(e["regarding"]["name"], "train");
        assert_eq!(e["type"], type_, "{e}");
        assert_eq!(e["reason"], reason, "{e}");
        let note = e["note"].as_str().unwrap();
        assert!(note.contains(says), "event note {note:?} lacks {says:?}");
        assert_eq!(e["reportingController"], "datastore-operator");
    })
}

pub fn blob_datastore(ns: &str, name: &str) -> Value {
    json!({
        "apiVersion": "datastore.dev/v1alpha1",
        "kind": "Datastore",
        "metadata": {"name": name, "namespace": ns, "uid": "uid-ds", "resourceVersion": "7", "generation": 1},
        "spec": {"azureBlob": {
            "accountName": "mlstorage",
            "containerName": "training",
            "credentials": {"secretRef": {"name": "mlstorage-key"}},
        }},
    })
}

/// Not a real key: base64 of "not-a-real-account-key-for-tests".
pub const ACCOUNT_KEY: &str = "bm90LWEtcmVhbC1hY2NvdW50LWtleS1mb3ItdGVzdHM=";

/// The requests that resolve `blob-ds` (a Datastore in the namespace with an account key).
pub fn resolution() -> Vec<Exchange> {
    vec![
        expect(&format!("GET {GROUP}/namespaces/ml/datastores/blob-ds"))
            .ok(blob_datastore(NS, "blob-ds")),
        expect("GET /api/v1/namespaces/ml/secrets/mlstorage-key").ok(secret(
            NS,
            "mlstorage-key",
            "accountKey",
            ACCOUNT_KEY,
        )),
    ]
}

pub fn job(name: &str, conditions: Value) -> Value {
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": NS, "resourceVersion": "20", "ownerReferences": [{
            "apiVersion": "datastore.dev/v1alpha1", "kind": "Experiment", "name": "train", "uid": UID,
            "controller": true, "blockOwnerDeletion": true,
        }]},
        "spec": {"template": {"spec": {"containers": [{"name": "main", "image": "x"}]}}},
        "status": {"conditions": conditions},
    })
}

pub fn active_job(name: &str) -> Value {
    let mut job = job(name, json!([]));
    job["status"] = json!({"active": 1});
    job
}

/// The run Job read back after it completed.
pub fn run_completed() -> Exchange {
    expect(&format!("GET {RUN}")).ok(job("train-run", condition("Complete", "Completed")))
}

pub fn condition(type_: &str, reason: &str) -> Value {
    json!([{"type": type_, "status": "True", "reason": reason, "message": format!("{reason} happened")}])
}

pub fn container(name: &str, state: Value) -> Value {
    json!({"name": name, "image": "x", "imageID": "", "ready": false, "restartCount": 0, "state": state})
}

pub fn terminated(exit_code: i32, message: &str) -> Value {
    json!({"terminated": {"exitCode": exit_code, "message": message, "reason": if exit_code == 0 {"Completed"} else {"Error"}}})
}

pub fn running() -> Value {
    json!({"running": {"startedAt": "2026-11-24T12:00:00Z"}})
}

pub fn pods(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "30"}, "items": items})
}

pub fn pod(init: Vec<Value>, main: Vec<Value>) -> Value {
    named_pod("train-run-abcde", init, main)
}

pub fn named_pod(name: &str, init: Vec<Value>, main: Vec<Value>) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "creationTimestamp": "2026-11-24T12:00:05Z"},
        "status": {"phase": "Running", "initContainerStatuses": init, "containerStatuses": main},
    })
}

pub const REPORT: &str = r#"{"files":3,"bytes":1234,"digest":"sha256:5b1c"}"#;

pub fn run_pods(main_state: Value) -> Exchange {
    expect(&format!("GET {PODS}"))
        .query("labelSelector=batch.kubernetes.io%2Fjob-name%3Dtrain-run")
        .ok(pods(vec![pod(
            vec![container("download-0", terminated(0, REPORT))],
            vec![container("main", main_state)],
        )]))
}

/// Creation: the datastore resolves, the credentials Secret (a minted SAS, never the key), the
/// outputs PVC and the run Job are applied, and the status says Pending with Accepted True.
pub async fn created() -> Experiment {
    let exp = experiment(EXAMPLE);
    let status = Arc::default();
    let mut script = vec![expect(&format!("GET {RUN}")).not_found()];
    script.extend(resolution());
    script.extend([
        apply(CREDENTIALS).body(|secret| {
            let file = &common::secret_values(secret)["datastores.yaml"];
            assert!(
                !file.contains(ACCOUNT_KEY),
                "the account key never leaves the controller"
            );
            assert!(file.contains("sasToken"), "{file}");
            assert!(
                file.contains("sp=rcwl"),
                "download and upload permissions only: {file}"
            );
            assert_eq!(secret["metadata"]["ownerReferences"][0]["uid"], UID);
            assert_eq!(secret["metadata"]["ownerReferences"][0]["controller"], true);
        }),
        apply(PVC).body(|pvc| {
            assert_eq!(pvc["spec"]["resources"]["requests"]["storage"], "10Gi");
            assert_eq!(
                pvc["metadata"]["labels"]["datastore.dev/experiment"],
                "train"
            );
        }),
        apply(RUN).body(|job| {
            let pod = &job["spec"]["template"]["spec"];
            assert_eq!(pod["initContainers"][0]["name"], "download-0");
            let main = &pod["containers"][0];
            assert_eq!(
                main["args"],
                json!([
                    "--data_folder",
                    "/mnt/datastore/training_data",
                    "--output_dir",
                    "/mnt/datastore/outputs",
                    "--regularization",
                    "0.1"
                ])
            );
            assert!(
                !main.to_string().contains("credentials"),
                "the script's container gets no credentials: {main}"
            );
        }),
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Pending));
            assert_eq!(s.observed_generation, Some(1));
            assert!(s.start_time.is_some());
            assert_eq!(s.completion_time, None);
            let accepted = s.conditions.iter().find(|c| c.type_ == "Accepted").unwrap();
            assert_eq!(
                (accepted.status.as_str(), accepted.reason.as_str()),
                ("True", "Accepted")
            );
            assert!(
                s.message
                    .as_deref()
                    .unwrap()
                    .contains("created Job train-run")
            );
        }),
        event_about("Normal", "Created", "created Job train-run"),
    ]);
    let action = reconcile_once(&exp, script).await;
    assert_eq!(action, Action::requeue(ACTIVE_RECHECK));
    with_status(exp, written(&status))
}

pub fn written(status: &Arc<Mutex<Option<ExperimentStatus>>>) -> ExperimentStatus {
    status
        .lock()
        .unwrap()
        .clone()
        .expect("a status was written")
}

/// The run's pod has downloaded and runs the script: Running, with the download's report as
/// the input record (the plan is needed to name it, so the datastore is resolved again).
pub async fn running_exp() -> Experiment {
    let exp = created().await;
    let status = Arc::default();
    let mut script = vec![
        expect(&format!("GET {RUN}")).ok(active_job("train-run")),
        run_pods(running()),
    ];
    script.extend(resolution());
    script.extend([
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Running));
            assert_eq!(s.inputs.len(), 1);
            let input = &s.inputs[0];
            assert_eq!(
                (
                    input.name.as_str(),
                    input.datastore.as_str(),
                    input.path.as_str()
                ),
                ("--data_folder", "blob-ds", "data/files")
            );
            assert_eq!(
                (input.files, input.bytes, input.digest.as_str()),
                (3, 1234, "sha256:5b1c")
            );
        }),
        event_about("Normal", "Running", "the script is running"),
    ]);
    let action = reconcile_once(&exp, script).await;
    assert_eq!(action, Action::requeue(ACTIVE_RECHECK));
    with_status(exp, written(&status))
}

/// The run Job, active, created `minutes` before the clock, with a uid events can name.
pub fn job_created_minutes_ago(name: &str, minutes: i64) -> Value {
    let mut job = active_job(name);
    job["status"] = json!({});
    job["metadata"]["uid"] = json!(format!("{name}-uid"));
    job["metadata"]["creationTimestamp"] =
        json!((the_clock() - chrono::Duration::minutes(minutes)).to_rfc3339());
    job
}

pub fn failed_run_pods() -> Exchange {
    run_pods(terminated(
        2,
        "ValueError: no files in /mnt/datastore/training_data",
    ))
}

pub fn cluster_datastore(allowed: Value) -> Value {
    json!({
        "apiVersion": "datastore.dev/v1alpha1",
        "kind": "ClusterDatastore",
        "metadata": {"name": "blob-ds", "uid": "uid-cds", "resourceVersion": "8", "generation": 1},
        "spec": {
            "azureBlob": {
                "accountName": "shared",
                "containerName": "datasets",
                "credentials": {"secretRef": {"name": "shared-key"}},
            },
            "allowedNamespaces": allowed,
        },
    })
}

pub fn namespace(labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "labels": labels}})
}

pub fn refused(code: u16, reason: &str, message: &str) -> (http::StatusCode, Value) {
    (
        http::StatusCode::from_u16(code).unwrap(),
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "code": code,
            "reason": reason, "message": message,
        }),
    )
}

pub fn deleted(path: &str) -> Exchange {
    expect(&format!("DELETE {path}"))
        .ok(json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}))
}
