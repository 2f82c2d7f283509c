//! The policy filter against the SDK's test host.

use serde_json::json;
use weft_sdk::testing::{FilterTest, Verdict};
use weft_testkit::jwt::{self, Alg};

use crate::Policy;

fn config(rules: serde_json::Value, default: &str) -> String {
    json!({
        "default": default,
        "jwt": { "issuer": "https://issuer.test", "audiences": ["api"], "jwks": jwt::jwks(),
                 "forward_claims": { "sub": "x-user" } },
        "rules": rules,
    })
    .to_string()
}

fn claims(extra: serde_json::Value) -> serde_json::Value {
    let mut c = json!({ "iss": "https://issuer.test", "aud": "api", "sub": "alice",
                        "exp": jwt::now() + 300, "roles": ["reader"] });
    if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    c
}

/// (verdict, status of the local response if any, x-weft-policy)
fn run(t: &FilterTest, headers: &[(&str, &str)]) -> (Verdict, Option<u16>, Option<String>) {
    let s = t.request(headers);
    let v = s.request_headers(true);
    let r = s.local_response();
    (
        v,
        r.as_ref().map(|r| r.status),
        r.and_then(|r| r.header("x-weft-policy").map(str::to_owned)),
    )
}

fn get(path: &str) -> Vec<(&'static str, String)> {
    vec![
        (":method", "GET".into()),
        (":path", path.into()),
        (":authority", "api.test".into()),
    ]
}

fn with<'a>(h: &'a [(&'static str, String)]) -> Vec<(&'a str, &'a str)> {
    h.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[test]
fn rules_decide_in_order_with_a_default() {
    let t = FilterTest::new::<Policy>(&config(
        json!([
            { "name": "no-admin", "action": "deny", "when": { "path": { "prefix": "/admin" } } },
            { "name": "reads", "action": "allow", "when": { "methods": ["GET", "HEAD"] } },
            { "name": "partner", "action": "allow",
              "when": { "headers": { "x-partner": { "present": true } }, "path": { "glob": "/api/*/orders" } } }
        ]),
        "deny",
    ))
    .expect("config");
    assert_eq!(run(&t, &with(&get("/items"))).0, Verdict::Continue);
    let (v, status, rule) = run(&t, &with(&get("/admin/users")));
    assert_eq!(
        (v, status, rule.as_deref()),
        (Verdict::Paused, Some(403), Some("no-admin"))
    );
    let post = [
        (":method", "POST"),
        (":path", "/api/v1/orders"),
        (":authority", "a"),
    ];
    assert_eq!(run(&t, &post).2.as_deref(), Some("default"));
    let partner = [
        (":method", "POST"),
        (":path", "/api/v1/orders"),
        (":authority", "a"),
        ("x-partner", "acme"),
    ];
    assert_eq!(run(&t, &partner).0, Verdict::Continue);
    assert_eq!(
        t.host()
            .metric(r#"policy_decisions_total{rule="no-admin",action="deny"}"#),
        Some(1)
    );
    assert_eq!(
        t.host()
            .metric(r#"policy_decisions_total{rule="default",action="deny"}"#),
        Some(1)
    );
}

#[test]
fn identities_and_source_ips() {
    let t = FilterTest::new::<Policy>(&config(
        json!([
            { "name": "mesh", "action": "allow",
              "when": { "identities": ["spiffe://weft.test/ns/prod/*"] } },
            { "name": "office", "action": "allow", "when": { "source_ips": ["10.1.0.0/16", "::1"] } }
        ]),
        "deny",
    ))
    .expect("config");
    t.host().set_property(
        &["connection", "uri_san_peer_certificate"],
        b"spiffe://weft.test/ns/prod/sa/web",
    );
    assert_eq!(run(&t, &with(&get("/"))).0, Verdict::Continue);
    t.host().set_property(
        &["connection", "uri_san_peer_certificate"],
        b"spiffe://weft.test/ns/dev/sa/web",
    );
    t.host()
        .set_property(&["source", "address"], b"10.2.0.1:5555");
    assert_eq!(run(&t, &with(&get("/"))).1, Some(403));
    t.host()
        .set_property(&["source", "address"], b"10.1.200.7:5555");
    assert_eq!(run(&t, &with(&get("/"))).0, Verdict::Continue);
    t.host().set_property(&["source", "address"], b"[::1]:80");
    assert_eq!(run(&t, &with(&get("/"))).0, Verdict::Continue);
}

#[test]
fn jwt_claims_are_verified_and_forwarded() {
    let t = FilterTest::new::<Policy>(&config(
        json!([
            { "name": "writers", "action": "allow",
              "when": { "methods": ["POST"], "claims": { "roles": ["writer", "admin"] } } },
            { "name": "signed-in", "action": "allow", "when": { "authenticated": true, "methods": ["GET"] } }
        ]),
        "deny",
    ))
    .expect("config");
    for alg in [Alg::Rs256, Alg::Es256] {
        let token = format!("Bearer {}", jwt::sign(alg, &claims(json!({}))));
        let s = t.request(&[
            (":method", "GET"),
            (":path", "/"),
            (":authority", "a"),
            ("authorization", &token),
            ("x-user", "forged"),
        ]);
        assert_eq!(s.request_headers(true), Verdict::Continue, "{alg:?}");
        assert_eq!(s.request_header("x-user").as_deref(), Some("alice"));
        // A reader cannot POST; a writer can.
        let post = |c: serde_json::Value| {
            let token = format!("Bearer {}", jwt::sign(alg, &claims(c)));
            run(
                &t,
                &[
                    (":method", "POST"),
                    (":path", "/"),
                    (":authority", "a"),
                    ("authorization", &token),
                ],
            )
        };
        assert_eq!(post(json!({})).1, Some(403));
        assert_eq!(post(json!({ "roles": ["writer"] })).0, Verdict::Continue);
    }
    // No token: not authenticated (denied by default), and a forged x-user is removed.
    let s = t.request(&[(":method", "GET"), (":path", "/"), (":authority", "a")]);
    assert_eq!(s.request_headers(true), Verdict::Paused);
}

#[test]
fn bad_tokens_get_401_with_the_reason() {
    let t = FilterTest::new::<Policy>(&config(json!([]), "allow")).expect("config");
    let cases = [
        (
            jwt::sign(Alg::Rs256, &claims(json!({ "exp": jwt::now() - 3600 }))),
            "token expired",
        ),
        (
            jwt::sign(Alg::Es256, &claims(json!({ "aud": "other" }))),
            "wrong audience",
        ),
        (
            jwt::sign(Alg::Rs256, &claims(json!({ "iss": "https://evil.test" }))),
            "wrong issuer",
        ),
        (
            jwt::sign(Alg::Es256, &claims(json!({ "nbf": jwt::now() + 3600 }))),
            "token not yet valid",
        ),
        ("not.a.token".to_owned(), "malformed token"),
        ("abc".to_owned(), "malformed token"),
    ];
    for (token, why) in cases {
        let auth = format!("Bearer {token}");
        let s = t.request(&[
            (":method", "GET"),
            (":path", "/"),
            (":authority", "a"),
            ("authorization", &auth),
        ]);
        assert_eq!(s.request_headers(true), Verdict::Paused, "{why}");
        let r = s.local_response().expect("401");
        assert_eq!(r.status, 401, "{why}");
        assert_eq!(
            r.header("x-weft-policy"),
            Some(&*format!("invalid_token: {why}"))
        );
        assert!(
            r.header("www-authenticate")
                .is_some_and(|w| w.contains("invalid_token"))
        );
    }
    // A signature that does not match: a valid token with its payload swapped.
    let good = jwt::sign(Alg::Rs256, &claims(json!({})));
    let other = jwt::sign(Alg::Rs256, &claims(json!({ "sub": "mallory" })));
    let parts: Vec<&str> = good.split('.').collect();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        other.split('.').nth(1).unwrap_or(""),
        parts[2]
    );
    let auth = format!("Bearer {forged}");
    let s = t.request(&[
        (":method", "GET"),
        (":path", "/"),
        (":authority", "a"),
        ("authorization", &auth),
    ]);
    s.request_headers(true);
    assert_eq!(
        s.local_response()
            .and_then(|r| r.header("x-weft-policy").map(str::to_owned))
            .as_deref(),
        Some("invalid_token: bad signature")
    );
    // alg none is never accepted.
    let none = format!(
        "Bearer {}.{}.",
        base64_url(br#"{"alg":"none"}"#),
        good.split('.').nth(1).unwrap_or("")
    );
    let s = t.request(&[
        (":method", "GET"),
        (":path", "/"),
        (":authority", "a"),
        ("authorization", &none),
    ]);
    s.request_headers(true);
    assert_eq!(s.local_response().map(|r| r.status), Some(401));
    assert_eq!(t.host().metric("policy_invalid_tokens_total"), Some(8));
}

fn base64_url(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

#[test]
fn bad_configurations_are_refused() {
    for (c, why) in [
        (
            json!({ "rules": [{ "action": "maybe" }] }),
            "unknown variant",
        ),
        (
            json!({ "rules": [{ "action": "allow", "when": { "source_ips": ["10.0.0.0/40"] } }] }),
            "rules[0].when.source_ips",
        ),
        (
            json!({ "rules": [{ "action": "allow", "when": { "claims": { "a": "b" } } }] }),
            "need a jwt section",
        ),
        (
            json!({ "jwt": { "jwks": { "keys": [] } } }),
            "jwt.jwks: the JWKS has no RS256 or ES256 signing key",
        ),
        (
            json!({ "jwt": { "jwks": { "keys": [{ "kty": "RSA", "n": "!!", "e": "AQAB" }] } } }),
            "jwt.jwks: keys[0]",
        ),
    ] {
        let e = FilterTest::new::<Policy>(&c.to_string())
            .err()
            .expect("refused");
        assert!(e.contains(why), "{c}: {e}");
    }
}

/// Hosts are matched as hosts: any case, with or without the trailing dot of a fully
/// qualified name, with or without a port.
#[test]
fn every_spelling_of_a_host_is_matched() {
    let t = FilterTest::new::<Policy>(&config(
        json!([
            { "name": "blocked", "action": "deny", "when": { "hosts": ["blocked.test"] } },
            { "name": "fqdn", "action": "deny", "when": { "hosts": ["*.fqdn.test."] } },
        ]),
        "allow",
    ))
    .expect("configures");
    for authority in [
        "blocked.test",
        "Blocked.TEST",
        "blocked.test.",
        "BLOCKED.test.:8080",
        "a.fqdn.test",
        "A.FQDN.test.:443",
    ] {
        let h = [
            (":method", "GET"),
            (":path", "/"),
            (":authority", authority),
        ];
        let (_, status, _) = run(&t, &h[..]);
        assert_eq!(status, Some(403), "{authority}");
    }
    let h = [
        (":method", "GET"),
        (":path", "/"),
        (":authority", "other.test."),
    ];
    assert_eq!(run(&t, &h[..]).1, None);
}
