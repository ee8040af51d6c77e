//! berth-network, real binary: an internal network has no route out, and a network with IPv6
//! gives containers an IPv6 address and default route. Root only.

use anyhow::{Context as _, Result, ensure};
use berth_integration::network_kit::{
    NetSlot, Netns, NetworkDaemon, attach, container_id, create_network,
    skip_unless_root_with_net_tools,
};
use berth_proto::berth::network::v1::{
    CreateNetworkRequest, DeleteNetworkRequest, DetachRequest, Ipam, IpamPool,
};

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_networks_have_no_way_out_and_ipv6_networks_get_addresses() -> Result<()> {
    if skip_unless_root_with_net_tools() {
        return Ok(());
    }
    if std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")?.trim() == "1" {
        eprintln!("skipping: IPv6 is disabled on this host");
        return Ok(());
    }
    let slot = NetSlot::claim()?;
    let daemon = NetworkDaemon::start(&slot, None, "").await?;
    let mut client = daemon.client();
    let pool = |subnet: String| {
        Some(Ipam {
            driver: String::new(),
            pools: vec![IpamPool {
                subnet,
                ..Default::default()
            }],
            options: Default::default(),
        })
    };
    let sealed = client
        .create(CreateNetworkRequest {
            name: "sealed".into(),
            internal: true,
            ipam: pool(slot.subnet(5)),
            ..Default::default()
        })
        .await?
        .into_inner()
        .network
        .context("network")?;
    ensure!(sealed.internal);
    let v6 = client
        .create(CreateNetworkRequest {
            name: "dual".into(),
            enable_ipv6: true,
            ipam: pool(slot.subnet(6)),
            ..Default::default()
        })
        .await?
        .into_inner()
        .network
        .context("network")?;
    let pools = &v6.ipam.as_ref().context("ipam")?.pools;
    ensure!(
        pools.len() == 2 && pools[1].subnet.starts_with("fd"),
        "{pools:?}"
    );
    create_network(&mut client, "open", Some(&slot.subnet(7))).await?;

    // Internal: its own gateway answers, nothing beyond it is routed.
    let ns_i = Netns::new(&slot.name("-int"))?;
    let i = attach(&mut client, 1, "inside", &ns_i, "sealed", &[("", 0, 80)]).await?;
    ensure!(!i.default_route && i.ports.is_empty(), "{i:?}");
    let routes = text(&ns_i.exec(&["ip", "-4", "route"])?);
    ensure!(
        !routes.contains("default"),
        "internal endpoint has a default route: {routes}"
    );
    let out = ns_i.exec(&["busybox", "ping", "-c", "1", "-W", "1", &i.ipv4_gateway])?;
    ensure!(
        out.status.success(),
        "gateway of the internal network: {}",
        text(&out)
    );
    let ns_o = Netns::new(&slot.name("-open"))?;
    let o = attach(&mut client, 2, "outside", &ns_o, "open", &[]).await?;
    for target in [&o.ipv4_address, &o.ipv4_gateway] {
        let out = ns_i.exec(&["busybox", "ping", "-c", "1", "-W", "1", target])?;
        ensure!(!out.status.success(), "internal endpoint reached {target}");
    }
    let out = ns_o.exec(&["busybox", "ping", "-c", "1", "-W", "1", &i.ipv4_address])?;
    ensure!(
        !out.status.success(),
        "an open network reached into the internal one"
    );

    // IPv6: address, gateway and default route inside the namespace.
    let ns_6 = Netns::new(&slot.name("-v6"))?;
    let d = attach(&mut client, 3, "dual", &ns_6, "dual", &[]).await?;
    println!(
        "dual: {} / {} via {}",
        d.ipv4_address, d.ipv6_address, d.ipv6_gateway
    );
    ensure!(
        !d.ipv6_address.is_empty() && !d.ipv6_gateway.is_empty(),
        "{d:?}"
    );
    let addrs = text(&ns_6.exec(&["ip", "-6", "addr", "show", "eth0"])?);
    ensure!(
        addrs.contains(&format!("{}/{}", d.ipv6_address, d.ipv6_prefix_len)),
        "{addrs}"
    );
    let routes = text(&ns_6.exec(&["ip", "-6", "route"])?);
    ensure!(
        routes.contains(&format!("default via {}", d.ipv6_gateway)),
        "{routes}"
    );
    let out = ns_6.exec(&["busybox", "ping6", "-c", "1", "-W", "2", &d.ipv6_gateway])?;
    ensure!(out.status.success(), "ping6 gateway: {}", text(&out));

    for n in 1..=3 {
        client
            .detach(DetachRequest {
                container_id: container_id(n),
                network: String::new(),
                force: false,
            })
            .await?;
    }
    for name in ["sealed", "dual", "open"] {
        client
            .delete(DeleteNetworkRequest { id: name.into() })
            .await?;
    }
    Ok(())
}
