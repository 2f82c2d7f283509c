//! The host, as the SDK sees it: every Proxy-Wasm host function with owned Rust types and
//! `Result`s. In a Wasm build it is the proxy ([`AbiHost`]); in native tests it is
//! [`crate::testing::TestHost`].

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use weft_abi::{BufferType, LogLevel, MapType, MetricType, Status, StreamType};

/// Header-like pairs as the ABI moves them.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Every host function the SDK uses.
#[allow(clippy::too_many_arguments, unused_variables)]
pub trait Host {
    fn log(&self, level: LogLevel, message: &str) {
        let _ = (level, message);
    }
    fn log_level(&self) -> LogLevel {
        LogLevel::Info
    }
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
    /// [`Host::now`] in nanoseconds since the Unix epoch (as the ABI gives it).
    fn now_nanos(&self) -> u64 {
        self.now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }
    fn set_tick_period(&self, period: Duration) -> Result<(), Status> {
        Err(Status::Unimplemented)
    }
    fn set_effective_context(&self, context: u32) -> Result<(), Status> {
        Err(Status::Unimplemented)
    }
    fn get_buffer(&self, kind: BufferType, start: usize, max: usize) -> Result<Vec<u8>, Status> {
        Err(Status::Unimplemented)
    }
    fn set_buffer(
        &self,
        kind: BufferType,
        start: usize,
        size: usize,
        data: &[u8],
    ) -> Result<(), Status> {
        Err(Status::Unimplemented)
    }
    fn get_map(&self, kind: MapType) -> Result<Pairs, Status> {
        Err(Status::Unimplemented)
    }
    fn set_map(&self, kind: MapType, pairs: &[(&[u8], &[u8])]) -> Result<(), Status> {
        Err(Status::Unimplemented)
    }
    fn get_map_value(&self, kind: MapType, key: &[u8]) -> Result<Option<Vec<u8>>, Status> {
        Err(Status::Unimplemented)
    }
    fn add_map_value(&self, kind: MapType, key: &[u8], value: &[u8]) -> Result<(), Status> {
        Err(Status::Unimplemented)
    }
    fn replace_map_value(&self, kind: MapType, key: &[u8], value: &[u8]) -> Result<(), Status> {
        Err(Status::Unimplemented)
    }
    fn remove_map_value(&self, kind: MapType, key: &[u8]) -> Result<(), Status> {
        Err(Status::Unimplemented)
    }
    fn continue_stream(&self, stream: StreamType) -> Result<(), Status> {
        Err(Status::Unimplemented)
    }
    fn close_stream(&self, stream: StreamType) -> Result<(), Status> {
        Err(Status::Unimplemented)
    }
    fn send_local_response(
        &self,
        status: u16,
        details: &str,
        body: &[u8],
        headers: &[(&[u8], &[u8])],
        grpc_status: Option<u32>,
    ) -> Result<(), Status> {
        Err(Status::Unimplemented)
    }
    fn http_call(
        &self,
        cluster: &str,
        headers: &[(&[u8], &[u8])],
        body: &[u8],
        trailers: &[(&[u8], &[u8])],
        timeout: Duration,
    ) -> Result<u32, Status> {
        Err(Status::Unimplemented)
    }
    fn grpc_call(
        &self,
        cluster: &str,
        service: &str,
        method: &str,
        metadata: &[(&[u8], &[u8])],
        message: &[u8],
        timeout: Duration,
    ) -> Result<u32, Status> {
        Err(Status::Unimplemented)
    }
    fn get_property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, Status> {
        Err(Status::Unimplemented)
    }
    fn set_property(&self, path: &[&str], value: &[u8]) -> Result<(), Status> {
        Err(Status::Unimplemented)
    }
    fn get_shared_data(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), Status> {
        Err(Status::Unimplemented)
    }
    fn set_shared_data(&self, key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
        Err(Status::Unimplemented)
    }
    fn define_metric(&self, kind: MetricType, name: &str) -> Result<u32, Status> {
        Err(Status::Unimplemented)
    }
    fn increment_metric(&self, id: u32, delta: i64) -> Result<(), Status> {
        Err(Status::Unimplemented)
    }
    fn record_metric(&self, id: u32, value: u64) -> Result<(), Status> {
        Err(Status::Unimplemented)
    }
    fn get_metric(&self, id: u32) -> Result<u64, Status> {
        Err(Status::Unimplemented)
    }
    /// `proxy_call_foreign_function`: what the function returned (`None`: nothing).
    fn call_foreign_function(&self, name: &str, args: &[u8]) -> Result<Option<Vec<u8>>, Status> {
        Err(Status::NotFound)
    }
}

thread_local! {
    static HOST: RefCell<Option<Rc<dyn Host>>> = const { RefCell::new(None) };
}

/// The host of this thread: the proxy in a Wasm build, the installed test host natively.
pub fn host() -> Rc<dyn Host> {
    HOST.with(|h| {
        if let Some(h) = &*h.borrow() {
            return h.clone();
        }
        let default = default_host();
        *h.borrow_mut() = Some(default.clone());
        default
    })
}

/// Replaces this thread's host (the test host does this).
pub fn install(host: Rc<dyn Host>) {
    HOST.with(|h| *h.borrow_mut() = Some(host));
}

#[cfg(target_family = "wasm")]
fn default_host() -> Rc<dyn Host> {
    Rc::new(crate::abi_host::AbiHost)
}

#[cfg(not(target_family = "wasm"))]
fn default_host() -> Rc<dyn Host> {
    Rc::new(Missing)
}

/// Natively, before a test host is installed: logs go to standard error, every other call
/// fails with `Unimplemented`.
#[cfg(not(target_family = "wasm"))]
struct Missing;

#[cfg(not(target_family = "wasm"))]
impl Host for Missing {
    fn log(&self, level: LogLevel, message: &str) {
        eprintln!("[weft-sdk {level:?}] {message}");
    }
}
