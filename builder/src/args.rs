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
        let mut vars = Vars::new();
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
