//! diskstream's QMP monitor: a drop-in for qemu-storage-daemon's control socket on the
//! subset diskstream implements.
//!
//! * [`json`]: QMP's JSON dialect (streaming parser with QEMU's errors, QEMU's output).
//! * [`schema`]: argument validation with QAPI's semantics and texts.
//! * [`graph`]: the named node graph (`blockdev-add`/`-del`, `query-named-block-nodes`).
//! * [`monitor`]: connections, negotiation, dispatch, events.
//! * [`commands`], [`stream_cmd`], [`snapshot_cmd`], [`mirror_cmd`]: the commands.
//! * [`export`]: the integration point the NBD server plugs into.
//! * [`blkdebug`]: error injection for tests.
//! * [`server`]: listening sockets.

pub mod blkdebug;
pub mod commands;
pub mod error;
pub mod export;
pub mod fuzzing;
pub mod graph;
pub mod json;
pub mod mirror_cmd;
pub mod monitor;
pub mod schema;
pub mod server;
pub mod snapshot_cmd;
pub mod stream_cmd;
pub mod switch_cmd;

pub use error::{ErrorClass, QmpError};
pub use monitor::Monitor;
