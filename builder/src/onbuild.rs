//! ONBUILD triggers: a base image's `OnBuild` list run right after the FROM of a child build.
//!
//! moby's rules (`processOnBuild`): each trigger is parsed as a Dockerfile line with the default
//! escape token; ONBUILD, FROM and MAINTAINER are refused; the triggers run in order and the
//! child image's own `OnBuild` list starts empty.

use crate::dockerfile::{self, Instruction, InstructionKind, ParseError};

/// The line moby prints before running the triggers.
pub fn banner(count: usize) -> String {
    let plural = if count == 1 { "" } else { "s" };
    format!("# Executing {count} build trigger{plural}")
}

/// Parses the base image's `OnBuild` triggers into the instructions to run after FROM.
pub fn triggers(on_build: &[String]) -> Result<Vec<Instruction>, ParseError> {
    let mut out = Vec::new();
    for trigger in on_build {
        let keyword = trigger
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        let refuse = |message: String| ParseError { line: 0, message };
        match keyword.as_str() {
            "ONBUILD" => {
                return Err(refuse(
                    "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed".into(),
                ));
            }
            "FROM" | "MAINTAINER" => {
                return Err(refuse(format!(
                    "{keyword} isn't allowed as an ONBUILD trigger"
                )));
            }
            _ => {}
        }
        let (_, lines, _) = dockerfile::logical_lines(trigger)?;
        if lines.len() != 1 {
            return Err(refuse(
                "onbuild trigger should be a single expression".into(),
            ));
        }
        let instruction = dockerfile::parse_instruction(trigger, '\\')?;
        if matches!(instruction.kind, InstructionKind::Onbuild(_)) {
            return Err(refuse(
                "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed".into(),
            ));
        }
        out.push(instruction);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dockerfile::ShellOrExec;

    #[test]
    fn triggers_parse_in_order() {
        let t = triggers(&[
            "RUN echo built".into(),
            "COPY . /app".into(),
            "ENV A=1".into(),
        ])
        .unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(
            t[0].kind,
            InstructionKind::Run {
                args: ShellOrExec::Shell("echo built".into())
            }
        );
        assert_eq!(t[1].original, "COPY . /app");
        assert!(matches!(t[2].kind, InstructionKind::Env(_)));
        assert!(triggers(&[]).unwrap().is_empty());
        assert_eq!(banner(1), "# Executing 1 build trigger");
        assert_eq!(banner(2), "# Executing 2 build triggers");
    }

    #[test]
    fn refused_triggers() {
        for (trigger, want) in [
            (
                "ONBUILD RUN x",
                "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed",
            ),
            ("FROM busybox", "FROM isn't allowed as an ONBUILD trigger"),
            (
                "maintainer me",
                "MAINTAINER isn't allowed as an ONBUILD trigger",
            ),
            ("BOGUS x", "unknown instruction: BOGUS"),
            (
                "RUN a\nRUN b",
                "onbuild trigger should be a single expression",
            ),
            ("", "onbuild trigger should be a single expression"),
        ] {
            assert_eq!(
                triggers(&[trigger.to_string()]).unwrap_err().message,
                want,
                "{trigger}"
            );
        }
    }
}
