//! Decision-quality experiments (issue 14): runs variants of the integrated
//! policy off the engine (a plain loop: plan, react with the world's draws,
//! learn, reactions seen before the next batch) on population CSV files
//! (from `smartmsg simulate --export-population` or the peers' harness) or
//! built-in scenarios, and prints each variant's share of the oracle's lift
//! over random.
//!
//! ```sh
//! cargo run --release -p smartmsg-simulator --example dq -- [--seed S] SOURCE...
//! ```
//!
//! A SOURCE is a CSV file or a built-in scenario name (`name@seed` for
//! another seed); `SOURCE#r` (r ≥ 1) runs it with other reaction draws and
//! plan noise (repetition `r`). `DQ_V=0,3` runs only those variants (by
//! index in the list in `main`).
//!
//! Diagnostics (environment): `DQ_DIAG=1` adds, per variant, `[U cC]`: `U`
//! the lift had every chosen user (batches 1 on) got their best creative
//! (what the user selection alone reaches) and `C` the share of the best
//! creative's gain over an average creative that the final model's
//! choice captures over all users; `DQ_BATCH=1` prints that share batch by
//! batch for the chosen users, each followed by the model that planned
//! the batch (`p` plain, `l` log, `h` hinges); `DQ_TF=crm-true` (or `std`,
//! `crm-true-std`) hands the policies the crm truth's transformed columns
//! (or standardised ones) instead of the raw ones.

use std::sync::Arc;

use smartmsg_domain::{
    Defer, Expansion, Integrated, ModelConfig, Outcomes, PlanContext, Policy, Pooling, Scoring,
    Transform,
};
use smartmsg_simulator::policies::model_config;
use smartmsg_simulator::rng::{self, label, mix, unit};
use smartmsg_simulator::{Scenario, SimPopulation};

/// Expected responses of the policy's messages, and of the same users with
/// their best creative.
fn run(s: &Scenario, pop: &SimPopulation, p: &mut Integrated, rep: u64) -> (f64, f64) {
    let spec = s.campaign_spec();
    let k = s.campaign.creatives;
    let mut remaining = pop.candidates().clone();
    let mut planned = vec![0u64; k];
    let mut left = spec.budget;
    let mut expected = 0.0;
    let mut best = 0.0;
    let mut per_batch = String::new();
    for b in 0..spec.batch_count() {
        let ctx = PlanContext {
            batch: b,
            batch_count: spec.batch_count(),
            creatives: k,
            remaining_budget: left,
            planned_per_creative: planned.clone(),
        };
        let size = spec.nominal_batch_size(b).min(left) as usize;
        let mut r = rng::stream(s.seed, &[label("dq"), u64::from(b) + (rep << 32)]);
        let d = Policy::plan(p, &ctx, &remaining, size, &mut r).unwrap();
        let mut o = Outcomes::new(pop.dim()).unwrap();
        let mut chosen = std::collections::HashSet::new();
        let (mut bg, mut bt, mut ba) = (0.0, 0.0, 0.0);
        for (u, c, _) in d.iter() {
            let prob = pop.probability_at(u, c, b);
            let ps: Vec<f64> = (0..k as u16).map(|c| pop.probability_at(u, c, b)).collect();
            bg += prob;
            bt += ps.iter().cloned().fold(0.0, f64::max);
            ba += ps.iter().sum::<f64>() / k as f64;
            expected += prob;
            best += if b == 0 {
                prob
            } else {
                (0..k as u16)
                    .map(|c| pop.probability_at(u, c, b))
                    .fold(0.0, f64::max)
            };
            let draw = if rep == 0 {
                mix(&[s.seed, label("react"), u64::from(u)])
            } else {
                mix(&[s.seed, label("react"), rep, u64::from(u)])
            };
            let y = unit(draw) < prob;
            o.push(c, pop.features(u).unwrap(), 1, u32::from(y))
                .unwrap();
            planned[usize::from(c)] += 1;
            chosen.insert(u);
        }
        if b > 0 {
            per_batch.push_str(&format!(
                " {:.0}{}",
                100.0 * (bg - ba) / (bt - ba),
                &p.planning_model()[..1]
            ));
        }
        left -= d.len() as u64;
        remaining.retain(|u| !chosen.contains(&u));
        Policy::update(p, &o).unwrap();
    }
    if std::env::var_os("DQ_BATCH").is_some() {
        println!("  creative capture by batch:{per_batch}");
    }
    (expected, best)
}

/// Diagnostic column transforms (env `DQ_TF`): `crm-true` applies the crm
/// truth's transforms (`ln(1 + days)`, `ln(1 + purchases)`, `ln basket`).
fn transform(pop: SimPopulation) -> SimPopulation {
    let tf = std::env::var("DQ_TF").unwrap_or_default();
    if tf.is_empty() {
        return pop;
    }
    let c = pop.candidates();
    let d = c.dim();
    let mut f: Vec<f32> = c.rows().flatten().copied().collect();
    for x in f.chunks_exact_mut(d) {
        match tf.as_str() {
            "crm-true" => {
                x[10] = x[10].ln_1p();
                x[11] = x[11].ln_1p();
                x[13] = x[13].ln();
            }
            "std" => {
                x[9] = (x[9] - 42.0) / 13.0;
                x[12] /= 35.0;
                x[14] = (x[14] - 50.0) / 10.0;
                x[10] /= 40.0;
                x[11] /= 3.0;
                x[13] /= 40.0;
            }
            "crm-true-std" => {
                x[10] = x[10].ln_1p();
                x[11] = x[11].ln_1p();
                x[13] = x[13].ln();
                x[9] = (x[9] - 42.0) / 13.0;
                x[12] /= 35.0;
                x[14] = (x[14] - 50.0) / 10.0;
            }
            _ => panic!("DQ_TF"),
        }
    }
    let probs: Vec<f64> = (0..c.len())
        .flat_map(|r| pop.probs_row(r).to_vec())
        .collect();
    let cand = smartmsg_domain::Candidates::from_parts(d, c.users().to_vec(), f).unwrap();
    SimPopulation::from_parts(cand, probs, pop.creatives()).unwrap()
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut seed = 0u64;
    if let Some(i) = args.iter().position(|a| a == "--seed") {
        seed = args[i + 1].parse().unwrap();
        args.drain(i..i + 2);
    }
    // Each variant edits the scenario's configuration (the default).
    type Edit = Box<dyn Fn(&mut ModelConfig)>;
    let pool = |own: f64| -> Edit {
        Box::new(move |c: &mut ModelConfig| c.pooling = Pooling::Shared { own })
    };
    let ada = |own: f64, per_weight: bool| -> Edit {
        Box::new(move |c: &mut ModelConfig| c.pooling = Pooling::Adaptive { own, per_weight })
    };
    let wv = |v: f64| -> Edit { Box::new(move |c: &mut ModelConfig| c.prior.weight_variance = v) };
    let df = |weight: f64| -> Edit {
        Box::new(move |c: &mut ModelConfig| c.defer = Defer::Ambiguous { weight })
    };
    let _ = (
        &wv,
        &pool,
        &ada,
        Expansion::None,
        Scoring::default(),
        Transform::None,
    );
    // Fourth round: deferring users with an ambiguous creative (the new
    // default: weight 12) against none (the third round's default).
    let all: Vec<(&str, Edit)> = vec![
        ("default", Box::new(|_: &mut ModelConfig| {})),
        (
            "no defer",
            Box::new(|c: &mut ModelConfig| c.defer = Defer::None),
        ),
        ("defer 4", df(4.0)),
        ("defer 8", df(8.0)),
        ("defer 16", df(16.0)),
        ("defer 24", df(24.0)),
        ("defer 32", df(32.0)),
        ("defer 48", df(48.0)),
    ];
    // DQ_V=0,2,3 picks variants by index (default: all).
    let pick: Option<Vec<usize>> = std::env::var("DQ_V")
        .ok()
        .map(|v| v.split(',').map(|i| i.parse().unwrap()).collect());
    let variants: Vec<(&str, Edit)> = all
        .into_iter()
        .enumerate()
        .filter(|(i, _)| pick.as_ref().is_none_or(|p| p.contains(i)))
        .map(|(_, v)| v)
        .collect();

    let mut sums = vec![0.0; variants.len() + 1];
    for arg in &args {
        // `SOURCE#r`: reaction draws and plans of repetition r.
        let (src, rep) = match arg.split_once('#') {
            Some((a, r)) => (a.to_string(), r.parse::<u64>().unwrap()),
            None => (arg.clone(), 0),
        };
        let src = &src;
        let (pop, s) = if src.ends_with(".csv") {
            let pop = SimPopulation::from_csv(std::path::Path::new(src)).unwrap();
            let mut s = Scenario::classic();
            s.seed = seed;
            s.population.subscribers = pop.len() as u32;
            s.population.features = pop.dim();
            s.campaign.creatives = pop.creatives();
            s.campaign.budget = (pop.len() / 3) as u64;
            (pop, s)
        } else {
            let (name, sd) = match src.split_once('@') {
                Some((n, x)) => (n, Some(x.parse::<u64>().unwrap())),
                None => (src.as_str(), None),
            };
            let mut s = Scenario::builtin(name).expect("unknown scenario");
            if let Some(x) = sd {
                s.seed = x;
            }
            (SimPopulation::generate(&s).unwrap(), s)
        };
        let pop = Arc::new(transform(pop));
        let budget = s.campaign.budget;
        let (ra, oa) = (pop.random_expected(budget), pop.oracle_expected(budget));
        let mut line = format!("{arg}:");
        for (i, (_, edit)) in variants.iter().enumerate() {
            let cfg = {
                let mut v = model_config(&s);
                v.propensity_draws = 1;
                edit(&mut v);
                v
            };
            let mut p = Integrated::new(s.campaign.creatives, pop.dim(), cfg).unwrap();
            let (e, best) = run(&s, &pop, &mut p, rep);
            let lift = (e - ra) / (oa - ra);
            sums[i] += lift;
            line.push_str(&format!(" {:.1}", 100.0 * lift));
            if std::env::var_os("DQ_DIAG").is_some() {
                line.push_str(&format!("[{:.1}", 100.0 * (best - ra) / (oa - ra)));
                // The final model's creative choice for every user: share
                // of the best creative's gain over an average creative.
                let (mut got, mut top, mut avg) = (0.0, 0.0, 0.0);
                for &u in pop.candidates().users() {
                    let x = pop.features(u).unwrap();
                    let r = p.expected_response(x);
                    let c = (0..r.len()).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap();
                    let ps: Vec<f64> = (0..r.len() as u16).map(|c| pop.probability(u, c)).collect();
                    got += ps[c];
                    top += ps.iter().cloned().fold(0.0, f64::max);
                    avg += ps.iter().sum::<f64>() / ps.len() as f64;
                }
                line.push_str(&format!(
                    " c{:.1}{}]",
                    100.0 * (got - avg) / (top - avg),
                    if p.uses_expansion() { " alt" } else { "" }
                ));
            }
        }
        let m =
            pop.oracle_after_random_batch(budget, s.campaign_spec().nominal_batch_size(0), s.seed);
        let l = (m - ra) / (oa - ra);
        sums[variants.len()] += l;
        line.push_str(&format!(" | oracle+random first {:.1}", 100.0 * l));
        println!("{line}");
    }
    let n = args.len() as f64;
    for ((name, _), s) in variants.iter().zip(&sums) {
        println!("{name:<16} mean lift {:.1}%", 100.0 * s / n);
    }
    println!(
        "{:<16} mean lift {:.1}%",
        "oracle+random1",
        100.0 * sums[variants.len()] / n
    );
}
