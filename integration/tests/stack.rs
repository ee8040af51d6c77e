//! `berth up` as a whole: supervision, restart after kill -9, clean shutdown, daemon.json, TLS
//! on the Docker API, and one trace across processes.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use berth_core::Service;
use berth_integration::stack::{Stack, bin, running, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"))
}

fn status_healthy(stack: &Stack) -> bool {
    run(&mut stack.berth("status")).status.success()
}

#[test]
fn up_restarts_each_killed_service_and_stops_cleanly() -> Result<()> {
    let mut stack = Stack::start()?;
    let out = run(&mut stack.berth("status"));
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    ensure!(out.status.success(), "berth status: {text}");
    ensure!(
        text.matches(" healthy ").count() == Service::ALL.len(),
        "{text}"
    );

    for service in Service::ALL {
        let old = stack.pid(service).context("pid")?;
        kill(Pid::from_raw(old), Signal::SIGKILL)?;
        let killed = Instant::now();
        let new = wait_for(Duration::from_secs(10), || {
            let pid = stack.pid(service)?;
            (pid != old && running(pid) && status_healthy(&stack)).then_some(pid)
        });
        let took = killed.elapsed();
        println!(
            "{}: killed pid {old}, healthy again as pid {new:?} after {took:?}",
            service.name()
        );
        ensure!(
            new.is_some(),
            "{} not restarted; log:\n{}",
            service.name(),
            stack.log_text()
        );
        ensure!(
            took <= Duration::from_secs(2),
            "{} took {took:?} to be healthy again",
            service.name()
        );
    }

    let pids: Vec<i32> = Service::ALL.iter().filter_map(|s| stack.pid(*s)).collect();
    let status = stack.stop(Duration::from_secs(30))?;
    ensure!(
        status.success(),
        "berth up exited with {status}; log:\n{}",
        stack.log_text()
    );
    for pid in pids {
        ensure!(
            !running(pid),
            "pid {pid} still running after berth up stopped"
        );
    }
    let left: Vec<_> = std::fs::read_dir(stack.state_dir())?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".sock") || n.ends_with(".pid"))
        .collect();
    ensure!(left.is_empty(), "left behind in the state dir: {left:?}");
    let log = stack.log_text();
    ensure!(
        log.contains("service exited unexpectedly"),
        "restarts are logged:\n{log}"
    );
    Ok(())
}

#[test]
fn a_second_berth_up_on_the_same_state_dir_is_refused() -> Result<()> {
    let stack = Stack::start()?;
    let mut cmd = Command::new(bin("berth"));
    cmd.arg("up")
        .arg("--root")
        .arg(stack.root())
        .arg("--state-dir")
        .arg(stack.state_dir());
    let out = run(&mut cmd);
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "second berth up succeeded");
    ensure!(err.contains("already running"), "{err}");
    ensure!(status_healthy(&stack), "the first stack was disturbed");
    Ok(())
}

#[test]
fn daemon_json_with_an_unknown_key_is_refused_naming_it() -> Result<()> {
    let (_dir, mut cmd) = Stack::builder()
        .docker_config(r#"{"debug": true, "no-such-directive": 1}"#)
        .prepare()?;
    let out = run(&mut cmd);
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "berth up accepted an unknown key");
    ensure!(
        err.contains(
            "the following directives don't match any configuration option: no-such-directive"
        ),
        "{err}"
    );
    Ok(())
}

#[test]
fn a_malformed_config_file_is_refused_naming_the_key() -> Result<()> {
    let (_dir, mut cmd) = Stack::builder()
        .toml("[engine]\nstop_timout = 3")
        .prepare()?;
    let out = run(&mut cmd);
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success());
    ensure!(err.contains("stop_timout"), "{err}");
    Ok(())
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()?;
    ensure!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A CA and a certificate it signs; `ext` is an openssl extension section body.
fn make_ca(dir: &Path, name: &str) -> Result<()> {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}.pem"),
            "-subj",
            &format!("/CN={name}"),
        ],
    )
}

fn make_cert(dir: &Path, ca: &str, name: &str, ext: &str) -> Result<()> {
    std::fs::write(dir.join(format!("{name}.ext")), ext)?;
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ],
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}-key.pem"),
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &format!("{name}.pem"),
            "-extfile",
            &format!("{name}.ext"),
        ],
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn daemon_json_hosts_data_root_storage_registries_and_tls_are_honoured() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("berth-dj-").tempdir()?;
    let d = dir.path();
    make_ca(d, "ca")?;
    make_ca(d, "other-ca")?;
    make_cert(
        d,
        "ca",
        "server",
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )?;
    make_cert(d, "ca", "client", "extendedKeyUsage=clientAuth\n")?;
    make_cert(d, "other-ca", "stranger", "extendedKeyUsage=clientAuth\n")?;

    let slot = berth_integration::stack::NetSlot::claim()?;
    let octet = slot.range().0.octets()[2];
    let port = free_port();
    let custom_sock = d.join("custom.sock");
    let data_root = d.join("data");
    let state = d.join("state");
    let json = serde_json::json!({
        "hosts": [format!("unix://{}", custom_sock.display()), format!("tcp://127.0.0.1:{port}")],
        "data-root": data_root,
        "exec-root": state,
        "storage-driver": "vfs",
        "insecure-registries": ["10.1.2.3:5000"],
        "bridge": slot.default_bridge(),
        "bip": format!("10.213.{octet}.1/24"),
        "default-address-pools": [{"base": format!("10.213.{}.0/23", octet + 2), "size": 26}],
        "tls": true,
        "tlsverify": true,
        "tlscacert": d.join("ca.pem"),
        "tlscert": d.join("server.pem"),
        "tlskey": d.join("server-key.pem"),
    });
    let json_path = d.join("daemon.json");
    std::fs::write(&json_path, json.to_string())?;

    // The effective config shows every key mapped.
    let out = run(Command::new(bin("berth"))
        .arg("config")
        .arg("--docker-config")
        .arg(&json_path));
    let cfg = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        cfg.contains(&format!("root = \"{}\"", data_root.display())),
        "{cfg}"
    );
    ensure!(cfg.contains("driver = \"native\""), "{cfg}");
    ensure!(cfg.contains("\"10.1.2.3:5000\""), "{cfg}");
    ensure!(cfg.contains("tlsverify = true"), "{cfg}");

    let log = std::fs::File::create(d.join("up.log"))?;
    let mut up = Command::new(bin("berth"))
        .arg("up")
        .arg("--docker-config")
        .arg(&json_path)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()?;
    struct Kill(i32);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = kill(Pid::from_raw(self.0), Signal::SIGTERM);
        }
    }
    let _guard = Kill(up.id() as i32);

    let docker = |host: &str, tls: &[&str]| {
        let mut cmd = Command::new("docker");
        cmd.env("DOCKER_CONFIG", d.join("cli"))
            .args(["-H", host])
            .args(tls)
            .args(["version", "--format", "{{.Server.Version}}"]);
        cmd.output().unwrap()
    };
    let unix_host = format!("unix://{}", custom_sock.display());
    let ok = wait_for(Duration::from_secs(30), || {
        docker(&unix_host, &[]).status.success().then_some(())
    });
    ensure!(
        ok.is_some(),
        "gateway never answered on {}: {}",
        custom_sock.display(),
        std::fs::read_to_string(d.join("up.log")).unwrap_or_default()
    );
    ensure!(data_root.is_dir(), "data-root not used");
    ensure!(state.join("engine.sock").exists(), "exec-root not used");

    let tcp_host = format!("tcp://127.0.0.1:{port}");
    let p = |n: &str| d.join(n).display().to_string();
    let (ca, cert, key) = (p("ca.pem"), p("client.pem"), p("client-key.pem"));
    let with_cert = docker(
        &tcp_host,
        &[
            "--tlsverify",
            "--tlscacert",
            &ca,
            "--tlscert",
            &cert,
            "--tlskey",
            &key,
        ],
    );
    ensure!(
        with_cert.status.success(),
        "TLS with a client cert: {}",
        String::from_utf8_lossy(&with_cert.stderr)
    );

    let ca_only = docker(&tcp_host, &["--tlsverify", "--tlscacert", &ca]);
    ensure!(
        !ca_only.status.success(),
        "a client without a certificate was let in"
    );

    let (s_cert, s_key) = (p("stranger.pem"), p("stranger-key.pem"));
    let stranger = docker(
        &tcp_host,
        &[
            "--tlsverify",
            "--tlscacert",
            &ca,
            "--tlscert",
            &s_cert,
            "--tlskey",
            &s_key,
        ],
    );
    ensure!(
        !stranger.status.success(),
        "a certificate from another CA was let in"
    );

    kill(Pid::from_raw(up.id() as i32), Signal::SIGTERM)?;
    let status = up.wait()?;
    ensure!(status.success(), "berth up exit: {status}");
    Ok(())
}

mod trace {
    use std::sync::{Arc, Mutex};

    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use opentelemetry_proto::tonic::common::v1::any_value::Value;

    /// `(service.name, span name, trace id hex)` of every span received.
    pub type Spans = Arc<Mutex<Vec<(String, String, String)>>>;

    /// A minimal OTLP/gRPC collector that records what it receives.
    #[derive(Debug, Clone, Default)]
    pub struct Collector(pub Spans);

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            req: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let mut spans = self.0.lock().unwrap();
            for rs in req.into_inner().resource_spans {
                let service = rs
                    .resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .find(|kv| kv.key == "service.name")
                    .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                        Value::StringValue(s) => Some(s.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    for span in ss.spans {
                        spans.push((service.clone(), span.name, hex(&span.trace_id)));
                    }
                }
            }
            Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }))
        }
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    pub fn server(c: Collector) -> TraceServiceServer<Collector> {
        TraceServiceServer::new(c)
    }
}

#[test]
fn one_trace_spans_the_gateway_and_the_engine() -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let collector = trace::Collector::default();
    let spans = collector.0.clone();
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(trace::server(collector))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let mut stack = Stack::builder()
        .toml(&format!("[telemetry]\notlp_endpoint = \"http://{addr}\""))
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start()?;

    // One Docker API call: the gateway's /_ping asks the engine's health service.
    let out = run(Command::new("curl").args([
        "-sf",
        "--unix-socket",
        &stack.docker_socket().display().to_string(),
        "http://berth/_ping",
    ]));
    ensure!(out.status.success() && out.stdout == b"OK", "ping: {out:?}");

    let found = wait_for(Duration::from_secs(20), || {
        let spans = spans.lock().unwrap();
        let ping = spans
            .iter()
            .find(|(svc, name, _)| svc == "berth-gateway" && name.contains("/_ping"))?;
        let engine = spans.iter().find(|(svc, name, trace)| {
            svc == "berth-engine" && name.contains("Health/Check") && *trace == ping.2
        })?;
        Some((ping.clone(), engine.clone()))
    });
    let all = spans.lock().unwrap().clone();
    let (gw, eng) = found.with_context(|| format!("no shared trace; spans received: {all:#?}"))?;
    println!("gateway span {gw:?}\nengine span  {eng:?}");
    stack.stop(Duration::from_secs(30))?;
    Ok(())
}
