//! `/containers/...`: lifecycle, inspection, and the streaming endpoints (attach, logs, stats,
//! wait, export, archive).

pub mod create;
pub mod render;
mod streams;

pub use streams::body_chunks;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use berth_core::{Error, ErrorKind, Reference, Result};
use berth_proto::berth::engine::v1 as engine;
use berth_proto::berth::images::v1 as images;
use bollard_stubs::models::{ContainerUpdateBody, FilesystemChange};
use bytes::Bytes;
use futures::TryStreamExt;
use serde_json::json;

use crate::errors::{container_not_found, parse_json_or_default};
use crate::query::Query;
use crate::{ApiError, AppState, json_response};

/// The container routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/containers/create", post(create))
        .route("/containers/json", get(list))
        .route("/containers/prune", post(prune))
        .route("/containers/{id}", axum::routing::delete(remove))
        // A link is removed by its name, `parent/alias`, which has a `/` in it.
        .route(
            "/containers/{parent}/{alias}",
            axum::routing::delete(remove_link),
        )
        .route("/containers/{id}/json", get(inspect))
        .route("/containers/{id}/top", get(top))
        .route("/containers/{id}/changes", get(changes))
        .route("/containers/{id}/export", get(export))
        .route("/containers/{id}/resize", post(resize))
        .route("/containers/{id}/start", post(start))
        .route("/containers/{id}/stop", post(stop))
        .route("/containers/{id}/restart", post(restart))
        .route("/containers/{id}/kill", post(kill))
        .route("/containers/{id}/update", post(update))
        .route("/containers/{id}/rename", post(rename))
        .route("/containers/{id}/pause", post(pause))
        .route("/containers/{id}/unpause", post(unpause))
        .route("/containers/{id}/wait", post(streams::wait))
        .route("/containers/{id}/attach", post(streams::attach))
        .route("/containers/{id}/attach/ws", get(streams::attach_ws))
        .route("/containers/{id}/logs", get(streams::logs))
        .route("/containers/{id}/stats", get(streams::stats))
        .route(
            "/containers/{id}/archive",
            get(streams::archive_get)
                .head(streams::archive_head)
                .put(streams::archive_put),
        )
}

/// Docker's 409 for a name in use.
pub fn name_conflict(name: &str, id: &str) -> Error {
    Error::already_exists(format!(
        "Conflict. The container name \"/{}\" is already in use by container \"{id}\". You have to remove (or rename) that container to be able to reuse that name.",
        name.trim_start_matches('/')
    ))
}

/// The container `input` names, or Docker's 404.
pub async fn get_container(st: &AppState, input: &str) -> Result<engine::Container> {
    st.backends
        .containers
        .get(engine::GetContainerRequest {
            id: input.to_string(),
            size: false,
        })
        .await
        .map_err(container_not_found(input))
}

async fn create(State(st): State<AppState>, q: Query, body: Bytes) -> Result<Response, ApiError> {
    let name = q.get("name").unwrap_or("").to_string();
    let req = create::create_request(&name, q.get("platform").unwrap_or(""), &body)?;
    let image = req
        .config
        .as_ref()
        .map(|c| c.image.clone())
        .unwrap_or_default();
    let platform = req.platform.clone();
    match st.backends.containers.create(req).await {
        Ok(resp) => {
            let id = resp.container.map(|c| c.id).unwrap_or_default();
            Ok(json_response(
                StatusCode::CREATED,
                &json!({"Id": id, "Warnings": resp.warnings}),
            ))
        }
        Err(err) if err.is(ErrorKind::AlreadyExists) && !name.is_empty() => {
            let holder = get_container(&st, &name)
                .await
                .map(|c| c.id)
                .unwrap_or_default();
            Err(name_conflict(&name, &holder).into())
        }
        Err(err) if err.is(ErrorKind::NotFound) => {
            // The CLI pulls on a 404 "No such image", so say so when the image is missing.
            let missing = st
                .backends
                .images
                .get(images::GetImageRequest {
                    reference: image.clone(),
                    platform,
                })
                .await
                .is_err_and(|e| e.is(ErrorKind::NotFound));
            if missing {
                let shown = Reference::parse(&image)
                    .map(|r| r.familiar())
                    .unwrap_or(image);
                Err(Error::not_found(format!("No such image: {shown}")).into())
            } else {
                Err(err.into())
            }
        }
        Err(err) => Err(err.into()),
    }
}

async fn list(State(st): State<AppState>, q: Query) -> Result<Response, ApiError> {
    let size = q.bool("size");
    let limit = q.int("limit")?.unwrap_or(0).max(0) as i32;
    let req = engine::ListContainersRequest {
        filters: q.filters()?,
        all: q.bool("all"),
        limit,
        size,
        summary: true,
    };
    let containers = st.backends.containers.list(req).await?;
    let body = render::summaries_json(&containers, size)
        .map_err(|e| Error::new(ErrorKind::Internal, "render container list").with_source(e))?;
    drop(containers);
    Ok((
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}

async fn inspect(
    State(st): State<AppState>,
    version: crate::ApiVersion,
    Path(id): Path<String>,
    q: Query,
) -> Result<Response, ApiError> {
    let size = q.bool("size");
    let c = st
        .backends
        .containers
        .get(engine::GetContainerRequest {
            id: id.clone(),
            size,
        })
        .await
        .map_err(container_not_found(&id))?;
    let mut v = render::inspect(&c, size);
    crate::versions::container_inspect(version, &mut v);
    Ok(json_response(StatusCode::OK, &v))
}

async fn prune(State(st): State<AppState>, q: Query) -> Result<Response, ApiError> {
    let resp = st
        .backends
        .containers
        .prune(engine::PruneContainersRequest {
            filters: q.filters()?,
        })
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"ContainersDeleted": resp.deleted, "SpaceReclaimed": resp.space_reclaimed}),
    ))
}

async fn remove_link(
    State(st): State<AppState>,
    Path((parent, alias)): Path<(String, String)>,
    q: Query,
) -> Result<Response, ApiError> {
    if !q.bool("link") {
        return Err(Error::not_found(format!("No such container: {parent}/{alias}")).into());
    }
    let req = engine::DeleteContainerRequest {
        id: format!("{parent}/{alias}"),
        remove_link: true,
        ..Default::default()
    };
    st.backends.containers.delete(req).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn remove(
    State(st): State<AppState>,
    Path(id): Path<String>,
    q: Query,
) -> Result<Response, ApiError> {
    let req = engine::DeleteContainerRequest {
        id: id.clone(),
        force: q.bool("force"),
        remove_volumes: q.bool("v"),
        remove_link: q.bool("link"),
    };
    match st.backends.containers.delete(req).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT.into_response()),
        Err(err) if err.is(ErrorKind::FailedPrecondition) => {
            let c = get_container(&st, &id).await?;
            // The engine words the restarting case as Docker does.
            if render::is_running(&c) && render::status_word(&c) != "restarting" {
                let what = if render::status_word(&c) == "paused" {
                    "paused"
                } else {
                    "running"
                };
                Err(Error::failed_precondition(format!(
                    "You cannot remove a {what} container {}. Stop the container before attempting removal or force remove",
                    c.id
                ))
                .into())
            } else {
                Err(err.into())
            }
        }
        Err(err) => Err(container_not_found(&id)(err).into()),
    }
}

async fn top(
    State(st): State<AppState>,
    Path(id): Path<String>,
    q: Query,
) -> Result<Response, ApiError> {
    let resp = st
        .backends
        .containers
        .top(engine::TopRequest {
            id: id.clone(),
            ps_args: q.get("ps_args").unwrap_or("").to_string(),
        })
        .await
        .map_err(container_not_found(&id))
        .map_err(|e| not_running(e, &id))?;
    let processes: Vec<Vec<String>> = resp.processes.into_iter().map(|r| r.values).collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"Titles": resp.titles, "Processes": processes}),
    ))
}

/// Docker's wording for operations that need a running container.
fn not_running(err: Error, id: &str) -> Error {
    if err.is(ErrorKind::FailedPrecondition) && !err.message().contains("is not running") {
        Error::failed_precondition(format!("Container {id} is not running: {}", err.chain()))
    } else {
        err
    }
}

async fn changes(State(st): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let changes = st
        .backends
        .containers
        .changes(engine::ChangesRequest { id: id.clone() })
        .await
        .map_err(container_not_found(&id))?;
    let out: Vec<FilesystemChange> = changes
        .into_iter()
        .map(|c| FilesystemChange {
            path: c.path,
            kind: match engine::ChangeKind::try_from(c.kind).unwrap_or(engine::ChangeKind::Modified)
            {
                engine::ChangeKind::Added => bollard_stubs::models::ChangeType::_1,
                engine::ChangeKind::Deleted => bollard_stubs::models::ChangeType::_2,
                _ => bollard_stubs::models::ChangeType::_0,
            },
        })
        .collect();
    Ok(json_response(StatusCode::OK, &out))
}

async fn export(State(st): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let data = st
        .backends
        .containers
        .export(engine::ExportContainerRequest { id: id.clone() })
        .await
        .map_err(container_not_found(&id))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-tar"),
        )],
        Body::from_stream(data.map_err(|e| std::io::Error::other(e.chain()))),
    )
        .into_response())
}

/// `h` and `w` of a resize request.
pub fn terminal_size(q: &Query) -> Result<berth_proto::berth::types::v1::TerminalSize> {
    let dim = |k: &str| -> Result<u32> {
        let v = q.int(k)?.unwrap_or(0);
        u32::try_from(v).map_err(|_| Error::invalid_argument(format!("invalid value for {k}: {v}")))
    };
    Ok(berth_proto::berth::types::v1::TerminalSize {
        height: dim("h")?,
        width: dim("w")?,
    })
}

async fn resize(
    State(st): State<AppState>,
    Path(id): Path<String>,
    q: Query,
) -> Result<Response, ApiError> {
    let size = terminal_size(&q)?;
    st.backends
        .containers
        .resize(engine::ResizePtyRequest {
            id: id.clone(),
            size: Some(size),
        })
        .await
        .map_err(container_not_found(&id))?;
    Ok(StatusCode::OK.into_response())
}

async fn start(
    State(st): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    // API < 1.24 carried a HostConfig here; since 1.24 any body is an error in Docker, but
    // clients send `{}` or nothing.
    let extra: serde_json::Value = parse_json_or_default(&body)?;
    if extra.as_object().is_some_and(|o| !o.is_empty()) {
        return Err(Error::invalid_argument(
            "starting container with non-empty request body was deprecated since API v1.22 and removed in v1.24",
        )
        .into());
    }
    let resp = st
        .backends
        .containers
        .start(engine::StartTaskRequest { id: id.clone() })
        .await
        .map_err(container_not_found(&id))?;
    Ok(if resp.already_running {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        StatusCode::NO_CONTENT.into_response()
    })
}

fn timeout_param(q: &Query) -> Result<Option<i64>> {
    q.int("t")
}

async fn stop(
    State(st): State<AppState>,
    Path(id): Path<String>,
    q: Query,
) -> Result<Response, ApiError> {
    let resp = st
        .backends
        .containers
        .stop(engine::StopTaskRequest {
            id: id.clone(),
            signal: q.get("signal").unwrap_or("").to_string(),
            timeout_seconds: timeout_param(&q)?,
        })
        .await
        .map_err(container_not_found(&id))?;
    Ok(if resp.already_stopped {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        StatusCode::NO_CONTENT.into_response()
    })
}

async fn restart(
    State(st): State<AppState>,
    Path(id): Path<String>,
    q: Query,
) -> Result<Response, ApiError> {
    st.backends
        .containers
        .restart(engine::RestartTaskRequest {
            id: id.clone(),
            signal: q.get("signal").unwrap_or("").to_string(),
            timeout_seconds: timeout_param(&q)?,
        })
        .await
        .map_err(container_not_found(&id))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn kill(
    State(st): State<AppState>,
    Path(id): Path<String>,
    q: Query,
) -> Result<Response, ApiError> {
    let res = st
        .backends
        .containers
        .kill(engine::KillTaskRequest {
            id: id.clone(),
            signal: q.get("signal").unwrap_or("").to_string(),
        })
        .await;
    match res {
        Ok(()) => Ok(StatusCode::NO_CONTENT.into_response()),
        Err(err) if err.is(ErrorKind::FailedPrecondition) => {
            let c = get_container(&st, &id).await?;
            if render::is_running(&c) {
                Err(err.into())
            } else {
                Err(Error::failed_precondition(format!(
                    "Cannot kill container: {id}: Container {} is not running",
                    c.id
                ))
                .into())
            }
        }
        Err(err) => Err(container_not_found(&id)(err).into()),
    }
}

async fn pause(State(st): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    st.backends
        .containers
        .pause(engine::PauseTaskRequest { id: id.clone() })
        .await
        .map_err(container_not_found(&id))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn unpause(State(st): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    st.backends
        .containers
        .resume(engine::ResumeTaskRequest { id: id.clone() })
        .await
        .map_err(container_not_found(&id))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn rename(
    State(st): State<AppState>,
    Path(id): Path<String>,
    q: Query,
) -> Result<Response, ApiError> {
    let new_name = q.get("name").unwrap_or("").to_string();
    if new_name.is_empty() {
        return Err(Error::invalid_argument("Neither old nor new names may be empty").into());
    }
    let bare = berth_core::id::validate_name(&new_name)?.to_string();
    match st
        .backends
        .containers
        .rename(engine::RenameContainerRequest {
            id: id.clone(),
            new_name: bare.clone(),
        })
        .await
    {
        Ok(()) => Ok(StatusCode::NO_CONTENT.into_response()),
        Err(err) if err.is(ErrorKind::AlreadyExists) => {
            let holder = get_container(&st, &bare)
                .await
                .map(|c| c.id)
                .unwrap_or_default();
            Err(Error::already_exists(format!(
                "Error when allocating new name: {}",
                name_conflict(&bare, &holder).message()
            ))
            .into())
        }
        Err(err) => Err(container_not_found(&id)(err).into()),
    }
}

/// `POST /containers/{id}/update` body → the engine's update request.
pub fn update_request(id: &str, body: &[u8]) -> Result<engine::UpdateContainerRequest> {
    let mut raw: serde_json::Value = parse_json_or_default(body)?;
    create::canonical_keys(&mut raw, create::UPDATE_KEYS);
    let u: ContainerUpdateBody = if raw.is_null() {
        ContainerUpdateBody::default()
    } else {
        serde_json::from_value(raw)
            .map_err(|e| Error::invalid_argument(format!("invalid JSON: {e}")))?
    };
    // What a running container's cgroup update cannot change is refused, not dropped.
    let fixed = [
        ("Ulimits", u.ulimits.as_ref().is_some_and(|v| !v.is_empty())),
        ("Devices", u.devices.as_ref().is_some_and(|v| !v.is_empty())),
        (
            "DeviceCgroupRules",
            u.device_cgroup_rules
                .as_ref()
                .is_some_and(|v| !v.is_empty()),
        ),
        (
            "DeviceRequests",
            u.device_requests.as_ref().is_some_and(|v| !v.is_empty()),
        ),
        (
            "CgroupParent",
            u.cgroup_parent.as_ref().is_some_and(|v| !v.is_empty()),
        ),
        ("CpuCount", u.cpu_count.is_some_and(|v| v != 0)),
        ("CpuPercent", u.cpu_percent.is_some_and(|v| v != 0)),
        ("IOMaximumIOps", u.io_maximum_iops.is_some_and(|v| v != 0)),
        (
            "IOMaximumBandwidth",
            u.io_maximum_bandwidth.is_some_and(|v| v != 0),
        ),
        ("Init", u.init.is_some()),
    ];
    if let Some((field, _)) = fixed.iter().find(|(_, set)| *set) {
        return Err(Error::invalid_argument(format!(
            "{field} cannot be changed by a container update"
        )));
    }
    let resources = create::ResourceFields {
        memory: u.memory,
        memory_swap: u.memory_swap,
        memory_reservation: u.memory_reservation,
        memory_swappiness: u.memory_swappiness,
        nano_cpus: u.nano_cpus,
        cpu_shares: u.cpu_shares,
        cpu_period: u.cpu_period,
        cpu_quota: u.cpu_quota,
        cpu_realtime_period: u.cpu_realtime_period,
        cpu_realtime_runtime: u.cpu_realtime_runtime,
        cpuset_cpus: &u.cpuset_cpus,
        cpuset_mems: &u.cpuset_mems,
        pids_limit: u.pids_limit,
        blkio_weight: u.blkio_weight,
        blkio_weight_device: &u.blkio_weight_device,
        blkio_device_read_bps: &u.blkio_device_read_bps,
        blkio_device_write_bps: &u.blkio_device_write_bps,
        blkio_device_read_iops: &u.blkio_device_read_iops,
        blkio_device_write_iops: &u.blkio_device_write_iops,
        oom_kill_disable: u.oom_kill_disable,
        ulimits: &None,
    }
    .to_engine();
    let restart_policy = u
        .restart_policy
        .as_ref()
        .filter(|p| {
            p.name
                .is_some_and(|n| n != bollard_stubs::models::RestartPolicyNameEnum::EMPTY)
        })
        .map(create::restart_policy)
        .transpose()?;
    Ok(engine::UpdateContainerRequest {
        id: id.to_string(),
        resources: Some(resources),
        restart_policy,
        set_extensions: Default::default(),
        remove_extensions: Vec::new(),
    })
}

async fn update(
    State(st): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req = update_request(&id, &body)?;
    let resp = st
        .backends
        .containers
        .update(req)
        .await
        .map_err(container_not_found(&id))?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"Warnings": resp.warnings}),
    ))
}

#[cfg(test)]
mod tests;
