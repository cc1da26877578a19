//! Configuration (startup): LLMProxy-compatible YAML → `${VAR}` expansion → raw tree → validated
//! [`Config`]. Every error is reported at once with its YAML path. Two dialects load: LLMProxy's
//! snake_case schema (`validate`) and the llmproxy-go camelCase one (`go`), told apart by the
//! top-level keys.

pub mod defaults;
mod env;
mod go;
mod model;
mod url;
mod validate;
mod walk;

pub use model::*;

use std::fmt;
use std::path::Path;

/// The embedded `config.default.yaml`: used when no `-c` is given; documents every key.
pub const DEFAULT_YAML: &str = include_str!("../../config.default.yaml");

/// One problem found in a config file, located by its YAML path (`upstreams[1].url`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

/// Every problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {}", e.path, e.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Loads and validates a config file, expanding `${VAR}` from the process environment.
pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            path: path.display().to_string(),
            message: format!("cannot read config file: {e}"),
        }])
    })?;
    load_str(&text)
}

/// Loads and validates YAML text, expanding `${VAR}` from the process environment.
pub fn load_str(yaml: &str) -> Result<Config, ConfigErrors> {
    load_str_with_env(yaml, &|name| std::env::var(name).ok())
}

/// Loads and validates YAML text with an injected environment (for tests).
pub fn load_str_with_env(
    yaml: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let mut root: serde_yaml::Value = serde_yaml::from_str(yaml).map_err(|e| {
        let path = match e.location() {
            Some(l) => format!("<yaml> line {} column {}", l.line(), l.column()),
            None => "<yaml>".to_owned(),
        };
        ConfigErrors(vec![ConfigError {
            path,
            message: format!("invalid YAML: {e}"),
        }])
    })?;
    // `<<: *anchor` merge keys: applied so shared blocks can be reused across entries.
    root.apply_merge().map_err(|e| {
        ConfigErrors(vec![ConfigError {
            path: "<yaml>".to_owned(),
            message: format!("invalid YAML merge key: {e}"),
        }])
    })?;
    let mut ctx = walk::Ctx::default();
    env::expand_tree(&mut root, "", env, &mut ctx);
    let config = match dialect(&root, &mut ctx) {
        Some(Dialect::LlmProxy) => validate::build(&root, &mut ctx, &validate::LLMPROXY),
        Some(Dialect::GoPort) => {
            ctx.dialect = Dialect::GoPort;
            validate::build(&root, &mut ctx, &go::GO)
        }
        None => None,
    };
    match config {
        Some(mut c) if ctx.errors.is_empty() => {
            c.warnings = ctx.warning_lines();
            Ok(c)
        }
        _ => {
            if ctx.errors.is_empty() {
                ctx.error("", "invalid configuration");
            }
            Err(ConfigErrors(ctx.errors))
        }
    }
}

/// The file's dialect from its top-level keys: `httpServer`/`upstreamGroups` are the Go port's,
/// anything else is LLMProxy's. Both kinds at once is an error (`None`).
fn dialect(root: &serde_yaml::Value, ctx: &mut walk::Ctx) -> Option<Dialect> {
    let has = |k: &str| root.get(k).is_some();
    let snake: Vec<&str> = ["http_server", "upstream_groups"]
        .into_iter()
        .filter(|k| has(k))
        .collect();
    let camel: Vec<&str> = ["httpServer", "upstreamGroups"]
        .into_iter()
        .filter(|k| has(k))
        .collect();
    match (snake.is_empty(), camel.is_empty()) {
        (_, true) => Some(Dialect::LlmProxy),
        (true, false) => Some(Dialect::GoPort),
        (false, false) => {
            let quote = |ks: &[&str]| {
                ks.iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(" and ")
            };
            ctx.error(
                "",
                format!(
                    "this file mixes two config dialects: {} from LLMProxy's snake_case schema and {} from llmproxy-go's camelCase schema (durations in ms); write the whole file in one of them: `http_server` + `upstream_groups`, or `httpServer` + `upstreamGroups`",
                    quote(&snake),
                    quote(&camel)
                ),
            );
            None
        }
    }
}

#[cfg(test)]
mod go_tests;
#[cfg(test)]
mod tests;
