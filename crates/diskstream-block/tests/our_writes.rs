//! Images our engine creates and writes pass `qemu-img check` (exit 0, no leaks, no corruption)
//! and `qemu-img compare` against a raw model of what was written; QEMU's map of them equals
//! ours; and opening an image without writing leaves its file byte-identical.

mod common;

use common::*;
use diskstream_block::format::qcow2::create::{CreateOptions, Preallocation};
use diskstream_block::format::qcow2::header::CompressionType;
use diskstream_block::node::BlockNode;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An image open through our engine plus a byte model of its guest contents.
struct Modeled {
    node: Arc<dyn BlockNode>,
    model: Vec<u8>,
    cs: u64,
    v3: bool,
    /// Guest contents of the backing chain (None: no backing file).
    backing: Option<Vec<u8>>,
    seed: u64,
}

impl Modeled {
    async fn open(path: &Path, cs: u64, v3: bool, backing: Option<Vec<u8>>) -> Modeled {
        let node = open_qcow2(path, false).await;
        let size = node.size() as usize;
        let mut model = vec![0u8; size];
        if let Some(b) = &backing {
            let n = b.len().min(size);
            model[..n].copy_from_slice(&b[..n]);
        }
        Modeled {
            node,
            model,
            cs,
            v3,
            backing,
            seed: 1,
        }
    }

    async fn write(&mut self, off: u64, len: u64) {
        self.seed += 1;
        let data = pattern(self.seed, len as usize);
        self.node
            .write(off, &data)
            .await
            .unwrap_or_else(|e| panic!("write {off}+{len}: {e}"));
        self.model[off as usize..(off + len) as usize].copy_from_slice(&data);
    }

    async fn zero(&mut self, off: u64, len: u64, unmap: bool) {
        self.node
            .write_zeroes(off, len, unmap)
            .await
            .unwrap_or_else(|e| panic!("write_zeroes {off}+{len} unmap={unmap}: {e}"));
        self.model[off as usize..(off + len) as usize].fill(0);
    }

    async fn discard(&mut self, off: u64, len: u64) {
        self.node
            .discard(off, len)
            .await
            .unwrap_or_else(|e| panic!("discard {off}+{len}: {e}"));
        apply_discard(
            &mut self.model,
            self.cs,
            self.v3,
            self.backing.as_deref(),
            off,
            len,
        );
    }

    async fn truncate(&mut self, size: u64) {
        self.node
            .truncate(size)
            .await
            .unwrap_or_else(|e| panic!("truncate to {size}: {e}"));
        self.model.resize(size as usize, 0);
    }

    async fn verify(&self, what: &str) {
        let ours = read_all(&self.node, 300 * KIB + 512 + 7).await;
        assert_bytes_eq(&ours, &self.model, what);
    }

    async fn close(self) -> Vec<u8> {
        self.node.close().await.expect("close");
        self.model
    }
}

/// Check, compare with the model, and compare maps with QEMU.
async fn verify_with_qemu(path: &Path, model: &[u8], what: &str) {
    verify_contents_with_qemu(path, model).await;
    let node = open_qcow2(path, true).await;
    let ours = our_map(&node).await;
    let qemu = qemu_map(path, "qcow2");
    assert_maps_equal(&ours, &qemu, what);
}

/// Check and compare with the model (no map comparison).
async fn verify_contents_with_qemu(path: &Path, model: &[u8]) {
    assert_check_clean(path);
    let raw = PathBuf::from(format!("{}.model.raw", path.display()));
    write_file(&raw, model);
    assert_compare(&raw, "raw", path, "qcow2");
    let _ = std::fs::remove_file(&raw);
}

/// The standard write pattern: aligned and unaligned writes, zeroes with and without unmap,
/// discards (whole and partial clusters), writes across L2 tables, the partial last cluster.
async fn write_pattern(m: &mut Modeled, extended: bool) {
    let c = m.cs;
    let size = m.model.len() as u64;
    let l2_span = c * (c / if extended { 16 } else { 8 });
    m.write(0, c).await;
    m.write(c + 100, (c - 200).min(3000)).await;
    m.write(2 * c, 3 * c).await;
    m.zero(2 * c, c, false).await;
    m.zero(3 * c, c, true).await;
    m.zero(4 * c + 10, c / 2, false).await;
    m.write(5 * c, 2 * c).await;
    m.discard(5 * c, c).await;
    m.discard(6 * c + 512, c / 2).await; // partial: untouched
    m.write(7 * c - 333, 1000).await;
    m.write(11 * c + 77, 3000).await;
    m.write(size - 1500, 1500).await;
    if extended {
        let sub = c / 32;
        m.write(9 * c + sub, sub).await;
        m.write(9 * c + 5 * sub + 10, 100).await;
        m.zero(9 * c + 10 * sub, 3 * sub, false).await;
    }
    m.node.flush().await.expect("flush");
    if l2_span + 1000 < size {
        m.write(l2_span - 1000, 2000).await;
    }
    if 2 * l2_span + c < size {
        m.zero(2 * l2_span - c, 2 * c, false).await;
        m.write(2 * l2_span - 300, 600).await;
        m.discard(2 * l2_span - c, 2 * c).await;
    }
    // Overwrite zeroed and discarded clusters again, partially.
    m.write(3 * c + 1, 10).await;
    m.write(5 * c + c / 2, 7).await;
    // The last partial cluster: zeroes and discard reaching the end.
    m.zero(size - 700, 700, false).await;
    m.write(size - 2000, 100).await;
    m.discard(size - 512, 512).await;
}

fn image_size(cs: u64) -> u64 {
    (12 * cs).max(3 * MIB) + 512
}

fn qemu_info(path: &Path) -> Value {
    let out = qemu_img(&[
        "info".to_string(),
        "--output=json".into(),
        "-f".into(),
        "qcow2".into(),
        path.display().to_string(),
    ]);
    serde_json::from_str(&out).expect("info json")
}

/// Assert that qemu-img info sees the options we created the image with.
fn assert_info_matches(path: &Path, o: &CreateOptions) {
    let v = qemu_info(path);
    let d = &v["format-specific"]["data"];
    assert_eq!(v["virtual-size"].as_u64(), Some(o.size), "virtual size");
    assert_eq!(
        v["cluster-size"].as_u64(),
        Some(o.cluster_size),
        "cluster size"
    );
    let compat = if o.version >= 3 { "1.1" } else { "0.10" };
    assert_eq!(d["compat"].as_str(), Some(compat), "compat");
    if o.version >= 3 {
        assert_eq!(
            d["refcount-bits"].as_u64(),
            Some(o.refcount_bits as u64),
            "refcount bits"
        );
        assert_eq!(
            d["extended-l2"].as_bool(),
            Some(o.extended_l2),
            "extended l2"
        );
        assert_eq!(
            d["lazy-refcounts"].as_bool(),
            Some(o.lazy_refcounts),
            "lazy refcounts"
        );
    }
}

async fn our_image_case(o: CreateOptions) {
    our_image_case_with(o, true).await
}

/// Create with `o`, write the standard pattern in two sessions, verifying with QEMU after each
/// (`map`: also compare maps with `qemu-img map`).
async fn our_image_case_with(o: CreateOptions, map: bool) {
    let dir = tmpdir();
    let img = p(&dir, "ours.qcow2");
    our_create(&img, &o).await;
    assert_check_clean(&img);
    assert_info_matches(&img, &o);
    let what = format!("{o:?}");
    let verify = |model: Vec<u8>, what: String| {
        let img = img.clone();
        async move {
            if map {
                verify_with_qemu(&img, &model, &what).await;
            } else {
                verify_contents_with_qemu(&img, &model).await;
            }
        }
    };
    // Fresh image: empty (or preallocated zeroes).
    verify(vec![0u8; o.size as usize], format!("fresh {what}")).await;
    let mut m = Modeled::open(&img, o.cluster_size, o.version >= 3, None).await;
    write_pattern(&mut m, o.extended_l2).await;
    m.verify(&format!("before close {what}")).await;
    let model = m.close().await;
    verify(model.clone(), what.clone()).await;
    // Reopen, write more (metadata now comes from disk), verify again.
    let mut m = Modeled::open(&img, o.cluster_size, o.version >= 3, None).await;
    m.model = model;
    m.verify(&format!("after reopen {what}")).await;
    let c = o.cluster_size;
    m.write(c / 2, c).await;
    m.discard(0, 3 * c).await;
    m.write(8 * c + 3, 3 * c).await;
    let model = m.close().await;
    verify(model, format!("second session {what}")).await;
}

fn opts(version: u32, cs: u64) -> CreateOptions {
    CreateOptions {
        size: image_size(cs),
        cluster_size: cs,
        version,
        ..Default::default()
    }
}

#[tokio::test]
async fn cluster_sizes_v2_and_v3() {
    let mut cases = Cases::default();
    for version in [2u32, 3] {
        for cs in [512u64, 4096, 65536, 2 * MIB] {
            cases
                .run(
                    &format!("v{version} cluster {cs}"),
                    our_image_case(opts(version, cs)),
                )
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
            let o = CreateOptions {
                refcount_bits: bits,
                ..opts(3, cs)
            };
            cases
                .run(
                    &format!("refcount_bits {bits} cluster {cs}"),
                    our_image_case(o),
                )
                .await;
        }
    }
    cases.finish();
}

#[tokio::test]
async fn extended_l2_lazy_refcounts_zstd() {
    let mut cases = Cases::default();
    for cs in [65536u64, 2 * MIB] {
        let o = CreateOptions {
            extended_l2: true,
            ..opts(3, cs)
        };
        cases
            .run(&format!("extended_l2 cluster {cs}"), our_image_case(o))
            .await;
    }
    let o = CreateOptions {
        lazy_refcounts: true,
        compression_type: CompressionType::Zstd,
        ..opts(3, 4096)
    };
    cases.run("lazy refcounts + zstd", our_image_case(o)).await;
    cases.finish();
}

#[tokio::test]
async fn preallocation_modes() {
    let mut cases = Cases::default();
    for mode in [
        Preallocation::Metadata,
        Preallocation::Falloc,
        Preallocation::Full,
    ] {
        for (version, cs, ext) in [(3u32, 65536u64, false), (2, 4096, false), (3, 65536, true)] {
            let o = CreateOptions {
                preallocation: mode,
                extended_l2: ext,
                ..opts(version, cs)
            };
            cases
                .run(
                    &format!("preallocation {mode:?} v{version} cluster {cs} ext {ext}"),
                    // Map of metadata preallocation: see preallocation_metadata_map below.
                    our_image_case_with(o, mode != Preallocation::Metadata),
                )
                .await;
        }
    }
    cases.finish();
}

/// QEMU detects metadata preallocation and then reports data clusters over holes of the image
/// file as `zero: true`; our map must say the same.
#[tokio::test]
async fn preallocation_metadata_map() {
    let dir = tmpdir();
    let img = p(&dir, "pm.qcow2");
    let o = CreateOptions {
        preallocation: Preallocation::Metadata,
        ..opts(3, 65536)
    };
    our_create(&img, &o).await;
    let mut m = Modeled::open(&img, 65536, true, None).await;
    m.write(0, 4096).await;
    let model = m.close().await;
    verify_with_qemu(&img, &model, "preallocation=metadata").await;
    // And the same for an image QEMU preallocated.
    let q = p(&dir, "qpm.qcow2");
    qemu_create_qcow2(&q, 3 * MIB, "preallocation=metadata", None);
    qemu_io(&q, "qcow2", &["write -P 1 0 4k"]);
    let node = open_qcow2(&q, true).await;
    assert_maps_equal(
        &our_map(&node).await,
        &qemu_map(&q, "qcow2"),
        "qemu preallocation=metadata",
    );
}

/// A qemu-made chain raw base <- qcow2 mid, returned with the mid's guest contents.
fn qemu_chain(dir: &tempfile::TempDir, mid_compat: &str) -> (PathBuf, Vec<u8>) {
    let base = p(dir, "base.raw");
    let mid = p(dir, "mid.qcow2");
    qemu_create_raw(&base, MIB + 1024);
    qemu_io(
        &base,
        "raw",
        &["write -P 0x01 0 300k", "write -P 0x02 700001 300000"],
    );
    qemu_create_qcow2(
        &mid,
        2 * MIB,
        &format!("compat={mid_compat},cluster_size=4096"),
        Some((&base, "raw")),
    );
    qemu_io(
        &mid,
        "qcow2",
        &[
            "write -P 0x11 100000 200000",
            "write -z 40k 8k",
            "write -P 0x12 1000000 200000",
        ],
    );
    let contents = qemu_export_raw(&mid, "qcow2");
    (mid, contents)
}

async fn backing_case(version: u32, cs: u64, extended: bool) {
    let dir = tmpdir();
    let (mid, mid_data) = qemu_chain(&dir, if version >= 3 { "1.1" } else { "0.10" });
    let top = p(&dir, "top.qcow2");
    let o = CreateOptions {
        size: 3 * MIB,
        cluster_size: cs,
        version,
        extended_l2: extended,
        backing_file: Some("mid.qcow2".into()),
        backing_fmt: Some("qcow2".into()),
        ..Default::default()
    };
    our_create(&top, &o).await;
    let what = format!("backing v{version} cluster {cs} ext {extended}");
    verify_with_qemu(
        &top,
        &{
            let mut v = mid_data.clone();
            v.resize(3 * MIB as usize, 0);
            v
        },
        &format!("fresh {what}"),
    )
    .await;
    let mut m = Modeled::open(&top, cs, version >= 3, Some(mid_data)).await;
    let c = cs;
    // Partial writes copy the rest of the cluster from the backing chain.
    m.write(150_001, 10).await;
    m.write(2 * MIB - 100, 200).await; // across the mid's end
    m.write(MIB + 1000, 50).await; // across the base's end (inside mid)
    m.zero(250_000, 3 * c, false).await; // masks backing data
    m.zero(720_000, 2 * c + 17, true).await;
    m.discard(300_000 - 300_000 % c, 4 * c).await;
    m.discard(1_000_000, 3 * c + 5).await;
    m.discard(2_500_000, 10).await; // partial: untouched
    m.write(0, 3 * c / 2).await;
    m.discard(0, c).await;
    m.zero(3 * MIB - 1000, 1000, true).await;
    m.verify(&format!("before close {what}")).await;
    let model = m.close().await;
    verify_with_qemu(&top, &model, &what).await;
    // The chain below was not touched.
    assert_check_clean(&mid);
}

#[tokio::test]
async fn backing_files() {
    let mut cases = Cases::default();
    for (version, cs, ext) in [
        (3u32, 65536u64, false),
        (3, 4096, false),
        (3, 512, false),
        (2, 65536, false),
        (2, 512, false),
        (3, 65536, true),
    ] {
        cases
            .run(
                &format!("backing v{version} cluster {cs} ext {ext}"),
                backing_case(version, cs, ext),
            )
            .await;
    }
    cases.finish();
}

async fn resize_case(version: u32, cs: u64, extended: bool) {
    let dir = tmpdir();
    let img = p(&dir, "r.qcow2");
    let o = CreateOptions {
        size: MIB + 512,
        cluster_size: cs,
        version,
        extended_l2: extended,
        ..Default::default()
    };
    our_create(&img, &o).await;
    let what = format!("resize v{version} cluster {cs} ext {extended}");
    let mut m = Modeled::open(&img, cs, version >= 3, None).await;
    // Fill the partial last cluster so stale bytes past the old end would show after growing.
    m.write(MIB - 3000, 3512).await;
    m.truncate(5 * MIB + 1024).await;
    m.verify(&format!("after grow {what}")).await;
    m.write(5 * MIB, 1024).await;
    m.write(MIB - 100, 5000).await;
    m.zero(3 * MIB, MIB, false).await;
    m.truncate(5 * MIB + 1024 + 40 * MIB).await; // needs a larger L1 for small clusters
    m.write(30 * MIB, 4096).await;
    let model = m.close().await;
    verify_with_qemu(&img, &model, &format!("grown {what}")).await;
    // Shrink over an unused tail.
    let mut m = Modeled::open(&img, cs, version >= 3, None).await;
    m.model = model;
    m.truncate(40 * MIB).await;
    m.verify(&format!("after shrink {what}")).await;
    // Shrinking over data is refused and changes nothing.
    let r = m.node.truncate(MIB).await;
    assert!(r.is_err(), "{what}: shrink over data succeeded");
    assert_eq!(m.node.size(), 40 * MIB, "{what}: size after refused shrink");
    m.write(40 * MIB - 700, 700).await;
    let model = m.close().await;
    verify_with_qemu(&img, &model, &format!("shrunk {what}")).await;
    assert_eq!(
        qemu_info(&img)["virtual-size"].as_u64(),
        Some(40 * MIB),
        "{what}"
    );
}

#[tokio::test]
async fn resize_grow_and_shrink() {
    let mut cases = Cases::default();
    for (version, cs, ext) in [
        (3u32, 65536u64, false),
        (2, 65536, false),
        (3, 512, false),
        (3, 4096, false),
        (3, 65536, true),
    ] {
        cases
            .run(
                &format!("resize v{version} cluster {cs} ext {ext}"),
                resize_case(version, cs, ext),
            )
            .await;
    }
    cases.finish();
}

/// Growing a top image that is shorter than its backing file: the new area reads as zeroes,
/// not as the backing file's data.
#[tokio::test]
async fn resize_grow_over_longer_backing() {
    let dir = tmpdir();
    let base = p(&dir, "base.raw");
    write_file(&base, &pattern(9, 4 * MIB as usize));
    let top = p(&dir, "top.qcow2");
    qemu_create_qcow2(&top, MIB, "cluster_size=65536", Some((&base, "raw")));
    let mut backing = pattern(9, 4 * MIB as usize);
    backing.truncate(4 * MIB as usize);
    let mut m = Modeled::open(&top, 65536, true, Some(backing)).await;
    m.write(MIB - 10, 10).await;
    m.truncate(3 * MIB).await;
    m.verify("after grow over backing").await;
    m.write(2 * MIB + 5, 5).await; // COW in the grown area must copy zeroes, not backing data
    let model = m.close().await;
    verify_with_qemu(&top, &model, "grow over longer backing").await;
}

/// write_zeroes with and without unmap over every kind of cluster, checked through QEMU's map:
/// unmap=false keeps the host cluster (zero flag with offset), unmap=true frees it.
#[tokio::test]
async fn write_zeroes_unmap_flag() {
    let dir = tmpdir();
    let img = p(&dir, "z.qcow2");
    let o = opts(3, 65536);
    our_create(&img, &o).await;
    let c = 65536u64;
    let mut m = Modeled::open(&img, c, true, None).await;
    m.write(0, 8 * c).await;
    m.zero(0, 2 * c, false).await;
    m.zero(2 * c, 2 * c, true).await;
    m.zero(6 * c, 4 * c, false).await; // half allocated, half not
    m.zero(10 * c, 2 * c, true).await; // nothing allocated
    let model = m.close().await;
    verify_with_qemu(&img, &model, "write_zeroes unmap").await;
    let map = qemu_map(&img, "qcow2");
    let first = &map[0];
    assert_eq!(first["start"].as_u64(), Some(0));
    assert_eq!(first["length"].as_u64(), Some(2 * c));
    assert_eq!(first["zero"].as_bool(), Some(true));
    assert!(
        first.get("offset").is_some(),
        "unmap=false should keep the host clusters: {map}"
    );
    let second = &map[1];
    assert_eq!(second["start"].as_u64(), Some(2 * c));
    assert_eq!(second["zero"].as_bool(), Some(true));
    assert!(
        second.get("offset").is_none(),
        "unmap=true should free the host clusters: {map}"
    );
}

/// Open + close without writes must leave the file byte-identical, read-only and read-write.
async fn untouched_case(path: PathBuf, what: String) {
    let before = std::fs::read(&path).expect("read");
    for ro in [true, false] {
        let node = open_qcow2(&path, ro).await;
        let _ = read_all(&node, MIB).await;
        let _ = our_map(&node).await;
        node.flush().await.expect("flush");
        node.close().await.expect("close");
        drop(node);
        let after = std::fs::read(&path).expect("read");
        if before != after {
            let i = before
                .iter()
                .zip(&after)
                .position(|(a, b)| a != b)
                .unwrap_or(before.len().min(after.len()));
            panic!(
                "{what}: open(read_only={ro}) + close changed the file (len {} -> {}, first difference at byte {i})",
                before.len(),
                after.len()
            );
        }
    }
}

#[tokio::test]
async fn open_close_without_writes_leaves_file_identical() {
    let dir = tmpdir();
    let mut cases = Cases::default();
    let mut images: Vec<(PathBuf, String)> = Vec::new();
    // qemu-made images of several kinds, with data.
    for (name, o) in [
        ("v2", "compat=0.10,cluster_size=4096"),
        ("v3", "compat=1.1"),
        ("ext", "extended_l2=on"),
        ("rc1", "refcount_bits=1,cluster_size=512"),
        ("lazy", "lazy_refcounts=on"),
    ] {
        let img = p(&dir, &format!("q-{name}.qcow2"));
        qemu_create_qcow2(&img, 2 * MIB, o, None);
        qemu_io(
            &img,
            "qcow2",
            &["write -P 1 0 100k", "write -z 200k 64k", "discard 64k 64k"],
        );
        images.push((img, format!("qemu {o}")));
    }
    // One with a persistent bitmap (autoclear bit set) and one with a backing file.
    let bm = p(&dir, "q-bitmap.qcow2");
    qemu_create_qcow2(&bm, 2 * MIB, "", None);
    qemu_img(&["bitmap", "--add", bm.to_str().expect("path"), "b0"]);
    qemu_io(&bm, "qcow2", &["write -P 1 0 100k"]);
    images.push((bm.clone(), "qemu with bitmap".into()));
    let top = p(&dir, "q-top.qcow2");
    qemu_create_qcow2(&top, 3 * MIB, "", Some((&images[1].0, "qcow2")));
    qemu_io(&top, "qcow2", &["write -P 3 1M 5000"]);
    images.push((top, "qemu overlay".into()));
    // Ours, fresh and written.
    for (name, o) in [
        ("ours-v2", opts(2, 4096)),
        ("ours-v3", opts(3, 65536)),
        (
            "ours-ext",
            CreateOptions {
                extended_l2: true,
                ..opts(3, 65536)
            },
        ),
    ] {
        let img = p(&dir, &format!("{name}.qcow2"));
        our_create(&img, &o).await;
        images.push((img.clone(), format!("{name} fresh")));
        let written = p(&dir, &format!("{name}-w.qcow2"));
        our_create(&written, &o).await;
        let mut m = Modeled::open(&written, o.cluster_size, o.version >= 3, None).await;
        write_pattern(&mut m, o.extended_l2).await;
        m.close().await;
        images.push((written, format!("{name} written")));
    }
    for (img, what) in images {
        cases.run(&what.clone(), untouched_case(img, what)).await;
    }
    cases.finish();
}

/// Our overlay on a chain written by QEMU, then written through our engine, is still clean in
/// QEMU's eyes after QEMU writes it too (interleaved sessions).
#[tokio::test]
async fn interleaved_qemu_and_our_sessions() {
    let dir = tmpdir();
    let img = p(&dir, "i.qcow2");
    our_create(&img, &opts(3, 4096)).await;
    let mut m = Modeled::open(&img, 4096, true, None).await;
    m.write(0, 100_000).await;
    m.discard(8192, 8192).await;
    let mut model = m.close().await;
    qemu_io(
        &img,
        "qcow2",
        &["write -P 0x5a 50000 70000", "write -z 0 4096"],
    );
    model[50000..120000].fill(0x5a);
    model[..4096].fill(0);
    verify_with_qemu(&img, &model, "after qemu session").await;
    let mut m = Modeled::open(&img, 4096, true, None).await;
    m.model = model;
    m.verify("our view of qemu session").await;
    m.write(60_000, 100_000).await;
    m.zero(0, 20_000, true).await;
    let model = m.close().await;
    verify_with_qemu(&img, &model, "after second session").await;
}

/// Minimal reproduction: on a v2 image without backing file, write_zeroes(unmap=false) over an
/// allocated cluster deallocates the L2 entry but must also free the host cluster.
#[tokio::test]
async fn v2_write_zeroes_without_unmap_does_not_leak() {
    let dir = tmpdir();
    let img = p(&dir, "v2z.qcow2");
    our_create(&img, &opts(2, 65536)).await;
    let mut m = Modeled::open(&img, 65536, false, None).await;
    m.write(0, 65536).await;
    m.zero(0, 65536, false).await;
    let model = m.close().await;
    verify_with_qemu(&img, &model, "v2 write_zeroes unmap=false").await;
}

/// Writing to an image that carries a persistent dirty bitmap (made by QEMU): our engine does not
/// maintain bitmaps, so it clears the autoclear bit (as the spec asks of such programs). QEMU
/// then ignores the bitmaps; their clusters show up as leaks (QEMU says so itself), but there
/// must be no corruption and the contents must be what we wrote.
#[tokio::test]
async fn write_to_image_with_persistent_bitmap() {
    let dir = tmpdir();
    let img = p(&dir, "bm.qcow2");
    qemu_create_qcow2(&img, 4 * MIB, "", None);
    qemu_img(&["bitmap", "--add", img.to_str().expect("path"), "b0"]);
    qemu_io(&img, "qcow2", &["write -P 1 0 100k"]);
    let mut m = Modeled::open(&img, 65536, true, None).await;
    m.model[..100 * 1024].fill(1);
    m.write(50_000, 200_000).await;
    m.discard(MIB, MIB).await;
    let model = m.close().await;
    let (code, v, desc) = qemu_check(&img, "qcow2");
    assert!(code == 0 || code == 3, "check failed:\n{desc}");
    assert_eq!(v["corruptions"].as_u64().unwrap_or(0), 0, "{desc}");
    assert_eq!(v["check-errors"].as_u64().unwrap_or(0), 0, "{desc}");
    assert!(
        desc.contains("bitmaps are now considered inconsistent"),
        "{desc}"
    );
    let raw = p(&dir, "model.raw");
    write_file(&raw, &model);
    assert_compare(&raw, "raw", &img, "qcow2");
}

/// Compressed clusters written by our engine (`Qcow2::write_compressed`, what `convert -c`
/// uses): QEMU reads them, check is clean, maps agree; then overwriting and discarding them
/// frees their space.
async fn compressed_case(version: u32, cs: u64, ctype: CompressionType, extended: bool) {
    use diskstream_block::format::qcow2::Qcow2;
    let dir = tmpdir();
    let img = p(&dir, "c.qcow2");
    let size = 16 * cs + 3 * 512;
    let o = CreateOptions {
        size,
        cluster_size: cs,
        version,
        compression_type: ctype,
        extended_l2: extended,
        ..Default::default()
    };
    our_create(&img, &o).await;
    let what = format!("compressed v{version} cluster {cs} {ctype:?} ext {extended}");
    let mut m = Modeled::open(&img, cs, version >= 3, None).await;
    {
        let q = m.node.as_any().downcast_ref::<Qcow2>().expect("qcow2 node");
        let mut c = 0;
        while c * cs < size {
            let len = cs.min(size - c * cs) as usize;
            let data: Vec<u8> = match c % 4 {
                // Incompressible: falls back to a normal write.
                3 => pattern(c, len),
                _ => (0..len)
                    .map(|i| b"compress me "[(i + c as usize) % 12])
                    .collect(),
            };
            if c != 5 {
                q.write_compressed(c * cs, &data)
                    .await
                    .unwrap_or_else(|e| panic!("{what}: write_compressed cluster {c}: {e}"));
                m.model[(c * cs) as usize..(c * cs) as usize + len].copy_from_slice(&data);
            }
            c += 1;
        }
    }
    m.verify(&format!("{what} after compressed writes")).await;
    let model = m.close().await;
    verify_with_qemu(&img, &model, &what).await;
    // Compressed clusters are packed like QEMU packs them: the twelve compressible clusters
    // (a few hundred bytes each) share host clusters instead of taking one each. (A 512-byte
    // cluster has room for one 512-byte-aligned compressed cluster only.)
    let (_, v, desc) = qemu_check(&img, "qcow2");
    let end = v["image-end-offset"].as_u64().expect("image-end-offset");
    let meta_clusters = if cs <= 4096 { 12 } else { 6 };
    assert!(
        cs == 512 || end <= (meta_clusters + 4 + 2) * cs,
        "{what}: compressed clusters not packed, image ends at {end}:\n{desc}"
    );
    let mut m = Modeled::open(&img, cs, version >= 3, None).await;
    m.model = model;
    m.write(cs + 7, 100).await; // partial overwrite of a compressed cluster
    m.discard(2 * cs, cs).await;
    m.zero(4 * cs, cs, false).await;
    m.write(6 * cs, cs).await;
    let model = m.close().await;
    verify_with_qemu(&img, &model, &format!("{what} rewritten")).await;
}

#[tokio::test]
async fn compressed_writes() {
    let mut cases = Cases::default();
    for (version, cs, ctype, ext) in [
        (3u32, 65536u64, CompressionType::Zlib, false),
        (3, 65536, CompressionType::Zstd, false),
        (2, 4096, CompressionType::Zlib, false),
        (3, 512, CompressionType::Zlib, false),
        (3, 2 * MIB, CompressionType::Zstd, false),
        (3, 65536, CompressionType::Zlib, true),
    ] {
        cases
            .run(
                &format!("compressed v{version} {cs} {ctype:?} ext {ext}"),
                compressed_case(version, cs, ctype, ext),
            )
            .await;
    }
    cases.finish();
}

/// Many L2 tables with 2 MiB clusters (the L2 cache holds only 16 of them): tables are evicted
/// (flushing dirty ones) and reloaded while writing; everything must survive.
#[tokio::test]
async fn l2_cache_eviction_2m_clusters() {
    let dir = tmpdir();
    let img = p(&dir, "big.qcow2");
    let cs = 2 * MIB;
    let l2_span = cs * (cs / 8); // 512 GiB
    let tables = 24u64;
    let o = CreateOptions {
        size: tables * l2_span,
        cluster_size: cs,
        ..Default::default()
    };
    our_create(&img, &o).await;
    let node = open_qcow2(&img, false).await;
    // The second pass writes next to the first (same cluster, in place) in reverse order, so
    // evicted tables are reloaded and dirtied again.
    let spot = |i: u64, pass: u64| i * l2_span + (i * 7919) % (l2_span - MIB) + pass * 6000;
    for pass in 0..2u64 {
        for i in 0..tables {
            let i = if pass == 1 { tables - 1 - i } else { i };
            let b = (1 + i + pass * 64) as u8;
            node.write(spot(i, pass), &vec![b; 5000])
                .await
                .expect("write");
        }
    }
    for pass in 0..2u64 {
        for i in 0..tables {
            let mut buf = vec![0u8; 5000];
            node.read(spot(i, pass), &mut buf).await.expect("read");
            let b = (1 + i + pass * 64) as u8;
            assert!(buf.iter().all(|&x| x == b), "table {i} pass {pass}");
        }
    }
    node.close().await.expect("close");
    drop(node);
    assert_check_clean(&img);
    let mut cmds = Vec::new();
    for pass in 0..2u64 {
        for i in 0..tables {
            cmds.push(format!(
                "read -P {} {} 5000",
                1 + i + pass * 64,
                spot(i, pass)
            ));
        }
    }
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&img, "qcow2", &refs);
    // Maps of a window around each written spot (a whole-image map walks every cluster).
    let node = open_qcow2(&img, true).await;
    for i in 0..tables {
        let start = spot(i, 0) / cs * cs;
        let len = 2 * cs;
        let ours = diskstream_block::status::map_range(&node, start, len)
            .await
            .expect("map");
        let ours = serde_json::to_value(&ours).expect("json");
        let out = qemu_img(&[
            "map".to_string(),
            "--output=json".into(),
            "-f".into(),
            "qcow2".into(),
            format!("--start-offset={start}"),
            format!("--max-length={len}"),
            img.display().to_string(),
        ]);
        let qemu: Value = serde_json::from_str(&out).expect("map json");
        assert_maps_equal(&ours, &qemu, &format!("window of table {i}"));
    }
}

/// An image with an internal snapshot (made by QEMU): its clusters and L2 tables are shared
/// (refcount 2, no COPIED flag). Our writes must copy on write; the snapshot keeps its data.
async fn snapshot_case(cs: u64) {
    let dir = tmpdir();
    let img = p(&dir, "snap.qcow2");
    qemu_create_qcow2(&img, 3 * MIB, &format!("cluster_size={cs}"), None);
    qemu_io(
        &img,
        "qcow2",
        &[
            "write -P 0x31 0 1M",
            "write -z 1M 256k",
            "write -P 0x32 2M 5000",
        ],
    );
    let before = qemu_export_raw(&img, "qcow2");
    qemu_img(&["snapshot", "-c", "s1", img.to_str().expect("path")]);
    let mut m = Modeled::open(&img, cs, true, None).await;
    m.model.copy_from_slice(&before);
    m.write(100, 3000).await;
    m.write(cs * 3, cs).await;
    m.discard(cs * 5, cs * 2).await;
    m.zero(MIB - 1000, 3000, false).await;
    m.write(2 * MIB + 1000, 100).await;
    let model = m.close().await;
    verify_with_qemu(&img, &model, &format!("snapshot cluster {cs}")).await;
    // Revert to the snapshot with QEMU: the snapshot's data is intact.
    qemu_img(&["snapshot", "-a", "s1", img.to_str().expect("path")]);
    assert_check_clean(&img);
    let reverted = qemu_export_raw(&img, "qcow2");
    assert_bytes_eq(&reverted, &before, "snapshot contents after our writes");
}

#[tokio::test]
async fn internal_snapshot_copy_on_write() {
    let mut cases = Cases::default();
    for cs in [512u64, 65536] {
        cases
            .run(&format!("snapshot cluster {cs}"), snapshot_case(cs))
            .await;
    }
    cases.finish();
}

/// An empty (0-byte) image: QEMU accepts it, and it can grow from nothing.
#[tokio::test]
async fn zero_size_image_then_grow() {
    let dir = tmpdir();
    let mut cases = Cases::default();
    for (version, cs) in [(3u32, 65536u64), (2, 512)] {
        let img = p(&dir, &format!("empty-v{version}-{cs}.qcow2"));
        cases
            .run(&format!("empty v{version} cluster {cs}"), async move {
                let o = CreateOptions {
                    size: 0,
                    ..opts(version, cs)
                };
                our_create(&img, &o).await;
                assert_check_clean(&img);
                assert_info_matches(&img, &o);
                let mut m = Modeled::open(&img, cs, version >= 3, None).await;
                m.truncate(MIB + 512).await;
                m.write(1000, 5000).await;
                m.write(MIB - 10, 522).await;
                let model = m.close().await;
                verify_with_qemu(&img, &model, "grown from 0").await;
            })
            .await;
    }
    cases.finish();
}

/// The header extensions of a qcow2 v3 image: (type, length, data with its padding), in file
/// order.
fn header_extensions(b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let be32 = |o: usize| u32::from_be_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    let mut off = be32(100) as usize;
    let mut v = Vec::new();
    loop {
        let (ty, len) = (be32(off), be32(off + 4) as usize);
        if ty == 0 {
            return v;
        }
        let padded = len.div_ceil(8) * 8;
        v.push((ty, len as u32, b[off + 8..off + 8 + padded].to_vec()));
        off += 8 + padded;
    }
}

/// Add a header extension to a v3 image made by qemu-img, moving the backing file name after
/// it (what a newer QEMU writing an extension we do not know would leave).
fn add_header_extension(path: &Path, ty: u32, data: &[u8]) {
    let mut b = std::fs::read(path).expect("read image");
    let be32 = |b: &[u8], o: usize| u32::from_be_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    let hlen = be32(&b, 100) as usize;
    let name_off = u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")) as usize;
    let name = b[name_off..name_off + be32(&b, 16) as usize].to_vec();
    let mut out = b[..hlen].to_vec();
    for (t, len, d) in header_extensions(&b) {
        out.extend_from_slice(&t.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&d);
    }
    out.extend_from_slice(&ty.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(8) * 8, 0);
    out.extend_from_slice(&[0u8; 8]);
    let name_at = out.len() as u64;
    out[8..16].copy_from_slice(&name_at.to_be_bytes());
    out.extend_from_slice(&name);
    let end = out.len().max(name_off + name.len());
    out.resize(end, 0);
    b[..end].copy_from_slice(&out);
    std::fs::write(path, &b).expect("write image");
}

/// An extension we do not know (type 0x12345678) survives every header rewrite of ours byte
/// for byte: `rebase -u` (identical to qemu-img's), resize, amend, and the repair of a dirty
/// lazy-refcounts image on a read-write open; `qemu-img check` stays clean throughout.
#[tokio::test]
async fn unknown_header_extension_survives_rewrites() {
    use diskstream_block::format::qcow2::amend::AmendOptions;
    use diskstream_block::format::qcow2::Qcow2;
    let dir = tmpdir();
    let (base, base2, top) = (
        p(&dir, "base.qcow2"),
        p(&dir, "base2.qcow2"),
        p(&dir, "top.qcow2"),
    );
    qemu_create_qcow2(&base, 4 * MIB, "", None);
    qemu_create_qcow2(&base2, 4 * MIB, "", None);
    qemu_create_qcow2(&top, 4 * MIB, "lazy_refcounts=on", Some((&base, "qcow2")));
    qemu_io(&top, "qcow2", &["write -P 9 0 192k"]);
    const TY: u32 = 0x1234_5678;
    add_header_extension(&top, TY, b"not ours: 13");
    let ours = |path: &Path| {
        let b = std::fs::read(path).expect("read");
        header_extensions(&b)
            .into_iter()
            .find(|(t, _, _)| *t == TY)
            .map(|(_, len, d)| (len, d))
    };
    let want = ours(&top).expect("extension added");
    assert_eq!((want.0, &want.1[..12]), (12, &b"not ours: 13"[..]));
    assert_check_clean(&top);
    let qemu_copy = p(&dir, "q.qcow2");
    std::fs::copy(&top, &qemu_copy).expect("copy");

    // rebase -u, as qemu-img does it.
    let node = open_qcow2(&top, false).await;
    node.set_backing_file(Some((base2.display().to_string(), Some("qcow2".into()))))
        .await
        .expect("rebase -u");
    node.close().await.expect("close");
    drop(node);
    qemu_img(&[
        "rebase",
        "-u",
        "-b",
        &base2.display().to_string(),
        "-F",
        "qcow2",
        &qemu_copy.display().to_string(),
    ]);
    assert_eq!(
        std::fs::read(&top).expect("read"),
        std::fs::read(&qemu_copy).expect("read"),
        "rebase -u differs from qemu-img's"
    );
    assert_eq!(ours(&top).as_ref(), Some(&want), "after rebase -u");
    assert_check_clean(&top);

    // Resize (grows the L1 table: a header rewrite).
    let node = open_qcow2(&top, false).await;
    node.truncate(600 * MIB).await.expect("resize");
    node.close().await.expect("close");
    drop(node);
    assert_eq!(ours(&top).as_ref(), Some(&want), "after resize");
    assert_check_clean(&top);

    // Amend (lazy refcounts off and on again).
    for lazy in [false, true] {
        let node = open_qcow2(&top, false).await;
        let q = node.as_any().downcast_ref::<Qcow2>().expect("qcow2");
        q.amend(&AmendOptions {
            lazy_refcounts: Some(lazy),
            ..Default::default()
        })
        .await
        .expect("amend");
        node.close().await.expect("close");
        drop(node);
        assert_eq!(ours(&top).as_ref(), Some(&want), "after amend");
    }

    // Dirty (as a killed lazy-refcounts writer leaves it), then repaired by a read-write open.
    let mut b = std::fs::read(&top).expect("read");
    b[79] |= 1;
    std::fs::write(&top, &b).expect("write");
    let node = open_qcow2(&top, false).await;
    let h = node
        .as_any()
        .downcast_ref::<Qcow2>()
        .expect("qcow2")
        .header()
        .await;
    assert_eq!(h.incompatible_features & 1, 0, "still dirty");
    node.write(256 * KIB, &[7u8; 4096]).await.expect("write");
    node.close().await.expect("close");
    drop(node);
    assert_eq!(std::fs::read(&top).expect("read")[79] & 1, 0);
    assert_eq!(
        ours(&top).as_ref(),
        Some(&want),
        "after the dirty/clean cycle"
    );
    assert_check_clean(&top);
}

/// Raw images: write-zeroes without unmap (ZERO_RANGE), with unmap (hole punching) and discard
/// through our engine leave the same bytes and the same `qemu-img map` as the same requests by
/// `qemu-io -d unmap` on a copy, for aligned and unaligned ranges.
#[tokio::test]
async fn raw_zeroes_and_discard_match_qemu_io() {
    use diskstream_block::format::Format;
    use diskstream_block::image::{open_image, OpenOptions};
    let dir = tmpdir();
    let (ours, theirs) = (p(&dir, "ours.raw"), p(&dir, "theirs.raw"));
    qemu_create_raw(&ours, 4 * MIB);
    qemu_io(&ours, "raw", &["write -P 0x11 0 4M"]);
    std::fs::copy(&ours, &theirs).expect("copy");
    // (operation, offset, length): 'z' zero, 'u' zero with unmap, 'd' discard.
    let ops: [(char, u64, u64); 8] = [
        ('z', 64 * KIB, 128 * KIB),
        ('z', 300 * KIB + 512, 70_000),
        ('u', MIB, 256 * KIB),
        ('u', 3 * MIB / 2 + 4096 + 100, 9000),
        ('u', 1900 * KIB + 7, 5),
        ('d', 2 * MIB, 512 * KIB),
        ('d', 3 * MIB + 1000, 20_000),
        ('d', 3 * MIB + 100 * KIB, 300),
    ];
    let node = open_image(
        &ours,
        &OpenOptions {
            read_only: false,
            format: Some(Format::Raw),
            ..Default::default()
        },
    )
    .await
    .expect("open raw");
    let mut cmds = Vec::new();
    for (op, off, len) in ops {
        match op {
            'z' => {
                node.write_zeroes(off, len, false).await.expect("zero");
                cmds.push(format!("write -z {off} {len}"));
            }
            'u' => {
                node.write_zeroes(off, len, true)
                    .await
                    .expect("zero, unmap");
                cmds.push(format!("write -z -u {off} {len}"));
            }
            _ => {
                node.discard(off, len).await.expect("discard");
                cmds.push(format!("discard {off} {len}"));
            }
        }
    }
    node.close().await.expect("close");
    drop(node);
    let mut args = vec!["-d", "unmap", "-f", "raw"];
    for c in &cmds {
        args.extend(["-c", c.as_str()]);
    }
    let t = theirs.display().to_string();
    args.push(&t);
    let out = run_ok("qemu-io", &args);
    assert!(!out.contains("failed"), "{out}");
    assert_bytes_eq(
        &std::fs::read(&ours).expect("read"),
        &std::fs::read(&theirs).expect("read"),
        "raw contents after zeroes and discards",
    );
    assert_eq!(qemu_map(&ours, "raw"), qemu_map(&theirs, "raw"), "maps");
}
