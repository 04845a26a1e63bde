//! `amend`: changing qcow2 header options of an existing image in place (what `qemu-img amend`
//! does for `compat`, `lazy_refcounts` and `refcount_bits`).
//!
//! Everything that could make the change fail is checked before anything is written, so a
//! refused amend leaves the image byte-identical. The changes follow QEMU 10's order and
//! results: an upgrade to v3 rewrites the header as v3 (feature-name table added); a downgrade
//! to v2 is refused for refcount widths other than 16, external data files, incompatible
//! features other than the compression type, internal snapshots, and zstd images holding
//! compressed clusters; otherwise zero clusters are expanded as QEMU expands them (a plain zero
//! cluster of an image without backing file becomes unallocated, one with a backing file gets a
//! zeroed data cluster, a preallocated zero cluster is zeroed on disk and becomes data), then
//! compatible and autoclear features are dropped and the header is rewritten as v2. A new
//! refcount width rebuilds the refcount structure (laid out as a `check -r all` rebuild; QEMU
//! places it differently, with the same counts).

use super::header::{
    self, Header, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY,
};
use super::meta::{Meta, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use super::{check, Qcow2};
use crate::error::{BlockError, Result};
use crate::node::BlockNode;
use std::sync::Arc;

/// The header options an amend may change; `None` keeps the current value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AmendOptions {
    /// Target version: 2 (`compat=0.10`) or 3 (`compat=1.1`).
    pub version: Option<u32>,
    /// Lazy refcounts on or off (v3 only).
    pub lazy_refcounts: Option<bool>,
    /// Refcount width in bits (a power of two up to 64; other than 16 needs v3).
    pub refcount_bits: Option<u32>,
}

impl Qcow2 {
    /// Check that `opts` can be applied to this image, without writing anything. The messages
    /// are QEMU's where it has one.
    pub async fn amend_check(&self, opts: &AmendOptions) -> Result<()> {
        let h = self.header().await;
        let new_version = opts.version.unwrap_or(h.version);
        if new_version != 2 && new_version != 3 {
            return Err(BlockError::InvalidArgument(format!(
                "Unknown compatibility level {new_version}"
            )));
        }
        if opts.lazy_refcounts == Some(true) && new_version < 3 {
            return Err(BlockError::InvalidArgument(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use \
                 compat=1.1 or greater)"
                    .to_string(),
            ));
        }
        let new_order = match opts.refcount_bits {
            Some(b) if b.is_power_of_two() && b <= 64 => b.trailing_zeros(),
            Some(_) => {
                return Err(BlockError::InvalidArgument(
                    "Refcount width must be a power of two and may be at most 64 bits".to_string(),
                ))
            }
            None => h.refcount_order,
        };
        if opts.refcount_bits.is_some() && new_order != 4 && new_version < 3 {
            return Err(BlockError::InvalidArgument(
                "Refcount widths other than 16 bits require compatibility level 1.1 or \
                 above (use compat=1.1 or greater)"
                    .to_string(),
            ));
        }
        if new_version != h.version && h.nb_snapshots > 0 {
            return Err(BlockError::InvalidArgument(
                "changing the compatibility level of an image with internal snapshots is not \
                 supported"
                    .to_string(),
            ));
        }
        if new_version < h.version {
            if new_order != 4 {
                return Err(BlockError::InvalidArgument(
                    "compat=0.10 requires refcount_bits=16".to_string(),
                ));
            }
            if h.incompatible_features & INCOMPAT_DATA_FILE != 0 {
                return Err(BlockError::InvalidArgument(
                    "Cannot downgrade an image with a data file".to_string(),
                ));
            }
            let left = h.incompatible_features & !(INCOMPAT_COMPRESSION | INCOMPAT_DIRTY);
            if left != 0 {
                return Err(BlockError::InvalidArgument(format!(
                    "Cannot downgrade an image with incompatible features {left:#x} set"
                )));
            }
            if h.compression_type != 0 && self.has_compressed_clusters().await? {
                return Err(BlockError::InvalidArgument(
                    "Cannot downgrade an image with zstd compression type and existing \
                     compressed clusters"
                        .to_string(),
                ));
            }
        }
        Ok(())
    }

    /// Apply `opts` (after [`Qcow2::amend_check`], which it repeats): upgrade first, then lazy
    /// refcounts, downgrade last, as QEMU orders them. Flushes the image.
    pub async fn amend(&self, opts: &AmendOptions) -> Result<()> {
        self.amend_check(opts).await?;
        let cur = self.header().await;
        let new_version = opts.version.unwrap_or(cur.version);
        if new_version > cur.version {
            self.rewrite_header(|h| {
                h.version = 3;
                h.header_length = 112;
                h.refcount_order = 4;
                h.compression_type = 0;
                h.extra_fields = vec![0u8; 7];
                if h.cluster_size() >= 8192
                    && !h
                        .extensions
                        .iter()
                        .any(|(t, _)| *t == header::EXT_FEATURE_TABLE)
                {
                    h.extensions.insert(
                        0,
                        (header::EXT_FEATURE_TABLE, Header::default_feature_table()),
                    );
                }
            })
            .await?;
        }
        if let Some(bits) = opts.refcount_bits {
            if bits != 1 << cur.refcount_order {
                self.change_refcount_width(bits.trailing_zeros()).await?;
            }
        }
        if let Some(lazy) = opts.lazy_refcounts {
            let on = cur.compatible_features & COMPAT_LAZY_REFCOUNTS != 0;
            if lazy != on {
                self.rewrite_header(|h| {
                    if lazy {
                        h.compatible_features |= COMPAT_LAZY_REFCOUNTS;
                    } else {
                        h.compatible_features &= !COMPAT_LAZY_REFCOUNTS;
                    }
                })
                .await?;
            }
        }
        if new_version < cur.version {
            self.expand_zero_clusters().await?;
            self.rewrite_header(|h| {
                h.version = 2;
                h.header_length = 72;
                h.incompatible_features = 0;
                h.compatible_features = 0;
                h.autoclear_features = 0;
                h.refcount_order = 4;
                h.compression_type = 0;
                h.extra_fields.clear();
                h.extensions
                    .retain(|(t, _)| *t != header::EXT_FEATURE_TABLE);
            })
            .await?;
        }
        Ok(())
    }

    /// Rebuild the refcount structure with `1 << order`-bit entries (see
    /// [`check::change_refcount_order`]) and reload the metadata from the new header.
    async fn change_refcount_width(&self, order: u32) -> Result<()> {
        let mut m = self.lock_writable().await?;
        m.flush().await?;
        check::change_refcount_order(Arc::clone(&self.file), order).await?;
        let file_len = self.file.len().await?;
        let head = self
            .file
            .read_vec(0, file_len.min(1 << header::MAX_CLUSTER_BITS) as usize)
            .await?;
        let h = Header::parse(self.file.name(), &head, file_len)?;
        *m = Meta::load(h, Arc::clone(&self.file)).await?;
        Ok(())
    }

    /// Flush, change the in-memory header with `f`, and rewrite the header cluster (zeroing
    /// what the old, longer header occupied, as QEMU rewrites the whole cluster).
    async fn rewrite_header(&self, f: impl FnOnce(&mut Header)) -> Result<()> {
        let mut m = self.lock_writable().await?;
        m.flush().await?;
        let old_len = m.header.serialize()?.len();
        let mut h = m.header.clone();
        f(&mut h);
        let new_len = h.serialize()?.len();
        m.header = h;
        m.write_header().await?;
        if new_len < old_len {
            self.file
                .write_vec(new_len as u64, vec![0u8; old_len - new_len])
                .await?;
        }
        m.flush().await?;
        self.file.flush().await
    }

    /// Whether any L2 entry of the active table maps a compressed cluster.
    async fn has_compressed_clusters(&self) -> Result<bool> {
        let mut m = self.meta.lock().await;
        let mut found = false;
        self.for_each_l2_entry(&mut m, |_, e| {
            found |= e & OFLAG_COMPRESSED != 0;
            None
        })
        .await?;
        Ok(found)
    }

    /// Visit the entries of every allocated L2 table of the active L1 table, stopping at the
    /// image size; `f(guest cluster, entry)` returns a replacement entry or `None`.
    async fn for_each_l2_entry(
        &self,
        m: &mut Meta,
        mut f: impl FnMut(u64, u64) -> Option<u64>,
    ) -> Result<Vec<(u64, u64)>> {
        let per_l2 = m.header.l2_entries();
        let clusters = self.size().div_ceil(self.cs());
        let mut changes = Vec::new();
        for l1i in 0..m.l1.len() {
            if m.l2_offset(l1i)? == 0 {
                continue;
            }
            let first = l1i as u64 * per_l2;
            for gc in first..(first + per_l2).min(clusters) {
                let (e, _) = m.l2_get(gc).await?;
                if let Some(new) = f(gc, e) {
                    changes.push((gc, new));
                }
            }
        }
        Ok(changes)
    }

    /// QEMU's `qcow2_expand_zero_clusters` on the active L1 table (v3 without subclusters).
    async fn expand_zero_clusters(&self) -> Result<()> {
        let cs = self.cs();
        let backed = self.header().await.backing_file.is_some();
        let mut m = self.lock_writable().await?;
        let zeros = self
            .for_each_l2_entry(&mut m, |_, e| {
                (e & OFLAG_ZERO != 0 && e & OFLAG_COMPRESSED == 0).then_some(e)
            })
            .await?;
        for (gc, e) in zeros {
            let mut host = e & OFFSET_MASK;
            if host == 0 {
                if !backed {
                    m.l2_set(gc, 0, 0).await?;
                    continue;
                }
                host = m.alloc_clusters(1).await?;
            }
            self.file.write_zeroes(host, cs, false).await?;
            let copied = if m.refcount(host / cs).await? == 1 {
                OFLAG_COPIED
            } else {
                0
            };
            m.l2_set(gc, host | copied, 0).await?;
        }
        m.flush().await
    }
}
