//! The shim's trace spans, without the OpenTelemetry SDK: the shim runs once per container and
//! its memory counts, so spans are small records kept in a task-local context and, only when an
//! OTLP endpoint is configured, sent in the background as OTLP/gRPC `ExportTraceServiceRequest`s.
//!
//! A gRPC handler runs inside [`serve`], which continues the caller's W3C `traceparent`; code it
//! awaits opens child spans with [`child`] (each runtime invocation is one). Log lines written
//! inside a span carry its ids ([`current`]). Exporting is best effort: spans go through a
//! bounded queue that drops when full, requests time out, failures are logged at debug level;
//! nothing here blocks or fails a container operation.

use std::future::Future;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1 as otlp;
use tokio::sync::{mpsc, oneshot};

/// Spans queued for export before new ones are dropped.
const QUEUE: usize = 512;
/// Spans sent in one request at most.
const BATCH: usize = 128;
/// How long the exporter gathers spans after the first one before sending.
const GATHER: Duration = Duration::from_millis(200);
/// How long one export request may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The W3C trace context of the span code runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanContext {
    /// 16 bytes, never all zero.
    pub trace_id: [u8; 16],
    /// 8 bytes, never all zero.
    pub span_id: [u8; 8],
    /// The `sampled` flag: record (and export) this span and its children.
    pub sampled: bool,
}

impl SpanContext {
    /// Parses a `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`); `None` when it is not a
    /// valid version-00 value.
    pub fn from_traceparent(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        // Version 00 has exactly four fields; later versions may add more after them.
        let [v]: [u8; 1] = decode_hex(version)?;
        if v == 0xff || (v == 0 && parts.next().is_some()) {
            return None;
        }
        let trace_id: [u8; 16] = decode_hex(trace)?;
        let span_id: [u8; 8] = decode_hex(span)?;
        let [flags]: [u8; 1] = decode_hex(flags)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The trace id as 32 lowercase hex characters.
    pub fn trace_id_hex(&self) -> String {
        encode_hex(&self.trace_id)
    }

    /// The span id as 16 lowercase hex characters.
    pub fn span_id_hex(&self) -> String {
        encode_hex(&self.span_id)
    }
}

fn decode_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        // Lowercase only, as the W3C format requires.
        let pair = s.get(2 * i..2 * i + 2)?;
        if pair.bytes().any(|c| c.is_ascii_uppercase()) {
            return None;
        }
        *b = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

fn encode_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A new random non-zero span id.
fn new_span_id() -> [u8; 8] {
    loop {
        let mut id = [0u8; 8];
        // SAFETY: getrandom writes at most `id.len()` bytes into the buffer it is given.
        let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
        if n == id.len() as isize && id != [0; 8] {
            return id;
        }
    }
}

tokio::task_local! {
    static CURRENT: SpanContext;
}

/// The span the calling task runs in, if any.
pub fn current() -> Option<SpanContext> {
    CURRENT.try_with(|cx| *cx).ok()
}

/// What kind of span (OTLP `SpanKind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Handling a request from another process.
    Server,
    /// Work inside the shim (a runtime invocation).
    Internal,
}

/// One finished span.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    /// Its context (trace and span id).
    pub context: SpanContext,
    /// The span it is a child of.
    pub parent_span_id: [u8; 8],
    /// Name, e.g. `berth.shim.v1.Shim/Create` or `runc create`.
    pub name: String,
    /// Kind.
    pub kind: Kind,
    /// Start, nanoseconds since the Unix epoch.
    pub start_ns: u64,
    /// End, nanoseconds since the Unix epoch.
    pub end_ns: u64,
    /// A few attributes.
    pub attributes: Vec<(&'static str, String)>,
    /// The error the work ended with, if it failed.
    pub error: Option<String>,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Runs `work` in a new span named `name`, child of `parent`, and records it when `parent` is
/// sampled and an exporter is running. `failed` tells whether the outcome is an error.
async fn in_span<T>(
    parent: SpanContext,
    name: impl FnOnce() -> String,
    kind: Kind,
    attributes: Vec<(&'static str, String)>,
    work: impl Future<Output = T>,
    failed: impl FnOnce(&T) -> Option<String>,
) -> T {
    let context = SpanContext {
        span_id: new_span_id(),
        ..parent
    };
    let record = parent.sampled && exporter().is_some();
    let start_ns = if record { now_ns() } else { 0 };
    let out = CURRENT.scope(context, work).await;
    if record {
        emit(SpanRecord {
            context,
            parent_span_id: parent.span_id,
            name: name(),
            kind,
            start_ns,
            end_ns: now_ns(),
            attributes,
            error: failed(&out),
        });
    }
    out
}

/// Runs the handler `work` of gRPC method `method` (e.g. `Create`) in a server span that
/// continues the caller's `traceparent` from `metadata`; without one, just runs `work`.
pub async fn serve<T>(
    metadata: &tonic::metadata::MetadataMap,
    method: &'static str,
    attributes: Vec<(&'static str, String)>,
    work: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    let parent = metadata
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(SpanContext::from_traceparent);
    match parent {
        None => work.await,
        Some(parent) => {
            in_span(
                parent,
                || format!("berth.shim.v1.Shim/{method}"),
                Kind::Server,
                attributes,
                work,
                |r| r.as_ref().err().map(|s| s.message().to_string()),
            )
            .await
        }
    }
}

/// Runs `work` in a child span of the current one, named by `name` (called only when the span
/// is recorded); without a current span, just runs `work`.
pub async fn child<T>(
    name: impl FnOnce() -> String,
    attributes: impl FnOnce() -> Vec<(&'static str, String)>,
    work: impl Future<Output = berth_core::Result<T>>,
) -> berth_core::Result<T> {
    match current() {
        None => work.await,
        Some(parent) => {
            in_span(parent, name, Kind::Internal, attributes(), work, |r| {
                r.as_ref().err().map(|e| e.chain())
            })
            .await
        }
    }
}

enum Message {
    Span(Box<SpanRecord>),
    Flush(oneshot::Sender<()>),
}

/// The running exporter's queue.
#[derive(Debug)]
struct Exporter {
    tx: mpsc::Sender<Message>,
}

static EXPORTER: OnceLock<Exporter> = OnceLock::new();

fn exporter() -> Option<&'static Exporter> {
    EXPORTER.get()
}

fn emit(span: SpanRecord) {
    if let Some(e) = exporter() {
        // Full queue: drop the span rather than wait.
        if e.tx.try_send(Message::Span(Box::new(span))).is_err() {
            tracing::debug!("trace queue full; span dropped");
        }
    }
}

/// Starts exporting spans to the OTLP/gRPC collector at `endpoint` (e.g. `http://127.0.0.1:4317`)
/// with resource attributes `service.name = berth-shim` plus `resource`. Must be called inside
/// a Tokio runtime, once; a second call or a malformed endpoint leaves exporting off (logged).
pub fn start_exporter(endpoint: &str, resource: Vec<(&'static str, String)>) {
    let channel = match tonic::transport::Endpoint::from_shared(endpoint.to_string()) {
        Ok(e) => e
            .connect_timeout(Duration::from_secs(2))
            .timeout(EXPORT_TIMEOUT)
            .connect_lazy(),
        Err(err) => {
            tracing::warn!(endpoint, error = %err, "otlp endpoint; traces are not exported");
            return;
        }
    };
    let (tx, rx) = mpsc::channel(QUEUE);
    if EXPORTER.set(Exporter { tx }).is_err() {
        tracing::warn!("trace exporter started twice");
        return;
    }
    let mut attributes = vec![kv("service.name", "berth-shim".to_string())];
    attributes.extend(resource.into_iter().map(|(k, v)| kv(k, v)));
    let resource = Resource {
        attributes,
        ..Default::default()
    };
    tokio::spawn(export_loop(TraceServiceClient::new(channel), resource, rx));
}

/// Waits up to `timeout` until every span recorded so far has been sent (or given up on).
pub async fn flush(timeout: Duration) {
    let Some(e) = exporter() else { return };
    let (done, wait) = oneshot::channel();
    if tokio::time::timeout(timeout, async {
        if e.tx.send(Message::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    })
    .await
    .is_err()
    {
        tracing::debug!("trace flush timed out");
    }
}

async fn export_loop(
    mut client: TraceServiceClient<tonic::transport::Channel>,
    resource: Resource,
    mut rx: mpsc::Receiver<Message>,
) {
    let mut batch: Vec<SpanRecord> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut flushed = Vec::new();
        let take = |m: Message, batch: &mut Vec<SpanRecord>, flushed: &mut Vec<_>| match m {
            Message::Span(s) => batch.push(*s),
            Message::Flush(done) => flushed.push(done),
        };
        take(first, &mut batch, &mut flushed);
        // Gather what arrives shortly after (one request per burst), unless asked to flush.
        let deadline = tokio::time::Instant::now() + GATHER;
        while batch.len() < BATCH && flushed.is_empty() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(m)) => take(m, &mut batch, &mut flushed),
                Ok(None) | Err(_) => break,
            }
        }
        while batch.len() < BATCH
            && let Ok(m) = rx.try_recv()
        {
            take(m, &mut batch, &mut flushed);
        }
        if !batch.is_empty() {
            let request = ExportTraceServiceRequest {
                resource_spans: vec![otlp::ResourceSpans {
                    resource: Some(resource.clone()),
                    scope_spans: vec![otlp::ScopeSpans {
                        scope: Some(InstrumentationScope {
                            name: "berth-shim".into(),
                            ..Default::default()
                        }),
                        // Taken, not drained: an idle shim keeps no batch capacity.
                        spans: std::mem::take(&mut batch)
                            .into_iter()
                            .map(to_otlp)
                            .collect(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            };
            match tokio::time::timeout(EXPORT_TIMEOUT, client.export(request)).await {
                Ok(Ok(_)) => {}
                Ok(Err(status)) => tracing::debug!(error = %status, "trace export failed"),
                Err(_) => tracing::debug!("trace export timed out"),
            }
        }
        for done in flushed {
            let _ = done.send(());
        }
    }
}

fn kv(key: &str, value: String) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value)),
        }),
        ..Default::default()
    }
}

/// The OTLP form of `span`.
pub fn to_otlp(span: SpanRecord) -> otlp::Span {
    let kind = match span.kind {
        Kind::Server => otlp::span::SpanKind::Server,
        Kind::Internal => otlp::span::SpanKind::Internal,
    };
    let status = match span.error {
        Some(message) => otlp::Status {
            message,
            code: otlp::status::StatusCode::Error as i32,
        },
        None => otlp::Status::default(),
    };
    otlp::Span {
        trace_id: span.context.trace_id.to_vec(),
        span_id: span.context.span_id.to_vec(),
        parent_span_id: span.parent_span_id.to_vec(),
        // W3C trace flags: sampled (only sampled spans are recorded).
        flags: 1,
        name: span.name,
        kind: kind as i32,
        start_time_unix_nano: span.start_ns,
        end_time_unix_nano: span.end_ns,
        attributes: span.attributes.into_iter().map(|(k, v)| kv(k, v)).collect(),
        status: Some(status),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parses_the_w3c_format() {
        let cx = SpanContext::from_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .unwrap();
        assert_eq!(cx.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(cx.span_id_hex(), "00f067aa0ba902b7");
        assert!(cx.sampled);
        let unsampled = SpanContext::from_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        )
        .unwrap();
        assert!(!unsampled.sampled);
        // A later version may append fields.
        assert!(
            SpanContext::from_traceparent(
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"
            )
            .is_some()
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
        ] {
            assert_eq!(SpanContext::from_traceparent(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn children_continue_the_callers_trace() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        assert_eq!(current(), None);
        let (server, inner) = serve(&metadata, "Create", vec![], async {
            let server = current().unwrap();
            let inner = child(|| "runc create".into(), Vec::new, async {
                Ok(current().unwrap())
            })
            .await
            .unwrap();
            Ok((server, inner))
        })
        .await
        .unwrap();
        assert_eq!(server.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(
            server.span_id_hex(),
            "00f067aa0ba902b7",
            "a span of its own"
        );
        assert_eq!(inner.trace_id, server.trace_id);
        assert_ne!(inner.span_id, server.span_id);
        assert_eq!(current(), None, "the context ends with the handler");

        // No traceparent: no span, and children have no parent to attach to.
        let none = serve(
            &tonic::metadata::MetadataMap::new(),
            "Start",
            vec![],
            async {
                Ok(
                    child(|| "runc start".into(), Vec::new, async { Ok(current()) })
                        .await
                        .unwrap(),
                )
            },
        )
        .await
        .unwrap();
        assert_eq!(none, None);
    }

    /// An OTLP/gRPC collector that keeps what it receives.
    #[derive(Clone, Default)]
    struct Collector(std::sync::Arc<std::sync::Mutex<Vec<ExportTraceServiceRequest>>>);

    #[tonic::async_trait]
    impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
        for Collector
    {
        async fn export(
            &self,
            req: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<
            tonic::Response<
                opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
            >,
            tonic::Status,
        > {
            self.0.lock().unwrap().push(req.into_inner());
            Ok(tonic::Response::new(Default::default()))
        }
    }

    // The only test that starts the (process-wide) exporter.
    #[tokio::test]
    async fn the_exporter_sends_linked_spans_and_flushes() {
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let collector = Collector::default();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        start_exporter(
            &format!("http://{addr}"),
            vec![("berth.container.id", "c1".into())],
        );

        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let failed: Result<(), tonic::Status> = serve(&metadata, "Start", vec![], async {
            let err = child(|| "runc start".into(), Vec::new, async {
                Err::<(), _>(berth_core::Error::internal("runc start: exit status 1"))
            })
            .await
            .unwrap_err();
            Err(err.into())
        })
        .await;
        assert!(failed.is_err());
        flush(Duration::from_secs(10)).await;

        let got = collector.0.lock().unwrap().clone();
        let rs: Vec<_> = got.iter().flat_map(|r| &r.resource_spans).collect();
        let resource: Vec<(String, String)> = rs[0]
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .map(|kv| {
                let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(any_value::Value::StringValue(s)) => s.clone(),
                    other => format!("{other:?}"),
                };
                (kv.key.clone(), v)
            })
            .collect();
        assert!(resource.contains(&("service.name".into(), "berth-shim".into())));
        assert!(resource.contains(&("berth.container.id".into(), "c1".into())));
        let spans: Vec<&otlp::Span> = rs
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            // Other tests' spans may be exported too.
            .filter(|s| encode_hex(&s.trace_id) == "0af7651916cd43dd8448eb211c80319c")
            .collect();
        assert_eq!(spans.len(), 2, "{spans:#?}");
        // Children finish first.
        let (runc, server) = (spans[0], spans[1]);
        assert_eq!(server.name, "berth.shim.v1.Shim/Start");
        assert_eq!(
            server.parent_span_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert_eq!(runc.name, "runc start");
        assert_eq!(runc.parent_span_id, server.span_id);
        assert_eq!(runc.trace_id, server.trace_id);
        assert_eq!(
            runc.status.as_ref().unwrap().code,
            otlp::status::StatusCode::Error as i32
        );
        assert!(server.start_time_unix_nano <= runc.start_time_unix_nano);
        assert!(runc.end_time_unix_nano <= server.end_time_unix_nano);
    }

    #[test]
    fn records_become_otlp_spans() {
        let cx = SpanContext {
            trace_id: [1; 16],
            span_id: [2; 8],
            sampled: true,
        };
        let span = to_otlp(SpanRecord {
            context: cx,
            parent_span_id: [3; 8],
            name: "runc start".into(),
            kind: Kind::Internal,
            start_ns: 10,
            end_ns: 20,
            attributes: vec![("berth.runtime.op", "start".into())],
            error: Some("runc start: exit status 1".into()),
        });
        assert_eq!(span.trace_id, vec![1; 16]);
        assert_eq!(span.span_id, vec![2; 8]);
        assert_eq!(span.parent_span_id, vec![3; 8]);
        assert_eq!(span.kind, otlp::span::SpanKind::Internal as i32);
        assert_eq!(
            (span.start_time_unix_nano, span.end_time_unix_nano),
            (10, 20)
        );
        assert_eq!(span.attributes[0].key, "berth.runtime.op");
        let status = span.status.unwrap();
        assert_eq!(status.code, otlp::status::StatusCode::Error as i32);
        assert_eq!(status.message, "runc start: exit status 1");
    }
}
