//! Logging for Weft's binaries (`weft`, `weft-cp`): lines go to standard error from a thread of
//! their own, in batches, through a bounded queue. A worker formats a line and moves on; when
//! the writer cannot keep up (a slow terminal, a pipe nobody reads), lines are dropped and
//! counted (`weft_log_lines_dropped_total`) — logging never blocks the data plane. Filters'
//! lines are cut to their `limits.log_line` where they are logged.

use std::io::IsTerminal;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::prelude::*;

/// Lines waiting for the writer at most; past it new lines are dropped. With filters' lines
/// of at most 16 KiB (the default `log_line`), the queue holds at most 64 MiB.
pub const QUEUE_LINES: usize = 4096;

/// The running logger: flushes what is queued when dropped (at exit).
#[derive(Debug)]
pub struct Logs {
    _guard: WorkerGuard,
    dropped: DroppedLines,
}

impl Logs {
    /// The count of lines dropped so far, as a metric collector.
    pub fn dropped(&self) -> DroppedLines {
        self.dropped.clone()
    }
}

/// `log_lines_dropped_total`: lines the writer could not keep up with.
#[derive(Debug, Clone)]
pub struct DroppedLines(ErrorCounter);

impl DroppedLines {
    pub fn get(&self) -> u64 {
        self.0.dropped_lines() as u64
    }
}

impl Collector for DroppedLines {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let metric = encoder.encode_descriptor(
            "log_lines_dropped",
            "Log lines dropped because the log writer could not keep up",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(self.get()).encode(metric)
    }
}

/// Installs the logger: `RUST_LOG` if set, else `level` (e.g. `info`, `weft_proxy=debug`).
pub fn init(level: &str) -> Logs {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUE_LINES)
        .thread_name("weft-log")
        .finish(std::io::BufWriter::new(std::io::stderr()));
    let dropped = DroppedLines(writer.error_counter());
    let ansi = std::io::stderr().is_terminal();
    // Filters' messages are made safe where they are logged (`sanitize`), in one pass; the
    // formatter's own escaping (character by character) is kept for everything else.
    let is_guest = |m: &tracing::Metadata<'_>| m.target() == "weft::wasm";
    let guests = tracing_subscriber::fmt::layer()
        .with_writer(writer.clone())
        .with_ansi(ansi)
        .with_ansi_sanitization(false)
        .with_filter(tracing_subscriber::filter::filter_fn(is_guest));
    let rest = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi)
        .with_filter(tracing_subscriber::filter::filter_fn(move |m| !is_guest(m)));
    tracing_subscriber::registry()
        .with(filter)
        .with(guests)
        .with(rest)
        .init();
    Logs {
        _guard: guard,
        dropped,
    }
}
