//! Conversions between the CRI's messages and berth's.

use std::collections::HashMap;
use std::net::IpAddr;

use base64::Engine as _;
use berth_core::{Error, ErrorKind, Result};
use berth_proto::berth::images::v1 as images;
use berth_proto::berth::types::v1 as types;
use berth_proto::cri::runtime::v1 as cri;

/// The image a CRI request names; a request without one is malformed.
pub fn image_name(spec: Option<&cri::ImageSpec>) -> Result<&str> {
    match spec.map(|s| s.image.trim()) {
        Some(name) if !name.is_empty() => Ok(name),
        _ => Err(Error::invalid_argument(
            "image spec with an image name is required",
        )),
    }
}

/// A berth image record in the CRI's shape. Tags and digests are already fully qualified
/// (`docker.io/library/busybox:latest`, `…@sha256:…`), which is what kubelet expects.
pub fn image(img: &images::Image) -> cri::Image {
    let (uid, username) = image_user(&img.config);
    cri::Image {
        id: img.id.clone(),
        repo_tags: img.repo_tags.clone(),
        repo_digests: img.repo_digests.clone(),
        // What kubelet's image GC weighs is the space the image takes in the content store,
        // as containerd reports it.
        size: u64::try_from(img.content_size).unwrap_or(0),
        uid: uid.map(|value| cri::Int64Value { value }),
        username,
        // As containerd: no spec (kubelet reads none from a listed image), nothing pinned (berth
        // has no pause image to protect from kubelet's image GC).
        spec: None,
        pinned: false,
    }
}

/// The user an image runs as, from its config's `USER`: a numeric user is a uid, anything else
/// a user name; the group part (`user:group`) does not count. No `USER` is neither.
pub fn image_user(config: &[u8]) -> (Option<i64>, String) {
    #[derive(serde::Deserialize, Default)]
    struct Inner {
        #[serde(rename = "User", default)]
        user: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Outer {
        #[serde(default)]
        config: Option<Inner>,
    }
    let user = serde_json::from_slice::<Outer>(config)
        .ok()
        .and_then(|o| o.config)
        .and_then(|c| c.user)
        .unwrap_or_default();
    let name = user.split(':').next().unwrap_or_default().trim();
    if name.is_empty() {
        return (None, String::new());
    }
    match name.parse::<i64>() {
        Ok(uid) => (Some(uid), String::new()),
        Err(_) => (None, name.to_string()),
    }
}

/// `ImageStatus`'s verbose `info`: the image config and where the image lives, as JSON under
/// `info` (containerd's key).
pub fn image_info(img: &images::Image) -> HashMap<String, String> {
    let spec: serde_json::Value = serde_json::from_slice(&img.config).unwrap_or_default();
    let info = serde_json::json!({
        "imageSpec": spec,
        "chainID": img.chain_id,
        "size": img.size,
        "unpackedIn": img.unpacked_in,
        "target": img.target.as_ref().map(|t| serde_json::json!({
            "mediaType": t.media_type, "digest": t.digest, "size": t.size,
        })),
    });
    HashMap::from([("info".to_string(), info.to_string())])
}

/// The credentials of a pull, from the request's `AuthConfig`: user name and password, or
/// `auth` (base64 of `user:password`, as in a Docker config file), or an identity token (a
/// refresh token exchanged for a bearer token), or a registry token used as is.
pub fn registry_auth(auth: Option<&cri::AuthConfig>) -> Result<Option<types::RegistryAuth>> {
    let Some(a) = auth else {
        return Ok(None);
    };
    let (mut username, mut password) = (a.username.clone(), a.password.clone());
    if !a.auth.is_empty() && username.is_empty() && password.is_empty() {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(a.auth.trim())
            .map_err(|e| Error::invalid_argument("auth: not base64").with_source(e))?;
        let text = String::from_utf8(decoded)
            .map_err(|e| Error::invalid_argument("auth: not utf-8").with_source(e))?;
        let (u, p) = text
            .split_once(':')
            .ok_or_else(|| Error::invalid_argument("auth: not base64 of user:password"))?;
        (username, password) = (u.to_string(), p.to_string());
    }
    let out = types::RegistryAuth {
        username,
        password,
        identity_token: a.identity_token.clone(),
        registry_token: a.registry_token.clone(),
        server_address: a.server_address.clone(),
        email: String::new(),
    };
    Ok((out != types::RegistryAuth::default()).then_some(out))
}

/// Checks a pod CIDR as kubelet sends it: empty, or CIDRs separated by commas (dual stack).
pub fn pod_cidrs(text: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || Error::invalid_argument(format!("pod CIDR {part:?} is not an address/prefix"));
        let (addr, bits) = part.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let bits: u8 = bits.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if bits > max {
            return Err(bad());
        }
        out.push(part.to_string());
    }
    Ok(out)
}

/// `Ok(None)` for a NOT_FOUND answer of a berth service, the value otherwise.
pub fn not_found_is_none<T>(r: std::result::Result<T, tonic::Status>) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(status) => {
            let err = Error::from(status);
            if err.is(ErrorKind::NotFound) {
                Ok(None)
            } else {
                Err(err)
            }
        }
    }
}

/// A request's id field, which the CRI requires: `InvalidArgument` naming `field` when empty.
pub fn required_id<'a>(id: &'a str, field: &str) -> Result<&'a str> {
    if id.is_empty() {
        return Err(Error::invalid_argument(format!("{field} is required")));
    }
    Ok(id)
}

/// Nanoseconds since the epoch of a protobuf timestamp, as the CRI's times are; 0 for none.
pub fn nanos(t: Option<&berth_proto::prost_types::Timestamp>) -> i64 {
    match t {
        Some(t) if t.seconds > 0 => t
            .seconds
            .saturating_mul(1_000_000_000)
            .saturating_add(i64::from(t.nanos)),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_come_from_the_image_config() {
        let cfg = |u: &str| format!(r#"{{"config":{{"User":"{u}"}}}}"#).into_bytes();
        assert_eq!(image_user(&cfg("")), (None, String::new()));
        assert_eq!(image_user(&cfg("1000")), (Some(1000), String::new()));
        assert_eq!(image_user(&cfg("1000:50")), (Some(1000), String::new()));
        assert_eq!(image_user(&cfg("nobody")), (None, "nobody".into()));
        assert_eq!(image_user(&cfg("www-data:www")), (None, "www-data".into()));
        assert_eq!(image_user(br#"{"config":{}}"#), (None, String::new()));
        assert_eq!(image_user(b"not json"), (None, String::new()));
    }

    #[test]
    fn auth_from_each_field() {
        assert_eq!(registry_auth(None).unwrap(), None);
        assert_eq!(
            registry_auth(Some(&cri::AuthConfig::default())).unwrap(),
            None
        );
        let basic = registry_auth(Some(&cri::AuthConfig {
            auth: "dXNlcjpwYTpzcw==".into(), // user:pa:ss
            ..Default::default()
        }))
        .unwrap()
        .unwrap();
        assert_eq!(
            (basic.username.as_str(), basic.password.as_str()),
            ("user", "pa:ss")
        );
        let explicit = registry_auth(Some(&cri::AuthConfig {
            username: "u".into(),
            password: "p".into(),
            auth: "dXNlcjpwYXNz".into(),
            ..Default::default()
        }))
        .unwrap()
        .unwrap();
        assert_eq!(explicit.username, "u", "explicit fields win over auth");
        let token = registry_auth(Some(&cri::AuthConfig {
            registry_token: "tok".into(),
            ..Default::default()
        }))
        .unwrap()
        .unwrap();
        assert_eq!(token.registry_token, "tok");
        let err = registry_auth(Some(&cri::AuthConfig {
            auth: "!!".into(),
            ..Default::default()
        }))
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        let err = registry_auth(Some(&cri::AuthConfig {
            auth: "bm9jb2xvbg==".into(), // nocolon
            ..Default::default()
        }))
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn pod_cidrs_are_checked() {
        assert!(pod_cidrs("").unwrap().is_empty());
        assert_eq!(pod_cidrs("10.88.0.0/16").unwrap(), ["10.88.0.0/16"]);
        assert_eq!(
            pod_cidrs("10.88.0.0/16, fd00::/64").unwrap(),
            ["10.88.0.0/16", "fd00::/64"]
        );
        for bad in ["10.88.0.0", "10.88.0.0/33", "x/8", "fd00::/129"] {
            assert!(pod_cidrs(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn images_in_the_cri_shape() {
        let img = images::Image {
            id: "sha256:abc".into(),
            repo_tags: vec!["docker.io/library/busybox:latest".into()],
            repo_digests: vec!["docker.io/library/busybox@sha256:def".into()],
            size: 4000,
            content_size: 2000,
            config: br#"{"config":{"User":"65534"}}"#.to_vec(),
            ..Default::default()
        };
        let c = image(&img);
        assert_eq!(c.id, "sha256:abc");
        assert_eq!(c.repo_tags, img.repo_tags);
        assert_eq!(c.repo_digests, img.repo_digests);
        assert_eq!(c.size, 2000);
        assert_eq!(c.uid, Some(cri::Int64Value { value: 65534 }));
        let info = image_info(&img);
        let v: serde_json::Value = serde_json::from_str(&info["info"]).unwrap();
        assert_eq!(v["imageSpec"]["config"]["User"], "65534");
    }

    #[test]
    fn a_request_must_name_an_image() {
        assert!(image_name(None).is_err());
        assert!(image_name(Some(&cri::ImageSpec::default())).is_err());
        let spec = cri::ImageSpec {
            image: "busybox".into(),
            ..Default::default()
        };
        assert_eq!(image_name(Some(&spec)).unwrap(), "busybox");
    }
}
