//! The block-stream job: copy into an image everything its backing chain provides above a
//! base, then drop the copied layers from the chain.
//!
//! # What is copied
//! For every range the top image does not allocate, if some layer between the top's backing
//! and `bottom` (inclusive; everything below `bottom` is the new base) allocates it, the
//! guest-visible bytes are copied into the top: ranges that read as zeroes become zero
//! clusters (no data written), the rest is read through the chain and written. Ranges the top
//! already has, or that only the base provides, are skipped; progress counts them too (as
//! QEMU's does), so `offset == len` at the end.
//!
//! # Parallelism
//! QEMU copies one 512 KiB chunk at a time. Here the main loop plans chunks (metadata queries
//! only) and keeps up to [`StreamConfig::parallel`] chunk copies in flight, each
//! [`StreamConfig::chunk_size`] bytes aligned to the top's clusters, so a high-latency backing
//! (NBD over a network) streams at bandwidth rather than at one round trip per chunk.
//! While a guest is doing I/O and the chain being copied is local, only
//! [`StreamConfig::busy_parallel`] copies are in flight: local copies compete with the guest
//! for the same CPUs and disks, and the guest's latency comes first.
//!
//! # Guest requests first
//! The copies run with background priority ([`diskstream_block::priority`]): a remote driver
//! (NBD client, HTTP) sends a guest's request (its read, its copy-on-read fetch) ahead of the
//! job's queued ones and keeps slots for it. Over a remote chain the job also adds no copy
//! while a guest request waits on a remote server (the copies in flight go on, and one is
//! always in flight); with the guest idle it runs at full speed.
//!
//! # Never clobbering guest data
//! Copies go through [`BlockNode::write_if_unallocated`] / [`BlockNode::zero_if_unallocated`]:
//! the driver re-checks allocation per cluster under its metadata lock and in-flight tokens,
//! so a guest write that lands before the copy wins, and one that lands after waits for the
//! copy and overwrites it (see the qcow2 driver's module documentation).
//!
//! # Crash safety
//! Before finalization the chain is always valid: the copies are bytes the chain already
//! shows. Finalization flushes the top (data and metadata), rewrites the backing pointer in
//! the header (which itself flushes before and after), and flushes again; only then is the
//! job reported complete. QEMU 10 omits the first flush and can lose the streamed data on a
//! crash right after `BLOCK_JOB_COMPLETED`.
//!
//! # Pause, cancel, errors
//! Before each chunk the loop honours the speed limit (its wait is a pause point); a pause or
//! cancel first lets the chunks in flight finish, so the job stops at a safe point. A failed
//! chunk goes through the on-error policy: `report` fails the job, `ignore` goes on (the job
//! still fails at the end), `stop` pauses the job and retries the chunk on resume. Errors are
//! reported as reads, as QEMU's stream does.

use crate::error::JobFailure;
use crate::job::{ErrorAction, IoOperation, Job, JobDriver};
use async_trait::async_trait;
use diskstream_block::image::chain_layers;
use diskstream_block::node::{same_node, Allocation, BlockNode};
use diskstream_block::status::{allocated_above, map_extent};
use diskstream_block::{foreground, priority, BlockError};
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::task::JoinSet;

/// Tuning of the copy loop.
#[derive(Clone, Copy, Debug)]
pub struct StreamConfig {
    /// Bytes per chunk (rounded to the top's cluster size).
    pub chunk_size: u64,
    /// Chunks in flight at once.
    pub parallel: usize,
    /// Chunks in flight at once while a guest is doing I/O (see
    /// [`diskstream_block::foreground`]) and the data comes from local storage: the copies
    /// then compete with the guest for CPUs and disks, and the guest comes first. Copies from
    /// a remote backing (NBD, HTTP) mostly wait on the network and keep [`Self::parallel`].
    pub busy_parallel: usize,
    /// Flush the top (data and metadata) at most this often while copying, so a daemon killed
    /// mid-stream keeps what it copied up to the last checkpoint and a new stream over the same
    /// image (migration after a destination restart) does not fetch it again. `None`: only at
    /// completion, as QEMU.
    pub checkpoint: Option<std::time::Duration>,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            chunk_size: 1 << 20,
            parallel: 8,
            busy_parallel: 1,
            checkpoint: Some(std::time::Duration::from_secs(1)),
        }
    }
}

/// Callbacks into whoever owns the node graph (the QMP monitor).
#[async_trait]
pub trait StreamHooks: Send + Sync {
    /// The top's backing link was rewritten on disk (and in the top node) to `new_backing`;
    /// `recorded` is the name now in the header.
    async fn backing_changed(
        &self,
        _new_backing: Option<Arc<dyn BlockNode>>,
        _recorded: Option<String>,
    ) {
    }
    /// The job is over (success, failure or cancel); called exactly once.
    async fn clean(&self) {}
}

/// Hooks that do nothing (library use, tests).
pub struct NoHooks;

#[async_trait]
impl StreamHooks for NoHooks {}

/// A block-stream job.
pub struct StreamJob {
    top: Arc<dyn BlockNode>,
    bottom: Arc<dyn BlockNode>,
    backing_file: Option<String>,
    config: StreamConfig,
    hooks: Arc<dyn StreamHooks>,
}

/// A range to copy; `zero` ranges become zero clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CopyRange {
    offset: u64,
    len: u64,
    zero: bool,
}

type ChunkResult = (u64, u64, Result<u64, BlockError>);

impl StreamJob {
    /// Stream into `top` every layer from its backing down to `bottom` (inclusive). With
    /// `bottom == top` nothing is copied (the backing already is the base). At completion the
    /// top's backing becomes `bottom`'s backing as it is then; the header records
    /// `backing_file` if given, else that node's file name, with its format.
    pub fn new(
        top: Arc<dyn BlockNode>,
        bottom: Arc<dyn BlockNode>,
        backing_file: Option<String>,
        config: StreamConfig,
        hooks: Arc<dyn StreamHooks>,
    ) -> StreamJob {
        StreamJob {
            top,
            bottom,
            backing_file,
            config,
            hooks,
        }
    }
}

/// Which parts of `[off, off+len)` must be copied into `top` from `backing`, stopping at
/// `limit` (exclusive; `None`: the whole chain).
async fn plan_copy(
    top: &Arc<dyn BlockNode>,
    backing: &Arc<dyn BlockNode>,
    limit: Option<&Arc<dyn BlockNode>>,
    off: u64,
    len: u64,
) -> Result<Vec<CopyRange>, BlockError> {
    let mut out: Vec<CopyRange> = Vec::new();
    let end = off + len;
    let mut pos = off;
    while pos < end {
        let st = top.block_status(pos, end - pos).await?;
        let seg_end = pos + st.len;
        if st.alloc != Allocation::Unallocated {
            pos = seg_end;
            continue;
        }
        while pos < seg_end {
            let bsize = backing.size();
            if pos >= bsize {
                // Past the backing's end the top reads zeroes whatever the base is.
                pos = seg_end;
                break;
            }
            let n = seg_end.min(bsize) - pos;
            let (alloc, m) = allocated_above(backing, limit, pos, n).await?;
            if !alloc {
                pos += m;
                continue;
            }
            let e = map_extent(backing, pos, m).await?;
            let r = CopyRange {
                offset: pos,
                len: e.length,
                zero: e.zero,
            };
            match out.last_mut() {
                Some(last) if last.zero == r.zero && last.offset + last.len == r.offset => {
                    last.len += r.len
                }
                _ => out.push(r),
            }
            pos += e.length;
        }
    }
    Ok(out)
}

impl StreamJob {
    fn harvest(
        job: &Job,
        res: Result<ChunkResult, tokio::task::JoinError>,
        retry: &mut VecDeque<(u64, u64)>,
        failure: &mut Option<JobFailure>,
        stop_issuing: &mut bool,
    ) {
        let (off, n, r) = match res {
            Ok(v) => v,
            Err(e) => {
                // A copy task panicked: fail the job rather than lose track of a range.
                tracing::error!(job = job.id(), "stream copy task failed: {e}");
                failure.get_or_insert(JobFailure::from_errno(5));
                *stop_issuing = true;
                return;
            }
        };
        Self::chunk_done(job, off, n, r, retry, failure, stop_issuing);
    }

    fn chunk_done(
        job: &Job,
        off: u64,
        n: u64,
        r: Result<u64, BlockError>,
        retry: &mut VecDeque<(u64, u64)>,
        failure: &mut Option<JobFailure>,
        stop_issuing: &mut bool,
    ) {
        match r {
            Ok(_) => job.progress_update(n),
            Err(e) => {
                tracing::warn!(job = job.id(), offset = off, "stream chunk failed: {e}");
                match job.error_action(e.errno(), IoOperation::Read) {
                    ErrorAction::Report => {
                        failure.get_or_insert(JobFailure::from_block(&e));
                        *stop_issuing = true;
                    }
                    ErrorAction::Ignore => {
                        failure.get_or_insert(JobFailure::from_block(&e));
                        job.progress_update(n);
                    }
                    ErrorAction::Stop => retry.push_back((off, n)),
                }
            }
        }
    }
}

async fn copy_ranges(
    top: Arc<dyn BlockNode>,
    backing: Arc<dyn BlockNode>,
    ranges: Vec<CopyRange>,
) -> Result<u64, BlockError> {
    let mut written = 0;
    for r in ranges {
        if r.zero {
            written += top.zero_if_unallocated(r.offset, r.len).await?;
        } else {
            // The backing appends its bytes to an empty buffer (a driver over one protocol
            // range reads straight into it, nothing zero-filled first) and the top writes
            // from it as it is: no user-space copy of the data here.
            let len = r.len as usize;
            let avail = backing.size().saturating_sub(r.offset).min(r.len) as usize;
            let mut buf = Vec::with_capacity(len);
            if avail > 0 {
                buf = backing.read_append(r.offset, buf, avail).await?;
            }
            buf.resize(len, 0);
            written += top.write_if_unallocated_owned(r.offset, buf).await?.0;
        }
    }
    Ok(written)
}

#[async_trait]
impl JobDriver for StreamJob {
    async fn run(&self, job: &Arc<Job>) -> Result<(), JobFailure> {
        if same_node(&self.top, &self.bottom) {
            return Ok(());
        }
        let Some(backing) = self.top.backing() else {
            return Ok(());
        };
        let len = self.top.size();
        job.progress_set_total(len);
        let cluster = self.top.cluster_size().unwrap_or(65536).max(512);
        let chunk = (self.config.chunk_size / cluster).max(1) * cluster;
        let parallel = self.config.parallel.max(1);
        let busy_parallel = self.config.busy_parallel.clamp(1, parallel);
        // Copies from a remote layer wait on the network, not on the guest's resources.
        let remote = chain_is_remote(&backing, &self.bottom);
        let mut next = 0u64;
        let mut retry: VecDeque<(u64, u64)> = VecDeque::new();
        let mut inflight: JoinSet<ChunkResult> = JoinSet::new();
        let mut failure: Option<JobFailure> = None;
        let mut stop_issuing = false;
        let mut last_checkpoint = tokio::time::Instant::now();
        let mut copied_at_checkpoint = job.progress().0;
        loop {
            if !inflight.is_empty() {
                job.settled();
            }
            if let Some(every) = self.config.checkpoint {
                let copied = job.progress().0;
                if last_checkpoint.elapsed() >= every && copied != copied_at_checkpoint {
                    // Copies that landed become durable; those in flight wait for the next one.
                    if let Err(e) = self.top.flush().await {
                        tracing::warn!(job = job.id(), "stream checkpoint flush failed: {e}");
                    }
                    last_checkpoint = tokio::time::Instant::now();
                    copied_at_checkpoint = copied;
                }
            }
            if job.is_cancelled() || job.pause_requested() || stop_issuing {
                // A safe point: let the copies in flight land first.
                while let Some(r) = inflight.join_next().await {
                    Self::harvest(job, r, &mut retry, &mut failure, &mut stop_issuing);
                }
                if job.is_cancelled() || stop_issuing {
                    break;
                }
                if job.pause_requested() {
                    job.pause_point().await;
                }
                continue;
            }
            if retry.is_empty() && next >= len {
                match inflight.join_next().await {
                    Some(r) => {
                        Self::harvest(job, r, &mut retry, &mut failure, &mut stop_issuing);
                        continue;
                    }
                    None => break,
                }
            }
            let in_flight_max = if !remote && foreground::busy(foreground::DEFAULT_WINDOW) {
                busy_parallel
            } else {
                parallel
            };
            if inflight.len() >= in_flight_max {
                tokio::select! {
                    Some(r) = inflight.join_next() => {
                        Self::harvest(job, r, &mut retry, &mut failure, &mut stop_issuing);
                    }
                    _ = job.wake_notified() => {}
                }
                continue;
            }
            if remote && !inflight.is_empty() && priority::remote_pending() > 0 {
                // A guest request (a read, its copy-on-read fetch) waits on a remote server:
                // add no copy in front of it until it is answered; the copies in flight go on.
                tokio::select! {
                    Some(r) = inflight.join_next() => {
                        Self::harvest(job, r, &mut retry, &mut failure, &mut stop_issuing);
                    }
                    _ = priority::remote_quiet() => {}
                    _ = job.wake_notified() => {}
                }
                continue;
            }
            let delay = job.ratelimit_delay();
            if !delay.is_zero() {
                job.settled();
                if inflight.is_empty() {
                    job.set_busy(false);
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    Some(r) = inflight.join_next(), if !inflight.is_empty() => {
                        Self::harvest(job, r, &mut retry, &mut failure, &mut stop_issuing);
                    }
                    _ = job.wake_notified() => {}
                }
                job.set_busy(true);
                continue;
            }
            // Under a speed limit a chunk is at most one slice's quota (but at least a
            // cluster), so the burst before the limiter takes over stays small.
            let chunk = match job.speed() {
                0 => chunk,
                s => (s / 10 / cluster * cluster).clamp(cluster, chunk),
            };
            let (off, n) = match retry.pop_front() {
                Some(r) => r,
                None => {
                    let n = chunk.min(len - next);
                    let r = (next, n);
                    next += n;
                    r
                }
            };
            let limit = self.bottom.backing();
            if job.speed() == 0 {
                // Unlimited: plan inside the copy task, so the block-status queries of the
                // chunks in flight overlap too (over a high-latency NBD backing they cost a
                // round trip each; planned one by one here they were the bottleneck). Under a
                // speed limit the plan stays here: its byte count feeds the limiter before the
                // next chunk is issued.
                let (top, backing, job) =
                    (Arc::clone(&self.top), Arc::clone(&backing), Arc::clone(job));
                inflight.spawn(priority::background(async move {
                    let r = match plan_copy(&top, &backing, limit.as_ref(), off, n).await {
                        Ok(ranges) => {
                            job.processed_bytes(ranges.iter().map(|r| r.len).sum());
                            copy_ranges(top, backing, ranges).await
                        }
                        Err(e) => Err(e),
                    };
                    (off, n, r)
                }));
                continue;
            }
            match plan_copy(&self.top, &backing, limit.as_ref(), off, n).await {
                Err(e) => Self::chunk_done(
                    job,
                    off,
                    n,
                    Err(e),
                    &mut retry,
                    &mut failure,
                    &mut stop_issuing,
                ),
                Ok(ranges) if ranges.is_empty() => job.progress_update(n),
                Ok(ranges) => {
                    job.processed_bytes(ranges.iter().map(|r| r.len).sum());
                    let top = Arc::clone(&self.top);
                    let backing = Arc::clone(&backing);
                    inflight.spawn(priority::background(async move {
                        (off, n, copy_ranges(top, backing, ranges).await)
                    }));
                }
            }
        }
        match failure {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }

    async fn prepare(&self) -> Result<(), JobFailure> {
        let (new_base, recorded) =
            finish_stream(&self.top, &self.bottom, self.backing_file.as_deref())
                .await
                .map_err(|e| {
                    tracing::error!("stream: cannot change the backing file: {e}");
                    JobFailure::from_block(&e)
                })?;
        self.hooks.backing_changed(new_base, recorded).await;
        Ok(())
    }

    async fn clean(&self) {
        self.hooks.clean().await;
    }
}

/// Whether any layer from `from` down to `bottom` (inclusive) keeps its data on a remote
/// protocol.
fn chain_is_remote(from: &Arc<dyn BlockNode>, bottom: &Arc<dyn BlockNode>) -> bool {
    for n in chain_layers(from) {
        if n.remote() {
            return true;
        }
        if same_node(&n, bottom) {
            return false;
        }
    }
    false
}

/// The crash-safe end of a stream: flush `top` (data and metadata), rewrite its backing
/// pointer to `bottom`'s backing (recording `backing_file` if given, else that node's file
/// name, with its format; no backing if there is none), flush again, and attach the new
/// backing node. Returns the new backing node and the name recorded in the header.
pub async fn finish_stream(
    top: &Arc<dyn BlockNode>,
    bottom: &Arc<dyn BlockNode>,
    backing_file: Option<&str>,
) -> Result<(Option<Arc<dyn BlockNode>>, Option<String>), BlockError> {
    let new_base = if same_node(top, bottom) {
        top.backing()
    } else {
        bottom.backing()
    };
    // 1. Everything copied (data, L2, refcounts) is durable before the header stops pointing
    //    at the layers that held it.
    top.flush().await?;
    let name = new_base.as_ref().map(|b| {
        (
            backing_file
                .map(str::to_string)
                .unwrap_or_else(|| b.filename().to_string()),
            Some(b.format_name().to_string()),
        )
    });
    let recorded = name.as_ref().map(|(n, _)| n.clone());
    // 2. The header rewrite (every format's set_backing_file flushes before and after it).
    top.set_backing_file(name).await?;
    top.set_backing_node(new_base.clone());
    // 3. And once more, so nothing the header depends on is left in a cache.
    top.flush().await?;
    Ok((new_base, recorded))
}

/// One step of the original `block_stream` interface (management throttles by itself): find
/// the first range at or after `from` that must be copied into `top` (from its backing down to
/// `bottom`), copy one chunk of up to `chunk` bytes there, and return the end offset of what
/// was copied; `None` when nothing is left to copy.
pub async fn stream_step(
    top: &Arc<dyn BlockNode>,
    bottom: &Arc<dyn BlockNode>,
    from: u64,
    chunk: u64,
) -> Result<Option<u64>, BlockError> {
    if same_node(top, bottom) {
        return Ok(None);
    }
    let Some(backing) = top.backing() else {
        return Ok(None);
    };
    let len = top.size();
    let cluster = top.cluster_size().unwrap_or(65536).max(512);
    let chunk = (chunk / cluster).max(1) * cluster;
    let limit = bottom.backing();
    let mut pos = from / cluster * cluster;
    while pos < len {
        let n = (64 * chunk).min(len - pos);
        let ranges = plan_copy(top, &backing, limit.as_ref(), pos, n).await?;
        if let Some(first) = ranges.first() {
            let start = first.offset / cluster * cluster;
            let end = (start + chunk).min(len);
            let ranges = plan_copy(top, &backing, limit.as_ref(), start, end - start).await?;
            copy_ranges(Arc::clone(top), backing, ranges).await?;
            return Ok(Some(end));
        }
        pos += n;
    }
    Ok(None)
}
