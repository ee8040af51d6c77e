//! Connecting a container to more networks, and disconnecting it, live or for later starts.

use berth_core::{Error, Result};
use berth_proto::berth::engine::v1 as pb;
use berth_proto::berth::network::v1 as net;
use berth_proto::berth::types::v1 as types;

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
        for link in &endpoint.links {
            let (child, _) = crate::links::parse(link)?;
            self.linked(&child)?;
        }
        if !endpoint.mac_address.is_empty() && !super::create::valid_mac(&endpoint.mac_address) {
            return Err(Error::invalid_argument(format!(
                "invalid MAC address {}",
                endpoint.mac_address
            )));
        }
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
            settings = Some(endpoint_settings(&att, Some(endpoint.clone())));
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

    /// The legacy links of a container about to start on the default bridge: the variables
    /// they inject and their `/etc/hosts` entries. Every linked container must be running, as
    /// in Docker.
    pub(super) fn link_children(
        &self,
        rec: &crate::record::Record,
    ) -> Result<(Vec<String>, Vec<types::HostEntry>)> {
        let hc = rec.host_config();
        let (mut env, mut hosts) = (Vec::new(), Vec::new());
        if network_mode(hc) != "bridge" {
            return Ok((env, hosts));
        }
        for link in &hc.links {
            let (child, alias) = crate::links::parse(link)?;
            let link_name = format!("/{}/{alias}", rec.c.name);
            let target = self.linked(&child)?;
            let info = target.with(|r| {
                let ip =
                    r.c.network_settings
                        .as_ref()
                        .and_then(|s| s.networks.get("bridge"))
                        .map(|e| e.ip_address.clone());
                (
                    r.is_running(),
                    r.id().to_string(),
                    crate::links::Child {
                        name: r.c.name.clone(),
                        hostname: r.config().hostname.clone(),
                        ip: ip.clone().unwrap_or_default(),
                        env: r.config().env.clone(),
                        ports: r.config().exposed_ports.clone(),
                    },
                    ip.is_some(),
                )
            });
            let (running, id, child, on_bridge) = info;
            if !running {
                return Err(Error::internal(format!(
                    "Cannot link to a non running container: /{} AS {link_name}",
                    child.name
                )));
            }
            if !on_bridge {
                return Err(Error::internal(format!(
                    "container {id} not attached to default bridge network"
                )));
            }
            env.extend(crate::links::env(&link_name, &child));
            hosts.push(crate::links::host_entry(&alias, &child));
        }
        Ok((env, hosts))
    }

    /// `DELETE /containers/{parent}/{alias}?link=1`: removes the link `alias` of `parent`.
    pub async fn remove_link(&self, input: &str) -> Result<()> {
        let name = input.trim_start_matches('/');
        let Some((parent, alias)) = name.rsplit_once('/') else {
            return Err(Error::failed_precondition(
                "Conflict, cannot remove the default link name of the container",
            ));
        };
        let ctr = self.get(parent).map_err(|_| {
            Error::not_found(format!("Cannot get parent {parent} for link name /{name}"))
        })?;
        let _op = ctr.op.lock().await;
        let found = ctr.with(|r| {
            r.host_config()
                .links
                .iter()
                .any(|l| crate::links::alias_of(l).as_deref() == Some(alias))
        });
        if !found {
            return Err(Error::not_found(format!("No such container: {name}")));
        }
        ctr.update(|r| {
            if let Some(hc) = r.c.host_config.as_mut() {
                hc.links
                    .retain(|l| crate::links::alias_of(l).as_deref() != Some(alias));
            }
        });
        // A running container's /etc/hosts forgets the alias now (in place: it is
        // bind-mounted), as Docker's sandbox update does.
        let (running, hosts) = ctr.with(|r| (r.is_running(), r.c.hosts_path.clone()));
        if running && let Ok(text) = std::fs::read_to_string(&hosts) {
            let kept: String = text
                .lines()
                .filter(|l| l.split_whitespace().nth(1) != Some(alias))
                .map(|l| format!("{l}\n"))
                .collect();
            if kept != text {
                let _ = std::fs::write(&hosts, kept);
            }
        }
        self.persist(&ctr).await
    }

    /// After a rename, the links that name the container (as the linked one or as the linker)
    /// follow it, as Docker's link index does.
    pub(super) async fn rename_links(&self, old: &str, new: &str) {
        for ctr in self.all() {
            let changed = ctr.with(|r| {
                r.host_config().links.iter().any(|l| {
                    crate::links::parse(l).is_ok_and(|(child, _)| child == old)
                        || l.contains(&format!(":/{old}/"))
                }) || r.c.networks.values().any(|ep| {
                    ep.links
                        .iter()
                        .any(|l| crate::links::parse(l).is_ok_and(|(child, _)| child == old))
                })
            });
            if !changed {
                continue;
            }
            ctr.update(|r| {
                let parent = r.c.name.clone();
                if let Some(hc) = r.c.host_config.as_mut() {
                    for l in hc.links.iter_mut() {
                        if let Ok((child, alias)) = crate::links::parse(l) {
                            let child = if child == old { new.to_string() } else { child };
                            *l = crate::links::record(&child, &parent, &alias);
                        }
                    }
                }
                for ep in r.c.networks.values_mut() {
                    for l in ep.links.iter_mut() {
                        if let Ok((child, alias)) = crate::links::parse(l)
                            && child == old
                        {
                            *l = format!("{new}:{alias}");
                        }
                    }
                }
            });
            if let Err(e) = self.persist(&ctr).await {
                tracing::warn!(id = %ctr.id, error = %e.chain(), "persisting renamed links");
            }
        }
    }
}

/// A container's endpoint as the network attached it, with what was `requested`.
pub(super) fn endpoint_settings(
    att: &net::Attachment,
    requested: Option<pb::EndpointConfig>,
) -> pb::EndpointSettings {
    pb::EndpointSettings {
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
        config: requested,
    }
}
