//! `${VAR}` expansion (startup): rewrites every string scalar of the parsed YAML tree before
//! validation, so any key, numeric ones included (`port: ${PORT}`), can come from the environment.
//!
//! Syntax: `${NAME}` (error when unset), `${NAME:-default}` (default when unset or empty),
//! `$$` for a literal `$`. A `$` followed by anything else is kept as is.

use serde_yaml::Value;

use super::walk::{index_path, key_path, Ctx};

/// Expands variables in every string scalar under `value`, reporting problems at their path.
pub(crate) fn expand_tree(
    value: &mut Value,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    ctx: &mut Ctx,
) {
    match value {
        Value::String(s) => {
            if s.contains('$') {
                match expand(s, env) {
                    Ok(out) => *s = out,
                    Err(msg) => ctx.error(path, msg),
                }
            }
        }
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                expand_tree(item, &index_path(path, i), env, ctx);
            }
        }
        Value::Mapping(map) => {
            for (k, v) in map.iter_mut() {
                let name = match k {
                    Value::String(s) => s.clone(),
                    other => super::walk::scalar_text(other).unwrap_or_else(|| "?".to_owned()),
                };
                expand_tree(v, &key_path(path, &name), env, ctx);
            }
        }
        Value::Tagged(t) => expand_tree(&mut t.value, path, env, ctx),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// Expands one string.
pub(crate) fn expand(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let Some(end) = body.find('}') else {
                return Err(format!(
                    "unterminated `${{` in `{s}` (write `$$` for a literal `$`)"
                ));
            };
            let inner = &body[..end];
            let (name, default) = match inner.find(":-") {
                Some(i) => (&inner[..i], Some(&inner[i + 2..])),
                None => (inner, None),
            };
            if !valid_name(name) {
                return Err(format!(
                    "invalid variable name `{name}` in `${{{inner}}}` (letters, digits and `_`, not starting with a digit)"
                ));
            }
            match (env(name).filter(|v| !v.is_empty() || default.is_none()), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(format!(
                        "environment variable `{name}` is not set (use `${{{name}:-default}}` to give a default)"
                    ))
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("example.com".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_set_default_and_escape() {
        assert_eq!(
            expand("https://${HOST}/v1", &env).as_deref(),
            Ok("https://example.com/v1")
        );
        assert_eq!(expand("${NOPE:-8080}", &env).as_deref(), Ok("8080"));
        assert_eq!(expand("${EMPTY:-x}", &env).as_deref(), Ok("x"));
        assert_eq!(expand("${EMPTY}", &env).as_deref(), Ok(""));
        assert_eq!(expand("${HOST:-x}", &env).as_deref(), Ok("example.com"));
        assert_eq!(expand("a$$b$c", &env).as_deref(), Ok("a$b$c"));
        assert_eq!(expand("${NOPE:-}", &env).as_deref(), Ok(""));
    }

    #[test]
    fn reports_unset_and_bad_syntax() {
        assert!(expand("${NOPE}", &env)
            .unwrap_err()
            .contains("`NOPE` is not set"));
        assert!(expand("${HOST", &env).unwrap_err().contains("unterminated"));
        assert!(expand("${1X}", &env)
            .unwrap_err()
            .contains("invalid variable name"));
    }
}
