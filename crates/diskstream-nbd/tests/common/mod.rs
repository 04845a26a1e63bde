//! Shared helpers of the NBD integration tests: real peers (libnbd tools, QEMU, fio), images
//! made by qemu-img/qemu-io, our server running in-process on 127.0.0.1:0 and a unix socket,
//! and a small blocking client built on `diskstream_nbd::proto` for byte-level tests.
//!
//! A missing peer fails the test loudly: these tests exist to prove interoperability, so
//! skipping them would hide exactly what they check.
#![allow(dead_code)]

use diskstream_block::format::Format;
use diskstream_block::image::{open_image, OpenOptions};
use diskstream_block::node::BlockNode;
use diskstream_block::BlockBackend;
use diskstream_nbd::proto::*;
use diskstream_nbd::server::{Export, Listener, Server, ServerConfig};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Fail loudly when a peer tool is missing.
pub fn require(tool: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "test peer '{tool}' is missing: run `bash .ci/run` (installs qemu-utils, libnbd-bin, \
         python3-libnbd, nbdkit, fio) or apt-get install it"
    );
}

/// Run a command, panicking with its output unless it succeeds.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Stdout of a successful command.
pub fn stdout(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run(cmd).stdout).into_owned()
}

/// `qemu-img ARGS`, asserting success.
pub fn qemu_img(args: &[&str]) -> String {
    require("qemu-img");
    stdout(Command::new("qemu-img").args(args))
}

/// `qemu-io -f FMT -c CMD... FILE`, asserting success and that no command failed.
pub fn qemu_io(fmt: &str, file: &str, cmds: &[&str]) -> String {
    require("qemu-io");
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg(fmt);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    c.arg(file);
    let out = stdout(&mut c);
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io reported a failure:\n{out}"
    );
    out
}

/// A two-layer qcow2 chain with data, zero clusters, backing-only data and unallocated ranges:
/// returns the top image (64 MiB).
pub fn make_chain(dir: &Path) -> PathBuf {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    qemu_img(&["create", "-q", "-f", "qcow2", b, "64M"]);
    qemu_io(
        "qcow2",
        b,
        &[
            "write -P 0x11 0 4M",
            "write -P 0x22 16M 1M",
            "write -z 20M 1M",
            "write -P 0x23 30M 64k",
        ],
    );
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t]);
    qemu_io(
        "qcow2",
        t,
        &[
            "write -P 0x33 1M 1M",
            "write -z 3M 64k",
            "write -P 0x44 40M 512k",
            "write -z 30M 64k",
        ],
    );
    top
}

/// What to export in a [`TestServer`].
pub struct Spec {
    pub name: &'static str,
    pub description: &'static str,
    pub path: PathBuf,
    pub format: Option<Format>,
    pub read_only: bool,
    pub allocation_depth: bool,
    pub max_connections: usize,
}

impl Spec {
    pub fn new(name: &'static str, path: &Path) -> Self {
        Spec {
            name,
            description: "",
            path: path.to_path_buf(),
            format: None,
            read_only: false,
            allocation_depth: false,
            max_connections: 1,
        }
    }
}

/// Our server, in-process on its own runtime, listening on 127.0.0.1:0 and a unix socket.
pub struct TestServer {
    pub rt: tokio::runtime::Runtime,
    pub server: Server,
    pub port: u16,
    pub sock: PathBuf,
    pub nodes: Vec<Arc<dyn BlockNode>>,
    stopped: bool,
}

impl TestServer {
    /// Start serving `specs`; `tweak` may adjust the configuration (TLS, limits).
    pub fn start(dir: &Path, specs: Vec<Spec>, tweak: impl FnOnce(&mut ServerConfig)) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let sock = dir.join("nbd.sock");
        let (server, port, nodes) = rt.block_on(async {
            let mut exports = Vec::new();
            let mut nodes = Vec::new();
            for s in specs {
                let node = open_image(
                    &s.path,
                    &OpenOptions {
                        read_only: s.read_only,
                        format: s.format,
                        ..OpenOptions::default()
                    },
                )
                .await
                .unwrap_or_else(|e| panic!("open {}: {e}", s.path.display()));
                nodes.push(Arc::clone(&node));
                exports.push(Export {
                    name: s.name.into(),
                    description: s.description.into(),
                    backend: BlockBackend::new(node),
                    read_only: s.read_only,
                    allocation_depth: s.allocation_depth,
                    writethrough: false,
                    max_connections: s.max_connections,
                });
            }
            let mut cfg = ServerConfig::new(exports);
            tweak(&mut cfg);
            let server = Server::new(cfg).expect("server config");
            let tcp = Listener::bind_tcp("127.0.0.1:0").await.expect("bind tcp");
            let port = tcp.port().expect("port");
            let unix = Listener::bind_unix(&sock).expect("bind unix");
            for l in [tcp, unix] {
                let s = server.clone();
                tokio::spawn(async move { s.serve(l).await });
            }
            (server, port, nodes)
        });
        TestServer {
            rt,
            server,
            port,
            sock,
            nodes,
            stopped: false,
        }
    }

    /// `nbd://127.0.0.1:PORT/NAME`.
    pub fn tcp_uri(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{name}", self.port)
    }

    /// `nbd+unix:///NAME?socket=PATH`.
    pub fn unix_uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Current connection counters.
    pub fn counts(&self) -> diskstream_nbd::server::ConnCounts {
        *self.server.counts().borrow()
    }

    /// Wait until no connection is open (panics after `secs`).
    pub fn wait_idle(&self, secs: u64) {
        let s = self.server.clone();
        self.rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(secs), s.wait_idle())
                .await
                .expect("connections did not end")
        });
    }

    /// Shut down, wait for connections, close every node cleanly.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        self.server.shutdown();
        let s = self.server.clone();
        let nodes = std::mem::take(&mut self.nodes);
        self.rt.block_on(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), s.wait_idle()).await;
            for n in nodes {
                n.close().await.expect("close node");
            }
        });
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.stop_inner();
        }
    }
}

/// A process killed when dropped (qemu-nbd, our binary).
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Wait until `path` exists (a unix socket being created).
pub fn wait_for_path(path: &Path, secs: u64) {
    let t = Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Start `qemu-nbd ARGS -k SOCK FILE` and wait for its socket.
pub fn qemu_nbd(args: &[&str], sock: &Path, file: &Path) -> Proc {
    require("qemu-nbd");
    let child = Command::new("qemu-nbd")
        .args(args)
        .arg("-k")
        .arg(sock)
        .arg(file)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn qemu-nbd");
    let p = Proc(child);
    wait_for_path(sock, 10);
    p
}

/// `nbdsh` with the system Python first on PATH (the libnbd module is installed for it).
pub fn nbdsh() -> Command {
    require("nbdsh");
    let mut c = Command::new("nbdsh");
    let path = std::env::var("PATH").unwrap_or_default();
    c.env("PATH", format!("/usr/bin:/bin:{path}"));
    c
}

// ---------------------------------------------------------------------------------------------
// A blocking byte-level client on our codec
// ---------------------------------------------------------------------------------------------

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// One reply as received: every chunk (or the simple reply), and read data assembled.
#[derive(Debug, Default)]
pub struct Got {
    /// NBD error of the reply (first error chunk's, or the simple reply's).
    pub error: u32,
    /// Error message of a structured error chunk.
    pub message: String,
    /// Chunk types in arrival order (empty for a simple reply).
    pub kinds: Vec<u16>,
    /// Read data, holes filled with zeroes (only for reads).
    pub data: Vec<u8>,
    /// Block status chunks: context id and (length, flags) descriptors.
    pub status: Vec<(u32, Vec<(u64, u64)>)>,
    /// Extended reply headers' offset field (for checking it echoes the request).
    pub offsets: Vec<u64>,
}

/// A minimal blocking NBD client for byte-level tests.
pub struct RawClient {
    s: Box<dyn Stream>,
    pub mode: Mode,
    pending: HashMap<u64, (u16, u64, u64)>,
}

impl RawClient {
    /// Connect over TCP (10 s read timeout) without reading anything.
    pub fn tcp(addr: &str) -> Self {
        let s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
        RawClient {
            s: Box::new(s),
            mode: Mode::Simple,
            pending: HashMap::new(),
        }
    }

    /// Connect over a unix socket.
    pub fn unix(path: &Path) -> Self {
        let s = std::os::unix::net::UnixStream::connect(path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        RawClient {
            s: Box::new(s),
            mode: Mode::Simple,
            pending: HashMap::new(),
        }
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    /// Try to send; false if the peer is gone.
    pub fn try_send(&mut self, b: &[u8]) -> bool {
        self.s.write_all(b).is_ok()
    }

    pub fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).expect("recv");
        b
    }

    /// Whether the server closed the connection (EOF or reset) within the read timeout.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    /// Read the greeting and send client flags.
    pub fn hello(&mut self, flags: u32) -> Greeting {
        let g = Greeting::decode(&self.recv(Greeting::LEN)).expect("greeting");
        self.send(&ClientFlags(flags).encode());
        g
    }

    /// Send an option.
    pub fn option(&mut self, opt: u32, payload: &[u8]) {
        let mut v = Vec::new();
        encode_option(opt, payload, &mut v).unwrap();
        self.send(&v);
    }

    /// Read one option reply.
    pub fn reply(&mut self) -> (OptionReplyHeader, OptionReply) {
        let h = OptionReplyHeader::decode(&self.recv(OptionReplyHeader::LEN)).expect("header");
        let p = self.recv(h.length as usize);
        let r = OptionReply::decode(&h, &p).expect("option reply");
        (h, r)
    }

    /// Read option replies up to and including the final ACK or error.
    pub fn replies(&mut self) -> Vec<OptionReply> {
        let mut v = Vec::new();
        loop {
            let (_, r) = self.reply();
            let end = matches!(r, OptionReply::Ack | OptionReply::Error { .. });
            v.push(r);
            if end {
                return v;
            }
        }
    }

    /// Full handshake into transmission: mode, optional contexts, GO on `export`. Returns
    /// (size, transmission flags).
    pub fn start(addr: &str, mode: Mode, export: &str, contexts: &[&str]) -> (Self, u64, u16) {
        let mut c = RawClient::tcp(addr);
        c.hello(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        match mode {
            Mode::Simple => {}
            Mode::Structured => {
                c.option(OPT_STRUCTURED_REPLY, &[]);
                assert_eq!(c.reply().1, OptionReply::Ack);
            }
            Mode::Extended => {
                c.option(OPT_EXTENDED_HEADERS, &[]);
                assert_eq!(c.reply().1, OptionReply::Ack);
            }
        }
        if !contexts.is_empty() {
            let mut p = Vec::new();
            MetaContextRequest {
                export: export.into(),
                queries: contexts.iter().map(|s| s.to_string()).collect(),
            }
            .encode(&mut p)
            .unwrap();
            c.option(OPT_SET_META_CONTEXT, &p);
            let r = c.replies();
            assert_eq!(r.last(), Some(&OptionReply::Ack), "{r:?}");
        }
        let mut p = Vec::new();
        InfoRequest {
            name: export.into(),
            requests: vec![INFO_BLOCK_SIZE],
        }
        .encode(&mut p)
        .unwrap();
        c.option(OPT_GO, &p);
        let r = c.replies();
        assert_eq!(r.last(), Some(&OptionReply::Ack), "{r:?}");
        let (size, flags) = r
            .iter()
            .find_map(|x| match x {
                OptionReply::Info(Info::Export { size, flags }) => Some((*size, *flags)),
                _ => None,
            })
            .expect("INFO_EXPORT");
        c.mode = mode;
        (c, size, flags)
    }

    /// Send a request (with payload for writes), remembering it to parse the reply.
    pub fn request(
        &mut self,
        flags: u16,
        command: u16,
        cookie: u64,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) {
        let mut v = Vec::new();
        Request {
            flags,
            command,
            cookie,
            offset,
            length,
        }
        .encode(self.mode == Mode::Extended, &mut v)
        .unwrap();
        v.extend_from_slice(payload);
        self.pending.insert(cookie, (command, offset, length));
        self.send(&v);
    }

    /// Read one complete reply (all chunks up to DONE). Returns its cookie and contents.
    pub fn read_reply(&mut self) -> (u64, Got) {
        let mut got = Got::default();
        loop {
            let m = self.recv(4);
            let magic = u32::from_be_bytes([m[0], m[1], m[2], m[3]]);
            let hl =
                ReplyHeader::len_for_magic(magic).unwrap_or_else(|| panic!("bad magic {magic:#x}"));
            let mut hb = m;
            hb.extend_from_slice(&self.recv(hl - 4));
            match ReplyHeader::decode(&hb).expect("reply header") {
                ReplyHeader::Simple(s) => {
                    assert_ne!(self.mode, Mode::Extended, "simple reply in extended mode");
                    let (cmd, _, len) = self.pending.remove(&s.cookie).expect("unknown cookie");
                    got.error = s.error;
                    if cmd == CMD_READ && s.error == 0 {
                        got.data = self.recv(len as usize);
                    }
                    return (s.cookie, got);
                }
                ReplyHeader::Structured(c) | ReplyHeader::Extended(c) => {
                    let ext = matches!(ReplyHeader::decode(&hb), Ok(ReplyHeader::Extended(_)));
                    assert_eq!(ext, self.mode == Mode::Extended, "reply style");
                    let &(_, off, len) = self.pending.get(&c.cookie).expect("unknown cookie");
                    if ext {
                        got.offsets.push(c.offset);
                    }
                    let payload = self.recv(c.length as usize);
                    got.kinds.push(c.kind);
                    match Chunk::decode(c.kind, &payload).expect("chunk") {
                        Chunk::OffsetData { offset, data } => {
                            if got.data.is_empty() {
                                got.data = vec![0xee; len as usize];
                            }
                            let at = (offset - off) as usize;
                            got.data[at..at + data.len()].copy_from_slice(data);
                        }
                        Chunk::OffsetHole { offset, length } => {
                            if got.data.is_empty() {
                                got.data = vec![0xee; len as usize];
                            }
                            let at = (offset - off) as usize;
                            got.data[at..at + length as usize].fill(0);
                        }
                        Chunk::BlockStatus {
                            context_id,
                            extents,
                        }
                        | Chunk::BlockStatusExt {
                            context_id,
                            extents,
                        } => got.status.push((
                            context_id,
                            extents.iter().map(|e| (e.length, e.flags)).collect(),
                        )),
                        Chunk::Error { error, message }
                        | Chunk::ErrorOffset { error, message, .. } => {
                            got.error = error;
                            got.message = message;
                        }
                        Chunk::None | Chunk::UnknownError { .. } => {}
                    }
                    if c.done() {
                        self.pending.remove(&c.cookie);
                        return (c.cookie, got);
                    }
                }
            }
        }
    }

    /// Send a request and read its reply (nothing else may be in flight).
    pub fn call(
        &mut self,
        flags: u16,
        command: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> Got {
        self.request(flags, command, 1, offset, length, payload);
        let (cookie, got) = self.read_reply();
        assert_eq!(cookie, 1);
        got
    }
}
