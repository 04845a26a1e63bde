//! The NBD protocol driver of the block layer, and the URL opener that plugs it into
//! `diskstream_block::image::open_image`.
//!
//! [`NbdProtocol`] turns the block layer's byte-addressed calls into NBD commands:
//!
//! * reads past the end of the export return zeroes (the block layer's contract for every
//!   protocol; a raw node rounds its size up to 512 bytes);
//! * unaligned reads are widened to the export's minimum block size; unaligned writes and
//!   zeroing do a read-modify-write of the edge blocks under a lock that excludes every other
//!   write, so two RMWs (or an RMW and a plain write) of one block cannot lose data;
//! * `write_zeroes` uses `NBD_CMD_WRITE_ZEROES` (a hole allowed only when `unmap`), else writes
//!   zero buffers; `discard` uses `NBD_CMD_TRIM` when advertised and is a no-op otherwise
//!   (discard is advisory); `set_len` is refused (NBD exports have a fixed size);
//! * `data_status` asks `base:allocation` with `REQ_ONE`, as QEMU's nbd driver does. The block
//!   layer's question is "must these bytes be read?", so an extent reads as a hole exactly when
//!   the server sets `NBD_STATE_ZERO`; `HOLE` without `ZERO` (contents undefined) is data.
//!   Without the context every range is data.
//!
//! [`register_url_opener`] registers [`NbdOpener`] for `nbd://`, `nbd+tcp://` and
//! `nbd+unix://` names, so that such a name works as a top image (`diskstream img info
//! nbd://host/disk`) or as a qcow2 image's backing file (always opened read-only).

use super::error::ClientError;
use super::{ClientOptions, MetaContext, NbdClient, ZeroFlags};
use crate::proto;
use async_trait::async_trait;
use diskstream_block::error::{BlockError, Result};
use diskstream_block::image::{register_protocol_opener, ProtocolOpener};
use diskstream_block::protocol::Protocol;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::RwLock;

/// An NBD export as block-layer storage.
pub struct NbdProtocol {
    client: NbdClient,
    name: String,
    read_only: bool,
    /// Plain writes take it shared, read-modify-writes exclusively.
    rmw: RwLock<()>,
    /// Recently answered block status, so a chain-wide mapping query (which asks the same
    /// layer about the same offsets more than once, and walks a range extent by extent) costs
    /// one round trip per [`STATUS_SPAN`] instead of one per extent and per question.
    status: std::sync::Mutex<StatusCache>,
}

/// Bytes of block status asked for at once (at least what the caller wants).
const STATUS_SPAN: u64 = 64 << 20;
/// Extents kept; the oldest answers are dropped first.
const STATUS_EXTENTS: usize = 4096;
/// How long an answer is trusted. Our own writes invalidate it at once; this bounds how long
/// a change made by another client of the export could go unnoticed.
const STATUS_TTL: Duration = Duration::from_secs(1);

/// Extents `(start, end, data)` from recent block status replies, oldest first.
#[derive(Default)]
struct StatusCache {
    extents: std::collections::VecDeque<(u64, u64, bool, std::time::Instant)>,
}

impl StatusCache {
    fn lookup(&self, offset: u64) -> Option<(u64, bool)> {
        let now = std::time::Instant::now();
        self.extents
            .iter()
            .rev()
            .find(|&&(a, b, _, t)| a <= offset && offset < b && now.duration_since(t) < STATUS_TTL)
            .map(|&(_, b, data, _)| (b, data))
    }

    fn insert(&mut self, extents: Vec<(u64, u64, bool)>) {
        let now = std::time::Instant::now();
        for (a, b, d) in extents {
            self.extents.push_back((a, b, d, now));
        }
        while self.extents.len() > STATUS_EXTENTS {
            self.extents.pop_front();
        }
    }
}

impl std::fmt::Debug for NbdProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdProtocol")
            .field("name", &self.name)
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl NbdProtocol {
    /// Connect to the export named by `url` with `config`'s reconnect behaviour.
    pub async fn open(
        url: &str,
        read_only: bool,
        config: &OpenerConfig,
    ) -> Result<Self, ClientError> {
        let mut opts = ClientOptions::from_url(url)?;
        opts.read_only = read_only;
        opts.reconnect_delay = config.reconnect_delay;
        opts.open_timeout = config.open_timeout;
        opts.connections = config.connections.max(1);
        opts.max_in_flight = config.max_in_flight.max(1);
        let client = NbdClient::connect(opts).await?;
        Ok(Self::from_client(client, url))
    }

    /// Wrap a connected client; `name` is what messages and `filename()` show.
    pub fn from_client(client: NbdClient, name: impl Into<String>) -> Self {
        let read_only = client.options().read_only || client.info().read_only();
        NbdProtocol {
            client,
            name: name.into(),
            read_only,
            rmw: RwLock::new(()),
            status: std::sync::Mutex::new(StatusCache::default()),
        }
    }

    /// The client underneath (export information, connection state).
    pub fn client(&self) -> &NbdClient {
        &self.client
    }

    fn err(&self, what: &str, offset: u64) -> impl FnOnce(ClientError) -> BlockError + '_ {
        let ctx = format!("{what} of '{}' at {offset}", self.name);
        move |e| e.into_block_error(ctx)
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly(self.name.clone()));
        }
        // Every caller is about to change the export: cached block status is stale.
        self.forget_status();
        Ok(())
    }

    fn forget_status(&self) {
        if let Ok(mut c) = self.status.lock() {
            c.extents.clear();
        }
    }

    fn check_end(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.client.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(BlockError::OutOfBounds { offset, len, size }),
        }
    }

    fn min(&self) -> u64 {
        self.client.info().block.min as u64
    }

    /// The aligned range `[astart, aend)` around `[offset, end)`.
    fn widen(&self, offset: u64, end: u64) -> Result<(u64, u64)> {
        let min = self.min();
        let astart = offset / min * min;
        let aend = end.div_ceil(min) * min;
        if aend > self.client.size() {
            return Err(BlockError::unsupported(
                &self.name,
                format!(
                    "the export's size {} is not a multiple of its block size {min}; its last bytes cannot be accessed",
                    self.client.size()
                ),
            ));
        }
        Ok((astart, aend))
    }

    /// Write `data` at an offset that may be unaligned (read-modify-write of the edges).
    async fn write_unaligned(&self, offset: u64, data: Vec<u8>) -> Result<()> {
        let end = offset + data.len() as u64;
        let min = self.min();
        if offset % min == 0 && end % min == 0 {
            let _g = self.rmw.read().await;
            return self
                .client
                .write(offset, data, false)
                .await
                .map_err(self.err("write", offset));
        }
        let (astart, aend) = self.widen(offset, end)?;
        let _g = self.rmw.write().await;
        let mut buf = vec![0u8; (aend - astart) as usize];
        if offset != astart {
            let head = self.client.read(astart, min as usize).await;
            let head = head.map_err(self.err("read", astart))?;
            buf[..min as usize].copy_from_slice(&head);
        }
        // The tail block, unless it is the head block read just above.
        let tail_is_head = offset != astart && aend - min == astart;
        if end != aend && !tail_is_head {
            let tail = self.client.read(aend - min, min as usize).await;
            let tail = tail.map_err(self.err("read", aend - min))?;
            let at = (aend - min - astart) as usize;
            buf[at..].copy_from_slice(&tail);
        }
        let rel = (offset - astart) as usize;
        buf[rel..rel + data.len()].copy_from_slice(&data);
        self.client
            .write(astart, buf, false)
            .await
            .map_err(self.err("write", astart))
    }
}

#[async_trait]
impl Protocol for NbdProtocol {
    fn name(&self) -> &str {
        &self.name
    }

    fn read_only(&self) -> bool {
        self.read_only
    }
    fn remote(&self) -> bool {
        true
    }

    async fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let size = self.client.size();
        if len == 0 {
            return Ok(Vec::new());
        }
        if offset >= size {
            return Ok(vec![0u8; len]);
        }
        let end = offset.saturating_add(len as u64).min(size);
        let min = self.min();
        if offset % min == 0 && end % min == 0 && end - offset == len as u64 {
            return self
                .client
                .read(offset, len)
                .await
                .map_err(self.err("read", offset));
        }
        let (astart, aend) = self.widen(offset, end)?;
        let data = self
            .client
            .read(astart, (aend - astart) as usize)
            .await
            .map_err(self.err("read", offset))?;
        let mut out = vec![0u8; len];
        let rel = (offset - astart) as usize;
        let n = (end - offset) as usize;
        out[..n].copy_from_slice(&data[rel..rel + n]);
        Ok(out)
    }

    async fn write_vec(&self, offset: u64, data: Vec<u8>) -> Result<()> {
        self.check_writable()?;
        self.check_end(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        self.write_unaligned(offset, data).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_writable()?;
        self.check_end(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let min = self.min();
        let end = offset + len;
        let inner_start = offset.div_ceil(min) * min;
        let inner_end = end / min * min;
        if inner_start >= inner_end {
            return self.write_unaligned(offset, vec![0u8; len as usize]).await;
        }
        if offset < inner_start {
            self.write_unaligned(offset, vec![0u8; (inner_start - offset) as usize])
                .await?;
        }
        if inner_end < end {
            self.write_unaligned(inner_end, vec![0u8; (end - inner_end) as usize])
                .await?;
        }
        let _g = self.rmw.read().await;
        let n = inner_end - inner_start;
        if self.client.info().can_zero() {
            let flags = ZeroFlags {
                may_trim: unmap,
                ..Default::default()
            };
            self.client
                .write_zeroes(inner_start, n, flags)
                .await
                .map_err(self.err("write-zeroes", inner_start))
        } else {
            self.client
                .write_zero_buffers(inner_start, n)
                .await
                .map_err(self.err("write-zeroes", inner_start))
        }
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let size = self.client.size();
        let end = offset.saturating_add(len).min(size);
        if !self.client.info().can_trim() || offset >= end {
            return Ok(());
        }
        // Discard is advisory: only whole blocks are trimmed.
        let min = self.min();
        let s = offset.div_ceil(min) * min;
        let e = end / min * min;
        if s >= e {
            return Ok(());
        }
        let _g = self.rmw.read().await;
        self.client
            .trim(s, e - s, false)
            .await
            .map_err(self.err("discard", s))
    }

    async fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.client.flush().await.map_err(self.err("flush", 0))
    }

    async fn len(&self) -> Result<u64> {
        Ok(self.client.size())
    }

    async fn set_len(&self, len: u64) -> Result<()> {
        if len == self.client.size() {
            return Ok(());
        }
        Err(BlockError::unsupported(
            &self.name,
            format!(
                "an NBD export cannot be resized (size {}, asked {len})",
                self.client.size()
            ),
        ))
    }

    async fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        // Every byte of an export exists; only growing it is impossible.
        self.check_end(offset, len)
    }

    async fn data_status(&self, offset: u64, len: u64) -> Result<(bool, u64)> {
        let size = self.client.size();
        if len == 0 {
            return Ok((true, 0));
        }
        if offset >= size {
            return Ok((false, len));
        }
        let n = len.min(size - offset);
        if !self.client.info().base_allocation {
            return Ok((true, n));
        }
        if let Some((end, data)) = self.status.lock().ok().and_then(|c| c.lookup(offset)) {
            return Ok((data, (end - offset).min(n)));
        }
        let ask = n.max(STATUS_SPAN).min(size - offset);
        match self
            .client
            .block_status(offset, ask, MetaContext::BaseAllocation, false)
            .await
        {
            Ok(ext) => {
                let mut pos = offset;
                let mut spans = Vec::with_capacity(ext.len());
                for e in &ext {
                    let l = e.length.min(offset + ask - pos);
                    if l == 0 {
                        break;
                    }
                    spans.push((pos, pos + l, e.flags & proto::STATE_ZERO as u64 == 0));
                    pos += l;
                }
                let first = spans.first().map(|&(_, b, d)| (d, (b - offset).min(n)));
                if let Ok(mut c) = self.status.lock() {
                    c.insert(spans);
                }
                Ok(first.unwrap_or((true, n)))
            }
            // A reconnect to a server without the context: everything is data.
            Err(ClientError::NotSupported(_)) => Ok((true, n)),
            Err(e) => {
                Err(e.into_block_error(format!("block status of '{}' at {offset}", self.name)))
            }
        }
    }
}

/// Connection behaviour for NBD images opened through [`NbdOpener`].
#[derive(Clone, Debug)]
pub struct OpenerConfig {
    /// QEMU's `reconnect-delay` (default 0).
    pub reconnect_delay: Duration,
    /// QEMU's `open-timeout` (default 0).
    pub open_timeout: Duration,
    /// Connections per image when the server allows multi-conn (default 1).
    pub connections: usize,
    /// Requests in flight per connection.
    pub max_in_flight: usize,
}

impl Default for OpenerConfig {
    fn default() -> Self {
        OpenerConfig {
            reconnect_delay: Duration::ZERO,
            open_timeout: Duration::ZERO,
            connections: 1,
            max_in_flight: super::DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

impl OpenerConfig {
    /// The defaults, overridden by `DISKSTREAM_NBD_RECONNECT_DELAY`,
    /// `DISKSTREAM_NBD_OPEN_TIMEOUT` (seconds) and `DISKSTREAM_NBD_CONNECTIONS`. A URL stored
    /// in an image header cannot carry these (QEMU would refuse the extra query parameters),
    /// so the environment is how a command-line user sets them. Invalid values are ignored
    /// with a warning.
    pub fn from_env() -> Self {
        let mut c = OpenerConfig::default();
        let secs = |k: &str| -> Option<Duration> {
            let v = std::env::var(k).ok()?;
            match v.trim().parse::<f64>() {
                Ok(s) if s.is_finite() && (0.0..=86_400.0).contains(&s) => {
                    Some(Duration::from_secs_f64(s))
                }
                _ => {
                    tracing::warn!("ignoring {k}={v}: expected seconds (0 to 86400)");
                    None
                }
            }
        };
        if let Some(d) = secs("DISKSTREAM_NBD_RECONNECT_DELAY") {
            c.reconnect_delay = d;
        }
        if let Some(d) = secs("DISKSTREAM_NBD_OPEN_TIMEOUT") {
            c.open_timeout = d;
        }
        if let Ok(v) = std::env::var("DISKSTREAM_NBD_CONNECTIONS") {
            match v.trim().parse::<usize>() {
                Ok(n) if (1..=16).contains(&n) => c.connections = n,
                _ => tracing::warn!("ignoring DISKSTREAM_NBD_CONNECTIONS={v}: expected 1 to 16"),
            }
        }
        c
    }
}

/// Opens `nbd://`, `nbd+tcp://` and `nbd+unix://` names for the block layer.
#[derive(Clone, Debug, Default)]
pub struct NbdOpener {
    /// Connection behaviour of every image it opens.
    pub config: OpenerConfig,
}

#[async_trait]
impl ProtocolOpener for NbdOpener {
    fn schemes(&self) -> Vec<String> {
        super::url::SCHEMES.iter().map(|s| s.to_string()).collect()
    }

    async fn open(&self, url: &str, read_only: bool) -> Result<Arc<dyn Protocol>> {
        match NbdProtocol::open(url, read_only, &self.config).await {
            Ok(p) => Ok(Arc::new(p)),
            Err(e) => Err(e.into_block_error(format!("Could not open '{url}'"))),
        }
    }
}

/// Register [`NbdOpener`] with the block layer so `open_image` accepts NBD URLs (as top images
/// and as backing files). Call once at startup; calling again replaces the configuration.
pub fn register_url_opener(config: OpenerConfig) {
    register_protocol_opener(Arc::new(NbdOpener { config }));
}
