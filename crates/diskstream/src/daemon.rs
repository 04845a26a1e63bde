//! `diskstream daemon`: a storage daemon controlled over QMP, accepting
//! qemu-storage-daemon's command line for what diskstream supports.
//!
//! ```text
//! diskstream daemon [--blockdev OPTS]... [--chardev socket,id=ID,path=P,server=on,wait=off]...
//!                   [--monitor [chardev=]ID]... [--pidfile PATH] [--daemonize]
//!                   [--stream-chunk-size BYTES] [--stream-parallel N]
//! ```
//! `--blockdev` takes QEMU's dotted `key=value` form (`driver=qcow2,node-name=top,
//! file.driver=file,file.filename=top.qcow2`) or JSON (`{"driver": ...}`). Without any
//! `--monitor`, a QMP socket is opened at [`default_socket`] so `diskstream daemon` alone is
//! usable. SIGTERM, SIGINT and the `quit` command shut down gracefully: jobs stop at a safe
//! point (in-flight copies land, nothing half-done is reported), every image is flushed and
//! closed, the sockets and pid file are removed.

use diskstream_jobs::StreamConfig;
use diskstream_qmp::schema::{check_blockdev_options, parse_keyval};
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

/// Parsed command line.
#[derive(Debug, Default)]
struct Config {
    blockdevs: Vec<(String, Map<String, Value>, bool)>,
    chardevs: HashMap<String, ListenAddr>,
    monitors: Vec<String>,
    pidfile: Option<PathBuf>,
    daemonize: bool,
    stream: StreamConfig,
}

const USAGE: &str = "usage: diskstream daemon [--blockdev OPTS]... [--chardev socket,id=ID,path=PATH,server=on,wait=off]... [--monitor [chardev=]ID]... [--pidfile PATH] [--daemonize] [--stream-chunk-size BYTES] [--stream-parallel N]";

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
                c.blockdevs.push((value, map, keyval));
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
            "--nbd-server" | "--export" => {
                return Err(format!(
                    "{name}: the NBD server is not part of this build yet (use QMP once it is)"
                ))
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
    for (text, map, keyval) in cfg.blockdevs {
        let mut map = map;
        let res = match check_blockdev_options(&mut map, "", keyval) {
            Ok(()) => mon.graph.lock().await.blockdev_add(&map).await,
            Err(e) => Err(e),
        };
        if let Err(e) = res {
            eprintln!("diskstream daemon: --blockdev {text}: {}", e.desc);
            mon.shutdown().await;
            return 1;
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
        assert_eq!(c.blockdevs.len(), 1);
        assert_eq!(
            c.chardevs.get("m"),
            Some(&ListenAddr::Unix(PathBuf::from("/tmp/x.sock")))
        );
        assert_eq!(c.monitors, vec!["m".to_string()]);
        assert_eq!(c.pidfile, Some(PathBuf::from("/tmp/p")));
    }
}
