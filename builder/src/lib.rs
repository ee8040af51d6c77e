//! berth's classic Dockerfile builder, the pure part: everything `POST /build` and `POST /commit`
//! need that does not touch a daemon.
//!
//! The behaviour follows Docker's classic builder (moby's `builder/dockerfile`, which uses
//! BuildKit's `frontend/dockerfile/{parser,instructions,shell}` packages) and moby's
//! `.dockerignore` pattern matcher:
//!
//! - [`dockerfile`]: the parser (directives, continuations, comments, JSON/shell forms, flags)
//!   into typed [`dockerfile::Instruction`]s grouped in [`dockerfile::Stage`]s.
//! - [`expand`]: Docker's shell-word variable substitution and which instructions it applies to.
//! - [`args`]: build-arg scoping (predefined proxy args, global args before FROM, the environment
//!   a RUN step sees and the `|N a=b /bin/sh -c ...` history form).
//! - [`stages`]: `--target`, `FROM <stage>` and `COPY --from=` resolution.
//! - [`onbuild`]: turning a base image's `OnBuild` triggers into instructions.
//! - [`dockerignore`]: `.dockerignore` parsing and matching.
//! - [`context`]: unpacking a build context tar and resolving/digesting COPY/ADD sources.
//! - [`history`]: the `Cmd` and `created_by` moby records for each step.
//! - [`config`]: applying instructions to a Docker image `Config` (and `docker commit --change`).

pub mod args;
pub mod config;
pub mod context;
pub mod dockerfile;
pub mod dockerignore;
pub mod expand;
pub mod history;
pub mod onbuild;
pub mod stages;

/// The pieces together, the way an executor drives them (no daemon: RUN and COPY are only
/// recorded).
#[cfg(test)]
mod flow_tests {
    use std::collections::BTreeMap;

    use serde_json::{Value, json};

    use crate::args::BuildArgs;
    use crate::config::{self, StageState};
    use crate::dockerfile::{self, InstructionKind};
    use crate::stages::{self, StageRef};
    use crate::{expand, history, onbuild};

    const DOCKERFILE: &str = r#"# syntax=docker/dockerfile:1
ARG BASE=busybox
ARG TAG=1.36
FROM ${BASE}:${TAG} AS build
ARG VERSION=dev
ENV APP=/app \
    MODE=release
WORKDIR $APP
RUN echo "$VERSION" > version
FROM scratch AS unused
FROM $BASE
ARG TAG
ARG VERSION
LABEL version=$VERSION tag=$TAG
COPY --from=build /app/version /version
EXPOSE 8080
USER nobody
ENTRYPOINT ["/bin/app"]
CMD ["--serve"]
ONBUILD RUN echo child
"#;

    struct Step {
        created_by: String,
    }

    /// Runs one stage's instructions against a config, as the executor would.
    fn run_stage(
        df: &dockerfile::Dockerfile,
        index: usize,
        config: &mut Value,
        build_args: &mut BuildArgs,
    ) -> Vec<Step> {
        let mut state = StageState::default();
        let mut args = build_args.stage();
        let mut steps = Vec::new();
        for instruction in &df.stages[index].instructions {
            let env = config::env(config);
            let vars = args.vars(&env);
            let kind =
                expand::expand_instruction(&instruction.kind, &vars, df.directives.escape).unwrap();
            match &kind {
                InstructionKind::Arg(decls) => {
                    for d in decls {
                        build_args.mark_referenced(&d.name);
                        args.declare(d);
                    }
                }
                InstructionKind::Run { args: cmd } => {
                    let argv = cmd.argv(&config::shell(config));
                    let recorded = args.run_created_by(&env, &argv);
                    steps.push(Step {
                        created_by: history::created_by(&recorded),
                    });
                    continue;
                }
                InstructionKind::Copy { from, dest, .. } => {
                    let from = from.as_deref().unwrap();
                    assert_eq!(
                        stages::resolve_copy_from(df, index, from).unwrap(),
                        StageRef::Stage(0)
                    );
                    let cmd = history::copy_cmd(config, "COPY", "file:abc", dest);
                    steps.push(Step {
                        created_by: history::created_by(&cmd),
                    });
                    continue;
                }
                _ => {}
            }
            config::apply(config, &kind, &mut state).unwrap();
            if let Some(comment) = history::comment(&kind, config) {
                steps.push(Step {
                    created_by: history::created_by(&history::nop_cmd(config, &comment)),
                });
            }
        }
        steps
    }

    #[test]
    fn multi_stage_build_flow() {
        let df = dockerfile::parse(DOCKERFILE).unwrap();
        assert_eq!(df.directives.syntax.as_deref(), Some("docker/dockerfile:1"));
        let given = BTreeMap::from([
            ("VERSION".to_string(), Some("1.2.3".to_string())),
            ("UNUSED".to_string(), Some("x".to_string())),
        ]);
        let mut build_args = BuildArgs::new(given);
        let meta = build_args.meta_vars(&df.args_before_from, '\\').unwrap();

        // The classic builder runs every stage up to the target, the unused one included.
        assert_eq!(stages::stages_to_build(&df, None).unwrap(), 0..=2);
        assert_eq!(stages::stages_to_build(&df, Some("build")).unwrap(), 0..=0);

        // Stage 0.
        let base = expand::process_word(&df.stages[0].base, &meta, '\\').unwrap();
        assert_eq!(base, "busybox:1.36");
        assert_eq!(
            stages::resolve_from(&df, 0, &base),
            StageRef::Image("busybox:1.36".into())
        );
        let mut build = json!({"Env": ["PATH=/bin"], "Cmd": ["sh"]});
        let steps = run_stage(&df, 0, &mut build, &mut build_args);
        let lines: Vec<&str> = steps.iter().map(|s| s.created_by.as_str()).collect();
        assert_eq!(
            lines,
            vec![
                "/bin/sh -c #(nop)  ARG VERSION=dev",
                "/bin/sh -c #(nop)  ENV APP=/app MODE=release",
                "/bin/sh -c #(nop)  WORKDIR /app",
                "|1 VERSION=1.2.3 /bin/sh -c echo \"$VERSION\" > version",
            ]
        );
        assert_eq!(build["WorkingDir"], "/app");

        // Stage 2: `FROM $BASE` is the image, not a stage.
        let base = expand::process_word(&df.stages[2].base, &meta, '\\').unwrap();
        assert_eq!(
            stages::resolve_from(&df, 2, &base),
            StageRef::Image("busybox".into())
        );
        let mut final_config = json!({"Env": ["PATH=/bin"], "Cmd": ["sh"]});
        let steps = run_stage(&df, 2, &mut final_config, &mut build_args);
        assert_eq!(
            steps[2].created_by,
            "/bin/sh -c #(nop)  LABEL version=1.2.3 tag=1.36"
        );
        assert_eq!(
            steps[3].created_by,
            "/bin/sh -c #(nop) COPY file:abc in /version "
        );
        assert_eq!(
            final_config,
            json!({
                "Env": ["PATH=/bin"],
                "Cmd": ["--serve"],
                "Entrypoint": ["/bin/app"],
                "Labels": {"version": "1.2.3", "tag": "1.36"},
                "ExposedPorts": {"8080/tcp": {}},
                "User": "nobody",
                "OnBuild": ["RUN echo child"],
            })
        );
        assert_eq!(build_args.unused(), vec!["UNUSED".to_string()]);

        // A child build runs the trigger right after its FROM.
        let triggers: Vec<String> =
            serde_json::from_value(final_config["OnBuild"].clone()).unwrap();
        let parsed = onbuild::triggers(&triggers).unwrap();
        assert_eq!(parsed[0].original, "RUN echo child");
    }
}
