//! A connection's in-flight slots, with a priority lane for foreground requests.
//!
//! Like a semaphore of `total` permits, with two differences that make guest requests go
//! ahead of a block job's (see [`diskstream_block::priority`]):
//!
//! * when a slot frees, a waiting foreground request gets it before any waiting background
//!   request, whatever the order they arrived in;
//! * background requests hold at most `total - reserve` slots together, so `reserve` slots
//!   are only ever used by foreground requests: a guest request arriving while a job keeps
//!   the connection busy is sent at once instead of waiting for one of the job's requests to
//!   finish.
//!
//! Waiting is cancel-safe: a waiter dropped after being granted a slot gives it back.

use diskstream_block::priority::IoClass;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::oneshot;

/// Slots kept for foreground requests: an eighth of the total, at least one (none when the
/// connection has a single slot, which both classes share, foreground first).
pub(crate) fn reserve_for(total: usize) -> usize {
    if total <= 1 {
        0
    } else {
        (total / 8).max(1)
    }
}

#[derive(Default)]
struct State {
    free: usize,
    background_held: usize,
    closed: bool,
    foreground: VecDeque<oneshot::Sender<()>>,
    background: VecDeque<oneshot::Sender<()>>,
}

/// The slots of one connection.
pub(crate) struct Slots {
    state: Mutex<State>,
    background_max: usize,
}

/// A held slot; released on drop.
pub(crate) struct SlotPermit {
    slots: Arc<Slots>,
    class: IoClass,
}

impl Drop for SlotPermit {
    fn drop(&mut self) {
        self.slots.release(self.class);
    }
}

/// The slots were closed (the connection died).
#[derive(Debug)]
pub(crate) struct Closed;

/// A queued acquire; gives a slot granted after it stopped waiting back.
struct Waiter {
    rx: oneshot::Receiver<()>,
    slots: Arc<Slots>,
    class: IoClass,
    done: bool,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.rx.close();
        if self.rx.try_recv().is_ok() {
            self.slots.release(self.class);
        }
    }
}

impl Slots {
    /// `total` slots (at least one), [`reserve_for`]`(total)` of them foreground-only.
    pub(crate) fn new(total: usize) -> Arc<Slots> {
        let total = total.max(1);
        Arc::new(Slots {
            state: Mutex::new(State {
                free: total,
                ..State::default()
            }),
            background_max: (total - reserve_for(total)).max(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take a slot for a request of `class`, waiting for one if needed.
    pub(crate) async fn acquire(self: &Arc<Self>, class: IoClass) -> Result<SlotPermit, Closed> {
        let rx = {
            let mut st = self.lock();
            if st.closed {
                return Err(Closed);
            }
            let now = match class {
                IoClass::Foreground => st.free > 0 && st.foreground.is_empty(),
                IoClass::Background => {
                    st.free > 0
                        && st.foreground.is_empty()
                        && st.background.is_empty()
                        && st.background_held < self.background_max
                }
            };
            if now {
                st.free -= 1;
                if class == IoClass::Background {
                    st.background_held += 1;
                }
                return Ok(SlotPermit {
                    slots: Arc::clone(self),
                    class,
                });
            }
            let (tx, rx) = oneshot::channel();
            match class {
                IoClass::Foreground => st.foreground.push_back(tx),
                IoClass::Background => st.background.push_back(tx),
            }
            rx
        };
        let mut w = Waiter {
            rx,
            slots: Arc::clone(self),
            class,
            done: false,
        };
        let r = (&mut w.rx).await;
        w.done = true;
        match r {
            Ok(()) => Ok(SlotPermit {
                slots: Arc::clone(self),
                class,
            }),
            Err(_) => Err(Closed),
        }
    }

    fn release(&self, class: IoClass) {
        let mut st = self.lock();
        st.free += 1;
        if class == IoClass::Background {
            st.background_held -= 1;
        }
        self.grant(&mut st);
    }

    /// Hand free slots to waiters: foreground first, then background within its share.
    fn grant(&self, st: &mut State) {
        while st.free > 0 {
            if let Some(tx) = st.foreground.pop_front() {
                st.free -= 1;
                if tx.send(()).is_err() {
                    st.free += 1;
                }
                continue;
            }
            if st.background_held >= self.background_max {
                return;
            }
            let Some(tx) = st.background.pop_front() else {
                return;
            };
            st.free -= 1;
            st.background_held += 1;
            if tx.send(()).is_err() {
                st.free += 1;
                st.background_held -= 1;
            }
        }
    }

    /// Fail every waiter and every later acquire.
    pub(crate) fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        st.foreground.clear();
        st.background.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn foreground_never_waits_for_background() {
        let s = Slots::new(4);
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(s.acquire(IoClass::Background).await.expect("slot"));
        }
        // The fourth slot is the reserve: a background acquire waits, a foreground one not.
        let s2 = Arc::clone(&s);
        let bg = tokio::spawn(async move { s2.acquire(IoClass::Background).await.is_ok() });
        tokio::task::yield_now().await;
        let fg = s.acquire(IoClass::Foreground).await.expect("reserved slot");
        assert!(!bg.is_finished());
        drop(fg);
        // A free slot that is the reserve still does not go to background.
        tokio::task::yield_now().await;
        assert!(!bg.is_finished());
        held.pop();
        assert!(bg.await.unwrap_or(false));
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_foreground_waiter_first() {
        let s = Slots::new(1);
        let first = s.acquire(IoClass::Background).await.expect("slot");
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (name, class) in [
            ("bg1", IoClass::Background),
            ("bg2", IoClass::Background),
            ("fg", IoClass::Foreground),
        ] {
            let (s, order) = (Arc::clone(&s), Arc::clone(&order));
            tasks.push(tokio::spawn(async move {
                let p = s.acquire(class).await;
                order.lock().unwrap_or_else(|p| p.into_inner()).push(name);
                drop(p);
            }));
            tokio::task::yield_now().await;
        }
        drop(first);
        for t in tasks {
            let _ = t.await;
        }
        let order = order.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(order, vec!["fg", "bg1", "bg2"]);
    }

    #[tokio::test]
    async fn a_cancelled_waiter_returns_its_grant_and_close_fails_waiters() {
        let s = Slots::new(1);
        let p = s.acquire(IoClass::Foreground).await.expect("slot");
        let s2 = Arc::clone(&s);
        let w = tokio::spawn(async move { s2.acquire(IoClass::Foreground).await.is_ok() });
        tokio::task::yield_now().await;
        w.abort();
        let _ = w.await;
        drop(p);
        let again = s.acquire(IoClass::Foreground).await.expect("slot back");
        let s3 = Arc::clone(&s);
        let w = tokio::spawn(async move { s3.acquire(IoClass::Background).await.is_err() });
        tokio::task::yield_now().await;
        s.close();
        assert!(w.await.unwrap_or(false));
        drop(again);
        assert!(s.acquire(IoClass::Foreground).await.is_err());
    }
}
