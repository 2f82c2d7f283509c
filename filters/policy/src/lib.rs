//! # policy: access control (Mixer's precondition checks, Istio's AuthorizationPolicy)
//!
//! Ordered rules, each ALLOW or DENY, over the client's verified identity (mTLS SAN), its IP
//! (CIDR), the host, method, path (exact, prefix, glob), headers, and the claims of a JWT the
//! filter verifies itself (RS256 or ES256 against a JWKS given in the configuration; issuer,
//! audience, expiry). The first rule that matches decides; none: the default action. A denied
//! request gets 403 (gRPC: PERMISSION_DENIED) with `x-weft-policy: <rule>`; a request with a
//! token that does not verify gets 401 (gRPC: UNAUTHENTICATED) and `WWW-Authenticate`.
//! Decisions are counted per rule. See `README.md` for the configuration reference.

pub mod jwt;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::UNIX_EPOCH;

use serde::Deserialize;
use weft_sdk::config::{HeaderMatch, PathMatch, RequestMatch};
use weft_sdk::metrics::Counter;
use weft_sdk::{Action, Headers, HttpFilter, Plugin, Response, properties, time};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allow,
    #[default]
    Deny,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// What a request no rule matches gets.
    #[serde(default)]
    pub default: Decision,
    #[serde(default)]
    pub rules: Vec<Rule>,
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// `iss` the token must carry.
    #[serde(default)]
    pub issuer: Option<String>,
    /// One of these must be in `aud`.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// The keys: a JWKS document (`{"keys": [...]}`), as a map or its JSON text.
    pub jwks: serde_json::Value,
    /// Where the token is: this header, after `prefix`.
    #[serde(default = "default_header")]
    pub header: String,
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// Claims copied into request headers for the upstream: claim → header.
    #[serde(default)]
    pub forward_claims: BTreeMap<String, String>,
}

fn default_header() -> String {
    "authorization".into()
}
fn default_prefix() -> String {
    "Bearer ".into()
}
fn default_leeway() -> u64 {
    60
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// The `rule` label of the metrics and the `x-weft-policy` of a denial; default `rules[<i>]`.
    #[serde(default)]
    pub name: Option<String>,
    pub action: Decision,
    #[serde(default)]
    pub when: When,
}

/// Every condition given must hold.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct When {
    #[serde(default)]
    pub path: Option<PathMatch>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, HeaderMatch>,
    /// Route names of the proxy's route table.
    #[serde(default)]
    pub routes: Vec<String>,
    /// The client's verified mTLS identity: exact, or `prefix*`.
    #[serde(default)]
    pub identities: Vec<String>,
    /// The client's IP: addresses or CIDRs.
    #[serde(default)]
    pub source_ips: Vec<String>,
    /// The request carries a verified JWT (true) or none (false).
    #[serde(default)]
    pub authenticated: Option<bool>,
    /// JWT claims: claim (dotted for nested) → one of these values.
    #[serde(default)]
    pub claims: BTreeMap<String, OneOrMany>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn values(&self) -> &[String] {
        match self {
            OneOrMany::One(s) => std::slice::from_ref(s),
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    addr: IpAddr,
    bits: u8,
}

impl Cidr {
    fn parse(s: &str) -> Result<Cidr, String> {
        let (a, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| format!("invalid IP {a:?}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            Some(b) => b
                .parse::<u8>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("invalid prefix length in {s:?}"))?,
            None => max,
        };
        Ok(Cidr { addr, bits })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            _ => ip,
        };
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    }
}

struct CompiledRule {
    name: String,
    action: Decision,
    request: RequestMatch,
    identities: Vec<String>,
    source_ips: Vec<Cidr>,
    authenticated: Option<bool>,
    claims: Vec<(String, Vec<String>)>,
    counter: Counter,
}

struct Jwt {
    keys: jwt::Keys,
    expect: jwt::Expect,
    header: String,
    prefix: String,
    forward: Vec<(String, String)>,
}

pub struct Policy {
    default: Decision,
    rules: Vec<CompiledRule>,
    jwt: Option<Jwt>,
    default_counter: Counter,
    invalid_token: Counter,
}

fn decision_label(d: Decision) -> &'static str {
    match d {
        Decision::Allow => "allow",
        Decision::Deny => "deny",
    }
}

impl Plugin for Policy {
    type Config = Config;
    type Filter = PolicyFilter;

    fn configure(config: Config) -> Result<Self, String> {
        let jwt = match config.jwt {
            None => None,
            Some(j) => {
                let keys = jwt::Keys::from_jwks(&j.jwks).map_err(|e| format!("jwt.jwks: {e}"))?;
                if j.header.is_empty() {
                    return Err("jwt.header: must not be empty".into());
                }
                Some(Jwt {
                    keys,
                    expect: jwt::Expect {
                        issuer: j.issuer,
                        audiences: j.audiences,
                        leeway_secs: j.leeway_secs,
                    },
                    header: j.header.to_ascii_lowercase(),
                    prefix: j.prefix,
                    forward: j.forward_claims.into_iter().collect(),
                })
            }
        };
        let mut rules = Vec::new();
        for (i, r) in config.rules.into_iter().enumerate() {
            let at = format!("rules[{i}]");
            let name = r.name.unwrap_or_else(|| at.clone());
            let w = r.when;
            let source_ips = w
                .source_ips
                .iter()
                .map(|s| Cidr::parse(s))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{at}.when.source_ips: {e}"))?;
            if (w.authenticated.is_some() || !w.claims.is_empty()) && jwt.is_none() {
                return Err(format!(
                    "{at}.when: claims and authenticated need a jwt section"
                ));
            }
            rules.push(CompiledRule {
                counter: Counter::new("policy_decisions_total")
                    .with("rule", &name)
                    .with("action", decision_label(r.action)),
                name,
                action: r.action,
                request: RequestMatch {
                    path: w.path,
                    methods: w.methods,
                    hosts: w.hosts,
                    headers: w.headers,
                    routes: w.routes,
                },
                identities: w.identities,
                source_ips,
                authenticated: w.authenticated,
                claims: w
                    .claims
                    .into_iter()
                    .map(|(k, v)| (k, v.values().to_vec()))
                    .collect(),
            });
        }
        Ok(Policy {
            default: config.default,
            rules,
            jwt,
            default_counter: Counter::new("policy_decisions_total")
                .with("rule", "default")
                .with("action", decision_label(config.default)),
            invalid_token: Counter::new("policy_invalid_tokens_total"),
        })
    }

    fn filter(self: &Rc<Self>) -> PolicyFilter {
        PolicyFilter {
            plugin: self.clone(),
        }
    }
}

pub struct PolicyFilter {
    plugin: Rc<Policy>,
}

fn identity_matches(patterns: &[String], id: Option<&str>) -> bool {
    let Some(id) = id else {
        return false;
    };
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => id.starts_with(prefix),
        None => p == id,
    })
}

impl CompiledRule {
    fn matches(
        &self,
        headers: &Headers,
        identity: &mut Option<Option<String>>,
        claims: Option<&jwt::Claims>,
    ) -> bool {
        if !self.request.matches(headers) {
            return false;
        }
        if !self.identities.is_empty() {
            let id = identity.get_or_insert_with(properties::peer_identity);
            if !identity_matches(&self.identities, id.as_deref()) {
                return false;
            }
        }
        if !self.source_ips.is_empty() {
            let Some(ip) = properties::source_ip() else {
                return false;
            };
            if !self.source_ips.iter().any(|c| c.contains(ip)) {
                return false;
            }
        }
        if let Some(want) = self.authenticated
            && want != claims.is_some()
        {
            return false;
        }
        for (claim, allowed) in &self.claims {
            let Some(c) = claims else {
                return false;
            };
            let have = jwt::claim_values(c, claim);
            if !have.iter().any(|v| allowed.contains(v)) {
                return false;
            }
        }
        true
    }
}

fn is_grpc(headers: &Headers) -> bool {
    headers
        .get("content-type")
        .is_some_and(|c| c.starts_with("application/grpc"))
}

impl HttpFilter for PolicyFilter {
    async fn on_request_headers(&self, headers: &mut Headers, _eos: bool) -> Action {
        let p = &self.plugin;
        let mut claims = None;
        if let Some(j) = &p.jwt
            && let Some(value) = headers.get(&j.header)
        {
            let token = value.strip_prefix(j.prefix.as_str()).map(str::trim);
            let now = time::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let verified = match token {
                Some(t) => jwt::verify(t, &j.keys, &j.expect, now),
                None => Err(jwt::TokenError::Malformed),
            };
            match verified {
                Ok(c) => claims = Some(c),
                Err(e) => {
                    p.invalid_token.inc().ok();
                    let response = if is_grpc(headers) {
                        Response::grpc(16, &format!("invalid token: {e}"))
                    } else {
                        Response::new(401).body(format!("invalid token: {e}\n"))
                    };
                    return Action::respond(
                        response
                            .header(
                                "www-authenticate",
                                &format!(
                                    "Bearer error=\"invalid_token\", error_description=\"{e}\""
                                ),
                            )
                            .header("x-weft-policy", &format!("invalid_token: {e}"))
                            .details("policy_invalid_token"),
                    );
                }
            }
        }
        let mut identity = None;
        let (decision, name, counter) = match p
            .rules
            .iter()
            .find(|r| r.matches(headers, &mut identity, claims.as_ref()))
        {
            Some(r) => (r.action, r.name.as_str(), &r.counter),
            None => (p.default, "default", &p.default_counter),
        };
        counter.inc().ok();
        match decision {
            Decision::Allow => {
                // Forwarded claims come from the verified token only: a client's own header of
                // that name is removed.
                if let Some(j) = &p.jwt {
                    for (claim, header) in &j.forward {
                        let v = claims
                            .as_ref()
                            .map(|c| jwt::claim_values(c, claim))
                            .unwrap_or_default();
                        if v.is_empty() {
                            headers.remove(header).ok();
                        } else {
                            headers.set(header, &v.join(",")).ok();
                        }
                    }
                }
                Action::Continue
            }
            Decision::Deny => {
                let response = if is_grpc(headers) {
                    Response::grpc(7, "denied by policy")
                } else {
                    Response::new(403).body("denied by policy\n")
                };
                Action::respond(
                    response
                        .header("x-weft-policy", name)
                        .details("policy_denied"),
                )
            }
        }
    }
}

weft_sdk::plugin!(Policy);

#[cfg(test)]
mod tests;
