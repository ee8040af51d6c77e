//! berth-agent: the init process of a `berth-vm` guest.
//!
//! As PID 1 it mounts the pseudo filesystems, loads the kernel modules the image builder listed
//! (`berth_shim::vm::guest::MODULE_LIST`), mounts the host's shared directory (virtio-fs tag
//! `berth`) at [`SHARE_DIR`], brings `lo` up, and serves the `berth.agent.v1.Agent` API on vsock
//! port [`PORT`]. Containers run with the shim's in-process runtime (youki's libcontainer,
//! `berth_shim::inproc::Libcontainer`); the agent, being PID 1, reaps every process with the
//! shim's [`berth_shim::reaper::Reaper`].

pub mod init;
pub mod network;
pub mod service;

use std::process::ExitCode;
use std::time::Duration;

use berth_proto::berth::agent::v1::agent_server::AgentServer;
use berth_shim::reaper::Reaper;

/// The vsock port the agent serves on.
pub const PORT: u32 = 1024;
/// Where the host's shared directory is mounted in the guest.
pub const SHARE_DIR: &str = "/run/berth/share";

/// Runs the agent. As PID 1 it never returns while the guest runs: a PID 1 that exits panics
/// the kernel, so a failure powers the guest off instead.
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(
                std::env::var("BERTH_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let pid1 = std::process::id() == 1;
    if pid1 && let Err(e) = init::switch_root() {
        tracing::error!(error = %e.chain(), "move the root off the initramfs");
    }
    if pid1 && let Err(e) = init::init_system() {
        tracing::error!(error = %e.chain(), "guest init failed");
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "tokio runtime");
            return finish(pid1);
        }
    };
    if let Err(e) = rt.block_on(serve()) {
        tracing::error!(error = %e.chain(), "agent failed");
    }
    finish(pid1)
}

fn finish(pid1: bool) -> ExitCode {
    if pid1 {
        init::power_off();
    }
    ExitCode::FAILURE
}

async fn serve() -> berth_core::Result<()> {
    use berth_core::{Context, ErrorKind};
    let reaper = Reaper::new();
    tokio::spawn(reaper.run()?);
    if let Err(e) = network::loopback_up().await {
        tracing::warn!(error = %e.chain(), "bring up lo");
    }
    let svc =
        service::AgentService::new(reaper, "/run/berth/agent".into(), Duration::from_secs(60));
    let listener = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(
        tokio_vsock::VMADDR_CID_ANY,
        PORT,
    ))
    .context(
        ErrorKind::Unavailable,
        format!("listen on vsock port {PORT}"),
    )?;
    tracing::info!(port = PORT, "berth-agent serving");
    tonic::transport::Server::builder()
        .add_service(AgentServer::new(svc))
        .serve_with_incoming(listener.incoming())
        .await
        .context(ErrorKind::Internal, "serve")
}
