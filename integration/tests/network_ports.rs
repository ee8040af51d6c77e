//! berth-network, real binary: published ports. busybox httpd in a namespace answers on
//! 127.0.0.1:<port> and on a random host port, from the host and from another network's
//! namespace through a host address; a taken host port is refused with a clear error; detach
//! removes the rules. Root only.

use anyhow::{Result, ensure};
use berth_integration::network_kit::{
    NetSlot, Netns, NetworkDaemon, attach, container_id, create_network, curl, free_port,
    iptables_save, skip_unless_root_with_net_tools, start_httpd,
};
use berth_proto::berth::network::v1::{DeleteNetworkRequest, DetachRequest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_ports_answer_and_conflicts_are_refused() -> Result<()> {
    if skip_unless_root_with_net_tools() {
        return Ok(());
    }
    let slot = NetSlot::claim()?;
    let daemon = NetworkDaemon::start(&slot, None, "").await?;
    let mut client = daemon.client();
    let web_net = create_network(&mut client, "web", Some(&slot.subnet(1))).await?;
    create_network(&mut client, "clients", Some(&slot.subnet(2))).await?;

    let web = Netns::new(&slot.name("-web"))?;
    // -p 127.0.0.1:<free port>:80 and -p 80 (a random host port).
    let port = free_port();
    let a = attach(
        &mut client,
        1,
        "web",
        &web,
        "web",
        &[("127.0.0.1", port, 80), ("", 0, 80)],
    )
    .await?;
    let www = tempfile::tempdir()?;
    let body = format!("hello from {}\n", web.name);
    let _httpd = start_httpd(&web, www.path(), &body)?;
    println!("web {} ports {:?}", a.ipv4_address, a.ports);
    ensure!(a.ports.len() == 2, "{:?}", a.ports);
    ensure!(a.ports[0].host_port == port as u32 && a.ports[0].host_ip == "127.0.0.1");
    let random = a.ports[1].host_port;
    ensure!(
        random != 0 && a.ports[1].host_ip == "0.0.0.0",
        "{:?}",
        a.ports[1]
    );

    ensure!(
        curl(None, &format!("127.0.0.1:{port}"))? == body,
        "127.0.0.1:{port}"
    );
    ensure!(
        curl(None, &format!("127.0.0.1:{random}"))? == body,
        "127.0.0.1:{random}"
    );
    // The 127.0.0.1 mapping is only on 127.0.0.1.
    ensure!(
        curl(None, &format!("{}:{port}", a.ipv4_gateway)).is_err(),
        "127.0.0.1-only port answered elsewhere"
    );

    // From a namespace on another network, through a host address (its own gateway): the
    // published port crosses the network isolation, direct traffic does not.
    let client_ns = Netns::new(&slot.name("-cli"))?;
    let c = attach(&mut client, 2, "cli", &client_ns, "clients", &[]).await?;
    ensure!(
        curl(Some(&client_ns), &format!("{}:{random}", c.ipv4_gateway))? == body,
        "via host address"
    );
    ensure!(
        curl(Some(&client_ns), &format!("{}:80", a.ipv4_address)).is_err(),
        "isolation bypassed"
    );

    // A second attach asking for a taken host port: a conflict naming the port.
    let other = Netns::new(&slot.name("-oth"))?;
    let err = attach(
        &mut client,
        3,
        "other",
        &other,
        "web",
        &[("127.0.0.1", port, 80)],
    )
    .await
    .unwrap_err();
    println!("conflict: {:?} {}", err.code(), err.message());
    ensure!(err.code() == tonic::Code::AlreadyExists, "{err:?}");
    ensure!(
        err.message().contains(&format!("127.0.0.1:{port}")),
        "{}",
        err.message()
    );
    // Same port on all addresses overlaps 127.0.0.1 too.
    let err = attach(&mut client, 3, "other", &other, "web", &[("", port, 80)])
        .await
        .unwrap_err();
    ensure!(err.code() == tonic::Code::AlreadyExists, "{err:?}");
    // A port another process listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let busy = listener.local_addr()?.port();
    let err = attach(
        &mut client,
        3,
        "other",
        &other,
        "web",
        &[("127.0.0.1", busy, 80)],
    )
    .await
    .unwrap_err();
    ensure!(
        err.code() == tonic::Code::AlreadyExists && err.message().contains("another process"),
        "{err:?}"
    );
    drop(listener);
    // The refused attaches left nothing: the third namespace attaches fine without ports.
    let o = attach(&mut client, 3, "other", &other, "web", &[]).await?;
    ensure!(o.ports.is_empty());

    // Detach: the rules go, the port stops answering, and it can be published again.
    client
        .detach(DetachRequest {
            container_id: container_id(1),
            network: String::new(),
            force: false,
        })
        .await?;
    let rules = iptables_save();
    ensure!(
        !rules.contains(&format!("--dport {port} ")),
        "DNAT for {port} left:\n{rules}"
    );
    ensure!(
        !rules.contains(&a.endpoint_id[..12]),
        "rules of the endpoint left:\n{rules}"
    );
    ensure!(
        curl(None, &format!("127.0.0.1:{port}")).is_err(),
        "port still answers after detach"
    );
    let again = attach(
        &mut client,
        4,
        "web2",
        &web,
        "web",
        &[("127.0.0.1", port, 80)],
    )
    .await?;
    ensure!(curl(None, &format!("127.0.0.1:{port}"))? == body);

    for n in [2, 3, 4] {
        client
            .detach(DetachRequest {
                container_id: container_id(n),
                network: String::new(),
                force: false,
            })
            .await?;
    }
    ensure!(!iptables_save().contains(&again.endpoint_id[..12]));
    for name in ["web", "clients"] {
        client
            .delete(DeleteNetworkRequest { id: name.into() })
            .await?;
    }
    ensure!(!iptables_save().contains(&web_net.id[..12]));
    Ok(())
}
