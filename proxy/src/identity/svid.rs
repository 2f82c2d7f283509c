//! The proxy's certificate material: a private key made here (ECDSA P-256, never sent
//! anywhere), the certificate chain the control plane's CA issued for it (an X.509 SVID), and
//! the trust bundle (the roots of the trust domain). Kept behind an atomic pointer: a renewal
//! or a new bundle swaps it, new handshakes use the new material, open connections keep theirs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::sign::CertifiedKey;

use super::spiffe::SpiffeId;
use crate::tls::files::cert_names;

/// A fresh ECDSA P-256 key.
pub fn new_key() -> Result<rcgen::KeyPair, String> {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| format!("cannot make a key: {e}"))
}

/// A certificate signing request for `key`. It names nothing: the control plane decides the
/// certificate's names from the registration, never from the request.
pub fn csr(key: &rcgen::KeyPair) -> Result<Vec<u8>, String> {
    let params = rcgen::CertificateParams::default();
    params
        .serialize_request(key)
        .map(|r| r.der().to_vec())
        .map_err(|e| format!("cannot make a certificate request: {e}"))
}

/// The trust bundle: the roots of the trust domain, at a generation the control plane counts.
#[derive(Debug)]
pub struct Bundle {
    pub roots: Vec<CertificateDer<'static>>,
    pub store: Arc<RootCertStore>,
    pub generation: u64,
}

impl Bundle {
    pub fn new(roots: Vec<Vec<u8>>, generation: u64) -> Result<Bundle, String> {
        if roots.is_empty() {
            return Err("the trust bundle is empty".into());
        }
        let roots: Vec<CertificateDer<'static>> =
            roots.into_iter().map(CertificateDer::from).collect();
        let mut store = RootCertStore::empty();
        for (i, r) in roots.iter().enumerate() {
            store
                .add(r.clone())
                .map_err(|e| format!("trust bundle root {i}: {e}"))?;
        }
        Ok(Bundle {
            roots,
            store: Arc::new(store),
            generation,
        })
    }
}

/// An issued certificate with its key.
#[derive(Debug)]
pub struct Svid {
    pub id: SpiffeId,
    /// The node id the control plane registered (the certificate's common name).
    pub node: String,
    pub chain: Vec<CertificateDer<'static>>,
    pub certified: Arc<CertifiedKey>,
    /// PKCS#8 DER of the key (kept to save it).
    key_der: Vec<u8>,
    pub not_before: i64,
    pub not_after: i64,
    /// When this proxy got (or loaded) it, Unix seconds: certificates are backdated for clock
    /// skew, so their life here starts now, not at `not_before`.
    received: i64,
}

impl Svid {
    /// Checks that `chain` is a certificate for `key` with one SPIFFE ID that verifies up to
    /// `bundle`, now.
    pub fn new(key_der: Vec<u8>, chain: Vec<Vec<u8>>, bundle: &Bundle) -> Result<Svid, String> {
        Svid::new_at(key_der, chain, bundle, None)
    }

    /// As [`Svid::new`]; `at`: verify at this time instead of now.
    fn new_at(
        key_der: Vec<u8>,
        chain: Vec<Vec<u8>>,
        bundle: &Bundle,
        at: Option<UnixTime>,
    ) -> Result<Svid, String> {
        if chain.is_empty() {
            return Err("the certificate chain is empty".into());
        }
        let chain: Vec<CertificateDer<'static>> =
            chain.into_iter().map(CertificateDer::from).collect();
        let names = cert_names(&chain[0])?;
        let [uri] = names.uris.as_slice() else {
            return Err(format!(
                "the certificate must have exactly one URI SAN (a SPIFFE ID), it has {}",
                names.uris.len()
            ));
        };
        let id = SpiffeId::parse(uri)?;
        let node = names
            .common_name
            .clone()
            .ok_or("the certificate has no common name (the node id)")?;
        let provider = crate::tls::provider();
        let signing = provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                key_der.clone(),
            )))
            .map_err(|e| format!("the key does not load: {e}"))?;
        let certified = CertifiedKey::new(chain.clone(), signing);
        certified
            .keys_match()
            .map_err(|_| "the certificate is not for this key".to_owned())?;
        verify_chain(&chain, bundle, at.unwrap_or_else(UnixTime::now)).map_err(|e| {
            format!("the certificate does not verify against the trust bundle: {e}")
        })?;
        let not_before = x509_parser::parse_x509_certificate(chain[0].as_ref())
            .map(|(_, c)| c.validity().not_before.timestamp())
            .unwrap_or(0);
        Ok(Svid {
            id,
            node,
            chain,
            certified: Arc::new(certified),
            key_der,
            not_before,
            not_after: names.not_after,
            received: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
        })
    }

    /// When to renew: at about half of the life it has left from when it was received,
    /// jittered by ±10 % of that so a fleet issued at once does not renew at once. Unix
    /// seconds.
    pub fn renew_at(&self) -> i64 {
        let start = self.received.max(self.not_before);
        let life = (self.not_after - start).max(1);
        let jitter = life / 10;
        start + life / 2 + fastrand::i64(-jitter..=jitter)
    }
}

/// Verifies `chain` (leaf first) up to a root of `bundle`, for use by a client or a server.
pub fn verify_chain(
    chain: &[CertificateDer<'_>],
    bundle: &Bundle,
    now: UnixTime,
) -> Result<(), rustls::Error> {
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or(rustls::Error::NoCertificatesPresented)?;
    let cert = rustls::server::ParsedCertificate::try_from(leaf)?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &cert,
        &bundle.store,
        intermediates,
        now,
        crate::tls::provider().signature_verification_algorithms.all,
    )
}

/// The proxy's current identity: an issued certificate and the bundle, swapped whole; and the
/// module signing keys its control plane requires (trusted as `module_trust` is).
#[derive(Debug)]
pub struct Material {
    pub svid: Svid,
    pub bundle: Bundle,
    pub module_keys: Vec<crate::wasm::signing::PublicKey>,
}

/// Writes a file only its owner can read (keys, credentials), through a synced temporary file
/// and a rename: a crash leaves the old file or the new one.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Where the proxy keeps its identity: one file, mode 0600 (it holds the key).
pub fn identity_file(state_dir: &Path) -> PathBuf {
    state_dir.join("identity.json")
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    key_pkcs8: String,
    chain: Vec<String>,
    bundle: Vec<String>,
    bundle_generation: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    module_keys: Vec<String>,
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(s: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| e.to_string())
}

impl Material {
    pub fn new(
        key_der: Vec<u8>,
        chain: Vec<Vec<u8>>,
        bundle: Vec<Vec<u8>>,
        generation: u64,
    ) -> Result<Material, String> {
        let bundle = Bundle::new(bundle, generation)?;
        let svid = Svid::new(key_der, chain, &bundle)?;
        Ok(Material {
            svid,
            bundle,
            module_keys: Vec::new(),
        })
    }

    /// The same, trusting these module signing keys.
    pub fn with_module_keys(mut self, keys: Vec<crate::wasm::signing::PublicKey>) -> Material {
        self.module_keys = keys;
        self
    }

    /// The same certificate under a new bundle: it must chain to one of its roots (checked
    /// within the certificate's validity: an expired certificate still takes a bundle, renewal
    /// replaces it).
    pub fn with_bundle(&self, roots: Vec<Vec<u8>>, generation: u64) -> Result<Material, String> {
        let bundle = Bundle::new(roots, generation)?;
        let middle = (self.svid.not_before + self.svid.not_after) / 2;
        let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(middle.max(0) as u64));
        let mut svid = Svid::new_at(
            self.svid.key_der.clone(),
            self.svid.chain.iter().map(|c| c.to_vec()).collect(),
            &bundle,
            Some(at),
        )?;
        svid.received = self.svid.received;
        Ok(Material {
            svid,
            bundle,
            module_keys: self.module_keys.clone(),
        })
    }

    /// Saves it (temporary file, synced, renamed; mode 0600).
    pub fn save(&self, state_dir: &Path) -> std::io::Result<()> {
        let saved = Saved {
            key_pkcs8: b64(&self.svid.key_der),
            chain: self.svid.chain.iter().map(|c| b64(c)).collect(),
            bundle: self.bundle.roots.iter().map(|c| b64(c)).collect(),
            bundle_generation: self.bundle.generation,
            module_keys: self.module_keys.iter().map(|k| k.to_string()).collect(),
        };
        let bytes = serde_json::to_vec(&saved).map_err(std::io::Error::other)?;
        write_private(&identity_file(state_dir), &bytes)
    }

    /// The saved identity, if there is one; an error when it is there but unusable.
    pub fn load(state_dir: &Path) -> Result<Option<Material>, String> {
        let path = identity_file(state_dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let damaged = |e: String| format!("{} is damaged: {e}", path.display());
        let saved: Saved = serde_json::from_slice(&bytes).map_err(|e| damaged(e.to_string()))?;
        let list = |v: &[String]| v.iter().map(|s| unb64(s)).collect::<Result<Vec<_>, _>>();
        let keys = saved
            .module_keys
            .iter()
            .map(|k| crate::wasm::signing::PublicKey::parse(k))
            .collect::<Result<Vec<_>, _>>()
            .map_err(damaged)?;
        Material::new(
            unb64(&saved.key_pkcs8).map_err(damaged)?,
            list(&saved.chain).map_err(damaged)?,
            list(&saved.bundle).map_err(damaged)?,
            saved.bundle_generation,
        )
        .map(|m| Some(m.with_module_keys(keys)))
        .map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// The proxy's identity as every TLS context reads it.
#[derive(Debug)]
pub struct Identity {
    current: ArcSwap<Material>,
    /// Serializes read-modify-write changes (a renewal and a new bundle at once).
    changing: std::sync::Mutex<()>,
}

impl Identity {
    pub fn new(m: Material) -> Arc<Identity> {
        Arc::new(Identity {
            current: ArcSwap::from_pointee(m),
            changing: std::sync::Mutex::new(()),
        })
    }

    /// Replaces the material with what `f` makes of the current one, atomically with other
    /// updates; an error changes nothing.
    pub fn update(
        &self,
        f: impl FnOnce(&Material) -> Result<Material, String>,
    ) -> Result<Arc<Material>, String> {
        let _one = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let next = Arc::new(f(&self.current.load())?);
        self.current.store(next.clone());
        Ok(next)
    }

    pub fn current(&self) -> Arc<Material> {
        self.current.load_full()
    }

    pub fn set(&self, m: Material) {
        self.current.store(Arc::new(m));
    }

    pub fn id(&self) -> SpiffeId {
        self.current.load().svid.id.clone()
    }
}

/// The PKCS#8 DER of a key made by [`new_key`].
pub fn key_der(key: &rcgen::KeyPair) -> Vec<u8> {
    key.serialize_der()
}

/// A stand-in identity (`spiffe://validate.invalid/ns/weft/sa/validate`, from a throwaway root)
/// to check configurations that use `tls: mesh` where no real identity exists: `weft validate`
/// and the control plane's validation. Never used for a handshake.
pub fn placeholder() -> Result<Arc<Identity>, String> {
    placeholder_trusting(Vec::new())
}

/// As [`placeholder`], trusting module signing keys (the control plane validates with its own).
pub fn placeholder_trusting(
    module_keys: Vec<crate::wasm::signing::PublicKey>,
) -> Result<Arc<Identity>, String> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, SanType};
    let err = |e: rcgen::Error| e.to_string();
    let root_key = new_key()?;
    let mut root = CertificateParams::default();
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root.distinguished_name
        .push(DnType::CommonName, "weft validation stand-in");
    let root_cert = root.self_signed(&root_key).map_err(err)?;
    let key = new_key()?;
    let mut leaf = CertificateParams::default();
    leaf.distinguished_name.push(DnType::CommonName, "validate");
    leaf.subject_alt_names = vec![SanType::URI(
        "spiffe://validate.invalid/ns/weft/sa/validate"
            .try_into()
            .map_err(err)?,
    )];
    let issuer = Issuer::from_params(&root, &root_key);
    let cert = leaf.signed_by(&key, &issuer).map_err(err)?;
    let m = Material::new(
        key_der(&key),
        vec![cert.der().to_vec()],
        vec![root_cert.der().to_vec()],
        0,
    )?;
    Ok(Identity::new(m.with_module_keys(module_keys)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A saved identity round-trips; a damaged one is an error, never a half identity.
    #[test]
    fn a_damaged_identity_file_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let id = placeholder().expect("identity");
        id.current().save(dir.path()).expect("saved");
        let m = Material::load(dir.path()).expect("loads").expect("there");
        assert_eq!(m.svid.id, id.id());
        let file = identity_file(dir.path());
        let text = std::fs::read_to_string(&file).expect("file");
        for damaged in [
            text[..text.len() / 2].to_owned(),
            text.replacen("\"bundle\":[\"", "\"bundle\":[\"AAAA", 1),
            text.replacen("\"key_pkcs8\":\"", "\"key_pkcs8\":\"AAAA", 1),
            text.replacen(
                "\"bundle_generation\"",
                "\"module_keys\":[\"ed25519:xx\"],\"bundle_generation\"",
                1,
            ),
            String::new(),
        ] {
            std::fs::write(&file, &damaged).expect("damage");
            assert!(Material::load(dir.path()).is_err(), "{damaged}");
        }
        std::fs::remove_file(&file).expect("rm");
        assert!(Material::load(dir.path()).expect("no file").is_none());
    }
}
