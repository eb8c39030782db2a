//! The upload Job after the run, the cleanup after a complete upload, and the outputs kept on
//! their claim when an upload fails, skips files, cannot start or is refused by a quota.

use std::sync::Arc;

use datastore_operator::api::{Experiment, Phase};
use datastore_operator::controller::experiment::{ACTIVE_RECHECK, reconcile};
use datastore_operator::render::BuildContext;
use kube::runtime::controller::Action;
use serde_json::json;

use crate::common;
use crate::common::apiserver::{Exchange, apply, expect};
use crate::fixtures::*;

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
