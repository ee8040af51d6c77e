//! Rootful `userns-remap`: a stack whose config maps containers onto a test user's subordinate
//! ranges (the user, its group and its `/etc/subuid` and `/etc/subgid` lines are made here and
//! removed on drop). Root only; skips cleanly otherwise.

use std::os::unix::fs::PermissionsExt;

use anyhow::{Context as _, Result, ensure};
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
        Ok(())
    })();
    let _ = d.run(&["rm", "-f", &name]);
    result?;

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

    // docker cp in and out keeps container ids.
    let name = format!("remap-cp-{}", std::process::id());
    d.ok(&[
        "run",
        "-d",
        "--name",
        &name,
        "busybox",
        "sh",
        "-c",
        "echo x > /tmp/mine; chown 1000:1000 /tmp/mine; exec sleep 300",
    ])?;
    let result = (|| -> Result<()> {
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
        Ok(())
    })();
    let _ = d.run(&["rm", "-f", &name]);
    result?;

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
    Ok(())
}

#[test]
fn escapes_are_refused_under_remap() -> Result<()> {
    if !berth_integration::gateway_kit::ready() {
        return Ok(());
    }
    let user = SubidUser::create("bre")?;
    let d = remapped_stack(&user)?;
    let _registry = py_kit::with_busybox(&d)?;
    userns_kit::assert_escapes_refused(&d)
}
