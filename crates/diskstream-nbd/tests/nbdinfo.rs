//! `nbdinfo` (libnbd) against our server, with qemu-nbd 10 on the same image as the reference:
//! plain output, `--json`, `--list`, `--map` (base:allocation over the whole chain),
//! `--map=qemu:allocation-depth` and `--can multi-conn` must match what qemu-nbd serves.

mod common;

use common::*;
use std::process::Command;

fn nbdinfo(args: &[&str]) -> String {
    require("nbdinfo");
    stdout(Command::new("nbdinfo").args(args))
}

/// Drop the lines naming the URI (the only field that differs between two servers).
fn without_uri(s: &str) -> String {
    s.lines()
        .filter(|l| !l.contains("\"uri\"") && !l.trim_start().starts_with("uri:"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn read_only_chain_matches_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let top = make_chain(dir.path());
    let srv = TestServer::start(
        dir.path(),
        vec![Spec {
            description: "a qcow2 chain",
            read_only: true,
            allocation_depth: true,
            max_connections: 4,
            ..Spec::new("disk", &top)
        }],
        |_| {},
    );
    let qsock = dir.path().join("q.sock");
    let _q = qemu_nbd(
        &[
            "-t",
            "-r",
            "-A",
            "-e",
            "4",
            "-f",
            "qcow2",
            "-x",
            "disk",
            "-D",
            "a qcow2 chain",
        ],
        &qsock,
        &top,
    );
    let ours = srv.unix_uri("disk");
    let theirs = format!("nbd+unix:///disk?socket={}", qsock.display());

    for args in [
        vec!["--json"],
        vec!["--map"],
        vec!["--map=qemu:allocation-depth"],
        vec!["--map", "--totals"],
        vec![],
    ] {
        let mut a = args.clone();
        a.push(&ours);
        let o = nbdinfo(&a);
        let mut b = args.clone();
        b.push(&theirs);
        let t = nbdinfo(&b);
        assert_eq!(without_uri(&o), without_uri(&t), "nbdinfo {args:?} differs");
    }

    // The map really reports the chain: backing-only data, local data, zero clusters.
    let map = nbdinfo(&["--map=qemu:allocation-depth", &ours]);
    assert!(map.contains("backing depth 2"), "{map}");
    assert!(map.contains("local"), "{map}");
    assert!(map.contains("absent"), "{map}");
    let map = nbdinfo(&["--map", &ours]);
    assert!(map.contains("hole,zero") && map.contains("data"), "{map}");

    // JSON details we promise explicitly.
    let j: serde_json::Value =
        serde_json::from_str(&nbdinfo(&["--json", &srv.tcp_uri("disk")])).unwrap();
    let e = &j["exports"][0];
    assert_eq!(j["protocol"], "newstyle-fixed");
    assert_eq!(j["structured"], true);
    assert_eq!(e["export-size"], 64 << 20);
    assert_eq!(e["is_read_only"], true);
    assert_eq!(e["can_multi_conn"], true);
    assert_eq!(e["can_trim"], false);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    assert_eq!(e["description"], "a qcow2 chain");
    let ctx = e["contexts"].as_array().unwrap();
    assert!(ctx.iter().any(|c| c == "base:allocation"));
    assert!(ctx.iter().any(|c| c == "qemu:allocation-depth"));

    // --can multi-conn: exit 0 when advertised.
    require("nbdinfo");
    let st = Command::new("nbdinfo")
        .args(["--can", "multi-conn", &ours])
        .status()
        .unwrap();
    assert!(st.success());
    srv.stop();
}

#[test]
fn list_and_writable_flags_match_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.raw");
    let c = dir.path().join("c.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", a.to_str().unwrap(), "10M"]);
    qemu_img(&["create", "-q", "-f", "raw", b.to_str().unwrap(), "3M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", c.to_str().unwrap(), "10M"]);
    let srv = TestServer::start(
        dir.path(),
        vec![
            Spec {
                description: "first",
                ..Spec::new("alpha", &a)
            },
            Spec {
                read_only: true,
                max_connections: 3,
                ..Spec::new("beta", &b)
            },
        ],
        |_| {},
    );
    // --list: both exports, names and descriptions, each probed with GO.
    let j: serde_json::Value =
        serde_json::from_str(&nbdinfo(&["--list", "--json", &srv.unix_uri("")])).unwrap();
    let ex = j["exports"].as_array().unwrap();
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0]["export-name"], "alpha");
    assert_eq!(ex[0]["description"], "first");
    assert_eq!(ex[0]["is_read_only"], false);
    assert_eq!(ex[1]["export-name"], "beta");
    assert_eq!(ex[1]["is_read_only"], true);
    assert_eq!(ex[1]["export-size"], 3 << 20);
    let text = nbdinfo(&["--list", &srv.tcp_uri("")]);
    assert!(text.contains("alpha") && text.contains("beta"), "{text}");

    // A writable export with --shared=1 (qemu-nbd's default): no multi-conn, same JSON as
    // qemu-nbd's writable export.
    let qsock = dir.path().join("q.sock");
    let _q = qemu_nbd(
        &["-t", "-f", "qcow2", "-x", "alpha", "-D", "first"],
        &qsock,
        &c,
    );
    let ours = nbdinfo(&["--json", &srv.unix_uri("alpha")]);
    let theirs = nbdinfo(&[
        "--json",
        &format!("nbd+unix:///alpha?socket={}", qsock.display()),
    ]);
    assert_eq!(without_uri(&ours), without_uri(&theirs));
    let st = Command::new("nbdinfo")
        .args(["--can", "multi-conn", &srv.unix_uri("alpha")])
        .status()
        .unwrap();
    assert_eq!(
        st.code(),
        Some(2),
        "multi-conn must not be advertised with --shared=1"
    );
    let j: serde_json::Value = serde_json::from_str(&ours).unwrap();
    let e = &j["exports"][0];
    for k in [
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_flush",
        "can_fua",
        "can_cache",
        "can_df",
    ] {
        assert_eq!(e[k], true, "{k}");
    }
    // An unknown export is an error, not a hang.
    let out = Command::new("nbdinfo")
        .arg(srv.unix_uri("nope"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    srv.stop();
}
