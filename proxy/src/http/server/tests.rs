use super::*;

fn dog(a: &Arc<ConnActivity>) -> Pin<Box<Watchdog>> {
    Box::pin(Watchdog::new(
        a.clone(),
        Some(Duration::from_secs(60)),
        Some(Duration::from_secs(5)),
    ))
}

async fn expiry_within(w: &mut Pin<Box<Watchdog>>, d: Duration) -> Option<Expired> {
    tokio::time::timeout(d, w.as_mut()).await.ok()
}

#[tokio::test(start_paused = true)]
async fn idle_connections_expire_after_the_idle_timeout() {
    let a = Arc::new(ConnActivity::new(true));
    let mut w = dog(&a);
    assert_eq!(expiry_within(&mut w, Duration::from_secs(59)).await, None);
    assert_eq!(
        expiry_within(&mut w, Duration::from_secs(20)).await,
        Some(Expired::Idle)
    );
}

#[tokio::test(start_paused = true)]
async fn busy_connections_do_not_expire() {
    let a = Arc::new(ConnActivity::new(true));
    let mut w = dog(&a);
    a.begin_request();
    assert_eq!(expiry_within(&mut w, Duration::from_secs(600)).await, None);
    a.end_request();
    // Idle only from now on: not before another full idle timeout.
    assert_eq!(expiry_within(&mut w, Duration::from_secs(45)).await, None);
    assert_eq!(
        expiry_within(&mut w, Duration::from_secs(40)).await,
        Some(Expired::Idle)
    );
}

#[tokio::test(start_paused = true)]
async fn a_late_head_expires_but_a_dispatched_one_does_not() {
    let a = Arc::new(ConnActivity::new(true));
    let mut w = dog(&a);
    a.on_read();
    assert_eq!(
        expiry_within(&mut w, Duration::from_secs(6)).await,
        Some(Expired::Head)
    );

    let b = Arc::new(ConnActivity::new(true));
    let mut w = dog(&b);
    b.on_read();
    assert_eq!(expiry_within(&mut w, Duration::from_secs(2)).await, None);
    b.begin_request();
    assert_eq!(expiry_within(&mut w, Duration::from_secs(30)).await, None);
    // HTTP/2: reading alone starts no head deadline; the frames say.
    let h2 = Arc::new(ConnActivity::new(false));
    h2.on_read();
    assert!(!h2.head_pending());
}

fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![
        (len >> 16) as u8,
        (len >> 8) as u8,
        len as u8,
        kind,
        flags,
        0,
        0,
        0,
        1,
    ];
    f.extend_from_slice(payload);
    f
}

#[test]
fn h2_preface_and_header_blocks_are_followed_across_reads() {
    let mut stream = H2_PREFACE.to_vec();
    stream.extend(frame(FRAME_SETTINGS, 0, &[0, 3, 0, 0, 0, 100]));
    let settings_end = stream.len();
    stream.extend(frame(FRAME_HEADERS, 0, &[0x82, 0x86]));
    let open_at = stream.len();
    stream.extend(frame(FRAME_CONTINUATION, 0, &[0x84]));
    stream.extend(frame(
        FRAME_CONTINUATION,
        FLAG_END_HEADERS,
        &[0x41, 0x01, b'x'],
    ));
    let closed_at = stream.len();
    stream.extend(frame(0x0, 0x1, b"body"));
    stream.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS | 0x1, &[0x82]));
    // Fed one byte at a time and in one piece, the state is the same at each point.
    for chunk in [1, 5, 1000] {
        let mut f = H2Frames::new();
        let mut states = Vec::new();
        for (i, piece) in stream.chunks(chunk).enumerate() {
            f.feed(piece);
            states.push(((i + 1) * chunk, f.head_pending()));
        }
        let at = |pos: usize| {
            states
                .iter()
                .find(|(end, _)| *end >= pos)
                .map(|(_, p)| *p)
                .expect("position")
        };
        if chunk == 1 {
            assert!(at(settings_end - 7), "preface not yet complete");
            assert!(!at(settings_end), "preface complete");
            assert!(at(open_at), "header block open");
            assert!(!at(closed_at), "header block closed");
        }
        assert!(!f.head_pending(), "chunks of {chunk}");
    }
}
