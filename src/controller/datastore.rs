//! Reconciling Datastores and ClusterDatastores: check that the storage answers with the given
//! credentials (a listing of at most one blob) and say so in the `Ready` condition. Rechecked on
//! a fixed, bounded period; a failing datastore is never retried in a tight loop.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};

use super::{Context, ReconcileError};
use crate::api::{ClusterDatastore, Datastore, DatastoreStatus};
use crate::error::Error;
use crate::reason::Reason;
use crate::store::resolve::{self, Found, Scope};
use crate::store::{Backend, Store, StoreConfig};

/// The condition type.
pub const READY: &str = "Ready";
/// How often a ready datastore is checked again.
pub const READY_RECHECK: Duration = Duration::from_secs(300);
/// How often a datastore that is not ready is checked again.
pub const NOT_READY_RECHECK: Duration = Duration::from_secs(60);

pub async fn reconcile_datastore(
    ds: Arc<Datastore>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let ns = ds.namespace().unwrap_or_default();
    let ready = check(&Found::Namespaced((*ds).clone()), &ns, &ctx).await?;
    let api: Api<Datastore> = Api::namespaced(ctx.client.clone(), &ns);
    write_status(&api, &*ds, ds.status.as_ref(), ready, &ctx).await
}

pub async fn reconcile_cluster_datastore(
    ds: Arc<ClusterDatastore>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let ready = check(&Found::Cluster((*ds).clone()), "", &ctx).await?;
    let api: Api<ClusterDatastore> = Api::all(ctx.client.clone());
    write_status(&api, &*ds, ds.status.as_ref(), ready, &ctx).await
}

/// The outcome of one check: the `Ready` condition's status, reason and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub ready: bool,
    pub reason: Reason,
    pub message: String,
}

impl Check {
    fn not_ready(reason: Reason, message: impl Into<String>) -> Check {
        Check {
            ready: false,
            reason,
            message: message.into(),
        }
    }
}

/// Resolves the datastore's credentials and lists at most one blob with them.
async fn check(found: &Found, namespace: &str, ctx: &Context) -> Result<Check, ReconcileError> {
    let scope = Scope {
        namespace: namespace.to_string(),
        operator_namespace: ctx.operator_namespace.clone(),
    };
    let config = match resolve::resolve_found(ctx.client.clone(), found, &scope).await {
        Ok(resolved) => resolved.config,
        Err(Error::Config(message)) => return Ok(Check::not_ready(Reason::InvalidConfig, message)),
        Err(e) => return Err(ReconcileError::Resolve(e)),
    };
    match config {
        StoreConfig::Local { .. } => {
            return Ok(Check::not_ready(
                Reason::LocalOnly,
                "a local directory is only usable by the datastore CLI, not by experiments in the cluster",
            ));
        }
        // The operator speaks neither SMB nor the Files REST API; the CSI driver on the node
        // mounts the share, so a wrong key shows when a pod mounts it.
        StoreConfig::AzureFile(_) => {
            return Ok(Check {
                ready: true,
                reason: Reason::CredentialsResolved,
                message: "the share's credentials resolved; the share itself is reached by the file.csi.azure.com driver when a pod mounts it".to_string(),
            });
        }
        StoreConfig::AzureBlob(_) => {}
    }
    let store = match Store::new(&config, &ctx.check_tuning) {
        Ok(store) => store,
        Err(e) => return Ok(Check::not_ready(Reason::InvalidConfig, e.to_string())),
    };
    Ok(match store.check().await {
        Ok(()) => Check {
            ready: true,
            reason: Reason::Reachable,
            message: "the container answered a listing with these credentials".to_string(),
        },
        Err(e) => Check::not_ready(check_reason(&e), e.to_string()),
    })
}

/// The `Ready` reason for a failed check.
pub fn check_reason(e: &Error) -> Reason {
    match e {
        Error::NotFound(_) => Reason::ContainerNotFound,
        other => other.reason(),
    }
}

/// The `Ready` condition after `check`, keeping its transition time while its status holds.
pub fn ready_condition(
    current: Option<&DatastoreStatus>,
    generation: Option<i64>,
    check: &Check,
    now: Time,
) -> Condition {
    let status = if check.ready { "True" } else { "False" };
    let last_transition_time = current
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == READY))
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(now);
    Condition {
        type_: READY.to_string(),
        status: status.to_string(),
        reason: check.reason.to_string(),
        message: check.message.clone(),
        observed_generation: generation,
        last_transition_time,
    }
}

async fn write_status<K>(
    api: &Api<K>,
    ds: &K,
    current: Option<&DatastoreStatus>,
    check: Check,
    ctx: &Context,
) -> Result<Action, ReconcileError>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let generation = ds.meta().generation;
    let next = DatastoreStatus {
        conditions: vec![ready_condition(
            current,
            generation,
            &check,
            Time(ctx.now_k8s()),
        )],
        observed_generation: generation,
    };
    if current != Some(&next) {
        super::apply_status(api, &ds.name_any(), &next).await?;
    }
    Ok(Action::requeue(if check.ready {
        READY_RECHECK
    } else {
        NOT_READY_RECHECK
    }))
}
