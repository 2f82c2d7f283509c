//! A VM's stream contexts: created under a root, called for each part of a request and its
//! response (headers, body, trailers), then logged and deleted.

use super::*;

impl Vm {
    /// Creates a stream context under `root`: `proxy_on_context_create(ctx, root)`.
    pub fn create_stream(
        &self,
        root: u32,
        stream: SharedStream,
        index: usize,
    ) -> Result<u32, VmFailure> {
        let id = self.next_context();
        self.store.borrow_mut().data_mut().contexts.insert(
            id,
            Context::Stream(StreamContext {
                root,
                stream,
                index,
            }),
        );
        if let Some(e) = self.streams_of.borrow_mut().get_mut(&root) {
            e.0 += 1;
        }
        match &self.x.on_context_create {
            Some(f) => self
                .call(id, Callback::ContextCreate, false, |s| {
                    f.call(s, (id as i32, root as i32))
                })
                .map(|()| id),
            None => Ok(id),
        }
    }

    pub(super) fn headers(
        &self,
        f: &Option<HeadersFn>,
        ctx: u32,
        phase: Callback,
        n: usize,
        eos: bool,
    ) -> Result<Action, VmFailure> {
        let raw = match f {
            None => return Ok(Action::Continue),
            Some(HeadersFn::V2(f)) => self.call(ctx, phase, eos, |s| {
                f.call(s, (ctx as i32, n as i32, i32::from(eos)))
            })?,
            Some(HeadersFn::V1(f)) => {
                self.call(ctx, phase, eos, |s| f.call(s, (ctx as i32, n as i32)))?
            }
        };
        Ok(Action::from_headers(raw as u32))
    }

    pub(super) fn sized(
        &self,
        f: &Option<R3>,
        ctx: u32,
        phase: Callback,
        size: usize,
        eos: bool,
    ) -> Result<Action, VmFailure> {
        match f {
            None => Ok(Action::Continue),
            Some(f) => {
                let raw = self.call(ctx, phase, eos, |s| {
                    f.call(s, (ctx as i32, size as i32, i32::from(eos)))
                })?;
                Ok(Action::from_body(raw as u32))
            }
        }
    }

    pub(super) fn counted(
        &self,
        f: &Option<R2>,
        ctx: u32,
        phase: Callback,
        n: usize,
    ) -> Result<Action, VmFailure> {
        match f {
            None => Ok(Action::Continue),
            Some(f) => {
                let raw = self.call(ctx, phase, true, |s| f.call(s, (ctx as i32, n as i32)))?;
                Ok(Action::from_trailers(raw as u32))
            }
        }
    }

    pub fn on_request_headers(&self, ctx: u32, n: usize, eos: bool) -> Result<Action, VmFailure> {
        self.headers(
            &self.x.on_request_headers,
            ctx,
            Callback::RequestHeaders,
            n,
            eos,
        )
    }

    pub fn on_request_body(&self, ctx: u32, size: usize, eos: bool) -> Result<Action, VmFailure> {
        self.sized(
            &self.x.on_request_body,
            ctx,
            Callback::RequestBody,
            size,
            eos,
        )
    }

    pub fn on_request_trailers(&self, ctx: u32, n: usize) -> Result<Action, VmFailure> {
        self.counted(
            &self.x.on_request_trailers,
            ctx,
            Callback::RequestTrailers,
            n,
        )
    }

    pub fn on_response_headers(&self, ctx: u32, n: usize, eos: bool) -> Result<Action, VmFailure> {
        self.headers(
            &self.x.on_response_headers,
            ctx,
            Callback::ResponseHeaders,
            n,
            eos,
        )
    }

    pub fn on_response_body(&self, ctx: u32, size: usize, eos: bool) -> Result<Action, VmFailure> {
        self.sized(
            &self.x.on_response_body,
            ctx,
            Callback::ResponseBody,
            size,
            eos,
        )
    }

    pub fn on_response_trailers(&self, ctx: u32, n: usize) -> Result<Action, VmFailure> {
        self.counted(
            &self.x.on_response_trailers,
            ctx,
            Callback::ResponseTrailers,
            n,
        )
    }

    /// Records the golden metrics the stream's plugin asked weft for (`weft.golden_metrics`).
    pub fn record_golden(&self, ctx: u32) {
        let Ok(mut store) = self.store.try_borrow_mut() else {
            return;
        };
        let HostState {
            contexts,
            metrics,
            shared,
            ..
        } = store.data_mut();
        let Some(Context::Stream(s)) = contexts.get(&ctx) else {
            return;
        };
        let (root, stream) = (s.root, s.stream.clone());
        if let Some(Context::Root(r)) = contexts.get_mut(&root)
            && let Some(golden) = r.golden.as_mut()
        {
            golden.record(shared, metrics, &r.plugin.name, &stream.borrow());
        }
    }

    /// Whether the module asked not to be called for `cb` (`weft.skip_callbacks`).
    pub fn skips(&self, cb: Callback) -> bool {
        self.store
            .try_borrow()
            .is_ok_and(|s| s.data().skipped.contains(cb))
    }

    pub fn on_log(&self, ctx: u32) -> Result<(), VmFailure> {
        match &self.x.on_log {
            Some(f) if !self.skips(Callback::Log) => {
                self.call(ctx, Callback::Log, false, |s| f.call(s, ctx as i32))
            }
            _ => Ok(()),
        }
    }

    /// `proxy_on_done`, then `proxy_on_delete` — or, when on_done says "not yet", once the
    /// guest calls `proxy_done`.
    pub fn finish_context(&self, ctx: u32) {
        let ready = match &self.x.on_done {
            Some(f) if !self.skips(Callback::Done) => self
                .call(ctx, Callback::Done, false, |s| f.call(s, ctx as i32))
                .map(|r| r != 0),
            _ => Ok(true),
        };
        match ready {
            Ok(false) => {
                self.store.borrow_mut().data_mut().awaiting_done.insert(ctx);
            }
            _ => self.delete(ctx),
        }
    }

    pub(super) fn delete(&self, ctx: u32) {
        if let Some(f) = &self.x.on_delete {
            let _ = self.call(ctx, Callback::Delete, false, |s| f.call(s, ctx as i32));
        }
        let removed = self.store.borrow_mut().data_mut().contexts.remove(&ctx);
        if let Some(Context::Stream(s)) = removed {
            let retired_idle = {
                let mut streams = self.streams_of.borrow_mut();
                match streams.get_mut(&s.root) {
                    Some(e) => {
                        e.0 = e.0.saturating_sub(1);
                        e.1 && e.0 == 0
                    }
                    None => false,
                }
            };
            if retired_idle {
                self.finish_context(s.root);
            }
        } else if removed.is_some() {
            if let Some(t) = self.ticks.borrow_mut().remove(&ctx) {
                t.abort();
            }
            self.streams_of.borrow_mut().remove(&ctx);
        }
    }
}
