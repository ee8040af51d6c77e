//! bollard as a second Docker API client against a real stack: pull with progress, create with
//! a name, attach with stdin before start (hijacked, stdcopy-framed), wait, logs with both
//! streams, inspect, exec with output and exit code, events with since/until, and the API
//! version negotiation. Root only; skips cleanly otherwise.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use berth_integration::gateway_kit::{DockerStack, ready};
use berth_integration::images_kit::{Registry, RegistryOptions, oci_dir};
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, CreateImageOptionsBuilder,
    EventsOptionsBuilder, InspectContainerOptions, ListImagesOptions, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

fn split(outputs: &[LogOutput]) -> (String, String) {
    let (mut out, mut err) = (String::new(), String::new());
    for o in outputs {
        match o {
            LogOutput::StdOut { message } | LogOutput::Console { message } => {
                out.push_str(&String::from_utf8_lossy(message))
            }
            LogOutput::StdErr { message } => err.push_str(&String::from_utf8_lossy(message)),
            LogOutput::StdIn { .. } => {}
        }
    }
    (out, err)
}

#[test]
fn bollard_drives_the_gateway() -> Result<()> {
    if !ready() {
        return Ok(());
    }
    let registry = Registry::start(RegistryOptions::default())?;
    registry.push_oci(&oci_dir("busybox"), "busybox:latest")?;
    let image = format!("{}/busybox:latest", registry.host);
    let d = DockerStack::start()?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let docker = d.bollard()?;
        let negotiated = docker.clone().negotiate_version().await?;
        ensure!(
            negotiated.client_version().to_string() == "1.45",
            "negotiated {}",
            negotiated.client_version()
        );
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
            - 1;

        // Pull, with Docker's progress messages.
        let opts = CreateImageOptionsBuilder::new().from_image(&image).build();
        let progress: Vec<_> = docker.create_image(Some(opts), None, None).collect().await;
        let statuses: Vec<String> = progress
            .into_iter()
            .map(|p| p.map(|p| p.status.unwrap_or_default()))
            .collect::<Result<_, _>>()?;
        ensure!(
            statuses.iter().any(|s| s == "Pull complete"),
            "{statuses:?}"
        );
        ensure!(
            statuses
                .last()
                .is_some_and(|s| s.starts_with("Status: Downloaded newer image")),
            "{statuses:?}"
        );
        let images = docker.list_images(None::<ListImagesOptions>).await?;
        ensure!(
            images.iter().any(|i| i.repo_tags.contains(&image)),
            "{images:?}"
        );

        // Create with a name; attach with stdin before start; start; feed stdin; wait.
        let body = ContainerCreateBody {
            image: Some(image.clone()),
            cmd: Some(vec![
                "sh".into(),
                "-c".into(),
                "echo out; echo err >&2; read x; echo got $x; exit 7".into(),
            ]),
            open_stdin: Some(true),
            stdin_once: Some(true),
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            ..Default::default()
        };
        let created = docker
            .create_container(
                Some(CreateContainerOptionsBuilder::new().name("bolly").build()),
                body,
            )
            .await?;
        let attach = docker
            .attach_container(
                "bolly",
                Some(
                    AttachContainerOptionsBuilder::new()
                        .stream(true)
                        .stdin(true)
                        .stdout(true)
                        .stderr(true)
                        .build(),
                ),
            )
            .await?;
        docker
            .start_container(
                "bolly",
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await?;
        let mut input = attach.input;
        input.write_all(b"hi\n").await?;
        input.flush().await?;
        let outputs: Vec<LogOutput> = tokio::time::timeout(
            Duration::from_secs(30),
            attach.output.filter_map(|o| async { o.ok() }).collect(),
        )
        .await
        .context("attach output did not end")?;
        let (out, err) = split(&outputs);
        ensure!(
            out == "out\ngot hi\n" && err == "err\n",
            "attach: out {out:?} err {err:?}"
        );
        // bollard's streams are lazy (the request goes out when polled), so wait for
        // "not-running" now that the output has ended. Non-zero codes arrive as errors.
        let mut wait = docker.wait_container(
            "bolly",
            Some(
                WaitContainerOptionsBuilder::new()
                    .condition("not-running")
                    .build(),
            ),
        );
        let status = match wait.next().await.context("wait ended")? {
            Ok(r) => r.status_code,
            Err(bollard::errors::Error::DockerContainerWaitError { code, .. }) => code,
            Err(e) => return Err(e.into()),
        };
        ensure!(status == 7, "wait: {status}");

        // Logs keep both streams apart.
        let logs: Vec<LogOutput> = docker
            .logs(
                "bolly",
                Some(LogsOptionsBuilder::new().stdout(true).stderr(true).build()),
            )
            .filter_map(|o| async { o.ok() })
            .collect()
            .await;
        let (out, err) = split(&logs);
        ensure!(
            out == "out\ngot hi\n" && err == "err\n",
            "logs: out {out:?} err {err:?}"
        );
        let inspect = docker
            .inspect_container("bolly", None::<InspectContainerOptions>)
            .await?;
        ensure!(inspect.id.as_deref() == Some(created.id.as_str()));
        let state = inspect.state.context("state")?;
        ensure!(
            state.exit_code == Some(7) && state.running == Some(false),
            "{state:?}"
        );
        ensure!(inspect.name.as_deref() == Some("/bolly"));

        // Exec in a running container: output and exit code.
        let body = ContainerCreateBody {
            image: Some(image.clone()),
            cmd: Some(vec!["sleep".into(), "300".into()]),
            ..Default::default()
        };
        docker
            .create_container(
                Some(CreateContainerOptionsBuilder::new().name("sleeper").build()),
                body,
            )
            .await?;
        docker
            .start_container(
                "sleeper",
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await?;
        let exec = docker
            .create_exec(
                "sleeper",
                CreateExecOptions {
                    cmd: Some(vec!["sh", "-c", "echo exec-out; echo exec-err >&2; exit 5"]),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..Default::default()
                },
            )
            .await?;
        match docker
            .start_exec(&exec.id, Some(StartExecOptions::default()))
            .await?
        {
            StartExecResults::Attached { output, .. } => {
                let outputs: Vec<LogOutput> = tokio::time::timeout(
                    Duration::from_secs(30),
                    output.filter_map(|o| async { o.ok() }).collect(),
                )
                .await
                .context("exec output did not end")?;
                let (out, err) = split(&outputs);
                ensure!(
                    out == "exec-out\n" && err == "exec-err\n",
                    "exec: {out:?} {err:?}"
                );
            }
            StartExecResults::Detached => anyhow::bail!("exec detached"),
        }
        let ei = docker.inspect_exec(&exec.id).await?;
        ensure!(
            ei.exit_code == Some(5) && ei.running == Some(false),
            "{ei:?}"
        );

        // Events between since and until.
        let until = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
            + 1;
        let events: Vec<_> = docker
            .events(Some(
                EventsOptionsBuilder::new()
                    .since(&since.to_string())
                    .until(&until.to_string())
                    .build(),
            ))
            .collect()
            .await;
        let actions: Vec<String> = events
            .into_iter()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.actor
                    .as_ref()
                    .and_then(|a| a.attributes.as_ref())
                    .and_then(|a| a.get("name"))
                    .is_some_and(|n| n == "bolly")
            })
            .filter_map(|e| e.action)
            .collect();
        for want in ["create", "attach", "start", "die"] {
            ensure!(
                actions.iter().any(|a| a == want),
                "events for bolly lack {want}: {actions:?}"
            );
        }

        for name in ["bolly", "sleeper"] {
            docker
                .remove_container(
                    name,
                    Some(RemoveContainerOptionsBuilder::new().force(true).build()),
                )
                .await?;
        }
        Ok(())
    })
}
