//! Issue 18: containers that cannot start fail the same way with the shim's in-process runtime
//! (`--runtime libcontainer`) as with runc, through the real docker CLI: a missing binary, a
//! non-executable one, a working directory that is a file, a bind-mount source that does not
//! exist (refused up front) or is gone by the time the container starts, and cpuset limits the
//! host cannot give. Each gives the same `docker` exit code with both runtimes and a message
//! of the same kind (both contain the case's key phrase), and leaves nothing behind: no process
//! in a cgroup of the container, no cgroup dir of it under the stack's cgroup parent, no mount
//! naming it, and, once it is removed, no runtime state dir. Root only; skips otherwise.

use std::path::Path;

use anyhow::{Context as _, Result, ensure};
use berth_integration::gateway_kit::{DockerStack, ready};
use berth_integration::py_kit;

const RUNTIMES: [&str; 2] = ["runc", "libcontainer"];

/// berth's default `[engine] cgroup_parent`, which the stack keeps.
const CGROUP_PARENT: &str = "berth";

/// One way to fail.
struct Case {
    name: &'static str,
    /// `docker run` options and command (after `--runtime`, with `{src}` for a bind source).
    args: &'static [&'static str],
    /// The exit code both runtimes must give, where Docker defines one.
    exit: Option<i32>,
    /// What both messages must contain (case-insensitive).
    phrase: &'static str,
    /// The bind source is made for `docker create` and removed before `docker start`.
    vanishing_source: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "missing binary",
        args: &["busybox", "/no/such"],
        exit: Some(127),
        phrase: "no such file or directory",
        vanishing_source: false,
    },
    Case {
        name: "not executable",
        args: &["busybox", "/etc/passwd"],
        exit: Some(126),
        phrase: "permission denied",
        vanishing_source: false,
    },
    Case {
        name: "cwd is a file",
        args: &["-w", "/etc/passwd", "busybox", "true"],
        exit: None,
        phrase: "not a directory",
        vanishing_source: false,
    },
    Case {
        name: "bind source does not exist",
        args: &[
            "--mount",
            "type=bind,source={src},target=/x",
            "busybox",
            "true",
        ],
        exit: None,
        phrase: "bind source path does not exist",
        vanishing_source: false,
    },
    Case {
        name: "bind source removed before start",
        args: &[
            "--mount",
            "type=bind,source={src},target=/x",
            "busybox",
            "true",
        ],
        exit: None,
        phrase: "no such file or directory",
        vanishing_source: true,
    },
    // The engine checks cpuset cpus against the host (as dockerd does), so this one is refused
    // before any runtime runs...
    Case {
        name: "cpuset cpus the host lacks",
        args: &["--cpuset-cpus", "99", "busybox", "true"],
        exit: None,
        phrase: "requested cpus are not available",
        vanishing_source: false,
    },
    // ... while memory nodes are not checked, so the kernel refuses this one (a one-node host)
    // when the runtime writes the container's cgroup.
    Case {
        name: "cpuset mems the host lacks",
        args: &["--cpuset-mems", "1", "busybox", "true"],
        exit: None,
        phrase: "cpuset.mems: invalid argument",
        vanishing_source: false,
    },
];

/// How one runtime failed.
#[derive(Debug)]
struct Outcome {
    exit: i32,
    message: String,
    /// The container, when Docker created one.
    id: Option<String>,
}

fn fail_with(d: &DockerStack, case: &Case, runtime: &str, scratch: &Path) -> Result<Outcome> {
    let name = format!(
        "fail-{}-{runtime}-{}",
        case.name.replace(' ', "-"),
        std::process::id()
    );
    let src = scratch.join(&name);
    let src_text = src.display().to_string();
    let mut args = vec!["--name", name.as_str(), "--runtime", runtime];
    let opts: Vec<String> = case
        .args
        .iter()
        .map(|a| a.replace("{src}", &src_text))
        .collect();
    args.extend(opts.iter().map(String::as_str));
    let out = if case.vanishing_source {
        std::fs::create_dir(&src)?;
        let mut create = vec!["create"];
        create.extend(&args);
        d.ok(&create)?;
        std::fs::remove_dir(&src)?;
        d.run(&["start", "-a", &name])?
    } else {
        let mut run = vec!["run"];
        run.extend(&args);
        d.run(&run)?
    };
    ensure!(
        !out.status.success(),
        "{} with {runtime} succeeded: {}",
        case.name,
        String::from_utf8_lossy(&out.stdout)
    );
    let id = d
        .ok(&[
            "ps",
            "-aq",
            "--no-trunc",
            "--filter",
            &format!("name=^{name}$"),
        ])?
        .lines()
        .next()
        .map(str::to_string);
    Ok(Outcome {
        exit: out.status.code().unwrap_or(-1),
        message: String::from_utf8_lossy(&out.stderr).trim_end().to_string(),
        id,
    })
}

/// What is left on the host of container `id`: processes in its cgroups, its cgroup dirs under
/// the stack's parent, mounts naming it.
fn leftovers(id: &str) -> Result<Vec<String>> {
    let mut left = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(cgroup) = std::fs::read_to_string(entry.path().join("cgroup")) else {
            continue;
        };
        if cgroup.contains(id) {
            let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            left.push(format!(
                "process {}: {}",
                entry.file_name().to_string_lossy(),
                String::from_utf8_lossy(&cmd).replace('\0', " ")
            ));
        }
    }
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")?.flatten() {
        let dir = hierarchy.path().join(CGROUP_PARENT).join(id);
        if dir.exists() {
            left.push(format!("cgroup {}", dir.display()));
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    for l in mounts.lines().filter(|l| l.contains(id)) {
        left.push(format!("mount {l}"));
    }
    Ok(left)
}

#[test]
fn failures_match_runc_and_leave_nothing() -> Result<()> {
    if !ready() {
        return Ok(());
    }
    let d = DockerStack::start()?;
    let _registry = py_kit::with_busybox(&d)?;
    let scratch = tempfile::tempdir()?;
    let state = d.stack.state_dir();
    let runtime_dir = |runtime: &str, id: &str| state.join("runtime").join(runtime).join(id);

    // The checks see what a running container has, so their silence below means something.
    for runtime in RUNTIMES {
        let id = d.ok(&[
            "run",
            "-d",
            "--runtime",
            runtime,
            "busybox",
            "sleep",
            "100000",
        ])?;
        let left = leftovers(&id)?;
        for kind in ["process ", "cgroup ", "mount "] {
            ensure!(
                left.iter().any(|l| l.starts_with(kind)),
                "{runtime}: a running container shows no {kind:?}: {left:?}"
            );
        }
        ensure!(
            runtime_dir(runtime, &id).is_dir(),
            "{runtime}: no state dir {}",
            runtime_dir(runtime, &id).display()
        );
        d.ok(&["rm", "-f", &id])?;
        let left = leftovers(&id)?;
        ensure!(left.is_empty(), "{runtime}: docker rm -f left {left:?}");
        ensure!(
            !runtime_dir(runtime, &id).exists(),
            "{runtime}: state dir left"
        );
    }

    let mut problems = Vec::new();
    for case in CASES {
        let mut outcomes = Vec::new();
        for runtime in RUNTIMES {
            let o = fail_with(&d, case, runtime, scratch.path())
                .with_context(|| format!("{}: {runtime}", case.name))?;
            eprintln!("{}: {runtime}: exit {}: {}", case.name, o.exit, o.message);
            if !o.message.to_lowercase().contains(case.phrase) {
                problems.push(format!(
                    "{}: {runtime}'s message lacks {:?}: {}",
                    case.name, case.phrase, o.message
                ));
            }
            if let Some(want) = case.exit
                && o.exit != want
            {
                problems.push(format!(
                    "{}: {runtime} exited {}, not {want}",
                    case.name, o.exit
                ));
            }
            if let Some(id) = &o.id {
                for l in leftovers(id)? {
                    problems.push(format!("{}: {runtime}: after the failure: {l}", case.name));
                }
                d.ok(&["rm", id])?;
                for dir in [
                    runtime_dir(runtime, id),
                    state.join("bundles").join(id),
                    state.join("netns").join(id),
                ] {
                    if dir.exists() {
                        problems.push(format!(
                            "{}: {runtime}: {} is left after docker rm",
                            case.name,
                            dir.display()
                        ));
                    }
                }
                for l in leftovers(id)? {
                    problems.push(format!("{}: {runtime}: after docker rm: {l}", case.name));
                }
            }
            outcomes.push(o);
        }
        let (runc, lc) = (&outcomes[0], &outcomes[1]);
        if runc.exit != lc.exit {
            problems.push(format!(
                "{}: exit codes differ: runc {} ({}), libcontainer {} ({})",
                case.name, runc.exit, runc.message, lc.exit, lc.message
            ));
        }
        if runc.id.is_some() != lc.id.is_some() {
            problems.push(format!(
                "{}: a container was created by Docker with one runtime only: runc {:?}, \
                 libcontainer {:?}",
                case.name, runc.id, lc.id
            ));
        }
    }
    ensure!(
        problems.is_empty(),
        "runc and libcontainer fail differently:\n{}",
        problems.join("\n")
    );
    Ok(())
}
