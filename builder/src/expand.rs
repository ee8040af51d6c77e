//! Docker's variable substitution in Dockerfile words (BuildKit's `shell` lexer as the classic
//! builder uses it).
//!
//! - `$name`, `${name}`; `${name:-word}` / `${name-word}` (default when unset-or-empty / unset),
//!   `${name:+word}` / `${name+word}` (alternative when set-and-non-empty / set),
//!   `${name:?msg}` / `${name?msg}` (error when unset-or-empty / unset); the word is itself
//!   expanded; other modifiers fail with `unsupported modifier (X) in substitution`;
//! - the escape token (`\` or `` ` ``) makes the next character literal (`\$a` is `$a`);
//! - single quotes keep everything literal, double quotes keep spaces but still expand `$`;
//!   quotes are removed;
//! - `$` followed by something that is not a name is a literal `$`; `$1`, `$@`... expand to "".
//!
//! Which instructions are expanded, and with which variables, is moby's `dispatch`: ADD, ARG,
//! COPY, ENV, EXPOSE, LABEL, STOPSIGNAL, USER, VOLUME, WORKDIR see the stage's ENV plus its
//! declared build args (ENV wins); FROM sees the global args only. RUN, CMD, ENTRYPOINT, SHELL,
//! HEALTHCHECK, MAINTAINER and ONBUILD are left alone (the shell expands RUN's variables).

use std::collections::HashMap;
use std::fmt;

use crate::dockerfile::{Arg, InstructionKind};

/// The variables visible to an expansion.
pub type Vars = HashMap<String, String>;

/// An expansion failure; shown as moby shows it: `failed to process "<word>": <reason>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpandError {
    pub word: String,
    pub reason: String,
}

impl fmt::Display for ExpandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "failed to process {:?}: {}", self.word, self.reason)
    }
}

impl std::error::Error for ExpandError {}

/// `KEY=VALUE` strings (a Docker `Env` list) as variables; a later key wins, a bare `KEY` is "".
pub fn vars_from_env<S: AsRef<str>>(env: &[S]) -> Vars {
    env.iter()
        .map(|e| match e.as_ref().split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (e.as_ref().to_string(), String::new()),
        })
        .collect()
}

/// Expands one word (moby's `ProcessWord`): variables substituted, quotes and escapes removed,
/// spaces kept.
pub fn process_word(word: &str, vars: &Vars, escape: char) -> Result<String, ExpandError> {
    Lexer::new(word, vars, escape)
        .run(None)
        .map(|(result, _)| result)
        .map_err(|reason| ExpandError {
            word: word.to_string(),
            reason,
        })
}

/// Expands and splits into words on unquoted whitespace (moby's `ProcessWords`); whitespace
/// coming from a variable's value splits too.
pub fn process_words(word: &str, vars: &Vars, escape: char) -> Result<Vec<String>, ExpandError> {
    Lexer::new(word, vars, escape)
        .run(None)
        .map(|(_, words)| words)
        .map_err(|reason| ExpandError {
            word: word.to_string(),
            reason,
        })
}

/// Returns the instruction with the words moby expands expanded (see the module docs);
/// instructions moby does not expand come back unchanged.
pub fn expand_instruction(
    kind: &InstructionKind,
    vars: &Vars,
    escape: char,
) -> Result<InstructionKind, ExpandError> {
    let word = |w: &str| process_word(w, vars, escape);
    let opt = |w: &Option<String>| w.as_deref().map(word).transpose();
    let list = |ws: &[String]| ws.iter().map(|w| word(w)).collect::<Result<Vec<_>, _>>();
    let pairs = |ps: &[(String, String)]| {
        ps.iter()
            .map(|(k, v)| Ok((word(k)?, word(v)?)))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(match kind {
        InstructionKind::Env(ps) => InstructionKind::Env(pairs(ps)?),
        InstructionKind::Label(ps) => InstructionKind::Label(pairs(ps)?),
        InstructionKind::Arg(args) => InstructionKind::Arg(
            args.iter()
                .map(|a| {
                    Ok(Arg {
                        name: word(&a.name)?,
                        default: opt(&a.default)?,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        InstructionKind::Copy {
            srcs,
            dest,
            from,
            chown,
            chmod,
        } => InstructionKind::Copy {
            srcs: list(srcs)?,
            dest: word(dest)?,
            from: from.clone(),
            chown: opt(chown)?,
            chmod: opt(chmod)?,
        },
        InstructionKind::Add {
            srcs,
            dest,
            chown,
            chmod,
        } => InstructionKind::Add {
            srcs: list(srcs)?,
            dest: word(dest)?,
            chown: opt(chown)?,
            chmod: opt(chmod)?,
        },
        InstructionKind::Expose(ports) => InstructionKind::Expose(list(ports)?),
        InstructionKind::Volume(volumes) => InstructionKind::Volume(list(volumes)?),
        InstructionKind::User(user) => InstructionKind::User(word(user)?),
        InstructionKind::Workdir(dir) => InstructionKind::Workdir(word(dir)?),
        InstructionKind::StopSignal(sig) => InstructionKind::StopSignal(word(sig)?),
        other => other.clone(),
    })
}

struct Lexer<'a> {
    chars: Vec<char>,
    pos: usize,
    vars: &'a Vars,
    escape: char,
}

#[derive(Default)]
struct Words {
    words: Vec<String>,
    word: String,
    in_word: bool,
}

impl Words {
    fn add_char(&mut self, ch: char) {
        if ch.is_whitespace() {
            if self.in_word && !self.word.is_empty() {
                self.words.push(std::mem::take(&mut self.word));
                self.in_word = false;
            }
        } else {
            self.add_raw_char(ch);
        }
    }

    fn add_raw_char(&mut self, ch: char) {
        self.word.push(ch);
        self.in_word = true;
    }

    fn add_string(&mut self, s: &str) {
        s.chars().for_each(|c| self.add_char(c));
    }

    fn add_raw_string(&mut self, s: &str) {
        self.word.push_str(s);
        self.in_word = true;
    }

    fn finish(mut self) -> Vec<String> {
        if !self.word.is_empty() {
            self.words.push(self.word);
        }
        self.words
    }
}

impl<'a> Lexer<'a> {
    fn new(word: &str, vars: &'a Vars, escape: char) -> Self {
        Self {
            chars: word.chars().collect(),
            pos: 0,
            vars,
            escape,
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    /// Processes up to `stop` (consumed) or the end; returns the text and its words.
    fn run(&mut self, stop: Option<char>) -> Result<(String, Vec<String>), String> {
        let mut result = String::new();
        let mut words = Words::default();
        while let Some(ch) = self.peek() {
            if Some(ch) == stop {
                self.pos += 1;
                return Ok((result, words.finish()));
            }
            match ch {
                '$' => {
                    let value = self.dollar()?;
                    result.push_str(&value);
                    words.add_string(&value);
                }
                '\'' => {
                    let value = self.single_quote()?;
                    result.push_str(&value);
                    words.add_raw_string(&value);
                }
                '"' => {
                    let value = self.double_quote()?;
                    result.push_str(&value);
                    words.add_raw_string(&value);
                }
                _ => {
                    self.pos += 1;
                    if ch == self.escape {
                        let Some(escaped) = self.next() else { break };
                        words.add_raw_char(escaped);
                        result.push(escaped);
                    } else {
                        words.add_char(ch);
                        result.push(ch);
                    }
                }
            }
        }
        if let Some(stop) = stop {
            return Err(format!(
                "unexpected end of statement while looking for matching {stop}"
            ));
        }
        Ok((result, words.finish()))
    }

    fn single_quote(&mut self) -> Result<String, String> {
        self.pos += 1;
        let mut result = String::new();
        loop {
            match self.next() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching single-quote"
                            .into(),
                    );
                }
                Some('\'') => return Ok(result),
                Some(c) => result.push(c),
            }
        }
    }

    fn double_quote(&mut self) -> Result<String, String> {
        self.pos += 1;
        let mut result = String::new();
        loop {
            match self.peek() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching double-quote"
                            .into(),
                    );
                }
                Some('"') => {
                    self.pos += 1;
                    return Ok(result);
                }
                Some('$') => result.push_str(&self.dollar()?),
                Some(mut ch) => {
                    self.pos += 1;
                    if ch == self.escape {
                        match self.peek() {
                            None => continue,
                            Some(next) if next == '"' || next == '$' || next == self.escape => {
                                ch = next;
                                self.pos += 1;
                            }
                            Some(_) => {}
                        }
                    }
                    result.push(ch);
                }
            }
        }
    }

    fn lookup(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    fn dollar(&mut self) -> Result<String, String> {
        self.pos += 1;
        if self.peek() != Some('{') {
            let name = self.name();
            if name.is_empty() {
                return Ok("$".into());
            }
            return Ok(self.lookup(&name).unwrap_or("").to_string());
        }
        self.pos += 1;
        match self.peek() {
            None => return Err("syntax error: missing '}'".into()),
            Some('{' | '}' | ':') => return Err("syntax error: bad substitution".into()),
            Some(_) => {}
        }
        let name = self.name();
        let Some(mut op) = self.next() else {
            return Err("syntax error: missing '}'".into());
        };
        let mut modifier = op.to_string();
        let mut null_is_unset = false;
        match op {
            '}' => return Ok(self.lookup(&name).unwrap_or("").to_string()),
            ':' => {
                null_is_unset = true;
                match self.next() {
                    Some(c) => {
                        op = c;
                        modifier.push(c);
                    }
                    None => return Err("syntax error: missing '}'".into()),
                }
            }
            _ => {}
        }
        if !matches!(op, '-' | '+' | '?') {
            return Err(format!("unsupported modifier ({modifier}) in substitution"));
        }
        let word = match self.run(Some('}')) {
            Ok((word, _)) => word,
            Err(e) if self.peek().is_none() => {
                let _ = e;
                return Err("syntax error: missing '}'".into());
            }
            Err(e) => return Err(e),
        };
        let value = self.lookup(&name);
        let unset = value.is_none() || (null_is_unset && value == Some(""));
        Ok(match op {
            '-' if unset => word,
            '-' => value.unwrap_or("").to_string(),
            '+' if unset => String::new(),
            '+' => word,
            _ => match value {
                None => {
                    let message = if word.is_empty() {
                        "is not allowed to be unset"
                    } else {
                        &word
                    };
                    return Err(format!("{name}: {message}"));
                }
                Some("") if null_is_unset => {
                    let message = if word.is_empty() {
                        "is not allowed to be empty"
                    } else {
                        &word
                    };
                    return Err(format!("{name}: {message}"));
                }
                Some(v) => v.to_string(),
            },
        })
    }

    /// A name: letters, digits and `_`; or a run of digits (positional) or one special parameter.
    fn name(&mut self) -> String {
        let mut name = String::new();
        while let Some(ch) = self.peek() {
            if name.is_empty() && ch.is_ascii_digit() {
                while let Some(d) = self.peek().filter(char::is_ascii_digit) {
                    name.push(d);
                    self.pos += 1;
                }
                return name;
            }
            if name.is_empty() && matches!(ch, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0') {
                self.pos += 1;
                return ch.to_string();
            }
            if !(ch.is_alphanumeric() || ch == '_') {
                break;
            }
            name.push(ch);
            self.pos += 1;
        }
        name
    }
}
