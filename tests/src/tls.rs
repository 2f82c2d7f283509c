//! TLS for tests: a throw-away PKI (rcgen) written to PEM files, TLS backends (optionally
//! requiring client certificates) and a TLS client.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;

/// A test certificate authority, and the files of what it issued.
pub struct Pki {
    pub dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (PEM file).
    pub ca: PathBuf,
    serial: std::sync::atomic::AtomicU64,
}

/// A certificate and key as PEM files.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        let ca = dir.path().join(format!("{name}-ca.pem"));
        std::fs::write(&ca, cert.pem()).expect("write CA");
        Pki {
            dir,
            issuer: Issuer::new(params, key),
            ca,
            serial: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// Issues a certificate for `names`: `spiffe://…` (any `scheme://`) become URI SANs, the
    /// rest DNS SANs; written as `<file>.pem` and `<file>-key.pem`.
    pub fn issue(&self, file: &str, names: &[&str]) -> Issued {
        self.issue_with(file, names, |_| {})
    }

    /// As [`Pki::issue`], with the parameters adjusted by `edit` (validity, …).
    pub fn issue_with(
        &self,
        file: &str,
        names: &[&str],
        edit: impl FnOnce(&mut CertificateParams),
    ) -> Issued {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or(file));
        for n in names {
            let san = if n.contains("://") {
                SanType::URI((*n).try_into().expect("URI SAN"))
            } else {
                SanType::DnsName((*n).try_into().expect("DNS SAN"))
            };
            params.subject_alt_names.push(san);
        }
        let serial = self
            .serial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        params.serial_number = Some(serial.into());
        edit(&mut params);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        let issued = Issued {
            cert: self.dir.path().join(format!("{file}.pem")),
            key: self.dir.path().join(format!("{file}-key.pem")),
        };
        write_atomically(&issued.cert, cert.pem().as_bytes());
        write_atomically(&issued.key, key.serialize_pem().as_bytes());
        issued
    }
}

/// The DER of the certificate in a PEM file.
pub fn cert_der(path: &Path) -> Vec<u8> {
    CertificateDer::pem_file_iter(path)
        .expect("cert file")
        .next()
        .expect("a certificate")
        .expect("valid PEM")
        .to_vec()
}

/// Writes through a temporary file and a rename, as a careful deployment tool does.
pub fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn load(issued: &Issued) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let certs = CertificateDer::pem_file_iter(&issued.cert)
        .expect("cert file")
        .collect::<Result<Vec<_>, _>>()
        .expect("certs");
    let key = PrivateKeyDer::from_pem_file(&issued.key).expect("key");
    (certs, key)
}

fn roots(ca: &Path) -> rustls::RootCertStore {
    let mut store = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("CA file") {
        store.add(c.expect("CA cert")).expect("add CA");
    }
    store
}

/// A TLS server config for a backend: `cert`, ALPN h2 + http/1.1, and client certificates
/// required (verified against `client_ca`) when given.
pub fn server_config(cert: &Issued, client_ca: Option<&Path>) -> Arc<rustls::ServerConfig> {
    let (certs, key) = load(cert);
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = match client_ca {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca)),
                provider(),
            )
            .build()
            .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).expect("server config");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A TLS client config trusting `ca`, presenting `cert` if given, offering `alpn`.
pub fn client_config(ca: &Path, cert: Option<&Issued>, alpn: &[&str]) -> Arc<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots(ca));
    let mut config = match cert {
        Some(c) => {
            let (certs, key) = load(c);
            builder
                .with_client_auth_cert(certs, key)
                .expect("client cert")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(config)
}

/// What a TLS request got.
#[derive(Debug)]
pub struct TlsReply {
    pub status: u16,
    pub version: hyper::Version,
    pub body: String,
    pub headers: hyper::HeaderMap,
    /// The server's certificate (DER).
    pub server_cert: Vec<u8>,
}

/// One `GET` over a fresh TLS connection to `addr` with SNI `sni`; HTTP/2 when the server picks
/// `h2` by ALPN. An error says where it failed (handshake or request).
pub async fn get(
    addr: SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
    path: &str,
) -> Result<TlsReply, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name = ServerName::try_from(sni.to_owned()).map_err(|e| format!("sni: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let server_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    let io = TokioIo::new(tls);
    let req = Request::get(format!("https://{sni}{path}"))
        .header("host", sni)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = if h2 {
        let (mut tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(conn);
        tx.send_request(req).await
    } else {
        let (mut tx, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("h1 handshake: {e}"))?;
        tokio::spawn(conn);
        let mut req = req;
        *req.uri_mut() = path.parse().map_err(|e| format!("path: {e}"))?;
        tx.send_request(req).await
    }
    .map_err(|e| format!("request: {e}"))?;
    let status = resp.status().as_u16();
    let version = resp.version();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok(TlsReply {
        status,
        version,
        body: String::from_utf8_lossy(&body).into_owned(),
        headers,
        server_cert,
    })
}
