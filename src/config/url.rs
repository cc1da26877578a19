//! URL checks for `upstreams[].url` and `http_client.proxy.url` (startup), plus the base64 used
//! for Basic credentials. Hand-written: only `http`/`https` with an authority and a path are needed.

use std::net::Ipv6Addr;

use super::model::Scheme;

/// The parts of an `http(s)://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParsedUrl {
    pub scheme: Scheme,
    /// `user:pass` when present (percent-decoded).
    pub credentials: Option<(String, String)>,
    /// Host name or IP literal, without brackets.
    pub host: String,
    /// Whether the host is an IPv6 literal (needs brackets in `Host`).
    pub ipv6: bool,
    pub port: u16,
    pub explicit_port: bool,
    /// Path as written (may be empty, may end with `/`).
    pub path: String,
}

impl ParsedUrl {
    /// `host` or `host:port` when the port is not the scheme default; IPv6 in brackets.
    pub fn host_header(&self) -> String {
        let host = if self.ipv6 {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default = match self.scheme {
            Scheme::Http => 80,
            Scheme::Https => 443,
        };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// `scheme://host:port` without credentials or path.
    pub fn origin(&self) -> String {
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        let host = if self.ipv6 {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{scheme}://{host}:{}", self.port)
    }
}

/// Parses an absolute `http`/`https` URL. Query strings and fragments are rejected.
pub(crate) fn parse(url: &str) -> Result<ParsedUrl, String> {
    let url = url.trim();
    let (scheme_str, rest) = url
        .split_once("://")
        .ok_or_else(|| "not an absolute URL (expected http://… or https://…)".to_owned())?;
    let scheme = match scheme_str.to_ascii_lowercase().as_str() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        other => {
            return Err(format!(
                "unsupported URL scheme `{other}` (expected http or https)"
            ))
        }
    };
    if rest.contains('?') {
        return Err("a query string (`?…`) is not allowed here".to_owned());
    }
    if rest.contains('#') {
        return Err("a fragment (`#…`) is not allowed here".to_owned());
    }
    if let Some(c) = rest.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("the URL contains an invalid character {c:?}"));
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let (credentials, hostport) = match authority.rsplit_once('@') {
        Some((userinfo, hp)) => {
            let (user, pass) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            (Some((percent_decode(user)?, percent_decode(pass)?)), hp)
        }
        None => (None, authority),
    };
    let (host, ipv6, port_str) = if let Some(after) = hostport.strip_prefix('[') {
        let (v6, tail) = after
            .split_once(']')
            .ok_or("unterminated `[` in IPv6 host")?;
        v6.parse::<Ipv6Addr>()
            .map_err(|_| format!("`{v6}` is not a valid IPv6 address"))?;
        let port = match tail {
            "" => None,
            t => Some(t.strip_prefix(':').ok_or("unexpected text after `]`")?),
        };
        (v6.to_owned(), true, port)
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h.to_owned(), false, Some(p)),
            None => (hostport.to_owned(), false, None),
        }
    };
    if host.is_empty() {
        return Err("the URL has no host".to_owned());
    }
    if !ipv6
        && !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
    {
        return Err(format!("`{host}` is not a valid host name"));
    }
    let default_port = match scheme {
        Scheme::Http => 80,
        Scheme::Https => 443,
    };
    let (port, explicit_port) = match port_str {
        None => (default_port, false),
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => (n, true),
            _ => return Err("the port is not a number in 1–65535".to_owned()),
        },
    };
    Ok(ParsedUrl {
        scheme,
        credentials,
        host: host.to_ascii_lowercase(),
        ipv6,
        port,
        explicit_port,
        path: path.to_owned(),
    })
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .ok_or("bad percent-encoding in URL credentials")?;
            let b = u8::from_str_radix(hex, 16)
                .map_err(|_| "bad percent-encoding in URL credentials")?;
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "URL credentials are not valid UTF-8".to_owned())
}

/// Standard base64 with padding (RFC 4648 §4).
pub(crate) fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `Basic base64(user:pass)`.
pub(crate) fn basic_auth(user: &str, pass: &str) -> String {
    format!("Basic {}", base64(format!("{user}:{pass}").as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
        assert_eq!(
            basic_auth("Aladdin", "open sesame"),
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
    }

    #[test]
    fn parses_urls() {
        let u = parse("https://api.openai.com/v1/").unwrap();
        assert_eq!(
            (u.scheme, u.host.as_str(), u.port, u.path.as_str()),
            (Scheme::Https, "api.openai.com", 443, "/v1/")
        );
        assert_eq!(u.host_header(), "api.openai.com");
        let u = parse("http://[::1]:8001").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.ipv6), ("::1", 8001, true));
        assert_eq!(u.host_header(), "[::1]:8001");
        let u = parse("http://u%40x:p%3Aw@proxy:3128").unwrap();
        assert_eq!(u.credentials, Some(("u@x".to_owned(), "p:w".to_owned())));
        assert!(parse("ftp://x").is_err());
        assert!(parse("http://x/?a=1").is_err());
        assert!(parse("http://x/#f").is_err());
        assert!(parse("http://x:0").is_err());
        assert!(parse("http://x:99999").is_err());
        assert!(parse("http://:80").is_err());
        assert!(parse("http://[zz]/").is_err());
        assert!(parse("api.openai.com").is_err());
        assert!(parse("http://a b/").is_err());
    }
}
