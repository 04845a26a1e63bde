//! Byte-level tests over raw sockets, with the client side of our own codec: malformed input
//! (bad magics, unknown client flags, huge option lengths, unknown options and commands, write
//! payloads over 32 MiB, clients vanishing mid-payload or with replies pending) must never panic
//! the server, must leave it serving others, and must leak nothing (the connection count returns
//! to zero). Also the exact protocol semantics peers rely on: option replies, errnos, reply
//! styles per mode, sparse reads, block status filtering, limits and the handshake timeout.

mod common;

use common::*;
use diskstream_nbd::proto::*;
use std::time::{Duration, Instant};

/// A 4 MiB raw image: data in the first MiB, a hole after it.
fn image(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    let s = p.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "raw", s, "4M"]);
    qemu_io("raw", s, &["write -P 0x61 0 1M"]);
    p
}

fn server(dir: &std::path::Path) -> TestServer {
    let img = image(dir, "m.raw");
    let ro = image(dir, "ro.raw");
    TestServer::start(
        dir,
        vec![
            Spec {
                allocation_depth: true,
                max_connections: 8,
                ..Spec::new("m", &img)
            },
            Spec {
                read_only: true,
                ..Spec::new("ro", &ro)
            },
        ],
        |_| {},
    )
}

/// The server still serves: a full session reads the known data.
fn still_serving(srv: &TestServer) {
    let (mut c, size, _) = RawClient::start(&srv.addr(), Mode::Structured, "m", &[]);
    assert_eq!(size, 4 << 20);
    let g = c.call(0, CMD_READ, 0, 4096, &[]);
    assert_eq!(g.error, 0);
    assert_eq!(g.data, vec![0x61; 4096]);
}

fn wait_no_connections(srv: &TestServer) {
    let t = Instant::now();
    while srv.counts().active != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "connections leaked: {:?}",
            srv.counts()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn malformed_handshakes_disconnect() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path());

    // A port probe: connect and close.
    drop(std::net::TcpStream::connect(srv.addr()).unwrap());
    // Unknown client flag bits.
    let mut c = RawClient::tcp(&srv.addr());
    c.hello(0x8000_0001);
    assert!(c.closed());
    // Bad option magic.
    let mut c = RawClient::tcp(&srv.addr());
    c.hello(FLAG_C_FIXED_NEWSTYLE);
    c.send(b"IHAVEOPX\0\0\0\x03\0\0\0\0");
    assert!(c.closed());
    // Option lengths over 32 MiB are refused before anything is read or allocated.
    for len in [u32::MAX, MAX_PAYLOAD + 1] {
        let mut c = RawClient::tcp(&srv.addr());
        c.hello(FLAG_C_FIXED_NEWSTYLE);
        let mut h = OptionHeader {
            option: 99,
            length: 0,
        }
        .encode();
        h[12..].copy_from_slice(&len.to_be_bytes());
        c.send(&h);
        assert!(c.closed());
    }
    // A non-fixed-newstyle client may only send EXPORT_NAME.
    let mut c = RawClient::tcp(&srv.addr());
    c.hello(0);
    c.option(OPT_LIST, &[]);
    assert!(c.closed());
    // EXPORT_NAME of an unknown export cannot be answered: disconnect.
    let mut c = RawClient::tcp(&srv.addr());
    c.hello(FLAG_C_FIXED_NEWSTYLE);
    c.option(OPT_EXPORT_NAME, b"nope");
    assert!(c.closed());
    // Garbage instead of a request after GO.
    let (mut c, _, _) = RawClient::start(&srv.addr(), Mode::Structured, "m", &[]);
    c.send(&[0xde; 28]);
    assert!(c.closed());
    // A compact request after extended headers were agreed.
    let (mut c, _, _) = RawClient::start(&srv.addr(), Mode::Extended, "m", &[]);
    let mut v = Vec::new();
    Request {
        flags: 0,
        command: CMD_READ,
        cookie: 1,
        offset: 0,
        length: 512,
    }
    .encode(false, &mut v)
    .unwrap();
    v.extend_from_slice(&[0; 4]);
    c.send(&v);
    assert!(c.closed());

    wait_no_connections(&srv);
    still_serving(&srv);
    srv.stop();
}

#[test]
fn handshake_semantics() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path());
    let mut c = RawClient::tcp(&srv.addr());
    let g = c.hello(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    assert_eq!(g.flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);

    // Unknown options are drained and refused; the session goes on.
    c.option(99, &[7u8; 1000]);
    assert!(matches!(
        c.reply().1,
        OptionReply::Error {
            code: REP_ERR_UNSUP,
            ..
        }
    ));
    c.option(OPT_PEEK_EXPORT, &[]);
    assert!(matches!(
        c.reply().1,
        OptionReply::Error {
            code: REP_ERR_UNSUP,
            ..
        }
    ));
    c.option(OPT_LIST, b"x");
    assert!(matches!(
        c.reply().1,
        OptionReply::Error {
            code: REP_ERR_INVALID,
            ..
        }
    ));
    // Meta contexts need structured replies first.
    let mut p = Vec::new();
    MetaContextRequest {
        export: "m".into(),
        queries: vec![],
    }
    .encode(&mut p)
    .unwrap();
    c.option(OPT_LIST_META_CONTEXT, &p);
    assert!(matches!(
        c.reply().1,
        OptionReply::Error {
            code: REP_ERR_INVALID,
            ..
        }
    ));
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.reply().1, OptionReply::Ack);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert!(matches!(
        c.reply().1,
        OptionReply::Error {
            code: REP_ERR_INVALID,
            ..
        }
    ));
    // LIST_META_CONTEXT: everything with no query, namespaces as wildcards, ids zero.
    c.option(OPT_LIST_META_CONTEXT, &p);
    let r = c.replies();
    let names: Vec<_> = r
        .iter()
        .filter_map(|x| match x {
            OptionReply::MetaContext { id, name } => Some((*id, name.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        names,
        vec![
            (0, CONTEXT_BASE_ALLOCATION.to_string()),
            (0, CONTEXT_QEMU_ALLOCATION_DEPTH.to_string())
        ]
    );
    let mut q = Vec::new();
    MetaContextRequest {
        export: "ro".into(),
        queries: vec!["qemu:".into(), "base:".into(), "x-foo:bar".into()],
    }
    .encode(&mut q)
    .unwrap();
    c.option(OPT_LIST_META_CONTEXT, &q);
    let r = c.replies();
    assert_eq!(r.len(), 2, "ro has no allocation-depth context: {r:?}");
    // SET selects exact names only, with QEMU's ids.
    let mut q = Vec::new();
    MetaContextRequest {
        export: "m".into(),
        queries: vec![
            "base:".into(),
            CONTEXT_QEMU_ALLOCATION_DEPTH.into(),
            CONTEXT_BASE_ALLOCATION.into(),
        ],
    }
    .encode(&mut q)
    .unwrap();
    c.option(OPT_SET_META_CONTEXT, &q);
    let r = c.replies();
    assert_eq!(
        r,
        vec![
            OptionReply::MetaContext {
                id: 0,
                name: CONTEXT_BASE_ALLOCATION.into()
            },
            OptionReply::MetaContext {
                id: 1,
                name: CONTEXT_QEMU_ALLOCATION_DEPTH.into()
            },
            OptionReply::Ack
        ]
    );
    // Malformed meta payload and unknown export.
    c.option(OPT_SET_META_CONTEXT, &[0, 0, 0, 9]);
    assert!(matches!(
        c.reply().1,
        OptionReply::Error {
            code: REP_ERR_INVALID,
            ..
        }
    ));
    let mut q = Vec::new();
    MetaContextRequest {
        export: "zz".into(),
        queries: vec![],
    }
    .encode(&mut q)
    .unwrap();
    c.option(OPT_LIST_META_CONTEXT, &q);
    assert!(matches!(
        c.reply().1,
        OptionReply::Error {
            code: REP_ERR_UNKNOWN,
            ..
        }
    ));
    // INFO: name on request, block sizes and export always.
    let mut q = Vec::new();
    InfoRequest {
        name: "ro".into(),
        requests: vec![INFO_NAME],
    }
    .encode(&mut q)
    .unwrap();
    c.option(OPT_INFO, &q);
    let r = c.replies();
    assert!(r.contains(&OptionReply::Info(Info::Name("ro".into()))));
    assert!(r.contains(&OptionReply::Info(Info::BlockSize {
        min: 1,
        preferred: 4096,
        max: MAX_PAYLOAD
    })));
    assert!(r.iter().any(|x| matches!(x, OptionReply::Info(Info::Export { size: 4194304, flags }) if flags & FLAG_READ_ONLY != 0)));
    let mut q = Vec::new();
    InfoRequest {
        name: "zz".into(),
        requests: vec![],
    }
    .encode(&mut q)
    .unwrap();
    c.option(OPT_GO, &q);
    assert!(matches!(
        c.reply().1,
        OptionReply::Error {
            code: REP_ERR_UNKNOWN,
            ..
        }
    ));
    c.option(OPT_GO, &[0, 0, 0, 50, 0]);
    assert!(matches!(
        c.reply().1,
        OptionReply::Error {
            code: REP_ERR_INVALID,
            ..
        }
    ));
    // Extended headers: then STRUCTURED_REPLY is ERR_EXT_HEADER_REQD, EXPORT_NAME is fatal.
    c.option(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(c.reply().1, OptionReply::Ack);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert!(matches!(
        c.reply().1,
        OptionReply::Error {
            code: REP_ERR_EXT_HEADER_REQD,
            ..
        }
    ));
    c.option(OPT_EXPORT_NAME, b"m");
    assert!(c.closed());

    // EXPORT_NAME with and without NO_ZEROES.
    for (flags, len) in [
        (FLAG_C_FIXED_NEWSTYLE, 134),
        (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 10),
    ] {
        let mut c = RawClient::tcp(&srv.addr());
        c.hello(flags);
        c.option(OPT_EXPORT_NAME, b"m");
        let b = c.recv(len);
        let r = ExportNameReply::decode(&b[..10]).unwrap();
        assert_eq!(r.size, 4 << 20);
        assert_eq!(
            r.flags & FLAG_SEND_DF,
            0,
            "no DF without structured replies"
        );
        assert!(b[10..].iter().all(|&x| x == 0));
        c.request(0, CMD_READ, 5, 0, 512, &[]);
        let (cookie, g) = c.read_reply();
        assert_eq!((cookie, g.error, g.data.len()), (5, 0, 512));
    }
    // ABORT is acknowledged.
    let mut c = RawClient::tcp(&srv.addr());
    c.hello(FLAG_C_FIXED_NEWSTYLE);
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.reply().1, OptionReply::Ack);
    assert!(c.closed());
    wait_no_connections(&srv);
    srv.stop();
}

#[test]
fn command_semantics_in_every_mode() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path());
    let size = 4u64 << 20;
    for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
        let ctx: &[&str] = if mode == Mode::Simple {
            &[]
        } else {
            &[CONTEXT_BASE_ALLOCATION, CONTEXT_QEMU_ALLOCATION_DEPTH]
        };
        let (mut c, sz, flags) = RawClient::start(&srv.addr(), mode, "m", ctx);
        assert_eq!(sz, size);
        assert_eq!(flags & FLAG_SEND_DF != 0, mode != Mode::Simple, "{mode}");
        assert_eq!(
            flags & FLAG_BLOCK_STAT_PAYLOAD != 0,
            mode == Mode::Extended,
            "{mode}"
        );
        assert_ne!(flags & FLAG_CAN_MULTI_CONN, 0);
        let errno = |c: &mut RawClient, flags, cmd, off, len, payload: &[u8]| {
            let g = c.call(flags, cmd, off, len, payload);
            if mode != Mode::Simple && g.error != 0 {
                assert!(!g.message.is_empty(), "structured errors carry a message");
            }
            g.error
        };
        // Past the end: ENOSPC for writes and zeroes, EINVAL otherwise (qemu-nbd's choice).
        assert_eq!(errno(&mut c, 0, CMD_READ, size - 512, 1024, &[]), EINVAL);
        assert_eq!(
            errno(&mut c, 0, CMD_WRITE, size - 512, 1024, &[1; 1024]),
            ENOSPC
        );
        assert_eq!(errno(&mut c, 0, CMD_WRITE_ZEROES, size, 512, &[]), ENOSPC);
        assert_eq!(errno(&mut c, 0, CMD_TRIM, size, 512, &[]), EINVAL);
        assert_eq!(errno(&mut c, 0, CMD_CACHE, u64::MAX - 10, 512, &[]), EINVAL);
        // Unknown commands and flags; a read over 32 MiB.
        assert_eq!(errno(&mut c, 0, 99, 0, 0, &[]), EINVAL);
        assert_eq!(
            errno(&mut c, CMD_FLAG_NO_HOLE, CMD_READ, 0, 512, &[]),
            EINVAL
        );
        assert_eq!(
            errno(&mut c, CMD_FLAG_DF, CMD_WRITE, 0, 512, &[0; 512]),
            EINVAL
        );
        assert_eq!(
            errno(&mut c, 0, CMD_READ, 0, MAX_PAYLOAD as u64 + 512, &[]),
            EINVAL
        );
        // Writes and reads, FUA, zeroes, flush.
        assert_eq!(
            errno(
                &mut c,
                CMD_FLAG_FUA,
                CMD_WRITE,
                2 << 20,
                4096,
                &[0x7a; 4096]
            ),
            0
        );
        let g = c.call(0, CMD_READ, 2 << 20, 8192, &[]);
        assert_eq!(g.error, 0);
        assert_eq!(&g.data[..4096], &[0x7a; 4096][..]);
        assert_eq!(&g.data[4096..], &[0; 4096][..]);
        assert_eq!(
            errno(
                &mut c,
                CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
                CMD_WRITE_ZEROES,
                2 << 20,
                4096,
                &[]
            ),
            0
        );
        assert_eq!(errno(&mut c, 0, CMD_FLUSH, 0, 0, &[]), 0);
        assert_eq!(errno(&mut c, 0, CMD_CACHE, 0, 1 << 20, &[]), 0);
        assert_eq!(errno(&mut c, 0, CMD_READ, 0, 0, &[]), 0);
        match mode {
            Mode::Simple => {
                let g = c.call(0, CMD_READ, 512 * 1024, 1 << 20, &[]);
                assert!(g.kinds.is_empty(), "simple mode uses simple replies");
                assert_eq!(&g.data[..512 * 1024], &vec![0x61; 512 * 1024][..]);
                assert_eq!(errno(&mut c, 0, CMD_BLOCK_STATUS, 0, 4096, &[]), EINVAL);
            }
            _ => {
                // Sparse read: data then a hole; DF gives one data chunk.
                let g = c.call(0, CMD_READ, 512 * 1024, 1 << 20, &[]);
                assert_eq!(
                    g.kinds,
                    vec![REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE],
                    "{mode}"
                );
                assert_eq!(&g.data[..512 * 1024], &vec![0x61; 512 * 1024][..]);
                assert!(g.data[512 * 1024..].iter().all(|&b| b == 0));
                let g = c.call(CMD_FLAG_DF, CMD_READ, 512 * 1024, 1 << 20, &[]);
                assert_eq!(g.kinds, vec![REPLY_TYPE_OFFSET_DATA]);
                // Block status: one chunk per context, narrow or 64-bit by mode.
                let g = c.call(0, CMD_BLOCK_STATUS, 0, size, &[]);
                assert_eq!(g.error, 0);
                let kind = if mode == Mode::Extended {
                    REPLY_TYPE_BLOCK_STATUS_EXT
                } else {
                    REPLY_TYPE_BLOCK_STATUS
                };
                assert_eq!(g.kinds, vec![kind, kind]);
                let base = &g.status.iter().find(|s| s.0 == 0).unwrap().1;
                assert_eq!(base[0], (1 << 20, 0));
                assert_eq!(base.iter().map(|e| e.0).sum::<u64>(), size);
                let depth = &g.status.iter().find(|s| s.0 == 1).unwrap().1;
                // A raw layer describes every byte itself (holes included): depth 1 throughout.
                assert_eq!(depth, &vec![(size, 1)]);
                let g = c.call(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 4096, 8192, &[]);
                assert!(
                    g.status.iter().all(|s| s.1 == vec![(8192, s.1[0].1)]),
                    "{:?}",
                    g.status
                );
                assert_eq!(errno(&mut c, 0, CMD_BLOCK_STATUS, 0, 0, &[]), EINVAL);
                assert_eq!(errno(&mut c, 0, CMD_BLOCK_STATUS, size, 512, &[]), EINVAL);
                // FAST_ZERO over data that is not cluster-shaped... raw zeroing is always fast.
                assert_eq!(
                    errno(
                        &mut c,
                        CMD_FLAG_FAST_ZERO,
                        CMD_WRITE_ZEROES,
                        3 << 20,
                        4096,
                        &[]
                    ),
                    0
                );
            }
        }
        if mode == Mode::Extended {
            // Replies echo the request offset; the payload form filters contexts.
            let g = c.call(0, CMD_READ, 8192, 512, &[]);
            assert!(g.offsets.iter().all(|&o| o == 8192));
            let mut p = Vec::new();
            BlockStatusPayload {
                effect_length: 1 << 20,
                ids: vec![1],
            }
            .encode(&mut p);
            let g = c.call(
                CMD_FLAG_PAYLOAD_LEN,
                CMD_BLOCK_STATUS,
                0,
                p.len() as u64,
                &p,
            );
            assert_eq!(g.error, 0);
            assert_eq!(g.status.len(), 1);
            assert_eq!(g.status[0].0, 1);
            let mut p = Vec::new();
            BlockStatusPayload {
                effect_length: 4096,
                ids: vec![7],
            }
            .encode(&mut p);
            assert_eq!(
                errno(
                    &mut c,
                    CMD_FLAG_PAYLOAD_LEN,
                    CMD_BLOCK_STATUS,
                    0,
                    p.len() as u64,
                    &p
                ),
                EINVAL
            );
            // A payload on a command that takes none is consumed, then refused.
            assert_eq!(
                errno(&mut c, CMD_FLAG_PAYLOAD_LEN, CMD_FLUSH, 0, 100, &[9; 100]),
                EINVAL
            );
            // 64-bit effect lengths.
            assert_eq!(errno(&mut c, 0, CMD_WRITE_ZEROES, 0, 1 << 40, &[]), ENOSPC);
            assert_eq!(errno(&mut c, 0, CMD_TRIM, 3 << 20, 1 << 20, &[]), 0);
        }
        // The connection survived every error.
        let g = c.call(0, CMD_READ, 0, 512, &[]);
        assert_eq!(g.data, vec![0x61; 512]);
        c.request(0, CMD_DISC, 9, 0, 0, &[]);
        assert!(c.closed());
    }
    // Read-only export: EPERM for every write.
    let (mut c, _, flags) = RawClient::start(&srv.addr(), Mode::Structured, "ro", &[]);
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    assert_eq!(
        flags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_CAN_MULTI_CONN),
        0
    );
    assert_eq!(c.call(0, CMD_WRITE, 0, 512, &[0; 512]).error, EPERM);
    assert_eq!(c.call(0, CMD_TRIM, 0, 512, &[]).error, EPERM);
    assert_eq!(c.call(0, CMD_WRITE_ZEROES, 0, 512, &[]).error, EPERM);
    assert_eq!(c.call(0, CMD_READ, 0, 512, &[]).data, vec![0x61; 512]);
    drop(c);
    wait_no_connections(&srv);
    srv.stop();
}

#[test]
fn oversize_payloads_and_vanishing_clients() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path());
    // A write payload over 32 MiB cannot be skipped safely: the server hangs up at once.
    for mode in [Mode::Structured, Mode::Extended] {
        let (mut c, _, _) = RawClient::start(&srv.addr(), mode, "m", &[]);
        let mut v = Vec::new();
        Request {
            flags: 0,
            command: CMD_WRITE,
            cookie: 1,
            offset: 0,
            length: MAX_PAYLOAD as u64 + 1,
        }
        .encode(mode == Mode::Extended, &mut v)
        .unwrap();
        c.send(&v);
        assert!(c.closed(), "{mode}");
    }
    // A client that leaves halfway through a write payload.
    let (mut c, _, _) = RawClient::start(&srv.addr(), Mode::Extended, "m", &[]);
    let mut v = Vec::new();
    Request {
        flags: 0,
        command: CMD_WRITE,
        cookie: 1,
        offset: 0,
        length: 1 << 20,
    }
    .encode(true, &mut v)
    .unwrap();
    v.extend_from_slice(&vec![0xff; 300_000]);
    c.send(&v);
    drop(c);
    // A client that queues many large reads and leaves without reading the replies.
    for _ in 0..3 {
        let (mut c, _, _) = RawClient::start(&srv.addr(), Mode::Structured, "m", &[]);
        for i in 0..40 {
            let mut v = Vec::new();
            Request {
                flags: CMD_FLAG_DF,
                command: CMD_READ,
                cookie: i,
                offset: 0,
                length: 4 << 20,
            }
            .encode(false, &mut v)
            .unwrap();
            if !c.try_send(&v) {
                break;
            }
        }
        drop(c);
    }
    wait_no_connections(&srv);
    // Nothing of the half-sent write reached the disk, and others are served.
    still_serving(&srv);
    srv.stop();
}

#[test]
fn pipelined_requests_all_answered() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path());
    let (mut c, _, _) =
        RawClient::start(&srv.addr(), Mode::Extended, "m", &[CONTEXT_BASE_ALLOCATION]);
    // 200 requests in flight (more than the per-connection limit of 64, so the reader has to
    // wait for permits while the writer drains), every reply accounted for exactly once.
    let n = 200u64;
    for i in 0..n {
        let off = (i % 32) * 65536 + (2 << 20);
        match i % 4 {
            0 => c.request(0, CMD_WRITE, i, off, 65536, &vec![(i % 251) as u8; 65536]),
            1 => c.request(0, CMD_READ, i, (i % 64) * 4096, 4096, &[]),
            2 => c.request(0, CMD_BLOCK_STATUS, i, 0, 4 << 20, &[]),
            _ => c.request(0, CMD_READ, i, 0, 1 << 20, &[]),
        }
    }
    let mut seen = vec![false; n as usize];
    let mut order = Vec::new();
    for _ in 0..n {
        let (cookie, g) = c.read_reply();
        assert_eq!(g.error, 0, "cookie {cookie}: {}", g.message);
        assert!(!seen[cookie as usize], "cookie {cookie} answered twice");
        seen[cookie as usize] = true;
        order.push(cookie);
        if cookie % 4 == 3 {
            assert_eq!(g.data, vec![0x61; 1 << 20]);
        }
    }
    assert!(seen.iter().all(|&s| s));
    c.request(0, CMD_DISC, 0, 0, 0, &[]);
    assert!(c.closed());
    wait_no_connections(&srv);
    srv.stop();
}

#[test]
fn handshake_timeout_and_connection_limits() {
    let dir = tempfile::tempdir().unwrap();
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir(&da).unwrap();
    std::fs::create_dir(&db).unwrap();
    let img = image(dir.path(), "l.raw");
    let quick = TestServer::start(&da, vec![Spec::new("l", &img)], |cfg| {
        cfg.handshake_timeout = Duration::from_millis(300);
    });
    // A client that never finishes the handshake is dropped after the timeout.
    let t = Instant::now();
    let mut idle = RawClient::tcp(&quick.addr());
    idle.recv(Greeting::LEN);
    assert!(idle.closed());
    assert!(t.elapsed() < Duration::from_secs(5));
    wait_no_connections(&quick);
    quick.stop();

    let srv = TestServer::start(&db, vec![Spec::new("l", &img)], |cfg| {
        cfg.max_connections = 2;
    });
    // Export limit 1: a second GO on the export is refused while the first is connected.
    let (mut first, _, _) = RawClient::start(&srv.addr(), Mode::Structured, "l", &[]);
    let mut second = RawClient::tcp(&srv.addr());
    second.hello(FLAG_C_FIXED_NEWSTYLE);
    let mut q = Vec::new();
    InfoRequest {
        name: "l".into(),
        requests: vec![],
    }
    .encode(&mut q)
    .unwrap();
    second.option(OPT_GO, &q);
    assert!(matches!(
        second.reply().1,
        OptionReply::Error {
            code: REP_ERR_POLICY,
            ..
        }
    ));
    // Server limit 2: a third connection gets no greeting until one ends.
    let third = std::net::TcpStream::connect(srv.addr()).unwrap();
    third
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut b = [0u8; 1];
    use std::io::Read;
    assert!(
        (&third).read(&mut b).is_err(),
        "third connection must wait for a slot"
    );
    first.request(0, CMD_DISC, 1, 0, 0, &[]);
    assert!(first.closed());
    third
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut g = [0u8; Greeting::LEN];
    (&third).read_exact(&mut g).unwrap();
    assert!(Greeting::decode(&g).is_ok());
    drop(second);
    drop(third);
    wait_no_connections(&srv);
    srv.stop();
}

/// Seeded mutations of valid client streams through the fuzzing entry points: a regression net
/// for the cargo-fuzz targets that runs with every `cargo test`.
#[test]
fn seeded_mutations_do_not_panic() {
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    for mode in 0..4u8 {
        let ext = mode == 2;
        let mut v = vec![mode];
        for (i, (flags, cmd, off, len)) in [
            (0u16, CMD_WRITE, 4096u64, 512u64),
            (0, CMD_READ, 0, 8192),
            (CMD_FLAG_DF, CMD_READ, 0, 4096),
            (CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 0, 1 << 20),
            (CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 8192, 4096),
            (0, CMD_TRIM, 0, 4096),
            (0, CMD_FLUSH, 0, 0),
        ]
        .into_iter()
        .enumerate()
        {
            Request {
                flags,
                command: cmd,
                cookie: i as u64,
                offset: off,
                length: len,
            }
            .encode(ext, &mut v)
            .unwrap();
            if cmd == CMD_WRITE {
                v.extend_from_slice(&[0x5a; 512]);
            }
        }
        seeds.push(v);
    }
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let t = Instant::now();
    let mut runs = 0;
    while runs < 400 && t.elapsed() < Duration::from_secs(8) {
        let mut v = seeds[(next() % seeds.len() as u64) as usize].clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() % v.len() as u64) as usize;
            match next() % 3 {
                0 => v[at] ^= 1 << (next() % 8),
                1 => v[at] = next() as u8,
                _ => v.truncate(at.max(1)),
            }
        }
        diskstream_nbd::fuzzing::transmission(&v);
        let mut h = diskstream_nbd::fuzzing::negotiation_prefix(v[0]);
        let cut = (next() % h.len() as u64) as usize;
        h[cut] ^= next() as u8;
        diskstream_nbd::fuzzing::handshake(&h);
        runs += 1;
    }
    assert!(runs > 20);
}

/// The soft limit on open files of this process (from /proc; 1024 if unknown).
fn open_file_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(1024)
}

/// Resource limits (issue 8): a client that pipelines large reads and never reads a reply,
/// and a thousand connections that never say a word, do not stall anybody else: another
/// client still gets its data and a second session on the stuck client's export works; when
/// they go, every connection is released.
#[test]
fn stuck_and_idle_clients_do_not_stall_others() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "s.raw");
    let srv = TestServer::start(
        dir.path(),
        vec![Spec {
            max_connections: 4,
            ..Spec::new("s", &img)
        }],
        |cfg| {
            cfg.max_connections = 4000;
            cfg.handshake_timeout = Duration::from_secs(120);
        },
    );
    // The stuck client: 2,000 reads of 4 MiB pipelined (8 GiB of replies), none read. The
    // server answers what fits in the socket buffers, then its writes wait; it stops reading
    // requests at its per-connection limit (64 requests, 128 MiB of payload).
    let (mut stuck, _, _) = RawClient::start(&srv.addr(), Mode::Structured, "s", &[]);
    for cookie in 0..2000u64 {
        stuck.request(0, CMD_READ, cookie, 0, 4 << 20, &[]);
    }
    // Idle connections: each holds two descriptors in this process (client and server side).
    let n_idle = ((open_file_limit().saturating_sub(256)) / 2).min(1000);
    let idle: Vec<std::net::TcpStream> = (0..n_idle)
        .map(|_| std::net::TcpStream::connect(srv.addr()).expect("connect idle"))
        .collect();
    let t = Instant::now();
    while srv.counts().active < n_idle + 1 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "server did not accept the idle connections: {:?}",
            srv.counts()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Others are served meanwhile, on the same export and with the full handshake.
    for _ in 0..3 {
        let (mut c, size, _) = RawClient::start(&srv.addr(), Mode::Extended, "s", &[]);
        assert_eq!(size, 4 << 20);
        let g = c.call(0, CMD_READ, 0, 1 << 20, &[]);
        assert_eq!(g.error, 0);
        assert_eq!(g.data, vec![0x61; 1 << 20]);
        c.request(0, CMD_DISC, 1, 0, 0, &[]);
        assert!(c.closed());
    }
    drop(idle);
    drop(stuck);
    wait_no_connections(&srv);
    still_serving_export(&srv, "s");
    srv.stop();
}

/// A full session on `name` reads the known data.
fn still_serving_export(srv: &TestServer, name: &str) {
    let (mut c, _, _) = RawClient::start(&srv.addr(), Mode::Structured, name, &[]);
    let g = c.call(0, CMD_READ, 0, 4096, &[]);
    assert_eq!(g.error, 0);
    assert_eq!(g.data, vec![0x61; 4096]);
}
