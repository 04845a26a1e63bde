//! `img convert`: copy a whole chain into a new image, keeping it sparse.
//!
//! The copy is driven by the chain-wide mapping: ranges that read as zero are never read and
//! never written (a fresh target already reads zero there), data ranges are read in chunks and
//! written by several tasks in parallel, and all-zero clusters found in data are skipped too.

use super::{create_raw, open, parse_format};
use anyhow::{anyhow, bail, Result};
use clap::Args;
use diskstream_block::format::qcow2::create::Preallocation;
use diskstream_block::format::qcow2::Qcow2;
use diskstream_block::format::Format;
use diskstream_block::node::BlockNode;
use diskstream_block::status;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::task::JoinSet;

/// Arguments of `convert`.
#[derive(Args)]
pub struct ConvertArgs {
    /// Source format.
    #[arg(short = 'f')]
    fmt: Option<String>,
    /// Output format.
    #[arg(short = 'O', default_value = "raw")]
    out_fmt: String,
    /// Output options (as for create).
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Write compressed clusters (qcow2 output).
    #[arg(short = 'c')]
    compress: bool,
    /// Show a progress bar.
    #[arg(short = 'p')]
    progress: bool,
    /// Do not create the target; it must exist.
    #[arg(short = 'n')]
    no_create: bool,
    /// Backing file of the output: only differences from it are written.
    #[arg(short = 'B')]
    backing: Option<String>,
    /// Format of the output's backing file.
    #[arg(short = 'F')]
    backing_fmt: Option<String>,
    /// Parallel requests (like qemu-img -m).
    #[arg(short = 'm', default_value = "8")]
    parallel: usize,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Source image.
    src: PathBuf,
    /// Output image.
    dst: PathBuf,
}

/// A progress bar on stderr when asked for and stderr is a terminal; hidden otherwise.
pub fn progress_bar(enabled: bool, len: u64) -> ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{bar:40} {percent:>3}% {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        pb.set_style(style);
    }
    pb
}

const CHUNK: u64 = 2 << 20;

/// Run `convert`.
pub async fn convert(a: ConvertArgs) -> Result<()> {
    let (src, dst) = (a.src.clone(), a.dst.clone());
    convert_inner(a)
        .await
        .map_err(|e| super::name_files(&[&dst, &src], e))
}

async fn convert_inner(a: ConvertArgs) -> Result<()> {
    // Everything is validated before the target is created or written.
    let out_fmt = parse_format(&a.out_fmt)?;
    if a.compress && out_fmt != Format::Qcow2 {
        bail!("Compression not supported for this file format");
    }
    let mut kv = super::opts::parse_kv(&a.options)?;
    if kv.iter().any(|(k, _)| k == "size") {
        bail!("Invalid parameter 'size'");
    }
    if out_fmt == Format::Raw && a.backing.is_some() {
        bail!("Backing file not supported for file format 'raw'");
    }
    if let Some(b) = &a.backing {
        kv.push(("backing_file".into(), b.clone()));
    }
    if let Some(f) = &a.backing_fmt {
        kv.push(("backing_fmt".into(), f.clone()));
    }
    let spec = super::parse_format_options(out_fmt, &kv)?;
    if out_fmt == Format::Raw && spec.prealloc == Preallocation::Metadata {
        bail!("Unsupported preallocation mode: metadata");
    }
    if spec.opts.backing_file.is_some() && spec.opts.backing_fmt.is_none() {
        bail!(
            "Use of backing file requires explicit backing format (-F; formats are never guessed)"
        );
    }
    let src = open(&a.src, a.fmt.as_deref(), true).await?;
    let size = src.size();
    if !a.no_create {
        let mut o = spec.opts.clone();
        o.size = size;
        match out_fmt {
            Format::Qcow2 => {
                o.validate().map_err(|e| anyhow!("{e}"))?;
                if let (Some(b), Some(f)) = (&o.backing_file, &o.backing_fmt) {
                    let path = diskstream_block::image::resolve_backing(&a.dst, b);
                    open(&path, Some(f), true)
                        .await
                        .map_err(|e| anyhow!("Could not open backing image: {e:#}"))?;
                }
                diskstream_block::format::qcow2::create::create(&a.dst, &o)
                    .await
                    .map_err(|e| anyhow!("{e}"))?
            }
            Format::Raw => create_raw(&a.dst, size, spec.prealloc).await?,
            Format::Qed => {
                let o = spec.qed_options(size);
                o.validate().map_err(|e| anyhow!("{e}"))?;
                if let (Some(b), Some(f)) = (&o.backing_file, &o.backing_fmt) {
                    let path = diskstream_block::image::resolve_backing(&a.dst, b);
                    open(&path, Some(f), true)
                        .await
                        .map_err(|e| anyhow!("Could not open backing image: {e:#}"))?;
                }
                super::create_qed(&a.dst, &spec, size).await?
            }
        }
    }
    let dst = open(&a.dst, Some(out_fmt.name()), false).await?;
    if dst.size() < size {
        bail!("output file is smaller than input file");
    }
    let fresh = !a.no_create && dst.backing().is_none();
    let pb = progress_bar(a.progress && !a.quiet, size);
    // Zero detection works on 4 KiB granules at least (qemu-img's default -S), compression on
    // exactly one target cluster.
    // With extended L2 the target allocates subclusters, so zero runs are skipped at that
    // granularity too (a skipped 4 KiB run stays unallocated there, as with qemu-img).
    let extended = match dst.as_any().downcast_ref::<Qcow2>() {
        Some(q) => q.header().await.extended_l2(),
        None => false,
    };
    let gran = match dst.cluster_size() {
        Some(cs) if a.compress => cs,
        _ if extended => 4096,
        cs => cs.unwrap_or(4096).max(4096),
    };
    let mut tasks: JoinSet<Result<u64>> = JoinSet::new();
    // Reads run in parallel; for allocating formats the writes are issued in guest order so the
    // output's clusters are laid out sequentially (as qemu-img does without -W).
    let ordered = matches!(out_fmt, Format::Qcow2 | Format::Qed);
    let (turn_tx, turn_rx) = tokio::sync::watch::channel(0u64);
    let turn_tx = Arc::new(turn_tx);
    let mut seq = 0u64;
    let mut pos = 0;
    while pos < size {
        let e = status::map_extent(&src, pos, (size - pos).min(CHUNK))
            .await
            .map_err(|e| anyhow!("{e}"))?;
        let (start, mut len, mut zero) = (pos, e.length, e.zero);
        if a.compress {
            // Compressed clusters are written whole (as qemu-img does): a data range is widened
            // to the target's cluster boundaries, a zero range keeps only the whole clusters it
            // covers. `start` is always cluster aligned here.
            let end = start + len;
            let whole = end / gran * gran;
            if zero && whole > start {
                len = whole - start;
            } else {
                zero = false;
                len = (end.div_ceil(gran) * gran).min(size) - start;
            }
        }
        pos += len;
        if zero && fresh {
            pb.inc(len);
            continue;
        }
        while tasks.len() >= a.parallel.max(1) {
            if let Some(r) = tasks.join_next().await {
                pb.inc(r.map_err(|e| anyhow!("copy task failed: {e}"))??);
            }
        }
        let (src, dst) = (Arc::clone(&src), Arc::clone(&dst));
        let compress = a.compress;
        let turn = ordered.then(|| Turn {
            me: seq,
            rx: turn_rx.clone(),
            tx: Arc::clone(&turn_tx),
        });
        seq += 1;
        tasks.spawn(async move {
            let r = copy_range(
                &src,
                &dst,
                start,
                len,
                gran,
                fresh,
                zero,
                compress,
                turn.as_ref(),
            )
            .await;
            if let Some(t) = &turn {
                t.done();
            }
            r.map(|_| len)
        });
    }
    while let Some(r) = tasks.join_next().await {
        pb.inc(r.map_err(|e| anyhow!("copy task failed: {e}"))??);
    }
    pb.finish_and_clear();
    dst.close().await.map_err(|e| anyhow!("{e}"))
}

/// A task's place in the write order.
struct Turn {
    me: u64,
    rx: tokio::sync::watch::Receiver<u64>,
    tx: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Turn {
    async fn wait(&self) {
        let mut rx = self.rx.clone();
        let _ = rx.wait_for(|&t| t >= self.me).await;
    }

    /// Let the next task write (also on failure, so no task waits forever).
    fn done(&self) {
        self.tx.send_if_modified(|t| {
            if *t == self.me {
                *t += 1;
                true
            } else {
                false
            }
        });
    }
}

#[allow(clippy::too_many_arguments)]
async fn copy_range(
    src: &Arc<dyn BlockNode>,
    dst: &Arc<dyn BlockNode>,
    start: u64,
    len: u64,
    gran: u64,
    fresh: bool,
    zero: bool,
    compress: bool,
    turn: Option<&Turn>,
) -> Result<()> {
    let err = |e: diskstream_block::BlockError| anyhow!("{e}");
    let has_backing = dst.backing().is_some();
    if zero && !has_backing {
        if let Some(t) = turn {
            t.wait().await;
        }
        return dst.write_zeroes(start, len, true).await.map_err(err);
    }
    let mut buf = vec![0u8; len as usize];
    src.read(start, &mut buf).await.map_err(err)?;
    if let Some(t) = turn {
        t.wait().await;
    }
    let mut old = if has_backing {
        vec![0u8; len as usize]
    } else {
        Vec::new()
    };
    if has_backing {
        diskstream_block::node::read_backing(dst.backing().as_ref(), start, &mut old)
            .await
            .map_err(err)?;
    }
    // Walk granules aligned to the target's clusters; write runs of granules that matter.
    let mut i = 0u64;
    while i < len {
        let g_end = (((start + i) / gran + 1) * gran - start).min(len);
        let piece = &buf[i as usize..g_end as usize];
        let skip = if has_backing {
            piece == &old[i as usize..g_end as usize]
        } else {
            fresh && piece.iter().all(|&b| b == 0)
        };
        if skip {
            i = g_end;
            continue;
        }
        if compress {
            let q = dst
                .as_any()
                .downcast_ref::<Qcow2>()
                .ok_or_else(|| anyhow!("compressed output needs qcow2"))?;
            if (start + i) % gran == 0 && (g_end - i == gran || start + g_end == dst.size()) {
                q.write_compressed(start + i, piece).await.map_err(err)?;
            } else {
                dst.write(start + i, piece).await.map_err(err)?;
            }
            i = g_end;
            continue;
        }
        // Extend the run over following granules that also need writing.
        let mut j = g_end;
        while j < len {
            let n_end = (j + gran).min(len);
            let p = &buf[j as usize..n_end as usize];
            let s = if has_backing {
                p == &old[j as usize..n_end as usize]
            } else {
                fresh && p.iter().all(|&b| b == 0)
            };
            if s {
                break;
            }
            j = n_end;
        }
        if !fresh && !has_backing && buf[i as usize..j as usize].iter().all(|&b| b == 0) {
            dst.write_zeroes(start + i, j - i, true)
                .await
                .map_err(err)?;
        } else {
            dst.write(start + i, &buf[i as usize..j as usize])
                .await
                .map_err(err)?;
        }
        i = j;
    }
    Ok(())
}
