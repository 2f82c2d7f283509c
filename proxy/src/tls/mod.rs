//! TLS with rustls: termination on listeners ([`server`]), origination to clusters
//! ([`client`]), the ClientHello reader SNI routing needs ([`sni`]), and the material both
//! sides load from PEM files and reload when the files change ([`files`]).
//!
//! Material is read when a configuration is applied (a bad file fails the configuration,
//! located) and again when its files change (polled every second) or on SIGHUP; a new file that
//! does not load is logged and counted, and the material already loaded keeps serving. New
//! handshakes use the newest material; open connections are not touched.

pub mod client;
pub mod files;
pub mod io;
pub mod server;
pub mod sni;

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;

use crate::config::TlsVersion;
use crate::metrics::ReloadLabels;
pub use crate::metrics::TlsMetrics;

/// ALPN a weft sidecar offers on mesh mTLS carrying raw TCP (the inbound side splices it to
/// the workload instead of serving HTTP).
pub const ALPN_TCP: &[u8] = b"weft-tcp";
/// ALPN a weft sidecar adds to what it offers on mesh mTLS carrying HTTP: with [`ALPN_TCP`] it
/// tells a mesh peer's ClientHello from a TLS client of the workload's own.
pub const ALPN_MESH: &[u8] = b"weft-mesh";

/// The crypto every TLS context of the proxy uses: aws-lc-rs, whose key exchange offers the hybrid
/// post-quantum X25519MLKEM768 first.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// The handshake signature checks of the verifiers weft writes (the provider's algorithms).
pub fn verify_tls12_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &rustls::DigitallySignedStruct,
) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls12_signature(
        message,
        cert,
        dss,
        &provider().signature_verification_algorithms,
    )
}

/// As [`verify_tls12_signature`], for TLS 1.3.
pub fn verify_tls13_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &rustls::DigitallySignedStruct,
) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider().signature_verification_algorithms,
    )
}

/// The signature schemes those checks support.
pub fn signature_schemes() -> Vec<rustls::SignatureScheme> {
    provider()
        .signature_verification_algorithms
        .supported_schemes()
}

fn versions(min: TlsVersion) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static BOTH: &[&rustls::SupportedProtocolVersion] =
        &[&rustls::version::TLS13, &rustls::version::TLS12];
    static ONLY_13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    match min {
        TlsVersion::Tls12 => BOTH,
        TlsVersion::Tls13 => ONLY_13,
    }
}

/// `TLSv1.2` / `TLSv1.3`, as Envoy's `connection.tls_version` spells them.
pub fn version_name(v: Option<rustls::ProtocolVersion>) -> &'static str {
    match v {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "unknown",
    }
}

/// Who the peer of a TLS connection proved to be, from its verified certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// URI SANs (`spiffe://…`), in certificate order.
    pub uris: Vec<String>,
    /// DNS SANs.
    pub dns: Vec<String>,
    /// The subject, RFC 4514 style.
    pub subject: String,
    /// Hex SHA-256 of the certificate's DER.
    pub sha256: String,
}

impl PeerIdentity {
    /// The identity a user names: the first URI SAN, else the first DNS SAN, else the subject.
    pub fn principal(&self) -> &str {
        self.uris
            .first()
            .or(self.dns.first())
            .map_or(self.subject.as_str(), String::as_str)
    }

    pub fn from_der(der: &CertificateDer<'_>) -> Option<PeerIdentity> {
        use sha2::Digest;
        let names = files::cert_names(der).ok()?;
        Some(PeerIdentity {
            uris: names.uris,
            dns: names.dns,
            subject: names.subject,
            sha256: hex_digest(&sha2::Sha256::digest(der.as_ref())),
        })
    }
}

/// Lowercase hex of `bytes` (digests, fingerprints).
pub fn hex_digest(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// What a downstream TLS handshake settled, kept on the connection.
#[derive(Debug, Clone, Default)]
pub struct TlsInfo {
    pub version: &'static str,
    pub alpn: Option<String>,
    pub sni: Option<String>,
    /// Present when the client sent a certificate that verified.
    pub peer: Option<PeerIdentity>,
}

/// Re-reads TLS material when its files changed (or always, when `force`): `build` loads it,
/// `apply` installs what loaded; the outcome is counted and logged (`who`: `listener main`,
/// `cluster api`). A failure keeps the loaded material; its files' new stamps are recorded so a
/// broken file is reported once, not every poll.
pub(crate) fn reload<T>(
    watched: &std::sync::Mutex<files::Watched>,
    force: bool,
    metrics: &TlsMetrics,
    who: &str,
    build: impl FnOnce() -> Result<T, Vec<(String, String)>>,
    apply: impl FnOnce(T),
) -> Result<bool, String> {
    let mut watched = watched.lock().unwrap_or_else(|e| e.into_inner());
    if !force && !watched.changed() {
        return Ok(false);
    }
    watched.refresh();
    let (result, outcome) = match build() {
        Ok(material) => {
            apply(material);
            tracing::info!(of = who, "TLS material reloaded");
            (Ok(true), "applied")
        }
        Err(errors) => {
            let text = errors
                .iter()
                .map(|(at, e)| format!("tls.{at}: {e}"))
                .collect::<Vec<_>>()
                .join("; ");
            tracing::error!(
                of = who,
                "TLS reload rejected, the loaded material keeps serving: {text}"
            );
            (Err(text), "rejected")
        }
    };
    metrics
        .reloads
        .get_or_create(&ReloadLabels { result: outcome })
        .inc();
    result
}

/// Why a handshake failed, as the `reason` label says it.
pub fn failure_reason(e: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<Error>()) else {
        return match e.kind() {
            std::io::ErrorKind::TimedOut => "timeout",
            std::io::ErrorKind::UnexpectedEof => "eof",
            _ => "io",
        };
    };
    match inner {
        Error::NoCertificatesPresented => "no_client_certificate",
        Error::InvalidCertificate(CertificateError::Expired | CertificateError::NotValidYet) => {
            "certificate_expired"
        }
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_ca",
        Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => "wrong_name",
        Error::InvalidCertificate(_) => "bad_certificate",
        Error::NoApplicationProtocol => "no_application_protocol",
        Error::AlertReceived(_) => "alert_received",
        Error::PeerIncompatible(_) => "incompatible",
        _ => "protocol_error",
    }
}
