//! `diskstream copy`: live block copy via streaming, the seeds' recipe in one command, driven
//! over a running daemon's QMP socket.
//!
//! 1. create the destination qcow2 backed by the device's current image (its backing format
//!    recorded explicitly, never left to probing);
//! 2. switch the device to it (`x-blockdev-switch`: exports stay connected, in-flight
//!    requests drain first, the source becomes the destination's read-only backing);
//! 3. `block-stream` the destination down to `--base` (or all of the chain), reporting
//!    progress until `BLOCK_JOB_COMPLETED`.
//!
//! Afterwards the destination is self-contained (or backed by the base) and the guest has
//! written to it since step 2. The source files are never written after the switch.

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use diskstream_block::format::qcow2::create::{create, CreateOptions};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// `diskstream copy` arguments.
#[derive(Args)]
pub struct CopyArgs {
    /// The daemon's QMP unix socket.
    #[arg(long)]
    qmp: PathBuf,
    /// The node whose users (NBD exports) move to the copy.
    #[arg(long)]
    node: String,
    /// The destination image to create (qcow2; must not exist).
    #[arg(long)]
    dest: PathBuf,
    /// Keep the destination backed by this node of the chain (default: copy everything).
    #[arg(long)]
    base: Option<String>,
    /// Node name of the destination in the daemon (default NODE-copy).
    #[arg(long)]
    dest_node: Option<String>,
    /// Job id of the stream (default copy-NODE).
    #[arg(long)]
    job_id: Option<String>,
    /// Stream speed limit, bytes per second (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    speed: u64,
    /// No progress lines.
    #[arg(short, long)]
    quiet: bool,
}

/// The daemon answered a command with an error (as opposed to a lost connection, after
/// which the command may or may not have taken effect).
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// A minimal QMP client: one command at a time, events queued.
struct Qmp {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
    events: VecDeque<Value>,
}

impl Qmp {
    async fn connect(path: &Path) -> Result<Qmp> {
        let s = UnixStream::connect(path)
            .await
            .with_context(|| format!("cannot connect to the QMP socket {}", path.display()))?;
        let (r, w) = s.into_split();
        let mut q = Qmp {
            rd: BufReader::new(r),
            wr: w,
            events: VecDeque::new(),
        };
        let greeting = q.line().await?;
        if greeting.get("QMP").is_none() {
            bail!(
                "{} is not a QMP socket (greeting {greeting})",
                path.display()
            );
        }
        q.cmd("qmp_capabilities", json!({})).await?;
        Ok(q)
    }

    async fn line(&mut self) -> Result<Value> {
        let mut l = String::new();
        if self.rd.read_line(&mut l).await? == 0 {
            bail!("the daemon closed the QMP connection");
        }
        serde_json::from_str(&l).with_context(|| format!("bad QMP line: {l}"))
    }

    /// Run a command; its error's text becomes the error.
    async fn cmd(&mut self, name: &str, args: Value) -> Result<Value> {
        let msg = json!({"execute": name, "arguments": args});
        self.wr.write_all(format!("{msg}\n").as_bytes()).await?;
        loop {
            let v = self.line().await?;
            if v.get("event").is_some() {
                self.events.push_back(v);
                continue;
            }
            if let Some(e) = v.get("error") {
                let desc = e.get("desc").and_then(|d| d.as_str()).unwrap_or("?");
                return Err(Refused(format!("{name}: {desc}")).into());
            }
            return Ok(v.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// Take the first queued event called `name` for job `id`.
    fn take_event(&mut self, name: &str, id: &str) -> Option<Value> {
        let pos = self.events.iter().position(|e| {
            e.get("event").and_then(|v| v.as_str()) == Some(name)
                && e.pointer("/data/device").and_then(|v| v.as_str()) == Some(id)
        })?;
        self.events.remove(pos)
    }
}

/// Run `diskstream copy`; returns the exit code.
pub async fn run(a: CopyArgs) -> u8 {
    match copy(a).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("diskstream copy: {e:#}");
            1
        }
    }
}

async fn copy(a: CopyArgs) -> Result<()> {
    let mut q = Qmp::connect(&a.qmp).await?;
    let nodes = q
        .cmd("query-named-block-nodes", json!({"flat": true}))
        .await?;
    let nodes = nodes.as_array().cloned().unwrap_or_default();
    let node = nodes
        .iter()
        .find(|n| n.get("node-name").and_then(|v| v.as_str()) == Some(a.node.as_str()))
        .ok_or_else(|| anyhow!("the daemon has no node '{}'", a.node))?;
    let drv = node
        .get("drv")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string();
    if !matches!(drv.as_str(), "qcow2" | "qed" | "raw") {
        bail!(
            "node '{}' is a '{drv}' node: name the format node the exports use",
            a.node
        );
    }
    let shown = node
        .get("file")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    let file = protocol_filename(shown).unwrap_or_else(|| shown.to_string());
    if !file.starts_with('/') {
        bail!(
            "node '{}' was opened as '{file}', not by an absolute path: the destination must \
             record the source unambiguously (open it with an absolute file name)",
            a.node
        );
    }
    let size = node
        .pointer("/image/virtual-size")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| anyhow!("node '{}' reports no size", a.node))?;
    if a.dest.exists() {
        bail!(
            "{} exists: the destination is created here",
            a.dest.display()
        );
    }
    let dest = std::path::absolute(&a.dest)
        .with_context(|| format!("cannot resolve {}", a.dest.display()))?;
    let dest_str = dest
        .to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", dest.display()))?
        .to_string();
    let dest_node = a.dest_node.clone().unwrap_or_else(|| {
        let n = format!("{}-copy", a.node);
        if n.len() <= 31 {
            n
        } else {
            "copy".to_string()
        }
    });
    let job = a
        .job_id
        .clone()
        .unwrap_or_else(|| format!("copy-{}", a.node));

    // 1. The destination, backed by the current image with its format recorded.
    let opts = CreateOptions {
        size,
        backing_file: Some(file.clone()),
        backing_fmt: Some(drv.clone()),
        ..CreateOptions::default()
    };
    create(&dest, &opts)
        .await
        .map_err(|e| anyhow!("cannot create {}: {e}", dest.display()))?;
    say(
        &a,
        &format!("created {dest_str} (qcow2, backing {file}, {drv})"),
    );

    // 2. Switch the device.
    if let Err(e) = q
        .cmd(
            "x-blockdev-switch",
            json!({"device": a.node, "filename": dest_str, "format": "qcow2",
                   "node-name": dest_node}),
        )
        .await
    {
        // Only a refusal proves the daemon never opened the destination. After a lost
        // connection the switch may have happened, and the guest's writes since then are in
        // the destination only: keep it.
        if e.downcast_ref::<Refused>().is_some() {
            let _ = std::fs::remove_file(&dest);
            return Err(e);
        }
        return Err(e.context(format!(
            "lost the daemon during the switch: {dest_str} is kept and is the image to reopen \
             (it is backed by the source, so it reads as the device whether or not the switch \
             happened)"
        )));
    }
    say(
        &a,
        &format!("switched '{}' to '{dest_node}' ({dest_str})", a.node),
    );

    // 3. Stream.
    let mut args = json!({"job-id": job, "device": dest_node, "auto-dismiss": true});
    if let Some(b) = &a.base {
        args["base-node"] = json!(b);
    }
    if a.speed > 0 {
        args["speed"] = json!(a.speed);
    }
    q.cmd("block-stream", args).await.context(
        "the device now runs on the destination; start the stream again to finish the copy",
    )?;
    let done = loop {
        if let Some(e) = q.take_event("BLOCK_JOB_COMPLETED", &job) {
            break e;
        }
        if let Some(e) = q.take_event("BLOCK_JOB_CANCELLED", &job) {
            bail!(
                "the stream was cancelled at {} of {} bytes; the device runs on {dest_str}",
                e.pointer("/data/offset").unwrap_or(&Value::Null),
                e.pointer("/data/len").unwrap_or(&Value::Null)
            );
        }
        let jobs = q.cmd("query-block-jobs", json!({})).await?;
        if let Some(j) = jobs
            .as_array()
            .and_then(|l| l.iter().find(|j| j["device"] == json!(job)))
        {
            let off = j["offset"].as_u64().unwrap_or(0);
            let len = j["len"].as_u64().unwrap_or(0).max(1);
            say(
                &a,
                &format!(
                    "streaming: {off}/{len} bytes ({:.1}%)",
                    off as f64 * 100.0 / len as f64
                ),
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        // Events that arrived while idle are read by the next command.
    };
    if let Some(err) = done.pointer("/data/error").and_then(|v| v.as_str()) {
        bail!(
            "the stream failed: {err}; the device runs on {dest_str} (still backed by the source)"
        );
    }
    let len = done.pointer("/data/len").and_then(|v| v.as_u64());
    match &a.base {
        Some(b) => say(
            &a,
            &format!(
                "done: {dest_str} is backed by node '{b}' only ({} bytes)",
                len.unwrap_or(size)
            ),
        ),
        None => say(
            &a,
            &format!(
                "done: {dest_str} is self-contained ({} bytes)",
                len.unwrap_or(size)
            ),
        ),
    }
    Ok(())
}

/// The local file of a node as `query-named-block-nodes` shows it: a plain name, or QEMU's
/// `json:{...}` pseudo-filename (shown when the backing was given by reference) whose
/// `file` is a `file` protocol node.
fn protocol_filename(shown: &str) -> Option<String> {
    let Some(js) = shown.strip_prefix("json:") else {
        return Some(shown.to_string());
    };
    let v: Value = serde_json::from_str(js).ok()?;
    let f = v.get("file")?;
    if f.get("driver").and_then(|d| d.as_str()) != Some("file") {
        return None;
    }
    f.get("filename")
        .and_then(|n| n.as_str())
        .map(str::to_string)
}

fn say(a: &CopyArgs, msg: &str) {
    if !a.quiet {
        eprintln!("diskstream copy: {msg}");
    }
}
