//! The transmission phase: pipelined requests, replies in completion order.
//!
//! * **Reader** (the connection's task): decodes each request header, reads the write payload,
//!   takes permits from two per-connection semaphores (one per request, and one per 4 KiB of
//!   payload or reply data the request will hold), then spawns a task for the request. At the
//!   limits it simply stops reading, so TCP flow control pushes back on the client.
//! * **Request tasks** compute the whole reply (all chunks) and hand it, with the permits, to
//!   the writer over a channel. Replies therefore go out in completion order, never interleaved.
//! * **Writer** (one task) owns the write half; it writes everything queued, then flushes once,
//!   so a burst of small replies costs one syscall. Permits are released when a reply has been
//!   written, or dropped with it when the client is gone.
//!
//! Every request runs against the node its export's [`BlockBackend`] names when the request
//! starts ([`BlockBackend::acquire`], held until the request is done), so a graph change that
//! swaps the node waits for requests in flight and no request sees two nodes.
//!
//! The connection ends on `NBD_CMD_DISC`, end of stream, a malformed header, a payload over
//! 32 MiB (which cannot be skipped safely), a failed write, server shutdown, or a `hard`
//! removal of its export. In every case
//! the reader stops, the requests already read run to completion (their replies are sent if
//! the socket still works), and only then does the connection close: acquiring every request
//! permit is the barrier, so nothing outlives the connection and no I/O on the node is left
//! running when the last connection is gone.
//!
//! Semantics (qemu-nbd 10's where the spec leaves a choice): the export size is the node's
//! rounded down to 512; requests past it fail with ENOSPC (WRITE, WRITE_ZEROES) or EINVAL;
//! writes to read-only exports fail with EPERM; READ and CACHE are limited to 32 MiB per
//! request (CACHE prefetches at most that much); READ with FUA flushes first; WRITE, TRIM and
//! WRITE_ZEROES with FUA flush after; unknown commands and flags fail with EINVAL. Block-layer
//! errors map to NBD errnos with [`crate::proto::nbd_errno`].
//!
//! Structured reads are sparse: the range is split by the chain-wide mapping and every extent
//! that reads as zeroes goes out as an `OFFSET_HOLE` chunk, unless the client set DF (one data
//! chunk). Block status reports `base:allocation` (HOLE when no layer stores data, ZERO when the
//! extent reads as zeroes) and `qemu:allocation-depth` (depth + 1 of the layer providing the
//! data, 0 when none does), at most [`MAX_EXTENTS`] merged extents per context.
//!
//! `FAST_ZERO` rule: zeroing is fast when no data has to be written. On raw nodes it always is
//! (fallocate). On qcow2 the driver writes explicit zeroes only for partial clusters, so a
//! partial head or tail cluster must already read as zeroes in full; the request is then widened
//! to whole clusters and becomes a metadata-only update. A qcow2 v2 image with a backing file
//! has no zero clusters: the request succeeds (without writing) only if the range already reads
//! as zeroes. Any other case fails at once with ENOTSUP and leaves the export unchanged.

use super::handshake::{Context, Session};
use super::{BoxStream, Shared, MAX_EXTENTS};
use crate::proto::*;
use diskstream_block::format::qcow2::Qcow2;
use diskstream_block::node::BlockNode;
use diskstream_block::protocol::FileSlice;
use diskstream_block::status::map_extent;
use diskstream_block::{BlockBackend, BlockError};
use std::io;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter, WriteHalf};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

/// Granularity of the buffered-bytes semaphore.
const BYTE_UNIT: usize = 4096;
/// Bytes a block status reply can hold: two contexts of [`MAX_EXTENTS`] 16-byte descriptors.
const BLOCK_STATUS_COST: usize = 2 * MAX_EXTENTS * 16;
/// Scratch buffer used by CACHE.
const CACHE_CHUNK: usize = 1 << 20;
/// Reply buffers at least this large are recycled (smaller ones are cheap to allocate).
const RECYCLE_MIN: usize = 64 * 1024;
/// Largest reply buffer kept for reuse.
const RECYCLE_MAX: usize = 4 << 20;
/// Bytes of idle reply buffers a connection keeps.
const RECYCLE_IDLE: usize = 16 << 20;

/// Reply buffers of one connection, recycled once written.
///
/// A read reply is allocated, filled by the protocol and written: at nbdcopy's 256 KiB per
/// request, a fresh allocation is a fresh mapping whose pages fault in on first touch and are
/// unmapped again on free, which costs as much CPU as the copy out of the page cache. Taking
/// the buffers of replies already written keeps a connection's working set mapped. Only the
/// idle buffers are bounded here; those in flight are bounded by the connection's byte
/// semaphore.
#[derive(Default)]
struct BufPool {
    free: std::sync::Mutex<(Vec<Vec<u8>>, usize)>,
}

impl BufPool {
    /// An empty buffer with room for `cap` bytes, reused when one is idle.
    fn take(&self, cap: usize) -> Vec<u8> {
        if (RECYCLE_MIN..=RECYCLE_MAX).contains(&cap) {
            let mut g = self.free.lock().unwrap_or_else(|p| p.into_inner());
            let (free, idle) = &mut *g;
            if let Some(i) = free.iter().rposition(|b| b.capacity() >= cap) {
                let b = free.swap_remove(i);
                *idle -= b.capacity();
                return b;
            }
        }
        Vec::with_capacity(cap)
    }

    /// Return a written buffer for reuse (dropped if too small, too large or over the bound).
    fn put(&self, mut b: Vec<u8>) {
        let cap = b.capacity();
        if !(RECYCLE_MIN..=RECYCLE_MAX).contains(&cap) {
            return;
        }
        b.clear();
        let mut g = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let (free, idle) = &mut *g;
        if *idle + cap <= RECYCLE_IDLE {
            *idle += cap;
            free.push(b);
        }
    }
}

/// Permits a request holds from the moment it is read until its reply is written.
struct Permits {
    _request: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// A complete reply (every chunk of it), queued for the writer.
struct Reply {
    parts: Vec<Part>,
    _permits: Permits,
}

/// A piece of a reply, in wire order.
enum Part {
    /// Bytes to write as they are.
    Bytes(Vec<u8>),
    /// A header, then data the page cache holds, sent from the file with `sendfile`.
    File { head: Vec<u8>, data: FileSlice },
}

fn bytes(bufs: Vec<Vec<u8>>) -> Vec<Part> {
    bufs.into_iter().map(Part::Bytes).collect()
}

/// Bytes sent with `sendfile` by every server of this process (see [`sendfile_bytes`]).
static SENDFILE_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Read data sent straight from the page cache (`sendfile`) since the process started, all
/// servers together: how much of the read traffic skipped the copy through a buffer.
pub fn sendfile_bytes() -> u64 {
    SENDFILE_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Smallest read whose cached data is sent with `sendfile`. Below it the copy is cheap and
/// one write (header and data together) beats two system calls.
const SENDFILE_MIN: usize = 64 * 1024;

/// The socket of a plain (not TLS) TCP or unix connection, registered with the runtime for
/// write readiness, so the writer can `sendfile` cached image data into it: the kernel then
/// hands the page-cache pages to the socket, where a read into a buffer and a write out of it
/// would copy every byte twice. Profiles of nbdcopy reading a cached image showed the two
/// copies as 58 % of the server's CPU, half of it the read.
///
/// It is a duplicate descriptor of the connection's socket: the tokio stream keeps writing
/// headers and ordinary replies, and this one only the file data, always after the writer
/// flushed everything before it, so the byte order on the wire is the reply order.
pub(crate) struct SendfileSocket {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl SendfileSocket {
    /// The socket under `stream` if it is a plain TCP or unix stream, else `None`.
    pub(crate) fn of<S: 'static>(stream: &S) -> Option<SendfileSocket> {
        use std::os::fd::AsFd;
        let any = stream as &dyn std::any::Any;
        let fd = if let Some(t) = any.downcast_ref::<tokio::net::TcpStream>() {
            t.as_fd().try_clone_to_owned()
        } else if let Some(u) = any.downcast_ref::<tokio::net::UnixStream>() {
            u.as_fd().try_clone_to_owned()
        } else {
            return None;
        };
        let fd = fd.ok()?;
        // SAFETY: an OwnedFd is a valid open descriptor that stays open, and always returns
        // the same raw fd, until the AsyncFd that owns it drops it.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::WRITABLE)
        };
        fd.ok().map(|fd| SendfileSocket { fd })
    }

    /// Send `head` (with `MSG_MORE`, so it leaves in the same segments as the data instead
    /// of a packet of its own), then `data` from its file, waiting for socket space as a
    /// write would.
    async fn send(&self, head: &[u8], data: &FileSlice) -> io::Result<()> {
        let mut pos = 0;
        while pos < head.len() {
            let mut ready = self.fd.writable().await?;
            let r = ready.try_io(|fd| {
                let flags = rustix::net::SendFlags::MORE | rustix::net::SendFlags::NOSIGNAL;
                rustix::net::send(fd.get_ref(), &head[pos..], flags).map_err(io::Error::from)
            });
            match r {
                Ok(Ok(n)) => pos += n,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
        let end = data.offset + data.len;
        let mut off = data.offset;
        while off < end {
            let mut ready = self.fd.writable().await?;
            let r = ready.try_io(|fd| {
                let want = usize::try_from(end - off)
                    .unwrap_or(usize::MAX)
                    .min(1 << 30);
                rustix::fs::sendfile(fd.get_ref(), &*data.file, Some(&mut off), want)
                    .map_err(io::Error::from)
            });
            match r {
                Ok(Ok(0)) => {
                    // The file shrank under the reply: the client cannot be given the rest.
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "image file ended in the middle of a read reply",
                    ));
                }
                Ok(Ok(n)) => {
                    SENDFILE_BYTES.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
        Ok(())
    }
}

/// A request's failure: the NBD errno and a message for structured error chunks.
#[derive(Debug)]
struct ReqError {
    errno: u32,
    msg: String,
}

impl From<BlockError> for ReqError {
    fn from(e: BlockError) -> Self {
        ReqError {
            errno: nbd_errno(e.errno()),
            msg: e.to_string(),
        }
    }
}

impl From<ProtoError> for ReqError {
    fn from(e: ProtoError) -> Self {
        einval(e.to_string())
    }
}

fn einval(msg: impl Into<String>) -> ReqError {
    ReqError {
        errno: EINVAL,
        msg: msg.into(),
    }
}

/// What every request task of a connection shares.
struct Conn {
    backend: Arc<BlockBackend>,
    name: String,
    size: u64,
    mode: Mode,
    read_only: bool,
    writethrough: bool,
    contexts: Vec<Context>,
    bufs: BufPool,
    /// Whether read replies may carry file slices ([`SendfileSocket`]).
    sendfile: bool,
}

/// Run the transmission phase until the connection ends.
pub(crate) async fn run(
    shared: &Shared,
    stream: BoxStream,
    session: Session,
    mut stop: watch::Receiver<bool>,
    socket: Option<SendfileSocket>,
) {
    let e = &session.export.export;
    let mut kill = session.export.kill.subscribe();
    let conn = Arc::new(Conn {
        backend: Arc::clone(&e.backend),
        name: e.name.clone(),
        size: session.size,
        mode: session.mode,
        read_only: e.read_only,
        writethrough: e.writethrough,
        contexts: session.contexts.clone(),
        bufs: BufPool::default(),
        sendfile: socket.is_some(),
    });
    tracing::debug!(
        "NBD client on export '{}': {} headers, flags {:#x}, contexts {:?}",
        conn.name,
        conn.mode,
        session.flags,
        conn.contexts
    );
    let (rd, wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let (dead_tx, mut dead) = watch::channel(false);
    let writer = tokio::spawn(writer(wr, rx, dead_tx, Arc::clone(&conn), socket));
    let max_requests = shared.max_requests.min(Semaphore::MAX_PERMITS) as u32;
    let requests = Arc::new(Semaphore::new(max_requests as usize));
    let byte_units = (shared.max_buffered / BYTE_UNIT).min(Semaphore::MAX_PERMITS);
    let bytes = Arc::new(Semaphore::new(byte_units));
    let ext = conn.mode == Mode::Extended;
    let hlen = conn.mode.request_len();
    let mut hdr = [0u8; Request::EXTENDED_LEN];
    let why = loop {
        let r = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break "server shutting down".to_string(),
            _ = kill.wait_for(|k| *k) => break "export removed".to_string(),
            _ = dead.wait_for(|d| *d) => break "reply stream failed".to_string(),
            r = rd.read_exact(&mut hdr[..hlen]) => r,
        };
        if let Err(e) = r {
            break if e.kind() == io::ErrorKind::UnexpectedEof {
                "client closed the connection".to_string()
            } else {
                format!("read failed: {e}")
            };
        }
        let req = match Request::decode(&hdr[..hlen], ext) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("NBD export '{}': {e}; disconnecting", conn.name);
                break format!("malformed request: {e}");
            }
        };
        tracing::trace!("NBD request {req:?}");
        let plen = req.payload_len(ext);
        if plen > MAX_PAYLOAD as u64 {
            tracing::warn!(
                "NBD export '{}': {} payload of {plen} bytes exceeds {MAX_PAYLOAD}; disconnecting",
                conn.name,
                command_name(req.command)
            );
            break "payload too large".to_string();
        }
        if req.command == CMD_DISC {
            break "NBD_CMD_DISC".to_string();
        }
        let cost = match req.command {
            CMD_READ => req.length.min(MAX_PAYLOAD as u64) as usize,
            CMD_BLOCK_STATUS => BLOCK_STATUS_COST + plen as usize,
            CMD_CACHE => CACHE_CHUNK,
            _ => plen as usize,
        };
        let permits = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break "server shutting down".to_string(),
            _ = kill.wait_for(|k| *k) => break "export removed".to_string(),
            _ = dead.wait_for(|d| *d) => break "reply stream failed".to_string(),
            // A request never waits for more than the whole budget.
            p = acquire(&requests, &bytes, cost.div_ceil(BYTE_UNIT).min(byte_units) as u32) => match p {
                Some(p) => p,
                None => break "limits closed".to_string(),
            },
        };
        let payload = if plen > 0 {
            let mut v = vec![0u8; plen as usize];
            // A client that stalls mid-payload must not hold up a shutdown.
            let r = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break "server shutting down".to_string(),
                _ = kill.wait_for(|k| *k) => break "export removed".to_string(),
                r = rd.read_exact(&mut v) => r,
            };
            if let Err(e) = r {
                break format!("client left in the middle of a payload: {e}");
            }
            Some(v)
        } else {
            None
        };
        let c = Arc::clone(&conn);
        let tx = tx.clone();
        tokio::spawn(async move {
            let parts = c.handle(&req, payload).await;
            // A closed channel means the client is gone: the reply and permits just drop.
            let _ = tx.send(Reply {
                parts,
                _permits: permits,
            });
        });
    };
    tracing::debug!("NBD connection to export '{}' ends: {why}", conn.name);
    drop(tx);
    // The writer ends once every request task has queued its reply (or at its first error).
    let _ = writer.await;
    // Barrier: every request task holds a permit until its reply is gone.
    let _ = requests.acquire_many(max_requests).await;
}

async fn acquire(requests: &Arc<Semaphore>, bytes: &Arc<Semaphore>, units: u32) -> Option<Permits> {
    let r = Arc::clone(requests).acquire_owned().await.ok()?;
    let b = if units > 0 {
        Some(Arc::clone(bytes).acquire_many_owned(units).await.ok()?)
    } else {
        None
    };
    Some(Permits {
        _request: r,
        _bytes: b,
    })
}

async fn writer(
    wr: WriteHalf<BoxStream>,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    dead: watch::Sender<bool>,
    conn: Arc<Conn>,
    socket: Option<SendfileSocket>,
) {
    let mut w = BufWriter::with_capacity(256 * 1024, wr);
    let socket = socket.as_ref();
    let r: io::Result<()> = async {
        while let Some(first) = rx.recv().await {
            write_reply(&mut w, first, &conn.bufs, socket).await?;
            // Everything already queued goes out with a single flush.
            while let Ok(next) = rx.try_recv() {
                write_reply(&mut w, next, &conn.bufs, socket).await?;
            }
            w.flush().await?;
        }
        // TLS close_notify, then FIN.
        w.shutdown().await
    }
    .await;
    if let Err(e) = r {
        tracing::debug!("NBD reply stream closed: {e}");
        dead.send_replace(true);
    }
}

async fn write_reply(
    w: &mut BufWriter<WriteHalf<BoxStream>>,
    r: Reply,
    pool: &BufPool,
    socket: Option<&SendfileSocket>,
) -> io::Result<()> {
    for p in r.parts {
        match p {
            Part::Bytes(b) => {
                w.write_all(&b).await?;
                // Once in the writer (or the socket), the bytes are no longer needed.
                pool.put(b);
            }
            Part::File { head, data } => {
                // Everything before this part must be on the socket first.
                w.flush().await?;
                match socket {
                    Some(s) => s.send(&head, &data).await?,
                    // Only connections with a socket get file parts.
                    None => return Err(io::Error::other("file reply part without a socket")),
                }
            }
        }
    }
    Ok(())
}

/// One request's view of its connection: the node it runs against, fixed for its duration.
struct Req<'a> {
    conn: &'a Conn,
    node: &'a Arc<dyn BlockNode>,
}

impl std::ops::Deref for Req<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn
    }
}

impl Conn {
    async fn handle(&self, req: &Request, payload: Option<Vec<u8>>) -> Vec<Part> {
        // Join the backend's in-flight set: a node swap waits for this request to finish.
        let node = self.backend.acquire().await;
        Req {
            conn: self,
            node: &node,
        }
        .handle(req, payload)
        .await
    }
}

impl Req<'_> {
    fn extended(&self) -> bool {
        self.mode == Mode::Extended
    }

    async fn handle(&self, req: &Request, payload: Option<Vec<u8>>) -> Vec<Part> {
        match self.execute(req, payload).await {
            Ok(Some(parts)) => parts,
            Ok(None) => bytes(self.done_reply(req)),
            Err(e) => {
                tracing::debug!(
                    "NBD {} at {} length {} on '{}' failed: errno {}: {}",
                    command_name(req.command),
                    req.offset,
                    req.length,
                    self.name,
                    e.errno,
                    e.msg
                );
                bytes(self.error_reply(req, e))
            }
        }
    }

    /// Success without data: a simple reply, or a NONE chunk in extended mode (where simple
    /// replies are forbidden).
    fn done_reply(&self, req: &Request) -> Vec<Vec<u8>> {
        let mut b = Vec::with_capacity(32);
        if self.extended() {
            // A NONE chunk always encodes.
            let _ = Chunk::None.encode(true, REPLY_FLAG_DONE, req.cookie, req.offset, &mut b);
        } else {
            SimpleReply {
                error: 0,
                cookie: req.cookie,
            }
            .encode(&mut b);
        }
        vec![b]
    }

    fn error_reply(&self, req: &Request, e: ReqError) -> Vec<Vec<u8>> {
        let mut b = Vec::new();
        if self.mode == Mode::Simple {
            SimpleReply {
                error: e.errno,
                cookie: req.cookie,
            }
            .encode(&mut b);
        } else {
            let c = Chunk::Error {
                error: e.errno,
                message: e.msg,
            };
            // An error chunk always encodes (the message is truncated to the string limit).
            let _ = c.encode(
                self.extended(),
                REPLY_FLAG_DONE,
                req.cookie,
                req.offset,
                &mut b,
            );
        }
        vec![b]
    }

    fn chunk(&self, req: &Request, flags: u16, c: &Chunk<'_>) -> Result<Vec<u8>, ReqError> {
        let mut b = Vec::with_capacity(ChunkHeader::EXTENDED_LEN + c.payload_len());
        c.encode(self.extended(), flags, req.cookie, req.offset, &mut b)?;
        Ok(b)
    }

    async fn execute(
        &self,
        req: &Request,
        payload: Option<Vec<u8>>,
    ) -> Result<Option<Vec<Part>>, ReqError> {
        let ext = self.extended();
        let cmd = req.command;
        let mut allowed = CMD_FLAG_FUA;
        match cmd {
            CMD_READ if self.mode != Mode::Simple => allowed |= CMD_FLAG_DF,
            CMD_READ | CMD_FLUSH | CMD_TRIM | CMD_CACHE => {}
            CMD_WRITE if ext => allowed |= CMD_FLAG_PAYLOAD_LEN,
            CMD_WRITE => {}
            CMD_WRITE_ZEROES => allowed |= CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS if ext => allowed |= CMD_FLAG_REQ_ONE | CMD_FLAG_PAYLOAD_LEN,
            CMD_BLOCK_STATUS => allowed |= CMD_FLAG_REQ_ONE,
            other => return Err(einval(format!("unknown command {other}"))),
        }
        if req.flags & !allowed != 0 {
            return Err(einval(format!(
                "flags {:#x} are not valid for {}",
                req.flags & !allowed,
                command_name(cmd)
            )));
        }
        if self.read_only && matches!(cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) {
            return Err(ReqError {
                errno: EPERM,
                msg: format!("export '{}' is read-only", self.name),
            });
        }
        let mut ids = None;
        let len = match (cmd, &payload) {
            (CMD_WRITE, Some(p)) => p.len() as u64,
            (CMD_WRITE, None) => 0,
            (CMD_BLOCK_STATUS, Some(p)) => {
                let bp = BlockStatusPayload::decode(p)?;
                ids = Some(bp.ids);
                bp.effect_length
            }
            (_, Some(_)) => return Err(einval("unexpected payload")),
            (_, None) => req.length,
        };
        if matches!(cmd, CMD_READ) && len > MAX_PAYLOAD as u64 {
            return Err(einval(format!(
                "read of {len} bytes exceeds the maximum payload of {MAX_PAYLOAD}"
            )));
        }
        if cmd == CMD_BLOCK_STATUS && len == 0 {
            return Err(einval("block status length must be positive"));
        }
        if cmd != CMD_FLUSH {
            match req.offset.checked_add(len) {
                Some(end) if end <= self.size => {}
                _ => {
                    return Err(ReqError {
                        errno: if matches!(cmd, CMD_WRITE | CMD_WRITE_ZEROES) {
                            ENOSPC
                        } else {
                            EINVAL
                        },
                        msg: format!(
                        "request at offset {} length {len} is past the end of the export (size {})",
                        req.offset, self.size
                    ),
                    })
                }
            }
        }
        // Writethrough exports make every modification durable before replying.
        let fua = req.flags & CMD_FLAG_FUA != 0
            || (self.writethrough && matches!(cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES));
        match cmd {
            CMD_READ => self.read(req, len).await.map(Some),
            CMD_WRITE => {
                if let Some(p) = payload {
                    // Owned: qcow2 and raw over a file write the payload without copying it.
                    self.node.write_owned(req.offset, p).await?;
                }
                if fua {
                    self.node.flush().await?;
                }
                Ok(None)
            }
            CMD_FLUSH => {
                self.node.flush().await?;
                Ok(None)
            }
            CMD_TRIM => {
                if len > 0 {
                    self.node.discard(req.offset, len).await?;
                }
                if fua {
                    self.node.flush().await?;
                }
                Ok(None)
            }
            CMD_CACHE => {
                self.cache(req.offset, len).await?;
                Ok(None)
            }
            CMD_WRITE_ZEROES => {
                self.write_zeroes(req, len).await?;
                if fua {
                    self.node.flush().await?;
                }
                Ok(None)
            }
            _ => self
                .block_status(req, len, ids)
                .await
                .map(|b| Some(bytes(b))),
        }
    }

    async fn read(&self, req: &Request, len: u64) -> Result<Vec<Part>, ReqError> {
        if req.flags & CMD_FLAG_FUA != 0 {
            self.node.flush().await?;
        }
        let n = len as usize;
        if self.mode == Mode::Simple {
            let resident = self.resident(req.offset, n).await;
            let mut b = self.bufs.take(match resident {
                Some(_) => SimpleReply::LEN,
                None => SimpleReply::LEN + n,
            });
            SimpleReply {
                error: 0,
                cookie: req.cookie,
            }
            .encode(&mut b);
            if let Some(data) = resident {
                return Ok(vec![Part::File { head: b, data }]);
            }
            let b = self.node.read_append(req.offset, b, n).await?;
            return Ok(vec![Part::Bytes(b)]);
        }
        if n == 0 {
            return Ok(vec![Part::Bytes(self.chunk(
                req,
                REPLY_FLAG_DONE,
                &Chunk::None,
            )?)]);
        }
        if req.flags & CMD_FLAG_DF != 0 {
            return Ok(vec![self.data_chunk(req, req.offset, n, true).await?]);
        }
        let runs = self.read_runs(req.offset, len).await;
        let mut out = Vec::with_capacity(runs.len());
        let last = runs.len().saturating_sub(1);
        for (i, &(start, rlen, zero)) in runs.iter().enumerate() {
            let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
            if zero {
                let c = Chunk::OffsetHole {
                    offset: start,
                    length: rlen as u32,
                };
                out.push(Part::Bytes(self.chunk(req, flags, &c)?));
            } else {
                out.push(
                    self.data_chunk(req, start, rlen as usize, i == last)
                        .await?,
                );
            }
        }
        Ok(out)
    }

    /// Split `[offset, offset+len)` into runs that read as zeroes or hold data. A failing
    /// status query only costs sparseness: the rest is sent as data.
    async fn read_runs(&self, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
        let end = offset + len;
        let mut pos = offset;
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        while pos < end {
            let (l, zero) = match map_extent(self.node, pos, end - pos).await {
                Ok(e) if e.length > 0 => (e.length.min(end - pos), e.zero),
                _ => (end - pos, false),
            };
            match runs.last_mut() {
                Some(r) if r.2 == zero => r.1 += l,
                _ => runs.push((pos, l, zero)),
            }
            pos += l;
        }
        runs
    }

    /// The file range to `sendfile` for a read of `n` bytes at `offset`, when the connection
    /// can, the read is large enough to be worth it and the node has the data cached in one
    /// file range; else `None` (the read goes into the reply buffer).
    async fn resident(&self, offset: u64, n: usize) -> Option<FileSlice> {
        if !self.sendfile || n < SENDFILE_MIN {
            return None;
        }
        // An error here only means the ordinary read path (which reports it).
        self.node
            .resident_slice(offset, n as u64)
            .await
            .ok()
            .flatten()
    }

    /// One `OFFSET_DATA` chunk: its data sent from the page cache when it is there (see
    /// [`SendfileSocket`]), else read straight into the reply buffer (no copy, no zero-fill).
    async fn data_chunk(
        &self,
        req: &Request,
        offset: u64,
        n: usize,
        done: bool,
    ) -> Result<Part, ReqError> {
        let ext = self.extended();
        let hl = if ext {
            ChunkHeader::EXTENDED_LEN
        } else {
            ChunkHeader::STRUCTURED_LEN
        };
        let resident = self.resident(offset, n).await;
        let mut b = self.bufs.take(match resident {
            Some(_) => hl + 8,
            None => hl + 8 + n,
        });
        ChunkHeader {
            flags: if done { REPLY_FLAG_DONE } else { 0 },
            kind: REPLY_TYPE_OFFSET_DATA,
            cookie: req.cookie,
            offset: req.offset,
            length: 8 + n as u64,
        }
        .encode(ext, &mut b)?;
        b.extend_from_slice(&offset.to_be_bytes());
        if let Some(data) = resident {
            return Ok(Part::File { head: b, data });
        }
        Ok(Part::Bytes(self.node.read_append(offset, b, n).await?))
    }

    /// Prefetch: read the data extents (not the zero ones) of at most 32 MiB of the range, so
    /// later reads hit the host's page cache.
    async fn cache(&self, offset: u64, len: u64) -> Result<(), ReqError> {
        let len = len.min(MAX_PAYLOAD as u64);
        let mut buf = Vec::new();
        for (start, rlen, zero) in self.read_runs(offset, len).await {
            if zero {
                continue;
            }
            let mut pos = start;
            while pos < start + rlen {
                let n = (start + rlen - pos).min(CACHE_CHUNK as u64) as usize;
                buf.resize(n, 0);
                self.node.read(pos, &mut buf[..n]).await?;
                pos += n as u64;
            }
        }
        Ok(())
    }

    /// Whether every byte of `[start, end)` reads as zeroes through the whole chain.
    async fn reads_zero(&self, start: u64, end: u64) -> Result<bool, ReqError> {
        let mut pos = start;
        while pos < end {
            let e = map_extent(self.node, pos, end - pos).await?;
            if !e.zero {
                return Ok(false);
            }
            pos += e.length.max(1);
        }
        Ok(true)
    }

    async fn write_zeroes(&self, req: &Request, len: u64) -> Result<(), ReqError> {
        let unmap = req.flags & CMD_FLAG_NO_HOLE == 0;
        let (mut start, mut end) = (req.offset, req.offset + len);
        if len == 0 {
            return Ok(());
        }
        if req.flags & CMD_FLAG_FAST_ZERO != 0 {
            let not_fast = || ReqError {
                errno: ENOTSUP,
                msg: "zeroing this range would need data writes".into(),
            };
            let node_size = self.node.size();
            if let Some(q) = self.node.as_any().downcast_ref::<Qcow2>() {
                let cs = self.node.cluster_size().unwrap_or(512).max(1);
                if q.header().await.version < 3 && self.node.backing().is_some() {
                    // No zero clusters: only a range that is zero already is fast (a no-op).
                    return if self.reads_zero(start, end).await? {
                        Ok(())
                    } else {
                        Err(not_fast())
                    };
                }
                if start % cs != 0 {
                    let head = start / cs * cs;
                    if !self.reads_zero(head, (head + cs).min(node_size)).await? {
                        return Err(not_fast());
                    }
                    start = head;
                }
                if end % cs != 0 && end < node_size {
                    let tail = end / cs * cs;
                    let tail_end = (tail + cs).min(node_size);
                    if !self.reads_zero(tail.max(start), tail_end).await? {
                        return Err(not_fast());
                    }
                    end = tail_end;
                }
            } else if self.node.format_name() != "raw" {
                // A driver we know nothing about: only a no-op is certainly fast.
                return if self.reads_zero(start, end).await? {
                    Ok(())
                } else {
                    Err(not_fast())
                };
            }
        }
        self.node.write_zeroes(start, end - start, unmap).await?;
        Ok(())
    }

    async fn block_status(
        &self,
        req: &Request,
        len: u64,
        ids: Option<Vec<u32>>,
    ) -> Result<Vec<Vec<u8>>, ReqError> {
        if self.contexts.is_empty() {
            return Err(einval("no metadata context was negotiated"));
        }
        let contexts = match ids {
            None => self.contexts.clone(),
            Some(ids) => {
                let mut v: Vec<Context> = Vec::with_capacity(ids.len());
                for id in ids {
                    let Some(c) = self.contexts.iter().find(|c| c.id() == id) else {
                        return Err(einval(format!("context id {id} was not negotiated")));
                    };
                    if v.contains(c) {
                        return Err(einval(format!("context id {id} is listed twice")));
                    }
                    v.push(*c);
                }
                v
            }
        };
        let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
        let mut out = Vec::with_capacity(contexts.len());
        let last = contexts.len() - 1;
        for (i, &c) in contexts.iter().enumerate() {
            let extents = self.extents(c, req.offset, len, req_one).await?;
            let chunk = if self.extended() {
                Chunk::BlockStatusExt {
                    context_id: c.id(),
                    extents,
                }
            } else {
                Chunk::BlockStatus {
                    context_id: c.id(),
                    extents,
                }
            };
            let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
            out.push(self.chunk(req, flags, &chunk)?);
        }
        Ok(out)
    }

    /// Merged extents of one context over `[offset, offset+len)`: one with REQ_ONE, at most
    /// [`MAX_EXTENTS`] otherwise (the client asks again for the rest).
    async fn extents(
        &self,
        ctx: Context,
        offset: u64,
        len: u64,
        req_one: bool,
    ) -> Result<Vec<Extent>, ReqError> {
        let cap = if req_one { 1 } else { MAX_EXTENTS };
        let end = offset + len;
        let mut pos = offset;
        let mut out: Vec<Extent> = Vec::new();
        while pos < end {
            let e = map_extent(self.node, pos, end - pos).await?;
            if e.length == 0 {
                return Err(ReqError {
                    errno: EIO,
                    msg: format!("block status made no progress at offset {pos}"),
                });
            }
            let l = e.length.min(end - pos);
            let flags = match ctx {
                Context::BaseAllocation => {
                    let mut f = 0;
                    if !e.data {
                        f |= STATE_HOLE;
                    }
                    if e.zero {
                        f |= STATE_ZERO;
                    }
                    f as u64
                }
                Context::AllocationDepth => {
                    if e.present {
                        e.depth as u64 + 1
                    } else {
                        0
                    }
                }
            };
            let full = out.len() == cap;
            match out.last_mut() {
                Some(x) if x.flags == flags => x.length += l,
                _ if full => break,
                _ => out.push(Extent { length: l, flags }),
            }
            pos += l;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_pool_recycles_within_its_bounds() {
        let pool = BufPool::default();
        let mut b = pool.take(256 * 1024);
        b.extend_from_slice(b"reply");
        let cap = b.capacity();
        let ptr = b.as_ptr();
        pool.put(b);
        // Reused, empty, for any request that fits.
        let b = pool.take(100 * 1024);
        assert!(b.is_empty());
        assert_eq!((b.as_ptr(), b.capacity()), (ptr, cap));
        pool.put(b);
        // Too large for the idle buffer: a fresh one.
        assert!(pool.take(512 * 1024).capacity() >= 512 * 1024);
        // Small and huge buffers are not kept; the idle bytes are bounded.
        pool.put(Vec::with_capacity(4096));
        pool.put(Vec::with_capacity(RECYCLE_MAX + 1));
        for _ in 0..2 * RECYCLE_IDLE / RECYCLE_MAX {
            pool.put(Vec::with_capacity(RECYCLE_MAX));
        }
        let g = pool.free.lock().unwrap();
        assert!(g.1 <= RECYCLE_IDLE);
        assert!(g.0.iter().all(|b| b.capacity() >= RECYCLE_MIN));
        assert_eq!(g.1, g.0.iter().map(|b| b.capacity()).sum::<usize>());
    }

    #[test]
    fn einval_has_errno_22() {
        assert_eq!(einval("x").errno, 22);
        let e: ReqError = BlockError::ReadOnly("f".into()).into();
        assert_eq!(e.errno, EPERM);
        let e: ReqError = BlockError::NoSpace("f".into()).into();
        assert_eq!(e.errno, ENOSPC);
    }
}
