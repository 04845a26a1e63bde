//! fio's `nbd` engine (libnbd) against our server: a random-write run that fio verifies
//! (crc32c) and a short time-based random read/write mix at queue depth 32 on two connections.

mod common;

use common::*;
use std::process::Command;

fn fio(dir: &std::path::Path, name: &str, args: &[&str]) -> serde_json::Value {
    require("fio");
    let out = dir.join(format!("{name}.json"));
    // fio writes its verify state file into the working directory: keep it in the test's.
    run(Command::new("fio")
        .current_dir(dir)
        .arg(format!("--name={name}"))
        .arg("--ioengine=nbd")
        .arg("--output-format=json")
        .arg(format!("--output={}", out.display()))
        .args(args));
    let text = std::fs::read_to_string(&out).unwrap();
    // fio may print notices before the JSON document.
    let start = text.find('{').expect("fio JSON");
    serde_json::from_str(&text[start..]).unwrap_or_else(|e| panic!("fio JSON: {e}\n{text}"))
}

#[test]
fn fio_nbd_engine() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fio.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"]);
    let srv = TestServer::start(
        dir.path(),
        vec![Spec {
            max_connections: 4,
            ..Spec::new("fio", &img)
        }],
        |_| {},
    );
    let uri = format!("--uri={}", srv.tcp_uri("fio"));
    let v = fio(
        dir.path(),
        "verify",
        &[
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=8M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
        ],
    );
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert!(
        job["write"]["io_bytes"].as_u64().unwrap() >= 8 << 20,
        "{job}"
    );
    assert!(
        job["read"]["io_bytes"].as_u64().unwrap() >= 8 << 20,
        "verify read back: {job}"
    );

    let uri = format!("--uri={}", srv.unix_uri("fio"));
    let v = fio(
        dir.path(),
        "mix",
        &[
            &uri,
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=32",
            "--numjobs=2",
            "--size=32M",
            "--runtime=2",
            "--time_based",
        ],
    );
    for job in v["jobs"].as_array().unwrap() {
        assert_eq!(job["error"], 0, "{job}");
        assert!(job["read"]["iops"].as_f64().unwrap() > 0.0, "{job}");
        assert!(job["write"]["iops"].as_f64().unwrap() > 0.0, "{job}");
    }
    srv.stop();
    qemu_img(&["check", "-q", img.to_str().unwrap()]);
}
