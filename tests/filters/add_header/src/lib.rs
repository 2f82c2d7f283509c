//! Adds one response header: the plugin configuration `name: value` (default
//! `x-wasm: 1`). The benchmarks' headers-only filter.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { name: "x-wasm".into(), value: "1".into() })
    });
}}

struct Root {
    name: String,
    value: String,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _: usize) -> bool {
        if let Some(config) = self.get_plugin_configuration() {
            let text = String::from_utf8_lossy(&config);
            match text.split_once(':') {
                Some((name, value)) if !name.trim().is_empty() => {
                    self.name = name.trim().to_owned();
                    self.value = value.trim().to_owned();
                }
                _ => return false,
            }
        }
        true
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(AddHeader {
            name: self.name.clone(),
            value: self.value.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct AddHeader {
    name: String,
    value: String,
}

impl Context for AddHeader {}

impl HttpContext for AddHeader {
    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        self.add_http_response_header(&self.name, &self.value);
        Action::Continue
    }
}
