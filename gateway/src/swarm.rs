//! Swarm mode's endpoints (`/swarm`, `/nodes`, `/services`, `/tasks`, `/secrets`, `/configs`,
//! cluster volume updates), answered as a Docker node that is not in a swarm answers them.
//!
//! berth has no Swarm mode: multi-host orchestration is Kubernetes' job, through the CRI. Clients
//! still call these endpoints (docker-py's network cleanup, `docker node ls`, `docker info`
//! scripts) and match on dockerd's statuses: a 503 with dockerd's own message, after the same
//! request checks dockerd makes first (a body that is not JSON, bad filters, an update without a
//! version, logs without a stream are 400s there too). `swarm init` and `join`, which dockerd
//! would carry out, are refused with a 503 that says why.

use axum::Router;
use axum::body::Bytes;
use axum::response::Response;
use axum::routing::{get, post, put};
use berth_core::{Error, Result};
use serde_json::Value;

use crate::query::Query;
use crate::{ApiError, ApiVersion, AppState};

/// dockerd's answer to `swarm leave` on a node that is in no swarm.
pub const NOT_PART_OF_A_SWARM: &str = "This node is not part of a swarm";

/// dockerd's answer to every manager call (inspect, update, unlock, nodes, services, tasks,
/// secrets, configs) on a node that is in no swarm.
pub const NOT_A_MANAGER: &str = "This node is not a swarm manager. Use \"docker swarm init\" or \
                                 \"docker swarm join\" to connect this node to swarm and try again.";

/// berth's refusal of `swarm init` and `swarm join`.
pub const NO_SWARM_MODE: &str = "berth has no Swarm mode: it runs containers on this host only, \
                                 and multi-host orchestration is done through the Kubernetes CRI";

/// dockerd's answer to `PUT /volumes/{name}` without a swarm.
pub const NO_CLUSTER_VOLUMES: &str =
    "volume update only valid for cluster volumes, but swarm is unavailable";

/// The swarm routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/swarm", get(manager))
        .route("/swarm/init", post(init_or_join))
        .route("/swarm/join", post(init_or_join))
        .route("/swarm/leave", post(leave))
        .route("/swarm/update", post(update_swarm))
        .route("/swarm/unlockkey", get(manager))
        .route("/swarm/unlock", post(with_body))
        .route("/nodes", get(list))
        .route("/nodes/{id}", get(manager).delete(manager))
        .route("/nodes/{id}/update", post(update_node))
        .route("/services", get(list_services))
        .route("/services/create", post(with_body))
        .route("/services/{id}", get(inspect_service).delete(manager))
        .route("/services/{id}/update", post(update_service))
        .route("/services/{id}/logs", get(logs))
        .route("/tasks", get(list))
        .route("/tasks/{id}", get(manager))
        .route("/tasks/{id}/logs", get(logs))
        .route("/secrets", get(list))
        .route("/secrets/create", post(with_body))
        .route("/secrets/{id}", get(manager).delete(manager))
        .route("/secrets/{id}/update", post(update_secret))
        .route("/configs", get(list))
        .route("/configs/create", post(with_body))
        .route("/configs/{id}", get(manager).delete(manager))
        .route("/configs/{id}/update", post(update_config))
        // The other methods of `/volumes/{name}` are in `volumes.rs`; this one exists only for
        // cluster volumes.
        .route("/volumes/{name}", put(cluster_volume_update))
}

fn unavailable(message: &str) -> ApiError {
    Error::unavailable(message).into()
}

/// dockerd reads a request body as JSON before anything else; an empty one is fine.
fn check_json(body: &[u8]) -> Result<()> {
    if !body.iter().all(u8::is_ascii_whitespace) {
        crate::errors::parse_json::<Value>(body)?;
    }
    Ok(())
}

/// The `version` an update names, checked as dockerd checks it (`strconv.ParseUint`).
fn check_version(q: &Query, object: &str) -> Result<()> {
    let raw = q.get("version").unwrap_or("");
    if raw.parse::<u64>().is_ok() {
        return Ok(());
    }
    Err(Error::invalid_argument(match object {
        // Secrets and configs say less.
        "secret" | "config" => format!("invalid {object} version"),
        _ => format!(
            "invalid {object} version '{raw}': strconv.ParseUint: parsing \"{raw}\": invalid syntax"
        ),
    }))
}

async fn manager() -> ApiError {
    unavailable(NOT_A_MANAGER)
}

async fn leave() -> ApiError {
    unavailable(NOT_PART_OF_A_SWARM)
}

async fn init_or_join(body: Bytes) -> ApiError {
    if let Err(err) = check_json(&body) {
        return err.into();
    }
    unavailable(NO_SWARM_MODE)
}

async fn with_body(body: Bytes) -> ApiError {
    if let Err(err) = check_json(&body) {
        return err.into();
    }
    unavailable(NOT_A_MANAGER)
}

async fn list(q: Query) -> ApiError {
    if let Err(err) = q.filters() {
        return err.into();
    }
    unavailable(NOT_A_MANAGER)
}

async fn list_services(version: ApiVersion, q: Query) -> Result<Response, ApiError> {
    q.filters()?;
    // `status` came with API 1.41; older requests have it ignored.
    if let Some(v) = q.non_empty("status").filter(|_| !version.before(1, 41)) {
        parse_bool(v, "status")?;
    }
    Err(unavailable(NOT_A_MANAGER))
}

async fn inspect_service(q: Query) -> Result<Response, ApiError> {
    if let Some(v) = q.non_empty("insertDefaults") {
        parse_bool(v, "insertDefaults")?;
    }
    Err(unavailable(NOT_A_MANAGER))
}

/// Go's `strconv.ParseBool`, as dockerd parses these flags.
fn parse_bool(v: &str, name: &str) -> Result<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(Error::invalid_argument(format!(
            "invalid value for {name}: {v}"
        ))),
    }
}

async fn update(q: Query, body: Bytes, object: &str) -> Result<Response, ApiError> {
    check_json(&body)?;
    check_version(&q, object)?;
    Err(unavailable(NOT_A_MANAGER))
}

async fn update_swarm(q: Query, body: Bytes) -> Result<Response, ApiError> {
    update(q, body, "swarm").await
}

async fn update_node(q: Query, body: Bytes) -> Result<Response, ApiError> {
    update(q, body, "node").await
}

async fn update_service(q: Query, body: Bytes) -> Result<Response, ApiError> {
    update(q, body, "service").await
}

async fn update_secret(q: Query, body: Bytes) -> Result<Response, ApiError> {
    update(q, body, "secret").await
}

async fn update_config(q: Query, body: Bytes) -> Result<Response, ApiError> {
    update(q, body, "config").await
}

/// Service and task logs check their streams before they look the service up.
async fn logs(q: Query) -> ApiError {
    if !q.bool("stdout") && !q.bool("stderr") {
        return Error::invalid_argument("Bad parameters: you must choose at least one stream")
            .into();
    }
    unavailable(NOT_A_MANAGER)
}

async fn cluster_volume_update() -> ApiError {
    unavailable(NO_CLUSTER_VOLUMES)
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;

    use super::*;
    use crate::fake::Fake;

    #[tokio::test]
    async fn swarm_calls_answer_as_a_node_outside_a_swarm() {
        let f = Fake::default();
        for (method, uri) in [
            ("GET", "/v1.45/swarm"),
            ("GET", "/swarm/unlockkey"),
            ("POST", "/swarm/unlock"),
            ("POST", "/swarm/update?version=3"),
            ("GET", "/nodes"),
            ("GET", "/nodes/abc"),
            ("DELETE", "/nodes/abc?force=1"),
            ("POST", "/nodes/abc/update?version=1"),
            ("GET", "/services?status=true"),
            ("POST", "/services/create"),
            ("GET", "/services/web"),
            ("DELETE", "/services/web"),
            ("POST", "/services/web/update?version=9"),
            ("GET", "/services/web/logs?stdout=1"),
            ("GET", "/tasks"),
            ("GET", "/tasks/t1"),
            ("GET", "/tasks/t1/logs?stderr=true"),
            ("GET", "/secrets"),
            ("POST", "/secrets/create"),
            ("GET", "/secrets/s"),
            ("DELETE", "/secrets/s"),
            ("POST", "/secrets/s/update?version=2"),
            ("GET", "/configs"),
            ("POST", "/configs/create"),
            ("GET", "/configs/c"),
            ("DELETE", "/configs/c"),
            ("POST", "/configs/c/update?version=2"),
        ] {
            let r = f.request(method, uri, "").await;
            assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{method} {uri}");
            assert_eq!(r.message(), NOT_A_MANAGER, "{method} {uri}");
        }
        let r = f.request("POST", "/v1.41/swarm/leave?force=1", "").await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.message(), NOT_PART_OF_A_SWARM);
        for uri in ["/swarm/init", "/swarm/join"] {
            let r = f
                .request("POST", uri, r#"{"ListenAddr":"0.0.0.0:2377"}"#)
                .await;
            assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{uri}");
            assert!(r.message().contains("Kubernetes CRI"), "{}", r.message());
        }
        let r = f.request("PUT", "/volumes/v?version=1", "{}").await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.message(), NO_CLUSTER_VOLUMES);
    }

    #[tokio::test]
    async fn request_checks_dockerd_makes_first_are_400s() {
        let f = Fake::default();
        let r = f.request("POST", "/swarm/update", "{}").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            r.message(),
            "invalid swarm version '': strconv.ParseUint: parsing \"\": invalid syntax"
        );
        let r = f.request("POST", "/secrets/s/update?version=x", "").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.message(), "invalid secret version");
        let r = f.request("GET", "/services/web/logs", "").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            r.message(),
            "Bad parameters: you must choose at least one stream"
        );
        let r = f.request("POST", "/services/create", "{not json").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.message().starts_with("invalid JSON"), "{}", r.message());
        let r = f.request("GET", "/nodes?filters=nope", "").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        let r = f.request("GET", "/services?status=maybe", "").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.message(), "invalid value for status: maybe");
    }
}
