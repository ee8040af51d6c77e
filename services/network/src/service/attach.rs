//! Attachments: attach and detach a container's endpoint, default routes, lookups.

#[allow(unused_imports)]
use super::*;

impl NetworkService {
    pub(super) fn describe(&self, st: &State, att: &AttachmentRecord) -> AttachmentInfo {
        let net = st.networks.get(&att.network_id);
        let resolv = self.deps.host.resolv_conf();
        let host_servers = dns::resolv_conf_nameservers(&resolv);
        let s = &self.settings;
        let dns_search = first_non_empty([
            &att.dns_search,
            &s.dns_search,
            &resolv_conf_lists(&resolv, "search"),
        ]);
        let dns_options = first_non_empty([
            &att.dns_options,
            &s.dns_options,
            &resolv_conf_lists(&resolv, "options"),
        ]);
        let dns_servers = match net {
            Some(n) if n.dns_enabled && att.ipv4_gateway.is_some() => {
                vec![att.ipv4_gateway.map(|g| g.to_string()).unwrap_or_default()]
            }
            Some(n) if n.driver == Driver::Host => {
                first_non_empty([&att.dns_servers, &s.dns, &host_servers])
            }
            _ => {
                // A resolver on the host's loopback is unreachable from the container, as in
                // Docker; fall back to public resolvers when nothing else is left.
                let reachable: Vec<String> = host_servers
                    .iter()
                    .filter(|h| h.parse::<IpAddr>().is_ok_and(|ip| !ip.is_loopback()))
                    .cloned()
                    .collect();
                let mut out = first_non_empty([&att.dns_servers, &s.dns, &reachable]);
                if out.is_empty() {
                    out = vec!["8.8.8.8".into(), "8.8.4.4".into()];
                }
                out
            }
        };
        let mut hosts: Vec<(IpAddr, Vec<String>)> = Vec::new();
        if !att.hostname.is_empty() {
            for ip in att.ips() {
                hosts.push((ip, vec![att.hostname.clone()]));
            }
        }
        if net.is_some_and(|n| !n.dns_enabled) {
            for link in &att.links {
                let (name, alias) = link
                    .split_once(':')
                    .unwrap_or((link.as_str(), link.as_str()));
                let name = name.trim_start_matches('/');
                let alias = alias.trim_start_matches('/');
                let target = st.endpoints_of(&att.network_id).into_iter().find(|o| {
                    o.container_id != att.container_id
                        && (o.container_name == name
                            || (name.len() >= 12 && o.container_id.starts_with(name)))
                });
                if let Some(ip) = target.and_then(|t| t.ipv4) {
                    let mut names = vec![alias.to_string()];
                    if alias != name {
                        names.push(name.to_string());
                    }
                    hosts.push((ip, names));
                }
            }
        }
        AttachmentInfo {
            record: att.clone(),
            network_name: net.map(|n| n.name.clone()).unwrap_or_default(),
            dns_servers,
            dns_search,
            dns_options,
            hosts,
        }
    }

    /// Connects a container's namespace to a network (see `Networks.Attach`).
    pub fn attach(&self, req: AttachRequest) -> Result<AttachmentInfo> {
        if !Id::is_valid(&req.container_id) {
            return Err(Error::invalid_argument(format!(
                "invalid container id {:?}: want 64 lowercase hex characters",
                req.container_id
            )));
        }
        if !req.ifname.is_empty() {
            validate_ifname(&req.ifname)?;
        }
        let _busy = self.busy.enter(&req.container_id);
        let mut st = self.lock();
        let net = st.resolve(&req.network)?.clone();
        let key = attachment_key(&req.container_id, &net.id);
        let mut previous_ipv4 = None;
        if let Some(existing) = st.attachments.get(&key).cloned() {
            let same_netns = existing.netns_path == req.netns_path
                && (existing.netns_path.is_empty()
                    || self
                        .deps
                        .dataplane
                        .netns_alive(Path::new(&existing.netns_path)));
            if same_netns {
                self.restore_endpoint(&net, &existing)?;
                return Ok(self.describe(&st, &existing));
            }
            // The container got a new namespace (it was restarted): replace the endpoint,
            // keeping its address when it can.
            self.drop_endpoint(&existing)?;
            st.store.apply(&[Op::DeleteAttachment(key.clone())])?;
            st.attachments.remove(&key);
            previous_ipv4 = existing.ipv4;
        }
        let others: Vec<AttachmentRecord> = st
            .of_container(&req.container_id)
            .into_iter()
            .cloned()
            .collect();
        let exclusive = |n: &NetworkRecord| matches!(n.driver, Driver::Host | Driver::Null);
        if let Some(o) = others.first() {
            let other_net = st.networks.get(&o.network_id);
            if exclusive(&net) || other_net.is_some_and(exclusive) {
                return Err(Error::failed_precondition(format!(
                    "container {} is attached to network {}: the host and none networks cannot be combined with others",
                    &req.container_id[..12],
                    other_net.map_or("?", |n| n.name.as_str())
                )));
            }
        }
        let mut record = AttachmentRecord {
            container_id: req.container_id.clone(),
            container_name: req.container_name.trim_start_matches('/').to_string(),
            hostname: req.hostname.clone(),
            network_id: net.id.clone(),
            endpoint_id: Id::random().to_string(),
            netns_path: req.netns_path.clone(),
            ifname: String::new(),
            host_ifname: String::new(),
            mac: String::new(),
            ipv4: None,
            ipv4_prefix: 0,
            ipv4_gateway: None,
            ipv6: None,
            ipv6_prefix: 0,
            ipv6_gateway: None,
            ports: Vec::new(),
            aliases: req.aliases.clone(),
            dns_names: Vec::new(),
            dns_servers: req.dns_servers.clone(),
            dns_search: req.dns_search.clone(),
            dns_options: req.dns_options.clone(),
            links: req.links.clone(),
            gw_priority: req.gw_priority,
            default_route: false,
            created_ns: now_ns(),
        };
        if !net.is_bridge() {
            st.store.apply(&[Op::PutAttachment(&record)])?;
            st.attachments.insert(key, record.clone());
            self.publish_connect(&net, &record);
            return Ok(self.describe(&st, &record));
        }

        if req.netns_path.is_empty() {
            return Err(Error::invalid_argument(
                "netns_path is required to attach to a bridge network",
            ));
        }
        if !self.deps.dataplane.netns_alive(Path::new(&req.netns_path)) {
            return Err(Error::failed_precondition(format!(
                "{} is not a network namespace",
                req.netns_path
            )));
        }
        if net.builtin && (req.ipv4.is_some() || req.ipv6.is_some()) {
            return Err(Error::invalid_argument(
                "user specified IP address is supported on user defined networks only",
            ));
        }
        if net.builtin && !req.aliases.is_empty() {
            return Err(Error::invalid_argument(
                "network-scoped aliases are supported for user-defined networks only",
            ));
        }

        // Detached endpoints keep their addresses while their veth may live. One asked for
        // again is freed now (its veth deleted), and so are all of the network's when its pool
        // has nothing else left.
        let wanted: Vec<IpAddr> = req
            .ipv4
            .iter()
            .chain(req.ipv6.iter())
            .chain(previous_ipv4.iter())
            .copied()
            .collect();
        let on_net = |a: &AttachmentRecord| a.network_id == net.id;
        if st.releasing.values().any(|r| on_net(&r.att)) {
            let exhausted = net.ipv4.as_ref().is_some_and(|pool| {
                let used: BTreeSet<IpAddr> = st
                    .holders_of(&net.id)
                    .iter()
                    .filter_map(|a| a.ipv4)
                    .collect();
                req.ipv4.is_none() && pool.allocate(&used, net.last_ipv4).is_err()
            });
            self.force_release(&mut st, |a| {
                on_net(a) && (exhausted || a.ips().any(|ip| wanted.contains(&ip)))
            })?;
        }

        // Addresses.
        let endpoints = st.holders_of(&net.id);
        let mut net_update = net.clone();
        if let Some(pool) = &net.ipv4 {
            let used: BTreeSet<IpAddr> = endpoints.iter().filter_map(|a| a.ipv4).collect();
            let ip = pick_address(pool, req.ipv4, previous_ipv4, &used, net.last_ipv4)?;
            record.ipv4 = Some(ip);
            record.ipv4_prefix = pool.subnet.prefix();
            record.ipv4_gateway = Some(pool.gateway);
            net_update.last_ipv4 = Some(ip);
        }
        if let Some(pool) = &net.ipv6 {
            let used: BTreeSet<IpAddr> = endpoints.iter().filter_map(|a| a.ipv6).collect();
            let ip = pick_address(pool, req.ipv6, None, &used, net.last_ipv6)?;
            record.ipv6 = Some(ip);
            record.ipv6_prefix = pool.subnet.prefix();
            record.ipv6_gateway = Some(pool.gateway);
            net_update.last_ipv6 = Some(ip);
        } else if req.ipv6.is_some() {
            return Err(Error::invalid_argument(format!(
                "network {} has no IPv6 subnet",
                net.name
            )));
        }
        let mac = match (req.mac, v4(record.ipv4)) {
            (Some(m), _) => m,
            (None, Some(ip)) => ipam::mac_from_ipv4(ip),
            (None, None) => ipam::random_mac(),
        };
        record.mac = ipam::format_mac(&mac);

        // Interface names.
        let taken: BTreeSet<&str> = others.iter().map(|a| a.ifname.as_str()).collect();
        record.ifname = if req.ifname.is_empty() {
            (0..)
                .map(|i| format!("eth{i}"))
                .find(|n| !taken.contains(n.as_str()))
                .unwrap_or_default()
        } else if taken.contains(req.ifname.as_str()) {
            return Err(Error::already_exists(format!(
                "interface {} is already used by another network of this container",
                req.ifname
            )));
        } else {
            req.ifname.clone()
        };
        record.host_ifname = format!("veth{}", &record.endpoint_id[..7]);

        // Published ports.
        if net.internal {
            if !req.ports.is_empty() || req.publish_all {
                tracing::warn!(
                    network = net.name,
                    "ports are not published on internal networks"
                );
            }
        } else {
            let mut wanted = req.ports.clone();
            if req.publish_all {
                for (port, proto) in &req.exposed {
                    if !wanted
                        .iter()
                        .any(|w| w.container_port == *port && w.proto == *proto)
                    {
                        wanted.push(PortRequest::new("", 0, 0, *port as u32, *proto)?);
                    }
                }
            }
            for w in &mut wanted {
                if w.host_ip.is_none() {
                    w.host_ip = net.host_binding_ipv4;
                }
            }
            let held: Vec<Held<'_>> = st
                .attachments
                .values()
                .flat_map(|a| {
                    a.ports.iter().map(move |b| Held {
                        owner: &a.container_id,
                        binding: b,
                    })
                })
                .collect();
            record.ports = ports::allocate(&wanted, &held, self.deps.host.as_ref())?;
        }

        // DNS names.
        if net.dns_enabled {
            let mut names: Vec<String> = Vec::new();
            let candidates = [
                record.container_name.clone(),
                req.hostname.clone(),
                req.container_id[..12].to_string(),
            ];
            for n in candidates.iter().chain(req.aliases.iter()) {
                let n = dns::normalize(n);
                if !n.is_empty() && !names.contains(&n) {
                    names.push(n);
                }
            }
            record.dns_names = names;
        }

        // The default route: the first non-internal network, or a higher priority.
        let holder = others.iter().find(|a| a.default_route).cloned();
        if !net.internal && record.ipv4_gateway.is_some() {
            record.default_route = holder
                .as_ref()
                .is_none_or(|h| req.gw_priority > h.gw_priority);
        }
        let demoted = holder.filter(|_| record.default_route).map(|mut h| {
            h.default_route = false;
            h
        });

        // Records first: after a crash the attachment is found and cleaned up or restored.
        let mut ops = vec![Op::PutAttachment(&record), Op::PutNetwork(&net_update)];
        if let Some(d) = &demoted {
            ops.push(Op::PutAttachment(d));
        }
        st.store.apply(&ops)?;
        st.attachments.insert(key.clone(), record.clone());
        st.networks.insert(net.id.clone(), net_update);
        if let Some(d) = &demoted {
            st.attachments.insert(d.key(), d.clone());
        }
        drop(st);

        // The kernel work runs without the lock: attaches of other containers overlap.
        let made = Self::endpoint_spec(&net, &record)
            .and_then(|spec| self.deps.dataplane.create_endpoint(&spec))
            .and_then(|()| {
                self.deps
                    .firewall
                    .ensure(&rules::port_rules(&self.chains, &record))
            })
            .and_then(|()| self.deps.proxy.publish(&record));
        if let Err(e) = made {
            if !record.ports.is_empty() {
                self.deps.proxy.unpublish(&record.endpoint_id);
                let _ = self
                    .deps
                    .firewall
                    .remove(&[self.chains.endpoint_tag(&record.endpoint_id)]);
            }
            let _ = self.deps.dataplane.delete_endpoint(&record.host_ifname);
            let restored = demoted.map(|mut d| {
                d.default_route = true;
                d
            });
            let mut st = self.lock();
            // The network's last addresses go back unless another attach moved them meanwhile.
            let rewound = st.networks.get(&net.id).cloned().map(|mut n| {
                if n.last_ipv4 == record.ipv4 {
                    n.last_ipv4 = net.last_ipv4;
                }
                if n.last_ipv6 == record.ipv6 {
                    n.last_ipv6 = net.last_ipv6;
                }
                n
            });
            let mut ops = vec![Op::DeleteAttachment(key.clone())];
            if let Some(n) = &rewound {
                ops.push(Op::PutNetwork(n));
            }
            if let Some(d) = &restored {
                ops.push(Op::PutAttachment(d));
            }
            st.store.apply(&ops)?;
            st.attachments.remove(&key);
            if let Some(n) = rewound {
                st.networks.insert(n.id.clone(), n);
            }
            if let Some(d) = restored {
                st.attachments.insert(d.key(), d);
            }
            return Err(e);
        }
        let mut st = self.lock();
        if net.dns_enabled {
            self.refresh_dns(&mut st);
        }
        tracing::info!(
            container = record.container_id,
            network = net.name,
            ip = ?record.ipv4,
            ports = record.ports.len(),
            "attached"
        );
        self.publish_connect(&net, &record);
        Ok(self.describe(&st, &record))
    }

    pub(super) fn publish_connect(&self, net: &NetworkRecord, att: &AttachmentRecord) {
        self.deps.events.publish(
            "connect",
            &net.id,
            BTreeMap::from([
                ("name".into(), net.name.clone()),
                ("type".into(), net.driver.as_str().into()),
                ("container".into(), att.container_id.clone()),
            ]),
        );
    }

    /// Makes sure an existing attachment's kernel side is there (Attach is idempotent).
    pub(super) fn restore_endpoint(
        &self,
        net: &NetworkRecord,
        att: &AttachmentRecord,
    ) -> Result<()> {
        if !net.is_bridge() || att.host_ifname.is_empty() {
            return Ok(());
        }
        if !self.deps.dataplane.link_exists(&att.host_ifname)? {
            if !self.deps.dataplane.netns_alive(Path::new(&att.netns_path)) {
                return Err(Error::failed_precondition(format!(
                    "the attachment's namespace {} is gone; detach first",
                    att.netns_path
                )));
            }
            self.deps
                .dataplane
                .create_endpoint(&Self::endpoint_spec(net, att)?)?;
        }
        self.deps
            .firewall
            .ensure(&rules::port_rules(&self.chains, att))?;
        self.deps.proxy.publish(att)
    }

    /// Removes an endpoint's rules and veth.
    pub(super) fn drop_endpoint(&self, att: &AttachmentRecord) -> Result<()> {
        self.drop_rules(att)?;
        match att.host_ifname.as_str() {
            "" => Ok(()),
            name => self.deps.dataplane.delete_endpoint(name),
        }
    }

    /// Removes an endpoint's port rules. Only published ports have rules of their own, so an
    /// endpoint without any costs no `iptables-save`.
    pub(super) fn drop_rules(&self, att: &AttachmentRecord) -> Result<()> {
        self.deps.proxy.unpublish(&att.endpoint_id);
        if att.ports.is_empty() {
            return Ok(());
        }
        self.deps
            .firewall
            .remove(&[self.chains.endpoint_tag(&att.endpoint_id)])
    }

    /// Disconnects a container from one network (or, with `network` empty, from all).
    /// Returns the ids of the networks it was detached from.
    ///
    /// The records leave the API at once; the addresses stay taken until the veth is gone
    /// (see [`Releasing`]). When the namespace is already gone the kernel is removing the veth
    /// and this returns without waiting for it; otherwise the veth is deleted before it returns.
    pub fn detach(&self, container_id: &str, network: &str, force: bool) -> Result<Vec<String>> {
        if container_id.is_empty() {
            return Err(Error::invalid_argument("container_id is required"));
        }
        let _busy = self.busy.enter(container_id);
        let targets: Vec<Releasing> = {
            let mut st = self.lock();
            let targets: Vec<AttachmentRecord> = if network.is_empty() {
                st.of_container(container_id).into_iter().cloned().collect()
            } else {
                let net = st.resolve(network)?;
                let key = attachment_key(container_id, &net.id);
                match st.attachments.get(&key) {
                    Some(a) => vec![a.clone()],
                    None => {
                        return Err(Error::not_found(format!(
                            "container {container_id} is not connected to network {}",
                            net.name
                        )));
                    }
                }
            };
            let now = Instant::now();
            targets
                .into_iter()
                .map(|att| {
                    let deferred = !att.host_ifname.is_empty()
                        && !self.deps.dataplane.netns_alive(Path::new(&att.netns_path));
                    st.attachments.remove(&att.key());
                    let r = Releasing {
                        att,
                        since: now,
                        deferred,
                    };
                    st.releasing.insert(r.att.endpoint_id.clone(), r.clone());
                    r
                })
                .collect()
        };

        // Kernel work without the lock.
        let mut failed = None;
        let mut done = Vec::new();
        for r in &targets {
            let dropped = if r.deferred {
                self.drop_rules(&r.att)
            } else {
                self.drop_endpoint(&r.att)
            };
            match dropped {
                Ok(()) => {}
                Err(e) if force => {
                    tracing::warn!(container = container_id, network = r.att.network_id, error = %e.chain(), "forced detach left kernel state behind");
                }
                Err(e) => {
                    failed = Some((r.att.endpoint_id.clone(), e));
                    break;
                }
            }
            done.push(r);
        }

        let mut st = self.lock();
        if let Some((failed_id, e)) = failed {
            // Not forced: the failed endpoint and the ones not tried yet stay attached.
            let kept = targets
                .iter()
                .skip_while(|r| r.att.endpoint_id != failed_id)
                .map(|r| r.att.clone());
            for att in kept {
                st.releasing.remove(&att.endpoint_id);
                st.attachments.insert(att.key(), att);
            }
            self.finish_detach(&mut st, container_id, &done)?;
            return Err(e);
        }
        let detached = self.finish_detach(&mut st, container_id, &done)?;
        if done.iter().any(|r| r.deferred) {
            self.reaper.wake();
        }
        Ok(detached)
    }

    /// The bookkeeping after the kernel side of `done` was dealt with: records of the endpoints
    /// that are gone, default routes, events, DNS. Returns the networks detached from.
    pub(super) fn finish_detach(
        &self,
        st: &mut State,
        container_id: &str,
        done: &[&Releasing],
    ) -> Result<Vec<String>> {
        let gone: Vec<String> = done
            .iter()
            .filter(|r| !r.deferred)
            .map(|r| r.att.endpoint_id.clone())
            .collect();
        st.finish_release(&gone)?;
        let mut dns = false;
        let mut detached = Vec::new();
        for r in done {
            let att = &r.att;
            if att.default_route {
                self.move_default_route(st, att);
            }
            if let Some(net) = st.networks.get(&att.network_id) {
                dns |= net.dns_enabled;
                tracing::info!(
                    container = container_id,
                    network = net.name,
                    deferred = r.deferred,
                    "detached"
                );
                self.deps.events.publish(
                    "disconnect",
                    &net.id,
                    BTreeMap::from([
                        ("name".into(), net.name.clone()),
                        ("type".into(), net.driver.as_str().into()),
                        ("container".into(), container_id.to_string()),
                    ]),
                );
            }
            detached.push(att.network_id.clone());
        }
        if dns {
            self.refresh_dns(st);
        }
        Ok(detached)
    }

    /// After the default-route endpoint left, gives the route to the best remaining one.
    pub(super) fn move_default_route(&self, st: &mut State, gone: &AttachmentRecord) {
        if !self.deps.dataplane.netns_alive(Path::new(&gone.netns_path)) {
            return;
        }
        let next = st
            .of_container(&gone.container_id)
            .into_iter()
            .filter(|a| {
                a.ipv4_gateway.is_some()
                    && st
                        .networks
                        .get(&a.network_id)
                        .is_some_and(|n| n.is_bridge() && !n.internal)
            })
            .max_by_key(|a| (a.gw_priority, -a.created_ns))
            .cloned();
        let Some(mut next) = next else { return };
        let routed = self.deps.dataplane.set_default_route(
            Path::new(&next.netns_path),
            &next.ifname,
            v4(next.ipv4_gateway),
            v6(next.ipv6_gateway),
        );
        match routed {
            Ok(()) => {
                next.default_route = true;
                if st.store.apply(&[Op::PutAttachment(&next)]).is_ok() {
                    st.attachments.insert(next.key(), next);
                }
            }
            Err(e) => {
                tracing::warn!(container = gone.container_id, error = %e.chain(), "cannot move the default route")
            }
        }
    }

    /// Attachments, optionally of one container and/or one network.
    pub fn list_attachments(
        &self,
        container_id: &str,
        network: &str,
    ) -> Result<Vec<AttachmentInfo>> {
        let st = self.lock();
        let net_id = if network.is_empty() {
            None
        } else {
            Some(st.resolve(network)?.id.clone())
        };
        Ok(st
            .attachments
            .values()
            .filter(|a| container_id.is_empty() || a.container_id == container_id)
            .filter(|a| net_id.as_ref().is_none_or(|n| *n == a.network_id))
            .map(|a| self.describe(&st, a))
            .collect())
    }

    /// Networks, endpoints and published ports by network driver, for the metrics.
    pub fn counts_by_driver(&self) -> BTreeMap<&'static str, [u64; 3]> {
        let st = self.lock();
        let mut out: BTreeMap<&'static str, [u64; 3]> = Default::default();
        for n in st.networks.values() {
            out.entry(n.driver.as_str()).or_default()[0] += 1;
        }
        for a in st.attachments.values() {
            let Some(n) = st.networks.get(&a.network_id) else {
                continue;
            };
            let c = out.entry(n.driver.as_str()).or_default();
            c[1] += 1;
            c[2] += a.ports.len() as u64;
        }
        out
    }

    /// Resolves a name as the container DNS does, on a network or as seen by a container.
    pub fn lookup(&self, name: &str, network: &str, from_container: &str) -> Result<Addresses> {
        if name.is_empty() {
            return Err(Error::invalid_argument("name is required"));
        }
        let view = self.view.get();
        let found = if !network.is_empty() {
            let id = self.lock().resolve(network)?.id.clone();
            view.lookup_in(&[id.as_str()], name)
        } else if !from_container.is_empty() {
            view.lookup_from_container(from_container, name)
        } else {
            return Err(Error::invalid_argument(
                "either network or from_container_id is needed",
            ));
        };
        found.ok_or_else(|| Error::not_found(format!("no container named {name:?} on the network")))
    }
}
