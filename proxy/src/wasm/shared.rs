//! What VMs share across workers, in host memory: key-value data with compare-and-swap and
//! queues (both scoped by `vm_id`), guest-defined metrics, and the host's own Wasm metrics.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::mpsc::UnboundedSender;
use weft_abi::{MetricType, Status};

use super::runtime::caps;
use crate::metrics::Metrics;

/// Most distinct metrics one filter may define (label sets count separately); beyond it,
/// definitions succeed but record nothing, and are counted as dropped.
pub const MAX_METRICS_PER_FILTER: usize = 1000;

/// The id of a metric defined past the cardinality cap (with its type in the low two bits):
/// it records nothing, and nothing is kept for it.
const DROPPED_METRIC: u32 = !3;

/// A notification for the worker that consumes a queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueReady {
    pub vm: u64,
    pub root: u32,
    pub queue: u32,
}

struct Queue {
    items: VecDeque<Bytes>,
    /// Bytes of `items`.
    bytes: usize,
    /// Most items and bytes waiting (the registering VM's limits).
    max_items: usize,
    max_bytes: usize,
    /// The last root context to register the queue: its worker is told of new items.
    consumer: Option<(UnboundedSender<QueueReady>, u64, u32)>,
}

#[derive(Default)]
struct Queues {
    by_name: HashMap<(Arc<str>, Vec<u8>), u32>,
    queues: HashMap<u32, Queue>,
    /// Queues per `vm_id`.
    per_vm_id: HashMap<Arc<str>, usize>,
    next: u32,
}

/// Limits on a queue, from the VM that registers it.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub items: usize,
    pub bytes: usize,
}

/// Limits on one `vm_id`'s shared data, from the VM that writes it.
#[derive(Debug, Clone, Copy)]
pub struct DataLimits {
    pub bytes: usize,
    pub keys: usize,
}

type LabelSet = Vec<(String, String)>;

/// The hasher of shared data's maps: seeded per process, and a fraction of SipHash's cost on
/// the short keys filters use (a rate limiter reads and writes one on every request).
type Fast = foldhash::fast::RandomState;

/// One `vm_id`'s shared data: key → (value, CAS), and the bytes of keys and values.
#[derive(Default)]
struct SharedData {
    map: HashMap<Vec<u8>, (Bytes, u32), Fast>,
    bytes: usize,
}
type HistogramFamily = Family<LabelSet, Histogram, fn() -> Histogram>;

fn guest_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 24))
}

/// A metric a guest defined. A VM keeps the ones it uses ([`MetricCache`]), so recording
/// takes no lock shared with other workers.
#[derive(Clone)]
pub enum GuestMetric {
    Counter(Counter),
    Gauge(Gauge),
    Histogram(Histogram),
    /// Past the cardinality cap.
    Dropped,
}

impl GuestMetric {
    /// `proxy_record_metric`: counter adds, gauge sets, histogram records.
    pub fn record(&self, value: u64) {
        match self {
            GuestMetric::Counter(c) => {
                c.inc_by(value);
            }
            GuestMetric::Gauge(g) => {
                g.set(value as i64);
            }
            GuestMetric::Histogram(h) => h.observe(value as f64),
            GuestMetric::Dropped => {}
        }
    }

    /// `proxy_increment_metric`: counters only go up; gauges either way.
    pub fn increment(&self, delta: i64) -> Result<(), Status> {
        match self {
            GuestMetric::Counter(c) if delta >= 0 => {
                c.inc_by(delta as u64);
            }
            GuestMetric::Gauge(g) => {
                g.inc_by(delta);
            }
            GuestMetric::Dropped => {}
            _ => return Err(Status::BadArgument),
        }
        Ok(())
    }

    /// `proxy_get_metric`: counters and gauges (not histograms).
    pub fn value(&self) -> Result<u64, Status> {
        match self {
            GuestMetric::Counter(c) => Ok(c.get()),
            GuestMetric::Gauge(g) => Ok(g.get() as u64),
            GuestMetric::Dropped => Ok(0),
            GuestMetric::Histogram(_) => Err(Status::BadArgument),
        }
    }
}

/// The guest metrics one VM used, by id: looked up in the host-global list (under its lock)
/// once, then used from here. Ids are never reused, so an entry never goes stale.
#[derive(Default)]
pub struct MetricCache(Vec<Option<GuestMetric>>);

impl MetricCache {
    /// How many ids the cache has room for.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Metric `id`, or `NOT_FOUND`.
    pub fn get(&mut self, shared: &WasmShared, id: u32) -> Result<&GuestMetric, Status> {
        if id & !3 == DROPPED_METRIC {
            return Ok(&GuestMetric::Dropped);
        }
        let i = (id >> 2) as usize;
        if !matches!(self.0.get(i), Some(Some(_))) {
            // Only ids that exist make the cache grow: at most as long as the global list.
            let m = shared.metric(id).ok_or(Status::NotFound)?.1;
            if self.0.len() <= i {
                self.0.resize(i + 1, None);
            }
            self.0[i] = Some(m);
        }
        self.0[i].as_ref().ok_or(Status::NotFound)
    }
}

#[derive(Default)]
struct GuestMetrics {
    ids: HashMap<(Arc<str>, MetricType, String), u32>,
    metrics: Vec<(MetricType, GuestMetric)>,
    per_filter: HashMap<Arc<str>, usize>,
    counters: HashMap<String, Family<LabelSet, Counter>>,
    gauges: HashMap<String, Family<LabelSet, Gauge>>,
    histograms: HashMap<String, HistogramFamily>,
}

/// Host-global Wasm state.
pub struct WasmShared {
    data: Mutex<HashMap<Arc<str>, SharedData, Fast>>,
    cas: AtomicU32,
    queues: Mutex<Queues>,
    guest: Mutex<GuestMetrics>,
    metrics: Arc<Metrics>,
    pub stats: WasmStats,
}

impl std::fmt::Debug for WasmShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WasmShared")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct FilterLabels {
    pub filter: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct TrapLabels {
    pub filter: String,
    pub kind: &'static str,
}

/// The host's own metrics of Wasm filters.
#[derive(Clone)]
pub struct WasmStats {
    pub traps: Family<TrapLabels, Counter>,
    pub vm_starts: Family<FilterLabels, Counter>,
    pub call_time: Family<FilterLabels, Histogram, fn() -> Histogram>,
    pub metrics_dropped: Family<FilterLabels, Counter>,
    /// Modules loaded (compiled and linked) now.
    pub modules_loaded: Gauge,
    /// VMs the pool holds, and VMs the running configuration may need at once.
    pub pool_size: Gauge,
    pub vms_needed: Gauge,
}

impl std::fmt::Debug for WasmStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WasmStats")
    }
}

fn call_time_histogram() -> Histogram {
    // 1 µs … ~0.5 s.
    Histogram::new(exponential_buckets(1e-6, 2.0, 20))
}

/// Turns a guest metric name into a Prometheus one: `name{k="v",...}` gives labels; invalid
/// characters become `_`; the `weft_wasm_` prefix keeps guests apart from the host's metrics.
fn parse_name(raw: &str) -> (String, LabelSet) {
    let (base, labels) = match raw.split_once('{') {
        Some((b, rest)) if rest.ends_with('}') => (b, Some(&rest[..rest.len() - 1])),
        _ => (raw, None),
    };
    // The registry adds the `weft_` prefix.
    let mut name = String::from("wasm_");
    for c in base.chars() {
        name.push(if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            c
        } else {
            '_'
        });
    }
    let mut set = Vec::new();
    if let Some(labels) = labels {
        for part in labels.split(',') {
            if let Some((k, v)) = part.split_once('=') {
                let k: String = k
                    .trim()
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '_' {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect();
                let v = v.trim().trim_matches('"').to_owned();
                if !k.is_empty() && k != "filter" {
                    set.push((k, v));
                }
            }
        }
    }
    (name, set)
}

impl WasmShared {
    pub fn new(metrics: Arc<Metrics>) -> Arc<WasmShared> {
        let stats = WasmStats {
            traps: Family::default(),
            vm_starts: Family::default(),
            call_time: Family::new_with_constructor(call_time_histogram),
            metrics_dropped: Family::default(),
            modules_loaded: Gauge::default(),
            pool_size: Gauge::default(),
            vms_needed: Gauge::default(),
        };
        metrics.with_registry(|r| {
            r.register(
                "wasm_traps",
                "Calls into a filter's VM that failed (kind: trap, deadline, memory), each taking the VM down",
                stats.traps.clone(),
            );
            r.register(
                "wasm_vm_starts",
                "Filter VMs started (one per worker, again after a failure)",
                stats.vm_starts.clone(),
            );
            r.register(
                "wasm_call_duration_seconds",
                "Time spent inside a filter's VM per request",
                stats.call_time.clone(),
            );
            r.register(
                "wasm_modules_loaded",
                "Wasm modules loaded (compiled and linked); those no configuration uses are evicted",
                stats.modules_loaded.clone(),
            );
            r.register(
                "wasm_vm_pool_size",
                "Filter VMs that can exist at once (wasm.pool_instances)",
                stats.pool_size.clone(),
            );
            r.register(
                "wasm_vms_needed",
                "Filter VMs the running configuration may need at once (workers x VMs, with a reload's)",
                stats.vms_needed.clone(),
            );
            r.register(
                "wasm_metrics_dropped",
                "Metric definitions past a filter's cardinality cap (they record nothing)",
                stats.metrics_dropped.clone(),
            );
        });
        Arc::new(WasmShared {
            data: Mutex::new(HashMap::default()),
            cas: AtomicU32::new(0),
            queues: Mutex::new(Queues::default()),
            guest: Mutex::new(GuestMetrics::default()),
            metrics,
            stats,
        })
    }

    fn next_cas(&self) -> u32 {
        loop {
            let c = self.cas.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
            if c != 0 {
                return c;
            }
        }
    }

    /// `proxy_get_shared_data`: value and CAS.
    pub fn get(&self, vm_id: &Arc<str>, key: &[u8]) -> Option<(Bytes, u32)> {
        let data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        data.get(vm_id)?.map.get(key).cloned()
    }

    /// `proxy_set_shared_data`: `cas` 0 writes unconditionally, otherwise it must be the
    /// current CAS of an existing key. `None` removes the key. A write that would take the
    /// `vm_id`'s data past `limits` fails (`INTERNAL_FAILURE`) and changes nothing.
    pub fn set(
        &self,
        vm_id: &Arc<str>,
        key: &[u8],
        value: Option<Bytes>,
        cas: u32,
        limits: DataLimits,
    ) -> Result<(), Status> {
        let mut data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        let shared = data.entry(vm_id.clone()).or_default();
        // The current value's length and CAS.
        let current = shared.map.get(key).map(|(v, c)| (v.len(), *c));
        if cas != 0
            && let Some((_, c)) = current
            && c != cas
        {
            return Err(Status::CasMismatch);
        }
        let old = current.map_or(0, |(len, _)| key.len() + len);
        match value {
            Some(v) => {
                let bytes = shared.bytes - old + key.len() + v.len();
                let keys = shared.map.len() + usize::from(current.is_none());
                let grows = bytes > shared.bytes;
                if (grows && bytes > limits.bytes) || (current.is_none() && keys > limits.keys) {
                    return Err(Status::InternalFailure);
                }
                let c = self.next_cas();
                shared.bytes = bytes;
                // An existing key keeps its copy: only a new one is copied in.
                match shared.map.get_mut(key) {
                    Some(slot) => *slot = (v, c),
                    None => {
                        shared.map.insert(key.to_vec(), (v, c));
                    }
                }
            }
            None => {
                shared.bytes -= old;
                shared.map.remove(key);
            }
        }
        Ok(())
    }

    /// `proxy_register_shared_queue`: create or open, and become its consumer (when
    /// `consumer` says where to notify: the worker, the VM's uid and the root context).
    /// A `vm_id` may have at most [`caps::MAX_QUEUES_PER_VM_ID`] queues.
    pub fn register_queue(
        &self,
        vm_id: &Arc<str>,
        name: &[u8],
        consumer: Option<(UnboundedSender<QueueReady>, u64, u32)>,
        limits: QueueLimits,
    ) -> Result<u32, Status> {
        let mut q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let key = (vm_id.clone(), name.to_vec());
        let id = match q.by_name.get(&key) {
            Some(id) => *id,
            None => {
                let count = q.per_vm_id.entry(vm_id.clone()).or_insert(0);
                if *count >= caps::MAX_QUEUES_PER_VM_ID {
                    return Err(Status::InternalFailure);
                }
                *count += 1;
                q.next += 1;
                let id = q.next;
                q.by_name.insert(key, id);
                q.queues.insert(
                    id,
                    Queue {
                        items: VecDeque::new(),
                        bytes: 0,
                        max_items: limits.items,
                        max_bytes: limits.bytes,
                        consumer: None,
                    },
                );
                id
            }
        };
        if let Some(queue) = q.queues.get_mut(&id)
            && consumer.is_some()
        {
            queue.consumer = consumer;
            queue.max_items = limits.items;
            queue.max_bytes = limits.bytes;
        }
        Ok(id)
    }

    /// `proxy_resolve_shared_queue`.
    pub fn resolve_queue(&self, vm_id: &Arc<str>, name: &[u8]) -> Option<u32> {
        let q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        q.by_name.get(&(vm_id.clone(), name.to_vec())).copied()
    }

    /// `proxy_enqueue_shared_queue`: the consumer's worker is told. A full queue (its depth
    /// or bytes) refuses the item (`INTERNAL_FAILURE`).
    pub fn enqueue(&self, id: u32, value: Bytes) -> Result<(), Status> {
        let mut q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let queue = q.queues.get_mut(&id).ok_or(Status::NotFound)?;
        if queue.items.len() >= queue.max_items || queue.bytes + value.len() > queue.max_bytes {
            return Err(Status::InternalFailure);
        }
        queue.bytes += value.len();
        queue.items.push_back(value);
        if let Some((tx, vm, root)) = &queue.consumer {
            let _ = tx.send(QueueReady {
                vm: *vm,
                root: *root,
                queue: id,
            });
        }
        Ok(())
    }

    /// `proxy_dequeue_shared_queue`.
    pub fn dequeue(&self, id: u32) -> Result<Bytes, Status> {
        let mut q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let queue = q.queues.get_mut(&id).ok_or(Status::NotFound)?;
        let item = queue.items.pop_front().ok_or(Status::Empty)?;
        queue.bytes -= item.len();
        Ok(item)
    }

    /// `proxy_define_metric`: the id of `name` (with its `{labels}`) for `filter`; defining it
    /// again gives the same id.
    pub fn define_metric(&self, filter: &Arc<str>, t: MetricType, raw: &str) -> u32 {
        let mut g = self.guest.lock().unwrap_or_else(|e| e.into_inner());
        let key = (filter.clone(), t, raw.to_owned());
        if let Some(id) = g.ids.get(&key) {
            return *id;
        }
        let count = g.per_filter.entry(filter.clone()).or_insert(0);
        let metric = if *count >= MAX_METRICS_PER_FILTER {
            self.stats
                .metrics_dropped
                .get_or_create(&FilterLabels {
                    filter: filter.to_string(),
                })
                .inc();
            // Nothing is kept for it: the one id of dropped metrics of this type.
            return DROPPED_METRIC | t as u32;
        } else {
            *count += 1;
            let (name, mut labels) = parse_name(raw);
            labels.insert(0, ("filter".to_owned(), filter.to_string()));
            let metrics = &self.metrics;
            match t {
                MetricType::Counter => {
                    // The exposition adds `_total` to counters: a guest's own (the Prometheus
                    // convention) is not doubled.
                    let name = match name.strip_suffix("_total") {
                        Some(base) if base.len() > "wasm_".len() => base.to_owned(),
                        _ => name,
                    };
                    let family = g.counters.entry(name.clone()).or_insert_with(|| {
                        let f = Family::<LabelSet, Counter>::default();
                        metrics.with_registry(|r| {
                            r.register(name.clone(), "Defined by a Wasm filter", f.clone())
                        });
                        f
                    });
                    let c = family.get_or_create(&labels).clone();
                    GuestMetric::Counter(c)
                }
                MetricType::Gauge => {
                    let gname = if g.counters.contains_key(&name) {
                        format!("{name}_gauge")
                    } else {
                        name
                    };
                    let family = g.gauges.entry(gname.clone()).or_insert_with(|| {
                        let f = Family::<LabelSet, Gauge>::default();
                        metrics.with_registry(|r| {
                            r.register(gname.clone(), "Defined by a Wasm filter", f.clone())
                        });
                        f
                    });
                    let m = family.get_or_create(&labels).clone();
                    GuestMetric::Gauge(m)
                }
                MetricType::Histogram => {
                    let hname = if g.counters.contains_key(&name) || g.gauges.contains_key(&name) {
                        format!("{name}_histogram")
                    } else {
                        name
                    };
                    let family = g.histograms.entry(hname.clone()).or_insert_with(|| {
                        let f: HistogramFamily = Family::new_with_constructor(guest_histogram);
                        metrics.with_registry(|r| {
                            r.register(hname.clone(), "Defined by a Wasm filter", f.clone())
                        });
                        f
                    });
                    let m = family.get_or_create(&labels).clone();
                    GuestMetric::Histogram(m)
                }
            }
        };
        let id = ((g.metrics.len() as u32 + 1) << 2) | t as u32;
        g.metrics.push((t, metric));
        g.ids.insert(key, id);
        id
    }

    fn metric(&self, id: u32) -> Option<(MetricType, GuestMetric)> {
        if id & !3 == DROPPED_METRIC {
            return Some((MetricType::from_u32(id & 3)?, GuestMetric::Dropped));
        }
        let g = self.guest.lock().unwrap_or_else(|e| e.into_inner());
        g.metrics.get(((id >> 2) as usize).checked_sub(1)?).cloned()
    }
}

#[cfg(test)]
mod tests;
