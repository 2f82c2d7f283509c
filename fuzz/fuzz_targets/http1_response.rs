#![no_main]
//! The HTTP/1.1 client's response decoder, on arbitrary upstream bytes fed in arbitrary
//! pieces: it never panics, never consumes more than it was given, parses a head the same with
//! the names a connection remembered from it as without, and a chunked body it accepts decodes
//! to the same bytes and trailers when encoded again and split otherwise.

use bytes::{BufMut, BytesMut};
use http::{HeaderMap, Method};
use libfuzzer_sys::fuzz_target;
use weft_proxy::upstream::h1::codec::{
    Chunk, Decoded, MAX_LINE, Names, Reading, decode_chunk, parse_head,
};

/// Decodes a chunked body fed `step` bytes at a time: the body and trailers, or `None` when
/// refused or incomplete.
fn decode(raw: &[u8], step: usize) -> Option<(Vec<u8>, Option<HeaderMap>)> {
    let mut buf = BytesMut::new();
    let mut body = Vec::new();
    let mut state = Chunk::Size;
    let mut fed = 0;
    loop {
        let before = buf.len();
        match decode_chunk(&mut buf, state).ok()? {
            Decoded::Need(s) => {
                state = s;
                if fed == raw.len() {
                    return None;
                }
                let n = step.min(raw.len() - fed);
                buf.extend_from_slice(&raw[fed..fed + n]);
                fed += n;
            }
            Decoded::Data(d, s) => {
                assert!(!d.is_empty() && d.len() <= before, "data out of nothing");
                body.extend_from_slice(&d);
                state = s;
            }
            Decoded::End(t) => return Some((body, t)),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let method = if flags & 1 == 0 {
        Method::GET
    } else {
        Method::HEAD
    };
    let step = usize::from(flags >> 1).max(1);
    let mut buf = BytesMut::from(rest);
    let mut names = Names::default();
    if let Ok(Some(head)) = parse_head(&mut buf, &method, &mut names) {
        assert!(buf.len() <= rest.len());
        let mut again = BytesMut::from(rest);
        let head2 = parse_head(&mut again, &method, &mut names)
            .expect("parsed once")
            .expect("complete once");
        assert_eq!(
            head.headers, head2.headers,
            "the remembered names changed the head"
        );
        if head.status.is_informational() || method == Method::HEAD {
            assert_eq!(head.reading, Reading::Done);
        }
        if head.reading == Reading::UntilClose {
            assert!(
                !head.keep_alive,
                "a body delimited by the close keeps its connection"
            );
        }
    }
    // The same bytes as a chunked body.
    if let Some((body, trailers)) = decode(rest, step) {
        let mut again = BytesMut::new();
        if !body.is_empty() {
            again.put_slice(format!("{:x}\r\n", body.len()).as_bytes());
            again.put_slice(&body);
            again.put_slice(b"\r\n");
        }
        again.put_slice(b"0\r\n");
        let mut section = BytesMut::new();
        for (k, v) in trailers.iter().flatten() {
            section.put_slice(k.as_str().as_bytes());
            section.put_slice(b": ");
            section.put_slice(v.as_bytes());
            section.put_slice(b"\r\n");
        }
        section.put_slice(b"\r\n");
        // Re-encoded, a trailer section the decoder took can be longer (`name: value` for
        // `name:value`, CRLF for a bare LF): past the limit it is refused, rightly.
        if section.len() <= MAX_LINE {
            again.put_slice(&section);
            let (body2, trailers2) = decode(&again, 7).expect("its own encoding decodes");
            assert_eq!(body, body2);
            assert_eq!(trailers, trailers2);
        }
    }
});
