//! An asynchronous NBD client on tokio, and the block-layer protocol driver built on it.
//!
//! [`NbdClient`] connects over TCP or a unix socket, negotiates the best the server offers
//! (fixed newstyle; extended headers, else structured replies; `base:allocation` and, when
//! asked, `qemu:allocation-depth`; `NBD_OPT_GO` with block sizes, else `NBD_OPT_EXPORT_NAME`)
//! and pipelines many requests over one connection, or over several when the server
//! advertises `CAN_MULTI_CONN` and [`ClientOptions::connections`] asks for more.
//!
//! Layers, bottom up:
//!
//! * [`url`]: `nbd://host:port/export` and `nbd+unix:///export?socket=PATH`.
//! * [`handshake`]: option haggling.
//! * [`conn`]: one connection — a writer task serialising requests, a reader task dispatching
//!   reply chunks by cookie to the waiting requests, a semaphore bounding requests in flight.
//! * [`session`]: the state machine that reconnects with QEMU's `reconnect-delay` and
//!   `open-timeout` semantics and retries requests lost with a connection.
//! * this module: [`NbdClient`], which validates requests against the export and splits them
//!   to the server's limits (maximum payload, 32-bit lengths without extended headers).
//! * [`protocol`]: [`NbdProtocol`], the `diskstream_block` protocol driver (unaligned access,
//!   block status as data/hole), and [`NbdOpener`], which makes `open_image` accept NBD URLs
//!   (for example as a qcow2 image's backing file).

pub mod conn;
pub mod error;
pub mod handshake;
pub mod protocol;
pub mod session;
mod slots;
pub mod url;

pub use conn::MetaContext;
pub use error::ClientError;
pub use handshake::BlockSizes;
pub use protocol::{register_url_opener, NbdOpener, NbdProtocol, OpenerConfig};
pub use url::{Address, NbdUrl};

use crate::proto::{self, Extent, Mode};
use conn::{Command, Payload, Reply};
use handshake::Negotiated;
use session::Session;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::sync::watch;

/// Default number of requests in flight per connection (like nbdcopy; QEMU uses 16).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;
/// Largest effect length of one WRITE_ZEROES/TRIM/CACHE/BLOCK_STATUS request: 1 GiB (a multiple
/// of every legal minimum block size, and well inside 32-bit compact headers).
pub const MAX_EFFECT_LENGTH: u64 = 1 << 30;
/// Shortest dead-peer timeout (keepalive probes go out every second at most).
const MIN_DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(2);
/// Dead-peer timeout when `reconnect_delay` is 0, and the upper end of the derived one.
const MAX_DERIVED_DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(30);
/// Sub-requests of one split operation that are issued together.
const SPLIT_WINDOW: usize = 64;

/// How to reach an export and how to behave when the connection drops.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// The server.
    pub address: Address,
    /// The export name ("" is the default export).
    pub export: String,
    /// Never write: writes fail locally even when the export is writable (backing files).
    pub read_only: bool,
    /// QEMU's `reconnect-delay`: after a connection loss, requests wait this long for a
    /// reconnect (and are retried on it) before failing with EIO. 0 (the default): fail at
    /// once, reconnect in the background.
    pub reconnect_delay: Duration,
    /// QEMU's `open-timeout`: keep trying to connect for this long when opening. 0 (the
    /// default): one attempt.
    pub open_timeout: Duration,
    /// Limit on one connection attempt (TCP connect and handshake).
    pub connect_timeout: Duration,
    /// First pause between reconnect attempts (doubles up to `reconnect_interval_max`).
    pub reconnect_interval_min: Duration,
    /// Longest pause between reconnect attempts.
    pub reconnect_interval_max: Duration,
    /// Connections to open when the server advertises `CAN_MULTI_CONN` (1: never more).
    pub connections: usize,
    /// Requests in flight per connection.
    pub max_in_flight: usize,
    /// Select `base:allocation` (block status).
    pub block_status: bool,
    /// Also select `qemu:allocation-depth`.
    pub allocation_depth: bool,
    /// Try extended (64-bit) headers.
    pub extended_headers: bool,
    /// Try structured replies (sparse reads, block status) when extended headers are not
    /// agreed.
    pub structured_replies: bool,
    /// Use `NBD_OPT_GO` (false forces the `NBD_OPT_EXPORT_NAME` path, for tests).
    pub opt_go: bool,
    /// How long a TCP connection may go without any sign of life from the server (no ACK of
    /// data we sent, no answer to keepalive probes) before it is declared lost and the
    /// reconnect logic takes over: TCP keepalive probes plus `TCP_USER_TIMEOUT`, so a link
    /// that silently drops packets is noticed in bounded time instead of after the kernel's
    /// retransmission limit (many minutes). `None` (the default): see
    /// [`ClientOptions::effective_dead_peer_timeout`]. Unix sockets ignore it.
    pub dead_peer_timeout: Option<Duration>,
}

impl ClientOptions {
    /// Defaults for an export at `address`: everything negotiated, one connection, QEMU's
    /// defaults for reconnect-delay and open-timeout (both 0).
    pub fn new(address: Address, export: impl Into<String>) -> Self {
        ClientOptions {
            address,
            export: export.into(),
            read_only: false,
            reconnect_delay: Duration::ZERO,
            open_timeout: Duration::ZERO,
            connect_timeout: Duration::from_secs(10),
            reconnect_interval_min: Duration::from_millis(200),
            reconnect_interval_max: Duration::from_secs(5),
            connections: 1,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            block_status: true,
            allocation_depth: false,
            extended_headers: true,
            structured_replies: true,
            opt_go: true,
            dead_peer_timeout: None,
        }
    }

    /// The dead-peer timeout in force: [`ClientOptions::dead_peer_timeout`] when set, else
    /// `reconnect_delay` clamped to 2..30 s (a client that is willing to wait that long for a
    /// reconnect notices a dead link about as fast), or 30 s when `reconnect_delay` is 0
    /// (fail-fast clients still must not wait for the kernel's minutes-long retransmission
    /// limit, but a short stall of a slow link must not cost them an EIO).
    pub fn effective_dead_peer_timeout(&self) -> Duration {
        if let Some(t) = self.dead_peer_timeout {
            return t.max(Duration::from_secs(1));
        }
        if self.reconnect_delay.is_zero() {
            return MAX_DERIVED_DEAD_PEER_TIMEOUT;
        }
        self.reconnect_delay
            .clamp(MIN_DEAD_PEER_TIMEOUT, MAX_DERIVED_DEAD_PEER_TIMEOUT)
    }

    /// Defaults for the export named by an NBD URL.
    pub fn from_url(url: &str) -> Result<Self, ClientError> {
        let u = NbdUrl::parse(url)?;
        Ok(ClientOptions::new(u.address, u.export))
    }
}

/// The connection state (see [`session`] for the transitions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionState {
    /// Requests are served.
    Connected,
    /// Connection lost, inside the reconnect-delay window: requests wait.
    ConnectingWait,
    /// Connection lost, window over (or reconnect-delay 0): requests fail with EIO while
    /// reconnect attempts continue in the background.
    ConnectingNoWait,
    /// The server broke the protocol: no reconnect, requests fail with EIO.
    Failed,
    /// The client was closed.
    Closed,
}

/// What the server told us about the export (as negotiated on the first connection).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`proto::FLAG_*`).
    pub flags: u16,
    /// Block size constraints we obey.
    pub block: BlockSizes,
    /// Header style.
    pub mode: Mode,
    /// Whether `base:allocation` was agreed.
    pub base_allocation: bool,
    /// Whether `qemu:allocation-depth` was agreed.
    pub allocation_depth: bool,
    /// Whether `NBD_OPT_GO` was used (false: `NBD_OPT_EXPORT_NAME`).
    pub used_go: bool,
    /// Connections opened.
    pub connections: usize,
}

impl ExportInfo {
    fn new(n: &Negotiated, connections: usize) -> Self {
        ExportInfo {
            size: n.size,
            flags: n.flags,
            block: n.block,
            mode: n.mode,
            base_allocation: n.base_allocation.is_some(),
            allocation_depth: n.allocation_depth.is_some(),
            used_go: n.used_go,
            connections,
        }
    }
    fn flag(&self, f: u16) -> bool {
        self.flags & f != 0
    }
    /// The export refuses writes.
    pub fn read_only(&self) -> bool {
        self.flag(proto::FLAG_READ_ONLY)
    }
    /// `NBD_CMD_FLUSH` is supported.
    pub fn can_flush(&self) -> bool {
        self.flag(proto::FLAG_SEND_FLUSH)
    }
    /// `NBD_CMD_FLAG_FUA` is supported.
    pub fn can_fua(&self) -> bool {
        self.flag(proto::FLAG_SEND_FUA)
    }
    /// `NBD_CMD_TRIM` is supported.
    pub fn can_trim(&self) -> bool {
        self.flag(proto::FLAG_SEND_TRIM)
    }
    /// `NBD_CMD_WRITE_ZEROES` is supported.
    pub fn can_zero(&self) -> bool {
        self.flag(proto::FLAG_SEND_WRITE_ZEROES)
    }
    /// `NBD_CMD_FLAG_FAST_ZERO` is supported.
    pub fn can_fast_zero(&self) -> bool {
        self.flag(proto::FLAG_SEND_FAST_ZERO)
    }
    /// `NBD_CMD_CACHE` is supported.
    pub fn can_cache(&self) -> bool {
        self.flag(proto::FLAG_SEND_CACHE)
    }
    /// Flushes on one connection cover writes on all.
    pub fn can_multi_conn(&self) -> bool {
        self.flag(proto::FLAG_CAN_MULTI_CONN)
    }
}

/// How [`NbdClient::write_zeroes`] may zero.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Allow the server to punch a hole (otherwise `NBD_CMD_FLAG_NO_HOLE`).
    pub may_trim: bool,
    /// Fail with ENOTSUP unless zeroing is fast (`NBD_CMD_FLAG_FAST_ZERO`).
    pub fast: bool,
    /// Durable before the reply (`NBD_CMD_FLAG_FUA`).
    pub fua: bool,
}

/// A connected NBD client. Dropping it closes every connection and stops reconnecting.
pub struct NbdClient {
    s: Arc<Session>,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("server", &self.s.server)
            .field("export", &self.s.opts.export)
            .field("state", &self.s.state())
            .finish()
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.s.shutdown();
    }
}

/// Run futures concurrently in one task and return their outputs in order.
async fn join_all<'a, T>(futs: Vec<Pin<Box<dyn Future<Output = T> + Send + 'a>>>) -> Vec<T> {
    let mut futs: Vec<Option<Pin<Box<dyn Future<Output = T> + Send + 'a>>>> =
        futs.into_iter().map(Some).collect();
    let mut out: Vec<Option<T>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, res) in futs.iter_mut().zip(out.iter_mut()) {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => {
                        *res = Some(v);
                        *slot = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// Split `[offset, offset+len)` into pieces of at most `max` bytes.
fn pieces(offset: u64, len: u64, max: u64) -> Vec<(u64, u64)> {
    let mut v = Vec::new();
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let n = (end - pos).min(max.max(1));
        v.push((pos, n));
        pos += n;
    }
    v
}

impl NbdClient {
    /// Connect to the export (retrying until `open_timeout`).
    pub async fn connect(opts: ClientOptions) -> Result<NbdClient, ClientError> {
        Ok(NbdClient {
            s: Session::open(opts).await?,
        })
    }

    /// Connect to the export an NBD URL names, with default options.
    pub async fn connect_url(url: &str) -> Result<NbdClient, ClientError> {
        Self::connect(ClientOptions::from_url(url)?).await
    }

    /// What the server told us about the export.
    pub fn info(&self) -> &ExportInfo {
        &self.s.info
    }

    /// The options the client was opened with.
    pub fn options(&self) -> &ClientOptions {
        &self.s.opts
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.s.info.size
    }

    /// The current connection state.
    pub fn state(&self) -> ConnectionState {
        self.s.state()
    }

    /// Watch state changes (for events and tests).
    pub fn subscribe_state(&self) -> watch::Receiver<ConnectionState> {
        self.s.subscribe()
    }

    /// Close every connection (`NBD_CMD_DISC`). Later requests fail with EIO.
    pub fn close(&self) {
        self.s.shutdown();
    }

    fn check_range(&self, what: &str, offset: u64, len: u64) -> Result<(), ClientError> {
        let size = self.size();
        let min = self.s.info.block.min as u64;
        match offset.checked_add(len) {
            Some(end) if end <= size => {}
            _ => {
                return Err(ClientError::InvalidRequest(format!(
                    "{what} at offset {offset} length {len} is past the end of the export (size {size})"
                )))
            }
        }
        if offset % min != 0 || len % min != 0 {
            return Err(ClientError::InvalidRequest(format!(
                "{what} at offset {offset} length {len} is not aligned to the export's minimum block size {min}"
            )));
        }
        Ok(())
    }

    fn check_writable(&self, what: &str) -> Result<(), ClientError> {
        if self.s.opts.read_only || self.s.info.read_only() {
            return Err(ClientError::NotSupported(format!(
                "{what}: the NBD export {} is read-only",
                self.s.server
            )));
        }
        Ok(())
    }

    async fn run_all(&self, cmds: Vec<Command>) -> Result<Vec<Reply>, ClientError> {
        let mut out = Vec::with_capacity(cmds.len());
        for window in cmds.chunks(SPLIT_WINDOW) {
            let futs = window
                .iter()
                .map(|c| Box::pin(self.s.run(c)) as Pin<Box<dyn Future<Output = _> + Send + '_>>)
                .collect();
            for r in join_all(futs).await {
                out.push(r?);
            }
        }
        Ok(out)
    }

    /// Read `len` bytes at `offset` (aligned to the minimum block size, inside the export),
    /// split into requests of at most the maximum payload that run in parallel.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, ClientError> {
        self.check_range("read", offset, len as u64)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let max = self.s.info.block.max_payload as u64;
        let cmds: Vec<Command> = pieces(offset, len as u64, max)
            .into_iter()
            .map(|(o, n)| Command::Read {
                offset: o,
                len: n as u32,
            })
            .collect();
        let mut replies = self.run_all(cmds).await?;
        if replies.len() == 1 {
            if let Some(Reply::Data(v)) = replies.pop() {
                return Ok(v);
            }
            return Err(self.unexpected_reply());
        }
        let mut out = Vec::with_capacity(len);
        for r in replies {
            match r {
                Reply::Data(v) => out.extend_from_slice(&v),
                _ => return Err(self.unexpected_reply()),
            }
        }
        Ok(out)
    }

    fn unexpected_reply(&self) -> ClientError {
        ClientError::protocol(&self.s.server, "reply does not match the command")
    }

    /// Write `data` at `offset` (aligned, inside the export). `fua` makes it durable before
    /// returning (emulated with a flush when the server has no FUA).
    pub async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), ClientError> {
        self.check_writable("write")?;
        self.check_range("write", offset, data.len() as u64)?;
        self.write_payload(offset, Payload::new(data), fua).await
    }

    async fn write_payload(
        &self,
        offset: u64,
        data: Payload,
        fua: bool,
    ) -> Result<(), ClientError> {
        if data.len() == 0 {
            return Ok(());
        }
        let max = self.s.info.block.max_payload as u64;
        let native_fua = fua && self.s.info.can_fua();
        let cmds = pieces(offset, data.len() as u64, max)
            .into_iter()
            .map(|(o, n)| Command::Write {
                offset: o,
                data: data.slice((o - offset) as usize, n as usize),
                fua: native_fua,
            })
            .collect();
        self.run_all(cmds).await?;
        if fua && !native_fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Make `len` bytes at `offset` read as zeroes with `NBD_CMD_WRITE_ZEROES` (the server
    /// must advertise it; see [`ExportInfo::can_zero`]).
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<(), ClientError> {
        self.check_writable("write zeroes")?;
        self.check_range("write zeroes", offset, len)?;
        if !self.s.info.can_zero() {
            return Err(ClientError::NotSupported(format!(
                "{} does not support NBD_CMD_WRITE_ZEROES",
                self.s.server
            )));
        }
        if flags.fast && !self.s.info.can_fast_zero() {
            return Err(ClientError::NotSupported(format!(
                "{} does not support fast zeroing",
                self.s.server
            )));
        }
        let fua = flags.fua && self.s.info.can_fua();
        let cmds = pieces(offset, len, MAX_EFFECT_LENGTH)
            .into_iter()
            .map(|(o, n)| Command::WriteZeroes {
                offset: o,
                len: n,
                no_hole: !flags.may_trim,
                fast: flags.fast,
                fua,
            })
            .collect();
        self.run_all(cmds).await?;
        if flags.fua && !fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Zero a range with plain writes of a shared zero buffer (for servers without
    /// `NBD_CMD_WRITE_ZEROES`).
    pub async fn write_zero_buffers(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        self.check_writable("write zeroes")?;
        self.check_range("write zeroes", offset, len)?;
        let max = self.s.info.block.max_payload as u64;
        let zeros = Payload::new(vec![0u8; len.min(max) as usize]);
        let cmds = pieces(offset, len, max)
            .into_iter()
            .map(|(o, n)| Command::Write {
                offset: o,
                data: zeros.slice(0, n as usize),
                fua: false,
            })
            .collect();
        self.run_all(cmds).await.map(|_| ())
    }

    /// Discard `len` bytes at `offset` (`NBD_CMD_TRIM`; the server must advertise it).
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ClientError> {
        self.check_writable("trim")?;
        self.check_range("trim", offset, len)?;
        if !self.s.info.can_trim() {
            return Err(ClientError::NotSupported(format!(
                "{} does not support NBD_CMD_TRIM",
                self.s.server
            )));
        }
        let native_fua = fua && self.s.info.can_fua();
        let cmds = pieces(offset, len, MAX_EFFECT_LENGTH)
            .into_iter()
            .map(|(o, n)| Command::Trim {
                offset: o,
                len: n,
                fua: native_fua,
            })
            .collect();
        self.run_all(cmds).await?;
        if fua && !native_fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Make every completed write durable. A server that does not advertise flush has no
    /// volatile cache to flush (the specification forbids sending it), so this succeeds.
    pub async fn flush(&self) -> Result<(), ClientError> {
        if !self.s.info.can_flush() {
            return Ok(());
        }
        self.s.run(&Command::Flush).await.map(|_| ())
    }

    /// Ask the server to prefetch a range (`NBD_CMD_CACHE`; a no-op when not advertised).
    pub async fn cache(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        self.check_range("cache", offset, len)?;
        if !self.s.info.can_cache() {
            return Ok(());
        }
        let cmds = pieces(offset, len, MAX_EFFECT_LENGTH)
            .into_iter()
            .map(|(o, n)| Command::Cache { offset: o, len: n })
            .collect();
        self.run_all(cmds).await.map(|_| ())
    }

    /// Block status of a prefix of `[offset, offset+len)` in `context`: consecutive extents
    /// starting at `offset`, at least one, covering at most `len` bytes (a server may answer
    /// for less). `req_one` asks for a single extent (`NBD_CMD_FLAG_REQ_ONE`, what QEMU sends).
    /// Unaligned offsets are allowed: the query starts at the aligned offset below and the
    /// answer is trimmed.
    pub async fn block_status(
        &self,
        offset: u64,
        len: u64,
        context: MetaContext,
        req_one: bool,
    ) -> Result<Vec<Extent>, ClientError> {
        let size = self.size();
        if len == 0 || offset >= size {
            return Err(ClientError::InvalidRequest(format!(
                "block status at offset {offset} length {len} outside the export (size {size})"
            )));
        }
        let min = self.s.info.block.min as u64;
        let start = offset / min * min;
        let skip = offset - start;
        let end = offset.saturating_add(len).min(size);
        // Round the end up to the block size, but not past the export (the last block may be
        // partial when the size is not a multiple of it).
        let aend = end.div_ceil(min).saturating_mul(min).min(size);
        let qlen = (aend - start).min(MAX_EFFECT_LENGTH);
        let reply = self
            .s
            .run(&Command::BlockStatus {
                offset: start,
                len: qlen,
                context,
                req_one,
            })
            .await?;
        let Reply::Extents(mut ext) = reply else {
            return Err(self.unexpected_reply());
        };
        // Drop the part before `offset` and after `end`.
        let mut skip = skip;
        while skip > 0 {
            let Some(first) = ext.first_mut() else { break };
            if first.length > skip {
                first.length -= skip;
                skip = 0;
            } else {
                skip -= first.length;
                ext.remove(0);
            }
        }
        let want = end - offset;
        let mut sum = 0;
        ext.retain_mut(|e| {
            if sum >= want {
                return false;
            }
            e.length = e.length.min(want - sum);
            sum += e.length;
            true
        });
        if ext.is_empty() {
            return Err(ClientError::protocol(
                &self.s.server,
                format!("block status at {offset} answered only for bytes before it"),
            ));
        }
        Ok(ext)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_at_max() {
        assert_eq!(pieces(10, 25, 10), vec![(10, 10), (20, 10), (30, 5)]);
        assert_eq!(pieces(0, 0, 10), vec![]);
    }

    #[tokio::test]
    async fn join_all_keeps_order() {
        let futs: Vec<Pin<Box<dyn Future<Output = u32> + Send>>> = (0..5u32)
            .map(|i| {
                Box::pin(async move {
                    tokio::time::sleep(Duration::from_millis(u64::from(5 - i))).await;
                    i
                }) as Pin<Box<dyn Future<Output = u32> + Send>>
            })
            .collect();
        assert_eq!(join_all(futs).await, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn dead_peer_timeout_follows_reconnect_delay() {
        let mut o = ClientOptions::new(Address::Unix("/x".into()), "");
        let s = Duration::from_secs;
        assert_eq!(o.effective_dead_peer_timeout(), s(30));
        o.reconnect_delay = Duration::from_millis(500);
        assert_eq!(o.effective_dead_peer_timeout(), s(2));
        o.reconnect_delay = s(10);
        assert_eq!(o.effective_dead_peer_timeout(), s(10));
        o.reconnect_delay = s(600);
        assert_eq!(o.effective_dead_peer_timeout(), s(30));
        o.dead_peer_timeout = Some(s(7));
        assert_eq!(o.effective_dead_peer_timeout(), s(7));
        o.dead_peer_timeout = Some(Duration::ZERO);
        assert_eq!(o.effective_dead_peer_timeout(), s(1));
    }
}
