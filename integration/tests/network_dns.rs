//! berth-network, real binary: containers on one user-defined network reach each other by
//! name through the network's resolver, other names are forwarded upstream, and a container
//! on another network can reach neither. Root only; namespaces made with `ip netns add`.

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result, ensure};
use berth_integration::network_kit::{
    FakeUpstream, NetSlot, Netns, NetworkDaemon, attach, container_id, create_network, dns_query,
    iptables_save, links, skip_unless_root_with_net_tools,
};
use berth_proto::berth::network::v1::{
    DeleteNetworkRequest, DetachRequest, GetNetworkRequest, LookupRequest,
};

fn output(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_resolve_on_a_shared_network_and_other_networks_are_isolated() -> Result<()> {
    if skip_unless_root_with_net_tools() {
        return Ok(());
    }
    let slot = NetSlot::claim()?;
    let forwarded = Ipv4Addr::new(198, 51, 100, 7);
    let _upstream = FakeUpstream::start(slot.loopback(), forwarded)?;
    let daemon = NetworkDaemon::start(&slot, Some(&[slot.loopback()]), "").await?;
    let mut client = daemon.client();

    // "front" gets its subnet from the default pool, "back" has one given.
    let front = create_network(&mut client, "front", None).await?;
    let back = create_network(&mut client, "back", Some(&slot.subnet(0))).await?;
    println!(
        "front {} on {}, back {} on {}",
        front.id, front.bridge_name, back.id, back.bridge_name
    );
    ensure!(front.dns_enabled && back.dns_enabled);

    let ns1 = Netns::new(&slot.name("-a"))?;
    let ns2 = Netns::new(&slot.name("-b"))?;
    let ns3 = Netns::new(&slot.name("-c"))?;
    let a1 = attach(&mut client, 1, "alpha", &ns1, "front", &[]).await?;
    let a2 = attach(&mut client, 2, "beta", &ns2, "front", &[]).await?;
    let a3 = attach(&mut client, 3, "gamma", &ns3, "back", &[]).await?;
    for a in [&a1, &a2, &a3] {
        println!(
            "{} {} on {} via {} ({}), resolv.conf {:?}",
            a.container_name,
            a.ipv4_address,
            a.network_name,
            a.interface_name,
            a.host_interface_name,
            a.dns_servers
        );
    }
    // The engine writes resolv.conf from the attachment: the network's resolver.
    ensure!(
        a1.dns_servers == [a1.ipv4_gateway.clone()],
        "{:?}",
        a1.dns_servers
    );
    ns1.set_resolv_conf(&a1.dns_servers)?;
    ns2.set_resolv_conf(&a2.dns_servers)?;
    ns3.set_resolv_conf(&a3.dns_servers)?;

    // By name, both ways.
    let out = ns1.exec(&["busybox", "ping", "-c", "1", "-W", "2", "beta"])?;
    ensure!(
        out.status.success(),
        "alpha -> beta by name: {}",
        output(&out)
    );
    ensure!(output(&out).contains(&a2.ipv4_address), "{}", output(&out));
    let out = ns2.exec(&["busybox", "ping", "-c", "1", "-W", "2", "alpha"])?;
    ensure!(
        out.status.success(),
        "beta -> alpha by name: {}",
        output(&out)
    );
    // Aliases of the container id resolve too.
    let out = ns1.exec(&[
        "busybox",
        "nslookup",
        &container_id(2)[..12],
        &a1.ipv4_gateway,
    ])?;
    ensure!(
        output(&out).contains(&a2.ipv4_address),
        "short id lookup: {}",
        output(&out)
    );

    // Names berth does not own go to the upstream (a fake one on loopback).
    let out = ns1.exec(&["busybox", "nslookup", "www.example.test", &a1.ipv4_gateway])?;
    ensure!(
        output(&out).contains(&forwarded.to_string()),
        "forwarded lookup: {}",
        output(&out)
    );

    // gamma, on another network, cannot resolve or reach them, and they cannot reach it.
    let out = ns3.exec(&["busybox", "nslookup", "alpha", &a3.ipv4_gateway])?;
    ensure!(
        !output(&out).contains(&a1.ipv4_address),
        "gamma resolved alpha: {}",
        output(&out)
    );
    let out = ns3.exec(&["busybox", "ping", "-c", "1", "-W", "1", &a3.ipv4_gateway])?;
    ensure!(
        out.status.success(),
        "gamma reaches its own gateway: {}",
        output(&out)
    );
    for (from, to) in [(&ns3, &a1), (&ns3, &a2), (&ns1, &a3)] {
        let out = from.exec(&["busybox", "ping", "-c", "1", "-W", "1", &to.ipv4_address])?;
        ensure!(
            !out.status.success(),
            "{} reached {}: {}",
            from.name,
            to.ipv4_address,
            output(&out)
        );
    }
    // The host routes between the bridges; the drop is berth's isolation rule.
    let forward = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")?;
    ensure!(forward.trim() == "1", "ip_forward is {forward}");
    let rules = iptables_save();
    let iso = format!(
        "-A {}-ISO -i {} ! -o {}",
        slot.chain_prefix(),
        back.bridge_name,
        back.bridge_name
    );
    ensure!(
        rules.contains(&iso),
        "no isolation rule {iso:?} in\n{rules}"
    );

    // The API resolves the same way.
    let found = client
        .lookup(LookupRequest {
            name: "Alpha".into(),
            network: "front".into(),
            from_container_id: String::new(),
        })
        .await?
        .into_inner();
    ensure!(
        found.ipv4_addresses == [a1.ipv4_address.clone()],
        "{found:?}"
    );
    let err = client
        .lookup(LookupRequest {
            name: "alpha".into(),
            network: String::new(),
            from_container_id: container_id(3),
        })
        .await
        .unwrap_err();
    ensure!(err.code() == tonic::Code::NotFound, "{err:?}");
    // From the host (the bridge address), the resolver answers for its own network.
    let gw: Ipv4Addr = a1.ipv4_gateway.parse()?;
    ensure!(dns_query(gw, "beta")? == [a2.ipv4_address.parse::<Ipv4Addr>()?]);

    // Tear down through the API: nothing of the networks is left.
    for n in 1..=3 {
        client
            .detach(DetachRequest {
                container_id: container_id(n),
                network: String::new(),
                force: false,
            })
            .await?;
    }
    for name in ["front", "back"] {
        client
            .delete(DeleteNetworkRequest { id: name.into() })
            .await
            .with_context(|| format!("delete {name}"))?;
    }
    let all = links(&[]);
    for bridge in [&front.bridge_name, &back.bridge_name] {
        ensure!(!all.contains(bridge), "{bridge} is still there");
    }
    let rules = iptables_save();
    for id in [&front.id, &back.id] {
        ensure!(
            !rules.contains(&id[..12]),
            "rules of network {id} left:\n{rules}"
        );
    }
    let err = client
        .get(GetNetworkRequest { id: "front".into() })
        .await
        .unwrap_err();
    ensure!(err.code() == tonic::Code::NotFound);
    Ok(())
}
