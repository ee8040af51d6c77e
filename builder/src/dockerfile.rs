//! The Dockerfile parser, as Docker's classic builder has it.
//!
//! Two passes, like moby's: [`logical_lines`] turns the text into instruction lines (parser
//! directives, comments, line continuations, the escape token), then each line becomes a typed
//! [`Instruction`] (flags, JSON or shell form, per-instruction argument rules and errors).
//!
//! Arguments are kept **as written** (quotes included, variables not substituted): the build
//! expands them per step with [`crate::expand::expand_instruction`], which also removes the
//! quotes, because the values of variables change from step to step.
//!
//! Facts kept from moby (BuildKit's `frontend/dockerfile/{parser,instructions}` used by the classic
//! builder):
//! - parser directives (`# escape=`, `# syntax=`) only before any other line; an empty line, a
//!   plain comment or an unknown directive ends them; each may appear once;
//! - a comment or an empty line inside a continuation is skipped (an empty one with a warning);
//!   continuation lines keep their leading whitespace;
//! - the instruction keyword is case-insensitive; unknown ones fail with `unknown instruction: X`;
//! - flags are the leading `--name=value` words;
//! - RUN, CMD, ENTRYPOINT, SHELL and HEALTHCHECK CMD take a JSON array of strings (exec form) or
//!   anything else verbatim (shell form); COPY, ADD and VOLUME take a JSON array or a
//!   whitespace-separated list; EXPOSE ports come back sorted, as moby sorts them.

use std::fmt;
use std::time::Duration;

/// A parse failure, with the (1-based) line where the instruction starts; 0 when there is none
/// (then it shows as the bare message, as moby shows file-level errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            f.write_str(&self.message)
        } else {
            write!(
                f,
                "Dockerfile parse error line {}: {}",
                self.line, self.message
            )
        }
    }
}

impl std::error::Error for ParseError {}

pub type Result<T, E = ParseError> = std::result::Result<T, E>;

/// The parser directives found at the top of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directives {
    /// `\` (default) or `` ` ``.
    pub escape: char,
    /// `# syntax=`: accepted and ignored by the classic builder.
    pub syntax: Option<String>,
}

impl Default for Directives {
    fn default() -> Self {
        Self {
            escape: '\\',
            syntax: None,
        }
    }
}

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    pub directives: Directives,
    /// The ARGs before the first FROM (usable in FROM lines only unless redeclared in a stage).
    pub args_before_from: Vec<Arg>,
    pub stages: Vec<Stage>,
    /// moby's warnings (empty continuation lines), to show in the build output.
    pub warnings: Vec<String>,
}

/// One `name[=default]` of an ARG instruction. `default` is as written (unexpanded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arg {
    pub name: String,
    pub default: Option<String>,
}

/// A build stage: a FROM line and the instructions up to the next FROM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// The `AS name`, lowercased as moby does.
    pub name: Option<String>,
    /// The base as written (`scratch`, an image reference or an earlier stage's name; may hold
    /// `$VARS` to expand with the global args).
    pub base: String,
    /// `--platform=`, as written.
    pub platform: Option<String>,
    pub instructions: Vec<Instruction>,
    /// Line of the FROM instruction.
    pub line: usize,
    /// The FROM line as written (continuations joined).
    pub original: String,
}

/// One instruction after FROM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    /// First line of the instruction (1-based).
    pub line: usize,
    /// The instruction as written, continuations joined (what `Step N/M :` shows).
    pub original: String,
    pub kind: InstructionKind,
}

/// The command of RUN, CMD, ENTRYPOINT: the JSON (exec) form or the shell form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShellOrExec {
    /// Run through the stage's SHELL (`/bin/sh -c` by default).
    Shell(String),
    /// `["exe", "arg"]`, run as is.
    Exec(Vec<String>),
}

impl ShellOrExec {
    /// The argv this command runs with the given shell (`["/bin/sh", "-c"]` by default).
    pub fn argv(&self, shell: &[String]) -> Vec<String> {
        match self {
            ShellOrExec::Exec(args) => args.clone(),
            ShellOrExec::Shell(cmd) => {
                let mut argv = shell.to_vec();
                argv.push(cmd.clone());
                argv
            }
        }
    }
}

/// A HEALTHCHECK, in the shape of Docker's `HealthConfig`: `test` is `["NONE"]`,
/// `["CMD", exe, args...]` or `["CMD-SHELL", command]`; a zero duration or retries means
/// "inherit from the base image".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HealthConfig {
    pub test: Vec<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub start_period: Duration,
    pub start_interval: Duration,
    pub retries: u32,
}

/// Every instruction but FROM (which starts a [`Stage`]). Values are as written; see the module
/// docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstructionKind {
    Run {
        args: ShellOrExec,
    },
    Cmd(ShellOrExec),
    Entrypoint(ShellOrExec),
    Copy {
        srcs: Vec<String>,
        dest: String,
        /// `--from=`: a stage name, a stage index or an image.
        from: Option<String>,
        chown: Option<String>,
        chmod: Option<String>,
    },
    Add {
        srcs: Vec<String>,
        dest: String,
        chown: Option<String>,
        chmod: Option<String>,
    },
    Env(Vec<(String, String)>),
    Arg(Vec<Arg>),
    Label(Vec<(String, String)>),
    Expose(Vec<String>),
    Volume(Vec<String>),
    User(String),
    Workdir(String),
    Healthcheck(HealthConfig),
    Shell(Vec<String>),
    StopSignal(String),
    /// The trigger; its `original` is the text stored in the image's `OnBuild` list.
    Onbuild(Box<Instruction>),
    Maintainer(String),
}

impl InstructionKind {
    /// The instruction keyword, uppercase (`RUN`, `COPY`, ...).
    pub fn keyword(&self) -> &'static str {
        match self {
            InstructionKind::Run { .. } => "RUN",
            InstructionKind::Cmd(_) => "CMD",
            InstructionKind::Entrypoint(_) => "ENTRYPOINT",
            InstructionKind::Copy { .. } => "COPY",
            InstructionKind::Add { .. } => "ADD",
            InstructionKind::Env(_) => "ENV",
            InstructionKind::Arg(_) => "ARG",
            InstructionKind::Label(_) => "LABEL",
            InstructionKind::Expose(_) => "EXPOSE",
            InstructionKind::Volume(_) => "VOLUME",
            InstructionKind::User(_) => "USER",
            InstructionKind::Workdir(_) => "WORKDIR",
            InstructionKind::Healthcheck(_) => "HEALTHCHECK",
            InstructionKind::Shell(_) => "SHELL",
            InstructionKind::StopSignal(_) => "STOPSIGNAL",
            InstructionKind::Onbuild(_) => "ONBUILD",
            InstructionKind::Maintainer(_) => "MAINTAINER",
        }
    }
}

/// Parses a whole Dockerfile.
pub fn parse(text: &str) -> Result<Dockerfile> {
    let (directives, lines, warnings) = logical_lines(text)?;
    if lines.is_empty() {
        return Err(ParseError {
            line: 0,
            message: "file with no instructions".into(),
        });
    }
    let mut args_before_from = Vec::new();
    let mut stages: Vec<Stage> = Vec::new();
    for line in &lines {
        match parse_logical_line(&line.text, line.start, directives.escape)? {
            Parsed::From(stage) => stages.push(stage),
            Parsed::Instruction(instruction) => match stages.last_mut() {
                Some(stage) => stage.instructions.push(instruction),
                None => match instruction.kind {
                    InstructionKind::Arg(args) => args_before_from.extend(args),
                    _ => return Err(no_stage(line.start)),
                },
            },
        }
    }
    if stages.is_empty() {
        // Only ARGs: moby parses it, builds nothing and says so.
        return Err(ParseError {
            line: 0,
            message: "No image was generated. Is your Dockerfile empty?".into(),
        });
    }
    Ok(Dockerfile {
        directives,
        args_before_from,
        stages,
        warnings,
    })
}

fn no_stage(line: usize) -> ParseError {
    ParseError {
        line,
        message: "no build stage in current context".into(),
    }
}

/// Parses one instruction given as text (an ONBUILD trigger, a `docker commit --change`): the
/// same rules as in a file with the given escape token. FROM is refused here (its callers have
/// their own wording for it).
pub fn parse_instruction(text: &str, escape: char) -> Result<Instruction> {
    let directives = Directives {
        escape,
        syntax: None,
    };
    let lines = join_lines(text, &directives)?;
    let mut lines = lines.0.into_iter();
    let (Some(line), None) = (lines.next(), lines.next()) else {
        return Err(ParseError {
            line: 0,
            message: format!("expected one instruction in {text:?}"),
        });
    };
    match parse_logical_line(&line.text, line.start, escape)? {
        Parsed::Instruction(instruction) => Ok(instruction),
        Parsed::From(stage) => Err(ParseError {
            line: stage.line,
            message: "FROM is not an instruction here".into(),
        }),
    }
}

/// One instruction's text after directives, comments and continuations are handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalLine {
    /// First and last physical lines (1-based).
    pub start: usize,
    pub end: usize,
    pub text: String,
}

/// First pass: directives, comments, continuations. Returns the directives, the instruction
/// lines and the warnings.
pub fn logical_lines(text: &str) -> Result<(Directives, Vec<LogicalLine>, Vec<String>)> {
    let mut state = DirectiveState::default();
    let mut directives = Directives::default();
    // Directives are only looked for before anything else: parse them first, with the escape
    // token they set used for the rest.
    for (index, raw) in physical_lines(text).enumerate() {
        let line = if index == 0 {
            raw.strip_prefix('\u{feff}').unwrap_or(raw)
        } else {
            raw
        };
        let trimmed = line.trim_start();
        if state
            .consider(trimmed, &mut directives)
            .map_err(|message| ParseError {
                line: index + 1,
                message,
            })?
        {
            break;
        }
    }
    let (lines, warnings) = join_lines(text, &directives)?;
    Ok((directives, lines, warnings))
}

fn physical_lines(text: &str) -> impl Iterator<Item = &str> {
    text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l))
}

#[derive(Default)]
struct DirectiveState {
    seen: Vec<String>,
}

impl DirectiveState {
    /// Looks at a line for a directive; `Ok(true)` when directives are over.
    fn consider(&mut self, line: &str, directives: &mut Directives) -> Result<bool, String> {
        let Some((key, value)) = directive(line) else {
            return Ok(true);
        };
        let key = key.to_ascii_lowercase();
        if key != "escape" && key != "syntax" {
            return Ok(true);
        }
        if self.seen.contains(&key) {
            return Err(format!("only one {key} parser directive can be used"));
        }
        self.seen.push(key.clone());
        if key == "escape" {
            match value {
                "\\" => directives.escape = '\\',
                "`" => directives.escape = '`',
                _ => {
                    return Err(format!(
                        "invalid escape token '{value}' does not match ` or \\"
                    ));
                }
            }
        } else {
            directives.syntax = Some(value.to_string());
        }
        Ok(false)
    }
}

/// `# key = value` with moby's regex `^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$`.
fn directive(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix('#')?.trim_start();
    let key_len = rest
        .find(|c: char| !c.is_ascii_alphanumeric())
        .unwrap_or(rest.len());
    let key = &rest[..key_len];
    if !key.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return None;
    }
    let value = rest[key_len..].trim_start().strip_prefix('=')?.trim();
    (!value.is_empty()).then_some((key, value))
}

fn is_comment(line: &str) -> bool {
    line.trim_start().starts_with('#')
}

/// Removes a trailing escape token (plus spaces/tabs); `None` when the line does not continue.
fn strip_continuation(line: &str, escape: char) -> Option<&str> {
    let trimmed = line.trim_end_matches([' ', '\t']);
    trimmed.strip_suffix(escape)
}

fn join_lines(text: &str, directives: &Directives) -> Result<(Vec<LogicalLine>, Vec<String>)> {
    let escape = directives.escape;
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    let mut physical = physical_lines(text).enumerate().peekable();
    while let Some((index, raw)) = physical.next() {
        let raw = if index == 0 {
            raw.strip_prefix('\u{feff}').unwrap_or(raw)
        } else {
            raw
        };
        let first = raw.trim_start();
        let first = if first.starts_with('#') { "" } else { first };
        let start = index + 1;
        let mut end = start;
        let (mut line, mut continues) = match strip_continuation(first, escape) {
            Some(stripped) => (stripped.to_string(), true),
            None => (first.to_string(), false),
        };
        if !continues && line.is_empty() {
            continue;
        }
        let mut empty_continuation = false;
        while continues {
            let Some((index, raw)) = physical.next() else {
                break;
            };
            end = index + 1;
            if is_comment(raw) {
                continue;
            }
            if raw.trim_start().is_empty() {
                empty_continuation = true;
                continue;
            }
            match strip_continuation(raw, escape) {
                Some(stripped) => line.push_str(stripped),
                None => {
                    line.push_str(raw);
                    continues = false;
                }
            }
        }
        if empty_continuation {
            warnings.push(format!(
                "[WARNING]: Empty continuation line found in:\n    {line}"
            ));
        }
        out.push(LogicalLine {
            start,
            end,
            text: line,
        });
    }
    if !warnings.is_empty() {
        warnings.push(
            "[WARNING]: Empty continuation lines will become errors in a future release.".into(),
        );
    }
    Ok((out, warnings))
}

enum Parsed {
    From(Stage),
    Instruction(Instruction),
}

/// moby's `reWhitespace`: `[\t\v\f\r ]+`.
fn is_ws(c: char) -> bool {
    matches!(c, '\t' | '\u{b}' | '\u{c}' | '\r' | ' ')
}

fn split_ws(s: &str) -> Vec<String> {
    if s.is_empty() {
        return Vec::new();
    }
    s.split(is_ws)
        .filter(|w| !w.is_empty())
        .map(String::from)
        .collect()
}

fn parse_logical_line(text: &str, line: usize, escape: char) -> Result<Parsed> {
    let err = |message: String| ParseError { line, message };
    let trimmed = text.trim();
    let (keyword, after) = match trimmed.find(is_ws) {
        Some(i) => (&trimmed[..i], trimmed[i..].trim_start_matches(is_ws)),
        None => (trimmed, ""),
    };
    let (flag_words, rest) = extract_flags(after);
    let rest = rest.trim();
    let mut flags = Flags::new(keyword.to_ascii_uppercase(), flag_words);
    let kind = match keyword.to_ascii_lowercase().as_str() {
        "from" => {
            let args = split_ws(rest);
            let name = match args.len() {
                3 if args[1].eq_ignore_ascii_case("as") => {
                    let name = args[2].to_ascii_lowercase();
                    if !valid_stage_name(&name) {
                        return Err(err(format!(
                            "invalid name for build stage: {:?}, name can't start with a number \
                             or contain symbols",
                            args[2]
                        )));
                    }
                    Some(name)
                }
                1 => None,
                _ => return Err(err("FROM requires either one or three arguments".into())),
            };
            let platform = flags.string("platform");
            flags.finish().map_err(err)?;
            return Ok(Parsed::From(Stage {
                name,
                base: args[0].clone(),
                platform: platform.get(&flags),
                instructions: Vec::new(),
                line,
                original: trimmed.to_string(),
            }));
        }
        "run" => {
            flags
                .refuse(&["mount", "network", "security"])
                .map_err(err)?;
            flags.finish().map_err(err)?;
            InstructionKind::Run {
                args: shell_or_exec(rest).map_err(err)?,
            }
        }
        "cmd" => {
            flags.finish().map_err(err)?;
            InstructionKind::Cmd(shell_or_exec(rest).map_err(err)?)
        }
        "entrypoint" => {
            flags.finish().map_err(err)?;
            InstructionKind::Entrypoint(shell_or_exec(rest).map_err(err)?)
        }
        "shell" => {
            flags.finish().map_err(err)?;
            match shell_or_exec(rest).map_err(err)? {
                ShellOrExec::Exec(args) if args.is_empty() => {
                    return Err(err(at_least_one("SHELL")));
                }
                ShellOrExec::Exec(args) => InstructionKind::Shell(args),
                ShellOrExec::Shell(s) if s.is_empty() => {
                    return Err(err(at_least_one("SHELL")));
                }
                ShellOrExec::Shell(_) => {
                    return Err(err("SHELL requires the arguments to be in JSON form".into()));
                }
            }
        }
        name @ ("copy" | "add") => {
            let upper = name.to_ascii_uppercase();
            let args = json_or_list(rest).map_err(err)?;
            if args.len() < 2 {
                return Err(err(format!(
                    "{upper} requires at least two arguments, but only one was provided. \
                     Destination could not be determined"
                )));
            }
            let chown = flags.string("chown");
            let chmod = flags.string("chmod");
            let from = (name == "copy").then(|| flags.string("from"));
            flags
                .refuse(&["link", "parents", "exclude", "keep-git-dir", "checksum"])
                .map_err(err)?;
            flags.finish().map_err(err)?;
            let (srcs, dest) = args.split_at(args.len() - 1);
            let (srcs, dest) = (srcs.to_vec(), dest[0].clone());
            let (chown, chmod) = (chown.get(&flags), chmod.get(&flags));
            match from {
                Some(from) => InstructionKind::Copy {
                    srcs,
                    dest,
                    from: from.get(&flags),
                    chown,
                    chmod,
                },
                None => InstructionKind::Add {
                    srcs,
                    dest,
                    chown,
                    chmod,
                },
            }
        }
        "env" => {
            flags.finish().map_err(err)?;
            InstructionKind::Env(name_values(rest, "ENV", escape).map_err(err)?)
        }
        "label" => {
            flags.finish().map_err(err)?;
            InstructionKind::Label(name_values(rest, "LABEL", escape).map_err(err)?)
        }
        "arg" => {
            flags.finish().map_err(err)?;
            let words = parse_words(rest, escape);
            if words.is_empty() {
                return Err(err(at_least_one("ARG")));
            }
            let mut args = Vec::new();
            for word in words {
                let arg = match word.split_once('=') {
                    Some(("", _)) => return Err(err("ARG names can not be blank".into())),
                    Some((name, value)) => Arg {
                        name: name.to_string(),
                        default: Some(value.to_string()),
                    },
                    None => Arg {
                        name: word,
                        default: None,
                    },
                };
                args.push(arg);
            }
            InstructionKind::Arg(args)
        }
        "expose" => {
            flags.finish().map_err(err)?;
            let mut ports = split_ws(rest);
            if ports.is_empty() {
                return Err(err(at_least_one("EXPOSE")));
            }
            ports.sort();
            InstructionKind::Expose(ports)
        }
        "volume" => {
            flags.finish().map_err(err)?;
            let args = json_or_list(rest).map_err(err)?;
            if args.is_empty() {
                return Err(err(at_least_one("VOLUME")));
            }
            let mut volumes = Vec::new();
            for v in args {
                let v = v.trim();
                if v.is_empty() {
                    return Err(err("VOLUME specified can not be an empty string".into()));
                }
                volumes.push(v.to_string());
            }
            InstructionKind::Volume(volumes)
        }
        name @ ("user" | "workdir" | "maintainer" | "stopsignal") => {
            let upper = name.to_ascii_uppercase();
            if rest.is_empty() {
                return Err(err(format!("{upper} requires exactly one argument")));
            }
            flags.finish().map_err(err)?;
            let value = rest.to_string();
            match name {
                "user" => InstructionKind::User(value),
                "workdir" => InstructionKind::Workdir(value),
                "maintainer" => InstructionKind::Maintainer(value),
                _ => InstructionKind::StopSignal(value),
            }
        }
        "healthcheck" => InstructionKind::Healthcheck(healthcheck(rest, &mut flags).map_err(err)?),
        "onbuild" => {
            if rest.is_empty() {
                return Err(err(at_least_one("ONBUILD")));
            }
            flags.finish().map_err(err)?;
            let trigger_keyword = rest.split(is_ws).next().unwrap_or("").to_ascii_uppercase();
            match trigger_keyword.as_str() {
                "ONBUILD" => {
                    return Err(err(
                        "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed".into()
                    ));
                }
                "MAINTAINER" | "FROM" => {
                    return Err(err(format!(
                        "{trigger_keyword} isn't allowed as an ONBUILD trigger"
                    )));
                }
                _ => {}
            }
            let expression = strip_onbuild(trimmed);
            match parse_logical_line(&expression, line, escape)? {
                Parsed::Instruction(mut trigger) => {
                    trigger.original = expression;
                    InstructionKind::Onbuild(Box::new(trigger))
                }
                Parsed::From(_) => unreachable!("FROM refused above"),
            }
        }
        _ => {
            return Err(err(format!(
                "unknown instruction: {}",
                keyword.to_ascii_uppercase()
            )));
        }
    };
    Ok(Parsed::Instruction(Instruction {
        line,
        original: trimmed.to_string(),
        kind,
    }))
}

/// moby's `(?i)^\s*ONBUILD\s*` removed from the original line.
fn strip_onbuild(original: &str) -> String {
    let s = original.trim_start();
    s.get(7..).unwrap_or("").trim_start().to_string()
}

fn valid_stage_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
}

fn at_least_one(keyword: &str) -> String {
    format!("{keyword} requires at least one argument")
}

/// moby's `parseJSON`: `Ok(Some)` for a JSON array of strings, `Ok(None)` when the text is not
/// a JSON array, an error for an array holding something else than strings.
fn json_array(rest: &str) -> Result<Option<Vec<String>>, String> {
    let rest = rest.trim_start();
    if !rest.starts_with('[') {
        return Ok(None);
    }
    let Ok(values) = serde_json::from_str::<Vec<serde_json::Value>>(rest) else {
        return Ok(None);
    };
    values
        .into_iter()
        .map(|v| match v {
            serde_json::Value::String(s) => Ok(s),
            _ => {
                Err("when using JSON array syntax, arrays must be comprised of strings only".into())
            }
        })
        .collect::<Result<Vec<_>, String>>()
        .map(Some)
}

fn shell_or_exec(rest: &str) -> Result<ShellOrExec, String> {
    if rest.is_empty() {
        return Ok(ShellOrExec::Shell(String::new()));
    }
    Ok(match json_array(rest)? {
        Some(args) => ShellOrExec::Exec(args),
        None => ShellOrExec::Shell(rest.to_string()),
    })
}

fn json_or_list(rest: &str) -> Result<Vec<String>, String> {
    Ok(match json_array(rest)? {
        Some(args) => args,
        None => split_ws(rest),
    })
}

fn healthcheck(rest: &str, flags: &mut Flags) -> Result<HealthConfig, String> {
    let (typ, command) = match rest.find(char::is_whitespace) {
        Some(i) => (&rest[..i], rest[i..].trim_start()),
        None => (rest, ""),
    };
    if typ.is_empty() {
        return Err(at_least_one("HEALTHCHECK"));
    }
    let typ = typ.to_ascii_uppercase();
    if typ == "NONE" {
        if !command.is_empty() {
            return Err("HEALTHCHECK NONE takes no arguments".into());
        }
        flags.finish()?;
        return Ok(HealthConfig {
            test: vec!["NONE".into()],
            ..HealthConfig::default()
        });
    }
    let interval = flags.string("interval");
    let timeout = flags.string("timeout");
    let start_period = flags.string("start-period");
    let start_interval = flags.string("start-interval");
    let retries = flags.string("retries");
    flags.finish()?;
    if typ != "CMD" {
        return Err(format!("Unknown type {typ:?} in HEALTHCHECK (try CMD)"));
    }
    let test = match shell_or_exec(command)? {
        ShellOrExec::Exec(args) if !args.is_empty() => {
            std::iter::once("CMD".to_string()).chain(args).collect()
        }
        ShellOrExec::Shell(cmd) if !cmd.is_empty() => vec!["CMD-SHELL".to_string(), cmd],
        _ => return Err("Missing command after HEALTHCHECK CMD".into()),
    };
    let retries = match retries.get(flags) {
        None => 0,
        Some(value) => {
            let n: i64 = value
                .parse()
                .map_err(|_| format!("strconv.ParseInt: parsing {value:?}: invalid syntax"))?;
            if n < 0 {
                return Err(format!("--retries cannot be negative ({n})"));
            }
            u32::try_from(n)
                .map_err(|_| format!("strconv.ParseInt: parsing {value:?}: value out of range"))?
        }
    };
    Ok(HealthConfig {
        test,
        interval: interval_flag("interval", interval.get(flags))?,
        timeout: interval_flag("timeout", timeout.get(flags))?,
        start_period: interval_flag("start-period", start_period.get(flags))?,
        start_interval: interval_flag("start-interval", start_interval.get(flags))?,
        retries,
    })
}

/// moby's `parseOptInterval`: empty or zero is 0 (inherit), anything else at least 1ms.
fn interval_flag(name: &str, value: Option<String>) -> Result<Duration, String> {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return Ok(Duration::ZERO);
    };
    let d = parse_go_duration(&value)?;
    if !d.is_zero() && d < Duration::from_millis(1) {
        return Err(format!("Interval {name:?} cannot be less than 1ms"));
    }
    Ok(d)
}

/// Go's `time.ParseDuration` for non-negative durations (`1h2m3.5s`, `300ms`, `2us`, `0`).
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let invalid = || format!("time: invalid duration {s:?}");
    let body = s.strip_prefix('+').unwrap_or(s);
    if body == "0" {
        return Ok(Duration::ZERO);
    }
    if body.is_empty() || body.starts_with('-') {
        return Err(invalid());
    }
    let mut total = 0f64;
    let mut rest = body;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number = &rest[..num_len];
        if number.is_empty() || number == "." {
            return Err(invalid());
        }
        let value: f64 = number.parse().map_err(|_| invalid())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos_per = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            "" => return Err(format!("time: missing unit in duration {s:?}")),
            unit => return Err(format!("time: unknown unit {unit:?} in duration {s:?}")),
        };
        rest = &rest[unit_len..];
        total += value * nanos_per;
    }
    Ok(Duration::from_nanos(total.round() as u64))
}

/// moby's `parseNameVal` (ENV, LABEL): `KEY value with spaces` or `k=v k2="v 2"`; values keep
/// their quotes (the expansion removes them).
fn name_values(rest: &str, keyword: &str, escape: char) -> Result<Vec<(String, String)>, String> {
    let words = parse_words(rest, escape);
    if words.is_empty() {
        return Err(at_least_one(keyword));
    }
    if !words[0].contains('=') {
        let Some(i) = rest.find(is_ws) else {
            return Err(format!("{keyword} must have two arguments"));
        };
        let value = rest[i..].trim_start_matches(is_ws);
        return Ok(vec![(rest[..i].to_string(), value.to_string())]);
    }
    let mut pairs = Vec::new();
    for word in words {
        let Some((key, value)) = word.split_once('=') else {
            return Err(format!(
                "Syntax error - can't find = in {word:?}. Must be of the form: name=value"
            ));
        };
        if key.is_empty() {
            return Err(format!("{keyword} names can not be blank"));
        }
        pairs.push((key.to_string(), value.to_string()));
    }
    Ok(pairs)
}

/// moby's `parseWords`: splits on whitespace outside quotes, keeping quotes and escapes in the
/// words.
pub(crate) fn parse_words(rest: &str, escape: char) -> Vec<String> {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote,
    }
    let mut words = Vec::new();
    let mut phase = Phase::Spaces;
    let mut quote = '\0';
    let mut blank_ok = false;
    let mut word = String::new();
    let mut chars = rest.chars().peekable();
    loop {
        let ch = chars.next();
        if phase == Phase::Spaces {
            match ch {
                None => break,
                Some(c) if c.is_whitespace() => continue,
                Some(_) => phase = Phase::Word,
            }
        }
        let Some(ch) = ch else {
            if blank_ok || !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
            break;
        };
        if phase == Phase::Word {
            if ch.is_whitespace() {
                phase = Phase::Spaces;
                if blank_ok || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                blank_ok = false;
                continue;
            }
            if ch == '\'' || ch == '"' {
                quote = ch;
                blank_ok = true;
                phase = Phase::Quote;
            }
            if ch == escape {
                match chars.next() {
                    None => continue,
                    Some(next) => {
                        word.push(ch);
                        word.push(next);
                        continue;
                    }
                }
            }
            word.push(ch);
            continue;
        }
        // In quotes.
        if ch == quote {
            phase = Phase::Word;
        }
        if ch == escape && quote != '\'' {
            match chars.next() {
                None => {
                    phase = Phase::Word;
                    continue;
                }
                Some(next) => {
                    word.push(ch);
                    word.push(next);
                    continue;
                }
            }
        }
        word.push(ch);
    }
    words
}

/// moby's `extractBuilderFlags`: the leading `--flag[=value]` words (quotes removed) and the rest.
fn extract_flags(line: &str) -> (Vec<String>, &str) {
    let mut words = Vec::new();
    let mut rest = line;
    loop {
        let trimmed = rest.trim_start();
        if !trimmed.starts_with("--") {
            return (words, trimmed);
        }
        let mut word = String::new();
        let mut quote: Option<char> = None;
        let mut end = trimmed.len();
        let mut iter = trimmed.char_indices();
        while let Some((i, ch)) = iter.next() {
            match quote {
                None if ch.is_whitespace() => {
                    end = i;
                    break;
                }
                None if ch == '\'' || ch == '"' => quote = Some(ch),
                Some(q) if ch == q => quote = None,
                _ if ch == '\\' => {
                    if let Some((_, next)) = iter.next() {
                        word.push(next);
                    }
                }
                _ => word.push(ch),
            }
        }
        rest = &trimmed[end..];
        if word == "--" {
            return (words, rest.trim_start());
        }
        words.push(word);
    }
}

/// moby's `BFlags`: declare the flags an instruction takes, then `finish` refuses the others
/// (messages name the flag with its `--`, as BuildKit's current `BFlags` does).
struct Flags {
    keyword: String,
    words: Vec<String>,
    declared: Vec<&'static str>,
    refused: Vec<&'static str>,
}

#[derive(Clone, Copy)]
struct FlagRef(&'static str);

impl FlagRef {
    fn get(self, flags: &Flags) -> Option<String> {
        flags.value(self.0)
    }
}

impl Flags {
    fn new(keyword: String, words: Vec<String>) -> Self {
        Self {
            keyword,
            words,
            declared: Vec::new(),
            refused: Vec::new(),
        }
    }

    fn string(&mut self, name: &'static str) -> FlagRef {
        self.declared.push(name);
        FlagRef(name)
    }

    fn refuse(&mut self, names: &[&'static str]) -> Result<(), String> {
        self.refused.extend_from_slice(names);
        Ok(())
    }

    fn split(word: &str) -> (&str, Option<&str>) {
        let word = word.strip_prefix("--").unwrap_or(word);
        match word.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (word, None),
        }
    }

    fn value(&self, name: &str) -> Option<String> {
        self.words
            .iter()
            .map(|w| Self::split(w))
            .find(|(n, _)| *n == name)?
            .1
            .map(String::from)
    }

    fn finish(&self) -> Result<(), String> {
        let mut seen: Vec<&str> = Vec::new();
        for word in &self.words {
            if !word.starts_with("--") {
                return Err(format!("arg should start with -- : {word}"));
            }
            let (name, value) = Self::split(word);
            if self.refused.contains(&name) {
                return Err(format!(
                    "{} --{name} is not supported by berth's classic builder",
                    self.keyword
                ));
            }
            if !self.declared.contains(&name) {
                return Err(format!("unknown flag: --{name}"));
            }
            if seen.contains(&name) {
                return Err(format!("duplicate flag specified: --{name}"));
            }
            seen.push(name);
            if value.is_none() {
                return Err(format!("missing a value on flag: --{name}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
