//! An NBD server over block nodes, interoperable with qemu-nbd's clients.
//!
//! A [`Server`] serves a set of [`Export`]s on any number of listeners (TCP or unix sockets) or
//! on streams the caller hands over ([`Server::handle`]). Each export is attached to the node
//! graph through an [`Arc<BlockBackend>`](BlockBackend): every request takes
//! [`BlockBackend::acquire`] for its duration, so the daemon can swap the node under a live
//! export (reopen read-write for a job, insert a copy-on-read filter) without a request ever
//! straddling two nodes.
//!
//! Exports are dynamic, as qemu-storage-daemon's: [`Server::add_export`] publishes one at
//! runtime, [`ExportHandle::remove`] unpublishes it (`safe` refuses while clients are attached,
//! `hard` disconnects them, letting requests already read finish), and
//! [`ExportHandle::closed`] resolves once the last connection of a removed export is gone,
//! which is when its id may be reused (QEMU's `BLOCK_EXPORT_DELETED`). `diskstream serve`
//! simply builds a server with one export and never removes it.
//!
//! The wire format comes from [`crate::proto`]; this module owns policy:
//!
//! * **Handshake** ([`handshake`]): fixed newstyle with `NO_ZEROES`, the options qemu-nbd 10
//!   implements (GO, INFO, LIST, ABORT, EXPORT_NAME, STRUCTURED_REPLY, LIST/SET_META_CONTEXT,
//!   EXTENDED_HEADERS, STARTTLS via rustls), bounded by a handshake timeout.
//! * **Transmission** ([`transmission`]): one reader per connection decodes requests and reads
//!   write payloads; every request then runs in its own task, so replies go out in completion
//!   order (pipelining); one writer task per connection owns the socket's write half and writes
//!   each reply whole. A per-connection semaphore pair bounds requests and buffered bytes in
//!   flight; permits travel with the reply and are released once it is written (or dropped
//!   with it when the client is gone), so a vanished client leaks nothing.
//! * **Limits**: server-wide connection limit (accepting pauses at the limit, like qemu-nbd's
//!   `--shared`), per-export connection limit (checked when a client picks the export),
//!   32 MiB payloads, 4096-byte strings.

mod handshake;
mod transmission;

pub use transmission::sendfile_bytes;

use crate::proto;
use diskstream_block::node::BlockNode;
use diskstream_block::BlockBackend;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};

/// A byte stream a connection runs over (TCP, unix socket, TLS on either, an in-memory pipe).
pub trait NbdStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> NbdStream for T {}

/// A boxed connection stream; STARTTLS replaces it with a TLS stream over itself.
pub type BoxStream = Box<dyn NbdStream>;

/// Default handshake timeout (QEMU's `handshake-max-seconds`).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default server-wide connection limit (QEMU's `max-connections`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 100;
/// Default number of requests one connection may have in flight. Enough for nbdcopy (64) and
/// fio at QD32 to keep the disk busy without letting one client hog the I/O pool.
pub const DEFAULT_MAX_REQUESTS: usize = 64;
/// Default number of payload bytes one connection may hold in flight (write payloads being
/// applied, read data waiting to be sent): four maximum-size requests.
pub const DEFAULT_MAX_BUFFERED: usize = 4 * proto::MAX_PAYLOAD as usize;
/// Most extents sent per context in one block status reply (QEMU: 1 MiB of descriptors / 8).
pub const MAX_EXTENTS: usize = 131_072;

/// One export: a node under a name, with the policy clients get for it.
pub struct Export {
    /// Name clients ask for ("" is qemu-nbd's default name; names match exactly).
    pub name: String,
    /// Description shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION` ("" for none).
    pub description: String,
    /// Where the served node (top of its chain) is attached. Its size is fixed while
    /// exported; the node itself may be replaced through the backend.
    pub backend: Arc<BlockBackend>,
    /// Refuse writes (advertised as `NBD_FLAG_READ_ONLY`, enforced with EPERM).
    pub read_only: bool,
    /// Offer the `qemu:allocation-depth` context.
    pub allocation_depth: bool,
    /// Flush after every write (QEMU's `writethrough`: the export has no volatile cache).
    pub writethrough: bool,
    /// Connections allowed on this export at once; above 1, `CAN_MULTI_CONN` is advertised
    /// (safe because every connection shares the same node, so a flush on one covers writes
    /// made through all).
    pub max_connections: usize,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("backend", &self.backend)
            .field("read_only", &self.read_only)
            .field("allocation_depth", &self.allocation_depth)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

impl Export {
    /// A writable export of `node` named `name` with qemu-nbd's defaults (no description, no
    /// allocation depth, one connection).
    pub fn new(name: impl Into<String>, node: Arc<dyn BlockNode>) -> Export {
        Export {
            name: name.into(),
            description: String::new(),
            backend: BlockBackend::new(node),
            read_only: false,
            allocation_depth: false,
            writethrough: false,
            max_connections: 1,
        }
    }
}

/// Everything a [`Server`] is built from.
pub struct ServerConfig {
    /// The exports; names must be unique.
    pub exports: Vec<Export>,
    /// TLS credentials; when set, TLS is mandatory (FORCEDTLS mode, like QEMU with tls-creds).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Time a client has from connecting to entering transmission.
    pub handshake_timeout: Duration,
    /// Connections served at once; accepting pauses at the limit.
    pub max_connections: usize,
    /// Requests one connection may have in flight.
    pub max_requests: usize,
    /// Payload bytes one connection may hold in flight (at least [`proto::MAX_PAYLOAD`]).
    pub max_buffered: usize,
    /// Send cached read data with `sendfile` on plain TCP/unix connections (see
    /// `transmission::SendfileSocket`). Off by default: on loopback it halves the server's CPU
    /// per byte and speeds up multi-connection copies, but a single connection reading 1 MiB
    /// requests got slower (docs/BENCHMARKS.md). `DISKSTREAM_SENDFILE=1` turns it on.
    pub sendfile: bool,
}

impl ServerConfig {
    /// A configuration with qemu-nbd's defaults for the given exports.
    pub fn new(exports: Vec<Export>) -> Self {
        ServerConfig {
            exports,
            tls: None,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_requests: DEFAULT_MAX_REQUESTS,
            max_buffered: DEFAULT_MAX_BUFFERED,
            sendfile: std::env::var_os("DISKSTREAM_SENDFILE").is_some_and(|v| v == "1"),
        }
    }
}

/// Why a server could not be set up or run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is inconsistent.
    #[error("invalid NBD server configuration: {0}")]
    Config(String),
    /// TLS credentials could not be loaded.
    #[error("TLS credentials '{path}': {msg}")]
    Tls {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// An export of that name is already published.
    #[error("NBD server already has export named '{0}'")]
    DuplicateName(String),
    /// Safe removal of an export that clients are attached to.
    #[error("export '{0}' still in use")]
    InUse(String),
    /// A socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// TLS settings of a server (shared by every connection).
pub type TlsServerConfig = Arc<rustls::ServerConfig>;

/// Load an X.509 certificate chain and private key (PEM files) into a rustls server config.
/// Client certificates are not requested (QEMU's `verify-peer=off`).
pub fn tls_config_from_pem(
    cert: &Path,
    key: &Path,
) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    tls_config(cert, key, None)
}

/// QEMU's `tls-creds-x509` object for a server endpoint: `DIR/server-cert.pem` and
/// `DIR/server-key.pem`; with `verify_peer` (QEMU's default) clients must present a
/// certificate signed by `DIR/ca-cert.pem`.
pub fn tls_config_from_x509_dir(
    dir: &Path,
    verify_peer: bool,
) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    let ca = dir.join("ca-cert.pem");
    tls_config(
        &dir.join("server-cert.pem"),
        &dir.join("server-key.pem"),
        verify_peer.then_some(ca.as_path()),
    )
}

fn tls_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let tls_err = |path: &Path, msg: String| ServerError::Tls {
        path: path.to_path_buf(),
        msg,
    };
    let load_certs = |path: &Path| -> Result<Vec<CertificateDer<'static>>, ServerError> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| tls_err(path, e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| tls_err(path, e.to_string()))?;
        if certs.is_empty() {
            return Err(tls_err(path, "no certificate found".into()));
        }
        Ok(certs)
    };
    let certs = load_certs(cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| tls_err(key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(cert, e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in load_certs(ca)? {
                roots.add(c).map_err(|e| tls_err(ca, e.to_string()))?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| tls_err(ca, e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let cfg = builder
        .with_single_cert(certs, key_der)
        .map_err(|e| tls_err(key, e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// A listening socket the server accepts connections on.
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix domain socket and its path (the socket file stays until its owner removes it;
    /// `diskstream serve` does on exit, as qemu-nbd does).
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Bind a TCP listener.
    pub async fn bind_tcp(addr: &str) -> Result<Self, ServerError> {
        TcpListener::bind(addr)
            .await
            .map(Listener::Tcp)
            .map_err(|source| ServerError::Io {
                context: format!("cannot listen on {addr}"),
                source,
            })
    }

    /// Bind a unix socket at `path`. A stale socket file there is replaced, as qemu-nbd does.
    pub fn bind_unix(path: &Path) -> Result<Self, ServerError> {
        if let Ok(md) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if md.file_type().is_socket() {
                let _ = std::fs::remove_file(path);
            }
        }
        UnixListener::bind(path)
            .map(|l| Listener::Unix(l, path.to_path_buf()))
            .map_err(|source| ServerError::Io {
                context: format!("cannot listen on unix socket '{}'", path.display()),
                source,
            })
    }

    /// The address clients connect to, for messages ("127.0.0.1:10809", "unix:/path").
    pub fn local_addr(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp".into()),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }

    /// The TCP port, if this is a TCP listener.
    pub fn port(&self) -> Option<u16> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            Listener::Unix(..) => None,
        }
    }

    async fn accept(&self) -> io::Result<Accepted> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                // Replies are written whole by one writer; Nagle would only add latency.
                let _ = s.set_nodelay(true);
                Ok(Accepted::Tcp(s))
            }
            Listener::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                Ok(Accepted::Unix(s))
            }
        }
    }
}

/// A connection a listener accepted, still of its concrete type (so that [`Server::handle`]
/// can find its socket for `sendfile`).
enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// Connection counters, observable through [`Server::counts`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnCounts {
    /// Connections currently open (any phase).
    pub active: usize,
    /// Connections accepted since the server started.
    pub total: u64,
}

/// Attachment bookkeeping of one export, changed under one lock so that "idle, then
/// unpublished" (safe removal) cannot race a client taking a slot.
#[derive(Default)]
struct Attach {
    /// Connections in the transmission phase on this export.
    active: usize,
    /// Unpublished: no new connection may attach.
    removed: bool,
}

/// An export plus its live connections.
pub(crate) struct ExportState {
    pub(crate) export: Export,
    attach: Mutex<Attach>,
    /// Fires (`true`) when the export is removed in `hard` mode: its connections stop reading
    /// requests, finish those already read and close.
    pub(crate) kill: watch::Sender<bool>,
    /// `(attached connections, removed)`, republished under the lock at every change, so
    /// waiters see the changes in order.
    status: watch::Sender<(usize, bool)>,
}

/// Holds one of an export's connection slots until dropped.
pub(crate) struct ExportSlot(Arc<ExportState>);

impl Drop for ExportSlot {
    fn drop(&mut self) {
        let mut a = self.0.lock();
        a.active = a.active.saturating_sub(1);
        self.0.status.send_replace((a.active, a.removed));
    }
}

impl ExportState {
    fn new(export: Export) -> Arc<ExportState> {
        Arc::new(ExportState {
            export,
            attach: Mutex::new(Attach::default()),
            kill: watch::channel(false).0,
            status: watch::channel((0, false)).0,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Attach> {
        self.attach.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take a connection slot, or `None` when the export is at its limit or was removed.
    pub(crate) fn try_slot(self: &Arc<Self>) -> Option<ExportSlot> {
        let mut a = self.lock();
        if a.removed || a.active >= self.export.max_connections {
            return None;
        }
        a.active += 1;
        self.status.send_replace((a.active, a.removed));
        Some(ExportSlot(Arc::clone(self)))
    }

    /// Export size as advertised: the node's size rounded down to 512 bytes, as QEMU does.
    pub(crate) fn size(&self) -> u64 {
        self.export.backend.current().size() / 512 * 512
    }
}

/// How [`ExportHandle::remove`] treats connected clients (QMP's `BlockExportRemoveMode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoveMode {
    /// Refuse while any client is attached to the export.
    Safe,
    /// Disconnect attached clients (requests already read still complete).
    Hard,
}

/// A published (or removed but still draining) export of a [`Server`].
#[derive(Clone)]
pub struct ExportHandle {
    state: Arc<ExportState>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ExportHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportHandle")
            .field("export", &self.state.export)
            .field("connections", &self.connections())
            .field("removed", &self.is_removed())
            .finish()
    }
}

impl ExportHandle {
    /// The export's definition.
    pub fn export(&self) -> &Export {
        &self.state.export
    }

    /// The name clients ask for.
    pub fn name(&self) -> &str {
        &self.state.export.name
    }

    /// Connections currently attached (past `NBD_OPT_GO`/`EXPORT_NAME`).
    pub fn connections(&self) -> usize {
        self.state.lock().active
    }

    /// Whether [`ExportHandle::remove`] succeeded (the export is draining or gone).
    pub fn is_removed(&self) -> bool {
        self.state.lock().removed
    }

    /// Unpublish the export: its name is free at once, new clients cannot attach. `Safe`
    /// fails with [`ServerError::InUse`] (changing nothing) while a client is attached; `Hard`
    /// disconnects attached clients. Removing twice is harmless.
    pub fn remove(&self, mode: RemoveMode) -> Result<(), ServerError> {
        {
            let mut a = self.state.lock();
            if mode == RemoveMode::Safe && a.active > 0 && !a.removed {
                return Err(ServerError::InUse(self.state.export.name.clone()));
            }
            a.removed = true;
            self.state.status.send_replace((a.active, true));
        }
        if mode == RemoveMode::Hard {
            self.state.kill.send_replace(true);
        }
        let mut list = self
            .shared
            .exports
            .write()
            .unwrap_or_else(|p| p.into_inner());
        list.retain(|e| !Arc::ptr_eq(e, &self.state));
        Ok(())
    }

    /// Resolves once the export was removed and its last connection has closed (no request
    /// of it is in flight any more): the point at which QEMU emits `BLOCK_EXPORT_DELETED`.
    pub async fn closed(&self) {
        let mut rx = self.state.status.subscribe();
        let _ = rx
            .wait_for(|&(active, removed)| removed && active == 0)
            .await;
    }
}

pub(crate) struct Shared {
    /// Published exports, oldest first (the order `NBD_OPT_LIST` reports).
    pub(crate) exports: RwLock<Vec<Arc<ExportState>>>,
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    pub(crate) handshake_timeout: Duration,
    pub(crate) max_requests: usize,
    pub(crate) max_buffered: usize,
    sendfile: bool,
    slots: Arc<Semaphore>,
    shutdown: watch::Sender<bool>,
    counts: watch::Sender<ConnCounts>,
}

impl Shared {
    pub(crate) fn find(&self, name: &str) -> Option<Arc<ExportState>> {
        self.list().into_iter().find(|e| e.export.name == name)
    }

    /// A snapshot of the published exports.
    pub(crate) fn list(&self) -> Vec<Arc<ExportState>> {
        self.exports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn check_export(e: &Export) -> Result<(), ServerError> {
    if e.name.len() > proto::MAX_STRING || e.description.len() > proto::MAX_STRING {
        return Err(ServerError::Config(format!(
            "export '{}': name and description are limited to {} bytes",
            proto::truncate_str(&e.name, 64),
            proto::MAX_STRING
        )));
    }
    if e.max_connections == 0 {
        return Err(ServerError::Config(format!(
            "export '{}': max_connections must be at least 1",
            e.name
        )));
    }
    Ok(())
}

/// Decrements the active count when a connection ends, however it ends.
struct ConnGuard(Arc<Shared>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.counts.send_modify(|c| c.active -= 1);
    }
}

/// The NBD server. Cheap to clone; clones share exports, limits and shutdown state.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

impl Server {
    /// Build a server; checks that export names are unique and limits are usable.
    pub fn new(config: ServerConfig) -> Result<Self, ServerError> {
        let mut names = std::collections::HashSet::new();
        for e in &config.exports {
            if !names.insert(e.name.as_str()) {
                return Err(ServerError::Config(format!(
                    "export name '{}' is used twice",
                    e.name
                )));
            }
            check_export(e)?;
        }
        if config.max_connections == 0 || config.max_requests == 0 {
            return Err(ServerError::Config(
                "connection and request limits must be at least 1".into(),
            ));
        }
        if config.max_buffered < proto::MAX_PAYLOAD as usize {
            return Err(ServerError::Config(format!(
                "max_buffered must be at least {} bytes (one maximum payload)",
                proto::MAX_PAYLOAD
            )));
        }
        let exports = config.exports.into_iter().map(ExportState::new).collect();
        Ok(Server {
            shared: Arc::new(Shared {
                exports: RwLock::new(exports),
                tls: config.tls.map(tokio_rustls::TlsAcceptor::from),
                handshake_timeout: config.handshake_timeout,
                max_requests: config.max_requests,
                max_buffered: config.max_buffered,
                sendfile: config.sendfile,
                slots: Arc::new(Semaphore::new(
                    config.max_connections.min(Semaphore::MAX_PERMITS),
                )),
                shutdown: watch::channel(false).0,
                counts: watch::channel(ConnCounts::default()).0,
            }),
        })
    }

    /// Publish an export at runtime. Fails if its name is taken by a published export (a
    /// removed export's name is free at once, even while its clients drain) or the export is
    /// invalid.
    pub fn add_export(&self, export: Export) -> Result<ExportHandle, ServerError> {
        check_export(&export)?;
        let mut list = self
            .shared
            .exports
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if list.iter().any(|e| e.export.name == export.name) {
            return Err(ServerError::DuplicateName(export.name));
        }
        let state = ExportState::new(export);
        list.push(Arc::clone(&state));
        Ok(ExportHandle {
            state,
            shared: Arc::clone(&self.shared),
        })
    }

    /// The published export named `name`.
    pub fn export(&self, name: &str) -> Option<ExportHandle> {
        self.shared.find(name).map(|state| ExportHandle {
            state,
            shared: Arc::clone(&self.shared),
        })
    }

    /// Every published export, oldest first.
    pub fn exports(&self) -> Vec<ExportHandle> {
        self.shared
            .list()
            .into_iter()
            .map(|state| ExportHandle {
                state,
                shared: Arc::clone(&self.shared),
            })
            .collect()
    }

    /// Accept connections on `listener` until [`Server::shutdown`]. Each connection runs in its
    /// own task; at the connection limit (shared by all listeners), accepting pauses until one
    /// ends. Call once per listener.
    pub async fn serve(&self, listener: Listener) -> Result<(), ServerError> {
        let mut stop = self.shared.shutdown.subscribe();
        loop {
            let stream = tokio::select! {
                _ = stop.wait_for(|s| *s) => return Ok(()),
                r = listener.accept() => r,
            };
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; the listener stays.
                    tracing::warn!("accept on {} failed: {e}", listener.local_addr());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // At the limit, the accepted connection waits (without a greeting) for a slot and
            // this listener stops accepting, so further clients wait in the kernel's backlog,
            // as with qemu-nbd. Taking the slot only after accept() keeps idle listeners from
            // reserving slots.
            let permit = tokio::select! {
                _ = stop.wait_for(|s| *s) => return Ok(()),
                p = Arc::clone(&self.shared.slots).acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return Ok(()),
                },
            };
            let me = self.clone();
            tokio::spawn(async move {
                match stream {
                    Accepted::Tcp(s) => me.handle(s).await,
                    Accepted::Unix(s) => me.handle(s).await,
                }
                drop(permit);
            });
        }
    }

    /// Serve one connection on an already-connected stream until it ends. The caller owns
    /// connection limits for streams it hands over directly.
    pub async fn handle<S: NbdStream>(&self, stream: S) {
        self.shared.counts.send_modify(|c| {
            c.active += 1;
            c.total += 1;
        });
        let _guard = ConnGuard(Arc::clone(&self.shared));
        let stop = self.shared.shutdown.subscribe();
        if *stop.borrow() {
            return;
        }
        // A plain socket (not a TLS stream, not an in-memory pipe) can take file pages
        // straight from the page cache; see `transmission`.
        let socket = if self.shared.sendfile {
            transmission::SendfileSocket::of(&stream)
        } else {
            None
        };
        let boxed: BoxStream = Box::new(stream);
        let neg = tokio::time::timeout(
            self.shared.handshake_timeout,
            handshake::negotiate(&self.shared, boxed, stop.clone()),
        )
        .await;
        let (stream, session) = match neg {
            Err(_) => {
                tracing::info!("NBD client did not finish the handshake in time; disconnecting");
                return;
            }
            Ok(Err(e)) => {
                e.log();
                return;
            }
            Ok(Ok(None)) => return,
            Ok(Ok(Some(t))) => t,
        };
        let socket = if session.tls { None } else { socket };
        transmission::run(&self.shared, stream, session, stop, socket).await;
    }

    /// Stop accepting, let every connection finish the requests it has read (their replies are
    /// sent), then close the connections. Wait for [`Server::wait_idle`] before closing nodes.
    pub fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
    }

    /// Watch the connection counters (the standalone front end exits when the last client
    /// leaves).
    pub fn counts(&self) -> watch::Receiver<ConnCounts> {
        self.shared.counts.subscribe()
    }

    /// Wait until no connection is open.
    pub async fn wait_idle(&self) {
        let mut rx = self.shared.counts.subscribe();
        let _ = rx.wait_for(|c| c.active == 0).await;
    }
}
