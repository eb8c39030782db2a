//! Finding a datastore by name (in a datastores file or the cluster) and turning it and its
//! credentials Secret into a [`StoreConfig`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Secret as K8sSecret;
use kube::ResourceExt;

use super::{AzureBlobConfig, AzureCredential, AzureFileConfig, Secret, StoreConfig};
use crate::api::{AzureBlobSpec, ClusterDatastore, Credentials, Datastore, Storage, StorageSpec};
use crate::error::{Error, Result};
use crate::yaml::{self, YamlError};

/// The variable that names a datastores file when `--datastores` is not given.
pub const CONFIG_ENV: &str = "DATASTORE_CONFIG";

/// Where to look for datastores.
#[derive(Clone, Debug)]
pub enum Source {
    /// A multi-document YAML file of Datastore, ClusterDatastore and Secret objects.
    File(PathBuf),
    /// The cluster of the current kubeconfig context.
    Cluster,
}

impl Source {
    /// `--datastores FILE`, else `$DATASTORE_CONFIG`, else the cluster.
    pub fn pick(file: Option<PathBuf>) -> Source {
        match file.or_else(|| {
            std::env::var_os(CONFIG_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        }) {
            Some(f) => Source::File(f),
            None => Source::Cluster,
        }
    }
}

/// Namespaces that decide which objects a name refers to.
#[derive(Clone, Debug)]
pub struct Scope {
    /// Where Datastores (and their Secrets) are looked up.
    pub namespace: String,
    /// Where ClusterDatastores' Secrets live.
    pub operator_namespace: String,
}

/// `--operator-namespace`: where ClusterDatastores' Secrets live (the namespace the operator runs
/// in). Every command that resolves datastores flattens this one flag.
#[derive(clap::Args, Clone, Debug)]
pub struct OperatorNamespace {
    /// The namespace the operator runs in; ClusterDatastores' Secrets live there.
    #[arg(
        long = "operator-namespace",
        env = "DATASTORE_OPERATOR_NAMESPACE",
        default_value = "datastore-operator"
    )]
    pub name: String,
}

/// A datastore found by name and resolved to its storage.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    /// `Datastore default/blob-ds` or `ClusterDatastore shared`.
    pub label: String,
    pub config: StoreConfig,
    /// Its `spec.cacheDownloads`: download references of it read from the cache by default.
    pub cache_downloads: bool,
}

pub async fn resolve(name: &str, source: &Source, scope: &Scope) -> Result<Resolved> {
    match source {
        Source::File(path) => Catalog::load(path)?.resolve(name, scope),
        Source::Cluster => resolve_in_cluster(name, scope).await,
    }
}

/// The objects of a datastores file.
#[derive(Debug, Default)]
pub struct Catalog {
    datastores: Vec<Datastore>,
    cluster_datastores: Vec<ClusterDatastore>,
    secrets: Vec<K8sSecret>,
    /// Relative local paths are resolved against the file's directory.
    base_dir: PathBuf,
    origin: String,
}

impl Catalog {
    pub fn load(path: &Path) -> Result<Catalog> {
        let text = yaml::read_file(path).map_err(|e| match e {
            YamlError::Read(e) => Error::Config(format!(
                "cannot read the datastores file {}: {e}; check --datastores or ${CONFIG_ENV}",
                path.display()
            )),
            e => Error::Config(format!("the datastores file {} {e}", path.display())),
        })?;
        let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Catalog::parse(&text, &path.display().to_string(), base_dir)
    }

    /// Parses a multi-document YAML stream; objects of other kinds are ignored, so the same
    /// file can hold anything `kubectl apply` accepts.
    pub fn parse(text: &str, origin: &str, base_dir: PathBuf) -> Result<Catalog> {
        let mut catalog = Catalog {
            base_dir,
            origin: origin.to_string(),
            ..Default::default()
        };
        let docs: Vec<serde_json::Value> = yaml::documents(text).map_err(|e| match e {
            YamlError::Invalid(e) => Error::Config(format!(
                "{origin} is not valid YAML: {e}; fix the file and run again"
            )),
            e => Error::Config(format!("{origin} {e}")),
        })?;
        for (i, value) in docs.into_iter().enumerate() {
            let where_ = format!("{origin}, document {}", i + 1);
            if value.is_null() {
                continue;
            }
            let field = |k: &str| {
                value
                    .get(k)
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_string()
            };
            let (api_version, kind) = (field("apiVersion"), field("kind"));
            let bad = |e: serde_json::Error| {
                Error::Config(format!(
                    "{where_} ({kind}) is malformed: {e}; fix it and run again"
                ))
            };
            match (api_version.as_str(), kind.as_str()) {
                ("datastore.dev/v1alpha1", "Datastore") => catalog
                    .datastores
                    .push(serde_json::from_value(value).map_err(bad)?),
                ("datastore.dev/v1alpha1", "ClusterDatastore") => catalog
                    .cluster_datastores
                    .push(serde_json::from_value(value).map_err(bad)?),
                // The parser's message quotes the offending value, which may be a credential.
                ("v1", "Secret") => catalog.secrets.push(serde_json::from_value(value).map_err(|_| {
                    Error::Config(format!(
                        "{where_} (Secret) is malformed: `stringData` must map each key to a plain string and `data` each key to a base64 string (details are not shown because they may hold a credential); fix it and run again"
                    ))
                })?),
                (_, "Datastore" | "ClusterDatastore") => {
                    return Err(Error::Config(format!(
                        "{where_}: {kind} has apiVersion '{api_version}'; use datastore.dev/v1alpha1"
                    )));
                }
                ("", _) | (_, "") => {
                    return Err(Error::Config(format!(
                        "{where_} has no apiVersion or kind: every object needs both (e.g. apiVersion: datastore.dev/v1alpha1, kind: Datastore)"
                    )));
                }
                _ => {
                    tracing::debug!(%kind, "ignoring an object of another kind in the datastores file")
                }
            }
        }
        Ok(catalog)
    }

    pub fn resolve(&self, name: &str, scope: &Scope) -> Result<Resolved> {
        let in_ns = |ns: Option<String>| ns.unwrap_or_else(|| scope.namespace.clone());
        if let Some(ds) = self
            .datastores
            .iter()
            .find(|d| d.name_any() == name && in_ns(d.namespace()) == scope.namespace)
        {
            let label = format!("Datastore {}/{name}", scope.namespace);
            let storage = ds
                .spec
                .storage
                .kind()
                .map_err(|why| Error::Config(format!("{label} in {}: {why}", self.origin)))?;
            return self
                .config(&label, storage, ds.spec.storage.read_only, &scope.namespace)
                .map(|r| Resolved {
                    cache_downloads: ds.spec.storage.cache_downloads,
                    ..r
                });
        }
        if let Some(cds) = self
            .cluster_datastores
            .iter()
            .find(|d| d.name_any() == name)
        {
            let label = format!("ClusterDatastore {name}");
            let storage = cds
                .spec
                .storage
                .kind()
                .map_err(|why| Error::Config(format!("{label} in {}: {why}", self.origin)))?;
            return self
                .config(
                    &label,
                    storage,
                    cds.spec.storage.read_only,
                    &scope.operator_namespace,
                )
                .map(|r| Resolved {
                    cache_downloads: cds.spec.storage.cache_downloads,
                    ..r
                });
        }
        let mut known: Vec<String> = self
            .datastores
            .iter()
            .map(|d| format!("{} (Datastore in {})", d.name_any(), in_ns(d.namespace())))
            .chain(
                self.cluster_datastores
                    .iter()
                    .map(|d| format!("{} (ClusterDatastore)", d.name_any())),
            )
            .collect();
        known.sort();
        Err(Error::Config(format!(
            "no datastore named '{name}' in namespace '{}' in {}; it has: {}",
            scope.namespace,
            self.origin,
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        )))
    }

    fn config(
        &self,
        label: &str,
        storage: Storage<'_>,
        read_only: bool,
        secret_namespace: &str,
    ) -> Result<Resolved> {
        let secret = match secret_name(&storage) {
            Some(secret_name) => Some(
                self.secrets
                    .iter()
                    .find(|s| s.name_any() == secret_name && s.namespace().as_deref().unwrap_or(secret_namespace) == secret_namespace)
                    .ok_or_else(|| {
                        Error::Config(format!(
                            "{label} refers to Secret '{secret_name}', which {} does not hold in namespace '{secret_namespace}': add it (kind: Secret, stringData: {{accountKey: ...}})",
                            self.origin
                        ))
                    })?,
            ),
            None => None,
        };
        Ok(Resolved {
            label: label.to_string(),
            config: store_config(
                label,
                storage,
                read_only,
                secret_namespace,
                secret,
                &self.base_dir,
            )?,
            cache_downloads: false,
        })
    }
}

fn secret_name<'a>(storage: &Storage<'a>) -> Option<&'a str> {
    let credentials = match storage {
        Storage::AzureBlob(spec) => spec.credentials.as_ref(),
        Storage::AzureFile(spec) => Some(&spec.credentials),
        Storage::Local(_) => None,
    };
    credentials?.secret_ref.as_ref().map(|r| r.name.as_str())
}

async fn resolve_in_cluster(name: &str, scope: &Scope) -> Result<Resolved> {
    let client = kube::Client::try_default().await.map_err(|e| {
        Error::Config(format!(
            "no datastores file was given (--datastores FILE or ${CONFIG_ENV}) and no cluster is reachable from the kubeconfig ({e}): pass --datastores FILE"
        ))
    })?;
    resolve_with_client(client, name, scope).await
}

/// Looks the datastore up through the Kubernetes API: a Datastore in the namespace, then a
/// ClusterDatastore.
pub async fn resolve_with_client(
    client: kube::Client,
    name: &str,
    scope: &Scope,
) -> Result<Resolved> {
    match find(client.clone(), name, &scope.namespace).await? {
        Some(found) => resolve_found(client, &found, scope).await,
        None => Err(not_found(client, name, &scope.namespace).await?),
    }
}

/// A datastore found in the cluster by name.
#[derive(Clone, Debug)]
pub enum Found {
    Namespaced(Datastore),
    Cluster(ClusterDatastore),
}

impl Found {
    /// `Datastore default/blob-ds` or `ClusterDatastore shared`.
    pub fn label(&self) -> String {
        match self {
            Found::Namespaced(d) => format!(
                "Datastore {}/{}",
                d.namespace().unwrap_or_default(),
                d.name_any()
            ),
            Found::Cluster(d) => format!("ClusterDatastore {}", d.name_any()),
        }
    }

    pub fn storage(&self) -> std::result::Result<Storage<'_>, &'static str> {
        match self {
            Found::Namespaced(d) => d.spec.storage.kind(),
            Found::Cluster(d) => d.spec.storage.kind(),
        }
    }

    fn storage_spec(&self) -> &StorageSpec {
        match self {
            Found::Namespaced(d) => &d.spec.storage,
            Found::Cluster(d) => &d.spec.storage,
        }
    }

    /// Its `spec.readOnly`.
    pub fn read_only(&self) -> bool {
        self.storage_spec().read_only
    }

    /// Where its credentials Secret lives.
    pub fn secret_namespace<'a>(&'a self, scope: &'a Scope) -> &'a str {
        match self {
            Found::Namespaced(_) => &scope.namespace,
            Found::Cluster(_) => &scope.operator_namespace,
        }
    }
}

/// The Datastore `name` in `namespace`, else the ClusterDatastore `name`, else `None`.
pub async fn find(client: kube::Client, name: &str, namespace: &str) -> Result<Option<Found>> {
    lookup(client, name, namespace).await.map_err(kube_error)
}

/// [`find`] with the apiserver's own error (the controller reports it as it is).
pub async fn lookup(
    client: kube::Client,
    name: &str,
    namespace: &str,
) -> std::result::Result<Option<Found>, kube::Error> {
    let namespaced: kube::Api<Datastore> = kube::Api::namespaced(client.clone(), namespace);
    if let Some(ds) = namespaced.get_opt(name).await? {
        return Ok(Some(Found::Namespaced(ds)));
    }
    let cluster: kube::Api<ClusterDatastore> = kube::Api::all(client);
    Ok(cluster.get_opt(name).await?.map(Found::Cluster))
}

/// The error for a name that names no datastore, listing the ones there are.
async fn not_found(client: kube::Client, name: &str, namespace: &str) -> Result<Error> {
    let namespaced: kube::Api<Datastore> = kube::Api::namespaced(client.clone(), namespace);
    let cluster: kube::Api<ClusterDatastore> = kube::Api::all(client);
    let mut known: Vec<String> = namespaced
        .list(&Default::default())
        .await
        .map_err(kube_error)?
        .items
        .iter()
        .map(|d| format!("{} (Datastore)", d.name_any()))
        .collect();
    known.extend(
        cluster
            .list(&Default::default())
            .await
            .map_err(kube_error)?
            .items
            .iter()
            .map(|d| format!("{} (ClusterDatastore)", d.name_any())),
    );
    Ok(Error::Config(format!(
        "no datastore named '{name}' in namespace '{namespace}' or cluster-wide; the cluster has: {}",
        if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        }
    )))
}

/// Reads the found datastore's credentials Secret (if it names one) and resolves its storage.
pub async fn resolve_found(client: kube::Client, found: &Found, scope: &Scope) -> Result<Resolved> {
    let secret = read_secret(client, found, scope)
        .await
        .map_err(kube_error)?;
    resolved(found, scope, secret.as_ref())
}

/// The credentials Secret the found datastore names, with the apiserver's own error; `None`
/// when it names none or the Secret does not exist ([`resolved`] says which).
pub async fn read_secret(
    client: kube::Client,
    found: &Found,
    scope: &Scope,
) -> std::result::Result<Option<K8sSecret>, kube::Error> {
    let Some(secret_name) = found.storage().ok().as_ref().and_then(secret_name) else {
        return Ok(None);
    };
    // A name with a `/` would ask for another resource; `resolved` refuses it.
    if !crate::api::limits::is_dns1123_subdomain(secret_name) {
        return Ok(None);
    }
    let secrets: kube::Api<K8sSecret> =
        kube::Api::namespaced(client, found.secret_namespace(scope));
    secrets.get_opt(secret_name).await
}

/// The found datastore resolved with the Secret [`read_secret`] read.
pub fn resolved(found: &Found, scope: &Scope, secret: Option<&K8sSecret>) -> Result<Resolved> {
    let label = found.label();
    let storage = found
        .storage()
        .map_err(|why| Error::Config(format!("{label}: {why}")))?;
    let secret_ns = found.secret_namespace(scope);
    if let Some(secret_name) = secret_name(&storage) {
        if !crate::api::limits::is_dns1123_subdomain(secret_name) {
            return Err(Error::Config(format!(
                "{label} refers to Secret '{secret_name}', which is not a name a Secret can have: {}",
                crate::api::limits::SECRET_NAME
            )));
        }
        if secret.is_none() {
            return Err(Error::Config(format!(
                "{label} refers to Secret '{secret_name}', which does not exist in namespace '{secret_ns}': create it"
            )));
        }
    }
    let config = store_config(
        &label,
        storage,
        found.read_only(),
        secret_ns,
        secret,
        Path::new("."),
    )?;
    Ok(Resolved {
        label,
        config,
        cache_downloads: found.storage_spec().cache_downloads,
    })
}

/// One sentence with the fix for a failed apiserver call.
fn kube_error(e: kube::Error) -> Error {
    match e {
        kube::Error::Api(status) if status.code == 403 => Error::Auth(format!(
            "the cluster refused to show datastores or their Secret ({}): ask for get/list on datastores, clusterdatastores and get on the Secret, or pass --datastores FILE",
            status.message
        )),
        // A 404 that get_opt did not absorb has no Status body: the API group itself is unknown.
        kube::Error::Api(status) if status.code == 404 => Error::Config(
            "the datastore.dev CRDs are not installed in this cluster: install them (datastore crds | kubectl apply -f -) or pass --datastores FILE".to_string(),
        ),
        kube::Error::Api(status) => Error::Service(format!(
            "the Kubernetes API answered {} {}: {}",
            status.code, status.reason, status.message
        )),
        other => Error::Unreachable(format!(
            "cannot reach the Kubernetes API: {other}; check the kubeconfig context, or pass --datastores FILE"
        )),
    }
}

/// Spec + Secret -> StoreConfig. Pure: the one place credentials are interpreted.
/// `read_only` is the datastore's `spec.readOnly`.
pub fn store_config(
    label: &str,
    storage: Storage<'_>,
    read_only: bool,
    secret_namespace: &str,
    secret: Option<&K8sSecret>,
    base_dir: &Path,
) -> Result<StoreConfig> {
    match storage {
        Storage::Local(local) => Ok(StoreConfig::Local {
            path: base_dir.join(&local.path),
            read_only,
        }),
        Storage::AzureBlob(spec) => {
            azure_config(label, spec, secret_namespace, secret).map(|config| {
                StoreConfig::AzureBlob(AzureBlobConfig {
                    read_only,
                    ..config
                })
            })
        }
        Storage::AzureFile(spec) => {
            let (credential, credential_source, _) = credential(
                label,
                &spec.account_name,
                Some(&spec.credentials),
                secret_namespace,
                secret,
            )?;
            match credential {
                AzureCredential::AccountKey(_) => {}
                AzureCredential::SasToken(_) => {
                    return Err(Error::Config(format!(
                        "{label} is an Azure Files share with a SAS token in {credential_source}, but an SMB mount needs the account key: put accountKey (or a connectionString with AccountKey) in the Secret"
                    )));
                }
                // The driver documents workload identity for inline volumes only from v1.35
                // with SMB OAuth on the account; the operator does not render it yet.
                AzureCredential::WorkloadIdentity { .. } => {
                    return Err(Error::Config(format!(
                        "{label} is an Azure Files share with workload identity, which the operator cannot mount yet: use credentials.secretRef (a Secret with accountKey)"
                    )));
                }
                AzureCredential::Anonymous => {
                    return Err(Error::Config(format!(
                        "{label} is an Azure Files share without credentials, and a share cannot be mounted anonymously: set credentials.secretRef (a Secret with accountKey)"
                    )));
                }
            }
            if !container_name_is_valid(&spec.share_name) || spec.share_name.starts_with('$') {
                return Err(Error::Config(format!(
                    "{label} has shareName '{}', which is not a share name: 3 to 63 lowercase letters, digits and single hyphens",
                    spec.share_name
                )));
            }
            Ok(StoreConfig::AzureFile(AzureFileConfig {
                account: spec.account_name.clone(),
                share: spec.share_name.clone(),
                credential,
                credential_source,
                read_only,
            }))
        }
    }
}

fn azure_config(
    label: &str,
    spec: &AzureBlobSpec,
    secret_namespace: &str,
    secret: Option<&K8sSecret>,
) -> Result<AzureBlobConfig> {
    let (credential, credential_source, blob_endpoint) = credential(
        label,
        &spec.account_name,
        spec.credentials.as_ref(),
        secret_namespace,
        secret,
    )?;
    let endpoint = spec
        .endpoint
        .clone()
        .or(blob_endpoint)
        .unwrap_or_else(|| format!("https://{}.blob.core.windows.net", spec.account_name));
    let endpoint = parse_endpoint(label, &endpoint, &spec.account_name)?;
    if !container_name_is_valid(&spec.container_name) {
        // The CRD's CEL rule says the same, but a datastores file meets no apiserver.
        return Err(Error::Config(format!(
            "{label} has containerName '{}', which is not a container name: 3 to 63 lowercase letters, digits and single hyphens (or $root, $web, $logs)",
            spec.container_name
        )));
    }
    Ok(AzureBlobConfig {
        account: spec.account_name.clone(),
        container: spec.container_name.clone(),
        endpoint,
        credential,
        credential_source,
        read_only: false,
    })
}

/// The credential a datastore's `credentials` and Secret give, where it came from, and the
/// blob endpoint a connection string names.
fn credential(
    label: &str,
    account_name: &str,
    credentials: Option<&Credentials>,
    secret_namespace: &str,
    secret: Option<&K8sSecret>,
) -> Result<(AzureCredential, String, Option<String>)> {
    let mut endpoint = None;
    let (credential, credential_source) = match (credentials, secret) {
        (Some(c), _) if c.workload_identity.is_some() => {
            let wi = c.workload_identity.as_ref().expect("checked");
            (
                AzureCredential::WorkloadIdentity {
                    client_id: wi.client_id.clone(),
                },
                format!("workload identity of {label}"),
            )
        }
        (_, Some(secret)) => {
            let source = format!("Secret {secret_namespace}/{}", secret.name_any());
            let values = secret_values(secret);
            let present: Vec<&str> = ["accountKey", "sasToken", "connectionString"]
                .into_iter()
                .filter(|k| values.contains_key(*k))
                .collect();
            if let Some(empty) = present.iter().find(|k| values[**k].trim().is_empty()) {
                return Err(Error::Config(format!(
                    "the {empty} in {source} (used by {label}) is empty: put the credential in it"
                )));
            }
            let credential = match present.as_slice() {
                ["accountKey"] => {
                    AzureCredential::AccountKey(Secret::new(values["accountKey"].clone()))
                }
                ["sasToken"] => AzureCredential::SasToken(Secret::new(values["sasToken"].clone())),
                ["connectionString"] => {
                    let cs = ConnectionString::parse(&values["connectionString"]).map_err(|why| {
                        Error::Config(format!(
                            "the connectionString in {source} {why}: copy the full string from the portal (Storage account > Access keys)"
                        ))
                    })?;
                    if let Some(account) = cs.get("AccountName")
                        && account != account_name
                    {
                        return Err(Error::Config(format!(
                            "the connectionString in {source} is for account '{account}' but {label} names account '{account_name}': make them agree"
                        )));
                    }
                    endpoint = cs.blob_endpoint();
                    match (cs.get("AccountKey"), cs.get("SharedAccessSignature")) {
                        (Some(key), _) => AzureCredential::AccountKey(Secret::new(key)),
                        (None, Some(sas)) => AzureCredential::SasToken(Secret::new(sas)),
                        (None, None) => {
                            return Err(Error::Config(format!(
                                "the connectionString in {source} has neither AccountKey nor SharedAccessSignature: copy the full string from the portal"
                            )));
                        }
                    }
                }
                [] => {
                    let keys: Vec<&String> = values.keys().collect();
                    return Err(Error::Config(format!(
                        "{source} (used by {label}) has none of the keys accountKey, sasToken, connectionString (it has {keys:?}): add one"
                    )));
                }
                many => {
                    return Err(Error::Config(format!(
                        "{source} (used by {label}) has several credentials ({}): keep exactly one",
                        many.join(", ")
                    )));
                }
            };
            (credential, source)
        }
        _ => (
            AzureCredential::Anonymous,
            format!("{label} (no credentials)"),
        ),
    };
    Ok((credential, credential_source, endpoint))
}

/// The blob service endpoint. The value is never echoed whole: a pasted "Blob SAS URL" holds
/// a signature in its query.
fn parse_endpoint(label: &str, endpoint: &str, account: &str) -> Result<url::Url> {
    let example = format!("https://{account}.blob.core.windows.net");
    let url = url::Url::parse(endpoint)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
        .ok_or_else(|| {
            Error::Config(format!(
                "{label} has an endpoint that is not an http(s) URL: use e.g. {example}"
            ))
        })?;
    if url.query().is_some() || !url.username().is_empty() || url.password().is_some() {
        return Err(Error::Config(format!(
            "{label} has an endpoint with a query or user info ({}://{}{}?...): give the bare service URL and put a SAS token in the Secret's sasToken",
            url.scheme(),
            url.host_str().unwrap_or(""),
            url.path()
        )));
    }
    Ok(url)
}

/// Azure's container name rule: the CRD checks it with CEL, and this copy stays for datastores
/// files, which meet no apiserver (a test holds the two to the same verdicts).
fn container_name_is_valid(name: &str) -> bool {
    matches!(name, "$root" | "$web" | "$logs")
        || ((3..=63).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-')
            && !name.contains("--"))
}

/// A Secret's `data` (decoded) and `stringData`, which wins as the apiserver does.
fn secret_values(secret: &K8sSecret) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (k, v) in secret.data.iter().flatten() {
        out.insert(k.clone(), String::from_utf8_lossy(&v.0).trim().to_string());
    }
    for (k, v) in secret.string_data.iter().flatten() {
        out.insert(k.clone(), v.trim().to_string());
    }
    out
}

/// An Azure Storage connection string (`Key=Value;...`).
struct ConnectionString(BTreeMap<String, String>);

impl ConnectionString {
    /// Refuses, saying why (never quoting the string: it holds the key), what is not
    /// `Key=Value;...` naming an account or an endpoint: guessing would send the credential to
    /// the public cloud's endpoint.
    fn parse(s: &str) -> Result<Self, String> {
        let mut map = BTreeMap::new();
        for (n, part) in s.split(';').map(str::trim).enumerate() {
            if part.is_empty() {
                continue;
            }
            let Some((k, v)) = part.split_once('=') else {
                return Err(format!(
                    "is not Key=Value;...: its part {} has no `=`",
                    n + 1
                ));
            };
            map.insert(k.trim().to_string(), v.trim().to_string());
        }
        if map
            .get("UseDevelopmentStorage")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        {
            // Azurite's well-known account, documented and public.
            map.entry("AccountName".into())
                .or_insert_with(|| "devstoreaccount1".into());
            map.entry("AccountKey".into())
                .or_insert_with(|| "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==".into());
            map.entry("BlobEndpoint".into())
                .or_insert_with(|| "http://127.0.0.1:10000/devstoreaccount1".into());
        }
        if !map.contains_key("AccountName") && !map.contains_key("BlobEndpoint") {
            return Err("names neither AccountName nor BlobEndpoint".to_string());
        }
        Ok(ConnectionString(map))
    }

    fn get(&self, key: &str) -> Option<String> {
        self.0.get(key).cloned()
    }

    fn blob_endpoint(&self) -> Option<String> {
        if let Some(e) = self.get("BlobEndpoint") {
            return Some(e);
        }
        let account = self.get("AccountName")?;
        let protocol = self
            .get("DefaultEndpointsProtocol")
            .unwrap_or_else(|| "https".into());
        let suffix = self
            .get("EndpointSuffix")
            .unwrap_or_else(|| "core.windows.net".into());
        Some(format!("{protocol}://{account}.blob.{suffix}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
apiVersion: datastore.dev/v1alpha1
kind: Datastore
metadata: {name: blob-ds}
spec:
  azureBlob:
    accountName: acct
    containerName: data
    credentials: {secretRef: {name: creds}}
---
apiVersion: v1
kind: Secret
metadata: {name: creds}
stringData:
  connectionString: "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5;EndpointSuffix=core.chinacloudapi.cn"
---
apiVersion: datastore.dev/v1alpha1
kind: ClusterDatastore
metadata: {name: shared}
spec:
  local: {path: store}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
"#;

    fn scope() -> Scope {
        Scope {
            namespace: "default".into(),
            operator_namespace: "datastore-operator".into(),
        }
    }

    #[test]
    fn connection_string_gives_key_and_sovereign_endpoint() {
        let catalog = Catalog::parse(FILE, "test.yaml", PathBuf::from("/cfg")).unwrap();
        let r = catalog.resolve("blob-ds", &scope()).unwrap();
        let StoreConfig::AzureBlob(cfg) = r.config else {
            panic!("azure expected")
        };
        assert_eq!(
            cfg.endpoint.as_str(),
            "https://acct.blob.core.chinacloudapi.cn/"
        );
        assert_eq!(
            cfg.credential,
            AzureCredential::AccountKey(Secret::new("a2V5"))
        );
        assert!(
            !format!("{cfg:?}").contains("a2V5"),
            "credentials never appear in Debug output"
        );
    }

    #[test]
    fn an_endpoint_with_a_sas_is_refused_without_echoing_it() {
        let text = FILE.replace("containerName: data", "containerName: data\n    endpoint: \"https://acct.blob.core.windows.net/?sv=1&sig=TOPSECRET\"");
        let err = Catalog::parse(&text, "test.yaml", PathBuf::new())
            .unwrap()
            .resolve("blob-ds", &scope())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("put a SAS token in the Secret's sasToken"),
            "{err}"
        );
        assert!(!err.contains("TOPSECRET"), "{err}");
    }

    /// The one Rust copy of a CEL rule must agree with the CRD's rule, evaluated as the
    /// apiserver would: a datastores file gets the same verdict as `kubectl apply`.
    #[test]
    fn the_rust_name_rules_agree_with_the_crds_cel() {
        use kube::CustomResourceExt;
        use kube::core::cel::Validator;
        let crd = crate::api::Datastore::crd();
        let schema = serde_json::to_value(
            crd.spec.versions[0]
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .expect("the CRD has an openAPIV3Schema"),
        )
        .unwrap();
        let accepted = |storage: serde_json::Value| {
            let object = serde_json::json!({
                "apiVersion": "datastore.dev/v1alpha1",
                "kind": "Datastore",
                "metadata": {"name": "ds"},
                "spec": storage,
            });
            Validator::new().validate(&schema, &object, None).is_ok()
        };
        let names = [
            "data", "a-b", "abc", "$web", "$root", "$logs", "$other", "ab", "Data", "a--b", "-ab",
            "ab-", "a_b", "../x", "a.b", "0ab",
        ];
        let too_long = "a".repeat(64);
        for name in names.into_iter().chain([too_long.as_str()]) {
            let blob =
                serde_json::json!({"azureBlob": {"accountName": "acct", "containerName": name}});
            assert_eq!(
                container_name_is_valid(name),
                accepted(blob),
                "containerName {name}"
            );
            let share = serde_json::json!({"azureFile": {"accountName": "acct", "shareName": name,
                "credentials": {"secretRef": {"name": "creds"}}}});
            assert_eq!(
                container_name_is_valid(name) && !name.starts_with('$'),
                accepted(share),
                "shareName {name}"
            );
        }
    }

    #[test]
    fn container_names_are_checked_without_an_apiserver() {
        for good in ["data", "a-b", "$web", "abc"] {
            assert!(container_name_is_valid(good), "{good}");
        }
        for bad in ["ab", "Data", "a--b", "-ab", "ab-", "a_b", "../x"] {
            assert!(!container_name_is_valid(bad), "{bad}");
        }
    }

    #[test]
    fn local_path_is_relative_to_the_file() {
        let catalog = Catalog::parse(FILE, "test.yaml", PathBuf::from("/cfg")).unwrap();
        assert_eq!(
            catalog.resolve("shared", &scope()).unwrap().config,
            StoreConfig::Local {
                path: PathBuf::from("/cfg/store"),
                read_only: false
            }
        );
    }

    #[test]
    fn unknown_name_lists_the_known_ones() {
        let catalog = Catalog::parse(FILE, "test.yaml", PathBuf::from("/cfg")).unwrap();
        let err = catalog.resolve("nope", &scope()).unwrap_err().to_string();
        assert!(
            err.contains("blob-ds (Datastore in default)")
                && err.contains("shared (ClusterDatastore)"),
            "{err}"
        );
    }

    #[test]
    fn a_datastore_in_another_namespace_is_not_found() {
        let text = FILE.replace(
            "metadata: {name: blob-ds}",
            "metadata: {name: blob-ds, namespace: default}",
        );
        let catalog = Catalog::parse(&text, "test.yaml", PathBuf::from("/cfg")).unwrap();
        assert!(catalog.resolve("blob-ds", &scope()).is_ok());
        let other = Scope {
            namespace: "team-b".into(),
            ..scope()
        };
        assert!(catalog.resolve("blob-ds", &other).is_err());
    }

    #[test]
    fn malformed_documents_are_reported_with_their_position() {
        let err = Catalog::parse("kind: Datastore\napiVersion: datastore.dev/v1alpha1\nmetadata: {name: x}\nspec: {azureBlob: 3}\n", "f.yaml", PathBuf::new()).unwrap_err();
        assert!(matches!(err, Error::Config(_)));
        assert!(err.to_string().contains("f.yaml, document 1"), "{err}");
        let err = Catalog::parse("a: [", "f.yaml", PathBuf::new()).unwrap_err();
        assert!(err.to_string().contains("not valid YAML"), "{err}");
    }

    /// A connection string that names no account or endpoint, or is not `Key=Value;...`, is a
    /// configuration error, never a guess at the public cloud (where the key would be sent);
    /// an empty credential is one too. The messages never quote the string.
    #[test]
    fn garbage_connection_strings_and_empty_credentials_are_config_errors() {
        let resolve = |line: &str| {
            let text = FILE.replace(
                r#"connectionString: "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5;EndpointSuffix=core.chinacloudapi.cn""#,
                line,
            );
            assert_ne!(text, FILE, "the fixture changed");
            let catalog = Catalog::parse(&text, "test.yaml", PathBuf::new()).unwrap();
            catalog.resolve("blob-ds", &scope())
        };
        for (line, says) in [
            (
                r#"connectionString: "garbage-SECRETLIKE""#,
                "part 1 has no `=`",
            ),
            (
                r#"connectionString: "AccountKey=SECRETLIKE""#,
                "names neither AccountName nor BlobEndpoint",
            ),
            (
                r#"connectionString: "AccountName=acct;SECRETLIKE""#,
                "part 2 has no `=`",
            ),
            (r#"connectionString: "  ""#, "connectionString in Secret"),
            (r#"accountKey: """#, "the accountKey in Secret"),
        ] {
            let err = match resolve(line) {
                Err(e) => e,
                Ok(r) => panic!("{line}: resolved to {:?}", r.config),
            };
            assert!(matches!(err, Error::Config(_)), "{line}: {err:?}");
            let message = err.to_string();
            assert!(message.contains(says), "{line}: {message}");
            assert!(!message.contains("SECRETLIKE"), "{line}: {message}");
        }
    }

    #[test]
    fn a_secret_without_a_known_key_is_explained() {
        let text = FILE.replace("connectionString:", "password:");
        let err = Catalog::parse(&text, "test.yaml", PathBuf::new())
            .unwrap()
            .resolve("blob-ds", &scope())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("none of the keys accountKey, sasToken, connectionString"),
            "{err}"
        );
        assert!(err.contains("\"password\""), "{err}");
    }
    const SHARE: &str = r#"
apiVersion: datastore.dev/v1alpha1
kind: Datastore
metadata: {name: share-ds}
spec:
  readOnly: true
  azureFile:
    accountName: acct
    shareName: datasets
    credentials: {secretRef: {name: share-creds}}
---
apiVersion: v1
kind: Secret
metadata: {name: share-creds}
stringData:
  connectionString: "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5"
"#;

    #[test]
    fn a_share_resolves_to_its_account_key_and_keeps_read_only() {
        let catalog = Catalog::parse(SHARE, "test.yaml", PathBuf::new()).unwrap();
        let config = catalog.resolve("share-ds", &scope()).unwrap().config;
        assert!(config.read_only());
        let StoreConfig::AzureFile(share) = config else {
            panic!("a share expected: {config:?}")
        };
        assert_eq!(
            (share.account.as_str(), share.share.as_str()),
            ("acct", "datasets")
        );
        assert_eq!(
            share.credential,
            AzureCredential::AccountKey(Secret::new("a2V5"))
        );
        assert_eq!(share.credential_source, "Secret default/share-creds");
    }

    #[test]
    fn a_share_refuses_a_sas_token_and_cannot_be_opened_by_the_cli() {
        let text = SHARE.replace(
            r#"connectionString: "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5""#,
            "sasToken: sv=2022&sig=TOPSECRET",
        );
        let err = Catalog::parse(&text, "test.yaml", PathBuf::new())
            .unwrap()
            .resolve("share-ds", &scope())
            .unwrap_err()
            .to_string();
        assert!(err.contains("an SMB mount needs the account key"), "{err}");
        assert!(!err.contains("TOPSECRET"), "{err}");

        let text = SHARE.replace(
            "credentials: {secretRef: {name: share-creds}}",
            "credentials: {workloadIdentity: {clientId: 00000000-0000-0000-0000-000000000001}}",
        );
        let err = Catalog::parse(&text, "test.yaml", PathBuf::new())
            .unwrap()
            .resolve("share-ds", &scope())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("which the operator cannot mount yet: use credentials.secretRef"),
            "{err}"
        );

        let catalog = Catalog::parse(SHARE, "test.yaml", PathBuf::new()).unwrap();
        let config = catalog.resolve("share-ds", &scope()).unwrap().config;
        let err = crate::store::Store::new(&config, &Default::default())
            .err()
            .expect("no client for a share")
            .to_string();
        assert!(
            err.contains("can only be reached from the cluster"),
            "{err}"
        );
    }
}
