//! `download` references served from the node cache (the CSI driver `cache.datastore.dev`, a
//! DaemonSet the chart deploys behind `nodeCache.enabled`): whether each one is, and why; its
//! volume and Secret.
//!
//! Cached reference `n` is the run pod's inline volume `cache-<n>` of that driver: the
//! container's account, name and endpoint and the folder as attributes, and as its
//! `nodePublishSecretRef` the Secret `<exp>-cache-<n>` holding a SAS that may only read and
//! list (the node plugin lists the folder with it: the cache hands a tree only to a pod that
//! could read the folder itself). `main` and `download-<n>` mount it read-only at the
//! reference's path; `download-<n>` checks the tree against the folder's listing and reports it
//! as a download does (`agent download --cached`). The volume needs no privilege: the pod stays
//! Pod Security "restricted".

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::{LocalObjectReference, Secret, Volume};
use kube::ResourceExt;

use super::{BuildContext, MountEnvironment, opaque_secret, volumes};
use crate::api::Experiment;
use crate::error::{Error, Result};
use crate::plan::contract::{self, NODE_CACHE_DRIVER};
use crate::plan::{ExecutionPlan, Transfer};
use crate::store::{Access, AzureCredential, StoreConfig};

/// The key of the SAS in a cached volume's Secret, as the node plugin reads it.
pub const SAS_KEY: &str = "sasToken";

pub fn cache_volume(n: usize) -> String {
    format!("cache-{n}")
}
pub fn cache_secret_name(exp: &Experiment, n: usize) -> String {
    format!("{}-cache-{n}", exp.name_any())
}

/// Whether the node cache serves one download reference, and why (`None`: nobody asked for it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheChoice {
    pub cached: bool,
    pub reason: Option<String>,
}

/// The node-cache choice of each of the plan's downloads, in order. `cache_downloads` names the
/// datastores whose `cacheDownloads` is set.
pub fn choose_caches(
    plan: &ExecutionPlan,
    datastores: &BTreeMap<String, StoreConfig>,
    cache_downloads: &BTreeSet<String>,
    ctx: &BuildContext,
    env: &MountEnvironment,
) -> Vec<CacheChoice> {
    plan.downloads
        .iter()
        .map(|download| {
            choose_cache(
                download,
                datastores.get(&download.datastore),
                cache_downloads.contains(&download.datastore),
                ctx,
                env,
            )
        })
        .collect()
}

/// Whether a download asks for the node cache: its reference's `cache`, else its datastore's
/// `cacheDownloads` (`datastore_default`), else the operator's default.
pub fn asks_for_cache(download: &Transfer, datastore_default: bool, ctx: &BuildContext) -> bool {
    download
        .cache
        .unwrap_or(datastore_default || ctx.cache_downloads)
}

fn choose_cache(
    download: &Transfer,
    store: Option<&StoreConfig>,
    datastore_default: bool,
    ctx: &BuildContext,
    env: &MountEnvironment,
) -> CacheChoice {
    let downloaded = |why: String| CacheChoice {
        cached: false,
        reason: Some(format!("downloaded into the pod: {why}")),
    };
    if !asks_for_cache(download, datastore_default, ctx) {
        return match download.cache {
            Some(false) => downloaded("cache: false on the reference".into()),
            _ => CacheChoice::default(),
        };
    }
    let asked = match (download.cache, datastore_default) {
        (Some(true), _) => "cache: true on the reference".to_string(),
        (None, true) => format!("cacheDownloads on datastore {}", download.datastore),
        _ => "the operator's default (--cache-downloads)".to_string(),
    };
    let name = &download.datastore;
    let cannot = match store {
        Some(StoreConfig::AzureBlob(config)) => match config.credential {
            AzureCredential::AccountKey(_) | AzureCredential::SasToken(_) => None,
            AzureCredential::WorkloadIdentity { .. } => Some(format!(
                "datastore {name} authenticates with workload identity, and the node cache lists the folder with a SAS token (from an account key or a sasToken)"
            )),
            AzureCredential::Anonymous => Some(format!(
                "datastore {name} has no credentials, and the node cache lists the folder with a SAS token (from an account key or a sasToken)"
            )),
        },
        Some(StoreConfig::AzureFile(_)) => Some(format!(
            "datastore {name} is an Azure Files share, and the node cache serves Azure Blob folders"
        )),
        // The planner refuses it before a build.
        Some(StoreConfig::Local { .. }) | None => Some(format!(
            "datastore {name} is not reachable from the cluster"
        )),
    };
    match (cannot, env.node_cache) {
        (Some(why), _) => downloaded(format!("{asked}, but {why}")),
        (None, Some(true)) => CacheChoice {
            cached: true,
            reason: Some(format!("served from the node cache: {asked}")),
        },
        (None, Some(false)) => downloaded(format!(
            "{asked}, but the cluster has no CSIDriver {NODE_CACHE_DRIVER} (Helm value nodeCache.enabled)"
        )),
        (None, None) => downloaded(format!(
            "{asked}, but whether the cluster has the CSIDriver {NODE_CACHE_DRIVER} is not known (the operator may not read CSIDrivers)"
        )),
    }
}

/// What the run pod needs for its cached downloads.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CachedVolumes {
    /// The volume of each cached download, by its index among the plan's downloads.
    pub volumes: BTreeMap<usize, Volume>,
    /// Their Secrets, in index order.
    pub secrets: Vec<Secret>,
    /// The pod's annotations saying why each download that asked for the cache is (not) cached.
    pub annotations: BTreeMap<String, String>,
}

/// The volumes, Secrets and annotations of the plan's downloads the node cache serves;
/// `choices` are [`choose_caches`]'s (missing ones: not cached). `expiry` is when minted SAS
/// tokens end.
pub fn cached_volumes(
    exp: &Experiment,
    plan: &ExecutionPlan,
    datastores: &BTreeMap<String, StoreConfig>,
    choices: &[CacheChoice],
    expiry: DateTime<Utc>,
) -> Result<CachedVolumes> {
    let mut out = CachedVolumes::default();
    for (n, (download, choice)) in plan.downloads.iter().zip(choices).enumerate() {
        if let Some(reason) = &choice.reason {
            out.annotations.insert(
                contract::cache_annotation(&contract::download_container(n)),
                reason.clone(),
            );
        }
        if !choice.cached {
            continue;
        }
        let Some(StoreConfig::AzureBlob(config)) = datastores.get(&download.datastore) else {
            return Err(Error::Config(format!(
                "parameter {}: only an Azure Blob datastore is served from the node cache",
                download.param
            )));
        };
        let token = match &config.credential {
            AzureCredential::AccountKey(_) => {
                volumes::mint_sas(&download.datastore, config, Access::READ, expiry)?
            }
            AzureCredential::SasToken(token) => token.expose().to_string(),
            _ => {
                return Err(Error::Config(format!(
                    "parameter {}: datastore {} has no SAS token or account key for the node cache",
                    download.param, download.datastore
                )));
            }
        };
        let secret = cache_secret_name(exp, n);
        out.secrets
            .push(opaque_secret(exp, secret.clone(), [(SAS_KEY, token)]));
        let attributes = BTreeMap::from([
            ("accountName", config.account.clone()),
            ("containerName", config.container.clone()),
            (
                "endpoint",
                config.endpoint.as_str().trim_end_matches('/').to_string(),
            ),
            ("path", download.remote_path.clone()),
        ]);
        let mut volume =
            super::csi::csi_volume(&cache_volume(n), NODE_CACHE_DRIVER, true, attributes);
        if let Some(csi) = volume.csi.as_mut() {
            csi.node_publish_secret_ref = Some(LocalObjectReference { name: secret });
        }
        out.volumes.insert(n, volume);
    }
    Ok(out)
}
