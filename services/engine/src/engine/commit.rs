//! `docker commit`: the container's rootfs changes become one more layer of a new image.
//!
//! The layer is read from the overlay upper directory of the container's snapshot (the diff
//! against the image's snapshot chain): overlay whiteouts (0/0 character devices) become
//! `.wh.<name>` files, opaque directories get a `.wh..wh..opq` entry, and what the runtime put
//! there only as mount points (the generated /etc files, /dev, /proc, /sys, volumes) is left
//! out. The tar goes to a temporary file first, so a running container is paused only while it
//! is read and nothing reaches berth-images unless the whole layer was produced; berth-images
//! then stores it gzip-compressed and unpacks it onto the parent's chain as a new committed
//! snapshot (a running container's own snapshot stays active and in use).

use std::collections::HashMap;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use berth_core::{Error, Result};
use berth_proto::berth::engine::v1 as pb;
use berth_proto::berth::images::v1 as images;
use serde_json::{Map, Value, json};

use super::Engine;

const OPAQUE: &str = ".wh..wh..opq";
const WHITEOUT: &str = ".wh.";

/// One entry of the layer, by its path relative to the root (no leading `/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerEntry {
    /// A file, directory, link or device copied from the upper directory; directories that
    /// hide everything below them in the lower layers are `opaque`.
    Upper { path: String, opaque: bool },
    /// Deleted: `.wh.<name>` in the parent.
    Whiteout(String),
}

/// The overlay xattr that marks a directory opaque, trusted or user namespace.
fn is_opaque(path: &Path) -> bool {
    ["trusted.overlay.opaque", "user.overlay.opaque"]
        .iter()
        .any(|name| xattr(path, name).as_deref() == Some(b"y".as_slice()))
}

/// Overlay features whose upper directory is not a plain diff (renamed directories pointing
/// elsewhere, metadata-only copies): refused rather than committed wrong.
fn unsupported_overlay_feature(path: &Path) -> Option<&'static str> {
    ["trusted.overlay.redirect", "trusted.overlay.metacopy"]
        .into_iter()
        .find(|name| xattr(path, name).is_some())
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let n = std::ffi::CString::new(name).ok()?;
    // SAFETY: both strings are NUL-terminated and live for the call; a null buffer of size 0
    // asks for the value's size.
    let size = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
    if size < 0 {
        return None;
    }
    let mut buf = vec![0u8; size as usize];
    // SAFETY: as above, with the buffer passed with its length.
    let len =
        unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (len >= 0).then(|| {
        buf.truncate(len as usize);
        buf
    })
}

/// The extended attributes of `path` that belong to the file (overlay's own are left out).
fn file_xattrs(path: &Path) -> Vec<(String, Vec<u8>)> {
    use std::os::unix::ffi::OsStrExt;
    let Ok(p) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return Vec::new();
    };
    let mut names = vec![0u8; 4096];
    // SAFETY: a NUL-terminated path and a buffer passed with its length.
    let len = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if len <= 0 {
        return Vec::new();
    }
    names.truncate(len as usize);
    names
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .filter_map(|n| std::str::from_utf8(n).ok())
        .filter(|n| !n.starts_with("trusted.overlay.") && !n.starts_with("user.overlay."))
        .filter_map(|n| xattr(path, n).map(|v| (n.to_string(), v)))
        .collect()
}

/// A PAX extended header carrying `SCHILY.xattr.<name>` records, for the entry that follows.
fn append_xattrs<W: Write>(
    tar: &mut tar::Builder<W>,
    xattrs: &[(String, Vec<u8>)],
) -> std::io::Result<()> {
    if xattrs.is_empty() {
        return Ok(());
    }
    let mut data = Vec::new();
    for (name, value) in xattrs {
        let mut body = format!(" SCHILY.xattr.{name}=").into_bytes();
        body.extend_from_slice(value);
        body.push(b'\n');
        // The length counts its own digits.
        let mut n = body.len() + 1;
        while n.to_string().len() + body.len() != n {
            n = n.to_string().len() + body.len();
        }
        data.extend_from_slice(n.to_string().as_bytes());
        data.extend_from_slice(&body);
    }
    let mut h = tar::Header::new_ustar();
    h.set_path("PaxHeaders/xattrs")?;
    h.set_entry_type(tar::EntryType::XHeader);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_cksum();
    tar.append(&h, data.as_slice())
}

/// What of the upper directory `upper` (over `lowers`, top first) is the container's change,
/// in tar order (a directory before its contents). `skip` holds container paths that are mount
/// points, left out with everything below them.
pub fn plan_layer(upper: &Path, lowers: &[PathBuf], skip: &[String]) -> Result<Vec<LayerEntry>> {
    let mut out = Vec::new();
    plan_dir(upper, lowers, "", skip, &mut out)?;
    Ok(out)
}

fn plan_dir(
    upper: &Path,
    lowers: &[PathBuf],
    rel: &str,
    skip: &[String],
    out: &mut Vec<LayerEntry>,
) -> Result<()> {
    let dir = upper.join(rel);
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .map_err(|e| Error::internal(format!("read {}", dir.display())).with_source(e))?
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        if skip.iter().any(|s| s.trim_matches('/') == path) {
            continue;
        }
        let host = e.path();
        let meta = std::fs::symlink_metadata(&host)
            .map_err(|e| Error::internal(format!("stat {}", host.display())).with_source(e))?;
        if let Some(feature) = unsupported_overlay_feature(&host) {
            return Err(Error::unimplemented(format!(
                "cannot commit /{path}: the overlay upper directory uses {feature}"
            )));
        }
        if meta.file_type().is_char_device() && meta.rdev() == 0 {
            out.push(LayerEntry::Whiteout(path));
            continue;
        }
        if meta.file_type().is_socket() {
            // Tar has no sockets; Docker leaves them out of layers too.
            continue;
        }
        if !meta.is_dir() {
            out.push(LayerEntry::Upper {
                path,
                opaque: false,
            });
            continue;
        }
        let opaque = is_opaque(&host);
        let lower = lowers
            .iter()
            .find_map(|l| std::fs::symlink_metadata(l.join(&path)).ok());
        let lower_dir = lower.as_ref().is_some_and(|l| l.is_dir());
        // Below a new or opaque directory, nothing of the lower layers shows.
        let below_lowers: &[PathBuf] = if lower_dir && !opaque { lowers } else { &[] };
        let mut below = Vec::new();
        plan_dir(upper, below_lowers, &path, skip, &mut below)?;
        // A directory the lower layers have with the same mode and owner was copied up only
        // for what is below it (or for mount points): it is in the layer only for its contents.
        let own = opaque
            || match &lower {
                Some(l) if l.is_dir() => {
                    l.mode() != meta.mode() || l.uid() != meta.uid() || l.gid() != meta.gid()
                }
                _ => true,
            };
        if own || !below.is_empty() {
            out.push(LayerEntry::Upper { path, opaque });
            out.extend(below);
        }
    }
    Ok(())
}

/// Writes the planned entries from `upper` as an uncompressed layer tar; with the container's
/// user namespace `map`, owners are written as the container sees them.
pub fn write_layer<W: Write>(
    upper: &Path,
    plan: &[LayerEntry],
    map: Option<&berth_core::userns::IdMap>,
    w: W,
) -> std::io::Result<W> {
    let mut tar = tar::Builder::new(w);
    tar.follow_symlinks(false);
    // Hard links inside the layer stay hard links: the first path of an inode carries the data.
    let mut inodes: HashMap<(u64, u64), String> = HashMap::new();
    for entry in plan {
        match entry {
            LayerEntry::Whiteout(path) => {
                let (parent, name) = match path.rsplit_once('/') {
                    Some((p, n)) => (format!("{p}/"), n),
                    None => (String::new(), path.as_str()),
                };
                empty_file(&mut tar, &format!("{parent}{WHITEOUT}{name}"))?;
            }
            LayerEntry::Upper { path, opaque } => {
                let host = upper.join(path);
                let meta = std::fs::symlink_metadata(&host)?;
                // A second path of a hard-linked inode is a link entry: the first carries the
                // xattrs.
                let repeat_link = meta.is_file()
                    && meta.nlink() > 1
                    && inodes.contains_key(&(meta.dev(), meta.ino()));
                if !repeat_link {
                    append_xattrs(&mut tar, &file_xattrs(&host))?;
                }
                let mut header = tar::Header::new_gnu();
                header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
                if let Some(map) = map {
                    let (uid, gid) = map.container_owner(meta.uid(), meta.gid());
                    header.set_uid(uid.into());
                    header.set_gid(gid.into());
                }
                let ft = meta.file_type();
                if ft.is_dir() {
                    header.set_size(0);
                    tar.append_data(&mut header, format!("{path}/"), std::io::empty())?;
                    if *opaque {
                        empty_file(&mut tar, &format!("{path}/{OPAQUE}"))?;
                    }
                } else if ft.is_symlink() {
                    header.set_size(0);
                    tar.append_link(&mut header, path, std::fs::read_link(&host)?)?;
                } else if ft.is_file() {
                    if meta.nlink() > 1 {
                        let key = (meta.dev(), meta.ino());
                        if let Some(first) = inodes.get(&key) {
                            header.set_entry_type(tar::EntryType::Link);
                            header.set_size(0);
                            tar.append_link(&mut header, path, first)?;
                            continue;
                        }
                        inodes.insert(key, path.clone());
                    }
                    tar.append_data(&mut header, path, std::fs::File::open(&host)?)?;
                } else {
                    // Devices, fifos and sockets: the header is the whole entry.
                    header.set_size(0);
                    tar.append_data(&mut header, path, std::io::empty())?;
                }
            }
        }
    }
    tar.into_inner()
}

fn empty_file<W: Write>(tar: &mut tar::Builder<W>, path: &str) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(0);
    h.set_mtime(0);
    tar.append_data(&mut h, path, std::io::empty())
}

/// The container's config the way Docker records it in an image (`Config` / `container_config`).
pub fn docker_config(id: &str, c: &pb::ContainerConfig) -> Value {
    let list = |l: &Option<berth_proto::berth::types::v1::StringList>| match l {
        Some(l) => json!(l.values),
        None => Value::Null,
    };
    let hostname = if c.hostname.is_empty() {
        id.chars().take(12).collect()
    } else {
        c.hostname.clone()
    };
    let mut out = Map::new();
    out.insert("Hostname".into(), json!(hostname));
    out.insert("Domainname".into(), json!(c.domainname));
    out.insert("User".into(), json!(c.user));
    out.insert("AttachStdin".into(), json!(c.attach_stdin));
    out.insert("AttachStdout".into(), json!(c.attach_stdout));
    out.insert("AttachStderr".into(), json!(c.attach_stderr));
    if !c.exposed_ports.is_empty() {
        let ports: Map<String, Value> = c
            .exposed_ports
            .iter()
            .map(|p| {
                let proto = match p.protocol() {
                    berth_proto::berth::types::v1::Protocol::Udp => "udp",
                    berth_proto::berth::types::v1::Protocol::Sctp => "sctp",
                    _ => "tcp",
                };
                (format!("{}/{proto}", p.port), json!({}))
            })
            .collect();
        out.insert("ExposedPorts".into(), Value::Object(ports));
    }
    out.insert("Tty".into(), json!(c.tty));
    out.insert("OpenStdin".into(), json!(c.open_stdin));
    out.insert("StdinOnce".into(), json!(c.stdin_once));
    out.insert("Env".into(), json!(c.env));
    out.insert("Cmd".into(), list(&c.cmd));
    if !c.healthcheck.is_empty()
        && let Ok(h) = serde_json::from_slice::<Value>(&c.healthcheck)
    {
        out.insert("Healthcheck".into(), h);
    }
    out.insert("Image".into(), json!(c.image));
    out.insert(
        "Volumes".into(),
        if c.volumes.is_empty() {
            Value::Null
        } else {
            Value::Object(c.volumes.iter().map(|v| (v.clone(), json!({}))).collect())
        },
    );
    out.insert("WorkingDir".into(), json!(c.working_dir));
    out.insert("Entrypoint".into(), list(&c.entrypoint));
    out.insert(
        "OnBuild".into(),
        if c.on_build.is_empty() {
            Value::Null
        } else {
            json!(c.on_build)
        },
    );
    let mut labels: Vec<(&String, &String)> = c.labels.iter().collect();
    labels.sort();
    out.insert(
        "Labels".into(),
        Value::Object(
            labels
                .into_iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect(),
        ),
    );
    if !c.stop_signal.is_empty() {
        out.insert("StopSignal".into(), json!(c.stop_signal));
    }
    Value::Object(out)
}

impl Engine {
    /// Whether the container's image has no layers (its rootfs snapshot has no parent).
    async fn image_has_no_layers(&self, c: &pb::Container) -> Result<bool> {
        let image = self
            .deps
            .images
            .resolve(
                &c.image_id,
                None,
                &c.snapshotter,
                self.container_map(&c.host_config.clone().unwrap_or_default())
                    .is_none(),
            )
            .await?;
        Ok(image.chain_id.is_empty())
    }

    /// `docker commit`: returns the new image's id.
    pub async fn commit(&self, req: pb::CommitContainerRequest) -> Result<String> {
        let ctr = self.get(&req.id)?;
        let rec = ctr.record();
        if matches!(
            rec.status(),
            pb::ContainerStatus::Removing | pb::ContainerStatus::Dead
        ) {
            return Err(Error::failed_precondition(format!(
                "You cannot commit container {} which is {}",
                ctr.id,
                if rec.status() == pb::ContainerStatus::Dead {
                    "dead"
                } else {
                    "being removed"
                }
            )));
        }
        let mounts = self.deps.snapshots.mounts(&rec.c.snapshot_key).await?;
        let (upper, lowers) = match mounts.as_slice() {
            [m] if m.fstype == "overlay" && m.option("upperdir").is_some() => (
                PathBuf::from(m.option("upperdir").unwrap_or_default()),
                m.lowerdirs()
                    .into_iter()
                    .map(PathBuf::from)
                    .collect::<Vec<_>>(),
            ),
            // A snapshot with no parent (an image without layers, as a build's `FROM scratch`)
            // is a plain directory: all of it is the change.
            [m] if m.fstype == "bind" && self.image_has_no_layers(&rec.c).await? => {
                (PathBuf::from(&m.source), Vec::new())
            }
            _ => {
                return Err(Error::unimplemented(
                    "commit is only supported for overlay snapshots",
                ));
            }
        };
        let skip = super::archive::runtime_mount_points(&rec.c);
        let cfg = rec.config();
        let container_config = docker_config(&ctr.id, cfg);
        let config = if req.config.is_empty() {
            serde_json::to_vec(&container_config)
                .map_err(|e| Error::internal("encode config").with_source(e))?
        } else {
            req.config.clone()
        };
        let created_by = if req.created_by.is_empty() {
            cfg.cmd
                .as_ref()
                .map(|c| c.values.join(" "))
                .unwrap_or_default()
        } else {
            req.created_by.clone()
        };

        // Read the diff into a temporary file, with the container paused when asked.
        let paused = req.pause && rec.status() == pb::ContainerStatus::Running;
        if paused {
            self.pause(&ctr.id).await?;
        }
        let scratch = self.paths.scratch.clone();
        let map = self.container_map(rec.host_config()).cloned();
        let produced = tokio::task::spawn_blocking(move || -> Result<Option<std::fs::File>> {
            let plan = plan_layer(&upper, &lowers, &skip)?;
            if plan.is_empty() && req.empty_layer_when_unchanged {
                return Ok(None);
            }
            std::fs::create_dir_all(&scratch)?;
            let file = tempfile::tempfile_in(&scratch)
                .map_err(|e| Error::internal("create the layer file").with_source(e))?;
            let mut file = write_layer(&upper, &plan, map.as_ref(), std::io::BufWriter::new(file))
                .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
                .map_err(|e| Error::internal("write the layer").with_source(e))?;
            file.rewind()?;
            Ok(Some(file))
        })
        .await
        .map_err(|e| Error::internal("layer task").with_source(e));
        if paused && let Err(e) = self.resume(&ctr.id).await {
            tracing::warn!(container = %ctr.id, error = %e.chain(), "unpause after commit");
        }
        let layer = produced??;

        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        let feeder = layer.map(|mut file| {
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    let n = file.read(&mut buf)?;
                    if n == 0 || tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return Ok(());
                    }
                }
            })
        });
        let empty_layer = feeder.is_none();
        let comment = req.comment;
        let opts = images::CreateImageOptions {
            parent: rec.c.image_id.clone(),
            config,
            container_config: serde_json::to_vec(&container_config)
                .map_err(|e| Error::internal("encode config").with_source(e))?,
            container: ctr.id.clone(),
            created_by,
            author: req.author,
            comment: comment.clone(),
            empty_layer,
            reference: req.reference,
            snapshotter: rec.c.snapshotter.clone(),
        };
        let made = self.deps.images.create_image(opts, rx).await;
        if let Some(f) = feeder {
            let _ = f.await;
        }
        let made = made?;
        // Docker's container event, with the tag in its familiar form.
        let image_ref = if made.reference.is_empty() {
            String::new()
        } else {
            berth_core::Reference::parse(&made.reference)
                .map(|r| r.familiar())
                .unwrap_or_else(|_| made.reference.clone())
        };
        self.container_event(
            &ctr.record(),
            "commit",
            [
                ("comment".to_string(), comment),
                ("imageID".to_string(), made.image_id.clone()),
                ("imageRef".to_string(), image_ref),
            ],
        );
        Ok(made.image_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn whiteout(path: &Path) {
        let p = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path; mknod of a 0/0 character device (root only).
        let rc = unsafe { libc::mknod(p.as_ptr(), libc::S_IFCHR | 0o600, 0) };
        assert_eq!(rc, 0, "mknod {}", path.display());
    }

    fn set_opaque(path: &Path) {
        let p = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        let n = std::ffi::CString::new("trusted.overlay.opaque").unwrap();
        // SAFETY: NUL-terminated strings and a 1-byte value.
        let rc = unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), c"y".as_ptr().cast(), 1, 0) };
        assert_eq!(rc, 0);
    }

    #[test]
    fn an_upper_dir_becomes_a_layer_with_whiteouts_and_opaque_dirs() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root for whiteouts and trusted xattrs");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let (upper, lower) = (t.path().join("u"), t.path().join("l"));
        for d in ["etc", "keep", "gone", "replaced/old"] {
            std::fs::create_dir_all(lower.join(d)).unwrap();
        }
        std::fs::write(lower.join("etc/passwd"), "root").unwrap();
        std::fs::write(lower.join("etc/deleted"), "x").unwrap();
        std::fs::create_dir_all(upper.join("etc")).unwrap();
        std::fs::create_dir_all(upper.join("new/deep")).unwrap();
        std::fs::create_dir_all(upper.join("replaced")).unwrap();
        std::fs::create_dir_all(upper.join("proc")).unwrap();
        std::fs::write(upper.join("etc/passwd"), "changed").unwrap();
        std::fs::write(upper.join("etc/hosts"), "").unwrap();
        std::fs::write(upper.join("new/deep/f"), "data").unwrap();
        std::fs::hard_link(upper.join("new/deep/f"), upper.join("new/h")).unwrap();
        let f = std::ffi::CString::new(upper.join("new/deep/f").to_str().unwrap()).unwrap();
        // SAFETY: NUL-terminated strings and a value passed with its length.
        let rc = unsafe {
            libc::setxattr(
                f.as_ptr(),
                c"trusted.berth-test".as_ptr(),
                c"v1".as_ptr().cast(),
                2,
                0,
            )
        };
        assert_eq!(rc, 0);
        std::os::unix::fs::symlink("deep/f", upper.join("new/l")).unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(upper.join("new/sock")).unwrap();
        nix::unistd::mkfifo(
            &upper.join("new/fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        std::fs::write(upper.join("replaced/fresh"), "").unwrap();
        set_opaque(&upper.join("replaced"));
        whiteout(&upper.join("etc/deleted"));
        whiteout(&upper.join("gone"));
        // Copied up with the same mode for a mount point only: no change.
        std::fs::create_dir_all(upper.join("keep")).unwrap();
        std::fs::set_permissions(
            upper.join("keep"),
            std::fs::metadata(lower.join("keep")).unwrap().permissions(),
        )
        .unwrap();
        std::fs::write(upper.join("keep/mnt"), "").unwrap();
        let skip = ["/etc/hosts".to_string(), "/proc".into(), "/keep/mnt".into()];
        let plan = plan_layer(&upper, std::slice::from_ref(&lower), &skip).unwrap();
        let tar = write_layer(&upper, &plan, None, Vec::new()).unwrap();
        let mut names = Vec::new();
        let mut xattrs = Vec::new();
        let mut a = tar::Archive::new(tar.as_slice());
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().display().to_string();
            let kind = e.header().entry_type();
            let entry_path = e.path().unwrap().display().to_string();
            if let Some(pax) = e.pax_extensions().unwrap() {
                for x in pax {
                    let x = x.unwrap();
                    xattrs.push((
                        entry_path.clone(),
                        x.key().unwrap().to_string(),
                        x.value_bytes().to_vec(),
                    ));
                }
            }
            let mut body = String::new();
            e.read_to_string(&mut body).unwrap();
            names.push((name, kind, body));
        }
        let got: Vec<&str> = names.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(
            got,
            [
                "etc/",
                "etc/.wh.deleted",
                "etc/passwd",
                ".wh.gone",
                "new/",
                "new/deep/",
                "new/deep/f",
                "new/fifo",
                "new/h",
                "new/l",
                "replaced/",
                "replaced/.wh..wh..opq",
                "replaced/fresh",
            ]
        );
        let by = |n: &str| names.iter().find(|(m, _, _)| m == n).unwrap();
        assert_eq!(by("etc/passwd").2, "changed");
        assert_eq!(by("new/h").1, tar::EntryType::Link);
        assert_eq!(
            xattrs,
            [(
                "new/deep/f".to_string(),
                "SCHILY.xattr.trusted.berth-test".to_string(),
                b"v1".to_vec()
            )],
            "only the file's own xattrs, none of overlay's"
        );
        assert_eq!(by("new/l").1, tar::EntryType::Symlink);
        assert_eq!(by("new/fifo").1, tar::EntryType::Fifo);
        // An unchanged upper dir plans nothing.
        let empty = t.path().join("e");
        std::fs::create_dir_all(empty.join("keep")).unwrap();
        std::fs::set_permissions(
            empty.join("keep"),
            std::fs::Permissions::from_mode(std::fs::metadata(lower.join("keep")).unwrap().mode()),
        )
        .unwrap();
        assert!(plan_layer(&empty, &[lower], &[]).unwrap().is_empty());
    }

    #[test]
    fn the_docker_config_has_docker_names() {
        let c = pb::ContainerConfig {
            image: "busybox".into(),
            cmd: Some(berth_proto::berth::types::v1::StringList {
                values: vec!["sh".into()],
            }),
            env: vec!["A=b".into()],
            exposed_ports: vec![berth_proto::berth::types::v1::ExposedPort {
                port: 53,
                protocol: berth_proto::berth::types::v1::Protocol::Udp.into(),
            }],
            ..Default::default()
        };
        let v = docker_config(&"a".repeat(64), &c);
        assert_eq!(v["Hostname"], "aaaaaaaaaaaa");
        assert_eq!(v["Cmd"], json!(["sh"]));
        assert_eq!(v["Entrypoint"], Value::Null);
        assert_eq!(v["Env"], json!(["A=b"]));
        assert_eq!(v["ExposedPorts"], json!({"53/udp": {}}));
        assert_eq!(v["Image"], "busybox");
    }
}
