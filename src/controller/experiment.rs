//! Reconciling an Experiment: dereference its datastores, plan, build, apply, then follow its
//! Jobs to the end and report every step in its status and events.
//!
//! One pass reads the world and moves one step:
//! - no run Job: resolve the datastores, plan, choose each mount's driver from what the cluster
//!   has (its Azure CSIDrivers, the namespace's Pod Security level) and build; on success apply
//!   the credentials Secret, the volumes' Secrets, the outputs PVC and the run Job, and record
//!   the drivers and why in `status.mounts`; on a bad spec, an unusable datastore or a mount
//!   the cluster cannot mount, create nothing and say why (condition `Accepted` False, a
//!   Warning event);
//! - run Job active: Pending, Downloading or Running, from its newest pod; the download reports
//!   become `status.inputs`;
//! - run Job ended: with upload references (and the run succeeded, or `uploadPolicy: Always`),
//!   mint fresh credentials and apply the upload Job; otherwise Succeeded or Failed;
//! - upload Job ended: delete the outputs PVC after a successful upload, then Succeeded or
//!   Failed (a failed upload keeps the PVC, so no output is lost).
//!
//! Status is written only when it changes, so an unchanged experiment costs reads only.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    Event as CoreEvent, Namespace, PersistentVolumeClaim, Pod, Secret,
};
use k8s_openapi::api::storage::v1::CSIDriver;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};

use super::progress::{self, Outcome, RunStep, Step};
use super::{Context, ReconcileError};
use crate::api::{
    ComputeTarget, Experiment, ExperimentStatus, InputRecord, Mode, MountRecord, Phase,
    UploadPolicy,
};
use crate::error::Error;
use crate::plan::{self, CLUSTER, ExecutionPlan, contract};
use crate::render::{self, MANAGER, MountEnvironment};
use crate::store::resolve::{self, Found, Scope};
use crate::store::{self, StoreConfig};

/// How often a running experiment is looked at even when nothing it watches changed.
pub const ACTIVE_RECHECK: Duration = Duration::from_secs(300);
/// How often an experiment waiting for a datastore (or its Secret) looks again.
pub const BLOCKED_RECHECK: Duration = Duration::from_secs(60);

/// The step between a successful upload and the end: the outputs are uploaded and nothing was
/// skipped, so the finished pods and the outputs volume are being removed.
const OUTPUTS_UPLOADED: &str = "OutputsUploaded";

/// The label the Job controller puts on a Job's pods.
const JOB_NAME_LABEL: &str = "batch.kubernetes.io/job-name";

pub async fn reconcile(exp: Arc<Experiment>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let status = exp.status.clone().unwrap_or_default();
    // Finished runs are history: Jobs are immutable and a re-run would change what the status
    // says the run saw. A new run is a new Experiment. Nor is anything (re)created while the
    // Experiment is being deleted (a foreground deletion removes the Jobs first).
    if status.completion_time.is_some() || exp.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    if exp.spec.compute_target == ComputeTarget::Local {
        let step = Step::new(
            Phase::Pending,
            "LocalComputeTarget",
            "computeTarget is local: run it with `datastore run`; the cluster creates nothing for it",
        );
        update(&exp, &ctx, step, Vec::new(), false).await?;
        return Ok(Action::await_change());
    }
    let ns = exp.namespace().unwrap_or_default();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    match jobs.get_opt(&render::run_job_name(&exp)).await? {
        Some(run) if !owned_by(&run, &exp) => {
            // Not ours: a leftover of a deleted Experiment of the same name that the garbage
            // collector has not removed yet, or someone else's Job. Never follow or adopt it.
            let step = Step::refused(
                Phase::Pending,
                "NameConflict",
                format!(
                    "Job {} exists and does not belong to this Experiment; it is waited for to go away (delete it if it is not a leftover)",
                    run.name_any()
                ),
            );
            update(&exp, &ctx, step, Vec::new(), false).await?;
            Ok(Action::requeue(BLOCKED_RECHECK))
        }
        Some(run) => follow(&exp, &ctx, &run).await,
        None if status.start_time.is_some() => {
            // Started once: running it again would download again into an outputs volume that
            // may hold the first run's outputs.
            let step = Step::new(
                Phase::Failed,
                "RunJobDeleted",
                format!(
                    "Job {} was deleted before the experiment finished; create a new Experiment to run again",
                    render::run_job_name(&exp)
                ),
            );
            update(&exp, &ctx, step, Vec::new(), true).await?;
            Ok(Action::await_change())
        }
        None => start(&exp, &ctx).await,
    }
}

/// Whether `object`'s controller owner is this Experiment (same uid, not just same name).
fn owned_by(object: &impl Resource, exp: &Experiment) -> bool {
    object
        .meta()
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && Some(&o.uid) == exp.metadata.uid.as_ref())
}

/// Resolves, plans, builds and applies the run; or says why it cannot.
async fn start(exp: &Experiment, ctx: &Context) -> Result<Action, ReconcileError> {
    let mut namespace_labels = None;
    let (plan, datastores) = match plan_with_datastores(exp, ctx, &mut namespace_labels).await? {
        Ok(planned) => planned,
        Err(refusal) => {
            let recheck = refusal.phase == Phase::Pending;
            update(exp, ctx, refusal, Vec::new(), false).await?;
            return Ok(if recheck {
                Action::requeue(BLOCKED_RECHECK)
            } else {
                Action::await_change()
            });
        }
    };
    if let Err(e) = render::check_name(exp) {
        let refusal = Step::refused(Phase::Failed, "NameTooLong", e.to_string());
        update(exp, ctx, refusal, Vec::new(), false).await?;
        return Ok(Action::await_change());
    }
    let env = mount_environment(exp, ctx, &plan, &datastores, namespace_labels).await?;
    if let Some(refusal) = missing_file_driver(&plan, &datastores, &env) {
        update(exp, ctx, refusal, Vec::new(), false).await?;
        return Ok(Action::requeue(BLOCKED_RECHECK));
    }
    let mounts = match render::choose_drivers(&plan, &datastores, &ctx.build, &env) {
        Ok(mounts) => mounts,
        Err(refusal) if refusal.spec => {
            // The reference asks for what cannot be done (`mountDriver: csi` on a folder the
            // driver refuses): only a spec change helps, and it wakes the experiment.
            let refusal = Step::refused(Phase::Failed, refusal.reason, refusal.message);
            update(exp, ctx, refusal, Vec::new(), false).await?;
            return Ok(Action::await_change());
        }
        Err(refusal) => {
            // The others are about the cluster, the operator or the datastore: a missing
            // CSIDriver, a namespace whose Pod Security level forbids the privileged sidecar, an
            // operator without a blobfuse2 image, a datastore without credentials. An admin can
            // fix each without touching the Experiment, so it waits (Pending) and looks again;
            // nothing was created, so a later start is as good as the first. A spec change
            // (e.g. `mountDriver: csi`) wakes it at once.
            let refusal = Step::refused(Phase::Pending, refusal.reason, refusal.message);
            update(exp, ctx, refusal, Vec::new(), false).await?;
            return Ok(Action::requeue(BLOCKED_RECHECK));
        }
    };
    let children = match render::build(exp, &plan, &datastores, &ctx.build, &mounts, ctx.now()) {
        Ok(children) => children,
        Err(e) => {
            // E.g. an account key that is not base64: the datastore's to fix, not the spec's.
            let refusal = Step::refused(Phase::Pending, "DatastoreInvalid", e.to_string());
            update(exp, ctx, refusal, Vec::new(), false).await?;
            return Ok(Action::requeue(BLOCKED_RECHECK));
        }
    };
    if let Err(refusal) = apply_run(exp, ctx, &children).await? {
        let retry = refusal.phase != Phase::Failed;
        update(exp, ctx, refusal, Vec::new(), false).await?;
        return Ok(if retry {
            Action::requeue(retry_after(exp, ctx.now()))
        } else {
            Action::await_change()
        });
    }
    let step = Step::new(
        Phase::Pending,
        "Created",
        format!(
            "created Job {} ({} download(s), {} mount(s), {} upload(s)); waiting for its pod to start",
            render::run_job_name(exp),
            plan.downloads.len(),
            plan.mounts.len(),
            plan.uploads.len()
        ),
    );
    // How each mount is mounted, and why, is decided here once: the status keeps it.
    let records = render::mount_records(&plan, &mounts);
    write_status(exp, ctx, step, Vec::new(), true, Some(records)).await?;
    Ok(Action::requeue(ACTIVE_RECHECK))
}

/// What decides how the plan's mounts are mounted: whether the CSIDrivers their datastores need
/// exist, and the namespace's Pod Security level. Nothing is asked without mounts (nor for the
/// file driver, without Azure Files datastores). A CSIDriver the controller may not read is "not
/// known" (with a warning): the choice then says it was not checked. `labels` are the namespace's
/// labels when resolving already read them.
async fn mount_environment(
    exp: &Experiment,
    ctx: &Context,
    plan: &ExecutionPlan,
    datastores: &BTreeMap<String, StoreConfig>,
    labels: Option<BTreeMap<String, String>>,
) -> Result<MountEnvironment, ReconcileError> {
    let namespace = exp.namespace().unwrap_or_default();
    let mut env = MountEnvironment {
        namespace: namespace.clone(),
        ..MountEnvironment::default()
    };
    let (blob, file) = drivers_needed(plan, datastores);
    if blob {
        env.blob_csi = csi_driver_exists(exp, ctx, render::BLOB_CSI_DRIVER).await?;
    }
    if file {
        env.file_csi = csi_driver_exists(exp, ctx, render::FILE_CSI_DRIVER).await?;
    }
    if plan.mounts.is_empty() {
        return Ok(env);
    }
    let labels = match labels {
        Some(labels) => labels,
        None => {
            let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
            namespaces.get(&namespace).await?.labels().clone()
        }
    };
    env.pod_security_enforce = labels.get(render::POD_SECURITY_ENFORCE_LABEL).cloned();
    Ok(env)
}

/// Which CSIDrivers the plan needs to know about: `blob.csi.azure.com` for mounts of Azure Blob
/// containers, `file.csi.azure.com` for any use of an Azure Files share (mounts, and the agent
/// containers of downloads and uploads, which reach a share through the same inline volume).
fn drivers_needed(
    plan: &ExecutionPlan,
    datastores: &BTreeMap<String, StoreConfig>,
) -> (bool, bool) {
    let kind = |name: &str| datastores.get(name);
    let blob = plan
        .mounts
        .iter()
        .any(|m| matches!(kind(&m.datastore), Some(StoreConfig::AzureBlob(_))));
    let file = plan
        .mounts
        .iter()
        .map(|m| &m.datastore)
        .chain(plan.code.iter().map(|t| &t.datastore))
        .chain(plan.downloads.iter().map(|t| &t.datastore))
        .chain(plan.uploads.iter().map(|t| &t.datastore))
        .any(|name| matches!(kind(name), Some(StoreConfig::AzureFile(_))));
    (blob, file)
}

/// Whether the cluster has the CSIDriver `name`: `None` when the controller may not read it (its
/// RBAC was trimmed), with a warning in the log. Other failures are retried: the choice made from the
/// answer is final, so it is not made on a guess a retry would have avoided.
async fn csi_driver_exists(
    exp: &Experiment,
    ctx: &Context,
    name: &str,
) -> Result<Option<bool>, ReconcileError> {
    let drivers: Api<CSIDriver> = Api::all(ctx.client.clone());
    match drivers.get_opt(name).await {
        Ok(found) => Ok(Some(found.is_some())),
        Err(kube::Error::Api(status)) if status.code == 403 => {
            tracing::warn!(
                experiment = %exp.name_any(),
                "cannot read CSIDriver {name} ({}): the controller's ClusterRole needs get on csidrivers (storage.k8s.io); the mount driver is chosen without knowing whether the cluster has it",
                status.message
            );
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// The refusal of a plan whose downloads or uploads use an Azure Files share in a cluster known
/// to lack `file.csi.azure.com` (the agent containers mount the share through it; mounts are
/// [`render::choose_drivers`]'s). It waits, like a missing CSIDriver for a mount.
fn missing_file_driver(
    plan: &ExecutionPlan,
    datastores: &BTreeMap<String, StoreConfig>,
    env: &MountEnvironment,
) -> Option<Step> {
    if env.file_csi != Some(false) {
        return None;
    }
    let transfer = plan
        .code
        .iter()
        .chain(&plan.downloads)
        .chain(&plan.uploads)
        .find(|t| {
            matches!(
                datastores.get(&t.datastore),
                Some(StoreConfig::AzureFile(_))
            )
        })?;
    Some(Step::refused(
        Phase::Pending,
        "CsiDriverMissing",
        format!(
            "{}: datastore {} is an Azure Files share, which the agent containers reach through the CSIDriver {}, and this cluster does not have it; install it (AKS: az aks update --enable-file-driver)",
            if transfer.param == contract::CODE_CONTAINER {
                "spec.code".to_string()
            } else {
                format!("parameter {}", transfer.param)
            },
            transfer.datastore,
            render::FILE_CSI_DRIVER
        ),
    ))
}

/// Applies the run's objects, Secrets first and the Job last. When the apiserver refuses one,
/// what this start applied before it is deleted again, so that the next start begins from
/// nothing (an unbound claim is immutable: a later apply with another size or class would get
/// 422), and the refusal is returned ([`refusal`]); other failures are errors (retried).
async fn apply_run(
    exp: &Experiment,
    ctx: &Context,
    children: &render::Children,
) -> Result<Result<(), Step>, ReconcileError> {
    let ns = exp.namespace().unwrap_or_default();
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), &ns);
    let pvcs = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &ns);
    let mut applied_secrets = Vec::new();
    let mut applied_pvc = None;
    let failed = 'apply: {
        for secret in children.credentials.iter().chain(&children.volume_secrets) {
            if let Err(e) = apply(&secrets, secret).await {
                break 'apply e;
            }
            applied_secrets.push(secret.name_any());
        }
        if let Some(pvc) = &children.outputs {
            if let Err(e) = apply(&pvcs, pvc).await {
                break 'apply e;
            }
            applied_pvc = Some(pvc.name_any());
        }
        match apply(
            &Api::<Job>::namespaced(ctx.client.clone(), &ns),
            &children.run,
        )
        .await
        {
            Ok(_) => return Ok(Ok(())),
            Err(e) => e,
        }
    };
    let step = refusal(failed, "the run's objects", Phase::Pending)?;
    for name in &applied_secrets {
        delete_if_present(&secrets, name).await?;
    }
    if let Some(name) = &applied_pvc {
        delete_if_present(&pvcs, name).await?;
    }
    Ok(Err(step))
}

/// What the apiserver refusing to apply `what` means. 403 is the cluster's to fix (a
/// ResourceQuota or LimitRange, the operator's RBAC), never the spec's alone: the experiment
/// waits in `waiting` (reason `QuotaExceeded` or `Forbidden`) and is tried again with backoff
/// ([`retry_after`]). 400 and 422 (the object is invalid) are the spec's: `InvalidJob`, tried
/// again when the spec changes. Other failures are errors, retried.
fn refusal(e: kube::Error, what: &str, waiting: Phase) -> Result<Step, ReconcileError> {
    match e {
        kube::Error::Api(status) if status.code == 403 => {
            let reason = if status.message.contains("exceeded quota") {
                "QuotaExceeded"
            } else {
                "Forbidden"
            };
            // The apiserver gives no reason when an apply is refused the `create` it needs
            // (`<resource> "<name>" is forbidden: `, nothing after): say what it means.
            let message = if status.message.trim_end().ends_with("forbidden:") {
                format!(
                    "{} (no reason given: an apply that creates an object is authorized as create, so the operator's ClusterRole needs create on it besides patch)",
                    status.message.trim_end()
                )
            } else {
                status.message
            };
            Ok(Step::refused(
                waiting,
                reason,
                format!(
                    "the cluster refused {what}: {message}; tried again with backoff until an admin raises the quota or grants the permission"
                ),
            ))
        }
        kube::Error::Api(status) if matches!(status.code, 400 | 422) => Ok(Step::refused(
            Phase::Failed,
            "InvalidJob",
            format!(
                "the cluster refused {what}: {}; fix the spec and it is tried again",
                status.message
            ),
        )),
        other => Err(ReconcileError::Kube(other)),
    }
}

/// How long an experiment the cluster refuses waits before it is tried again: as long as it has
/// been refused already (backoff without a counter), at least 10 s and at most 5 minutes.
pub fn retry_after(exp: &Experiment, now: chrono::DateTime<chrono::Utc>) -> Duration {
    let since = exp
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == progress::ACCEPTED))
        .filter(|c| c.status == "False")
        .map(|c| now.timestamp() - c.last_transition_time.0.as_second())
        .map(|seconds| Duration::from_secs(seconds.max(0) as u64))
        .unwrap_or_default();
    since.clamp(REFUSED_RETRY_MIN, REFUSED_RETRY_MAX)
}

/// The bounds of [`retry_after`].
pub const REFUSED_RETRY_MIN: Duration = Duration::from_secs(10);
pub const REFUSED_RETRY_MAX: Duration = Duration::from_secs(300);

/// Moves an experiment whose run Job exists one step on.
async fn follow(exp: &Experiment, ctx: &Context, run: &Job) -> Result<Action, ReconcileError> {
    let ns = exp.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let run_pods = job_pods(&pods, &render::run_job_name(exp)).await?;
    let inputs = record_inputs(exp, ctx, &run_pods).await?;
    // The code download is a download step too.
    let downloads = count(exp, Mode::Download) + usize::from(exp.spec.code.is_some());
    let uploads = count(exp, Mode::Upload);

    let run_ok = match progress::outcome(run) {
        Outcome::Active => {
            let waiting = not_started(ctx, run, &run_pods).await?;
            if let Some(NotStarted {
                why,
                timed_out: true,
                ..
            }) = &waiting
            {
                return give_up_run(exp, ctx, run, &run_pods, why, inputs).await;
            }
            let why = waiting.as_ref().and_then(|w| w.why.clone());
            let step = match progress::run_step(&run_pods, downloads) {
                RunStep::Pending => Step::new(
                    Phase::Pending,
                    "Created",
                    match &why {
                        Some(why) => format!("waiting for the run's pod to start: {why}"),
                        None => "waiting for the run's pod to start".to_string(),
                    },
                ),
                RunStep::Downloading { done, total } => Step::new(
                    Phase::Downloading,
                    "Downloading",
                    match &why {
                        Some(why) => {
                            format!("downloading inputs: {done} of {total} done; waiting: {why}")
                        }
                        None => format!("downloading inputs: {done} of {total} done"),
                    },
                ),
                RunStep::Running => Step::new(Phase::Running, "Running", "the script is running"),
            };
            update(exp, ctx, step, inputs, true).await?;
            return Ok(Action::requeue(recheck(waiting.as_ref())));
        }
        Outcome::Succeeded => Ok(()),
        Outcome::Failed(why) => {
            let mut lines = progress::failures(&run_pods);
            if lines.is_empty() {
                lines.push(why);
            }
            Err(lines.join("; "))
        }
    };

    let upload_due =
        uploads > 0 && (run_ok.is_ok() || exp.spec.upload_policy == UploadPolicy::Always);
    if !upload_due {
        let step = match run_ok {
            Ok(()) => Step::new(Phase::Succeeded, "Succeeded", "the script succeeded"),
            Err(why) if uploads > 0 => Step::new(
                Phase::Failed,
                "RunFailed",
                format!(
                    "the run failed: {why}; its outputs were not uploaded (uploadPolicy OnSuccess) and are kept on PersistentVolumeClaim {}",
                    render::outputs_name(exp)
                ),
            ),
            Err(why) => Step::new(Phase::Failed, "RunFailed", format!("the run failed: {why}")),
        };
        update(exp, ctx, step, inputs, true).await?;
        return Ok(Action::await_change());
    }

    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(upload) = jobs.get_opt(&render::upload_job_name(exp)).await? else {
        return start_upload(exp, ctx, inputs).await;
    };
    let after_run = match &run_ok {
        Ok(()) => "the script succeeded".to_string(),
        Err(why) => format!("the run failed ({why})"),
    };
    match progress::outcome(&upload) {
        Outcome::Active => {
            let upload_pods = job_pods(&pods, &render::upload_job_name(exp)).await?;
            let waiting = not_started(ctx, &upload, &upload_pods).await?;
            let outputs = render::outputs_name(exp);
            if let Some(NotStarted {
                why,
                timed_out: true,
                ..
            }) = &waiting
            {
                suspend(&jobs, &render::upload_job_name(exp)).await?;
                let step = Step::new(
                    Phase::Failed,
                    "UploadFailed",
                    format!(
                        "{after_run}; the upload pod did not start within {}: {}; Job {} is suspended and the outputs are kept on PersistentVolumeClaim {outputs}",
                        super::format_duration(ctx.start_timeout),
                        why.as_deref().unwrap_or("Kubernetes gave no reason"),
                        render::upload_job_name(exp),
                    ),
                );
                update(exp, ctx, step, inputs, true).await?;
                return Ok(Action::await_change());
            }
            let step = Step::new(
                Phase::Uploading,
                "Uploading",
                match waiting.as_ref().and_then(|w| w.why.as_deref()) {
                    Some(why) => format!("{after_run}; waiting for the upload pod to start: {why}"),
                    None => format!("{after_run}; uploading its outputs"),
                },
            );
            update(exp, ctx, step, inputs, true).await?;
            Ok(Action::requeue(recheck(waiting.as_ref())))
        }
        Outcome::Succeeded => {
            let upload_pods = job_pods(&pods, &render::upload_job_name(exp)).await?;
            // Decided once, from the upload pods' reports, before those pods are deleted
            // (below): a pass after a restart half-way trusts the decision in the status.
            let decided = progress::succeeded_reason(exp) == Some(OUTPUTS_UPLOADED);
            let skipped = progress::skipped_outputs(&upload_pods);
            let uploaded = super::metrics::uploaded_bytes(&upload_pods);
            if skipped > 0 && !decided {
                // This run's versions of those files exist only on the volume: keep it.
                let step = Step::new(
                    if run_ok.is_ok() { Phase::Succeeded } else { Phase::Failed },
                    "OutputsSkipped",
                    format!(
                        "{after_run}; {skipped} output file(s) already existed in the datastore and were kept as they were (the upload reference does not set overwrite); this run's versions stay on PersistentVolumeClaim {}",
                        render::outputs_name(exp)
                    ),
                )
                .warning();
                update(exp, ctx, step, inputs, true).await?;
                ctx.metrics.uploaded(uploaded);
                return Ok(Action::await_change());
            }
            let mut exp = exp.clone();
            if !decided {
                let step = Step::new(
                    Phase::Uploading,
                    OUTPUTS_UPLOADED,
                    format!(
                        "{after_run}; its outputs were uploaded: removing the finished pods and PersistentVolumeClaim {}",
                        render::outputs_name(&exp)
                    ),
                );
                exp.status = Some(update(&exp, ctx, step, inputs.clone(), true).await?);
            }
            // A claim stays (Terminating, its disk billed) while any pod that names it exists,
            // whatever its phase (the pvc-protection controller): the finished pods go first.
            // A finished Job creates no new pods, and the Jobs stay as the run's record.
            for pod in run_pods.iter().chain(&upload_pods) {
                delete_if_present(&pods, &pod.name_any()).await?;
            }
            let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
            delete_if_present(&pvcs, &render::outputs_name(&exp)).await?;
            let step = match run_ok {
                Ok(()) => Step::new(
                    Phase::Succeeded,
                    "Succeeded",
                    "the script succeeded and its outputs were uploaded",
                ),
                Err(_) => Step::new(
                    Phase::Failed,
                    "RunFailed",
                    format!("{after_run}; its outputs were uploaded (uploadPolicy Always)"),
                ),
            };
            update(&exp, ctx, step, inputs, true).await?;
            // After the write that finishes the Experiment: a pass that failed before it counts once.
            ctx.metrics.uploaded(uploaded);
            Ok(Action::await_change())
        }
        Outcome::Failed(why) => {
            let upload_pods = job_pods(&pods, &render::upload_job_name(exp)).await?;
            let mut lines = progress::failures(&upload_pods);
            if lines.is_empty() {
                lines.push(why);
            }
            let step = Step::new(
                Phase::Failed,
                "UploadFailed",
                format!(
                    "{after_run}; uploading its outputs failed: {}; they are kept on PersistentVolumeClaim {}",
                    lines.join("; "),
                    render::outputs_name(exp)
                ),
            );
            update(exp, ctx, step, inputs, true).await?;
            Ok(Action::await_change())
        }
    }
}

/// A Job whose pod has not started: why (from the pod's statuses, else the newest Warning
/// event about the pod or, without a pod, the Job), and whether it has waited longer than
/// the operator's start timeout.
struct NotStarted {
    why: Option<String>,
    timed_out: bool,
    /// How much of the start timeout is left.
    left: Duration,
}

/// Whether `job`'s pod is waiting to start (see [`progress::waiting_since`]), and why.
async fn not_started(
    ctx: &Context,
    job: &Job,
    pods: &[Pod],
) -> Result<Option<NotStarted>, ReconcileError> {
    let Some(since) = progress::waiting_since(job, pods) else {
        return Ok(None);
    };
    let waited = Duration::from_secs((ctx.now().timestamp() - since.as_second()).max(0) as u64);
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
    Ok(Some(NotStarted {
        why,
        timed_out: waited >= ctx.start_timeout,
        left: ctx.start_timeout.saturating_sub(waited),
    }))
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
                crate::plan::contract::truncate(e.message.as_deref().unwrap_or_default(), 512)
            )
        }))
}

/// When to look again at a Job whose pod may not have started: at the end of its start
/// timeout at the latest.
fn recheck(waiting: Option<&NotStarted>) -> Duration {
    match waiting {
        Some(w) => ACTIVE_RECHECK.min(w.left + Duration::from_secs(1)),
        None => ACTIVE_RECHECK,
    }
}

/// The run's pod did not start within the start timeout: the Job is suspended (its pods go,
/// it stays as the record), the outputs claim goes when no script ever ran on it, and the
/// experiment fails saying why.
async fn give_up_run(
    exp: &Experiment,
    ctx: &Context,
    run: &Job,
    run_pods: &[Pod],
    why: &Option<String>,
    inputs: Vec<InputRecord>,
) -> Result<Action, ReconcileError> {
    let ns = exp.namespace().unwrap_or_default();
    suspend(&Api::namespaced(ctx.client.clone(), &ns), &run.name_any()).await?;
    let script_ran = run_pods.iter().any(|p| {
        p.status
            .iter()
            .flat_map(|s| s.container_statuses.iter().flatten())
            .any(|c| {
                c.name == contract::MAIN_CONTAINER
                    && c.state.as_ref().is_some_and(|s| s.waiting.is_none())
            })
    });
    if count(exp, Mode::Upload) > 0 && !script_ran {
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
        delete_if_present(&pvcs, &render::outputs_name(exp)).await?;
    }
    let step = Step::new(
        Phase::Failed,
        "StartTimeout",
        format!(
            "the run's pod did not start within {}: {}; Job {} is suspended",
            super::format_duration(ctx.start_timeout),
            why.as_deref().unwrap_or("Kubernetes gave no reason"),
            run.name_any()
        ),
    );
    update(exp, ctx, step, inputs, true).await?;
    Ok(Action::await_change())
}

/// Suspends the Job `name`: the Job controller deletes its pods and creates none.
async fn suspend(jobs: &Api<Job>, name: &str) -> Result<(), kube::Error> {
    let patch = serde_json::json!({"spec": {"suspend": true}});
    jobs.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

/// Deletes `name`; one already gone is fine.
async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<(), kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// The pods of the Job `job`.
async fn job_pods(pods: &Api<Pod>, job: &str) -> Result<Vec<Pod>, kube::Error> {
    let selector = format!("{JOB_NAME_LABEL}={job}");
    Ok(pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items)
}

/// Applies the upload Job with freshly minted credentials: the run may have outlived the ones
/// minted at its start.
async fn start_upload(
    exp: &Experiment,
    ctx: &Context,
    inputs: Vec<InputRecord>,
) -> Result<Action, ReconcileError> {
    let ns = exp.namespace().unwrap_or_default();
    let built = match plan_with_datastores(exp, ctx, &mut None).await? {
        Ok((plan, datastores)) => upload_children(exp, plan, &datastores, &ctx.build, ctx.now())
            .map_err(|e| Step::refused(Phase::Uploading, "DatastoreInvalid", e.to_string())),
        Err(refusal) => Err(refusal),
    };
    let children = match built {
        Ok(children) => children,
        Err(refusal) => {
            // The outputs wait on their volume until the datastore is usable again.
            let waiting = Step::refused(
                Phase::Uploading,
                refusal.reason.as_str(),
                format!(
                    "the outputs cannot be uploaded yet: {}; they wait on PersistentVolumeClaim {}",
                    refusal.message,
                    render::outputs_name(exp)
                ),
            );
            update(exp, ctx, waiting, inputs, true).await?;
            return Ok(Action::requeue(BLOCKED_RECHECK));
        }
    };
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), &ns);
    let upload = children
        .upload
        .as_ref()
        .expect("a plan with uploads builds an upload Job");
    // Only the volumes' Secrets the upload Job reads (an Azure Files share's, for one): the run's
    // mounts are over.
    let needed = referenced_secrets(upload);
    let volume_secrets = children
        .volume_secrets
        .iter()
        .filter(|s| s.metadata.name.as_ref().is_some_and(|n| needed.contains(n)));
    let applied = 'apply: {
        for secret in children.credentials.iter().chain(volume_secrets) {
            if let Err(e) = apply(&secrets, secret).await {
                break 'apply Err(e);
            }
        }
        apply(&Api::<Job>::namespaced(ctx.client.clone(), &ns), upload).await
    };
    if let Err(e) = applied {
        // The spec was accepted when the run started: whatever the cluster refuses now, the
        // outputs wait on their volume and the upload is tried again.
        let mut step = refusal(e, "the upload Job", Phase::Uploading)?;
        step.phase = Phase::Uploading;
        step.message = format!(
            "{}; the outputs wait on PersistentVolumeClaim {}",
            step.message,
            render::outputs_name(exp)
        );
        update(exp, ctx, step, inputs, true).await?;
        return Ok(Action::requeue(retry_after(exp, ctx.now())));
    }
    let step = Step::new(
        Phase::Uploading,
        "Uploading",
        format!(
            "created Job {}: uploading the outputs",
            render::upload_job_name(exp)
        ),
    );
    update(exp, ctx, step, inputs, true).await?;
    Ok(Action::requeue(ACTIVE_RECHECK))
}

/// The children built again for the upload Job, without the run's mounts: the upload Job
/// mounts none of them, and rendering them again could only fail (an operator restarted without
/// its blobfuse2 image) or mint Secrets nobody reads.
fn upload_children(
    exp: &Experiment,
    mut plan: ExecutionPlan,
    datastores: &BTreeMap<String, StoreConfig>,
    ctx: &render::BuildContext,
    now: chrono::DateTime<chrono::Utc>,
) -> crate::error::Result<render::Children> {
    plan.mounts.clear();
    render::build(exp, &plan, datastores, ctx, &[], now)
}

/// The names of the Secrets a Job's pods read: volumes (secret, projected, and CSI: the Azure
/// drivers' `secretName` volume attribute or a `nodePublishSecretRef`) and environment.
fn referenced_secrets(job: &Job) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let Some(pod) = job.spec.as_ref().and_then(|s| s.template.spec.as_ref()) else {
        return names;
    };
    for volume in pod.volumes.iter().flatten() {
        names.extend(volume.secret.as_ref().and_then(|s| s.secret_name.clone()));
        if let Some(csi) = &volume.csi {
            names.extend(csi.node_publish_secret_ref.as_ref().map(|r| r.name.clone()));
            names.extend(
                csi.volume_attributes
                    .as_ref()
                    .and_then(|a| a.get("secretName"))
                    .cloned(),
            );
        }
        for source in volume
            .projected
            .iter()
            .flat_map(|p| p.sources.iter().flatten())
        {
            names.extend(source.secret.as_ref().map(|s| s.name.clone()));
        }
    }
    for container in pod.init_containers.iter().flatten().chain(&pod.containers) {
        for var in container.env.iter().flatten() {
            names.extend(
                var.value_from
                    .as_ref()
                    .and_then(|v| v.secret_key_ref.as_ref())
                    .map(|r| r.name.clone()),
            );
        }
        for from in container.env_from.iter().flatten() {
            names.extend(from.secret_ref.as_ref().map(|r| r.name.clone()));
        }
    }
    names
}

fn count(exp: &Experiment, mode: Mode) -> usize {
    exp.spec
        .script_params
        .iter()
        .filter(|p| p.data_reference.as_ref().is_some_and(|r| r.mode == mode))
        .count()
}

/// The inputs record, completed from the pods' download reports when they hold new ones (this
/// needs the plan, so the datastores are resolved only then).
async fn record_inputs(
    exp: &Experiment,
    ctx: &Context,
    run_pods: &[Pod],
) -> Result<Vec<InputRecord>, ReconcileError> {
    let recorded = exp
        .status
        .as_ref()
        .map(|s| s.inputs.clone())
        .unwrap_or_default();
    let downloads = count(exp, Mode::Download);
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
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    if recorded.len() >= downloads || reported <= recorded.len() {
        return Ok(recorded);
    }
    match plan_with_datastores(exp, ctx, &mut None).await? {
        Ok((plan, _)) => Ok(progress::inputs(run_pods, &plan.downloads)),
        Err(refusal) => {
            tracing::warn!(experiment = %exp.name_any(), reason = %refusal.reason, "cannot record the inputs: {}", refusal.message);
            Ok(recorded)
        }
    }
}

/// The experiment's datastores resolved and its plan; or the refusal saying why there is none.
/// `namespace_labels` keeps the namespace's labels if resolving read them.
async fn plan_with_datastores(
    exp: &Experiment,
    ctx: &Context,
    namespace_labels: &mut Option<BTreeMap<String, String>>,
) -> Result<Result<(ExecutionPlan, BTreeMap<String, StoreConfig>), Step>, ReconcileError> {
    let datastores = match resolve_datastores(exp, ctx, namespace_labels).await? {
        Ok(datastores) => datastores,
        Err(refusal) => return Ok(Err(refusal)),
    };
    Ok(
        match plan::plan(&exp.spec, &store::capabilities(&datastores), CLUSTER) {
            Ok(plan) => Ok((plan, datastores)),
            Err(e) => Err(Step::refused(Phase::Failed, e.reason(), e.to_string())),
        },
    )
}

/// Every datastore the experiment references, resolved with its credentials. A missing one, one
/// that does not allow this namespace, or one with unusable credentials is a refusal (the
/// experiment waits, Pending); apiserver failures are errors (retried).
async fn resolve_datastores(
    exp: &Experiment,
    ctx: &Context,
    namespace_labels: &mut Option<BTreeMap<String, String>>,
) -> Result<Result<BTreeMap<String, StoreConfig>, Step>, ReconcileError> {
    let ns = exp.namespace().unwrap_or_default();
    let scope = Scope {
        namespace: ns.clone(),
        operator_namespace: ctx.operator_namespace.clone(),
    };
    let mut resolved = BTreeMap::new();
    for (user, name) in exp.spec.datastore_uses() {
        let Some(found) = resolve::find(ctx.client.clone(), name, &ns)
            .await
            .map_err(ReconcileError::Resolve)?
        else {
            return Ok(Err(Step::refused(
                Phase::Pending,
                "DatastoreNotFound",
                format!(
                    "{user} refers to datastore {name}, which is neither a Datastore in namespace {ns} nor a ClusterDatastore; create it and the experiment starts"
                ),
            )));
        };
        if let Found::Cluster(cds) = &found
            && let Some(selector) = &cds.spec.allowed_namespaces
        {
            if namespace_labels.is_none() {
                let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
                *namespace_labels = Some(namespaces.get(&ns).await?.labels().clone());
            }
            let labels = namespace_labels.as_ref().expect("just read");
            let allowed = match Selector::try_from(selector.clone()) {
                Ok(selector) => selector.matches(labels),
                Err(e) => {
                    return Ok(Err(Step::refused(
                        Phase::Pending,
                        "DatastoreInvalid",
                        format!(
                            "ClusterDatastore {name} has an invalid allowedNamespaces selector ({e}); ask its owners to fix it"
                        ),
                    )));
                }
            };
            if !allowed {
                return Ok(Err(Step::refused(
                    Phase::Pending,
                    "DatastoreNotAllowed",
                    format!(
                        "{user} refers to ClusterDatastore {name}, whose allowedNamespaces does not select namespace {ns}; ask its owners to allow this namespace, or use another datastore"
                    ),
                )));
            }
        }
        match resolve::resolve_found(ctx.client.clone(), &found, &scope).await {
            Ok(r) => {
                resolved.insert(name.to_string(), r.config);
            }
            Err(Error::Config(message)) => {
                return Ok(Err(Step::refused(
                    Phase::Pending,
                    "DatastoreInvalid",
                    message,
                )));
            }
            Err(e) => return Err(ReconcileError::Resolve(e)),
        }
    }
    Ok(Ok(resolved))
}

/// Server-side apply as the operator, taking over fields another manager set.
async fn apply<K>(api: &Api<K>, object: &K) -> Result<K, kube::Error>
where
    K: Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let name = object.meta().name.clone().expect("built objects are named");
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
}

/// Writes the status `step` leads to, if it differs from the current one, and publishes an event
/// when the step is new (a new phase or reason, or a new refusal).
async fn update(
    exp: &Experiment,
    ctx: &Context,
    step: Step,
    inputs: Vec<InputRecord>,
    started: bool,
) -> Result<ExperimentStatus, ReconcileError> {
    write_status(exp, ctx, step, inputs, started, None).await
}

/// [`update`], also recording how the mounts are mounted (`Some` only when the run starts).
async fn write_status(
    exp: &Experiment,
    ctx: &Context,
    step: Step,
    inputs: Vec<InputRecord>,
    started: bool,
    mounts: Option<Vec<MountRecord>>,
) -> Result<ExperimentStatus, ReconcileError> {
    let current = exp.status.clone().unwrap_or_default();
    let now = Time(ctx.now_k8s());
    let mut next = progress::next_status(
        &current,
        exp.metadata.generation,
        &step,
        inputs,
        started,
        &now,
    );
    if let Some(mounts) = mounts {
        next.mounts = mounts;
    }
    if next == current {
        return Ok(next);
    }
    let api: Api<Experiment> =
        Api::namespaced(ctx.client.clone(), &exp.namespace().unwrap_or_default());
    super::apply_status(&api, &exp.name_any(), &next).await?;
    ctx.metrics.status_written(&current, &next);
    if is_new_step(&current, &next) {
        let failed = step.warning || step.phase == Phase::Failed;
        let event = Event {
            type_: if failed {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: step.reason.clone(),
            note: Some(crate::plan::contract::truncate(&step.message, 1024).to_string()),
            action: if step.refused.is_some() {
                "Validate"
            } else {
                "Run"
            }
            .to_string(),
            secondary: None,
        };
        // An event is a courtesy: failing to publish one must not stop the run.
        if let Err(e) = ctx.recorder.publish(&event, &exp.object_ref(&())).await {
            tracing::warn!(experiment = %exp.name_any(), error = %e, "cannot publish an event");
        }
    }
    Ok(next)
}

/// A new phase, a new reason, or a refusal with a new message (progress within a phase, like
/// "1 of 2 downloads done", is not an event).
fn is_new_step(current: &ExperimentStatus, next: &ExperimentStatus) -> bool {
    let key = |s: &ExperimentStatus| {
        let succeeded = s.conditions.iter().find(|c| c.type_ == progress::SUCCEEDED);
        let accepted = s.conditions.iter().find(|c| c.type_ == progress::ACCEPTED);
        (
            s.phase,
            succeeded.map(|c| c.reason.clone()),
            accepted
                .filter(|c| c.status == "False")
                .map(|c| c.message.clone()),
        )
    };
    key(current) != key(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ExperimentSpec, MountDriver};
    use crate::render::MountChoice;
    use crate::store::{AzureBlobConfig, AzureCredential, AzureFileConfig, Secret as Key};

    fn datastores() -> BTreeMap<String, StoreConfig> {
        let key = || AzureCredential::AccountKey(Key::new("a2V5"));
        BTreeMap::from([
            (
                "blob-ds".to_string(),
                StoreConfig::AzureBlob(AzureBlobConfig {
                    account: "mlstorage".into(),
                    container: "data".into(),
                    endpoint: url::Url::parse("https://mlstorage.blob.core.windows.net").unwrap(),
                    credential: key(),
                    credential_source: "test".into(),
                    read_only: false,
                }),
            ),
            (
                "share-ds".to_string(),
                StoreConfig::AzureFile(AzureFileConfig {
                    account: "mlstorage".into(),
                    share: "datasets".into(),
                    credential: key(),
                    credential_source: "test".into(),
                    read_only: false,
                }),
            ),
        ])
    }

    fn plan_of(params: &str) -> ExecutionPlan {
        let spec: ExperimentSpec = serde_saphyr::from_str(&format!(
            "image: python:3.12-slim\nentryScript: train.py\nscriptParams:\n{params}"
        ))
        .unwrap();
        plan::plan(&spec, &crate::store::capabilities(&datastores()), CLUSTER).unwrap()
    }

    fn reference(name: &str, datastore: &str, mode: &str) -> String {
        format!(
            "  - name: {name}\n    dataReference: {{datastore: {datastore}, path: p, mode: {mode}}}\n"
        )
    }

    #[test]
    fn a_refusal_is_retried_later_the_longer_it_lasts() {
        let now = chrono::Utc::now();
        let refused_since = |seconds_ago: i64| {
            let spec: ExperimentSpec =
                serde_saphyr::from_str("image: i\nentryScript: train.py\n").unwrap();
            let mut exp = Experiment::new("train", spec);
            let step = Step::refused(Phase::Pending, "QuotaExceeded", "exceeded quota");
            let then = Time(
                k8s_openapi::jiff::Timestamp::from_second(now.timestamp() - seconds_ago).unwrap(),
            );
            exp.status = Some(progress::next_status(
                &ExperimentStatus::default(),
                Some(1),
                &step,
                Vec::new(),
                false,
                &then,
            ));
            retry_after(&exp, now)
        };
        assert_eq!(refused_since(0), REFUSED_RETRY_MIN);
        assert_eq!(refused_since(90), Duration::from_secs(90));
        assert_eq!(refused_since(3600), REFUSED_RETRY_MAX);
        // Not refused before (Accepted True, or no status): the shortest wait.
        let spec: ExperimentSpec =
            serde_saphyr::from_str("image: i\nentryScript: train.py\n").unwrap();
        assert_eq!(
            retry_after(&Experiment::new("train", spec), now),
            REFUSED_RETRY_MIN
        );
    }

    #[test]
    fn only_the_drivers_the_plan_needs_are_looked_up() {
        let stores = datastores();
        let needed = |params: &str| drivers_needed(&plan_of(params), &stores);
        assert_eq!(
            needed(&reference("--in", "blob-ds", "download")),
            (false, false),
            "downloads of a container need no CSI driver"
        );
        assert_eq!(
            needed(&reference("--in", "blob-ds", "mount")),
            (true, false)
        );
        assert_eq!(
            needed(&reference("--in", "share-ds", "mount")),
            (false, true)
        );
        // The agent containers reach a share through file.csi.azure.com too.
        assert_eq!(
            needed(&reference("--out", "share-ds", "upload")),
            (false, true)
        );
        assert_eq!(
            needed(
                &(reference("--in", "blob-ds", "mount")
                    + &reference("--d", "share-ds", "download"))
            ),
            (true, true)
        );
    }

    #[test]
    fn transfers_of_a_share_wait_for_the_file_driver() {
        let stores = datastores();
        let env = |file_csi| MountEnvironment {
            file_csi,
            namespace: "ml".into(),
            ..MountEnvironment::default()
        };
        let plan = plan_of(
            &(reference("--in", "blob-ds", "download") + &reference("--out", "share-ds", "upload")),
        );
        let refusal = missing_file_driver(&plan, &stores, &env(Some(false))).unwrap();
        assert_eq!(refusal.phase, Phase::Pending);
        assert_eq!(refusal.reason, "CsiDriverMissing");
        assert!(
            refusal.message.starts_with(
                "parameter --out: datastore share-ds is an Azure Files share, which the agent containers reach through the CSIDriver file.csi.azure.com"
            ) && refusal.message.contains("az aks update --enable-file-driver"),
            "{}",
            refusal.message
        );
        // Present, or not known (the ClusterRole was trimmed): tried.
        assert_eq!(missing_file_driver(&plan, &stores, &env(Some(true))), None);
        assert_eq!(missing_file_driver(&plan, &stores, &env(None)), None);
        // Without a share, a missing file driver does not matter.
        let blob_only = plan_of(&reference("--in", "blob-ds", "download"));
        assert_eq!(
            missing_file_driver(&blob_only, &stores, &env(Some(false))),
            None
        );
    }

    #[test]
    fn the_upload_rebuild_leaves_the_mounts_out() {
        let stores = datastores();
        let params =
            reference("--in", "blob-ds", "mount") + &reference("--out", "blob-ds", "upload");
        let plan = plan_of(&params);
        let spec: ExperimentSpec = serde_saphyr::from_str(&format!(
            "image: python:3.12-slim\nentryScript: train.py\nscriptParams:\n{params}"
        ))
        .unwrap();
        let mut exp = Experiment::new("train", spec);
        exp.metadata.namespace = Some("ml".into());
        exp.metadata.uid = Some("uid-1".into());
        // The run used the sidecar; the operator has since lost its blobfuse2 image, so building
        // the mount again fails...
        let ctx = render::BuildContext::default();
        let sidecar = MountChoice {
            driver: MountDriver::Sidecar,
            reason: "requested by the reference (mountDriver: sidecar)".into(),
        };
        let now = chrono::Utc::now();
        assert!(render::build(&exp, &plan, &stores, &ctx, &[sidecar], now).is_err());
        // ...but the upload needs none of it.
        let children = upload_children(&exp, plan, &stores, &ctx, now).unwrap();
        assert!(children.upload.is_some());
        assert!(children.volume_secrets.is_empty());
    }

    #[test]
    fn the_secrets_a_job_reads_are_found_in_volumes_and_environment() {
        let job: Job = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "train-upload"},
            "spec": {"template": {"spec": {
                "restartPolicy": "Never",
                "volumes": [
                    {"name": "credentials", "secret": {"secretName": "train-credentials"}},
                    {"name": "share", "csi": {
                        "driver": "file.csi.azure.com",
                        "volumeAttributes": {"shareName": "datasets", "secretName": "train-share-0"},
                    }},
                    {"name": "other", "csi": {
                        "driver": "example.csi.k8s.io",
                        "nodePublishSecretRef": {"name": "node-publish"},
                    }},
                    {"name": "projected", "projected": {"sources": [{"secret": {"name": "p"}}]}},
                    {"name": "scratch", "emptyDir": {}},
                ],
                "initContainers": [{"name": "i", "envFrom": [{"secretRef": {"name": "from"}}]}],
                "containers": [{"name": "c", "env": [
                    {"name": "A", "valueFrom": {"secretKeyRef": {"name": "env", "key": "k"}}},
                    {"name": "B", "value": "plain"},
                ]}],
            }}},
        }))
        .unwrap();
        assert_eq!(
            referenced_secrets(&job),
            [
                "env",
                "from",
                "node-publish",
                "p",
                "train-credentials",
                "train-share-0"
            ]
            .map(String::from)
            .into()
        );
    }
}
