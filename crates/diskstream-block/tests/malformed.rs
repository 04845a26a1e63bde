//! Malformed and hostile qcow2 images: every case gives a clean error (or a clean read error),
//! never a panic, a hang or a huge allocation. The seeded mutation loop runs the same entry
//! point as the cargo-fuzz target, so CI covers it on the stable toolchain.

mod common;

use diskstream_block::format::qcow2::create::{create_on, CreateOptions};
use diskstream_block::format::qcow2::Qcow2;
use diskstream_block::fuzzing;
use diskstream_block::node::BlockNode;
use diskstream_block::protocol::mem::MemProtocol;
use diskstream_block::protocol::Protocol;
use diskstream_block::BlockError;
use rand::{Rng, SeedableRng};
use std::sync::Arc;

const CS: usize = 65536;

/// A valid image (8 MiB) with some data written, as bytes.
async fn valid_image(opts: CreateOptions) -> Vec<u8> {
    let mem = Arc::new(MemProtocol::new("seed.qcow2", Vec::new(), false, 1 << 30));
    let file: Arc<dyn Protocol> = mem.clone();
    create_on(Arc::clone(&file), &opts).await.unwrap();
    let q = Qcow2::open(Arc::clone(&file)).await.unwrap();
    q.write(0, &vec![1u8; 100_000]).await.unwrap();
    q.write(5 << 20, &vec![2u8; 3000]).await.unwrap();
    q.write_zeroes(6 << 20, 1 << 20, false).await.unwrap();
    q.close().await.unwrap();
    mem.contents()
}

fn opts() -> CreateOptions {
    CreateOptions {
        size: 8 << 20,
        ..Default::default()
    }
}

async fn open_bytes(data: Vec<u8>) -> Result<Qcow2, BlockError> {
    let file: Arc<dyn Protocol> = Arc::new(MemProtocol::new("bad.qcow2", data, true, 1 << 30));
    Qcow2::open(file).await
}

fn put32(d: &mut [u8], off: usize, v: u32) {
    d[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(d: &mut [u8], off: usize, v: u64) {
    d[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

fn get64(d: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(d[off..off + 8].try_into().unwrap())
}

async fn expect_open_error(data: Vec<u8>, needle: &str) {
    match open_bytes(data).await {
        Ok(_) => panic!("image with '{needle}' problem opened"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.to_lowercase().contains(&needle.to_lowercase()),
                "error '{msg}' does not mention '{needle}'"
            );
        }
    }
}

#[tokio::test]
async fn named_header_defects_fail_cleanly() {
    let good = valid_image(opts()).await;
    assert!(open_bytes(good.clone()).await.is_ok());

    expect_open_error(good[..50].to_vec(), "too small").await;
    expect_open_error(good[..90].to_vec(), "truncated").await;

    let mut d = good.clone();
    d[0] = b'X';
    expect_open_error(d, "magic").await;

    let mut d = good.clone();
    put32(&mut d, 4, 4);
    expect_open_error(d, "version").await;

    let mut d = good.clone();
    put32(&mut d, 20, 30);
    expect_open_error(d, "cluster size").await;

    // Huge l1_size (QEMU caps the L1 at 32 MiB).
    let mut d = good.clone();
    put32(&mut d, 36, u32::MAX);
    expect_open_error(d, "L1 table too large").await;

    // L1 past the end of the file.
    let mut d = good.clone();
    put64(&mut d, 40, 1 << 40);
    expect_open_error(d, "past the end").await;

    // L1 offset unaligned.
    let mut d = good.clone();
    put64(&mut d, 40, 3 * CS as u64 + 8);
    expect_open_error(d, "L1 table offset").await;

    // Refcount table overlapping the header.
    let mut d = good.clone();
    put64(&mut d, 48, 0);
    expect_open_error(d, "overlaps the header").await;

    // Refcount table of absurd size.
    let mut d = good.clone();
    put32(&mut d, 56, 1 << 20);
    expect_open_error(d, "too large").await;

    // Refcount order beyond 64 bits.
    let mut d = good.clone();
    put32(&mut d, 96, 7);
    expect_open_error(d, "refcount width").await;

    // Unknown incompatible feature.
    let mut d = good.clone();
    put64(&mut d, 72, 1 << 40);
    expect_open_error(d, "incompatible feature").await;

    // Backing file name longer than 1023 bytes / outside the cluster.
    let mut d = good.clone();
    put64(&mut d, 8, 4096);
    put32(&mut d, 16, 5000);
    expect_open_error(d, "backing file name").await;

    // Virtual size larger than the L1 can map.
    let mut d = good.clone();
    put64(&mut d, 24, 1 << 50);
    expect_open_error(d, "L1 table is too small").await;

    // Encryption is refused, not misread.
    let mut d = good.clone();
    put32(&mut d, 32, 2);
    expect_open_error(d, "encrypted").await;
}

#[tokio::test]
async fn unaligned_l2_offset_is_a_corruption_error_on_access() {
    let mut d = valid_image(opts()).await;
    let l1_off = get64(&d, 40) as usize;
    let l2 = get64(&d, l1_off);
    put64(&mut d, l1_off, l2 + 512);
    let q = open_bytes(d).await.unwrap();
    let mut buf = vec![0u8; 512];
    let e = q.read(0, &mut buf).await.unwrap_err();
    assert!(e.to_string().contains("not cluster aligned"), "{e}");
    let e = q.block_status(0, 512).await.unwrap_err();
    assert!(matches!(e, BlockError::Corrupt { .. }), "{e}");
}

#[tokio::test]
async fn unaligned_data_offset_is_a_corruption_error_on_access() {
    let mut d = valid_image(opts()).await;
    let l1_off = get64(&d, 40) as usize;
    let l2 = (get64(&d, l1_off) & 0x00ff_ffff_ffff_fe00) as usize;
    let e0 = get64(&d, l2);
    put64(&mut d, l2, e0 + 512);
    let q = open_bytes(d).await.unwrap();
    let mut buf = vec![0u8; 512];
    let e = q.read(0, &mut buf).await.unwrap_err();
    assert!(e.to_string().contains("unaligned"), "{e}");
}

#[tokio::test]
async fn refcount_block_past_eof_is_refused() {
    let mut d = valid_image(opts()).await;
    let rt = get64(&d, 48) as usize;
    put64(&mut d, rt, 1 << 40);
    expect_open_error(d, "past the end").await;
}

/// Random byte mutations of valid images, through the fuzz entry point. Seeded, so a failure
/// reproduces.
#[test]
fn seeded_mutations_never_panic() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let seeds: Vec<Vec<u8>> = rt.block_on(async {
        vec![
            valid_image(opts()).await,
            valid_image(CreateOptions {
                version: 2,
                ..opts()
            })
            .await,
            valid_image(CreateOptions {
                extended_l2: true,
                ..opts()
            })
            .await,
            valid_image(CreateOptions {
                cluster_size: 512,
                refcount_bits: 1,
                ..opts()
            })
            .await,
            valid_image(CreateOptions {
                cluster_size: 4096,
                refcount_bits: 64,
                ..opts()
            })
            .await,
        ]
    });
    drop(rt);
    let iterations: usize = std::env::var("DISKSTREAM_MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_d15c);
    let mut opened = 0;
    for i in 0..iterations {
        let seed = &seeds[i % seeds.len()];
        let mut d = seed.clone();
        // Mutate metadata where it lives (the first clusters) most of the time.
        let hot = (4 * CS).min(d.len());
        for _ in 0..rng.random_range(1..8) {
            let pos = if rng.random_bool(0.8) {
                rng.random_range(0..hot)
            } else {
                rng.random_range(0..d.len())
            };
            d[pos] = match rng.random_range(0..4) {
                0 => 0,
                1 => 0xff,
                2 => d[pos] ^ (1 << rng.random_range(0..8)),
                _ => rng.random(),
            };
        }
        if rng.random_bool(0.05) {
            let cut = rng.random_range(0..d.len());
            d.truncate(cut);
        }
        if fuzzing::qcow2_image(&d) {
            opened += 1;
        }
    }
    // Many mutants must still open, so the loop exercises reads and writes, not only header
    // rejection.
    assert!(
        opened > iterations / 10,
        "only {opened} of {iterations} mutants opened"
    );
}

/// An image with the corrupt bit (incompatible feature bit 1) set, as QEMU leaves one where it
/// found inconsistent metadata: it opens read-only and reads normally, a read-write open is
/// refused with a message saying why and how to repair, and nothing is written; `check -r all`
/// clears the bit, after which `qemu-img check` is clean and the image opens read-write.
#[tokio::test]
async fn corrupt_bit_forces_read_only() {
    use diskstream_block::format::qcow2::check::{check, RepairMode};
    use diskstream_block::format::qcow2::header::INCOMPAT_CORRUPT;
    use diskstream_block::format::Format;
    use diskstream_block::image::{open_image, OpenOptions};
    use diskstream_block::protocol::file::FileProtocol;
    let dir = common::tmpdir();
    let path = dir.path().join("corrupt.qcow2");
    common::qemu_create_qcow2(&path, 4 << 20, "", None);
    common::qemu_io(&path, "qcow2", &["write -P 0x5a 64k 128k"]);
    let mut bytes = std::fs::read(&path).unwrap();
    let incompat = |b: &[u8]| get64(b, 72);
    let flags = incompat(&bytes) | INCOMPAT_CORRUPT;
    put64(&mut bytes, 72, flags);
    std::fs::write(&path, &bytes).unwrap();
    let mut expected = vec![0u8; 4 << 20];
    expected[64 << 10..192 << 10].fill(0x5a);

    let ro = common::open_qcow2(&path, true).await;
    assert_eq!(common::read_all(&ro, 1 << 20).await, expected);
    ro.close().await.unwrap();
    drop(ro);
    let rw = OpenOptions {
        read_only: false,
        format: Some(Format::Qcow2),
        ..Default::default()
    };
    let err = match open_image(&path, &rw).await {
        Ok(_) => panic!("a corrupt image opened read-write"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("corrupt.qcow2")
            && err.contains("marked corrupt")
            && err.contains("check -r all"),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "a refused open wrote");

    let file: Arc<dyn Protocol> = Arc::new(FileProtocol::open(&path, false).unwrap());
    let r = check(file, RepairMode::All).await.unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0));
    let repaired = std::fs::read(&path).unwrap();
    assert_eq!(incompat(&repaired) & INCOMPAT_CORRUPT, 0);
    common::assert_check_clean(&path);
    let node = open_image(&path, &rw).await.unwrap();
    assert_eq!(common::read_all(&node, 1 << 20).await, expected);
    node.close().await.unwrap();
}
