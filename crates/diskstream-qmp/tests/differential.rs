//! Runs the Python test drivers in `tests/differential/` against the `diskstream` binary:
//! the differential harness (same QMP scenarios against qemu-storage-daemon and diskstream,
//! replies and events compared, images checked with qemu-img) and the daemon tests (kill -9
//! crash safety, SIGTERM/quit, command line, seed interface).
//!
//! Every peer is required: a missing qemu-storage-daemon, qemu-img, python3 or `qemu.qmp`
//! module fails the test with instructions (`bash .ci/run` installs them).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The `diskstream` binary of the same profile, built if missing or stale.
fn diskstream_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("DISKSTREAM_BIN") {
            return PathBuf::from(p);
        }
        let release = !cfg!(debug_assertions);
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root()).args([
            "build",
            "-q",
            "-p",
            "diskstream",
            "--bin",
            "diskstream",
        ]);
        if release {
            cmd.arg("--release");
        }
        let st = cmd
            .status()
            .expect("run cargo build for the diskstream binary");
        assert!(st.success(), "building the diskstream binary failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target"));
        target
            .join(if release { "release" } else { "debug" })
            .join("diskstream")
    })
    .clone()
}

fn require(tool: &str) {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "required test peer '{tool}' is missing: run `bash .ci/run` (it installs qemu-utils) or install it"
    );
}

fn require_qemu_qmp() {
    let ok = Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "python3 module 'qemu.qmp' is missing: `python3 -m pip install qemu.qmp` (bash .ci/run does it)"
    );
}

/// Run one driver script. The two scripts run at the same time (cargo's test threads): both
/// mostly wait on daemons, sockets and fsync, and their timing-sensitive steps (throttled
/// jobs, pauses) are written to hold on a loaded machine, so running them side by side cuts
/// minutes from the suite.
fn run_script(script: &str, extra: &[&str]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/differential");
    let bin = diskstream_bin();
    let out = Command::new("python3")
        .arg(dir.join(script))
        .arg("--ours")
        .arg(&bin)
        .args(extra)
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "{script} failed (exit {:?}):\n{stdout}\n{stderr}",
        out.status.code()
    );
}

#[test]
fn qsd_differential() {
    require("qemu-storage-daemon");
    require("qemu-img");
    require("qemu-io");
    require("python3");
    require_qemu_qmp();
    run_script("harness.py", &[]);
}

#[test]
fn daemon_crash_safety_and_cli() {
    require("qemu-img");
    require("qemu-io");
    require("python3");
    run_script("daemon_tests.py", &[]);
}
