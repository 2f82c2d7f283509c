//! Where a redirected connection was going: `SO_ORIGINAL_DST` (IPv4) and
//! `IP6T_SO_ORIGINAL_DST` (IPv6), as netfilter's nat REDIRECT recorded it.

use std::io;
use std::mem::{MaybeUninit, size_of};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

/// The destination the connection had before nat rewrote it. A connection that was not
/// redirected has none (`ENOENT`); then its local address is what it connected to.
pub fn original_dst(stream: &impl AsRawFd, ipv6: bool) -> io::Result<SocketAddr> {
    let fd = stream.as_raw_fd();
    if ipv6 {
        let mut addr = MaybeUninit::<libc::sockaddr_in6>::zeroed();
        let mut len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        // SAFETY: `addr` is writable for `len` bytes; the kernel writes at most that many and
        // sets `len`; the descriptor is open (borrowed from `stream`).
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IPV6,
                libc::IP6T_SO_ORIGINAL_DST,
                addr.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the call succeeded, so the kernel filled the structure (it was zeroed).
        let a = unsafe { addr.assume_init() };
        if i32::from(a.sin6_family) != libc::AF_INET6 {
            return Err(io::Error::other("original destination is not IPv6"));
        }
        Ok(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(a.sin6_addr.s6_addr),
            u16::from_be(a.sin6_port),
            a.sin6_flowinfo,
            a.sin6_scope_id,
        )))
    } else {
        let mut addr = MaybeUninit::<libc::sockaddr_in>::zeroed();
        let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: as above.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IP,
                libc::SO_ORIGINAL_DST,
                addr.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        let a = unsafe { addr.assume_init() };
        if i32::from(a.sin_family) != libc::AF_INET {
            return Err(io::Error::other("original destination is not IPv4"));
        }
        Ok(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
            u16::from_be(a.sin_port),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_that_was_not_redirected_has_no_original_destination() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let _c = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (s, _) = l.accept().expect("accept");
        // Without a nat rule (or without conntrack) the kernel says so; never a made-up
        // address.
        match original_dst(&s, false) {
            Err(_) => {}
            Ok(a) => assert_eq!(a, l.local_addr().expect("addr")),
        }
    }
}
