//! Looking at a connection's first bytes without consuming them (protocol detection, the TLS
//! ClientHello's server name), waiting for *more* bytes by readiness — never by polling in a
//! sleep loop, which made a few thousand clients that send half a preface and stop keep a
//! worker busy.

use std::io;
use std::os::fd::AsRawFd;

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Peeks into `buf` once more than `seen` bytes are there (or `buf` is full), or the peer
/// closed its side (then what there is: `0`, or no more than `seen`). Waits for the socket to
/// become readable again between tries, so a client that sends nothing more costs nothing.
pub async fn peek_more(stream: &TcpStream, buf: &mut [u8], seen: usize) -> io::Result<usize> {
    loop {
        let ready = stream.ready(Interest::READABLE).await?;
        let peeked = stream.try_io(Interest::READABLE, || {
            let n = peek_now(stream, buf)?;
            if n > seen || n == buf.len() || n == 0 {
                Ok(n)
            } else {
                // Nothing new: clear readiness and wait for the next bytes.
                Err(io::ErrorKind::WouldBlock.into())
            }
        });
        match peeked {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if ready.is_read_closed() {
                    // The peer is done sending: what is there is all there will be.
                    return match peek_now(stream, buf) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                        r => r,
                    };
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// One non-blocking `recv(MSG_PEEK)`.
fn peek_now(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` writable bytes, and the descriptor stays open for
    // the call (it is borrowed from `stream`). MSG_DONTWAIT keeps the call from blocking.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn waits_for_more_then_sees_everything_without_consuming_it() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = l.accept().await.expect("accept");
        client.write_all(b"PRI * ").await.expect("write");
        let mut buf = [0u8; 24];
        let n = peek_more(&server, &mut buf, 0).await.expect("peek");
        assert_eq!(&buf[..n], b"PRI * ");
        // Nothing more yet: it waits (and does not spin).
        let waiting = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            peek_more(&server, &mut buf, n),
        )
        .await;
        assert!(waiting.is_err(), "returned without new bytes");
        client.write_all(b"HTTP/2.0").await.expect("write");
        let m = peek_more(&server, &mut buf, n).await.expect("peek");
        assert_eq!(&buf[..m], b"PRI * HTTP/2.0");
        // The peer closes: what is there is returned.
        client.shutdown().await.expect("shutdown");
        drop(client);
        let last = peek_more(&server, &mut buf, m).await.expect("peek");
        assert_eq!(last, m);
    }
}
