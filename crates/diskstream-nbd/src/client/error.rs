//! Typed errors of the NBD client.
//!
//! The client distinguishes failures a caller may react to differently: the server refused an
//! option (unknown export, TLS required), the server answered a command with an NBD error (the
//! request failed but the connection is fine), the server broke the protocol (the connection is
//! dropped and never retried), and the connection is gone for longer than `reconnect-delay`
//! (requests fail with EIO, like QEMU's nbd driver). [`ClientError::errno`] and
//! [`ClientError::into_block_error`] map them to the block layer at the edge.

use crate::proto::{self, ProtoError};
use diskstream_block::BlockError;
use std::io;
use std::time::Duration;

/// Everything that can go wrong in the NBD client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// An `nbd://` / `nbd+unix://` URL could not be parsed.
    #[error("invalid NBD URL '{url}': {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A socket operation failed while connecting or negotiating.
    #[error("{context}: {source}")]
    Io {
        /// What was being done (names the server).
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Connecting (or negotiating) took longer than allowed.
    #[error("{what}: timed out after {after:?}")]
    Timeout {
        /// What was being done.
        what: String,
        /// The limit that passed.
        after: Duration,
    },
    /// The server broke the protocol; the connection is dropped and not retried.
    #[error("NBD protocol violation by {server}: {msg}")]
    Protocol {
        /// The server's address.
        server: String,
        /// What it did wrong.
        msg: String,
    },
    /// The server refused an option during negotiation.
    #[error("{server} refused {option}: {}{}", refusal_name(*.code), fmt_message(.message))]
    Refused {
        /// The server's address.
        server: String,
        /// The option refused.
        option: &'static str,
        /// The `NBD_REP_ERR_*` code.
        code: u32,
        /// The server's message, if any.
        message: String,
    },
    /// The server has no export of that name.
    #[error("{server} has no export named '{export}'{}", fmt_message(.message))]
    ExportNotFound {
        /// The server's address.
        server: String,
        /// The export asked for.
        export: String,
        /// The server's message, if any.
        message: String,
    },
    /// The server or the export needs something this client does not do (oldstyle
    /// negotiation, TLS), or a reconnect found an incompatible export.
    #[error("{0}")]
    Unsupported(String),
    /// The server answered a command with an NBD error.
    #[error("{command} at offset {offset} length {length} failed on the server: {}{}", errno_name(*.errno), fmt_message(.message))]
    Server {
        /// The command's name.
        command: &'static str,
        /// Its offset.
        offset: u64,
        /// Its length.
        length: u64,
        /// The NBD error value (EIO, ENOSPC, ...).
        errno: u32,
        /// The server's message, if any.
        message: String,
    },
    /// No connection: lost and not re-established within `reconnect-delay`, or the client was
    /// closed. Reported as EIO.
    #[error("NBD server {server} is not connected: {reason}")]
    Disconnected {
        /// The server's address.
        server: String,
        /// Why there is no connection.
        reason: String,
    },
    /// The export does not allow this operation (read-only, not advertised).
    #[error("{0}")]
    NotSupported(String),
    /// A request falls outside the export or breaks its block size constraints.
    #[error("{0}")]
    InvalidRequest(String),
}

fn fmt_message(m: &str) -> String {
    if m.is_empty() {
        String::new()
    } else {
        format!(" ({m})")
    }
}

/// Name of an NBD error value.
pub fn errno_name(e: u32) -> &'static str {
    match e {
        proto::EPERM => "EPERM",
        proto::EIO => "EIO",
        proto::ENOMEM => "ENOMEM",
        proto::EINVAL => "EINVAL",
        proto::ENOSPC => "ENOSPC",
        proto::EOVERFLOW => "EOVERFLOW",
        proto::ENOTSUP => "ENOTSUP",
        proto::ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown error",
    }
}

fn refusal_name(code: u32) -> &'static str {
    match code {
        proto::REP_ERR_UNSUP => "unsupported option",
        proto::REP_ERR_POLICY => "forbidden by policy",
        proto::REP_ERR_INVALID => "invalid option",
        proto::REP_ERR_PLATFORM => "not supported on this platform",
        proto::REP_ERR_TLS_REQD => "TLS required",
        proto::REP_ERR_UNKNOWN => "unknown export",
        proto::REP_ERR_SHUTDOWN => "server shutting down",
        proto::REP_ERR_BLOCK_SIZE_REQD => "block size negotiation required",
        proto::REP_ERR_TOO_BIG => "request too big",
        proto::REP_ERR_EXT_HEADER_REQD => "extended headers required",
        _ => "error",
    }
}

impl ClientError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        ClientError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn protocol(server: &str, msg: impl Into<String>) -> Self {
        ClientError::Protocol {
            server: server.to_string(),
            msg: msg.into(),
        }
    }

    pub(crate) fn codec(server: &str, e: ProtoError) -> Self {
        ClientError::Protocol {
            server: server.to_string(),
            msg: e.to_string(),
        }
    }

    /// The POSIX errno that describes this error. NBD error values are Linux errnos, so a
    /// server's error passes through unchanged; connection failures are EIO, as in QEMU.
    pub fn errno(&self) -> i32 {
        match self {
            ClientError::Server { errno, .. } => match *errno {
                0 => 5,
                e => i32::try_from(e).unwrap_or(5),
            },
            ClientError::NotSupported(_) => 95,
            ClientError::InvalidRequest(_) | ClientError::InvalidUrl { .. } => 22,
            ClientError::Timeout { .. } => 110,
            ClientError::Io { source, .. } => source.raw_os_error().unwrap_or(5),
            _ => 5,
        }
    }

    /// Convert to the block layer's error, with `context` saying what was being done (e.g.
    /// "read of 'nbd://host/disk' at 4096"). Server errors keep their errno (ENOSPC becomes
    /// [`BlockError::NoSpace`], EPERM a permission error); everything else is an I/O error.
    pub fn into_block_error(self, context: impl Into<String>) -> BlockError {
        let context = context.into();
        match self {
            ClientError::InvalidRequest(m) => {
                BlockError::InvalidArgument(format!("{context}: {m}"))
            }
            ClientError::NotSupported(m) => BlockError::Unsupported {
                path: context,
                msg: m,
            },
            ClientError::InvalidUrl { .. } => BlockError::InvalidArgument(self.to_string()),
            e => {
                // The errno travels as a raw OS error so that `BlockError::errno` (and so NBD
                // servers and exit codes above us) see it; the message goes into the context.
                let errno = e.errno();
                BlockError::io(
                    format!("{context}: {e}"),
                    io::Error::from_raw_os_error(errno),
                )
            }
        }
    }
}
