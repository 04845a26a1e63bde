//! Creating QED images with qemu-img's options and layout.
//!
//! The file is exactly what `qemu-img create -f qed` writes: the 64-byte header in cluster 0
//! (one header cluster), the backing file name right after it, and a zeroed L1 table of
//! `table_size` clusters from cluster 1 on; nothing else. Only a raw backing format is
//! recorded (the `backing format no probe` feature); any other format is left for readers to
//! recognise, as QEMU does.

use super::header::{self, Header, F_BACKING_FILE, F_BACKING_FORMAT_NO_PROBE};
use crate::error::{BlockError, Result};
use crate::protocol::file::FileProtocol;
use crate::protocol::Protocol;
use std::path::Path;
use std::sync::Arc;

/// Options of `create -f qed -o ...`, with qemu-img's defaults.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Virtual size in bytes (a multiple of 512).
    pub size: u64,
    /// Cluster size (power of two, 4 KiB .. 64 MiB). Default 64 KiB.
    pub cluster_size: u64,
    /// L1/L2 table size in clusters (power of two, 1 .. 16). Default 4.
    pub table_size: u64,
    /// Backing file name to record.
    pub backing_file: Option<String>,
    /// Backing format (recorded only when it is `raw`).
    pub backing_fmt: Option<String>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: header::DEFAULT_CLUSTER_SIZE as u64,
            table_size: header::DEFAULT_TABLE_SIZE as u64,
            backing_file: None,
            backing_fmt: None,
        }
    }
}

impl CreateOptions {
    /// Reject invalid options with qemu-img's messages.
    pub fn validate(&self) -> Result<()> {
        let inv = |m: String| Err(BlockError::InvalidArgument(m));
        if !header::cluster_size_valid(self.cluster_size) {
            return inv(format!(
                "QED cluster size must be within range [{}, {}] and power of 2",
                header::MIN_CLUSTER_SIZE,
                header::MAX_CLUSTER_SIZE
            ));
        }
        if !header::table_size_valid(self.table_size) {
            return inv(format!(
                "QED table size must be within range [{}, {}] and power of 2",
                header::MIN_TABLE_SIZE,
                header::MAX_TABLE_SIZE
            ));
        }
        if self.cluster_size * self.table_size > header::MAX_TABLE_BYTES {
            return inv(format!(
                "QED tables of {} bytes are larger than supported ({})",
                self.cluster_size * self.table_size,
                header::MAX_TABLE_BYTES
            ));
        }
        if !header::image_size_valid(self.size, self.cluster_size, self.table_size) {
            return inv(format!(
                "QED image size must be a non-zero multiple of cluster size and less than {} bytes",
                header::max_image_size(self.cluster_size, self.table_size)
            ));
        }
        if self.backing_fmt.is_some() && self.backing_file.is_none() {
            return inv("Backing format cannot be used without backing file".to_string());
        }
        if let Some(b) = &self.backing_file {
            if header::HEADER_LEN as u64 + b.len() as u64 > self.cluster_size
                || b.len() as u32 > header::MAX_BACKING_NAME
            {
                return inv("Backing file name too long for a QED header".to_string());
            }
        }
        Ok(())
    }
}

/// Create a QED image at `path` (truncating an existing file).
pub async fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    opts.validate()?;
    let file: Arc<dyn Protocol> = Arc::new(FileProtocol::create(path)?);
    create_on(file, opts).await
}

/// Create a QED image on an empty protocol.
pub async fn create_on(file: Arc<dyn Protocol>, opts: &CreateOptions) -> Result<()> {
    opts.validate()?;
    let mut features = 0;
    let name = opts.backing_file.clone().unwrap_or_default();
    if opts.backing_file.is_some() {
        features |= F_BACKING_FILE;
        if opts.backing_fmt.as_deref() == Some("raw") {
            features |= F_BACKING_FORMAT_NO_PROBE;
        }
    }
    let h = Header {
        cluster_size: opts.cluster_size as u32,
        table_size: opts.table_size as u32,
        header_size: 1,
        features,
        compat_features: 0,
        autoclear_features: 0,
        l1_table_offset: opts.cluster_size,
        image_size: opts.size,
        backing_filename_offset: if opts.backing_file.is_some() {
            header::HEADER_LEN as u32
        } else {
            0
        },
        backing_filename_size: name.len() as u32,
        backing_file: opts.backing_file.clone(),
    };
    file.set_len(0).await?;
    let mut head = h.serialize().to_vec();
    head.extend_from_slice(name.as_bytes());
    file.write_vec(0, head).await?;
    // The L1 table is written (not left as a hole), as qemu-img does.
    file.write_vec(h.l1_table_offset, vec![0u8; h.table_bytes() as usize])
        .await?;
    file.flush().await
}
