//! Swapping both ways with a real containerd (Debian's 1.6, on its own temp root, state and
//! socket):
//! - containerd uses berth-snapshotter as its proxy snapshotter `berth`: `ctr images import`
//!   unpacks into it, `ctr run` runs on it, `ctr snapshots ls` lists the chain;
//! - berth's proxy (and the conformance suite) uses containerd's own snapshotter.

use std::collections::BTreeMap;
use std::time::Duration;

use berth_core::snapshots::{Kind, RemoteSnapshotter, Snapshotter};
use berth_integration::snapshotter_kit::{
    Containerd, SnapshotterProcess, UnmountOnDrop, build_images, skip_unless_installed,
    skip_unless_root,
};
use berth_snapshotter::conformance::Suite;

const MINUTE: Duration = Duration::from_secs(60);

fn skip() -> bool {
    skip_unless_root("the containerd interop test")
        || skip_unless_installed(&["containerd", "ctr", "runc", "python3"])
}

/// `ctr snapshots ls` rows: key → (parent, kind).
fn snapshot_rows(out: &str) -> BTreeMap<String, (String, String)> {
    out.lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            match cols.as_slice() {
                [key, kind] => Some((key.to_string(), (String::new(), kind.to_string()))),
                [key, parent, kind] => {
                    Some((key.to_string(), (parent.to_string(), kind.to_string())))
                }
                _ => None,
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_imports_and_runs_on_berth_snapshotter() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _unmount = UnmountOnDrop(dir.path().to_path_buf());
    let images = build_images(&dir.path().join("images"), &["busybox", "layered"]).unwrap();
    let snapshotter = SnapshotterProcess::start(&dir.path().join("berth"), "overlayfs")
        .await
        .unwrap();
    let containerd = Containerd::start(&dir.path().join("ctrd"), &snapshotter.socket, true)
        .await
        .unwrap();
    let ctr = |args: &'static [&'static str]| containerd.ctr(args, MINUTE);

    let plugins = ctr(&["plugins", "ls"]).await.unwrap().stdout;
    let berth = plugins
        .lines()
        .find(|l| l.contains("io.containerd.snapshotter.v1") && l.contains("berth"));
    assert!(
        berth.is_some_and(|l| l.trim_end().ends_with("ok")),
        "proxy plugin not loaded:\n{plugins}"
    );

    for image in ["busybox", "layered"] {
        let tar = images.join(image).join("image.tar");
        containerd
            .ctr(
                &[
                    "images",
                    "import",
                    "--snapshotter",
                    "berth",
                    tar.to_str().unwrap(),
                ],
                MINUTE,
            )
            .await
            .unwrap_or_else(|e| panic!("{e:#}\ncontainerd log:\n{}", containerd.log_text()));
    }
    let names = ctr(&["images", "ls", "-q"]).await.unwrap().stdout;
    assert!(
        names
            .lines()
            .any(|n| n == "docker.io/library/busybox:latest"),
        "{names}"
    );

    let out = ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "berth",
        "docker.io/library/busybox:latest",
        "berth-echo",
        "echo",
        "hi",
    ])
    .await
    .unwrap_or_else(|e| panic!("{e:#}\ncontainerd log:\n{}", containerd.log_text()));
    assert_eq!(out.stdout, "hi\n");

    // containerd unpacked the layered image (whiteouts, an opaque directory) into berth's
    // overlay snapshots: the container sees the final view the image defines.
    let out = ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "berth",
        "docker.io/library/layered:latest",
        "berth-layered",
        "sh",
        "-c",
        "ls -A /data; echo --; ls -A /data/dir",
    ])
    .await
    .unwrap_or_else(|e| panic!("{e:#}\ncontainerd log:\n{}", containerd.log_text()));
    let (data, sub) = out.stdout.split_once("--\n").expect("two listings");
    let data: Vec<&str> = data.split_whitespace().collect();
    assert_eq!(
        data,
        ["b", "dir", "hard", "link", "secret", "suid"],
        "{}",
        out.stdout
    );
    assert_eq!(
        sub.split_whitespace().collect::<Vec<_>>(),
        ["y"],
        "{}",
        out.stdout
    );

    // The chain as containerd lists it: layered's three layers, each on the one before.
    let ls = ctr(&["snapshots", "--snapshotter", "berth", "ls"])
        .await
        .unwrap()
        .stdout;
    let rows = snapshot_rows(&ls);
    let committed: Vec<_> = rows
        .iter()
        .filter(|(_, (_, kind))| kind == "Committed")
        .collect();
    assert_eq!(committed.len(), 3, "{ls}");
    let roots: Vec<_> = committed
        .iter()
        .filter(|(_, (parent, _))| parent.is_empty())
        .collect();
    assert_eq!(roots.len(), 1, "one base layer:\n{ls}");
    let mut depth = 0;
    let mut cur = roots[0].0.clone();
    while let Some((child, _)) = committed.iter().find(|(_, (parent, _))| *parent == cur) {
        cur = child.to_string();
        depth += 1;
    }
    assert_eq!(depth, 2, "a chain of three:\n{ls}");

    // The same chain in berth's own records (containerd prefixes keys with namespace and id).
    let remote = snapshotter.remote();
    let ours = remote.list(&["kind==committed".to_string()]).await.unwrap();
    assert_eq!(ours.len(), 3, "{ours:#?}");
    for info in &ours {
        let chain_id = info.name.rsplit('/').next().unwrap();
        assert!(
            rows.contains_key(chain_id),
            "{} is not in ctr's list:\n{ls}",
            info.name
        );
    }
    assert_eq!(ours.iter().filter(|i| i.parent.is_none()).count(), 1);

    // `ctr run --rm` removed its containers' snapshots; containerd's GC passes the removals on.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = remote.list(&["kind!=committed".to_string()]).await.unwrap();
        if left.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "containerd never removed {left:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // And containerd's snapshot commands reach berth too.
    ctr(&["images", "rm", "--sync", "docker.io/library/layered:latest"])
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while remote
        .list(&["kind==committed".to_string()])
        .await
        .unwrap()
        .len()
        != 1
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "layered's own layers were never removed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let left = remote.list(&[]).await.unwrap();
    assert_eq!(left[0].kind, Kind::Committed);
}

/// The other direction: berth's proxy talks to containerd's own snapshots service (its built-in
/// overlayfs snapshotter) and the conformance suite holds there too, which checks that our
/// suite and containerd agree on the semantics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_proxy_uses_containerds_snapshotter() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _unmount = UnmountOnDrop(dir.path().to_path_buf());
    // The proxy plugin's socket is only dialled when used; berth-snapshotter is not needed here.
    let unused = dir.path().join("unused.sock");
    let containerd = Containerd::start(&dir.path().join("ctrd"), &unused, false)
        .await
        .unwrap();
    let remote = RemoteSnapshotter::new(&containerd.socket, "overlayfs")
        .with_namespace(&containerd.namespace)
        .unwrap();
    let scratch = dir.path().join("mnt");
    std::fs::create_dir_all(&scratch).unwrap();
    Suite::new(&remote, &scratch)
        .lenient_messages()
        .run_all()
        .await;
}
