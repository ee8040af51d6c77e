//! The real `berth-snapshotter` binary behind the proxy: the conformance suite with both
//! drivers, a 200-layer chain, records across a restart, and `[proxy_plugins]` selection.

use berth_core::Config;
use berth_core::snapshots::{Kind, Labels, RemoteSnapshotter, Snapshotter};
use berth_integration::snapshotter_kit::{SnapshotterProcess, UnmountOnDrop, skip_unless_root};
use berth_snapshotter::conformance::Suite;

fn scratch(dir: &std::path::Path) -> std::path::PathBuf {
    let scratch = dir.join("mnt");
    std::fs::create_dir_all(&scratch).unwrap();
    scratch
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_overlayfs_conforms_and_mounts_200_layers() {
    if skip_unless_root("the snapshotter conformance suite") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _unmount = UnmountOnDrop(dir.path().to_path_buf());
    let process = SnapshotterProcess::start(dir.path(), "overlayfs")
        .await
        .unwrap();
    let remote = process.remote();
    let suite = Suite::new(&remote, &scratch(dir.path()));
    suite.run_all().await;
    suite.long_chain(200).await;
    assert!(
        remote.list(&[]).await.unwrap().is_empty(),
        "the suite removes what it made"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_native_conforms() {
    if skip_unless_root("the snapshotter conformance suite") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _unmount = UnmountOnDrop(dir.path().to_path_buf());
    let process = SnapshotterProcess::start(dir.path(), "native")
        .await
        .unwrap();
    Suite::new(&process.remote(), &scratch(dir.path()))
        .run_all()
        .await;
    assert!(process.data_dir().join("metadata.redb").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_survive_a_restart_and_proxy_plugins_select_the_snapshotter() {
    let dir = tempfile::tempdir().unwrap();
    let mut process = SnapshotterProcess::start(dir.path(), "native")
        .await
        .unwrap();
    let remote = process.remote();
    remote.prepare("a", None, Labels::new()).await.unwrap();
    remote
        .commit("A", "a", [("k".to_string(), "v".to_string())].into())
        .await
        .unwrap();
    remote.prepare("b", Some("A"), Labels::new()).await.unwrap();

    process.terminate();
    let err = remote.stat("A").await.unwrap_err();
    assert_eq!(
        err.kind(),
        berth_core::ErrorKind::Unavailable,
        "{}",
        err.chain()
    );
    process.restart().await.unwrap();
    // The same client reconnects.
    let info = remote.stat("A").await.unwrap();
    assert_eq!(
        (info.kind, info.labels["k"].as_str()),
        (Kind::Committed, "v")
    );
    assert_eq!(remote.stat("b").await.unwrap().parent.as_deref(), Some("A"));

    // The rest of berth finds the snapshotter from its config: berth-snapshotter's own socket
    // by default, or any external snapshotter named in [proxy_plugins] (here, the same binary
    // standing in for one).
    let mut config = Config {
        state_dir: process.state.clone(),
        root: process.root.clone(),
        ..Config::default()
    };
    assert_eq!(config.snapshotter_address(), process.socket);
    config.proxy_plugins.insert(
        "external".into(),
        berth_core::config::ProxyPlugin {
            kind: "snapshot".into(),
            address: process.socket.clone(),
        },
    );
    config.snapshotter.driver = "external".into();
    config.state_dir = dir.path().join("elsewhere");
    config.validate().unwrap();
    let via_config = RemoteSnapshotter::from_config(&config);
    assert_eq!(via_config.name(), "external");
    let names: Vec<String> = via_config
        .list(&[])
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, ["A", "b"]);
}
