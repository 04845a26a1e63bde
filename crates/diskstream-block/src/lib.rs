//! diskstream's block layer.
//!
//! A device is a graph of [`node::BlockNode`]s: format drivers ([`format::qcow2`],
//! [`format::raw`]) over protocol drivers ([`protocol::file`]), linked into backing chains by
//! [`image`]. The chain-wide mapping query in [`status`] is what `map`, streaming, mirroring and
//! NBD block status are built on. Filters ([`filter::cor`], copy-on-read) sit over a node
//! and change how requests reach it. File I/O runs on the bounded [`pool::IoPool`], never on the
//! async runtime's workers.

pub mod backend;
pub mod error;
pub mod filter;
pub mod foreground;
pub mod format;
pub mod fuzzing;
pub mod image;
pub mod node;
pub mod pool;
pub mod priority;
pub mod protocol;
pub mod status;

pub use backend::BlockBackend;
pub use error::{BlockError, Result};
pub use node::BlockNode;
