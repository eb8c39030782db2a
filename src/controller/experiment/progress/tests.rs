use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStatus, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;

use super::*;

fn job(conditions: &[(&str, &str, &str)]) -> Job {
    Job {
        status: Some(JobStatus {
            conditions: Some(
                conditions
                    .iter()
                    .map(|(type_, status, reason)| JobCondition {
                        type_: type_.to_string(),
                        status: status.to_string(),
                        reason: Some(reason.to_string()),
                        message: Some(format!("{reason} happened")),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn only_terminal_job_conditions_end_a_job() {
    assert_eq!(outcome(&Job::default()), Outcome::Active);
    // SuccessCriteriaMet / FailureTarget come while pods may still be terminating.
    assert_eq!(
        outcome(&job(&[("SuccessCriteriaMet", "True", "x")])),
        Outcome::Active
    );
    assert_eq!(
        outcome(&job(&[("FailureTarget", "True", "x")])),
        Outcome::Active
    );
    assert_eq!(
        outcome(&job(&[("Complete", "False", "x")])),
        Outcome::Active
    );
    assert_eq!(
        outcome(&job(&[
            ("SuccessCriteriaMet", "True", "x"),
            ("Complete", "True", "x")
        ])),
        Outcome::Succeeded
    );
    assert_eq!(
        outcome(&job(&[("Failed", "True", "BackoffLimitExceeded")])),
        Outcome::Failed("BackoffLimitExceeded: BackoffLimitExceeded happened".into())
    );
}

fn running(name: &str) -> ContainerStatus {
    ContainerStatus {
        name: name.into(),
        state: Some(ContainerState {
            running: Some(ContainerStateRunning::default()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn terminated(name: &str, exit_code: i32, message: Option<&str>) -> ContainerStatus {
    ContainerStatus {
        name: name.into(),
        state: Some(ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code,
                message: message.map(str::to_string),
                reason: Some(if exit_code == 0 { "Completed" } else { "Error" }.into()),
                started_at: Some(Time(Timestamp::from_second(1_000).unwrap())),
                finished_at: Some(Time(Timestamp::from_second(1_007).unwrap())),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn waiting(name: &str) -> ContainerStatus {
    ContainerStatus {
        name: name.into(),
        ..Default::default()
    }
}

fn pod(name: &str, created: i64, init: Vec<ContainerStatus>, main: Vec<ContainerStatus>) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            creation_timestamp: Some(Time(Timestamp::from_second(created).unwrap())),
            ..Default::default()
        },
        status: Some(PodStatus {
            init_container_statuses: Some(init),
            container_statuses: Some(main),
            ..Default::default()
        }),
        ..Default::default()
    }
}

const REPORT_A: &str = r#"{"files":2,"bytes":10,"digest":"sha256:aa"}"#;
const REPORT_B: &str = r#"{"files":1,"bytes":3,"digest":"sha256:bb"}"#;

#[test]
fn the_newest_pod_says_where_the_run_is() {
    assert_eq!(run_step(&[], 2), RunStep::Pending);
    let scheduled = pod(
        "p",
        1,
        vec![waiting("download-0"), waiting("download-1")],
        vec![waiting("main")],
    );
    assert_eq!(
        run_step(std::slice::from_ref(&scheduled), 2),
        RunStep::Pending
    );

    let first = pod(
        "p",
        1,
        vec![running("download-0"), waiting("download-1")],
        vec![waiting("main")],
    );
    assert_eq!(
        run_step(&[first], 2),
        RunStep::Downloading { done: 0, total: 2 }
    );

    let second = pod(
        "p",
        1,
        vec![
            terminated("download-0", 0, Some(REPORT_A)),
            running("download-1"),
        ],
        vec![waiting("main")],
    );
    assert_eq!(
        run_step(&[second], 2),
        RunStep::Downloading { done: 1, total: 2 }
    );

    let script = pod(
        "q",
        5,
        vec![
            terminated("download-0", 0, None),
            terminated("download-1", 0, None),
        ],
        vec![running("main")],
    );
    // An older failed attempt does not hide the retry that is running.
    let failed_attempt = pod(
        "p",
        1,
        vec![terminated("download-0", 4, Some("denied"))],
        vec![waiting("main")],
    );
    assert_eq!(
        run_step(&[script.clone(), failed_attempt.clone()], 2),
        RunStep::Running
    );
    assert_eq!(run_step(&[failed_attempt, script], 2), RunStep::Running);

    // Without downloads there is nothing to download.
    let plain = pod("p", 1, vec![], vec![waiting("main")]);
    assert_eq!(run_step(&[plain], 0), RunStep::Pending);
}

#[test]
fn the_code_download_counts_as_a_download_step_but_records_no_input() {
    let fetched = pod(
        "p",
        1,
        vec![terminated("code", 0, Some(REPORT_B)), running("download-0")],
        vec![waiting("main")],
    );
    assert_eq!(
        run_step(std::slice::from_ref(&fetched), 2),
        RunStep::Downloading { done: 1, total: 2 }
    );
    // Inputs are the data references' only: `code` is not `download-0`.
    assert_eq!(inputs(&[fetched], &[transfer("--data", "data")]), []);
}

fn transfer(param: &str, path: &str) -> Transfer {
    Transfer {
        param: param.into(),
        datastore: "blob-ds".into(),
        remote_path: path.into(),
        local_path: format!("/mnt/datastore/{path}"),
        overwrite: false,
        cache: None,
    }
}

#[test]
fn inputs_come_from_the_download_reports_of_successful_init_containers() {
    let downloads = [transfer("--data", "data"), transfer("--labels", "labels")];
    let p = pod(
        "p",
        1,
        vec![
            terminated("download-0", 0, Some(REPORT_A)),
            terminated("download-1", 0, Some(REPORT_B)),
        ],
        vec![running("main")],
    );
    let inputs = inputs(&[p], &downloads);
    assert_eq!(
        inputs,
        vec![
            InputRecord {
                name: "--data".into(),
                datastore: "blob-ds".into(),
                path: "data".into(),
                files: 2,
                bytes: 10,
                digest: "sha256:aa".into(),
                seconds: Some(7),
                cache: None,
                cache_reason: None,
            },
            InputRecord {
                name: "--labels".into(),
                datastore: "blob-ds".into(),
                path: "labels".into(),
                files: 1,
                bytes: 3,
                digest: "sha256:bb".into(),
                seconds: Some(7),
                cache: None,
                cache_reason: None,
            },
        ]
    );
}

#[test]
fn a_failed_download_or_an_unparsable_message_records_nothing() {
    let downloads = [transfer("--data", "data"), transfer("--labels", "labels")];
    let p = pod(
        "p",
        1,
        vec![
            terminated("download-0", 0, Some("not json")),
            terminated("download-1", 4, Some(REPORT_B)),
        ],
        vec![waiting("main")],
    );
    assert_eq!(super::inputs(&[p], &downloads), vec![]);
}

#[test]
fn the_newest_report_wins() {
    let downloads = [transfer("--data", "data")];
    let old = pod(
        "a",
        1,
        vec![terminated("download-0", 0, Some(REPORT_A))],
        vec![],
    );
    let new = pod(
        "b",
        9,
        vec![terminated("download-0", 0, Some(REPORT_B))],
        vec![],
    );
    let got = inputs(&[old, new], &downloads);
    assert_eq!(got[0].digest, "sha256:bb");
}

#[test]
fn failures_name_each_container_that_failed_and_its_message() {
    let p = pod(
        "p",
        1,
        vec![terminated(
            "download-0",
            4,
            Some("the storage account refused the SAS token"),
        )],
        vec![terminated("main", 0, None)],
    );
    assert_eq!(
        failures(&[p]),
        vec!["container download-0 exited with code 4: the storage account refused the SAS token"]
    );
    let mut oom = terminated("main", 137, None);
    oom.state
        .as_mut()
        .unwrap()
        .terminated
        .as_mut()
        .unwrap()
        .reason = Some("OOMKilled".into());
    let p = pod("p", 1, vec![], vec![oom]);
    assert_eq!(
        failures(&[p]),
        vec!["the script exited with code 137 (OOMKilled)"]
    );
    assert_eq!(failures(&[]), Vec::<String>::new());
}

/// A pod the kubelet failed as a whole, as it writes an eviction: the pod's reason and
/// message come first, then what its containers say.
#[test]
fn a_pod_the_kubelet_failed_says_its_own_reason() {
    let evicted: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "train-run-x7k2p", "creationTimestamp": "2027-01-15T08:00:00Z"},
        "status": {
            "phase": "Failed",
            "reason": "Evicted",
            "message": "The node was low on resource: ephemeral-storage. Threshold quantity: 1Gi, available: 524288Ki. Container main was using 9Gi, request is 0, has larger consumption of ephemeral-storage. ",
            "containerStatuses": [{
                "name": "main", "ready": false, "restartCount": 0, "image": "python:3.12-slim", "imageID": "",
                "state": {"terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown",
                    "message": "The container could not be located when the pod was terminated"}},
            }],
        },
    }))
    .unwrap();
    assert_eq!(
        failures(&[evicted]),
        vec![
            "the pod failed (Evicted): The node was low on resource: ephemeral-storage. Threshold quantity: 1Gi, available: 524288Ki. Container main was using 9Gi, request is 0, has larger consumption of ephemeral-storage.",
            "the script exited with code 137: The container could not be located when the pod was terminated",
        ]
    );
    // Failed before any container ran (a kubelet refusing the pod at admission): the pod alone.
    let refused: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "train-run-x7k2p"},
        "status": {"phase": "Failed", "reason": "OutOfcpu",
                   "message": "Pod was rejected: Node didn't have enough resource: cpu, requested: 4000, used: 0, capacity: 2000"},
    }))
    .unwrap();
    assert_eq!(
        failures(&[refused]),
        vec![
            "the pod failed (OutOfcpu): Pod was rejected: Node didn't have enough resource: cpu, requested: 4000, used: 0, capacity: 2000"
        ]
    );
}

#[test]
fn a_stuck_pod_says_why() {
    use k8s_openapi::api::core::v1::{ContainerStateWaiting, PodCondition};
    let waiting = |name: &str, reason: &str| ContainerStatus {
        name: name.into(),
        state: Some(ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.into()),
                message: Some("Back-off pulling image \"pyton:3.12\"".into()),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let starting = pod(
        "p",
        1,
        vec![waiting("download-0", "PodInitializing")],
        vec![waiting("main", "ContainerCreating")],
    );
    assert_eq!(stuck(&[starting]), None);
    let bad_image = pod("p", 1, vec![], vec![waiting("main", "ImagePullBackOff")]);
    assert_eq!(
        stuck(&[bad_image]).as_deref(),
        Some("container main is ImagePullBackOff: Back-off pulling image \"pyton:3.12\"")
    );
    let mut unschedulable = pod("p", 1, vec![], vec![]);
    unschedulable.status.as_mut().unwrap().conditions = Some(vec![PodCondition {
        type_: "PodScheduled".into(),
        status: "False".into(),
        reason: Some("Unschedulable".into()),
        message: Some("0/3 nodes are available: 3 Insufficient nvidia.com/gpu.".into()),
        ..Default::default()
    }]);
    assert_eq!(
        stuck(&[unschedulable]).as_deref(),
        Some(
            "the pod cannot be scheduled (Unschedulable): 0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
        )
    );
}

#[test]
fn a_pod_waits_to_start_until_an_agent_or_the_script_runs() {
    use k8s_openapi::api::core::v1::{Container, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    let at = |s: i64| Timestamp::from_second(1_800_000_000 + s).unwrap();
    let mut job = Job::default();
    job.metadata.creation_timestamp = Some(Time(at(0)));
    // No pod yet (or none allowed): since the Job was created.
    assert_eq!(waiting_since(&job, &[]), Some(at(0)));

    let pod = |init: Vec<ContainerStatus>, main: Vec<ContainerStatus>| Pod {
        metadata: ObjectMeta {
            name: Some("p".into()),
            creation_timestamp: Some(Time(at(5))),
            ..Default::default()
        },
        spec: Some(PodSpec {
            init_containers: Some(vec![
                Container {
                    name: "download-0".into(),
                    ..Default::default()
                },
                Container {
                    name: "mount-0".into(),
                    restart_policy: Some("Always".into()),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        status: Some(PodStatus {
            init_container_statuses: Some(init),
            container_statuses: Some(main),
            ..Default::default()
        }),
    };
    let finished_at = |mut c: ContainerStatus, s: i64| {
        let t = c.state.as_mut().unwrap().terminated.as_mut().unwrap();
        t.finished_at = Some(Time(at(s)));
        c
    };
    // Scheduled, nothing started: since the pod was created.
    assert_eq!(waiting_since(&job, &[pod(vec![], vec![])]), Some(at(5)));
    // A download runs: progress.
    assert_eq!(
        waiting_since(&job, &[pod(vec![running("download-0")], vec![])]),
        None
    );
    // The download ended an hour in and the sidecar runs without its mount coming up: since
    // the download ended.
    let downloaded = finished_at(terminated("download-0", 0, None), 3600);
    assert_eq!(
        waiting_since(
            &job,
            &[pod(vec![downloaded.clone(), running("mount-0")], vec![])]
        ),
        Some(at(3600))
    );
    // The script started (or ended): no longer waiting.
    assert_eq!(
        waiting_since(
            &job,
            &[pod(
                vec![downloaded, running("mount-0")],
                vec![running("main")]
            )]
        ),
        None
    );
    assert_eq!(
        waiting_since(&job, &[pod(vec![], vec![terminated("main", 1, None)])]),
        None
    );
}

#[test]
fn a_cached_input_is_a_hit_when_the_node_cached_it_before_the_pod_was_created() {
    let downloads = [transfer("--data", "data"), transfer("--labels", "labels")];
    // The pod was created at second 1000 (1970-01-01T00:16:40Z).
    let report = |cached_at: &str| {
        format!(r#"{{"files":2,"bytes":10,"digest":"sha256:aa","cachedAt":"{cached_at}"}}"#)
    };
    let (before, after) = (
        report("1970-01-01T00:16:39Z"),
        report("1970-01-01T00:16:41Z"),
    );
    let mut p = pod(
        "p",
        1_000,
        vec![
            terminated("download-0", 0, Some(&before)),
            terminated("download-1", 0, Some(&after)),
        ],
        vec![running("main")],
    );
    let why = "served from the node cache: cache: true on the reference";
    p.metadata.annotations = Some(
        [
            (contract::cache_annotation("download-0"), why.to_string()),
            (contract::cache_annotation("download-1"), why.to_string()),
        ]
        .into(),
    );
    let inputs = inputs(std::slice::from_ref(&p), &downloads);
    let seen: Vec<_> = inputs
        .iter()
        .map(|i| (i.cache, i.cache_reason.as_deref()))
        .collect();
    assert_eq!(
        seen,
        [
            (Some(CacheResult::Hit), Some(why)),
            (Some(CacheResult::Miss), Some(why))
        ]
    );
    // A download into the pod says nothing of the cache.
    let plain = pod(
        "p",
        1_000,
        vec![terminated("download-0", 0, Some(REPORT_A))],
        vec![],
    );
    assert_eq!(inputs_of(&plain, &downloads[..1]), (None, None));
}

fn inputs_of(p: &Pod, downloads: &[Transfer]) -> (Option<CacheResult>, Option<String>) {
    let record = inputs(std::slice::from_ref(p), downloads).remove(0);
    (record.cache, record.cache_reason)
}
