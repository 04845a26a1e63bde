//! Chain-wide mapping: which layer of a backing chain provides each byte, and how.
//!
//! This is the query at the heart of the block layer: `img map`, NBD `base:allocation` and
//! `qemu:allocation-depth`, streaming (copy what the top does not allocate) and mirroring all ask
//! it. The output matches `qemu-img map --output=json` field for field.

use crate::error::Result;
use crate::node::{same_node, Allocation, BlockNode};
use serde::Serialize;
use std::sync::Arc;

/// One extent of the chain-wide mapping, in `qemu-img map --output=json` terms.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapExtent {
    /// Guest offset of the extent.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Layers descended from the top (0 = top) to the layer that describes the extent; for
    /// unallocated extents the deepest layer that covers the offset.
    pub depth: u32,
    /// Whether some layer allocates the extent (false: reads as zero, nothing stored).
    pub present: bool,
    /// Whether the extent reads as zeroes.
    pub zero: bool,
    /// Whether the extent is backed by stored data.
    pub data: bool,
    /// Whether the data is compressed.
    pub compressed: bool,
    /// Host offset in the file of the layer at `depth`, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

impl MapExtent {
    /// Whether `next` continues this extent (same attributes, contiguous host offsets).
    pub fn can_merge(&self, next: &MapExtent) -> bool {
        self.start + self.length == next.start
            && self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }
}

/// Describe a prefix of `[offset, offset+len)` of `top` through its whole backing chain.
pub async fn map_extent(top: &Arc<dyn BlockNode>, offset: u64, len: u64) -> Result<MapExtent> {
    let mut node = Arc::clone(top);
    let mut depth = 0u32;
    let mut len = len;
    loop {
        let st = node.block_status(offset, len).await?;
        len = st.len;
        match st.alloc {
            Allocation::Data | Allocation::Zero => {
                return Ok(MapExtent {
                    start: offset,
                    length: len,
                    depth,
                    present: true,
                    zero: st.zero,
                    data: st.alloc == Allocation::Data,
                    compressed: st.compressed,
                    offset: st.host_offset,
                });
            }
            Allocation::Unallocated => match node.backing() {
                Some(b) if offset < b.size() => {
                    len = len.min(b.size() - offset);
                    node = b;
                    depth += 1;
                }
                _ => {
                    return Ok(MapExtent {
                        start: offset,
                        length: len,
                        depth,
                        present: false,
                        zero: true,
                        data: false,
                        compressed: false,
                        // Where the layer would store it (an unallocated subcluster of an
                        // allocated qcow2 cluster), as qemu-img map shows.
                        offset: st.host_offset,
                    });
                }
            },
        }
    }
}

/// The merged mapping of `[offset, offset+len)`, as `qemu-img map` prints it.
pub async fn map_range(top: &Arc<dyn BlockNode>, offset: u64, len: u64) -> Result<Vec<MapExtent>> {
    let mut out: Vec<MapExtent> = Vec::new();
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let e = map_extent(top, pos, end - pos).await?;
        pos += e.length;
        match out.last_mut() {
            Some(last) if last.can_merge(&e) => last.length += e.length,
            _ => out.push(e),
        }
    }
    Ok(out)
}

/// Whether `[offset, offset+len)` is allocated in `top` or in any layer above `base` (exclusive),
/// returning the answer for a prefix and its length. `base = None` means the whole chain. This is
/// the question streaming asks: "must this range be copied into the top?".
pub async fn allocated_above(
    top: &Arc<dyn BlockNode>,
    base: Option<&Arc<dyn BlockNode>>,
    offset: u64,
    len: u64,
) -> Result<(bool, u64)> {
    let mut node = Arc::clone(top);
    let mut len = len;
    let mut first = true;
    loop {
        if let Some(b) = base {
            if !first && same_node(&node, b) {
                return Ok((false, len));
            }
        }
        first = false;
        let st = node.block_status(offset, len).await?;
        len = st.len;
        if st.alloc != Allocation::Unallocated {
            return Ok((true, len));
        }
        match node.backing() {
            Some(b) if offset < b.size() => {
                len = len.min(b.size() - offset);
                node = b;
            }
            _ => return Ok((false, len)),
        }
    }
}
