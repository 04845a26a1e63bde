//! Helpers shared by the jobs' integration tests: a random three-layer qcow2 chain,
//! deterministic data patterns, an event recorder (or a sink that drops events), a checked
//! command runner and `qemu-img check`.
#![allow(dead_code)]

use diskstream_block::format::qcow2::create::{create, CreateOptions};
use diskstream_block::format::Format;
use diskstream_block::image::{open_image, OpenOptions};
use diskstream_block::node::BlockNode;
use diskstream_jobs::job::{EventSink, JobEvent};
use diskstream_jobs::JobStatus;
use rand::rngs::StdRng;
use rand::Rng;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

pub const MIB: u64 = 1 << 20;

/// An event sink that drops everything (tests that only look at the data).
pub struct Quiet;
impl EventSink for Quiet {
    fn emit(&self, _ev: JobEvent) {}
}

/// Run `cmd args` in `dir`; panics with its output unless it succeeds; returns its stdout.
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

#[derive(Default)]
pub struct Events(pub Mutex<Vec<JobEvent>>);

impl EventSink for Events {
    fn emit(&self, ev: JobEvent) {
        self.0.lock().expect("events").push(ev);
    }
}

impl Events {
    pub fn statuses(&self, id: &str) -> Vec<JobStatus> {
        self.0
            .lock()
            .expect("events")
            .iter()
            .filter_map(|e| match e {
                JobEvent::StatusChange { id: i, status } if i == id => Some(*status),
                _ => None,
            })
            .collect()
    }
}

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

pub fn qemu_img_check(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json"])
        .arg(path)
        .output()
        .expect("qemu-img is required by this test (install qemu-utils)");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    assert!(
        out.status.success() && n("leaks") == 0 && n("corruptions") == 0,
        "qemu-img check {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub async fn open(path: &Path, read_only: bool) -> Arc<dyn BlockNode> {
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

/// base <- mid <- top, each with random data and zero ranges.
pub async fn make_chain(dir: &Path, size: u64, rng: &mut StdRng) {
    let names = ["base.qcow2", "mid.qcow2", "top.qcow2"];
    for (i, name) in names.iter().enumerate() {
        let (bf, bfmt) = if i == 0 {
            (None, None)
        } else {
            (Some(names[i - 1].to_string()), Some("qcow2".to_string()))
        };
        let p = dir.join(name);
        create(
            &p,
            &CreateOptions {
                size,
                backing_file: bf,
                backing_fmt: bfmt,
                ..Default::default()
            },
        )
        .await
        .expect("create");
        let n = open(&p, false).await;
        for k in 0..(6 - 2 * i) {
            let off = rng.random_range(0..size);
            let len = rng.random_range(1..=(size - off).min(MIB));
            if rng.random_bool(0.25) {
                n.write_zeroes(off, len, false).await.expect("zero");
            } else {
                n.write(off, &pattern(rng.random(), len as usize))
                    .await
                    .expect("write");
            }
            let _ = k;
        }
        n.close().await.expect("close");
    }
}

pub async fn read_all(n: &Arc<dyn BlockNode>) -> Vec<u8> {
    let mut buf = vec![0u8; n.size() as usize];
    n.read(0, &mut buf).await.expect("read");
    buf
}

pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}
