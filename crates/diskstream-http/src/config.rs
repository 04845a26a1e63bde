//! Tuning of the HTTP/S3 protocol: fetch block size, cache, parallelism, retries, timeouts.
//!
//! A URL cannot carry these settings (QEMU would refuse such a backing file name), so the
//! binary reads them from the environment once at startup, as it does for NBD.

use std::time::Duration;

/// How remote objects are fetched and cached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpConfig {
    /// Bytes per fetch block: the unit of ranged GETs and of the cache. Large blocks amortise
    /// the round trip of a distant server; reads inside a cached block cost nothing.
    pub block_size: u64,
    /// Bytes of blocks kept in memory (least recently used are dropped first; blocks that
    /// bulk reads took whole at once). The memory of an object is about this plus the GETs
    /// in flight (`connections` × `max_request`).
    pub cache_bytes: u64,
    /// Most bytes one ranged GET asks for (adjacent queued blocks are merged up to this).
    pub max_request: u64,
    /// Ranged GETs in flight at once per object.
    pub connections: usize,
    /// Blocks fetched ahead of a sequential reader at first; the window doubles at each
    /// refill while the reader stays sequential, up to `connections` full-size GETs (within
    /// half the cache).
    pub readahead: u64,
    /// Retries of a transient failure (5xx, 408, 429, connection refused or reset, timeout).
    pub retries: u32,
    /// First pause before a retry (doubled each time, at most 2 s).
    pub retry_delay: Duration,
    /// Limit on connecting to the server.
    pub connect_timeout: Duration,
    /// Limit on waiting for the next bytes of a response (a stalled server counts as failed).
    pub read_timeout: Duration,
    /// Verify the server's TLS certificate against the platform's trust store (https). Off
    /// only on request (QEMU's `sslverify: false`): the connection is then encrypted but the
    /// server unauthenticated.
    pub tls_verify: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            block_size: 1 << 20,
            cache_bytes: 64 << 20,
            max_request: 8 << 20,
            connections: 4,
            readahead: 8,
            retries: 5,
            retry_delay: Duration::from_millis(200),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            tls_verify: true,
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.trim().parse::<u64>() {
        Ok(n) => Some(n),
        Err(_) => {
            tracing::warn!("ignoring {name}={v:?}: not a number");
            None
        }
    }
}

impl HttpConfig {
    /// The defaults, overridden by `DISKSTREAM_HTTP_BLOCK_SIZE`, `_CACHE_SIZE`,
    /// `_MAX_REQUEST` (bytes), `_CONNECTIONS`, `_READAHEAD` (blocks), `_RETRIES`,
    /// `_RETRY_DELAY_MS`, `_CONNECT_TIMEOUT` and `_TIMEOUT` (seconds). Invalid values are
    /// ignored with a warning; the result is normalised by [`HttpConfig::normalized`].
    pub fn from_env() -> HttpConfig {
        let mut c = HttpConfig::default();
        let p = "DISKSTREAM_HTTP_";
        if let Some(v) = env_u64(&format!("{p}BLOCK_SIZE")) {
            c.block_size = v;
        }
        if let Some(v) = env_u64(&format!("{p}CACHE_SIZE")) {
            c.cache_bytes = v;
        }
        if let Some(v) = env_u64(&format!("{p}MAX_REQUEST")) {
            c.max_request = v;
        }
        if let Some(v) = env_u64(&format!("{p}CONNECTIONS")) {
            c.connections = v as usize;
        }
        if let Some(v) = env_u64(&format!("{p}READAHEAD")) {
            c.readahead = v;
        }
        if let Some(v) = env_u64(&format!("{p}RETRIES")) {
            c.retries = v.min(100) as u32;
        }
        if let Some(v) = env_u64(&format!("{p}RETRY_DELAY_MS")) {
            c.retry_delay = Duration::from_millis(v);
        }
        if let Some(v) = env_u64(&format!("{p}CONNECT_TIMEOUT")) {
            c.connect_timeout = Duration::from_secs(v);
        }
        if let Some(v) = env_u64(&format!("{p}TIMEOUT")) {
            c.read_timeout = Duration::from_secs(v);
        }
        c.normalized()
    }

    /// Clamp every value into a workable range: blocks of 4 KiB .. 64 MiB (a power of two),
    /// requests of at least one block, at least one connection, a cache of at least a few
    /// requests' worth, non-zero timeouts.
    pub fn normalized(mut self) -> HttpConfig {
        self.block_size = self
            .block_size
            .clamp(4096, 64 << 20)
            .checked_next_power_of_two()
            .unwrap_or(1 << 20);
        self.max_request = (self.max_request / self.block_size).max(1) * self.block_size;
        self.connections = self.connections.clamp(1, 64);
        self.readahead = self.readahead.min(256);
        let min_cache = self.block_size * (self.readahead + 2 * self.max_blocks() + 4);
        self.cache_bytes = self.cache_bytes.max(min_cache);
        if self.connect_timeout.is_zero() {
            self.connect_timeout = Duration::from_secs(10);
        }
        if self.read_timeout.is_zero() {
            self.read_timeout = Duration::from_secs(30);
        }
        self
    }

    /// Blocks per request at most.
    pub fn max_blocks(&self) -> u64 {
        (self.max_request / self.block_size).max(1)
    }

    /// Blocks the cache holds.
    pub fn cache_blocks(&self) -> usize {
        (self.cache_bytes / self.block_size).max(1) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation() {
        let c = HttpConfig {
            block_size: 3000,
            max_request: 5000,
            connections: 0,
            cache_bytes: 0,
            ..Default::default()
        }
        .normalized();
        assert_eq!(c.block_size, 4096);
        assert_eq!(c.max_request, 4096);
        assert_eq!(c.connections, 1);
        assert!(c.cache_blocks() >= c.readahead as usize + 4);
        let d = HttpConfig::default().normalized();
        assert_eq!(d, HttpConfig::default());
    }
}
