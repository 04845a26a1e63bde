//! I/O priority classes: guest-triggered requests go ahead of background jobs.
//!
//! A request is **foreground** unless it runs inside [`background`]: guest reads and writes,
//! the copy-on-read fetches a guest read starts (they run on tasks of their own, which start
//! foreground), management commands. Block jobs (stream, mirror, commit) and copy-on-read
//! read-ahead run their copies inside [`background`]. The class travels with the task (a
//! tokio task-local), through every layer of a chain, down to the protocol drivers that can
//! act on it:
//!
//! * the NBD client serves queued foreground requests first when an in-flight slot frees,
//!   never lets background requests hold the last slots of a connection (so a guest request
//!   never waits for a background one to finish), and writes queued foreground requests to
//!   the socket first;
//! * the HTTP driver fetches blocks a foreground reader waits for before blocks only a job
//!   waits for, and keeps a connection free of background GETs.
//!
//! Remote drivers also count foreground requests in flight ([`remote_begin`]); a stream job
//! over a remote backing does not add copies while one is pending (it keeps the ones in flight
//! and always at least one), so the server and the link answer the guest's request with less
//! of the job's traffic in front of it. With no guest I/O the job runs at full speed.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use tokio::sync::Notify;

/// Who a request is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IoClass {
    /// A guest (or a command) is waiting for it.
    #[default]
    Foreground,
    /// A block job's copy or speculative read-ahead.
    Background,
}

tokio::task_local! {
    static CLASS: IoClass;
}

/// Run `fut` with background priority (every request it makes, through every layer).
pub async fn background<F: Future>(fut: F) -> F::Output {
    CLASS.scope(IoClass::Background, fut).await
}

/// Run `fut` with foreground priority, also inside a [`background`] scope.
pub async fn foreground<F: Future>(fut: F) -> F::Output {
    CLASS.scope(IoClass::Foreground, fut).await
}

/// The class of the current task ([`IoClass::Foreground`] outside any scope).
pub fn current() -> IoClass {
    CLASS.try_with(|c| *c).unwrap_or_default()
}

/// Whether the current task runs with background priority.
pub fn is_background() -> bool {
    current() == IoClass::Background
}

static REMOTE_FOREGROUND: AtomicUsize = AtomicUsize::new(0);

fn remote_idle() -> &'static Notify {
    static IDLE: OnceLock<Notify> = OnceLock::new();
    IDLE.get_or_init(Notify::new)
}

/// A foreground request waiting on a remote server; it counts until dropped.
#[derive(Debug)]
pub struct RemoteGuard(());

impl Drop for RemoteGuard {
    fn drop(&mut self) {
        if REMOTE_FOREGROUND.fetch_sub(1, Ordering::AcqRel) == 1 {
            remote_idle().notify_waiters();
        }
    }
}

/// Count a request to a remote server, if the current task is foreground (`None` otherwise).
pub fn remote_begin() -> Option<RemoteGuard> {
    if is_background() {
        return None;
    }
    REMOTE_FOREGROUND.fetch_add(1, Ordering::AcqRel);
    Some(RemoteGuard(()))
}

/// Foreground requests waiting on remote servers, process-wide.
pub fn remote_pending() -> usize {
    REMOTE_FOREGROUND.load(Ordering::Acquire)
}

/// Wait until no foreground request is waiting on a remote server.
pub async fn remote_quiet() {
    loop {
        let n = remote_idle().notified();
        tokio::pin!(n);
        n.as_mut().enable();
        if remote_pending() == 0 {
            return;
        }
        n.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn class_follows_the_scope() {
        assert_eq!(current(), IoClass::Foreground);
        background(async {
            assert!(is_background());
            foreground(async { assert!(!is_background()) }).await;
            // A task spawned from a background scope starts foreground (tokio does not carry
            // task-locals into new tasks): whoever spawns decides.
            let h = tokio::spawn(async { is_background() });
            assert!(!h.await.unwrap_or(true));
            assert!(remote_begin().is_none());
        })
        .await;
        assert!(!is_background());
    }
}
