//! `datastore run experiment.yaml`: run an Experiment on this machine (the local compute
//! target), from the same plan the controller uses.

use std::path::PathBuf;

use clap::Args;

use super::experiment_file::{ExperimentFile, resolve_datastores};
use crate::api::ComputeTarget;
use crate::error::{Error, Result};
use crate::local::{self, LocalRun};
use crate::store::resolve::{OperatorNamespace, Scope, Source};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The Experiment's YAML file. A relative sourceDirectory is resolved against its folder.
    pub experiment: PathBuf,
    /// A YAML file of Datastore/ClusterDatastore and Secret objects [default: $DATASTORE_CONFIG,
    /// else the cluster of the current kubeconfig].
    #[arg(long)]
    pub datastores: Option<PathBuf>,
    /// Run it here even though its computeTarget is cluster.
    #[arg(long)]
    pub local: bool,
    /// Where the downloaded data and the outputs go; it must be new or empty [default: a new
    /// temporary directory, removed once every output reached its datastore].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// The namespace of the Experiment's Datastores [default: the file's, else `default`].
    #[arg(short, long)]
    pub namespace: Option<String>,
    #[command(flatten)]
    pub operator_namespace: OperatorNamespace,
    /// Requests in flight at most, per transfer.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=512))]
    pub concurrency: u16,
    #[command(flatten)]
    pub progress: super::ProgressFlags,
    #[command(flatten)]
    pub retry: crate::store::retry::RetryBudget,
    /// Serve download references from a cache of downloaded folders: a folder whose listing
    /// (names, sizes, MD5s) has not changed since an earlier run is not downloaded again, and
    /// the script reads it from the cache, read-only. A reference's `cache` (or its datastore's
    /// `cacheDownloads`) decides for itself.
    #[arg(long)]
    pub cache: bool,
    /// Where the cache is (implies --cache) [default: $XDG_CACHE_HOME/datastore, else
    /// ~/.cache/datastore].
    #[arg(long, env = "DATASTORE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// How much the cache keeps of folders no run uses, least recently used out first.
    #[arg(long, default_value = "20Gi", value_parser = cache_size)]
    pub cache_size: u64,
}

/// `--cache-size`: a quantity of bytes (`20Gi`, `500Mi`).
fn cache_size(value: &str) -> std::result::Result<u64, String> {
    crate::quantity::bytes(value).ok_or_else(|| {
        format!("`{value}` is not a size: write a whole number with a suffix such as 500Mi or 20Gi")
    })
}

fn cache_dir_given(args: &RunArgs) -> bool {
    args.cache_dir
        .as_ref()
        .is_some_and(|d| !d.as_os_str().is_empty())
}

/// Where the cache is, when asked for: by the flags, or (`wanted`) by a reference or datastore.
fn cache_dir(args: &RunArgs, wanted: bool) -> Result<Option<PathBuf>> {
    if let Some(dir) = args.cache_dir.clone().filter(|d| !d.as_os_str().is_empty()) {
        return Ok(Some(dir));
    }
    if !args.cache && !wanted {
        return Ok(None);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .ok_or_else(|| {
            Error::Config(
                "--cache needs a place: set --cache-dir (neither XDG_CACHE_HOME nor HOME is set)"
                    .into(),
            )
        })?;
    Ok(Some(base.join("datastore")))
}

/// Runs `datastore run`; returns the script's exit code, or the error's when it did not run or
/// an upload failed.
pub async fn run(args: RunArgs) -> i32 {
    let run = match setup(&args).await {
        Ok(run) => run,
        Err(e) => {
            eprintln!("error: {e}");
            return e.exit_code();
        }
    };
    let prepared = match local::prepare(&run) {
        Ok(prepared) => prepared,
        Err(e) => {
            eprintln!("error: {}: {e}", args.experiment.display());
            return e.exit_code();
        }
    };
    match local::execute(&run, prepared).await {
        Ok(finished) => finished.exit_code(),
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

async fn setup(args: &RunArgs) -> Result<LocalRun> {
    let file = ExperimentFile::read(&args.experiment, args.namespace.as_deref(), "default")?;
    if file.exp.spec.compute_target == ComputeTarget::Cluster && !args.local {
        return Err(Error::Config(format!(
            "{} runs on the cluster (computeTarget: cluster); submit it with `datastore submit {}`, or run it here with --local",
            file.path.display(),
            file.path.display()
        )));
    }
    let scope = Scope {
        namespace: file.namespace(),
        operator_namespace: args.operator_namespace.name.clone(),
    };
    let source = Source::pick(args.datastores.clone());
    let (datastores, cache_downloads) = resolve_datastores(&file.exp.spec, &source, &scope).await?;
    let asked = file.exp.spec.script_params.iter().any(|p| {
        p.data_reference
            .as_ref()
            .is_some_and(|r| r.cache == Some(true))
    });
    let cache_all = args.cache || cache_dir_given(args);
    Ok(LocalRun {
        exp: file.exp,
        base_dir: file.dir,
        datastores,
        work_dir: args.work_dir.clone(),
        concurrency: args.concurrency as usize,
        retry_budget: args.retry.retry_budget,
        show_progress: args.progress.show(),
        cache: cache_dir(args, asked || !cache_downloads.is_empty())?
            .map(|dir| crate::cache::Cache::open(&dir, args.cache_size))
            .transpose()?,
        cache_all,
        cache_downloads,
    })
}
