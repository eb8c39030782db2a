//! Resolve a datastore and its credentials into a client for its storage.

pub mod azure;
pub mod local;
pub mod resolve;
pub mod sas;
pub mod shared_key;

use std::fmt;
use std::path::PathBuf;

pub use azure::BlobClient;
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

/// A client for a datastore's storage.
#[derive(Clone)]
pub enum Store {
    Azure(BlobClient),
    Local(LocalDir),
}

impl Store {
    /// Finds the datastore `name` and opens a client for it, sized for `concurrency` requests.
    pub async fn open(
        name: &str,
        source: &resolve::Source,
        scope: &resolve::Scope,
        concurrency: usize,
    ) -> crate::error::Result<Self> {
        let resolved = resolve::resolve(name, source, scope).await?;
        tracing::info!(datastore = %resolved.label, "resolved");
        let tuning = azure::Tuning {
            pool_size: concurrency,
            ..azure::Tuning::default()
        };
        Store::new(&resolved.config, &tuning)
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

    /// Every object whose name starts with `prefix`.
    pub async fn list(&self, prefix: &str) -> crate::error::Result<Vec<ObjectMeta>> {
        match self {
            Store::Azure(c) => c.list(prefix).await,
            Store::Local(l) => {
                let (l, prefix) = (l.clone(), prefix.to_string());
                tokio::task::spawn_blocking(move || l.list(&prefix))
                    .await
                    .expect("listing does not panic")
            }
        }
    }

    /// Whether the datastore is marked `readOnly`: nothing may be uploaded to it.
    pub fn read_only(&self) -> bool {
        match self {
            Store::Azure(c) => c.config().read_only,
            Store::Local(l) => l.is_read_only(),
        }
    }

    /// Proves the storage is there and the credentials work, as cheaply as possible.
    pub async fn check(&self) -> crate::error::Result<()> {
        match self {
            Store::Azure(c) => c.check().await,
            Store::Local(l) => l.check(),
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
