//! berth-agent: `/init` of a `berth-vm` guest.

fn main() -> std::process::ExitCode {
    berth_agent::main()
}
