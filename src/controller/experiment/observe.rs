//! Observing a started run: its Jobs, their pods, the events that say why a pod waits, and the
//! inputs its downloads reported. Only what [`super::decide`] will look at is read (the upload
//! Job once the run has ended and an upload is due, events only for a pod that waits).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event as CoreEvent, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams, LogParams};

use super::progress::{self, Outcome};
use super::{admit, decide, dereference};
use crate::api::{Experiment, InputRecord, Mode};
use crate::controller::{Context, ReconcileError};
use crate::plan::contract::{self, ProgressLine};
use crate::render;

/// The label the Job controller puts on a Job's pods.
const JOB_NAME_LABEL: &str = "batch.kubernetes.io/job-name";

/// The run Job of this experiment's name, whoever owns it.
pub async fn run_job(exp: &Experiment, ctx: &Context) -> Result<Option<Job>, ReconcileError> {
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &exp.namespace().unwrap_or_default());
    Ok(jobs.get_opt(&render::run_job_name(exp)).await?)
}

/// What a pass of a started run saw.
#[derive(Clone, Debug)]
pub struct Observed {
    pub run: JobSeen,
    /// The inputs record, completed from the download reports when they hold new ones.
    pub inputs: Vec<InputRecord>,
    /// The upload Job, looked up once the run ended and its outputs are due for upload:
    /// `Some(None)` when it has not been created yet.
    pub upload: Option<Option<JobSeen>>,
}

/// A Job, its pods, and, while its pod waits to start, since when and why; while one of its
/// agents transfers, what it last said.
#[derive(Clone, Debug)]
pub struct JobSeen {
    pub job: Job,
    pub pods: Vec<Pod>,
    pub waiting: Option<Waiting>,
    pub said: Option<Said>,
}

/// The newest progress line of an agent container, and when it was written.
#[derive(Clone, Debug, PartialEq)]
pub struct Said {
    pub container: String,
    pub line: ProgressLine,
    pub at: Timestamp,
}

/// A Job whose pod has not started.
#[derive(Clone, Debug, PartialEq)]
pub struct Waiting {
    /// Since when (see [`progress::waiting_since`]).
    pub since: Timestamp,
    /// Why, from the pod's statuses, else the newest Warning event about the pod or, without a
    /// pod, the Job.
    pub why: Option<String>,
}

/// Reads what the run's state depends on, in the order the decisions need it.
pub async fn run(exp: &Experiment, ctx: &Context, run: Job) -> Result<Observed, ReconcileError> {
    let ns = exp.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let run_pods = job_pods(&pods, &render::run_job_name(exp)).await?;
    let inputs = inputs(exp, ctx, &run_pods).await?;
    let run = seen(exp, ctx, run, run_pods).await?;
    let upload = match progress::outcome(&run.job) {
        Outcome::Active => None,
        outcome if !decide::upload_due(exp, &outcome) => None,
        _ => {
            let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
            match jobs.get_opt(&render::upload_job_name(exp)).await? {
                Some(job) => {
                    let upload_pods = job_pods(&pods, &render::upload_job_name(exp)).await?;
                    Some(Some(seen(exp, ctx, job, upload_pods).await?))
                }
                None => Some(None),
            }
        }
    };
    Ok(Observed {
        run,
        inputs,
        upload,
    })
}

/// `job` and its pods; while it is active, why its pod waits and what its agent says.
async fn seen(
    exp: &Experiment,
    ctx: &Context,
    job: Job,
    job_pods: Vec<Pod>,
) -> Result<JobSeen, ReconcileError> {
    let (waiting, said) = match progress::outcome(&job) {
        Outcome::Active => (
            waiting(ctx, &job, &job_pods).await?,
            said(exp, ctx, &job_pods).await,
        ),
        _ => (None, None),
    };
    Ok(JobSeen {
        job,
        pods: job_pods,
        waiting,
        said,
    })
}

/// The progress period when the operator is not told otherwise.
pub const DEFAULT_PROGRESS_PERIOD: Duration = Duration::from_secs(10);
/// All Experiments together make at most this many progress passes a second.
const PROGRESS_PASSES_PER_SECOND: f64 = 10.0;
/// At most this many log reads at once; a pass that finds none free keeps the last progress.
const LOG_READS_AT_ONCE: usize = 4;
/// How many log lines are read: the newest progress line may be followed by a warning.
const LOG_TAIL_LINES: i64 = 5;
/// And at most this much of them.
const LOG_TAIL_BYTES: i64 = 8 * 1024;

/// How the progress of transferring Experiments is read from their agents' logs, bounded so
/// that many transfers cannot hammer the apiserver: each Experiment at most once a `period`,
/// all together at most [`PROGRESS_PASSES_PER_SECOND`] passes a second and
/// [`LOG_READS_AT_ONCE`] reads at once.
#[derive(Debug)]
pub struct ProgressReads {
    /// Zero: never.
    pub period: Duration,
    reads: tokio::sync::Semaphore,
    /// The earliest time the next progress pass may be given.
    next_slot: std::sync::Mutex<Instant>,
}

impl ProgressReads {
    pub fn new(period: Duration) -> ProgressReads {
        ProgressReads {
            period,
            reads: tokio::sync::Semaphore::new(LOG_READS_AT_ONCE),
            next_slot: std::sync::Mutex::new(Instant::now()),
        }
    }

    /// How long until an Experiment that transfers is looked at again: a period, or longer
    /// when other Experiments' passes hold the slots before.
    pub fn next_pass(&self) -> Duration {
        let now = Instant::now();
        let mut next_slot = self.next_slot.lock().expect("not poisoned");
        let slot = (*next_slot).max(now + self.period);
        *next_slot = slot + Duration::from_secs_f64(1.0 / PROGRESS_PASSES_PER_SECOND);
        slot - now
    }

    /// Whether the progress of `container` is due to be read again.
    fn due(&self, exp: &Experiment, container: &str, now: Timestamp) -> bool {
        if self.period.is_zero() {
            return false;
        }
        let last = exp.status.as_ref().and_then(|s| s.progress.as_ref());
        match last {
            Some(p) if p.container == container => {
                // A second of slack: a pass due at the period's end is not skipped for a
                // fraction of a second.
                let age = now.as_second() - p.last_update_time.0.as_second();
                age + 1 >= self.period.as_secs() as i64
            }
            _ => true,
        }
    }
}

/// What the agent transferring in the newest of `pods` last said, when it is due to be read
/// and a read is free. A read that fails is logged and skipped: progress is a courtesy.
async fn said(exp: &Experiment, ctx: &Context, pods: &[Pod]) -> Option<Said> {
    let container = progress::transferring(pods)?;
    if !ctx.progress.due(exp, container, ctx.now_k8s()) {
        return None;
    }
    let _permit = ctx.progress.reads.try_acquire().ok()?;
    let pod = progress::newest(pods)?;
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
    let params = LogParams {
        container: Some(container.to_string()),
        tail_lines: Some(LOG_TAIL_LINES),
        limit_bytes: Some(LOG_TAIL_BYTES),
        timestamps: true,
        ..LogParams::default()
    };
    match api.logs(&pod.name_any(), &params).await {
        Ok(log) => newest_progress(&log).map(|(at, line)| Said {
            container: container.to_string(),
            line,
            at,
        }),
        Err(e) => {
            tracing::warn!(experiment = %exp.name_any(), %container, error = %e, "cannot read the agent's progress from its log");
            None
        }
    }
}

/// The newest progress line of a log read with timestamps (`<RFC 3339> <line>` each).
pub fn newest_progress(log: &str) -> Option<(Timestamp, ProgressLine)> {
    log.lines().rev().find_map(|line| {
        let (at, text) = line.split_once(' ')?;
        Some((at.parse().ok()?, ProgressLine::parse(text)?))
    })
}

/// Whether `job`'s pod is waiting to start, and why.
async fn waiting(
    ctx: &Context,
    job: &Job,
    pods: &[Pod],
) -> Result<Option<Waiting>, ReconcileError> {
    let Some(since) = progress::waiting_since(job, pods) else {
        return Ok(None);
    };
    let why = match progress::stuck(pods) {
        Some(why) => Some(why),
        None => {
            // No pod (a quota or Pod Security refusing it: FailedCreate on the Job), or one
            // whose volumes cannot be mounted (FailedMount on the pod): only events say.
            let object = match progress::newest(pods) {
                Some(pod) => &pod.metadata,
                None => &job.metadata,
            };
            newest_warning(ctx, object).await?
        }
    };
    Ok(Some(Waiting { since, why }))
}

/// The newest Warning event about `object`, as `Reason: message`.
async fn newest_warning(
    ctx: &Context,
    object: &kube::core::ObjectMeta,
) -> Result<Option<String>, ReconcileError> {
    let (Some(uid), Some(ns)) = (&object.uid, &object.namespace) else {
        return Ok(None);
    };
    let events: Api<CoreEvent> = Api::namespaced(ctx.client.clone(), ns);
    let selector = format!("involvedObject.uid={uid},type=Warning");
    let listed = events
        .list(&ListParams::default().fields(&selector))
        .await?;
    Ok(listed
        .items
        .into_iter()
        .max_by_key(|e| {
            e.last_timestamp
                .as_ref()
                .map(|t| t.0)
                .or(e.event_time.as_ref().map(|t| t.0))
        })
        .map(|e| {
            format!(
                "{}: {}",
                e.reason.unwrap_or_default(),
                contract::truncate(e.message.as_deref().unwrap_or_default(), 512)
            )
        }))
}

/// The pods of the Job `job`.
async fn job_pods(pods: &Api<Pod>, job: &str) -> Result<Vec<Pod>, kube::Error> {
    let selector = format!("{JOB_NAME_LABEL}={job}");
    Ok(pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items)
}

/// The inputs record, completed from the pods' download reports when they hold new ones. The
/// records name each download's parameter and path as the plan has them, so the datastores are
/// resolved (and the spec planned) again only then.
async fn inputs(
    exp: &Experiment,
    ctx: &Context,
    run_pods: &[Pod],
) -> Result<Vec<InputRecord>, ReconcileError> {
    let recorded = exp
        .status
        .as_ref()
        .map(|s| s.inputs.clone())
        .unwrap_or_default();
    let downloads = decide::count(exp, Mode::Download);
    let reported = run_pods
        .iter()
        .flat_map(|p| {
            p.status
                .iter()
                .flat_map(|s| s.init_container_statuses.iter().flatten())
        })
        .filter(|c| contract::is_download_container(&c.name))
        .filter(|c| {
            c.state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .is_some_and(|t| t.exit_code == 0)
        })
        .map(|c| c.name.as_str())
        .collect::<BTreeSet<_>>()
        .len();
    if recorded.len() >= downloads || reported <= recorded.len() {
        return Ok(recorded);
    }
    let planned = match dereference::datastores(exp, ctx).await {
        Ok(world) => admit::plan(exp, &world.datastores).map_err(super::Stop::Refused),
        Err(stop) => Err(stop),
    };
    match planned {
        Ok(plan) => Ok(progress::inputs(run_pods, &plan.downloads)),
        Err(super::Stop::Refused(refusal)) => {
            tracing::warn!(experiment = %exp.name_any(), reason = %refusal.reason, "cannot record the inputs: {}", refusal.message);
            Ok(recorded)
        }
        Err(super::Stop::Failed(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::experiment::fixtures::experiment;

    #[test]
    fn the_newest_progress_line_of_a_log_wins_over_later_warnings() {
        let log = concat!(
            "2026-12-06T03:00:01.000000001Z {\"progress\":{\"files\":0,\"filesTotal\":2,\"bytes\":10,\"bytesTotal\":100,\"bytesPerSecond\":5,\"elapsedSeconds\":2}}\n",
            "2026-12-06T03:00:03.000000001Z {\"progress\":{\"files\":1,\"filesTotal\":2,\"bytes\":60,\"bytesTotal\":100,\"bytesPerSecond\":25,\"elapsedSeconds\":4}}\n",
            "2026-12-06T03:00:04.000000001Z {\"level\":\"WARN\",\"message\":\"retrying a block\"}\n",
        );
        let (at, line) = newest_progress(log).unwrap();
        assert_eq!(
            at.as_second(),
            "2026-12-06T03:00:03Z"
                .parse::<Timestamp>()
                .unwrap()
                .as_second()
        );
        assert_eq!((line.files, line.bytes), (1, 60));
        assert_eq!(newest_progress("no timestamps here\n"), None);
        assert_eq!(newest_progress(""), None);
    }

    #[test]
    fn progress_passes_are_paced_for_all_experiments_together() {
        let reads = ProgressReads::new(Duration::from_secs(10));
        let first = reads.next_pass();
        assert!(
            first <= Duration::from_secs(10) && first > Duration::from_millis(9_900),
            "{first:?}"
        );
        // A thousand transferring Experiments asking at once are spread 0.1 s apart.
        let last = (0..999).map(|_| reads.next_pass()).last().unwrap();
        assert!(
            last >= Duration::from_secs(109) && last <= Duration::from_secs(110),
            "{last:?}"
        );
    }

    #[test]
    fn a_progress_read_is_due_once_a_period_per_container() {
        let reads = ProgressReads::new(Duration::from_secs(10));
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let mut exp = experiment("");
        assert!(reads.due(&exp, "download-0", now), "never read");
        let said = |seconds_ago: i64, container: &str| crate::api::TransferProgress {
            name: "--data".into(),
            container: container.into(),
            files: 0,
            files_total: 1,
            bytes: 0,
            bytes_total: 1,
            bytes_per_second: 0,
            eta_seconds: None,
            last_update_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                Timestamp::from_second(now.as_second() - seconds_ago).unwrap(),
            ),
            last_moved_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now),
            transferred: String::new(),
            percent: String::new(),
            eta: None,
            rate: String::new(),
            storage_unreachable: None,
        };
        let mut with = |p| {
            exp.status = Some(crate::api::ExperimentStatus {
                progress: Some(p),
                ..Default::default()
            });
            reads.due(&exp, "download-0", now)
        };
        assert!(!with(said(3, "download-0")));
        assert!(with(said(9, "download-0")), "within a second of the period");
        assert!(with(said(3, "code")), "another container is read at once");
        assert!(
            !ProgressReads::new(Duration::ZERO).due(&experiment(""), "download-0", now),
            "0s: never"
        );
    }
}
