//! diskstream's job framework and the block-stream job.
//!
//! [`state`] holds QEMU's job state machine (transition and verb tables), [`job`] the job
//! lifecycle (pause points, cancel, auto-finalize/auto-dismiss, on-error policy, progress,
//! events), [`ratelimit`] the speed limiter, [`stream`] the block-stream job, [`commit`] the
//! intermediate block-commit job and [`mirror`] the mirror job (also active commit). The QMP
//! monitor (`diskstream-qmp`) turns commands into calls here and [`job::JobEvent`]s into QMP
//! events; nothing in this crate knows about JSON.

pub mod commit;
pub mod error;
pub mod job;
pub mod mirror;
pub mod ratelimit;
pub mod state;
pub mod stream;

pub use error::{JobError, JobFailure};
pub use job::{Job, JobDriver, JobEvent, JobManager, JobOptions, JobType, OnError};
pub use state::{JobStatus, JobVerb};
pub use stream::{StreamConfig, StreamJob};
