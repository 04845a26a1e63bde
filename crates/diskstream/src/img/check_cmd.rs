//! `img check`: run the qcow2 or QED consistency check and print it the way qemu-img does.

use super::{parse_format, CheckArgs, Output};
use diskstream_block::format::Format;
use diskstream_block::image;
use serde_json::json;
use std::sync::Arc;

/// Run `check`; returns qemu-img's exit code (0 clean, 1 error, 2 corruptions, 3 leaks, 63 unsupported).
pub async fn check(a: CheckArgs) -> u8 {
    use diskstream_block::format::qcow2::check::{self as qcheck, RepairMode};
    use diskstream_block::protocol::{file::FileProtocol, Protocol};
    let fail = |e: String| {
        eprintln!(
            "diskstream: {}",
            super::name_file(&a.file, anyhow::anyhow!("{e}"))
        );
        1u8
    };
    let repair = match a.repair.as_deref() {
        None => RepairMode::None,
        Some("leaks") => RepairMode::Leaks,
        Some("all") => RepairMode::All,
        Some(o) => return fail(format!("Unknown option for -r: '{o}' (leaks or all)")),
    };
    let format = match a.fmt.as_deref().map(parse_format).transpose() {
        Ok(Some(f)) => f,
        Ok(None) => match image::probe(&a.file).await {
            Ok(f) => f,
            Err(e) => return fail(e.to_string()),
        },
        Err(e) => return fail(e.to_string()),
    };
    if format == Format::Raw {
        eprintln!("diskstream: This image format does not support checks");
        return 63;
    }
    // The check reads the named image only (as its metadata is all it checks), so the chain
    // options (`--backing-format`) are accepted for uniformity and have nothing to do.
    let _ = &a.chain;
    let ro = matches!(repair, RepairMode::None);
    let file: Arc<dyn Protocol> = match FileProtocol::open(&a.file, ro) {
        Ok(f) => Arc::new(f),
        Err(e) => return fail(e.to_string()),
    };
    let checked = match format {
        Format::Qed => diskstream_block::format::qed::check::check(file, repair).await,
        _ => qcheck::check(file, repair).await,
    };
    let r = match checked {
        Ok(r) => r,
        Err(e) => return fail(format!("Check failed: {e}")),
    };
    // Like qemu-img, the per-cluster findings go to stderr, whatever the output format; the
    // repair summary ("The following inconsistencies were found and repaired: ... Double
    // checking the fixed image now...") goes to stdout, in human output only.
    let mut in_summary = false;
    for m in &r.messages {
        if m.starts_with("The following inconsistencies were found and repaired") {
            in_summary = true;
        }
        if in_summary {
            if a.output == Output::Human && !a.quiet {
                println!("{m}");
            }
            if m.starts_with("Double checking the fixed image now") {
                in_summary = false;
            }
        } else {
            eprintln!("{m}");
        }
    }
    if repair != RepairMode::None && r.check_errors > 0 {
        // qemu-img: a repair that would need a rebuild it may not do fails the whole check.
        return fail(
            "Check failed: the refcount structures need to be rebuilt (use -r all)".to_string(),
        );
    }
    match a.output {
        Output::Json => {
            let mut v = json!({
                "check-errors": r.check_errors,
                "filename": a.file.display().to_string(),
                "format": format.name(),
            });
            // qemu-img leaves out the optional counts that are zero.
            for (k, n) in [
                ("image-end-offset", r.image_end_offset),
                ("total-clusters", r.total_clusters),
                ("allocated-clusters", r.allocated_clusters),
                ("fragmented-clusters", r.fragmented_clusters),
                ("compressed-clusters", r.compressed_clusters),
                ("corruptions", r.corruptions),
                ("leaks", r.leaks),
                ("corruptions-fixed", r.corruptions_fixed),
                ("leaks-fixed", r.leaks_fixed),
            ] {
                if n > 0 {
                    v[k] = json!(n);
                }
            }
            println!("{}", super::qemu_json(&v));
        }
        Output::Human if !a.quiet => {
            if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
                println!("No errors were found on the image.");
            } else {
                if r.corruptions > 0 {
                    println!(
                        "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
                        r.corruptions
                    );
                }
                if r.leaks > 0 {
                    println!(
                        "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
                        r.leaks
                    );
                }
            }
            // As qemu-img: statistics only when something is allocated.
            if r.total_clusters > 0 && r.allocated_clusters > 0 {
                let pct = |n: u64| n as f64 * 100.0 / r.total_clusters as f64;
                let alloc = r.allocated_clusters.max(1) as f64;
                println!(
                    "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
                    r.allocated_clusters,
                    r.total_clusters,
                    pct(r.allocated_clusters),
                    r.fragmented_clusters as f64 * 100.0 / alloc,
                    r.compressed_clusters as f64 * 100.0 / alloc
                );
            }
            // Only qcow2 knows where its image ends (qemu-img prints nothing for QED).
            if format == Format::Qcow2 {
                println!("Image end offset: {}", r.image_end_offset);
            }
        }
        Output::Human => {}
    }
    r.exit_code() as u8
}
