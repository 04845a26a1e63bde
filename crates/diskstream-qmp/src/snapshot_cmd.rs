//! External snapshots: `blockdev-snapshot-sync` (diskstream creates the overlay) and
//! `blockdev-snapshot` (the overlay was added with `backing: null`), with QEMU's checks, in
//! QEMU's order, and its texts.
//!
//! Taking the snapshot is QEMU's `bdrv_append` under a drain: every user of the snapshotted
//! node (NBD exports) is drained together — requests in flight finish on the old image, new
//! ones wait — the old image is flushed, the overlay gets it as backing, and every user's
//! backend is re-pointed at the overlay before any of them resumes. A write acknowledged
//! before the snapshot is therefore in the old image (and visible through the overlay); one
//! acknowledged after is in the overlay. Afterwards the old image is reopened read-only, as
//! QEMU does, so nothing but the overlay's reads touches it any more.
//!
//! The overlay created by `blockdev-snapshot-sync` records the old node's file name and,
//! always, its format (never left to probing). Nodes created by the command are not
//! monitor-owned (QEMU's `blockdev-del` refuses them), exactly as in QSD.

use crate::error::{QmpError, QmpResult};
use crate::graph::{Graph, NodeId};
use crate::monitor::Monitor;
use diskstream_block::backend::Drained;
use diskstream_block::node::same_node;
use serde_json::{json, Map, Value};
use std::path::Path;
use std::sync::Arc;

fn s<'a>(a: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    a.get(k).and_then(|v| v.as_str())
}

/// QEMU's `bdrv_lookup_bs(device, node_name)`: QSD has no named devices, so only the node
/// name can match.
fn lookup(g: &Graph, device: Option<&str>, node: Option<&str>) -> QmpResult<NodeId> {
    if let Some(n) = node.and_then(|n| g.find(n)) {
        return Ok(n.id);
    }
    Err(QmpError::generic(format!(
        "Cannot find device='{}' nor node-name='{}'",
        device.unwrap_or(""),
        node.unwrap_or("")
    )))
}

/// QEMU's op blockers for `BLOCK_OP_TYPE_EXTERNAL_SNAPSHOT` (and the other graph-changing
/// operations): a node used by a job, or used as another node's backing, is busy.
pub(crate) fn check_not_busy(g: &Graph, id: NodeId) -> QmpResult<()> {
    let Some(n) = g.get(id) else {
        return Err(QmpError::generic("node vanished"));
    };
    if let Some(job) = n.blocker {
        return Err(QmpError::generic(format!(
            "Node '{}' is busy: block device is in use by block job: {job}",
            n.name
        )));
    }
    if let Some(p) = g.nodes().iter().find(|p| p.backing == Some(id)) {
        return Err(QmpError::generic(format!(
            "Node '{}' is busy: node is used as backing hd of '{}'",
            n.name, p.name
        )));
    }
    Ok(())
}

/// Users held drained by a graph change, each with its user id (its node may move).
pub(crate) type DrainedUsers = Vec<(String, Drained)>;

/// Drain every user that sees `id` as its device: those attached to `id` and to the
/// copy-on-read filters stacked above it, in a fixed order (only the graph holder drains,
/// so the order cannot deadlock).
pub(crate) async fn drain_users(g: &Graph, id: NodeId) -> DrainedUsers {
    let above = g.filters_above(id);
    let mut out = Vec::new();
    for u in g.users().iter().filter(|u| above.contains(&u.node)) {
        out.push((u.id.clone(), u.backend.drain().await));
    }
    out
}

/// Point every drained user's backend at its node's current image.
fn reroot(g: &Graph, drained: &mut DrainedUsers) {
    for (uid, d) in drained.iter_mut() {
        let b = g.user(uid).and_then(|u| g.effective_block(u.node));
        if let Some(b) = b {
            if !same_node(&d.root(), &b) {
                d.set_root(b);
            }
        }
    }
}

/// QEMU's `bdrv_replace_node(old, new)` with every affected user held drained (see
/// [`drain_users`]): users of `old` and its parent nodes (copy-on-read filters' `file`
/// child, overlays' backing child; see [`Graph::move_parents`]) move to `new`; with
/// `reopen_old` the old image is then reopened read-only (it became `new`'s backing file);
/// filters above are rebuilt over their child's current image and every drained backend
/// gets its node's image before any of them resumes (the caller drops `drained`).
pub(crate) async fn replace_node_drained(
    g: &mut Graph,
    old: NodeId,
    new: NodeId,
    drained: &mut DrainedUsers,
    reopen_old: bool,
) {
    let old_block = g.effective_block(old);
    let moved = g.move_parents(old, new);
    g.move_users(old, new);
    // The filters' copies in flight into the old image land before it changes.
    g.quiesce_filters(&g.filters_above(new)).await;
    reroot(g, drained);
    let mut remap = Vec::new();
    if reopen_old {
        // Still drained: nothing reads through the old image while it is swapped for its
        // read-only reopen (the overlay's backing pointer follows).
        crate::stream_cmd::reopen_read_only(g, old).await;
        if let (Some(a), Some(b)) = (old_block, g.effective_block(old)) {
            remap.push((a, b));
        }
    }
    let stale = g.refresh_filters(&remap);
    reroot(g, drained);
    if !moved.is_empty() {
        tracing::info!(
            "{} parent node(s) of '{}' now use '{}'",
            moved.len(),
            g.get(old).map(|n| n.name.as_str()).unwrap_or("?"),
            g.get(new).map(|n| n.name.as_str()).unwrap_or("?")
        );
    }
    drop(stale);
}

/// Flush a writable node (QEMU flushes the old image before the overlay is created).
async fn flush_node(g: &Graph, id: NodeId) -> QmpResult<()> {
    let Some(n) = g.get(id) else { return Ok(()) };
    if n.read_only {
        return Ok(());
    }
    if let Some(b) = g.effective_block(id) {
        b.flush()
            .await
            .map_err(|_| QmpError::generic("An IO error has occurred"))?;
    }
    Ok(())
}

/// `bdrv_append` of a prepared overlay over `old` with `old`'s users drained in `drained`:
/// link the backing, move the users (graph and backends), resume them, then reopen the old
/// image read-only.
async fn append(
    g: &mut Graph,
    old: NodeId,
    overlay: NodeId,
    mut drained: DrainedUsers,
) -> QmpResult<()> {
    let old_block = g
        .effective_block(old)
        .ok_or_else(|| QmpError::generic("The snapshotted node has no image"))?;
    let new_block = g
        .effective_block(overlay)
        .ok_or_else(|| QmpError::generic("The overlay has no image"))?;
    new_block.set_backing_node(Some(Arc::clone(&old_block)));
    let shown = match g.get(old) {
        Some(o) => Some(g.display_filename(o).await),
        None => None,
    };
    let recorded = match new_block
        .as_any()
        .downcast_ref::<diskstream_block::format::qcow2::Qcow2>()
    {
        Some(q) => q.header().await.backing_file,
        None => None,
    };
    if let Some(n) = g.get_mut(overlay) {
        n.backing = Some(old);
        n.backing_from_header = recorded.is_some() && recorded == shown;
        n.backing_file_str = shown;
    }
    replace_node_drained(g, old, overlay, &mut drained, true).await;
    drop(drained);
    Ok(())
}

/// `blockdev-snapshot-sync`.
pub async fn blockdev_snapshot_sync(
    mon: &Arc<Monitor>,
    a: &Map<String, Value>,
) -> QmpResult<Value> {
    let device = s(a, "device");
    let node_name = s(a, "node-name");
    let file = s(a, "snapshot-file").unwrap_or_default();
    let snap_name = s(a, "snapshot-node-name");
    let format = s(a, "format").unwrap_or("qcow2");
    let existing = s(a, "mode") == Some("existing");
    let mut g = mon.graph.lock().await;
    let old = lookup(&g, device, node_name)?;
    let drained = drain_users(&g, old).await;
    check_not_busy(&g, old)?;
    flush_node(&g, old).await?;
    if node_name.is_some() && snap_name.is_none() {
        return Err(QmpError::generic("New overlay node-name missing"));
    }
    if let Some(n) = snap_name {
        if g.find(n).is_some() {
            return Err(QmpError::generic("New overlay node-name already in use"));
        }
    }
    if !existing {
        let (size, backing, bfmt) = {
            let o = g
                .get(old)
                .ok_or_else(|| QmpError::generic("node vanished"))?;
            let b = g
                .effective_block(old)
                .ok_or_else(|| QmpError::generic("bdrv_getlength failed: No medium found"))?;
            let shown = g.display_filename(o).await;
            (b.size(), shown, o.driver.as_str())
        };
        match format {
            "qcow2" | "qed" => {}
            "raw" => {
                return Err(QmpError::generic(
                    "Backing file not supported for file format 'raw'",
                ))
            }
            other => {
                return Err(QmpError::generic(format!(
                    "diskstream cannot create '{other}' overlays (qcow2 or qed only)"
                )))
            }
        }
        let created = crate::graph::create_cow_image(
            format,
            Path::new(file),
            size,
            Some(backing),
            Some(bfmt.to_string()),
        )
        .await;
        if let Err(e) = created {
            let why = match &e {
                diskstream_block::BlockError::Io { source, .. } => {
                    diskstream_jobs::error::strerror(source.raw_os_error().unwrap_or(5))
                }
                other => other.to_string(),
            };
            return Err(QmpError::generic(format!(
                "Could not create '{file}': {why}"
            )));
        }
    }
    let mut opts = Map::new();
    opts.insert("driver".into(), json!(format));
    if let Some(n) = snap_name {
        opts.insert("node-name".into(), json!(n));
    }
    opts.insert("backing".into(), Value::Null);
    opts.insert("file".into(), json!({"driver": "file", "filename": file}));
    g.blockdev_add(&opts).await?;
    let overlay = match snap_name.and_then(|n| g.find(n)) {
        Some(n) => n.id,
        None => return Err(QmpError::generic("overlay vanished")),
    };
    if let Some(n) = g.get_mut(overlay) {
        // Opened by the command, not by blockdev-add: blockdev-del refuses it, as in QEMU.
        n.monitor_owned = false;
    }
    if let Err(e) = check_overlay(&g, overlay) {
        g.remove_tree(overlay).await;
        return Err(e);
    }
    append(&mut g, old, overlay, drained).await?;
    Ok(json!({}))
}

/// QEMU's checks of an overlay before `bdrv_append`.
fn check_overlay(g: &Graph, overlay: NodeId) -> QmpResult<()> {
    let Some(o) = g.get(overlay) else {
        return Err(QmpError::generic("overlay vanished"));
    };
    let has_parents = g.has_users(overlay)
        || g.nodes()
            .iter()
            .any(|p| p.backing == Some(overlay) || p.file == Some(overlay));
    if has_parents {
        return Err(QmpError::generic("The overlay is already in use"));
    }
    if o.driver.is_filter() {
        return Err(QmpError::generic("Filters cannot be used as overlays"));
    }
    if o.backing.is_some() {
        return Err(QmpError::generic("The overlay already has a backing image"));
    }
    if !o.driver.is_cow() {
        return Err(QmpError::generic(
            "The overlay does not support backing images",
        ));
    }
    Ok(())
}

/// `blockdev-snapshot`.
pub async fn blockdev_snapshot(mon: &Arc<Monitor>, a: &Map<String, Value>) -> QmpResult<Value> {
    let node = s(a, "node").unwrap_or_default();
    let overlay = s(a, "overlay").unwrap_or_default();
    let mut g = mon.graph.lock().await;
    let old = lookup(&g, Some(node), Some(node))?;
    let drained = drain_users(&g, old).await;
    check_not_busy(&g, old)?;
    flush_node(&g, old).await?;
    let ov = lookup(&g, Some(overlay), Some(overlay))?;
    check_overlay(&g, ov)?;
    append(&mut g, old, ov, drained).await?;
    Ok(json!({}))
}
