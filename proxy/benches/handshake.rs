//! Mesh handshakes: full TLS 1.3 mutual handshakes between two SVIDs (ECDSA P-256), in memory
//! on one thread, with the classical X25519 key exchange and with the hybrid post-quantum
//! X25519MLKEM768 that mesh connections prefer — measured in the same run, with the ratio.
//! `cargo bench -p weft-proxy --bench handshake` (also run by `bench/tls.sh`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};
use weft_proxy::identity::mesh::{
    MeshClientVerifier, MeshServerVerifier, PeerPolicy, SvidResolver,
};
use weft_proxy::identity::svid::{key_der, new_key};
use weft_proxy::identity::{Identity, Material};

fn identity(
    root: &CertificateParams,
    root_key: &KeyPair,
    root_der: &[u8],
    sa: &str,
) -> Arc<Identity> {
    let key = new_key().expect("key");
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, sa);
    p.subject_alt_names = vec![SanType::URI(
        format!("spiffe://bench.local/ns/bench/sa/{sa}")
            .try_into()
            .expect("uri"),
    )];
    let cert = p
        .signed_by(&key, &Issuer::from_params(root, root_key))
        .expect("leaf");
    Identity::new(
        Material::new(
            key_der(&key),
            vec![cert.der().to_vec()],
            vec![root_der.to_vec()],
            1,
        )
        .expect("material"),
    )
}

fn configs(
    group: &'static dyn rustls::crypto::SupportedKxGroup,
) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut root = CertificateParams::default();
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root.distinguished_name
        .push(DnType::CommonName, "bench root");
    let root_der = root.self_signed(&root_key).expect("root").der().to_vec();
    let server_id = identity(&root, &root_key, &root_der, "server");
    let client_id = identity(&root, &root_key, &root_der, "client");
    let provider = Arc::new(CryptoProvider {
        kx_groups: vec![group],
        ..rustls::crypto::aws_lc_rs::default_provider()
    });
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_client_cert_verifier(Arc::new(MeshClientVerifier {
            policy: PeerPolicy {
                identity: server_id.clone(),
                allowed: Vec::new(),
            },
            required: true,
        }))
        .with_cert_resolver(Arc::new(SvidResolver(server_id)));
    let client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(MeshServerVerifier(PeerPolicy {
            identity: client_id.clone(),
            allowed: Vec::new(),
        })))
        .with_client_cert_resolver(Arc::new(SvidResolver(client_id)));
    (Arc::new(server), Arc::new(client))
}

/// Moves bytes between the two ends until neither has anything to say.
fn handshake(server: &Arc<ServerConfig>, client: &Arc<ClientConfig>) {
    let name = rustls::pki_types::ServerName::try_from("mesh").expect("name");
    let mut c = ClientConnection::new(client.clone(), name).expect("client");
    let mut s = ServerConnection::new(server.clone()).expect("server");
    let mut buf = Vec::with_capacity(8192);
    while c.is_handshaking() || s.is_handshaking() {
        let mut moved = false;
        while c.wants_write() {
            buf.clear();
            c.write_tls(&mut buf).expect("client writes");
            s.read_tls(&mut buf.as_slice()).expect("server reads");
            s.process_new_packets().expect("server handshake");
            moved = true;
        }
        while s.wants_write() {
            buf.clear();
            s.write_tls(&mut buf).expect("server writes");
            c.read_tls(&mut buf.as_slice()).expect("client reads");
            c.process_new_packets().expect("client handshake");
            moved = true;
        }
        assert!(moved, "the handshake stalled");
    }
}

fn per_handshake(server: &Arc<ServerConfig>, client: &Arc<ClientConfig>) -> Duration {
    let run = |n: u32| {
        let start = Instant::now();
        for _ in 0..n {
            handshake(server, client);
        }
        start.elapsed() / n
    };
    run(50);
    (0..5).map(|_| run(400)).min().unwrap_or_default()
}

fn main() {
    use rustls::crypto::aws_lc_rs::kx_group::{X25519, X25519MLKEM768};
    let classical = configs(X25519);
    let hybrid = configs(X25519MLKEM768);
    // Alternate so that both see the same machine.
    let (mut a, mut b) = (Duration::MAX, Duration::MAX);
    for _ in 0..3 {
        a = a.min(per_handshake(&classical.0, &classical.1));
        b = b.min(per_handshake(&hybrid.0, &hybrid.1));
    }
    println!(
        "Mesh handshakes (TLS 1.3, mutual, ECDSA P-256 SVIDs), client and server on one core:"
    );
    println!(
        "{:<18} {:>14} {:>18}",
        "key exchange", "handshakes/s", "CPU µs/handshake"
    );
    for (name, d) in [("X25519", a), ("X25519MLKEM768", b)] {
        println!(
            "{:<18} {:>14.0} {:>18.1}",
            name,
            1.0 / d.as_secs_f64(),
            d.as_secs_f64() * 1e6
        );
    }
    println!(
        "X25519MLKEM768/X25519 CPU per handshake: {:.2}",
        b.as_secs_f64() / a.as_secs_f64()
    );
}
