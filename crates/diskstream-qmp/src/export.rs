//! Integration point for block exports (NBD server): `nbd-server-start`, `nbd-server-stop`,
//! `block-export-add`, `block-export-del`, `query-block-exports`, `nbd-server-add`,
//! `nbd-server-remove`.
//!
//! The monitor does not implement these itself; an export provider (the `diskstream-nbd`
//! crate, wired in by the daemon) registers with [`crate::Monitor::set_export_provider`] and
//! receives the commands it lists. Until one is registered, the commands do not exist
//! (`CommandNotFound`, absent from `query-commands`), which is what a client probing for
//! features expects.

use crate::error::QmpResult;
use async_trait::async_trait;
use diskstream_block::BlockNode;
use serde_json::{Map, Value};
use std::sync::Arc;

/// What an export provider may ask of the monitor.
#[async_trait]
pub trait ExportContext: Send + Sync {
    /// The image of a node, by node name.
    async fn lookup_node(&self, name: &str) -> Option<Arc<dyn BlockNode>>;
    /// Emit a QMP event (e.g. `BLOCK_EXPORT_DELETED` with `{"id": ..}`).
    fn emit_event(&self, name: &str, data: Value);
}

/// A provider of export commands.
#[async_trait]
pub trait ExportProvider: Send + Sync {
    /// The QMP commands it implements.
    fn commands(&self) -> Vec<&'static str>;
    /// Execute one of them with its (object) arguments; the provider validates them.
    async fn execute(
        &self,
        ctx: Arc<dyn ExportContext>,
        command: &str,
        args: Map<String, Value>,
    ) -> QmpResult<Value>;
    /// Close every export (daemon shutdown).
    async fn shutdown(&self) {}
}
