//! `diskstream daemon`: a storage daemon controlled over QMP, accepting
//! qemu-storage-daemon's command line for what diskstream supports.
//!
//! ```text
//! diskstream daemon [--blockdev OPTS]... [--chardev socket,id=ID,path=P,server=on,wait=off]...
//!                   [--monitor [chardev=]ID]... [--nbd-server OPTS|none] [--export OPTS]...
//!                   [--object tls-creds-x509,id=ID,dir=DIR[,endpoint=server][,verify-peer=on|off]]...
//!                   [--pidfile PATH] [--daemonize] [--stream-chunk-size BYTES] [--stream-parallel N]
//!                   [--stream-busy-parallel N] [--stream-checkpoint SECS]
//! ```
//! `--blockdev` takes QEMU's dotted `key=value` form (`driver=qcow2,node-name=top,
//! file.driver=file,file.filename=top.qcow2`) or JSON (`{"driver": ...}`); `--nbd-server`
//! (`addr.type=unix,addr.path=P` or `addr.type=inet,addr.host=H,addr.port=N`, plus
//! `max-connections`, `tls-creds`, `handshake-max-seconds`) and `--export` (`type=nbd,id=..,
//! node-name=..,writable=on,name=..`) take QSD's forms too, and everything is applied in
//! command-line order, as QSD does.
//!
//! Friendly defaults: without any `--monitor`, a QMP socket is opened at [`default_socket`],
//! and, unless `--nbd-server` is given, an NBD server on [`DEFAULT_NBD_ADDR`] (loopback only),
//! so `diskstream daemon` alone is usable: add a node and an export over QMP and any NBD
//! client can reach it. When that default port is taken the daemon warns and runs without an
//! NBD server (`nbd-server-start` still works). SIGTERM, SIGINT and the `quit` command shut down gracefully: jobs stop at a safe
//! point (in-flight copies land, nothing half-done is reported), every image is flushed and
//! closed, the sockets and pid file are removed.

use diskstream_jobs::StreamConfig;
use diskstream_qmp::export::{check_export_options, NbdAddr, NbdServerOptions, NBD_SERVER_CLI};
use diskstream_qmp::schema::{check_blockdev_options, check_object, parse_keyval};
use diskstream_qmp::server::{ListenAddr, Listener};
use diskstream_qmp::Monitor;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// The QMP socket used when no `--monitor` is given: `$XDG_RUNTIME_DIR/diskstream/qmp.sock`,
/// or `/tmp/diskstream-$UID/qmp.sock` without `XDG_RUNTIME_DIR`.
pub fn default_socket() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("diskstream").join("qmp.sock"),
        // SAFETY: getuid has no preconditions.
        _ => {
            PathBuf::from(format!("/tmp/diskstream-{}", unsafe { libc::getuid() })).join("qmp.sock")
        }
    }
}

/// The NBD server of a daemon started without `--monitor` or `--nbd-server`: the IANA NBD
/// port on loopback, so nothing is exposed to the network by default.
pub const DEFAULT_NBD_ADDR: (&str, u16) = ("127.0.0.1", 10809);

/// A command-line item applied at startup, in command-line order.
#[derive(Debug)]
enum Item {
    /// `--blockdev` (text, options, keyval form).
    Blockdev(String, Map<String, Value>, bool),
    /// `--nbd-server`.
    NbdServer(String, NbdServerOptions),
    /// `--export` (validated options).
    Export(String, Map<String, Value>),
    /// `--object tls-creds-x509`: id, directory, verify-peer.
    TlsCreds(String, PathBuf, bool),
}

/// Parsed command line.
#[derive(Debug, Default)]
struct Config {
    items: Vec<Item>,
    /// `--nbd-server none`: no default NBD server.
    no_nbd_server: bool,
    chardevs: HashMap<String, ListenAddr>,
    monitors: Vec<String>,
    pidfile: Option<PathBuf>,
    daemonize: bool,
    stream: StreamConfig,
}

const USAGE: &str = "usage: diskstream daemon [--blockdev OPTS]... [--chardev socket,id=ID,path=PATH,server=on,wait=off]... [--monitor [chardev=]ID]...
                         [--nbd-server addr.type=unix,addr.path=PATH|addr.type=inet,addr.host=H,addr.port=P[,max-connections=N][,tls-creds=ID]|none]
                         [--export type=nbd,id=ID,node-name=NODE[,name=NAME][,writable=on][,description=TEXT][,allocation-depth=on]]...
                         [--object tls-creds-x509,id=ID,dir=DIR[,endpoint=server][,verify-peer=on|off]]...
                         [--pidfile PATH] [--daemonize] [--stream-chunk-size BYTES] [--stream-parallel N]
                         [--stream-busy-parallel N] [--stream-checkpoint SECS]

Without --monitor, QMP listens on $XDG_RUNTIME_DIR/diskstream/qmp.sock (or /tmp/diskstream-$UID/qmp.sock)
and, unless --nbd-server is given, an NBD server listens on 127.0.0.1:10809 (--nbd-server none: no server).";

fn parse_args(args: &[String]) -> Result<Config, String> {
    let mut c = Config::default();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let takes_value = !matches!(name.as_str(), "--daemonize" | "-h" | "--help");
        let value = if takes_value {
            match inline {
                Some(v) => v,
                None => {
                    i += 1;
                    args.get(i)
                        .cloned()
                        .ok_or_else(|| format!("option '{name}' needs a value"))?
                }
            }
        } else {
            String::new()
        };
        match name.as_str() {
            "-h" | "--help" => return Err(USAGE.to_string()),
            "--daemonize" => c.daemonize = true,
            "--pidfile" => c.pidfile = Some(PathBuf::from(value)),
            "--blockdev" => {
                let (map, keyval) = if value.trim_start().starts_with('{') {
                    match serde_json::from_str::<Value>(&value) {
                        Ok(Value::Object(m)) => (m, false),
                        _ => return Err(format!("--blockdev {value}: invalid JSON object")),
                    }
                } else {
                    (
                        parse_keyval(&value).map_err(|e| format!("--blockdev {value}: {e}"))?,
                        true,
                    )
                };
                c.items.push(Item::Blockdev(value, map, keyval));
            }
            "--chardev" => {
                let (backend, rest) = value.split_once(',').unwrap_or((value.as_str(), ""));
                if backend != "socket" {
                    return Err(format!(
                        "--chardev {value}: only 'socket' chardevs are supported"
                    ));
                }
                let kv = parse_keyval(rest).map_err(|e| format!("--chardev {value}: {e}"))?;
                let get = |k: &str| kv.get(k).and_then(|v| v.as_str()).map(str::to_string);
                let id = get("id").ok_or_else(|| format!("--chardev {value}: 'id' is missing"))?;
                if get("server").as_deref().is_some_and(|s| s != "on") {
                    return Err(format!(
                        "--chardev {value}: only server=on sockets are supported"
                    ));
                }
                let addr = match (get("path"), get("host"), get("port")) {
                    (Some(p), _, _) => ListenAddr::Unix(PathBuf::from(p)),
                    (None, h, Some(port)) => ListenAddr::Tcp(format!(
                        "{}:{port}",
                        h.unwrap_or_else(|| "127.0.0.1".to_string())
                    )),
                    _ => return Err(format!("--chardev {value}: 'path' or 'port' is required")),
                };
                c.chardevs.insert(id, addr);
            }
            "--monitor" => {
                let mut chardev = None;
                for part in value.split(',') {
                    match part.split_once('=') {
                        Some(("chardev", v)) => chardev = Some(v.to_string()),
                        Some(("mode", "control")) | Some(("pretty", "off")) => {}
                        Some((k, v)) => {
                            return Err(format!("--monitor {value}: unsupported {k}={v}"))
                        }
                        None => chardev = Some(part.to_string()),
                    }
                }
                c.monitors
                    .push(chardev.ok_or_else(|| format!("--monitor {value}: chardev missing"))?);
            }
            "--stream-chunk-size" => {
                c.stream.chunk_size = value
                    .parse()
                    .map_err(|_| format!("--stream-chunk-size {value}: not a number"))?;
            }
            "--stream-parallel" => {
                c.stream.parallel = value
                    .parse()
                    .map_err(|_| format!("--stream-parallel {value}: not a number"))?;
            }
            "--stream-busy-parallel" => {
                c.stream.busy_parallel = value
                    .parse()
                    .map_err(|_| format!("--stream-busy-parallel {value}: not a number"))?;
            }
            "--stream-checkpoint" => {
                let secs: f64 = value
                    .parse()
                    .ok()
                    .filter(|v: &f64| v.is_finite() && *v >= 0.0)
                    .ok_or_else(|| {
                        format!("--stream-checkpoint {value}: not a number of seconds")
                    })?;
                c.stream.checkpoint =
                    (secs > 0.0).then(|| std::time::Duration::from_secs_f64(secs));
            }
            "--nbd-server" if value == "none" => c.no_nbd_server = true,
            "--nbd-server" => {
                let mut map =
                    parse_keyval(&value).map_err(|e| format!("--nbd-server {value}: {e}"))?;
                check_object(&mut map, NBD_SERVER_CLI, "", true)
                    .map_err(|e| format!("--nbd-server {value}: {}", e.desc))?;
                let o = NbdServerOptions::from_args(&map, false)
                    .map_err(|e| format!("--nbd-server {value}: {}", e.desc))?;
                c.items.push(Item::NbdServer(value, o));
            }
            "--export" => {
                let mut map = parse_keyval(&value).map_err(|e| format!("--export {value}: {e}"))?;
                check_export_options(&mut map, true)
                    .map_err(|e| format!("--export {value}: {}", e.desc))?;
                c.items.push(Item::Export(value, map));
            }
            "--object" => {
                let (kind, rest) = value.split_once(',').unwrap_or((value.as_str(), ""));
                if kind != "tls-creds-x509" {
                    return Err(format!(
                        "--object {value}: only tls-creds-x509 objects are supported"
                    ));
                }
                let kv = parse_keyval(rest).map_err(|e| format!("--object {value}: {e}"))?;
                let get = |k: &str| kv.get(k).and_then(|v| v.as_str()).map(str::to_string);
                let id = get("id")
                    .ok_or_else(|| format!("--object {value}: Parameter 'id' is missing"))?;
                let dir = get("dir")
                    .ok_or_else(|| format!("--object {value}: Parameter 'dir' is missing"))?;
                if get("endpoint").is_some_and(|e| e != "server") {
                    return Err(format!(
                        "--object {value}: the daemon only serves (endpoint=server)"
                    ));
                }
                let verify = match get("verify-peer").as_deref() {
                    None | Some("on" | "yes" | "true") => true,
                    Some("off" | "no" | "false") => false,
                    Some(v) => {
                        return Err(format!(
                            "--object {value}: verify-peer={v}: expected on or off"
                        ))
                    }
                };
                c.items.push(Item::TlsCreds(id, PathBuf::from(dir), verify));
            }
            other => return Err(format!("unknown option '{other}'\n{USAGE}")),
        }
        i += 1;
    }
    Ok(c)
}

/// Entry point; returns the process exit code. Runs its own runtime because `--daemonize`
/// must fork before any thread exists.
pub fn main(args: Vec<String>) -> u8 {
    let cfg = match parse_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("diskstream daemon: {e}");
            return 1;
        }
    };
    let mut ready_fd: Option<i32> = None;
    if cfg.daemonize {
        match daemonize() {
            Ok(Some(fd)) => ready_fd = Some(fd),
            Ok(None) => return 0, // unreachable: the parent exits inside daemonize()
            Err(e) => {
                eprintln!("diskstream daemon: cannot daemonize: {e}");
                return 1;
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("diskstream daemon: cannot start the runtime: {e}");
            return 1;
        }
    };
    rt.block_on(run(cfg, ready_fd))
}

/// Fork; the parent waits for the child's readiness byte and exits with its status. Returns
/// the write end of the readiness pipe in the child.
fn daemonize() -> std::io::Result<Option<i32>> {
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid two-element array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: no other thread exists yet (the runtime is built after this).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid > 0 {
        // SAFETY: closing our copy of the write end; reading one byte into a valid buffer.
        unsafe { libc::close(fds[1]) };
        let mut b = [0u8; 1];
        let n = unsafe { libc::read(fds[0], b.as_mut_ptr().cast(), 1) };
        std::process::exit(if n == 1 && b[0] == b'0' { 0 } else { 1 });
    }
    // SAFETY: child: own session, keep the write end only.
    unsafe {
        libc::close(fds[0]);
        libc::setsid();
    }
    Ok(Some(fds[1]))
}

fn signal_ready(fd: Option<i32>) {
    if let Some(fd) = fd {
        // SAFETY: fd is the pipe's write end we own; redirecting stdio to /dev/null as a
        // daemon does once it reported success.
        unsafe {
            libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
            if null >= 0 {
                libc::dup2(null, 0);
                libc::dup2(null, 1);
                libc::dup2(null, 2);
                if null > 2 {
                    libc::close(null);
                }
            }
        }
    }
}

async fn run(cfg: Config, ready_fd: Option<i32>) -> u8 {
    let mon = Monitor::new(cfg.stream);
    let friendly = cfg.monitors.is_empty();
    let mut nbd_given = cfg.no_nbd_server;
    for item in cfg.items {
        let (what, text, res) = match item {
            Item::Blockdev(text, mut map, keyval) => {
                let res = match check_blockdev_options(&mut map, "", keyval) {
                    Ok(()) => mon.graph.lock().await.blockdev_add(&map).await,
                    Err(e) => Err(e),
                };
                ("--blockdev", text, res)
            }
            Item::NbdServer(text, o) => {
                nbd_given = true;
                let res = mon.exports.start_server(&o).await.map(|addr| {
                    eprintln!("diskstream daemon: NBD server on {addr}");
                });
                ("--nbd-server", text, res)
            }
            Item::Export(text, map) => ("--export", text, mon.exports.add(&mon, &map).await),
            Item::TlsCreds(id, dir, verify) => {
                let res = match diskstream_nbd::server::tls_config_from_x509_dir(&dir, verify) {
                    Ok(t) => mon.exports.add_tls_creds(&id, t),
                    Err(e) => Err(diskstream_qmp::QmpError::generic(e.to_string())),
                };
                ("--object", format!("tls-creds-x509,id={id}"), res)
            }
        };
        if let Err(e) = res {
            eprintln!("diskstream daemon: {what} {text}: {}", e.desc);
            mon.shutdown().await;
            return 1;
        }
    }
    if friendly && !nbd_given {
        let (host, port) = DEFAULT_NBD_ADDR;
        let o = NbdServerOptions::new(NbdAddr::Inet {
            host: host.to_string(),
            port: port.to_string(),
        });
        match mon.exports.start_server(&o).await {
            Ok(addr) => eprintln!("diskstream daemon: NBD server on {addr}"),
            Err(e) => eprintln!(
                "diskstream daemon: warning: no default NBD server on {host}:{port}: {} (use nbd-server-start)",
                e.desc
            ),
        }
    }
    let mut addrs = Vec::new();
    for m in &cfg.monitors {
        match cfg.chardevs.get(m) {
            Some(a) => addrs.push(a.clone()),
            None => {
                eprintln!("diskstream daemon: --monitor {m}: chardev '{m}' not found");
                return 1;
            }
        }
    }
    if addrs.is_empty() {
        let p = default_socket();
        if let Some(dir) = p.parent() {
            if let Err(e) = std::fs::create_dir_all(dir) {
                eprintln!("diskstream daemon: cannot create {}: {e}", dir.display());
                return 1;
            }
        }
        eprintln!("diskstream daemon: QMP socket at {}", p.display());
        addrs.push(ListenAddr::Unix(p));
    }
    let mut listeners = Vec::new();
    for a in &addrs {
        match Listener::bind(a).await {
            Ok(l) => listeners.push(l),
            Err(e) => {
                eprintln!("diskstream daemon: cannot listen on {a:?}: {e}");
                return 1;
            }
        }
    }
    let paths: Vec<PathBuf> = listeners.iter().filter_map(|l| l.path()).collect();
    if let Some(p) = &cfg.pidfile {
        if let Err(e) = std::fs::write(p, format!("{}\n", std::process::id())) {
            eprintln!(
                "diskstream daemon: cannot write pid file {}: {e}",
                p.display()
            );
            return 1;
        }
    }
    for l in listeners {
        tokio::spawn(l.run(Arc::clone(&mon)));
    }
    signal_ready(ready_fd);
    wait_for_shutdown(&mon).await;
    mon.shutdown().await;
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
    if let Some(p) = &cfg.pidfile {
        let _ = std::fs::remove_file(p);
    }
    0
}

async fn wait_for_shutdown(mon: &Arc<Monitor>) {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
                _ = mon.shutdown_requested() => {}
            }
        }
        _ => mon.shutdown_requested().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qsd_command_line() {
        let args: Vec<String> = [
            "--blockdev",
            "driver=file,node-name=f,filename=a.qcow2",
            "--chardev",
            "socket,id=m,path=/tmp/x.sock,server=on,wait=off",
            "--monitor",
            "chardev=m",
            "--pidfile=/tmp/p",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let c = parse_args(&args).expect("parse");
        assert_eq!(c.items.len(), 1);
        assert_eq!(
            c.chardevs.get("m"),
            Some(&ListenAddr::Unix(PathBuf::from("/tmp/x.sock")))
        );
        assert_eq!(c.monitors, vec!["m".to_string()]);
        assert_eq!(c.pidfile, Some(PathBuf::from("/tmp/p")));
    }

    #[test]
    fn parses_nbd_server_and_export() {
        let args: Vec<String> = [
            "--nbd-server",
            "addr.type=inet,addr.host=127.0.0.1,addr.port=10810,max-connections=4",
            "--export",
            "type=nbd,id=e,node-name=top,writable=on,name=disk",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let c = parse_args(&args).expect("parse");
        match &c.items[0] {
            Item::NbdServer(_, o) => {
                assert_eq!(o.max_connections, 4);
                assert_eq!(
                    o.addr,
                    NbdAddr::Inet {
                        host: "127.0.0.1".into(),
                        port: "10810".into()
                    }
                );
            }
            other => panic!("{other:?}"),
        }
        match &c.items[1] {
            Item::Export(_, m) => assert_eq!(m.get("writable"), Some(&Value::Bool(true))),
            other => panic!("{other:?}"),
        }
        let bad: Vec<String> = ["--nbd-server", "addr.type=unix"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let e = parse_args(&bad).expect_err("missing path");
        assert!(e.contains("Parameter 'addr.path' is missing"), "{e}");
    }
}
