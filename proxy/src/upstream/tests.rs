use super::*;

#[test]
fn resolves_literals_and_names() {
    assert_eq!(
        resolve("127.0.0.1:80").expect("literal").0,
        vec!["127.0.0.1:80".parse::<SocketAddr>().expect("addr")]
    );
    let (addrs, name) = resolve("localhost:80").expect("localhost resolves");
    assert!(addrs.iter().all(|a| a.port() == 80));
    assert_eq!(name.as_deref(), Some("localhost:80"));
    assert!(resolve("nope").is_err());
    assert!(resolve("127.0.0.1:0").is_err());
    assert!(resolve("host:99999").is_err());
}

fn cluster(n: usize) -> Cluster {
    let eps: Vec<String> = (0..n).map(|i| format!("127.0.0.{}:80", i + 1)).collect();
    let c: config::Cluster = serde_json::from_value(serde_json::json!({
        "name": "c",
        "endpoints": eps,
        "outlier_detection": { "max_ejection_percent": 50, "base_ejection_time": "1s" },
    }))
    .expect("config");
    Cluster::build(
        0,
        &c,
        None,
        None,
        &Metrics::new(),
        Names::Resolve,
        &mut Vec::new(),
    )
}

#[test]
fn consecutive_failures_eject_within_the_max_percentage() {
    let c = cluster(4);
    let set = c.endpoints();
    let fail = |e: &Endpoint| {
        for _ in 0..5 {
            c.report(
                e,
                Outcome::Response {
                    status: 503,
                    retry_after: None,
                },
                Duration::from_millis(1),
            );
        }
    };
    fail(&set.endpoints[0]);
    assert!(set.endpoints[0].outlier.ejected.load(Relaxed));
    fail(&set.endpoints[1]);
    assert!(set.endpoints[1].outlier.ejected.load(Relaxed));
    // 50 % of 4: a third is not ejected.
    fail(&set.endpoints[2]);
    assert!(!set.endpoints[2].outlier.ejected.load(Relaxed));
    assert_eq!(set.available(), 2);
    // A success in between resets the count.
    let e = &set.endpoints[3];
    for _ in 0..4 {
        c.report(
            e,
            Outcome::Response {
                status: 500,
                retry_after: None,
            },
            Duration::ZERO,
        );
    }
    c.report(
        e,
        Outcome::Response {
            status: 200,
            retry_after: None,
        },
        Duration::ZERO,
    );
    assert_eq!(e.outlier.consecutive_5xx.load(Relaxed), 0);
}

#[test]
fn ejections_grow_and_end() {
    let c = cluster(2);
    let set = c.endpoints();
    let e = &set.endpoints[0];
    for _ in 0..3 {
        c.report(e, Outcome::ConnectFailure, Duration::ZERO);
    }
    assert!(e.outlier.ejected.load(Relaxed));
    let first = e.outlier.ejected_until.load(Relaxed);
    // Pretend the time is over.
    e.outlier.ejected_until.store(0, Relaxed);
    c.readmit();
    assert!(!e.outlier.ejected.load(Relaxed));
    assert_eq!(set.available(), 2);
    for _ in 0..3 {
        c.report(e, Outcome::ConnectFailure, Duration::ZERO);
    }
    let second = e.outlier.ejected_until.load(Relaxed);
    // Ejected twice: about two base times this time (measured from a later now).
    assert!(second > first + 500_000_000, "{first} {second}");
}

#[test]
fn new_endpoints_keep_the_state_of_the_old_ones() {
    let c = cluster(2);
    let kept = c.endpoints().endpoints[0].clone();
    kept.stats.requests_total.store(7, Relaxed);
    let specs = vec![
        EndpointSpec {
            address: kept.address,
            hostname: None,
            weight: 1,
        },
        EndpointSpec {
            address: "127.0.0.9:80".parse().expect("addr"),
            hostname: None,
            weight: 1,
        },
    ];
    c.set_endpoints(&specs);
    let now = c.endpoints();
    assert!(Arc::ptr_eq(&now.endpoints[0], &kept));
    assert_eq!(now.endpoints.len(), 2);
}
