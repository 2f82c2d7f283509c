//! TLS settings: termination on listeners, origination on clusters, and raw TCP listeners
//! (with routing by SNI).

use serde::{Deserialize, Serialize};

use super::Dur;

/// Where a TLS context's certificates and trust come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// PEM files named in the configuration.
    #[default]
    Files,
    /// The proxy's mesh identity from the control plane: its SVID is presented, the peer's
    /// SVID is required and verified against the trust bundle (TLS 1.3). `tls: mesh` is short
    /// for `tls: { mode: mesh }`.
    Mesh,
}

impl TlsMode {
    fn is_files(&self) -> bool {
        *self == TlsMode::Files
    }
}

/// A TLS setting that may be written as the word `mesh`.
pub trait MeshShorthand {
    fn mesh() -> Self;
}

/// Deserializes `tls: mesh` or `tls: { … }`.
pub(super) fn tls_or_mesh<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + MeshShorthand,
{
    use serde::de::{self, Visitor};
    struct V<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de> + MeshShorthand> Visitor<'de> for V<T> {
        type Value = Option<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("`mesh` or a map of TLS settings")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            if v == "mesh" {
                Ok(Some(T::mesh()))
            } else {
                Err(E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
        fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Some)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D2: serde::Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_any(self)
        }
    }
    d.deserialize_any(V(std::marker::PhantomData))
}

/// A certificate chain and its private key, as PEM files (relative to the config file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    /// The certificate chain, leaf first.
    pub cert: String,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

/// Whether a listener with a `client_ca` asks for a client certificate or requires one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientCertificate {
    /// A client without a verified certificate is refused during the handshake (mTLS).
    #[default]
    Required,
    /// A certificate is asked for and verified if sent; clients without one are served.
    Optional,
}

/// TLS termination on a listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// Shorthand for one certificate: `tls: { cert: server.pem, key: server.key }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Certificates to serve, chosen by the client's SNI against each certificate's DNS names
    /// (exact, then `*.` wildcards); the first serves clients whose SNI matches none (the
    /// `cert`/`key` shorthand comes first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<CertificateFiles>,
    /// CA bundle (PEM) client certificates are verified against; enables client certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<String>,
    #[serde(default)]
    pub client_certificate: ClientCertificate,
    /// ALPN protocols offered, in preference order. Default: `h2`, `http/1.1` on HTTP
    /// listeners, none on TCP listeners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpn: Option<Vec<String>>,
    #[serde(default)]
    pub min_version: TlsVersion,
    /// Time a client gets to complete the handshake.
    #[serde(default = "defaults::handshake_timeout")]
    pub handshake_timeout: Dur,
    #[serde(default, skip_serializing_if = "TlsMode::is_files")]
    pub mode: TlsMode,
    /// With `mode: mesh`: the client identities (`spiffe://…`) accepted; empty: any identity of
    /// the trust domain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
}

impl MeshShorthand for ListenerTls {
    fn mesh() -> Self {
        ListenerTls {
            cert: None,
            key: None,
            certificates: Vec::new(),
            client_ca: None,
            client_certificate: ClientCertificate::Required,
            alpn: None,
            min_version: TlsVersion::Tls13,
            handshake_timeout: defaults::handshake_timeout(),
            mode: TlsMode::Mesh,
            identities: Vec::new(),
        }
    }
}

impl ListenerTls {
    /// Every certificate, the shorthand's first; `Err` names what is missing from a shorthand
    /// given half.
    pub fn all_certificates(&self) -> Result<Vec<CertificateFiles>, (&'static str, &'static str)> {
        let mut all = Vec::with_capacity(self.certificates.len() + 1);
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => all.push(CertificateFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            (Some(_), None) => return Err(("key", "`cert` needs its `key`")),
            (None, Some(_)) => return Err(("cert", "`key` needs its `cert`")),
            (None, None) => {}
        }
        all.extend(self.certificates.iter().cloned());
        Ok(all)
    }
}

/// TLS origination to a cluster's endpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterTls {
    /// Server name sent (SNI) and verified. Default: the endpoint's host name, or its IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// CA bundle (PEM) the server's certificate must chain to. Default: the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// Client certificate presented to the server (mTLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateFiles>,
    /// The server's certificate must carry one of these SANs (`spiffe://…` URIs or DNS
    /// names) instead of matching the server name: a mesh identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
    #[serde(default)]
    pub min_version: TlsVersion,
    #[serde(default, skip_serializing_if = "TlsMode::is_files")]
    pub mode: TlsMode,
    /// With `mode: mesh`: the server identities (`spiffe://…`) accepted; empty: any identity
    /// of the trust domain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
}

impl MeshShorthand for ClusterTls {
    fn mesh() -> Self {
        ClusterTls {
            sni: None,
            ca: None,
            certificate: None,
            subject_alt_names: Vec::new(),
            min_version: TlsVersion::Tls13,
            mode: TlsMode::Mesh,
            identities: Vec::new(),
        }
    }
}

/// A TCP listener's routing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpProxy {
    /// Tried in order; the first whose `server_names` holds the connection's SNI (or that has
    /// none) takes it. No match: the connection is closed.
    pub routes: Vec<TcpRoute>,
    /// A connection that moves no byte either way for this long is closed (`0s`: never).
    #[serde(default = "defaults::tcp_idle_timeout")]
    pub idle_timeout: Dur,
    /// Time a client gets to send its TLS ClientHello when routes match on SNI.
    #[serde(default = "defaults::handshake_timeout")]
    pub client_hello_timeout: Dur,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpRoute {
    /// SNI names (exact, or `*.suffix`) this route takes; empty: any connection, with or
    /// without SNI. Without `tls` on the listener the SNI is read from the ClientHello and
    /// the TLS stream passes through untouched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub server_names: Vec<String>,
    pub cluster: String,
}

mod defaults {
    use super::Dur;
    use std::time::Duration;

    pub fn handshake_timeout() -> Dur {
        Dur(Duration::from_secs(10))
    }
    pub fn tcp_idle_timeout() -> Dur {
        Dur(Duration::from_secs(3600))
    }
}
