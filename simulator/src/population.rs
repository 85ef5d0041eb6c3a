//! The simulated channel's subscribers: features, and the true reaction
//! probability of each user for each creative (the hidden truth only the
//! oracle and the simulated users know).
//!
//! A population is generated from a [`Scenario`] or read from a CSV file
//! with the columns `user_id, x_0 … x_{d-1}, p_0 … p_{K-1}`, and can be
//! written back to one, so other tools can run the very same population.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use smartmsg_domain::Candidates;

use crate::error::PopulationError;
use crate::families::{self, Family};
use crate::rng;
use crate::scenario::{Scenario, TruthSpec};

/// Makes the scenario's share of users dormant (probability 0 for every
/// creative, `non_reacting_shift` added to their last column); returns
/// how many.
fn mark_dormant(
    scenario: &Scenario,
    features: &mut [f32],
    probs: &mut [f64],
    d: usize,
    k: usize,
) -> u32 {
    let share = scenario.population.non_reacting_share;
    if share <= 0.0 {
        return 0;
    }
    let shift = scenario.population.non_reacting_shift as f32;
    let mut dr = rng::stream(scenario.seed, &[rng::label("dormant")]);
    let mut count = 0;
    for u in 0..features.len() / d {
        if dr.random_bool(share) {
            count += 1;
            features[u * d + d - 1] += shift;
            probs[u * k..(u + 1) * k].fill(0.0);
        }
    }
    count
}

/// The logistic truth a generated population was drawn from.
#[derive(Debug, Clone, PartialEq)]
pub struct Truth {
    /// `b_c` per creative.
    pub intercepts: Vec<f64>,
    /// `w_c` per creative, row-major `creatives × features`.
    pub weights: Vec<f64>,
}

impl Truth {
    /// The truth of a [`TruthSpec::Generated`] over `d` features and `k`
    /// creatives, drawn from `(seed, tag)`: weights shared by every
    /// creative plus each creative's own deviation, intercepts around the
    /// base rate's logit. An explicit spec is returned as it is.
    pub fn generate(spec: &TruthSpec, d: usize, k: usize, seed: u64, tag: &str) -> Truth {
        let (base_rate, creative_spread, shared_scale, specific_scale) = match spec {
            TruthSpec::Explicit {
                intercepts,
                weights,
            } => {
                return Truth {
                    intercepts: intercepts.clone(),
                    weights: weights.iter().flatten().copied().collect(),
                }
            }
            TruthSpec::Generated {
                base_rate,
                creative_spread,
                shared_scale,
                specific_scale,
            } => (*base_rate, *creative_spread, *shared_scale, *specific_scale),
        };
        let mut r = rng::stream(seed, &[rng::label(tag)]);
        let mut z = || -> f64 { StandardNormal.sample(&mut r) };
        let shared: Vec<f64> = (0..d).map(|_| shared_scale * z()).collect();
        let logit = (base_rate / (1.0 - base_rate)).ln();
        let intercepts: Vec<f64> = (0..k).map(|_| logit + creative_spread * z()).collect();
        let mut weights = Vec::with_capacity(k * d);
        for _ in 0..k {
            for s in &shared {
                weights.push(s + specific_scale * z());
            }
        }
        Truth {
            intercepts,
            weights,
        }
    }

    /// The number of creatives.
    pub fn creatives(&self) -> usize {
        self.intercepts.len()
    }

    /// The probability that a user with features `x` reacts to creative
    /// `c`: `σ(b_c + w_c·x)`.
    pub fn probability(&self, c: usize, x: &[f32]) -> f64 {
        let d = x.len();
        let w = &self.weights[c * d..(c + 1) * d];
        let s = self.intercepts[c] + w.iter().zip(x).map(|(a, &b)| a * f64::from(b)).sum::<f64>();
        sigmoid(s)
    }
}

/// `n × d` standard normal features (row-major), drawn from `seed`: the
/// gaussian family's columns.
pub fn gaussian_features(n: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut r = rng::stream(seed, &[rng::label("features")]);
    (0..n * d)
        .map(|_| {
            let v: f64 = StandardNormal.sample(&mut r);
            v as f32
        })
        .collect()
}

/// Subscribers with features and true reaction probabilities.
#[derive(Debug, Clone)]
pub struct SimPopulation {
    candidates: Candidates,
    /// `len × creatives`, row-major.
    probs: Vec<f64>,
    creatives: usize,
    /// `Some` when user ids are not `0..len` in row order: `(id, row)`
    /// sorted by id.
    index: Option<Vec<(u32, u32)>>,
    truth: Option<Truth>,
    non_reacting: u32,
    drift: Option<Drift>,
}

/// The truth at the end of a drifting campaign (see
/// [`crate::scenario::DriftSpec`]).
#[derive(Debug, Clone)]
struct Drift {
    /// `len × creatives`, the second truth's probabilities.
    end: Vec<f64>,
    /// The share moved by the last batch.
    amount: f64,
    /// The campaign's nominal batch sizes.
    sizes: Vec<u64>,
}

fn sigmoid(t: f64) -> f64 {
    if t >= 0.0 {
        1.0 / (1.0 + (-t).exp())
    } else {
        let e = t.exp();
        e / (1.0 + e)
    }
}

impl SimPopulation {
    /// Draws the population of `scenario` (features, dormant users and the
    /// true response model all from its seed).
    pub fn generate(scenario: &Scenario) -> Result<Self, PopulationError> {
        let mut pop = Self::generate_truth(scenario, false)?;
        if let Some(d) = &scenario.drift {
            let end = Self::generate_truth(scenario, true)?;
            let spec = scenario.campaign_spec();
            pop.drift = Some(Drift {
                end: end.probs,
                amount: d.amount,
                sizes: (0..spec.batch_count())
                    .map(|b| spec.nominal_batch_size(b))
                    .collect(),
            });
        }
        Ok(pop)
    }

    /// The population with the starting truth, or (`drifted`) the same
    /// users with the drift's second truth.
    fn generate_truth(scenario: &Scenario, drifted: bool) -> Result<Self, PopulationError> {
        let n = scenario.population.subscribers as usize;
        let d = scenario.population.features;
        let k = scenario.campaign.creatives;
        let seed = scenario.seed;
        if let Some(gen) = Self::generate_family(scenario, drifted)? {
            return Ok(gen);
        }
        let truth = match &scenario.truth {
            TruthSpec::Explicit {
                intercepts,
                weights,
            } => Truth {
                intercepts: intercepts.clone(),
                weights: weights.iter().flatten().copied().collect(),
            },
            generated @ TruthSpec::Generated { .. } => {
                let tag = if drifted { "truth-drift" } else { "truth" };
                Truth::generate(generated, d, k, seed, tag)
            }
        };
        let mut features = gaussian_features(n, d, seed);
        let share = scenario.population.non_reacting_share;
        let shift = scenario.population.non_reacting_shift as f32;
        let mut dormant = vec![false; n];
        let mut dr = rng::stream(seed, &[rng::label("dormant")]);
        let mut non_reacting = 0;
        for (u, flag) in dormant.iter_mut().enumerate() {
            if share > 0.0 && dr.random_bool(share) {
                *flag = true;
                non_reacting += 1;
                features[u * d + d - 1] += shift;
            }
        }
        let mut probs = vec![0.0; n * k];
        for u in 0..n {
            if dormant[u] {
                continue;
            }
            let x = &features[u * d..(u + 1) * d];
            for c in 0..k {
                probs[u * k + c] = truth.probability(c, x);
            }
        }
        let candidates = Candidates::from_parts(d, (0..n as u32).collect(), features)
            .map_err(|e| PopulationError::Shape(e.to_string()))?;
        Ok(Self {
            candidates,
            probs,
            creatives: k,
            index: None,
            truth: Some(truth),
            non_reacting,
            drift: None,
        })
    }

    /// The population of a non-gaussian [`Family`] (`None` for the
    /// gaussian one), with the scenario's dormant users.
    fn generate_family(
        scenario: &Scenario,
        drifted: bool,
    ) -> Result<Option<Self>, PopulationError> {
        let family = scenario.population.family;
        if family == Family::Gaussian {
            return Ok(None);
        }
        let n = scenario.population.subscribers as usize;
        let k = scenario.campaign.creatives;
        let (base_rate, spread) = match scenario.truth {
            TruthSpec::Generated {
                base_rate,
                creative_spread,
                ..
            } => (base_rate, creative_spread),
            TruthSpec::Explicit { .. } => {
                return Err(PopulationError::Shape(format!(
                    "the {} family generates its own truth",
                    family.as_str()
                )))
            }
        };
        let seed = scenario.seed;
        let truth_seed = if drifted {
            rng::mix(&[seed, rng::label("truth-drift")])
        } else {
            seed
        };
        let g = match family {
            Family::Crm => families::crm(n, k, seed, truth_seed, base_rate, spread),
            _ => families::nonlinear(n, k, seed, truth_seed, base_rate, spread),
        };
        let d = family.columns().unwrap_or(scenario.population.features);
        let (mut features, mut probs) = (g.features, g.probs);
        let non_reacting = mark_dormant(scenario, &mut features, &mut probs, d, k);
        let candidates = Candidates::from_parts(d, (0..n as u32).collect(), features)
            .map_err(|e| PopulationError::Shape(e.to_string()))?;
        Ok(Some(Self {
            candidates,
            probs,
            creatives: k,
            index: None,
            truth: None,
            non_reacting,
            drift: None,
        }))
    }

    /// A population from parts: candidates and `len × creatives` true
    /// probabilities.
    pub fn from_parts(
        candidates: Candidates,
        probs: Vec<f64>,
        creatives: usize,
    ) -> Result<Self, PopulationError> {
        if creatives == 0 || creatives > smartmsg_domain::CampaignSpec::MAX_CREATIVES {
            return Err(PopulationError::Shape(format!(
                "{creatives} creatives; 1 to {} allowed",
                smartmsg_domain::CampaignSpec::MAX_CREATIVES
            )));
        }
        if probs.len() != candidates.len() * creatives {
            return Err(PopulationError::Shape(format!(
                "{} probabilities for {} users × {creatives} creatives",
                probs.len(),
                candidates.len()
            )));
        }
        if let Some(p) = probs.iter().find(|p| !(0.0..=1.0).contains(*p)) {
            return Err(PopulationError::Shape(format!(
                "probability {p} is not in [0, 1]"
            )));
        }
        let dense = candidates
            .users()
            .iter()
            .enumerate()
            .all(|(i, &u)| u as usize == i);
        let index = if dense {
            None
        } else {
            let mut v: Vec<(u32, u32)> = candidates
                .users()
                .iter()
                .enumerate()
                .map(|(r, &u)| (u, r as u32))
                .collect();
            v.sort_unstable();
            if let Some(w) = v.windows(2).find(|w| w[0].0 == w[1].0) {
                return Err(PopulationError::Shape(format!(
                    "user id {} appears twice",
                    w[0].0
                )));
            }
            Some(v)
        };
        let non_reacting = probs
            .chunks_exact(creatives)
            .filter(|r| r.iter().all(|&p| p == 0.0))
            .count() as u32;
        Ok(Self {
            candidates,
            probs,
            creatives,
            index,
            truth: None,
            non_reacting,
            drift: None,
        })
    }

    /// Every user, with features, in row order.
    pub fn candidates(&self) -> &Candidates {
        &self.candidates
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.candidates.len()
    }

    /// Whether there are no users.
    pub fn is_empty(&self) -> bool {
        self.candidates.is_empty()
    }

    /// Features per user.
    pub fn dim(&self) -> usize {
        self.candidates.dim()
    }

    /// Number of creatives.
    pub fn creatives(&self) -> usize {
        self.creatives
    }

    /// Users whose probability is 0 for every creative.
    pub fn non_reacting(&self) -> u32 {
        self.non_reacting
    }

    /// The logistic truth, for generated populations.
    pub fn truth(&self) -> Option<&Truth> {
        self.truth.as_ref()
    }

    /// The row of user `user`, if it is a subscriber.
    #[inline]
    pub fn row_of(&self, user: u32) -> Option<usize> {
        match &self.index {
            None => ((user as usize) < self.len()).then_some(user as usize),
            Some(v) => v
                .binary_search_by_key(&user, |&(u, _)| u)
                .ok()
                .map(|i| v[i].1 as usize),
        }
    }

    /// The true probabilities of row `row`, one per creative.
    #[inline]
    pub fn probs_row(&self, row: usize) -> &[f64] {
        &self.probs[row * self.creatives..(row + 1) * self.creatives]
    }

    /// `P(react)` of user `user` to creative `c` (0 for unknown users).
    #[inline]
    pub fn probability(&self, user: u32, c: u16) -> f64 {
        self.row_of(user)
            .and_then(|r| self.probs_row(r).get(usize::from(c)).copied())
            .unwrap_or(0.0)
    }

    /// The share `t` of the way the truth has moved by batch `batch` (0
    /// without drift).
    fn drift_share(&self, batch: u32) -> f64 {
        match &self.drift {
            Some(d) if d.sizes.len() > 1 => {
                d.amount * f64::from(batch.min(d.sizes.len() as u32 - 1))
                    / (d.sizes.len() - 1) as f64
            }
            _ => 0.0,
        }
    }

    /// Whether the truth drifts during the campaign.
    pub fn drifts(&self) -> bool {
        self.drift.is_some()
    }

    /// `P(react)` of row `row` to creative `c` in batch `batch` (the
    /// drifted truth; [`SimPopulation::probs_row`] without drift).
    #[inline]
    pub fn prob_at(&self, row: usize, c: usize, batch: u32) -> f64 {
        let i = row * self.creatives + c;
        match &self.drift {
            None => self.probs[i],
            Some(d) => {
                let t = self.drift_share(batch);
                (1.0 - t) * self.probs[i] + t * d.end[i]
            }
        }
    }

    /// `P(react)` of user `user` to creative `c` in batch `batch` (0 for
    /// unknown users).
    #[inline]
    pub fn probability_at(&self, user: u32, c: u16, batch: u32) -> f64 {
        match self.row_of(user) {
            Some(r) if usize::from(c) < self.creatives => self.prob_at(r, usize::from(c), batch),
            _ => 0.0,
        }
    }

    /// The features of user `user`.
    pub fn features(&self, user: u32) -> Option<&[f32]> {
        self.row_of(user).map(|r| self.candidates.row(r))
    }

    /// Mean true probability of each creative over all users.
    pub fn creative_means(&self) -> Vec<f64> {
        let mut m = vec![0.0; self.creatives];
        for row in self.probs.chunks_exact(self.creatives) {
            for (a, p) in m.iter_mut().zip(row) {
                *a += p;
            }
        }
        let n = self.len().max(1) as f64;
        m.iter_mut().for_each(|a| *a /= n);
        m
    }

    /// The creative with the best mean true probability (lowest on ties).
    pub fn best_average_creative(&self) -> u16 {
        let m = self.creative_means();
        let mut best = 0;
        for (c, v) in m.iter().enumerate() {
            if *v > m[best] {
                best = c;
            }
        }
        best as u16
    }

    /// Expected responses of `budget` messages to random users with random
    /// creatives.
    pub fn random_expected(&self, budget: u64) -> f64 {
        let mean = self.creative_means().iter().sum::<f64>() / self.creatives as f64;
        let Some(d) = &self.drift else {
            return mean * budget.min(self.len() as u64) as f64;
        };
        // Batch by batch, each at its own mix of the two truths.
        let end = d.end.iter().sum::<f64>() / d.end.len().max(1) as f64;
        let mut left = budget.min(self.len() as u64);
        let mut total = 0.0;
        for (b, &size) in d.sizes.iter().enumerate() {
            let n = size.min(left);
            left -= n;
            let t = self.drift_share(b as u32);
            total += n as f64 * ((1.0 - t) * mean + t * end);
        }
        total
    }

    /// Batch by batch from `from`, the remaining (not `taken`) users with
    /// the best probability in that batch, each with their best creative
    /// then; marks them taken and returns their expected responses.
    fn greedy_by_batch(&self, taken: &mut [bool], from: usize, mut left: u64) -> f64 {
        let Some(d) = &self.drift else {
            return 0.0;
        };
        let mut total = 0.0;
        for (b, &size) in d.sizes.iter().enumerate().skip(from) {
            let n = size.min(left) as usize;
            left -= n as u64;
            let mut best: Vec<(f64, usize)> = (0..self.len())
                .filter(|&r| !taken[r])
                .map(|r| {
                    let p = (0..self.creatives)
                        .map(|c| self.prob_at(r, c, b as u32))
                        .fold(0.0, f64::max);
                    (p, r)
                })
                .collect();
            let n = n.min(best.len());
            if n == 0 {
                continue;
            }
            best.select_nth_unstable_by(n - 1, |a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            for &(p, r) in &best[..n] {
                taken[r] = true;
                total += p;
            }
        }
        total
    }

    fn best_probs(&self) -> Vec<f64> {
        self.probs
            .chunks_exact(self.creatives)
            .map(|r| r.iter().copied().fold(0.0, f64::max))
            .collect()
    }

    fn top_sum(mut v: Vec<f64>, k: usize) -> f64 {
        let k = k.min(v.len());
        if k == 0 {
            return 0.0;
        }
        v.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let mut top = v[..k].to_vec();
        top.sort_unstable_by(|a, b| b.total_cmp(a));
        top.iter().sum()
    }

    /// Expected responses of the oracle: the `budget` users with the
    /// largest best-creative probability, each sent that creative.
    /// With a drifting truth: batch by batch, the remaining users with the
    /// best probability in that batch (what [`crate::policies::Oracle`]
    /// does).
    pub fn oracle_expected(&self, budget: u64) -> f64 {
        if self.drift.is_some() {
            let mut taken = vec![false; self.len()];
            return self.greedy_by_batch(&mut taken, 0, budget);
        }
        Self::top_sum(self.best_probs(), budget as usize)
    }

    /// Expected responses of an oracle forced to spend its first batch of
    /// `first` messages on random users with random creatives, then
    /// choosing perfectly (a reference for what learning can reach).
    pub fn oracle_after_random_batch(&self, budget: u64, first: u64, seed: u64) -> f64 {
        let n = self.len();
        let first = (first.min(budget) as usize).min(n);
        let mut r = rng::stream(seed, &[rng::label("oracle-random-first")]);
        let chosen = rand::seq::index::sample(&mut r, n, first);
        let mut taken = vec![false; n];
        let mut expected = 0.0;
        for row in chosen.iter() {
            taken[row] = true;
            expected += self.probs_row(row).iter().sum::<f64>() / self.creatives as f64;
        }
        let rest: Vec<f64> = self
            .best_probs()
            .into_iter()
            .enumerate()
            .filter(|(r, _)| !taken[*r])
            .map(|(_, p)| p)
            .collect();
        if self.drift.is_some() {
            return expected + self.greedy_by_batch(&mut taken, 1, budget - first as u64);
        }
        expected + Self::top_sum(rest, budget as usize - first)
    }

    /// Writes the population as CSV: `user_id, x_0 … x_{d-1}, p_0 … p_{K-1}`
    /// (floats in their shortest exact form, so a read gives the same
    /// values back).
    pub fn write_csv(&self, path: &Path) -> Result<(), PopulationError> {
        let io = |source| PopulationError::Io {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::create(path).map_err(io)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        self.write_csv_to(&mut w).map_err(io)?;
        w.flush().map_err(io)
    }

    /// Writes the CSV to any writer.
    pub fn write_csv_to(&self, w: &mut dyn Write) -> std::io::Result<()> {
        let d = self.dim();
        let mut header = String::from("user_id");
        for j in 0..d {
            header.push_str(&format!(",x_{j}"));
        }
        for c in 0..self.creatives {
            header.push_str(&format!(",p_{c}"));
        }
        writeln!(w, "{header}")?;
        for (r, &u) in self.candidates.users().iter().enumerate() {
            write!(w, "{u}")?;
            for v in self.candidates.row(r) {
                write!(w, ",{v}")?;
            }
            for p in self.probs_row(r) {
                write!(w, ",{p}")?;
            }
            writeln!(w)?;
        }
        Ok(())
    }

    /// Reads a population CSV file (see [`SimPopulation::read_csv`]).
    pub fn from_csv(path: &Path) -> Result<Self, PopulationError> {
        let file = std::fs::File::open(path).map_err(|source| PopulationError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::read_csv(BufReader::with_capacity(1 << 20, file), path)
    }

    /// Reads a population CSV: a header `user_id, x_0 … x_{d-1}, p_0 …
    /// p_{K-1}` (d and K from 1 to 64), then one line per user with a
    /// unique `u32` id, finite features and probabilities in `[0, 1]`.
    /// Errors name the line, the column and why.
    pub fn read_csv(reader: impl Read, origin: &Path) -> Result<Self, PopulationError> {
        let path = origin.to_owned();
        let mut rdr = csv::ReaderBuilder::new()
            .has_headers(true)
            .trim(csv::Trim::All)
            .from_reader(BufReader::new(reader));
        let header = rdr
            .headers()
            .map_err(|e| PopulationError::Header {
                path: path.clone(),
                reason: e.to_string(),
            })?
            .clone();
        let names: Vec<String> = header.iter().map(str::to_owned).collect();
        let header_err = |reason: String| PopulationError::Header {
            path: path.clone(),
            reason,
        };
        if names.first().map(String::as_str) != Some("user_id") {
            return Err(header_err(format!(
                "column 1 is {:?}; expected \"user_id\"",
                names.first().map(String::as_str).unwrap_or("")
            )));
        }
        let d = names[1..]
            .iter()
            .take_while(|n| n.starts_with("x_"))
            .count();
        let k = names.len() - 1 - d;
        for (i, n) in names.iter().enumerate().skip(1) {
            let want = if i <= d {
                format!("x_{}", i - 1)
            } else {
                format!("p_{}", i - 1 - d)
            };
            if *n != want {
                return Err(header_err(format!(
                    "column {} is {n:?}; expected {want:?} (columns are user_id, x_0 … x_{{d-1}}, p_0 … p_{{K-1}})",
                    i + 1
                )));
            }
        }
        if d == 0 || d > Candidates::MAX_DIM {
            return Err(header_err(format!(
                "{d} feature columns; 1 to {} allowed",
                Candidates::MAX_DIM
            )));
        }
        if k == 0 || k > smartmsg_domain::CampaignSpec::MAX_CREATIVES {
            return Err(header_err(format!(
                "{k} probability columns; 1 to {} allowed",
                smartmsg_domain::CampaignSpec::MAX_CREATIVES
            )));
        }
        let mut users = Vec::new();
        let mut features = Vec::new();
        let mut probs = Vec::new();
        let mut record = csv::StringRecord::new();
        let mut first_line: std::collections::HashMap<u32, u64> = Default::default();
        loop {
            match rdr.read_record(&mut record) {
                Ok(false) => break,
                Ok(true) => {}
                Err(e) => {
                    let line = e.position().map_or(0, |p| p.line());
                    let reason = match e.kind() {
                        csv::ErrorKind::UnequalLengths {
                            expected_len, len, ..
                        } => format!("{len} fields; the header has {expected_len}"),
                        _ => e.to_string(),
                    };
                    return Err(PopulationError::Line {
                        path: path.clone(),
                        line,
                        reason,
                    });
                }
            }
            let line = record.position().map_or(0, |p| p.line());
            let rec_err = |column: usize, reason: String| PopulationError::Record {
                path: path.clone(),
                line,
                column: column + 1,
                name: names[column].clone(),
                reason,
            };
            let id_text = &record[0];
            let id: u32 = id_text.parse().map_err(|_| {
                rec_err(
                    0,
                    format!("{id_text:?} is not a user id (an integer 0 to 4294967295)"),
                )
            })?;
            if let Some(first) = first_line.insert(id, line) {
                return Err(rec_err(
                    0,
                    format!("user id {id} appears twice (first on line {first})"),
                ));
            }
            users.push(id);
            for j in 0..d {
                let t = &record[1 + j];
                let v: f32 = t
                    .parse()
                    .map_err(|_| rec_err(1 + j, format!("{t:?} is not a number")))?;
                if !v.is_finite() {
                    return Err(rec_err(1 + j, format!("{t} is not finite")));
                }
                features.push(v);
            }
            for c in 0..k {
                let col = 1 + d + c;
                let t = &record[col];
                let v: f64 = t
                    .parse()
                    .map_err(|_| rec_err(col, format!("{t:?} is not a number")))?;
                if !(0.0..=1.0).contains(&v) {
                    return Err(rec_err(col, format!("{t} is not a probability in [0, 1]")));
                }
                probs.push(v);
            }
            if users.len() > 10_000_000 {
                return Err(PopulationError::Shape("more than 10,000,000 users".into()));
            }
        }
        if users.is_empty() {
            return Err(PopulationError::Shape(format!(
                "{}: no users after the header",
                path.display()
            )));
        }
        let candidates = Candidates::from_parts(d, users, features)
            .map_err(|e| PopulationError::Shape(e.to_string()))?;
        Self::from_parts(candidates, probs, k)
    }
}
