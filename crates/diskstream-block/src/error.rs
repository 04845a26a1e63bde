//! Typed errors of the block layer.
//!
//! Every failure a caller may want to branch on has its own variant; front ends (CLI, QMP, NBD) map
//! them to exit codes, QMP error classes and NBD errnos at the edge. Messages name the image path
//! where one is known, so a one-line report tells the user what is wrong and where.

use std::io;

/// The block layer's result type.
pub type Result<T, E = BlockError> = std::result::Result<T, E>;

/// Everything that can go wrong in the block layer.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// An I/O system call failed; `context` says what we were doing (and on which file).
    #[error("{context}: {source}")]
    Io {
        /// What was being done, e.g. "read of 'base.qcow2' at 65536".
        context: String,
        /// The underlying OS error.
        #[source]
        source: io::Error,
    },
    /// The image is not a valid image of the expected format (bad magic, impossible header fields).
    #[error("{path}: {msg}")]
    InvalidImage {
        /// The image's path (or node name).
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// The image's metadata is inconsistent (e.g. an L2 offset pointing into the header).
    #[error("{path}: image is corrupt: {msg}")]
    Corrupt {
        /// The image's path.
        path: String,
        /// What is inconsistent.
        msg: String,
    },
    /// A valid feature this implementation does not support (e.g. encryption).
    #[error("{path}: unsupported: {msg}")]
    Unsupported {
        /// The image's path.
        path: String,
        /// The unsupported feature.
        msg: String,
    },
    /// A request reaches past the end of the device.
    #[error("request at offset {offset} length {len} is past the end of the device (size {size})")]
    OutOfBounds {
        /// First byte of the request.
        offset: u64,
        /// Request length.
        len: u64,
        /// Device size.
        size: u64,
    },
    /// A write was attempted on a read-only node.
    #[error("{0}: node is read-only")]
    ReadOnly(String),
    /// The backing chain cannot be opened as described (loop, too deep, missing format).
    #[error("{0}")]
    Chain(String),
    /// The caller passed an invalid argument (bad option value, unaligned size, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// There is no space left for the request (ENOSPC or a format limit).
    #[error("{0}: no space left")]
    NoSpace(String),
    /// The operation is refused by policy (EPERM): e.g. a guest writing an image header into a
    /// probed raw disk.
    #[error("{0}")]
    PermissionDenied(String),
}

impl BlockError {
    /// Wrap an `io::Error` with context.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        if source.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) {
            return BlockError::NoSpace(context.into());
        }
        BlockError::Io {
            context: context.into(),
            source,
        }
    }

    /// Shorthand for [`BlockError::InvalidImage`].
    pub fn invalid(path: &str, msg: impl Into<String>) -> Self {
        BlockError::InvalidImage {
            path: path.to_string(),
            msg: msg.into(),
        }
    }

    /// Shorthand for [`BlockError::Corrupt`].
    pub fn corrupt(path: &str, msg: impl Into<String>) -> Self {
        BlockError::Corrupt {
            path: path.to_string(),
            msg: msg.into(),
        }
    }

    /// Shorthand for [`BlockError::Unsupported`].
    pub fn unsupported(path: &str, msg: impl Into<String>) -> Self {
        BlockError::Unsupported {
            path: path.to_string(),
            msg: msg.into(),
        }
    }

    /// The POSIX errno that best describes this error (used by NBD replies and exit codes).
    pub fn errno(&self) -> i32 {
        match self {
            BlockError::Io { source, .. } => source.raw_os_error().unwrap_or(5),
            BlockError::OutOfBounds { .. } | BlockError::InvalidArgument(_) => 22,
            BlockError::ReadOnly(_) | BlockError::PermissionDenied(_) => 1,
            BlockError::NoSpace(_) => 28,
            BlockError::Unsupported { .. } => 95,
            _ => 5,
        }
    }
}
