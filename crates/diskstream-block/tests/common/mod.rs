//! Helpers shared by the integration tests that use QEMU's tools (qemu-img, qemu-io) as oracles.
//!
//! Every helper panics with the tool's full output when the tool fails, so a failing test shows
//! what QEMU said.

#![allow(dead_code)]

use diskstream_block::format::qcow2::create::{create, CreateOptions};
use diskstream_block::format::Format;
use diskstream_block::image::{open_image, OpenOptions};
use diskstream_block::node::BlockNode;
use diskstream_block::status::map_range;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// A fresh temporary directory for one test's images.
pub fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ds-qemu-")
        .tempdir()
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

fn to_strings<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Vec<String> {
    args.iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect()
}

/// Run a tool and return its raw output (no status check).
pub fn run_raw<S: AsRef<std::ffi::OsStr>>(cmd: &str, args: &[S]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

/// Run a tool, assert exit status 0, return stdout.
pub fn run_ok<S: AsRef<std::ffi::OsStr>>(cmd: &str, args: &[S]) -> String {
    let out = run_raw(cmd, args);
    if !out.status.success() {
        panic!(
            "command failed:\n{}",
            describe(cmd, &to_strings(args), &out)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img <args>`, asserting success; returns stdout.
pub fn qemu_img<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    run_ok("qemu-img", args)
}

/// `qemu-io -f <fmt> -c <cmd>... <path>`, asserting success and that no command failed.
pub fn qemu_io(path: &Path, fmt: &str, cmds: &[&str]) -> String {
    let mut args: Vec<String> = vec!["-f".into(), fmt.into()];
    for c in cmds {
        args.push("-c".into());
        args.push((*c).into());
    }
    args.push(path.display().to_string());
    let out = run_raw("qemu-io", &args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success()
        || stdout.contains("failed")
        || stderr.contains("failed")
        || stderr.contains("error")
    {
        panic!("qemu-io failed:\n{}", describe("qemu-io", &args, &out));
    }
    stdout
}

/// `qemu-img create -f qcow2 [-b backing -F bfmt] -o <opts> path size`.
pub fn qemu_create_qcow2(path: &Path, size: u64, opts: &str, backing: Option<(&Path, &str)>) {
    let mut args: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
    if let Some((b, f)) = backing {
        args.extend(["-b".into(), b.display().to_string(), "-F".into(), f.into()]);
    }
    if !opts.is_empty() {
        args.extend(["-o".into(), opts.into()]);
    }
    args.extend([path.display().to_string(), size.to_string()]);
    qemu_img(&args);
}

/// `qemu-img create -f raw path size`.
pub fn qemu_create_raw(path: &Path, size: u64) {
    qemu_img(&[
        "create".to_string(),
        "-q".into(),
        "-f".into(),
        "raw".into(),
        path.display().to_string(),
        size.to_string(),
    ]);
}

/// `qemu-img map --output=json` of an image, as a JSON value.
pub fn qemu_map(path: &Path, fmt: &str) -> Value {
    let out = qemu_img(&[
        "map".to_string(),
        "--output=json".into(),
        "-f".into(),
        fmt.into(),
        path.display().to_string(),
    ]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad map JSON ({e}):\n{out}"))
}

/// Our chain-wide map of the whole device, as a JSON value comparable with [`qemu_map`].
pub async fn our_map(node: &Arc<dyn BlockNode>) -> Value {
    let ext = map_range(node, 0, node.size()).await.expect("map_range");
    serde_json::to_value(&ext).expect("serialize map")
}

/// Compare two map arrays; on mismatch, panic showing the first differing extent.
pub fn assert_maps_equal(ours: &Value, qemu: &Value, what: &str) {
    if ours == qemu {
        return;
    }
    let a = ours.as_array().cloned().unwrap_or_default();
    let b = qemu.as_array().cloned().unwrap_or_default();
    let i = a
        .iter()
        .zip(b.iter())
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    panic!(
        "{what}: map differs at extent {i} (ours {} extents, qemu {} extents)\n ours: {}\n qemu: {}\n\nfull ours:\n{}\nfull qemu:\n{}",
        a.len(),
        b.len(),
        a.get(i).map(|v| v.to_string()).unwrap_or_default(),
        b.get(i).map(|v| v.to_string()).unwrap_or_default(),
        pretty_lines(&a),
        pretty_lines(&b)
    );
}

fn pretty_lines(v: &[Value]) -> String {
    v.iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// `qemu-img check --output=json` result: (exit code, parsed JSON or null).
pub fn qemu_check(path: &Path, fmt: &str) -> (i32, Value, String) {
    let args = [
        "check".to_string(),
        "--output=json".into(),
        "-f".into(),
        fmt.into(),
        path.display().to_string(),
    ];
    let out = run_raw("qemu-img", &args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let v = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (
        out.status.code().unwrap_or(-1),
        v,
        describe("qemu-img", &to_strings(&args), &out),
    )
}

/// Assert `qemu-img check` finds nothing wrong: exit 0, no leaks, no corruptions.
pub fn assert_check_clean(path: &Path) {
    let (code, v, desc) = qemu_check(path, "qcow2");
    let field = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    if code != 0 || field("leaks") != 0 || field("corruptions") != 0 || field("check-errors") != 0 {
        panic!("qemu-img check is not clean:\n{desc}");
    }
}

/// `qemu-img compare` (strict: `-s`) between two images; panics with the output unless they
/// are identical.
pub fn assert_compare(a: &Path, afmt: &str, b: &Path, bfmt: &str) {
    qemu_img(&[
        "compare".to_string(),
        "-f".into(),
        afmt.into(),
        "-F".into(),
        bfmt.into(),
        a.display().to_string(),
        b.display().to_string(),
    ]);
}

/// Export the guest contents of an image (through its chain) with `qemu-img convert -O raw`.
pub fn qemu_export_raw(path: &Path, fmt: &str) -> Vec<u8> {
    let out = PathBuf::from(format!("{}.export.raw", path.display()));
    qemu_img(&[
        "convert".to_string(),
        "-f".into(),
        fmt.into(),
        "-O".into(),
        "raw".into(),
        path.display().to_string(),
        out.display().to_string(),
    ]);
    let data = std::fs::read(&out).expect("read export");
    let _ = std::fs::remove_file(&out);
    data
}

/// Open a qcow2 image (with its chain) through our engine.
pub async fn open_qcow2(path: &Path, read_only: bool) -> Arc<dyn BlockNode> {
    open_image(
        path,
        &OpenOptions {
            read_only,
            format: Some(Format::Qcow2),
            ..Default::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Create a qcow2 image with our engine.
pub async fn our_create(path: &Path, opts: &CreateOptions) {
    create(path, opts)
        .await
        .unwrap_or_else(|e| panic!("create {} with {opts:?}: {e}", path.display()))
}

/// Read the whole virtual disk through our engine, in chunks of `chunk` bytes.
pub async fn read_all(node: &Arc<dyn BlockNode>, chunk: u64) -> Vec<u8> {
    let size = node.size();
    let mut buf = vec![0u8; size as usize];
    let mut pos = 0u64;
    while pos < size {
        let n = chunk.min(size - pos);
        node.read(pos, &mut buf[pos as usize..(pos + n) as usize])
            .await
            .unwrap_or_else(|e| panic!("read {} at {pos}+{n}: {e}", node.filename()));
        pos += n;
    }
    buf
}

/// Assert two byte buffers are equal, reporting the first differing offset and a short window.
pub fn assert_bytes_eq(ours: &[u8], expected: &[u8], what: &str) {
    if ours.len() != expected.len() {
        panic!(
            "{what}: length differs: ours {} expected {}",
            ours.len(),
            expected.len()
        );
    }
    if let Some(i) = ours.iter().zip(expected).position(|(a, b)| a != b) {
        let end = (i + 16).min(ours.len());
        let last = ours
            .iter()
            .zip(expected)
            .rposition(|(a, b)| a != b)
            .unwrap_or(i);
        panic!(
            "{what}: contents differ from byte {i} (last difference at {last}): ours {:02x?} expected {:02x?}",
            &ours[i..end],
            &expected[i..end]
        );
    }
}

/// Write `data` to a raw file at `path`.
pub fn write_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Deterministic pseudo-random bytes for pattern data (xorshift, so tests need no RNG state).
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

/// Path helper: `dir/name`.
pub fn p(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// Text of a panic caught by a join handle.
fn panic_text(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    let p = e.into_panic();
    if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else {
        "panic".to_string()
    }
}

/// Collects the failures of the cases of a matrix, so one failing combination does not hide the
/// others.
#[derive(Default)]
pub struct Cases {
    failures: Vec<String>,
    ran: usize,
}

impl Cases {
    /// Run one case as a task (a panic becomes a recorded failure).
    pub async fn run<F>(&mut self, name: &str, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.ran += 1;
        if let Err(e) = tokio::spawn(fut).await {
            self.failures.push(format!("[{name}] {}", panic_text(e)));
        }
    }

    /// Panic listing every failed case, if any.
    pub fn finish(self) {
        if !self.failures.is_empty() {
            panic!(
                "{} of {} case(s) failed:\n\n{}",
                self.failures.len(),
                self.ran,
                self.failures.join("\n\n")
            );
        }
    }
}

/// Apply the engine's discard semantics to a byte model: the whole clusters inside
/// `[off, off+len)` (a partial last cluster at the end of the image counts as whole) read as zero
/// afterwards, except on v2 images with a backing file, where they become unallocated and the
/// backing chain's contents (`backing`, zero past its end) show through. Partial clusters are
/// untouched.
pub fn apply_discard(
    model: &mut [u8],
    cs: u64,
    v3: bool,
    backing: Option<&[u8]>,
    off: u64,
    len: u64,
) {
    let size = model.len() as u64;
    let end = off + len;
    let a = off.div_ceil(cs) * cs;
    let b = if end == size { size } else { end / cs * cs };
    if a >= b {
        return;
    }
    match backing {
        Some(bk) if !v3 => {
            for i in a..b {
                model[i as usize] = bk.get(i as usize).copied().unwrap_or(0);
            }
        }
        _ => model[a as usize..b as usize].fill(0),
    }
}
