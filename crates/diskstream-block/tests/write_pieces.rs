//! `Qcow2::write_pieces` (the batched write of bulk copies) leaves the very same file as the
//! same pieces written one by one with `BlockNode::write`: same allocations in the same order,
//! same bytes, on fresh images and over every kind of existing cluster (allocated in place,
//! zero, shared with an internal snapshot, compressed), with pieces that need the single-write
//! path (partial clusters, extended L2) mixed in; the result passes `qemu-img check` and reads
//! back what was written.

mod common;

use common::*;
use diskstream_block::format::qcow2::create::CreateOptions;
use diskstream_block::format::qcow2::Qcow2;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Pieces (guest offset, length) for a batch over an image of `size` bytes with clusters of
/// `cs`, and the buffer holding their data back to back.
fn batch(seed: u64, spec: &[(u64, u64)]) -> (Vec<u8>, Vec<(u64, Range<usize>)>) {
    let total: u64 = spec.iter().map(|s| s.1).sum();
    let buf = pattern(seed, total as usize);
    let mut at = 0usize;
    let pieces = spec
        .iter()
        .map(|&(off, len)| {
            let r = at..at + len as usize;
            at += len as usize;
            (off, r)
        })
        .collect();
    (buf, pieces)
}

/// Prepare `path` (already created) with existing content through qemu-io.
fn prepare(path: &Path, cmds: &[&str]) {
    if !cmds.is_empty() {
        qemu_io(path, "qcow2", cmds);
    }
}

async fn check_case(what: &str, opts: &CreateOptions, setup: &[&str], spec: &[(u64, u64)]) {
    let dir = tmpdir();
    let (a, b) = (p(&dir, "batch.qcow2"), p(&dir, "single.qcow2"));
    for f in [&a, &b] {
        our_create(f, opts).await;
        prepare(f, setup);
    }
    let (buf, pieces) = batch(5, spec);
    // Batched.
    let node = open_qcow2(&a, false).await;
    let q = node.as_any().downcast_ref::<Qcow2>().expect("a qcow2 node");
    let calls = AtomicUsize::new(0);
    let cb = || {
        calls.fetch_add(1, Ordering::SeqCst);
    };
    let back = q
        .write_pieces(buf.clone(), &pieces, Some(&cb))
        .await
        .unwrap_or_else(|e| panic!("{what}: write_pieces: {e}"));
    assert_eq!(back, buf, "{what}: the buffer comes back unchanged");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "{what}: allocated() once");
    let got = read_all(&node, 1 << 20).await;
    node.close().await.expect("close");
    // One by one.
    let node = open_qcow2(&b, false).await;
    for (off, r) in &pieces {
        node.write(*off, &buf[r.clone()]).await.expect("write");
    }
    let want = read_all(&node, 1 << 20).await;
    node.close().await.expect("close");
    assert_bytes_eq(&got, &want, what);
    for (off, r) in &pieces {
        assert_bytes_eq(
            &got[*off as usize..*off as usize + r.len()],
            &buf[r.clone()],
            &format!("{what}: piece at {off}"),
        );
    }
    assert_check_clean(&a);
    assert_bytes_eq(&read(&a), &read(&b), &format!("{what}: file bytes"));
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("read image file")
}

#[tokio::test]
async fn batched_writes_equal_single_writes() {
    let k = 1024u64;
    let opts = |size: u64, cs: u64| CreateOptions {
        size,
        cluster_size: cs,
        ..Default::default()
    };
    // Fresh image, pieces with holes between them, crossing an L2 table (512-byte clusters:
    // 64 entries per table) and needing new refcount blocks.
    let holes: Vec<(u64, u64)> = (0..200).map(|i| (i * 1536, 1024)).collect();
    check_case("fresh 512-byte clusters", &opts(1 << 20, 512), &[], &holes).await;
    // 64 KiB clusters: data around every existing kind of cluster.
    let setup = [
        "write -P 1 0 256k",    // allocated, written in place
        "write -z 256k 128k",   // zero clusters
        "write -P 2 1M 64k",    // allocated
        "write -P 3 1600k 64k", // allocated
    ];
    let spec = [
        (64 * k, 128 * k),  // in place
        (192 * k, 192 * k), // in place + zero clusters
        (512 * k, 64 * k),  // fresh
        (704 * k, 384 * k), // fresh, then allocated 1M, then fresh
        (1600 * k, 64 * k), // in place
        (2 << 20, 4 * k),   // partial cluster: single-write path
        (3 << 20, 64 * k),
    ];
    check_case(
        "64k clusters over existing data",
        &opts(4 << 20, 65536),
        &setup,
        &spec,
    )
    .await;
    // The image ends inside its last cluster.
    let size = (1 << 20) + 3584;
    check_case(
        "partial last cluster",
        &opts(size, 65536),
        &["write -P 7 0 64k"],
        &[(0, 64 * k), (960 * k, size - 960 * k)],
    )
    .await;
    // Extended L2 always takes the single-write path.
    let ext = CreateOptions {
        extended_l2: true,
        ..opts(2 << 20, 65536)
    };
    check_case(
        "extended L2",
        &ext,
        &["write -P 4 0 8k"],
        &[(0, 128 * k), (1 << 20, 64 * k)],
    )
    .await;
}

/// Clusters shared with an internal snapshot (refcount 2, not COPIED) and compressed clusters
/// are replaced by new ones, as single writes do, and the old ones keep the snapshot intact.
#[tokio::test]
async fn batched_writes_over_snapshot_and_compressed_clusters() {
    let dir = tmpdir();
    let src = p(&dir, "src.raw");
    write_file(&src, &pattern(3, 1 << 20));
    let base = p(&dir, "base.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-O",
        "qcow2",
        src.to_str().unwrap(),
        base.to_str().unwrap(),
    ]);
    qemu_img(&["snapshot", "-c", "s1", base.to_str().unwrap()]);
    let (a, b) = (p(&dir, "a.qcow2"), p(&dir, "b.qcow2"));
    std::fs::copy(&base, &a).unwrap();
    std::fs::copy(&base, &b).unwrap();
    let (buf, pieces) = batch(9, &[(0, 128 << 10), (512 << 10, 256 << 10)]);
    let node = open_qcow2(&a, false).await;
    let q = node.as_any().downcast_ref::<Qcow2>().unwrap();
    q.write_pieces(buf.clone(), &pieces, None).await.unwrap();
    node.close().await.unwrap();
    let node = open_qcow2(&b, false).await;
    for (off, r) in &pieces {
        node.write(*off, &buf[r.clone()]).await.unwrap();
    }
    node.close().await.unwrap();
    assert_bytes_eq(&read(&a), &read(&b), "file bytes");
    assert_check_clean(&a);
    // The snapshot still holds the original data.
    let snap = p(&dir, "snap.raw");
    qemu_img(&[
        "convert",
        "-q",
        "-l",
        "s1",
        "-O",
        "raw",
        a.to_str().unwrap(),
        snap.to_str().unwrap(),
    ]);
    assert_bytes_eq(&read(&snap), &pattern(3, 1 << 20), "snapshot contents");
}

/// Invalid batches are refused before anything is written.
#[tokio::test]
async fn bad_batches_are_refused() {
    let dir = tmpdir();
    let a = p(&dir, "a.qcow2");
    our_create(
        &a,
        &CreateOptions {
            size: 1 << 20,
            ..Default::default()
        },
    )
    .await;
    let before = read(&a);
    let node = open_qcow2(&a, false).await;
    let q = node.as_any().downcast_ref::<Qcow2>().unwrap();
    let buf = vec![1u8; 128 << 10];
    for pieces in [
        vec![(65536, 0..65536), (0, 65536..131072)], // descending
        vec![(0, 0..65536), (32768, 0..65536)],      // overlapping
        vec![(0, 0..262144)],                        // past the buffer
        vec![(1 << 20, 0..65536)],                   // past the image end
    ] {
        assert!(q.write_pieces(buf.clone(), &pieces, None).await.is_err());
    }
    node.close().await.unwrap();
    assert_eq!(read(&a), before);
}
