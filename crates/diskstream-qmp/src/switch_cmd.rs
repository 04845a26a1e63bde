//! `x-blockdev-switch`: the seeds' device switch (`change` with `notify: false`, QEMU's old
//! `block_switch`), a diskstream extension (QSD has no equivalent command).
//!
//! Every user of a node (NBD exports) is re-pointed to another node, or to an image file
//! opened on the spot, without disconnecting clients. The users are drained together first:
//! requests in flight finish on the old image, new ones wait; the old image is flushed; every
//! backend gets the new root before any of them resumes. A write acknowledged before the
//! switch is therefore in the old image, one acknowledged after it in the new one.
//!
//! This is step 2 of the seeds' live block copy (create a destination backed by the source,
//! switch the device to it, stream): when the opened image's recorded backing file is a node
//! of the old node's chain, that node becomes its backing (it is not opened a second time,
//! which image locking would refuse) and the old node is reopened read-only, as a snapshot
//! does. Any other backing file is opened from the header, read-only, never probed.
//!
//! The switch is refused when the sizes differ (an NBD client negotiated the old size), when
//! a job holds either node, and when a writable user would lose write access.

use crate::error::{QmpError, QmpResult};
use crate::graph::{Driver, Graph, NodeId};
use crate::monitor::Monitor;
use crate::schema::{opt, req, Member, Ty};
use diskstream_block::image::resolve_backing;
use diskstream_block::node::{same_node, BackingFormatHint};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `x-blockdev-switch`'s arguments.
pub const BLOCKDEV_SWITCH: &[Member] = &[
    req("device", Ty::Str),
    opt("target", Ty::Str),
    opt("filename", Ty::Str),
    opt("format", Ty::Enum(&["qcow2", "qed", "raw"])),
    opt("node-name", Ty::Str),
];

fn s<'a>(a: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    a.get(k).and_then(|v| v.as_str())
}

fn not_found(name: &str) -> QmpError {
    QmpError::generic(format!(
        "Cannot find device='{name}' nor node-name='{name}'"
    ))
}

fn busy(g: &Graph, id: NodeId) -> QmpResult<()> {
    if let Some(n) = g.get(id) {
        if let Some(job) = n.blocker {
            return Err(QmpError::generic(format!(
                "Node '{}' is busy: block device is in use by block job: {job}",
                n.name
            )));
        }
    }
    Ok(())
}

/// The chain below `from` (inclusive), through filters and backing links.
fn chain(g: &Graph, from: NodeId) -> Vec<NodeId> {
    let mut out = Vec::new();
    let mut cur = Some(from);
    while let Some(c) = cur {
        if out.contains(&c) {
            break;
        }
        out.push(c);
        cur = g.get(c).and_then(|n| n.chain_next());
    }
    out
}

/// The local file under a format node, canonicalized (None for NBD and other protocols).
fn node_path(g: &Graph, id: NodeId) -> Option<PathBuf> {
    let mut cur = g.get(id)?;
    for _ in 0..=g.nodes().len() {
        if cur.driver == Driver::File {
            return std::fs::canonicalize(&cur.filename).ok();
        }
        if cur.driver == Driver::Nbd {
            return None;
        }
        cur = g.get(cur.file?)?;
    }
    None
}

/// The backing file and what is recorded about its format in the header of qcow2 or QED
/// node `id` (None for other formats and for images without a backing file).
pub(crate) async fn header_backing(g: &Graph, id: NodeId) -> Option<(String, BackingFormatHint)> {
    let q = g.effective_block(id)?;
    let link = q.backing_link().await?;
    Some((link.name, link.format))
}

/// The format node of `old`'s chain (filters skipped, `old` included) that is the file
/// `bfile` names when recorded in the header of `filename`, if any: an image created over a
/// device's chain is linked to the open node instead of opening its file a second time
/// (which image locking would refuse for a writable node).
pub(crate) fn chain_node_for(
    g: &Graph,
    old: NodeId,
    filename: &str,
    bfile: &str,
) -> Option<NodeId> {
    let wanted = std::fs::canonicalize(resolve_backing(Path::new(filename), bfile)).ok()?;
    chain(g, old).into_iter().find(|c| {
        g.get(*c).is_some_and(|n| !n.driver.is_filter())
            && node_path(g, *c).as_ref() == Some(&wanted)
    })
}

/// Refuse to link node `b` as the backing of `filename` when the header records another
/// format for it, or none (formats are never guessed). A QED header only says that its
/// backing file is not raw: an image format node (qcow2, QED) fits that, as QEMU recognises
/// those by their magic.
pub(crate) fn check_backing_format(
    g: &Graph,
    b: NodeId,
    filename: &str,
    bfile: &str,
    bfmt: &BackingFormatHint,
) -> QmpResult<()> {
    let drv = g.get(b).map(|n| n.driver.as_str()).unwrap_or("?");
    let recorded = match bfmt {
        BackingFormatHint::Named(f) if f == drv => return Ok(()),
        BackingFormatHint::NotRaw if drv == "qcow2" || drv == "qed" => return Ok(()),
        BackingFormatHint::Named(f) => f.as_str(),
        BackingFormatHint::NotRaw => "(not raw)",
        BackingFormatHint::Unrecorded => "(none)",
    };
    Err(QmpError::generic(format!(
        "'{filename}' records backing format '{recorded}' for '{bfile}', which is open as '{drv}'"
    )))
}

/// Close node `id` (opened from `opts` with `backing: null`) and open it again as `name` with
/// the backing chain its header records (read-only, never probed); like `id`, the new node
/// goes away with its last user. Returns the new node.
pub(crate) async fn reopen_with_header_chain(
    g: &mut Graph,
    id: NodeId,
    opts: &mut Map<String, Value>,
    name: &str,
) -> QmpResult<NodeId> {
    g.remove_tree(id).await;
    opts.remove("backing");
    g.blockdev_add(opts).await?;
    let id = g
        .find(name)
        .map(|n| n.id)
        .ok_or_else(|| QmpError::generic("the opened image vanished"))?;
    if let Some(n) = g.get_mut(id) {
        n.monitor_owned = false;
    }
    Ok(id)
}

/// Open `filename` as node `name` for the switch of `old`: a backing file recorded in its
/// header that is a format node of `old`'s chain is linked to that node; otherwise the chain
/// recorded in the header is opened. Returns the new node and the node it was linked to.
async fn open_target(
    g: &mut Graph,
    old: NodeId,
    filename: &str,
    format: &str,
    name: &str,
) -> QmpResult<(NodeId, Option<NodeId>)> {
    let mut opts = Map::new();
    opts.insert("driver".into(), json!(format));
    opts.insert("node-name".into(), json!(name));
    opts.insert("backing".into(), Value::Null);
    opts.insert(
        "file".into(),
        json!({"driver": "file", "filename": filename}),
    );
    g.blockdev_add(&opts).await?;
    let id = g
        .find(name)
        .map(|n| n.id)
        .ok_or_else(|| QmpError::generic("the opened image vanished"))?;
    if let Some(n) = g.get_mut(id) {
        // Opened by the command: it goes away with its last user, like a snapshot overlay.
        n.monitor_owned = false;
    }
    let Some((bfile, bfmt)) = header_backing(g, id).await else {
        return Ok((id, None));
    };
    match chain_node_for(g, old, filename, &bfile) {
        Some(b) => {
            if let Err(e) = check_backing_format(g, b, filename, &bfile, &bfmt) {
                g.remove_tree(id).await;
                return Err(e);
            }
            let (Some(nb), Some(bb)) = (g.effective_block(id), g.effective_block(b)) else {
                g.remove_tree(id).await;
                return Err(QmpError::generic("the backing node has no image"));
            };
            nb.set_backing_node(Some(bb));
            if let Some(n) = g.get_mut(id) {
                n.backing = Some(b);
                n.backing_from_header = true;
                n.backing_file_str = Some(bfile);
            }
            Ok((id, Some(b)))
        }
        None => {
            // Not part of the device's chain: open the chain the header records.
            let id = reopen_with_header_chain(g, id, &mut opts, name).await?;
            Ok((id, None))
        }
    }
}

/// `x-blockdev-switch`.
pub async fn blockdev_switch(mon: &Arc<Monitor>, a: &Map<String, Value>) -> QmpResult<Value> {
    let device = s(a, "device").unwrap_or_default();
    let target = s(a, "target");
    let filename = s(a, "filename");
    let mut g = mon.graph.lock().await;
    let old = g
        .find(device)
        .map(|n| n.id)
        .ok_or_else(|| not_found(device))?;
    busy(&g, old)?;
    let (new, opened, linked) = match (target, filename) {
        (Some(t), None) => {
            if s(a, "format").is_some() || s(a, "node-name").is_some() {
                return Err(QmpError::generic(
                    "'format' and 'node-name' go with 'filename', not with 'target'",
                ));
            }
            let t = g.find(t).map(|n| n.id).ok_or_else(|| not_found(t))?;
            (t, false, None)
        }
        (None, Some(f)) => {
            let Some(format) = s(a, "format") else {
                return Err(QmpError::generic(
                    "Parameter 'format' is missing (formats are never probed)",
                ));
            };
            let Some(name) = s(a, "node-name") else {
                return Err(QmpError::generic("Parameter 'node-name' is missing"));
            };
            let (id, linked) = open_target(&mut g, old, f, format, name).await?;
            (id, true, linked)
        }
        _ => {
            return Err(QmpError::generic(
                "Exactly one of 'target' and 'filename' must be given",
            ))
        }
    };
    let result = check_and_switch(&mut g, old, new, linked).await;
    if result.is_err() && opened {
        if let Some(l) = linked {
            if let Some(n) = g.get_mut(new) {
                if n.backing == Some(l) {
                    n.backing = None;
                }
            }
        }
        g.remove_tree(new).await;
    }
    result?;
    Ok(json!({}))
}

async fn check_and_switch(
    g: &mut Graph,
    old: NodeId,
    new: NodeId,
    linked: Option<NodeId>,
) -> QmpResult<()> {
    let name = |g: &Graph, id: NodeId| g.get(id).map(|n| n.name.clone()).unwrap_or_default();
    if old == new {
        return Err(QmpError::generic(format!(
            "Node '{}' cannot be switched to itself",
            name(g, old)
        )));
    }
    busy(g, new)?;
    let (Some(old_block), Some(new_block)) = (g.effective_block(old), g.effective_block(new))
    else {
        return Err(QmpError::generic(
            "Only nodes holding an image (format nodes and filters) can be switched",
        ));
    };
    if old_block.size() != new_block.size() {
        return Err(QmpError::generic(format!(
            "Cannot switch '{}' to '{}': the sizes differ ({} and {} bytes)",
            name(g, old),
            name(g, new),
            old_block.size(),
            new_block.size()
        )));
    }
    // Writers through the copy-on-read filters above `old` move with it.
    let above = g.filters_above(old);
    let writers = g.users().iter().any(|u| above.contains(&u.node) && u.write);
    if writers {
        if g.get(new).is_some_and(|n| n.read_only) {
            return Err(QmpError::generic(format!(
                "Cannot switch writable users of '{}' to read-only node '{}'",
                name(g, old),
                name(g, new)
            )));
        }
        if let Some(e) = g.write_conflict(new, true) {
            return Err(QmpError::generic(e));
        }
    }
    let mut drained = crate::snapshot_cmd::drain_users(g, old).await;
    if g.get(old).is_some_and(|n| !n.read_only) {
        old_block
            .flush()
            .await
            .map_err(|_| QmpError::generic("An IO error has occurred"))?;
    }
    // Users and parent nodes (filters, overlays) move together, as QEMU's bdrv_replace_node;
    // when the new image is backed by the old one, the old one becomes a read-only backing
    // file (the new image takes the writes).
    crate::snapshot_cmd::replace_node_drained(g, old, new, &mut drained, linked == Some(old)).await;
    drop(drained);
    // Keep every backend equal to its node's image (a reopen above may have changed one).
    g.sync_users().await;
    debug_assert!(g
        .users()
        .iter()
        .filter(|u| u.node == new)
        .all(|u| same_node(&u.backend.current(), &new_block)));
    g.remove_if_unreferenced(old).await;
    Ok(())
}
