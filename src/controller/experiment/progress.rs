//! Where an experiment's run is, read from its Jobs and the run's pods, and the status that says
//! so. Pure: the reconciler fetches the objects and passes them in.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};

use crate::api::{CacheResult, InputRecord};
use crate::plan::Transfer;
use crate::plan::contract::{
    self, CODE_CONTAINER, MAIN_CONTAINER, agent_of, download_container, is_download_container,
};
use crate::plan::contract::{Report, UploadReport};

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

/// The agent container of the newest pod that is transferring now (the code or a download in
/// the run's pod, an upload in the upload Job's; of several uploads running side by side, the
/// first).
pub fn transferring(pods: &[Pod]) -> Option<&str> {
    let status = newest(pods)?.status.as_ref()?;
    status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .filter(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
        .map(|c| c.name.as_str())
        .find(|name| agent_of(name).is_some())
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
                let seconds = match (&terminated.started_at, &terminated.finished_at) {
                    (Some(start), Some(end)) => {
                        Some((end.0.as_second() - start.0.as_second()).max(0))
                    }
                    _ => None,
                };
                let report = Report::parse(terminated.message.as_deref()?)?;
                Some((report, seconds, pod))
            })?;
            let (report, seconds, pod) = report;
            Some(InputRecord {
                name: download.param.clone(),
                datastore: download.datastore.clone(),
                path: download.remote_path.clone(),
                files: report.files as i64,
                bytes: report.bytes as i64,
                cache: cache_result(report.cached_at.as_deref(), pod),
                cache_reason: pod
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(&contract::cache_annotation(&container)))
                    .cloned(),
                digest: report.digest,
                seconds,
            })
        })
        .collect()
}

/// A hit when the node cache published the tree before the pod was created (the pod found it
/// there); a miss when it was published after (the pod waited for its download). `None` for a
/// download into the pod.
fn cache_result(cached_at: Option<&str>, pod: &Pod) -> Option<CacheResult> {
    let cached_at: k8s_openapi::jiff::Timestamp = cached_at?.parse().ok()?;
    let created = pod.metadata.creation_timestamp.as_ref()?.0;
    Some(if cached_at < created {
        CacheResult::Hit
    } else {
        CacheResult::Miss
    })
}

/// The reasons a runtime gives a container it could not start (its process never ran):
/// containerd's (exit code 128, with the runtime's error as the message) and Docker's.
const COULD_NOT_START: &[&str] = &["StartError", "ContainerCannotRun"];

/// Why the pods of a failed Job failed, for humans: the pod's own reason when the kubelet failed
/// it as a whole (evicted, refused at admission), then each container that exited non-zero,
/// with its termination message (the agent writes its error there), or that could not start,
/// with the runtime's reason and error and what that error means.
pub fn failures(pods: &[Pod]) -> Vec<String> {
    let Some(status) = newest(pods).and_then(|p| p.status.as_ref()) else {
        return Vec::new();
    };
    let pod_failed = status
        .reason
        .as_deref()
        .filter(|r| !r.is_empty() && status.phase.as_deref() == Some("Failed"))
        .map(|reason| {
            match status
                .message
                .as_deref()
                .map(str::trim)
                .filter(|m| !m.is_empty())
            {
                Some(m) => format!(
                    "the pod failed ({reason}): {}",
                    crate::plan::contract::truncate(m, 512)
                ),
                None => format!("the pod failed ({reason})"),
            }
        });
    let containers = status
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
            let message = t.message.as_deref().map(str::trim).unwrap_or_default();
            if let Some(reason) = t.reason.as_deref().filter(|r| COULD_NOT_START.contains(r)) {
                let mut line = format!(
                    "{what} could not start ({reason}, exit code {})",
                    t.exit_code
                );
                if !message.is_empty() {
                    line.push_str(": ");
                    line.push_str(crate::plan::contract::truncate(message, 512));
                }
                line.push_str(start_error_meaning(message));
                return Some(line);
            }
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
        .collect::<Vec<_>>();
    pod_failed.into_iter().chain(containers).collect()
}

/// What a runtime's error about a container that could not start means, for the errors a
/// spec can cause: `; ...` or nothing.
fn start_error_meaning(message: &str) -> &'static str {
    if message.contains("argument list too long") {
        // E2BIG from execve: past MAX_ARG_STRLEN or ARG_MAX (crate::api::limits).
        "; the kernel refused the command line and environment as too long (at most 128 KiB in one argument or variable, 2 MiB in all): pass large inputs as a file in a datastore (a dataReference) instead"
    } else if message.contains("executable file not found")
        || message.contains("no such file or directory")
    {
        "; the program to run is not in the image: use an image that has it, or name it in command"
    } else {
        ""
    }
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

#[cfg(test)]
mod tests;
