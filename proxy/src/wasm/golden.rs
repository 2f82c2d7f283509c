//! Golden metrics a filter asks weft to record for it (`weft.golden_metrics`): Istio's request
//! count, duration and sizes, labelled with the source workload and namespace (from the
//! client's mTLS identity), the destination workload, the response code and gRPC status. They
//! are the series the telemetry filter records itself on another proxy, recorded here at the
//! end of each request without a call into the guest (and its eight property reads).

use std::collections::HashMap;
use std::sync::Arc;

use weft_abi::{MetricType, workload_of};

use super::host::properties;
use super::shared::{MetricCache, WasmShared};
use super::state::StreamData;
use crate::text;

/// Most label sets a filter may ask for (per metric and worker).
pub const MAX_LABEL_SETS: usize = 800;

/// What the filter asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoldenSpec {
    /// The `destination_workload` label; `None`: the cluster the request went to.
    pub destination: Option<String>,
    /// Distinct label sets recorded per worker; beyond, the labels read `_other`.
    pub max_label_sets: usize,
}

impl GoldenSpec {
    /// `<max label sets, decimal>\n<destination workload, or nothing for the cluster>`.
    pub fn parse(args: &[u8]) -> Option<GoldenSpec> {
        let at = args.iter().position(|&b| b == b'\n')?;
        let (max, destination) = (&args[..at], &args[at + 1..]);
        if max.is_empty() || max.len() > 3 || !max.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let max_label_sets: usize = std::str::from_utf8(max).ok()?.parse().ok()?;
        if !(1..=MAX_LABEL_SETS).contains(&max_label_sets) {
            return None;
        }
        let destination = std::str::from_utf8(destination).ok()?;
        if destination.len() > 256 || destination.chars().any(char::is_control) {
            return None;
        }
        Some(GoldenSpec {
            destination: (!destination.is_empty()).then(|| destination.to_owned()),
            max_label_sets,
        })
    }
}

/// The metric ids of one label set: requests, duration, request bytes, response bytes.
type Ids = [u32; 4];

/// One filter's golden metrics on one VM (so one worker).
#[derive(Debug)]
pub struct Golden {
    spec: GoldenSpec,
    sets: LabelSets,
}

/// The label sets seen, with their metrics.
#[derive(Debug, Default)]
struct LabelSets {
    /// By their key (each value after its length, so no two sets share one).
    ids: HashMap<Vec<u8>, Ids, foldhash::fast::RandomState>,
    other: Option<Ids>,
    /// The key being looked up (one buffer, reused).
    key: Vec<u8>,
}

/// A label value as the SDK writes it into a metric name: the characters of the name's own
/// syntax left out.
fn clean(v: &str) -> std::borrow::Cow<'_, str> {
    if v.contains(['"', ',', '{', '}']) {
        v.chars()
            .filter(|c| !matches!(c, '"' | ',' | '{' | '}'))
            .collect::<String>()
            .into()
    } else {
        v.into()
    }
}

impl Golden {
    pub fn new(spec: GoldenSpec) -> Golden {
        Golden {
            spec,
            sets: LabelSets::default(),
        }
    }

    pub fn spec(&self) -> &GoldenSpec {
        &self.spec
    }

    /// Records the request that just ended.
    pub fn record(
        &mut self,
        shared: &WasmShared,
        cache: &mut MetricCache,
        filter: &Arc<str>,
        s: &StreamData,
    ) {
        let (mut code_buf, mut grpc_buf) = ([0; 20], [0; 20]);
        let grpc_negative: String;
        let code = text::u64_text(u64::from(s.info.response_code.unwrap_or(0)), &mut code_buf);
        // An int64 as gRPC's is; none when the response is not gRPC.
        let grpc = match properties::grpc_status(s) {
            Some(g) if g >= 0 => text::u64_text(g as u64, &mut grpc_buf),
            Some(g) => {
                grpc_negative = g.to_string();
                grpc_negative.as_str()
            }
            None => "",
        };
        let (workload, namespace) = workload_of(properties::peer_identity(s));
        let cluster = properties::cluster(s);
        let destination = match (&self.spec.destination, cluster) {
            (Some(d), _) => d.as_str(),
            (None, Some(c)) => c,
            (None, None) => "unknown",
        };
        let duration_ms = s
            .info
            .duration
            .or_else(|| s.info.started.map(|t| t.elapsed()));
        let duration_ms = duration_ms.map_or(0, |d| (d.as_secs_f64() * 1000.0).round() as u64);
        let labels = [workload, namespace, destination, code, grpc];
        let ids = self
            .sets
            .ids(self.spec.max_label_sets, shared, filter, labels);
        let values = [
            1,
            duration_ms,
            properties::request_total_size(s),
            properties::response_total_size(s),
        ];
        for (id, v) in ids.into_iter().zip(values) {
            if let Ok(m) = cache.get(shared, id) {
                m.record(v);
            }
        }
    }
}

impl LabelSets {
    /// The ids of a label set (source workload, source namespace, destination, code, gRPC
    /// status), defined on first use; `_other` once `max` sets are there.
    fn ids(
        &mut self,
        max: usize,
        shared: &WasmShared,
        filter: &Arc<str>,
        labels: [&str; 5],
    ) -> Ids {
        self.key.clear();
        for l in labels {
            crate::text::push_u64(&mut self.key, l.len() as u64);
            self.key.push(b':');
            self.key.extend_from_slice(l.as_bytes());
        }
        if let Some(ids) = self.ids.get(self.key.as_slice()) {
            return *ids;
        }
        if self.ids.len() >= max {
            return *self
                .other
                .get_or_insert_with(|| define(shared, filter, ["_other"; 5]));
        }
        let ids = define(shared, filter, labels);
        self.ids.insert(self.key.clone(), ids);
        ids
    }
}

/// Defines the four metrics of a label set, named as the SDK names them.
fn define(shared: &WasmShared, filter: &Arc<str>, l: [&str; 5]) -> Ids {
    let [sw, sn, dw, code, grpc] = l.map(clean);
    let requests = format!(
        "requests_total{{source_workload=\"{sw}\",source_namespace=\"{sn}\",destination_workload=\"{dw}\",response_code=\"{code}\",grpc_response_status=\"{grpc}\"}}"
    );
    let hist = |name: &str| {
        format!(
            "{name}{{source_workload=\"{sw}\",destination_workload=\"{dw}\",response_code=\"{code}\"}}"
        )
    };
    [
        shared.define_metric(filter, MetricType::Counter, &requests),
        shared.define_metric(
            filter,
            MetricType::Histogram,
            &hist("request_duration_milliseconds"),
        ),
        shared.define_metric(filter, MetricType::Histogram, &hist("request_bytes")),
        shared.define_metric(filter, MetricType::Histogram, &hist("response_bytes")),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    #[test]
    fn a_request_is_parsed_strictly() {
        let ok = GoldenSpec::parse(b"200\n").expect("no destination");
        assert_eq!((ok.max_label_sets, ok.destination), (200, None));
        let ok = GoldenSpec::parse(b"1\norders\"x").expect("a destination");
        assert_eq!(ok.destination.as_deref(), Some("orders\"x"));
        assert_eq!(
            GoldenSpec::parse(b"800\n").map(|s| s.max_label_sets),
            Some(800)
        );
        for bad in [
            &b""[..],
            b"200",
            b"\norders",
            b"0\n",
            b"801\n",
            b"1000\n",
            b"+20\n",
            b"-1\n",
            b" 20\n",
            b"20 \n",
            b"20\nor\nders",
            b"20\nor\x00ders",
            b"20\n\xff",
        ] {
            assert_eq!(
                GoldenSpec::parse(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!("20\n{}", "a".repeat(257));
        assert_eq!(GoldenSpec::parse(long.as_bytes()), None);
    }

    /// Sets are told apart whatever their values hold; past the cap they share `_other`, and
    /// the names are the SDK's, with its syntax left out of values.
    #[test]
    fn label_sets_are_keyed_exactly_and_capped() {
        let m = Arc::new(Metrics::new());
        let shared = WasmShared::new(m.clone());
        let filter: Arc<str> = Arc::from("t");
        let mut sets = LabelSets::default();
        let a = sets.ids(2, &shared, &filter, ["a:1", "b", "", "200", ""]);
        let b = sets.ids(2, &shared, &filter, ["a", "1:b", "", "200", ""]);
        assert_ne!(a, b);
        assert_eq!(
            sets.ids(2, &shared, &filter, ["a:1", "b", "", "200", ""]),
            a
        );
        let o = sets.ids(2, &shared, &filter, ["x", "y", "z", "500", "14"]);
        assert_eq!(
            sets.ids(2, &shared, &filter, ["q", "y", "z", "500", "14"]),
            o
        );
        assert!(o != a && o != b);
        let mut cache = MetricCache::default();
        for id in o {
            cache.get(&shared, id).expect("defined").record(1);
        }
        let quoted = sets.ids(9, &shared, &filter, ["w\"e,b{}", "n", "d", "200", ""]);
        cache.get(&shared, quoted[0]).expect("defined").record(1);
        let text = m.encode();
        assert!(
            text.contains(r#"weft_wasm_requests_total{filter="t",source_workload="_other",source_namespace="_other",destination_workload="_other",response_code="_other",grpc_response_status="_other"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"weft_wasm_requests_total{filter="t",source_workload="web",source_namespace="n",destination_workload="d",response_code="200",grpc_response_status=""} 1"#),
            "{text}"
        );
    }
}
