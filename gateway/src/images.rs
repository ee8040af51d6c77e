//! `/images/...`: pull (`create`), import, list, inspect, history, tag, push, delete, prune, save
//! (`get`) and load.

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use berth_core::{Error, ErrorKind, Reference, Result};
use berth_proto::berth::engine::v1 as engine;
use berth_proto::berth::images::v1 as images;
use berth_proto::berth::types::v1 as types;
use bollard_stubs::models::{
    DriverData, ImageHistoryResponseItem, ImageInspect, ImageInspectMetadata, ImageInspectRootFs,
    ImageSummary,
};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::backend::Stream;
use crate::containers::create::parse_platform;
use crate::errors::no_such;
use crate::query::Query;
use crate::{ApiError, ApiVersion, AppState, json_response, progress, time, versions};

/// The image routes. Names may contain slashes (`127.0.0.1:5000/a/b:tag`), so everything under
/// `/images/` that is not a fixed route is dispatched on its suffix.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/images/json", get(list))
        .route("/images/create", post(create))
        .route("/images/load", post(load))
        .route("/images/prune", post(prune))
        .route("/images/get", get(save_many))
        .route(
            "/images/{*rest}",
            get(dispatch).post(dispatch).delete(dispatch),
        )
        .route("/distribution/{*rest}", get(distribution))
}

/// `GET /distribution/{name}/json`: what the registry holds for `name`, without pulling.
async fn distribution(
    State(st): State<AppState>,
    method: Method,
    Path(rest): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let rest = rest.trim_start_matches('/');
    let Some(name) = rest.strip_suffix("/json") else {
        return Err(crate::not_routed(&method, &format!("/distribution/{rest}")));
    };
    let hex = name.strip_prefix("sha256:").unwrap_or(name);
    if hex.len() == 64 && hex.bytes().all(|c| c.is_ascii_hexdigit()) {
        // An image id names no repository to ask; dockerd answers this 500.
        return Err(Error::internal("no manifest found for full image ID").into());
    }
    let reference = Reference::parse(name)?;
    // As dockerd, credentials that do not decode are ignored rather than refused.
    let auth = registry_auth(&headers).unwrap_or_default();
    let d = st
        .backends
        .images
        .inspect_distribution(images::InspectDistributionRequest {
            reference: reference.to_string(),
            auth,
        })
        .await
        .map_err(pull_error)?;
    Ok(json_response(StatusCode::OK, &distribution_json(&d)))
}

/// Docker's `DistributionInspect`: an OCI descriptor and OCI platforms.
pub fn distribution_json(d: &images::InspectDistributionResponse) -> Value {
    let desc = d.descriptor.clone().unwrap_or_default();
    let platforms: Vec<Value> = d
        .platforms
        .iter()
        .map(|p| {
            let mut v = json!({"architecture": p.architecture, "os": p.os});
            if !p.os_version.is_empty() {
                v["os.version"] = json!(p.os_version);
            }
            if !p.os_features.is_empty() {
                v["os.features"] = json!(p.os_features);
            }
            if !p.variant.is_empty() {
                v["variant"] = json!(p.variant);
            }
            v
        })
        .collect();
    json!({
        "Descriptor": {"mediaType": desc.media_type, "digest": desc.digest, "size": desc.size},
        "Platforms": platforms,
    })
}

async fn dispatch(
    State(st): State<AppState>,
    version: ApiVersion,
    method: Method,
    Path(rest): Path<String>,
    q: Query,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let rest = rest.trim_start_matches('/');
    match method {
        Method::GET => {
            if let Some(name) = rest.strip_suffix("/json") {
                inspect(&st, name, version).await
            } else if let Some(name) = rest.strip_suffix("/history") {
                history(&st, name).await
            } else if let Some(name) = rest.strip_suffix("/get") {
                save(&st, vec![name.to_string()]).await
            } else if rest == "search" {
                search(&st, &q, &headers).await
            } else {
                Err(not_routed(&method, rest))
            }
        }
        Method::POST => {
            if let Some(name) = rest.strip_suffix("/push") {
                push(&st, name, &q, &headers).await
            } else if let Some(name) = rest.strip_suffix("/tag") {
                tag(&st, name, &q).await
            } else {
                Err(not_routed(&method, rest))
            }
        }
        Method::DELETE => remove(&st, rest, &q).await,
        _ => Err(not_routed(&method, rest)),
    }
}

fn not_routed(method: &Method, rest: &str) -> ApiError {
    crate::not_routed(method, &format!("/images/{rest}"))
}

/// `GET /images/search?term=&limit=&filters=`: the registry's search, filtered as dockerd
/// filters it (`is-official`, `stars`; `is-automated=true` matches nothing since Docker Hub
/// deprecated the field).
async fn search(st: &AppState, q: &Query, headers: &HeaderMap) -> Result<Response, ApiError> {
    let limit = match q.non_empty("limit") {
        None => 0,
        Some(l) => l
            .parse::<u32>()
            .map_err(|e| Error::invalid_argument("invalid limit specified").with_source(e))?,
    };
    let filters = q.filters()?;
    let mut official = None;
    let mut min_stars = 0i64;
    for f in &filters {
        match f.key.as_str() {
            "is-automated" if parse_filter_bool(f)? => {
                return Ok(json_response(StatusCode::OK, &json!([])));
            }
            "is-automated" => {}
            "is-official" => official = Some(parse_filter_bool(f)?),
            "stars" => {
                let stars: i64 = f.value.parse().map_err(|e| {
                    Error::invalid_argument(format!("invalid filter 'stars={}'", f.value))
                        .with_source(e)
                })?;
                min_stars = min_stars.max(stars);
            }
            other => {
                return Err(Error::invalid_argument(format!("invalid filter '{other}'")).into());
            }
        }
    }
    // For a search, credentials are optional and ones that do not decode are ignored.
    let auth = registry_auth(headers).ok().flatten();
    let results = st
        .backends
        .system
        .search(q.get("term").unwrap_or("").to_string(), limit, auth)
        .await?;
    let results: Vec<_> = results
        .into_iter()
        .filter(|r| official.is_none_or(|o| r.is_official == o) && r.star_count >= min_stars)
        .map(|mut r| {
            r.is_automated = false;
            r
        })
        .collect();
    Ok(json_response(StatusCode::OK, &results))
}

fn parse_filter_bool(f: &types::Filter) -> Result<bool> {
    match f.value.to_ascii_lowercase().as_str() {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(Error::invalid_argument(format!(
            "invalid filter '{}={}'",
            f.key, f.value
        ))),
    }
}

/// A fully qualified reference as Docker prints it (`busybox:latest`).
pub fn familiar(reference: &str) -> String {
    Reference::parse(reference)
        .map(|r| r.familiar())
        .unwrap_or_else(|_| reference.to_string())
}

/// Docker's `X-Registry-Auth`/`AuthConfig` JSON.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct AuthConfig {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    auth: String,
    #[serde(default)]
    email: String,
    #[serde(default, rename = "serveraddress")]
    server_address: String,
    #[serde(default, rename = "identitytoken")]
    identity_token: String,
    #[serde(default, rename = "registrytoken")]
    registry_token: String,
}

impl AuthConfig {
    pub(crate) fn into_proto(self) -> types::RegistryAuth {
        let (mut username, mut password) = (self.username, self.password);
        if username.is_empty()
            && !self.auth.is_empty()
            && let Some(decoded) = decode_b64(self.auth.as_bytes())
        {
            let text = String::from_utf8_lossy(&decoded).into_owned();
            if let Some((u, p)) = text.split_once(':') {
                username = u.to_string();
                password = p.to_string();
            }
        }
        types::RegistryAuth {
            username,
            password,
            identity_token: self.identity_token,
            registry_token: self.registry_token,
            server_address: self.server_address,
            email: self.email,
        }
    }
}

pub(crate) fn decode_b64(data: &[u8]) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let data: Vec<u8> = data
        .iter()
        .copied()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    [URL_SAFE, URL_SAFE_NO_PAD, STANDARD, STANDARD_NO_PAD]
        .iter()
        .find_map(|e| e.decode(&data).ok())
}

/// Decodes `X-Registry-Auth` (base64url JSON); absent or `{}` is anonymous.
pub fn registry_auth(headers: &HeaderMap) -> Result<Option<types::RegistryAuth>> {
    let Some(value) = headers.get("x-registry-auth") else {
        return Ok(None);
    };
    let raw = value.as_bytes();
    if raw.is_empty() {
        return Ok(None);
    }
    let bad = || Error::invalid_argument("invalid X-Registry-Auth header");
    let json = decode_b64(raw).ok_or_else(bad)?;
    let cfg: AuthConfig = serde_json::from_slice(&json).map_err(|_| bad())?;
    let auth = cfg.into_proto();
    Ok((auth != types::RegistryAuth::default()).then_some(auth))
}

/// A JSON-lines response from a stream of messages.
fn json_stream(s: Stream<Bytes>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        Body::from_stream(s.map_err(|e| std::io::Error::other(e.chain()))),
    )
        .into_response()
}

/// Waits for the first message of `s`: a failure before any output becomes the HTTP status
/// (as Docker does until it has written something), later ones an error line.
async fn first_or_error<T: Send + 'static>(mut s: Stream<T>) -> Result<(Option<T>, Stream<T>)> {
    match s.try_next().await {
        Ok(first) => Ok((first, s)),
        Err(err) => Err(err),
    }
}

/// Registry auth failures of a pull or push. Docker answers them with a 500 (or 404 for a denied
/// repository), never a 401: on a 401 the CLI would start an interactive login prompt.
fn registry_error(err: Error) -> Error {
    if err.is(ErrorKind::Unauthenticated) || err.is(ErrorKind::PermissionDenied) {
        Error::internal(err.chain())
    } else {
        err
    }
}

/// A pull's failure before any output, from the images service. Besides [`registry_error`]'s
/// mapping, a registry berth cannot reach is dockerd's 500 with the cause, not a 503 (which
/// would say the daemon itself is unavailable). The images service's own unavailability
/// surfaces on the call itself, before this.
fn pull_error(err: Error) -> Error {
    if err.is(ErrorKind::Unavailable) {
        Error::internal(err.chain())
    } else {
        registry_error(err)
    }
}

fn pull_reference(from_image: &str, tag: &str) -> Result<String> {
    if from_image.is_empty() {
        return Err(Error::invalid_argument("fromImage or fromSrc is required"));
    }
    let r = if tag.is_empty() {
        from_image.to_string()
    } else if tag.contains(':') {
        // A digest given as the tag.
        format!(
            "{}@{tag}",
            from_image.split('@').next().unwrap_or(from_image)
        )
    } else {
        format!("{from_image}:{tag}")
    };
    Reference::parse(&r).map(|r| r.to_string())
}

/// One pull progress message → Docker's JSON line.
pub fn pull_message(m: &images::PullResponse) -> Option<Vec<Value>> {
    use images::PullLayerPhase as P;
    use images::pull_response::Event;
    Some(match m.event.as_ref()? {
        Event::Started(s) => vec![progress::status(
            &format!("Pulling from {}", s.repository),
            Some(&s.tag_or_digest),
        )],
        Event::Layer(l) => {
            let id = progress::short_digest(&l.digest);
            let (word, with_progress) = match l.phase() {
                P::Unspecified => return None,
                P::PullingFsLayer => ("Pulling fs layer".to_string(), false),
                P::Waiting => ("Waiting".to_string(), false),
                P::Downloading => ("Downloading".to_string(), true),
                P::VerifyingChecksum => ("Verifying Checksum".to_string(), false),
                P::DownloadComplete => ("Download complete".to_string(), false),
                P::Extracting => ("Extracting".to_string(), true),
                P::PullComplete => ("Pull complete".to_string(), false),
                P::AlreadyExists => ("Already exists".to_string(), false),
                P::Retrying => (format!("Retrying in {} seconds", l.retry_in_seconds), false),
            };
            let (cur, tot) = if with_progress {
                (l.current, l.total)
            } else {
                (0, 0)
            };
            vec![progress::layer(&word, &id, cur, tot)]
        }
        Event::Done(d) => {
            let name = familiar(&d.reference);
            let mut out = Vec::new();
            if !d.digest.is_empty() {
                out.push(progress::status(&format!("Digest: {}", d.digest), None));
            }
            out.push(progress::status(
                &if d.updated {
                    format!("Status: Downloaded newer image for {name}")
                } else {
                    format!("Status: Image is up to date for {name}")
                },
                None,
            ));
            out
        }
    })
}

fn encode_all<T: Send + 'static>(
    first: Option<T>,
    rest: Stream<T>,
    render: fn(&T) -> Option<Vec<Value>>,
) -> Stream<Bytes> {
    futures::stream::iter(first.map(Ok))
        .chain(rest)
        .map(move |item| match item {
            Ok(m) => {
                let mut buf = Vec::new();
                for v in render(&m).unwrap_or_default() {
                    buf.extend_from_slice(&progress::line(&v));
                }
                Ok(Bytes::from(buf))
            }
            Err(e) => Ok(progress::line(&progress::error(&e.chain()))),
        })
        .try_filter(|b| futures::future::ready(!b.is_empty()))
        .boxed()
}

async fn create(
    State(st): State<AppState>,
    q: Query,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if let Some(src) = q.non_empty("fromSrc") {
        return import(&st, src, &q, body).await;
    }
    let reference = pull_reference(q.get("fromImage").unwrap_or(""), q.get("tag").unwrap_or(""))?;
    let req = images::PullRequest {
        reference: reference.clone(),
        platform: parse_platform(q.get("platform").unwrap_or(""))?,
        auth: registry_auth(&headers)?,
        ..Default::default()
    };
    let s = st.backends.images.pull(req).await.map_err(registry_error)?;
    // Docker resolves the manifest before it writes anything, so "not found" and "unauthorized"
    // are statuses; hold the "Pulling from" line until the pull got past that point.
    let (first, mut rest) = first_or_error(s).await.map_err(pull_error)?;
    let mut head = Vec::new();
    if let Some(first) = first {
        let started = matches!(first.event, Some(images::pull_response::Event::Started(_)));
        head.push(first);
        if started && let Some(next) = rest.try_next().await.map_err(pull_error)? {
            head.push(next);
        }
    }
    let rest = futures::stream::iter(head.into_iter().map(Ok))
        .chain(rest)
        .boxed();
    Ok(json_stream(encode_all(None, rest, pull_message)))
}

async fn import(st: &AppState, src: &str, q: &Query, body: Body) -> Result<Response, ApiError> {
    if src != "-" {
        return Err(Error::unimplemented(
            "importing from a URL is not supported by berth; send the archive in the request body (fromSrc=-)",
        )
        .into());
    }
    let repo = q.get("repo").unwrap_or("");
    let tag = q.get("tag").unwrap_or("");
    let reference = match (repo, tag) {
        ("", _) => String::new(),
        (r, "") => Reference::parse(r)?.to_string(),
        (r, t) => Reference::parse(&format!("{r}:{t}"))?.to_string(),
    };
    let options = images::ImportRootfsOptions {
        reference,
        changes: q.all("changes").into_iter().map(str::to_string).collect(),
        message: q.get("message").unwrap_or("").to_string(),
        platform: parse_platform(q.get("platform").unwrap_or(""))?,
        snapshotter: String::new(),
    };
    let resp = st
        .backends
        .images
        .import_rootfs(options, crate::containers::body_chunks(body))
        .await?;
    let line = progress::line(&progress::status(&resp.image_id, None));
    Ok(json_stream(futures::stream::iter([Ok(line)]).boxed()))
}

/// An image as `GET /images/json` lists it.
pub fn summary(i: &images::Image, containers: i64) -> ImageSummary {
    ImageSummary {
        id: i.id.clone(),
        parent_id: i.parent.clone(),
        repo_tags: i.repo_tags.iter().map(|r| familiar(r)).collect(),
        repo_digests: i.repo_digests.iter().map(|r| familiar(r)).collect(),
        created: i.created.as_ref().map_or(0, |t| t.seconds),
        size: i.size,
        shared_size: -1,
        labels: i.labels.clone(),
        containers,
        manifests: None,
        descriptor: None,
    }
}

async fn list(
    State(st): State<AppState>,
    version: ApiVersion,
    q: Query,
) -> Result<Response, ApiError> {
    let list = st
        .backends
        .images
        .list(images::ListImagesRequest {
            filters: q.filters()?,
            all: q.bool("all"),
        })
        .await?;
    let out: Vec<Value> = list
        .iter()
        .map(|i| {
            let mut v = serde_json::to_value(summary(i, -1)).unwrap_or_default();
            versions::image_summary(version, &mut v, true);
            v
        })
        .collect();
    Ok(json_response(StatusCode::OK, &out))
}

/// `GET /images/{name}/json`, as a request at `version` sees it.
pub fn inspect_json(i: &images::Image, version: ApiVersion) -> Value {
    let cfg: Value = serde_json::from_slice(&i.config).unwrap_or(Value::Null);
    let resp = ImageInspect {
        id: Some(i.id.clone()),
        repo_tags: Some(i.repo_tags.iter().map(|r| familiar(r)).collect()),
        repo_digests: Some(i.repo_digests.iter().map(|r| familiar(r)).collect()),
        comment: Some(i.comment.clone()),
        created: (!time::is_zero(i.created.as_ref())).then(|| time::rfc3339(i.created.as_ref())),
        author: Some(i.author.clone()),
        architecture: Some(i.architecture.clone()),
        variant: (!i.variant.is_empty()).then(|| i.variant.clone()),
        os: Some(i.os.clone()),
        os_version: (!i.os_version.is_empty()).then(|| i.os_version.clone()),
        size: Some(i.size),
        graph_driver: Some(DriverData {
            // A view of layers shifted for user namespaces is still that snapshotter.
            name: i
                .unpacked_in
                .first()
                .and_then(|n| n.split(berth_core::userns::SNAPSHOT_KEY_MARK).next())
                .unwrap_or_default()
                .to_string(),
            data: Default::default(),
        }),
        root_fs: Some(ImageInspectRootFs {
            typ: "layers".into(),
            layers: Some(i.diff_ids.clone()),
        }),
        metadata: Some(ImageInspectMetadata {
            last_tag_time: (!time::is_zero(i.last_tag_time.as_ref()))
                .then(|| time::rfc3339(i.last_tag_time.as_ref())),
        }),
        ..Default::default()
    };
    let mut v = serde_json::to_value(resp).unwrap_or_default();
    v["Parent"] = json!(i.parent);
    v["DockerVersion"] = json!(i.docker_version);
    v["Config"] = cfg.get("config").cloned().unwrap_or(json!({}));
    versions::image_inspect(version, &mut v, &cfg);
    v
}

/// How Docker names a missing image: an id as given, a reference in its familiar form with
/// the default tag (`No such image: busybox:latest`).
pub fn image_display(name: &str) -> String {
    let bare = name.trim_start_matches("sha256:");
    if name.starts_with("sha256:")
        || (!bare.is_empty() && bare.len() >= 12 && bare.bytes().all(|c| c.is_ascii_hexdigit()))
    {
        return name.to_string();
    }
    familiar(
        &Reference::parse(name)
            .map(|r| r.to_string())
            .unwrap_or_else(|_| name.to_string()),
    )
}

async fn get_image(st: &AppState, name: &str) -> Result<images::Image> {
    st.backends
        .images
        .get(images::GetImageRequest {
            reference: name.to_string(),
            platform: None,
        })
        .await
        .map_err(no_such("image", &image_display(name)))
}

async fn inspect(st: &AppState, name: &str, version: ApiVersion) -> Result<Response, ApiError> {
    let i = get_image(st, name).await?;
    Ok(json_response(StatusCode::OK, &inspect_json(&i, version)))
}

/// `GET /images/{name}/history`, newest first. As moby does it: the rows from the top carry the
/// ids (and tags) of the image, its parent, the parent's parent... for as long as that chain
/// of local images goes (images made by commit and build have parents; pulled ones do not),
/// the others `<missing>`.
pub fn history_json(chain: &[images::Image]) -> Vec<ImageHistoryResponseItem> {
    let Some(i) = chain.first() else {
        return Vec::new();
    };
    i.history
        .iter()
        .rev()
        .enumerate()
        .map(|(n, h)| {
            let (id, tags) = match chain.get(n) {
                Some(img) => (
                    img.id.clone(),
                    img.repo_tags.iter().map(|r| familiar(r)).collect(),
                ),
                None => ("<missing>".to_string(), Vec::new()),
            };
            ImageHistoryResponseItem {
                id,
                created: h.created.as_ref().map_or(0, |t| t.seconds),
                created_by: h.created_by.clone(),
                tags,
                size: h.size,
                comment: h.comment.clone(),
            }
        })
        .collect()
}

async fn history(st: &AppState, name: &str) -> Result<Response, ApiError> {
    let mut chain = vec![get_image(st, name).await?];
    loop {
        let parent = chain.last().map(|i| i.parent.clone()).unwrap_or_default();
        if parent.is_empty() || chain.len() >= chain[0].history.len() {
            break;
        }
        // A parent deleted since is where the known ids end.
        match st
            .backends
            .images
            .get(images::GetImageRequest {
                reference: parent,
                platform: None,
            })
            .await
        {
            Ok(p) => chain.push(p),
            Err(_) => break,
        }
    }
    Ok(json_response(StatusCode::OK, &history_json(&chain)))
}

async fn tag(st: &AppState, name: &str, q: &Query) -> Result<Response, ApiError> {
    let repo = q.get("repo").unwrap_or("");
    if repo.is_empty() {
        return Err(
            Error::invalid_argument("repository name must have at least one component").into(),
        );
    }
    let tag = q.get("tag").unwrap_or("");
    let target = if tag.is_empty() {
        repo.to_string()
    } else {
        format!("{repo}:{tag}")
    };
    let target = Reference::parse(&target)?;
    if target.digest().is_some() {
        return Err(
            Error::invalid_argument("refusing to create a tag with a digest reference").into(),
        );
    }
    st.backends
        .images
        .tag(images::TagImageRequest {
            source: name.to_string(),
            target: target.to_string(),
        })
        .await
        .map_err(no_such("image", &image_display(name)))?;
    Ok(StatusCode::CREATED.into_response())
}

/// One push progress message → Docker's JSON lines.
pub fn push_message(m: &images::PushResponse) -> Option<Vec<Value>> {
    use images::PushLayerPhase as P;
    use images::push_response::Event;
    Some(match m.event.as_ref()? {
        Event::Started(s) => vec![progress::status(
            &format!("The push refers to repository [{}]", s.name),
            None,
        )],
        Event::Layer(l) => {
            let id = progress::short_digest(if l.diff_id.is_empty() {
                &l.digest
            } else {
                &l.diff_id
            });
            let (word, with_progress) = match l.phase() {
                P::Unspecified => return None,
                P::Preparing => ("Preparing".to_string(), false),
                P::Waiting => ("Waiting".to_string(), false),
                P::Pushing => ("Pushing".to_string(), true),
                P::Pushed => ("Pushed".to_string(), false),
                P::AlreadyExists => ("Layer already exists".to_string(), false),
                P::Mounted => (format!("Mounted from {}", l.mounted_from), false),
                P::Retrying => (format!("Retrying in {} seconds", l.retry_in_seconds), false),
            };
            let (cur, tot) = if with_progress {
                (l.current, l.total)
            } else {
                (0, 0)
            };
            vec![progress::layer(&word, &id, cur, tot)]
        }
        Event::TagDone(t) => vec![
            progress::status(
                &format!("{}: digest: {} size: {}", t.tag, t.digest, t.size),
                None,
            ),
            json!({"progressDetail": {}, "aux": {"Tag": t.tag, "Digest": t.digest, "Size": t.size}}),
        ],
    })
}

async fn push(
    st: &AppState,
    name: &str,
    q: &Query,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let tag = q.get("tag").unwrap_or("");
    let all_tags = tag.is_empty()
        && Reference::parse_no_default(name)
            .is_ok_and(|r| r.tag().is_none() && r.digest().is_none());
    let reference = if tag.is_empty() {
        Reference::parse_no_default(name)?.to_string()
    } else {
        Reference::parse(&format!("{name}:{tag}"))?.to_string()
    };
    let req = images::PushRequest {
        reference: reference.clone(),
        auth: registry_auth(headers)?,
        all_tags,
        platform: parse_platform(q.get("platform").unwrap_or(""))?,
    };
    let s = st
        .backends
        .images
        .push(req)
        .await
        .map_err(|e| registry_error(push_not_found(e, &reference)))?;
    let (first, rest) = first_or_error(s)
        .await
        .map_err(|e| registry_error(push_not_found(e, &reference)))?;
    Ok(json_stream(encode_all(first, rest, push_message)))
}

fn push_not_found(err: Error, reference: &str) -> Error {
    if err.is(ErrorKind::NotFound) && !err.message().contains("registry") {
        Error::not_found(format!(
            "An image does not exist locally with the tag: {}",
            Reference::parse_no_default(reference)
                .map(|r| r.familiar_repository())
                .unwrap_or_else(|_| reference.to_string())
        ))
    } else {
        err
    }
}

fn delete_items(items: &[images::ImageDeleteItem]) -> Vec<Value> {
    use images::image_delete_item::Item;
    items
        .iter()
        .filter_map(|i| match i.item.as_ref()? {
            Item::Untagged(r) => Some(json!({"Untagged": familiar(r)})),
            Item::Deleted(d) => Some(json!({"Deleted": d})),
        })
        .collect()
}

fn short_id(id: &str) -> String {
    progress::short_digest(id)
}

async fn remove(st: &AppState, name: &str, q: &Query) -> Result<Response, ApiError> {
    let force = q.bool("force");
    let image = get_image(st, name).await?;
    let bare = name.trim_start_matches("sha256:");
    let by_id = !bare.is_empty()
        && bare.bytes().all(|c| c.is_ascii_hexdigit())
        && image.id.trim_start_matches("sha256:").starts_with(bare);
    let users = st
        .backends
        .containers
        .list(engine::ListContainersRequest {
            filters: vec![types::Filter {
                key: "ancestor".into(),
                value: image.id.clone(),
            }],
            all: true,
            limit: 0,
            size: false,
            summary: true,
        })
        .await
        .unwrap_or_default();
    let users: Vec<_> = users
        .into_iter()
        .filter(|c| c.image_id == image.id)
        .collect();
    let last_reference = by_id || image.repo_tags.len() <= 1;
    if force
        && last_reference
        && let Some(c) = users
            .iter()
            .find(|c| crate::containers::render::is_running(c))
    {
        return Err(Error::failed_precondition(format!(
                "conflict: unable to delete {} (cannot be forced) - image is being used by running container {}",
                short_id(&image.id),
                short_id(&c.id)
            ))
            .into());
    }
    let resp = st
        .backends
        .images
        .delete(images::DeleteImageRequest {
            reference: name.to_string(),
            force,
            noprune: q.bool("noprune"),
            platforms: Vec::new(),
        })
        .await;
    match resp {
        Ok(items) => Ok(json_response(StatusCode::OK, &delete_items(&items))),
        Err(err) if err.is(ErrorKind::FailedPrecondition) && !users.is_empty() => {
            let c = &users[0];
            let state = if crate::containers::render::is_running(c) {
                "running"
            } else {
                "stopped"
            };
            let msg = if by_id {
                format!(
                    "conflict: unable to delete {} (must be forced) - image is being used by {state} container {}",
                    short_id(&image.id),
                    short_id(&c.id)
                )
            } else {
                format!(
                    "conflict: unable to remove repository reference \"{name}\" (must force) - container {} is using its referenced image {}",
                    short_id(&c.id),
                    short_id(&image.id)
                )
            };
            Err(Error::failed_precondition(msg).into())
        }
        Err(err) => Err(no_such("image", &image_display(name))(err).into()),
    }
}

async fn prune(State(st): State<AppState>, q: Query) -> Result<Response, ApiError> {
    let resp = st
        .backends
        .images
        .prune(images::PruneImagesRequest {
            filters: q.filters()?,
        })
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"ImagesDeleted": delete_items(&resp.items), "SpaceReclaimed": resp.space_reclaimed}),
    ))
}

async fn save_many(State(st): State<AppState>, q: Query) -> Result<Response, ApiError> {
    let names: Vec<String> = q.all("names").into_iter().map(str::to_string).collect();
    save(&st, names).await
}

async fn save(st: &AppState, names: Vec<String>) -> Result<Response, ApiError> {
    if names.is_empty() {
        return Err(Error::invalid_argument("no images given to save").into());
    }
    // Docker answers 404 for a missing image before it starts the archive.
    for n in &names {
        get_image(st, n).await?;
    }
    let s = st
        .backends
        .images
        .export(images::ExportImagesRequest {
            references: names,
            format: images::ArchiveFormat::DockerArchive as i32,
            platforms: Vec::new(),
        })
        .await?;
    let (first, rest) = first_or_error(s).await?;
    let data = futures::stream::iter(first.map(Ok)).chain(rest);
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-tar"),
        )],
        Body::from_stream(data.map_err(|e| std::io::Error::other(e.chain()))),
    )
        .into_response())
}

/// The lines `docker load` prints for the loaded images.
pub fn load_lines(resp: &images::ImportImagesResponse) -> Vec<Value> {
    let mut out = Vec::new();
    for i in &resp.images {
        if i.references.is_empty() {
            out.push(progress::stream(&format!(
                "Loaded image ID: {}\n",
                i.image_id
            )));
        }
        for r in &i.references {
            out.push(progress::stream(&format!(
                "Loaded image: {}\n",
                familiar(r)
            )));
        }
    }
    out
}

async fn load(State(st): State<AppState>, q: Query, body: Body) -> Result<Response, ApiError> {
    let _quiet = q.bool("quiet");
    let options = images::ImportOptions {
        format: images::ArchiveFormat::Unspecified as i32,
        platform: parse_platform(q.get("platform").unwrap_or(""))?,
        ..Default::default()
    };
    // Like dockerd, a load that fails (an archive that is not one, a broken layer) still
    // answers 200, with the error as the stream's last line: docker-py raises ImageLoadError
    // from it and the CLI prints it.
    let lines = match st
        .backends
        .images
        .import(options, crate::containers::body_chunks(body))
        .await
    {
        Ok(resp) => load_lines(&resp),
        Err(err) => vec![progress::error(&err.chain())],
    };
    let mut buf = Vec::new();
    for l in lines {
        buf.extend_from_slice(&progress::line(&l));
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        buf,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_references() {
        assert_eq!(
            pull_reference("busybox", "latest").unwrap(),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            pull_reference("127.0.0.1:5000/busybox", "").unwrap(),
            "127.0.0.1:5000/busybox:latest"
        );
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            pull_reference("busybox", &d).unwrap(),
            format!("docker.io/library/busybox@{d}")
        );
        assert!(pull_reference("", "").is_err());
        assert!(pull_reference("Bad", "").is_err());
    }

    #[test]
    fn registry_auth_header_decodes() {
        let json = r#"{"username":"u","password":"p","serveraddress":"127.0.0.1:5000"}"#;
        let mut h = HeaderMap::new();
        h.insert(
            "x-registry-auth",
            base64::engine::general_purpose::URL_SAFE
                .encode(json)
                .parse()
                .unwrap(),
        );
        let a = registry_auth(&h).unwrap().unwrap();
        assert_eq!((a.username.as_str(), a.password.as_str()), ("u", "p"));
        assert_eq!(a.server_address, "127.0.0.1:5000");
        let legacy = r#"{"auth":"dTpw"}"#;
        h.insert(
            "x-registry-auth",
            base64::engine::general_purpose::STANDARD
                .encode(legacy)
                .parse()
                .unwrap(),
        );
        let a = registry_auth(&h).unwrap().unwrap();
        assert_eq!((a.username.as_str(), a.password.as_str()), ("u", "p"));
        h.insert("x-registry-auth", "e30=".parse().unwrap());
        assert!(registry_auth(&h).unwrap().is_none());
        h.insert("x-registry-auth", "!!!".parse().unwrap());
        assert!(registry_auth(&h).is_err());
    }

    use crate::fake::Fake;

    fn auth_header(json: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            "x-registry-auth",
            base64::engine::general_purpose::URL_SAFE
                .encode(json)
                .parse()
                .unwrap(),
        );
        h
    }

    #[tokio::test]
    async fn pull_streams_docker_progress() {
        let f = Fake::default();
        let r = f
            .request_with(
                "POST",
                "/v1.45/images/create?fromImage=busybox&tag=latest",
                auth_header(r#"{"username":"u","password":"p"}"#),
                "",
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.headers["content-type"], "application/json");
        let lines = r.lines();
        assert_eq!(
            lines[0],
            json!({"status": "Pulling from library/busybox", "id": "latest"})
        );
        assert_eq!(
            lines[1],
            json!({"status": "Pulling fs layer", "progressDetail": {}, "id": "dddddddddddd"})
        );
        assert_eq!(lines[2]["status"], "Downloading");
        assert_eq!(
            lines[2]["progressDetail"],
            json!({"current": 50, "total": 100})
        );
        assert!(lines[2]["progress"].as_str().unwrap().contains("50B/100B"));
        assert_eq!(lines[3]["status"], "Pull complete");
        assert_eq!(
            lines[4]["status"],
            format!("Digest: sha256:{}", "e".repeat(64))
        );
        assert_eq!(
            lines[5]["status"],
            "Status: Downloaded newer image for busybox:latest"
        );
        let req = f.state().last_pull.clone().unwrap();
        assert_eq!(req.reference, "docker.io/library/busybox:latest");
        assert_eq!(req.auth.unwrap().username, "u");
    }

    #[tokio::test]
    async fn pull_failures_before_and_after_the_first_line() {
        let f = Fake::default();
        let r = f
            .request("POST", "/images/create?fromImage=missing&tag=latest", "")
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert!(r.message().starts_with("pull access denied for missing"));
        let r = f
            .request("POST", "/images/create?fromImage=flaky", "")
            .await;
        assert_eq!(r.status, StatusCode::OK);
        let last = r.lines().pop().unwrap();
        assert_eq!(last["error"], "registry went away");
        assert_eq!(last["errorDetail"]["message"], "registry went away");
        let r = f.request("POST", "/images/create", "").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn import_from_the_body() {
        let f = Fake::default();
        let r = f
            .request(
                "POST",
                "/images/create?fromSrc=-&repo=imported&tag=v1&changes=CMD%20%5B%22sh%22%5D",
                "ROOTFS",
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.lines(), [json!({"status": "sha256:9"})]);
        assert_eq!(f.state().uploads, b"ROOTFS");
        assert!(
            f.state().calls.contains(
                &"import_rootfs docker.io/library/imported:v1 [\"CMD [\\\"sh\\\"]\"]".to_string()
            ),
            "{:?}",
            f.state().calls
        );
        let r = f
            .request("POST", "/images/create?fromSrc=http://x/y.tar", "")
            .await;
        assert_eq!(r.status, StatusCode::NOT_IMPLEMENTED);
    }

    #[tokio::test]
    async fn list_inspect_history_with_registry_names() {
        let f = Fake::default();
        let id = f.add_image("127.0.0.1:5000/team/app:1.0");
        f.add_image("docker.io/library/busybox:latest");
        let r = f.request("GET", "/images/json", "").await;
        let list = r.json();
        assert_eq!(list[0]["RepoTags"], json!(["127.0.0.1:5000/team/app:1.0"]));
        assert_eq!(list[1]["RepoTags"], json!(["busybox:latest"]));
        assert_eq!(list[0]["Size"], 1000);
        let r = f
            .request("GET", "/v1.45/images/127.0.0.1:5000/team/app:1.0/json", "")
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let v = r.json();
        assert_eq!(v["Id"], id);
        assert_eq!(v["Config"]["Cmd"], json!(["sh"]));
        assert_eq!(v["RootFS"]["Type"], "layers");
        assert_eq!(v["Os"], "linux");
        assert!(v.get("ContainerConfig").is_none());
        // Older clients get the fields of their version (docker-compose 1.29 reads these).
        let r = f.request("GET", "/v1.41/images/busybox/json", "").await;
        let v = r.json();
        assert_eq!(v["Container"], "");
        assert_eq!(v["ContainerConfig"]["Image"], "");
        assert_eq!(v["VirtualSize"], 1000);
        let r = f.request("GET", "/v1.43/images/json", "").await;
        assert_eq!(r.json()[0]["VirtualSize"], 1000);
        let r = f.request("GET", "/images/busybox/history", "").await;
        let h = r.json();
        assert_eq!(h[0]["CreatedBy"], "CMD [\"sh\"]");
        assert_eq!(h[0]["Tags"], json!(["busybox:latest"]));
        assert_eq!(h[1]["Id"], "<missing>");
        let r = f.request("GET", "/images/nosuch/json", "").await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(r.message(), "No such image: nosuch:latest");
    }

    #[tokio::test]
    async fn tag_push_and_delete() {
        let f = Fake::default();
        f.add_image("docker.io/library/busybox:latest");
        let r = f
            .request(
                "POST",
                "/images/busybox/tag?repo=127.0.0.1:5000/busybox&tag=v2",
                "",
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
        assert!(
            f.state().images[0]
                .repo_tags
                .contains(&"127.0.0.1:5000/busybox:v2".to_string())
        );
        let r = f.request("POST", "/images/busybox/tag", "").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        let r = f.request("POST", "/images/nosuch/tag?repo=x", "").await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);

        let r = f
            .request_with(
                "POST",
                "/images/127.0.0.1:5000/busybox/push?tag=v2",
                auth_header("{}"),
                "",
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let lines = r.lines();
        assert_eq!(
            lines[0]["status"],
            "The push refers to repository [127.0.0.1:5000/busybox]"
        );
        assert_eq!(lines[1]["status"], "Pushed");
        assert_eq!(lines[1]["id"], "ffffffffffff");
        assert_eq!(lines[2]["status"], "latest: digest: sha256:abc size: 527");
        assert_eq!(
            lines[3]["aux"],
            json!({"Tag": "latest", "Digest": "sha256:abc", "Size": 527})
        );
        let r = f
            .request("POST", "/images/127.0.0.1:5000/other/push?tag=x", "")
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(
            r.message(),
            "An image does not exist locally with the tag: 127.0.0.1:5000/other"
        );

        let r = f.request("DELETE", "/images/busybox", "").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let items = r.json();
        assert_eq!(items[0], json!({"Untagged": "busybox:latest"}));
        assert_eq!(items[1], json!({"Untagged": "127.0.0.1:5000/busybox:v2"}));
        assert!(items[2]["Deleted"].as_str().unwrap().starts_with("sha256:"));
        let r = f.request("DELETE", "/images/busybox", "").await;
        assert_eq!(r.message(), "No such image: busybox:latest");
        assert_eq!(image_display("sha256:abc"), "sha256:abc");
        assert_eq!(image_display("db6952c95d42"), "db6952c95d42");
        assert_eq!(image_display("127.0.0.1:5000/a"), "127.0.0.1:5000/a:latest");
    }

    #[tokio::test]
    async fn delete_refuses_images_of_running_containers() {
        let f = Fake::default();
        let image = f.add_image("docker.io/library/busybox:latest");
        let cid = f.add_container("user", engine::ContainerStatus::Running);
        f.state().containers[0].image_id = image.clone();
        let r = f.request("DELETE", "/images/busybox?force=1", "").await;
        assert_eq!(r.status, StatusCode::CONFLICT);
        assert_eq!(
            r.message(),
            format!(
                "conflict: unable to delete {} (cannot be forced) - image is being used by running container {}",
                &image[7..19],
                &cid[..12]
            )
        );
        f.state().containers[0].state.as_mut().unwrap().status =
            engine::ContainerStatus::Exited as i32;
        let r = f.request("DELETE", "/images/busybox", "").await;
        assert_eq!(r.status, StatusCode::CONFLICT);
        assert!(r.message().contains("(must force)"), "{}", r.message());
        let r = f.request("DELETE", "/images/busybox?force=1", "").await;
        assert_eq!(r.status, StatusCode::OK);
    }

    #[tokio::test]
    async fn search_filters_as_dockerd() {
        let f = Fake::default();
        let r = f
            .request("GET", "/images/search?term=busybox&limit=5", "")
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let v = r.json();
        assert_eq!(v.as_array().unwrap().len(), 2);
        assert_eq!(v[0]["name"], "busybox");
        assert_eq!(v[0]["is_automated"], false);
        assert!(f.state().calls.contains(&"search busybox 5".to_string()));
        let filtered = |filters: &str| {
            let f = f.clone();
            let uri = format!(
                "/images/search?term=busybox&filters={}",
                form_urlencoded::byte_serialize(filters.as_bytes()).collect::<String>()
            );
            async move { f.request("GET", &uri, "").await }
        };
        let r = filtered(r#"{"is-official":["true"]}"#).await;
        assert_eq!(r.json().as_array().unwrap().len(), 1);
        let r = filtered(r#"{"stars":["10"]}"#).await;
        assert_eq!(r.json()[0]["name"], "busybox");
        let r = filtered(r#"{"is-automated":["true"]}"#).await;
        assert_eq!(r.json(), json!([]));
        let r = filtered(r#"{"color":["red"]}"#).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.message(), "invalid filter 'color'");
        let r = filtered(r#"{"stars":["many"]}"#).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        let r = f.request("GET", "/images/search?term=x&limit=-1", "").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn distribution_inspects_without_pulling() {
        let f = Fake::default();
        let r = f
            .request(
                "GET",
                "/v1.45/distribution/127.0.0.1:5000/team/busybox:1/json",
                "",
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(
            r.json(),
            json!({
                "Descriptor": {
                    "mediaType": "application/vnd.oci.image.index.v1+json",
                    "digest": format!("sha256:{}", "d".repeat(64)),
                    "size": 314,
                },
                "Platforms": [{"architecture": "arm64", "os": "linux", "variant": "v8"}],
            })
        );
        assert!(
            f.state()
                .calls
                .contains(&"distribution 127.0.0.1:5000/team/busybox:1".to_string())
        );
        let r = f.request("GET", "/distribution/nosuch/json", "").await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        // An unreachable registry is dockerd's 500 with the cause, not a 503.
        let r = f
            .request("GET", "/distribution/10.0.0.1/unreachable/json", "")
            .await;
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(r.message().contains("cannot connect"), "{}", r.message());
        let r = f.request("GET", "/distribution/Bad/json", "").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        let id = format!("sha256:{}", "e".repeat(64));
        let r = f
            .request("GET", &format!("/distribution/{id}/json"), "")
            .await;
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(r.message(), "no manifest found for full image ID");
    }

    #[tokio::test]
    async fn save_and_load() {
        let f = Fake::default();
        f.add_image("docker.io/library/busybox:latest");
        let r = f.request("GET", "/images/get?names=busybox", "").await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.headers["content-type"], "application/x-tar");
        assert_eq!(r.text(), "archive");
        let r = f.request("GET", "/images/busybox/get", "").await;
        assert_eq!(r.text(), "archive");
        let r = f
            .request("GET", "/images/get?names=busybox&names=nosuch", "")
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        let r = f.request("POST", "/images/load?quiet=1", "TARBALL").await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            r.lines(),
            [
                json!({"stream": "Loaded image: busybox:latest\n"}),
                json!({"stream": "Loaded image ID: sha256:2\n"}),
            ]
        );
        assert_eq!(f.state().uploads, b"TARBALL");
        // A bad archive is still a 200, with the error as the stream's last line.
        let r = f.request("POST", "/images/load", "garbage").await;
        assert_eq!(r.status, StatusCode::OK);
        let lines = r.lines();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["error"], "archive: not a tar archive");
        assert_eq!(
            lines[0]["errorDetail"]["message"],
            "archive: not a tar archive"
        );
        let r = f.request("POST", "/images/prune", "").await;
        assert_eq!(r.json(), json!({"ImagesDeleted": [], "SpaceReclaimed": 0}));
    }
}
