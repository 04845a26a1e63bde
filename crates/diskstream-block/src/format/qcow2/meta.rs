//! In-memory qcow2 metadata: L1 table, L2 table cache, refcounts, cluster allocation, and the
//! dependency-ordered write-back that makes every crash leave a consistent image.
//!
//! # Ordering (the crash-safety argument)
//! Metadata changes live in memory until [`Meta::flush`], which writes them in this order:
//! 1. dirty refcount blocks, then one `fdatasync`: guest data written before the flush and the
//!    refcounts of newly allocated clusters are now durable together;
//! 2. a moved refcount table (then the header pointing at it), each followed by a sync;
//! 3. dirty L2 tables, sync: an L2 entry never reaches the disk before the data and refcount it
//!    depends on;
//! 4. dirty L1 entries, sync: an L1 entry never points at an L2 table not yet on disk;
//! 5. deferred frees: refcount decrements of clusters that L2/L1 stopped referencing are applied
//!    only now, after the references are gone on disk, and written with a sync. A crash before
//!    this step leaks clusters (repairable with `check -r leaks`) but never leaves a dangling
//!    reference, and a freed cluster cannot be reallocated while an old on-disk table may still
//!    point at it.
//!
//! Evicting a dirty table from a full cache runs the same flush first.

use super::header::Header;
use crate::error::{BlockError, Result};
use crate::protocol::Protocol;
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::Notify;

/// L2/L1 entry bit: refcount is exactly one, writes may go in place.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entry bit: compressed cluster descriptor.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 entry bit: cluster reads as zeroes (v3, standard L2 only).
pub const OFLAG_ZERO: u64 = 1;
/// Host offset bits of L1 and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Extended L2 bitmap: every subcluster reads as zero.
pub const BITMAP_ALL_ZERO: u64 = 0xffff_ffff_0000_0000;
/// Extended L2 bitmap: every subcluster allocated.
pub const BITMAP_ALL_ALLOC: u64 = 0x0000_0000_ffff_ffff;

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// One cached L2 table (entries as raw u64 words: two per cluster with extended L2).
struct L2Table {
    words: Vec<u64>,
    dirty: bool,
    used: u64,
}

/// One cached refcount block (raw on-disk bytes).
struct RcBlock {
    data: Vec<u8>,
    dirty: bool,
}

/// All mutable metadata of an open qcow2 image; guarded by one async mutex that is never held
/// across guest data I/O.
pub struct Meta {
    /// The header as it is (or will be) on disk.
    pub header: Header,
    /// Active L1 table.
    pub l1: Vec<u64>,
    l1_dirty: BTreeSet<usize>,
    l2: HashMap<u64, L2Table>,
    l2_capacity: usize,
    tick: u64,
    reftable: Vec<u64>,
    reftable_dirty: BTreeSet<usize>,
    /// Old (offset, clusters) of a refcount table replaced in memory but not yet on disk.
    reftable_moved: Option<(u64, u64)>,
    rc: HashMap<u64, RcBlock>,
    rc_capacity: usize,
    /// Host byte ranges whose refcount drops once the tables no longer pointing at them are
    /// durable.
    pending_frees: Vec<(u64, u64)>,
    free_cluster_index: u64,
    /// Guest clusters with an allocation in flight; writers of the same cluster wait on these.
    pub inflight: HashMap<u64, Arc<Notify>>,
    /// Whether the header must be rewritten at the next flush.
    pub header_dirty: bool,
    /// Next free byte in the host cluster that compressed clusters are being packed into (QEMU
    /// packs them the same way). Forgotten as soon as that cluster's refcount drops to zero, so
    /// a cluster freed and reused for other data is never written into.
    pub compressed_tail: Option<u64>,
    cluster_bits: u32,
    rc_order: u32,
    file: Arc<dyn Protocol>,
}

impl Meta {
    /// Load the L1 and refcount tables of an image whose header was validated.
    pub async fn load(header: Header, file: Arc<dyn Protocol>) -> Result<Meta> {
        let cs = header.cluster_size();
        let l1_raw = file
            .read_vec(header.l1_table_offset, header.l1_size as usize * 8)
            .await?;
        let l1 = l1_raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        let rt_len = header.refcount_table_clusters as u64 * cs;
        let rt_raw = file
            .read_vec(header.refcount_table_offset, rt_len as usize)
            .await?;
        let reftable: Vec<u64> = rt_raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        let file_len = file.len().await?;
        for (i, &e) in reftable.iter().enumerate() {
            let off = e & !0x1ff;
            if e & 0x1ff != 0 || off % cs != 0 {
                return Err(BlockError::corrupt(
                    file.name(),
                    format!("refcount block {i} offset {off:#x} is not cluster aligned"),
                ));
            }
            if off != 0 && off < cs {
                return Err(BlockError::corrupt(
                    file.name(),
                    format!("refcount block {i} overlaps the header"),
                ));
            }
            if off != 0 && off >= file_len {
                return Err(BlockError::corrupt(
                    file.name(),
                    format!("refcount block {i} lies past the end of the file"),
                ));
            }
        }
        let cache_bytes: u64 = 32 << 20;
        Ok(Meta {
            cluster_bits: header.cluster_bits,
            rc_order: header.refcount_order,
            header,
            l1,
            l1_dirty: BTreeSet::new(),
            l2: HashMap::new(),
            l2_capacity: (cache_bytes / cs).max(16) as usize,
            tick: 0,
            reftable,
            reftable_dirty: BTreeSet::new(),
            reftable_moved: None,
            rc: HashMap::new(),
            rc_capacity: (cache_bytes / cs).max(16) as usize,
            pending_frees: Vec::new(),
            free_cluster_index: 0,
            inflight: HashMap::new(),
            header_dirty: false,
            compressed_tail: None,
            file,
        })
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount entries per refcount block.
    pub fn rc_entries_per_block(&self) -> u64 {
        (self.cs() * 8) >> self.rc_order
    }

    /// Largest refcount value the width can hold.
    pub fn rc_max(&self) -> u64 {
        let bits = 1u32 << self.rc_order;
        if bits == 64 {
            u64::MAX >> 1
        } else {
            (1u64 << bits) - 1
        }
    }

    /// Whether any metadata awaits write-back.
    pub fn is_dirty(&self) -> bool {
        !self.l1_dirty.is_empty()
            || self.l2.values().any(|t| t.dirty)
            || self.rc.values().any(|b| b.dirty)
            || !self.reftable_dirty.is_empty()
            || self.reftable_moved.is_some()
            || !self.pending_frees.is_empty()
            || self.header_dirty
    }

    // ---------------------------------------------------------------- L2 tables

    /// Validate an L1 entry and return the L2 table offset (0 = none).
    pub fn l2_offset(&self, l1_index: usize) -> Result<u64> {
        let e = self.l1.get(l1_index).copied().unwrap_or(0);
        let off = e & OFFSET_MASK;
        if off % self.cs() != 0 {
            return Err(BlockError::corrupt(
                self.file.name(),
                format!("L2 table offset {off:#x} in L1 entry {l1_index} is not cluster aligned"),
            ));
        }
        if off != 0 && off < self.cs() {
            return Err(BlockError::corrupt(
                self.file.name(),
                format!("L2 table in L1 entry {l1_index} overlaps the header"),
            ));
        }
        Ok(off)
    }

    async fn load_l2(&mut self, off: u64) -> Result<()> {
        if self.l2.contains_key(&off) {
            return Ok(());
        }
        if self.l2.len() >= self.l2_capacity {
            self.evict_l2().await?;
        }
        let raw = self.file.read_vec(off, self.cs() as usize).await?;
        let words = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        self.tick += 1;
        self.l2.insert(
            off,
            L2Table {
                words,
                dirty: false,
                used: self.tick,
            },
        );
        Ok(())
    }

    async fn evict_l2(&mut self) -> Result<()> {
        if self.l2.values().any(|t| t.dirty) {
            self.flush().await?;
        }
        // Drop the least recently used half, so eviction work is amortised.
        let mut v: Vec<(u64, u64)> = self.l2.iter().map(|(k, t)| (t.used, *k)).collect();
        v.sort_unstable();
        for (_, k) in v.into_iter().take(self.l2.len() / 2 + 1) {
            self.l2.remove(&k);
        }
        Ok(())
    }

    /// The two words describing guest cluster `gc` (the second is the subcluster bitmap, 0
    /// without extended L2). Unallocated L2 tables read as zero.
    pub async fn l2_get(&mut self, gc: u64) -> Result<(u64, u64)> {
        let (l1i, l2i) = self.split(gc);
        let off = self.l2_offset(l1i)?;
        if off == 0 {
            return Ok((0, 0));
        }
        self.load_l2(off).await?;
        self.tick += 1;
        let tick = self.tick;
        let ext = self.header.extended_l2();
        let t = self
            .l2
            .get_mut(&off)
            .ok_or_else(|| BlockError::corrupt("qcow2", "L2 cache lost a table"))?;
        t.used = tick;
        if ext {
            Ok((t.words[l2i * 2], t.words[l2i * 2 + 1]))
        } else {
            Ok((t.words[l2i], 0))
        }
    }

    fn split(&self, gc: u64) -> (usize, usize) {
        let n = self.header.l2_entries();
        ((gc / n) as usize, (gc % n) as usize)
    }

    /// Make the L2 table for guest cluster `gc` exist and be exclusively ours (COPIED),
    /// allocating or copying it as needed. Returns its host offset.
    pub async fn l2_prepare(&mut self, gc: u64) -> Result<u64> {
        let (l1i, _) = self.split(gc);
        if l1i >= self.l1.len() {
            return Err(BlockError::corrupt(
                self.file.name(),
                "guest cluster beyond the L1 table",
            ));
        }
        let e = self.l1[l1i];
        let off = self.l2_offset(l1i)?;
        if off != 0 && e & OFLAG_COPIED != 0 {
            self.load_l2(off).await?;
            return Ok(off);
        }
        let new = self.alloc_clusters(1).await?;
        let words = if off == 0 {
            vec![0u64; (self.cs() / 8) as usize]
        } else {
            // Shared with an internal snapshot: copy it; the data clusters keep their counts.
            self.load_l2(off).await?;
            let w = self
                .l2
                .get(&off)
                .map(|t| t.words.clone())
                .unwrap_or_default();
            self.pending_frees.push((off, self.cs()));
            w
        };
        if self.l2.len() >= self.l2_capacity {
            self.evict_l2().await?;
        }
        self.tick += 1;
        self.l2.insert(
            new,
            L2Table {
                words,
                dirty: true,
                used: self.tick,
            },
        );
        self.l1[l1i] = new | OFLAG_COPIED;
        self.l1_dirty.insert(l1i);
        Ok(new)
    }

    /// Set the words of guest cluster `gc`; its L2 table must have been prepared.
    pub async fn l2_set(&mut self, gc: u64, entry: u64, bitmap: u64) -> Result<()> {
        let off = self.l2_prepare(gc).await?;
        let (_, l2i) = self.split(gc);
        let ext = self.header.extended_l2();
        let t = self
            .l2
            .get_mut(&off)
            .ok_or_else(|| BlockError::corrupt("qcow2", "L2 cache lost a table"))?;
        if ext {
            t.words[l2i * 2] = entry;
            t.words[l2i * 2 + 1] = bitmap;
        } else {
            t.words[l2i] = entry;
        }
        t.dirty = true;
        Ok(())
    }

    // ---------------------------------------------------------------- refcounts

    async fn load_rc(&mut self, off: u64) -> Result<()> {
        if self.rc.contains_key(&off) {
            return Ok(());
        }
        if self.rc.len() >= self.rc_capacity {
            if self.rc.values().any(|b| b.dirty) {
                self.flush().await?;
            }
            let keys: Vec<u64> = self
                .rc
                .keys()
                .copied()
                .take(self.rc.len() / 2 + 1)
                .collect();
            for k in keys {
                self.rc.remove(&k);
            }
        }
        let data = self.file.read_vec(off, self.cs() as usize).await?;
        self.rc.insert(off, RcBlock { data, dirty: false });
        Ok(())
    }

    fn rc_read(data: &[u8], order: u32, i: u64) -> u64 {
        let bits = 1u64 << order;
        match bits {
            8 => data[i as usize] as u64,
            16 => u16::from_be_bytes([data[2 * i as usize], data[2 * i as usize + 1]]) as u64,
            32 => {
                let o = 4 * i as usize;
                u32::from_be_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]]) as u64
            }
            64 => {
                let o = 8 * i as usize;
                let mut a = [0u8; 8];
                a.copy_from_slice(&data[o..o + 8]);
                u64::from_be_bytes(a)
            }
            _ => {
                let bit = i * bits;
                let byte = data[(bit / 8) as usize];
                ((byte >> (bit % 8)) as u64) & ((1 << bits) - 1)
            }
        }
    }

    fn rc_write(data: &mut [u8], order: u32, i: u64, v: u64) {
        let bits = 1u64 << order;
        match bits {
            8 => data[i as usize] = v as u8,
            16 => {
                data[2 * i as usize..2 * i as usize + 2].copy_from_slice(&(v as u16).to_be_bytes())
            }
            32 => {
                data[4 * i as usize..4 * i as usize + 4].copy_from_slice(&(v as u32).to_be_bytes())
            }
            64 => data[8 * i as usize..8 * i as usize + 8].copy_from_slice(&v.to_be_bytes()),
            _ => {
                let bit = i * bits;
                let mask = ((1u64 << bits) - 1) as u8;
                let b = &mut data[(bit / 8) as usize];
                *b = (*b & !(mask << (bit % 8))) | (((v as u8) & mask) << (bit % 8));
            }
        }
    }

    /// Refcount of host cluster `hc` (0 when no refcount block covers it).
    pub async fn refcount(&mut self, hc: u64) -> Result<u64> {
        let epb = self.rc_entries_per_block();
        let ti = (hc / epb) as usize;
        let Some(&e) = self.reftable.get(ti) else {
            return Ok(0);
        };
        let off = e & !0x1ff;
        if off == 0 {
            return Ok(0);
        }
        self.load_rc(off).await?;
        let b = self
            .rc
            .get(&off)
            .ok_or_else(|| BlockError::corrupt("qcow2", "refcount cache lost a block"))?;
        Ok(Self::rc_read(&b.data, self.rc_order, hc % epb))
    }

    /// Set the refcount of host cluster `hc`, creating refcount blocks (and growing the table)
    /// as needed.
    pub fn set_refcount(&mut self, hc: u64, v: u64) -> BoxFut<'_, ()> {
        Box::pin(async move {
            if v > self.rc_max() {
                return Err(BlockError::NoSpace(format!(
                    "{}: refcount overflow on cluster {hc}",
                    self.file.name()
                )));
            }
            let off = self.ensure_rc_block(hc).await?;
            let epb = self.rc_entries_per_block();
            let order = self.rc_order;
            let b = self
                .rc
                .get_mut(&off)
                .ok_or_else(|| BlockError::corrupt("qcow2", "refcount cache lost a block"))?;
            Self::rc_write(&mut b.data, order, hc % epb, v);
            b.dirty = true;
            Ok(())
        })
    }

    /// Make sure a refcount block covers host cluster `hc`; return its offset.
    ///
    /// Laid out as QEMU does, so images stay byte-identical to qemu-img's: the new block goes
    /// to the first free cluster. When the refcount table has no slot for it, the table grows
    /// the way QEMU grows it: a self-describing area (any further refcount blocks, then a
    /// table half again as large as needed) is built at the first cluster that no refcount
    /// block used so far covers, and the new block is hooked into that table.
    fn ensure_rc_block(&mut self, hc: u64) -> BoxFut<'_, u64> {
        Box::pin(async move {
            let epb = self.rc_entries_per_block();
            let ti = (hc / epb) as usize;
            if let Some(&e) = self.reftable.get(ti) {
                let off = e & !0x1ff;
                if off != 0 {
                    self.load_rc(off).await?;
                    return Ok(off);
                }
            }
            // New block: place it at the first free cluster. If it describes itself, its own
            // entry lives in the new block; otherwise another block records it.
            let c = self.find_free(1).await?;
            // Taken now (as QEMU's allocation does), so that creating the block that describes
            // this one, if that is needed too, cannot pick the same cluster.
            self.free_cluster_index = c + 1;
            let boff = c << self.cluster_bits;
            self.rc.insert(
                boff,
                RcBlock {
                    data: vec![0u8; self.cs() as usize],
                    dirty: true,
                },
            );
            if ti < self.reftable.len() {
                self.reftable[ti] = boff;
                self.reftable_dirty.insert(ti);
                self.set_refcount(c, 1).await?;
                self.free_cluster_index = self.free_cluster_index.max(c + 1);
                return Ok(boff);
            }
            // The table has no slot for the new block.
            if c / epb == ti as u64 {
                let order = self.rc_order;
                let b = self
                    .rc
                    .get_mut(&boff)
                    .ok_or_else(|| BlockError::corrupt("qcow2", "refcount cache lost a block"))?;
                Self::rc_write(&mut b.data, order, c % epb, 1);
            } else {
                self.set_refcount(c, 1).await?;
            }
            let blocks_used = (hc + 1).max(c + 1).div_ceil(epb);
            self.refcount_area_with(blocks_used * epb, 0, false, Some((ti, boff)))
                .await?;
            self.free_cluster_index = self.free_cluster_index.max(c + 1);
            self.commit_reftable_move().await?;
            Ok(boff)
        })
    }

    /// Put a grown refcount table in place at once, as QEMU does when an allocation outgrows
    /// the table: the refcount blocks (with the data written so far), then the new table, then
    /// the header, each synced; then the old table's clusters are freed, so the next
    /// allocations reuse them exactly where qemu-img's would. Until the header is written the
    /// old table stays intact, so a crash at any point leaves a valid image (at worst leaking
    /// the old table's clusters).
    async fn commit_reftable_move(&mut self) -> Result<()> {
        let Some((old_off, old_clusters)) = self.reftable_moved.take() else {
            return Ok(());
        };
        self.write_dirty_rc_blocks().await?;
        // QEMU hooks every refcount block into the table on disk as it creates it: bring
        // the old table up to date too, so the freed clusters hold the same bytes.
        let old_len = ((old_clusters << self.cluster_bits) / 8) as usize;
        let old_dirty: BTreeSet<usize> = self
            .reftable_dirty
            .iter()
            .copied()
            .filter(|&i| i < old_len)
            .collect();
        if !old_dirty.is_empty() && old_len <= self.reftable.len() {
            self.write_table_sectors(old_off, &self.reftable[..old_len], &old_dirty)
                .await?;
        }
        self.file.flush().await?;
        self.write_words(self.header.refcount_table_offset, &self.reftable)
            .await?;
        self.file.flush().await?;
        self.write_header().await?;
        self.file.flush().await?;
        self.reftable_dirty.clear();
        self.update_refcounts(old_off, old_clusters << self.cluster_bits, -1)
            .await
    }

    /// QEMU's `qcow2_refcount_area(exact_size)`: build, from host cluster `start` on, the refcount
    /// blocks still missing to cover `start + additional` clusters plus themselves, then a new
    /// refcount table of exactly the needed size right after them; the new structures get
    /// refcount 1 and the old table is freed at the next flush. Returns the first cluster after
    /// the new structures. Every cluster from `start` on must be free. Used by falloc/full
    /// preallocation, which must lay the file out as qemu-img does.
    pub async fn refcount_area(&mut self, start: u64, additional: u64) -> Result<u64> {
        self.refcount_area_with(start, additional, true, None).await
    }

    /// [`Meta::refcount_area`] with QEMU's other knobs: without `exact` the table is sized
    /// generously (half as large again, as when QEMU grows a full table during allocation);
    /// `new_block` (table index, offset) hooks a refcount block the caller already placed into
    /// the new table.
    async fn refcount_area_with(
        &mut self,
        start: u64,
        additional: u64,
        exact: bool,
        new_block: Option<(usize, u64)>,
    ) -> Result<u64> {
        let epb = self.rc_entries_per_block();
        let per_cluster = self.cs() / 8;
        // Fixed point of "clusters + refcount blocks + table clusters" (QEMU's
        // qcow2_refcount_metadata_size, whose generous variant reserves half the table again).
        let mut clusters = start + additional;
        let mut generous = !exact;
        let (mut blocks, mut table, mut n) = (0u64, 0u64, 0u64);
        loop {
            let last = n;
            blocks = (clusters + table + blocks).div_ceil(epb);
            table = blocks.div_ceil(per_cluster);
            n = clusters + blocks + table;
            if n == last && generous {
                clusters += table.div_ceil(2);
                n = 0;
                generous = false;
                continue;
            }
            if n == last {
                break;
            }
        }
        let wanted = if exact {
            blocks
        } else {
            blocks + blocks.div_ceil(2)
        };
        let table_size = (wanted.div_ceil(per_cluster) * per_cluster) as usize;
        let table_clusters = table_size as u64 / per_cluster;
        if table_clusters * self.cs() > super::header::MAX_REFTABLE_BYTES {
            return Err(BlockError::NoSpace(format!(
                "{}: refcount table would exceed its maximum size",
                self.file.name()
            )));
        }
        let mut new_table = self.reftable.clone();
        new_table.resize(table_size, 0);
        if let Some((i, off)) = new_block {
            if let Some(e) = new_table.get_mut(i) {
                *e = off;
            }
        }
        let area_index = start / epb;
        let new_blocks = (area_index..blocks)
            .filter(|&i| new_table[i as usize] & !0x1ff == 0)
            .count() as u64;
        let table_start = start + new_blocks;
        let end = table_start + table_clusters;
        let mut next_block = start;
        for i in area_index..blocks {
            let mut off = new_table[i as usize] & !0x1ff;
            if off == 0 {
                off = next_block << self.cluster_bits;
                next_block += 1;
                self.rc.insert(
                    off,
                    RcBlock {
                        data: vec![0u8; self.cs() as usize],
                        dirty: true,
                    },
                );
                new_table[i as usize] = off;
            } else {
                self.load_rc(off).await?;
            }
            let first = i * epb;
            if first < end {
                let order = self.rc_order;
                let b = self
                    .rc
                    .get_mut(&off)
                    .ok_or_else(|| BlockError::corrupt("qcow2", "refcount cache lost a block"))?;
                for c in start.max(first)..end.min(first + epb) {
                    Self::rc_write(&mut b.data, order, c - first, 1);
                }
                b.dirty = true;
            }
        }
        let old = (
            self.header.refcount_table_offset,
            self.header.refcount_table_clusters as u64,
        );
        self.reftable = new_table;
        self.header.refcount_table_offset = table_start << self.cluster_bits;
        self.header.refcount_table_clusters = table_clusters as u32;
        if self.reftable_moved.is_none() {
            self.reftable_moved = Some(old);
        } else {
            self.pending_frees.push((old.0, old.1 * self.cs()));
        }
        Ok(end)
    }

    /// First run of `n` free clusters at or after the allocation cursor. The cursor moves to
    /// the run's start: clusters before it are in use or in a hole too small for this request
    /// (they are found again when a free lowers the cursor), so allocation stays linear.
    async fn find_free(&mut self, n: u64) -> Result<u64> {
        let mut start = self.free_cluster_index.max(1);
        let mut c = start;
        while c < start + n {
            if self.refcount(c).await? != 0 {
                start = c + 1;
            }
            c += 1;
            if start > (1u64 << (56 - self.cluster_bits)) {
                return Err(BlockError::NoSpace(self.file.name().to_string()));
            }
        }
        self.free_cluster_index = start;
        Ok(start)
    }

    /// Allocate `n` contiguous host clusters with refcount 1; returns the byte offset.
    ///
    /// A run that needs a new refcount block is handled as QEMU does (so layouts stay
    /// byte-identical): the block goes to the first free cluster after the run, and the search
    /// restarts at the run's start.
    pub fn alloc_clusters(&mut self, n: u64) -> BoxFut<'_, u64> {
        Box::pin(async move {
            loop {
                let start = self.find_free(n).await?;
                let epb = self.rc_entries_per_block();
                let mut missing = None;
                let mut c = start;
                while c < start + n {
                    let ti = (c / epb) as usize;
                    if self.reftable.get(ti).is_none_or(|&e| e & !0x1ff == 0) {
                        missing = Some(c);
                        break;
                    }
                    c = (c / epb + 1) * epb;
                }
                if let Some(c) = missing {
                    self.free_cluster_index = start + n;
                    self.ensure_rc_block(c).await?;
                    self.free_cluster_index = start;
                    continue;
                }
                let mut free = true;
                for c in start..start + n {
                    if self.refcount(c).await? != 0 {
                        free = false;
                        break;
                    }
                }
                if !free {
                    continue;
                }
                for c in start..start + n {
                    self.set_refcount(c, 1).await?;
                }
                self.free_cluster_index = self.free_cluster_index.max(start + n);
                return Ok(start << self.cluster_bits);
            }
        })
    }

    /// Release the clusters covering host bytes `[off, off+len)` once the tables that
    /// referenced them are durable.
    pub fn free_later(&mut self, off: u64, len: u64) {
        if len > 0 {
            self.pending_frees.push((off, len));
        }
    }

    /// Add `delta` to the refcount of every cluster in host bytes `[off, off+len)`.
    pub async fn update_refcounts(&mut self, off: u64, len: u64, delta: i64) -> Result<()> {
        let first = off >> self.cluster_bits;
        let last = (off + len.max(1) - 1) >> self.cluster_bits;
        for c in first..=last {
            let r = self.refcount(c).await?;
            let n = r as i64 + delta;
            if n < 0 {
                return Err(BlockError::corrupt(
                    self.file.name(),
                    format!("refcount of cluster {c} would drop below zero"),
                ));
            }
            self.set_refcount(c, n as u64).await?;
            if n == 0 && c < self.free_cluster_index {
                self.free_cluster_index = c;
            }
            if n == 0 && self.compressed_tail.map(|t| t >> self.cluster_bits) == Some(c) {
                self.compressed_tail = None;
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------- write-back

    async fn write_words(&self, off: u64, words: &[u64]) -> Result<()> {
        let mut buf = Vec::with_capacity(words.len() * 8);
        for w in words {
            buf.extend_from_slice(&w.to_be_bytes());
        }
        self.file.write_vec(off, buf).await
    }

    /// Write every 512-byte sector of a table whose entries are in `dirty`.
    async fn write_table_sectors(
        &self,
        base: u64,
        table: &[u64],
        dirty: &BTreeSet<usize>,
    ) -> Result<()> {
        let mut last_sector = None;
        for &i in dirty {
            let sector = i / 64;
            if last_sector == Some(sector) {
                continue;
            }
            last_sector = Some(sector);
            let lo = sector * 64;
            let hi = (lo + 64).min(table.len());
            self.write_words(base + lo as u64 * 8, &table[lo..hi])
                .await?;
        }
        Ok(())
    }

    /// Rewrite the header cluster from `self.header`, then sync.
    pub async fn write_header(&mut self) -> Result<()> {
        let buf = self.header.serialize()?;
        self.file.write_vec(0, buf).await?;
        self.file.flush().await?;
        self.header_dirty = false;
        Ok(())
    }

    /// Write all dirty metadata back in dependency order (see the module docs).
    pub fn flush(&mut self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            if self.file.read_only() {
                return Ok(());
            }
            // 1. refcount blocks + data.
            self.write_dirty_rc_blocks().await?;
            self.file.flush().await?;
            // 2. refcount table.
            if let Some((old_off, old_clusters)) = self.reftable_moved.take() {
                self.write_words(self.header.refcount_table_offset, &self.reftable)
                    .await?;
                self.file.flush().await?;
                self.write_header().await?;
                self.reftable_dirty.clear();
                self.pending_frees
                    .push((old_off, old_clusters << self.cluster_bits));
            } else if !self.reftable_dirty.is_empty() {
                let dirty = std::mem::take(&mut self.reftable_dirty);
                self.write_table_sectors(self.header.refcount_table_offset, &self.reftable, &dirty)
                    .await?;
                self.file.flush().await?;
            }
            if self.header_dirty {
                self.write_header().await?;
            }
            // 3. L2 tables.
            let dirty: Vec<u64> = self
                .l2
                .iter()
                .filter(|(_, t)| t.dirty)
                .map(|(k, _)| *k)
                .collect();
            if !dirty.is_empty() {
                for off in &dirty {
                    if let Some(t) = self.l2.get(off) {
                        self.write_words(*off, &t.words).await?;
                    }
                }
                self.file.flush().await?;
                for off in &dirty {
                    if let Some(t) = self.l2.get_mut(off) {
                        t.dirty = false;
                    }
                }
            }
            // 4. L1 entries.
            if !self.l1_dirty.is_empty() {
                let dirty = std::mem::take(&mut self.l1_dirty);
                self.write_table_sectors(self.header.l1_table_offset, &self.l1, &dirty)
                    .await?;
                self.file.flush().await?;
            }
            // 5. deferred frees.
            if !self.pending_frees.is_empty() {
                let frees = std::mem::take(&mut self.pending_frees);
                for (off, len) in frees {
                    self.update_refcounts(off, len, -1).await?;
                }
                self.write_dirty_rc_blocks().await?;
                self.file.flush().await?;
            }
            Ok(())
        })
    }

    async fn write_dirty_rc_blocks(&mut self) -> Result<()> {
        let dirty: Vec<u64> = self
            .rc
            .iter()
            .filter(|(_, b)| b.dirty)
            .map(|(k, _)| *k)
            .collect();
        for off in dirty {
            if let Some(b) = self.rc.get(&off) {
                self.file.write_vec(off, b.data.clone()).await?;
            }
            if let Some(b) = self.rc.get_mut(&off) {
                b.dirty = false;
            }
        }
        Ok(())
    }

    /// Replace the L1 table with a larger one holding `entries` entries (for growing the
    /// image). Written and synced before the header points at it; the old table is freed later.
    pub async fn grow_l1(&mut self, entries: u64) -> Result<()> {
        if entries <= self.l1.len() as u64 {
            return Ok(());
        }
        if entries * 8 > super::header::MAX_L1_BYTES {
            return Err(BlockError::InvalidArgument(format!(
                "{}: image would need an L1 table larger than 32 MiB",
                self.file.name()
            )));
        }
        // Tables L1 points to must be on disk before the new L1 is.
        self.flush().await?;
        let bytes = entries * 8;
        let clusters = bytes.div_ceil(self.cs());
        let new_off = self.alloc_clusters(clusters).await?;
        let mut new_l1 = self.l1.clone();
        new_l1.resize(entries as usize, 0);
        self.flush().await?;
        self.write_words(new_off, &new_l1).await?;
        self.file.flush().await?;
        let old = (self.header.l1_table_offset, self.l1.len() as u64 * 8);
        self.header.l1_table_offset = new_off;
        self.header.l1_size = entries as u32;
        self.l1 = new_l1;
        self.l1_dirty.clear();
        self.write_header().await?;
        if old.1 > 0 {
            self.free_later(old.0, old.1);
        }
        self.flush().await
    }

    /// Every L2 table offset referenced by the active L1 (for check and shrink).
    pub fn l1_entries(&self) -> &[u64] {
        &self.l1
    }

    /// Current refcount table (for check).
    pub fn reftable(&self) -> &[u64] {
        &self.reftable
    }
}
