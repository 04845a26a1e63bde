//! Copy-on-read with real NBD peers on both sides.
//!
//! * Data equivalence: our NBD server exports a copy-on-read filter over a 3-deep qcow2 chain
//!   made by qemu-img (layers of odd sizes, the top itself too: 1 B, 511 B, cluster±1, …); our
//!   NBD client sends thousands of random concurrent reads, writes, write-zeroes and trims at
//!   unaligned offsets with odd lengths (1 B, 511 B, cluster±1); every read returns the model's bytes, and at the
//!   end `qemu-img compare` of the top against the model is identical and `qemu-img check` clean.
//! * The backing itself over NBD: qemu-nbd serving a qcow2 chain; nbdkit with the `delay` and
//!   `log` filters, where the number of read requests nbdkit logs shows what fetch units and
//!   read-ahead save (requests are counted, never timed); nbdkit's `error` filter, whose EIO
//!   reaches the reader while nothing lands in the top.

mod client_support;

use client_support::*;
use diskstream_block::filter::cor::{CopyOnRead, CorConfig};
use diskstream_block::format::Format;
use diskstream_block::image::{open_image, OpenOptions};
use diskstream_block::node::BlockNode;
use diskstream_nbd::client::{
    register_url_opener, Address, ClientOptions, NbdClient, OpenerConfig, ZeroFlags,
};
use diskstream_nbd::server::{Export, Listener, Server, ServerConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const KIB: u64 = 1024;

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn init() {
    init_log();
    register_url_opener(OpenerConfig::default());
}

async fn open_rw(path: &Path) -> Arc<dyn BlockNode> {
    open_image(
        path,
        &OpenOptions {
            read_only: false,
            format: Some(Format::Qcow2),
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Guest contents of an image through its chain (`qemu-img convert -O raw`).
fn export_raw(path: &Path) -> Vec<u8> {
    let out = PathBuf::from(format!("{}.raw", path.display()));
    run_ok("qemu-img", &["convert", "-O", "raw", &s(path), &s(&out)]);
    let v = std::fs::read(&out).expect("read export");
    let _ = std::fs::remove_file(&out);
    v
}

fn create(path: &Path, size: u64, opts: &str, backing: Option<&Path>) {
    let mut a: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
    if let Some(b) = backing {
        a.extend(["-b".into(), s(b), "-F".into(), "qcow2".into()]);
    }
    a.extend(["-o".into(), opts.into(), s(path), size.to_string()]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    run_ok("qemu-img", &a);
}

fn check_clean(path: &Path) {
    run_ok("qemu-img", &["check", &s(path)]);
}

/// `qemu-img map --output=json` extents.
fn map(path: &Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut a = vec!["map", "--output=json"];
    a.extend_from_slice(extra);
    let p = s(path);
    a.push(&p);
    parse_map(&run_ok("qemu-img", &a))
}

/// One chain layout: per layer (size, qemu-io commands), bottom first; qcow2 options.
struct Layout {
    name: &'static str,
    opts: &'static str,
    cluster: u64,
    layers: [(u64, &'static [&'static str]); 3],
    granularity: u64,
}

const LAYOUTS: &[Layout] = &[
    Layout {
        name: "64k clusters, layers 3M+512 / 4M-512 / 4M+1536",
        opts: "cluster_size=65536",
        cluster: 65536,
        layers: [
            (
                3 * MIB + 512,
                &["write -P 0x11 0 2M", "write -P 0x12 3M 512"],
            ),
            (
                4 * MIB - 512,
                &[
                    "write -P 0x21 1M 512k",
                    "write -z 1536k 128k",
                    "write -P 0x22 2101248 102400",
                ],
            ),
            (4 * MIB + 1536, &["write -P 0x31 64k 64k"]),
        ],
        granularity: 256 * KIB,
    },
    Layout {
        name: "tiny: 1 B / 65535 B / 65537 B",
        opts: "cluster_size=65536",
        cluster: 65536,
        layers: [
            (1, &["write -P 0x41 0 512"]),
            (65535, &["write -P 0x42 1024 1000"]),
            (65537, &[]),
        ],
        granularity: 64 * KIB,
    },
    Layout {
        name: "extended L2, 511 B base",
        opts: "cluster_size=65536,extended_l2=on",
        cluster: 65536,
        layers: [
            (511, &["write -P 0x51 0 512"]),
            (
                2 * MIB + 65537,
                &["write -P 0x52 4096 1M", "write -z 1M 2048"],
            ),
            (3 * MIB + 1, &["write -P 0x53 70000 3000"]),
        ],
        granularity: MIB,
    },
    // Odd sizes of the top image itself (the device the client sees; qcow2 rounds a size up
    // to whole sectors, so 1 B and 511 B become one 512 B sector, as in QEMU).
    Layout {
        name: "top 1 B over 2M+1 / 511 B",
        opts: "cluster_size=65536",
        cluster: 65536,
        layers: [
            (2 * MIB + 1, &["write -P 0x61 0 1M"]),
            (511, &["write -P 0x62 0 511"]),
            (1, &[]),
        ],
        granularity: 64 * KIB,
    },
    Layout {
        name: "top 511 B over 65537 B / 1 B",
        opts: "cluster_size=65536",
        cluster: 65536,
        layers: [
            (65537, &["write -P 0x71 0 65537"]),
            (1, &["write -P 0x72 100 7"]),
            (511, &[]),
        ],
        granularity: 64 * KIB,
    },
    Layout {
        name: "top cluster-1 sector over cluster+1 / 1M, 4k clusters",
        opts: "cluster_size=4096",
        cluster: 4096,
        layers: [
            (4097, &["write -P 0x81 0 4097"]),
            (MIB, &["write -P 0x82 1000 2000"]),
            (4096 - 512, &[]),
        ],
        granularity: 64 * KIB,
    },
];

fn build(dir: &Path, l: &Layout) -> PathBuf {
    let names = ["base.qcow2", "mid.qcow2", "top.qcow2"];
    let mut below: Option<PathBuf> = None;
    for (i, (size, cmds)) in l.layers.iter().enumerate() {
        let p = dir.join(names[i]);
        create(&p, *size, l.opts, below.as_deref());
        if !cmds.is_empty() {
            qemu_io(&p, "qcow2", cmds);
        }
        below = Some(p);
    }
    dir.join("top.qcow2")
}

/// Apply the server's trim semantics on a v3 qcow2 to the model: whole clusters inside the
/// range (a partial last cluster at the end of the image counts as whole) read as zeroes.
fn model_trim(model: &mut [u8], cs: u64, off: u64, len: u64) {
    let size = model.len() as u64;
    let end = off + len;
    let a = off.div_ceil(cs) * cs;
    let b = if end == size { size } else { end / cs * cs };
    if a < b {
        model[a as usize..b as usize].fill(0);
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Read,
    Write(u8),
    Zero,
    Trim,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_concurrent_io_through_an_nbd_export_with_copy_on_read() {
    init();
    for (li, l) in LAYOUTS.iter().enumerate() {
        let dir = tmpdir();
        let top_path = build(dir.path(), l);
        let mut model = export_raw(&top_path);
        let size = model.len() as u64;
        let top = open_rw(&top_path).await;
        let cor = CopyOnRead::new(
            top.clone(),
            None,
            CorConfig {
                granularity: l.granularity,
                readahead: 2,
                ..CorConfig::default()
            },
        )
        .expect("filter");
        let sock = dir.path().join("cor.sock");
        let server = Server::new(ServerConfig::new(vec![Export {
            name: String::new(),
            description: String::new(),
            backend: diskstream_block::BlockBackend::new(cor.clone()),
            read_only: false,
            allocation_depth: true,
            writethrough: false,
            max_connections: 4,
        }]))
        .expect("server");
        let listener = Listener::bind_unix(&sock).expect("listen");
        let srv = server.clone();
        let accept = tokio::spawn(async move { srv.serve(listener).await });
        let mut o = ClientOptions::new(Address::Unix(sock.clone()), "");
        o.connections = 2;
        let client = Arc::new(
            within(10, "connect", NbdClient::connect(o))
                .await
                .expect("connect"),
        );
        let cs = l.cluster;
        let mut rng = StdRng::seed_from_u64(li as u64 + 11);
        let lens = [1u64, 511, cs - 1, cs, cs + 1, 3 * cs + 7, 300_001];
        let mut ops_done = 0;
        // A thin first pass reads the odd fetch units through copy-on-read; the others are
        // left for the random phase to miss. Its first request reads unit 0 (backing data in
        // every layout), alone: on a tiny image a random write would otherwise allocate
        // everything before any read misses. (A unit entirely past the backing's end never
        // misses: the top reports it as zeroes, there is nothing to copy.)
        let unit = cor.unit();
        let units = size.div_ceil(unit);
        let thin: Vec<u64> = (1..units).step_by(2).collect();
        for &u in &thin {
            let (a, n) = (u * unit, unit.min(size - u * unit));
            let got = client.read(a, n as usize).await.expect("first read");
            assert!(
                got[..] == model[a as usize..(a + n) as usize],
                "{}: first read of unit {u} differs from the model",
                l.name
            );
        }
        cor.quiesce().await;
        let before = cor.stats();
        let a = 0;
        let n = (cs + 1).min(size);
        let got = client
            .read(a, n as usize)
            .await
            .expect("read a missing unit");
        assert!(
            got[..] == model[a as usize..(a + n) as usize],
            "{}: read of a missing unit differs from the model",
            l.name
        );
        // Tiny images fit few disjoint requests per batch: run batches until enough
        // requests were made.
        let mut batch = 0usize;
        while ops_done <= 1000 && batch < 20_000 {
            batch += 1;
            // Up to 8 ops on pairwise disjoint ranges run concurrently; reads are checked
            // against the model as it was before the batch.
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            let mut tasks = Vec::new();
            for k in 0..8 {
                let len = lens[rng.random_range(0..lens.len())].min(size);
                let off = rng.random_range(0..=size - len);
                if ranges.iter().any(|&(a, b)| off < b && a < off + len) {
                    continue;
                }
                ranges.push((off, off + len));
                let op = match rng.random_range(0..10) {
                    0..=4 => Op::Read,
                    5 | 6 => Op::Write((batch * 8 + k) as u8 | 1),
                    7 | 8 => Op::Zero,
                    _ => Op::Trim,
                };
                let expect = model[off as usize..(off + len) as usize].to_vec();
                match op {
                    Op::Read => {}
                    Op::Write(b) => model[off as usize..(off + len) as usize].fill(b),
                    Op::Zero => model[off as usize..(off + len) as usize].fill(0),
                    Op::Trim => model_trim(&mut model, cs, off, len),
                }
                let c = client.clone();
                tasks.push(tokio::spawn(async move {
                    match op {
                        Op::Read => {
                            let got = c.read(off, len as usize).await.expect("read");
                            if got != expect {
                                let i = got.iter().zip(&expect).position(|(a, b)| a != b);
                                panic!("read {off}+{len}: first difference at {i:?}");
                            }
                        }
                        Op::Write(b) => c
                            .write(off, vec![b; len as usize], false)
                            .await
                            .expect("write"),
                        Op::Zero => c
                            .write_zeroes(
                                off,
                                len,
                                ZeroFlags {
                                    may_trim: true,
                                    ..ZeroFlags::default()
                                },
                            )
                            .await
                            .expect("write zeroes"),
                        Op::Trim => c.trim(off, len, false).await.expect("trim"),
                    }
                }));
            }
            for t in tasks {
                within(30, l.name, t).await.expect(l.name);
                ops_done += 1;
            }
        }
        // Tiny devices leave room for few disjoint ops per batch.
        assert!(ops_done > 1000, "{}: {ops_done} ops", l.name);
        let all = client.read(0, size as usize).await.expect("read all");
        assert!(all == model, "{}: final contents differ", l.name);
        client.flush().await.expect("flush");
        client.close();
        drop(client);
        server.shutdown();
        let _ = accept.await;
        within(10, "drain", server.wait_idle()).await;
        cor.close().await.expect("close filter");
        let st = cor.stats();
        assert!(
            st.misses > before.misses
                && st.fetches > before.fetches
                && st.bytes_copied + st.bytes_zeroed > before.bytes_copied + before.bytes_zeroed,
            "{}: the random phase never missed: {before:?} then {st:?}",
            l.name
        );
        // Several units were left: random reads, not only the first one, missed.
        if units - thin.len() as u64 >= 4 {
            assert!(st.misses > before.misses + 1, "{}: {st:?}", l.name);
        }
        assert_eq!(st.fetch_errors + st.populate_errors, 0, "{st:?}");
        top.close().await.expect("close top");
        check_clean(&top_path);
        let m = dir.path().join("model.raw");
        std::fs::write(&m, &model).expect("write model");
        run_ok(
            "qemu-img",
            &["compare", "-f", "qcow2", "-F", "raw", &s(&top_path), &s(&m)],
        );
    }
}

/// A qcow2 overlay whose backing file is an NBD export (qemu-nbd serving a qcow2 chain as raw
/// guest data): a full read through the filter makes the overlay self-contained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_on_read_over_a_qemu_nbd_backing() {
    init();
    let dir = tmpdir();
    let mid = build(dir.path(), &LAYOUTS[0]); // base <- mid <- top; serve "top" as the backing
    let expected = export_raw(&mid);
    let sock = dir.path().join("qnbd.sock");
    let _srv = qemu_nbd(
        dir.path(),
        "qnbd",
        &["-r", "-t", "-f", "qcow2", "-k", &s(&sock), &s(&mid)],
    );
    let url = unix_url(&sock, "");
    let top_path = dir.path().join("overlay.qcow2");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            &url,
            "-F",
            "raw",
            &s(&top_path),
            &expected.len().to_string(),
        ],
    );
    let top = open_rw(&top_path).await;
    let cor = CopyOnRead::new(top.clone(), None, CorConfig::default()).expect("filter");
    let node: Arc<dyn BlockNode> = cor.clone();
    let size = node.size();
    let mut got = vec![0u8; size as usize];
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(100_000);
        within(
            10,
            "read",
            node.read(pos, &mut got[pos as usize..(pos + n) as usize]),
        )
        .await
        .expect("read over NBD backing");
        pos += n;
    }
    assert!(got == expected, "contents differ");
    cor.close().await.expect("close");
    let st = cor.stats();
    assert_eq!(
        st.backing_reads,
        size.div_ceil(cor.unit()),
        "one backing read per unit: {st:?}"
    );
    top.close().await.expect("close top");
    // qemu-nbd serves one client at a time: the backing connection must be gone (dropped
    // with the last reference to the chain) before qemu-img can open the overlay.
    drop(node);
    drop(cor);
    drop(top);
    check_clean(&top_path);
    for e in map(&top_path, &[]) {
        assert_eq!(e["depth"], 0, "{e}");
    }
    let m = dir.path().join("model.raw");
    std::fs::write(&m, &expected).expect("model");
    run_ok("qemu-img", &["compare", "-F", "raw", &s(&top_path), &s(&m)]);
}

/// Read requests nbdkit's log filter recorded.
fn logged_reads(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" Read id=") && l.ends_with("..."))
        .count()
}

/// Sequential 64 KiB reads of 16 MiB from a backing behind nbdkit's delay filter: the backing
/// sees one request per guest read with 64 KiB units, one per fetch unit with larger units,
/// and read-ahead keeps it at one per unit while fetching ahead. A re-read sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_units_and_readahead_reduce_requests_to_a_slow_nbd_backing() {
    init();
    let total = 16 * MIB;
    for (gran, ra, want) in [
        (64 * KIB, 0, 256),
        (MIB, 0, 16),
        (MIB, 4, 16),
        (4 * MIB, 2, 4),
    ] {
        let dir = tmpdir();
        let raw = dir.path().join("base.raw");
        std::fs::write(&raw, pattern(gran + u64::from(ra), total as usize)).expect("base");
        let sock = dir.path().join("k.sock");
        let log = dir.path().join("reads.log");
        let _srv = nbdkit(
            dir.path(),
            "kit",
            &[
                "-U",
                &s(&sock),
                "--filter=log",
                "--filter=delay",
                "file",
                &s(&raw),
                "delay-read=2ms",
                &format!("logfile={}", s(&log)),
            ],
        );
        let top_path = dir.path().join("top.qcow2");
        run_ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-u",
                "-b",
                &unix_url(&sock, ""),
                "-F",
                "raw",
                &s(&top_path),
                &total.to_string(),
            ],
        );
        let top = open_rw(&top_path).await;
        let cor = CopyOnRead::new(
            top.clone(),
            None,
            CorConfig {
                granularity: gran,
                readahead: ra,
                ..CorConfig::default()
            },
        )
        .expect("filter");
        let expected = std::fs::read(&raw).expect("base");
        let mut b = vec![0u8; 64 * KIB as usize];
        for i in 0..total / (64 * KIB) {
            let off = i * 64 * KIB;
            within(10, "read", cor.read(off, &mut b))
                .await
                .expect("read");
            assert!(
                b == expected[off as usize..(off + 64 * KIB) as usize],
                "read {i}"
            );
        }
        cor.quiesce().await;
        let first = logged_reads(&log);
        let st = cor.stats();
        assert_eq!(first, want, "unit {gran}, read-ahead {ra}: {st:?}");
        assert_eq!(st.backing_reads as usize, first, "{st:?}");
        if ra > 0 {
            assert!(st.readahead_fetches > 0, "{st:?}");
        }
        for i in 0..total / (64 * KIB) {
            cor.read(i * 64 * KIB, &mut b).await.expect("re-read");
        }
        assert_eq!(logged_reads(&log), first, "re-reads are local");
        cor.close().await.expect("close");
        top.close().await.expect("close top");
        check_clean(&top_path);
        eprintln!("unit {gran} read-ahead {ra}: {first} backing requests; {st}");
    }
}

/// nbdkit's error filter fails every read while a trigger file exists: the reader gets EIO,
/// the top gains nothing; once the backing recovers, the same reads succeed and populate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backing_errors_over_nbd_reach_the_reader_and_nothing_lands() {
    init();
    let dir = tmpdir();
    let size = 4 * MIB;
    let raw = dir.path().join("base.raw");
    let data = pattern(3, size as usize);
    std::fs::write(&raw, &data).expect("base");
    let trigger = dir.path().join("fail-now");
    std::fs::write(&trigger, b"").expect("trigger");
    let sock = dir.path().join("e.sock");
    let _srv = nbdkit(
        dir.path(),
        "err",
        &[
            "-U",
            &s(&sock),
            "--filter=error",
            "file",
            &s(&raw),
            "error-pread=EIO",
            "error-pread-rate=1",
            &format!("error-pread-file={}", s(&trigger)),
        ],
    );
    let top_path = dir.path().join("top.qcow2");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            &unix_url(&sock, ""),
            "-F",
            "raw",
            &s(&top_path),
            &size.to_string(),
        ],
    );
    let top = open_rw(&top_path).await;
    let cor = CopyOnRead::new(
        top.clone(),
        None,
        CorConfig {
            granularity: 256 * KIB,
            readahead: 4,
            ..CorConfig::default()
        },
    )
    .expect("filter");
    let mut b = vec![0u8; 100_000];
    for off in [0u64, 100_000, 200_000, MIB + 1] {
        let e = within(10, "failing read", cor.read(off, &mut b))
            .await
            .expect_err("read must fail");
        assert_eq!(e.errno(), 5, "{e}");
    }
    cor.quiesce().await;
    let st = cor.stats();
    assert!(st.fetch_errors >= 4, "{st:?}");
    assert_eq!(st.bytes_copied + st.bytes_zeroed, 0, "{st:?}");
    top.flush().await.expect("flush");
    // Nothing is allocated in the top (the backing is not opened: its reads fail).
    for e in map(&top_path, &["-U"]) {
        assert_ne!(e["depth"], 0, "{e}");
    }
    std::fs::remove_file(&trigger).expect("recover");
    for off in [0u64, MIB + 1, 3 * MIB] {
        within(10, "read", cor.read(off, &mut b))
            .await
            .expect("read after recovery");
        assert!(b == data[off as usize..off as usize + b.len()]);
    }
    cor.close().await.expect("close");
    top.close().await.expect("close top");
    check_clean(&top_path);
}
