//! `docs/docker-api-paths.md`: every path and method of the Docker Engine API v1.45 spec with
//! what berth answers, classified from the real router's responses (over the fake backends), not
//! from a hand-kept list. The test fails when the committed file differs; regenerate it with
//! `BERTH_UPDATE_API_PATHS=1 cargo test -p berth-gateway --lib api_paths`.
//!
//! The spec is `$BERTH_SHARED_DIR/reference/docker-engine-api-v1.45.yaml`, else
//! `../shared/reference/…` beside the checkout, as CI has it.

use std::path::PathBuf;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

use crate::fake::Fake;

const SPEC: &str = "reference/docker-engine-api-v1.45.yaml";
const LISTING: &str = "docs/docker-api-paths.md";
const METHODS: [&str; 6] = ["get", "post", "put", "delete", "head", "patch"];

/// Query parameters every probe carries: what a well-formed call of the endpoints that check
/// them sends (an update's object `version`, a log stream), ignored by every other route.
const PROBE_QUERY: &str = "version=1&stdout=1";

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the gateway crate sits in the workspace")
        .to_path_buf()
}

fn spec_path() -> PathBuf {
    match std::env::var_os("BERTH_SHARED_DIR") {
        Some(dir) => PathBuf::from(dir).join(SPEC),
        None => workspace().join("../shared").join(SPEC),
    }
}

/// One operation of the spec.
#[derive(Debug)]
struct Operation {
    path: String,
    method: String,
    operation_id: String,
}

/// The operations under the spec's top-level `paths:`, in the spec's order. A line scanner is
/// enough for the spec's regular layout (paths at two spaces, methods at four, their keys at
/// six) and spares the workspace a YAML parser.
fn operations(spec: &str) -> Vec<Operation> {
    let mut out: Vec<Operation> = Vec::new();
    let mut in_paths = false;
    let mut path = None::<String>;
    for line in spec.lines() {
        if !line.starts_with(' ') && !line.trim().is_empty() {
            in_paths = line.trim_end() == "paths:";
            path = None;
            continue;
        }
        if !in_paths {
            continue;
        }
        if let Some(p) = line.strip_prefix("  /") {
            path = Some(format!("/{}", p.trim_end().trim_end_matches(':')));
        } else if let Some(m) = line.strip_prefix("    ")
            && !m.starts_with(' ')
            && let Some(m) = m.trim_end().strip_suffix(':')
            && METHODS.contains(&m)
            && let Some(p) = &path
        {
            out.push(Operation {
                path: p.clone(),
                method: m.to_ascii_uppercase(),
                operation_id: String::new(),
            });
        } else if let Some(id) = line.strip_prefix("      operationId:")
            && let Some(op) = out.last_mut()
            && op.operation_id.is_empty()
        {
            op.operation_id = id.trim().trim_matches('"').to_string();
        }
    }
    out
}

/// What berth answers, from one response: the class, and the message for all but "served".
fn classify(status: StatusCode, message: &str) -> (String, String) {
    use crate::swarm::{NO_CLUSTER_VOLUMES, NOT_A_MANAGER, NOT_PART_OF_A_SWARM};
    let class = if status == StatusCode::SERVICE_UNAVAILABLE
        && [NOT_A_MANAGER, NOT_PART_OF_A_SWARM, NO_CLUSTER_VOLUMES].contains(&message)
    {
        "503 as dockerd outside a swarm"
    } else if status == StatusCode::NOT_IMPLEMENTED
        && message.contains("is not implemented by berth yet")
    {
        "501, not implemented yet"
    } else if status == StatusCode::NOT_IMPLEMENTED || status == StatusCode::SERVICE_UNAVAILABLE {
        if status == StatusCode::NOT_IMPLEMENTED {
            "refused (501)"
        } else {
            "refused (503)"
        }
    } else {
        return ("served".into(), String::new());
    };
    (class.into(), message.into())
}

/// Calls the router once for `op`, with placeholders for its path parameters.
async fn probe(fake: &Fake, op: &Operation) -> (String, String) {
    let mut uri = String::new();
    for (i, part) in op.path.split('{').enumerate() {
        match (i, part.split_once('}')) {
            (0, _) | (_, None) => uri.push_str(part),
            (_, Some((_, rest))) => {
                uri.push_str("berth-probe");
                uri.push_str(rest);
            }
        }
    }
    let req = Request::builder()
        .method(op.method.as_str())
        .uri(format!("/v1.45{uri}?{PROBE_QUERY}"))
        .body(Body::empty())
        .expect("request");
    let call = crate::versioned(fake.app()).oneshot(req);
    // A route that streams answers its status at once; only error bodies are read.
    let resp = match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(resp) => resp.expect("infallible"),
        Err(_) => return ("served (streams)".into(), String::new()),
    };
    let status = resp.status();
    if status.is_success() || status.is_informational() {
        return classify(status, "");
    }
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .ok()
        .and_then(|b| b.ok())
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let message = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    classify(status, &message)
}

fn render(rows: &[(&Operation, (String, String))]) -> String {
    let count = |prefix: &str| {
        rows.iter()
            .filter(|(_, (class, _))| class.starts_with(prefix))
            .count()
    };
    // Each distinct message once, numbered in order of appearance.
    let mut messages: Vec<&str> = Vec::new();
    for (_, (_, message)) in rows {
        if !message.is_empty() && !messages.contains(&message.as_str()) {
            messages.push(message);
        }
    }
    let mut out = String::new();
    out.push_str("# Docker Engine API v1.45: what berth answers, path by path\n\n");
    out.push_str(
        "Generated by `gateway/src/api_paths.rs` from the v1.45 spec \
         (`../shared/reference/docker-engine-api-v1.45.yaml`) and berth's router: each operation \
         is called once through `app()` over the fake backends (placeholders for path \
         parameters, an empty body) and classified by its answer. Do not edit by hand; \
         regenerate with `BERTH_UPDATE_API_PATHS=1 cargo test -p berth-gateway --lib \
         api_paths`.\n\n",
    );
    out.push_str(
        "- **served**: berth handles the call (a probe for an object that does not exist gets \
         Docker's 404 from the handler, which counts as served).\n\
         - **503 as dockerd outside a swarm**: the status and message a Docker node that is not \
         in a swarm answers; berth has no Swarm mode.\n\
         - **refused**: something dockerd would do and berth cannot, with the reason it gives.\n\
         - **501, not implemented yet**: not built yet.\n\n",
    );
    out.push_str(&format!(
        "{} operations: {} served, {} answered as dockerd outside a swarm, {} refused, {} not \
         implemented yet.\n\n",
        rows.len(),
        count("served"),
        count("503 as dockerd"),
        count("refused"),
        count("501"),
    ));
    out.push_str("| method | path | operation | berth answers |\n|---|---|---|---|\n");
    for (op, (class, message)) in rows {
        let note = match messages.iter().position(|m| m == message) {
            Some(n) => format!(" [{}]", n + 1),
            None => String::new(),
        };
        out.push_str(&format!(
            "| {} | `{}` | {} | {class}{note} |\n",
            op.method, op.path, op.operation_id
        ));
    }
    out.push_str("\nMessages (`{\"message\": …}` of the answer):\n\n");
    for (n, message) in messages.iter().enumerate() {
        out.push_str(&format!("{}. {message}\n", n + 1));
    }
    out
}

#[test]
fn scanner_reads_paths_methods_and_operation_ids() {
    let spec = "swagger: \"2.0\"\npaths:\n  /containers/{id}/json:\n    get:\n      summary: x\n      \
                operationId: ContainerInspect\n      parameters:\n        - name: get\n    \
                delete:\n      operationId: Del\n  /_ping:\n    head:\n      operationId: \
                SystemPingHead\ndefinitions:\n  Port:\n    get:\n";
    let ops = operations(spec);
    let got: Vec<_> = ops
        .iter()
        .map(|o| format!("{} {} {}", o.method, o.path, o.operation_id))
        .collect();
    assert_eq!(
        got,
        [
            "GET /containers/{id}/json ContainerInspect",
            "DELETE /containers/{id}/json Del",
            "HEAD /_ping SystemPingHead",
        ]
    );
}

#[tokio::test]
async fn api_paths_listing_matches_the_router() {
    let spec_file = spec_path();
    let spec = std::fs::read_to_string(&spec_file).unwrap_or_else(|e| {
        panic!(
            "read the Docker API spec {} (set BERTH_SHARED_DIR to the shared directory): {e}",
            spec_file.display()
        )
    });
    let ops = operations(&spec);
    assert!(
        ops.len() > 90,
        "only {} operations in {}",
        ops.len(),
        spec_file.display()
    );
    let fake = Fake::default();
    let mut rows = Vec::new();
    for op in &ops {
        rows.push((op, probe(&fake, op).await));
    }
    let rendered = render(&rows);
    let path = workspace().join(LISTING);
    if std::env::var_os("BERTH_UPDATE_API_PATHS").is_some() {
        std::fs::write(&path, &rendered).expect("write the listing");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != rendered {
        let first = committed
            .lines()
            .zip(rendered.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(committed.lines().count().min(rendered.lines().count()));
        panic!(
            "what the router answers changed without {LISTING} (first difference at line {}: {:?}).\n\
             If the change is intended, run BERTH_UPDATE_API_PATHS=1 cargo test -p berth-gateway \
             --lib api_paths and commit the file.",
            first + 1,
            rendered.lines().nth(first).unwrap_or("")
        );
    }
}
