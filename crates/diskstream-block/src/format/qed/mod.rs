//! The QED format driver (QEMU Enhanced Disk), byte-compatible with QEMU 10.
//!
//! QED maps guest clusters through a fixed L1 table and L2 tables allocated on demand; an L2
//! entry is 0 (unallocated: read the backing file, or zeroes), 1 (a zero cluster) or the file
//! offset of a data cluster. There are no refcounts and no internal snapshots: clusters are
//! appended at the end of the file and never freed (see [`meta`] for allocation and the
//! crash-safe write-back order).
//!
//! Requests are split into *runs* of clusters that map the same way (contiguous data, zero,
//! unallocated) within one L2 table. The metadata lock is held only to compute a run or commit
//! L2 entries; data I/O happens outside it, so requests on one image run in parallel.
//!
//! An allocating write registers its guest clusters as in flight, appends host clusters, writes
//! whole clusters (guest data plus the current contents of the partial head and tail, read
//! through this driver: backing data for unallocated clusters, zeroes for zero clusters), and
//! only then points the L2 entries at them. A second writer of the same cluster waits for the
//! first; reads never wait (they see the old mapping until the commit). (QEMU 10 fills the
//! head and tail of a partial write into a *zero* cluster from the backing file, so the rest of
//! that cluster reads the backing file's old data instead of zeroes; we keep the zeroes.)
//!
//! # Copy-on-read population (streaming)
//! [`BlockNode::write_if_unallocated`] and [`BlockNode::zero_if_unallocated`] decide per
//! cluster under the metadata lock, after waiting for the cluster's in-flight token, and an
//! allocating population registers its own token before dropping the lock, exactly like an
//! allocating guest write: a guest write either committed first (the copy skips the cluster)
//! or waits for the copy's commit and then overwrites it in place. A copy never reaches a
//! cluster that holds guest data.
//!
//! # Differences from QEMU
//! * Discard is a no-op (QEMU's QED has no discard either); write-zeroes marks whole
//!   unallocated clusters zero and zeroes allocated ones in place, as QEMU does.
//! * Growing an image whose backing file is longer makes the new area read as zeroes (QEMU
//!   refuses that resize); shrinking is refused, as in QEMU.
//! * A dirty image (need-check flag) opened read-write is checked and repaired like QEMU does,
//!   but the open fails if corruptions remain (QEMU opens it anyway).

pub mod check;
pub mod create;
pub mod header;
pub mod meta;

use crate::error::{BlockError, Result};
use crate::format::util::write_zero_data;
use crate::node::{
    check_bounds, read_backing, Allocation, BackingFormatHint, BackingLink, BlockNode, LayerStatus,
};
use crate::protocol::{DebugEvent, Protocol};
use async_trait::async_trait;
use header::{Header, F_BACKING_FILE, F_BACKING_FORMAT_NO_PROBE, F_NEED_CHECK, ZERO_CLUSTER};
use meta::Meta;
use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::{Mutex, MutexGuard, Notify};

/// Most bytes one allocating step appends (bounded so one request does not hold many
/// clusters' tokens or buffer huge amounts).
const MAX_ALLOC_BYTES: u64 = 32 << 20;

/// How a run of guest bytes is stored in this layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Unalloc,
    Zero,
    Data,
}

/// A maximal stretch of guest bytes with one mapping.
#[derive(Clone, Copy, Debug)]
struct Run {
    kind: Kind,
    /// Host offset of the run's first byte (data runs).
    host: Option<u64>,
    len: u64,
}

/// An open QED image.
pub struct Qed {
    file: Arc<dyn Protocol>,
    meta: Mutex<Meta>,
    backing: RwLock<Option<Arc<dyn BlockNode>>>,
    /// The backing format as known in memory (see [`Qed::backing_format`]).
    backing_format: RwLock<Option<String>>,
    size: AtomicU64,
    cluster_size: u64,
    closed: AtomicBool,
}

/// Read the header (with the backing file name) of the QED image on `file`.
pub async fn read_header(file: &Arc<dyn Protocol>) -> Result<Header> {
    let name = file.name().to_string();
    let file_len = file.len().await?;
    let head = file.read_vec(0, header::HEADER_LEN).await?;
    let mut h = Header::parse_fixed(&name, &head, file_len)?;
    if h.features & F_BACKING_FILE != 0 {
        let raw = file
            .read_vec(
                h.backing_filename_offset as u64,
                h.backing_filename_size as usize,
            )
            .await?;
        let s = String::from_utf8(raw)
            .map_err(|_| BlockError::invalid(&name, "QED backing file name is not valid UTF-8"))?;
        h.backing_file = Some(s);
    }
    Ok(h)
}

impl Qed {
    /// Open a QED image on `file`. The backing node (if the image has one) is opened by the
    /// caller, which owns the chain policy, and attached with
    /// [`BlockNode::set_backing_node`]. A read-write open of an image whose need-check flag is
    /// set runs the consistency check with repairs first, as QEMU does.
    pub async fn open(file: Arc<dyn Protocol>) -> Result<Qed> {
        let mut h = read_header(&file).await?;
        let ro = file.read_only();
        if !ro && h.features & F_NEED_CHECK != 0 {
            let r = check::check(Arc::clone(&file), check::RepairMode::All).await?;
            if r.corruptions > 0 || r.check_errors > 0 {
                return Err(BlockError::corrupt(
                    file.name(),
                    format!(
                        "Could not repair dirty image: {} corruptions and {} check errors remain \
                         (run 'diskstream img check -r all' for details)",
                        r.corruptions, r.check_errors
                    ),
                ));
            }
            h = read_header(&file).await?;
        }
        let file_len = file.len().await?;
        let mut meta = Meta::load(h.clone(), Arc::clone(&file), file_len).await?;
        if !ro && h.autoclear_features != 0 {
            // Unknown autoclear bits are stale as soon as we may write (QEMU clears them too).
            meta.header.autoclear_features = 0;
            meta.write_header().await?;
            file.flush().await?;
        }
        Ok(Qed {
            size: AtomicU64::new(h.image_size),
            cluster_size: h.cluster_size as u64,
            file,
            meta: Mutex::new(meta),
            backing: RwLock::new(None),
            backing_format: RwLock::new(
                (h.features & F_BACKING_FORMAT_NO_PROBE != 0).then(|| "raw".to_string()),
            ),
            closed: AtomicBool::new(false),
        })
    }

    /// The header as currently in memory.
    pub async fn header(&self) -> Header {
        self.meta.lock().await.header.clone()
    }

    /// The backing file's format as known in memory: `raw` when the header's no-probe flag
    /// says so, else the format given when the backing link was last rewritten in this
    /// process (the header records only whether the backing file is raw; QEMU shows the same
    /// in-memory value in its image info).
    pub fn backing_format(&self) -> Option<String> {
        self.backing_format.read().ok().and_then(|f| f.clone())
    }

    /// The protocol under the image.
    pub fn protocol(&self) -> &Arc<dyn Protocol> {
        &self.file
    }

    fn cs(&self) -> u64 {
        self.cluster_size
    }

    fn backing_node(&self) -> Option<Arc<dyn BlockNode>> {
        self.backing.read().ok().and_then(|b| b.clone())
    }

    async fn lock_writable(&self) -> Result<MutexGuard<'_, Meta>> {
        if self.file.read_only() {
            return Err(BlockError::ReadOnly(self.file.name().to_string()));
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(BlockError::InvalidArgument(format!(
                "{}: image is closed",
                self.file.name()
            )));
        }
        Ok(self.meta.lock().await)
    }

    /// The run starting at guest `off`, at most `len` bytes, within one L2 table.
    async fn map_run(&self, m: &mut Meta, off: u64, len: u64) -> Result<Run> {
        let cs = self.cs();
        let span = m.header.l2_span();
        let limit = (off + len).min((off / span + 1) * span);
        let mut pos = off;
        let mut run: Option<Run> = None;
        while pos < limit {
            let gc = pos / cs;
            let e = m.get(gc).await?;
            let (kind, host) = match e {
                0 => (Kind::Unalloc, None),
                ZERO_CLUSTER => (Kind::Zero, None),
                h => (Kind::Data, Some(h + pos % cs)),
            };
            let n = ((gc + 1) * cs).min(limit) - pos;
            match &mut run {
                None => run = Some(Run { kind, host, len: n }),
                Some(r) => {
                    let contiguous = match (r.host, host) {
                        (Some(a), Some(b)) => a + r.len == b,
                        (None, None) => true,
                        _ => false,
                    };
                    if r.kind != kind || !contiguous {
                        break;
                    }
                    r.len += n;
                }
            }
            pos += n;
        }
        run.ok_or_else(|| BlockError::corrupt(self.file.name(), "empty mapping run"))
    }

    async fn run_at(&self, off: u64, len: u64) -> Result<Run> {
        let mut m = self.meta.lock().await;
        self.map_run(&mut m, off, len).await
    }

    async fn read_run(&self, run: &Run, off: u64, dst: &mut [u8]) -> Result<()> {
        match (run.kind, run.host) {
            (Kind::Data, Some(host)) => {
                self.file.debug_event(DebugEvent::ReadAio);
                self.file.read_at(host, dst).await
            }
            (Kind::Data, None) => Err(BlockError::corrupt(
                self.file.name(),
                "data run without host offset",
            )),
            (Kind::Zero, _) => {
                dst.fill(0);
                Ok(())
            }
            (Kind::Unalloc, _) => read_backing(self.backing_node().as_ref(), off, dst).await,
        }
    }

    /// Guest contents of `[off, off+buf.len())`, zero past the virtual size.
    async fn read_current(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.size();
        let avail = size.saturating_sub(off).min(buf.len() as u64) as usize;
        buf[avail..].fill(0);
        let mut pos = 0usize;
        while pos < avail {
            let run = self.run_at(off + pos as u64, (avail - pos) as u64).await?;
            let n = run.len as usize;
            self.read_run(&run, off + pos as u64, &mut buf[pos..pos + n])
                .await?;
            pos += n;
        }
        Ok(())
    }

    /// Wait until no allocation is in flight for guest clusters `[gc, gc+n)`; returns the
    /// (re-taken) lock.
    async fn wait_inflight<'a>(
        &'a self,
        mut m: MutexGuard<'a, Meta>,
        gc: u64,
        n: u64,
    ) -> MutexGuard<'a, Meta> {
        loop {
            let busy: Option<Arc<Notify>> = (gc..gc + n).find_map(|c| m.inflight.get(&c).cloned());
            let Some(notify) = busy else { return m };
            let fut = notify.notified();
            drop(m);
            fut.await;
            m = self.meta.lock().await;
        }
    }

    /// Set the need-check flag before an allocation, as QEMU does for images without a
    /// backing file.
    async fn before_allocation(&self, m: &mut Meta) -> Result<()> {
        if self.backing_node().is_none() {
            m.mark_need_check().await?;
        }
        Ok(())
    }

    /// One step of a write: handles a prefix of `data` at `off` and returns its length and
    /// whether it was written (`only_unallocated` skips prefixes this layer allocates; see the
    /// module documentation).
    async fn write_step(
        &self,
        off: u64,
        data: &[u8],
        only_unallocated: bool,
    ) -> Result<(usize, bool)> {
        let cs = self.cs();
        let mut m = self.lock_writable().await?;
        m = self.wait_inflight(m, off / cs, 1).await;
        let run = self.map_run(&mut m, off, data.len() as u64).await?;
        if only_unallocated && run.kind != Kind::Unalloc {
            return Ok((run.len as usize, false));
        }
        if let (Kind::Data, Some(host)) = (run.kind, run.host) {
            drop(m);
            let n = run.len as usize;
            self.file.debug_event(DebugEvent::WriteAio);
            self.file.write_at(host, &data[..n]).await?;
            return Ok((n, true));
        }
        // Allocation of the run's clusters (all unallocated, or all zero).
        let gc = off / cs;
        let run_end = off + run.len;
        let last_gc = (run_end - 1) / cs;
        let max_clusters = (MAX_ALLOC_BYTES / cs).max(1);
        let mut n = 1;
        while n < max_clusters && gc + n <= last_gc && !m.inflight.contains_key(&(gc + n)) {
            n += 1;
        }
        self.before_allocation(&mut m).await?;
        // Data first, then (if needed) its L2 table right after it: QEMU's layout.
        let host = m.alloc(n);
        m.prepare_l2(gc).await?;
        let notify = Arc::new(Notify::new());
        for c in gc..gc + n {
            m.inflight.insert(c, Arc::clone(&notify));
        }
        drop(m);
        let start = gc * cs;
        let stop = (gc + n) * cs;
        let end = run_end.min(stop);
        let res = async {
            let mut buf = vec![0u8; (stop - start) as usize];
            self.read_current(start, &mut buf[..(off - start) as usize])
                .await?;
            let tail = (end - start) as usize;
            if end < stop {
                self.read_current(end, &mut buf[tail..]).await?;
            }
            buf[(off - start) as usize..tail].copy_from_slice(&data[..(end - off) as usize]);
            self.file.debug_event(DebugEvent::WriteAio);
            self.file.write_vec(host, buf).await
        }
        .await;
        let mut m = self.meta.lock().await;
        let res = match res {
            Ok(()) => {
                let mut r = Ok(());
                for i in 0..n {
                    if let Err(e) = m.set(gc + i, host + i * cs).await {
                        r = Err(e);
                        break;
                    }
                }
                r
            }
            // The appended clusters stay unreferenced (a leak, as any QED allocation that
            // does not complete).
            Err(e) => Err(e),
        };
        for c in gc..gc + n {
            m.inflight.remove(&c);
        }
        notify.notify_waiters();
        drop(m);
        res?;
        Ok(((end - off) as usize, true))
    }

    /// Whole clusters `[gc, gc+n)` read as zeroes: unallocated ones become zero clusters,
    /// data clusters are zeroed in place (QED cannot free them).
    async fn zero_clusters(&self, gc: u64, n: u64, unmap: bool) -> Result<()> {
        let cs = self.cs();
        let mut m = self.lock_writable().await?;
        m = self.wait_inflight(m, gc, n).await;
        let mut in_place: Vec<(u64, u64)> = Vec::new();
        for c in gc..gc + n {
            match m.get(c).await? {
                0 => {
                    self.before_allocation(&mut m).await?;
                    m.set(c, ZERO_CLUSTER).await?;
                }
                ZERO_CLUSTER => {}
                h => match in_place.last_mut() {
                    Some((a, len)) if *a + *len == h => *len += cs,
                    _ => in_place.push((h, cs)),
                },
            }
        }
        drop(m);
        for (h, len) in in_place {
            self.file.write_zeroes(h, len, unmap).await?;
        }
        Ok(())
    }

    /// Mark the still-unallocated clusters of `[gc, gc+n)` as zero in one critical section
    /// after their in-flight allocations finished; returns the guest bytes marked.
    async fn zero_clusters_if_unallocated(&self, gc: u64, n: u64) -> Result<u64> {
        let cs = self.cs();
        let size = self.size();
        let mut m = self.lock_writable().await?;
        m = self.wait_inflight(m, gc, n).await;
        let mut marked = 0;
        for c in gc..gc + n {
            if m.get(c).await? == 0 {
                self.before_allocation(&mut m).await?;
                m.set(c, ZERO_CLUSTER).await?;
                marked += cs.min(size.saturating_sub(c * cs));
            }
        }
        Ok(marked)
    }

    async fn write_explicit_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        write_zero_data(self, offset, len, false).await.map(|_| ())
    }

    async fn write_zero_data_if_unallocated(&self, offset: u64, len: u64) -> Result<u64> {
        write_zero_data(self, offset, len, true).await
    }

    /// The whole clusters inside `[offset, offset+len)`, as `(first byte, end byte)`.
    fn whole_clusters(&self, offset: u64, len: u64) -> (u64, u64) {
        let cs = self.cs();
        let a = offset.div_ceil(cs) * cs;
        let b = (offset + len) / cs * cs;
        (a, b.max(a))
    }

    /// Deallocate every cluster (all of the image reads from the backing file again), as
    /// `commit` does to the committed image: the L1 table is emptied and flushed, then the file
    /// is cut back to the header and the L1 table. A crash in between leaves leaks only.
    pub async fn make_empty(&self) -> Result<()> {
        let clusters = self.size().div_ceil(self.cs());
        let mut m = self.lock_writable().await?;
        m = self.wait_inflight(m, 0, clusters).await;
        m.flush().await?;
        m.clear_l1();
        m.flush().await?;
        m.truncate_to_tables().await
    }

    /// Run the consistency check on the open image (read-only check: nothing is changed).
    pub async fn check(&self) -> Result<check::CheckResult> {
        let mut m = self.meta.lock().await;
        if !self.file.read_only() {
            m.flush().await?;
        }
        drop(m);
        check::check(Arc::clone(&self.file), check::RepairMode::None).await
    }
}

#[async_trait]
impl BlockNode for Qed {
    fn format_name(&self) -> &'static str {
        "qed"
    }
    fn filename(&self) -> &str {
        self.file.name()
    }
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    fn read_only(&self) -> bool {
        self.file.read_only()
    }
    fn remote(&self) -> bool {
        self.file.remote()
    }
    fn backing(&self) -> Option<Arc<dyn BlockNode>> {
        self.backing_node()
    }
    fn cluster_size(&self) -> Option<u64> {
        Some(self.cs())
    }
    /// QED stores copied backing data per cluster (`write_if_unallocated`), so copy-on-read
    /// and streaming can populate it.
    fn can_populate(&self) -> bool {
        true
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_bounds(offset, buf.len() as u64, self.size())?;
        self.read_current(offset, buf).await
    }

    async fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        check_bounds(offset, data.len() as u64, self.size())?;
        let mut pos = 0;
        while pos < data.len() {
            pos += self
                .write_step(offset + pos as u64, &data[pos..], false)
                .await?
                .0;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        check_bounds(offset, len, self.size())?;
        if len == 0 {
            return Ok(());
        }
        // Like QEMU: whole clusters through the tables, partial ones as zero data.
        let (a, b) = self.whole_clusters(offset, len);
        let end = offset + len;
        if a >= b {
            return self.write_explicit_zeroes(offset, len).await;
        }
        if offset < a {
            self.write_explicit_zeroes(offset, a - offset).await?;
        }
        let cs = self.cs();
        self.zero_clusters(a / cs, (b - a) / cs, unmap).await?;
        if b < end {
            self.write_explicit_zeroes(b, end - b).await?;
        }
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // QED cannot free clusters; like QEMU, discard does nothing.
        check_bounds(offset, len, self.size())
    }

    async fn flush(&self) -> Result<()> {
        if self.file.read_only() {
            return Ok(());
        }
        let mut m = self.meta.lock().await;
        m.flush().await
    }

    async fn write_if_unallocated(&self, offset: u64, data: &[u8]) -> Result<u64> {
        check_bounds(offset, data.len() as u64, self.size())?;
        let mut pos = 0;
        let mut written = 0u64;
        while pos < data.len() {
            let (n, wrote) = self
                .write_step(offset + pos as u64, &data[pos..], true)
                .await?;
            if wrote {
                written += n as u64;
            }
            pos += n;
        }
        Ok(written)
    }

    async fn zero_if_unallocated(&self, offset: u64, len: u64) -> Result<u64> {
        check_bounds(offset, len, self.size())?;
        if len == 0 {
            return Ok(0);
        }
        let (a, b) = self.whole_clusters(offset, len);
        let end = offset + len;
        if a >= b {
            return self.write_zero_data_if_unallocated(offset, len).await;
        }
        let cs = self.cs();
        let mut written = 0;
        if offset < a {
            written += self
                .write_zero_data_if_unallocated(offset, a - offset)
                .await?;
        }
        written += self
            .zero_clusters_if_unallocated(a / cs, (b - a) / cs)
            .await?;
        if b < end {
            written += self.write_zero_data_if_unallocated(b, end - b).await?;
        }
        Ok(written)
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<LayerStatus> {
        check_bounds(offset, len, self.size())?;
        let run = self.run_at(offset, len).await?;
        Ok(LayerStatus {
            alloc: match run.kind {
                Kind::Data => Allocation::Data,
                Kind::Zero => Allocation::Zero,
                Kind::Unalloc => Allocation::Unallocated,
            },
            len: run.len,
            host_offset: run.host,
            compressed: false,
            zero: run.kind == Kind::Zero,
        })
    }

    async fn truncate(&self, new_size: u64) -> Result<()> {
        let cs = self.cs();
        let old_size = self.size();
        if new_size == old_size {
            return Ok(());
        }
        let mut m = self.lock_writable().await?;
        let (mcs, ts) = (m.header.cluster_size as u64, m.header.table_size as u64);
        if !header::image_size_valid(new_size, mcs, ts) {
            return Err(BlockError::InvalidArgument(format!(
                "Invalid image size specified (a multiple of 512 up to {})",
                header::max_image_size(mcs, ts)
            )));
        }
        if new_size < old_size {
            return Err(BlockError::InvalidArgument(
                "Shrinking images is currently not supported".to_string(),
            ));
        }
        m.flush().await?;
        m.header.image_size = new_size;
        m.write_header().await?;
        self.file.flush().await?;
        self.size.store(new_size, Ordering::Release);
        drop(m);
        // The new area must read as zeroes: a longer backing file must not show through, and
        // neither may stale bytes in the tail of the old last cluster.
        let backing_size = self.backing_node().map_or(0, |b| b.size());
        let zero_start = old_size.div_ceil(cs) * cs;
        if backing_size > old_size {
            if new_size > zero_start {
                self.write_zeroes(zero_start, new_size - zero_start, false)
                    .await?;
            }
            if zero_start > old_size {
                let len = zero_start.min(new_size) - old_size;
                self.write(old_size, &vec![0u8; len as usize]).await?;
            }
            self.flush().await?;
        } else if zero_start > old_size {
            let run = self.run_at(old_size, zero_start - old_size).await?;
            if run.kind == Kind::Data {
                let len = zero_start.min(new_size) - old_size;
                self.write(old_size, &vec![0u8; len as usize]).await?;
                self.flush().await?;
            }
        }
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        if !self.file.read_only() && !self.closed.swap(true, Ordering::AcqRel) {
            let mut m = self.meta.lock().await;
            // The flush also clears the need-check flag: a clean close.
            m.flush().await?;
        }
        Ok(())
    }

    async fn backing_link(&self) -> Option<BackingLink> {
        let h = self.header().await;
        h.backing_file.map(|name| BackingLink {
            name,
            format: if h.features & F_BACKING_FORMAT_NO_PROBE != 0 {
                BackingFormatHint::Named("raw".to_string())
            } else {
                BackingFormatHint::NotRaw
            },
        })
    }

    fn set_backing_node(&self, node: Option<Arc<dyn BlockNode>>) {
        if let Ok(mut b) = self.backing.write() {
            *b = node;
        }
    }

    /// QED records the backing file name right after the 64 header bytes, and of its format
    /// only whether it is raw. Everything written before is flushed first and the header
    /// write is flushed too, so a crash never leaves a header that references less (or other)
    /// data than the clusters on disk assume.
    async fn set_backing_file(&self, file: Option<(String, Option<String>)>) -> Result<()> {
        let mut m = self.lock_writable().await?;
        if file.is_some() && m.header.compat_features != 0 {
            return Err(BlockError::unsupported(
                self.file.name(),
                "cannot record a backing file with unknown compatible features set",
            ));
        }
        let mut h = m.header.clone();
        h.features &= !(F_BACKING_FILE | F_BACKING_FORMAT_NO_PROBE);
        let name = match &file {
            Some((name, fmt)) => {
                h.features |= F_BACKING_FILE;
                if fmt.as_deref() == Some("raw") {
                    h.features |= F_BACKING_FORMAT_NO_PROBE;
                }
                name.clone()
            }
            None => String::new(),
        };
        h.backing_filename_offset = header::HEADER_LEN as u32;
        h.backing_filename_size = name.len() as u32;
        if header::HEADER_LEN as u64 + name.len() as u64 > h.header_bytes()
            || name.len() as u32 > header::MAX_BACKING_NAME
        {
            return Err(BlockError::NoSpace(format!(
                "{}: backing file name does not fit in the QED header",
                self.file.name()
            )));
        }
        let fmt = file.as_ref().and_then(|(_, f)| f.clone());
        h.backing_file = file.map(|(n, _)| n);
        m.flush().await?;
        let mut bytes = h.serialize().to_vec();
        bytes.extend_from_slice(name.as_bytes());
        self.file.write_vec(0, bytes).await?;
        self.file.flush().await?;
        m.header = h;
        if let Ok(mut f) = self.backing_format.write() {
            *f = fmt;
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
