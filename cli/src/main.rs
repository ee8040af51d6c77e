//! `berth`: runs and inspects a berth stack.

use std::process::ExitCode;

use berth_core::daemon::ConfigArgs;
use clap::{Parser, Subcommand};

mod rootless;
mod status;
mod up;

/// berth: a container engine that speaks the Docker API.
#[derive(Debug, Parser)]
#[command(name = "berth", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start every service in dependency order and supervise them until SIGINT/SIGTERM.
    Up {
        #[command(flatten)]
        config: ConfigArgs,
        /// Run as an ordinary user inside a user namespace of its own (implied when the user is
        /// not root); see docs/rootless.md.
        #[arg(long)]
        rootless: bool,
    },
    /// The holder of a rootless stack's namespaces (started by `berth up --rootless`).
    #[command(hide = true)]
    RootlessNs {
        /// Join the namespaces of this process instead of making new ones.
        #[arg(long)]
        join: Option<i32>,
    },
    /// Show each service's socket, PID, health and uptime.
    Status {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Print the effective configuration (defaults, file, daemon.json, environment, flags) as
    /// TOML, or the error that makes it invalid.
    Config {
        #[command(flatten)]
        config: ConfigArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Up { config, rootless } => up::main(config, rootless),
        Command::RootlessNs { join } => rootless::hold(join),
        Command::Status { config } => status::main(config),
        Command::Config { config } => match config.load() {
            Ok(cfg) => {
                print!("{}", toml_string(&cfg));
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("berth: {}", err.chain());
                berth_core::daemon::exit_code(&err)
            }
        },
    }
}

fn toml_string(cfg: &berth_core::Config) -> String {
    toml::to_string_pretty(cfg).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
}
