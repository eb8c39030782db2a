//! The local compute target: an Experiment's [`ExecutionPlan`] executed on this machine, the
//! way the cluster's Jobs execute it. Download references (and `spec.code`) are copied into a
//! work directory, the script runs with the rendered args, its output streams to the terminal,
//! and upload references are uploaded after it exits, per `uploadPolicy`.
//!
//! Nothing is transferred before every check that can fail cheaply has passed: the plan (which
//! refuses `mount`, a path or entryScript that leaves its folder, a bad env), the work
//! directory, the script's folder and its program, and every datastore's reachability.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;

use crate::api::{ComputeTarget, Experiment, UploadPolicy};
use crate::cache::Cache;
use crate::error::{Error, Result};
use crate::plan::{self, ExecutionPlan, Roots, Transfer};
use crate::store::azure::Tuning;
use crate::store::{Backend, Store, StoreConfig};
use crate::transfer::Bar;
use crate::transfer::{self, Options, Summary};

/// How a local run is set up.
pub struct LocalRun {
    pub exp: Experiment,
    /// The folder a relative `sourceDirectory` is resolved against (the Experiment file's).
    pub base_dir: PathBuf,
    pub datastores: BTreeMap<String, StoreConfig>,
    /// Where the data and code go; `None`: a new temporary directory, removed after a run
    /// whose outputs all reached their datastores.
    pub work_dir: Option<PathBuf>,
    pub concurrency: usize,
    /// How long a transfer rides through a storage outage (`--retry-budget`).
    pub retry_budget: std::time::Duration,
    pub show_progress: bool,
    /// The download cache, when anything asks for it.
    pub cache: Option<Cache>,
    /// Downloads whose reference does not say (`cache`) use the cache: `--cache`.
    pub cache_all: bool,
    /// The datastores whose `cacheDownloads` is set: their downloads use the cache unless the
    /// reference says `cache: false`.
    pub cache_downloads: BTreeSet<String>,
}

/// How a run ended.
#[derive(Debug)]
pub struct Finished {
    /// The script's exit code (128 + signal when a signal ended it or the run).
    pub script: i32,
    /// The first upload that failed, if any.
    pub upload_error: Option<Error>,
    /// The work directory, when it was kept (and why).
    pub kept: Option<(PathBuf, String)>,
}

impl Finished {
    /// The process exit code: the script's, else a failed upload's.
    pub fn exit_code(&self) -> i32 {
        if self.script != 0 {
            self.script
        } else {
            self.upload_error.as_ref().map_or(0, Error::exit_code)
        }
    }
}

impl Finished {
    /// Stopped by `signal` before the run's end (exit 128 + signal, as a shell reports it).
    fn interrupted(signal: i32, kept: Option<(PathBuf, String)>) -> Finished {
        Finished {
            script: crate::exit::signaled(signal),
            upload_error: None,
            kept,
        }
    }
}

/// Runs a transfer until it ends or Ctrl-C / SIGTERM (`Err(signal)`); dropping it removes its
/// temporary files. Needed because once a handler is installed, signals no longer end the
/// process by themselves.
async fn interruptible<T>(work: impl Future<Output = T>) -> std::result::Result<T, i32> {
    tokio::select! {
        result = work => Ok(result),
        signal = crate::signal::interrupted() => Err(signal),
    }
}

/// Says something about the run on stderr, set apart from the script's own output.
fn say(message: impl std::fmt::Display) {
    eprintln!("datastore: {message}");
}

/// Plans and checks the run; nothing is transferred or created yet.
pub fn prepare(run: &LocalRun) -> Result<Prepared> {
    let mut spec = run.exp.spec.clone();
    // The caller decided this runs here (`--local` or `computeTarget: local`).
    spec.compute_target = ComputeTarget::Local;

    let work = WorkDir::choose(run.work_dir.as_deref(), &run.exp)?;
    let data = work.path.join("datastore");
    let code = work.path.join("code");
    let plan = plan::plan(
        &spec,
        &crate::store::capabilities(&run.datastores),
        Roots {
            data: &utf8(&data)?,
            code: &utf8(&code)?,
        },
    )
    .map_err(|e| Error::Config(e.to_string()))?;

    let working_dir = match (&plan.code, &plan.working_dir) {
        (Some(_), Some(dir)) => PathBuf::from(dir),
        (_, Some(dir)) => run.base_dir.join(dir),
        (_, None) => run.base_dir.clone(),
    };
    let program = find_program(&plan.command[0], spec.command.is_none())?;
    if plan.code.is_none() {
        check_source(&working_dir, &spec.entry_script, spec.command.is_none())?;
    }
    Ok(Prepared {
        plan,
        work,
        working_dir,
        program,
    })
}

/// A run that passed its checks.
pub struct Prepared {
    pub plan: ExecutionPlan,
    work: WorkDir,
    working_dir: PathBuf,
    /// The program to start: the plan's, or `python3` standing in for a missing `python`.
    program: String,
}

impl Prepared {
    pub fn work_dir(&self) -> &Path {
        &self.work.path
    }
}

/// Runs a prepared experiment to its end: download, script, upload.
pub async fn execute(run: &LocalRun, prepared: Prepared) -> Result<Finished> {
    let Prepared {
        plan,
        work,
        working_dir,
        program,
    } = prepared;
    let spec = &run.exp.spec;
    if let Some(image) = &spec.image {
        say(format_args!(
            "image {image} does not apply on the local compute target: the script runs with this machine's {program}"
        ));
    }

    let tuning = Tuning::transfer(run.concurrency, run.retry_budget);
    let mut stores = BTreeMap::new();
    for name in plan.permissions.keys() {
        let store = Store::new(&run.datastores[name], &tuning)?;
        // Every datastore is reached once before anything moves, so a wrong credential or a
        // missing container of an upload does not surface only after a long run.
        if let Err(e) = store.check().await {
            return Err(e.with_message(format!(
                "datastore {name} cannot be used, so nothing was downloaded and the script did not run: {e}"
            )));
        }
        stores.insert(name.clone(), store);
    }
    work.create()?;
    let options = |overwrite| Options {
        concurrency: run.concurrency,
        overwrite,
        // The script is the user's own, on the user's own machine.
        contain_symlinks: false,
        ..Options::default()
    };

    // The cached trees the script reads: leased until the run ends, so no eviction takes them.
    let mut leases = Vec::new();
    let code = plan.code.iter().map(|d| (true, d));
    for (is_code, download) in code.chain(plan.downloads.iter().map(|d| (false, d))) {
        let bar = Arc::new(Bar::new(run.show_progress, Some(tuning.outage.clone())));
        let store = &stores[&download.datastore];
        // The code's folder is the script's working directory, which it may write to: never
        // a read-only cached tree. A local datastore is here already.
        let wanted = download
            .cache
            .unwrap_or(run.cache_all || run.cache_downloads.contains(&download.datastore));
        let cache = run
            .cache
            .as_ref()
            .filter(|_| wanted && !is_code && matches!(store, Store::Azure(_)));
        let delivered =
            interruptible(deliver(store, download, cache, options(false), bar.clone())).await;
        bar.finish();
        let Ok(delivered) = delivered else {
            say("interrupted while downloading: the script did not run");
            work.discard();
            return Ok(Finished::interrupted(delivered.unwrap_err(), None));
        };
        match delivered {
            Ok((said, lease)) => {
                say(said);
                leases.extend(lease);
            }
            Err(e) => {
                work.discard();
                return Err(e.with_message(format!(
                    "downloading {} ({}) failed, so the script did not run: {e}",
                    download.param,
                    remote(download),
                )));
            }
        }
    }
    for upload in &plan.uploads {
        std::fs::create_dir_all(&upload.local_path).map_err(|e| {
            Error::local(
                "create the outputs folder",
                Path::new(&upload.local_path),
                e,
            )
        })?;
    }

    let status = run_script(&plan, spec, &program, &working_dir).await?;
    let script = exit_code(status);
    if script == 0 {
        say("the script succeeded");
    } else {
        say(format_args!("the script failed with exit code {script}"));
    }

    let upload_now = script == 0 || spec.upload_policy == UploadPolicy::Always;
    let mut upload_error = None;
    let mut kept_outputs = Vec::new();
    if upload_now {
        for upload in &plan.uploads {
            let bar = Arc::new(Bar::new(run.show_progress, Some(tuning.outage.clone())));
            let result = interruptible(transfer::upload(
                &stores[&upload.datastore],
                Path::new(&upload.local_path),
                &upload.remote_path,
                options(upload.overwrite),
                bar.clone(),
            ))
            .await;
            bar.finish();
            let Ok(result) = result else {
                let why = "it holds outputs whose upload was interrupted".to_string();
                return Ok(Finished::interrupted(
                    result.unwrap_err(),
                    work.finish(Some(why)),
                ));
            };
            match result {
                Ok(summary) => {
                    report_upload(upload, &summary);
                    if summary.kept_differing() > 0 {
                        kept_outputs.push(upload.param.clone());
                    }
                }
                Err(failed) => {
                    say(format_args!(
                        "uploading {} to {} failed: {}",
                        upload.param,
                        remote(upload),
                        failed.error
                    ));
                    kept_outputs.push(upload.param.clone());
                    upload_error.get_or_insert(failed.error);
                }
            }
        }
    } else if !plan.uploads.is_empty() {
        say("the outputs were not uploaded: uploadPolicy is OnSuccess");
    }

    let why_keep = if !plan.uploads.is_empty() && !upload_now {
        Some("it holds the outputs of the failed run".to_string())
    } else if !kept_outputs.is_empty() {
        Some(format!(
            "it holds outputs of {} that did not all reach the datastore",
            kept_outputs.join(", ")
        ))
    } else {
        None
    };
    let kept = work.finish(why_keep);
    Ok(Finished {
        script,
        upload_error,
        kept,
    })
}

/// Brings one download reference to its path: from `cache` when given (a link to the cached,
/// read-only tree, leased while the run lasts), else downloaded into the work directory. What
/// to say about it, and the lease.
async fn deliver(
    store: &Store,
    download: &Transfer,
    cache: Option<&Cache>,
    options: Options,
    bar: Arc<Bar>,
) -> Result<(String, Option<crate::cache::Entry>)> {
    let local = Path::new(&download.local_path);
    let Some(cache) = cache else {
        let (summary, listing) =
            transfer::download_folder(store, &download.remote_path, local, options, bar)
                .await
                .map_err(|failed| failed.error)?;
        let said = format!(
            "downloaded {}: {} into {} ({} files, {})",
            download.param,
            remote(download),
            download.local_path,
            listing.blobs.len(),
            indicatif::HumanBytes(summary.bytes)
        );
        return Ok((said, None));
    };
    let entry = cache
        .fetch(store, &download.remote_path, options, bar)
        .await?;
    if let Some(parent) = local.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::local("create", parent, e))?;
    }
    std::os::unix::fs::symlink(&entry.path, local)
        .map_err(|e| Error::local("link the cached folder at", local, e))?;
    let said = format!(
        "{} {}: {} at {} ({} files, {}; cache entry {})",
        if entry.hit {
            "from the cache"
        } else {
            "downloaded into the cache"
        },
        download.param,
        remote(download),
        download.local_path,
        entry.files,
        indicatif::HumanBytes(entry.bytes),
        entry.path.display()
    );
    Ok((said, Some(entry)))
}

fn report_upload(upload: &Transfer, summary: &Summary) {
    let mut line = format!(
        "uploaded {}: {} files ({}) to {}",
        upload.param,
        summary.transferred,
        indicatif::HumanBytes(summary.bytes),
        remote(upload)
    );
    if summary.identical > 0 {
        line.push_str(&format!(
            "; {} already there with the same contents",
            summary.identical
        ));
    }
    if summary.kept_differing() > 0 {
        line.push_str(&format!(
            "; {} kept as they were because their blobs existed (set overwrite: true on the reference to replace them)",
            summary.kept_differing()
        ));
    }
    say(line);
}

/// `datastore:path`, as users name a place in a datastore.
fn remote(t: &Transfer) -> String {
    format!("{}:{}", t.datastore, t.remote_path)
}

/// Starts the script and waits for it. A signal to this process is passed on (a terminal's
/// Ctrl-C reaches the script by itself); a second one kills the script.
async fn run_script(
    plan: &ExecutionPlan,
    spec: &crate::api::ExperimentSpec,
    program: &str,
    working_dir: &Path,
) -> Result<ExitStatus> {
    let mut command = tokio::process::Command::new(program);
    command
        .args(&plan.command[1..])
        .args(&plan.args)
        .current_dir(working_dir)
        .kill_on_drop(true);
    for var in &spec.env {
        match &var.value {
            Some(value) => {
                command.env(&var.name, value);
            }
            None if var.value_from.is_some() => say(format_args!(
                "env {} takes its value from the cluster (valueFrom), so it is not set here",
                var.name
            )),
            None => {
                command.env(&var.name, "");
            }
        }
    }
    for var in &plan.env {
        command.env(&var.name, &var.value);
    }
    say(format_args!(
        "running {} {} in {}",
        plan.command.join(" "),
        plan.args.join(" "),
        working_dir.display()
    ));
    let mut child = command.spawn().map_err(|e| {
        Error::Config(format!(
            "cannot start {program} in {}: {e}",
            working_dir.display()
        ))
    })?;
    let wait_error = |e| Error::Local(format!("waiting for the script failed: {e}"));
    tokio::select! {
        status = child.wait() => status.map_err(wait_error),
        signal = crate::signal::interrupted() => {
            if let Some(pid) = child.id() {
                // SAFETY: kill(2) on the pid of our own child, which has not been reaped.
                unsafe { libc::kill(pid as libc::pid_t, signal) };
            }
            say("interrupted: waiting for the script to stop (again to kill it)");
            tokio::select! {
                status = child.wait() => status.map_err(wait_error),
                _ = crate::signal::interrupted() => {
                    let _ = child.start_kill();
                    child.wait().await.map_err(wait_error)
                }
            }
        }
    }
}

fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(crate::exit::signaled))
        .unwrap_or(1)
}

/// The program to start. The planned `python` falls back to `python3` where only that exists
/// (Debian and Ubuntu ship no `python`), so the SDK's default command works on a laptop.
fn find_program(planned: &str, default_command: bool) -> Result<String> {
    if planned.contains('/') || on_path(planned) {
        return Ok(planned.to_string());
    }
    if default_command && planned == "python" && on_path("python3") {
        return Ok("python3".to_string());
    }
    Err(Error::Config(format!(
        "{planned} is not on PATH, so the script cannot run here; install it, or set the Experiment's command"
    )))
}

fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// The script's folder must exist, and hold the entry script when it is run as `python
/// <entryScript>`.
fn check_source(working_dir: &Path, entry_script: &str, default_command: bool) -> Result<()> {
    if !working_dir.is_dir() {
        return Err(Error::Config(format!(
            "the script's folder {} does not exist; sourceDirectory is resolved against the Experiment file's folder",
            working_dir.display()
        )));
    }
    if default_command && !working_dir.join(entry_script).is_file() {
        return Err(Error::Config(format!(
            "entryScript {entry_script} is not in {}; fix entryScript or sourceDirectory",
            working_dir.display()
        )));
    }
    Ok(())
}

fn utf8(path: &Path) -> Result<String> {
    path.to_str().map(str::to_string).ok_or_else(|| {
        Error::Config(format!(
            "the work directory {} is not valid UTF-8; give --work-dir",
            path.display()
        ))
    })
}

/// The run's work directory: the user's (which must be empty, so the script sees exactly the
/// downloaded files), or a new temporary one that is ours to remove.
struct WorkDir {
    path: PathBuf,
    temporary: bool,
}

impl WorkDir {
    fn choose(given: Option<&Path>, exp: &Experiment) -> Result<WorkDir> {
        match given {
            Some(dir) => {
                let path = std::path::absolute(dir)
                    .map_err(|e| Error::local("resolve the work directory", dir, e))?;
                if let Ok(mut entries) = std::fs::read_dir(&path)
                    && entries.next().is_some()
                {
                    return Err(Error::Config(format!(
                        "the work directory {} is not empty; give a new or empty one, so the script sees exactly the downloaded data",
                        path.display()
                    )));
                }
                Ok(WorkDir {
                    path,
                    temporary: false,
                })
            }
            None => {
                let name = exp.metadata.name.as_deref().unwrap_or("experiment");
                let suffix: u32 = rand::random();
                Ok(WorkDir {
                    path: std::env::temp_dir().join(format!("datastore-run-{name}-{suffix:08x}")),
                    temporary: true,
                })
            }
        }
    }

    fn create(&self) -> Result<()> {
        let created = if self.temporary {
            // A new directory, never one that happens to exist.
            std::fs::create_dir(&self.path)
        } else {
            std::fs::create_dir_all(&self.path)
        };
        created.map_err(|e| Error::local("create the work directory", &self.path, e))
    }

    /// Removes a temporary work directory after a failure that left nothing of value.
    fn discard(&self) {
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }

    /// Keeps the directory when `why` says so (or when it is the user's), else removes it.
    fn finish(self, why: Option<String>) -> Option<(PathBuf, String)> {
        match why {
            Some(why) => {
                say(format_args!("kept {}: {why}", self.path.display()));
                Some((self.path, why))
            }
            None if !self.temporary => None,
            None => {
                if let Err(e) = std::fs::remove_dir_all(&self.path) {
                    say(format_args!(
                        "could not remove the work directory {}: {e}",
                        self.path.display()
                    ));
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_falls_back_to_python3_only_for_the_default_command() {
        // This machine has python3 (the tests' kubernetes-validate needs it).
        assert!(on_path("python3"));
        assert!(!on_path("no-such-program-here"));
        let fallback = if on_path("python") {
            "python"
        } else {
            "python3"
        };
        assert_eq!(find_program("python", true).unwrap(), fallback);
        let err = find_program("no-such-program-here", true).unwrap_err();
        assert!(err.to_string().contains("is not on PATH"), "{err}");
        assert_eq!(find_program("/bin/sh", false).unwrap(), "/bin/sh");
    }

    #[test]
    fn the_script_s_exit_code_wins_over_an_upload_failure() {
        let finished = |script, upload_error| Finished {
            script,
            upload_error,
            kept: None,
        };
        assert_eq!(finished(0, None).exit_code(), 0);
        assert_eq!(finished(3, None).exit_code(), 3);
        let auth = || Some(Error::Auth("denied".into()));
        assert_eq!(finished(0, auth()).exit_code(), 4);
        assert_eq!(finished(2, auth()).exit_code(), 2);
    }
}
