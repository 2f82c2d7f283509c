//! The check stage: what is refused before anything else looks at a request (filters
//! included), and the request's path made canonical, so that every stage after it sees one
//! path.

use std::borrow::Cow;

use http::header::{self, HeaderName};
use http::request::Parts;
use http::{Method, Uri, Version};

use crate::config::HttpOptions;
use crate::errors::ProxyError;
use crate::http::conn::ConnCtx;
use crate::http::headers;
use crate::http::path::{self, Canonical};
use crate::snapshot::ListenerRuntime;

/// What the check stage decided for a request it did not refuse.
pub enum Checked {
    /// Go on: filters, routing and the upstream see the request as it is now.
    Proceed,
    /// `escaped_slashes: unescape_and_redirect`: send the client here (path and query).
    Redirect(String),
}

/// Rewrites the request's path to its canonical form, so that everything after this stage —
/// filters (`:path`, `request.path`), routes, metrics, logs and the upstream — sees one path:
/// nothing authorizes one spelling and forwards another.
fn canonicalize_uri(listener: &ListenerRuntime, parts: &mut Parts) -> Result<Checked, ProxyError> {
    let canonical = path::canonicalize(parts.uri.path(), &listener.http.path)
        .map_err(|e| ProxyError::InvalidPath(e.reason()))?;
    let path = match canonical {
        Canonical::Path(Cow::Borrowed(_)) => return Ok(Checked::Proceed),
        Canonical::Path(Cow::Owned(p)) => p,
        Canonical::Redirect(to) => {
            return Ok(Checked::Redirect(match parts.uri.query() {
                Some(q) => format!("{to}?{q}"),
                None => to,
            }));
        }
    };
    let target = match parts.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    uri.path_and_query = Some(
        http::uri::PathAndQuery::try_from(target)
            .map_err(|_| ProxyError::InvalidPath("not a valid request target"))?,
    );
    parts.uri =
        Uri::from_parts(uri).map_err(|_| ProxyError::InvalidPath("not a valid request target"))?;
    Ok(Checked::Proceed)
}

/// What is refused before anything else looks at a request (filters included), and the
/// request's path made canonical.
pub fn check(
    conn: &ConnCtx,
    listener: &ListenerRuntime,
    parts: &mut Parts,
) -> Result<Checked, ProxyError> {
    // Only weft says who the client proved to be (Envoy's `sanitize_set`).
    crate::http::headers::set_client_cert(&mut parts.headers, conn.client_cert.as_ref());
    // hyper enforces this for HTTP/1.1 as it parses; HTTP/2 is checked here.
    if parts.headers.len() > listener.http.max_headers as usize {
        return Err(ProxyError::TooManyHeaders(parts.headers.len()));
    }
    // HTTP/2 field values with leading or trailing whitespace are malformed (RFC 9113
    // §8.2.1); an HTTP/1.1 parser trims it.
    if parts.version == Version::HTTP_2
        && parts.headers.values().any(|v| {
            let b = v.as_bytes();
            matches!(b.first(), Some(b' ' | b'\t')) || matches!(b.last(), Some(b' ' | b'\t'))
        })
    {
        return Err(ProxyError::BadRequest(
            "field value with leading or trailing whitespace",
        ));
    }
    screen_upgrade(&listener.http, parts)?;
    match listener.http.headers_with_underscores {
        crate::config::UnderscoreAction::Allow => {}
        crate::config::UnderscoreAction::Reject => {
            if let Some(h) = parts.headers.keys().find(|k| k.as_str().contains('_')) {
                return Err(ProxyError::UnderscoreHeader(h.as_str().to_owned()));
            }
        }
        crate::config::UnderscoreAction::Drop => {
            let names: Vec<_> = parts
                .headers
                .keys()
                .filter(|k| k.as_str().contains('_'))
                .cloned()
                .collect();
            for n in names {
                parts.headers.remove(n);
            }
        }
    }
    if parts.method == Method::CONNECT {
        // Authority-form (`host:port`): no path to canonicalize.
        return Ok(Checked::Proceed);
    }
    canonicalize_uri(listener, parts)
}

static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// The protocols an `Upgrade` header asks for, lower-cased.
fn protocols(parts: &Parts) -> Vec<String> {
    let mut out = Vec::new();
    for v in parts.headers.get_all(header::UPGRADE) {
        for t in String::from_utf8_lossy(v.as_bytes()).split(',') {
            let t = t.trim();
            if !t.is_empty() {
                out.push(t.to_ascii_lowercase());
            }
        }
    }
    out
}

/// Applies the listener's upgrade rules to a request (before filters see it): `CONNECT` only
/// when configured; an upgrade only to configured protocols; `h2c` removed.
fn screen_upgrade(opts: &HttpOptions, parts: &mut Parts) -> Result<(), ProxyError> {
    if parts.method == http::Method::CONNECT {
        if !opts.connect_allowed() {
            return Err(ProxyError::UpgradeNotAllowed("CONNECT".into()));
        }
        return Ok(());
    }
    if parts.version != http::Version::HTTP_11 || !headers::wants_upgrade(&parts.headers) {
        // Not an upgrade: a lone `Upgrade` header is hop-by-hop and removed on the way.
        return Ok(());
    }
    let asked = protocols(parts);
    if asked.is_empty() || asked.iter().any(|p| p.split('/').next() == Some("h2c")) {
        parts.headers.remove(header::UPGRADE);
        parts.headers.remove(&HTTP2_SETTINGS);
        return Ok(());
    }
    match asked.iter().find(|p| !opts.upgrade_allowed(p)) {
        Some(p) => Err(ProxyError::UpgradeNotAllowed(p.clone())),
        None => Ok(()),
    }
}

/// The request's host for routing: authority of the URI (HTTP/2, absolute-form), else `Host`.
pub fn authority(parts: &Parts) -> Result<Cow<'_, str>, ProxyError> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest("more than one Host header"));
    }
    if let Some(a) = parts.uri.authority() {
        // HTTP/2: a `host` field naming another authority than `:authority` makes the request
        // malformed (RFC 9113 §8.3.1): which one would a backend believe? (HTTP/1.1's
        // absolute-form target wins over `Host`, RFC 9112 §3.2.2.)
        if parts.version == Version::HTTP_2
            && let Some(h) = host
            && !h.as_bytes().eq_ignore_ascii_case(a.as_str().as_bytes())
        {
            return Err(ProxyError::BadRequest("host differs from :authority"));
        }
        return Ok(Cow::Borrowed(a.as_str()));
    }
    match host {
        Some(h) => {
            let s = h
                .to_str()
                .map_err(|_| ProxyError::BadRequest("invalid Host header"))?;
            // Must be a valid authority: no path, userinfo or whitespace smuggled in.
            s.parse::<http::uri::Authority>()
                .map_err(|_| ProxyError::BadRequest("invalid Host header"))?;
            if s.contains('@') {
                return Err(ProxyError::BadRequest("invalid Host header"));
            }
            Ok(Cow::Borrowed(s))
        }
        None if parts.version == Version::HTTP_10 => Ok(Cow::Borrowed("")),
        None => Err(ProxyError::BadRequest("missing Host header")),
    }
}

/// Splits `host[:port]` (with `[v6]` literals), lower-casing the host and dropping one
/// trailing dot (`Example.COM.` is `example.com`): hosts are matched as hosts. Borrowed when
/// the host is written so already (the common case).
pub fn split_host_port(authority: &str) -> (Cow<'_, str>, Option<u16>) {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, p)) => (&authority[..h.len() + 2], p.strip_prefix(':')),
            None => (authority, None),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    };
    (host, port.and_then(|p| p.parse().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port() {
        assert_eq!(
            split_host_port("Example.COM:8080"),
            ("example.com".into(), Some(8080))
        );
        assert_eq!(split_host_port("example.com"), ("example.com".into(), None));
        assert_eq!(split_host_port("[::1]:80"), ("[::1]".into(), Some(80)));
        assert_eq!(split_host_port("[::1]"), ("[::1]".into(), None));
        assert_eq!(
            split_host_port("Blocked.Test.:8080"),
            ("blocked.test".into(), Some(8080))
        );
        assert_eq!(
            split_host_port("blocked.test."),
            ("blocked.test".into(), None)
        );
    }

    fn parts(lines: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::get("/").version(http::Version::HTTP_11);
        for (k, v) in lines {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request").into_parts().0
    }

    #[test]
    fn only_configured_upgrades_pass() {
        let opts = HttpOptions::default();
        let mut ws = parts(&[("connection", "Upgrade"), ("upgrade", "WebSocket")]);
        assert!(screen_upgrade(&opts, &mut ws).is_ok());
        assert!(ws.headers.contains_key("upgrade"));

        let mut other = parts(&[("connection", "upgrade"), ("upgrade", "websocket, foo/2")]);
        let e = screen_upgrade(&opts, &mut other).expect_err("foo is not configured");
        assert_eq!(e.cause(), "upgrade_not_allowed");

        for h2c in ["h2c", "H2C", "websocket, h2c", "h2c/1"] {
            let mut p = parts(&[
                ("connection", "Upgrade, HTTP2-Settings"),
                ("upgrade", h2c),
                ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
            ]);
            assert!(screen_upgrade(&opts, &mut p).is_ok());
            assert!(!p.headers.contains_key("upgrade"), "{h2c}");
            assert!(!p.headers.contains_key("http2-settings"), "{h2c}");
            assert!(!headers::wants_upgrade(&p.headers));
        }

        let mut connect = http::Request::connect("example.com:443")
            .body(())
            .expect("request")
            .into_parts()
            .0;
        assert!(screen_upgrade(&opts, &mut connect).is_err());
        let allowed = HttpOptions {
            upgrades: vec!["CONNECT".into()],
            ..HttpOptions::default()
        };
        assert!(screen_upgrade(&allowed, &mut connect).is_ok());
        // CONNECT allowed does not allow an `Upgrade: connect`.
        let mut p = parts(&[("connection", "upgrade"), ("upgrade", "connect")]);
        assert!(screen_upgrade(&allowed, &mut p).is_err());
    }
}
