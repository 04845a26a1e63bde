//! Crash injection for the jobs that change a backing chain: intermediate commit, active
//! commit, mirror with its pivot, and external snapshots, with power cuts at every storage
//! operation of every file involved (`diskstream_block::protocol::crash`).
//!
//! All files of a scenario (base, intermediate layers, overlay, mirror target) sit on one
//! [`Power`] supply: the mutating operations of all of them are counted together, and at crash
//! point k the power goes for every file at once. Each file then keeps an arbitrary part of
//! what it had not flushed (whole operations or torn sectors, alternating with k). The job
//! runs through the real job framework (`JobManager`, auto-finalize) with the engine's
//! drivers (`CommitJob`, `MirrorJob`); the graph owner's part (the QMP monitor's hooks) is
//! replayed at block level: commit's `drop_intermediates` rewrites the overlay's backing
//! file and attaches the base, as `CommitGraphHooks` does; the mirror's `finish` records the
//! pivot; a snapshot is the monitor's sequence (flush the old image, create the overlay with
//! `blockdev-snapshot-sync`'s options, open it, link the old image under it). A guest writes
//! (unaligned writes, write-zeroes, flushes) while the job runs, on a single-threaded runtime
//! where the storage yields at seeded points so guest and job interleave at storage
//! operations.
//!
//! Checked for every crash point: (a) every surviving qcow2 image that existed before the
//! crash-prone step passes our check without corruption (leaks allowed), a sample also
//! `qemu-img check`; (b) the chain the user reopens (the active image's header names its
//! backing file, resolved among the surviving files) opens read-write; (c) it reads, sector by
//! sector, what the guest had at its last completed flush or a version written since. The
//! image the user reopens is the one the job had switched the device to when the power went:
//! the overlay for commit, the source before a mirror's pivot and the target after it, the old
//! image before a snapshot command returned and the overlay after. A snapshot that returned
//! also counts as a completed flush (the management layer may rely on the old image from then
//! on).
//!
//! `DISKSTREAM_CRASH_SOAK=N` multiplies the seeds per scenario.

use async_trait::async_trait;
use diskstream_block::format::qcow2::check::{check, RepairMode};
use diskstream_block::format::qcow2::create::{create_on, CreateOptions};
use diskstream_block::format::qcow2::Qcow2;
use diskstream_block::node::BlockNode;
use diskstream_block::protocol::crash::{Choices, CrashProtocol, Power, Survival, SECTOR};
use diskstream_block::protocol::mem::MemProtocol;
use diskstream_block::protocol::Protocol;
use diskstream_block::BlockError;
use diskstream_jobs::commit::{CommitHooks, CommitJob};
use diskstream_jobs::job::{EventSink, JobEvent, JobOptions};
use diskstream_jobs::mirror::{CopyMode, MirrorConfig, MirrorHooks, MirrorJob, SyncMode};
use diskstream_jobs::{JobManager, JobStatus, JobType, OnError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

const KIB: u64 = 1024;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// Intermediate commit of every layer between the base and the active image.
    Commit,
    /// Active commit: a mirror of the active image into its base, then the pivot.
    ActiveCommit,
    /// A full mirror to a new image, then the pivot.
    Mirror(CopyMode),
    /// An external snapshot in the middle of the guest's work.
    Snapshot,
}

#[derive(Clone, Copy, Debug)]
struct Scenario {
    name: &'static str,
    kind: Kind,
    size: u64,
    cluster: u64,
    /// Layers below the active image (commit: base plus intermediates).
    layers: usize,
    /// The base is smaller than the disk (the job grows it).
    small_base: bool,
    guest_ops: usize,
    seeds: u64,
}

/// A guest operation.
#[derive(Clone, Debug)]
enum Op {
    Write(u64, Vec<u8>),
    Zero(u64, u64, bool),
    Flush,
    /// Take the external snapshot (Kind::Snapshot).
    Snapshot,
}

impl Op {
    fn describe(&self) -> String {
        match self {
            Op::Write(o, d) => format!("write {o}+{}", d.len()),
            Op::Zero(o, l, u) => format!("write_zeroes {o}+{l} unmap={u}"),
            Op::Flush => "flush".into(),
            Op::Snapshot => "snapshot".into(),
        }
    }
}

fn gen_ops(sc: &Scenario, seed: u64) -> Vec<Op> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut ops = Vec::new();
    for i in 0..sc.guest_ops {
        if sc.kind == Kind::Snapshot && i == sc.guest_ops / 2 {
            ops.push(Op::Snapshot);
            continue;
        }
        let off = rng.random_range(0..sc.size);
        let len = rng.random_range(1..=(2 * sc.cluster).min(sc.size - off));
        ops.push(match rng.random_range(0..100) {
            0..=64 => Op::Write(off, vec![rng.random_range(1..=255u8); len as usize]),
            65..=79 => Op::Zero(off, len, rng.random()),
            _ => Op::Flush,
        });
    }
    ops
}

/// File names of a scenario's images, from the bottom of the chain up.
fn chain_names(sc: &Scenario) -> Vec<String> {
    match sc.kind {
        Kind::Commit | Kind::ActiveCommit => {
            let mut v = vec!["base.qcow2".to_string()];
            for i in 1..sc.layers {
                v.push(format!("layer{i}.qcow2"));
            }
            v.push("top.qcow2".into());
            v
        }
        Kind::Mirror(_) => vec!["src.qcow2".into()],
        Kind::Snapshot => vec!["old.qcow2".into()],
    }
}

const TARGET: &str = "dst.qcow2";
const OVERLAY: &str = "snap.qcow2";

/// The images before the run (all durable): the chain with seeded data in every layer, plus
/// an empty mirror target or an empty file for the snapshot overlay.
async fn initial_files(sc: &Scenario, seed: u64) -> BTreeMap<String, Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x1a7e5);
    let mut files = BTreeMap::new();
    let mut below: Option<(String, Arc<dyn BlockNode>)> = None;
    let mut mems = Vec::new();
    for (i, name) in chain_names(sc).iter().enumerate() {
        let size = if i == 0 && sc.small_base {
            sc.size * 3 / 4
        } else {
            sc.size
        };
        let mem = Arc::new(MemProtocol::new(name, Vec::new(), false, u64::MAX));
        let opts = CreateOptions {
            size,
            cluster_size: sc.cluster,
            backing_file: below.as_ref().map(|(n, _)| n.clone()),
            backing_fmt: below.as_ref().map(|_| "qcow2".to_string()),
            ..CreateOptions::default()
        };
        create_on(Arc::clone(&mem) as Arc<dyn Protocol>, &opts)
            .await
            .expect("create");
        let q = Qcow2::open(Arc::clone(&mem) as Arc<dyn Protocol>)
            .await
            .expect("open new image");
        q.set_backing_node(below.as_ref().map(|(_, n)| Arc::clone(n)));
        for _ in 0..rng.random_range(4..12) {
            let off = rng.random_range(0..size);
            let len = rng.random_range(1..=(4 * sc.cluster).min(size - off));
            if rng.random_range(0..5) == 0 {
                q.write_zeroes(off, len, false).await.expect("zero");
            } else {
                let d: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                q.write(off, &d).await.expect("write");
            }
        }
        q.close().await.expect("close");
        mems.push((name.clone(), Arc::clone(&mem)));
        below = Some((name.clone(), Arc::new(q)));
    }
    for (name, mem) in mems {
        files.insert(name, mem.contents());
    }
    match sc.kind {
        Kind::Mirror(_) => {
            let mem = Arc::new(MemProtocol::new(TARGET, Vec::new(), false, u64::MAX));
            let opts = CreateOptions {
                size: sc.size,
                cluster_size: sc.cluster,
                ..CreateOptions::default()
            };
            create_on(Arc::clone(&mem) as Arc<dyn Protocol>, &opts)
                .await
                .expect("create target");
            files.insert(TARGET.into(), mem.contents());
        }
        Kind::Snapshot => {
            files.insert(OVERLAY.into(), Vec::new());
        }
        _ => {}
    }
    files
}

/// Open `name` and the backing chain its header records, resolving names among `files`.
/// Returns the nodes from `name` down.
async fn open_chain(
    files: &BTreeMap<String, Arc<dyn Protocol>>,
    name: &str,
) -> Result<Vec<Arc<Qcow2>>, String> {
    let mut names = vec![name.to_string()];
    let mut nodes: Vec<Arc<Qcow2>> = Vec::new();
    while let Some(n) = names.pop() {
        let file = files
            .get(&n)
            .ok_or_else(|| format!("backing file {n:?} does not exist"))?;
        let q = Qcow2::open(Arc::clone(file))
            .await
            .map_err(|e| format!("{n}: {e}"))?;
        if let Some(b) = q.header().await.backing_file {
            if nodes.len() > 8 {
                return Err("backing chain loops".into());
            }
            names.push(b);
        }
        nodes.push(Arc::new(q));
    }
    for i in 0..nodes.len().saturating_sub(1) {
        nodes[i].set_backing_node(Some(Arc::clone(&nodes[i + 1]) as Arc<dyn BlockNode>));
    }
    Ok(nodes)
}

/// What the guest did: its disk before the first op, the ops it issued (the last one may have
/// failed), and which of them were completed flushes.
#[derive(Default)]
struct Timeline {
    initial: Vec<u8>,
    ops: Vec<Op>,
    flush_ok: Vec<bool>,
}

/// The guest's view of `op` applied to `disk`.
fn apply_model(op: &Op, disk: &mut [u8]) {
    match op {
        Op::Write(o, d) => disk[*o as usize..*o as usize + d.len()].copy_from_slice(d),
        Op::Zero(o, l, _) => disk[*o as usize..(*o + *l) as usize].fill(0),
        Op::Flush | Op::Snapshot => {}
    }
}

impl Timeline {
    /// Check `got` (the guest disk after a crash during op `failed`): every sector holds what
    /// the guest had after its last completed flush or after a later op.
    fn verify(&self, failed: usize, got: &[u8]) -> Result<(), String> {
        let mut acked = 0;
        for i in 0..failed.min(self.flush_ok.len()) {
            if self.flush_ok[i] {
                acked = i + 1;
            }
        }
        let mut disk = self.initial.clone();
        for op in &self.ops[..acked] {
            apply_model(op, &mut disk);
        }
        let mut candidates = vec![disk.clone()];
        for op in self.ops.iter().take(failed + 1).skip(acked) {
            apply_model(op, &mut disk);
            candidates.push(disk.clone());
        }
        if !candidates.iter().any(|s| s.len() == got.len()) {
            return Err(format!(
                "size {} is none of the sizes the guest saw since its last flush",
                got.len()
            ));
        }
        for sec in 0..(got.len() as u64).div_ceil(SECTOR) {
            let lo = (sec * SECTOR) as usize;
            let hi = (lo + SECTOR as usize).min(got.len());
            if !candidates.iter().any(|s| s[lo..hi] == got[lo..hi]) {
                let what = if got[lo..hi].iter().all(|&b| b == 0) {
                    "zeroes".to_string()
                } else {
                    format!("{:02x?}", &got[lo..lo + 8])
                };
                return Err(format!(
                    "guest sector {sec} (offset {lo}) holds {what}, which the guest never had \
                     since its last completed flush (after op {acked}; crash in op {failed})"
                ));
            }
        }
        Ok(())
    }
}

struct NoEvents;
impl EventSink for NoEvents {
    fn emit(&self, _ev: JobEvent) {}
}

/// `CommitGraphHooks::drop_intermediates` at block level: the overlay records the base as
/// its backing file (a header rewrite that flushes before and after) and reads from it.
struct DropIntermediates {
    overlay: Arc<Qcow2>,
    base: Arc<dyn BlockNode>,
    name: String,
}

#[async_trait]
impl CommitHooks for DropIntermediates {
    async fn drop_intermediates(&self) -> Result<(), BlockError> {
        self.overlay
            .set_backing_file(Some((self.name.clone(), Some("qcow2".into()))))
            .await?;
        self.overlay.set_backing_node(Some(Arc::clone(&self.base)));
        Ok(())
    }
}

/// The mirror's graph owner: records the pivot (users move to the target).
struct PivotHooks(Arc<AtomicBool>);

#[async_trait]
impl MirrorHooks for PivotHooks {
    async fn finish(&self, pivot: bool) {
        if pivot {
            self.0.store(true, Ordering::Release);
        }
    }
}

/// One run of a scenario on fresh storage (crashing at `crash_at`).
struct Run {
    files: BTreeMap<String, Arc<CrashProtocol>>,
    timeline: Timeline,
    /// The guest op that failed (ops.len() if none did).
    failed: usize,
    /// The image the user reopens.
    device: String,
}

async fn apply(node: &Arc<dyn BlockNode>, op: &Op) -> Result<(), BlockError> {
    match op {
        Op::Write(o, d) => node.write(*o, d).await,
        Op::Zero(o, l, unmap) => node.write_zeroes(*o, *l, *unmap).await,
        Op::Flush => node.flush().await,
        Op::Snapshot => Ok(()),
    }
}

/// Wait until `job` is ready or over.
async fn until_ready(job: &Arc<diskstream_jobs::Job>) {
    while !job.is_ready() && !matches!(job.status(), JobStatus::Concluded | JobStatus::Null) {
        yield_once().await;
    }
}

/// Let the other tasks run (without polling the runtime's drivers, as `yield_now` does).
async fn yield_once() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            return std::task::Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await
}

async fn run(
    sc: &Scenario,
    ops: &[Op],
    initial: &BTreeMap<String, Vec<u8>>,
    crash_at: Option<u64>,
    seed: u64,
) -> Run {
    let power = Power::interleaved(crash_at, seed);
    let files: BTreeMap<String, Arc<CrashProtocol>> = initial
        .iter()
        .map(|(n, d)| {
            (
                n.clone(),
                Arc::new(CrashProtocol::on_power(n, d.clone(), Arc::clone(&power))),
            )
        })
        .collect();
    let protos: BTreeMap<String, Arc<dyn Protocol>> = files
        .iter()
        .map(|(n, f)| (n.clone(), Arc::clone(f) as Arc<dyn Protocol>))
        .collect();
    let names = chain_names(sc);
    let top_name = names.last().cloned().unwrap_or_default();
    let mut out = Run {
        files,
        timeline: Timeline::default(),
        failed: 0,
        device: top_name.clone(),
    };
    let Ok(chain) = open_chain(&protos, &top_name).await else {
        return out;
    };
    let top: Arc<dyn BlockNode> = Arc::clone(&chain[0]) as Arc<dyn BlockNode>;
    let mut initial_disk = vec![0u8; top.size() as usize];
    top.read(0, &mut initial_disk)
        .await
        .expect("read the initial disk");
    out.timeline.initial = initial_disk;

    let jobs = JobManager::new(Arc::new(NoEvents));
    let pivoted = Arc::new(AtomicBool::new(false));
    let mut device = Arc::clone(&top);
    let mut job = None;
    // The job starts after a third of the guest's ops; mirror-like jobs are completed after
    // two thirds (once ready).
    let (start_at, complete_at) = (ops.len() / 3, 2 * ops.len() / 3);
    let mut snapshot_taken = false;
    for (i, op) in ops.iter().enumerate() {
        if i == start_at && sc.kind != Kind::Snapshot {
            let opts = JobOptions {
                on_error: OnError::Report,
                ..JobOptions::default()
            };
            let j = match sc.kind {
                Kind::Commit => {
                    let base = Arc::clone(chain.last().expect("base")) as Arc<dyn BlockNode>;
                    let hooks = Arc::new(DropIntermediates {
                        overlay: Arc::clone(&chain[0]),
                        base: Arc::clone(&base),
                        name: names[0].clone(),
                    });
                    let driver = Arc::new(CommitJob::new(
                        Arc::clone(&chain[1]) as Arc<dyn BlockNode>,
                        base,
                        hooks,
                    ));
                    jobs.create("c", JobType::Commit, driver, &opts)
                        .expect("job")
                }
                Kind::ActiveCommit | Kind::Mirror(_) => {
                    let (target, sync, mode, jt): (Arc<dyn BlockNode>, _, _, _) = match sc.kind {
                        Kind::Mirror(mode) => {
                            let t = open_chain(&protos, TARGET).await;
                            let Ok(t) = t else {
                                out.failed = i;
                                return out;
                            };
                            (
                                Arc::clone(&t[0]) as Arc<dyn BlockNode>,
                                SyncMode::Full,
                                mode,
                                JobType::Mirror,
                            )
                        }
                        _ => {
                            let b = Arc::clone(chain.last().expect("base")) as Arc<dyn BlockNode>;
                            (
                                Arc::clone(&b),
                                SyncMode::Above(Some(b)),
                                CopyMode::Background,
                                JobType::Commit,
                            )
                        }
                    };
                    let driver = Arc::new(MirrorJob::new(
                        Arc::clone(&top),
                        target,
                        MirrorConfig {
                            granularity: sc.cluster.max(4096),
                            buf_size: 16 * sc.cluster.max(4096),
                            sync,
                            copy_mode: mode,
                            on_source_error: OnError::Report,
                            on_target_error: OnError::Report,
                            grow_target: jt == JobType::Commit,
                            zeroes_free: false,
                        },
                        Arc::new(PivotHooks(Arc::clone(&pivoted))),
                    ));
                    device = driver.filter();
                    jobs.create("m", jt, driver, &opts).expect("job")
                }
                Kind::Snapshot => unreachable!(),
            };
            jobs.start(&j);
            job = Some(j);
        }
        if i == complete_at && matches!(sc.kind, Kind::ActiveCommit | Kind::Mirror(_)) {
            if let Some(j) = &job {
                until_ready(j).await;
                let _ = j.complete();
            }
        }
        let r = if let Op::Snapshot = op {
            take_snapshot(&device, &protos, &names[0]).await
        } else {
            apply(&device, op).await.map(|()| None)
        };
        let r = match r {
            Ok(Some(overlay)) => {
                device = overlay;
                snapshot_taken = true;
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        out.timeline.ops.push(op.clone());
        out.timeline
            .flush_ok
            .push(r.is_ok() && matches!(op, Op::Flush | Op::Snapshot));
        if r.is_err() {
            out.failed = i;
            break;
        }
        out.failed = i + 1;
    }
    if let Some(j) = job {
        // A guest that stopped early leaves a mirror waiting for `complete`: management
        // completes it (on storage without power, that fails and the job aborts).
        if matches!(sc.kind, Kind::ActiveCommit | Kind::Mirror(_)) {
            until_ready(&j).await;
            let _ = j.complete();
        }
        j.wait_concluded().await;
    }
    out.device = match sc.kind {
        Kind::Commit => top_name,
        Kind::ActiveCommit if pivoted.load(Ordering::Acquire) => names[0].clone(),
        Kind::Mirror(_) if pivoted.load(Ordering::Acquire) => TARGET.into(),
        Kind::Snapshot if snapshot_taken => OVERLAY.into(),
        _ => top_name,
    };
    out
}

/// `blockdev-snapshot-sync` at block level: flush the old image, create the overlay with the
/// command's options (the old image's size, its file name and format recorded), open it and
/// put the old image under it.
async fn take_snapshot(
    old: &Arc<dyn BlockNode>,
    files: &BTreeMap<String, Arc<dyn Protocol>>,
    old_name: &str,
) -> Result<Option<Arc<dyn BlockNode>>, BlockError> {
    old.flush().await?;
    let file = Arc::clone(&files[OVERLAY]);
    let opts = CreateOptions {
        size: old.size(),
        backing_file: Some(old_name.to_string()),
        backing_fmt: Some(old.format_name().to_string()),
        ..CreateOptions::default()
    };
    create_on(Arc::clone(&file), &opts).await?;
    let q = Qcow2::open(file).await?;
    q.set_backing_node(Some(Arc::clone(old)));
    Ok(Some(Arc::new(q)))
}

static QEMU_CHECKS: AtomicU64 = AtomicU64::new(0);

async fn verify(run: &Run, mode: Survival, choice_seed: u64, ctx: &str, k: u64) {
    let mut rng = Choices::new(choice_seed);
    let imgs: BTreeMap<String, Vec<u8>> = run
        .files
        .iter()
        .map(|(n, f)| (n.clone(), f.surviving_image(mode, &mut rng)))
        .collect();
    // (a) Every image that existed before the run is consistent; the snapshot overlay only
    // once the command returned (before that it is a half-created file nobody uses).
    for (n, img) in &imgs {
        if n == OVERLAY && run.device != OVERLAY {
            continue;
        }
        let p: Arc<dyn Protocol> = Arc::new(MemProtocol::new(n, img.clone(), true, u64::MAX));
        let r = check(p, RepairMode::None)
            .await
            .unwrap_or_else(|e| panic!("{ctx}: {n}: check failed: {e}"));
        assert!(
            r.corruptions == 0 && r.check_errors == 0,
            "{ctx}: {n} corrupt after crash: {:?}",
            r.messages
        );
    }
    if k % 127 == 0 {
        let dir = tempfile::tempdir().expect("tmp");
        for (n, img) in &imgs {
            if n == OVERLAY && run.device != OVERLAY {
                continue;
            }
            let path = dir.path().join(n);
            std::fs::write(&path, img).expect("write image");
            let out = std::process::Command::new("qemu-img")
                .args(["check", "-f", "qcow2"])
                .arg(&path)
                .output()
                .expect("qemu-img is required by this test (install qemu-utils)");
            let code = out.status.code().unwrap_or(-1);
            assert!(
                code == 0 || code == 3,
                "{ctx}: {n}: qemu-img check exit {code}:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            QEMU_CHECKS.fetch_add(1, Ordering::Relaxed);
        }
    }
    // (b) The user's chain opens read-write.
    let protos: BTreeMap<String, Arc<dyn Protocol>> = imgs
        .into_iter()
        .map(|(n, d)| {
            let p: Arc<dyn Protocol> = Arc::new(CrashProtocol::new(&n, d, None));
            (n, p)
        })
        .collect();
    let chain = open_chain(&protos, &run.device)
        .await
        .unwrap_or_else(|e| panic!("{ctx}: {} does not open after crash: {e}", run.device));
    // (c) Its contents.
    let top = &chain[0];
    let mut got = vec![0u8; top.size() as usize];
    top.read(0, &mut got)
        .await
        .unwrap_or_else(|e| panic!("{ctx}: read failed: {e}"));
    if let Err(e) = run.timeline.verify(run.failed, &got) {
        panic!("{ctx}: reopening {}: {e}", run.device);
    }
}

async fn crash_scenario(sc: Scenario, seeds: u64) -> u64 {
    let mut points = 0;
    for seed in 0..seeds {
        let ops = gen_ops(&sc, seed);
        let initial = initial_files(&sc, seed).await;
        let reference = run(&sc, &ops, &initial, None, seed).await;
        assert_eq!(
            reference.failed,
            ops.len(),
            "{} seed {seed}: the run without a crash failed",
            sc.name
        );
        let n = reference
            .files
            .values()
            .next()
            .map(|f| f.ops())
            .unwrap_or(0);
        verify(
            &reference,
            Survival::Ops,
            seed,
            &format!("{} seed {seed}: no crash", sc.name),
            1,
        )
        .await;
        let stride = (n / 400).max(1);
        let mut k = seed % stride;
        while k <= n {
            let r = run(&sc, &ops, &initial, Some(k), seed).await;
            let mode = if k % 2 == 0 {
                Survival::Sectors
            } else {
                Survival::Ops
            };
            let ctx = format!(
                "{} seed {seed} crash at storage op {k}/{n} ({mode:?}), in guest op {}: {}; user reopens {}",
                sc.name,
                r.failed,
                ops.get(r.failed).map(Op::describe).unwrap_or_default(),
                r.device
            );
            if std::env::var_os("CRASH_DEBUG").is_some() {
                for (name, f) in &r.files {
                    for (i, e) in f.log().iter().enumerate() {
                        eprintln!("  {name} op {i}: {} {}+{}", e.0, e.1, e.2);
                    }
                }
            }
            verify(&r, mode, seed * 1_000_003 + k, &ctx, k).await;
            points += 1;
            k += stride;
        }
    }
    points
}

fn soak() -> u64 {
    std::env::var("DISKSTREAM_CRASH_SOAK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1)
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    // One thread, and only the timer driver (the jobs' timeouts and rate limits): with no I/O
    // driver, the many yields of the interleaved storage cost no system call.
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
        .block_on(f)
}

fn run_all(scs: &[Scenario]) {
    let mut total = 0;
    for sc in scs {
        let t = std::time::Instant::now();
        let p = block_on(crash_scenario(*sc, sc.seeds * soak()));
        eprintln!(
            "{}: {p} crash points, 0 violations ({:.1} s)",
            sc.name,
            t.elapsed().as_secs_f64()
        );
        total += p;
    }
    eprintln!(
        "total {total} crash points; {} images also checked by qemu-img",
        QEMU_CHECKS.load(Ordering::Relaxed)
    );
}

fn scenario(name: &'static str, kind: Kind) -> Scenario {
    Scenario {
        name,
        kind,
        size: 256 * KIB,
        cluster: 4096,
        layers: 2,
        small_base: false,
        guest_ops: 36,
        seeds: 3,
    }
}

/// The same with QEMU's default 64 KiB clusters (headers with the feature-name table, longer
/// than a sector): costlier per crash point, so fewer seeds.
fn big(sc: Scenario) -> Scenario {
    Scenario {
        cluster: 64 * KIB,
        size: 512 * KIB,
        seeds: 1,
        ..sc
    }
}

#[test]
fn commit_intermediate() {
    run_all(&[
        scenario("commit 4K clusters", Kind::Commit),
        Scenario {
            layers: 3,
            small_base: true,
            ..scenario("commit two layers, growing base", Kind::Commit)
        },
        big(scenario("commit 64K clusters", Kind::Commit)),
    ]);
}

#[test]
fn commit_active() {
    run_all(&[
        scenario("active commit 4K clusters", Kind::ActiveCommit),
        Scenario {
            small_base: true,
            ..big(scenario(
                "active commit 64K clusters, growing base",
                Kind::ActiveCommit,
            ))
        },
    ]);
}

#[test]
fn mirror_pivot() {
    run_all(&[
        Scenario {
            seeds: 4,
            ..scenario("mirror background", Kind::Mirror(CopyMode::Background))
        },
        Scenario {
            seeds: 4,
            ..scenario(
                "mirror write-blocking",
                Kind::Mirror(CopyMode::WriteBlocking),
            )
        },
    ]);
}

#[test]
fn external_snapshot() {
    run_all(&[
        Scenario {
            seeds: 4,
            ..scenario("snapshot 4K clusters", Kind::Snapshot)
        },
        big(scenario("snapshot 64K clusters", Kind::Snapshot)),
    ]);
}
