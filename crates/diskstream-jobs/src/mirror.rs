//! The mirror job (`blockdev-mirror`, `drive-mirror`) and active commit (a mirror of the
//! active layer into its base).
//!
//! # Structure
//! A [`MirrorFilter`] node is put above the source (QEMU's `mirror_top`): every user of the
//! source now writes through it. In `background` copy mode a guest write goes to the source
//! and, *after* it completed, marks its range in the [`DirtyBitmap`]; the job's loop copies
//! dirty chunks (clearing their bits *before* reading, so a write racing with the copy
//! re-dirties the chunk and it is copied again). In `write-blocking` mode a guest write also
//! goes to the target before it is acknowledged: it waits for copies of overlapping chunks,
//! holds its chunks while writing both sides, and clears the bits of the chunks it covered
//! whole (partly covered chunks keep their state). The mode can switch from background to
//! write-blocking while the job runs (`block-job-change`).
//!
//! # Requests
//! As QEMU's `mirror_iteration`: the job claims a run of up to `buf_size` dirty chunks, clears
//! their bits, and cuts the run by the source's block status into data copies of up to
//! `max(buf_size / 16, 1 MiB)` and one zero write per hole of whole granules (a hole shorter
//! than a granule is copied with its granule as data), at most 16 requests in flight. A full
//! sync into a target that writes zeroes cheaply first zeroes the whole target and then only
//! copies what the source's chain allocates ([`SyncMode::FullZeroed`], QEMU's `zero_target`).
//!
//! # READY, complete, cancel
//! When nothing is dirty and no copy is in flight the target is flushed and the job becomes
//! READY. `complete` (or a soft cancel) then *quiesces* the filter: guest writes in flight
//! finish, new ones wait at the filter; whatever is still dirty is copied, the target is
//! flushed, and the job ends with writes still held. At finalization the filter is switched
//! to forward to the target (complete) or the source (soft cancel, or any abort), the held
//! writes go there, and the graph owner moves the users (drained) to that node and removes
//! the filter. So no write acknowledged to a guest is ever missing from the node it ends on:
//! it either landed on the source before the final copy (and was copied), or waited and
//! landed on the chosen node (the QEMU bug of releasing the bitmap before the switch cannot
//! happen: the bitmap is consulted under the quiesce).

use crate::error::JobFailure;
use crate::job::{ErrorAction, IoOperation, Job, JobDriver, OnError};
use async_trait::async_trait;
use diskstream_block::node::{BackingLink, BlockNode, LayerStatus};
use diskstream_block::status::{allocated_above, map_extent};
use diskstream_block::{BlockError, Result as BlockResult};
use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{Notify, OwnedRwLockWriteGuard, RwLock};
use tokio::task::JoinSet;

/// At most this many copies in flight (QEMU's `MAX_IN_FLIGHT`).
const MAX_IN_FLIGHT: usize = 16;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One bit per `granularity` bytes of the disk: set = the target may differ there.
pub struct DirtyBitmap {
    granularity: u64,
    size: u64,
    bits: Mutex<(Vec<u64>, u64)>,
}

impl DirtyBitmap {
    /// A clean bitmap for a disk of `size` bytes.
    pub fn new(size: u64, granularity: u64) -> DirtyBitmap {
        let chunks = size.div_ceil(granularity);
        DirtyBitmap {
            granularity,
            size,
            bits: Mutex::new((vec![0; chunks.div_ceil(64) as usize], 0)),
        }
    }

    fn chunks(&self, off: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let end = (off + len).min(self.size);
        off / self.granularity..end.div_ceil(self.granularity)
    }

    /// Mark every chunk touching `[off, off+len)` dirty; returns the bytes newly dirtied.
    pub fn set(&self, off: u64, len: u64) -> u64 {
        let mut g = lock(&self.bits);
        let mut n = 0;
        for c in self.chunks(off, len) {
            let (w, b) = ((c / 64) as usize, c % 64);
            if g.0[w] & (1 << b) == 0 {
                g.0[w] |= 1 << b;
                g.1 += 1;
                n += self.chunk_len(c);
            }
        }
        n
    }

    /// Mark the chunks touching `[off, off+len)` clean.
    pub fn clear(&self, off: u64, len: u64) {
        let mut g = lock(&self.bits);
        for c in self.chunks(off, len) {
            let (w, b) = ((c / 64) as usize, c % 64);
            if g.0[w] & (1 << b) != 0 {
                g.0[w] &= !(1 << b);
                g.1 -= 1;
            }
        }
    }

    /// Clear only the chunks lying wholly inside `[off, off+len)`.
    pub fn clear_covered(&self, off: u64, len: u64) {
        let g = self.granularity;
        let start = off.div_ceil(g) * g;
        let end = (off + len).min(self.size);
        let end = if end == self.size { end } else { end / g * g };
        if end > start {
            self.clear(start, end - start);
        }
    }

    fn chunk_len(&self, c: u64) -> u64 {
        (self.size - c * self.granularity).min(self.granularity)
    }

    /// Dirty bytes.
    pub fn dirty_bytes(&self) -> u64 {
        let g = lock(&self.bits);
        let mut n = g.1 * self.granularity;
        let last = self.size.div_ceil(self.granularity);
        if last > 0 && g.0[((last - 1) / 64) as usize] & (1 << ((last - 1) % 64)) != 0 {
            n -= self.granularity - self.chunk_len(last - 1);
        }
        n
    }

    /// The first dirty run at or after `from` (wrapping around), at most `max` bytes,
    /// skipping chunks for which `busy` says a copy is already in flight. Returns
    /// `(offset, length)`.
    fn next_run(&self, from: u64, max: u64, busy: impl Fn(u64, u64) -> bool) -> Option<(u64, u64)> {
        let g = lock(&self.bits);
        if g.1 == 0 {
            return None;
        }
        let total = self.size.div_ceil(self.granularity);
        let start = (from / self.granularity).min(total.saturating_sub(1));
        let is_dirty = |c: u64| g.0[(c / 64) as usize] & (1 << (c % 64)) != 0;
        for i in 0..total {
            let c = (start + i) % total;
            if !is_dirty(c) || busy(c * self.granularity, self.chunk_len(c)) {
                continue;
            }
            let off = c * self.granularity;
            let mut len = self.chunk_len(c);
            let mut n = c + 1;
            while n < total
                && len < max
                && is_dirty(n)
                && !busy(n * self.granularity, self.chunk_len(n))
            {
                len += self.chunk_len(n);
                n += 1;
            }
            return Some((off, len));
        }
        None
    }
}

/// How guest writes reach the target while the job runs (QAPI `MirrorCopyMode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyMode {
    /// Writes go to the source and are copied later.
    Background,
    /// Writes go to both before they are acknowledged.
    WriteBlocking,
}

impl CopyMode {
    /// Parse the QAPI spelling.
    pub fn parse(s: &str) -> Option<CopyMode> {
        match s {
            "background" => Some(CopyMode::Background),
            "write-blocking" => Some(CopyMode::WriteBlocking),
            _ => None,
        }
    }

    /// The QAPI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CopyMode::Background => "background",
            CopyMode::WriteBlocking => "write-blocking",
        }
    }
}

const ROUTE_ACTIVE: u8 = 0;
const ROUTE_SOURCE: u8 = 1;
const ROUTE_TARGET: u8 = 2;

/// State shared by the filter and the job.
struct Shared {
    bitmap: DirtyBitmap,
    /// Guest writes hold it shared; the job takes it exclusively to quiesce them.
    gate: Arc<RwLock<()>>,
    route: AtomicU8,
    write_blocking: AtomicBool,
    /// The job runs without error: write-blocking writes go to the target.
    active: AtomicBool,
    actively_synced: AtomicBool,
    dirtied: Notify,
    /// Ranges being copied or written to both sides.
    busy: Mutex<Vec<(u64, u64)>>,
    released: Notify,
    /// Data buffers of finished copies, reused by the next ones (at most one per copy in
    /// flight: a mirror's memory stays at about `buf-size`).
    spare_bufs: Mutex<Vec<Vec<u8>>>,
}

impl Shared {
    fn overlaps(&self, off: u64, len: u64) -> bool {
        lock(&self.busy)
            .iter()
            .any(|&(o, l)| o < off + len && off < o + l)
    }

    async fn lock_range(&self, off: u64, len: u64) {
        loop {
            let n = self.released.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            {
                let mut b = lock(&self.busy);
                if !b.iter().any(|&(o, l)| o < off + len && off < o + l) {
                    b.push((off, len));
                    return;
                }
            }
            n.await;
        }
    }

    /// Cut the claimed range `(off, len)` into `(off, n)` and the rest (still claimed), in
    /// one step: no other request can slip in between.
    fn split_claim(&self, off: u64, len: u64, n: u64) {
        let mut b = lock(&self.busy);
        if let Some(i) = b.iter().position(|&r| r == (off, len)) {
            b[i] = (off, n);
            if len > n {
                b.push((off + n, len - n));
            }
        }
    }

    fn unlock_range(&self, off: u64, len: u64) {
        let mut b = lock(&self.busy);
        if let Some(i) = b.iter().position(|&r| r == (off, len)) {
            b.swap_remove(i);
        }
        drop(b);
        self.released.notify_waiters();
    }

    fn aligned(&self, off: u64, len: u64) -> (u64, u64) {
        let g = self.bitmap.granularity;
        let s = off / g * g;
        let e = (off + len).div_ceil(g) * g;
        (s, e - s)
    }
}

/// QEMU's `mirror_top`: the filter above a mirrored source that tracks (or, in
/// write-blocking mode, mirrors) guest writes, and later forwards everything to the node the
/// job ended on.
pub struct MirrorFilter {
    source: Arc<dyn BlockNode>,
    target: Arc<dyn BlockNode>,
    shared: Arc<Shared>,
}

enum WriteOp<'a> {
    Data(&'a [u8]),
    Zeroes(bool),
    Discard,
}

impl MirrorFilter {
    fn routed(&self) -> &Arc<dyn BlockNode> {
        if self.shared.route.load(Ordering::Acquire) == ROUTE_TARGET {
            &self.target
        } else {
            &self.source
        }
    }

    async fn apply(
        node: &Arc<dyn BlockNode>,
        off: u64,
        len: u64,
        op: &WriteOp<'_>,
    ) -> BlockResult<()> {
        match op {
            WriteOp::Data(d) => node.write(off, d).await,
            WriteOp::Zeroes(unmap) => node.write_zeroes(off, len, *unmap).await,
            WriteOp::Discard => node.discard(off, len).await,
        }
    }

    async fn do_write(&self, off: u64, len: u64, op: WriteOp<'_>) -> BlockResult<()> {
        let sh = &self.shared;
        let _gate = sh.gate.read().await;
        match sh.route.load(Ordering::Acquire) {
            ROUTE_SOURCE => return Self::apply(&self.source, off, len, &op).await,
            ROUTE_TARGET => return Self::apply(&self.target, off, len, &op).await,
            _ => {}
        }
        let blocking =
            sh.write_blocking.load(Ordering::Acquire) && sh.active.load(Ordering::Acquire);
        if !blocking {
            let r = Self::apply(&self.source, off, len, &op).await;
            sh.actively_synced.store(false, Ordering::Release);
            sh.bitmap.set(off, len);
            sh.dirtied.notify_one();
            return r;
        }
        let (lo, ll) = sh.aligned(off, len);
        sh.lock_range(lo, ll).await;
        let r = Self::apply(&self.source, off, len, &op).await;
        if r.is_ok() {
            // A discard leaves the source's contents format-defined: copy it later instead.
            let t = match op {
                WriteOp::Discard => Err(BlockError::InvalidArgument("discard".into())),
                ref op => Self::apply(&self.target, off, len, op).await,
            };
            match t {
                Ok(()) => sh.bitmap.clear_covered(off, len),
                Err(_) => {
                    sh.actively_synced.store(false, Ordering::Release);
                    sh.bitmap.set(off, len);
                    sh.dirtied.notify_one();
                }
            }
        } else {
            sh.bitmap.set(off, len);
            sh.dirtied.notify_one();
        }
        sh.unlock_range(lo, ll);
        r
    }
}

#[async_trait]
impl BlockNode for MirrorFilter {
    fn format_name(&self) -> &'static str {
        "mirror_top"
    }
    fn filename(&self) -> &str {
        self.routed().filename()
    }
    fn size(&self) -> u64 {
        self.routed().size()
    }
    fn read_only(&self) -> bool {
        self.routed().read_only()
    }
    fn remote(&self) -> bool {
        self.routed().remote()
    }
    fn backing(&self) -> Option<Arc<dyn BlockNode>> {
        self.routed().backing()
    }
    fn cluster_size(&self) -> Option<u64> {
        self.routed().cluster_size()
    }
    fn allocation_unit(&self) -> Option<u64> {
        self.routed().allocation_unit()
    }
    fn can_populate(&self) -> bool {
        self.routed().can_populate()
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        self.routed().read(offset, buf).await
    }
    async fn write(&self, offset: u64, data: &[u8]) -> BlockResult<()> {
        self.do_write(offset, data.len() as u64, WriteOp::Data(data))
            .await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> BlockResult<()> {
        self.do_write(offset, len, WriteOp::Zeroes(unmap)).await
    }
    async fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.do_write(offset, len, WriteOp::Discard).await
    }
    async fn flush(&self) -> BlockResult<()> {
        let _gate = self.shared.gate.read().await;
        self.routed().flush().await
    }
    async fn write_if_unallocated(&self, offset: u64, data: &[u8]) -> BlockResult<u64> {
        // Copy-on-read population stores bytes the disk already shows: nothing to mirror.
        self.routed().write_if_unallocated(offset, data).await
    }
    async fn write_if_unallocated_owned(
        &self,
        offset: u64,
        data: Vec<u8>,
    ) -> BlockResult<(u64, Vec<u8>)> {
        self.routed().write_if_unallocated_owned(offset, data).await
    }
    async fn zero_if_unallocated(&self, offset: u64, len: u64) -> BlockResult<u64> {
        self.routed().zero_if_unallocated(offset, len).await
    }
    async fn block_status(&self, offset: u64, len: u64) -> BlockResult<LayerStatus> {
        self.routed().block_status(offset, len).await
    }
    async fn truncate(&self, _size: u64) -> BlockResult<()> {
        Err(BlockError::unsupported(
            self.filename(),
            "a node being mirrored cannot be resized",
        ))
    }
    async fn close(&self) -> BlockResult<()> {
        // The filter owns nothing; the nodes below are closed by their owners.
        Ok(())
    }
    async fn backing_link(&self) -> Option<BackingLink> {
        self.routed().backing_link().await
    }
    fn set_backing_node(&self, node: Option<Arc<dyn BlockNode>>) {
        self.routed().set_backing_node(node)
    }
    async fn set_backing_file(&self, file: Option<(String, Option<String>)>) -> BlockResult<()> {
        self.routed().set_backing_file(file).await
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Which data the job copies at start (QAPI `MirrorSyncMode`, the supported ones).
#[derive(Clone)]
pub enum SyncMode {
    /// The whole disk as the guest sees it (the target is fully overwritten): every chunk
    /// starts dirty, holes of the source become zero writes of up to `buf_size`.
    Full,
    /// The whole disk into a target that writes zeroes cheaply (QEMU's `zero_target` when
    /// the target can write zeroes with unmap): zero the whole target first with large
    /// write-zeroes (not counted as progress), then copy what the source's whole chain
    /// allocates.
    FullZeroed,
    /// What is allocated above this node (exclusive): `top` (the source's backing) and
    /// active commit (the base).
    Above(Option<Arc<dyn BlockNode>>),
    /// Only writes made while the job runs.
    None,
}

/// Options of a mirror job.
#[derive(Clone)]
pub struct MirrorConfig {
    /// Dirty tracking granularity (power of two, 512 B .. 64 MiB).
    pub granularity: u64,
    /// Bytes in flight at most.
    pub buf_size: u64,
    /// Initial copy.
    pub sync: SyncMode,
    /// Initial copy mode.
    pub copy_mode: CopyMode,
    /// Policy for source read errors.
    pub on_source_error: OnError,
    /// Policy for target write errors.
    pub on_target_error: OnError,
    /// Grow the target to the source's size first (active commit) instead of requiring
    /// equal sizes.
    pub grow_target: bool,
    /// The target writes zeroes cheaply (QEMU's `bdrv_can_write_zeroes_with_unmap`): zero
    /// writes of holes are not charged to the speed limit.
    pub zeroes_free: bool,
}

/// Callbacks into the graph owner.
#[async_trait]
pub trait MirrorHooks: Send + Sync {
    /// The filter now forwards every request to the target (`pivot`) or to the source; move
    /// the users to that node (draining them) and remove the filter from the graph.
    async fn finish(&self, pivot: bool);
    /// The job is over; release what it held. Called exactly once.
    async fn clean(&self) {}
}

/// Hooks that do nothing (library use, tests): nobody to move at the end of the job.
pub struct NoHooks;

#[async_trait]
impl MirrorHooks for NoHooks {
    async fn finish(&self, _pivot: bool) {}
}

/// The mirror job driver.
pub struct MirrorJob {
    source: Arc<dyn BlockNode>,
    target: Arc<dyn BlockNode>,
    filter: Arc<MirrorFilter>,
    cfg: MirrorConfig,
    hooks: Arc<dyn MirrorHooks>,
    should_complete: AtomicBool,
    soft_cancel: AtomicBool,
    finished: AtomicBool,
    quiesce: Mutex<Option<OwnedRwLockWriteGuard<()>>>,
}

impl MirrorJob {
    /// A job mirroring `source` to `target`; users are switched to [`MirrorJob::filter`] by
    /// the caller before the job starts.
    pub fn new(
        source: Arc<dyn BlockNode>,
        target: Arc<dyn BlockNode>,
        cfg: MirrorConfig,
        hooks: Arc<dyn MirrorHooks>,
    ) -> MirrorJob {
        let shared = Arc::new(Shared {
            bitmap: DirtyBitmap::new(source.size(), cfg.granularity),
            gate: Arc::new(RwLock::new(())),
            route: AtomicU8::new(ROUTE_ACTIVE),
            write_blocking: AtomicBool::new(cfg.copy_mode == CopyMode::WriteBlocking),
            active: AtomicBool::new(false),
            actively_synced: AtomicBool::new(false),
            dirtied: Notify::new(),
            busy: Mutex::new(Vec::new()),
            released: Notify::new(),
            spare_bufs: Mutex::new(Vec::new()),
        });
        let filter = Arc::new(MirrorFilter {
            source: Arc::clone(&source),
            target: Arc::clone(&target),
            shared,
        });
        MirrorJob {
            source,
            target,
            filter,
            cfg,
            hooks,
            should_complete: AtomicBool::new(false),
            soft_cancel: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            quiesce: Mutex::new(None),
        }
    }

    /// The filter node the users must write through while the job runs.
    pub fn filter(&self) -> Arc<dyn BlockNode> {
        Arc::clone(&self.filter) as Arc<dyn BlockNode>
    }

    /// `block-job-change`: switch the copy mode. Only background → write-blocking is
    /// possible (QEMU's rule and text).
    pub fn change_copy_mode(&self, mode: CopyMode) -> Result<(), String> {
        let sh = &self.filter.shared;
        let cur = sh.write_blocking.load(Ordering::Acquire);
        match (cur, mode) {
            (true, CopyMode::WriteBlocking) | (false, CopyMode::Background) => Ok(()),
            (false, CopyMode::WriteBlocking) => {
                // The job notices at its next iteration (within 100 ms when idle), as QEMU's.
                sh.write_blocking.store(true, Ordering::Release);
                Ok(())
            }
            (true, CopyMode::Background) => Err(format!(
                "Change to copy mode '{}' is not implemented",
                mode.as_str()
            )),
        }
    }

    fn shared(&self) -> &Shared {
        &self.filter.shared
    }

    async fn initial_dirty(&self) -> BlockResult<()> {
        let size = self.source.size();
        let bm = &self.shared().bitmap;
        match &self.cfg.sync {
            SyncMode::None => {}
            SyncMode::Full => {
                bm.set(0, size);
            }
            SyncMode::FullZeroed | SyncMode::Above(_) => {
                let base = match &self.cfg.sync {
                    SyncMode::Above(b) => b.clone(),
                    _ => None,
                };
                let mut pos = 0;
                while pos < size {
                    let (alloc, n) =
                        allocated_above(&self.source, base.as_ref(), pos, size - pos).await?;
                    if alloc {
                        bm.set(pos, n);
                    }
                    pos += n.max(1);
                }
            }
        }
        Ok(())
    }

    /// `FullZeroed`: zero the whole target before the initial scan, in requests of up to
    /// 2 GiB (QEMU's `INT_MAX` rounded down to the granularity), at most `MAX_IN_FLIGHT` at
    /// a time; not counted as progress. A failed request leaves its range dirty, so it is
    /// copied (zeroes included) later unless the error policy ends the job. Stops early when
    /// the job is cancelled.
    async fn zero_whole_target(&self, job: &Job) -> Result<(), JobFailure> {
        let size = self.source.size();
        let g = self.cfg.granularity;
        let step = (i32::MAX as u64 / g * g).max(g);
        let mut set: JoinSet<(u64, u64, BlockResult<()>)> = JoinSet::new();
        let mut failure = None;
        let mut pos = 0;
        let harvest = |r: Result<(u64, u64, BlockResult<()>), tokio::task::JoinError>,
                       failure: &mut Option<JobFailure>| match r {
            Ok((_, _, Ok(()))) => {}
            Ok((off, len, Err(e))) => {
                self.handle_error(job, off, len, IoOperation::Write, &e, failure)
            }
            Err(_) => {
                failure.get_or_insert(JobFailure::from_errno(5));
            }
        };
        while pos < size && failure.is_none() && !job.is_cancelled() {
            if job.pause_requested() {
                while let Some(r) = set.join_next().await {
                    harvest(r, &mut failure);
                }
                job.settled();
                job.pause_point().await;
                continue;
            }
            if set.len() >= MAX_IN_FLIGHT {
                if let Some(r) = set.join_next().await {
                    harvest(r, &mut failure);
                }
                continue;
            }
            let n = step.min(size - pos);
            let tgt = Arc::clone(&self.target);
            set.spawn(async move {
                let r = tgt.write_zeroes(pos, n, true).await;
                (pos, n, r)
            });
            pos += n;
        }
        while let Some(r) = set.join_next().await {
            harvest(r, &mut failure);
        }
        match failure {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }

    /// The next request of a claimed run at `pos` (at most `max` bytes), cut as QEMU's
    /// `mirror_iteration` cuts it from the source's block status: data up to `max_io`
    /// bytes; a hole (reads as zeroes) rounded down to whole granules and, when it starts
    /// and ends on the target's allocation units, one zero write however long; anything
    /// shorter than a granule is copied as one whole granule (zeroes as data). A failed
    /// status query plans a copy, whose read reports the error. Returns (length, zero).
    async fn plan(&self, pos: u64, max: u64, max_io: u64) -> (u64, bool) {
        let g = self.cfg.granularity;
        let (mut n, hole) = match map_extent(&self.source, pos, max).await {
            Ok(e) if e.zero || !e.present => (e.length.min(max), true),
            Ok(e) => (e.length.min(max).min(max_io), false),
            Err(_) => (max.min(max_io), false),
        };
        n -= n % g;
        let mut zero = false;
        if n < g {
            n = g;
        } else if hole {
            zero = match self.target.allocation_unit() {
                Some(u) if u > 0 => pos % u == 0 && (pos + n) % u == 0,
                _ => true,
            };
        }
        (n.min(max), zero)
    }

    fn update_total(&self, job: &Job, inflight: u64) {
        let (cur, _) = job.progress();
        job.progress_set_total(cur + self.shared().bitmap.dirty_bytes() + inflight);
    }

    fn handle_error(
        &self,
        job: &Job,
        off: u64,
        len: u64,
        op: IoOperation,
        e: &BlockError,
        failure: &mut Option<JobFailure>,
    ) {
        tracing::warn!(job = job.id(), offset = off, "mirror copy failed: {e}");
        self.shared().bitmap.set(off, len);
        let policy = match op {
            IoOperation::Read => self.cfg.on_source_error,
            IoOperation::Write => self.cfg.on_target_error,
        };
        // `ignore` retries (the range stays dirty); `stop` pauses, and resume retries.
        if job.error_action_with(policy, e.errno(), op) == ErrorAction::Report {
            failure.get_or_insert(JobFailure::from_block(e));
        }
    }

    /// Copy everything dirty now, one run at a time (used with guest writes held).
    async fn copy_all_dirty(&self, job: &Job) -> Result<(), JobFailure> {
        let max = self.cfg.buf_size.max(self.cfg.granularity);
        let mut buf = Vec::new();
        while let Some((off, len)) = self.shared().bitmap.next_run(0, max, |_, _| false) {
            self.shared().bitmap.clear(off, len);
            if let Err((op, e)) = copy_range(&self.source, &self.target, off, len, &mut buf).await {
                let mut failure = None;
                self.handle_error(job, off, len, op, &e, &mut failure);
                return Err(failure.unwrap_or_else(|| JobFailure::from_block(&e)));
            }
            job.progress_update(len);
        }
        Ok(())
    }

    async fn release(&self, pivot: bool) {
        if self.finished.swap(true, Ordering::AcqRel) {
            return;
        }
        let sh = self.shared();
        sh.active.store(false, Ordering::Release);
        sh.route.store(
            if pivot { ROUTE_TARGET } else { ROUTE_SOURCE },
            Ordering::Release,
        );
        // Writes held by the quiesce resume on the chosen node.
        lock(&self.quiesce).take();
        self.hooks.finish(pivot).await;
    }
}

/// A finished request: offset, length, buffer bytes it held, outcome.
type CopyResult = (u64, u64, u64, Result<(), (IoOperation, BlockError)>);

/// Read `[off, off+len)` of the source and write it to the target as data (QEMU's
/// `MIRROR_METHOD_COPY`: zeroes inside the range are copied as they read). `spare` is the
/// data buffer, handed back for the next copy.
async fn copy_data(
    source: &Arc<dyn BlockNode>,
    target: &Arc<dyn BlockNode>,
    off: u64,
    len: u64,
    spare: &mut Vec<u8>,
) -> Result<(), (IoOperation, BlockError)> {
    let mut buf = std::mem::take(spare);
    buf.clear();
    let buf = source
        .read_append(off, buf, len as usize)
        .await
        .map_err(|e| (IoOperation::Read, e))?;
    *spare = target
        .write_owned(off, buf)
        .await
        .map_err(|e| (IoOperation::Write, e))?;
    Ok(())
}

/// Copy `[off, off+len)` of what the source shows to the target: data is read and written,
/// ranges that read as zeroes become zero writes. `spare` is the data buffer, read into and
/// written from without copies (see `BlockNode::write_owned`) and left for the next copy.
async fn copy_range(
    source: &Arc<dyn BlockNode>,
    target: &Arc<dyn BlockNode>,
    off: u64,
    len: u64,
    spare: &mut Vec<u8>,
) -> Result<(), (IoOperation, BlockError)> {
    let end = off + len;
    let mut pos = off;
    while pos < end {
        let e = map_extent(source, pos, end - pos)
            .await
            .map_err(|e| (IoOperation::Read, e))?;
        let n = e.length.max(1).min(end - pos);
        if e.zero || !e.present {
            target
                .write_zeroes(pos, n, true)
                .await
                .map_err(|e| (IoOperation::Write, e))?;
        } else {
            copy_data(source, target, pos, n, spare).await?;
        }
        pos += n;
    }
    Ok(())
}

#[async_trait]
impl JobDriver for MirrorJob {
    async fn run(&self, job: &Arc<Job>) -> Result<(), JobFailure> {
        let size = self.source.size();
        if self.target.size() != size {
            if self.cfg.grow_target && self.target.size() < size {
                self.target
                    .truncate(size)
                    .await
                    .map_err(|e| JobFailure::from_block(&e))?;
            } else {
                return Err(JobFailure {
                    errno: 22,
                    message: "Source and target image have different sizes".into(),
                });
            }
        }
        let sh = Arc::clone(&self.filter.shared);
        sh.active.store(true, Ordering::Release);
        if matches!(self.cfg.sync, SyncMode::FullZeroed) {
            if let Err(f) = self.zero_whole_target(job).await {
                sh.active.store(false, Ordering::Release);
                return Err(f);
            }
        }
        if let Err(e) = self.initial_dirty().await {
            return Err(JobFailure::from_block(&e));
        }
        job.progress_set_total(sh.bitmap.dirty_bytes());
        let max_io = (self.cfg.buf_size / 16)
            .max(1 << 20)
            .min(self.cfg.buf_size.max(self.cfg.granularity));
        let mut inflight: JoinSet<CopyResult> = JoinSet::new();
        // Bytes of the requests in flight (progress), and of the copies among them (buffer).
        let mut inflight_bytes = 0u64;
        let mut buffered = 0u64;
        let mut failure: Option<JobFailure> = None;
        let mut cursor = 0u64;
        loop {
            // Harvest finished copies.
            while let Some(r) = inflight.try_join_next() {
                self.harvest(
                    job,
                    &sh,
                    r,
                    &mut inflight_bytes,
                    &mut buffered,
                    &mut failure,
                );
            }
            if failure.is_some() || job.is_cancelled() || job.pause_requested() {
                while let Some(r) = inflight.join_next().await {
                    self.harvest(
                        job,
                        &sh,
                        r,
                        &mut inflight_bytes,
                        &mut buffered,
                        &mut failure,
                    );
                }
                if failure.is_some() || job.is_cancelled() {
                    break;
                }
                if job.pause_requested() {
                    job.settled();
                    job.pause_point().await;
                }
                continue;
            }
            self.update_total(job, inflight_bytes);
            let dirty = sh.bitmap.dirty_bytes();
            if dirty == 0 && inflight.is_empty() {
                if !job.is_ready() {
                    if let Err(e) = self.target.flush().await {
                        let mut f = None;
                        if job.error_action_with(
                            self.cfg.on_target_error,
                            e.errno(),
                            IoOperation::Write,
                        ) == ErrorAction::Report
                        {
                            f = Some(JobFailure::from_block(&e));
                        }
                        if f.is_some() {
                            failure = f;
                        }
                        continue;
                    }
                    if size == 0 {
                        // Nothing can ever be dirty: QEMU reports a zero-length mirror
                        // actively synced from READY on.
                        sh.actively_synced.store(true, Ordering::Release);
                    }
                    job.set_ready();
                }
                if sh.write_blocking.load(Ordering::Acquire) {
                    sh.actively_synced.store(true, Ordering::Release);
                }
                if self.should_complete.load(Ordering::Acquire)
                    || self.soft_cancel.load(Ordering::Acquire)
                {
                    // Hold guest writes, copy what is left, flush: the target now equals
                    // the source, and stays so until the filter is switched.
                    let guard = Arc::clone(&sh.gate).write_owned().await;
                    let r = self.copy_all_dirty(job).await;
                    let r = match r {
                        Ok(()) => self
                            .target
                            .flush()
                            .await
                            .map_err(|e| JobFailure::from_block(&e)),
                        Err(e) => Err(e),
                    };
                    match r {
                        Ok(()) => {
                            *lock(&self.quiesce) = Some(guard);
                            self.update_total(job, 0);
                            return Ok(());
                        }
                        Err(e) => {
                            drop(guard);
                            failure = Some(e);
                            continue;
                        }
                    }
                }
                job.settled();
                job.set_busy(false);
                let notified = sh.dirtied.notified();
                tokio::select! {
                    _ = notified => {}
                    _ = job.wake_notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                job.set_busy(true);
                continue;
            }
            if inflight.len() >= MAX_IN_FLIGHT || buffered >= self.cfg.buf_size || dirty == 0 {
                job.settled();
                tokio::select! {
                    Some(r) = inflight.join_next() => {
                        self.harvest(job, &sh, r, &mut inflight_bytes, &mut buffered, &mut failure);
                    }
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
                        self.harvest(job, &sh, r, &mut inflight_bytes, &mut buffered, &mut failure);
                    }
                    _ = job.wake_notified() => {}
                }
                job.set_busy(true);
                continue;
            }
            let limit = match job.speed() {
                0 => self.cfg.buf_size.max(self.cfg.granularity),
                s => (s / 10).clamp(self.cfg.granularity, max_io.max(self.cfg.granularity)),
            };
            let run = sh.bitmap.next_run(cursor, limit, |o, l| sh.overlaps(o, l));
            let Some((off, len)) = run else {
                // Everything dirty is being copied or written right now.
                job.settled();
                tokio::select! {
                    Some(r) = inflight.join_next(), if !inflight.is_empty() => {
                        self.harvest(job, &sh, r, &mut inflight_bytes, &mut buffered, &mut failure);
                    }
                    _ = tokio::time::sleep(Duration::from_millis(1)) => {}
                }
                continue;
            };
            // As QEMU's mirror_iteration: claim the whole run and clear its bits *before*
            // asking the source what it holds (a write racing with the copy re-dirties its
            // chunks), then cut the run into requests by that answer.
            sh.lock_range(off, len).await;
            sh.bitmap.clear(off, len);
            cursor = off + len;
            let end = off + len;
            let mut pos = off;
            while pos < end {
                let (n, zero) = self.plan(pos, end - pos, max_io).await;
                while inflight.len() >= MAX_IN_FLIGHT {
                    if let Some(r) = inflight.join_next().await {
                        self.harvest(
                            job,
                            &sh,
                            r,
                            &mut inflight_bytes,
                            &mut buffered,
                            &mut failure,
                        );
                    }
                }
                if failure.is_some() || job.is_cancelled() {
                    // The rest of the run was not copied: dirty again.
                    sh.bitmap.set(pos, end - pos);
                    sh.unlock_range(pos, end - pos);
                    break;
                }
                sh.split_claim(pos, end - pos, n);
                // Zero writes use no buffer, and cost nothing against the speed limit when
                // the target writes zeroes cheaply (QEMU's accounting).
                let buf_bytes = if zero { 0 } else { n };
                job.processed_bytes(if zero && self.cfg.zeroes_free { 0 } else { n });
                inflight_bytes += n;
                buffered += buf_bytes;
                let (src, tgt, sh2) = (
                    Arc::clone(&self.source),
                    Arc::clone(&self.target),
                    Arc::clone(&sh),
                );
                inflight.spawn(diskstream_block::priority::background(async move {
                    let r = if zero {
                        tgt.write_zeroes(pos, n, true)
                            .await
                            .map_err(|e| (IoOperation::Write, e))
                    } else {
                        let mut buf = lock(&sh2.spare_bufs).pop().unwrap_or_default();
                        let r = copy_data(&src, &tgt, pos, n, &mut buf).await;
                        if buf.capacity() > 0 {
                            lock(&sh2.spare_bufs).push(buf);
                        }
                        r
                    };
                    sh2.unlock_range(pos, n);
                    (pos, n, buf_bytes, r)
                }));
                pos += n;
            }
        }
        sh.active.store(false, Ordering::Release);
        match failure {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }

    async fn prepare(&self) -> Result<(), JobFailure> {
        let pivot = self.should_complete.load(Ordering::Acquire)
            && !self.soft_cancel.load(Ordering::Acquire);
        self.release(pivot).await;
        Ok(())
    }

    async fn abort(&self) {
        self.release(false).await;
    }

    async fn clean(&self) {
        self.hooks.clean().await;
    }

    fn can_complete(&self) -> bool {
        true
    }

    fn request_complete(&self) {
        self.should_complete.store(true, Ordering::Release);
    }

    fn request_soft_cancel(&self) {
        self.soft_cancel.store(true, Ordering::Release);
    }

    fn change_copy_mode(&self, mode: &str) -> Result<(), String> {
        match CopyMode::parse(mode) {
            Some(m) => MirrorJob::change_copy_mode(self, m),
            None => Err(format!("Change to copy mode '{mode}' is not implemented")),
        }
    }

    fn actively_synced(&self) -> Option<bool> {
        Some(self.shared().actively_synced.load(Ordering::Acquire))
    }
}

impl MirrorJob {
    fn harvest(
        &self,
        job: &Job,
        _sh: &Shared,
        r: Result<CopyResult, tokio::task::JoinError>,
        inflight_bytes: &mut u64,
        buffered: &mut u64,
        failure: &mut Option<JobFailure>,
    ) {
        match r {
            Ok((off, len, buf_bytes, res)) => {
                *inflight_bytes = inflight_bytes.saturating_sub(len);
                *buffered = buffered.saturating_sub(buf_bytes);
                match res {
                    Ok(()) => job.progress_update(len),
                    Err((op, e)) => self.handle_error(job, off, len, op, &e, failure),
                }
            }
            Err(e) => {
                tracing::error!(job = job.id(), "mirror copy task failed: {e}");
                failure.get_or_insert(JobFailure::from_errno(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_counts_partial_last_chunk() {
        let b = DirtyBitmap::new(10_000, 4096);
        assert_eq!(b.set(0, 10_000), 10_000);
        assert_eq!(b.dirty_bytes(), 10_000);
        b.clear_covered(100, 5000);
        assert_eq!(b.dirty_bytes(), 10_000);
        b.clear_covered(0, 8192);
        assert_eq!(b.dirty_bytes(), 10_000 - 8192);
        b.clear_covered(8192, 10_000 - 8192);
        assert_eq!(b.dirty_bytes(), 0);
        b.set(5000, 1);
        assert_eq!(b.next_run(0, 1 << 20, |_, _| false), Some((4096, 4096)));
    }
}
