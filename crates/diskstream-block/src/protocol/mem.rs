//! An in-memory protocol: a growable byte vector behind a lock.
//!
//! It lets fuzzers and unit tests open images from bytes without touching the file system, and
//! is the base the crash-injection backend of the reliability suite builds on. It has no holes:
//! `data_status` always answers "data".

use super::Protocol;
use crate::error::{BlockError, Result};
use async_trait::async_trait;
use std::sync::Mutex;

/// Storage held in memory.
pub struct MemProtocol {
    data: Mutex<Vec<u8>>,
    name: String,
    read_only: bool,
    /// Refuse to grow past this many bytes (a fuzzed image must not make us allocate gigabytes).
    max_len: u64,
}

impl MemProtocol {
    /// Wrap `data`; writes may extend it up to `max_len` bytes.
    pub fn new(name: &str, data: Vec<u8>, read_only: bool, max_len: u64) -> Self {
        MemProtocol {
            data: Mutex::new(data),
            name: name.to_string(),
            read_only,
            max_len,
        }
    }

    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.lock().map(|d| d.clone()).unwrap_or_default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Vec<u8>>> {
        self.data
            .lock()
            .map_err(|_| BlockError::io(self.name.clone(), std::io::Error::other("poisoned")))
    }

    fn grow(&self, d: &mut Vec<u8>, end: u64) -> Result<()> {
        if end > self.max_len {
            return Err(BlockError::NoSpace(self.name.clone()));
        }
        if end as usize > d.len() {
            d.resize(end as usize, 0);
        }
        Ok(())
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly(self.name.clone()));
        }
        Ok(())
    }
}

#[async_trait]
impl Protocol for MemProtocol {
    fn name(&self) -> &str {
        &self.name
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    async fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        if len as u64 > self.max_len {
            return Err(BlockError::InvalidArgument(format!(
                "{}: read of {len} bytes is larger than the storage limit",
                self.name
            )));
        }
        let d = self.lock()?;
        let mut out = vec![0u8; len];
        let start = (offset as usize).min(d.len());
        let end = (offset.saturating_add(len as u64) as usize).min(d.len());
        if start < end {
            out[..end - start].copy_from_slice(&d[start..end]);
        }
        Ok(out)
    }
    async fn write_vec(&self, offset: u64, data: Vec<u8>) -> Result<()> {
        self.writable()?;
        let mut d = self.lock()?;
        let end = offset.saturating_add(data.len() as u64);
        self.grow(&mut d, end)?;
        d[offset as usize..end as usize].copy_from_slice(&data);
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<()> {
        self.writable()?;
        let mut d = self.lock()?;
        let end = offset.saturating_add(len);
        self.grow(&mut d, end)?;
        d[offset as usize..end as usize].fill(0);
        Ok(())
    }
    async fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        self.writable()
    }
    async fn flush(&self) -> Result<()> {
        Ok(())
    }
    async fn len(&self) -> Result<u64> {
        Ok(self.lock()?.len() as u64)
    }
    async fn set_len(&self, len: u64) -> Result<()> {
        self.writable()?;
        let mut d = self.lock()?;
        if len > self.max_len {
            return Err(BlockError::NoSpace(self.name.clone()));
        }
        d.resize(len as usize, 0);
        Ok(())
    }
    async fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        let mut d = self.lock()?;
        self.grow(&mut d, offset.saturating_add(len))
    }
    async fn data_status(&self, _offset: u64, len: u64) -> Result<(bool, u64)> {
        Ok((true, len))
    }
}
