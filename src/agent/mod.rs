//! In-pod commands, run by the containers the controller generates:
//!
//! - `datastore agent download` (init container): the contents of a datastore folder land in a
//!   local directory, and a report of exactly which data the run saw goes to the container's
//!   termination message, where the controller reads it into the Experiment's status;
//! - `datastore agent upload` (upload Job): the contents of a local directory land under a
//!   datastore folder; if that fails, the error goes to the termination message, where the
//!   controller reads why.
//!
//! While they transfer, both write a progress line (`{"progress": ...}`) on stdout every two
//! seconds, which the controller reads from the container's log into the Experiment's status;
//! then the CLI's JSON summary as one line. Logs are JSON lines on stderr.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Subcommand};

use crate::error::Error;
use crate::plan::contract::{REPORT_LIMIT, Report, UploadReport, truncate};
use crate::store::Store;
use crate::store::azure::Tuning;
use crate::store::resolve::{OperatorNamespace, Scope, Source};
use crate::store::retry::RetryBudget;
use crate::transfer::{self, Failed, Lines, Options};

/// How often a running agent writes a progress line (`{"progress": ...}`) on stdout: the
/// controller reads the newest from the container's log.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Args, Debug)]
pub struct AgentArgs {
    #[command(subcommand)]
    pub command: AgentCommand,
}

#[derive(Subcommand, Debug)]
pub enum AgentCommand {
    /// Download the contents of a datastore folder into a directory (never overwrites).
    Download(DownloadArgs),
    /// Upload the contents of a directory under a datastore folder.
    Upload(UploadArgs),
}

#[derive(Args, Debug)]
pub struct DownloadArgs {
    #[command(flatten)]
    pub datastore: DatastoreArgs,
    /// The datastore folder whose contents are downloaded (`""` or `/`: the whole container).
    #[arg(long)]
    pub path: String,
    /// The local directory the folder's contents land in (`<target>/<name relative to path>`).
    #[arg(long)]
    pub target: PathBuf,
    /// Where the JSON report (files, bytes, digest) or the error goes, e.g. /dev/termination-log.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// The whole volume the target is on (the run's staging volume): a folder that lists more
    /// than is left of it (its free space, and `--staging-size` less what is already there) is
    /// refused before anything is downloaded.
    #[arg(long)]
    pub staging_dir: Option<PathBuf>,
    /// The most the staging volume may hold (a quantity such as 10Gi: its emptyDir sizeLimit).
    #[arg(long, requires = "staging_dir", value_parser = staging_size)]
    pub staging_size: Option<u64>,
    /// The target is the node cache's tree of the folder (the read-only volume of the CSI
    /// driver cache.datastore.dev): check it against the folder's listing instead of
    /// downloading, and report when the node cached it.
    #[arg(long, conflicts_with = "staging_dir")]
    pub cached: bool,
}

fn staging_size(text: &str) -> Result<u64, String> {
    crate::quantity::bytes(text)
        .ok_or_else(|| format!("`{text}` is not a quantity of bytes such as 10Gi or 500G"))
}

/// What a download may write on the staging volume at `dir`: what `size` leaves after what
/// is there already, and no more than its file system has free.
pub fn staging_room(dir: &Path, size: Option<u64>) -> Result<transfer::Room, Error> {
    let used = crate::store::local::tree_bytes(dir)?;
    let free = free_bytes(dir).map_err(|e| Error::local("measure the free space of", dir, e))?;
    let human = |b: u64| indicatif::HumanBytes(b).to_string();
    let (bytes, detail) = match size {
        Some(size) if size.saturating_sub(used) <= free => (
            size.saturating_sub(used),
            format!(
                "the staging volume holds {} (spec.staging.size), {} of it used by earlier downloads",
                human(size),
                human(used)
            ),
        ),
        _ => (
            free,
            format!("the staging volume's file system has {} free", human(free)),
        ),
    };
    Ok(transfer::Room {
        bytes,
        detail,
        remedy: "raise spec.staging.size, or stage on a larger volume (spec.staging.storageClassName or claimName)".to_string(),
    })
}

/// Bytes free for an unprivileged user on the file system holding `dir`.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statvfs the call fills.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
}

#[derive(Args, Debug)]
pub struct UploadArgs {
    #[command(flatten)]
    pub datastore: DatastoreArgs,
    /// The local directory whose contents are uploaded (recursively).
    #[arg(long)]
    pub src_dir: PathBuf,
    /// The datastore folder the files land under (`""` or `/`: the container root).
    #[arg(long)]
    pub path: String,
    /// Replace blobs that exist; without it they are skipped and counted.
    #[arg(long)]
    pub overwrite: bool,
    /// Where the error goes when the upload fails, e.g. /dev/termination-log.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct DatastoreArgs {
    /// A YAML file of Datastore/ClusterDatastore and Secret objects.
    #[arg(long)]
    pub datastores: PathBuf,
    /// The datastore's name.
    #[arg(long)]
    pub datastore: String,
    /// Requests in flight at most, across all files.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=512))]
    pub concurrency: u16,
    /// Namespace objects of the datastores file without one are taken to be in.
    #[arg(
        long,
        env = "DATASTORE_NAMESPACE",
        default_value = "default",
        hide = true
    )]
    pub namespace: String,
    #[command(flatten)]
    pub operator_namespace: OperatorNamespace,
    #[command(flatten)]
    pub retry: RetryBudget,
}

impl DatastoreArgs {
    fn tuning(&self) -> Tuning {
        Tuning::transfer(self.concurrency as usize, self.retry.retry_budget)
    }

    /// The store, and progress lines that also say while it is unreachable.
    async fn store(&self) -> Result<(Store, Arc<Lines>), Error> {
        let scope = Scope {
            namespace: self.namespace.clone(),
            operator_namespace: self.operator_namespace.name.clone(),
        };
        let source = Source::File(self.datastores.clone());
        let tuning = self.tuning();
        let store = Store::open(&self.datastore, &source, &scope, &tuning).await?;
        Ok((
            store,
            Arc::new(Lines::stdout(PROGRESS_EVERY, Some(tuning.outage))),
        ))
    }

    fn options(&self, overwrite: bool) -> Options {
        Options {
            concurrency: self.concurrency as usize,
            overwrite,
            contain_symlinks: true,
            ..Options::default()
        }
    }
}

fn write_report(path: &Path, text: &str) -> Result<(), Error> {
    std::fs::write(path, truncate(text, REPORT_LIMIT))
        .map_err(|e| Error::local("write the report to", path, e))
}

/// Runs an agent command; returns the process exit code.
pub async fn run(args: AgentArgs) -> i32 {
    match args.command {
        AgentCommand::Download(args) => download(args).await,
        AgentCommand::Upload(args) => upload(args).await,
    }
}

async fn download(args: DownloadArgs) -> i32 {
    if args.cached {
        return check_cached(args).await;
    }
    let work = async {
        let (store, lines) = args.datastore.store().await?;
        let mut options = args.datastore.options(false);
        if let Some(dir) = &args.staging_dir {
            options.room = Some(staging_room(dir, args.staging_size)?);
        }
        transfer::download_folder(&store, &args.path, &args.target, options, lines).await
    };
    let result = match interruptible(work).await {
        Err(Interrupted(signal)) => {
            let msg = format!(
                "interrupted by signal {signal}: no partial file was left under its final name; run again to finish"
            );
            tracing::warn!("{msg}");
            if let Some(path) = &args.report
                && let Err(e) = write_report(path, &msg)
            {
                tracing::error!(error = %e, "the interruption could not be reported");
            }
            return crate::exit::signaled(signal);
        }
        Ok(Ok((summary, listing))) => {
            let report = Report::of(&listing.blobs);
            let text = serde_json::to_string(&report).expect("a report serializes");
            tracing::info!(files = report.files, bytes = report.bytes, digest = %report.digest, "downloaded");
            match &args.report {
                Some(path) => {
                    write_report(path, &text)
                        .map(|()| summary.clone())
                        .map_err(|error| Failed {
                            summary,
                            error,
                            reported: false,
                        })
                }
                None => Ok(summary),
            }
        }
        Ok(Err(failed)) => {
            if let Some(path) = &args.report
                && let Err(e) = write_report(path, &failed.error.to_string())
            {
                tracing::error!(error = %e, "the error could not be reported");
            }
            Err(failed)
        }
    };
    crate::transfer::report(crate::transfer::Output::Json, result)
}

/// `download --cached`: the report of the node cache's tree, checked against the listing. It
/// reads no file (a hit stays as fast as a listing); the node plugin verified the download.
async fn check_cached(args: DownloadArgs) -> i32 {
    let checked = async {
        let (store, _) = args.datastore.store().await?;
        crate::cache::check_tree(&store, &args.path, &args.target).await
    };
    let (text, code) = match checked.await {
        Ok((listing, published)) => {
            let mut report = Report::of(&listing);
            report.cached_at = Some(
                k8s_openapi::jiff::Timestamp::try_from(published)
                    .map(|t| t.to_string())
                    .unwrap_or_default(),
            );
            tracing::info!(files = report.files, bytes = report.bytes, digest = %report.digest, cached_at = ?report.cached_at, "checked the node cache's tree");
            let text = serde_json::to_string(&report).expect("a report serializes");
            println!("{text}");
            (text, 0)
        }
        Err(e) => {
            tracing::error!(error = %e, "the node cache's tree does not match the folder");
            (e.to_string(), e.exit_code())
        }
    };
    if let Some(path) = &args.report
        && let Err(e) = write_report(path, &text)
    {
        tracing::error!(error = %e, "the outcome could not be reported");
    }
    code
}

async fn upload(args: UploadArgs) -> i32 {
    let work = async {
        let (store, lines) = args.datastore.store().await?;
        let options = args.datastore.options(args.overwrite);
        transfer::upload(&store, &args.src_dir, &args.path, options, lines).await
    };
    match interruptible(work).await {
        Ok(result) => {
            if let Some(path) = &args.report {
                let text = match &result {
                    Ok(summary) => serde_json::to_string(&UploadReport {
                        uploaded: summary.transferred,
                        skipped: summary.kept_differing(),
                        identical: summary.identical,
                        bytes: summary.bytes,
                    })
                    .expect("a report serializes"),
                    Err(failed) => failed.error.to_string(),
                };
                if let Err(e) = write_report(path, &text) {
                    tracing::error!(error = %e, "the outcome could not be reported");
                }
            }
            crate::transfer::report(crate::transfer::Output::Json, result)
        }
        Err(Interrupted(signal)) => {
            let msg = format!(
                "interrupted by signal {signal}: no partial file was left under its final name; run again to finish"
            );
            tracing::warn!("{msg}");
            if let Some(path) = &args.report
                && let Err(e) = write_report(path, &msg)
            {
                tracing::error!(error = %e, "the interruption could not be reported");
            }
            crate::exit::signaled(signal)
        }
    }
}

/// The transfer was stopped by this signal.
struct Interrupted(i32);

/// Runs the transfer until it ends or the pod is told to stop (SIGTERM, or SIGINT), like the
/// CLI; dropping it removes its temporary files, so nothing partial is left under a final name.
async fn interruptible<T>(work: impl Future<Output = T>) -> Result<T, Interrupted> {
    tokio::select! {
        result = work => Ok(result),
        signal = crate::signal::interrupted() => Err(Interrupted(signal)),
    }
}
