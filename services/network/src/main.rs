use std::process::ExitCode;

use berth_core::Service;
use berth_core::daemon::{self, ConfigArgs};
use clap::Parser;

/// berth-network: networks, IP allocation, bridges and veths, published ports, container DNS, CNI.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Rootless: move into the stack's network namespace before the runtime's threads exist
    // (they inherit it), keeping one thread in the host's for published ports.
    let host_net = match args.config.load() {
        Ok(cfg) if cfg.rootless => match berth_network::rootless::enter(&cfg.rootless_netns()) {
            Ok(net) => Some(net),
            Err(err) => {
                eprintln!("berth-network: {}", err.chain());
                return daemon::exit_code(&err);
            }
        },
        // A bad config is reported by daemon::main.
        _ => None,
    };
    daemon::main(
        Service::Network,
        &args.config,
        move |cfg, listener, shutdown| berth_network::run_with(cfg, listener, shutdown, host_net),
    )
}
