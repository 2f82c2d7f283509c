//! Who may join the mesh, and as what: registrations (an identity and labels, with a join token
//! that expires and, unless the registration is reusable, works once) and the nodes enrolled
//! through them, with the certificate each was last issued. A proxy's node id, labels and
//! identity come from here, never from what it says of itself.
//!
//! Kept in one file next to the store (mode 0600), or in etcd with it (tokens only as SHA-256).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The longest registration name and label key or value.
pub const MAX_NAME: usize = 63;
/// Labels per registration.
pub const MAX_LABELS: usize = 64;
/// Registrations kept.
pub const MAX_REGISTRATIONS: usize = 10_000;
/// Nodes one reusable registration may enroll.
pub const MAX_NODES_PER_REGISTRATION: u32 = 10_000;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Registration {
    pub name: String,
    pub namespace: String,
    pub account: String,
    pub labels: BTreeMap<String, String>,
    pub reusable: bool,
    token_sha256: String,
    /// Unix milliseconds.
    pub expires_ms: u64,
    pub uses: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Node {
    pub id: String,
    pub registration: String,
    /// The SPIFFE ID.
    pub identity: String,
    pub labels: BTreeMap<String, String>,
    /// The certificate issued last: serial (hex), end (Unix seconds), root id.
    pub serial: String,
    pub not_after: i64,
    pub root: String,
    pub renewals: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnrollError {
    #[error("the join token is malformed")]
    Malformed,
    #[error("the join token is not known (never issued, or its registration was removed)")]
    Unknown,
    #[error("the join token has expired")]
    Expired,
    #[error("the join token was already used")]
    Used,
    #[error("the registration has enrolled as many nodes as it may")]
    Exhausted,
    /// The registry could not be kept (etcd away, another replica's change at the same time).
    #[error("the registry: {0}")]
    Store(String),
}

impl EnrollError {
    pub fn reason(&self) -> &'static str {
        match self {
            EnrollError::Malformed => "token_malformed",
            EnrollError::Unknown => "token_unknown",
            EnrollError::Expired => "token_expired",
            EnrollError::Used => "token_used",
            EnrollError::Exhausted => "token_exhausted",
            EnrollError::Store(_) => "store",
        }
    }
}

/// How often a change lost to another replica's is made again on the newer registry.
const TRIES: u32 = 5;

fn retrying<T>(mut attempt: impl FnMut() -> Result<T, String>) -> Result<T, String> {
    let mut tries = 0;
    loop {
        match attempt() {
            Err(e) if e == crate::blob::CONFLICT && tries < TRIES => tries += 1,
            r => return r,
        }
    }
}

fn parse(blob: &crate::blob::Blob, bytes: &[u8]) -> Result<Saved, String> {
    serde_json::from_slice(bytes)
        .map_err(|e| format!("the registry {} is damaged: {e}", blob.describe()))
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Saved {
    registrations: BTreeMap<String, Registration>,
    nodes: BTreeMap<String, Node>,
}

/// The registry.
#[derive(Debug)]
pub struct Registry {
    blob: crate::blob::Blob,
    data: Saved,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write;
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

/// A registration name or a label key: lowercase letters, digits, `-`, `.`, `_`, starting
/// with a letter or digit, at most [`MAX_NAME`] bytes.
pub fn check_name(what: &str, s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= MAX_NAME
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'.' | b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {s:?}: 1 to {MAX_NAME} lowercase letters, digits, '-', '.', '_', starting with a letter or digit"
        ))
    }
}

/// A label value: 1 to [`MAX_NAME`] printable ASCII characters without spaces.
fn check_value(k: &str, v: &str) -> Result<(), String> {
    if v.is_empty() || v.len() > MAX_NAME || !v.bytes().all(|c| c.is_ascii_graphic()) {
        return Err(format!(
            "label {k}: the value must be 1 to {MAX_NAME} printable characters without spaces"
        ));
    }
    Ok(())
}

/// A join token: `weft-join.<registration>.<secret>.<pin>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub registration: String,
    pub secret: String,
    /// SHA-256 (hex) of the root the control plane's certificate chains to.
    pub pin: String,
}

impl JoinToken {
    pub fn parse(s: &str) -> Result<JoinToken, EnrollError> {
        let mut it = s.trim().split('.');
        let (Some("weft-join"), Some(_)) = (it.next(), it.clone().next()) else {
            return Err(EnrollError::Malformed);
        };
        // The registration name may hold dots: the secret and pin are the last two parts.
        let parts: Vec<&str> = it.collect();
        if parts.len() < 3 {
            return Err(EnrollError::Malformed);
        }
        let pin = parts[parts.len() - 1];
        let secret = parts[parts.len() - 2];
        let registration = parts[..parts.len() - 2].join(".");
        let hexish = |s: &str, n: usize| s.len() == n && s.bytes().all(|c| c.is_ascii_hexdigit());
        if !hexish(pin, 64) || !hexish(secret, 64) || check_name("", &registration).is_err() {
            return Err(EnrollError::Malformed);
        }
        Ok(JoinToken {
            registration,
            secret: secret.to_ascii_lowercase(),
            pin: pin.to_ascii_lowercase(),
        })
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "weft-join.{}.{}.{}",
            self.registration, self.secret, self.pin
        )
    }
}

fn secret() -> String {
    let mut b = [0u8; 32];
    // aws-lc's generator: tokens must not be guessable.
    if aws_lc_fill(&mut b).is_err() {
        for x in &mut b {
            *x = fastrand::u8(..);
        }
    }
    hex(&b)
}

fn aws_lc_fill(b: &mut [u8]) -> Result<(), rustls::Error> {
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(b)
        .map_err(|_| rustls::Error::FailedToGetRandomBytes)
}

/// What one enrollment grants.
#[derive(Debug, Clone)]
pub struct Grant {
    pub node: String,
    pub namespace: String,
    pub account: String,
    pub labels: BTreeMap<String, String>,
}

impl Registry {
    pub fn open(file: Option<&Path>) -> Result<Registry, String> {
        Registry::open_in(crate::blob::Blob::file(file))
    }

    /// The registry kept in `blob` (a file, or a key in etcd shared by replicas).
    pub fn open_in(blob: crate::blob::Blob) -> Result<Registry, String> {
        let data = match blob.read().map_err(|e| format!("the registry: {e}"))? {
            None => Saved::default(),
            Some(b) => parse(&blob, &b)?,
        };
        Ok(Registry { blob, data })
    }

    /// Where it is kept.
    pub fn blob(&self) -> &crate::blob::Blob {
        &self.blob
    }

    /// Takes what another replica wrote (seen by a watch, at `revision`).
    pub fn reload(&mut self, revision: i64, value: Vec<u8>) -> Result<(), String> {
        if let Some(b) = self.blob.seen(revision, value) {
            self.data = parse(&self.blob, &b)?;
        }
        Ok(())
    }

    /// Reads what another replica wrote since, before a change is made from it.
    fn refresh(&mut self) -> Result<(), String> {
        if let Some(b) = self.blob.changed()? {
            self.data = parse(&self.blob, &b)?;
        }
        Ok(())
    }

    fn save(&mut self) -> Result<(), String> {
        let bytes = serde_json::to_vec_pretty(&self.data).map_err(|e| e.to_string())?;
        let r = self.blob.write(&bytes);
        if r.is_err() && self.blob.shared() {
            // What is kept is the truth: the change is undone by reading it again.
            let _ = self.refresh();
        }
        r
    }

    /// Adds a registration; answers its token's secret. Refused (nothing changes): a bad name,
    /// identity or label, a name in use, too many registrations.
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &mut self,
        name: &str,
        namespace: &str,
        account: &str,
        labels: BTreeMap<String, String>,
        reusable: bool,
        ttl: std::time::Duration,
        trust_domain: &str,
    ) -> Result<String, String> {
        retrying(|| {
            self.add_once(
                name,
                namespace,
                account,
                labels.clone(),
                reusable,
                ttl,
                trust_domain,
            )
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn add_once(
        &mut self,
        name: &str,
        namespace: &str,
        account: &str,
        labels: BTreeMap<String, String>,
        reusable: bool,
        ttl: std::time::Duration,
        trust_domain: &str,
    ) -> Result<String, String> {
        self.refresh()?;
        check_name("name", name)?;
        weft_proxy::identity::SpiffeId::workload(trust_domain, namespace, account)
            .map_err(|e| format!("identity: {e}"))?;
        if labels.len() > MAX_LABELS {
            return Err(format!("at most {MAX_LABELS} labels"));
        }
        for (k, v) in &labels {
            check_name("label", k)?;
            check_value(k, v)?;
        }
        if ttl.is_zero() || ttl > std::time::Duration::from_secs(30 * 24 * 3600) {
            return Err("the token's lifetime must be between 1 s and 30 days".into());
        }
        if self.data.registrations.contains_key(name) {
            return Err(format!(
                "a registration named {name:?} exists: remove it first (`weftctl node remove {name}`)"
            ));
        }
        if self.data.registrations.len() >= MAX_REGISTRATIONS {
            return Err(format!("at most {MAX_REGISTRATIONS} registrations"));
        }
        let secret = secret();
        self.data.registrations.insert(
            name.to_owned(),
            Registration {
                name: name.to_owned(),
                namespace: namespace.to_owned(),
                account: account.to_owned(),
                labels,
                reusable,
                token_sha256: hex(&Sha256::digest(secret.as_bytes())),
                expires_ms: now_ms().saturating_add(ttl.as_millis() as u64),
                uses: 0,
            },
        );
        if let Err(e) = self.save() {
            if !self.blob.shared() {
                self.data.registrations.remove(name);
            }
            return Err(e);
        }
        Ok(secret)
    }

    /// Spends a token: the node it enrolls and what it is granted. The token is spent (saved)
    /// before anything is issued, so a crash can never let it work twice.
    pub fn enroll(&mut self, token: &JoinToken) -> Result<Grant, EnrollError> {
        let mut tries = 0;
        loop {
            match self.enroll_once(token) {
                Err(EnrollError::Store(e)) if e == crate::blob::CONFLICT && tries < TRIES => {
                    tries += 1;
                }
                r => return r,
            }
        }
    }

    fn enroll_once(&mut self, token: &JoinToken) -> Result<Grant, EnrollError> {
        self.refresh().map_err(EnrollError::Store)?;
        let reg = self
            .data
            .registrations
            .get(&token.registration)
            .ok_or(EnrollError::Unknown)?;
        let want = reg.token_sha256.as_bytes();
        let got = hex(&Sha256::digest(token.secret.as_bytes()));
        let same = got.len() == want.len()
            && got
                .bytes()
                .zip(want.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if !same {
            return Err(EnrollError::Unknown);
        }
        if now_ms() >= reg.expires_ms {
            return Err(EnrollError::Expired);
        }
        if !reg.reusable && reg.uses > 0 {
            return Err(EnrollError::Used);
        }
        if reg.uses >= MAX_NODES_PER_REGISTRATION {
            return Err(EnrollError::Exhausted);
        }
        let node = if reg.reusable {
            loop {
                let id = format!("{}-{:08x}", reg.name, fastrand::u32(..));
                if !self.data.nodes.contains_key(&id) {
                    break id;
                }
            }
        } else {
            reg.name.clone()
        };
        let grant = Grant {
            node,
            namespace: reg.namespace.clone(),
            account: reg.account.clone(),
            labels: reg.labels.clone(),
        };
        let name = token.registration.clone();
        if let Some(r) = self.data.registrations.get_mut(&name) {
            r.uses += 1;
        }
        if let Err(e) = self.save() {
            if !self.blob.shared()
                && let Some(r) = self.data.registrations.get_mut(&name)
            {
                r.uses -= 1;
            }
            return Err(EnrollError::Store(e));
        }
        Ok(grant)
    }

    /// Records a certificate issued to `node` (at enrollment or renewal).
    pub fn record(
        &mut self,
        grant: &Grant,
        registration: &str,
        identity: &str,
        issued: &crate::ca::Issued,
    ) -> Result<(), String> {
        retrying(|| self.record_once(grant, registration, identity, issued))
    }

    fn record_once(
        &mut self,
        grant: &Grant,
        registration: &str,
        identity: &str,
        issued: &crate::ca::Issued,
    ) -> Result<(), String> {
        self.refresh()?;
        let renewals = self
            .data
            .nodes
            .get(&grant.node)
            .map_or(0, |n| n.renewals + 1);
        self.data.nodes.insert(
            grant.node.clone(),
            Node {
                id: grant.node.clone(),
                registration: registration.to_owned(),
                identity: identity.to_owned(),
                labels: grant.labels.clone(),
                serial: issued.serial.clone(),
                not_after: issued.not_after,
                root: issued.root.clone(),
                renewals,
            },
        );
        self.save()
    }

    pub fn node(&self, id: &str) -> Option<&Node> {
        self.data.nodes.get(id)
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.data.nodes.values()
    }

    pub fn registrations(&self) -> impl Iterator<Item = &Registration> {
        self.data.registrations.values()
    }

    pub fn registration(&self, name: &str) -> Option<&Registration> {
        self.data.registrations.get(name)
    }

    /// Removes a registration and every node enrolled through it: their certificates are no
    /// longer accepted on the control link, and they get no configuration. Answers the nodes
    /// removed.
    pub fn remove(&mut self, name: &str) -> Result<Vec<String>, String> {
        retrying(|| self.remove_once(name))
    }

    fn remove_once(&mut self, name: &str) -> Result<Vec<String>, String> {
        self.refresh()?;
        let Some(reg) = self.data.registrations.remove(name) else {
            return Err(format!("no registration named {name:?}"));
        };
        let gone: Vec<String> = self
            .data
            .nodes
            .values()
            .filter(|n| n.registration == name)
            .map(|n| n.id.clone())
            .collect();
        let nodes: Vec<Node> = gone
            .iter()
            .filter_map(|id| self.data.nodes.remove(id))
            .collect();
        if let Err(e) = self.save() {
            if !self.blob.shared() {
                self.data.registrations.insert(name.to_owned(), reg);
                for n in nodes {
                    self.data.nodes.insert(n.id.clone(), n);
                }
            }
            return Err(e);
        }
        Ok(gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn labels(l: &[(&str, &str)]) -> BTreeMap<String, String> {
        l.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn token(reg: &str, secret: &str) -> JoinToken {
        JoinToken {
            registration: reg.into(),
            secret: secret.into(),
            pin: "0".repeat(64),
        }
    }

    #[test]
    fn a_token_works_once_and_only_before_it_expires() {
        let mut r = Registry::open(None).expect("registry");
        let s = r
            .add(
                "web-1",
                "shop",
                "web",
                labels(&[("app", "web")]),
                false,
                Duration::from_secs(60),
                "td",
            )
            .expect("added");
        let g = r.enroll(&token("web-1", &s)).expect("enrolled");
        assert_eq!(g.node, "web-1");
        assert_eq!(g.labels, labels(&[("app", "web")]));
        assert_eq!(
            r.enroll(&token("web-1", &s)).expect_err("refused"),
            EnrollError::Used
        );
        assert_eq!(
            r.enroll(&token("web-1", &"a".repeat(64)))
                .expect_err("refused"),
            EnrollError::Unknown
        );
        assert_eq!(
            r.enroll(&token("nope", &s)).expect_err("refused"),
            EnrollError::Unknown
        );

        let s = r
            .add(
                "short",
                "shop",
                "web",
                labels(&[]),
                false,
                Duration::from_millis(1),
                "td",
            )
            .expect("added");
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            r.enroll(&token("short", &s)).expect_err("refused"),
            EnrollError::Expired
        );
    }

    #[test]
    fn a_reusable_registration_enrolls_distinct_nodes() {
        let mut r = Registry::open(None).expect("registry");
        let s = r
            .add(
                "web",
                "shop",
                "web",
                labels(&[]),
                true,
                Duration::from_secs(60),
                "td",
            )
            .expect("added");
        let a = r.enroll(&token("web", &s)).expect("a");
        let b = r.enroll(&token("web", &s)).expect("b");
        assert_ne!(a.node, b.node);
        assert!(a.node.starts_with("web-"));
    }

    #[test]
    fn bad_registrations_change_nothing() {
        let mut r = Registry::open(None).expect("registry");
        let ttl = Duration::from_secs(60);
        for (name, ns, sa, l) in [
            ("", "a", "b", labels(&[])),
            ("Web", "a", "b", labels(&[])),
            ("web/1", "a", "b", labels(&[])),
            ("web", "..", "b", labels(&[])),
            ("web", "a", "b/c", labels(&[])),
            ("web", "a", "", labels(&[])),
            ("web", "a", "b", labels(&[("Bad Key", "v")])),
            ("web", "a", "b", labels(&[("k", "")])),
            ("web", "a", "b", labels(&[("k", "two words")])),
        ] {
            assert!(
                r.add(name, ns, sa, l, false, ttl, "td").is_err(),
                "{name} {ns} {sa}"
            );
        }
        assert!(
            r.add("web", "a", "b", labels(&[]), false, Duration::ZERO, "td")
                .is_err()
        );
        assert_eq!(r.registrations().count(), 0);
        r.add("web", "a", "b", labels(&[]), false, ttl, "td")
            .expect("added");
        assert!(
            r.add("web", "a", "c", labels(&[]), false, ttl, "td")
                .is_err()
        );
        assert_eq!(r.registration("web").expect("kept").account, "b");
    }

    #[test]
    fn join_tokens_parse_strictly() {
        let t = JoinToken {
            registration: "web.shop-1".into(),
            secret: "ab".repeat(32),
            pin: "cd".repeat(32),
        };
        assert_eq!(JoinToken::parse(&t.to_string()).expect("parses"), t);
        for bad in [
            "",
            "weft-join",
            "weft-join.web",
            &format!("weft-join.web.{}", "ab".repeat(32)),
            &format!("other.web.{}.{}", "ab".repeat(32), "cd".repeat(32)),
            &format!("weft-join.web.{}.{}", "ab".repeat(31), "cd".repeat(32)),
            &format!("weft-join.web.{}.{}", "zz".repeat(32), "cd".repeat(32)),
            &format!("weft-join.Web.{}.{}", "ab".repeat(32), "cd".repeat(32)),
        ] {
            assert!(JoinToken::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_registry_survives_a_restart_and_keeps_no_secret() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("reg.json");
        let mut r = Registry::open(Some(&file)).expect("registry");
        let s = r
            .add(
                "web",
                "a",
                "b",
                labels(&[]),
                false,
                Duration::from_secs(60),
                "td",
            )
            .expect("added");
        let text = std::fs::read_to_string(&file).expect("file");
        assert!(!text.contains(&s), "the secret itself is stored");
        let mut again = Registry::open(Some(&file)).expect("reopened");
        again
            .enroll(&token("web", &s))
            .expect("enrolls after a restart");
        let mut third = Registry::open(Some(&file)).expect("reopened");
        assert_eq!(
            third.enroll(&token("web", &s)).expect_err("refused"),
            EnrollError::Used
        );
        // A damaged registry is refused, not replaced by an empty one.
        std::fs::write(&file, b"{\"registrations\": {").expect("damage");
        assert!(Registry::open(Some(&file)).is_err());
    }

    #[test]
    fn oversized_and_odd_tokens_are_malformed() {
        let huge = format!(
            "weft-join.{}.{}.{}",
            "a".repeat(1 << 20),
            "ab".repeat(32),
            "cd".repeat(32)
        );
        assert_eq!(
            JoinToken::parse(&huge).expect_err("refused"),
            EnrollError::Malformed
        );
        let spaced = format!("weft-join.web .{}.{}", "ab".repeat(32), "cd".repeat(32));
        assert_eq!(
            JoinToken::parse(&spaced).expect_err("refused"),
            EnrollError::Malformed
        );
        let doubled = format!(
            "weft-join.weft-join.web.{}.{}",
            "ab".repeat(32),
            "cd".repeat(32)
        );
        // A registration may be named with dots; this one parses as `weft-join.web` and is
        // simply unknown, never `web`.
        assert_eq!(
            JoinToken::parse(&doubled).expect("parses").registration,
            "weft-join.web"
        );
    }
}
