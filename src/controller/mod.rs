//! The operator: `datastore controller` runs the Experiment controller and the datastore
//! readiness controllers until SIGTERM. The objects it creates are rendered by [`crate::render`];
//! `progress` is the pure reading of where a run is; `http` serves health and metrics,
//! `leader` elects the one replica that reconciles.
//!
//! The process: serve `/healthz`, `/readyz`, `/metrics` at once; wait (never exit) until the
//! apiserver answers and the CRDs are there, saying why on `/readyz` and in the log; take part
//! in leader election; run the controllers while leader; on SIGTERM stop them, release the lease
//! and exit 0.

pub mod datastore;
pub mod experiment;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod rbac;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use clap::Args;
use futures::{FutureExt, StreamExt};
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
use crate::exit;
use crate::reason::Reason;
use crate::render::{
    self, BuildContext, DEFAULT_AGENT_CPU_LIMIT, DEFAULT_AGENT_CPU_REQUEST, DEFAULT_AGENT_IMAGE,
    DEFAULT_AGENT_MEMORY_LIMIT, DEFAULT_AGENT_MEMORY_REQUEST, DEFAULT_OUTPUTS_SIZE,
    DEFAULT_SIDECAR_CPU, DEFAULT_SIDECAR_MEMORY, DEFAULT_STAGING_SIZE, DefaultMountDriver,
    EXPERIMENT_LABEL, MANAGED_BY_LABEL, MANAGER,
};
use crate::store::azure::Tuning;
use crate::store::resolve::OperatorNamespace;
use crate::store::retry::{Outage, RetryBudget};
use http::{Health, Readiness};
use metrics::Metrics;

/// How long a failed reconcile waits before it is tried again.
pub const ERROR_RETRY: Duration = Duration::from_secs(30);

/// The operator's settings that `datastore controller` and `datastore plan` share.
#[derive(Args, Debug)]
pub struct OperatorArgs {
    #[command(flatten)]
    pub operator_namespace: OperatorNamespace,
    /// The image of the agent containers (download and upload).
    #[arg(long, env = "DATASTORE_AGENT_IMAGE", default_value = DEFAULT_AGENT_IMAGE)]
    pub agent_image: String,
    /// The blobfuse2 sidecar image of `mount` references mounted by the sidecar driver [default:
    /// none, and the sidecar driver is refused].
    #[arg(long, env = "DATASTORE_BLOBFUSE_IMAGE")]
    pub blobfuse_image: Option<String>,
    /// The driver of `mount` references that name none: `auto` (csi, unless the cluster has no
    /// CSIDriver for the datastore; then the privileged blobfuse2 sidecar), `csi` or `sidecar`.
    /// Azure Files shares always mount through file.csi.azure.com.
    #[arg(
        long,
        env = "DATASTORE_DEFAULT_MOUNT_DRIVER",
        default_value = "auto",
        value_parser = mount_driver
    )]
    pub default_mount_driver: DefaultMountDriver,
    /// Serve download references from the node cache (the CSI driver cache.datastore.dev, where
    /// the cluster has it) unless they say `cache: false` or their datastore decides.
    #[arg(
        long,
        env = "DATASTORE_CACHE_DOWNLOADS",
        default_value_t = false,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true",
        require_equals = true
    )]
    pub cache_downloads: bool,
    /// The blobfuse2 sidecar's memory limit (a Kubernetes quantity); its block cache is sized
    /// under it.
    #[arg(
        long,
        env = "DATASTORE_SIDECAR_MEMORY",
        default_value = DEFAULT_SIDECAR_MEMORY,
        value_parser = memory_quantity
    )]
    pub sidecar_memory: Quantity,
    /// The blobfuse2 sidecar's CPU limit (a Kubernetes quantity, at least 100m, which it
    /// requests).
    #[arg(long, env = "DATASTORE_SIDECAR_CPU", default_value = DEFAULT_SIDECAR_CPU, value_parser = sidecar_cpu)]
    pub sidecar_cpu: Quantity,
    /// The CPU each agent container (code, download, upload) requests.
    #[arg(long, env = "DATASTORE_AGENT_CPU_REQUEST", default_value = DEFAULT_AGENT_CPU_REQUEST, value_parser = cpu)]
    pub agent_cpu_request: String,
    /// The memory each agent container requests.
    #[arg(long, env = "DATASTORE_AGENT_MEMORY_REQUEST", default_value = DEFAULT_AGENT_MEMORY_REQUEST, value_parser = memory)]
    pub agent_memory_request: String,
    /// The CPU each agent container is limited to.
    #[arg(long, env = "DATASTORE_AGENT_CPU_LIMIT", default_value = DEFAULT_AGENT_CPU_LIMIT, value_parser = cpu)]
    pub agent_cpu_limit: String,
    /// The memory each agent container is limited to.
    #[arg(long, env = "DATASTORE_AGENT_MEMORY_LIMIT", default_value = DEFAULT_AGENT_MEMORY_LIMIT, value_parser = memory)]
    pub agent_memory_limit: String,
    /// Handed to every agent container: how long it rides through a storage outage.
    #[command(flatten)]
    pub retry: RetryBudget,
}

impl OperatorArgs {
    /// The builders' settings these flags give (the outputs volume's are the controller's own).
    /// An empty value, as a chart may render one, means the default.
    pub fn build_context(&self) -> BuildContext {
        BuildContext {
            agent_image: self.agent_image.clone(),
            blobfuse_image: self
                .blobfuse_image
                .clone()
                .filter(|image| !image.is_empty()),
            default_mount_driver: self.default_mount_driver,
            cache_downloads: self.cache_downloads,
            retry_budget: self.retry.retry_budget,
            sidecar_memory: self.sidecar_memory.clone(),
            sidecar_cpu: self.sidecar_cpu.clone(),
            agent_resources: render::compute_resources(
                or_default(&self.agent_cpu_request, DEFAULT_AGENT_CPU_REQUEST),
                or_default(&self.agent_memory_request, DEFAULT_AGENT_MEMORY_REQUEST),
                or_default(&self.agent_cpu_limit, DEFAULT_AGENT_CPU_LIMIT),
                or_default(&self.agent_memory_limit, DEFAULT_AGENT_MEMORY_LIMIT),
            ),
            ..BuildContext::default()
        }
    }
}

/// An empty flag (a chart rendering "") is the default.
fn or_default<'a>(value: &'a str, default: &'a str) -> &'a str {
    if value.is_empty() { default } else { value }
}

/// Millicores of a Kubernetes CPU quantity (`250m`, `1`, `1.5`); `None` if it is not one.
fn cpu_millis(value: &str) -> Option<u64> {
    let (number, scale) = match value.strip_suffix('m') {
        Some(millis) => (millis, 1.0),
        None => (value, 1000.0),
    };
    let ok = !number.is_empty()
        && number.chars().all(|c| c.is_ascii_digit() || c == '.')
        && number.matches('.').count() <= 1;
    let n: f64 = number.parse().ok().filter(|_| ok)?;
    let millis = n * scale;
    (millis >= 1.0 && millis.fract() == 0.0 && millis < 1e9).then_some(millis as u64)
}

/// An agent container's CPU request or limit: a Kubernetes quantity of CPU; empty is the
/// default.
fn cpu(value: &str) -> Result<String, String> {
    if value.is_empty() || cpu_millis(value).is_some() {
        return Ok(value.to_string());
    }
    Err(format!(
        "`{value}` is not a quantity of CPU: write cores (1, 0.5) or millicores (250m)"
    ))
}

/// `--sidecar-cpu`: at least what the sidecar requests; empty is the default.
fn sidecar_cpu(value: &str) -> Result<Quantity, String> {
    if value.is_empty() {
        return Ok(Quantity(DEFAULT_SIDECAR_CPU.to_string()));
    }
    let floor = cpu_millis(render::SIDECAR_CPU_REQUEST).expect("a quantity");
    match cpu_millis(value) {
        Some(millis) if millis >= floor => Ok(Quantity(value.to_string())),
        Some(_) => Err(format!(
            "`{value}` is less CPU than the blobfuse2 sidecar requests ({}): give at least that",
            render::SIDECAR_CPU_REQUEST
        )),
        None => cpu(value).map(Quantity),
    }
}

/// An agent container's memory request or limit: a whole number with a suffix; empty is the
/// default.
fn memory(value: &str) -> Result<String, String> {
    if value.is_empty() {
        return Ok(String::new());
    }
    memory_bytes(value).map(|_| value.to_string())
}

/// `--default-mount-driver`: `auto`, `csi` or `sidecar`; empty (a chart rendering `""`) is
/// `auto`.
fn mount_driver(value: &str) -> Result<DefaultMountDriver, String> {
    use clap::ValueEnum;
    if value.is_empty() {
        return Ok(DefaultMountDriver::default());
    }
    DefaultMountDriver::from_str(value, false)
        .map_err(|_| format!("`{value}` is not a mount driver: choose auto, csi or sidecar"))
}

/// `--sidecar-memory`: a Kubernetes quantity of memory such as `1Gi` or `1500M`, at least 64 MiB
/// (blobfuse2 itself needs some); empty is the default.
fn memory_quantity(value: &str) -> Result<Quantity, String> {
    if value.is_empty() {
        return Ok(Quantity(DEFAULT_SIDECAR_MEMORY.to_string()));
    }
    if memory_bytes(value)? < 64 << 20 {
        return Err(format!(
            "`{value}` is too little memory for the blobfuse2 sidecar: give at least 64Mi"
        ));
    }
    Ok(Quantity(value.to_string()))
}

/// Bytes of a whole number of memory with an optional suffix (`512Mi`, `2G`).
fn memory_bytes(value: &str) -> Result<u64, String> {
    let digits = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, suffix) = value.split_at(digits);
    let multiplier: u64 = match suffix {
        "" => 1,
        "k" => 1000,
        "M" => 1000_u64.pow(2),
        "G" => 1000_u64.pow(3),
        "T" => 1000_u64.pow(4),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => u64::MAX,
    };
    number
        .parse::<u64>()
        .ok()
        .filter(|_| multiplier != u64::MAX)
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| {
            format!(
                "`{value}` is not a quantity of memory: write a whole number with a suffix such as 512Mi or 2Gi"
            )
        })
}

#[derive(Args, Debug)]
pub struct ControllerArgs {
    #[command(flatten)]
    pub operator: OperatorArgs,
    /// The outputs volume's size when an Experiment gives none.
    #[arg(long, env = "DATASTORE_OUTPUTS_SIZE", default_value = DEFAULT_OUTPUTS_SIZE)]
    pub default_outputs_size: String,
    /// The staging volume's size (where downloads land in the run's pod) when an Experiment
    /// gives none.
    #[arg(long, env = "DATASTORE_STAGING_SIZE", default_value = DEFAULT_STAGING_SIZE)]
    pub default_staging_size: String,
    /// The outputs volume's storage class when an Experiment gives none [default: the
    /// cluster's default class].
    #[arg(long, env = "DATASTORE_OUTPUTS_STORAGE_CLASS")]
    pub default_outputs_storage_class: Option<String>,
    /// Where /healthz, /readyz and /metrics are served.
    #[arg(long, env = "DATASTORE_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// Elect one replica through Lease `datastore-operator` in the operator namespace
    /// (`--leader-election=false`: this process reconciles at once, for a single local run).
    #[arg(
        long,
        env = "DATASTORE_LEADER_ELECTION",
        default_value_t = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true",
        require_equals = true
    )]
    pub leader_election: bool,
    /// How long a run's or upload's pod may wait to start (unschedulable, refused by a quota
    /// or Pod Security, an image that cannot be pulled, a volume that cannot be mounted)
    /// before the Experiment fails: `90s`, `15m`, `1h`.
    #[arg(long, env = "DATASTORE_START_TIMEOUT", default_value = "15m", value_parser = duration)]
    pub start_timeout: Duration,
    /// How often the progress of a transferring Experiment is read from its agent container's
    /// log into its status (`0s`: never); all Experiments together are read at most
    /// 10 times a second, so many transfers share the rate.
    #[arg(long, env = "DATASTORE_PROGRESS_PERIOD", default_value = "10s", value_parser = progress_period)]
    pub progress_period: Duration,
}

/// `--progress-period`: like `--start-timeout`, and `0s` turns progress reads off.
fn progress_period(value: &str) -> Result<Duration, String> {
    match value {
        "" => Ok(experiment::DEFAULT_PROGRESS_PERIOD),
        "0" | "0s" => Ok(Duration::ZERO),
        _ => duration(value),
    }
}

/// `--start-timeout`: as [`crate::duration::parse`] reads it; empty is the default.
fn duration(value: &str) -> Result<Duration, String> {
    if value.is_empty() {
        return Ok(DEFAULT_START_TIMEOUT);
    }
    crate::duration::parse(value)
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
    /// What `/metrics` reports; reconciles add to it.
    pub metrics: Arc<Metrics>,
    /// How long a Job's pod may wait to start (unschedulable, refused, an image or a volume
    /// that does not come) before the experiment fails.
    pub start_timeout: Duration,
    /// How transferring Experiments' progress is read (a period, a rate, a cap on reads at once).
    pub progress: experiment::ProgressReads,
    /// The Experiments whose reconciles fail, and how many times in a row.
    pub failing: experiment::Failing,
}

/// [`Context::start_timeout`] when the operator is not told otherwise: long enough for a node
/// pool to scale up and a large image to be pulled.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(15 * 60);

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
                // A check says what it finds now; the next reconcile looks again.
                outage: Outage::new(Duration::from_secs(1)),
                base_timeout: Duration::from_secs(10),
                pool_size: 1,
                ..Tuning::default()
            },
            clock: Utc::now,
            start_timeout: DEFAULT_START_TIMEOUT,
            metrics: Arc::default(),
            progress: experiment::ProgressReads::new(experiment::DEFAULT_PROGRESS_PERIOD),
            failing: experiment::Failing::default(),
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
    #[error("{}", kube_cause(.0))]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Resolve(crate::error::Error),
}

/// What the apiserver answered, as it said it (its code, reason and message), or why no answer
/// came.
fn kube_cause(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => format!(
            "the Kubernetes API answered {} {}: {}",
            status.code, status.reason, status.message
        ),
        kube::Error::SerdeError(e) => {
            format!("the Kubernetes API's answer could not be decoded: {e}")
        }
        other => format!("no answer from the Kubernetes API: {other}"),
    }
}

impl ReconcileError {
    /// The kind of failure, for the `reason` label of
    /// `datastore_reconcile_failures_total`: `Kube<apiserver reason>` (e.g. `KubeConflict`,
    /// `KubeForbidden`), `KubeRequest` when no answer came, or the resolve error's reason
    /// (e.g. `AuthFailed`).
    pub fn reason(&self) -> Reason {
        match self {
            ReconcileError::Kube(kube::Error::Api(status)) => Reason::kube(&status.reason),
            ReconcileError::Kube(kube::Error::SerdeError(_)) => Reason::KubeDecode,
            ReconcileError::Kube(_) => Reason::KubeRequest,
            ReconcileError::Resolve(e) => e.reason(),
        }
    }
}

/// Runs one reconcile and records it in the metrics.
async fn timed(
    controller: &'static str,
    ctx: Arc<Context>,
    reconcile: impl Future<Output = Result<Action, ReconcileError>>,
) -> Result<Action, ReconcileError> {
    let started = Instant::now();
    let result = reconcile.await;
    ctx.metrics
        .reconciled(controller, started.elapsed(), result.as_ref().err());
    result
}

/// A capped exponential backoff: 1 s, 2 s, 4 s ... 30 s.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_secs(1);
    const CAP: Duration = Duration::from_secs(30);

    /// The wait before the next attempt.
    pub fn wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(Self::CAP);
        wait
    }

    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: Self::FIRST }
    }
}

fn error_policy<K>(object: Arc<K>, error: &ReconcileError, _ctx: Arc<Context>) -> Action
where
    K: kube::Resource,
{
    tracing::warn!(object = %object.meta().name.as_deref().unwrap_or(""), %error, "reconcile failed; retrying in {}s", ERROR_RETRY.as_secs());
    Action::requeue(ERROR_RETRY)
}

/// Runs `datastore controller`; returns the exit code: success after SIGTERM or SIGINT,
/// unreachable without a cluster configuration, configuration when `--http-addr` cannot be
/// served, lease lost when the leader lost its Lease (Kubernetes restarts it as a standby).
pub async fn run(args: ControllerArgs) -> i32 {
    let no_cluster = |e: &dyn std::fmt::Display| {
        eprintln!(
            "error: no Kubernetes cluster is reachable ({e}): run the controller in a cluster, or point KUBECONFIG at one"
        );
        exit::UNREACHABLE
    };
    let config = match kube::Config::infer().await {
        Ok(config) => config,
        Err(e) => return no_cluster(&e),
    };
    // Watches must not time out (kube's default has no read timeout), but the start-up checks
    // and the lease must: a hung request must neither hang readiness nor outlive the lease.
    let mut quick = config.clone();
    quick.connect_timeout = Some(Duration::from_secs(3));
    quick.read_timeout = Some(Duration::from_secs(4));
    quick.write_timeout = Some(Duration::from_secs(4));
    let (client, quick) = match (Client::try_from(config), Client::try_from(quick)) {
        (Ok(client), Ok(quick)) => (client, quick),
        (Err(e), _) | (_, Err(e)) => return no_cluster(&e),
    };

    let health = Arc::new(Health::default());
    let metrics = Arc::new(Metrics::new());
    let listener = match tokio::net::TcpListener::bind(args.http_addr).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!(
                "error: cannot serve /healthz, /readyz and /metrics on {} ({e}): choose another --http-addr",
                args.http_addr
            );
            return exit::CONFIG;
        }
    };
    let addr = listener.local_addr().unwrap_or(args.http_addr);
    tracing::info!("serving /healthz, /readyz and /metrics on http://{addr}");
    let stop_server = CancellationToken::new();
    let endpoints = Arc::new(http::Endpoints {
        health: health.clone(),
        metrics: metrics.clone(),
    });
    let server = tokio::spawn(crate::serve::serve(
        listener,
        endpoints,
        stop_server.clone(),
    ));

    let shutdown = CancellationToken::new();
    let (signal, on_signal) = (shutdown.clone(), health.clone());
    tokio::spawn(async move {
        let code = crate::signal::interrupted().await;
        tracing::info!(
            signal = code,
            "stopping: finishing the reconciles in flight"
        );
        on_signal.set(Readiness::ShuttingDown);
        signal.cancel();
    });

    let namespace = args.operator.operator_namespace.name.clone();
    let identity = leader::identity();
    let timing = leader::Timing::default();
    let election = args.leader_election;
    let ready = wait_until_ready(&health, &shutdown, || {
        let (client, namespace, identity) = (quick.clone(), namespace.clone(), identity.clone());
        async move {
            crds_installed(&client).await?;
            if !election {
                return Ok(None);
            }
            leader::manager(client, &namespace, &identity, timing)
                .await
                .map(Some)
                .map_err(|e| {
                    format!(
                        "cannot get or create Lease {} in namespace {namespace} ({}): the namespace must exist and the controller's ServiceAccount needs get, create and patch on leases there",
                        leader::LEASE_NAME,
                        crate::serve::one_line(&e.to_string())
                    )
                })
        }
    })
    .await;

    let code = match ready {
        None => exit::SUCCESS,
        Some(manager) => {
            let build = BuildContext {
                default_outputs_size: Quantity(args.default_outputs_size),
                default_staging_size: Quantity(
                    or_default(&args.default_staging_size, DEFAULT_STAGING_SIZE).to_string(),
                ),
                // An empty value (a chart that renders `""`) means none.
                default_outputs_storage_class: args
                    .default_outputs_storage_class
                    .filter(|class| !class.is_empty()),
                ..args.operator.build_context()
            };
            let ctx = Arc::new(Context {
                metrics: metrics.clone(),
                start_timeout: args.start_timeout,
                progress: experiment::ProgressReads::new(args.progress_period),
                ..Context::new(client, namespace, build)
            });
            let controllers = |stop| run_controllers(ctx, stop);
            match manager {
                None => {
                    tracing::warn!(
                        "leader election is off (--leader-election=false): run only one replica like this"
                    );
                    metrics.set_leader(true);
                    controllers(shutdown.clone()).await;
                    metrics.set_leader(false);
                    exit::SUCCESS
                }
                Some(manager) => {
                    tracing::info!(%identity, lease = leader::LEASE_NAME, "waiting to be the leader");
                    match leader::lead(
                        &manager,
                        &identity,
                        timing,
                        &shutdown,
                        &metrics,
                        controllers,
                    )
                    .await
                    {
                        leader::Ended::Shutdown => exit::SUCCESS,
                        leader::Ended::Lost(why) => {
                            tracing::error!(
                                "lost the leader lease: {why}; the controllers stopped and the process exits so that Kubernetes restarts it as a standby"
                            );
                            exit::LEASE_LOST
                        }
                    }
                }
            }
        }
    };
    stop_server.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), server).await;
    tracing::info!("controller stopped");
    code
}

/// Retries `attempt` with a capped backoff until it succeeds (`Some`) or `shutdown` (`None`).
/// Meanwhile `/readyz` says why not, and the log says it once per change of reason.
pub async fn wait_until_ready<T, F, Fut>(
    health: &Health,
    shutdown: &CancellationToken,
    mut attempt: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let mut backoff = Backoff::default();
    loop {
        let result = tokio::select! {
            _ = shutdown.cancelled() => return None,
            result = attempt() => result,
        };
        match result {
            Ok(value) => {
                if health.set(Readiness::Ready) {
                    tracing::info!(
                        "ready: the Kubernetes API answers and the datastore.dev CRDs are installed"
                    );
                }
                return Some(value);
            }
            Err(why) => {
                let why = crate::serve::one_line(&why);
                if health.set(Readiness::Waiting(why.clone())) {
                    tracing::warn!("waiting: {why}");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(backoff.wait()) => {}
                }
            }
        }
    }
}

/// `Ok` when the apiserver lists Experiments, Datastores and ClusterDatastores; else why not, with
/// what to do.
async fn crds_installed(client: &Client) -> Result<(), String> {
    let answers = vec![
        (
            "Experiment",
            list_one(Api::<Experiment>::all(client.clone())).await,
        ),
        (
            "Datastore",
            list_one(Api::<Datastore>::all(client.clone())).await,
        ),
        (
            "ClusterDatastore",
            list_one(Api::<ClusterDatastore>::all(client.clone())).await,
        ),
    ];
    not_ready_reason(answers)
}

async fn list_one<K>(api: Api<K>) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let params = ListParams::default().limit(1);
    match tokio::time::timeout(Duration::from_secs(10), api.list_metadata(&params)).await {
        Ok(answer) => answer.map(|_| ()),
        Err(_) => Err(kube::Error::Service(
            "no answer within 10 s".to_string().into(),
        )),
    }
}

/// Why the apiserver's answers to listing each kind mean the controller cannot start yet.
pub fn not_ready_reason(answers: Vec<(&str, Result<(), kube::Error>)>) -> Result<(), String> {
    let mut missing = Vec::new();
    for (kind, answer) in answers {
        match answer {
            Ok(()) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => missing.push(kind),
            Err(kube::Error::Api(e)) if e.code == 403 => {
                return Err(format!(
                    "the cluster refused to list {kind}s ({}): the controller's ServiceAccount needs the RBAC rules of the Helm chart; waiting for them",
                    e.message
                ));
            }
            Err(kube::Error::Api(e)) if e.code == 401 => {
                return Err(format!(
                    "the Kubernetes API did not accept the controller's credentials ({}): check the kubeconfig or the ServiceAccount token; retrying",
                    e.message
                ));
            }
            Err(kube::Error::Api(e)) => {
                return Err(format!(
                    "the Kubernetes API failed to list {kind}s ({} {}); retrying",
                    e.code, e.message
                ));
            }
            Err(e) => {
                return Err(format!(
                    "cannot reach the Kubernetes API ({e}): check the kubeconfig or the in-cluster service account; retrying"
                ));
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "the datastore.dev CRDs are not installed in this cluster (no {} resource): install them with `datastore crds | kubectl apply -f -` or the Helm chart; waiting for them",
        missing.join(", ")
    ))
}

/// The controllers, until `stop` is cancelled and their reconciles in flight are done.
async fn run_controllers(ctx: Arc<Context>, stop: CancellationToken) {
    tracing::info!("controllers started");
    tokio::join!(
        run_experiments(ctx.clone(), stop.clone()),
        run_datastores(ctx.clone(), stop),
    );
    ctx.metrics.watch_experiments(None);
    tracing::info!("controllers stopped");
}

async fn run_experiments(ctx: Arc<Context>, shutdown: CancellationToken) {
    let client = ctx.client.clone();
    let ours = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGER}"));
    let controller = Controller::new(
        Api::<Experiment>::all(client.clone()),
        watcher::Config::default(),
    );
    let experiments = controller.store();
    let cache = experiments.clone();
    ctx.metrics.watch_experiments(Some(experiments.clone()));
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
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(
            |exp, ctx| timed("experiment", ctx.clone(), experiment::reconcile(exp, ctx)),
            error_policy,
            ctx,
        )
        .take_until(stopped_before_synced(shutdown, cache))
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
    );
    let cache = namespaced.store();
    let namespaced = namespaced
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(
            |ds, ctx| {
                timed(
                    "datastore",
                    ctx.clone(),
                    datastore::reconcile_datastore(ds, ctx),
                )
            },
            error_policy,
            ctx.clone(),
        )
        .take_until(stopped_before_synced(shutdown.clone(), cache))
        .for_each(|_| async {});
    let cluster = Controller::new(
        Api::<ClusterDatastore>::all(client),
        watcher::Config::default(),
    );
    let cache = cluster.store();
    let cluster = cluster
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(
            |cds, ctx| {
                timed(
                    "clusterdatastore",
                    ctx.clone(),
                    datastore::reconcile_cluster_datastore(cds, ctx),
                )
            },
            error_policy,
            ctx,
        )
        .take_until(stopped_before_synced(shutdown, cache))
        .for_each(|_| async {});
    tokio::join!(namespaced, cluster);
}

/// Resolves when `stop` is cancelled before the controller's watch cache has its first list, and
/// never otherwise. kube-runtime holds every reconcile until that list is in, and its graceful
/// shutdown waits for them; but the shutdown also stops the watch, so the list never comes and the
/// controller would wait forever. Before the list nothing has run, so ending at once loses nothing.
async fn stopped_before_synced<K>(stop: CancellationToken, cache: Store<K>)
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    stop.cancelled().await;
    if cache.wait_until_ready().now_or_never().is_some() {
        std::future::pending::<()>().await;
    }
}

/// The Experiment a pod of one of our Jobs belongs to.
fn experiment_of(pod: &Pod) -> Option<ObjectRef<Experiment>> {
    let name = pod.labels().get(EXPERIMENT_LABEL)?;
    Some(ObjectRef::new(name).within(&pod.namespace()?))
}

/// The experiments that use datastore `name` (a data reference, or `spec.code`): in `namespace`
/// for a Datastore, anywhere for a ClusterDatastore. Only unfinished ones care.
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
            e.spec
                .datastore_uses()
                .iter()
                .any(|(_, used)| *used == name)
        })
        .map(|e| ObjectRef::from(&*e))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::Status;

    fn api_error(code: u16, reason: &str, message: &str) -> kube::Error {
        kube::Error::Api(Box::new(Status {
            code,
            reason: reason.to_string(),
            message: message.to_string(),
            ..Status::default()
        }))
    }

    #[test]
    fn backoff_doubles_from_one_second_to_thirty_and_resets() {
        let mut backoff = Backoff::default();
        let waits: Vec<u64> = (0..7).map(|_| backoff.wait().as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        backoff.reset();
        assert_eq!(backoff.wait(), Duration::from_secs(1));
    }

    #[test]
    fn failure_reasons_are_a_bounded_set_of_words() {
        let reason = |e| ReconcileError::Kube(e).reason();
        assert_eq!(reason(api_error(409, "Conflict", "x")), "KubeConflict");
        assert_eq!(reason(api_error(403, "Forbidden", "x")), "KubeForbidden");
        assert_eq!(reason(api_error(500, "", "x")), "KubeOther");
        assert_eq!(
            reason(api_error(500, "we\"ird {label}\n", "x")),
            "KubeOther"
        );
        assert_eq!(
            reason(kube::Error::Service("connection refused".into())),
            "KubeRequest"
        );
        let resolve = ReconcileError::Resolve(crate::error::Error::Unreachable("x".into()));
        assert_eq!(resolve.reason(), "Unreachable");
    }

    #[test]
    fn missing_crds_forbidden_lists_and_an_unreachable_api_each_say_what_to_do() {
        let all_ok = vec![("Experiment", Ok(())), ("Datastore", Ok(()))];
        assert_eq!(not_ready_reason(all_ok), Ok(()));

        let missing = not_ready_reason(vec![
            ("Experiment", Err(api_error(404, "NotFound", "not found"))),
            ("Datastore", Ok(())),
            (
                "ClusterDatastore",
                Err(api_error(404, "NotFound", "not found")),
            ),
        ])
        .unwrap_err();
        assert!(
            missing.contains("CRDs are not installed")
                && missing.contains("no Experiment, ClusterDatastore resource")
                && missing.contains("`datastore crds | kubectl apply -f -`"),
            "{missing}"
        );

        let forbidden = not_ready_reason(vec![
            ("Experiment", Err(api_error(404, "NotFound", "not found"))),
            (
                "Datastore",
                Err(api_error(403, "Forbidden", "cannot list datastores")),
            ),
        ])
        .unwrap_err();
        assert!(
            forbidden
                .starts_with("the cluster refused to list Datastores (cannot list datastores)")
                && forbidden.contains("RBAC"),
            "{forbidden}"
        );

        let unreachable = not_ready_reason(vec![(
            "Experiment",
            Err(kube::Error::Service("connection refused".into())),
        )])
        .unwrap_err();
        assert!(
            unreachable.starts_with("cannot reach the Kubernetes API (")
                && unreachable.contains("connection refused"),
            "{unreachable}"
        );
        let unauthorized = not_ready_reason(vec![(
            "Experiment",
            Err(api_error(401, "Unauthorized", "Unauthorized")),
        )])
        .unwrap_err();
        assert!(unauthorized.contains("credentials"), "{unauthorized}");
    }

    /// The start-up wait: each reason once in the log and on /readyz, capped backoff, ready at
    /// the end; or nothing when shut down meanwhile.
    #[tokio::test(start_paused = true)]
    async fn waiting_retries_with_backoff_until_ready_and_tells_each_reason() {
        let health = Health::default();
        let shutdown = CancellationToken::new();
        let answers = std::sync::Mutex::new(vec![
            Err("the CRDs are missing".to_string()),
            Err("the CRDs are missing".to_string()),
            Err("the CRDs are\nmissing".to_string()),
            Err("forbidden".to_string()),
            Ok(7),
        ]);
        let seen = std::sync::Mutex::new(Vec::new());
        let started = tokio::time::Instant::now();
        let got = wait_until_ready(&health, &shutdown, || {
            seen.lock().unwrap().push(health.get());
            let answer = answers.lock().unwrap().remove(0);
            async move { answer }
        })
        .await;
        assert_eq!(got, Some(7));
        assert_eq!(health.get(), Readiness::Ready);
        let waiting = |s: &str| Readiness::Waiting(s.to_string());
        assert_eq!(
            *seen.lock().unwrap(),
            [
                Readiness::Starting,
                waiting("the CRDs are missing"),
                waiting("the CRDs are missing"),
                waiting("the CRDs are missing"),
                waiting("forbidden"),
            ]
        );
        // 1 + 2 + 4 + 8 seconds of backoff, no more.
        assert_eq!(started.elapsed().as_secs(), 15);

        let fresh = Health::default();
        let never = wait_until_ready(&fresh, &shutdown, || async {
            Err::<(), _>("down".to_string())
        });
        let cancel = async {
            tokio::time::sleep(Duration::from_secs(100)).await;
            shutdown.cancel();
        };
        let (got, ()) = tokio::join!(never, cancel);
        assert_eq!(got, None, "shutting down ends the wait");
    }

    #[test]
    fn mount_flags_parse_like_the_chart_renders_them() {
        use clap::Parser;
        #[derive(Parser)]
        struct Flags {
            #[command(flatten)]
            operator: OperatorArgs,
        }
        let parse = |args: &[&str]| {
            Flags::try_parse_from(std::iter::once("datastore").chain(args.iter().copied()))
                .map(|f| f.operator.build_context())
                .map_err(|e| e.to_string())
        };
        let defaults = parse(&[]).unwrap();
        assert_eq!(defaults.default_mount_driver, DefaultMountDriver::Auto);
        assert_eq!(defaults.sidecar_memory.0, DEFAULT_SIDECAR_MEMORY);
        assert_eq!(defaults.blobfuse_image, None);
        // Empty values, as a chart renders an empty string, are the defaults.
        let empty = parse(&[
            "--default-mount-driver=",
            "--sidecar-memory=",
            "--blobfuse-image=",
        ])
        .unwrap();
        assert_eq!(empty, defaults);
        let set = parse(&[
            "--default-mount-driver=sidecar",
            "--sidecar-memory=2Gi",
            "--blobfuse-image=registry.example.com/blobfuse2:2.5.1",
        ])
        .unwrap();
        assert_eq!(set.default_mount_driver, DefaultMountDriver::Sidecar);
        assert!(!defaults.cache_downloads);
        assert!(parse(&["--cache-downloads"]).unwrap().cache_downloads);
        assert!(!parse(&["--cache-downloads=false"]).unwrap().cache_downloads);
        assert_eq!(set.sidecar_memory.0, "2Gi");
        assert_eq!(
            set.blobfuse_image.as_deref(),
            Some("registry.example.com/blobfuse2:2.5.1")
        );
        assert_eq!(
            parse(&["--default-mount-driver=csi"])
                .unwrap()
                .default_mount_driver,
            DefaultMountDriver::Csi
        );
        for (args, says) in [
            (
                "--default-mount-driver=fuse",
                "`fuse` is not a mount driver: choose auto, csi or sidecar",
            ),
            ("--sidecar-memory=1.5Gi", "not a quantity of memory"),
            ("--sidecar-memory=1GB", "not a quantity of memory"),
            ("--sidecar-memory=Gi", "not a quantity of memory"),
            (
                "--sidecar-memory=32Mi",
                "too little memory for the blobfuse2 sidecar",
            ),
            ("--sidecar-memory=99999999999Ti", "not a quantity of memory"),
        ] {
            let error = parse(&[args]).unwrap_err();
            assert!(error.contains(says), "{args}: {error}");
        }
        assert_eq!(
            parse(&["--sidecar-memory=1500M"]).unwrap().sidecar_memory.0,
            "1500M"
        );
    }

    #[test]
    fn the_start_timeout_is_a_whole_number_of_seconds_minutes_or_hours() {
        assert_eq!(duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(duration(""), Ok(DEFAULT_START_TIMEOUT));
        for bad in ["15", "0m", "1.5h", "m", "15min", "-1s"] {
            let error = duration(bad).unwrap_err();
            assert!(error.contains("is not a duration"), "{bad}: {error}");
        }
    }

    #[test]
    fn agent_and_sidecar_resources_come_from_the_flags() {
        use clap::Parser;
        #[derive(Parser)]
        struct Flags {
            #[command(flatten)]
            operator: OperatorArgs,
        }
        let parse = |args: &[&str]| {
            Flags::try_parse_from(std::iter::once("datastore").chain(args.iter().copied()))
                .map(|f| f.operator.build_context())
                .map_err(|e| e.to_string())
        };
        let defaults = parse(&[]).unwrap();
        let get = |ctx: &BuildContext, which: &str, resource: &str| {
            let r = &ctx.agent_resources;
            let map = if which == "requests" {
                &r.requests
            } else {
                &r.limits
            };
            map.as_ref().unwrap()[resource].0.clone()
        };
        assert_eq!(get(&defaults, "requests", "cpu"), DEFAULT_AGENT_CPU_REQUEST);
        assert_eq!(
            get(&defaults, "limits", "memory"),
            DEFAULT_AGENT_MEMORY_LIMIT
        );
        assert_eq!(defaults.sidecar_cpu.0, DEFAULT_SIDECAR_CPU);
        let empty = parse(&[
            "--agent-cpu-request=",
            "--agent-memory-request=",
            "--agent-cpu-limit=",
            "--agent-memory-limit=",
            "--sidecar-cpu=",
        ])
        .unwrap();
        assert_eq!(empty, defaults);
        let set = parse(&[
            "--agent-cpu-request=0.5",
            "--agent-memory-request=256Mi",
            "--agent-cpu-limit=1500m",
            "--agent-memory-limit=1Gi",
            "--sidecar-cpu=4",
        ])
        .unwrap();
        assert_eq!(get(&set, "requests", "cpu"), "0.5");
        assert_eq!(get(&set, "requests", "memory"), "256Mi");
        assert_eq!(get(&set, "limits", "cpu"), "1500m");
        assert_eq!(get(&set, "limits", "memory"), "1Gi");
        assert_eq!(set.sidecar_cpu.0, "4");
        for (args, says) in [
            ("--agent-cpu-limit=two", "not a quantity of CPU"),
            ("--agent-cpu-request=1.2.3", "not a quantity of CPU"),
            ("--agent-cpu-request=0.5m", "not a quantity of CPU"),
            ("--agent-memory-limit=1.5Gi", "not a quantity of memory"),
            (
                "--sidecar-cpu=50m",
                "less CPU than the blobfuse2 sidecar requests",
            ),
        ] {
            let error = parse(&[args]).unwrap_err();
            assert!(error.contains(says), "{args}: {error}");
        }
    }

    #[test]
    fn the_default_storage_class_applies_only_when_the_spec_names_none() {
        use crate::api::ExperimentSpec;
        use crate::store::{AzureBlobConfig, AzureCredential, StoreConfig};
        let datastores = std::collections::BTreeMap::from([(
            "blob-ds".to_string(),
            StoreConfig::AzureBlob(AzureBlobConfig {
                account: "devstoreaccount1".to_string(),
                container: "data".to_string(),
                endpoint: url::Url::parse("http://127.0.0.1:10000/devstoreaccount1").unwrap(),
                credential: AzureCredential::Anonymous,
                credential_source: "anonymous".to_string(),
                read_only: false,
            }),
        )]);
        let ctx = BuildContext {
            default_outputs_storage_class: Some("managed-csi-premium".to_string()),
            ..BuildContext::default()
        };
        let class = |outputs: &str| {
            let spec: ExperimentSpec = serde_saphyr::from_str(&format!(
                "image: python:3.12-slim\nentryScript: train.py\n{outputs}scriptParams:\n  - name: --out\n    dataReference: {{datastore: blob-ds, path: out, mode: upload}}\n"
            ))
            .unwrap();
            let exp = Experiment::new("train", spec);
            let plan = crate::plan::plan(
                &exp.spec,
                &crate::store::capabilities(&datastores),
                crate::plan::CLUSTER,
            )
            .unwrap();
            render::outputs_pvc(&exp, &plan, &ctx)
                .unwrap()
                .spec
                .unwrap()
                .storage_class_name
        };
        assert_eq!(class("").as_deref(), Some("managed-csi-premium"));
        assert_eq!(
            class("outputs: {storageClassName: azurefile}\n").as_deref(),
            Some("azurefile")
        );
    }
}
