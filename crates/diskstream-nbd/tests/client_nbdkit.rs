//! Our NBD client against nbdkit: the memory plugin (multi-conn, sparse block status), old
//! negotiation styles (no structured replies, no fixed newstyle), block size constraints
//! enforced by the blocksize-policy filter, fault injection with the error and delay filters,
//! and the reconnect state machine with the server killed (SIGKILL) and restarted mid-read.
//! A fresh nbdkit runs for every case; every wait is bounded so a hang fails the test.

mod client_support;

use client_support::*;
use diskstream_block::protocol::Protocol;
use diskstream_block::BlockError;
use diskstream_nbd::client::{
    Address, ClientError, ClientOptions, ConnectionState, MetaContext, NbdClient, NbdProtocol,
    ZeroFlags,
};
use diskstream_nbd::proto::{Mode, STATE_HOLE, STATE_ZERO};
use std::path::Path;
use std::time::{Duration, Instant};

fn opts(sock: &Path) -> ClientOptions {
    ClientOptions::new(Address::Unix(sock.to_path_buf()), "")
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Run futures concurrently on this task.
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

/// Wait until the client reaches `want`.
async fn wait_state(c: &NbdClient, want: ConnectionState, secs: u64) {
    let mut rx = c.subscribe_state();
    within(secs, &format!("state {want:?}"), async {
        loop {
            if *rx.borrow_and_update() == want {
                return;
            }
            if rx.changed().await.is_err() {
                panic!("state channel closed");
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_plugin_multi_conn_pipelining_and_block_status() {
    init_log();
    let dir = tmpdir();
    let sock = dir.path().join("mem.sock");
    let _srv = nbdkit(dir.path(), "mem", &["-U", &s(&sock), "memory", "size=32M"]);
    within(30, "memory plugin", async {
        let mut o = opts(&sock);
        o.connections = 3;
        let c = NbdClient::connect(o).await.expect("connect");
        let info = c.info().clone();
        assert_eq!(
            info.mode,
            Mode::Structured,
            "nbdkit 1.32 has no extended headers"
        );
        assert!(info.can_multi_conn() && info.base_allocation);
        assert_eq!(info.connections, 3);
        let size = c.size() as usize;
        let mut model = vec![0u8; size];

        // 256 pipelined writes spread over three connections, then a flush covering them all.
        let writes: Vec<(u64, Vec<u8>)> = (0..256u64)
            .map(|i| {
                (
                    i * 100_000 + 7 * i,
                    pattern(i, 1000 + (i as usize * 311) % 50_000),
                )
            })
            .collect();
        for (off, d) in &writes {
            model[*off as usize..*off as usize + d.len()].copy_from_slice(d);
        }
        let futs: Vec<_> = writes
            .into_iter()
            .map(|(off, d)| {
                let c = &c;
                async move { c.write(off, d, false).await }
            })
            .collect();
        for r in join(futs).await {
            r.expect("write");
        }
        c.flush().await.expect("flush");
        let reads: Vec<_> = (0..32u64)
            .map(|i| {
                let c = &c;
                async move { (i, c.read(i * MIB, MIB as usize).await) }
            })
            .collect();
        for (i, r) in join(reads).await {
            let at = (i * MIB) as usize;
            assert!(r.expect("read") == model[at..at + MIB as usize], "MiB {i}");
        }

        // Zeroing and trimming, then block status: the memory plugin reports what is stored.
        c.trim(0, 8 * MIB, false).await.expect("trim");
        model[..(8 * MIB) as usize].fill(0);
        c.write_zeroes(
            16 * MIB,
            4 * MIB,
            ZeroFlags {
                may_trim: true,
                ..Default::default()
            },
        )
        .await
        .expect("zero");
        model[(16 * MIB) as usize..(20 * MIB) as usize].fill(0);
        assert!(c.read(0, size).await.expect("read all") == model);
        let ext = c
            .block_status(0, 4 * MIB, MetaContext::BaseAllocation, false)
            .await
            .expect("block status");
        assert_eq!(ext[0].flags, (STATE_HOLE | STATE_ZERO) as u64, "{ext:?}");
        let mut pos = 0u64;
        while pos < c.size() {
            let e = c
                .block_status(pos, c.size() - pos, MetaContext::BaseAllocation, true)
                .await
                .expect("block status");
            assert_eq!(e.len(), 1);
            if e[0].flags & STATE_ZERO as u64 != 0 {
                let r = pos as usize..(pos + e[0].length) as usize;
                assert!(model[r].iter().all(|&b| b == 0), "zero extent at {pos}");
            }
            pos += e[0].length;
        }
        // No allocation-depth context on nbdkit: a clear error, not a hang.
        assert!(matches!(
            c.block_status(0, 4096, MetaContext::AllocationDepth, true)
                .await,
            Err(ClientError::NotSupported(_))
        ));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_servers_simple_replies_and_export_name() {
    init_log();
    let dir = tmpdir();
    // No structured replies: simple replies, no block status.
    let sock = dir.path().join("nosr.sock");
    let _a = nbdkit(
        dir.path(),
        "nosr",
        &["--no-sr", "-U", &s(&sock), "memory", "size=4M"],
    );
    // Plain (not fixed) newstyle: only NBD_OPT_EXPORT_NAME is possible, with zero padding.
    let sock2 = dir.path().join("old.sock");
    let _b = nbdkit(
        dir.path(),
        "old",
        &["--mask-handshake=0", "-U", &s(&sock2), "memory", "size=4M"],
    );
    within(30, "old servers", async {
        for (sock, go) in [(&sock, true), (&sock2, false)] {
            let c = NbdClient::connect(opts(sock)).await.expect("connect");
            assert_eq!(c.info().mode, Mode::Simple);
            assert_eq!(c.info().used_go, go);
            assert!(!c.info().base_allocation);
            let d = pattern(9, 3 * 65536 + 5);
            c.write(12345, d.clone(), true).await.expect("write");
            assert!(c.read(12345, d.len()).await.expect("read") == d);
            let p = NbdProtocol::from_client(c, "old");
            // Without block status everything is data.
            assert_eq!(p.data_status(0, 4096).await.expect("status"), (true, 4096));
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_size_constraints_are_obeyed() {
    init_log();
    let dir = tmpdir();
    let sock = dir.path().join("bs.sock");
    // Any request not aligned to 4 KiB or above 64 KiB fails with EINVAL.
    let _srv = nbdkit(
        dir.path(),
        "bs",
        &[
            "-U",
            &s(&sock),
            "--filter=blocksize-policy",
            "memory",
            "size=8M",
            "blocksize-minimum=4096",
            "blocksize-preferred=4096",
            "blocksize-maximum=64K",
            "blocksize-error-policy=error",
        ],
    );
    within(30, "block size constraints", async {
        let c = NbdClient::connect(opts(&sock)).await.expect("connect");
        let b = c.info().block;
        assert_eq!((b.min, b.max_payload), (4096, 65536));
        // Unaligned requests are refused locally by the client...
        assert!(matches!(
            c.read(100, 4096).await,
            Err(ClientError::InvalidRequest(_))
        ));
        // ... and the protocol driver widens them / does read-modify-write.
        let p = NbdProtocol::from_client(c, "bs");
        let mut model = vec![0u8; 8 * MIB as usize];
        for (i, (off, len)) in [
            (100u64, 10_000usize),
            (65_530, 300_000),
            (8 * MIB - 3, 3),
            (5, 1),
        ]
        .into_iter()
        .enumerate()
        {
            let d = pattern(i as u64, len);
            p.write_vec(off, d.clone()).await.expect("unaligned write");
            model[off as usize..off as usize + len].copy_from_slice(&d);
        }
        p.write_zeroes(200_001, 100_000, true)
            .await
            .expect("unaligned zeroes");
        model[200_001..300_001].fill(0);
        // A 1 MiB read is split into 64 KiB requests.
        let r = p.read_vec(0, MIB as usize).await.expect("split read");
        assert!(r == model[..MIB as usize]);
        let r = p
            .read_vec(1, 8 * MIB as usize - 2)
            .await
            .expect("unaligned read");
        assert!(r == model[1..8 * MIB as usize - 1]);
        // Reads past the end are zeroes (the block layer's contract), writes are refused.
        let r = p.read_vec(8 * MIB - 2, 10).await.expect("read past end");
        assert_eq!(&r[..2], &model[8 * MIB as usize - 2..]);
        assert!(r[2..].iter().all(|&b| b == 0));
        assert!(matches!(
            p.write_vec(8 * MIB - 2, vec![1; 10]).await,
            Err(BlockError::OutOfBounds { .. })
        ));
        assert!(p.set_len(MIB).await.is_err());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_filter_fails_requests_cleanly() {
    init_log();
    let dir = tmpdir();
    let sock = dir.path().join("err.sock");
    let trigger = dir.path().join("fail-now");
    let _srv = nbdkit(
        dir.path(),
        "err",
        &[
            "-U",
            &s(&sock),
            "--filter=error",
            "memory",
            "size=4M",
            "error-pread=EIO",
            "error-pread-rate=100%",
            &format!("error-pread-file={}", s(&trigger)),
            "error-pwrite=ENOSPC",
            "error-pwrite-rate=100%",
            &format!("error-pwrite-file={}", s(&trigger)),
        ],
    );
    within(30, "error filter", async {
        let c = NbdClient::connect(opts(&sock)).await.expect("connect");
        c.write(0, vec![7; 65536], false).await.expect("write");
        std::fs::write(&trigger, b"").expect("arm trigger");
        match c.read(0, 65536).await {
            Err(e @ ClientError::Server { .. }) => assert_eq!(e.errno(), 5, "{e}"),
            other => panic!("expected an EIO reply, got {other:?}"),
        }
        let p = NbdProtocol::from_client(c, "err");
        match p.write_vec(4096, vec![1; 4096]).await {
            Err(BlockError::NoSpace(_)) => {}
            other => panic!("expected ENOSPC, got {other:?}"),
        }
        match p.read_vec(0, 512).await {
            Err(e) => assert_eq!(e.errno(), 5, "{e}"),
            Ok(_) => panic!("read should fail"),
        }
        // Errors are per request: the connection is still fine.
        std::fs::remove_file(&trigger).expect("disarm trigger");
        assert_eq!(p.client().state(), ConnectionState::Connected);
        assert!(p.read_vec(0, 65536).await.expect("read") == vec![7; 65536]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_server_replies_are_pipelined() {
    init_log();
    let dir = tmpdir();
    let sock = dir.path().join("slow.sock");
    let _srv = nbdkit(
        dir.path(),
        "slow",
        &[
            "-U",
            &s(&sock),
            "--filter=delay",
            "memory",
            "size=4M",
            "rdelay=300ms",
        ],
    );
    within(30, "delay filter", async {
        let c = NbdClient::connect(opts(&sock)).await.expect("connect");
        let t = Instant::now();
        let futs: Vec<_> = (0..16u64)
            .map(|i| {
                let c = &c;
                async move { c.read(i * 4096, 4096).await }
            })
            .collect();
        for r in join(futs).await {
            assert!(r.expect("read") == vec![0; 4096]);
        }
        // 16 requests of 300 ms each on one connection: pipelined they overlap.
        let el = t.elapsed();
        assert!(el < Duration::from_millis(2400), "16 reads took {el:?}");
    })
    .await;
}

/// The same file served by a fresh nbdkit each time (the data survives restarts).
fn file_server(dir: &Path, name: &str, sock: &Path, data: &Path, delay: bool) -> Server {
    let _ = std::fs::remove_file(sock);
    let mut args = vec!["-U".to_string(), s(sock)];
    if delay {
        args.push("--filter=delay".into());
    }
    args.push("file".into());
    args.push(s(data));
    if delay {
        args.push("rdelay=1".into());
        args.push("wdelay=1".into());
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    nbdkit(dir, name, &a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_and_restarted_mid_read() {
    init_log();
    let dir = tmpdir();
    let sock = dir.path().join("rc.sock");
    let data = dir.path().join("disk.raw");
    let mut model = pattern(42, 4 * MIB as usize);
    std::fs::write(&data, &model).expect("write disk");
    let mut srv = file_server(dir.path(), "rc1", &sock, &data, true);
    let mut o = opts(&sock);
    o.reconnect_delay = Duration::from_secs(3);
    o.reconnect_interval_min = Duration::from_millis(50);
    o.reconnect_interval_max = Duration::from_millis(300);
    let c = within(10, "connect", NbdClient::connect(o))
        .await
        .expect("connect");

    within(40, "reconnect scenario", async {
        // Phase 1: reads and a write in flight (the server delays them 1 s) when it is killed;
        // a new server comes up inside reconnect-delay: everything succeeds after reconnect,
        // the write included (it is retried, as QEMU does).
        let new = pattern(43, 65536);
        model[MIB as usize..(MIB + 65536) as usize].copy_from_slice(&new);
        let killer = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            srv.kill();
            wait_state(&c, ConnectionState::ConnectingWait, 5).await;
            tokio::time::sleep(Duration::from_millis(700)).await;
            srv = file_server(dir.path(), "rc2", &sock, &data, false);
            wait_state(&c, ConnectionState::Connected, 5).await;
        };
        let reads: Vec<_> = (0..4u64)
            .map(|i| {
                let c = &c;
                async move { c.read(i * 512 * 1024 + 2 * MIB, 512 * 1024).await }
            })
            .collect();
        let (rs, w, ()) = tokio::join!(join(reads), c.write(MIB, new.clone(), false), killer);
        w.expect("write retried across the reconnect");
        for (i, r) in rs.into_iter().enumerate() {
            let at = i * 512 * 1024 + 2 * MIB as usize;
            assert!(
                r.expect("read retried across the reconnect") == model[at..at + 512 * 1024],
                "read {i}"
            );
        }
        assert!(c.read(0, 4 * MIB as usize).await.expect("read all") == model);

        // Phase 2: the server dies for good. A request issued now waits for the window
        // (3 s) and then fails with EIO; afterwards requests fail at once.
        srv.kill();
        let t = Instant::now();
        let r = c.read(0, 4096).await;
        let waited = t.elapsed();
        match r {
            Err(e @ ClientError::Disconnected { .. }) => assert_eq!(e.errno(), 5, "{e}"),
            other => panic!("expected EIO after reconnect-delay, got {other:?}"),
        }
        assert!(
            waited >= Duration::from_millis(2500) && waited < Duration::from_secs(6),
            "request waited {waited:?} (reconnect-delay 3 s)"
        );
        assert_eq!(c.state(), ConnectionState::ConnectingNoWait);
        let t = Instant::now();
        let p_err = c.read(0, 4096).await;
        assert!(matches!(p_err, Err(ClientError::Disconnected { .. })));
        assert!(t.elapsed() < Duration::from_millis(500), "failed fast");

        // Phase 3: the server comes back; background reconnects pick it up.
        srv = file_server(dir.path(), "rc3", &sock, &data, false);
        wait_state(&c, ConnectionState::Connected, 5).await;
        assert!(
            c.read(0, 4 * MIB as usize)
                .await
                .expect("read after recovery")
                == model
        );
    })
    .await;
    drop(srv);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reconnect_delay_fails_in_flight_requests_at_once() {
    init_log();
    let dir = tmpdir();
    let sock = dir.path().join("rc0.sock");
    let data = dir.path().join("disk.raw");
    let model = pattern(7, MIB as usize);
    std::fs::write(&data, &model).expect("write disk");
    let mut srv = file_server(dir.path(), "z1", &sock, &data, true);
    let mut o = opts(&sock);
    o.reconnect_interval_min = Duration::from_millis(50);
    o.reconnect_interval_max = Duration::from_millis(200);
    let c = within(10, "connect", NbdClient::connect(o))
        .await
        .expect("connect");
    let p = NbdProtocol::from_client(c, "rc0");
    within(20, "reconnect-delay 0", async {
        let killer = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            srv.kill();
        };
        let t = Instant::now();
        let (r, ()) = tokio::join!(p.read_vec(0, 4096), killer);
        match r {
            Err(e) => assert_eq!(e.errno(), 5, "{e}"),
            Ok(_) => panic!("the read cannot succeed: its server died"),
        }
        assert!(t.elapsed() < Duration::from_millis(900), "failed at once");
        srv = file_server(dir.path(), "z2", &sock, &data, false);
        wait_state(p.client(), ConnectionState::Connected, 5).await;
        assert!(p.read_vec(0, MIB as usize).await.expect("read") == model);
    })
    .await;
    drop(srv);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_timeout_waits_for_a_late_server() {
    init_log();
    let dir = tmpdir();
    let sock = dir.path().join("late.sock");
    within(20, "open-timeout", async {
        // No server and no open-timeout: one attempt, immediate failure.
        let t = Instant::now();
        assert!(NbdClient::connect(opts(&sock)).await.is_err());
        assert!(t.elapsed() < Duration::from_millis(500));
        // No server within open-timeout: fails after it.
        let mut o = opts(&sock);
        o.open_timeout = Duration::from_millis(800);
        o.reconnect_interval_min = Duration::from_millis(50);
        let t = Instant::now();
        assert!(NbdClient::connect(o.clone()).await.is_err());
        let el = t.elapsed();
        assert!(
            el >= Duration::from_millis(700) && el < Duration::from_secs(3),
            "{el:?}"
        );
        // A server that starts late but inside open-timeout.
        o.open_timeout = Duration::from_secs(5);
        let starter = async {
            tokio::time::sleep(Duration::from_millis(600)).await;
            nbdkit(dir.path(), "late", &["-U", &s(&sock), "memory", "size=1M"])
        };
        let (c, _srv) = tokio::join!(NbdClient::connect(o), starter);
        let c = c.expect("connect to the late server");
        assert_eq!(c.size(), MIB);
    })
    .await;
}
