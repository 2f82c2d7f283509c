//! The balancer's own cost: nanoseconds per pick, for each policy, over 3 and 100 endpoints.
//! `cargo bench -p weft-proxy --bench balancer` (also run by `bench/balancer.sh`).

use std::hint::black_box;
use std::time::{Duration, Instant};

use weft_proxy::config::LbPolicy;
use weft_proxy::upstream::{
    EndpointGuard, EndpointSet, EndpointSpec, PeakEwma, PickArgs, hash64, now_nanos,
};

fn set(n: usize, policy: LbPolicy) -> EndpointSet {
    let specs: Vec<EndpointSpec> = (0..n)
        .map(|i| EndpointSpec {
            address: format!("10.0.{}.{}:8080", i / 250, i % 250 + 1)
                .parse()
                .expect("addr"),
            hostname: None,
            weight: 1,
        })
        .collect();
    EndpointSet::from_specs(&specs, None, policy, PeakEwma::DECAY)
}

fn ns_per_pick(s: &EndpointSet, policy: LbPolicy) -> f64 {
    let run = |iterations: u64| {
        let start = Instant::now();
        for i in 0..iterations {
            let hash = (policy == LbPolicy::RingHash).then(|| hash64(&i.to_le_bytes()));
            let e = s.pick(policy, &PickArgs { hash, exclude: &[] }, 50, now_nanos());
            // A pick is followed by a request on the endpoint: count it in flight and out.
            let guard = EndpointGuard::new(black_box(e).expect("endpoint"));
            guard.finish(200, true);
        }
        start.elapsed()
    };
    run(100_000);
    let mut best = Duration::MAX;
    for _ in 0..5 {
        best = best.min(run(1_000_000));
    }
    best.as_nanos() as f64 / 1_000_000.0
}

fn main() {
    println!(
        "{:<14} {:>12} {:>14}",
        "policy", "3 endpoints", "100 endpoints"
    );
    for policy in [
        LbPolicy::RoundRobin,
        LbPolicy::PeakEwma,
        LbPolicy::LeastRequest,
        LbPolicy::Random,
        LbPolicy::RingHash,
    ] {
        let small = ns_per_pick(&set(3, policy), policy);
        let large = ns_per_pick(&set(100, policy), policy);
        println!(
            "{:<14} {:>9.1} ns {:>11.1} ns",
            format!("{policy:?}"),
            small,
            large
        );
    }
    println!("(each pick includes counting the request in flight and out, as the proxy does)");
}
