//! The connection state machine: open with `open-timeout`, reconnect with `reconnect-delay`.
//!
//! Semantics follow QEMU's `nbd` block driver (block/nbd.c since 4.2 / 7.0):
//!
//! ```text
//!            open (retried until open-timeout)
//!                 │
//!                 ▼        connection lost (I/O error, EOF)
//!   ┌────────► Connected ─────────────────────────────┐
//!   │             │ protocol violation                 ▼
//!   │             ▼                     reconnect-delay > 0 ? ConnectingWait : ConnectingNoWait
//!   │           Failed                                 │                        ▲
//!   │                                                  │ reconnect-delay expired │
//!   │                                                  └────────────────────────┘
//!   └──────────── reconnected (same export size, no stricter limits) ◄── both Connecting states
//!   close() / drop from any state ──► Closed
//! ```
//!
//! * **Connected**: requests go to a live connection (round-robin over several when the server
//!   allows multi-conn).
//! * **ConnectingWait** (the first `reconnect-delay` after a loss): new requests wait; requests
//!   that were in flight when the connection died — reads, and also writes, zeroing, trims,
//!   flushes and block status, exactly like QEMU — are sent again on the new connection. Each
//!   request retries only until `reconnect-delay` after *its own* first loss, so a server that
//!   accepts connections and drops them again cannot keep a request alive forever.
//! * **ConnectingNoWait** (after the window, or at once when `reconnect-delay` is 0): every
//!   request fails immediately with EIO while the supervisor keeps trying to reconnect in the
//!   background, with exponential backoff between `reconnect_interval_min` and `_max`, so the
//!   device recovers when the server comes back.
//! * **Failed**: the server broke the protocol; like QEMU we do not reconnect to it (requests
//!   fail with EIO).
//!
//! **In-flight writes across a reconnect.** A write whose reply never arrived may or may not
//! have reached the old server's storage; it is sent again, which is harmless because writing
//! (or zeroing, trimming) the same bytes twice gives the same result and the block layer never
//! has two overlapping writes in flight. What a reconnect cannot recover is data the server
//! acknowledged but had not flushed when it crashed: a later flush on the new connection only
//! covers what the new server has. That is the NBD contract (and QEMU's behaviour): only
//! flushed or FUA data is durable.
//!
//! **Silent links.** A server that disappears without a reset (a black-holed link, a host that
//! lost power) gives no error: TCP connections get keepalive probes and `TCP_USER_TIMEOUT`
//! ([`ClientOptions::effective_dead_peer_timeout`], tied to `reconnect-delay`), so such a
//! connection is declared lost after that timeout and handled like any other loss: requests
//! wait for a reconnect up to `reconnect-delay`, then fail with EIO. A request therefore never
//! waits longer than the dead-peer timeout plus `reconnect-delay`. A server process that is alive at the TCP level but never
//! answers (stopped, deadlocked) is not detected, as in QEMU.
//!
//! Every state change is logged (`tracing`, target `diskstream_nbd::client::session`): info for
//! connects and reconnects, warn for losses and the end of the reconnect window, error for
//! protocol violations.

use super::conn::{Command, Conn, DeathNotice, Reply, SubmitError};
use super::error::ClientError;
use super::handshake::{self, Negotiated, Want};
use super::{Address, ClientOptions, ConnectionState, ExportInfo};
use crate::proto;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep, sleep_until, timeout, Instant};

/// A client's shared state: its connections, the state machine and the supervisor's inbox.
pub(crate) struct Session {
    /// The server's address, for messages.
    pub(crate) server: String,
    pub(crate) opts: ClientOptions,
    /// The export as first negotiated (reconnects must match it).
    pub(crate) info: ExportInfo,
    state: watch::Sender<ConnectionState>,
    conns: Mutex<Vec<Arc<Conn>>>,
    generation: AtomicU64,
    rr: AtomicUsize,
    /// Why there is no connection (for EIO messages).
    last_error: Mutex<String>,
}

impl Session {
    /// Connect (retrying until `open_timeout`), then start the supervisor.
    pub(crate) async fn open(opts: ClientOptions) -> Result<Arc<Session>, ClientError> {
        let server = opts.address.to_string();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let start = Instant::now();
        let deadline = start + opts.open_timeout;
        let mut backoff = opts.reconnect_interval_min;
        let mut attempt = 0u32;
        let conns = loop {
            attempt += 1;
            match connect_all(&opts, &server, 1, &events_tx).await {
                Ok(c) => break c,
                Err(e) => {
                    let now = Instant::now();
                    if now >= deadline || matches!(e, ClientError::InvalidRequest(_)) {
                        if attempt > 1 {
                            tracing::warn!(
                                server = %server,
                                "giving up after {attempt} attempts in {:?} (open-timeout {:?}): {e}",
                                now - start,
                                opts.open_timeout
                            );
                        }
                        return Err(e);
                    }
                    tracing::info!(
                        server = %server,
                        "connection attempt {attempt} failed ({e}); retrying until open-timeout"
                    );
                    sleep(backoff.min(deadline - now)).await;
                    backoff = (backoff * 2).min(opts.reconnect_interval_max);
                }
            }
        };
        let neg = &conns[0].neg;
        let info = ExportInfo::new(neg, conns.len());
        tracing::info!(
            server = %server,
            export = %opts.export,
            "NBD connected: size {} flags {:#x} {} headers, {} connection(s), block sizes {}/{}/{}",
            info.size,
            info.flags,
            info.mode,
            conns.len(),
            info.block.min,
            info.block.preferred,
            info.block.max_payload
        );
        let s = Arc::new(Session {
            server,
            opts,
            info,
            state: watch::Sender::new(ConnectionState::Connected),
            conns: Mutex::new(conns),
            generation: AtomicU64::new(1),
            rr: AtomicUsize::new(0),
            last_error: Mutex::new(String::new()),
        });
        tokio::spawn(Arc::clone(&s).supervise(events_rx, events_tx));
        Ok(s)
    }

    /// The current state.
    pub(crate) fn state(&self) -> ConnectionState {
        *self.state.borrow()
    }

    /// A receiver that sees every state change.
    pub(crate) fn subscribe(&self) -> watch::Receiver<ConnectionState> {
        self.state.subscribe()
    }

    fn set_state(&self, to: ConnectionState) {
        let from = self.state.send_replace(to);
        if from != to {
            match to {
                ConnectionState::Connected => {
                    tracing::info!(server = %self.server, ?from, ?to, "NBD client state change")
                }
                ConnectionState::Failed => {
                    tracing::error!(server = %self.server, ?from, ?to, "NBD client state change")
                }
                ConnectionState::Closed => {
                    tracing::info!(server = %self.server, ?from, ?to, "NBD client state change")
                }
                _ => tracing::warn!(server = %self.server, ?from, ?to, "NBD client state change"),
            }
        }
    }

    fn set_last_error(&self, e: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    fn last_error(&self) -> String {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn conns(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Close every connection and stop the supervisor. Requests fail with EIO afterwards.
    pub(crate) fn shutdown(&self) {
        if self.state() == ConnectionState::Closed {
            return;
        }
        self.set_state(ConnectionState::Closed);
        for c in self.conns().drain(..) {
            c.close();
        }
    }

    fn disconnected(&self, reason: impl Into<String>) -> ClientError {
        let mut reason = reason.into();
        let last = self.last_error();
        if !last.is_empty() {
            reason = format!("{reason} ({last})");
        }
        ClientError::Disconnected {
            server: self.server.clone(),
            reason,
        }
    }

    /// A live connection, round-robin.
    fn live_conn(&self) -> Option<Arc<Conn>> {
        let conns = self.conns();
        let n = conns.len();
        let first = self.rr.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &conns[(first + i) % n])
            .find(|c| !c.is_dead())
            .cloned()
    }

    /// Wait for a usable connection according to the state machine. `retry_deadline` is the end
    /// of the reconnect window of a request that already lost its connection once.
    async fn pick(&self, retry_deadline: Option<Instant>) -> Result<Arc<Conn>, ClientError> {
        let mut rx = self.state.subscribe();
        loop {
            let st = *rx.borrow_and_update();
            match st {
                ConnectionState::Connected => {
                    if let Some(c) = self.live_conn() {
                        return Ok(c);
                    }
                    // The connection just died; the supervisor will switch state shortly.
                }
                ConnectionState::ConnectingWait => {}
                ConnectionState::ConnectingNoWait => {
                    return Err(self.disconnected(if self.opts.reconnect_delay.is_zero() {
                        "connection lost, reconnecting (reconnect-delay is 0)".to_string()
                    } else {
                        format!(
                            "connection lost and not re-established within reconnect-delay ({:?})",
                            self.opts.reconnect_delay
                        )
                    }))
                }
                ConnectionState::Failed => {
                    return Err(self.disconnected("gave up after a protocol violation"))
                }
                ConnectionState::Closed => return Err(self.disconnected("client closed")),
            }
            // Poll again now and then in case a death is noticed without a state change.
            let poll = Instant::now() + Duration::from_millis(100);
            let until = retry_deadline.map_or(poll, |d| d.min(poll));
            tokio::select! {
                r = rx.changed() => {
                    if r.is_err() {
                        return Err(self.disconnected("client closed"));
                    }
                }
                _ = sleep_until(until) => {
                    if retry_deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(self.disconnected(format!(
                            "connection lost and not re-established within reconnect-delay ({:?})",
                            self.opts.reconnect_delay
                        )));
                    }
                }
            }
        }
    }

    /// Run one command to completion, retrying on a new connection within the reconnect
    /// window.
    pub(crate) async fn run(&self, cmd: &Command) -> Result<Reply, ClientError> {
        let mut retry_deadline: Option<Instant> = None;
        loop {
            let conn = self.pick(retry_deadline).await?;
            match conn.submit(cmd).await {
                Ok(r) => return Ok(r),
                Err(SubmitError::Failed(e)) => return Err(e),
                Err(SubmitError::Lost(why)) => {
                    let now = Instant::now();
                    let delay = self.opts.reconnect_delay;
                    let deadline = *retry_deadline.get_or_insert(now + delay);
                    if delay.is_zero() || now >= deadline || self.state() == ConnectionState::Closed
                    {
                        return Err(self.disconnected(format!("connection lost: {why}")));
                    }
                    tracing::debug!(server = %self.server, "request lost with its connection ({why}); will retry after reconnect: {cmd:?}");
                }
            }
        }
    }

    /// The supervisor: reacts to connection deaths of the current generation.
    async fn supervise(
        self: Arc<Self>,
        mut events: mpsc::UnboundedReceiver<DeathNotice>,
        events_tx: mpsc::UnboundedSender<DeathNotice>,
    ) {
        let mut state_rx = self.state.subscribe();
        loop {
            let notice = tokio::select! {
                n = events.recv() => match n {
                    Some(n) => n,
                    None => return,
                },
                _ = closed(&mut state_rx) => return,
            };
            if notice.generation != self.generation.load(Ordering::Acquire) {
                continue;
            }
            match notice.death {
                super::conn::Death::Closed => continue,
                super::conn::Death::Violation(why) => {
                    self.set_last_error(format!("protocol violation: {why}"));
                    for c in self.conns().drain(..) {
                        c.abandon("another connection broke the protocol");
                    }
                    self.set_state(ConnectionState::Failed);
                    return;
                }
                super::conn::Death::Lost(why) => {
                    self.set_last_error(format!("connection lost: {why}"));
                    let old: Vec<Arc<Conn>> = self.conns().drain(..).collect();
                    for c in old {
                        c.abandon("another connection of the client was lost");
                    }
                    if !self.reconnect(&why, &mut state_rx, &events_tx).await {
                        return;
                    }
                }
            }
        }
    }

    /// Reconnect in the background until it works (or the client is closed). Returns false
    /// when the client was closed.
    async fn reconnect(
        &self,
        why: &str,
        state_rx: &mut watch::Receiver<ConnectionState>,
        events_tx: &mpsc::UnboundedSender<DeathNotice>,
    ) -> bool {
        let delay = self.opts.reconnect_delay;
        let started = Instant::now();
        let deadline = started + delay;
        let mut waiting = !delay.is_zero();
        if waiting {
            tracing::warn!(server = %self.server, "NBD connection lost ({why}); reconnecting, requests wait up to {delay:?}");
            self.set_state(ConnectionState::ConnectingWait);
        } else {
            tracing::warn!(server = %self.server, "NBD connection lost ({why}); reconnecting, requests fail with EIO meanwhile (reconnect-delay 0)");
            self.set_state(ConnectionState::ConnectingNoWait);
        }
        let expire = |waiting: &mut bool| {
            *waiting = false;
            tracing::warn!(server = %self.server, "NBD reconnect-delay of {delay:?} expired; requests now fail with EIO until the server is back");
            self.set_state(ConnectionState::ConnectingNoWait);
        };
        let next_gen = self.generation.load(Ordering::Acquire) + 1;
        let mut backoff = self.opts.reconnect_interval_min;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let fut = connect_all(&self.opts, &self.server, next_gen, events_tx);
            tokio::pin!(fut);
            let res = loop {
                tokio::select! {
                    r = &mut fut => break r,
                    _ = sleep_until(deadline), if waiting => expire(&mut waiting),
                    _ = closed(state_rx) => return false,
                }
            };
            let res = res.and_then(|conns| match self.compatible(&conns[0].neg) {
                Ok(()) => Ok(conns),
                Err(e) => {
                    for c in &conns {
                        c.close();
                    }
                    Err(e)
                }
            });
            match res {
                Ok(conns) => {
                    if self.state() == ConnectionState::Closed {
                        for c in &conns {
                            c.close();
                        }
                        return false;
                    }
                    let n = conns.len();
                    *self.conns() = conns;
                    self.generation.store(next_gen, Ordering::Release);
                    self.set_last_error(String::new());
                    tracing::info!(
                        server = %self.server,
                        "NBD reconnected after {:?} ({attempt} attempt(s), {n} connection(s))",
                        started.elapsed()
                    );
                    self.set_state(ConnectionState::Connected);
                    return true;
                }
                Err(e) => {
                    self.set_last_error(format!("connection lost: {why}; reconnect failed: {e}"));
                    if attempt == 1 || attempt.is_power_of_two() {
                        tracing::warn!(server = %self.server, "NBD reconnect attempt {attempt} failed: {e}");
                    } else {
                        tracing::debug!(server = %self.server, "NBD reconnect attempt {attempt} failed: {e}");
                    }
                }
            }
            let pause = sleep(backoff);
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    _ = &mut pause => break,
                    _ = sleep_until(deadline), if waiting => expire(&mut waiting),
                    _ = closed(state_rx) => return false,
                }
            }
            backoff = (backoff * 2).min(self.opts.reconnect_interval_max);
        }
    }

    /// Whether a reconnected export can replace the first one: same size, still writable if
    /// we write, no stricter block size limits than the ones our requests were split for.
    fn compatible(&self, n: &Negotiated) -> Result<(), ClientError> {
        let old = &self.info;
        let bad = |what: String| {
            Err(ClientError::Unsupported(format!(
                "{}: the export changed across the reconnect: {what}",
                self.server
            )))
        };
        if n.size != old.size {
            return bad(format!("size {} instead of {}", n.size, old.size));
        }
        if !self.opts.read_only && n.flags & proto::FLAG_READ_ONLY != 0 && !old.read_only() {
            return bad("it became read-only".into());
        }
        if n.block.min > old.block.min || n.block.max_payload < old.block.max_payload {
            return bad(format!(
                "block sizes {}/{} instead of {}/{}",
                n.block.min, n.block.max_payload, old.block.min, old.block.max_payload
            ));
        }
        Ok(())
    }
}

/// Resolves when the state becomes Closed (or the sender is gone).
async fn closed(rx: &mut watch::Receiver<ConnectionState>) {
    loop {
        if *rx.borrow_and_update() == ConnectionState::Closed {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Make the kernel notice a server that went silent (a link that drops packets without a
/// reset): keepalive probes once the connection has been quiet for half of `limit`, and
/// `TCP_USER_TIMEOUT` so that unacknowledged data or unanswered probes end the connection
/// after `limit`. The read or write then fails (ETIMEDOUT), the connection dies as "lost" and
/// the session's reconnect logic (with `reconnect-delay`) takes over. Without this, a request
/// sent into a black hole waits for TCP's retransmission limit (about 15 minutes) and an idle
/// connection whose reply was lost waits forever.
fn detect_dead_peer(s: &TcpStream, limit: Duration, server: &str) {
    let sock = socket2::SockRef::from(s);
    let idle = (limit / 2).max(Duration::from_secs(1));
    let interval = (limit / 6).max(Duration::from_secs(1));
    let probes = (limit.as_secs_f64() / interval.as_secs_f64())
        .ceil()
        .max(1.0) as u32;
    let ka = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(interval)
        .with_retries(probes);
    if let Err(e) = sock.set_tcp_keepalive(&ka) {
        tracing::warn!(server, "cannot enable TCP keepalive: {e}");
    }
    if let Err(e) = sock.set_tcp_user_timeout(Some(limit)) {
        tracing::warn!(server, "cannot set TCP_USER_TIMEOUT: {e}");
    }
}

/// Connect and negotiate one connection, bounded by the connect timeout.
async fn connect_one(
    opts: &ClientOptions,
    server: &str,
) -> Result<(Negotiated, super::conn::BoxRead, super::conn::BoxWrite), ClientError> {
    let want = Want {
        server,
        export: &opts.export,
        extended_headers: opts.extended_headers,
        structured_replies: opts.structured_replies,
        base_allocation: opts.block_status,
        allocation_depth: opts.allocation_depth,
        opt_go: opts.opt_go,
    };
    let fut = async {
        match &opts.address {
            Address::Tcp { host, port } => {
                let mut s = TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(|e| ClientError::io(format!("cannot connect to {server}"), e))?;
                let _ = s.set_nodelay(true);
                detect_dead_peer(&s, opts.effective_dead_peer_timeout(), server);
                let neg = handshake::negotiate(&mut s, &want).await?;
                let (r, w) = s.into_split();
                Ok::<_, ClientError>((
                    neg,
                    Box::new(r) as super::conn::BoxRead,
                    Box::new(w) as super::conn::BoxWrite,
                ))
            }
            Address::Unix(path) => {
                let mut s = UnixStream::connect(path)
                    .await
                    .map_err(|e| ClientError::io(format!("cannot connect to {server}"), e))?;
                let neg = handshake::negotiate(&mut s, &want).await?;
                let (r, w) = s.into_split();
                Ok((
                    neg,
                    Box::new(r) as super::conn::BoxRead,
                    Box::new(w) as super::conn::BoxWrite,
                ))
            }
        }
    };
    match timeout(opts.connect_timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(ClientError::Timeout {
            what: format!("connecting to {server}"),
            after: opts.connect_timeout,
        }),
    }
}

/// Open the first connection and, when the server allows multi-conn and we want it, more.
async fn connect_all(
    opts: &ClientOptions,
    server: &str,
    generation: u64,
    events: &mpsc::UnboundedSender<DeathNotice>,
) -> Result<Vec<Arc<Conn>>, ClientError> {
    let (neg, r, w) = connect_one(opts, server).await?;
    let multi = neg.flags & proto::FLAG_CAN_MULTI_CONN != 0;
    let mut conns = vec![Conn::start(
        server.to_string(),
        generation,
        neg.clone(),
        r,
        w,
        opts.max_in_flight,
        events.clone(),
    )];
    if opts.connections > 1 && !multi {
        tracing::debug!(
            server,
            "server does not advertise multi-conn; using one connection"
        );
    }
    if multi {
        for i in 1..opts.connections {
            match connect_one(opts, server).await {
                Ok((n, r, w))
                    if n.mode == neg.mode && n.size == neg.size && n.block == neg.block =>
                {
                    conns.push(Conn::start(
                        server.to_string(),
                        generation,
                        n,
                        r,
                        w,
                        opts.max_in_flight,
                        events.clone(),
                    ))
                }
                Ok(_) => {
                    tracing::warn!(
                        server,
                        "connection {} negotiated differently; not used",
                        i + 1
                    );
                    break;
                }
                Err(e) => {
                    tracing::warn!(server, "extra connection {} failed: {e}", i + 1);
                    break;
                }
            }
        }
    }
    Ok(conns)
}
