//! The QMP monitor: shared daemon state (node graph, jobs, event broadcast) and one task per
//! client connection speaking QEMU's protocol.
//!
//! A connection gets the greeting, must negotiate with `qmp_capabilities`, then sends
//! commands; each reply is one line ending in CRLF, with the request's `id` echoed verbatim.
//! Commands of one connection run one at a time (as QEMU's monitor without OOB); events
//! caused by a command that happen before its reply are written before the reply (QSD does the
//! same for pause, cancel, finalize, dismiss). Events go to every negotiated connection with a
//! wall-clock timestamp; a malformed request gets QEMU's error and the connection goes on.

use crate::commands;
use crate::error::{ErrorClass, QmpError};
use crate::export::Exports;
use crate::graph::Graph;
use crate::json::{ordered_object, to_qemu_json, JsonStream};
use diskstream_jobs::job::{EventSink, JobEvent};
use diskstream_jobs::{JobManager, StreamConfig};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, watch};

/// The version diskstream reports: QEMU's triple for the QSD release whose QMP behaviour it
/// reproduces (clients gate features on it), and its own package string.
pub const QEMU_VERSION: (u64, u64, u64) = (10, 0, 2);

/// Shared state of a daemon.
pub struct Monitor {
    /// The node graph.
    pub graph: tokio::sync::Mutex<Graph>,
    /// The jobs.
    pub jobs: Arc<JobManager>,
    /// Tuning of stream jobs.
    pub stream_config: StreamConfig,
    /// Block exports and the NBD server.
    pub exports: Exports,
    events: broadcast::Sender<String>,
    shutdown: watch::Sender<bool>,
    /// Device node streamed by each stream job (for `query-block-stream`).
    pub(crate) stream_devices: Mutex<HashMap<String, String>>,
    /// Next offset of the seed interface's one-chunk `block_stream`, per device.
    pub(crate) step_cursor: Mutex<HashMap<String, u64>>,
}

struct Sink(broadcast::Sender<String>);

impl EventSink for Sink {
    fn emit(&self, ev: JobEvent) {
        let (name, data) = job_event_json(&ev);
        let _ = self.0.send(event_line(name, Some(data)));
    }
}

fn job_event_json(ev: &JobEvent) -> (&'static str, Value) {
    match ev {
        JobEvent::StatusChange { id, status } => (
            "JOB_STATUS_CHANGE",
            json!({"status": status.as_str(), "id": id}),
        ),
        JobEvent::Completed {
            job_type,
            device,
            len,
            offset,
            speed,
            error,
        } => {
            let mut d = json!({"device": device, "len": len, "offset": offset, "speed": speed, "type": job_type.as_str()});
            if let (Some(e), Some(o)) = (error, d.as_object_mut()) {
                o.insert("error".into(), json!(e));
            }
            ("BLOCK_JOB_COMPLETED", d)
        }
        JobEvent::Cancelled {
            job_type,
            device,
            len,
            offset,
            speed,
        } => (
            "BLOCK_JOB_CANCELLED",
            json!({"device": device, "len": len, "offset": offset, "speed": speed, "type": job_type.as_str()}),
        ),
        JobEvent::Error {
            device,
            operation,
            action,
        } => (
            "BLOCK_JOB_ERROR",
            json!({"device": device, "operation": operation.as_str(), "action": action.as_str()}),
        ),
        JobEvent::Ready {
            job_type,
            device,
            len,
            offset,
            speed,
        } => (
            "BLOCK_JOB_READY",
            json!({"device": device, "len": len, "offset": offset, "speed": speed, "type": job_type.as_str()}),
        ),
        JobEvent::Pending { job_type, id } => (
            "BLOCK_JOB_PENDING",
            json!({"type": job_type.as_str(), "id": id}),
        ),
    }
}

/// One event line (without CRLF), timestamped now.
pub fn event_line(name: &str, data: Option<Value>) -> String {
    let (s, us) = match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_micros() as i64),
        Err(_) => (-1, -1),
    };
    let ts = json!({"seconds": s, "microseconds": us});
    let ev = json!(name);
    match data {
        Some(d) => ordered_object(&[("timestamp", &ts), ("event", &ev), ("data", &d)]),
        None => ordered_object(&[("timestamp", &ts), ("event", &ev)]),
    }
}

impl Monitor {
    /// A monitor with an empty graph.
    pub fn new(stream_config: StreamConfig) -> Arc<Monitor> {
        let (events, _) = broadcast::channel(65536);
        let jobs = JobManager::new(Arc::new(Sink(events.clone())));
        let (shutdown, _) = watch::channel(false);
        Arc::new(Monitor {
            graph: tokio::sync::Mutex::new(Graph::default()),
            jobs,
            stream_config,
            events,
            exports: Exports::default(),
            shutdown,
            stream_devices: Mutex::new(HashMap::new()),
            step_cursor: Mutex::new(HashMap::new()),
        })
    }

    /// Broadcast an event to every negotiated client.
    pub fn emit_event(&self, name: &str, data: Option<Value>) {
        let _ = self.events.send(event_line(name, data));
    }

    /// Ask the daemon to shut down (the `quit` command, signals).
    pub fn request_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Resolves once shutdown was requested.
    pub async fn shutdown_requested(&self) {
        let mut rx = self.shutdown.subscribe();
        while !*rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Graceful shutdown: cancel jobs at a safe point, close exports, flush and close every
    /// image.
    pub async fn shutdown(&self) {
        self.jobs.cancel_all().await;
        // Exports go (clients disconnected, requests already read completed) before the
        // images they use are closed.
        let _ = self.exports.stop_server(self).await;
        self.graph.lock().await.close_all().await;
    }

    /// Serve one client connection until it closes or the daemon shuts down.
    pub async fn serve<S>(self: &Arc<Self>, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        if let Err(e) = self.serve_inner(stream).await {
            tracing::debug!("QMP connection ended: {e}");
        }
    }

    async fn serve_inner<S>(self: &Arc<Self>, stream: S) -> std::io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let (a, b, c) = QEMU_VERSION;
        let greeting = json!({"QMP": {"version": {"qemu": {"micro": c, "minor": b, "major": a}, "package": package()}, "capabilities": ["oob"]}});
        write_line(&mut wr, &to_qemu_json(&greeting)).await?;
        let mut parser = JsonStream::new();
        let mut events: Option<broadcast::Receiver<String>> = None;
        let mut oob = false;
        let mut buf = vec![0u8; 65536];
        let mut shutdown = self.shutdown.subscribe();
        loop {
            tokio::select! {
                n = rd.read(&mut buf) => {
                    let n = n?;
                    if n == 0 {
                        return Ok(());
                    }
                    for parsed in parser.feed(&buf[..n]) {
                        let (reply, quit) = self.handle(parsed, &mut events, &mut oob).await;
                        if let Some(rx) = events.as_mut() {
                            drain_events(rx, &mut wr).await?;
                        }
                        write_line(&mut wr, &reply).await?;
                        if quit {
                            self.request_shutdown();
                            return Ok(());
                        }
                    }
                }
                ev = recv_event(&mut events) => {
                    if let Some(line) = ev {
                        write_line(&mut wr, &line).await?;
                    }
                }
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        return Ok(());
                    }
                }
            }
        }
    }

    async fn handle(
        self: &Arc<Self>,
        parsed: Result<Value, String>,
        events: &mut Option<broadcast::Receiver<String>>,
        oob: &mut bool,
    ) -> (String, bool) {
        let req = match parsed {
            Ok(v) => v,
            Err(e) => return (error_reply(None, &QmpError::generic(e)), false),
        };
        let Value::Object(obj) = req else {
            return (
                error_reply(None, &QmpError::generic("QMP input must be a JSON object")),
                false,
            );
        };
        let id = obj.get("id").cloned();
        let id = id.as_ref();
        let mut execute: Option<&str> = None;
        let mut arguments: Option<&Map<String, Value>> = None;
        let mut exec_oob: Option<&str> = None;
        for (k, v) in &obj {
            match k.as_str() {
                "execute" => match v {
                    Value::String(s) => execute = Some(s),
                    _ => {
                        return (
                            error_reply(
                                id,
                                &QmpError::generic("QMP input member 'execute' must be a string"),
                            ),
                            false,
                        )
                    }
                },
                "exec-oob" if *oob => match v {
                    Value::String(s) => exec_oob = Some(s),
                    _ => {
                        return (
                            error_reply(
                                id,
                                &QmpError::generic("QMP input member 'exec-oob' must be a string"),
                            ),
                            false,
                        )
                    }
                },
                "arguments" => match v {
                    Value::Object(o) => arguments = Some(o),
                    _ => {
                        return (
                            error_reply(
                                id,
                                &QmpError::generic(
                                    "QMP input member 'arguments' must be an object",
                                ),
                            ),
                            false,
                        )
                    }
                },
                "id" => {}
                other => {
                    return (
                        error_reply(
                            id,
                            &QmpError::generic(format!("QMP input member '{other}' is unexpected")),
                        ),
                        false,
                    )
                }
            }
        }
        if let (Some(_), Some(_)) = (execute, exec_oob) {
            return (
                error_reply(
                    id,
                    &QmpError::generic("QMP input member 'execute' clashes with 'exec-oob'"),
                ),
                false,
            );
        }
        if let Some(cmd) = exec_oob {
            // No command supports out-of-band execution.
            let known = commands::command_names(self).iter().any(|c| c == cmd);
            let e = if known {
                QmpError::generic(format!("The command {cmd} does not support OOB"))
            } else {
                QmpError::new(
                    ErrorClass::CommandNotFound,
                    format!("The command {cmd} has not been found"),
                )
            };
            return (error_reply(id, &e), false);
        }
        let Some(cmd) = execute else {
            return (
                error_reply(id, &QmpError::generic("QMP input lacks member 'execute'")),
                false,
            );
        };
        let args = arguments.cloned().unwrap_or_default();
        let negotiated = events.is_some();
        if !negotiated {
            if cmd != "qmp_capabilities" {
                return (
                    error_reply(
                        id,
                        &QmpError::new(
                            ErrorClass::CommandNotFound,
                            "Expecting capabilities negotiation with 'qmp_capabilities'",
                        ),
                    ),
                    false,
                );
            }
            return match commands::qmp_capabilities(args) {
                Ok(enable_oob) => {
                    *oob = enable_oob;
                    *events = Some(self.events.subscribe());
                    (return_reply(id, &json!({})), false)
                }
                Err(e) => (error_reply(id, &e), false),
            };
        }
        if cmd == "qmp_capabilities" {
            return (
                error_reply(
                    id,
                    &QmpError::new(
                        ErrorClass::CommandNotFound,
                        "Capabilities negotiation is already complete, command ignored",
                    ),
                ),
                false,
            );
        }
        let quit = cmd == "quit";
        match commands::dispatch(self, cmd, args).await {
            Ok(v) => (return_reply(id, &v), quit),
            Err(e) => (error_reply(id, &e), false),
        }
    }
}

/// The package string of `query-version` and the greeting.
pub fn package() -> String {
    format!("diskstream {}", env!("CARGO_PKG_VERSION"))
}

fn return_reply(id: Option<&Value>, v: &Value) -> String {
    match id {
        Some(id) => ordered_object(&[("return", v), ("id", id)]),
        None => ordered_object(&[("return", v)]),
    }
}

fn error_reply(id: Option<&Value>, e: &QmpError) -> String {
    let err = json!({"class": e.class.as_str(), "desc": e.desc});
    match id {
        Some(id) => ordered_object(&[("id", id), ("error", &err)]),
        None => ordered_object(&[("error", &err)]),
    }
}

async fn write_line<W: AsyncWrite + Unpin>(w: &mut W, line: &str) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(line.len() + 2);
    b.extend_from_slice(line.as_bytes());
    b.extend_from_slice(b"\r\n");
    w.write_all(&b).await?;
    w.flush().await
}

async fn drain_events<W: AsyncWrite + Unpin>(
    rx: &mut broadcast::Receiver<String>,
    w: &mut W,
) -> std::io::Result<()> {
    loop {
        match rx.try_recv() {
            Ok(line) => write_line(w, &line).await?,
            Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
            Err(_) => return Ok(()),
        }
    }
}

async fn recv_event(rx: &mut Option<broadcast::Receiver<String>>) -> Option<String> {
    match rx {
        Some(r) => loop {
            match r.recv().await {
                Ok(l) => return Some(l),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => {
                    return std::future::pending().await;
                }
            }
        },
        None => std::future::pending().await,
    }
}
