//! The streaming container endpoints: wait, attach, logs, stats and the archive (`docker cp`).

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use berth_core::{Error, ErrorKind, Result};
use berth_proto::berth::engine::v1 as engine;
use berth_proto::berth::types::v1 as types;
use bollard_stubs::models::{
    ContainerBlkioStatEntry, ContainerBlkioStats, ContainerCpuStats, ContainerCpuUsage,
    ContainerMemoryStats, ContainerNetworkStats, ContainerPidsStats, ContainerStatsResponse,
    ContainerThrottlingData,
};
use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::get_container;
use crate::errors::container_not_found;
use crate::hijack::{self, StdinSink};
use crate::query::Query;
use crate::stdcopy::Encoder;
use crate::{ApiError, AppState, time};

fn body_from(stream: crate::backend::Stream<Bytes>) -> Body {
    Body::from_stream(stream.map_err(|e| std::io::Error::other(e.chain())))
}

/// `POST /containers/{id}/wait?condition=`: the headers go out as soon as the engine has
/// registered the wait (the CLI starts the container only then), the body at the exit.
pub async fn wait(
    State(st): State<AppState>,
    Path(id): Path<String>,
    q: Query,
) -> Result<Response, ApiError> {
    let condition = match q.get("condition").unwrap_or("") {
        "" | "not-running" => engine::WaitCondition::NotRunning,
        "next-exit" => engine::WaitCondition::NextExit,
        "removed" => engine::WaitCondition::Removed,
        other => {
            return Err(Error::invalid_argument(format!("invalid condition: \"{other}\"")).into());
        }
    };
    let mut s = st
        .backends
        .containers
        .wait(engine::WaitTaskRequest {
            id: id.clone(),
            condition: condition as i32,
        })
        .await
        .map_err(container_not_found(&id))?;
    use engine::wait_task_response::Event;
    let first = s
        .try_next()
        .await
        .map_err(container_not_found(&id))?
        .and_then(|m| m.event);
    let exit = match first {
        Some(Event::Registered(_)) => None,
        Some(Event::Exit(exit)) => Some(exit),
        None => return Err(Error::internal("wait ended before it was registered").into()),
    };
    let body = futures::stream::once(async move {
        let exit = match exit {
            Some(e) => Ok(e),
            None => loop {
                match s.try_next().await {
                    Ok(Some(engine::WaitTaskResponse {
                        event: Some(Event::Exit(e)),
                    })) => break Ok(e),
                    Ok(Some(_)) => continue,
                    Ok(None) => break Err(Error::internal("wait ended without an exit")),
                    Err(e) => break Err(e),
                }
            },
        };
        let v = match exit {
            Ok(e) => json!({
                "StatusCode": e.status_code,
                "Error": if e.error.is_empty() { serde_json::Value::Null } else { json!({"Message": e.error}) },
            }),
            // The status line is gone already; Docker reports late failures in the body too.
            Err(e) => json!({"StatusCode": -1, "Error": {"Message": e.chain()}}),
        };
        let mut line = serde_json::to_vec(&v).unwrap_or_default();
        line.push(b'\n');
        Ok::<_, std::io::Error>(Bytes::from(line))
    });
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        Body::from_stream(body),
    )
        .into_response())
}

/// `POST /containers/{id}/attach`: hijacked, stdcopy-framed unless the container has a TTY.
pub async fn attach(
    State(st): State<AppState>,
    Path(id): Path<String>,
    q: Query,
    mut req: Request,
) -> Result<Response, ApiError> {
    use engine::attach_task_request::Event as In;
    use engine::attach_task_response::Event as Out;
    let upgrade = hijack::wants_upgrade(req.headers());
    let on_upgrade = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>();
    let peer = hijack::peer(req.extensions());
    let with_stdin = q.bool("stdin") && upgrade;
    let options = engine::AttachOptions {
        id: id.clone(),
        stdin: with_stdin,
        stdout: q.bool("stdout"),
        stderr: q.bool("stderr"),
        logs: q.bool("logs"),
        stream: q.bool("stream"),
        detach_keys: q.get("detachKeys").unwrap_or("").to_string(),
    };
    let (tx, out, ready) = open_attach(&st, &id, options).await?;
    let enc = Encoder { tty: ready.tty };
    // Docker closes the process' stdin at the client's EOF only for StdinOnce without a TTY.
    let close_on_eof = if with_stdin && !ready.tty {
        get_container(&st, &ready.container_id)
            .await
            .ok()
            .and_then(|c| c.config)
            .is_some_and(|c| c.stdin_once)
    } else {
        false
    };
    // Without stdin the request stream must still stay open while output flows.
    let frame = |m: engine::AttachTaskResponse| match m.event {
        Some(Out::Output(chunk)) => hijack::Frame::Output(chunk),
        Some(Out::End(_)) => hijack::Frame::End,
        _ => hijack::Frame::Other,
    };
    let output = hijack::output(out, enc, frame, (!with_stdin).then(|| tx.clone()));
    let sink = with_stdin.then(|| StdinSink {
        tx,
        data: |b: Bytes| engine::AttachTaskRequest {
            event: Some(In::Data(b.to_vec())),
        },
        on_eof: close_on_eof.then_some(engine::AttachTaskRequest {
            event: Some(In::CloseStdin(engine::CloseStdin {})),
        }),
    });
    Ok(hijack::respond(
        on_upgrade.filter(|_| upgrade),
        peer,
        enc.content_type(),
        output,
        sink,
    ))
}

/// How long a websocket attach waits for the client's answer to its close.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// `GET /containers/{id}/attach/ws`: attach over a websocket, as Docker serves it. Output is
/// never multiplexed: stdout and stderr bytes both go out as binary messages; text and binary
/// messages from the client are stdin. The session ends (with a close message) when the output
/// does, or when the client closes.
pub async fn attach_ws(
    State(st): State<AppState>,
    Path(id): Path<String>,
    q: Query,
    ws: std::result::Result<
        axum::extract::ws::WebSocketUpgrade,
        axum::extract::ws::rejection::WebSocketUpgradeRejection,
    >,
) -> Result<Response, ApiError> {
    use axum::extract::ws::Message;
    use engine::attach_task_request::Event as In;
    use engine::attach_task_response::Event as Out;
    let with_stdin = q.bool("stdin");
    let options = engine::AttachOptions {
        id: id.clone(),
        stdin: with_stdin,
        stdout: q.bool("stdout"),
        stderr: q.bool("stderr"),
        logs: q.bool("logs"),
        stream: q.bool("stream"),
        detach_keys: q.get("detachKeys").unwrap_or("").to_string(),
    };
    // The container and the options are checked before the handshake, so a missing container
    // is a 404, as with Docker.
    let get_ws = |ws| match ws {
        Ok(ws) => Ok(ws),
        Err(rejection) => Err(Error::invalid_argument(format!(
            "not a websocket handshake: {rejection}"
        ))),
    };
    get_container(&st, &id).await?;
    let ws = get_ws(ws)?;
    let (tx, mut out, _ready) = open_attach(&st, &id, options).await?;
    Ok(ws.on_upgrade(move |socket| async move {
        let (mut sink, mut incoming) = socket.split();
        use futures::SinkExt;
        // The request stream stays open until the session ends: the engine reads its end as
        // the client going away.
        let input = {
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(Ok(msg)) = incoming.next().await {
                    let data = match msg {
                        Message::Text(t) => Bytes::copy_from_slice(t.as_bytes()),
                        Message::Binary(b) => b,
                        Message::Close(_) => break,
                        Message::Ping(_) | Message::Pong(_) => continue,
                    };
                    if with_stdin
                        && tx
                            .send(engine::AttachTaskRequest {
                                event: Some(In::Data(data.to_vec())),
                            })
                            .await
                            .is_err()
                    {
                        break;
                    }
                }
            })
        };
        let output = async {
            while let Ok(Some(m)) = out.try_next().await {
                let data = match m.event {
                    Some(Out::Output(chunk)) => chunk.data,
                    Some(Out::End(_)) => break,
                    _ => continue,
                };
                if sink.send(Message::Binary(data.into())).await.is_err() {
                    return false;
                }
            }
            sink.send(Message::Close(None)).await.is_ok()
        };
        let mut input = input;
        tokio::select! {
            closing = output => {
                // The client answers the close; the connection goes only then (a client that
                // never answers is let go after a while).
                if closing {
                    let _ = tokio::time::timeout(CLOSE_WAIT, &mut input).await;
                }
                input.abort();
            }
            _ = &mut input => {}
        }
        drop(tx);
    }))
}

fn log_time(q: &Query, key: &str) -> Result<Option<prost_types::Timestamp>> {
    match q.non_empty(key) {
        None | Some("0") => Ok(None),
        Some(v) => time::parse_docker_time(v, &time::now()).map(Some),
    }
}

/// Encodes log entries: an RFC 3339 timestamp before each line when asked, framed unless TTY.
#[derive(Debug)]
pub struct LogEncoder {
    enc: Encoder,
    timestamps: bool,
    // The previous entry was a partial line, so this one continues it (no new timestamp).
    continuing: [bool; 3],
}

impl LogEncoder {
    /// An encoder for a container with or without a TTY.
    pub fn new(tty: bool, timestamps: bool) -> Self {
        Self {
            enc: Encoder { tty },
            timestamps,
            continuing: [false; 3],
        }
    }

    /// One entry as bytes on the wire.
    pub fn encode(&mut self, e: &types::LogEntry) -> Bytes {
        let idx = e.stream as usize % 3;
        let mut line = BytesMut::new();
        if self.timestamps && !self.continuing[idx] {
            let t = e.time.unwrap_or_default();
            line.extend_from_slice(time::rfc3339_fixed(&t).as_bytes());
            line.extend_from_slice(b" ");
        }
        line.extend_from_slice(&e.data);
        self.continuing[idx] = e.partial;
        self.enc.encode(e.stream(), &line)
    }
}

/// `GET /containers/{id}/logs`.
pub async fn logs(
    State(st): State<AppState>,
    Path(id): Path<String>,
    q: Query,
) -> Result<Response, ApiError> {
    let (stdout, stderr) = (q.bool("stdout"), q.bool("stderr"));
    if !stdout && !stderr {
        return Err(
            Error::invalid_argument("Bad parameters: you must choose at least one stream").into(),
        );
    }
    let tail = match q.get("tail").unwrap_or("all") {
        "" | "all" => None,
        n => n.parse::<i64>().ok().filter(|n| *n >= 0),
    };
    let c = get_container(&st, &id).await?;
    let tty = c.config.as_ref().is_some_and(|c| c.tty);
    let req = engine::LogsRequest {
        id: c.id.clone(),
        stdout,
        stderr,
        follow: q.bool("follow"),
        since: log_time(&q, "since")?,
        until: log_time(&q, "until")?,
        tail,
    };
    let s = st
        .backends
        .containers
        .logs(req)
        .await
        .map_err(container_not_found(&id))?;
    let mut enc = LogEncoder::new(tty, q.bool("timestamps"));
    let body = s
        .map_ok(move |batch| {
            let mut buf = BytesMut::new();
            for e in &batch.entries {
                buf.extend_from_slice(&enc.encode(e));
            }
            buf.freeze()
        })
        .try_filter(|b| futures::future::ready(!b.is_empty()))
        .boxed();
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(Encoder { tty }.content_type()),
        )],
        body_from(body),
    )
        .into_response())
}

fn cpu_stats(c: &types::CpuStats) -> ContainerCpuStats {
    let u = c.usage.clone().unwrap_or_default();
    let t = c.throttling.unwrap_or_default();
    ContainerCpuStats {
        cpu_usage: Some(ContainerCpuUsage {
            total_usage: Some(u.total_ns),
            percpu_usage: (!u.per_cpu_ns.is_empty()).then(|| u.per_cpu_ns.clone()),
            usage_in_kernelmode: Some(u.kernel_ns),
            usage_in_usermode: Some(u.user_ns),
        }),
        system_cpu_usage: Some(c.system_usage_ns),
        online_cpus: Some(c.online_cpus),
        throttling_data: Some(ContainerThrottlingData {
            periods: Some(t.periods),
            throttled_periods: Some(t.throttled_periods),
            throttled_time: Some(t.throttled_time_ns),
        }),
    }
}

fn blkio(entries: &[types::BlkioEntry]) -> Option<Vec<ContainerBlkioStatEntry>> {
    (!entries.is_empty()).then(|| {
        entries
            .iter()
            .map(|e| ContainerBlkioStatEntry {
                major: Some(e.major),
                minor: Some(e.minor),
                op: Some(e.op.clone()),
                value: Some(e.value),
            })
            .collect()
    })
}

/// One engine sample → Docker's stats JSON (`precpu_stats` included; cgroup v1 memory fields
/// as the kernel reports them).
pub fn stats_json(s: &engine::ContainerStats) -> ContainerStatsResponse {
    let cg = s.stats.clone().unwrap_or_default();
    let mem = cg.memory.clone().unwrap_or_default();
    let pids = cg.pids.unwrap_or_default();
    let b = cg.blkio.clone().unwrap_or_default();
    let v1 = cg.cgroup_version() != types::CgroupVersion::V2;
    ContainerStatsResponse {
        id: Some(s.id.clone()),
        name: Some(format!("/{}", s.name.trim_start_matches('/'))),
        os_type: None,
        read: Some(time::rfc3339(cg.read.as_ref())),
        preread: Some(time::rfc3339(s.preread.as_ref())),
        cpu_stats: Some(cpu_stats(&cg.cpu.clone().unwrap_or_default())),
        precpu_stats: Some(cpu_stats(&s.precpu.clone().unwrap_or_default())),
        memory_stats: Some(ContainerMemoryStats {
            usage: Some(mem.usage),
            max_usage: v1.then_some(mem.max_usage),
            stats: Some(mem.stats.clone().into_iter().collect()),
            failcnt: v1.then_some(mem.failcnt),
            limit: Some(mem.limit),
            commitbytes: None,
            commitpeakbytes: None,
            privateworkingset: None,
        }),
        networks: (!s.networks.is_empty()).then(|| {
            s.networks
                .iter()
                .map(|(name, n)| {
                    (
                        name.clone(),
                        ContainerNetworkStats {
                            rx_bytes: Some(n.rx_bytes),
                            rx_packets: Some(n.rx_packets),
                            rx_errors: Some(n.rx_errors),
                            rx_dropped: Some(n.rx_dropped),
                            tx_bytes: Some(n.tx_bytes),
                            tx_packets: Some(n.tx_packets),
                            tx_errors: Some(n.tx_errors),
                            tx_dropped: Some(n.tx_dropped),
                            endpoint_id: None,
                            instance_id: None,
                        },
                    )
                })
                .collect()
        }),
        pids_stats: Some(ContainerPidsStats {
            current: Some(pids.current),
            limit: (pids.limit > 0).then_some(pids.limit),
        }),
        blkio_stats: Some(ContainerBlkioStats {
            io_service_bytes_recursive: blkio(&b.io_service_bytes_recursive),
            io_serviced_recursive: blkio(&b.io_serviced_recursive),
            io_queue_recursive: blkio(&b.io_queue_recursive),
            io_service_time_recursive: blkio(&b.io_service_time_recursive),
            io_wait_time_recursive: blkio(&b.io_wait_time_recursive),
            io_merged_recursive: blkio(&b.io_merged_recursive),
            io_time_recursive: blkio(&b.io_time_recursive),
            sectors_recursive: blkio(&b.sectors_recursive),
        }),
        // Windows only in Docker: dockerd answers 0 on Linux (pids_stats has the count).
        num_procs: Some(0),
        storage_stats: Some(Default::default()),
    }
}

/// `GET /containers/{id}/stats?stream=&one-shot=`.
pub async fn stats(
    State(st): State<AppState>,
    Path(id): Path<String>,
    q: Query,
) -> Result<Response, ApiError> {
    let stream = q.bool_or("stream", true);
    let one_shot = q.bool("one-shot") && !stream;
    let s = st
        .backends
        .containers
        .stats(engine::StatsRequest {
            id: id.clone(),
            stream,
            one_shot,
        })
        .await
        .map_err(container_not_found(&id))?;
    let mut s = s.peekable();
    // Surface a failure before the first sample as a proper status.
    if let Some(Err(_)) = std::pin::Pin::new(&mut s).peek().await
        && let Some(Err(err)) = s.next().await
    {
        return Err(container_not_found(&id)(err).into());
    }
    let body = s
        .try_filter_map(|m| async move { Ok(m.stats) })
        .map_ok(|sample| {
            let mut line = serde_json::to_vec(&stats_json(&sample)).unwrap_or_default();
            line.push(b'\n');
            Bytes::from(line)
        });
    let body: crate::backend::Stream<Bytes> = if stream {
        body.boxed()
    } else {
        body.take(1).boxed()
    };
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body_from(body),
    )
        .into_response())
}

/// Unix `st_mode` → Go's `os.FileMode` bits, which `docker cp` decodes.
pub fn go_file_mode(mode: u32) -> u32 {
    const S_IFMT: u32 = 0o170000;
    let mut out = mode & 0o777;
    out |= match mode & S_IFMT {
        0o040000 => 1 << 31,               // ModeDir
        0o120000 => 1 << 27,               // ModeSymlink
        0o010000 => 1 << 25,               // ModeNamedPipe
        0o140000 => 1 << 24,               // ModeSocket
        0o060000 => 1 << 26,               // ModeDevice
        0o020000 => (1 << 26) | (1 << 21), // ModeDevice | ModeCharDevice
        _ => 0,
    };
    if mode & 0o4000 != 0 {
        out |= 1 << 23;
    }
    if mode & 0o2000 != 0 {
        out |= 1 << 22;
    }
    if mode & 0o1000 != 0 {
        out |= 1 << 20;
    }
    out
}

/// The `X-Docker-Container-Path-Stat` header value.
pub fn path_stat_header(s: &engine::ArchiveStatResponse) -> String {
    let v = json!({
        "name": s.name,
        "size": s.size,
        "mode": go_file_mode(s.mode),
        "mtime": time::rfc3339(s.mtime.as_ref()),
        "linkTarget": s.link_target,
    });
    base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&v).unwrap_or_default())
}

fn archive_path(q: &Query) -> Result<String> {
    q.non_empty("path")
        .map(str::to_string)
        .ok_or_else(|| Error::invalid_argument("path cannot be empty"))
}

fn archive_error(id: &str, path: &str) -> impl FnOnce(Error) -> Error + use<> {
    let (id, path) = (id.to_string(), path.to_string());
    move |err| {
        // The engine names a missing container with core's "No such container"; any other
        // NotFound is about the path.
        let about_container = err
            .message()
            .to_ascii_lowercase()
            .starts_with("no such container");
        if err.is(ErrorKind::NotFound) && !about_container {
            Error::not_found(format!("Could not find the file {path} in container {id}"))
        } else {
            container_not_found(&id)(err)
        }
    }
}

/// `HEAD /containers/{id}/archive?path=`.
pub async fn archive_head(
    State(st): State<AppState>,
    Path(id): Path<String>,
    q: Query,
) -> Result<Response, ApiError> {
    let path = archive_path(&q)?;
    let stat = st
        .backends
        .containers
        .archive_stat(engine::ArchiveStatRequest {
            id: id.clone(),
            path: path.clone(),
        })
        .await
        .map_err(archive_error(&id, &path))?;
    let mut resp = StatusCode::OK.into_response();
    if let Ok(v) = HeaderValue::from_str(&path_stat_header(&stat)) {
        resp.headers_mut().insert("x-docker-container-path-stat", v);
    }
    Ok(resp)
}

/// `GET /containers/{id}/archive?path=`: the stat header and a tar of the path.
pub async fn archive_get(
    State(st): State<AppState>,
    Path(id): Path<String>,
    q: Query,
) -> Result<Response, ApiError> {
    let path = archive_path(&q)?;
    let (stat, data) = st
        .backends
        .containers
        .archive_get(engine::ArchiveGetRequest {
            id: id.clone(),
            path: path.clone(),
        })
        .await
        .map_err(archive_error(&id, &path))?;
    let mut resp = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-tar"),
        )],
        body_from(data),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&path_stat_header(&stat)) {
        resp.headers_mut().insert("x-docker-container-path-stat", v);
    }
    Ok(resp)
}

/// Turns a request body into a stream of chunks for an upload call.
pub fn body_chunks(body: Body) -> crate::backend::Input<Bytes> {
    body.into_data_stream()
        .take_while(|r| futures::future::ready(r.is_ok()))
        .filter_map(|r| futures::future::ready(r.ok()))
        .boxed()
}

/// `PUT /containers/{id}/archive?path=`: extracts the tar body into the path.
pub async fn archive_put(
    State(st): State<AppState>,
    Path(id): Path<String>,
    q: Query,
    body: Body,
) -> Result<Response, ApiError> {
    let path = archive_path(&q)?;
    let options = engine::ArchivePutOptions {
        id: id.clone(),
        path: path.clone(),
        no_overwrite_dir_non_dir: q.bool("noOverwriteDirNonDir"),
        copy_uid_gid: q.bool("copyUIDGID"),
    };
    st.backends
        .containers
        .archive_put(options, body_chunks(body))
        .await
        .map_err(archive_error(&id, &path))?;
    Ok(StatusCode::OK.into_response())
}

/// Opens an attach session with `options`: the sender for its input (dropping it ends the
/// session), the engine's output after its `Ready`, and the `Ready` itself.
async fn open_attach(
    st: &AppState,
    id: &str,
    options: engine::AttachOptions,
) -> Result<(
    mpsc::Sender<engine::AttachTaskRequest>,
    crate::backend::Stream<engine::AttachTaskResponse>,
    engine::AttachReady,
)> {
    use engine::attach_task_request::Event as In;
    use engine::attach_task_response::Event as Out;
    let (tx, rx) = mpsc::channel(16);
    tx.send(engine::AttachTaskRequest {
        event: Some(In::Options(options)),
    })
    .await
    .map_err(|_| Error::internal("attach input closed"))?;
    let mut out = st
        .backends
        .containers
        .attach(ReceiverStream::new(rx).boxed())
        .await
        .map_err(container_not_found(id))?;
    match out.try_next().await.map_err(container_not_found(id))? {
        Some(engine::AttachTaskResponse {
            event: Some(Out::Ready(ready)),
        }) => Ok((tx, out, ready)),
        _ => Err(Error::internal("attach ended before it was ready")),
    }
}
