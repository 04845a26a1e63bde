//! `BlockNode::write_owned` (the copy-free write of bulk copies: mirror, commit, the NBD
//! server's WRITE) leaves exactly what `write` leaves: over qcow2 layouts that take each write
//! path (allocated clusters, fresh whole-cluster runs with nothing to copy around them, partial
//! clusters that copy on write from a backing file, extended-L2 subclusters) and over raw, the
//! same writes through both calls give images `qemu-img compare` finds identical, that match a
//! byte model and pass `qemu-img check`, and the buffer comes back unchanged for reuse.

mod common;

use common::*;
use diskstream_block::format::Format;
use diskstream_block::image::{open_image, OpenOptions};
use diskstream_block::node::BlockNode;
use std::path::Path;
use std::sync::Arc;

const SIZE: u64 = 8 << 20;

/// (offset, length) of the writes: aligned multi-cluster runs, single clusters, unaligned
/// pieces, one crossing an L2 boundary of small clusters, rewrites of allocated data.
fn writes(cs: u64) -> Vec<(u64, u64)> {
    vec![
        (0, 4 * cs),
        (8 * cs, cs),
        (16 * cs + 512, 3 * cs),
        (40 * cs + 100, 1),
        (0, 2 * cs),
        (SIZE - 3 * cs, 3 * cs),
        (SIZE / 2 - cs / 2, 2 * cs + 4096),
        (8 * cs + 4096, 8192),
        (1 << 20, 1 << 20),
    ]
}

async fn open(path: &Path, format: Format) -> Arc<dyn BlockNode> {
    open_image(
        path,
        &OpenOptions {
            format: Some(format),
            read_only: false,
            ..Default::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Apply the writes through `write` to `a` and through `write_owned` to `b`; both must then
/// read as `model` (which starts as the backing's contents).
async fn compare_paths(a: &Path, b: &Path, format: Format, cs: u64, mut model: Vec<u8>) {
    let (na, nb) = (open(a, format).await, open(b, format).await);
    for (i, (off, len)) in writes(cs).into_iter().enumerate() {
        let len = len.min(SIZE - off);
        let data = pattern(i as u64 + 7, len as usize);
        na.write(off, &data)
            .await
            .unwrap_or_else(|e| panic!("write {off}+{len}: {e}"));
        let back = nb
            .write_owned(off, data.clone())
            .await
            .unwrap_or_else(|e| panic!("write_owned {off}+{len}: {e}"));
        assert_eq!(
            back, data,
            "write_owned must hand the buffer back unchanged"
        );
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
    for n in [&na, &nb] {
        n.flush().await.expect("flush");
        assert_bytes_eq(&read_all(n, 1 << 20).await, &model, n.filename());
        n.close().await.expect("close");
    }
}

#[tokio::test]
async fn owned_writes_equal_borrowed_writes_on_qcow2() {
    let dir = tmpdir();
    for (opts, cs) in [
        ("cluster_size=65536", 65536u64),
        ("cluster_size=4096", 4096),
        ("cluster_size=65536,extended_l2=on", 65536),
        ("compat=0.10,cluster_size=65536", 65536),
    ] {
        let base = p(&dir, "base.raw");
        let backing = pattern(99, SIZE as usize / 2);
        write_file(&base, &backing);
        let mut model = backing.clone();
        model.resize(SIZE as usize, 0);
        for with_backing in [false, true] {
            let (a, b) = (p(&dir, "a.qcow2"), p(&dir, "b.qcow2"));
            for img in [&a, &b] {
                let _ = std::fs::remove_file(img);
                qemu_create_qcow2(img, SIZE, opts, with_backing.then_some((&base, "raw")));
            }
            let start = if with_backing {
                model.clone()
            } else {
                vec![0; SIZE as usize]
            };
            compare_paths(&a, &b, Format::Qcow2, cs, start).await;
            assert_check_clean(&a);
            assert_check_clean(&b);
            assert_compare(&a, "qcow2", &b, "qcow2");
        }
    }
}

#[tokio::test]
async fn owned_writes_equal_borrowed_writes_on_raw() {
    let dir = tmpdir();
    let (a, b) = (p(&dir, "a.raw"), p(&dir, "b.raw"));
    qemu_create_raw(&a, SIZE);
    qemu_create_raw(&b, SIZE);
    compare_paths(&a, &b, Format::Raw, 65536, vec![0; SIZE as usize]).await;
    assert_compare(&a, "raw", &b, "raw");
}
