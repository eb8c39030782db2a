//! `Datastore` and `ClusterDatastore`: named storage locations, as in the Azure ML SDK.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

// Both specs carry the rule that exactly one kind of storage is set: it sits on the spec, not
// on the flattened StorageSpec, so each spec's generated `validate_cel` evaluates it.
const ONE_KIND_RULE: &str =
    "[has(self.azureBlob), has(self.azureFile), has(self.local)].filter(x, x).size() == 1";
const ONE_KIND_MESSAGE: &str = "set exactly one kind of storage: azureBlob, azureFile or local";

/// Where a datastore's data lives. Exactly one kind of storage is set.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "datastore.dev",
    version = "v1alpha1",
    kind = "Datastore",
    namespaced,
    shortname = "ds",
    category = "datastore",
    status = "DatastoreStatus",
    doc = "A named storage location (an Azure Blob container, an Azure Files share, or a local directory for the CLI) that experiments read data from and write outputs to.",
    printcolumn(
        name = "Account",
        type_ = "string",
        json_path = ".spec.azureBlob.accountName",
        description = "Azure storage account"
    ),
    printcolumn(
        name = "Container",
        type_ = "string",
        json_path = ".spec.azureBlob.containerName",
        description = "Azure Blob container"
    ),
    printcolumn(
        name = "Share",
        type_ = "string",
        json_path = ".spec.azureFile.shareName",
        description = "Azure Files share"
    ),
    printcolumn(
        name = "Path",
        type_ = "string",
        json_path = ".spec.local.path",
        description = "Local directory (CLI only)"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(cel, validation = Rule::new(ONE_KIND_RULE).message(ONE_KIND_MESSAGE))]
#[serde(rename_all = "camelCase")]
pub struct DatastoreSpec {
    #[serde(flatten)]
    pub storage: StorageSpec,
}

/// A cluster-wide datastore, defined once by a platform team. Its credentials Secret lives in
/// the operator's namespace.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "datastore.dev",
    version = "v1alpha1",
    kind = "ClusterDatastore",
    shortname = "cds",
    category = "datastore",
    status = "DatastoreStatus",
    doc = "A cluster-wide named storage location, usable by experiments in any namespace. Its credentials Secret lives in the operator's namespace.",
    printcolumn(
        name = "Account",
        type_ = "string",
        json_path = ".spec.azureBlob.accountName",
        description = "Azure storage account"
    ),
    printcolumn(
        name = "Container",
        type_ = "string",
        json_path = ".spec.azureBlob.containerName",
        description = "Azure Blob container"
    ),
    printcolumn(
        name = "Share",
        type_ = "string",
        json_path = ".spec.azureFile.shareName",
        description = "Azure Files share"
    ),
    printcolumn(
        name = "Path",
        type_ = "string",
        json_path = ".spec.local.path",
        description = "Local directory (CLI only)"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(cel, validation = Rule::new(ONE_KIND_RULE).message(ONE_KIND_MESSAGE))]
#[serde(rename_all = "camelCase")]
pub struct ClusterDatastoreSpec {
    #[serde(flatten)]
    pub storage: StorageSpec,
    /// Which namespaces' experiments may use this datastore: a label selector on namespaces,
    /// e.g. `{matchLabels: {team: vision}}`. Absent means every namespace; `{}` also selects
    /// every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_namespaces: Option<LabelSelector>,
}

/// What both datastore kinds say about their storage: where the data lives (exactly one kind;
/// the specs' CEL rule checks that) and whether it may be written.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// An Azure Blob Storage container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure_blob: Option<AzureBlobSpec>,
    /// An Azure Files share (SMB), reached in the cluster through the `file.csi.azure.com`
    /// driver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure_file: Option<AzureFileSpec>,
    /// A directory on the machine running the CLI (demos, tests, laptops). Not usable in a cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalSpec>,
    /// Experiments may only read this datastore: `upload` references and read-write mounts of
    /// it are refused, and so are uploads by the CLI.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// Serve `download` references of this datastore from the node cache unless they say
    /// `cache: false` (in the cluster: where it has the node cache; `datastore run`: its
    /// download cache).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cache_downloads: bool,
}

/// An Azure Blob Storage container.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AzureBlobSpec {
    /// The storage account name, e.g. `mlstorage`.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]{3,24}$')").message("a storage account name has 3 to 24 lowercase letters and digits"))]
    pub account_name: String,
    /// The blob container name, e.g. `training-data`.
    #[x_kube(validation = Rule::new("self in ['$root', '$web', '$logs'] || (self.matches('^[a-z0-9]([a-z0-9-]{1,61})[a-z0-9]$') && !self.contains('--'))").message("a container name has 3 to 63 lowercase letters, digits and single hyphens, starting and ending with a letter or digit (or is $root, $web or $logs)"))]
    pub container_name: String,
    /// The blob service endpoint, when not `https://<accountName>.blob.core.windows.net`:
    /// sovereign clouds (`https://<account>.blob.core.chinacloudapi.cn`) or the Azurite emulator
    /// (`http://127.0.0.1:10000/devstoreaccount1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// How to authenticate. Absent means anonymous access to a public container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<Credentials>,
}

/// How to authenticate to the storage account. Set at most one.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(cel, validation = Rule::new("!(has(self.secretRef) && has(self.workloadIdentity))").message("set either secretRef or workloadIdentity, not both"))]
#[serde(rename_all = "camelCase")]
pub struct Credentials {
    /// A Secret holding one of the keys `accountKey`, `sasToken` or `connectionString`. For a
    /// Datastore the Secret is in the same namespace; for a ClusterDatastore, in the operator's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
    /// Microsoft Entra workload identity: the pod's federated service account token is
    /// exchanged for a storage token of this managed identity or app registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_identity: Option<WorkloadIdentity>,
}

/// A reference to a Secret by name.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = super::limits::NAME_MAX))]
    #[x_kube(validation = Rule::new(super::limits::NAME_RULE).message(super::limits::SECRET_NAME))]
    pub name: String,
}

/// Workload identity settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadIdentity {
    /// The client ID of the managed identity or app registration to act as.
    pub client_id: String,
}

/// An Azure Files share.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AzureFileSpec {
    /// The storage account name, e.g. `mlstorage`.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]{3,24}$')").message("a storage account name has 3 to 24 lowercase letters and digits"))]
    pub account_name: String,
    /// The file share name, e.g. `datasets`.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([a-z0-9-]{1,61})[a-z0-9]$') && !self.contains('--')").message("a share name has 3 to 63 lowercase letters, digits and single hyphens, starting and ending with a letter or digit"))]
    pub share_name: String,
    /// How to authenticate: a Secret with `accountKey` or `connectionString`. An SMB mount needs
    /// the account key itself, which the operator copies into a Secret of each Experiment using
    /// the share; workload identity is not supported for shares yet.
    pub credentials: Credentials,
}

/// A local directory used as a datastore (CLI only).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LocalSpec {
    /// The directory that holds the datastore's blobs as files. Relative paths are resolved
    /// against the directory of the datastores file.
    pub path: String,
}

/// The observed state of a datastore.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DatastoreStatus {
    /// `Ready` says whether the storage was reachable with the given credentials at the last check.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation of the spec the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The storage a datastore names, whichever resource kind it came from.
#[derive(Clone, Debug, PartialEq)]
pub enum Storage<'a> {
    AzureBlob(&'a AzureBlobSpec),
    AzureFile(&'a AzureFileSpec),
    Local(&'a LocalSpec),
}

impl StorageSpec {
    /// The one kind of storage set, or why there is not exactly one.
    pub fn kind(&self) -> Result<Storage<'_>, &'static str> {
        match (&self.azure_blob, &self.azure_file, &self.local) {
            (Some(a), None, None) => Ok(Storage::AzureBlob(a)),
            (None, Some(f), None) => Ok(Storage::AzureFile(f)),
            (None, None, Some(l)) => Ok(Storage::Local(l)),
            (None, None, None) => Err(
                "no kind of storage is set: add `azureBlob`, `azureFile` or `local` to its spec",
            ),
            _ => Err(
                "several kinds of storage are set (`azureBlob`, `azureFile`, `local`): keep exactly one",
            ),
        }
    }
}
