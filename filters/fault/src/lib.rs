//! # fault: fault injection (Istio's `fault`)
//!
//! Delays and aborts for a share of the requests a rule matches, to test how clients and the
//! mesh cope. The first rule whose `match` holds applies: its delay first (the request waits,
//! on a timer — the worker keeps serving), then its abort (the request is answered with the
//! status instead of going upstream). See `README.md` for the configuration reference.

use std::rc::Rc;
use std::time::Duration;

use serde::Deserialize;
use weft_sdk::config::RequestMatch;
use weft_sdk::metrics::Counter;
use weft_sdk::{Action, Headers, HttpFilter, Plugin, Response, random, time};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// For metrics and logs; default `rules[<index>]`.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub when: RequestMatch,
    #[serde(default)]
    pub delay: Option<Delay>,
    #[serde(default)]
    pub abort: Option<Abort>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delay {
    #[serde(deserialize_with = "weft_sdk::config::duration")]
    pub fixed: Duration,
    /// Share of the matching requests delayed, 0–100.
    #[serde(default = "hundred")]
    pub percentage: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Abort {
    /// The HTTP status answered (400–599).
    #[serde(default)]
    pub http_status: Option<u16>,
    /// The gRPC status answered to gRPC requests (1–16); default: from `http_status`.
    #[serde(default)]
    pub grpc_status: Option<u32>,
    #[serde(default = "hundred")]
    pub percentage: f64,
}

fn hundred() -> f64 {
    100.0
}

pub struct Fault {
    rules: Vec<(String, Rule)>,
}

fn check_percentage(at: &str, p: f64) -> Result<(), String> {
    if (0.0..=100.0).contains(&p) {
        Ok(())
    } else {
        Err(format!("{at}.percentage: {p} is not between 0 and 100"))
    }
}

impl Plugin for Fault {
    type Config = Config;
    type Filter = FaultFilter;

    fn configure(config: Config) -> Result<Self, String> {
        let mut rules = Vec::new();
        for (i, r) in config.rules.into_iter().enumerate() {
            let at = format!("rules[{i}]");
            if r.delay.is_none() && r.abort.is_none() {
                return Err(format!("{at}: give a delay, an abort, or both"));
            }
            if let Some(d) = &r.delay {
                check_percentage(&format!("{at}.delay"), d.percentage)?;
                if d.fixed > Duration::from_secs(3600) {
                    return Err(format!("{at}.delay.fixed: at most 1h"));
                }
            }
            if let Some(a) = &r.abort {
                check_percentage(&format!("{at}.abort"), a.percentage)?;
                match (a.http_status, a.grpc_status) {
                    (None, None) => {
                        return Err(format!("{at}.abort: give http_status or grpc_status"));
                    }
                    (Some(s), _) if !(200..=599).contains(&s) => {
                        return Err(format!("{at}.abort.http_status: {s} is not 200–599"));
                    }
                    (_, Some(g)) if !(1..=16).contains(&g) => {
                        return Err(format!("{at}.abort.grpc_status: {g} is not 1–16"));
                    }
                    _ => {}
                }
            }
            rules.push((r.name.clone().unwrap_or(at), r));
        }
        Ok(Fault { rules })
    }

    fn filter(self: &Rc<Self>) -> FaultFilter {
        FaultFilter {
            plugin: self.clone(),
        }
    }
}

pub struct FaultFilter {
    plugin: Rc<Fault>,
}

/// The gRPC status for an HTTP status, as gRPC's HTTP mapping says.
fn grpc_for(http: u16) -> u32 {
    match http {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => 14,
        _ => 2,
    }
}

impl HttpFilter for FaultFilter {
    async fn on_request_headers(&self, headers: &mut Headers, _eos: bool) -> Action {
        let Some((name, rule)) = self
            .plugin
            .rules
            .iter()
            .find(|(_, r)| r.when.matches(headers))
        else {
            return Action::Continue;
        };
        if let Some(d) = &rule.delay
            && random::chance(d.percentage)
        {
            Counter::new("fault_delays_total")
                .with("rule", name)
                .inc()
                .ok();
            time::sleep(d.fixed).await;
        }
        if let Some(a) = &rule.abort
            && random::chance(a.percentage)
        {
            Counter::new("fault_aborts_total")
                .with("rule", name)
                .inc()
                .ok();
            let grpc = headers
                .get("content-type")
                .is_some_and(|c| c.starts_with("application/grpc"));
            let response = if grpc {
                let status = a
                    .grpc_status
                    .unwrap_or_else(|| grpc_for(a.http_status.unwrap_or(503)));
                Response::grpc(status, "fault filter abort")
            } else {
                let status = a.http_status.unwrap_or(503);
                Response::new(status).body("fault filter abort")
            };
            return Action::respond(
                response
                    .header("x-weft-fault", name)
                    .details("fault_filter_abort"),
            );
        }
        Action::Continue
    }
}

weft_sdk::plugin!(Fault);

#[cfg(test)]
mod tests {
    use super::*;
    use weft_sdk::testing::{FilterTest, Verdict};

    fn get(path: &str) -> Vec<(&'static str, String)> {
        vec![
            (":method", "GET".into()),
            (":path", path.into()),
            (":authority", "svc".into()),
        ]
    }

    fn request<'a>(t: &'a FilterTest, h: &[(&str, String)]) -> weft_sdk::testing::TestStream<'a> {
        let pairs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        t.request(&pairs)
    }

    #[test]
    fn bad_configurations_are_refused() {
        for (config, why) in [
            (r#"{"rules":[{}]}"#, "give a delay, an abort, or both"),
            (
                r#"{"rules":[{"abort":{"http_status":503,"percentage":150}}]}"#,
                "rules[0].abort.percentage",
            ),
            (r#"{"rules":[{"abort":{"http_status":99}}]}"#, "not 200–599"),
            (r#"{"rules":[{"delay":{"fixed":"10"}}]}"#, "give a unit"),
            (
                r#"{"rules":[{"abort":{}}]}"#,
                "give http_status or grpc_status",
            ),
        ] {
            let e = FilterTest::new::<Fault>(config).err().expect(config);
            assert!(e.contains(why), "{config}: {e}");
        }
    }

    #[test]
    fn an_abort_answers_matching_requests_only() {
        let t = FilterTest::new::<Fault>(
            r#"{"rules":[{"name":"down","match":{"path":{"prefix":"/api"}},"abort":{"http_status":503}}]}"#,
        )
        .expect("config");
        let s = request(&t, &get("/api/x"));
        assert_eq!(s.request_headers(true), Verdict::Paused);
        let r = s.local_response().expect("aborted");
        assert_eq!(r.status, 503);
        assert_eq!(r.header("x-weft-fault"), Some("down"));
        let s = request(&t, &get("/other"));
        assert_eq!(s.request_headers(true), Verdict::Continue);
        assert_eq!(
            t.host().metric(r#"fault_aborts_total{rule="down"}"#),
            Some(1)
        );
    }

    #[test]
    fn grpc_requests_get_a_grpc_status() {
        let t = FilterTest::new::<Fault>(r#"{"rules":[{"abort":{"http_status":503}}]}"#)
            .expect("config");
        let mut h = get("/pkg.Svc/Call");
        h.push(("content-type", "application/grpc".into()));
        let s = request(&t, &h);
        s.request_headers(false);
        assert_eq!(s.local_response().and_then(|r| r.grpc_status), Some(14));
    }

    #[test]
    fn a_delay_holds_the_request_for_its_time() {
        let t =
            FilterTest::new::<Fault>(r#"{"rules":[{"delay":{"fixed":"200ms"}}]}"#).expect("config");
        let s = request(&t, &get("/"));
        assert_eq!(s.request_headers(true), Verdict::Paused);
        t.advance(Duration::from_millis(195));
        assert!(!s.request_resumed());
        t.advance(Duration::from_millis(10));
        assert!(s.request_resumed());
    }

    #[test]
    fn the_percentage_is_respected() {
        let t = FilterTest::new::<Fault>(
            r#"{"rules":[{"abort":{"http_status":500,"percentage":25}}]}"#,
        )
        .expect("config");
        let n = 4000;
        let mut aborted = 0;
        for _ in 0..n {
            let s = request(&t, &get("/"));
            if s.request_headers(true) == Verdict::Paused {
                aborted += 1;
            }
            s.finish();
        }
        // 25 % of 4000 = 1000, σ ≈ 27: ±5σ.
        assert!((865..=1135).contains(&aborted), "{aborted} of {n}");
    }
}
