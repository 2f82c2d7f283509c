//! Running a real `weft` process: start it on a config (ports 0), learn the ports it bound,
//! wait until it is ready, reload it, signal it, read its log and its memory.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A `weft` process; killed when dropped.
pub struct Weft {
    child: Child,
    pub admin: SocketAddr,
    listeners: HashMap<String, SocketAddr>,
    config_path: PathBuf,
    _dir: tempfile::TempDir,
    log: Arc<Mutex<Vec<String>>>,
    /// While set, nobody reads the process's standard error (see [`Weft::stall_log`]).
    log_stalled: Arc<std::sync::atomic::AtomicBool>,
}

/// Polls `cond` every 20 ms until it holds or `within` passes; panics with `what` then.
pub fn eventually(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `bin validate` on `yaml` (written to a fresh file): whether it passed, and its
/// standard error.
pub fn validate(bin: &str, yaml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("weft.yaml");
    std::fs::write(&path, yaml).expect("write");
    let out = Command::new(bin)
        .args(["validate", "--config"])
        .arg(&path)
        .output()
        .expect("weft validate runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A blocking `GET` over a fresh connection: (status, body). For admin endpoints.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!("{key}="))? + key.len() + 1;
    let rest = &line[start..];
    let rest = rest.trim_start_matches('"');
    Some(rest.split([' ', '"']).next().unwrap_or(rest))
}

impl Weft {
    /// Starts `bin run --config <yaml> --workers 2` and waits until `/ready` says 200. An
    /// `admin` section on port 0 is added when the YAML has none.
    pub fn start(bin: &str, yaml: &str) -> Weft {
        Self::start_with(bin, yaml, &["--workers", "2"])
    }

    pub fn start_with(bin: &str, yaml: &str, extra: &[&str]) -> Weft {
        Self::start_env(bin, yaml, extra, &[])
    }

    /// As [`Weft::start_with`], with environment variables for the process (`RUST_LOG` among
    /// them replaces the test log level).
    pub fn start_env(bin: &str, yaml: &str, extra: &[&str], envs: &[(&str, &str)]) -> Weft {
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join("weft.yaml");
        std::fs::write(&config_path, with_admin(yaml)).expect("write config");
        let mut child = Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("WEFT_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("weft starts");
        let log = Arc::new(Mutex::new(Vec::new()));
        let log_stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        let stalled = log_stalled.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[weft] {line}");
                sink.lock().expect("log lock").push(line);
                while stalled.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        });

        let mut admin = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        while admin.is_none() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "weft exited at start with {status}: {:?}",
                    log.lock().expect("log")
                );
            }
            assert!(
                Instant::now() < deadline,
                "weft did not report its admin address"
            );
            admin = log
                .lock()
                .expect("log")
                .iter()
                .find(|l| l.contains("admin listening"))
                .and_then(|l| field(l, "address"))
                .and_then(|a| a.parse().ok());
            std::thread::sleep(Duration::from_millis(10));
        }
        let admin: SocketAddr = admin.expect("admin address");
        let mut weft = Weft {
            child,
            admin,
            listeners: HashMap::new(),
            config_path,
            _dir: dir,
            log,
            log_stalled,
        };
        eventually(Duration::from_secs(30), "weft becomes ready", || {
            matches!(http_get(admin, "/ready"), Ok((200, _)))
        });
        weft.refresh_listeners();
        weft
    }

    /// Re-reads the bound listeners from `/listeners`.
    pub fn refresh_listeners(&mut self) {
        let (_, body) = http_get(self.admin, "/listeners").expect("/listeners");
        let v: serde_json::Value = serde_json::from_str(&body).expect("listeners JSON");
        self.listeners = v["listeners"]
            .as_array()
            .expect("listeners array")
            .iter()
            .map(|l| {
                (
                    l["name"].as_str().expect("name").to_owned(),
                    l["address"]
                        .as_str()
                        .expect("address")
                        .parse()
                        .expect("addr"),
                )
            })
            .collect();
    }

    /// The address listener `name` is bound to, if it is.
    pub fn listener(&self, name: &str) -> Option<SocketAddr> {
        self.listeners.get(name).copied()
    }

    /// The address listener `name` is bound to.
    pub fn addr(&self, name: &str) -> SocketAddr {
        *self
            .listeners
            .get(name)
            .unwrap_or_else(|| panic!("no listener {name:?} in {:?}", self.listeners))
    }

    /// `http://<listener address><path>`.
    pub fn url(&self, name: &str, path: &str) -> String {
        format!("http://{}{path}", self.addr(name))
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid with a valid signal number.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({sig}) failed");
    }

    /// The config version `/config` reports.
    pub fn version(&self) -> u64 {
        let (_, body) = http_get(self.admin, "/config").expect("/config");
        let v: serde_json::Value = serde_json::from_str(&body).expect("config JSON");
        v["version"].as_u64().expect("version")
    }

    /// Writes a new config and sends SIGHUP (does not wait for it to apply).
    pub fn write_config_and_hup(&self, yaml: &str) {
        std::fs::write(&self.config_path, with_admin(yaml)).expect("write config");
        self.signal(libc::SIGHUP);
    }

    /// Writes a new config, sends SIGHUP and waits until its version is applied.
    pub fn reload(&mut self, yaml: &str) {
        let before = self.version();
        self.write_config_and_hup(yaml);
        eventually(Duration::from_secs(20), "the reload is applied", || {
            self.version() > before
        });
        self.refresh_listeners();
    }

    /// Whether some log line contains `needle`.
    pub fn log_contains(&self, needle: &str) -> bool {
        self.log
            .lock()
            .expect("log")
            .iter()
            .any(|l| l.contains(needle))
    }

    /// Every log line so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().expect("log").clone()
    }

    pub fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).expect("admin GET")
    }

    /// Resident set size now, and its peak, in KiB.
    pub fn memory_kb(&self) -> (u64, u64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc status");
        let get = |key: &str| {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (get("VmRSS:"), get("VmHWM:"))
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "weft did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Stops reading the process's standard error (after the line being read), as a terminal
    /// that stopped scrolling or a log pipe nobody drains; [`Weft::resume_log`] reads again.
    pub fn stall_log(&self) {
        self.log_stalled
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn resume_log(&self) {
        self.log_stalled
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Weft {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn with_admin(yaml: &str) -> String {
    if yaml.lines().any(|l| l.starts_with("admin:")) {
        yaml.to_owned()
    } else {
        format!("admin: {{ address: \"127.0.0.1:0\" }}\n{yaml}")
    }
}
