//! Controller scenarios against a mocked apiserver: each reconcile's requests are checked in
//! order (method, path, query, body). Scenarios chain: each starts from the status the previous
//! one wrote, as the apiserver would hand it back.
//!
//! The datastore checks talk to a real Azurite (the harness in `common`).

mod common;

use std::sync::{Arc, Mutex};

use base64::Engine;
use chrono::{DateTime, TimeZone, Utc};
use common::apiserver::{Exchange, apply, event, expect, start_as_controller};
use datastore_operator::api::{
    ClusterDatastore, Datastore, Experiment, ExperimentSpec, ExperimentStatus, MountDriver,
    MountRecord, Phase,
};
use datastore_operator::controller::datastore::{
    NOT_READY_RECHECK, READY_RECHECK, reconcile_cluster_datastore, reconcile_datastore,
};
use datastore_operator::controller::experiment::{ACTIVE_RECHECK, BLOCKED_RECHECK, reconcile};
use datastore_operator::controller::{Context, referencing};
use datastore_operator::render::BuildContext;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::watcher;
use serde_json::{Value, json};

const NS: &str = "ml";
const OPERATOR_NS: &str = "datastore-operator";
const UID: &str = "6a1f0e52-0000-4000-8000-000000000001";

const GROUP: &str = "/apis/datastore.dev/v1alpha1";
const RUN: &str = "/apis/batch/v1/namespaces/ml/jobs/train-run";
const UPLOAD: &str = "/apis/batch/v1/namespaces/ml/jobs/train-upload";
const PODS: &str = "/api/v1/namespaces/ml/pods";
const PVC: &str = "/api/v1/namespaces/ml/persistentvolumeclaims/train-outputs";
const CREDENTIALS: &str = "/api/v1/namespaces/ml/secrets/train-credentials";
const STATUS: &str = "/apis/datastore.dev/v1alpha1/namespaces/ml/experiments/train/status";

const EXAMPLE: &str = r#"
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

fn experiment(spec: &str) -> Experiment {
    let spec: ExperimentSpec = serde_saphyr::from_str(spec).unwrap();
    let mut exp = Experiment::new("train", spec);
    exp.metadata.namespace = Some(NS.into());
    exp.metadata.uid = Some(UID.into());
    exp.metadata.generation = Some(1);
    exp.metadata.resource_version = Some("100".into());
    exp
}

fn with_status(mut exp: Experiment, status: ExperimentStatus) -> Experiment {
    exp.status = Some(status);
    exp
}

fn the_clock() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 0).unwrap()
}

fn context(client: kube::Client, build: BuildContext) -> Arc<Context> {
    let mut ctx = Context::new(client, OPERATOR_NS.into(), build);
    ctx.clock = the_clock;
    Arc::new(ctx)
}

/// Runs one reconcile against the script; returns its action.
async fn reconcile_once(exp: &Experiment, script: Vec<Exchange>) -> Action {
    reconcile_with(exp, script, BuildContext::default()).await
}

/// [`reconcile_once`] with these operator settings.
async fn reconcile_with(exp: &Experiment, script: Vec<Exchange>, build: BuildContext) -> Action {
    let (client, server) = start_as_controller(script, OPERATOR_NS);
    let result = reconcile(Arc::new(exp.clone()), context(client, build)).await;
    server.done().await;
    result.expect("the reconcile succeeds")
}

/// A status patch (server-side apply of the status subresource) whose body `check` inspects;
/// the status it carries is stored in `into` for the next scenario.
fn status_patch(
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
fn event_about(type_: &'static str, reason: &'static str, says: &'static str) -> Exchange {
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

fn blob_datastore(ns: &str, name: &str) -> Value {
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

fn secret(ns: &str, name: &str, key: &str, value: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": ns, "resourceVersion": "9"},
        "data": {key: base64::engine::general_purpose::STANDARD.encode(value)},
    })
}

/// Not a real key: base64 of "not-a-real-account-key-for-tests".
const ACCOUNT_KEY: &str = "bm90LWEtcmVhbC1hY2NvdW50LWtleS1mb3ItdGVzdHM=";

/// The requests that resolve `blob-ds` (a Datastore in the namespace with an account key).
fn resolution() -> Vec<Exchange> {
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

fn job(name: &str, conditions: Value) -> Value {
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

fn active_job(name: &str) -> Value {
    let mut job = job(name, json!([]));
    job["status"] = json!({"active": 1});
    job
}

/// The run Job read back after it completed.
fn run_completed() -> Exchange {
    expect(&format!("GET {RUN}")).ok(job("train-run", condition("Complete", "Completed")))
}

/// The outputs PVC deleted after a complete upload.
fn pvc_deleted() -> Exchange {
    expect(&format!("DELETE {PVC}"))
        .ok(json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}))
}

/// A finished pod deleted (after a complete upload: its claim can only go after it).
fn pod_deleted(name: &str) -> Exchange {
    expect(&format!("DELETE {PODS}/{name}"))
        .ok(json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}))
}

/// After a complete upload with nothing skipped: the decision recorded (`OutputsUploaded`),
/// then the finished pods of both Jobs deleted, then the outputs claim, which the
/// pvc-protection controller would keep while any of them existed.
fn cleanup(after_run: &'static str) -> Vec<Exchange> {
    let decided = Arc::default();
    vec![
        status_patch(&decided, move |s| {
            assert_eq!(s.phase, Some(Phase::Uploading));
            let message = s.message.as_deref().unwrap();
            assert!(message.starts_with(after_run), "{message}");
            assert!(
                message
                    .contains("removing the finished pods and PersistentVolumeClaim train-outputs"),
                "{message}"
            );
        }),
        event_about("Normal", "OutputsUploaded", "outputs were uploaded"),
        pod_deleted("train-run-abcde"),
        pod_deleted("train-upload-fghij"),
        pvc_deleted(),
    ]
}

fn condition(type_: &str, reason: &str) -> Value {
    json!([{"type": type_, "status": "True", "reason": reason, "message": format!("{reason} happened")}])
}

fn container(name: &str, state: Value) -> Value {
    json!({"name": name, "image": "x", "imageID": "", "ready": false, "restartCount": 0, "state": state})
}

fn terminated(exit_code: i32, message: &str) -> Value {
    json!({"terminated": {"exitCode": exit_code, "message": message, "reason": if exit_code == 0 {"Completed"} else {"Error"}}})
}

fn running() -> Value {
    json!({"running": {"startedAt": "2026-11-24T12:00:00Z"}})
}

fn pods(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "30"}, "items": items})
}

fn pod(init: Vec<Value>, main: Vec<Value>) -> Value {
    named_pod("train-run-abcde", init, main)
}

fn named_pod(name: &str, init: Vec<Value>, main: Vec<Value>) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "creationTimestamp": "2026-11-24T12:00:05Z"},
        "status": {"phase": "Running", "initContainerStatuses": init, "containerStatuses": main},
    })
}

const REPORT: &str = r#"{"files":3,"bytes":1234,"digest":"sha256:5b1c"}"#;

fn run_pods(main_state: Value) -> Exchange {
    expect(&format!("GET {PODS}"))
        .query("labelSelector=batch.kubernetes.io%2Fjob-name%3Dtrain-run")
        .ok(pods(vec![pod(
            vec![container("download-0", terminated(0, REPORT))],
            vec![container("main", main_state)],
        )]))
}

// -------------------------------------------------------------------------------------------
// The happy path, one step per scenario

/// Creation: the datastore resolves, the credentials Secret (a minted SAS, never the key), the
/// outputs PVC and the run Job are applied, and the status says Pending with Accepted True.
async fn created() -> Experiment {
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

fn written(status: &Arc<Mutex<Option<ExperimentStatus>>>) -> ExperimentStatus {
    status
        .lock()
        .unwrap()
        .clone()
        .expect("a status was written")
}

#[tokio::test]
async fn creation_applies_the_secret_the_pvc_and_the_run_job() {
    created().await;
}

/// The run's pod has downloaded and runs the script: Running, with the download's report as
/// the input record (the plan is needed to name it, so the datastore is resolved again).
async fn running_exp() -> Experiment {
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

#[tokio::test]
async fn a_running_job_becomes_the_status_with_the_inputs_it_saw() {
    running_exp().await;
}

#[tokio::test]
async fn an_unchanged_experiment_sends_no_writes() {
    let exp = running_exp().await;
    // Reads only: the Job and its pods. No resolution (the inputs are recorded), no PATCH, no event.
    let action = reconcile_once(
        &exp,
        vec![
            expect(&format!("GET {RUN}")).ok(active_job("train-run")),
            run_pods(running()),
        ],
    )
    .await;
    assert_eq!(action, Action::requeue(ACTIVE_RECHECK));
}

/// The run Job completed: fresh credentials and the upload Job are applied; Uploading.
async fn uploading(exp: Experiment) -> Experiment {
    let status = Arc::default();
    let mut script = vec![
        run_completed(),
        run_pods(terminated(0, "")),
        expect(&format!("GET {UPLOAD}")).not_found(),
    ];
    script.extend(resolution());
    script.extend([
        apply(CREDENTIALS).body(|secret| {
            let file = &common::secret_values(secret)["datastores.yaml"];
            assert!(!file.contains(ACCOUNT_KEY));
            assert!(file.contains("sasToken"));
        }),
        apply(UPLOAD).body(|job| {
            let container = &job["spec"]["template"]["spec"]["containers"][0];
            assert_eq!(container["name"], "upload-0");
            let args: Vec<&str> = container["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect();
            assert_eq!(&args[..2], ["agent", "upload"]);
            assert!(
                args.windows(2).any(|w| w == ["--path", "outputs/run1"]),
                "{args:?}"
            );
            assert!(
                args.windows(2)
                    .any(|w| w == ["--src-dir", "/mnt/datastore/outputs"]),
                "{args:?}"
            );
        }),
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Uploading));
            assert_eq!(s.inputs.len(), 1, "the inputs record is kept");
        }),
        event_about("Normal", "Uploading", "train-upload"),
    ]);
    let action = reconcile_once(&exp, script).await;
    assert_eq!(action, Action::requeue(ACTIVE_RECHECK));
    with_status(exp, written(&status))
}

#[tokio::test]
async fn a_succeeded_run_job_leads_to_the_upload_job() {
    uploading(running_exp().await).await;
}

#[tokio::test]
async fn a_finished_upload_deletes_the_pvc_and_the_experiment_succeeds() {
    let exp = uploading(running_exp().await).await;
    let status = Arc::default();
    let mut script = vec![
        run_completed(),
        run_pods(terminated(0, "")),
        expect(&format!("GET {UPLOAD}"))
            .ok(job("train-upload", condition("Complete", "Completed"))),
        upload_pods(0),
    ];
    script.extend(cleanup("the script succeeded"));
    script.extend([
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Succeeded));
            assert!(s.completion_time.is_some());
            let succeeded = s
                .conditions
                .iter()
                .find(|c| c.type_ == "Succeeded")
                .unwrap();
            assert_eq!(succeeded.status, "True");
        }),
        event_about("Normal", "Succeeded", "outputs were uploaded"),
    ]);
    let action = reconcile_once(&exp, script).await;
    assert_eq!(action, Action::await_change());

    // Finished: nothing more is read or written.
    let done = with_status(exp, written(&status));
    let action = reconcile_once(&done, vec![]).await;
    assert_eq!(action, Action::await_change());
}

/// The pass that cleans up is cut short (here a delete fails; a controller dying there is the
/// same) after the decision was written: the next pass, which finds the pods gone, trusts the
/// decision the status records (the reports went with the pods), deletes the claim and
/// finishes. Nothing runs again.
#[tokio::test]
async fn a_cleanup_cut_short_by_a_restart_finishes_from_the_recorded_decision() {
    let exp = uploading(running_exp().await).await;
    let decided = Arc::default();
    let mut script = vec![
        run_completed(),
        run_pods(terminated(0, "")),
        expect(&format!("GET {UPLOAD}"))
            .ok(job("train-upload", condition("Complete", "Completed"))),
        upload_pods(0),
    ];
    script.extend([
        status_patch(&decided, |s| assert_eq!(s.phase, Some(Phase::Uploading))),
        event_about("Normal", "OutputsUploaded", "outputs were uploaded"),
        expect(&format!("DELETE {PODS}/train-run-abcde")).reply(
            http::StatusCode::SERVICE_UNAVAILABLE,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 503, "message": "etcd is down", "reason": "ServiceUnavailable", "metadata": {}}),
        ),
    ]);
    let (client, server) = common::apiserver::start_as_controller(script, OPERATOR_NS);
    let result = reconcile(
        Arc::new(exp.clone()),
        context(client, BuildContext::default()),
    )
    .await;
    server.done().await;
    assert!(result.is_err(), "the pass ends at the failed delete");
    let exp = with_status(exp, written(&decided));

    let status = Arc::default();
    let script = vec![
        run_completed(),
        expect(&format!("GET {PODS}"))
            .query("labelSelector=batch.kubernetes.io%2Fjob-name%3Dtrain-run")
            .ok(pods(vec![])),
        expect(&format!("GET {UPLOAD}"))
            .ok(job("train-upload", condition("Complete", "Completed"))),
        expect(&format!("GET {PODS}"))
            .query("labelSelector=batch.kubernetes.io%2Fjob-name%3Dtrain-upload")
            .ok(pods(vec![])),
        pvc_deleted(),
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Succeeded));
            assert_eq!(
                s.inputs.len(),
                1,
                "the inputs recorded before the pods went"
            );
        }),
        event_about("Normal", "Succeeded", "outputs were uploaded"),
    ];
    assert_eq!(reconcile_once(&exp, script).await, Action::await_change());
}

// -------------------------------------------------------------------------------------------
// A pod that never starts: the reason in the status, then a bounded wait

/// The run Job, active, created `minutes` before the clock, with a uid events can name.
fn job_created_minutes_ago(name: &str, minutes: i64) -> Value {
    let mut job = active_job(name);
    job["status"] = json!({});
    job["metadata"]["uid"] = json!(format!("{name}-uid"));
    job["metadata"]["creationTimestamp"] =
        json!((the_clock() - chrono::Duration::minutes(minutes)).to_rfc3339());
    job
}

fn no_pods(job: &str) -> Exchange {
    expect(&format!("GET {PODS}"))
        .query(&format!(
            "labelSelector=batch.kubernetes.io%2Fjob-name%3D{job}"
        ))
        .ok(pods(vec![]))
}

/// The Warning events about the object with `uid`: the Job controller's FailedCreate.
fn failed_create(uid: &str) -> Exchange {
    expect("GET /api/v1/namespaces/ml/events")
        .query(&format!("fieldSelector=involvedObject.uid%3D{uid}%2Ctype%3DWarning"))
        .ok(json!({"apiVersion": "v1", "kind": "EventList", "metadata": {}, "items": [
            {"metadata": {"name": "e1", "namespace": NS}, "involvedObject": {"kind": "Job", "name": "train-run", "uid": uid},
             "type": "Warning", "reason": "FailedCreate", "lastTimestamp": "2026-11-24T11:55:00Z",
             "message": "Error creating: pods \"train-run-x\" is forbidden: exceeded quota: compute, requested: requests.cpu=2"},
            {"metadata": {"name": "e0", "namespace": NS}, "involvedObject": {"kind": "Job", "name": "train-run", "uid": uid},
             "type": "Warning", "reason": "FailedCreate", "lastTimestamp": "2026-11-24T11:50:00Z",
             "message": "an older refusal"},
        ]}))
}

/// A Job whose pods the cluster refuses (a quota, Pod Security) has none: the Job controller's
/// FailedCreate event says why, and the status says it while the experiment waits.
#[tokio::test]
async fn a_run_whose_pods_are_refused_says_why() {
    let exp = created().await;
    let status = Arc::default();
    let script = vec![
        expect(&format!("GET {RUN}")).ok(job_created_minutes_ago("train-run", 5)),
        no_pods("train-run"),
        failed_create("train-run-uid"),
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Pending));
            let message = s.message.as_deref().unwrap();
            assert!(
                message.starts_with("waiting for the run's pod to start: FailedCreate: Error creating: pods \"train-run-x\" is forbidden: exceeded quota"),
                "{message}"
            );
        }),
    ];
    // Looked at again before the start timeout (15 minutes, 10 left) runs out.
    assert_eq!(
        reconcile_once(&exp, script).await,
        Action::requeue(ACTIVE_RECHECK)
    );
}

/// Past the start timeout the experiment fails with the reason; the Job is suspended (its pods
/// go, it stays as the record) and the outputs claim, on which no script ever ran, goes.
#[tokio::test]
async fn a_run_that_does_not_start_in_time_fails_and_suspends_its_job() {
    let exp = created().await;
    let status = Arc::default();
    let script = vec![
        expect(&format!("GET {RUN}")).ok(job_created_minutes_ago("train-run", 16)),
        no_pods("train-run"),
        failed_create("train-run-uid"),
        expect(&format!("PATCH {RUN}")).body(|patch| {
            assert_eq!(patch, &json!({"spec": {"suspend": true}}));
        }),
        deleted(PVC),
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Failed));
            assert!(s.completion_time.is_some());
            let succeeded = s
                .conditions
                .iter()
                .find(|c| c.type_ == "Succeeded")
                .unwrap();
            assert_eq!(succeeded.reason, "StartTimeout");
            let message = s.message.as_deref().unwrap();
            assert!(
                message.starts_with("the run's pod did not start within 15m: FailedCreate: ")
                    && message.contains("exceeded quota")
                    && message.ends_with("Job train-run is suspended"),
                "{message}"
            );
        }),
        event_about("Warning", "StartTimeout", "exceeded quota"),
    ];
    assert_eq!(reconcile_once(&exp, script).await, Action::await_change());
}

/// The upload pod that cannot start (its zonal disk's zone has no node the pod tolerates, say)
/// fails the experiment after the start timeout with the outputs kept on their claim.
#[tokio::test]
async fn an_upload_that_does_not_start_in_time_keeps_the_outputs() {
    let exp = uploading(running_exp().await).await;
    let status = Arc::default();
    let mut pending = named_pod(
        "train-upload-fghij",
        vec![],
        vec![container(
            "upload-0",
            json!({"waiting": {"reason": "ContainerCreating"}}),
        )],
    );
    pending["metadata"]["creationTimestamp"] = json!("2026-11-24T11:40:00Z");
    pending["status"]["conditions"] = json!([{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/3 nodes are available: 3 node(s) had volume node affinity conflict."}]);
    let mut upload = job_created_minutes_ago("train-upload", 20);
    upload["metadata"]["name"] = json!("train-upload");
    let script = vec![
        run_completed(),
        run_pods(terminated(0, "")),
        expect(&format!("GET {UPLOAD}")).ok(upload),
        expect(&format!("GET {PODS}"))
            .query("labelSelector=batch.kubernetes.io%2Fjob-name%3Dtrain-upload")
            .ok(pods(vec![pending])),
        expect(&format!("PATCH {UPLOAD}")).body(|patch| {
            assert_eq!(patch, &json!({"spec": {"suspend": true}}));
        }),
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Failed));
            let message = s.message.as_deref().unwrap();
            assert!(
                message.contains("the upload pod did not start within 15m: the pod cannot be scheduled (Unschedulable): 0/3 nodes are available: 3 node(s) had volume node affinity conflict.")
                    && message.contains("kept on PersistentVolumeClaim train-outputs"),
                "{message}"
            );
        }),
        event_about("Warning", "UploadFailed", "volume node affinity conflict"),
    ];
    // No DELETE of the claim: the outputs are on it.
    assert_eq!(reconcile_once(&exp, script).await, Action::await_change());
}

/// The upload Job's pod, its container having reported `skipped` outputs kept as they were.
fn upload_pods(skipped: u64) -> Exchange {
    let report = format!(r#"{{"uploaded":2,"skipped":{skipped},"bytes":10}}"#);
    expect(&format!("GET {PODS}"))
        .query("labelSelector=batch.kubernetes.io%2Fjob-name%3Dtrain-upload")
        .ok(pods(vec![named_pod(
            "train-upload-fghij",
            vec![],
            vec![container("upload-0", terminated(0, &report))],
        )]))
}

#[tokio::test]
async fn outputs_kept_because_their_blobs_existed_keep_the_pvc() {
    let exp = uploading(running_exp().await).await;
    let status = Arc::default();
    let script = vec![
        run_completed(),
        run_pods(terminated(0, "")),
        expect(&format!("GET {UPLOAD}"))
            .ok(job("train-upload", condition("Complete", "Completed"))),
        upload_pods(2),
        // No DELETE of the PVC: this run's versions of two files live only there.
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Succeeded));
            let message = s.message.as_deref().unwrap();
            assert!(
                message.contains("2 output file(s) already existed"),
                "{message}"
            );
            assert!(
                message.contains("stay on PersistentVolumeClaim train-outputs"),
                "{message}"
            );
        }),
        event_about("Warning", "OutputsSkipped", "overwrite"),
    ];
    assert_eq!(reconcile_once(&exp, script).await, Action::await_change());
}

// -------------------------------------------------------------------------------------------
// Failures

fn failed_run_pods() -> Exchange {
    run_pods(terminated(
        2,
        "ValueError: no files in /mnt/datastore/training_data",
    ))
}

#[tokio::test]
async fn a_failed_run_fails_the_experiment_and_keeps_the_outputs() {
    let exp = running_exp().await;
    let status = Arc::default();
    let script = vec![
        expect(&format!("GET {RUN}")).ok(job(
            "train-run",
            condition("Failed", "BackoffLimitExceeded"),
        )),
        failed_run_pods(),
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Failed));
            assert!(s.completion_time.is_some());
            let message = s.message.as_deref().unwrap();
            assert!(
                message.contains("the script exited with code 2: ValueError"),
                "{message}"
            );
            assert!(
                message.contains("kept on PersistentVolumeClaim train-outputs"),
                "{message}"
            );
            let succeeded = s
                .conditions
                .iter()
                .find(|c| c.type_ == "Succeeded")
                .unwrap();
            assert_eq!(
                (succeeded.status.as_str(), succeeded.reason.as_str()),
                ("False", "RunFailed")
            );
        }),
        event_about("Warning", "RunFailed", "exited with code 2"),
    ];
    let action = reconcile_once(&exp, script).await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn a_failed_run_still_uploads_under_upload_policy_always() {
    let mut exp = running_exp().await;
    exp.spec.upload_policy = datastore_operator::api::UploadPolicy::Always;
    let status = Arc::default();
    let mut script = vec![
        expect(&format!("GET {RUN}")).ok(job(
            "train-run",
            condition("Failed", "BackoffLimitExceeded"),
        )),
        failed_run_pods(),
        expect(&format!("GET {UPLOAD}")).not_found(),
    ];
    script.extend(resolution());
    script.extend([
        apply(CREDENTIALS),
        apply(UPLOAD),
        status_patch(&status, |s| assert_eq!(s.phase, Some(Phase::Uploading))),
        event_about("Normal", "Uploading", "train-upload"),
    ]);
    reconcile_once(&exp, script).await;
    let exp = with_status(exp, written(&status));

    // The upload finishes: the PVC goes, and the experiment is Failed (the run failed), with
    // its outputs uploaded.
    let status = Arc::default();
    let mut script = vec![
        expect(&format!("GET {RUN}")).ok(job(
            "train-run",
            condition("Failed", "BackoffLimitExceeded"),
        )),
        failed_run_pods(),
        expect(&format!("GET {UPLOAD}"))
            .ok(job("train-upload", condition("Complete", "Completed"))),
        upload_pods(0),
    ];
    script.extend(cleanup("the run failed (the script exited with code 2"));
    script.extend([
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Failed));
            let message = s.message.as_deref().unwrap();
            assert!(
                message.contains("outputs were uploaded (uploadPolicy Always)"),
                "{message}"
            );
        }),
        event_about("Warning", "RunFailed", "outputs were uploaded"),
    ]);
    let action = reconcile_once(&exp, script).await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn a_failed_upload_fails_the_experiment_and_keeps_the_pvc() {
    let exp = uploading(running_exp().await).await;
    let status = Arc::default();
    let script = vec![
        run_completed(),
        run_pods(terminated(0, "")),
        expect(&format!("GET {UPLOAD}")).ok(job(
            "train-upload",
            condition("Failed", "BackoffLimitExceeded"),
        )),
        expect(&format!("GET {PODS}"))
            .query("labelSelector=batch.kubernetes.io%2Fjob-name%3Dtrain-upload")
            .ok(pods(vec![pod(
                vec![],
                vec![container(
                    "upload-0",
                    terminated(4, "the storage account refused the SAS token"),
                )],
            )])),
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Failed));
            let message = s.message.as_deref().unwrap();
            assert!(
                message
                    .contains("container upload-0 exited with code 4: the storage account refused"),
                "{message}"
            );
            assert!(
                message.contains("kept on PersistentVolumeClaim train-outputs"),
                "{message}"
            );
        }),
        event_about("Warning", "UploadFailed", "upload-0"),
    ];
    // No DELETE of the PVC: the script would refuse it.
    let action = reconcile_once(&exp, script).await;
    assert_eq!(action, Action::await_change());
}

// -------------------------------------------------------------------------------------------
// Refusals: nothing is created

#[tokio::test]
async fn an_invalid_spec_creates_nothing_and_says_why() {
    // Two references on the same path on compute: a rule the schema cannot check.
    let exp = experiment(
        r#"
image: python:3.12-slim
entryScript: train.py
scriptParams:
  - name: --a
    dataReference: {datastore: blob-ds, path: a, mode: download, pathOnCompute: data}
  - name: --b
    dataReference: {datastore: blob-ds, path: b, mode: download, pathOnCompute: data/b}
"#,
    );
    let status = Arc::default();
    let mut script = vec![expect(&format!("GET {RUN}")).not_found()];
    script.extend(resolution());
    script.extend([
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Failed));
            assert_eq!(s.start_time, None);
            let accepted = s.conditions.iter().find(|c| c.type_ == "Accepted").unwrap();
            assert_eq!(
                (accepted.status.as_str(), accepted.reason.as_str()),
                ("False", "PathOnComputeClash")
            );
            assert!(
                accepted.message.contains("--a and --b overlap"),
                "{}",
                accepted.message
            );
        }),
        event_about(
            "Warning",
            "PathOnComputeClash",
            "give each a pathOnCompute of its own",
        ),
    ]);
    let action = reconcile_once(&exp, script).await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn a_missing_datastore_waits_and_the_experiment_starts_when_it_appears() {
    let exp = experiment(EXAMPLE);
    let status = Arc::default();
    let script = vec![
        expect(&format!("GET {RUN}")).not_found(),
        expect(&format!("GET {GROUP}/namespaces/ml/datastores/blob-ds")).not_found(),
        expect(&format!("GET {GROUP}/clusterdatastores/blob-ds")).not_found(),
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Pending));
            let accepted = s.conditions.iter().find(|c| c.type_ == "Accepted").unwrap();
            assert_eq!(
                (accepted.status.as_str(), accepted.reason.as_str()),
                ("False", "DatastoreNotFound")
            );
            assert!(
                accepted.message.contains("create it"),
                "{}",
                accepted.message
            );
        }),
        event_about(
            "Warning",
            "DatastoreNotFound",
            "parameter --data_folder refers to datastore blob-ds",
        ),
    ];
    let action = reconcile_once(&exp, script).await;
    assert_eq!(
        action,
        Action::requeue(BLOCKED_RECHECK),
        "rechecked on a bounded period"
    );
    let waiting = with_status(exp, written(&status));

    // The datastore appears: the watch maps it to the waiting experiment...
    let (reader, mut writer) = reflector::store::<Experiment>();
    writer.apply_watcher_event(&watcher::Event::Apply(waiting.clone()));
    writer.apply_watcher_event(&watcher::Event::Apply({
        let mut other = experiment("image: x\nentryScript: y.py\n");
        other.metadata.name = Some("unrelated".into());
        other
    }));
    writer.apply_watcher_event(&watcher::Event::Apply({
        let mut code_only = experiment(
            "image: x\nentryScript: y.py\ncode: {datastore: code-ds, path: snapshots/a}\n",
        );
        code_only.metadata.name = Some("code-only".into());
        code_only
    }));
    assert_eq!(
        referencing(&reader, "blob-ds", Some(NS)),
        vec![ObjectRef::new("train").within(NS)]
    );
    // The datastore of the code counts as used too.
    assert_eq!(
        referencing(&reader, "code-ds", Some(NS)),
        vec![ObjectRef::new("code-only").within(NS)]
    );
    assert_eq!(referencing(&reader, "blob-ds", Some("elsewhere")), vec![]);
    assert_eq!(
        referencing(&reader, "blob-ds", None),
        vec![ObjectRef::new("train").within(NS)],
        "a ClusterDatastore of that name"
    );

    // ... and its reconcile creates the run.
    let status = Arc::default();
    let mut script = vec![expect(&format!("GET {RUN}")).not_found()];
    script.extend(resolution());
    script.extend([
        apply(CREDENTIALS),
        apply(PVC),
        apply(RUN),
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Pending));
            let accepted = s.conditions.iter().find(|c| c.type_ == "Accepted").unwrap();
            assert_eq!(accepted.status, "True");
        }),
        event_about("Normal", "Created", "created Job train-run"),
    ]);
    let action = reconcile_once(&waiting, script).await;
    assert_eq!(action, Action::requeue(ACTIVE_RECHECK));
}

fn cluster_datastore(allowed: Value) -> Value {
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

fn namespace(labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "labels": labels}})
}

#[tokio::test]
async fn a_cluster_datastore_refuses_namespaces_its_selector_does_not_allow() {
    let exp = experiment(EXAMPLE);
    let status = Arc::default();
    let script = vec![
        expect(&format!("GET {RUN}")).not_found(),
        expect(&format!("GET {GROUP}/namespaces/ml/datastores/blob-ds")).not_found(),
        expect(&format!("GET {GROUP}/clusterdatastores/blob-ds")).ok(cluster_datastore(
            json!({"matchLabels": {"team": "vision"}}),
        )),
        expect("GET /api/v1/namespaces/ml").ok(namespace(json!({"team": "nlp"}))),
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Pending));
            let accepted = s.conditions.iter().find(|c| c.type_ == "Accepted").unwrap();
            assert_eq!(
                (accepted.status.as_str(), accepted.reason.as_str()),
                ("False", "DatastoreNotAllowed")
            );
            assert!(
                accepted.message.contains("does not select namespace ml"),
                "{}",
                accepted.message
            );
        }),
        event_about("Warning", "DatastoreNotAllowed", "ClusterDatastore blob-ds"),
    ];
    // No Secret of the operator's namespace is read, nothing is created.
    let action = reconcile_once(&exp, script).await;
    assert_eq!(action, Action::requeue(BLOCKED_RECHECK));
}

#[tokio::test]
async fn a_cluster_datastore_serves_the_namespaces_it_allows_without_copying_its_key() {
    let exp = experiment(EXAMPLE);
    let status = Arc::default();
    let script =
        vec![
        expect(&format!("GET {RUN}")).not_found(),
        expect(&format!("GET {GROUP}/namespaces/ml/datastores/blob-ds")).not_found(),
        expect(&format!("GET {GROUP}/clusterdatastores/blob-ds")).ok(cluster_datastore(json!({
            "matchExpressions": [{"key": "team", "operator": "In", "values": ["vision", "nlp"]}]
        }))),
        expect("GET /api/v1/namespaces/ml").ok(namespace(json!({"team": "nlp"}))),
        expect(&format!("GET /api/v1/namespaces/{OPERATOR_NS}/secrets/shared-key"))
            .ok(secret(OPERATOR_NS, "shared-key", "accountKey", ACCOUNT_KEY)),
        apply(CREDENTIALS).body(|secret| {
            assert_eq!(secret["metadata"]["namespace"], NS);
            let file = &common::secret_values(secret)["datastores.yaml"];
            assert!(!file.contains(ACCOUNT_KEY), "{file}");
            assert!(file.contains("containerName: datasets"), "{file}");
        }),
        apply(PVC),
        apply(RUN),
        status_patch(&status, |s| assert_eq!(s.phase, Some(Phase::Pending))),
        event_about("Normal", "Created", "created Job train-run"),
    ];
    reconcile_once(&exp, script).await;
}

// -------------------------------------------------------------------------------------------
// Datastore readiness, checked against a real Azurite

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

// -------------------------------------------------------------------------------------------
// Objects that are not ours, deletion, and what the cluster refuses

#[tokio::test]
async fn a_leftover_job_of_a_deleted_namesake_is_neither_followed_nor_adopted() {
    // `kubectl delete exp train && kubectl apply -f train.yaml`: the old Job (another uid)
    // may still be there, Complete. It must not pass for this Experiment's run.
    let exp = experiment(EXAMPLE);
    let mut leftover = job("train-run", condition("Complete", "Completed"));
    leftover["metadata"]["ownerReferences"][0]["uid"] = json!("uid-of-the-deleted-one");
    let status = Arc::default();
    let script = vec![
        expect(&format!("GET {RUN}")).ok(leftover),
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Pending));
            let accepted = s.conditions.iter().find(|c| c.type_ == "Accepted").unwrap();
            assert_eq!(
                (accepted.status.as_str(), accepted.reason.as_str()),
                ("False", "NameConflict")
            );
        }),
        event_about(
            "Warning",
            "NameConflict",
            "does not belong to this Experiment",
        ),
    ];
    let action = reconcile_once(&exp, script).await;
    assert_eq!(
        action,
        Action::requeue(BLOCKED_RECHECK),
        "it goes away with the garbage collector"
    );
}

#[tokio::test]
async fn a_run_job_deleted_mid_run_fails_the_experiment_instead_of_rerunning_it() {
    let exp = running_exp().await;
    let status = Arc::default();
    let script = vec![
        expect(&format!("GET {RUN}")).not_found(),
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Failed));
            assert!(s.completion_time.is_some());
        }),
        event_about("Warning", "RunJobDeleted", "create a new Experiment"),
    ];
    let action = reconcile_once(&exp, script).await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn an_experiment_being_deleted_creates_nothing() {
    let mut exp = experiment(EXAMPLE);
    exp.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(1_790_000_000).unwrap(),
    ));
    assert_eq!(reconcile_once(&exp, vec![]).await, Action::await_change());
}

#[tokio::test]
async fn a_local_experiment_is_left_to_datastore_run() {
    let mut exp = experiment(EXAMPLE);
    exp.spec.compute_target = datastore_operator::api::ComputeTarget::Local;
    let status = Arc::default();
    let script = vec![
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Pending));
            assert!(s.message.as_deref().unwrap().contains("datastore run"));
        }),
        event_about("Normal", "LocalComputeTarget", "datastore run"),
    ];
    assert_eq!(reconcile_once(&exp, script).await, Action::await_change());
}

fn refused(code: u16, reason: &str, message: &str) -> (http::StatusCode, Value) {
    (
        http::StatusCode::from_u16(code).unwrap(),
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "code": code,
            "reason": reason, "message": message,
        }),
    )
}

fn deleted(path: &str) -> Exchange {
    expect(&format!("DELETE {path}"))
        .ok(json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}))
}

/// A quota (or the operator's RBAC) refusing an object is the cluster's to fix, not the spec's:
/// what the start applied is deleted again, and the experiment waits, tried again with
/// backoff, the reason in its status.
#[tokio::test]
async fn a_quota_refusing_the_run_waits_and_retries_from_nothing() {
    let exp = experiment(EXAMPLE);
    let status = Arc::default();
    let mut script = vec![expect(&format!("GET {RUN}")).not_found()];
    script.extend(resolution());
    let (code, body) = refused(
        403,
        "Forbidden",
        "persistentvolumeclaims \"train-outputs\" is forbidden: exceeded quota: storage, requested: requests.storage=10Gi",
    );
    script.extend([
        apply(CREDENTIALS),
        apply(PVC).reply(code, body),
        // The Secret this start applied goes again; no Job is applied.
        deleted(CREDENTIALS),
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Pending));
            assert!(s.completion_time.is_none());
            let accepted = s.conditions.iter().find(|c| c.type_ == "Accepted").unwrap();
            assert_eq!(
                (accepted.status.as_str(), accepted.reason.as_str()),
                ("False", "QuotaExceeded")
            );
            assert!(
                accepted.message.contains("exceeded quota"),
                "{}",
                accepted.message
            );
            assert!(
                accepted.message.contains("tried again"),
                "{}",
                accepted.message
            );
        }),
        event_about("Warning", "QuotaExceeded", "exceeded quota"),
    ]);
    assert_eq!(
        reconcile_once(&exp, script).await,
        Action::requeue(datastore_operator::controller::experiment::REFUSED_RETRY_MIN)
    );
}

/// An object the apiserver finds invalid is the spec's to fix: Failed (InvalidJob) until the
/// spec changes, and what the start applied is deleted so that the next start can apply a
/// claim of another size or class (an unbound claim is immutable).
#[tokio::test]
async fn an_invalid_run_job_is_reported_and_what_was_applied_goes() {
    let exp = experiment(EXAMPLE);
    let status = Arc::default();
    let mut script = vec![expect(&format!("GET {RUN}")).not_found()];
    script.extend(resolution());
    let (code, body) = refused(
        422,
        "Invalid",
        "Job.batch \"train-run\" is invalid: spec.template.spec.tolerations[0].operator: Invalid value",
    );
    script.extend([
        apply(CREDENTIALS),
        apply(PVC),
        apply(RUN).reply(code, body),
        deleted(CREDENTIALS),
        deleted(PVC),
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Failed));
            let accepted = s.conditions.iter().find(|c| c.type_ == "Accepted").unwrap();
            assert_eq!(
                (accepted.status.as_str(), accepted.reason.as_str()),
                ("False", "InvalidJob")
            );
            assert!(
                accepted.message.contains("tolerations"),
                "{}",
                accepted.message
            );
        }),
        event_about("Warning", "InvalidJob", "is invalid"),
    ]);
    assert_eq!(reconcile_once(&exp, script).await, Action::await_change());
}

/// The upload Job refused by a quota: the outputs wait on their claim, tried again.
#[tokio::test]
async fn a_quota_refusing_the_upload_job_keeps_the_outputs_waiting() {
    let exp = running_exp().await;
    let status = Arc::default();
    let mut script = vec![
        run_completed(),
        run_pods(terminated(0, "")),
        expect(&format!("GET {UPLOAD}")).not_found(),
    ];
    script.extend(resolution());
    let (code, body) = refused(
        403,
        "Forbidden",
        "pods \"train-upload\" is forbidden: exceeded quota: compute, requested: count/jobs.batch=1",
    );
    script.extend([
        apply(CREDENTIALS).exists(),
        apply(UPLOAD).reply(code, body),
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Uploading));
            assert!(s.completion_time.is_none());
            let message = s.message.as_deref().unwrap();
            assert!(message.contains("exceeded quota"), "{message}");
            assert!(
                message.contains("the outputs wait on PersistentVolumeClaim train-outputs"),
                "{message}"
            );
        }),
        event_about("Warning", "QuotaExceeded", "exceeded quota"),
    ]);
    assert_eq!(
        reconcile_once(&exp, script).await,
        Action::requeue(datastore_operator::controller::experiment::REFUSED_RETRY_MIN)
    );
}

// -------------------------------------------------------------------------------------------
// Mounts: the driver is chosen from what the cluster has, recorded in the status, or refused

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
