//! Test kit for berth-images: test images built offline, a real registry on loopback (plain,
//! basic auth, https with a test CA), berth-snapshotter + berth-images started on temp dirs, and a
//! gRPC client. Every process started here is stopped by its PID on drop, and every mount under
//! a stack's temp root is undone, even when the test fails.

use std::io::{BufRead, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use berth_core::snapshots::RemoteSnapshotter;
use berth_proto::berth::images::v1 as pb;
use berth_proto::berth::images::v1::images_client::ImagesClient;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sha2::{Digest as _, Sha256};

/// Where the berth binaries are: `$BERTH_BIN_DIR`, else the workspace's `target/debug`.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("BERTH_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build the binaries first (cargo build --workspace --bins) or set BERTH_BIN_DIR",
        path.display()
    );
    path
}

/// `false` (and a note) when this machine cannot run the images tests: they need root (mounts)
/// and the registry tools.
pub fn ready() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return false;
    }
    for p in [
        "docker-registry",
        "skopeo",
        "openssl",
        "python3",
        "htpasswd",
    ] {
        let found = std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|d| d.join(p).is_file()))
            .unwrap_or(false);
        if !found {
            eprintln!("skipped: {p} is not installed");
            return false;
        }
    }
    true
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// Stops a child we started: SIGTERM, then SIGKILL after `grace`.
pub fn stop_child(child: &mut Child, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let pid = Pid::from_raw(child.id() as i32);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(pid, Signal::SIGKILL);
    let _ = child.wait();
}

// -------------------------------------------------------------------------------------------
// Test images

/// The test images of `../shared/testimages/mkimage.py`, built once per test process:
/// `all` (busybox, layered, alpine, hello-world) and `synthetic` (4 layers of 16 MB).
pub fn test_images() -> &'static Path {
    // Statics are never dropped, so the directory is removed by an exit handler instead.
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    extern "C" fn remove_test_images() {
        if let Some(dir) = DIR.get() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("berth-images-")
            .tempdir()
            .expect("temp dir")
            .keep();
        // SAFETY: registers a plain `extern "C"` function without arguments; it only reads a
        // `OnceLock`, which is set by the time the process exits.
        unsafe {
            libc::atexit(remove_test_images);
        }
        let script = crate::stack::mkimage_script();
        for args in [
            vec!["all"],
            vec!["synthetic", "--layers", "4", "--size-mb", "16"],
        ] {
            let out = Command::new("python3")
                .arg(&script)
                .args(&args)
                .arg("--out")
                .arg(&dir)
                .output()
                .expect("run mkimage.py");
            assert!(
                out.status.success(),
                "mkimage.py {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        dir
    })
}

/// The OCI layout of test image `name` (e.g. `busybox`, `layered`, `synthetic`).
pub fn oci_dir(name: &str) -> PathBuf {
    test_images().join(name).join("oci")
}

/// The docker-archive of test image `name`.
pub fn docker_archive(name: &str) -> PathBuf {
    test_images().join(name).join("image.tar")
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Writes a one-image OCI layout at `dir` with the given uncompressed layer tars (gzipped into
/// blobs). Returns the manifest digest.
pub fn write_oci_layout(dir: &Path, layers: &[Vec<u8>]) -> Result<String> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let put = |data: &[u8]| -> Result<String> {
        let d = sha256(data);
        std::fs::write(blobs.join(&d[7..]), data)?;
        Ok(d)
    };
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for l in layers {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(l)?;
        let gz = gz.finish()?;
        diff_ids.push(sha256(l));
        descs.push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": put(&gz)?, "size": gz.len()}));
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "created": "2023-11-14T22:13:20Z",
        "config": {"Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(&config)?, "size": config.len()},
        "layers": descs,
    }))?;
    let md = put(&manifest)?;
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": "latest"}}]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(md)
}

/// A tar whose entries are written with raw names (so hostile ones can be made): `(name,
/// data)` regular files, or `(name, target)` symlinks when the name ends in `@`.
pub fn raw_tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        let (name, link) = match name.strip_suffix('@') {
            Some(n) => (n, true),
            None => (*name, false),
        };
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        if link {
            h.set_entry_type(tar::EntryType::Symlink);
            h.as_old_mut().linkname[..data.len()].copy_from_slice(data);
            h.set_size(0);
            h.set_cksum();
            b.append(&h, std::io::empty()).expect("append");
        } else {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(data.len() as u64);
            h.set_cksum();
            b.append(&h, *data).expect("append");
        }
    }
    b.into_inner().expect("tar")
}

// -------------------------------------------------------------------------------------------
// Certificates

/// A test CA and a server certificate for `::1` and `127.0.0.1`, made with openssl.
#[derive(Debug)]
pub struct Certs {
    pub ca_crt: PathBuf,
    pub server_crt: PathBuf,
    pub server_key: PathBuf,
}

impl Certs {
    pub fn generate(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let run = |args: &[&str]| -> Result<()> {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()?;
            ensure!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=berth test CA",
        ])?;
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ])?;
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=IP:::1,IP:127.0.0.1,DNS:localhost\n",
        )?;
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ])?;
        Ok(Self {
            ca_crt: dir.join("ca.crt"),
            server_crt: dir.join("server.crt"),
            server_key: dir.join("server.key"),
        })
    }
}

// -------------------------------------------------------------------------------------------
// Registry

/// How to start a registry.
#[derive(Debug, Default)]
pub struct RegistryOptions {
    /// Require basic auth with this user and password.
    pub basic_auth: Option<(String, String)>,
    /// Serve https with this certificate and key.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Listen on `[::1]` instead of `127.0.0.1` (outside Docker's default insecure range).
    /// skopeo cannot name such a registry (no IPv6 literals in its references): give it the
    /// storage of a registry on `127.0.0.1` to serve what was pushed there.
    pub ipv6: bool,
    /// Serve this storage directory instead of a new one.
    pub storage: Option<PathBuf>,
    /// Require bearer tokens from this token server (realm, certificate), as Docker Hub does;
    /// `basic_auth` then holds the credentials skopeo pushes with.
    pub token: Option<(String, PathBuf)>,
}

/// A real registry (Debian's docker-registry) on loopback, stopped by PID on drop.
#[derive(Debug)]
pub struct Registry {
    /// `host:port` as references name it.
    pub host: String,
    pub storage: PathBuf,
    log: PathBuf,
    child: Child,
    creds: Option<(String, String)>,
    tls: bool,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn start(opts: RegistryOptions) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("berth-registry-")
            .tempdir()?;
        let port = free_port();
        let host = if opts.ipv6 {
            format!("[::1]:{port}")
        } else {
            format!("127.0.0.1:{port}")
        };
        let storage = opts
            .storage
            .clone()
            .unwrap_or_else(|| dir.path().join("storage"));
        std::fs::create_dir_all(&storage)?;
        let mut cfg = format!(
            "version: 0.1\nlog: {{level: info, accesslog: {{disabled: false}}}}\nstorage: {{filesystem: {{rootdirectory: {}}}, delete: {{enabled: true}}}}\nhttp:\n  addr: \"{host}\"\n",
            storage.display()
        );
        if let Some((crt, key)) = &opts.tls {
            cfg.push_str(&format!(
                "  tls: {{certificate: {}, key: {}}}\n",
                crt.display(),
                key.display()
            ));
        }
        if let Some((realm, cert)) = &opts.token {
            cfg.push_str(&format!(
                "auth: {{token: {{realm: \"{realm}\", service: berth-test-registry, issuer: berth-test-issuer, rootcertbundle: {}}}}}\n",
                cert.display()
            ));
        } else if let Some((user, pass)) = &opts.basic_auth {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, pass])
                .output()?;
            ensure!(out.status.success(), "htpasswd failed");
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, &out.stdout)?;
            cfg.push_str(&format!(
                "auth: {{htpasswd: {{realm: berth-test, path: {}}}}}\n",
                file.display()
            ));
        }
        let config = dir.path().join("config.yml");
        std::fs::write(&config, cfg)?;
        let log = dir.path().join("registry.log");
        let logf = std::fs::File::create(&log)?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .stdin(Stdio::null())
            .spawn()
            .context("start docker-registry")?;
        let mut reg = Self {
            host,
            storage,
            log,
            child,
            creds: opts.basic_auth,
            tls: opts.tls.is_some(),
            _dir: dir,
        };
        let addr: std::net::SocketAddr = if opts.ipv6 {
            format!("[::1]:{port}")
        } else {
            format!("127.0.0.1:{port}")
        }
        .parse()?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            if let Ok(Some(status)) = reg.child.try_wait() {
                bail!("docker-registry exited with {status}: {}", reg.log_text());
            }
            if Instant::now() > deadline {
                bail!("docker-registry did not come up: {}", reg.log_text());
            }
            std::thread::sleep(Duration::from_millis(30));
        }
        Ok(reg)
    }

    /// Everything the registry logged (its access log included).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The access log lines of GET requests for blob `digest`.
    pub fn blob_gets(&self, digest: &str) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/blobs/{digest}")))
            .count()
    }

    /// The file the registry keeps blob `digest` in.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Pushes the OCI layout `oci` (its `latest`) as `repo_tag` with skopeo.
    pub fn push_oci(&self, oci: &Path, repo_tag: &str) -> Result<()> {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--all", "--dest-tls-verify=false"]);
        if let Some((u, p)) = &self.creds {
            cmd.arg(format!("--dest-creds={u}:{p}"));
        }
        cmd.arg(format!("oci:{}:latest", oci.display()));
        cmd.arg(format!("docker://{}/{repo_tag}", self.host));
        let out = cmd.output().context("run skopeo")?;
        ensure!(
            out.status.success(),
            "skopeo copy to {}: {}",
            self.host,
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = self.tls;
        Ok(())
    }

    /// The digest of the manifest `repo_tag` points at, as skopeo sees it.
    pub fn manifest_digest(&self, repo_tag: &str) -> Result<String> {
        let mut cmd = Command::new("skopeo");
        cmd.args(["inspect", "--tls-verify=false", "--raw"]);
        if let Some((u, p)) = &self.creds {
            cmd.arg(format!("--creds={u}:{p}"));
        }
        cmd.arg(format!("docker://{}/{repo_tag}", self.host));
        let out = cmd.output()?;
        ensure!(
            out.status.success(),
            "skopeo inspect: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(sha256(&out.stdout))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(3));
    }
}

// -------------------------------------------------------------------------------------------
// berth-snapshotter + berth-images

/// berth-snapshotter and berth-images on a temp root, stopped on drop.
#[derive(Debug)]
pub struct ImagesStack {
    pub root: PathBuf,
    pub state: PathBuf,
    pub config: PathBuf,
    snapshotter: Option<Child>,
    images: Option<Child>,
    dir: Option<tempfile::TempDir>,
}

impl ImagesStack {
    /// Starts both daemons; `extra_toml` is appended to the generated config (e.g. an
    /// `[images]` section).
    pub fn start(extra_toml: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("berth-istack-")
            .tempdir_in("/var/tmp")?;
        let root = dir.path().join("root");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&root)?;
        std::fs::create_dir_all(&state)?;
        let config = dir.path().join("berth.toml");
        std::fs::write(
            &config,
            format!(
                "root = \"{}\"\nstate_dir = \"{}\"\n[telemetry]\nlog_level = \"info\"\n{extra_toml}\n",
                root.display(),
                state.display()
            ),
        )?;
        let mut s = Self {
            root,
            state,
            config,
            snapshotter: None,
            images: None,
            dir: Some(dir),
        };
        s.snapshotter = Some(s.spawn("berth-snapshotter", "snapshotter.sock")?);
        s.start_images()?;
        Ok(s)
    }

    fn spawn(&self, name: &str, socket: &str) -> Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state.join(format!("{name}.log")))?;
        let mut child = Command::new(bin(name))
            .arg("--config")
            .arg(&self.config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        let sock = self.state.join(socket);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            if let Ok(Some(st)) = child.try_wait() {
                bail!("{name} exited with {st}: {}", self.log(name));
            }
            if Instant::now() > deadline {
                stop_child(&mut child, Duration::from_secs(1));
                bail!("{name} did not start: {}", self.log(name));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(child)
    }

    /// (Re)starts berth-images.
    pub fn start_images(&mut self) -> Result<()> {
        self.images = Some(self.spawn("berth-images", "images.sock")?);
        Ok(())
    }

    /// `kill -9` of berth-images.
    pub fn kill9_images(&mut self) {
        if let Some(mut c) = self.images.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.wait();
        }
    }

    /// What a daemon logged.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.state.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// A client of the images service.
    pub fn client(&self) -> ImagesClient<berth_core::uds::Channel> {
        ImagesClient::new(berth_core::uds::channel(self.state.join("images.sock")))
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// A client of the snapshotter.
    pub fn snapshotter(&self) -> RemoteSnapshotter {
        RemoteSnapshotter::new(self.state.join("snapshotter.sock"), "overlayfs")
    }

    /// The blobs (digests) in the content store, read from disk.
    pub fn stored_blobs(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(self.root.join("content/blobs/sha256"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| format!("sha256:{}", e.file_name().to_string_lossy()))
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }
}

impl Drop for ImagesStack {
    fn drop(&mut self) {
        if let Some(mut c) = self.images.take() {
            stop_child(&mut c, Duration::from_secs(5));
        }
        if let Some(mut c) = self.snapshotter.take() {
            stop_child(&mut c, Duration::from_secs(5));
        }
        if let Some(dir) = self.dir.take() {
            let _ = berth_core::mount::unmount_all(dir.path());
            if std::thread::panicking() || std::env::var_os("BERTH_KEEP_TEST_DIRS").is_some() {
                eprintln!("berth-images log:\n{}", self.log("berth-images"));
            }
            drop(dir);
        }
    }
}

/// A view of the committed snapshot `chain_id`, mounted on a temp dir until dropped.
#[derive(Debug)]
pub struct MountedView {
    pub path: PathBuf,
    key: String,
    sn: RemoteSnapshotter,
    _dir: tempfile::TempDir,
}

impl MountedView {
    pub async fn new(sn: RemoteSnapshotter, chain_id: &str) -> Result<Self> {
        use berth_core::snapshots::Snapshotter;
        let key = format!("test-view-{}", std::process::id());
        let mounts = sn.view(&key, Some(chain_id), Default::default()).await?;
        let dir = tempfile::Builder::new().prefix("berth-view-").tempdir()?;
        let path = dir.path().join("m");
        std::fs::create_dir_all(&path)?;
        berth_core::mount::mount_all(&mounts, &path)?;
        Ok(Self {
            path,
            key,
            sn,
            _dir: dir,
        })
    }
}

impl Drop for MountedView {
    fn drop(&mut self) {
        use berth_core::snapshots::Snapshotter;
        let _ = berth_core::mount::unmount_all(&self.path);
        let (sn, key) = (self.sn.clone(), self.key.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                let _ = rt.block_on(sn.remove(&key));
            }
        })
        .join();
    }
}

// -------------------------------------------------------------------------------------------
// Client helpers

/// The outcome of a pull: every progress message and the final `PullDone`.
#[derive(Debug, Default)]
pub struct Pulled {
    pub events: Vec<pb::PullResponse>,
    pub done: Option<pb::PullDone>,
}

impl Pulled {
    /// The layer digests that reached `phase`.
    pub fn layers_in(&self, phase: pb::PullLayerPhase) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| match &e.event {
                Some(pb::pull_response::Event::Layer(l)) if l.phase == phase as i32 => {
                    Some(l.digest.clone())
                }
                _ => None,
            })
            .collect()
    }
}

/// Registry credentials for a request.
pub fn auth(user: &str, pass: &str) -> Option<berth_proto::berth::types::v1::RegistryAuth> {
    Some(berth_proto::berth::types::v1::RegistryAuth {
        username: user.into(),
        password: pass.into(),
        ..Default::default()
    })
}

/// Pulls `reference` and collects the stream.
pub async fn pull(
    client: &mut ImagesClient<berth_core::uds::Channel>,
    reference: &str,
    auth: Option<berth_proto::berth::types::v1::RegistryAuth>,
) -> std::result::Result<Pulled, tonic::Status> {
    let mut stream = client
        .pull(pb::PullRequest {
            reference: reference.into(),
            auth,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut out = Pulled::default();
    while let Some(msg) = stream.message().await? {
        if let Some(pb::pull_response::Event::Done(d)) = &msg.event {
            out.done = Some(d.clone());
        }
        out.events.push(msg);
    }
    Ok(out)
}

/// Exports `references` as one archive into `path`.
pub async fn export(
    client: &mut ImagesClient<berth_core::uds::Channel>,
    references: &[&str],
    format: pb::ArchiveFormat,
    path: &Path,
) -> Result<()> {
    let mut stream = client
        .export(pb::ExportImagesRequest {
            references: references.iter().map(|s| s.to_string()).collect(),
            format: format as i32,
            platforms: Vec::new(),
        })
        .await?
        .into_inner();
    let mut f = std::fs::File::create(path)?;
    while let Some(msg) = stream.message().await? {
        f.write_all(&msg.data)?;
    }
    Ok(())
}

/// Imports the archive at `path`.
pub async fn import(
    client: &mut ImagesClient<berth_core::uds::Channel>,
    path: &Path,
) -> std::result::Result<pb::ImportImagesResponse, tonic::Status> {
    let mut data = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    let mut msgs = vec![pb::ImportImagesRequest {
        part: Some(pb::import_images_request::Part::Options(
            pb::ImportOptions::default(),
        )),
    }];
    for chunk in data.chunks(1 << 20) {
        msgs.push(pb::ImportImagesRequest {
            part: Some(pb::import_images_request::Part::Data(chunk.to_vec())),
        });
    }
    Ok(client.import(tokio_stream::iter(msgs)).await?.into_inner())
}

/// Runs a command and returns its stdout, failing with its stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Reads lines from a file until `pred` matches one (for logs).
pub fn file_has_line(path: &Path, pred: impl Fn(&str) -> bool) -> bool {
    std::fs::File::open(path)
        .map(|f| {
            std::io::BufReader::new(f)
                .lines()
                .map_while(|l| l.ok())
                .any(|l| pred(&l))
        })
        .unwrap_or(false)
}

// -------------------------------------------------------------------------------------------
// containerd

/// A containerd of its own (temp root, state and socket), killed by PID on drop; for checking
/// that what berth exports imports into containerd.
#[derive(Debug)]
pub struct Containerd {
    pub socket: PathBuf,
    child: Child,
    dir: tempfile::TempDir,
}

impl Containerd {
    pub fn start() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("berth-ctrd-")
            .tempdir_in("/var/tmp")?;
        let d = dir.path().display().to_string();
        let socket = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.internal.v1.opt",
  "io.containerd.tracing.processor.v1.otlp",
]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = "{d}/debug.sock"
[metrics]
  address = ""
"#,
                sock = socket.display()
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("containerd.log"))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start containerd")?;
        let mut c = Self { socket, child, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&c.socket).is_err() {
            if let Ok(Some(st)) = c.child.try_wait() {
                bail!("containerd exited with {st}: {}", c.log_text());
            }
            if Instant::now() > deadline {
                bail!("containerd did not start: {}", c.log_text());
            }
            std::thread::sleep(Duration::from_millis(30));
        }
        Ok(c)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Runs `ctr` against this containerd (namespace `berth-test`).
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        run(Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "berth-test"])
            .args(args))
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(5));
        let _ = berth_core::mount::unmount_all(self.dir.path());
    }
}

/// How a test layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

/// The layers of one test image: uncompressed tar bytes and how to compress each.
pub type TestLayers = Vec<(Vec<u8>, LayerCompression)>;

/// Writes a multi-platform OCI layout at `dir`: one image per `(os/arch, layers)` entry, all
/// under an index tagged `latest`. Returns the index digest.
pub fn write_oci_index(dir: &Path, images: &[(&str, TestLayers)]) -> Result<String> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let put = |data: &[u8]| -> Result<String> {
        let d = sha256(data);
        std::fs::write(blobs.join(&d[7..]), data)?;
        Ok(d)
    };
    let mut manifests = Vec::new();
    for (platform, layers) in images {
        let (os, arch) = platform.split_once('/').context("os/arch")?;
        let mut descs = Vec::new();
        let mut diff_ids = Vec::new();
        for (tar, c) in layers {
            let (blob, mt) = match c {
                LayerCompression::None => (tar.clone(), "application/vnd.oci.image.layer.v1.tar"),
                LayerCompression::Gzip => {
                    let mut gz =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    gz.write_all(tar)?;
                    (gz.finish()?, "application/vnd.oci.image.layer.v1.tar+gzip")
                }
                LayerCompression::Zstd => (
                    zstd::encode_all(&tar[..], 3)?,
                    "application/vnd.oci.image.layer.v1.tar+zstd",
                ),
            };
            diff_ids.push(sha256(tar));
            descs.push(
                serde_json::json!({"mediaType": mt, "digest": put(&blob)?, "size": blob.len()}),
            );
        }
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": arch, "os": os, "created": "2023-11-14T22:13:20Z",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))?;
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(&config)?, "size": config.len()},
            "layers": descs,
        }))?;
        manifests.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": put(&manifest)?, "size": manifest.len(),
            "platform": {"os": os, "architecture": arch},
        }));
    }
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests,
    }))?;
    let id = put(&index)?;
    let top = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": id, "size": index.len(),
        "annotations": {"org.opencontainers.image.ref.name": "latest"}}]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&top)?)?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(id)
}

// -------------------------------------------------------------------------------------------
// Token server

const TOKEN_SERVER: &str = r#"
import base64, json, os, subprocess, sys, time
from http.server import HTTPServer, BaseHTTPRequestHandler
from urllib.parse import urlparse, parse_qs
port, key, crt, user, password = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
der = subprocess.run(["openssl", "x509", "-in", crt, "-outform", "DER"], check=True, capture_output=True).stdout
def b64(b): return base64.urlsafe_b64encode(b).rstrip(b"=").decode()
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        q = parse_qs(urlparse(self.path).query)
        auth = self.headers.get("Authorization", "")
        ok = auth == "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        if not ok:
            self.send_response(401); self.end_headers(); self.wfile.write(b'{"details":"bad credentials"}'); return
        access = []
        for s in q.get("scope", []):
            for one in s.split(" "):
                parts = one.split(":")
                if len(parts) >= 3 and parts[0] == "repository":
                    access.append({"type": "repository", "name": ":".join(parts[1:-1]), "actions": parts[-1].split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        claims = {"iss": "berth-test-issuer", "sub": user, "aud": q.get("service", [""])[0], "exp": now + 600,
                  "nbf": now - 10, "iat": now, "jti": os.urandom(8).hex(), "access": access}
        signing = (b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())).encode()
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", key], input=signing, check=True, capture_output=True).stdout
        token = signing.decode() + "." + b64(sig)
        body = json.dumps({"token": token, "access_token": token, "expires_in": 600}).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json"); self.end_headers(); self.wfile.write(body)
HTTPServer(("127.0.0.1", int(port)), H).serve_forever()
"#;

/// A small OAuth2-style token server (what Docker Hub's auth.docker.io does for its registry):
/// hands out RS256-signed JWTs for the scopes asked, to one user. Stopped by PID on drop.
#[derive(Debug)]
pub struct TokenServer {
    /// The realm a registry names in its `Bearer` challenge.
    pub realm: String,
    /// The certificate registries verify tokens against.
    pub cert: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl TokenServer {
    pub fn start(user: &str, password: &str) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("berth-token-").tempdir()?;
        let key = dir.path().join("token.key");
        let cert = dir.path().join("token.crt");
        run(Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=berth token",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert))?;
        let script = dir.path().join("token.py");
        std::fs::write(&script, TOKEN_SERVER)?;
        let port = free_port();
        let child = Command::new("python3")
            .arg(&script)
            .arg(port.to_string())
            .arg(&key)
            .arg(&cert)
            .arg(user)
            .arg(password)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut s = Self {
            realm: format!("http://127.0.0.1:{port}/token"),
            cert,
            child,
            _dir: dir,
        };
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            if let Ok(Some(st)) = s.child.try_wait() {
                bail!("token server exited with {st}");
            }
            ensure!(Instant::now() < deadline, "token server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(s)
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(2));
    }
}
