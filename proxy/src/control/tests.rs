use super::*;

#[test]
fn backoff_is_full_jitter_under_a_doubling_ceiling_and_a_cap() {
    let mut b = Backoff::default();
    for attempt in 0..40u32 {
        let ceiling = Backoff::BASE
            .saturating_mul(1 << attempt.min(16))
            .min(Backoff::CAP);
        let d = b.next_wait();
        assert!(d <= ceiling, "attempt {attempt}: {d:?} > {ceiling:?}");
    }
    // Past the cap every wait stays under it, and they differ (jitter).
    let waits: std::collections::BTreeSet<Duration> = (0..50).map(|_| b.next_wait()).collect();
    assert!(waits.iter().all(|d| *d <= Backoff::CAP));
    assert!(waits.len() > 10, "{waits:?}");
}

#[test]
fn replicas_are_taken_in_turn() {
    let o = ControlOptions {
        urls: vec![
            "http://a:1".into(),
            "http://b:1".into(),
            "http://c:1".into(),
        ],
        current: Arc::new(std::sync::atomic::AtomicUsize::new(2)),
        node_id: "n".into(),
        labels: BTreeMap::new(),
        token: None,
        state_dir: "/nonexistent".into(),
        insecure: true,
        join_token: None,
        identity: None,
        module_trust: Vec::new(),
    };
    assert_eq!(o.url(), "http://c:1");
    o.next_url();
    assert_eq!(o.url(), "http://a:1");
    o.next_url();
    o.next_url();
    assert_eq!(o.url(), "http://c:1");
}
