//! The proxy's identity from the control plane: enrollment with a join token (once; the key is
//! made here and never leaves), renewal at about half the certificate's life over the mTLS link
//! (a new key each time), and the trust bundle the control plane pushes. The identity is kept in
//! the state directory (mode 0600) so a restart needs no new token.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;
use weft_wire::v1;

use super::ControlOptions;
use super::link::{LinkSecurity, connect};
use crate::identity::svid::{csr, key_der, new_key};
use crate::identity::{Identity, Material};
use crate::metrics::Metrics;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The pin a join token carries (its last part).
fn token_pin(token: &str) -> Result<String, String> {
    let pin = token.trim().rsplit('.').next().unwrap_or_default();
    if !token.trim().starts_with("weft-join.")
        || pin.len() != 64
        || !pin.bytes().all(|c| c.is_ascii_hexdigit())
    {
        return Err(
            "the join token is malformed (expected weft-join.<name>.<secret>.<pin>, as `weftctl node add` prints it)"
                .into(),
        );
    }
    Ok(pin.to_ascii_lowercase())
}

fn material(key: &rcgen::KeyPair, issued: v1::IssuedCertificate) -> Result<Material, String> {
    let trust = issued
        .trust
        .ok_or("the control plane sent no trust bundle")?;
    let m = Material::new(key_der(key), issued.chain, trust.roots, trust.generation)
        .map_err(|e| format!("the certificate the control plane issued is unusable: {e}"))?;
    if m.svid.node != issued.node_id || m.svid.id.to_string() != issued.spiffe_id {
        return Err(
            "the certificate does not name the node and identity the control plane said".into(),
        );
    }
    let keys = issued
        .module_keys
        .iter()
        .map(|k| crate::wasm::signing::PublicKey::parse(k))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the control plane's module keys: {e}"))?;
    Ok(m.with_module_keys(keys))
}

/// The identity to use on the TLS link: the saved one while it is valid, else a new one
/// enrolled with the join token. `None` on the plaintext link.
pub async fn establish(o: &ControlOptions) -> Result<Option<Arc<Identity>>, String> {
    if o.insecure {
        return Ok(None);
    }
    let saved = match crate::identity::Material::load(&o.state_dir) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!("the saved identity is unusable, enrolling anew: {e}");
            None
        }
    };
    let saved = match saved {
        Some(m) if m.svid.not_after > now() + 5 => {
            tracing::info!(identity = %m.svid.id, node = %m.svid.node, not_after = m.svid.not_after, "identity loaded");
            return Ok(Some(Identity::new(m)));
        }
        expired => expired,
    };
    let Some(token) = &o.join_token else {
        return Err(match saved {
            Some(_) => format!(
                "the certificate in {} has expired and no join token was given (WEFT_JOIN_TOKEN): make one with `weftctl node add`",
                o.state_dir.display()
            ),
            None => format!(
                "no identity in {} and no join token (WEFT_JOIN_TOKEN): make one with `weftctl node add`",
                o.state_dir.display()
            ),
        });
    };
    let pin = token_pin(token)?;
    let key = new_key()?;
    let request = csr(&key)?;
    // Each replica in turn, until one answers.
    let mut last = String::new();
    let mut issued = None;
    for _ in 0..o.urls.len().max(1) {
        let channel = match connect(o.url(), &LinkSecurity::Pinned(pin.clone())).await {
            Ok(c) => c,
            Err(e) => {
                last = format!("{}: {e}", o.url());
                o.next_url();
                continue;
            }
        };
        issued = Some(
            v1::identity_client::IdentityClient::new(channel)
                .enroll(v1::EnrollRequest {
                    token: token.trim().to_owned(),
                    csr: request.clone(),
                })
                .await
                .map_err(|e| format!("enrollment refused: {}", e.message()))?
                .into_inner(),
        );
        break;
    }
    let issued = issued.ok_or(last)?;
    let m = material(&key, issued)?;
    m.save(&o.state_dir)
        .map_err(|e| format!("cannot save the identity in {}: {e}", o.state_dir.display()))?;
    tracing::info!(identity = %m.svid.id, node = %m.svid.node, not_after = m.svid.not_after, "enrolled");
    Ok(Some(Identity::new(m)))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Identity metrics: certificate expiry, renewals by result.
#[derive(Debug, Clone, Default)]
pub struct IdentityMetrics {
    expiry: Gauge,
    renewals: Family<ResultLabels, Counter>,
}

impl IdentityMetrics {
    pub fn register(metrics: &Metrics, identity: &Identity) -> IdentityMetrics {
        let m = IdentityMetrics::default();
        metrics.with_registry(|r| {
            r.register(
                "identity_certificate_expiry_timestamp_seconds",
                "When the proxy's mesh certificate expires (Unix time)",
                m.expiry.clone(),
            );
            r.register(
                "identity_renewals",
                "Certificate renewals, by result (ok, failed)",
                m.renewals.clone(),
            );
        });
        m.expiry.set(identity.current().svid.not_after);
        m
    }
}

/// Renews one certificate over the mTLS link (a new key) and installs it, with the newer of
/// the bundle the control plane sent along and the one held.
pub async fn renew_once(
    o: &ControlOptions,
    identity: &Arc<Identity>,
) -> Result<Arc<Material>, String> {
    let key = new_key()?;
    let request = csr(&key)?;
    let channel = match connect(o.url(), &LinkSecurity::Mesh(identity.clone())).await {
        Ok(c) => c,
        Err(e) => {
            // The subscription moves on too; the next renewal tries the next replica.
            o.next_url();
            return Err(e);
        }
    };
    let issued = v1::identity_client::IdentityClient::new(channel)
        .renew(v1::RenewRequest { csr: request })
        .await
        .map_err(|e| format!("renewal refused: {}", e.message()))?
        .into_inner();
    let fresh = material(&key, issued)?;
    let m = identity.update(|current| {
        if current.bundle.generation > fresh.bundle.generation {
            let roots = current.bundle.roots.iter().map(|r| r.to_vec()).collect();
            fresh.with_bundle(roots, current.bundle.generation)
        } else {
            Ok(fresh)
        }
    })?;
    if let Err(e) = m.save(&o.state_dir) {
        tracing::warn!("cannot save the renewed identity: {e}");
    }
    Ok(m)
}

/// Renews at about half the certificate's life (jittered), or at once when `now` is
/// notified (the control plane asks, after a root rotation); retries a failure with back-off.
pub fn spawn_renewal(
    o: ControlOptions,
    identity: Arc<Identity>,
    metrics: IdentityMetrics,
    now_please: Arc<Notify>,
) {
    tokio::spawn(async move {
        let mut at = identity.current().svid.renew_at();
        let mut backoff = Duration::from_millis(200);
        loop {
            let wait = Duration::from_millis(((at - now()).max(0) as u64) * 1000);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = now_please.notified() => {}
            }
            match renew_once(&o, &identity).await {
                Ok(m) => {
                    tracing::info!(not_after = m.svid.not_after, "certificate renewed");
                    metrics.expiry.set(m.svid.not_after);
                    at = m.svid.renew_at();
                    metrics
                        .renewals
                        .get_or_create(&ResultLabels { result: "ok" })
                        .inc();
                    backoff = Duration::from_millis(200);
                }
                Err(e) => {
                    metrics
                        .renewals
                        .get_or_create(&ResultLabels { result: "failed" })
                        .inc();
                    let left = identity.current().svid.not_after - now();
                    tracing::warn!(seconds_left = left, "certificate renewal failed: {e}");
                    // Retry soon, never later than a tenth of what is left.
                    let cap = Duration::from_secs((left / 10).max(1) as u64);
                    let jitter =
                        Duration::from_millis(fastrand::u64(..=backoff.as_millis() as u64 / 2));
                    let next = (backoff + jitter).min(cap);
                    at = now() + next.as_secs() as i64;
                    if next.as_secs() == 0 {
                        tokio::time::sleep(next).await;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    });
}

/// A trust bundle the control plane pushed: the certificate is kept with the new roots. When
/// they no longer anchor it (the old root retired before this proxy renewed), it renews first:
/// the renewal brings the newest bundle. Answers the generation now held.
pub async fn apply_trust(
    o: &ControlOptions,
    identity: &Arc<Identity>,
    trust: v1::TrustBundle,
) -> Result<u64, String> {
    let generation = trust.generation;
    let applied = identity.update(|current| {
        if current.bundle.generation >= generation {
            // Nothing newer: keep what is held (a renewal may have brought it already).
            let roots = current.bundle.roots.iter().map(|r| r.to_vec()).collect();
            return current.with_bundle(roots, current.bundle.generation);
        }
        current.with_bundle(trust.roots, generation)
    });
    let m = match applied {
        Ok(m) => m,
        Err(e) => {
            tracing::info!(
                "the new trust bundle does not anchor the current certificate ({e}): renewing"
            );
            renew_once(o, identity).await?
        }
    };
    if let Err(e) = m.save(&o.state_dir) {
        tracing::warn!("cannot save the trust bundle: {e}");
    }
    tracing::info!(
        generation = m.bundle.generation,
        roots = m.bundle.roots.len(),
        "trust bundle held"
    );
    Ok(m.bundle.generation)
}
