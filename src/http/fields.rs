//! Header fields of one parsed head (shard, sans-IO): a compact list of ranges into the head's
//! own bytes, names lowercased in place and classified once, so the proxy's few lookups are scans
//! of a short array instead of `http::HeaderMap` hashing, and nothing is copied per field.

use std::cell::RefCell;

use bytes::Bytes;

/// The header names the proxy acts on; every other name is [`Known::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    Host,
    ContentLength,
    TransferEncoding,
    Connection,
    KeepAlive,
    ProxyConnection,
    ProxyAuthenticate,
    ProxyAuthorization,
    Te,
    Trailer,
    Upgrade,
    Expect,
    UserAgent,
    Authorization,
    XForwardedFor,
    XForwardedProto,
    IdempotencyKey,
    ContentType,
    RetryAfter,
    Other,
}

impl Known {
    /// Classifies a lowercase header name.
    pub fn of(name: &[u8]) -> Known {
        match name {
            b"host" => Known::Host,
            b"content-length" => Known::ContentLength,
            b"transfer-encoding" => Known::TransferEncoding,
            b"connection" => Known::Connection,
            b"keep-alive" => Known::KeepAlive,
            b"proxy-connection" => Known::ProxyConnection,
            b"proxy-authenticate" => Known::ProxyAuthenticate,
            b"proxy-authorization" => Known::ProxyAuthorization,
            b"te" => Known::Te,
            b"trailer" => Known::Trailer,
            b"upgrade" => Known::Upgrade,
            b"expect" => Known::Expect,
            b"user-agent" => Known::UserAgent,
            b"authorization" => Known::Authorization,
            b"x-forwarded-for" => Known::XForwardedFor,
            b"x-forwarded-proto" => Known::XForwardedProto,
            b"idempotency-key" => Known::IdempotencyKey,
            b"content-type" => Known::ContentType,
            b"retry-after" => Known::RetryAfter,
            _ => Known::Other,
        }
    }

    /// Names that describe one connection, not the message (RFC 9110 §7.6.1), plus the framing
    /// headers the proxy rewrites itself.
    pub fn is_hop_by_hop(self) -> bool {
        matches!(
            self,
            Known::Connection
                | Known::KeepAlive
                | Known::ProxyConnection
                | Known::ProxyAuthenticate
                | Known::ProxyAuthorization
                | Known::Te
                | Known::Trailer
                | Known::TransferEncoding
                | Known::Upgrade
                | Known::ContentLength
        )
    }
}

/// One field: where its name and value are in the head, and what the name is.
#[derive(Debug, Clone, Copy)]
struct Field {
    name: u32,
    name_len: u32,
    value: u32,
    value_len: u32,
    kind: Known,
}

/// A field as the proxy sees it.
#[derive(Debug, Clone, Copy)]
pub struct FieldRef<'a> {
    pub kind: Known,
    /// Lowercase.
    pub name: &'a [u8],
    /// As sent, without surrounding whitespace.
    pub value: &'a [u8],
}

/// Field positions found by [`Fields::locate`], waiting for [`Fields::finish`].
pub struct Located(Vec<Field>);

/// Field lists kept for reuse on this thread (a shard parses two heads per request; reusing
/// their lists makes parsing allocation-free). Bounded: beyond it, lists are freed.
const SPARE_LISTS: usize = 64;

thread_local! {
    static SPARE: RefCell<Vec<Vec<Field>>> = const { RefCell::new(Vec::new()) };
}

fn spare_list() -> Vec<Field> {
    SPARE
        .try_with(|s| s.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_default()
}

impl Drop for Fields {
    fn drop(&mut self) {
        let mut list = std::mem::take(&mut self.list);
        if list.capacity() == 0 {
            return;
        }
        list.clear();
        let _ = SPARE.try_with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < SPARE_LISTS {
                s.push(list);
            }
        });
    }
}

/// The header fields of one head, in wire order.
#[derive(Debug, Clone, Default)]
pub struct Fields {
    head: Bytes,
    list: Vec<Field>,
    /// A `Connection` field names something besides `close` / `keep-alive`.
    lists_other: bool,
}

impl Fields {
    /// Where httparse's fields are: `parsed` must borrow from the buffer starting at `base`.
    /// [`finish`](Self::finish) then completes the list once that borrow has ended.
    pub(super) fn locate(base: *const u8, parsed: &[httparse::Header<'_>]) -> Located {
        let base = base as usize;
        let mut list = spare_list();
        list.extend(parsed.iter().map(|h| Field {
            name: (h.name.as_ptr() as usize - base) as u32,
            name_len: h.name.len() as u32,
            value: (h.value.as_ptr() as usize - base) as u32,
            value_len: h.value.len() as u32,
            kind: Known::Other,
        }));
        Located(list)
    }

    /// Lowercases each located name in `head` (HTTP names are case-insensitive and the proxy
    /// writes them lowercase), classifies it, and takes `head` as the fields' storage.
    pub(super) fn finish(head: &mut bytes::BytesMut, located: Located) -> Self {
        let mut list = located.0;
        let mut lists_other = false;
        for f in &mut list {
            let name = &mut head[f.name as usize..(f.name + f.name_len) as usize];
            name.make_ascii_lowercase();
            f.kind = Known::of(name);
            if f.kind == Known::Connection {
                let v = &head[f.value as usize..(f.value + f.value_len) as usize];
                lists_other |= v.split(|&b| b == b',').any(|t| {
                    let t = t.trim_ascii();
                    !t.is_empty()
                        && !t.eq_ignore_ascii_case(b"close")
                        && !t.eq_ignore_ascii_case(b"keep-alive")
                });
            }
        }
        Fields {
            head: std::mem::take(head).freeze(),
            list,
            lists_other,
        }
    }

    fn at(&self, f: &Field) -> FieldRef<'_> {
        FieldRef {
            kind: f.kind,
            name: &self.head[f.name as usize..(f.name + f.name_len) as usize],
            value: &self.head[f.value as usize..(f.value + f.value_len) as usize],
        }
    }

    /// Every field in wire order.
    pub fn iter(&self) -> impl Iterator<Item = FieldRef<'_>> + '_ {
        self.list.iter().map(|f| self.at(f))
    }

    /// The values of every field of this kind, in order.
    pub fn values(&self, kind: Known) -> impl Iterator<Item = &[u8]> + '_ {
        self.list
            .iter()
            .filter(move |f| f.kind == kind)
            .map(|f| self.at(f).value)
    }

    /// The first value of this kind.
    pub fn get(&self, kind: Known) -> Option<&[u8]> {
        self.values(kind).next()
    }

    pub fn count(&self, kind: Known) -> usize {
        self.list.iter().filter(|f| f.kind == kind).count()
    }

    pub fn contains(&self, kind: Known) -> bool {
        self.list.iter().any(|f| f.kind == kind)
    }

    /// Whether a field with this (lowercase) name is present.
    pub fn contains_name(&self, name: &[u8]) -> bool {
        self.iter().any(|f| f.name == name)
    }

    /// Whether `Connection` lists this (lowercase) name, making it hop-by-hop for this message.
    pub fn connection_lists(&self, name: &[u8]) -> bool {
        let token_is = |v: &[u8]| {
            v.split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(name))
        };
        match name {
            b"close" | b"keep-alive" => self.values(Known::Connection).any(token_is),
            _ => self.lists_other && self.values(Known::Connection).any(token_is),
        }
    }

    /// The whole head the fields point into.
    pub fn raw(&self) -> &Bytes {
        &self.head
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn parse(raw: &str) -> Fields {
        let mut head = BytesMut::from(raw.as_bytes());
        let mut slots = [httparse::EMPTY_HEADER; 16];
        let mut r = httparse::Request::new(&mut slots);
        r.parse(&head).unwrap();
        let located = Fields::locate(head.as_ptr(), r.headers);
        Fields::finish(&mut head, located)
    }

    #[test]
    fn names_are_lowercased_and_classified_in_wire_order() {
        let f = parse(
            "GET / HTTP/1.1\r\nHOST: a\r\nX-A: 1\r\nContent-Length: 5\r\nx-a: 2\r\nIdempotency-Key: k\r\n\r\n",
        );
        let got: Vec<(Known, &[u8], &[u8])> = f.iter().map(|f| (f.kind, f.name, f.value)).collect();
        assert_eq!(
            got,
            vec![
                (Known::Host, &b"host"[..], &b"a"[..]),
                (Known::Other, b"x-a", b"1"),
                (Known::ContentLength, b"content-length", b"5"),
                (Known::Other, b"x-a", b"2"),
                (Known::IdempotencyKey, b"idempotency-key", b"k"),
            ]
        );
        assert_eq!(f.get(Known::Host), Some(&b"a"[..]));
        assert_eq!(f.count(Known::Host), 1);
        assert!(f.contains_name(b"x-a"));
        assert!(!f.contains_name(b"X-A"));
        assert!(!f.contains(Known::Expect));
        assert_eq!(f.len(), 5);
    }

    #[test]
    fn connection_listed_names() {
        let f = parse("GET / HTTP/1.1\r\nConnection: keep-alive, X-Private\r\nConnection: close\r\nX-Private: 1\r\n\r\n");
        assert!(f.connection_lists(b"x-private"));
        assert!(f.connection_lists(b"close"));
        assert!(f.connection_lists(b"keep-alive"));
        assert!(!f.connection_lists(b"x-other"));
        let f = parse("GET / HTTP/1.1\r\nConnection: close\r\nX-Private: 1\r\n\r\n");
        assert!(!f.connection_lists(b"x-private"));
        assert!(f.connection_lists(b"close"));
        let f = parse("GET / HTTP/1.1\r\nX: 1\r\n\r\n");
        assert!(!f.connection_lists(b"x"));
    }

    #[test]
    fn dropped_lists_are_reused_and_bounded() {
        let a = parse("GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n");
        let ptr = a.list.as_ptr();
        drop(a);
        // The next parse on this thread takes the same storage back, emptied.
        let b = parse("GET / HTTP/1.1\r\nX: 9\r\n\r\n");
        assert_eq!(b.list.as_ptr(), ptr);
        assert_eq!(b.len(), 1);
        let many: Vec<Fields> = (0..SPARE_LISTS + 10)
            .map(|_| parse("GET / HTTP/1.1\r\nA: 1\r\n\r\n"))
            .collect();
        drop(many);
        assert_eq!(SPARE.with(|s| s.borrow().len()), SPARE_LISTS);
    }

    #[test]
    fn hop_by_hop_kinds() {
        for n in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "proxy-authenticate",
            "proxy-authorization",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "content-length",
        ] {
            assert!(Known::of(n.as_bytes()).is_hop_by_hop(), "{n}");
        }
        for n in [
            "host",
            "content-type",
            "x-forwarded-for",
            "tex",
            "upgrade-insecure-requests",
        ] {
            assert!(!Known::of(n.as_bytes()).is_hop_by_hop(), "{n}");
        }
    }
}
