//! The transfer engine: list, decide what to skip, copy in parallel, verify, report progress.
//!
//! One pool of request permits is shared by every file of a run, so `concurrency` bounds the
//! requests in flight whatever the mix of small and large files. Nothing is held whole in
//! memory: small files travel in one buffer of at most [`SMALL_FILE`] bytes, larger ones are
//! streamed from and to disk in blocks.

mod download;
mod hash;
pub mod progress;
mod report;
mod resume;
mod upload;

use std::sync::Arc;
use std::time::Instant;

use futures::{StreamExt, stream};
use hash::Hashers;
use serde::Serialize;
use tokio::sync::Semaphore;

pub use download::{FolderListing, download, download_folder, download_listed, folder_prefix};
pub use progress::{Bar, Lines, NoProgress, Progress};
pub use report::{Output, report};
pub use upload::upload;

use crate::error::Error;

/// Files up to this size are read or received into one buffer and sent in one request.
pub const SMALL_FILE: u64 = 1024 * 1024;
/// The smallest block a large file is cut into.
pub const MIN_BLOCK_SIZE: u64 = 8 * 1024 * 1024;
/// Azure's limit on the blocks of one blob.
const MAX_BLOCKS: u64 = 50_000;

#[derive(Clone, Debug)]
pub struct Options {
    /// Requests in flight at most, across all files.
    pub concurrency: usize,
    /// Block size for large uploads and range size for large downloads.
    pub block_size: u64,
    /// Replace blobs (upload) or files (download) that exist.
    pub overwrite: bool,
    /// Uploads: refuse a symbolic link that leads outside the source directory. The in-pod
    /// agent sets it: a script could otherwise link its outputs to the agent's credentials.
    pub contain_symlinks: bool,
    /// Folder downloads: the most the files may take. A listing that adds up to more is
    /// refused before anything is written.
    pub room: Option<Room>,
}

/// How much a download may write, and where that limit comes from (for the refusal).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Room {
    pub bytes: u64,
    /// E.g. "the staging volume holds 10 GiB (spec.staging.size), 2 GiB of it used".
    pub detail: String,
    /// How to get more, e.g. "raise spec.staging.size".
    pub remedy: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            concurrency: 16,
            block_size: MIN_BLOCK_SIZE,
            overwrite: false,
            contain_symlinks: false,
            room: None,
        }
    }
}

impl Options {
    /// The block size for a file of `size` bytes: the configured one, grown so that the file
    /// fits in Azure's 50,000 blocks.
    fn block_size_for(&self, size: u64) -> u64 {
        self.block_size
            .max(MIN_BLOCK_SIZE)
            .max(size.div_ceil(MAX_BLOCKS))
    }
}

/// What a run did; printed as the closing line (or JSON) of every transfer.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    pub transferred: u64,
    pub skipped: u64,
    /// Of the skipped uploads, those whose blob already held the same bytes (same size and
    /// Content-MD5): nothing of them is lost by skipping, e.g. when an upload is retried.
    pub identical: u64,
    /// Uploads: entries of the source that are not files (FIFOs, devices, dangling links),
    /// left out and named in a warning.
    pub ignored: u64,
    pub failed: u64,
    pub bytes: u64,
    /// Of `bytes`, those an earlier, interrupted run had already moved: resumed, not sent or
    /// fetched again.
    pub resumed_bytes: u64,
    pub seconds: f64,
    pub mib_per_s: f64,
}

impl Summary {
    /// Skipped files whose blob differs (or could not be compared): the local copy is the only
    /// one of these bytes.
    pub fn kept_differing(&self) -> u64 {
        self.skipped - self.identical
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} transferred, {} skipped{}{}, {} in {:.1}s ({:.1} MiB/s)",
            self.transferred,
            self.skipped,
            if self.ignored > 0 {
                format!(", {} not files (left out)", self.ignored)
            } else {
                String::new()
            },
            if self.failed > 0 {
                format!(", {} failed", self.failed)
            } else {
                String::new()
            },
            indicatif::HumanBytes(self.bytes),
            self.seconds,
            self.mib_per_s
        )
    }
}

/// Shared state of one run: the request pool, the counters, the progress sink.
struct Run {
    permits: Arc<Semaphore>,
    options: Options,
    progress: Arc<dyn Progress>,
    /// Hashes every file of the run on one thread, several at once.
    hashers: Hashers,
    started: Instant,
}

impl Run {
    fn new(options: Options, progress: Arc<dyn Progress>) -> Self {
        Run {
            permits: Arc::new(Semaphore::new(options.concurrency.max(1))),
            options,
            progress,
            hashers: Hashers::default(),
            started: Instant::now(),
        }
    }

    async fn permit(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.permits
            .acquire()
            .await
            .expect("the pool is never closed")
    }

    /// Transfers `items` with `one`, several files at a time (their requests share the pool),
    /// tallying outcomes; `skipped` files were decided before the run.
    async fn each<I, F, Fut>(&self, items: Vec<I>, skipped: u64, one: F) -> Result<Summary>
    where
        F: FnMut(I) -> Fut,
        Fut: Future<Output = Result<Outcome, Error>>,
    {
        let mut tally = Tally::default();
        tally.summary.skipped = skipped;
        let mut results = stream::iter(items)
            .map(one)
            .buffer_unordered(self.options.concurrency.max(1));
        while let Some(result) = results.next().await {
            if let Err(error) = tally.record(result, &*self.progress) {
                // Files still in flight are dropped here, their temporary files with them.
                return Err(Failed {
                    summary: tally.summary.timed(self.started),
                    error,
                    reported: false,
                });
            }
        }
        tally
            .finish(self.started)
            .map_err(|(summary, error)| Failed {
                summary,
                error,
                // Each failed file went to `Progress::file_failed` as it failed.
                reported: true,
            })
    }
}

/// Tallies per-file outcomes, stopping the run at the first error no other file could escape.
#[derive(Default)]
struct Tally {
    summary: Summary,
    failures: Vec<Error>,
}

enum Outcome {
    /// `bytes` in all, of which `resumed` an earlier, interrupted run had fetched.
    Transferred {
        bytes: u64,
        resumed: u64,
    },
    Skipped,
}

impl Tally {
    /// Records one file's outcome; returns the error that must end the run, if it is one.
    fn record(
        &mut self,
        result: Result<Outcome, Error>,
        progress: &dyn Progress,
    ) -> Result<(), Error> {
        match result {
            Ok(Outcome::Transferred { bytes, resumed }) => {
                self.summary.transferred += 1;
                self.summary.bytes += bytes;
                self.summary.resumed_bytes += resumed;
                progress.file_done();
            }
            Ok(Outcome::Skipped) => {
                self.summary.skipped += 1;
                progress.file_skipped();
            }
            // Credentials, reachability, configuration and a full or read-only disk fail every
            // file alike: stop now, with one message.
            Err(
                e @ (Error::Auth(_)
                | Error::Unreachable(_)
                | Error::Config(_)
                | Error::LocalUnwritable(_)),
            ) => {
                self.summary.failed += 1;
                return Err(e);
            }
            Err(e) => {
                progress.file_failed(&e);
                self.summary.failed += 1;
                self.failures.push(e);
            }
        }
        Ok(())
    }

    /// The summary, or an error describing the failed files: of their kind when they all
    /// share one (so the exit code says what happened), else a partial failure.
    fn finish(self, started: Instant) -> Result<Summary, (Summary, Error)> {
        let summary = self.summary.timed(started);
        let Some(first) = self.failures.first() else {
            return Ok(summary);
        };
        let n = self.failures.len();
        let same_kind = self
            .failures
            .iter()
            .all(|e| e.exit_code() == first.exit_code());
        let msg = if n == 1 {
            first.to_string()
        } else {
            format!("{n} files failed (each is reported above); the first: {first}")
        };
        let err = if same_kind {
            first.with_message(msg)
        } else {
            Error::Partial(msg)
        };
        Err((summary, err))
    }
}

impl Summary {
    /// With the time since `started` and the rate it gives.
    fn timed(mut self, started: Instant) -> Summary {
        self.seconds = started.elapsed().as_secs_f64();
        self.mib_per_s =
            (self.bytes - self.resumed_bytes) as f64 / 1_048_576.0 / self.seconds.max(1e-9);
        self
    }
}

/// A failed run still reports what it did before failing.
#[derive(Debug)]
pub struct Failed {
    pub summary: Summary,
    pub error: Error,
    /// The failed files were each reported to the run's progress already (a terminal has
    /// seen them; the error sums them up).
    pub reported: bool,
}

pub type Result<T, E = Failed> = std::result::Result<T, E>;

impl From<Error> for Failed {
    fn from(error: Error) -> Self {
        Failed {
            summary: Summary::default(),
            error,
            reported: false,
        }
    }
}

fn md5_hex(md5: &[u8; 16]) -> String {
    md5.iter().map(|b| format!("{b:02x}")).collect()
}
