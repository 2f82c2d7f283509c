//! Configuration: the VM configuration must not be `fail` (else `on_vm_start` refuses); the
//! plugin configuration is `name=value` pairs separated by `,`, each added to responses, and
//! refused (`on_configure` returns false) when it contains `reject`. Responses also carry
//! `x-vm-config`.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default)]
struct Root {
    vm_config: String,
    headers: Vec<(String, String)>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, _: usize) -> bool {
        self.vm_config = self
            .get_vm_configuration()
            .map(|c| String::from_utf8_lossy(&c).into_owned())
            .unwrap_or_default();
        self.vm_config != "fail"
    }

    fn on_configure(&mut self, _: usize) -> bool {
        let config = self
            .get_plugin_configuration()
            .map(|c| String::from_utf8_lossy(&c).into_owned())
            .unwrap_or_default();
        if config.contains("reject") {
            return false;
        }
        self.headers = config
            .split(',')
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        true
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        let mut headers = self.headers.clone();
        headers.push(("x-vm-config".into(), self.vm_config.clone()));
        Some(Box::new(Add { headers }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Add {
    headers: Vec<(String, String)>,
}

impl Context for Add {}

impl HttpContext for Add {
    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        for (k, v) in &self.headers {
            self.add_http_response_header(k, v);
        }
        Action::Continue
    }
}
