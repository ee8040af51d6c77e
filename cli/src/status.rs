//! `berth status`, and the health probes `berth up` shares with it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use berth_core::daemon::{self, ConfigArgs};
use berth_core::grpc::ServingStatus;
use berth_core::uds::ListenAddr;
use berth_core::{Config, Error, Result, Service};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// Checks that `service` answers: the gRPC health check for the services, `GET /version` on the
/// first Unix host for the gateway.
pub async fn probe(cfg: &Config, service: Service) -> Result<()> {
    let fut = async {
        match service {
            Service::Gateway => probe_gateway(cfg).await,
            _ => match berth_core::grpc::check_health(&cfg.socket(service)).await? {
                ServingStatus::Serving => Ok(()),
                other => Err(Error::unavailable(format!("health status {other:?}"))),
            },
        }
    };
    tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .map_err(|_| Error::unavailable("health check timed out"))?
}

/// The socket (or address) `berth status` shows for `service`.
pub fn address(cfg: &Config, service: Service) -> String {
    match service {
        Service::Gateway => cfg.gateway_hosts().join(","),
        _ => cfg.socket(service).display().to_string(),
    }
}

fn gateway_socket(cfg: &Config) -> Option<PathBuf> {
    cfg.gateway_hosts()
        .iter()
        .find_map(|h| match ListenAddr::parse(h) {
            Ok(ListenAddr::Unix(p)) => Some(p),
            _ => None,
        })
}

async fn probe_gateway(cfg: &Config) -> Result<()> {
    let path = gateway_socket(cfg)
        .ok_or_else(|| Error::unavailable("the gateway serves no unix socket to probe"))?;
    let stream = tokio::net::UnixStream::connect(&path)
        .await
        .map_err(|e| Error::unavailable(format!("connect {}", path.display())).with_source(e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Error::unavailable("http handshake").with_source(e))?;
    tokio::spawn(conn);
    let req = http::Request::get("/version")
        .header("host", "berth")
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| Error::internal("build request").with_source(e))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| Error::unavailable("GET /version").with_source(e))?;
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(Error::unavailable(format!(
            "GET /version answered {status}"
        )))
    }
}

/// Returns `true` when a process with `pid` exists.
pub fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

fn uptime(pid_file: &std::path::Path) -> Option<Duration> {
    let modified = std::fs::metadata(pid_file).ok()?.modified().ok()?;
    SystemTime::now().duration_since(modified).ok()
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

pub fn main(args: ConfigArgs) -> ExitCode {
    let cfg = match args.load() {
        Ok(cfg) => cfg,
        Err(err) => {
            eprintln!("berth status: {}", err.chain());
            return daemon::exit_code(&err);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("berth status: {err}");
            return ExitCode::from(1);
        }
    };
    let all_healthy = runtime.block_on(async {
        println!(
            "{:<12} {:<8} {:<10} {:<8} SOCKET",
            "SERVICE", "PID", "HEALTH", "UPTIME"
        );
        let mut all = true;
        for service in Service::ALL {
            let pid_file = cfg.pid_file(service);
            let pid = daemon::read_pid_file(&pid_file).filter(|p| alive(*p));
            let health = match probe(&cfg, service).await {
                Ok(()) => "healthy".to_string(),
                Err(_) if pid.is_none() => "down".to_string(),
                Err(_) => "unhealthy".to_string(),
            };
            all &= health == "healthy";
            let up = match pid {
                Some(_) => uptime(&pid_file).map(human).unwrap_or_else(|| "-".into()),
                None => "-".into(),
            };
            println!(
                "{:<12} {:<8} {:<10} {:<8} {}",
                service.name(),
                pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                health,
                up,
                address(&cfg, service)
            );
        }
        all
    });
    if all_healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
