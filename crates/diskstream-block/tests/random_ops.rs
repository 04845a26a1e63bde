//! Seeded randomized model test: a three-layer chain made by QEMU (raw base, qcow2 mid, qcow2
//! top, random data pre-written into every layer by qemu-io), then thousands of random
//! operations on the top through our engine, mirrored into a byte model. Contents are compared
//! with the model during the run; at the end `qemu-img check` must be clean and `qemu-img
//! compare` must find the image identical to the model.
//!
//! Operations: write, write_zeroes (unmap or not), discard, flush, truncate (grow, and shrink
//! attempts), at unaligned offsets and with lengths 0, 1, 511, 512, cluster-1, cluster,
//! cluster+1, random, and ranges crossing L2 tables; plus batches of concurrent tasks on
//! disjoint ranges and on overlapping ranges serialised through a mutex.
//!
//! `DISKSTREAM_RANDOM_OPS` sets the total number of operations over all configurations
//! (default 10,000); `DISKSTREAM_RANDOM_SEED` shifts the seeds. A failure names the configuration, seed and the last operations.

mod common;

use common::*;
use diskstream_block::node::BlockNode;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;

/// One configuration of the random test.
#[derive(Clone, Copy, Debug)]
struct Config {
    seed: u64,
    cluster: u64,
    version: u32,
    extended: bool,
    refcount_bits: u32,
}

const CONFIGS: &[Config] = &[
    Config {
        seed: 1,
        cluster: 512,
        version: 3,
        extended: false,
        refcount_bits: 16,
    },
    Config {
        seed: 2,
        cluster: 4096,
        version: 3,
        extended: false,
        refcount_bits: 16,
    },
    Config {
        seed: 3,
        cluster: 65536,
        version: 3,
        extended: false,
        refcount_bits: 16,
    },
    Config {
        seed: 4,
        cluster: 512,
        version: 2,
        extended: false,
        refcount_bits: 16,
    },
    Config {
        seed: 5,
        cluster: 4096,
        version: 2,
        extended: false,
        refcount_bits: 16,
    },
    Config {
        seed: 6,
        cluster: 65536,
        version: 2,
        extended: false,
        refcount_bits: 16,
    },
    // Wide refcounts with small clusters: refcount blocks cover little, the refcount table
    // has to grow during the run.
    Config {
        seed: 7,
        cluster: 512,
        version: 3,
        extended: false,
        refcount_bits: 64,
    },
    Config {
        seed: 8,
        cluster: 65536,
        version: 3,
        extended: true,
        refcount_bits: 16,
    },
];

fn total_ops() -> usize {
    std::env::var("DISKSTREAM_RANDOM_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// `DISKSTREAM_RANDOM_SEED` shifts every configuration's seed (to explore beyond the defaults).
fn seed_offset() -> u64 {
    std::env::var("DISKSTREAM_RANDOM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn ops_per_config() -> usize {
    (total_ops() / CONFIGS.len()).max(1)
}

/// One operation on the device.
#[derive(Clone, Debug)]
enum Op {
    Write { off: u64, data: Vec<u8> },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
    Flush,
    Truncate { size: u64 },
}

impl Op {
    fn describe(&self) -> String {
        match self {
            Op::Write { off, data } => format!("write {off}+{}", data.len()),
            Op::Zero { off, len, unmap } => format!("write_zeroes {off}+{len} unmap={unmap}"),
            Op::Discard { off, len } => format!("discard {off}+{len}"),
            Op::Flush => "flush".to_string(),
            Op::Truncate { size } => format!("truncate {size}"),
        }
    }
}

/// Run `op` on the node. Truncate may be refused (shrinking over data); the result says whether
/// it took effect.
async fn execute(node: &Arc<dyn BlockNode>, op: &Op) -> Result<bool, String> {
    let r = match op {
        Op::Write { off, data } => node.write(*off, data).await,
        Op::Zero { off, len, unmap } => node.write_zeroes(*off, *len, *unmap).await,
        Op::Discard { off, len } => node.discard(*off, *len).await,
        Op::Flush => node.flush().await,
        Op::Truncate { size } => {
            let old = node.size();
            return match node.truncate(*size).await {
                Ok(()) => Ok(true),
                Err(e) if *size < old => {
                    if node.size() != old {
                        return Err(format!("refused shrink changed the size: {e}"));
                    }
                    Ok(false)
                }
                Err(e) => Err(e.to_string()),
            };
        }
    };
    r.map(|()| true).map_err(|e| e.to_string())
}

/// The device model: guest contents plus what the backing chain shows through.
struct Model {
    data: Vec<u8>,
    backing: Vec<u8>,
    cs: u64,
    v3: bool,
}

impl Model {
    fn apply(&mut self, op: &Op) {
        match op {
            Op::Write { off, data } => {
                self.data[*off as usize..*off as usize + data.len()].copy_from_slice(data)
            }
            Op::Zero { off, len, .. } => self.data[*off as usize..(*off + *len) as usize].fill(0),
            Op::Discard { off, len } => apply_discard(
                &mut self.data,
                self.cs,
                self.v3,
                Some(&self.backing),
                *off,
                *len,
            ),
            Op::Flush => {}
            Op::Truncate { size } => self.data.resize(*size as usize, 0),
        }
    }
}

/// The random test for one configuration.
struct Harness {
    cfg: Config,
    node: Arc<dyn BlockNode>,
    model: Model,
    rng: StdRng,
    history: VecDeque<String>,
    done: usize,
    max_size: u64,
    stats: std::collections::BTreeMap<&'static str, usize>,
}

impl Harness {
    fn size(&self) -> u64 {
        self.model.data.len() as u64
    }

    fn note(&mut self, s: String) {
        if self.history.len() == 40 {
            self.history.pop_front();
        }
        self.history.push_back(s);
    }

    fn fail(&self, msg: &str) -> ! {
        panic!(
            "{:?}: after {} ops: {msg}\nlast operations (oldest first):\n  {}",
            self.cfg,
            self.done,
            self.history
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join("\n  ")
        );
    }

    /// A length from the interesting set, or random.
    fn pick_len(&mut self) -> u64 {
        let cs = self.cfg.cluster;
        let l2_span = cs * (cs / if self.cfg.extended { 16 } else { 8 });
        match self.rng.random_range(0..14) {
            0 => 0,
            1 => 1,
            2 => 511,
            3 => 512,
            4 => cs - 1,
            5 => cs,
            6 => cs + 1,
            7 => 2 * cs + self.rng.random_range(0..cs),
            8 => l2_span.min(256 * KIB) + self.rng.random_range(0..4096),
            9 => self.rng.random_range(1..(4 * cs).min(MIB)),
            _ => self.rng.random_range(1..16 * KIB),
        }
    }

    /// An offset for a request of `len` bytes inside the device.
    fn pick_off(&mut self, len: u64) -> u64 {
        let size = self.size();
        let max = size - len.min(size);
        let cs = self.cfg.cluster;
        let l2_span = cs * (cs / if self.cfg.extended { 16 } else { 8 });
        let off = match self.rng.random_range(0..8) {
            // Cluster aligned.
            0 => self.rng.random_range(0..=max) / cs * cs,
            // Just before an L2 table boundary.
            1 if l2_span < size => {
                let b = self.rng.random_range(1..=size / l2_span) * l2_span;
                b.saturating_sub(self.rng.random_range(0..=len.max(1)))
            }
            // At the end of the device.
            2 => max,
            // Sector aligned.
            3 => self.rng.random_range(0..=max) / 512 * 512,
            _ => self.rng.random_range(0..=max),
        };
        off.min(max)
    }

    fn random_data(&mut self, len: u64) -> Vec<u8> {
        let mut d = vec![0u8; len as usize];
        if self.rng.random_range(0..4) == 0 {
            d.fill(self.rng.random());
        } else {
            self.rng.fill(&mut d[..]);
        }
        d
    }

    /// A random operation within `[lo, hi)` (the whole device when None). Truncate only when
    /// `allow_truncate`.
    fn random_op(&mut self, range: Option<(u64, u64)>, allow_truncate: bool) -> Op {
        let kind = self.rng.random_range(0..100);
        if allow_truncate && kind < 2 {
            let size = self.size();
            let new = if self.rng.random_bool(0.6) && size < self.max_size {
                (size + self.rng.random_range(1..=MIB)).min(self.max_size)
            } else {
                (size - self.rng.random_range(0..=size.min(MIB) / 2)).max(MIB)
            };
            return Op::Truncate {
                size: new / 512 * 512,
            };
        }
        if kind < 5 {
            return Op::Flush;
        }
        let (off, len) = match range {
            None => {
                let len = self.pick_len().min(self.size());
                (self.pick_off(len), len)
            }
            Some((lo, hi)) => {
                let span = hi - lo;
                let len = self.pick_len().min(span);
                (lo + self.rng.random_range(0..=span - len), len)
            }
        };
        match kind {
            5..=54 => {
                let data = self.random_data(len);
                Op::Write { off, data }
            }
            55..=79 => Op::Zero {
                off,
                len,
                unmap: self.rng.random_bool(0.5),
            },
            _ => Op::Discard { off, len },
        }
    }

    async fn step(&mut self, op: Op) {
        self.note(op.describe());
        match execute(&self.node, &op).await {
            Ok(true) => {
                *self
                    .stats
                    .entry(match &op {
                        Op::Truncate { size } if *size < self.size() => "shrink",
                        Op::Truncate { .. } => "grow",
                        Op::Write { .. } => "write",
                        Op::Zero { .. } => "zero",
                        Op::Discard { .. } => "discard",
                        Op::Flush => "flush",
                    })
                    .or_default() += 1;
                self.model.apply(&op)
            }
            Ok(false) => {
                *self.stats.entry("refused").or_default() += 1;
                self.note("  (refused)".to_string())
            }
            Err(e) => self.fail(&format!("{} failed: {e}", op.describe())),
        }
        if self.node.size() != self.size() {
            self.fail(&format!(
                "device size {} but model size {}",
                self.node.size(),
                self.size()
            ));
        }
        self.done += 1;
    }

    async fn check_range(&mut self, off: u64, len: u64) {
        let mut buf = vec![0u8; len as usize];
        if let Err(e) = self.node.read(off, &mut buf).await {
            self.fail(&format!("read {off}+{len} failed: {e}"));
        }
        let exp = &self.model.data[off as usize..(off + len) as usize];
        if let Some(i) = buf.iter().zip(exp).position(|(a, b)| a != b) {
            self.fail(&format!(
                "read {off}+{len}: byte {} (guest offset {}) is {:#04x}, model says {:#04x}",
                i,
                off + i as u64,
                buf[i],
                exp[i]
            ));
        }
    }

    async fn check_random_ranges(&mut self) {
        for _ in 0..3 {
            let len = self.pick_len().min(self.size());
            let off = self.pick_off(len);
            self.check_range(off, len).await;
        }
    }

    async fn check_all(&mut self) {
        let size = self.size();
        let mut pos = 0;
        while pos < size {
            let n = (MIB + 4095).min(size - pos);
            self.check_range(pos, n).await;
            pos += n;
        }
    }

    /// Concurrent batch: tasks on disjoint ranges, and tasks on one shared range serialised by a
    /// mutex (each logs its operation while holding the mutex, so the log is the real order).
    async fn concurrent_batch(&mut self) -> usize {
        let size = self.size();
        let slots = self.rng.random_range(3..=6usize);
        // Random, unaligned, disjoint slot boundaries; the last slot is the shared one.
        let mut cuts: Vec<u64> = (0..slots * 2)
            .map(|_| self.rng.random_range(0..size))
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        let ranges: Vec<(u64, u64)> = cuts
            .chunks_exact(2)
            .map(|c| (c[0], c[1]))
            .filter(|(a, b)| b > a)
            .collect();
        let Some((&shared, disjoint)) = ranges.split_last() else {
            return 0;
        };
        let mut handles = Vec::new();
        let mut plans: Vec<Vec<Op>> = Vec::new();
        for &r in disjoint {
            let n = self.rng.random_range(2..8);
            let plan: Vec<Op> = (0..n).map(|_| self.random_op(Some(r), false)).collect();
            plans.push(plan.clone());
            let node = Arc::clone(&self.node);
            handles.push(tokio::spawn(async move {
                for op in &plan {
                    execute(&node, op)
                        .await
                        .map_err(|e| format!("{} failed: {e}", op.describe()))?;
                }
                Ok::<(), String>(())
            }));
        }
        let log = Arc::new(tokio::sync::Mutex::new(Vec::<Op>::new()));
        let mut serial = Vec::new();
        for _ in 0..3 {
            let n = self.rng.random_range(2..6);
            let plan: Vec<Op> = (0..n)
                .map(|_| self.random_op(Some(shared), false))
                .collect();
            let node = Arc::clone(&self.node);
            let log = Arc::clone(&log);
            serial.push(tokio::spawn(async move {
                for op in plan {
                    let mut l = log.lock().await;
                    execute(&node, &op)
                        .await
                        .map_err(|e| format!("{} failed: {e}", op.describe()))?;
                    l.push(op);
                    drop(l);
                    tokio::task::yield_now().await;
                }
                Ok::<(), String>(())
            }));
        }
        let mut count = 0;
        let mut errors = Vec::new();
        for h in handles.into_iter().chain(serial) {
            match h.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(e),
                Err(e) => errors.push(format!("task panicked: {e}")),
            }
        }
        for (r, plan) in disjoint.iter().zip(&plans) {
            self.note(format!("concurrent task on [{}, {}):", r.0, r.1));
            for op in plan {
                self.note(format!("  {}", op.describe()));
                self.model.apply(op);
                count += 1;
            }
        }
        self.note(format!("serialised tasks on [{}, {}):", shared.0, shared.1));
        for op in log.lock().await.iter() {
            self.note(format!("  {}", op.describe()));
            self.model.apply(op);
            count += 1;
        }
        if !errors.is_empty() {
            self.fail(&format!("concurrent batch: {}", errors.join("; ")));
        }
        // Check every range the batch touched.
        for &(a, b) in disjoint.iter().chain(std::iter::once(&shared)) {
            self.check_range(a, b - a).await;
        }
        count
    }
}

/// Build the chain with QEMU: raw base, qcow2 mid, qcow2 top (the config's format), each with
/// random data written by qemu-io. Returns (top path, mid contents, top contents).
fn build_chain(
    dir: &Path,
    cfg: &Config,
    rng: &mut StdRng,
) -> (std::path::PathBuf, Vec<u8>, Vec<u8>) {
    let base = dir.join("base.raw");
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    let base_size = MIB + MIB / 2 + 3 * 512;
    let mid_size = 3 * MIB + 512;
    let top_size = 4 * MIB + 1024;
    let compat = if cfg.version >= 3 { "1.1" } else { "0.10" };
    qemu_create_raw(&base, base_size);
    let mut n = 0;
    let mut random_writes = |img: &Path, fmt: &str, size: u64, count: usize, extra: &[String]| {
        // The extra commands first: compressed writes need unallocated clusters.
        let mut cmds: Vec<String> = extra.to_vec();
        for _ in 0..count {
            let len = rng.random_range(1..128 * KIB);
            let off = rng.random_range(0..size - len);
            let src = dir.join(format!("src{n}.bin"));
            n += 1;
            let mut d = vec![0u8; len as usize];
            rng.fill(&mut d[..]);
            write_file(&src, &d);
            cmds.push(format!("write -s {} {off} {len}", src.display()));
        }
        let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(img, fmt, &refs);
    };
    random_writes(&base, "raw", base_size, 12, &[]);
    qemu_create_qcow2(
        &mid,
        mid_size,
        &format!("compat={compat},cluster_size=4096"),
        Some((&base, "raw")),
    );
    random_writes(
        &mid,
        "qcow2",
        mid_size,
        12,
        &[
            "write -z 300k 100k".to_string(),
            "discard 500k 64k".to_string(),
        ],
    );
    let mut topts = format!("compat={compat},cluster_size={}", cfg.cluster);
    if cfg.version >= 3 {
        topts.push_str(&format!(",refcount_bits={}", cfg.refcount_bits));
    }
    if cfg.extended {
        topts.push_str(",extended_l2=on");
    }
    qemu_create_qcow2(&top, top_size, &topts, Some((&mid, "qcow2")));
    let cs = cfg.cluster;
    // Compressed clusters (in unallocated clusters), zeroes and discards in the top as well.
    let extra = vec![
        format!("write -c -P 0x5c {} {}", 40 * cs, cs),
        format!("write -c -P 0x5d {} {}", 41 * cs, cs),
        format!("write -c -P 0x5e {} {}", 43 * cs, cs),
        format!("write -z {} {}", 50 * cs, 3 * cs),
        format!("discard {} {}", 60 * cs, 2 * cs),
    ];
    random_writes(&top, "qcow2", top_size, 8, &extra);
    let mid_data = qemu_export_raw(&mid, "qcow2");
    let top_data = qemu_export_raw(&top, "qcow2");
    (top, mid_data, top_data)
}

async fn run_config(cfg: Config, ops: usize) {
    let dir = tmpdir();
    let cfg = Config {
        seed: cfg.seed + seed_offset(),
        ..cfg
    };
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let (top, mid_data, top_data) = build_chain(dir.path(), &cfg, &mut rng);
    let node = open_qcow2(&top, false).await;
    assert_eq!(node.size(), top_data.len() as u64);
    let mut h = Harness {
        cfg,
        node,
        model: Model {
            data: top_data,
            backing: mid_data,
            cs: cfg.cluster,
            v3: cfg.version >= 3,
        },
        rng,
        history: VecDeque::new(),
        done: 0,
        max_size: 8 * MIB,
        stats: Default::default(),
    };
    h.check_all().await;
    let mut next_batch = 300;
    while h.done < ops {
        if h.done >= next_batch {
            next_batch += 300;
            let n = h.concurrent_batch().await;
            h.done += n;
            continue;
        }
        let op = h.random_op(None, true);
        h.step(op).await;
        if h.done % 50 == 0 {
            h.check_random_ranges().await;
        }
        if h.done % 1000 == 0 {
            h.check_all().await;
        }
    }
    h.check_all().await;
    eprintln!(
        "DEBUG {cfg:?} done {} size {} stats {:?}",
        h.done,
        h.size(),
        h.stats
    );
    if let Err(e) = h.node.close().await {
        h.fail(&format!("close failed: {e}"));
    }
    drop(h.node);
    // QEMU's verdict.
    let (code, _, desc) = qemu_check(&top, "qcow2");
    if code != 0 {
        panic!(
            "{cfg:?}: qemu-img check after {} ops is not clean:\n{desc}\nlast operations:\n  {}",
            h.done,
            h.history.iter().cloned().collect::<Vec<_>>().join("\n  ")
        );
    }
    assert_check_clean(&top);
    let raw = dir.path().join("model.raw");
    write_file(&raw, &h.model.data);
    assert_compare(&raw, "raw", &top, "qcow2");
    // Our map equals QEMU's, extended L2 included.
    let node = open_qcow2(&top, true).await;
    assert_maps_equal(
        &our_map(&node).await,
        &qemu_map(&top, "qcow2"),
        &format!("{cfg:?} map"),
    );
}

async fn run_configs(pick: impl Fn(&Config) -> bool) {
    let ops = ops_per_config();
    let mut cases = Cases::default();
    for cfg in CONFIGS.iter().copied().filter(|c| pick(c)) {
        cases.run(&format!("{cfg:?}"), run_config(cfg, ops)).await;
    }
    cases.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_ops_v3() {
    run_configs(|c| c.version >= 3 && !c.extended).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_ops_v2() {
    run_configs(|c| c.version < 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_ops_extended_l2() {
    run_configs(|c| c.extended).await;
}
