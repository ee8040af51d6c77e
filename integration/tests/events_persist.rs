//! `docker events --since/--until` answers the same after `kill -9` of the engine (the history
//! is on disk), and a client that reconnects with `since` after a gateway restart misses no
//! event published meanwhile.
//!
//! Root only (mounts, netns, cgroups); skips cleanly otherwise.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Result, ensure};
use berth_core::Service;
use berth_integration::gateway_kit::{DockerStack, ready};
use berth_integration::images_kit::{Registry, RegistryOptions, oci_dir};

fn now_secs() -> Result<u64> {
    Ok(SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs())
}

const FORMAT: &str = "{{.TimeNano}} {{.Type}} {{.Action}} {{.Actor.ID}} {{.Actor.Attributes.name}}";

fn events(d: &DockerStack, since: u64, until: u64) -> Result<String> {
    d.ok(&[
        "events",
        "--since",
        &since.to_string(),
        "--until",
        &until.to_string(),
        "--format",
        FORMAT,
    ])
}

#[test]
fn events_since_survive_engine_kill9_and_gateway_restart() -> Result<()> {
    if !ready() {
        return Ok(());
    }
    let registry = Registry::start(RegistryOptions::default())?;
    registry.push_oci(&oci_dir("busybox"), "busybox:latest")?;
    let d = DockerStack::start()?;
    d.ok(&["pull", &format!("{}/busybox:latest", registry.host)])?;
    d.ok(&[
        "tag",
        &format!("{}/busybox:latest", registry.host),
        "busybox",
    ])?;

    let since = now_secs()? - 1;
    let out = d.run(&["run", "--name", "evp-once", "busybox", "sh", "-c", "exit 3"])?;
    ensure!(out.status.code() == Some(3), "{out:?}");
    d.ok(&["rm", "evp-once"])?;
    d.ok(&["volume", "create", "evp-vol"])?;
    d.ok(&["run", "-d", "--name", "evp-up", "busybox", "sleep", "300"])?;
    let until = now_secs()? + 1;
    let before = events(&d, since, until)?;
    println!("before:\n{before}");
    for want in [
        "container create",
        "container start",
        "container die",
        "container destroy",
        "volume create",
    ] {
        ensure!(before.contains(want), "events lack {want:?}:\n{before}");
    }
    ensure!(before.contains(" evp-up"), "{before}");

    let (old, new) = d.kill9(Service::Engine)?;
    println!("engine kill -9: pid {old} -> {new}");
    let after = events(&d, since, until)?;
    ensure!(
        after == before,
        "events differ after the engine restart:\nbefore:\n{before}\nafter:\n{after}"
    );

    // A subscriber's view across a gateway restart: whatever is published while the gateway
    // is down (the container exits on its own meanwhile, or just after) is there when the
    // client comes back with `since`.
    let reconnect_since = now_secs()? - 1;
    d.ok(&[
        "run",
        "-d",
        "--name",
        "evp-short",
        "busybox",
        "sh",
        "-c",
        "sleep 1; exit 5",
    ])?;
    d.kill9(Service::Gateway)?;
    ensure!(d.ok(&["wait", "evp-short"])? == "5");
    d.ok(&["rm", "-f", "evp-up"])?;
    let until2 = now_secs()? + 1;
    let seen = d.ok(&[
        "events",
        "--since",
        &reconnect_since.to_string(),
        "--until",
        &until2.to_string(),
        "--filter",
        "type=container",
        "--format",
        "{{.Action}} {{.Actor.Attributes.name}} {{.Actor.Attributes.exitCode}}",
    ])?;
    println!("after the gateway restart:\n{seen}");
    for want in [
        "start evp-short",
        "die evp-short 5",
        "die evp-up 137",
        "destroy evp-up",
    ] {
        ensure!(seen.contains(want), "events lack {want:?}:\n{seen}");
    }
    d.ok(&["rm", "-f", "evp-short"])?;
    d.ok(&["volume", "rm", "evp-vol"])?;
    Ok(())
}
