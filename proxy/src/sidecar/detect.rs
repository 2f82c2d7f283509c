//! What a captured connection speaks, from its first bytes (peeked, never consumed): a TLS
//! ClientHello, an HTTP/1.x request line, the HTTP/2 preface, or something else. A client
//! that sends nothing within the detection timeout speaks a server-first protocol (MySQL,
//! SMTP, …): TCP, without waiting any longer.

use std::io;

use tokio::net::TcpStream;

use crate::tls::sni::{self, Peeked};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The longest request line looked at; a longer one is not told from other bytes (TCP).
const MAX_REQUEST_LINE: usize = 8 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detected {
    /// An HTTP/1.0 or HTTP/1.1 request line.
    Http1,
    /// The HTTP/2 connection preface (prior knowledge).
    Http2,
    /// A TLS ClientHello, with the ALPN protocols it offers.
    Tls { alpn: Vec<Vec<u8>> },
    /// Anything else, or nothing (the client closed, or waits for the server).
    Tcp,
}

/// What bytes `buf` are, or `None` when more are needed to say.
pub fn classify(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    if buf[0] == 0x16 {
        return match sni::parse(buf) {
            Peeked::NeedMore => None,
            Peeked::NotTls => Some(Detected::Tcp),
            Peeked::Hello(_) => Some(Detected::Tls {
                alpn: sni::alpn(buf).unwrap_or_default(),
            }),
        };
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (buf.len() >= H2_PREFACE.len()).then_some(Detected::Http2);
    }
    http1(buf)
}

/// `METHOD SP request-target SP HTTP/1.x CRLF` (RFC 9112 §3), the method a token.
fn http1(buf: &[u8]) -> Option<Detected> {
    let is_tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    let method = buf.iter().take_while(|b| is_tchar(**b)).count();
    if method >= 32 {
        // Longer than any method.
        return Some(Detected::Tcp);
    }
    if method == buf.len() {
        return None;
    }
    if method == 0 || buf[method] != b' ' {
        return Some(Detected::Tcp);
    }
    let rest = &buf[method + 1..];
    let Some(eol) = rest.iter().position(|b| *b == b'\n') else {
        if buf.len() >= MAX_REQUEST_LINE || rest.iter().any(|b| b.is_ascii_control() && *b != b'\r')
        {
            return Some(Detected::Tcp);
        }
        return None;
    };
    let line = rest[..eol].strip_suffix(b"\r").unwrap_or(&rest[..eol]);
    let Some(space) = line.iter().rposition(|b| *b == b' ') else {
        return Some(Detected::Tcp);
    };
    let (target, version) = (&line[..space], &line[space + 1..]);
    let target_ok = !target.is_empty() && target.iter().all(|b| b.is_ascii_graphic());
    if target_ok && (version == b"HTTP/1.1" || version == b"HTTP/1.0") {
        Some(Detected::Http1)
    } else {
        Some(Detected::Tcp)
    }
}

/// Waits (by readiness) for enough of the first bytes to classify them, or for the peer to
/// close. The caller bounds it with the detection timeout; past it the connection is TCP.
pub async fn detect(stream: &TcpStream) -> io::Result<Detected> {
    let mut buf = vec![0u8; 1024];
    let mut seen = 0;
    loop {
        let n = crate::peek::peek_more(stream, &mut buf, seen).await?;
        if let Some(d) = classify(&buf[..n]) {
            return Ok(d);
        }
        if n == 0 || n <= seen {
            // Closed before saying enough.
            return Ok(Detected::Tcp);
        }
        if n == buf.len() {
            let cap = sni::MAX_HELLO + 1024;
            if buf.len() >= cap {
                return Ok(Detected::Tcp);
            }
            buf.resize((buf.len() * 2).min(cap), 0);
        }
        seen = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(
            classify(b"POST /a?b=c HTTP/1.0\r\nHost: x"),
            Some(Detected::Http1)
        );
        assert_eq!(classify(b"GET /x HTTP/1.1\n"), Some(Detected::Http1));
        // Not yet decidable: wait.
        for part in [
            &b"G"[..],
            b"GET",
            b"GET ",
            b"GET /index.html HTT",
            b"GET / HTTP/1.1\r",
        ] {
            assert_eq!(classify(part), None, "{}", String::from_utf8_lossy(part));
        }
    }

    #[test]
    fn what_is_not_http_is_tcp() {
        for bytes in [
            &b"GET / HTTP/2.0\r\n"[..], // no such request line
            b"GET  HTTP/1.1\r\n",       // empty target
            b"GET / FTP/1.1\r\n",
            b"get\x00 / HTTP/1.1\r\n",
            b" GET / HTTP/1.1\r\n",
            b"*1\r\n$4\r\nPING\r\n",          // Redis
            b"\x00\x00\x00\x08\x04\xd2\x16/", // PostgreSQL SSLRequest
            b"EHLO mail.example\r\n",         // no version
            b"GET /\x01 HTTP/1.1\r\n",
            b"SSH-2.0-OpenSSH_9.6\r\n",
        ] {
            assert_eq!(
                classify(bytes),
                Some(Detected::Tcp),
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
        // A method longer than any is not a method.
        assert_eq!(classify(&[b'A'; 40]), Some(Detected::Tcp));
        // A request line without end past the limit.
        let mut long = b"GET /".to_vec();
        long.extend(vec![b'a'; MAX_REQUEST_LINE]);
        assert_eq!(classify(&long), Some(Detected::Tcp));
    }

    #[test]
    fn the_h2_preface_whole_or_waited_for() {
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        for cut in 1..H2_PREFACE.len() {
            assert_eq!(classify(&H2_PREFACE[..cut]), None, "cut at {cut}");
        }
        // "PRI " then something else is not the preface (and not HTTP/1.x either).
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"),
            Some(Detected::Tcp)
        );
    }

    /// A live connection: `client` writes, then `detect` says what it saw.
    async fn detected<F, Fut>(client: F) -> Detected
    where
        F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let writer = tokio::spawn(async move {
            let c = tokio::net::TcpStream::connect(addr).await.expect("connect");
            client(c).await;
        });
        let (server, _) = l.accept().await.expect("accept");
        let d = detect(&server).await.expect("detect");
        writer.abort();
        d
    }

    #[tokio::test]
    async fn slow_truncated_and_oversized_first_bytes() {
        use tokio::io::AsyncWriteExt;
        // One byte at a time: still a request line.
        let slow = detected(|mut c: tokio::net::TcpStream| async move {
            for b in b"GET /slow HTTP/1.1\r\n" {
                c.write_all(&[*b]).await.expect("write");
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            std::future::pending::<()>().await;
        })
        .await;
        assert_eq!(slow, Detected::Http1);
        // Closed in the middle of a request line or a hello: TCP, never a wait.
        let cut = detected(|mut c: tokio::net::TcpStream| async move {
            c.write_all(b"GET /cut HTT").await.expect("write");
        })
        .await;
        assert_eq!(cut, Detected::Tcp);
        let hello = crate::tls::sni::tests_support::client_hello(None, &[b"h2"]);
        let cut = detected(move |mut c: tokio::net::TcpStream| async move {
            c.write_all(&hello[..hello.len() / 2]).await.expect("write");
        })
        .await;
        assert_eq!(cut, Detected::Tcp);
        // A TLS record larger than TLS allows, and a handshake that claims 16 MiB.
        let big = detected(|mut c: tokio::net::TcpStream| async move {
            let mut bytes = vec![0x16, 3, 1, 0xff, 0xff];
            bytes.extend(vec![0u8; 70_000]);
            let _ = c.write_all(&bytes).await;
            std::future::pending::<()>().await;
        })
        .await;
        assert_eq!(big, Detected::Tcp);
        let huge = detected(|mut c: tokio::net::TcpStream| async move {
            let _ = c
                .write_all(&[0x16, 3, 1, 0, 8, 1, 0xff, 0xff, 0xff, 0, 0, 0, 0])
                .await;
            std::future::pending::<()>().await;
        })
        .await;
        assert_eq!(huge, Detected::Tcp);
        // A request line longer than any: TCP once the limit is passed.
        let long = detected(|mut c: tokio::net::TcpStream| async move {
            let mut line = b"GET /".to_vec();
            line.extend(vec![b'a'; MAX_REQUEST_LINE + 10]);
            let _ = c.write_all(&line).await;
            std::future::pending::<()>().await;
        })
        .await;
        assert_eq!(long, Detected::Tcp);
    }

    #[test]
    fn tls_hellos_with_their_alpn() {
        let hello =
            crate::tls::sni::tests_support::client_hello(Some("a.example"), &[b"h2", b"weft-mesh"]);
        assert_eq!(
            classify(&hello),
            Some(Detected::Tls {
                alpn: vec![b"h2".to_vec(), b"weft-mesh".to_vec()]
            })
        );
        for cut in 1..hello.len() {
            assert_eq!(classify(&hello[..cut]), None, "cut at {cut}");
        }
        // A TLS record that is not a hello.
        assert_eq!(
            classify(&[0x16, 3, 1, 0, 4, 2, 0, 0, 0]),
            Some(Detected::Tcp)
        );
    }
}
