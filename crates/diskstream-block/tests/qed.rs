//! The QED driver against QEMU 10 (`qemu-img`, `qemu-io`) as the oracle.
//!
//! * Images QEMU writes (cluster and table sizes, zero clusters, raw/qcow2/QED backing files,
//!   writes crossing L2 tables) read identically through us and map identically.
//! * The same write sequence through qemu-io and through us gives byte-identical files.
//! * Images we write pass `qemu-img check` and `qemu-img compare` with a raw model.
//! * The need-check flag: set while allocations are not yet flushed, cleared by a flush or a
//!   clean close; a crashed image (ours or QEMU's) is checked and repaired on read-write open.
//! * Consistency check and repair count exactly what `qemu-img check` counts.
//! * Copy-on-read population never clobbers guest writes.
//! * A seeded random operation sequence on a QED chain matches a byte model.
//! * Malformed headers give clear errors, never a panic.

mod common;

use common::*;
use diskstream_block::format::qed::create::{create as qed_create, CreateOptions};
use diskstream_block::format::qed::Qed;
use diskstream_block::format::Format;
use diskstream_block::image::{open_image, OpenOptions};
use diskstream_block::node::BlockNode;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;

async fn open_qed(path: &Path, read_only: bool) -> Arc<dyn BlockNode> {
    open_image(
        path,
        &OpenOptions {
            read_only,
            format: Some(Format::Qed),
            ..Default::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn qemu_create_qed(path: &Path, size: u64, opts: &str, backing: Option<(&str, &str)>) {
    let mut args: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "qed".into()];
    if let Some((b, f)) = backing {
        args.extend(["-b".into(), b.into(), "-F".into(), f.into()]);
    }
    if !opts.is_empty() {
        args.extend(["-o".into(), opts.into()]);
    }
    args.extend([path.display().to_string(), size.to_string()]);
    qemu_img(&args);
}

/// `qemu-img check` must be clean (exit 0, no leaks or corruptions).
fn assert_qed_clean(path: &Path) {
    let (code, v, desc) = qemu_check(path, "qed");
    let field = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    if code != 0 || field("leaks") != 0 || field("corruptions") != 0 || field("check-errors") != 0 {
        panic!("qemu-img check is not clean:\n{desc}");
    }
}

fn features_on_disk(path: &Path) -> u64 {
    let b = std::fs::read(path).expect("read image");
    u64::from_le_bytes(b[16..24].try_into().expect("8 bytes"))
}

/// Offsets for a test layout in an image of `size` bytes: one crossing the first L2 table's
/// end (when the image is larger than one table maps) and one in a later table.
fn far_offsets(cs: u64, span: u64, size: u64) -> (u64, u64) {
    if 2 * span + MIB < size {
        (span - cs / 2, 2 * span + 512)
    } else {
        (size / 2 - cs / 2, size - 4096 + 512)
    }
}

/// Writes through qemu-io of a test layout (patterns, zero clusters, unaligned writes, a
/// write crossing an L2 table, zeroing of allocated data).
fn qemu_io_script(cs: u64, span: u64, size: u64) -> Vec<String> {
    let (cross, far) = far_offsets(cs, span, size);
    vec![
        "write -P 0x11 0 100k".to_string(),
        format!("write -P 0x22 {} 3000", cs + 700),
        format!("write -z {} {}", 4 * cs, 2 * cs),
        format!("write -P 0x33 {cross} {cs}"),
        format!("write -z {} 4096", 9 * cs),
        format!("write -P 0x44 {far} 512"),
        "write -z 0 4096".to_string(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_written_images_read_and_map_identically() {
    let mut cases = Cases::default();
    for (cs, ts) in [(4096u64, 2u64), (65536, 4), (16384, 1)] {
        for backing in ["none", "raw", "qcow2", "qed"] {
            if ts == 1 && backing != "none" {
                continue;
            }
            cases
                .run(&format!("cs={cs} ts={ts} backing={backing}"), async move {
                    let dir = tmpdir();
                    let span = cs * ts * cs / 8;
                    let size = (3 * span).clamp(8 * MIB, 256 * MIB);
                    let top = p(&dir, "top.qed");
                    let bk = match backing {
                        "none" => None,
                        "raw" => {
                            let b = p(&dir, "base.raw");
                            write_file(&b, &pattern(5, (size / 2) as usize));
                            Some(("base.raw", "raw"))
                        }
                        "qcow2" => {
                            let b = p(&dir, "base.qcow2");
                            qemu_create_qcow2(&b, size, "", None);
                            qemu_io(&b, "qcow2", &["write -P 0x55 0 1M", "write -P 0x66 5M 1M"]);
                            Some(("base.qcow2", "qcow2"))
                        }
                        _ => {
                            let b = p(&dir, "base.qed");
                            qemu_create_qed(&b, size, "cluster_size=4096", None);
                            qemu_io(&b, "qed", &["write -P 0x77 0 2M"]);
                            Some(("base.qed", "qed"))
                        }
                    };
                    qemu_create_qed(
                        &top,
                        size,
                        &format!("cluster_size={cs},table_size={ts}"),
                        bk,
                    );
                    if ts == 1 {
                        // qemu-io cannot open table_size=1 images (QEMU 10 rejects their
                        // tables): we write it and compare with a model instead.
                        let node = open_qed(&top, false).await;
                        let mut model = vec![0u8; size as usize];
                        let (cross, far) = far_offsets(cs, span, size);
                        for (i, off) in [0, cs + 700, cross, far - 2560].iter().enumerate() {
                            let d = pattern(i as u64, 3000);
                            node.write(*off, &d).await.expect("write");
                            model[*off as usize..*off as usize + 3000].copy_from_slice(&d);
                        }
                        node.close().await.expect("close");
                        let node = open_qed(&top, true).await;
                        assert_bytes_eq(&read_all(&node, MIB).await, &model, "table_size=1");
                        return;
                    }
                    let script = qemu_io_script(cs, span, size);
                    let cmds: Vec<&str> = script.iter().map(String::as_str).collect();
                    qemu_io(&top, "qed", &cmds);
                    let node = open_qed(&top, true).await;
                    let ours = read_all(&node, 3 * MIB / 2).await;
                    assert_bytes_eq(&ours, &qemu_export_raw(&top, "qed"), "contents");
                    assert_maps_equal(&our_map(&node).await, &qemu_map(&top, "qed"), "map");
                })
                .await;
        }
    }
    cases.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_writes_give_the_same_file_as_qemu() {
    let mut cases = Cases::default();
    for (cs, ts, backed) in [
        (65536u64, 4u64, false),
        (4096, 2, true),
        (65536, 1 << 1, true),
    ] {
        cases
            .run(&format!("cs={cs} ts={ts} backed={backed}"), async move {
                let dir = tmpdir();
                let span = cs * ts * cs / 8;
                let size = (3 * span).clamp(8 * MIB, 64 * MIB);
                let base = p(&dir, "base.raw");
                write_file(&base, &pattern(9, size as usize));
                let bk = backed.then_some(("base.raw", "raw"));
                let (theirs, ours) = (p(&dir, "theirs.qed"), p(&dir, "ours.qed"));
                qemu_create_qed(
                    &theirs,
                    size,
                    &format!("cluster_size={cs},table_size={ts}"),
                    bk,
                );
                qed_create(
                    &ours,
                    &CreateOptions {
                        size,
                        cluster_size: cs,
                        table_size: ts,
                        backing_file: bk.map(|b| b.0.to_string()),
                        backing_fmt: bk.map(|b| b.1.to_string()),
                    },
                )
                .await
                .expect("create");
                assert_eq!(
                    std::fs::read(&ours).expect("read"),
                    std::fs::read(&theirs).expect("read"),
                    "fresh images differ"
                );
                // Writes only: partial writes into zero clusters of a backed image differ on
                // purpose (QEMU fills them from the backing file).
                let (cross, far) = far_offsets(cs, span, size);
                let ops: Vec<(u64, u64, u8)> = vec![
                    (0, 100 * 1024, 0x11),
                    (cs + 700, 3000, 0x22),
                    (cross, cs, 0x33),
                    (far, 512, 0x44),
                    (5 * cs, 3 * cs, 0x55),
                    (10, 20, 0x66),
                ];
                let mut script = Vec::new();
                let node = open_qed(&ours, false).await;
                for (off, len, pat) in &ops {
                    script.push(format!("write -P {pat} {off} {len}"));
                    node.write(*off, &vec![*pat; *len as usize])
                        .await
                        .expect("write");
                }
                // Zeroing: whole clusters (unallocated ones become zero clusters, allocated
                // ones are zeroed in place).
                script.push(format!("write -z {} {}", 12 * cs, 2 * cs));
                node.write_zeroes(12 * cs, 2 * cs, false)
                    .await
                    .expect("zero");
                script.push(format!("write -z 0 {cs}"));
                node.write_zeroes(0, cs, false).await.expect("zero");
                node.close().await.expect("close");
                let cmds: Vec<&str> = script.iter().map(String::as_str).collect();
                qemu_io(&theirs, "qed", &cmds);
                let (a, b) = (
                    std::fs::read(&ours).expect("read"),
                    std::fs::read(&theirs).expect("read"),
                );
                assert_eq!(a.len(), b.len(), "file lengths differ");
                assert_bytes_eq(&a, &b, "file bytes");
                assert_qed_clean(&ours);
            })
            .await;
    }
    cases.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_writes_pass_check_compare_and_map() {
    let dir = tmpdir();
    let size = 16 * MIB;
    let base = p(&dir, "base.qcow2");
    qemu_create_qcow2(&base, size, "cluster_size=4096", None);
    qemu_io(&base, "qcow2", &["write -P 0xa5 0 16M"]);
    let top = p(&dir, "top.qed");
    qemu_create_qed(&top, size, "cluster_size=4096,table_size=1", None);
    // QEMU cannot open table_size=1; use a default-table image with a qcow2 backing instead.
    qemu_create_qed(
        &top,
        size,
        "cluster_size=4096",
        Some(("base.qcow2", "qcow2")),
    );
    let node = open_qed(&top, false).await;
    let mut model = vec![0xa5u8; size as usize];
    let mut rng = StdRng::seed_from_u64(42);
    for i in 0..300u64 {
        let off = rng.random_range(0..size - 1);
        let len = rng.random_range(1..=(size - off).min(70_000));
        match i % 5 {
            0 => {
                node.write_zeroes(off, len, i % 2 == 0).await.expect("zero");
                model[off as usize..(off + len) as usize].fill(0);
            }
            _ => {
                let d = pattern(i, len as usize);
                node.write(off, &d).await.expect("write");
                model[off as usize..(off + len) as usize].copy_from_slice(&d);
            }
        }
    }
    node.close().await.expect("close");
    assert_qed_clean(&top);
    let raw = p(&dir, "model.raw");
    write_file(&raw, &model);
    assert_compare(&top, "qed", &raw, "raw");
    let node = open_qed(&top, true).await;
    assert_maps_equal(&our_map(&node).await, &qemu_map(&top, "qed"), "map");
    assert_bytes_eq(&read_all(&node, MIB).await, &model, "contents");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn need_check_flag_and_crash_repair() {
    let dir = tmpdir();
    let img = p(&dir, "img.qed");
    qemu_create_qed(&img, 8 * MIB, "", None);
    let node = open_qed(&img, false).await;
    assert_eq!(features_on_disk(&img), 0);
    node.write(0, &[1u8; 1000]).await.expect("write");
    assert_eq!(
        features_on_disk(&img),
        2,
        "need-check set before the first allocation"
    );
    node.flush().await.expect("flush");
    assert_eq!(
        features_on_disk(&img),
        0,
        "a flush makes the image consistent"
    );
    node.write(65536, &[2u8; 1000])
        .await
        .expect("in place? no: allocating");
    assert_eq!(features_on_disk(&img), 2);
    node.write(70000, &[3u8; 10]).await.expect("in-place write");
    node.close().await.expect("close");
    assert_eq!(features_on_disk(&img), 0, "a clean close clears the flag");
    assert_qed_clean(&img);

    // A crash: allocations whose table updates were never flushed.
    let node = open_qed(&img, false).await;
    node.write(2 * MIB, &[4u8; 3 * 65536]).await.expect("write");
    drop(node);
    assert_eq!(features_on_disk(&img), 2, "left dirty");
    let (code, v, desc) = qemu_check(&img, "qed");
    assert_eq!(code, 3, "only leaks after a crash:\n{desc}");
    assert_eq!(v["leaks"], 3, "{desc}");
    assert!(v.get("corruptions").is_none(), "{desc}");
    // Read-only opens work on a dirty image without repairing it.
    let ro = open_qed(&img, true).await;
    let mut b = vec![0u8; 10];
    ro.read(70000, &mut b).await.expect("read");
    assert_eq!(b, vec![3u8; 10]);
    drop(ro);
    assert_eq!(features_on_disk(&img), 2);
    // A read-write open checks and repairs (leaks stay: QED cannot reuse them).
    let node = open_qed(&img, false).await;
    assert_eq!(features_on_disk(&img), 0, "repaired and marked clean");
    let mut b = vec![9u8; 65536];
    node.read(2 * MIB, &mut b).await.expect("read");
    assert!(b.iter().all(|&x| x == 0), "the unflushed write is gone");
    node.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_qemu_image_is_repaired_on_read_write_open() {
    let dir = tmpdir();
    let img = p(&dir, "img.qed");
    qemu_create_qed(&img, 16 * MIB, "cluster_size=4096", None);
    // qemu-io killed before the need-check timer or a clean close.
    let out = run_raw(
        "qemu-io",
        &[
            "-f",
            "qed",
            "-c",
            "write -P 0x11 0 128k",
            "-c",
            "write -P 0x22 1M 64k",
            "-c",
            "sigraise 9",
            img.to_str().expect("path"),
        ],
    );
    assert!(!out.status.success());
    assert_eq!(features_on_disk(&img) & 2, 2, "QEMU left the image dirty");
    let expected = qemu_export_raw(&img, "qed");
    let node = open_qed(&img, false).await;
    assert_eq!(features_on_disk(&img) & 2, 0);
    assert_bytes_eq(&read_all(&node, MIB).await, &expected, "contents");
    node.close().await.expect("close");
    let (code, _, desc) = qemu_check(&img, "qed");
    assert!(code == 0 || code == 3, "{desc}");
}

/// Corrupt an L2 table the way a broken writer might: an entry past the end of the file, an
/// unaligned one, and one duplicating another; plus two leaked clusters at the end.
fn corrupt(path: &Path) {
    let mut b = std::fs::read(path).expect("read");
    let cs = u32::from_le_bytes(b[4..8].try_into().expect("4")) as usize;
    let l1 = u64::from_le_bytes(b[40..48].try_into().expect("8")) as usize;
    let l2 = u64::from_le_bytes(b[l1..l1 + 8].try_into().expect("8")) as usize;
    let e0 = b[l2..l2 + 8].to_vec();
    b[l2 + 5 * 8..l2 + 6 * 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    b[l2 + 6 * 8..l2 + 7 * 8].copy_from_slice(&((l2 as u64) + 1).to_le_bytes());
    b[l2 + 7 * 8..l2 + 8 * 8].copy_from_slice(&e0);
    b.extend(vec![0u8; 2 * cs]);
    std::fs::write(path, b).expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_repair_count_what_qemu_counts() {
    use diskstream_block::format::qed::check::{check, RepairMode};
    use diskstream_block::protocol::file::FileProtocol;
    let dir = tmpdir();
    let img = p(&dir, "img.qed");
    qemu_create_qed(&img, 16 * MIB, "", None);
    qemu_io(
        &img,
        "qed",
        &[
            "write -P 0x11 0 128k",
            "write -P 0x22 1M 64k",
            "write -P 3 5M 4k",
        ],
    );
    let (code, v, _) = qemu_check(&img, "qed");
    assert_eq!(code, 0);
    let open = |ro: bool| -> Arc<dyn diskstream_block::protocol::Protocol> {
        Arc::new(FileProtocol::open(&img, ro).expect("open"))
    };
    let r = check(open(true), RepairMode::None).await.expect("check");
    let same = |r: &diskstream_block::format::qed::check::CheckResult, v: &Value, what: &str| {
        let f = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        assert_eq!(
            (
                r.corruptions,
                r.leaks,
                r.check_errors,
                r.corruptions_fixed,
                r.total_clusters,
                r.allocated_clusters,
                r.fragmented_clusters
            ),
            (
                f("corruptions"),
                f("leaks"),
                f("check-errors"),
                f("corruptions-fixed"),
                f("total-clusters"),
                f("allocated-clusters"),
                f("fragmented-clusters")
            ),
            "{what}: ours {r:?} qemu {v}"
        );
    };
    same(&r, &v, "clean");
    corrupt(&img);
    let (code, v, desc) = qemu_check(&img, "qed");
    assert_eq!(code, 2, "{desc}");
    let r = check(open(true), RepairMode::None).await.expect("check");
    same(&r, &v, "corrupt");
    assert_eq!(r.exit_code(), 2);
    // Repair a copy with qemu-img and one with us: same counts, same bytes.
    let theirs = p(&dir, "theirs.qed");
    std::fs::copy(&img, &theirs).expect("copy");
    let out = run_raw(
        "qemu-img",
        &[
            "check",
            "-r",
            "all",
            "--output=json",
            theirs.to_str().expect("path"),
        ],
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    let r = check(open(false), RepairMode::All).await.expect("repair");
    same(&r, &v, "repaired");
    assert_eq!(r.corruptions_fixed, 2);
    assert_bytes_eq(
        &std::fs::read(&img).expect("read"),
        &std::fs::read(&theirs).expect("read"),
        "repaired files",
    );
    // A dirty image with a corruption that cannot be repaired is not opened for writing.
    let mut b = std::fs::read(&img).expect("read");
    b[16] |= 2;
    std::fs::write(&img, b).expect("write");
    let e = open_image(
        &img,
        &OpenOptions {
            read_only: false,
            format: Some(Format::Qed),
            ..Default::default()
        },
    )
    .await
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(e.contains("Could not repair dirty image"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn population_never_clobbers_guest_writes() {
    let dir = tmpdir();
    let size = 4 * MIB;
    let cluster = 4096;
    let base = p(&dir, "base.raw");
    write_file(&base, &pattern(7, size as usize));
    let top_path = p(&dir, "top.qed");
    qemu_create_qed(
        &top_path,
        size,
        "cluster_size=4096",
        Some(("base.raw", "raw")),
    );
    let top = open_qed(&top_path, false).await;
    let mut model = pattern(7, size as usize);
    let mut rng = StdRng::seed_from_u64(11);
    for round in 0..150 {
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
        let d2 = data.clone();
        let c = tokio::spawn(async move {
            if zero_copy {
                t1.zero_if_unallocated(off, len).await
            } else {
                t1.write_if_unallocated(off, &copy).await
            }
        });
        let g = tokio::spawn(async move { t2.write(g_off, &d2).await });
        c.await.expect("join").expect("copy");
        g.await.expect("join").expect("guest write");
        model[g_off as usize..(g_off + g_len) as usize].copy_from_slice(&data);
        let mut got = vec![0u8; len as usize];
        top.read(off, &mut got).await.expect("read top");
        let g0 = (g_off - off) as usize;
        assert_bytes_eq(
            &got[g0..g0 + g_len as usize],
            &data,
            &format!("round {round}: guest data"),
        );
        if zero_copy {
            model[off as usize..(off + len) as usize].copy_from_slice(&got);
        } else {
            assert_bytes_eq(
                &got,
                &model[off as usize..(off + len) as usize],
                &format!("round {round}"),
            );
        }
    }
    assert_bytes_eq(&read_all(&top, MIB).await, &model, "whole image");
    // Counting: allocated clusters are skipped.
    top.close().await.expect("close");
    assert_qed_clean(&top_path);
    let top = open_qed(&top_path, false).await;
    let mut unallocated = 0;
    let mut pos = 0;
    while pos < size {
        let st = top.block_status(pos, size - pos).await.expect("status");
        if st.alloc == diskstream_block::node::Allocation::Unallocated {
            unallocated += st.len;
        }
        pos += st.len;
    }
    let n = top.zero_if_unallocated(0, size).await.expect("zero");
    assert_eq!(n, unallocated, "only unallocated clusters are marked");
    top.close().await.expect("close");
}

/// Random operations on a QED top over a QED middle over a raw base, against a byte model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_ops_on_a_qed_chain_match_a_model() {
    let total: usize = std::env::var("DISKSTREAM_RANDOM_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(|n: usize| n / 3)
        .unwrap_or(3000);
    for (seed, cs) in [(1u64, 4096u64), (2, 65536)] {
        let dir = tmpdir();
        let size = 24 * MIB + 512;
        let base = p(&dir, "base.raw");
        let base_data = pattern(seed, (size / 2) as usize);
        write_file(&base, &base_data);
        let mid = p(&dir, "mid.qed");
        qemu_create_qed(
            &mid,
            size - 512,
            "cluster_size=4096",
            Some(("base.raw", "raw")),
        );
        qemu_io(
            &mid,
            "qed",
            &[
                "write -P 0x5a 1M 2M",
                "write -z 5M 1M",
                "write -P 0x5b 20M 100k",
            ],
        );
        let top = p(&dir, "top.qed");
        qemu_create_qed(
            &top,
            size,
            &format!("cluster_size={cs},table_size=1"),
            Some(("mid.qed", "qed")),
        );
        let mut model = qemu_export_raw(&mid, "qed");
        model.resize(size as usize, 0);
        let node = open_qed(&top, false).await;
        assert_bytes_eq(&read_all(&node, MIB).await, &model, "initial");
        let mut rng = StdRng::seed_from_u64(seed);
        let mut log: Vec<String> = Vec::new();
        for i in 0..total {
            let sz = node.size();
            let len = match rng.random_range(0..6) {
                0 => 1,
                1 => 512,
                2 => cs,
                3 => cs + 1,
                4 => rng.random_range(1..3 * cs),
                _ => rng.random_range(1..200_000),
            }
            .min(sz);
            let off = rng.random_range(0..=sz - len);
            match rng.random_range(0..10) {
                0..=5 => {
                    let d = pattern(seed * 1_000_000 + i as u64, len as usize);
                    log.push(format!("write {off}+{len}"));
                    node.write(off, &d).await.expect("write");
                    model[off as usize..(off + len) as usize].copy_from_slice(&d);
                }
                6 | 7 => {
                    log.push(format!("zero {off}+{len}"));
                    node.write_zeroes(off, len, rng.random_bool(0.5))
                        .await
                        .expect("zero");
                    model[off as usize..(off + len) as usize].fill(0);
                }
                8 => {
                    log.push(format!("discard {off}+{len}"));
                    node.discard(off, len).await.expect("discard");
                }
                _ => {
                    if rng.random_bool(0.1) && sz < 40 * MIB {
                        let n = sz + 512 * rng.random_range(1..200u64);
                        log.push(format!("grow {n}"));
                        node.truncate(n).await.expect("grow");
                        model.resize(n as usize, 0);
                    } else {
                        log.push("flush".into());
                        node.flush().await.expect("flush");
                    }
                }
            }
            if i % 97 == 0 {
                let o = rng.random_range(0..node.size());
                let l = (node.size() - o).min(300_000);
                let mut b = vec![0u8; l as usize];
                node.read(o, &mut b).await.expect("read");
                if b != model[o as usize..(o + l) as usize] {
                    let last: Vec<_> = log.iter().rev().take(10).collect();
                    panic!("seed {seed}: mismatch at {o}+{l} after op {i}; last ops {last:?}");
                }
            }
        }
        // Concurrent writers on disjoint ranges.
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let n = Arc::clone(&node);
            let off = t * 3 * MIB + 777;
            let d = pattern(99 + t, 400_000);
            model[off as usize..off as usize + d.len()].copy_from_slice(&d);
            tasks.push(tokio::spawn(async move { n.write(off, &d).await }));
        }
        for t in tasks {
            t.await.expect("join").expect("concurrent write");
        }
        assert_bytes_eq(
            &read_all(&node, MIB).await,
            &model,
            &format!("seed {seed} final"),
        );
        node.close().await.expect("close");
        let raw = p(&dir, "model.raw");
        write_file(&raw, &model);
        // qemu-img cannot open table_size=1 images; convert ours to check with QEMU's tools.
        let node = open_qed(&top, true).await;
        assert_bytes_eq(&read_all(&node, MIB).await, &model, "reopened");
        let q = node.as_any().downcast_ref::<Qed>().expect("qed");
        let r = q.check().await.expect("check");
        assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0), "{r:?}");
    }
}

#[tokio::test]
async fn malformed_headers_give_clear_errors() {
    let dir = tmpdir();
    let img = p(&dir, "good.qed");
    write_file(&p(&dir, "base.raw"), &[0u8; 4096]);
    qemu_create_qed(&img, MIB, "", Some(("base.raw", "raw")));
    let good = std::fs::read(&img).expect("read");
    let put32 = |b: &mut Vec<u8>, o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_le_bytes());
    let put64 = |b: &mut Vec<u8>, o: usize, v: u64| b[o..o + 8].copy_from_slice(&v.to_le_bytes());
    type Mutate = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Mutate, &str)> = vec![
        (
            "magic",
            Box::new(|b: &mut Vec<u8>| b[0] = b'X'),
            "not in QED format",
        ),
        ("short", Box::new(|b: &mut Vec<u8>| b.truncate(40)), "QED"),
        (
            "features",
            Box::new(move |b: &mut Vec<u8>| put64(b, 16, 0x101)),
            "Unsupported QED features: 100",
        ),
        (
            "cluster",
            Box::new(move |b: &mut Vec<u8>| put32(b, 4, 3000)),
            "cluster size",
        ),
        (
            "cluster-huge",
            Box::new(move |b: &mut Vec<u8>| put32(b, 4, 1 << 30)),
            "cluster size",
        ),
        (
            "table",
            Box::new(move |b: &mut Vec<u8>| put32(b, 8, 5)),
            "table size",
        ),
        (
            "size",
            Box::new(move |b: &mut Vec<u8>| put64(b, 48, 1001)),
            "image size",
        ),
        (
            "size-huge",
            Box::new(move |b: &mut Vec<u8>| put64(b, 48, u64::MAX - 511)),
            "image size",
        ),
        (
            "header-size",
            Box::new(move |b: &mut Vec<u8>| put32(b, 12, u32::MAX)),
            "header size",
        ),
        (
            "l1-unaligned",
            Box::new(move |b: &mut Vec<u8>| put64(b, 40, 65537)),
            "L1 table offset",
        ),
        (
            "l1-in-header",
            Box::new(move |b: &mut Vec<u8>| put64(b, 40, 0)),
            "L1 table offset",
        ),
        (
            "l1-past-eof",
            Box::new(move |b: &mut Vec<u8>| put64(b, 40, 1 << 40)),
            "L1 table offset",
        ),
        (
            "name-outside",
            Box::new(move |b: &mut Vec<u8>| put32(b, 56, 65530)),
            "backing file name",
        ),
        (
            "name-utf8",
            Box::new(|b: &mut Vec<u8>| b[64] = 0xff),
            "UTF-8",
        ),
    ];
    for (name, mutate, want) in cases {
        let mut b = good.clone();
        mutate(&mut b);
        let path = p(&dir, &format!("{name}.qed"));
        write_file(&path, &b);
        let e = open_image(
            &path,
            &OpenOptions {
                read_only: true,
                format: Some(Format::Qed),
                no_backing: true,
                ..Default::default()
            },
        )
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_else(|| panic!("{name}: opened"));
        assert!(e.contains(want), "{name}: error {e:?} lacks {want:?}");
        assert!(
            e.contains(&format!("{name}.qed")),
            "{name}: error {e:?} names no file"
        );
        // The fuzzing entry point survives it too.
        tokio::task::spawn_blocking(move || diskstream_block::fuzzing::qed_image(&b))
            .await
            .expect("fuzz entry point");
    }
    // Bad table entries are errors on access, not panics.
    let mut b = good.clone();
    b[65536..65544].copy_from_slice(&(3u64 << 20).to_le_bytes());
    let path = p(&dir, "l2.qed");
    write_file(&path, &b);
    let node = open_image(
        &path,
        &OpenOptions {
            read_only: true,
            format: Some(Format::Qed),
            no_backing: true,
            ..Default::default()
        },
    )
    .await
    .expect("open");
    let e = node
        .read(0, &mut [0u8; 512])
        .await
        .err()
        .map(|e| e.to_string());
    assert!(e.is_some_and(|e| e.contains("L2 table offset")));
}
