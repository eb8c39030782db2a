//! The error type every user-facing command ends in, and its exit code (from `exit`'s table).

use crate::exit;
use crate::reason::Reason;

/// What went wrong, in one sentence that says how to fix it. The variant decides the exit code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The datastores file, a resource or a command-line value is wrong.
    #[error("{0}")]
    Config(String),
    /// The storage service refused the credentials.
    #[error("{0}")]
    Auth(String),
    /// A container, blob prefix or local directory that must exist does not.
    #[error("{0}")]
    NotFound(String),
    /// The storage endpoint could not be reached.
    #[error("{0}")]
    Unreachable(String),
    /// Data arrived different from what the store says it holds (Content-MD5 or size).
    #[error("{0}")]
    Integrity(String),
    /// Blob names that cannot be written safely under the target directory.
    #[error("{0}")]
    UnsafeName(String),
    /// The storage service answered with an error we do not map to a clearer kind.
    #[error("{0}")]
    Service(String),
    /// A local file could not be read or written.
    #[error("{0}")]
    Local(String),
    /// The local file system refuses every write (full, over quota, read-only): no other file
    /// of the run could succeed, so the run stops at the first.
    #[error("{0}")]
    LocalUnwritable(String),
    /// Some files failed; each was reported already.
    #[error("{0}")]
    Partial(String),
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Partial(_) => exit::PARTIAL,
            Error::Config(_) => exit::CONFIG,
            Error::Auth(_) => exit::AUTH,
            Error::NotFound(_) => exit::NOT_FOUND,
            Error::Unreachable(_) => exit::UNREACHABLE,
            Error::Integrity(_) => exit::INTEGRITY,
            Error::UnsafeName(_) => exit::UNSAFE_NAME,
            Error::Service(_) => exit::SERVICE,
            Error::Local(_) | Error::LocalUnwritable(_) => exit::LOCAL,
        }
    }

    /// The error's kind as a reason (JSON output, metric labels, conditions).
    pub fn reason(&self) -> Reason {
        match self {
            Error::Config(_) => Reason::InvalidConfig,
            Error::Auth(_) => Reason::AuthFailed,
            Error::NotFound(_) => Reason::NotFound,
            Error::Unreachable(_) => Reason::Unreachable,
            Error::Integrity(_) => Reason::IntegrityError,
            Error::UnsafeName(_) => Reason::UnsafeBlobName,
            Error::Service(_) => Reason::StorageError,
            Error::Local(_) => Reason::LocalIoError,
            Error::LocalUnwritable(_) => Reason::LocalUnwritable,
            Error::Partial(_) => Reason::PartialFailure,
        }
    }

    /// The same kind of error with another message.
    pub fn with_message(&self, msg: String) -> Error {
        match self {
            Error::Config(_) => Error::Config(msg),
            Error::Auth(_) => Error::Auth(msg),
            Error::NotFound(_) => Error::NotFound(msg),
            Error::Unreachable(_) => Error::Unreachable(msg),
            Error::Integrity(_) => Error::Integrity(msg),
            Error::UnsafeName(_) => Error::UnsafeName(msg),
            Error::Service(_) => Error::Service(msg),
            Error::Local(_) => Error::Local(msg),
            Error::LocalUnwritable(_) => Error::LocalUnwritable(msg),
            Error::Partial(_) => Error::Partial(msg),
        }
    }

    pub fn local(
        what: impl std::fmt::Display,
        path: &std::path::Path,
        err: std::io::Error,
    ) -> Self {
        // The path may end in a blob's name.
        let msg = format!("cannot {what} {}: {err}", crate::paths::display_path(path));
        match err.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT | libc::EROFS) => Error::LocalUnwritable(format!(
                "{msg}; stopped at this first file: free space on that file system (or make it writable), or write elsewhere, then run again"
            )),
            _ => Error::Local(msg),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
