//! The wire format of the HTTP/1.1 client: request heads and framing out, response heads and
//! bodies in. Pure functions over buffers (no I/O), so each can be tested, and fuzzed, alone.

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode, Version};
use http_body::Body as _;

use super::Error;
use crate::upstream::body::UpstreamBody;

/// Most bytes of a response head (status line and fields), as Envoy's default 60 KiB.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most fields in a response head or trailer section.
pub const MAX_HEADERS: usize = 128;
/// Most bytes of a chunk-size line (size and extensions) or of a trailer section.
pub const MAX_LINE: usize = 4 * 1024;

/// How the request body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Exactly this many more bytes.
    Length(u64),
    Chunked,
}

/// The request's framing, from its `Content-Length` (all values must agree) and its body.
pub fn framing(headers: &HeaderMap, body: &UpstreamBody) -> Result<Framing, Error> {
    let mut length: Option<u64> = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        let n = parse_length(v.as_bytes()).ok_or(Error::BodyLength)?;
        if length.is_some_and(|l| l != n) {
            return Err(Error::BodyLength);
        }
        length = Some(n);
    }
    Ok(match length {
        Some(n) => Framing::Length(n),
        None if body.is_end_stream() => Framing::Length(0),
        None => match body.size_hint().exact() {
            Some(n) => Framing::Length(n),
            None => Framing::Chunked,
        },
    })
}

/// A `Content-Length` value: digits only (a comma-separated list of one repeated number is
/// accepted, as RFC 9110 §8.6 allows), at most 18 of them.
pub fn parse_length(v: &[u8]) -> Option<u64> {
    let mut value: Option<u64> = None;
    for part in v.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 18 || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = part.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        if value.is_some_and(|v| v != n) {
            return None;
        }
        value = Some(n);
    }
    value
}

/// Encodes the request head: request line, the fields, the framing field.
pub fn encode_head(
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    framing: Framing,
    add_length: bool,
) -> Bytes {
    let mut size = method.as_str().len() + target.len() + 16 + 32;
    for (k, v) in headers {
        size += k.as_str().len() + v.len() + 4;
    }
    let mut out = BytesMut::with_capacity(size);
    out.extend_from_slice(method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (k, v) in headers {
        if k == header::CONTENT_LENGTH || k == header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Length(n) if add_length => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(n.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Length(_) => {}
    }
    out.extend_from_slice(b"\r\n");
    out.freeze()
}

/// Whether a method with an empty body still says `content-length: 0` (those that usually
/// carry one, as nginx and Envoy send them).
pub fn says_empty_length(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH)
}

/// How the response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// This many more bytes.
    Length(u64),
    Chunked(Chunk),
    /// At the connection's close.
    UntilClose,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: the trailer section.
    Trailers,
}

/// The field names of the responses a connection read, by position: an upstream sends the
/// same names, spelled the same, in the same order response after response, and a name found
/// here byte for byte is not parsed again.
#[derive(Debug, Default)]
pub struct Names(Vec<(Vec<u8>, HeaderName)>);

impl Names {
    /// Most positions remembered, and the longest name remembered (a hostile upstream's
    /// names cost a connection at most about 2 KiB).
    const POSITIONS: usize = 32;
    const LONGEST: usize = 64;

    /// The name spelled `raw` at position `i` of a head.
    fn at(&mut self, i: usize, raw: &[u8]) -> Result<HeaderName, Error> {
        if let Some((seen, name)) = self.0.get(i)
            && seen[..] == *raw
        {
            return Ok(name.clone());
        }
        let name =
            HeaderName::from_bytes(raw).map_err(|_| Error::Protocol("invalid header name"))?;
        if i < Self::POSITIONS && raw.len() <= Self::LONGEST {
            if let Some((seen, kept)) = self.0.get_mut(i) {
                seen.clear();
                seen.extend_from_slice(raw);
                *kept = name.clone();
            } else if i == self.0.len() {
                self.0.push((raw.to_vec(), name.clone()));
            }
        }
        Ok(name)
    }
}

/// A parsed response head.
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub reading: Reading,
    pub keep_alive: bool,
}

/// Parses a response head from the front of `buf` (consuming it) when it is complete; `names`
/// are the connection's.
pub fn parse_head(
    buf: &mut BytesMut,
    method: &Method,
    names: &mut Names,
) -> Result<Option<Head>, Error> {
    // Left uninitialised: the parser writes the fields it finds (initialising all 128 was
    // 4 KiB of stores per response).
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut fields,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD {
                return Err(Error::Protocol("response head too large"));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Error::Protocol("too many response header fields"));
        }
        Err(_) => return Err(Error::Protocol("invalid response head")),
    };
    if len > MAX_HEAD {
        return Err(Error::Protocol("response head too large"));
    }
    let code = resp.code.ok_or(Error::Protocol("no status"))?;
    let status = StatusCode::from_u16(code).map_err(|_| Error::Protocol("invalid status"))?;
    let version = if resp.version == Some(1) {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    // The values are kept as offsets into the head, and become slices of it once it is split
    // off: one allocation for all of them, and cloning one (a filter's copy of the head) only
    // counts a reference.
    let base = buf.as_ptr() as usize;
    let mut fields: Vec<(HeaderName, usize, usize)> = Vec::with_capacity(resp.headers.len());
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut has_te = false;
    let mut close = version == Version::HTTP_10;
    for (i, f) in resp.headers.iter().enumerate() {
        let name = names.at(i, f.name.as_bytes())?;
        let start = f.value.as_ptr() as usize - base;
        if name == header::CONTENT_LENGTH {
            let n = parse_length(f.value).ok_or(Error::Protocol("invalid content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(Error::Protocol("conflicting content-length"));
            }
            length = Some(n);
        } else if name == header::TRANSFER_ENCODING {
            has_te = true;
            // Only the final coding matters: chunked there, or the body runs to the close.
            chunked = f
                .value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name == header::CONNECTION {
            // Only a `Connection` that names other fields goes on (the response stage strips
            // them and it): `close` and `keep-alive` are this connection's alone, read here.
            let mut names_fields = false;
            for token in f.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    if version == Version::HTTP_10 {
                        close = false;
                    }
                } else if !token.is_empty() {
                    names_fields = true;
                }
            }
            if !names_fields {
                continue;
            }
        }
        fields.push((name, start, start + f.value.len()));
    }
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(fields.len());
    for (name, start, end) in fields {
        let value = HeaderValue::from_maybe_shared(head.slice(start..end))
            .map_err(|_| Error::Protocol("invalid header value"))?;
        headers.append(name, value);
    }
    let bodiless = *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let reading = if bodiless {
        Reading::Done
    } else if has_te {
        // Transfer-Encoding overrides Content-Length, which is not passed on; a message
        // carrying both is suspect, so its connection is not reused (RFC 9112 §6.3).
        if length.is_some() {
            headers.remove(header::CONTENT_LENGTH);
            close = true;
        }
        if chunked {
            Reading::Chunked(Chunk::Size)
        } else {
            Reading::UntilClose
        }
    } else {
        match length {
            Some(0) => Reading::Done,
            Some(n) => Reading::Length(n),
            None => Reading::UntilClose,
        }
    };
    if reading == Reading::UntilClose {
        close = true;
    }
    Ok(Some(Head {
        status,
        version,
        headers,
        reading,
        keep_alive: !close,
    }))
}

pub enum Decoded {
    /// More bytes are needed; the state to resume in.
    Need(Chunk),
    Data(Bytes, Chunk),
    /// The last chunk and the trailer section (when it had fields).
    End(Option<HeaderMap>),
}

/// Decodes what `buf` holds of a chunked body, from `state`.
pub fn decode_chunk(buf: &mut BytesMut, mut state: Chunk) -> Result<Decoded, Error> {
    loop {
        match state {
            Chunk::Size => {
                let Some(end) = find_crlf(buf, MAX_LINE)? else {
                    return Ok(Decoded::Need(state));
                };
                let line = &buf[..end];
                let digits = line
                    .iter()
                    .position(|b| !b.is_ascii_hexdigit())
                    .unwrap_or(line.len());
                if digits == 0 || digits > 16 {
                    return Err(Error::Protocol("invalid chunk size"));
                }
                // Anything after the size is a chunk extension (`;name=value`), ignored.
                let rest = line[digits..].trim_ascii_start();
                if !rest.is_empty() && rest[0] != b';' {
                    return Err(Error::Protocol("invalid chunk size"));
                }
                let size = line[..digits].iter().fold(0u64, |n, &d| {
                    n << 4 | u64::from((d as char).to_digit(16).unwrap_or(0))
                });
                buf.advance(end + 2);
                state = if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(Decoded::Need(state));
                }
                let n = (buf.len() as u64).min(left) as usize;
                let data = buf.split_to(n).freeze();
                let next = match left - n as u64 {
                    0 => Chunk::DataEnd,
                    l => Chunk::Data(l),
                };
                return Ok(Decoded::Data(data, next));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Decoded::Need(state));
                }
                if &buf[..2] != b"\r\n" {
                    return Err(Error::Protocol("chunk data not followed by CRLF"));
                }
                buf.advance(2);
                state = Chunk::Size;
            }
            Chunk::Trailers => {
                if buf.starts_with(b"\r\n") {
                    buf.advance(2);
                    return Ok(Decoded::End(None));
                }
                let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let (len, parsed) = match httparse::parse_headers(buf, &mut fields) {
                    Ok(httparse::Status::Complete((len, parsed))) => (len, parsed),
                    Ok(httparse::Status::Partial) => {
                        if buf.len() > MAX_LINE {
                            return Err(Error::Protocol("trailer section too large"));
                        }
                        return Ok(Decoded::Need(state));
                    }
                    Err(_) => return Err(Error::Protocol("invalid trailer section")),
                };
                if len > MAX_LINE {
                    return Err(Error::Protocol("trailer section too large"));
                }
                let mut trailers = HeaderMap::with_capacity(parsed.len());
                for f in parsed {
                    let name = HeaderName::from_bytes(f.name.as_bytes())
                        .map_err(|_| Error::Protocol("invalid trailer name"))?;
                    let value = HeaderValue::from_bytes(f.value)
                        .map_err(|_| Error::Protocol("invalid trailer value"))?;
                    trailers.append(name, value);
                }
                buf.advance(len);
                return Ok(Decoded::End((!trailers.is_empty()).then_some(trailers)));
            }
        }
    }
}

/// Consumes the last chunk (with no extension and no trailer) when it is next in `buf`.
pub fn ends_here(buf: &mut BytesMut, state: Chunk) -> bool {
    let end: &[u8] = match state {
        Chunk::DataEnd => b"\r\n0\r\n\r\n",
        Chunk::Size => b"0\r\n\r\n",
        _ => return false,
    };
    if buf.starts_with(end) {
        buf.advance(end.len());
        return true;
    }
    false
}

/// The position of the first CRLF in `buf`, within `limit` bytes; a bare LF is an error.
fn find_crlf(buf: &[u8], limit: usize) -> Result<Option<usize>, Error> {
    match buf.iter().take(limit + 2).position(|&b| b == b'\n') {
        Some(0) => Err(Error::Protocol("bare LF in a chunked body")),
        Some(i) if buf[i - 1] == b'\r' => Ok(Some(i - 1)),
        Some(_) => Err(Error::Protocol("bare LF in a chunked body")),
        None if buf.len() > limit => Err(Error::Protocol("chunk-size line too long")),
        None => Ok(None),
    }
}
