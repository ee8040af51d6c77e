//! containerd's filter syntax, for List (Walk).
//!
//! A request carries any number of filters; a snapshot is listed when it matches **any** of
//! them (no filters: every snapshot). A filter is comma-separated selectors that must **all**
//! match. A selector is a field path, optionally followed by an operator and a value:
//!
//! ```text
//! name==sha256:abc          kind==committed          parent!="base"
//! labels."containerd.io/gc.root"     labels.tier==app,kind==view
//! ```
//!
//! Fields: `name`, `parent` (empty when there is none), `kind` (`view`, `active`,
//! `committed`), `labels.<key>`. Path components and values may be double-quoted (with `\"`
//! and `\\` escapes) and must be when they contain `.`, `,`, spaces or quotes. Operators: none
//! (the field is present), `==` (present and equal), `!=` (not equal; an absent field counts as
//! empty). containerd's regular-expression operator `~=` is refused as unsupported.

use berth_core::snapshots::Info;
use berth_core::{Error, Result};

/// Parsed filters: OR of ANDs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Filters {
    any_of: Vec<Vec<Selector>>,
}

#[derive(Debug, Clone, PartialEq)]
struct Selector {
    path: Vec<String>,
    op: Op,
    value: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Present,
    Equal,
    NotEqual,
}

impl Filters {
    /// Parses each filter; an empty string matches everything.
    pub(crate) fn parse(filters: &[String]) -> Result<Self> {
        let mut any_of = Vec::new();
        for filter in filters {
            if filter.trim().is_empty() {
                return Ok(Self { any_of: Vec::new() });
            }
            any_of.push(Parser::new(filter).filter()?);
        }
        Ok(Self { any_of })
    }

    /// Whether `info` passes.
    pub(crate) fn matches(&self, info: &Info) -> bool {
        self.any_of.is_empty()
            || self
                .any_of
                .iter()
                .any(|all| all.iter().all(|selector| selector.matches(info)))
    }
}

impl Selector {
    fn matches(&self, info: &Info) -> bool {
        let field = field(info, &self.path);
        match self.op {
            Op::Present => field.is_some(),
            Op::Equal => field == Some(self.value.as_str()),
            Op::NotEqual => field.unwrap_or("") != self.value,
        }
    }
}

fn field<'a>(info: &'a Info, path: &[String]) -> Option<&'a str> {
    match path {
        [name] if name == "name" => Some(&info.name),
        // As in containerd, a snapshot without a parent has an empty one: `parent` is always
        // present and `parent!=""` selects the snapshots that have one.
        [name] if name == "parent" => Some(info.parent.as_deref().unwrap_or("")),
        [name] if name == "kind" => Some(info.kind.as_str()),
        [name, rest @ ..] if name == "labels" && !rest.is_empty() => {
            info.labels.get(&rest.join(".")).map(String::as_str)
        }
        _ => None,
    }
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Self {
        Self { text, pos: 0 }
    }

    fn error(&self, why: &str) -> Error {
        Error::invalid_argument(format!(
            "invalid filter {:?}: {why} at offset {}",
            self.text, self.pos
        ))
    }

    fn rest(&self) -> &'a str {
        &self.text[self.pos..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn skip_spaces(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn filter(&mut self) -> Result<Vec<Selector>> {
        let mut selectors = Vec::new();
        loop {
            self.skip_spaces();
            selectors.push(self.selector()?);
            self.skip_spaces();
            match self.peek() {
                None => return Ok(selectors),
                Some(',') => self.pos += 1,
                Some(_) => return Err(self.error("expected `,` or the end")),
            }
        }
    }

    fn selector(&mut self) -> Result<Selector> {
        let path = self.field_path()?;
        self.skip_spaces();
        let op = if self.rest().starts_with("==") {
            Op::Equal
        } else if self.rest().starts_with("!=") {
            Op::NotEqual
        } else if self.rest().starts_with("~=") {
            return Err(self.error("regular-expression matching (~=) is not supported"));
        } else {
            return match self.peek() {
                None | Some(',') => Ok(Selector {
                    path,
                    op: Op::Present,
                    value: String::new(),
                }),
                Some(_) => Err(self.error("expected an operator (==, !=)")),
            };
        };
        self.pos += 2;
        self.skip_spaces();
        let value = match self.peek() {
            Some('"') => self.quoted()?,
            _ => {
                let len = self.rest().find(',').unwrap_or(self.rest().len());
                let value = self.rest()[..len].trim_end().to_string();
                self.pos += len;
                if value.is_empty() {
                    return Err(self.error("expected a value"));
                }
                value
            }
        };
        Ok(Selector { path, op, value })
    }

    fn field_path(&mut self) -> Result<Vec<String>> {
        let mut path = Vec::new();
        loop {
            let component = match self.peek() {
                Some('"') => self.quoted()?,
                _ => {
                    let len = self
                        .rest()
                        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '-'))
                        .unwrap_or(self.rest().len());
                    if len == 0 {
                        return Err(self.error("expected a field name"));
                    }
                    let component = self.rest()[..len].to_string();
                    self.pos += len;
                    component
                }
            };
            path.push(component);
            if self.peek() == Some('.') {
                self.pos += 1;
            } else {
                return Ok(path);
            }
        }
    }

    fn quoted(&mut self) -> Result<String> {
        let start = self.pos;
        self.pos += 1; // opening quote
        let mut out = String::new();
        let mut chars = self.rest().char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.pos += i + 1;
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, 't')) => out.push('\t'),
                    Some((_, other)) => out.push(other),
                    None => break,
                },
                _ => out.push(c),
            }
        }
        self.pos = start;
        Err(self.error("unterminated quoted string"))
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use berth_core::ErrorKind;
    use berth_core::snapshots::Kind;

    use super::*;

    fn info(name: &str, parent: Option<&str>, kind: Kind, labels: &[(&str, &str)]) -> Info {
        Info {
            name: name.into(),
            parent: parent.map(Into::into),
            kind,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            created_at: SystemTime::UNIX_EPOCH,
            updated_at: SystemTime::UNIX_EPOCH,
        }
    }

    fn matches(filters: &[&str], info: &Info) -> bool {
        let filters: Vec<String> = filters.iter().map(|s| s.to_string()).collect();
        Filters::parse(&filters).unwrap().matches(info)
    }

    #[test]
    fn selectors_and_operators() {
        let base = info(
            "sha256:base",
            None,
            Kind::Committed,
            &[("containerd.io/gc.root", "x"), ("tier", "base")],
        );
        let app = info(
            "ns/1/app",
            Some("sha256:base"),
            Kind::Active,
            &[("tier", "app")],
        );

        assert!(matches(&[], &base));
        assert!(matches(&[""], &base));
        assert!(matches(&["name==sha256:base"], &base));
        assert!(matches(&["name==\"ns/1/app\""], &app));
        assert!(matches(&["name == ns/1/app"], &app));
        assert!(matches(&["kind==committed"], &base));
        assert!(!matches(&["kind==committed"], &app));
        assert!(matches(&["parent==\"sha256:base\""], &app));
        assert!(
            matches(&["parent"], &base),
            "parent is always present, as in containerd"
        );
        assert!(!matches(&["parent!=\"\""], &base));
        assert!(matches(&["parent!=\"\""], &app));
        assert!(matches(&["parent!=x"], &base));
        assert!(matches(&["labels.\"containerd.io/gc.root\""], &base));
        assert!(!matches(&["labels.\"containerd.io/gc.root\""], &app));
        assert!(matches(&["labels.tier==app,kind==active"], &app));
        assert!(!matches(&["labels.tier==app,kind==committed"], &app));
        assert!(matches(
            &["labels.tier==app,kind==committed", "name==sha256:base"],
            &base
        ));
        assert!(matches(&["labels.tier!=base"], &app));
        assert!(matches(&["labels.missing!=x"], &app));
        assert!(!matches(&["labels"], &app));
        assert!(!matches(&["bogus==x"], &app));
        // Dotted label keys without quotes are joined back.
        let dotted = info("d", None, Kind::View, &[("a.b", "1")]);
        assert!(matches(&["labels.a.b==1"], &dotted));
        assert!(matches(
            &[r#"name=="with \"quote\"""#],
            &info("with \"quote\"", None, Kind::View, &[])
        ));
    }

    #[test]
    fn bad_filters_are_invalid_arguments() {
        for bad in [
            "==x",
            "name==",
            "name=x",
            "labels.\"open",
            "name==a b,",
            "name~=a.*",
            "kind==view,,",
        ] {
            let err = Filters::parse(&[bad.to_string()]).unwrap_err();
            assert_eq!(
                err.kind(),
                ErrorKind::InvalidArgument,
                "{bad}: {}",
                err.chain()
            );
        }
    }
}
