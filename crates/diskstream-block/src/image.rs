//! Opening images and their backing chains.
//!
//! Policy lives here, not in the drivers: backing files are opened only with a format that is
//! recorded in the overlay (the backing-format extension) or named by the user, never by looking
//! at their contents; relative names resolve against the overlay's directory; loops and chains
//! deeper than a limit are refused. Only the top image of a user command may be probed, and only
//! when the user did not name its format (as qemu-img does).

use crate::error::{BlockError, Result};
use crate::format::qcow2::Qcow2;
use crate::format::raw::RawNode;
use crate::format::Format;
use crate::node::BlockNode;
use crate::protocol::file::FileProtocol;
use crate::protocol::Protocol;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A boxed future yielding an opened node (chain opening recurses).
type NodeFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Arc<dyn BlockNode>>> + Send + 'a>>;

/// Default limit on the number of layers in a chain.
pub const DEFAULT_MAX_DEPTH: usize = 64;

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
    /// Maximum number of layers.
    pub max_depth: usize,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: true,
            format: None,
            backing_format: None,
            no_backing: false,
            max_depth: DEFAULT_MAX_DEPTH,
        }
    }
}

/// Guess the format of a user-named top image: qcow2 magic or raw.
pub async fn probe(path: &Path) -> Result<Format> {
    let f = FileProtocol::open(path, true)?;
    let head = f.read_vec(0, 4).await?;
    Ok(if head == [0x51, 0x46, 0x49, 0xfb] {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// Resolve a backing file name recorded in `overlay` to a path.
pub fn resolve_backing(overlay: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match overlay.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
        _ => p.to_path_buf(),
    }
}

/// Open one image (no backing) in the given format.
pub async fn open_node(path: &Path, format: Format, read_only: bool) -> Result<Arc<dyn BlockNode>> {
    let file: Arc<dyn Protocol> = Arc::new(FileProtocol::open(path, read_only)?);
    Ok(match format {
        Format::Raw => Arc::new(RawNode::open(file).await?),
        Format::Qcow2 => Arc::new(Qcow2::open(file).await?),
    })
}

/// Open an image and its whole backing chain.
pub async fn open_image(path: &Path, opts: &OpenOptions) -> Result<Arc<dyn BlockNode>> {
    let format = match opts.format {
        Some(f) => f,
        None => probe(path).await?,
    };
    let mut seen: Vec<PathBuf> = Vec::new();
    open_chain(path, format, opts.read_only, opts, &mut seen, 0).await
}

fn open_chain<'a>(
    path: &'a Path,
    format: Format,
    read_only: bool,
    opts: &'a OpenOptions,
    seen: &'a mut Vec<PathBuf>,
    depth: usize,
) -> NodeFuture<'a> {
    Box::pin(async move {
        if depth >= opts.max_depth {
            return Err(BlockError::Chain(format!(
                "Backing chain of '{}' is deeper than {} images",
                path.display(),
                opts.max_depth
            )));
        }
        let canon = std::fs::canonicalize(path)
            .map_err(|e| BlockError::io(format!("Could not open '{}'", path.display()), e))?;
        if seen.contains(&canon) {
            return Err(BlockError::Chain(format!(
                "Backing chain loop: '{}' is its own backing file",
                path.display()
            )));
        }
        seen.push(canon);
        let node = open_node(path, format, read_only).await?;
        if opts.no_backing {
            return Ok(node);
        }
        if let Some(q) = node.as_any().downcast_ref::<Qcow2>() {
            let h = q.header().await;
            if let Some(name) = h.backing_file.clone() {
                if name.starts_with("json:") || name.contains("://") {
                    return Err(BlockError::Chain(format!(
                        "'{}': backing file '{name}' uses a protocol not supported yet",
                        path.display()
                    )));
                }
                let bfmt = match (&h.backing_format, depth, opts.backing_format) {
                    (Some(f), _, _) => f.parse::<Format>().map_err(|_| {
                        BlockError::Chain(format!(
                            "'{}': unsupported backing format '{f}'",
                            path.display()
                        ))
                    })?,
                    (None, 0, Some(f)) => f,
                    (None, _, _) => {
                        return Err(BlockError::Chain(format!(
                            "'{}' does not record the format of its backing file '{name}'; refusing to guess \
                             (record it with 'diskstream img rebase -u -b {name} -F <fmt>', or pass --backing-format)",
                            path.display()
                        )));
                    }
                };
                let bpath = resolve_backing(path, &name);
                let b = open_chain(&bpath, bfmt, true, opts, seen, depth + 1).await?;
                q.set_backing_node(Some(b));
            }
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
