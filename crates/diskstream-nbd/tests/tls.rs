//! TLS (X.509 via rustls) with a CA and server certificate generated here by rcgen: `nbdinfo`
//! with `nbds://...?tls-certificates=DIR` (GnuTLS through libnbd), `qemu-img info` and `qemu-io`
//! with a `tls-creds-x509` object, refusal of clients that skip STARTTLS (ERR_TLS_REQD for every
//! option, EXPORT_NAME drops the connection), and ERR_POLICY for STARTTLS on a server without
//! credentials.

mod common;

use common::*;
use diskstream_nbd::proto::*;
use diskstream_nbd::server::tls_config_from_pem;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use std::path::Path;
use std::process::Command;

/// Write ca-cert.pem (the layout QEMU and libnbd expect), server-cert.pem and server-key.pem.
fn make_certs(dir: &Path) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "diskstream test CA");
    let ca = CertifiedIssuer::self_signed(ca, ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, "localhost");
    let cert = p.signed_by(&key, &ca).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server-cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server-key.pem"), key.serialize_pem()).unwrap();
}

#[test]
fn tls_required_and_working() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("pki");
    std::fs::create_dir(&certs).unwrap();
    make_certs(&certs);
    let img = dir.path().join("t.qcow2");
    let i = img.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", i, "16M"]);
    qemu_io("qcow2", i, &["write -P 0x42 0 1M"]);
    let tls = tls_config_from_pem(
        &certs.join("server-cert.pem"),
        &certs.join("server-key.pem"),
    )
    .expect("load TLS credentials");
    let srv = TestServer::start(
        dir.path(),
        vec![Spec {
            allocation_depth: true,
            ..Spec::new("disk", &img)
        }],
        |cfg| cfg.tls = Some(tls),
    );

    // libnbd over TLS.
    require("nbdinfo");
    let uri = format!(
        "nbds://127.0.0.1:{}/disk?tls-certificates={}",
        srv.port,
        certs.display()
    );
    let j: serde_json::Value =
        serde_json::from_str(&stdout(Command::new("nbdinfo").args(["--json", &uri]))).unwrap();
    assert_eq!(j["TLS"], true, "{j}");
    assert_eq!(j["exports"][0]["export-size"], 16 << 20);
    let map = stdout(Command::new("nbdinfo").args(["--map", &uri]));
    assert!(map.contains("data") && map.contains("hole,zero"), "{map}");

    // QEMU over TLS: info, then a write and a read back through qemu-io.
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        certs.display()
    );
    let opts = format!(
        "driver=nbd,host=127.0.0.1,port={},export=disk,tls-creds=tls0",
        srv.port
    );
    let info = stdout(Command::new("qemu-img").args([
        "info",
        "--output=json",
        "--object",
        &object,
        "--image-opts",
        &opts,
    ]));
    assert!(info.contains("16777216"), "{info}");
    let io = stdout(Command::new("qemu-io").args([
        "--object",
        &object,
        "--image-opts",
        &opts,
        "-c",
        "read -P 0x42 0 1M",
        "-c",
        "write -P 0x43 2M 64k",
        "-c",
        "read -P 0x43 2M 64k",
    ]));
    assert!(!io.contains("failed"), "{io}");

    // Clients that do not upgrade are refused.
    let plain = Command::new("nbdinfo")
        .arg(srv.tcp_uri("disk"))
        .output()
        .unwrap();
    assert!(!plain.status.success(), "plain client must be refused");
    let mut c = RawClient::tcp(&srv.addr());
    c.hello(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    for (opt, payload) in [
        (OPT_LIST, &b""[..]),
        (OPT_STRUCTURED_REPLY, b""),
        (99, b"junk data"),
        (OPT_GO, b"\0\0\0\0\0\0"),
    ] {
        c.option(opt, payload);
        let (h, r) = c.reply();
        assert_eq!(h.option, opt);
        assert!(
            matches!(
                r,
                OptionReply::Error {
                    code: REP_ERR_TLS_REQD,
                    ..
                }
            ),
            "{r:?}"
        );
    }
    c.option(OPT_EXPORT_NAME, b"disk");
    assert!(
        c.closed(),
        "EXPORT_NAME before TLS must drop the connection"
    );
    srv.stop();
    qemu_img(&["check", "-q", i]);
    qemu_io("qcow2", i, &["read -P 0x43 2M 64k"]);
}

#[test]
fn starttls_without_credentials_is_policy_error() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("p.raw");
    qemu_img(&["create", "-q", "-f", "raw", img.to_str().unwrap(), "1M"]);
    let srv = TestServer::start(dir.path(), vec![Spec::new("p", &img)], |_| {});
    let mut c = RawClient::tcp(&srv.addr());
    c.hello(FLAG_C_FIXED_NEWSTYLE);
    c.option(OPT_STARTTLS, &[]);
    let (_, r) = c.reply();
    assert!(
        matches!(
            r,
            OptionReply::Error {
                code: REP_ERR_POLICY,
                ..
            }
        ),
        "{r:?}"
    );
    // The session goes on in clear text.
    c.option(OPT_LIST, &[]);
    let r = c.replies();
    assert!(
        matches!(&r[0], OptionReply::Server { name, .. } if name == "p"),
        "{r:?}"
    );
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.reply().1, OptionReply::Ack);
    srv.stop();
}
