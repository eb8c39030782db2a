//! Reconciling an Experiment, as a pipeline: each pass reads the world, decides, acts, and
//! reports, and each step is a module of its own.
//!
//! - before the run: [`dereference`] reads the datastores (with their credentials), the
//!   namespace and the CSIDrivers the plan needs; [`admit`] (pure) plans, chooses each mount's
//!   driver and builds the objects, or refuses saying why and who can lift it; [`apply`] creates
//!   them (the credentials Secret, the volumes' Secrets, the outputs claim, the run Job);
//! - during and after the run: [`observe`] reads the Jobs, their pods and the events that say
//!   why a pod waits; [`decide`] (pure) turns that into one [`decide::Decision`]: report where
//!   the run is, give up on a pod that does not start, create the upload Job, or clean up after
//!   the upload; [`apply`] carries it out;
//! - [`status`] alone writes the status (only when it changes, so an unchanged experiment costs
//!   reads only) and the events.
//!
//! [`progress`] is the pure reading of where a Job and its pods are.

mod admit;
mod apply;
mod decide;
mod dereference;
mod observe;
pub mod progress;
mod status;

use std::sync::Arc;

use kube::runtime::controller::Action;

use super::{Context, ReconcileError};
use crate::api::Experiment;
use admit::Refusal;
use decide::{Decision, Entry};
use status::Record;

pub use decide::{ACTIVE_RECHECK, BLOCKED_RECHECK, REFUSED_RETRY_MAX, REFUSED_RETRY_MIN};
pub use observe::{DEFAULT_PROGRESS_PERIOD, ProgressReads};

/// Why a step of the pipeline stopped: the experiment is refused (its status says why), or a
/// request failed (the pass is retried).
#[derive(Debug)]
enum Stop {
    Refused(Refusal),
    Failed(ReconcileError),
}

impl From<Refusal> for Stop {
    fn from(refusal: Refusal) -> Stop {
        Stop::Refused(refusal)
    }
}

impl From<ReconcileError> for Stop {
    fn from(e: ReconcileError) -> Stop {
        Stop::Failed(e)
    }
}

impl From<kube::Error> for Stop {
    fn from(e: kube::Error) -> Stop {
        Stop::Failed(e.into())
    }
}

/// How many passes in a row must fail before the status says so: one failure may be a blip
/// (an apiserver restarting), the next one is not.
pub const FAILED_PASSES_SHOWN: u32 = 2;

/// The Experiments whose passes fail, with how many times in a row (in memory: a restarted
/// controller counts again). An Experiment leaves it on its next good pass.
#[derive(Debug, Default)]
pub struct Failing(std::sync::Mutex<std::collections::HashMap<String, u32>>);

impl Failing {
    /// One more failed pass of `key`; how many in a row now.
    fn failed(&self, key: &str) -> u32 {
        let mut failing = self.0.lock().expect("not poisoned");
        let count = failing.entry(key.to_string()).or_default();
        *count += 1;
        *count
    }

    fn recovered(&self, key: &str) {
        self.0.lock().expect("not poisoned").remove(key);
    }
}

/// One pass over an Experiment. A pass that fails is retried after [`super::ERROR_RETRY`]; once
/// [`FAILED_PASSES_SHOWN`] have failed in a row, its status and an event say why (written
/// again only when the cause changes), so no failure leaves an Experiment silent.
pub async fn reconcile(exp: Arc<Experiment>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let key = format!(
        "{}/{}",
        kube::ResourceExt::namespace(&*exp).unwrap_or_default(),
        kube::ResourceExt::name_any(&*exp)
    );
    let result = pass(&exp, &ctx).await;
    match &result {
        Ok(_) => ctx.failing.recovered(&key),
        Err(error) => {
            if ctx.failing.failed(&key) >= FAILED_PASSES_SHOWN
                && let Err(e) = status::write_failure(&exp, &ctx, error).await
            {
                tracing::warn!(experiment = %key, error = %e, "cannot say in its status why its reconcile fails");
            }
        }
    }
    result
}

async fn pass(exp: &Experiment, ctx: &Context) -> Result<Action, ReconcileError> {
    let entry = match decide::settled(exp) {
        Some(entry) => entry,
        None => decide::entry(exp, observe::run_job(exp, ctx).await?),
    };
    match entry {
        Entry::Nothing => Ok(Action::await_change()),
        Entry::Start => start(exp, ctx).await,
        Entry::Follow(run) => follow(exp, ctx, *run).await,
        Entry::Report {
            step,
            started,
            then,
        } => {
            let record = Record {
                started,
                ..Record::default()
            };
            status::write(exp, ctx, &step, record).await?;
            Ok(then)
        }
    }
}

/// Dereferences, admits and applies the run; or says why it cannot.
async fn start(exp: &Experiment, ctx: &Context) -> Result<Action, ReconcileError> {
    let started = async {
        admit::spec(exp)?;
        let mut world = dereference::datastores(exp, ctx).await?;
        let plan = admit::plan(exp, &world.datastores)?;
        admit::name(exp)?;
        let env = dereference::mount_environment(exp, ctx, &plan, &mut world).await?;
        let admitted = admit::run(exp, plan, &world, &env, &ctx.build, ctx.now())?;
        apply::run(exp, ctx, &admitted.children).await?;
        Ok::<_, Stop>(admitted)
    };
    let (step, then, record) = match started.await {
        Ok(admitted) => {
            let (step, then) = decide::created(exp, &admitted.plan);
            let record = Record {
                started: true,
                mounts: Some(admitted.mounts),
                ..Record::default()
            };
            (step, then, record)
        }
        Err(Stop::Refused(refusal)) => {
            let (step, then) = decide::refused(exp, &refusal, ctx.now_k8s());
            (step, then, Record::default())
        }
        Err(Stop::Failed(e)) => return Err(e),
    };
    status::write(exp, ctx, &step, record).await?;
    Ok(then)
}

/// Observes the run, decides its next step and carries it out.
async fn follow(
    exp: &Experiment,
    ctx: &Context,
    run: k8s_openapi::api::batch::v1::Job,
) -> Result<Action, ReconcileError> {
    let seen = observe::run(exp, ctx, run).await?;
    let record = || Record::started(seen.inputs.clone());
    match decide::decide(exp, &seen, ctx.now_k8s(), ctx.start_timeout) {
        Decision::Report {
            step,
            then,
            transfer,
        } => {
            status::write(exp, ctx, &step, record()).await?;
            // A transfer is looked at again within the progress period (paced with all others).
            if transfer && !ctx.progress.period.is_zero() {
                return Ok(Action::requeue(ctx.progress.next_pass()));
            }
            Ok(then)
        }
        Decision::GiveUpRun {
            step,
            delete_outputs,
        } => {
            apply::suspend(exp, ctx, &crate::render::run_job_name(exp)).await?;
            if delete_outputs {
                apply::delete_outputs(exp, ctx).await?;
            }
            status::write(exp, ctx, &step, record()).await?;
            Ok(Action::await_change())
        }
        Decision::GiveUpUpload { step } => {
            apply::suspend(exp, ctx, &crate::render::upload_job_name(exp)).await?;
            status::write(exp, ctx, &step, record()).await?;
            Ok(Action::await_change())
        }
        Decision::StartUpload => start_upload(exp, ctx, record()).await,
        Decision::CleanUp {
            record: first,
            pods,
            step,
            uploaded,
        } => {
            let mut exp = exp.clone();
            if let Some(first) = first {
                exp.status = Some(status::write(&exp, ctx, &first, record()).await?);
            }
            apply::remove_outputs(&exp, ctx, &pods).await?;
            status::write(&exp, ctx, &step, record()).await?;
            // After the write that finishes the Experiment: a pass that failed before it counts once.
            ctx.metrics.uploaded(uploaded);
            Ok(Action::await_change())
        }
        Decision::Finish { step, uploaded } => {
            status::write(exp, ctx, &step, record()).await?;
            ctx.metrics.uploaded(uploaded);
            Ok(Action::await_change())
        }
    }
}

/// Admits and applies the upload Job with fresh credentials (the run may have outlived the
/// ones minted at its start).
async fn start_upload(
    exp: &Experiment,
    ctx: &Context,
    record: Record,
) -> Result<Action, ReconcileError> {
    let admitted = async {
        let world = dereference::datastores(exp, ctx).await?;
        let plan = admit::plan(exp, &world.datastores)?;
        Ok::<_, Stop>(admit::upload(
            exp,
            plan,
            &world.datastores,
            &ctx.build,
            ctx.now(),
        )?)
    };
    let (step, then) = match admitted.await {
        Ok(upload) => match apply::upload(exp, ctx, &upload).await {
            Ok(()) => decide::upload_created(exp),
            Err(Stop::Refused(refusal)) => decide::upload_refused(exp, &refusal, ctx.now_k8s()),
            Err(Stop::Failed(e)) => return Err(e),
        },
        Err(Stop::Refused(refusal)) => decide::upload_waits(exp, &refusal),
        Err(Stop::Failed(e)) => return Err(e),
    };
    status::write(exp, ctx, &step, record).await?;
    Ok(then)
}

/// Datastores, specs and plans the pipeline's unit tests share.
#[cfg(test)]
mod fixtures {
    use std::collections::BTreeMap;

    use crate::api::{Experiment, ExperimentSpec};
    use crate::plan::{self, CLUSTER, ExecutionPlan};
    use crate::store::{
        AzureBlobConfig, AzureCredential, AzureFileConfig, Secret as Key, StoreConfig,
    };

    /// `blob-ds` (an Azure Blob container) and `share-ds` (an Azure Files share), with keys.
    pub fn datastores() -> BTreeMap<String, StoreConfig> {
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

    /// An Experiment `train` in namespace `ml` with these `scriptParams` lines.
    pub fn experiment(params: &str) -> Experiment {
        let params = if params.is_empty() {
            String::new()
        } else {
            format!("scriptParams:\n{params}")
        };
        let spec: ExperimentSpec = serde_saphyr::from_str(&format!(
            "image: python:3.12-slim\nentryScript: train.py\n{params}"
        ))
        .unwrap();
        let mut exp = Experiment::new("train", spec);
        exp.metadata.namespace = Some("ml".into());
        exp.metadata.uid = Some("uid-1".into());
        exp
    }

    pub fn plan_of(params: &str) -> ExecutionPlan {
        let exp = experiment(params);
        plan::plan(
            &exp.spec,
            &crate::store::capabilities(&datastores()),
            CLUSTER,
        )
        .unwrap()
    }

    /// One `scriptParams` entry: a data reference of `mode` to path `p` of `datastore`.
    pub fn reference(name: &str, datastore: &str, mode: &str) -> String {
        format!(
            "  - name: {name}\n    dataReference: {{datastore: {datastore}, path: p, mode: {mode}}}\n"
        )
    }
}
