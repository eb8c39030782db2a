//! `Experiment`: a training script run with data references, shaped after the Azure ML SDK's
//! estimator (`image`, `source_directory`, `entry_script`, `script_params`, `compute_target`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::limits::{
    ARG_MAX_CHARS, CLAIM_NAME, COMMAND_LINE_MESSAGE, COMMAND_LINE_RULE, DATASTORE_NAME, NAME_MAX,
    NAME_RULE, SERVICE_ACCOUNT_NAME, STORAGE_CLASS_NAME,
};

/// The message of the rule refusing `mount` on the local compute target. Its first clause is the
/// Azure ML SDK's reason, which the planner's error repeats.
pub const MOUNT_ON_LOCAL: &str = "mount is only available on a remote compute target; with computeTarget local, use mode download";

/// The message of the rule requiring `image` on the cluster (the planner refuses the same).
pub const IMAGE_ON_CLUSTER: &str = "image is required on the cluster compute target: name a container image, e.g. python:3.12-slim";

/// A training script run with access to datastores. A `download` reference is copied into a
/// local folder before the script starts, an `upload` reference's folder is copied to the
/// datastore after the run, and a `mount` reference appears as a folder while the script runs;
/// each reference's path on compute is passed to the script as the value of its parameter.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "datastore.dev",
    version = "v1alpha1",
    kind = "Experiment",
    namespaced,
    shortname = "exp",
    category = "datastore",
    status = "ExperimentStatus",
    doc = "A training script run with access to datastores: data references in its scriptParams are downloaded before the script starts, uploaded after it ends, or mounted while it runs, and passed to the script as paths.",
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Where the run is: Pending, Downloading, Running, Uploading, Succeeded or Failed"
    ),
    printcolumn(
        name = "Transferred",
        type_ = "string",
        json_path = ".status.progress.transferred",
        description = "While Downloading or Uploading: bytes moved of the reference in progress, e.g. 3.2Gi/10Gi"
    ),
    printcolumn(
        name = "%",
        type_ = "string",
        json_path = ".status.progress.percent",
        description = "While Downloading or Uploading: how much of the reference in progress has moved"
    ),
    printcolumn(
        name = "ETA",
        type_ = "string",
        json_path = ".status.progress.eta",
        description = "While Downloading or Uploading: time left at the current rate"
    ),
    printcolumn(
        name = "Rate",
        type_ = "string",
        json_path = ".status.progress.rate",
        priority = 1,
        description = "While Downloading or Uploading: bytes per second over the last seconds"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.message",
        description = "What happened last, for humans"
    )
)]
#[x_kube(
    cel,
    validation = Rule::new("!(has(self.computeTarget) && self.computeTarget == 'local' && has(self.scriptParams) && self.scriptParams.exists(p, has(p.dataReference) && p.dataReference.mode == 'mount'))").message(MOUNT_ON_LOCAL),
    validation = Rule::new("has(self.image) || (has(self.computeTarget) && self.computeTarget == 'local')").message(IMAGE_ON_CLUSTER),
    validation = Rule::new(COMMAND_LINE_RULE).message(COMMAND_LINE_MESSAGE)
)]
#[serde(rename_all = "camelCase")]
pub struct ExperimentSpec {
    /// The container image the script runs in on the cluster, e.g. `python:3.12-slim`. It must
    /// contain the interpreter and the script's dependencies. Required unless `computeTarget` is
    /// `local`, where the script runs with the machine's own interpreter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.size() > 0").message("image must name a container image, e.g. python:3.12-slim"))]
    pub image: Option<String>,
    /// The working directory of the script, holding `entryScript` (the SDK's
    /// `source_directory`), e.g. `experiment_folder`. Relative paths are resolved against the
    /// image's working directory and entered with `sh` (which the image must then have); an
    /// absolute path needs no shell. Absent means the image's working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_directory: Option<String>,
    /// Where the script's code comes from when the image does not hold it: a datastore folder
    /// downloaded before the script starts (`/mnt/code` in the cluster), which becomes the
    /// working directory; a relative `sourceDirectory` is then a folder inside it. `datastore
    /// submit` sets it to a snapshot of the local `sourceDirectory`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<CodeReference>,
    /// The script to run, relative to `sourceDirectory`, e.g. `training_script.py`. It runs as
    /// `python <entryScript> <scriptParams...>` unless `command` is given.
    #[schemars(length(max = ARG_MAX_CHARS))]
    #[x_kube(validation = Rule::new("self.size() > 0").message("entryScript must name the script to run, e.g. training_script.py"))]
    pub entry_script: String,
    /// The command line to run instead of `python <entryScript>`, e.g.
    /// `[torchrun, --nproc_per_node=2, train.py]`. The rendered `scriptParams` follow it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = ARG_MAX_CHARS)))]
    #[x_kube(validation = Rule::new("self.size() > 0").message("command, when set, must hold at least the program to run"))]
    pub command: Option<Vec<String>>,
    /// Where the script runs: `cluster` (a Job in this cluster, the default) or `local` (the
    /// `datastore run` CLI on the machine it runs on; `mount` references are not available there).
    #[serde(default)]
    pub compute_target: ComputeTarget,
    /// The script's command-line parameters, in order. Each is a `name` with either a literal
    /// `value` or a `dataReference`, whose path on compute becomes the value, e.g.
    /// `--data_folder /mnt/datastore/training_data`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.all(p, self.exists_one(q, q.name == p.name))").message("scriptParams names must be unique"))]
    pub script_params: Vec<ScriptParam>,
    /// Compute resources of the script's container (requests and limits of cpu, memory,
    /// `nvidia.com/gpu`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node labels the script's pod must match, e.g. `{agentpool: gpu}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the script's pod, e.g. for tainted GPU node pools.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// The service account the script's pod runs as. It never needs storage permissions: the
    /// operator's agent containers move the data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = NAME_MAX))]
    #[x_kube(validation = Rule::new(NAME_RULE).message(SERVICE_ACCOUNT_NAME))]
    pub service_account_name: Option<String>,
    /// Extra environment variables of the script's container. Each data reference also gets
    /// `AZUREML_DATAREFERENCE_<NAME>` holding its path on compute.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// How long the run may take, in seconds, before it is stopped and marked Failed. It also
    /// bounds the lifetime of the credentials minted for the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0").message("activeDeadlineSeconds must be positive"))]
    pub active_deadline_seconds: Option<i64>,
    /// How many times a failed run is retried before the experiment is Failed (the Job's
    /// `backoffLimit`). Default 0: a script that fails is not run again, as in the SDK (a retry
    /// downloads again and writes into the same outputs). A pod lost to a disruption
    /// (preemption, eviction, a drained node) is replaced without counting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("backoffLimit must not be negative"))]
    pub backoff_limit: Option<i32>,
    /// When outputs of `upload` references are uploaded: `OnSuccess` (the default, only when the
    /// script succeeded) or `Always` (also after a failed run, e.g. to keep logs and checkpoints).
    #[serde(default)]
    pub upload_policy: UploadPolicy,
    /// The volume that holds the outputs of `upload` references until they are uploaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<OutputsVolume>,
    /// Where `download` references are staged in the run's pod before the script starts.
    /// Absent means an emptyDir on the node's disk of the operator's default size (10Gi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staging: Option<Staging>,
}

/// Where an experiment runs.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ComputeTarget {
    /// A Job in the cluster the Experiment is in.
    #[default]
    Cluster,
    /// The machine running `datastore run` (no cluster).
    Local,
}

/// When the outputs of `upload` references are uploaded.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UploadPolicy {
    /// Only after the script succeeded.
    #[default]
    OnSuccess,
    /// After the script ended, whether it succeeded or failed.
    Always,
}

/// A datastore folder holding the script's code.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CodeReference {
    /// The name of a Datastore in the experiment's namespace or of a ClusterDatastore.
    #[schemars(length(min = 1, max = NAME_MAX))]
    #[x_kube(validation = Rule::new(NAME_RULE).message(DATASTORE_NAME))]
    pub datastore: String,
    /// The folder in the datastore, e.g. `snapshots/sha256-3f2a...`; its contents become the
    /// working directory.
    #[schemars(length(min = 1, max = 1024))]
    pub path: String,
}

impl ExperimentSpec {
    /// Each datastore the experiment uses, once, with the first thing using it (`parameter
    /// --data_folder`, or `code`), in spec order.
    pub fn datastore_uses(&self) -> Vec<(String, &str)> {
        let params = self.script_params.iter().filter_map(|p| {
            p.data_reference
                .as_ref()
                .map(|r| (format!("parameter {}", p.name), r.datastore.as_str()))
        });
        let code = self
            .code
            .iter()
            .map(|c| ("code".to_string(), c.datastore.as_str()));
        let mut uses: Vec<(String, &str)> = Vec::new();
        for (user, name) in params.chain(code) {
            if !uses.iter().any(|(_, seen)| *seen == name) {
                uses.push((user, name));
            }
        }
        uses
    }
}

/// One command-line parameter of the script.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    cel,
    validation = Rule::new("has(self.value) != has(self.dataReference)").message("set exactly one of value or dataReference in each scriptParams entry")
)]
#[serde(rename_all = "camelCase")]
pub struct ScriptParam {
    /// The parameter as the script reads it, usually a flag such as `--data_folder`. Rendered
    /// as `<name> <value>`.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// A literal value, e.g. `"0.1"`. At most 32,000 characters: the kernel refuses to start a
    /// program with an argument over 128 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = ARG_MAX_CHARS))]
    pub value: Option<String>,
    /// A datastore path made available to the script; the parameter's value is its path on
    /// compute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_reference: Option<DataReference>,
}

/// A path in a datastore, made available to the script at a path on compute.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    cel,
    validation = Rule::new("!has(self.overwrite) || !self.overwrite || self.mode == 'upload'").message("overwrite applies to upload references only"),
    validation = Rule::new("!has(self.readOnly) || self.mode == 'mount'").message("readOnly applies to mount references only; download references are always read-only for the script"),
    validation = Rule::new("!has(self.mountDriver) || self.mode == 'mount'").message("mountDriver applies to mount references only"),
    validation = Rule::new("!has(self.cache) || self.mode == 'download'").message("cache applies to download references only")
)]
#[serde(rename_all = "camelCase")]
pub struct DataReference {
    /// The name of a Datastore in the experiment's namespace or of a ClusterDatastore.
    #[schemars(length(min = 1, max = NAME_MAX))]
    #[x_kube(validation = Rule::new(NAME_RULE).message(DATASTORE_NAME))]
    pub datastore: String,
    /// The path in the datastore, e.g. `data/files`. Empty (the default) means the whole
    /// container. For `upload`, what the script writes under the path on compute lands under
    /// this path (the folder's contents, not the folder itself).
    #[serde(default)]
    pub path: String,
    /// How the data reaches the script: `download` (copied to compute before the script
    /// starts), `upload` (copied from compute to the datastore after the run) or `mount` (a
    /// folder backed by the datastore while the script runs, read-only by default; cluster
    /// only).
    pub mode: Mode,
    /// Where the data is on compute, relative to the data root (`/mnt/datastore` in the
    /// cluster), e.g. `training_data`. Defaults to the parameter name without leading dashes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new("self.matches('^[^/]+(/[^/]+)*$') && !self.matches('(^|/)[.][.]?(/|$)')").message(PATH_ON_COMPUTE))]
    pub path_on_compute: Option<String>,
    /// For `upload`: replace blobs that already exist under `path` (the SDK's
    /// `as_upload(overwrite=True)`). Without it, an output whose blob exists is kept as it is
    /// and counted as skipped, so a second run into the same path does not replace the first
    /// run's files.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub overwrite: bool,
    /// For `mount`: whether the script may only read the mounted folder (the default, `true`).
    /// `false` lets it write there too: what it writes goes to the datastore as it writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    /// For `mount`: how the folder is mounted, overriding the operator's default. `csi` (an
    /// inline volume of the Azure Blob or Azure Files CSI driver) or `sidecar` (a blobfuse2
    /// container next to the script, which must run privileged; Azure Blob only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_driver: Option<MountDriver>,
    /// For `download`: serve the folder from the node cache (the CSI driver
    /// `cache.datastore.dev`, where the cluster has it): the first run on a node downloads it,
    /// every later run there with the same data gets it at once, read-only. `false` always
    /// downloads into the pod. Absent means the datastore's `cacheDownloads`, else the
    /// operator's default. On the local compute target: `datastore run`'s download cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<bool>,
}

impl DataReference {
    /// Whether the script may only read the data: always for `download`, by default for `mount`.
    pub fn read_only(&self) -> bool {
        match self.mode {
            Mode::Download => true,
            Mode::Upload => false,
            Mode::Mount => self.read_only.unwrap_or(true),
        }
    }
}

/// How a `mount` reference is mounted.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum MountDriver {
    /// An inline CSI volume: `blob.csi.azure.com` (blobfuse2 run by the driver on the node) or
    /// `file.csi.azure.com` (SMB). Needs the driver installed (AKS: the storage add-ons).
    Csi,
    /// A blobfuse2 native sidecar in the pod, mounting into a shared volume. Needs a privileged
    /// container, so the namespace must allow privileged pods. Azure Blob only.
    Sidecar,
}

impl MountDriver {
    pub fn as_str(self) -> &'static str {
        match self {
            MountDriver::Csi => "csi",
            MountDriver::Sidecar => "sidecar",
        }
    }
}

/// The message of the `pathOnCompute` rule (the planner checks the same rule and names the
/// problem it found).
pub const PATH_ON_COMPUTE: &str = "pathOnCompute must be a relative path such as training_data: no leading /, no empty, . or .. segments";

/// How a data reference reaches the script.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Copied from the datastore to compute before the script starts.
    Download,
    /// Copied from compute to the datastore after the run.
    Upload,
    /// A folder backed by the datastore while the script runs, read-only unless `readOnly:
    /// false` (cluster only).
    Mount,
}

/// The volume holding the outputs of `upload` references until they are uploaded.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OutputsVolume {
    /// The size of the volume, e.g. `10Gi`. Absent means the operator's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Quantity>,
    /// The StorageClass of the volume. Absent means the cluster's default StorageClass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = NAME_MAX))]
    #[x_kube(validation = Rule::new(NAME_RULE).message(STORAGE_CLASS_NAME))]
    pub storage_class_name: Option<String>,
}

/// Where `download` references land in the run's pod. Inputs that list more than fits are
/// refused before anything is downloaded, with the numbers.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(
    cel,
    validation = Rule::new("!(has(self.claimName) && (has(self.size) || has(self.storageClassName)))").message("staging.claimName names a volume that exists; size and storageClassName describe one made for the run: set one or the other")
)]
#[serde(rename_all = "camelCase")]
pub struct Staging {
    /// The most the inputs may take, e.g. `200Gi`. On the node's disk (the default) it is the
    /// emptyDir's `sizeLimit` and the pod's ephemeral-storage request, so the scheduler picks
    /// a node with that much room and the kubelet never evicts the pod for disk pressure it
    /// stays within; with `storageClassName`, the size of the volume made. Absent means the
    /// operator's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Quantity>,
    /// Stage on a volume of this StorageClass made for the run's pod and deleted with it (a
    /// generic ephemeral volume), e.g. a local NVMe class, instead of the node's disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = NAME_MAX))]
    #[x_kube(validation = Rule::new(NAME_RULE).message(STORAGE_CLASS_NAME))]
    pub storage_class_name: Option<String>,
    /// Stage on this existing PersistentVolumeClaim of the experiment's namespace, in a folder
    /// of the run's own (`<experiment uid>/download-<n>`); what fits is its free space. The
    /// folder is left there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = NAME_MAX))]
    #[x_kube(validation = Rule::new(NAME_RULE).message(CLAIM_NAME))]
    pub claim_name: Option<String>,
}

/// The observed state of an experiment.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExperimentStatus {
    /// Where the run is: Pending, Downloading, Running, Uploading, Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Detailed, machine-readable state (e.g. `Ready`, `Succeeded`), with reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the experiment reached Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// What happened last, for humans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The data the run saw: one record per `download` reference, as its download reported it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<InputRecord>,
    /// How each `mount` reference is mounted, and why that way.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<MountRecord>,
    /// While Downloading or Uploading: how far the transfer in progress is, as its agent
    /// container last said (read from its log every few seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<TransferProgress>,
}

/// How far one transfer is.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TransferProgress {
    /// The reference being transferred, e.g. `--data_folder` (`code` for the code).
    pub name: String,
    /// The agent container transferring it, e.g. `download-0`.
    pub container: String,
    pub files: i64,
    pub files_total: i64,
    pub bytes: i64,
    pub bytes_total: i64,
    /// Over the agent's last few seconds.
    pub bytes_per_second: i64,
    /// At the current rate; absent while nothing moves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<i64>,
    /// When the agent last said how far it was.
    pub last_update_time: Time,
    /// When bytes were last seen moving.
    pub last_moved_time: Time,
    /// For `kubectl get`: `3.2Gi/10Gi`.
    pub transferred: String,
    /// For `kubectl get`: `32%`.
    pub percent: String,
    /// For `kubectl get`: `4m`; absent while nothing moves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<String>,
    /// For `kubectl get -o wide`: `120Mi/s`.
    pub rate: String,
    /// While storage fails every request and the agent retries, as the agent last said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_unreachable: Option<StorageUnreachable>,
}

/// Storage has failed every request of a transfer for a while; its agent retries until the
/// operator's retry budget is spent.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StorageUnreachable {
    pub seconds: i64,
    /// How long the agent retries before the transfer fails.
    pub budget_seconds: i64,
    /// The last fault, e.g. `Connection refused (os error 111)` or `503 ServerBusy`.
    pub cause: String,
}

/// How one `mount` reference is mounted.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MountRecord {
    /// The parameter name, e.g. `--data_folder`.
    pub name: String,
    /// The datastore mounted.
    pub datastore: String,
    /// The path in the datastore.
    pub path: String,
    /// `csi` or `sidecar`.
    pub driver: MountDriver,
    /// Whether the script may only read the folder.
    pub read_only: bool,
    /// Why this driver, e.g. `the operator's default` or `requested by the reference`.
    pub reason: String,
}

/// Where the run is: Pending, Downloading, Running, Uploading, Succeeded or Failed.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Accepted, waiting for its datastores or for its pod to be scheduled.
    Pending,
    /// Copying `download` references to compute.
    Downloading,
    /// The script is running.
    Running,
    /// Copying the outputs of `upload` references to their datastores.
    Uploading,
    /// The script and every upload succeeded.
    Succeeded,
    /// The spec is invalid, a datastore is missing, or the script or a transfer failed.
    Failed,
}

/// What one `download` reference delivered to the run.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InputRecord {
    /// The parameter name, e.g. `--data_folder`.
    pub name: String,
    /// The datastore the data came from.
    pub datastore: String,
    /// The path in the datastore.
    pub path: String,
    /// How many files were delivered.
    pub files: i64,
    /// How many bytes were delivered.
    pub bytes: i64,
    /// A digest of the delivered content (names, sizes and MD5s), identifying exactly which
    /// data the run saw.
    pub digest: String,
    /// How long the download took, in seconds (from its container's start and end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<i64>,
    /// `Hit` when the node cache held this data before the run's pod was created, `Miss` when
    /// the node cache downloaded it for the pod; absent when it was downloaded into the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheResult>,
    /// Why the node cache served it or not, when the reference, its datastore or the operator
    /// asked for the cache, e.g. `served from the node cache: cache: true on the reference`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_reason: Option<String>,
}

/// Whether the node cache held a download reference's data when the run's pod was created.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheResult {
    /// The node had the data: the pod got it at once.
    Hit,
    /// The node cache downloaded the data while the pod waited.
    Miss,
}
