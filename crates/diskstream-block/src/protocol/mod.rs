//! Protocol drivers: bytes at offsets in some storage (a local file now; NBD and HTTP later).
//!
//! A protocol knows nothing about image formats. Format drivers (raw, qcow2) sit on top of one
//! protocol each and translate guest offsets into protocol ("host") offsets.

pub mod crash;
pub use file::FileSlice;
pub mod file;
pub mod mem;

use crate::error::Result;
use async_trait::async_trait;

/// Events a format driver announces to its protocol, so that a debugging protocol (QEMU's
/// `blkdebug` equivalent, used to inject errors in tests) can tie failures to them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DebugEvent {
    /// A guest data read is about to be issued (QEMU's `read_aio`).
    ReadAio,
    /// A guest data write is about to be issued (QEMU's `write_aio`).
    WriteAio,
}

/// Byte-addressed storage under a format driver.
///
/// Buffers are owned (`Vec<u8>`) at this level because the I/O may run on another thread; the
/// borrowed helpers copy. Reads past the end of the storage return zeroes, which is what every
/// format expects of a file that was not extended yet.
#[async_trait]
pub trait Protocol: Send + Sync {
    /// A printable name for messages (the file path).
    fn name(&self) -> &str;
    /// Whether the storage was opened read-only.
    fn read_only(&self) -> bool;
    /// Whether the storage is reached over a network (NBD, HTTP): its requests mostly wait,
    /// so jobs keep many of them in flight even while a guest is busy (local copies compete
    /// with the guest for CPUs and disks, remote ones mostly do not).
    fn remote(&self) -> bool {
        false
    }
    /// Read `len` bytes at `offset`; bytes past the end read as zero.
    async fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>>;
    /// Write `data` at `offset`, extending the storage if needed.
    async fn write_vec(&self, offset: u64, data: Vec<u8>) -> Result<()>;
    /// Make `len` bytes at `offset` read as zero, deallocating them if `unmap` allows.
    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()>;
    /// Hint that `len` bytes at `offset` are unused; contents afterwards are zero on a file.
    async fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Make every completed write durable.
    async fn flush(&self) -> Result<()>;
    /// Current length of the storage.
    async fn len(&self) -> Result<u64>;
    /// Whether the storage holds no bytes at all.
    async fn is_empty(&self) -> Result<bool> {
        Ok(self.len().await? == 0)
    }
    /// Bytes the storage really occupies (a sparse file's allocated blocks), when known. Used
    /// like QEMU to tell a metadata-preallocated image (far less allocated than referenced).
    async fn allocated_bytes(&self) -> Result<Option<u64>> {
        Ok(None)
    }
    /// Set the length of the storage (truncate or extend with zeroes).
    async fn set_len(&self, len: u64) -> Result<()>;
    /// Preallocate `len` bytes at `offset` (fallocate); storage that cannot may write zeroes.
    async fn allocate(&self, offset: u64, len: u64) -> Result<()>;
    /// Whether the range starting at `offset` holds data (true) or is a hole (false), and for how
    /// many bytes (at most `len`) that answer holds.
    async fn data_status(&self, offset: u64, len: u64) -> Result<(bool, u64)>;

    /// Announce a driver event (see [`DebugEvent`]); ordinary storage ignores it.
    fn debug_event(&self, _event: DebugEvent) {}

    /// `[offset, offset+len)` as a range of a local file whose pages the page cache holds
    /// right now, or `None`. A front end that sends reads to a socket (the NBD server) can
    /// then have the kernel send those pages (`sendfile`) instead of copying them out and back
    /// in. Only a plain local file answers; wrappers that watch or alter reads (blkdebug, the
    /// crash simulator) keep the default, so their reads take the ordinary path. Must not
    /// block: the check runs on the caller's thread.
    fn resident_slice(&self, _offset: u64, _len: u64) -> Option<FileSlice> {
        None
    }

    /// Read `len` bytes at `offset` and append them to `buf`, handing the buffer back. This is
    /// the copy-free read: a driver that owns its I/O (the file protocol) reads straight into
    /// the buffer's spare capacity, so a caller that sends the buffer as it is (an NBD reply:
    /// header, then data) neither copies nor zero-fills the data. The default copies from
    /// [`Protocol::read_vec`].
    async fn read_append(&self, offset: u64, mut buf: Vec<u8>, len: usize) -> Result<Vec<u8>> {
        let v = self.read_vec(offset, len).await?;
        buf.extend_from_slice(&v);
        Ok(buf)
    }

    /// Read into a borrowed buffer (copies from the owned read).
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let v = self.read_vec(offset, buf.len()).await?;
        buf.copy_from_slice(&v);
        Ok(())
    }

    /// Write the byte ranges `ranges` of `buf` back to back at `offset`, followed by
    /// `zero_tail` zero bytes, and hand the buffer back for reuse. A gathered write: pieces
    /// that lie apart in memory but belong next to each other in the storage (bulk copies
    /// produce these) go out in one request without being copied together first. The default
    /// copies them into one buffer and calls [`Protocol::write_vec`].
    async fn write_gather(
        &self,
        offset: u64,
        buf: Vec<u8>,
        ranges: Vec<std::ops::Range<usize>>,
        zero_tail: usize,
    ) -> Result<Vec<u8>> {
        let total = ranges.iter().map(|r| r.len()).sum::<usize>() + zero_tail;
        let mut v = Vec::with_capacity(total);
        for r in ranges {
            v.extend_from_slice(&buf[r]);
        }
        v.resize(total, 0);
        self.write_vec(offset, v).await?;
        Ok(buf)
    }

    /// Write a borrowed buffer (copies into an owned write).
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_vec(offset, data.to_vec()).await
    }
}
