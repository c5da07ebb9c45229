//! Error policy for the whole of volfs.
//!
//! - Every fallible function in the core returns [`Result`]. Nothing from the kernel, the disk,
//!   the network or the user is unwrapped.
//! - An error names what it concerns (volume, chunk id, path) in its message, so that the log
//!   line and the CLI's one-line message are useful on their own.
//! - Each error maps to exactly one errno with [`Error::errno`]; the FUSE adapter calls only that.
//!   Corruption and internal failures are `EIO`; they are never reported as `ENOENT`.
use crate::ids::ChunkId;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A plain POSIX condition (ENOTEMPTY, EXDEV, ENODATA, ...) raised by filesystem logic.
    #[error("{}", errno_name(*.0))]
    Posix(i32),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("{0} is read-only")]
    ReadOnly(String),
    #[error("no space left: {0}")]
    NoSpace(String),
    #[error("{0} is busy")]
    Busy(String),
    #[error("chunk {id} is corrupt: {why}")]
    Corrupt { id: ChunkId, why: String },
    #[error("metadata index: {0}")]
    Db(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bad record in metadata index: {0}")]
    Encoding(String),
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The errno the kernel should see for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Posix(e) => *e,
            Error::NotFound(_) => libc::ENOENT,
            Error::Exists(_) => libc::EEXIST,
            Error::Invalid(_) => libc::EINVAL,
            Error::ReadOnly(_) => libc::EROFS,
            Error::NoSpace(_) => libc::ENOSPC,
            Error::Busy(_) => libc::EBUSY,
            Error::Io { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSPC) => libc::ENOSPC,
                Some(libc::EDQUOT) => libc::ENOSPC,
                _ => libc::EIO,
            },
            Error::Corrupt { .. } | Error::Db(_) | Error::Encoding(_) => libc::EIO,
        }
    }

    /// The HTTP status the control API answers with for this error.
    pub fn http_status(&self) -> u16 {
        match self {
            Error::NotFound(_) => 404,
            Error::Exists(_) | Error::Busy(_) => 409,
            Error::Invalid(_) | Error::Posix(_) => 400,
            Error::ReadOnly(_) => 403,
            Error::NoSpace(_) => 507,
            _ => 500,
        }
    }
}

impl From<rocksdb::Error> for Error {
    fn from(e: rocksdb::Error) -> Self {
        Error::Db(e.into_string())
    }
}

impl From<postcard::Error> for Error {
    fn from(e: postcard::Error) -> Self {
        Error::Encoding(e.to_string())
    }
}

/// Shorthand for raising a POSIX condition.
pub fn posix<T>(errno: i32) -> Result<T> {
    Err(Error::Posix(errno))
}

pub fn errno_name(e: i32) -> String {
    std::io::Error::from_raw_os_error(e).to_string()
}
