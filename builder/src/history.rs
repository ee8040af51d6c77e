//! What the classic builder records for each step: the `Cmd` it probes the cache with and the
//! history entry's `created_by`.
//!
//! moby commits config-only steps with `Cmd = SHELL + ["#(nop) ", comment]`, so `docker history`
//! shows `/bin/sh -c #(nop)  CMD ["sh"]` (two spaces: the `"#(nop) "` element ends with one and
//! the join adds one); COPY and ADD use `SHELL + ["#(nop) COPY <hash> in <dest> "]`; RUN records
//! its command (with the build args, see [`crate::args::StageArgs::run_created_by`]). The
//! comments print values the way Go's `fmt` does (`%q` of a string list is `["a" "b"]`, `%v` is
//! `[a b]`), which is why `docker history` of a classic build looks the way it does.

use std::time::Duration;

use serde_json::Value;

use crate::config;
use crate::dockerfile::{HealthConfig, InstructionKind};

/// The comment moby commits a config-only instruction with, from the **expanded** instruction
/// and the config **after** it was applied (CMD/ENTRYPOINT show the resolved command, WORKDIR
/// the resolved directory). `None` for RUN, COPY and ADD, which are recorded differently.
pub fn comment(kind: &InstructionKind, config_after: &Value) -> Option<String> {
    let resolved = |field: &str| {
        config_after
            .get(field)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    Some(match kind {
        InstructionKind::Env(pairs) => format!("ENV {}", key_values(pairs)),
        InstructionKind::Label(pairs) => format!("LABEL {}", key_values(pairs)),
        InstructionKind::Maintainer(m) => format!("MAINTAINER {m}"),
        InstructionKind::Onbuild(trigger) => format!("ONBUILD {}", trigger.original),
        InstructionKind::Workdir(_) => format!(
            "WORKDIR {}",
            config_after
                .get("WorkingDir")
                .and_then(Value::as_str)
                .unwrap_or("")
        ),
        InstructionKind::Cmd(_) => format!("CMD {}", go_quote_list(&resolved("Cmd"))),
        InstructionKind::Entrypoint(_) => {
            format!("ENTRYPOINT {}", go_quote_list(&resolved("Entrypoint")))
        }
        InstructionKind::Healthcheck(h) => format!("HEALTHCHECK {}", go_health(h)),
        InstructionKind::Expose(ports) => format!("EXPOSE {}", ports.join(" ")),
        InstructionKind::User(user) => format!("USER {user}"),
        InstructionKind::Volume(volumes) => format!("VOLUME [{}]", volumes.join(" ")),
        InstructionKind::StopSignal(signal) => format!("STOPSIGNAL {signal}"),
        InstructionKind::Shell(shell) => format!("SHELL [{}]", shell.join(" ")),
        InstructionKind::Arg(args) => {
            let decls: Vec<String> = args
                .iter()
                .map(|a| match &a.default {
                    Some(v) => format!("{}={v}", a.name),
                    None => a.name.clone(),
                })
                .collect();
            format!("ARG {}", decls.join(" "))
        }
        InstructionKind::Run { .. }
        | InstructionKind::Copy { .. }
        | InstructionKind::Add { .. } => {
            return None;
        }
    })
}

fn key_values(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The `Cmd` of a config-only step (its cache key): `shell + ["#(nop) ", comment]`.
pub fn nop_cmd(config: &Value, comment: &str) -> Vec<String> {
    let mut cmd = config::shell(config);
    cmd.push("#(nop) ".into());
    cmd.push(comment.into());
    cmd
}

/// The `Cmd` of a COPY/ADD step: `shell + ["#(nop) COPY <src_hash> in <dest> "]`, where
/// `src_hash` is moby's `file:<hex>`, `dir:<hex>` or `multi:<hex>`.
pub fn copy_cmd(config: &Value, keyword: &str, src_hash: &str, dest: &str) -> Vec<String> {
    let mut cmd = config::shell(config);
    cmd.push(format!("#(nop) {keyword} {src_hash} in {dest} "));
    cmd
}

/// A history `created_by`: the `Cmd` joined with spaces.
pub fn created_by(cmd: &[String]) -> String {
    cmd.join(" ")
}

/// Go's `fmt.Sprintf("%q", []string{...})`: `["a" "b c"]`.
pub fn go_quote_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| go_quote(s)).collect();
    format!("[{}]", quoted.join(" "))
}

/// Go's `strconv.Quote`.
pub fn go_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        push_escaped(&mut out, c, '"');
    }
    out.push('"');
    out
}

fn push_escaped(out: &mut String, c: char, quote: char) {
    match c {
        '\u{7}' => out.push_str("\\a"),
        '\u{8}' => out.push_str("\\b"),
        '\u{c}' => out.push_str("\\f"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        '\u{b}' => out.push_str("\\v"),
        '\\' => out.push_str("\\\\"),
        c if c == quote => {
            out.push('\\');
            out.push(c);
        }
        c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
        c if c.is_control() => {
            if (c as u32) < 0x10000 {
                out.push_str(&format!("\\u{:04x}", c as u32));
            } else {
                out.push_str(&format!("\\U{:08x}", c as u32));
            }
        }
        c => out.push(c),
    }
}

/// Go's `%q` of a `*HealthConfig`: `&{["CMD-SHELL" "x"] "30s" "3s" "0s" "0s" '\x03'}`.
fn go_health(h: &HealthConfig) -> String {
    let retries = char::from_u32(h.retries).unwrap_or('\u{fffd}');
    let mut rune = String::from("'");
    push_escaped(&mut rune, retries, '\'');
    rune.push('\'');
    format!(
        "&{{{} {} {} {} {} {rune}}}",
        go_quote_list(&h.test),
        go_quote(&go_duration(h.interval)),
        go_quote(&go_duration(h.timeout)),
        go_quote(&go_duration(h.start_period)),
        go_quote(&go_duration(h.start_interval)),
    )
}

/// Go's `time.Duration.String`: `0s`, `1.5s`, `1m30s`, `1h0m0s`, `100ms`, `2µs`, `3ns`.
pub fn go_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".into();
    }
    if nanos < 1_000_000_000 {
        let (unit, per) = if nanos < 1_000 {
            ("ns", 1)
        } else if nanos < 1_000_000 {
            ("µs", 1_000)
        } else {
            ("ms", 1_000_000)
        };
        return format!("{}{unit}", fraction(nanos, per));
    }
    let hours = nanos / 3_600_000_000_000;
    let minutes = (nanos / 60_000_000_000) % 60;
    let seconds = fraction(nanos % 60_000_000_000, 1_000_000_000);
    match (hours, minutes) {
        (0, 0) => format!("{seconds}s"),
        (0, m) => format!("{m}m{seconds}s"),
        (h, m) => format!("{h}h{m}m{seconds}s"),
    }
}

/// `value / per` with the fractional digits Go prints (trailing zeros trimmed).
fn fraction(value: u128, per: u128) -> String {
    let whole = value / per;
    let rest = value % per;
    if rest == 0 {
        return whole.to_string();
    }
    let digits = per.to_string().len() - 1;
    let frac = format!("{rest:0digits$}");
    format!("{whole}.{}", frac.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::{StageState, apply};
    use crate::dockerfile;
    use crate::expand;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    /// Runs `line` on `config` and returns the created_by moby records for it.
    fn recorded(config: &mut Value, line: &str) -> String {
        let df = dockerfile::parse(&format!("FROM scratch\n{line}")).unwrap();
        let vars = expand::vars_from_env(&config::env(config));
        let kind =
            expand::expand_instruction(&df.stages[0].instructions[0].kind, &vars, '\\').unwrap();
        apply(config, &kind, &mut StageState::default()).unwrap();
        created_by(&nop_cmd(config, &comment(&kind, config).unwrap()))
    }

    #[test]
    fn nop_created_by_like_docker_history() {
        let mut c = json!({"Env": ["V=1"]});
        for (line, want) in [
            ("CMD [\"sh\"]", "/bin/sh -c #(nop)  CMD [\"sh\"]"),
            (
                "CMD nginx -g 'daemon off;'",
                "/bin/sh -c #(nop)  CMD [\"/bin/sh\" \"-c\" \"nginx -g 'daemon off;'\"]",
            ),
            (
                "ENTRYPOINT [\"/docker-entrypoint.sh\"]",
                "/bin/sh -c #(nop)  ENTRYPOINT [\"/docker-entrypoint.sh\"]",
            ),
            ("ENV A=$V B=\"x y\"", "/bin/sh -c #(nop)  ENV A=1 B=x y"),
            (
                "LABEL maintainer=\"NGINX <x@y>\"",
                "/bin/sh -c #(nop)  LABEL maintainer=NGINX <x@y>",
            ),
            ("EXPOSE 80 443/udp", "/bin/sh -c #(nop)  EXPOSE 443/udp 80"),
            (
                "STOPSIGNAL SIGQUIT",
                "/bin/sh -c #(nop)  STOPSIGNAL SIGQUIT",
            ),
            ("USER app", "/bin/sh -c #(nop)  USER app"),
            ("WORKDIR /srv", "/bin/sh -c #(nop)  WORKDIR /srv"),
            ("WORKDIR app", "/bin/sh -c #(nop)  WORKDIR /srv/app"),
            (
                "VOLUME /data /logs",
                "/bin/sh -c #(nop)  VOLUME [/data /logs]",
            ),
            ("ARG A B=2", "/bin/sh -c #(nop)  ARG A B=2"),
            (
                "MAINTAINER me <me@x>",
                "/bin/sh -c #(nop)  MAINTAINER me <me@x>",
            ),
            ("ONBUILD RUN make", "/bin/sh -c #(nop)  ONBUILD RUN make"),
            (
                "HEALTHCHECK --interval=30s --timeout=3s --retries=3 CMD curl -f http://localhost/ || exit 1",
                "/bin/sh -c #(nop)  HEALTHCHECK &{[\"CMD-SHELL\" \"curl -f http://localhost/ || exit 1\"] \"30s\" \"3s\" \"0s\" \"0s\" '\\x03'}",
            ),
            (
                "SHELL [\"/bin/bash\", \"-c\"]",
                "/bin/bash -c #(nop)  SHELL [/bin/bash -c]",
            ),
            // Later steps use the new shell.
            ("USER root", "/bin/bash -c #(nop)  USER root"),
        ] {
            assert_eq!(recorded(&mut c, line), want, "{line}");
        }
        assert!(
            comment(
                &InstructionKind::Run {
                    args: dockerfile::ShellOrExec::Shell("x".into())
                },
                &c
            )
            .is_none()
        );
    }

    #[test]
    fn copy_form() {
        let cmd = copy_cmd(&json!({}), "COPY", "file:0123", "/app/");
        assert_eq!(
            cmd,
            s(&["/bin/sh", "-c", "#(nop) COPY file:0123 in /app/ "])
        );
        assert_eq!(
            created_by(&cmd),
            "/bin/sh -c #(nop) COPY file:0123 in /app/ "
        );
    }

    #[test]
    fn go_formatting() {
        assert_eq!(
            go_quote("a\"b\\c\nd\té\u{1}"),
            "\"a\\\"b\\\\c\\nd\\té\\x01\""
        );
        assert_eq!(go_quote_list(&s(&["a", "b c"])), "[\"a\" \"b c\"]");
        assert_eq!(go_quote_list(&[]), "[]");
        for (nanos, want) in [
            (0u64, "0s"),
            (3, "3ns"),
            (2_000, "2µs"),
            (1_500, "1.5µs"),
            (100_000_000, "100ms"),
            (1_500_000_000, "1.5s"),
            (30_000_000_000, "30s"),
            (90_000_000_000, "1m30s"),
            (3_600_000_000_000, "1h0m0s"),
            (3_723_500_000_000, "1h2m3.5s"),
        ] {
            assert_eq!(go_duration(Duration::from_nanos(nanos)), want, "{nanos}");
        }
    }
}
