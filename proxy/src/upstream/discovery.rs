//! Endpoint discovery: host names among a cluster's endpoints are resolved again every
//! `dns_refresh`, and the endpoint set is replaced when the answer changes. A name that fails to
//! resolve keeps its previous addresses (a DNS hiccup must not empty a cluster).

use std::net::SocketAddr;
use std::time::Duration;

use super::{Cluster, EndpointSpec, resolve};

/// Re-resolves forever (or does nothing, when every endpoint is a literal address).
pub async fn refresh(cluster: &Cluster) {
    if cluster
        .configured
        .iter()
        .all(|e| e.address().parse::<SocketAddr>().is_ok())
    {
        return std::future::pending().await;
    }
    let mut tick = tokio::time::interval(cluster.dns_refresh.max(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let configured = cluster.configured.clone();
        let Ok(answers) = tokio::task::spawn_blocking(move || {
            configured
                .iter()
                .map(|e| (e.address().to_owned(), e.weight(), resolve(e.address())))
                .collect::<Vec<_>>()
        })
        .await
        else {
            continue;
        };
        let current = cluster.endpoints();
        let mut specs: Vec<EndpointSpec> = Vec::new();
        for (text, weight, answer) in answers {
            match answer {
                Ok((addrs, hostname)) => {
                    for address in addrs {
                        specs.push(EndpointSpec {
                            address,
                            hostname: hostname.clone(),
                            weight,
                        });
                    }
                }
                Err(why) => {
                    tracing::warn!(cluster = %cluster.name, endpoint = %text, %why, "DNS refresh failed; keeping the previous addresses");
                    for e in current
                        .endpoints
                        .iter()
                        .filter(|e| e.hostname.as_deref() == Some(text.as_str()))
                    {
                        specs.push(EndpointSpec {
                            address: e.address,
                            hostname: e.hostname.clone(),
                            weight,
                        });
                    }
                }
            }
        }
        specs.dedup_by_key(|s| s.address);
        let unchanged = specs.len() == current.endpoints.len()
            && specs
                .iter()
                .zip(&current.endpoints)
                .all(|(s, e)| s.address == e.address && s.weight == e.weight);
        if !unchanged {
            tracing::info!(
                cluster = %cluster.name,
                endpoints = ?specs.iter().map(|s| s.address).collect::<Vec<_>>(),
                "endpoints changed after DNS refresh"
            );
            cluster.set_endpoints(&specs);
        }
    }
}
