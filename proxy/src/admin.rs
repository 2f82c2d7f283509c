//! The admin listener: `/ready`, `/metrics`, `/config`, `/clusters`, `/listeners`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::json;
use std::sync::atomic::Ordering;
use tokio::net::TcpListener;

use crate::published::Published;
use crate::upstream::Breaker;

/// Where the proxy is in its life, as `/ready` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Lifecycle {
    Starting = 0,
    Ready = 1,
    Draining = 2,
}

/// A bound listener, as `/listeners` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ListenerInfo {
    pub name: String,
    /// The address actually bound (the real port when the config said 0).
    pub address: SocketAddr,
}

/// What the admin endpoints read.
#[derive(Debug)]
pub struct AdminState {
    pub shared: Arc<Published>,
    phase: AtomicU8,
    pub listeners: Mutex<Vec<ListenerInfo>>,
}

impl AdminState {
    pub fn new(shared: Arc<Published>) -> Self {
        AdminState {
            shared,
            phase: AtomicU8::new(Lifecycle::Starting as u8),
            listeners: Mutex::new(Vec::new()),
        }
    }

    pub fn set_phase(&self, p: Lifecycle) {
        self.phase.store(p as u8, Ordering::Release);
    }

    pub fn phase(&self) -> Lifecycle {
        match self.phase.load(Ordering::Acquire) {
            1 => Lifecycle::Ready,
            2 => Lifecycle::Draining,
            _ => Lifecycle::Starting,
        }
    }
}

type AdminResponse = Response<Full<Bytes>>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> AdminResponse {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json_response(value: &serde_json::Value) -> AdminResponse {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn clusters(state: &AdminState) -> serde_json::Value {
    let snap = state.shared.snapshot();
    let now = crate::upstream::now_nanos();
    let clusters: Vec<_> = snap
        .clusters
        .iter()
        .map(|c| {
            let set = c.endpoints();
            let endpoints: Vec<_> = set
                .endpoints
                .iter()
                .map(|e| {
                    let s = &e.stats;
                    let o = &e.outlier;
                    let ejected = o.ejected.load(Relaxed);
                    let health = if !e.healthy.load(Relaxed) {
                        "unhealthy"
                    } else if ejected {
                        "ejected"
                    } else {
                        "healthy"
                    };
                    json!({
                        "address": e.address.to_string(),
                        "hostname": e.hostname,
                        "weight": e.weight,
                        "health": health,
                        "active_health_ok": e.healthy.load(Relaxed),
                        "ejected": ejected,
                        "ejected_for_ms": if ejected {
                            o.ejected_until.load(Relaxed).saturating_sub(now) / 1_000_000
                        } else {
                            0
                        },
                        "ejections": o.ejections.load(Relaxed),
                        "consecutive_5xx": o.consecutive_5xx.load(Relaxed),
                        "consecutive_gateway_errors": o.consecutive_gateway.load(Relaxed),
                        "consecutive_connect_failures": o.consecutive_connect.load(Relaxed),
                        "ewma_latency_ms": (e.ewma_millis() * 1000.0).round() / 1000.0,
                        "stats": {
                            "requests_total": s.requests_total.load(Relaxed),
                            "requests_active": s.requests_active.load(Relaxed),
                            "requests_failed": s.requests_failed.load(Relaxed),
                            "connections_total": s.connections_total.load(Relaxed),
                            "connections_active": s.connections_active.load(Relaxed),
                            "connect_failures": s.connect_failures.load(Relaxed),
                        }
                    })
                })
                .collect();
            let b = &c.breakers;
            json!({
                "name": &*c.name,
                "protocol": c.protocol,
                "lb": c.lb,
                "endpoints_available": set.available(),
                "circuit_breakers_in_use": {
                    "connections": b.in_use(Breaker::Connections),
                    "pending": b.in_use(Breaker::Pending),
                    "requests": b.in_use(Breaker::Requests),
                    "retries": b.in_use(Breaker::Retries),
                },
                "endpoints": endpoints,
            })
        })
        .collect();
    json!({ "version": snap.version, "clusters": clusters })
}

async fn handle(
    state: Arc<AdminState>,
    req: Request<Incoming>,
) -> Result<AdminResponse, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n"));
    }
    let resp = match req.uri().path() {
        "/ready" => match state.phase() {
            Lifecycle::Ready => text(StatusCode::OK, "ready\n"),
            Lifecycle::Starting => text(StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
            Lifecycle::Draining => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        },
        "/metrics" => {
            let mut r = text(StatusCode::OK, state.shared.metrics.encode());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        "/config" => {
            let snap = state.shared.snapshot();
            let mut config = serde_json::to_value(&*snap.config).unwrap_or_default();
            if !snap.config.admin.as_ref().is_some_and(|a| a.show_secrets) {
                redact(&mut config);
            }
            json_response(&json!({
                "version": snap.version,
                "digest": snap.digest,
                "config": config,
            }))
        }
        "/clusters" => json_response(&clusters(&state)),
        "/listeners" => {
            let listeners = state
                .listeners
                .lock()
                .map(|l| l.clone())
                .unwrap_or_default();
            json_response(&json!({ "listeners": listeners }))
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /ready, /metrics, /config, /clusters, /listeners\n",
        ),
    };
    Ok(resp)
}

/// What `/config` shows instead of a value that may be secret.
const REDACTED: &str = "<redacted>";

/// Hides what may hold keys and tokens: filter and service configurations (`config`,
/// `vm_config`) and the values of routes' header edits (`set`, `add`). Names stay visible.
fn redact(config: &mut serde_json::Value) {
    for plugins in ["filters", "services"] {
        let Some(list) = config.get_mut(plugins).and_then(|f| f.as_array_mut()) else {
            continue;
        };
        for f in list {
            for field in ["config", "vm_config"] {
                if let Some(v) = f.get_mut(field) {
                    *v = json!(REDACTED);
                }
            }
        }
    }
    let Some(tables) = config.get_mut("routes").and_then(|r| r.as_object_mut()) else {
        return;
    };
    for route in tables
        .values_mut()
        .filter_map(|t| t.as_array_mut())
        .flatten()
    {
        for edits in ["request_headers", "response_headers"] {
            for op in ["set", "add"] {
                if let Some(values) = route
                    .get_mut(edits)
                    .and_then(|e| e.get_mut(op))
                    .and_then(|m| m.as_object_mut())
                {
                    for v in values.values_mut() {
                        *v = json!(REDACTED);
                    }
                }
            }
        }
    }
}

/// Admin connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;
/// Time a client gets to send a request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest an admin connection stays open (a scraper reconnects).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Serves the admin endpoints on `listener` until the task is dropped: at most
/// [`MAX_CONNECTIONS`] at once, each with a head deadline and a bounded life.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "admin connection refused: {MAX_CONNECTIONS} already open");
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(state.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_and_names_kept() {
        let config = crate::config::Config::from_yaml(
            r#"
routes:
  main:
    - to: [{ cluster: app }]
      request_headers: { set: { authorization: "Bearer s3cret" }, add: { x-key: k3y }, remove: [x-drop] }
      response_headers: { set: { x-served-by: weft } }
clusters:
  - { name: app, endpoints: ["127.0.0.1:9000"] }
filters:
  - { name: auth, module: a.wasm, config: { jwks: "private" }, vm_config: "vm secret" }
services:
  - { name: reporter, module: r.wasm, config: "token=t0ken", vm_config: "vm key" }
"#,
        )
        .expect("parses");
        let mut v = serde_json::to_value(&config).expect("json");
        redact(&mut v);
        let text = v.to_string();
        for secret in [
            "s3cret",
            "k3y",
            "private",
            "vm secret",
            "weft\"",
            "t0ken",
            "vm key",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        for name in [
            "authorization",
            "x-key",
            "x-drop",
            "x-served-by",
            "\"auth\"",
            "\"reporter\"",
        ] {
            assert!(text.contains(name), "{name} missing from {text}");
        }
    }
}
