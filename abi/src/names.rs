//! The names of the ABI: host functions a module imports from `env`, and callbacks it exports.

/// Host functions (module `env`) of every ABI version.
pub mod host {
    pub const LOG: &str = "proxy_log";
    pub const GET_LOG_LEVEL: &str = "proxy_get_log_level";
    pub const GET_CURRENT_TIME_NANOSECONDS: &str = "proxy_get_current_time_nanoseconds";
    pub const SET_TICK_PERIOD_MILLISECONDS: &str = "proxy_set_tick_period_milliseconds";
    pub const SET_EFFECTIVE_CONTEXT: &str = "proxy_set_effective_context";
    pub const DONE: &str = "proxy_done";
    pub const GET_BUFFER_BYTES: &str = "proxy_get_buffer_bytes";
    pub const GET_BUFFER_STATUS: &str = "proxy_get_buffer_status";
    pub const SET_BUFFER_BYTES: &str = "proxy_set_buffer_bytes";
    pub const GET_HEADER_MAP_PAIRS: &str = "proxy_get_header_map_pairs";
    pub const SET_HEADER_MAP_PAIRS: &str = "proxy_set_header_map_pairs";
    pub const GET_HEADER_MAP_SIZE: &str = "proxy_get_header_map_size";
    pub const GET_HEADER_MAP_VALUE: &str = "proxy_get_header_map_value";
    pub const ADD_HEADER_MAP_VALUE: &str = "proxy_add_header_map_value";
    pub const REPLACE_HEADER_MAP_VALUE: &str = "proxy_replace_header_map_value";
    pub const REMOVE_HEADER_MAP_VALUE: &str = "proxy_remove_header_map_value";
    pub const CONTINUE_STREAM: &str = "proxy_continue_stream";
    pub const CLOSE_STREAM: &str = "proxy_close_stream";
    pub const SEND_LOCAL_RESPONSE: &str = "proxy_send_local_response";
    pub const GET_STATUS: &str = "proxy_get_status";
    pub const HTTP_CALL: &str = "proxy_http_call";
    pub const GRPC_CALL: &str = "proxy_grpc_call";
    pub const GRPC_STREAM: &str = "proxy_grpc_stream";
    pub const GRPC_SEND: &str = "proxy_grpc_send";
    pub const GRPC_CANCEL: &str = "proxy_grpc_cancel";
    pub const GRPC_CLOSE: &str = "proxy_grpc_close";
    pub const GET_SHARED_DATA: &str = "proxy_get_shared_data";
    pub const SET_SHARED_DATA: &str = "proxy_set_shared_data";
    pub const REGISTER_SHARED_QUEUE: &str = "proxy_register_shared_queue";
    pub const RESOLVE_SHARED_QUEUE: &str = "proxy_resolve_shared_queue";
    pub const ENQUEUE_SHARED_QUEUE: &str = "proxy_enqueue_shared_queue";
    pub const DEQUEUE_SHARED_QUEUE: &str = "proxy_dequeue_shared_queue";
    pub const DEFINE_METRIC: &str = "proxy_define_metric";
    pub const RECORD_METRIC: &str = "proxy_record_metric";
    pub const INCREMENT_METRIC: &str = "proxy_increment_metric";
    pub const GET_METRIC: &str = "proxy_get_metric";
    pub const GET_PROPERTY: &str = "proxy_get_property";
    pub const SET_PROPERTY: &str = "proxy_set_property";
    pub const CALL_FOREIGN_FUNCTION: &str = "proxy_call_foreign_function";
    /// v0.1.0 only.
    pub const GET_CONFIGURATION: &str = "proxy_get_configuration";
    /// v0.1.0 only.
    pub const CONTINUE_REQUEST: &str = "proxy_continue_request";
    /// v0.1.0 only.
    pub const CONTINUE_RESPONSE: &str = "proxy_continue_response";
    /// v0.1.0 only.
    pub const CLEAR_ROUTE_CACHE: &str = "proxy_clear_route_cache";
}

/// Callbacks a module may export.
pub mod callback {
    pub const INITIALIZE: &str = "_initialize";
    pub const START: &str = "_start";
    pub const MAIN: &str = "main";
    pub const MAIN_VOID: &str = "__main_void";
    pub const MEMORY: &str = "memory";
    pub const ON_MEMORY_ALLOCATE: &str = "proxy_on_memory_allocate";
    pub const MALLOC: &str = "malloc";
    pub const ON_CONTEXT_CREATE: &str = "proxy_on_context_create";
    pub const ON_VM_START: &str = "proxy_on_vm_start";
    pub const ON_CONFIGURE: &str = "proxy_on_configure";
    pub const ON_TICK: &str = "proxy_on_tick";
    pub const ON_QUEUE_READY: &str = "proxy_on_queue_ready";
    pub const ON_FOREIGN_FUNCTION: &str = "proxy_on_foreign_function";
    pub const ON_NEW_CONNECTION: &str = "proxy_on_new_connection";
    pub const ON_DOWNSTREAM_DATA: &str = "proxy_on_downstream_data";
    pub const ON_UPSTREAM_DATA: &str = "proxy_on_upstream_data";
    pub const ON_DOWNSTREAM_CONNECTION_CLOSE: &str = "proxy_on_downstream_connection_close";
    pub const ON_UPSTREAM_CONNECTION_CLOSE: &str = "proxy_on_upstream_connection_close";
    pub const ON_REQUEST_HEADERS: &str = "proxy_on_request_headers";
    pub const ON_REQUEST_BODY: &str = "proxy_on_request_body";
    pub const ON_REQUEST_TRAILERS: &str = "proxy_on_request_trailers";
    pub const ON_RESPONSE_HEADERS: &str = "proxy_on_response_headers";
    pub const ON_RESPONSE_BODY: &str = "proxy_on_response_body";
    pub const ON_RESPONSE_TRAILERS: &str = "proxy_on_response_trailers";
    pub const ON_HTTP_CALL_RESPONSE: &str = "proxy_on_http_call_response";
    pub const ON_GRPC_RECEIVE_INITIAL_METADATA: &str = "proxy_on_grpc_receive_initial_metadata";
    pub const ON_GRPC_RECEIVE: &str = "proxy_on_grpc_receive";
    pub const ON_GRPC_RECEIVE_TRAILING_METADATA: &str = "proxy_on_grpc_receive_trailing_metadata";
    pub const ON_GRPC_CLOSE: &str = "proxy_on_grpc_close";
    pub const ON_DONE: &str = "proxy_on_done";
    pub const ON_LOG: &str = "proxy_on_log";
    pub const ON_DELETE: &str = "proxy_on_delete";
}

/// The WASI preview1 module names a host provides functions under.
pub const WASI_MODULES: [&str; 2] = ["wasi_snapshot_preview1", "wasi_unstable"];

/// Foreign functions weft registers (`proxy_call_foreign_function`); any other proxy answers
/// `NOT_FOUND`, which a module must accept.
pub mod foreign {
    use super::callback;

    /// Arguments: export names from [`SKIPPABLE`], separated by commas. The module says its
    /// implementation of each does nothing and lets everything through (the callback returns
    /// `Continue`, `proxy_on_log` does nothing, `proxy_on_done` returns true), so the host may
    /// leave it uncalled from now on (while the filter holds nothing of the stream). Declared
    /// per VM. An unknown name is `BAD_ARGUMENT`, and nothing of the call is applied.
    pub const SKIP_CALLBACKS: &str = "weft.skip_callbacks";

    /// Arguments: `<max label sets, 1 to 800, decimal>\n<destination workload>` (empty: the
    /// cluster the request went to). The host records Istio's golden metrics for the calling
    /// plugin at the end of every request, as the telemetry filter would: `requests_total`
    /// (labels `source_workload`, `source_namespace`, `destination_workload`, `response_code`,
    /// `grpc_response_status`) and the `request_duration_milliseconds`, `request_bytes` and
    /// `response_bytes` histograms (`source_workload`, `destination_workload`,
    /// `response_code`), with at most that many label sets per worker (beyond, `_other`).
    /// Bad arguments are `BAD_ARGUMENT`, and nothing changes.
    pub const GOLDEN_METRICS: &str = "weft.golden_metrics";

    /// The callbacks [`SKIP_CALLBACKS`] may name.
    pub const SKIPPABLE: [&str; 8] = [
        callback::ON_REQUEST_HEADERS,
        callback::ON_REQUEST_BODY,
        callback::ON_REQUEST_TRAILERS,
        callback::ON_RESPONSE_HEADERS,
        callback::ON_RESPONSE_BODY,
        callback::ON_RESPONSE_TRAILERS,
        callback::ON_LOG,
        callback::ON_DONE,
    ];
}
