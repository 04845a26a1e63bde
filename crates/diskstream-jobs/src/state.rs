//! The job state machine: QEMU's 11 states, its transition table and its verb table.
//!
//! Management software (libvirt, qemu.qmp scripts) drives jobs by these exact states and verbs
//! and matches the exact rejection text, so both tables are reproduced entry for entry from
//! QEMU's `job.c` (see the reference, section 3). A transition outside the table is a bug in
//! the job code, never a user error.

use std::fmt;

/// The status of a job, as QMP reports it (`JobStatus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobStatus {
    /// Never observable: the state before creation.
    Undefined,
    /// Created, not started yet.
    Created,
    /// Working.
    Running,
    /// Stopped at a pause point (from Running).
    Paused,
    /// Synchronised, waiting for `complete` (mirror-like jobs).
    Ready,
    /// Stopped at a pause point (from Ready).
    Standby,
    /// Finished its work, waiting for the rest of its transaction.
    Waiting,
    /// Waiting to be finalized (graph changes not applied yet).
    Pending,
    /// Failed or cancelled; rolling back.
    Aborting,
    /// Over; its result can be queried until it is dismissed.
    Concluded,
    /// Gone.
    Null,
}

impl JobStatus {
    /// Every state, in table order.
    pub const ALL: [JobStatus; 11] = [
        JobStatus::Undefined,
        JobStatus::Created,
        JobStatus::Running,
        JobStatus::Paused,
        JobStatus::Ready,
        JobStatus::Standby,
        JobStatus::Waiting,
        JobStatus::Pending,
        JobStatus::Aborting,
        JobStatus::Concluded,
        JobStatus::Null,
    ];

    /// The QAPI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Whether QEMU's transition table allows `self -> to`.
    pub fn can_transition(self, to: JobStatus) -> bool {
        TRANSITIONS[self.index()][to.index()]
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `JobSTT[from][to]` of QEMU's job.c; columns in [`JobStatus::ALL`] order
/// (U C R P Y S W D X E N).
const TRANSITIONS: [[bool; 11]; 11] = {
    const O: bool = false;
    const I: bool = true;
    [
        /* U */ [O, I, O, O, O, O, O, O, O, O, O],
        /* C */ [O, O, I, O, O, O, O, O, I, O, I],
        /* R */ [O, O, O, I, I, O, I, O, I, O, O],
        /* P */ [O, O, I, O, O, O, O, O, O, O, O],
        /* Y */ [O, O, O, O, O, I, I, O, I, O, O],
        /* S */ [O, O, O, O, I, O, O, O, O, O, O],
        /* W */ [O, O, O, O, O, O, O, I, I, O, O],
        /* D */ [O, O, O, O, O, O, O, O, I, I, O],
        /* X */ [O, O, O, O, O, O, O, O, I, I, O],
        /* E */ [O, O, O, O, O, O, O, O, O, O, I],
        /* N */ [O, O, O, O, O, O, O, O, O, O, O],
    ]
};

/// A command applied to a job (QEMU's `JobVerb`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobVerb {
    /// `*-cancel`.
    Cancel,
    /// `*-pause`.
    Pause,
    /// `*-resume`.
    Resume,
    /// `block-job-set-speed`.
    SetSpeed,
    /// `*-complete`.
    Complete,
    /// `*-finalize`.
    Finalize,
    /// `*-dismiss`.
    Dismiss,
    /// `block-job-change`.
    Change,
}

impl JobVerb {
    /// The spelling used in QEMU's error messages.
    pub fn as_str(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Pause => "pause",
            JobVerb::Resume => "resume",
            JobVerb::SetSpeed => "set-speed",
            JobVerb::Complete => "complete",
            JobVerb::Finalize => "finalize",
            JobVerb::Dismiss => "dismiss",
            JobVerb::Change => "change",
        }
    }

    /// Whether QEMU's verb table accepts this verb in `status`.
    pub fn allowed_in(self, status: JobStatus) -> bool {
        use JobStatus::*;
        match self {
            JobVerb::Cancel => matches!(
                status,
                Created | Running | Paused | Ready | Standby | Waiting | Pending
            ),
            JobVerb::Pause | JobVerb::Resume | JobVerb::SetSpeed | JobVerb::Change => {
                matches!(status, Created | Running | Paused | Ready | Standby)
            }
            JobVerb::Complete => matches!(status, Ready | Standby),
            JobVerb::Finalize => status == Pending,
            JobVerb::Dismiss => status == Concluded,
        }
    }
}

impl fmt::Display for JobVerb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_table_matches_qemu() {
        use JobStatus::*;
        let allowed: &[(JobStatus, &[JobStatus])] = &[
            (Undefined, &[Created]),
            (Created, &[Running, Aborting, Null]),
            (Running, &[Paused, Ready, Waiting, Aborting]),
            (Paused, &[Running]),
            (Ready, &[Standby, Waiting, Aborting]),
            (Standby, &[Ready]),
            (Waiting, &[Pending, Aborting]),
            (Pending, &[Aborting, Concluded]),
            (Aborting, &[Aborting, Concluded]),
            (Concluded, &[Null]),
            (Null, &[]),
        ];
        for (from, tos) in allowed {
            for to in JobStatus::ALL {
                assert_eq!(from.can_transition(to), tos.contains(&to), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn verb_table_matches_qemu() {
        use JobStatus::*;
        assert!(JobVerb::Cancel.allowed_in(Pending));
        assert!(!JobVerb::Cancel.allowed_in(Concluded));
        assert!(JobVerb::Pause.allowed_in(Standby));
        assert!(!JobVerb::Pause.allowed_in(Waiting));
        assert!(JobVerb::Complete.allowed_in(Ready));
        assert!(!JobVerb::Complete.allowed_in(Running));
        assert!(JobVerb::Finalize.allowed_in(Pending));
        assert!(!JobVerb::Finalize.allowed_in(Running));
        assert!(JobVerb::Dismiss.allowed_in(Concluded));
        assert!(!JobVerb::Dismiss.allowed_in(Null));
        for s in JobStatus::ALL {
            assert_eq!(
                JobVerb::SetSpeed.allowed_in(s),
                matches!(s, Created | Running | Paused | Ready | Standby)
            );
        }
    }
}
