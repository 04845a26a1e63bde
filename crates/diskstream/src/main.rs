//! `diskstream`: the command-line front end.
//!
//! `diskstream img ...` follows qemu-img's conventions (`-f`, `-F`, `-b`, `-o k=v,...`, `-p`,
//! `--output=json`) so scripts written for qemu-img work with few changes. The front end only
//! translates arguments and prints results; all image logic lives in `diskstream-block`.

mod copy;
mod daemon;
mod demo;
mod img;
mod migrate;
mod serve;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// diskstream: a virtual-disk engine (qcow2/raw images, backing chains, streaming).
#[derive(Parser)]
#[command(name = "diskstream", version, about)]
struct Cli {
    /// Allow backing files only from this directory or URL scheme (`nbd://`, `https://`, ...);
    /// repeatable (before the subcommand). Also `DISKSTREAM_BACKING_ALLOW` (colon-separated).
    /// Without either, any backing file an image names is followed.
    #[arg(long = "backing-allow", value_name = "DIR|SCHEME://")]
    backing_allow: Vec<String>,
    /// Refuse backing chains of more than N images, the top one included (before the
    /// subcommand; img commands, serve and daemon). Also `DISKSTREAM_MAX_CHAIN_DEPTH`.
    /// Default 64.
    #[arg(long = "max-chain-depth", value_name = "N")]
    max_chain_depth: Option<usize>,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Image utilities (qemu-img compatible): create, info, map, check, compare, convert, rebase, commit, resize, amend.
    Img {
        #[command(subcommand)]
        cmd: img::ImgCommand,
    },
    /// Export an image over NBD (qemu-nbd compatible options).
    Serve(serve::ServeArgs),
    /// Run the storage daemon (qemu-storage-daemon compatible QMP control socket and NBD exports).
    ///
    /// With no arguments: QMP on $XDG_RUNTIME_DIR/diskstream/qmp.sock (or
    /// /tmp/diskstream-$UID/qmp.sock) and an NBD server on 127.0.0.1:10809.
    Daemon {
        /// qemu-storage-daemon style options: --blockdev, --chardev, --monitor, --nbd-server
        /// (addr.type=unix,addr.path=P | addr.type=inet,addr.host=H,addr.port=N | none),
        /// --export type=nbd,id=ID,node-name=NODE[,writable=on][,name=NAME], --object
        /// tls-creds-x509,..., --pidfile, --daemonize, --stream-chunk-size, --stream-parallel, --stream-busy-parallel, --stream-checkpoint.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Live block copy of a daemon's device (the seeds' recipe): create DEST backed by the
    /// node's image, switch the device to it (x-blockdev-switch), stream down to --base.
    Copy(copy::CopyArgs),
    /// Post-copy block migration of a disk between two daemons over NBD, driven over QMP.
    ///
    /// The destination gets a qcow2 backed by the source's NBD export, exported writable for the
    /// guest; it then streams the data in (copy-on-read keeps guest reads fast) and drops the
    /// backing link. Exit codes: 0 done, 1 setup failed, 2 the stream failed or was cancelled,
    /// 3 stopped on errors (job paused, resumable), 4 a daemon's QMP connection was lost.
    Migrate(migrate::MigrateArgs),
    /// Walk through the engine on built-in defaults: build a 3-layer chain, write, map, flatten, verify, check.
    Demo {
        /// Directory for the demo images (default: a fresh directory under $TMPDIR).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    // Like qemu-img and every Unix filter: a closed stdout (`diskstream img map ... | head`) ends
    // the process quietly instead of making each print fail.
    // SAFETY: called before any other thread exists; SIG_DFL is a valid disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DISKSTREAM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // `nbd://` / `nbd+unix://` names work wherever an image or backing file name does.
    diskstream_nbd::client::register_url_opener(diskstream_nbd::client::OpenerConfig::from_env());
    // `http://`, `https://` and `s3://` objects as read-only images and backing files.
    diskstream_http::register_url_opener(diskstream_http::HttpConfig::from_env());
    let cli = Cli::parse();
    let mut allow = cli.backing_allow.clone();
    if let Ok(v) = std::env::var("DISKSTREAM_BACKING_ALLOW") {
        // Split at ':' except inside "scheme://".
        let v = v.replace("://", "\u{1}");
        allow.extend(v.split(':').map(|e| e.replace('\u{1}', "://")));
    }
    if !allow.is_empty() {
        match diskstream_block::image::BackingPolicy::parse(&allow) {
            Ok(p) => {
                diskstream_block::image::set_backing_policy(p);
            }
            Err(e) => {
                eprintln!("diskstream: --backing-allow: {e}");
                return ExitCode::from(1);
            }
        }
    }
    let depth = match cli.max_chain_depth {
        Some(n) => Some(n),
        None => match std::env::var("DISKSTREAM_MAX_CHAIN_DEPTH") {
            Ok(v) => match v.trim().parse::<usize>() {
                Ok(n) => Some(n),
                Err(_) => {
                    eprintln!("diskstream: DISKSTREAM_MAX_CHAIN_DEPTH: '{v}' is not a number");
                    return ExitCode::from(1);
                }
            },
            Err(_) => None,
        },
    };
    if let Some(n) = depth {
        if n == 0 {
            eprintln!("diskstream: --max-chain-depth: must be at least 1");
            return ExitCode::from(1);
        }
        diskstream_block::image::set_max_depth(n);
    }
    if let Command::Daemon { args } = cli.cmd {
        // The daemon builds its own runtime: --daemonize must fork before threads exist.
        return ExitCode::from(daemon::main(args));
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("diskstream: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = rt.block_on(async {
        match cli.cmd {
            Command::Img { cmd } => img::run(cmd).await,
            Command::Serve(args) => serve::run(args).await,
            Command::Copy(args) => copy::run(args).await,
            Command::Migrate(args) => migrate::run(args).await,
            Command::Daemon { .. } => 0,
            Command::Demo { dir } => match demo::run(dir).await {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("diskstream: demo failed: {e:#}");
                    1
                }
            },
        }
    });
    ExitCode::from(code)
}
