//! The client's codec against hostile and unusual upstream responses, and the request framing.

use super::codec::*;
use super::*;
use http::header::HeaderValue;

fn get() -> Method {
    Method::GET
}

fn head_of(raw: &[u8]) -> Result<Option<Head>, Error> {
    let mut buf = BytesMut::from(raw);
    parse_head(&mut buf, &get(), &mut Names::default())
}

fn must_parse(raw: &[u8]) -> Head {
    head_of(raw).expect("valid").expect("complete")
}

fn refused(raw: &[u8]) -> &'static str {
    match head_of(raw) {
        Err(Error::Protocol(why)) => why,
        other => panic!(
            "accepted {:?}: {}",
            String::from_utf8_lossy(raw),
            other.is_ok()
        ),
    }
}

#[test]
fn response_heads_are_framed_as_rfc_9112_says() {
    let h = must_parse(b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n");
    assert_eq!(h.reading, Reading::Length(12));
    assert!(h.keep_alive);
    let h = must_parse(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
    assert_eq!(h.reading, Reading::Chunked(Chunk::Size));
    assert!(h.keep_alive);
    // No length at all: the body runs to the close, and the connection is not reused.
    let h = must_parse(b"HTTP/1.1 200 OK\r\n\r\n");
    assert_eq!(h.reading, Reading::UntilClose);
    assert!(!h.keep_alive);
    // Bodiless statuses, whatever they announce.
    for raw in [
        &b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n"[..],
        b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n",
    ] {
        assert_eq!(must_parse(raw).reading, Reading::Done);
    }
    let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"[..]);
    let h = parse_head(&mut buf, &Method::HEAD, &mut Names::default())
        .expect("valid")
        .expect("complete");
    assert_eq!(h.reading, Reading::Done, "a response to HEAD has no body");
    // Connection: close, and HTTP/1.0 unless it keeps alive.
    assert!(
        !must_parse(b"HTTP/1.1 200 OK\r\nconnection: Close\r\ncontent-length: 0\r\n\r\n")
            .keep_alive
    );
    assert!(!must_parse(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n").keep_alive);
    assert!(
        must_parse(b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n")
            .keep_alive
    );
}

#[test]
fn connection_goes_on_only_when_it_names_other_fields() {
    // `close` and `keep-alive` (any case, spacing, repeats, empty items) are read here and go
    // no further; a value naming any other field goes on whole, for the response stage to
    // strip it and the fields it names. Its keep-alive meaning is read either way.
    for (value, keep_alive) in [
        ("keep-alive", true),
        ("Keep-Alive", true),
        (" keep-alive , ,", true),
        ("close", false),
        ("CLOSE, keep-alive", false),
        ("", true),
    ] {
        let raw = format!("HTTP/1.1 200 OK\r\nconnection: {value}\r\ncontent-length: 0\r\n\r\n");
        let h = must_parse(raw.as_bytes());
        assert!(h.headers.get(header::CONNECTION).is_none(), "{value:?}");
        assert_eq!(h.keep_alive, keep_alive, "{value:?}");
    }
    for (value, keep_alive) in [
        ("keep-alive, x-secret", true),
        ("x-secret", true),
        ("close,x-secret", false),
        ("upgrade", true),
        ("keep-alive\tx", true),
    ] {
        let raw = format!(
            "HTTP/1.1 200 OK\r\nconnection: {value}\r\nx-secret: 1\r\ncontent-length: 0\r\n\r\n"
        );
        let h = must_parse(raw.as_bytes());
        assert_eq!(
            h.headers.get(header::CONNECTION).map(|v| v.as_bytes()),
            Some(value.as_bytes()),
            "{value:?}"
        );
        assert_eq!(h.keep_alive, keep_alive, "{value:?}");
    }
}

#[test]
fn transfer_encoding_overrides_content_length_and_ends_the_connection() {
    let h =
        must_parse(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n");
    assert_eq!(h.reading, Reading::Chunked(Chunk::Size));
    assert!(
        !h.keep_alive,
        "a message with both is not trusted for reuse"
    );
    assert!(
        !h.headers.contains_key(header::CONTENT_LENGTH),
        "the length is not passed on"
    );
    // A final coding other than chunked: the body runs to the close.
    let h = must_parse(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n");
    assert_eq!(h.reading, Reading::UntilClose);
    assert!(!h.keep_alive);
    let h = must_parse(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, CHUNKED\r\n\r\n");
    assert_eq!(h.reading, Reading::Chunked(Chunk::Size));
}

#[test]
fn hostile_lengths_are_refused() {
    for raw in [
        &b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\ncontent-length: 3, 4\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: +3\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 0x10\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 1 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: \r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
    ] {
        let why = refused(raw);
        assert!(why.contains("content-length"), "{why}");
    }
    // Repeats of one value are one value.
    assert_eq!(
        must_parse(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 3, 3\r\n\r\n").reading,
        Reading::Length(3)
    );
}

#[test]
fn malformed_heads_are_refused() {
    for raw in [
        &b"HTTP/1.1 2000 OK\r\n\r\n"[..],
        b"HTTP/2.0 200 OK\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad name: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nx: a\rb\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nx: a\0b\r\n\r\n",
    ] {
        refused(raw);
    }
    // Too many fields, and a head that never ends.
    let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..=MAX_HEADERS {
        many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert_eq!(refused(&many), "too many response header fields");
    let mut endless = b"HTTP/1.1 200 OK\r\n".to_vec();
    endless.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
    assert_eq!(refused(&endless), "response head too large");
    // Partial heads wait for more.
    assert!(
        head_of(b"HTTP/1.1 200 OK\r\ncontent-le")
            .expect("valid")
            .is_none()
    );
}

fn decode_all(raw: &[u8], split: usize) -> Result<(Vec<u8>, Option<HeaderMap>, usize), Error> {
    // Feeds `raw` `split` bytes at a time, as a slow upstream would.
    let mut buf = BytesMut::new();
    let mut body = Vec::new();
    let mut state = Chunk::Size;
    let mut fed = 0;
    loop {
        match decode_chunk(&mut buf, state)? {
            Decoded::Need(s) => {
                state = s;
                if fed == raw.len() {
                    return Err(Error::Closed);
                }
                let n = split.min(raw.len() - fed);
                buf.extend_from_slice(&raw[fed..fed + n]);
                fed += n;
            }
            Decoded::Data(d, s) => {
                body.extend_from_slice(&d);
                state = s;
            }
            Decoded::End(t) => return Ok((body, t, buf.len() + raw.len() - fed)),
        }
    }
}

#[test]
fn chunked_bodies_decode_however_they_are_split() {
    let raw = b"5\r\nhello\r\n1;ext=\"x\"\r\n \r\nA\r\n0123456789\r\n0\r\n\r\n";
    for split in [1, 2, 3, 7, raw.len()] {
        let (body, trailers, left) = decode_all(raw, split).expect("valid");
        assert_eq!(body, b"hello 0123456789", "split {split}");
        assert!(trailers.is_none());
        assert_eq!(left, 0);
    }
    let raw = b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\ngrpc-message: ok\r\n\r\n";
    for split in [1, 5, raw.len()] {
        let (body, trailers, _) = decode_all(raw, split).expect("valid");
        assert_eq!(body, b"abc");
        let t = trailers.expect("trailers");
        assert_eq!(
            t.get("grpc-status").map(HeaderValue::as_bytes),
            Some(&b"0"[..])
        );
    }
}

#[test]
fn hostile_chunked_bodies_are_refused() {
    for raw in [
        &b"5\nhello\r\n0\r\n\r\n"[..],           // bare LF after the size
        b"5\r\nhello\n0\r\n\r\n",                // bare LF after the data
        b"5\r\nhelloXX0\r\n\r\n",                // data longer than its size
        b"-5\r\nhello\r\n0\r\n\r\n",             // signed size
        b"0x5\r\nhello\r\n0\r\n\r\n",            // prefixed size
        b"\r\nhello\r\n0\r\n\r\n",               // no size
        b"5 5\r\nhello\r\n0\r\n\r\n",            // two sizes
        b"10000000000000000\r\nx\r\n0\r\n\r\n",  // 17 hex digits
        b"3\r\nabc\r\n0\r\nbad name: x\r\n\r\n", // malformed trailer
    ] {
        assert!(
            matches!(decode_all(raw, 4), Err(Error::Protocol(_))),
            "accepted {:?}",
            String::from_utf8_lossy(raw)
        );
    }
    // An endless size line or trailer section is cut off.
    let mut long = b"5;".to_vec();
    long.extend(std::iter::repeat_n(b'a', MAX_LINE + 10));
    assert!(matches!(decode_all(&long, 1024), Err(Error::Protocol(_))));
    let mut trailers = b"0\r\n".to_vec();
    for i in 0..2000 {
        trailers.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
    }
    assert!(matches!(
        decode_all(&trailers, 512),
        Err(Error::Protocol(_))
    ));
    // A body cut short is not complete.
    assert!(matches!(decode_all(b"5\r\nhel", 3), Err(Error::Closed)));
}

#[test]
fn request_framing_follows_the_length_or_chunks() {
    let mut h = HeaderMap::new();
    assert_eq!(
        framing(&h, &UpstreamBody::Empty).expect("ok"),
        Framing::Length(0)
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
    assert_eq!(
        framing(&h, &UpstreamBody::Empty).expect("ok"),
        Framing::Length(5)
    );
    h.append(header::CONTENT_LENGTH, HeaderValue::from_static("6"));
    assert!(matches!(
        framing(&h, &UpstreamBody::Empty),
        Err(Error::BodyLength)
    ));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5x"));
    assert!(matches!(
        framing(&h, &UpstreamBody::Empty),
        Err(Error::BodyLength)
    ));
}

#[test]
fn request_heads_carry_one_framing_field() {
    let mut h = HeaderMap::new();
    h.insert(header::HOST, HeaderValue::from_static("svc"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
    h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("gzip"));
    let out = encode_head(&Method::POST, "/a?b=c", &h, Framing::Chunked, false);
    assert_eq!(
        &out[..],
        b"POST /a?b=c HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    let out = encode_head(&Method::PUT, "/", &h, Framing::Length(3), true);
    assert_eq!(
        &out[..],
        b"PUT / HTTP/1.1\r\nhost: svc\r\ncontent-length: 3\r\n\r\n"
    );
    let out = encode_head(
        &Method::GET,
        "/",
        &HeaderMap::new(),
        Framing::Length(0),
        false,
    );
    assert_eq!(&out[..], b"GET / HTTP/1.1\r\n\r\n");
}

#[test]
fn the_last_chunk_is_seen_early_only_when_it_is_next() {
    let mut buf = BytesMut::from(&b"\r\n0\r\n\r\n"[..]);
    assert!(ends_here(&mut buf, Chunk::DataEnd));
    assert!(buf.is_empty());
    // Another chunk, or trailers, are left for the decoder, untouched.
    for raw in [
        &b"\r\n5\r\nhello\r\n0\r\n\r\n"[..],
        b"\r\n0\r\nx: y\r\n\r\n",
        b"\r\n0\r\n",
    ] {
        let mut buf = BytesMut::from(raw);
        assert!(!ends_here(&mut buf, Chunk::DataEnd));
        assert_eq!(&buf[..], raw);
    }
    let mut buf = BytesMut::from(&b"0\r\n\r\n"[..]);
    assert!(ends_here(&mut buf, Chunk::Size));
}

#[test]
fn field_values_are_the_heads_own_bytes_and_what_follows_stays_buffered() {
    let mut buf = BytesMut::from(
        &b"HTTP/1.1 200 OK\r\nx-a: one\r\nx-empty:\r\nx-a: two \t\r\nx-obs: caf\xc3\xa9\r\ncontent-length: 4\r\n\r\nbodyHTTP/1.1"[..],
    );
    let h = parse_head(&mut buf, &get(), &mut Names::default())
        .expect("valid")
        .expect("complete");
    let all: Vec<&[u8]> = h
        .headers
        .get_all("x-a")
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    // Surrounding whitespace is not part of a value; repeated fields keep their order.
    assert_eq!(all, [&b"one"[..], b"two"]);
    assert_eq!(h.headers["x-empty"], "");
    assert_eq!(h.headers["x-obs"].as_bytes(), "café".as_bytes());
    // A copy of the head (what a filter chain keeps) outlives the connection's buffer.
    let copy = h.headers.clone();
    assert_eq!(&buf[..], b"bodyHTTP/1.1", "only the head was taken");
    buf.clear();
    buf.extend_from_slice(b"overwritten");
    assert_eq!(copy["x-a"], "one");
}

/// Names remembered from earlier heads on the connection are reused only for the very same
/// spelling at the same position: another name there, another case, a longer or shorter name
/// sharing a prefix, an invalid name, or a name past what is remembered is parsed as it is.
#[test]
fn remembered_field_names_never_stand_in_for_another_spelling() {
    let mut names = Names::default();
    let mut parse = |raw: &[u8]| {
        let mut buf = BytesMut::from(raw);
        parse_head(&mut buf, &get(), &mut names)
    };
    let listed = |h: &Head| -> Vec<String> { h.headers.keys().map(|k| k.to_string()).collect() };
    let first = parse(b"HTTP/1.1 200 OK\r\nServer: a\r\nX-Aaaa: 1\r\ncontent-length: 0\r\n\r\n")
        .expect("valid")
        .expect("complete");
    assert_eq!(listed(&first), ["server", "x-aaaa", "content-length"]);
    for (raw, want) in [
        (
            &b"HTTP/1.1 200 OK\r\nServer: a\r\nX-Aaab: 1\r\ncontent-length: 0\r\n\r\n"[..],
            ["server", "x-aaab", "content-length"],
        ),
        (
            b"HTTP/1.1 200 OK\r\nSERVER: a\r\nx-aaab: 1\r\ncontent-length: 0\r\n\r\n",
            ["server", "x-aaab", "content-length"],
        ),
        (
            b"HTTP/1.1 200 OK\r\nServe: a\r\nx-aaabc: 1\r\ncontent-length: 0\r\n\r\n",
            ["serve", "x-aaabc", "content-length"],
        ),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nServer: a\r\nx-aaab: 1\r\n\r\n",
            ["content-length", "server", "x-aaab"],
        ),
    ] {
        let h = parse(raw).expect("valid").expect("complete");
        assert_eq!(listed(&h), want, "{}", String::from_utf8_lossy(raw));
        assert_eq!(
            h.reading,
            Reading::Done,
            "content-length: 0 recognised at its position"
        );
    }
    // A name that is not a token is refused even right after a valid one at its position.
    assert!(parse(b"HTTP/1.1 200 OK\r\ncontent length: 0\r\n\r\n").is_err());
    // Past the positions and lengths remembered: still parsed, every time.
    let long = "x-".to_owned() + &"l".repeat(200);
    let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..40 {
        raw.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
    }
    raw.extend_from_slice(format!("{long}: v\r\ncontent-length: 0\r\n\r\n").as_bytes());
    for _ in 0..2 {
        let h = parse(&raw).expect("valid").expect("complete");
        assert_eq!(h.headers.len(), 42);
        assert!(h.headers.contains_key("x-39"));
        assert!(h.headers.contains_key(long.as_str()));
    }
}
