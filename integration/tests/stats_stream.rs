//! `docker stats` streaming for every container, from two clients at once (the engine shares
//! one sample a second per container between them): both see every running container with
//! its memory use, repeatedly.
//!
//! Root only (mounts, netns, cgroups); skips cleanly otherwise.

use std::time::Duration;

use anyhow::{Result, ensure};
use berth_integration::gateway_kit::{DockerStack, ready};
use berth_integration::images_kit::{Registry, RegistryOptions, oci_dir};

#[test]
fn docker_stats_streams_every_container_to_two_clients() -> Result<()> {
    if !ready() {
        return Ok(());
    }
    let registry = Registry::start(RegistryOptions::default())?;
    registry.push_oci(&oci_dir("busybox"), "busybox:latest")?;
    let d = DockerStack::start()?;
    let busybox = format!("{}/busybox:latest", registry.host);
    d.ok(&["pull", &busybox])?;
    d.ok(&["tag", &busybox, "busybox"])?;
    for name in ["sts-a", "sts-b"] {
        d.ok(&[
            "run", "-d", "--name", name, "-m", "32m", "busybox", "sleep", "300",
        ])?;
    }
    let args = ["stats", "--format", "{{.Name}} {{.MemUsage}}"];
    let first = d.spawn(&args)?;
    let second = d.spawn(&args)?;
    // Each client has seen each container at least three times, with a memory figure.
    let seen_enough = |out: &str| {
        ["sts-a", "sts-b"].iter().all(|n| {
            out.lines()
                .filter(|l| l.contains(&format!("{n} ")) && l.contains("iB / 32MiB"))
                .count()
                >= 3
        })
    };
    for client in [&first, &second] {
        ensure!(
            client.wait_stdout(Duration::from_secs(30), seen_enough),
            "stdout:\n{}\nstderr:\n{}",
            client.stdout(),
            client.stderr()
        );
    }
    drop((first, second));
    d.ok(&["rm", "-f", "sts-a", "sts-b"])?;
    Ok(())
}
