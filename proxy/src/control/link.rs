//! The proxy's end of the control link: a gRPC channel over TLS 1.3 that presents the proxy's
//! SVID and accepts the control plane only by its identity
//! (`spiffe://<td>/ns/weft-system/sa/weft-cp`) under the trust bundle — or, before the proxy
//! has an identity (enrollment), by the root its join token pins. Plaintext only with
//! `--insecure-plaintext`.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::Digest;

use crate::identity::mesh::{PeerPolicy, client_config};
use crate::identity::svid::{Bundle, verify_chain};
use crate::identity::{CONTROL_PLANE_NS, CONTROL_PLANE_SA, Identity, SpiffeId};
use crate::tls::files::cert_names;

/// How the link is secured.
#[derive(Debug, Clone)]
pub enum LinkSecurity {
    /// `--insecure-plaintext`.
    Plain,
    /// Enrollment: the control plane's chain must end at the root with this SHA-256 (hex).
    Pinned(String),
    /// An operator with a token: the control plane's chain must end at one of these roots.
    Trusted(Vec<Vec<u8>>),
    /// The proxy's identity, both ways.
    Mesh(Arc<Identity>),
}

/// `https://host:port` → (`http://host:port` for tonic, which does no TLS here, and the host
/// for SNI). `http://` URLs are only for the plaintext link.
pub fn split_url(url: &str, plain: bool) -> Result<(String, String), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("--control-plane {url:?}: expected https://host:port"))?;
    match (scheme, plain) {
        ("https", false) | ("http", true) => {}
        ("http", false) => {
            return Err(format!(
                "--control-plane {url}: the control link is TLS (https://…); plaintext needs --insecure-plaintext"
            ));
        }
        ("https", true) => {
            return Err(format!(
                "--control-plane {url}: --insecure-plaintext takes an http:// URL"
            ));
        }
        _ => {
            return Err(format!(
                "--control-plane {url:?}: expected https://host:port"
            ));
        }
    }
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.rsplit_once(':') {
        Some((h, _)) => h,
        None => authority,
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if host.is_empty() {
        return Err(format!("--control-plane {url:?}: no host"));
    }
    Ok((format!("http://{rest}"), host))
}

/// The control plane's identity in `td`.
pub fn control_plane_id(td: &str) -> Result<SpiffeId, String> {
    SpiffeId::workload(td, CONTROL_PLANE_NS, CONTROL_PLANE_SA)
}

/// Accepts a server whose chain ends at the pinned root (it sends its root along) or at one of
/// the given roots, and whose identity is a control plane's.
#[derive(Debug)]
struct PinVerifier {
    pin: Option<String>,
    roots: Vec<Vec<u8>>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let bad = |why: &str| {
            tracing::warn!("the control plane's certificate is refused: {why}");
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
        };
        let roots = match &self.pin {
            Some(pin) => {
                let root = intermediates
                    .iter()
                    .find(|c| crate::tls::hex_digest(&sha2::Sha256::digest(c.as_ref())) == *pin)
                    .ok_or_else(|| {
                        bad("its chain does not end at the root the join token pins (was the CA rotated? make a new token)")
                    })?;
                vec![root.to_vec()]
            }
            None => self.roots.clone(),
        };
        let bundle = Bundle::new(roots, 0).map_err(|e| bad(&e))?;
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        verify_chain(&chain, &bundle, now).map_err(|e| bad(&e.to_string()))?;
        let names = cert_names(end_entity).map_err(|e| bad(&e))?;
        let ok = names
            .uris
            .iter()
            .filter_map(|u| SpiffeId::parse(u).ok())
            .any(|id| id.workload_parts() == Some((CONTROL_PLANE_NS, CONTROL_PLANE_SA)));
        if !ok {
            return Err(bad("it is not a control plane's identity"));
        }
        Ok(ServerCertVerified::assertion())
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

fn tls_config(security: &LinkSecurity) -> Result<Option<rustls::ClientConfig>, String> {
    let verifier = match security {
        LinkSecurity::Plain => return Ok(None),
        LinkSecurity::Mesh(identity) => {
            let td = identity.id().trust_domain().to_owned();
            let policy = PeerPolicy {
                identity: identity.clone(),
                allowed: vec![control_plane_id(&td)?],
            };
            return client_config(policy, &[b"h2"])
                .map(Some)
                .map_err(|e| e.to_string());
        }
        LinkSecurity::Pinned(pin) => PinVerifier {
            pin: Some(pin.clone()),
            roots: Vec::new(),
        },
        LinkSecurity::Trusted(roots) => PinVerifier {
            pin: None,
            roots: roots.clone(),
        },
    };
    let mut c = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    c.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Some(c))
}

/// How often the proxy pings the control plane and how long it waits for the answer: a
/// replica that stopped answering (a half-open link) is left within 20 s.
pub const KEEPALIVE: Duration = Duration::from_secs(10);

/// A channel to the control plane.
pub async fn connect(
    url: &str,
    security: &LinkSecurity,
) -> Result<tonic::transport::Channel, String> {
    let plain = matches!(security, LinkSecurity::Plain);
    let (uri, host) = split_url(url, plain)?;
    let endpoint = tonic::transport::Endpoint::from_shared(uri)
        .map_err(|e| format!("invalid URL: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(KEEPALIVE)
        .keep_alive_while_idle(true);
    let Some(config) = tls_config(security)? else {
        let service = tower::service_fn(|uri: http::Uri| async move {
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(dial(&uri).await?))
        });
        return endpoint
            .connect_with_connector(service)
            .await
            .map_err(connect_error);
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(host.clone())
        .map_err(|_| format!("--control-plane: invalid host {host:?}"))?;
    let service = tower::service_fn(move |uri: http::Uri| {
        let connector = connector.clone();
        let name = name.clone();
        async move {
            let tcp = dial(&uri).await?;
            let tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
                })??;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    endpoint
        .connect_with_connector(service)
        .await
        .map_err(connect_error)
}

/// A TCP connection to `uri`'s host: a name with several addresses (a headless service of
/// replicas) is tried address by address from a random one, so that proxies spread over them
/// and one that is down is passed over.
async fn dial(uri: &http::Uri) -> std::io::Result<tokio::net::TcpStream> {
    let authority = uri
        .authority()
        .map(|a| a.to_string())
        .ok_or_else(|| std::io::Error::other("no authority"))?;
    let mut addrs: Vec<std::net::SocketAddr> = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::lookup_host(authority.as_str()),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "name lookup timed out"))??
    .collect();
    if addrs.is_empty() {
        return Err(std::io::Error::other(format!("{authority}: no address")));
    }
    let start = fastrand::usize(..addrs.len());
    addrs.rotate_left(start);
    let mut last = None;
    for addr in addrs {
        match tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(addr))
            .await
        {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                return Ok(tcp);
            }
            Ok(Err(e)) => last = Some(e),
            Err(_) => {
                last = Some(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connect to {addr} timed out"),
                ));
            }
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no address answered")))
}

fn connect_error(e: tonic::transport::Error) -> String {
    use std::error::Error;
    let mut text = format!("cannot connect: {e}");
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_say_whether_the_link_is_tls() {
        assert_eq!(
            split_url("https://cp.example:18000", false).expect("ok"),
            (
                "http://cp.example:18000".to_owned(),
                "cp.example".to_owned()
            )
        );
        assert_eq!(
            split_url("https://[::1]:18000", false).expect("ok").1,
            "::1"
        );
        assert!(split_url("http://cp:18000", false).is_err());
        assert!(split_url("https://cp:18000", true).is_err());
        assert!(split_url("http://127.0.0.1:1", true).is_ok());
        assert!(split_url("cp:18000", false).is_err());
        assert!(split_url("ftp://cp:1", false).is_err());
        assert!(split_url("https://:1", false).is_err());
    }
}
