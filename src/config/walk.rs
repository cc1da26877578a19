//! The YAML tree walker (startup): typed reads from `serde_yaml::Value` that record every problem
//! with its YAML path and carry on with a placeholder, so one pass reports all errors at once.

use serde_yaml::{Mapping, Value};

use super::model::Dialect;
use super::ConfigError;

/// Collected errors (and warnings) of one load.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub errors: Vec<ConfigError>,
    /// Warnings by message, each with the paths it applies to, in first-seen order.
    pub warnings: Vec<(&'static str, Vec<String>)>,
    /// The file's dialect, for hints on keys spelled the other dialect's way.
    pub dialect: Dialect,
}

impl Default for Ctx {
    fn default() -> Self {
        Ctx {
            errors: Vec::new(),
            warnings: Vec::new(),
            dialect: Dialect::LlmProxy,
        }
    }
}

impl Ctx {
    /// Records that the setting at `path` is accepted but `message` (what it does not do).
    pub fn warn(&mut self, path: &str, message: &'static str) {
        match self.warnings.iter_mut().find(|(m, _)| *m == message) {
            Some((_, paths)) => paths.push(path.to_owned()),
            None => self.warnings.push((message, vec![path.to_owned()])),
        }
    }

    /// The warnings as log lines: `path, path: message`.
    pub fn warning_lines(&self) -> Vec<String> {
        self.warnings
            .iter()
            .map(|(m, paths)| format!("{}: {m}", paths.join(", ")))
            .collect()
    }

    /// A note for an unknown key spelled the other dialect's way.
    fn dialect_note(&self, key: &str) -> &'static str {
        match self.dialect {
            Dialect::GoPort if key.contains('_') => {
                " (this file uses llmproxy-go's camelCase keys, found from `httpServer`/`upstreamGroups`)"
            }
            Dialect::LlmProxy if key.chars().any(|c| c.is_ascii_uppercase()) => {
                " (this file uses LLMProxy's snake_case keys; llmproxy-go's camelCase keys need `httpServer`/`upstreamGroups` at the top)"
            }
            _ => "",
        }
    }

    pub fn error(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            path: if path.is_empty() {
                "<root>".to_owned()
            } else {
                path.to_owned()
            },
            message: message.into(),
        });
    }
}

/// `parent.key` (or `key` at the root).
pub(crate) fn key_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// `parent[i]`.
pub(crate) fn index_path(parent: &str, i: usize) -> String {
    format!("{parent}[{i}]")
}

/// The text of a scalar (string, number, bool), for keys and string fields.
pub(crate) fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A short description of a value for "expected X, found Y" messages.
pub(crate) fn describe(v: &Value) -> String {
    match v {
        Value::Null => "nothing (null)".to_owned(),
        Value::Bool(b) => format!("boolean `{b}`"),
        Value::Number(n) => format!("number `{n}`"),
        Value::String(s) => format!("string `{}`", truncate(s)),
        Value::Sequence(_) => "a list".to_owned(),
        Value::Mapping(_) => "a mapping".to_owned(),
        Value::Tagged(t) => format!("tagged value `{}`", t.tag),
    }
}

fn truncate(s: &str) -> String {
    if s.chars().count() > 40 {
        let head: String = s.chars().take(40).collect();
        format!("{head}…")
    } else {
        s.to_owned()
    }
}

/// Edit distance counting a swap of two neighbours as one edit (optimal string alignment), so
/// `ulr` is one edit from `url`. Keys are short, so the quadratic table is fine.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let w = b.len() + 1;
    let mut t = vec![0usize; (a.len() + 1) * w];
    for i in 0..=a.len() {
        for j in 0..=b.len() {
            t[i * w + j] = if i == 0 {
                j
            } else if j == 0 {
                i
            } else {
                let cost = usize::from(a[i - 1] != b[j - 1]);
                let mut d = (t[(i - 1) * w + j] + 1)
                    .min(t[i * w + j - 1] + 1)
                    .min(t[(i - 1) * w + j - 1] + cost);
                if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                    d = d.min(t[(i - 2) * w + j - 2] + 1);
                }
                d
            };
        }
    }
    t[a.len() * w + b.len()]
}

/// Lower case without `_` and `-`: `per_second`, `perSecond` and `PerSecond` are one key.
fn fold(key: &str) -> String {
    key.chars()
        .filter(|c| *c != '_' && *c != '-')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// The closest known key: the same key in another case style, else one within a small edit
/// distance, for "did you mean" hints.
pub(crate) fn suggest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    let folded = fold(key);
    if let Some(k) = known.iter().find(|k| fold(k) == folded) {
        return Some(k);
    }
    let limit = if key.chars().count() <= 4 { 1 } else { 2 };
    let lower = key.to_ascii_lowercase();
    known
        .iter()
        .map(|k| (edit_distance(&lower, &k.to_ascii_lowercase()), *k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// A YAML mapping located at `path`, whose keys were checked against a known list.
pub(crate) struct Obj<'a> {
    map: &'a Mapping,
    pub path: String,
}

impl<'a> Obj<'a> {
    /// Views `value` as a mapping. `None` when absent/null (nothing reported) or not a mapping
    /// (reported). Unknown keys are reported with a suggestion.
    pub fn new(
        ctx: &mut Ctx,
        value: Option<&'a Value>,
        path: String,
        known: &[&str],
    ) -> Option<Self> {
        let map = match value? {
            Value::Null => return None,
            Value::Mapping(m) => m,
            other => {
                ctx.error(
                    &path,
                    format!("expected a mapping, found {}", describe(other)),
                );
                return None;
            }
        };
        for k in map.keys() {
            let Some(name) = scalar_text(k) else {
                ctx.error(
                    &path,
                    format!("keys must be strings, found {}", describe(k)),
                );
                continue;
            };
            if known.contains(&name.as_str()) {
                continue;
            }
            let hint = match suggest(&name, known) {
                Some(s) => format!("; did you mean `{s}`?"),
                None => format!("; expected one of: {}", known.join(", ")),
            };
            let note = ctx.dialect_note(&name);
            ctx.error(
                &key_path(&path, &name),
                format!("unknown key `{name}`{hint}{note}"),
            );
        }
        Some(Obj { map, path })
    }

    /// The value of `key`; null counts as absent.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        match self.map.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn child(&self, key: &str) -> String {
        key_path(&self.path, key)
    }

    /// A nested mapping.
    pub fn obj(&self, ctx: &mut Ctx, key: &str, known: &[&str]) -> Option<Obj<'a>> {
        Obj::new(ctx, self.get(key), self.child(key), known)
    }

    /// A list; absent → `None`, wrong type → reported and `None`.
    pub fn seq(&self, ctx: &mut Ctx, key: &str) -> Option<&'a [Value]> {
        match self.get(key)? {
            Value::Sequence(s) => Some(s),
            other => {
                ctx.error(
                    &self.child(key),
                    format!("expected a list, found {}", describe(other)),
                );
                None
            }
        }
    }

    /// An optional string (numbers are accepted and converted).
    pub fn opt_str(&self, ctx: &mut Ctx, key: &str) -> Option<String> {
        let v = self.get(key)?;
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            other => {
                ctx.error(
                    &self.child(key),
                    format!("expected a string, found {}", describe(other)),
                );
                None
            }
        }
    }

    /// A required, non-empty string.
    pub fn req_str(&self, ctx: &mut Ctx, key: &str) -> Option<String> {
        if !self.has(key) {
            ctx.error(&self.child(key), format!("missing required key `{key}`"));
            return None;
        }
        let s = self.opt_str(ctx, key)?;
        if s.trim().is_empty() {
            ctx.error(&self.child(key), "must not be empty");
            return None;
        }
        Some(s)
    }

    /// An optional integer within `range` (strings that parse as integers are accepted).
    pub fn opt_u64(&self, ctx: &mut Ctx, key: &str, range: (u64, u64)) -> Option<u64> {
        let v = self.get(key)?;
        let path = self.child(key);
        let n = match v {
            Value::Number(n) => match n.as_u64() {
                Some(n) => n,
                None => {
                    ctx.error(
                        &path,
                        format!("expected a non-negative integer, found {}", describe(v)),
                    );
                    return None;
                }
            },
            Value::String(s) => match s.trim().parse::<u64>() {
                Ok(n) => n,
                Err(_) => {
                    ctx.error(
                        &path,
                        format!("expected a non-negative integer, found {}", describe(v)),
                    );
                    return None;
                }
            },
            other => {
                ctx.error(
                    &path,
                    format!("expected a non-negative integer, found {}", describe(other)),
                );
                return None;
            }
        };
        if n < range.0 || n > range.1 {
            ctx.error(
                &path,
                format!("{n} is out of range {}–{}", range.0, range.1),
            );
            return None;
        }
        Some(n)
    }

    /// An integer within `range`, `default` when absent (or invalid, after reporting).
    pub fn u64(&self, ctx: &mut Ctx, key: &str, default: u64, range: (u64, u64)) -> u64 {
        self.opt_u64(ctx, key, range).unwrap_or(default)
    }

    /// A number within `range` (integers and numeric strings accepted).
    pub fn f64(&self, ctx: &mut Ctx, key: &str, default: f64, range: (f64, f64)) -> f64 {
        let Some(v) = self.get(key) else {
            return default;
        };
        let path = self.child(key);
        let n = match v {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        };
        match n {
            Some(n) if n.is_finite() && n >= range.0 && n <= range.1 => n,
            Some(n) if n.is_finite() => {
                ctx.error(
                    &path,
                    format!("{n} is out of range {}–{}", range.0, range.1),
                );
                default
            }
            _ => {
                ctx.error(&path, format!("expected a number, found {}", describe(v)));
                default
            }
        }
    }

    /// An optional boolean (`"true"`/`"false"` strings accepted, for `${VAR}`).
    pub fn opt_bool(&self, ctx: &mut Ctx, key: &str) -> Option<bool> {
        let v = self.get(key)?;
        match v {
            Value::Bool(b) => Some(*b),
            Value::String(s) if s.trim().eq_ignore_ascii_case("true") => Some(true),
            Value::String(s) if s.trim().eq_ignore_ascii_case("false") => Some(false),
            other => {
                ctx.error(
                    &self.child(key),
                    format!(
                        "expected a boolean (true or false), found {}",
                        describe(other)
                    ),
                );
                None
            }
        }
    }

    pub fn bool(&self, ctx: &mut Ctx, key: &str, default: bool) -> bool {
        self.opt_bool(ctx, key).unwrap_or(default)
    }

    /// One of `choices` (string), `default` when absent.
    pub fn choice<T: Copy>(
        &self,
        ctx: &mut Ctx,
        key: &str,
        default: T,
        choices: &[(&str, T)],
    ) -> T {
        let Some(s) = self.opt_str(ctx, key) else {
            return default;
        };
        if let Some((_, t)) = choices.iter().find(|(name, _)| *name == s.trim()) {
            return *t;
        }
        let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
        let hint = match suggest(s.trim(), &names) {
            Some(n) => format!(" (did you mean `{n}`?)"),
            None => String::new(),
        };
        ctx.error(
            &self.child(key),
            format!(
                "unknown value `{s}`{hint}; expected one of: {}",
                names.join(", ")
            ),
        );
        default
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_and_suggestions() {
        assert_eq!(edit_distance("ratelimt", "ratelimit"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("ulr", "url"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(
            suggest("ratelimt", &["ratelimit", "timeout"]),
            Some("ratelimit")
        );
        assert_eq!(suggest("xyzzy", &["ratelimit", "timeout"]), None);
        assert_eq!(suggest("Port", &["port", "name"]), Some("port"));
    }
}
