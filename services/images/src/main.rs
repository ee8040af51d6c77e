use std::process::ExitCode;

use berth_core::Service;
use berth_core::daemon::{self, ConfigArgs};
use clap::Parser;

/// berth-images: content store, registry pull and push, unpack into snapshots, import and export.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    daemon::main(Service::Images, &args.config, berth_images::run)
}
