//! `diskstream img` against `qemu-img` 10: every command is run by both tools on identical
//! inputs, and their results must agree — the files they write (byte for byte where QEMU's
//! layout is deterministic), the text and JSON they print, their exit codes, and what
//! `qemu-img check` / `qemu-img compare` / `qemu-img map` say about our output.
//!
//! Deliberate differences (documented in the README) are tested as such: `-b` needs `-F`
//! (formats are never probed), nothing is written before the arguments are validated,
//! `convert -B` writes only what differs from the new backing file, and `resize --shrink`
//! refuses to drop data.

mod cli_support;

use cli_support::*;
use std::path::Path;

/// `diskstream img create` and `qemu-img create` with the same arguments print the same line
/// and write byte-identical files, for every qcow2 option, unaligned sizes and raw images.
#[test]
fn create_matches_qemu_byte_for_byte() {
    let dir = tmpdir();
    let (q, d) = (subdir(dir.path(), "q"), subdir(dir.path(), "d"));
    for side in [&q, &d] {
        qemu(side, &["create", "-q", "-f", "raw", "base.raw", "3M"]).ok();
    }
    let cases: &[&[&str]] = &[
        &["-f", "qcow2"],
        &["-f", "qcow2", "-o", "cluster_size=512"],
        &["-f", "qcow2", "-o", "cluster_size=4k"],
        &["-f", "qcow2", "-o", "cluster_size=2M"],
        &["-f", "qcow2", "-o", "compat=0.10"],
        &["-f", "qcow2", "-o", "compat=1.1"],
        &[
            "-f",
            "qcow2",
            "-o",
            "compat=v3,lazy_refcounts=true,extended_l2=yes",
        ],
        &["-f", "qcow2", "-o", "lazy_refcounts=on"],
        &["-f", "qcow2", "-o", "refcount_bits=1"],
        &["-f", "qcow2", "-o", "refcount_bits=8,cluster_size=4k"],
        &["-f", "qcow2", "-o", "refcount_bits=64"],
        &["-f", "qcow2", "-o", "extended_l2=on"],
        &["-f", "qcow2", "-o", "extended_l2=on,cluster_size=16k"],
        &["-f", "qcow2", "-o", "compression_type=zstd"],
        &["-f", "qcow2", "-o", "cluster_size=1M,cluster_size=4k"],
        &["-f", "qcow2", "-o", "preallocation=off"],
        &["-f", "qcow2", "-o", "preallocation=metadata"],
        &[
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata,cluster_size=512",
        ],
        &["-f", "qcow2", "-o", "preallocation=metadata,extended_l2=on"],
        &["-f", "qcow2", "-o", "preallocation=falloc"],
        &["-f", "qcow2", "-o", "preallocation=falloc,cluster_size=512"],
        &["-f", "qcow2", "-o", "preallocation=falloc,extended_l2=on"],
        &["-f", "qcow2", "-o", "preallocation=full"],
        &[
            "-f",
            "qcow2",
            "-o",
            "preallocation=full,compat=0.10,cluster_size=4k",
        ],
        &[
            "-f",
            "qcow2",
            "-o",
            "preallocation=full,refcount_bits=64,cluster_size=1k",
        ],
        &["-f", "qcow2", "-b", "base.raw", "-F", "raw"],
        &["-f", "qcow2", "-o", "backing_file=base.raw,backing_fmt=raw"],
        &["-f", "qcow2", "-u", "-b", "missing.raw", "-F", "raw"],
        &[
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,preallocation=metadata",
            "-b",
            "base.raw",
            "-F",
            "raw",
        ],
        &["-f", "raw"],
        &["-f", "raw", "-o", "preallocation=falloc"],
        &["-f", "raw", "-o", "preallocation=full"],
    ];
    for (n, case) in cases.iter().enumerate() {
        let backed = case.contains(&"-b") || case.iter().any(|a| a.contains("backing_file"));
        let unsafe_backing = case.contains(&"-u");
        let sizes: &[Option<&str>] = if unsafe_backing {
            &[Some("2M")]
        } else if backed {
            &[None, Some("1000000"), Some("5M")]
        } else {
            &[Some("1000000"), Some("3M")]
        };
        for size in sizes {
            let name = format!("img{n}");
            let mut args = vec!["create"];
            args.extend_from_slice(case);
            args.push(&name);
            if let Some(s) = size {
                args.push(s);
            }
            let what = format!("create {}", args[1..].join(" "));
            let theirs = qemu(&q, &args).ok();
            let ours = ds(&d, &args).ok();
            assert_eq!(ours.stdout, theirs.stdout, "{what}: messages differ");
            assert_same_bytes(&q.join(&name), &d.join(&name), &what);
            if case.contains(&"raw") && !backed {
                assert_eq!(
                    map_without_offsets(&d, &name, "raw"),
                    map_without_offsets(&q, &name, "raw"),
                    "{what}: allocation differs"
                );
            }
        }
    }
}

/// `-b` without `-F` is refused (we never probe backing formats) and nothing is created; so
/// are invalid options, with one line naming the image.
#[test]
fn create_refuses_bad_arguments_and_writes_nothing() {
    let dir = tmpdir();
    let d = dir.path();
    qemu(d, &["create", "-q", "-f", "raw", "base.raw", "1M"]).ok();
    let bad: &[&[&str]] = &[
        &["-f", "qcow2", "-b", "base.raw", "new.qcow2"],
        &["-f", "qcow2", "-o", "backing_file=base.raw", "new.qcow2"],
        &["-f", "qcow2", "-b", "missing.raw", "-F", "raw", "new.qcow2"],
        &["-f", "qcow2", "-b", "base.raw", "-F", "qcow2", "new.qcow2"],
        &["-f", "qcow2", "-o", "foo=bar", "new.qcow2", "1M"],
        &["-f", "qcow2", "-o", "cluster_size=3000", "new.qcow2", "1M"],
        &["-f", "qcow2", "-o", "compat=2", "new.qcow2", "1M"],
        &[
            "-f",
            "qcow2",
            "-o",
            "preallocation=bogus",
            "new.qcow2",
            "1M",
        ],
        &[
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,lazy_refcounts=on",
            "new.qcow2",
            "1M",
        ],
        &["-f", "qcow2", "-o", "size=2M", "new.qcow2", "1M"],
        &["-f", "qcow2", "new.qcow2"],
        &["-f", "qcow2", "new.qcow2", "100x"],
        &["-f", "foo", "new.qcow2", "1M"],
        &["-f", "raw", "-o", "cluster_size=4k", "new.qcow2", "1M"],
        &[
            "-f",
            "raw",
            "-o",
            "preallocation=metadata",
            "new.qcow2",
            "1M",
        ],
    ];
    for case in bad {
        let mut args = vec!["create"];
        args.extend_from_slice(case);
        let theirs = qemu(d, &args);
        let _ = std::fs::remove_file(d.join("new.qcow2"));
        assert_ne!(theirs.code, 0, "qemu-img accepts it:\n{}", theirs.desc);
        ds(d, &args).fails_naming("new.qcow2");
        assert!(
            !d.join("new.qcow2").exists(),
            "create {} left a file behind",
            case.join(" ")
        );
    }
    // The same messages as qemu-img where qemu-img has one.
    for (case, msg) in [
        (
            &["-f", "qcow2", "-o", "foo=bar", "new.qcow2", "1M"][..],
            "new.qcow2: Invalid parameter 'foo'",
        ),
        (
            &["-f", "qcow2", "-o", "cluster_size=3000", "new.qcow2", "1M"][..],
            "new.qcow2: Cluster size must be a power of two between 512 and 2048k",
        ),
        (
            &["-f", "qcow2", "-o", "size=2M", "new.qcow2", "1M"][..],
            "new.qcow2: The image size must be specified only once",
        ),
    ] {
        let mut args = vec!["create"];
        args.extend_from_slice(case);
        let theirs = qemu(d, &args);
        let ours = ds(d, &args);
        assert_eq!(theirs.stderr.trim(), format!("qemu-img: {msg}"));
        assert_eq!(ours.stderr.trim(), format!("diskstream: {msg}"));
    }
    let err = ds(d, &["create", "-f", "qcow2", "-b", "base.raw", "new.qcow2"]).stderr;
    assert!(err.contains("backing format"), "unclear error: {err}");
}

/// `info` prints exactly what qemu-img prints, as text and as JSON, for every layer of a
/// chain (including backing files in another directory) and with `--backing-chain`.
#[test]
fn info_matches_qemu() {
    let dir = tmpdir();
    let d = dir.path();
    build_chain(
        d,
        "extended_l2=on,cluster_size=64k,lazy_refcounts=on,compression_type=zstd",
    );
    let sub = subdir(d, "sub");
    build_chain(&sub, "compat=0.10,refcount_bits=16");
    for file in [
        "top.qcow2",
        "mid.qcow2",
        "base.raw",
        "sub/top.qcow2",
        "sub/mid.qcow2",
    ] {
        for extra in [
            &[][..],
            &["--output=json"][..],
            &["--backing-chain"][..],
            &["--backing-chain", "--output=json"][..],
            &["-U", "--output=json"][..],
        ] {
            let mut args = vec!["info"];
            args.extend_from_slice(extra);
            args.push(file);
            let theirs = qemu(d, &args).ok();
            let ours = ds(d, &args).ok();
            assert_eq!(
                ours.stdout,
                theirs.stdout,
                "info {} differs",
                args[1..].join(" ")
            );
        }
    }
    // The fields scripts use, explicitly.
    let ours = ds(
        d,
        &["info", "--backing-chain", "--output=json", "sub/top.qcow2"],
    )
    .ok()
    .json();
    let theirs = qemu(
        d,
        &["info", "--backing-chain", "--output=json", "sub/top.qcow2"],
    )
    .ok()
    .json();
    for (o, t) in ours
        .as_array()
        .expect("a JSON array")
        .iter()
        .zip(theirs.as_array().expect("a JSON array"))
    {
        for key in [
            "virtual-size",
            "format",
            "cluster-size",
            "backing-filename",
            "full-backing-filename",
            "backing-filename-format",
            "format-specific",
            "dirty-flag",
        ] {
            assert_eq!(o.get(key), t.get(key), "info field {key}");
        }
    }
    assert_eq!(
        ours[0]["full-backing-filename"], "sub/mid.qcow2",
        "backing file resolved against the overlay's directory"
    );
}

/// `map` output is identical to qemu-img's on a 3-deep chain (raw base, qcow2 layers with
/// data, zero and discarded ranges, a top larger than its backing), whole or in windows.
#[test]
fn map_matches_qemu_on_a_chain() {
    let dir = tmpdir();
    let d = dir.path();
    build_chain(d, "");
    let ext = subdir(d, "ext");
    build_chain(&ext, "extended_l2=on,cluster_size=16k");
    let windows: &[&[&str]] = &[
        &[],
        &["--start-offset", "1M"],
        &["--start-offset", "100000", "--max-length", "1000000"],
        &["--max-length", "3M"],
        &["--start-offset", "1k", "--max-length", "1"],
        &["--start-offset", "6291455"],
        &["--start-offset", "6M"],
        &["--start-offset", "7M"],
        &["--max-length", "0"],
    ];
    for (cwd, files) in [
        (d, &["top.qcow2", "mid.qcow2", "base.raw"][..]),
        (&ext, &["top.qcow2"][..]),
    ] {
        for file in files {
            for w in windows {
                for output in ["--output=json", "--output=human"] {
                    let mut args = vec!["map", output];
                    args.extend_from_slice(w);
                    args.push(file);
                    let theirs = qemu(cwd, &args).ok();
                    let ours = ds(cwd, &args).ok();
                    assert_eq!(
                        ours.stdout,
                        theirs.stdout,
                        "map {} differs",
                        args[1..].join(" ")
                    );
                }
            }
        }
    }
}

/// An image with a cluster freed by a discard (so there is a free cluster inside the file).
fn checkable(dir: &Path, name: &str) {
    qemu(dir, &["create", "-q", "-f", "qcow2", name, "4M"]).ok();
    qemu_io(
        dir,
        "qcow2",
        name,
        &["write -P 1 0 1M", "write -P 2 2M 64k", "discard 0 64k"],
    );
}

/// Run `check` with both tools on twin copies; exit codes and stdout must agree, and stderr
/// too (the per-cluster findings).
fn check_both(q: &Path, d: &Path, args: &[&str]) -> (Run, Run) {
    let theirs = qemu(q, args);
    let ours = ds(d, args);
    assert_eq!(
        ours.code,
        theirs.code,
        "check {}: exit codes differ\nours: {}\ntheirs: {}",
        args.join(" "),
        ours.desc,
        theirs.desc
    );
    assert_eq!(
        ours.stdout,
        theirs.stdout,
        "check {}: output differs",
        args.join(" ")
    );
    (ours, theirs)
}

/// `check`: exit codes 0 (clean), 3 (leaks), 2 (corruptions), 1 (check error: a repair that
/// would need a rebuild with `-r leaks`), 63 (raw); output and JSON as qemu-img's; `-r leaks`
/// and `-r all` repair so that both tools find the image clean afterwards.
#[test]
fn check_matches_qemu() {
    let dir = tmpdir();
    let (q, d) = (subdir(dir.path(), "q"), subdir(dir.path(), "d"));
    checkable(&q, "clean.qcow2");
    copy(&q.join("clean.qcow2"), &d.join("clean.qcow2"));

    // Clean.
    for args in [
        &["check", "clean.qcow2"][..],
        &["check", "--output=json", "clean.qcow2"][..],
        &["check", "-q", "clean.qcow2"][..],
    ] {
        let (ours, _) = check_both(&q, &d, args);
        assert_eq!(ours.code, 0);
    }

    // A leak: a free cluster with refcount 1.
    let free = free_cluster_in_file(&q.join("clean.qcow2"));
    for side in [&q, &d] {
        copy(&side.join("clean.qcow2"), &side.join("leak.qcow2"));
        set_refcount(&side.join("leak.qcow2"), free, 1);
    }
    for args in [
        &["check", "leak.qcow2"][..],
        &["check", "--output=json", "leak.qcow2"][..],
    ] {
        let (ours, theirs) = check_both(&q, &d, args);
        assert_eq!(ours.code, 3);
        assert_eq!(ours.stderr, theirs.stderr, "leak messages differ");
    }
    let json = ds(&d, &["check", "--output=json", "leak.qcow2"]).json();
    assert_eq!(json["leaks"], 1);

    // A corruption: a used data cluster with refcount 0.
    let used = host_cluster_of(&q.join("clean.qcow2"), 2 << 20);
    for side in [&q, &d] {
        copy(&side.join("clean.qcow2"), &side.join("bad.qcow2"));
        set_refcount(&side.join("bad.qcow2"), used, 0);
    }
    for args in [
        &["check", "bad.qcow2"][..],
        &["check", "--output=json", "bad.qcow2"][..],
    ] {
        let (ours, theirs) = check_both(&q, &d, args);
        assert_eq!(ours.code, 2);
        assert_eq!(ours.stderr, theirs.stderr, "corruption messages differ");
    }

    // A check error: `-r leaks` cannot repair a refcount that is too low.
    let before = read(&d.join("bad.qcow2"));
    let ours = ds(&d, &["check", "-r", "leaks", "bad.qcow2"]).code_is(1);
    let last = ours.stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("bad.qcow2") && last.contains("Check failed"),
        "{}",
        ours.desc
    );
    qemu(&q, &["check", "-r", "leaks", "bad.qcow2"]).code_is(1);
    assert_eq!(
        read(&d.join("bad.qcow2")),
        before,
        "-r leaks changed the image"
    );

    // Repairs.
    for (image, mode) in [
        ("leak.qcow2", "leaks"),
        ("leak.qcow2", "all"),
        ("bad.qcow2", "all"),
    ] {
        for side in [&q, &d] {
            copy(&side.join(image), &side.join("fix.qcow2"));
        }
        let theirs = qemu(&q, &["check", "-r", mode, "fix.qcow2"]).ok();
        let ours = ds(&d, &["check", "-r", mode, "fix.qcow2"]).ok();
        assert_eq!(ours.stdout, theirs.stdout, "check -r {mode} of {image}");
        assert_eq!(ours.stderr, theirs.stderr, "check -r {mode} of {image}");
        assert_same_bytes(
            &q.join("fix.qcow2"),
            &d.join("fix.qcow2"),
            &format!("check -r {mode} of {image}"),
        );
        ds(&d, &["check", "fix.qcow2"]).ok();
        let after = qemu(&d, &["check", "--output=json", "fix.qcow2"]).ok();
        assert_eq!(after.json()["check-errors"], 0);
        assert!(after.json().get("leaks").is_none(), "{}", after.desc);
        assert!(after.json().get("corruptions").is_none(), "{}", after.desc);
        qemu(dir.path(), &["compare", "q/fix.qcow2", "d/fix.qcow2"]).ok();
    }
    // JSON of a repair.
    for side in [&q, &d] {
        copy(&side.join("leak.qcow2"), &side.join("fix.qcow2"));
    }
    let (ours, _) = check_both(
        &q,
        &d,
        &["check", "-r", "leaks", "--output=json", "fix.qcow2"],
    );
    assert_eq!(ours.json()["leaks-fixed"], 1);

    // Formats without checks.
    qemu(&d, &["create", "-q", "-f", "raw", "r.raw", "1M"]).ok();
    copy(&d.join("r.raw"), &q.join("r.raw"));
    let (ours, _) = check_both(&q, &d, &["check", "-f", "raw", "r.raw"]);
    assert_eq!(ours.code, 63);
    assert!(ours.stderr.contains("does not support checks"));
}

/// `compare` exit codes and messages equal qemu-img's: identical (0), different (1, with the
/// same first differing offset), size mismatches (warning, strict mode), block status
/// mismatches in strict mode, and errors (2).
#[test]
fn compare_matches_qemu() {
    let dir = tmpdir();
    let d = dir.path();
    build_chain(d, "");
    export_raw(d, "top.qcow2", "qcow2", "top.raw");
    copy(&d.join("top.raw"), &d.join("top2.raw"));
    qemu_io(d, "raw", "top2.raw", &["write -P 9 1500000 1"]);
    let mut big = read(&d.join("top.raw"));
    big.resize(8 << 20, 0);
    std::fs::write(d.join("big.raw"), &big).expect("write big.raw");
    big[7 << 20] = 9;
    std::fs::write(d.join("big2.raw"), &big).expect("write big2.raw");
    let mut short = read(&d.join("top.raw"));
    short.truncate(3_000_000);
    std::fs::write(d.join("short.raw"), &short).expect("write short.raw");
    qemu(d, &["convert", "-O", "qcow2", "top.qcow2", "flat.qcow2"]).ok();
    qemu(d, &["create", "-q", "-f", "qcow2", "empty.qcow2", "4M"]).ok();
    qemu(d, &["create", "-q", "-f", "raw", "odd.raw", "4M"]).ok();
    qemu_io(d, "raw", "odd.raw", &["write -P 7 1000001 3"]);
    let cases: &[&[&str]] = &[
        &["top.qcow2", "top.raw"],
        &["top.raw", "top2.raw"],
        &["-f", "qcow2", "-F", "raw", "top.qcow2", "top2.raw"],
        &["top.raw", "big.raw"],
        &["top.raw", "big2.raw"],
        &["big2.raw", "top.raw"],
        &["top.raw", "short.raw"],
        &["-s", "top.raw", "big.raw"],
        &["-s", "top.raw", "top.raw"],
        &["-s", "top.qcow2", "top.raw"],
        &["-s", "top.qcow2", "flat.qcow2"],
        &["-s", "flat.qcow2", "flat.qcow2"],
        &["-s", "mid.qcow2", "base.raw"],
        &["mid.qcow2", "top.qcow2"],
        &["base.raw", "mid.qcow2"],
        &["empty.qcow2", "odd.raw"],
        &["-s", "empty.qcow2", "odd.raw"],
        &["-q", "top.raw", "top2.raw"],
        &["-q", "top.raw", "big.raw"],
        &["top.raw", "missing.raw"],
        &["-f", "qcow2", "top.raw", "top.raw"],
    ];
    for case in cases {
        let mut args = vec!["compare"];
        args.extend_from_slice(case);
        let theirs = qemu(d, &args);
        let ours = ds(d, &args);
        assert_eq!(
            (ours.code, &ours.stdout),
            (theirs.code, &theirs.stdout),
            "compare {}:\nours: {}\ntheirs: {}",
            case.join(" "),
            ours.desc,
            theirs.desc
        );
    }
    let e = ds(d, &["compare", "top.raw", "missing.raw"]).code_is(2);
    e.fails_naming("missing.raw");
}

/// `convert` output passes `qemu-img check`, reads like the source for `qemu-img compare`, and
/// is laid out like qemu-img's own output (sparse: zero ranges stay unallocated).
#[test]
fn convert_matches_qemu() {
    let dir = tmpdir();
    let d = dir.path();
    build_chain(d, "");
    // (options, output format, output must be byte-identical to qemu-img's)
    let cases: &[(&[&str], &str, bool)] = &[
        (&["-O", "qcow2"], "qcow2", true),
        (&["-O", "raw"], "raw", true),
        (&["-O", "qcow2", "-o", "cluster_size=4k"], "qcow2", true),
        (&["-O", "qcow2", "-o", "cluster_size=512"], "qcow2", true),
        (&["-O", "qcow2", "-o", "cluster_size=2M"], "qcow2", true),
        (&["-O", "qcow2", "-o", "compat=0.10"], "qcow2", true),
        (&["-O", "qcow2", "-o", "extended_l2=on"], "qcow2", true),
        (
            &["-O", "qcow2", "-o", "preallocation=metadata"],
            "qcow2",
            true,
        ),
        (&["-O", "raw", "-o", "preallocation=full"], "raw", true),
        (&["-c", "-O", "qcow2"], "qcow2", false),
        (
            &["-c", "-O", "qcow2", "-o", "compression_type=zstd"],
            "qcow2",
            false,
        ),
        (
            &["-c", "-O", "qcow2", "-o", "cluster_size=4k"],
            "qcow2",
            false,
        ),
        (&["-m", "1", "-O", "qcow2"], "qcow2", true),
        // Small clusters with wide refcounts: many refcount blocks and a growing refcount
        // table (laid out differently from QEMU's, so only checked for consistency).
        (
            &["-O", "qcow2", "-o", "cluster_size=512,refcount_bits=64"],
            "qcow2",
            false,
        ),
    ];
    for (n, (opts, fmt, identical)) in cases.iter().enumerate() {
        let (qo, doo) = (format!("q{n}.out"), format!("d{n}.out"));
        let what = format!("convert {}", opts.join(" "));
        let mut args = vec!["convert"];
        args.extend_from_slice(opts);
        let mut qargs = args.clone();
        qargs.extend(["top.qcow2", &qo]);
        let mut dargs = args.clone();
        dargs.extend(["top.qcow2", &doo]);
        qemu(d, &qargs).ok();
        ds(d, &dargs).ok();
        if *fmt == "qcow2" {
            qemu(d, &["check", &doo]).ok();
        }
        qemu(d, &["compare", "-F", fmt, "top.qcow2", &doo]).ok();
        assert_eq!(
            map_without_offsets(d, &doo, fmt),
            map_without_offsets(d, &qo, fmt),
            "{what}: allocation differs from qemu-img's"
        );
        if *identical {
            assert_same_bytes(&d.join(&qo), &d.join(&doo), &what);
        }
    }
    // Sparse: the zero range of the source is not allocated in the output.
    let map = qemu(d, &["map", "--output=json", "d0.out"]).ok().json();
    let hole = map
        .as_array()
        .expect("a JSON array")
        .iter()
        .find(|e| e["start"] == 1572864)
        .expect("an extent at 1.5 MiB");
    assert_eq!(hole["present"], false, "{hole}");
    // Compressed output really is compressed.
    let check = qemu(d, &["check", "--output=json", "d9.out"]).ok().json();
    assert!(
        check["compressed-clusters"].as_u64().unwrap_or(0) > 0,
        "{check}"
    );
    let info = qemu(d, &["info", "--output=json", "d10.out"]).ok().json();
    assert_eq!(info["format-specific"]["data"]["compression-type"], "zstd");

    // -n onto existing targets of the same size.
    for fmt in ["qcow2", "raw"] {
        let (qo, doo) = (format!("qn.{fmt}"), format!("dn.{fmt}"));
        for f in [&qo, &doo] {
            qemu(d, &["create", "-q", "-f", fmt, f, "6M"]).ok();
        }
        qemu(d, &["convert", "-n", "-O", fmt, "top.qcow2", &qo]).ok();
        ds(d, &["convert", "-n", "-O", fmt, "top.qcow2", &doo]).ok();
        qemu(d, &["compare", "-F", fmt, "top.qcow2", &doo]).ok();
        assert_same_bytes(&d.join(&qo), &d.join(&doo), &format!("convert -n -O {fmt}"));
    }
    // -n onto a target too small: refused, untouched.
    qemu(d, &["create", "-q", "-f", "qcow2", "small.qcow2", "1M"]).ok();
    let before = read(&d.join("small.qcow2"));
    ds(
        d,
        &["convert", "-n", "-O", "qcow2", "top.qcow2", "small.qcow2"],
    )
    .fails_naming("small.qcow2");
    assert_eq!(read(&d.join("small.qcow2")), before);

    // -B: a copy-on-write output over the given backing file. (We write exactly what differs
    // from that backing file, so the layout is not compared with qemu-img's.)
    ds(
        d,
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "cow.qcow2",
        ],
    )
    .ok();
    qemu(d, &["check", "cow.qcow2"]).ok();
    qemu(d, &["compare", "top.qcow2", "cow.qcow2"]).ok();
    let info = qemu(d, &["info", "--output=json", "cow.qcow2"]).ok().json();
    assert_eq!(info["backing-filename"], "mid.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    let cow = qemu(d, &["check", "--output=json", "cow.qcow2"])
        .ok()
        .json();
    let flat = qemu(d, &["check", "--output=json", "d0.out"]).ok().json();
    assert!(
        cow["allocated-clusters"].as_u64() < flat["allocated-clusters"].as_u64(),
        "-B should store less than a flat copy: {cow} vs {flat}"
    );
    // -B without -F is refused before anything is written.
    ds(
        d,
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "mid.qcow2",
            "top.qcow2",
            "cow2.qcow2",
        ],
    )
    .fails_naming("cow2.qcow2");
    assert!(!d.join("cow2.qcow2").exists());
}

/// `convert` copies in batches (one allocation decision and one gathered write for many
/// clusters, see `Qcow2::write_pieces`) yet lays the output out exactly as qemu-img does, on a
/// fragmented source whose data, zero runs and all-zero data clusters do not line up with the
/// batches: across L2 table boundaries (512-byte clusters: every 32 KiB), new refcount blocks
/// (1-bit refcounts), 2 MiB clusters larger than a batch, a v2 target, an image size that
/// ends inside a cluster, and any number of parallel requests.
#[test]
fn convert_in_batches_matches_qemu_byte_for_byte() {
    use rand::{Rng, SeedableRng};
    let dir = tmpdir();
    let d = dir.path();
    // 24 MiB + 3.5 KiB: the last cluster of every target is partial.
    let size = (24u64 << 20) + 3584;
    qemu(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "src.qcow2",
            &size.to_string(),
        ],
    )
    .ok();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut cmds = Vec::new();
    for i in 0..400 {
        let off = rng.random_range(0..size / 512) * 512;
        let len = (rng.random_range(1..=192u64) * 512).min(size - off);
        cmds.push(match i % 5 {
            // All-zero data: stored, but skipped by both converters.
            0 => format!("write -P 0 {off} {len}"),
            1 => format!("write -z {off} {len}"),
            _ => format!("write -P {} {off} {len}", 1 + i % 250),
        });
    }
    cmds.push(format!("write -P 9 {} 3584", size - 3584));
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    for chunk in refs.chunks(100) {
        qemu_io(d, "qcow2", "src.qcow2", chunk);
    }
    let cases: &[&[&str]] = &[
        &["-O", "qcow2"],
        &["-O", "qcow2", "-o", "cluster_size=512"],
        &["-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=1"],
        &["-O", "qcow2", "-o", "cluster_size=2M"],
        &["-O", "qcow2", "-o", "compat=0.10,cluster_size=16k"],
        &["-m", "1", "-O", "qcow2", "-o", "cluster_size=1k"],
        &["-m", "16", "-O", "qcow2", "-o", "cluster_size=8k"],
        &["-O", "raw"],
    ];
    for (n, opts) in cases.iter().enumerate() {
        let what = format!("convert {}", opts.join(" "));
        let (qo, doo) = (format!("q{n}.out"), format!("d{n}.out"));
        let mut qargs = vec!["convert"];
        qargs.extend_from_slice(opts);
        let mut dargs = qargs.clone();
        qargs.extend(["src.qcow2", &qo]);
        dargs.extend(["src.qcow2", &doo]);
        qemu(d, &qargs).ok();
        ds(d, &dargs).ok();
        if opts.contains(&"qcow2") {
            qemu(d, &["check", &doo]).ok();
        }
        qemu(d, &["compare", "src.qcow2", &doo]).ok();
        assert_same_bytes(&d.join(&qo), &d.join(&doo), &what);
    }
}

/// Build the same chain in `q/` and `d/`.
fn twin_chains(root: &Path, top_opts: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let (q, d) = (subdir(root, "q"), subdir(root, "d"));
    build_chain(&q, top_opts);
    build_chain(&d, top_opts);
    (q, d)
}

/// `rebase` in safe mode (onto a layer further down, onto a new file, `-b ""` to flatten) and
/// in unsafe mode leaves the same image as qemu-img's, byte for byte; safe mode keeps the
/// guest view.
#[test]
fn rebase_matches_qemu() {
    let root = tmpdir();
    let cases: &[(&str, &[&str], bool)] = &[
        ("", &["-b", "base.raw", "-F", "raw"], true),
        ("", &["-b", "", "-F", "raw"], true),
        ("", &["-b", ""], true),
        ("", &["-b", "mid.qcow2", "-F", "qcow2"], true),
        ("", &["-b", "other.qcow2", "-F", "qcow2"], true),
        ("", &["-u", "-b", "base.raw", "-F", "raw"], false),
        ("", &["-u", "-b", "missing.raw", "-F", "raw"], false),
        ("compat=0.10", &["-b", "base.raw", "-F", "raw"], true),
        ("compat=0.10", &["-b", ""], true),
        (
            "extended_l2=on,cluster_size=64k",
            &["-b", "base.raw", "-F", "raw"],
            true,
        ),
        ("extended_l2=on,cluster_size=16k", &["-b", ""], true),
    ];
    for (n, (top_opts, args, safe)) in cases.iter().enumerate() {
        let case_dir = subdir(root.path(), &format!("c{n}"));
        let (q, d) = twin_chains(&case_dir, top_opts);
        for side in [&q, &d] {
            qemu(side, &["create", "-q", "-f", "qcow2", "other.qcow2", "5M"]).ok();
            qemu_io(side, "qcow2", "other.qcow2", &["write -P 8 0 2M"]);
        }
        export_raw(&q, "top.qcow2", "qcow2", "before.raw");
        let what = format!("rebase {} ({top_opts})", args.join(" "));
        let mut full = vec!["rebase"];
        full.extend_from_slice(args);
        full.push("top.qcow2");
        let theirs = qemu(&q, &full).ok();
        let ours = ds(&d, &full).ok();
        assert_eq!(ours.stdout, theirs.stdout, "{what}");
        assert_same_bytes(&q.join("top.qcow2"), &d.join("top.qcow2"), &what);
        if args.contains(&"missing.raw") {
            continue;
        }
        qemu(&d, &["check", "top.qcow2"]).ok();
        ds(&d, &["check", "top.qcow2"]).ok();
        let same = qemu(
            &d,
            &["compare", "-F", "qcow2", "../q/before.raw", "top.qcow2"],
        );
        assert_eq!(
            same.code == 0,
            *safe,
            "{what}: guest view {}:\n{}",
            if *safe { "changed" } else { "should change" },
            same.desc
        );
    }
}

/// `rebase` errors: no `-F`, a missing new backing file, a raw image; nothing is changed.
#[test]
fn rebase_refuses_bad_arguments() {
    let root = tmpdir();
    let d = root.path();
    build_chain(d, "");
    let before = read(&d.join("top.qcow2"));
    for args in [
        &["rebase", "-b", "base.raw", "top.qcow2"][..],
        &["rebase", "-b", "missing.raw", "-F", "raw", "top.qcow2"][..],
        &["rebase", "-b", "base.raw", "-F", "vmdk", "top.qcow2"][..],
    ] {
        ds(d, args).fails_naming("top.qcow2");
        assert_eq!(
            read(&d.join("top.qcow2")),
            before,
            "{} changed it",
            args.join(" ")
        );
    }
    let raw = read(&d.join("base.raw"));
    ds(d, &["rebase", "-f", "raw", "-b", "", "base.raw"]).fails_naming("base.raw");
    assert_eq!(read(&d.join("base.raw")), raw);
}

/// `commit` (into the direct backing file, with `-d`, and with `-b` to a deeper base, which
/// implies `-d`): the base then shows the old top view, every layer passes `check`, and the
/// allocation of every layer equals what qemu-img's commit leaves.
#[test]
fn commit_matches_qemu() {
    let root = tmpdir();
    let cases: &[(&[&str], &str)] = &[
        (&[], "mid.qcow2"),
        (&["-d"], "mid.qcow2"),
        (&["-b", "base.raw"], "base.raw"),
        (&["-b", "mid.qcow2"], "mid.qcow2"),
        (&["-d", "-b", "base.raw"], "base.raw"),
    ];
    for (n, (args, base)) in cases.iter().enumerate() {
        let case_dir = subdir(root.path(), &format!("c{n}"));
        let (q, d) = twin_chains(&case_dir, "");
        export_raw(&q, "top.qcow2", "qcow2", "before.raw");
        let what = format!("commit {}", args.join(" "));
        let mut full = vec!["commit"];
        full.extend_from_slice(args);
        full.push("top.qcow2");
        let theirs = qemu(&q, &full).ok();
        let ours = ds(&d, &full).ok();
        assert_eq!(ours.stdout, theirs.stdout, "{what}");
        let base_fmt = if base.ends_with(".raw") {
            "raw"
        } else {
            "qcow2"
        };
        qemu(&d, &["compare", "-F", base_fmt, "../q/before.raw", base]).ok();
        for (f, fmt) in [
            ("top.qcow2", "qcow2"),
            ("mid.qcow2", "qcow2"),
            ("base.raw", "raw"),
        ] {
            if fmt == "qcow2" {
                qemu(&d, &["check", f]).ok();
            }
            assert_eq!(
                map_without_offsets(&d, f, fmt),
                map_without_offsets(&q, f, fmt),
                "{what}: {f} differs from qemu-img's"
            );
        }
    }
    // No backing file, or a base that is not in the chain: refused, unchanged.
    let d = root.path().join("c0").join("d");
    let mid = read(&d.join("mid.qcow2"));
    ds(&d, &["commit", "-b", "other.raw", "top.qcow2"]).fails_naming("top.qcow2");
    let raw = read(&d.join("base.raw"));
    ds(&d, &["commit", "-f", "raw", "base.raw"]).fails_naming("base.raw");
    assert_eq!(read(&d.join("base.raw")), raw);
    assert_eq!(read(&d.join("mid.qcow2")), mid);
}

/// `resize` grows and shrinks like qemu-img (same virtual size, same contents, same
/// allocation, clean check); shrinking needs `--shrink`, and we refuse to drop data.
#[test]
fn resize_matches_qemu() {
    let root = tmpdir();
    let cases: &[(&str, &[&str])] = &[
        ("top.qcow2", &["top.qcow2", "+1M"]),
        ("top.qcow2", &["top.qcow2", "8M"]),
        ("top.qcow2", &["top.qcow2", "1.5G"]),
        ("top.qcow2", &["--shrink", "top.qcow2", "-16k"]),
        ("mid.qcow2", &["mid.qcow2", "+1000448"]),
        ("mid.qcow2", &["--shrink", "mid.qcow2", "3M"]),
        ("base.raw", &["-f", "raw", "base.raw", "+1M"]),
        ("base.raw", &["-f", "raw", "base.raw", "+1000"]),
        ("base.raw", &["-f", "raw", "--shrink", "base.raw", "-1M"]),
    ];
    for (n, (file, args)) in cases.iter().enumerate() {
        let case_dir = subdir(root.path(), &format!("c{n}"));
        let (q, d) = twin_chains(&case_dir, "");
        let mut full = vec!["resize"];
        full.extend_from_slice(args);
        let what = full.join(" ");
        let theirs = qemu(&q, &full).ok();
        let ours = ds(&d, &full).ok();
        assert_eq!(ours.stdout, theirs.stdout, "{what}");
        let fmt = if file.ends_with(".raw") {
            "raw"
        } else {
            "qcow2"
        };
        let info = |dir: &Path| {
            qemu(dir, &["info", "-f", fmt, "--output=json", file])
                .ok()
                .json()["virtual-size"]
                .clone()
        };
        assert_eq!(info(&d), info(&q), "{what}: sizes differ");
        let other = format!("../q/{file}");
        qemu(&d, &["compare", "-f", fmt, "-F", fmt, file, &other]).ok();
        assert_eq!(
            map_without_offsets(&d, file, fmt),
            map_without_offsets(&q, file, fmt),
            "{what}: allocation differs"
        );
        if fmt == "qcow2" {
            qemu(&d, &["check", file]).ok();
        }
    }
    // Refusals: a shrink without --shrink (as qemu-img), to zero (as qemu-img), and over data
    // (deliberately, where qemu-img would drop it). The image stays untouched.
    let d = subdir(root.path(), "refuse");
    build_chain(&d, "");
    let before = read(&d.join("top.qcow2"));
    for (args, qemu_refuses) in [
        (&["resize", "top.qcow2", "-1M"][..], true),
        (&["resize", "top.qcow2", "1M"][..], true),
        (&["resize", "--shrink", "top.qcow2", "0"][..], true),
        (&["resize", "--shrink", "top.qcow2", "-2M"][..], false),
    ] {
        ds(&d, args).fails_naming("top.qcow2");
        assert_eq!(
            read(&d.join("top.qcow2")),
            before,
            "{} changed it",
            args.join(" ")
        );
        if qemu_refuses {
            qemu(&d, args).code_is(1);
        }
    }
}

/// Errors of every command: a missing file, a wrong `-f`, a corrupt (truncated) image, bad
/// options. One line naming the file, a non-zero exit code, no output file created and the
/// input unchanged.
#[test]
fn errors_name_the_file_and_write_nothing() {
    let root = tmpdir();
    let d = root.path();
    build_chain(d, "");
    let mut bytes = read(&d.join("top.qcow2"));
    bytes.truncate(50);
    std::fs::write(d.join("cut.qcow2"), &bytes).expect("write cut.qcow2");
    let inputs = ["top.qcow2", "mid.qcow2", "base.raw", "cut.qcow2"];
    let before: Vec<Vec<u8>> = inputs.iter().map(|f| read(&d.join(f))).collect();
    let cases: &[(&[&str], &str)] = &[
        (&["info", "missing.qcow2"], "missing.qcow2"),
        (&["map", "missing.qcow2"], "missing.qcow2"),
        (&["check", "missing.qcow2"], "missing.qcow2"),
        (&["convert", "missing.qcow2", "out.img"], "missing.qcow2"),
        (
            &["rebase", "-u", "-b", "", "missing.qcow2"],
            "missing.qcow2",
        ),
        (&["commit", "missing.qcow2"], "missing.qcow2"),
        (&["resize", "missing.qcow2", "+1M"], "missing.qcow2"),
        (&["info", "-f", "qcow2", "base.raw"], "base.raw"),
        (&["map", "-f", "qcow2", "base.raw"], "base.raw"),
        (&["check", "-f", "qcow2", "base.raw"], "base.raw"),
        (
            &["convert", "-f", "qcow2", "base.raw", "out.img"],
            "base.raw",
        ),
        (&["resize", "-f", "qcow2", "base.raw", "+1M"], "base.raw"),
        (&["info", "-f", "vmdk", "top.qcow2"], "top.qcow2"),
        (&["info", "cut.qcow2"], "cut.qcow2"),
        (&["map", "cut.qcow2"], "cut.qcow2"),
        (&["check", "cut.qcow2"], "cut.qcow2"),
        (&["convert", "cut.qcow2", "out.img"], "cut.qcow2"),
        (&["commit", "cut.qcow2"], "cut.qcow2"),
        (&["resize", "cut.qcow2", "+1M"], "cut.qcow2"),
        (&["rebase", "-u", "-b", "", "cut.qcow2"], "cut.qcow2"),
        (&["compare", "cut.qcow2", "top.qcow2"], "cut.qcow2"),
        (
            &[
                "convert",
                "-O",
                "qcow2",
                "-o",
                "foo=bar",
                "top.qcow2",
                "out.img",
            ],
            "out.img",
        ),
        (
            &[
                "convert",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=3000",
                "top.qcow2",
                "out.img",
            ],
            "out.img",
        ),
        (
            &["convert", "-O", "raw", "-c", "top.qcow2", "out.img"],
            "out.img",
        ),
        (&["convert", "-O", "foo", "top.qcow2", "out.img"], "out.img"),
        (
            &[
                "convert",
                "-O",
                "raw",
                "-B",
                "mid.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
                "out.img",
            ],
            "out.img",
        ),
        (&["resize", "top.qcow2", "+1000"], "top.qcow2"),
    ];
    for (args, file) in cases {
        let theirs = qemu(d, args);
        assert_ne!(theirs.code, 0, "qemu-img accepts it:\n{}", theirs.desc);
        ds(d, args).fails_naming(file);
        assert!(
            !d.join("out.img").exists(),
            "{} created its output",
            args.join(" ")
        );
        for (f, b) in inputs.iter().zip(&before) {
            assert_eq!(&read(&d.join(f)), b, "{} changed {f}", args.join(" "));
        }
    }
}

/// `--backing-allow`: with an allow-list, a backing file outside the listed directories (even
/// reached through `..` or a symlink) or with an unlisted URL scheme is refused before it is
/// opened; listed ones open as usual.
#[test]
fn backing_allow_list() {
    let root = tempfile::tempdir().expect("tmp");
    let r = root.path();
    let (imgs, other) = (subdir(r, "imgs"), subdir(r, "other"));
    qemu(
        &other,
        &["create", "-q", "-f", "qcow2", "secret.qcow2", "1M"],
    )
    .ok();
    qemu(&imgs, &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]).ok();
    qemu(
        &imgs,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "ok.qcow2",
        ],
    )
    .ok();
    qemu(
        &imgs,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "../other/secret.qcow2",
            "-F",
            "qcow2",
            "escape.qcow2",
        ],
    )
    .ok();
    std::os::unix::fs::symlink(other.join("secret.qcow2"), imgs.join("link.qcow2"))
        .expect("symlink");
    qemu(
        &imgs,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "link.qcow2",
            "-F",
            "qcow2",
            "sym.qcow2",
            "1M",
        ],
    )
    .ok();
    qemu(
        &imgs,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "nbd://127.0.0.1:1/x",
            "-F",
            "raw",
            "url.qcow2",
            "1M",
        ],
    )
    .ok();
    let allow = imgs.display().to_string();
    let run = |args: &[&str]| {
        let mut all = vec!["--backing-allow", allow.as_str(), "img"];
        all.extend_from_slice(args);
        run_in(&imgs, DISKSTREAM, &all)
    };
    run(&["info", "--backing-chain", "ok.qcow2"]).ok();
    for (img, what) in [
        ("escape.qcow2", "outside the directories"),
        ("sym.qcow2", "outside the directories"),
        ("url.qcow2", "URL scheme 'nbd'"),
    ] {
        let r = run(&["info", "--backing-chain", img]);
        assert_ne!(r.code, 0, "{}", r.desc);
        assert!(r.stderr.contains(what), "{img}: {}", r.desc);
    }
    // The environment variable works the same way.
    let out = std::process::Command::new(DISKSTREAM)
        .args(["img", "info", "--backing-chain", "escape.qcow2"])
        .env("DISKSTREAM_BACKING_ALLOW", format!("{allow}:https://"))
        .current_dir(&imgs)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("backing allow-list"));
}

/// Build `src.qcow2` in `dir` with `create_opts` (and `backing.qcow2` when `backed`), holding
/// data, a plain zero cluster and a preallocated zero cluster.
fn amend_source(dir: &Path, create_opts: &str, backed: bool) {
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", create_opts];
    if backed {
        qemu(dir, &["create", "-q", "-f", "qcow2", "backing.qcow2", "1M"]).ok();
        qemu_io(dir, "qcow2", "backing.qcow2", &["write -P 7 0 1M"]);
        args.extend(["-b", "backing.qcow2", "-F", "qcow2"]);
    }
    args.extend(["src.qcow2", "1M"]);
    qemu(dir, &args).ok();
    if !create_opts.contains("compat=0.10") {
        qemu_io(
            dir,
            "qcow2",
            "src.qcow2",
            &["write -z 0 64k", "write -P 1 64k 64k", "write -z 64k 64k"],
        );
    }
    qemu_io(dir, "qcow2", "src.qcow2", &["write -P 2 200k 30k"]);
}

/// `img amend` and `qemu-img amend` with the same options on copies of one image write
/// byte-identical files (compat upgrade and downgrade, with zero clusters expanded as QEMU
/// expands them, lazy refcounts, size); a new refcount width gives the same counts, `info`
/// and contents; a backing change equals `qemu-img rebase -u` (qemu-img refuses it in amend);
/// refusals print one line and leave the file untouched, as qemu-img's.
#[test]
fn amend_matches_qemu() {
    let dir = tmpdir();
    let d = dir.path();
    // Fresh copies q.qcow2 and d.qcow2 of a source made with these options (made again only
    // when they change: process starts are most of this test's time).
    let last = std::cell::RefCell::new(None::<(String, bool)>);
    let pair = |create: &str, backed: bool| {
        let key = Some((create.to_string(), backed));
        if *last.borrow() != key {
            for f in ["src.qcow2", "backing.qcow2"] {
                let _ = std::fs::remove_file(d.join(f));
            }
            amend_source(d, create, backed);
            *last.borrow_mut() = key;
        }
        for f in ["q.qcow2", "d.qcow2"] {
            let _ = std::fs::remove_file(d.join(f));
            copy(&d.join("src.qcow2"), &d.join(f));
        }
    };
    // (create options, backed, amend options)
    let same: &[(&str, bool, &str)] = &[
        ("compat=1.1", false, "compat=0.10"),
        ("compat=1.1", true, "compat=0.10"),
        (
            "compat=1.1,lazy_refcounts=on",
            true,
            "compat=v2,lazy_refcounts=off",
        ),
        ("compat=1.1", false, "lazy_refcounts=on"),
        ("compat=1.1,lazy_refcounts=on", false, "lazy_refcounts=off"),
        ("compat=1.1", false, "size=4M"),
        ("compat=1.1", false, "refcount_bits=16,compat=1.1"),
        ("compat=0.10", false, "compat=1.1"),
        ("compat=0.10", true, "compat=1.1,lazy_refcounts=on"),
        ("compat=0.10,cluster_size=512", false, "compat=1.1"),
        ("compat=1.1,compression_type=zstd", false, "compat=0.10"),
        ("compat=1.1,cluster_size=4k", true, "compat=0.10"),
    ];
    for (create, backed, opts) in same {
        pair(create, *backed);
        qemu(d, &["amend", "-f", "qcow2", "-o", opts, "q.qcow2"]).ok();
        ds(d, &["amend", "-f", "qcow2", "-o", opts, "d.qcow2"]).ok();
        let what = format!("amend -o {opts} of an image created with {create}");
        assert_same_bytes(&d.join("q.qcow2"), &d.join("d.qcow2"), &what);
        qemu(d, &["check", "-q", "d.qcow2"]).ok();
        qemu(d, &["compare", "-q", "src.qcow2", "d.qcow2"]).ok();
    }
    // A new refcount width: the same counts in a structure laid out differently from QEMU's
    // (as a `check -r all` rebuild lays it out), so a clean check, the same contents, and the
    // `info` qemu-img shows after its amend without the width, with the new width. (qemu-img's
    // own width change syncs at every step: seconds per image on a busy disk.)
    let info = |f: &str| {
        let mut v = qemu(d, &["info", "--output=json", f]).ok().json();
        for k in ["actual-size", "filename", "children"] {
            v[k] = serde_json::Value::Null;
        }
        v
    };
    let widths: &[(&str, &str, u64)] = &[
        ("compat=1.1", "refcount_bits=1", 1),
        ("compat=1.1", "refcount_bits=64", 64),
        ("compat=1.1,refcount_bits=8", "refcount_bits=16", 16),
        ("compat=0.10", "compat=1.1,refcount_bits=4", 4),
        ("compat=1.1,cluster_size=512", "refcount_bits=2", 2),
    ];
    for (create, opts, bits) in widths {
        pair(create, false);
        let rest: Vec<&str> = opts
            .split(',')
            .filter(|o| !o.starts_with("refcount_bits="))
            .collect();
        if !rest.is_empty() {
            qemu(d, &["amend", "-o", &rest.join(","), "q.qcow2"]).ok();
        }
        ds(d, &["amend", "-o", opts, "d.qcow2"]).ok();
        qemu(d, &["check", "-q", "d.qcow2"]).ok();
        qemu(d, &["compare", "-q", "src.qcow2", "d.qcow2"]).ok();
        let mut want = info("q.qcow2");
        want["format-specific"]["data"]["refcount-bits"] = (*bits).into();
        assert_eq!(info("d.qcow2"), want, "amend -o {opts} ({create})");
    }
    // Widen to 16 bits, then downgrade, in one amend (as qemu-img orders them).
    pair("compat=1.1,refcount_bits=8", false);
    ds(
        d,
        &["amend", "-o", "compat=0.10,refcount_bits=16", "d.qcow2"],
    )
    .ok();
    qemu(d, &["check", "-q", "d.qcow2"]).ok();
    qemu(d, &["compare", "-q", "src.qcow2", "d.qcow2"]).ok();
    let v = info("d.qcow2");
    assert_eq!(v["format-specific"]["data"]["compat"], "0.10", "{v}");
    assert_eq!(v["format-specific"]["data"]["refcount-bits"], 16, "{v}");
    // Narrower than a refcount in use (an internal snapshot shares clusters): refused.
    pair("compat=1.1", false);
    qemu(d, &["snapshot", "-c", "s1", "d.qcow2"]).ok();
    let before = read(&d.join("d.qcow2"));
    let r = ds(d, &["amend", "-o", "refcount_bits=1", "d.qcow2"]).fails_naming("d.qcow2");
    assert!(
        r.stderr
            .contains("Cannot decrease refcount entry width to 1 bits: Cluster at offset"),
        "{}",
        r.desc
    );
    assert_eq!(read(&d.join("d.qcow2")), before);
    ds(d, &["amend", "-o", "refcount_bits=2", "d.qcow2"]).ok();
    qemu(d, &["check", "-q", "d.qcow2"]).ok();
    // A backing change is `rebase -u`, byte for byte.
    pair("compat=1.1", true);
    qemu(d, &["create", "-q", "-f", "raw", "other.raw", "1M"]).ok();
    qemu(
        d,
        &["rebase", "-u", "-b", "other.raw", "-F", "raw", "q.qcow2"],
    )
    .ok();
    ds(
        d,
        &[
            "amend",
            "-o",
            "backing_file=other.raw,backing_fmt=raw",
            "d.qcow2",
        ],
    )
    .ok();
    assert_same_bytes(&d.join("q.qcow2"), &d.join("d.qcow2"), "amend backing_file");
    qemu(d, &["check", "-q", "d.qcow2"]).ok();
    // Refused by both, with the file untouched: (create options, amend options, our message).
    let refused: &[(&str, &str, &str)] = &[
        (
            "extended_l2=on",
            "compat=0.10",
            "incompatible features 0x10",
        ),
        (
            "refcount_bits=8",
            "compat=0.10",
            "requires refcount_bits=16",
        ),
        ("compat=0.10", "lazy_refcounts=on", "Lazy refcounts only"),
        (
            "compat=0.10",
            "refcount_bits=8",
            "Refcount widths other than 16 bits",
        ),
        (
            "compat=1.1",
            "cluster_size=4k",
            "only supported for image creation",
        ),
        (
            "compat=1.1",
            "extended_l2=on",
            "only supported for image creation",
        ),
        (
            "compat=1.1",
            "compression_type=zstd",
            "only supported for image creation",
        ),
        (
            "compat=1.1",
            "preallocation=full",
            "only supported for image creation",
        ),
        ("compat=1.1", "compat=1.2", "Unknown compatibility level"),
        ("compat=1.1", "foo=1", "Invalid parameter 'foo'"),
        ("compat=1.1", "data_file=x", "data_file"),
        ("compat=1.1", "refcount_bits=3", "must be a power of two"),
    ];
    for (create, opts, msg) in refused {
        pair(create, false);
        let before = read(&d.join("src.qcow2"));
        qemu(d, &["amend", "-f", "qcow2", "-o", opts, "q.qcow2"]).code_is(1);
        let r = ds(d, &["amend", "-f", "qcow2", "-o", opts, "d.qcow2"])
            .code_is(1)
            .fails_naming("d.qcow2");
        assert!(r.stderr.contains(msg), "{}", r.desc);
        assert_eq!(read(&d.join("q.qcow2")), before, "qemu-img changed {opts}");
        assert_eq!(read(&d.join("d.qcow2")), before, "we changed {opts}");
    }
    // zstd with compressed clusters cannot go back to v2 (QEMU's rule).
    pair("compression_type=zstd", false);
    qemu_io(d, "qcow2", "d.qcow2", &["write -c -P 3 0 64k"]);
    let before = read(&d.join("d.qcow2"));
    let r = ds(d, &["amend", "-o", "compat=0.10", "d.qcow2"]).code_is(1);
    assert!(r.stderr.contains("zstd compression type"), "{}", r.desc);
    assert_eq!(read(&d.join("d.qcow2")), before);
    // Other formats and a missing -o.
    qemu(d, &["create", "-q", "-f", "raw", "r.raw", "1M"]).ok();
    let r = ds(d, &["amend", "-f", "raw", "-o", "size=2M", "r.raw"]).code_is(1);
    assert!(
        r.stderr.contains("does not support option amendment"),
        "{}",
        r.desc
    );
    let r = ds(d, &["amend", "d.qcow2"]).code_is(1);
    assert!(r.stderr.contains("Must specify options (-o)"), "{}", r.desc);
}

/// A chain of `n` qcow2 images `l0.qcow2` (bottom) .. `l{n-1}.qcow2` (top), made with
/// `qemu-img create -u` (which does not open the chain).
fn deep_chain(dir: &Path, n: usize) {
    qemu(dir, &["create", "-q", "-f", "qcow2", "l0.qcow2", "1M"]).ok();
    for i in 1..n {
        let (b, t) = (format!("l{}.qcow2", i - 1), format!("l{i}.qcow2"));
        qemu(
            dir,
            &[
                "create", "-q", "-f", "qcow2", "-u", "-b", &b, "-F", "qcow2", &t, "1M",
            ],
        )
        .ok();
    }
}

/// Chains deeper than the limit (64 images by default, `--max-chain-depth N` or
/// `DISKSTREAM_MAX_CHAIN_DEPTH`) are refused with a message naming the top file, the limit
/// and the layer where it was reached.
#[test]
fn chain_depth_limit() {
    let dir = tmpdir();
    let d = dir.path();
    deep_chain(d, 65);
    let r = ds(d, &["info", "--backing-chain", "l64.qcow2"]).code_is(1);
    assert!(
        r.stderr
            .contains("l64.qcow2: backing chain deeper than 64 images (at 'l0.qcow2')"),
        "{}",
        r.desc
    );
    let r = ds(
        d,
        &["info", "--backing-chain", "--output=json", "l63.qcow2"],
    )
    .ok();
    assert_eq!(r.json().as_array().map(|a| a.len()), Some(64));
    let r = run_in(
        d,
        DISKSTREAM,
        &["--max-chain-depth", "100", "img", "map", "l64.qcow2"],
    );
    r.ok();
    let r = run_in(
        d,
        DISKSTREAM,
        &["--max-chain-depth", "10", "img", "map", "l10.qcow2"],
    )
    .code_is(1);
    assert!(
        r.stderr
            .contains("backing chain deeper than 10 images (at 'l0.qcow2')"),
        "{}",
        r.desc
    );
    // `serve` and `daemon` apply the same limit (they exit before serving anything).
    let r = run_in(
        d,
        "timeout",
        &[
            "60",
            DISKSTREAM,
            "--max-chain-depth",
            "10",
            "serve",
            "l10.qcow2",
        ],
    )
    .code_is(1);
    assert!(
        r.stderr
            .contains("l10.qcow2: backing chain deeper than 10 images (at 'l0.qcow2')"),
        "{}",
        r.desc
    );
    let r = run_in(
        d,
        "timeout",
        &[
            "60",
            DISKSTREAM,
            "--max-chain-depth",
            "10",
            "daemon",
            "--blockdev",
            "driver=qcow2,node-name=top,file.driver=file,file.filename=l10.qcow2",
            "--nbd-server",
            "none",
            "--monitor",
            "none",
        ],
    );
    assert!(
        r.code != 0
            && r.stderr
                .contains("l10.qcow2: backing chain deeper than 10 images (at 'l0.qcow2')"),
        "{}",
        r.desc
    );
    let out = std::process::Command::new(DISKSTREAM)
        .args(["img", "info", "l64.qcow2"])
        .env("DISKSTREAM_MAX_CHAIN_DEPTH", "65")
        .current_dir(d)
        .output()
        .expect("run");
    assert!(out.status.success(), "{out:?}");
}

/// Backing chains that loop (an image naming itself, two images naming each other) are
/// refused by every command with exit 1 and a message that says which link closes the loop;
/// no file is written.
#[test]
fn backing_loop_is_refused() {
    let dir = tmpdir();
    let d = dir.path();
    let mk = |name: &str, backing: &str| {
        qemu(
            d,
            &[
                "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "qcow2", name, "1M",
            ],
        )
        .ok();
    };
    // qemu-img refuses to make an image its own backing file; a header rewrite does it.
    mk("self.qcow2", "l.qcow2");
    ds(
        d,
        &[
            "rebase",
            "-u",
            "-b",
            "self.qcow2",
            "-F",
            "qcow2",
            "self.qcow2",
        ],
    )
    .ok();
    mk("a.qcow2", "b.qcow2");
    mk("b.qcow2", "a.qcow2");
    let files = ["self.qcow2", "a.qcow2", "b.qcow2"];
    let before: Vec<Vec<u8>> = files.iter().map(|f| read(&d.join(f))).collect();
    for (img, msg) in [
        (
            "self.qcow2",
            "self.qcow2: backing chain loop: 'self.qcow2' is its own backing file",
        ),
        (
            "a.qcow2",
            "a.qcow2: backing chain loop: 'b.qcow2' names 'a.qcow2' as its backing file, \
             which is already in the chain above it",
        ),
    ] {
        for args in [
            vec!["info", "--backing-chain", img],
            vec!["map", img],
            vec!["compare", img, img],
            vec!["convert", "-O", "raw", img, "out.raw"],
            vec!["commit", img],
            vec!["resize", img, "+1M"],
            vec!["amend", "-o", "lazy_refcounts=on", img],
            vec!["rebase", "-b", "", img],
        ] {
            let r = ds(d, &args);
            let want = if args[0] == "compare" { 2 } else { 1 };
            let r = r.code_is(want);
            assert!(r.stderr.contains(msg), "{}", r.desc);
            assert!(!r.stderr.trim_end().contains('\n'), "{}", r.desc);
        }
    }
    for (f, b) in files.iter().zip(&before) {
        assert_eq!(&read(&d.join(f)), b, "{f} was changed");
    }
    assert!(!d.join("out.raw").exists());
}

/// An overlay that does not record its backing file's format is refused (formats are never
/// guessed) unless `--backing-format` names it; then it reads as qemu-img shows it.
#[test]
fn backing_format_option() {
    let dir = tmpdir();
    let d = dir.path();
    qemu(d, &["create", "-q", "-f", "raw", "base.raw", "1M"]).ok();
    qemu_io(d, "raw", "base.raw", &["write -P 5 0 128k"]);
    qemu(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "top.qcow2",
        ],
    )
    .ok();
    qemu_io(d, "qcow2", "top.qcow2", &["write -P 6 64k 64k"]);
    // Drop the backing-format extension (the first one, right after the 112-byte v3 header):
    // an extension of type 0 ends the list.
    let mut b = read(&d.join("top.qcow2"));
    assert_eq!(b[112..116], [0xe2, 0x79, 0x2a, 0xca]);
    b[112..116].copy_from_slice(&[0, 0, 0, 0]);
    let strip = || std::fs::write(d.join("top.qcow2"), &b).expect("write");
    strip();
    let info = qemu(d, &["info", "--output=json", "top.qcow2"]).ok().json();
    assert!(info.get("backing-filename-format").is_none(), "{info}");
    let cmds: &[&[&str]] = &[
        &["info", "top.qcow2"],
        &["map", "--output=json", "top.qcow2"],
        &["compare", "top.qcow2", "top.qcow2"],
        &["convert", "-O", "raw", "top.qcow2", "out.raw"],
        &["check", "top.qcow2"],
        &["rebase", "-b", "base.raw", "-F", "raw", "top.qcow2"],
        &["amend", "-o", "lazy_refcounts=on", "top.qcow2"],
        &["commit", "-d", "top.qcow2"],
    ];
    for args in cmds {
        let with: Vec<&str> = std::iter::once(args[0])
            .chain(["--backing-format", "raw"])
            .chain(args[1..].iter().copied())
            .collect();
        // Each command starts from the overlay without the extension (rebase records one).
        strip();
        if args[0] != "check" {
            let r = ds(d, args).code_is(if args[0] == "compare" { 2 } else { 1 });
            assert!(
                r.stderr
                    .contains("does not record the format of its backing file"),
                "{}",
                r.desc
            );
        }
        if args[0] == "map" {
            let ours = ds(d, &with).ok().json();
            let theirs = qemu(d, &["map", "--output=json", "top.qcow2"]).ok().json();
            assert_eq!(ours, theirs);
        } else {
            ds(d, &with).ok();
        }
    }
    // `commit` wrote the overlay's data into the base: it now reads as the conversion did.
    qemu(
        d,
        &["compare", "-f", "raw", "-F", "raw", "out.raw", "base.raw"],
    )
    .ok();
    qemu(d, &["check", "top.qcow2"]).ok();
}

/// `convert -p` draws its progress bar only on a terminal: nothing on a piped stderr, a bar
/// under a pseudo-terminal (`script -qc`).
#[test]
fn convert_progress_only_on_a_terminal() {
    let dir = tmpdir();
    let d = dir.path();
    qemu(d, &["create", "-q", "-f", "qcow2", "src.qcow2", "8M"]).ok();
    qemu_io(d, "qcow2", "src.qcow2", &["write -P 1 0 4M"]);
    let r = ds(d, &["convert", "-p", "-O", "raw", "src.qcow2", "piped.raw"]).ok();
    assert_eq!(r.stderr, "", "{}", r.desc);
    let cmd = format!("{DISKSTREAM} img convert -p -O raw src.qcow2 tty.raw");
    let r = run_in(d, "script", &["-qec", &cmd, "/dev/null"]).ok();
    assert!(
        r.stdout.contains('%') && r.stdout.contains("8.00 MiB"),
        "no progress bar drawn under a terminal:\n{}",
        r.desc
    );
    qemu(d, &["compare", "-F", "raw", "src.qcow2", "tty.raw"]).ok();
}

/// The corrupt bit through the CLI: reading commands work, writing ones are refused with one
/// line and write nothing, `check -r all` clears the bit (as `qemu-img check -r all` does, same
/// bytes), and the image is writable again.
#[test]
fn corrupt_bit_cli() {
    let dir = tmpdir();
    let d = dir.path();
    qemu(d, &["create", "-q", "-f", "qcow2", "c.qcow2", "1M"]).ok();
    qemu_io(d, "qcow2", "c.qcow2", &["write -P 3 0 64k"]);
    let mut b = read(&d.join("c.qcow2"));
    b[79] |= 2;
    std::fs::write(d.join("c.qcow2"), &b).expect("write");
    copy(&d.join("c.qcow2"), &d.join("q.qcow2"));
    let info = ds(d, &["info", "--output=json", "c.qcow2"]).ok().json();
    assert_eq!(info["format-specific"]["data"]["corrupt"], true, "{info}");
    ds(d, &["convert", "-O", "raw", "c.qcow2", "c.raw"]).ok();
    let r = ds(d, &["resize", "c.qcow2", "2M"]).fails_naming("c.qcow2");
    assert!(r.stderr.contains("marked corrupt"), "{}", r.desc);
    assert_eq!(read(&d.join("c.qcow2")), b);
    ds(d, &["check", "-r", "all", "c.qcow2"]).ok();
    qemu(d, &["check", "-r", "all", "q.qcow2"]).ok();
    assert_same_bytes(&d.join("q.qcow2"), &d.join("c.qcow2"), "check -r all");
    assert_eq!(read(&d.join("c.qcow2"))[79] & 2, 0);
    qemu(d, &["check", "c.qcow2"]).ok();
    ds(d, &["resize", "c.qcow2", "2M"]).ok();
    qemu(d, &["compare", "-f", "raw", "c.raw", "q.qcow2"]).ok();
}
