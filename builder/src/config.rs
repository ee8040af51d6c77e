//! Applying instructions to a Docker image `Config` (a `serde_json::Value` object with Docker's
//! field names: `Cmd`, `Entrypoint`, `Env`, `ExposedPorts`, `Labels`, `OnBuild`, `User`,
//! `Volumes`, `WorkingDir`, `StopSignal`, `Healthcheck`, `Shell`), as moby's dispatchers do.
//!
//! - ENV replaces a variable of the same name in place, else appends;
//! - ENTRYPOINT clears `Cmd` unless a CMD came earlier in the same stage (or the same
//!   `docker commit`): a base image's CMD makes no sense with a new entrypoint;
//! - WORKDIR is relative to the previous one (`WORKDIR a` after `/x` is `/x/a`), then cleaned;
//! - shell forms run through `Shell` (`["/bin/sh", "-c"]` when unset);
//! - HEALTHCHECK stores Docker's `HealthConfig` (durations in nanoseconds, zero ones left out);
//! - ONBUILD appends the trigger's text to `OnBuild`;
//! - MAINTAINER (the image's `author`), ARG, RUN, COPY and ADD do not touch `Config`.
//!
//! [`apply_changes`] is `docker commit --change`: the changes are parsed as Dockerfile lines,
//! only the instructions moby accepts there are allowed, and their words are expanded with the
//! config's `Env`.

use serde_json::{Map, Value, json};

use crate::dockerfile::{self, HealthConfig, InstructionKind, ParseError, ShellOrExec};
use crate::dockerignore::clean_path;
use crate::expand::{self, ExpandError};

/// Errors applying instructions; messages are moby's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} is not a valid change command")]
    InvalidChange(String),
    /// Shown without the line: for `--change` moby reports the parser's message alone.
    #[error("{}", .0.message)]
    Parse(#[from] ParseError),
    #[error("{0}")]
    Expand(#[from] ExpandError),
    #[error("Invalid signal: {0}")]
    InvalidSignal(String),
    #[error("invalid containerPort: {0}")]
    InvalidPort(String),
    #[error("invalid proto: {0}")]
    InvalidProto(String),
    #[error("image config is not a JSON object")]
    NotAnObject,
}

/// What a stage remembers between instructions for the config rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StageState {
    /// A CMD ran in this stage (so a later ENTRYPOINT keeps it).
    pub cmd_set: bool,
}

/// The instructions `docker commit --change` accepts (moby's `validCommitCommands`; SHELL is not
/// one of them, so berth refuses it as dockerd does).
pub const CHANGE_INSTRUCTIONS: [&str; 11] = [
    "CMD",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "HEALTHCHECK",
    "LABEL",
    "ONBUILD",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

/// The default shell of shell-form commands.
pub fn default_shell() -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into()]
}

/// The config's `Shell`, or the default one.
pub fn shell(config: &Value) -> Vec<String> {
    match strings(config.get("Shell")) {
        Some(shell) if !shell.is_empty() => shell,
        _ => default_shell(),
    }
}

/// The config's `Env` as `KEY=VALUE` strings.
pub fn env(config: &Value) -> Vec<String> {
    strings(config.get("Env")).unwrap_or_default()
}

fn strings(value: Option<&Value>) -> Option<Vec<String>> {
    value?.as_array().map(|a| {
        a.iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect()
    })
}

fn object(config: &mut Value) -> Result<&mut Map<String, Value>, ConfigError> {
    if config.is_null() {
        *config = Value::Object(Map::new());
    }
    config.as_object_mut().ok_or(ConfigError::NotAnObject)
}

fn map_field<'a>(obj: &'a mut Map<String, Value>, field: &str) -> &'a mut Map<String, Value> {
    let entry = obj
        .entry(field)
        .or_insert_with(|| Value::Object(Map::new()));
    if !entry.is_object() {
        *entry = Value::Object(Map::new());
    }
    entry.as_object_mut().expect("just made an object")
}

/// Applies one **expanded** instruction (see [`crate::expand::expand_instruction`]) to the
/// config. Instructions that do not change the config are accepted and do nothing.
pub fn apply(
    config: &mut Value,
    kind: &InstructionKind,
    state: &mut StageState,
) -> Result<(), ConfigError> {
    let current_shell = shell(config);
    let obj = object(config)?;
    match kind {
        InstructionKind::Env(pairs) => {
            let mut env = strings(obj.get("Env")).unwrap_or_default();
            for (key, value) in pairs {
                let entry = format!("{key}={value}");
                match env
                    .iter_mut()
                    .find(|e| e.split('=').next() == Some(key.as_str()))
                {
                    Some(existing) => *existing = entry,
                    None => env.push(entry),
                }
            }
            obj.insert("Env".into(), json!(env));
        }
        InstructionKind::Label(pairs) => {
            let labels = map_field(obj, "Labels");
            for (key, value) in pairs {
                labels.insert(key.clone(), json!(value));
            }
        }
        InstructionKind::Expose(ports) => {
            let mut keys = Vec::new();
            for port in ports {
                keys.extend(port_keys(port)?);
            }
            let exposed = map_field(obj, "ExposedPorts");
            for key in keys {
                exposed.insert(key, json!({}));
            }
        }
        InstructionKind::Volume(volumes) => {
            let map = map_field(obj, "Volumes");
            for v in volumes {
                map.insert(v.clone(), json!({}));
            }
        }
        InstructionKind::User(user) => {
            obj.insert("User".into(), json!(user));
        }
        InstructionKind::Workdir(dir) => {
            let current = obj.get("WorkingDir").and_then(Value::as_str).unwrap_or("");
            obj.insert("WorkingDir".into(), json!(workdir(current, dir)));
        }
        InstructionKind::StopSignal(signal) => {
            check_signal(signal)?;
            obj.insert("StopSignal".into(), json!(signal));
        }
        InstructionKind::Cmd(cmd) => {
            let argv = command(cmd, &current_shell);
            // An empty CMD does not count as "CMD set" for a later ENTRYPOINT (moby).
            state.cmd_set |= !argv.is_empty();
            obj.insert("Cmd".into(), json!(argv));
        }
        InstructionKind::Entrypoint(cmd) => {
            obj.insert("Entrypoint".into(), json!(command(cmd, &current_shell)));
            if !state.cmd_set {
                obj.insert("Cmd".into(), Value::Null);
            }
        }
        InstructionKind::Healthcheck(health) => {
            obj.insert("Healthcheck".into(), health_json(health));
        }
        InstructionKind::Shell(shell) => {
            obj.insert("Shell".into(), json!(shell));
        }
        InstructionKind::Onbuild(trigger) => {
            let mut triggers = strings(obj.get("OnBuild")).unwrap_or_default();
            triggers.push(trigger.original.clone());
            obj.insert("OnBuild".into(), json!(triggers));
        }
        InstructionKind::Run { .. }
        | InstructionKind::Copy { .. }
        | InstructionKind::Add { .. }
        | InstructionKind::Arg(_)
        | InstructionKind::Maintainer(_) => {}
    }
    Ok(())
}

/// The argv of CMD/ENTRYPOINT (moby's `resolveCmdLine`): exec form as is, shell form through
/// the shell; no command at all is an empty list (`[]` in the config, not `null`).
fn command(cmd: &ShellOrExec, shell: &[String]) -> Vec<String> {
    match cmd {
        ShellOrExec::Shell(s) if s.is_empty() => Vec::new(),
        other => other.argv(shell),
    }
}

/// moby's `normalizeWorkdir`: relative to the current one, cleaned, always absolute.
pub fn workdir(current: &str, requested: &str) -> String {
    if requested.starts_with('/') {
        return clean_path(requested);
    }
    clean_path(&format!("/{current}/{requested}"))
}

/// Docker's `HealthConfig` JSON (zero durations and retries left out, as Go's `omitempty`).
pub fn health_json(health: &HealthConfig) -> Value {
    let mut obj = Map::new();
    obj.insert("Test".into(), json!(health.test));
    for (name, d) in [
        ("Interval", health.interval),
        ("Timeout", health.timeout),
        ("StartPeriod", health.start_period),
        ("StartInterval", health.start_interval),
    ] {
        if !d.is_zero() {
            obj.insert(name.into(), json!(d.as_nanos() as u64));
        }
    }
    if health.retries != 0 {
        obj.insert("Retries".into(), json!(health.retries));
    }
    Value::Object(obj)
}

/// The `ExposedPorts` keys of one EXPOSE word: `80`, `80/udp`, `8000-8002/tcp` (a range gives
/// each port), as moby's `nat.ParsePortSpecs` keeps them.
pub fn port_keys(spec: &str) -> Result<Vec<String>, ConfigError> {
    // `ip:hostPort:containerPort` forms are accepted by nat; only the container port counts.
    let container = spec.rsplit(':').next().unwrap_or(spec);
    let (ports, proto) = match container.split_once('/') {
        Some((ports, proto)) => (ports, proto.to_ascii_lowercase()),
        None => (container, "tcp".to_string()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(ConfigError::InvalidProto(proto));
    }
    let invalid = || ConfigError::InvalidPort(ports.to_string());
    let parse = |p: &str| p.parse::<u16>().map_err(|_| invalid());
    let (start, end) = match ports.split_once('-') {
        Some((a, b)) => (parse(a)?, parse(b)?),
        None => (parse(ports)?, parse(ports)?),
    };
    if end < start {
        return Err(invalid());
    }
    Ok((start..=end).map(|p| format!("{p}/{proto}")).collect())
}

const SIGNALS: [&str; 31] = [
    "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL", "USR1", "SEGV", "USR2",
    "PIPE", "ALRM", "TERM", "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU", "URG",
    "XCPU", "XFSZ", "VTALRM", "PROF", "WINCH", "IO", "PWR", "SYS",
];

/// moby's `signal.ParseSignal`: a number, a name (`TERM`, `SIGTERM`, `sigterm`) or `RTMIN+n`.
pub fn check_signal(signal: &str) -> Result<(), ConfigError> {
    let invalid = || ConfigError::InvalidSignal(signal.to_string());
    if let Ok(n) = signal.parse::<i64>() {
        return if n > 0 && n <= 64 {
            Ok(())
        } else {
            Err(invalid())
        };
    }
    let upper = signal.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    let known = SIGNALS.contains(&name)
        || ["IOT", "POLL", "CLD", "RTMIN", "RTMAX"].contains(&name)
        || name
            .strip_prefix("RTMIN+")
            .or_else(|| name.strip_prefix("RTMAX-"))
            .is_some_and(|n| n.parse::<u32>().is_ok_and(|n| (1..=15).contains(&n)));
    if known { Ok(()) } else { Err(invalid()) }
}

/// `docker commit --change`: parses each change as a Dockerfile instruction, refuses those
/// `--change` does not accept (`from is not a valid change command`), expands their words with
/// the config's `Env` and applies them in order.
pub fn apply_changes(config: &mut Value, changes: &[String]) -> Result<(), ConfigError> {
    let text = changes.join("\n");
    let (_, lines, _) = dockerfile::logical_lines(&text)?;
    let mut instructions = Vec::new();
    for line in &lines {
        let keyword = line.text.split_whitespace().next().unwrap_or("");
        if !CHANGE_INSTRUCTIONS.contains(&keyword.to_ascii_uppercase().as_str()) {
            // moby prints the parser's node value, which is the keyword lowercased.
            return Err(ConfigError::InvalidChange(keyword.to_ascii_lowercase()));
        }
        instructions.push(dockerfile::parse_instruction(&line.text, '\\')?);
    }
    // Work on a copy: a change failing halfway leaves the config as it was.
    let mut updated = config.clone();
    let mut state = StageState::default();
    for instruction in instructions {
        let vars = expand::vars_from_env(&env(&updated));
        let kind = expand::expand_instruction(&instruction.kind, &vars, '\\')?;
        apply(&mut updated, &kind, &mut state)?;
    }
    *config = updated;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dockerfile;

    fn run(config: &mut Value, lines: &str) -> Result<(), ConfigError> {
        let df = dockerfile::parse(&format!("FROM scratch\n{lines}")).unwrap();
        let mut state = StageState::default();
        for instruction in &df.stages[0].instructions {
            let vars = expand::vars_from_env(&env(config));
            let kind = expand::expand_instruction(&instruction.kind, &vars, '\\')?;
            apply(config, &kind, &mut state)?;
        }
        Ok(())
    }

    fn changes(config: &mut Value, changes: &[&str]) -> Result<(), ConfigError> {
        let changes: Vec<String> = changes.iter().map(|s| s.to_string()).collect();
        apply_changes(config, &changes)
    }

    #[test]
    fn every_config_instruction() {
        let mut c = json!({"Env": ["PATH=/usr/bin", "A=0"], "Cmd": ["sh"]});
        run(
            &mut c,
            "ENV A=1 B=\"two words\"\nENV C $A-$B\nLABEL l1=v1 \"l 2\"=\"v 2\"\nEXPOSE 80 53/UDP 8000-8001\n\
             VOLUME /data [\"/x\"]\nVOLUME [\"/y\"]\nUSER app\nWORKDIR /srv\nWORKDIR app\nWORKDIR ../x/./y\n\
             STOPSIGNAL SIGINT\nSHELL [\"/bin/bash\", \"-c\"]\nCMD echo hi\nONBUILD RUN make\nONBUILD COPY . /app\n\
             HEALTHCHECK --interval=30s --retries=2 CMD [\"check\"]\nMAINTAINER me\nARG X=1\nRUN true\nCOPY a b",
        )
        .unwrap();
        assert_eq!(
            c["Env"],
            json!(["PATH=/usr/bin", "A=1", "B=two words", "C=1-two words"])
        );
        assert_eq!(c["Labels"], json!({"l1": "v1", "l 2": "v 2"}));
        assert_eq!(
            c["ExposedPorts"],
            json!({"80/tcp": {}, "53/udp": {}, "8000/tcp": {}, "8001/tcp": {}})
        );
        // Not JSON when mixed with a plain word: split, and the expansion removes the quotes.
        assert_eq!(c["Volumes"], json!({"/data": {}, "[/x]": {}, "/y": {}}));
        assert_eq!(c["User"], "app");
        assert_eq!(c["WorkingDir"], "/srv/x/y");
        assert_eq!(c["StopSignal"], "SIGINT");
        assert_eq!(c["Shell"], json!(["/bin/bash", "-c"]));
        // CMD's shell form uses the SHELL set before it.
        assert_eq!(c["Cmd"], json!(["/bin/bash", "-c", "echo hi"]));
        assert_eq!(c["OnBuild"], json!(["RUN make", "COPY . /app"]));
        assert_eq!(
            c["Healthcheck"],
            json!({"Test": ["CMD", "check"], "Interval": 30_000_000_000u64, "Retries": 2})
        );
    }

    #[test]
    fn entrypoint_resets_an_inherited_cmd() {
        let mut c = json!({"Cmd": ["from-base"]});
        run(&mut c, "ENTRYPOINT [\"/app\"]").unwrap();
        assert_eq!(c["Entrypoint"], json!(["/app"]));
        assert_eq!(c["Cmd"], Value::Null);
        // A CMD earlier in the same stage survives.
        let mut c = json!({"Cmd": ["from-base"]});
        run(&mut c, "CMD [\"--flag\"]\nENTRYPOINT /app run").unwrap();
        assert_eq!(c["Entrypoint"], json!(["/bin/sh", "-c", "/app run"]));
        assert_eq!(c["Cmd"], json!(["--flag"]));
        // ENTRYPOINT [] clears the entrypoint (to an empty list, as moby stores it).
        let mut c = json!({"Entrypoint": ["x"]});
        run(&mut c, "ENTRYPOINT []").unwrap();
        assert_eq!(c["Entrypoint"], json!([]));
        // An empty CMD is `[]` and does not protect the CMD from a later ENTRYPOINT.
        let mut c = json!({});
        run(&mut c, "CMD\nENTRYPOINT [\"e\"]").unwrap();
        assert_eq!(c["Cmd"], Value::Null);
        let mut c = json!({});
        run(&mut c, "CMD []").unwrap();
        assert_eq!(c["Cmd"], json!([]));
    }

    #[test]
    fn env_replaces_in_place() {
        let mut c = json!({"Env": ["A=1", "B=2"]});
        run(&mut c, "ENV A=3\nENV D=$B").unwrap();
        assert_eq!(c["Env"], json!(["A=3", "B=2", "D=2"]));
        // Values are expanded with the env before the instruction.
        let mut c = json!({"Env": ["abc=hello"]});
        run(&mut c, "ENV abc=bye def=$abc\nENV ghi=$abc").unwrap();
        assert_eq!(c["Env"], json!(["abc=bye", "def=hello", "ghi=bye"]));
    }

    #[test]
    fn healthcheck_none_and_workdir_rules() {
        let mut c = json!({});
        run(&mut c, "HEALTHCHECK NONE").unwrap();
        assert_eq!(c["Healthcheck"], json!({"Test": ["NONE"]}));
        assert_eq!(workdir("", "a"), "/a");
        assert_eq!(workdir("/a", "/b/"), "/b");
        assert_eq!(workdir("/a", "b/../c"), "/a/c");
        assert_eq!(workdir("/a", ".."), "/");
    }

    #[test]
    fn config_errors() {
        for (line, want) in [
            ("STOPSIGNAL SIGFOO", "Invalid signal: SIGFOO"),
            ("STOPSIGNAL 0", "Invalid signal: 0"),
            ("EXPOSE 80/xyz", "invalid proto: xyz"),
            ("EXPOSE abc", "invalid containerPort: abc"),
            ("EXPOSE 70000", "invalid containerPort: 70000"),
        ] {
            let mut c = json!({});
            assert_eq!(run(&mut c, line).unwrap_err().to_string(), want, "{line}");
        }
        for ok in ["9", "KILL", "sigterm", "SIGRTMIN+3", "RTMAX-1"] {
            check_signal(ok).unwrap();
        }
        assert!(
            apply(
                &mut json!([1]),
                &InstructionKind::User("x".into()),
                &mut StageState::default()
            )
            .is_err()
        );
        // A null config becomes an object.
        let mut c = Value::Null;
        run(&mut c, "USER x").unwrap();
        assert_eq!(c, json!({"User": "x"}));
    }

    #[test]
    fn commit_changes() {
        let mut c = json!({"Env": ["HOME=/root"], "Cmd": ["sh"], "Entrypoint": null});
        changes(
            &mut c,
            &[
                "CMD [\"x\"]",
                "ENV A=$HOME/a",
                "EXPOSE 8080",
                "LABEL k=v",
                "USER 1000",
                "WORKDIR /w",
                "VOLUME /v",
                "ONBUILD RUN y",
                "STOPSIGNAL 9",
                "HEALTHCHECK NONE",
            ],
        )
        .unwrap();
        assert_eq!(c["Cmd"], json!(["x"]));
        assert_eq!(c["Env"], json!(["HOME=/root", "A=/root/a"]));
        assert_eq!(c["ExposedPorts"], json!({"8080/tcp": {}}));
        assert_eq!(c["Labels"], json!({"k": "v"}));
        assert_eq!(c["User"], "1000");
        assert_eq!(c["WorkingDir"], "/w");
        assert_eq!(c["Volumes"], json!({"/v": {}}));
        assert_eq!(c["OnBuild"], json!(["RUN y"]));
        assert_eq!(c["StopSignal"], "9");
        // A change may hold several lines; CMD then ENTRYPOINT keeps the CMD.
        let mut c = json!({"Cmd": ["old"]});
        changes(&mut c, &["CMD [\"a\"]\nENTRYPOINT [\"b\"]"]).unwrap();
        assert_eq!(
            (c["Cmd"].clone(), c["Entrypoint"].clone()),
            (json!(["a"]), json!(["b"]))
        );
        let mut c = json!({"Cmd": ["old"]});
        changes(&mut c, &["ENTRYPOINT [\"b\"]"]).unwrap();
        assert_eq!(c["Cmd"], Value::Null);
        // No changes: untouched.
        let mut c = json!({"Cmd": ["old"]});
        changes(&mut c, &[]).unwrap();
        assert_eq!(c, json!({"Cmd": ["old"]}));
    }

    #[test]
    fn commit_changes_refused() {
        for (change, want) in [
            ("FROM busybox", "from is not a valid change command"),
            ("RUN true", "run is not a valid change command"),
            ("copy a b", "copy is not a valid change command"),
            ("ADD a b", "add is not a valid change command"),
            ("ARG a", "arg is not a valid change command"),
            ("MAINTAINER me", "maintainer is not a valid change command"),
            (
                "SHELL [\"/bin/bash\"]",
                "shell is not a valid change command",
            ),
            ("BOGUS x", "bogus is not a valid change command"),
            (
                "CMD [\"a\", 1]",
                "when using JSON array syntax, arrays must be comprised of strings only",
            ),
            ("ENV", "ENV requires at least one argument"),
        ] {
            let mut c = json!({"Cmd": ["keep"]});
            assert_eq!(
                changes(&mut c, &[change]).unwrap_err().to_string(),
                want,
                "{change}"
            );
        }
        // A refused change leaves the config as it was, even after valid ones.
        let mut c = json!({"Cmd": ["keep"]});
        assert!(changes(&mut c, &["USER x", "RUN y"]).is_err());
        assert!(changes(&mut c, &["USER x", "STOPSIGNAL NOPE"]).is_err());
        assert_eq!(c, json!({"Cmd": ["keep"]}));
    }
}
