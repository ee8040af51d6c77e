//! Containers on networks: the default bridge, a user-defined network (its resolver in
//! resolv.conf, name resolution between containers), and live connect/disconnect.

use anyhow::{Result, ensure};
use berth_integration::engine_kit::{EngineStack, busybox, unique};
use berth_proto::berth::engine::v1 as pb;
use berth_proto::berth::network::v1 as net;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_user_networks_and_live_connect() -> Result<()> {
    if !berth_integration::engine_kit::ready() {
        return Ok(());
    }
    let es = EngineStack::start().await?;

    // Default bridge: an address from the slot's bip, its own hosts entry.
    let r = es
        .run(
            &unique("br"),
            busybox(&["sh", "-c", "ip -4 -o addr show eth0; cat /etc/hosts"]),
            Default::default(),
        )
        .await?;
    ensure!(r.exit_code == 0, "{r:?}");
    let ip = r
        .stdout
        .split_whitespace()
        .find(|w| w.contains('/'))
        .unwrap_or_default()
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    ensure!(ip.starts_with("10.213."), "{r:?}");
    ensure!(
        r.stdout.contains(&format!("{ip}\t{}", &r.id[..12])),
        "{r:?}"
    );

    // A user-defined network: containers resolve each other by name through its resolver.
    let name = unique("net");
    let n = es
        .networks()
        .create(net::CreateNetworkRequest {
            name: name.clone(),
            driver: "bridge".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .network
        .unwrap();
    let host = pb::HostConfig {
        network_mode: name.clone(),
        ..Default::default()
    };
    let server = unique("srv");
    let s = es
        .create(&server, busybox(&["sleep", "300"]), host.clone())
        .await?;
    es.start_task(&s.id).await?;
    let sc = es.inspect(&s.id).await?;
    let settings = sc.network_settings.unwrap();
    let ep = settings
        .networks
        .get(&name)
        .expect("endpoint on the network");
    ensure!(ep.network_id == n.id && !ep.ip_address.is_empty(), "{ep:?}");
    let r = es
        .run(
            &unique("cli"),
            busybox(&[
                "sh",
                "-c",
                &format!("cat /etc/resolv.conf; nslookup {server} 2>&1"),
            ]),
            host,
        )
        .await?;
    ensure!(
        r.stdout.contains(&format!("nameserver {}", ep.gateway)),
        "{r:?}"
    );
    ensure!(r.stdout.contains(&ep.ip_address), "name resolution: {r:?}");

    // Live connect and disconnect.
    let c = es
        .create(
            &unique("multi"),
            busybox(&["sleep", "300"]),
            Default::default(),
        )
        .await?;
    es.start_task(&c.id).await?;
    let resp = es
        .containers()
        .connect_network(pb::ConnectNetworkRequest {
            id: c.id.clone(),
            network: name.clone(),
            endpoint: None,
        })
        .await?
        .into_inner();
    let ep = resp.endpoint.expect("a live endpoint");
    ensure!(
        !ep.ip_address.is_empty() && ep.interface_name == "eth1",
        "{ep:?}"
    );
    let inspected = es.inspect(&c.id).await?;
    ensure!(inspected.network_settings.unwrap().networks.len() == 2);
    es.containers()
        .disconnect_network(pb::DisconnectNetworkRequest {
            id: c.id.clone(),
            network: name.clone(),
            force: false,
        })
        .await?;
    let inspected = es.inspect(&c.id).await?;
    ensure!(inspected.network_settings.unwrap().networks.len() == 1);
    ensure!(!inspected.networks.contains_key(&name));

    // Removing the containers frees the network.
    es.remove(&c.id).await?;
    es.remove(&s.id).await?;
    es.networks()
        .delete(net::DeleteNetworkRequest { id: name })
        .await?;
    Ok(())
}
