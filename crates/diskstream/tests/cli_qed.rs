//! `diskstream img` on QED images, next to `qemu-img` on the same inputs: create (files
//! byte-identical, same printed line and errors), info (text and JSON), map, check (clean,
//! corrupt, repaired: same report, exit code and repaired bytes), convert qed <-> qcow2 <-> raw,
//! rebase, resize and commit.

mod cli_support;

use cli_support::*;

/// Replace `ours` by `theirs` in a text, so outputs about two files can be compared.
fn same_text(ours: &str, theirs: &str, a: &str, b: &str, what: &str) {
    assert_eq!(ours.replace(a, b), theirs, "{what}");
}

#[test]
fn create_info_map_match_qemu_img() {
    let dir = tmpdir();
    let d = dir.path();
    qemu(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "8M"]).ok();
    qemu(d, &["create", "-q", "-f", "raw", "base.raw", "3M"]).ok();
    for (i, args) in [
        vec!["-f", "qed", "X", "64M"],
        vec![
            "-f",
            "qed",
            "-o",
            "cluster_size=4k,table_size=2",
            "X",
            "10M",
        ],
        vec!["-f", "qed", "-b", "base.qcow2", "-F", "qcow2", "X"],
        vec![
            "-f",
            "qed",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "-o",
            "table_size=16",
            "X",
        ],
        vec!["-f", "qed", "-o", "preallocation=full", "X", "1000"],
        vec!["-f", "qed", "X", "0"],
    ]
    .iter()
    .enumerate()
    {
        let ours = format!("o{i}.qed");
        let theirs = format!("t{i}.qed");
        let with = |name: &str| -> Vec<String> {
            let mut v = vec!["create".to_string()];
            v.extend(args.iter().map(|a| {
                if *a == "X" {
                    name.to_string()
                } else {
                    a.to_string()
                }
            }));
            v
        };
        let wo = with(&ours);
        let wt = with(&theirs);
        let a = ds(d, &wo.iter().map(String::as_str).collect::<Vec<_>>()).ok();
        let b = qemu(d, &wt.iter().map(String::as_str).collect::<Vec<_>>()).ok();
        same_text(
            &a.stdout,
            &b.stdout,
            &ours,
            &theirs,
            &format!("create {args:?}"),
        );
        assert_same_bytes(
            &d.join(&ours),
            &d.join(&theirs),
            &format!("create {args:?}"),
        );
        for info in [
            vec!["info"],
            vec!["info", "--output=json"],
            vec!["info", "--backing-chain"],
        ] {
            let mut x = info.clone();
            x.push(&ours);
            let mut y = info.clone();
            y.push(&theirs);
            let a = ds(d, &x).ok();
            let b = qemu(d, &y).ok();
            same_text(
                &a.stdout,
                &b.stdout,
                &ours,
                &theirs,
                &format!("{info:?} {args:?}"),
            );
        }
    }
    // Invalid options: qemu-img's messages, no file left behind where qemu-img leaves none.
    for (opts, want) in [
        (
            "table_size=3",
            "QED table size must be within range [1, 16] and power of 2",
        ),
        (
            "cluster_size=2k",
            "QED cluster size must be within range [4096, 67108864] and power of 2",
        ),
        ("lazy_refcounts=on", "Invalid parameter 'lazy_refcounts'"),
    ] {
        let r = ds(d, &["create", "-f", "qed", "-o", opts, "bad.qed", "1M"]);
        assert_ne!(r.code, 0);
        assert!(r.stderr.contains(want), "{opts}: {}", r.desc);
    }
    // Data written by QEMU maps identically.
    qemu_io(
        d,
        "qed",
        "o2.qed",
        &[
            "write -P 0x11 0 100k",
            "write -z 1M 128k",
            "write -P 2 3M 512",
        ],
    );
    let a = ds(d, &["map", "--output=json", "o2.qed"]).ok();
    let b = qemu(d, &["map", "--output=json", "o2.qed"]).ok();
    assert_eq!(a.stdout, b.stdout);
    let a = ds(d, &["map", "o2.qed"]).ok();
    let b = qemu(d, &["map", "o2.qed"]).ok();
    assert_eq!(a.stdout, b.stdout);
}

/// Corrupt the first L2 table: an entry past the end of the file, an unaligned one, a
/// duplicate; and two leaked clusters at the end.
fn corrupt(path: &std::path::Path) {
    let mut b = read(path);
    let cs = u32::from_le_bytes(b[4..8].try_into().expect("4")) as usize;
    let l1 = u64::from_le_bytes(b[40..48].try_into().expect("8")) as usize;
    let l2 = u64::from_le_bytes(b[l1..l1 + 8].try_into().expect("8")) as usize;
    let e0 = b[l2..l2 + 8].to_vec();
    b[l2 + 40..l2 + 48].copy_from_slice(&(1u64 << 40).to_le_bytes());
    b[l2 + 48..l2 + 56].copy_from_slice(&((l2 as u64) + 1).to_le_bytes());
    b[l2 + 56..l2 + 64].copy_from_slice(&e0);
    b.extend(vec![0u8; 2 * cs]);
    std::fs::write(path, b).expect("write");
}

#[test]
fn check_reports_and_repairs_like_qemu_img() {
    let dir = tmpdir();
    let d = dir.path();
    qemu(d, &["create", "-q", "-f", "qed", "a.qed", "16M"]).ok();
    for args in [vec!["check"], vec!["check", "--output=json"]] {
        let mut x = args.clone();
        x.push("a.qed");
        let a = ds(d, &x).ok();
        let b = qemu(d, &x).ok();
        assert_eq!(a.stdout, b.stdout, "{args:?} empty");
    }
    qemu_io(
        d,
        "qed",
        "a.qed",
        &[
            "write -P 0x11 0 128k",
            "write -P 0x22 1M 64k",
            "write -P 3 5M 4k",
        ],
    );
    for args in [vec!["check"], vec!["check", "--output=json"]] {
        let mut x = args.clone();
        x.push("a.qed");
        let a = ds(d, &x).ok();
        let b = qemu(d, &x).ok();
        assert_eq!(a.stdout, b.stdout, "{args:?} clean");
    }
    corrupt(&d.join("a.qed"));
    for args in [vec!["check"], vec!["check", "--output=json"]] {
        let mut x = args.clone();
        x.push("a.qed");
        let a = ds(d, &x).code_is(2);
        let b = qemu(d, &x).code_is(2);
        assert_eq!(a.stdout, b.stdout, "{args:?} corrupt");
    }
    for (i, mode) in ["leaks", "all"].iter().enumerate() {
        for (j, out) in ["--output=human", "--output=json"].iter().enumerate() {
            let (o, t) = (format!("o{i}{j}.qed"), format!("t{i}{j}.qed"));
            copy(&d.join("a.qed"), &d.join(&o));
            copy(&d.join("a.qed"), &d.join(&t));
            let a = ds(d, &["check", "-r", mode, out, &o]);
            let b = qemu(d, &["check", "-r", mode, out, &t]);
            assert_eq!(a.code, b.code, "-r {mode} {out}: {}\n{}", a.desc, b.desc);
            same_text(&a.stdout, &b.stdout, &o, &t, &format!("-r {mode} {out}"));
            // (qemu-img clears the need-check flag on close even when corruptions remain;
            // the image was clean before, so the bytes agree.)
            assert_same_bytes(&d.join(&o), &d.join(&t), &format!("-r {mode} {out}"));
        }
    }
}

#[test]
fn convert_between_qed_qcow2_and_raw() {
    let dir = tmpdir();
    let d = dir.path();
    qemu(d, &["create", "-q", "-f", "raw", "base.raw", "8M"]).ok();
    qemu_io(d, "raw", "base.raw", &["write -P 0x5a 0 8M"]);
    qemu(
        d,
        &[
            "create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw", "src.qed",
        ],
    )
    .ok();
    qemu_io(
        d,
        "qed",
        "src.qed",
        &[
            "write -P 0x11 64k 200k",
            "write -z 2M 1M",
            "write -P 7 7M 100",
        ],
    );
    // qed -> qed: the same file qemu-img writes.
    ds(d, &["convert", "-O", "qed", "src.qed", "ours.qed"]).ok();
    qemu(d, &["convert", "-O", "qed", "src.qed", "theirs.qed"]).ok();
    assert_same_bytes(&d.join("ours.qed"), &d.join("theirs.qed"), "convert -O qed");
    qemu(d, &["check", "ours.qed"]).ok();
    // qed -> qcow2 -> qed -> raw: contents survive every step.
    ds(
        d,
        &["convert", "-f", "qed", "-O", "qcow2", "src.qed", "a.qcow2"],
    )
    .ok();
    ds(
        d,
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "qed",
            "-o",
            "cluster_size=4k",
            "a.qcow2",
            "b.qed",
        ],
    )
    .ok();
    ds(d, &["convert", "-O", "raw", "b.qed", "c.raw"]).ok();
    qemu(d, &["check", "b.qed"]).ok();
    qemu(d, &["compare", "src.qed", "a.qcow2"]).ok();
    qemu(d, &["compare", "src.qed", "b.qed"]).ok();
    qemu(
        d,
        &["compare", "-f", "qed", "-F", "raw", "src.qed", "c.raw"],
    )
    .ok();
    ds(d, &["compare", "src.qed", "b.qed"]).ok();
    // -B: only differences from a QED backing file.
    ds(
        d,
        &[
            "convert", "-O", "qed", "-B", "base.raw", "-F", "raw", "src.qed", "diff.qed",
        ],
    )
    .ok();
    qemu(d, &["compare", "src.qed", "diff.qed"]).ok();
    let info = ds(d, &["info", "--output=json", "diff.qed"]).ok().json();
    assert_eq!(info["backing-filename-format"], "raw");
}

#[test]
fn rebase_resize_commit_on_qed() {
    let dir = tmpdir();
    let d = dir.path();
    qemu(d, &["create", "-q", "-f", "qed", "base.qed", "4M"]).ok();
    qemu_io(d, "qed", "base.qed", &["write -P 0x22 0 4M"]);
    qemu(
        d,
        &[
            "create", "-q", "-f", "qed", "-b", "base.qed", "-F", "qed", "top.qed",
        ],
    )
    .ok();
    qemu_io(d, "qed", "top.qed", &["write -P 0x33 1M 100k"]);
    copy(&d.join("top.qed"), &d.join("theirs.qed"));
    // rebase -u to raw records the no-probe flag, as qemu-img does.
    qemu(d, &["convert", "-O", "raw", "base.qed", "base.raw"]).ok();
    ds(
        d,
        &["rebase", "-u", "-b", "base.raw", "-F", "raw", "top.qed"],
    )
    .ok();
    qemu(
        d,
        &["rebase", "-u", "-b", "base.raw", "-F", "raw", "theirs.qed"],
    )
    .ok();
    assert_same_bytes(&d.join("top.qed"), &d.join("theirs.qed"), "rebase -u");
    // Safe rebase onto nothing copies the backing data in.
    qemu(d, &["convert", "-O", "raw", "top.qed", "before.raw"]).ok();
    ds(d, &["rebase", "-b", "", "top.qed"]).ok();
    qemu(
        d,
        &["compare", "-f", "qed", "-F", "raw", "top.qed", "before.raw"],
    )
    .ok();
    qemu(d, &["check", "top.qed"]).ok();
    // Resize: grow like qemu-img; shrinking is refused as by qemu-img.
    ds(d, &["resize", "top.qed", "+1M"]).ok();
    qemu(d, &["resize", "theirs.qed", "+1M"]).ok();
    ds(d, &["resize", "--shrink", "top.qed", "1M"]).fails_naming("top.qed");
    // Commit empties the committed QED image (qemu-img 10 leaves it as it was).
    qemu(
        d,
        &[
            "create", "-q", "-f", "qed", "-b", "base.qed", "-F", "qed", "c.qed",
        ],
    )
    .ok();
    qemu_io(d, "qed", "c.qed", &["write -P 0x44 0 1M"]);
    qemu(d, &["convert", "-O", "raw", "c.qed", "c.raw"]).ok();
    ds(d, &["commit", "c.qed"]).ok();
    qemu(d, &["compare", "-f", "qed", "-F", "raw", "c.qed", "c.raw"]).ok();
    qemu(
        d,
        &["compare", "-f", "qed", "-F", "raw", "base.qed", "c.raw"],
    )
    .ok();
    let map = ds(d, &["map", "--output=json", "c.qed"]).ok().json();
    assert!(
        map.as_array()
            .is_some_and(|a| a.iter().all(|e| e["depth"] == 1)),
        "{map}"
    );
    qemu(d, &["check", "c.qed"]).ok();
    qemu(d, &["check", "base.qed"]).ok();
}
