//! Client side of the handshake: from the server's greeting to the transmission phase.
//!
//! Fixed newstyle, asking for the best the server offers: `NBD_OPT_EXTENDED_HEADERS` (64-bit
//! headers, QEMU 8.2+), else `NBD_OPT_STRUCTURED_REPLY`; then `NBD_OPT_SET_META_CONTEXT` for
//! `base:allocation` (and `qemu:allocation-depth` when asked); then `NBD_OPT_GO` with an
//! `NBD_INFO_BLOCK_SIZE` request, which commits us to the server's block size constraints.
//! Servers that answer `NBD_OPT_GO` with `ERR_UNSUP` (or speak plain, non-fixed newstyle) get
//! `NBD_OPT_EXPORT_NAME` instead. Oldstyle servers are refused.
//!
//! Every length the server sends is bounded before anything is allocated for it: option reply
//! payloads above [`MAX_OPTION_REPLY`] and more than [`MAX_OPTION_REPLIES`] replies to one
//! option end the handshake with a protocol error.

use super::error::ClientError;
use crate::proto::{self, *};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest option reply payload we accept: every valid reply is a 4096-byte string plus a few
/// fixed fields, so anything much larger is a broken or hostile server.
pub(crate) const MAX_OPTION_REPLY: u32 = 64 << 10;
/// Most replies we read for one option (contexts, infos) before calling the server broken.
pub(crate) const MAX_OPTION_REPLIES: usize = 256;

/// Block size constraints of an export (`NBD_INFO_BLOCK_SIZE`, or the defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    /// Every offset and length must be a multiple of this (a power of two, at most 64 KiB).
    pub min: u32,
    /// Requests aligned to this are efficient.
    pub preferred: u32,
    /// Largest read/write payload we send (capped at [`proto::MAX_PAYLOAD`], a multiple of
    /// `min`).
    pub max_payload: u32,
}

impl Default for BlockSizes {
    /// What the specification says a server supports when it advertises nothing: 1 / 4096 /
    /// 32 MiB (QEMU's client uses the same).
    fn default() -> Self {
        BlockSizes {
            min: 1,
            preferred: 4096,
            max_payload: proto::MAX_PAYLOAD,
        }
    }
}

/// What the handshake settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Negotiated {
    /// Header style of the transmission phase.
    pub mode: Mode,
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Block size constraints.
    pub block: BlockSizes,
    /// Context id of `base:allocation`, when selected.
    pub base_allocation: Option<u32>,
    /// Context id of `qemu:allocation-depth`, when selected.
    pub allocation_depth: Option<u32>,
    /// Whether `NBD_OPT_GO` was used (false: the `EXPORT_NAME` fallback).
    pub used_go: bool,
}

/// What the client asks for.
#[derive(Clone, Debug)]
pub(crate) struct Want<'a> {
    /// Server address, for messages.
    pub server: &'a str,
    /// Export name.
    pub export: &'a str,
    /// Try `NBD_OPT_EXTENDED_HEADERS`.
    pub extended_headers: bool,
    /// Try `NBD_OPT_STRUCTURED_REPLY` (when extended headers are not agreed).
    pub structured_replies: bool,
    /// Select `base:allocation`.
    pub base_allocation: bool,
    /// Select `qemu:allocation-depth`.
    pub allocation_depth: bool,
    /// Use `NBD_OPT_GO` (false forces `NBD_OPT_EXPORT_NAME`, for tests and ancient servers).
    pub opt_go: bool,
}

struct Hs<'s, S> {
    s: &'s mut S,
    server: &'s str,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Hs<'_, S> {
    async fn read(&mut self, buf: &mut [u8], what: &str) -> Result<(), ClientError> {
        self.s.read_exact(buf).await.map(|_| ()).map_err(|e| {
            let ctx = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                format!(
                    "{} closed the connection during the handshake ({what})",
                    self.server
                )
            } else {
                format!("handshake with {} ({what})", self.server)
            };
            ClientError::io(ctx, e)
        })
    }

    async fn write(&mut self, buf: &[u8], what: &str) -> Result<(), ClientError> {
        let r = async {
            self.s.write_all(buf).await?;
            self.s.flush().await
        }
        .await;
        r.map_err(|e| ClientError::io(format!("handshake with {} ({what})", self.server), e))
    }

    async fn send_option(&mut self, option: u32, payload: &[u8]) -> Result<(), ClientError> {
        let mut out = Vec::with_capacity(OptionHeader::LEN + payload.len());
        encode_option(option, payload, &mut out).map_err(|e| ClientError::codec(self.server, e))?;
        self.write(&out, option_name(option)).await
    }

    async fn read_reply(&mut self, option: u32) -> Result<OptionReply, ClientError> {
        let mut h = [0u8; OptionReplyHeader::LEN];
        self.read(&mut h, option_name(option)).await?;
        let h = OptionReplyHeader::decode(&h).map_err(|e| ClientError::codec(self.server, e))?;
        if h.option != option {
            return Err(ClientError::protocol(
                self.server,
                format!(
                    "reply to {} while {} was pending",
                    option_name(h.option),
                    option_name(option)
                ),
            ));
        }
        if h.length > MAX_OPTION_REPLY {
            return Err(ClientError::protocol(
                self.server,
                format!("{}-byte reply to {}", h.length, option_name(option)),
            ));
        }
        let mut payload = vec![0u8; h.length as usize];
        self.read(&mut payload, option_name(option)).await?;
        OptionReply::decode(&h, &payload).map_err(|e| ClientError::codec(self.server, e))
    }

    /// Send an option without payload that is answered by ACK or an error. `Ok(true)` on ACK.
    async fn simple_option(&mut self, option: u32) -> Result<bool, ClientError> {
        self.send_option(option, &[]).await?;
        match self.read_reply(option).await? {
            OptionReply::Ack => Ok(true),
            OptionReply::Error { code, message } => {
                tracing::debug!(
                    server = self.server,
                    "{} refused ({code:#x}): {message}",
                    option_name(option)
                );
                Ok(false)
            }
            other => Err(ClientError::protocol(
                self.server,
                format!("unexpected reply {other:?} to {}", option_name(option)),
            )),
        }
    }
}

/// Negotiate on a fresh stream; on success the stream is in the transmission phase.
pub(crate) async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    want: &Want<'_>,
) -> Result<Negotiated, ClientError> {
    let server = want.server;
    let mut hs = Hs { s, server };
    let mut greet = [0u8; 16];
    hs.read(&mut greet, "greeting").await?;
    let magic = u64::from_be_bytes(greet[..8].try_into().unwrap_or_default());
    if magic != NBDMAGIC {
        return Err(ClientError::protocol(
            server,
            "not an NBD server (bad greeting magic)",
        ));
    }
    let style = u64::from_be_bytes(greet[8..].try_into().unwrap_or_default());
    if style == CLISERV_MAGIC {
        return Err(ClientError::Unsupported(format!(
            "{server} uses oldstyle NBD negotiation, which this client does not support"
        )));
    }
    if style != IHAVEOPT {
        return Err(ClientError::protocol(
            server,
            "bad newstyle magic in the greeting",
        ));
    }
    let mut f = [0u8; 2];
    hs.read(&mut f, "greeting").await?;
    let hflags = u16::from_be_bytes(f);
    let fixed = hflags & FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let mut cflags = 0;
    if fixed {
        cflags |= FLAG_C_FIXED_NEWSTYLE;
    }
    if no_zeroes {
        cflags |= FLAG_C_NO_ZEROES;
    }
    hs.write(&ClientFlags(cflags).encode(), "client flags")
        .await?;

    let mut mode = Mode::Simple;
    let mut base_allocation = None;
    let mut allocation_depth = None;
    if fixed {
        if want.extended_headers && hs.simple_option(OPT_EXTENDED_HEADERS).await? {
            mode = Mode::Extended;
        }
        if mode == Mode::Simple
            && want.structured_replies
            && hs.simple_option(OPT_STRUCTURED_REPLY).await?
        {
            mode = Mode::Structured;
        }
        if mode != Mode::Simple && (want.base_allocation || want.allocation_depth) {
            (base_allocation, allocation_depth) = set_meta_context(&mut hs, want).await?;
        }
        if want.opt_go {
            if let Some(n) = opt_go(&mut hs, want, mode).await? {
                return Ok(Negotiated {
                    base_allocation,
                    allocation_depth,
                    ..n
                });
            }
        } else if mode == Mode::Extended {
            return Err(ClientError::InvalidRequest(
                "NBD_OPT_EXPORT_NAME cannot follow extended headers".into(),
            ));
        }
    }
    let (size, flags) = export_name(&mut hs, want.export, no_zeroes).await?;
    Ok(Negotiated {
        mode,
        size,
        flags,
        block: BlockSizes::default(),
        base_allocation,
        allocation_depth,
        used_go: false,
    })
}

async fn set_meta_context<S: AsyncRead + AsyncWrite + Unpin>(
    hs: &mut Hs<'_, S>,
    want: &Want<'_>,
) -> Result<(Option<u32>, Option<u32>), ClientError> {
    let mut queries = Vec::new();
    if want.base_allocation {
        queries.push(CONTEXT_BASE_ALLOCATION.to_string());
    }
    if want.allocation_depth {
        queries.push(CONTEXT_QEMU_ALLOCATION_DEPTH.to_string());
    }
    let mut payload = Vec::new();
    MetaContextRequest {
        export: want.export.to_string(),
        queries,
    }
    .encode(&mut payload)
    .map_err(|e| ClientError::codec(hs.server, e))?;
    hs.send_option(OPT_SET_META_CONTEXT, &payload).await?;
    let (mut base, mut depth) = (None, None);
    for _ in 0..MAX_OPTION_REPLIES {
        match hs.read_reply(OPT_SET_META_CONTEXT).await? {
            OptionReply::MetaContext { id, name } => {
                if base == Some(id) || depth == Some(id) {
                    return Err(ClientError::protocol(
                        hs.server,
                        format!("context id {id} given to two contexts"),
                    ));
                }
                if name == CONTEXT_BASE_ALLOCATION && want.base_allocation {
                    base = Some(id);
                } else if name == CONTEXT_QEMU_ALLOCATION_DEPTH && want.allocation_depth {
                    depth = Some(id);
                } else {
                    tracing::debug!(server = hs.server, "ignoring meta context '{name}'");
                }
            }
            OptionReply::Ack => return Ok((base, depth)),
            OptionReply::Error { code, message } => {
                tracing::debug!(
                    server = hs.server,
                    "NBD_OPT_SET_META_CONTEXT refused ({code:#x}): {message}; no block status"
                );
                return Ok((None, None));
            }
            other => {
                return Err(ClientError::protocol(
                    hs.server,
                    format!("unexpected reply {other:?} to NBD_OPT_SET_META_CONTEXT"),
                ))
            }
        }
    }
    Err(ClientError::protocol(
        hs.server,
        "too many replies to NBD_OPT_SET_META_CONTEXT",
    ))
}

/// `NBD_OPT_GO`; `Ok(None)` when the server does not know the option (fall back to
/// `EXPORT_NAME`).
async fn opt_go<S: AsyncRead + AsyncWrite + Unpin>(
    hs: &mut Hs<'_, S>,
    want: &Want<'_>,
    mode: Mode,
) -> Result<Option<Negotiated>, ClientError> {
    let mut payload = Vec::new();
    InfoRequest {
        name: want.export.to_string(),
        requests: vec![INFO_BLOCK_SIZE],
    }
    .encode(&mut payload)
    .map_err(|e| ClientError::codec(hs.server, e))?;
    hs.send_option(OPT_GO, &payload).await?;
    let mut export: Option<(u64, u16)> = None;
    let mut block = BlockSizes::default();
    for _ in 0..MAX_OPTION_REPLIES {
        match hs.read_reply(OPT_GO).await? {
            OptionReply::Info(Info::Export { size, flags }) => export = Some((size, flags)),
            OptionReply::Info(Info::BlockSize {
                min,
                preferred,
                max,
            }) => block = block_sizes(hs.server, min, preferred, max)?,
            OptionReply::Info(_) => {}
            OptionReply::Ack => {
                let Some((size, flags)) = export else {
                    return Err(ClientError::protocol(
                        hs.server,
                        "NBD_OPT_GO acknowledged without NBD_INFO_EXPORT",
                    ));
                };
                return Ok(Some(Negotiated {
                    mode,
                    size,
                    flags,
                    block,
                    base_allocation: None,
                    allocation_depth: None,
                    used_go: true,
                }));
            }
            OptionReply::Error { code, message } => {
                return match code {
                    REP_ERR_UNSUP if mode != Mode::Extended => {
                        tracing::debug!(
                            server = hs.server,
                            "NBD_OPT_GO not supported, falling back to NBD_OPT_EXPORT_NAME"
                        );
                        Ok(None)
                    }
                    REP_ERR_UNKNOWN => Err(ClientError::ExportNotFound {
                        server: hs.server.to_string(),
                        export: want.export.to_string(),
                        message,
                    }),
                    REP_ERR_TLS_REQD => Err(ClientError::Unsupported(format!(
                        "{} requires TLS, which this client does not support",
                        hs.server
                    ))),
                    code => Err(ClientError::Refused {
                        server: hs.server.to_string(),
                        option: "NBD_OPT_GO",
                        code,
                        message,
                    }),
                };
            }
            other => {
                return Err(ClientError::protocol(
                    hs.server,
                    format!("unexpected reply {other:?} to NBD_OPT_GO"),
                ))
            }
        }
    }
    Err(ClientError::protocol(
        hs.server,
        "too many replies to NBD_OPT_GO",
    ))
}

/// Validate `NBD_INFO_BLOCK_SIZE` and turn it into the limits we obey.
fn block_sizes(
    server: &str,
    min: u32,
    preferred: u32,
    max: u32,
) -> Result<BlockSizes, ClientError> {
    if min == 0 || !min.is_power_of_two() || min > 65536 {
        return Err(ClientError::protocol(
            server,
            format!("invalid minimum block size {min}"),
        ));
    }
    if max < min {
        return Err(ClientError::protocol(
            server,
            format!("maximum payload {max} below the minimum block size {min}"),
        ));
    }
    // A bad preferred size is only a performance hint: repair it instead of failing.
    let preferred = if preferred.is_power_of_two() && preferred >= min {
        preferred
    } else {
        min.max(4096)
    };
    let max_payload = max.min(proto::MAX_PAYLOAD) / min * min;
    Ok(BlockSizes {
        min,
        preferred,
        max_payload,
    })
}

async fn export_name<S: AsyncRead + AsyncWrite + Unpin>(
    hs: &mut Hs<'_, S>,
    export: &str,
    no_zeroes: bool,
) -> Result<(u64, u16), ClientError> {
    if export.len() > MAX_STRING {
        return Err(ClientError::InvalidRequest(format!(
            "export name longer than {MAX_STRING} bytes"
        )));
    }
    hs.send_option(OPT_EXPORT_NAME, export.as_bytes()).await?;
    let mut b = [0u8; ExportNameReply::LEN];
    if let Err(e) = hs.read(&mut b, "NBD_OPT_EXPORT_NAME").await {
        // A server can only refuse EXPORT_NAME by hanging up.
        return Err(match e {
            ClientError::Io { source, .. }
                if source.kind() == std::io::ErrorKind::UnexpectedEof =>
            {
                ClientError::ExportNotFound {
                    server: hs.server.to_string(),
                    export: export.to_string(),
                    message: "server closed the connection after NBD_OPT_EXPORT_NAME".into(),
                }
            }
            e => e,
        });
    }
    let r = ExportNameReply::decode(&b).map_err(|e| ClientError::codec(hs.server, e))?;
    if !no_zeroes {
        let mut pad = [0u8; ExportNameReply::PADDING];
        hs.read(&mut pad, "NBD_OPT_EXPORT_NAME padding").await?;
    }
    Ok((r.size, r.flags))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::DuplexStream;

    fn want(export: &str) -> Want<'_> {
        Want {
            server: "test",
            export,
            extended_headers: true,
            structured_replies: true,
            base_allocation: true,
            allocation_depth: false,
            opt_go: true,
        }
    }

    async fn read_option(s: &mut DuplexStream) -> (u32, Vec<u8>) {
        let mut h = [0u8; OptionHeader::LEN];
        s.read_exact(&mut h).await.expect("option header");
        let h = OptionHeader::decode(&h).expect("decode option");
        let mut p = vec![0u8; h.length as usize];
        s.read_exact(&mut p).await.expect("option payload");
        (h.option, p)
    }

    async fn reply(s: &mut DuplexStream, option: u32, r: OptionReply) {
        let mut out = Vec::new();
        r.encode(option, &mut out).expect("encode reply");
        s.write_all(&out).await.expect("send reply");
    }

    /// A fixed-newstyle server that knows no option but EXPORT_NAME (pre-2.10 QEMU style).
    #[tokio::test]
    async fn falls_back_to_export_name_when_go_is_unknown() {
        let (mut c, mut s) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            s.write_all(
                &Greeting {
                    flags: FLAG_FIXED_NEWSTYLE,
                }
                .encode(),
            )
            .await
            .expect("greeting");
            let mut f = [0u8; 4];
            s.read_exact(&mut f).await.expect("client flags");
            assert_eq!(u32::from_be_bytes(f), FLAG_C_FIXED_NEWSTYLE);
            loop {
                let (opt, payload) = read_option(&mut s).await;
                if opt == OPT_EXPORT_NAME {
                    assert_eq!(payload, b"disk");
                    let mut out = Vec::new();
                    ExportNameReply {
                        size: 1 << 20,
                        flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH,
                    }
                    .encode(false, &mut out);
                    s.write_all(&out).await.expect("export reply");
                    return s;
                }
                let err = OptionReply::Error {
                    code: REP_ERR_UNSUP,
                    message: String::new(),
                };
                reply(&mut s, opt, err).await;
            }
        });
        let n = negotiate(&mut c, &want("disk")).await.expect("negotiate");
        assert_eq!(n.mode, Mode::Simple);
        assert!(!n.used_go);
        assert_eq!(n.size, 1 << 20);
        assert_eq!(n.block, BlockSizes::default());
        assert!(server.await.is_ok());
    }

    #[tokio::test]
    async fn oldstyle_and_hostile_servers_are_refused() {
        // Oldstyle greeting.
        let (mut c, mut s) = tokio::io::duplex(1 << 16);
        let mut g = NBDMAGIC.to_be_bytes().to_vec();
        g.extend_from_slice(&CLISERV_MAGIC.to_be_bytes());
        s.write_all(&g).await.expect("greeting");
        let r = negotiate(&mut c, &want("")).await;
        assert!(matches!(r, Err(ClientError::Unsupported(_))), "{r:?}");

        // A 1 MiB option reply: refused before anything is allocated for it.
        let (mut c, mut s) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            s.write_all(
                &Greeting {
                    flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
                }
                .encode(),
            )
            .await
            .expect("greeting");
            let mut f = [0u8; 4];
            s.read_exact(&mut f).await.expect("client flags");
            let (opt, _) = read_option(&mut s).await;
            let h = OptionReplyHeader {
                option: opt,
                reply_type: REP_ACK,
                length: 1 << 20,
            };
            s.write_all(&h.encode()).await.expect("header");
            s
        });
        let r = negotiate(&mut c, &want("")).await;
        assert!(matches!(r, Err(ClientError::Protocol { .. })), "{r:?}");
        drop(server.await);

        // GO answered with a bogus block size.
        let (mut c, mut s) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            s.write_all(
                &Greeting {
                    flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
                }
                .encode(),
            )
            .await
            .expect("greeting");
            let mut f = [0u8; 4];
            s.read_exact(&mut f).await.expect("client flags");
            loop {
                let (opt, _) = read_option(&mut s).await;
                if opt == OPT_GO {
                    let bs = OptionReply::Info(Info::BlockSize {
                        min: 3,
                        preferred: 4096,
                        max: 1 << 20,
                    });
                    reply(&mut s, opt, bs).await;
                    return s;
                }
                reply(&mut s, opt, OptionReply::Ack).await;
            }
        });
        let r = negotiate(&mut c, &want("")).await;
        assert!(matches!(r, Err(ClientError::Protocol { .. })), "{r:?}");
        drop(server.await);
    }

    #[test]
    fn block_size_validation() {
        assert!(block_sizes("s", 0, 4096, 1 << 20).is_err());
        assert!(block_sizes("s", 3, 4096, 1 << 20).is_err());
        assert!(block_sizes("s", 1 << 17, 1 << 17, 1 << 20).is_err());
        assert!(block_sizes("s", 4096, 4096, 512).is_err());
        let b = block_sizes("s", 512, 7, u32::MAX).ok();
        assert_eq!(
            b,
            Some(BlockSizes {
                min: 512,
                preferred: 4096,
                max_payload: proto::MAX_PAYLOAD
            })
        );
        let b = block_sizes("s", 4096, 4096, 65536 + 100)
            .ok()
            .map(|b| b.max_payload);
        assert_eq!(b, Some(65536));
    }
}
