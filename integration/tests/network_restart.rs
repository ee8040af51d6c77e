//! berth-network, real binary: `kill -9` with three attached namespaces. Published ports keep
//! answering while it is down; after the restart, inspect shows the same attachments and
//! addresses, DNS answers again, and detaching leaves no iptables rule and no veth behind.
//! Root only.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use berth_integration::network_kit::{
    NetSlot, Netns, NetworkDaemon, attach, container_id, create_network, curl, dns_query,
    free_port, iptables_save, links, skip_unless_root_with_net_tools, start_httpd,
};
use berth_proto::berth::network::v1::{
    DeleteNetworkRequest, DetachRequest, GetNetworkRequest, ListAttachmentsRequest,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachments_survive_kill_9_and_detach_cleanly_afterwards() -> Result<()> {
    if skip_unless_root_with_net_tools() {
        return Ok(());
    }
    let slot = NetSlot::claim()?;
    let mut daemon = NetworkDaemon::start(&slot, None, "").await?;
    let mut client = daemon.client();
    let net = create_network(&mut client, "app", None).await?;

    let names = ["one", "two", "three"];
    let mut namespaces = Vec::new();
    let mut before = Vec::new();
    let mut ports = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let ns = Netns::new(&slot.name(&format!("-{name}")))?;
        let port = free_port();
        let started = Instant::now();
        let a = attach(
            &mut client,
            i as u32 + 1,
            name,
            &ns,
            "app",
            &[("127.0.0.1", port, 80)],
        )
        .await?;
        println!(
            "{name}: {} on {} (veth {}), 127.0.0.1:{port}, attached in {:?}",
            a.ipv4_address,
            a.interface_name,
            a.host_interface_name,
            started.elapsed()
        );
        namespaces.push(ns);
        before.push(a);
        ports.push(port);
    }
    let www = tempfile::tempdir()?;
    let _httpd = start_httpd(&namespaces[0], www.path(), "one\n")?;
    ensure!(curl(None, &format!("127.0.0.1:{}", ports[0]))? == "one\n");

    // kill -9: what keeps the containers reachable is in the kernel.
    daemon.kill9();
    ensure!(
        curl(None, &format!("127.0.0.1:{}", ports[0]))? == "one\n",
        "port died with berth-network"
    );

    // Restart; the resolver is back as soon as the service is.
    let restarted = Instant::now();
    daemon.restart().await?;
    let gw: Ipv4Addr = before[0].ipv4_gateway.parse()?;
    let answered = loop {
        if let Ok(ips) = dns_query(gw, "two") {
            break ips;
        }
        ensure!(
            restarted.elapsed() < Duration::from_secs(10),
            "the resolver did not come back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    println!(
        "serving and resolving again {:?} after the restart",
        restarted.elapsed()
    );
    ensure!(
        answered == [before[1].ipv4_address.parse::<Ipv4Addr>()?],
        "{answered:?}"
    );

    // Inspect shows the same attachments and addresses.
    let mut client = daemon.client();
    let after = client
        .list_attachments(ListAttachmentsRequest {
            container_id: String::new(),
            network: "app".into(),
        })
        .await?
        .into_inner()
        .attachments;
    ensure!(after.len() == 3, "{after:?}");
    for b in &before {
        let a = after
            .iter()
            .find(|a| a.container_id == b.container_id)
            .context("attachment lost")?;
        ensure!(
            a.ipv4_address == b.ipv4_address && a.endpoint_id == b.endpoint_id,
            "{a:?} != {b:?}"
        );
        ensure!(a.ports == b.ports && a.host_interface_name == b.host_interface_name);
    }
    let got = client
        .get(GetNetworkRequest { id: "app".into() })
        .await?
        .into_inner()
        .network
        .context("network")?;
    ensure!(got.containers.len() == 3, "{:?}", got.containers);
    for b in &before {
        let ep = &got.containers[&b.container_id];
        ensure!(
            ep.ipv4_address == format!("{}/{}", b.ipv4_address, b.ipv4_prefix_len),
            "{ep:?}"
        );
    }
    ensure!(curl(None, &format!("127.0.0.1:{}", ports[0]))? == "one\n");

    // Detach everything: no rule and no veth of the attachments is left.
    for n in 1..=3 {
        let resp = client
            .detach(DetachRequest {
                container_id: container_id(n),
                network: String::new(),
                force: false,
            })
            .await?
            .into_inner();
        ensure!(resp.network_ids == [net.id.clone()], "{resp:?}");
    }
    let rules = iptables_save();
    let all_links = links(&[]);
    let on_bridge = links(&["master", &net.bridge_name]);
    println!("after detach: links on {}: {on_bridge:?}", net.bridge_name);
    for (b, port) in before.iter().zip(&ports) {
        ensure!(
            !rules.contains(&b.endpoint_id[..12]),
            "rule of {} left:\n{rules}",
            b.container_name
        );
        ensure!(
            !rules.contains(&format!("--to-destination {}:", b.ipv4_address)),
            "DNAT to {} left",
            b.ipv4_address
        );
        ensure!(
            !rules.contains(&format!("--dport {port} ")),
            "DNAT of port {port} left"
        );
        ensure!(
            !all_links.contains(&b.host_interface_name),
            "veth {} left",
            b.host_interface_name
        );
    }
    ensure!(
        on_bridge.is_empty(),
        "ports still on the bridge: {on_bridge:?}"
    );
    for ns in &namespaces {
        let out = ns.exec(&["ip", "-o", "link", "show"])?;
        ensure!(
            !String::from_utf8_lossy(&out.stdout).contains("eth0"),
            "eth0 left in {}",
            ns.name
        );
    }

    client
        .delete(DeleteNetworkRequest { id: "app".into() })
        .await?;
    ensure!(!links(&[]).contains(&net.bridge_name), "bridge left");
    ensure!(
        !iptables_save().contains(&net.id[..12]),
        "network rules left"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachments_whose_namespace_died_are_cleaned_up_at_start() -> Result<()> {
    if skip_unless_root_with_net_tools() {
        return Ok(());
    }
    let slot = NetSlot::claim()?;
    let mut daemon = NetworkDaemon::start(&slot, None, "").await?;
    let mut client = daemon.client();
    create_network(&mut client, "app", Some(&slot.subnet(4))).await?;
    let keep = Netns::new(&slot.name("-keep"))?;
    let gone = Netns::new(&slot.name("-gone"))?;
    let port = free_port();
    let k = attach(&mut client, 1, "keep", &keep, "app", &[]).await?;
    let g = attach(
        &mut client,
        2,
        "gone",
        &gone,
        "app",
        &[("127.0.0.1", port, 80)],
    )
    .await?;
    daemon.kill9();
    drop(gone);
    daemon.restart().await?;
    let mut client = daemon.client();
    let left = client
        .list_attachments(ListAttachmentsRequest {
            container_id: String::new(),
            network: String::new(),
        })
        .await?
        .into_inner()
        .attachments;
    ensure!(
        left.len() == 1 && left[0].container_id == k.container_id,
        "{left:?}"
    );
    let rules = iptables_save();
    ensure!(
        !rules.contains(&g.endpoint_id[..12]),
        "rules of the dead attachment left:\n{rules}"
    );
    ensure!(!links(&[]).contains(&g.host_interface_name));
    // Its address is free again (sequential allocation comes back to it after wrapping, so
    // ask for it explicitly).
    let again = Netns::new(&slot.name("-again"))?;
    let resp = client
        .attach(berth_proto::berth::network::v1::AttachRequest {
            container_id: container_id(3),
            netns_path: again.path.display().to_string(),
            network: "app".into(),
            ipv4_address: g.ipv4_address.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    ensure!(resp.attachment.context("attachment")?.ipv4_address == g.ipv4_address);
    for n in [1, 3] {
        client
            .detach(DetachRequest {
                container_id: container_id(n),
                network: String::new(),
                force: false,
            })
            .await?;
    }
    client
        .delete(DeleteNetworkRequest { id: "app".into() })
        .await?;
    Ok(())
}
