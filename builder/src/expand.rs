//! Docker's variable substitution in Dockerfile words (BuildKit's `shell` lexer as the classic
//! builder uses it).
//!
//! - `$name`, `${name}`; `${name:-word}` / `${name-word}` (default when unset-or-empty / unset),
//!   `${name:+word}` / `${name+word}` (alternative when set-and-non-empty / set),
//!   `${name:?msg}` / `${name?msg}` (error when unset-or-empty / unset), `${name#pat}` /
//!   `${name##pat}` / `${name%pat}` / `${name%%pat}` (shortest/longest prefix/suffix removal,
//!   `*` and `?` wildcards), `${name/pat/repl}` / `${name//pat/repl}` (first/all replaced), as the
//!   BuildKit lexer moby vendors has them; the word is itself expanded; other modifiers
//!   (`${a=b}`, `${a:=b}`) fail with `unsupported modifier (X) in substitution`;
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
        .run(None, false)
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
        .run(None, false)
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
        // moby splits EXPOSE words after expansion (`EXPOSE $PORTS` with `PORTS="80 443"`).
        InstructionKind::Expose(ports) => {
            let mut out = Vec::new();
            for p in ports {
                out.extend(process_words(p, vars, escape)?);
            }
            InstructionKind::Expose(out)
        }
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
    fn run(&mut self, stop: Option<char>, raw: bool) -> Result<(String, Vec<String>), String> {
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
                    let value = self.double_quote(raw)?;
                    result.push_str(&value);
                    words.add_raw_string(&value);
                }
                _ => {
                    self.pos += 1;
                    if ch == self.escape {
                        if raw {
                            words.add_raw_char(ch);
                            result.push(ch);
                        }
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

    fn double_quote(&mut self, raw: bool) -> Result<String, String> {
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
                        if raw {
                            result.push(ch);
                        }
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
        if op == '/' && !null_is_unset {
            return self.replace(&name);
        }
        if !matches!(op, '-' | '+' | '?' | '#' | '%') {
            return Err(format!("unsupported modifier ({modifier}) in substitution"));
        }
        let raw = op == '#' || op == '%';
        let word = match self.run(Some('}'), raw) {
            Ok((word, _)) => word,
            Err(_) if self.peek().is_none() => return Err("syntax error: missing '}'".into()),
            Err(e) => return Err(e),
        };
        let value = self.lookup(&name);
        let unset = value.is_none() || (null_is_unset && value == Some(""));
        Ok(match op {
            '-' if unset => word,
            '-' => value.unwrap_or("").to_string(),
            '+' if unset => String::new(),
            '+' => word,
            '#' | '%' => {
                let value = value.unwrap_or("");
                let (greedy, pattern) = match word.strip_prefix(op) {
                    Some(rest) => (true, rest),
                    None => (false, word.as_str()),
                };
                if op == '#' {
                    trim_prefix(pattern, value, greedy)?
                } else {
                    trim_suffix(pattern, value, greedy)?
                }
            }
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

    /// `${name/pattern/replacement}` and `${name//pattern/replacement}` (all occurrences).
    fn replace(&mut self, name: &str) -> Result<String, String> {
        let all = self.peek() == Some('/');
        if all {
            self.pos += 1;
        }
        let pattern = match self.run(Some('/'), true) {
            Ok((p, _)) => p,
            Err(_) if self.peek().is_none() => {
                return Err("syntax error: missing '/' in ${}".into());
            }
            Err(e) => return Err(e),
        };
        let replacement = match self.run(Some('}'), true) {
            Ok((r, _)) => r,
            Err(_) if self.peek().is_none() => return Err("syntax error: missing '}'".into()),
            Err(e) => return Err(e),
        };
        let value = self.lookup(name).unwrap_or("").to_string();
        let re = shell_pattern_regex(&pattern, true, false)
            .map_err(|e| format!("invalid pattern ({pattern}) in substitution: {e}"))?;
        let replacement = regex::NoExpand(&replacement);
        Ok(if all {
            re.replace_all(&value, replacement).into_owned()
        } else {
            re.replace(&value, replacement).into_owned()
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

/// BuildKit's `convertShellPatternToRegex`: `*` any string (shortest unless greedy), `?` one
/// character, `\` escapes `*`, `?`, `\` (and `}`/`/`, which it drops); no bracket classes.
fn shell_pattern_regex(
    pattern: &str,
    greedy: bool,
    anchored: bool,
) -> Result<regex::Regex, String> {
    let mut out = String::new();
    if anchored {
        out.push('^');
    }
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' => out.push_str(if greedy { ".*" } else { ".*?" }),
            '?' => out.push('.'),
            '\\' => {
                if matches!(chars.peek(), Some('}' | '/')) {
                    continue;
                }
                match chars.next() {
                    Some(e @ ('*' | '?' | '\\')) => {
                        out.push('\\');
                        out.push(e);
                    }
                    Some(e) => return Err(format!("invalid escape '\\{e}'")),
                    None => return Err("invalid escape '\\'".into()),
                }
            }
            _ => out.push_str(&regex::escape(&c.to_string())),
        }
    }
    regex::Regex::new(&out).map_err(|e| e.to_string())
}

fn trim_prefix(pattern: &str, value: &str, greedy: bool) -> Result<String, String> {
    let re = shell_pattern_regex(pattern, greedy, true)
        .map_err(|e| format!("invalid pattern ({pattern}) in substitution: {e}"))?;
    Ok(match re.find(value) {
        Some(m) => value[m.end()..].to_string(),
        None => value.to_string(),
    })
}

/// Regexes find leftmost matches: reverse the value and the pattern (keeping escapes before
/// the character they escape) to find the shortest or longest suffix.
fn trim_suffix(pattern: &str, value: &str, greedy: bool) -> Result<String, String> {
    let reversed: String = value.chars().rev().collect();
    let trimmed = trim_prefix(&reverse_pattern(pattern), &reversed, greedy)?;
    Ok(trimmed.chars().rev().collect())
}

fn reverse_pattern(pattern: &str) -> String {
    let mut units: Vec<String> = Vec::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(e) => units.push(format!("\\{e}")),
                None => units.push("\\".into()),
            }
        } else {
            units.push(c.to_string());
        }
    }
    units.reverse();
    units.concat()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dockerfile::{self, ShellOrExec};

    fn vars(pairs: &[(&str, &str)]) -> Vars {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn word(input: &str, env: &Vars) -> Result<String, String> {
        process_word(input, env, '\\').map_err(|e| e.reason)
    }

    #[test]
    fn moby_process_with_matches_cases() {
        let fb = vars(&[("FOO", "xxx"), ("BAR", "")]);
        for (input, env, want) in [
            ("x", vars(&[("DUMMY", "dummy")]), "x"),
            ("x ${UNUSED}", vars(&[]), "x "),
            ("x ${FOO}", vars(&[("FOO", "y")]), "x y"),
            ("${FOO-aaa} ${BAR-bbb} ${BAZ-ccc}", fb.clone(), "xxx  ccc"),
            (
                "${FOO:-aaa} ${BAR:-bbb} ${BAZ:-ccc}",
                fb.clone(),
                "xxx bbb ccc",
            ),
            ("${FOO:-}", fb.clone(), "xxx"),
            ("${FOO:-}", vars(&[]), ""),
            ("${FOO+aaa} ${BAR+bbb} ${BAZ+ccc}", fb.clone(), "aaa bbb "),
            ("${FOO:+aaa} ${BAR:+bbb} ${BAZ:+ccc}", fb.clone(), "aaa  "),
            ("${FOO?aaa}", fb.clone(), "xxx"),
            ("${BAR?bbb}", fb.clone(), ""),
            ("${FOO:?aaa}", fb.clone(), "xxx"),
            (
                "${FOO#()[]{\\}^$.\\*\\?|\\\\}",
                vars(&[("FOO", "()[]{}^$.*?|\\x")]),
                "x",
            ),
            ("${FOO%%\\**}", vars(&[("FOO", "xx**")]), "xx"),
            ("${FOO#*x*y}", vars(&[("FOO", "xxyy")]), "y"),
            ("${FOO#*}", vars(&[("FOO", "xxyy")]), "xxyy"),
            ("${FOO#$BAR}", vars(&[("FOO", "xxyy"), ("BAR", "x")]), "xyy"),
            ("${FOO#$BAR}", vars(&[("FOO", "xxyy"), ("BAR", "")]), "xxyy"),
            ("${FOO#}", vars(&[("FOO", "xxyy")]), "xxyy"),
            ("${FOO##*x}", vars(&[("FOO", "xxyy")]), "yy"),
            ("${FOO##}", vars(&[("FOO", "xxyy")]), "xxyy"),
            ("${FOO#?\\?}", vars(&[("FOO", "???y")]), "?y"),
            (
                "${ABC:-.}${FOO%x}${ABC:-.}",
                vars(&[("FOO", "xxyy")]),
                ".xxyy.",
            ),
            ("${FOO%%\\**\\*}", vars(&[("FOO", "a***yy*")]), "a"),
            ("${FOO%}", vars(&[("FOO", "xxyy")]), "xxyy"),
            (
                "${FOO%%$BAR}",
                vars(&[("FOO", "xxyy"), ("BAR", "")]),
                "xxyy",
            ),
            (
                "${FOO/$NEEDLE/.} - ${FOO//$NEEDLE/.}",
                vars(&[("FOO", "/foo*/*/*.txt"), ("NEEDLE", "\\*/")]),
                "/foo.*/*.txt - /foo..*.txt",
            ),
            (
                "${FOO/$NEEDLE/} - ${FOO//$NEEDLE/}",
                vars(&[("FOO", "/tmp/tmp/bar.txt"), ("NEEDLE", "/tmp")]),
                "/tmp/bar.txt - /bar.txt",
            ),
            (
                "${FOO/$NEEDLE/$REPLACEMENT} - ${FOO//$NEEDLE/$REPLACEMENT}",
                vars(&[
                    ("FOO", "/a/foo/b/c.txt"),
                    ("NEEDLE", "/?/"),
                    ("REPLACEMENT", "/"),
                ]),
                "/foo/b/c.txt - /foo/c.txt",
            ),
            (
                "${FOO/$NEEDLE/$REPLACEMENT}",
                vars(&[
                    ("FOO", "http://google.de"),
                    ("NEEDLE", "http://"),
                    ("REPLACEMENT", "https://"),
                ]),
                "https://google.de",
            ),
            (
                "${FOO//\\//\\/}",
                vars(&[("FOO", "/tmp/foo.txt")]),
                "\\/tmp\\/foo.txt",
            ),
            (
                "${FOO/$BAR/ww}",
                vars(&[("FOO", "xxyy"), ("BAR", "")]),
                "wwxxyy",
            ),
            ("${FOO///}", vars(&[("FOO", "xxyy")]), "xxyy"),
            ("${FOO///}", vars(&[]), ""),
        ] {
            assert_eq!(word(input, &env).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn moby_error_cases() {
        let fb = vars(&[("FOO", "xxx"), ("BAR", "")]);
        for input in [
            "${BAZ?ccc}",
            "${BAR:?bbb}",
            "${BAZ:?ccc}",
            "${BAZ:?}",
            "${FOO=aaa}",
            "${FOO=:aaa}",
            "${FOO=}",
            "${FOO//ww}",
            "${FOO//}",
            "${FOO",
            "${}",
            "${:x}",
            "${{x}",
            "'abc",
            "\"abc",
            "${FOO:-abc",
        ] {
            assert!(
                word(input, &fb).is_err(),
                "{input} should fail: {:?}",
                word(input, &fb)
            );
        }
        assert_eq!(
            word("${BAZ:?}", &fb).unwrap_err(),
            "BAZ: is not allowed to be unset"
        );
        assert_eq!(
            word("${BAR:?}", &fb).unwrap_err(),
            "BAR: is not allowed to be empty"
        );
        assert_eq!(word("${BAZ?oops $FOO}", &fb).unwrap_err(), "BAZ: oops xxx");
        assert_eq!(
            word("${FOO=aaa}", &fb).unwrap_err(),
            "unsupported modifier (=) in substitution"
        );
        assert_eq!(
            word("${FOO:=aaa}", &fb).unwrap_err(),
            "unsupported modifier (:=) in substitution"
        );
        assert_eq!(word("${FOO", &fb).unwrap_err(), "syntax error: missing '}'");
        assert_eq!(
            word("${}", &fb).unwrap_err(),
            "syntax error: bad substitution"
        );
        assert_eq!(
            word("'abc", &fb).unwrap_err(),
            "unexpected end of statement while looking for matching single-quote"
        );
        let e = process_word("${X:?}", &fb, '\\').unwrap_err();
        assert_eq!(
            e.to_string(),
            "failed to process \"${X:?}\": X: is not allowed to be unset"
        );
    }

    #[test]
    fn mandatory_vars_like_moby() {
        let set = vars(&[("VAR", "plain"), ("ARG", "x")]);
        let empty = vars(&[("VAR", ""), ("ARG", "x")]);
        let unset = vars(&[("ARG", "x")]);
        let no_empty = "${VAR:?message here$ARG}";
        let no_unset = "${VAR?message here$ARG}";
        assert_eq!(word(no_empty, &set).unwrap(), "plain");
        assert!(
            word(no_empty, &empty)
                .unwrap_err()
                .contains("message herex")
        );
        assert!(
            word(no_empty, &unset)
                .unwrap_err()
                .contains("message herex")
        );
        assert_eq!(word(no_unset, &set).unwrap(), "plain");
        assert_eq!(word(no_unset, &empty).unwrap(), "");
        assert!(
            word(no_unset, &unset)
                .unwrap_err()
                .contains("message herex")
        );
    }

    #[test]
    fn quotes_escapes_and_plain_dollars() {
        let env = vars(&[
            ("PWD", "/home"),
            ("SHELL", "bash"),
            ("KOREAN", "한국어"),
            ("NULL", ""),
        ]);
        for (input, want) in [
            ("hello", "hello"),
            ("he'll'o", "hello"),
            ("he'llo", "ERR"),
            ("he\\'llo", "he'llo"),
            ("he\\\\'llo", "ERR"),
            ("abc\\", "abc"),
            ("abc\\\\", "abc\\"),
            ("a\\b", "ab"),
            ("\"a b\"", "a b"),
            ("\"a\\\"b\"", "a\"b"),
            ("\"a\\b\"", "a\\b"),
            ("\"a\\$b\"", "a$b"),
            ("'$PWD'", "$PWD"),
            ("\"$PWD\"", "/home"),
            ("\\$PWD", "$PWD"),
            ("$PWD", "/home"),
            ("${PWD}x", "/homex"),
            ("$PWDx", ""),
            ("$KOREAN", "한국어"),
            ("안녕$KOREAN", "안녕한국어"),
            ("$", "$"),
            ("a$ b", "a$ b"),
            ("$.x", "$.x"),
            ("$1", ""),
            ("$12x", "x"),
            ("$@", ""),
            ("${NULL:-x}", "x"),
            ("${NULL-x}", ""),
            ("${SHELL:+'q r'}", "q r"),
            ("${UNSET:-$PWD/a}", "/home/a"),
            ("${UNSET:-\"a}b\"}", "a}b"),
        ] {
            let got = word(input, &env).unwrap_or_else(|_| "ERR".into());
            assert_eq!(got, want, "{input}");
        }
        // The backtick escape token.
        assert_eq!(process_word("a`$PWD`\\", &env, '`').unwrap(), "a$PWD\\");
    }

    #[test]
    fn words_split_after_substitution() {
        let env = vars(&[("A", "x y"), ("E", "")]);
        for (input, want) in [
            ("a b  c", vec!["a", "b", "c"]),
            ("\"a b\" c", vec!["a b", "c"]),
            ("$A z", vec!["x", "y", "z"]),
            ("\"$A\" z", vec!["x y", "z"]),
            ("a\\ b", vec!["a b"]),
            ("$E", vec![]),
            // An empty quoted word is dropped, as moby's `wordsStruct` drops it.
            ("'' b", vec!["b"]),
        ] {
            let want: Vec<String> = want.into_iter().map(String::from).collect();
            assert_eq!(process_words(input, &env, '\\').unwrap(), want, "{input}");
        }
    }

    #[test]
    fn vars_from_env_last_wins() {
        let v = vars_from_env(&["foo=bar", "car=hat", "car=bike", "bare"]);
        assert_eq!(v["car"], "bike");
        assert_eq!(v["foo"], "bar");
        assert_eq!(v["bare"], "");
    }

    fn expanded(line: &str, env: &Vars) -> InstructionKind {
        let df = dockerfile::parse(&format!("FROM x\n{line}")).unwrap();
        expand_instruction(&df.stages[0].instructions[0].kind, env, '\\').unwrap()
    }

    #[test]
    fn which_instructions_expand() {
        let env = vars(&[("V", "1"), ("D", "/data"), ("U", "app")]);
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            expanded("ENV a=$V b=\"x $V\" c='$V' $V=k", &env),
            InstructionKind::Env(vec![
                ("a".into(), "1".into()),
                ("b".into(), "x 1".into()),
                ("c".into(), "$V".into()),
                ("1".into(), "k".into()),
            ])
        );
        assert_eq!(
            expanded("ENV a $V and \"q\"", &env),
            InstructionKind::Env(vec![("a".into(), "1 and q".into())])
        );
        assert_eq!(
            expanded("LABEL \"k $V\"=\"v $V\"", &env),
            InstructionKind::Label(vec![("k 1".into(), "v 1".into())])
        );
        assert_eq!(
            expanded("COPY --chown=$U:$U --from=$V a$V $D/", &env),
            InstructionKind::Copy {
                srcs: s(&["a1"]),
                dest: "/data/".into(),
                from: Some("$V".into()),
                chown: Some("app:app".into()),
                chmod: None,
            }
        );
        assert_eq!(
            expanded("ADD [\"$D\", \"${D}2\"]", &env),
            InstructionKind::Add {
                srcs: s(&["/data"]),
                dest: "/data2".into(),
                chown: None,
                chmod: None
            }
        );
        assert_eq!(
            expanded("EXPOSE $V${V}", &env),
            InstructionKind::Expose(s(&["11"]))
        );
        assert_eq!(
            expanded("VOLUME $D", &env),
            InstructionKind::Volume(s(&["/data"]))
        );
        assert_eq!(
            expanded("USER ${U:-root}", &env),
            InstructionKind::User("app".into())
        );
        assert_eq!(
            expanded("WORKDIR $D/x", &env),
            InstructionKind::Workdir("/data/x".into())
        );
        assert_eq!(
            expanded("STOPSIGNAL SIG$V", &env),
            InstructionKind::StopSignal("SIG1".into())
        );
        assert_eq!(
            expanded("ARG X=$D Y", &env),
            InstructionKind::Arg(vec![
                Arg {
                    name: "X".into(),
                    default: Some("/data".into())
                },
                Arg {
                    name: "Y".into(),
                    default: None
                },
            ])
        );
        // Not expanded by the builder.
        assert_eq!(
            expanded("RUN echo $V", &env),
            InstructionKind::Run {
                args: ShellOrExec::Shell("echo $V".into())
            }
        );
        assert_eq!(
            expanded("CMD [\"$V\"]", &env),
            InstructionKind::Cmd(ShellOrExec::Exec(s(&["$V"])))
        );
        assert_eq!(
            expanded("ENTRYPOINT $V", &env),
            InstructionKind::Entrypoint(ShellOrExec::Shell("$V".into()))
        );
        assert_eq!(
            expanded("MAINTAINER $V", &env),
            InstructionKind::Maintainer("$V".into())
        );
        let InstructionKind::Onbuild(t) = expanded("ONBUILD ENV a=$V", &env) else {
            panic!()
        };
        assert_eq!(
            t.kind,
            InstructionKind::Env(vec![("a".into(), "$V".into())])
        );
        // An error names the word.
        let df = dockerfile::parse("FROM x\nWORKDIR ${D:?no dir}").unwrap();
        let e =
            expand_instruction(&df.stages[0].instructions[0].kind, &Vars::new(), '\\').unwrap_err();
        assert_eq!(
            e.to_string(),
            "failed to process \"${D:?no dir}\": D: no dir"
        );
    }
}
