//! `/plugins/...`: berth runs no Docker Engine plugins.
//!
//! Volume, network and log drivers are built into berth's services, so there is nothing a plugin
//! could plug into. Listing answers an empty list and every call that names a plugin answers
//! dockerd's 404 for a plugin it does not have (`docker inspect` needs that 404 to move on to
//! "No such object"); installing one (`pull`, `create`, `privileges`, which reads a plugin's
//! manifest from a registry before a pull) is refused with the reason.

use axum::Router;
use axum::extract::Path;
use axum::http::{Method, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use berth_core::Error;
use serde_json::json;

use crate::query::Query;
use crate::{ApiError, AppState, json_response};

/// Why plugins cannot be installed.
pub const NO_PLUGINS: &str = "berth does not run Docker Engine plugins: its volume, network and \
                              log drivers are built in, so plugins cannot be installed";

/// The plugin routes. Plugin names may contain slashes (`vieux/sshfs:latest`), so everything
/// under `/plugins/` that is not a fixed route is dispatched on its suffix.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/plugins", get(list))
        .route("/plugins/privileges", get(refuse))
        .route("/plugins/pull", post(refuse))
        .route("/plugins/create", post(refuse))
        .route(
            "/plugins/{*rest}",
            get(dispatch).post(dispatch).delete(dispatch),
        )
}

async fn list(q: Query) -> Result<Response, ApiError> {
    q.filters()?;
    Ok(json_response(StatusCode::OK, &json!([])))
}

async fn refuse() -> ApiError {
    Error::unimplemented(NO_PLUGINS).into()
}

/// `GET …/json`, `DELETE …`, `POST …/{enable,disable,push,upgrade,set}`: no such plugin.
async fn dispatch(method: Method, Path(rest): Path<String>) -> ApiError {
    let rest = rest.trim_start_matches('/');
    let name = match method {
        Method::GET => rest.strip_suffix("/json"),
        Method::DELETE => Some(rest),
        _ => ["/enable", "/disable", "/push", "/upgrade", "/set"]
            .iter()
            .find_map(|suffix| rest.strip_suffix(suffix)),
    };
    match name {
        Some(name) => Error::not_found(format!("plugin \"{name}\" not found")).into(),
        None => crate::not_routed(&method, &format!("/plugins/{rest}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::Fake;

    #[tokio::test]
    async fn there_are_no_plugins_and_none_can_be_installed() {
        let f = Fake::default();
        assert_eq!(f.request("GET", "/plugins", "").await.json(), json!([]));
        for (method, uri) in [
            ("GET", "/plugins/vieux/sshfs:latest/json"),
            ("DELETE", "/plugins/vieux/sshfs:latest?force=1"),
            ("POST", "/plugins/vieux/sshfs:latest/enable?timeout=0"),
            ("POST", "/plugins/vieux/sshfs:latest/disable"),
            ("POST", "/plugins/vieux/sshfs:latest/push"),
            (
                "POST",
                "/plugins/vieux/sshfs:latest/upgrade?remote=vieux/sshfs",
            ),
            ("POST", "/plugins/vieux/sshfs:latest/set"),
        ] {
            let r = f.request(method, uri, "").await;
            assert_eq!(r.status, StatusCode::NOT_FOUND, "{method} {uri}");
            assert_eq!(r.message(), "plugin \"vieux/sshfs:latest\" not found");
        }
        for (method, uri) in [
            ("GET", "/plugins/privileges?remote=vieux/sshfs"),
            ("POST", "/plugins/pull?remote=vieux/sshfs"),
            ("POST", "/plugins/create?name=x"),
        ] {
            let r = f.request(method, uri, "").await;
            assert_eq!(r.status, StatusCode::NOT_IMPLEMENTED, "{method} {uri}");
            assert_eq!(r.message(), NO_PLUGINS);
        }
    }
}
