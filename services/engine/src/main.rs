use std::process::ExitCode;

use berth_core::Service;
use berth_core::daemon::{self, ConfigArgs};
use clap::Parser;

/// berth-engine: containers, tasks through shims, volumes and the events hub.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    daemon::main(Service::Engine, &args.config, berth_engine::run)
}
