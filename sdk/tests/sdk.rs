//! The SDK against its test host: configuration, headers, local responses, awaited callouts
//! and sleeps, bodies, metrics, shared data.

use std::rc::Rc;
use std::time::Duration;

use weft_sdk::metrics::Counter;
use weft_sdk::testing::{FilterTest, Verdict};
use weft_sdk::upstream::{self, CallRequest};
use weft_sdk::{Action, Body, Headers, HttpFilter, Plugin, Response, shared, time};

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    auth_cluster: String,
    #[serde(default)]
    delay_ms: u64,
}

struct Demo {
    config: Config,
}

impl Plugin for Demo {
    type Config = Config;
    type Filter = DemoFilter;
    fn configure(config: Config) -> Result<Self, String> {
        if config.delay_ms > 10_000 {
            return Err("delay_ms must be at most 10000".into());
        }
        Ok(Demo { config })
    }
    fn filter(self: &Rc<Self>) -> DemoFilter {
        DemoFilter {
            plugin: self.clone(),
        }
    }
}

struct DemoFilter {
    plugin: Rc<Demo>,
}

impl HttpFilter for DemoFilter {
    async fn on_request_headers(&self, headers: &mut Headers, _eos: bool) -> Action {
        Counter::new("requests_total").inc().ok();
        match headers.path().as_deref() {
            Some("/deny") => {
                return Action::respond(Response::new(403).header("x-why", "denied").body("no"));
            }
            Some("/bad-header") => {
                // Invalid names are refused by the SDK, never sent to the host.
                assert!(headers.set("bad name", "x").is_err());
                assert!(headers.set("x-ok", "bad\nvalue").is_err());
            }
            _ => {}
        }
        if self.plugin.config.delay_ms > 0 {
            time::sleep(Duration::from_millis(self.plugin.config.delay_ms)).await;
            headers.set("x-delayed", "yes").ok();
        }
        if !self.plugin.config.auth_cluster.is_empty() {
            let token = headers.get("authorization").unwrap_or_default();
            let call = CallRequest::get("/check").header("x-token", &token);
            match upstream::http_call(&self.plugin.config.auth_cluster, call).await {
                Ok(r) if r.status == 200 => {
                    headers
                        .set("x-user", r.header("x-user").unwrap_or("?"))
                        .ok();
                }
                Ok(r) => return Action::respond(Response::new(r.status).body("auth said no")),
                Err(_) => return Action::respond(Response::new(503).body("auth unavailable")),
            }
        }
        headers.set("x-seen", "1").ok();
        Action::Continue
    }

    async fn on_request_body(&self, body: &mut Body, end_of_stream: bool) -> Action {
        if !end_of_stream {
            return Action::Pause;
        }
        let text = body.bytes().unwrap_or_default();
        body.replace(&text.to_ascii_uppercase()).ok();
        Action::Continue
    }

    async fn on_response_headers(&self, headers: &mut Headers, _eos: bool) -> Action {
        headers.set("x-filtered", "demo").ok();
        Action::Continue
    }

    fn on_log(&self) {
        let n = shared::get("count")
            .ok()
            .flatten()
            .map_or(0, |(v, _)| v.first().copied().unwrap_or(0));
        shared::set("count", &[n + 1], None).ok();
    }

    const WANTS_BODIES: bool = true;
}

fn get(path: &str) -> [(&str, &str); 3] {
    [
        (":method", "GET"),
        (":path", path),
        (":authority", "example"),
    ]
}

#[test]
fn a_refused_configuration_says_why() {
    let e = FilterTest::new::<Demo>(r#"{"delay_ms": 99999}"#)
        .err()
        .expect("refused");
    assert!(e.contains("delay_ms must be at most 10000"), "{e}");
    let e = FilterTest::new::<Demo>(r#"{"nope": 1}"#)
        .err()
        .expect("refused");
    assert!(e.contains("unknown field `nope`"), "{e}");
    assert!(
        FilterTest::new::<Demo>("").is_ok(),
        "no config is the default"
    );
}

#[test]
fn headers_local_responses_bodies_and_metrics() {
    let t = FilterTest::new::<Demo>("{}").expect("config");
    let s = t.request(&get("/deny"));
    assert_eq!(s.request_headers(true), Verdict::Paused);
    let r = s.local_response().expect("a local response");
    assert_eq!(
        (r.status, r.header("x-why"), &r.body[..]),
        (403, Some("denied"), &b"no"[..])
    );
    s.finish();

    let s = t.request(&get("/bad-header"));
    assert_eq!(s.request_headers(false), Verdict::Continue);
    assert_eq!(s.request_header("x-seen").as_deref(), Some("1"));
    assert_eq!(s.request_body(b"hello ", false), Verdict::Paused);
    assert_eq!(s.request_body(b"world", true), Verdict::Continue);
    assert_eq!(s.request_body_bytes(), b"HELLO WORLD");
    assert_eq!(
        s.response_headers(&[(":status", "200")], true),
        Verdict::Continue
    );
    assert_eq!(s.response_header("x-filtered").as_deref(), Some("demo"));
    s.finish();
    assert_eq!(t.host().metric("requests_total"), Some(2));
    assert_eq!(t.host().shared("count"), Some(vec![2]));
}

#[test]
fn a_callout_is_awaited_and_the_request_resumes() {
    let t = FilterTest::new::<Demo>(r#"{"auth_cluster": "auth"}"#).expect("config");
    let s = t.request(&[
        (":method", "GET"),
        (":path", "/"),
        (":authority", "a"),
        ("authorization", "Bearer t0k"),
    ]);
    assert_eq!(
        s.request_headers(true),
        Verdict::Paused,
        "waits for the callout"
    );
    let calls = t.host().calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].cluster, "auth");
    assert_eq!(calls[0].header(":path"), Some("/check"));
    assert_eq!(calls[0].header("x-token"), Some("Bearer t0k"));
    assert!(!s.request_resumed());
    t.answer_call(calls[0].token, 200, &[("x-user", "alice")], b"");
    assert!(s.request_resumed());
    assert_eq!(s.request_header("x-user").as_deref(), Some("alice"));

    // A refusal becomes the filter's answer; a failed call its fallback.
    let s2 = t.request(&get("/"));
    s2.request_headers(true);
    let token = t.host().calls()[1].token;
    t.answer_call(token, 401, &[], b"");
    assert_eq!(s2.local_response().map(|r| r.status), Some(401));
    let s3 = t.request(&get("/"));
    s3.request_headers(true);
    t.fail_call(t.host().calls()[2].token);
    assert_eq!(s3.local_response().map(|r| r.status), Some(503));
}

#[test]
fn a_sleep_holds_the_request_without_blocking_others() {
    let t = FilterTest::new::<Demo>(r#"{"delay_ms": 100}"#).expect("config");
    let slow = t.request(&get("/"));
    assert_eq!(slow.request_headers(true), Verdict::Paused);
    assert!(!t.host().tick_period().is_zero(), "the SDK asked for ticks");
    let other = t.request(&get("/"));
    assert_eq!(other.request_headers(true), Verdict::Paused);
    t.advance(Duration::from_millis(90));
    assert!(!slow.request_resumed(), "not before its time");
    t.advance(Duration::from_millis(15));
    assert!(slow.request_resumed());
    assert!(other.request_resumed());
    assert_eq!(slow.request_header("x-delayed").as_deref(), Some("yes"));
    t.advance(Duration::from_millis(100));
    assert!(t.host().tick_period().is_zero(), "no sleep left: ticks off");
}

#[test]
fn a_request_that_ends_while_waiting_is_forgotten() {
    let t = FilterTest::new::<Demo>(r#"{"auth_cluster": "auth"}"#).expect("config");
    let s = t.request(&get("/"));
    s.request_headers(true);
    let token = t.host().calls()[0].token;
    let ctx = s.context;
    s.finish();
    t.answer_call(token, 200, &[], b"");
    assert!(
        !t.host().continued().iter().any(|(c, _)| *c == ctx),
        "a finished request is not resumed"
    );
}

struct GrpcCheck;

impl Plugin for GrpcCheck {
    type Config = ();
    type Filter = GrpcFilter;
    fn configure(_: ()) -> Result<Self, String> {
        Ok(GrpcCheck)
    }
    fn filter(self: &Rc<Self>) -> GrpcFilter {
        GrpcFilter
    }
}

struct GrpcFilter;

impl HttpFilter for GrpcFilter {
    async fn on_request_headers(&self, headers: &mut Headers, _eos: bool) -> Action {
        let answer = upstream::grpc_call(
            "authz",
            "authz.v1.Check",
            "Allow",
            &[("x-caller", "sdk")],
            b"\x0a\x03abc",
            Duration::from_secs(1),
        )
        .await;
        match answer {
            Ok(msg) if msg == b"\x08\x01" => {
                headers.set("x-allowed", "1").ok();
                Action::Continue
            }
            Ok(_) => Action::respond(Response::new(403)),
            Err(e) => Action::respond(Response::grpc(14, &e.to_string())),
        }
    }
}

#[test]
fn a_grpc_call_is_awaited_too() {
    let t = FilterTest::new::<GrpcCheck>("").expect("config");
    let s = t.request(&get("/"));
    assert_eq!(s.request_headers(true), Verdict::Paused);
    let call = t.host().calls().pop().expect("a gRPC call");
    assert_eq!(call.grpc_method.as_deref(), Some("authz.v1.Check/Allow"));
    assert_eq!(call.header("x-caller"), Some("sdk"));
    assert_eq!(call.body, b"\x0a\x03abc");
    t.answer_grpc(call.token, 0, b"\x08\x01");
    assert!(s.request_resumed());
    assert_eq!(s.request_header("x-allowed").as_deref(), Some("1"));

    let s = t.request(&get("/"));
    s.request_headers(true);
    let call = t.host().calls().pop().expect("a gRPC call");
    t.answer_grpc(call.token, 14, b"");
    let r = s.local_response().expect("answered");
    assert_eq!(r.grpc_status, Some(14));
}

/// A callback left at its default is named to the host once (`weft.skip_callbacks`), when its
/// default first runs; one the filter implements never is. `proxy_on_done` always answers
/// "done" here, so it is named as soon as the plugin is configured.
#[test]
fn callbacks_left_at_their_default_are_named_to_the_host_once() {
    // Demo implements all but the trailers callbacks and the response body one.
    let t = FilterTest::new::<Demo>("{}").expect("config");
    assert_eq!(t.host().skipped(), ["proxy_on_done"]);
    for _ in 0..2 {
        let s = t.request(&get("/"));
        assert_eq!(s.request_headers(false), Verdict::Continue);
        assert_eq!(s.request_body(b"x", true), Verdict::Continue);
        assert_eq!(s.request_trailers(&[("x-t", "1")]), Verdict::Continue);
        s.response_headers(&[(":status", "200")], false);
        s.response_body(b"y", true);
        assert_eq!(s.response_trailers(&[("x-t", "2")]), Verdict::Continue);
        s.finish();
    }
    assert_eq!(
        t.host().skipped(),
        [
            "proxy_on_done",
            "proxy_on_request_trailers",
            "proxy_on_response_body",
            "proxy_on_response_trailers"
        ]
    );

    // Only request headers: everything else is named, bodies because it does not want them.
    let t = FilterTest::new::<GrpcCheck>("").expect("config");
    let s = t.request(&get("/"));
    s.request_headers(false);
    let call = t.host().calls().pop().expect("a gRPC call");
    t.answer_grpc(call.token, 0, b"\x08\x01");
    assert!(s.request_resumed());
    assert_eq!(s.request_body(b"x", true), Verdict::Continue);
    s.response_headers(&[(":status", "200")], false);
    assert_eq!(s.response_body(b"y", true), Verdict::Continue);
    s.finish();
    let mut told = t.host().skipped();
    told.sort();
    assert_eq!(
        told,
        [
            "proxy_on_done",
            "proxy_on_log",
            "proxy_on_request_body",
            "proxy_on_response_body",
            "proxy_on_response_headers",
        ]
    );
}
