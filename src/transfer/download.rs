//! `Datastore.download(target_path, prefix)`: each blob lands at `target/<blob name>`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt, stream};

use super::hash::md5_of;
use super::resume::{self, Journal};
use super::{Options, Outcome, Progress, Result, Run, SMALL_FILE, Summary, md5_hex};
use crate::atomic::{Commit, TempFile};
use crate::error::Error;
use crate::paths;
use crate::store::{Backend, LocalDir, ObjectMeta, ObjectStore, Store};

/// Bytes gathered for one positional write, at most (unless one piece is larger): few syscalls,
/// and one buffer of this size per request in flight.
const WRITE_BATCH: usize = 512 * 1024;

struct Item {
    meta: ObjectMeta,
    path: PathBuf,
}

/// Downloads every blob whose name starts with `prefix` to `target_dir/<blob name>`.
pub async fn download(
    store: &Store,
    prefix: &str,
    target_dir: &Path,
    options: Options,
    progress: Arc<dyn Progress>,
) -> Result<Summary> {
    let run = Run::new(options, progress);
    // A leading `/` is accepted; the rest is a plain name prefix, as in the SDK.
    let prefix = prefix.trim_start_matches('/');
    let blobs = store.list(prefix).await?;
    let items = plan(blobs, target_dir, Layout::FullNames)?;
    fetch_all(&run, store, items, target_dir).await
}

/// What [`download_folder`] found: every file blob under the folder (skipped ones included),
/// named relative to the folder and sorted by name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FolderListing {
    pub blobs: Vec<ObjectMeta>,
}

/// Downloads the contents of the datastore folder `folder` (normalized; `""` is the whole
/// container): each blob `folder/<rel>` lands at `target_dir/<rel>`. Only blobs inside the
/// folder count (`data` never picks up `data2/...`). The relative names go through the same
/// safety checks as full names. Returns the run's summary and the folder's listing.
pub async fn download_folder(
    store: &Store,
    folder: &str,
    target_dir: &Path,
    options: Options,
    progress: Arc<dyn Progress>,
) -> Result<(Summary, FolderListing)> {
    let blobs = store.list(&folder_prefix(folder)).await?;
    download_listed(store, folder, blobs, target_dir, options, progress).await
}

/// The prefix of a folder's objects: `data/files/` (`""`: the whole container).
pub fn folder_prefix(folder: &str) -> String {
    let folder = paths::normalize(folder);
    if folder.is_empty() {
        String::new()
    } else {
        format!("{folder}/")
    }
}

/// [`download_folder`] of a listing taken already (`blobs`: what `list` returned for the
/// folder's prefix), e.g. the one a cache keyed the folder by: the reads are of exactly the
/// listed versions (a blob replaced since is an `Integrity` error).
pub async fn download_listed(
    store: &Store,
    folder: &str,
    blobs: Vec<ObjectMeta>,
    target_dir: &Path,
    options: Options,
    progress: Arc<dyn Progress>,
) -> Result<(Summary, FolderListing)> {
    let run = Run::new(options, progress);
    let prefix = folder_prefix(folder);
    let folder = paths::normalize(folder);
    let items = plan(blobs, target_dir, Layout::RelativeTo(&prefix))?;
    if let Some(room) = &run.options.room {
        let listed: u64 = items.iter().map(|i| i.meta.size).sum();
        if listed > room.bytes {
            return Err(Error::Config(format!(
                "the folder {folder:?} lists {} in {} file(s), more than the {} there is room for: {}; nothing was downloaded: {}",
                indicatif::HumanBytes(listed),
                items.len(),
                indicatif::HumanBytes(room.bytes),
                room.detail,
                room.remedy
            ))
            .into());
        }
    }
    let mut listing = FolderListing {
        blobs: items
            .iter()
            .map(|i| ObjectMeta {
                name: i.meta.name[prefix.len()..].to_string(),
                ..i.meta.clone()
            })
            .collect(),
    };
    listing.blobs.sort_by(|a, b| a.name.cmp(&b.name));
    let summary = fetch_all(&run, store, items, target_dir).await?;
    Ok((summary, listing))
}

/// Where a blob lands under the target directory.
#[derive(Clone, Copy)]
enum Layout<'a> {
    /// `target/<blob name>`, as the SDK does.
    FullNames,
    /// `target/<blob name without this prefix>`; blobs outside the prefix are left out.
    RelativeTo(&'a str),
}

impl Layout<'_> {
    /// The name a blob lands under, or `None` when it is outside the layout's folder.
    fn local_name<'n>(&self, name: &'n str) -> Option<&'n str> {
        match self {
            Layout::FullNames => Some(name),
            Layout::RelativeTo(prefix) => name.strip_prefix(prefix),
        }
    }
}

/// Downloads the planned items, skipping the files that exist unless overwriting.
async fn fetch_all(
    run: &Run,
    store: &Store,
    items: Vec<Item>,
    target_dir: &Path,
) -> Result<Summary> {
    let (todo, skipped) = skip_existing(items, target_dir, run.options.overwrite).await?;
    remove_stale_partials(&todo).await;

    run.progress
        .start(todo.len() as u64, todo.iter().map(|i| i.meta.size).sum());
    // Large blobs are cut into parallel ranges only as far as the pool has room: many large
    // blobs fill it one GET each (fewer requests, hashed as they stream); one alone is split
    // into `concurrency` ranges.
    let large = todo
        .iter()
        .filter(|i| i.meta.size > run.options.block_size)
        .count();
    let split = (run.options.concurrency / large.max(1)).max(1) as u64;
    run.each(todo, skipped, |item| download_one(run, store, item, split))
        .await
}

/// Removes what killed runs left in the directories this run writes to, keeping the partial
/// files of the blob versions it is about to resume: leftovers never pile up.
async fn remove_stale_partials(todo: &[Item]) {
    use std::collections::HashSet;
    let mut dirs = HashSet::new();
    let mut keep = HashSet::new();
    for item in todo {
        if let Some(dir) = item.path.parent() {
            dirs.insert(dir.to_path_buf());
        }
        if let Some(key) = resume::key(&item.meta) {
            keep.insert(crate::atomic::resumable_name(&key).into());
        }
    }
    let freed = tokio::task::spawn_blocking(move || {
        dirs.iter()
            .map(|dir| crate::atomic::remove_stale(dir, &keep))
            .sum::<u64>()
    })
    .await
    .expect("removing leftovers does not panic");
    if freed > 0 {
        tracing::info!(
            bytes = freed,
            "removed partial files left by interrupted runs"
        );
    }
}

/// Maps blob names to local paths. Any name that cannot be written safely, or that collides
/// with another as file and directory, stops the run before anything is written.
fn plan(blobs: Vec<ObjectMeta>, target_dir: &Path, layout: Layout) -> Result<Vec<Item>, Error> {
    let mut refused = Vec::new();
    let blobs: Vec<ObjectMeta> = blobs
        .into_iter()
        .filter(|b| layout.local_name(&b.name).is_some())
        .filter(|b| {
            // An empty name ending in `/` marks a folder (some tools write them); one that
            // holds bytes is data no file can be named after: refused, not dropped.
            if !paths::is_folder_marker(&b.name) {
                return true;
            }
            if b.size > 0 {
                refused.push(format!(
                    "'{}': the name ends in `/` but the blob holds {} bytes, and no file can have that name",
                    paths::display_name(&b.name),
                    b.size
                ));
            }
            false
        })
        .collect();
    let mut items = Vec::with_capacity(blobs.len());
    for meta in blobs {
        let name = layout.local_name(&meta.name).unwrap_or_default();
        match paths::local_path(target_dir, name) {
            Ok(path) => items.push(Item { meta, path }),
            Err(why) => refused.push(format!("'{}': {why}", paths::display_name(&meta.name))),
        }
    }
    for (file, inside) in paths::file_directory_collisions(
        items.iter().filter_map(|i| layout.local_name(&i.meta.name)),
    ) {
        refused.push(format!(
            "'{}' is both a file and the directory of '{}'",
            paths::display_name(&file),
            paths::display_name(&inside)
        ));
    }
    if refused.is_empty() {
        return Ok(items);
    }
    let shown: Vec<_> = refused.iter().take(5).cloned().collect();
    Err(Error::UnsafeName(format!(
        "refusing to download: {} blob name(s) cannot be written safely under {}: {}{}; nothing was written: narrow the {} to leave them out, or rename them in the datastore",
        refused.len(),
        target_dir.display(),
        shown.join("; "),
        if refused.len() > shown.len() {
            "; ..."
        } else {
            ""
        },
        match layout {
            Layout::FullNames => "--prefix",
            Layout::RelativeTo(_) => "datastore path",
        },
    )))
}

/// Without overwrite, files that exist are skipped; a directory where a file must go is an
/// error, and so is a directory on the way that is a symbolic link leading out of the target.
async fn skip_existing(
    items: Vec<Item>,
    target_dir: &Path,
    overwrite: bool,
) -> Result<(Vec<Item>, u64), Error> {
    let target_dir = target_dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut links = LinkCheck::new(&target_dir);
        let mut todo = Vec::with_capacity(items.len());
        let mut skipped = 0;
        for item in items {
            links.check(&item.path)?;
            match std::fs::symlink_metadata(&item.path) {
                Ok(m) if m.is_dir() => {
                    return Err(Error::UnsafeName(format!(
                        "blob '{}' would replace the directory {}: move that directory away or download into another --target-path",
                        paths::display_name(&item.meta.name),
                        paths::display_path(&item.path)
                    )));
                }
                Ok(_) if !overwrite => skipped += 1,
                _ => todo.push(item),
            }
        }
        Ok((todo, skipped))
    })
    .await
    .expect("checking local files does not panic")
}

/// Finds directories below the target that are symbolic links leading out of it: a file
/// written below one would land outside the target. Each directory is looked at once.
struct LinkCheck<'a> {
    root: &'a Path,
    /// The target resolved, once a link needs comparing with it.
    resolved_root: Option<PathBuf>,
    seen: std::collections::HashSet<PathBuf>,
}

impl<'a> LinkCheck<'a> {
    fn new(root: &'a Path) -> Self {
        LinkCheck {
            root,
            resolved_root: None,
            seen: Default::default(),
        }
    }

    /// Fails when a directory between the target and `file` is a link leading out of it.
    fn check(&mut self, file: &Path) -> Result<(), Error> {
        let Ok(below) = file.strip_prefix(self.root) else {
            return Ok(());
        };
        let mut dir = self.root.to_path_buf();
        let mut parts: Vec<_> = below.components().collect();
        parts.pop(); // the file itself: replaced by rename, never written through
        for part in parts {
            dir.push(part);
            if !self.seen.insert(dir.clone()) {
                continue;
            }
            match std::fs::symlink_metadata(&dir) {
                Ok(m) if m.file_type().is_symlink() => self.refuse_if_outside(&dir)?,
                Ok(_) => {}
                // Nothing deeper exists yet: it will be created as plain directories.
                Err(_) => return Ok(()),
            }
        }
        Ok(())
    }

    fn refuse_if_outside(&mut self, link: &Path) -> Result<(), Error> {
        let root = match &self.resolved_root {
            Some(r) => r.clone(),
            None => {
                let r = self
                    .root
                    .canonicalize()
                    .map_err(|e| Error::local("resolve", self.root, e))?;
                self.resolved_root = Some(r.clone());
                r
            }
        };
        let leads_to = std::fs::canonicalize(link).unwrap_or_else(|_| {
            // A dangling link still leads where it points.
            std::fs::read_link(link).unwrap_or_default()
        });
        if leads_to.starts_with(&root) {
            return Ok(());
        }
        Err(Error::UnsafeName(format!(
            "refusing to download: {} is a symbolic link to {}, outside the target {}, so files below it would land there; nothing was written: remove the link or download into another --target-path",
            paths::display_path(link),
            paths::display_path(&leads_to),
            paths::display_path(self.root)
        )))
    }
}

async fn download_one(run: &Run, store: &Store, item: Item, split: u64) -> Result<Outcome, Error> {
    let (commit, resumed) = match store {
        Store::Azure(client) => download_object(run, client, &item, split).await?,
        Store::Local(dir) => (download_local(run, dir, &item).await?, 0),
    };
    Ok(match commit {
        Commit::Written => Outcome::Transferred {
            bytes: item.meta.size,
            resumed,
        },
        Commit::TargetExists => Outcome::Skipped,
    })
}

async fn download_local(run: &Run, dir: &LocalDir, item: &Item) -> Result<Commit, Error> {
    let _permit = run.permit().await;
    let src = dir.path_of(&item.meta.name)?;
    let (target, size, overwrite) = (item.path.clone(), item.meta.size, run.options.overwrite);
    let commit = tokio::task::spawn_blocking(move || {
        let (tmp, file) = TempFile::create(&target).map_err(|e| Error::local("create", &target, e))?;
        drop(file);
        let copied = std::fs::copy(&src, tmp.path()).map_err(|e| Error::local("copy", &src, e))?;
        if copied != size {
            return Err(Error::Integrity(format!("{} changed size while being copied ({size} bytes listed, {copied} copied): run again", paths::display_path(&src))));
        }
        tmp.commit(overwrite).map_err(|e| Error::local("write", &target, e))
    })
    .await
    .expect("copy does not panic")?;
    run.progress.bytes(item.meta.size);
    Ok(commit)
}

/// Downloads one object, in up to `split` parallel ranges when it is large. Returns how it was
/// committed and how many of its bytes an earlier, interrupted run had already fetched.
async fn download_object<O: ObjectStore>(
    run: &Run,
    client: &O,
    item: &Item,
    split: u64,
) -> Result<(Commit, u64), Error> {
    let size = item.meta.size;
    let overwrite = run.options.overwrite;
    let target = item.path.clone();
    if size <= SMALL_FILE {
        // One request, one buffer, one write.
        let data = {
            let _permit = run.permit().await;
            fetch_small(client, item).await?
        };
        verify(item, md5_of(&data))?;
        run.progress.bytes(size);
        let commit = tokio::task::spawn_blocking(move || {
            let (tmp, mut file) = TempFile::create(&target)?;
            std::io::Write::write_all(&mut file, &data)?;
            drop(file);
            tmp.commit(overwrite)
        })
        .await
        .expect("writing does not panic")
        .map_err(|e| Error::local("write", &item.path, e))?;
        return Ok((commit, 0));
    }

    // Split: block-sized ranges fetched in order, `split` at a time, so the in-order prefix the
    // hasher follows grows with the download instead of waiting for the first of a few huge
    // ranges. Not split: one stream, hashed as it arrives.
    let range = if split > 1 {
        run.options.block_size_for(size)
    } else {
        size
    };
    let key = resume::key(&item.meta);
    let (tmp, file, journal) = tokio::task::spawn_blocking(move || {
        // A version we can pin resumes an earlier run's bytes, unless another run holds them.
        if let Some(key) = key
            && let Some((tmp, file)) = TempFile::resumable(&target, &key)?
        {
            let journal = Journal::open(&tmp.journal_path(), &file, size, range)?;
            return Ok((tmp, Arc::new(file), Some(journal)));
        }
        let (tmp, file) = TempFile::create(&target)?;
        file.set_len(size)?;
        Ok::<_, std::io::Error>((tmp, Arc::new(file), None))
    })
    .await
    .expect("creating a file does not panic")
    .map_err(|e| Error::local("create", &item.path, e))?;

    let fetched = fetch_large(run, client, item, &file, journal, range, split as usize).await;
    drop(file);
    let resumed = match fetched {
        Ok(resumed) => resumed,
        Err(e) => {
            // Bytes that failed verification, or of a replaced version, are not worth keeping;
            // anything else (a cut connection, a signal) leaves them to resume.
            if matches!(e, Error::Integrity(_)) {
                tmp.discard();
            }
            return Err(e);
        }
    };
    let commit = tokio::task::spawn_blocking(move || tmp.commit(overwrite))
        .await
        .expect("rename does not panic")
        .map_err(|e| Error::local("write", &item.path, e))?;
    Ok((commit, resumed))
}

/// Fetches a large blob into `file` in ranges (of the journal's size when resuming), skipping
/// what the journal says is on disk, and verifies it. Returns the bytes resumed.
async fn fetch_large<O: ObjectStore>(
    run: &Run,
    client: &O,
    item: &Item,
    file: &Arc<File>,
    journal: Option<Journal>,
    range: u64,
    streams: usize,
) -> Result<u64, Error> {
    let size = item.meta.size;
    let range = journal.as_ref().map_or(range, |j| j.range);
    let ranges = resume::ranges(size, range);
    let from: Vec<u64> = match &journal {
        Some(j) => j.done.clone(),
        None => ranges.iter().map(|&(start, _)| start).collect(),
    };
    let resumed: u64 = ranges
        .iter()
        .zip(&from)
        .map(|(&(start, _), &f)| f - start)
        .sum();
    if resumed > 0 {
        tracing::info!(blob = %paths::display_name(&item.meta.name), resumed, "resuming an interrupted download");
        run.progress.bytes(resumed);
    }
    // Ranges arrive in parallel; the hasher follows the complete prefix of the file as each
    // range is written (resumed bytes included), so verification overlaps the download.
    let hasher = item
        .meta
        .md5
        .map(|_| run.hashers.track(file.clone(), ranges.clone()));
    if let Some(h) = &hasher {
        for (i, &f) in from.iter().enumerate() {
            h.written(i, f);
        }
    }
    let todo: Vec<Fetch> = ranges
        .iter()
        .zip(&from)
        .enumerate()
        .map(|(index, (&range, &from))| Fetch { index, range, from })
        .filter(|f| f.from < f.range.1)
        .collect();
    stream::iter(todo)
        .map(|fetch| {
            let (journal, hasher) = (journal.as_ref(), &hasher);
            async move {
                let _permit = run.permit().await;
                let written = |upto| {
                    if let Some(h) = hasher {
                        h.written(fetch.index, upto)
                    }
                };
                fetch_range(run, client, item, fetch, file, journal, &written).await
            }
        })
        .buffer_unordered(streams.max(1))
        .try_collect::<Vec<_>>()
        .await?;
    let md5 = match hasher {
        Some(h) => Some(
            h.finish()
                .await
                .map_err(|e| Error::local("read back", &item.path, e))?,
        ),
        None => None,
    };
    if let Some(md5) = md5 {
        verify(item, md5)?;
    }
    Ok(resumed)
}

/// One range of a large blob still to fetch: its bytes `range`, from offset `from` on.
#[derive(Clone, Copy)]
struct Fetch {
    index: usize,
    range: (u64, u64),
    from: u64,
}

/// A whole small blob into memory, its size checked as it arrives.
async fn fetch_small<O: ObjectStore>(client: &O, item: &Item) -> Result<Bytes, Error> {
    let name = &item.meta.name;
    let mut attempt = 1;
    loop {
        let mut body = client.read(&item.meta, None).await?;
        let mut buf = BytesMut::with_capacity(item.meta.size as usize);
        let streamed: Result<(), Error> = async {
            while let Some(chunk) = client.chunk(&mut body, name).await? {
                buf.extend_from_slice(&chunk);
                if buf.len() as u64 > item.meta.size {
                    break;
                }
            }
            Ok(())
        }
        .await;
        match streamed {
            Ok(()) => {
                check_len(item, buf.len() as u64, item.meta.size)?;
                return Ok(buf.freeze());
            }
            Err(e) if attempt < client.attempts() => {
                tracing::debug!(blob = %name, error = %e, attempt, "download interrupted; retrying");
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Streams one range of the blob into the file at its offsets. A connection broken mid-body
/// is retried from the last byte written, a bounded number of times; progress is recorded in
/// the journal as it goes.
#[allow(clippy::too_many_arguments)]
async fn fetch_range<O: ObjectStore>(
    run: &Run,
    client: &O,
    item: &Item,
    fetch: Fetch,
    file: &Arc<File>,
    journal: Option<&Journal>,
    written: &(dyn Fn(u64) + Sync),
) -> Result<(), Error> {
    let name = &item.meta.name;
    let (_, end) = fetch.range;
    let mut offset = fetch.from;
    let mut recorded = offset;
    let mut attempt = 1;
    loop {
        // The explicit range (never the whole blob) sizes the request's timeout to the payload.
        let mut body = client.read(&item.meta, Some((offset, end))).await?;
        let mut batch = BytesMut::with_capacity(WRITE_BATCH.min((end - offset) as usize));
        let streamed: Result<(), StreamError> = async {
            loop {
                let chunk = client
                    .chunk(&mut body, name)
                    .await
                    .map_err(StreamError::Body)?;
                let done = chunk.is_none();
                let mut chunk = chunk.unwrap_or_default();
                // A piece that would take the batch past WRITE_BATCH waits for the batch to be
                // written: extending would reallocate the batch at twice the size, kept for
                // every later batch of the range (pieces grow to hundreds of KiB when the
                // reader lags). At most two writes per piece: the batch, then with the piece.
                loop {
                    let fits = batch.is_empty() || batch.len() + chunk.len() <= WRITE_BATCH;
                    if fits {
                        batch.extend_from_slice(&chunk);
                        // Let go of the connection's read buffer before waiting for the disk,
                        // so that the connection reads on into it rather than into a new one.
                        chunk = Bytes::new();
                    }
                    if batch.is_empty() || (fits && batch.len() < WRITE_BATCH && !done) {
                        break;
                    }
                    let n = batch.len() as u64;
                    if offset + n > end {
                        return Err(StreamError::TooLong);
                    }
                    // The buffer goes to the writing thread and comes back for the next batch:
                    // no allocation (nor fresh pages to fault in) per batch.
                    let (writer, data) = (file.clone(), std::mem::take(&mut batch));
                    let (data, wrote) = tokio::task::spawn_blocking(move || {
                        let wrote = writer.write_all_at(&data, offset);
                        (data, wrote)
                    })
                    .await
                    .expect("writing does not panic");
                    wrote.map_err(StreamError::Write)?;
                    batch = data;
                    batch.clear();
                    offset += n;
                    written(offset);
                    run.progress.bytes(n);
                    // After the data, one short append: a killed run loses at most the batches
                    // in flight. A blob with a Content-MD5 is verified whole at the end, so a
                    // crash that lost written pages is caught; without one, the journal must not
                    // get ahead of the disk, so it records only synced bytes, now and then.
                    if let Some(j) = journal {
                        let checked = item.meta.md5.is_some();
                        if checked || offset - recorded >= resume::SYNC_EVERY || offset == end {
                            if !checked {
                                let file = file.clone();
                                tokio::task::spawn_blocking(move || file.sync_data())
                                    .await
                                    .expect("syncing does not panic")
                                    .map_err(StreamError::Write)?;
                            }
                            j.record(fetch.index, offset).map_err(StreamError::Write)?;
                            recorded = offset;
                        }
                    }
                    if chunk.is_empty() {
                        break;
                    }
                }
                if done {
                    return Ok(());
                }
            }
        }
        .await;
        match streamed {
            Ok(()) => {
                check_len(item, offset - fetch.range.0, end - fetch.range.0)?;
                return Ok(());
            }
            Err(StreamError::Body(e)) if attempt < client.attempts() => {
                tracing::debug!(blob = %paths::display_name(name), error = %e, attempt, offset, "download interrupted; retrying from the last byte written");
                attempt += 1;
            }
            Err(StreamError::Body(e)) => return Err(e),
            Err(StreamError::TooLong) => return Err(too_long(item)),
            Err(StreamError::Write(e)) => return Err(Error::local("write", &item.path, e)),
        }
    }
}

enum StreamError {
    /// The connection broke mid-body: retried.
    Body(Error),
    TooLong,
    Write(std::io::Error),
}

fn too_long(item: &Item) -> Error {
    Error::Integrity(format!(
        "blob '{}' sent more than the {} bytes its listing gave: it changed while downloading; run again",
        paths::display_name(&item.meta.name),
        item.meta.size
    ))
}

fn check_len(item: &Item, got: u64, expected: u64) -> Result<(), Error> {
    if got > expected {
        return Err(too_long(item));
    }
    if got != expected {
        return Err(Error::Integrity(format!(
            "blob '{}' arrived with {got} bytes where {expected} were expected: it changed while downloading, or the connection was cut; run again",
            paths::display_name(&item.meta.name)
        )));
    }
    Ok(())
}

/// Fails loudly when the bytes differ from the blob's Content-MD5 (when it has one).
fn verify(item: &Item, actual: [u8; 16]) -> Result<(), Error> {
    match item.meta.md5 {
        Some(expected) if expected != actual => Err(Error::Integrity(format!(
            "blob '{}' does not match its Content-MD5 (stored {}, received {}): it is corrupt in the datastore or was damaged on the way; nothing was written to {}",
            paths::display_name(&item.meta.name),
            md5_hex(&expected),
            md5_hex(&actual),
            paths::display_path(&item.path)
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blob of one byte; a folder marker (a name ending in `/`) is empty, as tools write them.
    fn blob(name: &str) -> ObjectMeta {
        ObjectMeta {
            name: name.to_string(),
            size: u64::from(!paths::is_folder_marker(name)),
            md5: None,
            etag: None,
        }
    }

    fn planned(names: &[&str], layout: Layout) -> Result<Vec<(String, PathBuf)>, Error> {
        let items = plan(
            names.iter().map(|n| blob(n)).collect(),
            Path::new("/t"),
            layout,
        )?;
        Ok(items.into_iter().map(|i| (i.meta.name, i.path)).collect())
    }

    #[test]
    fn relative_layout_keeps_only_the_folder_and_strips_it() {
        let got = planned(
            &[
                "data/a.txt",
                "data/sub/b.bin",
                "data2/c",
                "data",
                "data/",
                "other/d",
            ],
            Layout::RelativeTo("data/"),
        )
        .unwrap();
        assert_eq!(
            got,
            vec![
                ("data/a.txt".to_string(), PathBuf::from("/t/a.txt")),
                ("data/sub/b.bin".to_string(), PathBuf::from("/t/sub/b.bin")),
            ]
        );
    }

    /// The refusal reads in order: the names, then what to narrow.
    #[test]
    fn the_unsafe_names_message_names_them_then_the_way_out() {
        let names: Vec<String> = (0..7).map(|i| format!("../x{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let message = planned(&names, Layout::FullNames).unwrap_err().to_string();
        assert!(
            message.starts_with(
                "refusing to download: 7 blob name(s) cannot be written safely under /t: '../x0': "
            ),
            "{message}"
        );
        assert!(
            message.ends_with("; ...; nothing was written: narrow the --prefix to leave them out, or rename them in the datastore"),
            "{message}"
        );
    }

    #[test]
    fn relative_layout_of_the_root_keeps_full_names() {
        let got = planned(&["a", "d/b"], Layout::RelativeTo("")).unwrap();
        assert_eq!(got[1].1, PathBuf::from("/t/d/b"));
    }

    #[test]
    fn relative_names_get_the_same_safety_checks() {
        for bad in [
            &["data/../x"][..],
            &["data//x"],
            &["data/./x"],
            &["data/a", "data/a/b"],
        ] {
            let err = planned(bad, Layout::RelativeTo("data/")).unwrap_err();
            assert!(matches!(err, Error::UnsafeName(_)), "{bad:?}: {err}");
            assert!(err.to_string().contains("datastore path"), "{err}");
        }
        // `data/` + `/x` is `data//x`: its relative name `/x` is absolute and refused too.
        assert!(planned(&["data//x"], Layout::RelativeTo("data/")).is_err());
    }
}
