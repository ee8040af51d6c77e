//! The conformance suite against both local drivers and against the gRPC proxy over a real Unix
//! socket (an in-process server; the integration tests do the same with the real binary).
//! Root-only: the suite performs the mounts the snapshotter returns.

use std::path::Path;

use berth_core::snapshots::{RemoteSnapshotter, SnapshotsService, Snapshotter};
use berth_snapshotter::conformance::{Suite, is_root};
use berth_snapshotter::{Driver, LocalSnapshotter};
use tokio_util::sync::CancellationToken;

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!(
                "skipping: the snapshotter conformance suite mounts filesystems and needs root"
            );
            return;
        }
    };
}

fn open(dir: &Path, driver: Driver) -> LocalSnapshotter {
    LocalSnapshotter::open(&dir.join("data"), driver).expect("open snapshotter")
}

fn scratch(dir: &Path) -> std::path::PathBuf {
    let scratch = dir.join("mnt");
    std::fs::create_dir_all(&scratch).unwrap();
    scratch
}

/// The local snapshotter served on a temp socket, and the proxy that talks to it.
struct Served {
    remote: RemoteSnapshotter,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<berth_core::Result<()>>,
}

impl Served {
    async fn start(dir: &Path, driver: Driver) -> Self {
        let socket = dir.join("snapshotter.sock");
        let listener = berth_core::uds::bind(&socket, 0o600, None).await.unwrap();
        let shutdown = CancellationToken::new();
        let router = berth_core::grpc::server()
            .add_service(SnapshotsService::new(open(dir, driver)).into_server());
        let server = tokio::spawn(berth_core::grpc::serve(
            router,
            listener,
            shutdown.clone().cancelled_owned(),
        ));
        Self {
            remote: RemoteSnapshotter::new(&socket, driver.name()),
            shutdown,
            server,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.server.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlayfs_conforms() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), Driver::Overlayfs);
    Suite::new(&s, &scratch(dir.path())).run_all().await;
    assert!(
        s.list(&[]).await.unwrap().is_empty(),
        "the suite removes what it made"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_conforms() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), Driver::Native);
    Suite::new(&s, &scratch(dir.path())).run_all().await;
    assert!(
        s.list(&[]).await.unwrap().is_empty(),
        "the suite removes what it made"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_over_a_socket_conforms() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(dir.path(), Driver::Overlayfs).await;
    Suite::new(&served.remote, &scratch(dir.path()))
        .run_all()
        .await;
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_to_native_conforms() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(dir.path(), Driver::Native).await;
    Suite::new(&served.remote, &scratch(dir.path()))
        .run_all()
        .await;
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlayfs_mounts_a_200_layer_chain() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), Driver::Overlayfs);
    Suite::new(&s, &scratch(dir.path())).long_chain(200).await;
}

/// Native chains have no option-length limit to hit (each snapshot is one bind mount) and cost
/// a copy of every parent file per layer, so a shorter chain shows the same thing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_handles_a_long_chain() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), Driver::Native);
    Suite::new(&s, &scratch(dir.path())).long_chain(64).await;
}

// The proxy's 200-layer chain runs against the real binary in
// integration/tests/snapshotter_binary.rs.
