//! Build-arg semantics of the classic builder (moby's `builder/dockerfile/buildargs.go`).
//!
//! - `--build-arg` values ([`BuildArgs::new`]) only take effect for args a Dockerfile declares
//!   with ARG, except the predefined proxy args ([`PREDEFINED`]), usable without declaration;
//! - the ARGs before the first FROM ("meta args") are usable in FROM lines only
//!   ([`BuildArgs::meta_vars`]); a stage sees one only after redeclaring it (`ARG NAME` without a
//!   default then takes the global value);
//! - ENV wins over an ARG of the same name;
//! - RUN sees the ENV plus the declared args ([`StageArgs::run_env`]); its history records them as
//!   `|N a=b c=d /bin/sh -c ...` ([`StageArgs::run_created_by`]), leaving out the predefined
//!   proxy args unless the Dockerfile declared them (they often hold credentials).

use std::collections::{BTreeMap, BTreeSet};

use crate::dockerfile::Arg;
use crate::expand::{self, ExpandError, Vars};

/// The args usable without an ARG instruction.
pub const PREDEFINED: [&str; 10] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// The `--build-arg`s of a build (`buildargs` of `POST /build`): a name without value (`null` in
/// the API) declares nothing and leaves the Dockerfile's default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildArgs {
    given: BTreeMap<String, Option<String>>,
    /// The meta args' values once resolved (the default a stage's `ARG NAME` inherits).
    meta: BTreeMap<String, String>,
    /// Every arg name some ARG instruction declared (to report the unused ones).
    referenced: BTreeSet<String>,
}

impl BuildArgs {
    pub fn new(given: BTreeMap<String, Option<String>>) -> Self {
        Self {
            given,
            ..Self::default()
        }
    }

    fn given(&self, name: &str) -> Option<&str> {
        self.given.get(name).and_then(|v| v.as_deref())
    }

    /// Resolves the ARGs before the first FROM (each default may use the earlier ones) and
    /// returns the variables FROM lines expand with.
    pub fn meta_vars(
        &mut self,
        args_before_from: &[Arg],
        escape: char,
    ) -> Result<Vars, ExpandError> {
        // Predefined args given to the build are usable in FROM too (moby's `GetAllMeta`).
        let mut vars: Vars = PREDEFINED
            .iter()
            .filter_map(|name| Some((name.to_string(), self.given(name)?.to_string())))
            .collect();
        for arg in args_before_from {
            self.referenced.insert(arg.name.clone());
            let value = match (self.given(&arg.name), &arg.default) {
                (Some(given), _) => Some(given.to_string()),
                (None, Some(default)) => Some(expand::process_word(default, &vars, escape)?),
                (None, None) => None,
            };
            if let Some(value) = value {
                vars.insert(arg.name.clone(), value.clone());
                self.meta.insert(arg.name.clone(), value);
            }
        }
        Ok(vars)
    }

    /// A fresh scope for a new stage.
    pub fn stage(&self) -> StageArgs {
        StageArgs {
            given: self.given.clone(),
            meta: self.meta.clone(),
            declared: BTreeMap::new(),
        }
    }

    /// Records that an ARG declared this name (for [`BuildArgs::unused`]).
    pub fn mark_referenced(&mut self, name: &str) {
        self.referenced.insert(name.to_string());
    }

    /// Build args given but never declared by the Dockerfile (predefined ones excepted): moby
    /// warns `[Warning] One or more build-args [X] were not consumed`.
    pub fn unused(&self) -> Vec<String> {
        self.given
            .keys()
            .filter(|k| !self.referenced.contains(*k) && !PREDEFINED.contains(&k.as_str()))
            .cloned()
            .collect()
    }
}

impl BuildArgs {
    /// moby's warning for [`BuildArgs::unused`]: `[Warning] One or more build-args [A B] were
    /// not consumed`, or `None` when all were.
    pub fn unused_warning(&self) -> Option<String> {
        let unused = self.unused();
        (!unused.is_empty()).then(|| {
            format!(
                "[Warning] One or more build-args [{}] were not consumed",
                unused.join(" ")
            )
        })
    }
}

/// The args a stage declared so far.
#[derive(Debug, Clone)]
pub struct StageArgs {
    given: BTreeMap<String, Option<String>>,
    meta: BTreeMap<String, String>,
    /// name → default (already expanded).
    declared: BTreeMap<String, Option<String>>,
}

impl StageArgs {
    /// Declares an (expanded) ARG in this stage.
    pub fn declare(&mut self, arg: &Arg) {
        self.declared.insert(arg.name.clone(), arg.default.clone());
    }

    /// The value of an arg in this stage (moby's `getBuildArg`), `None` when it has none.
    fn value(&self, name: &str) -> Option<String> {
        let declared = self.declared.get(name);
        if declared.is_none() && !PREDEFINED.contains(&name) {
            return None;
        }
        if let Some(Some(given)) = self.given.get(name) {
            return Some(given.to_string());
        }
        match declared {
            Some(Some(default)) => Some(default.clone()),
            Some(None) => self.meta.get(name).cloned(),
            None => None,
        }
    }

    /// The args with a value that ENV does not override, as `KEY=VALUE` sorted by name (moby's
    /// `FilterAllowed`).
    pub fn filter_allowed(&self, config_env: &[String]) -> Vec<String> {
        let env = expand::vars_from_env(config_env);
        let names: BTreeSet<&str> = self
            .declared
            .keys()
            .map(String::as_str)
            .chain(PREDEFINED)
            .collect();
        names
            .into_iter()
            .filter(|name| !env.contains_key(*name))
            .filter_map(|name| self.value(name).map(|v| format!("{name}={v}")))
            .collect()
    }

    /// The variables instructions other than RUN expand with: the config's ENV plus the allowed
    /// args.
    pub fn vars(&self, config_env: &[String]) -> Vars {
        let mut all: Vec<String> = config_env.to_vec();
        all.extend(self.filter_allowed(config_env));
        expand::vars_from_env(&all)
    }

    /// The environment a RUN step's process gets: the config's `Env`, then the allowed args.
    pub fn run_env(&self, config_env: &[String]) -> Vec<String> {
        let mut env = config_env.to_vec();
        env.extend(self.filter_allowed(config_env));
        env
    }

    /// The command a RUN step records (its history `created_by` is this joined with spaces, and
    /// it is part of the cache key): `argv` alone without args, else
    /// `["|N", "a=b", ..., argv...]` with the args sorted, proxy args left out unless declared.
    pub fn run_created_by(&self, config_env: &[String], argv: &[String]) -> Vec<String> {
        let allowed = self.filter_allowed(config_env);
        if allowed.is_empty() {
            return argv.to_vec();
        }
        let mut recorded: Vec<String> = allowed
            .into_iter()
            .filter(|kv| {
                let name = kv.split('=').next().unwrap_or("");
                self.declared.contains_key(name) || !PREDEFINED.contains(&name)
            })
            .collect();
        recorded.sort();
        let mut out = vec![format!("|{}", recorded.len())];
        out.extend(recorded);
        out.extend_from_slice(argv);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dockerfile::{self, InstructionKind};

    fn given(pairs: &[(&str, Option<&str>)]) -> BuildArgs {
        BuildArgs::new(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.map(String::from)))
                .collect(),
        )
    }

    fn arg(name: &str, default: Option<&str>) -> Arg {
        Arg {
            name: name.into(),
            default: default.map(String::from),
        }
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn meta_args_resolve_in_order_with_overrides() {
        let mut args = given(&[("TAG", Some("1.36")), ("http_proxy", Some("http://p"))]);
        let df = dockerfile::parse(
            "ARG REPO=busybox\nARG TAG=latest\nARG IMAGE=${REPO}:${TAG}\nARG EMPTY\nFROM $IMAGE\n",
        )
        .unwrap();
        let vars = args.meta_vars(&df.args_before_from, '\\').unwrap();
        assert_eq!(vars["IMAGE"], "busybox:1.36");
        assert_eq!(vars["http_proxy"], "http://p");
        assert!(!vars.contains_key("EMPTY"));
        let base = expand::process_word(&df.stages[0].base, &vars, '\\').unwrap();
        assert_eq!(base, "busybox:1.36");
    }

    #[test]
    fn global_args_need_redeclaring_in_a_stage() {
        let mut args = given(&[]);
        args.meta_vars(&[arg("V", Some("global"))], '\\').unwrap();
        let mut stage = args.stage();
        assert_eq!(stage.run_env(&[]), Vec::<String>::new());
        stage.declare(&arg("V", None));
        assert_eq!(stage.run_env(&[]), s(&["V=global"]));
        // A new default in the stage wins over the global one; a build arg wins over both.
        let mut stage = args.stage();
        stage.declare(&arg("V", Some("local")));
        assert_eq!(stage.run_env(&[]), s(&["V=local"]));
        let mut args = given(&[("V", Some("cli"))]);
        args.meta_vars(&[arg("V", Some("global"))], '\\').unwrap();
        let mut stage = args.stage();
        stage.declare(&arg("V", Some("local")));
        assert_eq!(stage.run_env(&[]), s(&["V=cli"]));
    }

    #[test]
    fn undeclared_build_args_are_invisible_but_proxies_are_not() {
        let args = given(&[
            ("SECRET", Some("x")),
            ("HTTP_PROXY", Some("http://p")),
            ("no_proxy", None),
        ]);
        let stage = args.stage();
        assert_eq!(
            stage.run_env(&s(&["PATH=/bin"])),
            s(&["PATH=/bin", "HTTP_PROXY=http://p"])
        );
        assert_eq!(args.unused(), s(&["SECRET"]));
        assert_eq!(
            args.unused_warning().unwrap(),
            "[Warning] One or more build-args [SECRET] were not consumed"
        );
        let mut args = args;
        args.mark_referenced("SECRET");
        assert!(args.unused().is_empty());
        assert_eq!(args.unused_warning(), None);
    }

    #[test]
    fn env_wins_over_args() {
        let args = given(&[("A", Some("arg"))]);
        let mut stage = args.stage();
        stage.declare(&arg("A", None));
        stage.declare(&arg("B", Some("b")));
        let env = s(&["A=env"]);
        assert_eq!(stage.filter_allowed(&env), s(&["B=b"]));
        let vars = stage.vars(&env);
        assert_eq!(vars["A"], "env");
        assert_eq!(vars["B"], "b");
        // Declared without any value: not in the environment at all.
        let mut stage = given(&[]).stage();
        stage.declare(&arg("NOVALUE", None));
        assert!(stage.filter_allowed(&[]).is_empty());
    }

    #[test]
    fn run_history_form() {
        let argv = s(&["/bin/sh", "-c", "echo $B"]);
        let args = given(&[
            ("B", Some("2")),
            ("HTTP_PROXY", Some("http://p")),
            ("https_proxy", Some("http://q")),
        ]);
        let mut stage = args.stage();
        // Without declared args, only unreferenced proxies: moby still prefixes `|0`.
        assert_eq!(
            stage.run_created_by(&[], &argv),
            s(&["|0", "/bin/sh", "-c", "echo $B"])
        );
        stage.declare(&arg("B", None));
        stage.declare(&arg("A", Some("1")));
        stage.declare(&arg("https_proxy", None));
        assert_eq!(
            stage.run_created_by(&[], &argv).join(" "),
            "|3 A=1 B=2 https_proxy=http://q /bin/sh -c echo $B"
        );
        // No args at all: the plain command.
        let stage = given(&[]).stage();
        assert_eq!(stage.run_created_by(&[], &argv), argv);
    }

    #[test]
    fn stage_args_from_a_parsed_dockerfile() {
        let df = dockerfile::parse("FROM x\nARG A=1 B\n").unwrap();
        let InstructionKind::Arg(decls) = &df.stages[0].instructions[0].kind else {
            panic!()
        };
        let mut stage = given(&[("B", Some("b"))]).stage();
        decls.iter().for_each(|a| stage.declare(a));
        assert_eq!(stage.run_env(&[]), s(&["A=1", "B=b"]));
    }
}
