//! Header hygiene at the proxy's edges: hop-by-hop fields removed in both directions,
//! `x-forwarded-for` / `x-forwarded-proto` set, `x-request-id` generated when absent.

use std::fmt::Write;
use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue, header};

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Whether the message asks for a protocol upgrade (`Connection: upgrade` + `Upgrade: …`).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v, "upgrade"))
}

fn has_token(v: &HeaderValue, token: &str) -> bool {
    v.to_str()
        .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        .unwrap_or(false)
}

/// Fields the proxy sets or checks itself: a `Connection` header naming one does not remove it
/// (or the proxy's own value would go with it).
fn is_protected(name: &HeaderName) -> bool {
    *name == header::HOST
        || *name == header::CONTENT_LENGTH
        || *name == X_FORWARDED_FOR
        || *name == X_FORWARDED_PROTO
        || *name == X_FORWARDED_CLIENT_CERT
        || *name == X_REQUEST_ID
}

/// The connection-specific fields (RFC 9110 §7.6.1), one bit each, so that one pass over a
/// message's names says which are there.
const HOP_CONNECTION: u8 = 1;
const HOP_TRANSFER_ENCODING: u8 = 1 << 1;
const HOP_UPGRADE: u8 = 1 << 2;
const HOP_TE: u8 = 1 << 3;
const HOP_KEEP_ALIVE: u8 = 1 << 4;
const HOP_PROXY_CONNECTION: u8 = 1 << 5;

fn hop_by_hop_bit(name: &HeaderName) -> u8 {
    if *name == header::CONNECTION {
        HOP_CONNECTION
    } else if *name == header::TRANSFER_ENCODING {
        HOP_TRANSFER_ENCODING
    } else if *name == header::UPGRADE {
        HOP_UPGRADE
    } else if *name == header::TE {
        HOP_TE
    } else if *name == KEEP_ALIVE {
        HOP_KEEP_ALIVE
    } else if *name == PROXY_CONNECTION {
        HOP_PROXY_CONNECTION
    } else {
        0
    }
}

/// Removes the connection-specific fields of one hop (RFC 9110 §7.6.1): `Connection` and every
/// field it names, `Keep-Alive`, `Proxy-Connection`, `Transfer-Encoding`, `Upgrade`, and `TE`
/// unless it is exactly `trailers` (which gRPC needs end to end). With `keep_upgrade`, an
/// upgrade handshake keeps `Upgrade` and gets `Connection: upgrade` back.
///
/// One pass over the names first, noting which of these are there: most requests carry none,
/// and most upstream responses only `Connection: keep-alive`; only those present are looked up
/// again.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let present = headers
        .keys()
        .fold(0, |bits, name| bits | hop_by_hop_bit(name));
    if present == 0 {
        return;
    }
    if present & HOP_CONNECTION != 0 {
        // Names listed in Connection are hop-by-hop too. Read as bytes, without a list: most
        // values are `keep-alive` or `close`, which name nothing to remove.
        let mut listed: Vec<HeaderName> = Vec::new();
        for value in headers.get_all(header::CONNECTION) {
            for token in value.as_bytes().split(|&b| b == b',') {
                let t = token.trim_ascii();
                if t.is_empty()
                    || t.eq_ignore_ascii_case(b"close")
                    || t.eq_ignore_ascii_case(b"keep-alive")
                    || t.eq_ignore_ascii_case(b"upgrade")
                {
                    continue;
                }
                // The proxy sets (or vouches for) the protected fields itself; naming them in
                // `Connection` must not strip them.
                if let Ok(name) = HeaderName::from_bytes(t)
                    && !is_protected(&name)
                {
                    listed.push(name);
                }
            }
        }
        for h in listed {
            headers.remove(h);
        }
        headers.remove(header::CONNECTION);
    }
    if present & HOP_KEEP_ALIVE != 0 {
        headers.remove(&KEEP_ALIVE);
    }
    if present & HOP_PROXY_CONNECTION != 0 {
        headers.remove(&PROXY_CONNECTION);
    }
    if present & HOP_TRANSFER_ENCODING != 0 {
        headers.remove(header::TRANSFER_ENCODING);
    }
    if present & HOP_TE != 0
        && let Some(te) = headers.get(header::TE)
        && !te.as_bytes().eq_ignore_ascii_case(b"trailers")
    {
        headers.remove(header::TE);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if present & HOP_UPGRADE != 0 {
        headers.remove(header::UPGRADE);
    }
}

/// The client's address as a header value, formatted once per connection.
pub fn client_address(client: IpAddr) -> HeaderValue {
    let mut s = String::with_capacity(40);
    let _ = write!(s, "{client}");
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Appends the client's address to `x-forwarded-for` and sets `x-forwarded-proto`.
pub fn set_forwarded(headers: &mut HeaderMap, client: &HeaderValue, scheme: &'static str) {
    match headers.entry(&X_FORWARDED_FOR) {
        http::header::Entry::Vacant(v) => {
            v.insert(client.clone());
        }
        http::header::Entry::Occupied(mut o) => {
            let mut xff = Vec::with_capacity(64);
            for v in o.iter() {
                xff.extend_from_slice(v.as_bytes());
                xff.extend_from_slice(b", ");
            }
            xff.extend_from_slice(client.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&xff) {
                o.insert(v);
            }
        }
    }
    headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(scheme));
}

pub static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// `x-forwarded-client-cert` for a verified client certificate, in Envoy's format:
/// `Hash=<sha256 hex>;URI=<uri SAN>` (one `URI=` per URI SAN), `DNS=` per DNS SAN, and the
/// subject. As Envoy does, the subject is always quoted, and any other value holding `,`, `;`,
/// `=` or `"` is quoted too (with `"` and `\` escaped): a certificate whose SAN is
/// `spiffe://a;URI=spiffe://admin` cannot add an element.
pub fn client_cert_value(peer: &crate::tls::PeerIdentity) -> Option<HeaderValue> {
    let mut v = format!("Hash={}", peer.sha256);
    for u in &peer.uris {
        v.push_str(";URI=");
        push_xfcc_value(&mut v, u, false);
    }
    for d in &peer.dns {
        v.push_str(";DNS=");
        push_xfcc_value(&mut v, d, false);
    }
    if !peer.subject.is_empty() {
        v.push_str(";Subject=");
        push_xfcc_value(&mut v, &peer.subject, true);
    }
    HeaderValue::from_str(&v).ok()
}

fn push_xfcc_value(out: &mut String, value: &str, always_quote: bool) {
    let quote = always_quote || value.contains([',', ';', '=', '"', '\\']);
    if !quote {
        out.push_str(value);
        return;
    }
    out.push('"');
    for c in value.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// Removes any `x-forwarded-client-cert` the client sent, and sets weft's own for a client that
/// presented a verified certificate.
pub fn set_client_cert(headers: &mut HeaderMap, value: Option<&HeaderValue>) {
    match value {
        Some(v) => {
            headers.insert(&X_FORWARDED_CLIENT_CERT, v.clone());
        }
        None => {
            headers.remove(&X_FORWARDED_CLIENT_CERT);
        }
    }
}

/// Most bytes of a client's `x-request-id` kept.
const MAX_REQUEST_ID: usize = 128;

/// Whether a client's `x-request-id` value is one to keep: 1 to 128 characters from
/// `A-Z a-z 0-9 - _ . : +` (UUIDs, trace ids, ULIDs…), nothing that could break a log line or
/// a downstream parser.
fn well_formed_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    (1..=MAX_REQUEST_ID).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':' | b'+'))
}

/// Sets `x-request-id` to a fresh UUID v4 unless the request carries exactly one, well formed.
pub fn ensure_request_id(headers: &mut HeaderMap) {
    // A lookup, not `entry`: `entry` makes room for one more field even when the field is
    // there, which on a full map (a copy made to measure) is a wasted grow.
    let mut values = headers.get_all(&X_REQUEST_ID).iter();
    if let (Some(v), None) = (values.next(), values.next())
        && well_formed_request_id(v)
    {
        return;
    }
    headers.insert(&X_REQUEST_ID, new_request_id());
}

/// A random UUID v4 (`xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx`).
pub fn new_request_id() -> HeaderValue {
    let mut b = fastrand::u128(..).to_be_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 36];
    let mut j = 0;
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out[j] = b'-';
            j += 1;
        }
        out[j] = HEX[(byte >> 4) as usize];
        out[j + 1] = HEX[(byte & 0xf) as usize];
        j += 2;
    }
    // Only hex digits and dashes: always a valid header value. Held by its own reference
    // count (`from_owner`), where a copied slice would allocate again the first time the value
    // is cloned (a filter stage keeps a copy of the request's fields).
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(out))
        .unwrap_or_else(|_| HeaderValue::from_static("0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        h
    }

    #[test]
    fn strips_hop_by_hop_and_connection_listed() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret, host"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("host", "a"),
            ("te", "gzip"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-keep", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["host", "x-keep"]);
    }

    #[test]
    fn each_hop_by_hop_field_is_removed_alone_and_in_any_spelling() {
        // Alone, so that each is found by the first pass on its own; in capitals and repeated,
        // as a client or an upstream may send them.
        for name in [
            "Connection",
            "Keep-Alive",
            "Proxy-Connection",
            "Transfer-Encoding",
            "TE",
            "Upgrade",
        ] {
            let mut h = map(&[(name, "x"), (name, "y"), ("x-keep", "1")]);
            strip_hop_by_hop(&mut h, false);
            let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
            assert_eq!(names, ["x-keep"], "{name} was kept");
        }
        // The usual upstream response: only `Connection: keep-alive`.
        let mut h = map(&[("connection", "keep-alive"), ("content-length", "5")]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-length"]);
        // Fields named only by a second `Connection` field, with odd spacing and case.
        let mut h = map(&[
            ("connection", "close"),
            ("connection", " X-Drop ,,Proxy-Connection "),
            ("x-drop", "1"),
            ("proxy-connection", "keep-alive"),
            ("x-keep", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-keep"]);
        // Tabs as spacing, and a value that is not all ASCII: the names it lists still go (a
        // byte beyond ASCII must not hide the rest of the list).
        let mut h = HeaderMap::new();
        h.append(
            header::CONNECTION,
            HeaderValue::from_bytes(b"\tx-drop\t,caf\xc3\xa9, X-Also").expect("value"),
        );
        h.append("x-drop", HeaderValue::from_static("1"));
        h.append("x-also", HeaderValue::from_static("1"));
        h.append("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-keep"]);
    }

    #[test]
    fn keeps_te_trailers_and_upgrade_when_asked() {
        let mut h = map(&[
            ("te", "trailers"),
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn forwarded_sets_when_absent() {
        let mut h = HeaderMap::new();
        set_forwarded(&mut h, &client_address("::1".parse().expect("ip")), "https");
        assert_eq!(h["x-forwarded-for"], "::1");
        assert_eq!(h["x-forwarded-proto"], "https");
        let mut h = map(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
        ]);
        set_forwarded(
            &mut h,
            &client_address("127.0.0.1".parse().expect("ip")),
            "http",
        );
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.2, 127.0.0.1");
    }

    #[test]
    fn forwarded_appends() {
        let mut h = map(&[("x-forwarded-for", "10.0.0.1")]);
        set_forwarded(
            &mut h,
            &client_address("127.0.0.1".parse().expect("ip")),
            "http",
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    #[test]
    fn connection_cannot_strip_what_the_proxy_sets() {
        let mut h = map(&[
            (
                "connection",
                "close, x-forwarded-for, X-Forwarded-Proto, x-request-id, x-forwarded-client-cert, x-other",
            ),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-request-id", "abc"),
            ("x-forwarded-client-cert", "Hash=proxy-set"),
            ("x-other", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
        assert_eq!(h["x-request-id"], "abc");
        assert_eq!(h["x-forwarded-client-cert"], "Hash=proxy-set");
        assert!(!h.contains_key("x-other"));
    }

    #[test]
    fn only_well_formed_request_ids_are_kept() {
        for (given, kept) in [
            ("5f0c6a0e-2a6b-4b8e-9a36-7f1d2c3b4a59", true),
            ("01HZX3Y9ZK5Q8B7N6M4P2R1T0V", true),
            ("trace:abc.def_1+2", true),
            ("", false),
            ("has space", false),
            ("<script>", false),
            ("a\u{7f}b", false),
        ] {
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(given) {
                h.insert(&X_REQUEST_ID, v);
            }
            ensure_request_id(&mut h);
            assert_eq!(h[&X_REQUEST_ID] == given, kept, "{given:?}");
        }
        let mut h = map(&[("x-request-id", &"a".repeat(129))]);
        ensure_request_id(&mut h);
        assert_eq!(h["x-request-id"].len(), 36, "too long: replaced");
        let mut h = map(&[("x-request-id", "one"), ("x-request-id", "two")]);
        ensure_request_id(&mut h);
        assert_eq!(
            h.get_all("x-request-id").iter().count(),
            1,
            "two: replaced by one"
        );
    }

    #[test]
    fn xfcc_values_cannot_add_elements() {
        let peer = crate::tls::PeerIdentity {
            sha256: "ab12".into(),
            uris: vec![
                "spiffe://td/ns/a/sa/b".into(),
                "spiffe://x;URI=spiffe://admin".into(),
            ],
            dns: vec!["a.example".into()],
            subject: "CN=a \"quoted\", O=x".into(),
        };
        let v = client_cert_value(&peer).expect("value");
        assert_eq!(
            v.to_str().expect("text"),
            "Hash=ab12;URI=spiffe://td/ns/a/sa/b;URI=\"spiffe://x;URI=spiffe://admin\";DNS=a.example;Subject=\"CN=a \\\"quoted\\\", O=x\""
        );
    }

    #[test]
    fn request_ids_are_uuid_v4() {
        let v = new_request_id();
        let s = v.to_str().expect("ascii");
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"));
        assert_ne!(new_request_id(), v);
    }
}
