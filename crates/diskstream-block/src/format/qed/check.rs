//! The QED consistency check and repair (`qemu-img check` on QED images).
//!
//! Every L2 table the L1 table points at and every data cluster an L2 table points at must be
//! cluster aligned, lie after the header and before the end of the file, and be used once.
//! Entries that point outside the file are corruptions; repairing (any `-r` mode, as in QEMU)
//! drops them, so the guest clusters read from the backing file again. A cluster used twice is
//! a corruption that cannot be repaired. Clusters of the file nothing points at are leaks:
//! reported, never fixable (QED has no way to reuse them). A clean repair clears the
//! need-check flag after everything it changed is durable.
//!
//! The counts and the qemu-img output follow QEMU, with one deliberate difference: QEMU 10
//! indexes its cluster bitmap by `offset / (cluster_size - 1)` and so reports phantom leaks in
//! files of more than `cluster_size - 1` clusters (a 4 KiB-cluster image past 16 MiB); we count
//! the real ones.

use super::header::{Header, F_NEED_CHECK, ZERO_CLUSTER};
use super::read_header;
use crate::error::{BlockError, Result};
use crate::protocol::Protocol;
use std::sync::Arc;

pub use crate::format::qcow2::check::{CheckResult, RepairMode};

/// Largest cluster bitmap we build (bits), whatever the file length claims.
const MAX_BITMAP_CLUSTERS: u64 = 1 << 30;

/// One pass over the tables.
struct Scan {
    fix: bool,
    file_size: u64,
    used: Vec<u64>,
    result: CheckResult,
}

impl Scan {
    /// Mark `n` clusters from byte `off` used; clusters used already are corruptions.
    /// Returns whether there were none.
    fn set_used(&mut self, h: &Header, off: u64, n: u64) -> bool {
        let first = off / h.cluster_size as u64;
        let mut dup = 0;
        for c in first..first + n {
            let (w, b) = ((c / 64) as usize, c % 64);
            if let Some(word) = self.used.get_mut(w) {
                if *word >> b & 1 != 0 {
                    dup += 1;
                }
                *word |= 1 << b;
            }
        }
        self.result.corruptions += dup;
        dup == 0
    }

    /// Check one L2 table; invalid entries are counted (and dropped when fixing). Returns
    /// how many were invalid.
    fn check_l2(&mut self, h: &Header, table: &mut [u64]) -> u64 {
        let cs = h.cluster_size as u64;
        let mut invalid = 0;
        let mut last = 0u64;
        for e in table.iter_mut() {
            let off = *e;
            if off == 0 || off == ZERO_CLUSTER {
                continue;
            }
            self.result.allocated_clusters += 1;
            if last != 0 && last.wrapping_add(cs) != off {
                self.result.fragmented_clusters += 1;
            }
            last = off;
            if !h.cluster_offset_valid(off, self.file_size) {
                if self.fix {
                    *e = 0;
                    self.result.corruptions_fixed += 1;
                } else {
                    self.result.corruptions += 1;
                }
                invalid += 1;
                continue;
            }
            self.set_used(h, off, 1);
        }
        invalid
    }
}

fn to_bytes(t: &[u64]) -> Vec<u8> {
    t.iter().flat_map(|e| e.to_le_bytes()).collect()
}

fn from_bytes(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_le_bytes(a)
        })
        .collect()
}

/// One check pass (with fixes when `fix`); I/O errors on tables count as check errors.
async fn scan(file: &Arc<dyn Protocol>, fix: bool) -> Result<CheckResult> {
    let h = read_header(file).await?;
    let cs = h.cluster_size as u64;
    let file_size = file.len().await? / cs * cs;
    let nclusters = file_size / cs;
    if nclusters > MAX_BITMAP_CLUSTERS {
        return Err(BlockError::unsupported(
            file.name(),
            format!("file of {nclusters} clusters is too large to check"),
        ));
    }
    let mut s = Scan {
        fix,
        file_size,
        used: vec![0u64; nclusters.div_ceil(64) as usize],
        result: CheckResult {
            total_clusters: h.image_size.div_ceil(cs),
            ..Default::default()
        },
    };
    let tb = h.table_bytes();
    s.set_used(&h, h.l1_table_offset, h.table_size as u64);
    let mut l1 = from_bytes(&file.read_vec(h.l1_table_offset, tb as usize).await?);
    let mut invalid_l1 = 0;
    let mut io_error = false;
    for entry in l1.iter_mut() {
        let off = *entry;
        if off == 0 {
            continue;
        }
        if !h.table_offset_valid(off, file_size) {
            if fix {
                *entry = 0;
                s.result.corruptions_fixed += 1;
            } else {
                s.result.corruptions += 1;
            }
            invalid_l1 += 1;
            continue;
        }
        if !s.set_used(&h, off, h.table_size as u64) {
            continue; // a table used twice is not descended into
        }
        let mut table = match file.read_vec(off, tb as usize).await {
            Ok(b) => from_bytes(&b),
            Err(_) => {
                s.result.check_errors += 1;
                io_error = true;
                continue;
            }
        };
        if s.check_l2(&h, &mut table) > 0
            && fix
            && file.write_vec(off, to_bytes(&table)).await.is_err()
        {
            s.result.check_errors += 1;
            io_error = true;
        }
    }
    if invalid_l1 > 0
        && fix
        && file
            .write_vec(h.l1_table_offset, to_bytes(&l1))
            .await
            .is_err()
    {
        s.result.check_errors += 1;
        io_error = true;
    }
    if io_error {
        return Ok(s.result);
    }
    let first = h.header_size as u64;
    s.result.leaks = (first..nclusters)
        .filter(|&c| s.used[(c / 64) as usize] >> (c % 64) & 1 == 0)
        .count() as u64;
    if fix && s.result.corruptions == 0 && s.result.check_errors == 0 {
        // Everything repaired is durable before the image is declared clean.
        file.flush().await?;
        if h.features & F_NEED_CHECK != 0 {
            let mut clean = h.clone();
            clean.features &= !F_NEED_CHECK;
            file.write_vec(0, clean.serialize().to_vec()).await?;
            file.flush().await?;
        }
    } else if fix {
        file.flush().await?;
    }
    Ok(s.result)
}

/// Check (and with `repair` other than [`RepairMode::None`], repair) the QED image on `file`,
/// which must not be written by a driver at the same time. Fails only when the image cannot be
/// checked at all (unreadable, not QED, invalid header); inconsistencies are reported in the
/// result. After a repair the counts describe the image as re-checked, as qemu-img reports.
pub async fn check(file: Arc<dyn Protocol>, repair: RepairMode) -> Result<CheckResult> {
    if repair != RepairMode::None && file.read_only() {
        return Err(BlockError::ReadOnly(file.name().to_string()));
    }
    let fix = repair != RepairMode::None;
    let first = scan(&file, fix).await?;
    if !fix || first.corruptions_fixed + first.leaks_fixed == 0 {
        return Ok(first);
    }
    let mut last = scan(&file, false).await?;
    last.corruptions_fixed = first.corruptions_fixed;
    last.leaks_fixed = first.leaks_fixed;
    last.messages = vec![
        "The following inconsistencies were found and repaired:".to_string(),
        String::new(),
        format!("    {} leaked clusters", first.leaks_fixed),
        format!("    {} corruptions", first.corruptions_fixed),
        String::new(),
        "Double checking the fixed image now...".to_string(),
    ];
    Ok(last)
}
