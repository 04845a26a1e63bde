//! Mirror jobs on QED: a QEMU-made QED chain (QED base <- QED top) mirrored to a QED target
//! diskstream creates, `sync: full` (a standalone copy) and `sync: top` (a target that keeps
//! the base as its backing file), under guest writes through the job's filter until the pivot.
//! The target must equal the source plus every acknowledged write; `qemu-img check` and
//! `qemu-img compare` agree.

mod common;

use common::*;

use diskstream_block::format::qed::create::{create, CreateOptions};
use diskstream_block::format::Format;
use diskstream_block::image::{chain_layers, open_image, OpenOptions};
use diskstream_block::node::BlockNode;
use diskstream_jobs::job::JobOptions;
use diskstream_jobs::mirror::{CopyMode, MirrorConfig, MirrorJob, NoHooks, SyncMode};
use diskstream_jobs::{JobManager, JobType, OnError};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const SIZE: u64 = 8 * MIB;

async fn open(path: &Path, read_only: bool) -> Arc<dyn BlockNode> {
    open_image(
        path,
        &OpenOptions {
            read_only,
            format: Some(Format::Qed),
            ..Default::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

async fn mirror(top_only: bool) {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    run(
        "qemu-img",
        &["create", "-q", "-f", "qed", "base.qed", "8M"],
        d,
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qed",
            "-c",
            "write -P 0x11 0 3M",
            "-c",
            "write -P 0x12 5M 1M",
            "base.qed",
        ],
        d,
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
            "base.qed",
            "-F",
            "qed",
            "top.qed",
        ],
        d,
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qed",
            "-c",
            "write -P 0x22 1M 1M",
            "-c",
            "write -z 2M 512k",
            "top.qed",
        ],
        d,
    );
    let source = open(&d.join("top.qed"), false).await;
    let tp = d.join("dst.qed");
    create(
        &tp,
        &CreateOptions {
            size: SIZE,
            backing_file: top_only.then(|| "base.qed".to_string()),
            ..Default::default()
        },
    )
    .await
    .expect("create target");
    let target = open(&tp, false).await;
    assert_eq!(chain_layers(&target).len(), if top_only { 2 } else { 1 });
    let mut model = read_all(&source).await;
    let sync = if top_only {
        SyncMode::Above(source.backing())
    } else {
        SyncMode::Full
    };
    let driver = Arc::new(MirrorJob::new(
        Arc::clone(&source),
        Arc::clone(&target),
        MirrorConfig {
            granularity: 65536,
            buf_size: MIB,
            sync,
            copy_mode: CopyMode::Background,
            on_source_error: OnError::Report,
            on_target_error: OnError::Report,
            grow_target: false,
            zeroes_free: false,
        },
        Arc::new(NoHooks),
    ));
    let filter = driver.filter();
    let mgr = JobManager::new(Arc::new(Quiet));
    let job = mgr
        .create("m", JobType::Mirror, driver, &JobOptions::default())
        .expect("create job");
    mgr.start(&job);
    for i in 0..200u64 {
        let off = (i * 7919 * 4096 + i * 13) % (SIZE - 70_000);
        let data = vec![(i % 250) as u8 + 1; 5000 + (i as usize * 311) % 60_000];
        filter.write(off, &data).await.expect("guest write");
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        if i == 100 {
            // Until READY (a bound only so a broken build fails instead of hanging).
            for _ in 0..6000 {
                if job.is_ready() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(job.is_ready(), "the mirror never reached READY");
        }
        if i % 3 == 0 {
            tokio::task::yield_now().await;
        }
    }
    job.complete().expect("complete");
    tokio::time::timeout(Duration::from_secs(60), job.wait_concluded())
        .await
        .expect("job finishes");
    assert!(
        read_all(&target).await == model,
        "target differs from source + every acknowledged write"
    );
    source.close().await.expect("close source");
    target.close().await.expect("close target");
    drop((source, target, filter));
    run("qemu-img", &["check", "dst.qed"], d);
    run("qemu-img", &["check", "top.qed"], d);
    std::fs::write(d.join("model.raw"), &model).expect("write model");
    run(
        "qemu-img",
        &["compare", "-f", "qed", "-F", "raw", "dst.qed", "model.raw"],
        d,
    );
    let info: serde_json::Value =
        serde_json::from_str(&run("qemu-img", &["info", "--output=json", "dst.qed"], d))
            .expect("json");
    assert_eq!(
        info.get("backing-filename").and_then(|v| v.as_str()),
        top_only.then_some("base.qed"),
        "{info}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_qed_full() {
    mirror(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_qed_top() {
    mirror(true).await;
}
