//! The QMP commands: argument schemas (validated before any side effect, with QEMU's texts)
//! and their implementations.

use crate::error::{ErrorClass, QmpError, QmpResult};
use crate::export;
use crate::monitor::{package, Monitor, QEMU_VERSION};
use crate::schema::{check_blockdev_options, check_object, opt, req, Member, Ty, ON_ERROR};
use crate::stream_cmd;
use crate::{mirror_cmd, snapshot_cmd, switch_cmd};
use diskstream_jobs::job::JobInfo;
use diskstream_jobs::Job;
use serde_json::{json, Map, Value};
use std::sync::Arc;

const NONE: &[Member] = &[];
const DEVICE: &[Member] = &[req("device", Ty::Str)];
const ID: &[Member] = &[req("id", Ty::Str)];

/// `block-stream`'s arguments.
pub const BLOCK_STREAM: &[Member] = &[
    opt("job-id", Ty::Str),
    req("device", Ty::Str),
    opt("base", Ty::Str),
    opt("base-node", Ty::Str),
    opt("backing-file", Ty::Str),
    opt("backing-mask-protocol", Ty::Bool),
    opt("bottom", Ty::Str),
    opt("speed", Ty::Int),
    opt("on-error", ON_ERROR),
    opt("filter-node-name", Ty::Str),
    opt("auto-finalize", Ty::Bool),
    opt("auto-dismiss", Ty::Bool),
];

/// `blockdev-snapshot-sync`'s arguments.
const BLOCKDEV_SNAPSHOT_SYNC: &[Member] = &[
    opt("device", Ty::Str),
    opt("node-name", Ty::Str),
    req("snapshot-file", Ty::Str),
    opt("snapshot-node-name", Ty::Str),
    opt("format", Ty::Str),
    opt("mode", Ty::Enum(&["existing", "absolute-paths"])),
];

const LEGACY_BLOCK_STREAM: &[Member] = &[
    req("device", Ty::Str),
    opt("all", Ty::Bool),
    opt("stop", Ty::Bool),
    opt("base", Ty::Str),
];

/// How a command's arguments are validated.
#[derive(Clone, Copy)]
enum Args {
    /// A struct with these members.
    Members(&'static [Member]),
    /// `BlockdevOptions` (the `blockdev-add` union).
    Blockdev,
    /// `BlockExportOptions` (the `block-export-add` union).
    Export,
}

/// Every command of the monitor and its argument schema.
const COMMANDS: &[(&str, Args)] = &[
    (
        "qmp_capabilities",
        Args::Members(&[opt("enable", Ty::List(&Ty::Enum(&["oob"])))]),
    ),
    ("query-version", Args::Members(NONE)),
    ("query-commands", Args::Members(NONE)),
    ("quit", Args::Members(NONE)),
    ("blockdev-add", Args::Blockdev),
    ("blockdev-del", Args::Members(&[req("node-name", Ty::Str)])),
    (
        "query-named-block-nodes",
        Args::Members(&[opt("flat", Ty::Bool)]),
    ),
    ("query-block", Args::Members(NONE)),
    ("x-query-cor-stats", Args::Members(NONE)),
    ("block-stream", Args::Members(BLOCK_STREAM)),
    (
        "blockdev-snapshot-sync",
        Args::Members(BLOCKDEV_SNAPSHOT_SYNC),
    ),
    (
        "blockdev-snapshot",
        Args::Members(&[req("node", Ty::Str), req("overlay", Ty::Str)]),
    ),
    (
        "x-blockdev-switch",
        Args::Members(switch_cmd::BLOCKDEV_SWITCH),
    ),
    ("block-commit", Args::Members(mirror_cmd::BLOCK_COMMIT)),
    (
        "blockdev-mirror",
        Args::Members(mirror_cmd::BLOCKDEV_MIRROR),
    ),
    ("drive-mirror", Args::Members(mirror_cmd::DRIVE_MIRROR)),
    (
        "block-job-change",
        Args::Members(mirror_cmd::BLOCK_JOB_CHANGE),
    ),
    (
        "block-job-set-speed",
        Args::Members(&[req("device", Ty::Str), req("speed", Ty::Int)]),
    ),
    (
        "block-job-cancel",
        Args::Members(&[req("device", Ty::Str), opt("force", Ty::Bool)]),
    ),
    ("block-job-pause", Args::Members(DEVICE)),
    ("block-job-resume", Args::Members(DEVICE)),
    ("block-job-complete", Args::Members(DEVICE)),
    ("block-job-finalize", Args::Members(ID)),
    ("block-job-dismiss", Args::Members(ID)),
    ("job-pause", Args::Members(ID)),
    ("job-resume", Args::Members(ID)),
    ("job-cancel", Args::Members(ID)),
    ("job-complete", Args::Members(ID)),
    ("job-finalize", Args::Members(ID)),
    ("job-dismiss", Args::Members(ID)),
    ("query-block-jobs", Args::Members(NONE)),
    ("query-jobs", Args::Members(NONE)),
    ("block_stream", Args::Members(LEGACY_BLOCK_STREAM)),
    ("query-block-stream", Args::Members(NONE)),
    ("nbd-server-start", Args::Members(export::NBD_SERVER_START)),
    ("nbd-server-stop", Args::Members(NONE)),
    ("block-export-add", Args::Export),
    ("block-export-del", Args::Members(export::BLOCK_EXPORT_DEL)),
    ("query-block-exports", Args::Members(NONE)),
    ("nbd-server-add", Args::Members(export::NBD_SERVER_ADD)),
    (
        "nbd-server-remove",
        Args::Members(export::NBD_SERVER_REMOVE),
    ),
];

/// `qmp_capabilities` (the only command before negotiation); returns whether OOB was
/// enabled. OOB is offered and accepted as QSD does (qemu.qmp enables it whenever offered),
/// although no command supports it.
pub fn qmp_capabilities(mut args: Map<String, Value>) -> QmpResult<bool> {
    check_object(
        &mut args,
        &[opt("enable", Ty::List(&Ty::Enum(&["oob"])))],
        "",
        false,
    )?;
    Ok(matches!(args.get("enable"), Some(Value::Array(caps)) if !caps.is_empty()))
}

fn str_arg<'a>(a: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    a.get(k).and_then(|v| v.as_str())
}

fn bool_arg(a: &Map<String, Value>, k: &str) -> Option<bool> {
    a.get(k).and_then(|v| v.as_bool())
}

/// `block-job-*` lookup: `DeviceNotActive` when missing, as QEMU.
fn block_job(mon: &Monitor, id: &str) -> QmpResult<Arc<Job>> {
    mon.jobs.find(id).ok_or_else(|| {
        QmpError::new(
            ErrorClass::DeviceNotActive,
            format!("Block job '{id}' not found"),
        )
    })
}

/// `job-*` lookup: `GenericError` "Job not found".
fn any_job(mon: &Monitor, id: &str) -> QmpResult<Arc<Job>> {
    mon.jobs
        .find(id)
        .ok_or_else(|| QmpError::generic("Job not found"))
}

fn block_job_info(i: &JobInfo) -> Value {
    let mut v = json!({
        "auto-finalize": i.auto_finalize,
        "io-status": i.io_status.as_str(),
        "device": i.id,
        "auto-dismiss": i.auto_dismiss,
        "busy": i.busy,
        "len": i.total,
        "offset": i.current,
        "status": i.status.as_str(),
        "paused": i.paused,
        "speed": i.speed,
        "ready": matches!(i.status, diskstream_jobs::JobStatus::Ready | diskstream_jobs::JobStatus::Standby),
        "type": i.job_type.as_str(),
    });
    if let (Some(e), Some(o)) = (&i.error, v.as_object_mut()) {
        o.insert("error".into(), json!(e));
    }
    // Only the `mirror` branch of BlockJobInfo has it (not active commit).
    let synced = i
        .actively_synced
        .filter(|_| i.job_type == diskstream_jobs::JobType::Mirror);
    if let (Some(a), Some(o)) = (synced, v.as_object_mut()) {
        o.insert("actively-synced".into(), json!(a));
    }
    v
}

fn job_info(i: &JobInfo) -> Value {
    let mut v = json!({
        "current-progress": i.current,
        "status": i.status.as_str(),
        "total-progress": i.total,
        "type": i.job_type.as_str(),
        "id": i.id,
    });
    if let (Some(e), Some(o)) = (&i.error, v.as_object_mut()) {
        o.insert("error".into(), json!(e));
    }
    v
}

/// Names of every command currently available.
pub fn command_names(mon: &Monitor) -> Vec<String> {
    let _ = mon;
    COMMANDS.iter().map(|(n, _)| n.to_string()).collect()
}

/// Validate and run a command (negotiation already done).
pub async fn dispatch(
    mon: &Arc<Monitor>,
    cmd: &str,
    mut args: Map<String, Value>,
) -> QmpResult<Value> {
    let schema = COMMANDS.iter().find(|(n, _)| *n == cmd).map(|(_, s)| *s);
    let Some(schema) = schema else {
        return Err(QmpError::new(
            ErrorClass::CommandNotFound,
            format!("The command {cmd} has not been found"),
        ));
    };
    match schema {
        Args::Members(members) => check_object(&mut args, members, "", false)?,
        Args::Blockdev => check_blockdev_options(&mut args, "", false)?,
        Args::Export => export::check_export_options(&mut args, false)?,
    }
    let a = &args;
    match cmd {
        "query-version" => {
            let (ma, mi, mc) = QEMU_VERSION;
            Ok(json!({"qemu": {"micro": mc, "minor": mi, "major": ma}, "package": package()}))
        }
        "query-commands" => Ok(Value::Array(
            command_names(mon)
                .into_iter()
                .map(|n| json!({"name": n}))
                .collect(),
        )),
        "quit" => Ok(json!({})),
        "blockdev-add" => {
            mon.graph.lock().await.blockdev_add(a).await?;
            Ok(json!({}))
        }
        "blockdev-del" => {
            let name = str_arg(a, "node-name").unwrap_or_default();
            mon.graph.lock().await.blockdev_del(name).await?;
            Ok(json!({}))
        }
        "query-named-block-nodes" => {
            let flat = bool_arg(a, "flat").unwrap_or(false);
            Ok(mon.graph.lock().await.query_named_block_nodes(flat).await)
        }
        "query-block" => Ok(json!([])),
        "x-query-cor-stats" => Ok(mon.graph.lock().await.query_cor_stats()),
        "block-stream" => stream_cmd::block_stream(mon, a).await,
        "blockdev-snapshot-sync" => snapshot_cmd::blockdev_snapshot_sync(mon, a).await,
        "blockdev-snapshot" => snapshot_cmd::blockdev_snapshot(mon, a).await,
        "x-blockdev-switch" => switch_cmd::blockdev_switch(mon, a).await,
        "block-commit" => mirror_cmd::block_commit(mon, a).await,
        "blockdev-mirror" => mirror_cmd::blockdev_mirror(mon, a).await,
        "drive-mirror" => mirror_cmd::drive_mirror(mon, a).await,
        "block-job-change" => mirror_cmd::block_job_change(mon, a).await,
        "block_stream" => stream_cmd::legacy_block_stream(mon, a).await,
        "query-block-stream" => Ok(stream_cmd::query_block_stream(mon)),
        "nbd-server-start"
        | "nbd-server-stop"
        | "block-export-add"
        | "block-export-del"
        | "query-block-exports"
        | "nbd-server-add"
        | "nbd-server-remove" => export::dispatch(mon, cmd, a).await,
        "block-job-set-speed" => {
            let job = block_job(mon, str_arg(a, "device").unwrap_or_default())?;
            job.set_speed(a.get("speed").and_then(|v| v.as_i64()).unwrap_or(0))?;
            Ok(json!({}))
        }
        "block-job-cancel" => {
            let id = str_arg(a, "device").unwrap_or_default();
            let job = block_job(mon, id)?;
            if job.user_paused() && !bool_arg(a, "force").unwrap_or(false) {
                return Err(diskstream_jobs::JobError::CurrentlyPaused(id.to_string()).into());
            }
            job.cancel_with(bool_arg(a, "force").unwrap_or(false))
                .await?;
            Ok(json!({}))
        }
        "job-cancel" => {
            any_job(mon, str_arg(a, "id").unwrap_or_default())?
                .cancel()
                .await?;
            Ok(json!({}))
        }
        "block-job-pause" | "job-pause" => {
            let job = job_for(mon, cmd, a)?;
            job.user_pause().await?;
            Ok(json!({}))
        }
        "block-job-resume" | "job-resume" => {
            job_for(mon, cmd, a)?.user_resume()?;
            Ok(json!({}))
        }
        "block-job-complete" | "job-complete" => {
            job_for(mon, cmd, a)?.complete()?;
            Ok(json!({}))
        }
        "block-job-finalize" | "job-finalize" => {
            job_for(mon, cmd, a)?.finalize().await?;
            Ok(json!({}))
        }
        "block-job-dismiss" | "job-dismiss" => {
            job_for(mon, cmd, a)?.dismiss()?;
            Ok(json!({}))
        }
        "query-block-jobs" => Ok(Value::Array(
            mon.jobs
                .list()
                .iter()
                .map(|j| block_job_info(&j.info()))
                .collect(),
        )),
        "query-jobs" => Ok(Value::Array(
            mon.jobs
                .list()
                .iter()
                .map(|j| job_info(&j.info()))
                .collect(),
        )),
        _ => Err(QmpError::new(
            ErrorClass::CommandNotFound,
            format!("The command {cmd} has not been found"),
        )),
    }
}

fn job_for(mon: &Monitor, cmd: &str, a: &Map<String, Value>) -> QmpResult<Arc<Job>> {
    if cmd.starts_with("block-job-") {
        // finalize/dismiss take `id` even in their block-job-* spelling.
        let id = str_arg(a, "device")
            .or_else(|| str_arg(a, "id"))
            .unwrap_or_default();
        block_job(mon, id)
    } else {
        any_job(mon, str_arg(a, "id").unwrap_or_default())
    }
}
