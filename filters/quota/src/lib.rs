//! # quota: rate limits (Mixer's quota, Envoy's local rate limit)
//!
//! Token buckets keyed by a descriptor of the request (a header's value, the client's identity
//! or IP, the path, the host, the method, or nothing: one bucket for all), kept in the VM's
//! shared data so every worker draws from the same bucket (updates use compare-and-swap). A
//! request over any limit is answered 429 with `Retry-After` and the `RateLimit-*` headers;
//! allowed responses carry `RateLimit-*` too. Memory is bounded: each limit has at most
//! `max_keys` buckets (keys hash into them; a bucket that has refilled is reused). See
//! `README.md` for the configuration reference.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use serde::Deserialize;
use weft_sdk::config::RequestMatch;
use weft_sdk::metrics::Counter;
use weft_sdk::{Action, Headers, HttpFilter, Plugin, Response, decimal, properties, shared, time};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub limits: Vec<Limit>,
    /// Buckets per limit (keys beyond share buckets by hash).
    #[serde(default = "default_max_keys")]
    pub max_keys: u32,
}

fn default_max_keys() -> u32 {
    10_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    pub name: String,
    /// Requests allowed per `per` (also the burst: a full bucket).
    pub requests: u32,
    #[serde(deserialize_with = "weft_sdk::config::duration")]
    pub per: Duration,
    /// What makes two requests share a bucket; empty: one bucket for every request.
    #[serde(default)]
    pub key: Vec<KeyPart>,
    #[serde(default, rename = "match")]
    pub when: RequestMatch,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum KeyPart {
    /// A request header's value (a request without it is not limited by this limit).
    Header(String),
    /// The client's IP address.
    SourceIp(bool),
    /// The client's verified mTLS identity (a request without one is not limited).
    Identity(bool),
    /// The path, without the query.
    Path(bool),
    /// The host (`:authority`).
    Host(bool),
    Method(bool),
    /// The route (of the proxy's route table) the request matches.
    Route(bool),
}

pub struct Quota {
    limits: Vec<Limit>,
    max_keys: u32,
    /// Per-limit metric handles.
    allowed: Vec<Counter>,
    denied: Vec<Counter>,
    /// Distinct keys seen with their own `key` label, per VM (beyond: `_other`).
    labelled_keys: std::cell::RefCell<std::collections::HashSet<String>>,
}

const MAX_KEY_LABELS: usize = 100;

impl Plugin for Quota {
    type Config = Config;
    type Filter = QuotaFilter;

    fn configure(config: Config) -> Result<Self, String> {
        let mut names = std::collections::HashSet::new();
        for (i, l) in config.limits.iter().enumerate() {
            let at = format!("limits[{i}]");
            if l.name.is_empty() || !names.insert(l.name.clone()) {
                return Err(format!("{at}.name: missing or duplicate name {:?}", l.name));
            }
            if l.requests == 0 {
                return Err(format!("{at}.requests: must be at least 1"));
            }
            if l.per < Duration::from_millis(1) || l.per > Duration::from_secs(86_400) {
                return Err(format!("{at}.per: must be between 1ms and 24h"));
            }
            for (j, k) in l.key.iter().enumerate() {
                let off = matches!(
                    k,
                    KeyPart::SourceIp(false)
                        | KeyPart::Identity(false)
                        | KeyPart::Path(false)
                        | KeyPart::Host(false)
                        | KeyPart::Method(false)
                        | KeyPart::Route(false)
                );
                if off {
                    return Err(format!(
                        "{at}.key[{j}]: leave the part out instead of `false`"
                    ));
                }
                if let KeyPart::Header(h) = k
                    && h.is_empty()
                {
                    return Err(format!("{at}.key[{j}].header: empty header name"));
                }
            }
        }
        if config.max_keys == 0 || config.max_keys > 1_000_000 {
            return Err("max_keys: must be between 1 and 1000000".into());
        }
        let allowed = config
            .limits
            .iter()
            .map(|l| Counter::new("quota_allowed_total").with("limit", &l.name))
            .collect();
        let denied = config
            .limits
            .iter()
            .map(|l| Counter::new("quota_denied_total").with("limit", &l.name))
            .collect();
        Ok(Quota {
            limits: config.limits,
            max_keys: config.max_keys,
            allowed,
            denied,
            labelled_keys: Default::default(),
        })
    }

    fn filter(self: &Rc<Self>) -> QuotaFilter {
        QuotaFilter {
            plugin: self.clone(),
            report: Cell::new(None),
        }
    }
}

/// What the response says about the tightest limit.
#[derive(Debug, Clone, Copy)]
struct Report {
    limit: u32,
    remaining: u32,
    reset_secs: u64,
}

pub struct QuotaFilter {
    plugin: Rc<Quota>,
    report: Cell<Option<Report>>,
}

/// The descriptor of this request for `limit`; `None`: the limit does not apply.
fn descriptor(limit: &Limit, headers: &Headers) -> Option<String> {
    let mut key = String::new();
    for part in &limit.key {
        let v = match part {
            KeyPart::Header(h) => headers.get(h)?,
            KeyPart::SourceIp(_) => properties::source_ip()?.to_string(),
            KeyPart::Identity(_) => properties::peer_identity()?,
            KeyPart::Path(_) => headers
                .path()
                .map(|p| p.split('?').next().unwrap_or("").to_owned())?,
            KeyPart::Host(_) => headers.authority()?,
            KeyPart::Method(_) => headers.get(":method")?,
            KeyPart::Route(_) => properties::route_name()?,
        };
        key.push_str(&v);
        key.push('\u{1f}');
    }
    Some(key)
}

/// FNV-1a, 64 bits: where a key's bucket lives.
fn hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A bucket as stored: the key's hash, tokens, time of the last update (ns).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    owner: u64,
    tokens: f64,
    at: u128,
}

impl Bucket {
    fn decode(b: &[u8]) -> Option<Bucket> {
        if b.len() != 32 {
            return None;
        }
        Some(Bucket {
            owner: u64::from_le_bytes(b[0..8].try_into().ok()?),
            tokens: f64::from_le_bytes(b[8..16].try_into().ok()?),
            at: u128::from_le_bytes(b[16..32].try_into().ok()?),
        })
    }
    fn encode(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out[0..8].copy_from_slice(&self.owner.to_le_bytes());
        out[8..16].copy_from_slice(&self.tokens.to_le_bytes());
        out[16..32].copy_from_slice(&self.at.to_le_bytes());
        out
    }
}

/// Takes a token from `limit`'s bucket for `key`: `Ok(remaining)` or `Err(wait)`.
fn take(plugin: &Quota, index: usize, limit: &Limit, key: &str) -> Result<u32, Duration> {
    let capacity = f64::from(limit.requests);
    let rate = capacity / limit.per.as_secs_f64(); // tokens per second
    let h = hash(key.as_bytes());
    let slot = h % u64::from(plugin.max_keys);
    let mut name = String::with_capacity(24);
    name.push_str("quota/");
    decimal::push(&mut name, index as u64);
    name.push('/');
    decimal::push(&mut name, slot);
    for _ in 0..16 {
        let now = time::now_nanos();
        let (stored, cas) = match shared::get(&name) {
            Ok(Some((v, cas))) => (Bucket::decode(&v), Some(cas)),
            Ok(None) => (None, None),
            Err(_) => return Ok(limit.requests), // fail open: shared data unavailable
        };
        let mut b = match stored {
            Some(b) => {
                let elapsed = now.saturating_sub(b.at) as f64 / 1e9;
                let tokens = (b.tokens + elapsed * rate).min(capacity);
                Bucket {
                    // A full bucket belongs to whoever uses it next.
                    owner: if tokens >= capacity { h } else { b.owner },
                    tokens,
                    at: now,
                }
            }
            None => Bucket {
                owner: h,
                tokens: capacity,
                at: now,
            },
        };
        if b.tokens < 1.0 {
            let wait = (1.0 - b.tokens) / rate;
            return Err(Duration::from_secs_f64(wait.max(0.001)));
        }
        b.tokens -= 1.0;
        match shared::set(&name, &b.encode(), cas) {
            Ok(()) => return Ok(b.tokens.floor() as u32),
            Err(shared::SetError::CasMismatch) => continue,
            Err(shared::SetError::Host(_)) => return Ok(limit.requests),
        }
    }
    // Contended beyond reason: let it through rather than spin.
    Ok(0)
}

impl QuotaFilter {
    fn count(&self, denied: bool, index: usize, key: &str) {
        let p = &self.plugin;
        let c = if denied {
            &p.denied[index]
        } else {
            &p.allowed[index]
        };
        c.inc().ok();
        if denied {
            let label = {
                let mut seen = p.labelled_keys.borrow_mut();
                if seen.contains(key) || seen.len() < MAX_KEY_LABELS {
                    seen.insert(key.to_owned());
                    key.trim_end_matches('\u{1f}').replace('\u{1f}', "|")
                } else {
                    "_other".to_owned()
                }
            };
            Counter::new("quota_denied_by_key_total")
                .with("limit", &p.limits[index].name)
                .with("key", &label)
                .inc()
                .ok();
        }
    }
}

impl HttpFilter for QuotaFilter {
    async fn on_request_headers(&self, headers: &mut Headers, _eos: bool) -> Action {
        let mut tightest: Option<Report> = None;
        for (i, limit) in self.plugin.limits.iter().enumerate() {
            if !limit.when.matches(headers) {
                continue;
            }
            let Some(key) = descriptor(limit, headers) else {
                continue;
            };
            let per = limit.per.as_secs().max(1);
            match take(&self.plugin, i, limit, &key) {
                Ok(remaining) => {
                    self.count(false, i, &key);
                    if tightest.is_none_or(|t| remaining < t.remaining) {
                        tightest = Some(Report {
                            limit: limit.requests,
                            remaining,
                            reset_secs: per,
                        });
                    }
                }
                Err(wait) => {
                    self.count(true, i, &key);
                    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
                    let grpc = headers
                        .get("content-type")
                        .is_some_and(|c| c.starts_with("application/grpc"));
                    let base = if grpc {
                        Response::grpc(8, "quota exceeded")
                    } else {
                        Response::new(429).body("quota exceeded\n")
                    };
                    return Action::respond(
                        base.header("retry-after", &secs.to_string())
                            .header("ratelimit-limit", &limit.requests.to_string())
                            .header("ratelimit-remaining", "0")
                            .header("ratelimit-reset", &secs.to_string())
                            .header("x-weft-quota", &limit.name)
                            .details("quota_exceeded"),
                    );
                }
            }
        }
        self.report.set(tightest);
        Action::Continue
    }

    async fn on_response_headers(&self, headers: &mut Headers, _eos: bool) -> Action {
        if let Some(r) = self.report.get() {
            let d = decimal::string;
            headers.set("ratelimit-limit", &d(r.limit.into())).ok();
            headers
                .set("ratelimit-remaining", &d(r.remaining.into()))
                .ok();
            headers.set("ratelimit-reset", &d(r.reset_secs)).ok();
        }
        Action::Continue
    }
}

weft_sdk::plugin!(Quota);

#[cfg(test)]
mod tests {
    use super::*;
    use weft_sdk::testing::{FilterTest, Verdict};

    fn req<'a>(t: &'a FilterTest, key: &str) -> weft_sdk::testing::TestStream<'a> {
        t.request(&[
            (":method", "GET"),
            (":path", "/api/x?q=1"),
            (":authority", "svc"),
            ("x-api-key", key),
        ])
    }

    #[test]
    fn bad_configurations_are_refused() {
        for (c, why) in [
            (
                r#"{"limits":[{"name":"a","requests":0,"per":"1s"}]}"#,
                "limits[0].requests",
            ),
            (
                r#"{"limits":[{"name":"a","requests":1,"per":"0s"}]}"#,
                "limits[0].per",
            ),
            (
                r#"{"limits":[{"name":"a","requests":1,"per":"1s"},{"name":"a","requests":1,"per":"1s"}]}"#,
                "limits[1].name",
            ),
            (
                r#"{"limits":[{"name":"a","requests":1,"per":"1s","key":[{"nope":1}]}]}"#,
                "unknown variant",
            ),
        ] {
            let e = FilterTest::new::<Quota>(c).err().expect(c);
            assert!(e.contains(why), "{c}: {e}");
        }
    }

    #[test]
    fn a_key_gets_its_limit_then_429_then_refills() {
        let t = FilterTest::new::<Quota>(
            r#"{"limits":[{"name":"per-key","requests":3,"per":"1s","key":[{"header":"x-api-key"}]}]}"#,
        )
        .expect("config");
        for i in 0..3 {
            let s = req(&t, "alice");
            assert_eq!(s.request_headers(true), Verdict::Continue, "request {i}");
            s.response_headers(&[(":status", "200")], true);
            assert_eq!(
                s.response_header("ratelimit-remaining").as_deref(),
                Some(&*(2 - i).to_string())
            );
        }
        let s = req(&t, "alice");
        assert_eq!(s.request_headers(true), Verdict::Paused);
        let r = s.local_response().expect("429");
        assert_eq!(r.status, 429);
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_eq!(r.header("ratelimit-limit"), Some("3"));
        assert_eq!(r.header("ratelimit-remaining"), Some("0"));
        // Another key has its own bucket; a request without the header is not limited.
        assert_eq!(req(&t, "bob").request_headers(true), Verdict::Continue);
        let anon = t.request(&[(":method", "GET"), (":path", "/"), (":authority", "svc")]);
        assert_eq!(anon.request_headers(true), Verdict::Continue);
        // A third of a second later one token is back.
        t.advance(Duration::from_millis(340));
        assert_eq!(req(&t, "alice").request_headers(true), Verdict::Continue);
        assert_eq!(req(&t, "alice").request_headers(true), Verdict::Paused);
        assert_eq!(
            t.host().metric(r#"quota_denied_total{limit="per-key"}"#),
            Some(2)
        );
        assert_eq!(
            t.host().metric(r#"quota_allowed_total{limit="per-key"}"#),
            Some(5)
        );
    }

    #[test]
    fn memory_is_bounded_by_max_keys() {
        let t = FilterTest::new::<Quota>(
            r#"{"max_keys":8,"limits":[{"name":"k","requests":1000,"per":"1s","key":[{"header":"x-api-key"}]}]}"#,
        )
        .expect("config");
        for i in 0..500 {
            req(&t, &format!("key-{i}")).request_headers(true);
        }
        let used = (0..8)
            .filter(|slot| t.host().shared(&format!("quota/0/{slot}")).is_some())
            .count();
        assert!(used <= 8);
        assert!(t.host().shared("quota/0/8").is_none());
    }

    #[test]
    fn the_tightest_of_several_limits_decides() {
        let t = FilterTest::new::<Quota>(
            r#"{"limits":[
                {"name":"global","requests":100,"per":"1s"},
                {"name":"api","requests":1,"per":"1m","match":{"path":{"prefix":"/api"}}}
            ]}"#,
        )
        .expect("config");
        assert_eq!(req(&t, "a").request_headers(true), Verdict::Continue);
        let s = req(&t, "a");
        assert_eq!(s.request_headers(true), Verdict::Paused);
        let r = s.local_response().expect("429");
        assert_eq!(r.header("x-weft-quota"), Some("api"));
        assert_eq!(r.header("retry-after"), Some("60"));
    }
}
