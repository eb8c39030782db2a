//! Atomic local writes: data goes to a temporary file beside the target, which is renamed
//! into place only when complete. A failed or interrupted write never leaves a partial file
//! under the final name.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// Temporary files start with this, so listings and uploads can ignore them.
pub const TEMP_PREFIX: &str = ".datastore-partial-";

/// A file being written. Dropping it without [`TempFile::commit`] removes it.
pub struct TempFile {
    tmp: PathBuf,
    target: PathBuf,
    committed: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Commit {
    Written,
    /// The target appeared while we wrote and overwriting was not asked for; it is kept.
    TargetExists,
}

impl TempFile {
    /// Creates a new temporary file for `target` (and `target`'s parent directories). Its
    /// name is random and created exclusively, so concurrent writers of one directory never
    /// share one. A process killed before it commits leaves a hidden `.datastore-partial-*`
    /// file that uploads and listings ignore.
    pub fn create(target: &Path) -> io::Result<(TempFile, File)> {
        let parent = target
            .parent()
            .ok_or_else(|| io::Error::other("the target has no parent directory"))?;
        std::fs::create_dir_all(parent)?;
        loop {
            let tmp = parent.join(format!("{TEMP_PREFIX}{:016x}", rand::random::<u64>()));
            // Readable too: downloads hash what they wrote.
            match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp)
            {
                Ok(file) => {
                    return Ok((
                        TempFile {
                            tmp,
                            target: target.to_path_buf(),
                            committed: false,
                        },
                        file,
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Moves the complete file into place. Without `overwrite` an existing target is kept
    /// (a hard link fails rather than replacing, unlike rename).
    pub fn commit(mut self, overwrite: bool) -> io::Result<Commit> {
        let outcome = if overwrite {
            std::fs::rename(&self.tmp, &self.target)?;
            Commit::Written
        } else {
            match rename_noreplace(&self.tmp, &self.target) {
                Ok(()) => Commit::Written,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Commit::TargetExists,
                Err(e) => return Err(e),
            }
        };
        if outcome == Commit::Written {
            self.committed = true;
        }
        Ok(outcome)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Renames `from` to `to` unless `to` exists: one `renameat2(RENAME_NOREPLACE)` call, or a hard
/// link and an unlink on file systems without it.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::other("a path holds a NUL byte"))
    };
    let (cfrom, cto) = (c(from)?, c(to)?);
    // The raw system call rather than libc's wrapper, which musl (the static image's libc) lacks.
    // SAFETY: both pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            cfrom.as_ptr(),
            libc::AT_FDCWD,
            cto.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINVAL | libc::ENOSYS) => {
            std::fs::hard_link(from, to)?;
            std::fs::remove_file(from)
        }
        _ => Err(err),
    }
}

/// Whether a file name is one of our temporary files.
pub fn is_temp(name: &std::ffi::OsStr) -> bool {
    name.to_str().is_some_and(|n| n.starts_with(TEMP_PREFIX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn dropped_temp_file_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("sub/out.bin");
        let (tmp, mut f) = TempFile::create(&target).unwrap();
        f.write_all(b"partial").unwrap();
        assert!(tmp.path().exists());
        drop(tmp);
        assert!(!target.exists());
        assert_eq!(
            std::fs::read_dir(dir.path().join("sub")).unwrap().count(),
            0
        );
    }

    #[test]
    fn commit_without_overwrite_keeps_existing_target() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        std::fs::write(&target, b"original").unwrap();
        let (tmp, mut f) = TempFile::create(&target).unwrap();
        f.write_all(b"new").unwrap();
        assert_eq!(tmp.commit(false).unwrap(), Commit::TargetExists);
        assert_eq!(std::fs::read(&target).unwrap(), b"original");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "the temporary file is removed"
        );
        let (tmp, mut f) = TempFile::create(&target).unwrap();
        f.write_all(b"new").unwrap();
        assert_eq!(tmp.commit(true).unwrap(), Commit::Written);
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
    }
}
