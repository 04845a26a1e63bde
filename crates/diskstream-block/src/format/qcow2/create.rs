//! Creating qcow2 images with qemu-img's options and layout.
//!
//! The layout matches QEMU's: header in cluster 0, refcount table in cluster 1, the first
//! refcount block in cluster 2, the L1 table from cluster 3 on. The image is first written with
//! an empty L1, then opened with the normal driver, which grows the L1 through the same allocator
//! (and crash-safe flush) every later write uses.

use super::header::{self, Header};
use super::meta::OFLAG_COPIED;
use super::Qcow2;
use crate::error::{BlockError, Result};
use crate::node::BlockNode;
use crate::protocol::file::FileProtocol;
use crate::protocol::Protocol;
use std::path::Path;
use std::sync::Arc;

/// How much of the image to allocate up front.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Nothing beyond the metadata skeleton.
    #[default]
    Off,
    /// L2 tables and data clusters allocated (file holes read as zero).
    Metadata,
    /// As metadata, and the file space reserved with fallocate.
    Falloc,
    /// As metadata, and zeroes written over all data.
    Full,
}

impl std::str::FromStr for Preallocation {
    type Err = BlockError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(Preallocation::Off),
            "metadata" => Ok(Preallocation::Metadata),
            "falloc" => Ok(Preallocation::Falloc),
            "full" => Ok(Preallocation::Full),
            o => Err(BlockError::InvalidArgument(format!(
                "Invalid parameter '{o}' for preallocation (off, metadata, falloc, full)"
            ))),
        }
    }
}

/// Options of `create -f qcow2 -o ...`, with qemu-img's defaults.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size (power of two, 512 B .. 2 MiB). Default 64 KiB.
    pub cluster_size: u64,
    /// 2 for compat=0.10, 3 for compat=1.1 (default).
    pub version: u32,
    /// Set the lazy-refcounts compatible bit.
    pub lazy_refcounts: bool,
    /// Refcount width (1..64, power of two). Default 16.
    pub refcount_bits: u32,
    /// Use 128-bit L2 entries with subclusters.
    pub extended_l2: bool,
    /// Compression algorithm for compressed clusters.
    pub compression_type: header::CompressionType,
    /// Backing file name to record.
    pub backing_file: Option<String>,
    /// Backing format to record.
    pub backing_fmt: Option<String>,
    /// Preallocation mode.
    pub preallocation: Preallocation,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            version: 3,
            lazy_refcounts: false,
            refcount_bits: 16,
            extended_l2: false,
            compression_type: header::CompressionType::Zlib,
            backing_file: None,
            backing_fmt: None,
            preallocation: Preallocation::Off,
        }
    }
}

impl CreateOptions {
    /// Reject impossible combinations with qemu-img's wording where it has one.
    pub fn validate(&self) -> Result<()> {
        let inv = |m: &str| Err(BlockError::InvalidArgument(m.to_string()));
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return inv("Cluster size must be a power of two between 512 and 2048k");
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return inv("Refcount width must be a power of two and may not exceed 64 bits");
        }
        if self.version == 2 && self.refcount_bits != 16 {
            return inv("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)");
        }
        if self.version == 2 && self.lazy_refcounts {
            return inv("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)");
        }
        if self.version == 2 && self.extended_l2 {
            return inv("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)");
        }
        if self.version == 2 && self.compression_type != header::CompressionType::Zlib {
            return inv("Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)");
        }
        if self.extended_l2 && cs < 16384 {
            return inv(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            );
        }
        if self.size % 512 != 0 {
            return inv("Image size must be a multiple of 512 bytes");
        }
        if self.backing_fmt.is_some() && self.backing_file.is_none() {
            return inv("Backing format cannot be used without backing file");
        }
        if self.preallocation != Preallocation::Off
            && self.backing_file.is_some()
            && !self.extended_l2
        {
            return inv("Backing file and preallocation can only be used at the same time if extended_l2 is on");
        }
        Ok(())
    }
}

/// Create a qcow2 image at `path` (truncating an existing file).
pub async fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    opts.validate()?;
    let file: Arc<dyn Protocol> = Arc::new(FileProtocol::create(path)?);
    create_on(file, opts).await
}

/// Create a qcow2 image on an empty protocol.
pub async fn create_on(file: Arc<dyn Protocol>, opts: &CreateOptions) -> Result<()> {
    opts.validate()?;
    let cs = opts.cluster_size;
    let cluster_bits = cs.trailing_zeros();
    let mut incompat = 0;
    if opts.extended_l2 {
        incompat |= header::INCOMPAT_EXTL2;
    }
    if opts.compression_type == header::CompressionType::Zstd {
        incompat |= header::INCOMPAT_COMPRESSION;
    }
    let v3 = opts.version >= 3;
    let h = Header {
        version: opts.version,
        cluster_bits,
        size: 0,
        crypt_method: 0,
        l1_size: 0,
        l1_table_offset: 3 * cs,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: incompat,
        compatible_features: if opts.lazy_refcounts {
            header::COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: 0,
        refcount_order: opts.refcount_bits.trailing_zeros(),
        header_length: if v3 { 112 } else { 72 },
        compression_type: if opts.compression_type == header::CompressionType::Zstd {
            1
        } else {
            0
        },
        extra_fields: if v3 { vec![0u8; 7] } else { Vec::new() },
        backing_file: opts.backing_file.clone(),
        backing_format: opts.backing_fmt.clone(),
        // qemu-img 10 writes the feature-name table only with clusters of 8 KiB and more (with
        // smaller ones it would crowd out the backing file name); we do the same, byte for byte.
        extensions: if v3 && cs >= 8192 {
            vec![(header::EXT_FEATURE_TABLE, Header::default_feature_table())]
        } else {
            Vec::new()
        },
    };
    let mut hbuf = h.serialize()?;
    hbuf.resize(cs as usize, 0);
    // Refcount table with one block; the block counts clusters 0..=2.
    let mut rt = vec![0u8; cs as usize];
    rt[0..8].copy_from_slice(&(2 * cs).to_be_bytes());
    let mut rb = vec![0u8; cs as usize];
    for c in 0..3u64 {
        set_rc_raw(&mut rb, h.refcount_order, c, 1);
    }
    let mut img = hbuf;
    img.extend_from_slice(&rt);
    img.extend_from_slice(&rb);
    file.write_vec(0, img).await?;
    file.flush().await?;
    // Grow to the requested size through the normal driver.
    let q = Qcow2::open(Arc::clone(&file)).await?;
    q.truncate(opts.size).await?;
    if opts.preallocation != Preallocation::Off {
        preallocate(&q, opts.preallocation).await?;
    }
    q.close().await
}

fn set_rc_raw(data: &mut [u8], order: u32, i: u64, v: u64) {
    let bits = 1u64 << order;
    let bit = i * bits;
    match bits {
        8 | 16 | 32 | 64 => {
            let w = (bits / 8) as usize;
            let o = (bit / 8) as usize;
            let bytes = v.to_be_bytes();
            data[o..o + w].copy_from_slice(&bytes[8 - w..]);
        }
        _ => {
            let mask = ((1u64 << bits) - 1) as u8;
            data[(bit / 8) as usize] |= ((v as u8) & mask) << (bit % 8);
        }
    }
}

/// Allocate every data cluster (and L2 table) of a fresh image, laid out as qemu-img does.
///
/// * `metadata`: QEMU's `preallocate_co`: L2 table then data clusters, L2 table by L2 table,
///   through the normal allocator; the file is extended to the end of the last data
///   subcluster (cluster without extended L2).
/// * `falloc`/`full`: QEMU's truncate path: a new refcount table (and any missing refcount
///   blocks) after the existing metadata, sized for the data plus its L2 tables, then all data
///   clusters in one run behind it (reserved with fallocate, or written with zeroes), then the
///   L2 tables through the normal allocator (the first one reuses the freed old refcount
///   table's cluster).
///
/// As with QEMU, preallocated clusters of extended-L2 images keep an empty subcluster bitmap.
async fn preallocate(q: &Qcow2, mode: Preallocation) -> Result<()> {
    let cs = q.cs();
    let size = q.size();
    let clusters = size.div_ceil(cs);
    let mut m = q.lock_writable().await?;
    let per_l2 = m.header.l2_entries();
    if mode == Preallocation::Metadata {
        let sub = if q.extended { cs / 32 } else { cs };
        let mut gc = 0;
        while gc < clusters {
            let n = (clusters - gc).min(per_l2 - gc % per_l2);
            m.l2_prepare(gc).await?;
            let host = m.alloc_clusters(n).await?;
            for i in 0..n {
                m.l2_set(gc + i, (host + i * cs) | OFLAG_COPIED, 0).await?;
            }
            let used = (size - gc * cs).min(n * cs).div_ceil(sub) * sub;
            if host + used > q.file.len().await? {
                q.file.set_len(host + used).await?;
            }
            gc += n;
        }
        return m.flush().await;
    }
    // The last cluster any metadata occupies (QEMU's qcow2_get_last_cluster).
    let file_clusters = q.file.len().await?.div_ceil(cs);
    let mut old_end = 0;
    for c in (0..file_clusters).rev() {
        if m.refcount(c).await? != 0 {
            old_end = c + 1;
            break;
        }
    }
    let l2_tables = clusters.div_ceil(per_l2) + 1;
    let start = m.refcount_area(old_end, clusters + l2_tables).await?;
    for c in start..start + clusters {
        m.set_refcount(c, 1).await?;
    }
    // Write the new refcount structures and free the old table, as QEMU does before it links
    // the data clusters in.
    m.flush().await?;
    let (host, len) = (start * cs, clusters * cs);
    match mode {
        Preallocation::Falloc => q.file.allocate(host, len).await?,
        _ => {
            let zeroes = vec![0u8; (len.min(1 << 20)) as usize];
            let mut pos = 0;
            while pos < len {
                let n = (len - pos).min(zeroes.len() as u64) as usize;
                q.file.write_at(host + pos, &zeroes[..n]).await?;
                pos += n as u64;
            }
        }
    }
    for gc in 0..clusters {
        m.l2_set(gc, (host + gc * cs) | OFLAG_COPIED, 0).await?;
    }
    m.flush().await
}
