//! A minimal QMP client for `diskstream migrate`: one connection per daemon, commands answered
//! in order, events queued so the driver can wait for job events between polls.
//!
//! Only what the migration needs: the greeting and capabilities negotiation, `execute`, and an
//! event queue. Works against `diskstream daemon` and qemu-storage-daemon alike (both speak
//! one JSON object per line).

use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader};

/// What can go wrong talking to a daemon.
#[derive(Debug)]
pub enum QmpFailure {
    /// The socket could not be reached or broke.
    Io(String),
    /// The daemon answered with an error.
    Command {
        /// The daemon's message (QEMU's `desc`).
        desc: String,
    },
}

impl std::fmt::Display for QmpFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QmpFailure::Io(m) => write!(f, "{m}"),
            QmpFailure::Command { desc, .. } => write!(f, "{desc}"),
        }
    }
}

type Reader = Box<dyn AsyncBufRead + Unpin + Send>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// A negotiated QMP connection.
pub struct Qmp {
    name: String,
    reader: Reader,
    writer: Writer,
    events: VecDeque<Value>,
    next_id: u64,
    /// Bytes of a line not complete yet (kept across cancelled reads: `read_until` is
    /// cancel-safe with a persistent buffer).
    line: Vec<u8>,
}

impl Qmp {
    /// Connect to `addr` (a unix socket path, or `HOST:PORT` / `tcp:HOST:PORT` for a TCP
    /// monitor) and negotiate capabilities. `name` labels errors ("source", "destination").
    pub async fn connect(name: &str, addr: &str) -> Result<Qmp, QmpFailure> {
        let io = |e: std::io::Error| QmpFailure::Io(format!("{name} QMP {addr}: {e}"));
        let tcp = addr.strip_prefix("tcp:").or_else(|| {
            (!std::path::Path::new(addr).exists() && addr.rsplit_once(':').is_some())
                .then_some(addr)
        });
        let (reader, writer): (Reader, Writer) = match tcp {
            Some(hp) => {
                let s = tokio::net::TcpStream::connect(hp).await.map_err(io)?;
                let (r, w) = s.into_split();
                (Box::new(BufReader::new(r)), Box::new(w))
            }
            None => {
                let s = tokio::net::UnixStream::connect(addr).await.map_err(io)?;
                let (r, w) = s.into_split();
                (Box::new(BufReader::new(r)), Box::new(w))
            }
        };
        let mut q = Qmp {
            name: name.to_string(),
            reader,
            writer,
            events: VecDeque::new(),
            next_id: 1,
            line: Vec::new(),
        };
        let greeting = q.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpFailure::Io(format!(
                "{name} QMP {addr}: not a QMP greeting: {greeting}"
            )));
        }
        q.execute("qmp_capabilities", json!({})).await?;
        Ok(q)
    }

    async fn read_message(&mut self) -> Result<Value, QmpFailure> {
        loop {
            let n = self
                .reader
                .read_until(b'\n', &mut self.line)
                .await
                .map_err(|e| QmpFailure::Io(format!("{} QMP connection: {e}", self.name)))?;
            if n == 0 {
                return Err(QmpFailure::Io(format!(
                    "{} QMP connection closed (daemon gone?)",
                    self.name
                )));
            }
            if !self.line.ends_with(b"\n") {
                continue;
            }
            let line = std::mem::take(&mut self.line);
            let text = String::from_utf8_lossy(&line);
            if text.trim().is_empty() {
                continue;
            }
            return serde_json::from_str(text.trim())
                .map_err(|e| QmpFailure::Io(format!("{} QMP: malformed message: {e}", self.name)));
        }
    }

    /// Run one command; events that arrive first are queued for [`Qmp::next_event`].
    pub async fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, QmpFailure> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = Map::new();
        msg.insert("execute".into(), json!(cmd));
        if args.as_object().is_some_and(|o| !o.is_empty()) {
            msg.insert("arguments".into(), args);
        }
        msg.insert("id".into(), json!(id));
        let mut text = Value::Object(msg).to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .await
            .map_err(|e| QmpFailure::Io(format!("{} QMP connection: {e}", self.name)))?;
        loop {
            let m = self.read_message().await?;
            if m.get("event").is_some() {
                self.events.push_back(m);
                continue;
            }
            if m.get("id") != Some(&json!(id)) {
                continue;
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            let e = m.get("error").cloned().unwrap_or(Value::Null);
            return Err(QmpFailure::Command {
                desc: e["desc"].as_str().unwrap_or("unknown error").to_string(),
            });
        }
    }

    /// The next event, waiting at most `wait` for one to arrive.
    pub async fn next_event(&mut self, wait: Duration) -> Result<Option<Value>, QmpFailure> {
        if let Some(e) = self.events.pop_front() {
            return Ok(Some(e));
        }
        match tokio::time::timeout(wait, self.read_message()).await {
            Err(_) => Ok(None),
            Ok(Err(e)) => Err(e),
            Ok(Ok(m)) if m.get("event").is_some() => Ok(Some(m)),
            // A stray reply (no command is outstanding): ignore it.
            Ok(Ok(_)) => Ok(None),
        }
    }
}
