//! A bounded pool of I/O threads for blocking file system calls.
//!
//! tokio has no positional file I/O, and a `pread` on a worker thread would stall every socket the
//! runtime serves. All blocking syscalls of the file protocol therefore run here: a fixed number of
//! plain OS threads take closures from a queue and send results back over a oneshot channel. The
//! bound keeps a burst of guest requests from spawning thousands of threads, and an idle pool costs
//! nothing but parked threads.
//!
//! Buffers handed to the pool are owned (moved in, moved back out), so a caller whose future is
//! dropped mid-request can never leave a thread writing into freed memory.

use std::io;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A fixed-size pool of threads that run blocking I/O closures.
#[derive(Clone)]
pub struct IoPool {
    tx: Arc<Mutex<mpsc::Sender<Job>>>,
}

impl IoPool {
    /// Start a pool with `threads` worker threads (at least one).
    pub fn new(threads: usize) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("ds-io-{i}"))
                .spawn(move || loop {
                    let job = {
                        let guard = match rx.lock() {
                            Ok(g) => g,
                            Err(_) => return,
                        };
                        match guard.recv() {
                            Ok(job) => job,
                            Err(_) => return,
                        }
                    };
                    job();
                })?;
        }
        Ok(IoPool {
            tx: Arc::new(Mutex::new(tx)),
        })
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

    /// Run `f` on a pool thread and await its result.
    pub async fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let (rtx, rrx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = rtx.send(f());
        });
        {
            let tx = self
                .tx
                .lock()
                .map_err(|_| io::Error::other("I/O pool poisoned"))?;
            tx.send(job)
                .map_err(|_| io::Error::other("I/O pool stopped"))?;
        }
        rrx.await
            .map_err(|_| io::Error::other("I/O thread dropped the request"))?
    }
}
