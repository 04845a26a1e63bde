//! The block-stream job while a guest does random concurrent I/O through an NBD export of the
//! device being streamed (issue 4): our NBD server exports the top of a random three-layer
//! chain, a pipelined NBD client (two connections, up to eight requests in flight on disjoint
//! ranges) writes, write-zeroes and reads while the job copies; every read returns the model's
//! bytes, and at the end the image equals the model (`qemu-img compare`), passes
//! `qemu-img check` and has no backing file left. Over 1,000 randomized guest operations per
//! run; one more round uses `qemu-io` (QEMU's own NBD client) as the guest.

mod common;

use common::*;
use diskstream_block::image::chain_layers;
use diskstream_block::node::BlockNode;
use diskstream_block::BlockBackend;
use diskstream_jobs::job::JobOptions;
use diskstream_jobs::stream::NoHooks;
use diskstream_jobs::{Job, JobManager, JobStatus, JobType, StreamConfig, StreamJob};
use diskstream_nbd::client::{Address, ClientOptions, NbdClient, ZeroFlags};
use diskstream_nbd::server::{Export, Listener, Server, ServerConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

/// Await `f`, failing the test after `secs` seconds instead of hanging CI.
async fn within<T>(secs: u64, what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {secs} s"))
}

/// One guest request of a batch.
#[derive(Clone, Copy)]
enum Op {
    Read,
    Write(u64),
    Zero,
}

/// A running round: the top opened read-write, exported over a unix socket, and a stream job
/// on it with a speed limit low enough that the guest's requests overlap the copies.
struct Setup {
    dir: tempfile::TempDir,
    top: Arc<dyn BlockNode>,
    server: Server,
    accept: tokio::task::JoinHandle<()>,
    sock: std::path::PathBuf,
    job: Arc<Job>,
    events: Arc<Events>,
    model: Vec<u8>,
}

async fn setup(seed: u64, speed: u64) -> Setup {
    let dir = tempfile::tempdir().expect("tmp");
    let mut rng = StdRng::seed_from_u64(seed);
    let size = 8 * MIB + rng.random_range(0..4u64) * 512 * 1024 + rng.random_range(0..2u64) * 512;
    make_chain(dir.path(), size, &mut rng).await;
    let top = open(&dir.path().join("top.qcow2"), false).await;
    let model = read_all(&top).await;
    let sock = dir.path().join("nbd.sock");
    let server = Server::new(ServerConfig::new(vec![Export {
        name: String::new(),
        description: String::new(),
        backend: BlockBackend::new(Arc::clone(&top)),
        read_only: false,
        allocation_depth: true,
        writethrough: false,
        max_connections: 4,
    }]))
    .expect("server");
    let listener = Listener::bind_unix(&sock).expect("listen");
    let srv = server.clone();
    let accept = tokio::spawn(async move {
        let _ = srv.serve(listener).await;
    });
    let layers = chain_layers(&top);
    let events = Arc::new(Events::default());
    let mgr = JobManager::new(events.clone());
    let parallel = rng.random_range(1..=4);
    let cfg = StreamConfig {
        chunk_size: [64 * 1024, 256 * 1024, MIB][rng.random_range(0..3usize)],
        parallel,
        // The guest is busy all along here: let several copies race its requests too.
        busy_parallel: rng.random_range(1..=parallel),
        ..Default::default()
    };
    let driver = Arc::new(StreamJob::new(
        Arc::clone(&top),
        Arc::clone(&layers[2]),
        None,
        cfg,
        Arc::new(NoHooks),
    ));
    let job = mgr
        .create(
            "s",
            JobType::Stream,
            driver,
            &JobOptions {
                speed,
                ..JobOptions::default()
            },
        )
        .expect("create job");
    mgr.start(&job);
    Setup {
        dir,
        top,
        server,
        accept,
        sock,
        job,
        events,
        model,
    }
}

impl Setup {
    /// Let the job run at full speed to its end, then check everything: statuses, contents
    /// against the model (live and after reopening), no backing file, `qemu-img check` and
    /// `qemu-img compare`.
    async fn finish(self, seed: u64) {
        if self.job.status() != JobStatus::Null {
            // Possibly already past the point where the speed can change: that is fine.
            let _ = self.job.set_speed(0);
        }
        within(60, "job end", self.job.wait_concluded()).await;
        assert_eq!(
            self.events.statuses("s"),
            vec![
                JobStatus::Created,
                JobStatus::Running,
                JobStatus::Waiting,
                JobStatus::Pending,
                JobStatus::Concluded,
                JobStatus::Null
            ],
            "seed {seed}"
        );
        let got = read_all(&self.top).await;
        if let Some(i) = first_diff(&got, &self.model) {
            panic!("seed {seed}: contents differ from the model at byte {i}");
        }
        assert_eq!(
            chain_layers(&self.top).len(),
            1,
            "seed {seed}: backing left"
        );
        self.server.shutdown();
        let _ = self.accept.await;
        within(10, "drain", self.server.wait_idle()).await;
        self.top.close().await.expect("close");
        drop(self.top);
        let path = self.dir.path().join("top.qcow2");
        qemu_img_check(&path);
        let model = self.dir.path().join("model.raw");
        std::fs::write(&model, &self.model).expect("model");
        let out = Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(&path)
            .arg(&model)
            .output()
            .expect("qemu-img");
        assert!(
            out.status.success(),
            "seed {seed}: qemu-img compare: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let info = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&path)
            .output()
            .expect("qemu-img");
        let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap_or_default();
        assert!(v.get("backing-filename").is_none(), "seed {seed}: {v}");
    }
}

/// Batches of up to eight concurrent requests on pairwise disjoint ranges; reads are checked
/// against the model as it stands before the batch. Returns the requests made.
async fn guest(
    client: &Arc<NbdClient>,
    model: &mut [u8],
    rng: &mut StdRng,
    batches: usize,
) -> usize {
    let size = model.len() as u64;
    let lens = [1u64, 511, 512, 4095, 65_536, 65_537, 300_001, MIB];
    let mut done = 0;
    for b in 0..batches {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let len = lens[rng.random_range(0..lens.len())].min(size);
            let off = rng.random_range(0..=size - len);
            if ranges.iter().any(|&(a, e)| off < e && a < off + len) {
                continue;
            }
            ranges.push((off, off + len));
            let op = match rng.random_range(0..10) {
                0..=3 => Op::Read,
                4..=7 => Op::Write(rng.random()),
                _ => Op::Zero,
            };
            let r = off as usize..(off + len) as usize;
            let expect = model[r.clone()].to_vec();
            let data = match op {
                Op::Write(seed) => {
                    let d = pattern(seed, len as usize);
                    model[r].copy_from_slice(&d);
                    d
                }
                Op::Zero => {
                    model[r].fill(0);
                    Vec::new()
                }
                Op::Read => Vec::new(),
            };
            let c = Arc::clone(client);
            tasks.push(tokio::spawn(async move {
                match op {
                    Op::Read => {
                        let got = c.read(off, len as usize).await.expect("read");
                        if let Some(i) = first_diff(&got, &expect) {
                            panic!("batch {b}: read {off}+{len} differs at {i}");
                        }
                    }
                    Op::Write(_) => c.write(off, data, false).await.expect("write"),
                    Op::Zero => c
                        .write_zeroes(
                            off,
                            len,
                            ZeroFlags {
                                may_trim: rng_bit(off),
                                ..ZeroFlags::default()
                            },
                        )
                        .await
                        .expect("write zeroes"),
                }
            }));
        }
        for t in tasks {
            within(30, "guest request", t).await.expect("guest task");
            done += 1;
        }
    }
    done
}

/// A cheap deterministic coin for the may-trim flag.
fn rng_bit(x: u64) -> bool {
    (x / 512) % 2 == 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stream_under_random_guest_io_through_nbd() {
    let mut total = 0;
    for seed in 0..24u64 {
        // 0.5-2 MiB/s: the job is still copying while the guest runs its batches, even on a
        // loaded machine where the batches take seconds (the rest runs unthrottled below).
        let s = setup(seed, (1 + seed % 4) * MIB / 2).await;
        let mut o = ClientOptions::new(Address::Unix(s.sock.clone()), "");
        o.connections = 2;
        let client = Arc::new(
            within(10, "connect", NbdClient::connect(o))
                .await
                .expect("connect"),
        );
        let mut model = s.model.clone();
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
        total += guest(&client, &mut model, &mut rng, 8).await;
        assert!(
            s.job.status() == JobStatus::Running,
            "seed {seed}: the job must still be copying while the guest runs ({:?})",
            s.job.status()
        );
        client.flush().await.expect("flush");
        // The rest of the copy runs unthrottled with the client still connected; then a
        // final read through the export must see the model.
        s.job.set_speed(0).expect("speed");
        within(60, "job end", s.job.wait_concluded()).await;
        let all = client.read(0, model.len()).await.expect("read all");
        assert!(
            first_diff(&all, &model).is_none(),
            "seed {seed}: final read"
        );
        client.close();
        drop(client);
        let mut s = s;
        s.model = model;
        s.finish(seed).await;
    }
    assert!(total >= 1000, "{total} randomized guest requests");
}

/// QEMU's NBD client as the guest: `qemu-io` issues random pipelined writes (aio_write,
/// write -z) through the export while the job copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stream_with_qemu_io_writing_through_nbd() {
    for seed in 100..103u64 {
        let s = setup(seed, 4 * MIB).await;
        let mut model = s.model.clone();
        let size = model.len() as u64;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
        for _ in 0..60 {
            let len = rng.random_range(1..=256u64) * 512;
            let off = rng.random_range(0..=(size - len) / 512) * 512;
            let r = off as usize..(off + len) as usize;
            if rng.random_bool(0.2) {
                model[r].fill(0);
                args.push("-c".into());
                args.push(format!("write -z {off} {len}"));
            } else {
                let p: u8 = rng.random_range(1..=255);
                model[r].fill(p);
                args.push("-c".into());
                args.push(format!("aio_write -P {p} {off} {len}"));
                args.push("-c".into());
                args.push("aio_flush".into());
            }
        }
        args.push(format!("nbd+unix:///?socket={}", s.sock.display()));
        let out = tokio::task::spawn_blocking(move || Command::new("qemu-io").args(&args).output())
            .await
            .expect("join")
            .expect("qemu-io is required (qemu-utils)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && !text.contains("error") && !text.contains("failed"),
            "seed {seed}: qemu-io: {text}"
        );
        let mut s = s;
        s.model = model;
        s.finish(seed).await;
    }
}
