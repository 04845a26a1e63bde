//! `diskstream img amend`: change format options of an existing qcow2 image in place.
//!
//! Supported: `compat` (0.10/v2, 1.1/v3: upgrade, and downgrade where QEMU 10 allows it),
//! `lazy_refcounts`, `size`, `refcount_bits`, and `backing_file` /
//! `backing_fmt`. The last two go beyond qemu-img 10, which refuses to change them with
//! "Cannot amend the backing file": here they rewrite the header exactly as
//! `rebase -u -b FILE -F FMT` does. Every option is parsed and every refusal decided before
//! anything is written, so a refused amend leaves the file byte-identical.

use super::opts::{parse_bool, parse_kv, parse_size};
use super::{open_top, parse_format, ChainArgs};
use anyhow::{anyhow, bail, Result};
use clap::Args;
use diskstream_block::format::qcow2::amend::AmendOptions;
use diskstream_block::format::qcow2::Qcow2;
use std::path::PathBuf;

/// Arguments of `amend`.
#[derive(Args)]
pub struct AmendArgs {
    /// Image format (probed if omitted; only qcow2 supports amendment).
    #[arg(short = 'f')]
    fmt: Option<String>,
    /// Options: compat, lazy_refcounts, size, refcount_bits, backing_file, backing_fmt.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Accepted for qemu-img compatibility (it concerns LUKS key slots, which diskstream does
    /// not support).
    #[arg(long)]
    force: bool,
    /// Show progress (accepted; amend prints nothing).
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    #[command(flatten)]
    chain: ChainArgs,
    /// Image file.
    pub(crate) file: PathBuf,
}

/// Options qemu-img accepts only when creating an image.
const CREATE_ONLY: [&str; 6] = [
    "cluster_size",
    "extended_l2",
    "compression_type",
    "encryption",
    "preallocation",
    "encrypt.format",
];

/// The parsed `-o` list.
#[derive(Default)]
struct Plan {
    amend: AmendOptions,
    size: Option<u64>,
    backing_file: Option<String>,
    backing_fmt: Option<String>,
}

fn parse_plan(options: &[String]) -> Result<Plan> {
    let kv = parse_kv(options)?;
    if kv.is_empty() {
        bail!("Must specify options (-o)");
    }
    let mut p = Plan::default();
    for (k, v) in &kv {
        match k.as_str() {
            "compat" => {
                p.amend.version = Some(match v.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => bail!("Unknown compatibility level {v}"),
                })
            }
            "lazy_refcounts" => p.amend.lazy_refcounts = Some(parse_bool(k, v)?),
            "size" => {
                p.size = Some(parse_size(v).map_err(|_| {
                    anyhow!(
                        "Parameter 'size' expects a non-negative number below 2^64 (optional \
                         suffix k, M, G, T, P or E)"
                    )
                })?)
            }
            "refcount_bits" => {
                let n: u32 = v
                    .parse()
                    .map_err(|_| anyhow!("Parameter 'refcount_bits' expects a number"))?;
                if !n.is_power_of_two() || n > 64 {
                    bail!("Refcount width must be a power of two and may be at most 64 bits");
                }
                p.amend.refcount_bits = Some(n);
            }
            "backing_file" => p.backing_file = Some(v.clone()),
            "backing_fmt" => {
                parse_format(v)?;
                p.backing_fmt = Some(v.clone());
            }
            "data_file" | "data_file_raw" => {
                bail!("Invalid parameter '{k}': external data files are not supported")
            }
            k if k.starts_with("encrypt.") && !CREATE_ONLY.contains(&k) => {
                bail!("Invalid parameter '{k}': encryption is not supported")
            }
            k if CREATE_ONLY.contains(&k) => {
                bail!("Invalid parameter '{k}': this option is only supported for image creation")
            }
            _ => bail!("Invalid parameter '{k}'"),
        }
    }
    Ok(p)
}

/// Run `amend`.
pub async fn amend(a: AmendArgs) -> Result<()> {
    let _ = (a.force, a.progress, a.quiet);
    let plan = parse_plan(&a.options)?;
    if let Some(f) = a.fmt.as_deref() {
        let fmt = parse_format(f)?;
        if fmt.name() != "qcow2" {
            bail!(
                "Format driver '{}' does not support option amendment",
                fmt.name()
            );
        }
    }
    let changes_backing = plan.backing_file.is_some() || plan.backing_fmt.is_some();
    // A backing change is a header rewrite (as `rebase -u`): the old chain may be missing.
    let node = open_top(&a.file, a.fmt.as_deref(), false, changes_backing, &a.chain).await?;
    let Some(q) = node.as_any().downcast_ref::<Qcow2>() else {
        bail!(
            "Format driver '{}' does not support option amendment",
            node.format_name()
        );
    };
    let h = q.header().await;
    let new_backing = if changes_backing {
        let name = match &plan.backing_file {
            Some(b) => b.clone(),
            None => h.backing_file.clone().ok_or_else(|| {
                anyhow!("backing_fmt given but the image has no backing file (set backing_file)")
            })?,
        };
        if name.is_empty() {
            if plan.backing_fmt.is_some() {
                bail!("backing_fmt given with an empty backing_file");
            }
            Some(None)
        } else {
            let fmt = plan.backing_fmt.clone().or_else(|| {
                // Keeping the name keeps its recorded format; a new name needs one.
                plan.backing_file
                    .is_none()
                    .then(|| h.backing_format.clone())
                    .flatten()
            });
            let Some(fmt) = fmt else {
                bail!(
                    "backing_file given without backing_fmt (formats are never guessed; add \
                     backing_fmt=FMT)"
                );
            };
            if name.len() > 1023 {
                bail!("backing file name is longer than 1023 bytes");
            }
            Some(Some((name, Some(fmt))))
        }
    } else {
        None
    };
    q.amend_check(&plan.amend)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    if let Some(size) = plan.size {
        if size == 0 || size % 512 != 0 {
            bail!("Invalid size {size}: must be a positive multiple of 512");
        }
    }
    // Everything is decided: write. The size goes first (a shrink over used clusters is
    // refused before anything is written), then the backing link, then `amend` (upgrade, lazy
    // refcounts, downgrade, in QEMU's order); the results do not depend on this order.
    if let Some(size) = plan.size {
        if size != node.size() {
            node.truncate(size).await.map_err(|e| anyhow!("{e}"))?;
        }
    }
    if let Some(b) = new_backing {
        q.set_backing_file(b)
            .await
            .map_err(|e| anyhow!("Could not change the backing file: {e}"))?;
    }
    q.amend(&plan.amend).await.map_err(|e| anyhow!("{e}"))?;
    node.close().await.map_err(|e| anyhow!("{e}"))
}
