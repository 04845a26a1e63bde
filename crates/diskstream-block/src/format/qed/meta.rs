//! In-memory QED metadata: the L1 table, an L2 table cache, cluster allocation, and the ordered
//! write-back that keeps every crash consistent.
//!
//! # Allocation
//! QED has no refcounts: new clusters are appended at the end of the file (`file_size`, the
//! file length rounded down to whole clusters when the image was opened). A data run is
//! allocated first and its L2 table (if the L1 entry was empty) right after it, as QEMU does, so
//! the same sequence of writes lays out the same file.
//!
//! # Ordering (the crash-safety argument)
//! Table changes stay in memory until [`Meta::flush`], which writes them in this order:
//! 1. `fdatasync`: every data cluster written so far (and the file growth under it) is durable;
//! 2. dirty L2 entries (whole new tables, changed ranges of old ones), `fdatasync`: an L2 entry
//!    never reaches the disk before the data it points at;
//! 3. dirty L1 entries (and the header, when the need-check flag is cleared), `fdatasync`: an
//!    L1 entry never points at an L2 table that is not on disk.
//!
//! A crash therefore leaves at most clusters nothing points at (leaks, which `check` reports
//! and which only waste space); no entry ever points at unwritten or missing clusters. QEMU gets
//! the same guarantee only with a backing file (it flushes data before the L2 update there) and
//! otherwise relies on the need-check flag and a repair on the next open. We keep the flag too
//! (set before the first allocation of an image without a backing file, cleared by the next
//! flush or a clean close), so QEMU and we both check an image a crashed writer left behind.
//! Evicting a dirty table from a full cache runs the same flush first.

use super::header::{Header, F_NEED_CHECK, ZERO_CLUSTER};
use crate::error::{BlockError, Result};
use crate::protocol::Protocol;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::Notify;

/// Bytes of table cache per image.
const CACHE_BYTES: u64 = 32 << 20;

/// One cached L2 table.
struct L2Table {
    entries: Vec<u64>,
    /// Entries changed since the table was last written: `[first, last)`.
    dirty: Option<(usize, usize)>,
    used: u64,
}

/// Widen a dirty range by `[a, b)`.
fn widen(r: &mut Option<(usize, usize)>, a: usize, b: usize) {
    *r = Some(match *r {
        Some((x, y)) => (x.min(a), y.max(b)),
        None => (a, b),
    });
}

/// Little-endian bytes of `entries[a..b]`, widened to whole 512-byte sectors; returns the byte
/// offset of the first entry written and the bytes.
fn sector_range(entries: &[u64], a: usize, b: usize) -> (u64, Vec<u8>) {
    let a = a / 64 * 64;
    let b = (b.div_ceil(64) * 64).min(entries.len());
    let mut out = Vec::with_capacity((b - a) * 8);
    for e in &entries[a..b] {
        out.extend_from_slice(&e.to_le_bytes());
    }
    (a as u64 * 8, out)
}

fn parse_table(raw: &[u8]) -> Vec<u64> {
    raw.chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_le_bytes(a)
        })
        .collect()
}

/// All mutable metadata of an open QED image, guarded by one async mutex that is never held
/// across guest data I/O.
pub struct Meta {
    /// The header as it is (or will be) on disk.
    pub header: Header,
    l1: Vec<u64>,
    l1_dirty: Option<(usize, usize)>,
    l2: HashMap<u64, L2Table>,
    l2_capacity: usize,
    tick: u64,
    /// End of the allocated part of the file (cluster aligned): new clusters go here.
    pub file_size: u64,
    /// Guest clusters with an allocation in flight; writers of the same cluster wait on these.
    pub inflight: HashMap<u64, Arc<Notify>>,
    header_dirty: bool,
    file: Arc<dyn Protocol>,
}

impl Meta {
    /// Load the L1 table of an image whose header was validated against a file of `file_len`
    /// bytes.
    pub async fn load(header: Header, file: Arc<dyn Protocol>, file_len: u64) -> Result<Meta> {
        let raw = file
            .read_vec(header.l1_table_offset, header.table_bytes() as usize)
            .await?;
        let cs = header.cluster_size as u64;
        let table_bytes = header.table_bytes();
        Ok(Meta {
            l1: parse_table(&raw),
            l1_dirty: None,
            l2: HashMap::new(),
            l2_capacity: (CACHE_BYTES / table_bytes).max(4) as usize,
            tick: 0,
            file_size: file_len / cs * cs,
            inflight: HashMap::new(),
            header_dirty: false,
            header,
            file,
        })
    }

    fn cs(&self) -> u64 {
        self.header.cluster_size as u64
    }

    /// `(L1 index, L2 index)` of guest cluster `gc`.
    pub fn split(&self, gc: u64) -> (usize, usize) {
        let n = self.header.table_entries();
        ((gc / n) as usize, (gc % n) as usize)
    }

    /// The validated L2 table offset of L1 entry `i` (0: no table).
    pub fn l2_offset(&self, i: usize) -> Result<u64> {
        let off = self.l1.get(i).copied().unwrap_or(0);
        if off != 0 && !self.header.table_offset_valid(off, self.file_size) {
            return Err(BlockError::corrupt(
                self.file.name(),
                format!("L2 table offset {off:#x} in L1 entry {i} is invalid"),
            ));
        }
        Ok(off)
    }

    /// The raw L1 table (for the consistency check).
    pub fn l1(&self) -> &[u64] {
        &self.l1
    }

    async fn load_l2(&mut self, off: u64) -> Result<()> {
        if self.l2.contains_key(&off) {
            return Ok(());
        }
        self.make_room().await?;
        let raw = self
            .file
            .read_vec(off, self.header.table_bytes() as usize)
            .await?;
        self.tick += 1;
        self.l2.insert(
            off,
            L2Table {
                entries: parse_table(&raw),
                dirty: None,
                used: self.tick,
            },
        );
        Ok(())
    }

    async fn make_room(&mut self) -> Result<()> {
        if self.l2.len() < self.l2_capacity {
            return Ok(());
        }
        if self.l2.values().any(|t| t.dirty.is_some()) {
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

    /// The raw L2 entry of guest cluster `gc`: 0 unallocated, 1 zero, else a validated data
    /// cluster offset.
    pub async fn get(&mut self, gc: u64) -> Result<u64> {
        let (l1i, l2i) = self.split(gc);
        let off = self.l2_offset(l1i)?;
        if off == 0 {
            return Ok(0);
        }
        self.load_l2(off).await?;
        self.tick += 1;
        let tick = self.tick;
        let t = self
            .l2
            .get_mut(&off)
            .ok_or_else(|| BlockError::corrupt("qed", "L2 cache lost a table"))?;
        t.used = tick;
        let e = t.entries[l2i];
        if e > ZERO_CLUSTER && !self.header.cluster_offset_valid(e, self.file_size) {
            return Err(BlockError::corrupt(
                self.file.name(),
                format!("data cluster offset {e:#x} of guest cluster {gc} is invalid"),
            ));
        }
        Ok(e)
    }

    /// Make the L2 table covering guest cluster `gc` exist, allocating a zeroed one at the end
    /// of the file (after whatever was allocated before it) if the L1 entry is empty.
    pub async fn prepare_l2(&mut self, gc: u64) -> Result<u64> {
        let (l1i, _) = self.split(gc);
        if l1i >= self.l1.len() {
            return Err(BlockError::corrupt(
                self.file.name(),
                "guest cluster beyond the L1 table",
            ));
        }
        let off = self.l2_offset(l1i)?;
        if off != 0 {
            self.load_l2(off).await?;
            return Ok(off);
        }
        self.make_room().await?;
        let new = self.alloc(self.header.table_size as u64);
        let n = self.header.table_entries() as usize;
        self.tick += 1;
        self.l2.insert(
            new,
            L2Table {
                entries: vec![0; n],
                dirty: Some((0, n)),
                used: self.tick,
            },
        );
        self.l1[l1i] = new;
        widen(&mut self.l1_dirty, l1i, l1i + 1);
        Ok(new)
    }

    /// Set the L2 entry of guest cluster `gc` (allocating its table if needed).
    pub async fn set(&mut self, gc: u64, entry: u64) -> Result<()> {
        let off = self.prepare_l2(gc).await?;
        let (_, l2i) = self.split(gc);
        let t = self
            .l2
            .get_mut(&off)
            .ok_or_else(|| BlockError::corrupt("qed", "L2 cache lost a table"))?;
        if t.entries[l2i] != entry {
            t.entries[l2i] = entry;
            widen(&mut t.dirty, l2i, l2i + 1);
        }
        Ok(())
    }

    /// Reserve `n` clusters at the end of the file; returns the offset of the first.
    pub fn alloc(&mut self, n: u64) -> u64 {
        let off = self.file_size;
        self.file_size += n * self.cs();
        off
    }

    /// Set the need-check flag on disk before the first allocation of an image without a
    /// backing file (QEMU's rule); no-op when it is set already.
    pub async fn mark_need_check(&mut self) -> Result<()> {
        if self.header.features & F_NEED_CHECK != 0 {
            return Ok(());
        }
        self.header.features |= F_NEED_CHECK;
        self.write_header().await
    }

    /// Write the 64 header bytes (the rest of the header clusters is left as it is).
    pub async fn write_header(&mut self) -> Result<()> {
        self.file
            .write_vec(0, self.header.serialize().to_vec())
            .await?;
        self.header_dirty = false;
        Ok(())
    }

    /// Whether any table change awaits write-back.
    pub fn is_dirty(&self) -> bool {
        self.l1_dirty.is_some() || self.l2.values().any(|t| t.dirty.is_some())
    }

    /// Write back every table change in the crash-safe order of the module documentation,
    /// clearing the need-check flag with the last step.
    pub async fn flush(&mut self) -> Result<()> {
        // 1. Data first.
        self.file.flush().await?;
        // 2. L2 tables.
        let mut wrote_l2 = false;
        let mut offs: Vec<u64> = self
            .l2
            .iter()
            .filter(|(_, t)| t.dirty.is_some())
            .map(|(k, _)| *k)
            .collect();
        offs.sort_unstable();
        for off in offs {
            let Some(t) = self.l2.get(&off) else { continue };
            let Some((a, b)) = t.dirty else { continue };
            let (rel, bytes) = sector_range(&t.entries, a, b);
            self.file.write_vec(off + rel, bytes).await?;
            if let Some(t) = self.l2.get_mut(&off) {
                t.dirty = None;
            }
            wrote_l2 = true;
        }
        if wrote_l2 {
            self.file.flush().await?;
        }
        // 3. L1 entries, and the header once everything it vouches for is on disk.
        let mut wrote = false;
        if let Some((a, b)) = self.l1_dirty {
            let (rel, bytes) = sector_range(&self.l1, a, b);
            self.file
                .write_vec(self.header.l1_table_offset + rel, bytes)
                .await?;
            self.l1_dirty = None;
            wrote = true;
        }
        if self.header.features & F_NEED_CHECK != 0 {
            self.header.features &= !F_NEED_CHECK;
            self.header_dirty = true;
        }
        if self.header_dirty {
            self.write_header().await?;
            wrote = true;
        }
        if wrote {
            self.file.flush().await?;
        }
        Ok(())
    }

    /// Forget every table (all of them must be clean), re-reading the L1 table from disk; used
    /// after the consistency check rewrote tables behind the cache.
    pub async fn reload(&mut self) -> Result<()> {
        let raw = self
            .file
            .read_vec(
                self.header.l1_table_offset,
                self.header.table_bytes() as usize,
            )
            .await?;
        self.l1 = parse_table(&raw);
        self.l1_dirty = None;
        self.l2.clear();
        Ok(())
    }

    /// Empty the L1 table in memory (every cluster becomes unallocated); the caller flushes
    /// and may then cut the file back with [`Meta::truncate_to_tables`].
    pub fn clear_l1(&mut self) {
        let n = self.l1.len();
        self.l1.iter_mut().for_each(|e| *e = 0);
        self.l1_dirty = Some((0, n));
        self.l2.clear();
    }

    /// After [`Meta::clear_l1`] and a flush: drop everything after the header and the L1
    /// table from the file.
    pub async fn truncate_to_tables(&mut self) -> Result<()> {
        let end = (self.header.l1_table_offset + self.header.table_bytes())
            .max(self.header.header_bytes());
        self.file.set_len(end).await?;
        self.file.flush().await?;
        self.file_size = end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sector_ranges_are_aligned() {
        let e: Vec<u64> = (0..256).collect();
        let (off, b) = sector_range(&e, 70, 71);
        assert_eq!(off, 64 * 8);
        assert_eq!(b.len(), 512);
        let (off, b) = sector_range(&e, 0, 256);
        assert_eq!((off, b.len()), (0, 2048));
        let (off, b) = sector_range(&e[..100], 90, 100);
        assert_eq!((off, b.len()), (512, 36 * 8));
    }
}
