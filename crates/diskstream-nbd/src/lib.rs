//! diskstream's NBD (Network Block Device) support.
//!
//! [`proto`] is the wire format for both directions (constants, encoders, bounds-checked
//! parsers); [`server`] serves block nodes to any NBD client (QEMU, libnbd tools, the kernel,
//! fio); the client half (an NBD protocol driver for backing files) will reuse [`proto`].
//! [`fuzzing`] holds the entry points of the cargo-fuzz targets.

pub mod fuzzing;
pub mod proto;
pub mod server;

pub use server::{
    Export, ExportHandle, Listener, RemoveMode, Server, ServerConfig, ServerError, TlsServerConfig,
};
pub mod client;
