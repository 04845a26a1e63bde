//! `nbdcopy` in both directions: out of a read-only qcow2 chain export into a file, into a
//! writable qcow2 export (multi-conn: nbdcopy opens 4 connections when it is advertised) from a
//! sparse raw file, and from one of our exports into another. Results are checked with
//! `qemu-img compare` and `qemu-img check` after the server closed the images.

mod common;

use common::*;
use diskstream_nbd::proto::{Mode, CMD_READ};
use std::process::Command;

/// `qemu-img compare` of two images (fails the test if they differ).
fn compare(fa: &str, a: &str, fb: &str, b: &str) {
    qemu_img(&["compare", "-q", "-f", fa, "-F", fb, a, b]);
}

fn nbdcopy(args: &[&str]) {
    require("nbdcopy");
    run(Command::new("nbdcopy").args(args));
}

#[test]
fn nbdcopy_both_directions() {
    let dir = tempfile::tempdir().unwrap();
    let top = make_chain(dir.path());
    let src = dir.path().join("src.raw");
    let dst = dir.path().join("dst.qcow2");
    let dst2 = dir.path().join("dst2.qcow2");
    let (s, d, d2) = (
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
        dst2.to_str().unwrap(),
    );
    qemu_img(&["create", "-q", "-f", "raw", s, "48M"]);
    qemu_io(
        "raw",
        s,
        &[
            "write -P 0x5a 0 3M",
            "write -P 0x5b 7M 100k",
            "write -P 0x5c 20M 8M",
            "write -P 0x5d 47M 1M",
        ],
    );
    qemu_img(&["create", "-q", "-f", "qcow2", d, "48M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        d2,
        "64M",
    ]);
    let srv = TestServer::start(
        dir.path(),
        vec![
            Spec {
                read_only: true,
                allocation_depth: true,
                max_connections: 4,
                ..Spec::new("chain", &top)
            },
            Spec {
                max_connections: 4,
                ..Spec::new("dst", &dst)
            },
            Spec {
                max_connections: 4,
                ..Spec::new("dst2", &dst2)
            },
        ],
        |_| {},
    );

    // Export → file.
    let out = dir.path().join("out.raw");
    nbdcopy(&[&srv.tcp_uri("chain"), out.to_str().unwrap()]);
    compare("raw", out.to_str().unwrap(), "qcow2", top.to_str().unwrap());

    // File → export, over 4 connections (multi-conn), with a final flush.
    nbdcopy(&["--flush", "-C", "4", s, &srv.unix_uri("dst")]);
    // Export → export (both ends are ours), via TCP and unix.
    nbdcopy(&[&srv.unix_uri("chain"), &srv.tcp_uri("dst2")]);
    // Without multi-conn each copy would use one connection per NBD end (4 in all).
    let total = srv.counts().total;
    assert!(
        total >= 6,
        "nbdcopy should have used several connections, saw {total}"
    );
    srv.wait_idle(10);
    srv.stop();

    qemu_img(&["check", "-q", d]);
    qemu_img(&["check", "-q", d2]);
    compare("raw", s, "qcow2", d);
    compare("qcow2", top.to_str().unwrap(), "qcow2", d2);
    // Holes of the source stayed holes (nbdcopy zeroed them sparsely).
    let map = qemu_img(&["map", "--output=json", d]);
    let v: serde_json::Value = serde_json::from_str(&map).unwrap();
    let data: u64 = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!(
        data < 16 << 20,
        "destination should stay sparse, {data} bytes of data"
    );
}

/// With `sendfile` on, reads of cached data go out with it (page cache to socket, no buffer) on
/// plain TCP and unix connections, in all three reply styles, pipelined: every byte must equal what
/// qemu-io wrote, for a qcow2 (one data run per read, and reads spanning a hole) and a raw
/// image, and the server must really have taken that path. nbdcopy over the unix socket
/// checks the whole images with `qemu-img compare`.
#[test]
fn cached_reads_are_sent_from_the_page_cache() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q.qcow2");
    let r = dir.path().join("r.raw");
    let (qs, rs) = (q.to_str().unwrap(), r.to_str().unwrap());
    const MIB: u64 = 1 << 20;
    let size = 8 * MIB;
    qemu_img(&["create", "-q", "-f", "qcow2", qs, &size.to_string()]);
    qemu_img(&["create", "-q", "-f", "raw", rs, &size.to_string()]);
    // Patterns, a hole (5M..6M) in the qcow2 and a short run of a different byte.
    let writes = [
        "write -P 0x11 0 5M",
        "write -P 0x22 6M 2M",
        "write -P 0x33 1000k 300k",
    ];
    qemu_io("qcow2", qs, &writes);
    qemu_io("raw", rs, &writes);
    let mut want = vec![0u8; size as usize];
    want[..5 << 20].fill(0x11);
    want[6 << 20..].fill(0x22);
    want[1000 << 10..1300 << 10].fill(0x33);
    // Into the page cache.
    let _ = std::fs::read(&q).unwrap();
    let _ = std::fs::read(&r).unwrap();

    let srv = TestServer::start(
        dir.path(),
        vec![
            Spec {
                read_only: true,
                // A closed connection frees its slot a moment later.
                max_connections: 8,
                ..Spec::new("q", &q)
            },
            Spec {
                read_only: true,
                // A closed connection frees its slot a moment later.
                max_connections: 8,
                ..Spec::new("r", &r)
            },
        ],
        |c| c.sendfile = true,
    );
    let before = diskstream_nbd::server::sendfile_bytes();
    for export in ["q", "r"] {
        for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
            let (mut c, got_size, _) = RawClient::start(&srv.addr(), mode, export, &[]);
            assert_eq!(got_size, size);
            // Aligned 256 KiB reads (nbdcopy's), one spanning the hole, an unaligned one.
            let mut reads: Vec<(u64, u64)> = (0..size / (256 << 10))
                .map(|i| (i * (256 << 10), 256 << 10))
                .collect();
            reads.push((4 * MIB + 12345, MIB + 777));
            reads.push((77, 100_000));
            for (i, &(off, len)) in reads.iter().enumerate() {
                c.request(0, CMD_READ, i as u64 + 1, off, len, &[]);
            }
            for _ in 0..reads.len() {
                let (cookie, got) = c.read_reply();
                let (off, len) = reads[(cookie - 1) as usize];
                assert_eq!(got.error, 0, "{export} {mode:?} read at {off}");
                assert!(
                    got.data == want[off as usize..(off + len) as usize],
                    "{export} {mode:?}: read of {len} at {off} differs"
                );
            }
        }
    }
    let sent = diskstream_nbd::server::sendfile_bytes() - before;
    assert!(
        sent >= 2 * 3 * 7 * MIB,
        "cached reads should go out with sendfile: {sent} bytes did"
    );
    let out = dir.path().join("out.raw");
    nbdcopy(&[&srv.unix_uri("q"), out.to_str().unwrap()]);
    compare("raw", out.to_str().unwrap(), "qcow2", qs);
    let out2 = dir.path().join("out2.raw");
    nbdcopy(&[&srv.unix_uri("r"), out2.to_str().unwrap()]);
    compare("raw", out2.to_str().unwrap(), "raw", rs);
    srv.stop();
}
