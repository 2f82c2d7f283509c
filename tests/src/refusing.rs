//! A port on 127.0.0.1 that refuses connections, and stays so while the test runs.
//!
//! Binding `127.0.0.1:0`, noting the port and closing the listener gives a port that refuses
//! only until the kernel hands it to someone else — another test's backend, running in
//! parallel, which then answers. A socket that is bound but never listens keeps the port to
//! itself while every connection to it is refused.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

/// A bound, non-listening TCP socket: connecting to [`RefusingPort::addr`] is refused.
#[derive(Debug)]
pub struct RefusingPort {
    fd: libc::c_int,
    addr: SocketAddr,
}

impl RefusingPort {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain socket calls on a descriptor this function owns; the address buffers
        // are sized for `sockaddr_in`, and the descriptor is closed on every failure path.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let fail = |fd| {
                let e = io::Error::last_os_error();
                libc::close(fd);
                Err(e)
            };
            let mut sa: libc::sockaddr_in = std::mem::zeroed();
            sa.sin_family = libc::AF_INET as libc::sa_family_t;
            sa.sin_addr.s_addr = u32::from(Ipv4Addr::LOCALHOST).to_be();
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            if libc::bind(fd, (&raw const sa).cast(), len) != 0 {
                return fail(fd);
            }
            let mut got: libc::sockaddr_in = std::mem::zeroed();
            let mut got_len = len;
            if libc::getsockname(fd, (&raw mut got).cast(), &mut got_len) != 0 {
                return fail(fd);
            }
            let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, u16::from_be(got.sin_port));
            Ok(RefusingPort {
                fd,
                addr: addr.into(),
            })
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for RefusingPort {
    fn drop(&mut self) {
        // SAFETY: the descriptor is this value's own, closed once.
        unsafe {
            libc::close(self.fd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_refused_while_it_lives() {
        let port = RefusingPort::new().expect("bind");
        let err = std::net::TcpStream::connect(port.addr()).expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        // Nobody else may take the port meanwhile.
        assert!(std::net::TcpListener::bind(port.addr()).is_err());
    }
}
