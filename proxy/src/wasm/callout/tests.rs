use super::*;

#[test]
fn grpc_frames_round_trip() {
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&frame(b"one"));
    buf.extend_from_slice(&frame(b""));
    buf.extend_from_slice(&frame(b"three")[..4]);
    let got = messages(&mut buf);
    assert_eq!(got, [Bytes::from_static(b"one"), Bytes::new()]);
    assert_eq!(buf.len(), 4, "an incomplete frame waits");
}

#[test]
fn an_oversized_message_is_seen_from_its_announced_length() {
    assert!(!oversized(&frame(&[0; 10]), 10));
    assert!(oversized(&frame(&[0; 11]), 10));
    // Announced as 4 GiB: refused before any of it arrives.
    assert!(oversized(&[0, 0xff, 0xff, 0xff, 0xff], 1 << 20));
    assert!(!oversized(&[0, 0], 10));
}

#[tokio::test]
async fn a_stream_refuses_to_queue_past_its_limit_until_the_peer_reads() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let task = tokio::spawn(std::future::pending::<()>());
    let mut h = GrpcHandle {
        abort: task.abort_handle(),
        sender: Some(tx),
        queued: queued.clone(),
        max_queued: 20,
    };
    // Each message is framed (5 bytes more): two of 5 bytes fit in 20, a third does not.
    h.send(Bytes::from_static(b"12345"), false).expect("room");
    h.send(Bytes::from_static(b"12345"), false).expect("room");
    assert_eq!(
        h.send(Bytes::from_static(b"1"), false),
        Err(SendError::Full)
    );
    // The connection takes one (what `CalloutBody::Channel` does): room again.
    let taken = rx.recv().await.expect("a message");
    queued.fetch_sub(taken.len(), Ordering::Relaxed);
    h.send(Bytes::from_static(b"1"), true).expect("room again");
    assert_eq!(
        h.send(Bytes::from_static(b"1"), false),
        Err(SendError::Closed),
        "half-closed"
    );
    task.abort();
}

#[test]
fn grpc_status_comes_from_trailers_then_headers() {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from_static("7"));
    t.insert("grpc-message", HeaderValue::from_static("no%20way"));
    assert_eq!(
        grpc_outcome(200, &HeaderMap::new(), &t),
        (7, Bytes::from_static(b"no way"))
    );
    assert_eq!(
        grpc_outcome(503, &HeaderMap::new(), &HeaderMap::new()).0,
        grpc_status::UNAVAILABLE
    );
}
