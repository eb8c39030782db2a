//! The operator: `datastore controller` runs the Experiment controller and the datastore
//! readiness controllers until SIGTERM. `build` holds the pure builders of the objects it
//! creates, `progress` the pure reading of where a run is.

pub mod build;
pub mod datastore;
pub mod experiment;
pub mod progress;
pub mod rbac;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::Args;
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, ListParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::api::{ClusterDatastore, Datastore, Experiment};
use crate::store::azure::Tuning;
use build::{
    BuildContext, DEFAULT_AGENT_IMAGE, DEFAULT_OUTPUTS_SIZE, EXPERIMENT_LABEL, MANAGED_BY_LABEL,
    MANAGER,
};

/// How long a failed reconcile waits before it is tried again.
pub const ERROR_RETRY: Duration = Duration::from_secs(30);

/// The operator's settings that `datastore controller` and `datastore plan` share.
#[derive(Args, Debug)]
pub struct OperatorArgs {
    /// The namespace the operator runs in; ClusterDatastores' Secrets live there.
    #[arg(
        long,
        env = "DATASTORE_OPERATOR_NAMESPACE",
        default_value = "datastore-operator"
    )]
    pub operator_namespace: String,
    /// The image of the agent containers (download and upload).
    #[arg(long, env = "DATASTORE_AGENT_IMAGE", default_value = DEFAULT_AGENT_IMAGE)]
    pub agent_image: String,
}

#[derive(Args, Debug)]
pub struct ControllerArgs {
    #[command(flatten)]
    pub operator: OperatorArgs,
    /// The outputs volume's size when an Experiment gives none.
    #[arg(long, env = "DATASTORE_OUTPUTS_SIZE", default_value = DEFAULT_OUTPUTS_SIZE)]
    pub default_outputs_size: String,
}

/// What every reconcile needs.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    /// Where ClusterDatastores' Secrets live.
    pub operator_namespace: String,
    pub build: BuildContext,
    /// How datastore checks talk to storage: few attempts, short timeouts.
    pub check_tuning: Tuning,
    /// The clock (tests pin it).
    pub clock: fn() -> DateTime<Utc>,
}

impl Context {
    pub fn new(client: Client, operator_namespace: String, build: BuildContext) -> Context {
        let reporter = Reporter {
            controller: MANAGER.to_string(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            operator_namespace,
            build,
            check_tuning: Tuning {
                max_attempts: 2,
                base_timeout: Duration::from_secs(10),
                pool_size: 1,
                ..Tuning::default()
            },
            clock: Utc::now,
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        (self.clock)()
    }

    /// Now, to the second (what a status timestamp keeps).
    pub fn now_k8s(&self) -> k8s_openapi::jiff::Timestamp {
        k8s_openapi::jiff::Timestamp::from_second(self.now().timestamp())
            .expect("the clock is within jiff's range")
    }
}

/// Writes `status` to the status subresource of `name` by server-side apply, as the operator.
pub async fn apply_status<K>(
    api: &Api<K>,
    name: &str,
    status: &impl serde::Serialize,
) -> Result<(), kube::Error>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &kube::api::PatchParams::apply(MANAGER).force(),
        &kube::api::Patch::Apply(&patch),
    )
    .await
    .map(|_| ())
}

/// Why a reconcile failed; it is retried after [`ERROR_RETRY`].
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("the Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Resolve(crate::error::Error),
}

fn error_policy<K>(object: Arc<K>, error: &ReconcileError, _ctx: Arc<Context>) -> Action
where
    K: kube::Resource,
{
    tracing::warn!(object = %object.meta().name.as_deref().unwrap_or(""), %error, "reconcile failed; retrying in {}s", ERROR_RETRY.as_secs());
    Action::requeue(ERROR_RETRY)
}

/// Runs `datastore controller`; returns the exit code.
pub async fn run(args: ControllerArgs) -> i32 {
    let client = match Client::try_default().await {
        Ok(client) => client,
        Err(e) => {
            eprintln!(
                "error: no Kubernetes cluster is reachable ({e}): run the controller in a cluster, or point KUBECONFIG at one"
            );
            return 6;
        }
    };
    if let Err(e) = crds_installed(&client).await {
        eprintln!("error: {e}");
        return e.exit_code();
    }
    let build = BuildContext {
        agent_image: args.operator.agent_image,
        default_outputs_size: Quantity(args.default_outputs_size),
        ..BuildContext::default()
    };
    let ctx = Arc::new(Context::new(
        client,
        args.operator.operator_namespace,
        build,
    ));
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let code = crate::cli::interrupted().await;
        tracing::info!(
            signal = code,
            "stopping: finishing the reconciles in flight"
        );
        signal.cancel();
    });
    tracing::info!("controller started");
    tokio::join!(
        run_experiments(ctx.clone(), shutdown.clone()),
        run_datastores(ctx.clone(), shutdown.clone()),
    );
    tracing::info!("controller stopped");
    0
}

/// Fails with a message saying how to install the CRDs when they are missing.
async fn crds_installed(client: &Client) -> Result<(), crate::error::Error> {
    use crate::error::Error;
    let experiments: Api<Experiment> = Api::all(client.clone());
    match experiments.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Err(Error::Config(
            "the datastore.dev CRDs are not installed in this cluster: install them (datastore crds | kubectl apply -f -, or the Helm chart), then start the controller again".to_string(),
        )),
        Err(kube::Error::Api(e)) if e.code == 403 => Err(Error::Auth(format!(
            "the cluster refused to list Experiments ({}): the controller's ServiceAccount needs the RBAC rules of the Helm chart",
            e.message
        ))),
        Err(e) => Err(Error::Unreachable(format!(
            "cannot reach the Kubernetes API ({e}): check the kubeconfig or the in-cluster service account"
        ))),
    }
}

async fn run_experiments(ctx: Arc<Context>, shutdown: CancellationToken) {
    let client = ctx.client.clone();
    let ours = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGER}"));
    let controller = Controller::new(
        Api::<Experiment>::all(client.clone()),
        watcher::Config::default(),
    );
    let experiments = controller.store();
    let for_datastore = experiments.clone();
    controller
        .owns(Api::<Job>::all(client.clone()), ours.clone())
        .watches(Api::<Pod>::all(client.clone()), ours, |pod| {
            experiment_of(&pod)
        })
        .watches(
            Api::<Datastore>::all(client.clone()),
            watcher::Config::default(),
            move |ds| referencing(&for_datastore, &ds.name_any(), ds.namespace().as_deref()),
        )
        .watches(
            Api::<ClusterDatastore>::all(client),
            watcher::Config::default(),
            move |cds| referencing(&experiments, &cds.name_any(), None),
        )
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(experiment::reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "experiment controller");
            }
        })
        .await;
}

async fn run_datastores(ctx: Arc<Context>, shutdown: CancellationToken) {
    let client = ctx.client.clone();
    let namespaced = Controller::new(
        Api::<Datastore>::all(client.clone()),
        watcher::Config::default(),
    )
    .graceful_shutdown_on(shutdown.clone().cancelled_owned())
    .run(datastore::reconcile_datastore, error_policy, ctx.clone())
    .for_each(|_| async {});
    let cluster = Controller::new(
        Api::<ClusterDatastore>::all(client),
        watcher::Config::default(),
    )
    .graceful_shutdown_on(shutdown.cancelled_owned())
    .run(datastore::reconcile_cluster_datastore, error_policy, ctx)
    .for_each(|_| async {});
    tokio::join!(namespaced, cluster);
}

/// The Experiment a pod of one of our Jobs belongs to.
fn experiment_of(pod: &Pod) -> Option<ObjectRef<Experiment>> {
    let name = pod.labels().get(EXPERIMENT_LABEL)?;
    Some(ObjectRef::new(name).within(&pod.namespace()?))
}

/// The experiments that reference datastore `name`: in `namespace` for a Datastore, anywhere for
/// a ClusterDatastore. Only unfinished ones care.
pub fn referencing(
    experiments: &Store<Experiment>,
    name: &str,
    namespace: Option<&str>,
) -> Vec<ObjectRef<Experiment>> {
    experiments
        .state()
        .into_iter()
        .filter(|e| namespace.is_none() || e.namespace().as_deref() == namespace)
        .filter(|e| {
            e.status
                .as_ref()
                .is_none_or(|s| s.completion_time.is_none())
        })
        .filter(|e| {
            e.spec.script_params.iter().any(|p| {
                p.data_reference
                    .as_ref()
                    .is_some_and(|r| r.datastore == name)
            })
        })
        .map(|e| ObjectRef::from(&*e))
        .collect()
}
