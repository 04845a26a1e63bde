//! Compressed clusters: raw deflate ("zlib" in QEMU's terms) and zstd.
//!
//! A compressed cluster's stored size is rounded up to 512-byte sectors, so the input may carry
//! trailing garbage; decompression stops as soon as one full cluster has been produced.

use super::header::CompressionType;
use crate::error::{BlockError, Result};
use std::io::Read;

/// Decompress one cluster of `cluster_size` bytes.
pub fn decompress(
    ty: CompressionType,
    input: &[u8],
    cluster_size: usize,
) -> std::io::Result<Vec<u8>> {
    let mut out = vec![0u8; cluster_size];
    match ty {
        CompressionType::Zlib => {
            let mut d = flate2::read::DeflateDecoder::new(input);
            d.read_exact(&mut out)?;
        }
        CompressionType::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(input)?.single_frame();
            d.read_exact(&mut out)?;
        }
    }
    Ok(out)
}

/// Compress one cluster.
pub fn compress(ty: CompressionType, input: &[u8]) -> Result<Vec<u8>> {
    match ty {
        CompressionType::Zlib => {
            use std::io::Write;
            let mut e =
                flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(input)
                .and_then(|_| e.finish())
                .map_err(|e| BlockError::io("deflate compression", e))
        }
        CompressionType::Zstd => {
            zstd::bulk::compress(input, 0).map_err(|e| BlockError::io("zstd compression", e))
        }
    }
}
