//! Block exports: `nbd-server-start`, `nbd-server-stop`, `block-export-add`,
//! `block-export-del`, `query-block-exports`, and the deprecated `nbd-server-add` /
//! `nbd-server-remove`, with qemu-storage-daemon 10's semantics and error texts.
//!
//! The NBD server is `diskstream-nbd`'s [`Server`], one per `nbd-server-start`. An export is
//! published on it and attached to the node graph as a [`User`] whose [`BlockBackend`]
//! follows graph changes (a stream job's filter, a reopen), exactly as an export is a
//! BlockBackend parent in QEMU. Its lifecycle is QEMU's:
//!
//! * `block-export-add` checks, in QEMU's order: the id (well-formed, unused), the type (only
//!   `nbd` has a driver here: the others get QEMU's "No driver found" of a build without them),
//!   the node, `writable` on a read-only node, `iothread` (none exist), `write` permission
//!   conflicts with jobs, then the NBD ones (server running, name and description lengths,
//!   unique name, `bitmaps`).
//! * `block-export-del` in `safe` mode refuses while a client is attached ("export 'X' still
//!   in use"); `hard` disconnects the clients (requests already read complete). The export's
//!   name is free at once; its id stays taken (`shutting-down: true`) until the last
//!   connection is gone, when `BLOCK_EXPORT_DELETED` is emitted, before the reply if no
//!   client was attached, as in QSD.
//! * `nbd-server-stop` removes every export in `hard` mode, waits for them to be gone (their
//!   events precede the reply) and closes the listener. Daemon shutdown does the same.
//!
//! TLS: `tls-creds` names X.509 credentials registered with [`Exports::add_tls_creds`] (the
//! daemon's `--object tls-creds-x509,...`); TLS is then mandatory for clients.

use crate::error::{QmpError, QmpResult};
use crate::graph::User;
use crate::monitor::Monitor;
use crate::schema::{
    check_object, check_union, opt, req, Member, Ty, Union, SOCKET_ADDRESS, SOCKET_ADDRESS_LEGACY,
};
use diskstream_block::BlockBackend;
use diskstream_nbd::server::{
    Export, ExportHandle, Listener, RemoveMode, Server, ServerConfig, ServerError, TlsServerConfig,
};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Longest export name or description, in bytes (NBD's string limit).
const NBD_MAX_STRING: usize = 4096;

/// `nbd-server-start`'s arguments (`NbdServerOptionsLegacy`: the base members first).
pub const NBD_SERVER_START: &[Member] = &[
    opt("handshake-max-seconds", Ty::U32),
    opt("tls-creds", Ty::Str),
    opt("tls-authz", Ty::Str),
    opt("max-connections", Ty::U32),
    req("addr", Ty::Union(&SOCKET_ADDRESS_LEGACY)),
];

/// `--nbd-server`'s options (`NbdServerOptions`: `addr` is a flat `SocketAddress`).
pub const NBD_SERVER_CLI: &[Member] = &[
    opt("handshake-max-seconds", Ty::U32),
    opt("tls-creds", Ty::Str),
    opt("tls-authz", Ty::Str),
    opt("max-connections", Ty::U32),
    req("addr", Ty::Union(&SOCKET_ADDRESS)),
];

const REMOVE_MODE: Ty = Ty::Enum(&["safe", "hard"]);

/// `block-export-del`'s arguments.
pub const BLOCK_EXPORT_DEL: &[Member] = &[req("id", Ty::Str), opt("mode", REMOVE_MODE)];

/// `nbd-server-remove`'s arguments.
pub const NBD_SERVER_REMOVE: &[Member] = &[req("name", Ty::Str), opt("mode", REMOVE_MODE)];

/// `nbd-server-add`'s arguments.
pub const NBD_SERVER_ADD: &[Member] = &[
    opt("name", Ty::Str),
    opt("description", Ty::Str),
    req("device", Ty::Str),
    opt("writable", Ty::Bool),
    opt("bitmap", Ty::Str),
];

const EXPORT_BASE: &[Member] = &[
    req(
        "type",
        Ty::Enum(&["nbd", "vhost-user-blk", "fuse", "vduse-blk"]),
    ),
    req("id", Ty::Str),
    opt("fixed-iothread", Ty::Bool),
    opt("iothread", Ty::Str),
    req("node-name", Ty::Str),
    opt("writable", Ty::Bool),
    opt("writethrough", Ty::Bool),
    opt("allow-inactive", Ty::Bool),
    // diskstream extension: read through a hidden copy-on-read filter over the node.
    opt("copy-on-read", Ty::Bool),
];

/// `block-export-add`'s arguments (`BlockExportOptions`, a union on `type`).
pub const BLOCK_EXPORT_OPTIONS: Union = Union {
    base: EXPORT_BASE,
    tag: "type",
    variants: &[
        (
            "nbd",
            &[
                opt("name", Ty::Str),
                opt("description", Ty::Str),
                opt("bitmaps", Ty::List(&Ty::Any)),
                opt("allocation-depth", Ty::Bool),
            ],
        ),
        (
            "vhost-user-blk",
            &[
                req("addr", Ty::Union(&SOCKET_ADDRESS)),
                opt("logical-block-size", Ty::Int),
                opt("num-queues", Ty::Int),
            ],
        ),
        (
            "fuse",
            &[
                req("mountpoint", Ty::Str),
                opt("growable", Ty::Bool),
                opt("allow-other", Ty::Enum(&["off", "on", "auto"])),
            ],
        ),
        (
            "vduse-blk",
            &[
                req("name", Ty::Str),
                opt("num-queues", Ty::Int),
                opt("queue-size", Ty::Int),
                opt("logical-block-size", Ty::Int),
                opt("serial", Ty::Str),
            ],
        ),
    ],
};

/// Where an NBD server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddr {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP host and port (QEMU's `InetSocketAddress`).
    Inet {
        /// Host name or address.
        host: String,
        /// Port (a number; QEMU also takes service names).
        port: String,
    },
}

impl std::fmt::Display for NbdAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            NbdAddr::Inet { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            NbdAddr::Inet { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// How to start the NBD server (`nbd-server-start`, `--nbd-server`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdServerOptions {
    /// Listen address.
    pub addr: NbdAddr,
    /// Id of a TLS credentials object; TLS is then mandatory.
    pub tls_creds: Option<String>,
    /// Connections served at once (0: unlimited; 1 also disables `CAN_MULTI_CONN`).
    pub max_connections: u32,
    /// Seconds a client has to finish the handshake (0: unlimited).
    pub handshake_max_seconds: u32,
}

impl NbdServerOptions {
    /// QEMU's defaults (100 connections, 10 s handshakes) for a server at `addr`.
    pub fn new(addr: NbdAddr) -> Self {
        NbdServerOptions {
            addr,
            tls_creds: None,
            max_connections: diskstream_nbd::server::DEFAULT_MAX_CONNECTIONS as u32,
            handshake_max_seconds: diskstream_nbd::server::DEFAULT_HANDSHAKE_TIMEOUT.as_secs()
                as u32,
        }
    }

    /// From validated arguments: `addr` in the legacy (`data`) or the flat form.
    pub fn from_args(a: &Map<String, Value>, legacy: bool) -> QmpResult<Self> {
        let addr_v = a.get("addr").cloned().unwrap_or(Value::Null);
        let kind = addr_v.get("type").and_then(|t| t.as_str()).unwrap_or("");
        let data = if legacy {
            addr_v.get("data").cloned().unwrap_or(Value::Null)
        } else {
            addr_v.clone()
        };
        let field = |k: &str| {
            data.get(k)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string()
        };
        let addr = match kind {
            "unix" => NbdAddr::Unix(PathBuf::from(field("path"))),
            "inet" => NbdAddr::Inet {
                host: field("host"),
                port: field("port"),
            },
            other => {
                return Err(QmpError::generic(format!(
                    "diskstream does not support '{other}' socket addresses for the NBD server"
                )))
            }
        };
        let mut o = NbdServerOptions::new(addr);
        o.tls_creds = a
            .get("tls-creds")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        if let Some(n) = a.get("max-connections").and_then(|v| v.as_u64()) {
            o.max_connections = n as u32;
        }
        if let Some(n) = a.get("handshake-max-seconds").and_then(|v| v.as_u64()) {
            o.handshake_max_seconds = n as u32;
        }
        if let Some(z) = a.get("tls-authz").and_then(|v| v.as_str()) {
            return Err(QmpError::generic(format!(
                "diskstream does not support authorization objects (tls-authz '{z}')"
            )));
        }
        Ok(o)
    }
}

/// A running NBD server.
struct Running {
    server: Server,
    accept: tokio::task::JoinHandle<()>,
    unix_path: Option<PathBuf>,
    bound: String,
    /// Per-export connection limit derived from `max-connections`.
    export_limit: usize,
}

/// One export (published, or removed and draining).
struct Entry {
    id: String,
    handle: ExportHandle,
    /// The export's own hidden copy-on-read filter node (`copy-on-read=on`).
    cor_filter: Option<crate::graph::NodeId>,
}

#[derive(Default)]
struct State {
    server: Option<Running>,
    /// Oldest first (queries list newest first, as QEMU does).
    list: Vec<Entry>,
}

/// The daemon's exports and NBD server.
#[derive(Default)]
pub struct Exports {
    state: tokio::sync::Mutex<State>,
    tls: std::sync::Mutex<HashMap<String, TlsServerConfig>>,
}

fn mode_of(a: &Map<String, Value>) -> RemoveMode {
    match a.get("mode").and_then(|v| v.as_str()) {
        Some("hard") => RemoveMode::Hard,
        _ => RemoveMode::Safe,
    }
}

fn str_of<'a>(a: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    a.get(k).and_then(|v| v.as_str())
}

impl Exports {
    /// Register TLS credentials under `id` (the daemon's `--object tls-creds-x509`).
    pub fn add_tls_creds(&self, id: &str, cfg: TlsServerConfig) -> QmpResult<()> {
        let mut t = self.tls.lock().unwrap_or_else(|p| p.into_inner());
        if t.contains_key(id) {
            return Err(QmpError::generic(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
        t.insert(id.to_string(), cfg);
        Ok(())
    }

    /// Whether the NBD server runs.
    pub async fn server_running(&self) -> bool {
        self.state.lock().await.server.is_some()
    }

    /// Start the NBD server (`nbd-server-start`, `--nbd-server`). Returns the bound address
    /// ("127.0.0.1:10809", "unix:/path").
    pub async fn start_server(&self, o: &NbdServerOptions) -> QmpResult<String> {
        let mut st = self.state.lock().await;
        if st.server.is_some() {
            return Err(QmpError::generic("NBD server already running"));
        }
        let tls = match &o.tls_creds {
            Some(id) => Some(
                self.tls
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(id)
                    .cloned()
                    .ok_or_else(|| {
                        QmpError::generic(format!("No TLS credentials with id '{id}'"))
                    })?,
            ),
            None => None,
        };
        let (listener, unix_path) = match &o.addr {
            NbdAddr::Unix(p) => {
                let l = Listener::bind_unix(p).map_err(|e| {
                    QmpError::generic(format!(
                        "Failed to bind socket to {}: {}",
                        p.display(),
                        io_reason(&e)
                    ))
                })?;
                (l, Some(p.clone()))
            }
            NbdAddr::Inet { host, port } => {
                let port_n: u16 = port.parse().map_err(|_| {
                    QmpError::generic(format!(
                        "address resolution failed for {host}:{port}: Servname not supported for ai_socktype"
                    ))
                })?;
                let addr = NbdAddr::Inet {
                    host: host.clone(),
                    port: port_n.to_string(),
                }
                .to_string();
                let l = Listener::bind_tcp(&addr).await.map_err(|e| {
                    QmpError::generic(format!("Failed to bind socket: {}", io_reason(&e)))
                })?;
                (l, None)
            }
        };
        let bound = listener.local_addr();
        let limit = if o.max_connections == 0 {
            usize::MAX
        } else {
            o.max_connections as usize
        };
        let mut cfg = ServerConfig::new(Vec::new());
        cfg.tls = tls;
        cfg.max_connections = limit;
        cfg.handshake_timeout = if o.handshake_max_seconds == 0 {
            Duration::MAX
        } else {
            Duration::from_secs(o.handshake_max_seconds as u64)
        };
        let server = Server::new(cfg).map_err(|e| QmpError::generic(e.to_string()))?;
        let srv = server.clone();
        let accept = tokio::spawn(async move {
            if let Err(e) = srv.serve(listener).await {
                tracing::warn!("NBD server: {e}");
            }
        });
        tracing::info!("NBD server listening on {bound}");
        st.server = Some(Running {
            server,
            accept,
            unix_path,
            bound: bound.clone(),
            export_limit: limit,
        });
        Ok(bound)
    }

    /// The address the running server listens on.
    pub async fn server_address(&self) -> Option<String> {
        self.state
            .lock()
            .await
            .server
            .as_ref()
            .map(|r| r.bound.clone())
    }

    /// `nbd-server-stop` (and daemon shutdown): remove every export (clients are
    /// disconnected), wait until each is gone (emitting `BLOCK_EXPORT_DELETED`), close the
    /// listener.
    pub async fn stop_server(&self, mon: &Monitor) -> QmpResult<()> {
        let mut st = self.state.lock().await;
        let Some(run) = st.server.take() else {
            return Err(QmpError::generic("NBD server not running"));
        };
        let handles: Vec<(String, ExportHandle)> = st
            .list
            .iter()
            .rev()
            .map(|e| (e.id.clone(), e.handle.clone()))
            .collect();
        for (_, h) in &handles {
            let _ = h.remove(RemoveMode::Hard);
        }
        for (id, h) in handles {
            h.closed().await;
            finish(&mut st, mon, &id).await;
        }
        run.server.shutdown();
        let _ = run.accept.await;
        if let Some(p) = &run.unix_path {
            let _ = std::fs::remove_file(p);
        }
        Ok(())
    }

    /// `query-block-exports`.
    pub async fn query(&self, mon: &Monitor) -> Value {
        let st = self.state.lock().await;
        let g = mon.graph.lock().await;
        Value::Array(
            st.list
                .iter()
                .rev()
                .map(|e| {
                    // An export's hidden copy-on-read filter is shown as the node it
                    // filters, the node the export was created on.
                    let node = g
                        .user(&e.id)
                        .and_then(|u| g.get(u.node))
                        .and_then(|n| match n.file {
                            Some(f) if e.cor_filter == Some(n.id) => g.get(f),
                            _ => Some(n),
                        })
                        .map(|n| n.name.clone())
                        .unwrap_or_default();
                    json!({"id": e.id, "type": "nbd", "node-name": node,
                           "shutting-down": e.handle.is_removed()})
                })
                .collect(),
        )
    }

    /// `block-export-add` with validated arguments.
    pub async fn add(&self, mon: &Monitor, a: &Map<String, Value>) -> QmpResult<()> {
        let id = str_of(a, "id").unwrap_or_default();
        let node_name = str_of(a, "node-name").unwrap_or_default();
        let writable = a.get("writable").and_then(|v| v.as_bool()).unwrap_or(false);
        let cor = a
            .get("copy-on-read")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let mut st = self.state.lock().await;
        if !diskstream_jobs::job::id_wellformed(id) {
            return Err(QmpError::generic("Invalid block export id"));
        }
        if st.list.iter().any(|e| e.id == id) {
            return Err(QmpError::generic(format!(
                "Block export id '{id}' is already in use"
            )));
        }
        if str_of(a, "type") != Some("nbd") {
            return Err(QmpError::generic(
                "No driver found for the requested export type",
            ));
        }
        let mut g = mon.graph.lock().await;
        let node = g.find(node_name).ok_or_else(|| {
            QmpError::generic(format!("Cannot find device='' nor node-name='{node_name}'"))
        })?;
        let node_id = node.id;
        if writable && node.read_only {
            return Err(QmpError::generic(
                "Cannot export read-only node as writable",
            ));
        }
        if let Some(t) = str_of(a, "iothread") {
            return Err(QmpError::generic(format!("iothread \"{t}\" not found")));
        }
        // A copy-on-read filter writes to the node even for a read-only export.
        if writable || (cor && !node.read_only) {
            if let Some(e) = g.write_conflict(node_id, true) {
                return Err(QmpError::generic(e));
            }
        }
        let Some(run) = st.server.as_ref() else {
            return Err(QmpError::generic("NBD server not running"));
        };
        let name = str_of(a, "name").unwrap_or(node_name).to_string();
        if name.len() > NBD_MAX_STRING {
            return Err(QmpError::generic(format!("export name '{name}' too long")));
        }
        let description = str_of(a, "description").unwrap_or_default().to_string();
        if description.len() > NBD_MAX_STRING {
            return Err(QmpError::generic(format!(
                "description '{description}' too long"
            )));
        }
        if run.server.export(&name).is_some() {
            return Err(QmpError::generic(format!(
                "NBD server already has export named '{name}'"
            )));
        }
        if let Some(b) = a
            .get("bitmaps")
            .and_then(|v| v.as_array())
            .and_then(|v| v.first())
        {
            // No node carries dirty bitmaps in diskstream, so every name is unknown.
            let bname = match b {
                Value::String(s) => s.clone(),
                other => other
                    .get("name")
                    .and_then(|n| n.as_str())
                    .unwrap_or_default()
                    .to_string(),
            };
            return Err(QmpError::generic(format!("Bitmap '{bname}' is not found")));
        }
        if g.effective_block(node_id).is_none() {
            return Err(QmpError::generic(format!(
                "diskstream cannot export node '{node_name}' (driver {}): export the format node above it",
                g.get(node_id).map(|n| n.driver.as_str()).unwrap_or("?")
            )));
        }
        // `copy-on-read=on`: the export reads through a hidden filter node of its own.
        let filter = if cor {
            g.add_export_cor_filter(node_id)?
        } else {
            None
        };
        let attach = filter.unwrap_or(node_id);
        let Some(block) = g.effective_block(attach) else {
            return Err(QmpError::generic("export node vanished"));
        };
        let backend = BlockBackend::new(block);
        let export = Export {
            name,
            description,
            backend: Arc::clone(&backend),
            read_only: !writable,
            allocation_depth: a
                .get("allocation-depth")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            max_connections: run.export_limit,
            writethrough: a
                .get("writethrough")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
        };
        let handle = match run.server.add_export(export) {
            Ok(h) => h,
            Err(e) => {
                if let Some(f) = filter {
                    g.remove_if_unreferenced(f).await;
                }
                return Err(match e {
                    ServerError::DuplicateName(n) => {
                        QmpError::generic(format!("NBD server already has export named '{n}'"))
                    }
                    other => QmpError::generic(other.to_string()),
                });
            }
        };
        g.attach_user(User {
            id: id.to_string(),
            node: attach,
            backend,
            write: writable,
        });
        st.list.push(Entry {
            id: id.to_string(),
            handle,
            cor_filter: filter,
        });
        Ok(())
    }

    /// `block-export-del` / `nbd-server-remove`.
    pub async fn del(&self, mon: &Arc<Monitor>, id: &str, mode: RemoveMode) -> QmpResult<()> {
        let mut st = self.state.lock().await;
        let Some(e) = st.list.iter().find(|e| e.id == id) else {
            return Err(QmpError::generic(format!("Export '{id}' is not found")));
        };
        if e.handle.is_removed() {
            return Err(QmpError::generic(format!(
                "Export '{id}' is already shutting down"
            )));
        }
        let handle = e.handle.clone();
        handle.remove(mode).map_err(|e| match e {
            ServerError::InUse(_) => QmpError::generic(format!("export '{id}' still in use")),
            other => QmpError::generic(other.to_string()),
        })?;
        if handle.connections() == 0 {
            // Nothing to wait for: the id is free before the reply, as in QSD.
            finish(&mut st, mon, id).await;
            return Ok(());
        }
        let weak: Weak<Monitor> = Arc::downgrade(mon);
        let id = id.to_string();
        tokio::spawn(async move {
            handle.closed().await;
            if let Some(mon) = weak.upgrade() {
                let mut st = mon.exports.state.lock().await;
                finish(&mut st, &mon, &id).await;
            }
        });
        Ok(())
    }
}

/// The export `id` is gone: forget it, detach it from the graph, announce it.
async fn finish(st: &mut State, mon: &Monitor, id: &str) {
    let Some(pos) = st.list.iter().position(|e| e.id == id) else {
        return;
    };
    st.list.remove(pos);
    {
        let mut g = mon.graph.lock().await;
        if let Some(u) = g.detach_user(id) {
            // A node only the export kept alive (a snapshot overlay or mirror target the
            // monitor did not create) goes with it, as QEMU drops its last reference.
            g.remove_if_unreferenced(u.node).await;
        }
    }
    mon.emit_event("BLOCK_EXPORT_DELETED", Some(json!({ "id": id })));
}

/// The OS reason of a socket error, as QEMU prints it.
fn io_reason(e: &ServerError) -> String {
    match e {
        ServerError::Io { source, .. } => {
            diskstream_jobs::error::strerror(source.raw_os_error().unwrap_or(5))
        }
        other => other.to_string(),
    }
}

/// `nbd-server-start`.
pub async fn nbd_server_start(mon: &Monitor, a: &Map<String, Value>) -> QmpResult<Value> {
    let o = NbdServerOptions::from_args(a, true);
    // "already running" wins over problems with the new options, as in QEMU.
    if mon.exports.server_running().await {
        return Err(QmpError::generic("NBD server already running"));
    }
    mon.exports.start_server(&o?).await?;
    Ok(json!({}))
}

/// `nbd-server-add`: the deprecated form of `block-export-add` (id = name = device by
/// default; a read-only node is silently exported read-only).
pub async fn nbd_server_add(mon: &Monitor, a: &Map<String, Value>) -> QmpResult<Value> {
    let device = str_of(a, "device").unwrap_or_default();
    let (node_name, read_only) = {
        let g = mon.graph.lock().await;
        let n = g.find(device).ok_or_else(|| {
            QmpError::generic(format!(
                "Cannot find device='{device}' nor node-name='{device}'"
            ))
        })?;
        (n.name.clone(), n.read_only)
    };
    if !mon.exports.server_running().await {
        return Err(QmpError::generic("NBD server not running"));
    }
    let name = str_of(a, "name").unwrap_or(device);
    let mut args = Map::new();
    args.insert("type".into(), json!("nbd"));
    args.insert("id".into(), json!(name));
    args.insert("node-name".into(), json!(node_name));
    args.insert("name".into(), json!(name));
    if let Some(d) = a.get("description") {
        args.insert("description".into(), d.clone());
    }
    let writable = a.get("writable").and_then(|v| v.as_bool()).unwrap_or(false);
    args.insert("writable".into(), json!(writable && !read_only));
    if let Some(b) = a.get("bitmap") {
        args.insert("bitmaps".into(), json!([b]));
    }
    mon.exports.add(mon, &args).await?;
    Ok(json!({}))
}

/// Validate `block-export-add` arguments (a union on `type`); with `keyval` (the `--export`
/// command line), strings are converted as QEMU's keyval visitor does.
pub fn check_export_options(a: &mut Map<String, Value>, keyval: bool) -> QmpResult<()> {
    check_union(a, &BLOCK_EXPORT_OPTIONS, "", keyval)?;
    if let Some(Value::Array(bs)) = a.get("bitmaps") {
        for (i, b) in bs.iter().enumerate() {
            match b {
                Value::String(_) => {}
                Value::Object(o) => {
                    let mut o = o.clone();
                    check_object(
                        &mut o,
                        &[req("node", Ty::Str), req("name", Ty::Str)],
                        &format!("bitmaps[{i}]"),
                        keyval,
                    )?;
                }
                _ => {
                    return Err(QmpError::generic(format!(
                        "Invalid parameter type for 'bitmaps[{i}]', expected: BlockDirtyBitmapOrStr"
                    )))
                }
            }
        }
    }
    Ok(())
}

/// Run an export command (arguments already validated).
pub async fn dispatch(mon: &Arc<Monitor>, cmd: &str, a: &Map<String, Value>) -> QmpResult<Value> {
    match cmd {
        "nbd-server-start" => nbd_server_start(mon, a).await,
        "nbd-server-stop" => {
            mon.exports.stop_server(mon).await?;
            Ok(json!({}))
        }
        "block-export-add" => {
            mon.exports.add(mon, a).await?;
            Ok(json!({}))
        }
        "block-export-del" => {
            let id = str_of(a, "id").unwrap_or_default();
            mon.exports.del(mon, id, mode_of(a)).await?;
            Ok(json!({}))
        }
        "nbd-server-add" => nbd_server_add(mon, a).await,
        "nbd-server-remove" => {
            let id = str_of(a, "name").unwrap_or_default();
            mon.exports.del(mon, id, mode_of(a)).await?;
            Ok(json!({}))
        }
        _ => Ok(mon.exports.query(mon).await),
    }
}
