//! `mount` references: which driver mounts each one, and why.
//!
//! - **csi**: an inline CSI volume, `blob.csi.azure.com` for Azure Blob and `file.csi.azure.com`
//!   for Azure Files. The driver runs on the node; the pod stays unprivileged.
//! - **sidecar**: a blobfuse2 native sidecar mounting into a volume shared with the script's
//!   container. It must run privileged (a FUSE mount propagated out of its container), so it is
//!   never chosen by default where the CSI driver is known to be installed, and refused where the
//!   namespace's Pod Security level forbids privileged pods.

use std::collections::BTreeMap;

use crate::api::{MountDriver, MountRecord};
use crate::plan::{ExecutionPlan, Mount};
use crate::reason::Reason;
use crate::store::{AzureCredential, StoreConfig};

use super::{BuildContext, csi};

/// The CSI driver of Azure Blob containers (AKS: `az aks update --enable-blob-driver`).
pub const BLOB_CSI_DRIVER: &str = "blob.csi.azure.com";
/// The CSI driver of Azure Files shares (on by default in AKS).
pub const FILE_CSI_DRIVER: &str = "file.csi.azure.com";
/// The namespace label holding its enforced Pod Security level.
pub const POD_SECURITY_ENFORCE_LABEL: &str = "pod-security.kubernetes.io/enforce";

/// How the operator picks a driver for a mount whose reference names none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DefaultMountDriver {
    /// `csi`, unless the cluster is known not to have the CSI driver; then `sidecar`.
    #[default]
    Auto,
    Csi,
    Sidecar,
}

/// What the controller learned about the cluster that decides how mounts are mounted and which
/// downloads the node cache serves. `None` is "not known" (e.g. `datastore plan` without a
/// cluster).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MountEnvironment {
    /// Whether the CSIDriver object `blob.csi.azure.com` exists.
    pub blob_csi: Option<bool>,
    /// Whether the CSIDriver object `file.csi.azure.com` exists.
    pub file_csi: Option<bool>,
    /// Whether the CSIDriver object of the node cache (`cache.datastore.dev`) exists.
    pub node_cache: Option<bool>,
    /// The experiment namespace's `pod-security.kubernetes.io/enforce` label (`None`: absent
    /// or not known).
    pub pod_security_enforce: Option<String>,
    /// The experiment's namespace, for messages.
    pub namespace: String,
}

/// The driver picked for one mount, and why (for the Experiment's status).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountChoice {
    pub driver: MountDriver,
    pub reason: String,
}

/// Why a mount cannot be mounted here.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct MountRefusal {
    pub reason: Reason,
    pub message: String,
    /// Only a change of the spec can lift it (the reference asks for what cannot be done);
    /// otherwise the cluster, the operator or the datastore can.
    pub spec: bool,
}

/// Why the sidecar cannot mount without an image. The builder says the same when it is handed a
/// sidecar choice the operator can no longer make.
pub(super) const NO_BLOBFUSE_IMAGE: &str = "mounting with the sidecar needs a blobfuse2 image, and the operator has none; set --blobfuse-image (Helm value blobfuseImage), or use mountDriver: csi";

/// Why a datastore without credentials cannot be mounted (by either driver).
pub(super) fn no_credentials(datastore: &str) -> String {
    format!(
        "datastore {datastore} has no credentials, and neither driver mounts a container anonymously; give the datastore credentials, or use mode download"
    )
}

/// The driver of each of the plan's mounts, in order.
pub fn choose_drivers(
    plan: &ExecutionPlan,
    datastores: &BTreeMap<String, StoreConfig>,
    ctx: &BuildContext,
    env: &MountEnvironment,
) -> Result<Vec<MountChoice>, MountRefusal> {
    plan.mounts
        .iter()
        .map(|mount| choose_driver(mount, datastores.get(&mount.datastore), ctx, env))
        .collect()
}

fn choose_driver(
    mount: &Mount,
    store: Option<&StoreConfig>,
    ctx: &BuildContext,
    env: &MountEnvironment,
) -> Result<MountChoice, MountRefusal> {
    let refuse = |reason, message: String| MountRefusal {
        reason,
        message: format!("parameter {}: {message}", mount.param),
        spec: false,
    };
    let (credential, csi_driver, csi_installed) = match store {
        Some(StoreConfig::AzureBlob(c)) => (&c.credential, BLOB_CSI_DRIVER, env.blob_csi),
        Some(StoreConfig::AzureFile(c)) => (&c.credential, FILE_CSI_DRIVER, env.file_csi),
        // The planner refuses both before a build.
        Some(StoreConfig::Local { .. }) | None => {
            return Err(refuse(
                Reason::DatastoreInvalid,
                format!(
                    "datastore {} cannot be mounted in the cluster",
                    mount.datastore
                ),
            ));
        }
    };
    if *credential == AzureCredential::Anonymous {
        return Err(refuse(
            Reason::MountNeedsCredentials,
            no_credentials(&mount.datastore),
        ));
    }
    let is_share = matches!(store, Some(StoreConfig::AzureFile(_)));
    // What the CSI driver cannot mount (a folder name it refuses, an endpoint it cannot reach)
    // the sidecar can.
    let csi_cannot = match store {
        Some(StoreConfig::AzureBlob(c)) => csi::blob_csi_cannot_mount(c, &mount.remote_path),
        _ => None,
    };
    let choice = match (mount.driver, is_share) {
        (Some(MountDriver::Csi), false) if csi_cannot.is_some() => {
            return Err(MountRefusal {
                spec: true,
                ..refuse(
                    Reason::CsiCannotMount,
                    format!(
                        "{}; use mountDriver: sidecar (a privileged blobfuse2 sidecar mounts it)",
                        csi_cannot.unwrap_or_default()
                    ),
                )
            });
        }
        (Some(driver), _) => MountChoice {
            driver,
            reason: format!(
                "requested by the reference (mountDriver: {})",
                driver.as_str()
            ),
        },
        (None, true) => MountChoice {
            driver: MountDriver::Csi,
            reason: format!("an Azure Files share mounts only through {FILE_CSI_DRIVER}"),
        },
        (None, false)
            if ctx.default_mount_driver == DefaultMountDriver::Auto
                && let Some(why) = &csi_cannot =>
        {
            MountChoice {
                driver: MountDriver::Sidecar,
                reason: format!("{why}, so a privileged blobfuse2 sidecar mounts it"),
            }
        }
        (None, false)
            if ctx.default_mount_driver == DefaultMountDriver::Csi
                && let Some(why) = &csi_cannot =>
        {
            return Err(refuse(
                Reason::CsiCannotMount,
                format!(
                    "{why}; the operator's default driver is csi (--default-mount-driver): set mountDriver: sidecar on the reference"
                ),
            ));
        }
        (None, false) => match (ctx.default_mount_driver, csi_installed) {
            (DefaultMountDriver::Csi, _) => MountChoice {
                driver: MountDriver::Csi,
                reason: "the operator's default (--default-mount-driver csi)".to_string(),
            },
            (DefaultMountDriver::Sidecar, _) => MountChoice {
                driver: MountDriver::Sidecar,
                reason: "the operator's default (--default-mount-driver sidecar)".to_string(),
            },
            (DefaultMountDriver::Auto, Some(false)) => MountChoice {
                driver: MountDriver::Sidecar,
                reason: format!(
                    "the cluster has no CSIDriver {csi_driver}, so a privileged blobfuse2 sidecar mounts it"
                ),
            },
            (DefaultMountDriver::Auto, Some(true)) => MountChoice {
                driver: MountDriver::Csi,
                reason: format!("the cluster has the CSIDriver {csi_driver}"),
            },
            (DefaultMountDriver::Auto, None) => MountChoice {
                driver: MountDriver::Csi,
                reason: format!(
                    "the default; whether the cluster has {csi_driver} was not checked"
                ),
            },
        },
    };
    match choice.driver {
        MountDriver::Csi if csi_installed == Some(false) => Err(refuse(
            Reason::CsiDriverMissing,
            format!(
                "mounting with csi needs the CSIDriver {csi_driver}, which this cluster does not have; install it (AKS: az aks update --enable-{}-driver){}",
                if is_share { "file" } else { "blob" },
                if is_share {
                    ""
                } else {
                    ", or use mountDriver: sidecar"
                }
            ),
        )),
        MountDriver::Sidecar
            if matches!(
                env.pod_security_enforce.as_deref(),
                Some("baseline" | "restricted")
            ) =>
        {
            Err(refuse(
                Reason::PrivilegedForbidden,
                format!(
                    "the blobfuse2 sidecar must run privileged, which namespace {} forbids ({POD_SECURITY_ENFORCE_LABEL}: {}); use mountDriver: csi with the {BLOB_CSI_DRIVER} driver, or run the experiment in a namespace that allows privileged pods",
                    env.namespace,
                    env.pod_security_enforce.as_deref().unwrap_or_default()
                ),
            ))
        }
        MountDriver::Sidecar if ctx.blobfuse_image.is_none() => Err(refuse(
            Reason::NoBlobfuseImage,
            NO_BLOBFUSE_IMAGE.to_string(),
        )),
        _ => Ok(choice),
    }
}

/// The Experiment status' record of each mount.
pub fn mount_records(plan: &ExecutionPlan, choices: &[MountChoice]) -> Vec<MountRecord> {
    plan.mounts
        .iter()
        .zip(choices)
        .map(|(mount, choice)| MountRecord {
            name: mount.param.clone(),
            datastore: mount.datastore.clone(),
            path: mount.remote_path.clone(),
            driver: choice.driver,
            read_only: mount.read_only,
            reason: choice.reason.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fixtures::{self, key};

    fn blob(credential: AzureCredential) -> StoreConfig {
        StoreConfig::AzureBlob(fixtures::blob(
            "data",
            "https://mlstorage.blob.core.windows.net",
            credential,
        ))
    }

    fn share() -> StoreConfig {
        StoreConfig::AzureFile(fixtures::share(key(), false))
    }

    fn choose(
        store: StoreConfig,
        requested: Option<MountDriver>,
        default: DefaultMountDriver,
        env: MountEnvironment,
    ) -> Result<MountChoice, MountRefusal> {
        choose_path("images", store, requested, default, env)
    }

    fn choose_path(
        path: &str,
        store: StoreConfig,
        requested: Option<MountDriver>,
        default: DefaultMountDriver,
        env: MountEnvironment,
    ) -> Result<MountChoice, MountRefusal> {
        let mount = Mount {
            param: "--data".into(),
            datastore: "ds".into(),
            remote_path: path.into(),
            local_path: "/mnt/datastore/data".into(),
            read_only: true,
            driver: requested,
        };
        let ctx = BuildContext {
            default_mount_driver: default,
            blobfuse_image: Some("blobfuse2:test".into()),
            ..Default::default()
        };
        choose_driver(&mount, Some(&store), &ctx, &env)
    }

    fn env(blob_csi: Option<bool>, enforce: Option<&str>) -> MountEnvironment {
        MountEnvironment {
            blob_csi,
            file_csi: Some(true),
            pod_security_enforce: enforce.map(String::from),
            namespace: "team-a".into(),
            node_cache: None,
        }
    }

    #[test]
    fn auto_prefers_csi_and_falls_back_to_the_sidecar_only_without_the_driver() {
        let auto = DefaultMountDriver::Auto;
        let with = choose(blob(key()), None, auto, env(Some(true), None)).unwrap();
        assert_eq!(with.driver, MountDriver::Csi);
        assert_eq!(
            with.reason,
            "the cluster has the CSIDriver blob.csi.azure.com"
        );
        let unknown = choose(blob(key()), None, auto, env(None, None)).unwrap();
        assert_eq!(unknown.driver, MountDriver::Csi);
        assert!(
            unknown.reason.contains("was not checked"),
            "{}",
            unknown.reason
        );
        let without = choose(
            blob(key()),
            None,
            auto,
            env(Some(false), Some("privileged")),
        )
        .unwrap();
        assert_eq!(without.driver, MountDriver::Sidecar);
        assert!(
            without.reason.contains("no CSIDriver blob.csi.azure.com"),
            "{}",
            without.reason
        );
    }

    /// blob.csi.azure.com takes a folder only of `[a-zA-Z0-9._/-]`: `csi` asked for on another
    /// is the spec's to change, `auto` takes the sidecar for it.
    #[test]
    fn a_folder_the_csi_driver_refuses_takes_the_sidecar_or_is_refused() {
        let installed = || env(Some(true), None);
        for path in ["images/train set", "cats+dogs", "données", "a,b", "x@y"] {
            let auto = choose_path(
                path,
                blob(key()),
                None,
                DefaultMountDriver::Auto,
                installed(),
            )
            .unwrap();
            assert_eq!(auto.driver, MountDriver::Sidecar, "{path}");
            assert!(
                auto.reason
                    .contains("holds characters the blob.csi.azure.com driver refuses"),
                "{}",
                auto.reason
            );
            let asked = choose_path(
                path,
                blob(key()),
                Some(MountDriver::Csi),
                DefaultMountDriver::Auto,
                installed(),
            )
            .unwrap_err();
            assert_eq!(asked.reason, "CsiCannotMount");
            assert!(
                asked.spec,
                "only the spec can change the folder or the driver"
            );
            assert!(
                asked.message.contains("use mountDriver: sidecar"),
                "{}",
                asked.message
            );
            let default_csi = choose_path(
                path,
                blob(key()),
                None,
                DefaultMountDriver::Csi,
                installed(),
            )
            .unwrap_err();
            assert_eq!(default_csi.reason, "CsiCannotMount");
        }
        for path in ["images/train-2024_v1.0", "A/b/C"] {
            let auto = choose_path(
                path,
                blob(key()),
                None,
                DefaultMountDriver::Auto,
                installed(),
            )
            .unwrap();
            assert_eq!(auto.driver, MountDriver::Csi, "{path}");
        }
        // An endpoint the driver cannot reach (Azurite, plain HTTP): the sidecar too.
        let azurite = StoreConfig::AzureBlob(fixtures::blob(
            "data",
            "http://127.0.0.1:10000/devstoreaccount1",
            key(),
        ));
        let auto = choose(azurite, None, DefaultMountDriver::Auto, installed()).unwrap();
        assert_eq!(auto.driver, MountDriver::Sidecar);
        assert!(auto.reason.contains("is not HTTPS"), "{}", auto.reason);
    }

    #[test]
    fn the_reference_wins_over_the_default_and_says_so() {
        let choice = choose(
            blob(key()),
            Some(MountDriver::Sidecar),
            DefaultMountDriver::Csi,
            env(Some(true), None),
        )
        .unwrap();
        assert_eq!(
            choice,
            MountChoice {
                driver: MountDriver::Sidecar,
                reason: "requested by the reference (mountDriver: sidecar)".into()
            }
        );
        let choice = choose(
            blob(key()),
            None,
            DefaultMountDriver::Sidecar,
            env(None, None),
        )
        .unwrap();
        assert!(
            choice.reason.contains("--default-mount-driver sidecar"),
            "{}",
            choice.reason
        );
    }

    #[test]
    fn a_share_always_mounts_through_the_file_driver() {
        let choice = choose(
            share(),
            None,
            DefaultMountDriver::Sidecar,
            env(Some(false), None),
        )
        .unwrap();
        assert_eq!(choice.driver, MountDriver::Csi);
        assert!(
            choice.reason.contains("file.csi.azure.com"),
            "{}",
            choice.reason
        );
        let missing = MountEnvironment {
            file_csi: Some(false),
            ..env(None, None)
        };
        let refusal = choose(share(), None, DefaultMountDriver::Auto, missing).unwrap_err();
        assert_eq!(refusal.reason, "CsiDriverMissing");
        assert!(
            refusal.message.contains("--enable-file-driver"),
            "{refusal}"
        );
        assert!(!refusal.message.contains("sidecar"), "{refusal}");
    }

    #[test]
    fn refusals_name_the_cause_and_the_way_out() {
        let refusal = choose(
            blob(key()),
            Some(MountDriver::Csi),
            DefaultMountDriver::Auto,
            env(Some(false), None),
        )
        .unwrap_err();
        assert_eq!(refusal.reason, "CsiDriverMissing");
        assert!(
            refusal.message.starts_with(
                "parameter --data: mounting with csi needs the CSIDriver blob.csi.azure.com"
            ),
            "{refusal}"
        );
        for level in ["baseline", "restricted"] {
            let refusal = choose(
                blob(key()),
                Some(MountDriver::Sidecar),
                DefaultMountDriver::Auto,
                env(Some(true), Some(level)),
            )
            .unwrap_err();
            assert_eq!(refusal.reason, "PrivilegedForbidden");
            assert!(
                refusal.message.contains(&format!(
                    "namespace team-a forbids (pod-security.kubernetes.io/enforce: {level})"
                )),
                "{refusal}"
            );
        }
        // Auto never picks a sidecar the namespace forbids without saying so.
        let refusal = choose(
            blob(key()),
            None,
            DefaultMountDriver::Auto,
            env(Some(false), Some("restricted")),
        )
        .unwrap_err();
        assert_eq!(refusal.reason, "PrivilegedForbidden");
        let refusal = choose(
            blob(AzureCredential::Anonymous),
            None,
            DefaultMountDriver::Auto,
            env(Some(true), None),
        )
        .unwrap_err();
        assert_eq!(refusal.reason, "MountNeedsCredentials");
    }

    #[test]
    fn the_sidecar_needs_an_image() {
        let mount = Mount {
            param: "--data".into(),
            datastore: "ds".into(),
            remote_path: String::new(),
            local_path: "/mnt/datastore/data".into(),
            read_only: true,
            driver: Some(MountDriver::Sidecar),
        };
        let refusal = choose_driver(
            &mount,
            Some(&blob(key())),
            &BuildContext::default(),
            &env(None, None),
        )
        .unwrap_err();
        assert_eq!(refusal.reason, "NoBlobfuseImage");
        assert!(refusal.message.contains("--blobfuse-image"), "{refusal}");
    }
}
