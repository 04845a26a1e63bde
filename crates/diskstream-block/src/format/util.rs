//! Small helpers the format drivers share.

use crate::error::Result;
use crate::node::BlockNode;

/// Write zeroes as data over `[offset, offset+len)` in chunks of at most 1 MiB, with
/// [`BlockNode::write`], or with [`BlockNode::write_if_unallocated`] when `only_unallocated`
/// (copy-on-read population of a zero range). Used for the partial clusters of a zeroing
/// request, which cannot become zero clusters. Returns the bytes written.
pub async fn write_zero_data(
    node: &dyn BlockNode,
    offset: u64,
    len: u64,
    only_unallocated: bool,
) -> Result<u64> {
    let chunk = len.min(1 << 20);
    let zeroes = vec![0u8; chunk as usize];
    let mut pos = 0;
    let mut written = 0;
    while pos < len {
        let n = (len - pos).min(chunk);
        let buf = &zeroes[..n as usize];
        written += if only_unallocated {
            node.write_if_unallocated(offset + pos, buf).await?
        } else {
            node.write(offset + pos, buf).await?;
            n
        };
        pos += n;
    }
    Ok(written)
}
