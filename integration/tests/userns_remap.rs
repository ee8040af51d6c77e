//! Rootful `userns-remap`: a stack whose config maps containers onto a test user's subordinate
//! ranges (the user, its group and its `/etc/subuid` and `/etc/subgid` lines are made here and
//! removed on drop). Root only; skips cleanly otherwise.

use std::os::unix::fs::PermissionsExt;

use anyhow::{Context as _, Result, ensure};
use berth_core::Service;
use berth_core::snapshots::{RemoteSnapshotter, Snapshotter};
use berth_integration::gateway_kit::DockerStack;
use berth_integration::py_kit;
use berth_integration::stack::Stack;
use berth_integration::userns_kit::{self, HostDir, SubidUser, owner, proc_uids};

/// A stack with `[engine] userns_remap` naming `user`. The stack's temp dir is made
/// traversable so the containers' mapped root reaches the bundles under it.
fn remapped_stack(user: &SubidUser) -> Result<DockerStack> {
    let d = DockerStack::start_from(
        Stack::builder().toml(&format!("[engine]\nuserns_remap = \"{}\"\n", user.name)),
    )?;
    std::fs::set_permissions(d.stack.dir(), std::fs::Permissions::from_mode(0o711))?;
    Ok(d)
}

#[test]
fn remapped_root_is_a_subordinate_id_on_the_host() -> Result<()> {
    if !berth_integration::gateway_kit::ready() {
        return Ok(());
    }
    let user = SubidUser::create("brm")?;
    let d = remapped_stack(&user)?;
    let _registry = py_kit::with_busybox(&d)?;
    let (u0, g0) = (user.uid_start, user.gid_start);

    // Root inside, the first subordinate id outside.
    let id = d.ok(&["run", "--rm", "busybox", "id"])?;
    ensure!(id.starts_with("uid=0(root) gid=0(root)"), "{id}");
    let map = d.ok(&["run", "--rm", "busybox", "cat", "/proc/self/uid_map"])?;
    let fields: Vec<&str> = map.split_whitespace().collect();
    ensure!(
        fields == ["0", &u0.to_string(), &user.count.to_string()],
        "uid_map: {map}"
    );
    // The same with runc as with the default runtime (the shim's in-process one here).
    for runtime in ["runc", "libcontainer"] {
        let map = d.ok(&[
            "run",
            "--rm",
            "--runtime",
            runtime,
            "busybox",
            "sh",
            "-c",
            "cat /proc/self/uid_map; touch /x && ls /sys/class/net",
        ])?;
        let fields: Vec<&str> = map.split_whitespace().collect();
        ensure!(
            fields.get(..3) == Some(&["0", &*u0.to_string(), &*user.count.to_string()][..]),
            "{runtime}: {map}"
        );
    }
    let name = format!("remap-{}", std::process::id());
    d.ok(&["run", "-d", "--name", &name, "busybox", "sleep", "300"])?;
    let result = (|| -> Result<()> {
        let pid: i32 = d
            .ok(&["inspect", "-f", "{{.State.Pid}}", &name])?
            .trim()
            .parse()?;
        let uids = proc_uids(pid)?;
        ensure!(
            uids.iter().all(|u| *u == u0),
            "host Uid line {uids:?}, want {u0}"
        );
        // An exec joins the container's user namespace too.
        let map = d.ok(&["exec", &name, "cat", "/proc/self/uid_map"])?;
        let fields: Vec<&str> = map.split_whitespace().collect();
        ensure!(
            fields == ["0", &u0.to_string(), &user.count.to_string()],
            "exec uid_map: {map}"
        );
        Ok(())
    })();
    let _ = d.run(&["rm", "-f", &name]);
    result?;

    // Its network namespace is its user namespace's: its own sysfs, raw sockets (ping) and
    // net sysctls work as for a container without a map.
    let net = d.ok(&[
        "run", "--rm", "--sysctl", "net.ipv4.ip_forward=1", "busybox", "sh", "-c",
        "ls /sys/class/net; cat /proc/sys/net/ipv4/ip_forward; ping -c1 -W5 127.0.0.1 >/dev/null && echo ping-ok",
    ])?;
    let lines: Vec<&str> = net.lines().collect();
    ensure!(
        lines == ["eth0", "lo", "1", "ping-ok"],
        "network namespace: {net}"
    );

    // A bind-mounted host directory: what the container writes belongs to the subordinate id.
    let host = HostDir::new("berth-remap-")?;
    std::os::unix::fs::chown(host.path(), Some(u0), Some(g0))?;
    let bind = format!("{}:/h", host.path().display());
    d.ok(&[
        "run",
        "--rm",
        "-v",
        &bind,
        "busybox",
        "sh",
        "-c",
        "echo hi > /h/f",
    ])?;
    ensure!(
        owner(&host.path().join("f"))? == (u0, g0),
        "owner {:?}",
        owner(&host.path().join("f"))?
    );

    // --userns=host: real root, on the host too.
    let id = d.ok(&[
        "run",
        "--rm",
        "--userns",
        "host",
        "busybox",
        "cat",
        "/proc/self/uid_map",
    ])?;
    let fields: Vec<&str> = id.split_whitespace().collect();
    ensure!(
        fields == ["0", "0", "4294967295"],
        "--userns=host uid_map: {id}"
    );
    d.ok(&[
        "run", "--rm", "--userns", "host", "-v", &bind, "busybox", "touch", "/h/real",
    ])?;
    ensure!(owner(&host.path().join("real"))? == (0, 0));

    // A named volume is the container root's: writable inside, the subordinate id outside.
    let vol = format!("remap-vol-{}", std::process::id());
    let written = d.ok(&[
        "run",
        "--rm",
        "-v",
        &format!("{vol}:/data"),
        "busybox",
        "sh",
        "-c",
        "echo v > /data/x && mkdir /data/d && ls -ln /data",
    ]);
    let data = userns_kit::under_root(&d, &format!("volumes/{vol}/_data"));
    let vol_owner = owner(&data.join("x"));
    let _ = d.run(&["volume", "rm", "-f", &vol]);
    let written = written?;
    ensure!(written.contains(" 0 "), "ls -ln inside: {written}");
    ensure!(vol_owner? == (u0, g0), "volume file owner");
    // A fresh volume over an image directory gets the image's files, still the root's.
    let vol = format!("remap-copyup-{}", std::process::id());
    let ls = d.ok(&[
        "run",
        "--rm",
        "-v",
        &format!("{vol}:/etc"),
        "busybox",
        "sh",
        "-c",
        "ls -ln /etc/passwd && touch /etc/new",
    ]);
    let _ = d.run(&["volume", "rm", "-f", &vol]);
    let ls = ls?;
    let cols: Vec<&str> = ls.split_whitespace().collect();
    ensure!(
        cols.get(2..4) == Some(&["0", "0"][..]),
        "copied-up owner: {ls}"
    );

    // docker cp in and out keeps container ids.
    let name = format!("remap-cp-{}", std::process::id());
    d.ok(&["run", "-d", "--name", &name, "busybox", "sleep", "300"])?;
    let result = (|| -> Result<()> {
        d.ok(&[
            "exec",
            &name,
            "sh",
            "-c",
            "echo x > /tmp/mine && chown 1000:1000 /tmp/mine",
        ])?;
        let out = HostDir::new("berth-remap-cp-")?;
        let tar = d.run(&["cp", &format!("{name}:/tmp/mine"), "-"])?;
        ensure!(
            tar.status.success(),
            "cp out: {}",
            String::from_utf8_lossy(&tar.stderr)
        );
        let mut a = tar::Archive::new(&tar.stdout[..]);
        let e = a.entries()?.next().context("empty tar")??;
        ensure!(
            (e.header().uid()?, e.header().gid()?) == (1000, 1000),
            "cp out owner {:?}",
            (e.header().uid()?, e.header().gid()?)
        );
        let src = out.path().join("in");
        std::fs::write(&src, "in\n")?;
        d.ok(&["cp", &src.display().to_string(), &format!("{name}:/tmp/in")])?;
        let ls = d.ok(&["exec", &name, "ls", "-ln", "/tmp/in"])?;
        let cols: Vec<&str> = ls.split_whitespace().collect();
        ensure!(cols.get(2..4) == Some(&["0", "0"][..]), "cp in owner: {ls}");

        // docker commit writes the layer in container ids: the new image's file is 1000's.
        let image = format!("remap-commit-{}", std::process::id());
        d.ok(&["commit", &name, &image])?;
        let ls = d.run(&["run", "--rm", &image, "ls", "-ln", "/tmp/mine"]);
        let _ = d.run(&["rmi", "-f", &image]);
        let ls = String::from_utf8_lossy(&ls?.stdout).into_owned();
        let cols: Vec<&str> = ls.split_whitespace().collect();
        ensure!(
            cols.get(2..4) == Some(&["1000", "1000"][..]),
            "committed owner: {ls}"
        );

        // Sharing another remapped container's network namespace works; its IPC namespace
        // belongs to its own user namespace and is refused.
        let map = d.ok(&[
            "run",
            "--rm",
            "--net",
            &format!("container:{name}"),
            "busybox",
            "cat",
            "/proc/self/uid_map",
        ])?;
        ensure!(
            map.split_whitespace().nth(1) == Some(&*u0.to_string()),
            "{map}"
        );
        let (_, err) = d.fails(&[
            "run",
            "--rm",
            "--ipc",
            &format!("container:{name}"),
            "busybox",
            "true",
        ])?;
        ensure!(
            err.contains("cannot share the IPC namespace of another container"),
            "{err}"
        );
        Ok(())
    })();
    let _ = d.run(&["rm", "-f", &name]);
    result?;
    d.ok(&["run", "--rm", "--ipc", "host", "busybox", "true"])?;

    // A build's RUN and COPY --chown steps land in container ids.
    let ctx = HostDir::new("berth-remap-build-")?;
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox\nRUN touch /x && chown 1000:1000 /x\nCOPY --chown=7:7 f /g\n",
    )?;
    std::fs::write(ctx.path().join("f"), "f\n")?;
    let image = format!("remap-build-{}", std::process::id());
    d.ok(&[
        "build",
        "-q",
        "-t",
        &image,
        &ctx.path().display().to_string(),
    ])?;
    let ls = d.run(&["run", "--rm", &image, "ls", "-ln", "/x", "/g"]);
    let _ = d.run(&["rmi", "-f", &image]);
    let ls = String::from_utf8_lossy(&ls?.stdout).into_owned();
    let owners: Vec<(&str, &str)> = ls
        .lines()
        .filter_map(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            Some((*c.get(2)?, *c.get(3)?))
        })
        .collect();
    ensure!(
        owners == [("7", "7"), ("1000", "1000")],
        "built owners: {ls}"
    );

    // What a user namespace cannot share is refused, as Docker refuses it.
    let (_, err) = d.fails(&["run", "--rm", "--privileged", "busybox", "true"])?;
    ensure!(
        err.contains("privileged mode is incompatible with user namespaces"),
        "{err}"
    );
    let (_, err) = d.fails(&["run", "--rm", "--net", "host", "busybox", "true"])?;
    ensure!(
        err.contains("cannot share the host's network namespace"),
        "{err}"
    );
    let (_, err) = d.fails(&["run", "--rm", "--pid", "host", "busybox", "true"])?;
    ensure!(err.contains("cannot share the host PID namespace"), "{err}");
    d.ok(&[
        "run",
        "--rm",
        "--privileged",
        "--userns",
        "host",
        "busybox",
        "true",
    ])?;

    let info = d.ok(&["info", "-f", "{{json .SecurityOptions}}"])?;
    ensure!(info.contains("name=userns"), "SecurityOptions {info}");

    // Removing the image collects its layers in both unpackings (shifted, and the plain one
    // the --userns=host runs made).
    let snapshots = || -> Result<Vec<String>> {
        let rt = tokio::runtime::Runtime::new()?;
        let infos = rt.block_on(async {
            RemoteSnapshotter::new(d.stack.socket(Service::Snapshotter), "overlayfs")
                .list(&[])
                .await
        })?;
        Ok(infos.into_iter().map(|i| i.name).collect())
    };
    let before = snapshots()?;
    ensure!(
        before.iter().any(|n| n.contains("@userns-"))
            && before
                .iter()
                .any(|n| n.starts_with("sha256:") && !n.contains('@')),
        "snapshots before: {before:?}"
    );
    // (The build cache keeps the built image's layers: pruned first.)
    d.ok(&["builder", "prune", "-af"])?;
    let image = d.ok(&["image", "inspect", "-f", "{{.Id}}", "busybox"])?;
    d.ok(&["rmi", "-f", &image])?;
    let after = snapshots()?;
    ensure!(
        after.iter().all(|n| !n.starts_with("sha256:")),
        "snapshots left: {after:?}"
    );
    Ok(())
}

#[test]
fn escapes_are_refused_under_remap() -> Result<()> {
    if !berth_integration::gateway_kit::ready() {
        return Ok(());
    }
    let user = SubidUser::create("bre")?;
    // Through daemon.json this time, as dockerd is configured.
    let d = DockerStack::start_from(
        Stack::builder().docker_config(&format!("{{\"userns-remap\": \"{}\"}}", user.name)),
    )?;
    std::fs::set_permissions(d.stack.dir(), std::fs::Permissions::from_mode(0o711))?;
    let info = d.ok(&["info", "-f", "{{json .SecurityOptions}}"])?;
    ensure!(info.contains("name=userns"), "SecurityOptions {info}");
    let _registry = py_kit::with_busybox(&d)?;
    let map = d.ok(&["run", "--rm", "busybox", "cat", "/proc/self/uid_map"])?;
    ensure!(
        map.split_whitespace().nth(1) == Some(&*user.uid_start.to_string()),
        "uid_map {map}"
    );
    userns_kit::assert_escapes_refused(&d)
}

#[test]
fn an_image_pulled_before_remap_runs_after_and_the_other_way() -> Result<()> {
    if !berth_integration::gateway_kit::ready() {
        return Ok(());
    }
    let user = SubidUser::create("brp")?;
    let mut d = DockerStack::start_from(Stack::builder().toml("[engine]\nuserns_remap = \"\"\n"))?;
    std::fs::set_permissions(d.stack.dir(), std::fs::Permissions::from_mode(0o711))?;
    let _registry = py_kit::with_busybox(&d)?;
    let plain = d.ok(&["run", "--rm", "busybox", "cat", "/proc/self/uid_map"])?;
    ensure!(plain.split_whitespace().nth(1) == Some("0"), "{plain}");

    // Turned on: the layers are unpacked shifted at create.
    let remap = format!("userns_remap = \"{}\"", user.name);
    d.stack
        .restart_with_config(|t| t.replace("userns_remap = \"\"", &remap))?;
    let id = d.ok(&[
        "run",
        "--rm",
        "busybox",
        "sh",
        "-c",
        "id -u; touch /ok; cat /proc/self/uid_map",
    ])?;
    let fields: Vec<&str> = id.split_whitespace().collect();
    ensure!(
        fields.first() == Some(&"0") && fields.get(2) == Some(&&*user.uid_start.to_string()),
        "{id}"
    );

    // And off again: the plain layers are still there.
    d.stack
        .restart_with_config(|t| t.replace(&remap, "userns_remap = \"\""))?;
    let plain = d.ok(&["run", "--rm", "busybox", "cat", "/proc/self/uid_map"])?;
    ensure!(plain.split_whitespace().nth(1) == Some("0"), "{plain}");
    Ok(())
}
