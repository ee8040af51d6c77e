//! Logging and tracing: the `tracing` subscriber, the optional OTLP exporter, and W3C trace
//! context carried across every gRPC and HTTP hop so one trace spans gateway → engine → shim.
//!
//! Only `main` functions call [`init`]; libraries just emit `tracing` spans and events.

use std::sync::{Arc, OnceLock};

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
    // Log lines carry the trace and span ids only when spans have them (OTLP on).
    let slot = DispatchSlot::default();
    let dispatch = provider.as_ref().map(|_| slot.clone());
    let text_layer = (!json).then(|| {
        tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .event_format(WithTraceIds {
                inner: tracing_subscriber::fmt::format().with_ansi(ansi),
                dispatch: dispatch.clone(),
                json: false,
            })
            .with_writer(std::io::stderr)
    });
    let json_layer = json.then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .event_format(WithTraceIds {
                inner: tracing_subscriber::fmt::format().json(),
                dispatch: dispatch.clone(),
                json: true,
            })
            .with_writer(std::io::stderr)
    });

    tracing_subscriber::registry()
        .with(filter)
        .with(otel_layer)
        .with(slot)
        .with(text_layer)
        .with(json_layer)
        .try_init()
        .context(ErrorKind::Internal, "install tracing subscriber")?;
    Ok(Telemetry { provider })
}

/// The dispatcher the subscriber was installed as, for [`WithTraceIds`]: while an event is
/// being handled the current dispatcher is not reachable, and the OpenTelemetry layer keeps a
/// span's ids behind it. Filled in when the subscriber is registered.
#[derive(Debug, Clone, Default)]
struct DispatchSlot(Arc<OnceLock<tracing::dispatcher::WeakDispatch>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for DispatchSlot {
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        let _ = self.0.set(subscriber.downgrade());
    }
}

impl DispatchSlot {
    /// The trace and span id (hex) of span `id`, when it belongs to a valid trace.
    fn ids(&self, id: &tracing::span::Id) -> Option<(String, String)> {
        use opentelemetry::trace::TraceContextExt;
        let dispatch = self.0.get()?.upgrade()?;
        let cx = tracing_opentelemetry::get_otel_context(id, &dispatch)?;
        let span = cx.span();
        let sc = span.span_context();
        sc.is_valid()
            .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
    }
}

/// An event format that adds `trace_id` and `span_id` to lines logged inside a traced span:
/// ` trace_id=… span_id=…` at the end of a text line, two more fields of a JSON object.
struct WithTraceIds<F> {
    inner: F,
    dispatch: Option<DispatchSlot>,
    json: bool,
}

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for WithTraceIds<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let ids = self
            .dispatch
            .as_ref()
            .zip(ctx.lookup_current())
            .and_then(|(d, span)| d.ids(&span.id()));
        let Some((trace_id, span_id)) = ids else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.inner.format_event(
            ctx,
            tracing_subscriber::fmt::format::Writer::new(&mut line),
            event,
        )?;
        let body = line.trim_end_matches('\n');
        let body_len = body.len();
        if self.json && body.ends_with('}') {
            line.insert_str(
                body_len - 1,
                &format!(",\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\""),
            );
        } else {
            line.insert_str(body_len, &format!(" trace_id={trace_id} span_id={span_id}"));
        }
        writer.write_str(&line)
    }
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Log lines written into a shared buffer.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Lines {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// Logs one line outside any span and one inside a span, with `json` or text lines;
    /// returns the output and the span's (trace id, span id).
    fn log_in_span(json: bool) -> (String, String, String) {
        let provider = SdkTracerProvider::builder().build();
        let slot = DispatchSlot::default();
        let lines = Lines::default();
        let writer = {
            let lines = lines.clone();
            move || lines.clone()
        };
        let text_layer = (!json).then(|| {
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .event_format(WithTraceIds {
                    inner: tracing_subscriber::fmt::format().with_ansi(false),
                    dispatch: Some(slot.clone()),
                    json: false,
                })
                .with_writer(writer.clone())
        });
        let json_layer = json.then(|| {
            tracing_subscriber::fmt::layer()
                .json()
                .event_format(WithTraceIds {
                    inner: tracing_subscriber::fmt::format().json(),
                    dispatch: Some(slot.clone()),
                    json: true,
                })
                .with_writer(writer)
        });
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
            .with(slot.clone())
            .with(text_layer)
            .with(json_layer);
        let dispatch = tracing::Dispatch::new(subscriber);
        let (trace, span_id) = tracing::dispatcher::with_default(&dispatch, || {
            tracing::info!("outside");
            let span = tracing::info_span!("work");
            let _entered = span.enter();
            tracing::info!(n = 1, "inside");
            let cx = span.context();
            use opentelemetry::trace::TraceContextExt;
            let sc = cx.span().span_context().clone();
            (sc.trace_id().to_string(), sc.span_id().to_string())
        });
        (lines.text(), trace, span_id)
    }

    #[test]
    fn text_lines_in_a_span_end_with_its_ids() {
        let (out, trace, span) = log_in_span(false);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert!(lines[0].ends_with("outside"), "{out}");
        assert!(!lines[0].contains("trace_id"), "{out}");
        assert_eq!(trace.len(), 32);
        assert!(
            lines[1].ends_with(&format!("inside n=1 trace_id={trace} span_id={span}")),
            "{out}"
        );
    }

    #[test]
    fn json_lines_in_a_span_carry_its_ids() {
        let (out, trace, span) = log_in_span(true);
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert_eq!(lines[0]["fields"]["message"], "outside");
        assert!(lines[0].get("trace_id").is_none(), "{out}");
        assert_eq!(lines[1]["fields"]["message"], "inside");
        assert_eq!(lines[1]["trace_id"], trace.as_str(), "{out}");
        assert_eq!(lines[1]["span_id"], span.as_str(), "{out}");
        assert_eq!(lines[1]["span"]["name"], "work", "{out}");
    }
}
