//! Typed errors of the job framework; their `Display` texts are QEMU's, word for word, because
//! management software matches them.

use crate::state::{JobStatus, JobVerb};

/// Why a job command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// The verb table does not allow the verb in the job's state.
    #[error("Job '{id}' in state '{state}' cannot accept command verb '{verb}'")]
    VerbRejected {
        /// Job id.
        id: String,
        /// Current state.
        state: JobStatus,
        /// The refused verb.
        verb: JobVerb,
    },
    /// `pause` on a job the user already paused.
    #[error("Job is already paused")]
    AlreadyPaused,
    /// `resume` on a job the user did not pause.
    #[error("Can't resume a job that was not paused")]
    NotPaused,
    /// A non-forced `block-job-cancel` on a user-paused job.
    #[error("The block job for device '{0}' is currently paused")]
    CurrentlyPaused(String),
    /// `complete` on a job without a completion step (stream).
    #[error("The active block job '{0}' cannot be completed")]
    CannotComplete(String),
    /// A malformed job id (QEMU: letter first, then letters, digits, `-`, `.`, `_`).
    #[error("Invalid job ID '{0}'")]
    InvalidId(String),
    /// A job with this id exists.
    #[error("Job ID '{0}' already in use")]
    IdInUse(String),
    /// A negative speed.
    #[error("Parameter 'speed' expects a non-negative value")]
    NegativeSpeed,
}

/// Why a job failed; `message` is what `BLOCK_JOB_COMPLETED.error` and the `error` member of
/// the query commands show (QEMU uses `strerror`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct JobFailure {
    /// The POSIX errno behind the failure.
    pub errno: i32,
    /// Human-readable text.
    pub message: String,
}

/// `ECANCELED`.
pub const ECANCELED: i32 = 125;
/// `ENOSPC`.
pub const ENOSPC: i32 = 28;

impl JobFailure {
    /// A failure described by an errno, with the C library's text for it.
    pub fn from_errno(errno: i32) -> Self {
        JobFailure {
            errno,
            message: strerror(errno),
        }
    }

    /// The failure a cancelled job reports.
    pub fn cancelled() -> Self {
        JobFailure::from_errno(ECANCELED)
    }

    /// A block-layer error, reported the way QEMU reports an I/O failure (by errno text).
    pub fn from_block(e: &diskstream_block::BlockError) -> Self {
        JobFailure::from_errno(e.errno())
    }
}

/// The C library's text for an errno ("Input/output error"), without Rust's suffix.
pub fn strerror(errno: i32) -> String {
    let s = std::io::Error::from_raw_os_error(errno).to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_match_qemu() {
        assert_eq!(strerror(5), "Input/output error");
        assert_eq!(strerror(ECANCELED), "Operation canceled");
        assert_eq!(strerror(ENOSPC), "No space left on device");
        let e = JobError::VerbRejected {
            id: "s1".into(),
            state: JobStatus::Paused,
            verb: JobVerb::Complete,
        };
        assert_eq!(
            e.to_string(),
            "Job 's1' in state 'paused' cannot accept command verb 'complete'"
        );
    }
}
