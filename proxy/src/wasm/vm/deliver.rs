//! What a VM is told from outside its streams: timer ticks, queue items, and the results of
//! the callouts its contexts made.

use super::*;

impl Vm {
    pub fn tick(&self, root: u32) {
        if let Some(f) = &self.x.on_tick {
            let _ = self.call(root, Callback::Tick, false, |s| f.call(s, root as i32));
        }
    }

    pub fn queue_ready(&self, root: u32, queue: u32) {
        if let Some(f) = &self.x.on_queue_ready {
            let _ = self.call(root, Callback::QueueReady, false, |s| {
                f.call(s, (root as i32, queue as i32))
            });
        }
    }

    pub(super) fn with_callout(&self, data: Option<CalloutData>, status: Option<(u32, Bytes)>) {
        let mut store = self.store.borrow_mut();
        let state = store.data_mut();
        state.callout = data;
        if let Some(s) = status {
            state.status = s;
        }
    }

    /// Delivers an HTTP callout's response (`Err`: no response; the status says why).
    pub fn deliver_http_response(
        &self,
        root: u32,
        token: u32,
        result: Result<CalloutData, (u32, Bytes)>,
    ) {
        if self
            .store
            .borrow_mut()
            .data_mut()
            .callouts
            .remove(&token)
            .is_none()
        {
            return;
        }
        let Some(f) = &self.x.on_http_call_response else {
            return;
        };
        let (n_headers, body, n_trailers, data, status) = match result {
            Ok(d) => (
                d.headers.len(),
                d.body.len(),
                d.trailers.len(),
                Some(d),
                (0, Bytes::new()),
            ),
            Err(s) => (0, 0, 0, None, s),
        };
        // The call reads the callout data, which `call` clears afterwards.
        let _ = self.call(root, Callback::HttpCallResponse, false, |s| {
            let state = s.data_mut();
            state.callout = data;
            state.status = status;
            f.call(
                s,
                (
                    root as i32,
                    token as i32,
                    n_headers as i32,
                    body as i32,
                    n_trailers as i32,
                ),
            )
        });
    }

    /// Delivers gRPC initial (`initial`) or trailing metadata.
    pub fn deliver_grpc_metadata(&self, root: u32, token: u32, md: Headers, initial: bool) {
        if !self.store.borrow().data().callouts.contains_key(&token) {
            return;
        }
        let (f, phase) = if initial {
            (
                &self.x.on_grpc_initial_metadata,
                Callback::GrpcInitialMetadata,
            )
        } else {
            (
                &self.x.on_grpc_trailing_metadata,
                Callback::GrpcTrailingMetadata,
            )
        };
        let Some(f) = f else {
            return;
        };
        let n = md.len();
        let data = if initial {
            CalloutData {
                headers: md,
                ..Default::default()
            }
        } else {
            CalloutData {
                trailers: md,
                ..Default::default()
            }
        };
        let _ = self.call(root, phase, false, |s| {
            s.data_mut().callout = Some(data);
            f.call(s, (root as i32, token as i32, n as i32))
        });
    }

    /// Delivers a gRPC message; `last` for a unary call (which then ends).
    pub fn deliver_grpc_message(&self, root: u32, token: u32, msg: Bytes, last: bool) {
        if !self.store.borrow().data().callouts.contains_key(&token) {
            return;
        }
        if last {
            let mut store = self.store.borrow_mut();
            store.data_mut().callouts.remove(&token);
            store.data_mut().grpc.remove(&token);
        }
        let Some(f) = &self.x.on_grpc_receive else {
            return;
        };
        let len = msg.len();
        let _ = self.call(root, Callback::GrpcReceive, false, |s| {
            s.data_mut().callout = Some(CalloutData {
                body: msg,
                ..Default::default()
            });
            f.call(s, (root as i32, token as i32, len as i32))
        });
    }

    /// Delivers the end of a gRPC call or stream with its status.
    pub fn deliver_grpc_close(&self, root: u32, token: u32, code: u32, message: Bytes) {
        {
            let mut store = self.store.borrow_mut();
            if store.data_mut().callouts.remove(&token).is_none() {
                return;
            }
            store.data_mut().grpc.remove(&token);
        }
        let Some(f) = &self.x.on_grpc_close else {
            return;
        };
        self.with_callout(None, None);
        let _ = self.call(root, Callback::GrpcClose, false, |s| {
            s.data_mut().status = (code, message);
            f.call(s, (root as i32, token as i32, code as i32))
        });
    }
}
