//! An API-key check, as a Weft filter: the key in `x-api-key` is checked with an auth service
//! (an HTTP callout the filter awaits), the answer cached for a while, and the user it names
//! forwarded upstream in `x-api-user`. Copy this crate to start your own filter.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use serde::Deserialize;
use weft_sdk::metrics::Counter;
use weft_sdk::upstream::{self, CallRequest};
use weft_sdk::{Action, Headers, HttpFilter, Plugin, Response, time};

/// The filter's `config:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The cluster of the auth service (a cluster of weft's configuration).
    pub auth_cluster: String,
    /// What is asked of it: `GET <path>` with the key in `x-api-key`; 200 with `x-user` means
    /// yes, 401/403 no.
    #[serde(default = "default_path")]
    pub path: String,
    /// How long an answer (yes or no) is reused.
    #[serde(
        default = "default_ttl",
        deserialize_with = "weft_sdk::config::duration"
    )]
    pub cache_for: Duration,
    /// Most time the auth service gets.
    #[serde(
        default = "default_timeout",
        deserialize_with = "weft_sdk::config::duration"
    )]
    pub timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            auth_cluster: String::new(),
            path: default_path(),
            cache_for: default_ttl(),
            timeout: default_timeout(),
        }
    }
}

fn default_path() -> String {
    "/auth".into()
}
fn default_ttl() -> Duration {
    Duration::from_secs(30)
}
fn default_timeout() -> Duration {
    Duration::from_secs(1)
}

/// One VM's state: the configuration and the cache (per worker).
pub struct ApiKey {
    config: Config,
    /// key → (user, or None for a refused key; when the answer expires, ns).
    cache: RefCell<HashMap<String, (Option<String>, u128)>>,
}

impl Plugin for ApiKey {
    type Config = Config;
    type Filter = Check;

    fn configure(config: Config) -> Result<Self, String> {
        if config.auth_cluster.is_empty() {
            return Err("auth_cluster: required (the cluster of the auth service)".into());
        }
        if !config.path.starts_with('/') {
            return Err(format!("path: {:?} must start with /", config.path));
        }
        Ok(ApiKey {
            config,
            cache: RefCell::default(),
        })
    }

    fn filter(self: &Rc<Self>) -> Check {
        Check {
            plugin: self.clone(),
        }
    }
}

/// One request's check.
pub struct Check {
    plugin: Rc<ApiKey>,
}

fn deny(status: u16, why: &str) -> Action {
    Action::respond(
        Response::new(status)
            .header("x-weft-api-key", why)
            .body(format!("{why}\n")),
    )
}

impl HttpFilter for Check {
    async fn on_request_headers(&self, headers: &mut Headers, _end_of_stream: bool) -> Action {
        // Only what this filter sets may reach the upstream.
        headers.remove("x-api-user").ok();
        let Some(key) = headers.get("x-api-key") else {
            return deny(401, "missing x-api-key");
        };
        let now = time::now_nanos();
        let cached = self
            .plugin
            .cache
            .borrow()
            .get(&key)
            .filter(|(_, until)| *until > now)
            .map(|(user, _)| user.clone());
        let user = match cached {
            Some(user) => user,
            None => {
                let config = &self.plugin.config;
                let call = CallRequest::get(&config.path)
                    .header("x-api-key", &key)
                    .timeout(config.timeout);
                // The request waits here; the worker goes on serving others.
                let user = match upstream::http_call(&config.auth_cluster, call).await {
                    Ok(r) if r.status == 200 => Some(r.header("x-user").unwrap_or("").to_owned()),
                    Ok(r) if r.status == 401 || r.status == 403 => None,
                    _ => {
                        Counter::new("api_key_auth_errors_total").inc().ok();
                        return deny(503, "auth service unavailable");
                    }
                };
                let until = time::now_nanos() + config.cache_for.as_nanos();
                self.plugin
                    .cache
                    .borrow_mut()
                    .insert(key.clone(), (user.clone(), until));
                user
            }
        };
        match user {
            Some(u) => {
                headers.set("x-api-user", &u).ok();
                Counter::new("api_key_checks_total")
                    .with("result", "allowed")
                    .inc()
                    .ok();
                Action::Continue
            }
            None => {
                Counter::new("api_key_checks_total")
                    .with("result", "denied")
                    .inc()
                    .ok();
                deny(403, "invalid x-api-key")
            }
        }
    }
}

weft_sdk::plugin!(ApiKey);

#[cfg(test)]
mod tests {
    use super::*;
    use weft_sdk::testing::{FilterTest, Verdict};

    #[test]
    fn a_key_is_checked_once_then_cached() {
        let t = FilterTest::new::<ApiKey>(r#"{"auth_cluster":"auth","cache_for":"10s"}"#)
            .expect("config");
        let req = [
            (":method", "GET"),
            (":path", "/"),
            (":authority", "a"),
            ("x-api-key", "key-ann"),
        ];
        let s = t.request(&req);
        assert_eq!(
            s.request_headers(true),
            Verdict::Paused,
            "waits for the auth service"
        );
        let call = t.host().calls().pop().expect("a callout");
        assert_eq!(
            (call.cluster.as_str(), call.header(":path")),
            ("auth", Some("/auth"))
        );
        assert_eq!(call.header("x-api-key"), Some("key-ann"));
        t.answer_call(call.token, 200, &[("x-user", "ann")], b"");
        assert!(s.request_resumed());
        assert_eq!(s.request_header("x-api-user").as_deref(), Some("ann"));

        // Cached: no second callout.
        let s = t.request(&req);
        assert_eq!(s.request_headers(true), Verdict::Continue);
        assert_eq!(t.host().calls().len(), 1);
        // Expired: asked again.
        t.advance(Duration::from_secs(11));
        t.request(&req).request_headers(true);
        assert_eq!(t.host().calls().len(), 2);
    }

    #[test]
    fn missing_refused_and_unavailable() {
        let t = FilterTest::new::<ApiKey>(r#"{"auth_cluster":"auth"}"#).expect("config");
        let s = t.request(&[(":method", "GET"), (":path", "/"), (":authority", "a")]);
        s.request_headers(true);
        assert_eq!(s.local_response().map(|r| r.status), Some(401));

        let s = t.request(&[
            (":method", "GET"),
            (":path", "/"),
            (":authority", "a"),
            ("x-api-key", "bad"),
        ]);
        s.request_headers(true);
        t.answer_call(t.host().calls()[0].token, 403, &[], b"");
        assert_eq!(s.local_response().map(|r| r.status), Some(403));

        let s = t.request(&[
            (":method", "GET"),
            (":path", "/"),
            (":authority", "a"),
            ("x-api-key", "other"),
        ]);
        s.request_headers(true);
        t.fail_call(t.host().calls()[1].token);
        assert_eq!(s.local_response().map(|r| r.status), Some(503));

        assert!(FilterTest::new::<ApiKey>("{}").is_err());
    }
}
