//! The S3 protocol against moto's S3 server (`tests/servers.py s3`): signed ranged reads of
//! an object, a qcow2 overlay whose backing file is `s3://bucket/key` (reads and maps equal
//! QEMU's view over a local copy), a missing key, and an object replaced underneath (a new
//! ETag) refused. moto also serves objects over plain path-style HTTP, read here too. Then a
//! stream job and a copy-on-read filter over `s3://images/base.qcow2` make overlays that hold
//! every byte themselves (`qemu-img check` and `compare` against the source). Last, the
//! errors: 403 for a private object read anonymously, a shorter replacement refused, a
//! deleted object a 404.

mod common;

use common::*;
use diskstream_block::filter::cor::{CopyOnRead, CorConfig};
use diskstream_block::format::Format;
use diskstream_block::image::{chain_layers, open_image, OpenOptions};
use diskstream_block::node::BlockNode;
use diskstream_block::protocol::Protocol;
use diskstream_block::status::map_range;
use diskstream_http::{HttpConfig, HttpProtocol};
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_objects_and_backing_files() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let objects = d.join("objects");
    std::fs::create_dir(&objects).expect("mkdir");
    let data = pattern(8, (5 * MIB + 512) as usize);
    std::fs::write(objects.join("base.raw"), &data).expect("write");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "objects/base.raw",
            "objects/base.qcow2",
        ],
        d,
    );
    let srv = Server::s3(&objects, "images");
    // (This test binary is the only user of these variables.)
    std::env::set_var("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", srv.port));
    std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    std::env::set_var("AWS_REGION", "us-east-1");
    let cfg = HttpConfig {
        block_size: 256 * 1024,
        retries: 2,
        retry_delay: Duration::from_millis(20),
        ..Default::default()
    };
    diskstream_http::register_url_opener(cfg.clone());

    let p = HttpProtocol::open("s3://images/base.raw", &cfg)
        .await
        .expect("open s3");
    assert_eq!(p.len().await.expect("len"), data.len() as u64);
    let got = p.read_vec(0, data.len()).await.expect("read");
    assert!(got == data, "s3 contents");
    // moto serves the same object over plain HTTP, path-style.
    let h = HttpProtocol::open(
        &format!("http://127.0.0.1:{}/images/base.raw", srv.port),
        &cfg,
    )
    .await
    .expect("open http");
    assert!(
        h.read_vec(MIB, MIB as usize).await.expect("read") == data[MIB as usize..2 * MIB as usize]
    );

    let e = HttpProtocol::open("s3://images/missing", &cfg)
        .await
        .err()
        .expect("404");
    assert!(e.to_string().contains("not found (HTTP 404)"), "{e}");

    // A qcow2 overlay over s3://images/base.qcow2.
    overlay(d, "top.qcow2", "s3://images/base.qcow2", "6M");
    let opts = |ro| OpenOptions {
        read_only: ro,
        format: Some(Format::Qcow2),
        ..Default::default()
    };
    let top = open_image(&d.join("top.qcow2"), &opts(false))
        .await
        .expect("open top");
    top.write(MIB + 7, &[9u8; 100_000]).await.expect("write");
    top.close().await.expect("close");
    let (expected, theirs) = qemu_view_over_local(d, "objects/base.qcow2");
    let top = open_image(&d.join("top.qcow2"), &opts(true))
        .await
        .expect("open top");
    let mut got = vec![0u8; top.size() as usize];
    top.read(0, &mut got).await.expect("read");
    assert!(got == expected, "overlay over s3");
    let ours =
        serde_json::to_value(map_range(&top, 0, top.size()).await.expect("map")).expect("json");
    assert_eq!(ours, theirs);

    // Replace base.raw in the bucket under the open reader: refused, not mixed.
    let mut other = data.clone();
    other[0] ^= 0xff;
    std::fs::write(d.join("other.raw"), &other).expect("write");
    s3_put(d, srv.port, "other.raw", "images", "base.raw");
    let fresh = HttpProtocol::open(
        "s3://images/base.raw",
        &HttpConfig {
            block_size: 4096,
            ..cfg.clone()
        },
    )
    .await
    .expect("open");
    assert_eq!(fresh.read_vec(0, 1).await.expect("read"), vec![other[0]]);
    let stale = HttpProtocol::open("s3://images/base.qcow2", &cfg)
        .await
        .expect("open");
    drop(stale);
    // `p` cached everything; a reader with an empty cache sees the change.
    let q = HttpProtocol::open("s3://images/base.raw", &cfg)
        .await
        .expect("open");
    std::fs::write(d.join("other.raw"), &data).expect("write");
    s3_put(d, srv.port, "other.raw", "images", "base.raw");
    let e = q.read_vec(2 * MIB, 10).await.expect_err("changed");
    assert!(e.to_string().contains("changed since it was opened"), "{e}");

    // The base as the overlays see it: the object's bytes, then zeroes up to 6 MiB.
    let mut view = data.clone();
    view.resize(6 * MIB as usize, 0);
    std::fs::write(d.join("view.raw"), &view).expect("write");
    stream_over_s3(d, &view).await;
    copy_on_read_over_s3(d, &view).await;
    access_and_replacement_errors(d, srv.port, &cfg, &data).await;
}

/// 403 for an object the caller may not read (a private object read anonymously, over
/// `s3://` without credentials and over moto's plain HTTP); an object replaced by a shorter
/// one under an open reader is refused (moto honours `If-Match`: 412); a deleted object is a
/// 404 (ENOENT).
async fn access_and_replacement_errors(
    d: &std::path::Path,
    port: u16,
    cfg: &HttpConfig,
    data: &[u8],
) {
    std::fs::write(d.join("private.raw"), &data[..MIB as usize]).expect("write");
    // Uploaded without an ACL: private.
    s3_put(d, port, "private.raw", "images", "private.raw");
    let forbidden = |e: diskstream_http::HttpError| {
        assert!(e.to_string().contains("access denied (HTTP 403"), "{e}");
        assert_eq!(e.errno(), 13);
    };
    forbidden(
        HttpProtocol::open(&format!("http://127.0.0.1:{port}/images/private.raw"), cfg)
            .await
            .err()
            .expect("403 over http"),
    );
    let (key, secret) = (
        std::env::var("AWS_ACCESS_KEY_ID").ok(),
        std::env::var("AWS_SECRET_ACCESS_KEY").ok(),
    );
    std::env::remove_var("AWS_ACCESS_KEY_ID");
    std::env::remove_var("AWS_SECRET_ACCESS_KEY");
    let anonymous = HttpProtocol::open("s3://images/private.raw", cfg).await;
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", key),
        ("AWS_SECRET_ACCESS_KEY", secret),
    ] {
        if let Some(v) = v {
            std::env::set_var(k, v);
        }
    }
    forbidden(anonymous.err().expect("403 over s3 without credentials"));
    // With credentials the same object reads.
    let p = HttpProtocol::open("s3://images/private.raw", cfg)
        .await
        .expect("open private");
    assert!(p.read_vec(0, 4096).await.expect("read") == data[..4096]);

    // Replaced by a shorter object.
    let r = HttpProtocol::open("s3://images/base.raw", cfg)
        .await
        .expect("open");
    assert_eq!(r.read_vec(0, 10).await.expect("read"), &data[..10]);
    std::fs::write(d.join("short.raw"), &data[..3 * MIB as usize]).expect("write");
    s3_put(d, port, "short.raw", "images", "base.raw");
    // (Past the read-ahead of the first read.)
    let e = r.read_vec(4 * MIB, 10).await.expect_err("replaced");
    assert!(e.to_string().contains("changed since it was opened"), "{e}");
    assert_eq!(e.errno(), 116);

    // Deleted (the whole object back first).
    std::fs::write(d.join("full.raw"), data).expect("write");
    s3_put(d, port, "full.raw", "images", "base.raw");
    let r = HttpProtocol::open("s3://images/base.raw", cfg)
        .await
        .expect("open");
    assert_eq!(r.read_vec(0, 10).await.expect("read"), &data[..10]);
    s3_delete(d, port, "images", "base.raw");
    let e = r.read_vec(4 * MIB, 10).await.expect_err("deleted");
    assert!(e.to_string().contains("not found (HTTP 404)"), "{e}");
    assert_eq!(e.errno(), 2);
}

/// A fresh 6 MiB overlay of `s3://images/base.qcow2` named `name`, opened read-write.
async fn s3_overlay(d: &std::path::Path, name: &str) -> Arc<dyn BlockNode> {
    overlay(d, name, "s3://images/base.qcow2", "6M");
    let opts = OpenOptions {
        read_only: false,
        format: Some(Format::Qcow2),
        ..Default::default()
    };
    open_image(&d.join(name), &opts)
        .await
        .expect("open overlay")
}

async fn read_all(n: &Arc<dyn BlockNode>) -> Vec<u8> {
    let mut v = vec![0u8; n.size() as usize];
    n.read(0, &mut v).await.expect("read");
    v
}

/// block-stream of an overlay over S3: afterwards it has no backing file, reads the source
/// and passes qemu-img check and compare.
async fn stream_over_s3(d: &std::path::Path, view: &[u8]) {
    let top = s3_overlay(d, "streamed.qcow2").await;
    let layers = chain_layers(&top);
    assert_eq!(layers.len(), 2);
    let driver = Arc::new(diskstream_jobs::StreamJob::new(
        Arc::clone(&top),
        Arc::clone(&layers[1]),
        None,
        diskstream_jobs::StreamConfig::default(),
        Arc::new(diskstream_jobs::stream::NoHooks),
    ));
    struct Quiet;
    impl diskstream_jobs::job::EventSink for Quiet {
        fn emit(&self, _ev: diskstream_jobs::job::JobEvent) {}
    }
    let mgr = diskstream_jobs::JobManager::new(Arc::new(Quiet));
    let job = mgr
        .create(
            "s",
            diskstream_jobs::JobType::Stream,
            driver,
            &Default::default(),
        )
        .expect("job");
    mgr.start(&job);
    tokio::time::timeout(Duration::from_secs(60), job.wait_concluded())
        .await
        .expect("stream finishes");
    assert!(top.backing().is_none(), "backing link dropped");
    assert!(read_all(&top).await == view, "contents after the stream");
    top.close().await.expect("close");
    drop((top, layers));
    run("qemu-img", &["check", "streamed.qcow2"], d);
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "streamed.qcow2",
            "view.raw",
        ],
        d,
    );
}

/// One full read through a copy-on-read filter over an S3-backed overlay copies every byte
/// into it: the overlay alone (backing link cut in a copy) equals the source for qemu-img.
async fn copy_on_read_over_s3(d: &std::path::Path, view: &[u8]) {
    let top = s3_overlay(d, "cor.qcow2").await;
    let cor = CopyOnRead::new(Arc::clone(&top), None, CorConfig::default()).expect("filter");
    let node: Arc<dyn BlockNode> = cor.clone();
    assert!(read_all(&node).await == view, "read through the filter");
    cor.close().await.expect("close filter");
    let st = cor.stats();
    assert!(st.misses > 0 && st.bytes_copied > 0, "{st:?}");
    let map = map_range(&top, 0, top.size()).await.expect("map");
    for e in serde_json::to_value(&map)
        .expect("json")
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        assert_eq!(e["depth"], 0, "{e}");
    }
    top.close().await.expect("close");
    drop((node, cor, top));
    std::fs::copy(d.join("cor.qcow2"), d.join("cor-flat.qcow2")).expect("copy");
    run("qemu-img", &["rebase", "-u", "-b", "", "cor-flat.qcow2"], d);
    run("qemu-img", &["check", "cor-flat.qcow2"], d);
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "cor-flat.qcow2",
            "view.raw",
        ],
        d,
    );
}
