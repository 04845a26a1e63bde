//! `img convert`: copy a whole chain into a new image, keeping it sparse.
//!
//! The copy is driven by the chain-wide mapping: ranges that read as zero are never read and
//! never written (a fresh target already reads zero there), data ranges are read in chunks and
//! written by several tasks in parallel, and all-zero clusters found in data are skipped too.

use super::{create_raw, open, open_top, parse_format, ChainArgs};
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
    #[command(flatten)]
    chain: ChainArgs,
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

/// Guest bytes one copy batch spans at most (one map query may return less). A batch is read
/// with few requests, checked for zeroes, and written with as few requests as its layout allows
/// (for a qcow2 target usually one: see [`Qcow2::write_pieces`]).
const BATCH: u64 = 2 << 20;

/// Data extents closer than this are read with one request (the gap is read too).
const READ_GAP: u64 = 256 << 10;

/// Run `convert`.
pub async fn convert(a: ConvertArgs) -> Result<()> {
    let (src, dst) = (a.src.clone(), a.dst.clone());
    convert_inner(a)
        .await
        .map_err(|e| super::name_files(&[&dst, &src], e))
}

async fn convert_inner(a: ConvertArgs) -> Result<()> {
    // Everything is validated before the target is created or written.
    if !(1..=16).contains(&a.parallel) {
        // qemu-img's limit and text.
        bail!("Invalid number of coroutines specified. Must be between 1 and 16.");
    }
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
    let src = open_top(&a.src, a.fmt.as_deref(), true, false, &a.chain).await?;
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
    // output's clusters are laid out sequentially (as qemu-img does without -W). A batch hands
    // the turn on as soon as its clusters are allocated, so data writes still overlap.
    let ordered = matches!(out_fmt, Format::Qcow2 | Format::Qed);
    let (turn_tx, turn_rx) = tokio::sync::watch::channel(0u64);
    let turn_tx = Arc::new(turn_tx);
    let ctx = Arc::new(Copier {
        src: Arc::clone(&src),
        dst: Arc::clone(&dst),
        gran,
        fresh,
        compress: a.compress,
        buffers: std::sync::Mutex::new(Vec::new()),
    });
    let mut seq = 0u64;
    let mut pos = 0;
    while pos < size {
        // Gather one batch of extents.
        let mut batch: Vec<Extent> = Vec::new();
        let batch_start = pos;
        let mut skipped = 0;
        while pos < size && pos - batch_start < BATCH {
            let want = (size - pos).min(BATCH - (pos - batch_start));
            let e = status::map_extent(&src, pos, want)
                .await
                .map_err(|e| anyhow!("{e}"))?;
            let (start, mut len, mut zero) = (pos, e.length, e.zero);
            if a.compress {
                // Compressed clusters are written whole (as qemu-img does): a data range is
                // widened to the target's cluster boundaries, a zero range keeps only the whole
                // clusters it covers. `start` is always cluster aligned here.
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
                skipped += len;
                continue;
            }
            batch.push(Extent { start, len, zero });
        }
        pb.inc(skipped);
        if batch.is_empty() {
            continue;
        }
        while tasks.len() >= a.parallel.max(1) {
            if let Some(r) = tasks.join_next().await {
                pb.inc(r.map_err(|e| anyhow!("copy task failed: {e}"))??);
            }
        }
        let ctx = Arc::clone(&ctx);
        let turn = ordered.then(|| Turn {
            me: seq,
            rx: turn_rx.clone(),
            tx: Arc::clone(&turn_tx),
        });
        seq += 1;
        tasks.spawn(async move {
            let r = ctx.copy_batch(&batch, turn.as_ref()).await;
            if let Some(t) = &turn {
                t.done();
            }
            r.map(|_| batch.iter().map(|e| e.len).sum())
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

    /// Let the next task write (also on failure, so no task waits forever). Idempotent.
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

/// One extent of a batch: guest range and whether the source reads as zeroes there.
#[derive(Clone, Copy)]
struct Extent {
    start: u64,
    len: u64,
    zero: bool,
}

/// What a batch does to the target, in guest order.
enum Action {
    /// Write buffer bytes `[at, at+len)` at guest offset `off`.
    Write { off: u64, at: usize, len: usize },
    /// Make `[off, off+len)` read as zeroes.
    Zero { off: u64, len: u64 },
    /// Write buffer bytes `[at, at+len)` compressed at cluster-aligned `off`.
    Compressed { off: u64, at: usize, len: usize },
}

/// What every batch of one conversion shares.
struct Copier {
    src: Arc<dyn BlockNode>,
    dst: Arc<dyn BlockNode>,
    /// Zero-detection granule (target cluster, at least 4 KiB; exactly one cluster with -c).
    gran: u64,
    /// The target was created by us and has no backing file: it reads as zeroes everywhere.
    fresh: bool,
    compress: bool,
    /// Batch buffers for reuse (a fresh buffer would be zero-filled for nothing each time).
    buffers: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl Copier {
    fn take_buffer(&self, len: usize) -> Vec<u8> {
        let mut b = self
            .buffers
            .lock()
            .ok()
            .and_then(|mut v| v.pop())
            .unwrap_or_default();
        b.resize(len, 0);
        b
    }

    fn give_buffer(&self, b: Vec<u8>) {
        if let Ok(mut v) = self.buffers.lock() {
            v.push(b);
        }
    }

    /// Copy one batch of extents (ascending, contiguous or with skipped zero gaps).
    async fn copy_batch(&self, batch: &[Extent], turn: Option<&Turn>) -> Result<()> {
        let err = |e: diskstream_block::BlockError| anyhow!("{e}");
        let base = batch[0].start;
        let span = batch.iter().map(|e| e.start + e.len).max().unwrap_or(base) - base;
        let has_backing = self.dst.backing().is_some();
        let mut buf = self.take_buffer(span as usize);
        let mut old = if has_backing {
            vec![0u8; span as usize]
        } else {
            Vec::new()
        };
        // Read what must be compared or copied, extents close together in one request.
        let needs_read = |e: &Extent| !e.zero || has_backing;
        let mut i = 0;
        while i < batch.len() {
            if !needs_read(&batch[i]) {
                i += 1;
                continue;
            }
            let first = batch[i].start;
            let mut end = first + batch[i].len;
            let mut j = i + 1;
            while j < batch.len() && needs_read(&batch[j]) && batch[j].start - end < READ_GAP {
                end = batch[j].start + batch[j].len;
                j += 1;
            }
            let r = (first - base) as usize..(end - base) as usize;
            let res = self.src.read(first, &mut buf[r.clone()]).await;
            if let Err(e) = res {
                self.give_buffer(buf);
                return Err(err(e));
            }
            if has_backing {
                diskstream_block::node::read_backing(
                    self.dst.backing().as_ref(),
                    first,
                    &mut old[r],
                )
                .await
                .map_err(err)?;
            }
            i = j;
        }
        let mut actions = Vec::new();
        for e in batch {
            self.plan_extent(e, base, &buf, &old, has_backing, &mut actions);
        }
        if let Some(t) = turn {
            t.wait().await;
        }
        let buf = self.execute(&actions, buf, turn).await?;
        self.give_buffer(buf);
        Ok(())
    }

    /// Decide what extent `e` needs written (see the module documentation).
    fn plan_extent(
        &self,
        e: &Extent,
        base: u64,
        buf: &[u8],
        old: &[u8],
        has_backing: bool,
        actions: &mut Vec<Action>,
    ) {
        let gran = self.gran;
        let (start, len) = (e.start, e.len);
        if e.zero && !has_backing {
            actions.push(Action::Zero { off: start, len });
            return;
        }
        let at = |off: u64| (off - base) as usize;
        // Whether the target already holds the granule `[a, b)` (offsets in the extent).
        let skip = |a: u64, b: u64| {
            let piece = &buf[at(start + a)..at(start + b)];
            if has_backing {
                piece == &old[at(start + a)..at(start + b)]
            } else {
                self.fresh && is_zero(piece)
            }
        };
        // Walk granules aligned to the target's clusters; write runs of granules that matter.
        let mut i = 0u64;
        while i < len {
            let g_end = (((start + i) / gran + 1) * gran - start).min(len);
            if skip(i, g_end) {
                i = g_end;
                continue;
            }
            if self.compress {
                let whole = (start + i) % gran == 0
                    && (g_end - i == gran || start + g_end == self.dst.size());
                let (off, at, len) = (start + i, at(start + i), (g_end - i) as usize);
                actions.push(if whole {
                    Action::Compressed { off, at, len }
                } else {
                    Action::Write { off, at, len }
                });
                i = g_end;
                continue;
            }
            // Extend the run over following granules that also need writing.
            let mut j = g_end;
            while j < len {
                let n_end = (j + gran).min(len);
                if skip(j, n_end) {
                    break;
                }
                j = n_end;
            }
            let r = at(start + i)..at(start + j);
            if !self.fresh && !has_backing && is_zero(&buf[r.clone()]) {
                actions.push(Action::Zero {
                    off: start + i,
                    len: j - i,
                });
            } else {
                actions.push(Action::Write {
                    off: start + i,
                    at: r.start,
                    len: r.len(),
                });
            }
            i = j;
        }
    }

    /// Apply `actions` in order; hands the buffer back. Consecutive writes to a qcow2 target go
    /// out as one batch, which releases the turn once the last of them is allocated.
    async fn execute(
        &self,
        actions: &[Action],
        mut buf: Vec<u8>,
        turn: Option<&Turn>,
    ) -> Result<Vec<u8>> {
        let err = |e: diskstream_block::BlockError| anyhow!("{e}");
        let qcow2 = self.dst.as_any().downcast_ref::<Qcow2>();
        let mut i = 0;
        while i < actions.len() {
            match actions[i] {
                Action::Zero { off, len } => {
                    self.dst.write_zeroes(off, len, true).await.map_err(err)?;
                    i += 1;
                }
                Action::Compressed { off, at, len } => {
                    let q = qcow2.ok_or_else(|| anyhow!("compressed output needs qcow2"))?;
                    q.write_compressed(off, &buf[at..at + len])
                        .await
                        .map_err(err)?;
                    i += 1;
                }
                Action::Write { .. } => {
                    let mut pieces = Vec::new();
                    while let Some(Action::Write { off, at, len }) = actions.get(i) {
                        pieces.push((*off, *at..*at + *len));
                        i += 1;
                    }
                    match qcow2 {
                        Some(q) => {
                            let last = i == actions.len();
                            let release = || {
                                if let Some(t) = turn {
                                    t.done();
                                }
                            };
                            let cb: Option<&(dyn Fn() + Sync)> =
                                if last { Some(&release) } else { None };
                            buf = q.write_pieces(buf, &pieces, cb).await.map_err(err)?;
                        }
                        None => {
                            for (off, r) in pieces {
                                self.dst.write(off, &buf[r]).await.map_err(err)?;
                            }
                        }
                    }
                }
            }
        }
        Ok(buf)
    }
}

/// Whether `buf` holds only zero bytes (word-wise: this runs over every byte copied).
fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(16);
    let words = chunks.by_ref().all(|c| {
        let mut w = [0u8; 16];
        w.copy_from_slice(c);
        u128::from_ne_bytes(w) == 0
    });
    words && chunks.remainder().iter().all(|&b| b == 0)
}
