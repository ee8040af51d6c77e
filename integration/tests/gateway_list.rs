//! `GET /containers/json` over many containers: every filter, `limit`, `size`, the newest-first
//! order and the entry shape, checked against what the test created, through the raw API and
//! the docker CLI. Root only; skips cleanly otherwise.

use std::collections::BTreeSet;

use anyhow::{Context as _, Result, ensure};
use berth_integration::gateway_kit::{DockerStack, raw_request, ready};
use berth_integration::images_kit::{Registry, RegistryOptions, oci_dir};
use serde_json::{Value, json};

/// Containers created (not started) for the listing.
const CREATED: usize = 36;

/// One container the test made, with what a listing should say about it.
#[derive(Debug, Clone)]
struct Made {
    id: String,
    name: String,
    group: usize,
    state: &'static str,
}

/// `GET /containers/json` with `query` (already URL-encoded), as parsed JSON entries.
fn list(d: &DockerStack, query: &str) -> Result<Vec<Value>> {
    let (code, _, body) = raw_request(
        &d.socket(),
        "GET",
        &format!("/v1.45/containers/json?{query}"),
        "",
    )?;
    ensure!(code == 200, "list {query}: {code} {body}");
    let v: Value = serde_json::from_str(&body).with_context(|| format!("list {query}: {body}"))?;
    v.as_array()
        .cloned()
        .with_context(|| format!("list {query}: not an array: {body}"))
}

/// The names of the entries, in order, without the leading "/".
fn names(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .map(|e| {
            e["Names"][0]
                .as_str()
                .unwrap_or("")
                .trim_start_matches('/')
                .to_string()
        })
        .collect()
}

/// `filters` as the URL-encoded JSON the API takes.
fn filters(f: Value) -> String {
    let enc: String = f
        .to_string()
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    format!("all=1&filters={enc}")
}

/// The names of `made` (newest first) that `keep` accepts.
fn expect(made: &[Made], keep: impl Fn(&Made) -> bool) -> Vec<String> {
    made.iter()
        .rev()
        .filter(|m| keep(m))
        .map(|m| m.name.clone())
        .collect()
}

#[test]
fn listing_many_containers_filters_orders_and_limits_like_docker() -> Result<()> {
    if !ready() {
        return Ok(());
    }
    let registry = Registry::start(RegistryOptions::default())?;
    registry.push_oci(&oci_dir("busybox"), "busybox:latest")?;
    let busybox = format!("{}/busybox:latest", registry.host);
    let d = DockerStack::start()?;
    d.ok(&["pull", "-q", &busybox])?;
    let sock = d.socket();

    // Created containers in three label groups, then a running one and an exited one.
    let mut made = Vec::new();
    for i in 0..CREATED {
        let name = format!("lst-{i}");
        let body = json!({
            "Image": busybox,
            "Cmd": ["sleep", "300"],
            "Env": ["BIG=".to_string() + &"x".repeat(512)],
            "Labels": {"idx": i.to_string(), "grp": (i % 3).to_string()},
        });
        let (code, _, out) = raw_request(
            &sock,
            "POST",
            &format!("/v1.45/containers/create?name={name}"),
            &body.to_string(),
        )?;
        ensure!(code == 201, "create {name}: {code} {out}");
        let v: Value = serde_json::from_str(&out)?;
        made.push(Made {
            id: v["Id"].as_str().context("Id")?.to_string(),
            name,
            group: i % 3,
            state: "created",
        });
    }
    let id = d.ok(&[
        "run", "-d", "--name", "lst-run", "--label", "grp=1", &busybox, "sleep", "300",
    ])?;
    made.push(Made {
        id,
        name: "lst-run".into(),
        group: 1,
        state: "running",
    });
    let out = d.run(&[
        "run", "--name", "lst-exit", "--label", "grp=2", &busybox, "sh", "-c", "exit 3",
    ])?;
    ensure!(out.status.code() == Some(3), "exit 3: {out:?}");
    let id = d.ok(&["inspect", "-f", "{{.Id}}", "lst-exit"])?;
    made.push(Made {
        id,
        name: "lst-exit".into(),
        group: 2,
        state: "exited",
    });

    // Everything, newest first; only the running one without all.
    let all = list(&d, "all=1")?;
    ensure!(
        names(&all) == expect(&made, |_| true),
        "all: {:?}",
        names(&all)
    );
    ensure!(
        names(&list(&d, "")?) == ["lst-run"],
        "running only: {:?}",
        names(&list(&d, "")?)
    );

    // The entry shape the CLI, docker-py and compose read.
    let keys: BTreeSet<&str> = all[0]
        .as_object()
        .context("entry")?
        .keys()
        .map(String::as_str)
        .collect();
    let want: BTreeSet<&str> = [
        "Id",
        "Names",
        "Image",
        "ImageID",
        "Command",
        "Created",
        "Ports",
        "Labels",
        "State",
        "Status",
        "HostConfig",
        "NetworkSettings",
        "Mounts",
    ]
    .into();
    ensure!(keys == want, "entry keys: {keys:?}");
    let run = all
        .iter()
        .find(|e| e["Names"][0] == "/lst-run")
        .context("lst-run listed")?;
    ensure!(run["Command"] == "sleep 300", "{run}");
    ensure!(run["Image"] == busybox.as_str(), "{run}");
    ensure!(run["State"] == "running", "{run}");
    ensure!(
        run["Status"].as_str().is_some_and(|s| s.starts_with("Up ")),
        "{run}"
    );
    ensure!(run["Labels"] == json!({"grp": "1"}), "{run}");
    ensure!(run["HostConfig"]["NetworkMode"] == "bridge", "{run}");
    ensure!(
        run["NetworkSettings"]["Networks"]["bridge"]["IPAddress"]
            .as_str()
            .is_some_and(|ip| !ip.is_empty()),
        "{run}"
    );
    let c7 = all
        .iter()
        .find(|e| e["Names"][0] == "/lst-7")
        .context("lst-7 listed")?;
    ensure!(
        c7["Labels"] == json!({"idx": "7", "grp": "1"}) && c7["Status"] == "Created",
        "{c7}"
    );
    ensure!(c7.get("SizeRw").is_none(), "no sizes unless asked: {c7}");

    // Filters, alone and combined.
    let cases: Vec<(Value, Vec<String>)> = vec![
        (json!({"label": ["grp=1"]}), expect(&made, |m| m.group == 1)),
        (json!({"label": ["grp"]}), expect(&made, |_| true)),
        (
            json!({"label": ["grp=0", "idx=3"]}),
            expect(&made, |m| m.name == "lst-3"),
        ),
        (
            json!({"label!": ["grp=0"]}),
            expect(&made, |m| m.group != 0),
        ),
        (
            json!({"name": ["lst-1"]}),
            expect(&made, |m| m.name.contains("lst-1")),
        ),
        (
            json!({"name": ["lst-1"], "label": ["grp=2"]}),
            expect(&made, |m| m.name.contains("lst-1") && m.group == 2),
        ),
        (
            json!({"status": ["created"]}),
            expect(&made, |m| m.state == "created"),
        ),
        (
            json!({"status": ["running", "exited"]}),
            expect(&made, |m| m.state != "created"),
        ),
        (json!({"exited": ["3"]}), vec!["lst-exit".to_string()]),
        (json!({"exited": ["0"]}), vec![]),
        (
            json!({"id": [&made[5].id[..12]]}),
            vec![made[5].name.clone()],
        ),
        (json!({"ancestor": [&busybox]}), expect(&made, |_| true)),
        (json!({"ancestor": ["alpine"]}), vec![]),
        (json!({"health": ["none"]}), expect(&made, |_| true)),
        (json!({"health": ["healthy"]}), vec![]),
        (
            json!({"before": ["lst-3"]}),
            vec!["lst-2".into(), "lst-1".into(), "lst-0".into()],
        ),
        (
            json!({"since": [format!("lst-{}", CREATED - 2)]}),
            expect(&made, |m| {
                m.name == format!("lst-{}", CREATED - 1) || m.state != "created"
            }),
        ),
    ];
    for (f, want) in cases {
        let got = names(&list(&d, &filters(f.clone()))?);
        ensure!(got == want, "filters {f}: got {got:?}, want {want:?}");
    }
    // Without all, the network filter only sees running containers.
    let got = names(&list(
        &d,
        &filters(json!({"network": ["bridge"]})).replace("all=1&", ""),
    )?);
    ensure!(got == ["lst-run"], "network bridge: {got:?}");

    // Bad filters are Docker's 400s.
    let (code, _, body) = raw_request(
        &sock,
        "GET",
        &format!(
            "/v1.45/containers/json?{}",
            filters(json!({"status": ["sleepy"]}))
        ),
        "",
    )?;
    ensure!(
        code == 400 && body.contains("invalid filter 'status=sleepy'"),
        "{code} {body}"
    );

    // limit: the newest n, stopped ones included.
    let got = names(&list(&d, "limit=5")?);
    ensure!(got == expect(&made, |_| true)[..5], "limit=5: {got:?}");

    // size=1: every entry carries SizeRw and SizeRootFs.
    let sized = list(&d, "all=1&size=1")?;
    ensure!(
        sized.len() == made.len(),
        "size=1 lists all: {}",
        sized.len()
    );
    ensure!(
        sized
            .iter()
            .all(|e| e["SizeRw"].is_i64() && e["SizeRootFs"].is_i64()),
        "size=1: {sized:?}"
    );

    // The docker CLI on the same listing.
    let ps = d.ok(&[
        "ps",
        "-a",
        "--filter",
        "label=grp=0",
        "--format",
        "{{.Names}}|{{.Label \"idx\"}}",
    ])?;
    let want: Vec<String> = made
        .iter()
        .rev()
        .filter(|m| m.group == 0)
        .map(|m| format!("{}|{}", m.name, m.name.trim_start_matches("lst-")))
        .collect();
    ensure!(ps.lines().collect::<Vec<_>>() == want, "docker ps: {ps}");
    let count = d.ok(&["ps", "-aq"])?.lines().count();
    ensure!(count == made.len(), "docker ps -aq: {count}");

    // A listing is a summary; inspect still has the whole record.
    let env = d.ok(&["inspect", "-f", "{{len .Config.Env}}", "lst-4"])?;
    ensure!(env != "0", "inspect keeps the env: {env}");
    let info = d.ok(&["info", "-f", "{{.Containers}} {{.ContainersRunning}}"])?;
    ensure!(info == format!("{} 1", made.len()), "info: {info}");
    Ok(())
}
