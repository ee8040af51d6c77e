//! The CRI streaming server end to end: `Exec`/`Attach` over `<state>/cri.sock` hand out a URL,
//! and the test speaks Kubernetes' stream protocols to it over real HTTP — SPDY/3.1 with
//! `v4.channel.k8s.io` as kubelet's client does, and the websocket `v5.channel.k8s.io` — into a
//! busybox container made with the real docker CLI. Port forwarding is driven into that
//! container's network namespace.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use berth_cri::streaming::{self, Pending, StreamServer, backend::EngineSessions, spdy::Frame};
use berth_integration::cri_stream_kit::{Received, STEP, SpdyClient, split_url};
use berth_integration::gateway_kit::{self, DockerStack};
use berth_integration::py_kit::with_busybox;
use berth_proto::cri::runtime::v1 as cri;
use berth_proto::cri::runtime::v1::runtime_service_client::RuntimeServiceClient;
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};
use tonic::Code;

type Runtime = RuntimeServiceClient<berth_core::uds::Channel>;

fn runtime(d: &DockerStack) -> Runtime {
    RuntimeServiceClient::new(berth_core::uds::channel(d.cri_socket()))
}

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

async fn exec_url(rt: &mut Runtime, req: cri::ExecRequest) -> Result<String> {
    Ok(rt.exec(req).await?.into_inner().url)
}

/// Opens the remotecommand streams kubelet's v4 client opens for these options; their ids as
/// (error, stdin, stdout, stderr, resize).
async fn open_streams(
    c: &mut SpdyClient,
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
) -> Result<[Option<u32>; 5]> {
    let error = Some(c.open(&[("streamType", "error")]).await?);
    let mut ids = [error, None, None, None, None];
    for (i, (on, kind)) in [
        (stdin, "stdin"),
        (stdout, "stdout"),
        (stderr, "stderr"),
        (tty, "resize"),
    ]
    .into_iter()
    .enumerate()
    {
        if on {
            ids[i + 1] = Some(c.open(&[("streamType", kind)]).await?);
        }
    }
    Ok(ids)
}

fn status_json(r: &Received, error: u32) -> Result<serde_json::Value> {
    serde_json::from_str(&r.text(error))
        .with_context(|| format!("error stream {:?}", r.text(error)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_attach_and_port_forward_over_spdy_and_websockets() -> Result<()> {
    if !gateway_kit::ready() {
        return Ok(());
    }
    let d = DockerStack::start()?;
    let _registry = with_busybox(&d)?;
    let id = d.ok(&["run", "-d", "busybox", "sleep", "300"])?;
    let mut rt = runtime(&d);

    eprintln!("step: SPDY v4: output, exit status on the error stream.");
    // --- SPDY v4: output, exit status on the error stream.
    let url = exec_url(
        &mut rt,
        cri::ExecRequest {
            container_id: id.clone(),
            cmd: sh("echo hi; echo oops >&2; exit 3"),
            stdout: true,
            stderr: true,
            ..Default::default()
        },
    )
    .await?;
    ensure!(url.starts_with("http://127.0.0.1:"), "{url}");
    let mut c = SpdyClient::connect(&url, &["v4.channel.k8s.io", "v3.channel.k8s.io"])
        .await?
        .map_err(|r| anyhow::anyhow!("refused: {r:?}"))?;
    assert_eq!(c.protocol, "v4.channel.k8s.io");
    let [error, _, stdout, stderr, _] = open_streams(&mut c, false, true, true, false).await?;
    let (error, stdout, stderr) = (error.unwrap(), stdout.unwrap(), stderr.unwrap());
    let r = c.until_finished(&[error, stdout, stderr]).await?;
    assert_eq!(r.text(stdout), "hi\n");
    assert_eq!(r.text(stderr), "oops\n");
    for s in [error, stdout, stderr] {
        assert!(
            r.replied.contains(&s),
            "stream {s} accepted with SYN_REPLY: {r:?}"
        );
    }
    let status = status_json(&r, error)?;
    assert_eq!(status["status"], "Failure");
    assert_eq!(status["reason"], "NonZeroExitCode");
    assert_eq!(status["details"]["causes"][0]["reason"], "ExitCode");
    assert_eq!(status["details"]["causes"][0]["message"], "3");
    // The server says goodbye after the status.
    let mut goaway = false;
    while let Some(f) = c.next().await? {
        goaway |= matches!(f, Frame::GoAway { .. });
    }
    assert!(goaway, "GOAWAY before the close");

    // The URL was single-use.
    let again = SpdyClient::connect(&url, &["v4.channel.k8s.io"]).await?;
    let refused = again.err().context("a used token must not upgrade")?;
    assert_eq!(refused.status, 404, "{}", refused.head);

    // --- Much output: split into frames, none lost.
    let url = exec_url(
        &mut rt,
        cri::ExecRequest {
            container_id: id.clone(),
            cmd: sh("head -c 3000000 /dev/zero"),
            stdout: true,
            ..Default::default()
        },
    )
    .await?;
    let mut c = SpdyClient::connect(&url, &["v4.channel.k8s.io"])
        .await?
        .map_err(|r| anyhow::anyhow!("refused: {r:?}"))?;
    let [error, _, stdout, _, _] = open_streams(&mut c, false, true, false, false).await?;
    let r = c.until_finished(&[error.unwrap(), stdout.unwrap()]).await?;
    let out = &r.data[&stdout.unwrap()];
    assert_eq!(out.len(), 3_000_000);
    assert!(out.iter().all(|b| *b == 0));
    assert_eq!(status_json(&r, error.unwrap())?["status"], "Success");

    eprintln!("step: stdin, and its close ending `cat`; success is a Success status.");
    // --- stdin, and its close ending `cat`; success is a Success status.
    let url = exec_url(
        &mut rt,
        cri::ExecRequest {
            container_id: id.clone(),
            cmd: vec!["cat".into()],
            stdin: true,
            stdout: true,
            stderr: true,
            ..Default::default()
        },
    )
    .await?;
    let mut c = SpdyClient::connect(&url, &["v4.channel.k8s.io"])
        .await?
        .map_err(|r| anyhow::anyhow!("refused: {r:?}"))?;
    let [error, stdin, stdout, stderr, _] = open_streams(&mut c, true, true, true, false).await?;
    let (error, stdin, stdout, stderr) = (
        error.unwrap(),
        stdin.unwrap(),
        stdout.unwrap(),
        stderr.unwrap(),
    );
    c.data(stdin, b"abc\n", false).await?;
    let mut r = Received::default();
    c.collect(&mut r, |r| r.text(stdout).contains("abc\n"))
        .await?;
    c.data(stdin, b"def", true).await?;
    c.collect(&mut r, |r| {
        [error, stdout, stderr]
            .iter()
            .all(|s| r.finished.contains(s))
    })
    .await?;
    assert_eq!(r.text(stdout), "abc\ndef");
    assert_eq!(status_json(&r, error)?["status"], "Success");

    eprintln!("step: A TTY: resize, then the size is what the process sees.");
    // --- A TTY: resize, then the size is what the process sees.
    let url = exec_url(
        &mut rt,
        cri::ExecRequest {
            container_id: id.clone(),
            cmd: sh("read line; stty size; exit 7"),
            stdin: true,
            stdout: true,
            tty: true,
            ..Default::default()
        },
    )
    .await?;
    let mut c = SpdyClient::connect(&url, &["v4.channel.k8s.io"])
        .await?
        .map_err(|r| anyhow::anyhow!("refused: {r:?}"))?;
    let [error, stdin, stdout, stderr, resize] =
        open_streams(&mut c, true, true, false, true).await?;
    assert!(stderr.is_none());
    let (error, stdin, stdout, resize) = (
        error.unwrap(),
        stdin.unwrap(),
        stdout.unwrap(),
        resize.unwrap(),
    );
    // Split across frames, as a JSON stream may be.
    c.data(resize, br#"{"Width":123,"#, false).await?;
    c.data(resize, br#""Height":45}"#, false).await?;
    c.data(stdin, b"go\r", false).await?;
    let r = c.until_finished(&[error, stdout]).await?;
    assert!(r.text(stdout).contains("45 123"), "{:?}", r.text(stdout));
    assert_eq!(
        status_json(&r, error)?["details"]["causes"][0]["message"],
        "7"
    );

    eprintln!("step: An older client (v2): no resize stream, the failure as text.");
    // --- An older client (v2): no resize stream, the failure as text.
    let url = exec_url(
        &mut rt,
        cri::ExecRequest {
            container_id: id.clone(),
            cmd: sh("exit 4"),
            stdout: true,
            ..Default::default()
        },
    )
    .await?;
    let mut c = SpdyClient::connect(&url, &["v2.channel.k8s.io"])
        .await?
        .map_err(|r| anyhow::anyhow!("refused: {r:?}"))?;
    assert_eq!(c.protocol, "v2.channel.k8s.io");
    let [error, _, stdout, _, _] = open_streams(&mut c, false, true, false, false).await?;
    let r = c.until_finished(&[error.unwrap(), stdout.unwrap()]).await?;
    assert!(r.text(error.unwrap()).ends_with("exit code 4"), "{r:?}");

    // A protocol berth does not speak: 403, as kubelet answers.
    let url = exec_url(
        &mut rt,
        cri::ExecRequest {
            container_id: id.clone(),
            cmd: sh("true"),
            stdout: true,
            ..Default::default()
        },
    )
    .await?;
    let refused = SpdyClient::connect(&url, &["v9.channel.k8s.io"])
        .await?
        .err()
        .context("unknown protocol must be refused")?;
    assert_eq!(refused.status, 403, "{}", refused.head);
    assert!(
        refused.head.contains("v4.channel.k8s.io"),
        "{}",
        refused.head
    );

    eprintln!("step: Websocket v5: channel bytes, close of stdin (255), status on channel 3.");
    // --- Websocket v5: channel bytes, close of stdin (255), status on channel 3.
    let url = exec_url(
        &mut rt,
        cri::ExecRequest {
            container_id: id.clone(),
            cmd: sh("cat; echo done >&2; exit 5"),
            stdin: true,
            stdout: true,
            stderr: true,
            ..Default::default()
        },
    )
    .await?;
    let (addr, path) = split_url(&url)?;
    let mut req = format!("ws://{addr}{path}").into_client_request()?;
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "v5.channel.k8s.io".parse()?);
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await?;
    assert_eq!(
        resp.headers()
            .get("Sec-WebSocket-Protocol")
            .map(|v| v.to_str().unwrap_or_default()),
        Some("v5.channel.k8s.io")
    );
    ws.send(Message::Binary(vec![0, b'x', b'y', b'z'].into()))
        .await?;
    ws.send(Message::Binary(vec![255, 0].into())).await?;
    let (mut out, mut err, mut status, mut first) = (Vec::new(), Vec::new(), Vec::new(), None);
    loop {
        let msg = tokio::time::timeout(STEP, ws.next()).await?;
        match msg {
            Some(Ok(Message::Binary(b))) => {
                first.get_or_insert_with(|| b.to_vec());
                match b.first() {
                    Some(1) => out.extend_from_slice(&b[1..]),
                    Some(2) => err.extend_from_slice(&b[1..]),
                    Some(3) => status.extend_from_slice(&b[1..]),
                    _ => {}
                }
            }
            Some(Ok(Message::Close(_))) | None => break,
            Some(Ok(_)) => {}
            Some(Err(tungstenite::Error::ConnectionClosed)) => break,
            Some(Err(e)) => return Err(e.into()),
        }
    }
    assert_eq!(
        first.as_deref(),
        Some(&[1u8][..]),
        "an empty stdout message opens"
    );
    assert_eq!(String::from_utf8_lossy(&out), "xyz");
    assert_eq!(String::from_utf8_lossy(&err), "done\n");
    let status: serde_json::Value = serde_json::from_slice(&status)?;
    assert_eq!(status["details"]["causes"][0]["message"], "5");

    // --- The same with a client Kubernetes ships: the Python client's websocket stream
    // (kubernetes.stream.ws_client, v5 then v4), when the test venv has it.
    if kubernetes_py().is_some() {
        let url = exec_url(
            &mut rt,
            cri::ExecRequest {
                container_id: id.clone(),
                cmd: sh("cat; echo to-stderr >&2; exit 6"),
                stdin: true,
                stdout: true,
                stderr: true,
                ..Default::default()
            },
        )
        .await?;
        let (addr, path) = split_url(&url)?;
        let out = run_kubernetes_py(&format!("ws://{addr}{path}"))?;
        assert_eq!(
            out.trim(),
            r#"{"protocol": "v5.channel.k8s.io", "stdout": "from-python", "stderr": "to-stderr\n", "code": 6}"#
        );
    } else {
        eprintln!(
            "note: the test venv has no kubernetes package (make pyvenv); its client is not run"
        );
    }

    // --- crictl (Go: client-go's SPDY and websocket executors), when it is on this machine.
    if let Some(crictl) = crictl() {
        let run = |args: &[&str], stdin: &str| -> Result<std::process::Output> {
            use std::io::Write as _;
            let mut child = std::process::Command::new(&crictl)
                .arg("--runtime-endpoint")
                .arg(format!("unix://{}", d.cri_socket().display()))
                .args(args)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()?;
            child.stdin.take().unwrap().write_all(stdin.as_bytes())?;
            let out = child.wait_with_output()?;
            Ok(out)
        };
        for transport in ["spdy", "websocket"] {
            let out = run(
                &[
                    "exec",
                    "--transport",
                    transport,
                    &id,
                    "sh",
                    "-c",
                    "echo hi; exit 3",
                ],
                "",
            )?;
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                "hi\n",
                "{transport}: {out:?}"
            );
            // client-go turns the ExitCode cause into this error (crictl then exits 1).
            assert!(!out.status.success(), "{transport}: {out:?}");
            assert!(
                String::from_utf8_lossy(&out.stderr)
                    .contains("command terminated with exit code 3"),
                "{transport}: {out:?}"
            );
            let out = run(&["exec", "-i", "--transport", transport, &id, "cat"], "abc")?;
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                "abc",
                "{transport}: {out:?}"
            );
            assert!(out.status.success(), "{transport}: {out:?}");
        }
        let out = run(&["exec", "-s", "--timeout", "1", &id, "sleep", "60"], "")?;
        assert!(!out.status.success(), "{out:?}");
        let reader = d.ok(&[
            "run",
            "-d",
            "-i",
            "busybox",
            "sh",
            "-c",
            "read x; echo got-$x",
        ])?;
        let out = run(&["attach", "-i", &reader], "crictl\n")?;
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "got-crictl\n",
            "{out:?}"
        );
    } else {
        eprintln!(
            "note: no crictl (CRICTL or /var/tmp/critest-bin/crictl); Go's client is not run"
        );
    }

    eprintln!("step: Attach to a container's main process.");
    // --- Attach to a container's main process.
    let cat = d.ok(&[
        "run",
        "-d",
        "-i",
        "busybox",
        "sh",
        "-c",
        "read x; echo got-$x",
    ])?;
    let url = rt
        .attach(cri::AttachRequest {
            container_id: cat.clone(),
            stdin: true,
            stdout: true,
            stderr: true,
            tty: false,
        })
        .await?
        .into_inner()
        .url;
    ensure!(url.contains("/attach/"), "{url}");
    let mut c = SpdyClient::connect(&url, &["v4.channel.k8s.io"])
        .await?
        .map_err(|r| anyhow::anyhow!("refused: {r:?}"))?;
    let [error, stdin, stdout, stderr, _] = open_streams(&mut c, true, true, true, false).await?;
    c.data(stdin.unwrap(), b"hello\n", false).await?;
    let r = c
        .until_finished(&[error.unwrap(), stdout.unwrap(), stderr.unwrap()])
        .await?;
    assert_eq!(r.text(stdout.unwrap()), "got-hello\n");
    assert_eq!(status_json(&r, error.unwrap())?["status"], "Success");

    eprintln!("step: Bad requests.");
    // --- Bad requests.
    let err = rt
        .exec(cri::ExecRequest {
            container_id: "no-such-container".into(),
            cmd: sh("true"),
            stdout: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = rt
        .exec(cri::ExecRequest {
            container_id: id.clone(),
            cmd: sh("true"),
            tty: true,
            stderr: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = rt
        .port_forward(cri::PortForwardRequest {
            pod_sandbox_id: "nope".into(),
            port: vec![80],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    eprintln!("step: ExecSync: output, exit code; a timeout kills the process and says so.");
    // --- ExecSync: output, exit code; a timeout kills the process and says so.
    let r = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: id.clone(),
            cmd: sh("echo out; echo err >&2; exit 2"),
            timeout: 0,
        })
        .await?
        .into_inner();
    assert_eq!(
        (r.stdout.as_slice(), r.stderr.as_slice(), r.exit_code),
        (&b"out\n"[..], &b"err\n"[..], 2)
    );
    let err = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: id.clone(),
            cmd: sh("sleep 120"),
            timeout: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    let ps = d.ok(&["exec", &id, "ps", "-o", "args"])?;
    assert!(
        !ps.contains("sleep 120"),
        "the timed-out process was killed: {ps}"
    );

    eprintln!(
        "step: Port forwarding into the container's network namespace (the seam pod sandboxes"
    );
    // --- Port forwarding into the container's network namespace (the seam pod sandboxes
    // will use: a netns path), through a streaming server of its own.
    let web = d.ok(&[
        "run",
        "-d",
        "busybox",
        "sh",
        "-c",
        "while true; do echo hello-from-the-pod | nc -l -p 8080; done",
    ])?;
    let pid = d.ok(&["inspect", "-f", "{{.State.Pid}}", &web])?;
    let listener = streaming::bind("127.0.0.1:0").await?;
    let server = StreamServer::new(
        listener.local_addr()?,
        Arc::new(EngineSessions::new(
            &d.stack.socket(berth_core::Service::Engine),
        )),
    );
    let stop = tokio_util_cancel();
    let serving = tokio::spawn(streaming::serve(server.clone(), listener, stop.1));
    let url = server.url(Pending::PortForward(
        format!("/proc/{pid}/ns/net").into(),
        Vec::new(),
    ))?;
    let mut c = SpdyClient::connect(&url, &["portforward.k8s.io"])
        .await?
        .map_err(|r| anyhow::anyhow!("refused: {r:?}"))?;
    assert_eq!(c.protocol, "portforward.k8s.io");
    // nc in the loop may not be listening yet: retry a few requests.
    let mut got = String::new();
    for request in 0..50 {
        let rid = request.to_string();
        let e = c
            .open(&[
                ("streamType", "error"),
                ("port", "8080"),
                ("requestID", &rid),
            ])
            .await?;
        let data = c
            .open(&[
                ("streamType", "data"),
                ("port", "8080"),
                ("requestID", &rid),
            ])
            .await?;
        let mut r = Received::default();
        c.collect(&mut r, |r| {
            r.text(data).contains('\n') || r.finished.contains(&data)
        })
        .await?;
        got = r.text(data);
        if got.contains("hello-from-the-pod") {
            // The client ends its side; the pod's side ends with it.
            c.data(data, b"", true).await?;
            c.collect(&mut r, |r| {
                r.finished.contains(&e) && r.finished.contains(&data)
            })
            .await?;
            assert_eq!(r.text(e), "");
            break;
        }
        c.collect(&mut r, |r| r.finished.contains(&e)).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(got, "hello-from-the-pod\n");
    // A port nothing listens on: the error stream says so.
    let e = c
        .open(&[("streamType", "error"), ("port", "1"), ("requestID", "x")])
        .await?;
    let data = c
        .open(&[("streamType", "data"), ("port", "1"), ("requestID", "x")])
        .await?;
    let r = c.until_finished(&[e, data]).await?;
    assert!(r.text(e).contains("error forwarding port 1"), "{r:?}");
    drop(c);

    // The websocket variant: the ports come with the request, channel 0 is port 0's data and
    // channel 1 its errors, each opened with the port (u16 little endian).
    let netns = std::path::PathBuf::from(format!("/proc/{pid}/ns/net"));
    let mut got = Vec::new();
    for _ in 0..50 {
        let url = server.url(Pending::PortForward(netns.clone(), vec![8080]))?;
        let (addr, path) = split_url(&url)?;
        let mut req = format!("ws://{addr}{path}").into_client_request()?;
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", "v4.channel.k8s.io".parse()?);
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
        let (mut data, mut errors, mut opened) = (Vec::new(), Vec::new(), Vec::new());
        while !data.ends_with(b"\n") && errors.is_empty() {
            match tokio::time::timeout(STEP, ws.next()).await? {
                Some(Ok(Message::Binary(b))) if b.len() == 3 && opened.len() < 2 => {
                    opened.push(b.to_vec())
                }
                Some(Ok(Message::Binary(b))) => match b.first() {
                    Some(0) => data.extend_from_slice(&b[1..]),
                    Some(1) => errors.extend_from_slice(&b[1..]),
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | None => break,
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
            }
        }
        assert_eq!(opened, [vec![0u8, 0x90, 0x1f], vec![1u8, 0x90, 0x1f]]);
        let _ = ws.close(None).await;
        if !data.is_empty() {
            got = data;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(String::from_utf8_lossy(&got), "hello-from-the-pod\n");
    // And the Kubernetes Python client's port forwarding (websocket), when the venv has it.
    if kubernetes_py().is_some() {
        let mut got = String::new();
        for _ in 0..50 {
            let url = server.url(Pending::PortForward(netns.clone(), vec![8080]))?;
            let (addr, path) = split_url(&url)?;
            got = run_py(PY_PORT_FORWARD, &format!("ws://{addr}{path}"))?;
            if got.contains("hello") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(got.trim(), "hello-from-the-pod None");
    }
    let _ = stop.0.send(());
    serving.await??;
    Ok(())
}

/// A oneshot-backed shutdown future for an in-test server.
fn tokio_util_cancel() -> (
    tokio::sync::oneshot::Sender<()>,
    impl Future<Output = ()> + Send + 'static,
) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    (tx, async move {
        let _ = rx.await;
    })
}

/// The venv's python when it has the `kubernetes` package.
fn kubernetes_py() -> Option<std::path::PathBuf> {
    let python = berth_integration::py_kit::venv().join("bin/python");
    let ok = std::process::Command::new(&python)
        .args(["-c", "import kubernetes.stream.ws_client"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(python)
}

/// Runs an exec session at `url` with the Kubernetes Python client: writes stdin, closes it
/// (v5), and prints what came back as JSON.
fn run_kubernetes_py(url: &str) -> Result<String> {
    run_py(PY_EXEC, url)
}

/// Reads one line from port 8080 through the Python client's `PortForward`; prints it and the
/// port's error (None when there is none).
const PY_PORT_FORWARD: &str = r#"
import sys
from kubernetes.client import Configuration
from kubernetes.stream.ws_client import PortForward, create_websocket
ws = create_websocket(Configuration(), sys.argv[1], {"sec-websocket-protocol": "v4.channel.k8s.io"})
pf = PortForward(ws, [8080])
s = pf.socket(8080)
s.settimeout(60)
data = b""
while not data.endswith(b"\n"):
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
print(data.decode().strip(), pf.error(8080))
pf.close()
"#;

const PY_EXEC: &str = r#"
import json, sys
from kubernetes.client import Configuration
from kubernetes.stream.ws_client import WSClient
c = WSClient(Configuration(), sys.argv[1], None, capture_all=True)
c.write_stdin("from-python")
c.close_channel(0)
c.run_forever(timeout=60)
print(json.dumps({"protocol": c.subprotocol, "stdout": c.read_stdout(), "stderr": c.read_stderr(), "code": c.returncode}))
"#;

/// Runs `script` with `url` as its argument in the venv's python; its stdout.
fn run_py(script: &str, url: &str) -> Result<String> {
    let python = kubernetes_py().context("no kubernetes package")?;
    let out = gateway_kit::run_for(
        std::process::Command::new(python).args(["-c", script, url]),
        Duration::from_secs(120),
    )?;
    ensure!(
        out.status.success(),
        "kubernetes client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// crictl, built from cri-tools by deploy/critest.sh, when it is here.
fn crictl() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("CRICTL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/var/tmp/critest-bin/crictl".into());
    path.is_file().then_some(path)
}

/// A free TCP port on 127.0.0.1 (bound, then released for the forwarder to take).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Port forwarding through the CRI into a pod's network namespace, the way critest and kubelet's
/// clients do it: client-go opens an `error` stream and half-closes it at once ("we're not
/// writing to this stream") before it opens the `data` stream, then speaks HTTP on the data
/// stream; the early FIN must not end the data stream (critest's port-forward specs got EOF).
/// The same over berth's own SPDY client, crictl (client-go: SPDY, and SPDY tunnelled over a
/// websocket), and the Kubernetes Python client (websocket `v4.channel.k8s.io`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_into_a_pod_as_client_go_does() -> Result<()> {
    use berth_integration::cri_kit::{
        CriStack, plugins_ready, pod_config, run_pod, sh_container, start_container,
    };

    if !plugins_ready() {
        return Ok(());
    }
    let s = CriStack::start("crs", 9)?;
    let (d, logs) = (&s.d, &s.logs);
    let mut rt = s.runtime();
    let config = pod_config("berth-cri-streaming", "forward", Some(logs.path()));
    let guard = run_pod(&mut rt, d, &config).await?;
    let pod = guard.id.clone();
    // Served on the pod's loopback only: what answers came through the forward.
    start_container(
        &mut rt,
        &pod,
        &config,
        sh_container(
            "web",
            "mkdir -p /www && echo forwarded-page > /www/index.html && exec httpd -f -p 127.0.0.1:8080 -h /www",
        ),
    )
    .await?;
    let forward_url = |rt: &Runtime, ports: Vec<i32>| {
        let req = cri::PortForwardRequest {
            pod_sandbox_id: pod.clone(),
            port: ports,
        };
        let mut rt = rt.clone();
        async move { Ok::<_, anyhow::Error>(rt.port_forward(req).await?.into_inner().url) }
    };

    eprintln!("step: client-go's order over SPDY: error stream opened and half-closed first.");
    let request = b"GET / HTTP/1.0\r\nHost: pod\r\n\r\n";
    let mut page = String::new();
    for attempt in 0..50 {
        let url = forward_url(&rt, Vec::new()).await?;
        let mut c = SpdyClient::connect(&url, &["portforward.k8s.io"])
            .await?
            .map_err(|r| anyhow::anyhow!("refused: {r:?}"))?;
        let rid = attempt.to_string();
        let e = c
            .open(&[
                ("streamType", "error"),
                ("port", "8080"),
                ("requestID", &rid),
            ])
            .await?;
        c.data(e, b"", true).await?;
        let data = c
            .open(&[
                ("streamType", "data"),
                ("port", "8080"),
                ("requestID", &rid),
            ])
            .await?;
        c.data(data, request, false).await?;
        let r = c.until_finished(&[e, data]).await?;
        page = r.text(data);
        if page.contains("forwarded-page") {
            assert_eq!(r.text(e), "", "no error");
            break;
        }
        // httpd may not listen yet: the error stream says so.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        page.starts_with("HTTP/1.") && page.ends_with("forwarded-page\n"),
        "{page:?}"
    );

    // --- crictl port-forward (client-go), both transports; several connections each.
    if let Some(crictl) = crictl() {
        for transport in ["spdy", "websocket"] {
            eprintln!("step: crictl port-forward --transport {transport}");
            let local = free_port()?;
            let pf = gateway_kit::Running::spawn(
                std::process::Command::new(&crictl)
                    .arg("--runtime-endpoint")
                    .arg(format!("unix://{}", d.cri_socket().display()))
                    .args(["port-forward", "--transport", transport, &pod])
                    .arg(format!("{local}:8080")),
            )?;
            ensure!(
                pf.wait_stdout(STEP, |o| o.contains("Forwarding from")),
                "crictl port-forward --transport {transport}: {} {}",
                pf.stdout(),
                pf.stderr()
            );
            for _ in 0..3 {
                let got = gateway_kit::http_get(&format!("127.0.0.1:{local}"), "/")?;
                ensure!(
                    got.starts_with("HTTP/1.") && got.ends_with("forwarded-page\n"),
                    "through crictl ({transport}): {got:?}; crictl: {} {}",
                    pf.stdout(),
                    pf.stderr()
                );
            }
        }
    } else {
        eprintln!("note: no crictl (deploy/critest.sh builds it); its port-forward is not run");
    }

    // --- The Kubernetes Python client (websocket v4.channel.k8s.io, the ports in the URL).
    if kubernetes_py().is_some() {
        eprintln!("step: the Kubernetes Python client's PortForward");
        let url = forward_url(&rt, vec![8080]).await?;
        let (addr, path) = split_url(&url)?;
        let got = run_py(PY_PORT_FORWARD_HTTP, &format!("ws://{addr}{path}"))?;
        ensure!(got.ends_with("forwarded-page\n"), "{got:?}");
    }
    Ok(())
}

/// Sends one HTTP request to port 8080 through the Python client's `PortForward` and prints
/// the answer.
const PY_PORT_FORWARD_HTTP: &str = r#"
import sys
from kubernetes.client import Configuration
from kubernetes.stream.ws_client import PortForward, create_websocket
ws = create_websocket(Configuration(), sys.argv[1], {"sec-websocket-protocol": "v4.channel.k8s.io"})
pf = PortForward(ws, [8080])
s = pf.socket(8080)
s.settimeout(60)
s.sendall(b"GET / HTTP/1.0\r\nHost: pod\r\n\r\n")
data = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
sys.stdout.write(data.decode())
pf.close()
"#;
