//! Policies: shapes, propensities, determinism, errors, and posterior
//! updates against closed-form references.

#![allow(clippy::needless_range_loop)]

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use smartmsg_domain::model::sigmoid;
use smartmsg_domain::{
    Candidates, CreativeThompson, Decisions, Defer, ExploreThenCommit, GaussianWeights, Integrated,
    Link, ModelConfig, Outcomes, PlanContext, Policy, PolicyError, Prior, Random, Targeting,
};

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` users (ids 1000+i) with `dim` uniform features in [-1, 1].
fn candidates(n: u32, dim: usize, seed: u64) -> Candidates {
    let mut r = rng(seed);
    let mut c = Candidates::with_capacity(dim, n as usize).unwrap();
    let mut x = vec![0f32; dim];
    for i in 0..n {
        for v in x.iter_mut() {
            *v = r.random_range(-1.0..1.0);
        }
        c.push(1000 + i, &x).unwrap();
    }
    c
}

fn check_decisions(d: &Decisions, c: &Candidates, k: usize, creatives: usize) {
    assert!(d.check_shape().is_ok());
    assert_eq!(d.len(), k);
    let mut last = None;
    for (u, cr, p) in d.iter() {
        assert!(c.users().contains(&u));
        assert!(usize::from(cr) < creatives);
        assert!(p > 0.0 && p <= 1.0, "propensity {p}");
        assert!(last < Some(u), "users in candidate order, distinct");
        last = Some(u);
    }
}

fn all_policies(creatives: usize, dim: usize) -> Vec<Box<dyn Policy>> {
    let cfg = {
        let mut v = ModelConfig::default();
        v.propensity_draws = 20;
        v
    };
    vec![
        Box::new(Random::new(creatives).unwrap()),
        Box::new(ExploreThenCommit::new(creatives, 10).unwrap()),
        Box::new(CreativeThompson::new(creatives, 500).unwrap()),
        Box::new(Targeting::new(creatives, 1, dim, cfg).unwrap()),
        Box::new(Integrated::new(creatives, dim, cfg).unwrap()),
    ]
}

#[test]
fn every_policy_plans_a_valid_deterministic_batch() {
    let c = candidates(500, 4, 1);
    let ctx = PlanContext::fresh(3, 5, 100);
    for p in all_policies(3, 4) {
        let a = p.plan(&ctx, &c, 40, &mut rng(9)).unwrap();
        check_decisions(&a, &c, 40, 3);
        let b = p.plan(&ctx, &c, 40, &mut rng(9)).unwrap();
        assert_eq!(a, b, "{} is deterministic given the seed", p.name());
        let other = p.plan(&ctx, &c, 40, &mut rng(10)).unwrap();
        assert_ne!(a, other, "{} depends on the seed", p.name());
        // Budget above the candidates: everyone; budget 0: nobody.
        let small = candidates(7, 4, 2);
        check_decisions(
            &p.plan(&ctx, &small, 40, &mut rng(1)).unwrap(),
            &small,
            7,
            3,
        );
        assert!(p.plan(&ctx, &small, 0, &mut rng(1)).unwrap().is_empty());
        let empty = Candidates::new(4).unwrap();
        assert!(p.plan(&ctx, &empty, 10, &mut rng(1)).unwrap().is_empty());
        assert!(p.name().len() <= 64);
    }
}

#[test]
fn policies_refuse_mismatched_inputs() {
    let c = candidates(50, 4, 1);
    for mut p in all_policies(3, 4) {
        let wrong = PlanContext::fresh(2, 5, 100);
        assert!(matches!(
            p.plan(&wrong, &c, 5, &mut rng(1)),
            Err(PolicyError::Creatives {
                policy: 3,
                campaign: 2
            })
        ));
        let mut o = Outcomes::new(4).unwrap();
        o.push(3, &[0.0; 4], 1, 1).unwrap();
        assert!(matches!(
            p.update(&o),
            Err(PolicyError::UnknownCreative {
                creative: 3,
                count: 3
            })
        ));
    }
    let ctx = PlanContext::fresh(3, 5, 100);
    let cfg = ModelConfig::default();
    let i = Integrated::new(3, 5, cfg).unwrap();
    assert!(matches!(
        i.plan(&ctx, &c, 5, &mut rng(1)),
        Err(PolicyError::Dimension {
            expected: 5,
            got: 4
        })
    ));
    let zero = {
        let mut v = cfg;
        v.propensity_draws = 0;
        v
    };
    assert!(matches!(
        Integrated::new(3, 4, zero),
        Err(PolicyError::Config(_))
    ));
    assert!(Targeting::new(3, 3, 4, cfg).is_err());
    assert!(Random::new(0).is_err());
}

#[test]
fn random_propensities_are_exact() {
    let c = candidates(200, 2, 3);
    let d = Random::new(4)
        .unwrap()
        .plan(&PlanContext::fresh(4, 1, 50), &c, 50, &mut rng(2))
        .unwrap();
    check_decisions(&d, &c, 50, 4);
    assert!(d.propensities.iter().all(|&p| p == 50.0 / 200.0 / 4.0));
}

#[test]
fn explore_then_commit_tests_equal_slices_then_commits_to_the_best() {
    let c = candidates(1000, 2, 4);
    let mut etc = ExploreThenCommit::new(3, 10).unwrap();
    let mut ctx = PlanContext::fresh(3, 5, 200);
    let d = etc.plan(&ctx, &c, 40, &mut rng(5)).unwrap();
    check_decisions(&d, &c, 40, 3);
    // 10 each for the test slices, the 10 left spread evenly.
    assert_eq!(d.per_creative(3), vec![14, 13, 13]);
    for (_, cr, p) in d.iter() {
        let k = d.per_creative(3)[usize::from(cr)];
        assert_eq!(p, k as f32 / 1000.0);
    }
    // Partly filled slices: only the deficit is tested, then spread.
    ctx.planned_per_creative = vec![10, 4, 0];
    let d = etc.plan(&ctx, &c, 16, &mut rng(5)).unwrap();
    assert_eq!(d.per_creative(3), vec![0, 6, 10]);
    // Results: creative 2 is best; slices full → everyone gets it.
    let mut o = Outcomes::new(2).unwrap();
    o.push(0, &[0.0, 0.0], 10, 1).unwrap();
    o.push(1, &[0.0, 0.0], 10, 2).unwrap();
    o.push(2, &[0.0, 0.0], 10, 5).unwrap();
    etc.update(&o).unwrap();
    assert_eq!(etc.leader(), 2);
    ctx.planned_per_creative = vec![10, 10, 10];
    let d = etc.plan(&ctx, &c, 100, &mut rng(6)).unwrap();
    assert_eq!(d.per_creative(3), vec![0, 0, 100]);
    assert!(d.propensities.iter().all(|&p| p == 0.1));
}

#[test]
fn thompson_posterior_is_the_closed_form_beta() {
    let mut t = CreativeThompson::new(2, 100).unwrap();
    let mut o = Outcomes::new(1).unwrap();
    o.push(0, &[0.5], 30, 4).unwrap();
    o.push(1, &[0.1], 1, 1).unwrap();
    o.push(0, &[-0.5], 1, 0).unwrap();
    t.update(&o).unwrap();
    let mut o2 = Outcomes::new(1).unwrap();
    o2.push(1, &[0.0], 9, 2).unwrap();
    t.update(&o2).unwrap();
    // Beta(1 + successes, 1 + failures).
    assert_eq!((t.arms()[0].alpha, t.arms()[0].beta), (5.0, 28.0));
    assert_eq!((t.arms()[1].alpha, t.arms()[1].beta), (4.0, 8.0));
}

/// The Monte Carlo propensity of a choice approximates how often the
/// policy, re-run with fresh randomness, makes that choice. `chooser` is
/// the same policy with fewer propensity draws (its choices are the same).
fn propensities_match_choice_frequencies(
    policy: &dyn Policy,
    chooser: &dyn Policy,
    creatives: usize,
    tolerance: f64,
) {
    let ctx = PlanContext::fresh(creatives, 1, 100);
    propensities_match_choice_frequencies_in(policy, chooser, &ctx, tolerance);
}

/// [`propensities_match_choice_frequencies`] for the plan of `ctx`.
fn propensities_match_choice_frequencies_in(
    policy: &dyn Policy,
    chooser: &dyn Policy,
    ctx: &PlanContext,
    tolerance: f64,
) {
    let c = candidates(40, 3, 11);
    let ctx = ctx.clone();
    let k = 8;
    let runs = 3000;
    let mut freq = std::collections::HashMap::<(u32, u16), u32>::new();
    for s in 0..runs {
        for (u, cr, _) in chooser
            .plan(&ctx, &c, k, &mut rng(10_000 + s))
            .unwrap()
            .iter()
        {
            *freq.entry((u, cr)).or_default() += 1;
        }
    }
    let mut worst = 0f64;
    for s in 0..5 {
        let d = policy.plan(&ctx, &c, k, &mut rng(s)).unwrap();
        for (u, cr, p) in d.iter() {
            let f = f64::from(freq.get(&(u, cr)).copied().unwrap_or(0)) / runs as f64;
            worst = worst.max((f - f64::from(p)).abs());
        }
    }
    assert!(
        worst < tolerance,
        "{}: worst |freq - p| = {worst}",
        policy.name()
    );
}

#[test]
fn integrated_propensities_estimate_choice_frequencies() {
    let cfg = {
        let mut v = ModelConfig::default();
        v.propensity_draws = 2000;
        v
    };
    // A posterior with some information so choices are neither certain nor
    // uniform.
    let mut p = Integrated::new(2, 3, cfg).unwrap();
    let mut o = Outcomes::new(3).unwrap();
    let mut r = rng(3);
    for _ in 0..200 {
        let x = [r.random_range(-1.0..1.0), r.random_range(-1.0..1.0), 0.0f32];
        let y0 = r.random_bool(sigmoid(-2.0 + 2.0 * f64::from(x[0])));
        let y1 = r.random_bool(sigmoid(-2.0 + 2.0 * f64::from(x[1])));
        o.push(0, &x, 1, u32::from(y0)).unwrap();
        o.push(1, &x, 1, u32::from(y1)).unwrap();
    }
    p.update(&o).unwrap();
    let mut fast = p.clone();
    fast.set_propensity_draws(1).unwrap();
    propensities_match_choice_frequencies(&p, &fast, 2, 0.05);
    let t = Targeting::new(2, 0, 3, cfg).unwrap();
    let mut fast = t.clone();
    fast.set_propensity_draws(1).unwrap();
    propensities_match_choice_frequencies(&t, &fast, 2, 0.05);
}

/// Two creatives, creative 0 responding to `x0` and creative 1 to `x1`:
/// an integrated policy that has learned from 200 users each.
fn two_creative_policy(cfg: ModelConfig, seed: u64) -> Integrated {
    let mut p = Integrated::new(2, 3, cfg).unwrap();
    let mut o = Outcomes::new(3).unwrap();
    let mut r = rng(seed);
    for _ in 0..200 {
        let x = [r.random_range(-1.0..1.0), r.random_range(-1.0..1.0), 0.0f32];
        let y0 = r.random_bool(sigmoid(-2.0 + 2.0 * f64::from(x[0])));
        let y1 = r.random_bool(sigmoid(-2.0 + 2.0 * f64::from(x[1])));
        o.push(0, &x, 1, u32::from(y0)).unwrap();
        o.push(1, &x, 1, u32::from(y1)).unwrap();
    }
    p.update(&o).unwrap();
    p
}

#[test]
fn deferral_sends_clear_creatives_first_and_keeps_propensities_honest() {
    // The plain model plans (no hinge columns: deferral is off while
    // they plan).
    let cfg = {
        let mut v = ModelConfig::default();
        v.propensity_draws = 2000;
        v.expansion = smartmsg_domain::Expansion::None;
        v
    };
    assert!(matches!(cfg.defer, Defer::Ambiguous { .. }));
    let p = two_creative_policy(cfg, 3);
    let none = two_creative_policy(
        {
            let mut v = cfg;
            v.defer = Defer::None;
            v
        },
        3,
    );
    let early = PlanContext {
        batch: 1,
        ..PlanContext::fresh(2, 10, 1_000)
    };
    let last = PlanContext {
        batch: 9,
        ..PlanContext::fresh(2, 10, 1_000)
    };
    let c = candidates(400, 3, 9);
    // The last batch has nothing to wait for: the plan is the same.
    assert_eq!(
        p.plan(&last, &c, 40, &mut rng(1)).unwrap(),
        none.plan(&last, &c, 40, &mut rng(1)).unwrap()
    );
    // Earlier, the users sent have creatives further apart.
    let gap = |d: &Decisions| {
        let total: f64 = d
            .iter()
            .map(|(u, _, _)| {
                let row = (u - 1000) as usize;
                let r = p.expected_response(c.row(row));
                (r[0] - r[1]).abs()
            })
            .sum();
        total / d.len() as f64
    };
    let deferred = p.plan(&early, &c, 40, &mut rng(1)).unwrap();
    let plain = none.plan(&early, &c, 40, &mut rng(1)).unwrap();
    assert_ne!(deferred, plain);
    assert!(
        gap(&deferred) > gap(&plain),
        "{} vs {}",
        gap(&deferred),
        gap(&plain)
    );
    // Propensities still estimate the choice frequencies, some strictly
    // inside (0, 1).
    assert!(deferred.iter().any(|(_, _, q)| q > 0.0 && q < 1.0));
    let mut fast = p.clone();
    fast.set_propensity_draws(1).unwrap();
    propensities_match_choice_frequencies_in(&p, &fast, &early, 0.05);
}

#[test]
fn thompson_propensities_estimate_choice_frequencies() {
    let mut t = CreativeThompson::new(3, 5000).unwrap();
    let mut o = Outcomes::new(3).unwrap();
    o.push(0, &[0.0; 3], 20, 2).unwrap();
    o.push(1, &[0.0; 3], 20, 4).unwrap();
    o.push(2, &[0.0; 3], 20, 3).unwrap();
    t.update(&o).unwrap();
    let mut fast = t.clone();
    fast.set_propensity_draws(0);
    propensities_match_choice_frequencies(&t, &fast, 3, 0.03);
    let r = Random::new(3).unwrap();
    propensities_match_choice_frequencies(&r, &r, 3, 0.03);
}

/// Solves `a x = b` by Gauss-Jordan elimination (reference only).
fn solve(mut a: Vec<f64>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for col in 0..n {
        let piv = (col..n)
            .max_by(|&i, &j| a[i * n + col].abs().total_cmp(&a[j * n + col].abs()))
            .unwrap();
        for k in 0..n {
            a.swap(col * n + k, piv * n + k);
        }
        b.swap(col, piv);
        let d = a[col * n + col];
        for i in 0..n {
            if i != col {
                let f = a[i * n + col] / d;
                for k in 0..n {
                    a[i * n + k] -= f * a[col * n + k];
                }
                b[i] -= f * b[col];
            }
        }
    }
    (0..n).map(|i| b[i] / a[i * n + i]).collect()
}

fn rows(o: &Outcomes) -> Vec<smartmsg_domain::data::OutcomeRow<'_>> {
    o.rows().collect()
}

#[test]
fn bayesian_linear_update_matches_the_closed_form() {
    let prior = Prior {
        intercept_mean: 0.1,
        intercept_variance: 2.0,
        weight_variance: 0.5,
    };
    let sigma2 = 0.2;
    let link = Link::Linear {
        noise_variance: sigma2,
    };
    let mut r = rng(21);
    let dim = 3;
    let mut all = Outcomes::new(dim).unwrap();
    let mut first = Outcomes::new(dim).unwrap();
    let mut second = Outcomes::new(dim).unwrap();
    for i in 0..40 {
        let x: Vec<f32> = (0..dim).map(|_| r.random_range(-1.0..1.0)).collect();
        let trials = r.random_range(1..4);
        let successes = r.random_range(0..=trials);
        all.push(0, &x, trials, successes).unwrap();
        if i < 15 { &mut first } else { &mut second }
            .push(0, &x, trials, successes)
            .unwrap();
    }
    let mut one_shot = GaussianWeights::new(dim, &prior).unwrap();
    one_shot.update(link, &rows(&all)).unwrap();

    // Reference: P = P0 + Σ n x̃x̃ᵀ/σ², m = P⁻¹ (P0 m0 + Σ s x̃/σ²).
    let n = dim + 1;
    let mut p = vec![0.0; n * n];
    p[0] = 1.0 / prior.intercept_variance;
    for i in 1..n {
        p[i * n + i] = 1.0 / prior.weight_variance;
    }
    let mut b = vec![0.0; n];
    b[0] = prior.intercept_mean / prior.intercept_variance;
    for row in all.rows() {
        let xt: Vec<f64> = std::iter::once(1.0)
            .chain(row.x.iter().map(|&v| f64::from(v)))
            .collect();
        for i in 0..n {
            for j in 0..n {
                p[i * n + j] += f64::from(row.trials) * xt[i] * xt[j] / sigma2;
            }
            b[i] += f64::from(row.successes) * xt[i] / sigma2;
        }
    }
    let m = solve(p.clone(), b);
    for i in 0..n {
        assert!((one_shot.mean()[i] - m[i]).abs() < 1e-10, "mean {i}");
        for j in 0..n {
            assert!((one_shot.precision()[i * n + j] - p[i * n + j]).abs() < 1e-9);
        }
    }
    // Conjugate: two windows in sequence give the same posterior.
    let mut seq = GaussianWeights::new(dim, &prior).unwrap();
    seq.update(link, &rows(&first)).unwrap();
    seq.update(link, &rows(&second)).unwrap();
    for i in 0..n {
        assert!((seq.mean()[i] - m[i]).abs() < 1e-10);
    }
    // Covariance is the precision's inverse.
    let cov = one_shot.covariance();
    for i in 0..n {
        for j in 0..n {
            let e: f64 = (0..n).map(|k| p[i * n + k] * cov[k * n + j]).sum();
            assert!((e - f64::from(u8::from(i == j))).abs() < 1e-9);
        }
    }
}

#[test]
fn laplace_update_matches_a_one_dimensional_reference() {
    // Only the intercept is informed (x = 0): the mode solves
    // -p0 (b - m0) + s - n σ(b) = 0, the precision is p0 + n σ(1-σ).
    let prior = Prior::default();
    let (n, s) = (50u32, 7u32);
    let mut o = Outcomes::new(1).unwrap();
    o.push(0, &[0.0], n, s).unwrap();
    let mut w = GaussianWeights::new(1, &prior).unwrap();
    let report = w.update(Link::Logistic, &rows(&o)).unwrap();
    assert!(report.iterations > 0 && report.iterations < 20);
    let p0 = 1.0 / prior.intercept_variance;
    let f = |b: f64| -p0 * (b - prior.intercept_mean) + f64::from(s) - f64::from(n) * sigmoid(b);
    let (mut lo, mut hi) = (-20.0, 20.0);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if f(mid) > 0.0 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let mode = 0.5 * (lo + hi);
    let q = sigmoid(mode);
    assert!(
        (w.mean()[0] - mode).abs() < 1e-8,
        "{} vs {mode}",
        w.mean()[0]
    );
    assert!((w.precision()[0] - (p0 + f64::from(n) * q * (1.0 - q))).abs() < 1e-8);
    // The weight is untouched.
    assert!(w.mean()[1].abs() < 1e-12);
    assert!((w.precision()[3] - 1.0 / prior.weight_variance).abs() < 1e-12);
}

#[test]
fn laplace_update_is_at_the_mode_and_buckets_equal_per_user_rows() {
    let mut r = rng(8);
    let dim = 4;
    let truth = [-1.5, 1.0, -0.5, 0.25, 0.0];
    let mut per_user = Outcomes::new(dim).unwrap();
    let mut bucketed = Outcomes::new(dim).unwrap();
    // 16 buckets of identical features, 30 users each.
    for _ in 0..16 {
        let x: Vec<f32> = (0..dim).map(|_| r.random_range(-1.0..1.0)).collect();
        let z = truth[0]
            + truth[1..]
                .iter()
                .zip(&x)
                .map(|(a, &b)| a * f64::from(b))
                .sum::<f64>();
        let mut hits = 0;
        for _ in 0..30 {
            let y = r.random_bool(sigmoid(z));
            hits += u32::from(y);
            per_user.push(0, &x, 1, u32::from(y)).unwrap();
        }
        bucketed.push(0, &x, 30, hits).unwrap();
    }
    let mut a = GaussianWeights::new(dim, &Prior::default()).unwrap();
    let mut b = a.clone();
    a.update(Link::Logistic, &rows(&per_user)).unwrap();
    b.update(Link::Logistic, &rows(&bucketed)).unwrap();
    for i in 0..=dim {
        assert!((a.mean()[i] - b.mean()[i]).abs() < 1e-9);
    }
    // First-order optimality: the log posterior's gradient vanishes.
    let prior = GaussianWeights::new(dim, &Prior::default()).unwrap();
    let n = dim + 1;
    let m = a.mean();
    let mut grad: Vec<f64> = (0..n)
        .map(|i| {
            -(0..n)
                .map(|j| prior.precision()[i * n + j] * (m[j] - prior.mean()[j]))
                .sum::<f64>()
        })
        .collect();
    for row in per_user.rows() {
        let z = m[0]
            + m[1..]
                .iter()
                .zip(row.x)
                .map(|(a, &b)| a * f64::from(b))
                .sum::<f64>();
        let e = f64::from(row.successes) - sigmoid(z);
        grad[0] += e;
        for (g, &x) in grad[1..].iter_mut().zip(row.x) {
            *g += e * f64::from(x);
        }
    }
    assert!(grad.iter().all(|g| g.abs() < 1e-6), "{grad:?}");
}

#[test]
fn laplace_updates_recover_the_true_weights_window_by_window() {
    let mut r = rng(13);
    let dim = 3;
    let truth = [-2.0, 1.2, -0.8, 0.4];
    let mut w = GaussianWeights::new(dim, &Prior::default()).unwrap();
    for _window in 0..20 {
        let mut o = Outcomes::new(dim).unwrap();
        for _ in 0..1000 {
            let x: Vec<f32> = (0..dim).map(|_| r.random_range(-1.5..1.5)).collect();
            let z = truth[0]
                + truth[1..]
                    .iter()
                    .zip(&x)
                    .map(|(a, &b)| a * f64::from(b))
                    .sum::<f64>();
            o.push(0, &x, 1, u32::from(r.random_bool(sigmoid(z))))
                .unwrap();
        }
        w.update(Link::Logistic, &rows(&o)).unwrap();
    }
    for (i, t) in truth.iter().enumerate() {
        assert!(
            (w.mean()[i] - t).abs() < 0.12,
            "w[{i}] = {} vs {t}",
            w.mean()[i]
        );
    }
}

#[test]
fn policies_serialise_with_their_models() {
    let cfg = ModelConfig::default();
    let mut p = Integrated::new(2, 2, cfg).unwrap();
    let mut o = Outcomes::new(2).unwrap();
    o.push(1, &[0.5, -0.5], 10, 3).unwrap();
    p.update(&o).unwrap();
    let json = serde_json::to_string(&p).unwrap();
    let back: Integrated = serde_json::from_str(&json).unwrap();
    assert_eq!(back, p);
    let t = CreativeThompson::new(3, 10).unwrap();
    let back: CreativeThompson = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
    assert_eq!(back, t);
}

#[test]
fn targeting_sends_only_its_creative_and_learns_only_from_it() {
    let cfg = {
        let mut c = ModelConfig::default();
        c.propensity_draws = 10;
        c
    };
    let mut t = Targeting::new(3, 2, 2, cfg).unwrap();
    let c = candidates(300, 2, 5);
    let d = t
        .plan(&PlanContext::fresh(3, 1, 50), &c, 30, &mut rng(1))
        .unwrap();
    assert_eq!(d.per_creative(3), vec![0, 0, 30]);
    let before = t.model().clone();
    let mut o = Outcomes::new(2).unwrap();
    o.push(0, &[1.0, 1.0], 100, 90).unwrap();
    t.update(&o).unwrap();
    assert_eq!(t.model(), &before);
    o.push(2, &[1.0, 1.0], 100, 90).unwrap();
    t.update(&o).unwrap();
    assert_ne!(t.model(), &before);
}

#[test]
fn integrated_greedy_plan_picks_the_best_expected_creative() {
    let mut p = Integrated::new(2, 1, ModelConfig::default()).unwrap();
    let mut o = Outcomes::new(1).unwrap();
    // Creative 0 works for x > 0, creative 1 for x < 0.
    for i in 0..40 {
        let x = (i as f32 - 19.5) / 10.0;
        o.push(0, &[x], 50, if x > 0.0 { 20 } else { 1 }).unwrap();
        o.push(1, &[x], 50, if x < 0.0 { 20 } else { 1 }).unwrap();
    }
    p.update(&o).unwrap();
    let c = Candidates::from_parts(1, vec![1, 2, 3], vec![-1.5, 0.0, 1.5]).unwrap();
    let d = p.plan_greedy(&c, 2).unwrap();
    assert_eq!(d.users, vec![1, 3]);
    assert_eq!(d.creatives, vec![1, 0]);
    let e = p.expected_response(&[1.5]);
    assert!(e[0] > 0.3 && e[1] < 0.1, "{e:?}");
}

#[test]
fn optimistic_scoring_explores_near_the_cut_off() {
    // The default scoring randomises: with an informed posterior, some
    // chosen users have propensities strictly inside (0, 1), and the
    // same generator state gives the same plan.
    let cfg = {
        let mut c = ModelConfig::default();
        c.propensity_draws = 200;
        c
    };
    assert!(matches!(
        cfg.scoring,
        smartmsg_domain::Scoring::Optimistic { .. }
    ));
    let mut p = Integrated::new(2, 3, cfg).unwrap();
    let mut o = Outcomes::new(3).unwrap();
    let mut r = rng(5);
    for _ in 0..300 {
        let x = [r.random_range(-1.0..1.0), r.random_range(-1.0..1.0), 0.0f32];
        let y0 = r.random_bool(sigmoid(-2.0 + 2.0 * f64::from(x[0])));
        let y1 = r.random_bool(sigmoid(-2.0 + 2.0 * f64::from(x[1])));
        o.push(0, &x, 1, u32::from(y0)).unwrap();
        o.push(1, &x, 1, u32::from(y1)).unwrap();
    }
    p.update(&o).unwrap();
    let c = candidates(200, 3, 7);
    let ctx = PlanContext::fresh(2, 5, 1_000);
    let d = p.plan(&ctx, &c, 40, &mut rng(1)).unwrap();
    let inside = d.iter().filter(|&(_, _, q)| q > 0.0 && q < 1.0).count();
    assert!(inside > 0, "no propensity strictly inside (0, 1)");
    assert!(d.iter().all(|(_, _, q)| q > 0.0 && q <= 1.0));
    assert_eq!(d, p.plan(&ctx, &c, 40, &mut rng(1)).unwrap());
    // The old scoring stays reachable, and also explores.
    let old = {
        let mut c = cfg;
        c.scoring = smartmsg_domain::Scoring::SharedDraw;
        c.expansion = smartmsg_domain::Expansion::None;
        c
    };
    let mut q = Integrated::new(2, 3, old).unwrap();
    q.update(&o).unwrap();
    let d = q.plan(&ctx, &c, 40, &mut rng(1)).unwrap();
    assert!(d.iter().any(|(_, _, q)| q > 0.0 && q < 1.0));
}

#[test]
fn bad_scoring_and_expansion_settings_are_refused() {
    let bad = {
        let mut c = ModelConfig::default();
        c.scoring = smartmsg_domain::Scoring::Optimistic {
            bonus: -1.0,
            noise: 0.5,
        };
        c
    };
    assert!(matches!(
        Integrated::new(2, 3, bad),
        Err(PolicyError::Config(_))
    ));
    let bad = {
        let mut c = ModelConfig::default();
        c.expansion = smartmsg_domain::Expansion::Hinges { knots: 0 };
        c
    };
    assert!(matches!(
        Integrated::new(2, 3, bad),
        Err(PolicyError::Config(_))
    ));
    // A spec recorded before issue 14 (no scoring, no expansion) still
    // parses, with the defaults.
    let spec: smartmsg_domain::PolicySpec = serde_json::from_str(
        r#"{"kind":"integrated","model":{"link":"Logistic","prior":{"intercept_mean":-3.0,"intercept_variance":4.0,"weight_variance":1.0},"propensity_draws":100,"random_first_batch":true}}"#,
    )
    .unwrap();
    let smartmsg_domain::PolicySpec::Integrated { model } = spec else {
        panic!("not integrated");
    };
    assert_eq!(model.scoring, smartmsg_domain::Scoring::default());
    assert_eq!(model.expansion, smartmsg_domain::Expansion::default());
}

#[test]
fn evidence_picks_the_hinge_expansion_only_where_it_helps() {
    // Reactions with a threshold and a curve in x0, x1 versus reactions
    // linear in them: the expanded model plans for the first only.
    for (bent, want) in [(true, true), (false, false)] {
        let mut p = Integrated::new(2, 3, ModelConfig::default()).unwrap();
        let mut r = rng(9);
        for _batch in 0..3 {
            let mut o = Outcomes::new(3).unwrap();
            for _ in 0..6_000 {
                let x: [f32; 3] = [
                    r.random_range(-2.0..2.0),
                    r.random_range(-2.0..2.0),
                    r.random_range(-2.0..2.0),
                ];
                let (a, b) = (f64::from(x[0]), f64::from(x[1]));
                let z = if bent {
                    -3.0 + 2.0 * f64::from(u8::from(a > 0.5)) + 0.8 * b * b
                } else {
                    -2.5 + 0.6 * a + 0.4 * b
                };
                let c = r.random_range(0..2u16);
                o.push(c, &x, 1, u32::from(r.random_bool(sigmoid(z))))
                    .unwrap();
            }
            p.update(&o).unwrap();
        }
        assert_eq!(p.uses_expansion(), want, "bent truth: {bent}");
        // Either way the plan is valid and its propensities in (0, 1].
        let c = candidates(500, 3, 4);
        let d = p
            .plan(&PlanContext::fresh(2, 5, 1_000), &c, 50, &mut rng(2))
            .unwrap();
        check_decisions(&d, &c, 50, 2);
    }
}
