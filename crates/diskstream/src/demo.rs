//! `diskstream demo`: a self-contained walkthrough on built-in defaults.
//!
//! It builds a three-layer chain (raw base ← qcow2 mid ← qcow2 top) in a scratch directory,
//! writes through the engine at every layer, prints the chain-wide map, flattens the chain with
//! convert, verifies the result byte for byte and checks every qcow2 image it wrote. It is the
//! quickest way to see the block layer work on a fresh machine, and doubles as a smoke test.

use anyhow::{anyhow, bail, Result};
use diskstream_block::format::qcow2::check::{self, RepairMode};
use diskstream_block::format::qcow2::create::{create, CreateOptions};
use diskstream_block::format::Format;
use diskstream_block::image::{open_image, OpenOptions};
use diskstream_block::protocol::file::FileProtocol;
use diskstream_block::status::map_range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MIB: u64 = 1 << 20;

fn err(e: diskstream_block::BlockError) -> anyhow::Error {
    anyhow!("{e}")
}

async fn open_rw(p: &Path, f: Format) -> Result<Arc<dyn diskstream_block::BlockNode>> {
    let o = OpenOptions {
        read_only: false,
        format: Some(f),
        ..Default::default()
    };
    open_image(p, &o).await.map_err(err)
}

/// Run the walkthrough in `dir` (a fresh temporary directory when `None`).
pub async fn run(dir: Option<PathBuf>) -> Result<()> {
    let dir = match dir {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            d
        }
        None => {
            let d = std::env::temp_dir().join(format!("diskstream-demo-{}", std::process::id()));
            std::fs::create_dir_all(&d)?;
            d
        }
    };
    println!("working in {}", dir.display());
    let base = dir.join("base.raw");
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    let flat = dir.join("flat.raw");

    crate::img::create_raw(&base, 64 * MIB, Default::default()).await?;
    let b = open_rw(&base, Format::Raw).await?;
    b.write(0, &vec![0xbb; 8 * MIB as usize])
        .await
        .map_err(err)?;
    b.close().await.map_err(err)?;
    println!("base.raw: 64 MiB raw, first 8 MiB = 0xbb");

    let mk = |backing: &str, fmt: &str| CreateOptions {
        size: 64 * MIB,
        backing_file: Some(backing.to_string()),
        backing_fmt: Some(fmt.to_string()),
        ..Default::default()
    };
    create(&mid, &mk("base.raw", "raw")).await.map_err(err)?;
    let m = open_rw(&mid, Format::Qcow2).await?;
    m.write(4 * MIB, &vec![0x33; 4 * MIB as usize])
        .await
        .map_err(err)?;
    m.write_zeroes(16 * MIB, 2 * MIB, false)
        .await
        .map_err(err)?;
    m.close().await.map_err(err)?;
    println!("mid.qcow2: backed by base.raw; 4 MiB of 0x33 at 4 MiB, zeroes at 16 MiB");

    create(&top, &mk("mid.qcow2", "qcow2")).await.map_err(err)?;
    let t = open_rw(&top, Format::Qcow2).await?;
    t.write(6 * MIB + 123, &vec![0x77; 100_000])
        .await
        .map_err(err)?;
    t.flush().await.map_err(err)?;
    println!("top.qcow2: backed by mid.qcow2; 100000 bytes of 0x77 at 6 MiB + 123 (unaligned)\n");

    println!("chain-wide map of top.qcow2 (depth 0 = top):");
    for e in map_range(&t, 0, t.size()).await.map_err(err)? {
        println!(
            "  {:>10} +{:<10} depth {} {}",
            e.start,
            e.length,
            e.depth,
            match (e.present, e.data, e.zero) {
                (false, _, _) => "unallocated (zero)",
                (true, true, _) => "data",
                _ => "zero",
            }
        );
    }
    t.close().await.map_err(err)?;

    // Flatten and verify.
    let src = open_image(
        &top,
        &OpenOptions {
            format: Some(Format::Qcow2),
            ..Default::default()
        },
    )
    .await
    .map_err(err)?;
    crate::img::create_raw(&flat, src.size(), Default::default()).await?;
    let dst = open_rw(&flat, Format::Raw).await?;
    let mut buf = vec![0u8; MIB as usize];
    let mut expect = vec![0u8; 64 * MIB as usize];
    expect[..8 * MIB as usize].fill(0xbb);
    expect[4 * MIB as usize..8 * MIB as usize].fill(0x33);
    expect[6 * MIB as usize + 123..6 * MIB as usize + 123 + 100_000].fill(0x77);
    for off in (0..src.size()).step_by(MIB as usize) {
        src.read(off, &mut buf).await.map_err(err)?;
        if buf[..] != expect[off as usize..(off + MIB) as usize] {
            bail!("content mismatch in the MiB at {off}");
        }
        dst.write(off, &buf).await.map_err(err)?;
    }
    dst.close().await.map_err(err)?;
    println!("\nflattened the chain into flat.raw: every byte matches the expected model");

    for img in [&mid, &top] {
        let f = Arc::new(FileProtocol::open(img, true).map_err(err)?);
        let r = check::check(f, RepairMode::None).await.map_err(err)?;
        if r.exit_code() != 0 {
            bail!("{}: check found problems: {:?}", img.display(), r);
        }
        println!("{}: consistent (check clean)", img.display());
    }
    println!(
        "\ninspect with: diskstream img info --backing-chain {}",
        top.display()
    );
    Ok(())
}
