//! `Datastore.upload(src_dir, target_path, overwrite)`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt, stream};

use super::hash::{self, Hashers, md5_of};
use super::{Options, Outcome, Progress, Result, Run, SMALL_FILE, Summary};
use crate::atomic::Commit;
use crate::error::Error;
use crate::paths;
use crate::store::azure::BlockIds;
use crate::store::backend::{Body, PutOutcome};
use crate::store::local::{Tree, walk_files};
use crate::store::{Backend, LocalDir, ObjectMeta, ObjectStore, Store};

/// A local file to upload and the blob name it becomes.
struct Item {
    path: PathBuf,
    name: String,
    size: u64,
}

/// Uploads every file below `src_dir` to `target_path/<relative path>` in the datastore.
pub async fn upload(
    store: &Store,
    src_dir: &Path,
    target_path: &str,
    options: Options,
    progress: Arc<dyn Progress>,
) -> Result<Summary> {
    if store.read_only() {
        return Err(Error::Config(
            "the datastore is read-only (its spec.readOnly is true), so nothing was uploaded: upload to another datastore, or ask its owner to remove readOnly".to_string(),
        )
        .into());
    }
    let run = Run::new(options, progress);
    let target = paths::datastore_path(target_path).map_err(Error::Config)?;
    let (files, ignored) = source_files(
        src_dir.to_path_buf(),
        target.clone(),
        run.options.contain_symlinks,
    )
    .await?;
    warn_ignored(&ignored);

    // Skip decisions come from one listing of the target, not a request per file.
    let existing: HashMap<String, ObjectMeta> = if run.options.overwrite {
        store.check().await?;
        HashMap::new()
    } else {
        let prefix = if target.is_empty() {
            String::new()
        } else {
            format!("{target}/")
        };
        store
            .list(&prefix)
            .await?
            .into_iter()
            .map(|m| (m.name.clone(), m))
            .collect()
    };
    let (todo, skipped): (Vec<Item>, Vec<Item>) = files
        .into_iter()
        .partition(|f| !existing.contains_key(&f.name));
    let identical = count_identical(&run.hashers, &skipped, &existing).await?;
    if let Store::Local(dir) = store {
        remove_stale_partials(dir, &todo).await;
    }

    run.progress
        .start(todo.len() as u64, todo.iter().map(|f| f.size).sum());
    let run = &run;
    let mut summary = run
        .each(todo, skipped.len() as u64, |item| {
            upload_one(run, store, item)
        })
        .await?;
    summary.identical = identical;
    summary.ignored = ignored.len() as u64;
    Ok(summary)
}

/// Removes what killed uploads left in the local datastore's folders this run writes to.
async fn remove_stale_partials(dir: &LocalDir, todo: &[Item]) {
    let dirs: std::collections::HashSet<PathBuf> = todo
        .iter()
        .filter_map(|item| {
            dir.path_of(&item.name)
                .ok()?
                .parent()
                .map(Path::to_path_buf)
        })
        .collect();
    tokio::task::spawn_blocking(move || {
        let none = Default::default();
        for dir in dirs {
            crate::atomic::remove_stale(&dir, &none);
        }
    })
    .await
    .expect("removing leftovers does not panic");
}

/// Names what the upload leaves out because it holds no file (the first few, then a count).
fn warn_ignored(ignored: &[(PathBuf, &'static str)]) {
    const NAMED: usize = 10;
    for (path, what) in ignored.iter().take(NAMED) {
        tracing::warn!("not uploaded: {} is {what}, not a file", path.display());
    }
    if ignored.len() > NAMED {
        tracing::warn!(
            "not uploaded: {} more entries that are not files",
            ignored.len() - NAMED
        );
    }
}

/// How many of the `skipped` files their blob already holds byte for byte: the same size and a
/// Content-MD5 equal to the file's (a blob without one counts as different). Only files whose
/// name exists are hashed, so a first upload pays nothing.
async fn count_identical(
    hashers: &Hashers,
    skipped: &[Item],
    existing: &HashMap<String, ObjectMeta>,
) -> Result<u64, Error> {
    let candidates = skipped.iter().filter_map(|item| {
        let blob = existing.get(&item.name)?;
        let md5 = blob.md5.filter(|_| blob.size == item.size)?;
        Some((item, md5))
    });
    let same: Vec<bool> = stream::iter(candidates)
        .map(|(item, md5)| async move {
            hashers
                .hash_file(item.path.clone(), item.size)
                .await
                .map(|local| local == md5)
                .map_err(|e| Error::local("read", &item.path, e))
        })
        // Enough files at once to fill the hasher's lanes.
        .buffer_unordered(hash::LANES)
        .try_collect()
        .await?;
    Ok(same.into_iter().filter(|same| *same).count() as u64)
}

/// The files below `src_dir` to upload, sorted, and the entries left out as not files.
async fn source_files(
    src_dir: PathBuf,
    target: String,
    contain_symlinks: bool,
) -> Result<(Vec<Item>, Vec<(PathBuf, &'static str)>), Error> {
    tokio::task::spawn_blocking(move || {
        if !src_dir.is_dir() {
            return Err(Error::NotFound(format!(
                "the source directory {} does not exist or is not a directory: check --src-dir",
                src_dir.display()
            )));
        }
        let Tree { mut files, ignored } = walk_files(&src_dir)?;
        files.sort();
        if contain_symlinks {
            refuse_symlinks_out_of(&src_dir, &files)?;
        }
        let items = files
            .into_iter()
            .map(|(path, size)| {
                let rel = path
                    .strip_prefix(&src_dir)
                    .expect("walked below the source");
                let rel = rel.to_str().ok_or_else(|| {
                    Error::Config(format!(
                        "{} is not valid UTF-8 and cannot be a blob name: rename it",
                        path.display()
                    ))
                })?;
                Ok(Item {
                    name: paths::join(&target, rel),
                    path,
                    size,
                })
            })
            .collect::<Result<_, Error>>()?;
        Ok((items, ignored))
    })
    .await
    .expect("listing the source does not panic")
}

/// Fails on the first file that is a symbolic link resolving outside `root`.
fn refuse_symlinks_out_of(root: &Path, files: &[(PathBuf, u64)]) -> Result<(), Error> {
    let root = root
        .canonicalize()
        .map_err(|e| Error::local("resolve", root, e))?;
    for (path, _) in files {
        let is_link = path
            .symlink_metadata()
            .map_err(|e| Error::local("read", path, e))?
            .file_type()
            .is_symlink();
        if !is_link {
            continue;
        }
        let target = path
            .canonicalize()
            .map_err(|e| Error::local("resolve", path, e))?;
        if !target.starts_with(&root) {
            return Err(Error::UnsafeName(format!(
                "{} is a symbolic link to {}, outside the folder being uploaded; nothing was uploaded: write the file itself into the outputs folder",
                path.display(),
                target.display()
            )));
        }
    }
    Ok(())
}

async fn upload_one(run: &Run, store: &Store, item: Item) -> Result<Outcome, Error> {
    let (created, resumed) = match store {
        Store::Azure(client) => upload_object(run, client, &item).await?,
        Store::Local(dir) => (upload_local(run, dir, &item).await?, 0),
    };
    Ok(if created {
        Outcome::Transferred {
            bytes: item.size,
            resumed,
        }
    } else {
        Outcome::Skipped
    })
}

async fn upload_local(run: &Run, dir: &LocalDir, item: &Item) -> Result<bool, Error> {
    let _permit = run.permit().await;
    let (dir, src, name, overwrite) = (
        dir.clone(),
        item.path.clone(),
        item.name.clone(),
        run.options.overwrite,
    );
    let commit = tokio::task::spawn_blocking(move || dir.put_file(&src, &name, overwrite))
        .await
        .expect("copy does not panic")?;
    run.progress.bytes(item.size);
    Ok(commit == Commit::Written)
}

/// Returns whether the object was created (false: it existed and overwrite was not asked for)
/// and how many of its bytes an interrupted run had already staged.
async fn upload_object<O: ObjectStore>(
    run: &Run,
    client: &O,
    item: &Item,
) -> Result<(bool, u64), Error> {
    let mut resumed = 0;
    let overwrite = run.options.overwrite;
    let read_error = |e| Error::local("read", &item.path, e);
    let block_size = run.options.block_size_for(item.size);
    let one_request = item.size <= block_size;
    let outcome = if item.size <= SMALL_FILE {
        let _permit = run.permit().await;
        let data = tokio::fs::read(&item.path).await.map_err(read_error)?;
        check_size(item, data.len() as u64)?;
        let md5 = md5_of(&data);
        client
            .put(&item.name, Body::Bytes(data.into()), md5, overwrite)
            .await?
    } else if one_request {
        // Put Blob needs the MD5 before the body: hash first, then stream the file.
        let md5 = run
            .hashers
            .hash_file(item.path.clone(), item.size)
            .await
            .map_err(read_error)?;
        let _permit = run.permit().await;
        let body = Body::File {
            path: item.path.clone(),
            offset: 0,
            len: item.size,
        };
        client.put(&item.name, body, md5, overwrite).await?
    } else {
        // Blocks go up in parallel from their own offsets while one sequential pass hashes
        // the whole file for the blob's Content-MD5. Their IDs derive from this version of the
        // file, so blocks an interrupted run staged are recognised and not sent again.
        let before = modified(&item.path).await.map_err(read_error)?;
        let hash = tokio::spawn({
            let hashers = run.hashers.clone();
            let (path, size) = (item.path.clone(), item.size);
            async move { hashers.hash_file(path, size).await }
        });
        let blocks = item.size.div_ceil(block_size) as usize;
        let ids = &BlockIds::derived_from(
            &file_version(&item.path, block_size)
                .await
                .map_err(read_error)?,
        );
        let staged: HashMap<String, u64> = {
            let _permit = run.permit().await;
            client
                .staged_blocks(&item.name)
                .await?
                .into_iter()
                .collect()
        };
        let block = |i: usize| {
            let offset = i as u64 * block_size;
            (offset, block_size.min(item.size - offset))
        };
        let todo: Vec<usize> = (0..blocks)
            .filter(|&i| staged.get(&ids.id(i)) != Some(&block(i).1))
            .collect();
        resumed = item.size - todo.iter().map(|&i| block(i).1).sum::<u64>();
        if resumed > 0 {
            tracing::info!(blob = %paths::display_name(&item.name), resumed, "resuming an interrupted upload");
            run.progress.bytes(resumed);
        }
        let n = todo.len().max(1);
        stream::iter(todo)
            .map(|i| async move {
                let (offset, len) = block(i);
                let _permit = run.permit().await;
                client
                    .put_block(
                        &item.name,
                        ids,
                        i,
                        Body::File {
                            path: item.path.clone(),
                            offset,
                            len,
                        },
                    )
                    .await?;
                run.progress.bytes(len);
                Ok::<_, Error>(())
            })
            .buffer_unordered(n)
            .try_collect::<()>()
            .await?;
        let md5 = hash
            .await
            .expect("hashing does not panic")
            .map_err(read_error)?;
        // The hash and the blocks were read separately: commit only if the file held still.
        if modified(&item.path).await.map_err(read_error)? != before {
            return Err(Error::Local(format!(
                "{} changed while being uploaded: run again once it is no longer being written",
                item.path.display()
            )));
        }
        let _permit = run.permit().await;
        client
            .commit_blocks(&item.name, ids, blocks, md5, overwrite)
            .await?
    };
    if one_request {
        run.progress.bytes(item.size);
    }
    Ok((outcome == PutOutcome::Created, resumed))
}

fn check_size(item: &Item, read: u64) -> Result<(), Error> {
    if read != item.size {
        return Err(Error::Local(format!(
            "{} changed size while being uploaded ({} bytes listed, {read} read): run again once it is no longer being written",
            item.path.display(),
            item.size
        )));
    }
    Ok(())
}

/// What names this version of a file for block IDs: its name, identity (device and inode),
/// size, modification time and change time (which no tool can set back, unlike the
/// modification time `cp -p` or `touch -r` carry over), and the block size. Another file,
/// or this one written again, gets other IDs: a re-run does not commit blocks of other bytes.
async fn file_version(path: &Path, block_size: u64) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let m = tokio::fs::metadata(path).await?;
    Ok(format!(
        "{}\0{}:{}\0{}\0{}.{}\0{}.{}\0{block_size}",
        path.display(),
        m.dev(),
        m.ino(),
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    ))
}

/// A file's size and modification time: what tells that it changed.
async fn modified(path: &Path) -> std::io::Result<(u64, Option<std::time::SystemTime>)> {
    let m = tokio::fs::metadata(path).await?;
    Ok((m.len(), m.modified().ok()))
}
