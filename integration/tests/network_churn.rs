//! berth-network, real binary: attach and detach as containers come and go. A namespace removed
//! before its detach (a container being torn down) gives its address back only once the kernel
//! has removed the veth with it, yet a new container asking for that address right away gets it
//! and reaches the gateway; 20 concurrent attaches and detaches (torn down and disconnected
//! alike), and a `kill -9` between such a detach and the end of its release, leave no veth,
//! record or rule behind. Prints the Attach and Detach times it sees (no assertions on them).
//! Root only.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use berth_integration::network_kit::{
    NetSlot, Netns, NetworkDaemon, attach, container_id, create_network, free_port, iptables_save,
    links, run, run_ok, skip_unless_root_with_net_tools,
};
use berth_proto::berth::network::v1::networks_client::NetworksClient;
use berth_proto::berth::network::v1::{
    AttachRequest, DeleteNetworkRequest, DetachRequest, ListAttachmentsRequest,
};

type Client = NetworksClient<berth_core::uds::Channel>;

/// `ip netns del`: what the engine does to a finished container's namespace.
fn remove_netns(ns: &Netns) -> Result<()> {
    run_ok(Command::new("ip").args(["netns", "del", &ns.name]))?;
    Ok(())
}

async fn detach(client: &mut Client, n: u32) -> Result<Duration> {
    let started = Instant::now();
    client
        .detach(DetachRequest {
            container_id: container_id(n),
            network: String::new(),
            force: true,
        })
        .await
        .with_context(|| format!("detach {n}"))?;
    Ok(started.elapsed())
}

async fn attachments(client: &mut Client) -> Result<usize> {
    Ok(client
        .list_attachments(ListAttachmentsRequest::default())
        .await?
        .into_inner()
        .attachments
        .len())
}

/// Waits until no port is left on `bridge` (the kernel removes the veths of deleted namespaces
/// a little after the namespace goes).
async fn bridge_empties(bridge: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ports = links(&["master", bridge]);
        if ports.is_empty() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "veths left on {bridge}: {ports:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_of_a_torn_down_container_is_reused_safely_at_once() -> Result<()> {
    if skip_unless_root_with_net_tools() {
        return Ok(());
    }
    let slot = NetSlot::claim()?;
    let daemon = NetworkDaemon::start(&slot, None, "").await?;
    let mut client = daemon.client();
    let net = create_network(&mut client, "app", Some(&slot.subnet(0))).await?;
    let gateway = net.ipam.as_ref().context("ipam")?.pools[0].gateway.clone();
    let ip = slot.subnet(0).replace(".0/28", ".5");

    let static_attach = |n: u32, ns: &Netns| AttachRequest {
        container_id: container_id(n),
        container_name: format!("c{n}"),
        netns_path: ns.path.display().to_string(),
        network: "app".into(),
        ipv4_address: ip.clone(),
        ..Default::default()
    };
    let mut detach_times = Vec::new();
    for round in 0..5u32 {
        let (old, new) = (round * 2 + 1, round * 2 + 2);
        let old_ns = Netns::new(&slot.name(&format!("-o{round}")))?;
        let a = client
            .attach(static_attach(old, &old_ns))
            .await?
            .into_inner()
            .attachment
            .context("attachment")?;
        ensure!(a.ipv4_address == ip, "{a:?}");
        // Torn down: the namespace goes first, then the detach, then at once a new container
        // asks for the same address.
        remove_netns(&old_ns)?;
        detach_times.push(detach(&mut client, old).await?);
        let new_ns = Netns::new(&slot.name(&format!("-n{round}")))?;
        let b = client
            .attach(static_attach(new, &new_ns))
            .await
            .context("attach with the address just released")?
            .into_inner()
            .attachment
            .context("attachment")?;
        ensure!(b.ipv4_address == ip, "{b:?}");
        ensure!(
            !links(&[]).contains(&a.host_interface_name),
            "the old veth is still there while its address is in use again"
        );
        let out = run(&mut new_ns.cmd(&["busybox", "ping", "-c", "1", "-W", "2", &gateway]))?;
        ensure!(
            out.status.success(),
            "the new container cannot reach the gateway {gateway}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        detach(&mut client, new).await?;
    }
    println!(
        "detach of a removed namespace: median {:?} of {detach_times:?}",
        median(detach_times.clone())
    );
    bridge_empties(&net.bridge_name).await?;
    ensure!(attachments(&mut client).await? == 0);
    client
        .delete(DeleteNetworkRequest { id: "app".into() })
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_attaches_and_detaches_leave_nothing_behind() -> Result<()> {
    if skip_unless_root_with_net_tools() {
        return Ok(());
    }
    let slot = NetSlot::claim()?;
    let mut daemon = NetworkDaemon::start(&slot, None, "").await?;
    let mut client = daemon.client();
    let net = create_network(&mut client, "app", None).await?;

    let namespaces: Vec<Arc<Netns>> = (1..=20u32)
        .map(|n| Netns::new(&slot.name(&format!("-{n}"))).map(Arc::new))
        .collect::<Result<_>>()?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    // Free ports one after another can repeat (each probe's socket is closed before the
    // next): the ten published ports must be distinct.
    let mut picked = std::collections::HashSet::new();
    for (i, ns) in namespaces.iter().enumerate() {
        let n = i as u32 + 1;
        let mut client = client.clone();
        let ns = ns.clone();
        // Every other one publishes a port.
        let port = n.is_multiple_of(2).then(|| {
            loop {
                let p = free_port();
                if picked.insert(p) {
                    break p;
                }
            }
        });
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let ports: Vec<(&str, u16, u16)> =
                port.map(|p| ("127.0.0.1", p, 80)).into_iter().collect();
            attach(&mut client, n, &format!("c{n}"), &ns, "app", &ports)
                .await
                .map(|a| (a, t.elapsed()))
        }));
    }
    let mut attached = Vec::new();
    for t in tasks {
        attached.push(t.await??);
    }
    println!(
        "20 concurrent attaches: {:?} in all, median {:?} each",
        started.elapsed(),
        median(attached.iter().map(|(_, d)| *d).collect())
    );
    let ips: std::collections::BTreeSet<&str> = attached
        .iter()
        .map(|(a, _)| a.ipv4_address.as_str())
        .collect();
    ensure!(ips.len() == 20, "addresses not distinct: {ips:?}");
    ensure!(links(&["master", &net.bridge_name]).len() == 20);

    // Odd ones are torn down (namespace removed first), even ones disconnected (namespace
    // stays, so its veth must be gone when the detach returns).
    for ns in namespaces.iter().step_by(2) {
        remove_netns(ns)?;
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for n in 1..=20u32 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move { detach(&mut client, n).await }));
    }
    let mut times = Vec::new();
    for t in tasks {
        times.push(t.await??);
    }
    println!(
        "20 concurrent detaches: {:?} in all, median {:?} each",
        started.elapsed(),
        median(times)
    );
    for ns in namespaces.iter().skip(1).step_by(2) {
        let out = ns.exec(&["ip", "-o", "link", "show"])?;
        ensure!(
            !String::from_utf8_lossy(&out.stdout).contains("eth0"),
            "eth0 left in {} after its detach returned",
            ns.name
        );
    }
    bridge_empties(&net.bridge_name).await?;
    ensure!(attachments(&mut client).await? == 0);
    let rules = iptables_save();
    for (a, _) in &attached {
        ensure!(
            !rules.contains(&a.endpoint_id[..12]),
            "rule of {} left",
            a.container_name
        );
    }

    // kill -9 right after detaches whose veths the kernel is still removing: the restarted
    // daemon finds their records and cleans up.
    let late: Vec<Netns> = (21..=23u32)
        .map(|n| Netns::new(&slot.name(&format!("-{n}"))))
        .collect::<Result<_>>()?;
    for (i, ns) in late.iter().enumerate() {
        attach(&mut client, 21 + i as u32, "late", ns, "app", &[]).await?;
    }
    for (i, ns) in late.iter().enumerate() {
        remove_netns(ns)?;
        detach(&mut client, 21 + i as u32).await?;
    }
    daemon.restart().await?;
    let mut client = daemon.client();
    bridge_empties(&net.bridge_name).await?;
    ensure!(attachments(&mut client).await? == 0);
    client
        .delete(DeleteNetworkRequest { id: "app".into() })
        .await?;
    ensure!(!links(&[]).contains(&net.bridge_name), "bridge left");
    Ok(())
}
