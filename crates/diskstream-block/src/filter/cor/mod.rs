//! The `copy-on-read` filter: reads of data the top image does not hold yet fetch it from the
//! backing chain and store it in the top, so re-reads are local and a later stream has less to
//! copy.
//!
//! Copy-on-read is a property of how a device is opened, not of the image: the same qcow2 image
//! is used with or without it. QEMU models it as a filter node (`blockdev-add
//! driver=copy-on-read,file=<node>,bottom=<node>`); so does diskstream. [`CopyOnRead::new`]
//! puts the filter over a format node (`file`, the top of a chain) and the result is itself an
//! `Arc<dyn BlockNode>` to hand to an export or a device. `bottom` limits copying to data
//! provided by the layers from the top's backing file down to `bottom` (inclusive); data below
//! it is read but never copied.
//!
//! # A read
//! 1. The top's own block status (local metadata, no backing I/O) tells which parts of the
//!    request it lacks. If none, the read is a *hit*: it goes straight to the top, an
//!    appending read (the NBD server's copy-free path) to the top's own appending read. Units
//!    the filter knows the top holds entirely (it populated them, or a hit covered them whole)
//!    skip even that query and are never read ahead, so a re-read costs what a read of the top
//!    alone costs.
//! 2. Otherwise every aligned **fetch unit** ([`CorConfig::granularity`], 1 MiB by default,
//!    rounded to the top's cluster or subcluster) overlapping a missing part is fetched — the
//!    fetch unit is decoupled from the guest's request size, so a slow remote backing is read in
//!    large requests whatever the guest asks for. A unit already being fetched (by another
//!    read, or by read-ahead) is joined, not fetched again: **concurrent reads of one missing
//!    unit read the backing once**.
//! 3. The unit's missing parts are read from the backing chain into the fetch's own **bounce
//!    buffer**, never into the caller's: a client may modify its read buffer while the read is
//!    in flight (a guest reusing memory, a VMM passing guest RAM), and what lands in the image
//!    must be what the backing holds, not what the client scribbled (the seed thread's reason
//!    for bounce buffers). The read is answered from the bounce buffer for the fetched parts
//!    it found unallocated in step 1 and from the top for the rest.
//! 4. The bounce buffer is written into the top with the no-clobber population primitives
//!    (see [`fetch`]): per cluster, under the top's metadata lock, only where the top is still
//!    unallocated; all-zero allocation units become zero clusters. The read does not wait for
//!    this step (it already has its data), which keeps local metadata work out of the guest's
//!    read latency; [`CopyOnRead::quiesce`] and `close` wait for it.
//!
//! Sequential readers get **read-ahead**: from a stream's second read on, the next
//! [`CorConfig::readahead`] units are fetched in the background, at most
//! [`CorConfig::max_background`] at once; when those slots are busy read-ahead is skipped, never
//! queued. Guest reads never wait for background work: they only ever wait for a fetch of a
//! unit they need, and such a fetch, whoever started it, is already reading.
//!
//! # Guest writes
//! Writes, write-zeroes and discards pass straight to the top and never wait for copies. The
//! population primitives make the copy lose against any guest write: one that landed first is
//! never overwritten; one issued while the copy's cluster allocation is in flight waits for it
//! and then writes over it. A read issued after a write completed sees that write, whoever
//! made it: the read takes bytes from a fetch's bounce buffer only where its own block status
//! (queried after the write) found the top unallocated, and reads the rest from the top. So a
//! writer straight on the top node (a second export of the top, a job's own filter) is safe
//! too. A write through the filter also drops the units it touched from the in-flight map, so
//! a later read starts a fresh fetch whose plan sees the write, instead of joining one planned
//! before it (which would leave the unit's other parts to be fetched again).
//!
//! # Sharing the backing with a stream job
//! A stream job on the same top (QEMU's "copy-on-read + streaming" pairing) uses the same
//! primitives and re-checks the top's allocation for every chunk just before copying it, so it
//! skips whatever copy-on-read already brought in, and its own copies never overwrite guest
//! data or a copy that landed first. Guest reads are not queued behind the stream: each guest
//! fetch is its own backing request, issued as soon as the guest asks, and it runs with the
//! guest's (foreground) priority while the job's copies and this filter's read-ahead run in
//! the background ([`crate::priority`]): remote drivers send it ahead of the job's queued
//! requests and keep slots for it. The worst overlap is a unit both fetch at the same moment:
//! the backing is read twice, the top written once.
//!
//! # Flush
//! A flush through the filter waits for the fetches in flight when it is issued, copies
//! included, before flushing the top: a flush acknowledged after a read returned covers that
//! read's copy (a read returns before its copy lands).
//!
//! # When copy-on-read is off
//! A read-only top is never written: the filter then forwards every request and reports why in
//! [`CopyOnRead::off_reason`] (also logged as a warning). The same for a top whose format cannot
//! hold copied data per cluster (raw). A top without a backing file has nothing to copy.
//!
//! The filter is transparent to the chain-wide mapping: its backing is the top's backing and
//! its block status is the top's, so `map`, NBD block status and allocation depth through it
//! are the top's.

mod config;
mod fetch;
mod readahead;

pub use config::{
    CorConfig, CorStats, DEFAULT_BACKGROUND, DEFAULT_GRANULARITY, DEFAULT_READAHEAD,
    MAX_GRANULARITY, MAX_READAHEAD, MIN_GRANULARITY,
};

use crate::error::{BlockError, Result};
use crate::node::{check_bounds, same_node, Allocation, BlockNode, LayerStatus};
use async_trait::async_trait;
use config::{bump, Counters};
use fetch::Fetch;
use readahead::Streams;
use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{Notify, Semaphore};

/// The copy-on-read filter node.
pub struct CopyOnRead {
    inner: Arc<Inner>,
}

/// State shared with the fetch tasks.
pub(crate) struct Inner {
    file: Arc<dyn BlockNode>,
    bottom: Option<Arc<dyn BlockNode>>,
    config: CorConfig,
    /// Effective fetch unit (granularity rounded up to `align`).
    unit: u64,
    /// The top's allocation unit: copies are widened to it.
    align: u64,
    off_reason: Option<String>,
    closed: AtomicBool,
    /// Units being fetched, and units known to be held by the top.
    units: Mutex<Units>,
    streams: Mutex<Streams>,
    /// Read-ahead slots.
    background: Arc<Semaphore>,
    /// Fetch tasks running, and a wake-up for [`CopyOnRead::quiesce`] and flushes (every
    /// task end).
    tasks: AtomicUsize,
    idle: Notify,
    /// Start numbers of the fetch tasks running (a flush waits for those that started
    /// before it), and the next number.
    running: Mutex<std::collections::BTreeSet<u64>>,
    next_task: std::sync::atomic::AtomicU64,
    /// Shared with the filters rebuilt from this one (snapshot, switch), so the counters
    /// describe the node, not one incarnation of it.
    counters: Arc<Counters>,
}

/// The filter's per-unit state, under one lock so that a guest write's invalidation and a
/// fetch's completion are ordered.
#[derive(Debug, Default)]
struct Units {
    /// Units being fetched, by unit index.
    inflight: HashMap<u64, Arc<Fetch>>,
    /// Bitmap of units known to be allocated entirely in the top (a fetch populated or found
    /// them complete, or a hit covered them whole). Such units are read from the top without a
    /// block-status query and never read ahead. Only a hint: reading the top is always correct
    /// (it reads through the chain), so a unit that stopped being allocated behind the
    /// filter's back (a discard straight on the top) is at worst read without being copied.
    local: Vec<u64>,
}

impl Units {
    fn is_local(&self, u: u64) -> bool {
        self.local
            .get((u / 64) as usize)
            .is_some_and(|w| w & (1 << (u % 64)) != 0)
    }

    /// Whether every unit of `first..=last` is known local.
    fn all_local(&self, first: u64, last: u64) -> bool {
        (first..=last).all(|u| self.is_local(u))
    }

    fn set_local(&mut self, u: u64) {
        let w = (u / 64) as usize;
        if self.local.len() <= w {
            self.local.resize(w + 1, 0);
        }
        self.local[w] |= 1 << (u % 64);
    }

    fn clear_local(&mut self, first: u64, last: u64) {
        let mut u = first;
        while u <= last && ((u / 64) as usize) < self.local.len() {
            if u % 64 == 0 && last - u >= 63 {
                self.local[(u / 64) as usize] = 0;
                u += 64;
            } else {
                self.local[(u / 64) as usize] &= !(1 << (u % 64));
                u += 1;
            }
        }
    }
}

/// What a read lacks in the top when it is issued.
#[derive(Debug, Default)]
struct Missing {
    /// Fetch units overlapping the unallocated ranges, ascending.
    units: Vec<u64>,
    /// Guest ranges the top did not allocate, sorted, disjoint.
    ranges: Vec<(u64, u64)>,
}

/// Keeps a fetch task counted while it runs.
struct TaskGuard(Arc<Inner>, u64);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        lock(&self.0.running).remove(&self.1);
        self.0.tasks.fetch_sub(1, Ordering::AcqRel);
        self.0.idle.notify_waiters();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    fn units(&self) -> MutexGuard<'_, Units> {
        lock(&self.units)
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn task_guard(self: &Arc<Self>) -> TaskGuard {
        let n = self.next_task.fetch_add(1, Ordering::AcqRel);
        lock(&self.running).insert(n);
        self.tasks.fetch_add(1, Ordering::AcqRel);
        TaskGuard(Arc::clone(self), n)
    }

    /// Wait for the fetch tasks that started before this call (their copies into the top
    /// included); tasks started later are not waited for, so a busy filter cannot starve
    /// a flush.
    async fn settle_started(&self) {
        let upto = self.next_task.load(Ordering::Acquire);
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if lock(&self.running).first().is_none_or(|&n| n >= upto) {
                return;
            }
            idle.await;
        }
    }

    /// Forget in-flight units overlapping `[offset, offset+len)` (a guest write completed
    /// there): later reads must plan afresh. `dealloc`: the write may have deallocated
    /// (discard, write-zeroes), so the units are no longer known local either.
    fn invalidate(&self, offset: u64, len: u64, dealloc: bool) {
        if len == 0 {
            return;
        }
        let first = offset / self.unit;
        let last = (offset + len - 1) / self.unit;
        let mut units = self.units();
        if !units.inflight.is_empty() {
            units.inflight.retain(|&u, _| u < first || u > last);
        }
        if dealloc {
            units.clear_local(first, last);
        }
    }

    /// What `[offset, end)` lacks in the top, from the top's block status (skipped when every
    /// unit is already known local): the fetch units to wait for (empty: a hit) and the
    /// unallocated ranges themselves. Whole units the request covers and finds allocated become
    /// known local.
    async fn missing_units(&self, offset: u64, end: u64) -> Result<Missing> {
        let (first, last) = (offset / self.unit, (end - 1) / self.unit);
        let mut m = Missing::default();
        if self.units().all_local(first, last) {
            return Ok(m);
        }
        let mut pos = offset;
        while pos < end {
            let st = self.file.block_status(pos, end - pos).await?;
            let n = st.len.clamp(1, end - pos);
            if st.alloc == Allocation::Unallocated {
                for u in pos / self.unit..=(pos + n - 1) / self.unit {
                    if m.units.last() != Some(&u) {
                        m.units.push(u);
                    }
                }
                match m.ranges.last_mut() {
                    Some(r) if r.1 == pos => r.1 = pos + n,
                    _ => m.ranges.push((pos, pos + n)),
                }
            }
            pos += n;
        }
        if m.units.is_empty() {
            let size = self.file.size();
            let mut map = self.units();
            for u in first..=last {
                if offset <= u * self.unit && end >= ((u + 1) * self.unit).min(size) {
                    map.set_local(u);
                }
            }
        }
        Ok(m)
    }

    /// Record a read of `[offset, end)` for sequential detection, unless all its units are
    /// known local (nothing to read ahead there); returns the units to read ahead.
    fn access(&self, offset: u64, end: u64) -> Option<std::ops::Range<u64>> {
        if self.config.readahead == 0
            || self
                .units()
                .all_local(offset / self.unit, (end - 1) / self.unit)
        {
            return None;
        }
        let units_total = self.file.size().div_ceil(self.unit);
        lock(&self.streams).access(offset, end, self.unit, self.config.readahead, units_total)
    }

    async fn quiesce(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.tasks.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl std::fmt::Debug for CopyOnRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyOnRead")
            .field("file", &self.inner.file.filename())
            .field("bottom", &self.inner.bottom.as_ref().map(|b| b.filename()))
            .field("unit", &self.inner.unit)
            .field("off_reason", &self.inner.off_reason)
            .finish()
    }
}

impl CopyOnRead {
    /// Put a copy-on-read filter over `file` (a format node, usually the top of a chain).
    ///
    /// `bottom`, when given, must be `file` or a layer of its backing chain; only data
    /// provided by the layers from `file`'s backing down to `bottom` (inclusive) is copied, as
    /// QEMU's `bottom` option (`bottom` = `file`: nothing is). Fails on an invalid `config` or a `bottom` outside the chain. A filter
    /// over a read-only `file`, or over a format that cannot hold copied data (raw), is created
    /// but inactive: it forwards everything, [`CopyOnRead::off_reason`] says why, and a warning
    /// is logged. A caller that prefers to refuse (a monitor mirroring QEMU's permission error)
    /// checks [`CopyOnRead::off_reason`].
    pub fn new(
        file: Arc<dyn BlockNode>,
        bottom: Option<Arc<dyn BlockNode>>,
        config: CorConfig,
    ) -> Result<Arc<CopyOnRead>> {
        Self::with_counters(file, bottom, config, Arc::new(Counters::default()))
    }

    fn with_counters(
        file: Arc<dyn BlockNode>,
        bottom: Option<Arc<dyn BlockNode>>,
        config: CorConfig,
        counters: Arc<Counters>,
    ) -> Result<Arc<CopyOnRead>> {
        config.validate()?;
        if let Some(b) = &bottom {
            // `bottom` may be `file` itself (QEMU's stream job passes its lowest streamed
            // node, which is the device when there is nothing to stream): then no layer is
            // eligible and nothing is ever copied.
            let mut node = Some(Arc::clone(&file));
            let mut found = false;
            while let Some(n) = node {
                if same_node(&n, b) {
                    found = true;
                    break;
                }
                node = n.backing();
            }
            if !found {
                return Err(BlockError::InvalidArgument(format!(
                    "copy-on-read bottom '{}' is not in the backing chain of '{}'",
                    b.filename(),
                    file.filename()
                )));
            }
        }
        let off_reason = Self::off_reason_for(file.as_ref());
        if let Some(r) = &off_reason {
            tracing::warn!("copy-on-read is off: {r}");
        }
        let align = file.allocation_unit().unwrap_or(512).max(1);
        let unit = config.granularity.div_ceil(align) * align;
        Ok(Arc::new(CopyOnRead {
            inner: Arc::new(Inner {
                file,
                bottom,
                config,
                unit,
                align,
                off_reason,
                closed: AtomicBool::new(false),
                units: Mutex::new(Units::default()),
                streams: Mutex::new(Streams::default()),
                background: Arc::new(Semaphore::new(config.max_background as usize)),
                tasks: AtomicUsize::new(0),
                idle: Notify::new(),
                running: Mutex::new(std::collections::BTreeSet::new()),
                next_task: std::sync::atomic::AtomicU64::new(0),
                counters,
            }),
        }))
    }

    /// A new filter like this one (same configuration) over `file` with `bottom`, sharing
    /// this one's counters: for graph changes that rebuild a filter over a new image
    /// (snapshot, switch, a job's filter inserted below it), after which the old one is
    /// closed. The counters keep counting across such rebuilds.
    pub fn rebuild(
        &self,
        file: Arc<dyn BlockNode>,
        bottom: Option<Arc<dyn BlockNode>>,
    ) -> Result<Arc<CopyOnRead>> {
        Self::with_counters(
            file,
            bottom,
            self.inner.config,
            Arc::clone(&self.inner.counters),
        )
    }

    /// Why a filter over `file` would be inactive: a read-only node is never written, and a
    /// format that cannot allocate per cluster (raw) cannot hold copied data. `None` when
    /// copy-on-read can work. Front ends ask before building a filter to report it their way.
    pub fn off_reason_for(file: &dyn BlockNode) -> Option<String> {
        if file.read_only() {
            Some(format!(
                "'{}' is opened read-only and copy-on-read never writes to a read-only image",
                file.filename()
            ))
        } else if !file.can_populate() {
            Some(format!(
                "'{}' is a {} image, which cannot hold copied data (copy-on-read needs a \
                 format that allocates over a backing file, such as qcow2)",
                file.filename(),
                file.format_name()
            ))
        } else {
            None
        }
    }

    /// The filtered node (QEMU's `file` child).
    pub fn file(&self) -> &Arc<dyn BlockNode> {
        &self.inner.file
    }

    /// The `bottom` layer, if copying is limited.
    pub fn bottom(&self) -> Option<&Arc<dyn BlockNode>> {
        self.inner.bottom.as_ref()
    }

    /// The configuration the filter was created with.
    pub fn config(&self) -> CorConfig {
        self.inner.config
    }

    /// The effective fetch unit in bytes.
    pub fn unit(&self) -> u64 {
        self.inner.unit
    }

    /// Why copy-on-read is off (`None`: it is on).
    pub fn off_reason(&self) -> Option<&str> {
        self.inner.off_reason.as_deref()
    }

    /// Whether reads copy into the top.
    pub fn is_active(&self) -> bool {
        self.inner.off_reason.is_none() && !self.inner.is_closed()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> CorStats {
        let mut s = CorStats {
            active: self.inner.off_reason.is_none(),
            off_reason: self.inner.off_reason.clone(),
            unit: self.inner.unit,
            readahead: self.inner.config.readahead,
            ..CorStats::default()
        };
        self.inner.counters.fill(&mut s);
        s
    }

    /// Wait until no fetch or copy is running (fetches started meanwhile are waited for too).
    /// For graph changes that need the top quiet, e.g. before removing the filter.
    pub async fn quiesce(&self) {
        self.inner.quiesce().await;
    }

    /// A read with copy-on-read on: a hit goes to the top; a miss is [`CopyOnRead::cor_miss`].
    async fn cor_read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let inner = &self.inner;
        let end = offset + buf.len() as u64;
        let missing = inner.missing_units(offset, end).await?;
        let ahead = inner.access(offset, end);
        if missing.units.is_empty() {
            bump(&inner.counters.hits, 1);
            if let Some(r) = ahead {
                inner.readahead(r);
            }
            return inner.file.read(offset, buf).await;
        }
        self.cor_miss(offset, buf, missing, ahead).await
    }

    /// A read that lacks `missing` in the top: join or start the fetches of its units, answer
    /// from their bounce buffers and the top.
    ///
    /// Bounce-buffer bytes are taken only where this read's own block status found the top
    /// unallocated *and* the fetch read the backing: a fetch this read joined may have been
    /// planned before a write that completed before this read was issued (a write straight to
    /// the top, which the filter does not see, e.g. another export of the top or a job), and
    /// the bounce buffer then holds what that write replaced. Everything else is read from the
    /// top, which holds that write.
    async fn cor_miss(
        &self,
        offset: u64,
        buf: &mut [u8],
        missing: Missing,
        ahead: Option<std::ops::Range<u64>>,
    ) -> Result<()> {
        let inner = &self.inner;
        let end = offset + buf.len() as u64;
        bump(&inner.counters.misses, 1);
        // The guest's own units first, then read-ahead, so the backing sees them in that order.
        let fetches: Vec<Arc<Fetch>> = missing.units.iter().map(|&u| inner.fetch(u)).collect();
        if let Some(r) = ahead {
            inner.readahead(r);
        }
        let unalloc = &missing.ranges;
        let mut pos = offset;
        for f in fetches {
            let d = f.wait().await?;
            let mut pieces: Vec<(u64, u64)> = Vec::new();
            for &(a, b) in &d.ranges {
                for &(ua, ub) in unalloc {
                    pieces.push((a.max(ua).max(offset), b.min(ub).min(end)));
                }
            }
            for (s, e) in pieces {
                if s >= e {
                    continue;
                }
                if pos < s {
                    let gap = &mut buf[(pos - offset) as usize..(s - offset) as usize];
                    inner.file.read(pos, gap).await?;
                }
                buf[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&d.data[(s - d.start) as usize..(e - d.start) as usize]);
                pos = e;
            }
        }
        if pos < end {
            inner
                .file
                .read(pos, &mut buf[(pos - offset) as usize..])
                .await?;
        }
        Ok(())
    }
}

#[async_trait]
impl BlockNode for CopyOnRead {
    fn format_name(&self) -> &'static str {
        "copy-on-read"
    }
    fn filename(&self) -> &str {
        self.inner.file.filename()
    }
    fn size(&self) -> u64 {
        self.inner.file.size()
    }
    fn read_only(&self) -> bool {
        self.inner.file.read_only()
    }
    fn remote(&self) -> bool {
        self.inner.file.remote()
    }
    /// The filtered node's backing: the filter is transparent to chain walks.
    fn backing(&self) -> Option<Arc<dyn BlockNode>> {
        self.inner.file.backing()
    }
    fn cluster_size(&self) -> Option<u64> {
        self.inner.file.cluster_size()
    }
    fn allocation_unit(&self) -> Option<u64> {
        self.inner.file.allocation_unit()
    }
    fn can_populate(&self) -> bool {
        self.inner.file.can_populate()
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_bounds(offset, buf.len() as u64, self.size())?;
        if buf.is_empty() {
            return Ok(());
        }
        if !self.is_active() {
            return self.inner.file.read(offset, buf).await;
        }
        if self.inner.file.backing().is_none() {
            bump(&self.inner.counters.hits, 1);
            return self.inner.file.read(offset, buf).await;
        }
        self.cor_read(offset, buf).await
    }

    /// A hit (the usual re-read) is the top's own appending read, which a qcow2 top serves by
    /// reading the file straight into `buf`; a miss fills the new bytes like [`Self::read`].
    async fn read_append(&self, offset: u64, mut buf: Vec<u8>, len: usize) -> Result<Vec<u8>> {
        check_bounds(offset, len as u64, self.size())?;
        if len == 0 {
            return Ok(buf);
        }
        let inner = &self.inner;
        if !self.is_active() {
            return inner.file.read_append(offset, buf, len).await;
        }
        if inner.file.backing().is_none() {
            bump(&inner.counters.hits, 1);
            return inner.file.read_append(offset, buf, len).await;
        }
        let end = offset + len as u64;
        let missing = inner.missing_units(offset, end).await?;
        let ahead = inner.access(offset, end);
        if missing.units.is_empty() {
            bump(&inner.counters.hits, 1);
            if let Some(r) = ahead {
                inner.readahead(r);
            }
            return inner.file.read_append(offset, buf, len).await;
        }
        let at = buf.len();
        buf.resize(at + len, 0);
        self.cor_miss(offset, &mut buf[at..], missing, ahead)
            .await?;
        Ok(buf)
    }

    async fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let r = self.inner.file.write(offset, data).await;
        self.inner.invalidate(offset, data.len() as u64, false);
        r
    }

    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let r = self.inner.file.write_zeroes(offset, len, unmap).await;
        self.inner.invalidate(offset, len, true);
        r
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let r = self.inner.file.discard(offset, len).await;
        self.inner.invalidate(offset, len, true);
        r
    }

    /// Waits for the fetches in flight when it is called (their copies land in the top),
    /// then flushes the top: a flush acknowledged after a read covers that read's copy.
    async fn flush(&self) -> Result<()> {
        self.inner.settle_started().await;
        self.inner.file.flush().await
    }

    async fn write_if_unallocated(&self, offset: u64, data: &[u8]) -> Result<u64> {
        self.inner.file.write_if_unallocated(offset, data).await
    }

    async fn write_if_unallocated_owned(
        &self,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<(u64, Vec<u8>)> {
        self.inner
            .file
            .write_if_unallocated_owned(offset, data)
            .await
    }

    async fn zero_if_unallocated(&self, offset: u64, len: u64) -> Result<u64> {
        self.inner.file.zero_if_unallocated(offset, len).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<LayerStatus> {
        self.inner.file.block_status(offset, len).await
    }

    /// Waits for fetches in flight (they were planned for the old size), then resizes the top.
    async fn truncate(&self, size: u64) -> Result<()> {
        self.inner.quiesce().await;
        let r = self.inner.file.truncate(size).await;
        self.inner.invalidate(0, u64::MAX, true);
        r
    }

    /// Stops copying (later reads are forwarded), waits for fetches and copies in flight, and
    /// flushes the top. The top itself stays open: it is a node of its own (QEMU's
    /// `blockdev-del` of a filter leaves its child in the graph); whoever opened it closes it.
    async fn close(&self) -> Result<()> {
        // Fetches still running finish first, copies included: their data was read from the
        // (maybe slow) backing already, and a read that returned before its unit's copy must
        // still leave the unit in the top. Only then do copies and read-ahead stop.
        self.inner.quiesce().await;
        self.inner.closed.store(true, Ordering::Release);
        self.inner.quiesce().await;
        // The summary is routine (info: `DISKSTREAM_LOG=diskstream_block::filter::cor=info`
        // shows it), unless something failed.
        let st = self.stats();
        if st.fetch_errors + st.populate_errors > 0 {
            tracing::warn!(
                "copy-on-read over '{}' closed: {st}",
                self.inner.file.filename()
            );
        } else {
            tracing::info!(
                "copy-on-read over '{}' closed: {st}",
                self.inner.file.filename()
            );
        }
        if self.inner.file.read_only() {
            return Ok(());
        }
        self.inner.file.flush().await
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
