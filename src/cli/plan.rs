//! `datastore plan experiment.yaml`: print, as multi-document YAML, the objects the controller
//! would create for an Experiment, from the same planner and builders.

use std::path::PathBuf;

use chrono::Utc;
use clap::Args;
use kube::ResourceExt;

use super::experiment_file::{ExperimentFile, resolve_datastores};
use crate::error::{Error, Result};
use crate::plan::{self, CLUSTER};
use crate::render::{self, MountEnvironment, to_yaml};
use crate::store::resolve::{Scope, Source};

/// The uid the owner references carry when the Experiment file has none (it has none until the
/// apiserver creates it).
pub const PLACEHOLDER_UID: &str = "00000000-0000-0000-0000-000000000000";

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// The Experiment's YAML file.
    pub experiment: PathBuf,
    /// A YAML file of Datastore/ClusterDatastore and Secret objects [default: $DATASTORE_CONFIG,
    /// else the cluster of the current kubeconfig].
    #[arg(long)]
    pub datastores: Option<PathBuf>,
    /// The namespace the Experiment is in [default: the file's, else `default`].
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// Render as for a cluster that has the node cache (the CSIDriver cache.datastore.dev):
    /// downloads that ask for it become its volumes. Without it nothing is known of the cluster,
    /// and they are rendered as downloads into the pod.
    #[arg(long)]
    pub node_cache: bool,
    #[command(flatten)]
    pub operator: crate::controller::OperatorArgs,
}

/// Runs `datastore plan`; returns the exit code.
pub async fn run(args: PlanArgs) -> i32 {
    match render(&args).await {
        Ok(yaml) => {
            print!("{yaml}");
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

/// The objects as multi-document YAML.
pub async fn render(args: &PlanArgs) -> Result<String> {
    let file = ExperimentFile::read(&args.experiment, args.namespace.as_deref(), "default")?;
    let mut exp = file.exp;
    if exp.metadata.uid.is_none() {
        exp.metadata.uid = Some(PLACEHOLDER_UID.to_string());
    }
    let scope = Scope {
        namespace: exp.namespace().unwrap_or_default(),
        operator_namespace: args.operator.operator_namespace.name.clone(),
    };
    let source = Source::pick(args.datastores.clone());
    let (datastores, cache_downloads) = resolve_datastores(&exp.spec, &source, &scope).await?;

    let plan = plan::plan(&exp.spec, &crate::store::capabilities(&datastores), CLUSTER)
        .map_err(|e| Error::Config(format!("{}: {e}", args.experiment.display())))?;
    let ctx = args.operator.build_context();
    // Offline, nothing is known about the cluster's CSI drivers or Pod Security labels, but
    // what the flag says.
    let env = MountEnvironment {
        namespace: scope.namespace.clone(),
        node_cache: args.node_cache.then_some(true),
        ..Default::default()
    };
    let mounts = render::choose_drivers(&plan, &datastores, &ctx, &env)
        .map_err(|refusal| Error::Config(refusal.to_string()))?;
    let caches = render::choose_caches(&plan, &datastores, &cache_downloads, &ctx, &env);
    let children = render::build(&exp, &plan, &datastores, &ctx, &mounts, &caches, Utc::now())?;

    let mut docs = Vec::new();
    docs.extend(children.credentials.as_ref().map(to_yaml));
    docs.extend(children.volume_secrets.iter().map(to_yaml));
    docs.extend(children.outputs.as_ref().map(to_yaml));
    docs.push(to_yaml(&children.run));
    docs.extend(children.upload.as_ref().map(to_yaml));
    Ok(docs.join("---\n"))
}
