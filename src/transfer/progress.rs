//! Progress events of a run. The engine reports; the CLI draws bars, the agent writes JSON lines.

use crate::error::Error;

mod bar;
mod lines;
pub use bar::Bar;
pub use lines::{Lines, Snapshot, Unreachable};

pub trait Progress: Send + Sync {
    /// The run will transfer `files` files of `bytes` bytes in all (skipped files excluded).
    fn start(&self, _files: u64, _bytes: u64) {}
    /// `n` more bytes moved.
    fn bytes(&self, _n: u64) {}
    fn file_done(&self) {}
    fn file_skipped(&self) {}
    /// A file failed; the run goes on with the others.
    fn file_failed(&self, _error: &Error) {}
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {}
