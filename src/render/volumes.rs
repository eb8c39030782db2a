//! The volumes that reach storage directly, beside the emptyDirs and the outputs PVC:
//!
//! - **shares**: each Azure Files datastore the plan uses is share `k` (in name order), reached
//!   through an inline `file.csi.azure.com` volume `share-<k>` with the Secret `<exp>-share-<k>`
//!   (account name and key, as SMB requires). Agent containers mount it at `/mnt/shares/<k>`
//!   (read-only for downloads and code, read-write for uploads) and their datastores file names
//!   it a local directory there, so the engine copies directory to directory.
//! - **mounts**: mount `n` of the plan is the volume `mount-<n>` of the run pod, mounted in
//!   `main` at the mount's path: an inline CSI volume (Azure Blob: with the Secret
//!   `<exp>-mount-<n>` holding a SAS with exactly the mount's permissions; Azure Files: with the
//!   share's Secret), or an emptyDir filled by the blobfuse2 sidecar `mount-<n>`, whose config
//!   (with the SAS) is the Secret `<exp>-mount-<n>`.
//!
//! An account key reaches a pod only for an SMB share, the driver's requirement; `main` never
//! mounts a Secret.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, Secret, SecretVolumeSource, Volume, VolumeMount,
};
use kube::ResourceExt;

use super::csi::{self, BlobAuth};
use super::{BuildContext, MountChoice, blobfuse, opaque_secret};
use crate::api::{Experiment, MountDriver};
use crate::error::{Error, Result};
use crate::plan::{ExecutionPlan, Mount};
use crate::store::Access;
use crate::store::sas;
use crate::store::{AzureBlobConfig, AzureCredential, AzureFileConfig, StoreConfig};

/// Where agent containers find share `k`: `/mnt/shares/<k>`.
pub const SHARES_ROOT: &str = "/mnt/shares";

pub fn share_dir(k: usize) -> String {
    format!("{SHARES_ROOT}/{k}")
}
pub fn share_volume(k: usize) -> String {
    format!("share-{k}")
}
pub fn share_secret_name(exp: &Experiment, k: usize) -> String {
    format!("{}-share-{k}", exp.name_any())
}
pub fn mount_volume(n: usize) -> String {
    format!("mount-{n}")
}
pub fn mount_secret_name(exp: &Experiment, n: usize) -> String {
    format!("{}-mount-{n}", exp.name_any())
}
fn mount_config_volume(n: usize) -> String {
    format!("mount-{n}-config")
}

/// The Azure Files datastores the plan uses (code, transfers and mounts), in name order: the
/// index is the share's `k`.
pub fn shares<'a>(
    plan: &'a ExecutionPlan,
    datastores: &'a BTreeMap<String, StoreConfig>,
) -> Vec<(&'a str, &'a AzureFileConfig)> {
    let used: BTreeSet<&str> = plan
        .permissions
        .keys()
        .map(String::as_str)
        .chain(plan.mounts.iter().map(|m| m.datastore.as_str()))
        .collect();
    used.into_iter()
        .filter_map(|name| match datastores.get(name) {
            Some(StoreConfig::AzureFile(config)) => Some((name, config)),
            _ => None,
        })
        .collect()
}

/// Everything the pods need to reach storage directly, decided once for a build.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StorageVolumes {
    /// The share index of each Azure Files datastore the plan uses.
    pub shares: BTreeMap<String, usize>,
    /// The Secrets the volumes and sidecars read: the shares' (by `k`), then the mounts' (by
    /// `n`).
    pub secrets: Vec<Secret>,
    /// The run pod's volumes of the mounts.
    pub mount_volumes: Vec<Volume>,
    /// The blobfuse2 sidecars, in mount order.
    pub sidecars: Vec<Container>,
    /// `main`'s view of the mounts, in mount order.
    pub main_mounts: Vec<VolumeMount>,
}

impl StorageVolumes {
    /// The share volume `share-<k>` of `datastore`, if it is a share.
    pub fn share_volume(
        &self,
        datastore: &str,
        datastores: &BTreeMap<String, StoreConfig>,
        exp: &Experiment,
        read_only: bool,
    ) -> Option<Volume> {
        let k = *self.shares.get(datastore)?;
        let Some(StoreConfig::AzureFile(config)) = datastores.get(datastore) else {
            return None;
        };
        Some(csi::file_volume(
            &share_volume(k),
            config,
            "",
            read_only,
            &share_secret_name(exp, k),
        ))
    }

    /// An agent container's mount of `datastore`'s share at `/mnt/shares/<k>`, if it is one.
    pub fn share_mount(&self, datastore: &str, read_only: bool) -> Option<VolumeMount> {
        let k = *self.shares.get(datastore)?;
        Some(VolumeMount {
            name: share_volume(k),
            mount_path: share_dir(k),
            read_only: read_only.then_some(true),
            ..Default::default()
        })
    }
}

/// The share Secrets and every mount's volume, Secret and sidecar. `expiry` is when minted SAS
/// tokens end. `Err` says why a mount cannot be rendered, naming its parameter.
pub fn storage_volumes(
    exp: &Experiment,
    plan: &ExecutionPlan,
    datastores: &BTreeMap<String, StoreConfig>,
    ctx: &BuildContext,
    choices: &[MountChoice],
    expiry: DateTime<Utc>,
) -> Result<StorageVolumes> {
    let mut out = StorageVolumes::default();
    for (k, (name, config)) in shares(plan, datastores).into_iter().enumerate() {
        out.shares.insert(name.to_string(), k);
        out.secrets.push(share_secret(exp, k, name, config)?);
    }
    for (n, (mount, choice)) in plan.mounts.iter().zip(choices).enumerate() {
        let refuse =
            |message: String| Error::Config(format!("parameter {}: {message}", mount.param));
        let volume = mount_volume(n);
        let mut main_mount = VolumeMount {
            name: volume.clone(),
            mount_path: mount.local_path.clone(),
            read_only: mount.read_only.then_some(true),
            ..Default::default()
        };
        match (datastores.get(&mount.datastore), choice.driver) {
            (Some(StoreConfig::AzureBlob(config)), MountDriver::Csi) => {
                let auth = match &config.credential {
                    AzureCredential::WorkloadIdentity { client_id } => BlobAuth::WorkloadIdentity {
                        client_id: client_id.clone(),
                    },
                    _ => {
                        let token =
                            mount_sas(&mount.datastore, config, mount, expiry).map_err(refuse)?;
                        let secret_name = mount_secret_name(exp, n);
                        out.secrets.push(opaque_secret(
                            exp,
                            secret_name.clone(),
                            [
                                (csi::BLOB_CSI_SECRET_KEYS[0], config.account.clone()),
                                (csi::BLOB_CSI_SECRET_KEYS[1], token),
                            ],
                        ));
                        BlobAuth::Secret(secret_name)
                    }
                };
                out.mount_volumes.push(
                    csi::blob_volume(&volume, config, &mount.remote_path, mount.read_only, &auth)
                        .map_err(refuse)?,
                );
            }
            (Some(StoreConfig::AzureFile(config)), MountDriver::Csi) => {
                let k = out.shares[&mount.datastore];
                out.mount_volumes.push(csi::file_volume(
                    &volume,
                    config,
                    &mount.remote_path,
                    mount.read_only,
                    &share_secret_name(exp, k),
                ));
            }
            (Some(StoreConfig::AzureBlob(config)), MountDriver::Sidecar) => {
                let Some(image) = ctx.blobfuse_image.as_deref() else {
                    return Err(refuse(super::mount::NO_BLOBFUSE_IMAGE.to_string()));
                };
                if let AzureCredential::WorkloadIdentity { .. } = config.credential {
                    return Err(refuse(format!(
                        "datastore {} authenticates with workload identity, which the blobfuse2 sidecar cannot use (it mounts with a SAS token); use mountDriver: csi ({} mounts with workload identity), or give the datastore an account key",
                        mount.datastore,
                        super::BLOB_CSI_DRIVER
                    )));
                }
                let limit = blobfuse::memory_bytes(&ctx.sidecar_memory)?;
                if limit >> 20 < blobfuse::MIN_MEMORY_MB {
                    return Err(Error::Config(format!(
                        "the blobfuse2 sidecar's memory limit {} is below {} MiB; raise --sidecar-memory",
                        ctx.sidecar_memory.0,
                        blobfuse::MIN_MEMORY_MB
                    )));
                }
                let token = mount_sas(&mount.datastore, config, mount, expiry).map_err(refuse)?;
                let config_file = blobfuse::config_yaml(&blobfuse::Blobfuse2 {
                    store: config,
                    subdirectory: &mount.remote_path,
                    read_only: mount.read_only,
                    sas: &token,
                    cache: blobfuse::block_cache(limit),
                });
                let secret_name = mount_secret_name(exp, n);
                out.secrets.push(opaque_secret(
                    exp,
                    secret_name.clone(),
                    [(blobfuse::CONFIG_KEY, config_file)],
                ));
                out.mount_volumes.push(Volume {
                    name: volume.clone(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Default::default()
                });
                out.mount_volumes.push(Volume {
                    name: mount_config_volume(n),
                    secret: Some(SecretVolumeSource {
                        secret_name: Some(secret_name),
                        default_mode: Some(0o400),
                        ..Default::default()
                    }),
                    ..Default::default()
                });
                out.sidecars.push(blobfuse::sidecar(
                    &volume,
                    image,
                    &volume,
                    &mount_config_volume(n),
                    &ctx.sidecar_memory,
                    &ctx.sidecar_cpu,
                ));
                // The FUSE mount appears after `main`'s volume is set up: it must follow it.
                main_mount.mount_propagation = Some("HostToContainer".to_string());
            }
            (Some(StoreConfig::AzureFile(_)), MountDriver::Sidecar) => {
                return Err(refuse(format!(
                    "datastore {} is an Azure Files share, which the blobfuse2 sidecar cannot mount; use mountDriver: csi",
                    mount.datastore
                )));
            }
            (Some(StoreConfig::Local { .. }) | None, _) => {
                return Err(refuse(format!(
                    "datastore {} cannot be mounted in the cluster",
                    mount.datastore
                )));
            }
        }
        out.main_mounts.push(main_mount);
    }
    Ok(out)
}

/// The mount's SAS: one minted from the account key with exactly the mount's permissions, or the
/// datastore's own token.
fn mount_sas(
    name: &str,
    config: &AzureBlobConfig,
    mount: &Mount,
    expiry: DateTime<Utc>,
) -> std::result::Result<String, String> {
    match &config.credential {
        AzureCredential::AccountKey(_) => {
            mint_sas(name, config, mount.permissions(), expiry).map_err(|e| e.to_string())
        }
        AzureCredential::SasToken(token) => Ok(token.expose().to_string()),
        AzureCredential::WorkloadIdentity { .. } => {
            unreachable!("workload identity mounts carry no SAS")
        }
        AzureCredential::Anonymous => Err(super::mount::no_credentials(name)),
    }
}

/// A SAS for `config`'s container minted from its account key, allowing `access` until
/// `expiry`.
pub fn mint_sas(
    name: &str,
    config: &AzureBlobConfig,
    access: Access,
    expiry: DateTime<Utc>,
) -> Result<String> {
    let AzureCredential::AccountKey(key) = &config.credential else {
        unreachable!("only an account key mints a SAS");
    };
    sas::container_sas(
        &config.account,
        key.expose(),
        &config.container,
        access.into(),
        expiry,
    )
    .ok_or_else(|| {
        Error::Config(format!(
            "the account key in {} (used by datastore {name}) is not valid base64: copy it again from the portal",
            config.credential_source
        ))
    })
}

/// Secret `<exp>-share-<k>`: the share's account name and key, for `file.csi.azure.com`.
fn share_secret(
    exp: &Experiment,
    k: usize,
    name: &str,
    config: &AzureFileConfig,
) -> Result<Secret> {
    match &config.credential {
        AzureCredential::AccountKey(key) => Ok(opaque_secret(
            exp,
            share_secret_name(exp, k),
            [
                (csi::FILE_CSI_SECRET_KEYS[0], config.account.clone()),
                (csi::FILE_CSI_SECRET_KEYS[1], key.expose().to_string()),
            ],
        )),
        AzureCredential::WorkloadIdentity { .. } => Err(Error::Config(format!(
            "datastore {name} is an Azure Files share with workload identity, which {} documents for PersistentVolumes and StorageClasses but not for the inline volumes the operator creates; give the datastore an account key (secretRef), or keep the data in Azure Blob Storage",
            super::FILE_CSI_DRIVER
        ))),
        other => Err(Error::Config(format!(
            "datastore {name} is an Azure Files share with {}; an SMB mount needs the account key (secretRef with accountKey)",
            other.kind()
        ))),
    }
}
