//! Block backends: where a user (an NBD export, a guest device) attaches to the node graph.
//!
//! A user never holds a node directly. It holds an [`Arc<BlockBackend>`] and, for every
//! request, takes an [`InFlight`] guard that names the node currently at the root. Graph
//! changes that replace that node (reopening an image read-write for a job, switching a
//! device to a new image for live block copy, inserting a copy-on-read filter) go through
//! [`BlockBackend::replace_root`], which *drains* first: it waits for every request already
//! in flight on the old root to finish and holds new ones back until the swap is done. So no
//! request ever straddles two roots, and a write acknowledged before the switch is in the
//! old root's chain, which is what the new root reads through (QEMU's `bdrv_drained_begin` +
//! `bdrv_replace_node` around a BlockBackend).
//!
//! The guard is a shared lock held for the request's duration; the drain is the exclusive
//! side. Requests never wait for each other, only for a pending swap.

use crate::node::BlockNode;
use std::ops::Deref;
use std::sync::Arc;
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

/// The attachment point of one user.
pub struct BlockBackend {
    root: Arc<RwLock<Arc<dyn BlockNode>>>,
    /// A copy of the root for queries that must not wait for a drain (size, names).
    current: std::sync::RwLock<Arc<dyn BlockNode>>,
}

impl std::fmt::Debug for BlockBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockBackend")
            .field("root", &self.current().filename())
            .finish()
    }
}

/// A request's hold on the backend: the root it runs against, fixed until the guard drops.
pub struct InFlight {
    guard: OwnedRwLockReadGuard<Arc<dyn BlockNode>>,
    /// Counts as foreground activity (background jobs step back while a guest is busy).
    _fg: crate::foreground::Guard,
}

impl Deref for InFlight {
    type Target = Arc<dyn BlockNode>;
    fn deref(&self) -> &Arc<dyn BlockNode> {
        &self.guard
    }
}

impl BlockBackend {
    /// A backend whose root is `node`.
    pub fn new(node: Arc<dyn BlockNode>) -> Arc<BlockBackend> {
        Arc::new(BlockBackend {
            root: Arc::new(RwLock::new(Arc::clone(&node))),
            current: std::sync::RwLock::new(node),
        })
    }

    /// Start a request: the returned guard names the root and keeps it in place (a
    /// [`BlockBackend::replace_root`] waits for the guard to drop). Waits only while a
    /// replacement is draining.
    pub async fn acquire(&self) -> InFlight {
        let fg = crate::foreground::begin();
        InFlight {
            guard: Arc::clone(&self.root).read_owned().await,
            _fg: fg,
        }
    }

    /// The current root without joining the in-flight set: for size, names and other
    /// queries that do no I/O. A request must use [`BlockBackend::acquire`].
    pub fn current(&self) -> Arc<dyn BlockNode> {
        match self.current.read() {
            Ok(g) => Arc::clone(&g),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    /// Drain (wait for in-flight requests, hold new ones), swap the root, resume. Returns the
    /// old root.
    pub async fn replace_root(&self, node: Arc<dyn BlockNode>) -> Arc<dyn BlockNode> {
        let mut w = self.root.write().await;
        match self.current.write() {
            Ok(mut g) => *g = Arc::clone(&node),
            Err(p) => *p.into_inner() = Arc::clone(&node),
        }
        std::mem::replace(&mut *w, node)
    }

    /// Begin a drain that the caller ends by dropping the returned guard: waits for every
    /// request in flight, then holds new ones back. Several backends drained together and
    /// re-pointed with [`Drained::set_root`] before any guard drops switch *atomically*: no
    /// request runs on any of them between the first swap and the last (QEMU drains the
    /// node under all its parents before `bdrv_replace_node`). The caller must not start
    /// requests on a backend it holds drained.
    pub async fn drain(self: &Arc<Self>) -> Drained {
        let guard = Arc::clone(&self.root).write_owned().await;
        Drained {
            guard,
            backend: Arc::clone(self),
        }
    }

    /// Run `f` with the backend drained: no request is in flight while it runs and none
    /// starts. For operations that must see a quiescent device (flush-then-switch, the
    /// header rewrite that ends a stream when the caller wants guest I/O held off).
    pub async fn drained<F, Fut, R>(&self, f: F) -> R
    where
        F: FnOnce(Arc<dyn BlockNode>) -> Fut,
        Fut: std::future::Future<Output = R>,
    {
        let w = self.root.write().await;
        f(Arc::clone(&w)).await
    }
}

/// A backend held drained (see [`BlockBackend::drain`]); requests resume when it drops.
pub struct Drained {
    guard: OwnedRwLockWriteGuard<Arc<dyn BlockNode>>,
    backend: Arc<BlockBackend>,
}

impl Drained {
    /// The root as it is now (no request is running on it).
    pub fn root(&self) -> Arc<dyn BlockNode> {
        Arc::clone(&self.guard)
    }

    /// Swap the root; requests that resume after the drain run on `node`. Returns the old root.
    pub fn set_root(&mut self, node: Arc<dyn BlockNode>) -> Arc<dyn BlockNode> {
        match self.backend.current.write() {
            Ok(mut g) => *g = Arc::clone(&node),
            Err(p) => *p.into_inner() = Arc::clone(&node),
        }
        std::mem::replace(&mut *self.guard, node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::raw::RawNode;
    use crate::protocol::mem::MemProtocol;
    use std::time::Duration;

    async fn raw(size: usize) -> Arc<dyn BlockNode> {
        let p: Arc<dyn crate::protocol::Protocol> =
            Arc::new(MemProtocol::new("mem", vec![0; size], false, u64::MAX));
        Arc::new(RawNode::open(p).await.expect("raw over memory"))
    }

    #[tokio::test]
    async fn replace_waits_for_in_flight_requests() {
        let a = raw(4096).await;
        let b = raw(8192).await;
        let be = BlockBackend::new(Arc::clone(&a));
        let req = be.acquire().await;
        assert_eq!(req.size(), 4096);
        let be2 = Arc::clone(&be);
        let swap = tokio::spawn(async move { be2.replace_root(b).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !swap.is_finished(),
            "the swap must wait for the request in flight"
        );
        drop(req);
        let old = swap.await.expect("swap task");
        assert_eq!(old.size(), 4096);
        assert_eq!(be.acquire().await.size(), 8192);
        assert_eq!(be.current().size(), 8192);
    }
}
