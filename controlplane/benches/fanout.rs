//! Fan-out: N simulated proxies (streams in this process, each ACKing what it gets) subscribed
//! to one weft-cp process; time from `apply` to the last ACK, and weft-cp's memory.
//!
//! `cargo bench -p weft-controlplane --bench fanout` (bench/controlplane.sh builds weft-cp first).
//! PROXIES=1000 ROUNDS=5 by default.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use weft_wire::v1::{self, control_client::ControlClient, distribution_client::DistributionClient};

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

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::var("PROXIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let rounds: u64 = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let bin = std::env::var("WEFT_CP_BIN").unwrap_or_else(|_| "target/release/weft-cp".into());
    let mut child = Command::new(&bin)
        // Distribution is measured, not enrollment: the plaintext link.
        .args([
            "--listen",
            "127.0.0.1:0",
            "--store",
            "memory",
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
    let url = format!("http://{addr}");
    let pid = child.id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async move {
        let idle = rss_kb(pid);
        // One HTTP/2 connection carries many streams, as many proxies behind a few hosts would;
        // 10 connections of 100 streams each.
        let acks = Arc::new(AtomicU64::new(0));
        let mut channels = Vec::new();
        for _ in 0..10 {
            channels.push(
                tonic::transport::Endpoint::from_shared(url.clone())?
                    .connect()
                    .await?,
            );
        }
        for i in 0..n {
            let mut client = DistributionClient::new(channels[i % channels.len()].clone());
            let acks = acks.clone();
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
                    let Some(v1::push::Kind::Snapshot(snap)) = push.kind else {
                        continue;
                    };
                    let ack = v1::ProxyMessage {
                        kind: Some(v1::proxy_message::Kind::Ack(v1::Ack {
                            version: snap.version,
                        })),
                    };
                    if tx.send(ack).await.is_err() {
                        break;
                    }
                    acks.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let mut control = ControlClient::new(channels[0].clone());
        // Wait until every stream is registered.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let st = control.status(v1::StatusRequest {}).await?.into_inner();
            if st.proxies.iter().filter(|p| p.connected).count() == n {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "not every stream connected");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let connected = rss_kb(pid);
        let mut times = Vec::new();
        for r in 0..rounds {
            let yaml = format!(
                "kind: cluster\nspec: {{ name: c, endpoints: [\"127.0.0.1:{}\"] }}\n",
                9000 + r
            );
            let started = Instant::now();
            let change = control.apply(v1::ApplyRequest { yaml }).await?.into_inner();
            let mut progress = control
                .rollout(v1::RolloutRequest {
                    version: change.version,
                    timeout_ms: 30_000,
                })
                .await?
                .into_inner();
            let mut last = None;
            while let Some(p) = progress.message().await? {
                let done = p.done;
                last = Some(p);
                if done {
                    break;
                }
            }
            let took = started.elapsed();
            let p = last.ok_or_else(|| anyhow::anyhow!("no progress"))?;
            anyhow::ensure!(p.acked as usize == n, "only {} of {n} ACKed", p.acked);
            times.push(took);
        }
        let loaded = rss_kb(pid);
        times.sort();
        anyhow::Ok((idle, connected, loaded, times))
    });
    let _ = child.kill();
    let _ = child.wait();
    let (idle, connected, loaded, times) = result?;
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    println!("weft-cp fan-out: {n} simulated proxies, {rounds} applies");
    println!(
        "apply → last ACK: median {:.1} ms, max {:.1} ms (target: all {n} in < 1000 ms)",
        ms(&times[times.len() / 2]),
        ms(&times[times.len() - 1])
    );
    println!(
        "weft-cp RSS: idle {} MiB, with {n} streams {} MiB, after the applies {} MiB",
        idle / 1024,
        connected / 1024,
        loaded / 1024
    );
    Ok(())
}
