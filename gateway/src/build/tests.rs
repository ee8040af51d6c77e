//! The executor against a fake backend: stream lines, history lines, cache decisions, cleanup.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use axum::http::StatusCode;
use berth_core::{Error, Result};
use berth_proto::berth::engine::v1 as engine;
use berth_proto::berth::types::v1 as types;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::backend::{BuildBackend, BuildImage, CommitSpec, RunEvent};
use super::executor::Executor;
use super::options::BuildOptions;
use super::output::{Msg, Output};
use crate::backend::{Fut, Stream};

const BASE: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

#[derive(Default)]
struct Inner {
    images: HashMap<String, BuildImage>,
    creates: Vec<engine::CreateContainerRequest>,
    commits: Vec<CommitSpec>,
    removed: Vec<String>,
    tags: Vec<(String, String)>,
    cache: HashMap<String, String>,
    /// Paths in the archives put into containers.
    put: Vec<Vec<String>>,
    counter: usize,
}

/// A backend that runs nothing: RUN's output is its command line, `false` fails, `sleep` never
/// ends.
#[derive(Default)]
struct FakeBuild(Mutex<Inner>);

impl FakeBuild {
    fn new() -> Self {
        let f = Self::default();
        f.0.lock().unwrap().images.insert(
            "docker.io/library/busybox:latest".into(),
            BuildImage {
                id: BASE.into(),
                config: json!({"config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]}}),
            },
        );
        f
    }

    fn id(&self, prefix: &str) -> String {
        let mut g = self.0.lock().unwrap();
        g.counter += 1;
        format!("{prefix}{:063x}", g.counter)
    }
}

fn ok<'a, T: Send + 'a>(v: T) -> Fut<'a, T> {
    Box::pin(async move { Ok(v) })
}

impl BuildBackend for FakeBuild {
    fn image(&self, name: &str) -> Fut<'_, Option<BuildImage>> {
        let g = self.0.lock().unwrap();
        let found = g
            .images
            .get(name)
            .cloned()
            .or_else(|| g.images.values().find(|i| i.id == name).cloned());
        ok(found)
    }
    fn pull(
        &self,
        reference: &str,
        _: Option<types::RegistryAuth>,
        _: Option<types::Platform>,
    ) -> Fut<'_, Stream<Value>> {
        let r = reference.to_string();
        Box::pin(async move { Err(Error::not_found(format!("pull access denied for {r}"))) })
    }
    fn create(&self, req: engine::CreateContainerRequest) -> Fut<'_, String> {
        let id = self.id("c");
        self.0.lock().unwrap().creates.push(req);
        ok(id)
    }
    fn run(&self, _id: &str) -> Fut<'_, Stream<RunEvent>> {
        let cmd = self
            .0
            .lock()
            .unwrap()
            .creates
            .last()
            .and_then(|c| c.config.as_ref())
            .and_then(|c| c.cmd.as_ref())
            .map(|c| c.values.join(" "))
            .unwrap_or_default();
        if cmd.contains("sleep") {
            return ok(futures::stream::pending().boxed());
        }
        let code = if cmd.ends_with("false") { 1 } else { 0 };
        let events = vec![
            Ok(RunEvent::Output(Bytes::from(format!("ran {cmd}\n")))),
            Ok(RunEvent::Exit(code)),
        ];
        ok(futures::stream::iter(events).boxed())
    }
    fn put_archive(&self, _id: &str, _dir: &str, tar: PathBuf) -> Fut<'_, ()> {
        let mut a = tar::Archive::new(std::fs::File::open(tar).unwrap());
        let names = a
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        self.0.lock().unwrap().put.push(names);
        ok(())
    }
    fn is_dir(&self, _id: &str, _path: &str) -> Fut<'_, bool> {
        ok(false)
    }
    fn empty_image(&self) -> Fut<'_, String> {
        ok(format!("sha256:{:064x}", 0xe))
    }
    fn get_archive(&self, _id: &str, _path: &str, _into: PathBuf) -> Fut<'_, ()> {
        Box::pin(async { Err(Error::not_found("no such file")) })
    }
    fn commit(&self, spec: CommitSpec) -> Fut<'_, String> {
        let id = format!("sha256:{}", &self.id("a")[1..]);
        let mut g = self.0.lock().unwrap();
        g.images.insert(
            id.clone(),
            BuildImage {
                id: id.clone(),
                config: json!({"config": spec.config}),
            },
        );
        g.commits.push(spec);
        ok(id)
    }
    fn commit_config(&self, _parent: &str, _cmd: Vec<String>, spec: CommitSpec) -> Fut<'_, String> {
        self.commit(spec)
    }
    fn remove_detached(&self, id: &str) -> Fut<'static, ()> {
        self.0.lock().unwrap().removed.push(id.to_string());
        Box::pin(async { Ok(()) })
    }
    fn remove(&self, id: &str) -> Fut<'_, ()> {
        self.0.lock().unwrap().removed.push(id.to_string());
        ok(())
    }
    fn tag(&self, id: &str, reference: &str) -> Fut<'_, ()> {
        self.0
            .lock()
            .unwrap()
            .tags
            .push((id.to_string(), reference.to_string()));
        ok(())
    }
    fn cache_lookup(&self, key: &str) -> Fut<'_, Option<String>> {
        ok(self.0.lock().unwrap().cache.get(key).cloned())
    }
    fn cache_store(&self, key: &str, image: &str, _: &str, _: &str) -> Fut<'_, ()> {
        self.0
            .lock()
            .unwrap()
            .cache
            .insert(key.to_string(), image.to_string());
        ok(())
    }
    fn cache_store_detached(&self, key: &str, image: &str, _: &str, _: &str) -> Fut<'static, ()> {
        self.0
            .lock()
            .unwrap()
            .cache
            .insert(key.to_string(), image.to_string());
        Box::pin(async { Ok(()) })
    }
}

struct Run {
    result: Result<String>,
    lines: Vec<String>,
    error: Option<String>,
}

impl Run {
    fn text(&self) -> String {
        self.lines.concat()
    }
}

async fn build_with(
    fake: &FakeBuild,
    dockerfile: &str,
    opts: &BuildOptions,
    ctx: &Path,
    cancel: CancellationToken,
) -> Run {
    let (tx, mut rx) = mpsc::channel(10_000);
    let scratch = tempfile::tempdir().unwrap();
    let mut out = Output::new(tx, opts.quiet, cancel);
    let df = berth_builder::dockerfile::parse(dockerfile).unwrap();
    let result = Executor::new(fake, opts, ctx, scratch.path(), &mut out)
        .run(df)
        .await;
    if let Err(e) = &result {
        out.fail(Error::internal(e.chain())).await;
    } else {
        drop(out);
    }
    let mut lines = Vec::new();
    let mut error = None;
    while let Ok(m) = rx.try_recv() {
        match m {
            Msg::Data(b) => {
                let v: Value = serde_json::from_slice(&b).unwrap();
                if let Some(s) = v["stream"].as_str() {
                    lines.push(s.to_string());
                } else if let Some(id) = v["aux"]["ID"].as_str() {
                    lines.push(format!("aux {id}\n"));
                }
            }
            Msg::Failed(e) => error = Some(e.chain()),
        }
    }
    Run {
        result,
        lines,
        error,
    }
}

fn opts() -> BuildOptions {
    BuildOptions {
        dockerfile: "Dockerfile".into(),
        rm: true,
        network_mode: "default".into(),
        tags: vec!["docker.io/library/x:latest".into()],
        ..Default::default()
    }
}

async fn build(fake: &FakeBuild, dockerfile: &str, ctx: &Path) -> Run {
    build_with(fake, dockerfile, &opts(), ctx, CancellationToken::new()).await
}

fn short(id: &str) -> String {
    crate::progress::short_digest(id)
}

#[tokio::test]
async fn stream_and_history_lines_as_the_classic_builder_writes_them() {
    let fake = FakeBuild::new();
    let ctx = tempfile::tempdir().unwrap();
    let r = build(&fake, "FROM busybox\nENV a=b\nRUN echo hi\n", ctx.path()).await;
    let id = r.result.unwrap();
    let g = fake.0.lock().unwrap();
    let containers: Vec<String> = g.removed.iter().map(|c| short(c)).collect();
    let commits: Vec<&str> = g.commits.iter().map(|c| c.created_by.as_str()).collect();
    assert_eq!(
        commits,
        ["/bin/sh -c #(nop)  ENV a=b", "/bin/sh -c echo hi"]
    );
    assert!(g.commits[0].empty_layer_when_unchanged && !g.commits[1].empty_layer_when_unchanged);
    let env_img = g.tags[0].0.clone();
    assert_eq!(env_img, id);
    let first_commit = g
        .images
        .values()
        .find(|i| i.config["config"]["Env"] == json!(["PATH=/bin", "a=b"]) && i.id != id)
        .unwrap()
        .id
        .clone();
    let want = vec![
        "Step 1/3 : FROM busybox\n".to_string(),
        format!(" ---> {}\n", short(BASE)),
        // A config-only step needs no container.
        "Step 2/3 : ENV a=b\n".into(),
        format!(" ---> {}\n", short(&first_commit)),
        "Step 3/3 : RUN echo hi\n".into(),
        format!(" ---> Running in {}\n", containers[0]),
        "ran /bin/sh -c echo hi\n".into(),
        format!("Removing intermediate container {}\n", containers[0]),
        format!(" ---> {}\n", short(&id)),
        format!("aux {id}\n"),
        format!("Successfully built {}\n", short(&id)),
        "Successfully tagged x:latest\n".into(),
    ];
    assert_eq!(r.lines, want);
    assert_eq!(g.creates.len(), 1);
    // RUN's container: the step's command, no entrypoint, the image's env, no health check.
    let run = g.creates[0].config.as_ref().unwrap();
    assert_eq!(run.image, first_commit);
    assert_eq!(
        run.entrypoint.as_ref().unwrap().values,
        Vec::<String>::new()
    );
    assert_eq!(run.env, ["PATH=/bin", "a=b"]);
}

#[tokio::test]
async fn a_rebuild_with_nothing_changed_runs_nothing() {
    let fake = FakeBuild::new();
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("f.txt"), "1").unwrap();
    let df = "FROM busybox\nWORKDIR /app\nCOPY f.txt .\nRUN cat f.txt\nLABEL l=v\n";
    let first = build(&fake, df, ctx.path()).await.result.unwrap();
    let creates = fake.0.lock().unwrap().creates.len();
    let again = build(&fake, df, ctx.path()).await;
    assert_eq!(again.result.as_ref().unwrap(), &first);
    assert_eq!(fake.0.lock().unwrap().creates.len(), creates);
    assert_eq!(
        again
            .lines
            .iter()
            .filter(|l| *l == " ---> Using cache\n")
            .count(),
        4
    );
    assert!(!again.text().contains("Running in"));
}

#[tokio::test]
async fn a_changed_copy_source_reruns_exactly_the_steps_after_it() {
    let fake = FakeBuild::new();
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("a"), "1").unwrap();
    std::fs::write(ctx.path().join("b"), "1").unwrap();
    let df = "FROM busybox\nCOPY a /a\nRUN echo one\nCOPY b /b\nRUN echo two\n";
    build(&fake, df, ctx.path()).await.result.unwrap();
    // Touching without changing keeps the cache; changing b reruns COPY b and the RUN after it.
    std::fs::write(ctx.path().join("a"), "1").unwrap();
    std::fs::write(ctx.path().join("b"), "2").unwrap();
    let r = build(&fake, df, ctx.path()).await;
    r.result.as_ref().unwrap();
    let t = r.text();
    let after = |step: &str| {
        t.split(step)
            .nth(1)
            .unwrap()
            .split("Step ")
            .next()
            .unwrap()
            .to_string()
    };
    assert!(after("COPY a /a").contains("Using cache"));
    assert!(after("RUN echo one").contains("Using cache"));
    assert!(after("COPY b /b").contains("Running in"));
    assert!(after("RUN echo two").contains("ran /bin/sh -c echo two"));
    // The COPY history line carries the content digest, as moby's `COPY file:<hash> in /b`.
    let g = fake.0.lock().unwrap();
    let copy = g
        .commits
        .iter()
        .rev()
        .find(|c| c.created_by.contains("COPY"))
        .unwrap();
    assert!(
        copy.created_by.starts_with("/bin/sh -c #(nop) COPY file:")
            && copy.created_by.ends_with(" in /b "),
        "{}",
        copy.created_by
    );
    assert_eq!(g.put.last().unwrap(), &["b"]);
}

#[tokio::test]
async fn build_args_reach_run_only_and_are_recorded() {
    let fake = FakeBuild::new();
    let ctx = tempfile::tempdir().unwrap();
    let mut o = opts();
    o.build_args.insert("V".into(), Some("x".into()));
    o.build_args.insert("UNUSED".into(), Some("1".into()));
    let r = build_with(
        &fake,
        "FROM busybox\nARG V=d\nRUN echo $V\n",
        &o,
        ctx.path(),
        CancellationToken::new(),
    )
    .await;
    r.result.as_ref().unwrap();
    {
        let g = fake.0.lock().unwrap();
        let run = g.commits.last().unwrap();
        assert_eq!(run.created_by, "|1 V=x /bin/sh -c echo $V");
        assert_eq!(run.config["Env"], json!(["PATH=/bin"]));
        let req = g.creates.last().unwrap().config.as_ref().unwrap();
        assert!(req.env.contains(&"V=x".to_string()));
    }
    assert!(
        r.text()
            .contains("[Warning] One or more build-args [UNUSED] were not consumed")
    );
    // A different value is a different step.
    o.build_args.insert("V".into(), Some("y".into()));
    let r = build_with(
        &fake,
        "FROM busybox\nARG V=d\nRUN echo $V\n",
        &o,
        ctx.path(),
        CancellationToken::new(),
    )
    .await;
    let t = r.text();
    assert!(t.contains("ran /bin/sh -c echo $V"), "{t}");
}

#[tokio::test]
async fn a_failing_run_reports_dockers_words_and_keeps_its_container_unless_forcerm() {
    let fake = FakeBuild::new();
    let ctx = tempfile::tempdir().unwrap();
    let r = build(&fake, "FROM busybox\nRUN false\n", ctx.path()).await;
    let err = r.result.unwrap_err();
    assert_eq!(
        err.chain(),
        "The command '/bin/sh -c false' returned a non-zero code: 1"
    );
    assert!(fake.0.lock().unwrap().removed.is_empty());
    assert!(r.error.is_some());
    let mut o = opts();
    o.force_rm = true;
    let r = build_with(
        &fake,
        "FROM busybox\nRUN false\n",
        &o,
        ctx.path(),
        CancellationToken::new(),
    )
    .await;
    assert!(r.result.is_err());
    assert_eq!(fake.0.lock().unwrap().removed.len(), 1);
    assert!(fake.0.lock().unwrap().tags.is_empty());
}

#[tokio::test]
async fn nocache_and_quiet() {
    let fake = FakeBuild::new();
    let ctx = tempfile::tempdir().unwrap();
    let df = "FROM busybox\nRUN echo hi\n";
    build(&fake, df, ctx.path()).await.result.unwrap();
    let mut o = opts();
    o.no_cache = true;
    o.quiet = true;
    let r = build_with(&fake, df, &o, ctx.path(), CancellationToken::new()).await;
    let id = r.result.unwrap();
    assert_eq!(r.lines, [format!("{id}\n")]);
}

#[tokio::test]
async fn a_cancelled_build_stops_and_removes_its_running_container() {
    let fake = FakeBuild::new();
    let ctx = tempfile::tempdir().unwrap();
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        c.cancel();
    });
    let mut o = opts();
    o.rm = false;
    let r = build_with(
        &fake,
        "FROM busybox\nRUN sleep 1000\n",
        &o,
        ctx.path(),
        cancel,
    )
    .await;
    assert_eq!(r.result.unwrap_err().chain(), "Build cancelled");
    let g = fake.0.lock().unwrap();
    assert_eq!(g.removed.len(), 1);
    assert!(g.commits.is_empty() && g.tags.is_empty());
}

#[tokio::test]
async fn multi_stage_target_onbuild_and_errors() {
    let fake = FakeBuild::new();
    let ctx = tempfile::tempdir().unwrap();
    // ONBUILD triggers of the base run right after FROM.
    let parent = build(&fake, "FROM busybox\nONBUILD RUN echo trig\n", ctx.path())
        .await
        .result
        .unwrap();
    let parent_config = fake.0.lock().unwrap().images[&parent].config.clone();
    fake.0.lock().unwrap().images.insert(
        "docker.io/library/parent:latest".into(),
        BuildImage {
            id: parent.clone(),
            config: parent_config,
        },
    );
    let r = build(&fake, "FROM parent\nRUN echo child\n", ctx.path()).await;
    r.result.as_ref().unwrap();
    let t = r.text();
    assert!(t.contains("# Executing 1 build trigger\n"), "{t}");
    assert!(t.contains("ran /bin/sh -c echo trig"), "{t}");
    assert!(
        fake.0
            .lock()
            .unwrap()
            .commits
            .last()
            .unwrap()
            .config
            .get("OnBuild")
            .is_none(),
        "the child's OnBuild starts empty"
    );
    // --target stops at the stage; FROM <stage> builds on it.
    let mut o = opts();
    o.target = Some("one".into());
    let df = "FROM busybox AS one\nRUN echo 1\nFROM one\nRUN echo 2\n";
    let r = build_with(&fake, df, &o, ctx.path(), CancellationToken::new()).await;
    r.result.as_ref().unwrap();
    assert!(r.text().contains("Step 2/2 : RUN echo 1"));
    assert!(!r.text().contains("echo 2"));
    o.target = Some("nope".into());
    let r = build_with(&fake, df, &o, ctx.path(), CancellationToken::new()).await;
    assert_eq!(
        r.result.unwrap_err().chain(),
        "failed to reach build target nope in Dockerfile"
    );
    let r = build(&fake, "FROM busybox\nCOPY missing /x\n", ctx.path()).await;
    assert!(
        r.result
            .unwrap_err()
            .chain()
            .contains("file not found in build context"),
    );
}

#[tokio::test]
async fn build_prune_reports_what_the_images_service_reclaimed() {
    let f = crate::fake::Fake::default();
    let r = f.request("POST", "/build/prune", "").await;
    assert_eq!(r.json()["SpaceReclaimed"], 0);
    assert_eq!(r.json()["CachesDeleted"], json!([]));
    let r = f
        .request(
            "POST",
            "/build/prune?filters=%7B%22id%22%3A%5B%22x%22%5D%7D",
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[test]
fn a_truncated_plain_context_is_completed_and_a_compressed_one_left_alone() {
    use std::io::Read;
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(4);
    tx.try_send(Ok(Bytes::from(vec![b'a'; 700]))).unwrap();
    drop(tx);
    let mut all = Vec::new();
    super::ChannelReader::new(rx).read_to_end(&mut all).unwrap();
    assert_eq!(all.len(), 1024 + 1024);
    assert!(all[700..].iter().all(|b| *b == 0));
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(4);
    tx.try_send(Ok(Bytes::from_static(&[0x1f, 0x8b, 1, 2])))
        .unwrap();
    drop(tx);
    let mut all = Vec::new();
    super::ChannelReader::new(rx).read_to_end(&mut all).unwrap();
    assert_eq!(all, [0x1f, 0x8b, 1, 2]);
}

#[tokio::test]
async fn from_scratch_builds_on_an_empty_image_and_caches() {
    let fake = FakeBuild::new();
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("f"), "x").unwrap();
    let df = "FROM scratch\nENV a=b\nCOPY f /f\nCMD [\"/f\"]\n";
    let first = build(&fake, df, ctx.path()).await;
    let id = first.result.as_ref().unwrap().clone();
    {
        let g = fake.0.lock().unwrap();
        let copy = g
            .commits
            .iter()
            .find(|c| c.created_by.contains("COPY"))
            .unwrap();
        // The ENV before the first layer is part of the COPY step's config.
        assert_eq!(copy.config["Env"], json!(["a=b"]));
        assert_eq!(
            g.creates[0].config.as_ref().unwrap().image,
            format!("sha256:{:064x}", 0xe)
        );
    }
    let again = build(&fake, df, ctx.path()).await;
    assert_eq!(again.result.as_ref().unwrap(), &id);
    assert!(!again.text().contains("Running in"));
}

#[tokio::test]
async fn what_the_client_sends_after_the_archive_end_is_read_to_the_end() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let mut archive = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(12);
    header.set_mode(0o644);
    header.set_cksum();
    archive
        .append_data(&mut header, "Dockerfile", &b"FROM scratch"[..])
        .unwrap();
    let tar = archive.into_inner().unwrap();
    // The archive, then far more trailing blocks than the unpacker's channel holds.
    const TRAILING: usize = 64;
    let mut chunks = vec![Bytes::from(tar)];
    chunks.extend((0..TRAILING).map(|_| Bytes::from(vec![0u8; 512])));
    let total = chunks.len();
    let sent = Arc::new(AtomicUsize::new(0));
    let counted = sent.clone();
    let body = axum::body::Body::from_stream(futures::stream::iter(chunks).map(move |c| {
        counted.fetch_add(1, Ordering::SeqCst);
        Ok::<_, std::io::Error>(c)
    }));
    let prepared = super::receive(body, "Dockerfile").await.unwrap();
    assert!(prepared.context().join("Dockerfile").exists());
    for _ in 0..500 {
        if sent.load(Ordering::SeqCst) == total {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!(
        "only {} of {total} chunks of the body were read",
        sent.load(Ordering::SeqCst)
    );
}
