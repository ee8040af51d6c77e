//! The CRI's CNI networking end to end (`<state>/cri.sock`, real binaries, the reference CNI
//! plugins from /usr/lib/cni):
//! - the pod CIDR set with UpdateRuntimeConfig reaching host-local as the `ipRanges`
//!   capability (`[[{"subnet": cidr}]]`, a conflist without ranges of its own): the pod's IP
//!   is in the pod CIDR; two pod CIDRs (IPv4 and IPv6) are two range sets and give the pod an
//!   address from each (`additional_ips`), skipped when the host has IPv6 off;
//! - a single-plugin `.conf` file works, and of several configs the first in lexical order is
//!   used, also one dropped in later;
//! - a crash in the middle: `kill -9` of the engine while the pod's CNI ADD runs (the bridge
//!   plugin behind a wrapper that holds the ADD until the test lets it go) leaves no pod, no
//!   IP allocation and no veth once the engine is back; a running pod whose network namespace
//!   is lost while the engine is down (a reboot) is NOTREADY after the restart, its IP given
//!   back by a CNI DEL; `kill -9` of berth-network while it runs a pod's ADD fails the Run and
//!   leaves no pod, address, veth or namespace files once it is back.
//!
//! Root only; needs /usr/lib/cni.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use berth_core::Service;
use berth_integration::cri_kit::{
    self, PATIENCE, PodGuard, Runtime as Client, plugins_ready, pod_namespaces,
};
use berth_integration::gateway_kit::DockerStack;
use berth_integration::network_kit::NetSlot;
use berth_integration::stack::{Stack, wait_for};
use berth_proto::cri::runtime::v1 as cri;
use berth_proto::cri::runtime::v1::runtime_service_client::RuntimeServiceClient;
use serde_json::{Value, json};

fn pod_config(name: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        hostname: name.into(),
        linux: Some(pod_namespaces()),
        ..cri_kit::pod_config("berth-cri-cni", name, None)
    }
}

/// The request RunPodSandbox gets for pod `name`.
fn run_request(name: &str) -> cri::RunPodSandboxRequest {
    cri::RunPodSandboxRequest {
        config: Some(pod_config(name)),
        runtime_handler: String::new(),
    }
}

/// Runs pod `name` (removed again by the returned guard).
async fn run_pod(rt: &mut Client, d: &DockerStack, name: &str) -> Result<PodGuard> {
    let id = rt
        .run_pod_sandbox(run_request(name))
        .await
        .with_context(|| format!("run pod {name}"))?
        .into_inner()
        .pod_sandbox_id;
    Ok(PodGuard {
        socket: d.cri_socket(),
        id,
    })
}

async fn pod_status(rt: &mut Client, id: &str) -> Result<cri::PodSandboxStatusResponse> {
    Ok(rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: true,
        })
        .await?
        .into_inner())
}

/// The `info` of the pod's verbose status (the runtime's JSON).
async fn pod_info(rt: &mut Client, id: &str) -> Result<Value> {
    let status = pod_status(rt, id).await?;
    Ok(serde_json::from_str(
        status.info.get("info").context("verbose info")?,
    )?)
}

/// The pod's IP and its additional IPs.
async fn pod_ips(rt: &mut Client, id: &str) -> Result<(String, Vec<String>)> {
    let net = pod_status(rt, id)
        .await?
        .status
        .context("pod status")?
        .network
        .context("pod network")?;
    Ok((
        net.ip,
        net.additional_ips.into_iter().map(|i| i.ip).collect(),
    ))
}

/// Whether `ip` is in `cidr` (IPv4 or IPv6).
fn in_subnet(ip: &str, cidr: &str) -> Result<bool> {
    let ip: IpAddr = ip.parse().with_context(|| format!("ip {ip:?}"))?;
    let (base, len) = cidr.split_once('/').context("cidr")?;
    let (base, len): (IpAddr, u32) = (base.parse()?, len.parse()?);
    Ok(match (ip, base) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    })
}

/// A bridge plugin on bridge `bridge` with host-local addresses from `ranges` (range sets of
/// subnets) kept in `ipam`.
fn bridge_plugin(bridge: &str, ranges: &[&[&str]], ipam: &Path) -> Value {
    let ranges: Vec<Vec<Value>> = ranges
        .iter()
        .map(|set| set.iter().map(|s| json!({ "subnet": s })).collect())
        .collect();
    json!({
        "type": "bridge",
        "bridge": bridge,
        "isGateway": true,
        "ipMasq": false,
        "ipam": { "type": "host-local", "ranges": ranges, "dataDir": ipam },
    })
}

/// A conflist named `name` of the one `plugin`.
fn conflist(name: &str, plugin: Value) -> String {
    json!({ "cniVersion": "1.0.0", "name": name, "plugins": [plugin] }).to_string()
}

/// A network name unique to this test process.
fn net_name(tag: &str) -> String {
    format!("{tag}{}", std::process::id())
}

/// The addresses host-local has handed out for network `net` (its files named by IP).
fn allocated(ipam: &Path, net: &str) -> Vec<String> {
    std::fs::read_dir(ipam.join(net))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.parse::<IpAddr>().is_ok())
        .collect()
}

/// The ports (host-side veths) of `bridge`.
fn bridge_ports(bridge: &str) -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["-o", "link", "show", "master", bridge])
        .output();
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| Some(l.split(':').nth(1)?.trim().to_string()))
            .collect()
    })
    .unwrap_or_default()
}

/// A stack whose pods' CNI configs are read from `conf`; `extra`: more `[network]` lines.
fn stack(conf: &Path, extra: &str) -> Result<DockerStack> {
    DockerStack::start_from(
        Stack::builder()
            .env(
                "BERTH_NETWORK__CNI_CONF_DIR",
                conf.to_str().context("conf dir")?,
            )
            .toml(extra),
    )
}

async fn set_pod_cidr(rt: &mut Client, cidr: &str) -> Result<()> {
    rt.update_runtime_config(cri::UpdateRuntimeConfigRequest {
        runtime_config: Some(cri::RuntimeConfig {
            network_config: Some(cri::NetworkConfig {
                pod_cidr: cidr.into(),
            }),
        }),
    })
    .await?;
    Ok(())
}

/// Deletes the test's own bridges when dropped: one that never got an address (a failed ADD)
/// is not found by the slot's cleanup, which looks for bridges by address.
struct OwnBridges(Vec<String>);

impl Drop for OwnBridges {
    fn drop(&mut self) {
        for bridge in &self.0 {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", bridge])
                .output();
        }
    }
}

/// Whether the host has IPv6 on (the dual-stack check needs it).
fn ipv6_on() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/default/disable_ipv6")
        .is_ok_and(|t| t.trim() == "0")
}

/// An IPv6 /64 unique to the slot (ULA), `n` < 16.
fn subnet6(slot: &NetSlot, n: u16) -> String {
    format!("fd42:213:{:x}::/64", slot.index() * 16 + n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pod_cidr_reaches_host_local_as_ip_ranges() -> Result<()> {
    if !plugins_ready() {
        return Ok(());
    }
    let slot = NetSlot::claim()?;
    let _bridges = OwnBridges(vec![slot.name("cr")]);
    let conf = tempfile::tempdir()?;
    let ipam = tempfile::tempdir()?;
    // No ranges of its own: host-local allocates from the runtime's ranges when the plugin
    // declares the capability (the CNI conventions' `ipRanges`); it would add its own ranges
    // to them, an address from each set.
    let mut plugin = bridge_plugin(&slot.name("cr"), &[], ipam.path());
    plugin["capabilities"] = json!({ "ipRanges": true });
    let net = net_name("crr");
    std::fs::write(conf.path().join("10-pods.conflist"), conflist(&net, plugin))?;
    let d = stack(conf.path(), "")?;
    let mut rt = RuntimeServiceClient::new(berth_core::uds::channel(d.cri_socket()));

    let pod_cidr = slot.subnet(1);
    let dual = ipv6_on();
    if dual {
        set_pod_cidr(&mut rt, &format!("{pod_cidr},{}", subnet6(&slot, 1))).await?;
    } else {
        eprintln!("IPv6 is disabled on this host: the dual-stack half is skipped");
        set_pod_cidr(&mut rt, &pod_cidr).await?;
    }
    let pod = run_pod(&mut rt, &d, "ranged").await?;
    let (ip, more) = pod_ips(&mut rt, &pod.id).await?;
    ensure!(
        in_subnet(&ip, &pod_cidr)?,
        "{ip} not in the pod CIDR {pod_cidr}"
    );
    // What host-local recorded is the same address.
    ensure!(
        allocated(ipam.path(), &net).contains(&ip),
        "{ip} not allocated"
    );
    if dual {
        let v6 = subnet6(&slot, 1);
        ensure!(
            more.len() == 1 && in_subnet(&more[0], &v6)?,
            "additional IPs {more:?}, wanted one in {v6}"
        );
        // The pod's interface has both.
        let info = pod_info(&mut rt, &pod.id).await?;
        let ips: Vec<&str> = info["cniResult"]["ips"]
            .as_array()
            .context("cni result ips")?
            .iter()
            .filter_map(|i| i["address"].as_str())
            .collect();
        ensure!(ips.len() == 2, "CNI result addresses {ips:?}");
    } else {
        ensure!(more.is_empty(), "additional IPs {more:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_plugin_conf_works_and_the_first_config_wins() -> Result<()> {
    if !plugins_ready() {
        return Ok(());
    }
    let slot = NetSlot::claim()?;
    let _bridges = OwnBridges(vec![slot.name("cs"), slot.name("cl"), slot.name("cf")]);
    let conf = tempfile::tempdir()?;
    let ipam = tempfile::tempdir()?;
    // `10-single.conf`: one plugin, no `plugins` list (the CNI spec's network config).
    let single = slot.subnet(2);
    let mut plugin = bridge_plugin(&slot.name("cs"), &[&[&single]], ipam.path());
    plugin["cniVersion"] = json!("1.0.0");
    plugin["name"] = json!(net_name("crs"));
    std::fs::write(conf.path().join("10-single.conf"), plugin.to_string())?;
    // A later conflist, not used while the `.conf` sorts first.
    let later = slot.subnet(3);
    std::fs::write(
        conf.path().join("20-later.conflist"),
        conflist(
            &net_name("crl"),
            bridge_plugin(&slot.name("cl"), &[&[&later]], ipam.path()),
        ),
    )?;
    let d = stack(conf.path(), "")?;
    let mut rt = RuntimeServiceClient::new(berth_core::uds::channel(d.cri_socket()));

    let a = run_pod(&mut rt, &d, "single").await?;
    let (ip, _) = pod_ips(&mut rt, &a.id).await?;
    ensure!(
        in_subnet(&ip, &single)?,
        "{ip} not from 10-single.conf ({single})"
    );
    ensure!(
        bridge_ports(&slot.name("cs")).len() == 1,
        "no veth on the .conf's bridge"
    );
    ensure!(
        bridge_ports(&slot.name("cl")).is_empty(),
        "the later conflist was used"
    );

    // A config dropped in that sorts first is used for the next pod (no restart).
    let first = slot.subnet(4);
    std::fs::write(
        conf.path().join("05-first.conflist"),
        conflist(
            &net_name("crf"),
            bridge_plugin(&slot.name("cf"), &[&[&first]], ipam.path()),
        ),
    )?;
    let b = run_pod(&mut rt, &d, "first").await?;
    let (ip, _) = pod_ips(&mut rt, &b.id).await?;
    ensure!(
        in_subnet(&ip, &first)?,
        "{ip} not from 05-first.conflist ({first})"
    );

    // Each pod is torn down with the config it was added with.
    drop(a);
    ensure!(
        allocated(ipam.path(), &net_name("crs")).is_empty(),
        "the .conf pod's address is still allocated"
    );
    drop(b);
    ensure!(
        allocated(ipam.path(), &net_name("crf")).is_empty(),
        "the later pod's address is still allocated"
    );
    Ok(())
}

/// Lets a CNI ADD held by the wrapper plugin go when dropped (so a failing test leaves no
/// plugin waiting).
struct Release(PathBuf);

impl Drop for Release {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.0, b"");
    }
}

/// Puts a `bridge` plugin into `bin` (to be searched first): the real one, then, for ADD, a
/// mark (`adding`) and a wait until `release` exists, bounded so that nothing hangs for ever.
/// Returns the two paths.
fn held_bridge(bin: &Path) -> Result<(PathBuf, PathBuf)> {
    let (adding, release) = (bin.join("adding"), bin.join("release"));
    let wrapper = bin.join("bridge");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nout=$(/usr/lib/cni/bridge)\nrc=$?\n\
             if [ \"$CNI_COMMAND\" = ADD ]; then\n  : > {adding}\n  n=0\n  \
             while [ ! -e {release} ] && [ $n -lt 1200 ]; do sleep 0.1; n=$((n+1)); done\nfi\n\
             printf '%s' \"$out\"\nexit $rc\n",
            adding = adding.display(),
            release = release.display(),
        ),
    )?;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    Ok((adding, release))
}

/// A stack whose bridge plugin ([`held_bridge`]) holds every ADD, with one RunPodSandbox of a
/// pod under way and held mid-ADD. Dropped: the ADD let go, the stack stopped, the bridge and
/// the test's files removed.
struct HeldAdd {
    rt: Client,
    d: DockerStack,
    /// The RunPodSandbox under way.
    pending:
        tokio::task::JoinHandle<Result<tonic::Response<cri::RunPodSandboxResponse>, tonic::Status>>,
    /// Written, the held ADD goes on.
    release: PathBuf,
    _release: Release,
    subnet: String,
    bridge: String,
    net: String,
    ipam: tempfile::TempDir,
    _bin: tempfile::TempDir,
    _conf: tempfile::TempDir,
    _bridges: OwnBridges,
    _slot: NetSlot,
}

impl HeldAdd {
    /// Bridge `slot.name(bridge_tag)`, network `net_name(net_tag)` on subnet `index`; runs pod
    /// `pod` and returns once its ADD has taken an address and is held.
    async fn start(bridge_tag: &str, net_tag: &str, index: u8, pod: &str) -> Result<Self> {
        let slot = NetSlot::claim()?;
        let bridges = OwnBridges(vec![slot.name(bridge_tag)]);
        let conf = tempfile::tempdir()?;
        let ipam = tempfile::tempdir()?;
        let bin = tempfile::tempdir()?;
        let subnet = slot.subnet(index);
        let bridge = slot.name(bridge_tag);
        let net = net_name(net_tag);
        std::fs::write(
            conf.path().join("10-pods.conflist"),
            conflist(&net, bridge_plugin(&bridge, &[&[&subnet]], ipam.path())),
        )?;
        let (adding, release) = held_bridge(bin.path())?;
        let release_guard = Release(release.clone());
        let d = stack(
            conf.path(),
            &format!(
                "cni_bin_dirs = [\"{}\", \"/usr/lib/cni\"]",
                bin.path().display()
            ),
        )?;
        let rt = RuntimeServiceClient::new(berth_core::uds::channel(d.cri_socket()));
        let mut run = rt.clone();
        let request = run_request(pod);
        let pending = tokio::spawn(async move { run.run_pod_sandbox(request).await });
        ensure!(
            wait_for(PATIENCE, || adding.exists().then_some(())).is_some(),
            "the CNI ADD never ran; log:\n{}",
            d.stack.log_text()
        );
        ensure!(allocated(ipam.path(), &net).len() == 1, "no address taken");
        Ok(Self {
            rt,
            d,
            pending,
            release,
            _release: release_guard,
            subnet,
            bridge,
            net,
            ipam,
            _bin: bin,
            _conf: conf,
            _bridges: bridges,
            _slot: slot,
        })
    }
}

/// The namespace directories of the pods the engine keeps (`<state>/sandboxes/<id>`).
fn sandbox_dirs(d: &DockerStack) -> Vec<String> {
    std::fs::read_dir(d.stack.state_dir().join("sandboxes"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_the_cni_add_leaves_nothing_after_the_restart() -> Result<()> {
    if !plugins_ready() {
        return Ok(());
    }
    let h = HeldAdd::start("ck", "crk", 5, "crashed").await?;
    let (d, mut rt, ipam, release) = (&h.d, h.rt.clone(), &h.ipam, &h.release);
    let (subnet, bridge, net) = (&h.subnet, &h.bridge, &h.net);
    let pending = h.pending;
    // Mid-ADD (its address taken, as HeldAdd saw): the veth is on the bridge.
    ensure!(bridge_ports(bridge).len() == 1, "no veth on {bridge}");

    d.kill9(Service::Engine)?;
    // The ADD may now finish: berth-network had it in hand.
    std::fs::write(release, b"")?;
    let answered = pending.await?;
    ensure!(answered.is_err(), "RunPodSandbox succeeded: {answered:?}");

    // The restarted engine removed the half-made pod and DELeted its attachment.
    let gone = wait_for(PATIENCE, || {
        (allocated(ipam.path(), net).is_empty() && bridge_ports(bridge).is_empty()).then_some(())
    });
    ensure!(
        gone.is_some(),
        "left after the restart: addresses {:?}, veths {:?}; log:\n{}",
        allocated(ipam.path(), net),
        bridge_ports(bridge),
        d.stack.log_text()
    );
    let pods = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await?
        .into_inner()
        .items;
    ensure!(pods.is_empty(), "pods after the restart: {pods:?}");

    // The name is free again and the network works.
    let pod = run_pod(&mut rt, d, "crashed").await?;
    let (ip, _) = pod_ips(&mut rt, &pod.id).await?;
    ensure!(in_subnet(&ip, subnet)?, "{ip} not in {subnet}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_lost_its_network_namespace_is_notready_after_a_restart() -> Result<()> {
    if !plugins_ready() {
        return Ok(());
    }
    let slot = NetSlot::claim()?;
    let _bridges = OwnBridges(vec![slot.name("cn")]);
    let conf = tempfile::tempdir()?;
    let ipam = tempfile::tempdir()?;
    let subnet = slot.subnet(6);
    let bridge = slot.name("cn");
    let net = net_name("crn");
    std::fs::write(
        conf.path().join("10-pods.conflist"),
        conflist(&net, bridge_plugin(&bridge, &[&[&subnet]], ipam.path())),
    )?;
    let d = stack(conf.path(), "")?;
    let mut rt = RuntimeServiceClient::new(berth_core::uds::channel(d.cri_socket()));
    let pod = run_pod(&mut rt, &d, "lost").await?;
    let (ip, _) = pod_ips(&mut rt, &pod.id).await?;
    ensure!(
        allocated(ipam.path(), &net) == [ip.clone()],
        "{ip} not allocated"
    );

    // What a reboot leaves: the namespace file no longer holds a namespace (the bind mount is
    // gone, and with the namespace the veth pair).
    let info = pod_info(&mut rt, &pod.id).await?;
    let netns = info["namespaces"]["network"]
        .as_str()
        .context("network namespace path")?
        .to_string();
    let out = std::process::Command::new("umount").arg(&netns).output()?;
    ensure!(out.status.success(), "umount {netns}: {out:?}");

    d.kill9(Service::Engine)?;
    let deadline = std::time::Instant::now() + PATIENCE;
    let mut state = None;
    while state.is_none() && std::time::Instant::now() < deadline {
        state = pod_status(&mut rt, &pod.id)
            .await
            .ok()
            .and_then(|st| st.status)
            .filter(|s| s.state() == cri::PodSandboxState::SandboxNotready);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        state.is_some(),
        "the pod is not NOTREADY after the restart; log:\n{}",
        d.stack.log_text()
    );
    // The attachment was DELeted: host-local gave the address back.
    ensure!(
        allocated(ipam.path(), &net).is_empty(),
        "still allocated: {:?}",
        allocated(ipam.path(), &net)
    );
    ensure!(bridge_ports(&bridge).is_empty(), "veths left on {bridge}");

    // Stop and remove still work on it.
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.id.clone(),
    })
    .await?;
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.id.clone(),
    })
    .await?;
    let pods = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await?
        .into_inner()
        .items;
    ensure!(pods.is_empty(), "pods after remove: {pods:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_daemon_killed_during_the_cni_add_leaves_nothing() -> Result<()> {
    if !plugins_ready() {
        return Ok(());
    }
    let h = HeldAdd::start("cw", "crw", 7, "orphan").await?;
    let (d, mut rt, ipam, release) = (&h.d, h.rt.clone(), &h.ipam, &h.release);
    let (subnet, bridge, net) = (&h.subnet, &h.bridge, &h.net);
    let pending = h.pending;

    // berth-network dies with the ADD in hand; its plugin runs on and finishes.
    d.kill9(Service::Network)?;
    std::fs::write(release, b"")?;
    let answered = pending.await?;
    ensure!(answered.is_err(), "RunPodSandbox succeeded: {answered:?}");

    // The engine retries the teardown of the failed pod until berth-network is back (its
    // DEL first), then forgets the pod.
    let deadline = std::time::Instant::now() + PATIENCE;
    let mut pods = Vec::new();
    loop {
        pods = rt
            .list_pod_sandbox(cri::ListPodSandboxRequest::default())
            .await
            .map(|r| r.into_inner().items)
            .unwrap_or(pods);
        let clean = pods.is_empty()
            && allocated(ipam.path(), net).is_empty()
            && bridge_ports(bridge).is_empty()
            && sandbox_dirs(d).is_empty();
        if clean {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "left: pods {pods:?}, addresses {:?}, veths {:?}, pod namespace dirs {:?}; log:\n{}",
            allocated(ipam.path(), net),
            bridge_ports(bridge),
            sandbox_dirs(d),
            d.stack.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pod = run_pod(&mut rt, d, "orphan").await?;
    let (ip, _) = pod_ips(&mut rt, &pod.id).await?;
    ensure!(in_subnet(&ip, subnet)?, "{ip} not in {subnet}");
    Ok(())
}
