//! The user commands. Each one ends in a summary (text or JSON) and an exit code.

mod experiment_file;
pub mod plan;
pub mod run;
pub mod submit;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::error::Error;
use crate::store::Store;
use crate::store::azure::Tuning;
use crate::store::resolve::{OperatorNamespace, Scope, Source};
use crate::store::retry::RetryBudget;
use crate::transfer::{self, Failed, Options, Output, Summary};

#[derive(Parser, Debug)]
#[command(
    name = "datastore",
    version,
    about = "Azure ML style datastores for Kubernetes: move data between datastores and folders, run the operator."
)]
pub struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a RUST_LOG style directive) [default:
    /// info for `controller`, else warn].
    #[arg(long, global = true, env = "DATASTORE_LOG")]
    pub log_level: Option<String>,
    /// Log lines as JSON or text; auto: JSON for `agent`, and for `controller` when stderr is
    /// not a terminal (in a pod), else text.
    #[arg(
        long,
        global = true,
        env = "DATASTORE_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Auto
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Upload a local directory to a datastore, like Datastore.upload(src_dir, target_path, overwrite).
    Upload(UploadArgs),
    /// Download blobs under a prefix into a local directory, like Datastore.download(target_path, prefix).
    Download(DownloadArgs),
    /// Print the CustomResourceDefinitions as YAML (kubectl apply -f -).
    Crds,
    /// Run an Experiment on this machine (the local compute target): download, run the script, upload.
    Run(run::RunArgs),
    /// Run an Experiment on the cluster with the code in its sourceDirectory (snapshotted to a datastore).
    Submit(submit::SubmitArgs),
    /// Print, as YAML, the objects the controller would create for an Experiment.
    Plan(plan::PlanArgs),
    /// In-pod commands used by the containers the controller generates (JSON logs and summary).
    Agent(crate::agent::AgentArgs),
    /// Run the operator: reconcile Experiments, Datastores and ClusterDatastores until SIGTERM.
    Controller(crate::controller::ControllerArgs),
    /// Serve the CSI node plugin that mounts datastore folders from the node's download cache.
    CsiNode(crate::csi::CsiNodeArgs),
}

#[derive(Args, Debug)]
pub struct UploadArgs {
    #[command(flatten)]
    pub common: Common,
    /// The local directory whose files are uploaded (recursively).
    #[arg(long)]
    pub src_dir: PathBuf,
    /// The folder in the datastore the files land under (a leading `/` is fine; empty: the root).
    #[arg(long, default_value = "")]
    pub target_path: String,
}

#[derive(Args, Debug)]
pub struct DownloadArgs {
    #[command(flatten)]
    pub common: Common,
    /// The local directory the blobs land in, each under its full blob name.
    #[arg(long)]
    pub target_path: PathBuf,
    /// Only blobs whose names start with this (a leading `/` is fine; empty: all).
    #[arg(long, default_value = "")]
    pub prefix: String,
}

#[derive(Args, Debug)]
pub struct Common {
    /// The datastore's name.
    #[arg(long)]
    pub datastore: String,
    /// A YAML file of Datastore/ClusterDatastore and Secret objects [default: $DATASTORE_CONFIG,
    /// else the cluster of the current kubeconfig].
    #[arg(long)]
    pub datastores: Option<PathBuf>,
    /// Namespace of the Datastore (and its Secret).
    #[arg(short, long, env = "DATASTORE_NAMESPACE", default_value = "default")]
    pub namespace: String,
    #[command(flatten)]
    pub operator_namespace: OperatorNamespace,
    /// Replace what exists; without it existing blobs/files are skipped and counted.
    #[arg(long)]
    pub overwrite: bool,
    /// Requests in flight at most, across all files.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=512))]
    pub concurrency: u16,
    /// Block size in MiB for large files (at least 8).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(8..=4000))]
    pub block_size_mib: u64,
    #[command(flatten)]
    pub progress: ProgressFlags,
    #[command(flatten)]
    pub retry: RetryBudget,
    /// How the closing summary is printed.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

impl Common {
    fn show_progress(&self) -> bool {
        self.progress.show()
    }

    fn options(&self) -> Options {
        Options {
            concurrency: self.concurrency as usize,
            block_size: self.block_size_mib * 1024 * 1024,
            overwrite: self.overwrite,
            // On a laptop a link to data elsewhere is a choice the user made.
            contain_symlinks: false,
            room: None,
        }
    }

    async fn store(&self, tuning: &Tuning) -> Result<Store, Error> {
        let scope = Scope {
            namespace: self.namespace.clone(),
            operator_namespace: self.operator_namespace.name.clone(),
        };
        let source = Source::pick(self.datastores.clone());
        Store::open(&self.datastore, &source, &scope, tuning).await
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Auto,
    Json,
    Text,
}

impl Cli {
    /// Logs as JSON lines (for the cluster) rather than for a human.
    pub fn json_logs(&self) -> bool {
        match (self.log_format, &self.command) {
            (LogFormat::Json, _) => true,
            (LogFormat::Text, _) => false,
            (LogFormat::Auto, Command::Agent(_)) => true,
            // In a pod: JSON for the log pipeline; on a terminal: for the human watching.
            (LogFormat::Auto, Command::Controller(_)) => !std::io::stderr().is_terminal(),
            (LogFormat::Auto, _) => false,
        }
    }

    /// The log filter: `--log-level`, else what the command needs by default (the operator
    /// says what it does; a user command only what goes wrong).
    pub fn log_filter(&self) -> &str {
        match (&self.log_level, &self.command) {
            (Some(level), _) if !level.trim().is_empty() => level,
            (_, Command::Controller(_) | Command::CsiNode(_)) => "info",
            (_, _) => "warn",
        }
    }
}

/// `--progress` / `--no-progress`: whether transfers draw their progress.
#[derive(Args, Debug, Clone, Copy, Default)]
pub struct ProgressFlags {
    /// Show transfer progress (default: when stderr is a terminal).
    #[arg(long, overrides_with = "no_progress")]
    pub progress: bool,
    /// Never show transfer progress.
    #[arg(long)]
    pub no_progress: bool,
}

impl ProgressFlags {
    /// As the flags say, else whether stderr is a terminal.
    pub fn show(&self) -> bool {
        !self.no_progress && (self.progress || std::io::stderr().is_terminal())
    }
}

/// Runs a command; returns the process exit code.
pub async fn run(cli: Cli) -> i32 {
    match cli.command {
        Command::Plan(args) => plan::run(args).await,
        Command::Run(args) => run::run(args).await,
        Command::Submit(args) => submit::run(args).await,
        Command::Agent(args) => crate::agent::run(args).await,
        Command::Controller(args) => crate::controller::run(args).await,
        Command::CsiNode(args) => crate::csi::run(args).await,
        Command::Crds => {
            print!("{}", crate::api::crds_yaml());
            0
        }
        Command::Upload(args) => {
            let common = &args.common;
            transfer_command(common, |store, bar| async move {
                transfer::upload(
                    &store,
                    &args.src_dir,
                    &args.target_path,
                    common.options(),
                    bar,
                )
                .await
            })
            .await
        }
        Command::Download(args) => {
            let common = &args.common;
            transfer_command(common, |store, bar| async move {
                transfer::download(
                    &store,
                    &args.prefix,
                    &args.target_path,
                    common.options(),
                    bar,
                )
                .await
            })
            .await
        }
    }
}

async fn transfer_command<F, Fut>(common: &Common, run: F) -> i32
where
    F: FnOnce(Store, Arc<dyn transfer::Progress>) -> Fut,
    Fut: Future<Output = transfer::Result<Summary>>,
{
    let tuning = Tuning::transfer(common.concurrency as usize, common.retry.retry_budget);
    let store = match common.store(&tuning).await {
        Ok(store) => store,
        Err(error) => return transfer::report(common.output, Err(Failed::from(error))),
    };
    let bar = Arc::new(transfer::Bar::new(
        common.show_progress(),
        Some(tuning.outage),
    ));
    let result = tokio::select! {
        result = run(store, bar.clone()) => result,
        // Dropping the transfer removes its temporary files: nothing partial is left.
        signal = crate::signal::interrupted() => {
            bar.finish();
            eprintln!("interrupted: no partial file was left under its final name; run the same command again to finish");
            return crate::exit::signaled(signal);
        }
    };
    bar.finish();
    transfer::report(common.output, result)
}
