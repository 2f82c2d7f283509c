//! Two connections spliced together, byte for byte, both ways: `tcp` listeners, and HTTP
//! tunnels (an accepted upgrade such as WebSocket, or `CONNECT`). Bytes are counted on both
//! sides; a splice ends when both directions are done, when nothing moved for the idle
//! timeout, or when the proxy drains.

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

/// How a splice ended.
#[derive(Debug)]
pub enum Ended {
    /// Both directions reached their end (or one failed: the error).
    Done(io::Result<(u64, u64)>),
    /// Nothing moved either way for the idle timeout.
    Idle,
    /// The proxy is draining.
    Drained,
}

/// Byte counters of one side: what was read from it and written to it.
#[derive(Debug, Clone)]
pub struct Side {
    pub read: Counter,
    pub written: Counter,
}

/// Copies `a` ↔ `b` until they are done, idle for `idle`, or `stop` turns true.
pub async fn splice<A, B>(
    a: A,
    a_counts: Side,
    b: B,
    b_counts: Side,
    idle: Option<Duration>,
    mut stop: Option<watch::Receiver<bool>>,
) -> Ended
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Rc::new(Cell::new(0u64));
    let mut a = Counted::new(a, a_counts, activity.clone());
    let mut b = Counted::new(b, b_counts, activity.clone());
    let copied = tokio::io::copy_bidirectional(&mut a, &mut b);
    let idle_over = async {
        match idle {
            Some(t) => idle_watch(&activity, t).await,
            None => std::future::pending().await,
        }
    };
    let drained = async {
        match stop.as_mut() {
            Some(rx) => {
                // A dropped sender (the worker went away) means stop too.
                let _ = rx.wait_for(|stopping| *stopping).await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = copied => Ended::Done(r),
        () = idle_over => Ended::Idle,
        () = drained => Ended::Drained,
    }
}

/// Returns once `activity` has not moved for `idle`.
async fn idle_watch(activity: &Cell<u64>, idle: Duration) {
    let step = (idle / 4).max(Duration::from_millis(10));
    let mut seen = activity.get();
    let mut quiet = Duration::ZERO;
    loop {
        tokio::time::sleep(step).await;
        let now = activity.get();
        if now == seen {
            quiet += step;
            if quiet >= idle {
                return;
            }
        } else {
            seen = now;
            quiet = Duration::ZERO;
        }
    }
}

/// A side of a splice, counting its bytes and its activity.
struct Counted<T> {
    inner: T,
    counts: Side,
    activity: Rc<Cell<u64>>,
}

impl<T> Counted<T> {
    fn new(inner: T, counts: Side, activity: Rc<Cell<u64>>) -> Self {
        Counted {
            inner,
            counts,
            activity,
        }
    }

    fn moved(&self) {
        self.activity.set(self.activity.get() + 1);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.counts.read.inc_by(n as u64);
            this.moved();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            this.counts.written.inc_by(n as u64);
            this.moved();
        }
        r
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn side() -> Side {
        Side {
            read: Counter::default(),
            written: Counter::default(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_splice_ends_and_a_draining_one_too() {
        let (a, _a_peer) = tokio::io::duplex(64);
        let (b, _b_peer) = tokio::io::duplex(64);
        let ended = splice(a, side(), b, side(), Some(Duration::from_secs(5)), None).await;
        assert!(matches!(ended, Ended::Idle), "{ended:?}");

        let (a, _a_peer) = tokio::io::duplex(64);
        let (b, _b_peer) = tokio::io::duplex(64);
        let (tx, rx) = watch::channel(false);
        let local = tokio::task::LocalSet::new();
        let ended = local
            .run_until(async move {
                let task = tokio::task::spawn_local(splice(a, side(), b, side(), None, Some(rx)));
                tokio::time::sleep(Duration::from_secs(60)).await;
                tx.send(true).expect("send");
                task.await.expect("task")
            })
            .await;
        assert!(matches!(ended, Ended::Drained), "{ended:?}");
    }

    #[tokio::test]
    async fn bytes_go_both_ways_and_are_counted() {
        let (a, mut a_peer) = tokio::io::duplex(64);
        let (b, mut b_peer) = tokio::io::duplex(64);
        let (sa, sb) = (side(), side());
        let local = tokio::task::LocalSet::new();
        let ended = local
            .run_until(async {
                let task =
                    tokio::task::spawn_local(splice(a, sa.clone(), b, sb.clone(), None, None));
                a_peer.write_all(b"ping").await.expect("write");
                let mut got = [0u8; 4];
                b_peer.read_exact(&mut got).await.expect("read");
                assert_eq!(&got, b"ping");
                b_peer.write_all(b"pong!").await.expect("write");
                let mut got = [0u8; 5];
                a_peer.read_exact(&mut got).await.expect("read");
                assert_eq!(&got, b"pong!");
                drop(a_peer);
                drop(b_peer);
                task.await.expect("task")
            })
            .await;
        assert!(matches!(ended, Ended::Done(_)), "{ended:?}");
        assert_eq!(sa.read.get(), 4);
        assert_eq!(sb.written.get(), 4);
        assert_eq!(sb.read.get(), 5);
        assert_eq!(sa.written.get(), 5);
    }
}
