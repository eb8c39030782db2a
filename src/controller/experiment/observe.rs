//! Observing a started run: its Jobs, their pods, the events that say why a pod waits, and the
//! inputs its downloads reported. Only what [`super::decide`] will look at is read (the upload
//! Job once the run has ended and an upload is due, events only for a pod that waits).

use std::collections::BTreeSet;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event as CoreEvent, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams};

use super::progress::{self, Outcome};
use super::{admit, decide, dereference};
use crate::api::{Experiment, InputRecord, Mode};
use crate::controller::{Context, ReconcileError};
use crate::plan::contract;
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

/// A Job, its pods, and, while its pod waits to start, since when and why.
#[derive(Clone, Debug)]
pub struct JobSeen {
    pub job: Job,
    pub pods: Vec<Pod>,
    pub waiting: Option<Waiting>,
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
    let run = seen(ctx, run, run_pods).await?;
    let upload = match progress::outcome(&run.job) {
        Outcome::Active => None,
        outcome if !decide::upload_due(exp, &outcome) => None,
        _ => {
            let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
            match jobs.get_opt(&render::upload_job_name(exp)).await? {
                Some(job) => {
                    let upload_pods = job_pods(&pods, &render::upload_job_name(exp)).await?;
                    Some(Some(seen(ctx, job, upload_pods).await?))
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

/// `job` and its pods, and why its pod waits while it is active.
async fn seen(ctx: &Context, job: Job, job_pods: Vec<Pod>) -> Result<JobSeen, ReconcileError> {
    let waiting = match progress::outcome(&job) {
        Outcome::Active => waiting(ctx, &job, &job_pods).await?,
        _ => None,
    };
    Ok(JobSeen {
        job,
        pods: job_pods,
        waiting,
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
