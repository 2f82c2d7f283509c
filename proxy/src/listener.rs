//! Listening sockets: one per worker and listener, bound with `SO_REUSEPORT` so the kernel
//! spreads new connections across workers.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

const BACKLOG: i32 = 1024;

fn socket(addr: SocketAddr, reuse_port: bool) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.set_tcp_nodelay(true)?;
    Ok(s)
}

/// Binds `count` sockets sharing `addr` (port 0: a free port, the same for all). Returns the
/// address actually bound.
///
/// `SO_REUSEPORT` would let a second proxy silently share a port already in use; an explicit
/// port is first probed with a plain bind, so "address in use" is reported as it should be.
pub fn bind(
    addr: SocketAddr,
    count: usize,
) -> io::Result<(SocketAddr, Vec<std::net::TcpListener>)> {
    if addr.port() != 0 {
        let probe = socket(addr, false)?;
        probe.bind(&addr.into())?;
        drop(probe);
    }
    let mut out = Vec::with_capacity(count);
    let mut bound = addr;
    for _ in 0..count.max(1) {
        let s = socket(bound, true)?;
        s.bind(&bound.into())?;
        s.listen(BACKLOG)?;
        if bound.port() == 0 {
            bound = s
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("bound socket has no IP address"))?;
        }
        out.push(std::net::TcpListener::from(s));
    }
    Ok((bound, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_binds_one_port_for_all() {
        let (addr, socks) = bind("127.0.0.1:0".parse().expect("addr"), 3).expect("bind");
        assert_ne!(addr.port(), 0);
        assert_eq!(socks.len(), 3);
        for s in &socks {
            assert_eq!(s.local_addr().expect("local"), addr);
        }
        // A second proxy on the same port is refused, not silently let in.
        let err = bind(addr, 1).expect_err("in use");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }
}
