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
