//! Connecting a container to more networks, and disconnecting it, live or for later starts.

use berth_core::{Error, Result};
use berth_proto::berth::engine::v1 as pb;
use berth_proto::berth::network::v1 as net;

use super::Engine;
use super::create::network_mode;

impl Engine {
    /// Connects a container to `network`: live when it runs, recorded for later starts.
    pub async fn connect_network(
        &self,
        input: &str,
        network: &str,
        endpoint: pb::EndpointConfig,
    ) -> Result<Option<pb::EndpointSettings>> {
        let ctr = self.get(input)?;
        let _op = ctr.op.lock().await;
        let rec = ctr.record();
        let mode = network_mode(rec.host_config()).to_string();
        if matches!(mode.as_str(), "host" | "none") || mode.starts_with("container:") {
            return Err(Error::failed_precondition(format!(
                "container sharing network namespace with another container or host cannot be connected to any other network (network mode {mode})"
            )));
        }
        let (net_id, name) = self.deps.networks.get(network).await?;
        if rec.c.networks.contains_key(&name)
            || rec.c.networks.contains_key(&net_id)
            || rec
                .c
                .network_settings
                .as_ref()
                .is_some_and(|s| s.networks.contains_key(&name))
        {
            return Err(Error::already_exists(format!(
                "endpoint with name {} already exists in network {name}",
                rec.c.name
            )));
        }
        let mut settings = None;
        if rec.is_running()
            && let Some(ns) = rec.p.netns.clone()
        {
            let att = self
                .deps
                .networks
                .attach(net::AttachRequest {
                    container_id: rec.id().into(),
                    container_name: rec.c.name.clone(),
                    hostname: rec.config().hostname.clone(),
                    netns_path: ns.display().to_string(),
                    network: net_id.clone(),
                    aliases: endpoint.aliases.clone(),
                    ipv4_address: endpoint.ipv4_address.clone(),
                    ipv6_address: endpoint.ipv6_address.clone(),
                    mac_address: endpoint.mac_address.clone(),
                    driver_opts: endpoint.driver_opts.clone(),
                    gw_priority: endpoint.gw_priority,
                    links: endpoint.links.clone(),
                    ..Default::default()
                })
                .await?;
            settings = Some(pb::EndpointSettings {
                network_id: att.network_id.clone(),
                endpoint_id: att.endpoint_id.clone(),
                ip_address: att.ipv4_address.clone(),
                ip_prefix_len: att.ipv4_prefix_len,
                gateway: att.ipv4_gateway.clone(),
                mac_address: att.mac_address.clone(),
                ipv6_address: att.ipv6_address.clone(),
                ipv6_prefix_len: att.ipv6_prefix_len,
                ipv6_gateway: att.ipv6_gateway.clone(),
                aliases: att.aliases.clone(),
                dns_names: att.dns_names.clone(),
                interface_name: att.interface_name.clone(),
                config: Some(endpoint.clone()),
            });
            // The container's /etc/hosts learns its new address.
            let hosts = std::path::Path::new(&rec.c.hosts_path);
            if let Ok(mut text) = std::fs::read_to_string(hosts) {
                for h in &att.hosts {
                    if !h.ip.is_empty() && !text.contains(&h.ip) {
                        text.push_str(&format!("{}\t{}\n", h.ip, h.hostnames.join(" ")));
                    }
                }
                // In place: the file is bind-mounted into the container.
                let _ = std::fs::write(hosts, text);
            }
        }
        ctr.update(|r| {
            r.c.networks.insert(name.clone(), endpoint);
            if let Some(s) = &settings {
                r.p.attached = true;
                r.c.network_settings
                    .get_or_insert_with(Default::default)
                    .networks
                    .insert(name.clone(), s.clone());
            }
        });
        self.persist(&ctr).await?;
        Ok(settings)
    }

    /// Disconnects a container from `network`.
    pub async fn disconnect_network(&self, input: &str, network: &str, force: bool) -> Result<()> {
        let ctr = self.get(input)?;
        let _op = ctr.op.lock().await;
        let rec = ctr.record();
        let resolved = self.deps.networks.get(network).await;
        let (net_id, name) = match resolved {
            Ok(x) => x,
            Err(_) if force => (network.to_string(), network.to_string()),
            Err(e) => return Err(e),
        };
        let key = [name.as_str(), net_id.as_str(), network]
            .into_iter()
            .find(|k| rec.c.networks.contains_key(*k))
            .map(str::to_string);
        let live = rec
            .c
            .network_settings
            .as_ref()
            .is_some_and(|s| s.networks.contains_key(&name));
        if key.is_none() && !live {
            return Err(Error::failed_precondition(format!(
                "container {} is not connected to network {network}",
                rec.id()
            )));
        }
        if rec.is_running() && live {
            match self.deps.networks.detach(rec.id(), &net_id, force).await {
                Ok(()) => {}
                Err(e) if force => {
                    tracing::warn!(id = %ctr.id, error = %e.chain(), "forced disconnect")
                }
                Err(e) => return Err(e),
            }
        }
        ctr.update(|r| {
            if let Some(k) = &key {
                r.c.networks.remove(k);
            }
            if let Some(s) = r.c.network_settings.as_mut() {
                s.networks.remove(&name);
            }
        });
        self.persist(&ctr).await
    }
}
