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
    // The PID namespace holder of pod sandboxes is this binary too (see `podns`): checked
    // before anything else runs, so the holder stays single-threaded and small.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == berth_engine::podns::HOLDER_ARG)
    {
        return berth_engine::podns::holder_main();
    }
    let args = Args::parse();
    daemon::main(Service::Engine, &args.config, berth_engine::run)
}
