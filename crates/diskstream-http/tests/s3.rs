//! The S3 protocol against moto's S3 server (`tests/servers.py s3`): signed ranged reads of
//! an object, a qcow2 overlay whose backing file is `s3://bucket/key` (reads and maps equal
//! QEMU's view over a local copy), a missing key, and an object replaced underneath (a new
//! ETag) refused. moto also serves objects over plain path-style HTTP, read here too.

mod common;

use common::*;
use diskstream_block::format::Format;
use diskstream_block::image::{open_image, OpenOptions};
use diskstream_block::protocol::Protocol;
use diskstream_block::status::map_range;
use diskstream_http::{HttpConfig, HttpProtocol};
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
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "s3://images/base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "6M",
        ],
        d,
    );
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
}
