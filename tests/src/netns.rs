//! Network namespaces standing in for pods: a "hub" namespace with a bridge, and pods joined
//! to it by veth pairs, each with its own address, routes and nat table. Everything is made
//! with `ip` (iproute2) and removed when the [`Net`] is dropped — after a failed test too (a
//! panic unwinds through the drop); namespaces a killed test run left behind are removed by
//! the next one.
//!
//! Code runs "in" a pod in two ways: a process started with [`Netns::command`] (optionally as
//! another uid, as a sidecar runs as 1337), or a closure run by [`Netns::run`] on a thread of
//! the test that joined the namespace — a socket belongs to the namespace it was made in, so a
//! listener or client made there can then be used from anywhere.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The subnet pods live in (every test has namespaces of its own: no clash between tests).
pub const SUBNET: &str = "10.77.0";
/// Their IPv6 subnet (`fd77::<n>/64`).
pub const SUBNET6: &str = "fd77:";

/// Whether this process may make namespaces (root, with `ip`), else why not.
pub fn available() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("network-namespace tests need root (CI runs them as root)".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err("network-namespace tests need `ip` (iproute2)".into()),
    }
}

fn ip(args: &[&str]) -> Output {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// One network namespace (`/run/netns/<name>`).
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    fn create(name: String) -> Netns {
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    fn open(&self) -> OwnedFd {
        std::fs::File::open(self.path())
            .unwrap_or_else(|e| panic!("open {}: {e}", self.path().display()))
            .into()
    }

    /// `ip -n <ns> …`.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut all = vec!["-n", &self.name];
        all.extend(args);
        ip(&all)
    }

    /// A command that runs in this namespace (as `uid`/`gid` when given: a sidecar runs as
    /// its own user, which `weft init`'s rules exempt from capture).
    pub fn command(
        &self,
        program: impl AsRef<std::ffi::OsStr>,
        user: Option<(u32, u32)>,
    ) -> Command {
        command_in(&self.path(), program, user)
    }

    /// Runs `f` on a thread that joined this namespace (sockets it makes are the pod's).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let fd = self.open();
        std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: setns on this thread only, with a namespace descriptor we hold.
                let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("the thread in the namespace panicked")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A command that runs in the namespace at `ns` (a `/run/netns/<name>` path), as `uid`/`gid`
/// when given.
pub fn command_in(
    ns: &std::path::Path,
    program: impl AsRef<std::ffi::OsStr>,
    user: Option<(u32, u32)>,
) -> Command {
    let fd: OwnedFd = std::fs::File::open(ns)
        .unwrap_or_else(|e| panic!("open {}: {e}", ns.display()))
        .into();
    let mut c = Command::new(program);
    // SAFETY: between fork and exec the closure only makes async-signal-safe system calls
    // (setns, setgroups, setgid, setuid) on values prepared before the fork.
    unsafe {
        c.pre_exec(move || {
            if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some((uid, gid)) = user
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c
}

/// A pod: a namespace on the hub's bridge at `SUBNET.<n>` and `fd77::<n>`.
#[derive(Debug)]
pub struct Pod {
    pub ns: Netns,
    pub ip: String,
    pub ip6: String,
}

/// A hub (bridge, at `SUBNET.254`) and its pods. Drop it after the processes in it.
#[derive(Debug)]
pub struct Net {
    prefix: String,
    pub hub: Netns,
    pods: u8,
}

impl Net {
    pub fn new() -> Net {
        remove_stale();
        let prefix = format!(
            "wt{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let hub = Netns::create(format!("{prefix}-hub"));
        hub.ip(&["link", "add", "br0", "type", "bridge"]);
        hub.ip(&["link", "set", "br0", "up"]);
        hub.ip(&["addr", "add", &format!("{SUBNET}.254/24"), "dev", "br0"]);
        hub.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{SUBNET6}:fe/64"),
            "dev",
            "br0",
            "nodad",
        ]);
        Net {
            prefix,
            hub,
            pods: 0,
        }
    }

    /// The hub's address (where a control plane in the hub listens).
    pub fn hub_ip(&self) -> String {
        format!("{SUBNET}.254")
    }

    /// A new pod on the bridge, with a default route through it.
    pub fn pod(&mut self, name: &str) -> Pod {
        self.pods += 1;
        let n = self.pods;
        let ns = Netns::create(format!("{}-{name}", self.prefix));
        let veth = format!("v{n}");
        self.hub.ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ]);
        self.hub.ip(&["link", "set", &veth, "master", "br0", "up"]);
        let ip = format!("{SUBNET}.{n}");
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        // Service VIPs are not on any link: the route makes connect() to them possible, and
        // the nat rules redirect before a packet leaves.
        ns.ip(&["route", "add", "default", "dev", "eth0"]);
        // IPv6 too, usable at once (no duplicate address detection to wait for).
        let ip6 = format!("{SUBNET6}:{n}");
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{ip6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        ns.ip(&["-6", "route", "add", "default", "dev", "eth0"]);
        Pod { ns, ip, ip6 }
    }
}

impl Default for Net {
    fn default() -> Self {
        Net::new()
    }
}

/// Removes namespaces of test runs that are no longer running (a run killed before its drops).
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix("wt") else {
            continue;
        };
        let Some(pid) = rest.split('x').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}
