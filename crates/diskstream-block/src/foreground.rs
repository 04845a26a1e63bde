//! Foreground (guest) I/O activity, process-wide, so background jobs can step back.
//!
//! A stream or copy job that keeps many chunk copies in flight finishes sooner, but on a
//! small machine every one of those copies competes with the guest for the same CPUs, I/O
//! threads and disk: a 4 KiB guest read queues behind megabytes of copying. The benchmark
//! (docs/BENCHMARKS.md, guest latency during a stream) showed guest p99 latencies 3-4x QEMU's
//! with eight copies in flight and on par with one. So jobs ask [`busy`] before issuing
//! another copy and, while a guest is doing I/O, keep fewer copies in flight; when the guest
//! goes quiet they use the machine again.
//!
//! Every request a front end (an NBD export) starts through a
//! [`BlockBackend`](crate::BlockBackend) holds a [`Guard`]. The clock is process-wide on
//! purpose: the devices of one daemon share the CPUs and I/O threads, so a busy guest on any
//! of them is a reason for every background job to yield.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
/// When the last foreground request ended, in nanoseconds since [`epoch`] (0: never).
static LAST_END_NS: AtomicU64 = AtomicU64::new(0);

/// How long after its last request a guest still counts as busy: long enough to span the
/// gaps of a queue-depth-1 guest doing a few hundred requests per second.
pub const DEFAULT_WINDOW: Duration = Duration::from_millis(100);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    // Never 0 (which means "never"): offset by one.
    u64::try_from(epoch().elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

/// A foreground request in progress; it counts as activity until dropped.
#[derive(Debug)]
pub struct Guard(());

impl Drop for Guard {
    fn drop(&mut self) {
        LAST_END_NS.store(now_ns(), Ordering::Relaxed);
        IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Mark the start of a foreground request.
pub fn begin() -> Guard {
    // Make sure the epoch exists before the first end is recorded.
    let _ = epoch();
    IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
    Guard(())
}

/// Whether a foreground request is in flight or ended less than `window` ago.
pub fn busy(window: Duration) -> bool {
    if IN_FLIGHT.load(Ordering::Relaxed) > 0 {
        return true;
    }
    let last = LAST_END_NS.load(Ordering::Relaxed);
    last != 0
        && now_ns().saturating_sub(last) < u64::try_from(window.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_makes_the_process_busy_for_the_window() {
        let g = begin();
        assert!(busy(Duration::ZERO));
        drop(g);
        assert!(busy(Duration::from_secs(3600)));
    }
}
