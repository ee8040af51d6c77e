//! `docker exec`: `POST /containers/{id}/exec`, `POST /exec/{id}/start` (hijacked like attach),
//! `POST /exec/{id}/resize`, `GET /exec/{id}/json`.

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use berth_core::{Error, ErrorKind, Result};
use berth_proto::berth::engine::v1 as engine;
use berth_proto::berth::types::v1 as types;
use bollard_stubs::models::{ExecConfig, ExecInspectResponse, ExecStartConfig, ProcessConfig};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::containers::{get_container, render, terminal_size};
use crate::errors::{container_not_found, no_such, parse_json};
use crate::hijack::{self, StdinSink};
use crate::query::Query;
use crate::stdcopy::Encoder;
use crate::{ApiError, AppState, json_response};

/// The exec routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/containers/{id}/exec", post(create))
        .route("/exec/{id}/start", post(start))
        .route("/exec/{id}/resize", post(resize))
        .route("/exec/{id}/json", get(inspect))
}

fn console_size(v: &Option<Vec<usize>>) -> Option<types::TerminalSize> {
    v.as_ref().and_then(|s| {
        (s.len() == 2 && (s[0] > 0 || s[1] > 0)).then(|| types::TerminalSize {
            height: s[0] as u32,
            width: s[1] as u32,
        })
    })
}

/// The fields of an exec create body.
const CREATE_FIELDS: [&str; 11] = [
    "AttachStdin",
    "AttachStdout",
    "AttachStderr",
    "ConsoleSize",
    "DetachKeys",
    "Tty",
    "Env",
    "Cmd",
    "Privileged",
    "User",
    "WorkingDir",
];

/// Parses a JSON object body the way Go's decoder does: field names match whatever their
/// case (docker-py sends `detachKeys`).
fn parse_go_json<T: serde::de::DeserializeOwned>(body: &[u8], fields: &[&str]) -> Result<T> {
    let mut v: serde_json::Value = parse_json(body)?;
    if let Some(o) = v.as_object_mut() {
        let keys: Vec<String> = o.keys().cloned().collect();
        for key in keys {
            if let Some(field) = fields
                .iter()
                .find(|f| f.eq_ignore_ascii_case(&key) && **f != key)
                && !o.contains_key(*field)
                && let Some(value) = o.remove(&key)
            {
                o.insert(field.to_string(), value);
            }
        }
    }
    serde_json::from_value(v).map_err(|e| Error::invalid_argument(format!("invalid JSON: {e}")))
}

/// An exec create body → the engine's request.
pub fn create_request(container: &str, body: &[u8]) -> Result<engine::ExecCreateRequest> {
    let cfg: ExecConfig = parse_go_json(body, &CREATE_FIELDS)?;
    let cmd = cfg.cmd.clone().unwrap_or_default();
    if cmd.is_empty() {
        return Err(Error::invalid_argument("No exec command specified"));
    }
    Ok(engine::ExecCreateRequest {
        id: container.to_string(),
        cmd,
        env: cfg.env.unwrap_or_default(),
        working_dir: cfg.working_dir.unwrap_or_default(),
        user: cfg.user.unwrap_or_default(),
        tty: cfg.tty.unwrap_or(false),
        attach_stdin: cfg.attach_stdin.unwrap_or(false),
        attach_stdout: cfg.attach_stdout.unwrap_or(false),
        attach_stderr: cfg.attach_stderr.unwrap_or(false),
        privileged: cfg.privileged.unwrap_or(false),
        detach_keys: cfg.detach_keys.unwrap_or_default(),
        console_size: console_size(&cfg.console_size),
    })
}

async fn create(
    State(st): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req = create_request(&id, &body)?;
    match st.backends.containers.exec_create(req).await {
        Ok(resp) => Ok(json_response(
            StatusCode::CREATED,
            &json!({"Id": resp.exec_id}),
        )),
        Err(err) if err.is(ErrorKind::FailedPrecondition) => {
            let c = get_container(&st, &id).await?;
            let msg = match render::status_word(&c) {
                "paused" => format!(
                    "Container {} is paused, unpause the container before exec",
                    c.id
                ),
                "restarting" => format!(
                    "Container {} is restarting, wait until the container is running",
                    c.id
                ),
                "running" => return Err(err.into()),
                _ => format!("container {} is not running", c.id),
            };
            Err(Error::failed_precondition(msg).into())
        }
        Err(err) => Err(container_not_found(&id)(err).into()),
    }
}

/// `POST /exec/{id}/start`. As in Docker, the pty was decided at create; the start's `Tty`
/// only picks the framing (raw with it, stdcopy frames without) and whether its console size
/// counts. A process that cannot start still gets the upgrade, then the error on the stream
/// (its exit code, 126 or 127, is in `GET /exec/{id}/json`); detached, the error is the answer.
async fn start(
    State(st): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    use engine::exec_start_request::Event as In;
    use engine::exec_start_response::Event as Out;
    let (mut parts, body) = req.into_parts();
    let upgrade = hijack::wants_upgrade(&parts.headers);
    let on_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
    let peer = hijack::peer(&parts.extensions);
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .map_err(|e| Error::invalid_argument(format!("read body: {e}")))?;
    let cfg: ExecStartConfig = if body.iter().all(u8::is_ascii_whitespace) {
        ExecStartConfig::default()
    } else {
        parse_go_json(&body, &["Detach", "Tty", "ConsoleSize"])?
    };
    let detach = cfg.detach.unwrap_or(false);
    let raw = cfg.tty.unwrap_or(false);
    let options = engine::ExecStartOptions {
        exec_id: id.clone(),
        detach,
        tty: None,
        // Docker: no console without a TTY.
        console_size: if raw {
            console_size(&cfg.console_size)
        } else {
            None
        },
    };
    let (tx, rx) = mpsc::channel(16);
    tx.send(engine::ExecStartRequest {
        event: Some(In::Options(options)),
    })
    .await
    .map_err(|_| Error::internal("exec input closed"))?;
    let mut out = st
        .backends
        .containers
        .exec_start(ReceiverStream::new(rx).boxed())
        .await
        .map_err(no_such("exec instance", &id))?;
    let first = out
        .try_next()
        .await
        .map_err(no_such("exec instance", &id))?
        .and_then(|m| m.event);
    let enc = Encoder { tty: raw };
    let on_upgrade = on_upgrade.filter(|_| upgrade);
    let started = match first {
        Some(Out::Started(s)) => s,
        Some(Out::Failed(f)) if detach => {
            // Docker's "invalid config" start error: a 400 with the runtime's words.
            return Err(Error::invalid_argument(f.message).into());
        }
        Some(Out::Failed(f)) => {
            let line = Bytes::from(format!("{}\r\n", f.message));
            let output =
                futures::stream::once(
                    async move { Ok(enc.encode(types::OutputStream::Stdout, &line)) },
                )
                .boxed();
            return Ok(hijack::respond(
                on_upgrade,
                peer,
                enc.content_type(),
                output,
                None::<StdinSink<engine::ExecStartRequest>>,
            ));
        }
        _ => return Err(Error::internal("exec ended before it started").into()),
    };
    if detach {
        return Ok(StatusCode::OK.into_response());
    }
    // A raw stream for a process without a pty carries stdout only: Docker gives no stderr
    // writer then.
    let drop_stderr = raw && !started.tty;
    let out = out
        .try_filter(move |m| {
            let keep = !(drop_stderr
                && matches!(&m.event, Some(Out::Output(c)) if c.stream() == types::OutputStream::Stderr));
            futures::future::ready(keep)
        })
        .boxed();
    // Without a hijack there is no stdin, but the request stream must stay open while output
    // flows.
    let frame = |m: engine::ExecStartResponse| match m.event {
        Some(Out::Output(chunk)) => hijack::Frame::Output(chunk),
        Some(Out::End(_)) => hijack::Frame::End,
        _ => hijack::Frame::Other,
    };
    let output = hijack::output(out, enc, frame, (!upgrade).then(|| tx.clone()));
    // Docker closes an exec's stdin at the client's EOF unless it has a TTY.
    let sink = upgrade.then(|| StdinSink {
        tx,
        data: |b: Bytes| engine::ExecStartRequest {
            event: Some(In::Data(b.to_vec())),
        },
        on_eof: (!started.tty).then_some(engine::ExecStartRequest {
            event: Some(In::CloseStdin(engine::CloseStdin {})),
        }),
    });
    Ok(hijack::respond(
        on_upgrade,
        peer,
        enc.content_type(),
        output,
        sink,
    ))
}

async fn resize(
    State(st): State<AppState>,
    Path(id): Path<String>,
    q: Query,
) -> Result<Response, ApiError> {
    let size = terminal_size(&q)?;
    st.backends
        .containers
        .exec_resize(engine::ExecResizeRequest {
            exec_id: id.clone(),
            size: Some(size),
        })
        .await
        .map_err(no_such("exec instance", &id))?;
    Ok(StatusCode::OK.into_response())
}

/// The engine's exec inspect → Docker's.
pub fn inspect_json(e: &engine::ExecInspectResponse) -> ExecInspectResponse {
    let p = e.process_config.clone().unwrap_or_default();
    ExecInspectResponse {
        can_remove: Some(e.can_remove),
        detach_keys: Some(e.detach_keys.clone()),
        id: Some(e.exec_id.clone()),
        running: Some(e.running),
        exit_code: e.exit_code.map(i64::from),
        process_config: Some(ProcessConfig {
            privileged: Some(p.privileged),
            user: Some(p.user),
            tty: Some(p.tty),
            entrypoint: Some(p.entrypoint),
            arguments: Some(p.arguments),
        }),
        open_stdin: Some(e.open_stdin),
        open_stderr: Some(e.open_stderr),
        open_stdout: Some(e.open_stdout),
        container_id: Some(e.container_id.clone()),
        pid: Some(i64::from(e.pid)),
    }
}

async fn inspect(State(st): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let e = st
        .backends
        .containers
        .exec_inspect(engine::ExecInspectRequest {
            exec_id: id.clone(),
        })
        .await
        .map_err(no_such("exec instance", &id))?;
    let mut v = serde_json::to_value(inspect_json(&e))
        .map_err(|e| Error::internal("encode exec inspect").with_source(e))?;
    // Docker sends `"ExitCode": null` while there is none (clients index it).
    if let Some(o) = v.as_object_mut() {
        o.entry("ExitCode").or_insert(serde_json::Value::Null);
    }
    Ok(json_response(StatusCode::OK, &v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_bodies_match_fields_in_any_case_as_go_does() {
        let req = create_request(
            "c",
            br#"{"Cmd":["cat"],"AttachStdin":true,"detachKeys":"ctrl-x,y","tty":true}"#,
        )
        .unwrap();
        assert_eq!(req.detach_keys, "ctrl-x,y");
        assert!(req.tty && req.attach_stdin);
        // The exact spelling wins over another case of it.
        let req = create_request(
            "c",
            br#"{"Cmd":["cat"],"DetachKeys":"ctrl-a","detachkeys":"ctrl-b"}"#,
        )
        .unwrap();
        assert_eq!(req.detach_keys, "ctrl-a");
        assert!(create_request("c", br#"{"cmd":[]}"#).is_err());
        assert!(create_request("c", b"{nope").is_err());
    }
}
