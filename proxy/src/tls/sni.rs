//! Reading the server name (SNI) from a TLS ClientHello without terminating TLS: the bytes are
//! peeked, never consumed, so the stream passes through untouched.

/// What the first bytes of a connection say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peeked {
    /// Not enough bytes yet.
    NeedMore,
    /// Not a TLS ClientHello (or a malformed one).
    NotTls,
    /// A complete ClientHello, with its SNI host name if it has one.
    Hello(Option<String>),
}

/// The most bytes of ClientHello weft reads (a hello with post-quantum key shares is ~2 KiB).
pub const MAX_HELLO: usize = 16 * 1024;

/// The ALPN protocols a complete ClientHello at the start of `buf` offers (`None`: not a
/// whole, well-formed hello; empty: it offers none).
pub fn alpn(buf: &[u8]) -> Option<Vec<Vec<u8>>> {
    let msg = reassemble(buf).ok()?;
    let mut r = Reader(&msg[4..]);
    r.take(2 + 32)?;
    r.vec8()?;
    r.vec16()?;
    r.vec8()?;
    if r.0.is_empty() {
        return Some(Vec::new());
    }
    let mut exts = Reader(r.vec16()?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec16()?;
        if kind != 16 {
            continue;
        }
        let mut list = Reader(Reader(data).vec16()?);
        let mut out = Vec::new();
        while !list.0.is_empty() {
            let p = list.vec8()?;
            if p.is_empty() {
                return None;
            }
            out.push(p.to_vec());
        }
        return Some(out);
    }
    Some(Vec::new())
}

/// The handshake message of the ClientHello at the start of `buf`, reassembled from the
/// records it spans; else what `parse` says of the bytes.
fn reassemble(buf: &[u8]) -> Result<Vec<u8>, Peeked> {
    let mut msg = Vec::new();
    let mut at = 0;
    loop {
        let Some(header) = buf.get(at..at + 5) else {
            return Err(Peeked::NeedMore);
        };
        if header[0] != 0x16 || header[1] != 3 {
            return Err(Peeked::NotTls);
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > 16384 + 256 {
            return Err(Peeked::NotTls);
        }
        let Some(body) = buf.get(at + 5..at + 5 + len) else {
            return Err(Peeked::NeedMore);
        };
        msg.extend_from_slice(body);
        at += 5 + len;
        if msg.len() >= 4 {
            if msg[0] != 1 {
                return Err(Peeked::NotTls);
            }
            let total =
                4 + (usize::from(msg[1]) << 16 | usize::from(msg[2]) << 8 | usize::from(msg[3]));
            if total > MAX_HELLO {
                return Err(Peeked::NotTls);
            }
            if msg.len() >= total {
                msg.truncate(total);
                return Ok(msg);
            }
        }
        if at >= MAX_HELLO {
            return Err(Peeked::NotTls);
        }
    }
}

/// Parses the ClientHello at the start of `buf` (possibly split over several records).
pub fn parse(buf: &[u8]) -> Peeked {
    let msg = match reassemble(buf) {
        Ok(m) => m,
        Err(p) => return p,
    };
    match hello_sni(&msg[4..]) {
        Some(sni) => Peeked::Hello(sni),
        None => Peeked::NotTls,
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// `Some(sni)` for a well-formed ClientHello body, `None` for a malformed one.
fn hello_sni(body: &[u8]) -> Option<Option<String>> {
    let mut r = Reader(body);
    r.take(2 + 32)?; // legacy_version, random
    r.vec8()?; // session id
    r.vec16()?; // cipher suites
    r.vec8()?; // compression methods
    if r.0.is_empty() {
        return Some(None); // no extensions
    }
    let mut exts = Reader(r.vec16()?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec16()?;
        if kind != 0 {
            continue;
        }
        let mut list = Reader(Reader(data).vec16()?);
        while !list.0.is_empty() {
            let name_type = list.u8()?;
            let name = list.vec16()?;
            if name_type == 0 {
                let name = std::str::from_utf8(name).ok()?;
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
                    return None;
                }
                return Some(Some(name.to_ascii_lowercase()));
            }
        }
        return Some(None);
    }
    Some(None)
}

/// ClientHellos for tests elsewhere in the crate.
#[cfg(test)]
pub mod tests_support {
    /// A ClientHello handshake message (no record header) with `sni` and offering `alpn`.
    pub fn handshake(sni: Option<&str>, alpn: &[&[u8]]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(0); // session id
        body.extend([0, 2, 0x13, 0x01]); // one suite
        body.extend([1, 0]); // null compression
        let mut exts = Vec::new();
        if let Some(name) = sni {
            let mut entry = vec![0];
            entry.extend((name.len() as u16).to_be_bytes());
            entry.extend(name.as_bytes());
            let mut list = (entry.len() as u16).to_be_bytes().to_vec();
            list.extend(entry);
            exts.extend([0, 0]);
            exts.extend((list.len() as u16).to_be_bytes());
            exts.extend(list);
        }
        if !alpn.is_empty() {
            let mut list = Vec::new();
            for p in alpn {
                list.push(p.len() as u8);
                list.extend(*p);
            }
            exts.extend([0, 16]);
            exts.extend(((list.len() + 2) as u16).to_be_bytes());
            exts.extend((list.len() as u16).to_be_bytes());
            exts.extend(list);
        }
        exts.extend([0, 43, 0, 3, 2, 3, 4]); // supported_versions
        body.extend((exts.len() as u16).to_be_bytes());
        body.extend(exts);
        let mut msg = vec![1, 0];
        msg.extend((body.len() as u16).to_be_bytes());
        msg.extend(body);
        msg
    }

    /// The same in one TLS record.
    pub fn client_hello(sni: Option<&str>, alpn: &[&[u8]]) -> Vec<u8> {
        let msg = handshake(sni, alpn);
        let mut out = vec![0x16, 3, 1];
        out.extend((msg.len() as u16).to_be_bytes());
        out.extend(msg);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_alpn_list() {
        let h = tests_support::client_hello(Some("a.example"), &[b"h2", b"weft-tcp"]);
        assert_eq!(alpn(&h), Some(vec![b"h2".to_vec(), b"weft-tcp".to_vec()]));
        assert_eq!(alpn(&tests_support::client_hello(None, &[])), Some(vec![]));
        for cut in 0..h.len() {
            assert_eq!(alpn(&h[..cut]), None, "cut at {cut}");
        }
        // An empty protocol name is malformed.
        let bad = tests_support::client_hello(None, &[b""]);
        assert_eq!(alpn(&bad), None);
    }

    fn hello(sni: Option<&str>) -> Vec<u8> {
        tests_support::handshake(sni, &[])
    }

    fn records(msg: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for c in msg.chunks(chunk) {
            out.extend([0x16, 3, 1]);
            out.extend((c.len() as u16).to_be_bytes());
            out.extend(c);
        }
        out
    }

    #[test]
    fn reads_the_server_name() {
        let wire = records(&hello(Some("API.example.com")), 1000);
        assert_eq!(parse(&wire), Peeked::Hello(Some("api.example.com".into())));
        assert_eq!(parse(&records(&hello(None), 1000)), Peeked::Hello(None));
    }

    #[test]
    fn waits_for_the_whole_hello_even_over_several_records() {
        let wire = records(&hello(Some("a.example")), 10);
        for cut in 0..wire.len() {
            assert_eq!(parse(&wire[..cut]), Peeked::NeedMore, "cut at {cut}");
        }
        assert_eq!(parse(&wire), Peeked::Hello(Some("a.example".into())));
    }

    #[test]
    fn refuses_what_is_not_a_hello() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n\r\n"), Peeked::NotTls);
        let mut bad = records(&hello(Some("a.example")), 1000);
        let n = bad.len();
        bad.truncate(n - 9);
        bad[4] -= 9; // record shorter than the hello says, then ends
        assert_eq!(parse(&bad), Peeked::NeedMore);
        let mut broken = hello(Some("a.example"));
        broken[0] = 2; // ServerHello
        assert_eq!(parse(&records(&broken, 1000)), Peeked::NotTls);
    }
}
