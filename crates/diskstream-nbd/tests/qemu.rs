//! QEMU 10's own NBD client against our server, over `nbd://127.0.0.1:PORT/export` and
//! `nbd+unix:///export?socket=...`: QEMU negotiates 64-bit extended headers, so these tests
//! cover the 32-byte request/reply path. `qemu-img info/map/convert/compare` on a read-only
//! chain export (maps compared with qemu-nbd serving the same image), `qemu-nbd --list`, and
//! `qemu-io` reads, writes, write-zeroes, discards and pipelined aio on a writable export,
//! checked against a raw model that got the same commands.

mod common;

use common::*;

#[test]
fn qemu_img_on_read_only_chain() {
    let dir = tempfile::tempdir().unwrap();
    let top = make_chain(dir.path());
    let t = top.to_str().unwrap();
    let srv = TestServer::start(
        dir.path(),
        vec![Spec {
            read_only: true,
            allocation_depth: true,
            ..Spec::new("disk", &top)
        }],
        |cfg| cfg.max_connections = 4,
    );
    let qsock = dir.path().join("q.sock");
    let _q = qemu_nbd(
        &["-t", "-r", "-A", "-f", "qcow2", "-x", "disk"],
        &qsock,
        &top,
    );
    let theirs = format!("nbd+unix:///disk?socket={}", qsock.display());

    for uri in [srv.tcp_uri("disk"), srv.unix_uri("disk")] {
        let info = qemu_img(&["info", "--output=json", &uri]);
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(v["virtual-size"], 64 << 20, "{info}");
        qemu_img(&["compare", "-q", "-F", "qcow2", &uri, t]);
    }
    // qemu-img map over NBD (base:allocation through QEMU's client) equals qemu-nbd's.
    let ours = qemu_img(&["map", "--output=json", &srv.tcp_uri("disk")]);
    let reference = qemu_img(&["map", "--output=json", &theirs]);
    assert_eq!(ours, reference);
    // The human format names the URI; compare the rest.
    let human = qemu_img(&["map", &srv.unix_uri("disk")]).replace(&srv.unix_uri("disk"), "URI");
    assert_eq!(human, qemu_img(&["map", &theirs]).replace(&theirs, "URI"));

    // convert pulls the whole chain through the export.
    let out = dir.path().join("conv.qcow2");
    qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        &srv.unix_uri("disk"),
        out.to_str().unwrap(),
    ]);
    qemu_img(&[
        "compare",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        out.to_str().unwrap(),
        t,
    ]);

    // QEMU's client negotiated 64-bit extended headers with us, and sees both contexts.
    require("qemu-nbd");
    let list = stdout(
        std::process::Command::new("qemu-nbd")
            .arg("--list")
            .arg("-k")
            .arg(&srv.sock),
    );
    assert!(list.contains("transaction size: 64-bit"), "{list}");
    assert!(
        list.contains("base:allocation") && list.contains("qemu:allocation-depth"),
        "{list}"
    );
    assert!(list.contains("readonly"), "{list}");
    srv.stop();
}

#[test]
fn qemu_io_on_writable_export_matches_model() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("w.qcow2");
    let model = dir.path().join("model.raw");
    let (i, m) = (img.to_str().unwrap(), model.to_str().unwrap());
    qemu_img(&["create", "-q", "-f", "qcow2", i, "32M"]);
    qemu_img(&["create", "-q", "-f", "raw", m, "32M"]);
    let srv = TestServer::start(dir.path(), vec![Spec::new("w", &img)], |_| {});
    let rounds: [&[&str]; 3] = [
        &[
            "write -P 0x01 0 1M",
            "write -P 0x02 3M 5000",
            "write -z 512k 128k",
            "write -P 0x03 8M 2M",
            "discard 8M 1M",
            "write -z -u 9M 512k",
            "write -P 0x04 33553920 512",
        ],
        // Pipelined: many requests in flight on one connection, then a flush.
        &[
            "aio_write -P 0x10 12M 64k",
            "aio_write -P 0x11 13M 64k",
            "aio_write -P 0x12 14M 1M",
            "aio_write -z 15M 64k",
            "aio_write -P 0x13 16M 4k",
            "aio_write -P 0x14 17M 300k",
            "aio_flush",
            "aio_read -P 0x12 14M 1M",
            "aio_read -P 0x10 12M 64k",
            "aio_read -P 0x11 13M 64k",
            "aio_read -P 0 15M 64k",
            "aio_flush",
        ],
        &[
            "read -P 0x01 0 512k",
            "read -P 0 512k 128k",
            "read -P 0x02 3M 5000",
            "writev -P 0x20 20M 4k 8k 512",
            "write -f -P 0x21 21M 64k",
            "flush",
        ],
    ];
    for (n, cmds) in rounds.iter().enumerate() {
        let uri = if n % 2 == 0 {
            srv.tcp_uri("w")
        } else {
            srv.unix_uri("w")
        };
        qemu_io("raw", &uri, cmds);
        qemu_io("raw", m, cmds);
    }
    srv.stop();
    qemu_img(&["check", "-q", i]);
    qemu_img(&["compare", "-q", "-f", "qcow2", "-F", "raw", i, m]);
}
