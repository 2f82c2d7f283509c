//! Staged filter rollouts on weft-cp: starting one, pausing, resuming and aborting it, the
//! figures proxies report, and the driver that judges each step and advances it or rolls every
//! proxy back. The rollout itself is part of each stored version (see [`crate::rollout`]); the
//! figures live in memory, so after a restart a step's window starts again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tonic::Status;
use weft_proxy::config::Filter;
use weft_proxy::wasm::figures::{BUCKETS, Totals};
use weft_wire::v1;

use super::ControlPlane;
use crate::resources::{Kind, Resource, Spec};
use crate::rollout::{Baseline, CohortSummary, Phase, Plan, Rollout, Verdict, cohort, judge};

/// How often proxies report while a rollout runs.
pub const REPORT_INTERVAL_MS: u32 = 1000;
/// How often the driver judges running rollouts.
const TICK: Duration = Duration::from_millis(250);
/// Most filters one report may carry; longer names and revisions are dropped.
const MAX_REPORTED: usize = 1024;
const MAX_NAME: usize = 256;

/// What proxies last reported, and where each rollout's current step began counting.
#[derive(Debug, Default)]
pub struct Reports {
    /// Per node: running totals per (filter, revision).
    by_node: HashMap<String, HashMap<(String, String), Totals>>,
    /// Per filter rolled out: the step counted, and each (node, revision)'s totals when the
    /// step began (or when first seen in it).
    windows: HashMap<String, Window>,
}

#[derive(Debug)]
struct Window {
    step: (usize, u64),
    start: HashMap<(String, String), Totals>,
}

/// The figures of a step: the new revision's cohort, then the old one's (with the number of
/// proxies that reported each).
/// A rollout's two cohorts in its current step: figures since the step began, and proxies.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Cohorts {
    pub(super) new: (Totals, u32),
    pub(super) old: (Totals, u32),
}

/// What a replica publishes of a rollout: its own proxies' cohorts in a step.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StepCohorts {
    pub(super) step: (usize, u64),
    pub(super) cohorts: Cohorts,
}

impl Cohorts {
    fn summaries(&self, r: &Rollout) -> Vec<CohortSummary> {
        vec![
            CohortSummary::of("new", &r.to.revision(), self.new.1, &self.new.0),
            CohortSummary::of("old", &r.from.revision(), self.old.1, &self.old.0),
        ]
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl ControlPlane {
    fn reports(&self) -> std::sync::MutexGuard<'_, Reports> {
        self.rollout_figures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// A proxy's report replaces what it said before.
    pub(super) fn record_figures(&self, node: &str, report: v1::FilterReport) {
        let figures = report
            .filters
            .into_iter()
            .filter(|f| f.name.len() <= MAX_NAME && f.revision.len() <= MAX_NAME)
            .take(MAX_REPORTED)
            .map(|f| {
                let mut latency = f.latency;
                latency.truncate(BUCKETS);
                (
                    (f.name, f.revision),
                    Totals {
                        requests: f.requests,
                        errors: f.errors.min(f.requests),
                        failed: f.failed.min(f.requests),
                        skipped: f.skipped.min(f.requests),
                        local_5xx: f.local_5xx.min(f.requests),
                        latency,
                    },
                )
            })
            .collect();
        self.reports().by_node.insert(node.to_owned(), figures);
    }

    /// Each cohort's figures over `r`'s current step.
    /// The cohorts of rollout `name`: this replica's proxies and those of the other replicas
    /// (as they publish them, for the same step).
    fn cohorts(&self, name: &str, r: &Rollout) -> Cohorts {
        let mut c = self.local_cohorts(name, r);
        let step = (r.step, r.step_started_ms);
        let peers = self.peer_cohorts.lock().unwrap_or_else(|e| e.into_inner());
        for published in peers.values() {
            if let Some(p) = published.get(name).filter(|p| p.step == step) {
                c.new.0.add(&p.cohorts.new.0);
                c.new.1 += p.cohorts.new.1;
                c.old.0.add(&p.cohorts.old.0);
                c.old.1 += p.cohorts.old.1;
            }
        }
        c
    }

    /// This replica's share of every active rollout's cohorts (what it publishes).
    pub(super) fn own_cohorts(&self) -> std::collections::BTreeMap<String, StepCohorts> {
        let at = self.lock().store.current().clone();
        at.rollouts
            .iter()
            .filter(|(_, r)| r.phase.active())
            .map(|(name, r)| {
                (
                    name.clone(),
                    StepCohorts {
                        step: (r.step, r.step_started_ms),
                        cohorts: self.local_cohorts(name, r),
                    },
                )
            })
            .collect()
    }

    fn local_cohorts(&self, name: &str, r: &Rollout) -> Cohorts {
        let (to, from) = (r.to.revision(), r.from.revision());
        let mut reports = self.reports();
        let Reports { by_node, windows } = &mut *reports;
        let step = (r.step, r.step_started_ms);
        let window = windows.entry(name.to_owned()).or_insert_with(|| Window {
            step,
            start: HashMap::new(),
        });
        if window.step != step {
            *window = Window {
                step,
                start: HashMap::new(),
            };
        }
        let mut out = Cohorts {
            new: (Totals::default(), 0),
            old: (Totals::default(), 0),
        };
        for (node, figures) in by_node.iter() {
            for (revision, into) in [(&to, &mut out.new), (&from, &mut out.old)] {
                let key = (name.to_owned(), revision.clone());
                let Some(now) = figures.get(&key) else {
                    continue;
                };
                let start = window
                    .start
                    .entry((node.clone(), revision.clone()))
                    .or_insert_with(|| now.clone());
                if now.requests < start.requests {
                    // The proxy restarted: it counts from zero.
                    *start = Totals::default();
                }
                into.0.add(&now.since(start));
                into.1 += 1;
            }
        }
        out
    }

    /// Connected proxies the filter's resource selects, by node id.
    fn selected_nodes(&self, resource: &Resource) -> Vec<String> {
        let mut nodes: Vec<String> = self
            .peer_proxies()
            .into_iter()
            .filter(|p| resource.selects(&p.labels))
            .map(|p| p.node)
            .collect();
        nodes.extend(
            self.lock()
                .proxies
                .iter()
                .filter(|(_, p)| p.connected && resource.selects(&p.labels))
                .map(|(n, _)| n.clone()),
        );
        nodes.sort();
        nodes.dedup();
        nodes
    }

    /// Changes rollout `name` (and the state, when it completes) as one new version.
    fn transition(
        &self,
        name: &str,
        edit: impl Fn(&mut crate::store::State, &mut Rollout, u64) -> Result<String, Status>,
    ) -> Result<v1::ChangeResponse, Status> {
        let _one_at_a_time = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        self.retrying(|| {
            let at = self.lock().store.current().clone();
            let mut rollouts = (*at.rollouts).clone();
            let r = rollouts
                .get_mut(name)
                .ok_or_else(|| Status::not_found(format!("no rollout of filter/{name}")))?;
            let mut state = (*at.state).clone();
            let what = edit(&mut state, r, now_ms())?;
            self.commit(at.number, state, rollouts, what)
        })
    }

    /// Starts a rollout of `to` (a new revision of an existing filter).
    fn start_rollout(&self, to: Filter, plan: Plan) -> Result<(), Status> {
        plan.check().map_err(Status::invalid_argument)?;
        if !to.module.starts_with("sha256:") {
            return Err(Status::invalid_argument(
                "the new filter's module must be a digest (sha256:…) of an uploaded module",
            ));
        }
        let _one_at_a_time = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        self.retrying(|| self.start_rollout_once(&to, &plan))
    }

    fn start_rollout_once(&self, to: &Filter, plan: &Plan) -> Result<(), Status> {
        let (to, plan, name) = (to.clone(), plan.clone(), to.name.clone());
        let at = self.lock().store.current().clone();
        let key = (Kind::Filter, name.clone());
        let resource = at.state.get(&key).ok_or_else(|| {
            Status::not_found(format!(
                "no filter/{name}: a rollout changes a filter that runs (apply it first)"
            ))
        })?;
        let Spec::Filter(from) = &resource.spec else {
            return Err(Status::internal("a filter key holds another kind"));
        };
        if *from == to {
            return Err(Status::invalid_argument(format!(
                "the new filter is filter/{name} as it runs (revision {})",
                from.revision()
            )));
        }
        if let Some(r) = at.rollouts.get(&name).filter(|r| r.phase.active()) {
            return Err(Status::failed_precondition(format!(
                "filter/{name} is already being rolled out (step {} of {}, {}): pause, resume \
                 or abort it",
                r.step + 1,
                r.plan.steps.len(),
                r.phase.as_str()
            )));
        }
        let selected = self.selected_nodes(resource);
        if selected.is_empty() {
            return Err(Status::failed_precondition(format!(
                "no connected proxy runs filter/{name}: nothing to roll out to"
            )));
        }
        // The new revision is validated for every proxy it could reach, as an apply is.
        let mut with_new = (*at.state).clone();
        if let Some(r) = with_new.get_mut(&key) {
            r.spec = Spec::Filter(to.clone());
        }
        self.validate(&with_new)
            .map_err(|e| Status::invalid_argument(e.join("\n")))?;

        let canaries = cohort(&name, &selected, plan.steps[0]);
        let now = now_ms();
        let mut r = Rollout {
            from: from.clone(),
            to,
            plan,
            phase: Phase::Running,
            step: 0,
            canaries,
            step_started_ms: now,
            paused_elapsed_ms: 0,
            baseline: None,
            decisions: Vec::new(),
            final_figures: Vec::new(),
        };
        let what = format!(
            "rollout filter/{name}: step 1 of {} ({} %), {} of {} proxies on revision {} (was {})",
            r.plan.steps.len(),
            r.percent(),
            r.canaries.len(),
            selected.len(),
            r.to.revision(),
            r.from.revision()
        );
        r.decide(now, format!("started: {what}"));
        let mut rollouts = (*at.rollouts).clone();
        rollouts.insert(name, r);
        self.commit(at.number, (*at.state).clone(), rollouts, what)
            .map(|_| ())
    }

    /// Pauses, resumes or aborts rollout `name`.
    fn change_rollout(&self, name: &str, action: &str) -> Result<(), Status> {
        let summaries = self
            .lock()
            .store
            .current()
            .rollouts
            .get(name)
            .map(|r| self.cohorts(name, r).summaries(r));
        self.transition(name, |_, r, now| {
            let refused = |what: &str| {
                Err(Status::failed_precondition(format!(
                    "the rollout of filter/{name} is {}: it cannot be {what}",
                    r.phase.as_str()
                )))
            };
            let what = match action {
                "pause" if r.phase == Phase::Running => {
                    r.paused_elapsed_ms = r.step_elapsed_ms(now);
                    r.phase = Phase::Paused;
                    "paused by an operator".to_owned()
                }
                "pause" => return refused("paused"),
                "resume" if r.phase == Phase::Paused => {
                    r.step_started_ms = now.saturating_sub(r.paused_elapsed_ms);
                    r.phase = Phase::Running;
                    "resumed by an operator".to_owned()
                }
                "resume" => return refused("resumed"),
                "abort" if r.phase.active() => {
                    r.phase = Phase::Aborted;
                    r.canaries.clear();
                    r.final_figures = summaries.clone().unwrap_or_default();
                    format!(
                        "aborted by an operator: every proxy runs revision {} again",
                        r.from.revision()
                    )
                }
                "abort" => return refused("aborted"),
                other => {
                    return Err(Status::invalid_argument(format!(
                        "unknown action {other:?} (pause, resume, abort)"
                    )));
                }
            };
            r.decide(now, what.clone());
            Ok(format!("rollout filter/{name}: {what}"))
        })
        .map(|_| ())
    }

    /// Judges every running rollout once: advances the steps whose time passed within the
    /// limits, rolls back those past a limit.
    pub fn drive_rollouts(&self) {
        let at = self.lock().store.current().clone();
        for (name, r) in at
            .rollouts
            .iter()
            .filter(|(_, r)| r.phase == Phase::Running)
        {
            let c = self.cohorts(name, r);
            let verdict = judge(r, &c.new.0, &c.old.0, r.step_elapsed_ms(now_ms()));
            let (step, started) = (r.step, r.step_started_ms);
            let summaries = c.summaries(r);
            let result = match verdict {
                Verdict::Wait(_) => continue,
                Verdict::RollBack(why) => self.transition(name, |_, r, now| {
                    if r.phase != Phase::Running || (r.step, r.step_started_ms) != (step, started) {
                        return Err(Status::failed_precondition("the rollout moved meanwhile"));
                    }
                    r.phase = Phase::RolledBack;
                    r.canaries.clear();
                    r.final_figures = summaries.clone();
                    r.decide(now, format!("rolled back: {why}"));
                    Ok(format!("rollout filter/{name} rolled back: {why}"))
                }),
                Verdict::Advance(why) => self.transition(name, |state, r, now| {
                    if r.phase != Phase::Running || (r.step, r.step_started_ms) != (step, started) {
                        return Err(Status::failed_precondition("the rollout moved meanwhile"));
                    }
                    if c.old.0.requests >= r.plan.min_requests {
                        r.baseline = Some(Baseline {
                            error_rate: c.old.0.error_rate(),
                            p99_us: weft_proxy::wasm::figures::quantile_us(&c.old.0.latency, 0.99),
                        });
                    }
                    r.decide(now, why.clone());
                    self.next_step(name, state, r, now, summaries.clone())
                }),
            };
            if let Err(e) = result {
                tracing::warn!(filter = %name, "rollout: {}", e.message());
            }
        }
    }

    /// Moves `r` to its next step, or completes it: the filter's resource becomes the new
    /// revision.
    fn next_step(
        &self,
        name: &str,
        state: &mut crate::store::State,
        r: &mut Rollout,
        now: u64,
        summaries: Vec<CohortSummary>,
    ) -> Result<String, Status> {
        let key = (Kind::Filter, name.to_owned());
        if r.step + 1 >= r.plan.steps.len() {
            let resource = state
                .get_mut(&key)
                .ok_or_else(|| Status::internal(format!("filter/{name} is gone")))?;
            resource.spec = Spec::Filter(r.to.clone());
            r.phase = Phase::Completed;
            r.canaries.clear();
            r.final_figures = summaries;
            let what = format!("completed: every proxy runs revision {}", r.to.revision());
            r.decide(now, what.clone());
            return Ok(format!("rollout filter/{name} {what}"));
        }
        r.step += 1;
        r.step_started_ms = now;
        let selected = state
            .get(&key)
            .map(|res| self.selected_nodes(res))
            .unwrap_or_default();
        // Canaries stay canaries: the cohort only grows.
        let mut canaries = cohort(name, &selected, r.percent());
        for c in &r.canaries {
            if !canaries.contains(c) {
                canaries.push(c.clone());
            }
        }
        canaries.sort();
        r.canaries = canaries;
        let what = format!(
            "step {} of {} ({} %): {} of {} proxies on revision {}",
            r.step + 1,
            r.plan.steps.len(),
            r.percent(),
            if r.percent() >= 100 {
                selected.len()
            } else {
                r.canaries.len()
            },
            selected.len(),
            r.to.revision()
        );
        r.decide(now, what.clone());
        Ok(format!("rollout filter/{name}: {what}"))
    }

    /// Where rollout `name` stands, with the current step's figures and judgement.
    fn rollout_status(&self, name: &str) -> Result<v1::FilterRolloutStatus, Status> {
        let at = self.lock().store.current().clone();
        let r = at
            .rollouts
            .get(name)
            .ok_or_else(|| Status::not_found(format!("no rollout of filter/{name}")))?;
        let now = now_ms();
        let mut decisions: Vec<v1::RolloutDecision> = r
            .decisions
            .iter()
            .map(|d| v1::RolloutDecision {
                at_ms: d.at_ms,
                text: d.text.clone(),
            })
            .collect();
        let figures = if r.phase.active() {
            let c = self.cohorts(name, r);
            if r.phase == Phase::Running {
                let text = match judge(r, &c.new.0, &c.old.0, r.step_elapsed_ms(now)) {
                    Verdict::Wait(w) => w,
                    Verdict::Advance(w) => format!("advancing: {w}"),
                    Verdict::RollBack(w) => format!("rolling back: {w}"),
                };
                decisions.push(v1::RolloutDecision { at_ms: now, text });
            }
            c.summaries(r)
        } else {
            r.final_figures.clone()
        };
        let selected = at
            .state
            .get(&(Kind::Filter, name.to_owned()))
            .map_or(0, |res| self.selected_nodes(res).len()) as u32;
        Ok(v1::FilterRolloutStatus {
            name: name.to_owned(),
            phase: r.phase.as_str().into(),
            step: r.step as u32 + 1,
            steps: r.plan.steps.clone(),
            step_time_ms: r.plan.step_time_ms,
            step_elapsed_ms: if r.phase.active() {
                r.step_elapsed_ms(now)
            } else {
                0
            },
            from_revision: r.from.revision(),
            to_revision: r.to.revision(),
            canaries: if r.phase == Phase::Completed || (r.phase.active() && r.percent() >= 100) {
                selected
            } else {
                r.canaries.len() as u32
            },
            selected,
            cohorts: figures
                .into_iter()
                .map(|c| v1::CohortFigures {
                    cohort: c.cohort,
                    revision: c.revision,
                    proxies: c.proxies,
                    requests: c.requests,
                    errors: c.errors,
                    failed: c.failed,
                    skipped: c.skipped,
                    local_5xx: c.local_5xx,
                    p50_us: c.p50_us.unwrap_or(0.0),
                    p99_us: c.p99_us.unwrap_or(0.0),
                })
                .collect(),
            decisions,
            max_error_rate: r.plan.max_error_rate,
            max_p99_increase_us: r.plan.max_p99_increase_us,
            min_requests: r.plan.min_requests,
            version: at.number,
        })
    }
}

/// Judges running rollouts every [`TICK`] until weft-cp stops.
pub fn spawn_driver(cp: Arc<ControlPlane>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let cp = cp.clone();
            // Judging may store a version (a file write): off the runtime's threads.
            let _ = tokio::task::spawn_blocking(move || cp.drive_rollouts()).await;
        }
    })
}

/// The RPCs.
pub(super) async fn start(
    cp: Arc<ControlPlane>,
    req: v1::StartFilterRolloutRequest,
) -> Result<v1::FilterRolloutStatus, Status> {
    let to: Filter = serde_json::from_slice(&req.filter_json)
        .map_err(|e| Status::invalid_argument(format!("the new filter: {e}")))?;
    if to.name.is_empty() {
        return Err(Status::invalid_argument(
            "the new filter: name must not be empty",
        ));
    }
    let plan = Plan {
        steps: req.steps,
        step_time_ms: req.step_time_ms,
        max_error_rate: req.max_error_rate,
        max_p99_increase_us: req.max_p99_increase_us,
        min_requests: req.min_requests,
    };
    tokio::task::spawn_blocking(move || {
        let name = to.name.clone();
        cp.start_rollout(to, plan)?;
        cp.rollout_status(&name)
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))?
}

pub(super) async fn change(
    cp: Arc<ControlPlane>,
    req: v1::ChangeFilterRolloutRequest,
) -> Result<v1::FilterRolloutStatus, Status> {
    tokio::task::spawn_blocking(move || {
        cp.change_rollout(&req.name, &req.action)?;
        cp.rollout_status(&req.name)
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))?
}

pub(super) fn status(cp: &ControlPlane, name: &str) -> Result<v1::FilterRolloutStatus, Status> {
    cp.rollout_status(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[test]
    fn hostile_reports_are_bounded_and_cannot_break_the_sums() {
        let cp = ControlPlane::new(Store::open(None).expect("store"), None).expect("cp");
        let huge = v1::FilterFigures {
            name: "ver".into(),
            revision: "new".into(),
            requests: u64::MAX,
            errors: u64::MAX,
            failed: u64::MAX,
            skipped: u64::MAX,
            local_5xx: u64::MAX,
            latency: vec![u64::MAX; 10 * BUCKETS],
        };
        let long = v1::FilterFigures {
            name: "x".repeat(10_000),
            ..huge.clone()
        };
        let many: Vec<v1::FilterFigures> = (0..5000)
            .map(|i| v1::FilterFigures {
                name: format!("f{i}"),
                ..v1::FilterFigures::default()
            })
            .collect();
        for node in ["a", "b"] {
            let mut filters = vec![huge.clone(), long.clone()];
            filters.extend(many.iter().cloned());
            cp.record_figures(node, v1::FilterReport { filters });
        }
        {
            let reports = cp.reports();
            let a = &reports.by_node["a"];
            assert!(a.len() <= MAX_REPORTED, "{}", a.len());
            assert!(a.keys().all(|(n, _)| n.len() <= MAX_NAME));
            let t = &a[&("ver".to_owned(), "new".to_owned())];
            assert_eq!(t.latency.len(), BUCKETS);
        }
        let filter = |rev: &str| -> Filter {
            serde_json::from_value(
                serde_json::json!({"name": "ver", "module": "m.wasm", "config": rev}),
            )
            .expect("filter")
        };
        let r = Rollout {
            from: filter("old"),
            to: filter("new"),
            plan: Plan {
                steps: vec![100],
                step_time_ms: 1000,
                max_error_rate: 0.0,
                max_p99_increase_us: 0,
                min_requests: 1,
            },
            phase: Phase::Running,
            step: 0,
            canaries: Vec::new(),
            step_started_ms: 0,
            paused_elapsed_ms: 0,
            baseline: None,
            decisions: Vec::new(),
            final_figures: Vec::new(),
        };
        // Figures under the revisions of the rollout: sums saturate, judging does not panic.
        let mut reports = cp.reports();
        for node in ["a", "b"] {
            let figures = reports.by_node.get_mut(node).expect("node");
            let t = figures[&("ver".to_owned(), "new".to_owned())].clone();
            figures.insert(("ver".to_owned(), r.to.revision()), t);
        }
        drop(reports);
        let _ = cp.cohorts("ver", &r);
        cp.record_figures("a", v1::FilterReport { filters: vec![] });
        let c = cp.cohorts("ver", &r);
        let _ = judge(&r, &c.new.0, &c.old.0, 10_000);
    }
}
