//! The snapshotter as one unpack mapping sees it.
//!
//! With a container id map (userns-remap or rootless, see `berth_core::userns`) layers are
//! unpacked twice over at most: shifted through the map for containers with a user namespace,
//! and as the image says for `--userns=host` containers. Both live in the same snapshotter
//! under different names: the plain chain id, and the chain id with the map's suffix
//! (`<chain>@userns-<fingerprint>`). A [`SnapshotView`] hides that: the images service keeps
//! speaking chain ids, and the view adds its suffix on the way in, strips it on the way out,
//! and lists only its own snapshots (plus those of containers, which belong to nobody's
//! mapping), so garbage collection of one mapping never sees another's layers.
//!
//! A view is named like a snapshotter with the suffix (`overlayfs@userns-…`); that name is
//! what image records list in `unpacked_in`, so a mapping no longer configured is still
//! collected through a view of its name (without a map to unpack with).

use std::sync::Arc;

use berth_core::Result;
use berth_core::mount::Mount;
use berth_core::snapshots::{Info, Labels, RemoteSnapshotter, Snapshotter, Usage};
use berth_core::userns::{IdMap, SNAPSHOT_KEY_MARK};

use crate::service::EXTRACT_PREFIX;

/// A snapshotter seen through one mapping's names. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SnapshotView {
    inner: RemoteSnapshotter,
    /// `""` for the plain view, else `@userns-<fingerprint>`.
    suffix: String,
    /// The map layers of this view are unpacked with; `None` for the plain view and for the
    /// view of a mapping no longer configured (which can only be listed and removed).
    map: Option<Arc<IdMap>>,
}

impl SnapshotView {
    /// The view of `inner` with names suffixed by `suffix` (`""`: plain) whose layers are
    /// unpacked with `map`.
    pub fn new(inner: RemoteSnapshotter, suffix: String, map: Option<Arc<IdMap>>) -> Self {
        Self { inner, suffix, map }
    }

    /// The map layers are shifted through when unpacked in this view.
    pub fn map(&self) -> Option<&IdMap> {
        self.map.as_deref()
    }

    /// Whether this view shifts ids but cannot (a mapping no longer configured).
    pub fn is_stale(&self) -> bool {
        !self.suffix.is_empty() && self.map.is_none()
    }

    /// The snapshotter's name for the images service's `name`.
    pub fn key(&self, name: &str) -> String {
        format!("{name}{}", self.suffix)
    }

    /// The images service's name for the snapshotter's `name`, if it belongs to this view.
    /// Snapshots the images service did not name (container rootfs) belong to every view.
    fn local(&self, name: &str) -> Option<String> {
        if !self.suffix.is_empty()
            && let Some(base) = name.strip_suffix(&self.suffix)
        {
            return Some(base.to_string());
        }
        let ours = name.starts_with("sha256:") || name.starts_with(EXTRACT_PREFIX);
        if name.contains(SNAPSHOT_KEY_MARK) || (ours && !self.suffix.is_empty()) {
            return None;
        }
        Some(name.to_string())
    }

    fn translate(&self, mut info: Info) -> Option<Info> {
        info.name = self.local(&info.name)?;
        if let Some(p) = &info.parent {
            let stripped = if self.suffix.is_empty() {
                p.clone()
            } else {
                p.strip_suffix(&self.suffix).unwrap_or(p).to_string()
            };
            info.parent = Some(stripped);
        }
        Some(info)
    }
}

impl Snapshotter for SnapshotView {
    async fn stat(&self, key: &str) -> Result<Info> {
        let info = self.inner.stat(&self.key(key)).await?;
        let mut info = info;
        info.name = key.to_string();
        if let Some(p) = info.parent.take() {
            info.parent = Some(p.strip_suffix(&self.suffix).unwrap_or(&p).to_string());
        }
        Ok(info)
    }

    async fn update(&self, name: &str, labels: Labels, fieldpaths: &[String]) -> Result<Info> {
        let mut info = self
            .inner
            .update(&self.key(name), labels, fieldpaths)
            .await?;
        info.name = name.to_string();
        Ok(info)
    }

    async fn usage(&self, key: &str) -> Result<Usage> {
        self.inner.usage(&self.key(key)).await
    }

    async fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        self.inner.mounts(&self.key(key)).await
    }

    async fn prepare(&self, key: &str, parent: Option<&str>, labels: Labels) -> Result<Vec<Mount>> {
        let parent = parent.map(|p| self.key(p));
        self.inner
            .prepare(&self.key(key), parent.as_deref(), labels)
            .await
    }

    async fn view(&self, key: &str, parent: Option<&str>, labels: Labels) -> Result<Vec<Mount>> {
        let parent = parent.map(|p| self.key(p));
        self.inner
            .view(&self.key(key), parent.as_deref(), labels)
            .await
    }

    async fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()> {
        self.inner
            .commit(&self.key(name), &self.key(key), labels)
            .await
    }

    async fn remove(&self, key: &str) -> Result<()> {
        self.inner.remove(&self.key(key)).await
    }

    async fn list(&self, filters: &[String]) -> Result<Vec<Info>> {
        let all = self.inner.list(filters).await?;
        Ok(all.into_iter().filter_map(|i| self.translate(i)).collect())
    }

    async fn cleanup(&self) -> Result<()> {
        self.inner.cleanup().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(suffix: &str) -> SnapshotView {
        SnapshotView::new(
            RemoteSnapshotter::new("/nonexistent.sock", "overlayfs"),
            suffix.into(),
            None,
        )
    }

    #[tokio::test]
    async fn each_view_sees_its_own_layers_and_every_container() {
        let plain = view("");
        let mapped = view("@userns-abc");
        let other = view("@userns-def");
        let names = [
            "sha256:1",
            "sha256:1@userns-abc",
            "sha256:1@userns-def",
            "extract-x-1-ab",
            "extract-x-1-ab@userns-abc",
            "0123456789abcdef",
        ];
        let seen =
            |v: &SnapshotView| -> Vec<String> { names.iter().filter_map(|n| v.local(n)).collect() };
        assert_eq!(
            seen(&plain),
            ["sha256:1", "extract-x-1-ab", "0123456789abcdef"]
        );
        assert_eq!(
            seen(&mapped),
            ["sha256:1", "extract-x-1-ab", "0123456789abcdef"]
        );
        assert_eq!(seen(&other), ["sha256:1", "0123456789abcdef"]);
        assert_eq!(mapped.key("sha256:1"), "sha256:1@userns-abc");
        assert_eq!(plain.key("sha256:1"), "sha256:1");
        assert!(other.is_stale() && !plain.is_stale());
    }
}
