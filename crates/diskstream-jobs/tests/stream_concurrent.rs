//! The block-stream job under concurrent random guest I/O on the image being streamed: the
//! final contents must equal a model of the initial chain plus every guest write, whatever the
//! interleaving with the (parallel) copies; the result must pass `qemu-img check`. Also covers
//! intermediate streaming (`bottom` above a base), pause/resume and cancel mid-way, rate
//! limiting with live changes, and the on-error policies with an injected error.

use async_trait::async_trait;
use diskstream_block::image::chain_layers;
use diskstream_block::node::BlockNode;
use diskstream_jobs::job::{JobEvent, JobOptions};
use diskstream_jobs::stream::NoHooks;
use diskstream_jobs::{JobManager, JobStatus, JobType, StreamConfig, StreamJob};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::*;

/// One round: stream (whole chain, or `mid` only above `base`) while a guest writes.
async fn round(seed: u64, ops: usize, intermediate: bool) -> usize {
    let dir = tempfile::tempdir().expect("tmp");
    let mut rng = StdRng::seed_from_u64(seed);
    let size = 8 * MIB + rng.random_range(0..4u64) * 512 * 1024;
    make_chain(dir.path(), size, &mut rng).await;
    let top = open(&dir.path().join("top.qcow2"), false).await;
    let layers = chain_layers(&top);
    let bottom = if intermediate {
        Arc::clone(&layers[1]) // mid: base stays the backing
    } else {
        Arc::clone(&layers[2])
    };
    let mut model = read_all(&top).await;
    let events = Arc::new(Events::default());
    let mgr = JobManager::new(events.clone());
    let cfg = StreamConfig {
        chunk_size: [64 * 1024, 256 * 1024, MIB][rng.random_range(0..3usize)],
        parallel: rng.random_range(1..=8),
        ..Default::default()
    };
    let driver = Arc::new(StreamJob::new(
        Arc::clone(&top),
        bottom,
        None,
        cfg,
        Arc::new(NoHooks),
    ));
    let job = mgr
        .create("s", JobType::Stream, driver, &JobOptions::default())
        .expect("create job");
    mgr.start(&job);
    // The guest: random writes and write-zeroes, concurrently with the copies.
    let mut done = 0;
    for i in 0..ops {
        let off = rng.random_range(0..size);
        let len = rng.random_range(1..=(size - off).min(300 * 1024));
        if rng.random_bool(0.2) {
            top.write_zeroes(off, len, rng.random_bool(0.5))
                .await
                .expect("guest zero");
            model[off as usize..(off + len) as usize].fill(0);
        } else {
            let d = pattern(seed * 1000 + i as u64, len as usize);
            top.write(off, &d).await.expect("guest write");
            model[off as usize..(off + len) as usize].copy_from_slice(&d);
        }
        done += 1;
        if rng.random_bool(0.3) {
            tokio::task::yield_now().await;
        }
    }
    tokio::time::timeout(Duration::from_secs(60), job.wait_concluded())
        .await
        .expect("job finishes");
    assert_eq!(
        events.statuses("s"),
        vec![
            JobStatus::Created,
            JobStatus::Running,
            JobStatus::Waiting,
            JobStatus::Pending,
            JobStatus::Concluded,
            JobStatus::Null
        ],
        "seed {seed}"
    );
    let got = read_all(&top).await;
    if let Some(i) = first_diff(&got, &model) {
        panic!("seed {seed}: contents differ from the model at byte {i}");
    }
    let expected_backing = if intermediate { 1 } else { 0 };
    assert_eq!(
        chain_layers(&top).len() - 1,
        expected_backing,
        "seed {seed}"
    );
    top.close().await.expect("close");
    drop(top);
    qemu_img_check(&dir.path().join("top.qcow2"));
    // Reopened from disk (the header's backing link), the contents are the same.
    let again = open(&dir.path().join("top.qcow2"), true).await;
    let got = read_all(&again).await;
    assert!(
        first_diff(&got, &model).is_none(),
        "seed {seed}: after reopen"
    );
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stream_under_random_guest_writes() {
    let mut total = 0;
    for seed in 0..26u64 {
        total += round(seed, 40, seed % 3 == 2).await;
    }
    assert!(total >= 1000, "{total} randomized guest operations");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_cancel_and_speed() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut rng = StdRng::seed_from_u64(99);
    make_chain(dir.path(), 16 * MIB, &mut rng).await;
    let top = open(&dir.path().join("top.qcow2"), false).await;
    let model = read_all(&top).await;
    let bottom = Arc::clone(&chain_layers(&top)[2]);
    let events = Arc::new(Events::default());
    let mgr = JobManager::new(events.clone());
    let driver = Arc::new(StreamJob::new(
        Arc::clone(&top),
        Arc::clone(&bottom),
        None,
        StreamConfig::default(),
        Arc::new(NoHooks),
    ));
    // 1 B/s: the first chunk goes out, then the job waits, but it does make progress.
    let opts = JobOptions {
        speed: 1,
        ..Default::default()
    };
    let job = mgr
        .create("j", JobType::Stream, driver, &opts)
        .expect("create");
    mgr.start(&job);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (cur, total) = job.progress();
    assert!(cur > 0 && cur < total, "progress {cur}/{total} at 1 B/s");
    job.user_pause().await.expect("pause");
    assert_eq!(job.status(), JobStatus::Paused);
    assert!(job.user_pause().await.is_err(), "already paused");
    let frozen = job.progress().0;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(job.progress().0, frozen, "no progress while paused");
    job.user_resume().expect("resume");
    assert_eq!(job.status(), JobStatus::Running);
    // Raise the speed live: the sleeping job wakes and streams at the new rate.
    let t0 = Instant::now();
    job.set_speed(64 * MIB as i64).expect("set-speed");
    job.cancel().await.expect("cancel");
    assert!(t0.elapsed() < Duration::from_secs(5));
    let st = events.statuses("j");
    assert_eq!(st.last(), Some(&JobStatus::Null));
    assert!(st.contains(&JobStatus::Aborting));
    // A cancelled stream leaves the chain and the contents alone.
    assert_eq!(chain_layers(&top).len(), 3);
    assert!(first_diff(&read_all(&top).await, &model).is_none());
    // Streaming again finishes the job.
    let driver = Arc::new(StreamJob::new(
        Arc::clone(&top),
        bottom,
        None,
        StreamConfig::default(),
        Arc::new(NoHooks),
    ));
    let job = mgr
        .create("j", JobType::Stream, driver, &JobOptions::default())
        .expect("create again (the old id is free)");
    mgr.start(&job);
    job.wait_concluded().await;
    assert_eq!(chain_layers(&top).len(), 1);
    assert!(first_diff(&read_all(&top).await, &model).is_none());
    top.close().await.expect("close");
    qemu_img_check(&dir.path().join("top.qcow2"));
}

/// A backing node whose reads fail until told otherwise.
struct Flaky {
    inner: Arc<dyn BlockNode>,
    fail: Mutex<Option<i32>>,
}

#[async_trait]
impl BlockNode for Flaky {
    fn format_name(&self) -> &'static str {
        self.inner.format_name()
    }
    fn filename(&self) -> &str {
        self.inner.filename()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        true
    }
    fn backing(&self) -> Option<Arc<dyn BlockNode>> {
        self.inner.backing()
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> diskstream_block::Result<()> {
        if let Some(errno) = *self.fail.lock().expect("flaky") {
            return Err(diskstream_block::BlockError::io(
                "injected",
                std::io::Error::from_raw_os_error(errno),
            ));
        }
        self.inner.read(offset, buf).await
    }
    async fn write(&self, _: u64, _: &[u8]) -> diskstream_block::Result<()> {
        Err(diskstream_block::BlockError::ReadOnly("flaky".into()))
    }
    async fn write_zeroes(&self, _: u64, _: u64, _: bool) -> diskstream_block::Result<()> {
        Err(diskstream_block::BlockError::ReadOnly("flaky".into()))
    }
    async fn discard(&self, _: u64, _: u64) -> diskstream_block::Result<()> {
        Ok(())
    }
    async fn flush(&self) -> diskstream_block::Result<()> {
        Ok(())
    }
    async fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> diskstream_block::Result<diskstream_block::node::LayerStatus> {
        self.inner.block_status(offset, len).await
    }
    async fn truncate(&self, _: u64) -> diskstream_block::Result<()> {
        Ok(())
    }
    async fn close(&self) -> diskstream_block::Result<()> {
        Ok(())
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_error_policies() {
    use diskstream_block::format::qcow2::Qcow2;
    use diskstream_jobs::OnError;
    for (policy, errno) in [
        (OnError::Report, 5),
        (OnError::Ignore, 5),
        (OnError::Stop, 5),
        (OnError::Enospc, 28),
        (OnError::Enospc, 5),
    ] {
        let dir = tempfile::tempdir().expect("tmp");
        let mut rng = StdRng::seed_from_u64(5);
        make_chain(dir.path(), 4 * MIB, &mut rng).await;
        let top = open(&dir.path().join("top.qcow2"), false).await;
        let model = read_all(&top).await;
        let mid = top.backing().expect("mid");
        let flaky: Arc<dyn BlockNode> = Arc::new(Flaky {
            inner: Arc::clone(&mid),
            fail: Mutex::new(Some(errno)),
        });
        let q = top.as_any().downcast_ref::<Qcow2>().expect("qcow2");
        q.set_backing_node(Some(Arc::clone(&flaky)));
        let events = Arc::new(Events::default());
        let mgr = JobManager::new(events.clone());
        let bottom = chain_layers(&top).pop().expect("bottom");
        let driver = Arc::new(StreamJob::new(
            Arc::clone(&top),
            bottom,
            None,
            StreamConfig::default(),
            Arc::new(NoHooks),
        ));
        let opts = JobOptions {
            on_error: policy,
            ..Default::default()
        };
        let job = mgr
            .create("e", JobType::Stream, driver, &opts)
            .expect("create");
        mgr.start(&job);
        let stops = policy == OnError::Stop || (policy == OnError::Enospc && errno == 28);
        if stops {
            let t0 = Instant::now();
            while job.status() != JobStatus::Paused {
                assert!(t0.elapsed() < Duration::from_secs(10), "{policy:?} pauses");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let io = job.info().io_status;
            assert_eq!(io.as_str(), if errno == 28 { "nospace" } else { "failed" });
            if let Some(f) = flaky.as_any().downcast_ref::<Flaky>() {
                *f.fail.lock().expect("flaky") = None;
            }
            job.user_resume().expect("resume");
            assert_eq!(job.info().io_status.as_str(), "ok");
        }
        job.wait_concluded().await;
        let evs = events.0.lock().expect("events").clone();
        let completed = evs.iter().find_map(|e| match e {
            JobEvent::Completed {
                error, offset, len, ..
            } => Some((error.clone(), *offset, *len)),
            _ => None,
        });
        let (error, offset, len) = completed.expect("BLOCK_JOB_COMPLETED");
        assert!(
            evs.iter().any(|e| matches!(e, JobEvent::Error { .. })),
            "{policy:?}: BLOCK_JOB_ERROR emitted"
        );
        if stops {
            assert_eq!(error, None, "{policy:?}: retried after resume");
            assert_eq!(offset, len);
        } else {
            let want = if errno == 28 {
                "No space left on device"
            } else {
                "Input/output error"
            };
            assert_eq!(error.as_deref(), Some(want), "{policy:?}");
            if policy == OnError::Ignore {
                assert_eq!(offset, len, "ignore goes on to the end");
            }
        }
        if let Some(f) = flaky.as_any().downcast_ref::<Flaky>() {
            *f.fail.lock().expect("flaky") = None;
        }
        assert!(
            first_diff(&read_all(&top).await, &model).is_none(),
            "{policy:?}"
        );
        top.close().await.expect("close");
        qemu_img_check(&dir.path().join("top.qcow2"));
    }
}
