//! How a chain runs its filters: one guest call at a time, its outcome applied (continue,
//! pause, local response, close), and the stream's flow through the filters moved on.

use super::*;

impl ChainState {
    /// Runs `f`, recording a stop it ends with.
    pub(super) fn run(
        &mut self,
        d: Direction,
        f: impl FnOnce(&mut ChainState) -> Result<(), Stop>,
    ) {
        if self.flows[side(d)].stop.is_some() {
            return;
        }
        if let Err(stop) = f(self) {
            self.record(d, stop);
        }
    }

    pub(super) fn record(&mut self, d: Direction, stop: Stop) {
        let flow = &mut self.flows[side(d)];
        if flow.stop.is_none() {
            flow.stop = Some(stop);
        }
        if stop == Stop::Reset {
            for f in &mut self.flows {
                f.stop.get_or_insert(Stop::Reset);
            }
        }
        self.stream.borrow_mut().wake_all();
    }

    /// The VM and context of filter `i` for this stream (created when first reached); `None`
    /// when the filter is skipped.
    pub(super) fn ensure(&mut self, i: usize, d: Direction) -> Result<Option<(Rc<Vm>, u32)>, Stop> {
        match &self.slots[i].run {
            Run::Active { vm, ctx } => return Ok(Some((vm.clone(), *ctx))),
            Run::Skipped => return Ok(None),
            Run::Failed => return Err(Stop::Failed { filter: i, dir: d }),
            Run::Idle => {}
        }
        let spec = self.slots[i].spec.clone();
        let made = self.worker.instance(&spec).and_then(|(vm, root)| {
            let ctx = vm.create_stream(root, self.stream.clone(), i)?;
            Ok((vm, ctx))
        });
        match made {
            Ok((vm, ctx)) => {
                self.slots[i].run = Run::Active {
                    vm: vm.clone(),
                    ctx,
                };
                Ok(Some((vm, ctx)))
            }
            Err(e) => {
                self.fail(i, d, &e)?;
                Ok(None)
            }
        }
    }

    /// Filter `i` failed: skipped from now on when it fails open; the stream stops otherwise.
    pub(super) fn fail(
        &mut self,
        i: usize,
        d: Direction,
        why: &dyn std::fmt::Display,
    ) -> Result<(), Stop> {
        let spec = &self.slots[i].spec;
        if spec.fail_open() {
            tracing::warn!(filter = %spec.name, error = %why, "filter failed; the request goes on without it (fail: open)");
            self.slots[i].run = Run::Skipped;
            Ok(())
        } else {
            tracing::warn!(filter = %spec.name, error = %why, "filter failed; the request is answered 500 (fail: closed)");
            self.slots[i].run = Run::Failed;
            Err(Stop::Failed { filter: i, dir: d })
        }
    }

    /// Calls filter `i`'s callback; a skipped filter continues.
    pub(super) fn call(&mut self, i: usize, d: Direction, cb: StreamCall) -> Result<Action, Stop> {
        // One clock read each side of the filter's work (its context's creation included).
        let started = clock().raw();
        let Some((vm, ctx)) = self.ensure(i, d)? else {
            return Ok(Action::Continue);
        };
        if self.passes(i, cb.callback(d)) {
            // Not calling it is the same as calling it.
            return Ok(Action::Continue);
        }
        let (n_req, n_resp, n_req_t, n_resp_t, body) = {
            let s = self.stream.borrow();
            (
                s.request_headers.len(),
                s.response_headers.as_ref().map_or(0, Headers::len),
                s.request_trailers.as_ref().map_or(0, Headers::len),
                s.response_trailers.as_ref().map_or(0, Headers::len),
                s.body(d, i).len(),
            )
        };
        let result = match (d, cb) {
            (Direction::Request, StreamCall::Headers { eos }) => {
                vm.on_request_headers(ctx, n_req, eos)
            }
            (Direction::Request, StreamCall::Body { eos }) => vm.on_request_body(ctx, body, eos),
            (Direction::Request, StreamCall::Trailers) => vm.on_request_trailers(ctx, n_req_t),
            (Direction::Response, StreamCall::Headers { eos }) => {
                vm.on_response_headers(ctx, n_resp, eos)
            }
            (Direction::Response, StreamCall::Body { eos }) => vm.on_response_body(ctx, body, eos),
            (Direction::Response, StreamCall::Trailers) => vm.on_response_trailers(ctx, n_resp_t),
        };
        self.slots[i].ticks += clock().raw().saturating_sub(started);
        match result {
            Ok(a) => Ok(a),
            Err(e) => {
                self.fail(i, d, &e)?;
                Ok(Action::Continue)
            }
        }
    }

    /// Filter `i` need not be called for `cb`: its module said the callback does nothing and it
    /// holds nothing of the stream (else its SDK would answer for what it waits on), or it was
    /// skipped itself (failing open).
    pub(super) fn passes(&self, i: usize, cb: Callback) -> bool {
        match &self.slots[i].run {
            Run::Active { vm, .. } => vm.skips(cb) && !self.holds(i),
            Run::Skipped => true,
            Run::Idle | Run::Failed => false,
        }
    }

    /// Filter `i` holds part of the stream: paused headers, a buffered body or a held end, in
    /// either direction.
    pub(super) fn holds(&self, i: usize) -> bool {
        self.flows
            .iter()
            .any(|f| f.waiting_on() == Some(i) || f.pos_of(i).is_some_and(|p| f.is_buffering(p)))
    }

    /// Applies what filters asked for since the last time. A local response or a close stops
    /// the stream; a continue resumes the flow it is for (its own stops are recorded there).
    pub(super) fn apply_actions(&mut self) {
        loop {
            let next = self.stream.borrow_mut().actions.pop_front();
            let Some((i, action)) = next else {
                return;
            };
            match action {
                StreamAction::Continue(d) => self.resume(d, i),
                StreamAction::Close(_) => self.record(Direction::Request, Stop::Reset),
                StreamAction::LocalResponse(lr) => {
                    let d = if self.flows[1].started {
                        Direction::Response
                    } else {
                        Direction::Request
                    };
                    if d == Direction::Response && self.response_sent {
                        tracing::warn!(filter = %self.slots[i].spec.name, "a local response after the response started: the stream is reset");
                        self.record(d, Stop::Reset);
                    } else {
                        self.slots[i].local_5xx = lr.status >= 500;
                        self.local = Some((i, lr));
                        self.record(d, Stop::Local { filter: i, dir: d });
                    }
                }
            }
        }
    }

    /// After a guest call: applies its actions; `Err` when they stopped direction `d`.
    pub(super) fn after_call(&mut self, d: Direction) -> Result<(), Stop> {
        self.apply_actions();
        match self.flows[side(d)].stop {
            Some(s) => Err(s),
            None => Ok(()),
        }
    }

    pub(super) fn headers_from(&mut self, d: Direction, mut p: usize) -> Result<(), Stop> {
        let len = self.flows[side(d)].order.len();
        while p < len {
            let i = self.flows[side(d)].order.at(p);
            let eos = self.flows[side(d)].headers_eos;
            let action = self.call(i, d, StreamCall::Headers { eos })?;
            {
                let flow = &mut self.flows[side(d)];
                flow.headers_at = p;
                flow.headers_paused = action == Action::Pause;
            }
            self.after_call(d)?;
            if action == Action::Pause {
                // Still paused, or a continue from the same call already ran the rest.
                return Ok(());
            }
            p += 1;
        }
        let flow = &mut self.flows[side(d)];
        flow.headers_at = len;
        flow.headers_done = true;
        Ok(())
    }

    pub(super) fn body_of(&mut self, d: Direction, i: usize) -> Vec<u8> {
        std::mem::take(self.stream.borrow_mut().body_mut(d, i))
    }

    pub(super) fn add_body(&mut self, d: Direction, i: usize, mut bytes: Vec<u8>) {
        let mut s = self.stream.borrow_mut();
        let b = s.body_mut(d, i);
        if b.is_empty() {
            std::mem::swap(b, &mut bytes);
        } else {
            b.append(&mut bytes);
        }
    }

    pub(super) fn body_len(&self, d: Direction, i: usize) -> usize {
        self.stream.borrow().body(d, i).len()
    }

    /// Moves what the filter at position `p` holds on to the next position (or the tail).
    pub(super) fn pass_on(&mut self, d: Direction, p: usize) {
        let i = self.flows[side(d)].order.at(p);
        let bytes = self.body_of(d, i);
        if bytes.is_empty() {
            return;
        }
        match self.flows[side(d)].order.get(p + 1) {
            Some(next) => self.add_body(d, next, bytes),
            None => {
                let tail = &mut self.flows[side(d)].tail;
                if tail.is_empty() {
                    *tail = bytes;
                } else {
                    tail.extend_from_slice(&bytes);
                }
            }
        }
    }

    pub(super) fn trailers_exist(&self, d: Direction) -> bool {
        let s = self.stream.borrow();
        let t = match d {
            Direction::Request => &s.request_trailers,
            Direction::Response => &s.response_trailers,
        };
        t.as_ref().is_some_and(|t| !t.is_empty())
    }

    /// Body bytes (already with the filter at position `p`) go through the filters from `p`.
    pub(super) fn data_from(&mut self, d: Direction, mut p: usize, eos: bool) -> Result<(), Stop> {
        loop {
            let len = self.flows[side(d)].order.len();
            if p == len {
                self.emit_data(d, eos);
                return Ok(());
            }
            let i = self.flows[side(d)].order.at(p);
            let limit = self.slots[i].spec.plugin.body_buffer;
            if self.flows[side(d)].is_buffering(p) && self.body_len(d, i) > limit {
                return Err(self.too_large(i, d));
            }
            let had_trailers = self.flows[side(d)].trailers;
            let action = self.call(i, d, StreamCall::Body { eos })?;
            if action == Action::Pause {
                let flow = &mut self.flows[side(d)];
                if eos {
                    flow.held = Some((p, Held::End));
                } else {
                    flow.set_buffering(p, true);
                }
                if self.body_len(d, i) > limit {
                    return Err(self.too_large(i, d));
                }
                self.after_call(d)?;
                return Ok(());
            }
            self.flows[side(d)].set_buffering(p, false);
            self.after_call(d)?;
            self.pass_on(d, p);
            if eos && !had_trailers && self.trailers_exist(d) {
                // The filter added trailers at the end of the body: the data goes on without the
                // end, the trailers after it.
                self.flows[side(d)].trailers = true;
                self.data_from(d, p + 1, false)?;
                return self.trailers_from(d, p + 1);
            }
            p += 1;
        }
    }

    pub(super) fn too_large(&mut self, i: usize, d: Direction) -> Stop {
        tracing::warn!(filter = %self.slots[i].spec.name, limit = self.slots[i].spec.plugin.body_buffer, ?d, "a filter held more body than its buffer limit");
        Stop::TooLarge { filter: i, dir: d }
    }

    /// Trailers go through the filters from position `p`; each filter's held body goes on
    /// before them.
    pub(super) fn trailers_from(&mut self, d: Direction, mut p: usize) -> Result<(), Stop> {
        loop {
            let len = self.flows[side(d)].order.len();
            if p == len {
                self.emit_trailers(d);
                return Ok(());
            }
            let i = self.flows[side(d)].order.at(p);
            let action = self.call(i, d, StreamCall::Trailers)?;
            if action == Action::Pause {
                self.flows[side(d)].held = Some((p, Held::Trailers));
                self.after_call(d)?;
                return Ok(());
            }
            self.after_call(d)?;
            self.release_held_body(d, p)?;
            p += 1;
        }
    }

    /// Before trailers leave the filter at `p`, what it buffered goes on.
    pub(super) fn release_held_body(&mut self, d: Direction, p: usize) -> Result<(), Stop> {
        self.flows[side(d)].set_buffering(p, false);
        let i = self.flows[side(d)].order.at(p);
        if self.body_len(d, i) > 0 {
            self.pass_on(d, p);
            self.data_from(d, p + 1, false)?;
        }
        Ok(())
    }

    pub(super) fn emit_data(&mut self, d: Direction, eos: bool) {
        let flow = &mut self.flows[side(d)];
        if !flow.tail.is_empty() {
            let bytes = std::mem::take(&mut flow.tail);
            flow.out.push_back(Frame::data(Bytes::from(bytes)));
        }
        if eos {
            flow.ended = true;
        }
        self.wake_consumer(d);
    }

    pub(super) fn emit_trailers(&mut self, d: Direction) {
        self.emit_data(d, false);
        let map = {
            let s = self.stream.borrow();
            let t = match d {
                Direction::Request => &s.request_trailers,
                Direction::Response => &s.response_trailers,
            };
            t.as_ref().map(|t| t.map.clone()).unwrap_or_default()
        };
        let flow = &mut self.flows[side(d)];
        flow.out.push_back(Frame::trailers(map));
        flow.ended = true;
    }

    /// Output for direction `d` may have been produced from the other side's poll.
    pub(super) fn wake_consumer(&mut self, d: Direction) {
        if let Some(w) = self.stream.borrow_mut().wakers[side(d)].take() {
            w.wake();
        }
    }

    /// Filter `i` continued direction `d`: whatever it held goes on.
    pub(super) fn resume(&mut self, d: Direction, i: usize) {
        let flow = &self.flows[side(d)];
        if !flow.started || flow.stop.is_some() {
            return;
        }
        let Some(p) = flow.pos_of(i) else {
            return;
        };
        if flow.headers_paused && flow.headers_at == p {
            self.flows[side(d)].headers_paused = false;
            self.run(d, |st| st.headers_from(d, p + 1));
        } else if let Some((hp, held)) = flow.held
            && hp == p
        {
            self.flows[side(d)].held = None;
            self.run(d, |st| match held {
                Held::End => {
                    st.pass_on(d, p);
                    st.data_from(d, p + 1, true)
                }
                Held::Trailers => {
                    st.release_held_body(d, p)?;
                    st.trailers_from(d, p + 1)
                }
            });
        } else if flow.is_buffering(p) {
            self.flows[side(d)].set_buffering(p, false);
            self.run(d, |st| {
                st.pass_on(d, p);
                st.data_from(d, p + 1, false)
            });
        }
        self.wake_consumer(d);
    }

    /// A flow waiting on a filter whose VM failed meanwhile (say, in a callout's callback)
    /// gets the filter's failure policy now.
    pub(super) fn check_waiting_vm(&mut self, d: Direction) {
        let Some(i) = self.flows[side(d)].waiting_on() else {
            return;
        };
        let failed = match &self.slots[i].run {
            Run::Active { vm, .. } => vm.failed(),
            _ => false,
        };
        if !failed {
            return;
        }
        match self.fail(
            i,
            d,
            &"the filter's VM failed while the stream waited on it",
        ) {
            Err(stop) => self.record(d, stop),
            // Fails open: as if it had continued.
            Ok(()) => self.resume(d, i),
        }
    }

    /// No filter of direction `d` will see its body bytes: each one skips its body callback
    /// (or was skipped itself, failing open) and holds nothing, and nothing waits between
    /// them. Data then goes on as it came, which is what the filters would make of it.
    fn body_passes(&self, d: Direction) -> bool {
        let flow = &self.flows[side(d)];
        let cb = StreamCall::Body { eos: false }.callback(d);
        flow.tail.is_empty()
            && flow.held.is_none()
            && !flow.any_buffering()
            && flow
                .order
                .iter()
                .all(|i| self.passes(i, cb) && self.body_len(d, i) == 0)
    }

    /// Body input from the source.
    pub(super) fn feed(&mut self, d: Direction, frame: Frame<Bytes>, end: bool) {
        let first = self.flows[side(d)].order.get(0);
        match frame.into_data() {
            Ok(data) if self.flows[side(d)].stop.is_none() && self.body_passes(d) => {
                let flow = &mut self.flows[side(d)];
                flow.bytes_in += data.len() as u64;
                if !data.is_empty() {
                    flow.out.push_back(Frame::data(data));
                }
                if end {
                    flow.ended = true;
                }
                self.wake_consumer(d);
            }
            Ok(data) => {
                self.flows[side(d)].bytes_in += data.len() as u64;
                match first {
                    Some(f) => self.add_body(d, f, data.to_vec()),
                    None => self.flows[side(d)].tail.extend_from_slice(&data),
                }
                self.run(d, |st| st.data_from(d, 0, end));
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    {
                        let mut s = self.stream.borrow_mut();
                        let h = Some(Headers {
                            pseudo: Vec::new(),
                            map: t,
                        });
                        match d {
                            Direction::Request => s.request_trailers = h,
                            Direction::Response => s.response_trailers = h,
                        }
                    }
                    self.flows[side(d)].trailers = true;
                    self.run(d, |st| st.trailers_from(d, 0));
                }
            }
        }
    }

    pub(super) fn feed_end(&mut self, d: Direction) {
        if self.flows[side(d)].trailers {
            return;
        }
        self.run(d, |st| st.data_from(d, 0, true));
    }

    /// The end of the stream: `on_log` for every filter, then `on_done` and `on_delete`.
    pub(super) fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        {
            // What came into the filters, or (when no filter looks at a body, which then goes
            // around them) what the request and response stages counted.
            let mut s = self.stream.borrow_mut();
            let counted = s
                .info
                .request_body_counted
                .as_ref()
                .map_or(0, |n| n.load(std::sync::atomic::Ordering::Relaxed));
            s.info.request_body_bytes = self.flows[0].bytes_in.max(counted);
            s.info.response_body_bytes = self.flows[1].bytes_in.max(s.info.response_body_bytes);
        }
        // Clock reads are shared: each filter's share is from the previous read to the next.
        let mut last = clock().raw();
        for i in 0..self.slots.len() {
            // As Envoy: a filter the request never reached still logs it.
            if matches!(self.slots[i].run, Run::Idle)
                && self.ensure(i, Direction::Response).is_err()
            {
                continue;
            }
            if let Run::Active { vm, ctx } = &self.slots[i].run
                && !vm.failed()
            {
                let (vm, ctx) = (vm.clone(), *ctx);
                vm.record_golden(ctx);
                if let Err(e) = vm.on_log(ctx) {
                    let _ = self.fail(i, Direction::Response, &e);
                }
                let now = clock().raw();
                self.slots[i].ticks += now.saturating_sub(last);
                last = now;
            }
        }
        for slot in &mut self.slots {
            if let Run::Active { vm, ctx } = &slot.run {
                vm.finish_context(*ctx);
                let now = clock().raw();
                slot.ticks += now.saturating_sub(last);
                last = now;
            }
            if !matches!(slot.run, Run::Idle) {
                let time = Duration::from_nanos(clock().delta_as_nanos(0, slot.ticks));
                slot.spec.call_time.observe(time.as_secs_f64());
                slot.spec.figures.record(
                    time,
                    crate::wasm::figures::Outcome {
                        failed: matches!(slot.run, Run::Failed | Run::Skipped),
                        skipped: matches!(slot.run, Run::Skipped),
                        local_5xx: slot.local_5xx,
                    },
                );
            }
        }
    }
}
