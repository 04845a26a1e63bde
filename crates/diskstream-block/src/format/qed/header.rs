//! The QED header: parsing with QEMU's validation, serialization, and the size arithmetic.
//!
//! On disk (little-endian, offset 0, 64 bytes): magic `QED\0`, cluster_size u32, table_size u32
//! (L1/L2 tables in clusters), header_size u32 (clusters reserved for the header), features
//! u64, compat_features u64, autoclear_features u64, l1_table_offset u64, image_size u64,
//! backing_filename_offset u32, backing_filename_size u32. The backing file name lives inside
//! the header clusters (QEMU puts it right after the 64 header bytes). Bytes of the header
//! clusters we do not interpret are never rewritten: header updates write the 64 bytes only.

use crate::error::{BlockError, Result};

/// `QED\0`, little-endian.
pub const MAGIC: u32 = u32::from_le_bytes(*b"QED\0");
/// The image has a backing file.
pub const F_BACKING_FILE: u64 = 0x01;
/// The image was not closed cleanly: check it before writing.
pub const F_NEED_CHECK: u64 = 0x02;
/// The backing file is raw (the only backing format QED can record).
pub const F_BACKING_FORMAT_NO_PROBE: u64 = 0x04;
/// Feature bits this implementation understands; others make the image unopenable.
pub const FEATURE_MASK: u64 = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE;
/// Size of the header structure.
pub const HEADER_LEN: usize = 64;
/// Smallest cluster size.
pub const MIN_CLUSTER_SIZE: u32 = 4096;
/// Largest cluster size.
pub const MAX_CLUSTER_SIZE: u32 = 64 << 20;
/// Default cluster size.
pub const DEFAULT_CLUSTER_SIZE: u32 = 65536;
/// Smallest table size (clusters per L1/L2 table).
pub const MIN_TABLE_SIZE: u32 = 1;
/// Largest table size.
pub const MAX_TABLE_SIZE: u32 = 16;
/// Default table size.
pub const DEFAULT_TABLE_SIZE: u32 = 4;
/// Longest backing file name accepted (QEMU keeps names in a PATH_MAX buffer).
pub const MAX_BACKING_NAME: u32 = 4095;
/// Largest L1/L2 table we load (QEMU allows up to 1 GiB tables: 64 MiB clusters times 16;
/// a table of that size is held in memory whole, so a hostile header could demand it).
pub const MAX_TABLE_BYTES: u64 = 32 << 20;
/// L2 entry of a cluster that reads as zeroes.
pub const ZERO_CLUSTER: u64 = 1;

/// Whether `cs` is a valid QED cluster size (power of two in 4 KiB..64 MiB).
pub fn cluster_size_valid(cs: u64) -> bool {
    (MIN_CLUSTER_SIZE as u64..=MAX_CLUSTER_SIZE as u64).contains(&cs) && cs.is_power_of_two()
}

/// Whether `ts` is a valid table size (power of two in 1..16 clusters).
pub fn table_size_valid(ts: u64) -> bool {
    (MIN_TABLE_SIZE as u64..=MAX_TABLE_SIZE as u64).contains(&ts) && ts.is_power_of_two()
}

/// The largest virtual size the tables can address.
pub fn max_image_size(cluster_size: u64, table_size: u64) -> u64 {
    let entries = cluster_size * table_size / 8;
    entries.saturating_mul(entries).saturating_mul(cluster_size)
}

/// Whether `size` is a valid virtual size (sector multiple, addressable).
pub fn image_size_valid(size: u64, cluster_size: u64, table_size: u64) -> bool {
    size % 512 == 0 && size <= max_image_size(cluster_size, table_size)
}

/// A parsed QED header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Cluster size in bytes.
    pub cluster_size: u32,
    /// L1/L2 table size in clusters.
    pub table_size: u32,
    /// Clusters reserved for the header.
    pub header_size: u32,
    /// Incompatible feature bits.
    pub features: u64,
    /// Compatible feature bits (none defined; preserved).
    pub compat_features: u64,
    /// Autoclear feature bits (none defined; cleared when opened read-write, as QEMU does).
    pub autoclear_features: u64,
    /// Offset of the L1 table.
    pub l1_table_offset: u64,
    /// Virtual size in bytes.
    pub image_size: u64,
    /// Offset of the backing file name (from the start of the file).
    pub backing_filename_offset: u32,
    /// Length of the backing file name.
    pub backing_filename_size: u32,
    /// The backing file name (when [`F_BACKING_FILE`] is set).
    pub backing_file: Option<String>,
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

impl Header {
    /// Parse the 64 header bytes (no name yet) with QEMU's open-time checks, against a file of
    /// `file_len` bytes. `path` names the image in errors.
    pub fn parse_fixed(path: &str, b: &[u8], file_len: u64) -> Result<Header> {
        if b.len() < HEADER_LEN {
            return Err(BlockError::invalid(
                path,
                "Image not in QED format (file shorter than a QED header)",
            ));
        }
        if u32_at(b, 0) != MAGIC {
            return Err(BlockError::invalid(path, "Image not in QED format"));
        }
        let h = Header {
            cluster_size: u32_at(b, 4),
            table_size: u32_at(b, 8),
            header_size: u32_at(b, 12),
            features: u64_at(b, 16),
            compat_features: u64_at(b, 24),
            autoclear_features: u64_at(b, 32),
            l1_table_offset: u64_at(b, 40),
            image_size: u64_at(b, 48),
            backing_filename_offset: u32_at(b, 56),
            backing_filename_size: u32_at(b, 60),
            backing_file: None,
        };
        let unknown = h.features & !FEATURE_MASK;
        if unknown != 0 {
            return Err(BlockError::unsupported(
                path,
                format!("Unsupported QED features: {unknown:x}"),
            ));
        }
        let cs = h.cluster_size as u64;
        if !cluster_size_valid(cs) {
            return Err(BlockError::invalid(
                path,
                format!(
                    "QED cluster size {} is invalid (power of two in [4096, 67108864])",
                    h.cluster_size
                ),
            ));
        }
        if !table_size_valid(h.table_size as u64) {
            return Err(BlockError::invalid(
                path,
                format!(
                    "QED table size {} is invalid (power of two in [1, 16])",
                    h.table_size
                ),
            ));
        }
        if h.table_bytes() > MAX_TABLE_BYTES {
            return Err(BlockError::unsupported(
                path,
                format!(
                    "QED tables of {} bytes are larger than supported ({MAX_TABLE_BYTES})",
                    h.table_bytes()
                ),
            ));
        }
        if !image_size_valid(h.image_size, cs, h.table_size as u64) {
            return Err(BlockError::invalid(
                path,
                format!(
                    "QED image size {} is invalid (a multiple of 512 up to {})",
                    h.image_size,
                    max_image_size(cs, h.table_size as u64)
                ),
            ));
        }
        if h.header_size == 0 || (h.header_size as u64) * cs > u32::MAX as u64 {
            return Err(BlockError::invalid(
                path,
                format!("QED header size {} clusters is invalid", h.header_size),
            ));
        }
        let file_size = file_len / cs * cs;
        if !h.table_offset_valid(h.l1_table_offset, file_size) {
            return Err(BlockError::invalid(
                path,
                format!(
                    "QED L1 table offset {:#x} is invalid (unaligned, inside the header or past \
                     the end of the file)",
                    h.l1_table_offset
                ),
            ));
        }
        if h.features & F_BACKING_FILE != 0 {
            let end = h.backing_filename_offset as u64 + h.backing_filename_size as u64;
            if end > h.header_bytes() {
                return Err(BlockError::invalid(
                    path,
                    "QED backing file name lies outside the header clusters",
                ));
            }
            if h.backing_filename_size > MAX_BACKING_NAME {
                return Err(BlockError::invalid(
                    path,
                    format!(
                        "QED backing file name is {} bytes long (at most {MAX_BACKING_NAME})",
                        h.backing_filename_size
                    ),
                ));
            }
        }
        Ok(h)
    }

    /// Bytes reserved for the header.
    pub fn header_bytes(&self) -> u64 {
        self.header_size as u64 * self.cluster_size as u64
    }

    /// Bytes per L1 or L2 table.
    pub fn table_bytes(&self) -> u64 {
        self.table_size as u64 * self.cluster_size as u64
    }

    /// Entries per table.
    pub fn table_entries(&self) -> u64 {
        self.table_bytes() / 8
    }

    /// Guest bytes one L2 table maps.
    pub fn l2_span(&self) -> u64 {
        self.table_entries() * self.cluster_size as u64
    }

    /// The backing format QED records: `raw` with [`F_BACKING_FORMAT_NO_PROBE`], else nothing
    /// (QEMU probes it).
    pub fn backing_is_raw(&self) -> bool {
        self.features & F_BACKING_FORMAT_NO_PROBE != 0
    }

    /// QEMU's data cluster offset check: aligned, after the header, before the end of the file
    /// (`file_size` rounded down to whole clusters).
    pub fn cluster_offset_valid(&self, off: u64, file_size: u64) -> bool {
        off % self.cluster_size as u64 == 0 && off >= self.header_bytes() && off < file_size
    }

    /// QEMU's table offset check: the first and the last cluster of the table are valid data
    /// cluster offsets. (QEMU 10 also rejects every table of a `table_size=1` image here, by an
    /// overflow test that compares the last cluster with the first; we accept those tables.)
    pub fn table_offset_valid(&self, off: u64, file_size: u64) -> bool {
        let Some(last) = off.checked_add((self.table_size as u64 - 1) * self.cluster_size as u64)
        else {
            return false;
        };
        self.cluster_offset_valid(off, file_size) && self.cluster_offset_valid(last, file_size)
    }

    /// The 64 header bytes.
    pub fn serialize(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.cluster_size.to_le_bytes());
        b[8..12].copy_from_slice(&self.table_size.to_le_bytes());
        b[12..16].copy_from_slice(&self.header_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.features.to_le_bytes());
        b[24..32].copy_from_slice(&self.compat_features.to_le_bytes());
        b[32..40].copy_from_slice(&self.autoclear_features.to_le_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.image_size.to_le_bytes());
        b[56..60].copy_from_slice(&self.backing_filename_offset.to_le_bytes());
        b[60..64].copy_from_slice(&self.backing_filename_size.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            cluster_size: 65536,
            table_size: 4,
            header_size: 1,
            features: 0,
            compat_features: 0,
            autoclear_features: 0,
            l1_table_offset: 65536,
            image_size: 64 << 20,
            backing_filename_offset: 0,
            backing_filename_size: 0,
            backing_file: None,
        }
    }

    #[test]
    fn round_trip_and_validation() {
        let h = header();
        let b = h.serialize();
        assert_eq!(&b[0..4], b"QED\0");
        let p = Header::parse_fixed("t", &b, 5 * 65536).map_err(|e| e.to_string());
        assert_eq!(p, Ok(h.clone()));
        // L1 past the end of the file.
        assert!(Header::parse_fixed("t", &b, 4 * 65536).is_err());
        let mut bad = h.clone();
        bad.features |= 0x100;
        let e = Header::parse_fixed("t", &bad.serialize(), 5 * 65536).err();
        assert!(e.is_some_and(|e| e.to_string().contains("Unsupported QED features: 100")));
        let mut bad = h.clone();
        bad.cluster_size = 2048;
        assert!(Header::parse_fixed("t", &bad.serialize(), 5 * 65536).is_err());
        let mut bad = h.clone();
        bad.table_size = 3;
        assert!(Header::parse_fixed("t", &bad.serialize(), 5 * 65536).is_err());
        let mut bad = h;
        bad.image_size = 1000;
        assert!(Header::parse_fixed("t", &bad.serialize(), 5 * 65536).is_err());
    }

    #[test]
    fn limits() {
        assert_eq!(max_image_size(4096, 1), 512 * 512 * 4096);
        assert_eq!(max_image_size(65536, 4), 32768 * 32768 * 65536);
        assert!(cluster_size_valid(4096) && !cluster_size_valid(6000));
        assert!(table_size_valid(16) && !table_size_valid(32));
    }
}
