//! weft-cp's etcd client: the few calls of etcd's v3 gRPC API the store needs (range, put,
//! transactions, watch), over one lazily connected channel per endpoint. A call that finds its
//! endpoint unavailable (refused, timed out) moves to the next one; a token that expired is
//! renewed once. With `--etcd-ca` the link is TLS (and mutual with `--etcd-cert`/`--etcd-key`);
//! with `--etcd-user` weft-cp authenticates (password from `WEFT_ETCD_PASSWORD`).

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::Status;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
pub use weft_wire::etcd as pb;
use weft_wire::etcd::{
    auth_client::AuthClient, kv_client::KvClient, lease_client::LeaseClient,
    watch_client::WatchClient,
};

/// A request that takes longer than this counts as its endpoint being unavailable.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Where etcd is and how to reach it.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// `host:port` of each member.
    pub endpoints: Vec<String>,
    /// Every key weft-cp writes starts with this (ends with `/`).
    pub prefix: String,
    /// TLS: the CA that signs the members' certificates (PEM).
    pub ca: Option<PathBuf>,
    /// A client certificate and key (PEM), for members that require them.
    pub cert: Option<(PathBuf, PathBuf)>,
    /// A user and password (etcd's authentication).
    pub user: Option<(String, String)>,
}

impl EtcdConfig {
    /// `etcd://host:port[,host:port…]`, the prefix (`/weft/` by default).
    pub fn parse(url: &str, prefix: &str) -> Result<EtcdConfig, String> {
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| format!("{url:?}: expected etcd://host:port[,host:port…]"))?;
        let mut endpoints = Vec::new();
        for ep in rest.trim_end_matches('/').split(',') {
            let ep = ep.trim();
            let ok = ep
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0));
            if !ok || ep.contains('/') || ep.contains('@') {
                return Err(format!(
                    "{url:?}: {ep:?} is not host:port (etcd://host:port[,host:port…])"
                ));
            }
            if !endpoints.iter().any(|e| e == ep) {
                endpoints.push(ep.to_owned());
            }
        }
        if !prefix.starts_with('/') || prefix.contains(char::is_control) || prefix.len() > 256 {
            return Err(format!(
                "--etcd-prefix {prefix:?}: a key prefix starting with / (at most 256 bytes)"
            ));
        }
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Ok(EtcdConfig {
            endpoints,
            prefix,
            ca: None,
            cert: None,
            user: None,
        })
    }

    /// `etcd://a:1,b:2` as given (for messages).
    pub fn describe(&self) -> String {
        format!("etcd://{}", self.endpoints.join(","))
    }
}

/// Why a call to etcd did not happen.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No member answered (down, unreachable, too slow): the caller keeps what it has.
    #[error("etcd ({endpoints}) cannot be reached: {why}")]
    Unavailable { endpoints: String, why: String },
    /// A member answered no.
    #[error("etcd refused the request: {0}")]
    Refused(String),
}

/// A connection to etcd (to each of its members, used one at a time).
///
/// Its connections live on a runtime of their own: code that must wait for etcd while it holds
/// a lock (the registry, a change being stored) blocks on that runtime, which never needs the
/// threads of the runtime serving requests — those may all be waiting for the same lock.
pub struct Etcd {
    runtime: Option<tokio::runtime::Runtime>,
    config: EtcdConfig,
    channels: Vec<Channel>,
    /// The member calls go to first.
    current: AtomicUsize,
    token: Mutex<Option<MetadataValue<tonic::metadata::Ascii>>>,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(r) = self.runtime.take() {
            r.shutdown_background();
        }
    }
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Etcd({})", self.config.describe())
    }
}

fn tls_connector(config: &EtcdConfig) -> Result<Option<tokio_rustls::TlsConnector>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let Some(ca) = &config.ca else {
        if config.cert.is_some() {
            return Err("--etcd-cert needs --etcd-ca (the CA of etcd's members)".into());
        }
        return Ok(None);
    };
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&read(ca)?) {
        let c = c.map_err(|e| format!("--etcd-ca {}: {e}", ca.display()))?;
        roots
            .add(c)
            .map_err(|e| format!("--etcd-ca {}: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("--etcd-ca {}: no certificate", ca.display()));
    }
    let builder = rustls::ClientConfig::builder_with_provider(weft_proxy::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut tls = match &config.cert {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(&read(cert)?)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("--etcd-cert {}: {e}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_slice(&read(key)?)
                .map_err(|e| format!("--etcd-key {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("--etcd-cert: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Some(tokio_rustls::TlsConnector::from(Arc::new(tls))))
}

fn channel(endpoint: &str, tls: Option<&tokio_rustls::TlsConnector>) -> Result<Channel, String> {
    let e = Endpoint::from_shared(format!("http://{endpoint}"))
        .map_err(|e| format!("etcd endpoint {endpoint:?}: {e}"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    let Some(tls) = tls else {
        return Ok(e.connect_lazy());
    };
    let host = endpoint
        .rsplit_once(':')
        .map_or(endpoint, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|_| format!("etcd endpoint {endpoint:?}: invalid host"))?;
    let tls = tls.clone();
    let connector = tower::service_fn(move |uri: http::Uri| {
        let tls = tls.clone();
        let name = name.clone();
        async move {
            let authority = uri
                .authority()
                .map(|a| a.to_string())
                .ok_or_else(|| std::io::Error::other("no authority"))?;
            let tcp = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::net::TcpStream::connect(authority),
            )
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
            let _ = tcp.set_nodelay(true);
            let stream = tokio::time::timeout(Duration::from_secs(5), tls.connect(name, tcp))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
                })??;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    Ok(e.connect_with_connector_lazy(connector))
}

/// Whether `s` says the member could not serve (try another), rather than no.
fn unavailable(s: &Status) -> bool {
    use tonic::Code;
    matches!(
        s.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    ) || s.message().contains("no leader")
        || s.message().contains("leader changed")
}

/// What went wrong, with the causes a transport error hides behind its message (a refused
/// connection, a certificate etcd would not take, …).
pub fn why(s: &Status) -> String {
    let mut out = s.message().to_owned();
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}

fn expired_token(s: &Status) -> bool {
    s.code() == tonic::Code::Unauthenticated
        || s.message().contains("invalid auth token")
        || s.message().contains("token") && s.code() == tonic::Code::InvalidArgument
}

impl Etcd {
    /// Connects (lazily: a member that is down now is tried when a call needs it) and, with a
    /// user, authenticates. Fails only on a bad configuration or credentials refused.
    pub async fn connect(config: EtcdConfig) -> Result<Arc<Etcd>, String> {
        let tls = tls_connector(&config)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd")
            .enable_all()
            .build()
            .map_err(|e| format!("etcd: cannot start its runtime: {e}"))?;
        let channels = {
            let _on = runtime.enter();
            config
                .endpoints
                .iter()
                .map(|e| channel(e, tls.as_ref()))
                .collect::<Result<Vec<_>, _>>()?
        };
        if channels.is_empty() {
            return Err("etcd: no endpoint".into());
        }
        Ok(Arc::new(Etcd {
            runtime: Some(runtime),
            config,
            channels,
            current: AtomicUsize::new(0),
            token: Mutex::new(None),
        }))
    }

    pub fn config(&self) -> &EtcdConfig {
        &self.config
    }

    /// Runs `f` to its end on etcd's runtime, from synchronous code (a blocking thread, or a
    /// runtime thread, which hands its other tasks over while it waits).
    pub fn block<F: Future>(&self, f: F) -> F::Output {
        let handle = match &self.runtime {
            Some(r) => r.handle().clone(),
            None => tokio::runtime::Handle::current(),
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::task::block_in_place(|| handle.block_on(f))
        } else {
            handle.block_on(f)
        }
    }

    /// The full key of `name` under the prefix.
    pub fn key(&self, name: &str) -> Vec<u8> {
        format!("{}{name}", self.config.prefix).into_bytes()
    }

    fn token(&self) -> Option<MetadataValue<tonic::metadata::Ascii>> {
        self.token.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn authenticate(&self, channel: Channel) -> Result<(), EtcdError> {
        let Some((name, password)) = &self.config.user else {
            return Ok(());
        };
        let r = tokio::time::timeout(
            REQUEST_TIMEOUT,
            AuthClient::new(channel).authenticate(pb::AuthenticateRequest {
                name: name.clone(),
                password: password.clone(),
            }),
        )
        .await
        .map_err(|_| self.unreachable("authentication timed out"))?;
        let token = match r {
            Ok(r) => r.into_inner().token,
            Err(s) if unavailable(&s) => return Err(self.unreachable(&why(&s))),
            Err(s) => {
                return Err(EtcdError::Refused(format!(
                    "authentication as {name:?}: {}",
                    s.message()
                )));
            }
        };
        let value = token
            .parse()
            .map_err(|_| EtcdError::Refused("etcd sent an unusable token".into()))?;
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = Some(value);
        Ok(())
    }

    fn unreachable(&self, why: &str) -> EtcdError {
        EtcdError::Unavailable {
            endpoints: self.config.endpoints.join(","),
            why: why.to_owned(),
        }
    }

    /// A request carrying the token, if there is one.
    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = self.token() {
            r.metadata_mut().insert("token", t);
        }
        r
    }

    /// Runs `call` on a member: on an unavailable one, on the next (each member once); with an
    /// expired token, authenticates again once.
    async fn call<T, F, Fut>(&self, call: F) -> Result<T, EtcdError>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let n = self.channels.len();
        let mut last = String::new();
        let mut authenticated = false;
        let mut tries = 0;
        while tries < n {
            let i = self.current.load(Ordering::Relaxed) % n;
            let ch = self.channels[i].clone();
            if self.config.user.is_some() && self.token().is_none() {
                match self.authenticate(ch.clone()).await {
                    Ok(()) => authenticated = true,
                    Err(EtcdError::Unavailable { why, .. }) => {
                        last = format!("{}: {why}", self.config.endpoints[i]);
                        self.current.store((i + 1) % n, Ordering::Relaxed);
                        tries += 1;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            match tokio::time::timeout(REQUEST_TIMEOUT, call(ch.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(s)) if expired_token(&s) && self.config.user.is_some() && !authenticated => {
                    *self.token.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    authenticated = true;
                }
                Ok(Err(s)) if unavailable(&s) => {
                    last = format!("{}: {}", self.config.endpoints[i], why(&s));
                    self.current.store((i + 1) % n, Ordering::Relaxed);
                    tries += 1;
                }
                Ok(Err(s)) => return Err(EtcdError::Refused(s.message().to_owned())),
                Err(_) => {
                    last = format!(
                        "{}: no answer in {REQUEST_TIMEOUT:?}",
                        self.config.endpoints[i]
                    );
                    self.current.store((i + 1) % n, Ordering::Relaxed);
                    tries += 1;
                }
            }
        }
        Err(self.unreachable(&last))
    }

    /// The value of `key` (a full key), with its revisions.
    pub async fn get(&self, key: &[u8]) -> Result<Option<pb::KeyValue>, EtcdError> {
        let r = self
            .call(|ch| {
                let req = self.request(pb::RangeRequest {
                    key: key.to_vec(),
                    ..Default::default()
                });
                async move { KvClient::new(ch).range(req).await }
            })
            .await?
            .into_inner();
        Ok(r.kvs.into_iter().next())
    }

    /// Every key starting with `prefix` (a full key), in key order, and the store's revision.
    pub async fn list(&self, prefix: &[u8]) -> Result<(Vec<pb::KeyValue>, i64), EtcdError> {
        let r = self
            .call(|ch| {
                let req = self.request(pb::RangeRequest {
                    key: prefix.to_vec(),
                    range_end: prefix_end(prefix),
                    ..Default::default()
                });
                async move {
                    KvClient::new(ch)
                        .max_decoding_message_size(weft_wire::MAX_MESSAGE)
                        .range(req)
                        .await
                }
            })
            .await?
            .into_inner();
        Ok((r.kvs, r.header.map_or(0, |h| h.revision)))
    }

    /// Runs a transaction; `Ok(false)`: its comparisons failed and the failure branch ran.
    pub async fn txn(&self, txn: pb::TxnRequest) -> Result<pb::TxnResponse, EtcdError> {
        Ok(self
            .call(|ch| {
                let req = self.request(txn.clone());
                async move { KvClient::new(ch).txn(req).await }
            })
            .await?
            .into_inner())
    }

    pub async fn put(&self, key: &[u8], value: Vec<u8>) -> Result<(), EtcdError> {
        self.call(|ch| {
            let req = self.request(pb::PutRequest {
                key: key.to_vec(),
                value: value.clone(),
                ..Default::default()
            });
            async move { KvClient::new(ch).put(req).await }
        })
        .await?;
        Ok(())
    }

    /// A lease of `ttl` seconds: its id.
    pub async fn grant(&self, ttl: i64) -> Result<i64, EtcdError> {
        let r = self
            .call(|ch| {
                let req = self.request(pb::LeaseGrantRequest { ttl, id: 0 });
                async move { LeaseClient::new(ch).lease_grant(req).await }
            })
            .await?
            .into_inner();
        if !r.error.is_empty() {
            return Err(EtcdError::Refused(r.error));
        }
        Ok(r.id)
    }

    /// Renews lease `id` once: its remaining seconds (0: it expired).
    pub async fn keep_alive(&self, id: i64) -> Result<i64, EtcdError> {
        self.call(|ch| {
            let req = self.request(tokio_stream::iter([pb::LeaseKeepAliveRequest { id }]));
            async move {
                let mut s = LeaseClient::new(ch)
                    .lease_keep_alive(req)
                    .await?
                    .into_inner();
                Ok(s.message().await?.map_or(0, |r| r.ttl))
            }
        })
        .await
    }

    /// Puts `value` at `key`, attached to lease `lease` (it goes when the lease does).
    pub async fn put_leased(
        &self,
        key: &[u8],
        value: Vec<u8>,
        lease: i64,
    ) -> Result<(), EtcdError> {
        self.call(|ch| {
            let req = self.request(pb::PutRequest {
                key: key.to_vec(),
                value: value.clone(),
                lease,
                ..Default::default()
            });
            async move { KvClient::new(ch).put(req).await }
        })
        .await?;
        Ok(())
    }

    /// Deletes every key in [`key`, `end`).
    pub async fn delete_range(&self, key: &[u8], end: Vec<u8>) -> Result<(), EtcdError> {
        self.call(|ch| {
            let req = self.request(pb::DeleteRangeRequest {
                key: key.to_vec(),
                range_end: end.clone(),
                ..Default::default()
            });
            async move { KvClient::new(ch).delete_range(req).await }
        })
        .await?;
        Ok(())
    }

    /// Starts a watch of every key under `prefix` (a full key) from revision `from`: the
    /// stream of its responses, on the member calls go to now.
    pub async fn watch(
        &self,
        prefix: &[u8],
        from: i64,
    ) -> Result<tonic::Streaming<pb::WatchResponse>, EtcdError> {
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: prefix.to_vec(),
                    range_end: prefix_end(prefix),
                    start_revision: from,
                    progress_notify: true,
                    ..Default::default()
                },
            )),
        };
        self.call(|ch| {
            let req =
                self.request(tokio_stream::iter([create.clone()]).chain(tokio_stream::pending()));
            async move {
                WatchClient::new(ch)
                    .max_decoding_message_size(weft_wire::MAX_MESSAGE)
                    .watch(req)
                    .await
                    .map(tonic::Response::into_inner)
            }
        })
        .await
    }
}

use tokio_stream::StreamExt as _;

/// The end of the range of keys starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every key (etcd's convention for "no end").
    vec![0]
}

/// A comparison: `key`'s last modification is at `revision` (0: the key does not exist).
pub fn unchanged_since(key: Vec<u8>, revision: i64) -> pb::Compare {
    pb::Compare {
        result: pb::compare::CompareResult::Equal as i32,
        target: pb::compare::CompareTarget::Mod as i32,
        key,
        target_union: Some(pb::compare::TargetUnion::ModRevision(revision)),
        range_end: Vec::new(),
    }
}

pub fn put_op(key: Vec<u8>, value: Vec<u8>) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
            key,
            value,
            ..Default::default()
        })),
    }
}

pub fn delete_op(key: Vec<u8>, range_end: Vec<u8>) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestDeleteRange(
            pb::DeleteRangeRequest {
                key,
                range_end,
                ..Default::default()
            },
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_prefixes() {
        let c = EtcdConfig::parse("etcd://127.0.0.1:2379,[::1]:2380,127.0.0.1:2379", "/weft")
            .expect("valid");
        assert_eq!(c.endpoints, ["127.0.0.1:2379", "[::1]:2380"]);
        assert_eq!(c.prefix, "/weft/");
        for bad in [
            "http://127.0.0.1:2379",
            "etcd://",
            "etcd://host",
            "etcd://host:0",
            "etcd://host:99999",
            "etcd://user@host:2379",
            "etcd://host:2379/path",
            "etcd://:2379",
            "etcd://a:1,,b:2",
        ] {
            assert!(EtcdConfig::parse(bad, "/weft/").is_err(), "{bad}");
        }
        for bad in ["weft", "", "/a\nb"] {
            assert!(EtcdConfig::parse("etcd://a:1", bad).is_err(), "{bad:?}");
        }
        assert_eq!(prefix_end(b"/weft/"), b"/weft0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
