//! `diskstream img`: qemu-img compatible image utilities.
//!
//! Each subcommand parses qemu-img style arguments, calls the block library, and reports errors
//! as one line naming the image and the problem, with a non-zero exit code. Nothing is written
//! to an image before all arguments have been validated.

mod check_cmd;
mod convert;
pub mod opts;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use diskstream_block::format::qcow2::create::{CreateOptions, Preallocation};
use diskstream_block::format::qcow2::header::CompressionType;
use diskstream_block::format::qcow2::Qcow2;
use diskstream_block::format::Format;
use diskstream_block::image::{self, OpenOptions};
use diskstream_block::node::BlockNode;
use diskstream_block::status;
use opts::{human_size, parse_bool, parse_kv, parse_size};
use serde_json::{json, Value};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Output format of reporting commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable text (default).
    Human,
    /// JSON, as `qemu-img --output=json`.
    Json,
}

/// The `img` subcommands.
#[derive(Subcommand)]
pub enum ImgCommand {
    /// Create an image: create [-f fmt] [-b backing -F fmt] [-o opts] FILE [SIZE]
    Create(CreateArgs),
    /// Show image information.
    Info(InfoArgs),
    /// Show the allocation map of an image's whole chain.
    Map(MapArgs),
    /// Check an image for consistency (exit 0 clean, 1 check error, 2 corruptions, 3 leaks).
    Check(CheckArgs),
    /// Compare the guest contents of two images (exit 0 identical, 1 different, 2 error).
    Compare(CompareArgs),
    /// Convert an image (with its chain) to another format or a fresh file.
    Convert(convert::ConvertArgs),
    /// Change an image's backing file (safe mode copies the differences).
    Rebase(RebaseArgs),
    /// Commit an image's data into its backing file.
    Commit(CommitArgs),
    /// Resize an image.
    Resize(ResizeArgs),
}

/// Arguments of `create`.
#[derive(Args)]
pub struct CreateArgs {
    /// Image format (qcow2 or raw).
    #[arg(short = 'f', default_value = "raw")]
    fmt: String,
    /// Backing file name to record (relative names resolve against the image's directory).
    #[arg(short = 'b')]
    backing: Option<String>,
    /// Backing file format (required with -b: formats are never guessed).
    #[arg(short = 'F')]
    backing_fmt: Option<String>,
    /// Options: cluster_size, compat, lazy_refcounts, refcount_bits, extended_l2,
    /// compression_type, preallocation, backing_file, backing_fmt, size.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Do not open the backing file (then SIZE is required).
    #[arg(short = 'u')]
    unsafe_backing: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Image file to create.
    file: PathBuf,
    /// Virtual size (k, M, G, T suffixes); defaults to the backing file's size.
    size: Option<String>,
}

/// Arguments of `info`.
#[derive(Args)]
pub struct InfoArgs {
    /// Image format (probed if omitted; backing formats never are).
    #[arg(short = 'f')]
    fmt: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// Show every image of the backing chain.
    #[arg(long)]
    backing_chain: bool,
    /// Open the image even if it is in use (accepted for qemu-img compatibility).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Image file.
    file: PathBuf,
}

/// Arguments of `map`.
#[derive(Args)]
pub struct MapArgs {
    /// Image format.
    #[arg(short = 'f')]
    fmt: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// First byte to map.
    #[arg(long, default_value = "0")]
    start_offset: String,
    /// Bytes to map.
    #[arg(long)]
    max_length: Option<String>,
    /// Open the image even if it is in use (accepted for qemu-img compatibility).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Image file.
    file: PathBuf,
}

/// Arguments of `check`.
#[derive(Args)]
pub struct CheckArgs {
    /// Image format.
    #[arg(short = 'f')]
    pub(crate) fmt: Option<String>,
    /// Repair: `leaks` or `all`.
    #[arg(short = 'r')]
    pub(crate) repair: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Image file.
    file: PathBuf,
}

/// Arguments of `compare`.
#[derive(Args)]
pub struct CompareArgs {
    /// Format of the first image.
    #[arg(short = 'f')]
    fmt1: Option<String>,
    /// Format of the second image.
    #[arg(short = 'F')]
    fmt2: Option<String>,
    /// Strict mode: images of different sizes differ.
    #[arg(short = 's')]
    strict: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// First image.
    file1: PathBuf,
    /// Second image.
    file2: PathBuf,
}

/// Arguments of `rebase`.
#[derive(Args)]
pub struct RebaseArgs {
    /// Image format.
    #[arg(short = 'f')]
    fmt: Option<String>,
    /// New backing file ("" removes the backing link).
    #[arg(short = 'b')]
    backing: String,
    /// Format of the new backing file.
    #[arg(short = 'F')]
    backing_fmt: Option<String>,
    /// Unsafe: only rewrite the header, copy nothing.
    #[arg(short = 'u')]
    unsafe_mode: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Image file.
    file: PathBuf,
}

/// Arguments of `commit`.
#[derive(Args)]
pub struct CommitArgs {
    /// Image format.
    #[arg(short = 'f')]
    fmt: Option<String>,
    /// Base image to commit into (default: the direct backing file).
    #[arg(short = 'b')]
    base: Option<PathBuf>,
    /// Do not empty the image after committing.
    #[arg(short = 'd')]
    keep: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Image file.
    file: PathBuf,
}

/// Arguments of `resize`.
#[derive(Args)]
pub struct ResizeArgs {
    /// Image format.
    #[arg(short = 'f')]
    fmt: Option<String>,
    /// Allow shrinking.
    #[arg(long)]
    shrink: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Image file.
    file: PathBuf,
    /// New size, or +SIZE / -SIZE relative to the current one.
    #[arg(allow_hyphen_values = true)]
    size: String,
}

/// Run one `img` subcommand; returns the process exit code.
pub async fn run(cmd: ImgCommand) -> u8 {
    let res = match cmd {
        ImgCommand::Create(a) => create(a).await.map(|_| 0),
        ImgCommand::Info(a) => info(a).await.map(|_| 0),
        ImgCommand::Map(a) => map(a).await.map(|_| 0),
        ImgCommand::Check(a) => return check_cmd::check(a).await,
        ImgCommand::Compare(a) => return compare(a).await,
        ImgCommand::Convert(a) => convert::convert(a).await.map(|_| 0),
        ImgCommand::Rebase(a) => rebase(a).await.map(|_| 0),
        ImgCommand::Commit(a) => commit(a).await.map(|_| 0),
        ImgCommand::Resize(a) => resize(a).await.map(|_| 0),
    };
    match res {
        Ok(c) => c,
        Err(e) => {
            eprintln!("diskstream: {e:#}");
            1
        }
    }
}

/// Parse a `-f` value.
pub fn parse_format(s: &str) -> Result<Format> {
    s.parse::<Format>().map_err(|e| anyhow!("{e}"))
}

/// Open an image (and chain) for a command.
pub async fn open(path: &Path, fmt: Option<&str>, read_only: bool) -> Result<Arc<dyn BlockNode>> {
    let format = fmt.map(parse_format).transpose()?;
    let opts = OpenOptions {
        read_only,
        format,
        ..Default::default()
    };
    image::open_image(path, &opts)
        .await
        .map_err(|e| anyhow!("{e}"))
}

async fn create(a: CreateArgs) -> Result<()> {
    let fmt = parse_format(&a.fmt)?;
    let kv = parse_kv(&a.options)?;
    let mut o = CreateOptions {
        backing_file: a.backing.clone(),
        backing_fmt: a.backing_fmt.clone(),
        ..Default::default()
    };
    let mut size: Option<u64> = a.size.as_deref().map(parse_size).transpose()?;
    let mut prealloc = Preallocation::Off;
    for (k, v) in &kv {
        match k.as_str() {
            "size" => size = Some(parse_size(v)?),
            "preallocation" => prealloc = v.parse().map_err(|e| anyhow!("{e}"))?,
            "cluster_size" if fmt == Format::Qcow2 => o.cluster_size = parse_size(v)?,
            "compat" if fmt == Format::Qcow2 => {
                o.version = match v.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => bail!("Invalid compatibility level: '{v}'"),
                }
            }
            "lazy_refcounts" if fmt == Format::Qcow2 => o.lazy_refcounts = parse_bool(k, v)?,
            "extended_l2" if fmt == Format::Qcow2 => o.extended_l2 = parse_bool(k, v)?,
            "refcount_bits" if fmt == Format::Qcow2 => {
                o.refcount_bits = v
                    .parse()
                    .map_err(|_| anyhow!("Invalid refcount_bits '{v}'"))?
            }
            "compression_type" if fmt == Format::Qcow2 => {
                o.compression_type = match v.as_str() {
                    "zlib" => CompressionType::Zlib,
                    "zstd" => CompressionType::Zstd,
                    _ => bail!("Invalid parameter '{v}' for compression_type"),
                }
            }
            "backing_file" if fmt == Format::Qcow2 => o.backing_file = Some(v.clone()),
            "backing_fmt" if fmt == Format::Qcow2 => o.backing_fmt = Some(v.clone()),
            _ => bail!("Invalid parameter '{k}' for format {fmt}"),
        }
    }
    o.preallocation = prealloc;
    if let Some(b) = &o.backing_file {
        if fmt != Format::Qcow2 {
            bail!("Format '{fmt}' does not support backing files");
        }
        let Some(bf) = &o.backing_fmt else {
            bail!("Backing file specified without backing format (use -F <fmt>; formats are never guessed)");
        };
        let bformat = parse_format(bf)?;
        if size.is_none() || !a.unsafe_backing {
            let bpath = image::resolve_backing(&a.file, b);
            let opts = OpenOptions {
                read_only: true,
                format: Some(bformat),
                ..Default::default()
            };
            let node = image::open_image(&bpath, &opts)
                .await
                .map_err(|e| anyhow!("Could not open backing image: {e}"))?;
            if size.is_none() {
                size = Some(node.size());
            }
        }
    }
    let size = size.ok_or_else(|| anyhow!("Image creation needs a size parameter"))?;
    o.size = size;
    if !a.quiet {
        match fmt {
            Format::Qcow2 => println!(
                "Formatting '{}', fmt=qcow2 cluster_size={} extended_l2={} compression_type={} size={}{}{} lazy_refcounts={} refcount_bits={}",
                a.file.display(),
                o.cluster_size,
                if o.extended_l2 { "on" } else { "off" },
                if o.compression_type == CompressionType::Zstd { "zstd" } else { "zlib" },
                size,
                o.backing_file.as_ref().map(|b| format!(" backing_file={b}")).unwrap_or_default(),
                o.backing_fmt.as_ref().map(|b| format!(" backing_fmt={b}")).unwrap_or_default(),
                if o.lazy_refcounts { "on" } else { "off" },
                o.refcount_bits
            ),
            Format::Raw => println!("Formatting '{}', fmt=raw size={size}", a.file.display()),
        }
    }
    // Like qemu-img: the message shows the size asked for, the image gets it rounded up to a
    // whole 512-byte sector.
    let size = size.div_ceil(512) * 512;
    o.size = size;
    match fmt {
        Format::Qcow2 => {
            o.validate()
                .map_err(|e| anyhow!("{}: {e}", a.file.display()))?;
            diskstream_block::format::qcow2::create::create(&a.file, &o)
                .await
                .map_err(|e| anyhow!("{}: {e}", a.file.display()))?;
        }
        Format::Raw => create_raw(&a.file, size, prealloc).await?,
    }
    Ok(())
}

/// Create a raw image of `size` bytes.
pub async fn create_raw(path: &Path, size: u64, prealloc: Preallocation) -> Result<()> {
    use diskstream_block::protocol::{file::FileProtocol, Protocol};
    let f = FileProtocol::create(path).map_err(|e| anyhow!("{e}"))?;
    f.set_len(size).await.map_err(|e| anyhow!("{e}"))?;
    match prealloc {
        Preallocation::Off => {}
        Preallocation::Metadata => bail!("Unsupported preallocation mode 'metadata' for raw"),
        Preallocation::Falloc => f.allocate(0, size).await.map_err(|e| anyhow!("{e}"))?,
        Preallocation::Full => f
            .write_zeroes(0, size, false)
            .await
            .map_err(|e| anyhow!("{e}"))?,
    }
    f.flush().await.map_err(|e| anyhow!("{e}"))
}

/// Bytes the file occupies on disk.
fn actual_size(path: &str) -> u64 {
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

async fn image_info(node: &Arc<dyn BlockNode>) -> Result<Value> {
    let name = node.filename().to_string();
    let file_len = std::fs::metadata(&name).map(|m| m.len()).unwrap_or(0);
    let actual = actual_size(&name);
    let mut v = json!({
        "children": [{
            "name": "file",
            "info": {
                "children": [],
                "virtual-size": file_len,
                "filename": name,
                "format": "file",
                "actual-size": actual,
                "format-specific": {"type": "file", "data": {}},
                "dirty-flag": false
            }
        }],
        "virtual-size": node.size(),
        "filename": name,
        "format": node.format_name(),
        "actual-size": actual,
        "dirty-flag": false
    });
    if let Some(q) = node.as_any().downcast_ref::<Qcow2>() {
        let h = q.header().await;
        v["cluster-size"] = json!(h.cluster_size());
        v["dirty-flag"] = json!(h.incompatible_features & 1 != 0);
        let mut data = json!({
            "compat": if h.version >= 3 { "1.1" } else { "0.10" },
            "compression-type": if h.compression_type == 1 { "zstd" } else { "zlib" },
        });
        if h.version >= 3 {
            data["lazy-refcounts"] = json!(h.compatible_features & 1 != 0);
            data["refcount-bits"] = json!(h.refcount_bits());
            data["corrupt"] = json!(h.incompatible_features & 2 != 0);
            data["extended-l2"] = json!(h.extended_l2());
        } else {
            data["refcount-bits"] = json!(h.refcount_bits());
        }
        v["format-specific"] = json!({"type": "qcow2", "data": data});
        if let Some(b) = &h.backing_file {
            v["backing-filename"] = json!(b);
            let full = image::resolve_backing(Path::new(&name), b);
            v["full-backing-filename"] = json!(full.display().to_string());
            if let Some(f) = &h.backing_format {
                v["backing-filename-format"] = json!(f);
            }
        }
    }
    Ok(v)
}

fn print_info_human(v: &Value) {
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    println!("image: {}", s("filename"));
    println!("file format: {}", s("format"));
    println!(
        "virtual size: {} ({} bytes)",
        human_size(n("virtual-size")),
        n("virtual-size")
    );
    println!("disk size: {}", human_size(n("actual-size")));
    if let Some(cs) = v["cluster-size"].as_u64() {
        println!("cluster_size: {cs}");
    }
    if let Some(b) = v["backing-filename"].as_str() {
        println!("backing file: {b}");
        if let Some(f) = v["backing-filename-format"].as_str() {
            println!("backing file format: {f}");
        }
    }
    if let Some(fs) = v["format-specific"].as_object() {
        if fs.get("type").and_then(|t| t.as_str()) == Some("qcow2") {
            println!("Format specific information:");
            let d = &fs["data"];
            for (k, label) in [
                ("compat", "compat"),
                ("compression-type", "compression type"),
                ("lazy-refcounts", "lazy refcounts"),
                ("refcount-bits", "refcount bits"),
                ("corrupt", "corrupt"),
                ("extended-l2", "extended l2"),
            ] {
                if let Some(x) = d.get(k) {
                    let t = match x {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    println!("    {label}: {t}");
                }
            }
        }
    }
    let f = &v["children"][0]["info"];
    println!("Child node '/file':");
    println!("    filename: {}", f["filename"].as_str().unwrap_or(""));
    println!("    protocol type: file");
    let len = f["virtual-size"].as_u64().unwrap_or(0);
    println!("    file length: {} ({len} bytes)", human_size(len));
    println!(
        "    disk size: {}",
        human_size(f["actual-size"].as_u64().unwrap_or(0))
    );
}

async fn info(a: InfoArgs) -> Result<()> {
    let _ = a.force_share;
    let top = open(&a.file, a.fmt.as_deref(), true).await?;
    let layers = if a.backing_chain {
        image::chain_layers(&top)
    } else {
        vec![top]
    };
    let mut infos = Vec::new();
    for l in &layers {
        infos.push(image_info(l).await?);
    }
    match a.output {
        Output::Json => {
            let v = if a.backing_chain {
                Value::Array(infos)
            } else {
                infos.remove(0)
            };
            println!("{}", qemu_json(&v));
        }
        Output::Human => {
            for (i, v) in infos.iter().enumerate() {
                if i > 0 {
                    println!();
                }
                print_info_human(v);
            }
        }
    }
    Ok(())
}

async fn map(a: MapArgs) -> Result<()> {
    let _ = a.force_share;
    let top = open(&a.file, a.fmt.as_deref(), true).await?;
    let size = top.size();
    let start = parse_size(&a.start_offset)?.min(size);
    let len = match &a.max_length {
        Some(l) => parse_size(l)?.min(size - start),
        None => size - start,
    };
    let extents = status::map_range(&top, start, len)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    match a.output {
        Output::Json => {
            // qemu-img prints one object per line inside the array.
            let lines: Vec<String> = extents
                .iter()
                .map(|e| {
                    let mut s = format!(
                        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                        e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
                    );
                    if let Some(o) = e.offset {
                        s.push_str(&format!(", \"offset\": {o}"));
                    }
                    s.push('}');
                    s
                })
                .collect();
            println!("[{}]", lines.join(",\n"));
        }
        Output::Human => {
            let layers = image::chain_layers(&top);
            println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
            for e in &extents {
                if e.data && !e.zero {
                    let Some(off) = e.offset else {
                        bail!("File contains external, encrypted or compressed clusters.");
                    };
                    let file = layers
                        .get(e.depth as usize)
                        .map(|l| l.filename().to_string())
                        .unwrap_or_default();
                    println!("{:<#16x}{:<#16x}{:<#16x}{}", e.start, e.length, off, file);
                }
            }
        }
    }
    Ok(())
}

async fn compare(a: CompareArgs) -> u8 {
    match compare_inner(&a).await {
        Ok(None) => {
            if !a.quiet {
                println!("Images are identical.");
            }
            0
        }
        Ok(Some(msg)) => {
            if !a.quiet {
                println!("{msg}");
            }
            1
        }
        Err(e) => {
            eprintln!("diskstream: {e:#}");
            2
        }
    }
}

async fn compare_inner(a: &CompareArgs) -> Result<Option<String>> {
    let n1 = open(&a.file1, a.fmt1.as_deref(), true).await?;
    let n2 = open(&a.file2, a.fmt2.as_deref(), true).await?;
    let (s1, s2) = (n1.size(), n2.size());
    if a.strict && s1 != s2 {
        return Ok(Some("Strict mode: Image size mismatch!".to_string()));
    }
    let common = s1.min(s2);
    let chunk: u64 = 4 << 20;
    let pb = convert::progress_bar(a.progress, s1.max(s2));
    let mut b1 = vec![0u8; chunk as usize];
    let mut b2 = vec![0u8; chunk as usize];
    let mut pos = 0;
    while pos < common {
        let n = (common - pos).min(chunk) as usize;
        // Skip ranges both sides know to be zero without reading them.
        let e1 = status::map_extent(&n1, pos, n as u64)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        let e2 = status::map_extent(&n2, pos, n as u64)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        if e1.zero && e2.zero {
            let step = e1.length.min(e2.length);
            pos += step;
            pb.inc(step);
            continue;
        }
        n1.read(pos, &mut b1[..n])
            .await
            .map_err(|e| anyhow!("{e}"))?;
        n2.read(pos, &mut b2[..n])
            .await
            .map_err(|e| anyhow!("{e}"))?;
        if b1[..n] != b2[..n] {
            let i = b1[..n]
                .iter()
                .zip(&b2[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0) as u64;
            let sector = (pos + i) / 512 * 512;
            return Ok(Some(format!("Content mismatch at offset {sector}!")));
        }
        pos += n as u64;
        pb.inc(n as u64);
    }
    if s1 != s2 {
        let longer = if s1 > s2 { &n1 } else { &n2 };
        let end = s1.max(s2);
        let mut pos = common;
        while pos < end {
            let n = (end - pos).min(chunk) as usize;
            let e = status::map_extent(longer, pos, n as u64)
                .await
                .map_err(|e| anyhow!("{e}"))?;
            if e.zero {
                pos += e.length;
                continue;
            }
            longer
                .read(pos, &mut b1[..n])
                .await
                .map_err(|e| anyhow!("{e}"))?;
            if let Some(i) = b1[..n].iter().position(|&x| x != 0) {
                let sector = (pos + i as u64) / 512 * 512;
                return Ok(Some(format!("Content mismatch at offset {sector}!")));
            }
            pos += n as u64;
        }
        eprintln!("Warning: Image size mismatch!");
    }
    pb.finish_and_clear();
    Ok(None)
}

async fn rebase(a: RebaseArgs) -> Result<()> {
    let top = open(&a.file, a.fmt.as_deref(), false).await?;
    let q = top
        .as_any()
        .downcast_ref::<Qcow2>()
        .ok_or_else(|| anyhow!("{}: rebase needs a qcow2 image", a.file.display()))?;
    let new = if a.backing.is_empty() {
        None
    } else {
        let f = a.backing_fmt.as_deref().ok_or_else(|| {
            anyhow!("Backing file specified without backing format (use -F <fmt>; formats are never guessed)")
        })?;
        Some((a.backing.clone(), f.to_string()))
    };
    let new_node = match &new {
        Some((b, f)) if !a.unsafe_mode => {
            let path = image::resolve_backing(&a.file, b);
            Some(
                open(&path, Some(f), true)
                    .await
                    .context("Could not open new backing file")?,
            )
        }
        _ => None,
    };
    if !a.unsafe_mode {
        let size = top.size();
        let old = top.backing();
        let chunk: u64 = 1 << 20;
        let pb = convert::progress_bar(a.progress, size);
        let mut ob = vec![0u8; chunk as usize];
        let mut nb = vec![0u8; chunk as usize];
        let mut pos = 0;
        while pos < size {
            let st = top
                .block_status(pos, (size - pos).min(chunk))
                .await
                .map_err(|e| anyhow!("{e}"))?;
            let n = st.len as usize;
            if st.alloc == diskstream_block::node::Allocation::Unallocated {
                diskstream_block::node::read_backing(old.as_ref(), pos, &mut ob[..n])
                    .await
                    .map_err(|e| anyhow!("{e}"))?;
                diskstream_block::node::read_backing(new_node.as_ref(), pos, &mut nb[..n])
                    .await
                    .map_err(|e| anyhow!("{e}"))?;
                if ob[..n] != nb[..n] {
                    top.write(pos, &ob[..n]).await.map_err(|e| anyhow!("{e}"))?;
                }
            }
            pos += n as u64;
            pb.inc(n as u64);
        }
        pb.finish_and_clear();
    }
    q.set_backing_file(new.map(|(b, f)| (b, Some(f))))
        .await
        .map_err(|e| anyhow!("{e}"))?;
    q.set_backing_node(new_node);
    top.close().await.map_err(|e| anyhow!("{e}"))
}

async fn commit(a: CommitArgs) -> Result<()> {
    let top = open(&a.file, a.fmt.as_deref(), true).await?;
    let layers = image::chain_layers(&top);
    if layers.len() < 2 {
        bail!("{}: Image does not have a backing file", a.file.display());
    }
    let base_idx = match &a.base {
        None => 1,
        Some(b) => {
            let want = std::fs::canonicalize(b)
                .with_context(|| format!("Could not open '{}'", b.display()))?;
            layers
                .iter()
                .position(|l| std::fs::canonicalize(l.filename()).ok().as_ref() == Some(&want))
                .filter(|&i| i > 0)
                .ok_or_else(|| {
                    anyhow!(
                        "'{}' is not in the backing chain of '{}'",
                        b.display(),
                        a.file.display()
                    )
                })?
        }
    };
    let base_ro = &layers[base_idx];
    let base = open(
        Path::new(base_ro.filename()),
        Some(base_ro.format_name()),
        false,
    )
    .await?;
    let size = top.size().min(base.size());
    if top.size() > base.size() {
        base.truncate(top.size())
            .await
            .map_err(|e| anyhow!("{e}"))?;
    }
    let size = size.max(top.size());
    let chunk: u64 = 1 << 20;
    let pb = convert::progress_bar(a.progress, size);
    let mut buf = vec![0u8; chunk as usize];
    let mut pos = 0;
    while pos < size {
        let (alloc, n) = status::allocated_above(&top, Some(base_ro), pos, (size - pos).min(chunk))
            .await
            .map_err(|e| anyhow!("{e}"))?;
        if alloc {
            let e = status::map_extent(&top, pos, n)
                .await
                .map_err(|e| anyhow!("{e}"))?;
            let n = e.length;
            if e.zero {
                base.write_zeroes(pos, n, false)
                    .await
                    .map_err(|e| anyhow!("{e}"))?;
            } else {
                top.read(pos, &mut buf[..n as usize])
                    .await
                    .map_err(|e| anyhow!("{e}"))?;
                base.write(pos, &buf[..n as usize])
                    .await
                    .map_err(|e| anyhow!("{e}"))?;
            }
            pos += n;
            pb.inc(n);
        } else {
            pos += n;
            pb.inc(n);
        }
    }
    base.close().await.map_err(|e| anyhow!("{e}"))?;
    pb.finish_and_clear();
    drop(top);
    if !a.keep && base_idx == 1 {
        let top = open(&a.file, a.fmt.as_deref(), false).await?;
        if let Some(q) = top.as_any().downcast_ref::<Qcow2>() {
            q.make_empty().await.map_err(|e| anyhow!("{e}"))?;
        }
        top.close().await.map_err(|e| anyhow!("{e}"))?;
    }
    if !a.quiet {
        println!("Image committed.");
    }
    Ok(())
}

async fn resize(a: ResizeArgs) -> Result<()> {
    let node = open(&a.file, a.fmt.as_deref(), false).await?;
    let cur = node.size();
    let new = if let Some(s) = a.size.strip_prefix('+') {
        cur.checked_add(parse_size(s)?)
            .ok_or_else(|| anyhow!("Image size too large"))?
    } else if let Some(s) = a.size.strip_prefix('-') {
        cur.checked_sub(parse_size(s)?)
            .ok_or_else(|| anyhow!("New image size must be positive"))?
    } else {
        parse_size(&a.size)?
    };
    if new < cur && !a.shrink {
        bail!("Use the --shrink option to perform a shrink operation.");
    }
    node.truncate(new).await.map_err(|e| anyhow!("{e}"))?;
    node.close().await.map_err(|e| anyhow!("{e}"))?;
    if !a.quiet {
        println!("Image resized.");
    }
    Ok(())
}

/// Pretty-prints JSON the way qemu-img does (four-space indentation), so scripts that diff our
/// output against qemu-img's see the same layout.
pub fn qemu_json(v: &Value) -> String {
    use serde::Serialize;
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    match v.serialize(&mut ser) {
        Ok(()) => String::from_utf8_lossy(&out).into_owned(),
        Err(_) => v.to_string(),
    }
}
