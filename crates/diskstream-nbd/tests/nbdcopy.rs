//! `nbdcopy` in both directions: out of a read-only qcow2 chain export into a file, into a
//! writable qcow2 export (multi-conn: nbdcopy opens 4 connections when it is advertised) from a
//! sparse raw file, and from one of our exports into another. Results are checked with
//! `qemu-img compare` and `qemu-img check` after the server closed the images.

mod common;

use common::*;
use std::process::Command;

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
    qemu_img(&[
        "compare",
        "-q",
        "-f",
        "raw",
        "-F",
        "qcow2",
        out.to_str().unwrap(),
        top.to_str().unwrap(),
    ]);

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
    qemu_img(&["compare", "-q", "-f", "raw", "-F", "qcow2", s, d]);
    qemu_img(&[
        "compare",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
        d2,
    ]);
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
