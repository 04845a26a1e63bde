//! Jobs: long-running background operations (stream today; commit and mirror later) with
//! QEMU's lifecycle, as management software expects it.
//!
//! A [`Job`] owns its state under a short synchronous lock and runs its [`JobDriver`] on a
//! tokio task. Commands ([`Job::user_pause`], [`Job::cancel`], ...) check QEMU's verb table,
//! change the state and, where QEMU does the same work synchronously, wait for the job to
//! reach the resulting state, so the events a command causes are emitted before its reply
//! (as QSD does for pause, cancel, finalize and dismiss).
//!
//! Lifecycle (every job is a transaction of one): `created → running` (⇄ `paused` at pause
//! points) `→ waiting → pending` (`BLOCK_JOB_PENDING` when finalization is manual) `→`
//! prepare/commit/clean `→ BLOCK_JOB_COMPLETED → concluded → null` (the last step only when
//! auto-dismiss). A failure or cancel goes `→ aborting →` abort/clean `→ BLOCK_JOB_CANCELLED`
//! or `BLOCK_JOB_COMPLETED{error} → concluded (→ null)`.
//!
//! Pausing is a counter: the job stops only at a pause point ([`Job::pause_point`]). Errors go
//! through [`Job::error_action`], which applies the on-error policy: `stop` pauses the job as
//! if the user had, with `io-status` set, and `resume` retries.

use crate::error::{JobError, JobFailure, ENOSPC};
use crate::ratelimit::RateLimit;
use crate::state::{JobStatus, JobVerb};
use async_trait::async_trait;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

/// The kind of a job (QAPI `JobType`); only what diskstream implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobType {
    /// `block-stream`.
    Stream,
    /// `block-commit` (intermediate or active).
    Commit,
    /// `blockdev-mirror` / `drive-mirror`.
    Mirror,
}

impl JobType {
    /// The QAPI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            JobType::Stream => "stream",
            JobType::Commit => "commit",
            JobType::Mirror => "mirror",
        }
    }
}

/// What to do when the job's I/O fails (QAPI `BlockdevOnError`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OnError {
    /// Fail the job.
    #[default]
    Report,
    /// Note the error, go on, fail at the end.
    Ignore,
    /// Stop on ENOSPC, report anything else.
    Enospc,
    /// Pause the job; `resume` retries.
    Stop,
    /// Same as `enospc` for jobs.
    Auto,
}

impl OnError {
    /// Parse the QAPI spelling.
    pub fn parse(s: &str) -> Option<OnError> {
        Some(match s {
            "report" => OnError::Report,
            "ignore" => OnError::Ignore,
            "enospc" => OnError::Enospc,
            "stop" => OnError::Stop,
            "auto" => OnError::Auto,
            _ => return None,
        })
    }
}

/// The decision taken for one failed request (QAPI `BlockErrorAction`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorAction {
    /// The job fails.
    Report,
    /// The job goes on.
    Ignore,
    /// The job pauses.
    Stop,
}

impl ErrorAction {
    /// The QAPI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorAction::Report => "report",
            ErrorAction::Ignore => "ignore",
            ErrorAction::Stop => "stop",
        }
    }
}

/// The job's I/O status (QAPI `BlockDeviceIoStatus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IoStatus {
    /// No stop on error is pending.
    #[default]
    Ok,
    /// Stopped by an I/O error.
    Failed,
    /// Stopped by ENOSPC.
    Nospace,
}

impl IoStatus {
    /// The QAPI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            IoStatus::Ok => "ok",
            IoStatus::Failed => "failed",
            IoStatus::Nospace => "nospace",
        }
    }
}

/// Which direction a failed request went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOperation {
    /// A read.
    Read,
    /// A write.
    Write,
}

impl IoOperation {
    /// The QAPI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            IoOperation::Read => "read",
            IoOperation::Write => "write",
        }
    }
}

/// Events a job emits, in the order QEMU emits them; the QMP layer serialises them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobEvent {
    /// `JOB_STATUS_CHANGE`.
    StatusChange {
        /// Job id.
        id: String,
        /// New status.
        status: JobStatus,
    },
    /// `BLOCK_JOB_COMPLETED` (success, or failure with `error`).
    Completed {
        /// Job type.
        job_type: JobType,
        /// Job id (QMP calls it `device`).
        device: String,
        /// Progress total.
        len: u64,
        /// Progress done.
        offset: u64,
        /// Speed limit.
        speed: u64,
        /// Failure text.
        error: Option<String>,
    },
    /// `BLOCK_JOB_CANCELLED`.
    Cancelled {
        /// Job type.
        job_type: JobType,
        /// Job id.
        device: String,
        /// Progress total.
        len: u64,
        /// Progress done.
        offset: u64,
        /// Speed limit.
        speed: u64,
    },
    /// `BLOCK_JOB_ERROR`.
    Error {
        /// Job id.
        device: String,
        /// Direction of the failed request.
        operation: IoOperation,
        /// Decision taken.
        action: ErrorAction,
    },
    /// `BLOCK_JOB_READY`: a mirror-like job is in sync and may be completed.
    Ready {
        /// Job type.
        job_type: JobType,
        /// Job id.
        device: String,
        /// Progress total.
        len: u64,
        /// Progress done.
        offset: u64,
        /// Speed limit.
        speed: u64,
    },
    /// `BLOCK_JOB_PENDING` (manual finalization only).
    Pending {
        /// Job type.
        job_type: JobType,
        /// Job id.
        id: String,
    },
}

/// Where job events go (the QMP monitor broadcasts them to every negotiated client).
pub trait EventSink: Send + Sync {
    /// Deliver one event; must not block.
    fn emit(&self, event: JobEvent);
}

/// Options common to every job.
#[derive(Clone, Debug)]
pub struct JobOptions {
    /// Finalize as soon as the work is done (else wait for `job-finalize`).
    pub auto_finalize: bool,
    /// Disappear once concluded (else wait for `job-dismiss`).
    pub auto_dismiss: bool,
    /// Initial speed limit in bytes per second (0 = unlimited).
    pub speed: u64,
    /// Error policy.
    pub on_error: OnError,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            auto_finalize: true,
            auto_dismiss: true,
            speed: 0,
            on_error: OnError::Report,
        }
    }
}

/// The work of a job; the framework calls these in QEMU's order.
#[async_trait]
pub trait JobDriver: Send + Sync + 'static {
    /// The job's main loop. It must call [`Job::pause_point`] (directly or through
    /// [`Job::ratelimit_sleep`]) regularly and stop early when [`Job::is_cancelled`].
    async fn run(&self, job: &Arc<Job>) -> Result<(), JobFailure>;
    /// Apply the job's result (graph changes) at finalization; a failure aborts the job.
    async fn prepare(&self) -> Result<(), JobFailure> {
        Ok(())
    }
    /// After a successful prepare.
    async fn commit(&self) {}
    /// After a failure or cancel.
    async fn abort(&self) {}
    /// Always last: release what the job held.
    async fn clean(&self) {}
    /// Whether the job has a `complete` step (mirror-like jobs).
    fn can_complete(&self) -> bool {
        false
    }
    /// `complete` was accepted (the job is ready): finish with the pivot.
    fn request_complete(&self) {}
    /// A non-forced cancel of a ready job: finish *without* the pivot (QEMU's soft cancel;
    /// the job then ends as completed).
    fn request_soft_cancel(&self) {}
    /// `block-job-change` with a mirror copy mode; QEMU's texts on refusal.
    fn change_copy_mode(&self, _mode: &str) -> Result<(), String> {
        Err("Job type does not support change".into())
    }
    /// Mirror jobs: whether guest writes are mirrored synchronously and the target is in
    /// sync (`actively-synced`); `None` for other jobs.
    fn actively_synced(&self) -> Option<bool> {
        None
    }
}

/// A snapshot of a job for the query commands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobInfo {
    /// Job id.
    pub id: String,
    /// Job type.
    pub job_type: JobType,
    /// Status.
    pub status: JobStatus,
    /// Whether the job is doing something (false while sleeping or paused).
    pub busy: bool,
    /// Whether a pause is requested or in effect.
    pub paused: bool,
    /// Speed limit.
    pub speed: u64,
    /// I/O status.
    pub io_status: IoStatus,
    /// Progress done.
    pub current: u64,
    /// Progress total.
    pub total: u64,
    /// Failure text, once failed or cancelled.
    pub error: Option<String>,
    /// Auto-finalize flag.
    pub auto_finalize: bool,
    /// Auto-dismiss flag.
    pub auto_dismiss: bool,
    /// Mirror jobs: `actively-synced`.
    pub actively_synced: Option<bool>,
}

struct JobState {
    status: JobStatus,
    pause_count: u32,
    user_paused: bool,
    /// Stopped at a pause point; the status to return to.
    paused_from: Option<JobStatus>,
    busy: bool,
    cancelled: bool,
    /// A soft cancel (non-forced, after READY) was requested.
    soft_cancelled: bool,
    error: Option<JobFailure>,
    current: u64,
    total: u64,
    limit: RateLimit,
    io_status: IoStatus,
    auto_finalize: bool,
    auto_dismiss: bool,
    on_error: OnError,
    /// `run()` returned.
    deferred: bool,
    /// The driver reached its first wait (or the job ended).
    settled: bool,
}

/// A job; shared as `Arc<Job>` between its task, the manager and the monitor.
pub struct Job {
    id: String,
    job_type: JobType,
    state: Mutex<JobState>,
    wake: Notify,
    changed: watch::Sender<u64>,
    sink: Arc<dyn EventSink>,
    driver: Arc<dyn JobDriver>,
    lifecycle: tokio::sync::Mutex<()>,
}

/// How long a command waits for the state it caused (pause reached, cancel finished) before
/// replying anyway.
const COMMAND_WAIT: Duration = Duration::from_secs(30);

/// QEMU's `id_wellformed`: a letter first, then letters, digits, `-`, `.` and `_`.
pub fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

impl Job {
    fn lock(&self) -> MutexGuard<'_, JobState> {
        // A poisoned lock means a panic in a state update; the state is still the last one
        // written, which is the best we can report.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The job's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The job's type.
    pub fn job_type(&self) -> JobType {
        self.job_type
    }

    /// The current status.
    pub fn status(&self) -> JobStatus {
        self.lock().status
    }

    /// A snapshot for the query commands.
    pub fn info(&self) -> JobInfo {
        let st = self.lock();
        JobInfo {
            id: self.id.clone(),
            job_type: self.job_type,
            status: st.status,
            busy: st.busy,
            paused: st.pause_count > 0,
            speed: st.limit.speed(),
            io_status: st.io_status,
            current: st.current,
            total: st.total,
            error: st.error.as_ref().map(|e| e.message.clone()),
            auto_finalize: st.auto_finalize,
            auto_dismiss: st.auto_dismiss,
            actively_synced: self.driver.actively_synced(),
        }
    }

    fn transition(&self, st: &mut JobState, to: JobStatus) {
        let from = st.status;
        if !from.can_transition(to) {
            // Unreachable by construction; keep running rather than abort the daemon.
            tracing::error!(job = %self.id, %from, %to, "job state transition outside QEMU's table");
            debug_assert!(false, "job transition {from} -> {to}");
        }
        st.status = to;
        if from != to {
            self.sink.emit(JobEvent::StatusChange {
                id: self.id.clone(),
                status: to,
            });
        }
        self.changed.send_modify(|v| *v += 1);
    }

    fn apply_verb(&self, st: &JobState, verb: JobVerb) -> Result<(), JobError> {
        if verb.allowed_in(st.status) {
            Ok(())
        } else {
            Err(JobError::VerbRejected {
                id: self.id.clone(),
                state: st.status,
                verb,
            })
        }
    }

    /// Wait (bounded) until `done` holds for the state.
    async fn wait_for(&self, done: impl Fn(&JobState) -> bool) {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + COMMAND_WAIT;
        loop {
            if done(&self.lock()) {
                return;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
    }

    // ----- commands -----

    /// `block-job-pause` / `job-pause`: request a pause and wait until the job reaches its
    /// next pause point (as QSD, whose sleeping jobs pause before the reply).
    pub async fn user_pause(&self) -> Result<(), JobError> {
        {
            let mut st = self.lock();
            self.apply_verb(&st, JobVerb::Pause)?;
            if st.user_paused {
                return Err(JobError::AlreadyPaused);
            }
            st.user_paused = true;
            st.pause_count += 1;
        }
        self.wake.notify_one();
        self.wait_for(|st| {
            st.paused_from.is_some()
                || st.deferred
                || st.pause_count == 0
                || !matches!(st.status, JobStatus::Running | JobStatus::Ready)
        })
        .await;
        Ok(())
    }

    /// `block-job-resume` / `job-resume`: undo a user pause (or an error stop); the job
    /// continues (and retries what failed) and `io-status` returns to `ok`.
    pub fn user_resume(&self) -> Result<(), JobError> {
        {
            let mut st = self.lock();
            if !st.user_paused {
                return Err(JobError::NotPaused);
            }
            self.apply_verb(&st, JobVerb::Resume)?;
            st.user_paused = false;
            st.io_status = IoStatus::Ok;
            self.release_pause(&mut st);
        }
        self.wake.notify_one();
        Ok(())
    }

    fn release_pause(&self, st: &mut JobState) {
        st.pause_count = st.pause_count.saturating_sub(1);
        if st.pause_count == 0 {
            if let Some(back) = st.paused_from.take() {
                st.busy = true;
                self.transition(st, back);
            }
        }
    }

    /// `block-job-set-speed`: change the limit now; a sleeping job re-evaluates its wait.
    pub fn set_speed(&self, speed: i64) -> Result<(), JobError> {
        {
            let mut st = self.lock();
            self.apply_verb(&st, JobVerb::SetSpeed)?;
            if speed < 0 {
                return Err(JobError::NegativeSpeed);
            }
            st.limit.set_speed(speed as u64);
        }
        self.wake.notify_one();
        Ok(())
    }

    /// `block-job-complete` / `job-complete`.
    pub fn complete(&self) -> Result<(), JobError> {
        {
            let st = self.lock();
            self.apply_verb(&st, JobVerb::Complete)?;
            if st.cancelled || st.soft_cancelled || !self.driver.can_complete() {
                return Err(JobError::CannotComplete(self.id.clone()));
            }
        }
        self.driver.request_complete();
        self.wake.notify_one();
        Ok(())
    }

    /// `block-job-cancel` with `force`: a non-forced cancel of a ready mirror-like job
    /// completes it without the pivot (QEMU's soft cancel, ending in `BLOCK_JOB_COMPLETED`);
    /// anything else is a real cancel. Waits until the job concluded, like QSD.
    pub async fn cancel_with(self: &Arc<Self>, force: bool) -> Result<(), JobError> {
        let soft = {
            let mut st = self.lock();
            self.apply_verb(&st, JobVerb::Cancel)?;
            let soft = !force
                && self.driver.can_complete()
                && matches!(st.status, JobStatus::Ready | JobStatus::Standby);
            if soft && !st.deferred {
                st.soft_cancelled = true;
                if st.user_paused {
                    st.user_paused = false;
                    st.io_status = IoStatus::Ok;
                    self.release_pause(&mut st);
                }
            }
            soft
        };
        if !soft {
            return self.cancel().await;
        }
        self.driver.request_soft_cancel();
        self.wake.notify_one();
        self.wait_for(|st| matches!(st.status, JobStatus::Concluded | JobStatus::Null))
            .await;
        Ok(())
    }

    /// `block-job-change`: switch a mirror's copy mode (verb `change`).
    pub fn change_copy_mode(&self, mode: &str) -> Result<(), String> {
        {
            let st = self.lock();
            self.apply_verb(&st, JobVerb::Change)
                .map_err(|e| e.to_string())?;
        }
        self.driver.change_copy_mode(mode)?;
        Ok(())
    }

    /// Drivers of mirror-like jobs: the target is in sync. `running → ready` and
    /// `BLOCK_JOB_READY` (once).
    pub fn set_ready(&self) {
        let mut st = self.lock();
        if st.status != JobStatus::Running {
            return;
        }
        self.transition(&mut st, JobStatus::Ready);
        self.sink.emit(JobEvent::Ready {
            job_type: self.job_type,
            device: self.id.clone(),
            len: st.total,
            offset: st.current,
            speed: st.limit.speed(),
        });
    }

    /// Whether the job reached READY (it may be in standby now).
    pub fn is_ready(&self) -> bool {
        let st = self.lock();
        matches!(st.status, JobStatus::Ready | JobStatus::Standby)
            || st.paused_from == Some(JobStatus::Ready)
    }

    /// Whether the user paused the job (or an error stopped it).
    pub fn user_paused(&self) -> bool {
        self.lock().user_paused
    }

    /// `block-job-cancel` / `job-cancel`. Jobs without a soft cancel (stream) are always
    /// force-cancelled. Waits until the job concluded, like QSD.
    pub async fn cancel(self: &Arc<Self>) -> Result<(), JobError> {
        let abort_now = {
            let mut st = self.lock();
            self.apply_verb(&st, JobVerb::Cancel)?;
            st.cancelled = true;
            if st.user_paused {
                st.user_paused = false;
                st.io_status = IoStatus::Ok;
                self.release_pause(&mut st);
            }
            matches!(st.status, JobStatus::Pending | JobStatus::Waiting) && st.deferred
        };
        if abort_now {
            let _g = self.lifecycle.lock().await;
            if matches!(self.status(), JobStatus::Pending | JobStatus::Waiting) {
                self.do_abort().await;
            }
        } else {
            self.wake.notify_one();
            self.wait_for(|st| matches!(st.status, JobStatus::Concluded | JobStatus::Null))
                .await;
        }
        Ok(())
    }

    /// `block-job-finalize` / `job-finalize`: apply a pending job's result.
    pub async fn finalize(self: &Arc<Self>) -> Result<(), JobError> {
        let _g = self.lifecycle.lock().await;
        {
            let st = self.lock();
            self.apply_verb(&st, JobVerb::Finalize)?;
        }
        self.do_finalize().await;
        Ok(())
    }

    /// `block-job-dismiss` / `job-dismiss`: forget a concluded job.
    pub fn dismiss(&self) -> Result<(), JobError> {
        let mut st = self.lock();
        self.apply_verb(&st, JobVerb::Dismiss)?;
        self.transition(&mut st, JobStatus::Null);
        Ok(())
    }

    // ----- for drivers -----

    /// Whether the job was cancelled (its loop should stop at the next opportunity).
    pub fn is_cancelled(&self) -> bool {
        self.lock().cancelled
    }

    /// Whether a pause is requested (the driver should quiesce and call [`Job::pause_point`]).
    pub fn pause_requested(&self) -> bool {
        let st = self.lock();
        st.pause_count > 0 && !st.cancelled
    }

    /// A pause point: if a pause is requested, report `paused` (or `standby`) and wait until
    /// resumed or cancelled. The caller must have no I/O in flight.
    pub async fn pause_point(&self) {
        loop {
            let notified = self.wake.notified();
            {
                let mut st = self.lock();
                if st.cancelled || st.pause_count == 0 {
                    if let Some(back) = st.paused_from.take() {
                        self.transition(&mut st, back);
                    }
                    st.busy = true;
                    return;
                }
                if st.paused_from.is_none() {
                    let from = st.status;
                    let to = if from == JobStatus::Ready {
                        JobStatus::Standby
                    } else {
                        JobStatus::Paused
                    };
                    st.paused_from = Some(from);
                    st.busy = false;
                    self.transition(&mut st, to);
                }
            }
            notified.await;
        }
    }

    /// A future that completes when a command wants the job's attention (pause, resume,
    /// cancel, set-speed). Drivers select on it while waiting for I/O or a rate-limit delay.
    pub async fn wake_notified(&self) {
        self.wake.notified().await
    }

    /// The current speed limit (0 = unlimited).
    pub fn speed(&self) -> u64 {
        self.lock().limit.speed()
    }

    /// Mark the job busy or idle (shown as `busy` in query-block-jobs).
    pub fn set_busy(&self, busy: bool) {
        self.lock().busy = busy;
    }

    /// Drivers call this before their first wait (I/O, rate limit): the command that started
    /// the job may then reply (see [`Job::wait_settled`]).
    pub fn settled(&self) {
        let mut st = self.lock();
        if !st.settled {
            st.settled = true;
            drop(st);
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// Wait (bounded) until the job's driver first waited for something, or the job ended.
    pub async fn wait_settled(&self) {
        self.wait_for(|st| {
            st.settled || matches!(st.status, JobStatus::Concluded | JobStatus::Null)
        })
        .await;
    }

    /// How long to wait before issuing the next request under the speed limit.
    pub fn ratelimit_delay(&self) -> Duration {
        let mut st = self.lock();
        if st.cancelled {
            return Duration::ZERO;
        }
        st.limit.calculate_delay(0, Instant::now())
    }

    /// Account `n` bytes moved against the speed limit.
    pub fn processed_bytes(&self, n: u64) {
        self.lock().limit.calculate_delay(n, Instant::now());
    }

    /// QEMU's `block_job_ratelimit_sleep`: sleep until the speed limit allows the next
    /// request, waking early on commands, with a pause point after each sleep.
    pub async fn ratelimit_sleep(&self) {
        loop {
            let d = self.ratelimit_delay();
            if d.is_zero() {
                self.pause_point().await;
                return;
            }
            self.set_busy(false);
            tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = self.wake.notified() => {}
            }
            self.set_busy(true);
            self.pause_point().await;
            if self.is_cancelled() {
                return;
            }
        }
    }

    /// Set the progress total.
    pub fn progress_set_total(&self, total: u64) {
        self.lock().total = total;
    }

    /// Add to the progress total (new work appeared: guest writes a mirror must copy).
    pub fn progress_increase_remaining(&self, n: u64) {
        let mut st = self.lock();
        st.total = st.total.saturating_add(n);
    }

    /// Add to the progress done.
    pub fn progress_update(&self, n: u64) {
        let mut st = self.lock();
        st.current = st.current.saturating_add(n);
        st.total = st.total.max(st.current);
    }

    /// The progress done so far.
    pub fn progress(&self) -> (u64, u64) {
        let st = self.lock();
        (st.current, st.total)
    }

    /// Apply the on-error policy to a failed request (QEMU's `block_job_error_action`):
    /// emits `BLOCK_JOB_ERROR`; on `stop`, pauses the job as a user pause with `io-status`
    /// set, so `resume` retries.
    pub fn error_action(&self, errno: i32, operation: IoOperation) -> ErrorAction {
        let policy = self.lock().on_error;
        self.error_action_with(policy, errno, operation)
    }

    /// [`Job::error_action`] with an explicit policy (mirror: `on-source-error` for reads,
    /// `on-target-error` for writes).
    pub fn error_action_with(
        &self,
        policy: OnError,
        errno: i32,
        operation: IoOperation,
    ) -> ErrorAction {
        let mut st = self.lock();
        let action = match policy {
            OnError::Report => ErrorAction::Report,
            OnError::Ignore => ErrorAction::Ignore,
            OnError::Stop => ErrorAction::Stop,
            OnError::Enospc | OnError::Auto => {
                if errno == ENOSPC {
                    ErrorAction::Stop
                } else {
                    ErrorAction::Report
                }
            }
        };
        self.sink.emit(JobEvent::Error {
            device: self.id.clone(),
            operation,
            action,
        });
        if action == ErrorAction::Stop {
            if !st.user_paused {
                st.user_paused = true;
                st.pause_count += 1;
            }
            st.io_status = if errno == ENOSPC {
                IoStatus::Nospace
            } else {
                IoStatus::Failed
            };
        }
        action
    }

    // ----- lifecycle -----

    async fn completed(self: &Arc<Self>, res: Result<(), JobFailure>) {
        let _g = self.lifecycle.lock().await;
        let ok = {
            let mut st = self.lock();
            st.deferred = true;
            st.busy = false;
            if let Some(back) = st.paused_from.take() {
                self.transition(&mut st, back);
            }
            let res = match res {
                Ok(()) if st.cancelled => Err(JobFailure::cancelled()),
                r => r,
            };
            match res {
                Err(e) => {
                    st.error = Some(e);
                    false
                }
                Ok(()) => {
                    self.transition(&mut st, JobStatus::Waiting);
                    self.transition(&mut st, JobStatus::Pending);
                    if !st.auto_finalize {
                        self.sink.emit(JobEvent::Pending {
                            job_type: self.job_type,
                            id: self.id.clone(),
                        });
                    }
                    true
                }
            }
        };
        if !ok {
            self.do_abort().await;
        } else if self.lock().auto_finalize {
            self.do_finalize().await;
        }
        self.settled();
    }

    async fn do_finalize(&self) {
        match self.driver.prepare().await {
            Ok(()) => {
                self.driver.commit().await;
                self.driver.clean().await;
                let mut st = self.lock();
                self.sink.emit(JobEvent::Completed {
                    job_type: self.job_type,
                    device: self.id.clone(),
                    len: st.total,
                    offset: st.current,
                    speed: st.limit.speed(),
                    error: None,
                });
                self.transition(&mut st, JobStatus::Concluded);
                if st.auto_dismiss {
                    self.transition(&mut st, JobStatus::Null);
                }
            }
            Err(e) => {
                self.lock().error = Some(e);
                self.do_abort().await;
            }
        }
    }

    async fn do_abort(&self) {
        {
            let mut st = self.lock();
            if st.cancelled && st.error.is_none() {
                st.error = Some(JobFailure::cancelled());
            }
            self.transition(&mut st, JobStatus::Aborting);
        }
        self.driver.abort().await;
        self.driver.clean().await;
        let mut st = self.lock();
        let (len, offset, speed) = (st.total, st.current, st.limit.speed());
        if st.cancelled {
            self.sink.emit(JobEvent::Cancelled {
                job_type: self.job_type,
                device: self.id.clone(),
                len,
                offset,
                speed,
            });
        } else {
            self.sink.emit(JobEvent::Completed {
                job_type: self.job_type,
                device: self.id.clone(),
                len,
                offset,
                speed,
                error: st.error.as_ref().map(|e| e.message.clone()),
            });
        }
        self.transition(&mut st, JobStatus::Concluded);
        if st.auto_dismiss {
            self.transition(&mut st, JobStatus::Null);
        }
    }

    /// Wait until the job is concluded or gone (tests and shutdown).
    pub async fn wait_concluded(&self) {
        let mut rx = self.changed.subscribe();
        loop {
            if matches!(self.status(), JobStatus::Concluded | JobStatus::Null) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

/// All jobs of a daemon: id uniqueness, lookup, creation and start.
pub struct JobManager {
    jobs: Mutex<Vec<Arc<Job>>>,
    sink: Arc<dyn EventSink>,
}

impl JobManager {
    /// A manager whose jobs report to `sink`.
    pub fn new(sink: Arc<dyn EventSink>) -> Arc<JobManager> {
        Arc::new(JobManager {
            jobs: Mutex::new(Vec::new()),
            sink,
        })
    }

    fn jobs(&self) -> MutexGuard<'_, Vec<Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Check that `id` may name a new job.
    pub fn check_id(&self, id: &str) -> Result<(), JobError> {
        if !id_wellformed(id) {
            return Err(JobError::InvalidId(id.to_string()));
        }
        if self.find(id).is_some() {
            return Err(JobError::IdInUse(id.to_string()));
        }
        Ok(())
    }

    /// Create a job (state `created`, event emitted); start it with [`JobManager::start`] or
    /// drop it with [`JobManager::early_fail`].
    pub fn create(
        &self,
        id: &str,
        job_type: JobType,
        driver: Arc<dyn JobDriver>,
        opts: &JobOptions,
    ) -> Result<Arc<Job>, JobError> {
        self.check_id(id)?;
        let (changed, _) = watch::channel(0);
        let job = Arc::new(Job {
            id: id.to_string(),
            job_type,
            state: Mutex::new(JobState {
                status: JobStatus::Undefined,
                pause_count: 0,
                user_paused: false,
                paused_from: None,
                busy: false,
                cancelled: false,
                soft_cancelled: false,
                error: None,
                current: 0,
                total: 0,
                limit: RateLimit::new(opts.speed),
                io_status: IoStatus::Ok,
                auto_finalize: opts.auto_finalize,
                auto_dismiss: opts.auto_dismiss,
                on_error: opts.on_error,
                deferred: false,
                settled: false,
            }),
            wake: Notify::new(),
            changed,
            sink: Arc::clone(&self.sink),
            driver,
            lifecycle: tokio::sync::Mutex::new(()),
        });
        {
            let mut st = job.lock();
            job.transition(&mut st, JobStatus::Created);
        }
        let mut jobs = self.jobs();
        jobs.retain(|j| j.status() != JobStatus::Null);
        jobs.push(Arc::clone(&job));
        Ok(job)
    }

    /// A job that failed during setup: `created → null`.
    pub fn early_fail(&self, job: &Arc<Job>) {
        {
            let mut st = job.lock();
            job.transition(&mut st, JobStatus::Null);
        }
        self.jobs().retain(|j| !Arc::ptr_eq(j, job));
    }

    /// Start a created job: `running`, and its driver runs on a new task.
    pub fn start(&self, job: &Arc<Job>) {
        {
            let mut st = job.lock();
            st.busy = true;
            job.transition(&mut st, JobStatus::Running);
        }
        let job = Arc::clone(job);
        tokio::spawn(async move {
            let driver = Arc::clone(&job.driver);
            // A job's copies give way to guest I/O (`diskstream_block::priority`).
            let res = diskstream_block::priority::background(driver.run(&job)).await;
            job.completed(res).await;
        });
    }

    /// The job with this id, unless it is gone.
    pub fn find(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs()
            .iter()
            .find(|j| j.id == id && j.status() != JobStatus::Null)
            .cloned()
    }

    /// Every job not gone, in creation order.
    pub fn list(&self) -> Vec<Arc<Job>> {
        self.jobs()
            .iter()
            .filter(|j| j.status() != JobStatus::Null)
            .cloned()
            .collect()
    }

    /// Shutdown: cancel every job that is not concluded and wait for it (each stops at a
    /// safe point: in-flight copies finish, nothing half-written is left).
    pub async fn cancel_all(&self) {
        for job in self.list() {
            if matches!(job.status(), JobStatus::Concluded | JobStatus::Null) {
                continue;
            }
            let _ = job.cancel().await;
            job.wait_concluded().await;
        }
    }
}
