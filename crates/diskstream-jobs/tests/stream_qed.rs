//! block-stream on QED chains (QEMU-made: raw base <- QED mid <- QED top, and a qcow2 mid
//! under a QED top), with concurrent guest writes: the final contents equal a model, the
//! backing link is rewritten in the QED header (intermediate streams record the new backing
//! with its format, raw ones with QED's no-probe flag), and `qemu-img check`/`compare` agree.

mod common;

use common::*;

use diskstream_block::format::Format;
use diskstream_block::image::{chain_layers, open_image, OpenOptions};
use diskstream_jobs::job::JobOptions;
use diskstream_jobs::stream::NoHooks;
use diskstream_jobs::{JobManager, JobType, StreamConfig, StreamJob};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

async fn stream(dir: &Path, mid_fmt: &str, intermediate: bool) {
    let size = 8 * MIB;
    run(
        "qemu-img",
        &["create", "-q", "-f", "raw", "base.raw", "8M"],
        dir,
    );
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x11 0 8M", "base.raw"],
        dir,
    );
    let mid = format!("mid.{mid_fmt}");
    run(
        "qemu-img",
        &[
            "create", "-q", "-f", mid_fmt, "-b", "base.raw", "-F", "raw", &mid,
        ],
        dir,
    );
    run(
        "qemu-io",
        &[
            "-f",
            mid_fmt,
            "-c",
            "write -P 0x22 1M 2M",
            "-c",
            "write -z 4M 1M",
            &mid,
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
            &mid,
            "-F",
            mid_fmt,
            "top.qed",
        ],
        dir,
    );
    run(
        "qemu-io",
        &["-f", "qed", "-c", "write -P 0x33 6M 100k", "top.qed"],
        dir,
    );
    let top = open_image(
        &dir.join("top.qed"),
        &OpenOptions {
            read_only: false,
            format: Some(Format::Qed),
            ..Default::default()
        },
    )
    .await
    .expect("open");
    let layers = chain_layers(&top);
    assert_eq!(layers.len(), 3);
    let bottom = Arc::clone(&layers[if intermediate { 1 } else { 2 }]);
    let mut model = read_all(&top).await;
    let mgr = JobManager::new(Arc::new(Quiet));
    let cfg = StreamConfig {
        chunk_size: 256 * 1024,
        parallel: 4,
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
    for i in 0..200u64 {
        let off = (i * 7919 * 4096 + i * 13) % (size - 70_000);
        let d = vec![(i % 250) as u8 + 1; 5000 + (i as usize * 311) % 60_000];
        top.write(off, &d).await.expect("guest write");
        model[off as usize..off as usize + d.len()].copy_from_slice(&d);
        if i % 3 == 0 {
            tokio::task::yield_now().await;
        }
    }
    tokio::time::timeout(Duration::from_secs(60), job.wait_concluded())
        .await
        .expect("job finishes");
    assert_eq!(read_all(&top).await, model, "contents after the stream");
    assert_eq!(chain_layers(&top).len(), if intermediate { 2 } else { 1 });
    top.close().await.expect("close");
    drop(top);
    let info: serde_json::Value =
        serde_json::from_str(&run("qemu-img", &["info", "--output=json", "top.qed"], dir))
            .expect("json");
    if intermediate {
        let name = info["backing-filename"].as_str().unwrap_or_default();
        assert!(name.ends_with("base.raw"), "{info}");
        assert_eq!(info["backing-filename-format"], "raw", "{info}");
    } else {
        assert!(info.get("backing-filename").is_none(), "{info}");
    }
    run("qemu-img", &["check", "top.qed"], dir);
    std::fs::write(dir.join("model.raw"), &model).expect("write model");
    run(
        "qemu-img",
        &["compare", "-f", "qed", "-F", "raw", "top.qed", "model.raw"],
        dir,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_qed_chain_fully() {
    let dir = tempfile::tempdir().expect("tmp");
    stream(dir.path(), "qed", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_qed_chain_intermediate() {
    let dir = tempfile::tempdir().expect("tmp");
    stream(dir.path(), "qed", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_qcow2_mid_into_qed_top() {
    let dir = tempfile::tempdir().expect("tmp");
    stream(dir.path(), "qcow2", true).await;
}
