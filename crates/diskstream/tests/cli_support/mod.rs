//! Helpers for `tests/cli.rs`: run the built `diskstream` binary and QEMU's tools (`qemu-img`,
//! `qemu-io`) side by side in a directory, build small test chains, and poke at qcow2 refcounts.
//!
//! Commands run with the test directory as working directory and relative file names, so the
//! two tools print the same names and their outputs can be compared as text. Every helper that
//! expects success panics with the full command, exit status, stdout and stderr.

#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Our binary, built by cargo for the integration tests.
pub const DISKSTREAM: &str = env!("CARGO_BIN_EXE_diskstream");

/// The outcome of one command.
#[derive(Debug, Clone)]
pub struct Run {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// The command line and its whole output, for failure messages.
    pub desc: String,
}

impl Run {
    /// Assert exit code 0; returns self for chaining.
    #[track_caller]
    pub fn ok(self) -> Run {
        assert_eq!(self.code, 0, "command failed:\n{}", self.desc);
        self
    }

    /// Assert a given exit code.
    #[track_caller]
    pub fn code_is(self, code: i32) -> Run {
        assert_eq!(self.code, code, "unexpected exit code:\n{}", self.desc);
        self
    }

    /// stdout parsed as JSON.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("output is not JSON ({e}):\n{}", self.desc))
    }

    /// Assert the command failed with exactly one line on stderr that names `file`.
    #[track_caller]
    pub fn fails_naming(self, file: &str) -> Run {
        assert_ne!(self.code, 0, "command should have failed:\n{}", self.desc);
        let err = self.stderr.trim_end();
        assert!(
            !err.is_empty() && !err.contains('\n'),
            "error is not one line:\n{}",
            self.desc
        );
        assert!(
            err.contains(file),
            "error does not name '{file}':\n{}",
            self.desc
        );
        self
    }
}

/// Run `cmd args...` in `dir`.
pub fn run_in(dir: &Path, cmd: &str, args: &[&str]) -> Run {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let desc = format!(
        "(in {}) {cmd} {}\nstatus: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        dir.display(),
        args.join(" "),
        out.status
    );
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout,
        stderr,
        desc,
    }
}

/// `diskstream img args...` in `dir`.
pub fn ds(dir: &Path, args: &[&str]) -> Run {
    let mut all = vec!["img"];
    all.extend_from_slice(args);
    run_in(dir, DISKSTREAM, &all)
}

/// `qemu-img args...` in `dir`.
pub fn qemu(dir: &Path, args: &[&str]) -> Run {
    run_in(dir, "qemu-img", args)
}

/// `qemu-io -f fmt -c cmd... file` in `dir`, asserting that every command succeeded.
pub fn qemu_io(dir: &Path, fmt: &str, file: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(file);
    let r = run_in(dir, "qemu-io", &args).ok();
    assert!(
        !r.stdout.contains("failed") && !r.stderr.contains("failed"),
        "qemu-io reported a failure:\n{}",
        r.desc
    );
}

/// A fresh temporary directory.
pub fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ds-cli-")
        .tempdir()
        .expect("create a temporary directory")
}

/// Create (if needed) and return `dir/name`.
pub fn subdir(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(&p).expect("create a test subdirectory");
    p
}

/// The bytes of a file.
pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Copy a file, keeping its holes (QEMU's block status, and so `map`, sees them).
pub fn copy(from: &Path, to: &Path) {
    let (f, t) = (from.display().to_string(), to.display().to_string());
    run_in(Path::new("/"), "cp", &["--sparse=auto", &f, &t]).ok();
}

/// Assert two files hold the same bytes, reporting the first difference.
#[track_caller]
pub fn assert_same_bytes(a: &Path, b: &Path, what: &str) {
    let (x, y) = (read(a), read(b));
    if x == y {
        return;
    }
    let first = x
        .iter()
        .zip(&y)
        .position(|(p, q)| p != q)
        .unwrap_or(x.len().min(y.len()));
    panic!(
        "{what}: {} ({} bytes) and {} ({} bytes) differ from byte {first}",
        a.display(),
        x.len(),
        b.display(),
        y.len()
    );
}

/// Build the standard 3-deep chain in `dir` with QEMU's tools:
/// `base.raw` (4 MiB) <- `mid.qcow2` (64 KiB clusters) <- `top.qcow2` (4 KiB clusters plus
/// `top_opts`, 6 MiB, larger than its backing chain), with data writes, zero writes (with and
/// without unmap) and discards at every level.
pub fn build_chain(dir: &Path, top_opts: &str) {
    qemu(dir, &["create", "-q", "-f", "raw", "base.raw", "4M"]).ok();
    qemu_io(
        dir,
        "raw",
        "base.raw",
        &["write -P 1 0 1M", "write -P 3 3M 64k"],
    );
    qemu(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "mid.qcow2",
        ],
    )
    .ok();
    qemu_io(
        dir,
        "qcow2",
        "mid.qcow2",
        &["write -P 2 1M 512k", "write -z 512k 128k", "discard 3M 64k"],
    );
    let opts = if top_opts.is_empty() {
        "cluster_size=4k".to_string()
    } else {
        format!("cluster_size=4k,{top_opts}")
    };
    qemu(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &opts,
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "6M",
        ],
    )
    .ok();
    qemu_io(
        dir,
        "qcow2",
        "top.qcow2",
        &[
            "write -P 4 100k 10k",
            "write -z 1M 8k",
            "write -P 5 5M 4k",
            "discard 120k 4k",
            "write -z -u 2M 64k",
        ],
    );
}

/// `qemu-img map --output=json` of an image, with the host offsets removed (for comparing
/// images whose layout may legitimately differ).
pub fn map_without_offsets(dir: &Path, file: &str, fmt: &str) -> Value {
    let mut v = qemu(dir, &["map", "--output=json", "-f", fmt, file])
        .ok()
        .json();
    if let Some(a) = v.as_array_mut() {
        for e in a {
            if let Some(o) = e.as_object_mut() {
                o.remove("offset");
            }
        }
    }
    v
}

/// The guest contents of an image (through its chain), exported by qemu-img as a raw file
/// `name` in `dir`.
pub fn export_raw(dir: &Path, file: &str, fmt: &str, name: &str) {
    qemu(dir, &["convert", "-f", fmt, "-O", "raw", file, name]).ok();
}

// ------------------------------------------------------------------ qcow2 refcount surgery

fn be64(d: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(d[off..off + 8].try_into().expect("8 bytes"))
}

fn be32(d: &[u8], off: usize) -> u64 {
    u64::from(u32::from_be_bytes(
        d[off..off + 4].try_into().expect("4 bytes"),
    ))
}

/// (cluster size, byte offset of the first refcount block) of a qcow2 image with 16-bit
/// refcounts whose first refcount block covers all of its (small) file.
fn refblock(d: &[u8]) -> (u64, usize) {
    let cluster_bits = be32(d, 20);
    let order = if be32(d, 4) >= 3 { be32(d, 96) } else { 4 };
    assert_eq!(order, 4, "these helpers handle 16-bit refcounts only");
    let reftable = be64(d, 48) as usize;
    (1 << cluster_bits, be64(d, reftable) as usize)
}

/// The refcount of host cluster `c`.
pub fn refcount(path: &Path, c: u64) -> u64 {
    let d = read(path);
    let (_, rb) = refblock(&d);
    let i = rb + 2 * c as usize;
    u64::from(u16::from_be_bytes([d[i], d[i + 1]]))
}

/// Overwrite the refcount of host cluster `c` in the file.
pub fn set_refcount(path: &Path, c: u64, v: u16) {
    let mut d = read(path);
    let (_, rb) = refblock(&d);
    let i = rb + 2 * c as usize;
    d[i..i + 2].copy_from_slice(&v.to_be_bytes());
    std::fs::write(path, d).expect("write the image back");
}

/// The first cluster inside the file whose refcount is 0.
pub fn free_cluster_in_file(path: &Path) -> u64 {
    let d = read(path);
    let (cs, _) = refblock(&d);
    (1..d.len() as u64 / cs)
        .find(|&c| refcount(path, c) == 0)
        .expect("a free cluster inside the file")
}

/// The host cluster holding guest byte `g` (active L1/L2, standard 64-bit L2 entries).
pub fn host_cluster_of(path: &Path, g: u64) -> u64 {
    let d = read(path);
    let (cs, _) = refblock(&d);
    let l2_entries = cs / 8;
    let l1 = be64(&d, 40) as usize;
    let gc = g / cs;
    let l2 = (be64(&d, l1 + 8 * (gc / l2_entries) as usize) & 0x00ff_ffff_ffff_fe00) as usize;
    assert_ne!(l2, 0, "guest byte {g} has no L2 table");
    let e = be64(&d, l2 + 8 * (gc % l2_entries) as usize) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(e, 0, "guest byte {g} is not allocated");
    e / cs
}
