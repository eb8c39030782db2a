//! Where an experiment's run is, read from its Jobs and the run's pods, and the status that says
//! so. Pure: the reconciler fetches the objects and passes them in.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::{Experiment, ExperimentStatus, InputRecord, Phase};
use crate::plan::Transfer;
use crate::plan::contract::{
    CODE_CONTAINER, MAIN_CONTAINER, download_container, is_download_container,
};
use crate::plan::contract::{Report, UploadReport};

/// The condition saying whether the spec is valid and its datastores usable.
pub const ACCEPTED: &str = "Accepted";
/// The condition saying whether the experiment succeeded: Unknown while it runs (the reason is
/// the phase), True when it succeeded, False when it failed or cannot start.
pub const SUCCEEDED: &str = "Succeeded";

/// How a Job ended, from its terminal conditions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Still running (or not started).
    Active,
    Succeeded,
    /// Failed, with the Job's reason and message (e.g. BackoffLimitExceeded).
    Failed(String),
}

/// The Job's outcome: `Complete` or `Failed` conditions only (the `SuccessCriteriaMet` and
/// `FailureTarget` conditions come first while pods may still be terminating).
pub fn outcome(job: &Job) -> Outcome {
    let conditions = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default();
    for c in conditions.iter().filter(|c| c.status == "True") {
        match c.type_.as_str() {
            "Complete" => return Outcome::Succeeded,
            "Failed" => {
                let reason = c.reason.clone().unwrap_or_else(|| "Failed".to_string());
                return Outcome::Failed(match c.message.as_deref() {
                    Some(m) if !m.is_empty() => format!("{reason}: {m}"),
                    _ => reason,
                });
            }
            _ => {}
        }
    }
    Outcome::Active
}

/// Where a running (not yet finished) run Job is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunStep {
    /// No pod has started a container yet.
    Pending,
    /// `done` of `total` downloads have finished.
    Downloading {
        done: usize,
        total: usize,
    },
    Running,
}

/// The newest pod: after a retry, the one that tells where the run is now.
pub fn newest(pods: &[Pod]) -> Option<&Pod> {
    pods.iter().max_by(|a, b| {
        a.metadata
            .creation_timestamp
            .cmp(&b.metadata.creation_timestamp)
            .then_with(|| a.metadata.name.cmp(&b.metadata.name))
    })
}

pub fn run_step(pods: &[Pod], downloads: usize) -> RunStep {
    let Some(status) = newest(pods).and_then(|p| p.status.as_ref()) else {
        return RunStep::Pending;
    };
    let started = |c: &ContainerStatus| {
        c.state
            .as_ref()
            .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
    };
    if status
        .container_statuses
        .iter()
        .flatten()
        .any(|c| c.name == MAIN_CONTAINER && started(c))
    {
        return RunStep::Running;
    }
    let init = status
        .init_container_statuses
        .as_deref()
        .unwrap_or_default();
    let done = init
        .iter()
        .filter(|c| {
            (is_download_container(&c.name) || c.name == CODE_CONTAINER) && exit_code(c) == Some(0)
        })
        .count();
    if downloads > 0 && init.iter().any(started) {
        RunStep::Downloading {
            done,
            total: downloads,
        }
    } else {
        RunStep::Pending
    }
}

/// Since when the Job has been waiting for its pod to start something, if it is: from the
/// Job's creation, the newest pod's, or the end of the last container that finished (the
/// downloads before a sidecar that does not come up). `None` while a container runs that makes
/// progress (an agent, the script) or once a regular container has started; a native sidecar
/// (an init container that restarts always) running alone is not progress: its mount is what
/// is waited for.
pub fn waiting_since(job: &Job, pods: &[Pod]) -> Option<k8s_openapi::jiff::Timestamp> {
    let created = job.metadata.creation_timestamp.as_ref().map(|t| t.0);
    let Some(pod) = newest(pods) else {
        return created;
    };
    let status = pod.status.as_ref();
    let started = |c: &ContainerStatus| {
        c.state
            .as_ref()
            .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
    };
    if status
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|cs| cs.iter().any(started))
    {
        return None;
    }
    let sidecars: Vec<&str> = pod
        .spec
        .iter()
        .flat_map(|s| s.init_containers.iter().flatten())
        .filter(|c| c.restart_policy.as_deref() == Some("Always"))
        .map(|c| c.name.as_str())
        .collect();
    let init = status
        .and_then(|s| s.init_container_statuses.as_deref())
        .unwrap_or_default();
    let running = |c: &&ContainerStatus| c.state.as_ref().is_some_and(|s| s.running.is_some());
    if init
        .iter()
        .filter(|c| !sidecars.contains(&c.name.as_str()))
        .any(|c| running(&c))
    {
        return None;
    }
    let finished = init.iter().filter_map(|c| {
        c.state
            .as_ref()?
            .terminated
            .as_ref()?
            .finished_at
            .as_ref()
            .map(|t| t.0)
    });
    created
        .into_iter()
        .chain(pod.metadata.creation_timestamp.as_ref().map(|t| t.0))
        .chain(finished)
        .max()
}

/// Why the newest pod is stuck, when Kubernetes says: a container waiting for a reason other
/// than starting (ImagePullBackOff, CreateContainerConfigError, ...) or a pod that cannot be
/// scheduled. `None` while it is simply on its way.
pub fn stuck(pods: &[Pod]) -> Option<String> {
    let status = newest(pods)?.status.as_ref()?;
    let containers = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    for c in containers {
        let Some(waiting) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
            continue;
        };
        match waiting.reason.as_deref() {
            None | Some("PodInitializing" | "ContainerCreating") => {}
            Some(reason) => {
                let detail = waiting
                    .message
                    .as_deref()
                    .map(|m| format!(": {}", crate::plan::contract::truncate(m, 256)))
                    .unwrap_or_default();
                return Some(format!("container {} is {reason}{detail}", c.name));
            }
        }
    }
    status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        .map(|c| {
            format!(
                "the pod cannot be scheduled ({}): {}",
                c.reason.as_deref().unwrap_or("Unschedulable"),
                c.message.as_deref().unwrap_or_default()
            )
        })
}

fn exit_code(c: &ContainerStatus) -> Option<i32> {
    c.state.as_ref()?.terminated.as_ref().map(|t| t.exit_code)
}

/// What each download delivered, from the reports its agent wrote to the termination message of
/// `download-<n>` (any pod of the run Job that got that far; the newest wins).
pub fn inputs(pods: &[Pod], downloads: &[Transfer]) -> Vec<InputRecord> {
    let mut by_age: Vec<&Pod> = pods.iter().collect();
    by_age.sort_by(|a, b| {
        b.metadata
            .creation_timestamp
            .cmp(&a.metadata.creation_timestamp)
    });
    downloads
        .iter()
        .enumerate()
        .filter_map(|(n, download)| {
            let container = download_container(n);
            let report = by_age.iter().find_map(|pod| {
                let status = pod.status.as_ref()?;
                let c = status
                    .init_container_statuses
                    .iter()
                    .flatten()
                    .find(|c| c.name == container)?;
                let terminated = c.state.as_ref()?.terminated.as_ref()?;
                if terminated.exit_code != 0 {
                    return None;
                }
                Report::parse(terminated.message.as_deref()?)
            })?;
            Some(InputRecord {
                name: download.param.clone(),
                datastore: download.datastore.clone(),
                path: download.remote_path.clone(),
                files: report.files as i64,
                bytes: report.bytes as i64,
                digest: report.digest,
            })
        })
        .collect()
}

/// Why the pods of a failed Job failed, for humans: each container that exited non-zero, with
/// its termination message (the agent writes its error there).
pub fn failures(pods: &[Pod]) -> Vec<String> {
    let Some(status) = newest(pods).and_then(|p| p.status.as_ref()) else {
        return Vec::new();
    };
    status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .filter_map(|c| {
            let t = c.state.as_ref()?.terminated.as_ref()?;
            if t.exit_code == 0 {
                return None;
            }
            let what = if c.name == MAIN_CONTAINER {
                "the script".to_string()
            } else {
                format!("container {}", c.name)
            };
            let mut line = format!("{what} exited with code {}", t.exit_code);
            if let Some(m) = t
                .message
                .as_deref()
                .map(str::trim)
                .filter(|m| !m.is_empty())
            {
                line.push_str(": ");
                line.push_str(crate::plan::contract::truncate(m, 512));
            } else if let Some(r) = t.reason.as_deref().filter(|r| *r != "Error") {
                line.push_str(&format!(" ({r})"));
            }
            Some(line)
        })
        .collect()
}

/// What the upload containers of the newest pod reported, summed (a retried pod reports the
/// whole upload again, so older pods do not count).
pub fn upload_totals(pods: &[Pod]) -> UploadReport {
    let mut total = UploadReport {
        uploaded: 0,
        skipped: 0,
        identical: 0,
        bytes: 0,
    };
    let Some(status) = newest(pods).and_then(|p| p.status.as_ref()) else {
        return total;
    };
    for report in status
        .container_statuses
        .iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.message.as_deref())
        .filter_map(UploadReport::parse)
    {
        total.uploaded += report.uploaded;
        total.skipped += report.skipped;
        total.identical += report.identical;
        total.bytes += report.bytes;
    }
    total
}

/// How many outputs the upload left as they were because their blob existed.
pub fn skipped_outputs(pods: &[Pod]) -> u64 {
    upload_totals(pods).skipped
}

/// The reason of the experiment's `Succeeded` condition, as last written.
pub fn succeeded_reason(exp: &Experiment) -> Option<&str> {
    exp.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == SUCCEEDED)
        .map(|c| c.reason.as_str())
}

/// One step of an experiment, as its status reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub phase: Phase,
    /// `Accepted` condition: `None` is True, `Some((reason, message))` is False.
    pub refused: Option<(String, String)>,
    /// The `Succeeded` condition's reason (CamelCase).
    pub reason: String,
    /// What happened, for humans.
    pub message: String,
    /// Publish its event as a Warning even though nothing failed.
    pub warning: bool,
}

impl Step {
    pub fn new(phase: Phase, reason: &str, message: impl Into<String>) -> Step {
        Step {
            phase,
            refused: None,
            reason: reason.to_string(),
            message: message.into(),
            warning: false,
        }
    }

    pub fn warning(mut self) -> Step {
        self.warning = true;
        self
    }

    /// The spec or its datastores keep the experiment from starting.
    pub fn refused(phase: Phase, reason: &str, message: impl Into<String>) -> Step {
        let message = message.into();
        Step {
            phase,
            refused: Some((reason.to_string(), message.clone())),
            reason: reason.to_string(),
            message,
            warning: true,
        }
    }

    pub fn finished(&self) -> bool {
        matches!(self.phase, Phase::Succeeded | Phase::Failed) && self.refused.is_none()
    }
}

/// The status after `step`: conditions keep their transition time while their status holds;
/// the start time is set once, when the run starts, and the completion time when it ends.
/// Equal to `current` when nothing changed, so an unchanged experiment is not written.
pub fn next_status(
    current: &ExperimentStatus,
    generation: Option<i64>,
    step: &Step,
    inputs: Vec<InputRecord>,
    started: bool,
    now: &Time,
) -> ExperimentStatus {
    let accepted = match &step.refused {
        None => condition(
            ACCEPTED,
            "True",
            "Accepted",
            "the spec is valid and every datastore is usable",
            generation,
        ),
        Some((reason, message)) => condition(ACCEPTED, "False", reason, message, generation),
    };
    let succeeded = match step.phase {
        Phase::Succeeded => condition(SUCCEEDED, "True", &step.reason, &step.message, generation),
        Phase::Failed => condition(SUCCEEDED, "False", &step.reason, &step.message, generation),
        _ => condition(
            SUCCEEDED,
            "Unknown",
            &step.reason,
            &step.message,
            generation,
        ),
    };
    let conditions = [accepted, succeeded]
        .into_iter()
        .map(|mut c| {
            if let Some(old) = current.conditions.iter().find(|o| o.type_ == c.type_)
                && old.status == c.status
            {
                c.last_transition_time = old.last_transition_time.clone();
            } else {
                c.last_transition_time = now.clone();
            }
            c
        })
        .collect();
    let start_time = current
        .start_time
        .clone()
        .or_else(|| started.then(|| now.clone()));
    let completion_time = current
        .completion_time
        .clone()
        .or_else(|| step.finished().then(|| now.clone()));
    ExperimentStatus {
        phase: Some(step.phase),
        conditions,
        observed_generation: generation,
        start_time,
        completion_time,
        message: Some(step.message.clone()),
        inputs: if inputs.is_empty() {
            current.inputs.clone()
        } else {
            inputs
        },
        // Decided when the run started (the driver of each mount), never by progress.
        mounts: current.mounts.clone(),
    }
}

fn condition(
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        observed_generation: generation,
        last_transition_time: Time(Default::default()),
    }
}

#[cfg(test)]
mod tests;
