//! The build executor: runs a parsed Dockerfile step by step as the classic builder does
//! (moby's `builder/dockerfile`), each step a container made from the previous step's image and
//! committed into the next one, with the cache deciding which steps need not run.
//!
//! Every step that changes something goes through a container, as in moby: RUN runs one;
//! COPY/ADD put an archive into a created one; the config-only instructions commit a created one
//! with `empty_layer_when_unchanged`, so their history entries are Docker's `#(nop)` lines.

use std::path::{Path, PathBuf};

use berth_builder::args::{BuildArgs, StageArgs};
use berth_builder::config;
use berth_builder::dockerfile::{Dockerfile, Instruction, InstructionKind, ShellOrExec};
use berth_builder::expand;
use berth_builder::history;
use berth_builder::stages::{self, StageRef};
use berth_core::{Error, ErrorKind, Reference, Result};
use berth_proto::berth::engine::v1 as engine;
use berth_proto::berth::types::v1 as types;
use futures::TryStreamExt;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use super::backend::{BuildBackend, BuildImage, CommitSpec, RunEvent};
use super::copy::{self, CopyPlan};
use super::options::BuildOptions;
use super::orphans;
use super::output::Output;
use crate::backend::Fut;
use crate::progress::short_digest;

/// Bumped when what a cache key covers changes, so old records stop matching.
const CACHE_VERSION: &str = "berth-build-cache-v1";

/// Where a stage is.
#[derive(Debug, Clone, Default)]
struct State {
    /// The current image (`""` before anything when FROM scratch).
    image_id: String,
    /// Docker's image `Config` object.
    config: Value,
    maintainer: String,
    args: Option<StageArgs>,
    /// What the config rules remember within a stage.
    stage: config::StageState,
}

impl State {
    fn env(&self) -> Vec<String> {
        config::env(&self.config)
    }

    fn shell(&self) -> Vec<String> {
        config::shell(&self.config)
    }

    fn workdir(&self) -> String {
        self.config
            .get("WorkingDir")
            .and_then(Value::as_str)
            .filter(|w| !w.is_empty())
            .unwrap_or("/")
            .to_string()
    }

    fn vars(&self) -> expand::Vars {
        match &self.args {
            Some(a) => a.vars(&self.env()),
            None => expand::vars_from_env(&self.env()),
        }
    }
}

fn string_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A step's cache key: its parent, its history line, the config it leaves and its inputs.
pub fn cache_key(parent: &str, created_by: &str, config: &Value, author: &str) -> String {
    let doc = json!([CACHE_VERSION, parent, created_by, config, author]);
    hex::encode(Sha256::digest(doc.to_string().as_bytes()))
}

/// A failed RUN, in Docker's words.
pub fn non_zero(argv: &[String], code: i64) -> Error {
    Error::new(
        ErrorKind::Internal,
        format!(
            "The command '{}' returned a non-zero code: {code}",
            argv.join(" ")
        ),
    )
}

fn cancelled() -> Error {
    Error::new(ErrorKind::Cancelled, "Build cancelled")
}

/// One build.
pub struct Executor<'a> {
    backend: &'a dyn BuildBackend,
    opts: &'a BuildOptions,
    /// The unpacked context.
    context: &'a Path,
    /// Scratch space for archives (removed with the build).
    scratch: &'a Path,
    out: &'a mut Output,
    /// Images made by the stages so far, by index.
    stage_images: Vec<String>,
    scratch_counter: usize,
    /// Step containers being removed in the background, awaited before the build ends.
    removals: Vec<(String, Fut<'static, ()>)>,
}

impl std::fmt::Debug for Executor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor").finish_non_exhaustive()
    }
}

impl<'a> Executor<'a> {
    pub fn new(
        backend: &'a dyn BuildBackend,
        opts: &'a BuildOptions,
        context: &'a Path,
        scratch: &'a Path,
        out: &'a mut Output,
    ) -> Self {
        Self {
            backend,
            opts,
            context,
            scratch,
            out,
            stage_images: Vec::new(),
            scratch_counter: 0,
            removals: Vec::new(),
        }
    }

    /// Runs the whole build; the final image id. Tags it and writes the closing lines. Returns
    /// once every step container it removes is gone, whatever the outcome.
    pub async fn run(mut self, dockerfile: Dockerfile) -> Result<String> {
        let result = self.build(dockerfile).await;
        self.settle_removals().await;
        result
    }

    /// Waits for the step containers being removed; a failure is reported in the stream.
    async fn settle_removals(&mut self) {
        for (id, removal) in std::mem::take(&mut self.removals) {
            if let Err(err) = removal.await {
                self.out
                    .stream(&format!(
                        "Error removing intermediate container {}: {}\n",
                        short_digest(&id),
                        err.chain()
                    ))
                    .await
            }
        }
    }

    async fn build(&mut self, mut dockerfile: Dockerfile) -> Result<String> {
        let escape = dockerfile.directives.escape;
        let range = stages::stages_to_build(&dockerfile, self.opts.target.as_deref())
            .map_err(|e| Error::invalid_argument(e.to_string()))?;
        dockerfile.stages.truncate(*range.end() + 1);
        if dockerfile.stages.is_empty() {
            return Err(Error::invalid_argument(
                "the Dockerfile (Dockerfile) cannot be empty",
            ));
        }
        // `--label`s are LABEL steps at the end of the last stage, as moby adds them.
        if let Some(last) = dockerfile.stages.last_mut() {
            for (k, v) in &self.opts.labels {
                last.instructions.push(Instruction {
                    line: 0,
                    original: format!("LABEL {k}={v}"),
                    kind: InstructionKind::Label(vec![(k.clone(), v.clone())]),
                });
            }
        }
        let total = dockerfile.args_before_from.len()
            + dockerfile
                .stages
                .iter()
                .map(|s| 1 + s.instructions.len())
                .sum::<usize>();
        let mut n = 1;
        let mut build_args = BuildArgs::new(self.opts.build_args.clone());
        for arg in &dockerfile.args_before_from {
            let text = match &arg.default {
                Some(d) => format!("ARG {}={d}", arg.name),
                None => format!("ARG {}", arg.name),
            };
            self.out
                .stream(&format!("Step {n}/{total} : {text}\n"))
                .await;
            n += 1;
        }
        let meta = build_args
            .meta_vars(&dockerfile.args_before_from, escape)
            .map_err(|e| Error::invalid_argument(e.to_string()))?;
        let mut last = String::new();
        for index in 0..dockerfile.stages.len() {
            let stage = dockerfile.stages[index].clone();
            self.out
                .stream(&format!("Step {n}/{total} : {}\n", stage.original))
                .await;
            n += 1;
            let base = expand::process_word(&stage.base, &meta, escape)
                .map_err(|e| Error::invalid_argument(e.to_string()))?;
            let mut state = self.from(&dockerfile, index, &base).await?;
            state.args = Some(build_args.stage());
            let triggers = string_list(state.config.get("OnBuild"));
            if let Some(c) = state.config.as_object_mut() {
                c.remove("OnBuild");
            }
            if !triggers.is_empty() {
                let parsed = berth_builder::onbuild::triggers(&triggers)
                    .map_err(|e| Error::invalid_argument(e.message.clone()))?;
                let plural = if parsed.len() == 1 { "" } else { "s" };
                self.out
                    .stream(&format!(
                        "# Executing {} build trigger{plural}\n",
                        parsed.len()
                    ))
                    .await;
                for t in parsed {
                    self.check_cancel()?;
                    self.step(&dockerfile, index, &mut state, &t, escape, &mut build_args)
                        .await?;
                }
            }
            self.out
                .stream(&format!(" ---> {}\n", short_digest(&state.image_id)))
                .await;
            for ins in &stage.instructions {
                self.check_cancel()?;
                self.out
                    .stream(&format!("Step {n}/{total} : {}\n", ins.original))
                    .await;
                n += 1;
                self.step(&dockerfile, index, &mut state, ins, escape, &mut build_args)
                    .await?;
                self.out
                    .stream(&format!(" ---> {}\n", short_digest(&state.image_id)))
                    .await;
            }
            if !state.image_id.is_empty() {
                self.out.aux_id(&state.image_id).await;
            }
            self.stage_images.push(state.image_id.clone());
            last = state.image_id;
        }
        let unused = build_args.unused();
        if !unused.is_empty() {
            self.out
                .stream(&format!(
                    "[Warning] One or more build-args [{}] were not consumed\n",
                    unused.join(" ")
                ))
                .await;
        }
        if last.is_empty() {
            return Err(Error::invalid_argument(
                "No image was generated. Is your Dockerfile empty?",
            ));
        }
        self.settle_removals().await;
        self.out
            .stream(&format!("Successfully built {}\n", short_digest(&last)))
            .await;
        for t in &self.opts.tags {
            self.backend.tag(&last, t).await?;
            let familiar = Reference::parse(t).map_or_else(|_| t.clone(), |r| r.familiar());
            self.out
                .stream(&format!("Successfully tagged {familiar}\n"))
                .await;
        }
        self.out.quiet_result(&last).await;
        Ok(last)
    }

    fn check_cancel(&self) -> Result<()> {
        if self.out.cancelled().is_cancelled() {
            Err(cancelled())
        } else {
            Ok(())
        }
    }

    /// FROM: an earlier stage, `scratch`, or an image (pulled when missing or asked to).
    async fn from(&mut self, df: &Dockerfile, index: usize, base: &str) -> Result<State> {
        let image = match stages::resolve_from(df, index, base) {
            StageRef::Stage(i) => {
                let id = self.stage_images.get(i).cloned().unwrap_or_default();
                self.backend
                    .image(&id)
                    .await?
                    .ok_or_else(|| Error::not_found(format!("image of stage {i} is gone")))?
            }
            StageRef::Image(name) if name.eq_ignore_ascii_case("scratch") => BuildImage {
                id: String::new(),
                config: json!({}),
            },
            StageRef::Image(name) => self.image_or_pull(&name).await?,
        };
        let config = match image.config.get("config") {
            Some(c) if c.is_object() => c.clone(),
            _ => json!({}),
        };
        Ok(State {
            image_id: image.id,
            config,
            ..Default::default()
        })
    }

    async fn image_or_pull(&mut self, name: &str) -> Result<BuildImage> {
        let reference = Reference::parse(name)
            .map_err(|e| {
                Error::invalid_argument(format!("invalid reference format: {name}")).with_source(e)
            })?
            .to_string();
        if !self.opts.pull
            && let Some(img) = self.backend.image(&reference).await?
        {
            return Ok(img);
        }
        let mut progress = self
            .backend
            .pull(
                &reference,
                self.opts.auth_for(&reference),
                self.opts.platform.clone(),
            )
            .await?;
        while let Some(line) = progress.try_next().await? {
            self.out.message(&line).await;
            self.check_cancel()?;
        }
        self.backend
            .image(&reference)
            .await?
            .ok_or_else(|| Error::not_found(format!("pulled image {name} not found")))
    }

    /// One instruction (after its `Step` line).
    async fn step(
        &mut self,
        df: &Dockerfile,
        index: usize,
        state: &mut State,
        ins: &Instruction,
        escape: char,
        build_args: &mut BuildArgs,
    ) -> Result<()> {
        let vars = state.vars();
        let kind = expand::expand_instruction(&ins.kind, &vars, escape)
            .map_err(|e| Error::invalid_argument(e.to_string()))?;
        let comment = match &kind {
            InstructionKind::Run { args } => return self.run_step(state, args).await,
            InstructionKind::Copy {
                srcs,
                dest,
                from,
                chown,
                chmod,
            } => {
                let from = match from {
                    Some(f) => Some(
                        expand::process_word(f, &vars, escape)
                            .map_err(|e| Error::invalid_argument(e.to_string()))?,
                    ),
                    None => None,
                };
                let source = match &from {
                    None => None,
                    Some(f) => Some(
                        stages::resolve_copy_from(df, index, f)
                            .map_err(|e| Error::invalid_argument(e.to_string()))?,
                    ),
                };
                let plan = CopyPlan {
                    add: false,
                    srcs: srcs.clone(),
                    dest: dest.clone(),
                    chown: chown.clone(),
                    chmod: chmod.clone(),
                };
                return self.copy_step(state, plan, source).await;
            }
            InstructionKind::Add {
                srcs,
                dest,
                chown,
                chmod,
            } => {
                let plan = CopyPlan {
                    add: true,
                    srcs: srcs.clone(),
                    dest: dest.clone(),
                    chown: chown.clone(),
                    chmod: chmod.clone(),
                };
                return self.copy_step(state, plan, None).await;
            }
            InstructionKind::Arg(args) => {
                let stage_args = state.args.get_or_insert_with(|| build_args.stage());
                let mut text = Vec::new();
                for a in args {
                    stage_args.declare(a);
                    build_args.mark_referenced(&a.name);
                    text.push(match &a.default {
                        Some(d) => format!("{}={d}", a.name),
                        None => a.name.clone(),
                    });
                }
                Nop::Two(format!("ARG {}", text.join(" ")))
            }
            InstructionKind::Maintainer(m) => {
                state.maintainer = m.clone();
                Nop::Two(format!("MAINTAINER {m}"))
            }
            other => {
                if let InstructionKind::Volume(vols) = other
                    && vols.iter().any(|v| v.trim().is_empty())
                {
                    return Err(Error::invalid_argument(
                        "VOLUME specified can not be an empty string",
                    ));
                }
                config::apply(&mut state.config, other, &mut state.stage)
                    .map_err(|e| Error::invalid_argument(e.to_string()))?;
                nop_comment(other, &state.config)
            }
        };
        self.nop_commit(state, comment).await
    }

    /// A config-only step: a created container committed without a layer (WORKDIR: with the
    /// directory made).
    async fn nop_commit(&mut self, state: &mut State, nop: Nop) -> Result<()> {
        let shell = state.shell();
        let mut cmd = shell.clone();
        let mkdir = match &nop {
            Nop::Two(c) => {
                cmd.push("#(nop) ".into());
                cmd.push(c.clone());
                None
            }
            Nop::Workdir(c, dir) => {
                cmd.push(format!("#(nop) {c}"));
                Some(dir.clone())
            }
        };
        let created_by = cmd.join(" ");
        let config = state.config.clone();
        if state.image_id.is_empty() && mkdir.is_none() {
            // FROM scratch: nothing to run a container from; the config waits for the first
            // step that makes a layer.
            return Ok(());
        }
        let key = cache_key(&state.image_id, &created_by, &config, &state.maintainer);
        if self.probe(state, &key).await? {
            return Ok(());
        }
        if mkdir.is_none() && !state.image_id.is_empty() {
            // Nothing to change in the filesystem: the image is made without a container,
            // where moby creates and removes one.
            let parent = state.image_id.clone();
            let spec = CommitSpec {
                container: String::new(),
                config,
                created_by: created_by.clone(),
                author: state.maintainer.clone(),
                empty_layer_when_unchanged: true,
            };
            let image = self.backend.commit_config(&parent, cmd, spec).await?;
            return self.record_step(state, &key, image, &created_by).await;
        }
        let id = self.create(state, cmd, None).await?;
        let result = async {
            if let Some(dir) = mkdir {
                let tar = self.scratch_file("workdir.tar");
                copy::mkdir_tar(&tar, &dir)?;
                self.backend.put_archive(&id, "/", tar).await?;
            }
            self.commit(state, &id, config, &created_by, &key, true)
                .await
        }
        .await;
        self.finish_container(&id, result.is_ok()).await;
        result
    }

    /// RUN.
    async fn run_step(&mut self, state: &mut State, args: &ShellOrExec) -> Result<()> {
        let argv = args.argv(&state.shell());
        let env = state.env();
        let stage_args = state.args.clone();
        let (run_env, recorded) = match &stage_args {
            Some(a) => (a.run_env(&env), a.run_created_by(&env, &argv)),
            None => (env.clone(), argv.clone()),
        };
        let created_by = recorded.join(" ");
        let config = state.config.clone();
        if state.image_id.is_empty() {
            return Err(Error::invalid_argument(
                "Please provide a source image with `from` prior to run",
            ));
        }
        let key = cache_key(&state.image_id, &created_by, &config, &state.maintainer);
        if self.probe(state, &key).await? {
            return Ok(());
        }
        let id = self.create(state, argv.clone(), Some(run_env)).await?;
        let result = async {
            let mut events = self.backend.run(&id).await?;
            let cancel = self.out.cancelled().clone();
            loop {
                let next = tokio::select! {
                    next = events.try_next() => next?,
                    () = cancel.cancelled() => return Err(cancelled()),
                };
                match next {
                    Some(RunEvent::Output(b)) => {
                        self.out.stream(&String::from_utf8_lossy(&b)).await;
                    }
                    Some(RunEvent::Exit(0)) => break,
                    Some(RunEvent::Exit(code)) => return Err(non_zero(&argv, code)),
                    None => return Err(Error::internal("the step's container ended unseen")),
                }
            }
            self.commit(state, &id, config, &created_by, &key, false)
                .await
        }
        .await;
        self.finish_container(&id, result.is_ok()).await;
        result
    }

    /// COPY and ADD.
    async fn copy_step(
        &mut self,
        state: &mut State,
        plan: CopyPlan,
        from: Option<StageRef>,
    ) -> Result<()> {
        let name = if plan.add { "ADD" } else { "COPY" };
        // Sources from another stage or image are read out of a container of it.
        let mut from_root = None;
        if let Some(source) = &from {
            let image = match source {
                StageRef::Stage(i) => self.stage_images.get(*i).cloned().unwrap_or_default(),
                StageRef::Image(name) => self.image_or_pull(name).await?.id,
            };
            let dir = self.scratch_file("from");
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::internal("scratch directory").with_source(e))?;
            self.extract_from_image(&image, &plan.srcs, &dir).await?;
            from_root = Some(dir);
        }
        let root: PathBuf = from_root.unwrap_or_else(|| self.context.to_path_buf());
        let downloads = self.scratch_file("downloads");
        let sources = copy::resolve(&root, &plan, &downloads, name).await?;
        let hash = copy::sources_digest(&sources, plan.chown.as_deref())?;
        let chown = plan
            .chown
            .as_ref()
            .map(|c| format!("--chown={c} "))
            .unwrap_or_default();
        let chmod = plan
            .chmod
            .as_ref()
            .map(|c| format!("--chmod={c} "))
            .unwrap_or_default();
        let dest = copy::normalize_dest(&state.workdir(), &plan.dest);
        let comment = format!("{name} {chown}{chmod}{hash} in {dest} ");
        let mut cmd = state.shell();
        cmd.push(format!("#(nop) {comment}"));
        let created_by = cmd.join(" ");
        let config = state.config.clone();
        let key = cache_key(&state.image_id, &created_by, &config, &state.maintainer);
        // On `FROM scratch` the parent in the key is "" whichever empty image the step uses.
        if self.probe(state, &key).await? {
            return Ok(());
        }
        let id = if state.image_id.is_empty() {
            self.scratch_container(state, cmd).await?
        } else {
            self.create(state, cmd, None).await?
        };
        let result = async {
            let owner = match &plan.chown {
                Some(c) => Some(self.resolve_owner(&id, c).await?),
                None => None,
            };
            let dest_is_dir = self.backend.is_dir(&id, &dest).await?;
            let tar = self.scratch_file("copy.tar");
            copy::write_tar(&tar, &sources, &plan, &dest, dest_is_dir, owner)?;
            self.backend.put_archive(&id, "/", tar).await?;
            self.commit(state, &id, config, &created_by, &key, false)
                .await
        }
        .await;
        self.finish_container(&id, result.is_ok()).await;
        result
    }

    /// The files `srcs` of `image`, extracted under `dir` at their paths in the image.
    async fn extract_from_image(&mut self, image: &str, srcs: &[String], dir: &Path) -> Result<()> {
        let req = engine::CreateContainerRequest {
            config: Some(engine::ContainerConfig {
                image: image.to_string(),
                cmd: Some(types::StringList {
                    values: vec!["/bin/sh".into()],
                }),
                ..Default::default()
            }),
            host_config: Some(engine::HostConfig {
                network_mode: "none".into(),
                log_config: Some(engine::LogConfig {
                    r#type: "none".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            // Always removed after use.
            extensions: orphans::step_extensions(true),
            ..Default::default()
        };
        let id = self.backend.create(req).await?;
        let result = async {
            for src in srcs {
                let path = format!("/{}", copy::clean(src).trim_start_matches('/'));
                let tar = self.scratch_file("from.tar");
                self.backend
                    .get_archive(&id, &path, tar.clone())
                    .await
                    .map_err(|e| {
                        if e.is(ErrorKind::NotFound) {
                            Error::not_found(format!(
                                "COPY failed: stat {path}: file does not exist"
                            ))
                        } else {
                            e
                        }
                    })?;
                let parent = Path::new(&path)
                    .parent()
                    .map(|p| p.to_string_lossy().trim_start_matches('/').to_string())
                    .unwrap_or_default();
                let into = dir.join(parent);
                std::fs::create_dir_all(&into)
                    .map_err(|e| Error::internal("scratch directory").with_source(e))?;
                copy::unpack_tar(&tar, &into)?;
            }
            Ok(())
        }
        .await;
        let _ = self.backend.remove(&id).await;
        result
    }

    /// `user[:group]` of `--chown` as uid and gid, names looked up in the image's
    /// `/etc/passwd` and `/etc/group`.
    async fn resolve_owner(&mut self, id: &str, spec: &str) -> Result<(u64, u64)> {
        let (user, group) = spec.split_once(':').unwrap_or((spec, ""));
        let numeric = |s: &str| s.parse::<u64>().ok();
        let mut passwd = None;
        let mut groups = None;
        if numeric(user).is_none() {
            passwd = Some(self.read_file(id, "/etc/passwd").await?);
        }
        if !group.is_empty() && numeric(group).is_none() {
            groups = Some(self.read_file(id, "/etc/group").await?);
        }
        copy::parse_owner(spec, passwd.as_deref(), groups.as_deref())
    }

    async fn read_file(&mut self, id: &str, path: &str) -> Result<String> {
        let tar = self.scratch_file("read.tar");
        self.backend
            .get_archive(id, path, tar.clone())
            .await
            .map_err(|e| {
                Error::invalid_argument(format!("unable to find {path} in the image"))
                    .with_source(e)
            })?;
        copy::first_file_of_tar(&tar)
    }

    fn scratch_file(&mut self, name: &str) -> PathBuf {
        self.scratch_counter += 1;
        self.scratch
            .join(format!("{}-{name}", self.scratch_counter))
    }

    /// Whether the cache has the step: then the state moves to its image.
    async fn probe(&mut self, state: &mut State, key: &str) -> Result<bool> {
        if self.opts.no_cache {
            return Ok(false);
        }
        let Some(hit) = self.backend.cache_lookup(key).await? else {
            return Ok(false);
        };
        if !self.opts.cache_from.is_empty() && !self.cache_from_allows(&hit).await? {
            return Ok(false);
        }
        self.out.stream(" ---> Using cache\n").await;
        state.image_id = hit;
        Ok(true)
    }

    /// With `--cache-from`, only images on the history chain of a named image are reused: the
    /// hit's layers and history must be a prefix of one of theirs.
    async fn cache_from_allows(&mut self, hit: &str) -> Result<bool> {
        let Some(hit_img) = self.backend.image(hit).await? else {
            return Ok(false);
        };
        for name in self.opts.cache_from.clone() {
            let Ok(r) = Reference::parse(&name) else {
                continue;
            };
            let Some(img) = self.backend.image(&r.to_string()).await? else {
                continue;
            };
            if img.id == hit_img.id || is_prefix(&hit_img.config, &img.config) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Creates the step's container from the current image.
    async fn create(
        &mut self,
        state: &State,
        cmd: Vec<String>,
        env: Option<Vec<String>>,
    ) -> Result<String> {
        let req = self.container_request(state, cmd, env);
        let id = self.backend.create(req).await?;
        self.out
            .stream(&format!(" ---> Running in {}\n", short_digest(&id)))
            .await;
        Ok(id)
    }

    /// FROM scratch has no image to make a container of: the first layer goes onto an empty
    /// one.
    async fn scratch_container(&mut self, state: &mut State, cmd: Vec<String>) -> Result<String> {
        // One empty image serves every scratch build: recorded in the cache, so it stays
        // hidden from `docker images` and goes with `docker builder prune`.
        let key = cache_key("", "scratch", &json!({}), "");
        let empty = match self.backend.cache_lookup(&key).await? {
            Some(id) => id,
            None => {
                let id = self.backend.empty_image().await?;
                self.backend.cache_store(&key, &id, "", "scratch").await?;
                id
            }
        };
        state.image_id = empty;
        self.create(state, cmd, None).await
    }

    fn container_request(
        &self,
        state: &State,
        cmd: Vec<String>,
        env: Option<Vec<String>>,
    ) -> engine::CreateContainerRequest {
        let o = self.opts;
        let user = state
            .config
            .get("User")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        engine::CreateContainerRequest {
            name: String::new(),
            config: Some(engine::ContainerConfig {
                image: state.image_id.clone(),
                cmd: Some(types::StringList { values: cmd }),
                // RUN runs without the image's entrypoint, as moby's `withEntrypointOverride`.
                entrypoint: Some(types::StringList { values: vec![] }),
                env: env.unwrap_or_else(|| state.env()),
                working_dir: state.workdir(),
                user,
                // No health checks during a build.
                healthcheck: serde_json::to_vec(&json!({"Test": ["NONE"]})).unwrap_or_default(),
                ..Default::default()
            }),
            host_config: Some(engine::HostConfig {
                network_mode: o.network_mode.clone(),
                extra_hosts: o.extra_hosts.clone(),
                shm_size: o.shm_size,
                resources: Some(o.resources.clone()),
                log_config: Some(engine::LogConfig {
                    r#type: "none".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            platform: o.platform.clone(),
            extensions: orphans::step_extensions(o.rm || o.force_rm),
            ..Default::default()
        }
    }

    async fn commit(
        &mut self,
        state: &mut State,
        id: &str,
        config: Value,
        created_by: &str,
        key: &str,
        empty_layer_when_unchanged: bool,
    ) -> Result<()> {
        let image = self
            .backend
            .commit(CommitSpec {
                container: id.to_string(),
                config,
                created_by: created_by.to_string(),
                author: state.maintainer.clone(),
                empty_layer_when_unchanged,
            })
            .await?;
        self.record_step(state, key, image, created_by).await
    }

    /// A step's new image: recorded in the cache under `key` and the state's image from now on.
    async fn record_step(
        &mut self,
        state: &mut State,
        key: &str,
        image: String,
        created_by: &str,
    ) -> Result<()> {
        if let Err(err) = self
            .backend
            .cache_store(key, &image, &state.image_id, created_by)
            .await
        {
            tracing::warn!(error = %err.chain(), "build cache record not stored");
        }
        state.image_id = image;
        Ok(())
    }

    /// After a step: its container goes with `rm` (success) or `forcerm` (always), and always
    /// when the build was cancelled.
    async fn finish_container(&mut self, id: &str, ok: bool) {
        let cancelled = self.out.cancelled().is_cancelled();
        if !(self.opts.force_rm || cancelled || (ok && self.opts.rm)) {
            return;
        }
        // Removed in the background, overlapping the next step; awaited before the build ends.
        self.removals
            .push((id.to_string(), self.backend.remove_detached(id)));
        self.out
            .stream(&format!(
                "Removing intermediate container {}\n",
                short_digest(id)
            ))
            .await
    }
}

/// A config-only step's history comment: moby's two forms.
enum Nop {
    /// `#(nop) ` and the comment as two words (`/bin/sh -c #(nop)  ENV a=b`).
    Two(String),
    /// WORKDIR's single word (`/bin/sh -c #(nop) WORKDIR /app`), and the directory to make.
    Workdir(String, String),
}

/// The history comment of a config-only instruction already applied to `config`, as moby
/// writes it.
fn nop_comment(kind: &InstructionKind, config: &Value) -> Nop {
    if let InstructionKind::Workdir(_) = kind {
        let dir = config
            .get("WorkingDir")
            .and_then(Value::as_str)
            .unwrap_or("/")
            .to_string();
        return Nop::Workdir(format!("WORKDIR {dir}"), dir);
    }
    Nop::Two(history::comment(kind, config).unwrap_or_else(|| kind.keyword().to_string()))
}

/// Whether image config `a`'s layers and history are a prefix of `b`'s.
fn is_prefix(a: &Value, b: &Value) -> bool {
    let list = |v: &Value, k: &str, sub: &str| -> Vec<Value> {
        let v = if sub.is_empty() {
            v.get(k)
        } else {
            v.get(k).and_then(|x| x.get(sub))
        };
        v.and_then(Value::as_array).cloned().unwrap_or_default()
    };
    let (la, lb) = (list(a, "rootfs", "diff_ids"), list(b, "rootfs", "diff_ids"));
    let created_by = |h: &Vec<Value>| -> Vec<Value> {
        h.iter()
            .map(|e| e.get("created_by").cloned().unwrap_or(Value::Null))
            .collect()
    };
    let (ha, hb) = (
        created_by(&list(a, "history", "")),
        created_by(&list(b, "history", "")),
    );
    la.len() <= lb.len()
        && la[..] == lb[..la.len()]
        && ha.len() <= hb.len()
        && ha[..] == hb[..ha.len()]
}
