//! `diskstream serve`: export one image over NBD, with qemu-nbd's options and lifecycle.
//!
//! The image (and its backing chain) is opened once, read-write unless `-r`, and served by the
//! library server of `diskstream-nbd` on TCP (`-b`/`-p`, default port 10809) or a unix socket
//! (`-k`). Like qemu-nbd, the process ends when the last client disconnects unless
//! `--persistent` is given, and on SIGINT/SIGTERM; either way connections finish the requests
//! they have read, then the image is flushed and closed cleanly (dirty state cleared) and a unix
//! socket file is removed.

use anyhow::{anyhow, Context, Result};
use clap::Args;
use diskstream_block::format::Format;
use diskstream_block::image::{open_image, OpenOptions};
use diskstream_block::BlockBackend;
use diskstream_nbd::server::{tls_config_from_pem, Export, Listener, Server, ServerConfig};
use std::path::PathBuf;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

/// How long connections get to finish their requests at shutdown before the image is closed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Arguments of `diskstream serve` (qemu-nbd's spelling).
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Image format (raw, qcow2); probed from the image when omitted, as qemu-nbd does.
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
    /// The image to export.
    file: PathBuf,
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
        backend: BlockBackend::new(node.clone()),
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
    let closed = node.close().await;
    if let Some(p) = &a.socket {
        let _ = std::fs::remove_file(p);
    }
    outcome?;
    closed
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("closing '{}'", a.file.display()))
}
