//! Opening images and their backing chains.
//!
//! Policy lives here, not in the drivers: backing files are opened only with a format that is
//! recorded in the overlay (qcow2's backing-format extension, QED's raw flag) or named by the
//! user, never by looking at their contents (one narrow exception: a QED overlay without the raw
//! flag says its backing file is an image format, and then only the qcow2 and QED magics are
//! accepted, so a raw disk is still never interpreted); relative names resolve against the overlay's directory; loops and chains
//! deeper than a limit are refused. Only the top image of a user command may be probed, and only
//! when the user did not name its format (as qemu-img does).
//!
//! Names of the form `scheme://...` (for example `nbd://host:10809/disk`) are not paths: they
//! are opened through a [`ProtocolOpener`] registered for the scheme at startup (the block layer
//! cannot depend on the crates that implement network protocols), are never resolved against
//! the overlay's directory, and are never probed as backing files either.

use crate::error::{BlockError, Result};
use crate::format::qcow2::Qcow2;
use crate::format::qed::Qed;
use crate::format::raw::RawNode;
use crate::format::Format;
use crate::node::{BackingFormatHint, BlockNode};
use crate::protocol::file::FileProtocol;
use crate::protocol::Protocol;
use async_trait::async_trait;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// A boxed future yielding an opened node (chain opening recurses).
type NodeFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Arc<dyn BlockNode>>> + Send + 'a>>;

/// Default limit on the number of layers in a chain.
pub const DEFAULT_MAX_DEPTH: usize = 64;

/// The process-wide default of [`OpenOptions::max_depth`] (see [`set_max_depth`]).
static MAX_DEPTH: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(DEFAULT_MAX_DEPTH);

/// Set the process-wide default chain depth limit (`diskstream --max-chain-depth`,
/// `DISKSTREAM_MAX_CHAIN_DEPTH`): [`OpenOptions::default`] and every front end that opens
/// chains (img commands, `serve`, the daemon) use it. Values below 1 count as 1.
pub fn set_max_depth(n: usize) {
    MAX_DEPTH.store(n.max(1), std::sync::atomic::Ordering::Relaxed);
}

/// The process-wide default chain depth limit (64 unless [`set_max_depth`] changed it).
pub fn max_depth() -> usize {
    MAX_DEPTH.load(std::sync::atomic::Ordering::Relaxed)
}

/// How to open an image and its chain.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Open the top image read-only. Backing images are always read-only.
    pub read_only: bool,
    /// Format of the top image; `None` probes it (top image only).
    pub format: Option<Format>,
    /// Format of the top image's backing file when the image does not record one.
    pub backing_format: Option<Format>,
    /// Do not open backing files at all.
    pub no_backing: bool,
    /// Maximum number of layers (the top image counts; default [`max_depth`]).
    pub max_depth: usize,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: true,
            format: None,
            backing_format: None,
            no_backing: false,
            max_depth: max_depth(),
        }
    }
}

/// Opens storage named by a URL (`scheme://...`) instead of a path.
///
/// This is the seam through which protocols implemented outside the block layer (NBD in
/// `diskstream-nbd`) plug into [`open_image`]: a front end registers one opener per set of
/// schemes at startup with [`register_protocol_opener`]; from then on a top image or a
/// backing file named `nbd://host/export` is opened through it, with the format recorded in
/// the overlay (or named by the user), exactly like a local file.
#[async_trait]
pub trait ProtocolOpener: Send + Sync {
    /// The URL schemes handled, lower case, e.g. `["nbd", "nbd+tcp", "nbd+unix"]`.
    fn schemes(&self) -> Vec<String>;
    /// Open the storage named by `url`. Backing files are opened with `read_only` set.
    async fn open(&self, url: &str, read_only: bool) -> Result<Arc<dyn Protocol>>;
}

/// The process-wide openers, by scheme.
fn openers() -> &'static RwLock<Vec<(String, Arc<dyn ProtocolOpener>)>> {
    static OPENERS: RwLock<Vec<(String, Arc<dyn ProtocolOpener>)>> = RwLock::new(Vec::new());
    &OPENERS
}

/// Register `opener` for its schemes (replacing an earlier opener of the same scheme). Meant to
/// be called once at startup by the binary (and by tests); registering again is harmless.
pub fn register_protocol_opener(opener: Arc<dyn ProtocolOpener>) {
    let mut v = openers().write().unwrap_or_else(|p| p.into_inner());
    for scheme in opener.schemes() {
        let scheme = scheme.to_ascii_lowercase();
        v.retain(|(s, _)| *s != scheme);
        v.push((scheme, Arc::clone(&opener)));
    }
}

/// The opener registered for `scheme`, if any.
fn opener_for(scheme: &str) -> Option<Arc<dyn ProtocolOpener>> {
    let scheme = scheme.to_ascii_lowercase();
    openers()
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .find(|(s, _)| *s == scheme)
        .map(|(_, o)| Arc::clone(o))
}

/// The scheme of a URL-style name (`nbd` for `nbd://h/x`, `nbd+unix` for
/// `nbd+unix:///x?socket=/s`), or `None` for a file name. A scheme is a letter followed by
/// letters, digits, `+`, `-` or `.` (RFC 3986), and must be followed by `://`; so `./a:b` and
/// `C:/x` stay file names.
pub fn url_scheme(name: &str) -> Option<&str> {
    let (scheme, _) = name.split_once("://")?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    if first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    {
        Some(scheme)
    } else {
        None
    }
}

/// Decode the `%XX` escapes of a URL component (an NBD export name, an S3 key); `None` for a
/// malformed escape or a result that is not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Open the protocol under an image: a registered URL scheme, else a local file.
pub async fn open_protocol(name: &Path, read_only: bool) -> Result<Arc<dyn Protocol>> {
    if let Some(url) = name.to_str() {
        if let Some(scheme) = url_scheme(url) {
            let Some(opener) = opener_for(scheme) else {
                return Err(BlockError::Chain(format!(
                    "'{url}': protocol '{scheme}' is not supported"
                )));
            };
            return opener.open(url, read_only).await;
        }
    }
    Ok(Arc::new(FileProtocol::open(name, read_only)?))
}

/// Guess the format of a user-named top image: qcow2 or QED magic, else raw.
pub async fn probe(path: &Path) -> Result<Format> {
    let f = open_protocol(path, true).await?;
    probe_protocol(f.as_ref()).await
}

/// Bytes at the start of an image that decide its probed format.
pub const PROBE_BYTES: usize = 4;

/// The format the first [`PROBE_BYTES`] bytes of an image announce (raw when no magic
/// matches). Shared by probing and by the raw driver's guard against a guest forging a header.
pub fn format_of_head(head: &[u8]) -> Format {
    match head.get(..4) {
        Some([0x51, 0x46, 0x49, 0xfb]) => Format::Qcow2,
        Some(b"QED\0") => Format::Qed,
        _ => Format::Raw,
    }
}

async fn probe_protocol(f: &dyn Protocol) -> Result<Format> {
    let len = f.len().await?;
    if len < PROBE_BYTES as u64 {
        return Ok(Format::Raw);
    }
    let head = f.read_vec(0, PROBE_BYTES).await?;
    Ok(format_of_head(&head))
}

/// Where backing files may come from: an optional allow-list set once per process by the
/// front end (`diskstream --backing-allow`, `DISKSTREAM_BACKING_ALLOW`). An image's header
/// is data written by whoever made the image: with a policy in place, a backing file name
/// pointing outside the listed directories (after resolving symlinks) or using an unlisted
/// URL scheme is refused before anything is opened.
#[derive(Clone, Debug, Default)]
pub struct BackingPolicy {
    /// Directories backing files must lie in, canonicalized.
    pub dirs: Vec<PathBuf>,
    /// URL schemes backing files may use (`nbd`, `https`, ...).
    pub schemes: Vec<String>,
}

impl BackingPolicy {
    /// Parse allow-list entries: `scheme://` (a URL scheme) or a directory.
    pub fn parse(entries: &[String]) -> Result<BackingPolicy> {
        let mut p = BackingPolicy::default();
        for e in entries.iter().filter(|e| !e.is_empty()) {
            if let Some(scheme) = e.strip_suffix("://") {
                p.schemes.push(scheme.to_ascii_lowercase());
            } else {
                let d = std::fs::canonicalize(e).map_err(|err| {
                    BlockError::io(format!("backing allow-list directory '{e}'"), err)
                })?;
                p.dirs.push(d);
            }
        }
        Ok(p)
    }

    /// Whether the backing file `name`, resolved to `path`, is allowed.
    pub fn check(&self, name: &str, path: &Path) -> Result<()> {
        if let Some(scheme) = url_scheme(name) {
            if self
                .schemes
                .iter()
                .any(|s| s == &scheme.to_ascii_lowercase())
            {
                return Ok(());
            }
            return Err(BlockError::PermissionDenied(format!(
                "backing file '{name}': URL scheme '{scheme}' is not in the backing allow-list"
            )));
        }
        let canon = std::fs::canonicalize(path)
            .map_err(|e| BlockError::io(format!("Could not open '{}'", path.display()), e))?;
        if self.dirs.iter().any(|d| canon.starts_with(d)) {
            return Ok(());
        }
        Err(BlockError::PermissionDenied(format!(
            "backing file '{name}' ({}) is outside the directories of the backing allow-list",
            canon.display()
        )))
    }
}

static BACKING_POLICY: std::sync::OnceLock<BackingPolicy> = std::sync::OnceLock::new();

/// Install the process-wide backing policy (once; later calls are ignored and return false).
pub fn set_backing_policy(p: BackingPolicy) -> bool {
    BACKING_POLICY.set(p).is_ok()
}

/// Check a backing file name against the process-wide policy (allowed when none is set).
pub fn check_backing_allowed(name: &str, path: &Path) -> Result<()> {
    match BACKING_POLICY.get() {
        Some(p) => p.check(name, path),
        None => Ok(()),
    }
}

/// Resolve a backing file name recorded in `overlay` to a path. URL-style names (see
/// [`url_scheme`]) are returned unchanged: they are never relative to the overlay.
pub fn resolve_backing(overlay: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() || url_scheme(name).is_some() {
        return p.to_path_buf();
    }
    match overlay.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
        _ => p.to_path_buf(),
    }
}

/// Open one image (no backing) in the given format.
pub async fn open_node(path: &Path, format: Format, read_only: bool) -> Result<Arc<dyn BlockNode>> {
    let file = open_protocol(path, read_only).await?;
    open_node_on(file, format).await
}

/// Open a format driver over an already opened protocol.
async fn open_node_on(file: Arc<dyn Protocol>, format: Format) -> Result<Arc<dyn BlockNode>> {
    Ok(match format {
        Format::Raw => Arc::new(RawNode::open(file).await?),
        Format::Qcow2 => Arc::new(Qcow2::open(file).await?),
        Format::Qed => Arc::new(Qed::open(file).await?),
    })
}

/// Open an image and its whole backing chain.
pub async fn open_image(path: &Path, opts: &OpenOptions) -> Result<Arc<dyn BlockNode>> {
    // A URL is opened once and probed through the same connection.
    let (format, file) = match (opts.format, path.to_str().and_then(url_scheme)) {
        (Some(f), _) => (f, None),
        (None, Some(_)) => {
            let file = open_protocol(path, opts.read_only).await?;
            (probe_protocol(file.as_ref()).await?, Some(file))
        }
        (None, None) => (probe(path).await?, None),
    };
    let mut seen: Vec<(PathBuf, PathBuf)> = Vec::new();
    let node = open_chain(path, format, opts.read_only, opts, &mut seen, 0, file).await?;
    if opts.format.is_none() {
        if let Some(raw) = node.as_any().downcast_ref::<RawNode>() {
            raw.set_probed(true);
        }
    }
    Ok(node)
}

fn open_chain<'a>(
    path: &'a Path,
    format: Format,
    read_only: bool,
    opts: &'a OpenOptions,
    seen: &'a mut Vec<(PathBuf, PathBuf)>,
    depth: usize,
    file: Option<Arc<dyn Protocol>>,
) -> NodeFuture<'a> {
    Box::pin(async move {
        // `seen` holds (canonical, given) names of the layers above, top first.
        let top = seen.first().map_or(path, |(_, given)| given.as_path());
        if depth >= opts.max_depth {
            return Err(BlockError::Chain(format!(
                "{}: backing chain deeper than {} images (at '{}')",
                top.display(),
                opts.max_depth,
                path.display()
            )));
        }
        let is_url = path.to_str().and_then(url_scheme).is_some();
        // A URL names itself; a file is identified by its canonical path.
        let canon = if is_url {
            path.to_path_buf()
        } else {
            std::fs::canonicalize(path)
                .map_err(|e| BlockError::io(format!("Could not open '{}'", path.display()), e))?
        };
        if seen.iter().any(|(c, _)| *c == canon) {
            let parent = seen.last().map_or(path, |(_, given)| given.as_path());
            let what = if seen.last().is_some_and(|(c, _)| *c == canon) {
                format!("'{}' is its own backing file", parent.display())
            } else {
                format!(
                    "'{}' names '{}' as its backing file, which is already in the chain above it",
                    parent.display(),
                    path.display()
                )
            };
            return Err(BlockError::Chain(format!(
                "{}: backing chain loop: {what}",
                top.display()
            )));
        }
        seen.push((canon, path.to_path_buf()));
        let file = match file {
            Some(f) => f,
            None => open_protocol(path, read_only).await?,
        };
        let node = open_node_on(file, format).await?;
        if opts.no_backing {
            return Ok(node);
        }
        if let Some(link) = node.backing_link().await {
            let name = link.name;
            let scheme = url_scheme(&name);
            if name.starts_with("json:") || scheme.is_some_and(|s| opener_for(s).is_none()) {
                return Err(BlockError::Chain(format!(
                    "'{}': backing file '{name}' uses a protocol not supported yet",
                    path.display()
                )));
            }
            if is_url && scheme.is_none() && !Path::new(&name).is_absolute() {
                return Err(BlockError::Chain(format!(
                    "'{}': relative backing file name '{name}' cannot be resolved against a URL",
                    path.display()
                )));
            }
            let bpath = resolve_backing(path, &name);
            check_backing_allowed(&name, &bpath)?;
            let user = if depth == 0 {
                opts.backing_format
            } else {
                None
            };
            let mut bfile = None;
            let bfmt = match (link.format, user) {
                (BackingFormatHint::Named(f), _) => f.parse::<Format>().map_err(|_| {
                    BlockError::Chain(format!(
                        "'{}': unsupported backing format '{f}'",
                        path.display()
                    ))
                })?,
                (_, Some(f)) => f,
                (BackingFormatHint::NotRaw, None) => {
                    // QED records only "raw"; anything else is an image format, recognised by
                    // its magic. A file that is neither qcow2 nor QED is refused, never read
                    // as raw.
                    let f = open_protocol(&bpath, true).await?;
                    let fmt = match probe_protocol(f.as_ref()).await? {
                        Format::Raw => {
                            return Err(BlockError::Chain(format!(
                                "'{}': backing file '{name}' is neither qcow2 nor QED and its \
                                 format is not recorded; refusing to guess (record it with \
                                 'diskstream img rebase -u -b {name} -F <fmt>', or pass \
                                 --backing-format)",
                                path.display()
                            )));
                        }
                        fmt => fmt,
                    };
                    bfile = Some(f);
                    fmt
                }
                (BackingFormatHint::Unrecorded, None) => {
                    return Err(BlockError::Chain(format!(
                        "'{}' does not record the format of its backing file '{name}'; refusing to guess \
                         (record it with 'diskstream img rebase -u -b {name} -F <fmt>', or pass --backing-format)",
                        path.display()
                    )));
                }
            };
            let b = open_chain(&bpath, bfmt, true, opts, seen, depth + 1, bfile).await?;
            node.set_backing_node(Some(b));
        }
        Ok(node)
    })
}

/// The layers of a chain, top first.
pub fn chain_layers(top: &Arc<dyn BlockNode>) -> Vec<Arc<dyn BlockNode>> {
    let mut v = vec![Arc::clone(top)];
    while let Some(b) = v.last().and_then(|n| n.backing()) {
        v.push(b);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_names_are_not_paths() {
        assert_eq!(url_scheme("nbd://h:1/x"), Some("nbd"));
        assert_eq!(url_scheme("nbd+unix:///x?socket=/s"), Some("nbd+unix"));
        assert_eq!(url_scheme("base.qcow2"), None);
        assert_eq!(url_scheme("./a://b"), None);
        assert_eq!(url_scheme("1nbd://x"), None);
        assert_eq!(url_scheme("dir/nbd://x"), None);
        let url = "nbd://h/x";
        assert_eq!(
            resolve_backing(Path::new("/img/top.qcow2"), url),
            PathBuf::from(url)
        );
        assert_eq!(
            resolve_backing(Path::new("/img/top.qcow2"), "base.qcow2"),
            PathBuf::from("/img/base.qcow2")
        );
    }

    #[tokio::test]
    async fn unregistered_scheme_is_a_clear_error() {
        let e = open_protocol(Path::new("zzz://h/x"), true).await.err();
        assert!(e.is_some_and(|e| e.to_string().contains("protocol 'zzz' is not supported")));
    }
}
