//! The library's error type. Every error a user can cause names the file or value involved and, where
//! there is one, what to do about it.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error on a named file. (The OS error is part of the message, not a separate
    /// cause, so `{:#}` does not print it twice.)
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    /// A file that exists but whose contents are wrong (corrupt, truncated, another format).
    #[error("{}: {what}", path.display())]
    Corrupt { path: PathBuf, what: String },
    /// A request that cannot be carried out as given (an impossible setting, a missing input, ...).
    #[error("{0}")]
    Invalid(String),
    /// An allocation the host or the GPU cannot hold: the caller knows which settings to lower.
    #[error("{0}")]
    OutOfMemory(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().to_path_buf(), err: source }
    }
    pub fn corrupt(path: impl AsRef<Path>, what: impl Into<String>) -> Self {
        Error::Corrupt { path: path.as_ref().to_path_buf(), what: what.into() }
    }
}

/// `bail!("...")`: return an `Error::Invalid` with a formatted message.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::error::Error::Invalid(format!($($arg)*))) };
}

/// Attach a path to an `std::io::Result`.
pub trait IoContext<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
