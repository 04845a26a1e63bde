//! Option haggling: from the greeting to the transmission phase (or a closed connection).
//!
//! Behaviour follows qemu-nbd 10 where the specification leaves a choice: export names match
//! exactly ("" is just a name), `NBD_INFO_DESCRIPTION` is sent whenever a description is set,
//! `NBD_INFO_BLOCK_SIZE` always (1 / 4096 / 32 MiB), unknown options get `ERR_UNSUP` after their
//! payload is drained, a repeated `STRUCTURED_REPLY` is `ERR_INVALID`, `EXPORT_NAME` after
//! extended headers drops the connection. With TLS configured the server is in FORCEDTLS mode:
//! before `STARTTLS` every option but `ABORT` gets `ERR_TLS_REQD` and `EXPORT_NAME` drops the
//! connection. Anything that cannot be answered (bad magic, unknown client flags, payloads over
//! 32 MiB) ends the connection; nothing here panics on input.

use super::{BoxStream, ExportSlot, ExportState, Shared};
use crate::proto::{self, *};
use std::io;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// Context id of `base:allocation` (QEMU uses the same ids).
pub(crate) const ID_BASE_ALLOCATION: u32 = 0;
/// Context id of `qemu:allocation-depth`.
pub(crate) const ID_ALLOCATION_DEPTH: u32 = 1;
/// Largest `LIST/SET_META_CONTEXT` payload we read; larger ones get `ERR_TOO_BIG`.
const MAX_META_PAYLOAD: u32 = 1 << 20;
/// Largest `INFO/GO` payload that can be valid: name, count and 65535 requests.
const MAX_INFO_PAYLOAD: u32 = 4 + proto::MAX_STRING as u32 + 2 + 2 * u16::MAX as u32;

/// A metadata context a client can select.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Context {
    /// `base:allocation`: HOLE and ZERO flags over the whole chain.
    BaseAllocation,
    /// `qemu:allocation-depth`: which layer provides the data.
    AllocationDepth,
}

impl Context {
    pub(crate) fn id(self) -> u32 {
        match self {
            Context::BaseAllocation => ID_BASE_ALLOCATION,
            Context::AllocationDepth => ID_ALLOCATION_DEPTH,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Context::BaseAllocation => CONTEXT_BASE_ALLOCATION,
            Context::AllocationDepth => CONTEXT_QEMU_ALLOCATION_DEPTH,
        }
    }
}

/// What the transmission phase needs from negotiation.
pub(crate) struct Session {
    /// The chosen export.
    pub(crate) export: Arc<ExportState>,
    /// Holds the export's connection slot for the connection's lifetime.
    pub(crate) _slot: ExportSlot,
    /// Header style.
    pub(crate) mode: Mode,
    /// Selected metadata contexts (in id order).
    pub(crate) contexts: Vec<Context>,
    /// Size advertised.
    pub(crate) size: u64,
    /// Transmission flags advertised.
    pub(crate) flags: u16,
    /// Whether the connection runs over TLS (then the socket carries records, and replies
    /// must go through the TLS stream, never straight to the socket).
    pub(crate) tls: bool,
}

/// Why negotiation ended without a transmission phase.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    /// The socket failed or the client hung up.
    #[error("connection lost during the handshake: {0}")]
    Io(#[from] io::Error),
    /// The client sent something unparseable where no error reply is possible.
    #[error("malformed handshake data: {0}")]
    Proto(#[from] ProtoError),
    /// The client broke a rule whose only remedy is disconnecting.
    #[error("{0}")]
    Violation(String),
    /// The TLS handshake failed after STARTTLS was acknowledged.
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
}

impl HandshakeError {
    /// Log at a level matching how surprising the failure is: port probes and clients that
    /// hang up are routine.
    pub(crate) fn log(&self) {
        match self {
            HandshakeError::Io(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                ) =>
            {
                tracing::debug!("NBD client left during the handshake: {e}")
            }
            other => tracing::info!("NBD handshake failed: {other}"),
        }
    }
}

/// A stream that is never used, standing in while the real one is moved out.
fn placeholder() -> BoxStream {
    Box::new(tokio::io::join(tokio::io::empty(), tokio::io::sink()))
}

/// Negotiation state that STARTTLS resets.
#[derive(Default)]
struct State {
    tls: bool,
    structured: bool,
    extended: bool,
    /// Export name and contexts of the last successful SET_META_CONTEXT.
    meta: Option<(String, Vec<Context>)>,
}

struct Conn<'a> {
    shared: &'a Shared,
    stream: BoxStream,
    no_zeroes: bool,
    st: State,
}

/// Run the handshake. `Ok(None)` means the client ended it cleanly (ABORT, or went away).
pub(crate) async fn negotiate(
    shared: &Shared,
    mut stream: BoxStream,
    mut stop: watch::Receiver<bool>,
) -> Result<Option<(BoxStream, Session)>, HandshakeError> {
    stream
        .write_all(
            &Greeting {
                flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
            }
            .encode(),
        )
        .await?;
    stream.flush().await?;
    let mut b = [0u8; ClientFlags::LEN];
    match stream.read_exact(&mut b).await {
        Ok(_) => {}
        // A port probe: connect and close without a word.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let cf = ClientFlags::decode(&b)?;
    let mut c = Conn {
        shared,
        stream,
        no_zeroes: cf.no_zeroes(),
        st: State::default(),
    };
    loop {
        let mut hb = [0u8; OptionHeader::LEN];
        tokio::select! {
            r = c.stream.read_exact(&mut hb) => match r {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(e.into()),
            },
            _ = stop.wait_for(|s| *s) => {
                return Ok(None);
            }
        }
        let h = OptionHeader::decode(&hb)?;
        tracing::debug!(
            "NBD option {} ({}), {} bytes",
            option_name(h.option),
            h.option,
            h.length
        );
        if !cf.fixed_newstyle() && h.option != OPT_EXPORT_NAME {
            return Err(HandshakeError::Violation(format!(
                "client without fixed newstyle sent {}",
                option_name(h.option)
            )));
        }
        if c.shared.tls.is_some() && !c.st.tls {
            match h.option {
                OPT_STARTTLS | OPT_ABORT => {}
                OPT_EXPORT_NAME => {
                    return Err(HandshakeError::Violation(
                        "NBD_OPT_EXPORT_NAME before TLS on a TLS-only server".into(),
                    ))
                }
                _ => {
                    c.drain(h.length).await?;
                    c.error(h.option, REP_ERR_TLS_REQD, "TLS is required")
                        .await?;
                    continue;
                }
            }
        }
        match h.option {
            OPT_EXPORT_NAME => return c.export_name(h.length).await.map(Some),
            OPT_ABORT => {
                c.drain(h.length).await?;
                // The client may already be gone; it owes us nothing.
                let _ = c.reply(h.option, &OptionReply::Ack).await;
                let _ = c.stream.shutdown().await;
                return Ok(None);
            }
            OPT_LIST => c.list(h.length).await?,
            OPT_STARTTLS => c.starttls(h.length).await?,
            OPT_INFO | OPT_GO => {
                if let Some(t) = c.info_go(h.option, h.length).await? {
                    return Ok(Some(t));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if h.length != 0 {
                    c.drain(h.length).await?;
                    c.error(h.option, REP_ERR_INVALID, "option takes no data")
                        .await?;
                } else if c.st.extended {
                    c.error(
                        h.option,
                        REP_ERR_EXT_HEADER_REQD,
                        "extended headers already negotiated",
                    )
                    .await?;
                } else if c.st.structured {
                    c.error(
                        h.option,
                        REP_ERR_INVALID,
                        "structured replies already negotiated",
                    )
                    .await?;
                } else {
                    c.st.structured = true;
                    c.reply(h.option, &OptionReply::Ack).await?;
                }
            }
            OPT_EXTENDED_HEADERS => {
                if h.length != 0 {
                    c.drain(h.length).await?;
                    c.error(h.option, REP_ERR_INVALID, "option takes no data")
                        .await?;
                } else if c.st.extended {
                    c.error(
                        h.option,
                        REP_ERR_INVALID,
                        "extended headers already negotiated",
                    )
                    .await?;
                } else {
                    c.st.extended = true;
                    c.st.structured = true;
                    c.reply(h.option, &OptionReply::Ack).await?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => c.meta(h.option, h.length).await?,
            other => {
                c.drain(h.length).await?;
                c.error(
                    other,
                    REP_ERR_UNSUP,
                    &format!("option {other} is not supported"),
                )
                .await?;
            }
        }
    }
}

impl Conn<'_> {
    async fn read_payload(&mut self, len: u32) -> Result<Vec<u8>, HandshakeError> {
        let mut v = Vec::new();
        (&mut self.stream)
            .take(len as u64)
            .read_to_end(&mut v)
            .await?;
        if v.len() != len as usize {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        Ok(v)
    }

    async fn drain(&mut self, len: u32) -> Result<(), HandshakeError> {
        if len == 0 {
            return Ok(());
        }
        let n = tokio::io::copy(
            &mut (&mut self.stream).take(len as u64),
            &mut tokio::io::sink(),
        )
        .await?;
        if n != len as u64 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        Ok(())
    }

    async fn send(&mut self, buf: &[u8]) -> Result<(), HandshakeError> {
        self.stream.write_all(buf).await?;
        self.stream.flush().await?;
        Ok(())
    }

    async fn reply(&mut self, option: u32, r: &OptionReply) -> Result<(), HandshakeError> {
        let mut out = Vec::new();
        r.encode(option, &mut out)?;
        self.send(&out).await
    }

    async fn error(&mut self, option: u32, code: u32, msg: &str) -> Result<(), HandshakeError> {
        tracing::debug!("NBD {} refused: {msg}", option_name(option));
        self.reply(
            option,
            &OptionReply::Error {
                code,
                message: msg.to_string(),
            },
        )
        .await
    }

    /// Transmission flags for `export` as negotiated so far. `info` marks an `NBD_OPT_INFO`
    /// answer (which advertises the block-status payload whenever extended headers are on,
    /// since contexts may still be selected), `contexts` whether GO carries any.
    fn flags(&self, export: &ExportState, info: bool, contexts: bool) -> u16 {
        let e = &export.export;
        let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE;
        if e.max_connections > 1 {
            f |= FLAG_CAN_MULTI_CONN;
        }
        if e.read_only {
            f |= FLAG_READ_ONLY;
        } else {
            f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
        }
        if self.st.structured {
            f |= FLAG_SEND_DF;
        }
        if self.st.extended && (info || contexts) {
            f |= FLAG_BLOCK_STAT_PAYLOAD;
        }
        f
    }

    fn mode(&self) -> Mode {
        if self.st.extended {
            Mode::Extended
        } else if self.st.structured {
            Mode::Structured
        } else {
            Mode::Simple
        }
    }

    async fn export_name(mut self, len: u32) -> Result<(BoxStream, Session), HandshakeError> {
        if len as usize > proto::MAX_STRING {
            return Err(HandshakeError::Violation(format!(
                "export name of {len} bytes is too long"
            )));
        }
        let payload = self.read_payload(len).await?;
        let name = decode_export_name(&payload)?;
        if self.st.extended {
            return Err(HandshakeError::Violation(
                "NBD_OPT_EXPORT_NAME after extended headers".into(),
            ));
        }
        let Some(export) = self.shared.find(&name) else {
            return Err(HandshakeError::Violation(format!(
                "export '{name}' not found (NBD_OPT_EXPORT_NAME cannot report errors)"
            )));
        };
        let Some(slot) = export.try_slot() else {
            return Err(HandshakeError::Violation(format!(
                "export '{name}' has reached its connection limit"
            )));
        };
        let contexts = self.contexts_for(&name);
        let flags = self.flags(&export, false, !contexts.is_empty());
        let size = export.size();
        let mut out = Vec::new();
        ExportNameReply { size, flags }.encode(self.no_zeroes, &mut out);
        self.send(&out).await?;
        let mode = self.mode();
        Ok((
            self.stream,
            Session {
                export,
                _slot: slot,
                mode,
                contexts,
                size,
                flags,
                tls: self.st.tls,
            },
        ))
    }

    /// Contexts selected for `name` by the last SET_META_CONTEXT, if it named that export.
    fn contexts_for(&self, name: &str) -> Vec<Context> {
        match &self.st.meta {
            Some((n, c)) if n == name => c.clone(),
            _ => Vec::new(),
        }
    }

    async fn list(&mut self, len: u32) -> Result<(), HandshakeError> {
        if len != 0 {
            self.drain(len).await?;
            return self
                .error(OPT_LIST, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                .await;
        }
        let mut out = Vec::new();
        for e in self.shared.list() {
            OptionReply::Server {
                name: e.export.name.clone(),
                description: e.export.description.clone(),
            }
            .encode(OPT_LIST, &mut out)?;
        }
        OptionReply::Ack.encode(OPT_LIST, &mut out)?;
        self.send(&out).await
    }

    async fn starttls(&mut self, len: u32) -> Result<(), HandshakeError> {
        if len != 0 {
            self.drain(len).await?;
            return self
                .error(
                    OPT_STARTTLS,
                    REP_ERR_INVALID,
                    "NBD_OPT_STARTTLS takes no data",
                )
                .await;
        }
        let Some(acceptor) = self.shared.tls.clone() else {
            return self
                .error(OPT_STARTTLS, REP_ERR_POLICY, "TLS is not configured")
                .await;
        };
        if self.st.tls {
            return self
                .error(OPT_STARTTLS, REP_ERR_INVALID, "TLS is already active")
                .await;
        }
        self.reply(OPT_STARTTLS, &OptionReply::Ack).await?;
        // Swap in a placeholder while the TLS handshake owns the plain stream.
        let plain = std::mem::replace(&mut self.stream, placeholder());
        let tls = acceptor.accept(plain).await.map_err(HandshakeError::Tls)?;
        self.stream = Box::new(tls);
        // Nothing negotiated in clear text survives the upgrade.
        self.st = State {
            tls: true,
            ..State::default()
        };
        tracing::debug!("NBD connection upgraded to TLS");
        Ok(())
    }

    async fn info_go(
        &mut self,
        option: u32,
        len: u32,
    ) -> Result<Option<(BoxStream, Session)>, HandshakeError> {
        if len > MAX_INFO_PAYLOAD {
            self.drain(len).await?;
            self.error(
                option,
                REP_ERR_INVALID,
                "request is longer than any valid one",
            )
            .await?;
            return Ok(None);
        }
        let payload = self.read_payload(len).await?;
        let req = match InfoRequest::decode(&payload) {
            Ok(r) => r,
            Err(e) => {
                self.error(option, REP_ERR_INVALID, &e.to_string()).await?;
                return Ok(None);
            }
        };
        let Some(export) = self.shared.find(&req.name) else {
            let msg = format!("export '{}' not present", req.name);
            self.error(option, REP_ERR_UNKNOWN, &msg).await?;
            return Ok(None);
        };
        let go = option == OPT_GO;
        let contexts = if go {
            self.contexts_for(&req.name)
        } else {
            Vec::new()
        };
        let slot = if go {
            match export.try_slot() {
                Some(s) => Some(s),
                None => {
                    let msg = format!("export '{}' has reached its connection limit", req.name);
                    self.error(option, REP_ERR_POLICY, &msg).await?;
                    return Ok(None);
                }
            }
        } else {
            None
        };
        let flags = self.flags(&export, !go, !contexts.is_empty());
        let size = export.size();
        let e = &export.export;
        let mut out = Vec::new();
        if req.requests.contains(&INFO_NAME) {
            OptionReply::Info(Info::Name(e.name.clone())).encode(option, &mut out)?;
        }
        if !e.description.is_empty() {
            OptionReply::Info(Info::Description(e.description.clone())).encode(option, &mut out)?;
        }
        OptionReply::Info(Info::BlockSize {
            min: 1,
            preferred: 4096,
            max: proto::MAX_PAYLOAD,
        })
        .encode(option, &mut out)?;
        OptionReply::Info(Info::Export { size, flags }).encode(option, &mut out)?;
        OptionReply::Ack.encode(option, &mut out)?;
        self.send(&out).await?;
        let Some(slot) = slot else {
            return Ok(None);
        };
        let stream = std::mem::replace(&mut self.stream, placeholder());
        Ok(Some((
            stream,
            Session {
                export,
                _slot: slot,
                mode: self.mode(),
                contexts,
                size,
                flags,
                tls: self.st.tls,
            },
        )))
    }

    async fn meta(&mut self, option: u32, len: u32) -> Result<(), HandshakeError> {
        let list = option == OPT_LIST_META_CONTEXT;
        if !list {
            // SET replaces the selection even when it fails.
            self.st.meta = None;
        }
        if !self.st.structured {
            self.drain(len).await?;
            return self
                .error(option, REP_ERR_INVALID, "structured replies not negotiated")
                .await;
        }
        if len > MAX_META_PAYLOAD {
            self.drain(len).await?;
            return self
                .error(option, REP_ERR_TOO_BIG, "too many context queries")
                .await;
        }
        let payload = self.read_payload(len).await?;
        let req = match MetaContextRequest::decode(&payload) {
            Ok(r) => r,
            Err(e @ ProtoError::TooLong { .. }) => {
                return self.error(option, REP_ERR_TOO_BIG, &e.to_string()).await
            }
            Err(e) => return self.error(option, REP_ERR_INVALID, &e.to_string()).await,
        };
        let Some(export) = self.shared.find(&req.export) else {
            let msg = format!("export '{}' not present", req.export);
            return self.error(option, REP_ERR_UNKNOWN, &msg).await;
        };
        let depth = export.export.allocation_depth;
        let (mut base, mut alloc) = (false, false);
        if list && req.queries.is_empty() {
            base = true;
            alloc = depth;
        }
        for q in &req.queries {
            match q.as_str() {
                CONTEXT_BASE_ALLOCATION => base = true,
                CONTEXT_QEMU_ALLOCATION_DEPTH => alloc |= depth,
                // Namespace wildcards list everything in them but select nothing.
                "base:" if list => base = true,
                "qemu:" if list => alloc |= depth,
                _ => {}
            }
        }
        let mut chosen = Vec::new();
        if base {
            chosen.push(Context::BaseAllocation);
        }
        if alloc {
            chosen.push(Context::AllocationDepth);
        }
        let mut out = Vec::new();
        for c in &chosen {
            OptionReply::MetaContext {
                id: if list { 0 } else { c.id() },
                name: c.name().to_string(),
            }
            .encode(option, &mut out)?;
        }
        OptionReply::Ack.encode(option, &mut out)?;
        self.send(&out).await?;
        if !list {
            self.st.meta = Some((req.export, chosen));
        }
        Ok(())
    }
}
