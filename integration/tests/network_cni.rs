//! berth-network, real binary, orchestrator path: a raw CNI conflist from the config directory
//! is listed, ADDed to a namespace with the reference plugins (bridge + host-local) and DELed
//! with the recorded arguments. Root only; needs /usr/lib/cni.

use std::path::Path;

use anyhow::{Context as _, Result, ensure};
use berth_integration::network_kit::{
    NetSlot, Netns, NetworkDaemon, run, skip_unless_root_with_net_tools,
};
use berth_proto::berth::network::v1::{CniAttachRequest, CniDetachRequest, ListCniConfigsRequest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cni_configs_are_added_and_deleted_with_the_reference_plugins() -> Result<()> {
    if skip_unless_root_with_net_tools() {
        return Ok(());
    }
    if !Path::new("/usr/lib/cni/bridge").is_file()
        || !Path::new("/usr/lib/cni/host-local").is_file()
    {
        eprintln!("skipping: the CNI reference plugins are not in /usr/lib/cni");
        return Ok(());
    }
    let slot = NetSlot::claim()?;
    let conf = tempfile::tempdir()?;
    let ipam_state = tempfile::tempdir()?;
    let bridge = slot.name("cni");
    let subnet = slot.subnet(3);
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "testpods",
        "plugins": [{
            "type": "bridge",
            "bridge": bridge,
            "isGateway": true,
            "ipMasq": false,
            "ipam": { "type": "host-local", "ranges": [[{ "subnet": subnet }]], "dataDir": ipam_state.path() }
        }]
    });
    std::fs::write(
        conf.path().join("10-testpods.conflist"),
        conflist.to_string(),
    )?;
    let extra = format!("cni_conf_dir = \"{}\"\n", conf.path().display());
    let daemon = NetworkDaemon::start(&slot, None, &extra).await?;
    let mut client = daemon.client();

    let configs = client
        .list_cni_configs(ListCniConfigsRequest {})
        .await?
        .into_inner()
        .configs;
    ensure!(
        configs.len() == 1 && configs[0].name == "testpods",
        "{configs:?}"
    );
    ensure!(configs[0].plugin_types == ["bridge"]);

    let ns = Netns::new(&slot.name("-pod"))?;
    let sandbox = format!("sandbox{}", slot.index());
    let req = CniAttachRequest {
        container_id: sandbox.clone(),
        netns_path: ns.path.display().to_string(),
        config_name: "testpods".into(),
        interface_name: String::new(),
        args: [("K8S_POD_NAME".to_string(), "pod".to_string())].into(),
        capabilities: None,
    };
    let resp = client.cni_attach(req.clone()).await?.into_inner();
    println!("cni result: {:?} {:?}", resp.ips, resp.interfaces);
    let ip = resp
        .ips
        .first()
        .context("no ip in the result")?
        .address
        .clone();
    let addr = ip.split('/').next().unwrap_or_default().to_string();
    ensure!(
        resp.interfaces
            .iter()
            .any(|i| i.name == "eth0" && !i.sandbox.is_empty()),
        "{:?}",
        resp.interfaces
    );
    let inside = run(&mut ns.cmd(&["ip", "-4", "-o", "addr", "show", "eth0"]))?;
    ensure!(
        String::from_utf8_lossy(&inside.stdout).contains(&ip),
        "eth0 has no {ip}"
    );
    let ping = run(std::process::Command::new("ping").args(["-c", "1", "-W", "2", &addr]))
        .or_else(|_| {
            run(std::process::Command::new("busybox").args(["ping", "-c", "1", "-W", "2", &addr]))
        })?;
    ensure!(ping.status.success(), "host cannot reach the pod at {addr}");
    // ADD is idempotent: the same result, no second address.
    let again = client.cni_attach(req).await?.into_inner();
    ensure!(again.ips == resp.ips);
    let allocated = |dir: &Path| -> usize {
        std::fs::read_dir(dir.join("testpods"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().starts_with("10."))
                    .count()
            })
            .unwrap_or(0)
    };
    ensure!(allocated(ipam_state.path()) == 1);

    // An unknown config is a clear error.
    let err = client
        .cni_attach(CniAttachRequest {
            container_id: "x1".into(),
            netns_path: ns.path.display().to_string(),
            config_name: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    ensure!(
        err.code() == tonic::Code::NotFound && err.message().contains("nope"),
        "{err:?}"
    );

    // DEL with the recorded arguments: the interface and the address allocation are gone.
    let del = CniDetachRequest {
        container_id: sandbox.clone(),
        config_name: String::new(),
        interface_name: String::new(),
    };
    client.cni_detach(del.clone()).await?;
    let inside = run(&mut ns.cmd(&["ip", "-o", "link", "show"]))?;
    ensure!(
        !String::from_utf8_lossy(&inside.stdout).contains("eth0"),
        "eth0 left in the namespace"
    );
    ensure!(
        allocated(ipam_state.path()) == 0,
        "host-local kept the address"
    );
    client.cni_detach(del).await?;
    // The plugin's bridge stays (CNI never deletes it); the slot's cleanup removes it.
    Ok(())
}
