//! The named node graph: what `blockdev-add` builds, `blockdev-del` tears down and
//! `query-named-block-nodes` shows, with QEMU's naming, ownership and error rules.
//!
//! Every layer is a node with a name (the user's `node-name`, or an automatic `#blockN` for
//! implicit nodes: inline children, backing files opened from an image header, job filters).
//! Protocol nodes (`file`, `blkdebug`) hold a [`Protocol`]; format nodes (`raw`, `qcow2`, `qed`) hold
//! the [`BlockNode`] built on their `file` child and link to their `backing` node.
//! `copy-on-read` filter nodes hold the block layer's [`CopyOnRead`] filter over their `file`
//! child: users attached to them (exports) read through it. They are added by `blockdev-add`
//! or, while a stream job runs, inserted above the streamed node (overlays and users then point
//! at the filter), as in QEMU, so job conflicts name the same nodes QSD names.
//!
//! **Users** ([`User`]) are what QEMU models as BlockBackend parents: block exports attach to
//! a node through an [`Arc<BlockBackend>`](BlockBackend). Graph changes move them as QEMU's
//! `bdrv_replace_node` moves parents: a job filter inserted above a node takes over its users,
//! removing the filter gives them back, and reopening a node's image swaps the backend's root
//! (drained: requests in flight finish on the old image first). A node with users cannot be
//! deleted ("Node X is in use"), and write permission follows QEMU's rules: a writable user
//! conflicts with a parent that does not share `write` (a stream job's intermediate nodes, a
//! format node's file, the backing of a node whose own parents forbid writes), reported with
//! QEMU's "Permission conflict on node ..." text.
//!
//! Images are opened as QSD opens them: a missing `backing` opens the chain recorded in the
//! header (read-only, implicit nodes, never probing a format the image does not record),
//! `backing: null` opens none, a string references an existing node. Opening a file that is
//! already open in the graph follows QEMU's image locking (one writer, no reader beside a
//! writer): "Failed to get \"write\" lock".

use crate::blkdebug::{BlkdebugProtocol, InjectRule};
use crate::error::{QmpError, QmpResult};
use diskstream_block::filter::cor::{CopyOnRead, CorConfig};
use diskstream_block::format::qcow2::Qcow2;
use diskstream_block::format::qed::Qed;
use diskstream_block::format::raw::RawNode;
use diskstream_block::image::resolve_backing;
use diskstream_block::node::{same_node, BackingFormatHint};
use diskstream_block::protocol::file::FileProtocol;
use diskstream_block::protocol::Protocol;
use diskstream_block::{BlockBackend, BlockNode};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Identity of a node inside the graph (stable across renames; names are unique anyway).
pub type NodeId = u64;

/// An image replaced by a reopen: (old, new).
pub type ImageSwap = (Arc<dyn BlockNode>, Arc<dyn BlockNode>);

/// The drivers diskstream implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    /// Protocol: a local file.
    File,
    /// Protocol wrapper injecting errors.
    Blkdebug,
    /// Format: raw.
    Raw,
    /// Format: qcow2.
    Qcow2,
    /// Format: QED.
    Qed,
    /// Filter: the copy-on-read filter (`blockdev-add`, or inserted by a stream job).
    CopyOnRead,
    /// Protocol: an NBD export (QEMU's `nbd` driver); also usable directly as an image.
    Nbd,
    /// Filter inserted above the source of a mirror or active commit job (QEMU's
    /// `mirror_top`); its image is the job's write-tracking filter.
    MirrorTop,
    /// Protocol: a remote object over `http://` (QEMU's curl `http` driver); read-only.
    Http,
    /// Protocol: a remote object over `https://` (QEMU's curl `https` driver); read-only.
    Https,
    /// Protocol: an S3 object (`s3://bucket/key`); diskstream's own, only opened for backing
    /// files recorded in an image header (QEMU has no such driver).
    S3,
}

impl Driver {
    /// QEMU's driver name.
    pub fn as_str(self) -> &'static str {
        match self {
            Driver::File => "file",
            Driver::Blkdebug => "blkdebug",
            Driver::Raw => "raw",
            Driver::Qcow2 => "qcow2",
            Driver::Qed => "qed",
            Driver::CopyOnRead => "copy-on-read",
            Driver::Nbd => "nbd",
            Driver::MirrorTop => "mirror_top",
            Driver::Http => "http",
            Driver::Https => "https",
            Driver::S3 => "s3",
        }
    }

    /// Whether the node is a remote object read through diskstream-http.
    pub fn is_remote_object(self) -> bool {
        matches!(self, Driver::Http | Driver::Https | Driver::S3)
    }

    /// Whether the node is an image format with a backing file (qcow2, QED).
    pub fn is_cow(self) -> bool {
        matches!(self, Driver::Qcow2 | Driver::Qed)
    }

    /// Whether the node is a filter (transparent for chain walks).
    pub fn is_filter(self) -> bool {
        matches!(self, Driver::CopyOnRead | Driver::MirrorTop)
    }
}

/// One node.
pub struct GraphNode {
    /// Identity.
    pub id: NodeId,
    /// Name (`#blockN` when implicit).
    pub name: String,
    /// Driver.
    pub driver: Driver,
    /// Opened read-only.
    pub read_only: bool,
    /// Read-only was requested for this very node (a job may not reopen it read-write).
    pub explicit_ro: bool,
    /// Created by a top-level `blockdev-add` (only those may be deleted).
    pub monitor_owned: bool,
    /// File name shown by queries.
    pub filename: String,
    /// Protocol nodes: the storage.
    pub proto: Option<Arc<dyn Protocol>>,
    /// Format nodes: the image.
    pub block: Option<Arc<dyn BlockNode>>,
    /// The `file` (or `image`) child.
    pub file: Option<NodeId>,
    /// The backing child in the graph.
    pub backing: Option<NodeId>,
    /// The job type that holds this node (op blocker), e.g. "stream".
    pub blocker: Option<&'static str>,
    /// The id of the stream job using this node as an intermediate node (which does not share
    /// `write` on it: the data must not change under the copy).
    pub intermediate_of: Option<String>,
    /// qcow2: the backing node was opened from the header (not named by the user).
    pub backing_from_header: bool,
    /// QEMU's `bs->backing_file`: the backing node's shown name when the link was made (at
    /// open, or the name a stream recorded); filters inserted later do not change it. Used to
    /// find a backing image by file name.
    pub backing_file_str: Option<String>,
    /// Opened with `discard=unmap` (QEMU's `BDRV_O_UNMAP`): with a driver that can
    /// deallocate while zeroing, the node writes zeroes cheaply (mirror's `zero_target`).
    pub discard_unmap: bool,
    /// Canonical path whose lock this node holds (protocol nodes).
    lock_path: Option<(PathBuf, bool)>,
}

impl GraphNode {
    /// A filter node over `target` (a job's or an export's copy-on-read filter): no image of
    /// its own beyond `block`, no backing, not monitor-owned. The one place both kinds of
    /// filter nodes are built.
    fn filter(
        id: NodeId,
        name: String,
        read_only: bool,
        filename: String,
        block: Option<Arc<dyn BlockNode>>,
        target: NodeId,
    ) -> GraphNode {
        GraphNode {
            id,
            name,
            driver: Driver::CopyOnRead,
            read_only,
            explicit_ro: false,
            monitor_owned: false,
            filename,
            proto: None,
            block,
            file: Some(target),
            backing: None,
            blocker: None,
            intermediate_of: None,
            backing_from_header: false,
            backing_file_str: None,
            discard_unmap: false,
            lock_path: None,
        }
    }

    /// The next node down a chain: a filter's child, a format node's backing.
    pub fn chain_next(&self) -> Option<NodeId> {
        match self.driver {
            Driver::CopyOnRead | Driver::MirrorTop => self.file,
            _ => self.backing,
        }
    }
}

/// A user attached to a node (QEMU's BlockBackend parent): a block export.
pub struct User {
    /// The user's id (the export id).
    pub id: String,
    /// The node it is attached to (follows filter insertion and removal).
    pub node: NodeId,
    /// Its attachment point; the root is kept equal to the node's image.
    pub backend: Arc<BlockBackend>,
    /// Whether it takes the `write` permission.
    pub write: bool,
}

/// The graph.
#[derive(Default)]
pub struct Graph {
    nodes: Vec<GraphNode>,
    users: Vec<User>,
    next_id: NodeId,
    auto_counter: u64,
    /// Open files: (writers, readers).
    locks: HashMap<PathBuf, (u32, u32)>,
}

/// QEMU's node-name rule: a letter first, then letters, digits, `-`, `.`, `_`; at most 31.
pub fn node_name_valid(n: &str) -> bool {
    n.len() < 32 && diskstream_jobs::job::id_wellformed(n)
}

fn strerror(e: &std::io::Error) -> String {
    diskstream_jobs::error::strerror(e.raw_os_error().unwrap_or(5))
}

fn block_err(e: diskstream_block::BlockError) -> QmpError {
    match &e {
        diskstream_block::BlockError::Io { context, source } => {
            QmpError::generic(format!("{context}: {}", strerror(source)))
        }
        _ => QmpError::generic(e.to_string()),
    }
}

/// Connect an `nbd` node (QEMU's `BlockdevOptionsNbd`, already validated): returns the
/// protocol and the file name QEMU shows (`nbd://host:port[/export]`,
/// `nbd+unix://[/export]?socket=path`). Errors carry QEMU's texts.
async fn open_nbd(
    opts: &Map<String, Value>,
    read_only: bool,
) -> QmpResult<(Arc<dyn Protocol>, String)> {
    use diskstream_nbd::client::{Address, ClientError, ClientOptions, NbdClient, NbdProtocol};
    let server = opts.get("server").cloned().unwrap_or(Value::Null);
    let field = |k: &str| server.get(k).and_then(|v| v.as_str()).unwrap_or_default();
    let export = opts.get("export").and_then(|v| v.as_str());
    if let Some(t) = opts.get("tls-creds").and_then(|v| v.as_str()) {
        return Err(QmpError::generic(format!(
            "No TLS credentials with id '{t}'"
        )));
    }
    let (address, shown, filename) = match field("type") {
        "unix" => {
            let path = field("path");
            let f = match export {
                Some(e) => format!("nbd+unix:///{e}?socket={path}"),
                None => format!("nbd+unix://?socket={path}"),
            };
            (Address::Unix(PathBuf::from(path)), path.to_string(), f)
        }
        "inet" => {
            let (host, port) = (field("host"), field("port"));
            let p: u16 = port.parse().map_err(|_| {
                QmpError::generic(format!(
                    "address resolution failed for {host}:{port}: Servname not supported for ai_socktype"
                ))
            })?;
            let f = match export {
                Some(e) => format!("nbd://{host}:{port}/{e}"),
                None => format!("nbd://{host}:{port}"),
            };
            (
                Address::Tcp {
                    host: host.to_string(),
                    port: p,
                },
                format!("{host}:{port}"),
                f,
            )
        }
        other => {
            return Err(QmpError::generic(format!(
                "diskstream's nbd driver does not support '{other}' socket addresses"
            )))
        }
    };
    let mut o = ClientOptions::new(address, export.unwrap_or_default());
    o.read_only = read_only;
    let secs =
        |k: &str| std::time::Duration::from_secs(opts.get(k).and_then(|v| v.as_u64()).unwrap_or(0));
    o.reconnect_delay = secs("reconnect-delay");
    o.open_timeout = secs("open-timeout");
    let client = NbdClient::connect(o).await.map_err(|e| match e {
        ClientError::Io { source, .. } => QmpError::generic(format!(
            "Failed to connect to '{shown}': {}",
            strerror(&source)
        )),
        ClientError::ExportNotFound { .. } => QmpError::generic("Requested export not available"),
        other => QmpError::generic(format!("Could not open '{filename}': {other}")),
    })?;
    if !read_only && client.info().read_only() {
        client.close();
        return Err(QmpError::generic("Could not open image: Permission denied"));
    }
    let proto: Arc<dyn Protocol> = Arc::new(NbdProtocol::from_client(client, filename.clone()));
    Ok((proto, filename))
}

/// The HTTP settings every remote object starts from: the defaults with the process's
/// `DISKSTREAM_HTTP_*` overrides (read once), as `diskstream img` uses them.
fn http_base_config() -> diskstream_http::HttpConfig {
    static BASE: std::sync::OnceLock<diskstream_http::HttpConfig> = std::sync::OnceLock::new();
    BASE.get_or_init(diskstream_http::HttpConfig::from_env)
        .clone()
}

/// Longest `timeout` QEMU's curl driver accepts, in seconds.
const HTTP_TIMEOUT_MAX: i64 = 10000;

/// Open an `http`/`https` node (QEMU's `BlockdevOptionsCurlHttp(s)`, already validated) or
/// diskstream's `s3` node (a header backing file `s3://bucket/key`): returns the protocol and
/// the URL QEMU shows. The checks and their texts follow QEMU's curl driver, in its order: the
/// object is read-only (`auto-read-only` makes a writable request read-only), `readahead` is a
/// multiple of 512 bytes, `timeout` is 0..=10000 s, the URL starts with the driver's scheme.
/// `readahead` (bytes) becomes read-ahead in fetch blocks, `timeout` the connect and read
/// limits, `sslverify: false` accepts any server certificate. Credentials and cookies are
/// refused: diskstream takes S3 credentials from the environment and has no secret objects.
async fn open_http(
    driver: &str,
    opts: &Map<String, Value>,
    read_only: bool,
) -> QmpResult<(Arc<dyn Protocol>, String)> {
    let auto_ro = opts
        .get("auto-read-only")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    if !read_only && !auto_ro {
        return Err(QmpError::generic("curl driver does not support writes"));
    }
    let mut cfg = http_base_config();
    if let Some(r) = opts.get("readahead").and_then(|v| v.as_i64()) {
        if r < 0 || r % 512 != 0 {
            return Err(QmpError::generic(format!(
                "HTTP_READAHEAD_SIZE {r} is not a multiple of 512"
            )));
        }
        cfg.readahead = (r as u64).div_ceil(cfg.block_size);
    }
    if let Some(t) = opts.get("timeout").and_then(|v| v.as_i64()) {
        if !(0..=HTTP_TIMEOUT_MAX).contains(&t) {
            return Err(QmpError::generic(
                "timeout parameter is too large or negative",
            ));
        }
        if t > 0 {
            cfg.connect_timeout = std::time::Duration::from_secs(t as u64);
            cfg.read_timeout = cfg.connect_timeout;
        }
    }
    if let Some(v) = opts.get("sslverify").and_then(|v| v.as_bool()) {
        cfg.tls_verify = v;
    }
    if opts.contains_key("cookie") && opts.contains_key("cookie-secret") {
        return Err(QmpError::generic(
            "curl driver cannot handle both cookie and cookie secret",
        ));
    }
    let url = opts.get("url").and_then(|v| v.as_str()).unwrap_or_default();
    let scheme_ok = url
        .get(..driver.len() + 3)
        .is_some_and(|p| p.eq_ignore_ascii_case(&format!("{driver}://")));
    if !scheme_ok {
        return Err(QmpError::generic(format!(
            "{driver} curl driver cannot handle the URL '{url}' (does not start with '{driver}://')"
        )));
    }
    for key in [
        "cookie",
        "cookie-secret",
        "username",
        "password-secret",
        "proxy-username",
        "proxy-password-secret",
    ] {
        if opts.contains_key(key) {
            return Err(QmpError::generic(format!(
                "diskstream's {driver} driver does not support '{key}'"
            )));
        }
    }
    let proto = diskstream_http::HttpProtocol::open(url, &cfg)
        .await
        .map_err(|e| QmpError::generic(format!("Could not open {e}")))?;
    Ok((Arc::new(proto), url.to_string()))
}

/// Nodes opened by one `blockdev-add`, committed to the graph only if all of it succeeds.
/// The words of the chain depth error (see [`Graph::open_header_backing`]).
const DEEPER: &str = "backing chain deeper than";

struct Staging {
    nodes: Vec<GraphNode>,
    /// Backing files opened from image headers above the one being opened (a chain's depth
    /// below the user-named node).
    header_depth: usize,
    /// The file name of the image at the top of the header chain being opened.
    chain_top: String,
}

impl Graph {
    /// Every node, oldest first.
    pub fn nodes(&self) -> &[GraphNode] {
        &self.nodes
    }

    /// The node with this id.
    pub fn get(&self, id: NodeId) -> Option<&GraphNode> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// The node with this id, mutable.
    pub fn get_mut(&mut self, id: NodeId) -> Option<&mut GraphNode> {
        self.nodes.iter_mut().find(|n| n.id == id)
    }

    /// The node with this name.
    pub fn find(&self, name: &str) -> Option<&GraphNode> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The node holding this block node.
    pub fn find_block(&self, b: &Arc<dyn BlockNode>) -> Option<NodeId> {
        self.nodes
            .iter()
            .find(|n| n.block.as_ref().is_some_and(|x| same_node(x, b)))
            .map(|n| n.id)
    }

    /// Nodes whose backing link is `id`.
    pub fn backing_parents(&self, id: NodeId) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|n| n.backing == Some(id))
            .map(|n| n.id)
            .collect()
    }

    /// Every user, oldest first.
    pub fn users(&self) -> &[User] {
        &self.users
    }

    /// The user with this id.
    pub fn user(&self, id: &str) -> Option<&User> {
        self.users.iter().find(|u| u.id == id)
    }

    /// Whether anything is attached to `id` as a user.
    pub fn has_users(&self, id: NodeId) -> bool {
        self.users.iter().any(|u| u.node == id)
    }

    /// Attach a user (the caller checked permissions with [`Graph::write_conflict`]).
    pub fn attach_user(&mut self, user: User) {
        self.users.push(user);
    }

    /// Detach the user `id`, returning it.
    pub fn detach_user(&mut self, id: &str) -> Option<User> {
        let pos = self.users.iter().position(|u| u.id == id)?;
        Some(self.users.remove(pos))
    }

    /// The image a user of `id` reads and writes: the node's own, or for a filter without an
    /// image of its own, its child's.
    pub fn effective_block(&self, id: NodeId) -> Option<Arc<dyn BlockNode>> {
        let mut cur = self.get(id)?;
        for _ in 0..=self.nodes.len() {
            if let Some(b) = &cur.block {
                return Some(Arc::clone(b));
            }
            if !cur.driver.is_filter() {
                return None;
            }
            cur = self.get(cur.file?)?;
        }
        None
    }

    /// Re-attach every user of `from` to `to` in the graph (QEMU's `bdrv_replace_node` for
    /// BlockBackend parents). Their backends are not touched: the caller re-points them,
    /// drained, before anything else can run (see [`BlockBackend::drain`]).
    pub fn move_users(&mut self, from: NodeId, to: NodeId) {
        for u in self.users.iter_mut() {
            if u.node == from {
                u.node = to;
            }
        }
    }

    /// `id` and every copy-on-read filter stacked above it (a filter whose `file` child is
    /// `id` or another such filter): the nodes whose users see `id`'s data as their device.
    pub fn filters_above(&self, id: NodeId) -> Vec<NodeId> {
        let mut out = vec![id];
        let mut i = 0;
        while i < out.len() {
            let cur = out[i];
            for n in &self.nodes {
                if n.driver == Driver::CopyOnRead && n.file == Some(cur) && !out.contains(&n.id) {
                    out.push(n.id);
                }
            }
            i += 1;
        }
        out
    }

    /// Whether `id` is `from` or below it (through filters' children and backing links).
    fn reachable(&self, from: NodeId, id: NodeId) -> bool {
        let mut stack = vec![from];
        let mut seen = Vec::new();
        while let Some(c) = stack.pop() {
            if c == id {
                return true;
            }
            if seen.contains(&c) {
                continue;
            }
            seen.push(c);
            if let Some(n) = self.get(c) {
                stack.extend([n.file, n.backing].into_iter().flatten());
            }
        }
        false
    }

    /// QEMU's `bdrv_replace_node` for node parents: every copy-on-read filter whose `file`
    /// child is `from`, and every node whose backing child is `from`, points at `to` instead
    /// — except `to` itself and the nodes below it, which would make a loop (an overlay's
    /// link to the image it was put over stays, as QEMU's `should_update_child` keeps it).
    /// Graph links and qcow2 backing pointers change here; filters' images are rebuilt over
    /// their new child by [`Graph::refresh_filters`]. Returns the parents moved.
    pub fn move_parents(&mut self, from: NodeId, to: NodeId) -> Vec<NodeId> {
        let to_block = self.effective_block(to);
        let candidates: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|n| {
                (n.driver == Driver::CopyOnRead && n.file == Some(from)) || n.backing == Some(from)
            })
            .map(|n| n.id)
            .collect();
        let mut moved = Vec::new();
        for p in candidates {
            if self.reachable(to, p) {
                continue;
            }
            let Some(n) = self.get_mut(p) else { continue };
            if n.driver == Driver::CopyOnRead && n.file == Some(from) {
                n.file = Some(to);
            } else {
                n.backing = Some(to);
                if let Some(b) = &n.block {
                    b.set_backing_node(to_block.clone());
                }
            }
            moved.push(p);
        }
        moved
    }

    /// Quiesce the copy-on-read filters among `ids`: their copies in flight land before the
    /// image below them changes (users are drained, so no new copy starts).
    pub async fn quiesce_filters(&self, ids: &[NodeId]) {
        for id in ids {
            let b = self.get(*id).and_then(|n| n.block.clone());
            if let Some(c) = b
                .as_ref()
                .and_then(|b| b.as_any().downcast_ref::<CopyOnRead>())
            {
                c.quiesce().await;
            }
        }
    }

    /// Rebuild every copy-on-read filter whose image no longer sits on its `file` child's
    /// current image (the child was re-pointed by [`Graph::move_parents`] or its image was
    /// reopened), with the same configuration and `bottom` (`remap` lists images replaced by
    /// a reopen: a `bottom` that was one of them becomes its replacement). Stacked filters
    /// are rebuilt bottom-up. The caller re-points the filters' users (drained) and drops the
    /// returned old images afterwards; they were quiesced by [`Graph::quiesce_filters`].
    pub fn refresh_filters(&mut self, remap: &[ImageSwap]) -> Vec<Arc<dyn BlockNode>> {
        let mut replaced = Vec::new();
        for _ in 0..=self.nodes.len() {
            let mut changed = false;
            let ids: Vec<NodeId> = self
                .nodes
                .iter()
                .filter(|n| n.driver == Driver::CopyOnRead)
                .map(|n| n.id)
                .collect();
            for id in ids {
                let Some(n) = self.get(id) else { continue };
                let Some(old) = n.block.clone() else { continue };
                let Some(cor) = old.as_any().downcast_ref::<CopyOnRead>() else {
                    continue;
                };
                let Some(file) = n.file.and_then(|f| self.effective_block(f)) else {
                    continue;
                };
                let bottom = cor.bottom().map(|b| {
                    remap
                        .iter()
                        .find(|(o, _)| same_node(o, b))
                        .map(|(_, r)| Arc::clone(r))
                        .unwrap_or_else(|| Arc::clone(b))
                });
                let bottom_moved = match (cor.bottom(), &bottom) {
                    (Some(a), Some(b)) => !same_node(a, b),
                    _ => false,
                };
                if same_node(cor.file(), &file) && !bottom_moved {
                    continue;
                }
                let file_ro = file.read_only();
                // The counters carry over: they describe the node, whatever image it is over.
                match cor.rebuild(file, bottom) {
                    Ok(new) => {
                        if let Some(n) = self.get_mut(id) {
                            n.block = Some(new);
                            n.read_only = file_ro;
                        }
                        replaced.push(old);
                        changed = true;
                    }
                    Err(e) => tracing::error!("rebuilding copy-on-read filter: {e}"),
                }
            }
            if !changed {
                break;
            }
        }
        replaced
    }

    /// Close `id` (and its orphaned children) if nothing references it any more: not
    /// monitor-owned, no users, no parents, no job.
    pub async fn remove_if_unreferenced(&mut self, id: NodeId) {
        let unreferenced = self
            .get(id)
            .is_some_and(|n| !n.monitor_owned && n.blocker.is_none())
            && !self.has_users(id)
            && self.has_parents(id).is_empty();
        if unreferenced {
            self.remove_tree(id).await;
        }
    }

    /// Point every user's backend at its node's current image (draining each one that
    /// changes: requests in flight on the old image finish first).
    pub async fn sync_users(&self) {
        for u in &self.users {
            let Some(b) = self.effective_block(u.node) else {
                continue;
            };
            if !same_node(&u.backend.current(), &b) {
                u.backend.replace_root(b).await;
            }
        }
    }

    /// QEMU's "unshared by ..." phrase naming a parent of `id` that does not share the
    /// `write` permission on it, if there is one.
    pub fn write_unshared_by(&self, id: NodeId) -> Option<String> {
        self.write_unshared_depth(id, 0)
    }

    fn write_unshared_depth(&self, id: NodeId, depth: usize) -> Option<String> {
        let n = self.get(id)?;
        if depth > self.nodes.len() {
            return None;
        }
        if let Some(job) = &n.intermediate_of {
            return Some(format!(
                "stream job '{job}' (uses node '{}' as 'intermediate node' child)",
                n.name
            ));
        }
        for p in &self.nodes {
            let role = if p.backing == Some(id) {
                "backing"
            } else if p.file == Some(id) {
                "file"
            } else {
                continue;
            };
            // A format's (or blkdebug's) storage never shares write; a filter (raw without
            // offset, copy-on-read) and a backing link share what the parent's parents share.
            let storage = role == "file"
                && matches!(p.driver, Driver::Qcow2 | Driver::Qed | Driver::Blkdebug);
            if storage || self.write_unshared_depth(p.id, depth + 1).is_some() {
                return Some(format!(
                    "node '{}' (uses node '{}' as '{role}' child)",
                    p.name, n.name
                ));
            }
        }
        None
    }

    /// QEMU's permission conflict for a user taking `write` on `id` (or, without
    /// `new_writer`, for the writable users already attached), if a parent does not share it.
    pub fn write_conflict(&self, id: NodeId, new_writer: bool) -> Option<String> {
        let n = self.get(id)?;
        let writer = new_writer || self.users.iter().any(|u| u.node == id && u.write);
        if !writer {
            return None;
        }
        let by = self.write_unshared_by(id)?;
        Some(format!(
            "Permission conflict on node '{}': permissions 'write' are both required by an unnamed block device (uses node '{}' as 'root' child) and unshared by {by}.",
            n.name, n.name
        ))
    }

    /// The first permission conflict in `id` and everything below it (backing and file
    /// children, top-down), after a change of `id`'s parents (QEMU refreshes the permissions
    /// of the subtree).
    pub fn subtree_conflict(&self, id: NodeId) -> Option<String> {
        let mut stack = vec![id];
        let mut seen = Vec::new();
        while let Some(c) = stack.pop() {
            if seen.contains(&c) {
                continue;
            }
            seen.push(c);
            if let Some(e) = self.write_conflict(c, false) {
                return Some(e);
            }
            if let Some(n) = self.get(c) {
                for child in [n.file, n.backing].into_iter().flatten().rev() {
                    stack.push(child);
                }
            }
        }
        None
    }

    fn auto_name(&mut self) -> String {
        self.auto_counter += 1;
        format!("#block{}", self.auto_counter * 100 + 15)
    }

    fn new_id(&mut self) -> NodeId {
        self.next_id += 1;
        self.next_id
    }

    fn name_taken(&self, staging: &Staging, name: &str) -> bool {
        self.find(name).is_some() || staging.nodes.iter().any(|n| n.name == name)
    }

    fn staged_or_graph<'a>(&'a self, staging: &'a Staging, name: &str) -> Option<&'a GraphNode> {
        staging
            .nodes
            .iter()
            .find(|n| n.name == name)
            .or_else(|| self.find(name))
    }

    fn lock_check(&self, staging: &Staging, path: &Path, write: bool) -> QmpResult<()> {
        let (mut w, mut r) = self.locks.get(path).copied().unwrap_or((0, 0));
        for n in &staging.nodes {
            if let Some((p, wr)) = &n.lock_path {
                if p == path {
                    if *wr {
                        w += 1
                    } else {
                        r += 1
                    }
                }
            }
        }
        if write && (w > 0 || r > 0) {
            return Err(QmpError::generic("Failed to get \"write\" lock"));
        }
        if !write && w > 0 {
            return Err(QmpError::generic("Failed to get shared \"write\" lock"));
        }
        Ok(())
    }

    /// `blockdev-add`: open the (already validated) options and add the nodes.
    pub async fn blockdev_add(&mut self, opts: &Map<String, Value>) -> QmpResult<()> {
        let name = opts.get("node-name").and_then(|v| v.as_str());
        if name.is_none() {
            return Err(QmpError::generic(
                "'node-name' must be specified for the root node",
            ));
        }
        let mut staging = Staging {
            nodes: Vec::new(),
            header_depth: 0,
            chain_top: String::new(),
        };
        let id = self.open_options(&mut staging, opts, false).await?;
        for n in staging.nodes.iter_mut() {
            if n.id == id {
                n.monitor_owned = true;
            }
        }
        let added: Vec<NodeId> = staging.nodes.iter().map(|n| n.id).collect();
        for n in staging.nodes {
            if let Some((p, w)) = &n.lock_path {
                let e = self.locks.entry(p.clone()).or_insert((0, 0));
                if *w {
                    e.0 += 1
                } else {
                    e.1 += 1
                }
            }
            self.nodes.push(n);
        }
        for id in added {
            let Some(n) = self.get(id) else { continue };
            if !n.driver.is_cow() {
                continue;
            }
            let shown = match n.backing.and_then(|b| self.get(b)) {
                Some(b) => Some(self.display_filename(b).await),
                None => match &n.block {
                    Some(b) => b.backing_link().await.map(|l| l.name),
                    None => None,
                },
            };
            if let Some(n) = self.get_mut(id) {
                n.backing_file_str = shown;
            }
        }
        Ok(())
    }

    fn open_options<'a>(
        &'a mut self,
        st: &'a mut Staging,
        opts: &'a Map<String, Value>,
        parent_ro: bool,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = QmpResult<NodeId>> + Send + 'a>> {
        Box::pin(async move {
            let driver = opts.get("driver").and_then(|v| v.as_str()).unwrap_or("");
            let explicit_ro = opts.get("read-only").and_then(|v| v.as_bool());
            let read_only = explicit_ro.unwrap_or(parent_ro);
            // QEMU opens a filter's `file` child before it assigns the filter's node name, so
            // errors of the child come before a duplicate or invalid name.
            let mut cor_child = None;
            if driver == "copy-on-read" {
                let file = opts.get("file").cloned().unwrap_or(Value::Null);
                cor_child = Some(self.open_ref(st, &file, read_only).await?);
            }
            let name = match opts.get("node-name").and_then(|v| v.as_str()) {
                Some(n) => {
                    if !node_name_valid(n) {
                        return Err(QmpError::generic(format!("Invalid node-name: '{n}'")));
                    }
                    if self.name_taken(st, n) {
                        return Err(QmpError::generic(format!(
                            "Duplicate nodes with node-name='{n}'"
                        )));
                    }
                    n.to_string()
                }
                None => self.auto_name(),
            };
            let id = self.new_id();
            let mut node = GraphNode {
                id,
                name,
                driver: Driver::File,
                read_only,
                explicit_ro: explicit_ro == Some(true),
                monitor_owned: false,
                filename: String::new(),
                proto: None,
                block: None,
                file: None,
                backing: None,
                blocker: None,
                intermediate_of: None,
                backing_from_header: false,
                backing_file_str: None,
                discard_unmap: opts.get("discard").and_then(|v| v.as_str()) == Some("unmap"),
                lock_path: None,
            };
            match driver {
                "file" => {
                    let filename = opts
                        .get("filename")
                        .and_then(|v| v.as_str())
                        .unwrap_or_default();
                    let path = Path::new(filename);
                    let f = FileProtocol::open(path, read_only).map_err(|e| match e {
                        diskstream_block::BlockError::Io { source, .. } => QmpError::generic(
                            format!("Could not open '{filename}': {}", strerror(&source)),
                        ),
                        other => block_err(other),
                    })?;
                    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
                    self.lock_check(st, &canon, !read_only)?;
                    node.filename = filename.to_string();
                    node.proto = Some(Arc::new(f));
                    node.lock_path = Some((canon, !read_only));
                }
                "blkdebug" => {
                    let image = opts.get("image").cloned().unwrap_or(Value::Null);
                    let child = self.open_ref(st, &image, read_only).await?;
                    let inner = self.protocol_of(st, child)?;
                    let mut rules = Vec::new();
                    for r in opts
                        .get("inject-error")
                        .and_then(|v| v.as_array())
                        .into_iter()
                        .flatten()
                    {
                        let iotypes: Vec<&str> = r
                            .get("iotype")
                            .and_then(|v| v.as_array())
                            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
                            .unwrap_or_else(|| vec!["read", "write"]);
                        rules.push(InjectRule {
                            event: r
                                .get("event")
                                .and_then(|v| v.as_str())
                                .unwrap_or_default()
                                .to_string(),
                            errno: r.get("errno").and_then(|v| v.as_i64()).unwrap_or(5) as i32,
                            once: r.get("once").and_then(|v| v.as_bool()).unwrap_or(false),
                            sector: r
                                .get("sector")
                                .and_then(|v| v.as_i64())
                                .filter(|s| *s >= 0)
                                .map(|s| s as u64),
                            reads: iotypes.contains(&"read"),
                            writes: iotypes.contains(&"write"),
                            armed: r
                                .get("immediately")
                                .and_then(|v| v.as_bool())
                                .unwrap_or(false),
                        });
                    }
                    node.driver = Driver::Blkdebug;
                    node.filename = inner.name().to_string();
                    node.proto = Some(Arc::new(BlkdebugProtocol::new(inner, rules)));
                    node.file = Some(child);
                }
                "nbd" => {
                    let (proto, filename) = open_nbd(opts, read_only).await?;
                    let raw = RawNode::open(Arc::clone(&proto)).await.map_err(block_err)?;
                    node.driver = Driver::Nbd;
                    node.filename = filename;
                    node.proto = Some(proto);
                    node.block = Some(Arc::new(raw));
                }
                "http" | "https" | "s3" => {
                    let (proto, filename) = open_http(driver, opts, read_only).await?;
                    node.driver = match driver {
                        "http" => Driver::Http,
                        "https" => Driver::Https,
                        _ => Driver::S3,
                    };
                    node.read_only = true;
                    node.filename = filename;
                    node.proto = Some(proto);
                }
                "raw" | "qcow2" | "qed" => {
                    let file = opts.get("file").cloned().unwrap_or(Value::Null);
                    let child = self.open_ref(st, &file, read_only).await?;
                    let proto = self.protocol_of(st, child)?;
                    if !read_only && proto.read_only() {
                        return Err(QmpError::generic("Block node is read-only"));
                    }
                    node.file = Some(child);
                    node.filename = proto.name().to_string();
                    if driver == "raw" {
                        node.driver = Driver::Raw;
                        let r = RawNode::open(proto).await.map_err(block_err)?;
                        node.block = Some(Arc::new(r));
                    } else {
                        let q: Arc<dyn BlockNode> = if driver == "qed" {
                            node.driver = Driver::Qed;
                            Arc::new(Qed::open(proto).await.map_err(block_err)?)
                        } else {
                            node.driver = Driver::Qcow2;
                            if opts.contains_key("data-file") {
                                return Err(QmpError::generic(
                                    "diskstream does not support qcow2 external data files",
                                ));
                            }
                            Arc::new(Qcow2::open(proto).await.map_err(block_err)?)
                        };
                        node.block = Some(Arc::clone(&q));
                        let from_header = !opts.contains_key("backing");
                        node.backing_from_header = from_header;
                        let filename = node.filename.clone();
                        // QEMU lists a node before the backing nodes it opens.
                        st.nodes.push(node);
                        let backing_id = match opts.get("backing") {
                            Some(Value::Null) => None,
                            Some(v @ (Value::String(_) | Value::Object(_))) => {
                                Some(self.open_ref(st, v, true).await?)
                            }
                            _ => self.open_header_backing(st, &q, &filename).await?,
                        };
                        if let Some(bid) = backing_id {
                            let bb = self
                                .staged_or_graph_id(st, bid)
                                .and_then(|n| n.block.clone())
                                .ok_or_else(|| {
                                    QmpError::generic("backing node is not a block image")
                                })?;
                            q.set_backing_node(Some(bb));
                        }
                        if let Some(n) = st.nodes.iter_mut().find(|n| n.id == id) {
                            n.backing = backing_id;
                        }
                        return Ok(id);
                    }
                }
                "copy-on-read" => {
                    let Some(child) = cor_child else {
                        return Err(QmpError::generic("copy-on-read: no file child"));
                    };
                    let bottom = opts.get("bottom").and_then(|v| v.as_str());
                    let config = cor_config(opts)?;
                    let filter = self.open_cor(st, child, bottom, config).await?;
                    node.driver = Driver::CopyOnRead;
                    node.filename = filter.filename().to_string();
                    node.block = Some(filter);
                    node.file = Some(child);
                }
                other => {
                    return Err(QmpError::generic(format!(
                        "Driver '{other}' is not supported by diskstream"
                    )))
                }
            }
            st.nodes.push(node);
            Ok(id)
        })
    }

    /// Build a `copy-on-read` filter over `child` with QEMU's checks in QEMU's order: the
    /// filter takes write permission on its child ("Block node is read-only"), then `bottom`
    /// must name an open non-filter node. QEMU 10 does not check that `bottom` is in the
    /// child's chain (QSD 10.0.2 hangs on such a `blockdev-add`); diskstream refuses it.
    async fn open_cor(
        &self,
        st: &Staging,
        child: NodeId,
        bottom: Option<&str>,
        config: CorConfig,
    ) -> QmpResult<Arc<dyn BlockNode>> {
        let c = self
            .staged_or_graph_id(st, child)
            .ok_or_else(|| QmpError::generic("copy-on-read: child vanished"))?;
        if c.read_only {
            return Err(QmpError::generic("Block node is read-only"));
        }
        let file: Arc<dyn BlockNode> = match (&c.block, &c.proto) {
            (Some(b), _) => Arc::clone(b),
            // A filter straight over a protocol node: its bytes are the image (raw).
            (None, Some(p)) => Arc::new(RawNode::open(Arc::clone(p)).await.map_err(block_err)?),
            (None, None) => return Err(QmpError::generic("copy-on-read: child has no image")),
        };
        let bottom_block = match bottom {
            None => None,
            Some(name) => {
                let b = self
                    .staged_or_graph(st, name)
                    .ok_or_else(|| QmpError::generic(format!("Bottom node '{name}' not found")))?;
                if b.driver == Driver::CopyOnRead {
                    return Err(QmpError::generic(format!(
                        "Bottom node '{name}' is a filter"
                    )));
                }
                let in_chain = {
                    let mut cur = Some(child);
                    let mut found = false;
                    for _ in 0..=self.nodes.len() + st.nodes.len() {
                        let Some(id) = cur else { break };
                        if id == b.id {
                            found = true;
                            break;
                        }
                        cur = self.staged_or_graph_id(st, id).and_then(|n| n.chain_next());
                    }
                    found
                };
                let own = (b.id == child).then(|| Arc::clone(&file));
                let bb = own.or_else(|| b.block.clone().filter(|_| in_chain)).ok_or_else(|| {
                    QmpError::generic(format!(
                        "Bottom node '{name}' is not in the backing chain of the copy-on-read filter's file '{}'",
                        c.name
                    ))
                })?;
                Some(bb)
            }
        };
        let filter = CopyOnRead::new(file, bottom_block, config).map_err(block_err)?;
        tracing::info!(
            file = %c.name,
            bottom = bottom.unwrap_or(""),
            "copy-on-read filter opened (fetch unit {} bytes, read-ahead {} units)",
            filter.unit(),
            filter.config().readahead
        );
        Ok(filter)
    }

    fn staged_or_graph_id<'a>(&'a self, st: &'a Staging, id: NodeId) -> Option<&'a GraphNode> {
        st.nodes
            .iter()
            .find(|n| n.id == id)
            .or_else(|| self.get(id))
    }

    fn protocol_of(&self, st: &Staging, id: NodeId) -> QmpResult<Arc<dyn Protocol>> {
        self.staged_or_graph_id(st, id)
            .and_then(|n| n.proto.clone())
            .ok_or_else(|| {
                QmpError::generic(
                    "diskstream: the 'file' child of a format node must be a protocol node (file, blkdebug)",
                )
            })
    }

    async fn open_ref(
        &mut self,
        st: &mut Staging,
        r: &Value,
        parent_ro: bool,
    ) -> QmpResult<NodeId> {
        match r {
            Value::String(name) => self.staged_or_graph(st, name).map(|n| n.id).ok_or_else(|| {
                QmpError::generic(format!(
                    "Cannot find device='{name}' nor node-name='{name}'"
                ))
            }),
            Value::Object(o) => self.open_options(st, o, parent_ro).await,
            _ => Err(QmpError::generic("Invalid BlockdevRef")),
        }
    }

    /// Open the backing chain recorded in a qcow2 or QED header as implicit read-only nodes.
    async fn open_header_backing(
        &mut self,
        st: &mut Staging,
        q: &Arc<dyn BlockNode>,
        overlay_filename: &str,
    ) -> QmpResult<Option<NodeId>> {
        let Some(link) = q.backing_link().await else {
            return Ok(None);
        };
        let name = link.name;
        let remote_file = if name.contains("://") {
            match remote_object_options(&name).or_else(|| nbd_url_options(&name)) {
                Some(f) => Some(f),
                None => {
                    return Err(QmpError::generic(format!(
                        "Could not open backing file: '{name}' uses a protocol diskstream does not support"
                    )))
                }
            }
        } else if name.starts_with("json:") {
            return Err(QmpError::generic(format!(
                "Could not open backing file: '{name}' uses a protocol diskstream does not support"
            )));
        } else {
            None
        };
        let resolved = resolve_backing(Path::new(overlay_filename), &name);
        let fmt = match link.format {
            BackingFormatHint::Named(f) => f,
            BackingFormatHint::Unrecorded => {
                return Err(QmpError::generic(format!(
                    "Could not open backing file: '{overlay_filename}' does not record the format of its backing file '{name}' and diskstream never probes; pass 'backing' explicitly"
                )))
            }
            // A QED image only records whether its backing file is raw: an image format is
            // recognised by its magic (as QEMU probes it), a raw file is never guessed.
            BackingFormatHint::NotRaw => {
                diskstream_block::image::check_backing_allowed(&name, &resolved)
                    .map_err(|e| QmpError::generic(format!("Could not open backing file: {e}")))?;
                let target = if remote_file.is_some() {
                    PathBuf::from(&name)
                } else {
                    resolved.clone()
                };
                match probe_image_format(&target).await {
                    Ok(Some(f)) => f.to_string(),
                    Ok(None) => {
                        return Err(QmpError::generic(format!(
                            "Could not open backing file: '{name}' is neither qcow2 nor QED and '{overlay_filename}' does not record its format; diskstream never guesses raw, pass 'backing' explicitly"
                        )))
                    }
                    Err(e) => {
                        return Err(QmpError::generic(format!(
                            "Could not open backing file: {}",
                            block_err(e).desc
                        )))
                    }
                }
            }
        };
        if fmt != "qcow2" && fmt != "raw" && fmt != "qed" {
            return Err(QmpError::generic(format!(
                "Could not open backing file: unsupported backing format '{fmt}'"
            )));
        }
        diskstream_block::image::check_backing_allowed(&name, &resolved)
            .map_err(|e| QmpError::generic(format!("Could not open backing file: {e}")))?;
        let file = match remote_file {
            Some(f) => f,
            None => {
                let path = resolved;
                json!({"driver": "file", "filename": path.display().to_string()})
            }
        };
        let opts = json!({
            "driver": fmt,
            "read-only": true,
            "file": file,
        });
        let Value::Object(o) = opts else {
            return Ok(None);
        };
        // The user-named node is layer 1; this backing file is layer header_depth + 2. The
        // limit is the process-wide one (`diskstream --max-chain-depth`), which also ends
        // a chain that loops back on itself.
        let max = diskstream_block::image::max_depth();
        if st.header_depth == 0 {
            st.chain_top = overlay_filename.to_string();
        }
        if st.header_depth + 2 > max {
            return Err(QmpError::generic(format!(
                "{}: {DEEPER} {max} images (at '{}')",
                st.chain_top,
                resolve_backing(Path::new(overlay_filename), &name).display()
            )));
        }
        st.header_depth += 1;
        let opened = self.open_options(st, &o, true).await;
        st.header_depth -= 1;
        let id = opened.map_err(|e| {
            if e.desc.contains(DEEPER) {
                // Said once, naming the top image, not once per layer.
                e
            } else {
                QmpError::generic(format!("Could not open backing file: {}", e.desc))
            }
        })?;
        Ok(Some(id))
    }

    /// Whether `id` is referenced by another node (as file, backing or filter child).
    fn has_parents(&self, id: NodeId) -> Vec<&GraphNode> {
        self.nodes
            .iter()
            .filter(|n| n.file == Some(id) || n.backing == Some(id))
            .collect()
    }

    /// `blockdev-del`.
    pub async fn blockdev_del(&mut self, name: &str) -> QmpResult<()> {
        let Some(node) = self.find(name) else {
            return Err(QmpError::generic(format!(
                "Failed to find node with node-name='{name}'"
            )));
        };
        let id = node.id;
        // A user-added copy-on-read filter can be deleted; a job's filter cannot.
        if (node.driver.is_filter() && !node.monitor_owned) || self.has_users(id) {
            // A job filter carries the job's block backend, an export its own (QEMU's
            // bdrv_has_blk check).
            return Err(QmpError::generic(format!("Node {name} is in use")));
        }
        if let Some(job) = node.blocker {
            return Err(QmpError::generic(format!(
                "Node '{name}' is busy: block device is in use by block job: {job}"
            )));
        }
        // QEMU names the parent attached last (its parent list grows at the head). Nodes
        // attach in creation order, and the re-links of stream, commit and snapshots attach
        // the newer node, so the newest parent is the one QEMU names.
        if let Some(p) = self.nodes.iter().rev().find(|n| n.backing == Some(id)) {
            return Err(QmpError::generic(format!(
                "Node '{name}' is busy: node is used as backing hd of '{}'",
                p.name
            )));
        }
        if !node.monitor_owned {
            return Err(QmpError::generic(format!(
                "Node {name} is not owned by the monitor"
            )));
        }
        if !self.has_parents(id).is_empty() {
            return Err(QmpError::generic(format!("Block device {name} is in use")));
        }
        self.remove_tree(id).await;
        Ok(())
    }

    /// Remove `id` and every child that is left without parents and is not monitor-owned.
    pub async fn remove_tree(&mut self, id: NodeId) {
        let Some(pos) = self.nodes.iter().position(|n| n.id == id) else {
            return;
        };
        let node = self.nodes.remove(pos);
        if let Some(b) = &node.block {
            if let Err(e) = b.close().await {
                tracing::warn!(node = %node.name, "closing: {e}");
            }
        }
        if let Some((p, w)) = &node.lock_path {
            if let Some(e) = self.locks.get_mut(p) {
                if *w {
                    e.0 = e.0.saturating_sub(1)
                } else {
                    e.1 = e.1.saturating_sub(1)
                }
            }
        }
        for child in [node.file, node.backing].into_iter().flatten() {
            let orphan = self
                .get(child)
                .is_some_and(|c| !c.monitor_owned && c.blocker.is_none())
                && self.has_parents(child).is_empty()
                && !self.has_users(child);
            if orphan {
                Box::pin(self.remove_tree(child)).await;
            }
        }
    }

    /// Insert a job filter above `target`: its backing parents and its users now point at
    /// the filter (QEMU's `bdrv_insert_node`). The filter has no image of its own: users see
    /// `target`'s.
    pub async fn insert_filter(&mut self, name: Option<&str>, target: NodeId) -> QmpResult<NodeId> {
        self.insert_filter_with(name, target, None).await
    }

    /// [`Graph::insert_filter`] with the filter's own image, e.g. a real copy-on-read filter
    /// over `target` (what users read through while the job runs).
    pub async fn insert_filter_with(
        &mut self,
        name: Option<&str>,
        target: NodeId,
        block: Option<Arc<dyn BlockNode>>,
    ) -> QmpResult<NodeId> {
        let name = match name {
            Some(n) => {
                if !node_name_valid(n) {
                    return Err(QmpError::generic(format!("Invalid node-name: '{n}'")));
                }
                if self.find(n).is_some() {
                    return Err(QmpError::generic(format!(
                        "Duplicate nodes with node-name='{n}'"
                    )));
                }
                n.to_string()
            }
            None => self.auto_name(),
        };
        let implicit = name.starts_with('#');
        let t = self
            .get(target)
            .ok_or_else(|| QmpError::generic("filter target vanished"))?;
        // QEMU names a filter created with options of its own (an explicit node name) by a
        // json: pseudo-filename, an implicit one by its child's file name.
        let filename = t.filename.clone();
        let _ = implicit;
        let read_only = t.read_only;
        let id = self.new_id();
        // Copy-on-read filters over `target` (an export's hidden one, a user's) are parents
        // too: they now read through the new filter, as QEMU's bdrv_replace_node moves them.
        let cors = self.cor_filters_over(target);
        for n in self.nodes.iter_mut() {
            if n.backing == Some(target) {
                n.backing = Some(id);
            }
            if cors.contains(&n.id) {
                n.file = Some(id);
            }
        }
        for u in self.users.iter_mut() {
            if u.node == target {
                u.node = id;
            }
        }
        self.nodes.push(GraphNode::filter(
            id, name, read_only, filename, block, target,
        ));
        self.rebuild_moved_filters(&cors).await;
        Ok(id)
    }

    /// The copy-on-read filter nodes whose `file` child is `id`.
    fn cor_filters_over(&self, id: NodeId) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|n| n.driver == Driver::CopyOnRead && n.file == Some(id))
            .map(|n| n.id)
            .collect()
    }

    /// After `moved` filters got a new `file` child: let their copies in flight land, rebuild
    /// them over their child's current image, and re-point every user (drained).
    async fn rebuild_moved_filters(&mut self, moved: &[NodeId]) {
        if moved.is_empty() {
            self.sync_users().await;
            return;
        }
        self.quiesce_filters(&self.filters_above_all(moved)).await;
        let stale = self.refresh_filters(&[]);
        self.sync_users().await;
        drop(stale);
    }

    /// `ids` and every copy-on-read filter stacked above any of them.
    fn filters_above_all(&self, ids: &[NodeId]) -> Vec<NodeId> {
        let mut out: Vec<NodeId> = Vec::new();
        for id in ids {
            for f in self.filters_above(*id) {
                if !out.contains(&f) {
                    out.push(f);
                }
            }
        }
        out
    }

    /// A hidden copy-on-read filter over `target` for one export (`copy-on-read=on` on
    /// `block-export-add` / `--export`, a diskstream extension): an implicit `#blockN` node
    /// whose only user is that export; other parents and users of `target` are left as they
    /// are. It goes away with the export (an unreferenced implicit node). `None`, with a
    /// warning, when copy-on-read cannot work on `target` (read-only, raw, no image): the
    /// export then reads `target` directly.
    pub fn add_export_cor_filter(&mut self, target: NodeId) -> QmpResult<Option<NodeId>> {
        let Some(file) = self.effective_block(target) else {
            return Ok(None);
        };
        let t = self
            .get(target)
            .ok_or_else(|| QmpError::generic("export node vanished"))?;
        if let Some(why) = CopyOnRead::off_reason_for(file.as_ref()) {
            tracing::warn!(node = %t.name, "copy-on-read=on ignored for this export: {why}");
            return Ok(None);
        }
        let (filename, read_only) = (t.filename.clone(), t.read_only);
        let filter = CopyOnRead::new(file, None, CorConfig::default()).map_err(block_err)?;
        let id = self.new_id();
        let name = self.auto_name();
        tracing::info!(
            node = %name,
            file = %filename,
            "export copy-on-read filter opened (fetch unit {} bytes, read-ahead {} units)",
            filter.unit(),
            filter.config().readahead
        );
        self.nodes.push(GraphNode::filter(
            id,
            name,
            read_only,
            filename,
            Some(filter),
            target,
        ));
        Ok(Some(id))
    }

    /// Remove a job filter, pointing its parents and users back at its child.
    pub async fn remove_filter(&mut self, id: NodeId) {
        let Some(target) = self.get(id).and_then(|n| n.file) else {
            return;
        };
        let cors = self.cor_filters_over(id);
        for n in self.nodes.iter_mut() {
            if n.backing == Some(id) {
                n.backing = Some(target);
            }
            if cors.contains(&n.id) {
                n.file = Some(target);
            }
        }
        for u in self.users.iter_mut() {
            if u.node == id {
                u.node = target;
            }
        }
        let removed = self
            .nodes
            .iter()
            .position(|n| n.id == id)
            .map(|p| self.nodes.remove(p));
        self.rebuild_moved_filters(&cors).await;
        // Users read through the child again; let the filter's copies in flight land.
        if let Some(b) = removed.and_then(|n| n.block) {
            if let Err(e) = b.close().await {
                tracing::warn!("closing a job filter: {e}");
            }
        }
    }

    /// Replace the image of a node (reopen read-write / read-only for a job), keeping every
    /// parent's block-layer backing pointer and every user's backend in step. The old image
    /// must still be open: users' requests in flight on it finish before their backends move.
    pub async fn replace_image(
        &mut self,
        id: NodeId,
        proto: Arc<dyn Protocol>,
        block: Arc<dyn BlockNode>,
        read_only: bool,
    ) {
        let old = self.get(id).and_then(|n| n.block.clone());
        let file = self.get(id).and_then(|n| n.file);
        if let Some(n) = self.get_mut(id) {
            n.block = Some(Arc::clone(&block));
            n.read_only = read_only;
        }
        if let Some(fid) = file {
            let lock = self.get(fid).and_then(|f| f.lock_path.clone());
            if let Some(f) = self.get_mut(fid) {
                f.proto = Some(proto);
                f.read_only = read_only;
                if let Some((p, _)) = &lock {
                    f.lock_path = Some((p.clone(), !read_only));
                }
            }
            if let Some((p, was_w)) = lock {
                if let Some(e) = self.locks.get_mut(&p) {
                    if was_w {
                        e.0 = e.0.saturating_sub(1)
                    } else {
                        e.1 = e.1.saturating_sub(1)
                    }
                    if read_only {
                        e.1 += 1
                    } else {
                        e.0 += 1
                    }
                }
            }
        }
        if let Some(old) = old {
            for n in &self.nodes {
                if let Some(b) = &n.block {
                    let points_at_old = b.backing().is_some_and(|x| same_node(&x, &old));
                    if points_at_old && n.driver.is_cow() {
                        b.set_backing_node(Some(Arc::clone(&block)));
                    }
                }
            }
        }
        self.sync_users().await;
    }

    /// Flush and close every image (shutdown).
    pub async fn close_all(&mut self) {
        for n in self.nodes.iter().rev() {
            if let Some(b) = &n.block {
                if let Err(e) = b.close().await {
                    tracing::warn!(node = %n.name, "closing: {e}");
                }
            }
        }
    }

    /// `query-named-block-nodes`.
    pub async fn query_named_block_nodes(&self, flat: bool) -> Value {
        let mut out = Vec::new();
        for n in self.nodes.iter().rev() {
            out.push(self.device_info(n, flat).await);
        }
        Value::Array(out)
    }

    fn actual_size(&self, n: &GraphNode) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        let path = self.protocol_path(n)?;
        std::fs::metadata(path).ok().map(|m| m.blocks() * 512)
    }

    fn protocol_path(&self, n: &GraphNode) -> Option<String> {
        let mut cur = n;
        loop {
            if cur.driver == Driver::File {
                return Some(cur.filename.clone());
            }
            cur = self.get(cur.file?)?;
        }
    }

    /// Whether a qcow2 or QED node's backing differs from what its header names (QEMU then
    /// shows a `json:` pseudo-filename holding the options).
    async fn backing_overridden(&self, n: &GraphNode) -> bool {
        if !n.driver.is_cow() || n.backing_from_header {
            return false;
        }
        let Some(q) = &n.block else {
            return false;
        };
        let recorded = q.backing_link().await.map(|l| l.name);
        match (n.backing.and_then(|b| self.get(b)), recorded) {
            (None, rec) => rec.is_some(),
            (Some(b), Some(rec)) => Box::pin(self.display_filename(b)).await != rec,
            (Some(_), None) => true,
        }
    }

    /// The options that describe a node, as QEMU's `json:` pseudo-filenames show them.
    fn full_options<'a>(
        &'a self,
        n: &'a GraphNode,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Value> + Send + 'a>> {
        Box::pin(async move {
            let child = |id: Option<NodeId>| id.and_then(|c| self.get(c));
            match n.driver {
                Driver::File => json!({"driver": "file", "filename": n.filename}),
                Driver::Nbd => json!({"driver": "nbd", "filename": n.filename}),
                Driver::Http | Driver::Https | Driver::S3 => {
                    json!({"driver": n.driver.as_str(), "url": n.filename})
                }
                Driver::Blkdebug | Driver::Raw | Driver::CopyOnRead | Driver::MirrorTop => {
                    let key = if n.driver == Driver::Blkdebug {
                        "image"
                    } else {
                        "file"
                    };
                    let mut m = Map::new();
                    m.insert("driver".into(), json!(n.driver.as_str()));
                    if let Some(c) = child(n.file) {
                        m.insert(key.into(), self.full_options(c).await);
                    }
                    Value::Object(m)
                }
                Driver::Qcow2 | Driver::Qed => {
                    let mut m = Map::new();
                    m.insert("driver".into(), json!(n.driver.as_str()));
                    if let Some(c) = child(n.file) {
                        m.insert("file".into(), self.full_options(c).await);
                    }
                    if self.backing_overridden(n).await {
                        let b = match child(n.backing) {
                            Some(b) => self.full_options(b).await,
                            None => Value::Null,
                        };
                        m.insert("backing".into(), b);
                    }
                    Value::Object(m)
                }
            }
        })
    }

    /// The file name QEMU shows for a node (`json:{...}` when its options say more than a
    /// file name: an overridden backing, an explicitly named copy-on-read filter).
    pub fn display_filename<'a>(
        &'a self,
        n: &'a GraphNode,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send + 'a>> {
        Box::pin(async move {
            let json_name = match n.driver {
                Driver::File => false,
                Driver::CopyOnRead => !n.name.starts_with('#'),
                // QEMU's mirror_top and commit_top refresh their file name from the filtered
                // node and carry no options of their own: a named job filter shows the
                // source's file name too.
                Driver::MirrorTop => false,
                Driver::Qcow2 | Driver::Qed => self.backing_overridden(n).await,
                Driver::Raw | Driver::Blkdebug | Driver::Nbd => false,
                Driver::Http | Driver::Https | Driver::S3 => false,
            };
            if json_name {
                return format!(
                    "json:{}",
                    crate::json::to_qemu_json(&self.full_options(n).await)
                );
            }
            match n.file.and_then(|c| self.get(c)) {
                Some(c) if n.driver != Driver::File => self.display_filename(c).await,
                _ => n.filename.clone(),
            }
        })
    }

    async fn image_info(&self, n: &GraphNode, flat: bool) -> Value {
        let mut img = Map::new();
        img.insert("filename".into(), json!(self.display_filename(n).await));
        img.insert("format".into(), json!(n.driver.as_str()));
        // QEMU shows the flag only when bdrv_get_info works: not for the nbd client or the
        // curl drivers, nor for raw over them (raw asks its file).
        let no_info = |d: Driver| d == Driver::Nbd || d.is_remote_object();
        let over_nbd = no_info(n.driver)
            || (n.driver == Driver::Raw
                && n.file
                    .and_then(|c| self.get(c))
                    .is_some_and(|c| no_info(c.driver)));
        if !over_nbd {
            img.insert("dirty-flag".into(), json!(false));
        }
        if let Some(a) = self.actual_size(n) {
            img.insert("actual-size".into(), json!(a));
        }
        match n.driver {
            Driver::File
            | Driver::Blkdebug
            | Driver::Nbd
            | Driver::Http
            | Driver::Https
            | Driver::S3 => {
                let len = match &n.proto {
                    Some(p) => p.len().await.unwrap_or(0),
                    None => 0,
                };
                img.insert("virtual-size".into(), json!(len));
                if n.driver == Driver::File {
                    img.insert(
                        "format-specific".into(),
                        json!({"type": "file", "data": {}}),
                    );
                }
            }
            Driver::Raw => {
                let size = n.block.as_ref().map(|b| b.size()).unwrap_or(0);
                img.insert("virtual-size".into(), json!(size));
            }
            Driver::CopyOnRead | Driver::MirrorTop => {
                if let Some(t) = n.file.and_then(|f| self.get(f)) {
                    if let Some(b) = &t.block {
                        img.insert("virtual-size".into(), json!(b.size()));
                        if let Some(cs) = b.cluster_size() {
                            img.insert("cluster-size".into(), json!(cs));
                        }
                    }
                    if let Some(a) = self.actual_size(t) {
                        img.insert("actual-size".into(), json!(a));
                    }
                    // The nested view shows the filtered image as the filter's backing image.
                    if !flat && n.block.is_some() {
                        let c = self.skip_filters(t);
                        let ci = Box::pin(self.image_info(c, flat)).await;
                        img.insert("backing-image".into(), ci);
                    }
                }
            }
            Driver::Qed => {
                if let Some(q) = n
                    .block
                    .as_ref()
                    .and_then(|b| b.as_any().downcast_ref::<Qed>())
                {
                    let h = q.header().await;
                    img.insert("virtual-size".into(), json!(h.image_size));
                    img.insert("cluster-size".into(), json!(h.cluster_size));
                    // QED records of its backing format only whether it is raw.
                    insert_backing_names(&mut img, n, h.backing_file.clone(), q.backing_format());
                }
                if !flat {
                    if let Some(b) = n.backing.and_then(|id| self.get(id)) {
                        let b = self.skip_filters(b);
                        let bi = Box::pin(self.image_info(b, flat)).await;
                        img.insert("backing-image".into(), bi);
                    }
                }
            }
            Driver::Qcow2 => {
                if let Some(q) = n
                    .block
                    .as_ref()
                    .and_then(|b| b.as_any().downcast_ref::<Qcow2>())
                {
                    let h = q.header().await;
                    img.insert("virtual-size".into(), json!(h.size));
                    img.insert("cluster-size".into(), json!(h.cluster_size()));
                    let mut data = Map::new();
                    if h.version >= 3 {
                        data.insert("compat".into(), json!("1.1"));
                        data.insert(
                            "compression-type".into(),
                            json!(if h.compression_type == 1 {
                                "zstd"
                            } else {
                                "zlib"
                            }),
                        );
                        data.insert(
                            "lazy-refcounts".into(),
                            json!(h.compatible_features & 1 != 0),
                        );
                        data.insert("refcount-bits".into(), json!(h.refcount_bits()));
                        data.insert("corrupt".into(), json!(h.incompatible_features & 2 != 0));
                        data.insert("extended-l2".into(), json!(h.extended_l2()));
                    } else {
                        data.insert("compat".into(), json!("0.10"));
                        data.insert("compression-type".into(), json!("zlib"));
                        data.insert("refcount-bits".into(), json!(h.refcount_bits()));
                    }
                    img.insert(
                        "format-specific".into(),
                        json!({"type": "qcow2", "data": data}),
                    );
                    // ImageInfo shows the header's backing name (BlockDeviceInfo the node's).
                    insert_backing_names(&mut img, n, h.backing_file.clone(), h.backing_format);
                }
                if !flat {
                    if let Some(b) = n.backing.and_then(|id| self.get(id)) {
                        let b = self.skip_filters(b);
                        let bi = Box::pin(self.image_info(b, flat)).await;
                        img.insert("backing-image".into(), bi);
                    }
                }
            }
        }
        Value::Object(img)
    }

    fn skip_filters<'a>(&'a self, mut n: &'a GraphNode) -> &'a GraphNode {
        while n.driver.is_filter() {
            match n.file.and_then(|f| self.get(f)) {
                Some(c) => n = c,
                None => break,
            }
        }
        n
    }

    fn backing_depth(&self, n: &GraphNode) -> u64 {
        // A filter counts its filtered child as one level (QEMU walks filter-or-COW children;
        // mirror_top and commit_top hold the source as their backing child).
        if n.driver.is_filter() {
            return match n.file.and_then(|f| self.get(f)) {
                Some(c) if n.block.is_some() => 1 + self.backing_depth(self.skip_filters(c)),
                _ => 0,
            };
        }
        let mut d = 0;
        let mut cur = n.backing.and_then(|b| self.get(b));
        while let Some(c) = cur {
            let c = self.skip_filters(c);
            d += 1;
            cur = c.backing.and_then(|b| self.get(b));
        }
        d
    }

    async fn device_info(&self, n: &GraphNode, flat: bool) -> Value {
        let mut m = Map::new();
        m.insert("file".into(), json!(self.display_filename(n).await));
        m.insert("node-name".into(), json!(n.name));
        m.insert("ro".into(), json!(n.read_only));
        m.insert("drv".into(), json!(n.driver.as_str()));
        if let Some(b) = n.backing.and_then(|b| self.get(b)) {
            m.insert("backing_file".into(), json!(self.display_filename(b).await));
        }
        m.insert(
            "backing_file_depth".into(),
            json!(if flat { 0 } else { self.backing_depth(n) }),
        );
        m.insert("active".into(), json!(true));
        m.insert("encrypted".into(), json!(false));
        m.insert("detect_zeroes".into(), json!("off"));
        for k in ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"] {
            m.insert(k.into(), json!(0));
        }
        m.insert("image".into(), self.image_info(n, flat).await);
        m.insert(
            "cache".into(),
            json!({"writeback": true, "direct": false, "no-flush": false}),
        );
        m.insert("write_threshold".into(), json!(0));
        // diskstream's addition (QSD's members above are unchanged): what the filter did.
        if let Some(st) = Self::cor_filter(n).map(|c| c.stats()) {
            m.insert("x-cor-stats".into(), json!(st));
        }
        Value::Object(m)
    }

    fn cor_filter(n: &GraphNode) -> Option<&CopyOnRead> {
        n.block.as_ref()?.as_any().downcast_ref::<CopyOnRead>()
    }

    /// `x-query-cor-stats`: every copy-on-read filter node (user-added or a stream job's) with
    /// its counters, oldest first.
    pub fn query_cor_stats(&self) -> Value {
        let mut out = Vec::new();
        for n in &self.nodes {
            let Some(c) = Self::cor_filter(n) else {
                continue;
            };
            let mut m = Map::new();
            m.insert("node-name".into(), json!(n.name));
            let child = n.file.and_then(|f| self.get(f)).map(|f| f.name.clone());
            m.insert("file".into(), json!(child));
            if let Some(b) = c.bottom().and_then(|b| self.find_block(b)) {
                if let Some(b) = self.get(b) {
                    m.insert("bottom".into(), json!(b.name));
                }
            }
            if let Value::Object(st) = json!(c.stats()) {
                m.extend(st);
            }
            out.push(Value::Object(m));
        }
        Value::Array(out)
    }
}

/// A `copy-on-read` node's fetch settings: `x-granularity` (fetch unit, bytes) and
/// `x-readahead` (units read ahead on sequential access), diskstream's defaults otherwise.
/// Invalid values get the block layer's message (which says what is accepted).
fn cor_config(opts: &Map<String, Value>) -> QmpResult<CorConfig> {
    let mut c = CorConfig::default();
    if let Some(v) = opts.get("x-granularity") {
        c.granularity = v.as_u64().ok_or_else(|| {
            QmpError::generic("Parameter 'x-granularity' expects a power of two in bytes")
        })?;
    }
    if let Some(v) = opts.get("x-readahead").and_then(|v| v.as_u64()) {
        c.readahead = u32::try_from(v).unwrap_or(u32::MAX);
    }
    c.validate().map_err(block_err)?;
    Ok(c)
}

/// The `file` child for a backing file that names a remote object: `http://`, `https://`
/// (QEMU's curl drivers, as QEMU opens such names) or `s3://` (diskstream's `s3` node).
fn remote_object_options(url: &str) -> Option<Value> {
    let scheme = diskstream_block::image::url_scheme(url)?.to_ascii_lowercase();
    diskstream_http::SCHEMES
        .contains(&scheme.as_str())
        .then(|| json!({"driver": scheme, "url": url}))
}

/// The `nbd` blockdev options of a backing file name that is an NBD URL, as QEMU's nbd driver
/// parses it: `nbd://HOST[:PORT][/EXPORT]` (port 10809 by default) or
/// `nbd+unix:///[EXPORT]?socket=PATH`. `None` for anything else.
fn nbd_url_options(url: &str) -> Option<Value> {
    use diskstream_nbd::client::url::{Address, NbdUrl};
    let u = NbdUrl::parse(url).ok()?;
    let mut o = match u.address {
        Address::Unix(path) => {
            json!({"driver": "nbd", "server": {"type": "unix", "path": path.display().to_string()}})
        }
        Address::Tcp { host, port } => json!({"driver": "nbd", "server":
            {"type": "inet", "host": host, "port": port.to_string()}}),
    };
    if !u.export.is_empty() {
        o["export"] = json!(u.export);
    }
    Some(o)
}

/// Open the image of a format node of `driver` (raw, qcow2, QED) again over `proto` (a
/// reopen read-only or read-write), keeping `backing` as its backing node.
pub async fn reopen_format(
    driver: Driver,
    proto: Arc<dyn Protocol>,
    backing: Option<Arc<dyn BlockNode>>,
) -> diskstream_block::Result<Arc<dyn BlockNode>> {
    let b: Arc<dyn BlockNode> = match driver {
        Driver::Raw => return Ok(Arc::new(RawNode::open(proto).await?)),
        Driver::Qed => Arc::new(Qed::open(proto).await?),
        _ => Arc::new(Qcow2::open(proto).await?),
    };
    b.set_backing_node(backing);
    Ok(b)
}

/// Create an image of `format` (`qcow2` or `qed`) at `path` with qemu-img's defaults: the
/// overlay or target that `blockdev-snapshot-sync` and `drive-mirror` create.
pub async fn create_cow_image(
    format: &str,
    path: &Path,
    size: u64,
    backing_file: Option<String>,
    backing_fmt: Option<String>,
) -> diskstream_block::Result<()> {
    if format == "qed" {
        use diskstream_block::format::qed::create::{create, CreateOptions};
        let opts = CreateOptions {
            size,
            backing_file,
            backing_fmt,
            ..CreateOptions::default()
        };
        create(path, &opts).await
    } else {
        use diskstream_block::format::qcow2::create::{create, CreateOptions};
        let opts = CreateOptions {
            size,
            backing_file,
            backing_fmt,
            ..CreateOptions::default()
        };
        create(path, &opts).await
    }
}

/// ImageInfo's backing names: the name the header records, its resolved form and the
/// recorded format.
fn insert_backing_names(
    img: &mut Map<String, Value>,
    n: &GraphNode,
    bf: Option<String>,
    bfmt: Option<String>,
) {
    if let Some(bf) = &bf {
        img.insert("backing-filename".into(), json!(bf));
        let full = if bf.contains(':') || bf.starts_with('/') {
            bf.clone()
        } else {
            resolve_backing(Path::new(&n.filename), bf)
                .display()
                .to_string()
        };
        img.insert("full-backing-filename".into(), json!(full));
        if let Some(f) = &bfmt {
            img.insert("backing-filename-format".into(), json!(f));
        }
    }
}

/// The image format (qcow2 or QED) recognised by the magic of the file or URL `target`;
/// `None` for anything else (never guessed as raw).
async fn probe_image_format(target: &Path) -> diskstream_block::Result<Option<&'static str>> {
    let f = diskstream_block::image::open_protocol(target, true).await?;
    let len = f.len().await?;
    let head = f.read_vec(0, len.min(512) as usize).await?;
    Ok(match diskstream_block::image::format_of_head(&head) {
        diskstream_block::format::Format::Qcow2 => Some("qcow2"),
        diskstream_block::format::Format::Qed => Some("qed"),
        diskstream_block::format::Format::Raw => None,
    })
}

#[cfg(test)]
mod nbd_url_tests {
    use super::{nbd_url_options, remote_object_options};
    use serde_json::json;

    #[test]
    fn nbd_urls_become_nbd_nodes() {
        assert_eq!(
            nbd_url_options("nbd://10.0.0.1:10810/disk0"),
            Some(
                json!({"driver": "nbd", "server": {"type": "inet", "host": "10.0.0.1", "port": "10810"}, "export": "disk0"})
            )
        );
        assert_eq!(
            nbd_url_options("nbd://src"),
            Some(
                json!({"driver": "nbd", "server": {"type": "inet", "host": "src", "port": "10809"}})
            )
        );
        assert_eq!(
            nbd_url_options("nbd+unix:///e?socket=/run/s.sock"),
            Some(
                json!({"driver": "nbd", "server": {"type": "unix", "path": "/run/s.sock"}, "export": "e"})
            )
        );
        assert_eq!(nbd_url_options("http://x/y"), None);
        assert_eq!(nbd_url_options("nbd+unix:///e"), None);
    }

    #[test]
    fn remote_object_urls_become_curl_or_s3_nodes() {
        assert_eq!(
            remote_object_options("http://h:8080/img/base.raw"),
            Some(json!({"driver": "http", "url": "http://h:8080/img/base.raw"}))
        );
        assert_eq!(
            remote_object_options("HTTPS://h/b.qcow2"),
            Some(json!({"driver": "https", "url": "HTTPS://h/b.qcow2"}))
        );
        assert_eq!(
            remote_object_options("s3://bucket/key"),
            Some(json!({"driver": "s3", "url": "s3://bucket/key"}))
        );
        assert_eq!(remote_object_options("nbd://h/e"), None);
        assert_eq!(remote_object_options("ftp://h/f"), None);
        assert_eq!(remote_object_options("base.qcow2"), None);
    }
}
