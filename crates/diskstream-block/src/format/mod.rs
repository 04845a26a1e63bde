//! Format drivers: map guest offsets of a virtual disk onto a protocol's bytes.

pub mod qcow2;
pub mod qed;
pub mod raw;
pub mod util;

use std::fmt;
use std::str::FromStr;

/// The image formats diskstream reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Plain bytes, guest offset = file offset.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// QEMU Enhanced Disk.
    Qed,
}

impl Format {
    /// The name QEMU uses for the format.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Qed => "qed",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = crate::error::BlockError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            "qed" => Ok(Format::Qed),
            other => Err(crate::error::BlockError::InvalidArgument(format!(
                "Unknown driver '{other}' (supported: raw, qcow2, qed)"
            ))),
        }
    }
}
