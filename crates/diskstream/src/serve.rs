//! `diskstream serve`: export one image over NBD, with qemu-nbd's options and lifecycle.
//!
//! The image (and its backing chain) is opened once, read-write unless `-r`, and served by the
//! library server of `diskstream-nbd` on TCP (`-b`/`-p`, default port 10809) or a unix socket
//! (`-k`). Like qemu-nbd, the process ends when the last client disconnects unless
//! `--persistent` is given, and on SIGINT/SIGTERM; either way connections finish the requests
//! they have read, then the image is flushed and closed cleanly (dirty state cleared) and a unix
//! socket file is removed.
//!
//! `--copy-on-read` puts the block layer's copy-on-read filter
//! ([`diskstream_block::filter::cor`]) between the export and the image: data clients read
//! from the backing chain is copied into the image, so re-reads are local. `--cor-granularity`,
//! `--cor-readahead` and `--cor-bottom` tune it; its counters are printed when the server stops.

use anyhow::{anyhow, Context, Result};
use clap::Args;
use diskstream_block::filter::cor::{CopyOnRead, CorConfig, CorStats};
use diskstream_block::format::Format;
use diskstream_block::image::{open_image, OpenOptions};
use diskstream_block::node::{same_node, BlockNode};
use diskstream_block::BlockBackend;
use diskstream_nbd::server::{tls_config_from_pem, Export, Listener, Server, ServerConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

/// How long connections get to finish their requests at shutdown before the image is closed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Arguments of `diskstream serve` (qemu-nbd's spelling).
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Image format (raw, qcow2, qed); probed from the image when omitted, as qemu-nbd does.
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Export read-only (writes fail with EPERM).
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Export name clients ask for (exact match; qemu-nbd's default is the empty name).
    #[arg(short = 'x', long = "export-name", default_value = "")]
    export_name: String,
    /// Export description shown by `nbdinfo --list`.
    #[arg(short = 'D', long = "description", default_value = "")]
    description: String,
    /// Address to listen on.
    #[arg(short = 'b', long = "bind", default_value = "0.0.0.0")]
    bind: String,
    /// TCP port to listen on.
    #[arg(short = 'p', long = "port", default_value_t = 10809)]
    port: u16,
    /// Listen on this unix socket instead of TCP.
    #[arg(short = 'k', long = "socket", conflicts_with_all = ["bind", "port"])]
    socket: Option<PathBuf>,
    /// Clients served at once (0: no limit). Above 1, multi-conn is advertised.
    #[arg(short = 'e', long = "shared", default_value_t = 1)]
    shared: usize,
    /// Offer the qemu:allocation-depth metadata context.
    #[arg(short = 'A', long = "allocation-depth")]
    allocation_depth: bool,
    /// Server certificate chain (PEM); with --tls-key, TLS becomes mandatory.
    #[arg(long = "tls-cert", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long = "tls-key", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Keep serving after the last client disconnects.
    #[arg(short = 't', long = "persistent")]
    persistent: bool,
    /// Copy data read from the backing chain into the image (copy-on-read), so re-reads are
    /// local and a later stream has less to copy. Ignored, with a warning, with -r or a raw
    /// image.
    #[arg(long = "copy-on-read")]
    copy_on_read: bool,
    /// Copy-on-read fetch unit: missing data is fetched in aligned units of this size
    /// (power of two, 512 bytes to 32M; K/M suffixes), whatever the clients' request sizes.
    #[arg(
        long = "cor-granularity",
        value_name = "SIZE",
        requires = "copy_on_read"
    )]
    cor_granularity: Option<String>,
    /// Copy-on-read read-ahead: units fetched ahead of a sequential reader (0 disables).
    #[arg(
        long = "cor-readahead",
        value_name = "UNITS",
        requires = "copy_on_read"
    )]
    cor_readahead: Option<u32>,
    /// Copy only data of the backing layers down to this backing file (inclusive); data of
    /// the layers below it is read but never copied (QEMU's `bottom`).
    #[arg(long = "cor-bottom", value_name = "FILE", requires = "copy_on_read")]
    cor_bottom: Option<PathBuf>,
    /// The image to export.
    file: PathBuf,
}

/// The copy-on-read configuration asked for on the command line.
fn cor_config(a: &ServeArgs) -> Result<CorConfig> {
    let mut c = CorConfig::default();
    if let Some(g) = &a.cor_granularity {
        c.granularity = crate::img::opts::parse_size(g)
            .map_err(|e| anyhow!("invalid --cor-granularity '{g}': {e}"))?;
    }
    if let Some(r) = a.cor_readahead {
        c.readahead = r;
    }
    c.validate().map_err(|e| anyhow!("{e}"))?;
    Ok(c)
}

/// The layer of `top`'s backing chain that `name` designates: same file name as opened, or
/// the same file once both are resolved.
fn find_layer(top: &Arc<dyn BlockNode>, name: &Path) -> Result<Arc<dyn BlockNode>> {
    let wanted = std::fs::canonicalize(name).ok();
    let mut node = top.backing();
    let mut seen = Vec::new();
    while let Some(n) = node {
        let f = n.filename();
        if Path::new(f) == name || (wanted.is_some() && std::fs::canonicalize(f).ok() == wanted) {
            return Ok(n);
        }
        seen.push(format!("'{f}'"));
        node = n.backing();
    }
    Err(anyhow!(
        "--cor-bottom '{}' is not a backing file of the image (its backing chain: {})",
        name.display(),
        if seen.is_empty() {
            "none".to_string()
        } else {
            seen.join(" <- ")
        }
    ))
}

/// Put the copy-on-read filter over `node` when asked and possible; warns (and serves the image
/// as is) when copy-on-read cannot work on it.
fn with_cor(a: &ServeArgs, node: &Arc<dyn BlockNode>) -> Result<Option<Arc<CopyOnRead>>> {
    if !a.copy_on_read {
        return Ok(None);
    }
    let config = cor_config(a)?;
    let bottom = a
        .cor_bottom
        .as_deref()
        .map(|b| find_layer(node, b))
        .transpose()?;
    if let Some(why) = CopyOnRead::off_reason_for(node.as_ref()) {
        eprintln!("diskstream serve: warning: --copy-on-read is off: {why}");
        return Ok(None);
    }
    if node.backing().is_none() {
        eprintln!(
            "diskstream serve: warning: --copy-on-read is off: '{}' has no backing file, so \
             there is nothing to copy",
            a.file.display()
        );
        return Ok(None);
    }
    if let Some(b) = &bottom {
        if same_node(b, node) {
            return Err(anyhow!("--cor-bottom must be a backing file of the image"));
        }
    }
    let cor = CopyOnRead::new(Arc::clone(node), bottom, config).map_err(|e| anyhow!("{e}"))?;
    tracing::info!(
        "copy-on-read on '{}': fetch unit {} bytes, read-ahead {} units",
        a.file.display(),
        cor.unit(),
        config.readahead
    );
    Ok(Some(cor))
}

/// The exit report of the copy-on-read counters.
fn report_cor(stats: &CorStats) {
    tracing::info!("copy-on-read: {stats}");
    eprintln!("diskstream serve: copy-on-read: {stats}");
}

/// Run `serve`; returns the process exit code.
pub async fn run(args: ServeArgs) -> u8 {
    match serve(args).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("diskstream serve: {e:#}");
            1
        }
    }
}

async fn serve(a: ServeArgs) -> Result<()> {
    let format = a
        .format
        .as_deref()
        .map(str::parse::<Format>)
        .transpose()
        .map_err(|e| anyhow!("{e}"))?;
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(c), Some(k)) => Some(tls_config_from_pem(c, k)?),
        _ => None,
    };
    let opts = OpenOptions {
        read_only: a.read_only,
        format,
        ..OpenOptions::default()
    };
    let node = open_image(&a.file, &opts)
        .await
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("cannot open '{}'", a.file.display()))?;
    let cor = match with_cor(&a, &node) {
        Ok(c) => c,
        Err(e) => {
            let _ = node.close().await;
            return Err(e);
        }
    };
    let exported: Arc<dyn BlockNode> = match &cor {
        Some(c) => c.clone(),
        None => node.clone(),
    };
    let limit = if a.shared == 0 { usize::MAX } else { a.shared };
    let listener = match &a.socket {
        Some(path) => Listener::bind_unix(path),
        None => {
            let addr = if a.bind.contains(':') && !a.bind.starts_with('[') {
                format!("[{}]:{}", a.bind, a.port)
            } else {
                format!("{}:{}", a.bind, a.port)
            };
            Listener::bind_tcp(&addr).await
        }
    };
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            let _ = node.close().await;
            return Err(e.into());
        }
    };
    let mut cfg = ServerConfig::new(vec![Export {
        name: a.export_name.clone(),
        description: a.description.clone(),
        backend: BlockBackend::new(exported),
        read_only: a.read_only,
        allocation_depth: a.allocation_depth,
        writethrough: false,
        max_connections: limit,
    }]);
    cfg.tls = tls;
    cfg.max_connections = limit;
    let server = match Server::new(cfg) {
        Ok(s) => s,
        Err(e) => {
            let _ = node.close().await;
            return Err(e.into());
        }
    };
    tracing::info!(
        "serving '{}' as export '{}' on {}",
        a.file.display(),
        a.export_name,
        listener.local_addr()
    );
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut counts = server.counts();
    let srv = server.clone();
    let mut accept = tokio::spawn(async move { srv.serve(listener).await });
    let outcome: Result<&str> = tokio::select! {
        _ = sigint.recv() => Ok("SIGINT"),
        _ = sigterm.recv() => Ok("SIGTERM"),
        _ = counts.wait_for(|c| c.total > 0 && c.active == 0), if !a.persistent => {
            Ok("the last client disconnected")
        }
        r = &mut accept => match r {
            Ok(Ok(())) => Ok("listener closed"),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(anyhow!("listener task failed: {e}")),
        },
    };
    tracing::info!("stopping: {}", outcome.as_deref().unwrap_or("error"));
    server.shutdown();
    let _ = accept.await;
    if tokio::time::timeout(DRAIN_TIMEOUT, server.wait_idle())
        .await
        .is_err()
    {
        eprintln!(
            "diskstream serve: clients still connected after {}s; closing the image anyway",
            DRAIN_TIMEOUT.as_secs()
        );
    }
    if let Some(c) = &cor {
        // Copies still in flight land (or are abandoned at a safe point) before the image
        // is closed.
        if let Err(e) = c.close().await {
            eprintln!("diskstream serve: copy-on-read: {e}");
        }
        report_cor(&c.stats());
    }
    let closed = node.close().await;
    if let Some(p) = &a.socket {
        let _ = std::fs::remove_file(p);
    }
    outcome?;
    closed
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("closing '{}'", a.file.display()))
}
