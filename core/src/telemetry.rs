//! Logging and tracing: the `tracing` subscriber, the optional OTLP exporter, and W3C trace
//! context carried across every gRPC and HTTP hop so one trace spans gateway → engine → shim.
//!
//! Only `main` functions call [`init`]; libraries just emit `tracing` spans and events.

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Context as OtelContext, global};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::TelemetryConfig;
use crate::error::{Context, ErrorKind, Result};

/// Keeps the trace exporter alive; call [`Telemetry::shutdown`] before exiting so buffered spans
/// are sent.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Installs the global subscriber for process `service` (e.g. `berth-engine`): log lines on
/// stderr as text or JSON, filtered by `RUST_LOG` when set (read by the caller and passed as
/// `env_filter`) or else by `config.log_level`, and spans exported over OTLP when
/// `config.otlp_endpoint` is set. Must be called inside a Tokio runtime when OTLP is on.
pub fn init(
    service: &str,
    config: &TelemetryConfig,
    env_filter: Option<&str>,
) -> Result<Telemetry> {
    global::set_text_map_propagator(TraceContextPropagator::new());

    let filter = EnvFilter::try_new(env_filter.unwrap_or(&config.log_level))
        .context(ErrorKind::InvalidArgument, "invalid log filter")?;

    let provider = match &config.otlp_endpoint {
        Some(endpoint) => {
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .context(
                    ErrorKind::InvalidArgument,
                    format!("otlp exporter for {endpoint}"),
                )?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(service.to_string())
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
        None => None,
    };
    let otel_layer = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service.to_string())));

    let json = config.log_format == "json";
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let text_layer = (!json).then(|| {
        tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
    });
    let json_layer = json.then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
    });

    tracing_subscriber::registry()
        .with(filter)
        .with(otel_layer)
        .with(text_layer)
        .with(json_layer)
        .try_init()
        .context(ErrorKind::Internal, "install tracing subscriber")?;
    Ok(Telemetry { provider })
}

impl Telemetry {
    /// Flushes and stops the exporter.
    pub async fn shutdown(mut self) {
        if let Some(provider) = self.provider.take() {
            // The exporter needs the runtime to make progress while shutdown blocks, so block
            // on another thread (on a current-thread runtime it would otherwise time out).
            let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        }
    }
}

/// Writes W3C trace context into gRPC metadata.
struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// Reads W3C trace context from HTTP headers (gRPC metadata are HTTP/2 headers).
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Writes W3C trace context into HTTP headers.
struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// The trace context a peer sent in `headers` (empty when it sent none).
pub fn extract(headers: &http::HeaderMap) -> OtelContext {
    global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)))
}

/// Puts the current span's trace context into outgoing HTTP `headers`.
pub fn inject_http(headers: &mut http::HeaderMap) {
    let cx = tracing::Span::current().context();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut HeaderInjector(headers)));
}

/// Makes `span` a child of the trace context in `headers`.
pub fn set_remote_parent(span: &tracing::Span, headers: &http::HeaderMap) {
    let parent = extract(headers);
    // Fails only when the span is disabled; then there is nothing to link.
    let _ = span.set_parent(parent);
}

/// The span a gRPC server opens for each request, child of the caller's trace context. Install
/// it with `Server::builder().trace_fn(server_span)`.
pub fn server_span(req: &http::Request<()>) -> tracing::Span {
    let path = req.uri().path();
    let span = tracing::info_span!(
        "grpc.request",
        otel.name = %path.trim_start_matches('/'),
        otel.kind = "server",
        rpc.system = "grpc",
    );
    set_remote_parent(&span, req.headers());
    span
}

/// The trace id of `span`, as 32 hex characters, when tracing exports it.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// A gRPC client interceptor that sends the current span's trace context with every request.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceInterceptor;

impl tonic::service::Interceptor for TraceInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let cx = tracing::Span::current().context();
        global::get_text_map_propagator(|p| {
            p.inject_context(&cx, &mut MetadataInjector(req.metadata_mut()))
        });
        Ok(req)
    }
}
