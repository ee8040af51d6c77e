//! Networks: create, inspect, list, remove, prune.

#[allow(unused_imports)]
use super::*;

impl NetworkService {
    /// Creates a network. Returns it and a warning (empty when none).
    pub fn create_network(&self, req: CreateNetwork) -> Result<(NetworkInfo, String)> {
        validate_network_name(&req.name)?;
        match req.driver.as_str() {
            "" | "bridge" => {}
            d @ ("host" | "null" | "none") => {
                return Err(Error::failed_precondition(format!(
                    "only one instance of \"{d}\" network is allowed"
                )));
            }
            d => {
                return Err(Error::invalid_argument(format!(
                    "network driver {d:?} is not supported (bridge)"
                )));
            }
        }
        if !matches!(req.ipam_driver.as_str(), "" | "default") {
            return Err(Error::invalid_argument(format!(
                "IPAM driver {:?} is not supported (default)",
                req.ipam_driver
            )));
        }
        let opts = &req.options;
        let icc = parse_bool_opt(OPT_ICC, opts.get(OPT_ICC), true)?;
        let masquerade = parse_bool_opt(OPT_MASQUERADE, opts.get(OPT_MASQUERADE), true)?;
        let mtu = match opts.get(OPT_MTU) {
            None => self.settings.mtu,
            Some(v) => v
                .parse::<u32>()
                .ok()
                .filter(|m| (68..=65535).contains(m))
                .ok_or_else(|| {
                    Error::invalid_argument(format!("option {OPT_MTU}: invalid MTU {v:?}"))
                })?,
        };
        let host_binding_ipv4 = match opts.get(OPT_HOST_BINDING_IPV4).map(String::as_str) {
            None | Some("") | Some("0.0.0.0") => None,
            Some(v) => Some(v.parse::<Ipv4Addr>().map(IpAddr::V4).map_err(|_| {
                Error::invalid_argument(format!(
                    "option {OPT_HOST_BINDING_IPV4}: invalid address {v:?}"
                ))
            })?),
        };
        let (mut want_v4, mut want_v6) = (None, None);
        for p in &req.pools {
            if p.subnet.is_empty() {
                if !p.gateway.is_empty() || !p.ip_range.is_empty() || !p.aux_addresses.is_empty() {
                    return Err(Error::invalid_argument(
                        "a gateway, ip-range or auxiliary address needs a subnet",
                    ));
                }
                continue;
            }
            let subnet: Cidr = p.subnet.parse()?;
            let slot = if subnet.is_v4() {
                &mut want_v4
            } else {
                &mut want_v6
            };
            if slot.is_some() {
                return Err(Error::invalid_argument(
                    "only one IPv4 and one IPv6 subnet per network are supported",
                ));
            }
            *slot = Some((subnet, p));
        }
        if want_v6.is_some() && !req.enable_ipv6 {
            return Err(Error::invalid_argument(
                "an IPv6 subnet needs IPv6 enabled on the network",
            ));
        }

        let mut st = self.lock();
        if st.networks.values().any(|n| n.name == req.name) {
            return Err(Error::already_exists(format!(
                "network with name {} already exists",
                req.name
            )));
        }
        let id = Id::random().to_string();
        let bridge = match opts.get(OPT_BRIDGE_NAME) {
            Some(b) => {
                validate_ifname(b)?;
                b.clone()
            }
            None => format!("br-{}", &id[..12]),
        };
        if let Some(other) = st.networks.values().find(|n| n.bridge == bridge) {
            return Err(Error::already_exists(format!(
                "bridge {bridge} is already used by network {}",
                other.name
            )));
        }
        let existing: Vec<Cidr> = st.networks.values().flat_map(|n| n.subnets()).collect();
        let mut host = None;
        let mut pick = |want: Option<(Cidr, &PoolRequest)>, v4: bool| -> Result<Option<Pool>> {
            match want {
                Some((subnet, p)) => {
                    if let Some(o) = existing.iter().find(|o| o.overlaps(&subnet)) {
                        return Err(Error::failed_precondition(format!(
                            "invalid pool request: subnet {subnet} overlaps with {o} of another network"
                        )));
                    }
                    Pool::new(subnet, &p.gateway, &p.ip_range, &p.aux_addresses, true).map(Some)
                }
                None if v4 => {
                    if host.is_none() {
                        host = Some(self.deps.dataplane.host_networks()?);
                    }
                    let mut taken = existing.clone();
                    taken.extend(host.iter().flatten().copied());
                    let subnet = ipam::allocate_subnet(&self.settings.pools, &taken, true)?;
                    Pool::new(subnet, "", "", &BTreeMap::new(), false).map(Some)
                }
                None if req.enable_ipv6 => {
                    // An IPv6 base in the default pools, else a random unique-local /64.
                    let subnet = ipam::allocate_subnet(&self.settings.pools, &existing, false)
                        .unwrap_or_else(|_| ipam::random_ula64());
                    Pool::new(subnet, "", "", &BTreeMap::new(), false).map(Some)
                }
                None => Ok(None),
            }
        };
        let ipv4 = pick(want_v4, true)?;
        let ipv6 = pick(want_v6, false)?;
        let record = NetworkRecord {
            id,
            name: req.name.clone(),
            driver: Driver::Bridge,
            created_ns: now_ns(),
            internal: req.internal,
            attachable: req.attachable,
            enable_ipv6: req.enable_ipv6,
            ipam_driver: if req.ipam_driver.is_empty() {
                "default".into()
            } else {
                req.ipam_driver.clone()
            },
            ipam_options: req.ipam_options.clone(),
            ipv4,
            ipv6,
            options: req.options.clone(),
            labels: req.labels.clone(),
            bridge,
            builtin: false,
            dns_enabled: true,
            mtu,
            icc,
            masquerade,
            host_binding_ipv4,
            last_ipv4: None,
            last_ipv6: None,
        };
        st.store.apply(&[Op::PutNetwork(&record)])?;
        st.networks.insert(record.id.clone(), record.clone());
        if let Err(e) = self.realize_network(&record) {
            let _ = self
                .deps
                .firewall
                .remove(&[self.chains.network_tag(&record.id)]);
            let _ = self.deps.dataplane.delete_bridge(&record.bridge);
            st.networks.remove(&record.id);
            st.store.apply(&[Op::DeleteNetwork(&record.id)])?;
            return Err(e);
        }
        let warning = self
            .refresh_dns(&mut st)
            .into_iter()
            .filter(|(id, _)| *id == record.id)
            .map(|(_, e)| {
                format!(
                    "container name resolution is unavailable on this network: {}",
                    e.chain()
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        tracing::info!(network = record.name, id = record.id, bridge = record.bridge, subnets = ?record.subnets(), "network created");
        self.deps.events.publish(
            "create",
            &record.id,
            BTreeMap::from([
                ("name".into(), record.name.clone()),
                ("type".into(), "bridge".into()),
            ]),
        );
        Ok((
            NetworkInfo {
                record,
                endpoints: Vec::new(),
            },
            warning,
        ))
    }

    /// A network by id, prefix or name.
    pub fn get_network(&self, input: &str) -> Result<NetworkInfo> {
        let st = self.lock();
        let net = st.resolve(input)?;
        Ok(NetworkInfo {
            record: net.clone(),
            endpoints: st.endpoints_of(&net.id).into_iter().cloned().collect(),
        })
    }

    /// Networks matching Docker's filters (driver, id, label, label!, name, scope, type,
    /// dangling).
    pub fn list_networks(&self, filters: &[(String, String)]) -> Result<Vec<NetworkInfo>> {
        let f = group_filters(
            filters,
            &[
                "driver", "id", "label", "label!", "name", "scope", "type", "dangling",
            ],
        )?;
        for t in f.get("type").into_iter().flatten() {
            if !matches!(*t, "builtin" | "custom") {
                return Err(Error::invalid_argument(format!(
                    "invalid filter: 'type'='{t}'"
                )));
            }
        }
        let dangling = match f.get("dangling").map(|v| v.as_slice()) {
            None => None,
            Some([v]) => Some(match v.to_ascii_lowercase().as_str() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => {
                    return Err(Error::invalid_argument(format!(
                        "invalid filter 'dangling={v}'"
                    )));
                }
            }),
            Some(_) => {
                return Err(Error::invalid_argument(
                    "only one dangling filter is allowed",
                ));
            }
        };
        let st = self.lock();
        let mut out = Vec::new();
        for net in st.networks.values() {
            let endpoints: Vec<AttachmentRecord> =
                st.endpoints_of(&net.id).into_iter().cloned().collect();
            let any = |key: &str, pred: &dyn Fn(&str) -> bool| {
                f.get(key).is_none_or(|vs| vs.iter().any(|v| pred(v)))
            };
            let keep = any("driver", &|v| {
                v == net.driver.as_str() || (v == "none" && net.driver == Driver::Null)
            }) && any("id", &|v| net.id.starts_with(v))
                && any("name", &|v| net.name.contains(v))
                && any("scope", &|v| v == "local")
                && any("type", &|v| (v == "builtin") == net.builtin)
                && f.get("label")
                    .is_none_or(|vs| vs.iter().all(|v| label_matches(&net.labels, v)))
                && f.get("label!")
                    .is_none_or(|vs| vs.iter().all(|v| !label_matches(&net.labels, v)))
                && dangling.is_none_or(|d| d == (endpoints.is_empty() && !net.builtin));
            if keep {
                out.push(NetworkInfo {
                    record: net.clone(),
                    endpoints,
                });
            }
        }
        out.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        Ok(out)
    }

    pub(super) fn remove_network_locked(&self, st: &mut State, id: &str) -> Result<()> {
        let net = st
            .networks
            .get(id)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("No such network: {id}")))?;
        if net.builtin {
            return Err(Error::failed_precondition(format!(
                "{} is a pre-defined network and cannot be removed",
                net.name
            )));
        }
        let endpoints = st.endpoints_of(id);
        if !endpoints.is_empty() {
            let names: Vec<&str> = endpoints
                .iter()
                .map(|a| {
                    if a.container_name.is_empty() {
                        &a.container_id[..12]
                    } else {
                        a.container_name.as_str()
                    }
                })
                .collect();
            return Err(Error::failed_precondition(format!(
                "error while removing network: network {} id {} has active endpoints ({})",
                net.name,
                net.id,
                names.join(", ")
            )));
        }
        self.force_release(st, |a| a.network_id == id)?;
        st.store.apply(&[Op::DeleteNetwork(id)])?;
        st.networks.remove(id);
        for (net_id, e) in self.refresh_dns(st) {
            tracing::warn!(network = net_id, error = %e.chain(), "resolver");
        }
        self.deps.firewall.remove(&[self.chains.network_tag(id)])?;
        self.deps.dataplane.delete_bridge(&net.bridge)?;
        tracing::info!(network = net.name, id = net.id, "network removed");
        self.deps.events.publish(
            "destroy",
            &net.id,
            BTreeMap::from([
                ("name".into(), net.name.clone()),
                ("type".into(), net.driver.as_str().into()),
            ]),
        );
        Ok(())
    }

    /// Removes a network: refused for the predefined ones and while endpoints are attached.
    pub fn delete_network(&self, input: &str) -> Result<()> {
        let mut st = self.lock();
        let id = st.resolve(input)?.id.clone();
        self.remove_network_locked(&mut st, &id)
    }

    /// Removes unused user-defined networks matching the filters (until, label, label!).
    /// Returns their names.
    pub fn prune_networks(&self, filters: &[(String, String)]) -> Result<Vec<String>> {
        let f = group_filters(filters, &["until", "label", "label!"])?;
        let now = now_ns();
        let until = f
            .get("until")
            .map(|vs| {
                vs.iter()
                    .map(|v| parse_until(v, now))
                    .collect::<Result<Vec<_>>>()
            })
            .transpose()?;
        let mut st = self.lock();
        let candidates: Vec<(String, String)> = st
            .networks
            .values()
            .filter(|n| !n.builtin && st.endpoints_of(&n.id).is_empty())
            .filter(|n| {
                until
                    .as_ref()
                    .is_none_or(|us| us.iter().any(|u| n.created_ns < *u))
            })
            .filter(|n| {
                f.get("label")
                    .is_none_or(|vs| vs.iter().all(|v| label_matches(&n.labels, v)))
            })
            .filter(|n| {
                f.get("label!")
                    .is_none_or(|vs| vs.iter().all(|v| !label_matches(&n.labels, v)))
            })
            .map(|n| (n.id.clone(), n.name.clone()))
            .collect();
        let mut deleted = Vec::new();
        for (id, name) in candidates {
            match self.remove_network_locked(&mut st, &id) {
                Ok(()) => deleted.push(name),
                Err(e) => {
                    tracing::warn!(network = name, error = %e.chain(), "prune: cannot remove network")
                }
            }
        }
        Ok(deleted)
    }
}
