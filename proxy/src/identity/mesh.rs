//! rustls pieces that read the proxy's current identity at every handshake: the certificate it
//! presents (as a server and as a client) and the verification of a peer's SVID — its chain up
//! to the trust bundle, its SPIFFE ID in the trust domain, and, when a list is given, one of
//! the allowed identities. Server names do not matter in the mesh: identities do.

use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use super::spiffe::SpiffeId;
use super::svid::{Identity, verify_chain};
use crate::tls::files::cert_names;
use crate::tls::provider;

/// Presents the current SVID.
#[derive(Debug)]
pub struct SvidResolver(pub Arc<Identity>);

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().svid.certified.clone())
    }
}

impl ResolvesClientCert for SvidResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().svid.certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Which peers a mesh connection accepts.
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    pub identity: Arc<Identity>,
    /// Empty: any identity of the trust domain.
    pub allowed: Vec<SpiffeId>,
}

impl PeerPolicy {
    /// The peer's SPIFFE ID, if its chain verifies and its ID is accepted.
    pub fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<SpiffeId, rustls::Error> {
        let material = self.identity.current();
        let mut chain = Vec::with_capacity(1 + intermediates.len());
        chain.push(end_entity.clone());
        chain.extend(intermediates.iter().cloned());
        verify_chain(&chain, &material.bundle, now).inspect_err(|e| {
            tracing::debug!("peer certificate refused: {e}");
        })?;
        let bad = || rustls::Error::InvalidCertificate(CertificateError::NotValidForName);
        let names = cert_names(end_entity).map_err(|_| bad())?;
        let [uri] = names.uris.as_slice() else {
            return Err(bad());
        };
        let id = SpiffeId::parse(uri).map_err(|_| bad())?;
        if id.trust_domain() != material.svid.id.trust_domain() {
            return Err(bad());
        }
        if !self.allowed.is_empty() && !self.allowed.contains(&id) {
            return Err(bad());
        }
        Ok(id)
    }
}

/// Verifies a server's SVID (the name dialed is not checked: the identity is).
#[derive(Debug)]
pub struct MeshServerVerifier(pub PeerPolicy);

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.check(end_entity, intermediates, now)?;
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

/// Verifies a client's SVID. `required: false` lets clients without a certificate through
/// (the control plane's enrollment and operator calls); one that presents a certificate must
/// still present a good one.
#[derive(Debug)]
pub struct MeshClientVerifier {
    pub policy: PeerPolicy,
    pub required: bool,
}

impl ClientCertVerifier for MeshClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.required
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.policy.check(end_entity, intermediates, now)?;
        Ok(ClientCertVerified::assertion())
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

/// Why `tls: mesh` cannot be built without an identity.
pub const NEEDS_IDENTITY: &str = "`mesh` needs the proxy's mesh identity: run weft with --control-plane https://… (enrolled with a join token)";

/// Parses a list of allowed identities (`spiffe://…`), each exactly.
pub fn parse_identities(list: &[String]) -> Result<Vec<SpiffeId>, String> {
    list.iter()
        .enumerate()
        .map(|(i, s)| SpiffeId::parse(s).map_err(|e| format!("[{i}]: {e}")))
        .collect()
}

/// A server config presenting the SVID and verifying clients by `policy`. TLS 1.3 only.
pub fn server_config(
    policy: PeerPolicy,
    required: bool,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, rustls::Error> {
    let resolver = Arc::new(SvidResolver(policy.identity.clone()));
    let mut c = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(MeshClientVerifier { policy, required }))
        .with_cert_resolver(resolver);
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(c)
}

/// A client config presenting the SVID and verifying the server by `policy`. TLS 1.3 only.
pub fn client_config(
    policy: PeerPolicy,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, rustls::Error> {
    let resolver = Arc::new(SvidResolver(policy.identity.clone()));
    let mut c = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(MeshServerVerifier(policy)))
        .with_client_cert_resolver(resolver);
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(c)
}
