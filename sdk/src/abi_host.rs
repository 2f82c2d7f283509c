//! The proxy as the host: the Proxy-Wasm v0.2.1 imports, wrapped.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use weft_abi::{
    BufferType, LogLevel, MapType, MetricType, Status, StreamType, deserialize_pairs,
    join_property_path, serialize_pairs,
};

use crate::host::{Host, Pairs};

#[link(wasm_import_module = "env")]
unsafe extern "C" {
    fn proxy_log(level: u32, data: *const u8, size: usize) -> u32;
    fn proxy_get_log_level(ret: *mut u32) -> u32;
    fn proxy_get_current_time_nanoseconds(ret: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_set_effective_context(context: u32) -> u32;
    fn proxy_get_buffer_bytes(
        kind: u32,
        start: usize,
        max: usize,
        ret_data: *mut *mut u8,
        ret_size: *mut usize,
    ) -> u32;
    fn proxy_set_buffer_bytes(
        kind: u32,
        start: usize,
        size: usize,
        data: *const u8,
        data_size: usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(kind: u32, ret_data: *mut *mut u8, ret_size: *mut usize) -> u32;
    fn proxy_set_header_map_pairs(kind: u32, data: *const u8, size: usize) -> u32;
    fn proxy_get_header_map_value(
        kind: u32,
        key: *const u8,
        key_size: usize,
        ret_data: *mut *mut u8,
        ret_size: *mut usize,
    ) -> u32;
    fn proxy_add_header_map_value(
        kind: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        kind: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(kind: u32, key: *const u8, key_size: usize) -> u32;
    fn proxy_continue_stream(stream: u32) -> u32;
    fn proxy_close_stream(stream: u32) -> u32;
    fn proxy_send_local_response(
        status: u32,
        details: *const u8,
        details_size: usize,
        body: *const u8,
        body_size: usize,
        headers: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_http_call(
        upstream: *const u8,
        upstream_size: usize,
        headers: *const u8,
        headers_size: usize,
        body: *const u8,
        body_size: usize,
        trailers: *const u8,
        trailers_size: usize,
        timeout_ms: u32,
        ret_token: *mut u32,
    ) -> u32;
    fn proxy_grpc_call(
        upstream: *const u8,
        upstream_size: usize,
        service: *const u8,
        service_size: usize,
        method: *const u8,
        method_size: usize,
        metadata: *const u8,
        metadata_size: usize,
        message: *const u8,
        message_size: usize,
        timeout_ms: u32,
        ret_token: *mut u32,
    ) -> u32;
    fn proxy_get_property(
        path: *const u8,
        path_size: usize,
        ret_data: *mut *mut u8,
        ret_size: *mut usize,
    ) -> u32;
    fn proxy_set_property(
        path: *const u8,
        path_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key: *const u8,
        key_size: usize,
        ret_data: *mut *mut u8,
        ret_size: *mut usize,
        ret_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_define_metric(kind: u32, name: *const u8, name_size: usize, ret_id: *mut u32) -> u32;
    fn proxy_increment_metric(id: u32, delta: i64) -> u32;
    fn proxy_record_metric(id: u32, value: u64) -> u32;
    fn proxy_get_metric(id: u32, ret_value: *mut u64) -> u32;
    fn proxy_call_foreign_function(
        name: *const u8,
        name_size: usize,
        args: *const u8,
        args_size: usize,
        ret_data: *mut *mut u8,
        ret_size: *mut usize,
    ) -> u32;
}

fn check(code: u32) -> Result<(), Status> {
    match Status::from_u32(code) {
        Some(Status::Ok) => Ok(()),
        Some(s) => Err(s),
        None => Err(Status::InternalFailure),
    }
}

/// Takes ownership of memory the host allocated through `proxy_on_memory_allocate`.
///
/// # Safety
/// `data` must come from [`crate::dispatch::allocate`] with exactly `size` bytes, or be null.
unsafe fn owned(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() || size == 0 {
        return Vec::new();
    }
    // SAFETY: the host filled a buffer it got from our allocator, of this size.
    unsafe { Vec::from_raw_parts(data, size, size) }
}

fn pairs_bytes(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    serialize_pairs(pairs)
}

/// The proxy.
pub struct AbiHost;

impl Host for AbiHost {
    fn log(&self, level: LogLevel, message: &str) {
        // SAFETY: a valid slice for the duration of the call.
        unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) };
    }

    fn log_level(&self) -> LogLevel {
        let mut v = 0u32;
        // SAFETY: `v` is a valid out-pointer.
        let ok = unsafe { proxy_get_log_level(&mut v) } == 0;
        if ok {
            LogLevel::from_u32(v).unwrap_or(LogLevel::Info)
        } else {
            LogLevel::Info
        }
    }

    fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.now_nanos())
    }

    fn now_nanos(&self) -> u64 {
        let mut ns = 0u64;
        // SAFETY: `ns` is a valid out-pointer.
        unsafe { proxy_get_current_time_nanoseconds(&mut ns) };
        ns
    }

    fn set_tick_period(&self, period: Duration) -> Result<(), Status> {
        let ms = u32::try_from(period.as_millis()).unwrap_or(u32::MAX);
        // SAFETY: no pointers.
        check(unsafe { proxy_set_tick_period_milliseconds(ms) })
    }

    fn set_effective_context(&self, context: u32) -> Result<(), Status> {
        // SAFETY: no pointers.
        check(unsafe { proxy_set_effective_context(context) })
    }

    fn get_buffer(&self, kind: BufferType, start: usize, max: usize) -> Result<Vec<u8>, Status> {
        let (mut data, mut size) = (std::ptr::null_mut(), 0usize);
        // SAFETY: valid out-pointers; the result is ours.
        let code = unsafe { proxy_get_buffer_bytes(kind as u32, start, max, &mut data, &mut size) };
        match check(code) {
            Ok(()) => Ok(unsafe { owned(data, size) }),
            Err(Status::NotFound) | Err(Status::Empty) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    fn set_buffer(
        &self,
        kind: BufferType,
        start: usize,
        size: usize,
        data: &[u8],
    ) -> Result<(), Status> {
        // SAFETY: a valid slice.
        check(unsafe {
            proxy_set_buffer_bytes(kind as u32, start, size, data.as_ptr(), data.len())
        })
    }

    fn get_map(&self, kind: MapType) -> Result<Pairs, Status> {
        let (mut data, mut size) = (std::ptr::null_mut(), 0usize);
        // SAFETY: valid out-pointers; the result is ours.
        check(unsafe { proxy_get_header_map_pairs(kind as u32, &mut data, &mut size) })?;
        let bytes = unsafe { owned(data, size) };
        if bytes.is_empty() {
            return Ok(Vec::new());
        }
        let pairs = deserialize_pairs(&bytes).map_err(|_| Status::SerializationFailure)?;
        Ok(pairs
            .into_iter()
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect())
    }

    fn set_map(&self, kind: MapType, pairs: &[(&[u8], &[u8])]) -> Result<(), Status> {
        let bytes = pairs_bytes(pairs);
        // SAFETY: a valid slice.
        check(unsafe { proxy_set_header_map_pairs(kind as u32, bytes.as_ptr(), bytes.len()) })
    }

    fn get_map_value(&self, kind: MapType, key: &[u8]) -> Result<Option<Vec<u8>>, Status> {
        let (mut data, mut size) = (std::ptr::null_mut(), 0usize);
        // SAFETY: valid slice and out-pointers; the result is ours.
        let code = unsafe {
            proxy_get_header_map_value(kind as u32, key.as_ptr(), key.len(), &mut data, &mut size)
        };
        match check(code) {
            Ok(()) => Ok(Some(unsafe { owned(data, size) })),
            Err(Status::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn add_map_value(&self, kind: MapType, key: &[u8], value: &[u8]) -> Result<(), Status> {
        // SAFETY: valid slices.
        check(unsafe {
            proxy_add_header_map_value(
                kind as u32,
                key.as_ptr(),
                key.len(),
                value.as_ptr(),
                value.len(),
            )
        })
    }

    fn replace_map_value(&self, kind: MapType, key: &[u8], value: &[u8]) -> Result<(), Status> {
        // SAFETY: valid slices.
        check(unsafe {
            proxy_replace_header_map_value(
                kind as u32,
                key.as_ptr(),
                key.len(),
                value.as_ptr(),
                value.len(),
            )
        })
    }

    fn remove_map_value(&self, kind: MapType, key: &[u8]) -> Result<(), Status> {
        // SAFETY: a valid slice.
        check(unsafe { proxy_remove_header_map_value(kind as u32, key.as_ptr(), key.len()) })
    }

    fn continue_stream(&self, stream: StreamType) -> Result<(), Status> {
        // SAFETY: no pointers.
        check(unsafe { proxy_continue_stream(stream as u32) })
    }

    fn close_stream(&self, stream: StreamType) -> Result<(), Status> {
        // SAFETY: no pointers.
        check(unsafe { proxy_close_stream(stream as u32) })
    }

    fn send_local_response(
        &self,
        status: u16,
        details: &str,
        body: &[u8],
        headers: &[(&[u8], &[u8])],
        grpc_status: Option<u32>,
    ) -> Result<(), Status> {
        let h = pairs_bytes(headers);
        let grpc = grpc_status.map_or(-1, |g| g as i32);
        // SAFETY: valid slices.
        check(unsafe {
            proxy_send_local_response(
                u32::from(status),
                details.as_ptr(),
                details.len(),
                body.as_ptr(),
                body.len(),
                h.as_ptr(),
                h.len(),
                grpc,
            )
        })
    }

    fn http_call(
        &self,
        cluster: &str,
        headers: &[(&[u8], &[u8])],
        body: &[u8],
        trailers: &[(&[u8], &[u8])],
        timeout: Duration,
    ) -> Result<u32, Status> {
        let h = pairs_bytes(headers);
        let t = pairs_bytes(trailers);
        let ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        let mut token = 0u32;
        // SAFETY: valid slices and out-pointer.
        check(unsafe {
            proxy_http_call(
                cluster.as_ptr(),
                cluster.len(),
                h.as_ptr(),
                h.len(),
                body.as_ptr(),
                body.len(),
                t.as_ptr(),
                t.len(),
                ms,
                &mut token,
            )
        })?;
        Ok(token)
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
        let m = pairs_bytes(metadata);
        let ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        let mut token = 0u32;
        // SAFETY: valid slices and out-pointer.
        check(unsafe {
            proxy_grpc_call(
                cluster.as_ptr(),
                cluster.len(),
                service.as_ptr(),
                service.len(),
                method.as_ptr(),
                method.len(),
                m.as_ptr(),
                m.len(),
                message.as_ptr(),
                message.len(),
                ms,
                &mut token,
            )
        })?;
        Ok(token)
    }

    fn get_property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, Status> {
        let p = join_property_path(path);
        let (mut data, mut size) = (std::ptr::null_mut(), 0usize);
        // SAFETY: valid slice and out-pointers; the result is ours.
        let code = unsafe { proxy_get_property(p.as_ptr(), p.len(), &mut data, &mut size) };
        match check(code) {
            Ok(()) => Ok(Some(unsafe { owned(data, size) })),
            Err(Status::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn set_property(&self, path: &[&str], value: &[u8]) -> Result<(), Status> {
        let p = join_property_path(path);
        // SAFETY: valid slices.
        check(unsafe { proxy_set_property(p.as_ptr(), p.len(), value.as_ptr(), value.len()) })
    }

    fn get_shared_data(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), Status> {
        let (mut data, mut size, mut cas) = (std::ptr::null_mut(), 0usize, 0u32);
        // SAFETY: valid slice and out-pointers; the result is ours.
        let code = unsafe {
            proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas)
        };
        match check(code) {
            Ok(()) => Ok((Some(unsafe { owned(data, size) }), cas)),
            Err(Status::NotFound) => Ok((None, 0)),
            Err(e) => Err(e),
        }
    }

    fn set_shared_data(&self, key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
        // SAFETY: valid slices.
        check(unsafe {
            proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
        })
    }

    fn define_metric(&self, kind: MetricType, name: &str) -> Result<u32, Status> {
        let mut id = 0u32;
        // SAFETY: valid slice and out-pointer.
        check(unsafe { proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) })?;
        Ok(id)
    }

    fn increment_metric(&self, id: u32, delta: i64) -> Result<(), Status> {
        // SAFETY: no pointers.
        check(unsafe { proxy_increment_metric(id, delta) })
    }

    fn record_metric(&self, id: u32, value: u64) -> Result<(), Status> {
        // SAFETY: no pointers.
        check(unsafe { proxy_record_metric(id, value) })
    }

    fn get_metric(&self, id: u32) -> Result<u64, Status> {
        let mut v = 0u64;
        // SAFETY: a valid out-pointer.
        check(unsafe { proxy_get_metric(id, &mut v) })?;
        Ok(v)
    }

    fn call_foreign_function(&self, name: &str, args: &[u8]) -> Result<Option<Vec<u8>>, Status> {
        let (mut data, mut size) = (std::ptr::null_mut(), 0usize);
        // SAFETY: valid slices and out-pointers; the result is ours.
        check(unsafe {
            proxy_call_foreign_function(
                name.as_ptr(),
                name.len(),
                args.as_ptr(),
                args.len(),
                &mut data,
                &mut size,
            )
        })?;
        Ok((!data.is_null()).then(|| unsafe { owned(data, size) }))
    }
}
