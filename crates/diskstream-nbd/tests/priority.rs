//! The NBD client's priority lane against nbdkit: with the log filter recording the order in
//! which requests reach the server and the delay filter holding each read for 200 ms, a
//! foreground read issued while background reads (`diskstream_block::priority::background`)
//! fill the connection's slots and queue behind them reaches the server at once (it uses the
//! slot kept for foreground requests), not after the queued background reads.

mod client_support;

use client_support::*;
use diskstream_block::priority;
use diskstream_nbd::client::{Address, ClientOptions, NbdClient};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Offsets of the `Read` requests in nbdkit's log, in arrival order.
fn read_offsets(log: &Path) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" Read id="))
        .filter_map(|l| {
            let off = l.split("offset=").nth(1)?.split_whitespace().next()?;
            u64::from_str_radix(off.trim_start_matches("0x"), 16).ok()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreground_read_overtakes_queued_background_reads() {
    init_log();
    let dir = tmpdir();
    let sock = dir.path().join("slow.sock");
    let log = dir.path().join("requests.log");
    let _srv = nbdkit(
        dir.path(),
        "slow",
        &[
            "-U",
            &sock.display().to_string(),
            "--filter=log",
            "--filter=delay",
            "memory",
            "size=64M",
            "rdelay=200ms",
            &format!("logfile={}", log.display()),
        ],
    );
    within(60, "priority", async {
        let mut o = ClientOptions::new(Address::Unix(sock.clone()), "");
        // Eight slots: background reads may hold seven, one is kept for the foreground.
        o.max_in_flight = 8;
        let c = Arc::new(NbdClient::connect(o).await.expect("connect"));
        let mut bg = Vec::new();
        for i in 0..16u64 {
            let c = Arc::clone(&c);
            bg.push(tokio::spawn(priority::background(async move {
                c.read(i * MIB, 4096).await
            })));
        }
        // Seven background reads are at the server, nine wait in the client.
        while read_offsets(&log).len() < 7 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let before = read_offsets(&log).len();
        let far = 60 * MIB;
        let data = c.read(far, 4096).await.expect("foreground read");
        assert_eq!(data, vec![0u8; 4096]);
        for t in bg {
            assert_eq!(t.await.expect("task").expect("read"), vec![0u8; 4096]);
        }
        let order = read_offsets(&log);
        assert_eq!(order.len(), 17, "{order:x?}");
        let at = order
            .iter()
            .position(|&o| o == far)
            .expect("foreground read logged");
        // It went out at once: no background read was sent between it being issued and it
        // reaching the server (before the lane it waited for nine).
        assert_eq!(at, before, "foreground read arrived as #{at}: {order:x?}");
    })
    .await;
}
