//! Fetch units: reading missing backing data once, into a bounce buffer, and copying it into
//! the top image.
//!
//! A fetch covers one aligned unit of the device. It runs as its own task (so a guest request
//! that gives up, e.g. a client that disconnects, does not cancel a fetch other readers wait
//! for) and goes through three steps:
//!
//! 1. **Plan** (metadata only): which parts of the unit the top image does not allocate, and of
//!    those, which the layers down to `bottom` provide. Parts are widened to the top's
//!    allocation unit (cluster or subcluster), so copies fill whole units.
//! 2. **Read** the planned parts from the backing chain into the fetch's own buffer — never
//!    into a caller's buffer, which the caller (a guest) may scribble on while the read is in
//!    flight — and publish the buffer to every reader waiting for the unit.
//! 3. **Populate** the top from that buffer with the no-clobber primitives
//!    ([`BlockNode::write_if_unallocated`], [`BlockNode::zero_if_unallocated`] for parts that
//!    read as zeroes): decided per cluster under the top's metadata lock, so a guest write that
//!    landed first is never overwritten and one that comes later waits for the copy's cluster
//!    allocation and then writes over it.
//!
//! The unit stays in the in-flight map until step 3 is done, so concurrent readers of the unit
//! join it instead of reading the backing again. A guest write, write-zeroes or discard through
//! the filter removes the units it touched from the map when it completes: a read issued after
//! that write starts a fresh fetch whose plan sees the write, instead of joining a fetch planned
//! before it.

use super::config::bump;
use super::Inner;
use crate::error::{BlockError, Result};
use crate::node::{same_node, Allocation, BlockNode};
use crate::status::allocated_above;
use std::sync::Arc;
use tokio::sync::{watch, OwnedSemaphorePermit};

/// Two planned parts of a unit closer than this fraction of the unit are read from the backing
/// in one request (the bytes between are read and ignored): one round trip instead of two.
const MERGE_GAP_DIVISOR: u64 = 4;

/// Why a fetch was started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Origin {
    /// A guest read needs the unit.
    Guest,
    /// Read-ahead of a sequential reader.
    Readahead,
}

/// The backing data of one unit, read into the fetch's bounce buffer.
#[derive(Debug)]
pub(super) struct UnitData {
    /// Guest offset of `data[0]`.
    pub start: u64,
    /// The bounce buffer (meaningful only inside `ranges`).
    pub data: Vec<u8>,
    /// Guest ranges whose current contents are in `data`: the parts the top did not allocate
    /// and the chain down to `bottom` provides. Sorted, disjoint.
    pub ranges: Vec<(u64, u64)>,
    /// Whether `ranges` are all the unit lacked (nothing was left out because of `bottom`):
    /// once they are copied, the top holds the whole unit.
    pub complete: bool,
}

/// A failed fetch, shareable between its waiters.
#[derive(Clone, Debug)]
struct FetchError {
    errno: i32,
    msg: Arc<str>,
}

impl FetchError {
    fn to_block(&self) -> BlockError {
        BlockError::Io {
            context: self.msg.to_string(),
            source: std::io::Error::from_raw_os_error(self.errno),
        }
    }
}

type FetchResult = std::result::Result<Arc<UnitData>, FetchError>;

/// One unit being fetched; readers wait on it.
#[derive(Debug)]
pub(super) struct Fetch {
    tx: watch::Sender<Option<FetchResult>>,
}

impl Fetch {
    fn new() -> Arc<Fetch> {
        Arc::new(Fetch {
            tx: watch::Sender::new(None),
        })
    }

    /// Wait for the unit's data (published before the copy into the top is done).
    pub async fn wait(&self) -> Result<Arc<UnitData>> {
        let mut rx = self.tx.subscribe();
        let r = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone(),
            Err(_) => None,
        };
        match r {
            Some(Ok(d)) => Ok(d),
            Some(Err(e)) => Err(e.to_block()),
            None => Err(BlockError::Io {
                context: "copy-on-read fetch ended without a result".into(),
                source: std::io::Error::from_raw_os_error(5),
            }),
        }
    }
}

/// Whether every byte of `b` is zero (64-byte blocks, so the compiler vectorises it).
pub(super) fn is_zero(b: &[u8]) -> bool {
    let split = b.len() / 64 * 64;
    let (blocks, rest) = b.split_at(split);
    blocks
        .chunks_exact(64)
        .all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
        && rest.iter().all(|&x| x == 0)
}

/// Append `[a, b)` to sorted disjoint `v`, merging with the last range when they touch.
fn push_range(v: &mut Vec<(u64, u64)>, a: u64, b: u64) {
    match v.last_mut() {
        Some(last) if last.1 >= a => last.1 = last.1.max(b),
        _ => v.push((a, b)),
    }
}

impl Inner {
    /// The fetch of unit `u` for a guest read: joins the one in flight, or starts one.
    pub(super) fn fetch(self: &Arc<Self>, u: u64) -> Arc<Fetch> {
        let mut units = self.units();
        if let Some(f) = units.inflight.get(&u) {
            bump(&self.counters.deduplicated, 1);
            return Arc::clone(f);
        }
        let f = Fetch::new();
        units.inflight.insert(u, Arc::clone(&f));
        drop(units);
        self.spawn_fetch(u, Arc::clone(&f), Origin::Guest, None);
        f
    }

    /// Start read-ahead fetches of `units` while background slots are free; a unit already in
    /// flight or known local is skipped, and when all slots are busy the rest is dropped
    /// (never queued).
    pub(super) fn readahead(self: &Arc<Self>, units: std::ops::Range<u64>) {
        for u in units {
            if self.is_closed() {
                return;
            }
            {
                let map = self.units();
                if map.inflight.contains_key(&u) || map.is_local(u) {
                    continue;
                }
            }
            let Ok(permit) = Arc::clone(&self.background).try_acquire_owned() else {
                return;
            };
            let mut map = self.units();
            if map.inflight.contains_key(&u) {
                continue;
            }
            let f = Fetch::new();
            map.inflight.insert(u, Arc::clone(&f));
            drop(map);
            self.spawn_fetch(u, f, Origin::Readahead, Some(permit));
        }
    }

    fn spawn_fetch(
        self: &Arc<Self>,
        u: u64,
        f: Arc<Fetch>,
        origin: Origin,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        let guard = self.task_guard();
        let me = Arc::clone(self);
        // A guest's fetch keeps its reader's priority (a job reading through the filter stays
        // background); read-ahead is speculative, so it is background.
        let class = match origin {
            Origin::Guest => crate::priority::current(),
            Origin::Readahead => crate::priority::IoClass::Background,
        };
        tokio::spawn(async move {
            let _guard = guard;
            let _permit = permit;
            match class {
                crate::priority::IoClass::Foreground => me.run_fetch(u, &f, origin).await,
                crate::priority::IoClass::Background => {
                    crate::priority::background(me.run_fetch(u, &f, origin)).await
                }
            }
        });
    }

    /// Plan, read, publish, populate; then leave the in-flight map, marking the unit local
    /// when the top now holds all of it (unless a guest write invalidated the fetch meanwhile).
    async fn run_fetch(&self, u: u64, f: &Arc<Fetch>, origin: Origin) {
        let mut local = false;
        match self.read_unit(u).await {
            Ok(data) => {
                let data = Arc::new(data);
                if !data.ranges.is_empty() {
                    match origin {
                        Origin::Guest => bump(&self.counters.fetches, 1),
                        Origin::Readahead => bump(&self.counters.readahead_fetches, 1),
                    }
                }
                f.tx.send_replace(Some(Ok(Arc::clone(&data))));
                local = self.populate(&data).await && data.complete;
            }
            Err(e) => {
                bump(&self.counters.fetch_errors, 1);
                tracing::debug!(
                    unit = u,
                    ?origin,
                    "copy-on-read fetch of '{}' failed: {e}",
                    self.file.filename()
                );
                f.tx.send_replace(Some(Err(FetchError {
                    errno: e.errno(),
                    msg: format!(
                        "copy-on-read of '{}' at {}: {e}",
                        self.file.filename(),
                        u * self.unit
                    )
                    .into(),
                })));
            }
        }
        let mut map = self.units();
        if map.inflight.get(&u).is_some_and(|g| Arc::ptr_eq(g, f)) {
            map.inflight.remove(&u);
            if local {
                map.set_local(u);
            }
        }
    }

    /// Steps 1 and 2: plan the unit and read its missing parts into a bounce buffer.
    async fn read_unit(&self, u: u64) -> Result<UnitData> {
        let size = self.file.size();
        let start = u * self.unit;
        let mut out = UnitData {
            start,
            data: Vec::new(),
            ranges: Vec::new(),
            complete: true,
        };
        if start >= size {
            return Ok(out);
        }
        let end = (start + self.unit).min(size);
        let missing = self.missing(start, end).await?;
        if missing.is_empty() {
            return Ok(out);
        }
        let backing = self.file.backing();
        out.ranges = match &self.bottom {
            None => missing,
            Some(bottom) => {
                let r = match &backing {
                    Some(b) => self.above_bottom(b, bottom, &missing).await?,
                    None => Vec::new(),
                };
                out.complete = r == missing;
                r
            }
        };
        let Some(&(first, _)) = out.ranges.first() else {
            return Ok(out);
        };
        let last = out.ranges.last().map_or(first, |r| r.1);
        out.data = vec![0u8; (last - start) as usize];
        let mut reads: Vec<(u64, u64)> = Vec::new();
        let gap = self.unit / MERGE_GAP_DIVISOR;
        for &(a, b) in &out.ranges {
            match reads.last_mut() {
                Some(r) if a - r.1 <= gap => r.1 = b,
                _ => reads.push((a, b)),
            }
        }
        for (a, b) in reads {
            let buf = &mut out.data[(a - start) as usize..(b - start) as usize];
            self.read_backing(backing.as_ref(), a, buf).await?;
        }
        Ok(out)
    }

    /// The parts of `[start, end)` the top image does not allocate.
    async fn missing(&self, start: u64, end: u64) -> Result<Vec<(u64, u64)>> {
        let mut v = Vec::new();
        let mut pos = start;
        while pos < end {
            let st = self.file.block_status(pos, end - pos).await?;
            let n = st.len.clamp(1, end - pos);
            if st.alloc == Allocation::Unallocated {
                push_range(&mut v, pos, pos + n);
            }
            pos += n;
        }
        Ok(v)
    }

    /// Of the `missing` ranges, the allocation units that some layer from `backing` down to
    /// `bottom` (inclusive) allocates, at least in part. Nothing when `bottom` is no longer in
    /// the chain (a stream or commit removed it: what is left below is what COR must not copy).
    async fn above_bottom(
        &self,
        backing: &Arc<dyn BlockNode>,
        bottom: &Arc<dyn BlockNode>,
        missing: &[(u64, u64)],
    ) -> Result<Vec<(u64, u64)>> {
        let mut node = Some(Arc::clone(backing));
        let mut found = false;
        while let Some(n) = node {
            if same_node(&n, bottom) {
                found = true;
                break;
            }
            node = n.backing();
        }
        if !found {
            return Ok(Vec::new());
        }
        let base = bottom.backing();
        let bsize = backing.size();
        let mut v = Vec::new();
        for &(a, b) in missing {
            let stop = b.min(bsize);
            let mut pos = a;
            while pos < stop {
                let (alloc, n) = allocated_above(backing, base.as_ref(), pos, stop - pos).await?;
                let n = n.clamp(1, stop - pos);
                if alloc {
                    let s = (pos / self.align * self.align).max(a);
                    let e = (pos + n)
                        .div_ceil(self.align)
                        .saturating_mul(self.align)
                        .min(b);
                    push_range(&mut v, s, e);
                }
                pos += n;
            }
        }
        Ok(v)
    }

    /// Read `buf.len()` bytes of the backing chain at `offset`; past its end reads as zeroes.
    async fn read_backing(
        &self,
        backing: Option<&Arc<dyn BlockNode>>,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let avail = backing.map_or(0, |b| {
            b.size().saturating_sub(offset).min(buf.len() as u64) as usize
        });
        if let (Some(b), true) = (backing, avail > 0) {
            bump(&self.counters.backing_reads, 1);
            bump(&self.counters.backing_bytes, avail as u64);
            b.read(offset, &mut buf[..avail]).await?;
        }
        buf[avail..].fill(0);
        Ok(())
    }

    /// Step 3: copy the fetched ranges into the top, runs of all-zero allocation units as
    /// zeroes. A failure stops the copy (the read already has its data; the rest of the unit
    /// is simply fetched again by a later read). Returns whether every range was copied.
    async fn populate(&self, d: &UnitData) -> bool {
        if self.is_closed() {
            return false;
        }
        let align = self.align;
        let zero_at = |p: u64, b: u64| {
            let e = ((p / align + 1) * align).min(b);
            (
                e,
                is_zero(&d.data[(p - d.start) as usize..(e - d.start) as usize]),
            )
        };
        for &(a, b) in &d.ranges {
            let mut pos = a;
            while pos < b {
                let (mut e, zero) = zero_at(pos, b);
                while e < b {
                    let (e2, z2) = zero_at(e, b);
                    if z2 != zero {
                        break;
                    }
                    e = e2;
                }
                let r = if zero {
                    self.file.zero_if_unallocated(pos, e - pos).await
                } else {
                    let data = &d.data[(pos - d.start) as usize..(e - d.start) as usize];
                    self.file.write_if_unallocated(pos, data).await
                };
                match r {
                    Ok(n) if zero => bump(&self.counters.bytes_zeroed, n),
                    Ok(n) => bump(&self.counters.bytes_copied, n),
                    Err(err) => {
                        let prior = self
                            .counters
                            .populate_errors
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let msg = format!(
                            "copy-on-read could not copy {} bytes at {pos} into '{}': {err}",
                            e - pos,
                            self.file.filename()
                        );
                        if prior == 0 {
                            tracing::warn!(
                                "{msg} (reads still succeed; further failures are logged at debug)"
                            );
                        } else {
                            tracing::debug!("{msg}");
                        }
                        return false;
                    }
                }
                pos = e;
            }
        }
        tracing::trace!(
            start = d.start,
            ranges = d.ranges.len(),
            "copy-on-read populated unit of '{}'",
            self.file.filename()
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        for len in [0usize, 1, 63, 64, 65, 4096, 4099] {
            let mut v = vec![0u8; len];
            assert!(is_zero(&v));
            if len > 0 {
                v[len - 1] = 1;
                assert!(!is_zero(&v), "len {len} last byte");
                v[len - 1] = 0;
                v[len / 2] = 0x80;
                assert!(!is_zero(&v), "len {len} middle byte");
            }
        }
    }

    #[test]
    fn ranges_merge_when_touching() {
        let mut v = Vec::new();
        push_range(&mut v, 0, 10);
        push_range(&mut v, 10, 20);
        push_range(&mut v, 30, 40);
        push_range(&mut v, 35, 50);
        assert_eq!(v, vec![(0, 20), (30, 50)]);
    }
}
