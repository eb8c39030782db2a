//! A local directory used as a datastore: blob names are relative file paths under its root.

use std::path::{Path, PathBuf};

use super::ObjectMeta;
use super::backend::{Backend, Hashes};
use crate::atomic::{Commit, TempFile};
use crate::error::{Error, Result};
use crate::paths;

#[derive(Clone, Debug)]
pub struct LocalDir {
    root: PathBuf,
    read_only: bool,
}

impl LocalDir {
    pub fn new(root: PathBuf) -> Self {
        LocalDir {
            root,
            read_only: false,
        }
    }

    /// Marks the datastore read-only (`spec.readOnly`): uploads to it are refused.
    pub fn with_read_only(self, read_only: bool) -> Self {
        LocalDir { read_only, ..self }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn missing(&self) -> Error {
        Error::NotFound(format!(
            "the local datastore directory {} does not exist: create it (mkdir -p) or fix spec.local.path",
            self.root.display()
        ))
    }

    /// Fails with a clear error when the directory is missing.
    pub fn check(&self) -> Result<()> {
        if self.root.is_dir() {
            Ok(())
        } else {
            Err(self.missing())
        }
    }

    /// Every file whose name (relative to the root, `/`-separated) starts with `prefix`.
    pub fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        self.check()?;
        // Walk only below the deepest directory the prefix names.
        let dir_part = prefix.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        let start = match paths::local_path(&self.root, dir_part) {
            Ok(p) => p,
            Err(_) if dir_part.is_empty() => self.root.clone(),
            Err(_) => return Ok(Vec::new()),
        };
        let mut out = Vec::new();
        for (path, size) in walk_files(&start)?.files {
            let rel = path
                .strip_prefix(&self.root)
                .expect("walked below the root");
            let Some(name) = rel
                .to_str()
                .map(|s| s.replace(std::path::MAIN_SEPARATOR, "/"))
            else {
                continue;
            };
            if name.starts_with(prefix) {
                out.push(ObjectMeta {
                    name,
                    size,
                    md5: None,
                    etag: None,
                });
            }
        }
        Ok(out)
    }

    /// The file holding blob `name`.
    pub fn path_of(&self, name: &str) -> Result<PathBuf> {
        paths::local_path(&self.root, name).map_err(|why| {
            Error::UnsafeName(format!(
                "cannot store '{}' in {}: {why}",
                paths::display_name(name),
                self.root.display()
            ))
        })
    }

    /// Copies `src` in as blob `name`, atomically; without `overwrite` an existing file is kept.
    pub fn put_file(&self, src: &Path, name: &str, overwrite: bool) -> Result<Commit> {
        if !self.root.is_dir() {
            return Err(self.missing());
        }
        let target = self.path_of(name)?;
        if !overwrite && target.exists() {
            return Ok(Commit::TargetExists);
        }
        let (tmp, file) =
            TempFile::create(&target).map_err(|e| Error::local("create", &target, e))?;
        drop(file);
        // std::fs::copy uses copy_file_range: no bytes pass through user space.
        std::fs::copy(src, tmp.path()).map_err(|e| Error::local("copy into", &target, e))?;
        tmp.commit(overwrite)
            .map_err(|e| Error::local("write", &target, e))
    }
}

/// A local directory is a backend whose objects are files on this machine: the engine copies
/// them kernel-side ([`std::fs::copy`]) rather than reading them through requests.
impl Backend for LocalDir {
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn hashes(&self) -> Hashes {
        Hashes { md5: false }
    }
    async fn check(&self) -> Result<()> {
        LocalDir::check(self)
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let (dir, prefix) = (self.clone(), prefix.to_string());
        tokio::task::spawn_blocking(move || LocalDir::list(&dir, &prefix))
            .await
            .expect("listing does not panic")
    }
    /// File permissions are per file: each listed file is opened.
    async fn prove_read(&self, listed: &[ObjectMeta]) -> Result<()> {
        for object in listed {
            let path = self.path_of(&object.name)?;
            std::fs::File::open(&path).map_err(|e| Error::local("read", &path, e))?;
        }
        Ok(())
    }
}

/// The bytes of the files below `dir` (what [`walk_files`] finds); 0 when it does not exist.
pub fn tree_bytes(dir: &Path) -> Result<u64> {
    Ok(walk_files(dir)?.files.iter().map(|(_, size)| size).sum())
}

/// What lies below a directory.
#[derive(Debug, Default)]
pub struct Tree {
    /// Regular files (and symbolic links to them), with their sizes.
    pub files: Vec<(PathBuf, u64)>,
    /// Entries that hold no file to copy (FIFOs, sockets, devices, dangling links, links to
    /// directories), with what each is: callers name them rather than drop them silently.
    pub ignored: Vec<(PathBuf, &'static str)>,
}

/// Walks below `dir`, following file symlinks but not directory symlinks (they could loop).
/// Our own temporary files are left out. A missing `dir` yields nothing; an entry that cannot
/// be read fails the walk naming that entry, not `dir`.
pub fn walk_files(dir: &Path) -> Result<Tree> {
    let mut tree = Tree::default();
    walk_into(dir, &mut tree)?;
    Ok(tree)
}

fn walk_into(dir: &Path, tree: &mut Tree) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::local("read the directory", dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::local("read the directory", dir, e))?;
        if crate::atomic::is_temp(&entry.file_name()) {
            continue;
        }
        let path = entry.path();
        let ty = entry
            .file_type()
            .map_err(|e| Error::local("read", &path, e))?;
        if ty.is_dir() {
            walk_into(&path, tree)?;
        } else if ty.is_file() {
            let len = entry
                .metadata()
                .map_err(|e| Error::local("read", &path, e))?
                .len();
            tree.files.push((path, len));
        } else if ty.is_symlink() {
            match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => tree.files.push((path, m.len())),
                Ok(m) if m.is_dir() => tree.ignored.push((path, "a link to a directory")),
                Ok(_) => tree.ignored.push((path, "a link to a special file")),
                Err(_) => tree.ignored.push((path, "a dangling symbolic link")),
            }
        } else {
            use std::os::unix::fs::FileTypeExt;
            let what = if ty.is_fifo() {
                "a FIFO"
            } else if ty.is_socket() {
                "a socket"
            } else {
                "a device"
            };
            tree.ignored.push((path, what));
        }
    }
    Ok(())
}
