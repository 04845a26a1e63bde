//! `block-commit`, `blockdev-mirror`, `drive-mirror` and `block-job-change`, with QEMU's
//! checks in QEMU's order and its texts.
//!
//! * Intermediate commit runs [`CommitJob`]: the base is reopened read-write if needed, the
//!   nodes from the top down to the base are held by the job, and at finalization the
//!   overlay of the top gets the base as backing (header rewritten between two flushes of the
//!   base) and the dropped implicit nodes are closed.
//! * Mirror and active commit run [`MirrorJob`]: a `mirror_top` filter node is inserted above
//!   the source and every user (NBD export) is moved onto it, drained; at the end the users
//!   move (drained again) to the target on `complete`, or back to the source on cancel.
//!   Active commit is a mirror of the active layer into its base, reported as type `commit`.

use crate::error::{ErrorClass, QmpError, QmpResult};
use crate::graph::{Driver, Graph, NodeId};
use crate::monitor::Monitor;
use crate::schema::{opt, req, Member, Ty, ON_ERROR};
use async_trait::async_trait;
use diskstream_block::protocol::file::FileProtocol;
use diskstream_block::protocol::Protocol;
use diskstream_block::{BlockError, BlockNode};
use diskstream_jobs::commit::{CommitHooks, CommitJob};
use diskstream_jobs::job::{JobDriver, JobOptions};
use diskstream_jobs::mirror::{CopyMode, MirrorConfig, MirrorHooks, MirrorJob, SyncMode};
use diskstream_jobs::{Job, JobError, JobType, OnError};
use serde_json::{json, Map, Value};
use std::path::Path;
use std::sync::{Arc, Weak};

const SYNC: Ty = Ty::Enum(&["top", "full", "none", "incremental", "bitmap"]);
const COPY_MODE: Ty = Ty::Enum(&["background", "write-blocking"]);

/// `block-commit`'s arguments.
pub const BLOCK_COMMIT: &[Member] = &[
    opt("job-id", Ty::Str),
    req("device", Ty::Str),
    opt("base-node", Ty::Str),
    opt("base", Ty::Str),
    opt("top-node", Ty::Str),
    opt("top", Ty::Str),
    opt("backing-file", Ty::Str),
    opt("backing-mask-protocol", Ty::Bool),
    opt("speed", Ty::Int),
    opt("on-error", ON_ERROR),
    opt("filter-node-name", Ty::Str),
    opt("auto-finalize", Ty::Bool),
    opt("auto-dismiss", Ty::Bool),
];

/// `blockdev-mirror`'s arguments.
pub const BLOCKDEV_MIRROR: &[Member] = &[
    opt("job-id", Ty::Str),
    req("device", Ty::Str),
    req("target", Ty::Str),
    opt("replaces", Ty::Str),
    req("sync", SYNC),
    opt("speed", Ty::Int),
    opt("granularity", Ty::U32),
    opt("buf-size", Ty::Int),
    opt("on-source-error", ON_ERROR),
    opt("on-target-error", ON_ERROR),
    opt("filter-node-name", Ty::Str),
    opt("copy-mode", COPY_MODE),
    opt("auto-finalize", Ty::Bool),
    opt("auto-dismiss", Ty::Bool),
];

/// `drive-mirror`'s arguments.
pub const DRIVE_MIRROR: &[Member] = &[
    opt("job-id", Ty::Str),
    req("device", Ty::Str),
    req("target", Ty::Str),
    opt("format", Ty::Str),
    opt("node-name", Ty::Str),
    opt("replaces", Ty::Str),
    req("sync", SYNC),
    opt("mode", Ty::Enum(&["existing", "absolute-paths"])),
    opt("speed", Ty::Int),
    opt("granularity", Ty::U32),
    opt("buf-size", Ty::Int),
    opt("on-source-error", ON_ERROR),
    opt("on-target-error", ON_ERROR),
    opt("unmap", Ty::Bool),
    opt("copy-mode", COPY_MODE),
    opt("auto-finalize", Ty::Bool),
    opt("auto-dismiss", Ty::Bool),
];

/// `block-job-change`'s arguments (the `mirror` branch of the union).
pub const BLOCK_JOB_CHANGE: &[Member] = &[
    req("id", Ty::Str),
    req(
        "type",
        Ty::Enum(&[
            "commit",
            "stream",
            "mirror",
            "backup",
            "create",
            "amend",
            "snapshot-load",
            "snapshot-save",
            "snapshot-delete",
        ]),
    ),
    opt("copy-mode", COPY_MODE),
];

fn s<'a>(a: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    a.get(k).and_then(|v| v.as_str())
}

fn job_options(a: &Map<String, Value>, on_error: Option<&str>) -> JobOptions {
    JobOptions {
        auto_finalize: a
            .get("auto-finalize")
            .and_then(|v| v.as_bool())
            .unwrap_or(true),
        auto_dismiss: a
            .get("auto-dismiss")
            .and_then(|v| v.as_bool())
            .unwrap_or(true),
        speed: 0,
        on_error: on_error.and_then(OnError::parse).unwrap_or_default(),
    }
}

/// QEMU's `qmp_get_root_bs`.
fn root_node(g: &Graph, name: &str) -> QmpResult<NodeId> {
    let n = g.find(name).ok_or_else(|| {
        QmpError::generic(format!(
            "Cannot find device='{name}' nor node-name='{name}'"
        ))
    })?;
    if is_child(g, n.id) {
        return Err(QmpError::generic("Need a root block node"));
    }
    Ok(n.id)
}

/// Whether a node has a parent other than a user: another node, or a job (QEMU's jobs
/// attach to the nodes they hold as non-root parents).
fn is_child(g: &Graph, id: NodeId) -> bool {
    g.get(id).is_some_and(|n| n.blocker.is_some())
        || g.nodes()
            .iter()
            .any(|p| p.backing == Some(id) || p.file == Some(id))
}

/// The chain below `from` (inclusive), following filters and backing links.
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

fn busy_check(g: &Graph, ids: &[NodeId]) -> QmpResult<()> {
    for id in ids {
        if let Some(n) = g.get(*id) {
            if let Some(job) = n.blocker {
                return Err(QmpError::generic(format!(
                    "Node '{}' is busy: block device is in use by block job: {job}",
                    n.name
                )));
            }
        }
    }
    Ok(())
}

/// Reopen a read-only node's image read-write (its file must allow it). Returns whether it
/// was reopened.
async fn reopen_rw(g: &mut Graph, id: NodeId) -> QmpResult<bool> {
    let Some(n) = g.get(id) else {
        return Ok(false);
    };
    if !n.read_only {
        return Ok(false);
    }
    let driver = n.driver;
    let old = n.block.clone();
    let file = n.file.and_then(|f| g.get(f));
    let Some(file) = file.filter(|f| f.driver == Driver::File && !f.explicit_ro) else {
        return Err(QmpError::generic("Block node is read-only"));
    };
    let path = file.filename.clone();
    let proto: Arc<dyn Protocol> = Arc::new(
        FileProtocol::open(Path::new(&path), false)
            .map_err(|_| QmpError::generic("Block node is read-only"))?,
    );
    let block: Arc<dyn BlockNode> = match driver {
        Driver::Raw | Driver::Qcow2 | Driver::Qed => {
            crate::graph::reopen_format(
                driver,
                Arc::clone(&proto),
                old.as_ref().and_then(|o| o.backing()),
            )
            .await?
        }
        _ => return Err(QmpError::generic("Block node is read-only")),
    };
    g.replace_image(id, proto, block, false).await;
    if let Some(o) = old {
        if let Err(e) = o.close().await {
            tracing::warn!("closing {path} after reopening it read-write: {e}");
        }
    }
    Ok(true)
}

fn set_blockers(g: &mut Graph, ids: &[NodeId], job: Option<&'static str>) {
    for id in ids {
        if let Some(n) = g.get_mut(*id) {
            n.blocker = job;
        }
    }
}

fn speed_of(a: &Map<String, Value>) -> i64 {
    a.get("speed").and_then(|v| v.as_i64()).unwrap_or(0)
}

/// Start a created job with its speed (a negative speed fails it early, as QEMU).
async fn start_job(mon: &Arc<Monitor>, job: &Arc<Job>, a: &Map<String, Value>) -> QmpResult<()> {
    let speed = speed_of(a);
    if speed < 0 {
        mon.jobs.early_fail(job);
        return Err(JobError::NegativeSpeed.into());
    }
    let _ = job.set_speed(speed);
    mon.jobs.start(job);
    job.wait_settled().await;
    Ok(())
}

/// The node named `name` (`top-node`, `base-node`), which must be in `chain`; QEMU's texts.
fn node_in_chain(g: &Graph, name: &str, chain: &[NodeId]) -> QmpResult<NodeId> {
    let id = g
        .find(name)
        .ok_or_else(|| QmpError::generic(format!("Cannot find device='' nor node-name='{name}'")))?
        .id;
    if !chain.contains(&id) {
        return Err(QmpError::generic(format!(
            "'{name}' is not in this backing file chain"
        )));
    }
    Ok(id)
}

/// `block-commit`.
pub async fn block_commit(mon: &Arc<Monitor>, a: &Map<String, Value>) -> QmpResult<Value> {
    let device = s(a, "device").unwrap_or_default();
    let mut g = mon.graph.lock().await;
    let dev = match root_node(&g, device) {
        Ok(d) => d,
        Err(e) if g.find(device).is_some() => return Err(e),
        Err(_) => {
            return Err(QmpError::new(
                ErrorClass::DeviceNotFound,
                format!("Device '{device}' not found"),
            ))
        }
    };
    busy_check(&g, &[dev])?;
    let devchain = chain(&g, dev);
    let top = match (s(a, "top-node"), s(a, "top")) {
        (Some(_), Some(_)) => {
            return Err(QmpError::generic(
                "'top-node' and 'top' are mutually exclusive",
            ))
        }
        (Some(t), None) => node_in_chain(&g, t, &devchain)?,
        (None, Some(t)) => find_by_filename(&g, dev, t)
            .await
            .ok_or_else(|| QmpError::generic(format!("Top image file {t} not found")))?,
        (None, None) => dev,
    };
    let topchain = chain(&g, top);
    let base = match (s(a, "base-node"), s(a, "base")) {
        (Some(_), Some(_)) => {
            return Err(QmpError::generic(
                "'base-node' and 'base' are mutually exclusive",
            ))
        }
        (Some(b), None) => node_in_chain(&g, b, &topchain)?,
        (None, Some(b)) => find_by_filename(&g, top, b)
            .await
            .filter(|id| *id != top)
            .ok_or_else(|| QmpError::generic(format!("Can't find '{b}' in the backing chain")))?,
        (None, None) => *topchain
            .iter()
            .rev()
            .find(|id| g.get(**id).is_some_and(|n| !n.driver.is_filter()))
            .filter(|id| **id != top)
            .ok_or_else(|| QmpError::generic("There is no backimg image"))?,
    };
    if top == base {
        return Err(QmpError::generic("cannot commit an image into itself"));
    }
    // The layers from top down to (and including) the base.
    let pos = topchain.iter().position(|x| *x == base).unwrap_or(0);
    let span: Vec<NodeId> = topchain[..=pos].to_vec();
    busy_check(&g, &span)?;
    let active = top == dev;
    if active && s(a, "backing-file").is_some() {
        return Err(QmpError::generic(
            "'backing-file' specified, but 'top' is the active layer",
        ));
    }
    let job_id = s(a, "job-id").unwrap_or("").to_string();
    mon.jobs.check_id(&job_id)?;
    if active {
        return start_mirror(
            mon,
            g,
            a,
            MirrorSetup {
                job_id,
                job_type: JobType::Commit,
                source: dev,
                target: base,
                sync: Sync::AboveBase,
                granularity: 65536,
                buf_size: 16 << 20,
                copy_mode: CopyMode::Background,
                on_source_error: static_str(s(a, "on-error")),
                on_target_error: static_str(s(a, "on-error")),
                filter_name: s(a, "filter-node-name").map(str::to_string),
                held: span,
                target_backing: None,
                target_owned: false,
                target_fresh: false,
                replaces: None,
            },
        )
        .await;
    }
    // The overlay of `top` (its header changes at the end).
    let overlay = devchain
        .iter()
        .copied()
        .find(|id| g.get(*id).and_then(|n| n.chain_next()) == Some(top));
    if let Some(o) = overlay {
        busy_check(&g, &[o])?;
    }
    let base_reopened = reopen_rw(&mut g, base).await?;
    let (Some(top_block), Some(base_block)) = (g.effective_block(top), g.effective_block(base))
    else {
        return Err(QmpError::generic("commit: the nodes have no image"));
    };
    let hooks = Arc::new(CommitGraphHooks {
        mon: Arc::downgrade(mon),
        overlay,
        top,
        base,
        backing_file: s(a, "backing-file").map(str::to_string),
        base_reopened,
        held: span.iter().copied().chain(Some(dev)).collect(),
    });
    let driver: Arc<dyn JobDriver> = Arc::new(CommitJob::new(top_block, base_block, hooks));
    let job = mon.jobs.create(
        &job_id,
        JobType::Commit,
        driver,
        &job_options(a, s(a, "on-error")),
    )?;
    if speed_of(a) >= 0 {
        let mut held = span.clone();
        held.push(dev);
        set_blockers(&mut g, &held, Some("commit"));
    }
    drop(g);
    start_job(mon, &job, a).await?;
    Ok(json!({}))
}

/// QEMU's `bdrv_find_backing_image` for the deprecated file-name arguments: the node below
/// the image whose recorded backing name (or shown file name) is `name`.
async fn find_by_filename(g: &Graph, from: NodeId, name: &str) -> Option<NodeId> {
    for id in chain(g, from) {
        let n = g.get(id)?;
        if n.driver.is_filter() {
            continue;
        }
        let shown = g.display_filename(n).await;
        let canon = |p: &str| std::fs::canonicalize(p).ok();
        if shown == name || (canon(&shown).is_some() && canon(&shown) == canon(name)) {
            return Some(id);
        }
    }
    None
}

/// Graph bookkeeping of an intermediate commit.
struct CommitGraphHooks {
    mon: Weak<Monitor>,
    overlay: Option<NodeId>,
    top: NodeId,
    base: NodeId,
    backing_file: Option<String>,
    base_reopened: bool,
    held: Vec<NodeId>,
}

#[async_trait]
impl CommitHooks for CommitGraphHooks {
    async fn drop_intermediates(&self) -> Result<(), BlockError> {
        let Some(mon) = self.mon.upgrade() else {
            return Ok(());
        };
        let mut g = mon.graph.lock().await;
        let Some(base_node) = g.get(self.base) else {
            return Ok(());
        };
        let name = match &self.backing_file {
            Some(b) => b.clone(),
            None => g.display_filename(base_node).await,
        };
        let fmt = base_node.driver.as_str().to_string();
        let base_block = g.effective_block(self.base);
        if let Some(o) = self.overlay {
            let was_ro = g.get(o).is_some_and(|n| n.read_only);
            if was_ro {
                reopen_rw(&mut g, o)
                    .await
                    .map_err(|e| BlockError::InvalidArgument(e.desc))?;
            }
            if let Some(ob) = g.effective_block(o) {
                ob.set_backing_file(Some((name.clone(), Some(fmt)))).await?;
                ob.set_backing_node(base_block.clone());
            }
            let shown = g.display_filename(base_node_ref(&g, self.base)).await;
            if let Some(n) = g.get_mut(o) {
                n.backing = Some(self.base);
                n.backing_from_header = shown == name;
                n.backing_file_str = Some(name);
            }
            if was_ro {
                crate::stream_cmd::reopen_read_only(&mut g, o).await;
            }
        }
        // The dropped layers: free the implicit ones nobody uses any more.
        let mut c = Some(self.top);
        let mut dropped = Vec::new();
        while let Some(id) = c {
            if id == self.base {
                break;
            }
            dropped.push(id);
            c = g.get(id).and_then(|n| n.chain_next());
        }
        for id in dropped {
            if let Some(n) = g.get_mut(id) {
                n.blocker = None;
            }
            g.remove_if_unreferenced(id).await;
        }
        Ok(())
    }

    async fn clean(&self) {
        let Some(mon) = self.mon.upgrade() else {
            return;
        };
        let mut g = mon.graph.lock().await;
        set_blockers(&mut g, &self.held, None);
        if self.base_reopened {
            crate::stream_cmd::reopen_read_only(&mut g, self.base).await;
        }
    }
}

fn base_node_ref(g: &Graph, id: NodeId) -> &crate::graph::GraphNode {
    // The base cannot vanish while the job holds it.
    g.get(id).unwrap_or_else(|| &g.nodes()[0])
}

/// QEMU's `bdrv_can_write_zeroes_with_unmap` for a mirror target: the node was opened with
/// `discard=unmap` and its driver can deallocate while zeroing (qcow2 version 3, raw, nbd;
/// not qcow2 version 2 or QED).
async fn zeroes_with_unmap(g: &Graph, id: NodeId) -> bool {
    let Some(n) = g.get(id) else {
        return false;
    };
    if !n.discard_unmap {
        return false;
    }
    match n.driver {
        Driver::Raw | Driver::Nbd => true,
        Driver::Qcow2 => match n.block.as_ref().and_then(|b| {
            b.as_any()
                .downcast_ref::<diskstream_block::format::qcow2::Qcow2>()
        }) {
            Some(q) => q.header().await.version >= 3,
            None => false,
        },
        _ => false,
    }
}

/// What the mirror copies first.
enum Sync {
    Full,
    /// `top`: what the source itself allocates.
    Top,
    /// Active commit: everything above the base (the target).
    AboveBase,
    None,
}

struct MirrorSetup {
    job_id: String,
    job_type: JobType,
    source: NodeId,
    target: NodeId,
    sync: Sync,
    granularity: u64,
    buf_size: u64,
    copy_mode: CopyMode,
    on_source_error: Option<&'static str>,
    on_target_error: Option<&'static str>,
    filter_name: Option<String>,
    held: Vec<NodeId>,
    /// drive-mirror: the node the target gets as backing at completion.
    target_backing: Option<NodeId>,
    /// drive-mirror created (and owns) the target node.
    target_owned: bool,
    /// drive-mirror created the target image just now, so it reads as zeroes (QEMU's
    /// `bdrv_has_zero_init`): a full sync copies only what the source's chain allocates.
    target_fresh: bool,
    /// `replaces`: the node below the (filter) source that the target replaces at
    /// completion, instead of the source.
    replaces: Option<NodeId>,
}

fn policy(s: Option<&str>) -> OnError {
    s.and_then(OnError::parse).unwrap_or_default()
}

async fn start_mirror(
    mon: &Arc<Monitor>,
    mut g: tokio::sync::MutexGuard<'_, Graph>,
    a: &Map<String, Value>,
    m: MirrorSetup,
) -> QmpResult<Value> {
    let (Some(src_block), Some(tgt_block)) =
        (g.effective_block(m.source), g.effective_block(m.target))
    else {
        return Err(QmpError::generic("mirror: the nodes have no image"));
    };
    let target_reopened = reopen_rw(&mut g, m.target).await?;
    let tgt_block = if target_reopened {
        g.effective_block(m.target).unwrap_or(tgt_block)
    } else {
        tgt_block
    };
    let zeroes_free = zeroes_with_unmap(&g, m.target).await;
    let sync = match m.sync {
        // QEMU's zero_target is off for a target drive-mirror just created (it reads as
        // zeroes): copy what the source's chain allocates.
        Sync::Full if m.target_fresh => SyncMode::Above(None),
        // An existing target: zeroed first with large write-zeroes when it can do that
        // cheaply, else every chunk is copied (holes as zero writes).
        Sync::Full if zeroes_free => SyncMode::FullZeroed,
        Sync::Full => SyncMode::Full,
        Sync::None => SyncMode::None,
        Sync::Top => SyncMode::Above(src_block.backing()),
        Sync::AboveBase => SyncMode::Above(Some(Arc::clone(&tgt_block))),
    };
    let cfg = MirrorConfig {
        granularity: m.granularity,
        buf_size: m.buf_size,
        sync,
        copy_mode: m.copy_mode,
        on_source_error: policy(m.on_source_error),
        on_target_error: policy(m.on_target_error),
        grow_target: m.job_type == JobType::Commit,
        zeroes_free,
    };
    let hooks = Arc::new(MirrorGraphHooks {
        mon: Arc::downgrade(mon),
        source: m.source,
        target: m.target,
        filter: std::sync::Mutex::new(None),
        held: m.held.clone(),
        target_backing: m.target_backing,
        target_reopened,
        target_owned: m.target_owned,
        job_type: m.job_type,
        pivoted: std::sync::atomic::AtomicBool::new(false),
        replaces: m.replaces,
    });
    let mj = Arc::new(MirrorJob::new(src_block, tgt_block, cfg, hooks.clone()));
    let filter_block = mj.filter();
    let driver: Arc<dyn JobDriver> = mj;
    let opts = job_options(a, None);
    let job = match mon.jobs.create(&m.job_id, m.job_type, driver, &opts) {
        Ok(j) => j,
        Err(e) => {
            if target_reopened {
                crate::stream_cmd::reopen_read_only(&mut g, m.target).await;
            }
            return Err(e.into());
        }
    };
    if speed_of(a) < 0 {
        mon.jobs.early_fail(&job);
        if target_reopened {
            crate::stream_cmd::reopen_read_only(&mut g, m.target).await;
        }
        return Err(JobError::NegativeSpeed.into());
    }
    // The filter above the source; every user now writes through it.
    let f = match g.insert_filter(m.filter_name.as_deref(), m.source).await {
        Ok(f) => f,
        Err(e) => {
            mon.jobs.early_fail(&job);
            return Err(e);
        }
    };
    if let Some(n) = g.get_mut(f) {
        n.driver = Driver::MirrorTop;
        n.block = Some(filter_block);
    }
    g.sync_users().await;
    if let Ok(mut fl) = hooks.filter.lock() {
        *fl = Some(f);
    }
    let kind = m.job_type.as_str();
    let mut held = m.held.clone();
    held.push(f);
    held.push(m.target);
    set_blockers(
        &mut g,
        &held,
        Some(if kind == "commit" { "commit" } else { "mirror" }),
    );
    drop(g);
    start_job(mon, &job, a).await?;
    Ok(json!({}))
}

/// Graph bookkeeping of a mirror or active commit.
struct MirrorGraphHooks {
    mon: Weak<Monitor>,
    source: NodeId,
    target: NodeId,
    filter: std::sync::Mutex<Option<NodeId>>,
    held: Vec<NodeId>,
    target_backing: Option<NodeId>,
    target_reopened: bool,
    target_owned: bool,
    job_type: JobType,
    /// The users moved to the target (`complete`): the target is now the active layer and
    /// stays writable even without users (QEMU keeps an active commit's base read-write).
    pivoted: std::sync::atomic::AtomicBool,
    /// The node the target replaces at completion when it is not the source.
    replaces: Option<NodeId>,
}

#[async_trait]
impl MirrorHooks for MirrorGraphHooks {
    async fn finish(&self, pivot: bool) {
        let Some(mon) = self.mon.upgrade() else {
            return;
        };
        let mut g = mon.graph.lock().await;
        let f = self.filter.lock().ok().and_then(|mut f| f.take());
        if pivot {
            self.pivoted
                .store(true, std::sync::atomic::Ordering::Release);
            if let Some(b) = self.target_backing {
                let bb = g.effective_block(b);
                let shown = match g.get(b) {
                    Some(n) => Some(g.display_filename(n).await),
                    None => None,
                };
                if let Some(tb) = g.effective_block(self.target) {
                    tb.set_backing_node(bb);
                }
                if let Some(n) = g.get_mut(self.target) {
                    n.backing = Some(b);
                    n.backing_from_header = true;
                    n.backing_file_str = shown;
                }
            }
            match (f, self.replaces) {
                (Some(f), Some(r)) => {
                    // QEMU's bdrv_replace_node(replaces, target): the filter above the
                    // replaced node now reads the target; the source's users come back to
                    // the source (its filters rebuilt over the target).
                    g.move_parents(r, self.target);
                    g.move_users(r, self.target);
                    g.quiesce_filters(&g.filters_above(self.target)).await;
                    let stale = g.refresh_filters(&[]);
                    g.remove_filter(f).await;
                    drop(stale);
                }
                (Some(f), None) => {
                    g.move_users(f, self.target);
                    g.move_users(self.source, self.target);
                    // Nothing uses the filter any more: it goes without handing users back.
                    g.remove_filter(f).await;
                }
                _ => {}
            }
            g.sync_users().await;
        } else if let Some(f) = f {
            g.remove_filter(f).await;
        }
        let _ = self.job_type;
    }

    async fn clean(&self) {
        let Some(mon) = self.mon.upgrade() else {
            return;
        };
        let mut g = mon.graph.lock().await;
        if let Some(f) = self.filter.lock().ok().and_then(|mut f| f.take()) {
            g.remove_filter(f).await;
        }
        let mut held = self.held.clone();
        held.push(self.target);
        set_blockers(&mut g, &held, None);
        let target_in_use = g.has_users(self.target);
        let pivoted = self.pivoted.load(std::sync::atomic::Ordering::Acquire);
        if self.target_reopened && !target_in_use && !pivoted {
            crate::stream_cmd::reopen_read_only(&mut g, self.target).await;
        }
        if self.target_owned && !target_in_use && !is_child(&g, self.target) {
            g.remove_tree(self.target).await;
        }
    }
}

fn mirror_params(a: &Map<String, Value>) -> QmpResult<(u64, u64)> {
    let granularity = a.get("granularity").and_then(|v| v.as_u64());
    if let Some(gr) = granularity {
        if !(512..=64 << 20).contains(&gr) {
            return Err(QmpError::generic(
                "Parameter 'granularity' expects a value in range [512B, 64MB]",
            ));
        }
        if !gr.is_power_of_two() {
            return Err(QmpError::generic(
                "Parameter 'granularity' expects a power of 2",
            ));
        }
    }
    Ok((granularity.unwrap_or(0), 0))
}

fn sync_of(a: &Map<String, Value>) -> QmpResult<Sync> {
    match s(a, "sync").unwrap_or("full") {
        "full" => Ok(Sync::Full),
        "top" => Ok(Sync::Top),
        "none" => Ok(Sync::None),
        other => Err(QmpError::generic(format!(
            "Sync mode '{other}' not supported"
        ))),
    }
}

fn buf_size(a: &Map<String, Value>, granularity: u64) -> QmpResult<u64> {
    let b = a.get("buf-size").and_then(|v| v.as_i64()).unwrap_or(0);
    if b < 0 {
        return Err(QmpError::generic("Invalid parameter 'buf-size'"));
    }
    let b = if b == 0 { 16 << 20 } else { b as u64 };
    Ok(b.div_ceil(granularity) * granularity)
}

fn default_granularity(g: &Graph, target: NodeId) -> u64 {
    g.effective_block(target)
        .and_then(|b| b.cluster_size())
        .map(|c| c.clamp(4096, 65536))
        .unwrap_or(65536)
}

fn static_str(s: Option<&str>) -> Option<&'static str> {
    match s? {
        "report" => Some("report"),
        "ignore" => Some("ignore"),
        "enospc" => Some("enospc"),
        "stop" => Some("stop"),
        "auto" => Some("auto"),
        _ => None,
    }
}

fn copy_mode(a: &Map<String, Value>) -> CopyMode {
    s(a, "copy-mode")
        .and_then(CopyMode::parse)
        .unwrap_or(CopyMode::Background)
}

/// `blockdev-mirror`.
pub async fn blockdev_mirror(mon: &Arc<Monitor>, a: &Map<String, Value>) -> QmpResult<Value> {
    let device = s(a, "device").unwrap_or_default();
    let target = s(a, "target").unwrap_or_default();
    let g = mon.graph.lock().await;
    let src = root_node(&g, device)?;
    let tgt = g
        .find(target)
        .ok_or_else(|| {
            QmpError::generic(format!(
                "Cannot find device='{target}' nor node-name='{target}'"
            ))
        })?
        .id;
    busy_check(&g, &[src, tgt])?;
    let (gran, _) = mirror_params(a)?;
    if g.effective_block(src).is_some()
        && g.effective_block(src).map(|b| Arc::as_ptr(&b) as *const ())
            == g.effective_block(tgt).map(|b| Arc::as_ptr(&b) as *const ())
    {
        return Err(QmpError::generic("Can't mirror node into itself"));
    }
    let sync = sync_of(a)?;
    let replaces = check_replaces(&g, src, s(a, "replaces"))?;
    let gran = if gran == 0 {
        default_granularity(&g, tgt)
    } else {
        gran
    };
    let buf = buf_size(a, gran)?;
    let job_id = s(a, "job-id").unwrap_or("").to_string();
    start_mirror(
        mon,
        g,
        a,
        MirrorSetup {
            job_id,
            job_type: JobType::Mirror,
            source: src,
            target: tgt,
            sync,
            granularity: gran,
            buf_size: buf,
            copy_mode: copy_mode(a),
            on_source_error: static_str(s(a, "on-source-error")),
            on_target_error: static_str(s(a, "on-target-error")),
            filter_name: s(a, "filter-node-name").map(str::to_string),
            held: vec![src],
            target_backing: None,
            target_owned: false,
            target_fresh: false,
            replaces,
        },
    )
    .await
}

/// QEMU's `check_to_replace_node` for a mirror of `src`: `replaces` must name an existing
/// node, either the source itself or a node reached from it through filters' children only
/// (QEMU's `bdrv_recurse_can_replace`: replacing it changes nothing the source's users see,
/// as the target then holds the same data). Returns the node to replace at completion when
/// it is not the source.
fn check_replaces(g: &Graph, src: NodeId, replaces: Option<&str>) -> QmpResult<Option<NodeId>> {
    let Some(r) = replaces else { return Ok(None) };
    let Some(n) = g.find(r) else {
        return Err(QmpError::generic(format!(
            "Failed to find node with node-name='{r}'"
        )));
    };
    if n.id == src {
        return Ok(None);
    }
    // QEMU's op blockers (BLOCK_OP_TYPE_REPLACE): a job's node, a backing node.
    crate::snapshot_cmd::check_not_busy(g, n.id)?;
    let src_node = g.get(src);
    // Down the filters below the source, to the first node that is not a filter.
    let mut cur = src_node;
    while let Some(c) = cur.filter(|c| c.driver.is_filter()) {
        match c.file.and_then(|f| g.get(f)) {
            Some(child) if child.id == n.id => return Ok(Some(n.id)),
            child => cur = child,
        }
    }
    Err(QmpError::generic(format!(
        "Cannot replace '{r}' by a node mirrored from '{}', because it cannot be guaranteed \
         that doing so would not lead to an abrupt change of visible data",
        src_node.map(|s| s.name.as_str()).unwrap_or_default()
    )))
}

/// `drive-mirror`: like `blockdev-mirror` with a target file diskstream creates (unless
/// `mode: existing`) and opens.
pub async fn drive_mirror(mon: &Arc<Monitor>, a: &Map<String, Value>) -> QmpResult<Value> {
    let device = s(a, "device").unwrap_or_default();
    let target = s(a, "target").unwrap_or_default();
    let mut g = mon.graph.lock().await;
    let src = root_node(&g, device)?;
    busy_check(&g, &[src])?;
    let (gran, _) = mirror_params(a)?;
    let sync = sync_of(a)?;
    if s(a, "replaces").is_some() && s(a, "node-name").is_none() {
        return Err(QmpError::generic(
            "a node-name must be provided when replacing a named node of the graph",
        ));
    }
    let existing = s(a, "mode") == Some("existing");
    let src_node = g
        .get(src)
        .ok_or_else(|| QmpError::generic("node vanished"))?;
    let src_block = g
        .effective_block(src)
        .ok_or_else(|| QmpError::generic("mirror: the source has no image"))?;
    let format = s(a, "format")
        .unwrap_or(src_node.driver.as_str())
        .to_string();
    // The node the target gets as backing at completion (QEMU's MIRROR_SOURCE_BACKING_CHAIN).
    let src_backing = src_node.backing;
    let target_backing = match sync {
        Sync::Top => src_backing,
        Sync::None => Some(src),
        _ => None,
    };
    if !existing {
        if format != "qcow2" && format != "qed" {
            return Err(QmpError::generic(format!(
                "diskstream can only create qcow2 or qed mirror targets, not '{format}'"
            )));
        }
        let backing = match target_backing.and_then(|b| g.get(b)) {
            Some(b) => Some((g.display_filename(b).await, b.driver.as_str().to_string())),
            None => None,
        };
        let created = crate::graph::create_cow_image(
            &format,
            Path::new(target),
            src_block.size(),
            backing.as_ref().map(|b| b.0.clone()),
            backing.map(|b| b.1),
        )
        .await;
        if let Err(e) = created {
            let why = match &e {
                BlockError::Io { source, .. } => {
                    diskstream_jobs::error::strerror(source.raw_os_error().unwrap_or(5))
                }
                other => other.to_string(),
            };
            return Err(QmpError::generic(format!(
                "Could not create '{target}': {why}"
            )));
        }
    }
    let node_name = match s(a, "node-name") {
        Some(n) => n.to_string(),
        None => format!("drive-mirror-{}", std::process::id() as u64 ^ src),
    };
    let mut opts = Map::new();
    opts.insert("driver".into(), json!(format));
    opts.insert("node-name".into(), json!(node_name));
    // QEMU opens the target with the source's open flags, `discard=unmap` included.
    if g.get(src).is_some_and(|n| n.discard_unmap) {
        opts.insert("discard".into(), json!("unmap"));
    }
    if format == "qcow2" || format == "qed" {
        opts.insert("backing".into(), Value::Null);
    }
    opts.insert("file".into(), json!({"driver": "file", "filename": target}));
    g.blockdev_add(&opts).await?;
    let mut tgt = g
        .find(&node_name)
        .map(|n| n.id)
        .ok_or_else(|| QmpError::generic("target vanished"))?;
    if let Some(n) = g.get_mut(tgt) {
        n.monitor_owned = false;
    }
    // An existing target keeps the chain its header records (QEMU opens it at
    // `block-job-complete`): after the pivot the device reads through it. A backing file that
    // is a node of the source's chain is linked at completion (not opened twice); any other
    // is opened now, read-only, from the header.
    let mut existing_backing = None;
    if existing {
        if let Some((bfile, bfmt)) = crate::switch_cmd::header_backing(&g, tgt).await {
            match crate::switch_cmd::chain_node_for(&g, src, target, &bfile) {
                Some(b) => {
                    if let Err(e) =
                        crate::switch_cmd::check_backing_format(&g, b, target, &bfile, &bfmt)
                    {
                        g.remove_tree(tgt).await;
                        return Err(e);
                    }
                    existing_backing = Some(b);
                }
                None => {
                    tgt = crate::switch_cmd::reopen_with_header_chain(
                        &mut g, tgt, &mut opts, &node_name,
                    )
                    .await?;
                }
            }
        }
    }
    let gran = if gran == 0 {
        default_granularity(&g, tgt)
    } else {
        gran
    };
    let checked = buf_size(a, gran).and_then(|b| {
        // As QEMU's blockdev_mirror_common: after the target was created and opened.
        Ok((b, check_replaces(&g, src, s(a, "replaces"))?))
    });
    let (buf, replaces) = match checked {
        Ok(b) => b,
        Err(e) => {
            g.remove_tree(tgt).await;
            return Err(e);
        }
    };
    let job_id = s(a, "job-id").unwrap_or("").to_string();
    let r = start_mirror(
        mon,
        g,
        a,
        MirrorSetup {
            job_id,
            job_type: JobType::Mirror,
            source: src,
            target: tgt,
            sync,
            granularity: gran,
            buf_size: buf,
            copy_mode: copy_mode(a),
            on_source_error: static_str(s(a, "on-source-error")),
            on_target_error: static_str(s(a, "on-target-error")),
            filter_name: None,
            held: vec![src],
            target_backing: if existing {
                existing_backing
            } else {
                target_backing
            },
            target_owned: true,
            target_fresh: !existing,
            replaces,
        },
    )
    .await;
    if r.is_err() {
        let mut g = mon.graph.lock().await;
        if g.get(tgt).is_some() && !g.has_users(tgt) {
            g.remove_tree(tgt).await;
        }
    }
    r
}

/// `block-job-change`.
pub async fn block_job_change(mon: &Arc<Monitor>, a: &Map<String, Value>) -> QmpResult<Value> {
    // The union's branches: only `mirror` has members.
    match (s(a, "type"), a.contains_key("copy-mode")) {
        (Some("mirror"), false) => {
            return Err(QmpError::generic("Parameter 'copy-mode' is missing"))
        }
        (Some(t), true) if t != "mirror" => {
            return Err(QmpError::generic("Parameter 'copy-mode' is unexpected"))
        }
        _ => {}
    }
    let id = s(a, "id").unwrap_or_default();
    let job = mon.jobs.find(id).ok_or_else(|| {
        QmpError::new(
            ErrorClass::DeviceNotActive,
            format!("Block job '{id}' not found"),
        )
    })?;
    if s(a, "type") != Some(job.job_type().as_str()) {
        return Err(QmpError::generic(
            "Job type does not match specified job type",
        ));
    }
    let mode = s(a, "copy-mode").unwrap_or("background");
    job.change_copy_mode(mode).map_err(QmpError::generic)?;
    Ok(json!({}))
}
