//! Images written by QEMU (qemu-img, qemu-io) read identically through our engine, and our
//! chain-wide map equals `qemu-img map --output=json` extent for extent.
//!
//! Matrix: compat 0.10/1.1, cluster sizes 512 B..2 MiB, every refcount width, extended L2,
//! compressed images (zlib, zstd), a three-layer raw/qcow2/qcow2 chain of different sizes, and a
//! lazy-refcounts image left dirty by a killed qemu-io.

mod common;

use common::*;
use std::path::Path;

/// Read the whole image through our engine (read-only) and compare with qemu's raw export; then
/// compare the maps. Also asserts the read-only open did not modify the file.
async fn verify_against_qemu(path: &Path, what: &str) {
    let before = std::fs::read(path).expect("read image");
    let expected = qemu_export_raw(path, "qcow2");
    let qmap = qemu_map(path, "qcow2");
    let node = open_qcow2(path, true).await;
    assert_eq!(node.size(), expected.len() as u64, "{what}: virtual size");
    // Odd chunk size so requests start and end mid-cluster.
    let ours = read_all(&node, MIB + 3 * 512 + 1).await;
    assert_bytes_eq(&ours, &expected, &format!("{what}: contents"));
    // The copy-free read (an NBD server's: appended to a reply header) reads the same.
    let appended = read_all_append(&node, MIB / 4 + 512).await;
    assert_bytes_eq(
        &appended,
        &expected,
        &format!("{what}: contents (read_append)"),
    );
    let omap = our_map(&node).await;
    assert_maps_equal(&omap, &qmap, what);
    node.close().await.expect("close");
    drop(node);
    let after = std::fs::read(path).expect("read image");
    assert!(before == after, "{what}: read-only open changed the file");
}

/// Read the whole node in `chunk`-byte requests with [`BlockNode::read_append`], each appended
/// to a header that must come back untouched.
async fn read_all_append(
    node: &std::sync::Arc<dyn diskstream_block::node::BlockNode>,
    chunk: u64,
) -> Vec<u8> {
    let size = node.size();
    let mut out = Vec::with_capacity(size as usize);
    let mut pos = 0;
    while pos < size {
        let n = chunk.min(size - pos) as usize;
        let b = node
            .read_append(pos, b"header".to_vec(), n)
            .await
            .expect("read_append");
        assert_eq!(b.len(), 6 + n, "read_append length at {pos}");
        assert_eq!(&b[..6], b"header", "read_append kept the prefix at {pos}");
        out.extend_from_slice(&b[6..]);
        pos += n as u64;
    }
    out
}

/// qemu-io commands exercising every kind of L2 entry in an image of `size` bytes with cluster
/// size `cs`: data, partial (COW) writes, zero clusters, unmapped zeroes, discards, compressed
/// clusters, writes crossing clusters and L2 tables, a partial last cluster, subclusters.
fn workload(cs: u64, size: u64, extended: bool) -> Vec<String> {
    let c = cs;
    let l2_span = cs * (cs / if extended { 16 } else { 8 });
    let mut v = vec![
        format!("write -P 0x11 0 {c}"),
        format!("write -P 0x22 {} {}", c + 100, (c - 200).min(3000)),
        format!("write -z {} {}", 2 * c, 2 * c),
        format!("write -P 0x33 {} {c}", 4 * c),
        format!("write -z -u {} {c}", 4 * c),
        format!("write -P 0x44 {} {c}", 5 * c),
        format!("discard {} {c}", 5 * c),
        format!("write -c -P 0x45 {} {c}", 6 * c),
        format!("write -P 0x55 {} {}", 7 * c - c.min(1400) / 2, c.min(1400)),
        format!("write -c -P 0x66 {} {c}", 8 * c),
        format!("write -P 0x77 {} 1500", size - 1500),
        format!("write -P 0x78 {} 3000", 11 * c + 77),
    ];
    if extended {
        let sub = c / 32;
        v.push(format!("write -P 0x99 {} {sub}", 9 * c + sub));
        v.push(format!("write -P 0xaa {} 100", 9 * c + 5 * sub + 10));
        v.push(format!("write -z {} {}", 9 * c + 10 * sub, 3 * sub));
        v.push(format!("write -P 0xab {} {}", 10 * c + 3 * sub, 2 * sub));
    }
    if l2_span + 1000 < size {
        v.push(format!("write -P 0x88 {} 2000", l2_span - 1000));
    }
    if 2 * l2_span + c < size {
        v.push(format!("write -z {} {}", 2 * l2_span - c, 2 * c));
        v.push(format!("write -P 0x89 {} {}", 2 * l2_span - 300, 600));
    }
    v
}

fn image_size(cs: u64) -> u64 {
    (12 * cs).max(3 * MIB) + 512
}

async fn qemu_image_case(name: String, opts: String, cs: u64, extended: bool) {
    let dir = tmpdir();
    let img = p(&dir, "img.qcow2");
    let size = image_size(cs);
    qemu_create_qcow2(&img, size, &opts, None);
    let cmds = workload(cs, size, extended);
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&img, "qcow2", &cmds);
    verify_against_qemu(&img, &format!("{name} ({opts})")).await;
}

#[tokio::test]
async fn cluster_sizes_v2_and_v3() {
    let mut cases = Cases::default();
    for compat in ["0.10", "1.1"] {
        for cs in [512u64, 4096, 65536, 2 * MIB] {
            let opts = format!("compat={compat},cluster_size={cs}");
            let name = format!("compat {compat} cluster {cs}");
            cases
                .run(&name.clone(), qemu_image_case(name, opts, cs, false))
                .await;
        }
    }
    cases.finish();
}

#[tokio::test]
async fn refcount_widths() {
    let mut cases = Cases::default();
    for bits in [1u32, 2, 4, 8, 16, 32, 64] {
        for cs in [512u64, 65536] {
            let opts = format!("compat=1.1,cluster_size={cs},refcount_bits={bits}");
            let name = format!("refcount_bits {bits} cluster {cs}");
            cases
                .run(&name.clone(), qemu_image_case(name, opts, cs, false))
                .await;
        }
    }
    cases.finish();
}

#[tokio::test]
async fn extended_l2() {
    let mut cases = Cases::default();
    for cs in [65536u64, 2 * MIB] {
        let opts = format!("compat=1.1,cluster_size={cs},extended_l2=on");
        let name = format!("extended_l2 cluster {cs}");
        cases
            .run(&name.clone(), qemu_image_case(name, opts, cs, true))
            .await;
    }
    cases.finish();
}

/// A raw source with compressible, incompressible and zero regions, converted with -c.
async fn compressed_case(ctype: &'static str, cs: u64) {
    let dir = tmpdir();
    let src = p(&dir, "src.raw");
    let size = 3 * MIB + 7 * 512;
    let mut data = vec![0u8; size as usize];
    // Compressible text-like region, random region, a zero gap, a short tail.
    for (i, b) in data[..MIB as usize].iter_mut().enumerate() {
        *b = b"diskstream compressed cluster "[i % 30];
    }
    let rnd = pattern(cs, (MIB / 2) as usize);
    data[MIB as usize..(MIB + MIB / 2) as usize].copy_from_slice(&rnd);
    let tail = size as usize - 5000;
    data[tail..tail + 3000].fill(0x5a);
    write_file(&src, &data);
    let img = p(&dir, "c.qcow2");
    qemu_img(&[
        "convert".to_string(),
        "-c".into(),
        "-f".into(),
        "raw".into(),
        "-O".into(),
        "qcow2".into(),
        "-o".into(),
        format!("compression_type={ctype},cluster_size={cs}"),
        src.display().to_string(),
        img.display().to_string(),
    ]);
    verify_against_qemu(&img, &format!("compressed {ctype} cluster {cs}")).await;
    // And the data is what we put in.
    let node = open_qcow2(&img, true).await;
    let ours = read_all(&node, 256 * KIB).await;
    assert_bytes_eq(&ours, &data, "compressed image vs source");
}

#[tokio::test]
async fn compressed_zlib_and_zstd() {
    let mut cases = Cases::default();
    for ctype in ["zlib", "zstd"] {
        for cs in [512u64, 4096, 65536, 2 * MIB] {
            cases
                .run(
                    &format!("compressed {ctype} cluster {cs}"),
                    compressed_case(ctype, cs),
                )
                .await;
        }
    }
    cases.finish();
}

/// raw base (shortest) <- qcow2 mid <- qcow2 top (longest), each layer with data, zero
/// clusters, discards and unaligned writes; all verified at every level of the chain.
async fn chain_case(compat: &'static str, mid_cs: u64, top_cs: u64) {
    let dir = tmpdir();
    let base = p(&dir, "base.raw");
    let mid = p(&dir, "mid.qcow2");
    let top = p(&dir, "top.qcow2");
    let base_size = MIB + 3 * 512;
    let mid_size = 2 * MIB + 512;
    let top_size = 3 * MIB;
    qemu_create_raw(&base, base_size);
    qemu_io(
        &base,
        "raw",
        &[
            "write -P 0x01 0 200k",
            "write -P 0x02 300001 70000",
            &format!("write -P 0x03 {} 1000", base_size - 1000),
        ],
    );
    let mopts = format!("compat={compat},cluster_size={mid_cs}");
    qemu_create_qcow2(&mid, mid_size, &mopts, Some((&base, "raw")));
    qemu_io(
        &mid,
        "qcow2",
        &[
            "write -P 0x11 4096 8192",
            "write -z 64k 64k",
            "write -P 0x12 150001 3333",
            "discard 256k 64k",
            "write -z -u 512k 128k",
            &format!("write -P 0x13 {} 5000", base_size - 2500),
            "write -P 0x14 1900000 100000",
            "discard 1900544 65536",
        ],
    );
    let topts = format!("compat={compat},cluster_size={top_cs}");
    qemu_create_qcow2(&top, top_size, &topts, Some((&mid, "qcow2")));
    qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 0x21 100 700",
            "write -z 192k 64k",
            "discard 320k 64k",
            "write -P 0x22 131071 3",
            &format!("write -P 0x23 {} 2000", mid_size - 1000),
            &format!("write -P 0x24 {} 777", top_size - 777),
            "write -z -u 1M 256k",
            "discard 1600k 128k",
        ],
    );
    for img in [&mid, &top] {
        verify_against_qemu(
            img,
            &format!(
                "chain compat {compat} mid cs {mid_cs} top cs {top_cs}: {}",
                img.display()
            ),
        )
        .await;
    }
}

#[tokio::test]
async fn backing_chain_raw_qcow2_qcow2() {
    let mut cases = Cases::default();
    for compat in ["0.10", "1.1"] {
        for (mid_cs, top_cs) in [(4096u64, 65536u64), (65536, 512), (512, 4096)] {
            cases
                .run(
                    &format!("chain compat {compat} {mid_cs}/{top_cs}"),
                    chain_case(compat, mid_cs, top_cs),
                )
                .await;
        }
    }
    cases.finish();
}

/// A lazy-refcounts image whose writer was killed: dirty bit set, refcounts stale. Read-only it
/// must read what was written and leave the file untouched; read-write it is repaired first.
#[tokio::test]
async fn lazy_refcounts_dirty_image_read_only() {
    let dir = tmpdir();
    let img = p(&dir, "lazy.qcow2");
    qemu_create_qcow2(&img, 4 * MIB, "compat=1.1,lazy_refcounts=on", None);
    let out = run_raw(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 7 0 64k",
            "-c",
            "sigraise 9",
            img.to_str().expect("path"),
        ],
    );
    assert!(!out.status.success(), "qemu-io was expected to be killed");
    // The image is dirty now (incompatible bit 0).
    let raw = std::fs::read(&img).expect("read");
    let incompat = u64::from_be_bytes(raw[72..80].try_into().expect("8 bytes"));
    assert_eq!(incompat & 1, 1, "image should be marked dirty");
    // QEMU (read-only) sees the data.
    run_ok(
        "qemu-io",
        &[
            "-r",
            "-f",
            "qcow2",
            "-c",
            "read -P 7 0 64k",
            img.to_str().expect("path"),
        ],
    );
    verify_against_qemu(&img, "lazy refcounts dirty").await;
    let node = open_qcow2(&img, true).await;
    let mut buf = vec![0u8; 65536 + 512];
    node.read(0, &mut buf).await.expect("read");
    assert!(buf[..65536].iter().all(|&b| b == 7));
    assert!(buf[65536..].iter().all(|&b| b == 0));
    drop(node);
    assert!(
        std::fs::read(&img).expect("read") == raw,
        "read-only open changed the file"
    );
    // Read-write opening repairs the refcounts first, as QEMU does; afterwards the image is clean
    // by qemu-img's own check and still holds the data.
    let rw = diskstream_block::image::open_image(
        &img,
        &diskstream_block::image::OpenOptions {
            read_only: false,
            format: Some(diskstream_block::format::Format::Qcow2),
            ..Default::default()
        },
    )
    .await
    .expect("read-write open repairs a dirty image");
    rw.close().await.expect("close");
    drop(rw);
    let fixed = std::fs::read(&img).expect("read");
    let incompat = u64::from_be_bytes(fixed[72..80].try_into().expect("8 bytes"));
    assert_eq!(incompat & 1, 0, "dirty bit cleared after repair");
    run_ok("qemu-img", &["check", img.to_str().expect("path")]);
    run_ok(
        "qemu-io",
        &[
            "-r",
            "-f",
            "qcow2",
            "-c",
            "read -P 7 0 64k",
            img.to_str().expect("path"),
        ],
    );
}

/// A raw backing file whose length is not a multiple of 512: QEMU rounds the raw image's size up
/// to a whole sector (the tail reads as zeroes, allocated in the raw layer).
#[tokio::test]
async fn raw_backing_with_unaligned_length() {
    let dir = tmpdir();
    let base = p(&dir, "base.raw");
    let top = p(&dir, "top.qcow2");
    write_file(&base, &pattern(1, 1_000_000));
    qemu_create_qcow2(&top, 2 * MIB, "cluster_size=4096", Some((&base, "raw")));
    qemu_io(&top, "qcow2", &["write -P 0x21 500000 4000"]);
    verify_against_qemu(&top, "raw backing of 1000000 bytes").await;
}

/// Partial-cluster writes through O_DIRECT leave QEMU's data clusters mostly as unwritten
/// extents (holes to SEEK_DATA). QEMU does not look through to the file for such an image (it
/// only does for metadata-preallocated ones, by its allocation heuristic), so its map says
/// `data` for the whole cluster; ours must say the same, and the metadata-preallocated case
/// (tested in our_writes.rs) must still look through.
#[tokio::test]
async fn partial_direct_writes_map_as_data() {
    let dir = tmpdir();
    let img = p(&dir, "frag.qcow2");
    qemu_create_qcow2(&img, 64 * MIB, "", None);
    run_ok(
        "qemu-img",
        &[
            "bench",
            "-q",
            "-w",
            "-t",
            "none",
            "--pattern=1",
            "-c",
            "64",
            "-s",
            "4096",
            "-S",
            "262144",
            "-f",
            "qcow2",
            img.to_str().expect("path"),
        ],
    );
    verify_against_qemu(&img, "partial O_DIRECT writes").await;
}
