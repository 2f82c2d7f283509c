//! weft-cp and weftctl as real processes, for the control-plane and identity tests.
// Each test binary that includes this module uses some of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const WEFT: &str = env!("CARGO_BIN_EXE_weft");
pub const TOKEN: &str = "test-token-1234";

/// A binary of the control-plane crate, built next to `weft` by `cargo test --workspace`.
pub fn sibling(name: &str) -> PathBuf {
    let p = Path::new(WEFT).with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: build it first (`cargo build -p weft-controlplane`; `cargo test --workspace` does)",
        p.display()
    );
    p
}

/// How weftctl authenticates.
#[derive(Debug, Clone)]
pub enum Credential {
    /// The plaintext link with the token.
    Plain,
    /// `--credentials DIR` (an operator certificate).
    Operator(PathBuf),
    /// The token over TLS, trusting `ca`.
    Token(PathBuf),
}

pub struct Cp {
    pub child: Child,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
    /// Whether the link is TLS.
    pub tls: bool,
    /// The operator credential (TLS): written by `--init-admin` at start.
    pub admin: Option<PathBuf>,
    store: PathBuf,
    extra: Vec<String>,
    /// The network namespace it runs in (and weftctl with it), if not the test's.
    netns: Option<PathBuf>,
}

impl Drop for Cp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Cp {
    /// A plaintext control plane (`--insecure-plaintext`) with the token.
    pub fn start(store: &Path, listen: &str) -> Cp {
        Cp::spawn(store, listen, false, &[])
    }

    /// A control plane on TLS, with an operator credential next to the store.
    pub fn start_tls(store: &Path, listen: &str, extra: &[&str]) -> Cp {
        let admin = store.with_extension("admin");
        init_admin(store, extra, &admin);
        let mut cp = Cp::spawn(store, listen, true, extra);
        cp.admin = Some(admin);
        cp
    }

    /// A control plane on TLS whose operator credential goes to `admin` (written there by
    /// `--init-admin` unless it exists: replicas share one).
    pub fn start_tls_admin(store: &Path, listen: &str, extra: &[&str], admin: &Path) -> Cp {
        if !admin.join("admin.pem").exists() {
            init_admin(store, extra, admin);
        }
        let mut cp = Cp::spawn(store, listen, true, extra);
        cp.admin = Some(admin.to_owned());
        cp
    }

    /// Writes the operator credential again (after a root rotation).
    pub fn renew_admin(&self) {
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        init_admin(
            &self.store,
            &extra,
            self.admin.as_ref().expect("a TLS control plane"),
        );
    }

    /// Whether weft-cp logged `what`.
    pub fn logged(&self, what: &str) -> bool {
        self.log
            .lock()
            .expect("log")
            .iter()
            .any(|l| l.contains(what))
    }

    pub fn spawn(store: &Path, listen: &str, tls: bool, extra: &[&str]) -> Cp {
        Cp::spawn_in(None, store, listen, tls, extra)
    }

    /// A control plane on TLS in the network namespace at `netns`, with an operator
    /// credential next to the store (weftctl runs in that namespace too).
    pub fn start_tls_in(netns: &Path, store: &Path, listen: &str, extra: &[&str]) -> Cp {
        let admin = store.with_extension("admin");
        init_admin(store, extra, &admin);
        let mut cp = Cp::spawn_in(Some(netns), store, listen, true, extra);
        cp.admin = Some(admin);
        cp
    }

    fn command(netns: Option<&Path>, program: PathBuf) -> Command {
        match netns {
            Some(ns) => weft_testkit::netns::command_in(ns, program, None),
            None => Command::new(program),
        }
    }

    pub fn spawn_in(
        netns: Option<&Path>,
        store: &Path,
        listen: &str,
        tls: bool,
        extra: &[&str],
    ) -> Cp {
        let mut cmd = Cp::command(netns, sibling("weft-cp"));
        cmd.args(["--listen", listen, "--metrics", "127.0.0.1:0", "--store"])
            .arg(store)
            .args(extra)
            .env("WEFT_CP_TOKEN", TOKEN)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if !tls {
            cmd.arg("--insecure-plaintext");
        }
        let mut child = cmd.spawn().expect("weft-cp starts");
        let log = Arc::new(Mutex::new(Vec::<String>::new()));
        let sink = log.clone();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[weft-cp] {line}");
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let find = |what: &str| -> Option<SocketAddr> {
            log.lock()
                .expect("log")
                .iter()
                .find(|l| l.contains(what))
                .and_then(|l| l.split("addr=").nth(1))
                .and_then(|a| a.split_whitespace().next())
                .and_then(|a| a.parse().ok())
        };
        let (addr, metrics) = loop {
            if let (Some(a), Some(m)) = (find("weft-cp listening"), find("metrics listening")) {
                break (a, m);
            }
            if Instant::now() >= deadline || matches!(child.try_wait(), Ok(Some(_))) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("weft-cp did not start: {:?}", log.lock().expect("log"));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Cp {
            child,
            addr,
            metrics,
            log,
            tls,
            admin: None,
            store: store.to_owned(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            netns: netns.map(Path::to_owned),
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The operator's credential (plaintext: the token).
    pub fn operator(&self) -> Credential {
        match &self.admin {
            Some(dir) => Credential::Operator(dir.clone()),
            None => Credential::Plain,
        }
    }

    pub fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_as(&self.operator(), args, Some(TOKEN))
    }

    pub fn ctl_with_token(&self, args: &[&str], token: Option<&str>) -> Output {
        self.ctl_as(&Credential::Plain, args, token)
    }

    pub fn ctl_as(&self, who: &Credential, args: &[&str], token: Option<&str>) -> Output {
        let mut c = Cp::command(self.netns.as_deref(), sibling("weftctl"));
        c.arg("--server")
            .arg(self.url())
            .args(["--wait", "20s"])
            .args(args)
            .env_remove("WEFT_CREDENTIALS")
            .env_remove("WEFT_CP_CA");
        match who {
            Credential::Plain => {}
            Credential::Operator(dir) => {
                c.arg("--credentials").arg(dir);
            }
            Credential::Token(ca) => {
                c.arg("--ca").arg(ca);
            }
        }
        match token {
            Some(t) => c.env("WEFT_CP_TOKEN", t),
            None => c.env_remove("WEFT_CP_TOKEN"),
        };
        let out = c.output().expect("weftctl runs");
        eprintln!(
            "[weftctl {args:?}] {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Registers a node; answers its join token.
    pub fn add_node(&self, name: &str, identity: &str, labels: &[&str], extra: &[&str]) -> String {
        let mut args = vec!["node", "add", name, "--identity", identity];
        for l in labels {
            args.extend(["--label", l]);
        }
        args.extend(extra);
        let out = self.ctl(&args);
        assert!(out.status.success(), "node add {name} failed");
        stdout(&out).trim().to_owned()
    }

    /// The metrics text.
    pub fn metrics_text(&self) -> String {
        weft_testkit::http_get(self.metrics, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }
}

fn init_admin(store: &Path, extra: &[&str], dir: &Path) {
    let out = Command::new(sibling("weft-cp"))
        .args(["--store"])
        .arg(store)
        .args(extra)
        .arg("--init-admin")
        .arg(dir)
        .output()
        .expect("weft-cp --init-admin runs");
    assert!(
        out.status.success(),
        "--init-admin: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p.to_string_lossy().into_owned()
}

/// A real etcd (Debian's `etcd-server`; `scripts/test` installs it) on loopback ports, with a
/// data directory of its own: stopped, started again on the same ports and data, paused.
pub struct Etcd {
    child: Option<Child>,
    pub client: SocketAddr,
    peer: SocketAddr,
    data: PathBuf,
    /// TLS on the client URL: the server's certificate and key, and the CA clients must be
    /// signed by.
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port free now on 127.0.0.1.
fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

impl Etcd {
    pub fn start(dir: &Path) -> Etcd {
        let mut e = Etcd {
            child: None,
            client: free_port(),
            peer: free_port(),
            data: dir.join("etcd-data"),
            tls: None,
        };
        e.restart();
        e
    }

    /// etcd serving clients over TLS with client certificates required (`cert`, `key`: its
    /// own; `ca`: what clients' certificates must chain to). Returns once it runs (weft-cp
    /// waits for it to answer).
    pub fn start_tls(dir: &Path, cert: &Path, key: &Path, ca: &Path) -> Etcd {
        let mut e = Etcd {
            child: None,
            client: free_port(),
            peer: free_port(),
            data: dir.join("etcd-data"),
            tls: Some((cert.to_owned(), key.to_owned(), ca.to_owned())),
        };
        e.restart();
        e
    }

    /// `etcd://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.client)
    }

    /// Starts etcd (again) on the same ports and data; returns once it answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "etcd is running");
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://{}", self.client);
        let peer = format!("http://{}", self.peer);
        let mut cmd = Command::new("etcd");
        if let Some((cert, key, ca)) = &self.tls {
            cmd.arg("--cert-file")
                .arg(cert)
                .arg("--key-file")
                .arg(key)
                .arg("--trusted-ca-file")
                .arg(ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", "t", "--data-dir"])
            .arg(&self.data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd starts (Debian's etcd-server; scripts/test installs it)");
        self.child = Some(child);
        if self.tls.is_some() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, body)) = weft_testkit::http_get(self.client, "/health")
                && body.contains("true")
            {
                return;
            }
            assert!(Instant::now() < deadline, "etcd did not become healthy");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills etcd (its data stays).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
