//! A bad new revision for rollout tests: adds the response header its configuration names
//! (`name: value`, as `add_header`), and traps on every third request its VM sees.

use std::sync::atomic::{AtomicU32, Ordering};

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { header: ("x-flaky".into(), "1".into()) })
    });
}}

static SEEN: AtomicU32 = AtomicU32::new(0);

struct Root {
    header: (String, String),
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _: usize) -> bool {
        let Some(config) = self.get_plugin_configuration() else {
            return true;
        };
        match String::from_utf8_lossy(&config).split_once(':') {
            Some((name, value)) if !name.trim().is_empty() => {
                self.header = (name.trim().to_owned(), value.trim().to_owned());
                true
            }
            _ => false,
        }
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Flaky {
            header: self.header.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Flaky {
    header: (String, String),
}

impl Context for Flaky {}

impl HttpContext for Flaky {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        if SEEN.fetch_add(1, Ordering::Relaxed) % 3 == 2 {
            panic!("flaky: the third request");
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        self.set_http_response_header(&self.header.0, Some(&self.header.1));
        Action::Continue
    }
}
