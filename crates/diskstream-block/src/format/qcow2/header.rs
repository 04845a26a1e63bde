//! The qcow2 header and its extensions: parsing with validation, and serialisation that keeps
//! every field and extension we do not interpret byte for byte.
//!
//! All values are big-endian. Limits follow QEMU's, so an image QEMU refuses we refuse too, and a
//! hostile header (huge L1, tables in the header cluster) fails cleanly before any large allocation.

use crate::error::{BlockError, Result};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature: image was not closed cleanly (lazy refcounts may be stale).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: metadata corruption was detected; open read-only.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: guest data lives in an external file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: `compression_type` field is valid and non-zero.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: 128-bit L2 entries with subcluster bitmaps.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible bit this implementation understands.
pub const INCOMPAT_KNOWN: u64 = 0x1f;
/// Compatible feature: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature: bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear feature: raw external data file.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// QEMU's limit on the L1 table size (bytes).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table size (bytes).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Largest supported cluster size (QEMU's limit, 2 MiB).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Smallest cluster size (512 bytes).
pub const MIN_CLUSTER_BITS: u32 = 9;

/// Compression algorithm of compressed clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (QEMU calls it "zlib").
    Zlib,
    /// Zstandard.
    Zstd,
}

/// A parsed qcow2 header, including the parts of cluster 0 that follow it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 = none (others are refused).
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Size of the refcount table in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// Log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Length of the header structure (72 for v2).
    pub header_length: u32,
    /// Compression type byte (v3 with header_length > 104).
    pub compression_type: u8,
    /// Header bytes past offset 105 up to `header_length`, preserved verbatim.
    pub extra_fields: Vec<u8>,
    /// Backing file name, if any.
    pub backing_file: Option<String>,
    /// Backing format recorded in the extension, if any.
    pub backing_format: Option<String>,
    /// Every other header extension (type, data), in on-disk order.
    pub extensions: Vec<(u32, Vec<u8>)>,
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Whether 128-bit L2 entries with subclusters are used.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// Bytes per L2 entry.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// Entries (clusters mapped) per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// The compression algorithm in use.
    pub fn compression(&self) -> CompressionType {
        if self.compression_type == 1 {
            CompressionType::Zstd
        } else {
            CompressionType::Zlib
        }
    }

    /// L1 entries needed to map `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        let per_l2 = self.l2_entries() * self.cluster_size();
        size.div_ceil(per_l2)
    }

    /// Parse and validate a header from the first bytes of an image (at least one cluster, or
    /// the whole file when shorter). `file_len` bounds every table offset.
    pub fn parse(path: &str, buf: &[u8], file_len: u64) -> Result<Header> {
        let bad = |m: &str| BlockError::invalid(path, m.to_string());
        if buf.len() < 72 {
            return Err(bad("image is too small to hold a qcow2 header"));
        }
        if be32(buf, 0) != MAGIC {
            return Err(bad("not a qcow2 image (bad magic)"));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(BlockError::unsupported(
                path,
                format!("qcow2 version {version}"),
            ));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(bad(&format!(
                "Cluster size must be a power of two between 512 and 2048k (cluster_bits {cluster_bits})"
            )));
        }
        let cs = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 72,
            compression_type: 0,
            extra_fields: Vec::new(),
            backing_file: None,
            backing_format: None,
            extensions: Vec::new(),
        };
        let backing_file_offset = be64(buf, 8);
        let backing_file_size = be32(buf, 16) as u64;
        if version == 3 {
            if buf.len() < 104 {
                return Err(bad("truncated qcow2 v3 header"));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < 104 || h.header_length as u64 > cs || h.header_length % 8 != 0 {
                return Err(bad(&format!("invalid header length {}", h.header_length)));
            }
            if buf.len() < h.header_length as usize {
                return Err(bad("truncated qcow2 header"));
            }
            if h.header_length > 104 {
                h.compression_type = buf[104];
                h.extra_fields = buf[105..h.header_length as usize].to_vec();
            }
        }
        if h.refcount_order > 6 {
            return Err(bad(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        let unknown = h.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(BlockError::unsupported(
                path,
                format!("unknown incompatible feature bits {unknown:#x}"),
            ));
        }
        if h.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return Err(BlockError::unsupported(path, "external data files"));
        }
        match (
            h.compression_type,
            h.incompatible_features & INCOMPAT_COMPRESSION != 0,
        ) {
            (0, false) | (1, true) => {}
            (0, true) => {
                return Err(bad("compression type bit set with compression type zlib"));
            }
            (1, false) => return Err(bad("compression type zstd without the incompatible bit")),
            (t, _) => {
                return Err(BlockError::unsupported(
                    path,
                    format!("compression type {t}"),
                ));
            }
        }
        if h.crypt_method != 0 {
            return Err(BlockError::unsupported(path, "encrypted images"));
        }
        if h.extended_l2() && cluster_bits < 14 {
            return Err(bad(
                "extended L2 entries need a cluster size of at least 16k",
            ));
        }
        if h.size > (1u64 << 62) {
            return Err(bad("virtual size is too large"));
        }
        // L1 table.
        let l1_bytes = h.l1_size as u64 * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(bad("Active L1 table too large"));
        }
        if (h.l1_size as u64) < h.l1_entries_for(h.size) {
            return Err(bad("L1 table is too small"));
        }
        if h.l1_size > 0 {
            if h.l1_table_offset % cs != 0 || h.l1_table_offset == 0 {
                return Err(bad("Active L1 table offset invalid"));
            }
            if h.l1_table_offset.saturating_add(l1_bytes) > file_len {
                return Err(bad("Active L1 table lies past the end of the file"));
            }
        }
        // Refcount table.
        let rt_bytes = h.refcount_table_clusters as u64 * cs;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(bad("Reference count table too large"));
        }
        if h.refcount_table_clusters == 0 {
            return Err(bad("image has no refcount table"));
        }
        if h.refcount_table_offset % cs != 0 || h.refcount_table_offset == 0 {
            return Err(bad(
                "Reference count table offset invalid (overlaps the header)",
            ));
        }
        if h.refcount_table_offset.saturating_add(rt_bytes) > file_len {
            return Err(bad("Reference count table lies past the end of the file"));
        }
        if h.l1_size > 0
            && h.l1_table_offset < h.refcount_table_offset + rt_bytes
            && h.refcount_table_offset < h.l1_table_offset + l1_bytes
        {
            return Err(bad("Active L1 table overlaps the refcount table"));
        }
        if h.nb_snapshots > 65536 {
            return Err(bad("Too many snapshots"));
        }
        if h.nb_snapshots > 0 && (h.snapshots_offset % cs != 0 || h.snapshots_offset == 0) {
            return Err(bad("Snapshot table offset invalid"));
        }
        // Header extensions (v3 after header_length; v2 after 72 bytes).
        let limit = (buf.len() as u64).min(cs) as usize;
        let ext_end = if backing_file_offset != 0 {
            (backing_file_offset as usize).min(limit)
        } else {
            limit
        };
        let mut off = h.header_length as usize;
        let mut seen = Vec::new();
        while off + 8 <= ext_end {
            let ty = be32(buf, off);
            let len = be32(buf, off + 4) as usize;
            off += 8;
            if ty == 0 {
                break;
            }
            if len > ext_end.saturating_sub(off) {
                return Err(bad("header extension runs past the header cluster"));
            }
            if seen.contains(&ty) {
                return Err(bad(&format!("duplicate header extension {ty:#x}")));
            }
            seen.push(ty);
            let data = buf[off..off + len].to_vec();
            if ty == EXT_BACKING_FORMAT {
                h.backing_format =
                    Some(String::from_utf8(data).map_err(|_| bad("backing format is not UTF-8"))?);
            } else {
                h.extensions.push((ty, data));
            }
            off += len.div_ceil(8) * 8;
        }
        if backing_file_offset != 0 {
            if backing_file_size > 1023
                || backing_file_offset.saturating_add(backing_file_size) > cs
                || backing_file_offset.saturating_add(backing_file_size) > buf.len() as u64
            {
                return Err(bad(
                    "Backing file name too long or outside the header cluster",
                ));
            }
            let s = &buf
                [backing_file_offset as usize..(backing_file_offset + backing_file_size) as usize];
            h.backing_file = Some(
                String::from_utf8(s.to_vec()).map_err(|_| bad("backing file name is not UTF-8"))?,
            );
        }
        Ok(h)
    }

    /// Serialise the header, its extensions and the backing name into one buffer for cluster 0.
    /// Fails if it does not fit in one cluster.
    pub fn serialize(&self) -> Result<Vec<u8>> {
        let mut b = vec![0u8; self.header_length as usize];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.version.to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[32..36].copy_from_slice(&self.crypt_method.to_be_bytes());
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        b[64..72].copy_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            b[72..80].copy_from_slice(&self.incompatible_features.to_be_bytes());
            b[80..88].copy_from_slice(&self.compatible_features.to_be_bytes());
            b[88..96].copy_from_slice(&self.autoclear_features.to_be_bytes());
            b[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
            b[100..104].copy_from_slice(&self.header_length.to_be_bytes());
            if self.header_length > 104 {
                b[104] = self.compression_type;
                let n = self
                    .extra_fields
                    .len()
                    .min(self.header_length as usize - 105);
                b[105..105 + n].copy_from_slice(&self.extra_fields[..n]);
            }
        }
        let push_ext = |b: &mut Vec<u8>, ty: u32, data: &[u8]| {
            b.extend_from_slice(&ty.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len().div_ceil(8) * 8, 0);
        };
        if let Some(fmt) = &self.backing_format {
            push_ext(&mut b, EXT_BACKING_FORMAT, fmt.as_bytes());
        }
        for (ty, data) in &self.extensions {
            push_ext(&mut b, *ty, data);
        }
        b.extend_from_slice(&[0u8; 8]);
        if let Some(name) = &self.backing_file {
            let off = b.len() as u64;
            b[8..16].copy_from_slice(&off.to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b.extend_from_slice(name.as_bytes());
        }
        if b.len() as u64 > self.cluster_size() {
            return Err(BlockError::InvalidArgument(
                "qcow2 header, extensions and backing file name do not fit in one cluster"
                    .to_string(),
            ));
        }
        Ok(b)
    }

    /// The feature name table QEMU writes into every image it creates (v3).
    pub fn default_feature_table() -> Vec<u8> {
        let names: [(u8, u8, &str); 8] = [
            (0, 0, "dirty bit"),
            (0, 1, "corrupt bit"),
            (0, 2, "external data file"),
            (0, 3, "compression type"),
            (0, 4, "extended L2 entries"),
            (1, 0, "lazy refcounts"),
            (2, 0, "bitmaps"),
            (2, 1, "raw external data"),
        ];
        let mut t = Vec::with_capacity(48 * names.len());
        for (ty, bit, name) in names {
            let mut e = [0u8; 48];
            e[0] = ty;
            e[1] = bit;
            e[2..2 + name.len()].copy_from_slice(name.as_bytes());
            t.extend_from_slice(&e);
        }
        t
    }
}
