//! One NBD connection in the transmission phase: pipelined requests, replies matched by cookie.
//!
//! * **Submitting** a request takes a slot of the connection's in-flight semaphore, registers a
//!   pending entry under a fresh cookie (before anything is sent, so the reply cannot overtake
//!   it), and queues the encoded header and payload for the writer task.
//! * **The writer task** owns the socket's write half and writes queued requests one after the
//!   other, coalescing small ones into one buffered write; a request is never interleaved with
//!   another, and a caller that gives up waiting cannot leave half a request on the wire.
//! * **The reader task** owns the read half. It decodes each reply header, takes the pending
//!   entry for its cookie and handles the chunk: read data goes straight into the request's
//!   buffer (allocated by the requester, so its size is the request's, never a length the
//!   server chose), holes are zero-filled, block status descriptors are clipped to the request,
//!   errors are remembered; on the final chunk the requester is woken.
//! * **Death**: any I/O error, EOF or protocol violation marks the connection dead, fails every
//!   pending request with [`SubmitError::Lost`], closes the semaphore, stops both tasks and tells
//!   the session once (by generation), which decides whether to reconnect (see
//!   [`super::session`]).
//!
//! Everything the server sends is validated against what was asked: unknown cookies, chunks
//! outside the request, overlapping or missing read data, block status for contexts that were
//! not negotiated, chunk types that do not fit the command or the header style are protocol
//! violations and hang up the connection (a malicious server cannot make us panic or allocate
//! more than the request's size).

use super::error::ClientError;
use super::handshake::Negotiated;
use super::slots::{SlotPermit, Slots};
use crate::proto::{self, *};
use diskstream_block::priority::{self, IoClass};
use std::collections::VecDeque;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

/// The read half of a connection's stream.
pub(crate) type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
/// The write half of a connection's stream.
pub(crate) type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

/// Most disjoint pieces a read reply may arrive in before we call the server hostile (real
/// servers send their chunks in order, which coalesces into one piece).
const MAX_READ_PIECES: usize = 65_536;
/// Largest error chunk payload: error, message length, a 4096-byte message, an offset, slack.
const MAX_ERROR_PAYLOAD: u64 = 64 << 10;
/// Largest block status chunk we read: 2^20 descriptors of 16 bytes (the specification's
/// recommended cap on descriptors per chunk) and the header fields.
const MAX_STATUS_PAYLOAD: u64 = 8 + 16 * (1 << 20);

/// Which metadata context a block status query asks about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetaContext {
    /// `base:allocation`: [`proto::STATE_HOLE`] and [`proto::STATE_ZERO`] flags.
    BaseAllocation,
    /// `qemu:allocation-depth`: the flags are the depth of the layer providing the data (0:
    /// unallocated in the whole chain, 1: the top, 2: its backing file, ...).
    AllocationDepth,
}

impl MetaContext {
    /// The context's name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            MetaContext::BaseAllocation => CONTEXT_BASE_ALLOCATION,
            MetaContext::AllocationDepth => CONTEXT_QEMU_ALLOCATION_DEPTH,
        }
    }
}

/// A write payload shared with the caller, so that splitting a large write copies nothing.
#[derive(Clone)]
pub(crate) struct Payload {
    data: Arc<Vec<u8>>,
    start: usize,
    end: usize,
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes", self.len())
    }
}

impl Payload {
    /// The whole vector.
    pub(crate) fn new(data: Vec<u8>) -> Self {
        let end = data.len();
        Payload {
            data: Arc::new(data),
            start: 0,
            end,
        }
    }
    /// A sub-slice `[from, from+len)` of this payload (clamped to it).
    pub(crate) fn slice(&self, from: usize, len: usize) -> Self {
        let start = (self.start + from).min(self.end);
        Payload {
            data: Arc::clone(&self.data),
            start,
            end: (start + len).min(self.end),
        }
    }
    fn bytes(&self) -> &[u8] {
        self.data.get(self.start..self.end).unwrap_or(&[])
    }
    pub(crate) fn len(&self) -> usize {
        self.end - self.start
    }
}

/// One transmission-phase command, already split to fit the export's limits.
#[derive(Clone, Debug)]
pub(crate) enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Payload,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        no_hole: bool,
        fast: bool,
        fua: bool,
    },
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Flush,
    Cache {
        offset: u64,
        len: u64,
    },
    BlockStatus {
        offset: u64,
        len: u64,
        context: MetaContext,
        req_one: bool,
    },
}

impl Command {
    fn code(&self) -> u16 {
        match self {
            Command::Read { .. } => CMD_READ,
            Command::Write { .. } => CMD_WRITE,
            Command::WriteZeroes { .. } => CMD_WRITE_ZEROES,
            Command::Trim { .. } => CMD_TRIM,
            Command::Flush => CMD_FLUSH,
            Command::Cache { .. } => CMD_CACHE,
            Command::BlockStatus { .. } => CMD_BLOCK_STATUS,
        }
    }
}

/// A successful reply.
#[derive(Debug)]
pub(crate) enum Reply {
    /// The command succeeded (no data).
    Done,
    /// Read data, exactly the requested length.
    Data(Vec<u8>),
    /// Block status descriptors for the asked context, clipped to the request (at least one).
    Extents(Vec<proto::Extent>),
}

/// Why a submitted command did not succeed.
#[derive(Debug)]
pub(crate) enum SubmitError {
    /// The connection died before the reply was complete; the command may be retried on a new
    /// connection. The string says why.
    Lost(String),
    /// The command failed for good (server error reply, invalid request).
    Failed(ClientError),
}

/// Why a connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Death {
    /// I/O error or EOF: the server or the network went away; worth reconnecting.
    Lost(String),
    /// The server broke the protocol: never retried (like QEMU, which quits).
    Violation(String),
    /// We closed it.
    Closed,
}

impl Death {
    fn reason(&self) -> String {
        match self {
            Death::Lost(s) => s.clone(),
            Death::Violation(s) => format!("protocol violation: {s}"),
            Death::Closed => "connection closed by the client".into(),
        }
    }
}

/// A connection's death, reported to the session's supervisor.
#[derive(Debug)]
pub(crate) struct DeathNotice {
    pub generation: u64,
    pub death: Death,
}

enum Outgoing {
    Request {
        header: Vec<u8>,
        payload: Option<Payload>,
        class: IoClass,
    },
    Disconnect {
        header: Vec<u8>,
    },
}

/// Pieces of a read reply received so far (disjoint `[start, end)` ranges, coalesced).
#[derive(Default)]
struct Coverage {
    pieces: BTreeMap<u64, u64>,
    covered: u64,
}

impl Coverage {
    /// Record `[s, e)`; an overlap with earlier data is an error.
    fn add(&mut self, s: u64, e: u64) -> Result<(), String> {
        if let Some((_, &pe)) = self.pieces.range(..e).next_back() {
            if pe > s {
                return Err(format!("read reply chunk [{s}, {e}) overlaps earlier data"));
            }
        }
        let mut start = s;
        let mut end = e;
        // Coalesce with the piece ending at s and the piece starting at e.
        if let Some((&ps, &pe)) = self.pieces.range(..s).next_back() {
            if pe == s {
                self.pieces.remove(&ps);
                start = ps;
            }
        }
        if let Some(ne) = self.pieces.remove(&e) {
            end = ne;
        }
        self.pieces.insert(start, end);
        self.covered += e - s;
        if self.pieces.len() > MAX_READ_PIECES {
            return Err("read reply fragmented into too many chunks".into());
        }
        Ok(())
    }
}

enum EntryState {
    Plain,
    Read {
        buf: Vec<u8>,
        cov: Coverage,
    },
    Status {
        want: u32,
        req_one: bool,
        got: Option<Vec<proto::Extent>>,
        seen: Vec<u32>,
    },
}

struct Entry {
    command: u16,
    offset: u64,
    length: u64,
    state: EntryState,
    error: Option<(u32, String)>,
    tx: oneshot::Sender<Result<Reply, SubmitError>>,
    _permit: SlotPermit,
}

impl Entry {
    fn finish(self, result: Result<Reply, SubmitError>) {
        // The requester may have stopped waiting; that is fine.
        let _ = self.tx.send(result);
    }
}

#[derive(Default)]
struct Table {
    dead: Option<Death>,
    closing: bool,
    entries: HashMap<u64, Entry>,
}

struct Shared {
    server: String,
    generation: u64,
    table: Mutex<Table>,
    slots: Arc<Slots>,
    tasks: Mutex<Vec<AbortHandle>>,
    events: mpsc::UnboundedSender<DeathNotice>,
}

impl Shared {
    fn table(&self) -> MutexGuard<'_, Table> {
        // A poisoned lock only means another thread panicked while holding it; the table is
        // still consistent (every update is a single insert or remove).
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn dead_reason(&self) -> Option<String> {
        self.table().dead.as_ref().map(Death::reason)
    }

    /// Mark the connection dead (first caller wins), fail pending requests, stop the tasks and
    /// tell the session.
    fn fail(&self, death: Death) {
        let drained: Vec<Entry> = {
            let mut t = self.table();
            if t.dead.is_some() {
                return;
            }
            let death = if t.closing && matches!(death, Death::Lost(_)) {
                Death::Closed
            } else {
                death
            };
            t.dead = Some(death);
            t.entries.drain().map(|(_, e)| e).collect()
        };
        let reason = self.dead_reason().unwrap_or_default();
        for e in drained {
            e.finish(Err(SubmitError::Lost(reason.clone())));
        }
        self.slots.close();
        let death = self.table().dead.clone().unwrap_or(Death::Closed);
        match &death {
            Death::Lost(r) => tracing::debug!(server = %self.server, "NBD connection lost: {r}"),
            Death::Violation(r) => {
                tracing::error!(server = %self.server, "NBD protocol violation, hanging up: {r}")
            }
            Death::Closed => tracing::debug!(server = %self.server, "NBD connection closed"),
        }
        let _ = self.events.send(DeathNotice {
            generation: self.generation,
            death,
        });
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            t.abort();
        }
    }

    fn take(&self, cookie: u64) -> Option<Entry> {
        self.table().entries.remove(&cookie)
    }

    fn put_back(&self, cookie: u64, e: Entry) {
        let mut t = self.table();
        if t.dead.is_none() {
            t.entries.insert(cookie, e);
        }
        // Dead: dropping the entry wakes its requester with "lost".
    }
}

/// A live (or dead) connection.
pub(crate) struct Conn {
    /// What the handshake settled for this connection.
    pub(crate) neg: Negotiated,
    shared: Arc<Shared>,
    out: mpsc::UnboundedSender<Outgoing>,
    next_cookie: AtomicU64,
}

impl Conn {
    /// Start the reader and writer tasks on a negotiated stream.
    pub(crate) fn start(
        server: String,
        generation: u64,
        neg: Negotiated,
        rd: BoxRead,
        wr: BoxWrite,
        max_in_flight: usize,
        events: mpsc::UnboundedSender<DeathNotice>,
    ) -> Arc<Conn> {
        let shared = Arc::new(Shared {
            server,
            generation,
            table: Mutex::new(Table::default()),
            slots: Slots::new(max_in_flight),
            tasks: Mutex::new(Vec::new()),
            events,
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_loop(Arc::clone(&shared), neg.clone(), rd));
        let writer = tokio::spawn(write_loop(Arc::clone(&shared), wr, rx));
        *shared.tasks.lock().unwrap_or_else(|p| p.into_inner()) =
            vec![reader.abort_handle(), writer.abort_handle()];
        Arc::new(Conn {
            neg,
            shared,
            out: tx,
            next_cookie: AtomicU64::new(1),
        })
    }

    /// Whether the connection has died.
    pub(crate) fn is_dead(&self) -> bool {
        self.shared.table().dead.is_some()
    }

    /// Kill the connection from outside (another connection of the same session died).
    pub(crate) fn abandon(&self, why: &str) {
        self.shared.fail(Death::Lost(why.to_string()));
    }

    /// Send `NBD_CMD_DISC` after the requests already queued and let the connection end.
    /// Requests still waiting for replies fail as lost.
    pub(crate) fn close(&self) {
        {
            let mut t = self.shared.table();
            if t.dead.is_some() || t.closing {
                return;
            }
            t.closing = true;
        }
        let mut header = Vec::with_capacity(Request::EXTENDED_LEN);
        let req = Request {
            flags: 0,
            command: CMD_DISC,
            cookie: 0,
            offset: 0,
            length: 0,
        };
        if req
            .encode(self.neg.mode == Mode::Extended, &mut header)
            .is_err()
            || self.out.send(Outgoing::Disconnect { header }).is_err()
        {
            self.shared.fail(Death::Closed);
        }
    }

    /// Send `cmd` and wait for its complete reply.
    pub(crate) async fn submit(&self, cmd: &Command) -> Result<Reply, SubmitError> {
        let lost = |s: &Shared| {
            SubmitError::Lost(
                s.dead_reason()
                    .unwrap_or_else(|| "connection lost".to_string()),
            )
        };
        // Guest requests go first (see `slots`), and are counted while they wait on the
        // server so that background jobs can step back (`diskstream_block::priority`).
        let class = priority::current();
        let _remote = priority::remote_begin();
        let permit = match self.shared.slots.acquire(class).await {
            Ok(p) => p,
            Err(_) => return Err(lost(&self.shared)),
        };
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (header, payload, state, offset, length) =
            self.encode(cmd, cookie).map_err(SubmitError::Failed)?;
        let (tx, rx) = oneshot::channel();
        {
            let mut t = self.shared.table();
            if t.dead.is_some() || t.closing {
                drop(t);
                return Err(lost(&self.shared));
            }
            t.entries.insert(
                cookie,
                Entry {
                    command: cmd.code(),
                    offset,
                    length,
                    state,
                    error: None,
                    tx,
                    _permit: permit,
                },
            );
        }
        if self
            .out
            .send(Outgoing::Request {
                header,
                payload,
                class,
            })
            .is_err()
        {
            self.shared
                .fail(Death::Lost("the connection's writer has stopped".into()));
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(lost(&self.shared)),
        }
    }

    #[allow(clippy::type_complexity)]
    fn encode(
        &self,
        cmd: &Command,
        cookie: u64,
    ) -> Result<(Vec<u8>, Option<Payload>, EntryState, u64, u64), ClientError> {
        let extended = self.neg.mode == Mode::Extended;
        let fua = |f: bool| if f { CMD_FLAG_FUA } else { 0 };
        let mut payload = None;
        let mut state = EntryState::Plain;
        let (flags, offset, length, effect) = match cmd {
            Command::Read { offset, len } => {
                state = EntryState::Read {
                    buf: vec![0u8; *len as usize],
                    cov: Coverage::default(),
                };
                (0, *offset, *len as u64, *len as u64)
            }
            Command::Write {
                offset,
                data,
                fua: f,
            } => {
                let len = data.len() as u64;
                payload = Some(data.clone());
                let pl = if extended { CMD_FLAG_PAYLOAD_LEN } else { 0 };
                (fua(*f) | pl, *offset, len, len)
            }
            Command::WriteZeroes {
                offset,
                len,
                no_hole,
                fast,
                fua: f,
            } => {
                let mut fl = fua(*f);
                if *no_hole {
                    fl |= CMD_FLAG_NO_HOLE;
                }
                if *fast {
                    fl |= CMD_FLAG_FAST_ZERO;
                }
                (fl, *offset, *len, *len)
            }
            Command::Trim {
                offset,
                len,
                fua: f,
            } => (fua(*f), *offset, *len, *len),
            Command::Flush => (0, 0, 0, 0),
            Command::Cache { offset, len } => (0, *offset, *len, *len),
            Command::BlockStatus {
                offset,
                len,
                context,
                req_one,
            } => {
                let want = match context {
                    MetaContext::BaseAllocation => self.neg.base_allocation,
                    MetaContext::AllocationDepth => self.neg.allocation_depth,
                }
                .ok_or_else(|| {
                    ClientError::NotSupported(format!(
                        "the server did not agree to the '{}' metadata context",
                        context.name()
                    ))
                })?;
                state = EntryState::Status {
                    want,
                    req_one: *req_one,
                    got: None,
                    seen: Vec::new(),
                };
                let mut fl = if *req_one { CMD_FLAG_REQ_ONE } else { 0 };
                let both =
                    self.neg.base_allocation.is_some() && self.neg.allocation_depth.is_some();
                if extended && both && self.neg.flags & FLAG_BLOCK_STAT_PAYLOAD != 0 {
                    // Ask only for the context we want instead of receiving both.
                    let mut p = Vec::with_capacity(12);
                    BlockStatusPayload {
                        effect_length: *len,
                        ids: vec![want],
                    }
                    .encode(&mut p);
                    fl |= CMD_FLAG_PAYLOAD_LEN;
                    let plen = p.len() as u64;
                    payload = Some(Payload::new(p));
                    (fl, *offset, plen, *len)
                } else {
                    (fl, *offset, *len, *len)
                }
            }
        };
        let mut header = Vec::with_capacity(Request::EXTENDED_LEN);
        Request {
            flags,
            command: cmd.code(),
            cookie,
            offset,
            length,
        }
        .encode(extended, &mut header)
        .map_err(|e| ClientError::InvalidRequest(e.to_string()))?;
        Ok((header, payload, state, offset, effect))
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Nobody can submit any more: let the tasks go.
        self.close();
    }
}

/// Requests queued for the writer: foreground ones are written first; a disconnect goes
/// after everything queued before it (nothing is queued after it).
#[derive(Default)]
struct WriteQueue {
    foreground: VecDeque<(Vec<u8>, Option<Payload>)>,
    background: VecDeque<(Vec<u8>, Option<Payload>)>,
    disconnect: Option<Vec<u8>>,
}

impl WriteQueue {
    fn push(&mut self, m: Outgoing) {
        match m {
            Outgoing::Request {
                header,
                payload,
                class: IoClass::Foreground,
            } => self.foreground.push_back((header, payload)),
            Outgoing::Request {
                header,
                payload,
                class: IoClass::Background,
            } => self.background.push_back((header, payload)),
            Outgoing::Disconnect { header } => self.disconnect = Some(header),
        }
    }

    fn is_empty(&self) -> bool {
        self.foreground.is_empty() && self.background.is_empty() && self.disconnect.is_none()
    }
}

async fn write_loop(shared: Arc<Shared>, wr: BoxWrite, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
    let mut w = BufWriter::with_capacity(64 << 10, wr);
    let mut q = WriteQueue::default();
    let res: std::io::Result<()> = async {
        loop {
            if q.is_empty() {
                match rx.recv().await {
                    Some(m) => q.push(m),
                    None => return Ok(()),
                }
            }
            // Take in whatever else is queued, so a foreground request queued behind
            // background ones is written before them.
            while let Ok(m) = rx.try_recv() {
                q.push(m);
            }
            if let Some((header, payload)) = q
                .foreground
                .pop_front()
                .or_else(|| q.background.pop_front())
            {
                w.write_all(&header).await?;
                if let Some(p) = payload {
                    w.write_all(p.bytes()).await?;
                }
            } else if let Some(header) = q.disconnect.take() {
                w.write_all(&header).await?;
                w.flush().await?;
                let _ = w.shutdown().await;
                shared.fail(Death::Closed);
                return Ok(());
            }
            // Coalesce what is queued into one flush; flush when nothing more is waiting.
            if q.is_empty() {
                w.flush().await?;
            }
        }
    }
    .await;
    if let Err(e) = res {
        shared.fail(Death::Lost(format!("write to the server failed: {e}")));
    }
}

async fn read_loop(shared: Arc<Shared>, neg: Negotiated, rd: BoxRead) {
    let mut r = BufReader::with_capacity(128 << 10, rd);
    let death = match read_replies(&shared, &neg, &mut r).await {
        Ok(()) => Death::Closed,
        Err(d) => d,
    };
    shared.fail(death);
}

fn io_death(e: std::io::Error) -> Death {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        Death::Lost("the server closed the connection".into())
    } else {
        Death::Lost(format!("read from the server failed: {e}"))
    }
}

fn violation(msg: impl Into<String>) -> Death {
    Death::Violation(msg.into())
}

async fn read_replies<R: AsyncRead + Unpin>(
    shared: &Shared,
    neg: &Negotiated,
    r: &mut R,
) -> Result<(), Death> {
    loop {
        let mut hb = [0u8; ChunkHeader::EXTENDED_LEN];
        r.read_exact(&mut hb[..4]).await.map_err(io_death)?;
        let magic = u32::from_be_bytes([hb[0], hb[1], hb[2], hb[3]]);
        let allowed = match neg.mode {
            Mode::Simple => magic == SIMPLE_REPLY_MAGIC,
            Mode::Structured => magic == SIMPLE_REPLY_MAGIC || magic == STRUCTURED_REPLY_MAGIC,
            Mode::Extended => magic == EXTENDED_REPLY_MAGIC,
        };
        let hlen = ReplyHeader::len_for_magic(magic)
            .filter(|_| allowed)
            .ok_or_else(|| violation(format!("reply magic {magic:#x} in {} mode", neg.mode)))?;
        r.read_exact(&mut hb[4..hlen]).await.map_err(io_death)?;
        let h = ReplyHeader::decode(&hb[..hlen]).map_err(|e| violation(e.to_string()))?;
        let cookie = h.cookie();
        let Some(mut entry) = shared.take(cookie) else {
            if let Some(reason) = shared.dead_reason() {
                return Err(Death::Lost(reason));
            }
            return Err(violation(format!("reply for unknown cookie {cookie}")));
        };
        match h {
            ReplyHeader::Simple(s) => {
                let result = if s.error != 0 {
                    // Only an error may come as a simple reply to a read in structured mode,
                    // and then without data.
                    Err(SubmitError::Failed(server_error(
                        &entry,
                        s.error,
                        String::new(),
                    )))
                } else {
                    match std::mem::replace(&mut entry.state, EntryState::Plain) {
                        EntryState::Read { mut buf, .. } => {
                            if neg.mode != Mode::Simple {
                                return Err(violation(
                                    "simple reply with data to a read after structured replies were agreed",
                                ));
                            }
                            r.read_exact(&mut buf).await.map_err(io_death)?;
                            Ok(Reply::Data(buf))
                        }
                        EntryState::Status { .. } => {
                            return Err(violation("simple success reply to NBD_CMD_BLOCK_STATUS"))
                        }
                        EntryState::Plain => Ok(Reply::Done),
                    }
                };
                entry.finish(result);
            }
            ReplyHeader::Structured(c) | ReplyHeader::Extended(c) => {
                if neg.mode == Mode::Extended && c.offset != entry.offset {
                    return Err(violation(format!(
                        "extended reply offset {} differs from the request's {}",
                        c.offset, entry.offset
                    )));
                }
                handle_chunk(neg, &mut entry, &c, r).await?;
                if c.done() {
                    let result = finish_reply(&mut entry)?;
                    entry.finish(result);
                } else {
                    shared.put_back(cookie, entry);
                }
            }
        }
    }
}

fn server_error(entry: &Entry, errno: u32, message: String) -> ClientError {
    ClientError::Server {
        command: command_name(entry.command),
        offset: entry.offset,
        length: entry.length,
        errno,
        message,
    }
}

async fn read_payload<R: AsyncRead + Unpin>(
    r: &mut R,
    len: u64,
    max: u64,
    what: &str,
) -> Result<Vec<u8>, Death> {
    if len > max {
        return Err(violation(format!("{len}-byte {what} chunk")));
    }
    let mut p = vec![0u8; len as usize];
    r.read_exact(&mut p).await.map_err(io_death)?;
    Ok(p)
}

/// Handle one structured/extended chunk for `entry` (reads its payload).
async fn handle_chunk<R: AsyncRead + Unpin>(
    neg: &Negotiated,
    entry: &mut Entry,
    c: &ChunkHeader,
    r: &mut R,
) -> Result<(), Death> {
    let end = entry.offset.saturating_add(entry.length);
    match c.kind {
        REPLY_TYPE_OFFSET_DATA => {
            let EntryState::Read { buf, cov } = &mut entry.state else {
                return Err(violation(
                    "OFFSET_DATA chunk for a command that is not a read",
                ));
            };
            if c.length <= 8 {
                return Err(violation("OFFSET_DATA chunk without data"));
            }
            let mut ob = [0u8; 8];
            r.read_exact(&mut ob).await.map_err(io_death)?;
            let off = u64::from_be_bytes(ob);
            let dlen = c.length - 8;
            let dend = off.saturating_add(dlen);
            if off < entry.offset || dend > end {
                return Err(violation(format!(
                    "OFFSET_DATA [{off}, {dend}) outside the read [{}, {end})",
                    entry.offset
                )));
            }
            let rel = (off - entry.offset) as usize;
            cov.add(off, dend).map_err(violation)?;
            let dst = buf
                .get_mut(rel..rel + dlen as usize)
                .ok_or_else(|| violation("OFFSET_DATA outside the buffer"))?;
            r.read_exact(dst).await.map_err(io_death)?;
        }
        REPLY_TYPE_OFFSET_HOLE => {
            let EntryState::Read { buf, cov } = &mut entry.state else {
                return Err(violation(
                    "OFFSET_HOLE chunk for a command that is not a read",
                ));
            };
            let p = read_payload(r, c.length, 12, "OFFSET_HOLE").await?;
            let Chunk::OffsetHole { offset, length } =
                Chunk::decode(c.kind, &p).map_err(|e| violation(e.to_string()))?
            else {
                return Err(violation("bad OFFSET_HOLE chunk"));
            };
            let hend = offset.saturating_add(length as u64);
            if offset < entry.offset || hend > end {
                return Err(violation(format!(
                    "OFFSET_HOLE [{offset}, {hend}) outside the read [{}, {end})",
                    entry.offset
                )));
            }
            cov.add(offset, hend).map_err(violation)?;
            let rel = (offset - entry.offset) as usize;
            if let Some(dst) = buf.get_mut(rel..rel + length as usize) {
                dst.fill(0);
            }
        }
        REPLY_TYPE_BLOCK_STATUS | REPLY_TYPE_BLOCK_STATUS_EXT => {
            let EntryState::Status {
                want,
                req_one,
                got,
                seen,
            } = &mut entry.state
            else {
                return Err(violation(
                    "block status chunk for a command that is not block status",
                ));
            };
            let expected = if neg.mode == Mode::Extended {
                REPLY_TYPE_BLOCK_STATUS_EXT
            } else {
                REPLY_TYPE_BLOCK_STATUS
            };
            if c.kind != expected {
                return Err(violation(format!(
                    "block status chunk type {} in {} mode",
                    c.kind, neg.mode
                )));
            }
            let p = read_payload(r, c.length, MAX_STATUS_PAYLOAD, "block status").await?;
            let (id, extents) =
                match Chunk::decode(c.kind, &p).map_err(|e| violation(e.to_string()))? {
                    Chunk::BlockStatus {
                        context_id,
                        extents,
                    }
                    | Chunk::BlockStatusExt {
                        context_id,
                        extents,
                    } => (context_id, extents),
                    _ => return Err(violation("bad block status chunk")),
                };
            if Some(id) != neg.base_allocation && Some(id) != neg.allocation_depth {
                return Err(violation(format!(
                    "block status for unknown context id {id}"
                )));
            }
            if seen.contains(&id) {
                return Err(violation(format!(
                    "two block status chunks for context id {id}"
                )));
            }
            seen.push(id);
            if id == *want {
                *got = Some(clip_extents(extents, entry.length, *req_one)?);
            }
        }
        REPLY_TYPE_NONE => {
            if c.length != 0 || !c.done() {
                return Err(violation(
                    "NONE chunk with a payload or without the DONE flag",
                ));
            }
        }
        k if k & REPLY_TYPE_FLAG_ERROR != 0 => {
            let p = read_payload(r, c.length, MAX_ERROR_PAYLOAD, "error").await?;
            let (error, message) =
                match Chunk::decode(k, &p).map_err(|e| violation(e.to_string()))? {
                    Chunk::Error { error, message }
                    | Chunk::UnknownError { error, message, .. } => (error, message),
                    Chunk::ErrorOffset {
                        error,
                        message,
                        offset,
                    } => {
                        if offset < entry.offset || offset >= end.max(entry.offset + 1) {
                            return Err(violation("ERROR_OFFSET outside the request"));
                        }
                        (
                            error,
                            format!("{message} (at offset {offset})").trim().to_string(),
                        )
                    }
                    _ => return Err(violation("bad error chunk")),
                };
            if error == 0 {
                return Err(violation("error chunk with error value 0"));
            }
            entry.error.get_or_insert((error, message));
        }
        k => return Err(violation(format!("unknown reply chunk type {k}"))),
    }
    Ok(())
}

/// The reply is complete: turn the entry's state into the requester's result.
fn finish_reply(entry: &mut Entry) -> Result<Result<Reply, SubmitError>, Death> {
    if let Some((errno, message)) = entry.error.take() {
        return Ok(Err(SubmitError::Failed(server_error(
            entry, errno, message,
        ))));
    }
    match std::mem::replace(&mut entry.state, EntryState::Plain) {
        EntryState::Plain => Ok(Ok(Reply::Done)),
        EntryState::Read { buf, cov } => {
            if cov.covered != entry.length {
                return Err(violation(format!(
                    "read reply covers {} of {} bytes",
                    cov.covered, entry.length
                )));
            }
            Ok(Ok(Reply::Data(buf)))
        }
        EntryState::Status { got, .. } => match got {
            Some(e) => Ok(Ok(Reply::Extents(e))),
            None => Err(violation("block status reply without the asked context")),
        },
    }
}

/// Keep the descriptors covering `len` bytes (the last one clipped); all must be nonzero.
fn clip_extents(
    extents: Vec<proto::Extent>,
    len: u64,
    req_one: bool,
) -> Result<Vec<proto::Extent>, Death> {
    let mut out = Vec::new();
    let mut sum = 0u64;
    for mut e in extents {
        if e.length == 0 {
            return Err(violation("zero-length block status descriptor"));
        }
        if sum >= len {
            break;
        }
        e.length = e.length.min(len - sum);
        sum += e.length;
        out.push(e);
        if req_one {
            break;
        }
    }
    if out.is_empty() {
        return Err(violation("block status reply without descriptors"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::handshake::BlockSizes;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    fn neg(mode: Mode) -> Negotiated {
        Negotiated {
            mode,
            size: 1 << 20,
            flags: FLAG_HAS_FLAGS,
            block: BlockSizes::default(),
            base_allocation: Some(7),
            allocation_depth: None,
            used_go: true,
        }
    }

    /// A connection whose server side the test plays by hand.
    async fn setup(
        mode: Mode,
    ) -> (
        Arc<Conn>,
        DuplexStream,
        mpsc::UnboundedReceiver<DeathNotice>,
    ) {
        let (client, server) = tokio::io::duplex(1 << 20);
        let (r, w) = tokio::io::split(client);
        let (tx, rx) = mpsc::unbounded_channel();
        let c = Conn::start("test".into(), 1, neg(mode), Box::new(r), Box::new(w), 8, tx);
        (c, server, rx)
    }

    async fn read_request(s: &mut DuplexStream, mode: Mode) -> Request {
        let mut b = vec![0u8; mode.request_len()];
        s.read_exact(&mut b).await.expect("request");
        Request::decode(&b, mode == Mode::Extended).expect("decode request")
    }

    fn chunk(c: Chunk<'_>, extended: bool, done: bool, cookie: u64, offset: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let flags = if done { REPLY_FLAG_DONE } else { 0 };
        c.encode(extended, flags, cookie, offset, &mut out)
            .expect("encode chunk");
        out
    }

    /// Submit `cmd`, answer it with `reply(cookie)`, return the result and the death, if any.
    async fn exchange(
        mode: Mode,
        cmd: Command,
        reply: impl FnOnce(&Request) -> Vec<u8>,
    ) -> (Result<Reply, SubmitError>, Option<Death>) {
        let (c, mut s, mut rx) = setup(mode).await;
        let c2 = Arc::clone(&c);
        let task = tokio::spawn(async move { c2.submit(&cmd).await });
        let req = read_request(&mut s, mode).await;
        if req.command == CMD_WRITE {
            let mut p = vec![0u8; req.length as usize];
            s.read_exact(&mut p).await.expect("payload");
        }
        s.write_all(&reply(&req)).await.expect("reply");
        let res = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("no hang")
            .expect("no panic");
        let death = tokio::time::timeout(Duration::from_millis(200), rx.recv())
            .await
            .ok()
            .flatten()
            .map(|n| n.death);
        (res, death)
    }

    fn is_violation(d: &Option<Death>) -> bool {
        matches!(d, Some(Death::Violation(_)))
    }

    const READ: Command = Command::Read {
        offset: 4096,
        len: 8192,
    };

    #[tokio::test]
    async fn sparse_read_is_assembled() {
        let (r, d) = exchange(Mode::Structured, READ, |q| {
            let data = vec![9u8; 4096];
            let mut v = chunk(
                Chunk::OffsetData {
                    offset: 8192,
                    data: &data,
                },
                false,
                false,
                q.cookie,
                0,
            );
            v.extend(chunk(
                Chunk::OffsetHole {
                    offset: 4096,
                    length: 4096,
                },
                false,
                true,
                q.cookie,
                0,
            ));
            v
        })
        .await;
        let Ok(Reply::Data(v)) = r else {
            panic!("read failed: {r:?}")
        };
        assert!(v[..4096].iter().all(|&b| b == 0) && v[4096..].iter().all(|&b| b == 9));
        assert!(d.is_none());
    }

    #[tokio::test]
    async fn error_chunk_fails_only_the_request() {
        let (r, d) = exchange(Mode::Extended, READ, |q| {
            chunk(
                Chunk::Error {
                    error: ENOSPC,
                    message: "full".into(),
                },
                true,
                true,
                q.cookie,
                q.offset,
            )
        })
        .await;
        match r {
            Err(SubmitError::Failed(e)) => assert_eq!(e.errno(), 28),
            other => panic!("{other:?}"),
        }
        assert!(d.is_none(), "connection must survive an error reply");
    }

    #[tokio::test]
    async fn hostile_read_replies_hang_up() {
        type Craft = fn(&Request) -> Vec<u8>;
        let cases: Vec<(&str, Mode, Craft)> = vec![
            ("data outside the request", Mode::Structured, |q| {
                chunk(
                    Chunk::OffsetData {
                        offset: 12000,
                        data: &[1; 1000],
                    },
                    false,
                    true,
                    q.cookie,
                    0,
                )
            }),
            ("overlapping chunks", Mode::Structured, |q| {
                let mut v = chunk(
                    Chunk::OffsetData {
                        offset: 4096,
                        data: &[1; 4096],
                    },
                    false,
                    false,
                    q.cookie,
                    0,
                );
                v.extend(chunk(
                    Chunk::OffsetHole {
                        offset: 8000,
                        length: 4288,
                    },
                    false,
                    true,
                    q.cookie,
                    0,
                ));
                v
            }),
            ("incomplete data", Mode::Structured, |q| {
                chunk(
                    Chunk::OffsetHole {
                        offset: 4096,
                        length: 100,
                    },
                    false,
                    true,
                    q.cookie,
                    0,
                )
            }),
            ("unknown cookie", Mode::Structured, |q| {
                chunk(Chunk::None, false, true, q.cookie + 1, 0)
            }),
            ("4 GiB chunk length", Mode::Structured, |q| {
                let mut v = Vec::new();
                v.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
                v.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
                v.extend_from_slice(&REPLY_TYPE_OFFSET_DATA.to_be_bytes());
                v.extend_from_slice(&q.cookie.to_be_bytes());
                v.extend_from_slice(&u32::MAX.to_be_bytes());
                v
            }),
            ("simple reply in extended mode", Mode::Extended, |q| {
                let mut v = Vec::new();
                SimpleReply {
                    error: 0,
                    cookie: q.cookie,
                }
                .encode(&mut v);
                v
            }),
            (
                "simple reply with data in structured mode",
                Mode::Structured,
                |q| {
                    let mut v = Vec::new();
                    SimpleReply {
                        error: 0,
                        cookie: q.cookie,
                    }
                    .encode(&mut v);
                    v.extend_from_slice(&[0; 8192]);
                    v
                },
            ),
            (
                "extended reply with the wrong offset",
                Mode::Extended,
                |q| {
                    chunk(
                        Chunk::OffsetHole {
                            offset: 4096,
                            length: 8192,
                        },
                        true,
                        true,
                        q.cookie,
                        q.offset + 1,
                    )
                },
            ),
            ("garbage magic", Mode::Simple, |_| {
                vec![0xde, 0xad, 0xbe, 0xef]
            }),
            ("unknown chunk type", Mode::Structured, |q| {
                let mut v = Vec::new();
                ChunkHeader {
                    flags: REPLY_FLAG_DONE,
                    kind: 77,
                    cookie: q.cookie,
                    offset: 0,
                    length: 0,
                }
                .encode(false, &mut v)
                .expect("encode");
                v
            }),
        ];
        for (what, mode, craft) in cases {
            let (r, d) = exchange(mode, READ, craft).await;
            assert!(matches!(r, Err(SubmitError::Lost(_))), "{what}: {r:?}");
            assert!(is_violation(&d), "{what}: {d:?}");
        }
    }

    #[tokio::test]
    async fn hostile_block_status_replies_hang_up() {
        let cmd = Command::BlockStatus {
            offset: 0,
            len: 65536,
            context: MetaContext::BaseAllocation,
            req_one: false,
        };
        type Craft = fn(&Request) -> Vec<u8>;
        let cases: Vec<(&str, Craft)> = vec![
            ("unknown context", |q| {
                chunk(
                    Chunk::BlockStatus {
                        context_id: 3,
                        extents: vec![Extent {
                            length: 512,
                            flags: 0,
                        }],
                    },
                    false,
                    true,
                    q.cookie,
                    0,
                )
            }),
            ("64-bit descriptors without extended headers", |q| {
                chunk(
                    Chunk::BlockStatusExt {
                        context_id: 7,
                        extents: vec![Extent {
                            length: 512,
                            flags: 0,
                        }],
                    },
                    false,
                    true,
                    q.cookie,
                    0,
                )
            }),
            ("zero-length descriptor", |q| {
                chunk(
                    Chunk::BlockStatus {
                        context_id: 7,
                        extents: vec![Extent {
                            length: 0,
                            flags: 0,
                        }],
                    },
                    false,
                    true,
                    q.cookie,
                    0,
                )
            }),
            ("no descriptors for the context", |q| {
                chunk(Chunk::None, false, true, q.cookie, 0)
            }),
        ];
        for (what, craft) in cases {
            let (r, d) = exchange(Mode::Structured, cmd.clone(), craft).await;
            assert!(matches!(r, Err(SubmitError::Lost(_))), "{what}: {r:?}");
            assert!(is_violation(&d), "{what}: {d:?}");
        }
        // A good answer longer than asked is clipped.
        let (r, d) = exchange(Mode::Structured, cmd, |q| {
            chunk(
                Chunk::BlockStatus {
                    context_id: 7,
                    extents: vec![
                        Extent {
                            length: 32768,
                            flags: 3,
                        },
                        Extent {
                            length: 1 << 30,
                            flags: 0,
                        },
                    ],
                },
                false,
                true,
                q.cookie,
                0,
            )
        })
        .await;
        match r {
            Ok(Reply::Extents(e)) => {
                assert_eq!(e.iter().map(|e| e.length).sum::<u64>(), 65536);
            }
            other => panic!("{other:?}"),
        }
        assert!(d.is_none());
    }

    #[tokio::test]
    async fn writes_carry_their_payload_and_eof_is_a_loss() {
        let data = Payload::new(vec![5u8; 3000]);
        let cmd = Command::Write {
            offset: 100,
            data,
            fua: true,
        };
        let (r, d) = exchange(Mode::Extended, cmd, |q| {
            assert_eq!(q.flags, CMD_FLAG_FUA | CMD_FLAG_PAYLOAD_LEN);
            assert_eq!(q.length, 3000);
            chunk(Chunk::None, true, true, q.cookie, q.offset)
        })
        .await;
        assert!(matches!(r, Ok(Reply::Done)), "{r:?}");
        assert!(d.is_none());
        // The server vanishes with a request in flight: a loss, not a violation.
        let (c, s, mut rx) = setup(Mode::Structured).await;
        let c2 = Arc::clone(&c);
        let task = tokio::spawn(async move { c2.submit(&READ).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(s);
        let r = task.await.expect("no panic");
        assert!(matches!(r, Err(SubmitError::Lost(_))), "{r:?}");
        let n = rx.recv().await.expect("death notice");
        assert!(matches!(n.death, Death::Lost(_)), "{:?}", n.death);
    }

    #[test]
    fn coverage_detects_overlap_and_coalesces() {
        let mut c = Coverage::default();
        assert!(c.add(10, 20).is_ok());
        assert!(c.add(0, 10).is_ok());
        assert!(c.add(20, 30).is_ok());
        assert_eq!(c.pieces.len(), 1);
        assert_eq!(c.covered, 30);
        assert!(c.add(29, 31).is_err());
        assert!(c.add(5, 6).is_err());
        assert!(c.add(40, 50).is_ok());
        assert!(c.add(35, 41).is_err());
        assert!(c.add(30, 40).is_ok());
        assert_eq!(c.pieces.len(), 1);
    }

    #[test]
    fn extents_are_clipped() {
        let e = |length, flags| proto::Extent { length, flags };
        let v = clip_extents(vec![e(10, 1), e(10, 0), e(10, 3)], 15, false).ok();
        assert_eq!(v, Some(vec![e(10, 1), e(5, 0)]));
        let v = clip_extents(vec![e(100, 3)], 15, true).ok();
        assert_eq!(v, Some(vec![e(15, 3)]));
        assert!(clip_extents(vec![e(0, 3)], 15, true).is_err());
    }
}
