//! Resolve a datastore and its credentials into a client for its storage.

pub mod azure;
pub mod backend;
pub mod local;
pub mod resolve;
pub mod retry;
pub mod sas;
pub mod shared_key;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use crate::api::MountDriver;

pub use azure::BlobClient;
pub use backend::{Backend, Hashes, ObjectStore};
pub use local::LocalDir;

/// A secret value. Its `Debug` and `Display` never show it, so it cannot leak into logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The value itself: call only where it is sent to the storage service.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How the client proves who it is to the blob service.
#[derive(Clone, Debug, PartialEq)]
pub enum AzureCredential {
    /// Shared Key: the account key (base64), kept to sign each request.
    AccountKey(Secret),
    /// A SAS token, appended to every request's query.
    SasToken(Secret),
    /// Microsoft Entra workload identity: exchange the federated token file for a bearer token.
    WorkloadIdentity { client_id: String },
    /// Public container: no authentication.
    Anonymous,
}

impl AzureCredential {
    pub fn kind(&self) -> &'static str {
        match self {
            AzureCredential::AccountKey(_) => "account key",
            AzureCredential::SasToken(_) => "SAS token",
            AzureCredential::WorkloadIdentity { .. } => "workload identity",
            AzureCredential::Anonymous => "anonymous access",
        }
    }

    /// The listed blobs whose reads prove that this credential may read every listed blob, not
    /// only list them (what a cache must know before it hands over its copy). One suffices
    /// where permissions hold alike over the whole scope the listing was in: an account key;
    /// a service or account SAS (its permissions cover its account or container; a blob's own
    /// SAS cannot list); anonymous access that lists (container-level public access, which
    /// reads too). Workload identity (Azure AD) and a user delegation SAS (`skoid`, bounded by
    /// its signer's Azure AD role) may be limited per path: ABAC conditions, and on a
    /// hierarchical-namespace account POSIX ACLs per file and directory; a directory's SAS
    /// (`sr=d`) covers one directory, which the folder may be wider than. Then every blob is
    /// proven. The one blob is the first by name: the same one for every caller.
    pub fn read_proofs<'a>(&self, listed: &'a [ObjectMeta]) -> Vec<&'a ObjectMeta> {
        let per_path = match self {
            AzureCredential::AccountKey(_) | AzureCredential::Anonymous => false,
            AzureCredential::SasToken(token) => token
                .expose()
                .trim_start_matches('?')
                .split('&')
                .any(|field| field.starts_with("skoid=") || field == "sr=d"),
            AzureCredential::WorkloadIdentity { .. } => true,
        };
        if per_path {
            listed.iter().collect()
        } else {
            listed
                .iter()
                .min_by(|a, b| a.name.cmp(&b.name))
                .into_iter()
                .collect()
        }
    }
}

/// Everything needed to talk to one Azure Blob container.
#[derive(Clone, Debug, PartialEq)]
pub struct AzureBlobConfig {
    pub account: String,
    pub container: String,
    /// The service endpoint without the container, e.g. `https://acct.blob.core.windows.net`.
    pub endpoint: url::Url,
    pub credential: AzureCredential,
    /// Where the credential came from (`Secret default/blob-creds`), for error messages.
    pub credential_source: String,
    /// The datastore's `readOnly`: nothing may be written to it.
    pub read_only: bool,
}

/// Everything needed to mount one Azure Files share.
#[derive(Clone, Debug, PartialEq)]
pub struct AzureFileConfig {
    pub account: String,
    pub share: String,
    /// An account key: an SMB mount cannot use a SAS token, and workload identity is not
    /// rendered for shares yet.
    pub credential: AzureCredential,
    /// Where the credential came from (`Secret default/share-creds`), for error messages.
    pub credential_source: String,
    /// The datastore's `readOnly`: nothing may be written to it.
    pub read_only: bool,
}

/// Resolved datastores for unit tests: account `mlstorage`, never read-only, the credential and
/// endpoint as given.
#[cfg(test)]
pub mod fixtures {
    use super::*;

    pub fn blob(container: &str, endpoint: &str, credential: AzureCredential) -> AzureBlobConfig {
        AzureBlobConfig {
            account: "mlstorage".into(),
            container: container.into(),
            endpoint: url::Url::parse(endpoint).unwrap(),
            credential,
            credential_source: "Secret ml/mlstorage-key".into(),
            read_only: false,
        }
    }

    pub fn share(credential: AzureCredential, read_only: bool) -> AzureFileConfig {
        AzureFileConfig {
            account: "mlstorage".into(),
            share: "datasets".into(),
            credential,
            credential_source: "Secret ml/mlstorage-key".into(),
            read_only,
        }
    }

    /// An account key (base64 of `key`).
    pub fn key() -> AzureCredential {
        AzureCredential::AccountKey(Secret::new("a2V5"))
    }
}

/// A datastore resolved to the storage it names.
#[derive(Clone, Debug, PartialEq)]
pub enum StoreConfig {
    AzureBlob(AzureBlobConfig),
    /// Reachable only through the `file.csi.azure.com` driver in the cluster: no client here
    /// speaks SMB or the Azure Files REST API.
    AzureFile(AzureFileConfig),
    Local {
        path: PathBuf,
        read_only: bool,
    },
}

impl StoreConfig {
    /// Whether the datastore is marked `readOnly`.
    pub fn read_only(&self) -> bool {
        match self {
            StoreConfig::AzureBlob(c) => c.read_only,
            StoreConfig::AzureFile(c) => c.read_only,
            StoreConfig::Local { read_only, .. } => *read_only,
        }
    }
}

impl StoreConfig {
    /// What the planner may know of this storage.
    pub fn capabilities(&self) -> Capabilities {
        match self {
            StoreConfig::AzureBlob(c) => Capabilities {
                read_only: c.read_only,
                from_cli: true,
                from_cluster: true,
                mount_drivers: &[MountDriver::Csi, MountDriver::Sidecar],
            },
            StoreConfig::AzureFile(c) => Capabilities {
                read_only: c.read_only,
                from_cli: false,
                from_cluster: true,
                mount_drivers: &[MountDriver::Csi],
            },
            StoreConfig::Local { read_only, .. } => Capabilities {
                read_only: *read_only,
                from_cli: true,
                from_cluster: false,
                mount_drivers: &[],
            },
        }
    }
}

/// The capabilities of each resolved datastore, by name: what the planner takes.
pub fn capabilities(datastores: &BTreeMap<String, StoreConfig>) -> BTreeMap<String, Capabilities> {
    datastores
        .iter()
        .map(|(name, config)| (name.clone(), config.capabilities()))
        .collect()
}

/// What a datastore's storage allows, as the planner sees it: how it can be reached and
/// mounted, never which service it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// The datastore's `readOnly`: nothing may be written to it.
    pub read_only: bool,
    /// The CLI (and so a local computeTarget) can copy to and from it.
    pub from_cli: bool,
    /// Pods in the cluster can copy to and from it, or mount it.
    pub from_cluster: bool,
    /// The drivers that can mount it in a pod.
    pub mount_drivers: &'static [MountDriver],
}

/// What credentials must allow on a datastore, whatever the service: the planner asks for it,
/// each backend maps it to its own terms (Azure: SAS permissions, `sas::Permissions::from`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    pub read: bool,
    pub list: bool,
    /// Write new objects.
    pub create: bool,
    /// Replace, append to, rename and delete existing objects, as a read-write mount does.
    pub modify: bool,
}

impl Access {
    /// What a download needs.
    pub const READ: Access = Access {
        read: true,
        list: true,
        create: false,
        modify: false,
    };
    /// What an upload needs: it lists to skip what exists, and replaces nothing it did not
    /// write.
    pub const UPLOAD: Access = Access {
        read: false,
        list: true,
        create: true,
        modify: false,
    };
    /// What a read-write mount needs (blobfuse2 and SMB replace, rename and delete files).
    pub const READ_WRITE: Access = Access {
        read: true,
        list: true,
        create: true,
        modify: true,
    };

    /// Everything either allows.
    pub fn union(self, other: Access) -> Access {
        Access {
            read: self.read || other.read,
            list: self.list || other.list,
            create: self.create || other.create,
            modify: self.modify || other.modify,
        }
    }
}

/// A client for a datastore's storage.
#[derive(Clone)]
pub enum Store {
    Azure(BlobClient),
    Local(LocalDir),
}

impl Store {
    /// Finds the datastore `name` and opens a client for it.
    pub async fn open(
        name: &str,
        source: &resolve::Source,
        scope: &resolve::Scope,
        tuning: &azure::Tuning,
    ) -> crate::error::Result<Self> {
        let resolved = resolve::resolve(name, source, scope).await?;
        tracing::info!(datastore = %resolved.label, "resolved");
        Store::new(&resolved.config, tuning)
    }

    pub fn new(config: &StoreConfig, tuning: &azure::Tuning) -> crate::error::Result<Self> {
        Ok(match config {
            StoreConfig::AzureBlob(cfg) => {
                Store::Azure(BlobClient::new(cfg.clone(), tuning.clone())?)
            }
            StoreConfig::AzureFile(cfg) => {
                return Err(crate::error::Error::Config(format!(
                    "the Azure Files share {}/{} can only be reached from the cluster, where the file.csi.azure.com driver mounts it: use the datastore in an Experiment, or mount the share on this machine and use a local datastore",
                    cfg.account, cfg.share
                )));
            }
            StoreConfig::Local { path, read_only } => {
                Store::Local(LocalDir::new(path.clone()).with_read_only(*read_only))
            }
        })
    }
}

/// One dispatch per call, none per chunk: the engine runs generic code for the variant.
impl Backend for Store {
    fn read_only(&self) -> bool {
        match self {
            Store::Azure(c) => c.read_only(),
            Store::Local(l) => l.read_only(),
        }
    }
    fn hashes(&self) -> Hashes {
        match self {
            Store::Azure(c) => c.hashes(),
            Store::Local(l) => l.hashes(),
        }
    }
    async fn check(&self) -> crate::error::Result<()> {
        match self {
            Store::Azure(c) => Backend::check(c).await,
            Store::Local(l) => Backend::check(l).await,
        }
    }
    async fn list(&self, prefix: &str) -> crate::error::Result<Vec<ObjectMeta>> {
        match self {
            Store::Azure(c) => Backend::list(c, prefix).await,
            Store::Local(l) => Backend::list(l, prefix).await,
        }
    }
    async fn prove_read(&self, listed: &[ObjectMeta]) -> crate::error::Result<()> {
        match self {
            Store::Azure(c) => Backend::prove_read(c, listed).await,
            Store::Local(l) => Backend::prove_read(l, listed).await,
        }
    }
}

/// One object in a listing: what the skip and verify decisions need, nothing more.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    pub name: String,
    pub size: u64,
    pub md5: Option<[u8; 16]>,
    /// The version listed (Azure's ETag): reads are pinned to it, so a blob replaced while it
    /// downloads fails instead of mixing versions. `None` for local files.
    pub etag: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(names: &[&str]) -> Vec<ObjectMeta> {
        names
            .iter()
            .map(|name| ObjectMeta {
                name: name.to_string(),
                size: 1,
                md5: None,
                etag: None,
            })
            .collect()
    }

    fn names(proofs: Vec<&ObjectMeta>) -> Vec<&str> {
        proofs.iter().map(|o| o.name.as_str()).collect()
    }

    #[test]
    fn one_read_proves_a_key_or_a_container_sas_and_every_blob_is_proven_where_access_is_per_path()
    {
        let blobs = listed(&["data/b", "data/a", "data/c/d"]);
        let sas = |token: &str| AzureCredential::SasToken(Secret::new(token));
        for one in [
            fixtures::key(),
            AzureCredential::Anonymous,
            sas("sv=2021-08-06&sr=c&sp=rl&se=2030-01-01&sig=x"),
            // An account SAS, with or without the leading `?`.
            sas("?sv=2021-08-06&ss=b&srt=co&sp=rl&se=2030-01-01&sig=x"),
        ] {
            assert_eq!(names(one.read_proofs(&blobs)), ["data/a"], "{one:?}");
        }
        for every in [
            AzureCredential::WorkloadIdentity {
                client_id: "c".into(),
            },
            sas("sv=2021-08-06&sr=c&sp=rl&skoid=o&sktid=t&sig=x"),
            sas("sv=2021-08-06&sr=d&sdd=1&sp=rl&sig=x"),
        ] {
            assert_eq!(
                names(every.read_proofs(&blobs)),
                ["data/b", "data/a", "data/c/d"],
                "{every:?}"
            );
        }
        // An empty folder: nothing to read, nothing to prove.
        assert!(fixtures::key().read_proofs(&[]).is_empty());
    }
}
