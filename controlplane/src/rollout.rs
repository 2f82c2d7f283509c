//! Staged rollouts of a filter's new revision: the plan (steps, step time, limits), where a
//! rollout stands (stored with every version, so it survives a restart), which proxies run the
//! new revision (a stable subset by node hash, growing step by step), and the judgement of each
//! step from the figures the proxies report (see `weft_proxy::wasm::figures`).
//!
//! A version of the mesh's state is its resources and its rollouts: what a proxy serves is the
//! resources that select it, with the new revision of each rollout it is a canary of.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use weft_proxy::config::{Config, Filter};
use weft_proxy::wasm::figures::{Totals, quantile_us};

/// Rollouts by filter name.
pub type Rollouts = BTreeMap<String, Rollout>;

/// Decisions kept per rollout (the oldest go first).
const MAX_DECISIONS: usize = 50;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Percentages of the selected proxies, increasing, ending at 100.
    pub steps: Vec<u32>,
    pub step_time_ms: u64,
    /// Most the new revision's error rate may exceed the old one's (a fraction).
    pub max_error_rate: f64,
    pub max_p99_increase_us: u64,
    /// Requests the new revision must serve in a step before it is judged.
    pub min_requests: u64,
}

impl Plan {
    /// Every way the plan is wrong.
    pub fn check(&self) -> Result<(), String> {
        if self.steps.is_empty() {
            return Err("steps: at least one step (ending at 100)".into());
        }
        if self.steps.iter().any(|s| !(1..=100).contains(s)) {
            return Err(format!(
                "steps: {:?}: each is a percentage, 1 to 100",
                self.steps
            ));
        }
        if self.steps.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!("steps: {:?}: must increase", self.steps));
        }
        if self.steps.last() != Some(&100) {
            return Err(format!("steps: {:?}: the last step is 100", self.steps));
        }
        if self.steps.len() > 20 {
            return Err("steps: at most 20".into());
        }
        if !(1_000..=7 * 24 * 3600 * 1000).contains(&self.step_time_ms) {
            return Err("step time: 1 s to 7 days".into());
        }
        if !(0.0..=1.0).contains(&self.max_error_rate) || self.max_error_rate.is_nan() {
            return Err("max error rate: 0 % to 100 %".into());
        }
        if self.min_requests == 0 || self.min_requests > 1_000_000_000 {
            return Err("min requests: 1 to 1000000000".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Running,
    Paused,
    Completed,
    RolledBack,
    Aborted,
}

impl Phase {
    /// Running or paused: proxies of the cohort serve the new revision.
    pub fn active(self) -> bool {
        matches!(self, Phase::Running | Phase::Paused)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Running => "running",
            Phase::Paused => "paused",
            Phase::Completed => "completed",
            Phase::RolledBack => "rolled_back",
            Phase::Aborted => "aborted",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Unix milliseconds.
    pub at_ms: u64,
    pub text: String,
}

/// The old revision's figures at the end of the last step it had traffic in: what the new one
/// is held to when no proxy runs the old one any more (the 100 % step).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    pub error_rate: f64,
    pub p99_us: Option<f64>,
}

/// One cohort's figures over a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CohortSummary {
    /// `new` or `old`.
    pub cohort: String,
    pub revision: String,
    pub proxies: u32,
    pub requests: u64,
    pub errors: u64,
    pub failed: u64,
    pub skipped: u64,
    pub local_5xx: u64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
}

impl CohortSummary {
    pub fn of(cohort: &str, revision: &str, proxies: u32, t: &Totals) -> CohortSummary {
        CohortSummary {
            cohort: cohort.into(),
            revision: revision.into(),
            proxies,
            requests: t.requests,
            errors: t.errors,
            failed: t.failed,
            skipped: t.skipped,
            local_5xx: t.local_5xx,
            p50_us: quantile_us(&t.latency, 0.5),
            p99_us: quantile_us(&t.latency, 0.99),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub from: Filter,
    pub to: Filter,
    pub plan: Plan,
    pub phase: Phase,
    /// Index into `plan.steps`.
    pub step: usize,
    /// Nodes on the new revision during this step; at 100 %, every proxy is.
    pub canaries: Vec<String>,
    /// When the current step began (Unix milliseconds).
    pub step_started_ms: u64,
    /// While paused: how long the step had run.
    #[serde(default)]
    pub paused_elapsed_ms: u64,
    #[serde(default)]
    pub baseline: Option<Baseline>,
    pub decisions: Vec<Decision>,
    /// The figures of the step a rollout ended in (completed, rolled back, aborted).
    #[serde(default)]
    pub final_figures: Vec<CohortSummary>,
}

impl Rollout {
    pub fn percent(&self) -> u32 {
        self.plan.steps.get(self.step).copied().unwrap_or(100)
    }

    /// Whether `node` serves the new revision.
    pub fn on_new(&self, node: &str) -> bool {
        self.phase.active() && (self.percent() >= 100 || self.canaries.iter().any(|c| c == node))
    }

    pub fn step_elapsed_ms(&self, now_ms: u64) -> u64 {
        match self.phase {
            Phase::Paused => self.paused_elapsed_ms,
            _ => now_ms.saturating_sub(self.step_started_ms),
        }
    }

    pub fn decide(&mut self, at_ms: u64, text: String) {
        tracing::info!(filter = %self.to.name, phase = self.phase.as_str(), "rollout: {text}");
        self.decisions.push(Decision { at_ms, text });
        let excess = self.decisions.len().saturating_sub(MAX_DECISIONS);
        self.decisions.drain(..excess);
    }
}

/// The new revision of every active rollout `node` is a canary of, in place of the old one.
pub fn apply(config: &mut Config, rollouts: &Rollouts, node: &str) {
    for (name, r) in rollouts.iter().filter(|(_, r)| r.on_new(node)) {
        if let Some(f) = config.filters.iter_mut().find(|f| f.name == *name) {
            *f = r.to.clone();
        }
    }
}

/// The canaries of a step: `percent` of `selected` (at least one), the first by the hash of
/// the filter's name and the node's id — the same nodes at every step, growing.
pub fn cohort(filter: &str, selected: &[String], percent: u32) -> Vec<String> {
    let mut ranked: Vec<(Vec<u8>, &String)> = selected
        .iter()
        .map(|n| {
            let mut h = Sha256::new();
            h.update(filter.as_bytes());
            h.update([0]);
            h.update(n.as_bytes());
            (h.finalize().to_vec(), n)
        })
        .collect();
    ranked.sort();
    let k = (selected.len() * percent as usize).div_ceil(100).max(1);
    ranked
        .into_iter()
        .take(k.min(selected.len()))
        .map(|(_, n)| n.clone())
        .collect()
}

/// What a step's figures say.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Wait(String),
    Advance(String),
    RollBack(String),
}

fn pct(rate: f64) -> String {
    format!("{:.2} %", rate * 100.0)
}

fn ms(us: f64) -> String {
    format!("{:.3} ms", us / 1000.0)
}

/// Judges the current step: `new` and `old` are each cohort's figures since the step began.
pub fn judge(r: &Rollout, new: &Totals, old: &Totals, elapsed_ms: u64) -> Verdict {
    let plan = &r.plan;
    let reference = if old.requests >= plan.min_requests {
        Some(Baseline {
            error_rate: old.error_rate(),
            p99_us: quantile_us(&old.latency, 0.99),
        })
    } else {
        r.baseline
    };
    if new.requests >= plan.min_requests {
        let (err_old, p99_old) = reference.map_or((0.0, None), |b| (b.error_rate, b.p99_us));
        let err_new = new.error_rate();
        if err_new - err_old > plan.max_error_rate {
            return Verdict::RollBack(format!(
                "error rate {} on the new revision ({} of {} requests: {} failed, {} skipped, {} local 5xx) vs {} on the old, limit +{}",
                pct(err_new),
                new.errors,
                new.requests,
                new.failed,
                new.skipped,
                new.local_5xx,
                pct(err_old),
                pct(plan.max_error_rate)
            ));
        }
        if let (Some(p99_new), Some(p99_old)) = (quantile_us(&new.latency, 0.99), p99_old)
            && p99_new - p99_old > plan.max_p99_increase_us as f64
        {
            return Verdict::RollBack(format!(
                "p99 in the filter {} on the new revision vs {} on the old, limit +{}",
                ms(p99_new),
                ms(p99_old),
                ms(plan.max_p99_increase_us as f64)
            ));
        }
    }
    if elapsed_ms < plan.step_time_ms {
        return Verdict::Wait(format!(
            "step {} of {} ({} %) running: {} s of {} s",
            r.step + 1,
            plan.steps.len(),
            r.percent(),
            elapsed_ms / 1000,
            plan.step_time_ms / 1000
        ));
    }
    if new.requests < plan.min_requests {
        return Verdict::Wait(format!(
            "waiting for traffic: the new revision served {} of the {} requests a step needs",
            new.requests, plan.min_requests
        ));
    }
    Verdict::Advance(format!(
        "step {} ({} %) passed: new revision {} errors, p99 {} over {} requests; old {} errors, p99 {}",
        r.step + 1,
        r.percent(),
        pct(new.error_rate()),
        quantile_us(&new.latency, 0.99).map_or("-".into(), ms),
        new.requests,
        reference.map_or("-".into(), |b| pct(b.error_rate)),
        reference.and_then(|b| b.p99_us).map_or("-".into(), ms),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use weft_proxy::wasm::figures::{Figures, Outcome};

    fn filter(config: &str) -> Filter {
        serde_json::from_value(serde_json::json!({
            "name": "f", "module": format!("sha256:{}", "ab".repeat(32)), "config": config
        }))
        .expect("filter")
    }

    fn rollout(steps: Vec<u32>) -> Rollout {
        Rollout {
            from: filter("v1"),
            to: filter("v2"),
            plan: Plan {
                steps,
                step_time_ms: 10_000,
                max_error_rate: 0.01,
                max_p99_increase_us: 5_000,
                min_requests: 10,
            },
            phase: Phase::Running,
            step: 0,
            canaries: vec!["a".into()],
            step_started_ms: 0,
            paused_elapsed_ms: 0,
            baseline: None,
            decisions: Vec::new(),
            final_figures: Vec::new(),
        }
    }

    fn totals(n: u64, errors: u64, time: Duration) -> Totals {
        let f = Figures::default();
        for i in 0..n {
            f.record(
                time,
                Outcome {
                    failed: i < errors,
                    ..Outcome::default()
                },
            );
        }
        f.totals()
    }

    #[test]
    fn plans_are_checked() {
        let mut r = rollout(vec![5, 25, 100]);
        r.plan.check().expect("valid");
        for bad in [
            vec![],
            vec![50],
            vec![5, 5, 100],
            vec![0, 100],
            vec![50, 101],
        ] {
            r.plan.steps = bad.clone();
            assert!(r.plan.check().is_err(), "{bad:?}");
        }
        r.plan.steps = vec![100];
        r.plan.step_time_ms = 10;
        assert!(r.plan.check().is_err());
    }

    #[test]
    fn cohorts_are_stable_and_grow() {
        let nodes: Vec<String> = (0..20).map(|i| format!("node-{i}")).collect();
        let five = cohort("authz", &nodes, 5);
        let half = cohort("authz", &nodes, 50);
        assert_eq!(five.len(), 1);
        assert_eq!(half.len(), 10);
        assert!(five.iter().all(|n| half.contains(n)), "steps grow");
        assert_eq!(cohort("authz", &nodes, 5), five, "stable");
        assert_eq!(cohort("authz", &nodes[..3], 5).len(), 1, "at least one");
        assert_eq!(cohort("authz", &nodes[..3], 100).len(), 3);
        // Another filter picks its own canaries.
        assert_ne!(cohort("quota", &nodes, 25), cohort("authz", &nodes, 25));
    }

    #[test]
    fn a_step_rolls_back_on_errors_or_latency_and_advances_when_its_time_passes() {
        let r = rollout(vec![5, 100]);
        let fast = Duration::from_micros(50);
        let old = totals(100, 0, fast);
        // Too few requests to judge.
        assert!(matches!(
            judge(&r, &totals(5, 5, fast), &old, 1_000),
            Verdict::Wait(_)
        ));
        // A third of requests failing.
        let v = judge(&r, &totals(30, 10, fast), &old, 1_000);
        assert!(
            matches!(&v, Verdict::RollBack(why) if why.contains("33.33 %")),
            "{v:?}"
        );
        // Slower by 10 ms.
        let v = judge(&r, &totals(30, 0, Duration::from_millis(10)), &old, 1_000);
        assert!(
            matches!(&v, Verdict::RollBack(why) if why.contains("p99")),
            "{v:?}"
        );
        // Within limits: waits for the step's time, then advances.
        let good = totals(30, 0, fast);
        assert!(matches!(judge(&r, &good, &old, 1_000), Verdict::Wait(_)));
        assert!(matches!(
            judge(&r, &good, &old, 10_000),
            Verdict::Advance(_)
        ));
        // Time is up but no traffic: it waits.
        assert!(matches!(
            judge(&r, &totals(3, 0, fast), &old, 20_000),
            Verdict::Wait(w) if w.contains("waiting for traffic")
        ));
        // At 100 % the old revision has no traffic: the baseline of the step before counts.
        let mut last = rollout(vec![5, 100]);
        last.step = 1;
        last.baseline = Some(Baseline {
            error_rate: 0.0,
            p99_us: Some(50.0),
        });
        let v = judge(&last, &totals(30, 3, fast), &Totals::default(), 1_000);
        assert!(matches!(v, Verdict::RollBack(_)), "{v:?}");
    }

    #[test]
    fn canaries_get_the_new_revision() {
        let r = rollout(vec![5, 100]);
        let mut rollouts = Rollouts::new();
        rollouts.insert("f".into(), r.clone());
        let config = Config {
            filters: vec![filter("v1")],
            ..Config::default()
        };
        let mut on_a = config.clone();
        apply(&mut on_a, &rollouts, "a");
        assert_eq!(on_a.filters[0], r.to);
        let mut on_b = config.clone();
        apply(&mut on_b, &rollouts, "b");
        assert_eq!(on_b.filters[0], r.from);
        rollouts.get_mut("f").expect("rollout").phase = Phase::RolledBack;
        let mut back = config.clone();
        apply(&mut back, &rollouts, "a");
        assert_eq!(back.filters[0], r.from);
    }
}
