//! Test kit for Docker's Python clients: docker-py 7 (from PyPI, in the venv `make test` makes
//! with `deploy/pyvenv.sh`) and docker-compose 1.29 (Debian's package), both aimed at a
//! [`DockerStack`]. Scripts are ordinary Python with `assert`s: a failed assertion fails the
//! Rust test with the script's output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};

use crate::gateway_kit::{DockerStack, run_for};
use crate::images_kit::{Registry, RegistryOptions, oci_dir};

/// How long one Python script or compose command may run before the test calls it hung.
pub const SCRIPT_LIMIT: Duration = Duration::from_secs(300);

/// The venv: `$BERTH_PYVENV`, else the workspace's `target/pyvenv`.
pub fn venv() -> PathBuf {
    if let Some(dir) = std::env::var_os("BERTH_PYVENV") {
        return PathBuf::from(dir);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyvenv")
}

/// `false` (and a note) when the Python clients cannot run here: the gateway kit's needs,
/// plus the venv with docker-py (`make pyvenv`).
pub fn ready() -> bool {
    if !crate::gateway_kit::ready() {
        return false;
    }
    let python = venv().join("bin/python");
    if !python.is_file() {
        eprintln!(
            "skipped: no docker-py venv at {} (make pyvenv)",
            venv().display()
        );
        return false;
    }
    true
}

/// `false` (and a note) when docker-compose is not installed (deploy/install-deps.sh does).
pub fn compose_ready() -> bool {
    if !crate::gateway_kit::ready() {
        return false;
    }
    let found = Path::new("/usr/bin/docker-compose").is_file();
    if !found {
        eprintln!("skipped: docker-compose is not installed");
    }
    found
}

fn stack_env(stack: &DockerStack, cmd: &mut Command) {
    cmd.env(
        "DOCKER_HOST",
        format!("unix://{}", stack.socket().display()),
    )
    .env_remove("DOCKER_TLS_VERIFY")
    .env_remove("DOCKER_CERT_PATH")
    .env_remove("DOCKER_CONTEXT")
    .env("PYTHONUNBUFFERED", "1")
    .env("PYTHONDONTWRITEBYTECODE", "1");
}

/// Runs `script` with the venv's Python, `DOCKER_HOST` set to the stack's socket, in a temp dir.
pub fn run(stack: &DockerStack, script: &str) -> Result<Output> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("test.py");
    std::fs::write(&path, script)?;
    let mut cmd = Command::new(venv().join("bin/python"));
    cmd.arg(&path).current_dir(dir.path());
    stack_env(stack, &mut cmd);
    run_for(&mut cmd, SCRIPT_LIMIT)
}

/// [`run`], failing with the script's stdout and stderr unless it exits 0; returns stdout.
pub fn ok(stack: &DockerStack, script: &str) -> Result<String> {
    let out = run(stack, script)?;
    ensure!(
        out.status.success(),
        "python script failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A `docker-compose args...` command in `project_dir` aimed at the stack.
pub fn compose_cmd(stack: &DockerStack, project_dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("/usr/bin/docker-compose");
    cmd.args(["--ansi", "never"])
        .args(args)
        .current_dir(project_dir);
    stack_env(stack, &mut cmd);
    cmd.env("COMPOSE_INTERACTIVE_NO_CLI", "1");
    cmd
}

/// Runs `docker-compose args...` in `project_dir` against the stack.
pub fn compose(stack: &DockerStack, project_dir: &Path, args: &[&str]) -> Result<Output> {
    run_for(&mut compose_cmd(stack, project_dir, args), SCRIPT_LIMIT)
}

/// [`compose`], failing with its output unless it exits 0; returns stdout.
pub fn compose_ok(stack: &DockerStack, project_dir: &Path, args: &[&str]) -> Result<String> {
    let out = compose(stack, project_dir, args)?;
    ensure!(
        out.status.success(),
        "docker-compose {} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts a loopback registry holding the test busybox, pulls it into the stack and tags it
/// `busybox:latest`, so scripts can say `busybox` as a user would. Keep the registry alive
/// for the test (dropping it stops it).
pub fn with_busybox(stack: &DockerStack) -> Result<Registry> {
    let registry = Registry::start(RegistryOptions::default())?;
    registry.push_oci(&oci_dir("busybox"), "busybox:latest")?;
    let image = format!("{}/busybox:latest", registry.host);
    stack.ok(&["pull", "-q", &image]).context("pull busybox")?;
    stack.ok(&["tag", &image, "busybox:latest"])?;
    Ok(registry)
}
