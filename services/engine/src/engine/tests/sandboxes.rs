//! Pod sandboxes against the fakes: records, namespaces joined by containers, CNI ADD/DEL,
//! stop/remove, recovery, bad input.

use super::*;

fn run_req(name: &str) -> pb::RunSandboxRequest {
    pb::RunSandboxRequest {
        config: Some(pb::SandboxConfig {
            metadata: Some(pb::SandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: format!("{name}-host"),
            dns: Some(pb::SandboxDnsConfig {
                servers: vec!["10.96.0.10".into()],
                searches: vec!["svc.cluster.local".into()],
                options: vec!["ndots:5".into()],
            }),
            labels: [("app".to_string(), name.to_string())].into(),
            linux: Some(pb::SandboxLinux {
                cgroup_parent: "/kubepods/pod1".into(),
                sysctls: [(
                    "net.ipv4.ip_unprivileged_port_start".to_string(),
                    "0".to_string(),
                )]
                .into(),
                security: Some(pb::SandboxSecurity {
                    namespace_options: Some(pb::SandboxNamespaceOptions {
                        pid: pb::NamespaceMode::Pod.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn sandbox_events(engine: &Arc<Engine>, since: SystemTime) -> crate::events::Subscription {
    let f = [types::Filter {
        key: "type".into(),
        value: "sandbox".into(),
    }];
    engine
        .hub
        .subscribe(EventFilter::new(&f, "default").unwrap(), Some(since), None)
}

#[tokio::test]
async fn a_pod_runs_its_containers_in_its_namespaces_and_goes_away() {
    let kit = Kit::new();
    let engine = kit.engine();
    let t0 = SystemTime::now();
    let mut ev = sandbox_events(&engine, t0);
    let sb = engine.run_sandbox(run_req("web"), "default").await.unwrap();
    assert_eq!(sb.state(), pb::SandboxState::Ready);
    assert_eq!(sb.name, "web_default_uid-web_0");
    assert_eq!(sb.network.as_ref().unwrap().ip, "10.88.0.5");
    assert_eq!(sb.pid_holder, 4242);
    assert_eq!(
        *kit.networks.cni.lock().unwrap(),
        std::slice::from_ref(&sb.id)
    );
    let resolv = std::fs::read_to_string(&sb.resolv_conf_path).unwrap();
    assert!(resolv.contains("nameserver 10.96.0.10"), "{resolv}");
    assert!(resolv.contains("ndots:5"), "{resolv}");
    let hosts = std::fs::read_to_string(&sb.hosts_path).unwrap();
    assert!(hosts.contains("10.88.0.5\tweb-host"), "{hosts}");
    assert_eq!(next_action(&mut ev).await, "create");
    assert_eq!(next_action(&mut ev).await, "start");

    // A container of the pod joins its namespaces, cgroup parent, hostname and sysctls.
    let mut req = create_req("web-app", &["sleep"]);
    req.host_config.as_mut().unwrap().sandbox_id = sb.id[..12].into();
    let (c, _) = engine.create(req, "default").await.unwrap();
    let hc = c.host_config.clone().unwrap();
    assert_eq!(hc.sandbox_id, sb.id);
    assert_eq!(hc.cgroup_parent, "/kubepods/pod1");
    assert!(c.networks.is_empty());
    assert_eq!(c.config.as_ref().unwrap().hostname, "web-host");
    engine.start("web-app").await.unwrap();
    let spec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(engine.paths.bundle(&c.id).join("config.json")).unwrap(),
    )
    .unwrap();
    let ns_path = |t: &str| {
        spec["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["type"] == t)
            .map(|n| n["path"].as_str().unwrap_or("").to_string())
    };
    let nsd = &sb.namespaces.as_ref().unwrap();
    assert_eq!(ns_path("network").unwrap(), nsd.network);
    assert_eq!(ns_path("ipc").unwrap(), nsd.ipc);
    assert_eq!(ns_path("uts").unwrap(), nsd.uts);
    assert_eq!(ns_path("pid").unwrap(), nsd.pid);
    assert_eq!(spec["hostname"], "web-host");
    let shm = spec["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["destination"] == "/dev/shm")
        .unwrap();
    assert_eq!(shm["source"], nsd.shm, "the pod's /dev/shm");
    assert_eq!(
        spec["linux"]["cgroupsPath"],
        format!("/kubepods/pod1/{}", c.id)
    );
    assert_eq!(
        spec["linux"]["sysctl"]["net.ipv4.ip_unprivileged_port_start"],
        "0"
    );
    let (got, info) = engine.get_sandbox(&sb.name, true).unwrap();
    assert_eq!(got.container_ids, std::slice::from_ref(&c.id));
    assert!(info["info"].contains("\"pidHolder\""));

    // Stop kills the containers and tears the network down; the pod then takes no more.
    engine.stop_sandbox(&sb.id).await.unwrap();
    assert_eq!(next_action(&mut ev).await, "stop");
    let got = engine.get_sandbox(&sb.id, false).unwrap().0;
    assert_eq!(got.state(), pb::SandboxState::Notready);
    assert!(kit.networks.cni.lock().unwrap().is_empty());
    assert!(!engine.get("web-app").unwrap().with(|r| r.is_running()));
    let mut req = create_req("late", &["sleep"]);
    req.host_config.as_mut().unwrap().sandbox_id = sb.id.clone();
    let err = engine.create(req, "default").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{}", err.chain());
    let err = engine.start("web-app").await.unwrap_err();
    assert!(err.chain().contains("not ready"), "{}", err.chain());
    engine.stop_sandbox(&sb.id).await.unwrap();

    // Remove takes the containers, namespaces and files with it.
    engine.remove_sandbox(&sb.id).await.unwrap();
    assert_eq!(next_action(&mut ev).await, "destroy");
    assert!(engine.get("web-app").is_err());
    assert!(kit.pod_ns.live.lock().unwrap().is_empty());
    assert!(!Path::new(&sb.resolv_conf_path).exists());
    let err = engine.get_sandbox(&sb.id, false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert_eq!(
        engine.remove_sandbox(&sb.id).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[tokio::test]
async fn bad_input_leaves_nothing_behind() {
    let kit = Kit::new();
    let engine = kit.engine();
    let sb = engine.run_sandbox(run_req("a"), "default").await.unwrap();
    let err = engine
        .run_sandbox(run_req("a"), "default")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{}", err.chain());

    let mut req = run_req("b");
    req.network = Some(pb::SandboxNetworkOptions {
        cni_config_name: "missing".into(),
        ..Default::default()
    });
    let err = engine.run_sandbox(req, "default").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{}", err.chain());
    assert!(err.chain().contains("missing"), "{}", err.chain());
    assert_eq!(engine.list_sandboxes(&[]).unwrap().len(), 1);
    let live = kit.pod_ns.live.lock().unwrap().clone();
    assert!(
        live.iter()
            .all(|p| p.starts_with(engine.paths.sandbox_ns.join(&sb.id))),
        "{live:?}"
    );
    // The name is free again.
    engine.run_sandbox(run_req("b"), "default").await.unwrap();

    let mut req = create_req("c", &["sleep"]);
    req.host_config.as_mut().unwrap().sandbox_id = "f".repeat(64);
    assert_eq!(
        engine.create(req, "default").await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    let mut req = create_req("c", &["sleep"]);
    let hc = req.host_config.as_mut().unwrap();
    hc.sandbox_id = sb.id.clone();
    hc.network_mode = "host".into();
    assert_eq!(
        engine.create(req, "default").await.unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    let mut req = create_req("c", &["sleep"]);
    let hc = req.host_config.as_mut().unwrap();
    hc.sandbox_id = sb.id.clone();
    hc.security = Some(pb::SecurityOptions {
        privileged: true,
        ..Default::default()
    });
    assert_eq!(
        engine.create(req, "default").await.unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    let filters = [types::Filter {
        key: "label".into(),
        value: "app=b".into(),
    }];
    assert_eq!(engine.list_sandboxes(&filters).unwrap().len(), 1);
}

#[tokio::test]
async fn host_network_pods_have_no_netns_and_no_cni() {
    let kit = Kit::new();
    let engine = kit.engine();
    let mut req = run_req("h");
    let linux = req.config.as_mut().unwrap().linux.as_mut().unwrap();
    linux.sysctls.clear();
    linux.security = Some(pb::SandboxSecurity {
        namespace_options: Some(pb::SandboxNamespaceOptions {
            network: pb::NamespaceMode::Node.into(),
            pid: pb::NamespaceMode::Container.into(),
            ipc: pb::NamespaceMode::Node.into(),
            ..Default::default()
        }),
        ..Default::default()
    });
    let sb = engine.run_sandbox(req, "default").await.unwrap();
    assert!(kit.networks.cni.lock().unwrap().is_empty());
    let ns = sb.namespaces.clone().unwrap();
    assert_eq!(ns, pb::SandboxNamespacePaths::default());
    assert_eq!(sb.pid_holder, 0);
    let mut creq = create_req("hc", &["sleep"]);
    creq.host_config.as_mut().unwrap().sandbox_id = sb.id.clone();
    let (c, _) = engine.create(creq, "default").await.unwrap();
    engine.start("hc").await.unwrap();
    let spec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(engine.paths.bundle(&c.id).join("config.json")).unwrap(),
    )
    .unwrap();
    let types: Vec<&str> = spec["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["type"].as_str().unwrap())
        .collect();
    assert!(!types.contains(&"network") && !types.contains(&"ipc") && !types.contains(&"uts"));
    assert!(types.contains(&"pid"), "{types:?}");
}

#[tokio::test]
async fn a_restart_keeps_ready_pods_and_clears_half_made_ones() {
    let kit = Kit::new();
    let engine = kit.engine();
    let sb = engine
        .run_sandbox(run_req("keep"), "default")
        .await
        .unwrap();
    // A sandbox whose Run never finished (the engine died half-way).
    let half = crate::sandbox::SandboxRecord {
        s: pb::Sandbox {
            id: "e".repeat(64),
            name: "half_default_u_0".into(),
            state: pb::SandboxState::Notready.into(),
            ..Default::default()
        },
        p: crate::sandbox::SandboxPrivate {
            ns_dir: engine.paths.sandbox_ns.join("e".repeat(64)),
            cni_added: true,
            ..Default::default()
        },
    };
    engine.store.put_sandbox(&half).await.unwrap();
    kit.networks.cni.lock().unwrap().push(half.s.id.clone());
    drop(engine);
    let engine = kit.engine();
    engine.recover().await.unwrap();
    let all = engine.list_sandboxes(&[]).unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].id, sb.id);
    assert_eq!(all[0].state(), pb::SandboxState::Ready);
    assert_eq!(
        *kit.networks.cni.lock().unwrap(),
        std::slice::from_ref(&sb.id)
    );

    // A pod whose holder died is not ready after the next start.
    kit.pod_ns
        .live
        .lock()
        .unwrap()
        .retain(|p| !p.ends_with("pid"));
    drop(engine);
    let engine = kit.engine();
    engine.recover().await.unwrap();
    let got = engine.get_sandbox(&sb.id, false).unwrap().0;
    assert_eq!(got.state(), pb::SandboxState::Notready);
    assert!(kit.networks.cni.lock().unwrap().is_empty());
}

#[tokio::test]
async fn strict_supplemental_groups_leave_out_the_images_memberships() {
    let kit = Kit::new();
    std::fs::write(
        kit.images.rootfs.join("etc/group"),
        "root:x:0:\npostgres:x:70:\naudio:x:29:postgres\n",
    )
    .unwrap();
    let engine = kit.engine();
    for (name, strict, want) in [
        ("merge", false, vec![29, 1234]),
        ("strict", true, vec![1234]),
    ] {
        let mut req = create_req(name, &["sleep"]);
        req.config.as_mut().unwrap().user = "postgres".into();
        let hc = req.host_config.as_mut().unwrap();
        hc.group_add = vec!["1234".into()];
        hc.strict_supplemental_groups = strict;
        engine.create(req, "default").await.unwrap();
        engine.start(name).await.unwrap();
        let user = engine
            .get(name)
            .unwrap()
            .with(|r| r.c.process_user.clone())
            .unwrap();
        assert_eq!((user.uid, user.gid), (70, 70), "{name}");
        assert_eq!(user.additional_gids, want, "{name}");
    }
}
