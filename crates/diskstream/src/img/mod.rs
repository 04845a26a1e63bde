//! `diskstream img`: qemu-img compatible image utilities.
//!
//! Each subcommand parses qemu-img style arguments, calls the block library, and reports errors
//! as one line naming the image and the problem, with a non-zero exit code. Nothing is written
//! to an image before all arguments have been validated.

mod amend_cmd;
mod check_cmd;
mod convert;
pub mod opts;
mod qjson;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use diskstream_block::format::qcow2::create::{CreateOptions, Preallocation};
use diskstream_block::format::qcow2::header::CompressionType;
use diskstream_block::format::qcow2::Qcow2;
use diskstream_block::format::qed::Qed;
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
    /// Change format options of an image in place: amend [-f fmt] -o k=v,... FILE
    Amend(amend_cmd::AmendArgs),
}

/// Options of the commands that open a backing chain.
#[derive(Args, Clone, Debug, Default)]
pub struct ChainArgs {
    /// Format of the image's backing file when the image does not record one (formats of
    /// backing files are never guessed; this names it for the top image's direct backing file).
    #[arg(long = "backing-format", value_name = "FMT")]
    pub backing_format: Option<String>,
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
    #[command(flatten)]
    chain: ChainArgs,
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
    #[command(flatten)]
    chain: ChainArgs,
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
    #[command(flatten)]
    pub(crate) chain: ChainArgs,
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
    #[command(flatten)]
    chain: ChainArgs,
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
    #[command(flatten)]
    chain: ChainArgs,
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
    #[command(flatten)]
    chain: ChainArgs,
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
        ImgCommand::Info(a) => {
            let file = a.file.clone();
            info(a).await.map(|_| 0).map_err(|e| name_file(&file, e))
        }
        ImgCommand::Map(a) => map(a).await.map(|_| 0),
        ImgCommand::Check(a) => return check_cmd::check(a).await,
        ImgCommand::Compare(a) => return compare(a).await,
        ImgCommand::Convert(a) => convert::convert(a).await.map(|_| 0),
        ImgCommand::Rebase(a) => rebase(a).await.map(|_| 0),
        ImgCommand::Commit(a) => {
            let file = a.file.clone();
            commit(a).await.map(|_| 0).map_err(|e| name_file(&file, e))
        }
        ImgCommand::Resize(a) => {
            let file = a.file.clone();
            resize(a).await.map(|_| 0).map_err(|e| name_file(&file, e))
        }
        ImgCommand::Amend(a) => {
            let file = a.file.clone();
            amend_cmd::amend(a)
                .await
                .map(|_| 0)
                .map_err(|e| name_file(&file, e))
        }
    };
    match res {
        Ok(c) => c,
        Err(e) => {
            eprintln!("diskstream: {}", clean_msg(&format!("{e:#}")));
            1
        }
    }
}

/// Parse a `-f` value.
pub fn parse_format(s: &str) -> Result<Format> {
    s.parse::<Format>()
        .map_err(|_| anyhow!("Unknown file format '{s}' (supported: raw, qcow2, qed)"))
}

/// Open an image (and chain) for a command.
pub async fn open(path: &Path, fmt: Option<&str>, read_only: bool) -> Result<Arc<dyn BlockNode>> {
    open_with(path, fmt, read_only, false).await
}

/// Open a user-named top image with the chain options of its command (`--backing-format`),
/// with its backing chain unless `no_backing`.
pub async fn open_top(
    path: &Path,
    fmt: Option<&str>,
    read_only: bool,
    no_backing: bool,
    chain: &ChainArgs,
) -> Result<Arc<dyn BlockNode>> {
    let opts = OpenOptions {
        read_only,
        format: fmt.map(parse_format).transpose()?,
        backing_format: chain
            .backing_format
            .as_deref()
            .map(parse_format)
            .transpose()?,
        no_backing,
        ..Default::default()
    };
    image::open_image(path, &opts)
        .await
        .map_err(|e| anyhow!("{e}"))
}

/// Open an image, with its backing chain unless `no_backing`.
pub async fn open_with(
    path: &Path,
    fmt: Option<&str>,
    read_only: bool,
    no_backing: bool,
) -> Result<Arc<dyn BlockNode>> {
    let format = fmt.map(parse_format).transpose()?;
    let opts = OpenOptions {
        read_only,
        format,
        no_backing,
        ..Default::default()
    };
    image::open_image(path, &opts)
        .await
        .map_err(|e| anyhow!("{e}"))
}

async fn create(a: CreateArgs) -> Result<()> {
    let file = a.file.clone();
    create_inner(a).await.map_err(|e| name_file(&file, e))
}

/// Options of `create` after parsing, with the values as given (for the "Formatting" line).
pub struct CreateSpec {
    fmt: Format,
    /// The qcow2 creation options (size excepted).
    pub opts: CreateOptions,
    /// Preallocation mode (also for raw).
    pub prealloc: Preallocation,
    /// Options set explicitly, as given: key -> text.
    given: std::collections::HashMap<String, String>,
    /// `size` given with `-o`.
    pub size: Option<u64>,
    /// QED `table_size` given with `-o`.
    pub table_size: Option<u64>,
}

impl CreateSpec {
    /// The QED creation options of this spec (`size` set by the caller).
    pub fn qed_options(&self, size: u64) -> diskstream_block::format::qed::create::CreateOptions {
        diskstream_block::format::qed::create::CreateOptions {
            size,
            cluster_size: self.opts.cluster_size,
            table_size: self
                .table_size
                .unwrap_or(diskstream_block::format::qed::header::DEFAULT_TABLE_SIZE as u64),
            backing_file: self.opts.backing_file.clone(),
            backing_fmt: self.opts.backing_fmt.clone(),
        }
    }
}

/// Parse `create`'s options the way qemu-img does (later duplicates win), with its messages.
fn parse_create_options(a: &CreateArgs) -> Result<CreateSpec> {
    let fmt = parse_format(&a.fmt)?;
    let mut kv = parse_kv(&a.options)?;
    if let Some(b) = &a.backing {
        kv.push(("backing_file".into(), b.clone()));
    }
    if let Some(f) = &a.backing_fmt {
        kv.push(("backing_fmt".into(), f.clone()));
    }
    let mut spec = parse_format_options(fmt, &kv)?;
    if let Some(s) = &a.size {
        if spec.size.is_some() {
            bail!("The image size must be specified only once");
        }
        spec.size = Some(parse_size(s)?);
    }
    if spec.size.is_some_and(|s| s > i64::MAX as u64) {
        bail!("Invalid image size specified. Must be between 0 and 9223372036854775807.");
    }
    Ok(spec)
}

/// Parse `-o` options of an output format (create and convert), with qemu-img's messages.
pub fn parse_format_options(fmt: Format, kv: &[(String, String)]) -> Result<CreateSpec> {
    let mut o = CreateOptions::default();
    let mut prealloc = Preallocation::Off;
    let mut given = std::collections::HashMap::new();
    let mut size = None;
    let mut table_size = None;
    let qed_keys = [
        "size",
        "backing_file",
        "backing_fmt",
        "cluster_size",
        "table_size",
        "preallocation",
    ];
    let qcow2_only = [
        "cluster_size",
        "compat",
        "lazy_refcounts",
        "extended_l2",
        "refcount_bits",
        "compression_type",
        "backing_file",
        "backing_fmt",
    ];
    for (k, v) in kv {
        let known = match fmt {
            Format::Qed => qed_keys.contains(&k.as_str()),
            _ => k == "size" || k == "preallocation" || qcow2_only.contains(&k.as_str()),
        };
        if fmt == Format::Raw && k == "backing_file" {
            bail!("Backing file not supported for file format 'raw'");
        }
        if !known || (fmt == Format::Raw && qcow2_only.contains(&k.as_str())) {
            bail!("Invalid parameter '{k}'");
        }
        let expects_size = || {
            anyhow!("Parameter '{k}' expects a non-negative number below 2^64 (optional suffix k, M, G, T, P or E)")
        };
        let rejects = || anyhow!("Parameter '{k}' does not accept value '{v}'");
        match k.as_str() {
            "size" => size = Some(parse_size(v).map_err(|_| expects_size())?),
            "preallocation" => prealloc = v.parse().map_err(|_| rejects())?,
            "cluster_size" => o.cluster_size = parse_size(v).map_err(|_| expects_size())?,
            "table_size" => table_size = Some(parse_size(v).map_err(|_| expects_size())?),
            "compat" => {
                o.version = match v.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => bail!("Parameter 'version' does not accept value '{v}'"),
                }
            }
            "lazy_refcounts" => o.lazy_refcounts = parse_bool(k, v)?,
            "extended_l2" => o.extended_l2 = parse_bool(k, v)?,
            "refcount_bits" => {
                o.refcount_bits = v
                    .parse()
                    .map_err(|_| anyhow!("Parameter 'refcount_bits' expects a number"))?
            }
            "compression_type" => {
                o.compression_type = match v.as_str() {
                    "zlib" => CompressionType::Zlib,
                    "zstd" => CompressionType::Zstd,
                    _ => bail!("Parameter 'compression-type' does not accept value '{v}'"),
                }
            }
            "backing_file" => o.backing_file = Some(v.clone()),
            _ => o.backing_fmt = Some(v.clone()),
        }
        given.insert(k.clone(), v.clone());
    }
    o.preallocation = prealloc;
    if fmt == Format::Qed && prealloc == Preallocation::Metadata {
        bail!("Parameter 'preallocation' does not accept value 'metadata'");
    }
    Ok(CreateSpec {
        fmt,
        opts: o,
        prealloc,
        given,
        size,
        table_size,
    })
}

/// The line qemu-img prints before creating an image.
fn formatting_line(file: &Path, spec: &CreateSpec, size: u64) -> String {
    let given = |k: &str| spec.given.get(k).cloned();
    let opt = |k: &str| given(k).map(|v| format!(" {k}={v}")).unwrap_or_default();
    match spec.fmt {
        Format::Raw => format!(
            "Formatting '{}', fmt=raw size={size}{}",
            file.display(),
            opt("preallocation")
        ),
        Format::Qcow2 => format!(
            "Formatting '{}', fmt=qcow2 cluster_size={} extended_l2={}{} compression_type={} \
             size={size}{}{}{} lazy_refcounts={} refcount_bits={}",
            file.display(),
            spec.opts.cluster_size,
            given("extended_l2").unwrap_or_else(|| "off".into()),
            opt("preallocation"),
            given("compression_type").unwrap_or_else(|| "zlib".into()),
            opt("compat"),
            opt("backing_file"),
            opt("backing_fmt"),
            given("lazy_refcounts").unwrap_or_else(|| "off".into()),
            spec.opts.refcount_bits,
        ),
        Format::Qed => format!(
            "Formatting '{}', fmt=qed size={size}{}{} cluster_size={}{}{}",
            file.display(),
            opt("backing_file"),
            opt("backing_fmt"),
            spec.opts.cluster_size,
            opt("table_size"),
            opt("preallocation"),
        ),
    }
}

async fn create_inner(a: CreateArgs) -> Result<()> {
    let mut spec = parse_create_options(&a)?;
    let fmt = spec.fmt;
    if fmt == Format::Raw && spec.prealloc == Preallocation::Metadata {
        bail!("Unsupported preallocation mode: metadata");
    }
    let mut size = spec.size;
    if let Some(b) = spec.opts.backing_file.clone() {
        if b.is_empty() {
            bail!("Expected backing file name, got empty string");
        }
        let Some(bf) = spec.opts.backing_fmt.clone() else {
            bail!(
                "Backing file specified without backing format (use -F <fmt>; formats are \
                 never guessed)"
            );
        };
        let bformat = parse_format(&bf)?;
        if !a.unsafe_backing {
            let bpath = image::resolve_backing(&a.file, &b);
            let opts = OpenOptions {
                read_only: true,
                format: Some(bformat),
                ..Default::default()
            };
            let node = image::open_image(&bpath, &opts)
                .await
                .map_err(|e| anyhow!("Could not open backing image: {}", clean_msg(&e)))?;
            if size.is_none() {
                size = Some(node.size());
            }
        }
    }
    let size = size.ok_or_else(|| anyhow!("Image creation needs a size parameter"))?;
    // Like qemu-img: the message shows the size asked for, the image gets it rounded up to a
    // whole 512-byte sector.
    spec.opts.size = size.div_ceil(512) * 512;
    if fmt == Format::Qcow2 {
        spec.opts.validate().map_err(|e| anyhow!("{e}"))?;
    }
    if !a.quiet {
        println!("{}", formatting_line(&a.file, &spec, size));
    }
    match fmt {
        Format::Qcow2 => diskstream_block::format::qcow2::create::create(&a.file, &spec.opts)
            .await
            .map_err(|e| anyhow!("{}", clean_msg(&e)))?,
        Format::Qed => create_qed(&a.file, &spec, spec.opts.size).await?,
        Format::Raw => create_raw(&a.file, spec.opts.size, spec.prealloc).await?,
    }
    Ok(())
}

/// A library error as one line, without Rust's " (os error N)" suffixes.
pub fn clean_msg(e: &dyn std::fmt::Display) -> String {
    let mut s = e.to_string();
    while let Some(i) = s.find(" (os error ") {
        match s[i..].find(')') {
            Some(j) => s.replace_range(i..i + j + 1, ""),
            None => break,
        }
    }
    s
}

/// Prefix an error with the image's name unless the message names it already, so every
/// failure is one line that says which file is concerned.
pub fn name_file(file: &Path, e: anyhow::Error) -> anyhow::Error {
    name_files(&[file], e)
}

/// [`name_file`] for commands with several files: no prefix if the message names any of
/// them, else the first one.
pub fn name_files(files: &[&Path], e: anyhow::Error) -> anyhow::Error {
    let msg = clean_msg(&format!("{e:#}"));
    if files.iter().any(|f| msg.contains(&f.display().to_string())) {
        return anyhow!("{msg}");
    }
    match files.first() {
        Some(f) => anyhow!("{}: {msg}", f.display()),
        None => anyhow!("{msg}"),
    }
}

/// Create a QED image of `size` bytes with the spec's options (QED's preallocation option is
/// accepted and, as in qemu-img, has no effect: the file is cut to the metadata).
pub async fn create_qed(path: &Path, spec: &CreateSpec, size: u64) -> Result<()> {
    diskstream_block::format::qed::create::create(path, &spec.qed_options(size))
        .await
        .map_err(|e| anyhow!("{}", clean_msg(&e)))
}

/// Create a raw image of `size` bytes.
pub async fn create_raw(path: &Path, size: u64, prealloc: Preallocation) -> Result<()> {
    use diskstream_block::protocol::{file::FileProtocol, Protocol};
    if prealloc == Preallocation::Metadata {
        bail!("Unsupported preallocation mode: metadata");
    }
    let f = FileProtocol::create(path).map_err(|e| anyhow!("{}", clean_msg(&e)))?;
    let io = |e: diskstream_block::BlockError| anyhow!("{}", clean_msg(&e));
    f.set_len(size).await.map_err(io)?;
    match prealloc {
        Preallocation::Off | Preallocation::Metadata => {
            // As QEMU's file driver does: allocate the first block, so that tools probing the
            // file system's alignment find data there.
            if size > 0 {
                let n = if size < 4096 { 512 } else { 4096 };
                f.write_at(0, &vec![0u8; n]).await.map_err(io)?;
            }
        }
        Preallocation::Falloc => f.allocate(0, size).await.map_err(io)?,
        Preallocation::Full => {
            // Real zeroes, as qemu-img writes them: the file holds data everywhere.
            let zeroes = vec![0u8; size.min(1 << 20) as usize];
            let mut pos = 0;
            while pos < size {
                let n = (size - pos).min(zeroes.len() as u64) as usize;
                f.write_at(pos, &zeroes[..n]).await.map_err(io)?;
                pos += n as u64;
            }
        }
    }
    f.flush().await.map_err(io)
}

/// Bytes the file occupies on disk.
fn actual_size(path: &str) -> u64 {
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

async fn image_info(node: &Arc<dyn BlockNode>) -> Result<Value> {
    let name = node.filename().to_string();
    // QEMU sees files in whole 512-byte sectors.
    let file_len = std::fs::metadata(&name)
        .map(|m| m.len().div_ceil(512) * 512)
        .unwrap_or(0);
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
    if let Some(q) = node.as_any().downcast_ref::<Qed>() {
        // qemu-img 10 shows no format-specific data and never a dirty flag for QED, and names
        // a backing format only when the image records one (raw).
        let h = q.header().await;
        v["cluster-size"] = json!(h.cluster_size);
        if let Some(b) = &h.backing_file {
            v["backing-filename"] = json!(b);
            let full = image::resolve_backing(Path::new(&name), b);
            v["full-backing-filename"] = json!(full.display().to_string());
            if h.backing_is_raw() {
                v["backing-filename-format"] = json!("raw");
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
        match v["full-backing-filename"].as_str() {
            Some(full) if full != b => println!("backing file: {b} (actual path: {full})"),
            Some(_) => println!("backing file: {b}"),
            None => println!("backing file: {b} (cannot determine actual path)"),
        }
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
    let top = open_top(&a.file, a.fmt.as_deref(), true, false, &a.chain).await?;
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
    let file = a.file.clone();
    map_inner(a).await.map_err(|e| name_file(&file, e))
}

/// C's `%#x`: no `0x` prefix for zero.
fn c_hex(v: u64) -> String {
    if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    }
}

async fn map_inner(a: MapArgs) -> Result<()> {
    let _ = a.force_share;
    let start = parse_size(&a.start_offset)
        .ok()
        .filter(|&s| s <= i64::MAX as u64)
        .ok_or_else(|| {
            anyhow!("Invalid start offset specified. Must be between 0 and 9223372036854775807.")
        })?;
    let max_length = match &a.max_length {
        Some(l) => Some(
            parse_size(l)
                .ok()
                .filter(|&s| s <= i64::MAX as u64)
                .ok_or_else(|| anyhow!("Invalid max length specified: '{l}'."))?,
        ),
        None => None,
    };
    let top = open_top(&a.file, a.fmt.as_deref(), true, false, &a.chain).await?;
    let size = top.size();
    let end = match max_length {
        Some(l) => start.saturating_add(l).min(size),
        None => size,
    };
    let mut extents = if start < end {
        status::map_range(&top, start, end - start)
            .await
            .map_err(|e| anyhow!("{e}"))?
    } else {
        Vec::new()
    };
    if extents.is_empty() {
        // qemu-img prints its initial, empty entry when there is nothing to map.
        extents.push(status::MapExtent {
            start,
            length: 0,
            depth: 0,
            present: false,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
        });
    }
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
                if e.data && e.offset.is_none() {
                    bail!("File contains external, encrypted or compressed clusters.");
                }
                if e.data && !e.zero {
                    let file = layers
                        .get(e.depth as usize)
                        .map(|l| l.filename().to_string())
                        .unwrap_or_default();
                    println!(
                        "{:<16}{:<16}{:<16}{}",
                        c_hex(e.start),
                        c_hex(e.length),
                        c_hex(e.offset.unwrap_or(0)),
                        file
                    );
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
        Err((code, e)) => {
            eprintln!("diskstream: {}", clean_msg(&format!("{e:#}")));
            code
        }
    }
}

/// What qemu-img compares in strict mode: the block status word of a range (allocated, zero,
/// data, offset known, compressed, reaches the end of the image).
fn status_word(e: &status::MapExtent, size: u64) -> (bool, bool, bool, bool, bool, bool) {
    (
        e.present,
        e.zero,
        e.data,
        e.offset.is_some(),
        e.compressed,
        e.start + e.length == size,
    )
}

/// qemu-img's `compare`: walk both images by block status; ranges both know to be zero are
/// skipped, ranges allocated in both are read and compared (the first differing 512-byte
/// sector of a range is reported), a range allocated in one only must read as zeroes there.
/// Exit codes as qemu-img: 2 cannot open, 3 block status failed, 4 read failed.
async fn compare_inner(
    a: &CompareArgs,
) -> std::result::Result<Option<String>, (u8, anyhow::Error)> {
    let opened = |path: &Path, e: anyhow::Error| (2u8, name_file(path, e));
    let n1 = open_top(&a.file1, a.fmt1.as_deref(), true, false, &a.chain)
        .await
        .map_err(|e| opened(&a.file1, e))?;
    let n2 = open_top(&a.file2, a.fmt2.as_deref(), true, false, &a.chain)
        .await
        .map_err(|e| opened(&a.file2, e))?;
    let (name1, name2) = (a.file1.display().to_string(), a.file2.display().to_string());
    let (s1, s2) = (n1.size(), n2.size());
    if a.strict && s1 != s2 {
        return Ok(Some("Strict mode: Image size mismatch!".to_string()));
    }
    let st_err = |name: &str| {
        let name = name.to_string();
        move |e: diskstream_block::BlockError| {
            (
                3u8,
                anyhow!("Sector allocation test failed for {name}: {e}"),
            )
        }
    };
    let rd_err = |name: &str, off: u64| {
        let name = name.to_string();
        move |e: diskstream_block::BlockError| {
            (
                4u8,
                anyhow!("Error while reading offset {off} of {name}: {e}"),
            )
        }
    };
    // The first 512-byte sector of `buf` (read at `off`) that is not all zero.
    let nonzero_at = |buf: &[u8], off: u64| {
        buf.iter()
            .position(|&b| b != 0)
            .map(|i| off + i as u64 / 512 * 512)
    };
    let common = s1.min(s2);
    const IO_BUF: u64 = 2 << 20;
    let pb = convert::progress_bar(a.progress, s1.max(s2));
    let mut b1 = vec![0u8; IO_BUF as usize];
    let mut b2 = vec![0u8; IO_BUF as usize];
    let mut pos = 0;
    while pos < common {
        let e1 = status::map_extent(&n1, pos, s1 - pos)
            .await
            .map_err(st_err(&name1))?;
        let e2 = status::map_extent(&n2, pos, s2 - pos)
            .await
            .map_err(st_err(&name2))?;
        let mut chunk = e1.length.min(e2.length).min(common - pos);
        if a.strict && status_word(&e1, s1) != status_word(&e2, s2) {
            return Ok(Some(format!(
                "Strict mode: Offset {pos} block status mismatch!"
            )));
        }
        if e1.zero && e2.zero {
            // Nothing to compare.
        } else if e1.present == e2.present {
            if e1.present {
                chunk = chunk.min(IO_BUF);
                let n = chunk as usize;
                n1.read(pos, &mut b1[..n])
                    .await
                    .map_err(rd_err(&name1, pos))?;
                n2.read(pos, &mut b2[..n])
                    .await
                    .map_err(rd_err(&name2, pos))?;
                if b1[..n] != b2[..n] {
                    let i = b1[..n]
                        .iter()
                        .zip(&b2[..n])
                        .position(|(x, y)| x != y)
                        .unwrap_or(0) as u64;
                    let sector = pos + i / 512 * 512;
                    return Ok(Some(format!("Content mismatch at offset {sector}!")));
                }
            }
        } else {
            chunk = chunk.min(IO_BUF);
            let n = chunk as usize;
            let (node, name) = if e1.present {
                (&n1, &name1)
            } else {
                (&n2, &name2)
            };
            node.read(pos, &mut b1[..n])
                .await
                .map_err(rd_err(name, pos))?;
            if let Some(off) = nonzero_at(&b1[..n], pos) {
                return Ok(Some(format!("Content mismatch at offset {off}!")));
            }
        }
        pos += chunk;
        pb.set_position(pos);
    }
    if s1 != s2 {
        if !a.quiet {
            println!("Warning: Image size mismatch!");
        }
        let (longer, name, end) = if s1 > s2 {
            (&n1, &name1, s1)
        } else {
            (&n2, &name2, s2)
        };
        while pos < end {
            let e = status::map_extent(longer, pos, end - pos)
                .await
                .map_err(st_err(name))?;
            let mut chunk = e.length;
            if e.present && !e.zero {
                chunk = chunk.min(IO_BUF);
                let n = chunk as usize;
                longer
                    .read(pos, &mut b1[..n])
                    .await
                    .map_err(rd_err(name, pos))?;
                if let Some(off) = nonzero_at(&b1[..n], pos) {
                    return Ok(Some(format!("Content mismatch at offset {off}!")));
                }
            }
            pos += chunk;
            pb.set_position(pos);
        }
    }
    pb.finish_and_clear();
    Ok(None)
}

async fn rebase(a: RebaseArgs) -> Result<()> {
    let file = a.file.clone();
    rebase_inner(a).await.map_err(|e| name_file(&file, e))
}

/// qemu-img's `compare_buffers`: whether the first `min.min(len)` bytes of `a` and `b` differ,
/// and how long (in 512-byte steps after that first unit) the run with the same answer is.
fn compare_run(a: &[u8], b: &[u8], min: usize) -> (bool, usize) {
    let len = a.len();
    let mut i = min.min(len);
    let differ = a[..i] != b[..i];
    while i < len {
        let n = (len - i).min(512);
        if (a[i..i + n] != b[i..i + n]) != differ {
            break;
        }
        i += n;
    }
    (differ, i)
}

async fn rebase_inner(a: RebaseArgs) -> Result<()> {
    let new = if a.backing.is_empty() {
        None
    } else {
        let f = a.backing_fmt.as_deref().ok_or_else(|| {
            anyhow!(
                "Could not change the backing file to '{}': backing format must be specified \
                 (-F; formats are never guessed)",
                a.backing
            )
        })?;
        parse_format(f)?;
        Some((a.backing.clone(), f.to_string()))
    };
    // Unsafe mode never needs the old chain (it may be missing: fixing that is what -u is for).
    let top = open_top(&a.file, a.fmt.as_deref(), false, a.unsafe_mode, &a.chain).await?;
    if top.format_name() == "raw" {
        bail!("Could not change the backing file: the raw format has no backing file");
    }
    let new_node = match &new {
        Some((b, f)) if !a.unsafe_mode => {
            let path = image::resolve_backing(&a.file, b);
            Some(
                open(&path, Some(f), true)
                    .await
                    .with_context(|| format!("Could not open new backing file '{b}'"))?,
            )
        }
        _ => None,
    };
    if !a.unsafe_mode {
        // qemu-img's safe mode: for every range the image does not allocate itself, compare
        // what the old and the new backing chain show and write the old contents where they
        // differ, in runs aligned to the image's (sub)clusters.
        let size = top.size();
        let old = top.backing();
        let old_size = old.as_ref().map_or(0, |b| b.size());
        let cs = top.cluster_size().unwrap_or(512);
        let align = match top.as_any().downcast_ref::<Qcow2>() {
            Some(q) if q.header().await.extended_l2() => cs / 32,
            _ => cs,
        };
        let chunk: u64 = 2 << 20;
        let pb = convert::progress_bar(a.progress, size);
        let mut ob = vec![0u8; (chunk + 2 * align) as usize];
        let mut nb = vec![0u8; (chunk + 2 * align) as usize];
        let mut offset = 0;
        while offset < size {
            let st = top
                .block_status(offset, (size - offset).min(chunk))
                .await
                .map_err(|e| anyhow!("{e}"))?;
            if st.alloc != diskstream_block::node::Allocation::Unallocated {
                offset += st.len;
                pb.set_position(offset);
                continue;
            }
            let start = offset / align * align;
            let end = (offset + st.len).div_ceil(align) * align;
            let end = end.min(size);
            let n = (end - start) as usize;
            diskstream_block::node::read_backing(old.as_ref(), start, &mut ob[..n])
                .await
                .map_err(|e| anyhow!("{e}"))?;
            diskstream_block::node::read_backing(new_node.as_ref(), start, &mut nb[..n])
                .await
                .map_err(|e| anyhow!("{e}"))?;
            let mut written = 0usize;
            while written < n {
                let (differ, run) = compare_run(&ob[written..n], &nb[written..n], align as usize);
                let pos = start + written as u64;
                if differ {
                    if pos >= old_size {
                        top.write_zeroes(pos, run as u64, false).await
                    } else {
                        top.write(pos, &ob[written..written + run]).await
                    }
                    .map_err(|e| anyhow!("Error while writing to COW image: {e}"))?;
                }
                written += run;
            }
            offset = end;
            pb.set_position(offset);
        }
        pb.finish_and_clear();
    }
    top.set_backing_file(new.map(|(b, f)| (b, Some(f))))
        .await
        .map_err(|e| anyhow!("Could not change the backing file: {e}"))?;
    top.set_backing_node(new_node);
    top.close().await.map_err(|e| anyhow!("{e}"))
}

async fn commit(a: CommitArgs) -> Result<()> {
    let top = open_top(&a.file, a.fmt.as_deref(), true, false, &a.chain).await?;
    let layers = image::chain_layers(&top);
    if layers.len() < 2 {
        bail!("{}: Image does not have a backing file", a.file.display());
    }
    let base_idx = match &a.base {
        None => 1,
        Some(b) => {
            let want = std::fs::canonicalize(b).ok();
            layers
                .iter()
                .position(|l| want.is_some() && std::fs::canonicalize(l.filename()).ok() == want)
                .filter(|&i| i > 0)
                .ok_or_else(|| {
                    anyhow!(
                        "Did not find '{}' in the backing chain of '{}'",
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
    let size = top.size();
    if size > base.size() {
        base.truncate(size).await.map_err(|e| anyhow!("{e}"))?;
    }
    // Like qemu-img's commit job (a mirror of the top into the base): every granule that holds
    // something above the base is copied whole, granules that read entirely as zero are
    // written as zeroes. The granule is the base's cluster size, clamped to 4 KiB..64 KiB.
    let gran = base.cluster_size().unwrap_or(65536).clamp(4096, 65536);
    let chunk: u64 = 1 << 20;
    let pb = convert::progress_bar(a.progress, size);
    let mut buf = vec![0u8; (chunk + gran) as usize];
    let err = |e: diskstream_block::BlockError| anyhow!("{e}");
    let mut pos = 0;
    while pos < size {
        let (alloc, n) = status::allocated_above(&top, Some(base_ro), pos, (size - pos).min(chunk))
            .await
            .map_err(err)?;
        if !alloc {
            pos += n;
            pb.set_position(pos);
            continue;
        }
        // `pos` is granule aligned or inside a granule copied already.
        let mut p = pos.div_ceil(gran) * gran;
        if p > pos {
            p -= gran;
        }
        let end = ((pos + n).div_ceil(gran) * gran).min(size);
        while p < end {
            let e = status::map_extent(&top, p, end - p).await.map_err(err)?;
            let whole = e.length / gran * gran;
            if e.zero && whole > 0 {
                base.write_zeroes(p, whole, true).await.map_err(err)?;
                p += whole;
                continue;
            }
            let len = ((p + e.length).div_ceil(gran) * gran).min(end) - p;
            let len = len.min(chunk);
            top.read(p, &mut buf[..len as usize]).await.map_err(err)?;
            base.write(p, &buf[..len as usize]).await.map_err(err)?;
            p += len;
        }
        pos = end;
        pb.set_position(pos);
    }
    base.close().await.map_err(err)?;
    pb.finish_and_clear();
    drop(top);
    // As with qemu-img, naming a base implies -d.
    if !a.keep && a.base.is_none() {
        let top = open_with(&a.file, a.fmt.as_deref(), false, true).await?;
        if let Some(q) = top.as_any().downcast_ref::<Qcow2>() {
            q.make_empty().await.map_err(err)?;
        }
        if let Some(q) = top.as_any().downcast_ref::<Qed>() {
            // (qemu-img 10 leaves a committed QED image as it was; we empty it as documented.)
            q.make_empty().await.map_err(err)?;
        }
        top.close().await.map_err(err)?;
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
    if new == 0 {
        bail!("New image size must be positive");
    }
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

/// JSON text laid out exactly as qemu-img prints it (see [`qjson`]).
pub fn qemu_json(v: &Value) -> String {
    qjson::to_string(v)
}
