//! Guest-touch priority during a stream over a slow NBD backing (issue 5): nbdkit serves a
//! raw base through its delay filter (every read takes 50 ms) with its log filter in front,
//! recording the order in which requests reach the server. The overlay's NBD client has two
//! in-flight slots and the stream keeps eight 1 MiB chunks going, so most of the job's reads
//! wait in the client. A guest read through a copy-on-read filter of a range far ahead of the
//! stream must reach the server before the job's queued reads (it is sent as soon as it is
//! issued: at most one job read that was already on its way may precede it), return the
//! base's bytes, and be copied into the overlay, which the stream then skips (the server sees
//! that range read once). At the end the overlay equals the base and passes `qemu-img check`.

mod common;

use common::*;
use diskstream_block::filter::cor::{CopyOnRead, CorConfig};
use diskstream_block::node::BlockNode;
use diskstream_jobs::job::JobOptions;
use diskstream_jobs::stream::NoHooks;
use diskstream_jobs::{JobManager, JobStatus, JobType, StreamConfig, StreamJob};
use diskstream_nbd::client::{register_url_opener, OpenerConfig};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

struct Kit(Child);
impl Drop for Kit {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `Read` requests in nbdkit's log, in arrival order: (offset, count).
fn reads(log: &Path) -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap_or(u64::MAX);
    text.lines()
        .filter(|l| l.contains(" Read id="))
        .filter_map(|l| {
            let off = l.split("offset=").nth(1)?.split_whitespace().next()?;
            let cnt = l.split("count=").nth(1)?.split_whitespace().next()?;
            Some((hex(off), hex(cnt)))
        })
        .collect()
}

async fn within<T>(secs: u64, what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {secs} s"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_read_goes_ahead_of_the_streams_queued_reads() {
    let dir = tempfile::Builder::new()
        .prefix("dsprio-")
        .tempdir_in("/tmp")
        .expect("tmp");
    let d = dir.path();
    let size = 32 * MIB;
    let data = pattern(5, size as usize);
    let base = d.join("base.raw");
    std::fs::write(&base, &data).expect("write base");
    let sock = d.join("kit.sock");
    let log = d.join("kit.log");
    let pid = d.join("kit.pid");
    let kit = Kit(Command::new("nbdkit")
        .args(["-f", "--exit-with-parent", "-P"])
        .arg(&pid)
        .arg("-U")
        .arg(&sock)
        .args(["--filter=log", "--filter=delay", "file"])
        .arg(format!("file={}", base.display()))
        .args(["rdelay=50ms"])
        .arg(format!("logfile={}", log.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nbdkit"));
    within(10, "nbdkit start", async {
        while std::fs::read_to_string(&pid).map_or(true, |p| p.trim().is_empty()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let url = format!("nbd+unix:///?socket={}", sock.display());
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-u",
            "-f",
            "qcow2",
            "-b",
            &url,
            "-F",
            "raw",
            "top.qcow2",
            "32M",
        ],
        d,
    );
    register_url_opener(OpenerConfig {
        max_in_flight: 2,
        ..OpenerConfig::default()
    });
    let top = open(&d.join("top.qcow2"), false).await;
    let backing = top.backing().expect("backing");
    let cor: Arc<dyn BlockNode> = CopyOnRead::new(
        Arc::clone(&top),
        None,
        CorConfig {
            granularity: 64 << 10,
            readahead: 0,
            ..CorConfig::default()
        },
    )
    .expect("filter");
    let mgr = JobManager::new(Arc::new(Quiet));
    let driver = Arc::new(StreamJob::new(
        Arc::clone(&top),
        backing,
        None,
        StreamConfig {
            chunk_size: MIB,
            parallel: 8,
            ..StreamConfig::default()
        },
        Arc::new(NoHooks),
    ));
    let job = mgr
        .create("s", JobType::Stream, driver, &JobOptions::default())
        .expect("job");
    mgr.start(&job);
    // The job is reading (and has more chunks waiting for a slot).
    within(30, "stream reads", async {
        while reads(&log).len() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let before = reads(&log).len();
    let far = 30 * MIB;
    let mut buf = vec![0u8; 4096];
    within(30, "guest read", cor.read(far + 4096, &mut buf))
        .await
        .expect("guest read");
    assert!(
        buf == data[(far + 4096) as usize..(far + 8192) as usize],
        "guest read returned wrong bytes"
    );
    let order = reads(&log);
    let guest_at = order
        .iter()
        .position(|&(o, c)| o <= far + 4096 && far + 4096 < o + c)
        .expect("the guest's read reached the server");
    assert!(
        guest_at <= before + 1,
        "guest read was request #{guest_at}, {} job reads after the {before} logged when it \
         was issued: {order:x?}",
        guest_at - before
    );
    within(120, "stream end", job.wait_concluded()).await;
    assert_eq!(job.status(), JobStatus::Null);
    assert!(top.backing().is_none(), "the stream did not complete");
    let order = reads(&log);
    let covering = order
        .iter()
        .filter(|&&(o, c)| o < far + 65536 && far < o + c)
        .count();
    assert_eq!(covering, 1, "the copied range was read again: {order:x?}");
    cor.close().await.expect("close filter");
    top.close().await.expect("close");
    drop(cor);
    drop(top);
    drop(kit);
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            "base.raw",
            "top.qcow2",
        ],
        d,
    );
    qemu_img_check(&d.join("top.qcow2"));
}
