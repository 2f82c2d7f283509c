//! Clients for tests: hyper (HTTP/1.1 and prior-knowledge h2c) and the real `curl`.

use std::process::Command;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub type Client = HyperClient<HttpConnector, Full<Bytes>>;

/// A keep-alive HTTP/1.1 client.
pub fn http1() -> Client {
    HyperClient::builder(TokioExecutor::new()).build_http()
}

/// A prior-knowledge HTTP/2 (h2c) client.
pub fn h2c() -> Client {
    HyperClient::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A whole response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The backend's JSON description of the request it received.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends a request and reads the whole response.
pub async fn send(client: &Client, req: Request<Full<Bytes>>) -> Result<Reply, String> {
    let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.map_err(|e| format!("{e:?}"))?;
    let trailers = collected.trailers().cloned();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    })
}

/// `GET url`.
pub async fn get(client: &Client, url: &str) -> Result<Reply, String> {
    let req = Request::get(url)
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    send(client, req).await
}

/// `GET url` with headers.
pub async fn get_with(
    client: &Client,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    let mut b = Request::get(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(
        client,
        b.body(Full::new(Bytes::new())).map_err(|e| e.to_string())?,
    )
    .await
}

/// Runs the real `curl` with `args` (plus `-sS`), returning (exit ok, stdout, stderr).
pub fn curl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl")
        .arg("-sS")
        .args(args)
        .output()
        .expect("curl is installed (.ci/run installs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
