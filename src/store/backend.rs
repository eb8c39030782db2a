//! What the transfer engine needs of a storage service, after rclone's `Fs` + `Features`: every
//! backend lists, checks and says what it offers ([`Backend`]); one that holds objects behind
//! a network API also reads ranges and writes whole objects or committed blocks
//! ([`ObjectStore`]). The engine is generic over them: one dispatch per run, none per chunk.

use std::future::Future;

use std::path::PathBuf;

use bytes::Bytes;

use super::ObjectMeta;
use super::azure::BlockIds;
use crate::error::Result;

/// The hashes a backend's listings carry, which downloads verify and uploads compare against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hashes {
    /// Listings carry each object's MD5 when it has one (Azure's Content-MD5).
    pub md5: bool,
}

/// What every backend does.
pub trait Backend: Sync {
    /// Whether the datastore is marked `readOnly`: nothing may be written to it.
    fn read_only(&self) -> bool;
    /// The hashes its listings carry.
    fn hashes(&self) -> Hashes;
    /// Proves the storage is there and the credentials work, as cheaply as possible.
    fn check(&self) -> impl Future<Output = Result<()>> + Send;
    /// Every object whose name starts with `prefix`.
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Vec<ObjectMeta>>> + Send;
    /// Proves the credentials may read the `listed` objects, not only list them: what a cache
    /// checks before it hands over its copy of them. With as few requests as the backend's
    /// permissions allow (Azure: [`super::AzureCredential::read_proofs`]).
    fn prove_read(&self, listed: &[ObjectMeta]) -> impl Future<Output = Result<()>> + Send;
}

/// A backend reached through requests: ranged reads of a listed version, single-request puts,
/// and large objects staged in blocks then committed (resumable: staged blocks are listed).
pub trait ObjectStore: Backend {
    /// An object's body as it arrives.
    type Body: Send;

    /// Reads `range` (`[start, end)`; the whole object when `None`) of the listed version: a
    /// replaced object is an `Integrity` error, never a mix of versions.
    fn read(
        &self,
        object: &ObjectMeta,
        range: Option<(u64, u64)>,
    ) -> impl Future<Output = Result<Self::Body>> + Send;
    /// The next piece of `body` (`None` at its end); a broken connection is an error the
    /// engine retries from the last byte it wrote, up to [`Self::attempts`] reads in all.
    fn chunk(
        &self,
        body: &mut Self::Body,
        name: &str,
    ) -> impl Future<Output = Result<Option<Bytes>>> + Send;
    /// Attempts per request, the first included.
    fn attempts(&self) -> u32;

    /// Writes a whole object in one request with its MD5; without `overwrite` an existing
    /// object is kept (the service decides, not an earlier listing).
    fn put(
        &self,
        name: &str,
        body: Body,
        md5: [u8; 16],
        overwrite: bool,
    ) -> impl Future<Output = Result<PutOutcome>> + Send;
    /// The blocks of `name` staged and not committed (ID and size): what an interrupted upload
    /// left.
    fn staged_blocks(&self, name: &str) -> impl Future<Output = Result<Vec<(String, u64)>>> + Send;
    /// Stages block `index` of `name`.
    fn put_block(
        &self,
        name: &str,
        ids: &BlockIds,
        index: usize,
        body: Body,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Commits blocks `0..blocks` as the object, with its MD5.
    fn commit_blocks(
        &self,
        name: &str,
        ids: &BlockIds,
        blocks: usize,
        md5: [u8; 16],
        overwrite: bool,
    ) -> impl Future<Output = Result<PutOutcome>> + Send;
}

/// What an upload sends: produced again for each retry.
#[derive(Clone, Debug)]
pub enum Body {
    Empty,
    Bytes(Bytes),
    /// `len` bytes of a file from `offset`, streamed: never held whole in memory.
    File {
        path: PathBuf,
        offset: u64,
        len: u64,
    },
}

/// Whether a conditional create found the object already there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    AlreadyExists,
}
