//! `berth-shim`: flags in, exit code out; everything else lives in the library.

use std::process::ExitCode;

use berth_shim::daemon::{self, DeleteArgs, ShimArgs};
use clap::{Parser, Subcommand};

/// One process per container: drives the OCI runtime, owns stdio and logs, keeps exit statuses.
#[derive(Debug, Parser)]
#[command(name = "berth-shim", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a shim in the background; prints its address once it accepts connections.
    Start(ShimArgs),
    /// Run the shim in the foreground (what `start` runs).
    #[command(hide = true)]
    Serve {
        #[command(flatten)]
        args: ShimArgs,
        /// Report readiness on stdout (used by `start`).
        #[arg(long)]
        notify_stdout: bool,
    },
    /// Clean up after a shim that is gone: delete the container from the runtime, unmount
    /// the rootfs; prints the recorded exit status as JSON.
    Delete(DeleteArgs),
    /// Stand in for one process of a `berth-vm` guest: relay its stdio, signals and exit.
    #[command(hide = true)]
    VmRelay(berth_shim::vm::relay::RelayArgs),
    /// Build (or find in the cache) a `berth-vm` guest image; prints kernel, initrd, release.
    #[command(hide = true)]
    VmGuestImage {
        /// The `berth-agent` binary.
        #[arg(long)]
        agent: std::path::PathBuf,
        /// The image cache.
        #[arg(long)]
        cache_dir: std::path::PathBuf,
        /// The guest kernel package.
        #[arg(long)]
        kernel_deb: Option<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Start(args) => std::env::current_exe()
            .map_err(|e| berth_core::Error::internal("find own binary").with_source(e))
            .and_then(|exe| daemon::start(&args, &exe))
            .map(|addr| println!("{addr}")),
        Command::Serve {
            args,
            notify_stdout,
        } => daemon::serve(&args, notify_stdout),
        Command::VmRelay(args) => berth_shim::vm::relay::main(args),
        Command::VmGuestImage {
            agent,
            cache_dir,
            kernel_deb,
        } => berth_shim::vm::runtime::guest_image_main(agent, cache_dir, kernel_deb),
        Command::Delete(args) => daemon::delete(&args).map(|exit| {
            let (status, at) = match exit {
                Some(e) => (e.status, berth_shim::rfc3339::format(e.at)),
                None => (255, String::new()),
            };
            println!("{{\"exit_status\":{status},\"exited_at\":\"{at}\"}}");
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("berth-shim: {}", err.chain());
            berth_core::daemon::exit_code(&err)
        }
    }
}
