//! The qcow2 format driver (v2 and v3), byte-compatible with QEMU 10.
//!
//! Guest requests are split into *runs*: stretches of guest clusters (or subclusters, with
//! extended L2) that map the same way (data at contiguous host offsets, zero, unallocated, or one
//! compressed cluster). The metadata lock is held only to compute a run or to commit L2 entries;
//! data I/O happens outside it, so requests on one image proceed in parallel.
//!
//! An allocating write registers its guest clusters as in flight, allocates host clusters, writes
//! the whole clusters (guest data plus the old contents of the partial head and tail, read through
//! this very driver), and only then points the L2 entries at them. A second writer of the same
//! cluster waits for the first; reads never wait (they see the old mapping until the commit).
//!
//! # Copy-on-read population (streaming)
//! [`BlockNode::write_if_unallocated`] and [`BlockNode::zero_if_unallocated`] write copied
//! backing data only into clusters that are unallocated *when the write is decided*. The
//! decision is taken under the metadata lock after waiting for the cluster's in-flight token,
//! and an allocating population registers its own token before dropping the lock, exactly like
//! an allocating guest write. So for a guest write G and a population P of the same cluster:
//! either G committed (or was in flight, and P waited for it) before P looked, and P skips the
//! cluster; or P registered first, G waits for P's L2 commit and then writes over the copy in
//! place. Either way the newest guest data wins, and a copy never reaches a cluster that holds
//! guest data.

pub mod amend;
pub mod check;
pub mod compress;
pub mod create;
pub mod header;
pub mod meta;

use crate::error::{BlockError, Result};
use crate::node::{check_bounds, read_backing, Allocation, BlockNode, LayerStatus};
use crate::protocol::{DebugEvent, Protocol};
use async_trait::async_trait;
use header::{CompressionType, Header};
use meta::{
    Meta, BITMAP_ALL_ALLOC, BITMAP_ALL_ZERO, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED,
    OFLAG_ZERO,
};
use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::{Mutex, MutexGuard, Notify};

/// Upper bound of one coalesced host read (see [`Qcow2::read_current`]).
const MAX_COALESCED_READ: u64 = 8 << 20;

/// Upper bound of one gathered data write of [`Qcow2::write_pieces`].
const MAX_GATHERED_WRITE: u64 = 8 << 20;

/// Where one stretch of a batch write goes (see [`Qcow2::write_pieces`]).
struct Segment {
    /// Guest offset of the stretch.
    guest: u64,
    /// Host offset it is written to.
    host: u64,
    /// Its bytes in the caller's buffer.
    data: std::ops::Range<usize>,
    /// For newly allocated clusters, the L2 entries they replace (one per cluster); empty for
    /// a stretch written in place.
    olds: Vec<u64>,
}

/// How a run of guest bytes is stored in this layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Unalloc,
    Zero,
    Data,
    Compressed,
}

/// A maximal stretch of guest bytes with one mapping.
#[derive(Clone, Copy, Debug)]
struct Run {
    kind: Kind,
    /// Host offset of the run's first byte (data, or preallocated zero).
    host: Option<u64>,
    len: u64,
    /// The L2 entry (for compressed runs).
    entry: u64,
    /// Whether the run's clusters are exclusively ours (COPIED), so writes may go in place.
    copied: bool,
}

/// The bytes of one guest write as [`Qcow2::write_step`] sees them: borrowed from the caller
/// (the protocol copies what it writes into an owned buffer for its I/O thread) or owned (the
/// protocol writes straight from the buffer and hands it back; bulk copies reuse it).
enum WriteSrc<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
}

impl WriteSrc<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            WriteSrc::Borrowed(d) => d,
            WriteSrc::Owned(v) => v,
        }
    }

    /// Write `range` of the bytes at `host` in `file`.
    async fn write_to(
        &mut self,
        file: &dyn Protocol,
        host: u64,
        range: std::ops::Range<usize>,
    ) -> Result<()> {
        match self {
            WriteSrc::Borrowed(d) => file.write_at(host, &d[range]).await,
            WriteSrc::Owned(v) => {
                let buf = std::mem::take(v);
                *v = file.write_gather(host, buf, vec![range], 0).await?;
                Ok(())
            }
        }
    }

    fn into_owned(self) -> Vec<u8> {
        match self {
            WriteSrc::Borrowed(d) => d.to_vec(),
            WriteSrc::Owned(v) => v,
        }
    }
}

/// An open qcow2 image.
pub struct Qcow2 {
    file: Arc<dyn Protocol>,
    meta: Mutex<Meta>,
    backing: RwLock<Option<Arc<dyn BlockNode>>>,
    size: AtomicU64,
    cluster_bits: u32,
    extended: bool,
    version: u32,
    compression: CompressionType,
    closed: AtomicBool,
    /// Whether the image looks metadata-preallocated (decided once, on the first block-status
    /// query whatever it finds, by [`Qcow2::detect_metadata_preallocation`]).
    metadata_prealloc: tokio::sync::OnceCell<bool>,
}

impl Qcow2 {
    /// Open a qcow2 image on `file`. The backing node (if the image has one) is opened by the
    /// caller, which owns the chain policy, and attached with [`Qcow2::set_backing_node`].
    pub async fn open(file: Arc<dyn Protocol>) -> Result<Qcow2> {
        let file_len = file.len().await?;
        let head = file
            .read_vec(0, file_len.min(1 << header::MAX_CLUSTER_BITS) as usize)
            .await?;
        let mut h = Header::parse(file.name(), &head, file_len)?;
        if h.incompatible_features & header::INCOMPAT_CORRUPT != 0 && !file.read_only() {
            return Err(BlockError::corrupt(
                file.name(),
                "image is marked corrupt; cannot be opened read/write (repair with check -r all)",
            ));
        }
        if h.incompatible_features & header::INCOMPAT_DIRTY != 0 && !file.read_only() {
            // As QEMU does: repair a dirty (lazy refcounts) image before writing to it.
            check::repair_dirty(Arc::clone(&file)).await?;
            let file_len = file.len().await?;
            let head = file
                .read_vec(0, file_len.min(1 << header::MAX_CLUSTER_BITS) as usize)
                .await?;
            h = Header::parse(file.name(), &head, file_len)?;
        }
        let meta = Meta::load(h.clone(), Arc::clone(&file)).await?;
        Ok(Qcow2 {
            file,
            size: AtomicU64::new(h.size),
            cluster_bits: h.cluster_bits,
            extended: h.extended_l2(),
            version: h.version,
            compression: h.compression(),
            meta: Mutex::new(meta),
            backing: RwLock::new(None),
            closed: AtomicBool::new(false),
            metadata_prealloc: tokio::sync::OnceCell::new(),
        })
    }

    /// The header as currently in memory.
    pub async fn header(&self) -> Header {
        self.meta.lock().await.header.clone()
    }

    /// Attach (or detach) the opened backing node.
    pub fn set_backing_node(&self, node: Option<Arc<dyn BlockNode>>) {
        if let Ok(mut b) = self.backing.write() {
            *b = node;
        }
    }

    /// Rewrite the backing file name and format recorded in the header (`None` drops the
    /// link). Flushes before and after, so a crash never leaves a header that references less
    /// (or other) data than the clusters on disk assume.
    ///
    /// The rewrite is also safe against torn writes: storage may persist any subset of the
    /// 512-byte sectors of a write. A header longer than a sector (with 64 KiB clusters the
    /// feature-name table alone pushes the backing name past the first sector) rewritten in one
    /// write could survive as the new sector 0 (name offset and length) with the old name
    /// sector, or the reverse, naming a file that does not exist. When the change spans
    /// sectors, the new name is first written to a scratch place in the header cluster that
    /// the old header does not reference, then sector 0 is switched to it (one sector: whole
    /// or not at all), then the name is written to its usual place and sector 0 switched back,
    /// with a flush after each step: every state a crash can leave names the old or the new
    /// file.
    pub async fn set_backing_file(&self, file: Option<(String, Option<String>)>) -> Result<()> {
        let mut m = self.lock_writable().await?;
        m.flush().await?;
        let old_bytes = m.header.serialize()?;
        let old_name_len = m.header.backing_file.as_ref().map_or(0, |n| n.len());
        match file {
            Some((name, fmt)) => {
                if name.len() > 1023 {
                    return Err(BlockError::InvalidArgument(
                        "backing file name is longer than 1023 bytes".to_string(),
                    ));
                }
                m.header.backing_file = Some(name);
                m.header.backing_format = fmt;
            }
            None => {
                m.header.backing_file = None;
                m.header.backing_format = None;
            }
        }
        let new_bytes = m.header.serialize()?;
        if let Some(steps) = torn_safe_steps(&old_bytes, old_name_len, &new_bytes, self.cs()) {
            for (off, data) in steps {
                self.file.write_vec(off, data).await?;
                self.file.flush().await?;
            }
            m.header_dirty = false;
            return m.flush().await;
        }
        m.write_header().await?;
        // Like QEMU (which rewrites the whole header cluster), leave no stale extension or
        // backing name bytes behind a header that got shorter.
        let new_len = new_bytes.len();
        let old_len = old_bytes.len();
        if new_len < old_len {
            self.file
                .write_vec(new_len as u64, vec![0u8; old_len - new_len])
                .await?;
        }
        m.flush().await
    }

    /// The protocol under the image.
    pub fn protocol(&self) -> &Arc<dyn Protocol> {
        &self.file
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes per mapping unit: the subcluster with extended L2, else the cluster.
    fn unit(&self) -> u64 {
        if self.extended {
            self.cs() / 32
        } else {
            self.cs()
        }
    }

    fn backing_node(&self) -> Option<Arc<dyn BlockNode>> {
        self.backing.read().ok().and_then(|b| b.clone())
    }

    /// Whether bytes `[a, b)` (offsets inside one cluster) are unallocated in this layer
    /// according to the cluster's words `(entry, bitmap)`.
    fn words_unallocated(&self, entry: u64, bitmap: u64, a: u64, b: u64) -> bool {
        if a >= b {
            return true;
        }
        if entry & OFLAG_COMPRESSED != 0 {
            return false;
        }
        if !self.extended {
            return entry & (OFFSET_MASK | OFLAG_ZERO) == 0;
        }
        let unit = self.unit();
        (a / unit..b.div_ceil(unit))
            .all(|s| (bitmap >> s) & 1 == 0 && (bitmap >> (32 + s)) & 1 == 0)
    }

    /// Whether guest bytes `[a, b)` are unallocated in every backing layer (QEMU's
    /// `is_unallocated`, including its view that bytes past a shorter layer's end count as
    /// allocated there).
    async fn backing_unallocated(&self, a: u64, b: u64) -> Result<bool> {
        let mut pos = a;
        while pos < b {
            let Some(mut node) = self.backing_node() else {
                return Ok(true);
            };
            let mut len = b - pos;
            loop {
                if pos + len > node.size() {
                    return Ok(false);
                }
                let st = node.block_status(pos, len).await?;
                len = st.len.max(1);
                if st.alloc != Allocation::Unallocated {
                    return Ok(false);
                }
                match node.backing() {
                    Some(n) => node = n,
                    None => break,
                }
            }
            pos += len;
        }
        Ok(true)
    }

    /// QEMU's `handle_alloc_space` test: the copy-on-write ranges `head` and `tail` (guest byte
    /// ranges around a write, inside the first and last cluster) read as zero because nothing
    /// in the chain allocates them, so the host range can be zeroed efficiently instead of
    /// being written with copied zeroes.
    async fn zero_cow(
        &self,
        first: (u64, u64),
        last: (u64, u64),
        head: (u64, u64),
        tail: (u64, u64),
    ) -> Result<bool> {
        let cs = self.cs();
        if head.0 >= head.1 && tail.0 >= tail.1 {
            return Ok(false);
        }
        if tail.1 > self.size() {
            return Ok(false);
        }
        let in_cluster = |(a, b): (u64, u64)| (a % cs, b - a / cs * cs);
        let (ha, hb) = in_cluster(head);
        let (ta, tb) = in_cluster(tail);
        Ok(self.words_unallocated(first.0, first.1, ha, hb)
            && self.words_unallocated(last.0, last.1, ta, tb)
            && self.backing_unallocated(head.0, head.1).await?
            && self.backing_unallocated(tail.0, tail.1).await?)
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
        let mut m = self.meta.lock().await;
        // Unknown autoclear bits (and bitmaps we do not maintain) become stale once we write.
        if m.header.autoclear_features != 0 {
            m.header.autoclear_features = 0;
            m.write_header().await?;
        }
        Ok(m)
    }

    /// Classify one mapping unit of guest cluster words `(entry, bitmap)`.
    fn classify(&self, entry: u64, bitmap: u64, sub: u64, gc: u64) -> Result<(Kind, Option<u64>)> {
        if entry & OFLAG_COMPRESSED != 0 {
            return Ok((Kind::Compressed, None));
        }
        let host = entry & OFFSET_MASK;
        if host % self.cs() != 0 {
            return Err(BlockError::corrupt(
                self.file.name(),
                format!("cluster allocation offset {host:#x} unaligned (guest cluster {gc})"),
            ));
        }
        if host != 0 && host < self.cs() {
            return Err(BlockError::corrupt(
                self.file.name(),
                format!("data cluster of guest cluster {gc} overlaps the header"),
            ));
        }
        if !self.extended {
            return Ok(if entry & OFLAG_ZERO != 0 && self.version >= 3 {
                (Kind::Zero, (host != 0).then_some(host))
            } else if host == 0 {
                (Kind::Unalloc, None)
            } else {
                (Kind::Data, Some(host))
            });
        }
        let alloc = bitmap >> sub & 1 != 0;
        let zero = bitmap >> (32 + sub) & 1 != 0;
        let sub_host = host + sub * self.unit();
        match (alloc, zero) {
            (true, true) => Err(BlockError::corrupt(
                self.file.name(),
                format!("subcluster {sub} of guest cluster {gc} is both allocated and zero"),
            )),
            (true, false) if host == 0 => Err(BlockError::corrupt(
                self.file.name(),
                format!("subcluster {sub} of guest cluster {gc} allocated without a host cluster"),
            )),
            (true, false) => Ok((Kind::Data, Some(sub_host))),
            (false, true) => Ok((Kind::Zero, (host != 0).then_some(sub_host))),
            // Unallocated subcluster of an allocated cluster: QEMU still reports where it would
            // live, so the mapping shows that host offset too.
            (false, false) => Ok((Kind::Unalloc, (host != 0).then_some(sub_host))),
        }
    }

    /// The run starting at guest `off`, at most `len` bytes, within one L2 table.
    async fn map_run(&self, m: &mut Meta, off: u64, len: u64) -> Result<Run> {
        let cs = self.cs();
        let unit = self.unit();
        let l2_span = m.header.l2_entries() * cs;
        let limit = (off + len).min((off / l2_span + 1) * l2_span);
        let mut pos = off;
        let mut first: Option<Run> = None;
        while pos < limit {
            let gc = pos / cs;
            let (entry, bitmap) = m.l2_get(gc).await?;
            let sub = (pos % cs) / unit;
            let (kind, host) = self.classify(entry, bitmap, sub, gc)?;
            let unit_end = ((pos / unit) + 1) * unit;
            let n = unit_end.min(limit) - pos;
            let copied = entry & OFLAG_COPIED != 0;
            let host_here = host.map(|h| h + pos % unit);
            match &mut first {
                None => {
                    first = Some(Run {
                        kind,
                        host: host_here,
                        len: n,
                        entry,
                        copied,
                    });
                    if kind == Kind::Compressed {
                        // One compressed cluster per run.
                        let r = first.as_mut().map(|r| {
                            r.len = ((gc + 1) * cs).min(limit) - pos;
                            *r
                        });
                        return r.ok_or_else(|| BlockError::corrupt("qcow2", "empty run"));
                    }
                }
                Some(r) => {
                    let contiguous = match (r.host, host_here) {
                        (Some(a), Some(b)) => a + r.len == b,
                        (None, None) => true,
                        _ => false,
                    };
                    if r.kind != kind
                        || !contiguous
                        || r.copied != copied
                        || kind == Kind::Compressed
                    {
                        break;
                    }
                    r.len += n;
                }
            }
            pos += n;
        }
        first.ok_or_else(|| BlockError::corrupt("qcow2", "empty mapping run"))
    }

    /// QEMU's heuristic (same thresholds, so maps agree): the image is metadata-preallocated
    /// when clearly more clusters have a refcount than the file system really stores. Only then
    /// is it worth asking the file about holes under data clusters.
    ///
    /// Decided once per open, so it must not be fooled by this process's own writes: clusters
    /// whose allocation is in flight (refcounted, data not written yet; copy-on-read and
    /// read-ahead keep many of them) are not counted. The file is measured under the metadata
    /// lock, so no allocation starts meanwhile and one that completes only makes the file
    /// bigger. Without that, a busy copy-on-read top was taken for preallocated and every
    /// later block status on data paid a `SEEK_DATA` on the file.
    async fn detect_metadata_preallocation(&self) -> Result<bool> {
        let mut m = self.meta.lock().await;
        let Some(real) = self.file.allocated_bytes().await? else {
            return Ok(false);
        };
        let file_len = self.file.len().await?;
        let real_clusters = real / self.cs();
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let in_flight = m.inflight.len() as u64;
        let end = file_len.div_ceil(self.cs());
        let mut count = 0;
        let mut c = 0;
        while c < end && count < threshold + in_flight {
            if m.refcount(c).await? > 0 {
                count += 1;
            }
            c += 1;
        }
        Ok(count >= threshold + in_flight)
    }

    /// Whether block status must look through data clusters to the file (a
    /// metadata-preallocated image). Like QEMU, decided on the first block-status query,
    /// whatever that query finds: a lazy decision at the first *data* run would be taken
    /// mid-workload, when this process's own allocations may be in flight.
    async fn metadata_preallocated(&self) -> Result<bool> {
        self.metadata_prealloc
            .get_or_try_init(|| self.detect_metadata_preallocation())
            .await
            .copied()
    }

    async fn run_at(&self, off: u64, len: u64) -> Result<Run> {
        let mut m = self.meta.lock().await;
        self.map_run(&mut m, off, len).await
    }

    /// Read and decompress the compressed cluster described by `entry`.
    async fn read_compressed(&self, entry: u64) -> Result<Vec<u8>> {
        let cb = self.cluster_bits as u64;
        let shift = 62 - (cb - 8);
        let off = entry & ((1u64 << shift) - 1);
        let nsect = ((entry >> shift) & ((1u64 << (cb - 8)) - 1)) + 1;
        let csize = nsect * 512 - (off & 511);
        let raw = self.file.read_vec(off, csize as usize).await?;
        compress::decompress(self.compression, &raw, self.cs() as usize).map_err(|e| {
            BlockError::corrupt(
                self.file.name(),
                format!("compressed cluster at {off:#x} cannot be decompressed: {e}"),
            )
        })
    }

    async fn read_run(&self, run: &Run, off: u64, dst: &mut [u8]) -> Result<()> {
        match run.kind {
            Kind::Data => {
                let host = run.host.ok_or_else(|| {
                    BlockError::corrupt(self.file.name(), "data run without host")
                })?;
                self.file.debug_event(DebugEvent::ReadAio);
                self.file.read_at(host, dst).await
            }
            Kind::Zero => {
                dst.fill(0);
                Ok(())
            }
            Kind::Unalloc => read_backing(self.backing_node().as_ref(), off, dst).await,
            Kind::Compressed => {
                self.file.debug_event(DebugEvent::ReadAio);
                let cl = self.read_compressed(run.entry).await?;
                let within = (off % self.cs()) as usize;
                dst.copy_from_slice(&cl[within..within + dst.len()]);
                Ok(())
            }
        }
    }

    /// Guest contents of `[off, off+buf.len())`, zero past the virtual size.
    ///
    /// The whole request is mapped under one acquisition of the metadata lock, then read. Data
    /// runs whose host ranges follow each other are read with one `pread` even when guest
    /// ranges that read from elsewhere (zero, unallocated) lie between them: an image written
    /// sequentially stores guest clusters 0, 2, 4, ... back to back, and a request over such an
    /// area costs one system call and one I/O-thread hand-off instead of one per cluster.
    async fn read_current(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let avail = self.size().saturating_sub(off).min(buf.len() as u64) as usize;
        buf[avail..].fill(0);
        let runs = self.map_read(off, avail).await?;
        self.read_mapped(off, &runs, buf).await
    }

    /// The runs of `[off, off+len)` (positions relative to `off`), mapped under one
    /// acquisition of the metadata lock.
    async fn map_read(&self, off: u64, len: usize) -> Result<Vec<(usize, Run)>> {
        let mut runs: Vec<(usize, Run)> = Vec::new();
        let mut m = self.meta.lock().await;
        let mut pos = 0usize;
        while pos < len {
            let run = self
                .map_run(&mut m, off + pos as u64, (len - pos) as u64)
                .await?;
            runs.push((pos, run));
            pos += run.len as usize;
        }
        Ok(runs)
    }

    /// Read the mapped `runs` of a request at `off` into `buf`.
    async fn read_mapped(&self, off: u64, runs: &[(usize, Run)], buf: &mut [u8]) -> Result<()> {
        let mut group: Vec<(usize, usize)> = Vec::new(); // (buffer position, length)
        let mut group_host = 0u64;
        let mut group_len = 0u64;
        for &(pos, run) in runs {
            let n = run.len as usize;
            match (run.kind, run.host) {
                (Kind::Data, Some(host)) => {
                    if !group.is_empty()
                        && (group_host + group_len != host || group_len >= MAX_COALESCED_READ)
                    {
                        self.read_group(group_host, group_len, &group, buf).await?;
                        group.clear();
                    }
                    if group.is_empty() {
                        group_host = host;
                        group_len = 0;
                    }
                    group.push((pos, n));
                    group_len += run.len;
                }
                _ => {
                    self.read_run(&run, off + pos as u64, &mut buf[pos..pos + n])
                        .await?
                }
            }
        }
        if !group.is_empty() {
            self.read_group(group_host, group_len, &group, buf).await?;
        }
        Ok(())
    }

    /// Read `len` contiguous host bytes at `host` and scatter them to the buffer `pieces`.
    async fn read_group(
        &self,
        host: u64,
        len: u64,
        pieces: &[(usize, usize)],
        buf: &mut [u8],
    ) -> Result<()> {
        self.file.debug_event(DebugEvent::ReadAio);
        if let [(pos, n)] = pieces {
            return self.file.read_at(host, &mut buf[*pos..*pos + *n]).await;
        }
        let data = self.file.read_vec(host, len as usize).await?;
        let mut at = 0;
        for &(pos, n) in pieces {
            buf[pos..pos + n].copy_from_slice(&data[at..at + n]);
            at += n;
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

    /// One step of a write: handles a prefix of `data` at `off` and returns its length and
    /// whether it was written (`only_unallocated` skips prefixes this layer allocates; see the
    /// module documentation).
    async fn write_step(
        &self,
        off: u64,
        src: &mut WriteSrc<'_>,
        pos: usize,
        only_unallocated: bool,
    ) -> Result<(usize, bool)> {
        let data = &src.bytes()[pos..];
        let cs = self.cs();
        let unit = self.unit();
        let mut m = self.lock_writable().await?;
        m = self.wait_inflight(m, off / cs, 1).await;
        let run = self.map_run(&mut m, off, data.len() as u64).await?;
        let data = if only_unallocated {
            if run.kind != Kind::Unalloc {
                return Ok((run.len as usize, false));
            }
            &data[..run.len as usize]
        } else {
            data
        };
        if run.kind == Kind::Data && run.copied {
            drop(m);
            let n = run.len as usize;
            let host = run.host.unwrap_or_default();
            self.file.debug_event(DebugEvent::WriteAio);
            src.write_to(&*self.file, host, pos..pos + n).await?;
            return Ok((n, true));
        }
        // Allocation. With extended L2, an allocated cluster gains subclusters in place.
        let gc = off / cs;
        let (entry, bitmap) = m.l2_get(gc).await?;
        let host_now = entry & OFFSET_MASK;
        let in_place_sub = self.extended
            && entry & OFLAG_COPIED != 0
            && entry & OFLAG_COMPRESSED == 0
            && host_now != 0;
        let write_end = off + data.len() as u64;
        if in_place_sub {
            let end = write_end.min((gc + 1) * cs);
            let s0 = (off % cs) / unit;
            let s1 = ((end - 1) % cs) / unit;
            let start = gc * cs + s0 * unit;
            let stop = gc * cs + (s1 + 1) * unit;
            let notify = Arc::new(Notify::new());
            m.inflight.insert(gc, Arc::clone(&notify));
            drop(m);
            let res = async {
                let words = (entry, bitmap);
                if self
                    .zero_cow(words, words, (start, off), (end, stop))
                    .await?
                {
                    self.file
                        .write_zeroes(host_now + s0 * unit, stop - start, false)
                        .await?;
                    self.file.debug_event(DebugEvent::WriteAio);
                    self.file
                        .write_vec(
                            host_now + (off - gc * cs),
                            data[..(end - off) as usize].to_vec(),
                        )
                        .await?;
                } else {
                    let mut buf = vec![0u8; (stop - start) as usize];
                    self.read_current(start, &mut buf[..(off - start) as usize])
                        .await?;
                    let tail = (end - start) as usize;
                    self.read_current(end, &mut buf[tail..]).await?;
                    buf[(off - start) as usize..tail]
                        .copy_from_slice(&data[..(end - off) as usize]);
                    self.file.debug_event(DebugEvent::WriteAio);
                    self.file.write_vec(host_now + s0 * unit, buf).await?;
                }
                let mut m = self.meta.lock().await;
                let mask: u64 = (s0..=s1).fold(0, |a, s| a | 1 << s);
                let nb = (bitmap | mask) & !(mask << 32);
                m.l2_set(gc, entry, nb).await
            }
            .await;
            let mut m = self.meta.lock().await;
            m.inflight.remove(&gc);
            notify.notify_waiters();
            drop(m);
            res?;
            return Ok(((end - off) as usize, true));
        }
        // Whole-cluster allocation of a run of clusters that need it.
        let n = self.alloc_run_len(&mut m, gc, (write_end - 1) / cs).await?;
        let mut olds = Vec::with_capacity(n as usize);
        for c in gc..gc + n {
            olds.push(m.l2_get(c).await?);
        }
        // The L2 table first, then the data clusters (QEMU's order, so layouts agree).
        m.l2_prepare(gc).await?;
        let host = m.alloc_clusters(n).await?;
        let notify = Arc::new(Notify::new());
        for c in gc..gc + n {
            m.inflight.insert(c, Arc::clone(&notify));
        }
        drop(m);
        let start = gc * cs;
        let stop = (gc + n) * cs;
        let end = write_end.min(stop);
        // With extended L2, only the subclusters the write touches (plus, in a cluster that had
        // allocated subclusters, everything between them and the write) become allocated; the
        // others keep their state (unallocated or zero), and their host space is not written,
        // exactly as QEMU's copy-on-write ranges.
        let (wstart, wstop, bitmaps) = if self.extended {
            let mut bitmaps = Vec::with_capacity(n as usize);
            let (mut first_from, mut last_to) = (0, cs);
            for (i, &(e, bm)) in olds.iter().enumerate() {
                let cstart = start + i as u64 * cs;
                let ws = off.max(cstart) - cstart;
                let we = write_end.min(cstart + cs) - cstart;
                let alloc = (bm & BITMAP_ALL_ALLOC) as u32;
                let (from, to) = if e & OFLAG_COMPRESSED != 0 {
                    (0, cs)
                } else if e & OFFSET_MASK != 0 {
                    let last = (we - 1) / unit;
                    (
                        (ws / unit).min(u64::from(alloc.trailing_zeros())) * unit,
                        cs - (31 - last).min(u64::from(alloc.leading_zeros())) * unit,
                    )
                } else {
                    (ws / unit * unit, we.div_ceil(unit) * unit)
                };
                let mask = ((1u64 << (to / unit)) - 1) & !((1u64 << (from / unit)) - 1);
                let old_bm = if e & OFLAG_COMPRESSED != 0 { 0 } else { bm };
                bitmaps.push((old_bm & !(mask | mask << 32)) | mask);
                if i == 0 {
                    first_from = from;
                }
                last_to = to;
            }
            (start + first_from, stop - cs + last_to, bitmaps)
        } else {
            (start, stop, vec![0; n as usize])
        };
        let res = async {
            if wstart == off && wstop == end {
                // Nothing to copy on write around the data: it goes out as it is.
                self.file.debug_event(DebugEvent::WriteAio);
                return src
                    .write_to(
                        &*self.file,
                        host + (wstart - start),
                        pos..pos + (end - off) as usize,
                    )
                    .await;
            }
            let first = olds[0];
            let last = olds[olds.len() - 1];
            if self
                .zero_cow(first, last, (wstart, off), (end, wstop))
                .await?
            {
                self.file
                    .write_zeroes(host + (wstart - start), wstop - wstart, false)
                    .await?;
                self.file.debug_event(DebugEvent::WriteAio);
                return self
                    .file
                    .write_vec(
                        host + (off - start),
                        src.bytes()[pos..pos + (end - off) as usize].to_vec(),
                    )
                    .await;
            }
            let mut buf = vec![0u8; (wstop - wstart) as usize];
            self.read_current(wstart, &mut buf[..(off - wstart) as usize])
                .await?;
            let tail = (end - wstart) as usize;
            if end < wstop && end < self.size() {
                self.read_current(end, &mut buf[tail..]).await?;
            }
            buf[(off - wstart) as usize..tail]
                .copy_from_slice(&src.bytes()[pos..pos + (end - off) as usize]);
            // QEMU's qcow2 announces the event before every guest-data write, allocating
            // (with copy-on-write) or not.
            self.file.debug_event(DebugEvent::WriteAio);
            self.file.write_vec(host + (wstart - start), buf).await
        }
        .await;
        let mut m = self.meta.lock().await;
        let res = match res {
            Ok(()) => {
                let mut r = Ok(());
                for (i, (old, _)) in olds.iter().enumerate() {
                    let c = gc + i as u64;
                    let new_entry = (host + i as u64 * cs) | OFLAG_COPIED;
                    if let Err(e) = m.l2_set(c, new_entry, bitmaps[i]).await {
                        r = Err(e);
                        break;
                    }
                    self.free_old_entry(&mut m, *old);
                }
                r
            }
            Err(e) => {
                m.free_later(host, n * cs);
                Err(e)
            }
        };
        for c in gc..gc + n {
            m.inflight.remove(&c);
        }
        notify.notify_waiters();
        drop(m);
        res?;
        Ok(((end - off) as usize, true))
    }

    /// How many clusters from `gc` (which needs an allocation) up to `last_gc` one allocation
    /// covers: the following clusters that need one too, within the L2 table, at most 256.
    async fn alloc_run_len(&self, m: &mut Meta, gc: u64, last_gc: u64) -> Result<u64> {
        let l2_span = m.header.l2_entries();
        let max_clusters = (256u64).min(l2_span - gc % l2_span);
        let mut n = 1;
        while n < max_clusters && gc + n <= last_gc {
            let c = gc + n;
            if m.inflight.contains_key(&c) {
                break;
            }
            let (e, _) = m.l2_get(c).await?;
            if !self.needs_alloc(e) {
                break;
            }
            n += 1;
        }
        Ok(n)
    }

    /// Write the `pieces` of `buf` (guest offset and byte range of `buf`; ascending, not
    /// overlapping) as one batch, with the same result, byte for byte, as writing them one
    /// after the other with [`BlockNode::write`]; hands `buf` back for reuse.
    ///
    /// This is the bulk path of `convert` and other sequential copiers. When every piece covers
    /// whole clusters (the last one may end at the end of the image) on a standard-L2 image, the
    /// host clusters of all pieces are decided in one critical section, in the very order (L2
    /// tables, data clusters, refcount blocks) that the single writes would take, so the file
    /// layout is identical; the data of host-contiguous pieces, which is what sequential
    /// allocation produces even for guest pieces with holes between them, then goes out in one
    /// gathered write straight from `buf`, and the L2 entries are committed together
    /// afterwards. Crash safety is that of single writes: data is written before the L2 entries
    /// that point to it, and metadata reaches the disk only through [`Meta::flush`]'s ordered
    /// write-back.
    ///
    /// `allocated` (if given) is called once the host placement of every piece is decided, so
    /// a caller that must keep allocations in guest order can let the next batch allocate
    /// while this one's data is still being written. Other pieces fall back to single writes
    /// (and `allocated` is called after them).
    pub async fn write_pieces(
        &self,
        buf: Vec<u8>,
        pieces: &[(u64, std::ops::Range<usize>)],
        allocated: Option<&(dyn Fn() + Sync)>,
    ) -> Result<Vec<u8>> {
        let cs = self.cs();
        let size = self.size();
        let mut prev_end = 0;
        for (off, r) in pieces {
            if *off < prev_end || r.end > buf.len() || r.start > r.end {
                return Err(BlockError::InvalidArgument(
                    "write_pieces: pieces must lie in the buffer and ascend without overlapping"
                        .to_string(),
                ));
            }
            check_bounds(*off, r.len() as u64, size)?;
            prev_end = off + r.len() as u64;
        }
        let whole = |(off, r): &(u64, std::ops::Range<usize>)| {
            let end = off + r.len() as u64;
            !r.is_empty() && off % cs == 0 && (end % cs == 0 || end == size)
        };
        if self.extended || !pieces.iter().all(whole) {
            for (off, r) in pieces {
                self.write(*off, &buf[r.clone()]).await?;
            }
            if let Some(f) = allocated {
                f();
            }
            return Ok(buf);
        }
        // Decide every piece's host placement under one lock, as the single writes would.
        let mut m = self.lock_writable().await?;
        'wait: loop {
            for (off, r) in pieces {
                let (gc, n) = (off / cs, (r.len() as u64).div_ceil(cs));
                if let Some(notify) = (gc..gc + n).find_map(|c| m.inflight.get(&c).cloned()) {
                    let fut = notify.notified();
                    drop(m);
                    fut.await;
                    m = self.lock_writable().await?;
                    continue 'wait;
                }
            }
            break;
        }
        let mut segs: Vec<Segment> = Vec::new();
        let mut alloc_err = None;
        'pieces: for (off, r) in pieces {
            let end = off + r.len() as u64;
            let mut pos = *off;
            while pos < end {
                let at = r.start + (pos - off) as usize;
                let run = match self.map_run(&mut m, pos, end - pos).await {
                    Ok(run) => run,
                    Err(e) => {
                        alloc_err = Some(e);
                        break 'pieces;
                    }
                };
                if let (Kind::Data, true, Some(host)) = (run.kind, run.copied, run.host) {
                    segs.push(Segment {
                        guest: pos,
                        host,
                        data: at..at + run.len as usize,
                        olds: Vec::new(),
                    });
                    pos += run.len;
                    continue;
                }
                let gc = pos / cs;
                let placed = async {
                    let n = self.alloc_run_len(&mut m, gc, (end - 1) / cs).await?;
                    let mut olds = Vec::with_capacity(n as usize);
                    for c in gc..gc + n {
                        olds.push(m.l2_get(c).await?.0);
                    }
                    // The L2 table first, then the data clusters (as single writes do).
                    m.l2_prepare(gc).await?;
                    let host = m.alloc_clusters(n).await?;
                    Ok::<_, BlockError>((host, olds))
                }
                .await;
                match placed {
                    Ok((host, olds)) => {
                        let len = (olds.len() as u64 * cs).min(end - pos);
                        segs.push(Segment {
                            guest: pos,
                            host,
                            data: at..at + len as usize,
                            olds,
                        });
                        pos += len;
                    }
                    Err(e) => {
                        alloc_err = Some(e);
                        break 'pieces;
                    }
                }
            }
        }
        if let Some(e) = alloc_err {
            for s in &segs {
                if !s.olds.is_empty() {
                    m.free_later(s.host, s.olds.len() as u64 * cs);
                }
            }
            return Err(e);
        }
        let notify = Arc::new(Notify::new());
        for s in &segs {
            for i in 0..s.olds.len() as u64 {
                m.inflight.insert(s.guest / cs + i, Arc::clone(&notify));
            }
        }
        drop(m);
        if let Some(f) = allocated {
            f();
        }
        let res = self.write_segments(buf, &segs).await;
        let mut m = self.meta.lock().await;
        let mut commit_err = None;
        for s in &segs {
            if s.olds.is_empty() {
                continue;
            }
            if res.is_err() || commit_err.is_some() {
                m.free_later(s.host, s.olds.len() as u64 * cs);
                continue;
            }
            for (i, &old) in s.olds.iter().enumerate() {
                let c = s.guest / cs + i as u64;
                let entry = (s.host + i as u64 * cs) | OFLAG_COPIED;
                if let Err(e) = m.l2_set(c, entry, 0).await {
                    // The clusters of this stretch not yet committed leak (as in a single
                    // write); nothing points at them.
                    commit_err = Some(e);
                    break;
                }
                self.free_old_entry(&mut m, old);
            }
        }
        for s in &segs {
            for i in 0..s.olds.len() as u64 {
                m.inflight.remove(&(s.guest / cs + i));
            }
        }
        notify.notify_waiters();
        drop(m);
        let buf = res?;
        match commit_err {
            Some(e) => Err(e),
            None => Ok(buf),
        }
    }

    /// Write the data of `segs` from `buf`, one gathered write per run of host-contiguous
    /// segments. Newly allocated clusters are written whole (a last cluster past the image
    /// end is padded with zeroes, as a single write pads it).
    async fn write_segments(&self, mut buf: Vec<u8>, segs: &[Segment]) -> Result<Vec<u8>> {
        let cs = self.cs();
        let mut ranges: Vec<std::ops::Range<usize>> = Vec::new();
        let mut run_host = 0;
        let mut run_len = 0u64;
        for (k, s) in segs.iter().enumerate() {
            if ranges.is_empty() {
                run_host = s.host;
                run_len = 0;
            }
            ranges.push(s.data.clone());
            run_len += s.data.len() as u64;
            let pad = if !s.olds.is_empty() && run_len % cs != 0 {
                (cs - run_len % cs) as usize
            } else {
                0
            };
            let next_joins = segs
                .get(k + 1)
                .is_some_and(|n| n.host == run_host + run_len && run_len < MAX_GATHERED_WRITE);
            if pad == 0 && next_joins {
                continue;
            }
            self.file.debug_event(DebugEvent::WriteAio);
            buf = self
                .file
                .write_gather(run_host, buf, std::mem::take(&mut ranges), pad)
                .await?;
        }
        Ok(buf)
    }

    /// Whether a write to the cluster with L2 entry `e` must allocate a new host cluster
    /// (nothing exclusively ours to write into in place).
    fn needs_alloc(&self, e: u64) -> bool {
        e & OFLAG_COPIED == 0
            || e & OFLAG_COMPRESSED != 0
            || e & OFFSET_MASK == 0
            || (!self.extended && e & OFLAG_ZERO != 0)
    }

    /// Schedule the release of whatever host storage an overwritten L2 entry held.
    fn free_old_entry(&self, m: &mut Meta, old: u64) {
        let cs = self.cs();
        if old & OFLAG_COMPRESSED != 0 {
            let cb = self.cluster_bits as u64;
            let shift = 62 - (cb - 8);
            let off = old & ((1u64 << shift) - 1);
            let nsect = ((old >> shift) & ((1u64 << (cb - 8)) - 1)) + 1;
            m.free_later(off & !511, nsect * 512);
        } else if old & OFFSET_MASK != 0 {
            m.free_later(old & OFFSET_MASK, cs);
        }
    }

    /// Write one compressed cluster at cluster-aligned `offset` (the last cluster may be short).
    /// Used by `convert -c`; falls back to a normal write when compression does not pay.
    pub async fn write_compressed(&self, offset: u64, data: &[u8]) -> Result<()> {
        let cs = self.cs();
        if offset % cs != 0 || data.len() as u64 > cs {
            return Err(BlockError::InvalidArgument(
                "compressed writes must cover one aligned cluster".to_string(),
            ));
        }
        check_bounds(offset, data.len() as u64, self.size())?;
        let mut full = data.to_vec();
        full.resize(cs as usize, 0);
        let comp = compress::compress(self.compression, &full)?;
        let max_sect = 1u64 << (self.cluster_bits - 8);
        if comp.len() as u64 >= cs || (comp.len() as u64).div_ceil(512) > max_sect {
            return self.write(offset, data).await;
        }
        let gc = offset / cs;
        let mut m = self.lock_writable().await?;
        m = self.wait_inflight(m, gc, 1).await;
        let (old, _) = m.l2_get(gc).await?;
        // The L2 table before the data, as QEMU allocates them.
        m.l2_prepare(gc).await?;
        // Pack compressed clusters back to back (each starting on a 512-byte boundary, never
        // crossing a host cluster): a host cluster holding k of them has refcount k.
        let nsect = (comp.len() as u64).div_ceil(512);
        let plen = nsect * 512;
        let mut host = None;
        if let Some(t) = m.compressed_tail {
            if t % cs != 0 && cs - t % cs >= plen && m.refcount(t / cs).await? < m.rc_max() {
                m.update_refcounts(t, plen, 1).await?;
                host = Some(t);
            }
        }
        let host = match host {
            Some(h) => h,
            None => m.alloc_clusters(1).await?,
        };
        m.compressed_tail = Some(host + plen);
        let notify = Arc::new(Notify::new());
        m.inflight.insert(gc, Arc::clone(&notify));
        drop(m);
        let mut padded = comp;
        padded.resize(plen as usize, 0);
        let res = self.file.write_vec(host, padded).await;
        let mut m = self.meta.lock().await;
        let res = match res {
            Ok(()) => {
                let shift = 62 - (self.cluster_bits as u64 - 8);
                let entry = OFLAG_COMPRESSED | ((nsect - 1) << shift) | host;
                let r = m.l2_set(gc, entry, 0).await;
                if r.is_ok() {
                    self.free_old_entry(&mut m, old);
                }
                r
            }
            Err(e) => {
                m.free_later(host, plen);
                Err(e)
            }
        };
        m.inflight.remove(&gc);
        notify.notify_waiters();
        res
    }

    /// Set whole clusters `[gc, gc+n)` to read as zero (`discard`: as QEMU's discard does).
    async fn zero_clusters(&self, gc: u64, n: u64, unmap: bool, discard: bool) -> Result<()> {
        let mut m = self.lock_writable().await?;
        m = self.wait_inflight(m, gc, n).await;
        let has_backing = self.backing_node().is_some() || m.header.backing_file.is_some();
        for c in gc..gc + n {
            let (old, bitmap) = m.l2_get(c).await?;
            let host = old & OFFSET_MASK;
            let compressed = old & OFLAG_COMPRESSED != 0;
            let allocated = compressed || host != 0;
            if discard && old == 0 && bitmap == 0 && !has_backing {
                continue; // already reads as zero and nothing to free
            }
            // (Write-zeroes still marks such a cluster zero, as QEMU does.)
            let keep = !unmap && !discard && !compressed && host != 0 && old & OFLAG_COPIED != 0;
            let (entry, bm) = if self.extended {
                if keep {
                    (old, BITMAP_ALL_ZERO)
                } else if discard && !has_backing && !allocated {
                    (0, 0)
                } else {
                    (0, BITMAP_ALL_ZERO)
                }
            } else if self.version >= 3 {
                if keep {
                    (host | OFLAG_COPIED | OFLAG_ZERO, 0)
                } else if discard && !has_backing && !allocated {
                    (0, 0)
                } else {
                    (OFLAG_ZERO, 0)
                }
            } else if keep {
                // v2 has no zero flag: an allocated cluster the caller wants kept is zeroed in
                // place (no backing file here, or write_zeroes would not have come this way).
                let zeroes = vec![0u8; self.cs() as usize];
                self.file.write_vec(host, zeroes).await?;
                continue;
            } else {
                (0, 0)
            };
            if (entry, bm) == (old, bitmap) {
                continue;
            }
            m.l2_set(c, entry, bm).await?;
            if !keep {
                self.free_old_entry(&mut m, old);
            }
        }
        Ok(())
    }
}

/// The host offset of a request of `len` bytes whose mapping `runs` is one data run in this
/// image's file (the usual case for allocated clusters), so it can be read in one piece.
fn one_data_run(runs: &[(usize, Run)], len: u64) -> Option<u64> {
    match runs {
        [(0, run)] if run.kind == Kind::Data && run.len == len => run.host,
        _ => None,
    }
}

#[async_trait]
impl BlockNode for Qcow2 {
    fn format_name(&self) -> &'static str {
        "qcow2"
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
    fn allocation_unit(&self) -> Option<u64> {
        Some(self.unit())
    }
    fn can_populate(&self) -> bool {
        true
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_bounds(offset, buf.len() as u64, self.size())?;
        self.read_current(offset, buf).await
    }

    /// A request that maps to one data run (the usual case for an allocated image: contiguous
    /// clusters form one run) is read by the protocol straight into `buf`; anything else takes
    /// the general path.
    async fn read_append(&self, offset: u64, mut buf: Vec<u8>, len: usize) -> Result<Vec<u8>> {
        check_bounds(offset, len as u64, self.size())?;
        let runs = self.map_read(offset, len).await?;
        if let Some(host) = one_data_run(&runs, len as u64) {
            self.file.debug_event(DebugEvent::ReadAio);
            return self.file.read_append(host, buf, len).await;
        }
        let at = buf.len();
        buf.resize(at + len, 0);
        self.read_mapped(offset, &runs, &mut buf[at..]).await?;
        Ok(buf)
    }

    /// The condition of [`BlockNode::read_append`]'s direct path (one data run in this
    /// image's file covering the request), then the file's own residency check.
    async fn resident_slice(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Option<crate::protocol::FileSlice>> {
        check_bounds(offset, len, self.size())?;
        let Ok(n) = usize::try_from(len) else {
            return Ok(None);
        };
        let runs = self.map_read(offset, n).await?;
        Ok(one_data_run(&runs, len).and_then(|host| self.file.resident_slice(host, len)))
    }

    async fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        check_bounds(offset, data.len() as u64, self.size())?;
        let mut src = WriteSrc::Borrowed(data);
        let mut pos = 0;
        while pos < data.len() {
            pos += self
                .write_step(offset + pos as u64, &mut src, pos, false)
                .await?
                .0;
        }
        Ok(())
    }

    /// Whole clusters of the buffer go to the file without being copied (bulk copies: mirror,
    /// commit); partial clusters take the usual copy-on-write path.
    async fn write_owned(&self, offset: u64, data: Vec<u8>) -> Result<Vec<u8>> {
        check_bounds(offset, data.len() as u64, self.size())?;
        let len = data.len();
        let mut src = WriteSrc::Owned(data);
        let mut pos = 0;
        while pos < len {
            pos += self
                .write_step(offset + pos as u64, &mut src, pos, false)
                .await?
                .0;
        }
        Ok(src.into_owned())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        check_bounds(offset, len, self.size())?;
        if len == 0 {
            return Ok(());
        }
        let cs = self.cs();
        let end = offset + len;
        let a = offset.div_ceil(cs) * cs;
        // A partial last cluster at the image end counts as whole.
        let b = if end == self.size() {
            end.div_ceil(cs) * cs
        } else {
            end / cs * cs
        };
        let v2_backed = self.version < 3 && self.backing_node().is_some();
        if a >= b || v2_backed {
            return self.write_explicit_zeroes(offset, len).await;
        }
        if offset < a {
            self.write_explicit_zeroes(offset, a - offset).await?;
        }
        self.zero_clusters(a / cs, (b - a) / cs, unmap, false)
            .await?;
        if b < end {
            self.write_explicit_zeroes(b, end - b).await?;
        }
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_bounds(offset, len, self.size())?;
        let cs = self.cs();
        let end = offset + len;
        let a = offset.div_ceil(cs) * cs;
        let b = if end == self.size() {
            end.div_ceil(cs) * cs
        } else {
            end / cs * cs
        };
        if a < b {
            self.zero_clusters(a / cs, (b - a) / cs, true, true).await?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        if self.file.read_only() {
            return Ok(());
        }
        // Sync the data written so far before taking the metadata lock: with a job copying
        // hundreds of MiB that sync is long, and every guest read needs the lock for a moment
        // (to map its clusters), so under the lock it stalled them all (a 300 ms guest read
        // at each stream checkpoint). The syncs of the ordered metadata write-back below then
        // have little left to write. An extra sync never weakens the ordering: the kernel may
        // write any dirty page back at any time anyway.
        self.file.flush().await?;
        let mut m = self.meta.lock().await;
        m.flush().await
    }

    async fn write_if_unallocated(&self, offset: u64, data: &[u8]) -> Result<u64> {
        check_bounds(offset, data.len() as u64, self.size())?;
        let mut src = WriteSrc::Borrowed(data);
        let mut pos = 0;
        let mut written = 0u64;
        while pos < data.len() {
            let (n, wrote) = self
                .write_step(offset + pos as u64, &mut src, pos, true)
                .await?;
            if wrote {
                written += n as u64;
            }
            pos += n;
        }
        Ok(written)
    }

    async fn write_if_unallocated_owned(
        &self,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<(u64, Vec<u8>)> {
        check_bounds(offset, data.len() as u64, self.size())?;
        let len = data.len();
        let mut src = WriteSrc::Owned(data);
        let mut pos = 0;
        let mut written = 0u64;
        while pos < len {
            let (n, wrote) = self
                .write_step(offset + pos as u64, &mut src, pos, true)
                .await?;
            if wrote {
                written += n as u64;
            }
            pos += n;
        }
        Ok((written, src.into_owned()))
    }

    async fn zero_if_unallocated(&self, offset: u64, len: u64) -> Result<u64> {
        check_bounds(offset, len, self.size())?;
        if len == 0 {
            return Ok(0);
        }
        let cs = self.cs();
        let end = offset + len;
        let a = offset.div_ceil(cs) * cs;
        let b = if end == self.size() {
            end.div_ceil(cs) * cs
        } else {
            end / cs * cs
        };
        // Without a zero flag (v2) or for partial clusters, zeroes are written as data.
        if a >= b || self.version < 3 {
            return self.write_zero_data_if_unallocated(offset, len).await;
        }
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
        let prealloc = self.metadata_preallocated().await?;
        let run = self.run_at(offset, len).await?;
        let mut st = LayerStatus {
            alloc: match run.kind {
                Kind::Data | Kind::Compressed => Allocation::Data,
                Kind::Zero => Allocation::Zero,
                Kind::Unalloc => Allocation::Unallocated,
            },
            len: run.len,
            host_offset: run.host,
            compressed: run.kind == Kind::Compressed,
            zero: run.kind == Kind::Zero,
        };
        // Like QEMU, on a metadata-preallocated image look through to the file: a data cluster
        // over a hole of the file reads as zeroes.
        if let (Kind::Data, Some(host), true) = (run.kind, run.host, prealloc) {
            let (data, n) = self.file.data_status(host, run.len).await?;
            st.len = n.clamp(1, run.len);
            st.zero = !data;
        }
        Ok(st)
    }

    async fn truncate(&self, new_size: u64) -> Result<()> {
        let cs = self.cs();
        let old_size = self.size();
        if new_size == old_size {
            return Ok(());
        }
        if new_size % 512 != 0 {
            return Err(BlockError::InvalidArgument(
                "qcow2 image size must be a multiple of 512 bytes".to_string(),
            ));
        }
        let mut m = self.lock_writable().await?;
        if new_size < old_size {
            // Shrink only over a tail that stores no data in this layer; zero clusters there
            // are dropped.
            let first = new_size.div_ceil(cs);
            let last = old_size.div_ceil(cs);
            let mut zeroed = Vec::new();
            for c in first..last {
                let (e, bm) = m.l2_get(c).await?;
                if e & (OFFSET_MASK | OFLAG_COMPRESSED) != 0 || bm & BITMAP_ALL_ALLOC != 0 {
                    return Err(BlockError::InvalidArgument(format!(
                        "{}: cannot shrink: the tail beyond {new_size} bytes holds data",
                        self.file.name()
                    )));
                }
                if e != 0 || bm != 0 {
                    zeroed.push(c);
                }
            }
            for c in zeroed {
                m.l2_set(c, 0, 0).await?;
            }
            m.flush().await?;
            m.header.size = new_size;
            m.write_header().await?;
            self.size.store(new_size, Ordering::Release);
            return Ok(());
        }
        let need = m.header.l1_entries_for(new_size);
        m.grow_l1(need).await?;
        m.flush().await?;
        m.header.size = new_size;
        m.write_header().await?;
        self.size.store(new_size, Ordering::Release);
        drop(m);
        // The new area must read as zeroes. A longer backing file must not show through: as
        // QEMU does, the whole new area becomes zero (sub)clusters, with explicit zeroes up to
        // the first (sub)cluster boundary. Without that, only a stale tail of the old last
        // cluster (data past an earlier, unaligned shrink) is overwritten with zeroes.
        let unit = self.unit();
        let backing_size = self.backing_node().map_or(0, |b| b.size());
        if backing_size > old_size && self.version < 3 {
            // No zero clusters in v2 (QEMU refuses this resize): write zeroes, but only where
            // the backing file would show through.
            let to = backing_size.min(new_size);
            self.write_zeroes(old_size, to - old_size, false).await?;
            self.flush().await?;
        } else if backing_size > old_size {
            let zero_start = old_size.div_ceil(unit) * unit;
            if new_size > zero_start {
                self.write_zeroes(zero_start, new_size - zero_start, false)
                    .await?;
            }
            if zero_start > old_size {
                let len = zero_start.min(new_size) - old_size;
                self.write(old_size, &vec![0u8; len as usize]).await?;
            }
            self.flush().await?;
        } else if old_size % cs != 0 {
            let run = self.run_at(old_size, cs - old_size % cs).await?;
            if matches!(run.kind, Kind::Data | Kind::Compressed) {
                let len = (old_size.div_ceil(cs) * cs).min(new_size) - old_size;
                self.write(old_size, &vec![0u8; len as usize]).await?;
                self.flush().await?;
            }
        }
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        if !self.file.read_only() && !self.closed.swap(true, Ordering::AcqRel) {
            let mut m = self.meta.lock().await;
            m.flush().await?;
        }
        Ok(())
    }

    // The chain hooks of the trait delegate to the inherent methods above.
    async fn backing_link(&self) -> Option<crate::node::BackingLink> {
        let h = self.header().await;
        h.backing_file.map(|name| crate::node::BackingLink {
            name,
            format: match h.backing_format {
                Some(f) => crate::node::BackingFormatHint::Named(f),
                None => crate::node::BackingFormatHint::Unrecorded,
            },
        })
    }

    fn set_backing_node(&self, node: Option<Arc<dyn BlockNode>>) {
        Qcow2::set_backing_node(self, node)
    }

    async fn set_backing_file(&self, file: Option<(String, Option<String>)>) -> Result<()> {
        Qcow2::set_backing_file(self, file).await
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Qcow2 {
    /// Deallocate every cluster of this layer, so all of it reads from the backing file again
    /// (what `commit` does to the committed image unless asked to keep it).
    pub async fn make_empty(&self) -> Result<()> {
        let cs = self.cs();
        let clusters = self.size().div_ceil(cs);
        let mut m = self.lock_writable().await?;
        m = self.wait_inflight(m, 0, clusters).await;
        for c in 0..clusters {
            let (old, bitmap) = m.l2_get(c).await?;
            if old == 0 && bitmap == 0 {
                continue;
            }
            m.l2_set(c, 0, 0).await?;
            self.free_old_entry(&mut m, old);
        }
        m.flush().await
    }

    /// Populate `[offset, offset+len)` with zero data where this layer is still unallocated.
    async fn write_zero_data_if_unallocated(&self, offset: u64, len: u64) -> Result<u64> {
        crate::format::util::write_zero_data(self, offset, len, true).await
    }

    /// Mark the still-unallocated units of whole clusters `[gc, gc+n)` as zero (v3 only), in
    /// one critical section after their in-flight allocations finished; returns bytes marked.
    async fn zero_clusters_if_unallocated(&self, gc: u64, n: u64) -> Result<u64> {
        let cs = self.cs();
        let unit = self.unit();
        let size = self.size();
        let mut m = self.lock_writable().await?;
        m = self.wait_inflight(m, gc, n).await;
        let mut marked = 0;
        for c in gc..gc + n {
            let (entry, bitmap) = m.l2_get(c).await?;
            let cluster_len = cs.min(size.saturating_sub(c * cs));
            if self.extended {
                if entry & OFLAG_COMPRESSED != 0 {
                    continue;
                }
                let unalloc = !(bitmap | bitmap >> 32) & 0xffff_ffff;
                if unalloc == 0 {
                    continue;
                }
                m.l2_set(c, entry, bitmap | unalloc << 32).await?;
                marked += (unalloc.count_ones() as u64 * unit).min(cluster_len);
            } else if entry == 0 {
                m.l2_set(c, OFLAG_ZERO, 0).await?;
                marked += cluster_len;
            }
        }
        Ok(marked)
    }

    async fn write_explicit_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        crate::format::util::write_zero_data(self, offset, len, false)
            .await
            .map(|_| ())
    }
}

/// Bytes per sector that storage writes whole or not at all (the torn-write model of
/// [`Qcow2::set_backing_file`]).
const HEADER_SECTOR: usize = 512;

/// The writes (each followed by a flush) that turn the on-disk header `old` (whose backing
/// name is `old_name_len` bytes long) into `new` so that a crash after any of them, with any
/// sectors of the write in flight persisted or not, leaves a header naming the old or the new
/// backing file. `None` when one plain write is already safe (every changed byte lies in one
/// sector) or when the change is not a rename between two names behind the same extension
/// area (then the plain rewrite is used).
fn torn_safe_steps(
    old: &[u8],
    old_name_len: usize,
    new: &[u8],
    cluster_size: u64,
) -> Option<Vec<(u64, Vec<u8>)>> {
    let len = old.len().max(new.len());
    let byte = |b: &[u8], i: usize| b.get(i).copied().unwrap_or(0);
    let diff: Vec<usize> = (0..len).filter(|&i| byte(old, i) != byte(new, i)).collect();
    let (first, last) = (*diff.first()?, *diff.last()?);
    if first / HEADER_SECTOR == last / HEADER_SECTOR || new.len() < HEADER_SECTOR {
        return None;
    }
    let be64 = |b: &[u8], o: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[o..o + 8]);
        u64::from_be_bytes(w) as usize
    };
    let (old_off, new_off) = (be64(old, 8), be64(new, 8));
    if old_off == 0 || new_off == 0 || old_off != new_off {
        return None;
    }
    let name_off = new_off;
    // Outside the name, only sector 0 may change (its fields: name length; format extension
    // contents of the same length).
    if diff.iter().any(|&i| i >= HEADER_SECTOR && i < name_off) {
        return None;
    }
    let new_name = new[name_off..].to_vec();
    let name_area = old_name_len.max(new_name.len());
    // Scratch: past anything either header (or the name area) covers, sector-aligned.
    let scratch = (name_off + 1024).div_ceil(HEADER_SECTOR) * HEADER_SECTOR;
    if (scratch + new_name.len()) as u64 > cluster_size {
        return None;
    }
    let sector0_at = |off: usize| {
        let mut s = new[..HEADER_SECTOR].to_vec();
        s[8..16].copy_from_slice(&(off as u64).to_be_bytes());
        s
    };
    let mut at_name = new_name.clone();
    at_name.resize(name_area, 0);
    Some(vec![
        // 1. The new name where the old header does not look.
        (scratch as u64, new_name.clone()),
        // 2. Sector 0 (one sector) switches to it, and to the new length and format.
        (0, sector0_at(scratch)),
        // 3. The usual place, unreferenced now, gets the new name (old bytes zeroed).
        (name_off as u64, at_name),
        // 4. Sector 0 switches back: the header is the canonical new one.
        (0, sector0_at(name_off)),
        // 5. The scratch copy goes.
        (scratch as u64, vec![0u8; new_name.len()]),
    ])
}
