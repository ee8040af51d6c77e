//! `POST /commit`: a container's changes become a new image (`docker commit`).
//!
//! As moby does it: the body is an optional `Config` (none = the container's), the `changes`
//! (Dockerfile instructions) are applied to it, and the result is merged with the container's
//! config (what the body leaves empty comes from the container). The engine makes the layer and
//! berth-images the image.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use berth_core::{Error, Reference, Result};
use berth_proto::berth::engine::v1 as engine;
use berth_proto::berth::types::v1 as types;
use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::errors::container_not_found;
use crate::query::Query;
use crate::{ApiError, AppState, json_response};

/// `POST /commit?container=&repo=&tag=&comment=&author=&pause=&changes=`.
pub async fn commit(
    State(st): State<AppState>,
    q: Query,
    body: Bytes,
) -> Result<Response, ApiError> {
    let user = parse_config(&body)?;
    let reference = repo_tag(q.get("repo").unwrap_or(""), q.get("tag").unwrap_or(""))?;
    let container = q.get("container").unwrap_or("").to_string();
    if container.is_empty() {
        return Err(Error::invalid_argument("invalid container name or ID: value is empty").into());
    }
    let changes: Vec<String> = q
        .all("changes")
        .into_iter()
        .filter(|c| !c.trim().is_empty())
        .map(str::to_string)
        .collect();
    // Without a body or changes the engine records the container's own config; otherwise the
    // config is worked out here from the container's.
    let config = if user.is_none() && changes.is_empty() {
        Vec::new()
    } else {
        let c = st
            .backends
            .containers
            .get(engine::GetContainerRequest {
                id: container.clone(),
                size: false,
            })
            .await
            .map_err(container_not_found(&container))?;
        let own = docker_config(&c);
        let mut cfg = user.unwrap_or_else(|| own.clone());
        berth_builder::config::apply_changes(&mut cfg, &changes)
            .map_err(|e| Error::invalid_argument(e.to_string()))?;
        merge(&mut cfg, &own);
        serde_json::to_vec(&cfg).map_err(|e| Error::internal("encode config").with_source(e))?
    };
    let image_id = st
        .backends
        .containers
        .commit(engine::CommitContainerRequest {
            id: container.clone(),
            reference,
            comment: q.get("comment").unwrap_or("").to_string(),
            author: q.get("author").unwrap_or("").to_string(),
            pause: q.bool_or("pause", true),
            config,
            created_by: String::new(),
            // moby records an unchanged rootfs as an empty layer too.
            empty_layer_when_unchanged: true,
        })
        .await
        .map_err(container_not_found(&container))?;
    Ok(json_response(StatusCode::CREATED, &json!({"Id": image_id})))
}

/// The body: `None` when empty, `null`, or without any `Config` field (moby decodes the body
/// as a create request, whose embedded `Config` stays nil then).
fn parse_config(body: &[u8]) -> Result<Option<Value>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| Error::invalid_argument(format!("invalid JSON: {e}")))?;
    match v {
        Value::Null => Ok(None),
        Value::Object(mut m) => {
            m.remove("HostConfig");
            m.remove("NetworkingConfig");
            Ok((!m.is_empty()).then_some(Value::Object(m)))
        }
        _ => Err(Error::invalid_argument(
            "invalid JSON: the body must be a JSON object (a container Config)",
        )),
    }
}

/// moby's `RepoTagReference`: "" = untagged; a digest is refused; the tag defaults to latest.
fn repo_tag(repo: &str, tag: &str) -> Result<String> {
    if repo.is_empty() {
        return Ok(String::new());
    }
    let full = if tag.is_empty() {
        repo.to_string()
    } else {
        format!("{repo}:{tag}")
    };
    let r =
        Reference::parse(&full).map_err(|e| Error::invalid_argument(e.message().to_string()))?;
    if r.digest().is_some() {
        return Err(Error::invalid_argument("cannot commit to digest reference"));
    }
    Ok(r.to_string())
}

/// The container's config with Docker's field names, as `docker inspect` shows it.
fn docker_config(c: &engine::Container) -> Value {
    let cfg = c.config.clone().unwrap_or_default();
    let list = |l: &Option<types::StringList>| match l {
        Some(l) => json!(l.values),
        None => Value::Null,
    };
    let mut out = Map::new();
    out.insert("Hostname".into(), json!(cfg.hostname));
    out.insert("Domainname".into(), json!(cfg.domainname));
    out.insert("User".into(), json!(cfg.user));
    out.insert("AttachStdin".into(), json!(cfg.attach_stdin));
    out.insert("AttachStdout".into(), json!(cfg.attach_stdout));
    out.insert("AttachStderr".into(), json!(cfg.attach_stderr));
    if !cfg.exposed_ports.is_empty() {
        let ports: Map<String, Value> = cfg
            .exposed_ports
            .iter()
            .map(|p| {
                let proto = match p.protocol() {
                    types::Protocol::Udp => "udp",
                    types::Protocol::Sctp => "sctp",
                    _ => "tcp",
                };
                (format!("{}/{proto}", p.port), json!({}))
            })
            .collect();
        out.insert("ExposedPorts".into(), Value::Object(ports));
    }
    out.insert("Tty".into(), json!(cfg.tty));
    out.insert("OpenStdin".into(), json!(cfg.open_stdin));
    out.insert("StdinOnce".into(), json!(cfg.stdin_once));
    out.insert("Env".into(), json!(cfg.env));
    out.insert("Cmd".into(), list(&cfg.cmd));
    if let Ok(h) = serde_json::from_slice::<Value>(&cfg.healthcheck) {
        out.insert("Healthcheck".into(), h);
    }
    out.insert("Image".into(), json!(c.image));
    out.insert(
        "Volumes".into(),
        if cfg.volumes.is_empty() {
            Value::Null
        } else {
            Value::Object(cfg.volumes.iter().map(|v| (v.clone(), json!({}))).collect())
        },
    );
    out.insert("WorkingDir".into(), json!(cfg.working_dir));
    out.insert("Entrypoint".into(), list(&cfg.entrypoint));
    out.insert(
        "OnBuild".into(),
        if cfg.on_build.is_empty() {
            Value::Null
        } else {
            json!(cfg.on_build)
        },
    );
    out.insert("Labels".into(), json!(cfg.labels));
    if !cfg.stop_signal.is_empty() {
        out.insert("StopSignal".into(), json!(cfg.stop_signal));
    }
    Value::Object(out)
}

fn is_empty(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::Object(o)) => o.is_empty(),
        Some(_) => false,
    }
}

/// moby's `merge(userConf, imageConf)` for commit: what the user's config leaves empty comes
/// from the container's; env, labels, exposed ports and volumes are unions (the user's win).
pub fn merge(user: &mut Value, own: &Value) {
    let Some(u) = user.as_object_mut() else {
        return;
    };
    for key in ["User", "WorkingDir", "StopSignal"] {
        if is_empty(u.get(key)) && !is_empty(own.get(key)) {
            u.insert(key.into(), own[key].clone());
        }
    }
    for key in ["ExposedPorts", "Labels", "Volumes"] {
        let Some(theirs) = own.get(key).and_then(Value::as_object) else {
            continue;
        };
        let mine = u.entry(key).or_insert_with(|| json!({}));
        if !mine.is_object() {
            *mine = json!({});
        }
        let mine = mine.as_object_mut().expect("an object");
        for (k, v) in theirs {
            if key == "Volumes" || !mine.contains_key(k) {
                mine.insert(k.clone(), v.clone());
            }
        }
    }
    let env_key = |e: &Value| {
        e.as_str()
            .map(|s| s.split_once('=').map_or(s, |(k, _)| k).to_string())
    };
    if let Some(theirs) = own.get("Env").and_then(Value::as_array) {
        let mine = u.entry("Env").or_insert_with(|| json!([]));
        if !mine.is_array() {
            *mine = json!([]);
        }
        let mine = mine.as_array_mut().expect("an array");
        for e in theirs {
            let k = env_key(e);
            if !mine.iter().any(|m| env_key(m) == k) {
                mine.push(e.clone());
            }
        }
    }
    if is_empty(u.get("Entrypoint")) {
        if is_empty(u.get("Cmd")) && !is_empty(own.get("Cmd")) {
            u.insert("Cmd".into(), own["Cmd"].clone());
        }
        if matches!(u.get("Entrypoint"), None | Some(Value::Null))
            && !is_empty(own.get("Entrypoint"))
        {
            u.insert("Entrypoint".into(), own["Entrypoint"].clone());
        }
    }
    if let Some(theirs) = own.get("Healthcheck").filter(|h| h.is_object()) {
        match u.get_mut("Healthcheck") {
            Some(Value::Object(mine)) => {
                for (k, v) in theirs.as_object().expect("an object") {
                    if is_empty(mine.get(k)) || mine.get(k) == Some(&json!(0)) {
                        mine.insert(k.clone(), v.clone());
                    }
                }
            }
            _ => {
                u.insert("Healthcheck".into(), theirs.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_users_config_is_completed_from_the_containers() {
        let own = json!({
            "User": "app", "Env": ["PATH=/bin", "A=1"], "Cmd": ["sh"], "Entrypoint": null,
            "Labels": {"x": "1", "y": "2"}, "WorkingDir": "/srv",
            "ExposedPorts": {"80/tcp": {}}, "Volumes": {"/data": {}},
        });
        let mut user = json!({"Cmd": ["cat", "/x"], "Env": ["A=b"], "Labels": {"x": "mine"}});
        merge(&mut user, &own);
        assert_eq!(user["Cmd"], json!(["cat", "/x"]));
        assert_eq!(user["Env"], json!(["A=b", "PATH=/bin"]));
        assert_eq!(user["Labels"], json!({"x": "mine", "y": "2"}));
        assert_eq!(user["User"], "app");
        assert_eq!(user["WorkingDir"], "/srv");
        assert_eq!(user["ExposedPorts"], json!({"80/tcp": {}}));
        assert_eq!(user["Volumes"], json!({"/data": {}}));
        // An entrypoint of the user's keeps its empty cmd.
        let mut user = json!({"Entrypoint": ["/app"]});
        merge(&mut user, &own);
        assert!(user.get("Cmd").is_none());
    }

    #[tokio::test]
    async fn commit_route_and_history_of_the_result() {
        use crate::fake::Fake;
        let f = Fake::default();
        let base = f.add_image("docker.io/library/busybox:latest");
        let ctr = f.add_container("web", engine::ContainerStatus::Running);
        f.state().containers[0].image_id = base.clone();
        // Without a body or changes the engine derives the config itself.
        let r = f
            .request(
                "POST",
                "/commit?container=web&repo=me/app&tag=v1&comment=msg",
                "",
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
        let id = r.json()["Id"].as_str().unwrap().to_string();
        assert!(
            f.state()
                .calls
                .contains(&"commit web docker.io/me/app:v1 true ".to_string())
        );
        let h = f
            .request("GET", "/images/me/app:v1/history", "")
            .await
            .json();
        assert_eq!(h[0]["Id"], id);
        assert_eq!(h[0]["Tags"], json!(["me/app:v1"]));
        assert_eq!(h[0]["Comment"], "msg");
        assert_eq!(h[1]["Id"], base);
        assert_eq!(h[1]["Tags"], json!(["busybox:latest"]));
        assert_eq!(h[2]["Id"], "<missing>");
        // Changes are applied to the container's config, then merged with it.
        let r = f
            .request(
                "POST",
                "/commit?container=web&pause=0&changes=CMD%20%5B%22cat%22%2C%22%2Fx%22%5D&changes=ENV%20A%3Db",
                "",
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
        let call = f.state().calls.last().unwrap().clone();
        let cfg: Value =
            serde_json::from_str(call.strip_prefix("commit web  false ").unwrap()).unwrap();
        assert_eq!(cfg["Cmd"], json!(["cat", "/x"]));
        assert!(cfg["Env"].as_array().unwrap().contains(&json!("A=b")));
        // Bad input.
        let r = f
            .request("POST", "/commit?container=web&changes=RUN%20x", "")
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(
            r.text().contains("run is not a valid change command"),
            "{}",
            r.text()
        );
        let r = f
            .request("POST", "/commit?container=web&repo=Bad", "")
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        let r = f.request("POST", "/commit?container=web", "{nope").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        let r = f.request("POST", "/commit?repo=x", "").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        let r = f.request("POST", "/commit?container=nope", "").await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert!(r.text().contains("No such container: nope"), "{}", r.text());
        let _ = ctr;
    }

    #[test]
    fn bodies_and_references() {
        assert!(parse_config(b"").unwrap().is_none());
        assert!(parse_config(b"null").unwrap().is_none());
        assert!(parse_config(b"{}").unwrap().is_none());
        assert!(parse_config(b"{\"HostConfig\":{}}").unwrap().is_none());
        assert_eq!(
            parse_config(b"{\"Cmd\":[\"x\"]}").unwrap().unwrap()["Cmd"],
            json!(["x"])
        );
        assert!(parse_config(b"{nope").is_err());
        assert!(parse_config(b"[]").is_err());
        assert_eq!(repo_tag("", "x").unwrap(), "");
        assert_eq!(repo_tag("me/app", "").unwrap(), "docker.io/me/app:latest");
        assert_eq!(repo_tag("me/app", "v1").unwrap(), "docker.io/me/app:v1");
        assert!(repo_tag("Bad/Name", "").is_err());
        assert!(repo_tag("me/app", "bad tag").is_err());
    }
}
