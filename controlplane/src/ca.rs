//! The mesh's certificate authority (the Istio-Auth role): a root generated at first start and
//! kept next to the store (mode 0600), or an operator's intermediate (`--ca-cert`, `--ca-key`);
//! it signs short-lived X.509 SVIDs (ECDSA P-256, one SPIFFE URI SAN, the node id as common
//! name) for certificate requests whose signature proves the key. The request names nothing
//! that matters: every name in a certificate comes from the registration.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use weft_proxy::identity::SpiffeId;

/// Default certificate lifetime (24 h, as Istio's).
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// A generated root's lifetime.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start this much in the past: clocks across a fleet are not exact.
const BACKDATE: Duration = Duration::from_secs(60);
/// The largest certificate request accepted, in bytes.
pub const MAX_CSR: usize = 16 * 1024;

/// Why a certificate request was refused (a metric label each).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("the certificate request does not parse or its signature does not verify")]
    BadRequest,
    #[error("the certificate request is larger than {MAX_CSR} bytes")]
    TooLarge,
    #[error("the certificate request's key must be ECDSA P-256")]
    KeyType,
    #[error("cannot sign: {0}")]
    Signing(String),
}

impl CsrError {
    pub fn reason(&self) -> &'static str {
        match self {
            CsrError::BadRequest => "bad_request",
            CsrError::TooLarge => "too_large",
            CsrError::KeyType => "key_type",
            CsrError::Signing(_) => "signing",
        }
    }
}

/// One key that can sign: a root of ours, or the operator's intermediate.
struct Signer {
    /// The certificate of the signing key.
    cert: CertificateDer<'static>,
    key: KeyPair,
    /// What issued certificates carry after the leaf: empty for a root, the intermediate and
    /// what is above it (without the root) for an intermediate.
    chain: Vec<CertificateDer<'static>>,
    /// The root that anchors it (in the trust bundle).
    anchor: CertificateDer<'static>,
    not_after: i64,
}

impl Signer {
    fn root_id(&self) -> String {
        root_id(&self.anchor)
    }
}

/// A short, stable name for a root: the first 16 hex digits of its DER's SHA-256.
pub fn root_id(der: &[u8]) -> String {
    hex(&Sha256::digest(der))[..16].to_owned()
}

/// The SHA-256 of a root's DER, in hex: what a join token pins.
pub fn pin(der: &[u8]) -> String {
    hex(&Sha256::digest(der))
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write;
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

/// Where root rotation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// One root, issuing.
    Stable,
    /// A new root is in the bundle; issuing still from the old until every proxy has the
    /// bundle.
    Distributing,
    /// Issuing from the new root; the old one stays trusted until every proxy has a
    /// certificate from the new.
    Reissuing,
}

struct State {
    /// Trusted roots' signers, oldest first. With an operator intermediate: one, not rotated.
    signers: Vec<Signer>,
    /// Index of the signer that issues.
    issuing: usize,
    /// Counts every change of the trust bundle.
    generation: u64,
    phase: Phase,
}

/// The CA.
pub struct Ca {
    trust_domain: String,
    /// Where generated roots are kept (memory, a file, etcd); unused for an operator's.
    blob: crate::blob::Blob,
    operator: bool,
    state: Mutex<State>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .finish()
    }
}

#[derive(Serialize, Deserialize)]
struct SavedRoot {
    cert_pem: String,
    key_pem: String,
}

#[derive(Serialize, Deserialize)]
struct Saved {
    trust_domain: String,
    roots: Vec<SavedRoot>,
    issuing: usize,
    generation: u64,
    phase: Phase,
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn not_after_of(der: &[u8]) -> Result<i64, String> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c.validity().not_after.timestamp())
        .map_err(|e| format!("the certificate does not parse: {e}"))
}

fn new_root(trust_domain: &str) -> Result<Signer, String> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "weft");
    dn.push(
        DnType::CommonName,
        format!("weft root {trust_domain} {}", unix(SystemTime::now())),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let td = SpiffeId::with_path(trust_domain, &[])?;
    params.subject_alt_names = vec![SanType::URI(
        td.to_string().try_into().map_err(|e| format!("{e}"))?,
    )];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + ROOT_LIFETIME).into();
    params.serial_number = Some(serial());
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let der = cert.der().clone();
    Ok(Signer {
        not_after: not_after_of(&der)?,
        anchor: der.clone(),
        cert: der,
        key,
        chain: Vec::new(),
    })
}

fn serial() -> SerialNumber {
    let mut b = [0u8; 16];
    for x in &mut b {
        *x = fastrand::u8(..);
    }
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // and not shortened
    SerialNumber::from_slice(&b)
}

fn pem_certs(text: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))
}

fn self_signed(der: &[u8]) -> bool {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c.subject() == c.issuer())
        .unwrap_or(false)
}

/// Parses and checks a certificate request: its signature proves the key, the key is ECDSA
/// P-256.
fn parse_csr(csr: &[u8]) -> Result<CertificateSigningRequestParams, CsrError> {
    if csr.len() > MAX_CSR {
        return Err(CsrError::TooLarge);
    }
    let request =
        CertificateSigningRequestParams::from_der(&csr.into()).map_err(|_| CsrError::BadRequest)?;
    if request.public_key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
        return Err(CsrError::KeyType);
    }
    Ok(request)
}

/// Checks a certificate request without issuing.
pub fn check_csr(csr: &[u8]) -> Result<(), CsrError> {
    parse_csr(csr).map(|_| ())
}

/// What an issue produced.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf first, then intermediates (no root).
    pub chain: Vec<Vec<u8>>,
    pub not_after: i64,
    pub serial: String,
    /// The root it chains to.
    pub root: String,
}

/// Where the CA stands, for `weftctl ca status`.
#[derive(Debug, Clone)]
pub struct CaStatus {
    pub trust_domain: String,
    pub roots: Vec<(String, i64)>,
    pub issuing: String,
    pub generation: u64,
    pub phase: Phase,
    pub operator: bool,
}

impl Ca {
    /// The CA kept in `file` (created with a new root when missing), or in memory.
    pub fn open(trust_domain: &str, file: Option<&Path>) -> Result<Ca, String> {
        Ca::open_in(trust_domain, crate::blob::Blob::file(file))
    }

    /// The CA kept in `blob` (a file, or a key in etcd every replica shares): created with a
    /// new root when there is none. Replicas starting together agree: the first root stored
    /// is everyone's.
    pub fn open_in(trust_domain: &str, mut blob: crate::blob::Blob) -> Result<Ca, String> {
        weft_proxy::identity::spiffe::check_trust_domain(trust_domain)
            .map_err(|e| format!("--trust-domain: {e}"))?;
        for _ in 0..3 {
            if let Some(bytes) = blob.read()? {
                let state = restore(trust_domain, &blob, &bytes)?;
                return Ok(Ca {
                    trust_domain: trust_domain.to_owned(),
                    blob,
                    operator: false,
                    state: Mutex::new(state),
                });
            }
            let ca = Ca {
                trust_domain: trust_domain.to_owned(),
                blob,
                operator: false,
                state: Mutex::new(State {
                    signers: vec![new_root(trust_domain)?],
                    issuing: 0,
                    generation: 1,
                    phase: Phase::Stable,
                }),
            };
            match ca.save() {
                Ok(()) => {
                    if !matches!(ca.blob, crate::blob::Blob::Memory) {
                        tracing::info!(at = %ca.blob.describe(), trust_domain, "generated a new root CA");
                    }
                    return Ok(ca);
                }
                // Another replica stored its root first: that one is the mesh's.
                Err(e) if e == crate::blob::CONFLICT => blob = ca.blob,
                Err(e) => return Err(e),
            }
        }
        Err("the CA could not be read or created".into())
    }

    /// Takes what another replica stored (a rotation moving on), seen by a watch at
    /// `revision`.
    pub fn reload(&self, revision: i64, value: Vec<u8>) -> Result<bool, String> {
        let Some(bytes) = self.blob.seen(revision, value) else {
            return Ok(false);
        };
        let state = restore(&self.trust_domain, &self.blob, &bytes)?;
        *self.lock() = state;
        Ok(true)
    }

    /// Where the CA is kept.
    pub fn blob(&self) -> &crate::blob::Blob {
        &self.blob
    }

    /// An operator's intermediate: `cert_pem` holds it first, then what is above it; the trust
    /// anchor is the last certificate when it is self-signed, else `bundle_pem`'s.
    pub fn operator(
        trust_domain: &str,
        cert_pem: &str,
        key_pem: &str,
        bundle_pem: Option<&str>,
    ) -> Result<Ca, String> {
        weft_proxy::identity::spiffe::check_trust_domain(trust_domain)
            .map_err(|e| format!("--trust-domain: {e}"))?;
        let certs = pem_certs(cert_pem).map_err(|e| format!("--ca-cert: {e}"))?;
        let Some(first) = certs.first().cloned() else {
            return Err("--ca-cert: no certificate".into());
        };
        let key = KeyPair::from_pem(key_pem).map_err(|e| format!("--ca-key: {e}"))?;
        let signs = x509_parser::parse_x509_certificate(&first)
            .map(|(_, c)| {
                c.public_key().raw == rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
            })
            .unwrap_or(false);
        if !signs {
            return Err("--ca-key is not the key of the first certificate in --ca-cert".into());
        }
        let is_ca = x509_parser::parse_x509_certificate(&first)
            .ok()
            .and_then(|(_, c)| c.basic_constraints().ok().flatten().map(|b| b.value.ca))
            .unwrap_or(false);
        if !is_ca {
            return Err("--ca-cert: the first certificate is not a CA certificate".into());
        }
        let (anchor, chain) = match bundle_pem {
            Some(b) => {
                let roots = pem_certs(b).map_err(|e| format!("--ca-bundle: {e}"))?;
                let anchor = roots
                    .into_iter()
                    .next()
                    .ok_or("--ca-bundle: no certificate")?;
                (anchor, certs.clone())
            }
            None => {
                let last = certs.last().cloned().ok_or("--ca-cert: no certificate")?;
                if !self_signed(&last) {
                    return Err(
                        "--ca-cert does not end with a root (self-signed) certificate: name the root with --ca-bundle".into(),
                    );
                }
                let chain: Vec<_> = if certs.len() == 1 {
                    Vec::new()
                } else {
                    certs[..certs.len() - 1].to_vec()
                };
                (last, chain)
            }
        };
        let signer = Signer {
            not_after: not_after_of(&first)?,
            cert: first,
            key,
            chain,
            anchor,
        };
        // The chain must verify: issue a certificate and check it.
        let ca = Ca {
            trust_domain: trust_domain.to_owned(),
            blob: crate::blob::Blob::Memory,
            operator: true,
            state: Mutex::new(State {
                signers: vec![signer],
                issuing: 0,
                generation: 1,
                phase: Phase::Stable,
            }),
        };
        ca.self_check()?;
        Ok(ca)
    }

    /// Issues a throwaway certificate and verifies it against the bundle.
    fn self_check(&self) -> Result<(), String> {
        let key = weft_proxy::identity::svid::new_key()?;
        let csr = weft_proxy::identity::svid::csr(&key)?;
        let id = SpiffeId::with_path(&self.trust_domain, &["weft", "self-check"])?;
        let issued = self
            .issue(&csr, &id, "self-check", Duration::from_secs(120), &[])
            .map_err(|e| e.to_string())?;
        weft_proxy::identity::Material::new(
            weft_proxy::identity::svid::key_der(&key),
            issued.chain,
            self.bundle().1,
            0,
        )
        .map(|_| ())
        .map_err(|e| format!("the CA's certificates do not verify: {e}"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self) -> Result<(), String> {
        if matches!(self.blob, crate::blob::Blob::Memory) || self.operator {
            return Ok(());
        }
        self.blob.write(&self.saved_bytes()?)
    }

    /// The state as [`restore`] reads it.
    fn saved_bytes(&self) -> Result<Vec<u8>, String> {
        let s = self.lock();
        let saved = Saved {
            trust_domain: self.trust_domain.clone(),
            roots: s
                .signers
                .iter()
                .map(|r| SavedRoot {
                    cert_pem: pem("CERTIFICATE", &r.cert),
                    key_pem: r.key.serialize_pem(),
                })
                .collect(),
            issuing: s.issuing,
            generation: s.generation,
            phase: s.phase,
        };
        drop(s);
        serde_json::to_vec_pretty(&saved).map_err(|e| e.to_string())
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust bundle: its generation and roots (DER).
    pub fn bundle(&self) -> (u64, Vec<Vec<u8>>) {
        let s = self.lock();
        (
            s.generation,
            s.signers.iter().map(|r| r.anchor.to_vec()).collect(),
        )
    }

    /// The root the control plane's own certificate chains to (DER).
    pub fn serving_anchor(&self) -> Vec<u8> {
        let s = self.lock();
        s.signers[self.serving_index(&s)].anchor.to_vec()
    }

    /// Starts a root rotation: a new root joins the bundle (issuing stays with the old one
    /// until every proxy has the bundle). Refused with an operator's CA and while one runs.
    pub fn begin_rotation(&self) -> Result<(), String> {
        if self.operator {
            return Err("the CA is an operator's intermediate: rotate it by restarting weft-cp with a new --ca-cert and --ca-key".into());
        }
        let root = new_root(&self.trust_domain)?;
        if self.transition(Phase::Stable, Phase::Distributing, |s| s.signers.push(root))? {
            Ok(())
        } else {
            Err(format!("a rotation is running ({:?})", self.phase()))
        }
    }

    /// Every proxy holds the new bundle: issue from the new root.
    pub fn switch_issuing(&self) -> Result<(), String> {
        self.transition(Phase::Distributing, Phase::Reissuing, |s| {
            s.issuing = s.signers.len() - 1;
        })
        .map(drop)
    }

    /// Every proxy holds a certificate from the new root: the old roots leave the bundle.
    pub fn retire_old_roots(&self) -> Result<(), String> {
        self.transition(Phase::Reissuing, Phase::Stable, |s| {
            let keep = s.signers.remove(s.issuing);
            s.signers = vec![keep];
            s.issuing = 0;
        })
        .map(drop)
    }

    /// Moves a rotation from `from` to `to` with `change`, as a new bundle generation, and
    /// saves it; answers whether it moved (not at `from`: nothing changes).
    fn transition(
        &self,
        from: Phase,
        to: Phase,
        change: impl FnOnce(&mut State),
    ) -> Result<bool, String> {
        let before = self.saved_bytes()?;
        {
            let mut s = self.lock();
            if s.phase != from {
                return Ok(false);
            }
            change(&mut s);
            s.generation += 1;
            s.phase = to;
        }
        if let Err(e) = self.save() {
            // Not stored: nothing changed (a replica that lost the race takes the winner's
            // state from its watch).
            *self.lock() = restore(&self.trust_domain, &self.blob, &before)?;
            return Err(e);
        }
        Ok(true)
    }

    /// The pin of the root the control plane's own certificate chains to.
    pub fn serving_pin(&self) -> String {
        let s = self.lock();
        pin(&s.signers[self.serving_index(&s)].anchor)
    }

    /// The control plane serves with a certificate from the oldest trusted root until a
    /// rotation retires it: operators' credentials (`--init-admin`) and join tokens made
    /// before the rotation keep working while it runs.
    fn serving_index(&self, _s: &State) -> usize {
        0
    }

    pub fn phase(&self) -> Phase {
        self.lock().phase
    }

    /// Signs `csr` for `id`, `node`: the request proves the key, nothing else in it is used.
    pub fn issue(
        &self,
        csr: &[u8],
        id: &SpiffeId,
        node: &str,
        lifetime: Duration,
        dns: &[String],
    ) -> Result<Issued, CsrError> {
        let issuing = self.lock().issuing;
        self.issue_with(issuing, csr, id, node, lifetime, dns)
    }

    /// As [`Ca::issue`], from the root the control plane serves with.
    pub fn issue_serving(
        &self,
        csr: &[u8],
        id: &SpiffeId,
        node: &str,
        lifetime: Duration,
        dns: &[String],
    ) -> Result<Issued, CsrError> {
        let i = {
            let s = self.lock();
            self.serving_index(&s)
        };
        self.issue_with(i, csr, id, node, lifetime, dns)
    }

    fn issue_with(
        &self,
        signer: usize,
        csr: &[u8],
        id: &SpiffeId,
        node: &str,
        lifetime: Duration,
        dns: &[String],
    ) -> Result<Issued, CsrError> {
        let request = parse_csr(csr)?;
        let sign_err = |e: rcgen::Error| CsrError::Signing(e.to_string());
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node);
        params.distinguished_name = dn;
        params.subject_alt_names =
            vec![SanType::URI(id.to_string().try_into().map_err(
                |e: rcgen::Error| CsrError::Signing(e.to_string()),
            )?)];
        for d in dns {
            let name = match d.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(d.clone().try_into().map_err(sign_err)?),
            };
            params.subject_alt_names.push(name);
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(serial());
        let s = self.lock();
        let signer = &s.signers[signer];
        let now = SystemTime::now();
        let mut not_after = now + lifetime;
        // Never past the signer's own end.
        let signer_end =
            SystemTime::UNIX_EPOCH + Duration::from_secs(signer.not_after.max(0) as u64);
        if not_after > signer_end {
            not_after = signer_end;
        }
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        let issuer = Issuer::from_ca_cert_der(&signer.cert, &signer.key).map_err(sign_err)?;
        let cert = params
            .signed_by(&request.public_key, &issuer)
            .map_err(sign_err)?;
        let serial = params
            .serial_number
            .as_ref()
            .map(|s| hex(&s.to_bytes()))
            .unwrap_or_default();
        let mut chain = vec![cert.der().to_vec()];
        chain.extend(signer.chain.iter().map(|c| c.to_vec()));
        Ok(Issued {
            chain,
            not_after: unix(not_after),
            serial,
            root: signer.root_id(),
        })
    }

    pub fn status(&self) -> CaStatus {
        let s = self.lock();
        CaStatus {
            trust_domain: self.trust_domain.clone(),
            roots: s
                .signers
                .iter()
                .map(|r| (r.root_id(), r.not_after))
                .collect(),
            issuing: s.signers[s.issuing].root_id(),
            generation: s.generation,
            phase: s.phase,
            operator: self.operator,
        }
    }
}

/// The CA's state from what [`Ca::save`] wrote.
fn restore(trust_domain: &str, blob: &crate::blob::Blob, bytes: &[u8]) -> Result<State, String> {
    let at = blob.describe();
    let saved: Saved =
        serde_json::from_slice(bytes).map_err(|e| format!("{at} is damaged: {e}"))?;
    if saved.trust_domain != trust_domain {
        return Err(format!(
            "{at} holds the CA of trust domain {:?}, not {trust_domain:?}: a trust domain cannot change under running proxies",
            saved.trust_domain
        ));
    }
    let mut signers = Vec::new();
    for (i, r) in saved.roots.iter().enumerate() {
        let certs = pem_certs(&r.cert_pem)?;
        let cert = certs
            .into_iter()
            .next()
            .ok_or_else(|| format!("{at}: root {i} has no certificate"))?;
        let key =
            KeyPair::from_pem(&r.key_pem).map_err(|e| format!("{at}: root {i}'s key: {e}"))?;
        signers.push(Signer {
            not_after: not_after_of(&cert)?,
            anchor: cert.clone(),
            cert,
            key,
            chain: Vec::new(),
        });
    }
    if signers.is_empty() || saved.issuing >= signers.len() {
        return Err(format!("{at} is damaged: no issuing root"));
    }
    Ok(State {
        signers,
        issuing: saved.issuing,
        generation: saved.generation,
        phase: saved.phase,
    })
}

/// PEM of `der` under `label`, 64 columns.
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// PEM of a certificate.
pub fn cert_pem(der: &[u8]) -> String {
    pem("CERTIFICATE", der)
}

pub use weft_proxy::identity::svid::write_private;

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proxy::identity::Material;
    use weft_proxy::identity::svid::{csr, key_der, new_key};

    fn workload() -> SpiffeId {
        SpiffeId::workload("cluster.local", "shop", "web").expect("id")
    }

    #[test]
    fn an_issued_certificate_carries_the_registered_names_only() {
        let ca = Ca::open("cluster.local", None).expect("ca");
        let key = new_key().expect("key");
        // The request asks for another identity and a DNS name: neither is used.
        let mut asked = CertificateParams::new(vec!["evil.test".to_owned()]).expect("params");
        asked.subject_alt_names.push(SanType::URI(
            "spiffe://cluster.local/weft/admin/root"
                .try_into()
                .expect("uri"),
        ));
        asked
            .distinguished_name
            .push(DnType::CommonName, "someone-else");
        let request = asked.serialize_request(&key).expect("csr").der().to_vec();
        let issued = ca
            .issue(&request, &workload(), "web-1", DEFAULT_LIFETIME, &[])
            .expect("issued");
        let m = Material::new(key_der(&key), issued.chain, ca.bundle().1, 1).expect("verifies");
        assert_eq!(m.svid.id, workload());
        assert_eq!(m.svid.node, "web-1");
        let names = weft_proxy::tls::files::cert_names(&m.svid.chain[0]).expect("names");
        assert!(names.dns.is_empty(), "{:?}", names.dns);
        assert_eq!(names.uris, vec![workload().to_string()]);
        let life = m.svid.not_after - m.svid.not_before;
        assert!((24 * 3600..=24 * 3600 + 61).contains(&life), "{life}");
    }

    fn material(ca: &Ca, ns: &str, sa: &str) -> Material {
        let key = new_key().expect("key");
        let id = SpiffeId::workload(ca.trust_domain(), ns, sa).expect("id");
        let issued = ca
            .issue(&csr(&key).expect("csr"), &id, sa, DEFAULT_LIFETIME, &[])
            .expect("issued");
        Material::new(key_der(&key), issued.chain, ca.bundle().1, 1).expect("material")
    }

    /// One handshake between a mesh client and a mesh server over a pipe: the server's view
    /// of the client (its SPIFFE ID) and the key exchange group, or the error.
    async fn handshake(
        server: Material,
        client: Material,
        server_allows: Vec<SpiffeId>,
        client_allows: Vec<SpiffeId>,
    ) -> Result<(SpiffeId, String), String> {
        use weft_proxy::identity::Identity;
        use weft_proxy::identity::mesh::{PeerPolicy, client_config, server_config};
        let s = PeerPolicy {
            identity: Identity::new(server),
            allowed: server_allows,
        };
        let c = PeerPolicy {
            identity: Identity::new(client),
            allowed: client_allows,
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(
            server_config(s, true, &[]).expect("server config"),
        ));
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(
            client_config(c, &[]).expect("client config"),
        ));
        let (a, b) = tokio::io::duplex(64 * 1024);
        let name = rustls::pki_types::ServerName::try_from("any.name").expect("name");
        let (server, client) = tokio::join!(acceptor.accept(a), connector.connect(name, b));
        let server = server.map_err(|e| e.to_string())?;
        client.map_err(|e| e.to_string())?;
        let conn = server.get_ref().1;
        let peer = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or("no client certificate")?;
        let names = weft_proxy::tls::files::cert_names(peer)?;
        let group = conn
            .negotiated_key_exchange_group()
            .map(|g| format!("{:?}", g.name()))
            .unwrap_or_default();
        Ok((SpiffeId::parse(&names.uris[0])?, group))
    }

    /// Two proxies of one trust domain handshake with their SVIDs, over the hybrid
    /// post-quantum key exchange; a peer from another CA, or not on the allowed list, is
    /// refused.
    #[tokio::test]
    async fn mesh_peers_verify_each_other_by_identity() {
        let ca = Ca::open("cluster.local", None).expect("ca");
        let web = || material(&ca, "shop", "web");
        let db = || material(&ca, "shop", "db");
        let (peer, group) = handshake(db(), web(), vec![], vec![])
            .await
            .expect("handshake");
        assert_eq!(peer.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(group, "X25519MLKEM768");

        let web_id = SpiffeId::workload("cluster.local", "shop", "web").expect("id");
        let db_id = SpiffeId::workload("cluster.local", "shop", "db").expect("id");
        handshake(db(), web(), vec![web_id.clone()], vec![db_id.clone()])
            .await
            .expect("allowed both ways");
        assert!(
            handshake(db(), web(), vec![db_id.clone()], vec![])
                .await
                .is_err(),
            "the server allows only db"
        );
        assert!(
            handshake(db(), web(), vec![], vec![web_id.clone()])
                .await
                .is_err(),
            "the client expects web as the server"
        );

        // Another CA, even of the same trust domain name, is not trusted.
        let other = Ca::open("cluster.local", None).expect("other ca");
        let stranger = material(&other, "shop", "web");
        assert!(handshake(db(), stranger, vec![], vec![]).await.is_err());
        let stranger = material(&other, "shop", "db");
        assert!(handshake(stranger, web(), vec![], vec![]).await.is_err());
        // Another trust domain's identity, chained to a trusted root, is refused too.
        let foreign = Ca::open("other.domain", None).expect("ca");
        assert!(
            handshake(db(), material(&foreign, "shop", "web"), vec![], vec![])
                .await
                .is_err()
        );
    }

    #[test]
    fn bad_requests_are_refused() {
        let ca = Ca::open("cluster.local", None).expect("ca");
        let key = new_key().expect("key");
        let good = csr(&key).expect("csr");
        let id = workload();
        let issue = |b: &[u8]| ca.issue(b, &id, "n", DEFAULT_LIFETIME, &[]);
        assert_eq!(issue(&[]).expect_err("refused"), CsrError::BadRequest);
        assert_eq!(
            issue(&good[..good.len() / 2]).expect_err("refused"),
            CsrError::BadRequest
        );
        // A flipped bit in the signature: the request no longer proves the key.
        let mut forged = good.clone();
        let last = forged.len() - 3;
        forged[last] ^= 1;
        assert_eq!(issue(&forged).expect_err("refused"), CsrError::BadRequest);
        assert_eq!(
            issue(&vec![0x30; MAX_CSR + 1]).expect_err("refused"),
            CsrError::TooLarge
        );
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("key");
        assert_eq!(
            issue(&csr(&p384).expect("csr")).expect_err("refused"),
            CsrError::KeyType
        );
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
        assert_eq!(
            issue(&csr(&ed).expect("csr")).expect_err("refused"),
            CsrError::KeyType
        );
        assert!(issue(&good).is_ok());
    }

    #[test]
    fn the_root_is_kept_private_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("ca.json");
        let a = Ca::open("cluster.local", Some(&file)).expect("ca");
        let mode = std::fs::metadata(&file).expect("file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = Ca::open("cluster.local", Some(&file)).expect("reopened");
        assert_eq!(a.bundle(), b.bundle());
        assert_eq!(a.serving_pin(), b.serving_pin());
        let e = Ca::open("other.domain", Some(&file)).expect_err("another trust domain");
        assert!(e.contains("cannot change"), "{e}");
        std::fs::write(&file, b"{").expect("damage");
        assert!(Ca::open("cluster.local", Some(&file)).is_err());
    }

    #[test]
    fn an_operator_intermediate_issues_chains_that_verify() {
        let root = Ca::open("cluster.local", None).expect("root");
        // The operator's intermediate, signed by their root.
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "intermediate");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let (root_cert, root_key) = {
            let s = root.lock();
            (s.signers[0].cert.clone(), s.signers[0].key.serialize_pem())
        };
        let root_key = KeyPair::from_pem(&root_key).expect("root key");
        let issuer = Issuer::from_ca_cert_der(&root_cert, &root_key).expect("issuer");
        let inter = params.signed_by(&key, &issuer).expect("intermediate");
        let chain_pem = format!("{}{}", inter.pem(), cert_pem(&root_cert));
        let ca = Ca::operator("cluster.local", &chain_pem, &key.serialize_pem(), None)
            .expect("operator CA");
        assert_eq!(ca.bundle().1, vec![root_cert.to_vec()]);
        // Without the root in the file, the bundle must be named.
        let e = Ca::operator("cluster.local", &inter.pem(), &key.serialize_pem(), None)
            .expect_err("no anchor");
        assert!(e.contains("--ca-bundle"), "{e}");
        assert!(
            Ca::operator(
                "cluster.local",
                &inter.pem(),
                &key.serialize_pem(),
                Some(&cert_pem(&root_cert))
            )
            .is_ok()
        );
        // A key that is not the intermediate's.
        let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        assert!(Ca::operator("cluster.local", &chain_pem, &other.serialize_pem(), None).is_err());
    }
}
