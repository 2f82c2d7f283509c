//! TLS metric families: handshakes and their failures, certificate expiry, reloads of
//! certificate material.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `listener` or `cluster`.
    pub side: &'static str,
    pub name: String,
    pub version: &'static str,
    pub alpn: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub side: &'static str,
    pub name: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    pub side: &'static str,
    pub name: String,
    pub file: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: &'static str,
}

/// TLS metric families (registered with the proxy's others).
#[derive(Debug, Clone, Default)]
pub struct TlsMetrics {
    pub handshakes: Family<HandshakeLabels, Counter>,
    pub failures: Family<FailureLabels, Counter>,
    pub expiry: Family<CertLabels, Gauge>,
    pub reloads: Family<ReloadLabels, Counter>,
}

impl TlsMetrics {
    pub fn register(&self, reg: &mut Registry) {
        reg.register(
            "tls_handshakes",
            "TLS handshakes completed, by side (listener, cluster), name, version and ALPN protocol",
            self.handshakes.clone(),
        );
        reg.register(
            "tls_handshake_failures",
            "TLS handshakes that failed, by side, name and reason",
            self.failures.clone(),
        );
        reg.register(
            "tls_certificate_expiry_timestamp_seconds",
            "When each loaded certificate expires (Unix time), by side, name and file",
            self.expiry.clone(),
        );
        reg.register(
            "tls_reloads",
            "Certificate material re-read after its files changed, by result (applied, rejected)",
            self.reloads.clone(),
        );
    }

    pub fn handshake(&self, side: &'static str, name: &str, version: &'static str, alpn: &str) {
        self.handshakes
            .get_or_create(&HandshakeLabels {
                side,
                name: name.to_owned(),
                version,
                alpn: alpn.to_owned(),
            })
            .inc();
    }

    pub fn failure(&self, side: &'static str, name: &str, reason: &'static str) {
        self.failures
            .get_or_create(&FailureLabels {
                side,
                name: name.to_owned(),
                reason,
            })
            .inc();
    }
}
