//! `diskstream migrate` end to end: runs the scenarios of `tests/migrate/migrate_tests.py`
//! (two `diskstream daemon` processes, a libnbd guest writer, nbdkit with the log, error and
//! delay filters in front of the source, qemu-img to check the result).
//!
//! The scenarios run one at a time (each starts several processes and the machine may have few
//! cores). Every peer is required: a missing qemu-img, nbdkit, qemu-storage-daemon or
//! python3-libnbd fails the test with instructions (`bash .ci/run` installs them).

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
    require("command -v qemu-storage-daemon", "qemu-storage-daemon");
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

/// The link to the source silently drops every packet (a black hole, no reset) for longer than
/// reconnect-delay: the NBD client's keepalive / TCP_USER_TIMEOUT notice it, a guest read of
/// missing data gets EIO in bounded time, the job stops; after the link is back `--resume`
/// finishes. Needs `ip netns` (root); skipped with a message otherwise.
#[test]
fn silent_link_drop_fails_reads_then_resumes() {
    scenario("link_blackhole");
}

/// Read errors for about a second (nbdkit's error filter, toggled through its trigger file):
/// `--retries` resume the stopped job with doubling backoff, it gets past them and exits 0.
#[test]
fn transient_errors_are_retried() {
    scenario("transient_errors_retried");
}

/// Pre-copy over TCP (the source in its own network namespace when `ip netns` works): mirror
/// into an `nbd` node on the destination's export under a guest writer, soft cancel at READY;
/// the target equals the guest's model and the source is unchanged.
#[test]
fn precopy_soft_cancel_at_ready() {
    scenario("precopy_cancel");
}

/// Pre-copy ended with block-job-complete: the source's guest export pivots to the remote
/// target (later guest writes land on the destination, the source file stays as it was).
#[test]
fn precopy_complete_pivots_to_destination() {
    scenario("precopy_complete");
}

/// Pre-copy into a qemu-storage-daemon destination export.
#[test]
fn precopy_into_qemu_storage_daemon() {
    scenario("precopy_qsd_target");
}

/// `diskstream migrate` with qemu-storage-daemon as the source daemon.
#[test]
fn migrate_from_qemu_storage_daemon() {
    scenario("qsd_source");
}

/// `examples/migrate-precopy.py` as written: soft cancel between two diskstream daemons, and
/// block-job-complete into a qemu-storage-daemon destination.
#[test]
fn example_precopy_script_migrates() {
    scenario("example_precopy");
}
