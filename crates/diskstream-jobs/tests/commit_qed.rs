//! block-commit on QED chains made by QEMU (QED base <- QED mid <- QED top): an intermediate
//! commit of mid into base while a guest writes to top, and an active commit of top into base
//! (a mirror job with `Above(base)`, as the daemon runs it) under guest writes through the
//! job's filter. The final contents equal a model, the top's header records the base after the
//! intermediate commit, and `qemu-img check`/`compare` agree.

mod common;

use common::*;

use async_trait::async_trait;
use diskstream_block::format::Format;
use diskstream_block::image::{chain_layers, open_image, OpenOptions};
use diskstream_block::node::BlockNode;
use diskstream_block::BlockError;
use diskstream_jobs::commit::{CommitHooks, CommitJob};
use diskstream_jobs::job::JobOptions;
use diskstream_jobs::mirror::{CopyMode, MirrorConfig, MirrorJob, NoHooks, SyncMode};
use diskstream_jobs::{JobManager, JobType, OnError};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const SIZE: u64 = 8 * MIB;

/// base.qed (0x11 everywhere) <- mid.qed (0x22 @1-3M, zeroes @4-5M) <- top.qed (4 KiB
/// clusters, 0x33 @6M+100k), all QED, made by qemu-img/qemu-io; the top opened read-write.
async fn make_chain(dir: &Path) -> Arc<dyn BlockNode> {
    run(
        "qemu-img",
        &["create", "-q", "-f", "qed", "base.qed", "8M"],
        dir,
    );
    run(
        "qemu-io",
        &["-f", "qed", "-c", "write -P 0x11 0 8M", "base.qed"],
        dir,
    );
    run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qed", "-b", "base.qed", "-F", "qed", "mid.qed",
        ],
        dir,
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qed",
            "-c",
            "write -P 0x22 1M 2M",
            "-c",
            "write -z 4M 1M",
            "mid.qed",
        ],
        dir,
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qed",
            "-o",
            "cluster_size=4096",
            "-b",
            "mid.qed",
            "-F",
            "qed",
            "top.qed",
        ],
        dir,
    );
    run(
        "qemu-io",
        &["-f", "qed", "-c", "write -P 0x33 6M 100k", "top.qed"],
        dir,
    );
    open_image(
        &dir.join("top.qed"),
        &OpenOptions {
            read_only: false,
            format: Some(Format::Qed),
            ..Default::default()
        },
    )
    .await
    .expect("open")
}

/// Open one QED image read-write, without its backing chain.
async fn open_rw(path: &Path) -> Arc<dyn BlockNode> {
    open_image(
        path,
        &OpenOptions {
            read_only: false,
            format: Some(Format::Qed),
            no_backing: true,
            ..Default::default()
        },
    )
    .await
    .expect("open read-write")
}

/// Guest writes to `node` (bounded, deterministic), each applied to `model`.
async fn guest_writes(node: &Arc<dyn BlockNode>, model: &mut [u8], n: u64) {
    for i in 0..n {
        let off = (i * 7919 * 4096 + i * 13) % (SIZE - 70_000);
        let d = vec![(i % 250) as u8 + 1; 5000 + (i as usize * 311) % 60_000];
        node.write(off, &d).await.expect("guest write");
        model[off as usize..off as usize + d.len()].copy_from_slice(&d);
        if i % 3 == 0 {
            tokio::task::yield_now().await;
        }
    }
}

fn check_and_compare(dir: &Path, img: &str, model: &[u8]) {
    run("qemu-img", &["check", img], dir);
    std::fs::write(dir.join("model.raw"), model).expect("write model");
    run(
        "qemu-img",
        &["compare", "-f", "qed", "-F", "raw", img, "model.raw"],
        dir,
    );
}

/// The graph owner's part of an intermediate commit: the top now uses the base.
struct Relink {
    top: Arc<dyn BlockNode>,
    base: Arc<dyn BlockNode>,
}

#[async_trait]
impl CommitHooks for Relink {
    async fn drop_intermediates(&self) -> Result<(), BlockError> {
        self.top
            .set_backing_file(Some(("base.qed".to_string(), Some("qed".to_string()))))
            .await?;
        self.top.set_backing_node(Some(Arc::clone(&self.base)));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_qed_intermediate() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let top = make_chain(d).await;
    let layers = chain_layers(&top);
    assert_eq!(layers.len(), 3);
    let mid = Arc::clone(&layers[1]);
    // The daemon reopens the base read-write for the commit.
    let base = open_rw(&d.join("base.qed")).await;
    mid.set_backing_node(Some(Arc::clone(&base)));
    let mut model = read_all(&top).await;
    let mid_view = read_all(&mid).await;
    let mgr = JobManager::new(Arc::new(Quiet));
    let driver = Arc::new(CommitJob::new(
        mid,
        Arc::clone(&base),
        Arc::new(Relink {
            top: Arc::clone(&top),
            base: Arc::clone(&base),
        }),
    ));
    let job = mgr
        .create("c", JobType::Commit, driver, &JobOptions::default())
        .expect("create job");
    mgr.start(&job);
    guest_writes(&top, &mut model, 150).await;
    tokio::time::timeout(Duration::from_secs(60), job.wait_concluded())
        .await
        .expect("job finishes");
    assert_eq!(chain_layers(&top).len(), 2, "mid dropped from the chain");
    assert_eq!(read_all(&top).await, model, "contents after the commit");
    assert_eq!(read_all(&base).await, mid_view, "base holds mid's view");
    top.close().await.expect("close");
    base.close().await.expect("close base");
    drop((top, base, layers));
    let info: serde_json::Value =
        serde_json::from_str(&run("qemu-img", &["info", "--output=json", "top.qed"], d))
            .expect("json");
    assert_eq!(info["backing-filename"], "base.qed", "{info}");
    run("qemu-img", &["check", "base.qed"], d);
    check_and_compare(d, "top.qed", &model);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_qed_active() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let top = make_chain(d).await;
    let layers = chain_layers(&top);
    // The daemon reopens the base read-write for an active commit.
    let base_rw = open_rw(&d.join("base.qed")).await;
    layers[1].set_backing_node(Some(Arc::clone(&base_rw)));
    drop(layers);
    let mut model = read_all(&top).await;
    let driver = Arc::new(MirrorJob::new(
        Arc::clone(&top),
        Arc::clone(&base_rw),
        MirrorConfig {
            granularity: 65536,
            buf_size: MIB,
            sync: SyncMode::Above(Some(Arc::clone(&base_rw))),
            copy_mode: CopyMode::Background,
            on_source_error: OnError::Report,
            on_target_error: OnError::Report,
            grow_target: true,
            zeroes_free: false,
        },
        Arc::new(NoHooks),
    ));
    let filter = driver.filter();
    let mgr = JobManager::new(Arc::new(Quiet));
    let job = mgr
        .create("c", JobType::Commit, driver, &JobOptions::default())
        .expect("create job");
    mgr.start(&job);
    guest_writes(&filter, &mut model, 150).await;
    for _ in 0..6000 {
        if job.is_ready() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(job.is_ready(), "the active commit never reached READY");
    guest_writes(&filter, &mut model, 40).await;
    job.complete().expect("complete");
    tokio::time::timeout(Duration::from_secs(60), job.wait_concluded())
        .await
        .expect("job finishes");
    assert_eq!(read_all(&base_rw).await, model, "base after the pivot");
    top.close().await.expect("close top");
    base_rw.close().await.expect("close base");
    drop((top, filter));
    run("qemu-img", &["check", "top.qed"], d);
    check_and_compare(d, "base.qed", &model);
}
