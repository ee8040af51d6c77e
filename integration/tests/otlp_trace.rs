//! A real OTLP collector — rotel (`rotel/rotel-agent` from the test venv's `rotel` wheel) —
//! receives berth's traces: `docker run --rm` with the real docker CLI gives one trace whose
//! spans cover the gateway, engine, network, snapshotter and shim (with the OCI runtime's child
//! spans), every span's parent in the trace; a pull reaches the images service in its trace; a
//! client's `traceparent` on a Docker API request and on a CRI call is continued, and the
//! daemons' log lines carry the ids. Root only; skipped without the venv's rotel.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use berth_integration::gateway_kit::{self, DockerStack, run_for};
use berth_integration::stack::{Stack, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// One span as rotel's detailed debug log shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Span {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    /// Empty for a root span.
    parent_id: String,
}

/// `rotel-agent` in the venv's site-packages, if installed.
fn rotel_binary() -> Option<PathBuf> {
    let lib = berth_integration::py_kit::venv().join("lib");
    std::fs::read_dir(lib)
        .ok()?
        .flatten()
        .map(|d| d.path().join("site-packages/rotel/rotel-agent"))
        .find(|p| p.is_file())
}

/// A running rotel: OTLP/gRPC receiver on a loopback port, spans written to its debug log,
/// exporter blackhole. Killed by its PID when dropped.
struct Rotel {
    child: Child,
    addr: SocketAddr,
    output: PathBuf,
    _dir: tempfile::TempDir,
}

impl Rotel {
    fn start(binary: &Path) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("berth-rotel-").tempdir()?;
        // A free port: bound, read and released for rotel to take.
        let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let output = dir.path().join("rotel.out");
        let out = std::fs::File::create(&output)?;
        let child = Command::new(binary)
            .arg("start")
            .args(["--otlp-grpc-endpoint", &addr.to_string()])
            // Only the receiver is wanted; the other receivers' default ports must not clash
            // with a parallel test's rotel.
            .args(["--otlp-http-endpoint", "127.0.0.1:0"])
            .args(["--exporter", "blackhole"])
            .args(["--debug-log", "traces"])
            .args(["--debug-log-verbosity", "detailed"])
            .arg("--pid-file")
            .arg(dir.path().join("rotel.pid"))
            .arg("--log-file")
            .arg(dir.path().join("rotel.log"))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let rotel = Self {
            child,
            addr,
            output,
            _dir: dir,
        };
        let up = wait_for(Duration::from_secs(20), || {
            TcpStream::connect(rotel.addr).ok()
        });
        ensure!(
            up.is_some(),
            "rotel does not listen on {}: {}",
            rotel.addr,
            rotel.text()
        );
        Ok(rotel)
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }

    /// Every span rotel has logged so far.
    fn spans(&self) -> Vec<Span> {
        parse_debug_log(&self.text())
    }
}

impl Drop for Rotel {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// The spans in rotel's detailed traces debug log, which prints each request as
///
/// ```text
/// ResourceSpans #0
/// Resource attributes:
///      -> service.name: Str(berth-shim)
/// ScopeSpans #0
/// Span #0
///     Trace ID       : 4bf92f3577b34da6a3ce929d0e0e4736
///     Parent ID      : 00f067aa0ba902b7
///     ID             : 5b8aa5a2d2c872e8
///     Name           : berth.shim.v1.Shim/Create
/// ...
/// ```
fn parse_debug_log(text: &str) -> Vec<Span> {
    let mut spans = Vec::new();
    let mut service = String::new();
    let mut in_resource = false;
    let mut span: Option<Span> = None;
    for line in text.lines() {
        let trimmed = line.trim();
        if line.starts_with("ResourceSpans #") || line.starts_with("Span #") {
            spans.extend(span.take());
            in_resource = false;
            if line.starts_with("ResourceSpans #") {
                service.clear();
            } else {
                span = Some(Span {
                    service: service.clone(),
                    ..Span::default()
                });
            }
            continue;
        }
        if line.starts_with("Resource attributes:") {
            in_resource = true;
            continue;
        }
        if line.starts_with("ScopeSpans") {
            in_resource = false;
            spans.extend(span.take());
            continue;
        }
        if in_resource {
            if let Some(name) = trimmed
                .strip_prefix("-> service.name: Str(")
                .and_then(|v| v.strip_suffix(')'))
            {
                service = name.to_string();
            }
            continue;
        }
        let Some(current) = span.as_mut() else {
            continue;
        };
        let Some((key, value)) = trimmed.split_once(':') else {
            continue;
        };
        let value = value.trim().to_string();
        match key.trim() {
            "Trace ID" => current.trace_id = value,
            "Parent ID" => current.parent_id = value,
            "ID" => current.span_id = value,
            "Name" => current.name = value,
            _ => {}
        }
    }
    spans.extend(span);
    spans
}

#[test]
fn rotel_debug_log_parses() {
    let text = "\x1b[2m2026-12-07T17:44:12Z\x1b[0m INFO Starting Rotel.
ResourceSpans #0
Resource SchemaURL: 
Resource attributes:
     -> service.name: Str(berth-shim)
     -> berth.container.id: Str(c1)
ScopeSpans #0
ScopeSpans SchemaURL: 
InstrumentationScope berth-shim 
Span #0
    Trace ID       : 4bf92f3577b34da6a3ce929d0e0e4736
    Parent ID      : 1111111111111111
    ID             : 00f067aa0ba902b7
    Name           : GET /v1.45/containers/json
    Kind           : SPAN_KIND_SERVER
Start time: 1
End time: 2
Attributes:
     -> service.name: Str(not-a-resource)
Span #1
    Trace ID       : 4bf92f3577b34da6a3ce929d0e0e4736
    Parent ID      : 
    ID             : 2222222222222222
    Name           : root span
    Kind           : SPAN_KIND_INTERNAL
ResourceSpans #0
Resource attributes:
     -> service.name: Str(berth-engine)
ScopeSpans #0
Span #0
    Trace ID       : 4bf92f3577b34da6a3ce929d0e0e4736
    Parent ID      : 2222222222222222
    ID             : 3333333333333333
    Name           : berth.engine.v1.Containers/Start
";
    let spans = parse_debug_log(text);
    let brief: Vec<(&str, &str, &str, &str)> = spans
        .iter()
        .map(|s| {
            (
                s.service.as_str(),
                s.name.as_str(),
                s.span_id.as_str(),
                s.parent_id.as_str(),
            )
        })
        .collect();
    assert_eq!(
        brief,
        [
            (
                "berth-shim",
                "GET /v1.45/containers/json",
                "00f067aa0ba902b7",
                "1111111111111111"
            ),
            ("berth-shim", "root span", "2222222222222222", ""),
            (
                "berth-engine",
                "berth.engine.v1.Containers/Start",
                "3333333333333333",
                "2222222222222222"
            ),
        ]
    );
    assert!(
        spans
            .iter()
            .all(|s| s.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736")
    );
}

/// The trace in `spans` that covers every service in `services` and the shim's runtime child
/// spans, with every span's parent in it: the trace's spans.
fn complete_trace(spans: &[Span], services: &[&str]) -> Option<Vec<Span>> {
    let mut traces: Vec<&str> = spans.iter().map(|s| s.trace_id.as_str()).collect();
    traces.sort_unstable();
    traces.dedup();
    traces.into_iter().find_map(|trace| {
        let members: Vec<Span> = spans
            .iter()
            .filter(|s| s.trace_id == trace)
            .cloned()
            .collect();
        let covers = services
            .iter()
            .all(|svc| members.iter().any(|s| s.service == *svc));
        let runtime_child = members.iter().any(|s| {
            s.service == "berth-shim"
                && (s.name.starts_with("runc ") || s.name.starts_with("libcontainer "))
                && members
                    .iter()
                    .any(|p| p.span_id == s.parent_id && p.name.starts_with("berth.shim.v1.Shim/"))
        });
        let linked = members
            .iter()
            .all(|s| s.parent_id.is_empty() || members.iter().any(|p| p.span_id == s.parent_id));
        let one_root = members.iter().filter(|s| s.parent_id.is_empty()).count() == 1;
        (covers && runtime_child && linked && one_root).then_some(members)
    })
}

fn curl(args: &[&str]) -> Result<String> {
    let out = run_for(Command::new("curl").args(args), Duration::from_secs(60))?;
    ensure!(out.status.success(), "curl {args:?}: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn docker_run_is_one_trace_in_a_real_collector() -> Result<()> {
    if !gateway_kit::ready() {
        return Ok(());
    }
    let Some(binary) = rotel_binary() else {
        eprintln!(
            "skipped: no rotel in the venv at {} (make pyvenv)",
            berth_integration::py_kit::venv().display()
        );
        return Ok(());
    };
    let rotel = Rotel::start(&binary)?;
    let stack = DockerStack::start_from(
        Stack::builder()
            .toml(&format!(
                "[telemetry]\notlp_endpoint = \"http://{}\"",
                rotel.addr
            ))
            .env("OTEL_BSP_SCHEDULE_DELAY", "100"),
    )?;
    let _registry = berth_integration::py_kit::with_busybox(&stack)?;

    stack.ok(&["run", "--rm", "busybox", "true"])?;

    let services = [
        "berth-gateway",
        "berth-engine",
        "berth-network",
        "berth-snapshotter",
        "berth-shim",
    ];
    let found = wait_for(Duration::from_secs(60), || {
        complete_trace(&rotel.spans(), &services)
    });
    let trace = found.with_context(|| {
        format!(
            "no trace covers {services:?} with every parent present; rotel received:\n{:#?}",
            rotel.spans()
        )
    })?;
    for s in &trace {
        println!(
            "{:<18} {:<48} {} <- {}",
            s.service, s.name, s.span_id, s.parent_id
        );
    }

    // A client's traceparent is continued: the gateway's span is its child, and the engine's
    // spans are in the same trace.
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let name = format!("otlp-{}", std::process::id());
    let created = curl(&[
        "-sf",
        "--unix-socket",
        &stack.socket().display().to_string(),
        "-H",
        &format!("traceparent: 00-{client_trace}-{client_span}-01"),
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"Image":"busybox","Cmd":["sleep","1000"]}"#,
        &format!("http://berth/v1.45/containers/create?name={name}"),
    ])?;
    let continued = wait_for(Duration::from_secs(30), || {
        let spans = rotel.spans();
        let gateway = spans.iter().find(|s| {
            s.service == "berth-gateway" && s.trace_id == client_trace && s.parent_id == client_span
        })?;
        let engine = spans.iter().find(|s| {
            s.service == "berth-engine" && s.trace_id == client_trace && s.name.contains("Create")
        })?;
        Some((gateway.clone(), engine.clone()))
    });
    let (gateway, engine) = continued.with_context(|| {
        format!(
            "the client's traceparent was not continued; rotel received:\n{:#?}",
            rotel.spans()
        )
    })?;
    println!("client trace: {gateway:?}\n              {engine:?}");

    // The engine's log line for that create carries the trace and span ids of a span in it.
    let log = stack.stack.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("container created") && l.contains(&name))
        .with_context(|| format!("no \"container created\" line for {name}:\n{log}"))?;
    let ids = line.split_once(&format!("trace_id={client_trace} span_id="));
    let span_id = ids
        .map(|(_, rest)| rest.trim_end().to_string())
        .with_context(|| format!("no trace ids on {line:?}"))?;
    ensure!(
        rotel
            .spans()
            .iter()
            .any(|s| s.trace_id == client_trace && s.span_id == span_id),
        "{line:?}: span {span_id} is not in the client's trace"
    );

    // The pull was one trace too, reaching the images service.
    let pulled = rotel.spans().iter().any(|s| {
        s.service == "berth-gateway"
            && s.name == "POST /images/create"
            && rotel
                .spans()
                .iter()
                .any(|i| i.service == "berth-images" && i.trace_id == s.trace_id)
    });
    ensure!(pulled, "no pull trace reaching berth-images");

    // Starting it in the client's trace: the shim's own log lines carry the ids of its span.
    let id = serde_json::from_str::<serde_json::Value>(&created)?["Id"]
        .as_str()
        .context("create answered no Id")?
        .to_string();
    curl(&[
        "-sf",
        "--unix-socket",
        &stack.socket().display().to_string(),
        "-H",
        &format!("traceparent: 00-{client_trace}-{client_span}-01"),
        "-X",
        "POST",
        &format!("http://berth/v1.45/containers/{id}/start"),
    ])?;
    let shim_log = stack
        .stack
        .state_dir()
        .join("bundles")
        .join(&id)
        .join("shim.log");
    let logged = wait_for(Duration::from_secs(30), || {
        let text = std::fs::read_to_string(&shim_log).ok()?;
        let line = text.lines().find(|l| l.contains("task created"))?;
        let (_, span_id) = line.split_once(&format!("trace_id={client_trace} span_id="))?;
        let span_id = span_id.trim_end();
        rotel
            .spans()
            .into_iter()
            .find(|s| s.service == "berth-shim" && s.span_id == span_id)
            .map(|s| (line.to_string(), s))
    });
    let (line, span) = logged.with_context(|| {
        format!(
            "{}: no \"task created\" line with the ids of a shim span in the client's trace:\n{}",
            shim_log.display(),
            std::fs::read_to_string(&shim_log).unwrap_or_default()
        )
    })?;
    ensure!(span.name == "berth.shim.v1.Shim/Create", "{line}: {span:?}");

    // The same for a CRI call on cri.sock.
    let cri_trace = "0af7651916cd43dd8448eb211c80319c";
    let cri_span = "b7ad6b7169203331";
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        use berth_proto::cri::runtime::v1 as cri;
        use berth_proto::cri::runtime::v1::runtime_service_client::RuntimeServiceClient;
        let mut client = RuntimeServiceClient::new(berth_core::uds::channel(stack.cri_socket()));
        let mut req = tonic::Request::new(cri::VersionRequest {
            version: "v1".into(),
        });
        req.metadata_mut().insert(
            "traceparent",
            format!("00-{cri_trace}-{cri_span}-01").parse()?,
        );
        client.version(req).await?;
        anyhow::Ok(())
    })?;
    let cri_span_found = wait_for(Duration::from_secs(30), || {
        rotel
            .spans()
            .into_iter()
            .find(|s| s.trace_id == cri_trace && s.parent_id == cri_span)
    });
    let cri = cri_span_found.with_context(|| {
        format!(
            "the CRI call's traceparent was not continued; rotel received:\n{:#?}",
            rotel.spans()
        )
    })?;
    ensure!(
        cri.service == "berth-gateway" && cri.name.contains("RuntimeService/Version"),
        "{cri:?}"
    );
    drop(stack);
    Ok(())
}
