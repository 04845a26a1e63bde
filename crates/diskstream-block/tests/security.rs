//! Format-probing attacks (issue 8, security): a guest owns the bytes of its disk, so nothing
//! it writes there may make the host open another file.
//!
//! * A raw disk whose first sector holds a forged qcow2 header naming a secret file as its
//!   backing file is read as raw wherever it is a backing file (the overlay records `raw`):
//!   the forged header is data, the secret is never opened.
//! * An overlay that records no backing format is not opened without one (no probing of
//!   backing files), and opens as raw when the user names it.
//! * A top image whose format was probed as raw refuses guest writes that would make its first
//!   sector probe as qcow2 next time (QEMU's rule); an explicitly raw image allows them.

mod common;

use common::*;
use diskstream_block::format::qcow2::Qcow2;
use diskstream_block::format::Format;
use diskstream_block::image::{chain_layers, open_image, OpenOptions};
use diskstream_block::BlockError;
use std::sync::Arc;

const SECRET: &[u8] = b"root:$6$secret-password-hash:19000:0:99999:7:::\n";

/// A raw disk (1 MiB) whose first bytes are a real qcow2 header naming `secret.raw` as backing.
fn forged_disk(dir: &tempfile::TempDir) -> (std::path::PathBuf, Vec<u8>) {
    let secret = p(dir, "secret.raw");
    let mut s = SECRET.to_vec();
    s.resize(65536, b'S');
    write_file(&secret, &s);
    let forged = p(dir, "forged.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        secret.to_str().expect("utf-8"),
        "-F",
        "raw",
        forged.to_str().expect("utf-8"),
        "64k",
    ]);
    let header = std::fs::read(&forged).expect("read forged header");
    let mut disk = header.clone();
    disk.resize(1 << 20, 0);
    let path = p(dir, "disk.raw");
    write_file(&path, &disk);
    (path, disk)
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_header_in_raw_backing_is_data() {
    let dir = tmpdir();
    let (disk, bytes) = forged_disk(&dir);
    let top = p(&dir, "top.qcow2");
    qemu_create_qcow2(&top, 1 << 20, "", Some((&disk, "raw")));
    let node = open_image(&top, &OpenOptions::default())
        .await
        .expect("open overlay");
    let layers = chain_layers(&node);
    assert_eq!(layers.len(), 2, "the chain ends at the raw disk");
    assert_eq!(layers[1].format_name(), "raw");
    let mut got = vec![0u8; 1 << 20];
    node.read(0, &mut got).await.expect("read");
    assert_eq!(got, bytes, "the forged header reads back as plain data");
    assert!(
        !got.windows(SECRET.len()).any(|w| w == SECRET),
        "the secret must never be read"
    );
    // qemu-img agrees on the guest view.
    assert_compare(&top, "qcow2", &disk, "raw");
}

#[tokio::test(flavor = "multi_thread")]
async fn backing_without_format_is_never_probed() {
    let dir = tmpdir();
    let (disk, _) = forged_disk(&dir);
    let top = p(&dir, "top.qcow2");
    qemu_create_qcow2(&top, 1 << 20, "", Some((&disk, "raw")));
    // Erase the recorded backing format, as an old or hostile image would have it.
    {
        let rw = open_image(
            &top,
            &OpenOptions {
                read_only: false,
                format: Some(Format::Qcow2),
                no_backing: true,
                ..OpenOptions::default()
            },
        )
        .await
        .expect("open rw");
        let q = rw.as_any().downcast_ref::<Qcow2>().expect("qcow2");
        q.set_backing_file(Some(("disk.raw".to_string(), None)))
            .await
            .expect("rewrite backing without format");
        rw.close().await.expect("close");
    }
    let err = open_image(&top, &OpenOptions::default())
        .await
        .err()
        .expect("a backing file without a recorded format is refused");
    assert!(
        matches!(err, BlockError::Chain(_)) || err.to_string().contains("format"),
        "clear error naming the missing format: {err}"
    );
    // Naming the format opens it as raw: the forged header is still data.
    let node = open_image(
        &top,
        &OpenOptions {
            backing_format: Some(Format::Raw),
            ..OpenOptions::default()
        },
    )
    .await
    .expect("open with an explicit backing format");
    assert_eq!(chain_layers(&node)[1].format_name(), "raw");
}

#[tokio::test(flavor = "multi_thread")]
async fn probed_raw_refuses_a_forged_header() {
    let dir = tmpdir();
    let path = p(&dir, "plain.raw");
    write_file(&path, &vec![0u8; 1 << 20]);
    let (_, forged) = forged_disk(&dir);
    let rw = OpenOptions {
        read_only: false,
        ..OpenOptions::default()
    };
    let node: Arc<_> = open_image(&path, &rw).await.expect("open probed");
    assert_eq!(node.format_name(), "raw");
    let err = node
        .write(0, &forged[..4096])
        .await
        .expect_err("writing a qcow2 header into a probed raw disk is refused");
    assert_eq!(err.errno(), 1, "EPERM: {err}");
    // Even one byte at a time: the magic's last byte completes it.
    node.write(0, &forged[..3])
        .await
        .expect("3 bytes are harmless");
    assert!(node.write(3, &forged[3..4]).await.is_err());
    // Other writes to the first sector are fine, and so is zeroing it.
    node.write(0, b"boot sector").await.expect("ordinary data");
    node.write_zeroes(0, 512, false).await.expect("zeroing");
    node.close().await.expect("close");
    assert_eq!(
        std::fs::read(&path).expect("read")[..4],
        [0, 0, 0, 0],
        "nothing forged landed"
    );
    // With the format named explicitly, the user takes responsibility: allowed, as in QEMU.
    let explicit = open_image(
        &path,
        &OpenOptions {
            read_only: false,
            format: Some(Format::Raw),
            ..OpenOptions::default()
        },
    )
    .await
    .expect("open explicit raw");
    explicit
        .write(0, &forged[..4096])
        .await
        .expect("explicit raw accepts any data");
    explicit.close().await.expect("close");
}
