//! weft-cp's side of the control link: TLS 1.3 with the control plane's own SVID
//! (`spiffe://<td>/ns/weft-system/sa/weft-cp`, issued by its CA, renewed at half its life),
//! client certificates verified whenever one is presented (proxies and operators), none
//! required (enrollment, and operators with a token). Each connection carries who its peer
//! proved to be to every call on it. Plaintext only with `--insecure-plaintext`, on loopback.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use weft_proxy::identity::mesh::{PeerPolicy, server_config};
use weft_proxy::identity::{CONTROL_PLANE_NS, CONTROL_PLANE_SA, Identity, Material, SpiffeId};
use weft_proxy::tls::io::MaybeTls;

use crate::ca::Ca;

/// A TLS handshake gets this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; more connections wait in the listen queue.
const HANDSHAKES: usize = 256;

/// Who the peer of a connection proved to be.
#[derive(Debug, Clone, Default)]
pub struct LinkPeer {
    pub remote: Option<SocketAddr>,
    /// The verified certificate's SPIFFE ID and common name (the node id).
    pub id: Option<SpiffeId>,
    pub common_name: Option<String>,
    pub tls: bool,
}

/// One control-link connection, with who its peer proved to be.
pub struct LinkConn {
    io: weft_proxy::tls::io::ServerIo,
    peer: LinkPeer,
}

impl tonic::transport::server::Connected for LinkConn {
    type ConnectInfo = LinkPeer;
    fn connect_info(&self) -> LinkPeer {
        self.peer.clone()
    }
}

impl AsyncRead for LinkConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for LinkConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The control plane's own identity.
pub fn control_plane_id(trust_domain: &str) -> Result<SpiffeId, String> {
    SpiffeId::workload(trust_domain, CONTROL_PLANE_NS, CONTROL_PLANE_SA)
}

/// Issues the control plane's own certificate (a new key each time). Its chain ends with the
/// root, so a proxy that knows only the root's pin (a join token) can verify it.
pub fn own_material(ca: &Ca, names: &[String]) -> Result<Material, String> {
    let key = weft_proxy::identity::svid::new_key()?;
    let csr = weft_proxy::identity::svid::csr(&key)?;
    let id = control_plane_id(ca.trust_domain())?;
    let issued = ca
        .issue_serving(&csr, &id, "weft-cp", crate::ca::DEFAULT_LIFETIME, names)
        .map_err(|e| e.to_string())?;
    let mut chain = issued.chain;
    chain.push(ca.serving_anchor());
    let (generation, bundle) = ca.bundle();
    Material::new(
        weft_proxy::identity::svid::key_der(&key),
        chain,
        bundle,
        generation,
    )
}

/// The TLS side of the listener: the control plane's identity (swapped on renewal and on
/// bundle changes) and its server config.
pub struct LinkTls {
    pub identity: Arc<Identity>,
    config: ArcSwap<rustls::ServerConfig>,
}

impl LinkTls {
    pub fn new(material: Material) -> Result<Arc<LinkTls>, String> {
        let identity = Identity::new(material);
        let config = Self::config(&identity)?;
        Ok(Arc::new(LinkTls {
            identity,
            config: ArcSwap::from_pointee(config),
        }))
    }

    fn config(identity: &Arc<Identity>) -> Result<rustls::ServerConfig, String> {
        let policy = PeerPolicy {
            identity: identity.clone(),
            allowed: Vec::new(),
        };
        server_config(policy, false, &[b"h2"]).map_err(|e| e.to_string())
    }

    /// New handshakes use `material`; open connections keep theirs.
    pub fn set(&self, material: Material) {
        self.identity.set(material);
    }
}

/// Accepts connections, completes TLS handshakes (bounded in time and in number at once) and
/// yields the connections with their peers, for `serve_with_incoming`.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<LinkTls>>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<LinkConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let slots = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let (stream, remote) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "control link accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let tx = tx.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let conn = match tls {
                    None => LinkConn {
                        io: MaybeTls::Plain(stream),
                        peer: LinkPeer {
                            remote: Some(remote),
                            ..LinkPeer::default()
                        },
                    },
                    Some(tls) => {
                        let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.load_full());
                        let s = match tokio::time::timeout(
                            HANDSHAKE_TIMEOUT,
                            acceptor.accept(stream),
                        )
                        .await
                        {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%remote, error = %e, "control link handshake failed");
                                return;
                            }
                            Err(_) => return,
                        };
                        let mut peer = LinkPeer {
                            remote: Some(remote),
                            tls: true,
                            ..LinkPeer::default()
                        };
                        if let Some(cert) =
                            s.get_ref().1.peer_certificates().and_then(|c| c.first())
                            && let Ok(names) = weft_proxy::tls::files::cert_names(cert)
                        {
                            peer.id = names.uris.first().and_then(|u| SpiffeId::parse(u).ok());
                            peer.common_name = names.common_name;
                        }
                        LinkConn {
                            io: MaybeTls::Tls(Box::new(s)),
                            peer,
                        }
                    }
                };
                drop(slot);
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
