//! Entry points shared by the cargo-fuzz targets and the seeded mutation tests.
//!
//! Each function feeds arbitrary bytes to a real [`Server`] as everything a client sends on
//! one connection, over an in-memory pipe, and drains whatever the server answers. The export is
//! a 1 MiB raw image in memory (capped, so a hostile write cannot grow it). The only acceptable
//! outcomes are a reply stream and a closed connection; a panic, a hang (the run is bounded by a
//! timeout) or a huge allocation is a bug.

use crate::proto::*;
use crate::server::{Export, Server, ServerConfig};
use diskstream_block::format::raw::RawNode;
use diskstream_block::protocol::mem::MemProtocol;
use diskstream_block::protocol::Protocol;
use diskstream_block::BlockBackend;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Size of the fuzzed export.
const EXPORT_SIZE: usize = 1 << 20;

/// Feed `data` as the whole client side of a connection, from the first byte of the handshake.
/// Returns the number of bytes the server sent.
pub fn handshake(data: &[u8]) -> usize {
    run(data.to_vec())
}

/// Negotiate a session (the first byte picks simple, structured, extended headers or
/// `EXPORT_NAME`, with both metadata contexts where possible), then feed the rest of `data` as
/// transmission-phase requests. Returns the number of bytes the server sent.
pub fn transmission(data: &[u8]) -> usize {
    let (mode, rest) = match data.split_first() {
        Some((m, r)) => (*m, r),
        None => (0, data),
    };
    let mut input = negotiation_prefix(mode);
    input.extend_from_slice(rest);
    run(input)
}

/// Client bytes that reach the transmission phase on export "fuzz" in the mode picked by
/// `mode % 4`: 0 simple (GO), 1 structured + contexts (GO), 2 extended + contexts (GO),
/// 3 structured via `EXPORT_NAME`.
pub fn negotiation_prefix(mode: u8) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&ClientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).encode());
    let mut meta = Vec::new();
    let req = MetaContextRequest {
        export: "fuzz".into(),
        queries: vec![
            CONTEXT_BASE_ALLOCATION.into(),
            CONTEXT_QEMU_ALLOCATION_DEPTH.into(),
        ],
    };
    // Encoding fixed, valid values cannot fail.
    let _ = req.encode(&mut meta);
    let mut go = Vec::new();
    let _ = InfoRequest {
        name: "fuzz".into(),
        requests: vec![INFO_BLOCK_SIZE],
    }
    .encode(&mut go);
    let m = mode % 4;
    match m {
        1 | 3 => {
            let _ = encode_option(OPT_STRUCTURED_REPLY, &[], &mut v);
        }
        2 => {
            let _ = encode_option(OPT_EXTENDED_HEADERS, &[], &mut v);
        }
        _ => {}
    }
    if m != 0 {
        let _ = encode_option(OPT_SET_META_CONTEXT, &meta, &mut v);
    }
    if m == 3 {
        let _ = encode_option(OPT_EXPORT_NAME, b"fuzz", &mut v);
    } else {
        let _ = encode_option(OPT_GO, &go, &mut v);
    }
    v
}

fn run(input: Vec<u8>) -> usize {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    else {
        return 0;
    };
    rt.block_on(async move {
        let mut data = vec![0u8; EXPORT_SIZE];
        for (i, b) in data.iter_mut().enumerate().take(EXPORT_SIZE / 2) {
            *b = (i % 251) as u8;
        }
        let file: Arc<dyn Protocol> = Arc::new(MemProtocol::new(
            "fuzz.raw",
            data,
            false,
            EXPORT_SIZE as u64,
        ));
        let Ok(node) = RawNode::open(file).await else {
            return 0;
        };
        let mut cfg = ServerConfig::new(vec![Export {
            name: "fuzz".into(),
            description: "fuzzed export".into(),
            backend: BlockBackend::new(Arc::new(node)),
            read_only: false,
            allocation_depth: true,
            writethrough: false,
            max_connections: 2,
        }]);
        cfg.handshake_timeout = Duration::from_secs(2);
        let Ok(server) = Server::new(cfg) else {
            return 0;
        };
        let (client, server_end) = tokio::io::duplex(256 * 1024);
        let srv = tokio::spawn(async move { server.handle(server_end).await });
        let (mut cr, mut cw) = tokio::io::split(client);
        let send = async move {
            let _ = cw.write_all(&input).await;
            let _ = cw.shutdown().await;
        };
        let recv = async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0usize;
            while let Ok(n) = cr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                total += n;
            }
            total
        };
        let all = async move {
            let (_, n, _) = tokio::join!(send, recv, srv);
            n
        };
        tokio::time::timeout(Duration::from_secs(10), all)
            .await
            .unwrap_or(0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_reach_transmission() {
        for mode in 0..4 {
            // A flush and a disconnect after the prefix: the server must answer the flush.
            let mut req = Vec::new();
            let ext = mode == 2;
            Request {
                flags: 0,
                command: CMD_FLUSH,
                cookie: 1,
                offset: 0,
                length: 0,
            }
            .encode(ext, &mut req)
            .unwrap();
            Request {
                flags: 0,
                command: CMD_DISC,
                cookie: 2,
                offset: 0,
                length: 0,
            }
            .encode(ext, &mut req)
            .unwrap();
            let mut data = vec![mode];
            data.extend_from_slice(&req);
            assert!(transmission(&data) > 18, "mode {mode}");
        }
        assert_eq!(handshake(&[]), Greeting::LEN);
    }
}
