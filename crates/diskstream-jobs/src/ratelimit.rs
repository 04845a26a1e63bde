//! Token-bucket rate limiting in 100 ms slices, with QEMU's accounting (`ratelimit.h`).
//!
//! A job asks for the delay before its next request and reports the bytes it moved. Within a
//! slice, requests go out until the slice's quota is used; a request may overshoot, and the
//! overshoot is paid for by a proportionally longer wait before the next one, so the average
//! rate holds whatever the request size. Unlike QEMU (whose quota is at least one byte per
//! slice, i.e. 10 B/s at `speed=1`), the quota is fractional: 1 B/s really averages 1 B/s,
//! and a request is never refused, so the job always makes progress.

use std::time::{Duration, Instant};

/// QEMU's `BLOCK_JOB_SLICE_TIME`.
pub const SLICE: Duration = Duration::from_millis(100);

/// A rate limiter; `speed == 0` disables it.
#[derive(Debug, Clone)]
pub struct RateLimit {
    speed: u64,
    quota: f64,
    slice_start: Instant,
    slice_end: Instant,
    dispatched: u64,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit::new(0)
    }
}

impl RateLimit {
    /// A limiter at `speed` bytes per second (0 = unlimited).
    pub fn new(speed: u64) -> Self {
        let now = Instant::now();
        let mut r = RateLimit {
            speed: 0,
            quota: 0.0,
            slice_start: now,
            slice_end: now,
            dispatched: 0,
        };
        r.set_speed(speed);
        r
    }

    /// The configured speed.
    pub fn speed(&self) -> u64 {
        self.speed
    }

    /// Change the speed; the bytes already accounted in the current slice are kept, so a
    /// change takes effect on the wait that is in progress.
    pub fn set_speed(&mut self, speed: u64) {
        self.speed = speed;
        self.quota = speed as f64 * SLICE.as_secs_f64();
    }

    /// Account `n` bytes and return how long to wait before the next request (zero: go on).
    pub fn calculate_delay(&mut self, n: u64, now: Instant) -> Duration {
        if self.speed == 0 {
            return Duration::ZERO;
        }
        if self.slice_end < now {
            self.slice_start = now;
            self.slice_end = now + SLICE;
            self.dispatched = 0;
        }
        self.dispatched = self.dispatched.saturating_add(n);
        if (self.dispatched as f64) < self.quota {
            return Duration::ZERO;
        }
        let slices = self.dispatched as f64 / self.quota;
        let span = SLICE.as_secs_f64() * slices;
        // Cap absurd waits (1 B/s after a 1 MiB request is 12 days: still honest, but keep
        // the arithmetic in range).
        let span = Duration::from_secs_f64(span.min(1e9));
        self.slice_end = self.slice_start + span;
        self.slice_end.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let mut r = RateLimit::new(0);
        assert_eq!(r.calculate_delay(1 << 30, Instant::now()), Duration::ZERO);
    }

    #[test]
    fn average_rate_holds() {
        // Simulated clock: 4 MiB/s with 1 MiB requests for 10 simulated seconds.
        let mut r = RateLimit::new(4 << 20);
        let t0 = Instant::now();
        let mut now = t0;
        let mut sent = 0u64;
        while now < t0 + Duration::from_secs(10) {
            let d = r.calculate_delay(0, now);
            if d > Duration::ZERO {
                now += d;
                continue;
            }
            r.calculate_delay(1 << 20, now);
            sent += 1 << 20;
        }
        let rate = sent as f64 / 10.0;
        assert!(
            (rate - (4 << 20) as f64).abs() < (1 << 20) as f64,
            "rate {rate}"
        );
    }

    #[test]
    fn one_byte_per_second_progresses_and_obeys() {
        let mut r = RateLimit::new(1);
        let now = Instant::now();
        // The first request always goes out.
        assert_eq!(r.calculate_delay(0, now), Duration::ZERO);
        r.calculate_delay(100, now);
        let d = r.calculate_delay(0, now);
        assert!(
            d >= Duration::from_secs(99) && d <= Duration::from_secs(101),
            "{d:?}"
        );
    }

    #[test]
    fn raising_the_speed_shortens_the_wait() {
        let mut r = RateLimit::new(1024);
        let now = Instant::now();
        r.calculate_delay(10240, now);
        let slow = r.calculate_delay(0, now);
        r.set_speed(1 << 20);
        let fast = r.calculate_delay(0, now);
        assert!(fast < slow);
    }
}
