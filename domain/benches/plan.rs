//! Planning and model-update benchmarks on one core.
//!
//! ```sh
//! cargo bench -p smartmsg-domain --bench plan            # full run
//! cargo bench -p smartmsg-domain --bench plan -- --quick # fewer repetitions
//! cargo bench -p smartmsg-domain --bench plan -- "1 draw" --reps 200 # only the cases
//!                                        # whose name holds "1 draw", 200 runs each (profiling)
//! ```
//!
//! Plans one batch of 10,000 for 300,000 candidates × 4 creatives × 16
//! features (targets: ≤ 50 ms for one posterior draw with scoring and top-B,
//! ≤ 2 s with propensities from 100 draws), and measures model updates from
//! aggregated reactions. Prints a table of medians.

use std::hint::black_box;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use smartmsg_domain::model::sigmoid;
use smartmsg_domain::{
    Candidates, CreativeThompson, ExploreThenCommit, Integrated, ModelConfig, Outcomes,
    PlanContext, Policy, Random, Targeting,
};

const USERS: u32 = 300_000;
const CREATIVES: usize = 4;
const DIM: usize = 16;
const BATCH: usize = 10_000;

struct Row {
    name: String,
    median: Duration,
    min: Duration,
    runs: usize,
    note: String,
}

/// The command line: `--quick`, `--reps N` (runs per case), and a filter
/// (a case runs when its name holds it). Cargo's own `--bench` is ignored.
struct Args {
    quick: bool,
    reps: Option<usize>,
    filter: Option<String>,
}

fn args() -> &'static Args {
    static ARGS: std::sync::OnceLock<Args> = std::sync::OnceLock::new();
    ARGS.get_or_init(|| {
        let mut out = Args {
            quick: false,
            reps: None,
            filter: None,
        };
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            match a.as_str() {
                "--quick" => out.quick = true,
                "--reps" => out.reps = it.next().and_then(|n| n.parse().ok()),
                "--bench" => {}
                _ if !a.starts_with('-') => out.filter = Some(a),
                _ => {}
            }
        }
        out
    })
}

fn measure(
    name: &str,
    runs: usize,
    note: impl Fn(Duration) -> String,
    mut f: impl FnMut(),
) -> Option<Row> {
    if args().filter.as_deref().is_some_and(|w| !name.contains(w)) {
        return None;
    }
    let runs = args().reps.unwrap_or(runs);
    f(); // warm-up
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    let median = times[times.len() / 2];
    Some(Row {
        name: name.to_owned(),
        median,
        min: times[0],
        runs,
        note: note(median),
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let quick = args().quick;
    let reps = |n: usize| if quick { n.div_ceil(3).max(1) } else { n };
    let mut rng = ChaCha8Rng::seed_from_u64(42);

    // The population: standard normal features, creative-specific logistic
    // weights.
    let features: Vec<f32> = (0..USERS as usize * DIM)
        .map(|_| {
            let z: f64 = StandardNormal.sample(&mut rng);
            z as f32
        })
        .collect();
    let candidates = Candidates::from_parts(DIM, (0..USERS).collect(), features).unwrap();
    let truth: Vec<f64> = (0..CREATIVES * DIM)
        .map(|_| 0.3 * rng.random_range(-1.0..1.0))
        .collect();
    let respond = |rng: &mut ChaCha8Rng, c: usize, x: &[f32]| -> bool {
        let z = -3.0
            + truth[c * DIM..(c + 1) * DIM]
                .iter()
                .zip(x)
                .map(|(w, &v)| w * f64::from(v))
                .sum::<f64>();
        rng.random_bool(sigmoid(z))
    };

    // Per-user outcomes of a first batch (10,000 users, creatives at
    // random), and the same as a windowed aggregate: per creative × 64
    // buckets (bucket = sign pattern of the first 6 features, centroid).
    let mut per_user = Outcomes::new(DIM).unwrap();
    let mut bucket_sum = vec![0f64; CREATIVES * 64 * DIM];
    let mut bucket_counts = vec![(0u32, 0u32); CREATIVES * 64];
    for u in 0..BATCH {
        let c = rng.random_range(0..CREATIVES);
        let x = candidates.row(u);
        let y = respond(&mut rng, c, x);
        per_user.push(c as u16, x, 1, u32::from(y)).unwrap();
        let b = (0..6).fold(0, |acc, j| acc * 2 + usize::from(x[j] > 0.0));
        let slot = c * 64 + b;
        for (s, &v) in bucket_sum[slot * DIM..(slot + 1) * DIM].iter_mut().zip(x) {
            *s += f64::from(v);
        }
        bucket_counts[slot].0 += 1;
        bucket_counts[slot].1 += u32::from(y);
    }
    let mut buckets = Outcomes::new(DIM).unwrap();
    for (slot, &(n, s)) in bucket_counts.iter().enumerate() {
        if n > 0 {
            let centroid: Vec<f32> = bucket_sum[slot * DIM..(slot + 1) * DIM]
                .iter()
                .map(|v| (v / f64::from(n)) as f32)
                .collect();
            buckets.push((slot / 64) as u16, &centroid, n, s).unwrap();
        }
    }

    let cfg = |draws| {
        let mut v = ModelConfig::default();
        v.propensity_draws = draws;
        v
    };
    let mut integrated_1 = Integrated::new(CREATIVES, DIM, cfg(1)).unwrap();
    integrated_1.update(&per_user).unwrap();
    let mut integrated_100 = integrated_1.clone();
    integrated_100.set_propensity_draws(100).unwrap();
    let mut targeting_1 = Targeting::new(CREATIVES, 0, DIM, cfg(1)).unwrap();
    targeting_1.update(&per_user).unwrap();
    let mut targeting_100 = targeting_1.clone();
    targeting_100.set_propensity_draws(100).unwrap();
    let mut thompson = CreativeThompson::new(CREATIVES, 1000).unwrap();
    thompson.update(&per_user).unwrap();
    let etc = ExploreThenCommit::new(CREATIVES, 2_500).unwrap();
    let random = Random::new(CREATIVES).unwrap();
    let ctx = PlanContext::fresh(CREATIVES, 10, 100_000);

    let per_plan =
        |d: Duration| format!("{:.1} M candidates/s", USERS as f64 / d.as_secs_f64() / 1e6);
    let mut rows = Vec::new();
    // The batch planned (a few cases plan a larger share of the audience).
    let batch = std::cell::Cell::new(BATCH);
    let mut plan_row = |name: &str, runs: usize, p: &dyn Policy, draws: u32| {
        let mut seed = 0;
        let row = measure(
            name,
            runs,
            |d| {
                if draws > 1 {
                    format!("{:.1} ms per draw", ms(d) / f64::from(draws))
                } else {
                    per_plan(d)
                }
            },
            || {
                seed += 1;
                let d = p
                    .plan(
                        &ctx,
                        &candidates,
                        batch.get(),
                        &mut ChaCha8Rng::seed_from_u64(seed),
                    )
                    .unwrap();
                assert_eq!(d.len(), batch.get());
                black_box(d);
            },
        );
        rows.extend(row);
    };
    plan_row(
        "plan integrated, 1 draw (score + top-B)",
        reps(15),
        &integrated_1,
        1,
    );
    plan_row(
        "plan integrated, 100 draws (propensities)",
        reps(3),
        &integrated_100,
        100,
    );
    // A tenth of the audience in one batch, as the `platform` scenario
    // plans (100,000 of 1,000,000): many more candidates are contested in
    // the propensity draws.
    batch.set(USERS as usize / 10);
    plan_row(
        "plan integrated, 100 draws, batch of a tenth (propensities)",
        reps(3),
        &integrated_100,
        100,
    );
    batch.set(BATCH);
    // Without deferring ambiguous creatives (the third round's default).
    let mut undeferred = Integrated::new(CREATIVES, DIM, {
        let mut v = cfg(1);
        v.defer = smartmsg_domain::Defer::None;
        v
    })
    .unwrap();
    undeferred.update(&per_user).unwrap();
    plan_row(
        "plan integrated, no deferral, 1 draw",
        reps(15),
        &undeferred,
        1,
    );
    // The scoring before issue 14 (one shared posterior draw, no
    // expansion), for comparison.
    let old = |draws| {
        let mut v = ModelConfig::default();
        v.propensity_draws = draws;
        v.scoring = smartmsg_domain::Scoring::SharedDraw;
        v.expansion = smartmsg_domain::Expansion::None;
        v.pooling = smartmsg_domain::Pooling::None;
        v.transform = smartmsg_domain::Transform::None;
        v
    };
    let mut old_1 = Integrated::new(CREATIVES, DIM, old(1)).unwrap();
    old_1.update(&per_user).unwrap();
    let mut old_100 = old_1.clone();
    old_100.set_propensity_draws(100).unwrap();
    plan_row(
        "plan integrated, shared draw (old), 1 draw",
        reps(15),
        &old_1,
        1,
    );
    plan_row(
        "plan integrated, shared draw (old), 100 draws",
        reps(3),
        &old_100,
        100,
    );
    // The expanded model planning: responses with a threshold and a
    // curve, which the hinge columns fit better (checked by evidence).
    let mut bent = Outcomes::new(DIM).unwrap();
    for u in 0..BATCH {
        let c = rng.random_range(0..CREATIVES);
        let x = candidates.row(u);
        let z = -3.0
            + 1.5 * f64::from(u8::from(x[0] > 0.5))
            + 0.8 * f64::from(x[1]).abs()
            + 0.3 * f64::from(x[2 + c]);
        let y = rng.random_bool(sigmoid(z));
        bent.push(c as u16, x, 1, u32::from(y)).unwrap();
    }
    let mut expanded_1 = Integrated::new(CREATIVES, DIM, cfg(1)).unwrap();
    expanded_1.update(&bent).unwrap();
    assert!(
        expanded_1.uses_expansion(),
        "the bench's bent responses should select the expansion"
    );
    let mut expanded_100 = expanded_1.clone();
    expanded_100.set_propensity_draws(100).unwrap();
    plan_row(
        "plan integrated, expanded model (32 columns), 1 draw",
        reps(9),
        &expanded_1,
        1,
    );
    plan_row(
        "plan integrated, expanded model (32 columns), 100 draws",
        reps(3),
        &expanded_100,
        100,
    );
    plan_row("plan targeting, 1 draw", reps(15), &targeting_1, 1);
    plan_row("plan targeting, 100 draws", reps(3), &targeting_100, 100);
    plan_row(
        "plan creative-thompson (1000 MC draws)",
        reps(15),
        &thompson,
        1,
    );
    plan_row("plan explore-then-commit", reps(15), &etc, 1);
    plan_row("plan random", reps(15), &random, 1);

    let base = Integrated::new(CREATIVES, DIM, cfg(1)).unwrap();
    let rate =
        |n: usize| move |d: Duration| format!("{:.2} M rows/s", n as f64 / d.as_secs_f64() / 1e6);
    rows.extend(measure(
        "update integrated: 10,000 per-user outcomes",
        reps(9),
        rate(per_user.len()),
        || {
            let mut m = base.clone();
            m.update(&per_user).unwrap();
            black_box(m);
        },
    ));
    rows.extend(measure(
        &format!(
            "update integrated: one window, {} creative x bucket rows",
            buckets.len()
        ),
        reps(15),
        rate(buckets.len()),
        || {
            let mut m = base.clone();
            m.update(&buckets).unwrap();
            black_box(m);
        },
    ));
    let linear = Integrated::new(CREATIVES, DIM, {
        let mut c = cfg(1);
        c.link = smartmsg_domain::Link::Linear {
            noise_variance: 0.05,
        };
        c
    })
    .unwrap();
    rows.extend(measure(
        "update integrated (linear): 10,000 per-user outcomes",
        reps(9),
        rate(per_user.len()),
        || {
            let mut m = linear.clone();
            m.update(&per_user).unwrap();
            black_box(m);
        },
    ));
    rows.extend(measure(
        "update creative-thompson: 10,000 per-user outcomes",
        reps(15),
        rate(per_user.len()),
        || {
            let mut m = thompson.clone();
            m.update(&per_user).unwrap();
            black_box(m);
        },
    ));

    println!(
        "\nsmartmsg-domain plan benchmark: {USERS} candidates x {CREATIVES} creatives x {DIM} features, batch {BATCH}, one core\n"
    );
    println!(
        "| {:<58} | {:>11} | {:>11} | {:>4} | {:<24} |",
        "case", "median ms", "min ms", "runs", "rate"
    );
    println!(
        "|{:-<60}|{:->13}|{:->13}|{:->6}|{:-<26}|",
        "", "", "", "", ""
    );
    for r in &rows {
        println!(
            "| {:<58} | {:>11.2} | {:>11.2} | {:>4} | {:<24} |",
            r.name,
            ms(r.median),
            ms(r.min),
            r.runs,
            r.note
        );
    }
    println!("\ntargets: 1 draw + scoring + top-B <= 50 ms; with 100 propensity draws <= 2000 ms");
}
