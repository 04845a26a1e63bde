//! `blkdebug`: a protocol wrapper that injects I/O errors, QEMU's way of testing error paths.
//!
//! Only what the tests need is implemented: `inject-error` rules keyed on the `read_aio` /
//! `write_aio` events that format drivers announce before guest data I/O, with `errno`,
//! `once`, `sector` and `iotype`. Once its event fired, a rule fails the next matching request
//! (so the injected error hits guest data, not metadata, as in QEMU).

use async_trait::async_trait;
use diskstream_block::protocol::{DebugEvent, Protocol};
use diskstream_block::{BlockError, Result};
use std::sync::{Arc, Mutex};

/// One `inject-error` rule.
#[derive(Clone, Debug)]
pub struct InjectRule {
    /// Triggering event ("read_aio", "write_aio").
    pub event: String,
    /// Error to return.
    pub errno: i32,
    /// Remove the rule after it fired once.
    pub once: bool,
    /// Only requests covering this 512-byte sector.
    pub sector: Option<u64>,
    /// Applies to reads.
    pub reads: bool,
    /// Applies to writes.
    pub writes: bool,
    /// The event has fired.
    pub armed: bool,
}

/// The error-injecting protocol.
pub struct BlkdebugProtocol {
    inner: Arc<dyn Protocol>,
    rules: Mutex<Vec<InjectRule>>,
}

impl BlkdebugProtocol {
    /// Wrap `inner` with `rules`.
    pub fn new(inner: Arc<dyn Protocol>, rules: Vec<InjectRule>) -> Self {
        BlkdebugProtocol {
            inner,
            rules: Mutex::new(rules),
        }
    }

    fn check(&self, offset: u64, len: u64, write: bool) -> Result<()> {
        let mut rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        let hit = rules.iter().position(|r| {
            r.armed
                && if write { r.writes } else { r.reads }
                && r.sector
                    .is_none_or(|s| s * 512 < offset + len && offset < (s + 1) * 512)
        });
        let Some(i) = hit else { return Ok(()) };
        let errno = rules[i].errno;
        if rules[i].once {
            rules.remove(i);
        }
        Err(BlockError::io(
            format!(
                "blkdebug: injected error on '{}' at {offset}",
                self.inner.name()
            ),
            std::io::Error::from_raw_os_error(errno),
        ))
    }
}

#[async_trait]
impl Protocol for BlkdebugProtocol {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn remote(&self) -> bool {
        self.inner.remote()
    }
    fn debug_event(&self, event: DebugEvent) {
        let name = match event {
            DebugEvent::ReadAio => "read_aio",
            DebugEvent::WriteAio => "write_aio",
        };
        let mut rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        for r in rules.iter_mut().filter(|r| r.event == name) {
            r.armed = true;
        }
    }
    async fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.check(offset, len as u64, false)?;
        self.inner.read_vec(offset, len).await
    }
    async fn write_vec(&self, offset: u64, data: Vec<u8>) -> Result<()> {
        self.check(offset, data.len() as u64, true)?;
        self.inner.write_vec(offset, data).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.inner.write_zeroes(offset, len, unmap).await
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.discard(offset, len).await
    }
    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }
    async fn len(&self) -> Result<u64> {
        self.inner.len().await
    }
    async fn allocated_bytes(&self) -> Result<Option<u64>> {
        self.inner.allocated_bytes().await
    }
    async fn set_len(&self, len: u64) -> Result<()> {
        self.inner.set_len(len).await
    }
    async fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.allocate(offset, len).await
    }
    async fn data_status(&self, offset: u64, len: u64) -> Result<(bool, u64)> {
        self.inner.data_status(offset, len).await
    }
}
