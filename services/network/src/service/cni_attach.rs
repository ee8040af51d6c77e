//! CNI attachments for network mode "cni" (the orchestrator path).

#[allow(unused_imports)]
use super::*;

impl NetworkService {
    /// `CNI_PATH`: the plugin directories, colon-separated.
    fn cni_path(&self) -> String {
        self.settings
            .cni_bin_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    }

    /// The CNI configs of the config directory.
    pub fn cni_configs(&self) -> Result<Vec<CniConfigFile>> {
        cni::load_dir(&self.settings.cni_conf_dir)
    }

    /// CNI DEL of a recorded attachment. A namespace that is gone (a reboot, a crash) is
    /// passed as an empty `CNI_NETNS`, as the CNI spec allows for DEL and containerd does:
    /// plugins then release what they hold outside it (host-local's address), where a path
    /// that is no namespace any more would only make them fail.
    pub(super) fn cni_del(&self, rec: &CniRecord) -> Result<()> {
        let cni_path = self.cni_path();
        let alive = self.deps.dataplane.netns_alive(Path::new(&rec.netns_path));
        let inv = Invocation {
            container_id: &rec.container_id,
            netns: if alive { &rec.netns_path } else { "" },
            ifname: &rec.ifname,
            args: &rec.args,
            runtime_config: &rec.runtime_config,
            cni_path: &cni_path,
        };
        let prev = (!rec.result.is_null()).then_some(&rec.result);
        cni::delete(self.deps.cni.as_ref(), &rec.config, &inv, prev)
    }

    /// CNI ADD of a config for a namespace; idempotent for the same container, config and
    /// interface.
    pub fn cni_attach(&self, req: CniAttachRequest) -> Result<(CniResult, Value)> {
        if req.container_id.is_empty()
            || !req
                .container_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        {
            return Err(Error::invalid_argument(format!(
                "invalid container id {:?}",
                req.container_id
            )));
        }
        if req.netns_path.is_empty() {
            return Err(Error::invalid_argument("netns_path is required"));
        }
        let ifname = if req.ifname.is_empty() {
            "eth0".to_string()
        } else {
            req.ifname.clone()
        };
        validate_ifname(&ifname)?;
        let configs = self.cni_configs()?;
        let config = if req.config_name.is_empty() {
            configs.first().ok_or_else(|| {
                Error::not_found(format!(
                    "no CNI network configs in {}",
                    self.settings.cni_conf_dir.display()
                ))
            })?
        } else {
            configs
                .iter()
                .find(|c| c.name == req.config_name)
                .ok_or_else(|| {
                    Error::not_found(format!(
                        "no CNI network config named {:?} in {}",
                        req.config_name,
                        self.settings.cni_conf_dir.display()
                    ))
                })?
        };
        let key = cni_key(&req.container_id, &config.name, &ifname);
        let mut rec = CniRecord {
            container_id: req.container_id.clone(),
            config_name: config.name.clone(),
            ifname: ifname.clone(),
            netns_path: req.netns_path.clone(),
            args: req.args.clone(),
            config: config.conflist.clone(),
            runtime_config: req.runtime_config.clone(),
            // No result yet: the record says an ADD may have run, so a crash before it
            // finishes is cleaned up (DEL) at the next start.
            result: Value::Null,
            created_ns: now_ns(),
        };
        {
            let mut st = self.lock();
            if let Some(done) = st.cni.get(&key).filter(|r| !r.result.is_null()) {
                return Ok((cni::parse_result(&done.result), done.result.clone()));
            }
            st.store.apply(&[Op::PutCni(&rec)])?;
            st.cni.insert(key.clone(), rec.clone());
        }
        // Plugins are slow (tens of ms each); they run without the service lock.
        let cni_path = self.cni_path();
        let inv = Invocation {
            container_id: &req.container_id,
            netns: &req.netns_path,
            ifname: &ifname,
            args: &req.args,
            runtime_config: &req.runtime_config,
            cni_path: &cni_path,
        };
        let added = cni::add(self.deps.cni.as_ref(), &config.conflist, &inv);
        let mut st = self.lock();
        if added.is_ok() && !st.cni.contains_key(&key) {
            // A detach came while the plugins ran (the caller gave up, e.g. an engine that
            // restarted tears down a half-made pod): undo this ADD instead of recording it.
            drop(st);
            if let Ok(result) = &added {
                rec.result = result.clone();
                if let Err(e) = self.cni_del(&rec) {
                    tracing::warn!(container = rec.container_id, error = %e.chain(), "cni delete of an attachment detached while it was added");
                }
            }
            return Err(Error::failed_precondition(format!(
                "the CNI attachment of {} was detached while it was being added",
                req.container_id
            )));
        }
        match added {
            Ok(result) => {
                rec.result = result.clone();
                st.store.apply(&[Op::PutCni(&rec)])?;
                st.cni.insert(key, rec);
                Ok((cni::parse_result(&result), result))
            }
            Err(e) => {
                st.store.apply(&[Op::DeleteCni(key.clone())])?;
                st.cni.remove(&key);
                Err(e)
            }
        }
    }

    /// CNI DEL with the arguments recorded at ADD. Succeeds when there is nothing to delete or
    /// the namespace is gone.
    pub fn cni_detach(&self, container_id: &str, config_name: &str, ifname: &str) -> Result<()> {
        let ifname = if ifname.is_empty() { "eth0" } else { ifname };
        let rec = {
            let st = self.lock();
            let mut matching = st.cni.values().filter(|c| {
                c.container_id == container_id
                    && c.ifname == ifname
                    && (config_name.is_empty() || c.config_name == config_name)
            });
            match (matching.next(), matching.next()) {
                (Some(r), None) => r.clone(),
                (None, _) => return Ok(()),
                (Some(_), Some(_)) => {
                    return Err(Error::invalid_argument(format!(
                        "container {container_id} has several CNI attachments on {ifname}; name the config"
                    )));
                }
            }
        };
        if let Err(e) = self.cni_del(&rec) {
            if self.deps.dataplane.netns_alive(Path::new(&rec.netns_path)) {
                return Err(e);
            }
            tracing::debug!(error = %e.chain(), "cni delete failed after the namespace was gone");
        }
        let mut st = self.lock();
        st.store.apply(&[Op::DeleteCni(rec.key())])?;
        st.cni.remove(&rec.key());
        Ok(())
    }
}
