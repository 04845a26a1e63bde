//! Our NBD client against qemu-nbd 10 (extended headers, structured replies, allocation depth),
//! with QEMU's own tools as the oracle: what we read equals `qemu-img convert` of the source,
//! our map through NBD equals `qemu-img map` of the same export, our writes pass `qemu-img
//! compare`, and a qcow2 overlay whose backing file is an `nbd://` URL works both ways.

mod client_support;

use client_support::*;
use diskstream_block::format::Format;
use diskstream_block::image::{open_image, OpenOptions};
use diskstream_block::node::BlockNode;
use diskstream_block::status::map_range;
use diskstream_nbd::client::{
    register_url_opener, Address, ClientError, ClientOptions, MetaContext, NbdClient, OpenerConfig,
    ZeroFlags,
};
use diskstream_nbd::proto::{Mode, STATE_HOLE, STATE_ZERO};
use std::path::Path;
use std::sync::Arc;

const SIZE: u64 = 8 * MIB;

/// base ← mid ← top, 8 MiB, with data, zero clusters and unallocated ranges at every depth.
fn make_chain(dir: &Path) -> std::path::PathBuf {
    let base = dir.join("base.qcow2");
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    let s = |p: &Path| p.display().to_string();
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &s(&base), "8M"],
    );
    qemu_io(
        &base,
        "qcow2",
        &[
            "write -P 0x11 0 2M",
            "write -z 3M 1M",
            "write -P 0x22 5M 512k",
        ],
    );
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &s(&base),
            "-F",
            "qcow2",
            &s(&mid),
        ],
    );
    qemu_io(&mid, "qcow2", &["write -P 0x33 1M 1M", "write -z 5M 64k"]);
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &s(&mid),
            "-F",
            "qcow2",
            &s(&top),
        ],
    );
    qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 0x44 1536k 256k",
            "write -P 0x55 7M 4k",
            "write -z 64k 64k",
        ],
    );
    top
}

fn convert_to_raw(src: &Path, fmt: &str, dst: &Path) -> Vec<u8> {
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            fmt,
            "-O",
            "raw",
            &src.display().to_string(),
            &dst.display().to_string(),
        ],
    );
    std::fs::read(dst).expect("read converted image")
}

fn opts(sock: &Path) -> ClientOptions {
    ClientOptions::new(Address::Unix(sock.to_path_buf()), "")
}

/// Our chain-wide map of `top`, as qemu-img prints it.
async fn our_map(top: &Arc<dyn BlockNode>) -> Vec<serde_json::Value> {
    map_range(top, 0, top.size())
        .await
        .expect("map")
        .iter()
        .map(|e| serde_json::to_value(e).expect("serialize"))
        .collect()
}

/// Walk a context's extents over the whole export.
async fn walk(c: &NbdClient, ctx: MetaContext, req_one: bool) -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < c.size() {
        let ext = c
            .block_status(pos, c.size() - pos, ctx, req_one)
            .await
            .expect("block status");
        for e in ext {
            out.push((pos, e.length, e.flags));
            pos += e.length;
        }
    }
    out
}

/// Expand extents into one value per 4 KiB block.
fn per_block(ext: &[(u64, u64, u64)]) -> Vec<u64> {
    let mut v = Vec::new();
    for &(start, len, flags) in ext {
        assert_eq!(start % 4096, 0);
        assert_eq!(len % 4096, 0);
        v.extend(std::iter::repeat_n(flags, (len / 4096) as usize));
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_export_read_only_matches_qemu() {
    init_log();
    register_url_opener(OpenerConfig::default());
    let dir = tmpdir();
    let top = make_chain(dir.path());
    let expect = convert_to_raw(&top, "qcow2", &dir.path().join("expect.raw"));
    let sock = dir.path().join("ro.sock");
    let _srv = qemu_nbd(
        dir.path(),
        "qemu-nbd-ro",
        &[
            "-r",
            "-A",
            "-t",
            "-e",
            "4",
            "-f",
            "qcow2",
            "-k",
            &sock.display().to_string(),
            &top.display().to_string(),
        ],
    );
    let url = unix_url(&sock, "");

    within(30, "read-only chain export", async {
        // Extended headers, both contexts.
        let mut o = opts(&sock);
        o.allocation_depth = true;
        let c = NbdClient::connect(o).await.expect("connect");
        let info = c.info().clone();
        assert_eq!(info.mode, Mode::Extended);
        assert!(info.used_go && info.base_allocation && info.allocation_depth);
        assert!(info.read_only());
        assert_eq!(c.size(), SIZE);

        // One big read, and many pipelined 256 KiB reads.
        assert!(c.read(0, SIZE as usize).await.expect("read all") == expect);
        let futs: Vec<_> = (0..32u64)
            .map(|i| {
                let c = &c;
                async move { (i, c.read(i * 256 * 1024, 256 * 1024).await) }
            })
            .collect();
        for (i, r) in join(futs).await {
            let at = (i * 256 * 1024) as usize;
            assert!(r.expect("read") == expect[at..at + 256 * 1024], "piece {i}");
        }
        // Writes are refused locally on a read-only export.
        assert!(c.write(0, vec![1; 512], false).await.is_err());

        // qemu:allocation-depth equals the depth qemu-img map reports for the chain.
        let qmap = parse_map(&run_ok(
            "qemu-img",
            &["map", "--output=json", &top.display().to_string()],
        ));
        let mut want = Vec::new();
        for e in &qmap {
            let len = e["length"].as_u64().expect("length");
            let depth = if e["present"].as_bool() == Some(true) {
                e["depth"].as_u64().expect("depth") + 1
            } else {
                0
            };
            want.extend(std::iter::repeat_n(depth, (len / 4096) as usize));
        }
        let got = per_block(&walk(&c, MetaContext::AllocationDepth, false).await);
        assert_eq!(got, want, "allocation depth per 4 KiB block");

        // base:allocation: REQ_ONE and full answers agree; hole+zero exactly where the chain
        // reads as zeroes without data.
        let full = walk(&c, MetaContext::BaseAllocation, false).await;
        let one = walk(&c, MetaContext::BaseAllocation, true).await;
        assert_eq!(per_block(&full), per_block(&one));
        for (start, len, flags) in &full {
            if flags & (STATE_ZERO as u64) != 0 {
                let s = *start as usize;
                assert!(expect[s..s + *len as usize].iter().all(|&b| b == 0));
            }
            assert!(flags & !((STATE_HOLE | STATE_ZERO) as u64) == 0);
        }
        c.close();

        // Structured replies only, and simple replies via NBD_OPT_EXPORT_NAME.
        let mut o = opts(&sock);
        o.extended_headers = false;
        let c = NbdClient::connect(o).await.expect("connect structured");
        assert_eq!(c.info().mode, Mode::Structured);
        assert!(c.read(0, SIZE as usize).await.expect("read") == expect);
        assert_eq!(walk(&c, MetaContext::BaseAllocation, false).await, full);
        drop(c);
        let mut o = opts(&sock);
        o.extended_headers = false;
        o.structured_replies = false;
        o.opt_go = false;
        let c = NbdClient::connect(o).await.expect("connect simple");
        assert_eq!(c.info().mode, Mode::Simple);
        assert!(!c.info().used_go && !c.info().base_allocation);
        assert!(c.read(0, SIZE as usize).await.expect("read") == expect);
        drop(c);

        // The block layer over NBD: our map equals qemu-img map of the same export.
        let node = open_image(
            Path::new(&url),
            &OpenOptions {
                format: Some(Format::Raw),
                ..Default::default()
            },
        )
        .await
        .expect("open nbd image");
        let theirs = parse_map(&run_ok(
            "qemu-img",
            &["map", "--output=json", "-f", "raw", &url],
        ));
        assert_eq!(our_map(&node).await, theirs, "map through NBD");
        // Unaligned reads through the protocol driver.
        let mut buf = vec![0u8; 70_001];
        node.read(1_000_003, &mut buf)
            .await
            .expect("unaligned read");
        assert!(buf == expect[1_000_003..1_070_004]);
        // Probing a URL top image: the guest data is not qcow2.
        let probed = open_image(Path::new(&url), &OpenOptions::default())
            .await
            .expect("open probed");
        assert_eq!(probed.format_name(), "raw");
    })
    .await;
}

/// Poll several futures on this task (the test has no futures crate).
async fn join<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.into_iter().map(Box::pin).map(Some).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if let Some(fut) = f {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *o = Some(v);
                        *f = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writable_export_roundtrip_passes_qemu_img_compare() {
    init_log();
    let dir = tmpdir();
    let top = make_chain(dir.path());
    let mut model = convert_to_raw(&top, "qcow2", &dir.path().join("model.raw"));
    let sock = dir.path().join("rw.sock");
    let mut srv = qemu_nbd(
        dir.path(),
        "qemu-nbd-rw",
        &[
            "-t",
            "-f",
            "qcow2",
            "-k",
            &sock.display().to_string(),
            &top.display().to_string(),
        ],
    );
    within(30, "writable export", async {
        let c = NbdClient::connect(opts(&sock)).await.expect("connect");
        assert!(!c.info().read_only() && c.info().can_zero() && c.info().can_trim());
        // 128 pipelined writes of odd sizes, each inside its own 64 KiB slot (disjoint, so the
        // result does not depend on the order the server applies them).
        let futs: Vec<_> = (0..128u64)
            .map(|i| {
                let off = i * 65536 + (i * 37) % 4096;
                let len = 512 + ((i * 7919) % 60_000) as usize;
                let data = pattern(i, len);
                (off, data)
            })
            .collect();
        for (off, data) in &futs {
            model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
        let writes: Vec<_> = futs
            .into_iter()
            .map(|(off, data)| {
                let c = &c;
                async move { c.write(off, data, off % 3 == 0).await }
            })
            .collect();
        for r in join(writes).await {
            r.expect("write");
        }
        // Zeroing with and without holes, a trim followed by zeroing, a flush.
        c.write_zeroes(
            2 * MIB + 4096,
            300_000,
            ZeroFlags {
                may_trim: true,
                ..Default::default()
            },
        )
        .await
        .expect("write zeroes");
        model[(2 * MIB + 4096) as usize..(2 * MIB + 4096 + 300_000) as usize].fill(0);
        c.write_zeroes(6 * MIB, MIB, ZeroFlags::default())
            .await
            .expect("write zeroes no hole");
        model[(6 * MIB) as usize..(7 * MIB) as usize].fill(0);
        c.trim(4 * MIB, MIB, false).await.expect("trim");
        c.write_zeroes(4 * MIB, MIB, ZeroFlags::default())
            .await
            .expect("zero after trim");
        model[(4 * MIB) as usize..(5 * MIB) as usize].fill(0);
        c.flush().await.expect("flush");
        assert!(c.read(0, SIZE as usize).await.expect("read back") == model);
        // Requests past the end fail locally; the connection stays usable.
        assert!(c.read(SIZE - 512, 1024).await.is_err());
        assert!(c.read(0, 512).await.is_ok());
        c.close();
    })
    .await;
    // Let the server finish and close the image before QEMU looks at it.
    srv.kill();
    let model_path = dir.path().join("model.raw");
    std::fs::write(&model_path, &model).expect("write model");
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            &top.display().to_string(),
            &model_path.display().to_string(),
        ],
    );
    run_ok("qemu-img", &["check", "-q", &top.display().to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qcow2_overlay_with_nbd_backing() {
    init_log();
    register_url_opener(OpenerConfig::default());
    let dir = tmpdir();
    let top = make_chain(dir.path());
    let mut model = convert_to_raw(&top, "qcow2", &dir.path().join("model.raw"));
    let port = free_port();
    let _srv = qemu_nbd(
        dir.path(),
        "qemu-nbd-tcp",
        &[
            "-r",
            "-t",
            "-e",
            "8",
            "-x",
            "chain",
            "-b",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-f",
            "qcow2",
            &top.display().to_string(),
        ],
    );
    let url = format!("nbd://127.0.0.1:{port}/chain");
    let ov = dir.path().join("ov.qcow2");
    let ovs = ov.display().to_string();
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=65536",
            "-b",
            &url,
            "-F",
            "raw",
            &ovs,
        ],
    );
    within(30, "overlay over nbd backing", async {
        // A wrong export name is a clear error from NBD_OPT_GO.
        let wrong = ClientOptions::new(
            Address::Tcp {
                host: "127.0.0.1".into(),
                port,
            },
            "nope",
        );
        match NbdClient::connect(wrong).await {
            Err(ClientError::ExportNotFound { export, .. }) => assert_eq!(export, "nope"),
            other => panic!("expected an unknown-export error, got {other:?}"),
        }
        let node = open_image(
            &ov,
            &OpenOptions {
                read_only: false,
                ..Default::default()
            },
        )
        .await
        .expect("open overlay");
        let backing = node.backing().expect("nbd backing");
        assert_eq!(backing.filename(), url);
        assert!(backing.read_only());
        // Our map of the overlay (unwritten yet) equals qemu-img's, through the NBD backing.
        let theirs = parse_map(&run_ok("qemu-img", &["map", "--output=json", "-U", &ovs]));
        assert_eq!(our_map(&node).await, theirs, "overlay map before writes");
        // Unaligned writes that need copy-on-write from the NBD backing, and zeroes.
        for (i, (off, len)) in [
            (100_000u64, 200_000usize),
            (3 * MIB - 1000, 5000),
            (7 * MIB + 3, 70_000),
        ]
        .into_iter()
        .enumerate()
        {
            let data = pattern(100 + i as u64, len);
            node.write(off, &data).await.expect("overlay write");
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        node.write_zeroes(MIB + 65536, 131_072, false)
            .await
            .expect("overlay zeroes");
        model[(MIB + 65536) as usize..(MIB + 196_608) as usize].fill(0);
        let mut all = vec![0u8; SIZE as usize];
        node.read(0, &mut all).await.expect("read overlay");
        assert!(all == model);
        node.close().await.expect("close overlay");
        drop(node);
        drop(backing);
    })
    .await;
    let model_path = dir.path().join("model.raw");
    std::fs::write(&model_path, &model).expect("write model");
    // QEMU opens the overlay and its nbd:// backing itself.
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            &ovs,
            &model_path.display().to_string(),
        ],
    );
    run_ok("qemu-img", &["check", "-q", &ovs]);
    // And the maps agree after the writes too.
    within(30, "overlay map after writes", async {
        let node = open_image(&ov, &OpenOptions::default())
            .await
            .expect("reopen overlay");
        let theirs = parse_map(&run_ok("qemu-img", &["map", "--output=json", "-U", &ovs]));
        assert_eq!(our_map(&node).await, theirs, "overlay map after writes");
    })
    .await;
}
