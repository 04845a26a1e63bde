//! The `diskstream serve` binary, like qemu-nbd: exits when the last client disconnects (unless
//! `--persistent`), exits cleanly on SIGTERM/SIGINT with the image closed (qemu-img check clean,
//! unix socket removed), `-r` refuses writes, `-e N` advertises multi-conn, `-x`/`-D` name and
//! describe the export, bad arguments fail with a one-line error.

mod common;

use common::*;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The `diskstream` binary of the same build profile as this test. `cargo test --workspace`
/// builds it; when missing (a single-package run) it is built here.
fn binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/serve-<hash>
    let dir = exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf();
    let bin = dir.join("diskstream");
    if !bin.exists() {
        let mut c = Command::new(env!("CARGO"));
        c.args(["build", "-p", "diskstream", "--bin", "diskstream"]);
        if dir.ends_with("release") {
            c.arg("--release");
        }
        run(c.current_dir(env!("CARGO_MANIFEST_DIR")));
    }
    assert!(bin.exists(), "{} was not built", bin.display());
    bin
}

fn serve(args: &[&str]) -> Proc {
    Proc(
        Command::new(binary())
            .arg("serve")
            .args(args)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn diskstream serve"),
    )
}

/// Wait for the process to exit on its own; its exit code.
fn wait_exit(p: &mut Proc, secs: u64) -> i32 {
    let t = Instant::now();
    loop {
        if let Some(st) = p.0.try_wait().unwrap() {
            return st.code().unwrap_or(-1);
        }
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "diskstream serve did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(p: &Proc, sig: &str) {
    run(Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(p.0.id().to_string()));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16) {
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "port {port} never opened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn exits_after_last_client_and_closes_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("s.qcow2");
    let i = img.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", i, "8M"]);
    let sock = dir.path().join("s.sock");
    let s = sock.to_str().unwrap();
    let mut p = serve(&["-k", s, "-x", "disk", "-f", "qcow2", i]);
    wait_for_path(&sock, 10);
    qemu_io(
        "raw",
        &format!("nbd+unix:///disk?socket={s}"),
        &["write -P 0x3c 0 1M", "write -z 1M 1M"],
    );
    assert_eq!(wait_exit(&mut p, 10), 0);
    assert!(!sock.exists(), "socket file must be removed");
    qemu_img(&["check", "-q", i]);
    qemu_io("qcow2", i, &["read -P 0x3c 0 1M", "read -P 0 1M 1M"]);
}

#[test]
fn persistent_tcp_until_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("p.qcow2");
    let i = img.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", i, "8M"]);
    let port = free_port();
    let ps = port.to_string();
    let mut p = serve(&[
        "--persistent",
        "-b",
        "127.0.0.1",
        "-p",
        &ps,
        "-e",
        "2",
        "-x",
        "d",
        "-D",
        "described",
        "-A",
        i,
    ]);
    wait_port(port);
    let uri = format!("nbd://127.0.0.1:{port}/d");
    require("nbdinfo");
    for _ in 0..2 {
        let j: serde_json::Value =
            serde_json::from_str(&stdout(Command::new("nbdinfo").args(["--json", &uri]))).unwrap();
        let e = &j["exports"][0];
        assert_eq!(e["description"], "described");
        assert_eq!(e["can_multi_conn"], true);
        assert_eq!(e["is_read_only"], false);
        assert!(e["contexts"].to_string().contains("qemu:allocation-depth"));
    }
    qemu_io("raw", &uri, &["write -P 0x71 4M 64k"]);
    assert!(
        p.0.try_wait().unwrap().is_none(),
        "--persistent must keep serving"
    );
    signal(&p, "TERM");
    assert_eq!(wait_exit(&mut p, 10), 0);
    qemu_img(&["check", "-q", i]);
    qemu_io("qcow2", i, &["read -P 0x71 4M 64k"]);
}

#[test]
fn read_only_and_sigint() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r.raw");
    let i = img.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "raw", i, "1M"]);
    let sock = dir.path().join("r.sock");
    let s = sock.to_str().unwrap();
    let mut p = serve(&["-t", "-r", "-k", s, i]);
    wait_for_path(&sock, 10);
    let uri = format!("nbd+unix:///?socket={s}");
    require("qemu-io");
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512", &uri])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() || text.contains("failed"),
        "write must fail: {text}"
    );
    let st = Command::new("nbdinfo")
        .args(["--can", "multi-conn", &uri])
        .status()
        .unwrap();
    assert_eq!(
        st.code(),
        Some(2),
        "--shared=1 must not advertise multi-conn"
    );
    signal(&p, "INT");
    assert_eq!(wait_exit(&mut p, 10), 0);
    assert!(!sock.exists());
}

#[test]
fn bad_arguments_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(binary())
        .args(["serve", "-k"])
        .arg(dir.path().join("x.sock"))
        .arg(dir.path().join("missing.qcow2"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("diskstream serve: ") && err.contains("missing.qcow2"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let out = Command::new(binary())
        .args(["serve", "--tls-cert", "c.pem", "img"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "clap usage error");
    let img = dir.path().join("f.raw");
    qemu_img(&["create", "-q", "-f", "raw", img.to_str().unwrap(), "1M"]);
    let out = Command::new(binary())
        .args(["serve", "-f", "vmdk", "-k"])
        .arg(dir.path().join("y.sock"))
        .arg(&img)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("vmdk"));
}
