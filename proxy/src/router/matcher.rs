//! Compiled request matchers: host, path, method, headers and query parameters.

use http::{HeaderMap, HeaderName, Method};
use regex::Regex;

use crate::config::{ConfigError, RouteMatch, ValueMatch, ValueRule};

/// What a matcher looks at: one canonical view of the request, computed once.
#[derive(Debug)]
pub struct RequestView<'a> {
    /// Host without port, lower-cased.
    pub host: &'a str,
    /// Canonical path, without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
}

#[derive(Debug)]
enum HostMatch {
    Any,
    Exact(String),
    /// `*.example.com` stored as `.example.com`.
    Suffix(String),
}

#[derive(Debug)]
pub enum PathMatch {
    Any,
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
enum ValueMatcher {
    Exact(String),
    Prefix(String),
    Regex(Regex),
    Present,
    Absent,
}

impl ValueMatcher {
    fn matches(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (ValueMatcher::Absent, v) => v.is_none(),
            (_, None) => false,
            (ValueMatcher::Present, Some(_)) => true,
            (ValueMatcher::Exact(e), Some(v)) => e == v,
            (ValueMatcher::Prefix(p), Some(v)) => v.starts_with(p.as_str()),
            (ValueMatcher::Regex(r), Some(v)) => r.is_match(v),
        }
    }
}

/// All conditions of one route.
#[derive(Debug)]
pub struct Matcher {
    hosts: Vec<HostMatch>,
    pub path: PathMatch,
    methods: Vec<Method>,
    headers: Vec<(HeaderName, ValueMatcher)>,
    query: Vec<(String, ValueMatcher)>,
}

/// Compiles an anchored regular expression, locating a syntax error at `path`.
pub fn compile_regex(path: &str, pattern: &str, errors: &mut Vec<ConfigError>) -> Option<Regex> {
    match regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(1 << 20)
        .build()
    {
        Ok(r) => Some(r),
        Err(e) => {
            let detail = e.to_string();
            // Keep the message to its last line: regex's own report repeats the pattern.
            let last = detail.lines().last().unwrap_or(&detail).trim();
            errors.push(ConfigError::new(
                path,
                format!("invalid regex {pattern:?}: {last}"),
            ));
            None
        }
    }
}

fn compile_value(
    path: &str,
    m: &ValueMatch,
    errors: &mut Vec<ConfigError>,
) -> Option<ValueMatcher> {
    let rule = match m {
        ValueMatch::Exact(s) => return Some(ValueMatcher::Exact(s.clone())),
        ValueMatch::Rule(r) => r,
    };
    let ValueRule {
        exact,
        prefix,
        regex,
        present,
    } = rule;
    let given = [
        exact.is_some(),
        prefix.is_some(),
        regex.is_some(),
        present.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if given != 1 {
        errors.push(ConfigError::new(
            path,
            "give exactly one of `exact`, `prefix`, `regex`, `present`",
        ));
        return None;
    }
    if let Some(e) = exact {
        return Some(ValueMatcher::Exact(e.clone()));
    }
    if let Some(p) = prefix {
        return Some(ValueMatcher::Prefix(p.clone()));
    }
    if let Some(r) = regex {
        return compile_regex(&format!("{path}.regex"), r, errors).map(ValueMatcher::Regex);
    }
    Some(if *present == Some(true) {
        ValueMatcher::Present
    } else {
        ValueMatcher::Absent
    })
}

fn compile_host(path: &str, h: &str, errors: &mut Vec<ConfigError>) -> Option<HostMatch> {
    let h = h.to_ascii_lowercase();
    if h == "*" {
        return Some(HostMatch::Any);
    }
    let (suffix, name) = match h.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, h.as_str()),
    };
    // A fully qualified name (one trailing dot) is the same host, as a request's is.
    let name = name.strip_suffix('.').unwrap_or(name);
    let valid = !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':' | b'[' | b']')
        });
    if !valid {
        errors.push(ConfigError::new(
            path,
            format!("invalid host {h:?}: expected a host name, `*.suffix` or `*`"),
        ));
        return None;
    }
    Some(if suffix {
        HostMatch::Suffix(format!(".{name}"))
    } else {
        HostMatch::Exact(name.to_owned())
    })
}

impl Matcher {
    /// Compiles a route's `match`; errors are located under `path` (`routes.main[1].match`).
    pub fn compile(path: &str, m: &RouteMatch, errors: &mut Vec<ConfigError>) -> Matcher {
        let mut hosts = Vec::new();
        if let Some(hs) = &m.host {
            for (i, h) in hs.as_slice().iter().enumerate() {
                let at = match hs {
                    crate::config::OneOrMany::One(_) => format!("{path}.host"),
                    crate::config::OneOrMany::Many(_) => format!("{path}.host[{i}]"),
                };
                if let Some(h) = compile_host(&at, h, errors) {
                    hosts.push(h);
                }
            }
        }
        if hosts.iter().any(|h| matches!(h, HostMatch::Any)) {
            hosts.clear();
        }

        let given = [&m.path, &m.path_prefix, &m.path_regex]
            .iter()
            .filter(|p| p.is_some())
            .count();
        if given > 1 {
            errors.push(ConfigError::new(
                path,
                "give at most one of `path`, `path_prefix`, `path_regex`",
            ));
        }
        let path_match = if let Some(p) = &m.path {
            check_path_literal(&format!("{path}.path"), p, errors);
            PathMatch::Exact(p.clone())
        } else if let Some(p) = &m.path_prefix {
            check_path_literal(&format!("{path}.path_prefix"), p, errors);
            if p == "/" {
                PathMatch::Any
            } else {
                PathMatch::Prefix(p.clone())
            }
        } else if let Some(r) = &m.path_regex {
            compile_regex(&format!("{path}.path_regex"), r, errors)
                .map(PathMatch::Regex)
                .unwrap_or(PathMatch::Any)
        } else {
            PathMatch::Any
        };

        let mut methods = Vec::new();
        if let Some(ms) = &m.method {
            for (i, name) in ms.as_slice().iter().enumerate() {
                let at = match ms {
                    crate::config::OneOrMany::One(_) => format!("{path}.method"),
                    crate::config::OneOrMany::Many(_) => format!("{path}.method[{i}]"),
                };
                match Method::from_bytes(name.as_bytes()) {
                    Ok(method) => methods.push(method),
                    Err(_) => errors.push(ConfigError::new(at, format!("invalid method {name:?}"))),
                }
            }
        }

        let mut headers = Vec::new();
        for (name, v) in &m.headers {
            let at = format!("{path}.headers.{name}");
            let Ok(header) = HeaderName::from_bytes(name.as_bytes()) else {
                errors.push(ConfigError::new(
                    at,
                    format!("invalid header name {name:?}"),
                ));
                continue;
            };
            if let Some(vm) = compile_value(&at, v, errors) {
                headers.push((header, vm));
            }
        }

        let mut query = Vec::new();
        for (name, v) in &m.query {
            let at = format!("{path}.query.{name}");
            if name.is_empty() {
                errors.push(ConfigError::new(at, "empty query parameter name"));
                continue;
            }
            if let Some(vm) = compile_value(&at, v, errors) {
                query.push((name.clone(), vm));
            }
        }

        Matcher {
            hosts,
            path: path_match,
            methods,
            headers,
            query,
        }
    }

    pub fn matches(&self, r: &RequestView<'_>) -> bool {
        if !self.hosts.is_empty()
            && !self.hosts.iter().any(|h| match h {
                HostMatch::Any => true,
                HostMatch::Exact(e) => e == r.host,
                HostMatch::Suffix(s) => r.host.len() > s.len() && r.host.ends_with(s.as_str()),
            })
        {
            return false;
        }
        let path_ok = match &self.path {
            PathMatch::Any => true,
            PathMatch::Exact(p) => r.path == p,
            PathMatch::Prefix(p) => r.path.starts_with(p.as_str()),
            PathMatch::Regex(re) => re.is_match(r.path),
        };
        if !path_ok {
            return false;
        }
        if !self.methods.is_empty() && !self.methods.contains(r.method) {
            return false;
        }
        // A CONNECT is a tunnel, not a request for a path: only a route that names the
        // method takes it (as Envoy's `connect_matcher`), never a catch-all.
        if *r.method == Method::CONNECT && self.methods.is_empty() {
            return false;
        }
        for (name, vm) in &self.headers {
            if !header_matches(r.headers, name, vm) {
                return false;
            }
        }
        for (name, vm) in &self.query {
            if !vm.matches(query_param(r.query, name)) {
                return false;
            }
        }
        true
    }
}

fn check_path_literal(at: &str, p: &str, errors: &mut Vec<ConfigError>) {
    if !p.starts_with('/') {
        errors.push(ConfigError::new(at, format!("{p:?} must start with `/`")));
    } else if p.contains(['?', '#']) {
        errors.push(ConfigError::new(
            at,
            format!("{p:?} must not contain `?` or `#` (match query parameters with `query`)"),
        ));
    }
}

/// Several values of one header are matched as one value joined by `,` (as Envoy does), so a
/// duplicated header cannot satisfy a rule its combined value would not.
fn header_matches(headers: &HeaderMap, name: &HeaderName, vm: &ValueMatcher) -> bool {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return vm.matches(None);
    };
    let Some(second) = values.next() else {
        return vm.matches(Some(first.to_str().unwrap_or("\u{fffd}")));
    };
    let mut joined = String::from(first.to_str().unwrap_or("\u{fffd}"));
    for v in std::iter::once(second).chain(values) {
        joined.push(',');
        joined.push_str(v.to_str().unwrap_or("\u{fffd}"));
    }
    vm.matches(Some(&joined))
}

/// The raw value of the first `name=` parameter of a query string (`name` alone gives "").
pub fn query_param<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OneOrMany;

    fn view<'a>(
        host: &'a str,
        path: &'a str,
        query: Option<&'a str>,
        h: &'a HeaderMap,
    ) -> RequestView<'a> {
        RequestView {
            host,
            path,
            query,
            method: &Method::GET,
            headers: h,
        }
    }

    fn compile(m: RouteMatch) -> Matcher {
        let mut errors = Vec::new();
        let matcher = Matcher::compile("r", &m, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        matcher
    }

    #[test]
    fn hosts() {
        let h = HeaderMap::new();
        let m = compile(RouteMatch {
            host: Some(OneOrMany::Many(vec![
                "API.example.com".into(),
                "*.svc.local".into(),
            ])),
            ..Default::default()
        });
        assert!(m.matches(&view("api.example.com", "/", None, &h)));
        assert!(m.matches(&view("a.b.svc.local", "/", None, &h)));
        assert!(!m.matches(&view("svc.local", "/", None, &h)));
        assert!(!m.matches(&view("example.com", "/", None, &h)));
    }

    #[test]
    fn paths_and_regex() {
        let h = HeaderMap::new();
        let m = compile(RouteMatch {
            path_regex: Some("/users/[0-9]+".into()),
            ..Default::default()
        });
        assert!(m.matches(&view("x", "/users/42", None, &h)));
        assert!(!m.matches(&view("x", "/users/42/x", None, &h)), "anchored");
        let m = compile(RouteMatch {
            path_prefix: Some("/api/".into()),
            ..Default::default()
        });
        assert!(m.matches(&view("x", "/api/v1", None, &h)));
        assert!(!m.matches(&view("x", "/apiv1", None, &h)));
    }

    #[test]
    fn headers_and_query() {
        let mut h = HeaderMap::new();
        h.append("x-canary", "1".parse().expect("value"));
        let m = compile(RouteMatch {
            headers: [
                ("x-canary".to_string(), ValueMatch::Exact("1".into())),
                (
                    "x-absent".to_string(),
                    ValueMatch::Rule(ValueRule {
                        present: Some(false),
                        ..Default::default()
                    }),
                ),
            ]
            .into(),
            query: [(
                "v".to_string(),
                ValueMatch::Rule(ValueRule {
                    regex: Some("[0-9]+".into()),
                    ..Default::default()
                }),
            )]
            .into(),
            ..Default::default()
        });
        assert!(m.matches(&view("x", "/", Some("a=b&v=12"), &h)));
        assert!(!m.matches(&view("x", "/", Some("v=1x"), &h)));
        h.append("x-canary", "1".parse().expect("value"));
        assert!(
            !m.matches(&view("x", "/", Some("v=1"), &h)),
            "duplicates join to `1,1`"
        );
    }

    #[test]
    fn errors_are_located() {
        let mut errors = Vec::new();
        Matcher::compile(
            "routes.main[0].match",
            &RouteMatch {
                path: Some("nope".into()),
                path_regex: Some("(".into()),
                method: Some(OneOrMany::One("G E T".into())),
                ..Default::default()
            },
            &mut errors,
        );
        let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            text[0],
            "routes.main[0].match: give at most one of `path`, `path_prefix`, `path_regex`"
        );
        assert_eq!(
            text[1],
            "routes.main[0].match.path: \"nope\" must start with `/`"
        );
        assert_eq!(
            text[2],
            "routes.main[0].match.method: invalid method \"G E T\""
        );
    }
}
