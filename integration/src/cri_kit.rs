//! What the CRI tests share: the CNI plugins check, a bridge conflist for a test's own network
//! slot, and a guard that removes a pod (with its containers) when a test ends early.

use std::path::{Path, PathBuf};

use anyhow::Result;
use berth_proto::cri::runtime::v1 as cri;
use berth_proto::cri::runtime::v1::runtime_service_client::RuntimeServiceClient;

use crate::gateway_kit;
use crate::network_kit::NetSlot;

/// Whether the stack can run and the CNI reference plugins are in /usr/lib/cni (a note says
/// why not).
pub fn plugins_ready() -> bool {
    if !gateway_kit::ready() {
        return false;
    }
    for p in ["bridge", "host-local", "loopback"] {
        if !Path::new("/usr/lib/cni").join(p).is_file() {
            eprintln!("skipped: the CNI reference plugins are not in /usr/lib/cni");
            return false;
        }
    }
    true
}

/// Writes into `conf` one bridge conflist (bridge `slot.name(tag)`, host-local addresses from
/// subnet `slot.subnet(index)` kept in `ipam`); returns the subnet.
pub fn conflist(slot: &NetSlot, tag: &str, index: u8, conf: &Path, ipam: &Path) -> Result<String> {
    let subnet = slot.subnet(index);
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": format!("{tag}{}", std::process::id()),
        "plugins": [{
            "type": "bridge",
            "bridge": slot.name(tag),
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": subnet }]],
                "dataDir": ipam,
            }
        }],
    });
    std::fs::write(conf.join("10-pods.conflist"), conflist.to_string())?;
    Ok(subnet)
}

/// Stops and removes a pod (and with it its containers) through the CRI when dropped (on its
/// own thread: Drop is not async).
#[derive(Debug)]
pub struct PodGuard {
    pub socket: PathBuf,
    pub id: String,
}

impl Drop for PodGuard {
    fn drop(&mut self) {
        let (socket, id) = (self.socket.clone(), self.id.clone());
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let mut c = RuntimeServiceClient::new(berth_core::uds::channel(socket));
                let _ = c
                    .stop_pod_sandbox(cri::StopPodSandboxRequest {
                        pod_sandbox_id: id.clone(),
                    })
                    .await;
                let _ = c
                    .remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id })
                    .await;
            });
        })
        .join();
    }
}
