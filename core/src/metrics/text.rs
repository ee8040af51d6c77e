//! The Prometheus text exposition format (0.0.4): a parser for samples, and the merge of
//! several daemons' texts into one under a `service` label.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::error::{Error, Result};

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name as written (`x_bucket`, `x_sum`, … for histograms).
    pub name: String,
    /// Labels, sorted by name.
    pub labels: BTreeMap<String, String>,
    /// The value.
    pub value: f64,
}

impl Sample {
    /// The value of label `key`.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }

    /// True when every pair of `want` is among the labels.
    pub fn has(&self, want: &[(&str, &str)]) -> bool {
        want.iter().all(|(k, v)| self.label(k) == Some(v))
    }
}

/// Escapes a label value (`\`, `"` and newlines).
pub fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A value as the format writes it (`+Inf`, `-Inf`, `NaN`, or Rust's shortest float).
pub fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        s => s.parse().ok(),
    }
}

fn bad(line: &str, why: &str) -> Error {
    Error::invalid_argument(format!("metrics text: {why}: {line:?}"))
}

/// Parses one sample line (no comment, not empty).
pub fn parse_line(line: &str) -> Result<Sample> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or_else(|| bad(line, "no value"))?;
    let name = &line[..name_end];
    if name.is_empty() {
        return Err(bad(line, "no metric name"));
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let end;
        loop {
            while chars.next_if(|(_, c)| *c == ',' || *c == ' ').is_some() {}
            match chars.peek() {
                Some((i, '}')) => {
                    end = *i;
                    break;
                }
                None => return Err(bad(line, "unterminated labels")),
                _ => {}
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(bad(line, "label value not quoted"));
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '"')) => break,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => return Err(bad(line, "unterminated label value")),
                    },
                    Some((_, c)) => value.push(c),
                    None => return Err(bad(line, "unterminated label value")),
                }
            }
            labels.insert(key.trim().to_string(), value);
        }
        rest = &body[end + 1..];
    }
    let mut fields = rest.split_whitespace();
    let value = fields
        .next()
        .and_then(parse_value)
        .ok_or_else(|| bad(line, "bad value"))?;
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Every sample of `text`, in order.
pub fn parse(text: &str) -> Result<Vec<Sample>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(parse_line)
        .collect()
}

#[derive(Debug, Default)]
struct Family {
    help: Option<String>,
    kind: Option<String>,
    samples: Vec<String>,
}

/// Merges the texts of several sources into one valid text: each family once (with the first
/// source's HELP and TYPE), every sample with `label="<source>"` added first.
pub fn merge<'a>(label: &str, sources: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut order: Vec<String> = Vec::new();
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for (source, text) in sources {
        let mut current = String::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix('#') {
                let mut parts = rest.trim_start().splitn(3, ' ');
                let (Some(word), Some(name)) = (parts.next(), parts.next()) else {
                    continue;
                };
                let tail = parts.next().unwrap_or("").to_string();
                if word != "HELP" && word != "TYPE" {
                    continue;
                }
                current = name.to_string();
                let f = families.entry(name.to_string()).or_insert_with(|| {
                    order.push(name.to_string());
                    Family::default()
                });
                match word {
                    "HELP" => f.help = f.help.take().or(Some(tail)),
                    _ => f.kind = f.kind.take().or(Some(tail)),
                }
                continue;
            }
            let name_end = line
                .find(|c: char| c == '{' || c.is_whitespace())
                .unwrap_or(line.len());
            let name = &line[..name_end];
            // A sample belongs to the family announced last when its name extends it
            // (histograms: _bucket, _sum, _count); otherwise it is a family of its own.
            let family = if !current.is_empty() && name.starts_with(current.as_str()) {
                current.clone()
            } else {
                name.to_string()
            };
            let rest = &line[name_end..];
            let extra = format!("{label}=\"{}\"", escape_label(source));
            let sample = match rest.strip_prefix('{') {
                Some(labels) if labels.trim_start().starts_with('}') => {
                    format!("{name}{{{extra}{}", labels.trim_start())
                }
                Some(labels) => format!("{name}{{{extra},{labels}"),
                None => format!("{name}{{{extra}}}{rest}"),
            };
            families
                .entry(family.clone())
                .or_insert_with(|| {
                    order.push(family.clone());
                    Family::default()
                })
                .samples
                .push(sample);
        }
    }
    let mut out = String::new();
    for name in order {
        let f = &families[&name];
        if let Some(help) = &f.help {
            let _ = writeln!(out, "# HELP {name} {help}");
        }
        if let Some(kind) = &f.kind {
            let _ = writeln!(out, "# TYPE {name} {kind}");
        }
        for s in &f.samples {
            out.push_str(s);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_escapes_and_special_values() {
        let s = parse(
            "# HELP x help\n# TYPE x counter\nx 1\ny{a=\"1\",b=\"q\\\"\\\\\\n\"} +Inf 1700000000\nz{} NaN\n",
        )
        .unwrap();
        assert_eq!(s[0].name, "x");
        assert_eq!(s[0].value, 1.0);
        assert_eq!(s[1].label("a"), Some("1"));
        assert_eq!(s[1].label("b"), Some("q\"\\\n"));
        assert!(s[1].value.is_infinite());
        assert!(s[2].value.is_nan());
        assert!(parse("x{a=1} 2").is_err());
        assert!(parse("x{a=\"1\" 2").is_err());
        assert!(parse("x").is_err());
    }

    #[test]
    fn merge_keeps_one_family_header_and_labels_every_sample() {
        let a = "# HELP r requests\n# TYPE r counter\nr{m=\"x\"} 1\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_sum 3\nh_count 2\n";
        let b = "# HELP r requests\n# TYPE r counter\nr{m=\"y\"} 4\nr{} 5\n";
        let text = merge("service", [("engine", a), ("images", b)]);
        assert_eq!(text.matches("# TYPE r counter").count(), 1);
        let samples = parse(&text).unwrap();
        let r: Vec<_> = samples.iter().filter(|s| s.name == "r").collect();
        assert_eq!(r.len(), 3);
        assert!(r[0].has(&[("service", "engine"), ("m", "x")]));
        assert!(r[1].has(&[("service", "images"), ("m", "y")]));
        assert!(r[2].has(&[("service", "images")]));
        let count = samples.iter().find(|s| s.name == "h_count").unwrap();
        assert!(count.has(&[("service", "engine")]));
        assert!(text.find("# TYPE h histogram").unwrap() < text.find("h_sum").unwrap());
    }
}
