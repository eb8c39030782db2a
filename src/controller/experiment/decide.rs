//! Deciding, pure: from what was observed to the one thing this pass does ([`Decision`]) and
//! the step its status reports. No IO: the table of cases in the tests is the state machine.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::controller::Action;

use super::admit::{LiftedBy, Refusal};
use super::observe::{JobSeen, Observed, Waiting};
use super::progress::{self, Outcome, RunStep};
use super::status::{self, Step};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{
    ComputeTarget, Experiment, Mode, Phase, StorageUnreachable, TransferProgress, UploadPolicy,
};
use crate::duration::format as format_duration;
use crate::plan::ExecutionPlan;
use crate::plan::contract::{self, Agent};
use crate::reason::Reason;
use crate::render;

/// How often a running experiment is looked at even when nothing it watches changed.
pub const ACTIVE_RECHECK: Duration = Duration::from_secs(300);
/// How often an experiment waiting for a datastore (or its Secret) looks again.
pub const BLOCKED_RECHECK: Duration = Duration::from_secs(60);
/// The bounds of [`retry_after`].
pub const REFUSED_RETRY_MIN: Duration = Duration::from_secs(10);
pub const REFUSED_RETRY_MAX: Duration = Duration::from_secs(300);

/// What a pass does before it looks at the run's pods.
#[derive(Clone, Debug, PartialEq)]
pub enum Entry {
    /// Nothing: a finished run is history, a local one is `datastore run`'s, and nothing is
    /// (re)created while the Experiment is being deleted.
    Nothing,
    /// No run Job yet: admit and create it.
    Start,
    /// The run Job exists and is this Experiment's: follow it.
    Follow(Box<Job>),
    /// Only say `step` (a run Job that is not ours, or one deleted mid-run).
    Report {
        step: Step,
        started: bool,
        then: Action,
    },
}

/// Whether the pass needs the run Job at all (see [`Entry::Nothing`]); a local run gets its
/// status once.
pub fn settled(exp: &Experiment) -> Option<Entry> {
    let status = exp.status.clone().unwrap_or_default();
    // Finished runs are history: Jobs are immutable and a re-run would change what the status
    // says the run saw. A new run is a new Experiment.
    if status.completion_time.is_some() || exp.metadata.deletion_timestamp.is_some() {
        return Some(Entry::Nothing);
    }
    if exp.spec.compute_target == ComputeTarget::Local {
        return Some(Entry::Report {
            step: Step::new(
                Phase::Pending,
                Reason::LocalComputeTarget,
                "computeTarget is local: run it with `datastore run`; the cluster creates nothing for it",
            ),
            started: false,
            then: Action::await_change(),
        });
    }
    None
}

/// What to do given the Job of the run's name, if any.
pub fn entry(exp: &Experiment, run: Option<Job>) -> Entry {
    let started = exp.status.as_ref().is_some_and(|s| s.start_time.is_some());
    match run {
        // Not ours: a leftover of a deleted Experiment of the same name that the garbage
        // collector has not removed yet, or someone else's Job. Never follow or adopt it.
        Some(run) if !owned_by(&run, exp) => Entry::Report {
            step: Step::refused(
                Phase::Pending,
                Reason::NameConflict,
                format!(
                    "Job {} exists and does not belong to this Experiment; it is waited for to go away (delete it if it is not a leftover)",
                    run.name_any()
                ),
            ),
            started: false,
            then: Action::requeue(BLOCKED_RECHECK),
        },
        Some(run) => Entry::Follow(Box::new(run)),
        // Started once: running it again would download again into an outputs volume that
        // may hold the first run's outputs.
        None if started => Entry::Report {
            step: Step::new(
                Phase::Failed,
                Reason::RunJobDeleted,
                format!(
                    "Job {} was deleted before the experiment finished; create a new Experiment to run again",
                    render::run_job_name(exp)
                ),
            ),
            started: true,
            then: Action::await_change(),
        },
        None => Entry::Start,
    }
}

/// Whether `object`'s controller owner is this Experiment (same uid, not just same name).
fn owned_by(object: &impl kube::Resource, exp: &Experiment) -> bool {
    object
        .meta()
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && Some(&o.uid) == exp.metadata.uid.as_ref())
}

/// The step of a refused start, and when to look again.
pub fn refused(exp: &Experiment, refusal: &Refusal, now: Timestamp) -> (Step, Action) {
    let (phase, then) = match refusal.lifted_by {
        LiftedBy::Spec => (Phase::Failed, Action::await_change()),
        LiftedBy::Cluster => (Phase::Pending, Action::requeue(BLOCKED_RECHECK)),
        LiftedBy::Apiserver => (Phase::Pending, Action::requeue(retry_after(exp, now))),
    };
    (
        Step::refused(phase, refusal.reason, refusal.message.clone()),
        then,
    )
}

/// The step of a run whose objects were applied.
pub fn created(exp: &Experiment, plan: &ExecutionPlan) -> (Step, Action) {
    let step = Step::new(
        Phase::Pending,
        Reason::Created,
        format!(
            "created Job {} ({} download(s), {} mount(s), {} upload(s)); waiting for its pod to start",
            render::run_job_name(exp),
            plan.downloads.len(),
            plan.mounts.len(),
            plan.uploads.len()
        ),
    );
    (step, Action::requeue(ACTIVE_RECHECK))
}

/// The step of an upload that cannot be admitted (its datastore is gone or unusable): the
/// outputs wait on their volume until the datastore is usable again.
pub fn upload_waits(exp: &Experiment, refusal: &Refusal) -> (Step, Action) {
    let step = Step::refused(
        Phase::Uploading,
        refusal.reason,
        format!(
            "the outputs cannot be uploaded yet: {}; they wait on PersistentVolumeClaim {}",
            refusal.message,
            render::outputs_name(exp)
        ),
    );
    (step, Action::requeue(BLOCKED_RECHECK))
}

/// The step of an upload Job the cluster refused: the spec was accepted when the run started,
/// so whatever the cluster refuses now, the outputs wait and the upload is tried again.
pub fn upload_refused(exp: &Experiment, refusal: &Refusal, now: Timestamp) -> (Step, Action) {
    let step = Step::refused(
        Phase::Uploading,
        refusal.reason,
        format!(
            "{}; the outputs wait on PersistentVolumeClaim {}",
            refusal.message,
            render::outputs_name(exp)
        ),
    );
    (step, Action::requeue(retry_after(exp, now)))
}

/// The step of an upload Job that was applied.
pub fn upload_created(exp: &Experiment) -> (Step, Action) {
    let step = Step::new(
        Phase::Uploading,
        Reason::Uploading,
        format!(
            "created Job {}: uploading the outputs",
            render::upload_job_name(exp)
        ),
    );
    (step, Action::requeue(ACTIVE_RECHECK))
}

/// How long an experiment the cluster refuses waits before it is tried again: as long as it has
/// been refused already (backoff without a counter), at least 10 s and at most 5 minutes.
pub fn retry_after(exp: &Experiment, now: Timestamp) -> Duration {
    let since = exp
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == status::ACCEPTED))
        .filter(|c| c.status == "False")
        .map(|c| now.as_second() - c.last_transition_time.0.as_second())
        .map(|seconds| Duration::from_secs(seconds.max(0) as u64))
        .unwrap_or_default();
    since.clamp(REFUSED_RETRY_MIN, REFUSED_RETRY_MAX)
}

/// What a pass of a started run does.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Say `step`, then look again as `then` says; while an agent transfers (`transfer`), within
    /// the progress period.
    Report {
        step: Step,
        then: Action,
        transfer: bool,
    },
    /// The run's pod did not start within the start timeout: suspend the run Job (its pods go,
    /// it stays as the record), delete the outputs claim when no script ever ran on it, say `step`.
    GiveUpRun { step: Step, delete_outputs: bool },
    /// The upload pod did not start within the start timeout: suspend the upload Job (the
    /// outputs stay on their claim), say `step`.
    GiveUpUpload { step: Step },
    /// Create the upload Job.
    StartUpload,
    /// The upload succeeded and nothing was skipped: record that first (unless a pass before a
    /// restart did), then remove the finished pods (a claim stays while any pod names it) and
    /// the outputs claim, then say `step`; `uploaded` bytes are counted after that write.
    CleanUp {
        record: Option<Step>,
        pods: Vec<String>,
        step: Step,
        uploaded: u64,
    },
    /// Say `step` (the end) and count the `uploaded` bytes after that write.
    Finish { step: Step, uploaded: u64 },
}

/// How many data references of `mode` the spec has.
pub fn count(exp: &Experiment, mode: Mode) -> usize {
    exp.spec
        .script_params
        .iter()
        .filter(|p| p.data_reference.as_ref().is_some_and(|r| r.mode == mode))
        .count()
}

/// Whether the run's outputs are to be uploaded, once it ended so: after a success, or after a
/// failure with `uploadPolicy: Always`.
pub fn upload_due(exp: &Experiment, run: &Outcome) -> bool {
    count(exp, Mode::Upload) > 0
        && (matches!(run, Outcome::Succeeded) || exp.spec.upload_policy == UploadPolicy::Always)
}

/// How long a Job's pod has waited to start, against the operator's start timeout.
struct Patience {
    timed_out: bool,
    /// When to look again: at the end of the start timeout at the latest.
    recheck: Duration,
}

fn patience(waiting: Option<&Waiting>, now: Timestamp, start_timeout: Duration) -> Patience {
    let Some(waiting) = waiting else {
        return Patience {
            timed_out: false,
            recheck: ACTIVE_RECHECK,
        };
    };
    let waited = Duration::from_secs((now.as_second() - waiting.since.as_second()).max(0) as u64);
    let left = start_timeout.saturating_sub(waited);
    Patience {
        timed_out: waited >= start_timeout,
        recheck: ACTIVE_RECHECK.min(left + Duration::from_secs(1)),
    }
}

/// The one decision of a pass over a started run.
pub fn decide(
    exp: &Experiment,
    seen: &Observed,
    now: Timestamp,
    start_timeout: Duration,
) -> Decision {
    let run = &seen.run;
    // The code download is a download step too.
    let downloads = count(exp, Mode::Download) + usize::from(exp.spec.code.is_some());
    let uploads = count(exp, Mode::Upload);
    let why = |w: Option<&Waiting>| w.and_then(|w| w.why.clone());
    let no_reason =
        |w: Option<&Waiting>| why(w).unwrap_or_else(|| "Kubernetes gave no reason".into());

    let run_ok = match progress::outcome(&run.job) {
        Outcome::Active => {
            let waiting = run.waiting.as_ref();
            let patience = patience(waiting, now, start_timeout);
            if patience.timed_out {
                let step = Step::new(
                    Phase::Failed,
                    Reason::StartTimeout,
                    format!(
                        "the run's pod did not start within {}: {}; Job {} is suspended",
                        format_duration(start_timeout),
                        no_reason(waiting),
                        run.job.name_any()
                    ),
                );
                return Decision::GiveUpRun {
                    step,
                    delete_outputs: uploads > 0 && !script_ran(run),
                };
            }
            let why = why(waiting);
            let step = match progress::run_step(&run.pods, downloads) {
                RunStep::Pending => Step::new(
                    Phase::Pending,
                    Reason::Created,
                    match &why {
                        Some(why) => format!("waiting for the run's pod to start: {why}"),
                        None => "waiting for the run's pod to start".to_string(),
                    },
                ),
                RunStep::Downloading { done, total } => {
                    let progress = transfer_progress(exp, run);
                    Step::new(
                        Phase::Downloading,
                        Reason::Downloading,
                        match &why {
                            Some(why) => format!(
                                "downloading inputs: {done} of {total} done; waiting: {why}"
                            ),
                            None => format!(
                                "downloading inputs: {done} of {total} done{}",
                                stalled(progress.as_ref(), now)
                            ),
                        },
                    )
                    .with_progress(progress)
                }
                RunStep::Running => {
                    Step::new(Phase::Running, Reason::Running, "the script is running")
                }
            };
            return Decision::Report {
                step,
                then: Action::requeue(patience.recheck),
                transfer: progress::transferring(&run.pods).is_some(),
            };
        }
        Outcome::Succeeded => Ok(()),
        Outcome::Failed(why) => Err(failed_because(&run.pods, why)),
    };

    let Some(upload) = &seen.upload else {
        let step = match run_ok {
            Ok(()) => Step::new(Phase::Succeeded, Reason::Succeeded, "the script succeeded"),
            // Its pod shows that nothing wrote to the outputs claim (a download failed, say):
            // it goes. Without a pod to show it (gone with its node), the claim is kept.
            Err(why) if uploads > 0 && !run.pods.is_empty() && !script_ran(run) => {
                return Decision::CleanUp {
                    record: None,
                    pods: run.pods.iter().map(|p| p.name_any()).collect(),
                    step: Step::new(
                        Phase::Failed,
                        Reason::RunFailed,
                        format!(
                            "the run failed before its script started: {why}; it wrote no outputs, so PersistentVolumeClaim {} is removed",
                            render::outputs_name(exp)
                        ),
                    ),
                    uploaded: 0,
                };
            }
            Err(why) if uploads > 0 => Step::new(
                Phase::Failed,
                Reason::RunFailed,
                format!(
                    "the run failed: {why}; its outputs were not uploaded (uploadPolicy OnSuccess) and are kept on PersistentVolumeClaim {}",
                    render::outputs_name(exp)
                ),
            ),
            Err(why) => Step::new(
                Phase::Failed,
                Reason::RunFailed,
                format!("the run failed: {why}"),
            ),
        };
        return Decision::Report {
            step,
            then: Action::await_change(),
            transfer: false,
        };
    };
    let Some(upload) = upload else {
        return Decision::StartUpload;
    };
    let after_run = match &run_ok {
        Ok(()) => "the script succeeded".to_string(),
        Err(why) => format!("the run failed ({why})"),
    };
    let outputs = render::outputs_name(exp);
    match progress::outcome(&upload.job) {
        Outcome::Active => {
            let waiting = upload.waiting.as_ref();
            let patience = patience(waiting, now, start_timeout);
            if patience.timed_out {
                return Decision::GiveUpUpload {
                    step: Step::new(
                        Phase::Failed,
                        Reason::UploadFailed,
                        format!(
                            "{after_run}; the upload pod did not start within {}: {}; Job {} is suspended and the outputs are kept on PersistentVolumeClaim {outputs}",
                            format_duration(start_timeout),
                            no_reason(waiting),
                            render::upload_job_name(exp),
                        ),
                    ),
                };
            }
            let progress = transfer_progress(exp, upload);
            let step = Step::new(
                Phase::Uploading,
                Reason::Uploading,
                match why(waiting) {
                    Some(why) => format!("{after_run}; waiting for the upload pod to start: {why}"),
                    None => format!(
                        "{after_run}; uploading its outputs{}",
                        stalled(progress.as_ref(), now)
                    ),
                },
            )
            .with_progress(progress);
            Decision::Report {
                step,
                then: Action::requeue(patience.recheck),
                transfer: progress::transferring(&upload.pods).is_some(),
            }
        }
        Outcome::Succeeded => {
            // Decided once, from the upload pods' reports, before those pods are deleted: a
            // pass after a restart half-way trusts the decision in the status.
            let decided = status::succeeded_reason(exp) == Some(Reason::OutputsUploaded.as_str());
            let skipped = progress::skipped_outputs(&upload.pods);
            let uploaded = progress::upload_totals(&upload.pods).bytes;
            if skipped > 0 && !decided {
                // This run's versions of those files exist only on the volume: keep it.
                let step = Step::new(
                    if run_ok.is_ok() {
                        Phase::Succeeded
                    } else {
                        Phase::Failed
                    },
                    Reason::OutputsSkipped,
                    format!(
                        "{after_run}; {skipped} output file(s) already existed in the datastore and were kept as they were (the upload reference does not set overwrite); this run's versions stay on PersistentVolumeClaim {outputs}"
                    ),
                )
                .warning();
                return Decision::Finish { step, uploaded };
            }
            let record = (!decided).then(|| {
                Step::new(
                    Phase::Uploading,
                    Reason::OutputsUploaded,
                    format!(
                        "{after_run}; its outputs were uploaded: removing the finished pods and PersistentVolumeClaim {outputs}"
                    ),
                )
            });
            let step = match run_ok {
                Ok(()) => Step::new(
                    Phase::Succeeded,
                    Reason::Succeeded,
                    "the script succeeded and its outputs were uploaded",
                ),
                Err(_) => Step::new(
                    Phase::Failed,
                    Reason::RunFailed,
                    format!("{after_run}; its outputs were uploaded (uploadPolicy Always)"),
                ),
            };
            // A finished Job creates no new pods, and the Jobs stay as the run's record.
            let pods = run
                .pods
                .iter()
                .chain(&upload.pods)
                .map(|p| p.name_any())
                .collect();
            Decision::CleanUp {
                record,
                pods,
                step,
                uploaded,
            }
        }
        Outcome::Failed(why) => Decision::Report {
            step: Step::new(
                Phase::Failed,
                Reason::UploadFailed,
                format!(
                    "{after_run}; uploading its outputs failed: {}; they are kept on PersistentVolumeClaim {outputs}",
                    failed_because(&upload.pods, why)
                ),
            ),
            then: Action::await_change(),
            transfer: false,
        },
    }
}

/// How long a transfer may move no bytes before its status says so.
pub const STALL_AFTER: Duration = Duration::from_secs(60);

/// How far the transfer in `job`'s newest pod is: from what its agent said this pass, else as
/// the status last said (a pass that did not read keeps it). `None` when no agent transfers.
fn transfer_progress(exp: &Experiment, job: &JobSeen) -> Option<TransferProgress> {
    let container = progress::transferring(&job.pods)?;
    let last = exp
        .status
        .as_ref()
        .and_then(|s| s.progress.as_ref())
        .filter(|p| p.container == container);
    let Some(said) = job.said.as_ref().filter(|s| s.container == container) else {
        return last.cloned();
    };
    let line = &said.line;
    let moved = match last {
        Some(p) if line.bytes <= p.bytes.max(0) as u64 => p.last_moved_time.clone(),
        _ => Time(said.at),
    };
    let left = line.bytes_total.saturating_sub(line.bytes);
    let eta_seconds = (line.bytes_per_second > 0).then(|| left.div_ceil(line.bytes_per_second));
    let percent = if line.bytes_total == 0 {
        100
    } else {
        (line.bytes.min(line.bytes_total) as u128 * 100 / line.bytes_total as u128) as u64
    };
    Some(TransferProgress {
        name: reference_name(exp, container),
        container: container.to_string(),
        files: line.files as i64,
        files_total: line.files_total as i64,
        bytes: line.bytes as i64,
        bytes_total: line.bytes_total as i64,
        bytes_per_second: line.bytes_per_second as i64,
        eta_seconds: eta_seconds.map(|s| s as i64),
        last_update_time: Time(said.at),
        last_moved_time: moved,
        transferred: format!(
            "{}/{}",
            human_bytes(line.bytes),
            human_bytes(line.bytes_total)
        ),
        percent: format!("{percent}%"),
        eta: eta_seconds.map(human_duration),
        rate: format!("{}/s", human_bytes(line.bytes_per_second)),
        storage_unreachable: line.unreachable.as_ref().map(|u| StorageUnreachable {
            seconds: u.seconds as i64,
            budget_seconds: u.budget_seconds as i64,
            cause: u.cause.clone(),
        }),
    })
}

/// `; --data_folder: storage unreachable for 40s, retrying (up to 5m): <fault>` while the
/// agent rides through an outage, else `; --data_folder: no bytes moved for 3m` once a transfer
/// has not moved for [`STALL_AFTER`].
fn stalled(progress: Option<&TransferProgress>, now: Timestamp) -> String {
    let Some(p) = progress else {
        return String::new();
    };
    if let Some(down) = &p.storage_unreachable {
        return format!(
            "; {}: storage unreachable for {}, retrying (up to {}): {}",
            p.name,
            human_duration(down.seconds.max(0) as u64),
            format_duration(Duration::from_secs(down.budget_seconds.max(0) as u64)),
            down.cause
        );
    }
    let still = now.as_second() - p.last_moved_time.0.as_second();
    if still < STALL_AFTER.as_secs() as i64 {
        return String::new();
    }
    format!(
        "; {}: no bytes moved for {} (the agent retries, and fails at its timeouts)",
        p.name,
        human_duration(still as u64)
    )
}

/// The reference an agent container transfers, as the spec names it.
fn reference_name(exp: &Experiment, container: &str) -> String {
    let nth = |mode: Mode, n: usize| {
        exp.spec
            .script_params
            .iter()
            .filter(|p| p.data_reference.as_ref().is_some_and(|r| r.mode == mode))
            .nth(n)
            .map(|p| p.name.clone())
    };
    match contract::agent_of(container) {
        Some(Agent::Download(n)) => nth(Mode::Download, n),
        Some(Agent::Upload(n)) => nth(Mode::Upload, n),
        Some(Agent::Code) | None => None,
    }
    .unwrap_or_else(|| container.to_string())
}

/// Bytes as `kubectl` shows quantities: `512B`, `3.2Gi`, `120Mi`.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["Ki", "Mi", "Gi", "Ti", "Pi"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut value = bytes as f64;
    let mut unit = "";
    for u in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = u;
    }
    if value < 9.95 {
        format!("{value:.1}{unit}")
    } else {
        format!("{value:.0}{unit}")
    }
}

/// Seconds as `kubectl` shows ages: `45s`, `4m`, `1h5m`.
fn human_duration(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s.div_ceil(60).min(59)),
        s => {
            let (h, m) = (s / 3600, (s % 3600) / 60);
            if m == 0 {
                format!("{h}h")
            } else {
                format!("{h}h{m}m")
            }
        }
    }
}

/// Why a Job failed: each container of its newest pod that exited non-zero, else the Job's
/// own reason.
fn failed_because(pods: &[k8s_openapi::api::core::v1::Pod], job_reason: String) -> String {
    let mut lines = progress::failures(pods);
    if lines.is_empty() {
        lines.push(job_reason);
    }
    lines.join("; ")
}

/// Whether the script ever started in one of the run's pods.
fn script_ran(run: &JobSeen) -> bool {
    run.pods.iter().any(|p| {
        p.status
            .iter()
            .flat_map(|s| s.container_statuses.iter().flatten())
            .any(|c| {
                c.name == contract::MAIN_CONTAINER
                    && c.state.as_ref().is_some_and(|s| s.waiting.is_none())
            })
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use serde_json::{Value, json};

    use super::*;
    use crate::api::ExperimentStatus;
    use crate::controller::experiment::fixtures::{experiment, reference};
    use crate::controller::experiment::observe::Said;
    use crate::plan::contract::ProgressLine;

    const NOW: i64 = 1_800_000_000;
    const START_TIMEOUT: Duration = Duration::from_secs(900);

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    #[test]
    fn a_refusal_is_retried_later_the_longer_it_lasts() {
        let now = at(NOW);
        let refused_since = |seconds_ago: i64| {
            let mut exp = experiment("");
            let step = Step::refused(Phase::Pending, Reason::QuotaExceeded, "exceeded quota");
            exp.status = Some(status::next_status(
                &ExperimentStatus::default(),
                Some(1),
                &step,
                Vec::new(),
                false,
                &Time(at(NOW - seconds_ago)),
            ));
            retry_after(&exp, now)
        };
        assert_eq!(refused_since(0), REFUSED_RETRY_MIN);
        assert_eq!(refused_since(90), Duration::from_secs(90));
        assert_eq!(refused_since(3600), REFUSED_RETRY_MAX);
        // Not refused before (Accepted True, or no status): the shortest wait.
        assert_eq!(retry_after(&experiment(""), now), REFUSED_RETRY_MIN);
    }

    /// A Job named `name`, created `age` seconds before [`NOW`], with `ended` as its terminal
    /// condition (`Complete`, `Failed`, or none).
    fn job(name: &str, ended: Option<&str>) -> Job {
        let conditions: Vec<Value> = ended
            .map(|type_| json!({"type": type_, "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}))
            .into_iter()
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ml"},
            "status": {"conditions": conditions},
        }))
        .unwrap()
    }

    /// A pod of `job` with these init and main container states.
    fn pod(
        name: &str,
        init: Vec<(&str, Value)>,
        main: Vec<(&str, Value)>,
        reports: Option<&str>,
    ) -> Pod {
        let statuses = |cs: Vec<(&str, Value)>| -> Vec<Value> {
            cs.into_iter()
                .map(|(name, state)| json!({"name": name, "ready": false, "restartCount": 0, "image": "i", "imageID": "", "state": state}))
                .collect()
        };
        let mut main = statuses(main);
        if let Some(report) = reports {
            main.push(json!({"name": "upload-0", "ready": false, "restartCount": 0, "image": "i", "imageID": "",
                "state": {"terminated": {"exitCode": 0, "message": report}}}));
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ml", "creationTimestamp": "2027-01-15T08:00:00Z"},
            "status": {"initContainerStatuses": statuses(init), "containerStatuses": main},
        }))
        .unwrap()
    }

    fn running() -> Value {
        json!({"running": {}})
    }

    fn exited(code: i32) -> Value {
        json!({"terminated": {"exitCode": code}})
    }

    fn seen(job: Job, pods: Vec<Pod>, waited: Option<i64>) -> JobSeen {
        JobSeen {
            job,
            pods,
            waiting: waited.map(|seconds| Waiting {
                since: at(NOW - seconds),
                why: Some("FailedScheduling: 0/3 nodes are available".into()),
            }),
            said: None,
        }
    }

    /// What a case expects: the decision's kind, and its (last) step's phase and reason.
    fn summary(decision: &Decision) -> (&'static str, Phase, Reason, Option<Action>) {
        match decision {
            Decision::Report { step, then, .. } => {
                ("report", step.phase, step.reason, Some(then.clone()))
            }
            Decision::GiveUpRun { step, .. } => ("give up run", step.phase, step.reason, None),
            Decision::GiveUpUpload { step } => ("give up upload", step.phase, step.reason, None),
            Decision::StartUpload => ("start upload", Phase::Uploading, Reason::Uploading, None),
            Decision::CleanUp { step, .. } => ("clean up", step.phase, step.reason, None),
            Decision::Finish { step, .. } => ("finish", step.phase, step.reason, None),
        }
    }

    #[test]
    fn what_was_observed_decides_one_step() {
        let download = reference("--in", "blob-ds", "download");
        let upload = reference("--out", "blob-ds", "upload");
        let both = download.clone() + &upload;
        let always = |exp: &mut Experiment| exp.spec.upload_policy = UploadPolicy::Always;
        let uploaded = |exp: &mut Experiment| {
            let step = Step::new(Phase::Uploading, Reason::OutputsUploaded, "removing");
            exp.status = Some(status::next_status(
                &ExperimentStatus::default(),
                None,
                &step,
                vec![],
                true,
                &Time(at(NOW - 5)),
            ));
        };
        let keep = |_: &mut Experiment| {};
        let run = |ended, pods, waited| seen(job("train-run", ended), pods, waited);
        let up = |ended, pods, waited| Some(Some(seen(job("train-upload", ended), pods, waited)));
        let script_running = || {
            vec![pod(
                "run-1",
                vec![("download-0", exited(0))],
                vec![("main", running())],
                None,
            )]
        };
        let downloading = || {
            vec![pod(
                "run-1",
                vec![("download-0", running())],
                vec![("main", json!({"waiting": {"reason": "PodInitializing"}}))],
                None,
            )]
        };
        let report = |skipped: u64| {
            Some(format!(
                r#"{{"uploaded": 3, "skipped": {skipped}, "identical": 0, "bytes": 3000}}"#
            ))
        };
        let upload_pod =
            |skipped| vec![pod("upload-1", vec![], vec![], report(skipped).as_deref())];
        let recheck = |s| Some(Action::requeue(Duration::from_secs(s)));
        let changes = Some(Action::await_change());

        // (case, scriptParams, a change to the Experiment, the run seen, the upload seen, the
        // decision's kind, phase, reason and next look).
        type Expected = (&'static str, Phase, Reason, Option<Action>);
        type Case<'a> = (
            &'a str,
            &'a str,
            &'a dyn Fn(&mut Experiment),
            JobSeen,
            Option<Option<JobSeen>>,
            Expected,
        );
        let cases: Vec<Case> = vec![
            (
                "no pod yet",
                &both,
                &keep,
                run(None, vec![], Some(10)),
                None,
                ("report", Phase::Pending, Reason::Created, recheck(300)),
            ),
            (
                "a pod that waits near its timeout is looked at when it ends",
                &both,
                &keep,
                run(None, vec![], Some(890)),
                None,
                ("report", Phase::Pending, Reason::Created, recheck(11)),
            ),
            (
                "a pod that did not start in time",
                &both,
                &keep,
                run(None, vec![], Some(900)),
                None,
                ("give up run", Phase::Failed, Reason::StartTimeout, None),
            ),
            (
                "downloading",
                &both,
                &keep,
                run(None, downloading(), None),
                None,
                (
                    "report",
                    Phase::Downloading,
                    Reason::Downloading,
                    recheck(300),
                ),
            ),
            (
                "the script runs",
                &both,
                &keep,
                run(None, script_running(), None),
                None,
                ("report", Phase::Running, Reason::Running, recheck(300)),
            ),
            (
                "succeeded without uploads",
                &download,
                &keep,
                run(Some("Complete"), vec![], None),
                None,
                (
                    "report",
                    Phase::Succeeded,
                    Reason::Succeeded,
                    changes.clone(),
                ),
            ),
            (
                "failed without uploads",
                &download,
                &keep,
                run(Some("Failed"), vec![], None),
                None,
                ("report", Phase::Failed, Reason::RunFailed, changes.clone()),
            ),
            (
                "failed: outputs kept (OnSuccess)",
                &both,
                &keep,
                run(Some("Failed"), vec![], None),
                None,
                ("report", Phase::Failed, Reason::RunFailed, changes.clone()),
            ),
            (
                "succeeded: the upload Job is created",
                &both,
                &keep,
                run(Some("Complete"), vec![], None),
                Some(None),
                ("start upload", Phase::Uploading, Reason::Uploading, None),
            ),
            (
                "failed under Always: uploaded anyway",
                &both,
                &always,
                run(Some("Failed"), vec![], None),
                Some(None),
                ("start upload", Phase::Uploading, Reason::Uploading, None),
            ),
            (
                "uploading",
                &both,
                &keep,
                run(Some("Complete"), vec![], None),
                up(None, vec![], None),
                ("report", Phase::Uploading, Reason::Uploading, recheck(300)),
            ),
            (
                "an upload pod that did not start in time",
                &both,
                &keep,
                run(Some("Complete"), vec![], None),
                up(None, vec![], Some(1000)),
                ("give up upload", Phase::Failed, Reason::UploadFailed, None),
            ),
            (
                "uploaded: clean up",
                &both,
                &keep,
                run(Some("Complete"), vec![], None),
                up(Some("Complete"), upload_pod(0), None),
                ("clean up", Phase::Succeeded, Reason::Succeeded, None),
            ),
            (
                "uploaded under Always after a failure",
                &both,
                &always,
                run(Some("Failed"), vec![], None),
                up(Some("Complete"), upload_pod(0), None),
                ("clean up", Phase::Failed, Reason::RunFailed, None),
            ),
            (
                "some outputs existed: the claim stays",
                &both,
                &keep,
                run(Some("Complete"), vec![], None),
                up(Some("Complete"), upload_pod(2), None),
                ("finish", Phase::Succeeded, Reason::OutputsSkipped, None),
            ),
            (
                "skips after the decision to clean up (a restart) do not undo it",
                &both,
                &uploaded,
                run(Some("Complete"), vec![], None),
                up(Some("Complete"), upload_pod(2), None),
                ("clean up", Phase::Succeeded, Reason::Succeeded, None),
            ),
            (
                "the upload failed",
                &both,
                &keep,
                run(Some("Complete"), vec![], None),
                up(Some("Failed"), upload_pod(0), None),
                (
                    "report",
                    Phase::Failed,
                    Reason::UploadFailed,
                    changes.clone(),
                ),
            ),
        ];
        for (case, params, tweak, run, upload, expected) in cases {
            let mut exp = experiment(params);
            tweak(&mut exp);
            let seen = Observed {
                run,
                inputs: vec![],
                upload,
            };
            let decision = decide(&exp, &seen, at(NOW), START_TIMEOUT);
            assert_eq!(summary(&decision), expected, "{case}: {decision:#?}");
        }
    }

    #[test]
    fn giving_up_on_a_run_deletes_the_outputs_claim_only_if_no_script_ran_on_it() {
        let exp = experiment(&reference("--out", "blob-ds", "upload"));
        let decide_with = |pods| {
            let seen = Observed {
                run: seen(job("train-run", None), pods, Some(900)),
                inputs: vec![],
                upload: None,
            };
            decide(&exp, &seen, at(NOW), START_TIMEOUT)
        };
        let Decision::GiveUpRun {
            step,
            delete_outputs,
        } = decide_with(vec![])
        else {
            panic!("a run that did not start is given up")
        };
        assert!(delete_outputs);
        assert_eq!(
            step.message,
            "the run's pod did not start within 15m: FailedScheduling: 0/3 nodes are available; Job train-run is suspended"
        );
        // A retried pod whose script ran once: its outputs may be on the claim.
        let ran = pod("run-1", vec![], vec![("main", exited(1))], None);
        assert!(matches!(
            decide_with(vec![ran]),
            Decision::GiveUpRun {
                delete_outputs: false,
                ..
            }
        ));
    }

    #[test]
    fn the_clean_up_records_its_decision_first_and_removes_every_finished_pod() {
        let exp = experiment(&reference("--out", "blob-ds", "upload"));
        let seen = Observed {
            run: seen(
                job("train-run", Some("Complete")),
                vec![pod("run-1", vec![], vec![], None)],
                None,
            ),
            inputs: vec![],
            upload: Some(Some(seen(
                job("train-upload", Some("Complete")),
                vec![pod(
                    "upload-1",
                    vec![],
                    vec![],
                    Some(r#"{"uploaded": 2, "skipped": 0, "identical": 1, "bytes": 2048}"#),
                )],
                None,
            ))),
        };
        let Decision::CleanUp {
            record,
            pods,
            step,
            uploaded,
        } = decide(&exp, &seen, at(NOW), START_TIMEOUT)
        else {
            panic!("an upload that succeeded is cleaned up")
        };
        let record = record.expect("recorded before the pods go");
        assert_eq!(
            (record.phase, record.reason),
            (Phase::Uploading, Reason::OutputsUploaded)
        );
        assert_eq!(pods, ["run-1", "upload-1"]);
        assert_eq!(
            step.message,
            "the script succeeded and its outputs were uploaded"
        );
        assert_eq!(uploaded, 2048);
    }

    #[test]
    fn the_run_job_of_the_name_decides_how_a_pass_begins() {
        let mut exp = experiment("");
        let ours = |uid: &str| {
            let mut job = job("train-run", None);
            job.metadata.owner_references = Some(vec![
                serde_json::from_value(json!({
                    "apiVersion": "datastore.example.com/v1alpha1", "kind": "Experiment",
                    "name": "train", "uid": uid, "controller": true,
                }))
                .unwrap(),
            ]);
            job
        };
        assert_eq!(entry(&exp, None), Entry::Start);
        assert!(matches!(entry(&exp, Some(ours("uid-1"))), Entry::Follow(_)));
        // A namesake's leftover is neither followed nor adopted: the experiment waits for it.
        let Entry::Report {
            step,
            started,
            then,
        } = entry(&exp, Some(ours("uid-0")))
        else {
            panic!("a Job that is not ours is reported")
        };
        assert_eq!(
            (step.phase, step.reason, started),
            (Phase::Pending, Reason::NameConflict, false)
        );
        assert_eq!(then, Action::requeue(BLOCKED_RECHECK));
        // Deleted mid-run: failed, not run again into an outputs volume that may hold outputs.
        let step = Step::new(Phase::Running, Reason::Running, "the script is running");
        exp.status = Some(status::next_status(
            &ExperimentStatus::default(),
            None,
            &step,
            vec![],
            true,
            &Time(at(NOW)),
        ));
        let Entry::Report {
            step,
            started,
            then,
        } = entry(&exp, None)
        else {
            panic!("a deleted run Job is reported")
        };
        assert_eq!(
            (step.phase, step.reason, started),
            (Phase::Failed, Reason::RunJobDeleted, true)
        );
        assert!(
            step.message.contains("create a new Experiment"),
            "{}",
            step.message
        );
        assert_eq!(then, Action::await_change());
        // A local experiment is `datastore run`'s; a finished or deleted one is history.
        let mut local = experiment("");
        local.spec.compute_target = ComputeTarget::Local;
        assert!(
            matches!(settled(&local), Some(Entry::Report { step, .. }) if step.reason == Reason::LocalComputeTarget)
        );
        exp.status.as_mut().unwrap().completion_time = Some(Time(at(NOW)));
        assert_eq!(settled(&exp), Some(Entry::Nothing));
    }

    /// A script whose container the runtime could not start, as a real kubelet with
    /// containerd and runc reports it (restartPolicy Never): the pod Failed, the container
    /// terminated with reason StartError, exit code 128, started at the epoch, and the runtime's
    /// error as its message; the Job says only BackoffLimitExceeded.
    #[test]
    fn a_script_that_cannot_start_says_the_runtimes_reason_not_the_jobs() {
        let exp = experiment("  - name: --lr\n    value: \"0.1\"\n");
        let kubelet_pod = |runtime_error: &str| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": "train-run-x7k2p", "namespace": "ml", "creationTimestamp": "2027-01-15T08:00:00Z"},
                "status": {
                    "phase": "Failed",
                    "conditions": [
                        {"type": "PodReadyToStartContainers", "status": "False", "lastTransitionTime": "2027-01-15T08:00:03Z"},
                        {"type": "Initialized", "status": "True", "lastTransitionTime": "2027-01-15T08:00:00Z"},
                        {"type": "Ready", "status": "False", "reason": "PodFailed", "lastTransitionTime": "2027-01-15T08:00:03Z"},
                        {"type": "ContainersReady", "status": "False", "reason": "PodFailed", "lastTransitionTime": "2027-01-15T08:00:03Z"},
                        {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2027-01-15T08:00:00Z"},
                    ],
                    "containerStatuses": [{
                        "name": "main", "ready": false, "restartCount": 0, "started": false,
                        "image": "docker.io/library/python:3.12-slim",
                        "imageID": "docker.io/library/python@sha256:0b3ae4e1a8c4b7ba6c1d7e6bf0a1ee59b8f8b4e4f2a1c3d5e7f9a0b1c2d3e4f5",
                        "containerID": "containerd://4f5c3a2b1e0d9c8b7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b",
                        "state": {"terminated": {
                            "exitCode": 128, "reason": "StartError", "message": runtime_error,
                            "startedAt": "1970-01-01T00:00:00Z", "finishedAt": "2027-01-15T08:00:02Z",
                            "containerID": "containerd://4f5c3a2b1e0d9c8b7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b",
                        }},
                        "lastState": {},
                    }],
                    "qosClass": "BestEffort",
                    "startTime": "2027-01-15T08:00:00Z",
                },
            }))
            .unwrap()
        };
        let message_of = |runtime_error: &str| {
            let run = seen(
                job("train-run", Some("Failed")),
                vec![kubelet_pod(runtime_error)],
                None,
            );
            let observed = Observed {
                run,
                inputs: vec![],
                upload: None,
            };
            match decide(&exp, &observed, at(NOW), START_TIMEOUT) {
                Decision::Report { step, .. } => {
                    assert_eq!(
                        (step.phase, step.reason),
                        (Phase::Failed, Reason::RunFailed)
                    );
                    step.message
                }
                other => panic!("{other:?}"),
            }
        };
        let too_long = message_of(
            "failed to create containerd task: failed to create shim task: OCI runtime create failed: runc create failed: unable to start container process: exec /usr/local/bin/python: argument list too long: unknown",
        );
        assert!(
            too_long.starts_with("the run failed: the script could not start (StartError, exit code 128): failed to create containerd task: ")
                && too_long.contains("exec /usr/local/bin/python: argument list too long")
                && too_long.contains("the kernel refused the command line and environment as too long")
                && !too_long.contains("BackoffLimitExceeded"),
            "{too_long}"
        );
        let no_python = message_of(
            "failed to create containerd task: failed to create shim task: OCI runtime create failed: runc create failed: unable to start container process: exec: \"python\": executable file not found in $PATH: unknown",
        );
        assert!(
            no_python.starts_with("the run failed: the script could not start (StartError, exit code 128): ")
                && no_python.contains(r#"exec: "python": executable file not found in $PATH"#)
                && no_python.ends_with("the program to run is not in the image: use an image that has it, or name it in command"),
            "{no_python}"
        );
    }

    #[test]
    fn a_run_that_failed_before_its_script_started_removes_its_outputs_claim() {
        let exp = experiment(&reference("--out", "blob-ds", "upload"));
        let download_failed = pod(
            "run-1",
            vec![(
                "download-0",
                json!({"terminated": {"exitCode": 6, "message": "cannot reach container 'data'; it kept failing for the retry budget of 5m"}}),
            )],
            vec![("main", json!({"waiting": {"reason": "PodInitializing"}}))],
            None,
        );
        let seen = Observed {
            run: seen(
                job("train-run", Some("Failed")),
                vec![download_failed],
                None,
            ),
            inputs: vec![],
            upload: None,
        };
        let Decision::CleanUp {
            record, pods, step, ..
        } = decide(&exp, &seen, at(NOW), START_TIMEOUT)
        else {
            panic!("the claim goes")
        };
        assert_eq!((record, pods), (None, vec!["run-1".to_string()]));
        assert_eq!(
            (step.phase, step.reason),
            (Phase::Failed, Reason::RunFailed)
        );
        assert!(
            step.message.contains("download-0 exited with code 6")
                && step.message.contains("retry budget of 5m")
                && step
                    .message
                    .contains("PersistentVolumeClaim train-outputs is removed"),
            "{}",
            step.message
        );
    }

    #[test]
    fn the_end_says_what_failed_and_where_the_outputs_are() {
        let exp = experiment(&reference("--out", "blob-ds", "upload"));
        let step_of = |run: JobSeen, upload: Option<Option<JobSeen>>| match decide(
            &exp,
            &Observed {
                run,
                inputs: vec![],
                upload,
            },
            at(NOW),
            START_TIMEOUT,
        ) {
            Decision::Report { step, .. } | Decision::Finish { step, .. } => step,
            other => panic!("{other:?}"),
        };
        let script_failed = pod(
            "run-1",
            vec![],
            vec![(
                "main",
                json!({"terminated": {"exitCode": 2, "message": "ValueError: no files in /mnt/datastore/training_data"}}),
            )],
            None,
        );
        // The run failed (uploadPolicy OnSuccess): the script's own words, and the claim kept.
        let failed = step_of(
            seen(job("train-run", Some("Failed")), vec![script_failed], None),
            None,
        );
        assert_eq!(
            (failed.phase, failed.reason),
            (Phase::Failed, Reason::RunFailed)
        );
        assert!(
            failed
                .message
                .contains("the script exited with code 2: ValueError")
                && failed
                    .message
                    .contains("kept on PersistentVolumeClaim train-outputs"),
            "{}",
            failed.message
        );
        // The upload failed: the agent's words, and the claim kept.
        let agent_failed = pod(
            "upload-1",
            vec![],
            vec![(
                "upload-0",
                json!({"terminated": {"exitCode": 4, "message": "the storage account refused the SAS token"}}),
            )],
            None,
        );
        let run_ok = || seen(job("train-run", Some("Complete")), vec![], None);
        let failed = step_of(
            run_ok(),
            Some(Some(seen(
                job("train-upload", Some("Failed")),
                vec![agent_failed],
                None,
            ))),
        );
        assert_eq!(
            (failed.phase, failed.reason),
            (Phase::Failed, Reason::UploadFailed)
        );
        assert!(
            failed
                .message
                .contains("container upload-0 exited with code 4: the storage account refused")
                && failed
                    .message
                    .contains("kept on PersistentVolumeClaim train-outputs"),
            "{}",
            failed.message
        );
        // Outputs whose blobs existed: kept on the claim, and said with a Warning event.
        let skipped = pod(
            "upload-1",
            vec![],
            vec![],
            Some(r#"{"uploaded": 1, "skipped": 2, "identical": 0, "bytes": 10}"#),
        );
        let kept = step_of(
            run_ok(),
            Some(Some(seen(
                job("train-upload", Some("Complete")),
                vec![skipped],
                None,
            ))),
        );
        assert_eq!(
            (kept.phase, kept.reason, kept.warning),
            (Phase::Succeeded, Reason::OutputsSkipped, true)
        );
        assert!(
            kept.message.contains("2 output file(s) already existed")
                && kept
                    .message
                    .contains("stay on PersistentVolumeClaim train-outputs"),
            "{}",
            kept.message
        );
    }

    #[test]
    fn sizes_durations_and_rates_read_as_kubectl_shows_them() {
        assert_eq!(human_bytes(512), "512B");
        assert_eq!(human_bytes(1536), "1.5Ki");
        assert_eq!(human_bytes(3_435_973_837), "3.2Gi");
        assert_eq!(human_bytes(10 << 30), "10Gi");
        assert_eq!(human_bytes(120 << 20), "120Mi");
        assert_eq!(human_duration(45), "45s");
        assert_eq!(human_duration(200), "4m");
        assert_eq!(human_duration(3600), "1h");
        assert_eq!(human_duration(3900), "1h5m");
    }

    /// A run Job whose pod is downloading with `download-0`, and what that agent said.
    fn downloading_with(said: Option<(u64, u64, i64)>) -> JobSeen {
        let pods = vec![pod(
            "run-1",
            vec![("download-0", running())],
            vec![("main", json!({"waiting": {"reason": "PodInitializing"}}))],
            None,
        )];
        let mut run = seen(job("train-run", None), pods, None);
        run.said = said.map(|(bytes, rate, at_second)| Said {
            container: "download-0".into(),
            line: ProgressLine {
                files: 1,
                files_total: 4,
                bytes,
                bytes_total: 10 << 30,
                bytes_per_second: rate,
                elapsed_seconds: 30,
                unreachable: None,
            },
            at: at(at_second),
        });
        run
    }

    #[test]
    fn a_download_in_progress_is_in_the_status_with_its_rate_and_time_left() {
        let mut exp = experiment(&reference("--data_folder", "blob-ds", "download"));
        let step_of = |exp: &Experiment, run: JobSeen, now: i64| {
            let seen = Observed {
                run,
                inputs: vec![],
                upload: None,
            };
            match decide(exp, &seen, at(now), START_TIMEOUT) {
                Decision::Report { step, .. } => step,
                other => panic!("{other:?}"),
            }
        };
        let first = step_of(
            &exp,
            downloading_with(Some((3_435_973_837, 100 << 20, NOW - 1))),
            NOW,
        );
        let progress = *first.progress.clone().expect("progress while downloading");
        assert_eq!(
            (
                progress.name.as_str(),
                progress.transferred.as_str(),
                progress.percent.as_str(),
                progress.eta.as_deref(),
                progress.rate.as_str()
            ),
            ("--data_folder", "3.2Gi/10Gi", "32%", Some("2m"), "100Mi/s")
        );
        assert_eq!((progress.files, progress.files_total), (1, 4));
        assert_eq!(progress.last_moved_time, Time(at(NOW - 1)));
        assert_eq!(first.message, "downloading inputs: 0 of 1 done");
        exp.status = Some(status::next_status(
            &ExperimentStatus::default(),
            None,
            &first,
            vec![],
            true,
            &Time(at(NOW)),
        ));

        // A pass that did not read (within the period, or no read free) keeps what was said.
        let kept = step_of(&exp, downloading_with(None), NOW + 5);
        assert_eq!(kept.progress.as_deref(), Some(&progress));

        // The same bytes a while later: the time they last moved stays, and after a minute the
        // message says so (before the agent's timeouts fail it).
        let stuck = |now| {
            step_of(
                &exp,
                downloading_with(Some((3_435_973_837, 0, now - 1))),
                now,
            )
        };
        let early = stuck(NOW + 30);
        assert_eq!(
            early.progress.as_ref().unwrap().last_moved_time,
            Time(at(NOW - 1))
        );
        assert_eq!(
            early.progress.as_ref().unwrap().eta,
            None,
            "no time left is known while nothing moves"
        );
        assert_eq!(early.message, "downloading inputs: 0 of 1 done");
        let late = stuck(NOW + 120);
        assert_eq!(
            late.message,
            "downloading inputs: 0 of 1 done; --data_folder: no bytes moved for 3m (the agent retries, and fails at its timeouts)"
        );
        // Past the downloads, no progress is kept.
        let script = vec![pod(
            "run-1",
            vec![("download-0", exited(0))],
            vec![("main", running())],
            None,
        )];
        assert_eq!(
            step_of(&exp, seen(job("train-run", None), script, None), NOW + 130).progress,
            None
        );
    }

    #[test]
    fn a_transfer_riding_through_a_storage_outage_says_so() {
        let exp = experiment(&reference("--data_folder", "blob-ds", "download"));
        let mut run = downloading_with(Some((1 << 20, 0, NOW - 1)));
        run.said.as_mut().unwrap().line.unreachable =
            Some(crate::transfer::progress::Unreachable {
                seconds: 40,
                budget_seconds: 300,
                cause: "Connection refused (os error 111)".into(),
            });
        let seen = Observed {
            run,
            inputs: vec![],
            upload: None,
        };
        let Decision::Report { step, .. } = decide(&exp, &seen, at(NOW), START_TIMEOUT) else {
            panic!("a report while downloading")
        };
        assert_eq!(
            step.message,
            "downloading inputs: 0 of 1 done; --data_folder: storage unreachable for 40s, retrying (up to 5m): Connection refused (os error 111)"
        );
        let down = step.progress.unwrap().storage_unreachable.unwrap();
        assert_eq!((down.seconds, down.budget_seconds), (40, 300));
    }
}
