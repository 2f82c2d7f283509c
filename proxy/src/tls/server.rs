//! TLS termination: a listener's certificates (chosen by SNI), client-certificate verification,
//! ALPN, and hot reload of the files behind them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::files::{self, CertNames, Watched, name_matches};
use super::{PeerIdentity, TlsInfo, TlsMetrics};
use crate::config::{ClientCertificate, ListenerTls, TlsMode};
use crate::identity::Identity;

/// Certificates by the names they cover; the first is the default.
#[derive(Debug)]
struct Certificates {
    keys: Vec<(CertNames, Arc<CertifiedKey>)>,
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(sni) = hello.server_name() {
            let sni = sni.to_ascii_lowercase();
            let covers = |n: &CertNames, exact: bool| {
                let names = n.dns.iter().chain(n.common_name.iter());
                let mut names = names.filter(|p| p.starts_with("*.") != exact);
                names.any(|p| name_matches(p, &sni))
            };
            for exact in [true, false] {
                if let Some((_, k)) = self.keys.iter().find(|(n, _)| covers(n, exact)) {
                    return Some(k.clone());
                }
            }
        }
        self.keys.first().map(|(_, k)| k.clone())
    }
}

/// A listener's TLS: the current `ServerConfig` and what it was built from.
#[derive(Debug)]
pub struct TlsServer {
    pub listener: Arc<str>,
    settings: ListenerTls,
    base: PathBuf,
    alpn: Vec<Vec<u8>>,
    pub handshake_timeout: Duration,
    current: ArcSwap<ServerConfig>,
    watched: Mutex<Watched>,
    metrics: TlsMetrics,
}

impl TlsServer {
    /// Loads the listener's material; an error names the file and what is wrong with it.
    pub fn build(
        listener: &str,
        settings: &ListenerTls,
        default_alpn: &[&str],
        base: &Path,
        metrics: &TlsMetrics,
        identity: Option<&Arc<Identity>>,
    ) -> Result<TlsServer, Vec<(String, String)>> {
        let alpn: Vec<Vec<u8>> = match &settings.alpn {
            Some(list) => list.iter().map(|p| p.as_bytes().to_vec()).collect(),
            None => default_alpn.iter().map(|p| p.as_bytes().to_vec()).collect(),
        };
        let mut errors = Vec::new();
        if settings.handshake_timeout.0.is_zero() {
            errors.push((
                "handshake_timeout".to_owned(),
                "must be greater than 0".to_owned(),
            ));
        }
        if let Some(p) = alpn.iter().find(|p| p.is_empty() || p.len() > 255) {
            errors.push((
                "alpn".to_owned(),
                format!("invalid protocol name {:?}", String::from_utf8_lossy(p)),
            ));
        }
        let built = match settings.mode {
            TlsMode::Files => {
                if !settings.identities.is_empty() {
                    errors.push((
                        "identities".to_owned(),
                        "only with `mode: mesh` (client_ca verifies file-based clients)".to_owned(),
                    ));
                }
                match settings.all_certificates() {
                    Err((at, e)) => errors.push((at.to_owned(), e.to_owned())),
                    Ok(all) if all.is_empty() => errors.push((
                        "certificates".to_owned(),
                        "a TLS listener needs a certificate (cert and key, or certificates)"
                            .to_owned(),
                    )),
                    Ok(_) => {}
                }
                build_config(settings, base, &alpn)
            }
            TlsMode::Mesh => {
                errors.extend(mesh_conflicts(settings));
                mesh_config(settings, &alpn, identity)
            }
        };
        let config = match built {
            Ok(c) => Some(c),
            Err(e) => {
                errors.extend(e);
                None
            }
        };
        let Some((config, expiries)) = config.filter(|_| errors.is_empty()) else {
            return Err(errors);
        };
        let server = TlsServer {
            listener: Arc::from(listener),
            settings: settings.clone(),
            base: base.to_owned(),
            alpn,
            handshake_timeout: settings.handshake_timeout.0,
            current: ArcSwap::from_pointee(config),
            watched: Mutex::new(Watched::new(paths(settings, base))),
            metrics: metrics.clone(),
        };
        server.set_expiries(&expiries);
        Ok(server)
    }

    /// Whether this was built from the same settings (so a reload can keep it).
    pub fn same_settings(&self, settings: &ListenerTls, base: &Path) -> bool {
        self.settings == *settings && self.base == base
    }

    fn set_expiries(&self, expiries: &[(String, i64)]) {
        for (file, t) in expiries {
            self.metrics
                .expiry
                .get_or_create(&crate::metrics::CertLabels {
                    side: "listener",
                    name: self.listener.to_string(),
                    file: file.clone(),
                })
                .set(*t);
        }
    }

    /// Re-reads the files if they changed (or always, when `force`): applies the new material
    /// if it loads, else keeps the old and reports why. Returns whether it applied new material.
    pub fn refresh(&self, force: bool) -> Result<bool, String> {
        if self.settings.mode == TlsMode::Mesh {
            return Ok(false);
        }
        super::reload(
            &self.watched,
            force,
            &self.metrics,
            &format!("listener {}", self.listener),
            || build_config(&self.settings, &self.base, &self.alpn),
            |(config, expiries)| {
                self.current.store(Arc::new(config));
                self.set_expiries(&expiries);
            },
        )
    }

    /// Completes the handshake on `stream` (bounded by `handshake_timeout`), counting it.
    pub async fn accept(&self, stream: TcpStream) -> Option<(TlsStream<TcpStream>, TlsInfo)> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.current.load_full());
        let done = tokio::time::timeout(self.handshake_timeout, acceptor.accept(stream)).await;
        let tls = match done {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let reason = super::failure_reason(&e);
                tracing::debug!(listener = %self.listener, error = %e, reason, "TLS handshake failed");
                self.metrics.failure("listener", &self.listener, reason);
                return None;
            }
            Err(_) => {
                self.metrics.failure("listener", &self.listener, "timeout");
                return None;
            }
        };
        let (_, conn) = tls.get_ref();
        let info = TlsInfo {
            version: super::version_name(conn.protocol_version()),
            alpn: conn
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
            sni: conn.server_name().map(str::to_owned),
            peer: conn
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(PeerIdentity::from_der),
        };
        self.metrics.handshake(
            "listener",
            &self.listener,
            info.version,
            info.alpn.as_deref().unwrap_or(""),
        );
        Some((tls, info))
    }
}

/// What `mode: mesh` takes from the identity and must not be set.
fn mesh_conflicts(settings: &ListenerTls) -> Vec<(String, String)> {
    let mut errors = Vec::new();
    let mut no = |set: bool, at: &str| {
        if set {
            errors.push((
                at.to_owned(),
                "not with `mode: mesh`: the proxy's mesh certificate and trust bundle are used"
                    .to_owned(),
            ));
        }
    };
    no(settings.cert.is_some(), "cert");
    no(settings.key.is_some(), "key");
    no(!settings.certificates.is_empty(), "certificates");
    no(settings.client_ca.is_some(), "client_ca");
    no(
        settings.client_certificate == ClientCertificate::Optional,
        "client_certificate",
    );
    errors
}

/// `tls: mesh`: the proxy's SVID, clients' SVIDs required (TLS 1.3), from the identity the
/// control plane issued; renewals and new bundles apply to new handshakes by themselves.
fn mesh_config(
    settings: &ListenerTls,
    alpn: &[Vec<u8>],
    identity: Option<&Arc<Identity>>,
) -> Result<Built, Vec<(String, String)>> {
    use crate::identity::mesh;
    let allowed = mesh::parse_identities(&settings.identities)
        .map_err(|e| vec![("identities".to_owned(), e)])?;
    let identity =
        identity.ok_or_else(|| vec![("mode".to_owned(), mesh::NEEDS_IDENTITY.to_owned())])?;
    let policy = mesh::PeerPolicy {
        identity: identity.clone(),
        allowed,
    };
    let alpn: Vec<&[u8]> = alpn.iter().map(Vec::as_slice).collect();
    mesh::server_config(policy, true, &alpn)
        .map(|c| (c, Vec::new()))
        .map_err(|e| vec![("mode".to_owned(), e.to_string())])
}

fn paths(settings: &ListenerTls, base: &Path) -> Vec<PathBuf> {
    if settings.mode == TlsMode::Mesh {
        return Vec::new();
    }
    let mut v: Vec<PathBuf> = settings
        .all_certificates()
        .unwrap_or_default()
        .iter()
        .flat_map(|c| [base.join(&c.cert), base.join(&c.key)])
        .collect();
    v.extend(settings.client_ca.iter().map(|c| base.join(c)));
    v
}

type Built = (ServerConfig, Vec<(String, i64)>);

fn build_config(
    settings: &ListenerTls,
    base: &Path,
    alpn: &[Vec<u8>],
) -> Result<Built, Vec<(String, String)>> {
    let mut errors = Vec::new();
    let mut keys = Vec::new();
    let mut expiries = Vec::new();
    let shorthand = settings.cert.is_some();
    for (i, c) in settings
        .all_certificates()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        match files::pair(c, base) {
            Ok(p) => {
                expiries.push((c.cert.clone(), p.names.not_after));
                keys.push((p.names, p.key));
            }
            Err(e) => {
                let at = match (shorthand, i) {
                    (true, 0) => "cert".to_owned(),
                    (true, i) => format!("certificates[{}]", i - 1),
                    (false, i) => format!("certificates[{i}]"),
                };
                errors.push((at, e));
            }
        }
    }
    let provider = super::provider();
    let verifier = match &settings.client_ca {
        None => None,
        Some(ca) => match files::roots(&base.join(ca)) {
            Ok(roots) => {
                let b =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
                let b = match settings.client_certificate {
                    ClientCertificate::Required => b,
                    ClientCertificate::Optional => b.allow_unauthenticated(),
                };
                match b.build() {
                    Ok(v) => Some(v),
                    Err(e) => {
                        errors.push(("client_ca".to_owned(), e.to_string()));
                        None
                    }
                }
            }
            Err(e) => {
                errors.push(("client_ca".to_owned(), e));
                None
            }
        },
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    let builder = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(super::versions(settings.min_version))
        .map_err(|e| vec![("min_version".to_owned(), e.to_string())])?;
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(Certificates { keys }));
    config.alpn_protocols = alpn.to_vec();
    Ok((config, expiries))
}
