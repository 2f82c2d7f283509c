//! Headers, bodies, local responses and what a callback decides.

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

fn valid_name(name: &str) -> Result<(), Error> {
    let bare = name.strip_prefix(':').unwrap_or(name);
    HeaderName::from_bytes(bare.as_bytes())
        .map(|_| ())
        .map_err(|_| Error::new("header name", weft_abi::Status::BadArgument))
}

fn valid_value(value: &str) -> Result<(), Error> {
    HeaderValue::from_str(value)
        .map(|_| ())
        .map_err(|_| Error::new("header value", weft_abi::Status::BadArgument))
}

impl Headers {
    pub(crate) fn new(kind: MapType) -> Headers {
        Headers { kind }
    }

    /// The value of `name` (several values come joined with `,`), if present.
    pub fn get(&self, name: &str) -> Option<String> {
        let v = host()
            .get_map_value(self.kind, name.to_ascii_lowercase().as_bytes())
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
            .replace_map_value(
                self.kind,
                name.to_ascii_lowercase().as_bytes(),
                value.as_bytes(),
            )
            .map_err(|s| Error::new("replace_header_map_value", s))
    }

    /// Adds a value to `name` (a new field when it had none).
    pub fn add(&mut self, name: &str, value: &str) -> Result<(), Error> {
        valid_name(name)?;
        valid_value(value)?;
        host()
            .add_map_value(
                self.kind,
                name.to_ascii_lowercase().as_bytes(),
                value.as_bytes(),
            )
            .map_err(|s| Error::new("add_header_map_value", s))
    }

    /// Removes every value of `name`.
    pub fn remove(&mut self, name: &str) -> Result<(), Error> {
        host()
            .remove_map_value(self.kind, name.to_ascii_lowercase().as_bytes())
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
