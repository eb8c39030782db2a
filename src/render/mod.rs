//! The objects the controller creates for an Experiment, from its [`ExecutionPlan`]. Pure:
//! values in, values out; no clock (the caller passes `now`), no cluster.
//!
//! - Secret `<exp>-credentials`: a datastores file (`datastores.yaml`) for the agent containers
//!   only, holding per-experiment credentials ([`render_credentials`]);
//! - Job `<exp>-run`: an init container `code` when the code comes from a datastore and one
//!   `download-<n>` per download reference (the agent image), each filling an emptyDir, then
//!   the user's container `main`;
//! - PVC `<exp>-outputs` when there are upload references, mounted (one subPath per reference)
//!   at each upload reference's path in the run Job and in the upload Job;
//! - Job `<exp>-upload`: one container `upload-<n>` per upload reference;
//! - for `mount` references and Azure Files datastores, the volumes and Secrets of [`volumes`]:
//!   inline CSI volumes (`blob.csi.azure.com`, `file.csi.azure.com`) or a blobfuse2 native
//!   sidecar per mount, and a share volume for agent containers copying from or to a share.
//!
//! Every pod meets the Pod Security Standard "restricted", except that a blobfuse2 sidecar runs
//! privileged; the user's container never sees a credential.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, EphemeralVolumeSource,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeClaimTemplate,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec,
    ResourceRequirements, SeccompProfile, Secret, SecretVolumeSource, SecurityContext, Volume,
    VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

use crate::api::{
    AzureBlobSpec, Credentials, Datastore, DatastoreSpec, Experiment, LocalSpec, SecretRef,
    StorageSpec, WorkloadIdentity,
};
use crate::error::{Error, Result};
use crate::plan::contract::{
    CODE_CONTAINER, MAIN_CONTAINER, REPORT_FILE, download_container, upload_container,
};
use crate::plan::{ExecutionPlan, Transfer};
use crate::store::{AzureCredential, StoreConfig};

pub mod blobfuse;
pub mod cached;
pub mod csi;
mod mount;
pub mod volumes;
pub use cached::{CacheChoice, CachedVolumes, choose_caches};
pub use mount::{
    BLOB_CSI_DRIVER, DefaultMountDriver, FILE_CSI_DRIVER, MountChoice, MountEnvironment,
    MountRefusal, POD_SECURITY_ENFORCE_LABEL, choose_drivers, mount_records,
};
pub use volumes::StorageVolumes;

/// The agent image when the operator is not told otherwise.
pub const DEFAULT_AGENT_IMAGE: &str = "ghcr.io/datastore-operator/datastore:0.1.0";
/// Where the operator's image holds the `datastore` binary: the command of every agent
/// container. Distroless images have no `/` on their `PATH`, so the path is absolute; the
/// Dockerfile copies the binary here (tests/image.rs checks that they agree).
pub const IMAGE_BINARY: &str = "/datastore";
/// The staging volume's size (downloads) when the spec does not give one.
pub const DEFAULT_STAGING_SIZE: &str = "10Gi";
/// Where download containers see the whole staging volume: the room left on it is measured
/// there.
pub const STAGING_DIR: &str = "/mnt/.staging";
/// The outputs volume's size when the spec does not give one.
pub const DEFAULT_OUTPUTS_SIZE: &str = "10Gi";
/// How long minted credentials live when the spec sets no `activeDeadlineSeconds`.
pub const DEFAULT_DEADLINE_SECONDS: i64 = 24 * 3600;
/// What minted credentials outlive the run's deadline by: time for the upload Job.
pub const SAS_MARGIN_SECONDS: i64 = 3600;

/// Where agent containers find the datastores file.
pub const CREDENTIALS_DIR: &str = "/etc/datastore";
/// The key of the credentials Secret holding the datastores file.
pub const DATASTORES_KEY: &str = "datastores.yaml";
/// The user (and group) every generated container runs as: `nonroot` of distroless images.
pub const RUN_AS_USER: i64 = 65532;

/// Label naming the Experiment a child belongs to.
pub const EXPERIMENT_LABEL: &str = "datastore.dev/experiment";
/// Label naming the operator as the manager of a child.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGER: &str = "datastore-operator";

/// The label the Azure workload identity webhook selects the pods it mutates by (it injects the
/// federated token and `AZURE_*` variables into their containers).
pub const WORKLOAD_IDENTITY_LABEL: &str = "azure.workload.identity/use";
/// The webhook's pod annotation naming the containers it must leave alone (`;`-separated).
pub const WORKLOAD_IDENTITY_SKIP_ANNOTATION: &str = "azure.workload.identity/skip-containers";

const CREDENTIALS_VOLUME: &str = "credentials";
const STAGING_VOLUME: &str = "staging";
const OUTPUTS_VOLUME: &str = "outputs";

/// Settings of the operator the builders need.
#[derive(Clone, Debug, PartialEq)]
pub struct BuildContext {
    /// The image holding the `datastore` binary, run by the agent containers.
    pub agent_image: String,
    /// The outputs volume's size when the spec gives none.
    pub default_outputs_size: Quantity,
    /// The lifetime of minted credentials when the spec sets no deadline (seconds).
    pub default_deadline_seconds: i64,
    /// The outputs volume's storage class when the spec gives none (`None`: the cluster's
    /// default class).
    pub default_outputs_storage_class: Option<String>,
    /// The blobfuse2 sidecar image for `mount` references mounted by the sidecar driver.
    pub blobfuse_image: Option<String>,
    /// How mounts whose reference names no driver are mounted.
    pub default_mount_driver: DefaultMountDriver,
    /// The blobfuse2 sidecar's memory limit; its block cache is sized under it.
    pub sidecar_memory: Quantity,
    /// The blobfuse2 sidecar's CPU limit.
    pub sidecar_cpu: Quantity,
    /// What each agent container (code, downloads, uploads) requests and is limited to.
    pub agent_resources: ResourceRequirements,
    /// The staging volume's size when the spec gives none.
    pub default_staging_size: Quantity,
    /// Whether download references are served from the node cache when neither they nor their
    /// datastore say (`--cache-downloads`).
    pub cache_downloads: bool,
    /// How long agent containers ride through a storage outage (`--retry-budget`).
    pub retry_budget: std::time::Duration,
}

/// The blobfuse2 sidecar's memory limit when the operator is not told otherwise.
pub const DEFAULT_SIDECAR_MEMORY: &str = "1Gi";
/// The blobfuse2 sidecar's CPU limit when the operator is not told otherwise.
pub const DEFAULT_SIDECAR_CPU: &str = "2";
/// What the blobfuse2 sidecar requests of the CPU: it mostly waits on the network.
pub const SIDECAR_CPU_REQUEST: &str = "100m";

/// What each agent container requests and is limited to when the operator is not told
/// otherwise. A namespace with a compute ResourceQuota refuses pods whose containers do not
/// say; the engine's buffers stay under 50 MiB at its default concurrency, and its MD5 uses
/// about one core at full speed.
pub const DEFAULT_AGENT_CPU_REQUEST: &str = "100m";
pub const DEFAULT_AGENT_MEMORY_REQUEST: &str = "128Mi";
pub const DEFAULT_AGENT_CPU_LIMIT: &str = "2";
pub const DEFAULT_AGENT_MEMORY_LIMIT: &str = "512Mi";

/// Requests and limits of `cpu` and `memory`.
pub fn compute_resources(
    cpu_request: &str,
    memory_request: &str,
    cpu_limit: &str,
    memory_limit: &str,
) -> ResourceRequirements {
    let pair = |cpu: &str, memory: &str| {
        BTreeMap::from([
            ("cpu".to_string(), Quantity(cpu.to_string())),
            ("memory".to_string(), Quantity(memory.to_string())),
        ])
    };
    ResourceRequirements {
        requests: Some(pair(cpu_request, memory_request)),
        limits: Some(pair(cpu_limit, memory_limit)),
        ..Default::default()
    }
}

impl Default for BuildContext {
    fn default() -> Self {
        BuildContext {
            agent_image: DEFAULT_AGENT_IMAGE.to_string(),
            default_outputs_size: Quantity(DEFAULT_OUTPUTS_SIZE.to_string()),
            default_deadline_seconds: DEFAULT_DEADLINE_SECONDS,
            default_outputs_storage_class: None,
            blobfuse_image: None,
            default_mount_driver: DefaultMountDriver::default(),
            sidecar_memory: Quantity(DEFAULT_SIDECAR_MEMORY.to_string()),
            sidecar_cpu: Quantity(DEFAULT_SIDECAR_CPU.to_string()),
            agent_resources: compute_resources(
                DEFAULT_AGENT_CPU_REQUEST,
                DEFAULT_AGENT_MEMORY_REQUEST,
                DEFAULT_AGENT_CPU_LIMIT,
                DEFAULT_AGENT_MEMORY_LIMIT,
            ),
            default_staging_size: Quantity(DEFAULT_STAGING_SIZE.to_string()),
            cache_downloads: false,
            retry_budget: crate::store::retry::DEFAULT_BUDGET,
        }
    }
}

/// Everything the controller creates for one experiment, in creation order.
#[derive(Clone, Debug, PartialEq)]
pub struct Children {
    pub credentials: Option<Secret>,
    /// The Secrets CSI volumes and blobfuse2 sidecars read (one per volume), created before
    /// the Jobs.
    pub volume_secrets: Vec<Secret>,
    pub outputs: Option<PersistentVolumeClaim>,
    pub run: Job,
    pub upload: Option<Job>,
}

/// The longest Experiment name whose children's names fit: `<name>-upload` is the value of the
/// `batch.kubernetes.io/job-name` label on its pods, and label values hold 63 characters.
pub const MAX_NAME_LEN: usize = 63 - "-upload".len();

/// Whether the Experiment's name leaves room for its children's names and labels.
pub fn check_name(exp: &Experiment) -> Result<()> {
    let name = exp.name_any();
    if name.len() > MAX_NAME_LEN {
        return Err(Error::Config(format!(
            "the Experiment name {name} has {} characters; its Jobs' names and labels fit at most {MAX_NAME_LEN}: choose a shorter name",
            name.len()
        )));
    }
    Ok(())
}

/// Builds every child of `exp`. `mounts` are the drivers of the plan's mounts
/// ([`choose_drivers`]), `caches` which downloads the node cache serves ([`choose_caches`];
/// missing ones are downloaded into the pod); `now` is when minted credentials start to count
/// down.
pub fn build(
    exp: &Experiment,
    plan: &ExecutionPlan,
    datastores: &BTreeMap<String, StoreConfig>,
    ctx: &BuildContext,
    mounts: &[MountChoice],
    caches: &[CacheChoice],
    now: DateTime<Utc>,
) -> Result<Children> {
    assert_eq!(mounts.len(), plan.mounts.len(), "one driver per mount");
    check_name(exp)?;
    let deadline = exp
        .spec
        .active_deadline_seconds
        .unwrap_or(ctx.default_deadline_seconds);
    let storage = volumes::storage_volumes(
        exp,
        plan,
        datastores,
        ctx,
        mounts,
        sas_expiry(now, Some(deadline)),
    )?;
    let cached = cached::cached_volumes(
        exp,
        plan,
        datastores,
        caches,
        sas_expiry(now, Some(deadline)),
    )?;
    let datastores_file = render_credentials(plan, datastores, now, Some(deadline))?;
    let has_credentials = datastores_file.is_some();
    Ok(Children {
        credentials: datastores_file.map(|file| credentials_secret(exp, file)),
        outputs: outputs_pvc(exp, plan, ctx),
        run: run_job(
            exp,
            plan,
            datastores,
            ctx,
            &storage,
            &cached,
            has_credentials,
        ),
        upload: upload_job(exp, plan, datastores, ctx, &storage, has_credentials),
        volume_secrets: storage.secrets.into_iter().chain(cached.secrets).collect(),
    })
}

// ---------------------------------------------------------------------------------------------
// Names, labels, owner references

pub fn credentials_name(exp: &Experiment) -> String {
    format!("{}-credentials", exp.name_any())
}
pub fn run_job_name(exp: &Experiment) -> String {
    format!("{}-run", exp.name_any())
}
pub fn upload_job_name(exp: &Experiment) -> String {
    format!("{}-upload", exp.name_any())
}
pub fn outputs_name(exp: &Experiment) -> String {
    format!("{}-outputs", exp.name_any())
}

/// The labels of every child (and of the pods of its Jobs).
pub fn labels(exp: &Experiment) -> BTreeMap<String, String> {
    BTreeMap::from([
        (EXPERIMENT_LABEL.to_string(), exp.name_any()),
        (MANAGED_BY_LABEL.to_string(), MANAGER.to_string()),
    ])
}

/// The controller owner reference to `exp`: children are garbage-collected with it. An
/// Experiment read from the apiserver always has a uid; callers rendering a file set one.
pub fn owner_reference(exp: &Experiment) -> OwnerReference {
    OwnerReference {
        api_version: Experiment::api_version(&()).into_owned(),
        kind: Experiment::kind(&()).into_owned(),
        name: exp.name_any(),
        uid: exp.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

pub(crate) fn child_meta(exp: &Experiment, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: exp.metadata.namespace.clone(),
        labels: Some(labels(exp)),
        owner_references: Some(vec![owner_reference(exp)]),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Credentials

/// The datastores file the agent containers read: for each datastore the plan references, a
/// `Datastore` and (unless it needs none) a `Secret` `<ds>-sas` with `sasToken`. An account key
/// never leaves the controller: a SAS for the container with exactly the plan's permissions,
/// expiring at `now` + the deadline (`deadline_seconds`, else 24 h) + 1 h, stands in for it. A
/// SAS token is passed through as is; anonymous access and workload identity need no Secret.
/// An Azure Files share is the local directory where the agent containers mount it
/// (`/mnt/shares/<k>`, [`volumes`]). `None` when the plan references no datastore.
pub fn render_credentials(
    plan: &ExecutionPlan,
    datastores: &BTreeMap<String, StoreConfig>,
    now: DateTime<Utc>,
    deadline_seconds: Option<i64>,
) -> Result<Option<String>> {
    if plan.permissions.is_empty() {
        return Ok(None);
    }
    let expiry = sas_expiry(now, deadline_seconds);
    let shares = volumes::shares(plan, datastores);
    let mut docs = Vec::new();
    for (name, permissions) in &plan.permissions {
        let config = match datastores.get(name) {
            Some(StoreConfig::AzureBlob(config)) => config,
            Some(StoreConfig::AzureFile(config)) => {
                let k = shares
                    .iter()
                    .position(|(share, _)| share == name)
                    .expect("every share the plan uses has an index");
                let datastore = Datastore::new(
                    name,
                    DatastoreSpec {
                        storage: StorageSpec {
                            local: Some(LocalSpec {
                                path: volumes::share_dir(k),
                            }),
                            read_only: config.read_only,
                            ..StorageSpec::default()
                        },
                    },
                );
                docs.push(to_yaml(&datastore));
                continue;
            }
            Some(StoreConfig::Local { .. }) => {
                return Err(Error::Config(format!(
                    "datastore {name} is a local directory, which only the CLI can reach; use a datastore in Azure Blob Storage"
                )));
            }
            None => {
                return Err(Error::Config(format!(
                    "datastore {name} was not resolved; create it"
                )));
            }
        };
        let secret_name = format!("{name}-sas");
        let (credentials, token) = match &config.credential {
            AzureCredential::AccountKey(_) => {
                let token = volumes::mint_sas(name, config, *permissions, expiry)?;
                (Some(secret_credentials(&secret_name)), Some(token))
            }
            AzureCredential::SasToken(token) => (
                Some(secret_credentials(&secret_name)),
                Some(token.expose().to_string()),
            ),
            AzureCredential::WorkloadIdentity { client_id } => (
                Some(Credentials {
                    secret_ref: None,
                    workload_identity: Some(WorkloadIdentity {
                        client_id: client_id.clone(),
                    }),
                }),
                None,
            ),
            AzureCredential::Anonymous => (None, None),
        };
        let datastore = Datastore::new(
            name,
            DatastoreSpec {
                storage: StorageSpec {
                    azure_blob: Some(AzureBlobSpec {
                        account_name: config.account.clone(),
                        container_name: config.container.clone(),
                        endpoint: Some(config.endpoint.as_str().trim_end_matches('/').to_string()),
                        credentials,
                    }),
                    read_only: config.read_only,
                    ..StorageSpec::default()
                },
            },
        );
        docs.push(to_yaml(&datastore));
        if let Some(token) = token {
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(secret_name),
                    ..Default::default()
                },
                string_data: Some(BTreeMap::from([("sasToken".to_string(), token)])),
                ..Default::default()
            };
            docs.push(to_yaml(&secret));
        }
    }
    Ok(Some(docs.join("---\n")))
}

/// When minted credentials end: `now` + the deadline (`deadline_seconds`, else 24 h) + 1 h.
pub fn sas_expiry(now: DateTime<Utc>, deadline_seconds: Option<i64>) -> DateTime<Utc> {
    let deadline = deadline_seconds.unwrap_or(DEFAULT_DEADLINE_SECONDS).max(0);
    now + Duration::seconds(deadline + SAS_MARGIN_SECONDS)
}

fn secret_credentials(secret_name: &str) -> Credentials {
    Credentials {
        secret_ref: Some(SecretRef {
            name: secret_name.to_string(),
        }),
        workload_identity: None,
    }
}

/// One YAML document, with `apiVersion` and `kind` (k8s-openapi and kube types serialize them).
pub fn to_yaml<T: serde::Serialize>(object: &T) -> String {
    crate::yaml::to_string(object)
}

/// Secret `<exp>-credentials` holding the datastores file under `datastores.yaml`.
pub fn credentials_secret(exp: &Experiment, datastores_file: String) -> Secret {
    opaque_secret(
        exp,
        credentials_name(exp),
        [(DATASTORES_KEY, datastores_file)],
    )
}

/// A Secret's values as text (its `data`, decoded as UTF-8; `stringData` as is): what a pod
/// reading it sees.
pub fn secret_values(secret: &Secret) -> BTreeMap<String, String> {
    let data = secret.data.iter().flatten().map(|(k, v)| {
        (
            k.clone(),
            String::from_utf8(v.0.clone()).expect("the controller's Secrets hold text"),
        )
    });
    let string_data = secret
        .string_data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()));
    data.chain(string_data).collect()
}

/// An Opaque Secret owned by `exp`, its values in `data`: never `stringData`, which is
/// write-only and merges under server-side apply, so a key the controller stops applying would
/// linger.
pub(crate) fn opaque_secret<const N: usize>(
    exp: &Experiment,
    name: String,
    entries: [(&str, String); N],
) -> Secret {
    Secret {
        metadata: child_meta(exp, name),
        type_: Some("Opaque".to_string()),
        data: Some(
            entries
                .into_iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
                .collect(),
        ),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Pod security

/// Pod level of "restricted": non-root as [`RUN_AS_USER`], volumes group-owned by it, seccomp
/// RuntimeDefault.
fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS_USER),
        run_as_group: Some(RUN_AS_USER),
        fs_group: Some(RUN_AS_USER),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_string(),
            localhost_profile: None,
        }),
        ..Default::default()
    }
}

/// Container level of "restricted"; agent containers also get a read-only root filesystem and
/// an explicit user.
fn container_security(agent: bool) -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: agent.then_some(RUN_AS_USER),
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: agent.then_some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_string()]),
            add: None,
        }),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Volumes

/// The volume download references are staged on (`spec.staging`): an emptyDir of at most the
/// staging size on the node's disk (the default), a generic ephemeral volume of that size from
/// a StorageClass, or an existing claim. `None` when nothing is downloaded into the pod.
fn staging_volume(exp: &Experiment, staged: bool, ctx: &BuildContext) -> Option<Volume> {
    if !staged {
        return None;
    }
    let staging = exp.spec.staging.clone().unwrap_or_default();
    let mut volume = Volume {
        name: STAGING_VOLUME.to_string(),
        ..Default::default()
    };
    let size = staging_size(exp, ctx);
    match (&staging.claim_name, &staging.storage_class_name) {
        (Some(claim), _) => {
            volume.persistent_volume_claim = Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: None,
            });
        }
        (None, Some(class)) => {
            volume.ephemeral = Some(EphemeralVolumeSource {
                volume_claim_template: Some(PersistentVolumeClaimTemplate {
                    metadata: Some(ObjectMeta {
                        labels: Some(labels(exp)),
                        ..Default::default()
                    }),
                    spec: PersistentVolumeClaimSpec {
                        access_modes: Some(vec!["ReadWriteOnce".to_string()]),
                        storage_class_name: Some(class.clone()),
                        resources: Some(VolumeResourceRequirements {
                            requests: Some(BTreeMap::from([(
                                "storage".to_string(),
                                size.clone().expect("a volume made for the run has a size"),
                            )])),
                            limits: None,
                        }),
                        ..Default::default()
                    },
                }),
            });
        }
        (None, None) => {
            volume.empty_dir = Some(EmptyDirVolumeSource {
                size_limit: size,
                ..Default::default()
            });
        }
    }
    Some(volume)
}

/// The most the inputs may take on the staging volume; `None` on an existing claim (its free
/// space is what fits).
pub fn staging_size(exp: &Experiment, ctx: &BuildContext) -> Option<Quantity> {
    let staging = exp.spec.staging.clone().unwrap_or_default();
    if staging.claim_name.is_some() {
        return None;
    }
    Some(
        staging
            .size
            .unwrap_or_else(|| ctx.default_staging_size.clone()),
    )
}

/// Where download reference `n` lands on the staging volume: a folder of the run's own on an
/// existing claim, which may hold earlier runs' folders.
fn staging_sub_path(exp: &Experiment, n: usize) -> String {
    let on_claim = exp
        .spec
        .staging
        .as_ref()
        .is_some_and(|s| s.claim_name.is_some());
    match &exp.metadata.uid {
        Some(uid) if on_claim => format!("{uid}/download-{n}"),
        _ => format!("download-{n}"),
    }
}

/// The directory of upload reference `n` on the outputs volume.
fn upload_sub_path(n: usize) -> String {
    format!("upload-{n}")
}

fn credentials_volume(exp: &Experiment) -> Volume {
    Volume {
        name: CREDENTIALS_VOLUME.to_string(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(credentials_name(exp)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn credentials_mount() -> VolumeMount {
    VolumeMount {
        name: CREDENTIALS_VOLUME.to_string(),
        mount_path: CREDENTIALS_DIR.to_string(),
        read_only: Some(true),
        ..Default::default()
    }
}

fn outputs_volume(exp: &Experiment) -> Volume {
    Volume {
        name: OUTPUTS_VOLUME.to_string(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: outputs_name(exp),
            read_only: None,
        }),
        ..Default::default()
    }
}

fn outputs_mount(n: usize, transfer: &Transfer, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: OUTPUTS_VOLUME.to_string(),
        mount_path: transfer.local_path.clone(),
        sub_path: Some(upload_sub_path(n)),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

fn datastores_path() -> String {
    format!("{CREDENTIALS_DIR}/{DATASTORES_KEY}")
}

fn agent_container(
    name: String,
    ctx: &BuildContext,
    args: Vec<String>,
    mut mounts: Vec<VolumeMount>,
    has_credentials: bool,
) -> Container {
    if has_credentials {
        mounts.push(credentials_mount());
    }
    Container {
        name,
        image: Some(ctx.agent_image.clone()),
        command: Some(vec![IMAGE_BINARY.to_string()]),
        args: Some(args),
        volume_mounts: Some(mounts),
        resources: Some(ctx.agent_resources.clone()),
        security_context: Some(container_security(true)),
        termination_message_policy: Some("File".to_string()),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// The run Job

/// Job `<exp>-run`: an init container `code` when the code comes from a datastore, one
/// `download-<n>` per download reference (for one the node cache serves, a check of its volume
/// `cache-<n>`), a blobfuse2 sidecar `mount-<n>` per mount it mounts, then `main` with every
/// folder in place. An agent container copying from a share mounts it read-only.
pub fn run_job(
    exp: &Experiment,
    plan: &ExecutionPlan,
    datastores: &BTreeMap<String, StoreConfig>,
    ctx: &BuildContext,
    storage: &StorageVolumes,
    cached: &CachedVolumes,
    has_credentials: bool,
) -> Job {
    let spec = &exp.spec;
    let mut volumes = Vec::new();
    let mut init_containers = Vec::new();
    let mut main_mounts = Vec::new();
    let mut share_volumes: Vec<Volume> = Vec::new();

    // The code first (`spec.code`), so the working directory is complete before the script
    // starts; the script may write next to its code, as it may on a laptop. Data references
    // are read-only for the script.
    // The code on an emptyDir of its own (it is small: `datastore submit` caps it); the
    // downloads on the staging volume, a folder each, measured against its size.
    let code = plan
        .code
        .iter()
        .map(|code| (CODE_CONTAINER.to_string(), code, Landing::Code));
    // A download the node cache serves is its read-only volume, which its container checks.
    let references = plan.downloads.iter().enumerate().map(|(n, download)| {
        let landing = match cached.volumes.get(&n) {
            Some(volume) => Landing::Cached(volume.name.clone()),
            None => Landing::Staged(staging_sub_path(exp, n)),
        };
        (download_container(n), download, landing)
    });
    if plan.code.is_some() {
        volumes.push(Volume {
            name: CODE_CONTAINER.to_string(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        });
    }
    let staging = staging_volume(exp, plan.downloads.len() > cached.volumes.len(), ctx);
    let staging_size = staging_size(exp, ctx);
    let on_node_disk = staging.as_ref().is_some_and(|v| v.empty_dir.is_some());
    volumes.extend(staging);
    volumes.extend(cached.volumes.values().cloned());
    for (name, download, landing) in code.chain(references) {
        let (volume, sub_path) = match &landing {
            Landing::Code => (CODE_CONTAINER.to_string(), None),
            Landing::Staged(sub_path) => (STAGING_VOLUME.to_string(), Some(sub_path.clone())),
            Landing::Cached(volume) => (volume.clone(), None),
        };
        let staged = matches!(landing, Landing::Staged(_));
        let from_cache = matches!(landing, Landing::Cached(_));
        let mount = |read_only: bool| VolumeMount {
            name: volume.clone(),
            mount_path: download.local_path.clone(),
            sub_path: sub_path.clone(),
            read_only: read_only.then_some(true),
            ..Default::default()
        };
        let mut agent_mounts = vec![mount(from_cache)];
        let mut args: Vec<String> = vec![
            "agent".into(),
            "download".into(),
            "--datastores".into(),
            datastores_path(),
            "--datastore".into(),
            download.datastore.clone(),
            "--retry-budget".into(),
            crate::duration::format(ctx.retry_budget),
            "--path".into(),
            download.remote_path.clone(),
            "--target".into(),
            download.local_path.clone(),
            "--report".into(),
            REPORT_FILE.into(),
        ];
        if from_cache {
            args.push("--cached".into());
        }
        if staged {
            // The whole staging volume, to measure what earlier downloads left of it.
            agent_mounts.push(VolumeMount {
                name: STAGING_VOLUME.to_string(),
                mount_path: STAGING_DIR.to_string(),
                ..Default::default()
            });
            args.extend(["--staging-dir".into(), STAGING_DIR.into()]);
            if let Some(size) = &staging_size {
                args.extend(["--staging-size".into(), size.0.clone()]);
            }
        }
        if let Some(share) = storage.share_mount(&download.datastore, true) {
            if !share_volumes.iter().any(|v| v.name == share.name) {
                share_volumes.extend(storage.share_volume(
                    &download.datastore,
                    datastores,
                    exp,
                    true,
                ));
            }
            agent_mounts.push(share);
        }
        let mut container = agent_container(name, ctx, args, agent_mounts, has_credentials);
        if staged
            && on_node_disk
            && let (Some(size), Some(resources)) = (&staging_size, container.resources.as_mut())
        {
            // The scheduler then places the pod where the inputs fit, and the kubelet does not
            // pick it to evict under disk pressure while it stays within.
            resources
                .requests
                .get_or_insert_with(BTreeMap::new)
                .insert("ephemeral-storage".to_string(), size.clone());
        }
        init_containers.push(container);
        main_mounts.push(mount(!matches!(landing, Landing::Code)));
    }
    volumes.extend(share_volumes);
    // The sidecars last: their mounts are up when `main` starts, not during the downloads.
    init_containers.extend(storage.sidecars.iter().cloned());
    volumes.extend(storage.mount_volumes.iter().cloned());
    main_mounts.extend(storage.main_mounts.iter().cloned());
    if !plan.uploads.is_empty() {
        volumes.push(outputs_volume(exp));
        main_mounts.extend(
            plan.uploads
                .iter()
                .enumerate()
                .map(|(n, upload)| outputs_mount(n, upload, false)),
        );
    }
    // Only init containers mount it; without downloads nothing does.
    if has_credentials && (!plan.downloads.is_empty() || plan.code.is_some()) {
        volumes.push(credentials_volume(exp));
    }

    let env: Vec<EnvVar> = spec
        .env
        .iter()
        .cloned()
        .chain(plan.env.iter().map(|e| EnvVar {
            name: e.name.clone(),
            value: Some(e.value.clone()),
            value_from: None,
        }))
        .collect();
    let (working_dir, command, args) = main_command(plan);
    let main = Container {
        name: MAIN_CONTAINER.to_string(),
        // The planner refused a cluster run without an image.
        image: spec.image.clone(),
        working_dir,
        command: Some(command),
        args: Some(args),
        env: (!env.is_empty()).then_some(env),
        resources: spec.resources.clone(),
        volume_mounts: (!main_mounts.is_empty()).then_some(main_mounts),
        security_context: Some(container_security(false)),
        // A script that fails leaves its last log lines (a traceback) as the message the
        // controller puts in the Experiment's status.
        termination_message_policy: Some("FallbackToLogsOnError".to_string()),
        ..Default::default()
    };

    // The agents that read a datastore with workload identity need the webhook's token; the
    // script's container and the sidecars get none of it.
    let identity = uses_workload_identity(plan.code.iter().chain(&plan.downloads), datastores)
        .then(|| {
            std::iter::once(main.name.clone())
                .chain(storage.sidecars.iter().map(|c| c.name.clone()))
                .collect()
        });
    let pod = PodSpec {
        restart_policy: Some("Never".to_string()),
        init_containers: (!init_containers.is_empty()).then_some(init_containers),
        containers: vec![main],
        volumes: (!volumes.is_empty()).then_some(volumes),
        node_selector: (!spec.node_selector.is_empty()).then(|| spec.node_selector.clone()),
        tolerations: (!spec.tolerations.is_empty()).then(|| spec.tolerations.clone()),
        service_account_name: spec.service_account_name.clone(),
        security_context: Some(pod_security()),
        ..Default::default()
    };
    let mut run = job(
        exp,
        run_job_name(exp),
        pod,
        identity,
        // The SDK runs a script once: a retry would download again and write into the same
        // outputs, mixing attempts. Retrying is the spec's opt-in.
        Some(spec.backoff_limit.unwrap_or(0)),
        run_deadline(exp, plan, ctx),
    );
    if let Some(job) = run.spec.as_mut() {
        job.pod_failure_policy = Some(retry_disruptions());
        if !cached.annotations.is_empty()
            && let Some(meta) = job.template.metadata.as_mut()
        {
            meta.annotations
                .get_or_insert_with(BTreeMap::new)
                .extend(cached.annotations.clone());
        }
    }
    run
}

/// Where an init container's folder lands in the run pod.
enum Landing {
    /// The code's own emptyDir.
    Code,
    /// This folder (its `subPath`) of the staging volume.
    Staged(String),
    /// This read-only volume of the node cache, already filled.
    Cached(String),
}

/// A pod lost to a disruption (preemption, eviction, a node drained: the `DisruptionTarget`
/// condition) is replaced without counting towards `backoffLimit`: not the script's failure.
fn retry_disruptions() -> PodFailurePolicy {
    PodFailurePolicy {
        rules: vec![PodFailurePolicyRule {
            action: "Ignore".to_string(),
            on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                type_: "DisruptionTarget".to_string(),
                status: Some("True".to_string()),
            }]),
            on_exit_codes: None,
        }],
    }
}

/// Whether any of `transfers` reads or writes a datastore that authenticates with workload
/// identity.
fn uses_workload_identity<'a>(
    transfers: impl IntoIterator<Item = &'a Transfer>,
    datastores: &BTreeMap<String, StoreConfig>,
) -> bool {
    transfers.into_iter().any(|t| {
        matches!(
            datastores.get(&t.datastore),
            Some(StoreConfig::AzureBlob(config))
                if matches!(config.credential, AzureCredential::WorkloadIdentity { .. })
        )
    })
}

/// The run Job's `activeDeadlineSeconds`: the spec's. A run with mounts gets the operator's
/// default when the spec sets none, because the mounts' SAS tokens expire an hour after it: the
/// run is stopped with a clear reason rather than left to fail on expired credentials.
pub fn run_deadline(exp: &Experiment, plan: &ExecutionPlan, ctx: &BuildContext) -> Option<i64> {
    exp.spec
        .active_deadline_seconds
        .or((!plan.mounts.is_empty()).then_some(ctx.default_deadline_seconds))
}

/// The script's working directory, command and args. An absolute `sourceDirectory` is the
/// container's working directory. A relative one (a folder under the image's WORKDIR, as the
/// SDK's `source_directory` is relative) cannot be: a container's working directory must be
/// absolute. Then a shell enters it first, each argument passed as a positional parameter (no
/// quoting to get wrong); this needs `sh` in the image.
pub fn main_command(plan: &ExecutionPlan) -> (Option<String>, Vec<String>, Vec<String>) {
    match &plan.working_dir {
        Some(dir) if !dir.starts_with('/') => {
            let mut args = vec![
                "-c".to_string(),
                r#"cd -- "$0" && exec "$@""#.to_string(),
                dir.clone(),
            ];
            args.extend(plan.command.iter().cloned());
            args.extend(plan.args.iter().cloned());
            (None, vec!["sh".to_string()], args)
        }
        dir => (dir.clone(), plan.command.clone(), plan.args.clone()),
    }
}

/// A Job of `pod`. `workload_identity`: the pod is labelled for the Azure workload identity
/// webhook, which skips the containers named.
fn job(
    exp: &Experiment,
    name: String,
    pod: PodSpec,
    workload_identity: Option<Vec<String>>,
    backoff_limit: Option<i32>,
    active_deadline_seconds: Option<i64>,
) -> Job {
    let mut pod_labels = labels(exp);
    let mut annotations = BTreeMap::new();
    if let Some(skip) = workload_identity {
        pod_labels.insert(WORKLOAD_IDENTITY_LABEL.to_string(), "true".to_string());
        if !skip.is_empty() {
            annotations.insert(
                WORKLOAD_IDENTITY_SKIP_ANNOTATION.to_string(),
                skip.join(";"),
            );
        }
    }
    Job {
        metadata: child_meta(exp, name),
        spec: Some(JobSpec {
            backoff_limit,
            active_deadline_seconds,
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: (!annotations.is_empty()).then_some(annotations),
                    ..Default::default()
                }),
                spec: Some(pod),
            },
            ..Default::default()
        }),
        status: None,
    }
}

// ---------------------------------------------------------------------------------------------
// Outputs: the PVC and the upload Job

/// PVC `<exp>-outputs` (ReadWriteOnce), when the plan has uploads.
pub fn outputs_pvc(
    exp: &Experiment,
    plan: &ExecutionPlan,
    ctx: &BuildContext,
) -> Option<PersistentVolumeClaim> {
    if plan.uploads.is_empty() {
        return None;
    }
    let outputs = exp.spec.outputs.clone().unwrap_or_default();
    let size = outputs
        .size
        .unwrap_or_else(|| ctx.default_outputs_size.clone());
    Some(PersistentVolumeClaim {
        metadata: child_meta(exp, outputs_name(exp)),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_string()]),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_string(), size)])),
                limits: None,
            }),
            storage_class_name: outputs
                .storage_class_name
                .or_else(|| ctx.default_outputs_storage_class.clone()),
            ..Default::default()
        }),
        status: None,
    })
}

/// Job `<exp>-upload`: a container `upload-<n>` per upload reference, reading the outputs
/// volume at the same paths the script wrote to (and writing to its share, read-write, when the
/// datastore is one). `None` without uploads.
pub fn upload_job(
    exp: &Experiment,
    plan: &ExecutionPlan,
    datastores: &BTreeMap<String, StoreConfig>,
    ctx: &BuildContext,
    storage: &StorageVolumes,
    has_credentials: bool,
) -> Option<Job> {
    if plan.uploads.is_empty() {
        return None;
    }
    let mut volumes = vec![outputs_volume(exp)];
    let containers = plan
        .uploads
        .iter()
        .enumerate()
        .map(|(n, upload)| {
            let mut args: Vec<String> = vec![
                "agent".into(),
                "upload".into(),
                "--datastores".into(),
                datastores_path(),
                "--datastore".into(),
                upload.datastore.clone(),
                "--retry-budget".into(),
                crate::duration::format(ctx.retry_budget),
                "--src-dir".into(),
                upload.local_path.clone(),
                "--path".into(),
                upload.remote_path.clone(),
                "--report".into(),
                REPORT_FILE.into(),
            ];
            if upload.overwrite {
                args.push("--overwrite".into());
            }
            let mut mounts = vec![outputs_mount(n, upload, true)];
            if let Some(share) = storage.share_mount(&upload.datastore, false) {
                if !volumes.iter().any(|v: &Volume| v.name == share.name) {
                    volumes.extend(storage.share_volume(&upload.datastore, datastores, exp, false));
                }
                mounts.push(share);
            }
            agent_container(upload_container(n), ctx, args, mounts, has_credentials)
        })
        .collect();
    if has_credentials {
        volumes.push(credentials_volume(exp));
    }
    // The run's service account (workload identity federates it) and placement: the outputs
    // claim may be bound to a zonal disk that only the run's node pools reach.
    let spec = &exp.spec;
    let pod = PodSpec {
        restart_policy: Some("Never".to_string()),
        containers,
        volumes: Some(volumes),
        node_selector: (!spec.node_selector.is_empty()).then(|| spec.node_selector.clone()),
        tolerations: (!spec.tolerations.is_empty()).then(|| spec.tolerations.clone()),
        service_account_name: spec.service_account_name.clone(),
        security_context: Some(pod_security()),
        ..Default::default()
    };
    let identity = uses_workload_identity(&plan.uploads, datastores).then(Vec::new);
    Some(job(exp, upload_job_name(exp), pod, identity, None, None))
}

#[cfg(test)]
mod tests;
