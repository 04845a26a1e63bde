//! A bounded pool of I/O threads for blocking file system calls.
//!
//! tokio has no positional file I/O, and a `pread` on a worker thread would stall every socket the
//! runtime serves. All blocking syscalls of the file protocol therefore run here: a fixed number of
//! plain OS threads take closures from a queue and send results back over a oneshot channel. The
//! bound keeps a burst of guest requests from spawning thousands of threads, and an idle pool costs
//! nothing but parked threads.
//!
//! Every hand-off is a potential sleep and wake-up (two context switches, and in a virtual machine
//! an inter-processor interrupt), which is what a small request costs most. So the queue is a plain
//! `Mutex<VecDeque>` with a condition variable that is signalled only when a thread is actually
//! asleep: a busy thread picks the next job up without any wake-up, and a burst of jobs wakes at
//! most one sleeper per job. (The previous design, an mpsc receiver shared behind a mutex, woke a
//! thread for the channel and another for the mutex on every job.)
//!
//! Buffers handed to the pool are owned (moved in, moved back out), so a caller whose future is
//! dropped mid-request can never leave a thread writing into freed memory.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, OnceLock};

type Job = Box<dyn FnOnce() + Send + 'static>;

struct Queue {
    jobs: VecDeque<Job>,
    /// Threads blocked in the condition variable.
    sleeping: usize,
    /// Wake-ups signalled but not yet consumed by a sleeper (so a burst does not signal the
    /// same sleeper twice while it is still getting up).
    waking: usize,
}

struct Shared {
    queue: Mutex<Queue>,
    cv: Condvar,
}

/// A fixed-size pool of threads that run blocking I/O closures.
#[derive(Clone)]
pub struct IoPool {
    shared: Arc<Shared>,
}

impl IoPool {
    /// Start a pool with `threads` worker threads (at least one).
    pub fn new(threads: usize) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                sleeping: 0,
                waking: 0,
            }),
            cv: Condvar::new(),
        });
        for i in 0..threads.max(1) {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("ds-io-{i}"))
                .spawn(move || worker(&shared))?;
        }
        Ok(IoPool { shared })
    }

    /// The process-wide default pool, sized from `DISKSTREAM_IO_THREADS` or 16 threads: enough
    /// to keep a QD32 random workload busy on a small machine without oversubscribing it.
    pub fn global() -> &'static IoPool {
        static POOL: OnceLock<IoPool> = OnceLock::new();
        POOL.get_or_init(|| {
            let n = std::env::var("DISKSTREAM_IO_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(16);
            // Thread creation only fails when the process is out of resources; there is no
            // meaningful way to run the block layer then.
            IoPool::new(n).expect("cannot start the I/O thread pool")
        })
    }

    /// Queue `job`, waking a sleeping thread only if no thread is awake to take it.
    fn submit(&self, job: Job) -> io::Result<()> {
        let wake = {
            let mut q = self
                .shared
                .queue
                .lock()
                .map_err(|_| io::Error::other("I/O pool poisoned"))?;
            q.jobs.push_back(job);
            // Jobs not yet covered by a pending wake-up need a sleeper of their own.
            let wake = q.sleeping > q.waking && q.jobs.len() > q.waking;
            if wake {
                q.waking += 1;
            }
            wake
        };
        if wake {
            self.shared.cv.notify_one();
        }
        Ok(())
    }

    /// Run `f` on a pool thread without waiting for it (advisory work such as starting
    /// writeback, whose outcome nobody needs).
    pub fn spawn_detached<F>(&self, f: F)
    where
        F: FnOnce() + Send + 'static,
    {
        let _ = self.submit(Box::new(f));
    }

    /// Run `f` on a pool thread and await its result.
    pub async fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let (rtx, rrx) = tokio::sync::oneshot::channel();
        self.submit(Box::new(move || {
            let _ = rtx.send(f());
        }))?;
        rrx.await
            .map_err(|_| io::Error::other("I/O thread dropped the request"))?
    }
}

fn worker(shared: &Shared) {
    let Ok(mut q) = shared.queue.lock() else {
        return;
    };
    loop {
        if let Some(job) = q.jobs.pop_front() {
            drop(q);
            job();
            q = match shared.queue.lock() {
                Ok(g) => g,
                Err(_) => return,
            };
            continue;
        }
        q.sleeping += 1;
        q = match shared.cv.wait(q) {
            Ok(g) => g,
            Err(_) => return,
        };
        q.sleeping -= 1;
        // Spurious wake-ups consume nothing.
        q.waking = q.waking.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_many_jobs_concurrently_and_returns_results() {
        let pool = IoPool::new(4).unwrap();
        let mut set = tokio::task::JoinSet::new();
        for i in 0..2000u64 {
            let p = pool.clone();
            set.spawn(async move { p.run(move || Ok(i * 2)).await.unwrap() });
        }
        let mut sum = 0;
        while let Some(r) = set.join_next().await {
            sum += r.unwrap();
        }
        assert_eq!(sum, 2 * (0..2000u64).sum::<u64>());
        // Blocking jobs occupy threads; the others still run.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..3 {
            let rx = Arc::clone(&rx);
            pool.spawn_detached(move || {
                let _ = rx
                    .lock()
                    .unwrap()
                    .recv_timeout(std::time::Duration::from_secs(5));
            });
        }
        assert_eq!(pool.run(|| Ok(7)).await.unwrap(), 7);
        for _ in 0..3 {
            let _ = tx.send(());
        }
    }
}
