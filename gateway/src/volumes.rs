//! `/volumes/...`.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use berth_core::{Error, ErrorKind};
use berth_proto::berth::engine::v1 as engine;
use bollard_stubs::models::VolumeCreateRequest;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::errors::parse_json_or_default;
use crate::query::Query;
use crate::{ApiError, AppState, json_response};

/// The volume routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/volumes", get(list))
        .route("/volumes/create", post(create))
        .route("/volumes/prune", post(prune))
        .route("/volumes/{name}", get(inspect).delete(remove))
}

/// A volume as Docker shows it; `usage` adds `UsageData` (system df).
pub fn volume_json(v: &engine::Volume, usage: bool) -> Value {
    let created = v.created_at.as_ref().map(|t| prost_types::Timestamp {
        seconds: t.seconds,
        nanos: 0,
    });
    let mut out = json!({
        "Name": v.name,
        "Driver": if v.driver.is_empty() { "local" } else { v.driver.as_str() },
        "Mountpoint": v.mountpoint,
        "CreatedAt": crate::time::rfc3339(created.as_ref()),
        "Status": if v.status.is_empty() { Value::Null } else { json!(v.status) },
        "Labels": v.labels,
        "Scope": if v.scope.is_empty() { "local" } else { v.scope.as_str() },
        "Options": v.options,
    });
    if usage {
        let u = v.usage.unwrap_or(engine::VolumeUsage {
            size: -1,
            ref_count: -1,
        });
        out["UsageData"] = json!({"Size": u.size, "RefCount": u.ref_count});
    }
    out
}

fn no_such_volume(name: &str) -> impl FnOnce(Error) -> Error + use<> {
    let name = name.to_string();
    move |err| {
        if err.is(ErrorKind::NotFound) {
            Error::not_found(format!("get {name}: no such volume"))
        } else {
            err
        }
    }
}

async fn list(State(st): State<AppState>, q: Query) -> Result<Response, ApiError> {
    let resp = st
        .backends
        .volumes
        .list(engine::ListVolumesRequest {
            filters: q.filters()?,
            usage: false,
        })
        .await?;
    let vols: Vec<Value> = resp.volumes.iter().map(|v| volume_json(v, false)).collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"Volumes": vols, "Warnings": resp.warnings}),
    ))
}

async fn create(State(st): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let req: VolumeCreateRequest = parse_json_or_default(&body)?;
    let name = req.name.unwrap_or_default();
    if !name.is_empty() {
        berth_core::id::validate_name(&name).map_err(|_| {
            Error::invalid_argument(format!(
                "create {name}: \"{name}\" includes invalid characters for a local volume name, only \"[a-zA-Z0-9][a-zA-Z0-9_.-]\" are allowed. If you intended to pass a host directory, use absolute path"
            ))
        })?;
    }
    let v = st
        .backends
        .volumes
        .create(engine::CreateVolumeRequest {
            name,
            driver: req.driver.unwrap_or_default(),
            driver_opts: req.driver_opts.unwrap_or_default(),
            labels: req.labels.unwrap_or_default(),
        })
        .await?;
    Ok(json_response(StatusCode::CREATED, &volume_json(&v, false)))
}

async fn inspect(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let v = st
        .backends
        .volumes
        .get(engine::GetVolumeRequest {
            name: name.clone(),
            usage: false,
        })
        .await
        .map_err(no_such_volume(&name))?;
    Ok(json_response(StatusCode::OK, &volume_json(&v, false)))
}

async fn remove(
    State(st): State<AppState>,
    Path(name): Path<String>,
    q: Query,
) -> Result<Response, ApiError> {
    st.backends
        .volumes
        .delete(engine::DeleteVolumeRequest {
            name: name.clone(),
            force: q.bool("force"),
        })
        .await
        .map_err(no_such_volume(&name))
        .map_err(|err| {
            if err.is(ErrorKind::FailedPrecondition) && !err.message().contains("in use") {
                Error::failed_precondition(format!(
                    "remove {name}: volume is in use - {}",
                    err.chain()
                ))
            } else {
                err
            }
        })?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn prune(State(st): State<AppState>, q: Query) -> Result<Response, ApiError> {
    let resp = st
        .backends
        .volumes
        .prune(engine::PruneVolumesRequest {
            filters: q.filters()?,
        })
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"VolumesDeleted": resp.deleted, "SpaceReclaimed": resp.space_reclaimed}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::Fake;

    #[tokio::test]
    async fn volume_routes() {
        let f = Fake::default();
        let r = f
            .request(
                "POST",
                "/volumes/create",
                r#"{"Name": "data", "Labels": {"a": "b"}}"#,
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
        let v = r.json();
        assert_eq!(v["Name"], "data");
        assert_eq!(v["Driver"], "local");
        assert_eq!(v["Scope"], "local");
        assert_eq!(v["Labels"], json!({"a": "b"}));
        assert_eq!(v["CreatedAt"], "2023-11-14T22:13:20Z");
        let r = f.request("POST", "/volumes/create", "").await;
        assert_eq!(r.json()["Name"].as_str().unwrap().len(), 64);
        let r = f
            .request("POST", "/volumes/create", r#"{"Name": "a/b"}"#)
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        let r = f.request("GET", "/volumes", "").await;
        assert_eq!(r.json()["Volumes"].as_array().unwrap().len(), 2);
        assert_eq!(r.json()["Warnings"], json!([]));
        let r = f.request("GET", "/volumes/data", "").await;
        assert_eq!(r.json()["Mountpoint"], "/var/lib/berth/volumes/x/_data");
        let r = f.request("GET", "/volumes/nosuch", "").await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(r.message(), "get nosuch: no such volume");
        let r = f.request("DELETE", "/volumes/busy", "").await;
        assert_eq!(r.status, StatusCode::CONFLICT);
        assert!(r.message().starts_with("remove busy: volume is in use"));
        let r = f.request("DELETE", "/volumes/data", "").await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
        let r = f.request("DELETE", "/volumes/data", "").await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        let r = f.request("DELETE", "/volumes/data?force=1", "").await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
        let r = f.request("POST", "/volumes/prune", "").await;
        assert_eq!(r.json()["SpaceReclaimed"], 10);
        assert_eq!(r.json()["VolumesDeleted"].as_array().unwrap().len(), 1);
    }
}
