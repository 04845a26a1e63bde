//! The intermediate block-commit job: copy into `base` everything the layers from `top` down
//! to just above `base` allocate, then drop those layers from the chain.
//!
//! The copy reads through the chain from `top` (so each range gets the newest layer's bytes)
//! and writes the base; ranges only the base (or nothing) provides are skipped, and progress
//! counts them too (`len` is the disk size, as in QEMU). Ranges that read as zeroes are written
//! as zeroes, so the base never shows its own older data where the layers above hid it.
//!
//! # Crash safety
//! Until finalization the chain is unchanged: the base only gains bytes the layers above it
//! already hide from readers of the overlay. Finalization flushes the base, then lets the graph
//! owner rewrite the overlay's backing link (its header write flushes before and after), then
//! flushes the base again; only then is the job reported complete. QEMU 10 does not flush the
//! base before the header rewrite, so a crash right after can leave an overlay pointing at a
//! base whose committed data is still in a volatile cache.
//!
//! # Errors, pause, cancel
//! A failed chunk goes through the on-error policy (`report` fails the job, `ignore` and
//! `stop`-then-resume retry it). Cancel stops between chunks; data already in the base stays
//! (QEMU's behaviour: the intermediate layers then hide it anyway).

use crate::error::JobFailure;
use crate::job::{ErrorAction, IoOperation, Job, JobDriver};
use async_trait::async_trait;
use diskstream_block::node::BlockNode;
use diskstream_block::status::{allocated_above, map_extent};
use diskstream_block::BlockError;
use std::sync::Arc;

/// Bytes copied per step: QEMU's `COMMIT_BUFFER_SIZE`, so a job that fails reports the same
/// progress as QEMU's (the chunks before the failing one).
const CHUNK: u64 = 512 << 10;

/// Callbacks into the graph owner.
#[async_trait]
pub trait CommitHooks: Send + Sync {
    /// Drop the committed layers: the overlay of `top` now uses the base as its backing,
    /// recorded in its header. Called between the two flushes of the base.
    async fn drop_intermediates(&self) -> Result<(), BlockError>;
    /// The job is over (success, failure or cancel); called exactly once.
    async fn clean(&self) {}
}

/// An intermediate commit job.
pub struct CommitJob {
    top: Arc<dyn BlockNode>,
    base: Arc<dyn BlockNode>,
    hooks: Arc<dyn CommitHooks>,
}

impl CommitJob {
    /// Commit `top` and the layers below it, down to (excluding) `base`, into `base`.
    pub fn new(
        top: Arc<dyn BlockNode>,
        base: Arc<dyn BlockNode>,
        hooks: Arc<dyn CommitHooks>,
    ) -> CommitJob {
        CommitJob { top, base, hooks }
    }

    async fn copy(&self, off: u64, len: u64) -> Result<(), (IoOperation, BlockError)> {
        let end = off + len;
        let mut pos = off;
        while pos < end {
            let (alloc, n) = allocated_above(&self.top, Some(&self.base), pos, end - pos)
                .await
                .map_err(|e| (IoOperation::Read, e))?;
            let n = n.max(1).min(end - pos);
            if alloc {
                let mut p = pos;
                while p < pos + n {
                    let e = map_extent(&self.top, p, pos + n - p)
                        .await
                        .map_err(|e| (IoOperation::Read, e))?;
                    let m = e.length.max(1).min(pos + n - p);
                    if e.zero || !e.present {
                        self.base
                            .write_zeroes(p, m, false)
                            .await
                            .map_err(|e| (IoOperation::Write, e))?;
                    } else {
                        // Read into spare capacity and write from the same buffer: no
                        // zero-fill, no copy (see BlockNode::write_owned).
                        let buf = self
                            .top
                            .read_append(p, Vec::new(), m as usize)
                            .await
                            .map_err(|e| (IoOperation::Read, e))?;
                        self.base
                            .write_owned(p, buf)
                            .await
                            .map_err(|e| (IoOperation::Write, e))?;
                    }
                    p += m;
                }
            }
            pos += n;
        }
        Ok(())
    }
}

#[async_trait]
impl JobDriver for CommitJob {
    async fn run(&self, job: &Arc<Job>) -> Result<(), JobFailure> {
        let size = self.top.size();
        job.progress_set_total(size);
        if self.base.size() < size {
            self.base
                .truncate(size)
                .await
                .map_err(|e| JobFailure::from_block(&e))?;
        }
        let mut pos = 0;
        while pos < size {
            job.settled();
            job.ratelimit_sleep().await;
            if job.is_cancelled() {
                break;
            }
            let n = match job.speed() {
                0 => CHUNK,
                s => (s / 10).clamp(65536, CHUNK),
            }
            .min(size - pos);
            match self.copy(pos, n).await {
                Ok(()) => {
                    job.processed_bytes(n);
                    job.progress_update(n);
                    pos += n;
                }
                Err((op, e)) => {
                    tracing::warn!(job = job.id(), offset = pos, "commit chunk failed: {e}");
                    if job.error_action(e.errno(), op) == ErrorAction::Report {
                        return Err(JobFailure::from_block(&e));
                    }
                    // ignore and stop retry the chunk (stop after the resume).
                }
            }
        }
        Ok(())
    }

    async fn prepare(&self) -> Result<(), JobFailure> {
        let fail = |e: BlockError| {
            tracing::error!("commit: cannot drop the committed layers: {e}");
            JobFailure::from_block(&e)
        };
        self.base.flush().await.map_err(fail)?;
        self.hooks.drop_intermediates().await.map_err(fail)?;
        self.base.flush().await.map_err(fail)?;
        Ok(())
    }

    async fn clean(&self) {
        self.hooks.clean().await;
    }
}
