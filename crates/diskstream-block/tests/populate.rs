//! Copy-on-read population (`write_if_unallocated` / `zero_if_unallocated`) racing guest
//! writes on the same clusters: whatever the interleaving, the newest guest data wins and the
//! copy never overwrites it; `qemu-img check` stays clean.

mod common;

use common::*;
use diskstream_block::format::qcow2::create::CreateOptions;
use diskstream_block::node::BlockNode;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;

async fn chain(dir: &std::path::Path, cluster: u64, extended_l2: bool) -> Arc<dyn BlockNode> {
    let size = 4 * MIB;
    let base = dir.join("base.qcow2");
    our_create(
        &base,
        &CreateOptions {
            size,
            cluster_size: cluster,
            ..Default::default()
        },
    )
    .await;
    let b = open_qcow2(&base, false).await;
    b.write(0, &pattern(7, size as usize))
        .await
        .expect("fill base");
    b.close().await.expect("close base");
    let top = dir.join("top.qcow2");
    our_create(
        &top,
        &CreateOptions {
            size,
            cluster_size: cluster,
            extended_l2,
            backing_file: Some("base.qcow2".into()),
            backing_fmt: Some("qcow2".into()),
            ..Default::default()
        },
    )
    .await;
    open_qcow2(&top, false).await
}

async fn race(cluster: u64, extended_l2: bool, seed: u64) {
    let dir = tmpdir();
    let top = chain(dir.path(), cluster, extended_l2).await;
    let size = top.size();
    let mut model = pattern(7, size as usize);
    let mut rng = StdRng::seed_from_u64(seed);
    for round in 0..150 {
        // One copy of a cluster-aligned range and one guest write inside it, concurrently.
        let clusters = size / cluster;
        let c0 = rng.random_range(0..clusters);
        let n = rng.random_range(1..=4.min(clusters - c0));
        let (off, len) = (c0 * cluster, n * cluster);
        let g_off = off + rng.random_range(0..len);
        let g_len = rng.random_range(1..=(off + len - g_off).min(3 * cluster / 2));
        let data = pattern(1000 + round, g_len as usize);
        let zero_copy = rng.random_bool(0.2);
        let mut copy = vec![0u8; len as usize];
        top.backing()
            .expect("backing")
            .read(off, &mut copy)
            .await
            .expect("read backing");
        let (t1, t2) = (Arc::clone(&top), Arc::clone(&top));
        let guest_first = rng.random_bool(0.5);
        let copier = async move {
            if zero_copy {
                // A zero extent of the chain (pretend): only unallocated parts become zero.
                t1.zero_if_unallocated(off, len).await
            } else {
                t1.write_if_unallocated(off, &copy).await
            }
        };
        let d2 = data.clone();
        let guest = async move { t2.write(g_off, &d2).await };
        let (a, b) = if guest_first {
            let g = tokio::spawn(guest);
            let c = tokio::spawn(copier);
            (c.await, g.await)
        } else {
            let c = tokio::spawn(copier);
            let g = tokio::spawn(guest);
            (c.await, g.await)
        };
        a.expect("join").expect("copy");
        b.expect("join").expect("guest write");
        // The model: the guest write always survives; the rest of the range is either the
        // copied backing data or (zero copy) zeroes -- but only where the copy landed, which
        // the model cannot know for zero copies; so zero copies are checked for the guest
        // bytes only and then normalised.
        model[g_off as usize..(g_off + g_len) as usize].copy_from_slice(&data);
        let mut got = vec![0u8; len as usize];
        top.read(off, &mut got).await.expect("read top");
        let g0 = (g_off - off) as usize;
        assert_bytes_eq(
            &got[g0..g0 + g_len as usize],
            &data,
            &format!("round {round}: guest data at {g_off}+{g_len} (copy at {off}+{len})"),
        );
        if zero_copy {
            model[off as usize..(off + len) as usize].copy_from_slice(&got);
        } else {
            assert_bytes_eq(
                &got,
                &model[off as usize..(off + len) as usize],
                &format!("round {round}: range {off}+{len}"),
            );
        }
    }
    let all = read_all(&top, MIB).await;
    assert_bytes_eq(&all, &model, "whole image");
    top.close().await.expect("close");
    assert_check_clean(&dir.path().join("top.qcow2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn population_never_clobbers_guest_writes() {
    race(65536, false, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn population_never_clobbers_guest_writes_small_clusters() {
    race(4096, false, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn population_never_clobbers_guest_writes_extended_l2() {
    race(65536, true, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn population_skips_allocated_and_counts_written() {
    let dir = tmpdir();
    let top = chain(dir.path(), 65536, false).await;
    top.write(65536, &[9u8; 100]).await.expect("guest write");
    let copy = vec![1u8; 4 * 65536];
    let n = top.write_if_unallocated(0, &copy).await.expect("populate");
    assert_eq!(n, 3 * 65536, "the allocated cluster is skipped");
    let mut b = vec![0u8; 100];
    top.read(65536, &mut b).await.expect("read");
    assert_eq!(b, vec![9u8; 100]);
    let z = top.zero_if_unallocated(0, 8 * 65536).await.expect("zero");
    assert_eq!(z, 4 * 65536, "only the four untouched clusters become zero");
    top.close().await.expect("close");
    assert_check_clean(&dir.path().join("top.qcow2"));
}

/// The owned form (bulk copies: stream) behaves like the borrowed one and hands the buffer
/// back unchanged: allocated clusters skipped, the rest written from the buffer as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owned_population_skips_allocated_and_returns_the_buffer() {
    let dir = tmpdir();
    let top = chain(dir.path(), 65536, false).await;
    top.write(2 * 65536 + 5, &[9u8; 100])
        .await
        .expect("guest write");
    let copy = pattern(11, 6 * 65536);
    let (n, back) = top
        .write_if_unallocated_owned(0, copy.clone())
        .await
        .expect("populate");
    assert_eq!(n, 5 * 65536, "the allocated cluster is skipped");
    assert!(back == copy, "the buffer comes back as it was");
    let mut got = vec![0u8; 6 * 65536];
    top.read(0, &mut got).await.expect("read");
    let mut want = copy.clone();
    let base = pattern(7, (4 * MIB) as usize);
    want[2 * 65536..3 * 65536].copy_from_slice(&base[2 * 65536..3 * 65536]);
    want[2 * 65536 + 5..2 * 65536 + 105].copy_from_slice(&[9u8; 100]);
    assert!(
        got == want,
        "copied clusters hold the buffer, the guest's cluster its own data"
    );
    top.close().await.expect("close");
    assert_check_clean(&dir.path().join("top.qcow2"));
}
