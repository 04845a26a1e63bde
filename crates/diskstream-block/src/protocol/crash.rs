//! A crash-simulating protocol for the reliability suite: storage that can "lose power".
//!
//! It behaves like an in-memory file, but it remembers which bytes are durable: everything
//! written before the last completed [`Protocol::flush`] is; everything written since is only
//! in a volatile cache. At a chosen point (the N-th mutating operation, counting writes,
//! zeroing, discards, length changes and flushes) the power goes: that operation and every later
//! one fail with EIO, and [`CrashProtocol::surviving_image`] builds what a disk could hold
//! afterwards: the durable bytes plus an arbitrary part of the volatile writes. Two models of
//! "arbitrary":
//!
//! * [`Survival::Ops`]: each volatile operation either reached the disk whole or not at all,
//!   in issue order (a disk that reorders but never tears).
//! * [`Survival::Sectors`]: each 512-byte sector independently holds any version it had since
//!   the last flush, or its durable one (a disk that tears writes at sector granularity and
//!   reorders everything: the strongest adversary a correct format must survive).
//!
//! The file length survives as either its durable or its latest value. Nothing here is
//! random by itself: the caller passes the random source, so a failing case replays from its
//! seed.
//!
//! Several files can share one [`Power`] supply ([`CrashProtocol::on_power`]): the mutating
//! operations of all of them are counted together and the power goes for all of them at the
//! same point, as for the files of one backing chain (or a mirror's source and target) on one
//! machine. Each file keeps its own volatile cache: what survives is chosen per file.

use super::Protocol;
use crate::error::{BlockError, Result};
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Granularity at which [`Survival::Sectors`] tears writes.
pub const SECTOR: u64 = 512;

/// How much of the volatile state survives a crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Survival {
    /// Whole operations survive or vanish (in issue order).
    Ops,
    /// Every sector independently keeps any of its versions since the last flush.
    Sectors,
}

/// One volatile change since the last flush.
#[derive(Clone, Debug)]
enum Change {
    /// Bytes written at an offset.
    Write(u64, Arc<Vec<u8>>),
    /// Bytes made zero (write-zeroes, discard, allocate beyond the end).
    Zero(u64, u64),
    /// The length set.
    SetLen(u64),
}

struct State {
    durable: Vec<u8>,
    current: Vec<u8>,
    pending: Vec<Change>,
    flushes: u64,
    /// Every mutating operation performed: (kind, offset, length).
    log: Vec<(&'static str, u64, u64)>,
}

/// The power supply of one or more [`CrashProtocol`] files: it counts their mutating
/// operations together and fails every one from the crash point on.
pub struct Power {
    /// (operations performed, crash point).
    inner: Mutex<(u64, Option<u64>)>,
    /// With [`Power::interleaved`]: the choices of where operations yield to other tasks.
    yields: Option<Mutex<Choices>>,
}

impl Power {
    /// A supply that goes before mutating operation number `crash_at` (0-based, counted over
    /// every file on it; `None`: never).
    pub fn new(crash_at: Option<u64>) -> Arc<Power> {
        Arc::new(Power {
            inner: Mutex::new((0, crash_at)),
            yields: None,
        })
    }

    /// Like [`Power::new`], but every operation (reads too) of a file on this supply first
    /// yields to the other tasks of the runtime or not, as the seeded `seed` chooses: on a
    /// single-threaded runtime, tasks racing on these files (a job and a guest) then interleave
    /// at storage operations, reproducibly for a seed.
    pub fn interleaved(crash_at: Option<u64>, seed: u64) -> Arc<Power> {
        Arc::new(Power {
            inner: Mutex::new((0, crash_at)),
            yields: Some(Mutex::new(Choices::new(seed))),
        })
    }

    async fn maybe_yield(&self) {
        let y = self
            .yields
            .as_ref()
            .is_some_and(|c| c.lock().unwrap_or_else(|p| p.into_inner()).below(2) == 0);
        if y {
            YieldOnce(false).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, Option<u64>)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Count one operation; false if the power is gone (then it is not counted).
    fn tick(&self) -> bool {
        let mut g = self.lock();
        if g.1.is_some_and(|c| g.0 >= c) {
            return false;
        }
        g.0 += 1;
        true
    }

    /// Mutating operations performed so far on every file of this supply.
    pub fn ops(&self) -> u64 {
        self.lock().0
    }

    /// Whether the power is gone.
    pub fn crashed(&self) -> bool {
        let g = self.lock();
        g.1.is_some_and(|c| g.0 >= c)
    }
}

/// Gives the other ready tasks a turn: pending once, with the task woken at once. (Unlike
/// `tokio::task::yield_now`, it does not poll the runtime's drivers each time, which would
/// cost a system call per storage operation.)
struct YieldOnce(bool);

impl std::future::Future for YieldOnce {
    type Output = ();
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

/// Crash-simulating in-memory storage (see the module documentation).
pub struct CrashProtocol {
    name: String,
    power: Arc<Power>,
    state: Mutex<State>,
}

/// A small deterministic generator for the survival choices (xorshift64*), so this module
/// needs no dependency and a seed reproduces a case exactly.
pub struct Choices(u64);

impl Choices {
    /// A generator from a seed (0 is remapped: xorshift must not start at zero).
    pub fn new(seed: u64) -> Self {
        Choices(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// The next value below `n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

impl CrashProtocol {
    /// Storage holding `data` (all durable), that crashes before mutating operation number
    /// `crash_at` (0-based; `None`: never).
    pub fn new(name: &str, data: Vec<u8>, crash_at: Option<u64>) -> Self {
        Self::on_power(name, data, Power::new(crash_at))
    }

    /// Storage holding `data` (all durable) on the shared supply `power`.
    pub fn on_power(name: &str, data: Vec<u8>, power: Arc<Power>) -> Self {
        CrashProtocol {
            name: name.to_string(),
            power,
            state: Mutex::new(State {
                durable: data.clone(),
                current: data,
                pending: Vec::new(),
                flushes: 0,
                log: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| BlockError::io(self.name.clone(), std::io::Error::other("poisoned")))
    }

    /// Count a mutating operation; fail it if the power is gone.
    fn tick(&self, s: &mut State, kind: &'static str, offset: u64, len: u64) -> Result<()> {
        if !self.power.tick() {
            return Err(BlockError::io(
                self.name.clone(),
                std::io::Error::from_raw_os_error(5),
            ));
        }
        s.log.push((kind, offset, len));
        Ok(())
    }

    /// The mutating operations performed so far, in order: (kind, offset, length). For
    /// explaining a failing crash case.
    pub fn log(&self) -> Vec<(&'static str, u64, u64)> {
        self.lock().map(|s| s.log.clone()).unwrap_or_default()
    }

    /// Mutating operations performed so far (the crash points a run offers), counted over
    /// every file on this file's supply.
    pub fn ops(&self) -> u64 {
        self.power.ops()
    }

    /// Flushes completed so far.
    pub fn flushes(&self) -> u64 {
        self.lock().map(|s| s.flushes).unwrap_or(0)
    }

    /// Whether the power is gone.
    pub fn crashed(&self) -> bool {
        self.power.crashed()
    }

    /// The bytes as the running system sees them (durable and volatile).
    pub fn current(&self) -> Vec<u8> {
        self.lock().map(|s| s.current.clone()).unwrap_or_default()
    }

    /// What the disk could hold after the crash, choosing with `rng` among what may have
    /// survived (see [`Survival`]).
    pub fn surviving_image(&self, mode: Survival, rng: &mut Choices) -> Vec<u8> {
        let Ok(s) = self.lock() else {
            return Vec::new();
        };
        let final_len = if rng.below(2) == 0 {
            s.durable.len()
        } else {
            s.current.len()
        };
        match mode {
            Survival::Ops => {
                // A chosen operation lands as the whole sectors it touched, as they were in the
                // cache right after it: storage persists sectors (pages), never the bytes of a
                // partial-sector write on their own.
                let mut cache = s.durable.clone();
                let mut out = s.durable.clone();
                for c in &s.pending {
                    apply(&mut cache, c);
                    if rng.below(2) == 0 {
                        continue;
                    }
                    if let Change::SetLen(l) = c {
                        out.resize(*l as usize, 0);
                        continue;
                    }
                    let (start, end) = change_range(c, s.durable.len() as u64);
                    let lo = ((start / SECTOR) * SECTOR) as usize;
                    let hi = (end.div_ceil(SECTOR) * SECTOR).min(cache.len() as u64) as usize;
                    if out.len() < hi {
                        out.resize(hi, 0);
                    }
                    if lo < hi {
                        out[lo..hi].copy_from_slice(&cache[lo..hi]);
                    }
                }
                out.resize(final_len, 0);
                out
            }
            Survival::Sectors => {
                // Every version each touched sector had, in order, after the durable one.
                let mut versions: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
                let mut img = s.durable.clone();
                for c in &s.pending {
                    apply(&mut img, c);
                    let (start, end) = change_range(c, s.durable.len() as u64);
                    let mut sec = start / SECTOR;
                    while sec * SECTOR < end {
                        versions.entry(sec).or_default().push(sector_of(&img, sec));
                        sec += 1;
                    }
                }
                let mut out = s.durable.clone();
                let max_len = s.durable.len().max(s.current.len());
                out.resize(max_len, 0);
                for (sec, vs) in versions {
                    let pick = rng.below(vs.len() as u64 + 1) as usize;
                    let lo = (sec * SECTOR) as usize;
                    if lo >= max_len {
                        continue;
                    }
                    let hi = (lo + SECTOR as usize).min(max_len);
                    if pick == 0 {
                        let durable = sector_of(&s.durable, sec);
                        out[lo..hi].copy_from_slice(&durable[..hi - lo]);
                    } else {
                        out[lo..hi].copy_from_slice(&vs[pick - 1][..hi - lo]);
                    }
                }
                out.resize(final_len, 0);
                out
            }
        }
    }
}

/// The byte range a change touches (a length change: between the durable and new length).
fn change_range(c: &Change, durable_len: u64) -> (u64, u64) {
    match c {
        Change::Write(o, d) => (*o, o + d.len() as u64),
        Change::Zero(o, l) => (*o, o + l),
        Change::SetLen(l) => (durable_len.min(*l), durable_len.max(*l)),
    }
}

fn sector_of(img: &[u8], sec: u64) -> Vec<u8> {
    let lo = ((sec * SECTOR) as usize).min(img.len());
    let hi = ((sec * SECTOR + SECTOR) as usize).min(img.len());
    let mut v = img[lo..hi].to_vec();
    v.resize(SECTOR as usize, 0);
    v
}

fn apply(img: &mut Vec<u8>, c: &Change) {
    match c {
        Change::Write(o, d) => {
            let end = *o as usize + d.len();
            if img.len() < end {
                img.resize(end, 0);
            }
            img[*o as usize..end].copy_from_slice(d);
        }
        Change::Zero(o, l) => {
            let end = (*o + *l) as usize;
            if img.len() < end {
                img.resize(end, 0);
            }
            img[*o as usize..end].fill(0);
        }
        Change::SetLen(l) => img.resize(*l as usize, 0),
    }
}

impl State {
    fn record(&mut self, c: Change) {
        apply(&mut self.current, &c);
        self.pending.push(c);
    }
}

#[async_trait]
impl Protocol for CrashProtocol {
    fn name(&self) -> &str {
        &self.name
    }
    fn read_only(&self) -> bool {
        false
    }
    async fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.power.maybe_yield().await;
        let s = self.lock()?;
        let mut out = vec![0u8; len];
        let start = (offset as usize).min(s.current.len());
        let end = (offset.saturating_add(len as u64) as usize).min(s.current.len());
        if start < end {
            out[..end - start].copy_from_slice(&s.current[start..end]);
        }
        Ok(out)
    }
    async fn write_vec(&self, offset: u64, data: Vec<u8>) -> Result<()> {
        self.power.maybe_yield().await;
        let mut s = self.lock()?;
        self.tick(&mut s, "write", offset, data.len() as u64)?;
        s.record(Change::Write(offset, Arc::new(data)));
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<()> {
        self.power.maybe_yield().await;
        let mut s = self.lock()?;
        self.tick(&mut s, "zero", offset, len)?;
        s.record(Change::Zero(offset, len));
        Ok(())
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.power.maybe_yield().await;
        // A file system punches the hole: the range reads as zero once it lands.
        let mut s = self.lock()?;
        self.tick(&mut s, "discard", offset, len)?;
        let end = (offset + len).min(s.current.len() as u64);
        if end > offset {
            s.record(Change::Zero(offset, end - offset));
        }
        Ok(())
    }
    async fn flush(&self) -> Result<()> {
        self.power.maybe_yield().await;
        let mut s = self.lock()?;
        self.tick(&mut s, "flush", 0, 0)?;
        // The cache reaches the disk: replay it onto the durable bytes (cheaper than copying
        // the whole current image for the usual few changes).
        let pending = std::mem::take(&mut s.pending);
        for c in &pending {
            apply(&mut s.durable, c);
        }
        s.flushes += 1;
        Ok(())
    }
    async fn len(&self) -> Result<u64> {
        Ok(self.lock()?.current.len() as u64)
    }
    async fn set_len(&self, len: u64) -> Result<()> {
        self.power.maybe_yield().await;
        let mut s = self.lock()?;
        self.tick(&mut s, "set_len", len, 0)?;
        s.record(Change::SetLen(len));
        Ok(())
    }
    async fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        self.power.maybe_yield().await;
        let mut s = self.lock()?;
        self.tick(&mut s, "allocate", offset, len)?;
        let end = offset + len;
        if end > s.current.len() as u64 {
            let cur = s.current.len() as u64;
            s.record(Change::Zero(cur, end - cur));
        }
        Ok(())
    }
    async fn data_status(&self, _offset: u64, len: u64) -> Result<(bool, u64)> {
        Ok((true, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_flushed_writes_are_certain() {
        let p = CrashProtocol::new("t", vec![0; 1024], Some(3));
        p.write_vec(0, vec![1; 512]).await.expect("op 0");
        p.flush().await.expect("op 1");
        p.write_vec(512, vec![2; 512]).await.expect("op 2");
        assert!(p.write_vec(0, vec![3; 512]).await.is_err(), "op 3 crashes");
        assert!(p.crashed());
        for seed in 0..32 {
            for mode in [Survival::Ops, Survival::Sectors] {
                let img = p.surviving_image(mode, &mut Choices::new(seed));
                assert_eq!(&img[..512], &[1; 512][..], "flushed data survives");
                assert!(img[512..1024].iter().all(|&b| b == 0) || img[512..1024] == [2; 512]);
            }
        }
    }

    #[tokio::test]
    async fn a_shared_supply_fails_every_file_at_once() {
        let power = Power::new(Some(2));
        let a = CrashProtocol::on_power("a", vec![0; 512], Arc::clone(&power));
        let b = CrashProtocol::on_power("b", vec![0; 512], Arc::clone(&power));
        a.write_vec(0, vec![1; 512]).await.expect("op 0");
        b.write_vec(0, vec![2; 512]).await.expect("op 1");
        assert!(a.flush().await.is_err(), "op 2 crashes");
        assert!(b.flush().await.is_err(), "and every later one, on any file");
        assert!(a.crashed() && b.crashed());
        assert_eq!((a.ops(), b.ops(), power.ops()), (2, 2, 2));
    }
}
