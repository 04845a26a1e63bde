//! Crash injection: power cuts at every point of qcow2 workloads, on storage that tears and
//! reorders whatever was not flushed (`protocol::crash`).
//!
//! Each scenario is a seeded list of guest operations (writes at unaligned offsets, zeroing,
//! discards, flushes, copy-on-read/stream population, growth, dropping the backing link as a
//! stream completion does). A reference run without crash counts the storage operations N and
//! records the guest contents after every guest operation. Then for crash points k in 0..=N the
//! scenario is replayed until the storage fails at operation k, and one surviving image is built
//! (alternating whole-operation and torn-sector survival, seeded). Each must:
//!
//! (a) pass our `check` with no corruption (leaks are allowed: a crash may leak clusters), and a
//!     sample of them `qemu-img check` too;
//! (b) open read-write (a dirty lazy-refcounts image is repaired on open, as QEMU does);
//! (c)+(d) read, sector by sector, either what the guest had at its last completed flush or a
//!     version written after it (writes since the last flush may or may not have landed, in any
//!     order, torn at sector granularity; nothing else may appear).
//!
//! `DISKSTREAM_CRASH_SOAK=N` multiplies the number of seeds per scenario for a longer run.

mod common;

use diskstream_block::format::qcow2::check::{check, RepairMode};
use diskstream_block::format::qcow2::create::{create_on, CreateOptions};
use diskstream_block::format::qcow2::Qcow2;
use diskstream_block::format::raw::RawNode;
use diskstream_block::node::BlockNode;
use diskstream_block::protocol::crash::{Choices, CrashProtocol, Survival, SECTOR};
use diskstream_block::protocol::mem::MemProtocol;
use diskstream_block::protocol::Protocol;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const KIB: u64 = 1024;

#[derive(Clone, Debug)]
enum Op {
    Write(u64, Vec<u8>),
    Zero(u64, u64, bool),
    Discard(u64, u64),
    Flush,
    /// Copy-on-read population of a range from the backing chain (guest contents unchanged).
    Populate(u64, u64),
    /// Grow the device.
    Grow(u64),
    /// Stream completion: populate everything, flush, drop the backing link, flush.
    DropBacking,
}

impl Op {
    fn describe(&self) -> String {
        match self {
            Op::Write(o, d) => format!("write {o}+{}", d.len()),
            Op::Zero(o, l, u) => format!("write_zeroes {o}+{l} unmap={u}"),
            Op::Discard(o, l) => format!("discard {o}+{l}"),
            Op::Flush => "flush".into(),
            Op::Populate(o, l) => format!("populate {o}+{l}"),
            Op::Grow(s) => format!("grow to {s}"),
            Op::DropBacking => "stream completion".into(),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Scenario {
    name: &'static str,
    size: u64,
    cluster: u64,
    version: u32,
    lazy: bool,
    extended: bool,
    refcount_bits: u32,
    backing: bool,
    ops: usize,
    mix: Mix,
}

#[derive(Clone, Copy, Debug)]
enum Mix {
    /// Allocating writes everywhere (L2 and refcount growth with small clusters).
    Alloc,
    /// Partial writes over a backing file (copy-on-write of clusters), zeroing, discards.
    Cow,
    /// Guest writes racing population copies, ending in a stream completion.
    Stream,
    /// Writes and growth.
    Grow,
}

fn gen_ops(sc: &Scenario, seed: u64) -> Vec<Op> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut size = sc.size;
    let mut ops = Vec::new();
    let range = |rng: &mut StdRng, size: u64, max: u64| {
        let off = rng.random_range(0..size);
        let len = rng.random_range(1..=max.min(size - off));
        (off, len)
    };
    for i in 0..sc.ops {
        let r = rng.random_range(0..100);
        let op = match sc.mix {
            Mix::Alloc => match r {
                0..=74 => {
                    let (o, l) = range(&mut rng, size, 3 * sc.cluster);
                    Op::Write(o, vec![rng.random_range(1..=255u8); l as usize])
                }
                75..=84 => {
                    let (o, l) = range(&mut rng, size, 4 * sc.cluster);
                    Op::Zero(o, l, rng.random())
                }
                _ => Op::Flush,
            },
            Mix::Cow => match r {
                0..=54 => {
                    let (o, l) = range(&mut rng, size, 2 * sc.cluster);
                    Op::Write(o, (0..l).map(|_| rng.random()).collect())
                }
                55..=67 => {
                    let (o, l) = range(&mut rng, size, 3 * sc.cluster);
                    Op::Zero(o, l, rng.random())
                }
                68..=79 => {
                    let (o, l) = range(&mut rng, size, 4 * sc.cluster);
                    Op::Discard(o, l)
                }
                80..=84 => {
                    let (o, l) = range(&mut rng, size, 4 * sc.cluster);
                    Op::Populate(o, l)
                }
                _ => Op::Flush,
            },
            Mix::Stream => {
                if i + 1 == sc.ops {
                    Op::DropBacking
                } else {
                    match r {
                        0..=39 => {
                            let (o, l) = range(&mut rng, size, 2 * sc.cluster);
                            Op::Write(o, vec![rng.random_range(1..=255u8); l as usize])
                        }
                        40..=84 => {
                            let (o, l) = range(&mut rng, size, 8 * sc.cluster);
                            Op::Populate(o, l)
                        }
                        _ => Op::Flush,
                    }
                }
            }
            Mix::Grow => match r {
                0..=69 => {
                    let (o, l) = range(&mut rng, size, 2 * sc.cluster);
                    Op::Write(o, vec![rng.random_range(1..=255u8); l as usize])
                }
                70..=79 => {
                    size += rng.random_range(1..=8) * sc.cluster;
                    Op::Grow(size)
                }
                _ => Op::Flush,
            },
        };
        ops.push(op);
    }
    ops
}

/// The backing file's contents: a recognisable pattern per sector.
fn backing_bytes(size: u64) -> Vec<u8> {
    (0..size)
        .map(|i| ((i / SECTOR) as u8).wrapping_mul(31) ^ (i as u8))
        .collect()
}

async fn backing_node(size: u64) -> Arc<dyn BlockNode> {
    let p: Arc<dyn Protocol> = Arc::new(MemProtocol::new(
        "backing.raw",
        backing_bytes(size),
        true,
        u64::MAX,
    ));
    Arc::new(RawNode::open(p).await.expect("raw backing"))
}

/// The image before the workload, as created on disk (all durable).
async fn fresh_image(sc: &Scenario) -> Vec<u8> {
    let mem = Arc::new(MemProtocol::new("top.qcow2", Vec::new(), false, u64::MAX));
    let opts = CreateOptions {
        size: sc.size,
        cluster_size: sc.cluster,
        version: sc.version,
        lazy_refcounts: sc.lazy,
        extended_l2: sc.extended,
        refcount_bits: sc.refcount_bits,
        backing_file: sc.backing.then(|| "backing.raw".to_string()),
        backing_fmt: sc.backing.then(|| "raw".to_string()),
        ..CreateOptions::default()
    };
    create_on(Arc::clone(&mem) as Arc<dyn Protocol>, &opts)
        .await
        .expect("create");
    mem.contents()
}

async fn open_top(file: Arc<dyn Protocol>, size: u64) -> Result<Arc<Qcow2>, String> {
    let q = Qcow2::open(file).await.map_err(|e| e.to_string())?;
    if q.header().await.backing_file.is_some() {
        q.set_backing_node(Some(backing_node(size).await));
    }
    Ok(Arc::new(q))
}

/// Run the ops until one fails; returns the index of the failing op (ops.len() if none).
/// With `timeline`, records the guest contents after each op (reference run).
async fn run(
    sc: &Scenario,
    ops: &[Op],
    file: Arc<CrashProtocol>,
    mut timeline: Option<&mut Timeline>,
) -> usize {
    let Ok(q) = open_top(Arc::clone(&file) as Arc<dyn Protocol>, sc.size).await else {
        return 0;
    };
    let node: Arc<dyn BlockNode> = q.clone();
    let mut model = if sc.backing {
        backing_bytes(sc.size)
    } else {
        vec![0; sc.size as usize]
    };
    if let Some(t) = timeline.as_deref_mut() {
        t.states.push(model.clone());
    }
    for (i, op) in ops.iter().enumerate() {
        let r = match op {
            Op::Write(o, d) => {
                model[*o as usize..*o as usize + d.len()].copy_from_slice(d);
                node.write(*o, d).await
            }
            Op::Zero(o, l, unmap) => {
                model[*o as usize..(*o + *l) as usize].fill(0);
                node.write_zeroes(*o, *l, *unmap).await
            }
            Op::Discard(o, l) => {
                let r = node.discard(*o, *l).await;
                if r.is_ok() {
                    // What discard leaves (zero or the backing's data) is the driver's
                    // documented choice; the run learns it (every run reads, so the storage
                    // operation sequence is the same in the reference and the crash runs).
                    let mut buf = vec![0u8; *l as usize];
                    node.read(*o, &mut buf).await.expect("read after discard");
                    model[*o as usize..(*o + *l) as usize].copy_from_slice(&buf);
                }
                r
            }
            Op::Flush => node.flush().await,
            Op::Populate(o, l) => {
                let data = model[*o as usize..(*o + *l) as usize].to_vec();
                node.write_if_unallocated(*o, &data).await.map(|_| ())
            }
            Op::Grow(s) => {
                model.resize(*s as usize, 0);
                node.truncate(*s).await
            }
            Op::DropBacking => {
                let mut r = Ok(());
                let step = 16 * sc.cluster;
                let mut o = 0;
                while o < node.size() && r.is_ok() {
                    let l = step.min(node.size() - o);
                    let data = model[o as usize..(o + l) as usize].to_vec();
                    r = node.write_if_unallocated(o, &data).await.map(|_| ());
                    o += l;
                }
                if r.is_ok() {
                    r = node.flush().await;
                }
                if r.is_ok() {
                    r = q.set_backing_file(None).await;
                }
                if r.is_ok() {
                    q.set_backing_node(None);
                    r = node.flush().await;
                }
                r
            }
        };
        if let Some(t) = timeline.as_deref_mut() {
            t.states.push(model.clone());
            t.flush_ok
                .push(r.is_ok() && matches!(op, Op::Flush | Op::DropBacking));
        }
        if r.is_err() {
            return i;
        }
    }
    ops.len()
}

/// Guest contents after every op of the reference run (index 0: before any op).
struct Timeline {
    states: Vec<Vec<u8>>,
    flush_ok: Vec<bool>,
}

impl Timeline {
    /// Check `got` against what may survive a crash during op `failed`.
    fn verify(&self, failed: usize, got: &[u8]) -> Result<(), String> {
        // The last op that was a completed flush before the failing op.
        let mut acked = 0;
        for i in 0..failed {
            if self.flush_ok[i] {
                acked = i + 1;
            }
        }
        // states[i] is the guest after i ops; op `failed` was in flight.
        let candidates = &self.states[acked..=(failed + 1).min(self.states.len() - 1)];
        if !candidates
            .iter()
            .any(|s| s.len() as u64 == got.len() as u64)
        {
            return Err(format!(
                "size {} is none of the sizes the guest saw since its last flush",
                got.len()
            ));
        }
        let sectors = (got.len() as u64).div_ceil(SECTOR);
        for sec in 0..sectors {
            let lo = (sec * SECTOR) as usize;
            let hi = (lo + SECTOR as usize).min(got.len());
            let ok = candidates
                .iter()
                .any(|s| s.len() >= hi && s[lo..hi] == got[lo..hi]);
            if !ok {
                let what = if got[lo..hi].iter().all(|&b| b == 0) {
                    "zeroes".to_string()
                } else if got[lo..hi] == backing_bytes(got.len() as u64)[lo..hi] {
                    "the backing file's data".to_string()
                } else {
                    format!("{:02x?}", &got[lo..lo + 8])
                };
                let had: Vec<String> = candidates
                    .iter()
                    .map(|s| {
                        let m: Vec<usize> = (lo..hi).filter(|&i| s[i] != got[i]).collect();
                        format!(
                            "{} differ, first {:?} last {:?}",
                            m.len(),
                            m.first().map(|x| x - lo),
                            m.last().map(|x| x - lo)
                        )
                    })
                    .collect();
                eprintln!("sector {sec} got {what}; candidates {had:?}");
                return Err(format!(
                    "guest sector {sec} (offset {lo}) holds data the guest never had since its last completed flush (acked state after op {acked}, crash in op {failed})"
                ));
            }
        }
        Ok(())
    }
}

static QEMU_CHECKS: AtomicU64 = AtomicU64::new(0);

async fn crash_scenario(sc: Scenario, seeds: u64) -> u64 {
    let mut points = 0;
    for seed in 0..seeds {
        let ops = gen_ops(&sc, seed);
        let base = fresh_image(&sc).await;
        let reference = Arc::new(CrashProtocol::new("top.qcow2", base.clone(), None));
        let mut tl = Timeline {
            states: Vec::new(),
            flush_ok: Vec::new(),
        };
        let done = run(&sc, &ops, Arc::clone(&reference), Some(&mut tl)).await;
        assert_eq!(done, ops.len(), "{}: reference run failed", sc.name);
        let n = reference.ops();
        // Without a crash, what is on storage after the run reads as the guest's last state.
        verify_image(
            &sc,
            &tl,
            ops.len(),
            reference.current(),
            &format!("{} seed {seed}: clean reopen", sc.name),
            1,
        )
        .await;
        // Every crash point for short runs; a seeded sample beyond 1500 points.
        let stride = (n / 1500).max(1);
        let mut k = seed % stride;
        while k <= n {
            let file = Arc::new(CrashProtocol::new("top.qcow2", base.clone(), Some(k)));
            let failed = run(&sc, &ops, Arc::clone(&file), None).await;
            let mode = if k % 2 == 0 {
                Survival::Sectors
            } else {
                Survival::Ops
            };
            let img = file.surviving_image(mode, &mut Choices::new(seed * 1_000_003 + k));
            let ctx = format!(
                "{} seed {seed} crash at storage op {k}/{n} ({mode:?}), in guest op {failed}: {}",
                sc.name,
                ops.get(failed).map(Op::describe).unwrap_or_default()
            );
            if std::env::var_os("CRASH_DEBUG").is_some() {
                for (i, o) in ops
                    .iter()
                    .enumerate()
                    .take(failed + 1)
                    .skip(failed.saturating_sub(8))
                {
                    eprintln!("  op {i}: {}", o.describe());
                }
                let log = file.log();
                let start = log
                    .iter()
                    .rposition(|e| e.0 == "flush")
                    .unwrap_or(0)
                    .saturating_sub(40);
                for (i, e) in log.iter().enumerate().skip(start) {
                    eprintln!("  storage op {i}: {} {}+{}", e.0, e.1, e.2);
                }
            }
            verify_image(&sc, &tl, failed.min(ops.len()), img, &ctx, k).await;
            points += 1;
            k += stride;
        }
    }
    points
}

async fn verify_image(
    sc: &Scenario,
    tl: &Timeline,
    failed: usize,
    img: Vec<u8>,
    ctx: &str,
    k: u64,
) {
    // (a) consistency: no corruption (leaks allowed). A dirty lazy-refcounts image is checked
    // after the repair its first read-write open performs, as with QEMU.
    if !sc.lazy {
        let p: Arc<dyn Protocol> = Arc::new(MemProtocol::new("c", img.clone(), true, u64::MAX));
        let r = check(p, RepairMode::None)
            .await
            .unwrap_or_else(|e| panic!("{ctx}: check failed: {e}"));
        assert!(
            r.corruptions == 0 && r.check_errors == 0,
            "{ctx}: corrupt after crash: {:?}",
            r.messages
        );
    }
    if k % 97 == 0 {
        qemu_check(&img, sc.size, ctx);
    }
    // (b) it opens read-write.
    let file = Arc::new(CrashProtocol::new("top.qcow2", img, None));
    let q = open_top(Arc::clone(&file) as Arc<dyn Protocol>, sc.size)
        .await
        .unwrap_or_else(|e| panic!("{ctx}: does not open after crash: {e}"));
    if sc.lazy {
        q.flush().await.expect("flush after repair");
        let p: Arc<dyn Protocol> = Arc::new(MemProtocol::new("c", file.current(), true, u64::MAX));
        let r = check(p, RepairMode::None).await.expect("check");
        assert!(
            r.corruptions == 0 && r.check_errors == 0,
            "{ctx}: corrupt after repair: {:?}",
            r.messages
        );
    }
    // (c)+(d) contents.
    let mut got = vec![0u8; q.size() as usize];
    q.read(0, &mut got)
        .await
        .unwrap_or_else(|e| panic!("{ctx}: read failed: {e}"));
    if let Err(e) = tl.verify(failed, &got) {
        panic!("{ctx}: {e}");
    }
}

fn qemu_check(img: &[u8], size: u64, ctx: &str) {
    let dir = common::tmpdir();
    let path = dir.path().join("crash.qcow2");
    std::fs::write(&path, img).expect("write image");
    std::fs::write(dir.path().join("backing.raw"), backing_bytes(size)).expect("write backing");
    // The backing file is not needed for a check (-U: nothing else holds the file anyway).
    let out = common::run_raw(
        "qemu-img",
        &["check", "-f", "qcow2", path.to_str().expect("utf-8 path")],
    );
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 3,
        "{ctx}: qemu-img check exit {code}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    QEMU_CHECKS.fetch_add(1, Ordering::Relaxed);
}

fn soak() -> u64 {
    std::env::var("DISKSTREAM_CRASH_SOAK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1)
}

fn scenario(name: &'static str, mix: Mix) -> Scenario {
    Scenario {
        name,
        size: 256 * KIB,
        cluster: 512,
        version: 3,
        lazy: false,
        extended: false,
        refcount_bits: 16,
        backing: false,
        ops: 120,
        mix,
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    // One thread: the storage operation sequence must replay exactly for every crash point.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

fn run_all(scs: &[Scenario], seeds: u64) {
    let mut total = 0;
    for sc in scs {
        let p = block_on(crash_scenario(*sc, seeds * soak()));
        eprintln!("{}: {p} crash points, 0 violations", sc.name);
        total += p;
    }
    eprintln!(
        "total {total} crash points; {} also checked by qemu-img",
        QEMU_CHECKS.load(Ordering::Relaxed)
    );
}

#[test]
fn allocation_l2_and_refcount_growth() {
    run_all(
        &[
            scenario("alloc 512B clusters", Mix::Alloc),
            Scenario {
                refcount_bits: 1,
                cluster: 1024,
                ..scenario("alloc refcount_bits=1", Mix::Alloc)
            },
            Scenario {
                version: 2,
                ..scenario("alloc v2", Mix::Alloc)
            },
            Scenario {
                lazy: true,
                ..scenario("alloc lazy_refcounts", Mix::Alloc)
            },
        ],
        4,
    );
}

#[test]
fn copy_on_write_over_backing() {
    run_all(
        &[
            Scenario {
                backing: true,
                cluster: 4096,
                ..scenario("cow 4K clusters", Mix::Cow)
            },
            Scenario {
                backing: true,
                version: 2,
                cluster: 4096,
                ..scenario("cow v2", Mix::Cow)
            },
            Scenario {
                backing: true,
                extended: true,
                cluster: 16 * KIB,
                size: 1024 * KIB,
                ..scenario("cow extended_l2", Mix::Cow)
            },
        ],
        4,
    );
}

#[test]
fn stream_population_and_completion() {
    run_all(
        &[
            Scenario {
                backing: true,
                cluster: 4096,
                ops: 60,
                ..scenario("stream", Mix::Stream)
            },
            Scenario {
                backing: true,
                cluster: 16 * KIB,
                extended: true,
                size: 512 * KIB,
                ops: 60,
                ..scenario("stream extended_l2", Mix::Stream)
            },
        ],
        6,
    );
}

#[test]
fn growth() {
    run_all(&[scenario("grow", Mix::Grow)], 4);
}

/// Regression: a backing-file rewrite of a header longer than a sector (64 KiB clusters: the
/// feature-name table pushes the name into sector 1) used to be one write; torn, it left the
/// new name length with the old name bytes (or the reverse), naming a file that does not
/// exist ("base.qcow2w2"). Every crash point of the rewrite, many survivals each: the header
/// names the old or the new file, and the image passes check.
#[test]
fn backing_rewrite_survives_torn_header() {
    block_on(async {
        let mut points = 0;
        for (old, new) in [
            ("layer1.qcow2", Some("base.qcow2")),
            ("base.qcow2", Some("layer1.qcow2")),
            ("a.qcow2", Some("a-much-longer-backing-file-name.qcow2")),
            // Dropping the link (a full stream's completion) also drops the format extension.
            ("backing.qcow2", None),
        ] {
            let target = new.map(|n| (n.to_string(), Some("qcow2".to_string())));
            let mem = Arc::new(MemProtocol::new("top.qcow2", Vec::new(), false, u64::MAX));
            let opts = CreateOptions {
                size: 1 << 20,
                backing_file: Some(old.to_string()),
                backing_fmt: Some("qcow2".to_string()),
                ..CreateOptions::default()
            };
            create_on(Arc::clone(&mem) as Arc<dyn Protocol>, &opts)
                .await
                .expect("create");
            let base = mem.contents();
            let probe = Arc::new(CrashProtocol::new("top.qcow2", base.clone(), None));
            let q = Qcow2::open(Arc::clone(&probe) as Arc<dyn Protocol>)
                .await
                .expect("open");
            q.set_backing_file(target.clone()).await.expect("rewrite");
            let n = probe.ops();
            for k in 0..=n {
                let file = Arc::new(CrashProtocol::new("top.qcow2", base.clone(), Some(k)));
                if let Ok(q) = Qcow2::open(Arc::clone(&file) as Arc<dyn Protocol>).await {
                    let _ = q.set_backing_file(target.clone()).await;
                }
                for seed in 0..24 {
                    for mode in [Survival::Sectors, Survival::Ops] {
                        let img = file.surviving_image(mode, &mut Choices::new(seed * 7919 + k));
                        let p: Arc<dyn Protocol> =
                            Arc::new(MemProtocol::new("c", img, true, u64::MAX));
                        let r = check(Arc::clone(&p), RepairMode::None)
                            .await
                            .unwrap_or_else(|e| panic!("{old}->{new:?} crash {k}: check: {e}"));
                        assert!(
                            r.corruptions == 0 && r.check_errors == 0,
                            "{:?}",
                            r.messages
                        );
                        let q = Qcow2::open(p)
                            .await
                            .unwrap_or_else(|e| panic!("{old}->{new:?} crash {k}: open: {e}"));
                        let got = q.header().await.backing_file;
                        assert!(
                            got.as_deref() == Some(old) || got.as_deref() == new,
                            "{old}->{new:?} crash at op {k}/{n} ({mode:?}, seed {seed}): the header names {got:?}"
                        );
                        points += 1;
                    }
                }
            }
        }
        eprintln!("backing rewrite: {points} surviving headers, all naming the old or new file");
    });
}
