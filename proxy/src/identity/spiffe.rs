//! SPIFFE IDs (`spiffe://<trust-domain>/<path>`), parsed strictly as the SPIFFE ID
//! specification says: one spelling per identity, so an identity compared as a string is
//! compared as an identity.

use std::fmt;

/// The longest SPIFFE ID accepted, in bytes (the specification's limit).
pub const MAX_LEN: usize = 2048;
/// The longest trust domain name, in bytes.
pub const MAX_TRUST_DOMAIN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    /// Empty, or `/segment/…`.
    path: String,
}

fn trust_domain_char(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'-' | b'_')
}

fn path_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_')
}

/// Checks a trust domain name: lowercase letters, digits, `.`, `-`, `_`; not empty.
pub fn check_trust_domain(td: &str) -> Result<(), String> {
    if td.is_empty() {
        return Err("the trust domain is empty".into());
    }
    if td.len() > MAX_TRUST_DOMAIN {
        return Err(format!(
            "the trust domain is longer than {MAX_TRUST_DOMAIN} bytes"
        ));
    }
    if let Some(c) = td.bytes().find(|c| !trust_domain_char(*c)) {
        return Err(format!(
            "the trust domain {td:?} has {:?}: only lowercase letters, digits, '.', '-' and '_' are allowed",
            c as char
        ));
    }
    Ok(())
}

/// Checks one path segment: not empty, not `.` or `..`, letters, digits, `.`, `-`, `_`.
pub fn check_segment(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("a path segment is empty".into());
    }
    if s == "." || s == ".." {
        return Err(format!("the path segment {s:?} is not allowed"));
    }
    if let Some(c) = s.bytes().find(|c| !path_char(*c)) {
        return Err(format!(
            "the path segment {s:?} has {:?}: only letters, digits, '.', '-' and '_' are allowed",
            c as char
        ));
    }
    Ok(())
}

impl SpiffeId {
    /// Parses `spiffe://td/path`. Refused: another scheme (any case but lowercase), an empty or
    /// uppercase trust domain, a port, user info, a query, a fragment, percent-encoding, empty,
    /// `.` or `..` segments, a trailing `/`, anything over [`MAX_LEN`] bytes.
    pub fn parse(s: &str) -> Result<SpiffeId, String> {
        if s.len() > MAX_LEN {
            return Err(format!("a SPIFFE ID is at most {MAX_LEN} bytes"));
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| format!("{s:?} is not a SPIFFE ID (spiffe://<trust-domain>/<path>)"))?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        check_trust_domain(td).map_err(|e| format!("{s:?}: {e}"))?;
        if !path.is_empty() {
            for seg in path[1..].split('/') {
                check_segment(seg).map_err(|e| format!("{s:?}: {e}"))?;
            }
        }
        Ok(SpiffeId {
            trust_domain: td.to_owned(),
            path: path.to_owned(),
        })
    }

    /// `spiffe://<td>/ns/<namespace>/sa/<service-account>`.
    pub fn workload(td: &str, namespace: &str, account: &str) -> Result<SpiffeId, String> {
        check_trust_domain(td)?;
        check_segment(namespace).map_err(|e| format!("namespace: {e}"))?;
        check_segment(account).map_err(|e| format!("service account: {e}"))?;
        Ok(SpiffeId {
            trust_domain: td.to_owned(),
            path: format!("/ns/{namespace}/sa/{account}"),
        })
    }

    /// An ID of the trust domain with `path` (`/a/b`), each segment checked.
    pub fn with_path(td: &str, path: &[&str]) -> Result<SpiffeId, String> {
        check_trust_domain(td)?;
        let mut p = String::new();
        for seg in path {
            check_segment(seg)?;
            p.push('/');
            p.push_str(seg);
        }
        Ok(SpiffeId {
            trust_domain: td.to_owned(),
            path: p,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Empty or `/…`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `(namespace, service account)` of a `/ns/<ns>/sa/<sa>` ID.
    pub fn workload_parts(&self) -> Option<(&str, &str)> {
        let mut it = self.path.strip_prefix('/')?.split('/');
        match (it.next(), it.next(), it.next(), it.next(), it.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_ids_round_trip() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").expect("valid");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.workload_parts(), Some(("shop", "web")));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(
            SpiffeId::workload("cluster.local", "shop", "web").expect("valid"),
            id
        );
        assert_eq!(
            SpiffeId::parse("spiffe://td").expect("valid").path(),
            "",
            "a trust domain's own ID has no path"
        );
    }

    /// Every other spelling of an identity is refused, so two IDs that compare unequal as
    /// strings are different identities.
    #[test]
    fn other_spellings_are_refused() {
        for bad in [
            "",
            "spiffe://",
            "spiffe:///ns/a/sa/b",
            "SPIFFE://td/ns/a/sa/b",
            "Spiffe://td/ns/a/sa/b",
            "https://td/ns/a/sa/b",
            "spiffe://TD/ns/a/sa/b",
            "spiffe://td:443/ns/a/sa/b",
            "spiffe://user@td/ns/a/sa/b",
            "spiffe://td/ns/a/sa/b/",
            "spiffe://td//ns/a/sa/b",
            "spiffe://td/ns/./sa/b",
            "spiffe://td/ns/../sa/b",
            "spiffe://td/ns/a/sa/b?x=1",
            "spiffe://td/ns/a/sa/b#f",
            "spiffe://td/ns/%61/sa/b",
            "spiffe://td/ns/a b/sa/b",
            "spiffe://td/ns/a/sa/\u{e9}",
            "spiffe://td/ns/a/sa/b\0",
            " spiffe://td/ns/a/sa/b",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let long = format!("spiffe://td/{}", "a".repeat(MAX_LEN));
        assert!(SpiffeId::parse(&long).is_err());
        assert!(SpiffeId::workload("td", "..", "b").is_err());
        assert!(SpiffeId::workload("td", "a/b", "c").is_err());
        assert!(SpiffeId::workload("Td", "a", "c").is_err());
    }

    #[test]
    fn only_ns_sa_paths_are_workloads() {
        for p in [
            "spiffe://td/ns/a",
            "spiffe://td/ns/a/sa/b/c",
            "spiffe://td/sa/b/ns/a",
        ] {
            assert_eq!(SpiffeId::parse(p).expect("valid").workload_parts(), None);
        }
    }
}
