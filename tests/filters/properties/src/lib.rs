//! Reads Envoy's attributes and answers them as `x-prop-<path with dots as dashes>` response
//! headers (integers in decimal); also stores `my_value` with `set_property` and reads it
//! back as `x-prop-my_value`.

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Props { seen: Vec::new() }) });
}}

struct Props {
    seen: Vec<(String, String)>,
}

const STRINGS: &[&str] = &[
    "request.path",
    "request.url_path",
    "request.host",
    "request.method",
    "request.scheme",
    "request.protocol",
    "request.id",
    "request.query",
    "request.useragent",
    "source.address",
    "destination.address",
    "plugin_name",
    "plugin_root_id",
    "plugin_vm_id",
    "listener_name",
];
const INTEGERS: &[&str] = &[
    "source.port",
    "destination.port",
    "connection.id",
    "request.size",
];
const RESPONSE_STRINGS: &[&str] = &["route_name", "cluster_name", "upstream.address"];
const RESPONSE_INTEGERS: &[&str] = &["response.code"];

fn int(b: &[u8]) -> String {
    let mut a = [0u8; 8];
    a[..b.len().min(8)].copy_from_slice(&b[..b.len().min(8)]);
    i64::from_le_bytes(a).to_string()
}

impl Props {
    fn read(&mut self, names: &[&str], integer: bool) {
        for name in names {
            let path: Vec<&str> = name.split('.').collect();
            let value = match self.get_property(path) {
                Some(v) if integer => int(&v),
                Some(v) => String::from_utf8_lossy(&v).into_owned(),
                None => "<none>".into(),
            };
            self.seen.push((name.replace('.', "-"), value));
        }
    }
}

impl Context for Props {}

impl HttpContext for Props {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        self.read(STRINGS, false);
        self.read(INTEGERS, true);
        self.set_property(vec!["my_value"], Some(b"kept"));
        let back = self.get_property(vec!["my_value"]).unwrap_or_default();
        self.seen.push((
            "my_value".into(),
            String::from_utf8_lossy(&back).into_owned(),
        ));
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        self.read(RESPONSE_STRINGS, false);
        self.read(RESPONSE_INTEGERS, true);
        for (k, v) in std::mem::take(&mut self.seen) {
            self.set_http_response_header(&format!("x-prop-{k}"), Some(&v));
        }
        Action::Continue
    }
}
