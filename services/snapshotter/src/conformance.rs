//! The conformance suite every [`Snapshotter`] passes: berth's overlayfs and native backends,
//! and the gRPC proxy in front of either (or in front of any containerd proxy snapshotter).
//!
//! It performs the mounts the snapshotter returns (so it needs root: callers skip when
//! [`is_root`] is false) and checks what containerd's semantics promise: contents through parent
//! chains, whiteouts, read-only views, kinds and their transitions, errors, labels and update,
//! list filters, usage and cleanup. Every case works under its own unique key prefix, so the
//! suite can run against a snapshotter that holds other snapshots, and removes what it made.
//! Mounts are held by [`MountGuard`]s, so a failing case unmounts while it unwinds.
//!
//! ```no_run
//! # async fn demo(s: berth_snapshotter::LocalSnapshotter) {
//! use berth_snapshotter::conformance::Suite;
//! let scratch = std::env::temp_dir();
//! Suite::new(&s, &scratch).run_all().await;
//! Suite::new(&s, &scratch).long_chain(200).await;
//! # }
//! ```

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use berth_core::mount::{Mount, MountGuard};
use berth_core::snapshots::{Info, Kind, Labels, Snapshotter};
use berth_core::{ErrorKind, Result};

/// The cases [`Suite::run`] knows, in the order [`Suite::run_all`] runs them.
pub const CASES: &[&str] = &[
    "chain_contents",
    "whiteouts",
    "read_only_views",
    "kinds_and_errors",
    "remove_refuses_parents",
    "labels_and_update",
    "list_filters",
    "usage",
    "cleanup_keeps_live_snapshots",
];

/// Whether this process can mount (the suite needs it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

static RUNS: AtomicUsize = AtomicUsize::new(0);

/// The suite, bound to one snapshotter and a scratch directory for mount points.
#[derive(Debug)]
pub struct Suite<'a, S> {
    s: &'a S,
    scratch: PathBuf,
    prefix: String,
    mounts: AtomicUsize,
    check_messages: bool,
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn write(path: &Path, content: &str) {
    fs::write(path, content).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

#[track_caller]
fn expect_err<T: std::fmt::Debug>(result: Result<T>, kind: ErrorKind, what: &str) -> String {
    match result {
        Ok(v) => panic!("{what}: expected {kind}, got Ok({v:?})"),
        Err(e) => {
            assert_eq!(e.kind(), kind, "{what}: wrong error kind: {}", e.chain());
            e.chain()
        }
    }
}

#[track_caller]
fn expect_erofs(result: io::Result<()>, what: &str) {
    match result {
        Ok(()) => panic!("{what}: write to a read-only view succeeded"),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(libc::EROFS),
            "{what}: expected EROFS, got {e}"
        ),
    }
}

impl<'a, S: Snapshotter> Suite<'a, S> {
    /// A suite over `snapshotter`, making mount points under `scratch` (which must exist).
    pub fn new(snapshotter: &'a S, scratch: &Path) -> Self {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let run = RUNS.fetch_add(1, Ordering::Relaxed);
        Self {
            s: snapshotter,
            scratch: scratch.to_path_buf(),
            prefix: format!("conformance-{}-{run}-{nanos}", std::process::id()),
            mounts: AtomicUsize::new(0),
            check_messages: true,
        }
    }

    /// Stops checking that error messages name the snapshot concerned (berth's messages do;
    /// containerd's own service sometimes does not). Kinds are still checked.
    pub fn lenient_messages(mut self) -> Self {
        self.check_messages = false;
        self
    }

    #[track_caller]
    fn names(&self, message: &str, snapshot: &str) {
        if self.check_messages {
            assert!(
                message.contains(snapshot),
                "the error should name {snapshot:?}: {message}"
            );
        }
    }

    /// Runs every case in [`CASES`], printing each name as it starts.
    pub async fn run_all(&self) {
        for case in CASES {
            eprintln!("conformance: {case}");
            self.run(case).await;
        }
    }

    /// Runs one case by name.
    pub async fn run(&self, case: &str) {
        match case {
            "chain_contents" => self.chain_contents().await,
            "whiteouts" => self.whiteouts().await,
            "read_only_views" => self.read_only_views().await,
            "kinds_and_errors" => self.kinds_and_errors().await,
            "remove_refuses_parents" => self.remove_refuses_parents().await,
            "labels_and_update" => self.labels_and_update().await,
            "list_filters" => self.list_filters().await,
            "usage" => self.usage().await,
            "cleanup_keeps_live_snapshots" => self.cleanup_keeps_live_snapshots().await,
            other => panic!("no conformance case {other:?}"),
        }
    }

    fn key(&self, case: &str, name: &str) -> String {
        format!("{}/{case}/{name}", self.prefix)
    }

    #[track_caller]
    fn mount(&self, mounts: &[Mount]) -> MountGuard {
        let n = self.mounts.fetch_add(1, Ordering::Relaxed);
        let target = self
            .scratch
            .join(format!("{}-m{n}", self.prefix.replace('/', "_")));
        fs::create_dir_all(&target).unwrap_or_else(|e| panic!("create {}: {e}", target.display()));
        MountGuard::mount(mounts, &target)
            .unwrap_or_else(|e| panic!("mount {mounts:?}: {}", e.chain()))
    }

    #[track_caller]
    fn unmount(&self, guard: MountGuard) {
        let target = guard.target().to_path_buf();
        guard
            .unmount()
            .unwrap_or_else(|e| panic!("unmount: {}", e.chain()));
        let _ = fs::remove_dir(target);
    }

    async fn prepare(&self, key: &str, parent: Option<&str>) -> Vec<Mount> {
        self.s
            .prepare(key, parent, Labels::new())
            .await
            .unwrap_or_else(|e| panic!("prepare {key}: {}", e.chain()))
    }

    async fn view(&self, key: &str, parent: Option<&str>) -> Vec<Mount> {
        self.s
            .view(key, parent, Labels::new())
            .await
            .unwrap_or_else(|e| panic!("view {key}: {}", e.chain()))
    }

    async fn commit(&self, name: &str, key: &str) {
        self.s
            .commit(name, key, Labels::new())
            .await
            .unwrap_or_else(|e| panic!("commit {key} as {name}: {}", e.chain()));
    }

    async fn remove(&self, key: &str) {
        self.s
            .remove(key)
            .await
            .unwrap_or_else(|e| panic!("remove {key}: {}", e.chain()));
    }

    async fn stat(&self, key: &str) -> Info {
        self.s
            .stat(key)
            .await
            .unwrap_or_else(|e| panic!("stat {key}: {}", e.chain()))
    }

    /// A committed snapshot on `parent` whose layer is written by `fill` through its mounts.
    async fn layer(
        &self,
        case: &str,
        name: &str,
        parent: Option<&str>,
        fill: impl FnOnce(&Path),
    ) -> String {
        let active = self.key(case, &format!("{name}-active"));
        let mounts = self.prepare(&active, parent).await;
        let guard = self.mount(&mounts);
        fill(guard.target());
        self.unmount(guard);
        let committed = self.key(case, name);
        self.commit(&committed, &active).await;
        committed
    }

    async fn chain_contents(&self) {
        let case = "chain";
        let base = self
            .layer(case, "base", None, |root| {
                write(&root.join("a"), "base");
                fs::create_dir(root.join("d")).unwrap();
                write(&root.join("d/x"), "x");
                std::os::unix::fs::symlink("a", root.join("link")).unwrap();
            })
            .await;
        let info = self.stat(&base).await;
        assert_eq!((info.kind, info.parent.as_deref()), (Kind::Committed, None));
        expect_err(
            self.s.stat(&self.key(case, "base-active")).await,
            ErrorKind::NotFound,
            "stat a committed key",
        );

        let child = self
            .layer(case, "child", Some(&base), |root| {
                assert_eq!(
                    read(&root.join("a")),
                    "base",
                    "the parent's file shows through"
                );
                assert_eq!(read(&root.join("d/x")), "x");
                write(&root.join("a"), "child");
                write(&root.join("b"), "b");
            })
            .await;
        let top = self
            .layer(case, "top", Some(&child), |root| {
                assert_eq!(read(&root.join("a")), "child");
                write(&root.join("d/y"), "y");
            })
            .await;
        assert_eq!(
            self.stat(&top).await.parent.as_deref(),
            Some(child.as_str())
        );

        let view = self.key(case, "view");
        let mounts = self.view(&view, Some(&top)).await;
        assert_eq!(
            self.s.mounts(&view).await.unwrap(),
            mounts,
            "mounts repeats what view returned"
        );
        let guard = self.mount(&mounts);
        let root = guard.target();
        assert_eq!(
            read(&root.join("a")),
            "child",
            "an upper layer overrides a lower one"
        );
        assert_eq!(read(&root.join("b")), "b");
        assert_eq!(read(&root.join("d/x")), "x");
        assert_eq!(
            read(&root.join("d/y")),
            "y",
            "directories merge across layers"
        );
        assert_eq!(fs::read_link(root.join("link")).unwrap(), Path::new("a"));
        assert_eq!(read(&root.join("link")), "child");
        self.unmount(guard);

        let active = self.key(case, "active");
        let mounts = self.prepare(&active, Some(&top)).await;
        assert_eq!(
            self.s.mounts(&active).await.unwrap(),
            mounts,
            "mounts repeats what prepare returned"
        );
        let guard = self.mount(&mounts);
        write(&guard.target().join("a"), "active");
        self.unmount(guard);
        // The write went to the active snapshot only.
        let guard = self.mount(&self.s.mounts(&view).await.unwrap());
        assert_eq!(read(&guard.target().join("a")), "child");
        self.unmount(guard);

        for key in [&view, &active, &top, &child, &base] {
            self.remove(key).await;
        }
    }

    async fn whiteouts(&self) {
        let case = "whiteouts";
        let base = self
            .layer(case, "base", None, |root| {
                write(&root.join("keep"), "keep");
                write(&root.join("gone"), "gone");
                write(&root.join("hidden"), "hidden");
                fs::create_dir(root.join("dir")).unwrap();
                write(&root.join("dir/inner"), "inner");
            })
            .await;
        // Deleting through the mount: overlay records whiteouts in the upper layer, native
        // deletes from its copy; either way the files are gone above.
        let deleted = self
            .layer(case, "deleted", Some(&base), |root| {
                fs::remove_file(root.join("gone")).unwrap();
                fs::remove_dir_all(root.join("dir")).unwrap();
                assert!(!exists(&root.join("gone")));
            })
            .await;

        // An unpacker writes overlay whiteouts (character device 0/0) straight into the upper
        // directory: check that such a layer hides what is below it.
        let active = self.key(case, "mknod-active");
        let mounts = self.prepare(&active, Some(&deleted)).await;
        let upper = mounts
            .iter()
            .find_map(|m| m.option("upperdir"))
            .map(PathBuf::from);
        if let Some(upper) = &upper {
            nix::sys::stat::mknod(
                &upper.join("hidden"),
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::empty(),
                nix::sys::stat::makedev(0, 0),
            )
            .unwrap_or_else(|e| panic!("mknod whiteout in {}: {e}", upper.display()));
        } else {
            let guard = self.mount(&mounts);
            fs::remove_file(guard.target().join("hidden")).unwrap();
            self.unmount(guard);
        }
        let hiding = self.key(case, "hiding");
        self.commit(&hiding, &active).await;

        // A layer above a whiteout can bring the name back.
        let back = self
            .layer(case, "back", Some(&hiding), |root| {
                write(&root.join("gone"), "back")
            })
            .await;

        let view = self.key(case, "view");
        let guard = self.mount(&self.view(&view, Some(&hiding)).await);
        let root = guard.target();
        assert_eq!(read(&root.join("keep")), "keep");
        assert!(
            !exists(&root.join("gone")),
            "a file deleted in a layer stays deleted above it"
        );
        assert!(
            !exists(&root.join("dir")),
            "a directory deleted in a layer stays deleted above it"
        );
        assert!(
            !exists(&root.join("hidden")),
            "a 0/0 whiteout in an upper layer hides the lower file"
        );
        let names: Vec<_> = fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["keep"], "whiteouts are not listed");
        self.unmount(guard);

        let view2 = self.key(case, "view-back");
        let guard = self.mount(&self.view(&view2, Some(&back)).await);
        assert_eq!(read(&guard.target().join("gone")), "back");
        self.unmount(guard);

        for key in [&view2, &view, &back, &hiding, &deleted, &base] {
            self.remove(key).await;
        }
    }

    async fn read_only_views(&self) {
        let case = "ro";
        let empty = self.key(case, "empty-view");
        let guard = self.mount(&self.view(&empty, None).await);
        expect_erofs(
            fs::write(guard.target().join("x"), "x"),
            "view without parent",
        );
        self.unmount(guard);

        let base = self
            .layer(case, "base", None, |root| write(&root.join("f"), "base"))
            .await;
        let one = self.key(case, "one-parent");
        let guard = self.mount(&self.view(&one, Some(&base)).await);
        assert_eq!(read(&guard.target().join("f")), "base");
        expect_erofs(
            fs::write(guard.target().join("f"), "x"),
            "view of one layer (overwrite)",
        );
        expect_erofs(
            fs::write(guard.target().join("new"), "x"),
            "view of one layer (create)",
        );
        self.unmount(guard);

        let second = self
            .layer(case, "second", Some(&base), |root| {
                write(&root.join("g"), "second")
            })
            .await;
        let two = self.key(case, "two-parents");
        let guard = self.mount(&self.view(&two, Some(&second)).await);
        assert_eq!(read(&guard.target().join("f")), "base");
        assert_eq!(read(&guard.target().join("g")), "second");
        expect_erofs(
            fs::write(guard.target().join("g"), "x"),
            "view of two layers (overwrite)",
        );
        expect_erofs(
            fs::create_dir(guard.target().join("d")),
            "view of two layers (mkdir)",
        );
        expect_erofs(
            fs::remove_file(guard.target().join("f")),
            "view of two layers (unlink)",
        );
        self.unmount(guard);

        // The layers themselves were not touched.
        let check = self.key(case, "check");
        let guard = self.mount(&self.prepare(&check, Some(&second)).await);
        assert_eq!(read(&guard.target().join("f")), "base");
        assert!(!exists(&guard.target().join("new")));
        write(&guard.target().join("f"), "writable");
        self.unmount(guard);

        for key in [&check, &two, &one, &empty, &second, &base] {
            self.remove(key).await;
        }
    }

    async fn kinds_and_errors(&self) {
        let case = "kinds";
        let s = self.s;
        let active = self.key(case, "active");
        let before = SystemTime::now() - std::time::Duration::from_secs(60);
        self.prepare(&active, None).await;
        let info = self.stat(&active).await;
        assert_eq!(info.kind, Kind::Active);
        assert!(
            info.created_at > before && info.updated_at >= info.created_at,
            "{info:?}"
        );

        let msg = expect_err(
            s.prepare(&active, None, Labels::new()).await,
            ErrorKind::AlreadyExists,
            "prepare twice",
        );
        self.names(&msg, &active);
        expect_err(
            s.view(&active, None, Labels::new()).await,
            ErrorKind::AlreadyExists,
            "view onto an active key",
        );
        // berth answers InvalidArgument; containerd's own service an unclassified error. Both refuse.
        assert!(
            s.prepare("", None, Labels::new()).await.is_err(),
            "an empty key is refused"
        );

        let missing = self.key(case, "missing");
        let msg = expect_err(
            s.prepare(&self.key(case, "x"), Some(&missing), Labels::new())
                .await,
            ErrorKind::NotFound,
            "missing parent",
        );
        self.names(&msg, &missing);
        expect_err(
            s.prepare(&self.key(case, "x"), Some(&active), Labels::new())
                .await,
            ErrorKind::InvalidArgument,
            "active parent",
        );
        let view = self.key(case, "view");
        self.view(&view, None).await;
        assert_eq!(self.stat(&view).await.kind, Kind::View);
        expect_err(
            s.view(&self.key(case, "x"), Some(&view), Labels::new())
                .await,
            ErrorKind::InvalidArgument,
            "view parent",
        );
        expect_err(
            s.stat(&self.key(case, "x")).await,
            ErrorKind::NotFound,
            "a failed prepare leaves nothing",
        );

        expect_err(
            s.commit(&self.key(case, "c"), &view, Labels::new()).await,
            ErrorKind::FailedPrecondition,
            "commit a view",
        );
        expect_err(
            s.commit(&self.key(case, "c"), &missing, Labels::new())
                .await,
            ErrorKind::NotFound,
            "commit a missing key",
        );

        let committed = self.key(case, "committed");
        self.commit(&committed, &active).await;
        assert_eq!(self.stat(&committed).await.kind, Kind::Committed);
        expect_err(
            s.stat(&active).await,
            ErrorKind::NotFound,
            "the key is gone after commit",
        );
        expect_err(
            s.commit(&self.key(case, "again"), &committed, Labels::new())
                .await,
            ErrorKind::FailedPrecondition,
            "commit a committed snapshot",
        );
        let msg = expect_err(
            s.mounts(&committed).await,
            ErrorKind::FailedPrecondition,
            "mounts of a committed snapshot",
        );
        self.names(&msg, &committed);
        expect_err(
            s.mounts(&missing).await,
            ErrorKind::NotFound,
            "mounts of a missing key",
        );

        // Keys and names share one namespace.
        expect_err(
            s.prepare(&committed, None, Labels::new()).await,
            ErrorKind::AlreadyExists,
            "prepare onto a name",
        );
        let second = self.key(case, "second");
        self.prepare(&second, Some(&committed)).await;
        expect_err(
            s.commit(&committed, &second, Labels::new()).await,
            ErrorKind::AlreadyExists,
            "commit onto a name",
        );
        expect_err(
            s.commit(&view, &second, Labels::new()).await,
            ErrorKind::AlreadyExists,
            "commit onto a key",
        );
        assert_eq!(
            self.stat(&second).await.kind,
            Kind::Active,
            "a refused commit changes nothing"
        );

        expect_err(
            s.remove(&missing).await,
            ErrorKind::NotFound,
            "remove a missing key",
        );
        expect_err(
            s.usage(&missing).await,
            ErrorKind::NotFound,
            "usage of a missing key",
        );
        expect_err(
            s.update(&missing, Labels::new(), &["labels".to_string()])
                .await,
            ErrorKind::NotFound,
            "update a missing key",
        );

        for key in [&second, &view, &committed] {
            self.remove(key).await;
        }
        expect_err(
            s.stat(&committed).await,
            ErrorKind::NotFound,
            "stat after remove",
        );
        // A removed name can be used again.
        self.prepare(&committed, None).await;
        self.remove(&committed).await;
    }

    async fn remove_refuses_parents(&self) {
        let case = "remove";
        let s = self.s;
        let base = self
            .layer(case, "base", None, |root| write(&root.join("f"), "f"))
            .await;
        let child = self.key(case, "child");
        self.prepare(&child, Some(&base)).await;
        let view = self.key(case, "view");
        self.view(&view, Some(&base)).await;
        let msg = expect_err(
            s.remove(&base).await,
            ErrorKind::FailedPrecondition,
            "remove a parent",
        );
        self.names(&msg, &base);
        self.remove(&child).await;
        expect_err(
            s.remove(&base).await,
            ErrorKind::FailedPrecondition,
            "remove a parent with a view",
        );
        self.remove(&view).await;

        let upper = self.layer(case, "upper", Some(&base), |_| {}).await;
        expect_err(
            s.remove(&base).await,
            ErrorKind::FailedPrecondition,
            "remove a committed parent",
        );
        // The parent still works after refusals.
        let check = self.key(case, "check");
        let guard = self.mount(&self.view(&check, Some(&upper)).await);
        assert_eq!(read(&guard.target().join("f")), "f");
        self.unmount(guard);
        for key in [&check, &upper, &base] {
            self.remove(key).await;
        }
        expect_err(s.stat(&base).await, ErrorKind::NotFound, "removed");
    }

    async fn labels_and_update(&self) {
        let case = "labels";
        let s = self.s;
        let key = self.key(case, "a");
        s.prepare(&key, None, labels(&[("a", "1"), ("b", "2")]))
            .await
            .unwrap();
        let created = self.stat(&key).await;
        assert_eq!(created.labels, labels(&[("a", "1"), ("b", "2")]));

        let path = |p: &str| vec![p.to_string()];
        let info = s
            .update(
                &key,
                labels(&[("a", "10"), ("zz", "ignored")]),
                &path("labels.a"),
            )
            .await
            .unwrap();
        assert_eq!(
            info.labels,
            labels(&[("a", "10"), ("b", "2")]),
            "labels.<key> sets one label"
        );
        assert_eq!(info.created_at, created.created_at);
        assert!(info.updated_at >= created.updated_at);
        assert_eq!(
            (info.kind, info.name.as_str()),
            (Kind::Active, key.as_str())
        );

        let info = s
            .update(&key, Labels::new(), &path("labels.b"))
            .await
            .unwrap();
        assert_eq!(
            info.labels,
            labels(&[("a", "10")]),
            "labels.<key> absent from the labels deletes it"
        );
        let info = s
            .update(&key, labels(&[("c", "3")]), &path("labels"))
            .await
            .unwrap();
        assert_eq!(
            info.labels,
            labels(&[("c", "3")]),
            "labels replaces them all"
        );
        let info = s.update(&key, labels(&[("d", "4")]), &[]).await.unwrap();
        assert_eq!(
            info.labels,
            labels(&[("d", "4")]),
            "no paths replaces them all"
        );
        let info = s
            .update(
                &key,
                labels(&[("x.y/z", "5"), ("d", "4")]),
                &["labels.x.y/z".to_string()],
            )
            .await
            .unwrap();
        assert_eq!(
            info.labels,
            labels(&[("d", "4"), ("x.y/z", "5")]),
            "keys may contain dots and slashes"
        );
        expect_err(
            s.update(&key, Labels::new(), &path("parent")).await,
            ErrorKind::InvalidArgument,
            "update parent",
        );
        assert_eq!(
            self.stat(&key).await.labels,
            labels(&[("d", "4"), ("x.y/z", "5")])
        );

        let name = self.key(case, "committed");
        s.commit(&name, &key, labels(&[("e", "5")])).await.unwrap();
        assert_eq!(
            self.stat(&name).await.labels,
            labels(&[("e", "5")]),
            "commit sets the labels it is given"
        );
        let info = s
            .update(&name, labels(&[("f", "6")]), &path("labels.f"))
            .await
            .unwrap();
        assert_eq!(
            info.labels,
            labels(&[("e", "5"), ("f", "6")]),
            "committed snapshots take label updates"
        );
        self.remove(&name).await;
    }

    async fn list_filters(&self) {
        let case = "list";
        let s = self.s;
        let tag = self.prefix.clone();
        let scope = format!("labels.conformance=={tag}");
        let l = |extra: &[(&str, &str)]| {
            let mut l = labels(&[("conformance", &tag)]);
            l.extend(labels(extra));
            l
        };
        let c1_active = self.key(case, "c1-active");
        s.prepare(&c1_active, None, Labels::new()).await.unwrap();
        let c1 = self.key(case, "c1");
        s.commit(&c1, &c1_active, l(&[("tier", "base")]))
            .await
            .unwrap();
        let c2_active = self.key(case, "c2-active");
        s.prepare(&c2_active, Some(&c1), Labels::new())
            .await
            .unwrap();
        let c2 = self.key(case, "c2");
        s.commit(&c2, &c2_active, l(&[("tier", "app"), ("x.y/z", "1")]))
            .await
            .unwrap();
        let a1 = self.key(case, "a1");
        s.prepare(&a1, Some(&c2), l(&[])).await.unwrap();
        let v1 = self.key(case, "v1");
        s.view(&v1, Some(&c1), l(&[("tier", "app")])).await.unwrap();
        let other = self.key(case, "unlabelled");
        s.view(&other, None, Labels::new()).await.unwrap();

        let names = |filters: Vec<String>| async move {
            let infos = s
                .list(&filters)
                .await
                .unwrap_or_else(|e| panic!("list {filters:?}: {}", e.chain()));
            let mut names: Vec<String> = infos.into_iter().map(|i| i.name).collect();
            names.sort();
            names
        };
        let with = |extra: &str| format!("{scope},{extra}");
        let sorted = |v: &[&String]| {
            let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
            v.sort();
            v
        };

        assert_eq!(
            names(vec![scope.clone()]).await,
            sorted(&[&c1, &c2, &a1, &v1])
        );
        let all = names(vec![]).await;
        for key in [&c1, &c2, &a1, &v1, &other] {
            assert!(
                all.contains(key),
                "no filters lists everything ({key} missing)"
            );
        }
        let full = s.list(&[with(&format!("name==\"{c2}\""))]).await.unwrap();
        assert_eq!(full.len(), 1);
        assert_eq!(full[0].parent.as_deref(), Some(c1.as_str()));
        assert_eq!(full[0].kind, Kind::Committed);
        assert_eq!(full[0].labels, l(&[("tier", "app"), ("x.y/z", "1")]));

        assert_eq!(
            names(vec![with("kind==committed")]).await,
            sorted(&[&c1, &c2])
        );
        assert_eq!(
            names(vec![with("kind!=committed")]).await,
            sorted(&[&a1, &v1])
        );
        assert_eq!(
            names(vec![with(&format!("parent==\"{c1}\""))]).await,
            sorted(&[&c2, &v1])
        );
        assert_eq!(
            names(vec![with("parent!=\"\"")]).await,
            sorted(&[&c2, &a1, &v1])
        );
        assert_eq!(
            names(vec![with("labels.tier==app")]).await,
            sorted(&[&c2, &v1])
        );
        assert_eq!(
            names(vec![with("labels.tier==app,kind==view")]).await,
            sorted(&[&v1])
        );
        assert_eq!(names(vec![with("labels.\"x.y/z\"")]).await, sorted(&[&c2]));
        assert_eq!(
            names(vec![with("kind==view"), with("kind==active")]).await,
            sorted(&[&a1, &v1]),
            "several filters are OR-ed"
        );
        assert_eq!(
            names(vec![with("labels.tier==nothing")]).await,
            Vec::<String>::new()
        );
        // berth answers InvalidArgument; containerd 1.6 sends its parse error unclassified.
        assert!(
            s.list(&["labels.\"unterminated".to_string()])
                .await
                .is_err(),
            "a bad filter is refused"
        );

        for key in [&other, &v1, &a1, &c2, &c1] {
            self.remove(key).await;
        }
    }

    async fn usage(&self) {
        let case = "usage";
        let s = self.s;
        let active = self.key(case, "active");
        let mounts = self.prepare(&active, None).await;
        let empty = s.usage(&active).await.unwrap();
        let guard = self.mount(&mounts);
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
        fs::write(guard.target().join("blob"), &data).unwrap();
        fs::create_dir(guard.target().join("dir")).unwrap();
        write(&guard.target().join("dir/small"), "small");
        nix::unistd::sync();
        self.unmount(guard);
        let used = s.usage(&active).await.unwrap();
        assert!(
            used.size - empty.size >= 1 << 20,
            "1 MiB written: {empty:?} → {used:?}"
        );
        assert!(
            used.inodes - empty.inodes >= 3,
            "3 inodes made: {empty:?} → {used:?}"
        );

        let committed = self.key(case, "committed");
        self.commit(&committed, &active).await;
        let cached = s.usage(&committed).await.unwrap();
        assert_eq!(
            cached, used,
            "committing does not change what the layer uses"
        );

        // A child's usage is its own (with native, its own copy), and grows with its writes.
        let child = self.key(case, "child");
        let mounts = self.prepare(&child, Some(&committed)).await;
        let start = s.usage(&child).await.unwrap();
        let guard = self.mount(&mounts);
        fs::write(guard.target().join("more"), &data[..1 << 19]).unwrap();
        nix::unistd::sync();
        self.unmount(guard);
        let grown = s.usage(&child).await.unwrap();
        assert!(grown.size - start.size >= 1 << 19, "{start:?} → {grown:?}");
        assert_eq!(grown.inodes - start.inodes, 1, "{start:?} → {grown:?}");
        for key in [&child, &committed] {
            self.remove(key).await;
        }
    }

    async fn cleanup_keeps_live_snapshots(&self) {
        let case = "cleanup";
        let s = self.s;
        let base = self
            .layer(case, "base", None, |root| write(&root.join("f"), "base"))
            .await;
        let active = self.key(case, "active");
        let mounts = self.prepare(&active, Some(&base)).await;
        let guard = self.mount(&mounts);
        write(&guard.target().join("g"), "active");
        self.unmount(guard);
        let view = self.key(case, "view");
        self.view(&view, Some(&base)).await;

        // Cleanup is optional in containerd's API (its own service answers Unimplemented).
        match s.cleanup().await {
            Err(e) if e.kind() != ErrorKind::Unimplemented => panic!("cleanup: {}", e.chain()),
            _ => {}
        }

        let guard = self.mount(&s.mounts(&active).await.unwrap());
        assert_eq!(read(&guard.target().join("f")), "base");
        assert_eq!(read(&guard.target().join("g")), "active");
        self.unmount(guard);
        let guard = self.mount(&s.mounts(&view).await.unwrap());
        assert_eq!(read(&guard.target().join("f")), "base");
        self.unmount(guard);
        for key in [&view, &active, &base] {
            self.remove(key).await;
        }
    }

    /// A chain of `layers` committed snapshots, each adding a file and overriding `top`; a view
    /// and an active snapshot on the last one must see every file and the last `top`. With 200
    /// layers, overlay options no longer fit in one page.
    pub async fn long_chain(&self, layers: usize) {
        let case = "long-chain";
        let mut parent: Option<String> = None;
        for i in 0..layers {
            let name = self
                .layer(case, &format!("l{i}"), parent.as_deref(), |root| {
                    write(&root.join(format!("f{i:04}")), &i.to_string());
                    write(&root.join("top"), &i.to_string());
                })
                .await;
            parent = Some(name);
        }
        let top = parent.expect("at least one layer");

        let view = self.key(case, "view");
        let mounts = self.view(&view, Some(&top)).await;
        let guard = self.mount(&mounts);
        for i in 0..layers {
            assert_eq!(
                read(&guard.target().join(format!("f{i:04}"))),
                i.to_string(),
                "layer {i}'s file"
            );
        }
        assert_eq!(
            read(&guard.target().join("top")),
            (layers - 1).to_string(),
            "the topmost layer wins"
        );
        assert_eq!(fs::read_dir(guard.target()).unwrap().count(), layers + 1);
        expect_erofs(
            fs::write(guard.target().join("x"), "x"),
            "view of a long chain",
        );
        self.unmount(guard);

        let active = self.key(case, "active");
        let guard = self.mount(&self.prepare(&active, Some(&top)).await);
        assert_eq!(read(&guard.target().join("f0000")), "0");
        write(&guard.target().join("top"), "active");
        assert_eq!(read(&guard.target().join("top")), "active");
        self.unmount(guard);

        self.remove(&view).await;
        self.remove(&active).await;
        for i in (0..layers).rev() {
            self.remove(&self.key(case, &format!("l{i}"))).await;
        }
    }
}
