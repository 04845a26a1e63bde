//! The read-only protocol over a remote object: a bounded block cache in front of a fetch
//! scheduler.
//!
//! The object is read in fixed *blocks* ([`HttpConfig::block_size`], 1 MiB by default). A read
//! takes the blocks it needs from the cache; a missing block is queued once (later readers of
//! the same block wait for the same fetch). A scheduler keeps up to
//! [`HttpConfig::connections`] ranged GETs in flight; when a slot frees it takes the first
//! queued block and merges every adjacent queued block into the same GET (up to
//! [`HttpConfig::max_request`]), so the many small, neighbouring requests of a guest or a job
//! become few large ones exactly when the server is the bottleneck. A reader that continues
//! where the previous read ended triggers read-ahead of the following blocks (queued after
//! demanded ones), in a window that grows while the reader stays sequential until every
//! connection carries a full-size GET.
//!
//! **Priority** ([`diskstream_block::priority`]): blocks a foreground reader (a guest, its
//! copy-on-read fetch) waits for are fetched before blocks only background readers (a stream
//! job) wait for, and those before read-ahead, whatever their offsets; a block a guest comes
//! to wait for moves up to the guest's queue. While a guest is active
//! ([`diskstream_block::foreground::busy`]), background GETs keep a quarter of the connections
//! (at least one, with two or more) free, so a guest's block is requested at once rather than
//! after one of the job's GETs; with the guest idle a job uses every connection.
//!
//! Fetched blocks go into an LRU cache bounded by [`HttpConfig::cache_bytes`], kept as the
//! response chunks they arrived in (no copy; see [`crate::chunks`]); blocks that bulk reads
//! took whole leave it at once ([`BULK_READ`]). Combined with copy-on-read or streaming into a
//! local overlay, every byte crosses the network once, and is copied once in user space (into
//! the reader's buffer).
//!
//! Failures are never cached: each reader waiting on a failed fetch gets the error, and the
//! next read of the block tries again.

use crate::chunks::Chunks;
use crate::config::HttpConfig;
use crate::error::HttpError;
use crate::fetch::Fetcher;
use async_trait::async_trait;
use diskstream_block::protocol::Protocol;
use diskstream_block::{BlockError, Result};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;

type BlockResult = Option<std::result::Result<Chunks, HttpError>>;

/// Why a block is queued, most urgent first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    /// A foreground reader waits for it.
    Guest,
    /// Only background readers (a job) wait for it.
    Job,
    /// Read-ahead.
    Ahead,
}

/// A small LRU of blocks, each with the bytes bulk readers took from it so far.
#[derive(Default)]
struct Lru {
    blocks: HashMap<u64, (Chunks, u64, u64)>,
    order: BTreeMap<u64, u64>,
    tick: u64,
}

impl Lru {
    fn get(&mut self, b: u64) -> Option<Chunks> {
        let (data, t, _) = self.blocks.get_mut(&b)?;
        self.order.remove(t);
        self.tick += 1;
        *t = self.tick;
        self.order.insert(self.tick, b);
        Some(data.clone())
    }

    fn contains(&self, b: u64) -> bool {
        self.blocks.contains_key(&b)
    }

    fn insert(&mut self, b: u64, data: Chunks, cap: usize) {
        self.tick += 1;
        if let Some((_, t, _)) = self.blocks.insert(b, (data, self.tick, 0)) {
            self.order.remove(&t);
        }
        self.order.insert(self.tick, b);
        while self.blocks.len() > cap {
            let Some((_, victim)) = self.order.pop_first() else {
                break;
            };
            self.blocks.remove(&victim);
        }
    }

    fn remove(&mut self, b: u64) {
        if let Some((_, t, _)) = self.blocks.remove(&b) {
            self.order.remove(&t);
        }
    }

    /// Count `n` more bytes of block `b` taken by a bulk reader; once as many as the block
    /// holds were taken it is dropped (see [`BULK_READ`]).
    fn consumed(&mut self, b: u64, n: u64) {
        let done = match self.blocks.get_mut(&b) {
            Some((data, _, used)) => {
                *used += n;
                *used >= data.len() as u64
            }
            None => false,
        };
        if done {
            self.remove(b);
        }
    }

    fn bytes(&self) -> u64 {
        self.blocks.values().map(|(d, _, _)| d.len() as u64).sum()
    }
}

/// Reads of at least this many bytes are bulk copies (stream, copy-on-read units, convert):
/// they take each byte once and keep it in a local image, so a block whose every byte such
/// readers took leaves the cache at once instead of crowding out blocks small readers reuse.
pub const BULK_READ: usize = 1 << 20;

#[derive(Default)]
struct State {
    cache: Lru,
    /// Blocks being fetched or queued, with the channel their result is published on.
    pending: HashMap<u64, watch::Sender<BlockResult>>,
    /// Queued blocks a foreground reader waits for.
    guest: BTreeSet<u64>,
    /// Queued blocks only background readers wait for.
    demand: BTreeSet<u64>,
    /// Queued read-ahead blocks.
    ahead: BTreeSet<u64>,
    /// GETs in flight.
    running: usize,
    /// Of those, GETs no foreground reader asked for.
    running_background: usize,
    /// The block after the end of the furthest read of the current sequential run
    /// (sequential detection).
    next: u64,
    /// Read-ahead window of the current sequential run, in blocks: [`HttpConfig::readahead`]
    /// at first, doubled at each refill while the run goes on, up to [`Inner::max_window`].
    window: u64,
    /// GETs issued (statistics, for tests and logs).
    requests: u64,
    /// Bytes received (statistics).
    fetched: u64,
    /// Reads that had to wait for a fetch, and how long they waited in all (statistics: a
    /// reader that never waits is fed by read-ahead).
    waits: u64,
    waited: std::time::Duration,
}

struct Inner {
    fetcher: Fetcher,
    cfg: HttpConfig,
    size: u64,
    state: Mutex<State>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn block_range(&self, b: u64) -> (u64, u64) {
        let start = b * self.cfg.block_size;
        (start, (start + self.cfg.block_size).min(self.size))
    }

    /// The largest read-ahead window (blocks): a full-size GET on every connection, within
    /// half the cache (at least [`HttpConfig::readahead`]).
    fn max_window(&self) -> u64 {
        let full = self.cfg.connections as u64 * self.cfg.max_blocks();
        full.min(self.cfg.cache_blocks() as u64 / 2)
            .max(self.cfg.readahead)
    }

    /// Start queued fetches while slots are free.
    fn dispatch(self: &Arc<Self>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        loop {
            let mut st = self.lock();
            if st.running >= self.cfg.connections {
                return;
            }
            let (first, foreground) = match st.guest.pop_first() {
                Some(b) => (b, true),
                None => {
                    if st.running_background >= self.background_max() {
                        return;
                    }
                    match st.demand.pop_first().or_else(|| st.ahead.pop_first()) {
                        Some(b) => (b, false),
                        None => return,
                    }
                }
            };
            // Merge the queued neighbours (whoever waits for them) into one GET.
            let max = self.cfg.max_blocks();
            let (mut lo, mut hi) = (first, first);
            let take = |st: &mut State, b: u64| {
                st.guest.remove(&b) || st.demand.remove(&b) || st.ahead.remove(&b)
            };
            while hi - lo + 1 < max && take(&mut st, hi + 1) {
                hi += 1;
            }
            while hi - lo + 1 < max && lo > 0 && take(&mut st, lo - 1) {
                lo -= 1;
            }
            st.running += 1;
            if !foreground {
                st.running_background += 1;
            }
            st.requests += 1;
            drop(st);
            let me = Arc::clone(self);
            rt.spawn(async move { me.fetch_blocks(lo, hi, foreground).await });
        }
    }

    /// GETs background readers may have in flight: all connections while no guest is active,
    /// else all but a reserve for the guest's blocks.
    fn background_max(&self) -> usize {
        let n = self.cfg.connections;
        if n < 2
            || !diskstream_block::foreground::busy(diskstream_block::foreground::DEFAULT_WINDOW)
        {
            return n.max(1);
        }
        n - (n / 4).max(1)
    }

    async fn fetch_blocks(self: Arc<Self>, lo: u64, hi: u64, foreground: bool) {
        let start = self.block_range(lo).0;
        let end = self.block_range(hi).1;
        let res = self.fetcher.fetch(start, end - start).await;
        let mut st = self.lock();
        if let Ok(data) = &res {
            st.fetched += data.len() as u64;
        }
        for b in lo..=hi {
            let (a, e) = self.block_range(b);
            let r = match &res {
                Ok(data) => {
                    // The block's share of the response's chunks (no copy): its memory is
                    // that of the chunks it overlaps, so the cache holds about
                    // `cache_bytes`, however the responses were merged.
                    let d = data.slice((a - start) as usize..(e - start) as usize);
                    st.cache.insert(b, d.clone(), self.cfg.cache_blocks());
                    Ok(d)
                }
                Err(err) => Err(err.clone()),
            };
            if let Some(tx) = st.pending.remove(&b) {
                let _ = tx.send(Some(r));
            }
        }
        st.running -= 1;
        if !foreground {
            st.running_background -= 1;
        }
        drop(st);
        self.dispatch();
    }

    /// Queue block `b` unless it is cached or pending (moving a queued block up when a
    /// more urgent reader comes to wait for it); returns a receiver when it is not cached.
    fn want(st: &mut State, b: u64, why: Want) -> Option<watch::Receiver<BlockResult>> {
        if let Some(tx) = st.pending.get(&b) {
            let rx = tx.subscribe();
            match why {
                Want::Guest => {
                    if st.ahead.remove(&b) || st.demand.remove(&b) {
                        st.guest.insert(b);
                    }
                }
                Want::Job => {
                    if st.ahead.remove(&b) {
                        st.demand.insert(b);
                    }
                }
                Want::Ahead => {}
            }
            return Some(rx);
        }
        let (tx, rx) = watch::channel(None);
        st.pending.insert(b, tx);
        match why {
            Want::Guest => st.guest.insert(b),
            Want::Job => st.demand.insert(b),
            Want::Ahead => st.ahead.insert(b),
        };
        Some(rx)
    }

    /// The blocks holding `[offset, end)` (`end` inside the object), in order: from the
    /// cache, or fetched (queued once however many readers want them).
    async fn blocks(self: &Arc<Self>, offset: u64, end: u64) -> Result<Vec<(u64, Chunks)>> {
        let bs = self.cfg.block_size;
        let (b0, b1) = (offset / bs, (end - 1) / bs);
        let last_block = (self.size - 1) / bs;
        let mut have: Vec<(u64, Chunks)> = Vec::new();
        let mut waits: Vec<(u64, watch::Receiver<BlockResult>)> = Vec::new();
        let why = if diskstream_block::priority::is_background() {
            Want::Job
        } else {
            Want::Guest
        };
        {
            let mut st = self.lock();
            for b in b0..=b1 {
                match st.cache.get(b) {
                    Some(d) => have.push((b, d)),
                    None => {
                        if let Some(rx) = Self::want(&mut st, b, why) {
                            waits.push((b, rx));
                        }
                    }
                }
            }
            // A sequential reader: keep a window of blocks ahead, refilled in batches (when
            // less than half of it is left) so read-ahead GETs stay large. The window grows
            // while the run goes on, until it keeps every connection busy with a full-size
            // GET: a stream or copy-on-read pass is then limited by the server's bandwidth,
            // not by one round trip per window. Reads that arrive a little late (parallel
            // readers of one stream finish out of order) belong to the run: they neither
            // trigger read-ahead nor move its head.
            let ra = self.cfg.readahead;
            let in_order = b0 == st.next || b0 + 1 == st.next;
            let late = b1 < st.next && b0 + self.max_window() >= st.next;
            if in_order {
                let win = st.window.max(ra);
                let mut f = b1 + 1;
                while f <= last_block && (st.cache.contains(f) || st.pending.contains_key(&f)) {
                    f += 1;
                }
                if ra > 0 && f - (b1 + 1) < win.div_ceil(2) {
                    for b in f..=(b1 + win).min(last_block) {
                        if !st.cache.contains(b) && !st.pending.contains_key(&b) {
                            let _ = Self::want(&mut st, b, Want::Ahead);
                        }
                    }
                    st.window = (win * 2).min(self.max_window());
                }
                st.next = b1 + 1;
            } else if !late {
                st.window = ra;
                st.next = b1 + 1;
            }
        }
        self.dispatch();
        let t0 = (!waits.is_empty()).then(std::time::Instant::now);
        let _remote = if waits.is_empty() {
            None
        } else {
            diskstream_block::priority::remote_begin()
        };
        for (b, mut rx) in waits {
            let r = rx
                .wait_for(Option::is_some)
                .await
                .map_err(|_| BlockError::Io {
                    context: format!("'{}': fetch of block {b} was abandoned", self.fetcher.url()),
                    source: std::io::Error::from_raw_os_error(5),
                })?
                .clone();
            match r {
                Some(Ok(d)) => have.push((b, d)),
                Some(Err(e)) => return Err(e.into()),
                None => {}
            }
        }
        if let Some(t0) = t0 {
            let mut st = self.lock();
            st.waits += 1;
            st.waited += t0.elapsed();
        }
        have.sort_unstable_by_key(|(b, _)| *b);
        Ok(have)
    }

    /// The part of block `b` inside `[offset, end)`, as offsets into the block.
    fn part(&self, b: u64, offset: u64, end: u64) -> std::ops::Range<usize> {
        let (a, e) = self.block_range(b);
        let from = a.max(offset);
        let to = e.min(end).max(from);
        (from - a) as usize..(to - a) as usize
    }

    /// After a bulk read: count what it took from each block (see [`BULK_READ`]).
    fn took(&self, blocks: &[(u64, Chunks)], offset: u64, end: u64) {
        if end - offset < BULK_READ as u64 {
            return;
        }
        let mut st = self.lock();
        for (b, _) in blocks {
            let r = self.part(*b, offset, end);
            st.cache.consumed(*b, r.len() as u64);
        }
    }

    /// Append `len` bytes at `offset` to `buf` (zeroes past the end of the object): one copy
    /// from the cached chunks into the buffer, nothing zero-filled that is then overwritten.
    async fn read_append(
        self: &Arc<Self>,
        offset: u64,
        mut buf: Vec<u8>,
        len: usize,
    ) -> Result<Vec<u8>> {
        let at = buf.len();
        let end = (offset + len as u64).min(self.size);
        if offset < end {
            let blocks = self.blocks(offset, end).await?;
            buf.reserve(len);
            for (b, d) in &blocks {
                d.extend_into(self.part(*b, offset, end), &mut buf);
            }
            self.took(&blocks, offset, end);
        }
        buf.resize(at + len, 0);
        Ok(buf)
    }

    /// Fill `buf` with the bytes at `offset` (zeroes past the end of the object).
    async fn read_at(self: &Arc<Self>, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = (offset + buf.len() as u64).min(self.size);
        let mut filled = 0;
        if offset < end {
            let blocks = self.blocks(offset, end).await?;
            for (b, d) in &blocks {
                let r = self.part(*b, offset, end);
                filled += d.copy_to(r.start, &mut buf[filled..filled + r.len()]);
            }
            self.took(&blocks, offset, end);
        }
        buf[filled..].fill(0);
        Ok(())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let st = self.lock();
        tracing::debug!(
            url = self.fetcher.url(),
            requests = st.requests,
            fetched = st.fetched,
            waits = st.waits,
            waited_ms = st.waited.as_millis() as u64,
            "closing the object"
        );
    }
}

/// A remote object (`http://`, `https://`, `s3://`) as read-only storage under a format
/// driver.
pub struct HttpProtocol {
    name: String,
    inner: Arc<Inner>,
}

impl HttpProtocol {
    /// Open the object at `url` (its size and validators are fetched now).
    pub async fn open(url: &str, cfg: &HttpConfig) -> std::result::Result<Self, HttpError> {
        let cfg = cfg.clone().normalized();
        let fetcher = Fetcher::open(url, &cfg).await?;
        let size = fetcher.info().size;
        Ok(HttpProtocol {
            name: url.to_string(),
            inner: Arc::new(Inner {
                fetcher,
                cfg,
                size,
                state: Mutex::new(State::default()),
            }),
        })
    }

    /// GETs issued so far (coalescing and caching show here).
    pub fn requests(&self) -> u64 {
        self.inner.lock().requests
    }

    /// Bytes received so far.
    pub fn fetched_bytes(&self) -> u64 {
        self.inner.lock().fetched
    }

    /// Bytes of blocks in the cache now (bounded by [`HttpConfig::cache_bytes`]).
    pub fn cached_bytes(&self) -> u64 {
        self.inner.lock().cache.bytes()
    }

    fn read_only_error(&self) -> BlockError {
        BlockError::ReadOnly(self.name.clone())
    }
}

#[async_trait]
impl Protocol for HttpProtocol {
    fn name(&self) -> &str {
        &self.name
    }
    fn read_only(&self) -> bool {
        true
    }
    fn remote(&self) -> bool {
        true
    }
    async fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.inner
            .read_append(offset, Vec::with_capacity(len), len)
            .await
    }
    async fn read_append(&self, offset: u64, buf: Vec<u8>, len: usize) -> Result<Vec<u8>> {
        self.inner.read_append(offset, buf, len).await
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read_at(offset, buf).await
    }
    async fn write_vec(&self, _offset: u64, _data: Vec<u8>) -> Result<()> {
        Err(self.read_only_error())
    }
    async fn write_zeroes(&self, _offset: u64, _len: u64, _unmap: bool) -> Result<()> {
        Err(self.read_only_error())
    }
    async fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(self.read_only_error())
    }
    async fn flush(&self) -> Result<()> {
        Ok(())
    }
    async fn len(&self) -> Result<u64> {
        Ok(self.inner.size)
    }
    async fn set_len(&self, _len: u64) -> Result<()> {
        Err(self.read_only_error())
    }
    async fn allocate(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(self.read_only_error())
    }
    async fn data_status(&self, offset: u64, len: u64) -> Result<(bool, u64)> {
        // An object has no holes we could know of: all data, zero past its end.
        if offset >= self.inner.size {
            return Ok((false, len));
        }
        Ok((true, len.min(self.inner.size - offset)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn lru_evicts_least_recent() {
        let mut l = Lru::default();
        for b in 0..3 {
            l.insert(b, Chunks::from(Bytes::from(vec![b as u8])), 2);
        }
        assert!(!l.contains(0));
        assert!(l.get(1).is_some());
        l.insert(3, Chunks::from(Bytes::from(vec![3])), 2);
        assert!(l.contains(1) && l.contains(3) && !l.contains(2));
    }

    #[test]
    fn lru_drops_blocks_bulk_readers_took_whole() {
        let mut l = Lru::default();
        l.insert(0, Chunks::from(Bytes::from(vec![0u8; 100])), 4);
        l.consumed(0, 60);
        assert!(l.contains(0));
        assert_eq!(l.bytes(), 100);
        l.consumed(0, 40);
        assert!(!l.contains(0));
        assert_eq!(l.bytes(), 0);
        l.consumed(7, 1);
    }
}
