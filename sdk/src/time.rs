//! Time: the host's clock, and [`sleep`] — a delay a callback can await without blocking the
//! worker (the SDK drives it with the root context's tick).

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use crate::host::host;

/// The host's wall clock.
pub fn now() -> SystemTime {
    host().now()
}

/// The host's wall clock in nanoseconds since the Unix epoch (as the host gives it: no
/// conversion through `SystemTime`, whose 64-bit divisions a guest pays for).
pub fn now_nanos() -> u128 {
    u128::from(host().now_nanos())
}

struct Timer {
    id: u64,
    root: u32,
    stream: u32,
    deadline: u128,
    waker: Option<Waker>,
}

#[derive(Default)]
struct Timers {
    next: u64,
    pending: Vec<Timer>,
    fired: Vec<u64>,
}

thread_local! {
    static TIMERS: RefCell<Timers> = RefCell::new(Timers::default());
}

pub(crate) fn reset() {
    TIMERS.with(|t| *t.borrow_mut() = Timers::default());
}

pub(crate) fn forget_stream(stream: u32) {
    TIMERS.with(|t| t.borrow_mut().pending.retain(|x| x.stream != stream));
}

/// The tick period a root needs for its pending sleeps: the time to the earliest one, between
/// 1 ms and 50 ms.
pub(crate) fn resolution(root: u32) -> Option<Duration> {
    let now = now_nanos();
    TIMERS.with(|t| {
        let earliest = t
            .borrow()
            .pending
            .iter()
            .filter(|x| x.root == root)
            .map(|x| x.deadline)
            .min()?;
        let left = Duration::from_nanos(earliest.saturating_sub(now).min(u64::MAX as u128) as u64);
        Some(left.clamp(Duration::from_millis(1), Duration::from_millis(50)))
    })
}

/// Wakes the sleeps of `root` that are due.
pub(crate) fn fire(root: u32, now: u128) {
    let wakers: Vec<Waker> = TIMERS.with(|t| {
        let mut t = t.borrow_mut();
        let mut due = Vec::new();
        let mut fired = Vec::new();
        t.pending.retain_mut(|x| {
            // Half a millisecond early is on time: ticks are not exact.
            if x.root == root && x.deadline <= now + 500_000 {
                fired.push(x.id);
                if let Some(w) = x.waker.take() {
                    due.push(w);
                }
                false
            } else {
                true
            }
        });
        t.fired.extend(fired);
        due
    });
    for w in wakers {
        w.wake();
    }
}

/// Waits `duration` (measured by the host's clock, to within a tick of a few milliseconds).
pub fn sleep(duration: Duration) -> Sleep {
    Sleep {
        deadline: now_nanos() + duration.as_nanos(),
        id: None,
    }
}

/// The future of [`sleep`].
#[derive(Debug)]
pub struct Sleep {
    deadline: u128,
    id: Option<u64>,
}

impl Future for Sleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(id) = self.id {
            let fired = TIMERS.with(|t| {
                let mut t = t.borrow_mut();
                if let Some(i) = t.fired.iter().position(|f| *f == id) {
                    t.fired.swap_remove(i);
                    return true;
                }
                if let Some(x) = t.pending.iter_mut().find(|x| x.id == id) {
                    x.waker = Some(cx.waker().clone());
                }
                false
            });
            return if fired {
                Poll::Ready(())
            } else {
                Poll::Pending
            };
        }
        if now_nanos() >= self.deadline {
            return Poll::Ready(());
        }
        let stream = crate::dispatch::current_stream();
        let Some(root) = crate::dispatch::root_of(stream) else {
            // Not inside a request: nothing can drive the timer.
            return Poll::Ready(());
        };
        let deadline = self.deadline;
        let id = TIMERS.with(|t| {
            let mut t = t.borrow_mut();
            t.next += 1;
            let id = t.next;
            t.pending.push(Timer {
                id,
                root,
                stream,
                deadline,
                waker: Some(cx.waker().clone()),
            });
            id
        });
        self.id = Some(id);
        crate::dispatch::update_tick(root);
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            // `try_with`: at thread exit the table may be gone already.
            let _ = TIMERS.try_with(|t| {
                if let Ok(mut t) = t.try_borrow_mut() {
                    t.pending.retain(|x| x.id != id);
                    t.fired.retain(|f| *f != id);
                }
            });
        }
    }
}
