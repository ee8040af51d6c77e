//! The container's filesystem from the outside: `docker cp` (ArchiveStat, ArchiveGet,
//! ArchivePut), `docker export` and `docker diff` (Changes).
//!
//! A running container's rootfs is the shim's mount at `<bundle>/rootfs`; a stopped one's is
//! mounted from its snapshot on a private temporary directory for the duration of the call.
//! Paths are resolved the way the container sees them: symlinks are followed inside the
//! container's root (an absolute link target starts again at the container's `/`, `..` never
//! leaves it), and paths under a volume or bind mount go to the mount's host source.
//! A container with a user namespace speaks its own ids: owners are shifted back through its
//! map when read out, and into it when written.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use berth_core::mount::{Mount, MountGuard};
use berth_core::userns::IdMap;
use berth_core::{Error, Result};
use berth_proto::berth::engine::v1 as pb;
use tokio::sync::mpsc;

use super::{Ctr, Engine};
use crate::deps::BoxStream;

/// A container's filesystem as the host sees it, kept mounted while this lives.
pub struct View {
    root: PathBuf,
    /// Volume and bind mounts: container destination → host source, longest first.
    mounts: Vec<(String, PathBuf)>,
    /// The container's user namespace map: files are read out in container ids and written
    /// in host ids.
    map: Option<IdMap>,
    _guard: Option<(MountGuard, tempfile::TempDir)>,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

fn split(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .map(str::to_string)
        .collect()
}

fn join(components: &[String]) -> String {
    format!("/{}", components.join("/"))
}

impl View {
    /// The host path of a container path that has no symlinks left in it.
    pub fn host_path(&self, container_path: &str) -> PathBuf {
        for (dest, src) in &self.mounts {
            if container_path == dest {
                return src.clone();
            }
            if let Some(rest) = container_path.strip_prefix(dest.as_str())
                && rest.starts_with('/')
            {
                return src.join(rest.trim_start_matches('/'));
            }
        }
        self.root.join(container_path.trim_start_matches('/'))
    }

    /// Resolves `path` inside the container: every symlink on the way is followed inside the
    /// container's root; the last component too when `follow_last`. Returns the clean
    /// container path and its host path.
    pub fn resolve(&self, path: &str, follow_last: bool) -> Result<(String, PathBuf)> {
        let mut done: Vec<String> = Vec::new();
        let mut todo: VecDeque<String> = path
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .map(str::to_string)
            .collect();
        let mut hops = 0;
        while let Some(c) = todo.pop_front() {
            if c == ".." {
                done.pop();
                continue;
            }
            done.push(c);
            let last = todo.is_empty();
            if last && !follow_last {
                break;
            }
            let host = self.host_path(&join(&done));
            let Ok(meta) = std::fs::symlink_metadata(&host) else {
                continue;
            };
            if meta.file_type().is_symlink() {
                hops += 1;
                if hops > 40 {
                    return Err(Error::invalid_argument(format!(
                        "{path}: too many levels of symbolic links"
                    )));
                }
                let target = std::fs::read_link(&host)?;
                done.pop();
                let target = target.to_string_lossy().into_owned();
                if target.starts_with('/') {
                    done.clear();
                }
                for (i, t) in split(&target).into_iter().enumerate() {
                    todo.insert(i, t);
                }
            }
        }
        let clean = join(&done);
        let host = self.host_path(&clean);
        Ok((clean, host))
    }
}

/// A writer that sends its bytes as chunks down a channel (from a blocking thread).
struct ChunkWriter<T> {
    tx: mpsc::Sender<Result<T>>,
    buf: Vec<u8>,
    wrap: fn(Vec<u8>) -> T,
}

impl<T> ChunkWriter<T> {
    fn flush_chunk(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(Ok((self.wrap)(chunk)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))
    }
}

const CHUNK: usize = 256 * 1024;

impl<T> Write for ChunkWriter<T> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush_chunk()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.flush_chunk()
    }
}

/// Appends the tree at container path `cpath` (host `hpath`) as `name`, descending into volume
/// and bind mounts when `view` lists them.
fn append_tree<W: Write>(
    tar: &mut tar::Builder<W>,
    view: &View,
    cpath: &str,
    hpath: &Path,
    name: &str,
) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(hpath)?;
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
    if let Some(map) = &view.map {
        let (uid, gid) = map.container_owner(meta.uid(), meta.gid());
        header.set_uid(uid.into());
        header.set_gid(gid.into());
    }
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = std::fs::read_link(hpath)?;
        header.set_size(0);
        tar.append_link(&mut header, name, target)?;
    } else if ft.is_file() {
        let file = std::fs::File::open(hpath)?;
        tar.append_data(&mut header, name, file)?;
    } else if ft.is_dir() {
        header.set_size(0);
        tar.append_data(&mut header, format!("{name}/"), std::io::empty())?;
        let mut entries: Vec<_> = std::fs::read_dir(hpath)?.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let child = e.file_name().to_string_lossy().into_owned();
            let child_c = if cpath == "/" {
                format!("/{child}")
            } else {
                format!("{cpath}/{child}")
            };
            let child_h = view.host_path(&child_c);
            let child_name = if name.is_empty() {
                child.clone()
            } else {
                format!("{name}/{child}")
            };
            append_tree(tar, view, &child_c, &child_h, &child_name)?;
        }
    } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
        header.set_size(0);
        tar.append_data(&mut header, name, std::io::empty())?;
    }
    Ok(())
}

fn stat_of(cpath: &str, host: &Path) -> Result<pb::ArchiveStatResponse> {
    let meta = match std::fs::symlink_metadata(host) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::not_found(format!(
                "Could not find the file {cpath} in container"
            )));
        }
        Err(e) => return Err(e.into()),
    };
    let link_target = if meta.file_type().is_symlink() {
        std::fs::read_link(host)?.to_string_lossy().into_owned()
    } else {
        String::new()
    };
    let name = Path::new(cpath)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/".into());
    Ok(pb::ArchiveStatResponse {
        name,
        size: meta.len() as i64,
        mode: meta.mode(),
        mtime: Some(berth_proto::prost_types::Timestamp {
            seconds: meta.mtime(),
            nanos: meta.mtime_nsec() as i32,
        }),
        link_target,
    })
}

/// What ArchivePut extracts where.
struct PutPlan {
    view: View,
    dir: String,
    no_overwrite_dir_non_dir: bool,
    copy_uid_gid: bool,
}

fn extract<R: Read>(plan: &PutPlan, input: R) -> Result<()> {
    let mut archive = tar::Archive::new(input);
    let entries = archive
        .entries()
        .map_err(|e| Error::invalid_argument("read the tar stream").with_source(e))?;
    for entry in entries {
        let mut entry =
            entry.map_err(|e| Error::invalid_argument("read the tar stream").with_source(e))?;
        let rel = entry
            .path()
            .map_err(|e| Error::invalid_argument("tar entry path").with_source(e))?
            .to_string_lossy()
            .into_owned();
        if rel.split('/').any(|c| c == "..") {
            return Err(Error::invalid_argument(format!(
                "tar entry {rel:?} leaves the destination"
            )));
        }
        let cpath = join(&[split(&plan.dir), split(&rel)].concat());
        if cpath == plan.dir {
            continue;
        }
        // The parent is resolved through symlinks inside the container; the entry itself is not.
        let (parent_c, _) = plan.view.resolve(
            Path::new(&cpath)
                .parent()
                .and_then(|p| p.to_str())
                .unwrap_or("/"),
            true,
        )?;
        let name = Path::new(&cpath)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let target_c = join(&[split(&parent_c), vec![name]].concat());
        let target = plan.view.host_path(&target_c);
        let header = entry.header().clone();
        let kind = header.entry_type();
        let existing = std::fs::symlink_metadata(&target).ok();
        if plan.no_overwrite_dir_non_dir
            && let Some(m) = &existing
            && (m.is_dir() != kind.is_dir())
        {
            return Err(Error::failed_precondition(format!(
                "cannot overwrite {} {target_c} with a {}",
                if m.is_dir() {
                    "directory"
                } else {
                    "non-directory"
                },
                if kind.is_dir() {
                    "directory"
                } else {
                    "non-directory"
                }
            )));
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if let Some(m) = &existing
            && !(m.is_dir() && kind.is_dir())
        {
            if m.is_dir() {
                std::fs::remove_dir_all(&target)?;
            } else {
                std::fs::remove_file(&target)?;
            }
        }
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        if kind.is_dir() {
            std::fs::create_dir_all(&target)?;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))?;
        } else if kind.is_symlink() {
            let link = entry
                .link_name()
                .map_err(|e| Error::invalid_argument("tar link name").with_source(e))?
                .unwrap_or_default();
            std::os::unix::fs::symlink(&*link, &target)?;
        } else if kind.is_hard_link() {
            let link = entry
                .link_name()
                .map_err(|e| Error::invalid_argument("tar link name").with_source(e))?
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let link_c = join(&[split(&plan.dir), split(&link)].concat());
            let (_, link_h) = plan.view.resolve(&link_c, false)?;
            std::fs::hard_link(link_h, &target)?;
        } else if kind.is_file() || kind == tar::EntryType::Continuous {
            let mut f = std::fs::File::create(&target)?;
            std::io::copy(&mut entry, &mut f)?;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))?;
        } else {
            tracing::debug!(path = %target_c, ?kind, "archive put skips an entry of this type");
            continue;
        }
        let (uid, gid) = if plan.copy_uid_gid {
            (
                header.uid().unwrap_or(0) as u32,
                header.gid().unwrap_or(0) as u32,
            )
        } else {
            (0, 0)
        };
        let (uid, gid) = match &plan.view.map {
            Some(map) => map.host_owner(&format_args!("{target_c}"), uid, gid)?,
            None => (uid, gid),
        };
        std::os::unix::fs::lchown(&target, Some(uid), Some(gid))?;
    }
    Ok(())
}

impl Engine {
    /// The container's filesystem, mounted for as long as the view lives.
    async fn view(&self, ctr: &Arc<Ctr>, with_mounts: bool) -> Result<View> {
        let rec = ctr.record();
        let mounts: Vec<(String, PathBuf)> = if with_mounts {
            let mut m: Vec<(String, PathBuf)> = rec
                .c
                .mounts
                .iter()
                .filter(|m| matches!(m.r#type(), pb::MountType::Bind | pb::MountType::Volume))
                .map(|m| {
                    (
                        m.destination.trim_end_matches('/').to_string(),
                        PathBuf::from(&m.source),
                    )
                })
                .collect();
            m.sort_by_key(|(d, _)| std::cmp::Reverse(d.len()));
            m
        } else {
            Vec::new()
        };
        let map = self.container_map(rec.host_config()).cloned();
        let bundle_rootfs = self.paths.bundle(&ctr.id).join("rootfs");
        if rec.is_running() && is_mount_point(&bundle_rootfs) {
            return Ok(View {
                root: bundle_rootfs,
                mounts,
                map,
                _guard: None,
            });
        }
        let rootfs: Vec<Mount> = self.deps.snapshots.mounts(&rec.c.snapshot_key).await?;
        let scratch = self.paths.scratch.clone();
        tokio::task::spawn_blocking(move || -> Result<View> {
            std::fs::create_dir_all(&scratch)?;
            let dir = tempfile::Builder::new()
                .prefix("view-")
                .tempdir_in(&scratch)
                .map_err(|e| Error::internal("create a mount point").with_source(e))?;
            let guard = MountGuard::mount(&rootfs, dir.path())?;
            Ok(View {
                root: dir.path().to_path_buf(),
                mounts,
                map,
                _guard: Some((guard, dir)),
            })
        })
        .await
        .map_err(|e| Error::internal("mount task").with_source(e))?
    }

    /// `HEAD /containers/{id}/archive`: stat of a path (symlinks are not followed at the end).
    pub async fn archive_stat(&self, input: &str, path: &str) -> Result<pb::ArchiveStatResponse> {
        let ctr = self.get(input)?;
        let view = self.view(&ctr, true).await?;
        let path = path.to_string();
        tokio::task::spawn_blocking(move || {
            let (cpath, host) = view.resolve(&path, false)?;
            stat_of(&cpath, &host)
        })
        .await
        .map_err(|e| Error::internal("stat task").with_source(e))?
    }

    /// `GET /containers/{id}/archive`: the stat, then a tar of the path named by its base name.
    pub async fn archive_get(
        &self,
        input: &str,
        path: &str,
    ) -> Result<BoxStream<pb::ArchiveGetResponse>> {
        use pb::archive_get_response::Part;
        let ctr = self.get(input)?;
        let view = self.view(&ctr, true).await?;
        let (cpath, host) = view.resolve(path, false)?;
        let stat = stat_of(&cpath, &host)?;
        let (tx, rx) = mpsc::channel(4);
        tx.send(Ok(pb::ArchiveGetResponse {
            part: Some(Part::Stat(stat.clone())),
        }))
        .await
        .map_err(|_| Error::internal("archive stream closed"))?;
        tokio::task::spawn_blocking(move || {
            let err_tx = tx.clone();
            let writer = ChunkWriter {
                tx,
                buf: Vec::with_capacity(CHUNK),
                wrap: |data| pb::ArchiveGetResponse {
                    part: Some(Part::Data(data)),
                },
            };
            let mut tar = tar::Builder::new(writer);
            let name = if stat.name == "/" {
                String::new()
            } else {
                stat.name.clone()
            };
            let result = append_tree(&mut tar, &view, &cpath, &host, &name)
                .and_then(|_| tar.into_inner())
                .and_then(|mut w| w.flush());
            if let Err(e) = result
                && e.kind() != std::io::ErrorKind::BrokenPipe
            {
                let _ = err_tx.blocking_send(Err(Error::internal("archive").with_source(e)));
            }
            drop(view);
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    /// `PUT /containers/{id}/archive`: extracts a tar into the directory `opts.path`.
    pub async fn archive_put(
        &self,
        opts: pb::ArchivePutOptions,
        mut data: mpsc::Receiver<Vec<u8>>,
    ) -> Result<()> {
        let ctr = self.get(&opts.id)?;
        let view = self.view(&ctr, true).await?;
        let (dir, host) = view.resolve(&opts.path, true)?;
        match std::fs::metadata(&host) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::invalid_argument(format!(
                    "extraction point is not a directory: {}",
                    opts.path
                )));
            }
            Err(_) => {
                return Err(Error::not_found(format!(
                    "Could not find the file {} in container {}",
                    opts.path, ctr.id
                )));
            }
        }
        let plan = PutPlan {
            view,
            dir,
            no_overwrite_dir_non_dir: opts.no_overwrite_dir_non_dir,
            copy_uid_gid: opts.copy_uid_gid,
        };
        // The tar stream arrives in chunks; a pipe turns them into a reader.
        let (reader, mut writer) = std::io::pipe()?;
        let extractor = tokio::task::spawn_blocking(move || extract(&plan, reader));
        let feeder = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            while let Some(chunk) = data.blocking_recv() {
                writer.write_all(&chunk)?;
            }
            Ok(())
        });
        let result = extractor
            .await
            .map_err(|e| Error::internal("extract task").with_source(e))?;
        let _ = feeder.await;
        result
    }

    /// `docker export`: the container's root filesystem (without volumes) as a tar.
    pub async fn export(&self, input: &str) -> Result<BoxStream<pb::ExportContainerResponse>> {
        let ctr = self.get(input)?;
        let view = self.view(&ctr, false).await?;
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let err_tx = tx.clone();
            let writer = ChunkWriter {
                tx,
                buf: Vec::with_capacity(CHUNK),
                wrap: |data| pb::ExportContainerResponse { data },
            };
            let mut tar = tar::Builder::new(writer);
            let root = view.root.clone();
            let result = std::fs::read_dir(&root)
                .and_then(|entries| {
                    let mut entries: Vec<_> = entries.flatten().collect();
                    entries.sort_by_key(|e| e.file_name());
                    for e in entries {
                        let name = e.file_name().to_string_lossy().into_owned();
                        append_tree(&mut tar, &view, &format!("/{name}"), &e.path(), &name)?;
                    }
                    Ok(())
                })
                .and_then(|_| tar.into_inner())
                .and_then(|mut w| w.flush());
            if let Err(e) = result
                && e.kind() != std::io::ErrorKind::BrokenPipe
            {
                let _ = err_tx.blocking_send(Err(Error::internal("export").with_source(e)));
            }
            drop(view);
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    /// `docker diff`: what the container changed against its image (overlay snapshots).
    pub async fn changes(&self, input: &str) -> Result<Vec<pb::Change>> {
        let ctr = self.get(input)?;
        let key = ctr.with(|r| r.c.snapshot_key.clone());
        let mounts = self.deps.snapshots.mounts(&key).await?;
        let [m] = mounts.as_slice() else {
            return Err(Error::unimplemented(
                "changes are only computed for overlay snapshots",
            ));
        };
        let (Some(upper), true) = (m.option("upperdir"), m.fstype == "overlay") else {
            return Err(Error::unimplemented(
                "changes are only computed for overlay snapshots",
            ));
        };
        let upper = PathBuf::from(upper);
        let lowers: Vec<PathBuf> = m.lowerdirs().into_iter().map(PathBuf::from).collect();
        let skip = ctr.with(|r| runtime_mount_points(&r.c));
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            diff_upper(&upper, &lowers, "", &skip, &mut out)?;
            out.sort_by(|a, b| a.path.cmp(&b.path));
            Ok(out)
        })
        .await
        .map_err(|e| Error::internal("changes task").with_source(e))?
    }
}

/// Paths whose entries in the upper layer the runtime made (berth's hosts/hostname/resolv.conf
/// bind targets, the kernel filesystems, and the container's mounts), not the container: left
/// out of `docker diff` and of a commit's layer.
pub(super) fn runtime_mount_points(c: &pb::Container) -> Vec<String> {
    [
        "/etc/hosts",
        "/etc/hostname",
        "/etc/resolv.conf",
        "/dev",
        "/proc",
        "/sys",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(c.mounts.iter().map(|m| m.destination.clone()))
    .collect()
}

fn is_mount_point(path: &Path) -> bool {
    let target = path.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| {
            info.lines()
                .any(|l| l.split_whitespace().nth(4) == Some(target.as_str()))
        })
        .unwrap_or(false)
}

/// Adds the changes under `rel` of an overlay upper dir to `out`; returns whether it added any.
///
/// A directory that the lower layers have is reported as changed only when something below it
/// is, or its own mode or owner differ: the runtime copies `/etc` up just to create the mount
/// points of the files berth generates (`skip`), which is no change of the container's (Docker
/// keeps those in an init layer, so a fresh container's diff is empty).
fn diff_upper(
    upper: &Path,
    lowers: &[PathBuf],
    rel: &str,
    skip: &[String],
    out: &mut Vec<pb::Change>,
) -> Result<bool> {
    let Ok(entries) = std::fs::read_dir(upper.join(rel.trim_start_matches('/'))) else {
        return Ok(false);
    };
    let mut any = false;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = format!("{rel}/{name}");
        let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
            continue;
        };
        let lower = lowers
            .iter()
            .find_map(|l| std::fs::symlink_metadata(l.join(path.trim_start_matches('/'))).ok());
        let in_lower = lower.is_some();
        let skipped = skip.contains(&path);
        if meta.file_type().is_char_device() && meta.rdev() == 0 {
            out.push(pb::Change {
                path,
                kind: pb::ChangeKind::Deleted.into(),
            });
            any = true;
            continue;
        }
        let below = if meta.is_dir() {
            // Everything below a new directory is new.
            let lowers: &[PathBuf] = if in_lower { lowers } else { &[] };
            diff_upper(upper, lowers, &path, skip, out)?
        } else {
            false
        };
        let own_change = match &lower {
            None => true,
            Some(l) if meta.is_dir() && l.is_dir() => {
                below || l.mode() != meta.mode() || l.uid() != meta.uid() || l.gid() != meta.gid()
            }
            Some(_) => true,
        };
        if !skipped && own_change {
            out.push(pb::Change {
                path: path.clone(),
                kind: if in_lower {
                    pb::ChangeKind::Modified
                } else {
                    pb::ChangeKind::Added
                }
                .into(),
            });
            any = true;
        }
        any |= below;
    }
    Ok(any)
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::ErrorKind;

    fn view(root: &Path, mounts: Vec<(String, PathBuf)>) -> View {
        View {
            root: root.to_path_buf(),
            mounts,
            map: None,
            _guard: None,
        }
    }

    #[test]
    fn resolution_stays_inside_the_container() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        let vol = t.path().join("vol");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(&vol).unwrap();
        std::fs::write(root.join("etc/passwd"), "x").unwrap();
        std::os::unix::fs::symlink("/etc", root.join("link")).unwrap();
        std::os::unix::fs::symlink("../../../../etc/passwd", root.join("up")).unwrap();
        std::fs::write(vol.join("f"), "v").unwrap();
        let v = view(&root, vec![("/data".into(), vol.clone())]);
        assert_eq!(
            v.resolve("/link/passwd", true).unwrap(),
            ("/etc/passwd".into(), root.join("etc/passwd"))
        );
        assert_eq!(v.resolve("/up", true).unwrap().0, "/etc/passwd");
        assert_eq!(v.resolve("/up", false).unwrap().0, "/up");
        assert_eq!(v.resolve("/../../data/f", true).unwrap().1, vol.join("f"));
        std::os::unix::fs::symlink("/loop", root.join("loop")).unwrap();
        assert!(v.resolve("/loop/x", true).is_err());
    }

    #[test]
    fn get_and_put_round_trip_a_tree() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("src/sub")).unwrap();
        std::fs::write(root.join("src/sub/a"), "hello").unwrap();
        std::os::unix::fs::symlink("sub/a", root.join("src/l")).unwrap();
        std::fs::create_dir_all(root.join("dst")).unwrap();
        let v = view(&root, vec![]);
        let mut tar = tar::Builder::new(Vec::new());
        let (c, h) = v.resolve("/src", false).unwrap();
        append_tree(&mut tar, &v, &c, &h, "src").unwrap();
        let bytes = tar.into_inner().unwrap();
        let stat = stat_of("/src/l", &root.join("src/l")).unwrap();
        assert_eq!(stat.link_target, "sub/a");
        let plan = PutPlan {
            view: view(&root, vec![]),
            dir: "/dst".into(),
            no_overwrite_dir_non_dir: true,
            copy_uid_gid: false,
        };
        extract(&plan, bytes.as_slice()).unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("dst/src/sub/a")).unwrap(),
            "hello"
        );
        assert_eq!(
            std::fs::read_link(root.join("dst/src/l")).unwrap(),
            Path::new("sub/a")
        );
        // A file over a directory is refused with no_overwrite_dir_non_dir.
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        tar.append_data(&mut h, "src", &b"x"[..]).unwrap();
        let bytes = tar.into_inner().unwrap();
        assert_eq!(
            extract(&plan, bytes.as_slice()).unwrap_err().kind(),
            ErrorKind::FailedPrecondition
        );
    }

    #[test]
    fn overlay_diff() {
        let t = tempfile::tempdir().unwrap();
        let (upper, lower) = (t.path().join("u"), t.path().join("l"));
        std::fs::create_dir_all(upper.join("etc")).unwrap();
        std::fs::create_dir_all(lower.join("etc")).unwrap();
        std::fs::create_dir_all(upper.join("new/deep")).unwrap();
        std::fs::write(lower.join("etc/passwd"), "").unwrap();
        std::fs::write(upper.join("etc/passwd"), "changed").unwrap();
        std::fs::write(upper.join("new/deep/f"), "").unwrap();
        // Copied up only to hold mount points: no change.
        std::fs::create_dir_all(upper.join("run")).unwrap();
        std::fs::create_dir_all(lower.join("run")).unwrap();
        std::fs::write(upper.join("run/hosts"), "").unwrap();
        let mut out = Vec::new();
        let skip = ["/run/hosts".to_string()];
        diff_upper(&upper, &[lower], "", &skip, &mut out).unwrap();
        out.sort_by(|a, b| a.path.cmp(&b.path));
        let got: Vec<(String, i32)> = out.into_iter().map(|c| (c.path, c.kind)).collect();
        assert_eq!(
            got,
            [
                ("/etc".to_string(), pb::ChangeKind::Modified as i32),
                ("/etc/passwd".to_string(), pb::ChangeKind::Modified as i32),
                ("/new".to_string(), pb::ChangeKind::Added as i32),
                ("/new/deep".to_string(), pb::ChangeKind::Added as i32),
                ("/new/deep/f".to_string(), pb::ChangeKind::Added as i32),
            ]
        );
    }
}
