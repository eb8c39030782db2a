//! A cache of downloaded folders, keyed by what their listing says: the first fetch of a folder
//! downloads and verifies it, every later fetch of the same content gets it at once. Shared by
//! processes on one machine (`datastore run` on a laptop; the node plugin on a node).
//!
//! Layout under the root:
//! - `entries/<key>/tree/`: a published tree, read-only, and `entries/<key>/manifest.json`
//!   (what it holds, written before the entry is published; its mtime is the last use);
//! - `staging/<key>-<random>/`: a download in progress; the rename into `entries/` publishes
//!   it atomically, so a half-written entry is never under `entries/`;
//! - `locks/<key>`: held (flock, exclusive) by the one process downloading `<key>`: two
//!   fetches of one folder download it once.
//!
//! A fetch holds a shared flock on its entry's manifest for as long as it uses the tree;
//! eviction (least recently used first, down to the size limit) skips the entries it cannot
//! lock exclusively, so a tree in use is never removed. Locks die with their process, so a
//! crash leaves nothing locked; stale staging directories are removed on open.
//!
//! The key is a SHA-256 over the source (the store's description and the folder) and each
//! listed file's name, size and Content-MD5 (or, without one, its ETag). Whoever fetches lists
//! the folder with their own credentials first, and a hit also proves with them that they may
//! read what they listed ([`Backend::prove_read`]: list is not read; a miss reads every file
//! itself): the cache never hands a tree to someone who could not download it. An empty folder
//! has nothing to read and nothing to prove. An entry whose files are missing or of another
//! size (tampered with, or a disk error) is removed and downloaded again, never served.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::paths;
use crate::store::{Backend, ObjectMeta, Store};
use crate::transfer::{self, Options, Progress};

const MANIFEST: &str = "manifest.json";
const TREE: &str = "tree";

/// What a published entry holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Manifest {
    /// Where it came from, for people.
    source: String,
    /// Relative name and size of every file.
    files: BTreeMap<String, u64>,
}

impl Manifest {
    fn bytes(&self) -> u64 {
        self.files.values().sum()
    }
}

/// A cache rooted at a directory, holding at most `limit` bytes of entries not in use.
pub struct Cache {
    root: PathBuf,
    limit: u64,
}

/// A fetched tree, in use while this lives.
#[derive(Debug)]
pub struct Entry {
    /// The tree (read-only).
    pub path: PathBuf,
    pub key: String,
    /// Served from the cache, without downloading.
    pub hit: bool,
    pub files: u64,
    pub bytes: u64,
    /// The shared lock that keeps the entry from eviction.
    _lease: File,
}

impl Cache {
    /// Opens (creating) the cache at `root`; removes what crashed downloads left.
    pub fn open(root: &Path, limit: u64) -> Result<Cache> {
        for dir in ["entries", "staging", "locks"] {
            std::fs::create_dir_all(root.join(dir))
                .map_err(|e| Error::local("create the cache directory", &root.join(dir), e))?;
        }
        let cache = Cache {
            root: root.to_path_buf(),
            limit,
        };
        cache.remove_stale_staging();
        Ok(cache)
    }

    fn entry_dir(&self, key: &str) -> PathBuf {
        self.root.join("entries").join(key)
    }

    /// The contents of `folder` in `store`: from the cache when it holds what the listing
    /// says, else downloaded (verified) into it first.
    pub async fn fetch(
        &self,
        store: &Store,
        folder: &str,
        options: Options,
        progress: Arc<dyn Progress>,
    ) -> Result<Entry> {
        let Store::Azure(client) = store else {
            return Err(Error::Config(
                "a local datastore is on this machine already: it is not cached".into(),
            ));
        };
        let source = format!("{}/{}", client.describe(), paths::normalize(folder));
        let prefix = transfer::folder_prefix(folder);
        let blobs = store.list(&prefix).await?;
        let key = key_of(&source, &relative(&blobs, &prefix));
        if let Some(entry) = self.hit(store, folder, &blobs, &key).await? {
            return Ok(entry);
        }
        // One download per key at a time; whoever waited finds the entry published.
        let lock = self.root.join("locks").join(&key);
        let single = open_lock(&lock)?;
        flock(&single, libc::LOCK_EX, &lock).await?;
        if let Some(entry) = self.hit(store, folder, &blobs, &key).await? {
            return Ok(entry);
        }
        let staging = self
            .root
            .join("staging")
            .join(format!("{key}-{:016x}", rand::random::<u64>()));
        let result = self
            .download(
                store, folder, blobs, &source, &key, &staging, options, progress,
            )
            .await;
        if result.is_err() {
            remove_tree(&staging);
        }
        let entry = result?;
        drop(single);
        self.evict();
        Ok(entry)
    }

    /// The published entry `key` of the listed `blobs`, once `store`'s credentials proved they
    /// may read them (before the entry is touched); `None` when there is none (or it is broken).
    async fn hit(
        &self,
        store: &Store,
        folder: &str,
        blobs: &[ObjectMeta],
        key: &str,
    ) -> Result<Option<Entry>> {
        if !self.entry_dir(key).join(MANIFEST).exists() {
            return Ok(None);
        }
        store.prove_read(blobs).await.map_err(|e| match e {
            Error::Auth(why) => Error::Auth(format!(
                "the cache holds {folder:?}, and these credentials may list the folder but not read it ({why}): a cached copy goes only to credentials that could download it; give the SAS read (r), or the identity a role that reads blobs"
            )),
            e => e,
        })?;
        self.lease(key)
    }

    #[allow(clippy::too_many_arguments)]
    /// Downloads the listed `blobs` (the versions the key names: a blob replaced since is an
    /// `Integrity` error) into `staging`, and publishes them as entry `key`.
    async fn download(
        &self,
        store: &Store,
        folder: &str,
        blobs: Vec<ObjectMeta>,
        source: &str,
        key: &str,
        staging: &Path,
        options: Options,
        progress: Arc<dyn Progress>,
    ) -> Result<Entry> {
        let tree = staging.join("tree");
        let (_, listing) =
            transfer::download_listed(store, folder, blobs, &tree, options, progress)
                .await
                .map_err(|failed| failed.error)?;
        let manifest = Manifest {
            source: source.to_string(),
            files: listing
                .blobs
                .iter()
                .map(|b| (b.name.clone(), b.size))
                .collect(),
        };
        let text = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
        let manifest_path = staging.join(MANIFEST);
        std::fs::create_dir_all(&tree).map_err(|e| Error::local("create", &tree, e))?;
        std::fs::write(&manifest_path, text)
            .map_err(|e| Error::local("write", &manifest_path, e))?;
        make_read_only(&tree);
        let target = self.entry_dir(key);
        // An entry found broken is out of the way already (see `lease`).
        std::fs::rename(staging, &target).map_err(|e| Error::local("publish", &target, e))?;
        // The tree's own mtime says when it was published: a pod reading it through the node
        // plugin reports it, and the controller tells a hit (published before the pod) from a
        // miss. Nothing writes into a published tree, so it stays.
        if let Err(e) =
            File::open(target.join(TREE)).and_then(|t| t.set_modified(SystemTime::now()))
        {
            tracing::warn!(entry = %target.display(), error = %e, "the tree's publication time could not be set");
        }
        let manifest_path = target.join(MANIFEST);
        let lease =
            File::open(&manifest_path).map_err(|e| Error::local("open", &manifest_path, e))?;
        flock(&lease, libc::LOCK_SH, &target).await?;
        Ok(Entry {
            path: target.join(TREE),
            key: key.to_string(),
            hit: false,
            files: manifest.files.len() as u64,
            bytes: manifest.bytes(),
            _lease: lease,
        })
    }

    /// The entry `key` when it is published and intact (leased and marked used); a broken one
    /// is removed. Hands the tree to anyone who has the key: [`Cache::fetch`] proves the
    /// caller's access first; the node plugin leases again what a fetch proved, and what pods
    /// still mount.
    pub fn lease(&self, key: &str) -> Result<Option<Entry>> {
        let dir = self.entry_dir(key);
        let manifest_path = dir.join(MANIFEST);
        let Ok(lease) = File::open(&manifest_path) else {
            return Ok(None);
        };
        if unsafe { libc::flock(lease.as_raw_fd(), libc::LOCK_SH) } != 0 {
            return Err(Error::local(
                "lock",
                &manifest_path,
                std::io::Error::last_os_error(),
            ));
        }
        let manifest: Option<Manifest> = std::fs::read(&manifest_path)
            .ok()
            .and_then(|text| serde_json::from_slice(&text).ok());
        let intact = manifest.as_ref().is_some_and(|m| {
            m.files.iter().all(|(name, size)| {
                std::fs::symlink_metadata(dir.join(TREE).join(name))
                    .is_ok_and(|meta| meta.is_file() && meta.len() == *size)
            })
        });
        let Some(manifest) = manifest.filter(|_| intact) else {
            tracing::warn!(entry = %dir.display(), "a cache entry is broken (files missing or of another size): it is removed and downloaded again");
            drop(lease);
            self.remove_entry(&dir);
            return Ok(None);
        };
        // Its last use, for eviction.
        let _ = lease.set_modified(SystemTime::now());
        Ok(Some(Entry {
            path: dir.join(TREE),
            key: key.to_string(),
            hit: true,
            files: manifest.files.len() as u64,
            bytes: manifest.bytes(),
            _lease: lease,
        }))
    }

    /// The published entries: last use, bytes, directory.
    fn entries(&self) -> Vec<(SystemTime, u64, PathBuf)> {
        std::fs::read_dir(self.root.join("entries"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let dir = e.path();
                let manifest = dir.join(MANIFEST);
                let used = std::fs::metadata(&manifest).ok()?.modified().ok()?;
                let bytes = std::fs::read(&manifest)
                    .ok()
                    .and_then(|t| serde_json::from_slice::<Manifest>(&t).ok())
                    .map_or(0, |m| m.bytes());
                Some((used, bytes, dir))
            })
            .collect()
    }

    /// How many entries the cache holds, and their bytes.
    pub fn usage(&self) -> (usize, u64) {
        let entries = self.entries();
        (entries.len(), entries.iter().map(|e| e.1).sum())
    }

    /// Removes least recently used entries not in use until the rest fit the limit.
    pub fn evict(&self) {
        let mut entries = self.entries();
        let mut total: u64 = entries.iter().map(|e| e.1).sum();
        entries.sort();
        for (_, bytes, dir) in entries {
            if total <= self.limit {
                break;
            }
            let Ok(manifest) = File::open(dir.join(MANIFEST)) else {
                continue;
            };
            // In use (a shared lock held): kept.
            if unsafe { libc::flock(manifest.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                continue;
            }
            self.remove_entry(&dir);
            total -= bytes;
        }
    }

    /// Moves an entry out of `entries/` (atomically), then deletes it.
    fn remove_entry(&self, dir: &Path) {
        let doomed = self
            .root
            .join("staging")
            .join(format!("removed-{:016x}", rand::random::<u64>()));
        if std::fs::rename(dir, &doomed).is_ok() {
            remove_tree(&doomed);
        }
    }

    /// Staging directories whose download died with its process (no lock is held on their key).
    fn remove_stale_staging(&self) {
        for e in std::fs::read_dir(self.root.join("staging"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().to_string();
            let key = name.rsplit_once('-').map_or(name.as_str(), |(k, _)| k);
            let stale = match File::open(self.root.join("locks").join(key)) {
                Ok(lock) => {
                    let free =
                        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
                    free == 0
                }
                Err(_) => true,
            };
            if stale {
                remove_tree(&e.path());
            }
        }
    }
}

/// A published tree as a pod sees it (the node plugin's bind mount at `tree`), checked against
/// the folder's listing now with the pod's own credentials: every listed file is there with its
/// size, and nothing else. The listing, and when the tree was published. It proves no read: it
/// hands over nothing (the kubelet mounted the tree already), and the node plugin proved read
/// when it published the volume, with the volume Secret's SAS: the datastore's own SAS, as in
/// the pod's credentials, or one minted with read and list (src/render/cached.rs).
pub async fn check_tree(
    store: &Store,
    folder: &str,
    tree: &Path,
) -> Result<(Vec<ObjectMeta>, SystemTime)> {
    let prefix = transfer::folder_prefix(folder);
    let listed = relative(&store.list(&prefix).await?, &prefix);
    let differs = |what: String| {
        Error::Integrity(format!(
            "the node cache's copy of {folder:?} at {} differs from the folder now ({what}): the folder changed after the node cached it; run again",
            tree.display()
        ))
    };
    for blob in &listed {
        match std::fs::symlink_metadata(tree.join(&blob.name)) {
            Ok(meta) if meta.is_file() && meta.len() == blob.size => {}
            Ok(meta) => {
                return Err(differs(format!(
                    "{} has {} bytes, the folder {}",
                    blob.name,
                    meta.len(),
                    blob.size
                )));
            }
            Err(_) => return Err(differs(format!("{} is missing", blob.name))),
        }
    }
    let files = count_files(tree).map_err(|e| Error::local("read", tree, e))?;
    if files != listed.len() {
        return Err(differs(format!(
            "it holds {files} files, the folder {}",
            listed.len()
        )));
    }
    let published = std::fs::metadata(tree)
        .and_then(|m| m.modified())
        .map_err(|e| Error::local("read", tree, e))?;
    Ok((listed, published))
}

fn count_files(dir: &Path) -> std::io::Result<usize> {
    let mut files = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            files += count_files(&entry.path())?;
        } else {
            files += 1;
        }
    }
    Ok(files)
}

/// The listed files under `prefix`, named relative to it (as the download names them).
fn relative(blobs: &[ObjectMeta], prefix: &str) -> Vec<ObjectMeta> {
    blobs
        .iter()
        .filter_map(|b| {
            let name = b.name.strip_prefix(prefix)?.to_string();
            Some(ObjectMeta { name, ..b.clone() })
        })
        .collect()
}

/// The cache key of a listing from `source` (see the module's documentation).
fn key_of(source: &str, listed: &[ObjectMeta]) -> String {
    let mut lines: Vec<String> = listed
        .iter()
        .map(|b| {
            let version = match (&b.md5, &b.etag) {
                (Some(md5), _) => format!("md5:{}", hex(md5)),
                (None, Some(etag)) => format!("etag:{etag}"),
                (None, None) => String::new(),
            };
            format!("{}\t{}\t{version}\n", b.name, b.size)
        })
        .collect();
    lines.sort_unstable();
    let mut hasher = Sha256::new();
    hasher.update(source.as_bytes());
    hasher.update(b"\n");
    for line in &lines {
        hasher.update(line.as_bytes());
    }
    hex(&hasher.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Opens (creating) the lock file of a key.
fn open_lock(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::local("open the lock", path, e))
}

/// Takes `operation` on `file`, waiting off the async threads.
async fn flock(file: &File, operation: i32, what: &Path) -> Result<()> {
    let fd = file
        .try_clone()
        .map_err(|e| Error::local("lock", what, e))?;
    let what = what.to_path_buf();
    tokio::task::spawn_blocking(move || {
        if unsafe { libc::flock(fd.as_raw_fd(), operation) } == 0 {
            Ok(())
        } else {
            Err(Error::local("lock", &what, std::io::Error::last_os_error()))
        }
    })
    .await
    .expect("the lock task does not panic")
}

/// Files 0444, directories 0555: a cached tree is read, never written.
fn make_read_only(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            make_read_only(&path);
        } else {
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444));
        }
    }
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555));
}

/// Deletes a tree, read-only directories included.
fn remove_tree(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    fn writable(dir: &Path) {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                writable(&e.path());
            }
        }
    }
    writable(dir);
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str, size: u64, md5: Option<u8>, etag: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            name: name.into(),
            size,
            md5: md5.map(|b| [b; 16]),
            etag: etag.map(str::to_string),
        }
    }

    #[test]
    fn the_key_follows_names_sizes_and_versions_not_listing_order() {
        let a = [
            meta("a", 1, Some(1), Some("e1")),
            meta("b/c", 2, None, Some("e2")),
        ];
        let reordered = [a[1].clone(), a[0].clone()];
        assert_eq!(key_of("s", &a), key_of("s", &reordered));
        let changed_md5 = [meta("a", 1, Some(9), Some("e1")), a[1].clone()];
        let changed_etag = [a[0].clone(), meta("b/c", 2, None, Some("e3"))];
        let changed_size = [meta("a", 2, Some(1), Some("e1")), a[1].clone()];
        for other in [&changed_md5[..], &changed_etag, &changed_size, &a[..1]] {
            assert_ne!(key_of("s", &a), key_of("s", other));
        }
        // With an MD5 the ETag does not matter (a copy of the same content is the same).
        let new_etag = [meta("a", 1, Some(1), Some("e9")), a[1].clone()];
        assert_eq!(key_of("s", &a), key_of("s", &new_etag));
        assert_ne!(key_of("s", &a), key_of("another source", &a));
    }
}
