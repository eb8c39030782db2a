//! Admission, pure: from the spec and what [`super::dereference`] read to the objects the run
//! needs ([`Admitted`]), or a [`Refusal`] saying why not and what can lift it.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;

use crate::api::{Experiment, MountRecord};
use crate::plan::{self, CLUSTER, ExecutionPlan, contract};
use crate::reason::Reason;
use crate::render::{self, BuildContext, Children, MountEnvironment};
use crate::store::{self, StoreConfig};

use super::dereference::World;

/// Why an experiment does not move on, in its `Accepted` condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    pub message: String,
    pub lifted_by: LiftedBy,
}

/// Who can lift a refusal, which decides how the experiment waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LiftedBy {
    /// Only a change of the spec (which wakes the experiment): it fails until then.
    Spec,
    /// An admin or a datastore's owner (a missing datastore or CSIDriver, unusable
    /// credentials): nothing was created, so it waits (Pending) and looks again now and then.
    Cluster,
    /// The apiserver refused an object (quota, RBAC): it waits and is tried again with backoff.
    Apiserver,
}

impl Refusal {
    pub fn new(reason: Reason, message: impl Into<String>, lifted_by: LiftedBy) -> Refusal {
        Refusal {
            reason,
            message: message.into(),
            lifted_by,
        }
    }
}

/// What the run needs, ready to apply.
#[derive(Debug)]
pub struct Admitted {
    pub plan: ExecutionPlan,
    pub children: Children,
    /// How each mount is mounted, and why (the status keeps it).
    pub mounts: Vec<MountRecord>,
}

/// The rules the spec alone decides, checked before any datastore is looked up (a name that is
/// not one would be asked for as another resource).
pub fn spec(exp: &Experiment) -> Result<(), Refusal> {
    plan::check_spec(&exp.spec).map_err(|e| Refusal::new(e.reason(), e.to_string(), LiftedBy::Spec))
}

/// The experiment's plan against its resolved datastores.
pub fn plan(
    exp: &Experiment,
    datastores: &BTreeMap<String, StoreConfig>,
) -> Result<ExecutionPlan, Refusal> {
    plan::plan(&exp.spec, &store::capabilities(datastores), CLUSTER)
        .map_err(|e| Refusal::new(e.reason(), e.to_string(), LiftedBy::Spec))
}

/// Whether the Experiment's name leaves room for its children's names and labels.
pub fn name(exp: &Experiment) -> Result<(), Refusal> {
    render::check_name(exp)
        .map_err(|e| Refusal::new(Reason::NameTooLong, e.to_string(), LiftedBy::Spec))
}

/// The run's objects, each mount's driver and whether the node cache serves each download
/// chosen from what the cluster has (`env`).
pub fn run(
    exp: &Experiment,
    plan: ExecutionPlan,
    world: &World,
    env: &MountEnvironment,
    build: &BuildContext,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Admitted, Refusal> {
    let datastores = &world.datastores;
    if let Some(refusal) = missing_file_driver(&plan, datastores, env) {
        return Err(refusal);
    }
    // A reference that asks for what cannot be done (`mountDriver: csi` on a folder the driver
    // refuses) waits for a spec change; the others (a missing CSIDriver, a namespace whose Pod
    // Security level forbids the privileged sidecar, an operator without a blobfuse2 image, a
    // datastore without credentials) an admin can fix without touching the Experiment.
    let choices = render::choose_drivers(&plan, datastores, build, env).map_err(|r| {
        let lifted_by = if r.spec {
            LiftedBy::Spec
        } else {
            LiftedBy::Cluster
        };
        Refusal::new(r.reason, r.message, lifted_by)
    })?;
    let caches = render::choose_caches(&plan, datastores, &world.cache_downloads, build, env);
    // E.g. an account key that is not base64: the datastore's to fix, not the spec's.
    let children = render::build(exp, &plan, datastores, build, &choices, &caches, now)
        .map_err(|e| Refusal::new(Reason::DatastoreInvalid, e.to_string(), LiftedBy::Cluster))?;
    Ok(Admitted {
        mounts: render::mount_records(&plan, &choices),
        plan,
        children,
    })
}

/// The refusal of a plan whose downloads or uploads use an Azure Files share in a cluster known
/// to lack `file.csi.azure.com` (the agent containers mount the share through it; mounts are
/// [`render::choose_drivers`]'s). It waits, like a missing CSIDriver for a mount.
fn missing_file_driver(
    plan: &ExecutionPlan,
    datastores: &BTreeMap<String, StoreConfig>,
    env: &MountEnvironment,
) -> Option<Refusal> {
    if env.file_csi != Some(false) {
        return None;
    }
    let transfer = plan
        .code
        .iter()
        .chain(&plan.downloads)
        .chain(&plan.uploads)
        .find(|t| {
            matches!(
                datastores.get(&t.datastore),
                Some(StoreConfig::AzureFile(_))
            )
        })?;
    Some(Refusal::new(
        Reason::CsiDriverMissing,
        format!(
            "{}: datastore {} is an Azure Files share, which the agent containers reach through the CSIDriver {}, and this cluster does not have it; install it (AKS: az aks update --enable-file-driver)",
            if transfer.param == contract::CODE_CONTAINER {
                "spec.code".to_string()
            } else {
                format!("parameter {}", transfer.param)
            },
            transfer.datastore,
            render::FILE_CSI_DRIVER
        ),
        LiftedBy::Cluster,
    ))
}

/// What the upload needs: the credentials and the volumes' Secrets its Job reads, and the Job.
#[derive(Debug)]
pub struct Upload {
    pub secrets: Vec<Secret>,
    pub job: Job,
}

/// The upload Job with fresh credentials (the run may have outlived the ones minted at its
/// start), built without the run's mounts: the upload Job mounts none of them, and rendering
/// them again could only fail (an operator restarted without its blobfuse2 image) or mint
/// Secrets nobody reads.
pub fn upload(
    exp: &Experiment,
    mut plan: ExecutionPlan,
    datastores: &BTreeMap<String, StoreConfig>,
    build: &BuildContext,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Upload, Refusal> {
    plan.mounts.clear();
    let children = render::build(exp, &plan, datastores, build, &[], &[], now)
        .map_err(|e| Refusal::new(Reason::DatastoreInvalid, e.to_string(), LiftedBy::Cluster))?;
    let job = children
        .upload
        .expect("a plan with uploads builds an upload Job");
    // Only the volumes' Secrets the upload Job reads (an Azure Files share's, for one).
    let needed = referenced_secrets(&job);
    let secrets = children
        .credentials
        .into_iter()
        .chain(
            children
                .volume_secrets
                .into_iter()
                .filter(|s| s.metadata.name.as_ref().is_some_and(|n| needed.contains(n))),
        )
        .collect();
    Ok(Upload { secrets, job })
}

/// The names of the Secrets a Job's pods read: volumes (secret, projected, and CSI: the Azure
/// drivers' `secretName` volume attribute or a `nodePublishSecretRef`) and environment.
fn referenced_secrets(job: &Job) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let Some(pod) = job.spec.as_ref().and_then(|s| s.template.spec.as_ref()) else {
        return names;
    };
    for volume in pod.volumes.iter().flatten() {
        names.extend(volume.secret.as_ref().and_then(|s| s.secret_name.clone()));
        if let Some(csi) = &volume.csi {
            names.extend(csi.node_publish_secret_ref.as_ref().map(|r| r.name.clone()));
            names.extend(
                csi.volume_attributes
                    .as_ref()
                    .and_then(|a| a.get("secretName"))
                    .cloned(),
            );
        }
        for source in volume
            .projected
            .iter()
            .flat_map(|p| p.sources.iter().flatten())
        {
            names.extend(source.secret.as_ref().map(|s| s.name.clone()));
        }
    }
    for container in pod.init_containers.iter().flatten().chain(&pod.containers) {
        for var in container.env.iter().flatten() {
            names.extend(
                var.value_from
                    .as_ref()
                    .and_then(|v| v.secret_key_ref.as_ref())
                    .map(|r| r.name.clone()),
            );
        }
        for from in container.env_from.iter().flatten() {
            names.extend(from.secret_ref.as_ref().map(|r| r.name.clone()));
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::MountDriver;
    use crate::controller::experiment::fixtures::{datastores, experiment, plan_of, reference};
    use crate::render::MountChoice;

    #[test]
    fn transfers_of_a_share_wait_for_the_file_driver() {
        let stores = datastores();
        let env = |file_csi| MountEnvironment {
            file_csi,
            namespace: "ml".into(),
            ..MountEnvironment::default()
        };
        let plan = plan_of(
            &(reference("--in", "blob-ds", "download") + &reference("--out", "share-ds", "upload")),
        );
        let refusal = missing_file_driver(&plan, &stores, &env(Some(false))).unwrap();
        assert_eq!(refusal.lifted_by, LiftedBy::Cluster);
        assert_eq!(refusal.reason, "CsiDriverMissing");
        assert!(
            refusal.message.starts_with(
                "parameter --out: datastore share-ds is an Azure Files share, which the agent containers reach through the CSIDriver file.csi.azure.com"
            ) && refusal.message.contains("az aks update --enable-file-driver"),
            "{}",
            refusal.message
        );
        // Present, or not known (the ClusterRole was trimmed): tried.
        assert_eq!(missing_file_driver(&plan, &stores, &env(Some(true))), None);
        assert_eq!(missing_file_driver(&plan, &stores, &env(None)), None);
        // Without a share, a missing file driver does not matter.
        let blob_only = plan_of(&reference("--in", "blob-ds", "download"));
        assert_eq!(
            missing_file_driver(&blob_only, &stores, &env(Some(false))),
            None
        );
    }

    #[test]
    fn the_upload_rebuild_leaves_the_mounts_out() {
        let stores = datastores();
        let params =
            reference("--in", "blob-ds", "mount") + &reference("--out", "blob-ds", "upload");
        let plan = plan_of(&params);
        let exp = experiment(&params);
        // The run used the sidecar; the operator has since lost its blobfuse2 image, so building
        // the mount again fails...
        let ctx = render::BuildContext::default();
        let sidecar = MountChoice {
            driver: MountDriver::Sidecar,
            reason: "requested by the reference (mountDriver: sidecar)".into(),
        };
        let now = chrono::Utc::now();
        assert!(render::build(&exp, &plan, &stores, &ctx, &[sidecar], &[], now).is_err());
        // ...but the upload needs none of it.
        let upload = upload(&exp, plan, &stores, &ctx, now).unwrap();
        let names: Vec<_> = upload
            .secrets
            .iter()
            .map(|s| s.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(
            names,
            ["train-credentials"],
            "the credentials, and no mount's Secret"
        );
    }

    #[test]
    fn the_secrets_a_job_reads_are_found_in_volumes_and_environment() {
        let job: Job = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "train-upload"},
            "spec": {"template": {"spec": {
                "restartPolicy": "Never",
                "volumes": [
                    {"name": "credentials", "secret": {"secretName": "train-credentials"}},
                    {"name": "share", "csi": {
                        "driver": "file.csi.azure.com",
                        "volumeAttributes": {"shareName": "datasets", "secretName": "train-share-0"},
                    }},
                    {"name": "other", "csi": {
                        "driver": "example.csi.k8s.io",
                        "nodePublishSecretRef": {"name": "node-publish"},
                    }},
                    {"name": "projected", "projected": {"sources": [{"secret": {"name": "p"}}]}},
                    {"name": "scratch", "emptyDir": {}},
                ],
                "initContainers": [{"name": "i", "envFrom": [{"secretRef": {"name": "from"}}]}],
                "containers": [{"name": "c", "env": [
                    {"name": "A", "valueFrom": {"secretKeyRef": {"name": "env", "key": "k"}}},
                    {"name": "B", "value": "plain"},
                ]}],
            }}},
        }))
        .unwrap();
        assert_eq!(
            referenced_secrets(&job),
            [
                "env",
                "from",
                "node-publish",
                "p",
                "train-credentials",
                "train-share-0"
            ]
            .map(String::from)
            .into()
        );
    }
}
