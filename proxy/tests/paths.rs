//! One path for everyone: for many generated spellings of hostile paths, over HTTP/1.1 and
//! HTTP/2, the path a filter sees (`:path`, `request.path`, `request.url_path`), the route that
//! takes the request (and the `route_name` the filter reads) and the path the upstream receives
//! all agree — or the request is refused before anything looks at it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use weft_testkit::client::{self, get_with};
use weft_testkit::{Backend, Weft, filters};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

/// Pieces hostile paths are made of: every spelling of a separator, a dot, a letter.
const PIECES: &[&str] = &[
    "/",
    "//",
    ".",
    "..",
    "%2e",
    "%2E",
    "%2e%2E",
    "%2F",
    "%5C",
    "\\",
    "api",
    "admin",
    "%61",
    "%41dmin",
    "%61dmin",
    ";p=1",
    ";",
    "%3B",
    "%00",
    "%252e",
    "%25",
    "%",
    "%g1",
    "~",
    "%7e",
    "\u{e9}",
    "%C3%A9",
    "%c3%a9",
    "{",
    "\"",
    "|",
    "@",
    ":",
    "+",
    "%20",
    "?",
    "?q=../admin",
    "#x",
    "&",
    "=",
];

/// Paths that start like the routes below, then go astray.
const STARTS: &[&str] = &["/api/", "/api", "/", "//api//", "/%61pi/", "/api/x/../"];

fn generated(rng: &mut fastrand::Rng) -> String {
    let mut p = String::from(STARTS[rng.usize(..STARTS.len())]);
    for _ in 0..rng.usize(0..7) {
        p.push_str(PIECES[rng.usize(..PIECES.len())]);
    }
    p
}

/// The route the table below gives a canonical path.
fn expected_route(path: &str) -> &'static str {
    if path.starts_with("/api/admin") {
        "admin"
    } else if path.starts_with("/api/") {
        "api"
    } else {
        "rest"
    }
}

async fn start() -> (Weft, Backend) {
    let backend = Backend::start("b").await;
    let yaml = format!(
        r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0", routes: main, filters: [rewrite, record] }}
routes:
  main:
    - name: admin
      match: {{ path_prefix: /api/admin }}
      to: [{{ cluster: app }}]
      request_headers: {{ set: {{ x-route: admin }} }}
    - name: api
      match: {{ path_prefix: /api/ }}
      to: [{{ cluster: app }}]
      request_headers: {{ set: {{ x-route: api }} }}
    - name: rest
      to: [{{ cluster: app }}]
      request_headers: {{ set: {{ x-route: rest }} }}
clusters:
  - {{ name: app, endpoints: ["{}"] }}
filters:
  - {{ name: rewrite, module: "{}" }}
  - {{ name: record, module: "{}" }}
"#,
        backend.endpoint(),
        filters::path("headers"),
        filters::path("record"),
    );
    (Weft::start(WEFT, &yaml), backend)
}

/// What one request showed.
#[derive(Debug)]
enum Seen {
    /// Refused before routing: 400.
    Refused(u16, String),
    Forwarded {
        upstream: String,
        filter_path: String,
        request_path: String,
        url_path: String,
        filter_route: String,
        route: String,
    },
}

fn seen(status: u16, body: &[u8], error: Option<&str>) -> Seen {
    if status != 200 {
        return Seen::Refused(status, error.unwrap_or_default().to_owned());
    }
    let j: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(body)));
    let h = |n: &str| j["headers"][n].as_str().unwrap_or("<missing>").to_owned();
    Seen::Forwarded {
        upstream: j["path"].as_str().unwrap_or_default().to_owned(),
        filter_path: h("x-filter-path"),
        request_path: h("x-filter-request-path"),
        url_path: h("x-filter-url-path"),
        filter_route: h("x-filter-route"),
        route: h("x-route"),
    }
}

/// Checks one request's outcome; returns whether it was forwarded.
fn check(sent: &str, how: &str, seen: Seen) -> bool {
    match seen {
        Seen::Refused(status, cause) => {
            assert_eq!(
                status, 400,
                "{how} {sent:?}: refused with {status} ({cause})"
            );
            // hyper's own refusal of a request line it cannot parse names no cause.
            let by_parser = cause.is_empty() && how.starts_with("raw");
            assert!(
                by_parser || matches!(cause.as_str(), "invalid_path" | "bad_request"),
                "{how} {sent:?}: refused as {cause:?}"
            );
            false
        }
        Seen::Forwarded {
            upstream,
            filter_path,
            request_path,
            url_path,
            filter_route,
            route,
        } => {
            assert_eq!(filter_path, upstream, "{how} {sent:?}: filter vs upstream");
            assert_eq!(request_path, upstream, "{how} {sent:?}: request.path");
            let path_only = upstream.split('?').next().unwrap_or_default();
            assert_eq!(url_path, path_only, "{how} {sent:?}: request.url_path");
            assert_eq!(filter_route, route, "{how} {sent:?}: route_name vs route");
            assert_eq!(
                route,
                expected_route(path_only),
                "{how} {sent:?}: the route saw another path than {upstream:?}"
            );
            true
        }
    }
}

/// Sends `GET <target>` as raw bytes and reads the response up to the connection's close.
fn raw_get(addr: SocketAddr, target: &[u8], extra: &str) -> (u16, Vec<u8>, Option<String>) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut req = b"GET ".to_vec();
    req.extend_from_slice(target);
    req.extend_from_slice(
        format!(" HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n").as_bytes(),
    );
    s.write_all(&req).expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let Some((head, _)) = text.split_once("\r\n\r\n") else {
        // Closed without an answer: hyper refused the request line itself.
        return (400, Vec::new(), Some("bad_request".into()));
    };
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let error = head.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("x-weft-error: ")
            .map(str::to_owned)
    });
    let body = out[head.len() + 4..].to_vec();
    // Chunked bodies: the backend answers with a length, so the body is whole.
    (status, body, error)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_routes_and_upstream_see_one_path_for_every_spelling() {
    let (weft, backend) = start().await;
    let addr = weft.addr("main");
    let h1 = client::http1();
    let h2 = client::h2c();
    let mut rng = fastrand::Rng::with_seed(0xba1ad);
    let (mut forwarded, mut respelled, mut refused) = (0, 0, 0);
    for i in 0..400 {
        let target = generated(&mut rng);
        // Half of them set the path from a filter instead (the `headers` filter copies
        // `x-rewrite-path` into `:path`): a filter's path is made canonical too.
        let by_filter = i % 2 == 1;
        let (sent, rewrite) = if by_filter {
            ("/start".to_owned(), Some(target.clone()))
        } else {
            (target.clone(), None)
        };
        let url = format!("http://{addr}{sent}");
        let parsed = url.parse::<http::Uri>().is_ok()
            && rewrite
                .as_ref()
                .is_none_or(|r| http::HeaderValue::from_str(r).is_ok());
        let headers: Vec<(&str, &str)> = rewrite
            .as_deref()
            .map(|r| vec![("x-rewrite-path", r)])
            .unwrap_or_default();
        let mut outcomes = Vec::new();
        if parsed {
            for (how, c) in [("HTTP/1.1", &h1), ("HTTP/2", &h2)] {
                let r = get_with(c, &url, &headers)
                    .await
                    .unwrap_or_else(|e| panic!("{how} {target:?}: {e}"));
                outcomes.push((
                    how,
                    seen(r.status.as_u16(), &r.body, r.header("x-weft-error")),
                ));
            }
        } else if !by_filter {
            // What a client library would not send: raw bytes on the wire.
            let t = target.clone();
            let (status, body, error) =
                tokio::task::spawn_blocking(move || raw_get(addr, t.as_bytes(), ""))
                    .await
                    .expect("raw request");
            outcomes.push(("raw HTTP/1.1", seen(status, &body, error.as_deref())));
        }
        for (how, s) in outcomes {
            let how = if by_filter {
                format!("{how}, set by a filter,")
            } else {
                how.to_owned()
            };
            if let Seen::Forwarded { upstream, .. } = &s
                && *upstream != target
            {
                respelled += 1;
            }
            if check(&target, &how, s) {
                forwarded += 1;
            } else {
                refused += 1;
            }
        }
    }
    // The test means something only if both outcomes, and many re-spellings, happened.
    assert!(forwarded > 200, "{forwarded} forwarded");
    assert!(refused > 50, "{refused} refused");
    assert!(
        respelled > 100,
        "{respelled} forwarded under another spelling"
    );
    assert!(backend.requests() >= forwarded as u64);
}

/// `route_name` asked before the request is routed follows the head as the filters change it:
/// the match found for one head is not served for another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_name_follows_a_path_a_filter_changes_after_reading_it() {
    let (weft, _backend) = start().await;
    let addr = weft.addr("main");
    let h1 = client::http1();
    for (sent, set, first, then) in [
        ("/api/x", "/api/admin/y", "api", "admin"),
        ("/api/admin/y", "/other", "admin", "rest"),
        ("/z", "/z", "rest", "rest"),
    ] {
        let url = format!("http://{addr}{sent}");
        let r = get_with(&h1, &url, &[("x-record-path", set)])
            .await
            .unwrap_or_else(|e| panic!("{sent}: {e}"));
        assert_eq!(r.status.as_u16(), 200, "{sent}");
        let j: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON");
        let h = |n: &str| j["headers"][n].as_str().unwrap_or("<missing>").to_owned();
        assert_eq!(h("x-filter-route-first"), first, "{sent} before the change");
        assert_eq!(h("x-filter-route"), then, "{sent} after :path became {set}");
        assert_eq!(h("x-route"), then, "{sent}: the route that took it");
        assert_eq!(j["path"], set, "{sent}: the path upstream");
    }
}
