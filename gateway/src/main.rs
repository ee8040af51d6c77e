use std::process::ExitCode;

use berth_core::Service;
use berth_core::daemon::{self, ConfigArgs};
use clap::Parser;

/// berth-gateway: the Docker Engine API in front of berth's services.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    daemon::main_with(Service::Gateway, &args.config, berth_gateway::run)
}
