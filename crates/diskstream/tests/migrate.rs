//! `diskstream migrate` end to end: runs the scenarios of `tests/migrate/migrate_tests.py`
//! (two `diskstream daemon` processes, a libnbd guest writer, nbdkit with the log, error and
//! delay filters in front of the source, qemu-img to check the result).
//!
//! The scenarios run one at a time (each starts several processes and the machine may have few
//! cores). Every peer is required: a missing qemu-img, nbdkit or python3-libnbd fails the test
//! with instructions (`bash .ci/run` installs them).

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::new(());

fn require(check: &str, what: &str) {
    let ok = Command::new("sh")
        .args(["-c", check])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(ok, "{what} is missing (bash .ci/run installs it)");
}

fn scenario(name: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    require("command -v qemu-img", "qemu-img");
    require("command -v nbdkit", "nbdkit");
    require("/usr/bin/python3 -c 'import nbd'", "python3-libnbd");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/migrate/migrate_tests.py");
    let st = Command::new("/usr/bin/python3")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_diskstream"))
        .arg(name)
        .status()
        .expect("run migrate_tests.py");
    assert!(st.success(), "migration scenario '{name}' failed");
}

/// 1 GiB (a quarter of it data) migrated under a random guest writer that switches from the
/// source to the destination; final image equals the model, check clean, no backing file,
/// source unchanged after the switch.
#[test]
fn postcopy_under_guest_writes() {
    scenario("postcopy");
}

/// The source daemon is killed mid-stream and restarted within reconnect-delay.
#[test]
fn source_restart_within_reconnect_delay() {
    scenario("source_restart");
}

/// The source stays down: bounded retries, the job stops (exit 3) with its data, guest reads
/// of missing data fail with EIO; `--resume` finishes once the source is back.
#[test]
fn source_dead_stops_then_resumes() {
    scenario("source_dead_stop_resume");
}

/// nbdkit's error filter with on-error=report: the job fails (exit 2); `--resume` restreams
/// only what is missing.
#[test]
fn read_errors_report_then_resume() {
    scenario("errors_report_then_resume");
}

/// The destination daemon is killed mid-stream and restarted; `--resume` copies only what the
/// image lacks (source reads counted by nbdkit's log filter).
#[test]
fn destination_restart_resumes_without_recopying() {
    scenario("dest_restart");
}

/// `examples/migrate-postcopy.py`, the QMP sequence the README documents, works as written.
#[test]
fn example_script_migrates() {
    scenario("example_script");
}

/// Wrong node, bad address, unreachable daemon, NBD server that cannot start, existing image:
/// exit 1 with a clear message, nothing left behind.
#[test]
fn setup_errors_are_clear_and_undone() {
    scenario("setup_errors");
}
