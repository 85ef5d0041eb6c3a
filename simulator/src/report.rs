//! The comparison report: per policy (and the oracle) messages sent,
//! responses realised and expected, rates, the share of the oracle's lift
//! over random captured, and the per-batch curve; printed as a table,
//! written as JSON and as an SVG chart.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::SimError;
use crate::invariants::Violation;
use crate::population::SimPopulation;
use crate::scenario::Scenario;

/// One batch of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchPoint {
    /// The batch.
    pub batch: u32,
    /// Messages in it.
    pub sent: u64,
    /// Sum of the true probabilities of its messages.
    pub expected: f64,
    /// Users of it who reacted.
    pub realised: u64,
    /// Expected responses up to and including it.
    pub cumulative_expected: f64,
    /// Realised responses up to and including it.
    pub cumulative_realised: u64,
}

/// What the reaction path did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineCounts {
    /// Which path.
    pub path: String,
    /// Commits (state + offset + outputs).
    pub commits: u64,
    /// Window results recorded on the campaign.
    pub windows_recorded: u64,
    /// Of which late corrections.
    pub late_corrections: u64,
    /// Repeated reactions dropped.
    pub duplicates_dropped: u64,
    /// Reactions counted after their window closed.
    pub late_counted: u64,
    /// Messages dead-lettered.
    pub dead_letters: u64,
}

/// Faults injected and absorbed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultCounts {
    /// Crashes the run recovered from.
    pub crashes_recovered: u64,
    /// Batch jobs delivered again and absorbed (refused or already done).
    pub job_redeliveries_absorbed: u64,
    /// Reactions the channel delivered twice.
    pub reactions_repeated: u64,
    /// Reactions reordered within the grace period.
    pub reordered_within_grace: u64,
    /// Reactions reordered beyond it.
    pub reordered_beyond_grace: u64,
    /// Malformed messages injected.
    pub malformed_injected: u64,
    /// Topic messages processed (re-reads after crashes included).
    pub messages_processed: u64,
}

/// One policy's run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyRun {
    /// The policy.
    pub policy: String,
    /// Messages sent.
    pub messages_sent: u64,
    /// Reactions counted on the campaign.
    pub responses_realised: u64,
    /// Sum of the true probabilities of the messages sent.
    pub responses_expected: f64,
    /// Realised / sent.
    pub response_rate: f64,
    /// Expected / sent.
    pub expected_rate: f64,
    /// `(expected − random) / (oracle − random)`.
    pub lift_captured: Option<f64>,
    /// Messages per creative.
    pub per_creative_sent: Vec<u64>,
    /// The per-batch curve.
    pub batches: Vec<BatchPoint>,
    /// The reaction path's counters.
    pub pipeline: PipelineCounts,
    /// Faults.
    pub faults: FaultCounts,
    /// Events in the run's log.
    pub log_events: u64,
    /// Broken invariants (empty when all hold).
    pub violations: Vec<Violation>,
    /// Wall time of the run (not in the JSON, which must be reproducible).
    #[serde(skip)]
    pub wall_ms: u64,
}

/// Reference figures computed directly from the truth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Baselines {
    /// Expected responses of random users with random creatives.
    pub random_expected: f64,
    /// Expected responses of the oracle (the top of the whole budget).
    pub oracle_expected: f64,
    /// Expected responses of an oracle that must spend its first batch at
    /// random.
    pub oracle_after_random_batch: f64,
    /// Its share of the oracle's lift over random.
    pub oracle_after_random_batch_lift: f64,
}

/// The whole comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The scenario's name.
    pub scenario: String,
    /// Its seed.
    pub seed: u64,
    /// Subscribers.
    pub subscribers: u64,
    /// Features per user.
    pub features: usize,
    /// Users who never react.
    pub non_reacting: u32,
    /// Creatives.
    pub creatives: usize,
    /// Budget.
    pub budget: u64,
    /// Batches.
    pub batches: u32,
    /// Whether the lift uses the random and oracle runs (`runs`) or the
    /// analytic baselines (`analytic`, when those runs are not part of the
    /// report).
    pub lift_basis: String,
    /// Reference figures.
    pub baselines: Baselines,
    /// The runs, in policy order.
    pub policies: Vec<PolicyRun>,
}

impl Report {
    /// The report of `runs` on `scenario` and `pop`; fills each run's lift.
    pub fn new(scenario: &Scenario, pop: &SimPopulation, mut runs: Vec<PolicyRun>) -> Self {
        let budget = scenario.campaign.budget;
        let random_a = pop.random_expected(budget);
        let oracle_a = pop.oracle_expected(budget);
        let first = scenario.campaign_spec().nominal_batch_size(0);
        let after = pop.oracle_after_random_batch(budget, first, scenario.seed);
        let find = |n: &str| {
            runs.iter()
                .find(|r| r.policy == n)
                .map(|r| r.responses_expected)
        };
        let (random, oracle, basis) = match (find("random"), find("oracle")) {
            (Some(r), Some(o)) => (r, o, "runs"),
            _ => (random_a, oracle_a, "analytic"),
        };
        let lift = |e: f64| {
            let span = oracle - random;
            (span.abs() > 1e-12).then(|| (e - random) / span)
        };
        for r in &mut runs {
            r.lift_captured = lift(r.responses_expected);
        }
        Self {
            scenario: scenario.name.clone(),
            seed: scenario.seed,
            subscribers: pop.len() as u64,
            features: pop.dim(),
            non_reacting: pop.non_reacting(),
            creatives: pop.creatives(),
            budget,
            batches: scenario.campaign.batches,
            lift_basis: basis.into(),
            baselines: Baselines {
                random_expected: random_a,
                oracle_expected: oracle_a,
                oracle_after_random_batch: after,
                oracle_after_random_batch_lift: if (oracle_a - random_a).abs() > 1e-12 {
                    (after - random_a) / (oracle_a - random_a)
                } else {
                    0.0
                },
            },
            policies: runs,
        }
    }

    /// Every broken invariant, with its policy.
    pub fn violations(&self) -> Vec<(String, Violation)> {
        self.policies
            .iter()
            .flat_map(|r| r.violations.iter().map(|v| (r.policy.clone(), v.clone())))
            .collect()
    }

    /// The printed table (with wall times when `timings`).
    pub fn table(&self, timings: bool) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "scenario {} (seed {}): {} subscribers ({} never react), {} features, {} creatives, budget {} in {} batches",
            self.scenario,
            self.seed,
            self.subscribers,
            self.non_reacting,
            self.features,
            self.creatives,
            self.budget,
            self.batches
        );
        let _ = write!(
            s,
            "{:<20} {:>8} {:>9} {:>10} {:>7} {:>9} {:>9}",
            "policy", "sent", "realised", "expected", "rate", "exp.rate", "lift"
        );
        if timings {
            let _ = write!(s, " {:>8}", "wall");
        }
        s.push('\n');
        for r in &self.policies {
            let lift = r
                .lift_captured
                .map_or("-".to_owned(), |l| format!("{:.1}%", 100.0 * l));
            let _ = write!(
                s,
                "{:<20} {:>8} {:>9} {:>10.1} {:>6.2}% {:>8.2}% {:>9}",
                r.policy,
                r.messages_sent,
                r.responses_realised,
                r.responses_expected,
                100.0 * r.response_rate,
                100.0 * r.expected_rate,
                lift
            );
            if timings {
                let _ = write!(s, " {:>7.1}s", r.wall_ms as f64 / 1000.0);
            }
            s.push('\n');
        }
        let b = &self.baselines;
        let _ = writeln!(
            s,
            "lift = share of the oracle's lift over random captured, on expected responses ({} baselines); \
             reference: an oracle forced to spend its first batch at random captures {:.1}%",
            self.lift_basis,
            100.0 * b.oracle_after_random_batch_lift
        );
        let bad = self.violations();
        if bad.is_empty() {
            let _ = writeln!(s, "invariants: all hold");
        } else {
            for (p, v) in bad {
                let _ = writeln!(s, "INVARIANT BROKEN [{p}] {}: {}", v.invariant, v.detail);
            }
        }
        s
    }

    /// The JSON (pretty, byte-for-byte reproducible).
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Writes `report.json` and `chart.svg` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), SimError> {
        std::fs::create_dir_all(dir).map_err(|e| SimError::Report {
            path: dir.to_owned(),
            reason: e.to_string(),
        })?;
        let json = dir.join("report.json");
        std::fs::write(&json, self.to_json()).map_err(|e| SimError::Report {
            path: json.clone(),
            reason: e.to_string(),
        })?;
        self.write_chart(&dir.join("chart.svg"))
    }

    /// Writes the SVG chart of cumulative expected responses per batch.
    pub fn write_chart(&self, path: &Path) -> Result<(), SimError> {
        use plotters::prelude::*;
        let err = |e: String| SimError::Report {
            path: path.to_owned(),
            reason: e,
        };
        let max_y = self
            .policies
            .iter()
            .flat_map(|r| r.batches.last().map(|b| b.cumulative_expected))
            .fold(1.0f64, f64::max)
            * 1.05;
        let x_max = self.batches.max(1);
        let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "{}: cumulative expected responses per batch (budget {})",
                    self.scenario, self.budget
                ),
                ("sans-serif", 22),
            )
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0u32..x_max, 0f64..max_y)
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("batches sent")
            .y_desc("expected responses")
            .draw()
            .map_err(|e| err(e.to_string()))?;
        let colours = [
            RGBColor(120, 120, 120),
            RGBColor(230, 159, 0),
            RGBColor(86, 180, 233),
            RGBColor(0, 158, 115),
            RGBColor(213, 94, 0),
            RGBColor(0, 0, 0),
            RGBColor(204, 121, 167),
            RGBColor(0, 114, 178),
        ];
        for (i, r) in self.policies.iter().enumerate() {
            let colour = colours[i % colours.len()];
            let points: Vec<(u32, f64)> = std::iter::once((0, 0.0))
                .chain(
                    r.batches
                        .iter()
                        .map(|b| (b.batch + 1, b.cumulative_expected)),
                )
                .collect();
            let label = match r.lift_captured {
                Some(l) => format!("{} ({:.1}% of lift)", r.policy, 100.0 * l),
                None => r.policy.clone(),
            };
            chart
                .draw_series(LineSeries::new(points, colour.stroke_width(2)))
                .map_err(|e| err(e.to_string()))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(e.to_string()))?;
        root.present().map_err(|e| err(e.to_string()))?;
        Ok(())
    }
}
