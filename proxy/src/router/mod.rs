//! The router: route tables compiled from config, matched first-match-wins, and what a matched
//! route does (forward with a weighted split, redirect, direct response, rewrites, header edits).

mod matcher;
mod retry;

pub use matcher::{Matcher, PathMatch, RequestView, compile_regex, query_param};
pub use retry::{RetryPolicy, TryFailure};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::config::{self, ConfigError, HeaderEdits};
use crate::upstream::Cluster;

/// A named, ordered list of routes.
#[derive(Debug)]
pub struct RouteTable {
    pub name: String,
    pub routes: Vec<Route>,
}

/// One compiled route.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub matcher: Matcher,
    pub action: Action,
    /// Time allowed until upstream response headers.
    pub timeout: Option<Duration>,
    pub path_rewrite: Option<PathRewrite>,
    pub host_rewrite: Option<HeaderValue>,
    pub request_headers: HeaderEditor,
    pub response_headers: HeaderEditor,
    pub retries: RetryPolicy,
}

#[derive(Debug)]
pub enum Action {
    Forward(Split),
    Redirect(RedirectAction),
    Direct { status: StatusCode, body: Bytes },
}

/// Weighted targets of a forwarding route.
#[derive(Debug)]
pub struct Split {
    pub targets: Vec<Target>,
    total: u32,
}

#[derive(Debug)]
pub struct Target {
    pub cluster: Arc<Cluster>,
    pub weight: u32,
}

impl Split {
    /// Picks a target index, each with probability weight / total.
    pub fn pick(&self) -> usize {
        if self.targets.len() == 1 {
            return 0;
        }
        let mut n = fastrand::u32(..self.total);
        for (i, t) in self.targets.iter().enumerate() {
            if n < t.weight {
                return i;
            }
            n -= t.weight;
        }
        self.targets.len() - 1
    }
}

/// Replaces the first `prefix_len` bytes of the path with `with`.
#[derive(Debug)]
pub struct PathRewrite {
    pub prefix_len: usize,
    pub with: String,
}

impl PathRewrite {
    pub fn apply(&self, path: &str) -> String {
        let rest = path.get(self.prefix_len..).unwrap_or("");
        let mut out = String::with_capacity(self.with.len() + rest.len());
        out.push_str(&self.with);
        // `/api/` → `/` on `/api/x` gives `/x`, and `/api` → `/v2` on `/api/x` gives `/v2/x`;
        // never `//x` nor an empty path.
        if out.ends_with('/') && rest.starts_with('/') {
            out.push_str(&rest[1..]);
        } else {
            out.push_str(rest);
        }
        if out.is_empty() {
            out.push('/');
        }
        out
    }
}

#[derive(Debug)]
pub struct RedirectAction {
    pub status: StatusCode,
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<String>,
    pub rewrite: Option<PathRewrite>,
    pub strip_query: bool,
}

/// What a redirect is computed from.
#[derive(Debug)]
pub struct RedirectFrom<'a> {
    pub scheme: &'a str,
    pub host: &'a str,
    pub port: Option<u16>,
    pub path: &'a str,
    pub query: Option<&'a str>,
}

impl RedirectAction {
    pub fn location(&self, from: &RedirectFrom<'_>) -> String {
        let scheme = self.scheme.as_deref().unwrap_or(from.scheme);
        let host = self.host.as_deref().unwrap_or(from.host);
        // A scheme change drops the request's port; a configured port always wins.
        let port = self.port.or(if scheme == from.scheme {
            from.port
        } else {
            None
        });
        let path = match (&self.path, &self.rewrite) {
            (Some(p), _) => p.clone(),
            (None, Some(rw)) => rw.apply(from.path),
            (None, None) => from.path.to_owned(),
        };
        let mut out = format!("{scheme}://{host}");
        if let Some(p) = port {
            let default = (scheme == "http" && p == 80) || (scheme == "https" && p == 443);
            if !default {
                out.push_str(&format!(":{p}"));
            }
        }
        out.push_str(&path);
        if let (false, Some(q)) = (self.strip_query, from.query) {
            out.push('?');
            out.push_str(q);
        }
        out
    }
}

/// Compiled header edits: remove, then set, then add.
#[derive(Debug, Default)]
pub struct HeaderEditor {
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
}

/// Headers that header edits may not touch: the proxy owns them.
const PROTECTED: &[&str] = &[
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "upgrade",
    "content-length",
];

impl HeaderEditor {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    pub fn compile(path: &str, e: &HeaderEdits, errors: &mut Vec<ConfigError>) -> HeaderEditor {
        let mut out = HeaderEditor::default();
        let name = |at: String, n: &str, errors: &mut Vec<ConfigError>| -> Option<HeaderName> {
            match HeaderName::from_bytes(n.as_bytes()) {
                Ok(h) if PROTECTED.contains(&h.as_str()) => {
                    errors.push(ConfigError::new(
                        at,
                        format!("header {n:?} is managed by the proxy and cannot be edited"),
                    ));
                    None
                }
                Ok(h) => Some(h),
                Err(_) => {
                    errors.push(ConfigError::new(at, format!("invalid header name {n:?}")));
                    None
                }
            }
        };
        let value = |at: &str, v: &str, errors: &mut Vec<ConfigError>| -> Option<HeaderValue> {
            match HeaderValue::from_str(v) {
                Ok(v) => Some(v),
                Err(_) => {
                    errors.push(ConfigError::new(at, format!("invalid header value {v:?}")));
                    None
                }
            }
        };
        for (i, n) in e.remove.iter().enumerate() {
            if let Some(h) = name(format!("{path}.remove[{i}]"), n, errors) {
                out.remove.push(h);
            }
        }
        for (list, src, field) in [(&mut out.set, &e.set, "set"), (&mut out.add, &e.add, "add")] {
            for (n, v) in src {
                let at = format!("{path}.{field}.{n}");
                let h = name(at.clone(), n, errors);
                let v = value(&at, v, errors);
                if let (Some(h), Some(v)) = (h, v) {
                    list.push((h, v));
                }
            }
        }
        out
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for h in &self.remove {
            headers.remove(h);
        }
        for (h, v) in &self.set {
            headers.insert(h.clone(), v.clone());
        }
        for (h, v) in &self.add {
            headers.append(h.clone(), v.clone());
        }
    }
}

impl RouteTable {
    pub fn find(&self, view: &RequestView<'_>) -> Option<(usize, &Route)> {
        self.routes
            .iter()
            .enumerate()
            .find(|(_, r)| r.matcher.matches(view))
    }

    /// Compiles `routes.<name>`; every error is pushed, located.
    pub fn build(
        name: &str,
        routes: &[config::Route],
        clusters: &HashMap<String, Arc<Cluster>>,
        errors: &mut Vec<ConfigError>,
    ) -> RouteTable {
        let mut names = HashMap::new();
        let compiled = routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let at = format!("routes.{name}[{i}]");
                let route = build_route(&at, r, clusters, errors);
                let route_name = r.name.clone().unwrap_or_else(|| format!("{name}[{i}]"));
                if let Some(prev) = names.insert(route_name.clone(), i) {
                    errors.push(ConfigError::new(
                        format!("{at}.name"),
                        format!("duplicate route name {route_name:?} (also routes.{name}[{prev}])"),
                    ));
                }
                Route {
                    name: route_name,
                    ..route
                }
            })
            .collect();
        RouteTable {
            name: name.to_owned(),
            routes: compiled,
        }
    }
}

fn build_route(
    at: &str,
    r: &config::Route,
    clusters: &HashMap<String, Arc<Cluster>>,
    errors: &mut Vec<ConfigError>,
) -> Route {
    let matcher = Matcher::compile(&format!("{at}.match"), &r.matcher, errors);
    // The part of the path a prefix rewrite replaces.
    let matched_prefix = match &matcher.path {
        PathMatch::Any => Some(1),
        PathMatch::Exact(p) | PathMatch::Prefix(p) => Some(p.len()),
        PathMatch::Regex(_) => None,
    };
    let rewrite = |field: &str, with: &Option<String>, errors: &mut Vec<ConfigError>| {
        let with = with.as_ref()?;
        if !with.starts_with('/') {
            errors.push(ConfigError::new(
                format!("{at}.{field}"),
                format!("{with:?} must start with `/`"),
            ));
            return None;
        }
        match matched_prefix {
            Some(prefix_len) => Some(PathRewrite {
                prefix_len,
                with: with.clone(),
            }),
            None => {
                errors.push(ConfigError::new(
                    format!("{at}.{field}"),
                    "a prefix rewrite needs `path` or `path_prefix` in the match, not `path_regex`",
                ));
                None
            }
        }
    };

    let actions = [
        !r.to.is_empty(),
        r.redirect.is_some(),
        r.direct_response.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if actions != 1 {
        errors.push(ConfigError::new(
            at,
            "give exactly one of `to`, `redirect`, `direct_response`",
        ));
    }

    let action = if let Some(rd) = &r.redirect {
        let status = match rd.code {
            301 | 302 | 303 | 307 | 308 => {
                StatusCode::from_u16(rd.code).unwrap_or(StatusCode::MOVED_PERMANENTLY)
            }
            other => {
                errors.push(ConfigError::new(
                    format!("{at}.redirect.code"),
                    format!("{other} is not a redirect code (301, 302, 303, 307, 308)"),
                ));
                StatusCode::MOVED_PERMANENTLY
            }
        };
        if let Some(s) = &rd.scheme
            && s != "http"
            && s != "https"
        {
            errors.push(ConfigError::new(
                format!("{at}.redirect.scheme"),
                format!("{s:?} is not `http` or `https`"),
            ));
        }
        if rd.port == Some(0) {
            errors.push(ConfigError::new(
                format!("{at}.redirect.port"),
                "port 0 is not valid",
            ));
        }
        if let Some(h) = &rd.host
            && (h.is_empty() || h.contains(['/', '?', '#', '@', ' ']))
        {
            errors.push(ConfigError::new(
                format!("{at}.redirect.host"),
                format!("invalid host {h:?}"),
            ));
        }
        if let Some(p) = &rd.path
            && (!p.starts_with('/') || p.contains(['?', '#']))
        {
            errors.push(ConfigError::new(
                format!("{at}.redirect.path"),
                format!("{p:?} must start with `/` and hold no `?` or `#`"),
            ));
        }
        if rd.path.is_some() && rd.prefix_rewrite.is_some() {
            errors.push(ConfigError::new(
                format!("{at}.redirect"),
                "give at most one of `path`, `prefix_rewrite`",
            ));
        }
        Action::Redirect(RedirectAction {
            status,
            scheme: rd.scheme.clone(),
            host: rd.host.clone(),
            port: rd.port,
            path: rd.path.clone(),
            rewrite: rewrite("redirect.prefix_rewrite", &rd.prefix_rewrite, errors),
            strip_query: rd.strip_query,
        })
    } else if let Some(d) = &r.direct_response {
        let status = match StatusCode::from_u16(d.status) {
            Ok(s) if (200..=599).contains(&d.status) => s,
            _ => {
                errors.push(ConfigError::new(
                    format!("{at}.direct_response.status"),
                    format!("{} is not a final HTTP status (200-599)", d.status),
                ));
                StatusCode::OK
            }
        };
        Action::Direct {
            status,
            body: Bytes::from(d.body.clone().unwrap_or_default()),
        }
    } else {
        let mut targets = Vec::new();
        for (j, t) in r.to.iter().enumerate() {
            let tat = format!("{at}.to[{j}]");
            if t.weight == 0 {
                errors.push(ConfigError::new(
                    format!("{tat}.weight"),
                    "weight must be at least 1",
                ));
            }
            match clusters.get(&t.cluster) {
                Some(c) => targets.push(Target {
                    cluster: c.clone(),
                    weight: t.weight.max(1),
                }),
                None => errors.push(ConfigError::new(
                    format!("{tat}.cluster"),
                    format!("unknown cluster {:?}", t.cluster),
                )),
            }
        }
        let total = targets
            .iter()
            .map(|t| t.weight)
            .fold(0u32, u32::saturating_add);
        if total == u32::MAX {
            errors.push(ConfigError::new(
                format!("{at}.to"),
                "weights add up to too much",
            ));
        }
        Action::Forward(Split { targets, total })
    };

    let host_rewrite = r
        .host_rewrite
        .as_ref()
        .and_then(|h| match HeaderValue::from_str(h) {
            Ok(v) if !h.is_empty() && !h.contains(['/', '?', '#', '@', ' ']) => Some(v),
            _ => {
                errors.push(ConfigError::new(
                    format!("{at}.host_rewrite"),
                    format!("invalid host {h:?}"),
                ));
                None
            }
        });
    if !matches!(action, Action::Forward(_))
        && (r.prefix_rewrite.is_some() || host_rewrite.is_some())
    {
        errors.push(ConfigError::new(
            at,
            "`prefix_rewrite` and `host_rewrite` apply to forwarded requests only (use `redirect.prefix_rewrite` / `redirect.host`)",
        ));
    }

    Route {
        name: String::new(),
        timeout: r.timeout.non_zero(),
        path_rewrite: rewrite("prefix_rewrite", &r.prefix_rewrite, errors),
        host_rewrite,
        request_headers: HeaderEditor::compile(
            &format!("{at}.request_headers"),
            &r.request_headers,
            errors,
        ),
        response_headers: HeaderEditor::compile(
            &format!("{at}.response_headers"),
            &r.response_headers,
            errors,
        ),
        retries: RetryPolicy::compile(&format!("{at}.retries"), &r.retries, errors),
        matcher,
        action,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_rewrites() {
        let rw = |len, with: &str, path: &str| {
            PathRewrite {
                prefix_len: len,
                with: with.into(),
            }
            .apply(path)
        };
        assert_eq!(rw(5, "/", "/api/users"), "/users");
        assert_eq!(rw(4, "/v2", "/api/users"), "/v2/users");
        assert_eq!(rw(5, "/v2/", "/api/users"), "/v2/users");
        assert_eq!(rw(4, "/", "/api"), "/");
        assert_eq!(rw(1, "/base/", "/x"), "/base/x");
    }

    #[test]
    fn redirect_locations() {
        let r = RedirectAction {
            status: StatusCode::MOVED_PERMANENTLY,
            scheme: Some("https".into()),
            host: None,
            port: None,
            path: None,
            rewrite: None,
            strip_query: false,
        };
        let from = RedirectFrom {
            scheme: "http",
            host: "example.com",
            port: Some(8080),
            path: "/a",
            query: Some("x=1"),
        };
        assert_eq!(r.location(&from), "https://example.com/a?x=1");
        let r = RedirectAction {
            scheme: None,
            port: Some(9000),
            strip_query: true,
            ..r
        };
        assert_eq!(r.location(&from), "http://example.com:9000/a");
    }

    #[test]
    fn split_is_weighted() {
        let c = Arc::new(Cluster::for_tests("a"));
        let s = Split {
            targets: vec![
                Target {
                    cluster: c.clone(),
                    weight: 9,
                },
                Target {
                    cluster: c,
                    weight: 1,
                },
            ],
            total: 10,
        };
        let firsts = (0..10_000).filter(|_| s.pick() == 0).count();
        assert!((8_700..9_300).contains(&firsts), "{firsts}");
    }
}
