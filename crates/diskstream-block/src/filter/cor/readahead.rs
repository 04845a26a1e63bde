//! Sequential-access detection for copy-on-read read-ahead.
//!
//! The filter remembers a few recent read streams (where each is expected to continue). A read
//! that starts within one fetch unit of a stream's expected position continues it; from its
//! second read on, a stream asks for the next `readahead` units past its current position.
//! Each stream keeps a frontier (the last unit already requested) so that a sequential reader
//! triggers each unit's read-ahead once, not once per guest request. Several interleaved
//! sequential readers (guest threads, a `qemu-img convert` with parallel requests arriving out
//! of order) each get a slot; the least recently used slot is recycled.

use std::ops::Range;

/// Streams tracked at once.
const SLOTS: usize = 8;

#[derive(Clone, Copy, Debug)]
struct Slot {
    /// Where the stream is expected to continue.
    next: u64,
    /// Last unit read ahead (or read) for this stream.
    frontier: u64,
    /// Logical time of the last read that touched the slot.
    used: u64,
}

/// The recent read streams of one filter.
#[derive(Debug, Default)]
pub(super) struct Streams {
    slots: Vec<Slot>,
    tick: u64,
}

impl Streams {
    /// Record a guest read of `[start, end)` (`end > start`); returns the units to read ahead
    /// when the read continues a stream. `units` is the number of units in the device.
    pub fn access(
        &mut self,
        start: u64,
        end: u64,
        unit: u64,
        readahead: u32,
        units: u64,
    ) -> Option<Range<u64>> {
        self.tick += 1;
        let tick = self.tick;
        let last = (end - 1) / unit;
        if let Some(s) = self
            .slots
            .iter_mut()
            .find(|s| start.abs_diff(s.next) <= unit)
        {
            s.used = tick;
            s.next = s.next.max(end);
            if readahead == 0 || units == 0 {
                return None;
            }
            let from = (last + 1).max(s.frontier.saturating_add(1));
            let to = last.saturating_add(u64::from(readahead)).min(units - 1);
            if from > to {
                return None;
            }
            s.frontier = to;
            return Some(from..to + 1);
        }
        let slot = Slot {
            next: end,
            frontier: last,
            used: tick,
        };
        if self.slots.len() < SLOTS {
            self.slots.push(slot);
        } else if let Some(lru) = self.slots.iter_mut().min_by_key(|s| s.used) {
            *lru = slot;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: u64 = 1 << 20;

    #[test]
    fn sequential_reads_trigger_each_unit_once() {
        let mut s = Streams::default();
        // First read: no evidence of a stream yet.
        assert_eq!(s.access(0, 64 << 10, U, 4, 100), None);
        // Continuing reads: the next four units, then one more per unit crossed.
        assert_eq!(s.access(64 << 10, 128 << 10, U, 4, 100), Some(1..5));
        assert_eq!(s.access(128 << 10, 192 << 10, U, 4, 100), None);
        let mut pos = 192 << 10;
        while pos < U {
            assert_eq!(s.access(pos, pos + (64 << 10), U, 4, 100), None);
            pos += 64 << 10;
        }
        assert_eq!(s.access(U, U + (64 << 10), U, 4, 100), Some(5..6));
    }

    #[test]
    fn random_reads_do_not_read_ahead_and_the_end_is_respected() {
        let mut s = Streams::default();
        for i in 0..20u64 {
            let off = (i * 7919 % 97) * 10 * U;
            assert_eq!(s.access(off, off + 4096, U, 4, 1000), None, "read {i}");
        }
        let mut s = Streams::default();
        assert_eq!(s.access(0, U, U, 4, 3), None);
        assert_eq!(s.access(U, 2 * U, U, 4, 3), Some(2..3));
        assert_eq!(s.access(2 * U, 3 * U, U, 4, 3), None);
        // Read-ahead disabled.
        let mut s = Streams::default();
        assert_eq!(s.access(0, U, U, 0, 3), None);
        assert_eq!(s.access(U, 2 * U, U, 0, 3), None);
    }

    #[test]
    fn interleaved_streams_each_keep_their_slot() {
        let mut s = Streams::default();
        let a = 0;
        let b = 500 * U;
        assert_eq!(s.access(a, a + U, U, 2, 1000), None);
        assert_eq!(s.access(b, b + U, U, 2, 1000), None);
        assert_eq!(s.access(a + U, a + 2 * U, U, 2, 1000), Some(2..4));
        assert_eq!(s.access(b + U, b + 2 * U, U, 2, 1000), Some(502..504));
    }
}
