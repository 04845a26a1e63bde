//! `diskstream img` with NBD URLs: an `nbd+unix://` export of a qcow2 chain served by qemu-nbd
//! as the image, and as the backing file of a qcow2 overlay. qemu-img looking at the same
//! export is the oracle (map, convert, compare).

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

fn ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ds(args: &[&str]) -> String {
    ok(env!("CARGO_BIN_EXE_diskstream"), args)
}

/// qemu-nbd in the foreground, killed when dropped.
struct QemuNbd(Child);

impl QemuNbd {
    fn start(dir: &Path, args: &[&str]) -> QemuNbd {
        let pid = dir.join("qemu-nbd.pid");
        let child = Command::new("qemu-nbd")
            .arg(format!("--pid-file={}", pid.display()))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start qemu-nbd");
        let q = QemuNbd(child);
        let t = Instant::now();
        while !std::fs::read_to_string(&pid).is_ok_and(|p| !p.trim().is_empty()) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "qemu-nbd did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        q
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn img_commands_accept_nbd_urls() {
    let dir = tempfile::Builder::new()
        .prefix("dsimgnbd-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let d = |n: &str| dir.path().join(n).display().to_string();
    let (base, top) = (d("base.qcow2"), d("top.qcow2"));
    ok("qemu-img", &["create", "-q", "-f", "qcow2", &base, "4M"]);
    ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xaa 0 1M",
            "-c",
            "write -z 2M 512k",
            &base,
        ],
    );
    ok(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top,
        ],
    );
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0xbb 512k 1M", &top],
    );
    let sock = d("s.sock");
    let _srv = QemuNbd::start(
        dir.path(),
        &[
            "-r", "-t", "-e", "4", "-A", "-f", "qcow2", "-k", &sock, &top,
        ],
    );
    let url = format!("nbd+unix:///?socket={sock}");

    // info: a raw image of the export's size.
    let info: serde_json::Value =
        serde_json::from_str(&ds(&["img", "info", "--output=json", &url])).expect("info JSON");
    assert_eq!(info["format"], "raw");
    assert_eq!(info["virtual-size"], 4 << 20);
    // map: identical to qemu-img's map of the same export.
    assert_eq!(
        ds(&["img", "map", "--output=json", &url]),
        ok("qemu-img", &["map", "--output=json", &url])
    );
    // convert: the same bytes as qemu-img converting the source chain.
    let (ours, theirs) = (d("ours.raw"), d("theirs.raw"));
    ds(&["img", "convert", "-O", "raw", &url, &ours]);
    ok("qemu-img", &["convert", "-O", "raw", &top, &theirs]);
    assert!(std::fs::read(&ours).expect("ours") == std::fs::read(&theirs).expect("theirs"));
    // compare: URL against the chain it exports.
    ds(&["img", "compare", "-F", "qcow2", &url, &top]);

    // A qcow2 overlay whose backing file is the URL (never resolved against its directory).
    let ov = d("ov.qcow2");
    ds(&[
        "img", "create", "-q", "-f", "qcow2", "-b", &url, "-F", "raw", &ov,
    ]);
    let info: serde_json::Value =
        serde_json::from_str(&ds(&["img", "info", "--output=json", &ov])).expect("info JSON");
    assert_eq!(info["backing-filename"], url.as_str());
    assert_eq!(info["full-backing-filename"], url.as_str());
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0xcc 100k 200k", &ov],
    );
    assert_eq!(
        ds(&["img", "map", "--output=json", &ov]),
        ok("qemu-img", &["map", "--output=json", "-U", &ov])
    );
    // Our convert of the overlay equals qemu-img's; compare agrees with qemu-img compare.
    let (o1, o2) = (d("o1.raw"), d("o2.raw"));
    ds(&["img", "convert", "-O", "raw", &ov, &o1]);
    ok("qemu-img", &["convert", "-O", "raw", &ov, &o2]);
    assert!(std::fs::read(&o1).expect("o1") == std::fs::read(&o2).expect("o2"));
    ds(&["img", "compare", "-F", "raw", &ov, &o2]);
    let differs = run(
        env!("CARGO_BIN_EXE_diskstream"),
        &["img", "compare", &ov, &top],
    );
    assert_eq!(
        differs.status.code(),
        Some(1),
        "overlay differs from the export"
    );
}
