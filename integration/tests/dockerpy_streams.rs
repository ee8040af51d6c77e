//! Exec and attach streams, kill and the restarting state as Docker's clients see them:
//! docker-py (integration/python/streams.py: exec_run and attach with logs read in full 100
//! times out of 100, exec with a pty, commands that cannot run, detach keys, kill then inspect,
//! a restarting container refused removal, websocket attach with websocket-client), then the
//! docker CLI for the same cases. Root only; skips cleanly otherwise.

use anyhow::{Result, ensure};
use berth_integration::gateway_kit::DockerStack;
use berth_integration::py_kit;

const SCRIPT: &str = include_str!("../python/streams.py");

#[test]
fn streams_kill_and_restarting_through_docker_py_and_the_cli() -> Result<()> {
    if !py_kit::ready() {
        return Ok(());
    }
    let d = DockerStack::start()?;
    let _registry = py_kit::with_busybox(&d)?;
    let out = py_kit::ok(&d, SCRIPT)?;
    ensure!(out.trim_end().ends_with("ok"), "{out}");

    let name = format!("streams-cli-{}", std::process::id());
    d.ok(&["run", "-d", "--name", &name, "busybox", "sleep", "1000"])?;

    // `docker exec -t`: the pty's lines end in \r\n, as Docker's do.
    let out = d.run(&["exec", "-t", &name, "echo", "hi"])?;
    ensure!(out.status.success(), "{out:?}");
    ensure!(out.stdout == b"hi\r\n", "{:?}", out.stdout);

    // A command that is not there: Docker's message and exit status 127; not executable: 126.
    let out = d.run(&["exec", &name, "nope"])?;
    ensure!(out.status.code() == Some(127), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.trim_end()
            == "OCI runtime exec failed: exec failed: unable to start container process: exec: \"nope\": executable file not found in $PATH: unknown",
        "{out:?}"
    );
    let out = d.run(&["exec", &name, "/etc/passwd"])?;
    ensure!(out.status.code() == Some(126), "{out:?}");

    // `docker kill` returns once the exit is recorded.
    d.ok(&["kill", &name])?;
    let state = d.ok(&[
        "inspect",
        "-f",
        "{{.State.Status}} {{.State.Running}} {{.State.ExitCode}}",
        &name,
    ])?;
    ensure!(state == "exited false 137", "{state}");
    d.ok(&["rm", &name])?;
    Ok(())
}
