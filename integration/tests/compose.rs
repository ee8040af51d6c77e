//! docker-compose 1.29 (Debian's package, a real client built on docker-py 5) drives a project
//! through its whole life against a real stack: `up -d` of three services on the project's own
//! network with named volumes, a published port, an env file and `depends_on` with
//! `condition: service_healthy`; `ps`, `logs` (also `-f`), `exec`, service names in DNS,
//! `--scale`, `restart`, a second `up -d` that recreates only the changed service, `stop` and
//! `down -v`, after which nothing of the project is left. Root only; skips cleanly otherwise.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use berth_integration::gateway_kit::{DockerStack, Running, http_get};
use berth_integration::images_kit::free_port;
use berth_integration::py_kit::{self, compose_cmd, compose_ok};

fn compose_file(greeting: &str) -> String {
    format!(
        r#"version: "2.4"
services:
  db:
    image: busybox
    command: ["sh", "-c", "echo db up; touch /tmp/ready; exec sleep 3600"]
    healthcheck:
      test: ["CMD", "test", "-f", "/tmp/ready"]
      interval: 1s
      timeout: 3s
      retries: 3
    env_file: db.env
    volumes:
      - data:/data
    networks: [back]
  web:
    image: busybox
    command: ["sh", "-c", "echo hello from $$GREETING > /www/index.html; echo web up $$GREETING; exec httpd -f -p 8080 -h /www"]
    environment:
      GREETING: {greeting}
    depends_on:
      db:
        condition: service_healthy
    ports:
      - "127.0.0.1:${{WEB_PORT}}:8080"
    volumes:
      - www:/www
    networks: [back]
  worker:
    image: busybox
    command: ["sleep", "3600"]
    networks: [back]
networks:
  back: {{}}
volumes:
  data: {{}}
  www: {{}}
"#
    )
}

fn write_project(dir: &Path, greeting: &str, port: u16) -> Result<()> {
    std::fs::write(dir.join("docker-compose.yml"), compose_file(greeting))?;
    std::fs::write(dir.join("db.env"), "DB_NAME=shop\nDB_USER=admin\n")?;
    std::fs::write(dir.join(".env"), format!("WEB_PORT={port}\n"))?;
    Ok(())
}

/// Names of the project's containers (`docker ps -a` with compose's project label).
fn project_containers(d: &DockerStack, project: &str) -> Result<Vec<String>> {
    let label = format!("label=com.docker.compose.project={project}");
    let out = d.ok(&[
        "ps",
        "-a",
        "--filter",
        &label,
        "--format",
        "{{.Names}} {{.State}}",
    ])?;
    let mut names: Vec<String> = out.lines().map(str::to_string).collect();
    names.sort();
    Ok(names)
}

#[test]
fn compose_project_lifecycle() -> Result<()> {
    if !py_kit::compose_ready() {
        return Ok(());
    }
    let d = DockerStack::start()?;
    let _registry = py_kit::with_busybox(&d)?;
    let dir = tempfile::tempdir()?;
    let project = format!("bc{}", std::process::id());
    let p = project.as_str();
    let port = free_port();
    write_project(dir.path(), "hi", port)?;
    let compose = |args: &[&str]| -> Result<String> {
        let mut all = vec!["-p", p];
        all.extend_from_slice(args);
        compose_ok(&d, dir.path(), &all)
    };
    let result = (|| -> Result<()> {
        compose(&["up", "-d"])?;
        let names = project_containers(&d, p)?;
        ensure!(
            names
                == vec![
                    format!("{p}_db_1 running"),
                    format!("{p}_web_1 running"),
                    format!("{p}_worker_1 running"),
                ],
            "{names:?}"
        );
        // db was healthy before web started (depends_on: service_healthy).
        let health = d.ok(&[
            "inspect",
            "-f",
            "{{.State.Health.Status}}",
            &format!("{p}_db_1"),
        ])?;
        ensure!(health == "healthy", "db health {health}");
        let ps = compose(&["ps"])?;
        ensure!(ps.contains("(healthy)"), "{ps}");
        ensure!(ps.contains(&format!("127.0.0.1:{port}->8080/tcp")), "{ps}");

        // The published port, and service names in the project network's DNS.
        let page = http_get(&format!("127.0.0.1:{port}"), "/index.html")?;
        ensure!(page.contains("hello from hi"), "{page}");
        let fetched = compose(&["exec", "-T", "worker", "wget", "-qO-", "http://web:8080/"])?;
        ensure!(fetched.trim() == "hello from hi", "{fetched}");
        let env = compose(&["exec", "-T", "db", "env"])?;
        ensure!(
            env.contains("DB_NAME=shop") && env.contains("DB_USER=admin"),
            "{env}"
        );

        let logs = compose(&["logs", "--no-color"])?;
        ensure!(
            logs.contains("db up") && logs.contains("web up hi"),
            "{logs}"
        );
        let mut follow = Running::spawn(&mut compose_cmd(
            &d,
            dir.path(),
            &["-p", p, "logs", "-f", "--no-color", "worker", "db"],
        ))?;
        ensure!(
            follow.wait_stdout(Duration::from_secs(30), |o| o.contains("db up")),
            "logs -f: {}",
            follow.stdout()
        );
        ensure!(
            follow.wait_exit(Duration::from_millis(500)).is_none(),
            "logs -f ended early"
        );
        drop(follow);

        compose(&["up", "-d", "--scale", "worker=2"])?;
        let names = project_containers(&d, p)?;
        ensure!(
            names.contains(&format!("{p}_worker_2 running")),
            "{names:?}"
        );

        let started = |name: &str| {
            d.ok(&[
                "inspect",
                "-f",
                "{{.State.StartedAt}}",
                &format!("{p}_{name}_1"),
            ])
        };
        let before = started("web")?;
        compose(&["restart", "web"])?;
        ensure!(started("web")? != before, "web was not restarted");

        // A changed service is recreated; the others are left alone.
        let db_id = d.ok(&["inspect", "-f", "{{.Id}}", &format!("{p}_db_1")])?;
        let web_id = d.ok(&["inspect", "-f", "{{.Id}}", &format!("{p}_web_1")])?;
        write_project(dir.path(), "bye", port)?;
        compose(&["up", "-d", "--scale", "worker=2"])?;
        ensure!(
            d.ok(&["inspect", "-f", "{{.Id}}", &format!("{p}_db_1")])? == db_id,
            "db recreated"
        );
        ensure!(
            d.ok(&["inspect", "-f", "{{.Id}}", &format!("{p}_web_1")])? != web_id,
            "web not recreated"
        );
        let page = http_get(&format!("127.0.0.1:{port}"), "/index.html")?;
        ensure!(page.contains("hello from bye"), "{page}");

        compose(&["stop"])?;
        let names = project_containers(&d, p)?;
        ensure!(names.iter().all(|n| n.ends_with(" exited")), "{names:?}");

        compose(&["down", "-v"])?;
        let names = project_containers(&d, p)?;
        ensure!(names.is_empty(), "{names:?}");
        let nets = d.ok(&["network", "ls", "--format", "{{.Name}}"])?;
        ensure!(!nets.contains(p), "{nets}");
        let vols = d.ok(&["volume", "ls", "--format", "{{.Name}}"])?;
        ensure!(!vols.contains(p), "{vols}");
        Ok(())
    })();
    if result.is_err() {
        let _ = compose(&["down", "-v", "--timeout", "1"]);
    }
    result.context(format!("compose project {p}"))
}
