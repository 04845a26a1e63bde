//! Helpers for the NBD client tests: real servers (qemu-nbd, nbdkit) started per test case on a
//! private unix socket or a free TCP port, QEMU tools as oracles, and timeouts so that a hang
//! fails the test instead of blocking the run.
//!
//! Servers are started in the foreground and killed (SIGKILL) by their `Child` handle when the
//! [`Server`] is dropped or [`Server::kill`] is called; nbdkit also gets `--exit-with-parent`.
//! Readiness is the server's pid file (both write it once they listen), never a probe
//! connection, which would use up a non-persistent qemu-nbd.

#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// One mebibyte.
pub const MIB: u64 = 1 << 20;

/// Log to the test output when `DISKSTREAM_LOG` is set (e.g. `DISKSTREAM_LOG=debug`).
pub fn init_log() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DISKSTREAM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A fresh temporary directory (short path: unix socket names are limited to 108 bytes).
pub fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("dsnbdc-")
        .tempdir_in("/tmp")
        .expect("create temp dir")
}

fn describe(cmd: &str, args: &[String], out: &Output) -> String {
    format!(
        "{cmd} {}\nstatus: {:?}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Run a tool and return its output (no status check).
pub fn run_raw(cmd: &str, args: &[String]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

/// Run a tool, assert success, return stdout.
pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let out = run_raw(cmd, &args);
    assert!(
        out.status.success(),
        "command failed:\n{}",
        describe(cmd, &args, &out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-io -f FMT -c CMD... PATH`, asserting that no command failed.
pub fn qemu_io(path: &Path, fmt: &str, cmds: &[&str]) {
    let mut args: Vec<String> = vec!["-f".into(), fmt.into()];
    for c in cmds {
        args.push("-c".into());
        args.push((*c).into());
    }
    args.push(path.display().to_string());
    let out = run_raw("qemu-io", &args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io failed:\n{}",
        describe("qemu-io", &args, &out)
    );
}

/// A server process we started.
pub struct Server {
    child: Option<Child>,
    what: String,
    log: PathBuf,
}

impl Server {
    /// Start `cmd args` in the background and wait until it wrote `pidfile`.
    pub fn spawn(cmd: &str, args: &[String], pidfile: &Path, log: &Path) -> Server {
        let _ = std::fs::remove_file(pidfile);
        let logf = std::fs::File::create(log).expect("create server log");
        let child = Command::new(cmd)
            .args(args)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup log"))
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd}: {e}"));
        let mut s = Server {
            child: Some(child),
            what: format!("{cmd} {}", args.join(" ")),
            log: log.to_path_buf(),
        };
        let start = Instant::now();
        loop {
            if std::fs::read_to_string(pidfile).is_ok_and(|p| !p.trim().is_empty()) {
                return s;
            }
            if let Some(c) = s.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!(
                        "{} exited with {st} before listening:\n{}",
                        s.what,
                        std::fs::read_to_string(&s.log).unwrap_or_default()
                    );
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{} did not start within 10 s",
                s.what
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kill the server now (SIGKILL: a crash, not a clean shutdown) and reap it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// What the server printed.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `qemu-nbd --pid-file=... ARGS` (foreground).
pub fn qemu_nbd(dir: &Path, name: &str, args: &[&str]) -> Server {
    let pid = dir.join(format!("{name}.pid"));
    let mut a = vec![format!("--pid-file={}", pid.display())];
    a.extend(args.iter().map(|s| s.to_string()));
    Server::spawn("qemu-nbd", &a, &pid, &dir.join(format!("{name}.log")))
}

/// `nbdkit -f --exit-with-parent -P ... ARGS`.
pub fn nbdkit(dir: &Path, name: &str, args: &[&str]) -> Server {
    let pid = dir.join(format!("{name}.pid"));
    let mut a = vec![
        "-f".to_string(),
        "--exit-with-parent".to_string(),
        "-P".to_string(),
        pid.display().to_string(),
    ];
    a.extend(args.iter().map(|s| s.to_string()));
    Server::spawn("nbdkit", &a, &pid, &dir.join(format!("{name}.log")))
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// `nbd+unix:///EXPORT?socket=SOCK`.
pub fn unix_url(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

/// Await `fut`, failing the test if it takes longer than `secs`.
pub async fn within<T>(secs: u64, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within {secs} s (hang)"),
    }
}

/// Deterministic non-zero test data.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x as u8) | 1
        })
        .collect()
}

/// Map entries (`qemu-img map --output=json`) as JSON values, for comparison.
pub fn parse_map(json: &str) -> Vec<serde_json::Value> {
    serde_json::from_str(json).unwrap_or_else(|e| panic!("bad map JSON ({e}):\n{json}"))
}
