//! JSON Web Tokens for tests: fixed throw-away RS256 and ES256 keys, their JWKS, and tokens
//! signed with them (or tampered with).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::pkcs8::DecodePrivateKey as _;
use rsa::signature::{SignatureEncoding, Signer};
use rsa::traits::PublicKeyParts;

/// A throw-away RSA key (tests only).
const RSA_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIIEvAIBADANBgkqhkiG9w0BAQEFAASCBKYwggSiAgEAAoIBAQClYV+JHSw7gpXV
XMzWHTfsja1eCIcGLzkuDAidP8qkGPfuNWGuxqjKZzdLm4M5hrR5Wcq0zZ66WEWD
9AnCRs+09srog2THaCUFN/fAQwYdekPepNebQ+2LycIrqvlfcUVGSblGXiiTRTab
Y97xe/PAKG5Vma+KovLWN1CBaXMCNxVQNyoLyVLfu0YoW4pNdRbYhMNNrdLqlQIO
8cgeUgR7hjiiYXA2tZG69N0miS6kZoag7z+2Wr7K972vmRepe7OMk286qPpJPqJR
Txhvup3DsNEK8oM1yNJShP7DF8yAA1zo05Yjnz4kTVFSs0MxmDWpb3Bz2tkeDQKc
SkkaMflrAgMBAAECggEABwYNp/sZ3SUnS+Uhu0OJE9N94MJ9SYvz4mVscDvnVUoi
LXcNllNQPoMHsX8B9w17g16G4grhijR5hKh2nvj26qPt64C5D6b3+4gW+OQKfHIB
iTvNqbBxhEBQrh4YHS+TAPCHR9pz4Af5Jmb6xEgUCr3XgcHXLLd4QhTIpyuypg4I
jgqoT0Sn0uM18U0Tk/0gj87n2a2H2j1ut6DsTm6EcX5qiJqpgsZIx8KoPdQyypiL
BHdPcLY7OFm40+Z4u3k/bFwatIIWigFy3JNWIFCi61ZAulVgdJAh+jyTc+rQ/Hu7
yhKaW/+dK07oJ/8xoMOFQtgB1e68g6VFdvLrxscYgQKBgQDox9kTB2rJ6J9ygEzL
EFavkCdYwiDrlAuS9G1gTp/hT7kSyS5Fq622/0rJ+KZ4OxFUdMTdEM0JvbdUG+gB
D/jqHzxFmQqRN0bJryXx6+fOUNX2ye99iWYgSyuI07CmsD/P5KmBIroKmsA07OjK
tWwmsGyck8HiCcU1memRuHeTIQKBgQC14G4vHyMztv+LYKbbGfr5AmOztFJzOVqu
9cKGpufFWsCyqXJATR51zPI+yuD/+wXTWClKTTm1bW7nvdHlbZwHRWeugtNqOgJv
iIMJ2bhkRLKfVdmfKAIxiOxn2R61ybBFqSIh4tot7xX1j9pi571g2/PdckltFHvw
68cMs7DHCwKBgG1x0Oj2esn1mkn+cpyi0O74atd7Znj8gTiVvXsjXF5V2mEvv5a4
MhOxEhvF0ZcDxpEb2ZdKl+x1i2V7PWiKdvC0wOTEIMjH4Xtf4wpMbQ9+yCqhJP20
BRU34n8RcKPeiBIZo2x4xFnKCoaXwJfWFsRV/KrdebHqABPEiqGdxnKhAoGAXM9p
CqzGBubUYqhwnRAV7SnV/OcAyAG1j+CjYpkbXq9f9AvZ3Iw+BfkOiRJ4XMgZAe9U
KrFbyIROev13da9IVsGJFhl2jxeJFKdBzy4GFUylJf/mLHx7GhH4KUo3jKaeR/32
B/q+QYBm4UeGNsBw+FNlj1R5uashUCDRE19Cz18CgYBGOgmy/lj8b8abs+LJGJYw
jo6Maun40ybOyKkMi0jR0oUfFFI4h9VffOGEepidhZEeP9w7dyXkwJM4IHG1biGD
/cDNw8hS2AjcV8USx4RdUGTV17rDSBuwlR0Xt3ITlouYkIYf9AKIhGMod0MX1azJ
dVmHR6lqOjVhQJIQSnecYg==
-----END PRIVATE KEY-----";

/// A throw-away P-256 key (tests only).
const EC_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg32hylBk+lyGwSw2w
qxTvwPwdAcXVJTNqBRWwTZI2IOWhRANCAASQlea4IqVz/3lAmrkry8tvs5j+k9xq
rozVj9IP0y4CzTy3lVwentBSrBoNhGex0kV7KSQHKdNzAX9Nu7ZKRlD/
-----END PRIVATE KEY-----";

/// Which key signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    Rs256,
    Es256,
}

fn rsa_key() -> rsa::RsaPrivateKey {
    rsa::RsaPrivateKey::from_pkcs8_pem(RSA_KEY).expect("RSA test key")
}

fn ec_key() -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::from_pkcs8_pem(EC_KEY).expect("EC test key")
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The JWKS with both keys (kids `rsa-1` and `ec-1`).
pub fn jwks() -> serde_json::Value {
    let rsa = rsa_key().to_public_key();
    let point = ec_key().verifying_key().to_encoded_point(false);
    serde_json::json!({ "keys": [
        { "kty": "RSA", "kid": "rsa-1", "alg": "RS256", "use": "sig",
          "n": b64(&rsa.n().to_bytes_be()), "e": b64(&rsa.e().to_bytes_be()) },
        { "kty": "EC", "kid": "ec-1", "crv": "P-256",
          "x": b64(point.x().expect("x")), "y": b64(point.y().expect("y")) },
    ]})
}

/// A token with `claims`, signed with `alg`'s key.
pub fn sign(alg: Alg, claims: &serde_json::Value) -> String {
    let (name, kid) = match alg {
        Alg::Rs256 => ("RS256", "rsa-1"),
        Alg::Es256 => ("ES256", "ec-1"),
    };
    let header = serde_json::json!({ "alg": name, "typ": "JWT", "kid": kid });
    let signed = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = match alg {
        Alg::Rs256 => {
            let key = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(rsa_key());
            key.sign(signed.as_bytes()).to_vec()
        }
        Alg::Es256 => {
            let sig: p256::ecdsa::Signature = ec_key().sign(signed.as_bytes());
            sig.to_bytes().to_vec()
        }
    };
    format!("{signed}.{}", b64(&sig))
}

/// Seconds since the epoch, now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
