//! Prometheus metrics of a berth daemon (see `docs/observability.md` for every metric).
//!
//! Counters and histograms that code updates as things happen go through the `metrics` crate's
//! macros into a `metrics-exporter-prometheus` recorder that [`install`] sets up once per
//! process (the `metrics` facade is process-global by design, like a logger; a library that
//! records without an installed recorder records nothing). Values that are read rather than
//! counted — process memory and fds, containers by state, cgroup statistics, store sizes — are
//! produced at scrape time by the daemon's [`Collector`] and written with [`Exposition`].
//!
//! Every daemon serves `berth.metrics.v1.Metrics/Scrape` ([`service`]); the gateway merges
//! the daemons' texts under a `service` label ([`text::merge`]) on its HTTP endpoint, and
//! `berth status` reads them directly.

pub mod grpc_layer;
pub mod process;
pub mod text;

use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};

use berth_proto::berth::metrics::v1 as pb;
use berth_proto::berth::metrics::v1::metrics_server::{Metrics, MetricsServer};
use futures::future::BoxFuture;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::{Config, Service};

pub use grpc_layer::GrpcMetricsLayer;

/// Latency buckets (seconds) of every `*_seconds` histogram: 0.5 ms to 60 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs this process's recorder (the first call wins; later calls do nothing). Called by
/// the daemon harness; tests that never call it record nothing.
pub fn install() {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(LATENCY_BUCKETS)
            .expect("non-empty buckets")
            .build_recorder();
        let handle = recorder.handle();
        // Fails only when another recorder is installed, which berth never does.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    });
    process::start_time();
}

fn describe() {
    grpc_layer::describe();
    metrics::describe_counter!(
        "berth_http_requests_total",
        "Docker API requests answered, by method, route and status."
    );
    metrics::describe_histogram!(
        "berth_http_request_duration_seconds",
        metrics::Unit::Seconds,
        "Docker API request latency to the response head, by method, route and status."
    );
    metrics::describe_gauge!(
        "berth_http_requests_in_flight",
        "Docker API requests being handled."
    );
}

/// Drains histogram samples into their buckets; run now and then when nobody scrapes.
pub fn upkeep() {
    if let Some(h) = HANDLE.get() {
        h.run_upkeep();
    }
}

/// Scrape-time metrics of a daemon, as exposition text.
pub type Collector = Arc<dyn Fn() -> BoxFuture<'static, String> + Send + Sync>;

/// Everything this process exposes now: the recorder's metrics, the process metrics, then
/// what `collector` adds.
pub async fn render(collector: Option<&Collector>) -> String {
    let mut out = HANDLE
        .get()
        .map(PrometheusHandle::render)
        .unwrap_or_default();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(&process::render());
    if let Some(c) = collector {
        out.push_str(&c().await);
    }
    out
}

/// The `berth.metrics.v1.Metrics` service of a daemon.
pub fn service(collector: Option<Collector>) -> MetricsServer<MetricsService> {
    MetricsServer::new(MetricsService { collector })
}

/// Serves [`render`] over gRPC.
#[derive(Clone)]
pub struct MetricsService {
    collector: Option<Collector>,
}

impl std::fmt::Debug for MetricsService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsService")
            .field("collector", &self.collector.is_some())
            .finish()
    }
}

#[tonic::async_trait]
impl Metrics for MetricsService {
    async fn scrape(
        &self,
        _: tonic::Request<pb::ScrapeRequest>,
    ) -> Result<tonic::Response<pb::ScrapeResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::ScrapeResponse {
            text: render(self.collector.as_ref()).await,
        }))
    }
}

/// How long a scrape waits for one daemon.
const SCRAPE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Scrapes one daemon's `berth.metrics.v1.Metrics` on `socket`. A daemon that does not serve
/// metrics answers an empty text.
pub async fn scrape(socket: &std::path::Path) -> crate::Result<String> {
    use berth_proto::berth::metrics::v1::metrics_client::MetricsClient;
    let mut client = MetricsClient::new(crate::uds::channel(socket));
    let call = client.scrape(pb::ScrapeRequest {});
    match tokio::time::timeout(SCRAPE_TIMEOUT, call).await {
        Err(_) => Err(crate::Error::new(
            crate::ErrorKind::Unavailable,
            format!("metrics scrape of {} timed out", socket.display()),
        )),
        Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => Ok(String::new()),
        Ok(Err(status)) => Err(status.into()),
        Ok(Ok(resp)) => Ok(resp.into_inner().text),
    }
}

/// Scrapes every gRPC daemon of `config` at once, in [`Service::ALL`] order.
pub async fn scrape_daemons(config: &Config) -> Vec<(Service, crate::Result<String>)> {
    let daemons = Service::ALL
        .into_iter()
        .filter(|s| *s != Service::Gateway)
        .map(|s| async move { (s, scrape(&config.socket(s)).await) });
    futures::future::join_all(daemons).await
}

/// One text of every source's metrics under a `service` label, with `berth_up{service}` (0
/// for a source that could not be scraped).
pub fn merge_services(parts: &[(&str, Option<&str>)]) -> String {
    let mut up = Exposition::new();
    up.family(
        "berth_up",
        Kind::Gauge,
        "Whether the service answered this scrape (1) or not (0).",
    );
    for (name, text) in parts {
        up.sample(
            "berth_up",
            &[("service", name)],
            f64::from(u8::from(text.is_some())),
        );
    }
    let mut merged = text::merge(
        "service",
        parts.iter().filter_map(|(n, t)| Some((*n, (*t)?))),
    );
    merged.push_str(&up.finish());
    merged
}

/// The metric kinds of the exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (resets when the process restarts).
    Counter,
    /// Any value.
    Gauge,
}

/// Writes metric families in the text exposition format.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// An empty text.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines. Samples follow with [`Self::sample`].
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        self
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", text::escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", text::format_value(value));
        self
    }

    /// A family with a single unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: f64) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    /// The text written so far.
    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn merged_services_are_labelled_and_a_missing_one_is_down() {
        let text = merge_services(&[
            ("engine", Some("# TYPE a counter\na 1\n")),
            ("images", None),
        ]);
        let samples = text::parse(&text).unwrap();
        let find = |name: &str, svc: &str| {
            samples
                .iter()
                .find(|s| s.name == name && s.label("service") == Some(svc))
                .map(|s| s.value)
        };
        assert_eq!(find("a", "engine"), Some(1.0));
        assert_eq!(find("berth_up", "engine"), Some(1.0));
        assert_eq!(find("berth_up", "images"), Some(0.0));
        let dir = tempfile::tempdir().unwrap();
        assert!(scrape(&dir.path().join("none.sock")).await.is_err());
    }

    #[test]
    fn exposition_round_trips_through_the_parser() {
        let mut e = Exposition::new();
        e.family("t_total", Kind::Counter, "things\nseen")
            .sample("t_total", &[("name", "a\"b\\c")], 3.0)
            .sample("t_total", &[], 1.5e10);
        e.single("g", Kind::Gauge, "a gauge", f64::NAN);
        let text = e.finish();
        let samples = text::parse(&text).unwrap();
        assert_eq!(samples.len(), 3);
        assert_eq!(samples[0].label("name"), Some("a\"b\\c"));
        assert_eq!(samples[0].value, 3.0);
        assert_eq!(samples[1].value, 1.5e10);
        assert!(samples[2].value.is_nan());
    }
}
