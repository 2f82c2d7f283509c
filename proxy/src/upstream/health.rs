//! Active health checking, and the per-cluster maintenance task that runs it with the other
//! periodic work (re-admitting ejected endpoints, DNS refresh). One task per cluster, on the
//! control thread; replaced when a reload replaces the cluster.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::tls::io::MaybeTls;

use super::{Cluster, Endpoint, discovery};
use crate::config::{ConfigError, HealthCheck};

/// Checks a `health_check` section.
pub fn validate(at: &str, hc: &HealthCheck, errors: &mut Vec<ConfigError>) {
    match (&hc.http, &hc.tcp) {
        (Some(_), Some(_)) | (None, None) => {
            errors.push(ConfigError::new(at, "give exactly one of `http`, `tcp`"))
        }
        (Some(h), None) => {
            if !h.path.starts_with('/') {
                errors.push(ConfigError::new(
                    format!("{at}.http.path"),
                    format!("{:?} must start with `/`", h.path),
                ));
            }
            if let Some(host) = &h.host
                && http::HeaderValue::from_str(host).is_err()
            {
                errors.push(ConfigError::new(
                    format!("{at}.http.host"),
                    format!("invalid host {host:?}"),
                ));
            }
            if h.expected_statuses.is_empty() {
                errors.push(ConfigError::new(
                    format!("{at}.http.expected_statuses"),
                    "must list at least one status",
                ));
            }
        }
        (None, Some(_)) => {}
    }
    if hc.interval.0 < Duration::from_millis(100) {
        errors.push(ConfigError::new(
            format!("{at}.interval"),
            "must be at least 100ms",
        ));
    }
    if hc.timeout.0.is_zero() {
        errors.push(ConfigError::new(
            format!("{at}.timeout"),
            "must be greater than 0",
        ));
    }
    if hc.healthy_threshold == 0 {
        errors.push(ConfigError::new(
            format!("{at}.healthy_threshold"),
            "must be at least 1",
        ));
    }
    if hc.unhealthy_threshold == 0 {
        errors.push(ConfigError::new(
            format!("{at}.unhealthy_threshold"),
            "must be at least 1",
        ));
    }
}

/// Everything periodic a cluster needs, until the task is aborted (the cluster was replaced).
pub async fn maintain(cluster: Arc<Cluster>) {
    let readmit = async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            cluster.readmit();
        }
    };
    let checks = async {
        match &cluster.health_check {
            Some(hc) => check_forever(&cluster, hc).await,
            None => std::future::pending().await,
        }
    };
    tokio::join!(readmit, checks, discovery::refresh(&cluster));
}

async fn check_forever(cluster: &Cluster, hc: &HealthCheck) {
    loop {
        let set = cluster.endpoints();
        let rounds = set.endpoints.iter().map(|e| async move {
            let result = check(e, cluster.tls.as_deref(), hc).await;
            apply(cluster, e, hc, result);
        });
        futures_util::future::join_all(rounds).await;
        let jitter = fastrand::u64(..=hc.jitter.0.as_millis() as u64);
        tokio::time::sleep(hc.interval.0 + Duration::from_millis(jitter)).await;
    }
}

/// One check of one endpoint (an HTTP check over TLS when the cluster speaks TLS).
async fn check(
    endpoint: &Endpoint,
    tls: Option<&crate::tls::client::TlsClient>,
    hc: &HealthCheck,
) -> Result<(), String> {
    let addr = endpoint.address;
    let probe = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let Some(http) = &hc.http else {
            return Ok(());
        };
        let io = match tls {
            None => MaybeTls::Plain(stream),
            Some(tls) => {
                let alpn = crate::tls::client::Alpn::Http1;
                let s = tls
                    .connect(
                        stream,
                        endpoint.hostname.as_deref(),
                        addr,
                        alpn,
                        hc.timeout.0,
                    )
                    .await
                    .map_err(|(e, reason)| format!("TLS ({reason}): {e}"))?;
                MaybeTls::Tls(Box::new(s))
            }
        };
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let host = http.host.clone().unwrap_or_else(|| addr.to_string());
        let req = Request::get(http.path.as_str())
            .header(header::HOST, host)
            .header(header::USER_AGENT, "weft-health-check")
            .header(header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("request: {e}"))?;
        let resp = tx
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status().as_u16();
        if http.expected_statuses.iter().any(|r| r.contains(status)) {
            Ok(())
        } else {
            Err(format!("status {status}"))
        }
    };
    match tokio::time::timeout(hc.timeout.0, probe).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {:?}", hc.timeout.0)),
    }
}

fn apply(cluster: &Cluster, e: &Endpoint, hc: &HealthCheck, result: Result<(), String>) {
    cluster
        .stats
        .health_check(if result.is_ok() { "success" } else { "failure" });
    match result {
        Ok(()) => {
            e.health_failures.store(0, Relaxed);
            let n = e.health_successes.fetch_add(1, Relaxed) + 1;
            if !e.healthy.load(Relaxed) && n >= hc.healthy_threshold {
                cluster.set_health(e, true);
            }
        }
        Err(why) => {
            tracing::debug!(cluster = %cluster.name, endpoint = %e.address, %why, "health check failed");
            e.health_successes.store(0, Relaxed);
            let n = e.health_failures.fetch_add(1, Relaxed) + 1;
            if e.healthy.load(Relaxed) && n >= hc.unhealthy_threshold {
                cluster.set_health(e, false);
            }
        }
    }
}
