//! Records what the filter sees of the request's path, in headers the upstream receives:
//! `x-filter-path` (`:path`), `x-filter-request-path` (`request.path`), `x-filter-url-path`
//! (`request.url_path`) and `x-filter-route` (`route_name`). The tests compare them with the
//! path the upstream received and the route that took the request. It reads `route_name`
//! first (`x-filter-route-first`), then sets `:path` from `x-record-path` when the request
//! has one: the later `route_name` must follow the new path.

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

proxy_wasm::main! {{
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Record) });
}}

struct Record;

impl Context for Record {}

impl Record {
    fn property_text(&self, path: &[&str]) -> String {
        self.get_property(path.to_vec())
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_else(|| "<none>".into())
    }
}

impl HttpContext for Record {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let first = self.property_text(&["route_name"]);
        if let Some(p) = self.get_http_request_header("x-record-path") {
            self.set_http_request_header(":path", Some(&p));
        }
        self.set_http_request_header("x-filter-route-first", Some(&first));
        let path = self
            .get_http_request_header(":path")
            .unwrap_or_else(|| "<none>".into());
        self.set_http_request_header("x-filter-path", Some(&path));
        let request_path = self.property_text(&["request", "path"]);
        self.set_http_request_header("x-filter-request-path", Some(&request_path));
        let url_path = self.property_text(&["request", "url_path"]);
        self.set_http_request_header("x-filter-url-path", Some(&url_path));
        let route = self.property_text(&["route_name"]);
        self.set_http_request_header("x-filter-route", Some(&route));
        Action::Continue
    }
}
