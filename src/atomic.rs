//! Atomic local writes: data goes to a temporary file beside the target, which is renamed
//! into place only when complete. A failed or interrupted write never leaves a partial file
//! under the final name.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// Temporary files start with this, so listings and uploads can ignore them.
pub const TEMP_PREFIX: &str = ".datastore-partial-";

/// A file being written. Dropping it without [`TempFile::commit`] removes it, unless it is a
/// resumable one (see [`TempFile::resumable`]).
///
/// While it lives it holds an exclusive `flock` on the file: that is how a later run tells a
/// leftover of a killed run (unlocked, removable) from a file another run is writing.
pub struct TempFile {
    tmp: PathBuf,
    target: PathBuf,
    committed: bool,
    /// Left in place when dropped uncommitted, with its journal, for a later run to resume.
    keep: bool,
    _lock: File,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Commit {
    Written,
    /// The target appeared while we wrote and overwriting was not asked for; it is kept.
    TargetExists,
}

/// Suffix of the journal a resumable temporary file keeps beside it.
const JOURNAL_SUFFIX: &str = ".journal";

impl TempFile {
    /// Creates a new temporary file for `target` (and `target`'s parent directories). Its
    /// name is random and created exclusively, so concurrent writers of one directory never
    /// share one. A process killed before it commits leaves a hidden `.datastore-partial-*`
    /// file that uploads and listings ignore and [`remove_stale`] removes.
    pub fn create(target: &Path) -> io::Result<(TempFile, File)> {
        let parent = parent_of(target)?;
        std::fs::create_dir_all(parent)?;
        for _ in 0..100 {
            let tmp = parent.join(format!("{TEMP_PREFIX}{:016x}", rand::random::<u64>()));
            match open(&tmp, true) {
                Ok(file) => {
                    if let Some(lock) = lock(&tmp, &file)? {
                        return Ok((TempFile::new(tmp, target, false, lock), file));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other(
            "no free temporary file name after 100 attempts",
        ))
    }

    /// Opens the resumable temporary file `key` names for `target`, creating it if need be:
    /// an earlier run's leftover under that name is reused. `None` when another live run
    /// holds it. Dropped uncommitted, it stays (with its journal) for the next run, unless
    /// [`TempFile::discard`]ed.
    pub fn resumable(target: &Path, key: &str) -> io::Result<Option<(TempFile, File)>> {
        let parent = parent_of(target)?;
        std::fs::create_dir_all(parent)?;
        let tmp = parent.join(resumable_name(key));
        // The name is predictable: never through a link someone planted under it.
        let file = match open(&tmp, false) {
            Ok(file) if file.metadata()?.is_file() => file,
            Ok(_) => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(None),
            Err(e) => return Err(e),
        };
        // Without locks, two runs could share it: only a fresh file of our own is safe.
        if let Lock::Unsupported = try_lock(&file)? {
            return Ok(None);
        }
        Ok(lock(&tmp, &file)?.map(|lock| (TempFile::new(tmp, target, true, lock), file)))
    }

    fn new(tmp: PathBuf, target: &Path, keep: bool, lock: File) -> TempFile {
        TempFile {
            tmp,
            target: target.to_path_buf(),
            committed: false,
            keep,
            _lock: lock,
        }
    }

    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Where a resumable file keeps its journal (removed with it).
    pub fn journal_path(&self) -> PathBuf {
        journal_of(&self.tmp)
    }

    /// Removes the file now, resumable or not (its bytes cannot be trusted).
    pub fn discard(mut self) {
        self.keep = false;
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
            let _ = std::fs::remove_file(self.journal_path());
        } else {
            self.keep = false;
        }
        Ok(outcome)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed && !self.keep {
            let _ = std::fs::remove_file(&self.tmp);
            let _ = std::fs::remove_file(self.journal_path());
        }
    }
}

/// The file name of the resumable temporary file `key` names.
pub fn resumable_name(key: &str) -> String {
    format!("{TEMP_PREFIX}{key}")
}

fn parent_of(target: &Path) -> io::Result<&Path> {
    target
        .parent()
        .ok_or_else(|| io::Error::other("the target has no parent directory"))
}

fn journal_of(tmp: &Path) -> PathBuf {
    let mut name = tmp.as_os_str().to_owned();
    name.push(JOURNAL_SUFFIX);
    PathBuf::from(name)
}

/// Opens a temporary file for reading (downloads hash what they wrote) and writing, never
/// through a symbolic link.
fn open(path: &Path, create_new: bool) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(create_new)
        .create(!create_new)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Takes the exclusive lock of the file just opened at `path` and returns a handle that keeps
/// it; `None` when another process holds it, or when a cleanup removed the file between our
/// open and our lock.
fn lock(path: &Path, file: &File) -> io::Result<Option<File>> {
    use std::os::unix::fs::MetadataExt;
    match try_lock(file)? {
        Lock::Busy => return Ok(None),
        // File systems without locks: written unlocked, and never removed as stale.
        Lock::Unsupported => return Ok(Some(file.try_clone()?)),
        Lock::Held => {}
    }
    let ours = file.metadata()?.ino();
    let still_there = std::fs::metadata(path).is_ok_and(|m| m.ino() == ours);
    still_there.then(|| file.try_clone()).transpose()
}

enum Lock {
    Held,
    Busy,
    Unsupported,
}

fn try_lock(file: &File) -> io::Result<Lock> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Lock::Held);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(Lock::Busy),
        Some(libc::ENOLCK | libc::EOPNOTSUPP) => Ok(Lock::Unsupported),
        _ => Err(err),
    }
}

/// Removes the temporary files in `dir` that no live process holds (leftovers of killed
/// runs) except those named in `keep` (about to be resumed; their journals stay too).
/// Returns the bytes freed.
pub fn remove_stale(dir: &Path, keep: &std::collections::HashSet<std::ffi::OsString>) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut freed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !is_temp(&name) || keep.contains(&name) {
            continue;
        }
        let path = entry.path();
        if name.to_string_lossy().ends_with(JOURNAL_SUFFIX) {
            // A journal goes with its file; alone, it is a leftover.
            let data = path.with_extension("");
            if !data.exists() && !keep.contains(data.file_name().unwrap_or_default()) {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        }
        let Ok(file) = std::fs::OpenOptions::new().read(true).open(&path) else {
            continue;
        };
        // Held until `file` closes, after the removal: no one starts writing it meanwhile.
        if let Ok(Lock::Held) = try_lock(&file) {
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            if std::fs::remove_file(&path).is_ok() {
                freed += len;
                let _ = std::fs::remove_file(journal_of(&path));
            }
        }
    }
    freed
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
