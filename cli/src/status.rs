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

/// What `berth status` shows from a service's metrics.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Load {
    /// Resident memory, bytes.
    pub rss: f64,
    /// Requests served since the process started (health checks and scrapes left out).
    pub requests: f64,
    /// Of those, the ones that failed on the server's side (gRPC Internal, Unknown,
    /// Unavailable, DataLoss, DeadlineExceeded, Unimplemented; HTTP 5xx).
    pub errors: f64,
    /// Process start, seconds since the epoch.
    pub start: f64,
}

const SERVER_FAULTS: &[&str] = &[
    "Internal",
    "Unknown",
    "Unavailable",
    "DataLoss",
    "DeadlineExceeded",
    "Unimplemented",
];

impl Load {
    /// Reads one service's samples (already without other services').
    pub fn from_samples(samples: &[berth_core::metrics::text::Sample]) -> Self {
        let mut load = Self::default();
        for s in samples {
            match s.name.as_str() {
                "process_resident_memory_bytes" => load.rss = s.value,
                "process_start_time_seconds" => load.start = s.value,
                "berth_grpc_requests_total" => {
                    let method = s.label("method").unwrap_or("");
                    if method.starts_with("/grpc.health.v1.")
                        || method.starts_with("/berth.metrics.v1.")
                    {
                        continue;
                    }
                    load.requests += s.value;
                    if SERVER_FAULTS.contains(&s.label("code").unwrap_or("")) {
                        load.errors += s.value;
                    }
                }
                "berth_http_requests_total" => {
                    load.requests += s.value;
                    if s.label("status").is_some_and(|c| c.starts_with('5')) {
                        load.errors += s.value;
                    }
                }
                _ => {}
            }
        }
        load
    }

    /// Requests per second since the start, and the share of errors in percent.
    pub fn rates(&self, now: f64) -> (f64, f64) {
        let secs = (now - self.start).max(1.0);
        let err = if self.requests > 0.0 {
            100.0 * self.errors / self.requests
        } else {
            0.0
        };
        (self.requests / secs, err)
    }
}

/// Every service's [`Load`]: from the gateway's endpoint when `metrics_addr` is set (it has
/// them all), otherwise from each daemon's socket (the gateway then has none).
async fn loads(cfg: &Config) -> std::collections::HashMap<&'static str, Load> {
    use berth_core::metrics::text::{Sample, parse};
    let mut out = std::collections::HashMap::new();
    let by_service = |samples: Vec<Sample>, service: &str| -> Load {
        let own: Vec<Sample> = samples
            .into_iter()
            .filter(|s| s.label("service").is_none_or(|v| v == service))
            .collect();
        Load::from_samples(&own)
    };
    if let Ok(Some(addr)) = cfg.telemetry.metrics_socket_addr()
        && let Ok(Ok(text)) =
            tokio::time::timeout(Duration::from_secs(10), http_get_metrics(addr)).await
        && let Ok(samples) = parse(&text)
    {
        for service in Service::ALL {
            let mine: Vec<Sample> = samples
                .iter()
                .filter(|s| s.label("service") == Some(service.name()))
                .cloned()
                .collect();
            if !mine.is_empty() {
                out.insert(service.name(), by_service(mine, service.name()));
            }
        }
        return out;
    }
    for (service, text) in berth_core::metrics::scrape_daemons(cfg).await {
        if let Ok(samples) = text.as_deref().map(parse)
            && let Ok(samples) = samples
        {
            out.insert(service.name(), by_service(samples, service.name()));
        }
    }
    out
}

async fn http_get_metrics(addr: std::net::SocketAddr) -> Result<String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| Error::unavailable(format!("connect {addr}")).with_source(e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Error::unavailable("http handshake").with_source(e))?;
    tokio::spawn(conn);
    let req = http::Request::get("/metrics")
        .header("host", addr.to_string())
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| Error::internal("build request").with_source(e))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| Error::unavailable("GET /metrics").with_source(e))?;
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| Error::unavailable("read /metrics").with_source(e))?
        .to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn mib(bytes: f64) -> String {
    format!("{:.1}MiB", bytes / f64::from(1u32 << 20))
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
        let loads = loads(&cfg).await;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        println!(
            "{:<12} {:<8} {:<10} {:<8} {:<10} {:<8} {:<6} SOCKET",
            "SERVICE", "PID", "HEALTH", "UPTIME", "MEMORY", "REQ/S", "ERR%"
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
            let (memory, rate, err) = match loads.get(service.name()) {
                Some(load) if pid.is_some() => {
                    let (rate, err) = load.rates(now);
                    (mib(load.rss), format!("{rate:.2}"), format!("{err:.1}"))
                }
                _ => ("-".into(), "-".into(), "-".into()),
            };
            println!(
                "{:<12} {:<8} {:<10} {:<8} {:<10} {:<8} {:<6} {}",
                service.name(),
                pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                health,
                up,
                memory,
                rate,
                err,
                address(&cfg, service)
            );
        }
        if cfg.rootless {
            let holder = cfg.state_dir.join("rootless/holder.pid");
            let holder = daemon::read_pid_file(&holder)
                .filter(|p| alive(*p))
                .map_or("gone".to_string(), |p| format!("held by pid {p}"));
            println!("mode: rootless (namespaces {holder})");
        }
        all
    });
    if all_healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_counts_requests_and_server_faults_but_not_probes() {
        let text = "process_resident_memory_bytes 2097152\n\
            process_start_time_seconds 100\n\
            berth_grpc_requests_total{method=\"/grpc.health.v1.Health/Check\",code=\"OK\"} 50\n\
            berth_grpc_requests_total{method=\"/berth.engine.v1.Containers/Get\",code=\"OK\"} 6\n\
            berth_grpc_requests_total{method=\"/berth.engine.v1.Containers/Get\",code=\"NotFound\"} 2\n\
            berth_grpc_requests_total{method=\"/berth.engine.v1.Tasks/Start\",code=\"Internal\"} 2\n\
            berth_http_requests_total{route=\"/x\",status=\"500\"} 1\n\
            berth_http_requests_total{route=\"/x\",status=\"404\"} 9\n";
        let samples = berth_core::metrics::text::parse(text).unwrap();
        let load = Load::from_samples(&samples);
        assert_eq!(load.rss, 2097152.0);
        assert_eq!(load.requests, 20.0);
        assert_eq!(load.errors, 3.0);
        let (rate, err) = load.rates(110.0);
        assert_eq!(rate, 2.0);
        assert_eq!(err, 15.0);
        assert_eq!(mib(load.rss), "2.0MiB");
    }
}
