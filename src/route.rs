//! Path router (built at startup, used per request on the shard): picks a forward's target group
//! from the request path. Lookups do not allocate.
//!
//! Pattern syntax (LLMProxy's radixmap subset): static paths (`/v1/chat/completions`), `:name`
//! segments (one non-empty segment), regex segments `{name:regex}`, `{:regex}` or `{regex}` (one
//! segment the regex matches entirely), a mid-path `*` (one non-empty segment) and a trailing
//! `*` (the rest of the path, possibly empty). Priority: exact static match, then patterns with
//! more static segments, then more regex segments, ties by declaration order. The query string
//! is ignored.

use std::collections::HashMap;

use crate::config::Route;

/// Checks a `routing[].path` pattern; the error says what is wrong.
pub fn validate_pattern(pattern: &str) -> Result<(), String> {
    parse(pattern).map(|_| ())
}

#[derive(Debug, Clone)]
enum Seg {
    Static(String),
    /// `:name` or a mid-path `*`: exactly one non-empty segment.
    One,
    /// `{name:regex}`: one segment the (anchored) regex matches.
    Regex(regex::Regex),
    /// Trailing `*`: whatever follows the last `/`.
    Rest,
}

/// `None` for a fully static pattern (looked up exactly).
fn parse(pattern: &str) -> Result<Option<Vec<Seg>>, String> {
    let Some(body) = pattern.strip_prefix('/') else {
        return Err(format!("path pattern `{pattern}` must start with `/`"));
    };
    if let Some(c) = pattern
        .chars()
        .find(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!("path pattern `{pattern}` contains {c:?}"));
    }
    let parts: Vec<&str> = body.split('/').collect();
    // `?` and `#` may appear inside a regex segment, not elsewhere.
    if let Some(c) = parts
        .iter()
        .filter(|p| !(p.starts_with('{') && p.ends_with('}')))
        .flat_map(|p| p.chars())
        .find(|c| *c == '?' || *c == '#')
    {
        return Err(format!("path pattern `{pattern}` contains {c:?}; only the path is matched (no query or fragment)"));
    }
    let last = parts.len() - 1;
    let mut segs = Vec::with_capacity(parts.len());
    let mut dynamic = false;
    for (i, part) in parts.iter().enumerate() {
        if part.starts_with('{') && part.ends_with('}') && part.len() >= 2 {
            dynamic = true;
            segs.push(Seg::Regex(segment_regex(pattern, part)?));
            continue;
        }
        if part.contains('{') || part.contains('}') {
            return Err(format!(
                "path pattern `{pattern}`: a regex segment `{{name:regex}}` must be a whole segment (found `{part}`); a `/` cannot appear inside one"
            ));
        }
        if *part == "*" {
            dynamic = true;
            segs.push(if i == last { Seg::Rest } else { Seg::One });
        } else if part.contains('*') {
            return Err(format!(
                "path pattern `{pattern}`: `*` must be a whole segment (found `{part}`)"
            ));
        } else if let Some(name) = part.strip_prefix(':') {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "path pattern `{pattern}`: parameter `{part}` needs a name of letters, digits or `_`"
                ));
            }
            dynamic = true;
            segs.push(Seg::One);
        } else {
            segs.push(Seg::Static((*part).to_owned()));
        }
    }
    Ok(dynamic.then_some(segs))
}

/// `{name:regex}`, `{:regex}` or `{regex}` → the regex anchored to the whole segment. The name
/// (letters, digits, `_`) is optional and unused: routes only choose a group.
fn segment_regex(pattern: &str, part: &str) -> Result<regex::Regex, String> {
    let inner = &part[1..part.len() - 1];
    let expr = match inner.split_once(':') {
        Some((name, expr)) if name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => expr,
        _ => inner,
    };
    let expr = expr.strip_prefix('^').unwrap_or(expr);
    let expr = expr.strip_suffix('$').unwrap_or(expr);
    if expr.is_empty() {
        return Err(format!(
            "path pattern `{pattern}`: regex segment `{part}` has no regex; use `:name` for any segment"
        ));
    }
    regex::Regex::new(&format!("^(?:{expr})$")).map_err(|e| {
        let first = e.to_string();
        let why = first.lines().last().unwrap_or("invalid").trim().to_owned();
        format!("path pattern `{pattern}`: invalid regex in `{part}`: {why}")
    })
}

#[derive(Debug, Clone)]
struct Pattern {
    segs: Vec<Seg>,
    target: usize,
}

impl Pattern {
    fn matches(&self, path: &str) -> bool {
        let Some(body) = path.strip_prefix('/') else {
            return false;
        };
        let mut parts = body.split('/');
        for seg in &self.segs {
            match seg {
                Seg::Rest => return parts.next().is_some(),
                Seg::One => match parts.next() {
                    Some(p) if !p.is_empty() => {}
                    _ => return false,
                },
                Seg::Regex(re) => match parts.next() {
                    Some(p) if re.is_match(p) => {}
                    _ => return false,
                },
                Seg::Static(s) => {
                    if parts.next() != Some(s.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }
}

/// A forward's routes, ready for lookups.
#[derive(Debug, Clone, Default)]
pub struct Router {
    exact: HashMap<String, usize>,
    /// Sorted by priority.
    patterns: Vec<Pattern>,
}

impl Router {
    /// Builds the router; routes are validated by the config loader (invalid ones are skipped).
    pub fn new(routes: &[Route]) -> Router {
        let mut exact = HashMap::new();
        let mut patterns: Vec<((usize, usize), usize, Pattern)> = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            match parse(&r.path) {
                Ok(None) => {
                    exact.entry(r.path.clone()).or_insert(r.target_group);
                }
                Ok(Some(segs)) => {
                    let statics = segs.iter().filter(|s| matches!(s, Seg::Static(_))).count();
                    let regexes = segs.iter().filter(|s| matches!(s, Seg::Regex(_))).count();
                    patterns.push((
                        (statics, regexes),
                        i,
                        Pattern {
                            segs,
                            target: r.target_group,
                        },
                    ));
                }
                Err(_) => {}
            }
        }
        patterns.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        Router {
            exact,
            patterns: patterns.into_iter().map(|(_, _, p)| p).collect(),
        }
    }

    /// The target group for a request target (`/path?query`), or `None` (use the default group).
    pub fn find(&self, target: &str) -> Option<usize> {
        let path = match target.bytes().position(|b| b == b'?') {
            Some(i) => &target[..i],
            None => target,
        };
        if let Some(g) = self.exact.get(path) {
            return Some(*g);
        }
        self.patterns
            .iter()
            .find(|p| p.matches(path))
            .map(|p| p.target)
    }

    /// Whether any route is configured.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.patterns.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(routes: &[(&str, usize)]) -> Router {
        let routes: Vec<Route> = routes
            .iter()
            .map(|(p, g)| Route {
                path: (*p).to_owned(),
                target_group: *g,
            })
            .collect();
        Router::new(&routes)
    }

    #[test]
    fn static_params_and_wildcards() {
        let r = router(&[
            ("/v1/chat/completions", 1),
            ("/v1/models/:id", 2),
            ("/v1/*", 3),
            ("/api/*/status", 4),
        ]);
        assert_eq!(r.find("/v1/chat/completions"), Some(1));
        assert_eq!(r.find("/v1/chat/completions?stream=true"), Some(1));
        assert_eq!(r.find("/v1/models/gpt-4"), Some(2));
        assert_eq!(r.find("/v1/models/gpt-4/extra"), Some(3));
        assert_eq!(r.find("/v1/models/"), Some(3));
        assert_eq!(r.find("/v1/embeddings"), Some(3));
        assert_eq!(r.find("/v1/"), Some(3));
        assert_eq!(r.find("/v1"), None);
        assert_eq!(r.find("/api/x/status"), Some(4));
        assert_eq!(r.find("/api//status"), None);
        assert_eq!(r.find("/api/x/y/status"), None);
        assert_eq!(r.find("/other"), None);
        assert_eq!(r.find("*"), None);
        assert!(!r.is_empty());
        assert!(router(&[]).is_empty());
    }

    #[test]
    fn priority_static_then_more_static_then_declaration_order() {
        // Declared in the "wrong" order on purpose.
        let r = router(&[
            ("/*", 0),
            ("/v1/*", 1),
            ("/v1/:m/x", 2),
            ("/v1/chat", 3),
            ("/v1/:a", 4),
        ]);
        assert_eq!(r.find("/v1/chat"), Some(3));
        assert_eq!(r.find("/v1/foo/x"), Some(2));
        // `/v1/*` and `/v1/:a` both have one static segment: declaration order wins.
        assert_eq!(r.find("/v1/foo"), Some(1));
        assert_eq!(r.find("/anything/else"), Some(0));
        assert_eq!(r.find("/"), Some(0));
        // First of two identical patterns wins.
        let r = router(&[("/a", 1), ("/a", 2), ("/b/:x", 3), ("/b/:y", 4)]);
        assert_eq!(r.find("/a"), Some(1));
        assert_eq!(r.find("/b/z"), Some(3));
    }

    #[test]
    fn regex_segments_match_whole_segments_and_rank_above_params() {
        let r = router(&[
            ("/v1/models/:name", 1),
            ("/v1/models/{id:[0-9]+}", 2),
            ("/u/{(?:a|b)c}/x", 3),
            ("/v1/{a:x}/{b:y}", 4),
            ("/v1/{a:x}/:b", 5),
        ]);
        assert_eq!(r.find("/v1/models/123"), Some(2));
        assert_eq!(r.find("/v1/models/123?x=1"), Some(2));
        assert_eq!(r.find("/v1/models/12a"), Some(1));
        assert_eq!(r.find("/v1/models/a12"), Some(1));
        assert_eq!(r.find("/u/ac/x"), Some(3));
        assert_eq!(r.find("/u/bc/x"), Some(3));
        assert_eq!(r.find("/u/abc/x"), None);
        assert_eq!(r.find("/v1/x/y"), Some(4));
        assert_eq!(r.find("/v1/x/z"), Some(5));
    }

    #[test]
    fn pattern_validation() {
        assert!(validate_pattern("/v1/chat/completions").is_ok());
        assert!(validate_pattern("/v1/:model/*").is_ok());
        assert!(validate_pattern("/").is_ok());
        assert!(validate_pattern("/v1/{id:[0-9]+}").is_ok());
        assert!(validate_pattern(r"/v1/{\d{2,3}}/x").is_ok());
        assert!(validate_pattern("/v1/{:^a+$}").is_ok());
        let e = validate_pattern("/v1/{id:[0-9}").unwrap_err();
        assert!(e.contains("invalid regex"), "{e}");
        let e = validate_pattern("/v1/{id:}").unwrap_err();
        assert!(e.contains("no regex"), "{e}");
        let e = validate_pattern("/v1/img-{id}").unwrap_err();
        assert!(e.contains("whole segment"), "{e}");
        assert!(validate_pattern("v1/x")
            .unwrap_err()
            .contains("must start with `/`"));
        assert!(validate_pattern("/v1/x*")
            .unwrap_err()
            .contains("whole segment"));
        assert!(validate_pattern("/v1/:")
            .unwrap_err()
            .contains("needs a name"));
        assert!(validate_pattern("/v1?x=1").is_err());
    }
}
