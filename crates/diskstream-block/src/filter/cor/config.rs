//! Configuration and counters of the copy-on-read filter.
//!
//! [`CorConfig`] is what a user tunes (fetch unit, read-ahead); [`CorStats`] is the snapshot
//! the filter reports, serializable so that a monitor (QMP `query-named-block-nodes`, a stats
//! command) can hand it out as it is. The live counters are plain atomics: a read bumps a few
//! of them and never takes a lock for accounting.

use crate::error::{BlockError, Result};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};

/// Default fetch unit: 1 MiB. Big enough that a remote backing is read in requests that
/// amortise a round trip (a 4 KiB guest read over a 5 ms link costs the same as 1 MiB), small
/// enough that a random first read does not wait for much more than it asked for.
pub const DEFAULT_GRANULARITY: u64 = 1 << 20;
/// Smallest fetch unit accepted (it is rounded up to the top image's allocation unit anyway).
pub const MIN_GRANULARITY: u64 = 512;
/// Largest fetch unit accepted: the NBD maximum payload, so one unit is one backing request.
pub const MAX_GRANULARITY: u64 = 32 << 20;
/// Default read-ahead: the next 4 units on sequential access.
pub const DEFAULT_READAHEAD: u32 = 4;
/// Most units read ahead of a sequential reader.
pub const MAX_READAHEAD: u32 = 64;
/// Default bound on read-ahead fetches in flight at once (all sequential streams together).
pub const DEFAULT_BACKGROUND: u32 = 8;

/// How the copy-on-read filter fetches backing data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct CorConfig {
    /// Bytes per fetch unit, a power of two in `[512, 32 MiB]`. Rounded up to the top image's
    /// allocation unit (cluster, or subcluster with extended L2). A read of a missing range
    /// fetches and copies the whole aligned units around it, whatever the guest's request size.
    pub granularity: u64,
    /// Units read ahead of a sequential reader (0 disables read-ahead).
    pub readahead: u32,
    /// Read-ahead fetches in flight at most; when all are busy, read-ahead is skipped rather
    /// than queued, so it never builds a backlog in front of guest reads.
    pub max_background: u32,
}

impl Default for CorConfig {
    fn default() -> Self {
        CorConfig {
            granularity: DEFAULT_GRANULARITY,
            readahead: DEFAULT_READAHEAD,
            max_background: DEFAULT_BACKGROUND,
        }
    }
}

impl CorConfig {
    /// Check the values; the error says which one is wrong and what is accepted.
    pub fn validate(&self) -> Result<()> {
        let g = self.granularity;
        if !g.is_power_of_two() || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&g) {
            return Err(BlockError::InvalidArgument(format!(
                "copy-on-read granularity {g} must be a power of two between {MIN_GRANULARITY} \
                 and {MAX_GRANULARITY} bytes"
            )));
        }
        if self.readahead > MAX_READAHEAD {
            return Err(BlockError::InvalidArgument(format!(
                "copy-on-read read-ahead {} must be at most {MAX_READAHEAD} units",
                self.readahead
            )));
        }
        if self.max_background == 0 || self.max_background > 4 * MAX_READAHEAD {
            return Err(BlockError::InvalidArgument(format!(
                "copy-on-read background fetch limit {} must be between 1 and {}",
                self.max_background,
                4 * MAX_READAHEAD
            )));
        }
        Ok(())
    }
}

/// A snapshot of what the filter did, for monitors and logs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CorStats {
    /// Whether copy-on-read is on (false: the filter only forwards, see `off-reason`).
    pub active: bool,
    /// Why copy-on-read is off, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub off_reason: Option<String>,
    /// The effective fetch unit in bytes (the granularity rounded to the top's allocation unit).
    pub unit: u64,
    /// Units read ahead on sequential access.
    pub readahead: u32,
    /// Bytes of backing data written into the top image.
    pub bytes_copied: u64,
    /// Bytes the top image now marks as zeroes because the backing read as zeroes there.
    pub bytes_zeroed: u64,
    /// Read requests the filter sent to the backing chain.
    pub backing_reads: u64,
    /// Bytes those requests asked for.
    pub backing_bytes: u64,
    /// Guest reads answered entirely from the top image.
    pub hits: u64,
    /// Guest reads that needed at least one fetch unit.
    pub misses: u64,
    /// Units fetched because a guest read needed them.
    pub fetches: u64,
    /// Units fetched by read-ahead.
    pub readahead_fetches: u64,
    /// Times a guest read waited for a unit another request was already fetching instead of
    /// reading the backing again.
    pub deduplicated: u64,
    /// Unit fetches that failed (backing read errors; the guest read got the error).
    pub fetch_errors: u64,
    /// Copies into the top image that failed (e.g. no space). The guest read still succeeded:
    /// the data came from the backing and the range is simply fetched again next time.
    pub populate_errors: u64,
}

/// The live counters behind [`CorStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub bytes_copied: AtomicU64,
    pub bytes_zeroed: AtomicU64,
    pub backing_reads: AtomicU64,
    pub backing_bytes: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub fetches: AtomicU64,
    pub readahead_fetches: AtomicU64,
    pub deduplicated: AtomicU64,
    pub fetch_errors: AtomicU64,
    pub populate_errors: AtomicU64,
}

/// Add to a counter (relaxed: counters order nothing).
pub(crate) fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    /// Fill the counter fields of `s`.
    pub fn fill(&self, s: &mut CorStats) {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        s.bytes_copied = g(&self.bytes_copied);
        s.bytes_zeroed = g(&self.bytes_zeroed);
        s.backing_reads = g(&self.backing_reads);
        s.backing_bytes = g(&self.backing_bytes);
        s.hits = g(&self.hits);
        s.misses = g(&self.misses);
        s.fetches = g(&self.fetches);
        s.readahead_fetches = g(&self.readahead_fetches);
        s.deduplicated = g(&self.deduplicated);
        s.fetch_errors = g(&self.fetch_errors);
        s.populate_errors = g(&self.populate_errors);
    }
}

impl std::fmt::Display for CorStats {
    /// One line for logs and `serve`'s exit report.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.active {
            return write!(
                f,
                "off ({})",
                self.off_reason.as_deref().unwrap_or("not active")
            );
        }
        write!(
            f,
            "copied {} bytes and zeroed {} bytes; {} backing reads ({} bytes); {} hits, {} \
             misses; {} unit fetches, {} read ahead, {} deduplicated; {} fetch errors, {} \
             copy errors",
            self.bytes_copied,
            self.bytes_zeroed,
            self.backing_reads,
            self.backing_bytes,
            self.hits,
            self.misses,
            self.fetches,
            self.readahead_fetches,
            self.deduplicated,
            self.fetch_errors,
            self.populate_errors
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        assert!(CorConfig::default().validate().is_ok());
        for g in [0, 511, 513, 3 << 20, 64 << 20] {
            let c = CorConfig {
                granularity: g,
                ..CorConfig::default()
            };
            let e = c.validate().expect_err("bad granularity").to_string();
            assert!(e.contains("granularity"), "{e}");
        }
        let c = CorConfig {
            readahead: MAX_READAHEAD + 1,
            ..CorConfig::default()
        };
        assert!(c.validate().is_err());
        let c = CorConfig {
            max_background: 0,
            ..CorConfig::default()
        };
        assert!(c.validate().is_err());
    }

    #[test]
    fn stats_serialize_in_qapi_style() {
        let s = CorStats {
            active: true,
            unit: 1 << 20,
            bytes_copied: 5,
            ..CorStats::default()
        };
        let v = serde_json::to_value(&s).expect("serialize");
        assert_eq!(v["bytes-copied"], 5);
        assert_eq!(v["unit"], 1 << 20);
        assert!(v.get("off-reason").is_none());
        let c: CorConfig =
            serde_json::from_str(r#"{"granularity": 65536}"#).expect("partial config");
        assert_eq!(c.granularity, 65536);
        assert_eq!(c.readahead, DEFAULT_READAHEAD);
    }
}
