//! Errors of the HTTP/S3 protocol, and how they reach the block layer.
//!
//! Each variant says what the user can do about it: a missing object (404), missing rights
//! (401/403: credentials), an object replaced underneath us (re-create the overlay or restore
//! the object), a server without range support, or a transient failure that persisted through
//! every retry. At the block layer they become I/O errors with a fitting errno (ENOENT,
//! EACCES, ESTALE, EOPNOTSUPP, EIO) and the message as context, so NBD clients and jobs see a
//! sensible errno and the CLI prints one clear line.

use diskstream_block::BlockError;
use std::io;

/// What went wrong talking to the server.
#[derive(Clone, Debug, thiserror::Error)]
pub enum HttpError {
    /// The URL cannot be used.
    #[error("'{url}': {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// Why not.
        reason: String,
    },
    /// 404 / 410.
    #[error("'{url}': not found (HTTP {status})")]
    NotFound {
        /// The object's URL.
        url: String,
        /// The status code.
        status: u16,
    },
    /// 401 / 403.
    #[error("'{url}': access denied (HTTP {status}; check the credentials: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")]
    Forbidden {
        /// The object's URL.
        url: String,
        /// The status code.
        status: u16,
    },
    /// The object is not the one that was opened (size, ETag or Last-Modified changed, or the
    /// server answered 412 to `If-Match`).
    #[error("'{url}': the object changed since it was opened ({what}); refusing to mix old and new data")]
    Changed {
        /// The object's URL.
        url: String,
        /// What differs.
        what: String,
    },
    /// The server ignores `Range`.
    #[error("'{url}': the server does not support HTTP range requests")]
    NoRanges {
        /// The object's URL.
        url: String,
    },
    /// Any other unexpected answer (not retried).
    #[error("'{url}': {msg}")]
    Protocol {
        /// The object's URL.
        url: String,
        /// What was wrong.
        msg: String,
    },
    /// A transient failure (one attempt).
    #[error("'{url}': {msg}")]
    Transient {
        /// The object's URL.
        url: String,
        /// What failed.
        msg: String,
    },
    /// A transient failure that persisted through every retry.
    #[error("'{url}': read of {len} bytes at {offset} failed after {attempts} attempts: {last}")]
    GaveUp {
        /// The object's URL.
        url: String,
        /// First byte asked for.
        offset: u64,
        /// Bytes asked for.
        len: u64,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
}

impl HttpError {
    /// Whether retrying may help.
    pub fn is_transient(&self) -> bool {
        matches!(self, HttpError::Transient { .. })
    }

    /// The errno that describes the failure.
    pub fn errno(&self) -> i32 {
        match self {
            HttpError::NotFound { .. } => 2,
            HttpError::Forbidden { .. } => 13,
            HttpError::Changed { .. } => 116,
            HttpError::NoRanges { .. } => 95,
            HttpError::InvalidUrl { .. } => 22,
            _ => 5,
        }
    }
}

impl From<HttpError> for BlockError {
    fn from(e: HttpError) -> BlockError {
        match e {
            HttpError::InvalidUrl { .. } => BlockError::InvalidArgument(e.to_string()),
            e => BlockError::Io {
                context: e.to_string(),
                source: io::Error::from_raw_os_error(e.errno()),
            },
        }
    }
}
