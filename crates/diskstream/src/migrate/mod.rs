//! `diskstream migrate`: post-copy block migration between two daemons over NBD, driven over
//! their QMP sockets.
//!
//! The sequence (QEMU's post-copy recipe; every step is an ordinary QMP command, so the same
//! migration can be scripted by hand, see README.md and `examples/migrate-postcopy.py`):
//!
//! 1. source: `nbd-server-start` (unless running), `block-export-add` of the node, read-only;
//! 2. destination: a qcow2 is created whose backing file is the source's `nbd://` URL with an
//!    explicit backing format (`raw`: an export serves guest data); `blockdev-add` of an `nbd`
//!    node (with `reconnect-delay`/`open-timeout`) and of the qcow2 on top of it; a writable
//!    `block-export-add` for the guest;
//! 3. switch: the destination URL is printed, `--switch-command` moves the guest, and
//!    `--source-guest-export` is removed from the source so nothing can write there any more;
//! 4. destination: `block-stream` with a copy-on-read filter (`filter-node-name`), so guest
//!    reads of data not copied yet are fetched once and kept; progress with ETA from
//!    `query-block-jobs`; I/O errors follow `on-error` (with `stop`, bounded retries with
//!    backoff resume the job); completion drops the backing link (crash-safe in the daemon);
//! 5. the `nbd` node is deleted on the destination and the source export removed.
//!
//! `--resume` picks up a migration whose driver or destination daemon died: an existing image
//! is reopened (streaming copies only what it does not hold yet), an existing job is attached
//! to (and resumed if it stopped on an error).

mod qmp;

use qmp::{Qmp, QmpFailure};
use serde_json::{json, Value};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Exit code: migration finished.
pub const EXIT_OK: u8 = 0;
/// Exit code: setup failed or was refused (arguments, QMP errors before streaming).
pub const EXIT_SETUP: u8 = 1;
/// Exit code: the stream job failed (`on-error=report`) or was cancelled.
pub const EXIT_JOB_FAILED: u8 = 2;
/// Exit code: the job stopped on errors beyond the retry budget; it stays paused and keeps its
/// data (`block-job-resume`, or `migrate --resume`).
pub const EXIT_STOPPED: u8 = 3;
/// Exit code: a daemon's QMP connection was lost during the stream (`--resume` continues).
pub const EXIT_LOST: u8 = 4;

/// Arguments of `diskstream migrate`.
#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    /// QMP socket of the source daemon (unix socket path, or HOST:PORT).
    #[arg(long)]
    source_qmp: String,
    /// Node to migrate on the source (the guest's disk).
    #[arg(long)]
    source_node: String,
    /// QMP socket of the destination daemon.
    #[arg(long)]
    dest_qmp: String,
    /// qcow2 image to create on the destination (a path the destination daemon opens: run
    /// migrate on the destination host).
    #[arg(long)]
    dest_image: PathBuf,
    /// Source NBD server address as the destination reaches it: HOST:PORT or unix:PATH. It is
    /// started there if not running yet.
    #[arg(long, default_value = "127.0.0.1:10809")]
    source_nbd: String,
    /// Export name on the source (default: migrate-NODE).
    #[arg(long)]
    source_export: Option<String>,
    /// Destination NBD server address the guest connects to: HOST:PORT or unix:PATH.
    #[arg(long, default_value = "127.0.0.1:10809")]
    dest_nbd: String,
    /// Node name of the destination image.
    #[arg(long, default_value = "migrate-dst")]
    dest_node: String,
    /// Export name of the destination image for the guest (default: the destination node name).
    #[arg(long)]
    dest_export: Option<String>,
    /// Stream speed limit, bytes per second (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    speed: u64,
    /// Seconds the destination's NBD client waits for the source to come back before requests
    /// (stream copies, guest reads of missing data) fail with EIO.
    #[arg(long, default_value_t = 10)]
    reconnect_delay: u32,
    /// Seconds to keep retrying the first connection to the source.
    #[arg(long, default_value_t = 10)]
    open_timeout: u32,
    /// What the stream job does on an I/O error: `stop` (pause, keep the data; migrate resumes
    /// it up to --retries times) or `report` (fail the job).
    #[arg(long, default_value = "stop", value_parser = ["stop", "report"])]
    on_error: String,
    /// Resumes after errors with on-error=stop before giving up (the counter restarts whenever
    /// the job makes progress).
    #[arg(long, default_value_t = 3)]
    retries: u32,
    /// Seconds before the first resume; doubles with every retry in a row.
    #[arg(long, default_value_t = 1.0)]
    retry_delay: f64,
    /// Shell command that moves the guest to the destination (run with
    /// DISKSTREAM_MIGRATE_DEST_URL set); streaming starts once it exits with status 0.
    #[arg(long)]
    switch_command: Option<String>,
    /// The guest's writable export on the source (its id): removed at the switch, so the source
    /// cannot receive a write after it.
    #[arg(long)]
    source_guest_export: Option<String>,
    /// Continue a migration: reuse the existing destination image, nodes, exports or job.
    #[arg(long)]
    resume: bool,
    /// Cluster size of the destination image.
    #[arg(long, default_value_t = 65536)]
    cluster_size: u64,
    /// Milliseconds between progress reports.
    #[arg(long, default_value_t = 1000)]
    progress_interval: u64,
    /// Job id of the stream on the destination.
    #[arg(long, default_value = "migrate")]
    job_id: String,
    /// Leave the source export in place after completion.
    #[arg(long)]
    keep_source_export: bool,
}

/// A failure with the exit code it maps to.
struct Fail {
    code: u8,
    msg: String,
}

impl Fail {
    fn setup(msg: impl Into<String>) -> Fail {
        Fail {
            code: EXIT_SETUP,
            msg: msg.into(),
        }
    }
}

/// Map a QMP failure at `what` to a setup failure.
fn at(what: &'static str) -> impl Fn(QmpFailure) -> Fail {
    move |e| Fail::setup(format!("{what}: {e}"))
}

/// An NBD server address as QMP (`SocketAddressLegacy`, `SocketAddress`) and URLs spell it.
#[derive(Clone, Debug, PartialEq)]
enum Addr {
    Inet { host: String, port: String },
    Unix(String),
}

impl Addr {
    fn parse(s: &str) -> Result<Addr, Fail> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Addr::Unix(p.to_string()));
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| Fail::setup(format!("'{s}' is not HOST:PORT or unix:PATH")))?;
        if port.parse::<u16>().is_err() {
            return Err(Fail::setup(format!("'{s}': invalid port '{port}'")));
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Ok(Addr::Inet {
            host: host.to_string(),
            port: port.to_string(),
        })
    }

    /// `nbd-server-start`'s legacy form.
    fn legacy(&self) -> Value {
        match self {
            Addr::Inet { host, port } => {
                json!({"type": "inet", "data": {"host": host, "port": port}})
            }
            Addr::Unix(p) => json!({"type": "unix", "data": {"path": p}}),
        }
    }

    /// `blockdev-add driver=nbd`'s `server`.
    fn flat(&self) -> Value {
        match self {
            Addr::Inet { host, port } => json!({"type": "inet", "host": host, "port": port}),
            Addr::Unix(p) => json!({"type": "unix", "path": p}),
        }
    }

    /// The URL QEMU and libnbd understand.
    fn url(&self, export: &str) -> String {
        match self {
            Addr::Inet { host, port } if host.contains(':') => {
                format!("nbd://[{host}]:{port}/{export}")
            }
            Addr::Inet { host, port } => format!("nbd://{host}:{port}/{export}"),
            Addr::Unix(p) => format!("nbd+unix:///{export}?socket={p}"),
        }
    }
}

/// Run the subcommand; returns the exit code.
pub async fn run(args: MigrateArgs) -> u8 {
    match migrate(&args).await {
        Ok(()) => EXIT_OK,
        Err(f) => {
            eprintln!("diskstream migrate: {}", f.msg);
            f.code
        }
    }
}

fn say(msg: impl AsRef<str>) {
    eprintln!("migrate: {}", msg.as_ref());
}

/// What was set up so far, undone if setup fails before the guest switched.
#[derive(Default)]
struct Undo {
    source_export: Option<String>,
    dest_export: Option<String>,
    dest_nodes: Vec<String>,
    image: Option<PathBuf>,
}

impl Undo {
    async fn run(self, src: &mut Qmp, dst: &mut Qmp) {
        if let Some(id) = self.dest_export {
            let _ = dst
                .execute("block-export-del", json!({"id": id, "mode": "hard"}))
                .await;
        }
        for n in self.dest_nodes.iter().rev() {
            let _ = dst.execute("blockdev-del", json!({"node-name": n})).await;
        }
        if let Some(id) = self.source_export {
            let _ = src
                .execute("block-export-del", json!({"id": id, "mode": "hard"}))
                .await;
        }
        if let Some(p) = self.image {
            let _ = std::fs::remove_file(p);
        }
    }
}

async fn migrate(a: &MigrateArgs) -> Result<(), Fail> {
    let source_nbd = Addr::parse(&a.source_nbd)?;
    let dest_nbd = Addr::parse(&a.dest_nbd)?;
    if a.dest_node.is_empty() || a.source_node.is_empty() {
        return Err(Fail::setup("node names must not be empty"));
    }
    let source_export = a
        .source_export
        .clone()
        .unwrap_or_else(|| format!("migrate-{}", a.source_node));
    let dest_export = a.dest_export.clone().unwrap_or_else(|| a.dest_node.clone());
    let backing_node = format!("{}-source", a.dest_node);
    let source_export_id = format!("migrate-src-{source_export}");
    let dest_export_id = format!("migrate-dst-{dest_export}");
    let source_url = source_nbd.url(&source_export);
    let dest_url = dest_nbd.url(&dest_export);

    let mut src = Qmp::connect("source", &a.source_qmp)
        .await
        .map_err(|e| Fail::setup(e.to_string()))?;
    let mut dst = Qmp::connect("destination", &a.dest_qmp)
        .await
        .map_err(|e| Fail::setup(e.to_string()))?;

    // An existing job means a previous run got as far as streaming: only watch it.
    let jobs = dst
        .execute("query-block-jobs", json!({}))
        .await
        .map_err(at("destination query-block-jobs"))?;
    let job_exists = jobs
        .as_array()
        .is_some_and(|j| j.iter().any(|j| j["device"] == json!(a.job_id)));
    if job_exists && !a.resume {
        return Err(Fail::setup(format!(
            "destination already runs a job '{}'; pass --resume to attach to it",
            a.job_id
        )));
    }

    let mut undo = Undo::default();
    if !job_exists {
        let r = setup(
            a,
            &mut src,
            &mut dst,
            &mut undo,
            &source_nbd,
            &dest_nbd,
            &source_export,
            &source_export_id,
            &dest_export,
            &dest_export_id,
            &backing_node,
            &source_url,
        )
        .await;
        if let Err(f) = r {
            if !a.resume {
                undo.run(&mut src, &mut dst).await;
            }
            return Err(f);
        }
        println!("destination: {dest_url}");
        let _ = std::io::stdout().flush();
        if !a.resume {
            switch(a, &mut src, &dest_url).await?;
        }
        let mut stream = json!({
            "job-id": a.job_id,
            "device": a.dest_node,
            "on-error": a.on_error,
            "filter-node-name": format!("{}-cor", a.dest_node),
        });
        if a.speed > 0 {
            stream["speed"] = json!(a.speed);
        }
        dst.execute("block-stream", stream)
            .await
            .map_err(at("destination block-stream"))?;
        say(format!(
            "streaming {source_url} into {}",
            a.dest_image.display()
        ));
    } else {
        println!("destination: {dest_url}");
        let _ = std::io::stdout().flush();
        say(format!("attached to the running job '{}'", a.job_id));
        resume_if_paused(&mut dst, &a.job_id).await;
    }

    watch(a, &mut dst).await?;

    // The backing link must be gone from the image before the source may go away.
    let nodes = dst
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .map_err(|e| Fail {
            code: EXIT_LOST,
            msg: format!("destination query-named-block-nodes: {e}"),
        })?;
    let top = nodes
        .as_array()
        .and_then(|n| n.iter().find(|n| n["node-name"] == json!(a.dest_node)));
    if let Some(t) = top {
        if t.get("backing_file").is_some() {
            return Err(Fail {
                code: EXIT_JOB_FAILED,
                msg: format!(
                    "the stream completed but '{}' still has a backing file ({})",
                    a.dest_node, t["backing_file"]
                ),
            });
        }
    }
    if let Err(e) = dst
        .execute("blockdev-del", json!({"node-name": backing_node}))
        .await
    {
        say(format!(
            "note: destination blockdev-del {backing_node}: {e}"
        ));
    }
    if !a.keep_source_export {
        let del = json!({"id": source_export_id, "mode": "hard"});
        let mut r = src.execute("block-export-del", del.clone()).await;
        if let Err(QmpFailure::Io(_)) = r {
            // The source daemon restarted during the stream: talk to the new one.
            r = match Qmp::connect("source", &a.source_qmp).await {
                Ok(mut s2) => s2.execute("block-export-del", del).await,
                Err(e) => Err(e),
            };
        }
        match r {
            Ok(_) => say(format!("source export '{source_export}' removed")),
            Err(e) => say(format!("note: source block-export-del: {e}")),
        }
    }
    say(format!(
        "done: {} holds the whole disk, no backing file; the guest uses {dest_url}",
        a.dest_image.display()
    ));
    Ok(())
}

/// Steps 1 and 2: the source export, the destination image, nodes and export. With
/// `--resume`, whatever exists already is reused.
#[allow(clippy::too_many_arguments)]
async fn setup(
    a: &MigrateArgs,
    src: &mut Qmp,
    dst: &mut Qmp,
    undo: &mut Undo,
    source_nbd: &Addr,
    dest_nbd: &Addr,
    source_export: &str,
    source_export_id: &str,
    dest_export: &str,
    dest_export_id: &str,
    backing_node: &str,
    source_url: &str,
) -> Result<(), Fail> {
    // Source: size of the node, NBD server, read-only export.
    let nodes = src
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .map_err(at("source query-named-block-nodes"))?;
    let node = nodes
        .as_array()
        .and_then(|n| n.iter().find(|n| n["node-name"] == json!(a.source_node)))
        .ok_or_else(|| Fail::setup(format!("source has no node named '{}'", a.source_node)))?;
    let size = node["image"]["virtual-size"]
        .as_u64()
        .ok_or_else(|| Fail::setup("source did not report the node's virtual-size"))?;
    start_server(src, source_nbd, "source").await?;
    let exports = src
        .execute("query-block-exports", json!({}))
        .await
        .map_err(at("source query-block-exports"))?;
    let have = |ex: &Value, id: &str| {
        ex.as_array()
            .is_some_and(|e| e.iter().any(|e| e["id"] == json!(id)))
    };
    if !have(&exports, source_export_id) {
        src.execute(
            "block-export-add",
            json!({"type": "nbd", "id": source_export_id, "node-name": a.source_node,
                   "name": source_export, "writable": false}),
        )
        .await
        .map_err(at("source block-export-add"))?;
        undo.source_export = Some(source_export_id.to_string());
    }
    say(format!(
        "source exports '{}' read-only as {source_url} ({size} bytes)",
        a.source_node
    ));

    // Destination image.
    let exists = a.dest_image.exists();
    if exists && !a.resume {
        return Err(Fail::setup(format!(
            "{} exists; pass --resume to continue a migration into it",
            a.dest_image.display()
        )));
    }
    if !exists {
        if a.resume {
            say(format!(
                "{} does not exist: starting a new migration",
                a.dest_image.display()
            ));
        }
        let opts = diskstream_block::format::qcow2::create::CreateOptions {
            size,
            cluster_size: a.cluster_size,
            backing_file: Some(source_url.to_string()),
            backing_fmt: Some("raw".to_string()),
            ..Default::default()
        };
        diskstream_block::format::qcow2::create::create(&a.dest_image, &opts)
            .await
            .map_err(|e| Fail::setup(format!("{}: {e}", a.dest_image.display())))?;
        undo.image = Some(a.dest_image.clone());
    }
    let image = std::fs::canonicalize(&a.dest_image)
        .map_err(|e| Fail::setup(format!("{}: {e}", a.dest_image.display())))?;

    // Destination nodes: nbd (the source) under the qcow2.
    let dnodes = dst
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .map_err(at("destination query-named-block-nodes"))?;
    let dhave = |name: &str| {
        dnodes
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n["node-name"] == json!(name)))
    };
    if dhave(&a.dest_node) {
        if !a.resume {
            return Err(Fail::setup(format!(
                "destination already has a node '{}'; pass --resume or another --dest-node",
                a.dest_node
            )));
        }
    } else {
        if !dhave(backing_node) {
            dst.execute(
                "blockdev-add",
                json!({"driver": "nbd", "node-name": backing_node, "read-only": true,
                       "server": source_nbd.flat(), "export": source_export,
                       "reconnect-delay": a.reconnect_delay, "open-timeout": a.open_timeout}),
            )
            .await
            .map_err(at("destination blockdev-add nbd"))?;
            undo.dest_nodes.push(backing_node.to_string());
        }
        dst.execute(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": a.dest_node,
                   "file": {"driver": "file", "filename": image.display().to_string()},
                   "backing": backing_node}),
        )
        .await
        .map_err(at("destination blockdev-add qcow2"))?;
        undo.dest_nodes.push(a.dest_node.clone());
    }
    start_server(dst, dest_nbd, "destination").await?;
    let dexports = dst
        .execute("query-block-exports", json!({}))
        .await
        .map_err(at("destination query-block-exports"))?;
    if !have(&dexports, dest_export_id) {
        dst.execute(
            "block-export-add",
            json!({"type": "nbd", "id": dest_export_id, "node-name": a.dest_node,
                   "name": dest_export, "writable": true}),
        )
        .await
        .map_err(at("destination block-export-add"))?;
        undo.dest_export = Some(dest_export_id.to_string());
    }
    probe_guest_url(&dest_nbd.url(dest_export)).await
}

/// Connect to the URL the guest will be given, as the guest would: when a server was running
/// already, `--dest-nbd` is only an assumption about its address, and a wrong URL must not
/// reach the guest.
async fn probe_guest_url(url: &str) -> Result<(), Fail> {
    use diskstream_nbd::client::{ClientOptions, NbdClient};
    let bad = |e: String| {
        Fail::setup(format!(
            "the guest could not use {url}: {e} (is --dest-nbd the address of the destination's NBD server?)"
        ))
    };
    let mut o = ClientOptions::from_url(url).map_err(|e| bad(e.to_string()))?;
    o.read_only = true;
    let c = tokio::time::timeout(Duration::from_secs(10), NbdClient::connect(o))
        .await
        .map_err(|_| bad("no answer in 10 s".into()))?
        .map_err(|e| bad(e.to_string()))?;
    let writable = !c.info().read_only();
    c.close();
    if !writable {
        return Err(bad("the export is read-only".into()));
    }
    Ok(())
}

/// `nbd-server-start` unless a server runs already (then `addr` is taken to be its address).
async fn start_server(q: &mut Qmp, addr: &Addr, side: &str) -> Result<(), Fail> {
    match q
        .execute("nbd-server-start", json!({"addr": addr.legacy()}))
        .await
    {
        Ok(_) => Ok(()),
        Err(QmpFailure::Command { desc, .. }) if desc.contains("already running") => Ok(()),
        Err(e) => Err(Fail::setup(format!("{side} nbd-server-start: {e}"))),
    }
}

/// Step 3: move the guest, then fence the source.
async fn switch(a: &MigrateArgs, src: &mut Qmp, dest_url: &str) -> Result<(), Fail> {
    if let Some(cmd) = &a.switch_command {
        say(format!("switching the guest: {cmd}"));
        let (cmd, url) = (cmd.clone(), dest_url.to_string());
        let status = tokio::task::spawn_blocking(move || {
            std::process::Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .env("DISKSTREAM_MIGRATE_DEST_URL", url)
                .status()
        })
        .await
        .map_err(|e| Fail::setup(format!("--switch-command: {e}")))?
        .map_err(|e| Fail::setup(format!("--switch-command: {e}")))?;
        if !status.success() {
            return Err(Fail::setup(format!(
                "--switch-command failed ({status}); the destination is ready but nothing was streamed (rerun with --resume)"
            )));
        }
    }
    if let Some(id) = &a.source_guest_export {
        src.execute("block-export-del", json!({"id": id, "mode": "hard"}))
            .await
            .map_err(at("source block-export-del (guest export)"))?;
        say(format!(
            "source guest export '{id}' removed: the source takes no more writes"
        ));
    }
    Ok(())
}

async fn resume_if_paused(dst: &mut Qmp, job: &str) -> bool {
    let Ok(jobs) = dst.execute("query-block-jobs", json!({})).await else {
        return false;
    };
    let paused = jobs.as_array().is_some_and(|j| {
        j.iter()
            .any(|j| j["device"] == json!(job) && j["status"] == json!("paused"))
    });
    if paused {
        return dst
            .execute("block-job-resume", json!({"device": job}))
            .await
            .is_ok();
    }
    false
}

fn mib(b: f64) -> f64 {
    b / (1024.0 * 1024.0)
}

fn eta_text(secs: f64) -> String {
    if !secs.is_finite() {
        return "?".into();
    }
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// Step 4: follow the job to its end, printing progress and handling `on-error=stop` pauses.
async fn watch(a: &MigrateArgs, dst: &mut Qmp) -> Result<(), Fail> {
    let lost = |e: QmpFailure| Fail {
        code: EXIT_LOST,
        msg: format!("{e}; restart the destination daemon and rerun with --resume"),
    };
    let interval = Duration::from_millis(a.progress_interval.max(50));
    let start = Instant::now();
    let mut next_report = Instant::now();
    // Rate over a sliding window of samples (offset, time).
    let mut samples: std::collections::VecDeque<(u64, Instant)> = Default::default();
    let mut errors_in_row: u32 = 0;
    let mut error_offset: u64 = 0;
    let mut last_off: u64 = 0;
    let mut resume_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let mut wait = next_report.saturating_duration_since(now);
        if let Some(r) = resume_at {
            wait = wait.min(r.saturating_duration_since(now));
        }
        if let Some(ev) = dst.next_event(wait).await.map_err(lost)? {
            let d = &ev["data"];
            let ours = d["device"] == json!(a.job_id) || d["id"] == json!(a.job_id);
            match ev["event"].as_str().unwrap_or("") {
                "BLOCK_JOB_ERROR" if ours => {
                    let action = d["action"].as_str().unwrap_or("?");
                    say(format!(
                        "I/O error in the stream ({} failed), action: {action}",
                        d["operation"].as_str().unwrap_or("?")
                    ));
                    if action == "stop" && resume_at.is_none() {
                        errors_in_row += 1;
                        error_offset = last_off;
                        if errors_in_row > a.retries {
                            return Err(Fail {
                                code: EXIT_STOPPED,
                                msg: format!(
                                    "the stream stopped on I/O errors {} times in a row; job '{}' stays paused with its data (block-job-resume, or rerun with --resume)",
                                    errors_in_row, a.job_id
                                ),
                            });
                        }
                        let backoff = a.retry_delay.max(0.0)
                            * 2f64.powi(errors_in_row.saturating_sub(1).min(16) as i32);
                        say(format!(
                            "retry {errors_in_row}/{} in {backoff:.1}s",
                            a.retries
                        ));
                        resume_at = Some(Instant::now() + Duration::from_secs_f64(backoff));
                    }
                }
                "BLOCK_JOB_COMPLETED" if ours => {
                    if let Some(e) = d["error"].as_str() {
                        return Err(Fail {
                            code: EXIT_JOB_FAILED,
                            msg: format!(
                                "the stream failed: {e}; {} keeps what was copied (rerun with --resume)",
                                a.dest_image.display()
                            ),
                        });
                    }
                    let len = d["len"].as_u64().unwrap_or(0);
                    let secs = start.elapsed().as_secs_f64();
                    say(format!(
                        "stream completed: {:.1} MiB in {secs:.1}s ({:.1} MiB/s)",
                        mib(len as f64),
                        mib(len as f64) / secs.max(1e-3)
                    ));
                    return Ok(());
                }
                "BLOCK_JOB_CANCELLED" if ours => {
                    return Err(Fail {
                        code: EXIT_JOB_FAILED,
                        msg: format!(
                            "the stream job was cancelled; {} keeps what was copied (rerun with --resume)",
                            a.dest_image.display()
                        ),
                    });
                }
                _ => {}
            }
            continue;
        }
        let now = Instant::now();
        if let Some(r) = resume_at {
            if now >= r {
                resume_at = None;
                if resume_if_paused(dst, &a.job_id).await {
                    say("job resumed");
                }
            }
        }
        if now < next_report {
            continue;
        }
        next_report = now + interval;
        let jobs = dst
            .execute("query-block-jobs", json!({}))
            .await
            .map_err(lost)?;
        let Some(j) = jobs
            .as_array()
            .and_then(|j| j.iter().find(|j| j["device"] == json!(a.job_id)))
            .cloned()
        else {
            // Gone without an event we saw (e.g. dismissed by someone else).
            continue;
        };
        let (len, off) = (
            j["len"].as_u64().unwrap_or(0),
            j["offset"].as_u64().unwrap_or(0),
        );
        if errors_in_row > 0 && off > error_offset && resume_at.is_none() {
            errors_in_row = 0;
        }
        if resume_at.is_some() {
            error_offset = off;
        }
        last_off = off;
        samples.push_back((off, now));
        while samples.len() > 10 {
            samples.pop_front();
        }
        let rate = match (samples.front(), samples.back()) {
            (Some(&(o0, t0)), Some(&(o1, t1))) if t1 > t0 => {
                o1.saturating_sub(o0) as f64 / (t1 - t0).as_secs_f64()
            }
            _ => 0.0,
        };
        let pct = if len > 0 {
            off as f64 * 100.0 / len as f64
        } else {
            0.0
        };
        let eta = if rate > 0.0 {
            eta_text(len.saturating_sub(off) as f64 / rate)
        } else {
            "?".into()
        };
        say(format!(
            "{pct:5.1}% {:.1}/{:.1} MiB, {:.1} MiB/s, ETA {eta}, {}{}",
            mib(off as f64),
            mib(len as f64),
            mib(rate),
            j["status"].as_str().unwrap_or("?"),
            match j["io-status"].as_str() {
                Some("ok") | None => String::new(),
                Some(s) => format!(" (io-status {s})"),
            }
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print() {
        let a = Addr::parse("10.0.0.1:10809").ok();
        assert_eq!(
            a.as_ref().map(|a| a.url("d")),
            Some("nbd://10.0.0.1:10809/d".into())
        );
        let u = Addr::parse("unix:/run/x.sock").ok();
        assert_eq!(
            u.map(|a| a.url("d")),
            Some("nbd+unix:///d?socket=/run/x.sock".into())
        );
        let v6 = Addr::parse("[::1]:10809").ok();
        assert_eq!(v6.map(|a| a.url("")), Some("nbd://[::1]:10809/".into()));
        assert!(Addr::parse("nohost").is_err());
        assert!(Addr::parse("h:notaport").is_err());
    }

    #[test]
    fn eta_is_readable() {
        assert_eq!(eta_text(5.2), "5s");
        assert_eq!(eta_text(125.0), "2m05s");
        assert_eq!(eta_text(7300.0), "2h01m");
        assert_eq!(eta_text(f64::INFINITY), "?");
    }
}
