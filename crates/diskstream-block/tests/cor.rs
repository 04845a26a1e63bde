//! The copy-on-read filter at the block-layer API, over chains built by qemu-img/qemu-io:
//! a full read leaves the top self-contained (everything at depth 0, `qemu-img check` clean,
//! contents equal to the chain's); `bottom` limits what is copied; concurrent reads of one unit
//! read the backing once; read-ahead turns sequential small reads into one backing read per
//! unit; guest reads never wait behind read-ahead; guest writes always win against copies and
//! later reads never see data planned before a write; a caller scribbling on its read buffer
//! (guest RAM mapped twice) cannot change what lands in the image; read-only and raw tops turn
//! copy-on-read off; backing errors surface as EIO and leave nothing in the top.
//!
//! The backing is wrapped in a probe that counts the filter's backing requests and can delay,
//! hold or fail them, so every assertion on request counts is exact, never timed.

mod common;

use async_trait::async_trait;
use common::*;
use diskstream_block::filter::cor::{CopyOnRead, CorConfig};
use diskstream_block::format::qcow2::Qcow2;
use diskstream_block::node::{Allocation, BlockNode, LayerStatus};
use diskstream_block::protocol::Protocol;
use diskstream_block::{BlockError, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// A backing node that counts reads and can delay, hold (per range) or fail them.
struct Probe {
    inner: Arc<dyn BlockNode>,
    reads: AtomicU64,
    bytes: AtomicU64,
    delay_ms: AtomicU64,
    fail: AtomicBool,
    held: Mutex<Vec<(u64, u64)>>,
    released: Notify,
}

impl Probe {
    fn new(inner: Arc<dyn BlockNode>) -> Arc<Probe> {
        Arc::new(Probe {
            inner,
            reads: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            delay_ms: AtomicU64::new(0),
            fail: AtomicBool::new(false),
            held: Mutex::new(Vec::new()),
            released: Notify::new(),
        })
    }
    fn reads(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }
    fn hold(&self, a: u64, b: u64) {
        self.held.lock().unwrap().push((a, b));
    }
    fn release(&self) {
        self.held.lock().unwrap().clear();
        self.released.notify_waiters();
    }
}

#[async_trait]
impl BlockNode for Probe {
    fn format_name(&self) -> &'static str {
        self.inner.format_name()
    }
    fn filename(&self) -> &str {
        self.inner.filename()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        true
    }
    fn backing(&self) -> Option<Arc<dyn BlockNode>> {
        self.inner.backing()
    }
    fn cluster_size(&self) -> Option<u64> {
        self.inner.cluster_size()
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.bytes.fetch_add(buf.len() as u64, Ordering::SeqCst);
        loop {
            let wait = self.released.notified();
            tokio::pin!(wait);
            wait.as_mut().enable();
            let end = offset + buf.len() as u64;
            let held = self
                .held
                .lock()
                .unwrap()
                .iter()
                .any(|&(a, b)| offset < b && a < end);
            if !held {
                break;
            }
            wait.await;
        }
        let d = self.delay_ms.load(Ordering::SeqCst);
        if d > 0 {
            tokio::time::sleep(Duration::from_millis(d)).await;
        }
        if self.fail.load(Ordering::SeqCst) {
            return Err(BlockError::io(
                "injected backing failure",
                std::io::Error::from_raw_os_error(5),
            ));
        }
        self.inner.read(offset, buf).await
    }
    async fn write(&self, _: u64, _: &[u8]) -> Result<()> {
        Err(BlockError::ReadOnly("probe".into()))
    }
    async fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<()> {
        Err(BlockError::ReadOnly("probe".into()))
    }
    async fn discard(&self, _: u64, _: u64) -> Result<()> {
        Err(BlockError::ReadOnly("probe".into()))
    }
    async fn flush(&self) -> Result<()> {
        Ok(())
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<LayerStatus> {
        self.inner.block_status(offset, len).await
    }
    async fn truncate(&self, _: u64) -> Result<()> {
        Err(BlockError::ReadOnly("probe".into()))
    }
    async fn close(&self) -> Result<()> {
        Ok(())
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Replace the top's backing node by a probe around it.
fn probe_backing(top: &Arc<dyn BlockNode>) -> Arc<Probe> {
    let probe = Probe::new(top.backing().expect("top has a backing file"));
    top.as_any()
        .downcast_ref::<Qcow2>()
        .expect("qcow2 top")
        .set_backing_node(Some(probe.clone() as Arc<dyn BlockNode>));
    probe
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// base ← mid ← top with qemu-img/qemu-io: layers of different (odd) sizes, data in every
/// layer, zero clusters in mid over base data, unaligned writes, holes everywhere else.
/// `opts` are extra qcow2 creation options for all three layers.
fn chain3(dir: &Path, opts: &str) -> PathBuf {
    let base = dir.join("base.qcow2");
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    qemu_create_qcow2(&base, 3 * MIB + 512, opts, None);
    qemu_io(
        &base,
        "qcow2",
        &["write -P 0x11 0 2M", "write -P 0x12 3M 512"],
    );
    qemu_create_qcow2(&mid, 4 * MIB - 512, opts, Some((&base, "qcow2")));
    qemu_io(
        &mid,
        "qcow2",
        &[
            "write -P 0x21 1M 512k",
            "write -z 1536k 128k",
            "write -P 0x22 2101248 102400",
        ],
    );
    qemu_create_qcow2(&top, 4 * MIB + 1536, opts, Some((&mid, "qcow2")));
    qemu_io(
        &top,
        "qcow2",
        &["write -P 0x31 64k 64k", "write -P 0x32 3146728 5000"],
    );
    top
}

fn cfg(granularity: u64, readahead: u32) -> CorConfig {
    CorConfig {
        granularity,
        readahead,
        ..CorConfig::default()
    }
}

/// Extents of `qemu-img map --output=json`.
fn map_of(path: &Path) -> Vec<Value> {
    qemu_map(path, "qcow2")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn field(e: &Value, k: &str) -> u64 {
    e[k].as_u64().unwrap_or_else(|| panic!("{k} in {e}"))
}

/// Depth of every 512-byte sector in a map (u32::MAX for "not present").
fn depths(map: &[Value], size: u64) -> Vec<u32> {
    let mut v = vec![u32::MAX; size.div_ceil(512) as usize];
    for e in map {
        let (start, len) = (field(e, "start"), field(e, "length"));
        let d = if e["present"].as_bool() == Some(true) {
            field(e, "depth") as u32
        } else {
            u32::MAX
        };
        for sct in start / 512..(start + len).div_ceil(512) {
            v[sct as usize] = d;
        }
    }
    v
}

async fn within<T>(secs: u64, what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {secs} s"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_read_makes_the_top_self_contained() {
    for (opts, gran) in [
        ("cluster_size=65536", 256 * KIB),
        ("cluster_size=65536,extended_l2=on", 64 * KIB),
        ("cluster_size=4096", 4 * KIB),
        ("cluster_size=65536,compat=0.10", MIB),
    ] {
        let dir = tmpdir();
        let top_path = chain3(dir.path(), opts);
        let expected = qemu_export_raw(&top_path, "qcow2");
        let top = open_qcow2(&top_path, false).await;
        let probe = probe_backing(&top);
        let cor = CopyOnRead::new(top.clone(), None, cfg(gran, 2)).expect("filter");
        assert!(cor.is_active(), "{opts}");
        let node: Arc<dyn BlockNode> = cor.clone();
        // Concurrent readers with odd sizes and unaligned offsets cover the whole device.
        let size = node.size();
        let mut tasks = Vec::new();
        for (i, chunk) in [(0u64, 100_003u64), (1, 511), (2, 65_537)] {
            let node = node.clone();
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                let mut pos = i * 7_777 % size;
                let mut total = 0;
                loop {
                    let n = chunk.min(size - pos);
                    let mut b = vec![0u8; n as usize];
                    node.read(pos, &mut b).await.expect("cor read");
                    out.push((pos, b));
                    pos = (pos + n) % size;
                    total += n;
                    if total >= size || (chunk == 511 && out.len() > 400) {
                        return out;
                    }
                }
            }));
        }
        for t in tasks {
            for (pos, b) in t.await.expect("reader") {
                let at = pos as usize;
                assert_bytes_eq(&b, &expected[at..at + b.len()], &format!("{opts} @{pos}"));
            }
        }
        cor.quiesce().await;
        let st = cor.stats();
        assert!(st.misses > 0 && st.bytes_copied > 0, "{opts}: {st:?}");
        // mid's zero clusters (1536k..1664k) and the chain's holes read as zeroes.
        assert!(st.bytes_zeroed >= 128 * KIB, "{opts}: {st:?}");
        assert_eq!(st.fetch_errors + st.populate_errors, 0, "{opts}: {st:?}");
        assert_eq!(st.backing_reads, probe.reads(), "{opts}: counted reads");
        // A second full read is local: no backing request at all.
        let before = probe.reads();
        let hits = st.hits;
        let again = read_all(&node, 300_000).await;
        assert_bytes_eq(&again, &expected, opts);
        assert_eq!(probe.reads(), before, "{opts}: re-read went to the backing");
        assert!(cor.stats().hits >= hits + size.div_ceil(300_000), "{opts}");
        // Nothing is left for a stream: the top allocates every byte.
        let mut pos = 0;
        while pos < size {
            let st = top.block_status(pos, size - pos).await.expect("status");
            assert_ne!(
                st.alloc,
                Allocation::Unallocated,
                "{opts}: {pos}+{}",
                st.len
            );
            pos += st.len;
        }
        cor.close().await.expect("close filter");
        top.close().await.expect("close top");
        assert_check_clean(&top_path);
        let map = map_of(&top_path);
        for e in &map {
            assert_eq!(e["depth"], 0, "{opts}: {e}");
            assert_eq!(e["present"], true, "{opts}: {e}");
        }
        // All-zero backing data became zero clusters, not zero-filled data (v3; v2 has no
        // zero clusters).
        if !opts.contains("compat=0.10") {
            let zero_at = |off: u64| {
                map.iter().any(|e| {
                    let (s, n) = (field(e, "start"), field(e, "length"));
                    (s..s + n).contains(&off) && e["zero"] == true && e["data"] == false
                })
            };
            for off in [1536 * KIB, 1664 * KIB - 1, 3584 * KIB] {
                assert!(zero_at(off), "{opts}: {off} is not a zero cluster: {map:?}");
            }
        }
        let model = dir.path().join("model.raw");
        write_file(&model, &expected);
        assert_compare(&top_path, "qcow2", &model, "raw");
    }
}

/// With extended L2 the allocation unit is a subcluster (2 KiB of a 64 KiB cluster): a 1-byte
/// read with the smallest fetch unit reads and copies exactly that subcluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_read_with_extended_l2_copies_one_subcluster() {
    let dir = tmpdir();
    let base = dir.path().join("base.qcow2");
    let top_path = dir.path().join("top.qcow2");
    qemu_create_qcow2(&base, MIB, "", None);
    qemu_io(&base, "qcow2", &["write -P 0x5a 0 1M"]);
    qemu_create_qcow2(
        &top_path,
        MIB,
        "cluster_size=65536,extended_l2=on",
        Some((&base, "qcow2")),
    );
    let top = open_qcow2(&top_path, false).await;
    let probe = probe_backing(&top);
    let cor = CopyOnRead::new(top.clone(), None, cfg(512, 0)).expect("cor");
    assert_eq!(cor.unit(), 2048);
    let mut b = [0u8; 1];
    cor.read(100_000, &mut b).await.expect("read");
    assert_eq!(b[0], 0x5a);
    cor.quiesce().await;
    let st = cor.stats();
    assert_eq!(
        (st.bytes_copied, st.backing_bytes, probe.reads()),
        (2048, 2048, 1),
        "{st:?}"
    );
    cor.close().await.expect("close");
    top.close().await.expect("close top");
    assert_check_clean(&top_path);
    let local: Vec<(u64, u64)> = map_of(&top_path)
        .iter()
        .filter(|e| e["depth"] == 0 && e["present"] == true)
        .map(|e| (field(e, "start"), field(e, "length")))
        .collect();
    assert_eq!(local, vec![(100_000 / 2048 * 2048, 2048)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bottom_limits_copying_to_the_layers_above_it() {
    let dir = tmpdir();
    let top_path = chain3(dir.path(), "cluster_size=65536");
    let expected = qemu_export_raw(&top_path, "qcow2");
    let size = expected.len() as u64;
    let before = depths(&map_of(&top_path), size);
    let top = open_qcow2(&top_path, false).await;
    let mid = top.backing().expect("mid");
    let base = mid.backing().expect("base");
    // bottom must be in the chain.
    let e = CopyOnRead::new(mid.clone(), Some(top.clone()), CorConfig::default())
        .expect_err("bottom above the filtered node");
    assert!(e.to_string().contains("not in the backing chain"), "{e}");
    // bottom = the filtered node itself (QEMU's stream filter when nothing is streamed):
    // accepted, reads are exact and nothing is copied.
    let none = CopyOnRead::new(top.clone(), Some(top.clone()), cfg(128 * KIB, 1)).expect("cor");
    let none_node: Arc<dyn BlockNode> = none.clone();
    assert_bytes_eq(
        &read_all(&none_node, 70_001).await,
        &expected,
        "bottom = file",
    );
    none.close().await.expect("close");
    assert_eq!(none.stats().bytes_copied + none.stats().bytes_zeroed, 0);
    let cor = CopyOnRead::new(top.clone(), Some(mid.clone()), cfg(128 * KIB, 1)).expect("cor");
    let node: Arc<dyn BlockNode> = cor.clone();
    assert_bytes_eq(&read_all(&node, 70_001).await, &expected, "through cor");
    cor.close().await.expect("close");
    drop(base);
    top.close().await.expect("close top");
    assert_check_clean(&top_path);
    let after = depths(&map_of(&top_path), size);
    for (i, (&b, &a)) in before.iter().zip(after.iter()).enumerate() {
        let want = if b <= 1 { 0 } else { b };
        assert_eq!(a, want, "sector {i}: depth before {b}, after {a}");
    }
    let model = dir.path().join("model.raw");
    write_file(&model, &expected);
    assert_compare(&top_path, "qcow2", &model, "raw");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_of_one_unit_fetch_it_once() {
    let dir = tmpdir();
    let top_path = chain3(dir.path(), "cluster_size=65536");
    let expected = qemu_export_raw(&top_path, "qcow2");
    let top = open_qcow2(&top_path, false).await;
    let probe = probe_backing(&top);
    probe.delay_ms.store(50, Ordering::SeqCst);
    let cor = CopyOnRead::new(top.clone(), None, cfg(MIB, 0)).expect("cor");
    // 16 readers of small pieces of unit 2 (2 MiB .. 3 MiB), all at once.
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let cor = cor.clone();
        tasks.push(tokio::spawn(async move {
            let off = 2 * MIB + i * 60_000 + 3;
            let mut b = vec![0u8; 4099];
            cor.read(off, &mut b).await.expect("read");
            (off, b)
        }));
    }
    for t in tasks {
        let (off, b) = t.await.expect("task");
        assert_bytes_eq(&b, &expected[off as usize..off as usize + b.len()], "piece");
    }
    cor.quiesce().await;
    let st = cor.stats();
    assert_eq!(probe.reads(), 1, "one backing read for the unit: {st:?}");
    assert_eq!((st.fetches, st.deduplicated), (1, 15), "{st:?}");
    cor.close().await.expect("close");
    top.close().await.expect("close top");
    assert_check_clean(&top_path);
}

/// Sequential 64 KiB reads over 8 MiB: with 1 MiB units and read-ahead the backing sees one
/// request per unit (8), with 64 KiB units and no read-ahead one per guest read (128).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_unit_and_readahead_cut_backing_requests() {
    for (gran, ra, want) in [(64 * KIB, 0, 128), (MIB, 4, 8), (MIB, 0, 8)] {
        let dir = tmpdir();
        let base = dir.path().join("base.qcow2");
        let top_path = dir.path().join("top.qcow2");
        qemu_create_qcow2(&base, 8 * MIB, "", None);
        qemu_io(&base, "qcow2", &["write -P 0x5a 0 8M"]);
        qemu_create_qcow2(&top_path, 8 * MIB, "", Some((&base, "qcow2")));
        let top = open_qcow2(&top_path, false).await;
        let probe = probe_backing(&top);
        probe.delay_ms.store(5, Ordering::SeqCst);
        let cor = CopyOnRead::new(top.clone(), None, cfg(gran, ra)).expect("cor");
        let mut b = vec![0u8; 64 * KIB as usize];
        for i in 0..128u64 {
            cor.read(i * 64 * KIB, &mut b).await.expect("read");
            assert!(b.iter().all(|&x| x == 0x5a), "read {i}");
        }
        cor.quiesce().await;
        let st = cor.stats();
        assert_eq!(probe.reads(), want, "unit {gran} read-ahead {ra}: {st:?}");
        if ra > 0 {
            assert!(st.readahead_fetches >= 4, "{st:?}");
        }
        assert_eq!(st.bytes_copied, 8 * MIB);
        cor.close().await.expect("close");
        top.close().await.expect("close top");
        assert_check_clean(&top_path);
    }
}

/// Read-ahead slots all stuck on a slow backing range: a guest read elsewhere still completes,
/// and one of a stuck unit waits only for that unit's own backing read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_reads_never_wait_behind_readahead() {
    let dir = tmpdir();
    let base = dir.path().join("base.qcow2");
    let top_path = dir.path().join("top.qcow2");
    qemu_create_qcow2(&base, 4 * MIB, "", None);
    qemu_io(&base, "qcow2", &["write -P 0x77 0 4M"]);
    qemu_create_qcow2(&top_path, 4 * MIB, "", Some((&base, "qcow2")));
    let top = open_qcow2(&top_path, false).await;
    let probe = probe_backing(&top);
    let cor = CopyOnRead::new(
        top.clone(),
        None,
        CorConfig {
            granularity: 64 * KIB,
            readahead: 8,
            max_background: 2,
        },
    )
    .expect("cor");
    probe.hold(128 * KIB, 256 * KIB); // units 2 and 3
    let mut b = vec![0u8; 4096];
    cor.read(0, &mut b).await.expect("read 0");
    cor.read(4096, &mut b)
        .await
        .expect("read 1: starts read-ahead of units 1..");
    // Units 2 and 3 (or 1 and 2) occupy both slots; unit 10 is read by the guest itself.
    within(5, "guest read beside stuck read-ahead", async {
        cor.read(10 * 64 * KIB + 5, &mut b)
            .await
            .expect("read unit 10")
    })
    .await;
    assert!(b.iter().all(|&x| x == 0x77));
    let reader = {
        let cor = cor.clone();
        tokio::spawn(async move {
            let mut b = vec![0u8; 100];
            cor.read(2 * 64 * KIB + 1, &mut b).await.map(|_| b)
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!reader.is_finished(), "the unit's backing read is held");
    probe.release();
    let b = within(5, "held read", reader)
        .await
        .expect("task")
        .expect("read");
    assert!(b.iter().all(|&x| x == 0x77));
    cor.close().await.expect("close");
    top.close().await.expect("close top");
    assert_check_clean(&top_path);
}

/// A write that completes while a unit is being fetched: a read issued afterwards that spans
/// the written cluster and still-missing ones must see the write, not the bounce buffer of the
/// fetch planned before it; the copy never overwrites the write. Both with the write through
/// the filter and straight on the top (a second export of the top, a job), which the filter
/// does not see: then the read joins the old fetch and must still take the written cluster
/// from the top.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_after_a_write_never_see_older_fetches() {
    for via_filter in [true, false] {
        reads_after_a_write(via_filter).await;
    }
}

async fn reads_after_a_write(via_filter: bool) {
    let dir = tmpdir();
    let base = dir.path().join("base.qcow2");
    let top_path = dir.path().join("top.qcow2");
    qemu_create_qcow2(&base, 2 * MIB, "", None);
    qemu_io(&base, "qcow2", &["write -P 0x11 0 2M"]);
    qemu_create_qcow2(&top_path, 2 * MIB, "", Some((&base, "qcow2")));
    let top = open_qcow2(&top_path, false).await;
    let probe = probe_backing(&top);
    let cor = CopyOnRead::new(top.clone(), None, cfg(MIB, 0)).expect("cor");
    probe.hold(0, MIB);
    let r1 = {
        let cor = cor.clone();
        tokio::spawn(async move {
            let mut b = vec![0u8; 4096];
            cor.read(0, &mut b).await.map(|_| b)
        })
    };
    within(5, "r1's fetch reaches the backing", async {
        while probe.reads() < 1 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    // The write neither waits for the fetch nor is undone by it.
    let w = vec![0xabu8; 64 * KIB as usize];
    let writer: &dyn BlockNode = if via_filter {
        cor.as_ref()
    } else {
        top.as_ref()
    };
    within(5, "write beside a fetch", writer.write(3 * 64 * KIB, &w))
        .await
        .expect("write");
    let r2 = {
        let cor = cor.clone();
        tokio::spawn(async move {
            let mut b = vec![0u8; 128 * KIB as usize];
            cor.read(3 * 64 * KIB, &mut b).await.map(|_| b)
        })
    };
    // Through the filter the write dropped r1's fetch, so r2 starts its own (held too);
    // straight on the top r2 joins r1's.
    within(5, "r2 waits for a fetch", async {
        while if via_filter {
            probe.reads() < 2
        } else {
            cor.stats().deduplicated < 1
        } {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    probe.release();
    let b1 = within(5, "r1", r1).await.expect("task").expect("r1");
    assert!(b1.iter().all(|&x| x == 0x11));
    let b2 = within(5, "r2", r2).await.expect("task").expect("r2");
    assert!(
        b2[..64 * KIB as usize].iter().all(|&x| x == 0xab),
        "r2 missed the write (via filter: {via_filter})"
    );
    assert!(b2[64 * KIB as usize..].iter().all(|&x| x == 0x11));
    assert_eq!(probe.reads(), if via_filter { 2 } else { 1 });
    cor.quiesce().await;
    let mut all = vec![0u8; 2 * MIB as usize];
    top.read(0, &mut all).await.expect("read top");
    for (i, &x) in all.iter().enumerate() {
        let want = if (3 * 64 * KIB..4 * 64 * KIB).contains(&(i as u64)) {
            0xab
        } else {
            0x11
        };
        assert_eq!(x, want, "byte {i}");
    }
    cor.close().await.expect("close");
    top.close().await.expect("close top");
    assert_check_clean(&top_path);
}

/// Random rounds of concurrent copy-on-read reads and guest writes/zeroes/discards on the same
/// units (backing slowed at random): after each round the device equals the model, i.e. no copy
/// ever overwrote guest data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_writes_always_win_against_copies() {
    for opts in ["cluster_size=65536", "cluster_size=65536,extended_l2=on"] {
        let dir = tmpdir();
        let top_path = chain3(dir.path(), opts);
        let mut model = qemu_export_raw(&top_path, "qcow2");
        let top = open_qcow2(&top_path, false).await;
        let probe = probe_backing(&top);
        let cor = CopyOnRead::new(top.clone(), None, cfg(256 * KIB, 2)).expect("cor");
        let size = model.len() as u64;
        let cs = 64 * KIB;
        let mut rng = StdRng::seed_from_u64(opts.len() as u64);
        for round in 0..60 {
            probe
                .delay_ms
                .store(rng.random_range(0..4), Ordering::SeqCst);
            let mut tasks = Vec::new();
            let mut written: Vec<(u64, u64)> = Vec::new();
            for k in 0..6 {
                let len = *[1u64, 511, cs - 1, cs, cs + 1, 3 * cs + 7]
                    .get(rng.random_range(0..6))
                    .unwrap_or(&1);
                let off = rng.random_range(0..size - len);
                let cor = cor.clone();
                if k % 2 == 0 {
                    tasks.push(tokio::spawn(async move {
                        let mut b = vec![0u8; len as usize];
                        cor.read(off, &mut b).await.expect("read");
                        None
                    }));
                    continue;
                }
                // Writes of one round never overlap each other (their order is undefined).
                if written
                    .iter()
                    .any(|&(a, b)| off < b + cs && a < off + len + cs)
                {
                    continue;
                }
                written.push((off, off + len));
                let kind = rng.random_range(0..4);
                let fill = (round * 7 + k) as u8 | 0x80;
                match kind {
                    0 | 1 => model[off as usize..(off + len) as usize].fill(fill),
                    2 => model[off as usize..(off + len) as usize].fill(0),
                    _ => apply_discard(&mut model, cs, true, None, off, len),
                }
                tasks.push(tokio::spawn(async move {
                    match kind {
                        0 | 1 => cor.write(off, &vec![fill; len as usize]).await,
                        2 => cor.write_zeroes(off, len, true).await,
                        _ => cor.discard(off, len).await,
                    }
                    .expect("write");
                    Some(())
                }));
            }
            for t in tasks {
                within(10, "round", t).await.expect("task");
            }
            cor.quiesce().await;
            // Check a random window each round and everything every 20 rounds.
            let (a, b) = if round % 20 == 19 {
                (0, size)
            } else {
                let a = rng.random_range(0..size - 1);
                (a, (a + 400_000).min(size))
            };
            let mut got = vec![0u8; (b - a) as usize];
            cor.read(a, &mut got).await.expect("check read");
            assert_bytes_eq(
                &got,
                &model[a as usize..b as usize],
                &format!("{opts} round {round}"),
            );
        }
        cor.close().await.expect("close");
        top.close().await.expect("close top");
        assert_check_clean(&top_path);
        let m = dir.path().join("model.raw");
        write_file(&m, &model);
        assert_compare(&top_path, "qcow2", &m, "raw");
    }
}

/// Guest RAM mapped twice (a memfd): the filter reads into one mapping while another thread
/// keeps scribbling on the same pages through the other. What lands in the image is the
/// backing's data, never the scribbles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scribbling_on_the_read_buffer_cannot_reach_the_image() {
    let dir = tmpdir();
    let base = dir.path().join("base.qcow2");
    let top_path = dir.path().join("top.qcow2");
    qemu_create_qcow2(&base, 4 * MIB, "", None);
    qemu_io(&base, "qcow2", &["write -P 0x3c 0 4M"]);
    qemu_create_qcow2(&top_path, 4 * MIB, "", Some((&base, "qcow2")));
    let top = open_qcow2(&top_path, false).await;
    let probe = probe_backing(&top);
    probe.delay_ms.store(20, Ordering::SeqCst);
    let cor = CopyOnRead::new(top.clone(), None, cfg(256 * KIB, 0)).expect("cor");

    let len = 4 * MIB as usize;
    // SAFETY: plain libc calls on a private memfd; both mappings live until the end of the
    // test and only bytes are written through them.
    let (a, b) = unsafe {
        let fd = libc::memfd_create(c"cor-guest-ram".as_ptr(), 0);
        assert!(fd >= 0, "memfd_create");
        assert_eq!(libc::ftruncate(fd, len as libc::off_t), 0);
        let map = || {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            p as usize
        };
        let m = (map(), map());
        libc::close(fd);
        m
    };
    let stop = Arc::new(AtomicBool::new(false));
    let scribbler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut passes = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for i in (0..len).step_by(256) {
                    // SAFETY: inside the second mapping of the memfd.
                    unsafe { std::ptr::write_volatile((b + i) as *mut u8, 0xee) };
                }
                passes += 1;
            }
            passes
        })
    };
    // SAFETY: the first mapping, `len` bytes, alive for the rest of the test. Another thread
    // changes the bytes behind it (as a guest does to its RAM): the filter must never read
    // them back.
    let guest_ram: &mut [u8] = unsafe { std::slice::from_raw_parts_mut(a as *mut u8, len) };
    for (off, n) in [
        (0usize, 4096usize),
        (300_000, 700_001),
        (MIB as usize, 3 * MIB as usize),
    ] {
        cor.read(off as u64, &mut guest_ram[off..off + n])
            .await
            .expect("read into guest RAM");
    }
    cor.quiesce().await;
    stop.store(true, Ordering::Relaxed);
    assert!(scribbler.join().expect("scribbler") > 0);
    cor.close().await.expect("close");
    // The top alone (no backing) must hold exactly the backing's bytes wherever it copied.
    let mut img = vec![0u8; len];
    top.read(0, &mut img).await.expect("read top");
    assert!(
        img.iter().all(|&x| x == 0x3c),
        "a scribble reached the image"
    );
    top.close().await.expect("close top");
    for e in map_of(&top_path) {
        assert_eq!(e["depth"], 0, "{e}");
    }
    assert_check_clean(&top_path);
    qemu_img(&["compare".to_string(), s(&top_path), s(&base)]);
    // SAFETY: unmapping the two mappings created above; nothing refers to them any more.
    unsafe {
        libc::munmap(a as *mut libc::c_void, len);
        libc::munmap(b as *mut libc::c_void, len);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backing_errors_surface_and_nothing_lands() {
    let dir = tmpdir();
    let top_path = chain3(dir.path(), "cluster_size=65536");
    let expected = qemu_export_raw(&top_path, "qcow2");
    let map_before = map_of(&top_path);
    let top = open_qcow2(&top_path, false).await;
    let probe = probe_backing(&top);
    // No read-ahead: it would (rightly) populate the tail past the backing's end as zeroes,
    // which needs no backing read.
    let cor = CopyOnRead::new(top.clone(), None, cfg(MIB, 0)).expect("cor");
    probe.fail.store(true, Ordering::SeqCst);
    for off in [0u64, MIB + 3, 2 * MIB + 65_536] {
        let mut b = vec![0u8; 70_000];
        let e = cor.read(off, &mut b).await.expect_err("read must fail");
        assert_eq!(e.errno(), 5, "{e}");
        assert!(e.to_string().contains("copy-on-read"), "{e}");
    }
    cor.quiesce().await;
    assert_eq!(cor.stats().fetch_errors, 3);
    assert_eq!(cor.stats().bytes_copied, 0);
    top.flush().await.expect("flush");
    assert_eq!(map_of(&top_path), map_before, "nothing landed in the top");
    // The backing recovers: the same reads succeed and populate.
    probe.fail.store(false, Ordering::SeqCst);
    let node: Arc<dyn BlockNode> = cor.clone();
    assert_bytes_eq(&read_all(&node, MIB).await, &expected, "after recovery");
    cor.close().await.expect("close");
    top.close().await.expect("close top");
    assert_check_clean(&top_path);
    for e in map_of(&top_path) {
        assert_eq!(e["depth"], 0, "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_and_raw_tops_turn_copy_on_read_off() {
    let dir = tmpdir();
    let top_path = chain3(dir.path(), "cluster_size=65536");
    let expected = qemu_export_raw(&top_path, "qcow2");
    let bytes_before = std::fs::read(&top_path).expect("read image file");
    let top = open_qcow2(&top_path, true).await;
    let cor = CopyOnRead::new(top.clone(), None, CorConfig::default()).expect("cor");
    assert!(!cor.is_active());
    let why = cor.off_reason().expect("off").to_string();
    assert!(why.contains("read-only"), "{why}");
    let st = cor.stats();
    assert!(!st.active && st.off_reason.is_some());
    let node: Arc<dyn BlockNode> = cor.clone();
    assert_bytes_eq(&read_all(&node, 99_999).await, &expected, "read-only");
    cor.close().await.expect("close");
    top.close().await.expect("close top");
    assert_eq!(
        std::fs::read(&top_path).expect("read image file"),
        bytes_before,
        "a read-only image was written"
    );

    let raw = dir.path().join("disk.raw");
    write_file(&raw, &expected);
    let node = diskstream_block::image::open_image(
        &raw,
        &diskstream_block::image::OpenOptions {
            read_only: false,
            format: Some(diskstream_block::format::Format::Raw),
            ..Default::default()
        },
    )
    .await
    .expect("open raw");
    let cor = CopyOnRead::new(node.clone(), None, CorConfig::default()).expect("cor");
    let why = cor.off_reason().expect("off for raw").to_string();
    assert!(why.contains("raw") && why.contains("qcow2"), "{why}");
    let mut b = vec![0u8; 1000];
    cor.read(5, &mut b).await.expect("read raw");
    assert_eq!(b, expected[5..1005]);
    cor.close().await.expect("close");
    node.close().await.expect("close raw");

    let bad = CorConfig {
        granularity: 3000,
        ..CorConfig::default()
    };
    let top = open_qcow2(&top_path, false).await;
    let e = CopyOnRead::new(top.clone(), None, bad).expect_err("bad granularity");
    assert!(e.to_string().contains("power of two"), "{e}");
    top.close().await.expect("close top");
}

/// Copy-on-read into a QED top (created by qemu-img over a qcow2 chain): a full read makes
/// it self-contained, `qemu-img check` accepts it and its map shows every byte at depth 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qed_tops_are_populated_too() {
    let dir = tmpdir();
    let base = dir.path().join("base.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &s(&base), "5000000"],
    );
    qemu_io(
        &base,
        "qcow2",
        &[
            "write -P 0x61 0 1M",
            "write -P 0x62 3M 65537",
            "write -z 1536k 64k",
        ],
    );
    let top_path = dir.path().join("top.qed");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qed",
            "-b",
            &s(&base),
            "-F",
            "qcow2",
            &s(&top_path),
        ],
    );
    qemu_io(&top_path, "qed", &["write -P 0x63 2M 4k"]);
    let expected = qemu_export_raw(&top_path, "qed");
    let top = diskstream_block::image::open_image(
        &top_path,
        &diskstream_block::image::OpenOptions {
            format: Some(diskstream_block::format::Format::Qed),
            read_only: false,
            ..Default::default()
        },
    )
    .await
    .expect("open qed");
    let cor = CopyOnRead::new(top.clone(), None, cfg(256 * KIB, 2)).expect("filter");
    assert!(cor.is_active(), "{:?}", cor.off_reason());
    let node: Arc<dyn BlockNode> = cor.clone();
    let got = read_all(&node, 77_777).await;
    assert_bytes_eq(&got, &expected, "qed");
    cor.close().await.expect("close filter");
    assert!(cor.stats().bytes_copied > 0, "{:?}", cor.stats());
    top.close().await.expect("close top");
    let (code, _, desc) = qemu_check(&top_path, "qed");
    assert_eq!(code, 0, "qemu-img check: {desc}");
    for e in qemu_map(&top_path, "qed")
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        assert_eq!(e["depth"], 0, "{e}");
    }
    let model = dir.path().join("model.raw");
    write_file(&model, &expected);
    assert_compare(&top_path, "qed", &model, "raw");
}

/// The top's file, wrapped: counts `data_status` (`SEEK_DATA`) calls and copy-free reads, and
/// can hold writes of 1 MiB or more.
struct TopFile {
    inner: diskstream_block::protocol::file::FileProtocol,
    data_status: AtomicU64,
    read_appends: AtomicU64,
    hold: AtomicBool,
    held_writes: AtomicU64,
    released: Notify,
    /// Writes of 1 MiB or more that completed, and that count at each flush of the file.
    big_writes_done: AtomicU64,
    big_writes_at_flush: Mutex<Vec<u64>>,
}

impl TopFile {
    fn new(path: &Path, hold: bool) -> TopFile {
        TopFile {
            inner: diskstream_block::protocol::file::FileProtocol::open(path, false)
                .expect("open top file"),
            data_status: AtomicU64::new(0),
            read_appends: AtomicU64::new(0),
            hold: AtomicBool::new(hold),
            held_writes: AtomicU64::new(0),
            released: Notify::new(),
            big_writes_done: AtomicU64::new(0),
            big_writes_at_flush: Mutex::new(Vec::new()),
        }
    }

    fn wrote(&self, len: usize) {
        if len >= MIB as usize {
            self.big_writes_done.fetch_add(1, Ordering::SeqCst);
        }
    }

    async fn gate(&self, len: usize) {
        if len < MIB as usize {
            return;
        }
        loop {
            let wait = self.released.notified();
            tokio::pin!(wait);
            wait.as_mut().enable();
            if !self.hold.load(Ordering::SeqCst) {
                return;
            }
            self.held_writes.fetch_add(1, Ordering::SeqCst);
            wait.await;
        }
    }
}

#[async_trait]
impl Protocol for TopFile {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    async fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.inner.read_vec(offset, len).await
    }
    async fn read_append(&self, offset: u64, buf: Vec<u8>, len: usize) -> Result<Vec<u8>> {
        self.read_appends.fetch_add(1, Ordering::SeqCst);
        self.inner.read_append(offset, buf, len).await
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read_at(offset, buf).await
    }
    async fn write_vec(&self, offset: u64, data: Vec<u8>) -> Result<()> {
        let n = data.len();
        self.gate(n).await;
        self.inner.write_vec(offset, data).await?;
        self.wrote(n);
        Ok(())
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.gate(data.len()).await;
        self.inner.write_at(offset, data).await?;
        self.wrote(data.len());
        Ok(())
    }
    async fn write_gather(
        &self,
        offset: u64,
        buf: Vec<u8>,
        ranges: Vec<std::ops::Range<usize>>,
        zero_tail: usize,
    ) -> Result<Vec<u8>> {
        let n = ranges.iter().map(|r| r.len()).sum::<usize>() + zero_tail;
        self.gate(n).await;
        let r = self
            .inner
            .write_gather(offset, buf, ranges, zero_tail)
            .await?;
        self.wrote(n);
        Ok(r)
    }
    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.gate(len as usize).await;
        self.inner.write_zeroes(offset, len, unmap).await
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.discard(offset, len).await
    }
    async fn flush(&self) -> Result<()> {
        let done = self.big_writes_done.load(Ordering::SeqCst);
        self.big_writes_at_flush
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(done);
        self.inner.flush().await
    }
    async fn len(&self) -> Result<u64> {
        self.inner.len().await
    }
    async fn allocated_bytes(&self) -> Result<Option<u64>> {
        self.inner.allocated_bytes().await
    }
    async fn set_len(&self, len: u64) -> Result<()> {
        self.inner.set_len(len).await
    }
    async fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.allocate(offset, len).await
    }
    async fn data_status(&self, offset: u64, len: u64) -> Result<(bool, u64)> {
        self.data_status.fetch_add(1, Ordering::SeqCst);
        self.inner.data_status(offset, len).await
    }
}

/// The top's first block status comes while one of its own cluster allocations is in flight
/// (refcounted, data not written yet) below the end of the file (a later allocation already
/// landed), as copy-on-read with read-ahead keeps many: the image must not be taken for
/// metadata-preallocated, or every later block status on data asks the file with `SEEK_DATA`.
/// After a full read with read-ahead, a re-read of the whole device asks the file nothing, and
/// the filter serves appending reads (the NBD server's copy-free path) with the top's own
/// appending read, which a qcow2 top hands to the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rereads_do_not_ask_the_file_for_holes() {
    let dir = tmpdir();
    let base = dir.path().join("base.qcow2");
    let top_path = dir.path().join("top.qcow2");
    qemu_create_qcow2(&base, 8 * MIB, "", None);
    qemu_io(&base, "qcow2", &["write -P 0x5a 0 8M"]);
    qemu_create_qcow2(&top_path, 8 * MIB, "", Some((&base, "qcow2")));
    qemu_io(&top_path, "qcow2", &["write -P 0x33 7M 64k"]);
    let file = Arc::new(TopFile::new(&top_path, true));
    let q = Qcow2::open(file.clone()).await.expect("open top");
    q.set_backing_node(Some(open_qcow2(&base, true).await));
    let top: Arc<dyn BlockNode> = Arc::new(q);
    // A 1 MiB guest write on the top itself, stuck after its allocation.
    let writer = {
        let top = top.clone();
        tokio::spawn(async move { top.write(0, &vec![0x44u8; MIB as usize]).await })
    };
    within(5, "write reaches the file", async {
        while file.held_writes.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    // A later, small allocation lands past it and extends the file over the held clusters.
    top.write(2 * MIB, &vec![0x45u8; 64 * KIB as usize])
        .await
        .expect("small write");
    let cor = CopyOnRead::new(top.clone(), None, cfg(MIB, 4)).expect("cor");
    let node: Arc<dyn BlockNode> = cor.clone();
    let mut b = vec![0u8; 64 * KIB as usize];
    node.read(7 * MIB, &mut b).await.expect("first read");
    assert!(b.iter().all(|&x| x == 0x33));
    file.hold.store(false, Ordering::SeqCst);
    file.released.notify_waiters();
    within(5, "held write", writer)
        .await
        .expect("task")
        .expect("write");
    let mut expected = vec![0x5au8; 8 * MIB as usize];
    expected[..MIB as usize].fill(0x44);
    expected[2 * MIB as usize..(2 * MIB + 64 * KIB) as usize].fill(0x45);
    expected[7 * MIB as usize..(7 * MIB + 64 * KIB) as usize].fill(0x33);
    assert_bytes_eq(&read_all(&node, 64 * KIB).await, &expected, "first pass");
    cor.quiesce().await;
    assert!(cor.stats().readahead_fetches > 0, "{:?}", cor.stats());
    file.data_status.store(0, Ordering::SeqCst);
    assert_bytes_eq(&read_all(&node, 64 * KIB).await, &expected, "re-read");
    assert_eq!(
        file.data_status.load(Ordering::SeqCst),
        0,
        "re-reads asked the file for holes"
    );
    let (hits, appends) = (cor.stats().hits, file.read_appends.load(Ordering::SeqCst));
    let mut all = Vec::new();
    let chunks = 8 * MIB / (64 * KIB);
    for i in 0..chunks {
        all = node
            .read_append(i * 64 * KIB, all, 64 * KIB as usize)
            .await
            .expect("appending re-read");
    }
    assert_bytes_eq(&all, &expected, "appending re-read");
    assert_eq!(cor.stats().hits, hits + chunks, "{:?}", cor.stats());
    assert_eq!(
        file.read_appends.load(Ordering::SeqCst),
        appends + chunks,
        "each hit is one copy-free read of the file"
    );
    cor.close().await.expect("close");
    top.close().await.expect("close top");
    assert_check_clean(&top_path);
}

/// A flush through the filter covers the copies of reads that completed before it: the read
/// returns as soon as its unit's backing data is in the bounce buffer, and the copy into the
/// top (held here at the top's file) is still in flight when the guest flushes; the flush
/// waits for it, so the file is flushed only after the copy's data write, and the unit is in
/// the top once the flush returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_waits_for_copies_in_flight() {
    let dir = tmpdir();
    let base = dir.path().join("base.qcow2");
    let top_path = dir.path().join("top.qcow2");
    qemu_create_qcow2(&base, 4 * MIB, "", None);
    qemu_io(&base, "qcow2", &["write -P 0x5a 0 4M"]);
    qemu_create_qcow2(&top_path, 4 * MIB, "", Some((&base, "qcow2")));
    let file = Arc::new(TopFile::new(&top_path, true));
    let q = Qcow2::open(file.clone()).await.expect("open top");
    q.set_backing_node(Some(open_qcow2(&base, true).await));
    let top: Arc<dyn BlockNode> = Arc::new(q);
    let cor = CopyOnRead::new(top.clone(), None, cfg(MIB, 0)).expect("cor");
    let node: Arc<dyn BlockNode> = cor.clone();
    let mut b = vec![0u8; 4096];
    within(10, "read", node.read(MIB + 512, &mut b))
        .await
        .expect("read");
    assert!(b.iter().all(|&x| x == 0x5a));
    // The read is answered; its unit's copy is stuck at the file.
    within(10, "copy reaches the file", async {
        while file.held_writes.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    let flush = {
        let node = node.clone();
        tokio::spawn(async move { node.flush().await })
    };
    // Give a flush that does not wait every chance to reach the file first.
    tokio::time::sleep(Duration::from_millis(100)).await;
    file.hold.store(false, Ordering::SeqCst);
    file.released.notify_waiters();
    within(10, "flush", flush)
        .await
        .expect("task")
        .expect("flush");
    let at_flush = file
        .big_writes_at_flush
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    assert!(
        !at_flush.is_empty() && at_flush.iter().all(|&n| n >= 1),
        "the file was flushed before the copy's data write landed: {at_flush:?}"
    );
    assert_ne!(
        top.block_status(MIB, MIB).await.expect("status").alloc,
        Allocation::Unallocated,
        "the copied unit is not in the top after the flush"
    );
    cor.close().await.expect("close");
    top.close().await.expect("close top");
    assert_check_clean(&top_path);
}
