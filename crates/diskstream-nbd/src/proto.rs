//! The NBD protocol: every constant and a pure codec for both directions.
//!
//! The server in [`crate::server`] and the client that will follow use the same encoders and
//! parsers, so both ends agree on the wire format by construction. Everything here is pure:
//! encoders append to a `Vec<u8>`, parsers take byte slices that the caller has already read and
//! return typed values or a [`ProtoError`]. Parsers never panic and never allocate from a length
//! they were sent beyond what the slice holds; the caller bounds the slices themselves with
//! [`MAX_PAYLOAD`] ([`OptionHeader::decode`] and [`ReplyHeader::decode`] refuse larger lengths
//! before anything is read).
//!
//! Facts are from the NBD protocol specification (`doc/proto.md` of NetworkBlockDevice/nbd,
//! including the extended-headers extension that QEMU 8.2+ speaks).

use std::fmt;

// ---------------------------------------------------------------------------------------------
// Magics
// ---------------------------------------------------------------------------------------------

/// "NBDMAGIC": first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation magic, also prefixes every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Oldstyle negotiation magic (never sent by us; recognised so a client can report it).
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of every option reply.
pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a compact (28-byte) request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended (32-byte) request.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended reply chunk.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// ---------------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------------

/// Largest payload either side must accept (32 MiB): request payloads, option payloads and the
/// data of one read. Larger lengths are treated as a denial-of-service attempt.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest reply chunk payload: a full [`MAX_PAYLOAD`] of data plus the 8-byte offset.
pub const MAX_REPLY_PAYLOAD: u64 = MAX_PAYLOAD as u64 + 8;
/// Longest string (export name, description, context name, query) the protocol allows.
pub const MAX_STRING: usize = 4096;

// ---------------------------------------------------------------------------------------------
// Handshake flags
// ---------------------------------------------------------------------------------------------

/// Server handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: may omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---------------------------------------------------------------------------------------------
// Transmission flags
// ---------------------------------------------------------------------------------------------

/// Transmission flag: always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export refuses writes.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: the export behaves like a rotational medium.
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` (and `NO_HOLE`) is supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `NBD_CMD_FLAG_DF` is supported (structured replies only).
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: flush/FUA on one connection is visible on all connections.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: `NBD_CMD_RESIZE` (experimental extension).
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
/// Transmission flag: `NBD_CMD_CACHE` is supported.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: `NBD_CMD_FLAG_FAST_ZERO` is supported.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// Transmission flag: `NBD_CMD_BLOCK_STATUS` accepts a payload selecting contexts.
pub const FLAG_BLOCK_STAT_PAYLOAD: u16 = 1 << 12;

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

/// Option: choose an export and enter transmission (cannot report errors).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: abort negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const OPT_LIST: u32 = 3;
/// Option: withdrawn `PEEK_EXPORT` extension.
pub const OPT_PEEK_EXPORT: u32 = 4;
/// Option: upgrade the connection to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export without entering transmission.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: use 64-bit extended headers.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// ---------------------------------------------------------------------------------------------
// Option replies
// ---------------------------------------------------------------------------------------------

/// Option reply: success / end of a list.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of `NBD_OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of export information.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit set in every error reply type.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Error reply: unknown option.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Error reply: forbidden by server policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Error reply: syntactically or semantically invalid.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Error reply: not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// Error reply: TLS must be negotiated first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// Error reply: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// Error reply: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// Error reply: the client must request `NBD_INFO_BLOCK_SIZE`.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// Error reply: request or reply too large.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
/// Error reply: extended headers are required (or already negotiated).
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

/// Information type: size and transmission flags (mandatory).
pub const INFO_EXPORT: u16 = 0;
/// Information type: canonical export name.
pub const INFO_NAME: u16 = 1;
/// Information type: human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Information type: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------------------------
// Commands and command flags
// ---------------------------------------------------------------------------------------------

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (carries a payload).
pub const CMD_WRITE: u16 = 1;
/// Command: soft disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Command: prefetch.
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status query.
pub const CMD_BLOCK_STATUS: u16 = 7;
/// Command: resize (experimental extension).
pub const CMD_RESIZE: u16 = 8;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag (WRITE_ZEROES): do not create a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag (READ): do not fragment the reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag (BLOCK_STATUS): one extent per context.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag (WRITE_ZEROES): fail with ENOTSUP unless fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Command flag (extended headers): the length field is a payload length.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// ---------------------------------------------------------------------------------------------
// Structured / extended replies
// ---------------------------------------------------------------------------------------------

/// Reply flag: last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: no payload (final chunk).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: a run of zeroes at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: 32-bit block status descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk type: 64-bit block status descriptors (extended headers).
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Bit set in every error chunk type.
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
/// Chunk type: error.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
/// Chunk type: error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

// ---------------------------------------------------------------------------------------------
// Errors and metadata
// ---------------------------------------------------------------------------------------------

/// NBD error: operation not permitted.
pub const EPERM: u32 = 1;
/// NBD error: input/output error.
pub const EIO: u32 = 5;
/// NBD error: out of memory.
pub const ENOMEM: u32 = 12;
/// NBD error: invalid argument.
pub const EINVAL: u32 = 22;
/// NBD error: no space left.
pub const ENOSPC: u32 = 28;
/// NBD error: value too large.
pub const EOVERFLOW: u32 = 75;
/// NBD error: operation not supported.
pub const ENOTSUP: u32 = 95;
/// NBD error: the server is shutting down.
pub const ESHUTDOWN: u32 = 108;

/// `base:allocation` flag: the extent is not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:*` flag: the extent is dirty.
pub const STATE_DIRTY: u32 = 1 << 0;

/// Name of the standard allocation context.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// Name of QEMU's allocation-depth context.
pub const CONTEXT_QEMU_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// Map a POSIX errno (from the block layer) to the NBD error QEMU's server sends for it:
/// EPERM/EROFS→EPERM, EIO, ENOMEM, ENOSPC/EDQUOT/EFBIG→ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN,
/// anything else EINVAL. Clients only know these eight values.
pub fn nbd_errno(errno: i32) -> u32 {
    match errno {
        1 | 30 => EPERM,
        5 => EIO,
        12 => ENOMEM,
        28 | 122 | 27 => ENOSPC,
        75 => EOVERFLOW,
        95 => ENOTSUP,
        108 => ESHUTDOWN,
        _ => EINVAL,
    }
}

/// Name of an option, for logs and messages.
pub fn option_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_PEEK_EXPORT => "NBD_OPT_PEEK_EXPORT",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "unknown option",
    }
}

/// Name of a command, for logs and messages.
pub fn command_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "NBD_CMD_READ",
        CMD_WRITE => "NBD_CMD_WRITE",
        CMD_DISC => "NBD_CMD_DISC",
        CMD_FLUSH => "NBD_CMD_FLUSH",
        CMD_TRIM => "NBD_CMD_TRIM",
        CMD_CACHE => "NBD_CMD_CACHE",
        CMD_WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
        CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        CMD_RESIZE => "NBD_CMD_RESIZE",
        _ => "unknown command",
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Why bytes could not be decoded (or a value could not be encoded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The slice ends before the structure does.
    #[error("truncated {what}: need {need} bytes, got {got}")]
    Short {
        /// What was being decoded.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        got: usize,
    },
    /// A magic number does not match.
    #[error("bad {what} magic {found:#x}")]
    BadMagic {
        /// Which magic.
        what: &'static str,
        /// The value found.
        found: u64,
    },
    /// A length exceeds a protocol limit.
    #[error("{what} length {len} exceeds the limit of {max}")]
    TooLong {
        /// What is too long.
        what: &'static str,
        /// The length sent.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// Bytes remain after a structure whose length is fixed by its header.
    #[error("{what} has {extra} trailing bytes")]
    Trailing {
        /// What was decoded.
        what: &'static str,
        /// Number of unexpected bytes.
        extra: usize,
    },
    /// A string is not UTF-8.
    #[error("{what} is not valid UTF-8")]
    Utf8 {
        /// Which string.
        what: &'static str,
    },
    /// A field has a value the protocol forbids.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// Which field or structure.
        what: &'static str,
        /// Why it is invalid.
        reason: &'static str,
    },
}

/// Result of codec functions.
pub type Result<T, E = ProtoError> = std::result::Result<T, E>;

/// A bounds-checked reader over a byte slice.
struct Rd<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Rd<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Rd { buf, what }
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(ProtoError::Short {
                what: self.what,
                need: n,
                got: self.buf.len(),
            });
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let b = self.bytes(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn remaining(&self) -> usize {
        self.buf.len()
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    fn end(&self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Trailing {
                what: self.what,
                extra: self.buf.len(),
            })
        }
    }
    /// A string of `n` bytes, at most [`MAX_STRING`].
    fn string(&mut self, n: usize, what: &'static str) -> Result<String> {
        if n > MAX_STRING {
            return Err(ProtoError::TooLong {
                what,
                len: n as u64,
                max: MAX_STRING as u64,
            });
        }
        utf8(self.bytes(n)?, what)
    }
}

fn utf8(b: &[u8], what: &'static str) -> Result<String> {
    std::str::from_utf8(b)
        .map(str::to_owned)
        .map_err(|_| ProtoError::Utf8 { what })
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// Length of a string as a u32 field, refusing strings the protocol does not allow.
fn str_len(s: &str, what: &'static str) -> Result<u32> {
    if s.len() > MAX_STRING {
        return Err(ProtoError::TooLong {
            what,
            len: s.len() as u64,
            max: MAX_STRING as u64,
        });
    }
    Ok(s.len() as u32)
}

// ---------------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------------

/// The server's newstyle greeting: `NBDMAGIC`, `IHAVEOPT`, 16-bit handshake flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Greeting {
    /// Handshake flags (`FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES` from us).
    pub flags: u16,
}

impl Greeting {
    /// Encoded length.
    pub const LEN: usize = 18;

    /// Encode to the wire.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
        b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[16..].copy_from_slice(&self.flags.to_be_bytes());
        b
    }

    /// Decode (client side). An oldstyle server is reported as a bad magic.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut r = Rd::new(buf, "greeting");
        let m = r.u64()?;
        if m != NBDMAGIC {
            return Err(ProtoError::BadMagic {
                what: "greeting",
                found: m,
            });
        }
        let m = r.u64()?;
        if m != IHAVEOPT {
            return Err(ProtoError::BadMagic {
                what: "newstyle",
                found: m,
            });
        }
        let flags = r.u16()?;
        r.end()?;
        Ok(Greeting { flags })
    }
}

/// The client's 32-bit flags answering the greeting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientFlags(pub u32);

impl ClientFlags {
    /// Encoded length.
    pub const LEN: usize = 4;
    /// Flags a client may send.
    pub const KNOWN: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

    /// Encode to the wire.
    pub fn encode(&self) -> [u8; Self::LEN] {
        self.0.to_be_bytes()
    }

    /// Decode, refusing unknown bits (the server must then drop the connection).
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut r = Rd::new(buf, "client flags");
        let f = r.u32()?;
        r.end()?;
        if f & !Self::KNOWN != 0 {
            return Err(ProtoError::Invalid {
                what: "client flags",
                reason: "unknown flag bits",
            });
        }
        Ok(ClientFlags(f))
    }

    /// Whether the client speaks fixed newstyle.
    pub fn fixed_newstyle(&self) -> bool {
        self.0 & FLAG_C_FIXED_NEWSTYLE != 0
    }

    /// Whether the client asked to omit the zero padding.
    pub fn no_zeroes(&self) -> bool {
        self.0 & FLAG_C_NO_ZEROES != 0
    }
}

/// Header of a client option: `IHAVEOPT`, option, payload length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option code (`OPT_*`).
    pub option: u32,
    /// Payload length that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Encoded length.
    pub const LEN: usize = 16;

    /// Encode to the wire.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Decode; a payload longer than [`MAX_PAYLOAD`] is refused so nothing is read for it.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut r = Rd::new(buf, "option header");
        let m = r.u64()?;
        if m != IHAVEOPT {
            return Err(ProtoError::BadMagic {
                what: "option",
                found: m,
            });
        }
        let option = r.u32()?;
        let length = r.u32()?;
        r.end()?;
        if length > MAX_PAYLOAD {
            return Err(ProtoError::TooLong {
                what: "option payload",
                len: length as u64,
                max: MAX_PAYLOAD as u64,
            });
        }
        Ok(OptionHeader { option, length })
    }
}

/// Encode a complete option (header and payload).
pub fn encode_option(option: u32, payload: &[u8], out: &mut Vec<u8>) -> Result<()> {
    if payload.len() > MAX_PAYLOAD as usize {
        return Err(ProtoError::TooLong {
            what: "option payload",
            len: payload.len() as u64,
            max: MAX_PAYLOAD as u64,
        });
    }
    out.extend_from_slice(
        &OptionHeader {
            option,
            length: payload.len() as u32,
        }
        .encode(),
    );
    out.extend_from_slice(payload);
    Ok(())
}

/// Payload of `NBD_OPT_EXPORT_NAME`: the whole payload is the name.
pub fn decode_export_name(payload: &[u8]) -> Result<String> {
    Rd::new(payload, "export name").string(payload.len(), "export name")
}

/// Payload of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct InfoRequest {
    /// Export name ("" is the default export).
    pub name: String,
    /// Requested information types (`INFO_*`).
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Append the payload.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<()> {
        let n = str_len(&self.name, "export name")?;
        let count = u16::try_from(self.requests.len()).map_err(|_| ProtoError::TooLong {
            what: "information requests",
            len: self.requests.len() as u64,
            max: u16::MAX as u64,
        })?;
        put_u32(out, n);
        out.extend_from_slice(self.name.as_bytes());
        put_u16(out, count);
        for &r in &self.requests {
            put_u16(out, r);
        }
        Ok(())
    }

    /// Decode; the lengths must account for the payload exactly.
    pub fn decode(payload: &[u8]) -> Result<Self> {
        let mut r = Rd::new(payload, "info request");
        let n = r.u32()? as usize;
        if n > r.remaining() {
            return Err(ProtoError::Short {
                what: "info request name",
                need: n,
                got: r.remaining(),
            });
        }
        let name = r.string(n, "export name")?;
        let count = r.u16()? as usize;
        if r.remaining() != count * 2 {
            return Err(ProtoError::Invalid {
                what: "info request",
                reason: "request count does not match the payload length",
            });
        }
        let mut requests = Vec::with_capacity(count);
        for _ in 0..count {
            requests.push(r.u16()?);
        }
        r.end()?;
        Ok(InfoRequest { name, requests })
    }
}

/// Payload of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct MetaContextRequest {
    /// Export the contexts are for.
    pub export: String,
    /// Queries (`namespace:leaf`).
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    /// Append the payload.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<()> {
        put_u32(out, str_len(&self.export, "export name")?);
        out.extend_from_slice(self.export.as_bytes());
        put_u32(out, self.queries.len() as u32);
        for q in &self.queries {
            put_u32(out, str_len(q, "context query")?);
            out.extend_from_slice(q.as_bytes());
        }
        Ok(())
    }

    /// Decode; every length must fit in the payload and the payload must end with the last
    /// query. The query count is never used to allocate: each query is read before it is kept.
    pub fn decode(payload: &[u8]) -> Result<Self> {
        let mut r = Rd::new(payload, "meta context request");
        let n = r.u32()? as usize;
        if n > r.remaining() {
            return Err(ProtoError::Short {
                what: "meta context export name",
                need: n,
                got: r.remaining(),
            });
        }
        let export = r.string(n, "export name")?;
        let count = r.u32()?;
        let mut queries = Vec::new();
        for _ in 0..count {
            let len = r.u32()? as usize;
            if len > r.remaining() {
                return Err(ProtoError::Short {
                    what: "context query",
                    need: len,
                    got: r.remaining(),
                });
            }
            queries.push(r.string(len, "context query")?);
        }
        r.end()?;
        Ok(MetaContextRequest { export, queries })
    }
}

/// Header of an option reply: magic, option, reply type, payload length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option being answered.
    pub option: u32,
    /// Reply type (`REP_*`).
    pub reply_type: u32,
    /// Payload length that follows.
    pub length: u32,
}

impl OptionReplyHeader {
    /// Encoded length.
    pub const LEN: usize = 20;

    /// Encode to the wire.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&REP_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.reply_type.to_be_bytes());
        b[16..].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Decode (client side); payloads longer than [`MAX_PAYLOAD`] are refused.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut r = Rd::new(buf, "option reply header");
        let m = r.u64()?;
        if m != REP_MAGIC {
            return Err(ProtoError::BadMagic {
                what: "option reply",
                found: m,
            });
        }
        let option = r.u32()?;
        let reply_type = r.u32()?;
        let length = r.u32()?;
        r.end()?;
        if length > MAX_PAYLOAD {
            return Err(ProtoError::TooLong {
                what: "option reply payload",
                len: length as u64,
                max: MAX_PAYLOAD as u64,
            });
        }
        Ok(OptionReplyHeader {
            option,
            reply_type,
            length,
        })
    }
}

/// One `NBD_REP_INFO` item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// `NBD_INFO_NAME`.
    Name(String),
    /// `NBD_INFO_DESCRIPTION`.
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize {
        /// Minimum block size.
        min: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum payload.
        max: u32,
    },
    /// An information type this codec does not know (clients must ignore it).
    Unknown {
        /// The type.
        kind: u16,
        /// Its payload.
        data: Vec<u8>,
    },
}

/// A typed option reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptionReply {
    /// `NBD_REP_ACK`.
    Ack,
    /// `NBD_REP_SERVER`: an export and its description.
    Server {
        /// Export name.
        name: String,
        /// Description ("" when none).
        description: String,
    },
    /// `NBD_REP_INFO`.
    Info(Info),
    /// `NBD_REP_META_CONTEXT`.
    MetaContext {
        /// Context id (0 in list replies).
        id: u32,
        /// Context name.
        name: String,
    },
    /// Any error reply (`REP_ERR_*`), with its optional message.
    Error {
        /// The error reply type.
        code: u32,
        /// Message for a human.
        message: String,
    },
    /// A non-error reply type this codec does not know.
    Unknown {
        /// The reply type.
        reply_type: u32,
        /// Its payload.
        data: Vec<u8>,
    },
}

impl OptionReply {
    /// The reply type sent on the wire.
    pub fn reply_type(&self) -> u32 {
        match self {
            OptionReply::Ack => REP_ACK,
            OptionReply::Server { .. } => REP_SERVER,
            OptionReply::Info(_) => REP_INFO,
            OptionReply::MetaContext { .. } => REP_META_CONTEXT,
            OptionReply::Error { code, .. } => *code | REP_FLAG_ERROR,
            OptionReply::Unknown { reply_type, .. } => *reply_type,
        }
    }

    /// Append header and payload answering `option`. Strings longer than the protocol allows
    /// (messages are truncated at a character boundary instead) are refused.
    pub fn encode(&self, option: u32, out: &mut Vec<u8>) -> Result<()> {
        let mut p = Vec::new();
        match self {
            OptionReply::Ack => {}
            OptionReply::Server { name, description } => {
                put_u32(&mut p, str_len(name, "export name")?);
                p.extend_from_slice(name.as_bytes());
                str_len(description, "export description")?;
                p.extend_from_slice(description.as_bytes());
            }
            OptionReply::Info(info) => match info {
                Info::Export { size, flags } => {
                    put_u16(&mut p, INFO_EXPORT);
                    put_u64(&mut p, *size);
                    put_u16(&mut p, *flags);
                }
                Info::Name(n) => {
                    str_len(n, "export name")?;
                    put_u16(&mut p, INFO_NAME);
                    p.extend_from_slice(n.as_bytes());
                }
                Info::Description(d) => {
                    str_len(d, "export description")?;
                    put_u16(&mut p, INFO_DESCRIPTION);
                    p.extend_from_slice(d.as_bytes());
                }
                Info::BlockSize {
                    min,
                    preferred,
                    max,
                } => {
                    put_u16(&mut p, INFO_BLOCK_SIZE);
                    put_u32(&mut p, *min);
                    put_u32(&mut p, *preferred);
                    put_u32(&mut p, *max);
                }
                Info::Unknown { kind, data } => {
                    put_u16(&mut p, *kind);
                    p.extend_from_slice(data);
                }
            },
            OptionReply::MetaContext { id, name } => {
                str_len(name, "context name")?;
                put_u32(&mut p, *id);
                p.extend_from_slice(name.as_bytes());
            }
            OptionReply::Error { message, .. } => {
                p.extend_from_slice(truncate_str(message, MAX_STRING).as_bytes());
            }
            OptionReply::Unknown { data, .. } => p.extend_from_slice(data),
        }
        if p.len() > MAX_PAYLOAD as usize {
            return Err(ProtoError::TooLong {
                what: "option reply payload",
                len: p.len() as u64,
                max: MAX_PAYLOAD as u64,
            });
        }
        out.extend_from_slice(
            &OptionReplyHeader {
                option,
                reply_type: self.reply_type(),
                length: p.len() as u32,
            }
            .encode(),
        );
        out.extend_from_slice(&p);
        Ok(())
    }

    /// Decode a reply payload given its header.
    pub fn decode(header: &OptionReplyHeader, payload: &[u8]) -> Result<Self> {
        if payload.len() != header.length as usize {
            return Err(ProtoError::Invalid {
                what: "option reply",
                reason: "payload length differs from the header",
            });
        }
        let mut r = Rd::new(payload, "option reply");
        let t = header.reply_type;
        if t & REP_FLAG_ERROR != 0 {
            let message = String::from_utf8_lossy(r.rest()).into_owned();
            return Ok(OptionReply::Error { code: t, message });
        }
        Ok(match t {
            REP_ACK => {
                r.end()?;
                OptionReply::Ack
            }
            REP_SERVER => {
                let n = r.u32()? as usize;
                if n > r.remaining() {
                    return Err(ProtoError::Short {
                        what: "server reply name",
                        need: n,
                        got: r.remaining(),
                    });
                }
                let name = r.string(n, "export name")?;
                let description = String::from_utf8_lossy(r.rest()).into_owned();
                OptionReply::Server { name, description }
            }
            REP_INFO => {
                let kind = r.u16()?;
                let info = match kind {
                    INFO_EXPORT => {
                        let size = r.u64()?;
                        let flags = r.u16()?;
                        r.end()?;
                        Info::Export { size, flags }
                    }
                    INFO_NAME => {
                        let n = r.remaining();
                        Info::Name(r.string(n, "export name")?)
                    }
                    INFO_DESCRIPTION => {
                        let n = r.remaining();
                        Info::Description(r.string(n, "export description")?)
                    }
                    INFO_BLOCK_SIZE => {
                        let min = r.u32()?;
                        let preferred = r.u32()?;
                        let max = r.u32()?;
                        r.end()?;
                        Info::BlockSize {
                            min,
                            preferred,
                            max,
                        }
                    }
                    kind => Info::Unknown {
                        kind,
                        data: r.rest().to_vec(),
                    },
                };
                OptionReply::Info(info)
            }
            REP_META_CONTEXT => {
                let id = r.u32()?;
                let n = r.remaining();
                let name = r.string(n, "context name")?;
                OptionReply::MetaContext { id, name }
            }
            reply_type => OptionReply::Unknown {
                reply_type,
                data: r.rest().to_vec(),
            },
        })
    }
}

/// The server's answer to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zero bytes unless the
/// client negotiated `NO_ZEROES`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportNameReply {
    /// Export size.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
}

impl ExportNameReply {
    /// Length without padding.
    pub const LEN: usize = 10;
    /// Length of the zero padding.
    pub const PADDING: usize = 124;

    /// Append to `out`.
    pub fn encode(&self, no_zeroes: bool, out: &mut Vec<u8>) {
        put_u64(out, self.size);
        put_u16(out, self.flags);
        if !no_zeroes {
            out.extend_from_slice(&[0u8; Self::PADDING]);
        }
    }

    /// Decode the first [`Self::LEN`] bytes (the caller skips any padding).
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut r = Rd::new(buf, "export name reply");
        let size = r.u64()?;
        let flags = r.u16()?;
        r.end()?;
        Ok(ExportNameReply { size, flags })
    }
}

/// Cut `s` to at most `max` bytes at a character boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---------------------------------------------------------------------------------------------
// Transmission: requests
// ---------------------------------------------------------------------------------------------

/// Which headers the transmission phase uses, fixed by negotiation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    /// Compact requests, simple replies only.
    Simple,
    /// Compact requests, structured replies (`NBD_OPT_STRUCTURED_REPLY`).
    Structured,
    /// 32-byte requests and replies (`NBD_OPT_EXTENDED_HEADERS`).
    Extended,
}

impl Mode {
    /// Length of a request header in this mode.
    pub fn request_len(self) -> usize {
        match self {
            Mode::Extended => Request::EXTENDED_LEN,
            _ => Request::LEN,
        }
    }
}

/// A transmission request (compact or extended).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command (`CMD_*`).
    pub command: u16,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Effect length, or payload length (WRITE, or `PAYLOAD_LEN` in extended mode).
    pub length: u64,
}

impl Request {
    /// Length of a compact request header.
    pub const LEN: usize = 28;
    /// Length of an extended request header.
    pub const EXTENDED_LEN: usize = 32;

    /// Append the header (without payload). Compact headers cannot carry a length above 32
    /// bits.
    pub fn encode(&self, extended: bool, out: &mut Vec<u8>) -> Result<()> {
        if extended {
            put_u32(out, EXTENDED_REQUEST_MAGIC);
        } else {
            put_u32(out, REQUEST_MAGIC);
        }
        put_u16(out, self.flags);
        put_u16(out, self.command);
        put_u64(out, self.cookie);
        put_u64(out, self.offset);
        if extended {
            put_u64(out, self.length);
        } else {
            let l = u32::try_from(self.length).map_err(|_| ProtoError::TooLong {
                what: "compact request length",
                len: self.length,
                max: u32::MAX as u64,
            })?;
            put_u32(out, l);
        }
        Ok(())
    }

    /// Decode a header. The magic must match the negotiated style: a compact request after
    /// extended headers were agreed (or the reverse) is a protocol violation.
    pub fn decode(buf: &[u8], extended: bool) -> Result<Self> {
        let mut r = Rd::new(buf, "request");
        let magic = r.u32()?;
        let want = if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        if magic != want {
            return Err(ProtoError::BadMagic {
                what: "request",
                found: magic as u64,
            });
        }
        let flags = r.u16()?;
        let command = r.u16()?;
        let cookie = r.u64()?;
        let offset = r.u64()?;
        let length = if extended { r.u64()? } else { r.u32()? as u64 };
        r.end()?;
        Ok(Request {
            flags,
            command,
            cookie,
            offset,
            length,
        })
    }

    /// How many payload bytes follow this header on the wire. A WRITE always carries
    /// `length` bytes: the extension requires `PAYLOAD_LEN` on it in extended mode, but QEMU's
    /// client (10.0) omits the flag and QEMU's server reads the payload anyway, so both ends
    /// must. Other commands carry a payload only with `PAYLOAD_LEN` in extended mode.
    pub fn payload_len(&self, extended: bool) -> u64 {
        if self.command == CMD_WRITE || (extended && self.flags & CMD_FLAG_PAYLOAD_LEN != 0) {
            self.length
        } else {
            0
        }
    }
}

/// Payload of an extended `NBD_CMD_BLOCK_STATUS` with `PAYLOAD_LEN`: effect length and the
/// context ids the reply is restricted to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockStatusPayload {
    /// The effect length (the header's length is the payload length).
    pub effect_length: u64,
    /// Context ids to report.
    pub ids: Vec<u32>,
}

impl BlockStatusPayload {
    /// Append the payload.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.effect_length);
        for &id in &self.ids {
            put_u32(out, id);
        }
    }

    /// Decode: 8 + 4n bytes with n >= 1.
    pub fn decode(payload: &[u8]) -> Result<Self> {
        if payload.len() < 12 || (payload.len() - 8) % 4 != 0 {
            return Err(ProtoError::Invalid {
                what: "block status payload",
                reason: "length must be 8 + 4n with n >= 1",
            });
        }
        let mut r = Rd::new(payload, "block status payload");
        let effect_length = r.u64()?;
        let mut ids = Vec::with_capacity(r.remaining() / 4);
        while r.remaining() > 0 {
            ids.push(r.u32()?);
        }
        Ok(BlockStatusPayload { effect_length, ids })
    }
}

// ---------------------------------------------------------------------------------------------
// Transmission: replies
// ---------------------------------------------------------------------------------------------

/// A simple reply header (followed by read data on success in simple mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimpleReply {
    /// NBD error (0 = success).
    pub error: u32,
    /// The request's cookie.
    pub cookie: u64,
}

impl SimpleReply {
    /// Encoded length.
    pub const LEN: usize = 16;

    /// Append the header.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u32(out, SIMPLE_REPLY_MAGIC);
        put_u32(out, self.error);
        put_u64(out, self.cookie);
    }
}

/// Header of a structured or extended reply chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Reply flags (`REPLY_FLAG_DONE`).
    pub flags: u16,
    /// Chunk type (`REPLY_TYPE_*`).
    pub kind: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// The request's offset (extended replies only; 0 in structured ones).
    pub offset: u64,
    /// Payload length.
    pub length: u64,
}

impl ChunkHeader {
    /// Length of a structured chunk header.
    pub const STRUCTURED_LEN: usize = 20;
    /// Length of an extended chunk header.
    pub const EXTENDED_LEN: usize = 32;

    /// Append the header in the given style.
    pub fn encode(&self, extended: bool, out: &mut Vec<u8>) -> Result<()> {
        if extended {
            put_u32(out, EXTENDED_REPLY_MAGIC);
            put_u16(out, self.flags);
            put_u16(out, self.kind);
            put_u64(out, self.cookie);
            put_u64(out, self.offset);
            put_u64(out, self.length);
        } else {
            let l = u32::try_from(self.length).map_err(|_| ProtoError::TooLong {
                what: "structured chunk length",
                len: self.length,
                max: u32::MAX as u64,
            })?;
            put_u32(out, STRUCTURED_REPLY_MAGIC);
            put_u16(out, self.flags);
            put_u16(out, self.kind);
            put_u64(out, self.cookie);
            put_u32(out, l);
        }
        Ok(())
    }

    /// Whether this is the last chunk of its reply.
    pub fn done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

/// Any reply header, as a client reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply.
    Simple(SimpleReply),
    /// A structured chunk.
    Structured(ChunkHeader),
    /// An extended chunk.
    Extended(ChunkHeader),
}

impl ReplyHeader {
    /// Length of the header that starts with `magic`, or `None` for an unknown magic. A client
    /// reads 4 bytes, asks this, then reads the rest.
    pub fn len_for_magic(magic: u32) -> Option<usize> {
        match magic {
            SIMPLE_REPLY_MAGIC => Some(SimpleReply::LEN),
            STRUCTURED_REPLY_MAGIC => Some(ChunkHeader::STRUCTURED_LEN),
            EXTENDED_REPLY_MAGIC => Some(ChunkHeader::EXTENDED_LEN),
            _ => None,
        }
    }

    /// Decode a complete header; chunk payloads above [`MAX_REPLY_PAYLOAD`] are refused.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut r = Rd::new(buf, "reply header");
        let magic = r.u32()?;
        let h = match magic {
            SIMPLE_REPLY_MAGIC => {
                let error = r.u32()?;
                let cookie = r.u64()?;
                ReplyHeader::Simple(SimpleReply { error, cookie })
            }
            STRUCTURED_REPLY_MAGIC | EXTENDED_REPLY_MAGIC => {
                let extended = magic == EXTENDED_REPLY_MAGIC;
                let flags = r.u16()?;
                let kind = r.u16()?;
                let cookie = r.u64()?;
                let (offset, length) = if extended {
                    (r.u64()?, r.u64()?)
                } else {
                    (0, r.u32()? as u64)
                };
                if length > MAX_REPLY_PAYLOAD {
                    return Err(ProtoError::TooLong {
                        what: "reply chunk payload",
                        len: length,
                        max: MAX_REPLY_PAYLOAD,
                    });
                }
                let c = ChunkHeader {
                    flags,
                    kind,
                    cookie,
                    offset,
                    length,
                };
                if extended {
                    ReplyHeader::Extended(c)
                } else {
                    ReplyHeader::Structured(c)
                }
            }
            m => {
                return Err(ProtoError::BadMagic {
                    what: "reply",
                    found: m as u64,
                })
            }
        };
        r.end()?;
        Ok(h)
    }

    /// The cookie of the request this answers.
    pub fn cookie(&self) -> u64 {
        match self {
            ReplyHeader::Simple(s) => s.cookie,
            ReplyHeader::Structured(c) | ReplyHeader::Extended(c) => c.cookie,
        }
    }
}

/// One block status descriptor. Narrow (32-bit) chunks can only carry lengths and flags that
/// fit in 32 bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (nonzero).
    pub length: u64,
    /// Context-defined status flags.
    pub flags: u64,
}

/// A typed structured/extended reply chunk payload; data is borrowed from the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chunk<'a> {
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    /// `NBD_REPLY_TYPE_OFFSET_DATA`.
    OffsetData {
        /// Export offset of the data.
        offset: u64,
        /// The data (at least one byte).
        data: &'a [u8],
    },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
    OffsetHole {
        /// Export offset of the hole.
        offset: u64,
        /// Its length (nonzero).
        length: u32,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS` (narrow descriptors).
    BlockStatus {
        /// Context id.
        context_id: u32,
        /// Descriptors (at least one).
        extents: Vec<Extent>,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` (64-bit descriptors).
    BlockStatusExt {
        /// Context id.
        context_id: u32,
        /// Descriptors (at least one).
        extents: Vec<Extent>,
    },
    /// `NBD_REPLY_TYPE_ERROR`.
    Error {
        /// NBD error (nonzero).
        error: u32,
        /// Message for a human.
        message: String,
    },
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`.
    ErrorOffset {
        /// NBD error (nonzero).
        error: u32,
        /// Message for a human.
        message: String,
        /// Offset the error applies to.
        offset: u64,
    },
    /// An error chunk type this codec does not know (the reply has failed, the connection may
    /// go on).
    UnknownError {
        /// The chunk type.
        kind: u16,
        /// NBD error.
        error: u32,
        /// Message for a human.
        message: String,
    },
}

impl Chunk<'_> {
    /// The chunk type sent on the wire.
    pub fn kind(&self) -> u16 {
        match self {
            Chunk::None => REPLY_TYPE_NONE,
            Chunk::OffsetData { .. } => REPLY_TYPE_OFFSET_DATA,
            Chunk::OffsetHole { .. } => REPLY_TYPE_OFFSET_HOLE,
            Chunk::BlockStatus { .. } => REPLY_TYPE_BLOCK_STATUS,
            Chunk::BlockStatusExt { .. } => REPLY_TYPE_BLOCK_STATUS_EXT,
            Chunk::Error { .. } => REPLY_TYPE_ERROR,
            Chunk::ErrorOffset { .. } => REPLY_TYPE_ERROR_OFFSET,
            Chunk::UnknownError { kind, .. } => *kind,
        }
    }

    /// Payload length on the wire.
    pub fn payload_len(&self) -> usize {
        match self {
            Chunk::None => 0,
            Chunk::OffsetData { data, .. } => 8 + data.len(),
            Chunk::OffsetHole { .. } => 12,
            Chunk::BlockStatus { extents, .. } => 4 + 8 * extents.len(),
            Chunk::BlockStatusExt { extents, .. } => 8 + 16 * extents.len(),
            Chunk::Error { message, .. } | Chunk::UnknownError { message, .. } => {
                6 + truncate_str(message, MAX_STRING).len()
            }
            Chunk::ErrorOffset { message, .. } => 14 + truncate_str(message, MAX_STRING).len(),
        }
    }

    /// Append header and payload as one chunk answering a request with `cookie` at `offset`.
    /// Messages are cut to [`MAX_STRING`]; values a chunk type cannot represent (an empty
    /// extent list, a narrow extent above 32 bits) are refused.
    pub fn encode(
        &self,
        extended: bool,
        flags: u16,
        cookie: u64,
        offset: u64,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        match self {
            Chunk::BlockStatus { extents, .. } | Chunk::BlockStatusExt { extents, .. }
                if extents.is_empty() =>
            {
                return Err(ProtoError::Invalid {
                    what: "block status chunk",
                    reason: "no extents",
                })
            }
            Chunk::BlockStatus { extents, .. } => {
                if let Some(e) = extents
                    .iter()
                    .find(|e| e.length > u32::MAX as u64 || e.flags > u32::MAX as u64)
                {
                    return Err(ProtoError::TooLong {
                        what: "narrow block status extent",
                        len: e.length.max(e.flags),
                        max: u32::MAX as u64,
                    });
                }
            }
            _ => {}
        }
        ChunkHeader {
            flags,
            kind: self.kind(),
            cookie,
            offset: if extended { offset } else { 0 },
            length: self.payload_len() as u64,
        }
        .encode(extended, out)?;
        self.encode_payload(out);
        Ok(())
    }

    fn encode_payload(&self, out: &mut Vec<u8>) {
        match self {
            Chunk::None => {}
            Chunk::OffsetData { offset, data } => {
                put_u64(out, *offset);
                out.extend_from_slice(data);
            }
            Chunk::OffsetHole { offset, length } => {
                put_u64(out, *offset);
                put_u32(out, *length);
            }
            Chunk::BlockStatus {
                context_id,
                extents,
            } => {
                put_u32(out, *context_id);
                for e in extents {
                    put_u32(out, e.length as u32);
                    put_u32(out, e.flags as u32);
                }
            }
            Chunk::BlockStatusExt {
                context_id,
                extents,
            } => {
                put_u32(out, *context_id);
                put_u32(out, extents.len() as u32);
                for e in extents {
                    put_u64(out, e.length);
                    put_u64(out, e.flags);
                }
            }
            Chunk::Error { error, message } | Chunk::UnknownError { error, message, .. } => {
                let m = truncate_str(message, MAX_STRING);
                put_u32(out, *error);
                put_u16(out, m.len() as u16);
                out.extend_from_slice(m.as_bytes());
            }
            Chunk::ErrorOffset {
                error,
                message,
                offset,
            } => {
                let m = truncate_str(message, MAX_STRING);
                put_u32(out, *error);
                put_u16(out, m.len() as u16);
                out.extend_from_slice(m.as_bytes());
                put_u64(out, *offset);
            }
        }
    }
}

impl<'a> Chunk<'a> {
    /// Decode the payload of a chunk of type `kind`. Unknown non-error types are an error (the
    /// client must hang up); unknown error types decode to [`Chunk::UnknownError`].
    pub fn decode(kind: u16, payload: &'a [u8]) -> Result<Chunk<'a>> {
        let mut r = Rd::new(payload, "reply chunk");
        let c = match kind {
            REPLY_TYPE_NONE => Chunk::None,
            REPLY_TYPE_OFFSET_DATA => {
                let offset = r.u64()?;
                let data = r.rest();
                if data.is_empty() {
                    return Err(ProtoError::Invalid {
                        what: "OFFSET_DATA chunk",
                        reason: "no data",
                    });
                }
                Chunk::OffsetData { offset, data }
            }
            REPLY_TYPE_OFFSET_HOLE => {
                let offset = r.u64()?;
                let length = r.u32()?;
                if length == 0 {
                    return Err(ProtoError::Invalid {
                        what: "OFFSET_HOLE chunk",
                        reason: "zero length",
                    });
                }
                Chunk::OffsetHole { offset, length }
            }
            REPLY_TYPE_BLOCK_STATUS => {
                let context_id = r.u32()?;
                if r.remaining() == 0 || r.remaining() % 8 != 0 {
                    return Err(ProtoError::Invalid {
                        what: "BLOCK_STATUS chunk",
                        reason: "length must be 4 + 8n with n >= 1",
                    });
                }
                let mut extents = Vec::with_capacity(r.remaining() / 8);
                while r.remaining() > 0 {
                    let length = r.u32()? as u64;
                    let flags = r.u32()? as u64;
                    extents.push(Extent { length, flags });
                }
                Chunk::BlockStatus {
                    context_id,
                    extents,
                }
            }
            REPLY_TYPE_BLOCK_STATUS_EXT => {
                let context_id = r.u32()?;
                let count = r.u32()? as usize;
                if count == 0 || r.remaining() / 16 != count || r.remaining() % 16 != 0 {
                    return Err(ProtoError::Invalid {
                        what: "BLOCK_STATUS_EXT chunk",
                        reason: "descriptor count does not match the length",
                    });
                }
                let mut extents = Vec::with_capacity(count);
                for _ in 0..count {
                    let length = r.u64()?;
                    let flags = r.u64()?;
                    extents.push(Extent { length, flags });
                }
                Chunk::BlockStatusExt {
                    context_id,
                    extents,
                }
            }
            k if k & REPLY_TYPE_FLAG_ERROR != 0 => {
                let error = r.u32()?;
                let mlen = r.u16()? as usize;
                let message = String::from_utf8_lossy(r.bytes(mlen)?).into_owned();
                match k {
                    REPLY_TYPE_ERROR => Chunk::Error { error, message },
                    REPLY_TYPE_ERROR_OFFSET => {
                        let offset = r.u64()?;
                        Chunk::ErrorOffset {
                            error,
                            message,
                            offset,
                        }
                    }
                    kind => {
                        // Unknown error chunks may carry more fields after the message.
                        r.rest();
                        Chunk::UnknownError {
                            kind,
                            error,
                            message,
                        }
                    }
                }
            }
            _ => {
                return Err(ProtoError::Invalid {
                    what: "reply chunk",
                    reason: "unknown chunk type",
                })
            }
        };
        r.end()?;
        Ok(c)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Simple => "simple",
            Mode::Structured => "structured",
            Mode::Extended => "extended",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_round_trip() {
        let g = Greeting {
            flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
        };
        let b = g.encode();
        assert_eq!(&b[..8], b"NBDMAGIC");
        assert_eq!(&b[8..16], b"IHAVEOPT");
        assert_eq!(Greeting::decode(&b), Ok(g));
        assert!(Greeting::decode(&b[..17]).is_err());
    }

    #[test]
    fn client_flags_refuse_unknown_bits() {
        assert!(ClientFlags::decode(&3u32.to_be_bytes()).is_ok());
        assert!(ClientFlags::decode(&4u32.to_be_bytes()).is_err());
    }

    #[test]
    fn option_header_limits() {
        let h = OptionHeader {
            option: OPT_GO,
            length: MAX_PAYLOAD,
        };
        assert_eq!(OptionHeader::decode(&h.encode()), Ok(h));
        let big = OptionHeader {
            option: OPT_GO,
            length: MAX_PAYLOAD + 1,
        };
        assert!(matches!(
            OptionHeader::decode(&big.encode()),
            Err(ProtoError::TooLong { .. })
        ));
        let mut bad = h.encode();
        bad[0] ^= 1;
        assert!(matches!(
            OptionHeader::decode(&bad),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn info_request_round_trip_and_bad_lengths() {
        let req = InfoRequest {
            name: "disk".into(),
            requests: vec![INFO_NAME, INFO_BLOCK_SIZE],
        };
        let mut p = Vec::new();
        req.encode(&mut p).unwrap();
        assert_eq!(InfoRequest::decode(&p), Ok(req));
        // Name length past the payload.
        let mut bad = p.clone();
        bad[3] = 200;
        assert!(InfoRequest::decode(&bad).is_err());
        // Count not matching.
        let mut bad = p.clone();
        bad.pop();
        assert!(InfoRequest::decode(&bad).is_err());
        // Huge name length never allocates.
        let mut huge = vec![0xff, 0xff, 0xff, 0xff];
        huge.extend_from_slice(&[0, 0]);
        assert!(InfoRequest::decode(&huge).is_err());
    }

    #[test]
    fn meta_request_round_trip() {
        let req = MetaContextRequest {
            export: "".into(),
            queries: vec!["base:allocation".into(), "qemu:".into()],
        };
        let mut p = Vec::new();
        req.encode(&mut p).unwrap();
        assert_eq!(MetaContextRequest::decode(&p), Ok(req));
        // A billion queries announced, none present: error, no allocation.
        let p = [0, 0, 0, 0, 0x40, 0, 0, 0];
        assert!(MetaContextRequest::decode(&p).is_err());
    }

    #[test]
    fn option_replies_round_trip() {
        let replies = [
            OptionReply::Ack,
            OptionReply::Server {
                name: "a".into(),
                description: "desc".into(),
            },
            OptionReply::Info(Info::Export {
                size: 1 << 40,
                flags: 0x1ded,
            }),
            OptionReply::Info(Info::Name("n".into())),
            OptionReply::Info(Info::Description("d".into())),
            OptionReply::Info(Info::BlockSize {
                min: 1,
                preferred: 4096,
                max: MAX_PAYLOAD,
            }),
            OptionReply::MetaContext {
                id: 1,
                name: CONTEXT_QEMU_ALLOCATION_DEPTH.into(),
            },
            OptionReply::Error {
                code: REP_ERR_UNSUP,
                message: "no".into(),
            },
        ];
        for r in replies {
            let mut out = Vec::new();
            r.encode(OPT_GO, &mut out).unwrap();
            let h = OptionReplyHeader::decode(&out[..OptionReplyHeader::LEN]).unwrap();
            assert_eq!(h.option, OPT_GO);
            let d = OptionReply::decode(&h, &out[OptionReplyHeader::LEN..]).unwrap();
            assert_eq!(d, r);
        }
    }

    #[test]
    fn requests_round_trip() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            cookie: 7,
            offset: 4096,
            length: 512,
        };
        for ext in [false, true] {
            let mut out = Vec::new();
            r.encode(ext, &mut out).unwrap();
            assert_eq!(out.len(), if ext { 32 } else { 28 });
            assert_eq!(Request::decode(&out, ext), Ok(r));
            assert!(Request::decode(&out, !ext).is_err());
        }
        let big = Request {
            length: 1 << 33,
            ..r
        };
        assert!(big.encode(false, &mut Vec::new()).is_err());
        assert_eq!(r.payload_len(false), 512);
        assert_eq!(r.payload_len(true), 512);
        let flush = Request {
            command: CMD_FLUSH,
            ..r
        };
        assert_eq!(flush.payload_len(true), 0);
        let rp = Request {
            flags: CMD_FLAG_PAYLOAD_LEN,
            command: CMD_BLOCK_STATUS,
            ..r
        };
        assert_eq!(rp.payload_len(true), 512);
        assert_eq!(rp.payload_len(false), 0);
    }

    #[test]
    fn chunks_round_trip() {
        let data = [1u8, 2, 3];
        let chunks = [
            Chunk::None,
            Chunk::OffsetData {
                offset: 9,
                data: &data,
            },
            Chunk::OffsetHole {
                offset: 1,
                length: 512,
            },
            Chunk::BlockStatus {
                context_id: 0,
                extents: vec![
                    Extent {
                        length: 4096,
                        flags: 3,
                    },
                    Extent {
                        length: 512,
                        flags: 0,
                    },
                ],
            },
            Chunk::BlockStatusExt {
                context_id: 1,
                extents: vec![Extent {
                    length: 1 << 40,
                    flags: 2,
                }],
            },
            Chunk::Error {
                error: EINVAL,
                message: "bad".into(),
            },
            Chunk::ErrorOffset {
                error: EIO,
                message: "io".into(),
                offset: 77,
            },
        ];
        for ext in [false, true] {
            for c in &chunks {
                if !ext && matches!(c, Chunk::BlockStatusExt { .. }) {
                    continue;
                }
                let mut out = Vec::new();
                c.encode(ext, REPLY_FLAG_DONE, 5, 100, &mut out).unwrap();
                let magic = u32::from_be_bytes([out[0], out[1], out[2], out[3]]);
                let hl = ReplyHeader::len_for_magic(magic).unwrap();
                let h = ReplyHeader::decode(&out[..hl]).unwrap();
                let ch = match h {
                    ReplyHeader::Structured(ch) if !ext => ch,
                    ReplyHeader::Extended(ch) if ext => {
                        assert_eq!(ch.offset, 100);
                        ch
                    }
                    other => panic!("unexpected header {other:?}"),
                };
                assert!(ch.done());
                assert_eq!(ch.cookie, 5);
                assert_eq!(ch.length as usize, out.len() - hl);
                assert_eq!(&Chunk::decode(ch.kind, &out[hl..]).unwrap(), c);
            }
        }
    }

    #[test]
    fn chunk_decode_rejects_malformed() {
        assert!(Chunk::decode(REPLY_TYPE_OFFSET_HOLE, &[0; 11]).is_err());
        assert!(Chunk::decode(REPLY_TYPE_BLOCK_STATUS, &[0; 4]).is_err());
        // Declared count far above the payload.
        let mut p = vec![0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        p.extend_from_slice(&[0; 16]);
        assert!(Chunk::decode(REPLY_TYPE_BLOCK_STATUS_EXT, &p).is_err());
        assert!(Chunk::decode(REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0xff, 0xff]).is_err());
        assert!(Chunk::decode(77, &[]).is_err());
        assert!(matches!(
            Chunk::decode(REPLY_TYPE_FLAG_ERROR | 9, &[0, 0, 0, 5, 0, 1, b'x', 1, 2]),
            Ok(Chunk::UnknownError { .. })
        ));
    }

    #[test]
    fn simple_reply_and_errno() {
        let mut out = Vec::new();
        SimpleReply {
            error: EPERM,
            cookie: 3,
        }
        .encode(&mut out);
        assert_eq!(
            ReplyHeader::decode(&out),
            Ok(ReplyHeader::Simple(SimpleReply {
                error: EPERM,
                cookie: 3
            }))
        );
        assert_eq!(nbd_errno(30), EPERM);
        assert_eq!(nbd_errno(122), ENOSPC);
        assert_eq!(nbd_errno(9), EINVAL);
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        let s = "é".repeat(3000);
        let t = truncate_str(&s, MAX_STRING);
        assert!(t.len() <= MAX_STRING);
        assert!(t.is_char_boundary(t.len()));
    }
}
