//! diskstream's HTTP(S) and S3 protocol: remote objects as read-only images and backing files.
//!
//! `http://host/path`, `https://host/path` and `s3://bucket/key` name an object that holds an
//! image (raw, qcow2, QED: the format is always explicit for backing files, as for any
//! other). Reads go through a block cache with coalesced, parallel ranged GETs and read-ahead
//! ([`protocol`]); transient failures are retried with backoff up to a bound, 404/403 are clear
//! errors, and every response is checked against the object's size and ETag (or
//! Last-Modified) when it was opened, so an object replaced underneath is refused instead of
//! mixed with cached data ([`fetch`]). S3 requests are signed (AWS Signature V4) with
//! credentials, region and endpoint from the environment (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`/`AWS_DEFAULT_REGION`,
//! `AWS_ENDPOINT_URL_S3`/`AWS_ENDPOINT_URL`); without credentials they are anonymous.
//!
//! The protocol plugs into the block layer's URL registry ([`register_url_opener`]), like the
//! NBD client does, so `diskstream img` and the library's `open_image` accept these URLs
//! wherever an image or backing file name is expected.

pub mod chunks;
pub mod config;
pub mod error;
pub mod fetch;
pub mod protocol;

pub use config::HttpConfig;
pub use error::HttpError;
pub use protocol::HttpProtocol;

use async_trait::async_trait;
use diskstream_block::image::{register_protocol_opener, ProtocolOpener};
use diskstream_block::protocol::Protocol;
use diskstream_block::{BlockError, Result};
use std::sync::Arc;

/// URL schemes this crate serves.
pub const SCHEMES: &[&str] = &["http", "https", "s3"];

/// Opens `http://`, `https://` and `s3://` names for the block layer.
pub struct HttpOpener {
    cfg: HttpConfig,
}

impl HttpOpener {
    /// An opener fetching with `cfg`.
    pub fn new(cfg: HttpConfig) -> Self {
        HttpOpener {
            cfg: cfg.normalized(),
        }
    }
}

#[async_trait]
impl ProtocolOpener for HttpOpener {
    fn schemes(&self) -> Vec<String> {
        SCHEMES.iter().map(|s| s.to_string()).collect()
    }

    async fn open(&self, url: &str, read_only: bool) -> Result<Arc<dyn Protocol>> {
        if !read_only {
            return Err(BlockError::ReadOnly(format!(
                "{url} (HTTP and S3 objects are read-only; use them as backing files)"
            )));
        }
        Ok(Arc::new(HttpProtocol::open(url, &self.cfg).await?))
    }
}

/// Register the HTTP/S3 opener with the block layer (call once at startup).
pub fn register_url_opener(cfg: HttpConfig) {
    register_protocol_opener(Arc::new(HttpOpener::new(cfg)));
}
