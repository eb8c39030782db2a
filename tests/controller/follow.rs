//! Following a run against the scripted apiserver: the reads a pass makes, the pods the cluster
//! refuses (events) and the bounded wait for them to start (suspend, claim deleted). Which step
//! each observation leads to is `decide`'s table (src/controller/experiment/decide.rs).

use std::sync::Arc;

use datastore_operator::api::Phase;
use datastore_operator::controller::experiment::ACTIVE_RECHECK;
use kube::runtime::controller::Action;
use serde_json::json;

use crate::common::apiserver::{Exchange, expect};
use crate::fixtures::*;

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

/// While `download-0` runs, a pass reads the newest lines of its log (bounded: a few lines, a
/// few KiB, with timestamps) and the status carries how far it is; the next look comes within
/// the progress period.
#[tokio::test]
async fn a_download_in_progress_reads_its_agents_log_into_the_status() {
    let exp = created().await;
    let status = Arc::default();
    let line = |bytes: u64| {
        format!(
            r#"{{"progress":{{"files":1,"filesTotal":4,"bytes":{bytes},"bytesTotal":10737418240,"bytesPerSecond":104857600,"elapsedSeconds":30}}}}"#
        )
    };
    let log = format!(
        "2026-11-24T11:59:57.5Z {}\n2026-11-24T11:59:59.5Z {}\n",
        line(1 << 30),
        line(3_435_973_837)
    );
    let script = vec![
        expect(&format!("GET {RUN}")).ok(active_job("train-run")),
        expect(&format!("GET {PODS}"))
            .query("labelSelector=batch.kubernetes.io%2Fjob-name%3Dtrain-run")
            .ok(pods(vec![pod(
                vec![container("download-0", running())],
                vec![container(
                    "main",
                    json!({"waiting": {"reason": "PodInitializing"}}),
                )],
            )])),
        expect(&format!("GET {PODS}/train-run-abcde/log"))
            .query("container=download-0")
            .query("tailLines=5")
            .query("limitBytes=8192")
            .query("timestamps=true")
            .text(&log),
        status_patch(&status, |s| {
            assert_eq!(s.phase, Some(Phase::Downloading));
            let p = s.progress.as_ref().expect("progress while downloading");
            assert_eq!(
                (
                    p.name.as_str(),
                    p.container.as_str(),
                    p.transferred.as_str(),
                    p.percent.as_str(),
                    p.eta.as_deref(),
                    p.rate.as_str()
                ),
                (
                    "--data_folder",
                    "download-0",
                    "3.2Gi/10Gi",
                    "32%",
                    Some("2m"),
                    "100Mi/s"
                )
            );
        }),
        event_about("Normal", "Downloading", "downloading inputs: 0 of 1 done"),
    ];
    // Action has no getter: its Debug form says when (`Some(9.99s)`).
    let action = format!("{:?}", reconcile_once(&exp, script).await);
    let seconds: f64 = action
        .split_once("Some(")
        .and_then(|(_, rest)| rest.split_once("s)"))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("a requeue: {action}"));
    assert!(
        seconds > 9.0 && seconds <= 10.0,
        "looked at again within the 10 s progress period: {action}"
    );
}
