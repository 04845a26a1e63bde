//! The block node: one layer of a device's graph (a format driver over a protocol).
//!
//! Every front end (CLI, NBD, QMP jobs) talks to nodes through [`BlockNode`]. A node answers reads
//! for its whole virtual size, deferring ranges it does not allocate to its backing node (and
//! reading zeroes past the backing's end). [`BlockNode::block_status`] describes one layer only;
//! [`crate::status`] composes layers into the chain-wide mapping that `map`, streaming and NBD
//! block status all use.

use crate::error::{BlockError, Result};
use async_trait::async_trait;
use std::any::Any;
use std::sync::Arc;

/// How one layer backs a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocation {
    /// This layer holds data for the range.
    Data,
    /// This layer says the range reads as zeroes (zero cluster, hole in a raw file).
    Zero,
    /// This layer does not describe the range: read it from the backing node.
    Unallocated,
}

/// The answer of [`BlockNode::block_status`] for a prefix of the asked range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerStatus {
    /// What this layer says about the prefix.
    pub alloc: Allocation,
    /// Length of the prefix (at least 1 byte, at most the asked length).
    pub len: u64,
    /// Where the prefix lives in this layer's protocol, if it has a fixed place.
    pub host_offset: Option<u64>,
    /// Whether the data is stored compressed (then `host_offset` is `None`).
    pub compressed: bool,
    /// Whether the range is known to read as zeroes: always for [`Allocation::Zero`], and for
    /// [`Allocation::Data`] whose stored bytes are a hole of the protocol (metadata
    /// preallocation). QEMU reports the latter as `data: true, zero: true`; copies can skip it.
    pub zero: bool,
}

/// What an image records about the format of its backing file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackingFormatHint {
    /// The format is named (qcow2's backing-format extension, QED's raw flag).
    Named(String),
    /// Nothing is recorded: only the user can say (formats are never guessed).
    Unrecorded,
    /// The image says the backing file is *not* raw without naming the format (a QED image
    /// without the no-probe flag; QEMU probes it). Only the image formats, recognised by their
    /// magic, are then accepted, so a raw disk is never interpreted.
    NotRaw,
}

/// The backing file link an image records in its header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingLink {
    /// The backing file name as recorded (relative to the image's directory unless absolute
    /// or a URL).
    pub name: String,
    /// What is recorded about its format.
    pub format: BackingFormatHint,
}

/// A layer of a block graph; shared as `Arc<dyn BlockNode>`.
#[async_trait]
pub trait BlockNode: Send + Sync + 'static {
    /// Driver name as QEMU spells it ("qcow2", "raw").
    fn format_name(&self) -> &'static str;
    /// The image's file name (as opened).
    fn filename(&self) -> &str;
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// The backing node, if any.
    fn backing(&self) -> Option<Arc<dyn BlockNode>>;
    /// Whether this layer's own data is reached over a network (see
    /// [`crate::protocol::Protocol::remote`]); the backing chain is not included.
    fn remote(&self) -> bool {
        false
    }
    /// Allocation granularity of the layer (cluster size), if it has one.
    fn cluster_size(&self) -> Option<u64> {
        None
    }
    /// The smallest range this layer allocates on its own: the subcluster with qcow2's extended
    /// L2 entries, else the cluster. Copy-on-read widens its copies to this unit, so a copy
    /// fills whole units and the driver never has to merge it with backing data itself.
    fn allocation_unit(&self) -> Option<u64> {
        self.cluster_size()
    }
    /// Whether this layer can store copied backing data per cluster, i.e. whether
    /// [`BlockNode::write_if_unallocated`] does anything (qcow2). Raw images allocate
    /// everything and have no backing file: there is nothing to populate.
    fn can_populate(&self) -> bool {
        false
    }
    /// Read `buf.len()` bytes at `offset` (through the backing chain as needed).
    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Read `len` bytes at `offset` and append them to `buf`, handing the buffer back: the
    /// copy-free read for callers that send the buffer as it is (an NBD reply, header first).
    /// Drivers whose request maps to one protocol range override it to have the protocol read
    /// straight into the buffer ([`crate::protocol::Protocol::read_append`]); the default
    /// zero-fills the new bytes and calls [`BlockNode::read`].
    async fn read_append(&self, offset: u64, mut buf: Vec<u8>, len: usize) -> Result<Vec<u8>> {
        let at = buf.len();
        buf.resize(at + len, 0);
        self.read(offset, &mut buf[at..]).await?;
        Ok(buf)
    }
    /// `[offset, offset+len)` of this node as one range of a local file that the page cache
    /// holds now, when the node stores the whole range there as plain data (no backing file,
    /// no compression, no zeroes, no filter in between); else `None`, and the caller reads as
    /// usual. Lets the NBD server send cached data with `sendfile` (one copy fewer). The slice
    /// is what [`BlockNode::read_append`] would read at this moment: like a read, it races
    /// only with writes the client issued concurrently to the same range.
    async fn resident_slice(
        &self,
        _offset: u64,
        _len: u64,
    ) -> Result<Option<crate::protocol::FileSlice>> {
        Ok(None)
    }
    /// Write `data` at `offset`.
    async fn write(&self, offset: u64, data: &[u8]) -> Result<()>;
    /// Write an owned buffer and hand it back for reuse. Bulk copies (mirror, commit) use it
    /// so that a driver which can write from the buffer as it is (qcow2 and raw over a file)
    /// neither copies nor reallocates the data; the default borrows it for [`BlockNode::write`].
    async fn write_owned(&self, offset: u64, data: Vec<u8>) -> Result<Vec<u8>> {
        self.write(offset, &data).await?;
        Ok(data)
    }
    /// Make a range read as zeroes; `unmap` allows deallocating it.
    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()>;
    /// Discard a range (guest contents afterwards: zero or unchanged, per the format's rules).
    async fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Make every completed write durable, metadata included.
    async fn flush(&self) -> Result<()>;
    /// Copy-on-read population: write `data` at `offset`, but only over the parts that this
    /// layer does not allocate at the moment the write is decided; allocated parts (a guest
    /// write that landed first, a zero cluster) are left untouched. Returns the bytes written.
    ///
    /// Streaming and copy-on-read copy bytes that are already the guest-visible content (read
    /// through the backing chain), so a copy must never replace newer data. The decision is
    /// taken per cluster under the driver's metadata lock, after waiting for in-flight
    /// allocations of the same cluster: a concurrent guest write either committed first (the
    /// copy skips the cluster) or waits for the copy's allocation to commit and then overwrites
    /// it. Layers that allocate everything (raw) write nothing.
    async fn write_if_unallocated(&self, offset: u64, data: &[u8]) -> Result<u64> {
        check_bounds(offset, data.len() as u64, self.size())?;
        Ok(0)
    }
    /// [`BlockNode::write_if_unallocated`] of an owned buffer, handed back with the bytes
    /// written: bulk copies (stream) use it so that a driver which writes from the buffer as
    /// it is (qcow2 over a file) does not copy the data first; the default borrows it.
    async fn write_if_unallocated_owned(
        &self,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<(u64, Vec<u8>)> {
        let n = self.write_if_unallocated(offset, &data).await?;
        Ok((n, data))
    }
    /// Like [`BlockNode::write_if_unallocated`] for a range that reads as zeroes: marks the
    /// still-unallocated parts as zero (zero clusters where the format has them, so nothing is
    /// stored). Returns the bytes marked.
    async fn zero_if_unallocated(&self, offset: u64, len: u64) -> Result<u64> {
        check_bounds(offset, len, self.size())?;
        Ok(0)
    }
    /// Describe how this layer (alone) backs a prefix of `[offset, offset+len)`.
    async fn block_status(&self, offset: u64, len: u64) -> Result<LayerStatus>;
    /// Change the virtual size.
    async fn truncate(&self, size: u64) -> Result<()>;
    /// Flush and release the node cleanly (clears dirty state). Further I/O is an error.
    async fn close(&self) -> Result<()>;
    /// The backing file link recorded in the image, for formats that have one. Chain opening
    /// ([`crate::image`]) follows it; formats without backing files return `None`.
    async fn backing_link(&self) -> Option<BackingLink> {
        None
    }
    /// Attach (or detach) the opened backing node. The caller owns the chain policy (which
    /// file, which format); formats without backing files ignore it.
    fn set_backing_node(&self, _node: Option<Arc<dyn BlockNode>>) {}
    /// Rewrite the backing file name and format recorded in the image (`None` drops the link),
    /// flushing before and after so a crash never leaves a header that references less (or
    /// other) data than the clusters on disk assume. This is how streaming and `rebase` change
    /// the chain for every format; formats without backing files can only drop a link they do
    /// not have.
    async fn set_backing_file(&self, file: Option<(String, Option<String>)>) -> Result<()> {
        match file {
            None => Ok(()),
            Some(_) => Err(BlockError::unsupported(
                self.filename(),
                format!("the {} format has no backing file", self.format_name()),
            )),
        }
    }
    /// Downcast hook for driver-specific operations (qcow2 check, compressed writes).
    fn as_any(&self) -> &dyn Any;
}

/// Whether two handles name the same node. Compares data pointers only: `Arc::ptr_eq` on
/// trait objects also compares vtable pointers, which may differ for one object across
/// codegen units.
pub fn same_node(a: &Arc<dyn BlockNode>, b: &Arc<dyn BlockNode>) -> bool {
    std::ptr::eq(Arc::as_ptr(a) as *const (), Arc::as_ptr(b) as *const ())
}

/// Check that `[offset, offset+len)` lies inside a device of `size` bytes.
pub fn check_bounds(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfBounds { offset, len, size }),
    }
}

/// Read from a backing node that may be shorter than the overlay: bytes past its end are zero.
pub async fn read_backing(
    backing: Option<&Arc<dyn BlockNode>>,
    offset: u64,
    buf: &mut [u8],
) -> Result<()> {
    let Some(b) = backing else {
        buf.fill(0);
        return Ok(());
    };
    let bsize = b.size();
    let avail = bsize.saturating_sub(offset).min(buf.len() as u64) as usize;
    if avail > 0 {
        b.read(offset, &mut buf[..avail]).await?;
    }
    buf[avail..].fill(0);
    Ok(())
}
