use super::*;

const ANY: DataLimits = DataLimits {
    bytes: usize::MAX,
    keys: usize::MAX,
};
const QUEUE: QueueLimits = QueueLimits {
    items: 3,
    bytes: 10,
};

#[test]
fn shared_data_is_capped_per_vm_id_and_a_refused_write_changes_nothing() {
    let h = WasmShared::new(Arc::new(Metrics::new()));
    let vm: Arc<str> = Arc::from("vm");
    let small = DataLimits { bytes: 10, keys: 2 };
    h.set(&vm, b"a", Some(Bytes::from_static(b"1234")), 0, small)
        .expect("5 bytes");
    assert_eq!(
        h.set(&vm, b"b", Some(Bytes::from_static(b"123456")), 0, small),
        Err(Status::InternalFailure),
        "12 bytes in all"
    );
    assert!(h.get(&vm, b"b").is_none());
    h.set(&vm, b"b", Some(Bytes::from_static(b"1234")), 0, small)
        .expect("10 bytes");
    assert_eq!(
        h.set(&vm, b"c", Some(Bytes::new()), 0, small),
        Err(Status::InternalFailure),
        "a third key"
    );
    // Replacing with something smaller, or removing, always works; then there is room.
    h.set(&vm, b"a", Some(Bytes::from_static(b"1")), 0, small)
        .expect("smaller");
    h.set(&vm, b"b", None, 0, small).expect("remove");
    h.set(&vm, b"c", Some(Bytes::from_static(b"12")), 0, small)
        .expect("room again");
    // Another vm_id has its own room.
    h.set(
        &Arc::from("other"),
        b"x",
        Some(Bytes::from_static(b"123456789")),
        0,
        small,
    )
    .expect("other vm_id");
}

#[test]
fn queues_are_capped_in_items_bytes_and_number() {
    let h = WasmShared::new(Arc::new(Metrics::new()));
    let vm: Arc<str> = Arc::from("vm");
    let id = h.register_queue(&vm, b"q", None, QUEUE).expect("register");
    for item in [&b"1234"[..], b"1234"] {
        h.enqueue(id, Bytes::copy_from_slice(item)).expect("room");
    }
    assert_eq!(
        h.enqueue(id, Bytes::from_static(b"123")),
        Err(Status::InternalFailure),
        "11 bytes"
    );
    h.enqueue(id, Bytes::from_static(b"12")).expect("10 bytes");
    assert_eq!(
        h.enqueue(id, Bytes::new()),
        Err(Status::InternalFailure),
        "a fourth item"
    );
    h.dequeue(id).expect("item");
    h.enqueue(id, Bytes::from_static(b"1")).expect("room again");
    for i in 1..caps::MAX_QUEUES_PER_VM_ID {
        h.register_queue(&vm, format!("q{i}").as_bytes(), None, QUEUE)
            .expect("within the cap");
    }
    assert_eq!(
        h.register_queue(&vm, b"one too many", None, QUEUE),
        Err(Status::InternalFailure)
    );
    assert_eq!(h.register_queue(&vm, b"q", None, QUEUE), Ok(id), "existing");
}

#[test]
fn cas_semantics() {
    let h = WasmShared::new(Arc::new(Metrics::new()));
    let vm: Arc<str> = Arc::from("vm");
    assert!(h.get(&vm, b"k").is_none());
    h.set(&vm, b"k", Some(Bytes::from_static(b"1")), 12345, ANY)
        .expect("a missing key takes any cas");
    let (v, cas) = h.get(&vm, b"k").expect("set");
    assert_eq!(&v[..], b"1");
    assert_ne!(cas, 0);
    h.set(&vm, b"k", Some(Bytes::from_static(b"2")), cas, ANY)
        .expect("matching cas");
    assert_eq!(
        h.set(&vm, b"k", Some(Bytes::from_static(b"3")), cas, ANY),
        Err(Status::CasMismatch),
        "a stale cas loses"
    );
    h.set(&vm, b"k", None, 0, ANY).expect("remove");
    assert!(h.get(&vm, b"k").is_none());
    assert!(
        h.get(&Arc::from("other"), b"k").is_none(),
        "scoped by vm_id"
    );
}

#[test]
fn queues_notify_their_consumer() {
    let h = WasmShared::new(Arc::new(Metrics::new()));
    let vm: Arc<str> = Arc::from("vm");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let id = h
        .register_queue(&vm, b"q", Some((tx, 7, 1)), QUEUE)
        .expect("register");
    assert_eq!(h.resolve_queue(&vm, b"q"), Some(id));
    assert_eq!(h.resolve_queue(&vm, b"nope"), None);
    h.enqueue(id, Bytes::from_static(b"a")).expect("enqueue");
    assert_eq!(rx.try_recv().expect("notified").queue, id);
    assert_eq!(&h.dequeue(id).expect("item")[..], b"a");
    assert_eq!(h.dequeue(id), Err(Status::Empty));
    assert_eq!(h.dequeue(999), Err(Status::NotFound));
}

#[test]
fn guest_metrics_are_exported_with_labels_and_capped() {
    let m = Arc::new(Metrics::new());
    let h = WasmShared::new(m.clone());
    let f: Arc<str> = Arc::from("telemetry");
    let c = h.define_metric(&f, MetricType::Counter, "requests{code=\"200\"}");
    assert_eq!(
        h.define_metric(&f, MetricType::Counter, "requests{code=\"200\"}"),
        c
    );
    // As a VM records them: through its cache.
    let mut vm = MetricCache::default();
    vm.get(&h, c).expect("defined").record(2);
    vm.get(&h, c)
        .expect("defined")
        .increment(3)
        .expect("increment");
    assert_eq!(vm.get(&h, c).and_then(GuestMetric::value), Ok(5));
    assert_eq!(
        vm.get(&h, c).and_then(|m| m.increment(-1)),
        Err(Status::BadArgument)
    );
    // Another VM's cache records into the same metric.
    let mut other = MetricCache::default();
    other.get(&h, c).expect("defined").record(1);
    assert_eq!(vm.get(&h, c).and_then(GuestMetric::value), Ok(6));
    // Ids never defined are not found, and do not grow the cache.
    for id in [0, 100 << 2, 1 << 20, u32::MAX - 4] {
        assert!(matches!(vm.get(&h, id), Err(Status::NotFound)), "{id}");
    }
    assert_eq!(vm.len(), 1 + (c >> 2) as usize);
    // A counter named the Prometheus way (`_total`) is exported once suffixed, not twice.
    let t = h.define_metric(&f, MetricType::Counter, "errors_total");
    vm.get(&h, t)
        .expect("defined")
        .increment(1)
        .expect("increment");
    let hist = h.define_metric(&f, MetricType::Histogram, "latency_ms");
    vm.get(&h, hist).expect("defined").record(12);
    assert_eq!(
        vm.get(&h, hist).and_then(GuestMetric::value),
        Err(Status::BadArgument)
    );
    let text = m.encode();
    assert!(
        text.contains("\nweft_wasm_requests_total{filter=\"telemetry\",code=\"200\"} 6"),
        "{text}"
    );
    assert!(
        text.contains("\nweft_wasm_errors_total{filter=\"telemetry\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("\nweft_wasm_latency_ms_count{filter=\"telemetry\"} 1"),
        "{text}"
    );
    for i in 0..MAX_METRICS_PER_FILTER + 5 {
        h.define_metric(&f, MetricType::Counter, &format!("c{i}"));
    }
    // Past the cap nothing more is kept, however many names a guest makes up.
    let kept = h.guest.lock().expect("lock").ids.len();
    for i in 0..10_000 {
        let id = h.define_metric(&f, MetricType::Counter, &format!("more{i}"));
        let m = vm.get(&h, id).expect("the dropped metric");
        m.record(1);
        assert_eq!(m.value(), Ok(0));
    }
    assert_eq!(h.guest.lock().expect("lock").ids.len(), kept);
    assert!(
        m.encode()
            .contains("weft_wasm_metrics_dropped_total{filter=\"telemetry\"}")
    );
}
