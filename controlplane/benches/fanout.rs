//! Fan-out: N simulated proxies (streams in this process, each ACKing what it gets) spread over
//! R weft-cp replicas on one etcd (or one replica on the memory store): time from an apply on
//! replica 1 to the last proxy's ACK (wherever it is connected), bytes of a whole snapshot vs an
//! incremental one, and each replica's memory.
//!
//! `bench/controlplane.sh` builds weft-cp and runs this. PROXIES=10000 REPLICAS=2 ROUNDS=5
//! CLUSTERS=200 STORE=etcd (or memory, with one replica) by default.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weft_wire::v1::{self, control_client::ControlClient, distribution_client::DistributionClient};

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Kills what it holds when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_etcd(dir: &std::path::Path) -> anyhow::Result<(Killed, SocketAddr)> {
    let (client, peer) = (free_port()?, free_port()?);
    let c = format!("http://{client}");
    let p = format!("http://{peer}");
    let child = Command::new("etcd")
        .args(["--name", "bench", "--data-dir"])
        .arg(dir.join("etcd"))
        .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
        .args([
            "--listen-peer-urls",
            &p,
            "--initial-advertise-peer-urls",
            &p,
        ])
        .args(["--initial-cluster", &format!("bench={p}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("etcd: {e} (Debian's etcd-server)"))?;
    let child = Killed(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(client) {
            use std::io::{Read, Write};
            let _ = write!(s, "GET /health HTTP/1.0\r\n\r\n");
            let mut body = String::new();
            let _ = s.read_to_string(&mut body);
            if body.contains("\"true\"") {
                return Ok((child, client));
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "etcd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_cp(bin: &str, store: &str) -> anyhow::Result<(Killed, String)> {
    let mut child = Command::new(bin)
        // Distribution is measured, not enrollment: the plaintext link.
        .args([
            "--listen",
            "127.0.0.1:0",
            "--store",
            store,
            "--insecure-plaintext",
        ])
        .env("RUST_LOG", "warn,weft_cp=info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!("{bin}: {e} (build it: cargo build --release -p weft-controlplane)")
        })?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("stderr"))?;
    let child = Killed(child);
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .ok_or_else(|| anyhow::anyhow!("weft-cp exited"))??;
        if let Some(a) = line.split("addr=").nth(1) {
            break a.split_whitespace().next().unwrap_or("").to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Ok((child, format!("http://{addr}")))
}

/// What the simulated proxies saw.
#[derive(Default)]
struct Seen {
    /// ACKs by version.
    acks: Mutex<HashMap<u64, usize>>,
    whole: AtomicU64,
    whole_bytes: AtomicU64,
    incremental: AtomicU64,
    incremental_bytes: AtomicU64,
}

fn mesh(clusters: usize, round: u64) -> String {
    let mut yaml = String::from(
        "kind: routes\nspec: { name: main, routes: [ { to: [ { cluster: c0 } ] } ] }\n---\n\
         kind: listener\nspec: { name: main, address: \"127.0.0.1:0\", routes: main }\n",
    );
    for i in 0..clusters {
        yaml.push_str(&format!(
            "---\nkind: cluster\nspec: {{ name: c{i}, endpoints: [\"10.0.{}.{}:8080\", \"10.1.{}.{}:8080\"] }}\n",
            i / 250,
            i % 250 + 1,
            i / 250,
            (i + round as usize) % 250 + 1
        ));
    }
    yaml
}

fn main() -> anyhow::Result<()> {
    let n: usize = env("PROXIES", 10_000);
    let replicas: usize = env("REPLICAS", 2);
    let rounds: u64 = env("ROUNDS", 5);
    let clusters: usize = env("CLUSTERS", 200);
    let store_kind: String = env("STORE", "etcd".to_owned());
    let bin = std::env::var("WEFT_CP_BIN").unwrap_or_else(|_| "target/release/weft-cp".into());
    let dir = tempfile::tempdir()?;
    let (_etcd, store) = if store_kind == "etcd" {
        let (etcd, addr) = start_etcd(dir.path())?;
        (Some(etcd), format!("etcd://{addr}"))
    } else {
        anyhow::ensure!(
            replicas == 1,
            "replicas share state only on etcd (STORE=etcd)"
        );
        (None, "memory".to_owned())
    };
    let mut cps = Vec::new();
    for _ in 0..replicas {
        cps.push(start_cp(&bin, &store)?);
    }
    let pids: Vec<u32> = cps.iter().map(|(c, _)| c.0.id()).collect();
    let urls: Vec<String> = cps.iter().map(|(_, u)| u.clone()).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async move {
        let idle: Vec<u64> = pids.iter().map(|p| rss_kb(*p)).collect();
        let mut control = ControlClient::new(
            tonic::transport::Endpoint::from_shared(urls[0].clone())?
                .connect()
                .await?,
        )
        .max_decoding_message_size(weft_wire::MAX_MESSAGE)
        .max_encoding_message_size(weft_wire::MAX_MESSAGE);
        // The mesh before the proxies come: each gets it whole at its first snapshot.
        let first = control
            .apply(v1::ApplyRequest {
                yaml: mesh(clusters, 0),
            })
            .await?
            .into_inner()
            .version;
        // One HTTP/2 connection carries 100 streams, as many proxies behind a few hosts would;
        // the connections alternate between the replicas.
        let seen = Arc::new(Seen::default());
        let mut channels = Vec::new();
        for i in 0..n.div_ceil(100) {
            channels.push(
                tonic::transport::Endpoint::from_shared(urls[i % urls.len()].clone())?
                    .connect()
                    .await?,
            );
        }
        for i in 0..n {
            let mut client = DistributionClient::new(channels[i / 100].clone())
                .max_decoding_message_size(weft_wire::MAX_MESSAGE);
            let seen = seen.clone();
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(v1::ProxyMessage {
                kind: Some(v1::proxy_message::Kind::Hello(v1::Hello {
                    node_id: format!("sim-{i}"),
                    labels: [("app".to_owned(), "sim".to_owned())].into(),
                    proxy_version: "bench".into(),
                    ..Default::default()
                })),
            })
            .await?;
            tokio::spawn(async move {
                let Ok(resp) = client
                    .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                else {
                    return;
                };
                let mut s = resp.into_inner();
                while let Ok(Some(push)) = s.message().await {
                    let Some(v1::push::Kind::Snapshot(mut snap)) = push.kind else {
                        continue;
                    };
                    for _ in 0..snap.parts {
                        if let Ok(Some(v1::Push {
                            kind: Some(v1::push::Kind::Part(p)),
                        })) = s.message().await
                        {
                            snap.config_json.extend_from_slice(&p.data);
                        }
                    }
                    if snap.base_version == 0 {
                        seen.whole.fetch_add(1, Ordering::Relaxed);
                        seen.whole_bytes
                            .fetch_add(snap.config_json.len() as u64, Ordering::Relaxed);
                    } else {
                        seen.incremental.fetch_add(1, Ordering::Relaxed);
                        seen.incremental_bytes.fetch_add(
                            weft_proxy::control::delta::size(&snap.changes, &snap.orders) as u64,
                            Ordering::Relaxed,
                        );
                    }
                    let ack = v1::ProxyMessage {
                        kind: Some(v1::proxy_message::Kind::Ack(v1::Ack {
                            version: snap.version,
                        })),
                    };
                    if tx.send(ack).await.is_err() {
                        break;
                    }
                    *seen
                        .acks
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(snap.version)
                        .or_default() += 1;
                }
            });
        }
        let acked = |v: u64| {
            seen.acks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&v)
                .copied()
                .unwrap_or(0)
        };
        let started = Instant::now();
        while acked(first) < n {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(120),
                "only {} of {n} proxies got the first snapshot",
                acked(first)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let connect_all = started.elapsed();
        let connected: Vec<u64> = pids.iter().map(|p| rss_kb(*p)).collect();
        let mut times = Vec::new();
        for r in 1..=rounds {
            // One cluster's endpoint moves.
            let yaml = format!(
                "kind: cluster\nspec: {{ name: c{}, endpoints: [\"10.9.0.{}:8080\"] }}\n",
                r as usize % clusters,
                r % 250 + 1
            );
            let started = Instant::now();
            let version = control
                .apply(v1::ApplyRequest { yaml })
                .await?
                .into_inner()
                .version;
            while acked(version) < n {
                anyhow::ensure!(
                    started.elapsed() < Duration::from_secs(60),
                    "only {} of {n} ACKed version {version}",
                    acked(version)
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            times.push(started.elapsed());
        }
        let loaded: Vec<u64> = pids.iter().map(|p| rss_kb(*p)).collect();
        times.sort();
        anyhow::Ok((idle, connected, loaded, times, connect_all, seen))
    });
    drop(cps);
    let (idle, connected, loaded, times, connect_all, seen) = result?;
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let per = |bytes: &AtomicU64, count: &AtomicU64| {
        bytes.load(Ordering::Relaxed) as f64 / count.load(Ordering::Relaxed).max(1) as f64
    };
    let whole = per(&seen.whole_bytes, &seen.whole);
    let incremental = per(&seen.incremental_bytes, &seen.incremental);
    println!(
        "weft-cp fan-out: {n} simulated proxies over {replicas} replica(s) on {store_kind}, \
         {clusters} clusters, {rounds} applies of one cluster each"
    );
    println!(
        "first snapshot to all {n}: {:.0} ms (connect, whole configuration)",
        ms(&connect_all)
    );
    println!(
        "apply on replica 1 → last ACK anywhere: median {:.1} ms, max {:.1} ms (target: all {n} in < 1000 ms; Istio reports p90 1.5-4.5 s)",
        ms(&times[times.len() / 2]),
        ms(&times[times.len() - 1])
    );
    println!(
        "bytes per push: whole {whole:.0}, incremental {incremental:.0} ({:.1} % of whole; {} whole, {} incremental pushes)",
        100.0 * incremental / whole.max(1.0),
        seen.whole.load(Ordering::Relaxed),
        seen.incremental.load(Ordering::Relaxed)
    );
    // For bench/controlplane.sh, which sets this run against a baseline.
    println!(
        "RESULT median_ms={:.1} max_ms={:.1} rss_per_1000_mib={:.1}",
        ms(&times[times.len() / 2]),
        ms(&times[times.len() - 1]),
        connected
            .iter()
            .zip(&idle)
            .map(
                |(b, a)| b.saturating_sub(*a) as f64 / 1024.0 / (n / replicas).max(1) as f64
                    * 1000.0
            )
            .sum::<f64>()
            / replicas as f64
    );
    for (i, ((a, b), c)) in idle.iter().zip(&connected).zip(&loaded).enumerate() {
        let share = (n / replicas).max(1) as f64;
        println!(
            "replica {}: RSS idle {} MiB, with ~{} streams {} MiB ({:.1} MiB per 1,000 proxies), after the applies {} MiB",
            i + 1,
            a / 1024,
            n / replicas,
            b / 1024,
            (b.saturating_sub(*a)) as f64 / 1024.0 / share * 1000.0,
            c / 1024
        );
    }
    Ok(())
}
