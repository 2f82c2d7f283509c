//! Access logs, written natively: one JSON object per line and request, for the listeners that
//! name a file (`access_log: { path: … }`). A request's line is built in one buffer when the
//! request ends and appended to its file's pending bytes; a thread per file writes them out in
//! batches (at 64 KiB, or every 100 ms), so a request never waits on a disk or a pipe. When the
//! writer falls behind by more than [`MAX_PENDING`] bytes, new lines are dropped and counted
//! (`weft_access_log_lines_dropped_total`), as the process log does. Listeners naming the same
//! path share one file and one writer; `SIGUSR1` reopens every file (for log rotation); the
//! pending lines are written out when the proxy exits.
//!
//! Filters add fields of their own: a property a filter sets under `access_log.<field>`
//! (`proxy_set_property(["access_log", "<field>"], value)`) is logged as `"<field>": value`.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use http::{HeaderName, HeaderValue, Method, Version};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;

mod line;

use line::Line;

/// Pending bytes that make the writer write at once.
const FLUSH_BYTES: usize = 64 * 1024;
/// The longest a line waits before it is written.
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Pending bytes at most; beyond, new lines are dropped (a full disk, a pipe nobody reads).
/// With the batch the writer is writing, a file holds at most twice this in memory.
pub const MAX_PENDING: usize = 8 * 1024 * 1024;
/// The path segment a filter's property must start with to become a field.
pub const FILTER_FIELD_PREFIX: &[u8] = b"access_log\0";

/// Lines dropped by every access log of the process.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// The open access-log files, by path: listeners (and configurations) naming one path share it.
fn open_files() -> &'static Mutex<HashMap<PathBuf, Weak<AccessFile>>> {
    static FILES: OnceLock<Mutex<HashMap<PathBuf, Weak<AccessFile>>>> = OnceLock::new();
    FILES.get_or_init(Default::default)
}

/// One access-log file and its writer thread. The thread ends when the last listener using the
/// file is gone, after writing what is pending.
#[derive(Debug)]
pub struct AccessFile {
    shared: Arc<FileShared>,
}

#[derive(Debug)]
struct FileShared {
    path: PathBuf,
    pending: Mutex<Pending>,
    wake: Condvar,
    /// Locked while writing, so batches reach the file in the order they were taken.
    file: Mutex<File>,
    reopen: AtomicBool,
}

#[derive(Debug, Default)]
struct Pending {
    bytes: Vec<u8>,
    closed: bool,
}

/// Opens `path` for appending, creating a missing file. Opened without blocking, so a FIFO
/// nobody reads is an error (ENXIO) instead of a proxy stuck in `open`; writes then block again
/// (only the writer thread writes, and it may wait: lines pile up in memory meanwhile, up to
/// [`MAX_PENDING`]).
fn open_append(path: &Path) -> std::io::Result<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor this function owns (through `file`), with plain flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

impl AccessFile {
    /// The file at `path`, opened for appending (created if missing), or the one already open.
    pub fn open(path: &Path) -> Result<Arc<AccessFile>, String> {
        let mut files = open_files().lock().unwrap_or_else(|e| e.into_inner());
        files.retain(|_, f| f.strong_count() > 0);
        if let Some(f) = files.get(path).and_then(Weak::upgrade) {
            return Ok(f);
        }
        let file = open_append(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let shared = Arc::new(FileShared {
            path: path.to_owned(),
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            file: Mutex::new(file),
            reopen: AtomicBool::new(false),
        });
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("weft-access-log".into())
            .spawn(move || writer.run())
            .map_err(|e| format!("{}: cannot start its writer: {e}", path.display()))?;
        let f = Arc::new(AccessFile { shared });
        files.insert(path.to_owned(), Arc::downgrade(&f));
        Ok(f)
    }

    /// Appends one line (without its newline), or drops it when too much is pending.
    fn append(&self, line: &[u8]) {
        let mut p = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if p.bytes.len() + line.len() + 1 > MAX_PENDING {
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let before = p.bytes.len();
        p.bytes.extend_from_slice(line);
        p.bytes.push(b'\n');
        // Woken once, when the batch fills (not on every line after: the writer may share the
        // CPU with this worker and not have run yet).
        if before < FLUSH_BYTES && p.bytes.len() >= FLUSH_BYTES {
            self.shared.wake.notify_one();
        }
    }

    /// Writes what is pending now (tests; the writer does it on its own).
    pub fn flush(&self) {
        self.shared.write_pending();
    }
}

impl Drop for AccessFile {
    fn drop(&mut self) {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closed = true;
        self.shared.wake.notify_one();
    }
}

impl FileShared {
    fn run(&self) {
        loop {
            let closed = {
                let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                if !p.closed && p.bytes.len() < FLUSH_BYTES && !self.reopen.load(Ordering::Relaxed)
                {
                    p = self
                        .wake
                        .wait_timeout(p, FLUSH_INTERVAL)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                p.closed
            };
            self.write_pending();
            if closed {
                return;
            }
        }
    }

    /// Writes the pending bytes, after reopening the file if that was asked for.
    fn write_pending(&self) {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        // The workers go on appending to a buffer with room for a batch (allocated here, on
        // the writer's side, not while a request ends).
        let batch = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if p.bytes.is_empty() {
                Vec::new()
            } else {
                std::mem::replace(
                    &mut p.bytes,
                    Vec::with_capacity(FLUSH_BYTES + FLUSH_BYTES / 4),
                )
            }
        };
        if !batch.is_empty()
            && let Err(e) = file.write_all(&batch)
        {
            // The lines are lost, not the proxy: counted, and said once per batch.
            DROPPED.fetch_add(
                batch.iter().filter(|b| **b == b'\n').count() as u64,
                Ordering::Relaxed,
            );
            tracing::warn!(path = %self.path.display(), "access log: write failed: {e}");
        }
        if self.reopen.swap(false, Ordering::Relaxed) {
            match open_append(&self.path) {
                Ok(f) => *file = f,
                Err(e) => tracing::error!(
                    path = %self.path.display(),
                    "access log: reopen failed, still writing to the file opened before: {e}"
                ),
            }
        }
    }
}

/// Every open access-log file is closed and opened again by its path (after `SIGUSR1`: a log
/// rotation renamed them). Lines pending go to the old file first.
pub fn reopen_all() {
    for f in live_files() {
        f.shared.reopen.store(true, Ordering::Relaxed);
        f.shared.wake.notify_one();
    }
}

/// Writes every file's pending lines now (at exit).
pub fn flush_all() {
    for f in live_files() {
        f.shared.write_pending();
    }
}

fn live_files() -> Vec<Arc<AccessFile>> {
    let files = open_files().lock().unwrap_or_else(|e| e.into_inner());
    files.values().filter_map(Weak::upgrade).collect()
}

/// `access_log_lines_dropped_total`, as a metric collector.
#[derive(Debug, Clone, Copy, Default)]
pub struct DroppedAccessLines;

impl Collector for DroppedAccessLines {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let metric = encoder.encode_descriptor(
            "access_log_lines_dropped",
            "Access log lines dropped because their file could not be written fast enough",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(DROPPED.load(Ordering::Relaxed)).encode(metric)
    }
}

/// A listener's access log: where its lines go, and the request headers they add.
#[derive(Debug)]
pub struct AccessLog {
    pub file: Arc<AccessFile>,
    /// Request headers logged by name (lower case), after the standard fields.
    pub headers: Vec<HeaderName>,
}

/// What a request's line says about the request, taken when it arrives.
#[derive(Debug)]
pub struct Entry {
    pub start: SystemTime,
    pub method: Method,
    /// The canonical path the request was routed by (as the client sent it if it was refused
    /// before it had one).
    pub path: http::uri::PathAndQuery,
    /// The path as the client sent it, when its spelling was not the canonical one.
    pub original_path: Option<http::uri::PathAndQuery>,
    pub authority: Option<HeaderValue>,
    pub version: Version,
    pub user_agent: Option<HeaderValue>,
    pub request_id: Option<HeaderValue>,
    pub headers: Vec<Option<HeaderValue>>,
    pub source: SocketAddr,
    pub identity: Option<String>,
    /// Request body bytes received, counted as the body is read.
    pub received: Arc<AtomicU64>,
    /// Response body bytes sent.
    pub sent: u64,
    pub grpc_status: Option<HeaderValue>,
    pub upstream: Option<SocketAddr>,
}

/// What is known once the request ended.
#[derive(Debug)]
pub struct Outcome<'a> {
    pub status: u16,
    pub duration: Duration,
    pub route: &'a str,
    pub cluster: &'a str,
}

impl Entry {
    /// The request's path is now `canonical`: logged as `path`, the client's spelling as
    /// `original_path` when it differs.
    pub fn canonical_path(&mut self, canonical: Option<&http::uri::PathAndQuery>) {
        if let Some(c) = canonical
            && c != &self.path
        {
            self.original_path = Some(std::mem::replace(&mut self.path, c.clone()));
        }
    }
}

impl AccessLog {
    /// Writes `entry`'s line, with the fields filters set (`access_log.<field>` properties: the
    /// property path without its prefix, and the value).
    pub fn log<'f>(
        &self,
        entry: &Entry,
        outcome: &Outcome<'_>,
        filter_fields: impl Iterator<Item = (&'f [u8], &'f [u8])>,
    ) {
        let mut line = Line::with_capacity(512);
        line.raw("{\"start_time\":\"")
            .timestamp(entry.start)
            .raw("\",\"method\":\"")
            .json(entry.method.as_str().as_bytes())
            .raw("\",\"path\":\"")
            .json(entry.path.as_str().as_bytes())
            .raw("\",\"authority\":\"")
            .json(value(&entry.authority))
            .raw("\",\"protocol\":\"")
            .raw(protocol(entry.version))
            .raw("\",\"response_code\":")
            .number(u64::from(outcome.status))
            .raw(",\"grpc_status\":\"")
            .json(value(&entry.grpc_status))
            .raw("\",\"duration_ms\":")
            .millis(outcome.duration)
            .raw(",\"bytes_received\":")
            .number(entry.received.load(Ordering::Relaxed))
            .raw(",\"bytes_sent\":")
            .number(entry.sent)
            .raw(",\"source_address\":\"")
            .addr(entry.source)
            .raw("\",\"source_identity\":\"")
            .json(entry.identity.as_deref().unwrap_or_default().as_bytes())
            .raw("\",\"route\":\"")
            .json(outcome.route.as_bytes())
            .raw("\",\"cluster\":\"")
            .json(outcome.cluster.as_bytes())
            .raw("\",\"upstream_host\":\"");
        if let Some(a) = entry.upstream {
            line.addr(a);
        }
        line.raw("\",\"request_id\":\"")
            .json(value(&entry.request_id))
            .raw("\",\"user_agent\":\"")
            .json(value(&entry.user_agent))
            .raw("\"");
        if let Some(o) = &entry.original_path {
            line.field(b"original_path", o.as_str().as_bytes());
        }
        for (name, v) in self.headers.iter().zip(&entry.headers) {
            if let Some(v) = v {
                line.field(name.as_str().as_bytes(), v.as_bytes());
            }
        }
        for (name, v) in filter_fields {
            line.field(name, v);
        }
        line.raw("}");
        self.file.append(&line.0);
    }
}

/// The protocol as the line names it (as `Version`'s `Debug` does).
fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

fn value(v: &Option<HeaderValue>) -> &[u8] {
    v.as_ref().map_or(&[], HeaderValue::as_bytes)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::OpenOptionsExt as _;

    use super::*;

    fn entry() -> Entry {
        Entry {
            start: SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_270_485_911),
            method: Method::GET,
            path: http::uri::PathAndQuery::from_static("/a?b=1"),
            original_path: None,
            authority: Some(HeaderValue::from_static("example.com")),
            version: Version::HTTP_11,
            user_agent: Some(HeaderValue::from_static("curl")),
            request_id: Some(HeaderValue::from_static("id-1")),
            headers: vec![Some(HeaderValue::from_static("t\"1")), None],
            source: "127.0.0.1:5000".parse().expect("test"),
            identity: None,
            received: Arc::new(AtomicU64::new(3)),
            sent: 12,
            grpc_status: None,
            upstream: Some("127.0.0.1:8080".parse().expect("test")),
        }
    }

    #[test]
    fn a_line_is_one_json_object_with_every_field() {
        let dir = std::env::temp_dir().join(format!("weft-al-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("test");
        let path = dir.join("access.log");
        let log = AccessLog {
            file: AccessFile::open(&path).expect("test"),
            headers: vec![
                HeaderName::from_static("x-tenant"),
                HeaderName::from_static("x-absent"),
            ],
        };
        let outcome = Outcome {
            status: 200,
            duration: Duration::from_micros(1500),
            route: "main[0]",
            cluster: "backend",
        };
        let fields = [
            (&b"trace_id"[..], &b"abc"[..]),
            (&b"evil\",\"x"[..], &b"\n"[..]),
        ];
        log.log(&entry(), &outcome, fields.into_iter());
        log.file.flush();
        let text = std::fs::read_to_string(&path).expect("test");
        assert_eq!(text.lines().count(), 1);
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).expect("test");
        assert_eq!(v["start_time"], "2026-12-03T04:01:25.911000Z");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["path"], "/a?b=1");
        assert_eq!(v["protocol"], "HTTP/1.1");
        assert_eq!(v["response_code"], 200);
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["bytes_received"], 3);
        assert_eq!(v["bytes_sent"], 12);
        assert_eq!(v["upstream_host"], "127.0.0.1:8080");
        assert_eq!(v["x-tenant"], "t\"1");
        assert!(v.get("x-absent").is_none());
        assert_eq!(v["trace_id"], "abc");
        assert_eq!(v["evil\",\"x"], "\n");
        assert!(v.get("x").is_none());
        std::fs::remove_dir_all(&dir).expect("test");
    }

    #[test]
    fn one_path_is_one_file_and_a_missing_directory_is_an_error() {
        let dir = std::env::temp_dir().join(format!("weft-al2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("test");
        let a = AccessFile::open(&dir.join("x.log")).expect("test");
        let b = AccessFile::open(&dir.join("x.log")).expect("test");
        assert!(Arc::ptr_eq(&a, &b));
        let err = AccessFile::open(&dir.join("no/such/dir/x.log")).expect_err("an error");
        assert!(err.contains("no/such/dir/x.log"), "{err}");
        std::fs::remove_dir_all(&dir).expect("test");
    }

    fn fifo(dir: &Path) -> PathBuf {
        let path = dir.join("pipe");
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        path
    }

    /// A FIFO nobody reads is refused at once (not a proxy stuck opening it).
    #[test]
    fn a_fifo_without_a_reader_is_an_error_not_a_hang() {
        let dir = std::env::temp_dir().join(format!("weft-al3-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let err = AccessFile::open(&fifo(&dir)).expect_err("no reader");
        assert!(err.contains("pipe"), "{err}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    /// A reader that stopped reading: the writer blocks, lines pile up to MAX_PENDING and the
    /// rest are dropped and counted; memory stays bounded, and the lines flow again once the
    /// reader reads.
    #[test]
    fn a_stalled_reader_bounds_memory_and_drops_are_counted() {
        use std::io::Read as _;
        let dir = std::env::temp_dir().join(format!("weft-al4-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = fifo(&dir);
        let mut reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .expect("reader");
        let file = AccessFile::open(&path).expect("open");
        let dropped = DROPPED.load(Ordering::Relaxed);
        let line = vec![b'x'; 1023];
        // More than what can be held: 8 MiB pending, a batch of up to 8 MiB the writer took
        // (blocked on the pipe), and the pipe's own buffer.
        let lines = (3 * MAX_PENDING) / 1024;
        for _ in 0..lines {
            file.append(&line);
        }
        let pending = file.shared.pending.lock().expect("lock").bytes.len();
        assert!(pending <= MAX_PENDING, "{pending}");
        assert!(
            DROPPED.load(Ordering::Relaxed) - dropped >= 1024,
            "lines past the cap are counted"
        );
        // The reader reads again: what was kept arrives, in whole lines.
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while got.len() < MAX_PENDING / 2 && std::time::Instant::now() < deadline {
            match reader.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("read: {e}"),
            }
        }
        assert!(
            got.len() >= MAX_PENDING / 2,
            "the kept lines flow again: {}",
            got.len()
        );
        let mut segments: Vec<&[u8]> = got.split(|b| *b == b'\n').collect();
        segments.pop(); // the line still arriving
        assert!(segments.iter().all(|l| l.len() == 1023), "whole lines only");
        drop(file);
        drop(reader);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
