//! Route tests for `/containers/...` and `/exec/...` over the fake backends.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use base64::Engine as _;
use berth_proto::berth::engine::v1 as engine;
use berth_proto::berth::types::v1 as types;
use serde_json::json;

use crate::fake::Fake;
use crate::stdcopy;

const RUNNING: engine::ContainerStatus = engine::ContainerStatus::Running;
const EXITED: engine::ContainerStatus = engine::ContainerStatus::Exited;

fn with_image() -> Fake {
    let f = Fake::default();
    f.add_image("docker.io/library/busybox:latest");
    f
}

#[tokio::test]
async fn create_answers_201_and_keeps_the_body() {
    let f = with_image();
    let body =
        json!({"Image": "busybox", "Cmd": ["echo", "hi"], "HostConfig": {"Binds": ["v:/v"]}});
    let r = f
        .request(
            "POST",
            "/v1.45/containers/create?name=web",
            body.to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let id = r.json()["Id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 64);
    assert_eq!(r.json()["Warnings"], json!([]));
    let req = f.state().last_create.clone().unwrap();
    assert_eq!(req.name, "web");
    assert_eq!(req.config.unwrap().cmd.unwrap().values, ["echo", "hi"]);
    assert_eq!(req.extensions["docker"].data, body.to_string().as_bytes());

    // The same name again: Docker's conflict wording with the holder's id.
    let r = f
        .request("POST", "/containers/create?name=web", body.to_string())
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(
        r.message(),
        format!(
            "Conflict. The container name \"/web\" is already in use by container \"{id}\". You have to remove (or rename) that container to be able to reuse that name."
        )
    );
    assert_eq!(r.headers["content-type"], "application/json");
}

#[tokio::test]
async fn create_with_a_missing_image_is_404_no_such_image() {
    let f = with_image();
    let r = f
        .request(
            "POST",
            "/containers/create",
            json!({"Image": "nosuch"}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.message(), "No such image: nosuch:latest");
    let r = f
        .request(
            "POST",
            "/containers/create",
            json!({"Image": "127.0.0.1:5000/x:1"}).to_string(),
        )
        .await;
    assert_eq!(r.message(), "No such image: 127.0.0.1:5000/x:1");
}

#[tokio::test]
async fn create_rejects_bad_input_with_400() {
    let f = with_image();
    for body in [
        "",
        "{bad json",
        r#"{"Image":"busybox","HostConfig":{"Binds":["a"]}}"#,
    ] {
        let r = f.request("POST", "/containers/create", body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.text());
        assert!(!r.message().is_empty());
    }
    let r = f
        .request(
            "POST",
            "/containers/create?name=a%20b",
            r#"{"Image":"busybox"}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.message().starts_with("Invalid container name (a b)"));
}

#[tokio::test]
async fn list_and_inspect() {
    let f = Fake::default();
    let web = f.add_container("web", RUNNING);
    f.add_container("old", EXITED);
    let r = f.request("GET", "/containers/json", "").await;
    assert_eq!(r.status, StatusCode::OK);
    let list = r.json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["Names"], json!(["/web"]));
    let r = f.request("GET", "/containers/json?all=1", "").await;
    assert_eq!(r.json().as_array().unwrap().len(), 2);
    let r = f
        .request(
            "GET",
            "/containers/json?all=1&filters=%7B%22name%22%3A%5B%22ol%22%5D%7D",
            "",
        )
        .await;
    assert_eq!(r.json()[0]["Names"], json!(["/old"]));
    let r = f
        .request("GET", "/containers/json?filters=%7Bbad", "")
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = f.request("GET", "/containers/json?limit=x", "").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    let r = f
        .request("GET", &format!("/containers/{}/json", &web[..8]), "")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["Id"], web);
    assert_eq!(r.json()["NetworkSettings"]["IPAddress"], "172.29.0.2");
    let r = f.request("GET", "/containers/web/json", "").await;
    assert_eq!(r.json()["Name"], "/web");
    let r = f.request("GET", "/containers/nope/json", "").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.message(), "No such container: nope");
}

#[tokio::test]
async fn lifecycle_statuses() {
    let f = Fake::default();
    let id = f.add_container("c", engine::ContainerStatus::Created);
    let r = f.request("POST", "/containers/c/start", "").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = f.request("POST", "/containers/c/start", "").await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    let r = f
        .request("POST", "/containers/c/start", r#"{"Binds":[]}"#)
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = f.request("POST", "/containers/c/pause", "").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = f.request("POST", "/containers/c/unpause", "").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = f
        .request("POST", "/containers/c/stop?t=3&signal=SIGINT", "")
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(
        f.state()
            .calls
            .contains(&"stop c SIGINT Some(3)".to_string())
    );
    let r = f.request("POST", "/containers/c/stop", "").await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    let r = f.request("POST", "/containers/c/kill?signal=HUP", "").await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(
        r.message(),
        format!("Cannot kill container: c: Container {id} is not running")
    );
    let r = f.request("POST", "/containers/c/restart?t=1", "").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = f.request("POST", "/containers/c/kill", "").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = f.request("POST", "/containers/zzz/start", "").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.message(), "No such container: zzz");
}

#[tokio::test]
async fn removing_a_running_container_needs_force() {
    let f = Fake::default();
    let id = f.add_container("busy", RUNNING);
    let r = f.request("DELETE", "/containers/busy", "").await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(
        r.message(),
        format!(
            "You cannot remove a running container {id}. Stop the container before attempting removal or force remove"
        )
    );
    let r = f
        .request("DELETE", "/containers/busy?force=1&v=1", "")
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = f.request("DELETE", "/containers/busy", "").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.message(), "No such container: busy");
}

#[tokio::test]
async fn rename_and_update() {
    let f = Fake::default();
    f.add_container("aa", RUNNING);
    let b = f.add_container("bb", RUNNING);
    let r = f.request("POST", "/containers/aa/rename?name=bb", "").await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert!(
        r.message()
            .contains(&format!("is already in use by container \"{b}\""))
    );
    let r = f.request("POST", "/containers/aa/rename?name=", "").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = f.request("POST", "/containers/aa/rename?name=c", "").await;
    assert_eq!(
        r.status,
        StatusCode::BAD_REQUEST,
        "one-character names are invalid, as in Docker"
    );
    let r = f.request("POST", "/containers/aa/rename?name=cc", "").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = f
        .request(
            "POST",
            "/containers/cc/update",
            r#"{"Memory": 1048576, "CpuShares": 0, "RestartPolicy": {"Name": "always"}}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["Warnings"], json!([]));
    let u = f.state().last_update.clone().unwrap();
    let res = u.resources.unwrap();
    assert_eq!(res.memory, Some(1_048_576));
    assert_eq!(res.cpu_shares, None);
    assert_eq!(
        u.restart_policy.unwrap().name,
        engine::RestartPolicyName::Always as i32
    );
}

#[tokio::test]
async fn wait_sends_headers_before_the_exit() {
    let f = Fake::default();
    f.add_container("w", RUNNING);
    f.state().exit_code = 137;
    let gate = Arc::new(tokio::sync::Notify::new());
    f.state().wait_gate = Some(gate.clone());
    let req = http::Request::builder()
        .method("POST")
        .uri("/v1.45/containers/w/wait?condition=next-exit")
        .body(axum::body::Body::empty())
        .unwrap();
    let resp = tower::ServiceExt::oneshot(crate::versioned(f.app()), req)
        .await
        .unwrap();
    // The response (status and headers) exists while the exit is still pending.
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(f.state().calls.iter().any(|c| c == "wait w 2"));
    gate.notify_one();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v, json!({"StatusCode": 137, "Error": null}));

    f.state().wait_gate = None;
    let r = f
        .request("POST", "/containers/w/wait?condition=bogus", "")
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = f.request("POST", "/containers/nope/wait", "").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

fn entry(stream: types::OutputStream, text: &str, secs: i64, partial: bool) -> types::LogEntry {
    types::LogEntry {
        stream: stream as i32,
        time: Some(prost_types::Timestamp {
            seconds: secs,
            nanos: 1,
        }),
        data: text.as_bytes().to_vec(),
        partial,
        attrs: Default::default(),
    }
}

#[tokio::test]
async fn logs_are_framed_and_timestamped() {
    let f = Fake::default();
    f.add_container("l", RUNNING);
    f.state().logs = vec![
        entry(types::OutputStream::Stdout, "out\n", 1_700_000_000, false),
        entry(types::OutputStream::Stderr, "err\n", 1_700_000_001, false),
        entry(types::OutputStream::Stdout, "part", 1_700_000_002, true),
        entry(types::OutputStream::Stdout, "ial\n", 1_700_000_003, false),
    ];
    let r = f
        .request(
            "GET",
            "/containers/l/logs?stdout=1&stderr=1&timestamps=1&follow=1&since=1700000000.5&tail=10",
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["content-type"], stdcopy::MULTIPLEXED);
    let frames = stdcopy::decode(&r.body);
    assert_eq!(frames[0].0, stdcopy::STDOUT);
    assert_eq!(
        String::from_utf8_lossy(&frames[0].1),
        "2023-11-14T22:13:20.000000001Z out\n"
    );
    assert_eq!(frames[1].0, stdcopy::STDERR);
    assert_eq!(
        String::from_utf8_lossy(&frames[3].1),
        "ial\n",
        "a continued line has no second timestamp"
    );
    let req = f.state().last_logs.clone().unwrap();
    assert!(req.follow);
    assert_eq!(req.tail, Some(10));
    assert_eq!(req.since.unwrap().nanos, 500_000_000);

    let r = f.request("GET", "/containers/l/logs", "").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        r.message(),
        "Bad parameters: you must choose at least one stream"
    );

    // With a TTY the log is raw.
    f.state().containers[0].config.as_mut().unwrap().tty = true;
    let r = f
        .request("GET", "/containers/l/logs?stdout=1&tail=all", "")
        .await;
    assert_eq!(r.headers["content-type"], stdcopy::RAW);
    assert_eq!(r.text(), "out\nerr\npartial\n");
    assert_eq!(f.state().last_logs.clone().unwrap().tail, None);
}

#[tokio::test]
async fn stats_one_shot_and_stream() {
    let f = Fake::default();
    f.add_container("s", RUNNING);
    let r = f.request("GET", "/containers/s/stats?stream=0", "").await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["name"], "/s");
    assert_eq!(v["cpu_stats"]["cpu_usage"]["total_usage"], 2000);
    assert_eq!(
        v["cpu_stats"]["cpu_usage"]["percpu_usage"],
        json!([1000, 1000])
    );
    assert_eq!(v["precpu_stats"]["cpu_usage"]["total_usage"], 1000);
    assert_eq!(v["precpu_stats"]["system_cpu_usage"], 50_000);
    assert_eq!(v["memory_stats"]["usage"], 4096);
    assert_eq!(v["memory_stats"]["max_usage"], 8192);
    assert_eq!(v["memory_stats"]["stats"]["cache"], 1024);
    assert_eq!(v["pids_stats"]["current"], 3);
    let r = f.request("GET", "/containers/s/stats", "").await;
    assert_eq!(r.lines().len(), 3);
    let r = f.request("GET", "/containers/x/stats", "").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn top_changes_export_resize_prune() {
    let f = Fake::default();
    f.add_container("t", RUNNING);
    let stopped = f.add_container("u", EXITED);
    let r = f.request("GET", "/containers/t/top?ps_args=aux", "").await;
    assert_eq!(
        r.json(),
        json!({"Titles": ["PID", "CMD"], "Processes": [["1", "sh aux"]]})
    );
    let r = f.request("GET", "/containers/u/top", "").await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert!(r.message().contains("is not running"), "{}", r.message());
    let r = f.request("GET", "/containers/t/changes", "").await;
    assert_eq!(
        r.json(),
        json!([{"Path": "/tmp/x", "Kind": 1}, {"Path": "/etc", "Kind": 0}])
    );
    let r = f.request("GET", "/containers/t/export", "").await;
    assert_eq!(r.headers["content-type"], "application/x-tar");
    assert_eq!(r.text(), "tar-data");
    let r = f
        .request("POST", "/containers/t/resize?h=24&w=80", "")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(f.state().calls.contains(&"resize 80x24".to_string()));
    let r = f
        .request("POST", "/containers/t/resize?h=-1&w=80", "")
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = f.request("POST", "/containers/prune", "").await;
    assert_eq!(
        r.json(),
        json!({"ContainersDeleted": [stopped], "SpaceReclaimed": 42})
    );
}

#[tokio::test]
async fn archive_stat_get_and_put() {
    let f = Fake::default();
    f.add_container("a", RUNNING);
    let r = f
        .request("HEAD", "/containers/a/archive?path=/etc", "")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let header = r.headers["x-docker-container-path-stat"].to_str().unwrap();
    let stat: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(header)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(stat["name"], "etc");
    assert_eq!(stat["mode"], (1u64 << 31) | 0o755);
    assert_eq!(stat["mtime"], "2023-11-14T22:13:20Z");
    let r = f
        .request("GET", "/containers/a/archive?path=/etc", "")
        .await;
    assert_eq!(r.headers["content-type"], "application/x-tar");
    assert!(r.headers.contains_key("x-docker-container-path-stat"));
    assert_eq!(r.text(), "tar");
    let r = f
        .request(
            "PUT",
            "/containers/a/archive?path=/tmp&noOverwriteDirNonDir=1",
            "TARBYTES",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(f.state().uploads, b"TARBYTES");
    let r = f
        .request("HEAD", "/containers/a/archive?path=/missing", "")
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = f
        .request("GET", "/containers/a/archive?path=/missing", "")
        .await;
    assert_eq!(
        r.message(),
        "Could not find the file /missing in container a"
    );
    let r = f.request("GET", "/containers/a/archive", "").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = f
        .request("GET", "/containers/zz/archive?path=/etc", "")
        .await;
    assert_eq!(r.message(), "No such container: zz");
}

#[tokio::test]
async fn attach_without_upgrade_streams_framed_output() {
    let f = Fake::default();
    f.add_container("a", RUNNING);
    f.state().output = vec![
        types::OutputChunk {
            stream: types::OutputStream::Stdout as i32,
            data: b"hello\n".to_vec(),
        },
        types::OutputChunk {
            stream: types::OutputStream::Stderr as i32,
            data: b"oops\n".to_vec(),
        },
    ];
    let r = f
        .request(
            "POST",
            "/containers/a/attach?stream=1&stdout=1&stderr=1",
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["content-type"], stdcopy::MULTIPLEXED);
    assert_eq!(
        stdcopy::decode(&r.body),
        [(1, b"hello\n".to_vec()), (2, b"oops\n".to_vec())]
    );
    let r = f
        .request("POST", "/containers/nope/attach?stream=1", "")
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.message(), "No such container: nope");
}

#[tokio::test]
async fn exec_create_start_inspect() {
    let f = Fake::default();
    f.add_container("x", RUNNING);
    let stopped = f.add_container("y", EXITED);
    let body = json!({"Cmd": ["sh", "-c", "id"], "Env": ["A=1"], "User": "nobody", "AttachStdout": true, "Tty": true, "ConsoleSize": [24, 80]});
    let r = f
        .request("POST", "/containers/x/exec", body.to_string())
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let exec_id = r.json()["Id"].as_str().unwrap().to_string();
    let req = f.state().last_exec.clone().unwrap();
    assert_eq!(req.user, "nobody");
    assert_eq!(req.env, ["A=1"]);
    assert!(req.tty);
    assert_eq!(req.console_size.unwrap().width, 80);
    let r = f
        .request("POST", "/containers/y/exec", body.to_string())
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.message(), format!("container {stopped} is not running"));
    let r = f
        .request("POST", "/containers/x/exec", r#"{"Cmd": []}"#)
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    let r = f
        .request(
            "POST",
            &format!("/exec/{exec_id}/start"),
            r#"{"Detach": true}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.is_empty());
    f.state().output = vec![types::OutputChunk {
        stream: types::OutputStream::Stdout as i32,
        data: b"uid=65534\n".to_vec(),
    }];
    let r = f
        .request(
            "POST",
            &format!("/exec/{exec_id}/start"),
            r#"{"Detach": false}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(stdcopy::decode(&r.body), [(1, b"uid=65534\n".to_vec())]);
    let r = f
        .request(
            "POST",
            &format!("/exec/{exec_id}/start"),
            r#"{"Tty": true}"#,
        )
        .await;
    assert_eq!(r.headers["content-type"], stdcopy::RAW);
    assert_eq!(r.text(), "uid=65534\n");
    let r = f.request("POST", "/exec/nope/start", "{}").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.message(), "No such exec instance: nope");
    let r = f.request("GET", &format!("/exec/{exec_id}/json"), "").await;
    let v = r.json();
    assert_eq!(v["ExitCode"], 3);
    assert_eq!(v["ProcessConfig"]["entrypoint"], "sh");
    assert_eq!(v["ID"], exec_id);
    let r = f
        .request("POST", &format!("/exec/{exec_id}/resize?h=10&w=20"), "")
        .await;
    assert_eq!(r.status, StatusCode::OK);
}

/// Serves the fake on a real Unix socket, for the tests that need a hijacked connection.
async fn serve(f: &Fake) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("docker.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let svc = crate::versioned(f.app());
    tokio::spawn(async move {
        axum::serve(
            listener,
            axum::ServiceExt::<axum::extract::Request>::into_make_service(svc),
        )
        .await
        .unwrap();
    });
    (dir, sock)
}

async fn raw_request(sock: &std::path::Path, head: &str) -> tokio::net::UnixStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::UnixStream::connect(sock).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

async fn read_until(s: &mut tokio::net::UnixStream, needle: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(needle.len()).any(|w| w == needle) {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("read timed out")
            .unwrap();
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    buf
}

#[tokio::test]
async fn attach_upgrades_and_carries_stdin_both_ways() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = Fake::default();
    f.add_container("a", RUNNING);
    f.state().containers[0].config.as_mut().unwrap().stdin_once = true;
    f.state().output = vec![types::OutputChunk {
        stream: types::OutputStream::Stdout as i32,
        data: b"ready\n".to_vec(),
    }];
    // Like `cat`: the output stays open until stdin is closed, so both directions are live.
    f.state().echo = true;
    let (_dir, sock) = serve(&f).await;
    let mut s = raw_request(
        &sock,
        "POST /v1.45/containers/a/attach?stream=1&stdin=1&stdout=1 HTTP/1.1\r\nHost: docker\r\nConnection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    let head = read_until(&mut s, b"\r\n\r\n").await;
    let head_text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head_text.starts_with("http/1.1 101"), "{head_text}");
    assert!(head_text.contains("content-type: application/vnd.docker.multiplexed-stream"));
    assert!(head_text.contains("upgrade: tcp"));
    let split = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let mut rest = head[split..].to_vec();
    s.write_all(b"input").await.unwrap();
    s.shutdown().await.unwrap();
    s.read_to_end(&mut rest).await.unwrap();
    assert_eq!(
        stdcopy::decode(&rest),
        [(1, b"ready\n".to_vec()), (1, b"input".to_vec())]
    );
    // stdin reached the engine and, with StdinOnce and no TTY, was closed at EOF.
    let ok = crate::fake::wait_until(|| {
        let st = f.state();
        st.stdin == b"input" && st.stdin_closed
    })
    .await;
    assert!(
        ok,
        "stdin {:?} closed {}",
        f.state().stdin,
        f.state().stdin_closed
    );
}

#[tokio::test]
async fn wait_headers_reach_the_client_before_the_exit() {
    let f = Fake::default();
    f.add_container("w", RUNNING);
    f.state().exit_code = 3;
    let gate = Arc::new(tokio::sync::Notify::new());
    f.state().wait_gate = Some(gate.clone());
    let (_dir, sock) = serve(&f).await;
    let mut s = raw_request(
        &sock,
        "POST /v1.45/containers/w/wait?condition=next-exit HTTP/1.1\r\nHost: docker\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    // The status line arrives while the container has not exited.
    let head = read_until(&mut s, b"\r\n\r\n").await;
    assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 200"));
    gate.notify_one();
    let body = read_until(&mut s, b"}\n").await;
    assert!(
        String::from_utf8_lossy(&body).contains(r#"{"Error":null,"StatusCode":3}"#),
        "{}",
        String::from_utf8_lossy(&body)
    );
}
