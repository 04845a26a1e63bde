//! Consistency check and repair of qcow2 images, with `qemu-img check` semantics.
//!
//! The check works on the raw metadata of a *closed* image (never through the [`Meta`] cache of
//! an open one), because its job is to find out whether that metadata can be trusted at all. It
//! rebuilds the reference counts from scratch by walking every structure that owns host clusters:
//! the header cluster, the active L1 table and every L2 table and data cluster it reaches, each
//! internal snapshot's L1 table (and what it reaches), the snapshot table, the refcount table and
//! blocks, and the persistent-bitmap directory and tables. Comparing that count with the on-disk
//! refcounts finds *leaks* (on-disk higher: wasted space, harmless) and *corruptions* (on-disk
//! lower: a later allocation could overwrite live data). The walk also validates alignment,
//! reserved bits, offsets inside the file and the `COPIED` flags of the active tables.
//!
//! Repair follows QEMU's order, so the results match what `qemu-img check -r` reports:
//! 1. L2 entries that are wrong on their own (unaligned preallocated zero clusters, `COPIED` on a
//!    compressed cluster) are fixed while walking;
//! 2. refcounts are corrected in place (leaks, and for `-r all` counts that are too low but not
//!    zero); when the refcount structure itself cannot be trusted (a referenced cluster reads as
//!    refcount 0, a refcount block is unaligned, outside the file or shared) a complete new
//!    refcount table and blocks are written past the end of the file and the header is switched
//!    to them;
//! 3. `COPIED` flags are made to agree with the (now correct) refcounts;
//! 4. the image is checked again and that second result is reported, together with how many
//!    problems were fixed; the dirty bit (and after `-r all` the corrupt bit) is cleared when no
//!    corruption remains.
//!
//! Hostile images fail cleanly: every table read is bounded by the real file length, the
//! in-memory refcount array has one entry per cluster of the real file, references past the end
//! of the file are reported instead of counted, and the number of retained messages is capped.
//!
//! [`Meta`]: super::meta::Meta

use super::header::{
    Header, AUTOCLEAR_BITMAPS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, MAX_CLUSTER_BITS, MAX_L1_BYTES,
    MAX_REFTABLE_BYTES,
};
use super::meta::{BITMAP_ALL_ALLOC, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use crate::error::{BlockError, Result};
use crate::protocol::Protocol;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;

/// Reserved bits of an L1 entry (everything but the offset and `COPIED`).
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard (uncompressed) L2 entry; bit 0 is the zero flag.
const L2_STD_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Reserved bits of a refcount table entry.
const REFT_RESERVED: u64 = 0x1ff;
/// Header extension holding the persistent-bitmap directory pointer.
const EXT_BITMAPS: u32 = 0x2385_2875;
/// Reserved bits of a bitmap table entry.
const BME_RESERVED: u64 = 0xff00_0000_0000_01fe;
/// Bitmap table entry flag: the whole cluster reads as ones (only with offset 0).
const BME_ALL_ONES: u64 = 1;
/// QEMU's limit on the number of persistent bitmaps.
const MAX_BITMAPS: u64 = 65535;
/// QEMU's limit on the size of the bitmap directory.
const MAX_BITMAP_DIRECTORY: u64 = 64 << 20;
/// QEMU's limit on the extra data of one snapshot table entry.
const MAX_SNAPSHOT_EXTRA: u32 = 1024;
/// Messages kept per category; the rest are counted (a wrecked image can have millions).
const MAX_MESSAGES: usize = 10_000;
/// Upper bound on the in-memory refcount array (entries), whatever the file length claims.
const MAX_ARRAY_CLUSTERS: u64 = 1 << 30;

/// What `check` may change on disk (`qemu-img check -r`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepairMode {
    /// Report only; the image is not modified (it may be opened read-only).
    None,
    /// Fix leaked clusters (refcounts higher than the references), which is always safe.
    Leaks,
    /// Fix leaks and corruptions, rebuilding the refcount structure when it cannot be trusted.
    All,
}

/// The outcome of a check, shaped like QEMU's `ImageCheck` so front ends can print
/// `qemu-img check`-compatible human and JSON output. After a repair, the counts describe the
/// image *after* repairing (as qemu-img's "double check" does) and the `*_fixed` fields say what
/// was repaired.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckResult {
    /// Inconsistencies that may corrupt data (refcounts too low, bad offsets, wrong flags).
    pub corruptions: u64,
    /// Clusters whose refcount is higher than their references (wasted space only).
    pub leaks: u64,
    /// Problems that kept the check itself from completing (e.g. a needed rebuild with `-r leaks`).
    pub check_errors: u64,
    /// Corruptions repaired by this run.
    pub corruptions_fixed: u64,
    /// Leaks repaired by this run.
    pub leaks_fixed: u64,
    /// End of the last cluster in use (referenced or with a non-zero refcount).
    pub image_end_offset: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters allocated in the active L1/L2 tables.
    pub allocated_clusters: u64,
    /// Allocated guest clusters not contiguous with the previous one of their L2 table
    /// (compressed clusters always count).
    pub fragmented_clusters: u64,
    /// Allocated guest clusters that are compressed.
    pub compressed_clusters: u64,
    /// Diagnostic lines in qemu-img's wording ("Leaked cluster 5 refcount=1 reference=0", ...).
    pub messages: Vec<String>,
}

impl CheckResult {
    /// qemu-img's exit status for this result: 1 if the check could not complete, else 2 with
    /// corruptions, else 3 with leaks, else 0. Scripts branch on these codes.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}

/// Check (and with `repair` other than [`RepairMode::None`], repair) the qcow2 image on `file`,
/// which must not be open by a driver at the same time. Fails only when the image cannot be
/// checked at all (unreadable, not qcow2, header invalid, I/O error); inconsistencies are
/// reported in the result.
pub async fn check(file: Arc<dyn Protocol>, repair: RepairMode) -> Result<CheckResult> {
    let f: &dyn Protocol = file.as_ref();
    if repair != RepairMode::None && f.read_only() {
        return Err(BlockError::ReadOnly(f.name().to_string()));
    }
    let all = repair == RepairMode::All;
    let mut first = Walk::run(f, all, false).await?;
    if repair == RepairMode::None {
        return Ok(first.into_result(0, 0, Vec::new()));
    }
    if first.rebuild && !all {
        // A refcount of 0 on a used cluster (or a broken refcount block) cannot be fixed
        // without rebuilding; fixing leaks alone could free clusters that are in use. QEMU
        // stops right there, before its COPIED-flag pass, so those findings are not reported.
        drop(std::mem::take(&mut first.copied_msgs));
        let mut r = first.into_result(0, 0, Vec::new());
        r.messages
            .push("ERROR need to rebuild refcount structures".to_string());
        r.check_errors += 1;
        return Ok(r);
    }

    // Messages of the repairing pass: what was found (COPIED findings are stale once the
    // refcounts change, so they come from the pass that fixes them), then what was done.
    let mut msgs = Vec::new();
    std::mem::take(&mut first.walk_msgs).append_to(&mut msgs);
    std::mem::take(&mut first.rc_msgs).append_to(&mut msgs);
    let mut corruptions_fixed = first.entries_fixed;
    let mut leaks_fixed = 0;
    let mut refcounts_changed = false;
    if first.rebuild {
        msgs.push("Rebuilding refcount structure".to_string());
        rebuild_refcounts(f, &mut first).await?;
        corruptions_fixed += first.rc_low + first.rc_zero + first.struct_corruptions;
        leaks_fixed += first.rc_leaks;
        refcounts_changed = true;
        // The old structure is leaked now: repair that (as QEMU does, reported but not
        // counted, since the rebuild itself introduced these leaks).
        let fresh = Walk::run(f, false, false).await?;
        if fresh.rc_leaks > 0 {
            fix_refcounts_in_place(f, &fresh, false, &mut msgs).await?;
        }
    } else if first.rc_leaks > 0 || (all && first.rc_low > 0) {
        let (l, c) = fix_refcounts_in_place(f, &first, all, &mut msgs).await?;
        leaks_fixed += l;
        corruptions_fixed += c;
        refcounts_changed = l + c > 0;
    }
    let copied_mismatch = first.copied_mismatch;
    drop(first);
    if all && (refcounts_changed || copied_mismatch > 0) {
        let second = Walk::run(f, true, true).await?;
        corruptions_fixed += second.entries_fixed + second.copied_fixed;
        second.copied_msgs.append_to(&mut msgs);
    }
    f.flush().await?;

    // Double check, and mark the image clean when nothing harmful remains.
    let last = Walk::run(f, false, false).await?;
    if last.total_corruptions() == 0 && last.check_errors == 0 {
        let mut clear = INCOMPAT_DIRTY;
        if all {
            clear |= INCOMPAT_CORRUPT;
        }
        if last.h.incompatible_features & clear != 0 {
            let mut h = last.h.clone();
            h.incompatible_features &= !clear;
            f.write_vec(0, h.serialize()?).await?;
            f.flush().await?;
        }
    }
    if corruptions_fixed + leaks_fixed == 0 {
        // Nothing was repaired: the double check is the whole story.
        return Ok(last.into_result(0, 0, Vec::new()));
    }
    msgs.push("The following inconsistencies were found and repaired:".to_string());
    msgs.push(String::new());
    msgs.push(format!("    {leaks_fixed} leaked clusters"));
    msgs.push(format!("    {corruptions_fixed} corruptions"));
    msgs.push(String::new());
    msgs.push("Double checking the fixed image now...".to_string());
    Ok(last.into_result(corruptions_fixed, leaks_fixed, msgs))
}

/// Repair an image whose dirty bit is set (a lazy-refcounts writer did not close it), as QEMU
/// does automatically when such an image is opened read-write. Runs a full `-r all` check and
/// fails if corruptions or check errors remain, because writing to the image could then destroy
/// data.
pub async fn repair_dirty(file: Arc<dyn Protocol>) -> Result<()> {
    let name = file.name().to_string();
    let r = check(file, RepairMode::All).await?;
    if r.corruptions > 0 || r.check_errors > 0 {
        return Err(BlockError::corrupt(
            &name,
            format!(
                "Could not repair dirty image: {} corruptions and {} check errors remain \
                 (run 'diskstream img check -r all' for details)",
                r.corruptions, r.check_errors
            ),
        ));
    }
    tracing::info!(
        image = %name,
        leaks_fixed = r.leaks_fixed,
        corruptions_fixed = r.corruptions_fixed,
        "repaired dirty qcow2 image"
    );
    Ok(())
}

// ------------------------------------------------------------------------------ helpers

/// A capped list of diagnostic lines.
#[derive(Default)]
struct Msgs {
    lines: Vec<String>,
    dropped: u64,
}

impl Msgs {
    fn push(&mut self, f: impl FnOnce() -> String) {
        if self.lines.len() < MAX_MESSAGES {
            self.lines.push(f());
        } else {
            self.dropped += 1;
        }
    }

    fn append_to(self, out: &mut Vec<String>) {
        out.extend(self.lines);
        if self.dropped > 0 {
            out.push(format!("({} more messages not shown)", self.dropped));
        }
    }
}

fn be16(b: &[u8], off: usize) -> u64 {
    match b.get(off..off + 2) {
        Some(s) => u16::from_be_bytes([s[0], s[1]]) as u64,
        None => 0,
    }
}

fn be32(b: &[u8], off: usize) -> u64 {
    match b.get(off..off + 4) {
        Some(s) => u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as u64,
        None => 0,
    }
}

fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

fn put64(b: &mut [u8], off: usize, v: u64) {
    if let Some(s) = b.get_mut(off..off + 8) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

/// Largest refcount a `1 << order` bit entry can hold.
fn rc_max(order: u32) -> u64 {
    let bits = 1u32 << order.min(6);
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Refcount entry `i` of a refcount block (sub-byte widths LSB-first within each byte).
fn rc_get(block: &[u8], order: u32, i: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = i * bits;
            let byte = block.get(bit / 8).copied().unwrap_or(0) as u64;
            (byte >> (bit % 8)) & ((1u64 << bits) - 1)
        }
        3 => block.get(i).copied().unwrap_or(0) as u64,
        4 => be16(block, 2 * i),
        5 => be32(block, 4 * i),
        _ => be64(block, 8 * i),
    }
}

/// Set refcount entry `i` of a refcount block; `v` must fit the width.
fn rc_set(block: &mut [u8], order: u32, i: usize, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = i * bits;
            let mask = ((1u16 << bits) - 1) as u8;
            if let Some(b) = block.get_mut(bit / 8) {
                let sh = bit % 8;
                *b = (*b & !(mask << sh)) | (((v as u8) & mask) << sh);
            }
        }
        3 => {
            if let Some(b) = block.get_mut(i) {
                *b = v as u8;
            }
        }
        4 => {
            if let Some(s) = block.get_mut(2 * i..2 * i + 2) {
                s.copy_from_slice(&(v as u16).to_be_bytes());
            }
        }
        5 => {
            if let Some(s) = block.get_mut(4 * i..4 * i + 4) {
                s.copy_from_slice(&(v as u32).to_be_bytes());
            }
        }
        _ => put64(block, 8 * i, v),
    }
}

/// Read `len` bytes at `off`, but never allocate for the part past the end of the file (which
/// reads as zeroes): returns the in-file prefix only.
async fn read_bounded(f: &dyn Protocol, file_len: u64, off: u64, len: u64) -> Result<Vec<u8>> {
    let n = len.min(file_len.saturating_sub(off));
    if n == 0 {
        return Ok(Vec::new());
    }
    f.read_vec(off, n as usize).await
}

/// Read a table of `n` big-endian u64 words at `off`; entries past the end of the file are 0.
async fn read_words(f: &dyn Protocol, file_len: u64, off: u64, n: u64) -> Result<Vec<u64>> {
    let raw = read_bounded(f, file_len, off, n.saturating_mul(8)).await?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| be64(c, 0))
        .collect::<Vec<u64>>())
}

/// Read and parse the header of the image on `f`; returns it with the file length.
async fn read_header(f: &dyn Protocol) -> Result<(Header, u64)> {
    let file_len = f.len().await?;
    let head = f
        .read_vec(0, file_len.min(1 << MAX_CLUSTER_BITS) as usize)
        .await?;
    let h = Header::parse(f.name(), &head, file_len)?;
    Ok((h, file_len))
}

/// Host byte range `(offset, length)` a compressed L2 entry occupies.
fn compressed_range(entry: u64, cluster_bits: u32) -> (u64, u64) {
    let cb = cluster_bits as u64;
    let shift = 62 - (cb - 8);
    let off = entry & ((1u64 << shift) - 1);
    let nsect = ((entry >> shift) & ((1u64 << (cb - 8)) - 1)) + 1;
    (off, nsect * 512 - (off & 511))
}

/// The on-disk refcount structure, for looking up refcounts as stored.
struct OnDisk {
    /// Raw refcount table entries.
    raw: Vec<u64>,
    /// Offset of each usable refcount block (0 = none, or unusable: reserved bits, unaligned,
    /// outside the file).
    blocks: Vec<u64>,
    order: u32,
    epb: u64,
    cs: u64,
    cache: HashMap<usize, Vec<u8>>,
}

impl OnDisk {
    async fn load(f: &dyn Protocol, h: &Header, file_len: u64) -> Result<OnDisk> {
        let cs = h.cluster_size();
        let n = h.refcount_table_clusters as u64 * cs / 8;
        let raw = read_words(f, file_len, h.refcount_table_offset, n).await?;
        let nb_file = file_len.div_ceil(cs);
        let blocks = raw
            .iter()
            .map(|&e| {
                let off = e & !REFT_RESERVED;
                if e & REFT_RESERVED != 0 || off % cs != 0 || off / cs >= nb_file {
                    0
                } else {
                    off
                }
            })
            .collect();
        Ok(OnDisk {
            raw,
            blocks,
            order: h.refcount_order,
            epb: (cs * 8) >> h.refcount_order,
            cs,
            cache: HashMap::new(),
        })
    }

    /// Offset of the usable refcount block for table index `ti` (None: not covered).
    fn block_offset(&self, ti: u64) -> Option<u64> {
        let off = *self.blocks.get(usize::try_from(ti).ok()?)?;
        (off != 0).then_some(off)
    }

    /// Refcount of host cluster `c` as stored on disk (0 when no usable block covers it).
    async fn get(&mut self, f: &dyn Protocol, c: u64) -> Result<u64> {
        let ti = c / self.epb;
        let Some(off) = self.block_offset(ti) else {
            return Ok(0);
        };
        let key = ti as usize;
        if !self.cache.contains_key(&key) {
            if self.cache.len() >= 64 {
                self.cache.clear();
            }
            let data = f.read_vec(off, self.cs as usize).await?;
            self.cache.insert(key, data);
        }
        Ok(self
            .cache
            .get(&key)
            .map(|b| rc_get(b, self.order, (c % self.epb) as usize))
            .unwrap_or(0))
    }
}

/// One pass over the image: the recomputed refcounts and everything found on the way.
struct Walk<'a> {
    f: &'a dyn Protocol,
    h: Header,
    cs: u64,
    file_len: u64,
    nb_file: u64,
    rc_max: u64,
    /// Recomputed refcount of every host cluster of the file (plus one for a partial tail).
    computed: Vec<u64>,
    /// One past the highest cluster counted.
    used_end: u64,
    ondisk: OnDisk,
    fix_entries: bool,
    fix_copied: bool,
    /// Regions the old refcount structure occupies (counted in `computed`).
    old_structure: Vec<(u64, u64)>,
    /// Byte ranges of metadata that a repair must never overwrite with an L2 table.
    protected: Vec<(u64, u64)>,
    /// References to each L2 table from L1 tables: [active, snapshots]. Each table is walked
    /// once with its multiplicity, so shared or repeated tables cost one walk.
    l2_refs: HashMap<u64, [u64; 2]>,
    /// L2 tables in the order first referenced.
    l2_order: Vec<u64>,
    // Findings.
    corruptions: u64,
    struct_corruptions: u64,
    check_errors: u64,
    rebuild: bool,
    entries_fixed: u64,
    copied_mismatch: u64,
    copied_fixed: u64,
    rc_leaks: u64,
    rc_low: u64,
    rc_zero: u64,
    image_end_offset: u64,
    allocated: u64,
    fragmented: u64,
    compressed: u64,
    walk_msgs: Msgs,
    rc_msgs: Msgs,
    copied_msgs: Msgs,
}

impl<'a> Walk<'a> {
    /// Walk the whole image and compare with the on-disk refcounts. `fix_entries` repairs
    /// self-contained L2 entry errors on the way, `fix_copied` the `COPIED` flags.
    async fn run(f: &'a dyn Protocol, fix_entries: bool, fix_copied: bool) -> Result<Walk<'a>> {
        let (h, file_len) = read_header(f).await?;
        let cs = h.cluster_size();
        let nb_file = file_len.div_ceil(cs);
        let entries = nb_file + 1;
        if entries > MAX_ARRAY_CLUSTERS {
            return Err(BlockError::unsupported(
                f.name(),
                format!("image file has too many clusters ({nb_file}) to be checked in memory"),
            ));
        }
        let mut computed = Vec::new();
        computed.try_reserve_exact(entries as usize).map_err(|_| {
            BlockError::NoSpace(format!(
                "{}: cannot allocate the refcount array for {nb_file} clusters",
                f.name()
            ))
        })?;
        computed.resize(entries as usize, 0);
        let ondisk = OnDisk::load(f, &h, file_len).await?;
        let mut protected = vec![
            (0, cs),
            (
                h.refcount_table_offset,
                h.refcount_table_clusters as u64 * cs,
            ),
            (h.l1_table_offset, h.l1_size as u64 * 8),
        ];
        for &b in &ondisk.raw {
            let off = b & !REFT_RESERVED;
            if off != 0 {
                protected.push((off & !(cs - 1), cs));
            }
        }
        let mut w = Walk {
            f,
            rc_max: rc_max(h.refcount_order),
            h,
            cs,
            file_len,
            nb_file,
            computed,
            used_end: 0,
            ondisk,
            fix_entries,
            fix_copied,
            old_structure: Vec::new(),
            protected,
            l2_refs: HashMap::new(),
            l2_order: Vec::new(),
            corruptions: 0,
            struct_corruptions: 0,
            check_errors: 0,
            rebuild: false,
            entries_fixed: 0,
            copied_mismatch: 0,
            copied_fixed: 0,
            rc_leaks: 0,
            rc_low: 0,
            rc_zero: 0,
            image_end_offset: 0,
            allocated: 0,
            fragmented: 0,
            compressed: 0,
            walk_msgs: Msgs::default(),
            rc_msgs: Msgs::default(),
            copied_msgs: Msgs::default(),
        };
        w.inc(0, cs);
        let (l1_off, l1_size) = (w.h.l1_table_offset, w.h.l1_size as u64);
        w.walk_l1(l1_off, l1_size, true, 1).await?;
        w.walk_snapshots().await?;
        w.walk_l2_tables().await?;
        let (rt_off, rt_len) = (
            w.h.refcount_table_offset,
            w.h.refcount_table_clusters as u64 * cs,
        );
        if w.inc(rt_off, rt_len) {
            w.old_structure.push((rt_off, rt_len));
        }
        w.walk_bitmaps().await?;
        w.check_refblocks();
        w.compare().await?;
        Ok(w)
    }

    fn total_corruptions(&self) -> u64 {
        self.corruptions
            + self.struct_corruptions
            + self.copied_mismatch
            + self.rc_low
            + self.rc_zero
    }

    /// Turn the findings into a result. `prefix` goes before this pass's own messages.
    fn into_result(
        self,
        corruptions_fixed: u64,
        leaks_fixed: u64,
        prefix: Vec<String>,
    ) -> CheckResult {
        let corruptions = self.total_corruptions();
        let mut messages = prefix;
        self.walk_msgs.append_to(&mut messages);
        self.rc_msgs.append_to(&mut messages);
        self.copied_msgs.append_to(&mut messages);
        CheckResult {
            corruptions,
            leaks: self.rc_leaks,
            check_errors: self.check_errors,
            corruptions_fixed,
            leaks_fixed,
            image_end_offset: self.image_end_offset,
            total_clusters: self.h.size.div_ceil(self.cs),
            allocated_clusters: self.allocated,
            fragmented_clusters: self.fragmented,
            compressed_clusters: self.compressed,
            messages,
        }
    }

    fn corrupt(&mut self, f: impl FnOnce() -> String) {
        self.corrupt_n(1, f);
    }

    /// A corruption met `n` times (once per reference to the structure holding it); the
    /// message is kept once.
    fn corrupt_n(&mut self, n: u64, f: impl FnOnce() -> String) {
        self.corruptions += n;
        self.walk_msgs.push(f);
    }

    fn inc(&mut self, off: u64, size: u64) -> bool {
        self.inc_n(off, size, 1)
    }

    /// Count `n` references to every cluster of host bytes `[off, off+size)`. Returns false
    /// (and reports a corruption) when the range reaches a cluster or more past the end of the
    /// file, in which case nothing is counted and the structure there must not be walked.
    fn inc_n(&mut self, off: u64, size: u64, n: u64) -> bool {
        if size == 0 || n == 0 {
            return true;
        }
        let end = off.saturating_add(size);
        if end.saturating_sub(self.file_len) >= self.cs {
            self.corrupt_n(n, || {
                format!(
                    "ERROR: counting reference for region exceeding the end of the file by one \
                     cluster or more: offset {off:#x} size {size:#x}"
                )
            });
            return false;
        }
        let first = off / self.cs;
        let last = (end - 1) / self.cs;
        for c in first..=last {
            let max = self.rc_max;
            let Some(v) = self.computed.get_mut(c as usize) else {
                continue;
            };
            let room = max - *v;
            if n > room {
                *v = max;
                let co = c * self.cs;
                self.corrupt_n(n - room, || {
                    format!(
                        "ERROR: overflow cluster offset={co:#x}; use a larger refcount width \
                         (amend) or convert to a new image"
                    )
                });
            } else {
                *v += n;
            }
            self.used_end = self.used_end.max(c + 1);
        }
        true
    }

    /// Whether an L2 table at `off` may be rewritten in place: it must not share a cluster
    /// with the header, the refcount structure or the active L1.
    fn writable(&self, off: u64) -> bool {
        let end = off.saturating_add(self.cs);
        !self
            .protected
            .iter()
            .any(|&(o, l)| l > 0 && off < o.saturating_add(l) && o < end)
    }

    /// Count an L1 table referenced `mult` times (`active`: the image's current one, whose
    /// `COPIED` flags are checked) and record the L2 tables it references.
    async fn walk_l1(&mut self, l1_off: u64, l1_size: u64, active: bool, mult: u64) -> Result<()> {
        if !self.inc_n(l1_off, l1_size * 8, mult) {
            return Ok(());
        }
        let l1 = read_words(self.f, self.file_len, l1_off, l1_size).await?;
        let mut l1_fixes: Vec<(usize, u64)> = Vec::new();
        for (i, &e) in l1.iter().enumerate() {
            if e & L1_RESERVED != 0 {
                self.corrupt_n(mult, || {
                    format!("ERROR found L1 entry with reserved bits set: {e:x}")
                });
            }
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            if active {
                let rc = self.ondisk.get(self.f, l2 / self.cs).await?;
                let has = e & OFLAG_COPIED != 0;
                if (rc == 1) != has {
                    if self.fix_copied {
                        let new = if rc == 1 {
                            e | OFLAG_COPIED
                        } else {
                            e & !OFLAG_COPIED
                        };
                        l1_fixes.push((i, new));
                        self.copied_fixed += 1;
                        self.copied_msgs.push(|| {
                            format!(
                                "Repairing OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} \
                                 refcount={rc}"
                            )
                        });
                    } else {
                        self.copied_mismatch += 1;
                        self.copied_msgs.push(|| {
                            format!(
                                "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} \
                                 refcount={rc}"
                            )
                        });
                    }
                }
            }
            let inside = self.inc_n(l2, self.cs, mult);
            if l2 % self.cs != 0 {
                self.corrupt_n(mult, || {
                    format!(
                        "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                    )
                });
                continue;
            }
            if inside {
                let order = &mut self.l2_order;
                let refs = self.l2_refs.entry(l2).or_insert_with(|| {
                    order.push(l2);
                    [0, 0]
                });
                refs[usize::from(!active)] += mult;
            }
        }
        for (i, v) in l1_fixes {
            self.f
                .write_vec(l1_off + i as u64 * 8, v.to_be_bytes().to_vec())
                .await?;
        }
        Ok(())
    }

    /// Walk every referenced L2 table once, with its reference counts.
    async fn walk_l2_tables(&mut self) -> Result<()> {
        let order = std::mem::take(&mut self.l2_order);
        for l2 in order {
            let [active, snap] = self.l2_refs.get(&l2).copied().unwrap_or([0, 0]);
            self.walk_l2(l2, active, snap).await?;
        }
        self.l2_refs.clear();
        Ok(())
    }

    /// Walk one L2 table at cluster-aligned `l2_off`, referenced `active` times from the active
    /// L1 (which count for the flags and statistics) and `snap` times from snapshots.
    async fn walk_l2(&mut self, l2_off: u64, active: u64, snap: u64) -> Result<()> {
        let cs = self.cs;
        let refs = active + snap;
        let mut raw = read_bounded(self.f, self.file_len, l2_off, cs).await?;
        raw.resize(cs as usize, 0);
        let ext = self.h.extended_l2();
        let step = if ext { 16 } else { 8 };
        let v3 = self.h.version >= 3;
        let may_write = self.writable(l2_off);
        let fix_entries = self.fix_entries && may_write;
        let fix_copied = self.fix_copied && may_write;
        let reserved = if ext {
            L2_STD_RESERVED | OFLAG_ZERO
        } else {
            L2_STD_RESERVED
        };
        let mut dirty = false;
        let mut next_contiguous = 0u64;
        let entries = cs / step;
        for idx in 0..entries {
            let pos = (idx * step) as usize;
            let e = be64(&raw, pos);
            let bitmap = if ext { be64(&raw, pos + 8) } else { 0 };
            if e & OFLAG_COMPRESSED != 0 {
                if ext && bitmap != 0 {
                    self.corrupt_n(refs, || {
                        format!(
                            "ERROR compressed cluster {idx} with non-zero subcluster allocation \
                             bitmap, entry={e:#x}"
                        )
                    });
                }
                let mut entry = e;
                if e & OFLAG_COPIED != 0 {
                    let (coff, _) = compressed_range(e, self.h.cluster_bits);
                    if fix_entries {
                        entry = e & !OFLAG_COPIED;
                        put64(&mut raw, pos, entry);
                        dirty = true;
                        self.entries_fixed += 1;
                        self.walk_msgs.push(|| {
                            format!(
                                "Repairing: coffset={coff:#x}: copied flag must never be set for \
                                 compressed clusters"
                            )
                        });
                    } else {
                        self.corrupt_n(refs, || {
                            format!(
                                "ERROR: coffset={coff:#x}: copied flag must never be set for \
                                 compressed clusters"
                            )
                        });
                    }
                }
                let (coff, csize) = compressed_range(entry, self.h.cluster_bits);
                self.inc_n(coff, csize, refs);
                self.allocated += active;
                self.compressed += active;
                self.fragmented += active;
                continue;
            }
            if e & reserved != 0 {
                self.corrupt_n(refs, || {
                    format!("ERROR found l2 entry with reserved bits set: {e:x}")
                });
            }
            let host = e & OFFSET_MASK;
            if host == 0 {
                if ext && bitmap & BITMAP_ALL_ALLOC != 0 {
                    self.corrupt_n(refs, || {
                        format!(
                            "ERROR: L2 offset={l2_off:x}, L2 index={idx}: Unallocated cluster \
                             has non-zero subcluster allocation bitmap"
                        )
                    });
                }
                continue;
            }
            if ext && (bitmap >> 32) & bitmap & BITMAP_ALL_ALLOC != 0 {
                self.corrupt_n(refs, || {
                    format!(
                        "ERROR offset={host:x}: Allocated cluster has corrupted subcluster \
                         allocation bitmap"
                    )
                });
            }
            if host % cs != 0 {
                let has_data = if ext {
                    bitmap & BITMAP_ALL_ALLOC != 0
                } else {
                    !(v3 && e & OFLAG_ZERO != 0)
                };
                if has_data {
                    self.corrupt_n(refs, || {
                        format!(
                            "ERROR offset={host:x}: Data cluster is not properly aligned; L2 \
                             offset={l2_off:x}, L2 index={idx}"
                        )
                    });
                } else if fix_entries {
                    // A preallocated zero cluster: make it a plain zero cluster.
                    put64(&mut raw, pos, if ext { 0 } else { OFLAG_ZERO });
                    dirty = true;
                    self.entries_fixed += 1;
                    self.walk_msgs.push(|| {
                        format!(
                            "Repairing offset={host:x}: Preallocated cluster is not properly \
                             aligned; L2 offset={l2_off:x}, L2 index={idx}"
                        )
                    });
                    continue;
                } else {
                    self.corrupt_n(refs, || {
                        format!(
                            "ERROR offset={host:x}: Preallocated cluster is not properly aligned; \
                             L2 offset={l2_off:x}, L2 index={idx}"
                        )
                    });
                }
            }
            if active > 0 {
                self.allocated += active;
                if next_contiguous != 0 && host != next_contiguous {
                    self.fragmented += active;
                }
                next_contiguous = host.saturating_add(cs);
            }
            self.inc_n(host, cs, refs);
            if active > 0 {
                let rc = self.ondisk.get(self.f, host / cs).await?;
                let has = e & OFLAG_COPIED != 0;
                if (rc == 1) != has {
                    if fix_copied {
                        let new = if rc == 1 {
                            e | OFLAG_COPIED
                        } else {
                            e & !OFLAG_COPIED
                        };
                        put64(&mut raw, pos, new);
                        dirty = true;
                        self.copied_fixed += 1;
                        self.copied_msgs.push(|| {
                            format!(
                                "Repairing OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}"
                            )
                        });
                    } else {
                        self.copied_mismatch += active;
                        self.copied_msgs.push(|| {
                            format!("ERROR OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}")
                        });
                    }
                }
            }
        }
        if dirty {
            self.f.write_vec(l2_off, raw).await?;
        }
        Ok(())
    }

    /// Walk the internal snapshot table and count each snapshot's L1 table.
    ///
    /// Snapshots sharing one L1 table are counted together. In a sound image every snapshot
    /// has its own L1 clusters, so the distinct tables fit in the file; once they add up to
    /// more, the rest are reported instead of read (a hostile table could otherwise make us
    /// read the same 32 MiB table 65536 times).
    async fn walk_snapshots(&mut self) -> Result<()> {
        let n = self.h.nb_snapshots;
        if n == 0 {
            return Ok(());
        }
        let start = self.h.snapshots_offset;
        let mut pos = start;
        let mut l1s: HashMap<(u64, u64), u64> = HashMap::new();
        let mut order: Vec<(u64, u64, String)> = Vec::new();
        for k in 0..n {
            if pos.saturating_add(40) > self.file_len {
                self.corrupt(|| {
                    format!("ERROR snapshot table entry {k} lies past the end of the file")
                });
                break;
            }
            let hd = self.f.read_vec(pos, 40).await?;
            let l1_off = be64(&hd, 0);
            let l1_size = be32(&hd, 8);
            let id_len = be16(&hd, 12);
            let name_len = be16(&hd, 14);
            let extra = be32(&hd, 36);
            let var = extra + id_len + name_len;
            let total = (40 + var).div_ceil(8) * 8;
            if pos.saturating_add(40 + var) > self.file_len {
                self.corrupt(|| {
                    format!("ERROR snapshot table entry {k} lies past the end of the file")
                });
                break;
            }
            if extra > MAX_SNAPSHOT_EXTRA as u64 {
                self.corrupt(|| {
                    format!(
                        "ERROR snapshot table entry {k} has too much extra data ({extra} bytes)"
                    )
                });
            }
            let ids = self
                .f
                .read_vec(pos + 40 + extra, (id_len + name_len) as usize)
                .await?;
            let (id, name) = ids.split_at((id_len as usize).min(ids.len()));
            let label = format!(
                "{} ({})",
                String::from_utf8_lossy(id),
                String::from_utf8_lossy(name)
            );
            pos += total;
            if l1_off % self.cs != 0 {
                self.corrupt(|| {
                    format!(
                        "ERROR snapshot {label} l1_offset={l1_off:#x}: L1 table is not cluster \
                         aligned; snapshot table entry corrupted"
                    )
                });
                continue;
            }
            if l1_size * 8 > MAX_L1_BYTES {
                self.corrupt(|| {
                    format!(
                        "ERROR snapshot {label} l1_size={l1_size:#x}: L1 table is too large; \
                         snapshot table entry corrupted"
                    )
                });
                continue;
            }
            let count = l1s.entry((l1_off, l1_size)).or_insert(0);
            if *count == 0 {
                order.push((l1_off, l1_size, label));
            }
            *count += 1;
        }
        let mut budget = self.file_len;
        for (l1_off, l1_size, label) in order {
            let mult = l1s.get(&(l1_off, l1_size)).copied().unwrap_or(1);
            if l1_size * 8 > budget {
                self.corrupt_n(mult, || {
                    format!(
                        "ERROR snapshot {label} l1_offset={l1_off:#x}: snapshot L1 tables overlap \
                         (together larger than the file); not walked"
                    )
                });
                self.inc_n(l1_off, l1_size * 8, mult);
                continue;
            }
            budget -= l1_size * 8;
            self.walk_l1(l1_off, l1_size, false, mult).await?;
        }
        self.inc(start, pos - start);
        Ok(())
    }

    /// Count the persistent-bitmap directory, bitmap tables and bitmap data clusters (only
    /// when the extension is marked consistent; otherwise QEMU ignores the bitmaps and their
    /// clusters are leaks).
    async fn walk_bitmaps(&mut self) -> Result<()> {
        if self.h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            return Ok(());
        }
        let Some(ext) = self
            .h
            .extensions
            .iter()
            .find(|(t, _)| *t == EXT_BITMAPS)
            .map(|(_, d)| d.clone())
        else {
            return Ok(());
        };
        if ext.len() < 24 {
            self.corrupt(|| "ERROR bitmaps extension is too short".to_string());
            return Ok(());
        }
        let nb = be32(&ext, 0);
        let dir_size = be64(&ext, 8);
        let dir_off = be64(&ext, 16);
        if nb == 0 {
            return Ok(());
        }
        if nb > MAX_BITMAPS {
            self.corrupt(|| format!("ERROR too many bitmaps ({nb})"));
            return Ok(());
        }
        if dir_size > MAX_BITMAP_DIRECTORY {
            self.corrupt(|| format!("ERROR bitmap directory is too large ({dir_size} bytes)"));
            return Ok(());
        }
        if dir_off % self.cs != 0 {
            self.corrupt(|| {
                format!("ERROR bitmap directory offset {dir_off:#x} is not cluster aligned")
            });
            return Ok(());
        }
        if !self.inc(dir_off, dir_size) {
            return Ok(());
        }
        let dir = read_bounded(self.f, self.file_len, dir_off, dir_size).await?;
        let mut pos = 0usize;
        // Sound bitmap tables do not overlap, so together they fit in the file.
        let mut budget = self.file_len;
        for k in 0..nb {
            if pos + 24 > dir.len() {
                self.corrupt(|| format!("ERROR bitmap directory entry {k} is truncated"));
                break;
            }
            let t_off = be64(&dir, pos);
            let t_size = be32(&dir, pos + 8);
            let name_size = be16(&dir, pos + 18);
            let extra = be32(&dir, pos + 20);
            pos += ((24 + name_size + extra).div_ceil(8) * 8) as usize;
            if t_off % self.cs != 0 {
                self.corrupt(|| {
                    format!("ERROR bitmap {k}: table offset {t_off:#x} is not cluster aligned")
                });
                continue;
            }
            if !self.inc(t_off, t_size * 8) {
                continue;
            }
            if t_size * 8 > budget {
                self.corrupt(|| format!("ERROR bitmap {k}: bitmap tables overlap; not walked"));
                continue;
            }
            budget -= t_size * 8;
            let table = read_words(self.f, self.file_len, t_off, t_size).await?;
            for e in table {
                let off = e & OFFSET_MASK;
                if e & BME_RESERVED != 0
                    || (off != 0 && e & BME_ALL_ONES != 0)
                    || off % self.cs != 0
                {
                    self.corrupt(|| format!("ERROR bitmap {k}: invalid bitmap table entry {e:#x}"));
                    continue;
                }
                if off != 0 {
                    self.inc(off, self.cs);
                }
            }
        }
        Ok(())
    }

    /// A problem with the refcount structure itself: only a rebuild can fix it.
    fn bad_refblock(&mut self, m: String) {
        self.struct_corruptions += 1;
        self.rebuild = true;
        self.walk_msgs.push(|| m);
    }

    /// Validate and count the refcount blocks; any problem asks for a rebuild.
    fn check_refblocks(&mut self) {
        let raw = std::mem::take(&mut self.ondisk.raw);
        for (i, &e) in raw.iter().enumerate() {
            let off = e & !REFT_RESERVED;
            if e & REFT_RESERVED != 0 {
                self.bad_refblock(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                continue;
            }
            if off == 0 {
                continue;
            }
            if off % self.cs != 0 {
                self.bad_refblock(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry \
                         corrupted"
                ));
                continue;
            }
            if off / self.cs >= self.nb_file {
                self.bad_refblock(format!("ERROR refcount block {i} is outside image"));
                continue;
            }
            if self.inc(off, self.cs) {
                self.old_structure.push((off, self.cs));
            }
            let rc = self
                .computed
                .get((off / self.cs) as usize)
                .copied()
                .unwrap_or(0);
            if rc != 1 {
                self.bad_refblock(format!("ERROR refcount block {i} refcount={rc}"));
            }
        }
        self.ondisk.raw = raw;
    }

    /// Compare the recomputed refcounts with the on-disk ones.
    async fn compare(&mut self) -> Result<()> {
        let epb = self.ondisk.epb;
        let len = self.nb_file.max(self.used_end);
        let mut highest = 0u64;
        let mut ti = 0u64;
        while ti * epb < len {
            let block = match self.ondisk.block_offset(ti) {
                Some(off) => Some(self.f.read_vec(off, self.cs as usize).await?),
                None => None,
            };
            let end = ((ti + 1) * epb).min(len);
            for c in ti * epb..end {
                let d = block
                    .as_ref()
                    .map(|b| rc_get(b, self.ondisk.order, (c - ti * epb) as usize))
                    .unwrap_or(0);
                let r = self.computed.get(c as usize).copied().unwrap_or(0);
                if d > 0 || r > 0 {
                    highest = c;
                }
                if d == r {
                    continue;
                }
                if d > r {
                    self.rc_leaks += 1;
                    self.rc_msgs
                        .push(|| format!("Leaked cluster {c} refcount={d} reference={r}"));
                } else {
                    if d == 0 {
                        self.rc_zero += 1;
                        self.rebuild = true;
                    } else {
                        self.rc_low += 1;
                    }
                    self.rc_msgs
                        .push(|| format!("ERROR cluster {c} refcount={d} reference={r}"));
                }
            }
            ti += 1;
        }
        self.image_end_offset = (highest + 1) * self.cs;
        Ok(())
    }
}

/// Correct refcounts in their existing blocks: leaks always, too-low (non-zero) counts with
/// `errors`. Returns (leaks fixed, corruptions fixed).
async fn fix_refcounts_in_place(
    f: &dyn Protocol,
    w: &Walk<'_>,
    errors: bool,
    msgs: &mut Vec<String>,
) -> Result<(u64, u64)> {
    fix_refcounts(f, w, errors, true, msgs).await
}

/// [`fix_refcounts_in_place`], discarding the clusters it frees only if `discard`.
async fn fix_refcounts(
    f: &dyn Protocol,
    w: &Walk<'_>,
    errors: bool,
    discard: bool,
    msgs: &mut Vec<String>,
) -> Result<(u64, u64)> {
    let epb = w.ondisk.epb;
    let order = w.ondisk.order;
    let len = w.nb_file.max(w.used_end);
    let mut out = Msgs::default();
    let (mut leaks, mut corr) = (0, 0);
    // Clusters a repair leaves unused are discarded, as QEMU does (QCOW2_DISCARD_ALWAYS).
    let mut freed = Vec::new();
    let mut ti = 0u64;
    while ti * epb < len {
        if let Some(off) = w.ondisk.block_offset(ti) {
            let mut data = f.read_vec(off, w.cs as usize).await?;
            let mut changed = false;
            let end = ((ti + 1) * epb).min(len);
            for c in ti * epb..end {
                let i = (c - ti * epb) as usize;
                let d = rc_get(&data, order, i);
                let r = w.computed.get(c as usize).copied().unwrap_or(0);
                let fix = if d > r {
                    leaks += 1;
                    true
                } else if d < r && d > 0 && errors {
                    corr += 1;
                    true
                } else {
                    false
                };
                if fix {
                    rc_set(&mut data, order, i, r);
                    changed = true;
                    if r == 0 {
                        freed.push(c);
                    }
                    out.push(|| format!("Repairing cluster {c} refcount={d} reference={r}"));
                }
            }
            if changed {
                f.write_vec(off, data).await?;
            }
        }
        ti += 1;
    }
    f.flush().await?;
    for c in freed.into_iter().filter(|_| discard) {
        f.discard(c * w.cs, w.cs).await?;
    }
    out.append_to(msgs);
    Ok((leaks, corr))
}

/// QEMU's `alloc_clusters_imrt`: the first run of `count` clusters with no references at or
/// after `*first_free` (which moves to the first free cluster seen), growing the array at the
/// end if needed; the run gets refcount 1. Returns its first cluster.
fn alloc_imrt(computed: &mut Vec<u64>, count: u64, first_free: &mut u64) -> Result<u64> {
    let mut cluster = *first_free;
    let mut first_gap = true;
    let mut contiguous = 0;
    while cluster < computed.len() as u64 && contiguous < count {
        if computed[cluster as usize] == 0 {
            contiguous += 1;
            if first_gap {
                *first_free = cluster;
                first_gap = false;
            }
        } else {
            contiguous = 0;
        }
        cluster += 1;
    }
    if contiguous < count {
        let len = (cluster + count - contiguous) as usize;
        if len > MAX_ARRAY_CLUSTERS as usize {
            return Err(BlockError::NoSpace(
                "rebuilt refcount structure does not fit in memory".to_string(),
            ));
        }
        computed.resize(len.max(computed.len()), 0);
    }
    let start = cluster - contiguous;
    for c in start..start + count {
        computed[c as usize] = 1;
    }
    Ok(start)
}

/// QEMU's `rebuild_refcounts_write_refblocks`: give every refcount block that covers a used
/// cluster in `[first, end)` a home (allocated like QEMU, inside the image where possible) and
/// write it as the slice of the recomputed counts. Returns whether the table had to grow.
async fn write_refblocks(
    f: &dyn Protocol,
    w: &mut Walk<'_>,
    first: u64,
    end: u64,
    table: &mut Vec<u64>,
) -> Result<bool> {
    let cs = w.cs;
    let order = w.h.refcount_order;
    let epb = (cs * 8) >> order;
    let mut first_free = 0;
    let mut grown = false;
    let mut end = end;
    let mut cluster = first;
    while cluster < end {
        if w.computed.get(cluster as usize).copied().unwrap_or(0) == 0 {
            cluster += 1;
            continue;
        }
        let index = cluster / epb;
        let block_start = index * epb;
        let off = match table.get(index as usize) {
            Some(&off) if off != 0 => off,
            _ => {
                first_free = first_free.max(block_start);
                let c = alloc_imrt(&mut w.computed, 1, &mut first_free)?;
                if c >= end {
                    end = c + 1;
                }
                if table.len() as u64 <= index {
                    let entries = ((index + 1) * 8).div_ceil(cs) * cs / 8;
                    table.resize(entries as usize, 0);
                    grown = true;
                }
                table[index as usize] = c * cs;
                c * cs
            }
        };
        let mut block = vec![0u8; cs as usize];
        for c in block_start..block_start + epb {
            let v = w.computed.get(c as usize).copied().unwrap_or(0);
            if v != 0 {
                rc_set(
                    &mut block,
                    order,
                    (c - block_start) as usize,
                    v.min(w.rc_max),
                );
            }
        }
        f.write_vec(off, block).await?;
        cluster = block_start + epb;
    }
    Ok(grown)
}

/// Change the refcount width of a consistent image to `1 << order` bits (`amend
/// refcount_bits`): the references are counted by a full walk, a new refcount structure of the
/// new width is built from them exactly as a `check -r all` rebuild lays it out (written and
/// synced before the header switches to it), and the old structure, leaked by the switch, is
/// freed. Refused before anything is written when the image has inconsistencies or a cluster
/// has more references than the new width can count.
pub async fn change_refcount_order(file: Arc<dyn Protocol>, order: u32) -> Result<()> {
    let f: &dyn Protocol = file.as_ref();
    let mut w = Walk::run(f, false, false).await?;
    if w.total_corruptions() > 0 || w.check_errors > 0 || w.rebuild || w.rc_leaks > 0 {
        return Err(BlockError::InvalidArgument(
            "the image's refcounts are inconsistent; repair it with check -r all first".to_string(),
        ));
    }
    let new_max = rc_max(order);
    if let Some((c, v)) = w.computed.iter().enumerate().find(|&(_, &v)| v > new_max) {
        return Err(BlockError::InvalidArgument(format!(
            "Cannot decrease refcount entry width to {} bits: Cluster at offset {:#x} has a \
             refcount of {v}",
            1u64 << order,
            c as u64 * w.cs
        )));
    }
    w.h.refcount_order = order;
    w.rc_max = new_max;
    rebuild_refcounts(f, &mut w).await?;
    // The old structure is freed without a discard, as QEMU frees it (its bytes stay).
    let fresh = Walk::run(f, false, false).await?;
    if fresh.rc_leaks > 0 {
        let mut msgs = Vec::new();
        fix_refcounts(f, &fresh, false, false, &mut msgs).await?;
    }
    f.flush().await
}

/// Replace the refcount structure with a new one built from the recomputed counts, exactly as
/// QEMU's `rebuild_refcount_structure` lays it out: the refcount blocks and then the table go
/// to the first clusters nothing references (holes inside the image first), everything is
/// written and synced, and only then does the header point at the new table. The old table and
/// blocks were counted as used, so they are leaked now; the caller repairs those leaks.
async fn rebuild_refcounts(f: &dyn Protocol, w: &mut Walk<'_>) -> Result<()> {
    let cs = w.cs;
    w.old_structure.clear();
    let mut table = Vec::new();
    let len = w.computed.len() as u64;
    write_refblocks(f, w, 0, len, &mut table).await?;
    let (table_off, table_clusters) = loop {
        let clusters = (table.len() as u64 * 8).div_ceil(cs);
        if clusters * cs > MAX_REFTABLE_BYTES {
            return Err(BlockError::NoSpace(format!(
                "{}: rebuilt refcount table would exceed its maximum size",
                f.name()
            )));
        }
        let mut first_free = 0;
        let start = alloc_imrt(&mut w.computed, clusters, &mut first_free)?;
        if !write_refblocks(f, w, start, start + clusters, &mut table).await? {
            break (start * cs, clusters);
        }
    };
    let mut raw = vec![0u8; (table_clusters * cs) as usize];
    for (i, &off) in table.iter().enumerate() {
        put64(&mut raw, i * 8, off);
    }
    f.write_vec(table_off, raw).await?;
    f.flush().await?;
    let mut h = w.h.clone();
    h.refcount_table_offset = table_off;
    h.refcount_table_clusters = table_clusters as u32;
    f.write_vec(0, h.serialize()?).await?;
    f.flush().await?;
    w.h = h;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::file::FileProtocol;
    use crate::protocol::mem::MemProtocol;
    use rand::{Rng, SeedableRng};
    use serde_json::Value;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output};

    fn run(cmd: &str, args: &[&str]) -> Output {
        Command::new(cmd)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
    }

    fn describe(cmd: &str, args: &[&str], out: &Output) -> String {
        format!(
            "{cmd} {}\nstatus: {:?}\nstdout:\n{}\nstderr:\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn run_ok(cmd: &str, args: &[&str]) {
        let out = run(cmd, args);
        assert!(out.status.success(), "{}", describe(cmd, args, &out));
    }

    fn s(p: &Path) -> &str {
        p.to_str().expect("utf-8 path")
    }

    fn create(dir: &Path, name: &str, opts: &str, size: &str) -> PathBuf {
        let p = dir.join(name);
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([s(&p), size]);
        run_ok("qemu-img", &args);
        p
    }

    fn qemu_io(p: &Path, cmds: &[&str]) {
        let mut args = vec!["-f", "qcow2", "-d", "unmap"];
        for c in cmds {
            args.extend(["-c", c]);
        }
        args.push(s(p));
        run_ok("qemu-io", &args);
    }

    /// `qemu-img check --output=json [-r mode]`: (exit code, JSON, full description).
    fn qemu_check(p: &Path, repair: Option<&str>) -> (i32, Value, String) {
        let mut args = vec!["check", "--output=json"];
        if let Some(r) = repair {
            args.extend(["-r", r]);
        }
        args.push(s(p));
        let out = run("qemu-img", &args);
        let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (
            out.status.code().unwrap_or(-1),
            v,
            describe("qemu-img", &args, &out),
        )
    }

    fn field(v: &Value, k: &str) -> u64 {
        v[k].as_u64().unwrap_or(0)
    }

    fn open(p: &Path, ro: bool) -> Arc<dyn Protocol> {
        Arc::new(FileProtocol::open(p, ro).expect("open image"))
    }

    async fn ours(p: &Path, mode: RepairMode) -> CheckResult {
        check(open(p, mode == RepairMode::None), mode)
            .await
            .unwrap_or_else(|e| panic!("check of {} failed: {e}", p.display()))
    }

    /// Our result must agree with qemu-img's JSON on every count.
    fn assert_same(r: &CheckResult, v: &Value, what: &str) {
        let pairs = [
            ("corruptions", r.corruptions),
            ("leaks", r.leaks),
            ("check-errors", r.check_errors),
            ("image-end-offset", r.image_end_offset),
            ("total-clusters", r.total_clusters),
            ("allocated-clusters", r.allocated_clusters),
            ("fragmented-clusters", r.fragmented_clusters),
            ("compressed-clusters", r.compressed_clusters),
            ("corruptions-fixed", r.corruptions_fixed),
            ("leaks-fixed", r.leaks_fixed),
        ];
        for (k, ours) in pairs {
            assert_eq!(
                ours,
                field(v, k),
                "{what}: {k} differs\nours: {r:#?}\nqemu: {v:#}"
            );
        }
    }

    /// Check with both tools; both must find the image clean and agree on every count.
    async fn assert_clean_like_qemu(p: &Path, what: &str) {
        let (code, v, desc) = qemu_check(p, None);
        assert_eq!(code, 0, "{what}: qemu-img finds problems:\n{desc}");
        let r = ours(p, RepairMode::None).await;
        assert_eq!(r.exit_code(), 0, "{what}: {r:#?}");
        assert!(r.messages.is_empty(), "{what}: {:?}", r.messages);
        assert_same(&r, &v, what);
    }

    fn header_of(d: &[u8]) -> Header {
        Header::parse("t", &d[..d.len().min(1 << 21)], d.len() as u64).expect("header")
    }

    /// Byte offset of the refcount block covering host cluster `c`, and the index within it.
    fn refblock_of(d: &[u8], c: u64) -> (usize, usize, Header) {
        let h = header_of(d);
        let epb = (h.cluster_size() * 8) >> h.refcount_order;
        let rt = h.refcount_table_offset as usize;
        let blk = be64(d, rt + 8 * (c / epb) as usize) & !REFT_RESERVED;
        assert_ne!(blk, 0, "no refcount block covers cluster {c}");
        (blk as usize, (c % epb) as usize, h)
    }

    fn get_refcount(p: &Path, c: u64) -> u64 {
        let d = std::fs::read(p).expect("read");
        let (blk, i, h) = refblock_of(&d, c);
        rc_get(
            &d[blk..blk + h.cluster_size() as usize],
            h.refcount_order,
            i,
        )
    }

    fn set_refcount(p: &Path, c: u64, v: u64) {
        let mut d = std::fs::read(p).expect("read");
        let (blk, i, h) = refblock_of(&d, c);
        rc_set(
            &mut d[blk..blk + h.cluster_size() as usize],
            h.refcount_order,
            i,
            v,
        );
        std::fs::write(p, d).expect("write");
    }

    /// (L1 entry offset, L2 entry offset) in the file for guest byte `g` of the active table.
    fn entry_pos(d: &[u8], g: u64) -> (usize, usize) {
        let h = header_of(d);
        let gc = g / h.cluster_size();
        let l1i = gc / h.l2_entries();
        let l2i = gc % h.l2_entries();
        let l1pos = h.l1_table_offset as usize + 8 * l1i as usize;
        let l2 = be64(d, l1pos) & OFFSET_MASK;
        (l1pos, (l2 + l2i * h.l2_entry_size()) as usize)
    }

    /// Host cluster index holding guest byte `g` (active table, uncompressed).
    fn host_cluster(p: &Path, g: u64) -> u64 {
        let d = std::fs::read(p).expect("read");
        let (_, pos) = entry_pos(&d, g);
        (be64(&d, pos) & OFFSET_MASK) / header_of(&d).cluster_size()
    }

    fn copy(a: &Path, b: &Path) {
        std::fs::copy(a, b).expect("copy");
    }

    fn incompat(p: &Path) -> u64 {
        let d = std::fs::read(p).expect("read");
        be64(&d, 72)
    }

    #[test]
    fn exit_codes() {
        let mut r = CheckResult::default();
        assert_eq!(r.exit_code(), 0);
        r.leaks = 2;
        assert_eq!(r.exit_code(), 3);
        r.corruptions = 1;
        assert_eq!(r.exit_code(), 2);
        r.check_errors = 1;
        assert_eq!(r.exit_code(), 1);
    }

    #[test]
    fn refcount_entries_round_trip() {
        for order in 0..=6u32 {
            let mut b = vec![0u8; 512];
            let n = (512 * 8) >> order;
            let max = rc_max(order);
            for i in 0..n {
                rc_set(&mut b, order, i, (i as u64 * 7 + 1) & max);
            }
            for i in 0..n {
                assert_eq!(
                    rc_get(&b, order, i),
                    (i as u64 * 7 + 1) & max,
                    "order {order}"
                );
            }
            // Out-of-range indexes neither panic nor write.
            rc_set(&mut b, order, n + 5, 1);
            assert_eq!(rc_get(&b, order, n + 5), 0);
        }
        // Sub-byte widths are LSB-first.
        let mut b = vec![0u8; 1];
        rc_set(&mut b, 1, 0, 1);
        rc_set(&mut b, 1, 3, 2);
        assert_eq!(b[0], 0b1000_0001);
    }

    /// Images written by QEMU in many layouts: we find them clean, with qemu-img's statistics.
    #[tokio::test]
    async fn qemu_written_images_are_clean() {
        let dir = tempfile::tempdir().expect("tmp");
        let cases = [
            "cluster_size=512",
            "cluster_size=4096,refcount_bits=1",
            "cluster_size=65536,refcount_bits=2",
            "refcount_bits=4",
            "refcount_bits=8",
            "cluster_size=16384,refcount_bits=32",
            "refcount_bits=64",
            "cluster_size=2M",
            "compat=0.10",
            "compat=0.10,cluster_size=4096",
            "extended_l2=on",
            "extended_l2=on,cluster_size=16384",
            "extended_l2=on,cluster_size=2M,refcount_bits=8",
            "lazy_refcounts=on",
        ];
        for (n, opts) in cases.iter().enumerate() {
            let p = create(dir.path(), &format!("c{n}.qcow2"), opts, "64M");
            assert_clean_like_qemu(&p, &format!("{opts} empty")).await;
            qemu_io(
                &p,
                &[
                    "write -P 1 0 1M",
                    "write -P 2 3M 10k",
                    "write -z 8M 1M",
                    "write -P 3 20M 64k",
                    "write -P 4 40M 3M",
                    "discard 40M 1M",
                    "write -P 5 100k 5k",
                ],
            );
            assert_clean_like_qemu(&p, opts).await;
        }
    }

    /// Compressed clusters (deflate and zstd), partly overwritten afterwards.
    #[tokio::test]
    async fn compressed_images_are_clean() {
        let dir = tempfile::tempdir().expect("tmp");
        let src = create(dir.path(), "src.qcow2", "", "16M");
        qemu_io(
            &src,
            &[
                "write -P 1 0 1M",
                "write -P 0 2M 1M",
                "write -P 7 3M 64k",
                "write -P 9 5M 300k",
            ],
        );
        for (n, opts) in [
            "cluster_size=65536",
            "cluster_size=4096",
            "cluster_size=512",
            "cluster_size=2M",
            "compression_type=zstd",
            "extended_l2=on",
            "compat=0.10",
        ]
        .iter()
        .enumerate()
        {
            let p = dir.path().join(format!("z{n}.qcow2"));
            run_ok(
                "qemu-img",
                &["convert", "-c", "-O", "qcow2", "-o", opts, s(&src), s(&p)],
            );
            assert_clean_like_qemu(&p, &format!("compressed {opts}")).await;
            let r = ours(&p, RepairMode::None).await;
            assert!(r.compressed_clusters > 0, "{opts}: {r:#?}");
            qemu_io(&p, &["write -P 8 100k 100k", "write -z 3M 64k"]);
            assert_clean_like_qemu(&p, &format!("compressed then written {opts}")).await;
        }
    }

    /// Internal snapshots: shared L2 tables and data clusters, snapshot table, deletion.
    #[tokio::test]
    async fn snapshots_are_clean() {
        let dir = tempfile::tempdir().expect("tmp");
        for (n, opts) in [
            "",
            "compat=0.10",
            "cluster_size=4096,refcount_bits=8",
            "extended_l2=on",
        ]
        .iter()
        .enumerate()
        {
            let p = create(dir.path(), &format!("s{n}.qcow2"), opts, "64M");
            qemu_io(&p, &["write -P 1 0 1M", "write -P 2 10M 128k"]);
            run_ok("qemu-img", &["snapshot", "-c", "s1", s(&p)]);
            assert_clean_like_qemu(&p, &format!("{opts} one snapshot")).await;
            qemu_io(&p, &["write -P 3 512k 1M", "write -P 4 30M 64k"]);
            run_ok("qemu-img", &["snapshot", "-c", "s2", s(&p)]);
            qemu_io(&p, &["write -P 5 0 100k", "write -z 10M 64k"]);
            assert_clean_like_qemu(&p, &format!("{opts} two snapshots, overwritten")).await;
            run_ok("qemu-img", &["snapshot", "-d", "s1", s(&p)]);
            assert_clean_like_qemu(&p, &format!("{opts} snapshot deleted")).await;
        }
    }

    /// Persistent dirty bitmaps own clusters too (directory, tables, data).
    #[tokio::test]
    async fn bitmaps_are_counted() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = create(dir.path(), "bm.qcow2", "cluster_size=4096", "64M");
        run_ok("qemu-img", &["bitmap", "--add", s(&p), "b0"]);
        run_ok("qemu-img", &["bitmap", "--add", "-g", "512", s(&p), "b1"]);
        qemu_io(&p, &["write -P 1 0 1M", "write -P 2 50M 64k"]);
        assert_clean_like_qemu(&p, "bitmaps").await;
    }

    /// A leaked cluster made by bumping the refcount of a free cluster; `-r leaks` fixes it the
    /// same way qemu-img does.
    #[tokio::test]
    async fn leak_is_found_and_repaired() {
        let dir = tempfile::tempdir().expect("tmp");
        for (n, opts) in [
            "",
            "refcount_bits=1",
            "refcount_bits=64",
            "cluster_size=512",
        ]
        .iter()
        .enumerate()
        {
            let p = create(dir.path(), &format!("l{n}.qcow2"), opts, "64M");
            qemu_io(&p, &["write -P 1 0 1M", "discard 0 64k"]);
            // The discarded data cluster sits inside the file with refcount 0.
            let d = std::fs::read(&p).expect("read");
            let h = header_of(&d);
            let free = (h.cluster_size()..(d.len() as u64))
                .step_by(h.cluster_size() as usize)
                .map(|o| o / h.cluster_size())
                .find(|&c| get_refcount(&p, c) == 0)
                .expect("a free cluster inside the file");
            set_refcount(&p, free, 1);
            let (code, v, desc) = qemu_check(&p, None);
            assert_eq!(code, 3, "{desc}");
            let r = ours(&p, RepairMode::None).await;
            assert_eq!(r.exit_code(), 3, "{opts}: {r:#?}");
            assert_eq!(r.leaks, 1);
            assert!(r
                .messages
                .contains(&format!("Leaked cluster {free} refcount=1 reference=0")));
            assert_same(&r, &v, &format!("{opts} leak"));

            let q = dir.path().join(format!("l{n}-qemu.qcow2"));
            copy(&p, &q);
            let (_, qv, qdesc) = qemu_check(&q, Some("leaks"));
            let r = ours(&p, RepairMode::Leaks).await;
            assert_eq!(r.exit_code(), 0, "{r:#?}");
            assert_eq!(r.leaks_fixed, 1);
            assert_same(&r, &qv, &format!("{opts} leak repaired\n{qdesc}"));
            assert!(r.messages.iter().any(|m| m.contains("Repairing cluster")));
            assert_eq!(get_refcount(&p, free), 0);
            assert_clean_like_qemu(&p, &format!("{opts} after -r leaks")).await;
        }
    }

    /// `-r leaks` must not touch corruptions, and must refuse when only a rebuild can help.
    #[tokio::test]
    async fn leaks_mode_leaves_corruptions() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = create(dir.path(), "lc.qcow2", "", "64M");
        qemu_io(&p, &["write -P 1 0 1M"]);
        let c = host_cluster(&p, 5 << 16);
        set_refcount(&p, c, 0);
        let before = std::fs::read(&p).expect("read");
        let r = ours(&p, RepairMode::Leaks).await;
        assert_eq!(r.exit_code(), 1, "{r:#?}");
        assert!(r
            .messages
            .iter()
            .any(|m| m == "ERROR need to rebuild refcount structures"));
        assert_eq!(std::fs::read(&p).expect("read"), before, "file changed");
        let (code, _, desc) = qemu_check(&p, Some("leaks"));
        assert_eq!(code, 1, "{desc}");
    }

    /// A used data cluster whose refcount was zeroed: both tools report 2 corruptions (the
    /// refcount and the COPIED flag); `-r all` rebuilds the refcounts, the data is intact and
    /// the repair is reported exactly as qemu-img reports its own.
    #[tokio::test]
    async fn zeroed_refcount_is_rebuilt() {
        let dir = tempfile::tempdir().expect("tmp");
        for (n, opts) in ["", "refcount_bits=2,cluster_size=4096", "extended_l2=on"]
            .iter()
            .enumerate()
        {
            let p = create(dir.path(), &format!("z{n}.qcow2"), opts, "64M");
            qemu_io(&p, &["write -P 1 0 1M", "write -P 2 5M 100k"]);
            let orig = dir.path().join(format!("z{n}-orig.qcow2"));
            copy(&p, &orig);
            let c = host_cluster(&p, 300 << 10);
            set_refcount(&p, c, 0);
            let (code, v, desc) = qemu_check(&p, None);
            assert_eq!(code, 2, "{desc}");
            let r = ours(&p, RepairMode::None).await;
            assert_eq!(r.exit_code(), 2);
            assert_eq!(r.corruptions, 2, "{r:#?}");
            assert_same(&r, &v, &format!("{opts} zeroed refcount"));

            let q = dir.path().join(format!("z{n}-qemu.qcow2"));
            copy(&p, &q);
            let (_, qv, qdesc) = qemu_check(&q, Some("all"));
            let r = ours(&p, RepairMode::All).await;
            assert_eq!(r.exit_code(), 0, "{r:#?}");
            assert!(r
                .messages
                .iter()
                .any(|m| m == "Rebuilding refcount structure"));
            assert_same(&r, &qv, &format!("{opts} repaired\n{qdesc}"));
            assert_clean_like_qemu(&p, &format!("{opts} after -r all")).await;
            run_ok("qemu-img", &["compare", "-q", s(&orig), s(&p)]);
            // And the repaired image takes writes again.
            qemu_io(&p, &["write -P 7 0 2M"]);
            assert_clean_like_qemu(&p, &format!("{opts} written after repair")).await;
        }
    }

    /// A refcount that is too low but not zero (a cluster shared with a snapshot) is raised in
    /// place, and the COPIED flag agrees again.
    #[tokio::test]
    async fn low_refcount_is_raised_in_place() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = create(dir.path(), "low.qcow2", "", "64M");
        qemu_io(&p, &["write -P 1 0 1M"]);
        run_ok("qemu-img", &["snapshot", "-c", "s1", s(&p)]);
        let orig = dir.path().join("low-orig.qcow2");
        copy(&p, &orig);
        let c = host_cluster(&p, 128 << 10);
        assert_eq!(get_refcount(&p, c), 2);
        set_refcount(&p, c, 1);
        let (code, v, desc) = qemu_check(&p, None);
        assert_eq!(code, 2, "{desc}");
        let r = ours(&p, RepairMode::None).await;
        assert_same(&r, &v, "low refcount");
        let q = dir.path().join("low-qemu.qcow2");
        copy(&p, &q);
        let (_, qv, qdesc) = qemu_check(&q, Some("all"));
        let r = ours(&p, RepairMode::All).await;
        assert!(!r.messages.iter().any(|m| m.contains("Rebuilding")));
        assert_same(&r, &qv, &format!("low refcount repaired\n{qdesc}"));
        assert_eq!(get_refcount(&p, c), 2);
        assert_clean_like_qemu(&p, "after raising").await;
        run_ok("qemu-img", &["compare", "-q", s(&orig), s(&p)]);
    }

    /// A COPIED flag that disagrees with the refcount is fixed in place.
    #[tokio::test]
    async fn copied_flag_is_fixed() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = create(dir.path(), "cp.qcow2", "", "64M");
        qemu_io(&p, &["write -P 1 0 1M"]);
        let mut d = std::fs::read(&p).expect("read");
        let (l1pos, l2pos) = entry_pos(&d, 0);
        let e = be64(&d, l2pos);
        put64(&mut d, l2pos, e & !OFLAG_COPIED);
        let l1e = be64(&d, l1pos);
        put64(&mut d, l1pos, l1e & !OFLAG_COPIED);
        std::fs::write(&p, &d).expect("write");
        let (code, v, desc) = qemu_check(&p, None);
        assert_eq!(code, 2, "{desc}");
        let r = ours(&p, RepairMode::None).await;
        assert_eq!(r.corruptions, 2, "{r:#?}");
        assert_same(&r, &v, "copied flags");
        let q = dir.path().join("cp-qemu.qcow2");
        copy(&p, &q);
        let (_, qv, qdesc) = qemu_check(&q, Some("all"));
        let r = ours(&p, RepairMode::All).await;
        assert_same(&r, &qv, &format!("copied flags repaired\n{qdesc}"));
        assert_eq!(
            std::fs::read(&p).expect("read"),
            std::fs::read(&q).expect("read")
        );
    }

    /// A broken refcount structure (unaligned or missing refcount block) is rebuilt from
    /// scratch; qemu-img then finds the image clean and the data unchanged.
    #[tokio::test]
    async fn broken_refcount_structure_is_rebuilt() {
        let dir = tempfile::tempdir().expect("tmp");
        for (n, entry) in [Some(0x200u64), Some(0), None].into_iter().enumerate() {
            let p = create(
                dir.path(),
                &format!("b{n}.qcow2"),
                "cluster_size=4096",
                "64M",
            );
            qemu_io(&p, &["write -P 1 0 1M", "write -P 3 40M 64k"]);
            run_ok("qemu-img", &["snapshot", "-c", "s1", s(&p)]);
            qemu_io(&p, &["write -P 2 512k 64k"]);
            let orig = dir.path().join(format!("b{n}-orig.qcow2"));
            copy(&p, &orig);
            let mut d = std::fs::read(&p).expect("read");
            let h = header_of(&d);
            let rt = h.refcount_table_offset as usize;
            match entry {
                Some(0) => put64(&mut d, rt, 0),
                Some(x) => {
                    let e = be64(&d, rt);
                    put64(&mut d, rt, e + x);
                }
                // A refcount block pointing past the end of the file.
                None => put64(&mut d, rt, 1 << 40),
            }
            std::fs::write(&p, &d).expect("write");
            let r = ours(&p, RepairMode::None).await;
            assert_eq!(r.exit_code(), 2, "{r:#?}");
            let r = ours(&p, RepairMode::All).await;
            assert_eq!(r.exit_code(), 0, "{r:#?}");
            assert!(r.corruptions_fixed > 0);
            assert_clean_like_qemu(&p, &format!("rebuilt {n}")).await;
            run_ok("qemu-img", &["compare", "-q", s(&orig), s(&p)]);
            // The snapshot's view survived too.
            let (ra, rb) = (
                dir.path().join(format!("b{n}-orig.raw")),
                dir.path().join(format!("b{n}.raw")),
            );
            for (img, raw) in [(&orig, &ra), (&p, &rb)] {
                run_ok(
                    "qemu-img",
                    &[
                        "convert",
                        "-l",
                        "snapshot.name=s1",
                        "-O",
                        "raw",
                        s(img),
                        s(raw),
                    ],
                );
            }
            assert!(std::fs::read(&ra).expect("read") == std::fs::read(&rb).expect("read"));
        }
    }

    fn kill_lazy_writer(p: &Path) {
        let args = [
            "-f",
            "qcow2",
            "-c",
            "write -P 1 0 1M",
            "-c",
            "write -P 2 3M 100k",
            "-c",
            "sigraise 9",
            s(p),
        ];
        let out = run("qemu-io", &args);
        assert!(
            !out.status.success(),
            "{}",
            describe("qemu-io", &args, &out)
        );
        assert_eq!(
            incompat(p) & INCOMPAT_DIRTY,
            INCOMPAT_DIRTY,
            "image not dirty"
        );
    }

    /// A lazy-refcounts image whose writer was killed: the check agrees with qemu-img, and
    /// `repair_dirty` (also run by a read-write open) leaves a clean image with the data.
    #[tokio::test]
    async fn dirty_image_is_repaired() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = create(dir.path(), "dirty.qcow2", "lazy_refcounts=on", "64M");
        kill_lazy_writer(&p);
        let (code, v, desc) = qemu_check(&p, None);
        assert_eq!(code, 2, "{desc}");
        let r = ours(&p, RepairMode::None).await;
        assert_same(&r, &v, "dirty image");
        let q = dir.path().join("dirty-qemu.qcow2");
        copy(&p, &q);
        let (_, qv, qdesc) = qemu_check(&q, Some("all"));

        repair_dirty(open(&p, false)).await.expect("repair");
        assert_eq!(incompat(&p) & INCOMPAT_DIRTY, 0);
        let (code, v, desc) = qemu_check(&p, None);
        assert_eq!(code, 0, "{desc}");
        assert_eq!(
            field(&v, "image-end-offset"),
            field(&qv, "image-end-offset"),
            "{qdesc}"
        );
        run_ok(
            "qemu-io",
            &[
                "-r",
                "-f",
                "qcow2",
                "-c",
                "read -P 1 0 1M",
                "-c",
                "read -P 2 3M 100k",
                s(&p),
            ],
        );

        // The same through a read-write open of the driver.
        let p2 = create(
            dir.path(),
            "dirty2.qcow2",
            "lazy_refcounts=on,cluster_size=4096",
            "64M",
        );
        kill_lazy_writer(&p2);
        let q2 = super::super::Qcow2::open(open(&p2, false))
            .await
            .expect("read-write open repairs");
        assert_eq!(q2.header().await.incompatible_features & INCOMPAT_DIRTY, 0);
        use crate::node::BlockNode;
        q2.write(5 << 20, &[9u8; 5000]).await.expect("write");
        q2.close().await.expect("close");
        drop(q2);
        assert_clean_like_qemu(&p2, "dirty image opened read-write").await;
        run_ok(
            "qemu-io",
            &[
                "-r",
                "-f",
                "qcow2",
                "-c",
                "read -P 1 0 1M",
                "-c",
                "read -P 9 5M 5000",
                s(&p2),
            ],
        );
    }

    /// A read-only check never writes, even to a dirty image, and a read-only file cannot be
    /// repaired.
    #[tokio::test]
    async fn read_only_check_does_not_write() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = create(dir.path(), "ro.qcow2", "lazy_refcounts=on", "64M");
        kill_lazy_writer(&p);
        let before = std::fs::read(&p).expect("read");
        let r = ours(&p, RepairMode::None).await;
        assert_eq!(r.exit_code(), 2);
        assert!(check(open(&p, true), RepairMode::All).await.is_err());
        assert_eq!(std::fs::read(&p).expect("read"), before);
    }

    /// References past the end of the file are reported (as qemu-img does), not counted.
    #[tokio::test]
    async fn offsets_past_the_end_are_corruptions() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = create(dir.path(), "eof.qcow2", "", "64M");
        qemu_io(&p, &["write -P 1 0 1M"]);
        let mut d = std::fs::read(&p).expect("read");
        let (_, l2pos) = entry_pos(&d, 0);
        put64(&mut d, l2pos, OFLAG_COPIED | 0x1000_0000);
        std::fs::write(&p, &d).expect("write");
        let (code, v, desc) = qemu_check(&p, None);
        assert_eq!(code, 2, "{desc}");
        let r = ours(&p, RepairMode::None).await;
        assert_same(&r, &v, "data past EOF");
        let q = dir.path().join("eof-qemu.qcow2");
        copy(&p, &q);
        let (_, qv, qdesc) = qemu_check(&q, Some("all"));
        let r = ours(&p, RepairMode::All).await;
        assert_same(&r, &qv, &format!("data past EOF repaired\n{qdesc}"));
        assert_eq!(r.exit_code(), 2);
    }

    /// Reserved bits, unaligned tables and clusters are corruptions, never panics.
    #[tokio::test]
    async fn malformed_entries_are_reported() {
        let dir = tempfile::tempdir().expect("tmp");
        let base = create(dir.path(), "m.qcow2", "", "64M");
        qemu_io(&base, &["write -P 1 0 1M"]);
        type Edit = fn(&mut Vec<u8>, usize, usize);
        let edits: [(&str, Edit); 4] = [
            ("L2 offset unaligned", |d, l1, _| {
                let e = be64(d, l1);
                put64(d, l1, e + 0x200);
            }),
            ("L1 reserved bit", |d, l1, _| {
                let e = be64(d, l1);
                put64(d, l1, e | 1 << 60);
            }),
            ("L2 reserved bit", |d, _, l2| {
                let e = be64(d, l2);
                put64(d, l2, e | 2);
            }),
            ("data unaligned", |d, _, l2| {
                let e = be64(d, l2);
                put64(d, l2, e + 0x200);
            }),
        ];
        for (n, (what, edit)) in edits.iter().enumerate() {
            let p = dir.path().join(format!("m{n}.qcow2"));
            let mut d = std::fs::read(&base).expect("read");
            let (l1, l2) = entry_pos(&d, 0);
            edit(&mut d, l1, l2);
            std::fs::write(&p, &d).expect("write");
            let (code, v, desc) = qemu_check(&p, None);
            assert_eq!(code, 2, "{desc}");
            let r = ours(&p, RepairMode::None).await;
            assert_eq!(r.exit_code(), 2, "{what}: {r:#?}");
            if n > 0 {
                // (QEMU walks a misaligned L2 table as if it were one; we refuse to.)
                assert_same(&r, &v, what);
            }
            let r = ours(&p, RepairMode::All).await;
            assert!(r.corruptions > 0, "{what}: {r:#?}");
        }
        // An unaligned preallocated zero cluster is repaired like qemu-img does.
        let p = dir.path().join("prealloc.qcow2");
        let mut d = std::fs::read(&base).expect("read");
        let (_, l2) = entry_pos(&d, 0);
        let e = be64(&d, l2);
        put64(&mut d, l2, (e + 0x200) | OFLAG_ZERO);
        std::fs::write(&p, &d).expect("write");
        let (_, v, _) = qemu_check(&p, None);
        let r = ours(&p, RepairMode::None).await;
        assert_same(&r, &v, "unaligned preallocated zero cluster");
        let q = dir.path().join("prealloc-qemu.qcow2");
        copy(&p, &q);
        let (_, qv, qdesc) = qemu_check(&q, Some("all"));
        let r = ours(&p, RepairMode::All).await;
        assert_same(&r, &qv, &format!("prealloc repaired\n{qdesc}"));
        assert_clean_like_qemu(&p, "prealloc repaired").await;
    }

    async fn check_bytes(data: Vec<u8>, mode: RepairMode) -> Result<CheckResult> {
        let file: Arc<dyn Protocol> = Arc::new(MemProtocol::new(
            "mem.qcow2",
            data,
            mode == RepairMode::None,
            64 << 20,
        ));
        check(file, mode).await
    }

    /// Headers that cannot be checked give a clean error.
    #[tokio::test]
    async fn bad_headers_fail_cleanly() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = create(dir.path(), "h.qcow2", "", "64M");
        qemu_io(&p, &["write -P 1 0 1M"]);
        let d = std::fs::read(&p).expect("read");
        for len in [0, 10, 50, 71, 100] {
            assert!(check_bytes(d[..len].to_vec(), RepairMode::None)
                .await
                .is_err());
            assert!(check_bytes(d[..len].to_vec(), RepairMode::All)
                .await
                .is_err());
        }
        let mut z = d.clone();
        put64(&mut z, 48, 0); // refcount table offset 0
        assert!(check_bytes(z.clone(), RepairMode::None).await.is_err());
        assert!(check_bytes(z, RepairMode::All).await.is_err());
        // A file cut short: tables past the end.
        let cut = d[..(5 << 16) + 100].to_vec();
        let r = check_bytes(cut.clone(), RepairMode::None)
            .await
            .expect("check");
        assert_eq!(r.exit_code(), 2, "{r:#?}");
        let _ = check_bytes(cut, RepairMode::All).await;
    }

    /// Seeded random corruption of metadata: the check and both repairs must finish without
    /// panicking, and a second check after `-r all` must not find fewer problems than it fixed
    /// ... only that it runs; the invariant is "no panic, no hang".
    #[tokio::test]
    async fn mutated_images_never_panic() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut seeds = Vec::new();
        for (n, opts) in [
            "cluster_size=4096",
            "cluster_size=16384,extended_l2=on",
            "cluster_size=512,refcount_bits=1",
        ]
        .iter()
        .enumerate()
        {
            let p = create(dir.path(), &format!("f{n}.qcow2"), opts, "4M");
            qemu_io(&p, &["write -P 1 0 100k", "write -P 2 1M 20k"]);
            if !opts.contains("refcount_bits=1") {
                run_ok("qemu-img", &["snapshot", "-c", "s1", s(&p)]);
                qemu_io(&p, &["write -P 3 0 10k"]);
            }
            let z = dir.path().join(format!("f{n}z.qcow2"));
            run_ok(
                "qemu-img",
                &["convert", "-c", "-O", "qcow2", "-o", opts, s(&p), s(&z)],
            );
            seeds.push(std::fs::read(&p).expect("read"));
            seeds.push(std::fs::read(&z).expect("read"));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_c4ec);
        for round in 0..300 {
            let seed = &seeds[round % seeds.len()];
            let mut d = seed.clone();
            let h = header_of(&d);
            let meta_end = (d.len() as u64).min(h.cluster_size() * 8) as usize;
            for _ in 0..rng.random_range(1..6) {
                let pos = if rng.random_bool(0.3) {
                    rng.random_range(0..112.min(d.len()))
                } else {
                    rng.random_range(0..meta_end)
                };
                d[pos] = match rng.random_range(0..4) {
                    0 => 0,
                    1 => 0xff,
                    2 => d[pos] ^ (1 << rng.random_range(0..8)),
                    _ => rng.random(),
                };
            }
            let _ = check_bytes(d.clone(), RepairMode::None).await;
            let _ = check_bytes(d.clone(), RepairMode::Leaks).await;
            let _ = check_bytes(d, RepairMode::All).await;
        }
    }
}
