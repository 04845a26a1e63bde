//! The raw format: the virtual disk is the file, byte for byte.
//!
//! Block status comes from the file's holes (SEEK_DATA/SEEK_HOLE), zeroing punches or zero-fills
//! ranges with fallocate. A raw node never has a backing file and never interprets its contents,
//! so a guest that writes a qcow2 header into its disk cannot make us follow a backing path.
//!
//! One case needs more: a top image whose format was *probed* (the user named no format) and
//! found raw. Were the guest to write an image header into its first sector, the next probe
//! would open the disk as that format and follow whatever backing file the guest named
//! (`/etc/shadow`, another tenant's disk). As QEMU does, a node marked
//! [`RawNode::set_probed`] refuses writes that would make its first sector probe as anything
//! but raw.

use crate::error::{BlockError, Result};
use crate::node::{check_bounds, Allocation, BlockNode, LayerStatus};
use crate::protocol::{DebugEvent, Protocol};
use async_trait::async_trait;
use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// A raw image node.
pub struct RawNode {
    file: Arc<dyn Protocol>,
    size: AtomicU64,
    probed: AtomicBool,
}

impl RawNode {
    /// Open a raw node over `file`. Its virtual size is the file's length rounded up to a whole
    /// 512-byte sector, as QEMU sizes it: the tail past the end of the file reads as zeroes
    /// (and maps as a zero extent), and a write there extends the file.
    pub async fn open(file: Arc<dyn Protocol>) -> Result<Self> {
        let size = file.len().await?.div_ceil(512) * 512;
        Ok(RawNode {
            file,
            size: AtomicU64::new(size),
            probed: AtomicBool::new(false),
        })
    }

    /// Mark this node as opened by probing: from now on, writes that would make the first
    /// sector probe as another format are refused (see the module documentation).
    pub fn set_probed(&self, probed: bool) {
        self.probed.store(probed, Ordering::Release);
    }

    /// Refuse a change of the first sector that would turn a probed raw disk into an image
    /// header. `new_head` gives the bytes the write puts at `offset`, or `None` for zeroes.
    async fn guard_first_sector(
        &self,
        offset: u64,
        len: u64,
        new_head: Option<&[u8]>,
    ) -> Result<()> {
        const PROBE_LEN: u64 = crate::image::PROBE_BYTES as u64;
        if !self.probed.load(Ordering::Acquire) || offset >= PROBE_LEN || len == 0 {
            return Ok(());
        }
        let mut head = self.file.read_vec(0, PROBE_LEN as usize).await?;
        let end = (offset + len).min(PROBE_LEN);
        for i in offset..end {
            head[i as usize] = new_head.map_or(0, |d| d[(i - offset) as usize]);
        }
        if crate::image::format_of_head(&head) != crate::format::Format::Raw {
            return Err(BlockError::PermissionDenied(format!(
                "{}: refusing to write an image header into the first sector of a disk whose format was probed as raw (name the format explicitly to allow it)",
                self.file.name()
            )));
        }
        Ok(())
    }

    /// The protocol under this node.
    pub fn protocol(&self) -> &Arc<dyn Protocol> {
        &self.file
    }
}

#[async_trait]
impl BlockNode for RawNode {
    fn format_name(&self) -> &'static str {
        "raw"
    }
    fn filename(&self) -> &str {
        self.file.name()
    }
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    fn read_only(&self) -> bool {
        self.file.read_only()
    }
    fn remote(&self) -> bool {
        self.file.remote()
    }
    fn backing(&self) -> Option<Arc<dyn BlockNode>> {
        None
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_bounds(offset, buf.len() as u64, self.size())?;
        self.file.debug_event(DebugEvent::ReadAio);
        self.file.read_at(offset, buf).await
    }

    async fn read_append(&self, offset: u64, buf: Vec<u8>, len: usize) -> Result<Vec<u8>> {
        check_bounds(offset, len as u64, self.size())?;
        self.file.debug_event(DebugEvent::ReadAio);
        self.file.read_append(offset, buf, len).await
    }

    async fn resident_slice(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Option<crate::protocol::FileSlice>> {
        check_bounds(offset, len, self.size())?;
        Ok(self.file.resident_slice(offset, len))
    }

    async fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        check_bounds(offset, data.len() as u64, self.size())?;
        self.guard_first_sector(offset, data.len() as u64, Some(data))
            .await?;
        self.file.debug_event(DebugEvent::WriteAio);
        self.file.write_at(offset, data).await
    }

    async fn write_owned(&self, offset: u64, data: Vec<u8>) -> Result<Vec<u8>> {
        check_bounds(offset, data.len() as u64, self.size())?;
        self.guard_first_sector(offset, data.len() as u64, Some(&data))
            .await?;
        self.file.debug_event(DebugEvent::WriteAio);
        let n = data.len();
        let whole = std::iter::once(0..n).collect();
        self.file.write_gather(offset, data, whole, 0).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        check_bounds(offset, len, self.size())?;
        self.guard_first_sector(offset, len, None).await?;
        self.file.write_zeroes(offset, len, unmap).await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_bounds(offset, len, self.size())?;
        self.file.discard(offset, len).await
    }

    async fn flush(&self) -> Result<()> {
        self.file.flush().await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<LayerStatus> {
        check_bounds(offset, len, self.size())?;
        let (data, n) = self.file.data_status(offset, len).await?;
        Ok(LayerStatus {
            alloc: if data {
                Allocation::Data
            } else {
                Allocation::Zero
            },
            len: n.max(1).min(len),
            host_offset: Some(offset),
            compressed: false,
            zero: !data,
        })
    }

    async fn truncate(&self, size: u64) -> Result<()> {
        if self.read_only() {
            return Err(BlockError::ReadOnly(self.filename().to_string()));
        }
        self.file.set_len(size).await?;
        self.size.store(size.div_ceil(512) * 512, Ordering::Release);
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        self.flush().await
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
