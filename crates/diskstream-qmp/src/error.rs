//! QMP errors: a class and a description, exactly as QEMU words them.
//!
//! Typed errors of the lower layers (block layer, jobs) are mapped here, at the protocol
//! edge, to the class QEMU uses for the same situation (almost always `GenericError`).

use diskstream_block::BlockError;
use diskstream_jobs::JobError;

/// QAPI's `QapiErrorClass` values that diskstream produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Most errors.
    GenericError,
    /// Unknown command, or a command not allowed in the current mode.
    CommandNotFound,
    /// A `block-job-*` command naming no job.
    DeviceNotActive,
    /// A device lookup that QEMU reports with this class.
    DeviceNotFound,
}

impl ErrorClass {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
        }
    }
}

/// An error reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct QmpError {
    /// Error class.
    pub class: ErrorClass,
    /// Human-readable description (QEMU's text where QEMU has one).
    pub desc: String,
}

impl QmpError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// An error of the given class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }
}

impl From<JobError> for QmpError {
    fn from(e: JobError) -> Self {
        QmpError::generic(e.to_string())
    }
}

impl From<BlockError> for QmpError {
    fn from(e: BlockError) -> Self {
        QmpError::generic(e.to_string())
    }
}

/// Shorthand for command results.
pub type QmpResult<T> = Result<T, QmpError>;
