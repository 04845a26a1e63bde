//! Local servers for the tests (`tests/servers.py`): a static file server with Range support
//! and fault injection, and moto's S3 server. Each runs as a child process on a loopback port
//! and is killed (by its own pid) when dropped.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A running test server.
pub struct Server {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl Server {
    /// Start `servers.py` with `args`; waits until it listens.
    pub fn start(args: &[&str]) -> Server {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/servers.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start servers.py");
        let out = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line).expect("read port");
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("servers.py {args:?} did not start: {line:?}"));
        Server { child, port }
    }

    /// A static range server over `dir`, with extra options (`--fail-every N`, ...).
    pub fn range(dir: &Path, extra: &[&str]) -> Server {
        let d = dir.to_str().expect("utf-8 path");
        let mut args = vec!["range", d];
        args.extend_from_slice(extra);
        Server::start(&args)
    }

    /// moto's S3 with `bucket` holding the files of `dir`.
    pub fn s3(dir: &Path, bucket: &str) -> Server {
        Server::start(&["s3", dir.to_str().expect("utf-8 path"), bucket])
    }

    /// `http://127.0.0.1:PORT/name`.
    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }

    /// Stop the server now.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Run a tool; panics with its output unless it succeeds. Returns stdout.
/// Create the qcow2 overlay `name` (in `dir`, of `size`, e.g. "7M") over the qcow2 at `backing`
/// (a URL), without opening the backing (`qemu-img create -u`).
pub fn overlay(dir: &Path, name: &str, backing: &str, size: &str) {
    run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "qcow2", name, size,
        ],
        dir,
    );
}

pub fn run(cmd: &str, args: &[&str], dir: &Path) -> String {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// QEMU's view of `top.qcow2` (whose backing file is remote) over the local file `local`:
/// a copy rebased onto it (`local.qcow2`), its contents and its `qemu-img map`.
pub fn qemu_view_over_local(dir: &Path, local: &str) -> (Vec<u8>, serde_json::Value) {
    std::fs::copy(dir.join("top.qcow2"), dir.join("local.qcow2")).expect("copy");
    run(
        "qemu-img",
        &["rebase", "-u", "-b", local, "-F", "qcow2", "local.qcow2"],
        dir,
    );
    run(
        "qemu-img",
        &["convert", "-O", "raw", "local.qcow2", "expected.raw"],
        dir,
    );
    let data = std::fs::read(dir.join("expected.raw")).expect("read");
    let map = serde_json::from_str(&run(
        "qemu-img",
        &["map", "--output=json", "local.qcow2"],
        dir,
    ))
    .expect("json");
    (data, map)
}

/// Upload `file` (in `dir`) to moto on `port` as `bucket/key`, replacing the object.
pub fn s3_put(dir: &Path, port: u16, file: &str, bucket: &str, key: &str) {
    let code = format!(
        "import boto3; boto3.client('s3', endpoint_url='http://127.0.0.1:{port}', \
         region_name='us-east-1', aws_access_key_id='testing', \
         aws_secret_access_key='testing').upload_file('{file}', '{bucket}', '{key}')"
    );
    run("python3", &["-c", &code], dir);
}

/// Delete `bucket/key` from moto on `port`.
pub fn s3_delete(dir: &Path, port: u16, bucket: &str, key: &str) {
    let code = format!(
        "import boto3; boto3.client('s3', endpoint_url='http://127.0.0.1:{port}', \
         region_name='us-east-1', aws_access_key_id='testing', \
         aws_secret_access_key='testing').delete_object(Bucket='{bucket}', Key='{key}')"
    );
    run("python3", &["-c", &code], dir);
}
