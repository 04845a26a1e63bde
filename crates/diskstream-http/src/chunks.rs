//! A byte range held as the pieces it arrived in: the body chunks of one or more HTTP
//! responses, kept as they were received (no copy into one contiguous buffer).
//!
//! A response body arrives as chunks that are slices of the HTTP client's read buffers.
//! Collecting them into one buffer costs a copy of every byte; cutting a merged response into
//! cache blocks by slicing one big buffer ties the whole response's memory to its last cached
//! block. Kept as chunk lists, a block is a few slices of the read buffers it needs (memory
//! follows the bytes cached), and the only user-space copy left is the one into the reader's
//! buffer.

use bytes::Bytes;
use std::ops::Range;

/// Bytes as a list of pieces, in order.
#[derive(Clone, Debug, Default)]
pub struct Chunks {
    parts: Vec<Bytes>,
    len: usize,
}

impl Chunks {
    /// No bytes.
    pub fn new() -> Chunks {
        Chunks::default()
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Append a piece (empty pieces are dropped).
    pub fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.len += b.len();
            self.parts.push(b);
        }
    }

    /// Append every piece of `other`.
    pub fn append(&mut self, other: Chunks) {
        for b in other.parts {
            self.push(b);
        }
    }

    /// The bytes `range` (clamped to the length) as pieces sharing the same buffers.
    pub fn slice(&self, range: Range<usize>) -> Chunks {
        let (start, end) = (range.start.min(self.len), range.end.min(self.len));
        let mut out = Chunks::new();
        if start >= end {
            return out;
        }
        let mut pos = 0;
        for p in &self.parts {
            let (a, b) = (pos, pos + p.len());
            pos = b;
            if b <= start {
                continue;
            }
            if a >= end {
                break;
            }
            out.push(p.slice(start.max(a) - a..end.min(b) - a));
        }
        out
    }

    /// Copy the bytes starting at `from` into `dst` (as many as `dst` holds); returns how many
    /// were copied (fewer when the chunks end first).
    pub fn copy_to(&self, from: usize, dst: &mut [u8]) -> usize {
        let mut pos = 0;
        let mut done = 0;
        for p in &self.parts {
            if done == dst.len() {
                break;
            }
            let (a, b) = (pos, pos + p.len());
            pos = b;
            if b <= from {
                continue;
            }
            let skip = from.max(a) - a;
            let n = (p.len() - skip).min(dst.len() - done);
            dst[done..done + n].copy_from_slice(&p[skip..skip + n]);
            done += n;
        }
        done
    }

    /// Append the bytes `range` (clamped to the length) to `out`; returns how many were
    /// appended.
    pub fn extend_into(&self, range: Range<usize>, out: &mut Vec<u8>) -> usize {
        let (start, end) = (range.start.min(self.len), range.end.min(self.len));
        if start >= end {
            return 0;
        }
        out.reserve(end - start);
        let mut pos = 0;
        for p in &self.parts {
            let (a, b) = (pos, pos + p.len());
            pos = b;
            if b <= start {
                continue;
            }
            if a >= end {
                break;
            }
            out.extend_from_slice(&p[start.max(a) - a..end.min(b) - a]);
        }
        end - start
    }

    /// All bytes in one buffer (a copy unless there is a single piece).
    pub fn to_bytes(&self) -> Bytes {
        match self.parts.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            _ => {
                let mut v = Vec::with_capacity(self.len);
                for p in &self.parts {
                    v.extend_from_slice(p);
                }
                Bytes::from(v)
            }
        }
    }

    /// How many pieces there are.
    pub fn pieces(&self) -> usize {
        self.parts.len()
    }
}

impl From<Bytes> for Chunks {
    fn from(b: Bytes) -> Chunks {
        let mut c = Chunks::new();
        c.push(b);
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Chunks, Vec<u8>) {
        let data: Vec<u8> = (0..100u8).collect();
        let mut c = Chunks::new();
        for r in [0..7, 7..7, 7..40, 40..41, 41..100] {
            c.push(Bytes::copy_from_slice(&data[r]));
        }
        (c, data)
    }

    #[test]
    fn slices_and_copies_match_the_bytes() {
        let (c, data) = sample();
        assert_eq!(c.len(), 100);
        assert_eq!(c.pieces(), 4);
        assert_eq!(&c.to_bytes()[..], &data[..]);
        for (a, b) in [
            (0, 100),
            (0, 7),
            (3, 45),
            (40, 41),
            (41, 100),
            (99, 100),
            (50, 50),
        ] {
            let s = c.slice(a..b);
            assert_eq!(&s.to_bytes()[..], &data[a..b], "{a}..{b}");
            let mut dst = vec![0u8; b - a];
            assert_eq!(c.copy_to(a, &mut dst), b - a);
            assert_eq!(dst, &data[a..b]);
            let mut out = vec![9u8];
            assert_eq!(c.extend_into(a..b, &mut out), b - a);
            assert_eq!(&out[1..], &data[a..b]);
        }
        // Past the end: clamped.
        assert_eq!(c.slice(90..200).len(), 10);
        let mut dst = [0u8; 20];
        assert_eq!(c.copy_to(90, &mut dst), 10);
        assert_eq!(&dst[..10], &data[90..]);
        let mut out = Vec::new();
        assert_eq!(c.extend_into(120..130, &mut out), 0);
    }
}
