//! Headers, bodies, local responses and what a callback decides.

use std::borrow::Cow;

use http::{HeaderName, HeaderValue, Method, StatusCode};
use weft_abi::{BufferType, MapType};

use crate::Error;
use crate::host::host;

/// What a callback decides.
#[derive(Debug)]
pub enum Action {
    /// Pass the headers (or body chunk, or trailers) on.
    Continue,
    /// Hold them here: for a body, keep buffering (the next callback sees more); for headers
    /// and trailers, stay held.
    Pause,
    /// Answer the request with this response instead of the upstream (on the response path:
    /// replace the response). Later filters see the local response.
    Respond(Response),
}

impl Action {
    /// [`Action::Respond`] with `response`.
    pub fn respond(response: Response) -> Action {
        Action::Respond(response)
    }
}

/// A response the filter sends itself (`proxy_send_local_response`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// For gRPC clients: the `grpc-status` to answer with (HTTP 200 + trailers-only).
    pub grpc_status: Option<u32>,
    /// Why (the `response.code_details` property; logged by the proxy).
    pub details: String,
}

impl Response {
    pub fn new(status: u16) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            grpc_status: None,
            details: String::new(),
        }
    }

    /// A gRPC error answer: `grpc-status` and `grpc-message`.
    pub fn grpc(status: u32, message: &str) -> Response {
        let mut r = Response::new(200);
        r.grpc_status = Some(status);
        r.body = message.as_bytes().to_vec();
        r
    }

    pub fn header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Response {
        self.body = body.into();
        self
    }

    pub fn details(mut self, details: &str) -> Response {
        self.details = details.to_owned();
        self
    }

    /// Sends it for the current request.
    pub(crate) fn send(&self) -> Result<(), Error> {
        let headers: Vec<(&[u8], &[u8])> = self
            .headers
            .iter()
            .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
            .collect();
        host()
            .send_local_response(
                self.status,
                &self.details,
                &self.body,
                &headers,
                self.grpc_status,
            )
            .map_err(|s| Error::new("send_local_response", s))
    }
}

/// A header map of the current request: request or response headers or trailers. Reads and
/// writes go to the proxy at once. Names are case-insensitive; pseudo-headers (`:path`,
/// `:method`, `:authority`, `:scheme`, `:status`) are there too.
#[derive(Debug)]
pub struct Headers {
    kind: MapType,
}

/// Most bytes in a header name (as the `http` crate allows).
const MAX_NAME: usize = (1 << 16) - 1;

/// The `tchar`s of RFC 9110 (upper-case letters included: names are sent lower-cased), as a
/// table: one load per byte instead of a chain of comparisons.
const TCHAR: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let others = b"!#$%&'*+-.^_`|~";
    let mut i = 0;
    while i < others.len() {
        t[others[i] as usize] = true;
        i += 1;
    }
    t
};

/// The names `http::HeaderName` accepts (a pseudo-header's after its `:`), checked in place:
/// the `http` crate's own check copies the name to the heap, on every header a filter writes.
fn valid_name(name: &str) -> Result<(), Error> {
    let bare = name.strip_prefix(':').unwrap_or(name);
    if !bare.is_empty() && bare.len() <= MAX_NAME && bare.bytes().all(|b| TCHAR[usize::from(b)]) {
        Ok(())
    } else {
        Err(Error::new("header name", weft_abi::Status::BadArgument))
    }
}

/// The values `http::HeaderValue::from_str` accepts (no control character but tab, no DEL;
/// bytes past ASCII are fine), checked in place.
fn valid_value(value: &str) -> Result<(), Error> {
    if value
        .bytes()
        .all(|b| (b >= b' ' && b != 0x7f) || b == b'\t')
    {
        Ok(())
    } else {
        Err(Error::new("header value", weft_abi::Status::BadArgument))
    }
}

/// `name` as the host compares names: lower case (a copy only when it is not already).
fn lower(name: &str) -> Cow<'_, str> {
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}

impl Headers {
    pub(crate) fn new(kind: MapType) -> Headers {
        Headers { kind }
    }

    /// The value of `name` (several values come joined with `,`), if present.
    pub fn get(&self, name: &str) -> Option<String> {
        let v = host()
            .get_map_value(self.kind, lower(name).as_bytes())
            .ok()??;
        String::from_utf8(v).ok()
    }

    /// The value of `name` as an `http` header value.
    pub fn get_value(&self, name: &str) -> Option<HeaderValue> {
        HeaderValue::from_str(&self.get(name)?).ok()
    }

    /// Every field, pseudo-headers included, in order.
    pub fn all(&self) -> Result<Vec<(String, String)>, Error> {
        let pairs = host()
            .get_map(self.kind)
            .map_err(|s| Error::new("get_header_map_pairs", s))?;
        Ok(pairs
            .into_iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(&k).into_owned(),
                    String::from_utf8_lossy(&v).into_owned(),
                )
            })
            .collect())
    }

    /// The regular fields (no pseudo-headers) as an `http::HeaderMap`.
    pub fn to_header_map(&self) -> Result<http::HeaderMap, Error> {
        let mut map = http::HeaderMap::new();
        for (k, v) in self.all()? {
            if k.starts_with(':') {
                continue;
            }
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(&v),
            ) {
                map.append(k, v);
            }
        }
        Ok(map)
    }

    /// Sets `name` to `value`, replacing what was there.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), Error> {
        valid_name(name)?;
        valid_value(value)?;
        host()
            .replace_map_value(self.kind, lower(name).as_bytes(), value.as_bytes())
            .map_err(|s| Error::new("replace_header_map_value", s))
    }

    /// Adds a value to `name` (a new field when it had none).
    pub fn add(&mut self, name: &str, value: &str) -> Result<(), Error> {
        valid_name(name)?;
        valid_value(value)?;
        host()
            .add_map_value(self.kind, lower(name).as_bytes(), value.as_bytes())
            .map_err(|s| Error::new("add_header_map_value", s))
    }

    /// Removes every value of `name`.
    pub fn remove(&mut self, name: &str) -> Result<(), Error> {
        host()
            .remove_map_value(self.kind, lower(name).as_bytes())
            .map_err(|s| Error::new("remove_header_map_value", s))
    }

    /// `:method`.
    pub fn method(&self) -> Option<Method> {
        Method::from_bytes(self.get(":method")?.as_bytes()).ok()
    }

    /// `:path` (with the query).
    pub fn path(&self) -> Option<String> {
        self.get(":path")
    }

    /// `:authority` (the host).
    pub fn authority(&self) -> Option<String> {
        self.get(":authority")
    }

    /// `:status` of a response.
    pub fn status(&self) -> Option<StatusCode> {
        StatusCode::from_bytes(self.get(":status")?.as_bytes()).ok()
    }
}

/// The buffered body of the current request or response.
#[derive(Debug)]
pub struct Body {
    kind: BufferType,
    /// Where this callback's bytes start in the host's buffer (after bytes the filter already
    /// let through that the host still holds).
    start: usize,
    size: usize,
}

impl Body {
    pub(crate) fn new(kind: BufferType, start: usize, size: usize) -> Body {
        Body { kind, start, size }
    }

    /// Bytes buffered so far.
    pub fn len(&self) -> usize {
        self.size
    }

    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// The buffered bytes.
    pub fn bytes(&self) -> Result<Vec<u8>, Error> {
        if self.size == 0 {
            return Ok(Vec::new());
        }
        host()
            .get_buffer(self.kind, self.start, self.size)
            .map_err(|s| Error::new("get_buffer_bytes", s))
    }

    /// Replaces the buffered bytes with `data`.
    pub fn replace(&mut self, data: &[u8]) -> Result<(), Error> {
        host()
            .set_buffer(self.kind, self.start, self.size, data)
            .map_err(|s| Error::new("set_buffer_bytes", s))?;
        self.size = data.len();
        Ok(())
    }

    /// Appends `data` to the buffered bytes.
    pub fn append(&mut self, data: &[u8]) -> Result<(), Error> {
        host()
            .set_buffer(self.kind, self.start + self.size, 0, data)
            .map_err(|s| Error::new("set_buffer_bytes", s))?;
        self.size += data.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The in-place checks accept exactly what the `http` crate's types do: every byte value,
    /// alone, between others and at either end, and the length limits.
    #[test]
    fn name_and_value_checks_match_the_http_crate() {
        for b in 0..=u8::MAX {
            for bytes in [vec![b], vec![b'a', b, b'z'], vec![b, b'x'], vec![b'x', b]] {
                let Ok(text) = String::from_utf8(bytes.clone()) else {
                    continue;
                };
                // A pseudo-header's name is checked after its `:`.
                let bare = bytes.strip_prefix(b":").unwrap_or(&bytes);
                assert_eq!(
                    valid_name(&text).is_ok(),
                    HeaderName::from_bytes(bare).is_ok(),
                    "name {bytes:?}"
                );
                assert_eq!(
                    valid_value(&text).is_ok(),
                    HeaderValue::from_str(&text).is_ok(),
                    "value {bytes:?}"
                );
            }
        }
        // Characters beyond ASCII (what a `&str` can hold past 0x7f).
        for text in ["é", "a\u{80}", "\u{2028}", "x\u{10ffff}", "\u{7f}é"] {
            assert!(valid_name(text).is_err(), "{text:?}");
            assert_eq!(
                valid_value(text).is_ok(),
                HeaderValue::from_str(text).is_ok(),
                "{text:?}"
            );
        }
        assert!(valid_value("café").is_ok());
        for n in [MAX_NAME - 1, MAX_NAME, MAX_NAME + 1] {
            let name = "a".repeat(n);
            assert_eq!(
                valid_name(&name).is_ok(),
                HeaderName::from_bytes(name.as_bytes()).is_ok(),
                "{n} bytes"
            );
        }
        assert!(valid_name("").is_err());
        assert!(valid_name(":").is_err());
        assert!(valid_name(":path").is_ok());
        assert!(valid_name("::path").is_err());
        assert!(valid_value("").is_ok());
    }

    #[test]
    fn names_are_lowered_only_when_they_need_it() {
        assert!(matches!(lower("x-api-key"), Cow::Borrowed("x-api-key")));
        assert!(matches!(lower(":path"), Cow::Borrowed(":path")));
        assert_eq!(lower("X-Api-KEY"), "x-api-key");
        // Only ASCII letters change.
        assert_eq!(lower("É-X"), "É-x");
    }
}
