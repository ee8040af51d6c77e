//! The real [`Firewall`]: `iptables-save` to see what is there, one `iptables-restore
//! --noflush` transaction per change (one exec instead of one per rule, and atomic).
//!
//! Rules are recognised by their comment, so ensuring is idempotent and removal deletes
//! exactly the lines berth added, in the form `iptables-save` printed them.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};

use berth_core::{Context, Error, ErrorKind, Result};

use crate::kernel::{Firewall, Rule, Table};

const BUILTIN: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];
/// Targets that are not chains.
const TARGETS: [&str; 9] = [
    "ACCEPT",
    "DROP",
    "RETURN",
    "REJECT",
    "DNAT",
    "SNAT",
    "MASQUERADE",
    "REDIRECT",
    "LOG",
];

/// iptables through its save/restore commands.
#[derive(Debug, Clone)]
pub struct Iptables {
    save: String,
    restore: String,
}

impl Default for Iptables {
    fn default() -> Self {
        Self {
            save: "iptables-save".into(),
            restore: "iptables-restore".into(),
        }
    }
}

/// What `iptables-save` shows of one table.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SavedTable {
    /// Chain names.
    pub chains: BTreeSet<String>,
    /// `-A` lines with their chain and comment.
    pub rules: Vec<SavedRule>,
}

/// One `-A` line.
#[derive(Debug, PartialEq, Eq)]
pub struct SavedRule {
    /// The chain.
    pub chain: String,
    /// The comment, if any.
    pub comment: Option<String>,
    /// The line as printed (`-A CHAIN ...`).
    pub line: String,
}

/// The comment of a saved rule line.
fn comment_of(line: &str) -> Option<String> {
    let rest = &line[line.find("--comment ")? + "--comment ".len()..];
    if let Some(quoted) = rest.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = quoted.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => out.extend(chars.next()),
                '"' => return Some(out),
                c => out.push(c),
            }
        }
        None
    } else {
        rest.split_whitespace().next().map(str::to_string)
    }
}

/// Parses `iptables-save -t <table>` output.
pub fn parse_save(text: &str) -> SavedTable {
    let mut out = SavedTable::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(':') {
            if let Some(name) = rest.split_whitespace().next() {
                out.chains.insert(name.to_string());
            }
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let chain = rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
            out.rules.push(SavedRule {
                chain,
                comment: comment_of(line),
                line: line.to_string(),
            });
        }
    }
    out
}

fn quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/!,=+".contains(c))
    {
        arg.to_string()
    } else {
        format!("\"{}\"", arg.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// The restore script that adds the missing `rules` of `table`, given what is there.
pub fn ensure_script(table: Table, saved: &SavedTable, rules: &[&Rule]) -> Option<String> {
    let present: BTreeSet<(&str, &str)> = saved
        .rules
        .iter()
        .filter_map(|r| Some((r.chain.as_str(), r.comment.as_deref()?)))
        .collect();
    let mut script = String::new();
    let mut new_chains = BTreeSet::new();
    for r in rules {
        // Chains the rules live in and chains they jump to must exist first.
        let target = r
            .args
            .iter()
            .position(|a| a == "-j")
            .and_then(|i| r.args.get(i + 1));
        for chain in
            std::iter::once(&r.chain).chain(target.filter(|t| !TARGETS.contains(&t.as_str())))
        {
            if !BUILTIN.contains(&chain.as_str())
                && !saved.chains.contains(chain)
                && new_chains.insert(chain.clone())
            {
                script.push_str(&format!("-N {chain}\n"));
            }
        }
    }
    let mut any = !new_chains.is_empty();
    for r in rules {
        if present.contains(&(r.chain.as_str(), r.comment.as_str())) {
            continue;
        }
        let verb = if r.first {
            format!("-I {} 1", r.chain)
        } else {
            format!("-A {}", r.chain)
        };
        // The comment goes before the target, where iptables-save prints it too.
        let mut args: Vec<String> = r.args.iter().map(|a| quote(a)).collect();
        let at = r.args.iter().position(|a| a == "-j").unwrap_or(args.len());
        args.splice(
            at..at,
            [
                "-m".to_string(),
                "comment".into(),
                "--comment".into(),
                quote(&r.comment),
            ],
        );
        script.push_str(&format!("{verb} {}\n", args.join(" ")));
        any = true;
    }
    any.then(|| format!("*{}\n{script}COMMIT\n", table.as_str()))
}

/// The restore script that deletes every rule whose comment starts with one of `prefixes`.
pub fn remove_script(table: Table, saved: &SavedTable, prefixes: &[String]) -> Option<String> {
    let mut script = String::new();
    for r in &saved.rules {
        if r.comment
            .as_deref()
            .is_some_and(|c| prefixes.iter().any(|p| c.starts_with(p.as_str())))
        {
            script.push_str(&format!("-D {}\n", &r.line[3..]));
        }
    }
    (!script.is_empty()).then(|| format!("*{}\n{script}COMMIT\n", table.as_str()))
}

impl Iptables {
    fn save(&self, table: Table) -> Result<SavedTable> {
        let out = Command::new(&self.save)
            .args(["-t", table.as_str()])
            .stdin(Stdio::null())
            .output()
            .context(ErrorKind::Unavailable, format!("run {}", self.save))?;
        if !out.status.success() {
            return Err(Error::internal(format!(
                "{} -t {} failed: {}",
                self.save,
                table.as_str(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(parse_save(&String::from_utf8_lossy(&out.stdout)))
    }

    fn restore(&self, script: &str) -> Result<()> {
        let mut child = Command::new(&self.restore)
            .args(["-w", "5", "--noflush"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context(ErrorKind::Unavailable, format!("run {}", self.restore))?;
        child
            .stdin
            .take()
            .ok_or_else(|| Error::internal("iptables-restore stdin"))?
            .write_all(script.as_bytes())
            .internal(|| "write iptables-restore input".into())?;
        let out = child
            .wait_with_output()
            .internal(|| "wait for iptables-restore".into())?;
        if !out.status.success() {
            return Err(Error::internal(format!(
                "iptables-restore failed: {} (input: {})",
                String::from_utf8_lossy(&out.stderr).trim(),
                script.replace('\n', "; ")
            )));
        }
        Ok(())
    }
}

impl Firewall for Iptables {
    fn ensure(&self, rules: &[Rule]) -> Result<()> {
        let mut by_table: BTreeMap<Table, Vec<&Rule>> = BTreeMap::new();
        for r in rules {
            by_table.entry(r.table).or_default().push(r);
        }
        for (table, rules) in by_table {
            // Another stack may change the same table between save and restore; a failure then
            // is retried once against a fresh view.
            let mut attempt = 0;
            loop {
                let saved = self.save(table)?;
                let Some(script) = ensure_script(table, &saved, &rules) else {
                    break;
                };
                match self.restore(&script) {
                    Ok(()) => break,
                    Err(e) if attempt == 0 => {
                        tracing::debug!(error = %e.chain(), "iptables-restore failed, retrying");
                        attempt += 1;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    fn comments(&self, comment_prefix: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for table in [Table::Nat, Table::Filter] {
            let saved = self.save(table)?;
            out.extend(
                saved
                    .rules
                    .into_iter()
                    .filter_map(|r| r.comment)
                    .filter(|c| c.starts_with(comment_prefix)),
            );
        }
        Ok(out)
    }

    fn remove(&self, comment_prefixes: &[String]) -> Result<()> {
        if comment_prefixes.is_empty() {
            return Ok(());
        }
        for table in [Table::Nat, Table::Filter] {
            let mut attempt = 0;
            loop {
                let saved = self.save(table)?;
                let Some(script) = remove_script(table, &saved, comment_prefixes) else {
                    break;
                };
                match self.restore(&script) {
                    Ok(()) => break,
                    Err(e) if attempt == 0 => {
                        tracing::debug!(error = %e.chain(), "iptables-restore failed, retrying");
                        attempt += 1;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVED: &str = "# Generated by iptables-save v1.8.9 (nf_tables)
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:BERTH-DNAT - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -m comment --comment \"berth:base:prerouting\" -j BERTH-DNAT
-A BERTH-DNAT -p tcp -m tcp --dport 8080 -m comment --comment \"berth:ep:aaaaaaaaaaaa:tcp:all:8080\" -j DNAT --to-destination 10.0.0.2:80
-A BERTH-DNAT -p tcp -m tcp --dport 9090 -m comment --comment other -j DNAT --to-destination 10.0.0.3:80
COMMIT
";

    fn rule(chain: &str, comment: &str, first: bool) -> Rule {
        Rule {
            table: Table::Nat,
            chain: chain.into(),
            args: vec![
                "-p".into(),
                "tcp".into(),
                "--dport".into(),
                "1".into(),
                "-j".into(),
                "RETURN".into(),
            ],
            comment: comment.into(),
            first,
        }
    }

    #[test]
    fn parses_saved_rules() {
        let t = parse_save(SAVED);
        assert!(t.chains.contains("BERTH-DNAT"));
        assert_eq!(t.rules.len(), 3);
        assert_eq!(t.rules[0].comment.as_deref(), Some("berth:base:prerouting"));
        assert_eq!(t.rules[2].comment.as_deref(), Some("other"));
        assert_eq!(
            comment_of("-A X --comment \"a \\\"b\\\" c\" -j Y").as_deref(),
            Some("a \"b\" c")
        );
    }

    #[test]
    fn ensure_adds_only_missing_rules_and_chains() {
        let t = parse_save(SAVED);
        let have = rule("PREROUTING", "berth:base:prerouting", true);
        assert_eq!(ensure_script(Table::Nat, &t, &[&have]), None);
        let new_chain = rule("BERTH-POST", "berth:x", false);
        let top = rule("BERTH-DNAT", "berth:y", true);
        let script = ensure_script(Table::Nat, &t, &[&have, &new_chain, &top]).unwrap();
        assert_eq!(
            script,
            "*nat\n-N BERTH-POST\n\
             -A BERTH-POST -p tcp --dport 1 -m comment --comment berth:x -j RETURN\n\
             -I BERTH-DNAT 1 -p tcp --dport 1 -m comment --comment berth:y -j RETURN\nCOMMIT\n"
        );
    }

    #[test]
    fn remove_deletes_exactly_the_tagged_lines() {
        let t = parse_save(SAVED);
        let script =
            remove_script(Table::Nat, &t, &["berth:ep:aaaaaaaaaaaa:".to_string()]).unwrap();
        assert_eq!(
            script,
            "*nat\n-D BERTH-DNAT -p tcp -m tcp --dport 8080 -m comment --comment \"berth:ep:aaaaaaaaaaaa:tcp:all:8080\" -j DNAT --to-destination 10.0.0.2:80\nCOMMIT\n"
        );
        assert_eq!(
            remove_script(Table::Nat, &t, &["berth:net:".to_string()]),
            None
        );
    }
}
