//! Off-policy estimators on simulated logged feedback: their bootstrap
//! intervals cover the true value at about the stated rate; the CSV parser
//! never panics.

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use smartmsg_simulator::ope::estimate::{estimate, Options};
use smartmsg_simulator::ope::load::{parse_csv, Columns};
use smartmsg_simulator::ope::{LoggedData, TargetProbs};

const K: usize = 3;
const D: usize = 2;

fn softmax(s: [f64; K]) -> [f64; K] {
    let m = s.iter().cloned().fold(f64::MIN, f64::max);
    let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
    let t: f64 = e.iter().sum();
    [e[0] / t, e[1] / t, e[2] / t]
}

fn truth(x: &[f64; D], a: usize) -> f64 {
    let b = [-1.2, -0.6, -0.9];
    let w = [[0.8, -0.4], [-0.5, 0.3], [0.2, 0.9]];
    1.0 / (1.0 + (-(b[a] + w[a][0] * x[0] + w[a][1] * x[1])).exp())
}

fn logging(x: &[f64; D]) -> [f64; K] {
    let p = softmax([x[0], -x[0] + 0.5 * x[1], 0.3]);
    [
        0.1 / 3.0 + 0.9 * p[0],
        0.1 / 3.0 + 0.9 * p[1],
        0.1 / 3.0 + 0.9 * p[2],
    ]
}

fn target(x: &[f64; D]) -> [f64; K] {
    softmax([1.5 * x[1], 0.5 * x[0], -x[0] + x[1]])
}

fn context(rng: &mut ChaCha8Rng) -> [f64; D] {
    [rng.random_range(-1.0..1.0), rng.random_range(-1.0..1.0)]
}

fn pick(rng: &mut ChaCha8Rng, p: &[f64; K]) -> usize {
    let u: f64 = rng.random();
    let mut c = 0.0;
    for (a, q) in p.iter().enumerate() {
        c += q;
        if u < c {
            return a;
        }
    }
    K - 1
}

fn simulate(seed: u64, n: usize) -> (LoggedData, TargetProbs) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut d = LoggedData {
        feature_names: vec!["x0".into(), "x1".into()],
        actions: (0..K).map(|a| format!("a{a}")).collect(),
        ..LoggedData::default()
    };
    let mut probs = Vec::new();
    for _ in 0..n {
        let x = context(&mut rng);
        let mu = logging(&x);
        let a = pick(&mut rng, &mu);
        let r = if rng.random::<f64>() < truth(&x, a) {
            1.0
        } else {
            0.0
        };
        d.features.extend_from_slice(&x);
        d.action.push(a);
        d.reward.push(r);
        d.propensity.push(mu[a]);
        probs.extend_from_slice(&target(&x));
    }
    let t = TargetProbs::new(n, K, probs).unwrap();
    (d, t)
}

fn true_value() -> f64 {
    let mut rng = ChaCha8Rng::seed_from_u64(999);
    let m = 400_000;
    (0..m)
        .map(|_| {
            let x = context(&mut rng);
            let p = target(&x);
            (0..K).map(|a| p[a] * truth(&x, a)).sum::<f64>()
        })
        .sum::<f64>()
        / m as f64
}

#[test]
fn intervals_cover_the_true_value_at_about_the_stated_rate() {
    let v = true_value();
    let seeds = 100;
    let mut covered = std::collections::BTreeMap::<String, u32>::new();
    let mut err = std::collections::BTreeMap::<String, f64>::new();
    for seed in 0..seeds {
        let (data, t) = simulate(seed, 800);
        let est = estimate(&data, &t, &{
            let mut v = Options::default();
            v.bootstrap = 200;
            v.seed = seed;
            v
        })
        .unwrap();
        for e in est {
            if e.ci_low <= v && v <= e.ci_high {
                *covered.entry(e.estimator.clone()).or_default() += 1;
            }
            *err.entry(e.estimator).or_default() += (e.value - v).abs() / seeds as f64;
        }
    }
    eprintln!("true value {v:.4}; coverage of the 95 % CI over {seeds} seeds: {covered:?}; mean abs error {err:?}");
    for name in ["IPW", "SNIPW", "DR", "SNDR"] {
        let c = covered.get(name).copied().unwrap_or(0);
        assert!(c >= 85, "{name} covered {c} of {seeds}: {covered:?}");
    }
}

#[test]
fn logged_csv_round_trip_to_estimates() {
    let (data, _) = simulate(5, 300);
    let mut csv = String::from("t,x0,x1,seg,action,reward,p\n");
    for i in 0..data.len() {
        let seg = if data.x(i)[0] > 0.0 { "hi" } else { "lo" };
        csv.push_str(&format!(
            "{i},{},{},{seg},a{},{},{}\n",
            data.x(i)[0],
            data.x(i)[1],
            data.action[i],
            data.reward[i],
            data.propensity[i]
        ));
    }
    let cols = Columns {
        timestamp: Some("t".into()),
        features: vec!["x0".into(), "x1".into(), "seg".into()],
        action: "action".into(),
        slot: None,
        reward: "reward".into(),
        propensity: "p".into(),
        actions: None,
    };
    let d = parse_csv(csv.as_bytes(), std::path::Path::new("x.csv"), &cols).unwrap();
    assert_eq!(d.len(), 300);
    assert_eq!(d.dim(), 4);
    let uniform = TargetProbs::new(300, K, vec![1.0 / 3.0; 300 * K]).unwrap();
    let e = estimate(&d, &uniform, &Options::default()).unwrap();
    assert_eq!(e.len(), 6);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn csv_parser_never_panics(text in "[a-z0-9,.\\-\" \n]{0,300}") {
        let cols = Columns {
            timestamp: None,
            features: vec!["x".into(), "c".into()],
            action: "a".into(),
            slot: Some("s".into()),
            reward: "r".into(),
            propensity: "p".into(),
            actions: None,
        };
        let _ = parse_csv(format!("x,c,a,s,r,p\n{text}").as_bytes(), std::path::Path::new("p.csv"), &cols);
        let _ = parse_csv(text.as_bytes(), std::path::Path::new("p.csv"), &cols);
    }
}
