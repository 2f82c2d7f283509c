//! `weft init`: the nat rules that send a workload's traffic through its sidecar, in the
//! current network namespace (what an init container runs, with `NET_ADMIN`).
//!
//! Outbound: every TCP connection made in the namespace goes to the outbound capture port,
//! except the proxy's own (its uid and gid), connections to loopback, and excluded ports and
//! CIDRs. Inbound: connections to the workload's ports (or every port but excluded ones) go to
//! the inbound capture port. The same rules for IPv6. Rules live in chains of their own
//! (`WEFT_*`), applied in one `iptables-restore` per family: installing twice leaves one set,
//! `--cleanup` leaves none.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};

/// The chains weft owns in the nat table.
const CHAINS: [&str; 4] = [
    "WEFT_INBOUND",
    "WEFT_IN_REDIRECT",
    "WEFT_OUTPUT",
    "WEFT_REDIRECT",
];
/// The jumps from the built-in chains into ours.
const JUMPS: [(&str, &str); 2] = [("PREROUTING", "WEFT_INBOUND"), ("OUTPUT", "WEFT_OUTPUT")];

/// What `weft init` is asked to install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub outbound_port: u16,
    pub inbound_port: u16,
    /// The workload's ports redirected inbound; `None`: every port (`*`).
    pub inbound_ports: Option<Vec<u16>>,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    /// Destinations (CIDRs) reached directly, not through the sidecar.
    pub exclude_outbound_cidrs: Vec<Cidr>,
}

/// An IP network, `10.0.0.0/8` or `fd00::/8` (a bare IP is one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub ip: IpAddr,
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("{s:?}: expected an IP or a CIDR (10.0.0.0/8, fd00::/8)"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max && !p.starts_with('+') && (p == "0" || !p.starts_with('0')) => n,
                _ => return Err(format!("{s:?}: prefix length must be 0..={max}")),
            },
        };
        Ok(Cidr { ip, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

/// A comma-separated list of ports (`15020,22`); empty: none.
pub fn parse_ports(s: &str) -> Result<Vec<u16>, String> {
    let mut out = Vec::new();
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match p.parse::<u16>() {
            Ok(n) if n > 0 && !p.starts_with('+') => out.push(n),
            _ => return Err(format!("{p:?} is not a port (1..=65535)")),
        }
    }
    Ok(out)
}

/// IPv4 or IPv6 rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }
    fn save(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }
}

impl Plan {
    pub fn check(&self) -> Result<(), String> {
        if self.outbound_port == self.inbound_port {
            return Err("the outbound and inbound capture ports must differ".into());
        }
        if let Some(ports) = &self.inbound_ports {
            for p in ports {
                if *p == self.outbound_port || *p == self.inbound_port {
                    return Err(format!("inbound port {p} is a capture port"));
                }
            }
        }
        Ok(())
    }

    /// The rules of one family, as lines of an `iptables-restore --noflush` script: our chains
    /// (declaring a chain creates or empties it) and their rules; the jumps into them come
    /// from [`script`], which adds only the missing ones.
    fn rules(&self, family: Family) -> Vec<String> {
        let mut r = Vec::new();
        // Inbound: never the capture ports themselves.
        for p in [self.inbound_port, self.outbound_port]
            .iter()
            .chain(&self.exclude_inbound_ports)
        {
            r.push(format!("-A WEFT_INBOUND -p tcp --dport {p} -j RETURN"));
        }
        match &self.inbound_ports {
            Some(ports) => {
                for p in ports {
                    r.push(format!(
                        "-A WEFT_INBOUND -p tcp --dport {p} -j WEFT_IN_REDIRECT"
                    ));
                }
            }
            None => r.push("-A WEFT_INBOUND -p tcp -j WEFT_IN_REDIRECT".into()),
        }
        r.push(format!(
            "-A WEFT_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}",
            self.inbound_port
        ));
        // Outbound: the proxy's own connections (to upstreams, to the control plane, passed
        // through) leave as they are: no loop.
        r.push(format!(
            "-A WEFT_OUTPUT -m owner --uid-owner {} -j RETURN",
            self.proxy_uid
        ));
        r.push(format!(
            "-A WEFT_OUTPUT -m owner --gid-owner {} -j RETURN",
            self.proxy_gid
        ));
        r.push(format!("-A WEFT_OUTPUT -d {} -j RETURN", family.loopback()));
        for c in &self.exclude_outbound_cidrs {
            if (family == Family::V4) == c.ip.is_ipv4() {
                r.push(format!("-A WEFT_OUTPUT -d {c} -j RETURN"));
            }
        }
        for p in &self.exclude_outbound_ports {
            r.push(format!("-A WEFT_OUTPUT -p tcp --dport {p} -j RETURN"));
        }
        r.push("-A WEFT_OUTPUT -p tcp -j WEFT_REDIRECT".into());
        r.push(format!(
            "-A WEFT_REDIRECT -p tcp -j REDIRECT --to-ports {}",
            self.outbound_port
        ));
        r
    }
}

/// Which of our chains and jumps the nat table has, from `iptables-save -t nat`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Present {
    pub chains: Vec<String>,
    pub jumps: Vec<(String, String)>,
    /// Every rule line of ours (`-A WEFT_…`, and the jumps), for `--dry-run --cleanup`.
    pub lines: usize,
}

pub fn present(saved: &str) -> Present {
    let mut p = Present::default();
    for line in saved.lines() {
        if let Some(chain) = line.strip_prefix(':') {
            let name = chain.split_whitespace().next().unwrap_or_default();
            if CHAINS.contains(&name) {
                p.chains.push(name.to_owned());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            for (from, to) in JUMPS {
                if rule == format!("{from} -p tcp -j {to}") {
                    p.jumps.push((from.to_owned(), to.to_owned()));
                    p.lines += 1;
                }
            }
            if rule.starts_with("WEFT_") {
                p.lines += 1;
            }
        }
    }
    p
}

/// The `iptables-restore --noflush` script that installs `plan` over what is `present`.
pub fn script(plan: &Plan, family: Family, present: &Present) -> String {
    let mut s = String::from("*nat\n");
    for c in CHAINS {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    for line in plan.rules(family) {
        let _ = writeln!(s, "{line}");
    }
    for (from, to) in JUMPS {
        let n = present
            .jumps
            .iter()
            .filter(|(f, t)| f == from && t == to)
            .count();
        // Exactly one jump each: a missing one added, extra ones (a crash between two runs of
        // an older tool) removed.
        if n == 0 {
            let _ = writeln!(s, "-A {from} -p tcp -j {to}");
        }
        for _ in 1..n.max(1) {
            let _ = writeln!(s, "-D {from} -p tcp -j {to}");
        }
    }
    s.push_str("COMMIT\n");
    s
}

/// The script that removes every rule and chain of ours that is `present`.
pub fn cleanup_script(present: &Present) -> String {
    let mut s = String::from("*nat\n");
    for (from, to) in &present.jumps {
        let _ = writeln!(s, "-D {from} -p tcp -j {to}");
    }
    for c in &present.chains {
        let _ = writeln!(s, "-F {c}");
    }
    for c in &present.chains {
        let _ = writeln!(s, "-X {c}");
    }
    s.push_str("COMMIT\n");
    s
}

fn saved(family: Family) -> Result<String, String> {
    let out = Command::new(family.save())
        .args(["-t", "nat"])
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("{}: {e} (is iptables installed?)", family.save()))?;
    if !out.status.success() {
        return Err(format!(
            "{} -t nat: {}",
            family.save(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn restore(family: Family, script: &str) -> Result<(), String> {
    let mut child = Command::new(family.restore())
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e} (is iptables installed?)", family.restore()))?;
    child
        .stdin
        .take()
        .ok_or("no stdin")?
        .write_all(script.as_bytes())
        .map_err(|e| format!("{}: {e}", family.restore()))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{}: {e}", family.restore()))?;
    if !out.status.success() {
        return Err(format!(
            "{} refused the rules (nothing changed): {}",
            family.restore(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Whether this namespace has IPv6 (a kernel or namespace without it gets IPv4 rules only).
pub fn ipv6_present() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
        && std::fs::read_to_string("/proc/net/if_inet6").is_ok_and(|s| !s.trim().is_empty())
}

/// What `weft init` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Install,
    Cleanup,
}

/// Installs or removes the rules (or, with `dry_run`, prints what it would run).
pub fn run(
    plan: &Plan,
    action: Action,
    families: &[Family],
    dry_run: bool,
    out: &mut dyn std::io::Write,
) -> Result<(), String> {
    plan.check()?;
    for &family in families {
        // A dry run on a machine without iptables still shows the rules.
        let now = match saved(family) {
            Ok(s) => present(&s),
            Err(e) if dry_run => {
                let _ = writeln!(out, "# {e}: showing the rules as if none were installed");
                Present::default()
            }
            Err(e) => return Err(e),
        };
        let text = match action {
            Action::Install => script(plan, family, &now),
            Action::Cleanup => cleanup_script(&now),
        };
        if dry_run {
            let _ = writeln!(out, "# {} --noflush <<EOF", family.restore());
            let _ = write!(out, "{text}");
            let _ = writeln!(out, "# EOF");
            continue;
        }
        if action == Action::Cleanup && now.chains.is_empty() && now.jumps.is_empty() {
            continue;
        }
        restore(family, &text)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            proxy_uid: 1337,
            proxy_gid: 1337,
            outbound_port: 15001,
            inbound_port: 15006,
            inbound_ports: Some(vec![8080, 9090]),
            exclude_inbound_ports: vec![22],
            exclude_outbound_ports: vec![53],
            exclude_outbound_cidrs: vec![
                "10.0.0.0/8".parse().expect("cidr"),
                "fd00::/8".parse().expect("cidr"),
            ],
        }
    }

    #[test]
    fn rules_exempt_the_proxy_loopback_and_exclusions() {
        let s = script(&plan(), Family::V4, &Present::default());
        for line in [
            "-A WEFT_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "-A WEFT_OUTPUT -m owner --gid-owner 1337 -j RETURN",
            "-A WEFT_OUTPUT -d 127.0.0.0/8 -j RETURN",
            "-A WEFT_OUTPUT -d 10.0.0.0/8 -j RETURN",
            "-A WEFT_OUTPUT -p tcp --dport 53 -j RETURN",
            "-A WEFT_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "-A WEFT_INBOUND -p tcp --dport 15006 -j RETURN",
            "-A WEFT_INBOUND -p tcp --dport 22 -j RETURN",
            "-A WEFT_INBOUND -p tcp --dport 8080 -j WEFT_IN_REDIRECT",
            "-A WEFT_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "-A PREROUTING -p tcp -j WEFT_INBOUND",
            "-A OUTPUT -p tcp -j WEFT_OUTPUT",
        ] {
            assert!(s.lines().any(|l| l == line), "missing {line}:\n{s}");
        }
        assert!(!s.contains("fd00::"), "an IPv6 CIDR in IPv4 rules:\n{s}");
        // The exemptions come before the redirect.
        let at = |l: &str| s.find(l).expect("rule");
        assert!(at("--uid-owner") < at("-j WEFT_REDIRECT"));
        let v6 = script(&plan(), Family::V6, &Present::default());
        assert!(v6.contains("-A WEFT_OUTPUT -d ::1/128 -j RETURN"));
        assert!(v6.contains("-A WEFT_OUTPUT -d fd00::/8 -j RETURN"));
        assert!(!v6.contains("10.0.0.0"));
    }

    #[test]
    fn installing_again_adds_no_second_jump_and_removes_extra_ones() {
        let saved = "*nat\n:PREROUTING ACCEPT [0:0]\n:WEFT_INBOUND - [0:0]\n:WEFT_OUTPUT - [0:0]\n\
                     -A PREROUTING -p tcp -j WEFT_INBOUND\n-A OUTPUT -p tcp -j WEFT_OUTPUT\n\
                     -A OUTPUT -p tcp -j WEFT_OUTPUT\n-A WEFT_OUTPUT -j RETURN\nCOMMIT\n";
        let now = present(saved);
        assert_eq!(now.chains, ["WEFT_INBOUND", "WEFT_OUTPUT"]);
        assert_eq!(now.jumps.len(), 3);
        let s = script(&plan(), Family::V4, &now);
        assert!(!s.contains("-A PREROUTING"), "{s}");
        assert!(!s.contains("-A OUTPUT"), "{s}");
        assert_eq!(
            s.matches("-D OUTPUT -p tcp -j WEFT_OUTPUT").count(),
            1,
            "{s}"
        );
        let c = cleanup_script(&now);
        assert_eq!(c.matches("-D OUTPUT").count(), 2);
        assert!(c.contains("-X WEFT_INBOUND") && c.contains("-X WEFT_OUTPUT"));
        // Someone else's rules are not ours.
        let other = present("-A OUTPUT -p tcp -j ISTIO_OUTPUT\n:ISTIO_OUTPUT - [0:0]\n");
        assert_eq!(other, Present::default());
    }

    #[test]
    fn every_port_unless_listed() {
        let mut p = plan();
        p.inbound_ports = None;
        let s = script(&p, Family::V4, &Present::default());
        assert!(s.contains("-A WEFT_INBOUND -p tcp -j WEFT_IN_REDIRECT"));
        // Exclusions still come first.
        assert!(
            s.find("--dport 22 -j RETURN").expect("rule")
                < s.find("-p tcp -j WEFT_IN_REDIRECT").expect("rule")
        );
    }

    #[test]
    fn hostile_arguments_are_refused() {
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0.0/-1",
            "10.0.0.0/+8",
            "::/129",
            "10.0.0/8",
            "x",
            "10.0.0.0/08",
            "1.2.3.4/8/8",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?}");
        }
        assert_eq!("10.1.2.3".parse::<Cidr>().expect("cidr").prefix, 32);
        for bad in ["0", "65536", "-1", "+80", "80x", "8080;rm"] {
            assert!(parse_ports(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_ports("80, 443,").expect("ports"), [80, 443]);
        let mut p = plan();
        p.inbound_ports = Some(vec![15001]);
        assert!(p.check().is_err());
        p.inbound_port = 15001;
        assert!(p.check().is_err());
    }
}
