//! A shared queue: the root context registers `events` and, on `on_queue_ready`, dequeues every
//! item, counting them and keeping the last in shared data (`dequeued`, `last`); each request
//! enqueues its path. A response reports both in `x-dequeued` and `x-last`.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { queue: 0 }) });
}}

struct Root {
    queue: u32,
}

impl Context for Root {}

fn count(ctx: &dyn Context, key: &str) -> u64 {
    ctx.get_shared_data(key)
        .0
        .and_then(|v| String::from_utf8(v).ok()?.parse().ok())
        .unwrap_or(0)
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _: usize) -> bool {
        self.queue = self.register_shared_queue("events");
        true
    }

    fn on_queue_ready(&mut self, queue: u32) {
        while let Ok(Some(item)) = self.dequeue_shared_queue(queue) {
            let n = count(self, "dequeued") + 1;
            let _ = self.set_shared_data("dequeued", Some(n.to_string().as_bytes()), None);
            let _ = self.set_shared_data("last", Some(&item), None);
        }
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Producer))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Producer;

impl Context for Producer {}

impl HttpContext for Producer {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        if let Some(q) = self.resolve_shared_queue("queue", "events") {
            let _ = self.enqueue_shared_queue(q, Some(path.as_bytes()));
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        let n = count(self, "dequeued");
        self.set_http_response_header("x-dequeued", Some(&n.to_string()));
        let last = self
            .get_shared_data("last")
            .0
            .and_then(|v| String::from_utf8(v).ok())
            .unwrap_or_default();
        self.set_http_response_header("x-last", Some(&last));
        Action::Continue
    }
}
