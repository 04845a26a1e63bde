//! `block-stream` (QEMU's command, checks in QEMU's order with its texts) and the seed
//! design's `block_stream` / `query-block-stream`.
//!
//! Setup mirrors QEMU's `stream_start`: resolve the base (or `bottom`), check the op blockers
//! of every node from the device down to the base, reopen a read-only device read-write if its
//! file allows it, insert a `copy-on-read` filter node above the device (so overlays now point
//! at the filter, and conflicting jobs name it), create the job (id checks, `created`), apply
//! the speed (a negative one fails the job early: `created → null`, then the error), block the
//! nodes the job uses, start it (`running`). At the end the graph is repaired by
//! [`GraphHooks`]: the device's backing link follows the new base, implicit nodes left
//! without a parent are closed, the filter goes, the device is reopened read-only if it was.

use crate::error::{QmpError, QmpResult};
use crate::graph::{Driver, NodeId};
use crate::monitor::Monitor;
use async_trait::async_trait;
use diskstream_block::filter::cor::{CopyOnRead, CorConfig};
use diskstream_block::protocol::file::FileProtocol;
use diskstream_block::protocol::Protocol;
use diskstream_block::BlockNode;
use diskstream_jobs::job::JobOptions;
use diskstream_jobs::stream::{finish_stream, stream_step, StreamHooks};
use diskstream_jobs::{JobError, JobType, OnError, StreamJob};
use serde_json::{json, Map, Value};
use std::path::Path;
use std::sync::{Arc, Weak};

fn s<'a>(a: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    a.get(k).and_then(|v| v.as_str())
}

/// A node (by id) as seen from the graph for chain walks.
fn chain_contains(g: &crate::graph::Graph, from: NodeId, target: NodeId) -> bool {
    let mut cur = Some(from);
    while let Some(c) = cur {
        if c == target {
            return true;
        }
        cur = g.get(c).and_then(|n| n.chain_next());
    }
    false
}

/// QEMU's `bdrv_find_backing_image`: walking down from `from`, the node below the first
/// image whose recorded backing file is `name` (both made absolute against that image's
/// directory and canonicalised). Images shown with a `json:` name have no directory, so
/// relative names never match below them, exactly as in QEMU.
async fn find_backing_image(g: &crate::graph::Graph, from: NodeId, name: &str) -> Option<NodeId> {
    let mut cur = g.get(from)?;
    loop {
        // bdrv_backing_chain_next: the next non-filter node.
        let mut below = g.get(cur.chain_next()?)?;
        while below.driver.is_filter() {
            below = g.get(below.file?)?;
        }
        if let Some(rec) = cur.backing_file_str.clone() {
            let is_protocol = |s: &str| s.split('/').next().is_some_and(|p| p.contains(':'));
            if is_protocol(name) || is_protocol(&rec) {
                if rec == name {
                    return Some(below.id);
                }
            } else {
                // Relative names are relative to the directory of the image's file.
                let dir_of = protocol_file(g, cur);
                let base = Path::new(&dir_of);
                let want =
                    std::fs::canonicalize(diskstream_block::image::resolve_backing(base, name));
                let have =
                    std::fs::canonicalize(diskstream_block::image::resolve_backing(base, &rec));
                if let (Ok(w), Ok(h)) = (want, have) {
                    if w == h {
                        return Some(below.id);
                    }
                }
            }
        }
        cur = below;
    }
}

/// The file under a node (QEMU's `bdrv_dirname` looks through to it).
fn protocol_file(g: &crate::graph::Graph, n: &crate::graph::GraphNode) -> String {
    let mut cur = n;
    while cur.driver != Driver::File {
        match cur.file.and_then(|f| g.get(f)) {
            Some(c) => cur = c,
            None => break,
        }
    }
    cur.filename.clone()
}

/// `block-stream`.
pub async fn block_stream(mon: &Arc<Monitor>, a: &Map<String, Value>) -> QmpResult<Value> {
    let device = s(a, "device").unwrap_or_default();
    let base = s(a, "base");
    let base_node = s(a, "base-node");
    let bottom = s(a, "bottom");
    if base.is_some() && base_node.is_some() {
        return Err(QmpError::generic(
            "'base' and 'base-node' cannot be specified at the same time",
        ));
    }
    if base.is_some() && bottom.is_some() {
        return Err(QmpError::generic(
            "'base' and 'bottom' cannot be specified at the same time",
        ));
    }
    if bottom.is_some() && base_node.is_some() {
        return Err(QmpError::generic(
            "'bottom' and 'base-node' cannot be specified at the same time",
        ));
    }
    let mut g = mon.graph.lock().await;
    let not_found =
        |n: &str| QmpError::generic(format!("Cannot find device='{n}' nor node-name='{n}'"));
    let dev = g.find(device).ok_or_else(|| not_found(device))?.id;
    let mut base_id: Option<NodeId> = None;
    if let Some(b) = base {
        base_id =
            Some(find_backing_image(&g, dev, b).await.ok_or_else(|| {
                QmpError::generic(format!("Can't find '{b}' in the backing chain"))
            })?);
    }
    if let Some(b) = base_node {
        let id = g
            .find(b)
            .ok_or_else(|| QmpError::generic(format!("Cannot find device='' nor node-name='{b}'")))?
            .id;
        if id == dev || !chain_contains(&g, dev, id) {
            return Err(QmpError::generic(format!(
                "Node '{b}' is not a backing image of '{device}'"
            )));
        }
        base_id = Some(id);
    }
    let mut bottom_id: Option<NodeId> = None;
    if let Some(b) = bottom {
        let n = g.find(b).ok_or_else(|| {
            QmpError::generic(format!("Cannot find device='' nor node-name='{b}'"))
        })?;
        if n.driver.is_filter() {
            return Err(QmpError::generic(format!(
                "Node '{b}' is a filter, use a non-filter node as 'bottom'"
            )));
        }
        let id = n.id;
        if !chain_contains(&g, dev, id) {
            return Err(QmpError::generic(format!(
                "Node '{b}' is not in a chain starting from '{device}'"
            )));
        }
        bottom_id = Some(id);
    }
    // Op blockers from the device down to the base (or below bottom).
    let iter_end = match bottom_id {
        Some(b) => g.get(b).and_then(|n| n.chain_next()),
        None => base_id,
    };
    let mut cur = Some(dev);
    while let Some(c) = cur {
        if Some(c) == iter_end {
            break;
        }
        let Some(n) = g.get(c) else { break };
        if let Some(job) = n.blocker {
            return Err(QmpError::generic(format!(
                "Node '{}' is busy: block device is in use by block job: {job}",
                n.name
            )));
        }
        cur = n.chain_next();
    }
    if base_id.is_none() && s(a, "backing-file").is_some() {
        return Err(QmpError::generic(
            "backing file specified, but streaming the entire chain",
        ));
    }
    // The lowest node streamed (QEMU's base_overlay).
    let above_base = match bottom_id {
        Some(b) => b,
        None => {
            let mut c = dev;
            loop {
                match g.get(c).and_then(|n| n.chain_next()) {
                    Some(next) if Some(next) != base_id => c = next,
                    _ => break,
                }
            }
            c
        }
    };
    let dev_node = g.get(dev).ok_or_else(|| not_found(device))?;
    let Some(top_block) = dev_node.block.clone() else {
        return Err(QmpError::generic(format!(
            "Node '{device}' is not an image diskstream can stream into"
        )));
    };
    let mut bottom_block = g
        .get(above_base)
        .and_then(|n| n.block.clone())
        .unwrap_or_else(|| Arc::clone(&top_block));
    // Make sure the device is writable.
    let mut reopened = false;
    let mut top_block = top_block;
    if dev_node.read_only {
        let file = dev_node.file.and_then(|f| g.get(f));
        let Some(file) = file.filter(|f| f.driver == Driver::File && !f.explicit_ro) else {
            return Err(QmpError::generic("Block node is read-only"));
        };
        let path = file.filename.clone();
        let proto: Arc<dyn Protocol> = Arc::new(
            FileProtocol::open(Path::new(&path), false)
                .map_err(|_| QmpError::generic("Block node is read-only"))?,
        );
        let q =
            crate::graph::reopen_format(dev_node.driver, Arc::clone(&proto), top_block.backing())
                .await?;
        g.replace_image(dev, proto, Arc::clone(&q), false).await;
        top_block = q;
        if above_base == dev {
            // The lowest streamed node is the device itself: its new image (nothing to copy).
            bottom_block = Arc::clone(&top_block);
        }
        reopened = true;
    }
    // QEMU's stream filter is a real copy-on-read filter with `bottom` = the lowest streamed
    // node: what users read while the job runs is copied into the device at once, and the
    // job, which re-checks the device's allocation before every chunk, then skips it.
    // The job brings everything in anyway: the filter only copies what a read touches (the
    // top's allocation unit, no read-ahead), as QEMU's does, so a guest's small random reads
    // during the job cost one cluster each, not a large fetch unit.
    let unit = top_block
        .allocation_unit()
        .unwrap_or(64 * 1024)
        .max(diskstream_block::filter::cor::MIN_GRANULARITY);
    let cor: Option<Arc<dyn BlockNode>> = match CopyOnRead::new(
        Arc::clone(&top_block),
        Some(Arc::clone(&bottom_block)),
        CorConfig {
            granularity: unit,
            readahead: 0,
            ..CorConfig::default()
        },
    ) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!("stream of '{device}': reads through the job filter will not copy: {e}");
            None
        }
    };
    let filter = match g
        .insert_filter_with(s(a, "filter-node-name"), dev, cor)
        .await
    {
        Ok(f) => f,
        Err(e) => {
            undo_reopen(&mut g, dev, reopened).await;
            return Err(e);
        }
    };
    let job_id = s(a, "job-id").unwrap_or("");
    let opts = JobOptions {
        auto_finalize: a
            .get("auto-finalize")
            .and_then(|v| v.as_bool())
            .unwrap_or(true),
        auto_dismiss: a
            .get("auto-dismiss")
            .and_then(|v| v.as_bool())
            .unwrap_or(true),
        speed: 0,
        on_error: s(a, "on-error")
            .and_then(OnError::parse)
            .unwrap_or_default(),
    };
    // Nodes the job holds: the filter, the device, and everything below it above the base.
    let base_at_start = g.get(above_base).and_then(|n| n.chain_next());
    let mut held = vec![filter, dev];
    let mut c = g.get(dev).and_then(|n| n.chain_next());
    while let Some(id) = c {
        if Some(id) == base_at_start || above_base == dev {
            break;
        }
        held.push(id);
        c = g.get(id).and_then(|n| n.chain_next());
    }
    let hooks = Arc::new(GraphHooks {
        mon: Arc::downgrade(mon),
        device: dev,
        above_base,
        filter,
        reopened,
        held: held.clone(),
    });
    let driver = Arc::new(StreamJob::new(
        Arc::clone(&top_block),
        bottom_block,
        s(a, "backing-file").map(str::to_string),
        mon.stream_config,
        hooks,
    ));
    let job = match mon.jobs.create(job_id, JobType::Stream, driver, &opts) {
        Ok(j) => j,
        Err(e) => {
            g.remove_filter(filter).await;
            undo_reopen(&mut g, dev, reopened).await;
            return Err(e.into());
        }
    };
    let speed = a.get("speed").and_then(|v| v.as_i64()).unwrap_or(0);
    if speed < 0 {
        mon.jobs.early_fail(&job);
        g.remove_filter(filter).await;
        undo_reopen(&mut g, dev, reopened).await;
        return Err(JobError::NegativeSpeed.into());
    }
    let _ = job.set_speed(speed);
    // The intermediate nodes must not change under the copy: the job stops sharing `write`
    // on them, which conflicts with writable users there or below (QEMU adds them one at a
    // time and refreshes the permissions of each subtree).
    for (i, id) in held.iter().enumerate().skip(2) {
        if let Some(n) = g.get_mut(*id) {
            n.intermediate_of = Some(job_id.to_string());
        }
        if let Some(conflict) = g.subtree_conflict(*id) {
            for id in &held[2..=i] {
                if let Some(n) = g.get_mut(*id) {
                    n.intermediate_of = None;
                }
            }
            mon.jobs.early_fail(&job);
            g.remove_filter(filter).await;
            undo_reopen(&mut g, dev, reopened).await;
            return Err(QmpError::generic(conflict));
        }
    }
    for id in &held {
        if let Some(n) = g.get_mut(*id) {
            n.blocker = Some("stream");
        }
    }
    if let Ok(mut m) = mon.stream_devices.lock() {
        m.insert(job_id.to_string(), device.to_string());
    }
    drop(g);
    mon.jobs.start(&job);
    // Like QEMU, whose job runs until its first yield before the command returns: a job
    // with nothing to do is over (and has released its nodes) before the next command.
    job.wait_settled().await;
    Ok(json!({}))
}

async fn undo_reopen(g: &mut crate::graph::Graph, dev: NodeId, reopened: bool) {
    if reopened {
        reopen_read_only(g, dev).await;
    }
}

/// Reopen a node's image read-only (after a job that needed it writable, or when a snapshot
/// overlay takes over its writes), moving its users and parents to the new image.
pub(crate) async fn reopen_read_only(g: &mut crate::graph::Graph, dev: NodeId) {
    let Some(node) = g.get(dev) else { return };
    let Some(old) = node.block.clone() else {
        return;
    };
    let Some(path) = node.file.and_then(|f| g.get(f)).map(|f| f.filename.clone()) else {
        return;
    };
    // Flush first so the read-only image reads complete metadata; users (read-only exports)
    // move to it, draining their reads on the old image, and only then is the old one closed.
    if let Err(e) = old.flush().await {
        tracing::warn!("flushing {path} before reopening it read-only: {e}");
    }
    let proto: Arc<dyn Protocol> = match FileProtocol::open(Path::new(&path), true) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            tracing::error!("cannot reopen {path} read-only: {e}");
            return;
        }
    };
    let reopened =
        crate::graph::reopen_format(node.driver, Arc::clone(&proto), old.backing()).await;
    match reopened {
        Ok(q) => {
            g.replace_image(dev, proto, q, true).await;
            if let Err(e) = old.close().await {
                tracing::warn!("closing {path} after reopening it read-only: {e}");
            }
        }
        Err(e) => tracing::error!("cannot reopen {path} read-only: {e}"),
    }
}

/// Graph bookkeeping of a running stream job.
struct GraphHooks {
    mon: Weak<Monitor>,
    device: NodeId,
    above_base: NodeId,
    filter: NodeId,
    reopened: bool,
    held: Vec<NodeId>,
}

#[async_trait]
impl StreamHooks for GraphHooks {
    async fn backing_changed(
        &self,
        new_backing: Option<Arc<dyn BlockNode>>,
        recorded: Option<String>,
    ) {
        let Some(mon) = self.mon.upgrade() else {
            return;
        };
        let mut g = mon.graph.lock().await;
        // The new backing in the graph is whatever is below the lowest streamed node now
        // (possibly a filter), as QEMU's bdrv_filter_or_cow_bs(above_base).
        let new_id = if self.above_base == self.device {
            g.get(self.device).and_then(|n| n.backing)
        } else {
            g.get(self.above_base)
                .and_then(|n| n.chain_next())
                .or_else(|| new_backing.as_ref().and_then(|b| g.find_block(b)))
        };
        let old = g.get(self.device).and_then(|n| n.backing);
        // The backing counts as named by the header when the header names it as QEMU shows it.
        let shown = match new_id.and_then(|b| g.get(b)) {
            Some(b) => Some(g.display_filename(b).await),
            None => None,
        };
        if let Some(n) = g.get_mut(self.device) {
            n.backing = new_id;
            n.backing_from_header = shown == recorded;
            n.backing_file_str = recorded;
        }
        // Layers dropped from the chain: free the implicit ones nobody uses any more.
        let mut c = old;
        let mut dropped = Vec::new();
        while let Some(id) = c {
            if Some(id) == new_id {
                break;
            }
            dropped.push(id);
            c = g.get(id).and_then(|n| n.chain_next());
        }
        for id in dropped {
            if let Some(n) = g.get_mut(id) {
                n.blocker = None;
                n.intermediate_of = None;
            }
            g.remove_if_unreferenced(id).await;
        }
    }

    async fn clean(&self) {
        let Some(mon) = self.mon.upgrade() else {
            return;
        };
        let mut g = mon.graph.lock().await;
        g.remove_filter(self.filter).await;
        for id in &self.held {
            if let Some(n) = g.get_mut(*id) {
                n.blocker = None;
                n.intermediate_of = None;
            }
        }
        if self.reopened {
            reopen_read_only(&mut g, self.device).await;
        }
    }
}

/// The seed interface: `block_stream {device, all?, stop?, base?}`.
pub async fn legacy_block_stream(mon: &Arc<Monitor>, a: &Map<String, Value>) -> QmpResult<Value> {
    let device = s(a, "device").unwrap_or_default();
    let all = a.get("all").and_then(|v| v.as_bool()).unwrap_or(false);
    let stop = a.get("stop").and_then(|v| v.as_bool()).unwrap_or(false);
    if stop {
        let job = mon.jobs.find(device).ok_or_else(|| {
            QmpError::new(
                crate::error::ErrorClass::DeviceNotActive,
                format!("No active block_stream operation on device '{device}'"),
            )
        })?;
        job.cancel().await?;
        return Ok(json!({}));
    }
    if all {
        let mut args = Map::new();
        args.insert("job-id".into(), json!(device));
        args.insert("device".into(), json!(device));
        if let Some(b) = s(a, "base") {
            args.insert("base".into(), json!(b));
        }
        return block_stream(mon, &args).await;
    }
    // One chunk at the next offset that needs copying.
    let g = mon.graph.lock().await;
    let dev = g.find(device).ok_or_else(|| {
        QmpError::generic(format!(
            "Cannot find device='{device}' nor node-name='{device}'"
        ))
    })?;
    if let Some(job) = dev.blocker {
        return Err(QmpError::generic(format!(
            "Node '{device}' is busy: block device is in use by block job: {job}"
        )));
    }
    let dev_id = dev.id;
    let top = dev
        .block
        .clone()
        .ok_or_else(|| QmpError::generic(format!("Node '{device}' is not an image")))?;
    if dev.read_only {
        return Err(QmpError::generic("Block node is read-only"));
    }
    let base_id =
        match s(a, "base") {
            Some(b) => Some(find_backing_image(&g, dev_id, b).await.ok_or_else(|| {
                QmpError::generic(format!("Can't find '{b}' in the backing chain"))
            })?),
            None => None,
        };
    let mut c = dev_id;
    loop {
        match g.get(c).and_then(|n| n.chain_next()) {
            Some(next) if Some(next) != base_id => c = next,
            _ => break,
        }
    }
    let bottom = g
        .get(c)
        .and_then(|n| n.block.clone())
        .unwrap_or_else(|| Arc::clone(&top));
    drop(g);
    let from = mon
        .step_cursor
        .lock()
        .ok()
        .and_then(|m| m.get(device).copied())
        .unwrap_or(0);
    let len = top.size();
    let offset = match stream_step(&top, &bottom, from, mon.stream_config.chunk_size).await? {
        Some(end) => end,
        None => {
            // Everything is in the image now: drop the streamed layers, crash-safely.
            let (new_base, _) = finish_stream(&top, &bottom, None).await?;
            let mut g = mon.graph.lock().await;
            let new_id = new_base.as_ref().and_then(|b| g.find_block(b));
            if let Some(n) = g.get_mut(dev_id) {
                n.backing = new_id;
            }
            len
        }
    };
    if let Ok(mut m) = mon.step_cursor.lock() {
        if offset >= len {
            m.remove(device);
        } else {
            m.insert(device.to_string(), offset);
        }
    }
    Ok(json!({"device": device, "len": len, "offset": offset}))
}

/// The seed interface: `query-block-stream` → `[{device, len, offset}]`.
pub fn query_block_stream(mon: &Monitor) -> Value {
    let devices = mon
        .stream_devices
        .lock()
        .map(|m| m.clone())
        .unwrap_or_default();
    Value::Array(
        mon.jobs
            .list()
            .iter()
            .filter(|j| j.job_type() == JobType::Stream)
            .map(|j| {
                let i = j.info();
                let dev = devices.get(&i.id).cloned().unwrap_or_else(|| i.id.clone());
                json!({"device": dev, "len": i.total, "offset": i.current})
            })
            .collect(),
    )
}
