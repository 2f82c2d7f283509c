//! Helpers for filter configurations: durations written like weft's (`100ms`, `2s`, `1m`,
//! `1.5s`) and request matching shared by the built-in filters.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Parses `250ms`, `2s`, `1.5s`, `1m`, `1h`, `500us`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("invalid duration {text:?}: give a unit (ms, s, m, h)"))?;
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {text:?}"))?;
    let secs = match unit {
        "us" | "µs" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration {text:?}: unknown unit {unit:?}")),
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("invalid duration {text:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A serde field of type `Duration` written as text: `#[serde(deserialize_with = "weft_sdk::config::duration")]`.
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

/// How a path is matched.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PathMatch {
    /// The whole path (without the query).
    Exact(String),
    Prefix(String),
    /// `*` matches within a segment, `**` across segments: `/api/*/items/**`.
    Glob(String),
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Glob(g) => glob(g.as_bytes(), path.as_bytes()),
        }
    }
}

fn glob(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) if rest.first() == Some(&b'*') => {
            let rest = &rest[1..];
            (0..=text.len()).any(|i| glob(rest, &text[i..]))
        }
        Some((b'*', rest)) => {
            let seg = text.iter().position(|c| *c == b'/').unwrap_or(text.len());
            (0..=seg).any(|i| glob(rest, &text[i..]))
        }
        Some((c, rest)) => text.first() == Some(c) && glob(rest, &text[1..]),
    }
}

/// How a header is matched.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum HeaderMatch {
    /// The exact value.
    Exact(String),
    /// `{present: true}` (or false: absent), `{prefix: "…"}`.
    Rule(HeaderRule),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum HeaderRule {
    Present(bool),
    Prefix(String),
    Exact(String),
}

impl HeaderMatch {
    pub fn matches(&self, value: Option<&str>) -> bool {
        match self {
            HeaderMatch::Exact(v) | HeaderMatch::Rule(HeaderRule::Exact(v)) => {
                value == Some(v.as_str())
            }
            HeaderMatch::Rule(HeaderRule::Present(p)) => value.is_some() == *p,
            HeaderMatch::Rule(HeaderRule::Prefix(p)) => value.is_some_and(|v| v.starts_with(p)),
        }
    }
}

/// Which requests a rule is about: every condition given must hold (none given: every
/// request).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestMatch {
    #[serde(default)]
    pub path: Option<PathMatch>,
    /// Any of these methods.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Hosts (`:authority` without the port): exact or `*.suffix`.
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, HeaderMatch>,
    /// Route names (of the proxy's route table) the request matches.
    #[serde(default)]
    pub routes: Vec<String>,
}

impl RequestMatch {
    /// Whether the current request (its `headers`) matches.
    pub fn matches(&self, headers: &crate::Headers) -> bool {
        if let Some(p) = &self.path {
            let full = headers.path().unwrap_or_default();
            let path = full.split('?').next().unwrap_or("");
            if !p.matches(path) {
                return false;
            }
        }
        if !self.methods.is_empty() {
            let m = headers.get(":method").unwrap_or_default();
            if !self.methods.iter().any(|x| x.eq_ignore_ascii_case(&m)) {
                return false;
            }
        }
        if !self.hosts.is_empty() {
            let a = headers.authority().unwrap_or_default().to_ascii_lowercase();
            let host = match a.rsplit_once(':') {
                Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h.to_owned(),
                _ => a,
            };
            // Hosts are matched as hosts: case aside, `a.test.` is `a.test`.
            let host = host.strip_suffix('.').unwrap_or(&host);
            let ok = self.hosts.iter().any(|h| {
                let h = h.strip_suffix('.').unwrap_or(h);
                match h.strip_prefix("*.") {
                    Some(suffix) => host.ends_with(&format!(".{}", suffix.to_ascii_lowercase())),
                    None => h.eq_ignore_ascii_case(host),
                }
            });
            if !ok {
                return false;
            }
        }
        if !self.routes.is_empty() {
            let route = crate::properties::route_name().unwrap_or_default();
            if !self.routes.contains(&route) {
                return false;
            }
        }
        self.headers
            .iter()
            .all(|(name, m)| m.matches(headers.get(name).as_deref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1d").is_err());
    }

    #[test]
    fn globs() {
        let g = PathMatch::Glob("/api/*/items/**".into());
        assert!(g.matches("/api/v1/items/"));
        assert!(g.matches("/api/v1/items/a/b"));
        assert!(!g.matches("/api/v1/x/items/a"));
        assert!(PathMatch::Glob("/*.png".into()).matches("/a.png"));
        assert!(!PathMatch::Glob("/*.png".into()).matches("/a/b.png"));
    }
}
