//! Off-policy evaluation from logged bandit feedback.
//!
//! - [`LoggedData`]: one row per logged decision: context features (dense,
//!   categorical columns one-hot encoded), the action taken, an optional
//!   slot, the reward and the logging policy's propensity of the action;
//!   read from a CSV ([`load::read_csv`]) with the column names given, or
//!   extracted from this engine's campaign logs ([`load::from_events`]);
//! - [`TargetProbs`]: the target policy as per-row action probabilities
//!   (from a file, or computed for a domain policy);
//! - [`estimate`]: direct method (per-action ridge regression reward model),
//!   IPW, self-normalised IPW, doubly robust, self-normalised DR and
//!   switch-DR, each with a seeded bootstrap CI and the effective sample
//!   size.

pub mod estimate;
pub mod load;
pub mod policy_target;
pub mod served;
pub mod slate;

use std::path::PathBuf;

/// Why logged data cannot be read or evaluated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpeError {
    /// A file cannot be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A named column is missing from the header.
    #[error("{path}: no column named `{column}` (columns: {available})")]
    MissingColumn {
        /// The file.
        path: PathBuf,
        /// The column asked for.
        column: String,
        /// The header.
        available: String,
    },
    /// Rows are bad (all listed, up to a limit).
    #[error("{path}: {count} bad row(s):\n{}", render_rows(.rows))]
    BadRows {
        /// The file.
        path: PathBuf,
        /// How many.
        count: usize,
        /// Line number (the header is line 1) and reason, up to 50.
        rows: Vec<(u64, String)>,
    },
    /// The data cannot support an estimate.
    #[error("refusing to estimate: {0}")]
    Unsupported(String),
    /// The target probabilities do not fit the data.
    #[error("target policy: {0}")]
    Target(String),
}

fn render_rows(rows: &[(u64, String)]) -> String {
    rows.iter()
        .map(|(n, r)| format!("  line {n}: {r}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Logged bandit feedback, validated.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LoggedData {
    /// Names of the feature columns after encoding (`col=value` for
    /// one-hot columns).
    pub feature_names: Vec<String>,
    /// Row-major features, `rows × feature_names.len()`.
    pub features: Vec<f64>,
    /// The action names; actions are indices into this.
    pub actions: Vec<String>,
    /// The logged action of each row.
    pub action: Vec<usize>,
    /// The slot of each row, where given.
    pub slot: Option<Vec<String>>,
    /// Timestamps, where given.
    pub timestamp: Option<Vec<String>>,
    /// The reward of each row.
    pub reward: Vec<f64>,
    /// The logging propensity of the logged action, in (0, 1].
    pub propensity: Vec<f64>,
}

impl LoggedData {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.action.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.action.is_empty()
    }

    /// Number of features.
    pub fn dim(&self) -> usize {
        self.feature_names.len()
    }

    /// Row `i`'s features.
    pub fn x(&self, i: usize) -> &[f64] {
        let d = self.dim();
        &self.features[i * d..(i + 1) * d]
    }
}

/// A target policy's probability of every action on every logged row.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetProbs {
    /// Actions (columns).
    pub actions: usize,
    /// Row-major, `rows × actions`; each row sums to 1.
    pub probs: Vec<f64>,
}

impl TargetProbs {
    /// Checks the shape and that each row is a distribution.
    pub fn new(rows: usize, actions: usize, probs: Vec<f64>) -> Result<Self, OpeError> {
        if probs.len() != rows * actions {
            return Err(OpeError::Target(format!(
                "{} probabilities for {rows} rows × {actions} actions",
                probs.len()
            )));
        }
        for (i, row) in probs.chunks(actions.max(1)).enumerate() {
            if row.iter().any(|p| !p.is_finite() || *p < 0.0) {
                return Err(OpeError::Target(format!(
                    "row {}: probabilities must be finite and ≥ 0",
                    i + 1
                )));
            }
            let s: f64 = row.iter().sum();
            if (s - 1.0).abs() > 1e-6 {
                return Err(OpeError::Target(format!(
                    "row {}: probabilities sum to {s}, not 1",
                    i + 1
                )));
            }
        }
        Ok(Self { actions, probs })
    }

    /// A deterministic policy: action `a[i]` on row `i`.
    pub fn deterministic(actions: usize, a: &[usize]) -> Result<Self, OpeError> {
        let mut probs = vec![0.0; a.len() * actions];
        for (i, &x) in a.iter().enumerate() {
            if x >= actions {
                return Err(OpeError::Target(format!(
                    "row {}: action {x} unknown",
                    i + 1
                )));
            }
            probs[i * actions + x] = 1.0;
        }
        Self::new(a.len(), actions, probs)
    }

    /// π(a | row i).
    pub fn p(&self, i: usize, a: usize) -> f64 {
        self.probs[i * self.actions + a]
    }

    /// Row `i`'s distribution.
    pub fn row(&self, i: usize) -> &[f64] {
        &self.probs[i * self.actions..(i + 1) * self.actions]
    }
}
