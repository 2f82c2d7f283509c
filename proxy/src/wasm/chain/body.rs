//! A body through the chain's filters: read from its source, passed through each filter's
//! body callback, held while a filter pauses, and released as the filters let it go.

use super::*;

/// A body on its way through the filters of one direction: frames from the source go in, the
/// filters' output comes out. A stream the filters stopped ends with an error (the peer sees a
/// reset); what stopped it is on the chain.
pub struct FilterBody<B> {
    source: Option<B>,
    chain: Rc<Chain>,
    dir: Direction,
    source_error: Option<BoxError>,
    stop_reported: bool,
}

impl<B> std::fmt::Debug for FilterBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilterBody")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

enum Pumped {
    /// Output is ready, or the flow ended or stopped.
    Ready,
    /// Nothing now; the waker is registered.
    Pending { on_source: bool },
}

impl<B> FilterBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pub fn new(chain: Rc<Chain>, dir: Direction, source: B) -> Self {
        FilterBody {
            source: Some(source),
            chain,
            dir,
            source_error: None,
            stop_reported: false,
        }
    }

    /// Feeds the filters until output is ready, the flow ended or stopped, or nothing can
    /// happen now.
    fn pump(&mut self, cx: &mut Context<'_>) -> Pumped {
        let d = self.dir;
        // Output made during this poll needs no wake-up.
        self.chain.stream.borrow_mut().wakers[side(d)] = None;
        loop {
            {
                let mut st = self.chain.state.borrow_mut();
                st.apply_actions();
                st.check_waiting_vm(d);
                let flow = &st.flows[side(d)];
                if !flow.out.is_empty()
                    || flow.ended
                    || flow.stop.is_some()
                    || self.source_error.is_some()
                {
                    return Pumped::Ready;
                }
                if flow.waiting() || self.source.is_none() {
                    st.stream.borrow_mut().wakers[side(d)] = Some(cx.waker().clone());
                    return Pumped::Pending { on_source: false };
                }
            }
            let Some(source) = self.source.as_mut() else {
                continue;
            };
            match Pin::new(&mut *source).poll_frame(cx) {
                Poll::Pending => {
                    // An action (a continue, a local response) wakes us as well.
                    self.chain.stream.borrow_mut().wakers[side(d)] = Some(cx.waker().clone());
                    return Pumped::Pending { on_source: true };
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let end = source.is_end_stream();
                    if end {
                        self.source = None;
                    }
                    self.chain.state.borrow_mut().feed(d, frame, end);
                }
                Poll::Ready(Some(Err(e))) => {
                    self.source = None;
                    self.source_error = Some(e.into());
                }
                Poll::Ready(None) => {
                    self.source = None;
                    self.chain.state.borrow_mut().feed_end(d);
                }
            }
        }
    }

    /// Runs the body through the filters until its first bytes came out (or it ended) when
    /// `wait_first`; otherwise until nothing more is there, unless a filter buffers or holds
    /// it. The headers go on after this.
    pub async fn prime(&mut self, wait_first: bool, wait: Option<Duration>) -> Result<(), Stop> {
        let d = self.dir;
        let chain = self.chain.clone();
        let primed = poll_fn(|cx| match self.pump(cx) {
            Pumped::Ready => Poll::Ready(()),
            Pumped::Pending { on_source } => {
                let st = chain.state.borrow();
                let flow = &st.flows[side(d)];
                if on_source && !wait_first && !flow.any_buffering() {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            }
        });
        let timed_out = bounded(primed, wait).await.is_none();
        if timed_out && self.chain.state.borrow().flows[side(d)].waiting() {
            return Err(self.chain.timed_out(d));
        }
        match self.chain.stopped(d) {
            Some(stop) => {
                self.stop_reported = true;
                Err(stop)
            }
            None => Ok(()),
        }
    }
}

impl<B> FilterBody<B> {
    /// The whole body, when all of it already came out of the filters as data (no trailers):
    /// it can then go on as a plain body.
    pub fn take_complete(&mut self) -> Option<Bytes> {
        let mut st = self.chain.state.borrow_mut();
        let flow = &mut st.flows[side(self.dir)];
        if !flow.ended
            || flow.stop.is_some()
            || self.source_error.is_some()
            || flow.out.iter().any(|f| !f.is_data())
        {
            return None;
        }
        let mut frames = std::mem::take(&mut flow.out);
        if frames.len() == 1 {
            return frames.pop_front().and_then(|f| f.into_data().ok());
        }
        let mut all = Vec::new();
        for f in frames {
            if let Ok(d) = f.into_data() {
                all.extend_from_slice(&d);
            }
        }
        Some(Bytes::from(all))
    }
}

impl<B> Body for FilterBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Pumped::Pending { .. } = this.pump(cx) {
            return Poll::Pending;
        }
        let d = this.dir;
        let mut st = this.chain.state.borrow_mut();
        let flow = &mut st.flows[side(d)];
        if let Some(frame) = flow.out.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(stop) = flow.stop {
            if this.stop_reported {
                return Poll::Ready(None);
            }
            this.stop_reported = true;
            return Poll::Ready(Some(Err(Box::new(stop))));
        }
        if let Some(e) = this.source_error.take() {
            return Poll::Ready(Some(Err(e)));
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        let st = self.chain.state.borrow();
        let flow = &st.flows[side(self.dir)];
        flow.ended && flow.out.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        let st = self.chain.state.borrow();
        let flow = &st.flows[side(self.dir)];
        if flow.ended {
            let n: usize = flow
                .out
                .iter()
                .filter_map(|f| f.data_ref().map(Bytes::len))
                .sum();
            SizeHint::with_exact(n as u64)
        } else {
            SizeHint::default()
        }
    }
}
