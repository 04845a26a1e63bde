//! Copy-on-read, then streaming: `diskstream serve --copy-on-read` exports a 3-deep qcow2 chain
//! made by qemu-img (odd layer sizes); a real NBD client (libnbd, simple replies so every byte
//! is read rather than answered as a hole) reads the whole device once. Afterwards `qemu-img
//! map` of the top shows every byte allocated in the top (depth 0 in qemu-img's JSON, depth 1
//! in NBD's `qemu:allocation-depth` numbering), `qemu-img check` is clean, `qemu-img compare`
//! equals the chain's contents as qemu-img read them before, and a stream job of the whole
//! chain finds nothing to copy: `stream_step` reports nothing left, and the job completes
//! without allocating anything (file length and map unchanged) while dropping the backing.

use diskstream_block::format::Format;
use diskstream_block::image::{chain_layers, open_image, OpenOptions};
use diskstream_jobs::job::{EventSink, JobEvent, JobOptions};
use diskstream_jobs::stream::{stream_step, NoHooks};
use diskstream_jobs::{JobManager, JobType, StreamConfig, StreamJob};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

struct Quiet;
impl EventSink for Quiet {
    fn emit(&self, _ev: JobEvent) {}
}

fn run(cmd: &str, args: &[&str], dir: &Path) -> String {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn map(dir: &Path) -> Vec<Value> {
    let out = run(
        "qemu-img",
        &["map", "--output=json", "-f", "qcow2", "top.qcow2"],
        dir,
    );
    serde_json::from_str(&out).expect("map json")
}

/// Read the whole export with libnbd (system python), simple replies: the server must read
/// every byte through the filter.
const READER: &str = r#"
import nbd, sys
h = nbd.NBD()
h.set_request_structured_replies(False)
h.connect_uri(sys.argv[1])
size = h.get_size()
off = 0
with open(sys.argv[2], "wb") as f:
    while off < size:
        n = min(1 << 20, size - off)
        f.write(h.pread(n, off))
        off += n
h.shutdown()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_read_with_copy_on_read_leaves_nothing_to_stream() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let q = |args: &[&str]| run("qemu-img", args, dir);
    let io = |img: &str, cmds: &[&str]| {
        let mut a = vec!["-f", "qcow2"];
        for c in cmds {
            a.extend(["-c", c]);
        }
        a.push(img);
        run("qemu-io", &a, dir)
    };
    q(&["create", "-q", "-f", "qcow2", "base.qcow2", "3146240"]); // 3 MiB + 512
    io(
        "base.qcow2",
        &["write -P 0x11 0 2M", "write -P 0x12 3M 512"],
    );
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "mid.qcow2",
        "4193792",
    ]); // 4 MiB - 512
    io(
        "mid.qcow2",
        &[
            "write -P 0x21 1M 512k",
            "write -z 1536k 128k",
            "write -P 0x22 2101248 102400",
        ],
    );
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "4195840",
    ]); // 4 MiB + 1536
    io("top.qcow2", &["write -P 0x31 64k 64k"]);
    q(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        "top.qcow2",
        "model.raw",
    ]);
    let before = map(dir);
    assert!(
        before.iter().any(|e| e["depth"] != 0),
        "the chain must start out with data below the top"
    );

    // Serve with copy-on-read; the server exits after its only client leaves.
    let sock = dir.join("cor.sock");
    let serve = Command::new(env!("CARGO_BIN_EXE_diskstream"))
        .args(["serve", "--copy-on-read", "-f", "qcow2", "-k"])
        .arg(&sock)
        .arg(dir.join("top.qcow2"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "serve did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("nbd+unix:///?socket={}", sock.display());
    run("/usr/bin/python3", &["-c", READER, &url, "read.raw"], dir);
    let out = serve.wait_with_output().expect("serve exits");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "serve failed: {stderr}");
    assert!(stderr.contains("copy-on-read: copied"), "{stderr}");
    q(&["compare", "-f", "raw", "-F", "raw", "read.raw", "model.raw"]);

    // Everything is in the top now.
    q(&["check", "top.qcow2"]);
    q(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "top.qcow2",
        "model.raw",
    ]);
    let after = map(dir);
    for e in &after {
        assert_eq!(e["depth"], 0, "not copied: {e}");
        assert_eq!(e["present"], true, "{e}");
    }
    let len_before = std::fs::metadata(dir.join("top.qcow2"))
        .expect("stat")
        .len();

    // A stream of the whole chain has nothing to copy.
    let top = open_image(
        &dir.join("top.qcow2"),
        &OpenOptions {
            read_only: false,
            format: Some(Format::Qcow2),
            ..Default::default()
        },
    )
    .await
    .expect("open top");
    let layers = chain_layers(&top);
    assert_eq!(layers.len(), 3);
    let bottom = Arc::clone(&layers[2]);
    let step = stream_step(&top, &bottom, 0, MIB)
        .await
        .expect("stream step");
    assert_eq!(step, None, "a stream would still copy something");
    let mgr = JobManager::new(Arc::new(Quiet));
    let driver = Arc::new(StreamJob::new(
        Arc::clone(&top),
        bottom,
        None,
        StreamConfig::default(),
        Arc::new(NoHooks),
    ));
    let job = mgr
        .create("s", JobType::Stream, driver, &JobOptions::default())
        .expect("create job");
    mgr.start(&job);
    tokio::time::timeout(Duration::from_secs(60), job.wait_concluded())
        .await
        .expect("job finishes");
    assert_eq!(chain_layers(&top).len(), 1, "backing dropped");
    top.close().await.expect("close");
    drop(top);
    q(&["check", "top.qcow2"]);
    q(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "top.qcow2",
        "model.raw",
    ]);
    let len_after = std::fs::metadata(dir.join("top.qcow2"))
        .expect("stat")
        .len();
    assert_eq!(len_after, len_before, "the stream allocated clusters");
    let streamed = map(dir);
    let strip = |m: &[Value]| -> Vec<(Value, Value, Value)> {
        m.iter()
            .map(|e| (e["start"].clone(), e["length"].clone(), e["offset"].clone()))
            .collect()
    };
    assert_eq!(strip(&streamed), strip(&after), "the stream moved data");
    let info: Value =
        serde_json::from_str(&q(&["info", "--output=json", "top.qcow2"])).expect("info json");
    assert!(info.get("backing-filename").is_none(), "{info}");
}
