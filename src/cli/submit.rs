//! `datastore submit experiment.yaml [--wait]`: run an Experiment on the cluster with the code
//! on this machine. The `sourceDirectory` folder is uploaded to a datastore under a path named
//! by a digest of its contents (an unchanged folder is uploaded once), the Experiment is pointed
//! at that snapshot (`spec.code`), so the run Job's first init container fetches it, and the
//! Experiment is created; `--wait` follows its phase to the end.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use futures::StreamExt;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use sha2::{Digest, Sha256};

use super::experiment_file::ExperimentFile;
use crate::api::{CodeReference, ComputeTarget, Experiment, Phase, TransferProgress};
use crate::error::{Error, Result};
use crate::exit;
use crate::store::Store;
use crate::store::azure::Tuning;
use crate::store::resolve::{OperatorNamespace, Scope, Source};
use crate::transfer::{self, Options, Progress};

/// Where snapshots live in the datastore: `snapshots/<sha256 hex>`.
pub const SNAPSHOTS: &str = "snapshots";
/// The largest snapshot, as the Azure ML SDK limits it: code, not data (data goes in data
/// references).
pub const SNAPSHOT_LIMIT: u64 = 300 * 1024 * 1024;
/// The field manager of what the CLI creates for the user (the operator's is its own).
pub const CLI_MANAGER: &str = "datastore-cli";
/// Consecutive watch failures `--wait` rides out before it gives up.
const MAX_WATCH_ERRORS: u32 = 5;

#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// The Experiment's YAML file. A relative sourceDirectory is resolved against its folder.
    pub experiment: PathBuf,
    /// The datastore the code snapshot goes to [default: the first datastore the Experiment
    /// references].
    #[arg(long)]
    pub code_datastore: Option<String>,
    /// A YAML file of Datastore/ClusterDatastore and Secret objects, for uploading the snapshot
    /// [default: $DATASTORE_CONFIG, else the cluster].
    #[arg(long)]
    pub datastores: Option<PathBuf>,
    /// The namespace [default: the file's, else the kubeconfig context's].
    #[arg(short, long)]
    pub namespace: Option<String>,
    #[command(flatten)]
    pub operator_namespace: OperatorNamespace,
    /// Follow the Experiment until it ends, drawing its transfers' progress; exit 0 when it
    /// Succeeded, 11 when it Failed.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub progress: super::ProgressFlags,
    /// With --wait: give up after this many seconds (exit 124).
    #[arg(long, default_value_t = 24 * 3600)]
    pub timeout: u64,
}

/// Runs `datastore submit`; returns the exit code.
pub async fn run(args: SubmitArgs) -> i32 {
    let client = match Client::try_default().await {
        Ok(client) => client,
        Err(e) => {
            eprintln!(
                "error: no Kubernetes cluster is reachable ({e}): point KUBECONFIG at one, or run the Experiment here with `datastore run --local`"
            );
            return exit::UNREACHABLE;
        }
    };
    match submit(client, &args).await {
        Ok(submitted) => submitted.exit_code,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

/// What `submit` did.
#[derive(Debug)]
pub struct Submitted {
    /// The snapshot the Experiment's code comes from, and how many of its files were uploaded
    /// now (0: it was there already).
    pub snapshot: Option<(CodeReference, u64)>,
    /// 0 when created (and, with `--wait`, Succeeded); see [`exit::EXPERIMENT_FAILED`], [`exit::TIMEOUT`].
    pub exit_code: i32,
}

/// Snapshots, creates and (with `--wait`) follows the Experiment.
pub async fn submit(client: Client, args: &SubmitArgs) -> Result<Submitted> {
    let fallback = client.default_namespace().to_string();
    let file = ExperimentFile::read(&args.experiment, args.namespace.as_deref(), &fallback)?;
    let mut exp = file.exp.clone();
    if exp.spec.compute_target == ComputeTarget::Local {
        return Err(Error::Config(format!(
            "{} runs locally (computeTarget: local); run it with `datastore run {}`, or set computeTarget: cluster",
            file.path.display(),
            file.path.display()
        )));
    }
    // What the spec alone decides is refused here, before a snapshot is uploaded for it; the
    // rest (datastores) the controller's planner checks.
    crate::plan::check_spec(&exp.spec)
        .map_err(|e| Error::Config(format!("{}: {e}", file.path.display())))?;
    let mut snapshot_done = None;
    if let Some(folder) = code_folder(&file)? {
        let (code, uploaded) = snapshot(&file, &folder, args).await?;
        exp.spec.source_directory = None;
        exp.spec.code = Some(code.clone());
        snapshot_done = Some((code, uploaded));
    }
    let done = |exit_code| Submitted {
        snapshot: snapshot_done.clone(),
        exit_code,
    };

    let api: Api<Experiment> = Api::namespaced(client, &file.namespace());
    exp.metadata.resource_version = None;
    exp.metadata.uid = None;
    exp.status = None;
    let params = PostParams {
        field_manager: Some(CLI_MANAGER.to_string()),
        ..PostParams::default()
    };
    let created = api.create(&params, &exp).await.map_err(|e| match e {
        kube::Error::Api(s) if s.code == 409 => Error::Config(format!(
            "Experiment {}/{} exists already; an Experiment runs once: delete it (kubectl delete experiment -n {} {}) or give this run another metadata.name",
            file.namespace(), file.name(), file.namespace(), file.name()
        )),
        kube::Error::Api(s) if s.code == 404 => Error::Config(
            "the cluster does not know Experiments: install the operator (helm install, or kubectl apply -f deploy/)".to_string(),
        ),
        kube::Error::Api(s) if s.code == 403 => Error::Auth(format!(
            "the cluster refused to create the Experiment: {}", s.message
        )),
        kube::Error::Api(s) => Error::Config(format!("the cluster refused the Experiment: {}", s.message)),
        e => Error::Unreachable(format!("cannot reach the Kubernetes API: {e}")),
    })?;
    eprintln!(
        "created Experiment {}/{}",
        file.namespace(),
        created.name_any()
    );
    if !args.wait {
        return Ok(done(exit::SUCCESS));
    }
    let name = created.name_any();
    let drawing = Drawing::new({
        let show = args.progress.show();
        move || transfer::Bar::new(show, None)
    });
    let followed = follow(&api, &name, drawing);
    match tokio::time::timeout(Duration::from_secs(args.timeout), followed).await {
        Ok(result) => result.map(done),
        Err(_) => {
            eprintln!(
                "gave up waiting after {}s; the Experiment goes on (kubectl get experiment -n {} {})",
                args.timeout,
                file.namespace(),
                file.name()
            );
            Ok(done(exit::TIMEOUT))
        }
    }
}

/// The local folder to snapshot: a relative `sourceDirectory`. An absolute one is a folder in
/// the image, and none means the image holds the script; code already in a datastore stays.
fn code_folder(file: &ExperimentFile) -> Result<Option<PathBuf>> {
    let spec = &file.exp.spec;
    if spec.code.is_some() {
        return Ok(None);
    }
    match spec.source_directory.as_deref() {
        Some(dir) if !dir.starts_with('/') => {
            let folder = file.dir.join(dir);
            if !folder.is_dir() {
                return Err(Error::Config(format!(
                    "sourceDirectory {} does not exist (it is resolved against the folder of {})",
                    folder.display(),
                    file.path.display()
                )));
            }
            Ok(Some(folder))
        }
        _ => Ok(None),
    }
}

/// Uploads `folder` to `snapshots/<digest>` (what is there already is skipped); returns the
/// reference to it and how many files were uploaded now.
async fn snapshot(
    file: &ExperimentFile,
    folder: &Path,
    args: &SubmitArgs,
) -> Result<(CodeReference, u64)> {
    let uses = file.exp.spec.datastore_uses();
    let datastore = match (&args.code_datastore, uses.first()) {
        (Some(name), _) => name.clone(),
        (None, Some((_, name))) => name.to_string(),
        (None, None) => {
            return Err(Error::Config(
                "the Experiment references no datastore to hold its code: pass --code-datastore NAME".to_string(),
            ));
        }
    };
    let digest = {
        let folder = folder.to_path_buf();
        tokio::task::spawn_blocking(move || folder_digest(&folder))
            .await
            .expect("hashing does not panic")?
    };
    if digest.bytes > SNAPSHOT_LIMIT {
        return Err(Error::Config(format!(
            "sourceDirectory {} holds {} in {} files, over the {} a code snapshot may hold; move data out of it and into a data reference",
            folder.display(),
            indicatif::HumanBytes(digest.bytes),
            digest.files,
            indicatif::HumanBytes(SNAPSHOT_LIMIT)
        )));
    }
    let path = format!("{SNAPSHOTS}/{}", digest.hex);
    let scope = Scope {
        namespace: file.namespace(),
        operator_namespace: args.operator_namespace.name.clone(),
    };
    let source = Source::pick(args.datastores.clone());
    let tuning = Tuning::transfer(16, crate::store::retry::DEFAULT_BUDGET);
    let store = Store::open(&datastore, &source, &scope, &tuning).await?;
    let summary = transfer::upload(
        &store,
        folder,
        &path,
        Options::default(),
        Arc::new(transfer::NoProgress),
    )
    .await
    .map_err(|failed| {
        failed.error.with_message(format!(
            "uploading the code snapshot to {datastore}:{path} failed: {}",
            failed.error
        ))
    })?;
    if summary.transferred == 0 {
        eprintln!(
            "code snapshot {datastore}:{path} is there already ({} files)",
            digest.files
        );
    } else {
        eprintln!(
            "uploaded the code snapshot to {datastore}:{path} ({} of {} files, {})",
            summary.transferred,
            digest.files,
            indicatif::HumanBytes(summary.bytes)
        );
    }
    Ok((CodeReference { datastore, path }, summary.transferred))
}

/// What a folder holds, named by its content.
#[derive(Debug, PartialEq, Eq)]
pub struct FolderDigest {
    pub files: u64,
    pub bytes: u64,
    /// sha256 hex over the sorted lines `<relative name>\t<size>\t<sha256 hex of content>\n`.
    pub hex: String,
}

/// The digest of every file below `folder` (what an upload of it sends).
pub fn folder_digest(folder: &Path) -> Result<FolderDigest> {
    let files = crate::store::local::walk_files(folder)?.files;
    let mut lines = Vec::with_capacity(files.len());
    let mut bytes = 0;
    for (path, size) in &files {
        let rel = path.strip_prefix(folder).expect("walked below the folder");
        let mut hasher = Sha256::new();
        let mut reader = std::fs::File::open(path).map_err(|e| Error::local("read", path, e))?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|e| Error::local("read", path, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        lines.push(format!(
            "{}\t{size}\t{}\n",
            rel.display(),
            hex(&hasher.finalize())
        ));
        bytes += size;
    }
    lines.sort_unstable();
    let mut hasher = Sha256::new();
    for line in &lines {
        hasher.update(line.as_bytes());
    }
    Ok(FolderDigest {
        files: files.len() as u64,
        bytes,
        hex: hex(&hasher.finalize()),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Prints each new phase and message of Experiment `name` until it ends; returns the exit code.
async fn follow<D: Draw>(
    api: &Api<Experiment>,
    name: &str,
    mut drawing: Drawing<D>,
) -> Result<i32> {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    // The watcher retries with a capped backoff; the caller's timeout bounds the whole wait.
    let mut changes = watcher(api.clone(), config)
        .default_backoff()
        .applied_objects()
        .boxed();
    let mut last = None;
    let mut errors = 0;
    while let Some(item) = changes.next().await {
        let exp = match item {
            Ok(exp) => {
                errors = 0;
                exp
            }
            // A broken watch is resumed (after the backoff); one that keeps failing is not.
            Err(e) if errors < MAX_WATCH_ERRORS => {
                errors += 1;
                tracing::warn!(error = %e, "watching the Experiment failed; retrying");
                continue;
            }
            Err(e) => {
                return Err(Error::Unreachable(format!(
                    "watching the Experiment failed {} times in a row: {e}",
                    errors + 1
                )));
            }
        };
        let Some(status) = exp.status else { continue };
        let now = (status.phase, status.message.clone());
        if last.as_ref() != Some(&now) {
            drawing.note(&format!(
                "{name}: {} {}",
                status.phase.map_or("-".to_string(), |p| format!("{p:?}")),
                status.message.as_deref().unwrap_or_default()
            ));
            last = Some(now);
        }
        drawing.update(status.progress.as_ref());
        match status.phase {
            Some(Phase::Succeeded) => return Ok(exit::SUCCESS),
            Some(Phase::Failed) => return Ok(exit::EXPERIMENT_FAILED),
            _ => {}
        }
    }
    Err(Error::Unreachable(
        "the watch on the Experiment ended before it did".to_string(),
    ))
}

/// What draws one transfer's progress: the CLI's bar (or its lines off a terminal).
trait Draw: Progress {
    fn finish(&self);
    /// Prints `line` without breaking the drawing.
    fn note(&self, line: &str);
}

impl Draw for transfer::Bar {
    fn finish(&self) {
        transfer::Bar::finish(self)
    }

    fn note(&self, line: &str) {
        transfer::Bar::note(self, line)
    }
}

/// Draws an Experiment's `status.progress` as the CLI draws its own transfers: a drawing per
/// reference transferred, moved on by what each new status adds.
struct Drawing<D> {
    make: Box<dyn Fn() -> D + Send>,
    /// The container drawn, its drawing, and the bytes and files drawn so far.
    current: Option<(String, D, i64, i64)>,
}

impl<D: Draw> Drawing<D> {
    fn new(make: impl Fn() -> D + Send + 'static) -> Self {
        Drawing {
            make: Box::new(make),
            current: None,
        }
    }

    fn update(&mut self, progress: Option<&TransferProgress>) {
        let Some(p) = progress else {
            return self.finish();
        };
        if self.current.as_ref().map(|c| &c.0) != Some(&p.container) {
            self.finish();
            let drawn = (self.make)();
            drawn.start(p.files_total.max(0) as u64, p.bytes_total.max(0) as u64);
            self.current = Some((p.container.clone(), drawn, 0, 0));
        }
        let (_, drawn, bytes, files) = self.current.as_mut().expect("just set");
        if p.bytes > *bytes {
            drawn.bytes((p.bytes - *bytes) as u64);
            *bytes = p.bytes;
        }
        while *files < p.files {
            drawn.file_done();
            *files += 1;
        }
    }

    fn note(&self, line: &str) {
        match &self.current {
            Some((_, drawn, ..)) => drawn.note(line),
            None => eprintln!("{line}"),
        }
    }

    fn finish(&mut self) {
        if let Some((_, drawn, ..)) = self.current.take() {
            drawn.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Records what it is told.
    #[derive(Clone, Default)]
    struct Recorded(Arc<Mutex<Vec<String>>>);

    impl Progress for Recorded {
        fn start(&self, files: u64, bytes: u64) {
            self.0
                .lock()
                .unwrap()
                .push(format!("start {files} {bytes}"));
        }
        fn bytes(&self, n: u64) {
            self.0.lock().unwrap().push(format!("bytes {n}"));
        }
        fn file_done(&self) {
            self.0.lock().unwrap().push("file".into());
        }
    }

    impl Draw for Recorded {
        fn finish(&self) {
            self.0.lock().unwrap().push("finish".into());
        }
        fn note(&self, line: &str) {
            self.0.lock().unwrap().push(format!("note {line}"));
        }
    }

    fn progress(container: &str, files: i64, bytes: i64) -> TransferProgress {
        let t = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default());
        TransferProgress {
            name: "--data".into(),
            container: container.into(),
            files,
            files_total: 2,
            bytes,
            bytes_total: 100,
            bytes_per_second: 0,
            eta_seconds: None,
            last_update_time: t.clone(),
            last_moved_time: t,
            transferred: String::new(),
            percent: String::new(),
            eta: None,
            rate: String::new(),
            storage_unreachable: None,
        }
    }

    #[test]
    fn the_status_progress_is_drawn_as_the_cli_draws_a_transfer() {
        let record = Recorded::default();
        let made = record.clone();
        let mut drawing = Drawing::new(move || made.clone());
        drawing.update(Some(&progress("download-0", 0, 30)));
        drawing.update(Some(&progress("download-0", 1, 80)));
        drawing.update(Some(&progress("download-0", 1, 80)));
        drawing.note("train: Downloading 1 of 2 done");
        drawing.update(Some(&progress("download-1", 0, 10)));
        drawing.update(None);
        assert_eq!(
            *record.0.lock().unwrap(),
            [
                "start 2 100",
                "bytes 30",
                "bytes 50",
                "file",
                "note train: Downloading 1 of 2 done",
                "finish",
                "start 2 100",
                "bytes 10",
                "finish",
            ]
        );
    }
}
