//! Signed filter modules: an Ed25519 signature over a module's digest and its filter's name,
//! checked against trusted public keys before the module is compiled. Keys are written
//! `ed25519:<base64 of the 32-byte key>`; a signature names its key by id (the first 16 hex
//! digits of the key's SHA-256).

use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::Digest;

use crate::config::{Config, ModuleSignature};

/// How a public key is written.
pub const KEY_PREFIX: &str = "ed25519:";

/// A trusted public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    bytes: [u8; 32],
}

impl PublicKey {
    /// Parses `ed25519:<base64>`.
    pub fn parse(text: &str) -> Result<PublicKey, String> {
        let b64 = text.trim().strip_prefix(KEY_PREFIX).ok_or_else(|| {
            format!(
                "{text:?} is not a module key (ed25519:<base64>, as `weftctl keys generate` writes)"
            )
        })?;
        let raw = B64
            .decode(b64)
            .map_err(|e| format!("the key is not base64: {e}"))?;
        let bytes: [u8; 32] = raw
            .try_into()
            .map_err(|_| "an Ed25519 public key is 32 bytes".to_owned())?;
        Ok(PublicKey { bytes })
    }

    /// The key's id: the first 16 hex digits of its SHA-256.
    pub fn id(&self) -> String {
        crate::tls::hex_digest(&sha2::Sha256::digest(self.bytes))[..16].to_owned()
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{KEY_PREFIX}{}", B64.encode(self.bytes))
    }
}

/// What is signed: the filter's name and the module's digest, with a domain separator.
fn message(name: &str, digest: &str) -> Vec<u8> {
    format!("weft-module-signature-v1\0{name}\0{digest}").into_bytes()
}

/// A new key pair: its PKCS#8 document (secret) and its public key.
pub fn generate() -> Result<(Vec<u8>, PublicKey), String> {
    let doc = Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new())
        .map_err(|_| "cannot make a key".to_owned())?;
    let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|e| e.to_string())?;
    let bytes: [u8; 32] = pair
        .public_key()
        .as_ref()
        .try_into()
        .map_err(|_| "unexpected public key size".to_owned())?;
    Ok((doc.as_ref().to_vec(), PublicKey { bytes }))
}

/// Signs `digest` for the filter `name` with a PKCS#8 Ed25519 key.
pub fn sign(pkcs8: &[u8], name: &str, digest: &str) -> Result<ModuleSignature, String> {
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8)
        .map_err(|e| format!("not an Ed25519 private key (PKCS#8): {e}"))?;
    let bytes: [u8; 32] = pair
        .public_key()
        .as_ref()
        .try_into()
        .map_err(|_| "unexpected public key size".to_owned())?;
    let sig = pair.sign(&message(name, digest));
    Ok(ModuleSignature {
        key: PublicKey { bytes }.id(),
        value: B64.encode(sig.as_ref()),
    })
}

/// Checks `signature` of the module `digest` for the filter `name` against `trusted`.
pub fn verify(
    trusted: &[PublicKey],
    name: &str,
    digest: &str,
    signature: Option<&ModuleSignature>,
) -> Result<(), String> {
    let Some(sig) = signature else {
        return Err("the module is not signed, and signatures are required (module_trust)".into());
    };
    let key = trusted.iter().find(|k| k.id() == sig.key).ok_or_else(|| {
        format!(
            "the module is signed by key {}, which is not trusted",
            sig.key
        )
    })?;
    let value = B64
        .decode(&sig.value)
        .map_err(|_| "the signature is not base64".to_owned())?;
    UnparsedPublicKey::new(&ED25519, key.bytes)
        .verify(&message(name, digest), &value)
        .map_err(|_| {
            format!("the signature does not match the module {digest} and the filter name {name:?}")
        })
}

/// The trusted keys of a configuration (`module_trust`), with errors located.
pub fn trusted_keys(config: &Config) -> Result<Vec<PublicKey>, Vec<(String, String)>> {
    let mut keys = Vec::new();
    let mut errors = Vec::new();
    for (i, k) in config.module_trust.iter().enumerate() {
        match PublicKey::parse(k) {
            Ok(k) => keys.push(k),
            Err(e) => errors.push((format!("module_trust[{i}]"), e)),
        }
    }
    if errors.is_empty() {
        Ok(keys)
    } else {
        Err(errors)
    }
}

/// Every filter and service naming a delivered module (`sha256:…`) is signed by a trusted
/// key: checked before anything is fetched or compiled. Answers every failure, located.
pub fn check_delivered(config: &Config, trusted: &[PublicKey]) -> Vec<String> {
    if trusted.is_empty() {
        return Vec::new();
    }
    config
        .module_uses()
        .filter(|u| u.module.starts_with("sha256:"))
        .filter_map(|u| {
            verify(trusted, u.name, u.module, u.signature)
                .err()
                .map(|e| format!("{}[{}].signature: {e}", u.at, u.index))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_holds_for_its_module_and_name_only() {
        let (secret, public) = generate().expect("key");
        let (_, stranger) = generate().expect("key");
        let digest = format!("sha256:{}", "ab".repeat(32));
        let sig = sign(&secret, "authz", &digest).expect("signed");
        let trusted = [public.clone()];
        verify(&trusted, "authz", &digest, Some(&sig)).expect("verifies");
        let other = format!("sha256:{}", "cd".repeat(32));
        assert!(
            verify(&trusted, "authz", &other, Some(&sig)).is_err(),
            "another module"
        );
        assert!(
            verify(&trusted, "quota", &digest, Some(&sig)).is_err(),
            "another filter"
        );
        assert!(
            verify(&[stranger], "authz", &digest, Some(&sig)).is_err(),
            "untrusted key"
        );
        assert!(
            verify(&trusted, "authz", &digest, None).is_err(),
            "unsigned"
        );
        let mut flipped = sig.clone();
        let mut raw = B64.decode(&flipped.value).expect("b64");
        raw[0] ^= 1;
        flipped.value = B64.encode(raw);
        assert!(verify(&trusted, "authz", &digest, Some(&flipped)).is_err());
        let garbage = ModuleSignature {
            key: sig.key.clone(),
            value: "%%%".into(),
        };
        assert!(verify(&trusted, "authz", &digest, Some(&garbage)).is_err());
        // Keys round-trip; malformed ones are refused.
        assert_eq!(
            PublicKey::parse(&public.to_string()).expect("parses"),
            public
        );
        for bad in ["", "ed25519:", "ed25519:AAAA", "rsa:AAAA", "ed25519:!!!!"] {
            assert!(PublicKey::parse(bad).is_err(), "{bad:?}");
        }
        assert!(sign(b"not a key", "authz", &digest).is_err());
    }

    #[test]
    fn delivered_services_are_checked_as_filters_are() {
        let (secret, public) = generate().expect("key");
        let digest = format!("sha256:{}", "ab".repeat(32));
        let yaml = format!(
            "filters:\n  - {{ name: f, module: \"{digest}\" }}\nservices:\n  - {{ name: s, module: \"{digest}\" }}\n  - {{ name: local, module: local.wasm }}\n"
        );
        let mut config: Config = serde_yaml_ng::from_str(&yaml).expect("parses");
        let trusted = [public];
        let errors = check_delivered(&config, &trusted);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].starts_with("filters[0].signature: the module is not signed"));
        assert!(errors[1].starts_with("services[0].signature: the module is not signed"));
        config.filters[0].signature = Some(sign(&secret, "f", &digest).expect("signed"));
        // A filter's signature does not vouch for a service of another name.
        config.services[0].signature = config.filters[0].signature.clone();
        let errors = check_delivered(&config, &trusted);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("services[0].signature"), "{errors:?}");
        config.services[0].signature = Some(sign(&secret, "s", &digest).expect("signed"));
        assert!(check_delivered(&config, &trusted).is_empty());
    }
}
