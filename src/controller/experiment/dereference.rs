//! Dereferencing, the reads before admission: the experiment's datastores with their
//! credentials, its namespace's labels, and the CSIDrivers its plan needs. A datastore that is
//! missing, not allowed here or unusable is a [`Refusal`]; apiserver failures are errors
//! (retried).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::storage::v1::CSIDriver;
use kube::ResourceExt;
use kube::api::Api;
use kube::core::{Selector, SelectorExt};

use super::Stop;
use super::admit::{LiftedBy, Refusal};
use crate::api::Experiment;
use crate::controller::{Context, ReconcileError};
use crate::error::Error;
use crate::plan::ExecutionPlan;
use crate::plan::contract::NODE_CACHE_DRIVER;
use crate::reason::Reason;
use crate::render::{self, MountEnvironment, cached};
use crate::store::StoreConfig;
use crate::store::resolve::{self, Found, Scope};

/// What dereferencing read: the datastores by name, and the namespace's labels if a
/// ClusterDatastore's selector needed them (read once per pass).
#[derive(Debug, Default)]
pub struct World {
    pub datastores: BTreeMap<String, StoreConfig>,
    /// The datastores whose `cacheDownloads` is set.
    pub cache_downloads: BTreeSet<String>,
    pub namespace_labels: Option<BTreeMap<String, String>>,
}

/// Every datastore the experiment references, resolved with its credentials.
pub async fn datastores(exp: &Experiment, ctx: &Context) -> Result<World, Stop> {
    let ns = exp.namespace().unwrap_or_default();
    let scope = Scope {
        namespace: ns.clone(),
        operator_namespace: ctx.operator_namespace.clone(),
    };
    let waits =
        |reason, message: String| Stop::Refused(Refusal::new(reason, message, LiftedBy::Cluster));
    let mut world = World::default();
    for (user, name) in exp.spec.datastore_uses() {
        let Some(found) = resolve::lookup(ctx.client.clone(), name, &ns).await? else {
            return Err(waits(
                Reason::DatastoreNotFound,
                format!(
                    "{user} refers to datastore {name}, which is neither a Datastore in namespace {ns} nor a ClusterDatastore; create it and the experiment starts"
                ),
            ));
        };
        if let Found::Cluster(cds) = &found
            && let Some(selector) = &cds.spec.allowed_namespaces
        {
            let labels = namespace_labels(&mut world, ctx, &ns).await?;
            let allowed = match Selector::try_from(selector.clone()) {
                Ok(selector) => selector.matches(labels),
                Err(e) => {
                    return Err(waits(
                        Reason::DatastoreInvalid,
                        format!(
                            "ClusterDatastore {name} has an invalid allowedNamespaces selector ({e}); ask its owners to fix it"
                        ),
                    ));
                }
            };
            if !allowed {
                return Err(waits(
                    Reason::DatastoreNotAllowed,
                    format!(
                        "{user} refers to ClusterDatastore {name}, whose allowedNamespaces does not select namespace {ns}; ask its owners to allow this namespace, or use another datastore"
                    ),
                ));
            }
        }
        let secret = resolve::read_secret(ctx.client.clone(), &found, &scope).await?;
        match resolve::resolved(&found, &scope, secret.as_ref()) {
            Ok(r) => {
                if r.cache_downloads {
                    world.cache_downloads.insert(name.to_string());
                }
                world.datastores.insert(name.to_string(), r.config);
            }
            Err(Error::Config(message)) => return Err(waits(Reason::DatastoreInvalid, message)),
            Err(e) => return Err(ReconcileError::Resolve(e).into()),
        }
    }
    Ok(world)
}

/// The namespace's labels, read once.
async fn namespace_labels<'w>(
    world: &'w mut World,
    ctx: &Context,
    namespace: &str,
) -> Result<&'w BTreeMap<String, String>, ReconcileError> {
    if world.namespace_labels.is_none() {
        let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
        world.namespace_labels = Some(namespaces.get(namespace).await?.labels().clone());
    }
    Ok(world.namespace_labels.as_ref().expect("just read"))
}

/// What decides how the plan's mounts are mounted and which downloads the node cache serves:
/// whether the CSIDrivers they need exist, and the namespace's Pod Security level. Nothing is
/// asked without mounts (nor for the file driver without Azure Files datastores, nor for the
/// node cache's driver without a download asking for it). A CSIDriver the controller may not
/// read is "not known" (with a warning): the choice then says it was not checked.
pub async fn mount_environment(
    exp: &Experiment,
    ctx: &Context,
    plan: &ExecutionPlan,
    world: &mut World,
) -> Result<MountEnvironment, ReconcileError> {
    let namespace = exp.namespace().unwrap_or_default();
    let mut env = MountEnvironment {
        namespace: namespace.clone(),
        ..MountEnvironment::default()
    };
    let (blob, file) = drivers_needed(plan, &world.datastores);
    if blob {
        env.blob_csi = csi_driver_exists(exp, ctx, render::BLOB_CSI_DRIVER).await?;
    }
    if file {
        env.file_csi = csi_driver_exists(exp, ctx, render::FILE_CSI_DRIVER).await?;
    }
    let cache_asked = plan.downloads.iter().any(|d| {
        cached::asks_for_cache(d, world.cache_downloads.contains(&d.datastore), &ctx.build)
    });
    if cache_asked {
        env.node_cache = csi_driver_exists(exp, ctx, NODE_CACHE_DRIVER).await?;
    }
    if plan.mounts.is_empty() {
        return Ok(env);
    }
    let labels = namespace_labels(world, ctx, &namespace).await?;
    env.pod_security_enforce = labels.get(render::POD_SECURITY_ENFORCE_LABEL).cloned();
    Ok(env)
}

/// Which CSIDrivers the plan needs to know about: `blob.csi.azure.com` for mounts of Azure Blob
/// containers, `file.csi.azure.com` for any use of an Azure Files share (mounts, and the agent
/// containers of downloads and uploads, which reach a share through the same inline volume).
fn drivers_needed(
    plan: &ExecutionPlan,
    datastores: &BTreeMap<String, StoreConfig>,
) -> (bool, bool) {
    let kind = |name: &str| datastores.get(name);
    let blob = plan
        .mounts
        .iter()
        .any(|m| matches!(kind(&m.datastore), Some(StoreConfig::AzureBlob(_))));
    let file = plan
        .mounts
        .iter()
        .map(|m| &m.datastore)
        .chain(plan.code.iter().map(|t| &t.datastore))
        .chain(plan.downloads.iter().map(|t| &t.datastore))
        .chain(plan.uploads.iter().map(|t| &t.datastore))
        .any(|name| matches!(kind(name), Some(StoreConfig::AzureFile(_))));
    (blob, file)
}

/// Whether the cluster has the CSIDriver `name`: `None` when the controller may not read it (its
/// RBAC was trimmed), with a warning in the log. Other failures are retried: the choice made from
/// the answer is final, so it is not made on a guess a retry would have avoided.
async fn csi_driver_exists(
    exp: &Experiment,
    ctx: &Context,
    name: &str,
) -> Result<Option<bool>, ReconcileError> {
    let drivers: Api<CSIDriver> = Api::all(ctx.client.clone());
    match drivers.get_opt(name).await {
        Ok(found) => Ok(Some(found.is_some())),
        Err(kube::Error::Api(status)) if status.code == 403 => {
            tracing::warn!(
                experiment = %exp.name_any(),
                "cannot read CSIDriver {name} ({}): the controller's ClusterRole needs get on csidrivers (storage.k8s.io); mounts and cached downloads are decided without knowing whether the cluster has it",
                status.message
            );
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::experiment::fixtures::{datastores, plan_of, reference};

    #[test]
    fn only_the_drivers_the_plan_needs_are_looked_up() {
        let stores = datastores();
        let needed = |params: &str| drivers_needed(&plan_of(params), &stores);
        assert_eq!(
            needed(&reference("--in", "blob-ds", "download")),
            (false, false),
            "downloads of a container need no CSI driver"
        );
        assert_eq!(
            needed(&reference("--in", "blob-ds", "mount")),
            (true, false)
        );
        assert_eq!(
            needed(&reference("--in", "share-ds", "mount")),
            (false, true)
        );
        // The agent containers reach a share through file.csi.azure.com too.
        assert_eq!(
            needed(&reference("--out", "share-ds", "upload")),
            (false, true)
        );
        assert_eq!(
            needed(
                &(reference("--in", "blob-ds", "mount")
                    + &reference("--d", "share-ds", "download"))
            ),
            (true, true)
        );
    }
}
