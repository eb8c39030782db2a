//! Applying, the writes besides the status: the run's and the upload's objects by server-side
//! apply, suspending a Job, removing finished pods and the outputs claim. A write the apiserver
//! refuses for a reason only the cluster or the spec can fix is a [`Refusal`]; other failures
//! are errors (retried).

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Resource, ResourceExt};

use super::Stop;
use super::admit::{self, LiftedBy, Refusal};
use crate::api::Experiment;
use crate::controller::{Context, ReconcileError};
use crate::reason::Reason;
use crate::render::{self, Children, MANAGER};

/// Applies the run's objects, Secrets first and the Job last. When the apiserver refuses one,
/// what this start applied before it is deleted again, so that the next start begins from
/// nothing (an unbound claim is immutable: a later apply with another size or class would get
/// 422), and the refusal is returned.
pub async fn run(exp: &Experiment, ctx: &Context, children: &Children) -> Result<(), Stop> {
    let ns = exp.namespace().unwrap_or_default();
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), &ns);
    let pvcs = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &ns);
    let mut applied_secrets = Vec::new();
    let mut applied_pvc = None;
    let failed = 'apply: {
        for secret in children.credentials.iter().chain(&children.volume_secrets) {
            if let Err(e) = apply(&secrets, secret).await {
                break 'apply e;
            }
            applied_secrets.push(secret.name_any());
        }
        if let Some(pvc) = &children.outputs {
            if let Err(e) = apply(&pvcs, pvc).await {
                break 'apply e;
            }
            applied_pvc = Some(pvc.name_any());
        }
        match apply(
            &Api::<Job>::namespaced(ctx.client.clone(), &ns),
            &children.run,
        )
        .await
        {
            Ok(_) => return Ok(()),
            Err(e) => e,
        }
    };
    let refusal = refused(failed, "the run's objects")?;
    for name in &applied_secrets {
        delete_if_present(&secrets, name).await?;
    }
    if let Some(name) = &applied_pvc {
        delete_if_present(&pvcs, name).await?;
    }
    Err(Stop::Refused(refusal))
}

/// Applies the upload's Secrets and Job.
pub async fn upload(exp: &Experiment, ctx: &Context, upload: &admit::Upload) -> Result<(), Stop> {
    let ns = exp.namespace().unwrap_or_default();
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), &ns);
    let applied = 'apply: {
        for secret in &upload.secrets {
            if let Err(e) = apply(&secrets, secret).await {
                break 'apply Err(e);
            }
        }
        apply(
            &Api::<Job>::namespaced(ctx.client.clone(), &ns),
            &upload.job,
        )
        .await
    };
    match applied {
        Ok(_) => Ok(()),
        Err(e) => Err(Stop::Refused(refused(e, "the upload Job")?)),
    }
}

/// What the apiserver refusing to apply `what` means. 403 is the cluster's to fix (a
/// ResourceQuota or LimitRange, the operator's RBAC), never the spec's alone: `QuotaExceeded` or
/// `Forbidden`, tried again with backoff. 400 and 422 (the object is invalid) are the spec's:
/// `InvalidJob`. Other failures are errors, retried.
fn refused(e: kube::Error, what: &str) -> Result<Refusal, ReconcileError> {
    match e {
        kube::Error::Api(status) if status.code == 403 => {
            let reason = if status.message.contains("exceeded quota") {
                Reason::QuotaExceeded
            } else {
                Reason::Forbidden
            };
            // The apiserver gives no reason when an apply is refused the `create` it needs
            // (`<resource> "<name>" is forbidden: `, nothing after): say what it means.
            let message = if status.message.trim_end().ends_with("forbidden:") {
                format!(
                    "{} (no reason given: an apply that creates an object is authorized as create, so the operator's ClusterRole needs create on it besides patch)",
                    status.message.trim_end()
                )
            } else {
                status.message
            };
            Ok(Refusal::new(
                reason,
                format!(
                    "the cluster refused {what}: {message}; tried again with backoff until an admin raises the quota or grants the permission"
                ),
                LiftedBy::Apiserver,
            ))
        }
        kube::Error::Api(status) if matches!(status.code, 400 | 422) => Ok(Refusal::new(
            Reason::InvalidJob,
            format!(
                "the cluster refused {what}: {}; fix the spec and it is tried again",
                status.message
            ),
            LiftedBy::Spec,
        )),
        other => Err(ReconcileError::Kube(other)),
    }
}

/// Suspends the Job `name`: the Job controller deletes its pods and creates none.
pub async fn suspend(exp: &Experiment, ctx: &Context, name: &str) -> Result<(), ReconcileError> {
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &exp.namespace().unwrap_or_default());
    let patch = serde_json::json!({"spec": {"suspend": true}});
    jobs.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Deletes the finished pods `pods`, then the outputs claim (a claim stays, Terminating and its
/// disk billed, while any pod that names it exists, whatever its phase).
pub async fn remove_outputs(
    exp: &Experiment,
    ctx: &Context,
    pods: &[String],
) -> Result<(), ReconcileError> {
    let ns = exp.namespace().unwrap_or_default();
    let pod_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    for pod in pods {
        delete_if_present(&pod_api, pod).await?;
    }
    delete_outputs(exp, ctx).await
}

/// Deletes the outputs claim.
pub async fn delete_outputs(exp: &Experiment, ctx: &Context) -> Result<(), ReconcileError> {
    let pvcs: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &exp.namespace().unwrap_or_default());
    delete_if_present(&pvcs, &render::outputs_name(exp)).await?;
    Ok(())
}

/// Deletes `name`; one already gone is fine.
async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<(), kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Server-side apply as the operator, taking over fields another manager set.
async fn apply<K>(api: &Api<K>, object: &K) -> Result<K, kube::Error>
where
    K: Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let name = object.meta().name.clone().expect("built objects are named");
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
}
