//! TLS origination: a cluster's trust roots, client certificate, expected server identities,
//! and hot reload of the files behind them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::files::{self, Watched, name_matches};
use super::{TlsMetrics, provider};
use crate::config::{ClusterTls, TlsMode};
use crate::identity::Identity;

/// Verifies the server's chain against the cluster's roots, then its identity: one of the
/// expected SANs when the cluster lists them (a mesh identity, `spiffe://…`), else the server
/// name.
#[derive(Debug)]
struct Verifier {
    roots: Arc<RootCertStore>,
    expected: Vec<String>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        let algs = provider().signature_verification_algorithms;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            algs.all,
        )?;
        if self.expected.is_empty() {
            verify_server_name(&cert, server_name)?;
            return Ok(ServerCertVerified::assertion());
        }
        let names = files::cert_names(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        let ok = self.expected.iter().any(|want| {
            names.uris.iter().any(|u| u == want)
                || names
                    .dns
                    .iter()
                    .any(|d| name_matches(d, &want.to_ascii_lowercase()))
        });
        if ok {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crate::tls::verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crate::tls::verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        crate::tls::signature_schemes()
    }
}

/// The ALPN a connection offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    None,
    Http1,
    Http2,
    /// `h2` and `http/1.1`: the server chooses.
    Either,
}

/// One client config per ALPN choice.
#[derive(Debug)]
struct Configs {
    none: Arc<ClientConfig>,
    h1: Arc<ClientConfig>,
    h2: Arc<ClientConfig>,
    either: Arc<ClientConfig>,
}

/// A cluster's TLS.
#[derive(Debug)]
pub struct TlsClient {
    pub cluster: Arc<str>,
    settings: ClusterTls,
    base: PathBuf,
    sni: Option<ServerName<'static>>,
    current: ArcSwap<Configs>,
    watched: Mutex<Watched>,
    metrics: TlsMetrics,
    /// A digest of the settings (and where relative paths start): pooled connections are kept
    /// apart by it, so a reload that changes the TLS settings never reuses a connection made
    /// with the old ones (an address could be reused by a new object; the content cannot).
    pub key: u64,
}

impl TlsClient {
    pub fn build(
        cluster: &str,
        settings: &ClusterTls,
        base: &Path,
        metrics: &TlsMetrics,
        identity: Option<&Arc<Identity>>,
    ) -> Result<TlsClient, Vec<(String, String)>> {
        let mut errors = Vec::new();
        if settings.mode == TlsMode::Mesh {
            let mut no = |set: bool, at: &str| {
                if set {
                    errors.push((
                        at.to_owned(),
                        "not with `mode: mesh`: the proxy's mesh certificate and trust bundle are used".to_owned(),
                    ));
                }
            };
            no(settings.sni.is_some(), "sni");
            no(settings.ca.is_some(), "ca");
            no(settings.certificate.is_some(), "certificate");
            no(!settings.subject_alt_names.is_empty(), "subject_alt_names");
        } else if !settings.identities.is_empty() {
            errors.push((
                "identities".to_owned(),
                "only with `mode: mesh` (subject_alt_names checks file-based servers)".to_owned(),
            ));
        }
        let sni = match &settings.sni {
            None => None,
            Some(s) => match ServerName::try_from(s.clone()) {
                Ok(n) => Some(n),
                Err(_) => {
                    errors.push(("sni".to_owned(), format!("invalid server name {s:?}")));
                    None
                }
            },
        };
        let built = match settings.mode {
            TlsMode::Files => build_configs(settings, base),
            TlsMode::Mesh => mesh_configs(settings, identity),
        };
        let (configs, expiry) = match built {
            Ok(c) if errors.is_empty() => c,
            Ok(_) => return Err(errors),
            Err(e) => {
                errors.extend(e);
                return Err(errors);
            }
        };
        let key = {
            use std::hash::{DefaultHasher, Hash, Hasher};
            let mut h = DefaultHasher::new();
            serde_json::to_string(settings)
                .unwrap_or_default()
                .hash(&mut h);
            base.hash(&mut h);
            h.finish()
        };
        let client = TlsClient {
            key,
            cluster: Arc::from(cluster),
            settings: settings.clone(),
            base: base.to_owned(),
            sni,
            current: ArcSwap::from_pointee(configs),
            watched: Mutex::new(Watched::new(paths(settings, base))),
            metrics: metrics.clone(),
        };
        client.set_expiry(expiry);
        Ok(client)
    }

    pub fn same_settings(&self, settings: &ClusterTls, base: &Path) -> bool {
        self.settings == *settings && self.base == base
    }

    fn set_expiry(&self, expiry: Option<(String, i64)>) {
        if let Some((file, t)) = expiry {
            self.metrics
                .expiry
                .get_or_create(&crate::metrics::CertLabels {
                    side: "cluster",
                    name: self.cluster.to_string(),
                    file,
                })
                .set(t);
        }
    }

    /// As [`super::server::TlsServer::refresh`].
    pub fn refresh(&self, force: bool) -> Result<bool, String> {
        if self.settings.mode == TlsMode::Mesh {
            return Ok(false);
        }
        super::reload(
            &self.watched,
            force,
            &self.metrics,
            &format!("cluster {}", self.cluster),
            || build_configs(&self.settings, &self.base),
            |(configs, expiry)| {
                self.current.store(Arc::new(configs));
                self.set_expiry(expiry);
            },
        )
    }

    /// The name sent as SNI and verified: the configured `sni`, else the endpoint's host name,
    /// else its address.
    fn server_name(
        &self,
        hostname: Option<&str>,
        addr: std::net::SocketAddr,
    ) -> ServerName<'static> {
        if let Some(n) = &self.sni {
            return n.clone();
        }
        hostname
            .and_then(|h| ServerName::try_from(h.to_owned()).ok())
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()))
    }

    /// Runs the handshake over `stream` within `timeout`.
    pub async fn connect(
        &self,
        stream: TcpStream,
        hostname: Option<&str>,
        addr: std::net::SocketAddr,
        alpn: Alpn,
        timeout: Duration,
    ) -> Result<TlsStream<TcpStream>, (std::io::Error, &'static str)> {
        let configs = self.current.load();
        let config = match alpn {
            Alpn::None => &configs.none,
            Alpn::Http1 => &configs.h1,
            Alpn::Http2 => &configs.h2,
            Alpn::Either => &configs.either,
        };
        let connector = tokio_rustls::TlsConnector::from(config.clone());
        let name = self.server_name(hostname, addr);
        let result = match tokio::time::timeout(timeout, connector.connect(name, stream)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            )),
        };
        match result {
            Ok(tls) => {
                let (_, conn) = tls.get_ref();
                let alpn = conn
                    .alpn_protocol()
                    .map(|p| String::from_utf8_lossy(p).into_owned());
                self.metrics.handshake(
                    "cluster",
                    &self.cluster,
                    super::version_name(conn.protocol_version()),
                    alpn.as_deref().unwrap_or(""),
                );
                Ok(tls)
            }
            Err(e) => {
                let reason = super::failure_reason(&e);
                self.metrics.failure("cluster", &self.cluster, reason);
                Err((e, reason))
            }
        }
    }
}

/// `tls: mesh`: the proxy's SVID presented, the server's SVID verified (TLS 1.3).
fn mesh_configs(
    settings: &ClusterTls,
    identity: Option<&Arc<Identity>>,
) -> Result<Built, Vec<(String, String)>> {
    let allowed = crate::identity::mesh::parse_identities(&settings.identities)
        .map_err(|e| vec![("identities".to_owned(), e)])?;
    let identity = identity.ok_or_else(|| {
        vec![(
            "mode".to_owned(),
            crate::identity::mesh::NEEDS_IDENTITY.to_owned(),
        )]
    })?;
    let policy = crate::identity::mesh::PeerPolicy {
        identity: identity.clone(),
        allowed,
    };
    let make = |alpn: &[&[u8]]| -> Result<Arc<ClientConfig>, Vec<(String, String)>> {
        crate::identity::mesh::client_config(policy.clone(), alpn)
            .map(Arc::new)
            .map_err(|e| vec![("mode".to_owned(), e.to_string())])
    };
    // A mesh peer's ClientHello says it is one (a sidecar's inbound side tells it from the
    // workload's own TLS clients): raw TCP offers `weft-tcp`, HTTP adds `weft-mesh`, which a
    // server that does not know it never picks.
    use super::{ALPN_MESH, ALPN_TCP};
    let configs = Configs {
        none: make(&[ALPN_TCP])?,
        h1: make(&[b"http/1.1", ALPN_MESH])?,
        h2: make(&[b"h2", ALPN_MESH])?,
        either: make(&[b"h2", b"http/1.1", ALPN_MESH])?,
    };
    Ok((configs, None))
}

fn paths(settings: &ClusterTls, base: &Path) -> Vec<PathBuf> {
    if settings.mode == TlsMode::Mesh {
        return Vec::new();
    }
    let mut v: Vec<PathBuf> = settings.ca.iter().map(|c| base.join(c)).collect();
    if let Some(c) = &settings.certificate {
        v.push(base.join(&c.cert));
        v.push(base.join(&c.key));
    }
    v
}

type Built = (Configs, Option<(String, i64)>);

fn build_configs(settings: &ClusterTls, base: &Path) -> Result<Built, Vec<(String, String)>> {
    let mut errors = Vec::new();
    let roots = match &settings.ca {
        Some(ca) => files::roots(&base.join(ca)).map(Arc::new),
        None => files::system_roots(),
    };
    let roots = match roots {
        Ok(r) => Some(r),
        Err(e) => {
            errors.push(("ca".to_owned(), e));
            None
        }
    };
    let pair = match &settings.certificate {
        None => None,
        Some(c) => match files::pair(c, base) {
            Ok(p) => Some((c.cert.clone(), p)),
            Err(e) => {
                errors.push(("certificate".to_owned(), e));
                None
            }
        },
    };
    let Some(roots) = roots.filter(|_| errors.is_empty()) else {
        return Err(errors);
    };
    let verifier = Arc::new(Verifier {
        roots,
        expected: settings.subject_alt_names.clone(),
    });
    let make = |alpn: &[&[u8]]| -> Result<Arc<ClientConfig>, Vec<(String, String)>> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(super::versions(settings.min_version))
            .map_err(|e| vec![("min_version".to_owned(), e.to_string())])?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone());
        let mut config = match &pair {
            Some((_, p)) => builder.with_client_cert_resolver(Arc::new(
                rustls::sign::SingleCertAndKey::from(p.key.clone()),
            )),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    };
    let configs = Configs {
        none: make(&[])?,
        h1: make(&[b"http/1.1"])?,
        h2: make(&[b"h2"])?,
        either: make(&[b"h2", b"http/1.1"])?,
    };
    let expiry = pair.map(|(file, p)| (file, p.names.not_after));
    Ok((configs, expiry))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pooled connections are told apart by the content of the TLS settings: the same settings
    /// give the same key (a reload that keeps them keeps its connections), any change another.
    #[test]
    fn the_pool_key_follows_the_settings() {
        let pki = weft_testkit::tls::Pki::new("key");
        let ca = pki.ca.to_string_lossy().into_owned();
        let settings = |sans: &[&str]| ClusterTls {
            sni: Some("backend.test".into()),
            ca: Some(ca.clone()),
            certificate: None,
            subject_alt_names: sans.iter().map(|s| s.to_string()).collect(),
            min_version: Default::default(),
            mode: Default::default(),
            identities: Vec::new(),
        };
        let metrics = TlsMetrics::default();
        let key = |s: &ClusterTls| {
            TlsClient::build("c", s, Path::new("/"), &metrics, None)
                .expect("builds")
                .key
        };
        let a = settings(&["spiffe://td/ns/a/sa/b"]);
        assert_eq!(key(&a), key(&a.clone()));
        assert_ne!(key(&a), key(&settings(&["spiffe://td/ns/a/sa/other"])));
        assert_ne!(key(&a), key(&settings(&[])));
    }
}
