//! Certificate material from PEM files: loading, what a certificate names, and noticing that
//! the files changed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::config::CertificateFiles;

/// A file's identity and version, as `stat` sees it (through symbolic links, so a Kubernetes
/// secret's swapped `..data` link counts as a change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    inode: u64,
}

pub fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
    })
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Every certificate of a PEM file (at least one).
pub fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a valid PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    for (i, c) in certs.iter().enumerate() {
        if let Err(e) = x509_parser::parse_x509_certificate(c.as_ref()) {
            return Err(format!(
                "{}: certificate {} does not parse: {e}",
                path.display(),
                i + 1
            ));
        }
    }
    Ok(certs)
}

/// The private key of a PEM file.
pub fn key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| format!("{}: no usable private key in it: {e}", path.display()))
}

/// A CA bundle as trust roots.
pub fn roots(path: &Path) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for c in certs(path)? {
        store
            .add(c)
            .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(store)
}

/// The system's trust roots (loaded once).
pub fn system_roots() -> Result<Arc<RootCertStore>, String> {
    static ROOTS: std::sync::OnceLock<Result<Arc<RootCertStore>, String>> =
        std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut store = RootCertStore::empty();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                Err("no system CA certificates found; give the cluster's tls.ca".to_owned())
            } else {
                Ok(Arc::new(store))
            }
        })
        .clone()
}

/// A certificate chain and its key, checked to belong together.
#[derive(Debug)]
pub struct LoadedPair {
    pub key: Arc<CertifiedKey>,
    pub names: CertNames,
}

pub fn pair(files: &CertificateFiles, base: &Path) -> Result<LoadedPair, String> {
    let cert_path = base.join(&files.cert);
    let key_path = base.join(&files.key);
    let chain = certs(&cert_path)?;
    let key = key(&key_path)?;
    let names = cert_names(&chain[0]).map_err(|e| format!("{}: {e}", cert_path.display()))?;
    let signing = super::provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{}: unsupported private key: {e}", key_path.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => {
            return Err(format!(
                "{} is not the key of the certificate in {}",
                key_path.display(),
                cert_path.display()
            ));
        }
    }
    Ok(LoadedPair {
        key: Arc::new(certified),
        names,
    })
}

/// What a certificate says about its subject.
#[derive(Debug, Clone, Default)]
pub struct CertNames {
    pub dns: Vec<String>,
    pub uris: Vec<String>,
    pub subject: String,
    /// The subject's common name, if any.
    pub common_name: Option<String>,
    /// Unix time it expires.
    pub not_after: i64,
}

pub fn cert_names(der: &CertificateDer<'_>) -> Result<CertNames, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("certificate does not parse: {e}"))?;
    let mut names = CertNames {
        subject: cert.subject().to_string(),
        common_name: cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned),
        not_after: cert.validity().not_after.timestamp(),
        ..CertNames::default()
    };
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.dns.push(d.to_ascii_lowercase()),
                GeneralName::URI(u) => names.uris.push((*u).to_owned()),
                _ => {}
            }
        }
    }
    Ok(names)
}

/// The files behind some material, with the stamps they had when it was loaded.
#[derive(Debug)]
pub struct Watched {
    files: Vec<(PathBuf, Option<Stamp>)>,
}

impl Watched {
    pub fn new(paths: impl IntoIterator<Item = PathBuf>) -> Watched {
        Watched {
            files: paths
                .into_iter()
                .map(|p| {
                    let s = stamp(&p);
                    (p, s)
                })
                .collect(),
        }
    }

    /// Whether any file looks different from when it was loaded.
    pub fn changed(&self) -> bool {
        self.files.iter().any(|(p, s)| stamp(p) != *s)
    }

    /// Records the files as they are now (after a load, or a failed one: a broken file is
    /// reported once, not every second).
    pub fn refresh(&mut self) {
        for (p, s) in &mut self.files {
            *s = stamp(p);
        }
    }
}

/// Whether `name` (lower case) is covered by `pattern` (exact, or `*.` + suffix covering one
/// more label).
pub fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .split_once('.')
            .is_some_and(|(first, rest)| !first.is_empty() && rest.eq_ignore_ascii_case(suffix)),
        None => pattern.eq_ignore_ascii_case(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_cover_one_label() {
        assert!(name_matches("*.example.com", "a.example.com"));
        assert!(!name_matches("*.example.com", "a.b.example.com"));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(name_matches("Example.com", "example.com"));
        assert!(!name_matches("example.com", "a.example.com"));
    }
}
