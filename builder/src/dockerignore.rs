//! `.dockerignore`, with the rules of moby's `dockerignore.ReadAll` and `patternmatcher`.
//!
//! - a line starting with `#` is a comment; lines are trimmed; empty lines are skipped;
//! - `!pattern` re-includes what earlier patterns excluded; the last matching pattern wins;
//! - patterns are cleaned like Go's `filepath.Clean` (so a trailing `/` goes) and a leading `/`
//!   is dropped: patterns are relative to the context root;
//! - `*` and `?` never match `/`, `[a-z]`/`[^a-z]` are classes, `\` escapes, and `**` matches
//!   any number of directories (`**/x`, `a/**/b`, `a/**`);
//! - a path is excluded when it or one of its parent directories matches;
//! - a directory may be skipped wholesale only when no `!` pattern could match inside it.
//!
//! The CLI always sends the Dockerfile and `.dockerignore` (the daemon needs them) even when
//! `.dockerignore` lists them; the daemon reads them, then drops them from what COPY sees
//! (moby's `removeDockerfile`): [`crate::context::prepare`] does that.

use regex::Regex;

/// A bad pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("illegal exclusion pattern: \"!\"")]
    IllegalExclusion,
    /// Go's `filepath.ErrBadPattern`.
    #[error("syntax error in pattern")]
    BadPattern,
}

#[derive(Debug, Clone)]
struct Pattern {
    /// The cleaned pattern, without its `!`.
    text: String,
    exclusion: bool,
    regex: Regex,
}

/// A compiled `.dockerignore`.
#[derive(Debug, Clone, Default)]
pub struct Matcher {
    patterns: Vec<Pattern>,
}

/// Reads a `.dockerignore` file into patterns (moby's `ReadAll`).
pub fn read_patterns(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, line) in text.split('\n').enumerate() {
        let line = if i == 0 {
            line.strip_prefix('\u{feff}').unwrap_or(line)
        } else {
            line
        };
        if line.starts_with('#') {
            continue;
        }
        let mut pattern = line.trim();
        if pattern.is_empty() {
            continue;
        }
        let invert = pattern.starts_with('!');
        if invert {
            pattern = pattern[1..].trim();
        }
        let mut cleaned = String::new();
        if !pattern.is_empty() {
            cleaned = clean_path(pattern);
            if cleaned.len() > 1 && cleaned.starts_with('/') {
                cleaned.remove(0);
            }
        }
        out.push(if invert {
            format!("!{cleaned}")
        } else {
            cleaned
        });
    }
    out
}

impl Matcher {
    /// Compiles patterns (as [`read_patterns`] gives them).
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, PatternError> {
        let mut compiled = Vec::new();
        for p in patterns {
            let p = p.as_ref().trim();
            if p.is_empty() {
                continue;
            }
            let mut p = clean_path(p);
            let exclusion = p.starts_with('!');
            if exclusion {
                if p.len() == 1 {
                    return Err(PatternError::IllegalExclusion);
                }
                p.remove(0);
            }
            go_match(&p, ".")?;
            let regex = Regex::new(&pattern_regex(&p)).map_err(|_| PatternError::BadPattern)?;
            compiled.push(Pattern {
                text: p,
                exclusion,
                regex,
            });
        }
        Ok(Self { patterns: compiled })
    }

    /// Parses and compiles the text of a `.dockerignore`.
    pub fn from_dockerignore(text: &str) -> Result<Self, PatternError> {
        Self::new(&read_patterns(text))
    }

    /// Whether there are no patterns at all.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether any `!` pattern exists.
    pub fn has_exclusions(&self) -> bool {
        self.patterns.iter().any(|p| p.exclusion)
    }

    /// Whether `path` (relative to the context root, `/`-separated) is left out of the context:
    /// it or a parent directory matches, and no later `!` pattern re-includes it. `is_dir` does
    /// not change the answer (patterns are cleaned, `dir/` is `dir`); it is there so callers
    /// walking a tree say what they have.
    pub fn excluded(&self, path: &str, is_dir: bool) -> bool {
        let _ = is_dir;
        let path = clean_path(path.trim_start_matches('/'));
        if path == "." {
            return false;
        }
        let parents: Vec<&str> = match path.rfind('/') {
            Some(i) => path[..i].split('/').collect(),
            None => Vec::new(),
        };
        let mut matched = false;
        for pattern in &self.patterns {
            if pattern.exclusion != matched {
                continue;
            }
            let mut hit = pattern.regex.is_match(&path);
            if !hit {
                hit = (1..=parents.len()).any(|n| pattern.regex.is_match(&parents[..n].join("/")));
            }
            if hit {
                matched = !pattern.exclusion;
            }
        }
        matched
    }

    /// Whether an excluded directory can be skipped without looking inside: only when no `!`
    /// pattern starts with the directory's path (moby's walk).
    pub fn can_skip_dir(&self, dir: &str) -> bool {
        let dir = clean_path(dir.trim_start_matches('/'));
        let prefix = format!("{dir}/");
        !self
            .patterns
            .iter()
            .any(|p| p.exclusion && format!("{}/", p.text).starts_with(&prefix))
    }
}

/// moby's pattern → regex conversion.
fn pattern_regex(pattern: &str) -> String {
    let mut re = String::from("^");
    let chars: Vec<char> = pattern.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let ch = chars[i];
        i += 1;
        match ch {
            '*' if chars.get(i) == Some(&'*') => {
                i += 1;
                if chars.get(i) == Some(&'/') {
                    i += 1;
                }
                if i == chars.len() {
                    re.push_str(".*");
                } else {
                    re.push_str("(.*/)?");
                }
            }
            '*' => re.push_str("[^/]*"),
            '?' => re.push_str("[^/]"),
            '\\' => match chars.get(i) {
                Some(next) => {
                    re.push_str(&regex::escape(&next.to_string()));
                    i += 1;
                }
                None => re.push_str("\\\\"),
            },
            // moby escapes only the regex characters that mean nothing to filepath.Match;
            // `[`, `]`, `^` and `-` keep their class meaning.
            '.' | '+' | '(' | ')' | '|' | '{' | '}' | '$' => {
                re.push('\\');
                re.push(ch);
            }
            _ => re.push(ch),
        }
    }
    re.push('$');
    re
}

/// Go's `path.Clean` for `/`-separated paths.
pub fn clean_path(path: &str) -> String {
    if path.is_empty() {
        return ".".into();
    }
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|p| *p != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            p => parts.push(p),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".into(),
        (false, false) => joined,
    }
}

/// Go's `filepath.Match` on `/`-separated names: `*` (no `/`), `?`, `[...]` classes with ranges
/// and `^` negation, `\` escapes. A malformed pattern is [`PatternError::BadPattern`].
pub fn go_match(pattern: &str, name: &str) -> Result<bool, PatternError> {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    match_from(&p, &n)
}

fn match_from(p: &[char], n: &[char]) -> Result<bool, PatternError> {
    let (mut pi, mut ni) = (0, 0);
    // Backtracking point for the last `*`: (pattern index after it, name index).
    let mut star: Option<(usize, usize)> = None;
    loop {
        if pi < p.len() {
            if p[pi] == '*' {
                star = Some((pi + 1, ni));
                pi += 1;
                continue;
            }
            if ni < n.len() {
                let (matched, next) = match_one(p, pi, n, ni)?;
                if matched {
                    pi = next;
                    ni += 1;
                    continue;
                }
            }
        } else if ni == n.len() {
            return Ok(true);
        }
        // Mismatch: extend the last star by one non-separator character.
        match star {
            Some((sp, sn)) if sn < n.len() && n[sn] != '/' => {
                star = Some((sp, sn + 1));
                pi = sp;
                ni = sn + 1;
            }
            _ => {
                // Go still reports a malformed rest of the pattern.
                check_rest(&p[pi.min(p.len())..])?;
                return Ok(false);
            }
        }
    }
}

/// Matches one pattern element at `p[pi]` against `n[ni]`: (matched, next pattern index).
fn match_one(p: &[char], pi: usize, n: &[char], ni: usize) -> Result<(bool, usize), PatternError> {
    let c = n[ni];
    match p[pi] {
        '?' => Ok((c != '/', pi + 1)),
        '\\' => {
            let Some(&e) = p.get(pi + 1) else {
                return Err(PatternError::BadPattern);
            };
            Ok((c == e, pi + 2))
        }
        '[' => {
            let mut i = pi + 1;
            let negated = p.get(i) == Some(&'^');
            if negated {
                i += 1;
            }
            let mut matched = false;
            let mut first = true;
            loop {
                let Some(&ch) = p.get(i) else {
                    return Err(PatternError::BadPattern);
                };
                if ch == ']' && !first {
                    i += 1;
                    break;
                }
                first = false;
                let (lo, next) = class_char(p, i)?;
                i = next;
                let mut hi = lo;
                if p.get(i) == Some(&'-') {
                    let (h, next) = class_char(p, i + 1)?;
                    hi = h;
                    i = next;
                }
                if lo <= c && c <= hi {
                    matched = true;
                }
            }
            Ok((matched != negated && c != '/', i))
        }
        literal => Ok((c == literal, pi + 1)),
    }
}

fn class_char(p: &[char], i: usize) -> Result<(char, usize), PatternError> {
    match p.get(i) {
        None | Some('-' | ']') => Err(PatternError::BadPattern),
        Some('\\') => p
            .get(i + 1)
            .map(|c| (*c, i + 2))
            .ok_or(PatternError::BadPattern),
        Some(c) => Ok((*c, i + 1)),
    }
}

/// Validates the syntax of an unmatched pattern tail, as Go does.
fn check_rest(p: &[char]) -> Result<(), PatternError> {
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            '\\' => {
                if i + 1 >= p.len() {
                    return Err(PatternError::BadPattern);
                }
                i += 2;
            }
            '[' => {
                // Validate the class against a dummy character.
                let dummy = ['a'];
                match_one(p, i, &dummy, 0)?;
                let mut j = i + 1;
                if p.get(j) == Some(&'^') {
                    j += 1;
                }
                let mut first = true;
                loop {
                    match p.get(j) {
                        Some(']') if !first => break,
                        Some('\\') => j += 2,
                        Some(_) => j += 1,
                        None => return Err(PatternError::BadPattern),
                    }
                    first = false;
                }
                i = j + 1;
            }
            _ => i += 1,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(patterns: &[&str]) -> Matcher {
        Matcher::new(patterns).unwrap()
    }

    #[test]
    fn moby_single_pattern_table() {
        // (pattern, path, excluded) from moby/patternmatcher's TestMatches (exact or inexact
        // matches are both exclusions: a parent directory matching excludes its contents).
        let table: &[(&str, &str, bool)] = &[
            ("**", "file", true),
            ("**", "file/", true),
            ("**/", "file", true),
            ("**/", "file/", true),
            ("**", "dir/file", true),
            ("**/", "dir/file", true),
            ("**/**", "dir/file", true),
            ("dir/**", "dir/file", true),
            ("dir/**", "dir/dir2/file", true),
            ("**/dir", "dir", true),
            ("**/dir", "dir/file", true),
            ("**/dir2/*", "dir/dir2/file", true),
            ("**/dir2/*", "dir/dir2/file/", true),
            ("**/dir2/**", "dir/dir2/dir3/file", true),
            ("**file", "file", true),
            ("**file", "dir/file", true),
            ("**/file", "dir/file", true),
            ("**file", "dir/dir/file", true),
            ("**/file", "dir/dir/file", true),
            ("**/file*", "dir/dir/file", true),
            ("**/file*", "dir/dir/file.txt", true),
            ("**/file*txt", "dir/dir/file.txt", true),
            ("**/file*.txt", "dir/dir/file.txt", true),
            ("**/file*.txt*", "dir/dir/file.txt", true),
            ("**/**/*.txt", "dir/dir/file.txt", true),
            ("**/**/*.txt2", "dir/dir/file.txt", false),
            ("**/*.txt", "file.txt", true),
            ("**/**/*.txt", "file.txt", true),
            ("a**/*.txt", "a/file.txt", true),
            ("a**/*.txt", "a/dir/file.txt", true),
            ("a**/*.txt", "a/dir/dir/file.txt", true),
            ("a/*.txt", "a/dir/file.txt", false),
            ("a/*.txt", "a/file.txt", true),
            ("a/*.txt**", "a/file.txt", true),
            ("a[b-d]e", "ae", false),
            ("a[b-d]e", "ace", true),
            ("a[b-d]e", "aae", false),
            ("a[^b-d]e", "aze", true),
            (".*", ".foo", true),
            (".*", "foo", false),
            ("abc.def", "abcdef", false),
            ("abc.def", "abc.def", true),
            ("abc.def", "abcZdef", false),
            ("abc?def", "abcZdef", true),
            ("abc?def", "abcdef", false),
            ("**/foo/bar", "foo/bar", true),
            ("**/foo/bar", "dir/foo/bar", true),
            ("**/foo/bar", "dir/dir2/foo/bar", true),
            ("abc/**", "abc", false),
            ("abc/**", "abc/def", true),
            ("abc/**", "abc/def/ghi", true),
            ("**/.foo", ".foo", true),
            ("**/.foo", "bar.foo", false),
            ("a(b)c/def", "a(b)c/def", true),
            ("a(b)c/def", "a(b)c/xyz", false),
            ("a.|)$(}+{bc", "a.|)$(}+{bc", true),
            (
                "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
                "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
                true,
            ),
            (
                "dist/*.whl",
                "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
                true,
            ),
            ("a\\\\", "a\\", true),
            ("a\\*b", "a*b", true),
            ("*", "fileutils.go", true),
            ("*.go", "fileutils.go", true),
            ("*.go", ".", false),
            // Cleaning: a trailing slash, `./` and a leading `/` in the path.
            ("docs/", "docs/README.md", true),
            ("docs", "./docs/x", true),
            ("a/../b", "b", true),
        ];
        for (pattern, path, want) in table {
            assert_eq!(
                m(&[pattern]).excluded(path, false),
                *want,
                "pattern={pattern:?} path={path:?}"
            );
        }
    }

    #[test]
    fn moby_multi_pattern_table() {
        let table: &[(&[&str], &str, bool)] = &[
            (&["**", "!util/docker/web"], "util/docker/web/foo", false),
            (
                &["**", "!util/docker/web", "util/docker/web/foo"],
                "util/docker/web/foo",
                true,
            ),
            (
                &[
                    "**",
                    "!dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
                ],
                "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
                false,
            ),
            (
                &["**", "!dist/*.whl"],
                "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
                false,
            ),
            (&["!fileutils.go", "*.go"], "fileutils.go", true),
            (&["docs", "!docs/README.md"], "docs/README.md", false),
            (&["docs/", "!docs/README.md"], "docs/README.md", false),
            (&["docs/*", "!docs/README.md"], "docs/README.md", false),
            (&["*.go", "!fileutils.go"], "fileutils.go", false),
            (
                &["*.md", "!README*.md", "README-secret.md"],
                "README-secret.md",
                true,
            ),
            (
                &["*.md", "!README*.md", "README-secret.md"],
                "README-public.md",
                false,
            ),
            (&[], "/any/path/there", false),
        ];
        for (patterns, path, want) in table {
            assert_eq!(
                m(patterns).excluded(path, false),
                *want,
                "patterns={patterns:?} path={path:?}"
            );
        }
    }

    #[test]
    fn bad_patterns() {
        assert_eq!(
            Matcher::new(&["!"]).unwrap_err(),
            PatternError::IllegalExclusion
        );
        assert_eq!(Matcher::new(&["["]).unwrap_err(), PatternError::BadPattern);
        assert_eq!(
            Matcher::new(&["a[", "x"]).unwrap_err().to_string(),
            "syntax error in pattern"
        );
        assert!(m(&["docs", "  !docs/README.md"]).has_exclusions());
        assert!(m(&["docs", "!docs/README.md  "]).has_exclusions());
        assert!(m(&["docs", "config", ""]).patterns.len() == 2);
    }

    #[test]
    fn read_patterns_like_moby() {
        let content = "test1\n/test2\n/a/file/here\n\nlastfile\n# this is a comment\n! /inverted/abs/path\n!\n! ";
        assert_eq!(
            read_patterns(content),
            vec![
                "test1",
                "test2",
                "a/file/here",
                "lastfile",
                "!inverted/abs/path",
                "!",
                "!"
            ]
        );
        assert_eq!(
            read_patterns("\u{feff}a/\r\n  b//c/ \n./d\n"),
            vec!["a", "b/c", "d"]
        );
        // A leading `/` is dropped when reading the file (not by `Matcher::new`).
        assert!(
            Matcher::from_dockerignore("/docs\n")
                .unwrap()
                .excluded("docs/a", false)
        );
        // A `!` alone is refused when compiled.
        assert!(Matcher::from_dockerignore("x\n!\n").is_err());
    }

    #[test]
    fn skipping_directories() {
        let ignore = m(&["vendor", "!vendor/keep/*.go", "node_modules"]);
        assert!(ignore.excluded("vendor", true));
        assert!(!ignore.can_skip_dir("vendor"));
        assert!(!ignore.can_skip_dir("vendor/keep"));
        assert!(ignore.can_skip_dir("node_modules"));
        assert!(!ignore.excluded("vendor/keep/a.go", false));
        assert!(ignore.excluded("vendor/other/a.go", false));
        // Without exceptions every excluded directory can be skipped.
        assert!(m(&["a"]).can_skip_dir("a"));
    }

    #[test]
    fn go_filepath_match_table() {
        // Go's filepath.Match tests, as moby's patternmatcher copies them.
        let bad = Err(PatternError::BadPattern);
        let table: &[(&str, &str, Result<bool, PatternError>)] = &[
            ("abc", "abc", Ok(true)),
            ("*", "abc", Ok(true)),
            ("*c", "abc", Ok(true)),
            ("a*", "a", Ok(true)),
            ("a*", "abc", Ok(true)),
            ("a*", "ab/c", Ok(false)),
            ("a*/b", "abc/b", Ok(true)),
            ("a*/b", "a/c/b", Ok(false)),
            ("a*b*c*d*e*/f", "axbxcxdxe/f", Ok(true)),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/f", Ok(true)),
            ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", Ok(false)),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/fff", Ok(false)),
            ("a*b?c*x", "abxbbxdbxebxczzx", Ok(true)),
            ("a*b?c*x", "abxbbxdbxebxczzy", Ok(false)),
            ("ab[c]", "abc", Ok(true)),
            ("ab[b-d]", "abc", Ok(true)),
            ("ab[e-g]", "abc", Ok(false)),
            ("ab[^c]", "abc", Ok(false)),
            ("ab[^b-d]", "abc", Ok(false)),
            ("ab[^e-g]", "abc", Ok(true)),
            ("a\\*b", "a*b", Ok(true)),
            ("a\\*b", "ab", Ok(false)),
            ("a?b", "a☺b", Ok(true)),
            ("a[^a]b", "a☺b", Ok(true)),
            ("a???b", "a☺b", Ok(false)),
            ("a[^a][^a][^a]b", "a☺b", Ok(false)),
            ("[a-ζ]*", "α", Ok(true)),
            ("*[a-ζ]", "A", Ok(false)),
            ("a?b", "a/b", Ok(false)),
            ("a*b", "a/b", Ok(false)),
            ("[\\]a]", "]", Ok(true)),
            ("[\\-]", "-", Ok(true)),
            ("[x\\-]", "x", Ok(true)),
            ("[x\\-]", "-", Ok(true)),
            ("[x\\-]", "z", Ok(false)),
            ("[\\-x]", "x", Ok(true)),
            ("[\\-x]", "-", Ok(true)),
            ("[\\-x]", "a", Ok(false)),
            ("[]a]", "]", bad.clone()),
            ("[-]", "-", bad.clone()),
            ("[x-]", "x", bad.clone()),
            ("[x-]", "-", bad.clone()),
            ("[x-]", "z", bad.clone()),
            ("[-x]", "x", bad.clone()),
            ("[-x]", "-", bad.clone()),
            ("[-x]", "a", bad.clone()),
            ("\\", "a", bad.clone()),
            ("[a-b-c]", "a", bad.clone()),
            ("[", "a", bad.clone()),
            ("[^", "a", bad.clone()),
            ("[^bc", "a", bad.clone()),
            ("a[", "a", bad.clone()),
            ("a[", "ab", bad.clone()),
            ("*x", "xxx", Ok(true)),
        ];
        for (pattern, name, want) in table {
            assert_eq!(
                &go_match(pattern, name),
                want,
                "Match({pattern:?}, {name:?})"
            );
        }
    }

    #[test]
    fn clean_like_go() {
        for (input, want) in [
            ("", "."),
            ("a/b/", "a/b"),
            ("a//b", "a/b"),
            ("./a", "a"),
            ("a/./b/..", "a"),
            ("../a", "../a"),
            ("/../a", "/a"),
            ("/", "/"),
            ("a/..", "."),
        ] {
            assert_eq!(clean_path(input), want, "{input:?}");
        }
    }
}
