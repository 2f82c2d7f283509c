//! JWT verification: compact JWS with RS256 or ES256, keys from a JWKS, then issuer, audience,
//! expiry and not-before. Nothing else is accepted (`none`, HMAC and other algorithms are
//! refused, as a token whose header names a key type the JWKS does not have).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::ecdsa::signature::Verifier as _;
use rsa::pkcs1v15;
use serde::Deserialize;

/// Why a token was refused: the `error_description` of the 401.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    Malformed,
    UnsupportedAlgorithm(String),
    UnknownKey,
    BadSignature,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenError::Malformed => f.write_str("malformed token"),
            TokenError::UnsupportedAlgorithm(a) => write!(f, "unsupported algorithm {a}"),
            TokenError::UnknownKey => f.write_str("no key for this token"),
            TokenError::BadSignature => f.write_str("bad signature"),
            TokenError::Expired => f.write_str("token expired"),
            TokenError::NotYetValid => f.write_str("token not yet valid"),
            TokenError::WrongIssuer => f.write_str("wrong issuer"),
            TokenError::WrongAudience => f.write_str("wrong audience"),
        }
    }
}

#[derive(Debug, Deserialize)]
struct Jwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    usage: Option<String>,
    // RSA
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    // EC
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

#[derive(Debug, Deserialize)]
struct JwkSet {
    keys: Vec<Jwk>,
}

#[derive(Debug, Clone)]
enum Key {
    Rs256(pkcs1v15::VerifyingKey<sha2::Sha256>),
    Es256(p256::ecdsa::VerifyingKey),
}

/// The keys tokens are verified with.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    keys: Vec<(Option<String>, Key)>,
}

fn b64(s: &str) -> Result<Vec<u8>, String> {
    URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|e| format!("invalid base64url: {e}"))
}

impl Keys {
    /// Parses a JWKS (`{"keys": [...]}`); keys for other uses or algorithms are skipped, a
    /// malformed RSA or EC key is an error.
    pub fn from_jwks(jwks: &serde_json::Value) -> Result<Keys, String> {
        let set: JwkSet = match jwks {
            serde_json::Value::String(s) => serde_json::from_str(s),
            v => serde_json::from_value(v.clone()),
        }
        .map_err(|e| format!("invalid JWKS: {e}"))?;
        let mut keys = Vec::new();
        for (i, k) in set.keys.iter().enumerate() {
            if k.usage.as_deref().is_some_and(|u| u != "sig") {
                continue;
            }
            let at = |e: String| format!("keys[{i}]: {e}");
            match (k.kty.as_str(), k.alg.as_deref()) {
                ("RSA", None | Some("RS256")) => {
                    let n =
                        b64(k.n.as_deref().ok_or_else(|| at("missing n".into()))?).map_err(at)?;
                    let e =
                        b64(k.e.as_deref().ok_or_else(|| at("missing e".into()))?).map_err(at)?;
                    let public = rsa::RsaPublicKey::new(
                        rsa::BigUint::from_bytes_be(&n),
                        rsa::BigUint::from_bytes_be(&e),
                    )
                    .map_err(|e| at(format!("invalid RSA key: {e}")))?;
                    keys.push((
                        k.kid.clone(),
                        Key::Rs256(pkcs1v15::VerifyingKey::new(public)),
                    ));
                }
                ("EC", None | Some("ES256")) => {
                    if k.crv.as_deref() != Some("P-256") {
                        continue;
                    }
                    let x =
                        b64(k.x.as_deref().ok_or_else(|| at("missing x".into()))?).map_err(at)?;
                    let y =
                        b64(k.y.as_deref().ok_or_else(|| at("missing y".into()))?).map_err(at)?;
                    if x.len() != 32 || y.len() != 32 {
                        return Err(at("EC coordinates must be 32 bytes".into()));
                    }
                    let mut sec1 = vec![4u8];
                    sec1.extend_from_slice(&x);
                    sec1.extend_from_slice(&y);
                    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1)
                        .map_err(|_| at("invalid P-256 point".into()))?;
                    keys.push((k.kid.clone(), Key::Es256(key)));
                }
                _ => {}
            }
        }
        if keys.is_empty() {
            return Err("the JWKS has no RS256 or ES256 signing key".into());
        }
        Ok(Keys { keys })
    }
}

/// What a verified token says.
pub type Claims = serde_json::Map<String, serde_json::Value>;

#[derive(Debug, Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

/// What a token must say.
#[derive(Debug, Clone, Default)]
pub struct Expect {
    pub issuer: Option<String>,
    pub audiences: Vec<String>,
    pub leeway_secs: u64,
}

/// Verifies `token` at `now` (seconds since the epoch).
pub fn verify(token: &str, keys: &Keys, expect: &Expect, now: u64) -> Result<Claims, TokenError> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let header: Header = serde_json::from_slice(&b64(h).map_err(|_| TokenError::Malformed)?)
        .map_err(|_| TokenError::Malformed)?;
    let signature = b64(s).map_err(|_| TokenError::Malformed)?;
    let signed = &token.as_bytes()[..h.len() + 1 + p.len()];
    let candidates = keys.keys.iter().filter(|(kid, key)| {
        let alg_ok = matches!(
            (header.alg.as_str(), key),
            ("RS256", Key::Rs256(_)) | ("ES256", Key::Es256(_))
        );
        alg_ok && (header.kid.is_none() || kid.is_none() || *kid == header.kid)
    });
    if !matches!(header.alg.as_str(), "RS256" | "ES256") {
        return Err(TokenError::UnsupportedAlgorithm(header.alg));
    }
    let mut any = false;
    let mut valid = false;
    for (_, key) in candidates {
        any = true;
        valid = match key {
            Key::Rs256(k) => pkcs1v15::Signature::try_from(signature.as_slice())
                .is_ok_and(|sig| k.verify(signed, &sig).is_ok()),
            Key::Es256(k) => p256::ecdsa::Signature::from_slice(&signature)
                .is_ok_and(|sig| k.verify(signed, &sig).is_ok()),
        };
        if valid {
            break;
        }
    }
    if !any {
        return Err(TokenError::UnknownKey);
    }
    if !valid {
        return Err(TokenError::BadSignature);
    }
    let claims: Claims = serde_json::from_slice(&b64(p).map_err(|_| TokenError::Malformed)?)
        .map_err(|_| TokenError::Malformed)?;
    let num = |k: &str| claims.get(k).and_then(serde_json::Value::as_f64);
    if let Some(exp) = num("exp")
        && (now as f64) > exp + expect.leeway_secs as f64
    {
        return Err(TokenError::Expired);
    }
    if let Some(nbf) = num("nbf")
        && (now as f64) + (expect.leeway_secs as f64) < nbf
    {
        return Err(TokenError::NotYetValid);
    }
    if let Some(iss) = &expect.issuer
        && claims.get("iss").and_then(|v| v.as_str()) != Some(iss.as_str())
    {
        return Err(TokenError::WrongIssuer);
    }
    if !expect.audiences.is_empty() {
        let aud: Vec<&str> = match claims.get("aud") {
            Some(serde_json::Value::String(a)) => vec![a.as_str()],
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_str()).collect(),
            _ => Vec::new(),
        };
        if !aud.iter().any(|a| expect.audiences.iter().any(|e| e == a)) {
            return Err(TokenError::WrongAudience);
        }
    }
    Ok(claims)
}

/// A claim's values as strings (a string, a number, a boolean, or a list of them; a
/// space-separated `scope` counts as a list).
pub fn claim_values(claims: &Claims, name: &str) -> Vec<String> {
    let one = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    // A nested claim: `realm_access.roles`.
    let mut value = None;
    for (i, seg) in name.split('.').enumerate() {
        value = if i == 0 {
            claims.get(seg)
        } else {
            value.and_then(|v: &serde_json::Value| v.get(seg))
        };
    }
    match value {
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(one).collect(),
        Some(serde_json::Value::String(s)) if name == "scope" || name == "scp" => {
            s.split_whitespace().map(str::to_owned).collect()
        }
        Some(v) => one(v).into_iter().collect(),
        None => Vec::new(),
    }
}
