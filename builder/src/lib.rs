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
