//! `smartmsg`: simulate campaigns on the real engine, inspect data
//! directories.
#![forbid(unsafe_code)]

#[cfg(feature = "distributed")]
mod distributed;
mod evaluator;
mod loadtest;

/// mimalloc instead of the system allocator: under single-reaction HTTP
/// load glibc's malloc and free took about 11 % of the server's CPU
/// (`perf record` on `smartmsg serve` during `smartmsg loadtest --phases
/// single`); the effect is measured by `smartmsg loadtest` (README).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use smartmsg_simulator::runner::{policy_for_seed, CompareOptions, SeedsOptions};
use smartmsg_simulator::{
    compare, inspect, portable, run_seeds, PolicyName, QueueKind, Scenario, SeedOutcome,
    SimPopulation,
};

#[derive(Parser, Debug)]
#[command(
    name = "smartmsg",
    version,
    about = "smartmsg: smart-message campaigns on an embedded event-sourcing engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the campaign service over HTTP: the runtime on the wall clock
    /// behind a JSON API (`/v1/`, OpenAPI at `/openapi.json`, metrics at
    /// `/metrics`), on the embedded backend in the data directory. Stops
    /// cleanly on SIGTERM or ctrl-c.
    Serve {
        /// A TOML configuration file (`--print-config` shows every option).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The data directory (overrides the configuration's `data_dir`).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Where to listen (overrides `listen`; default 127.0.0.1:8080).
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
        /// Print the configuration in effect (file, environment, flags) as
        /// TOML and exit.
        #[arg(long)]
        print_config: bool,
    },
    /// Load the HTTP service on 127.0.0.1 (a server of its own by
    /// default) and print requests/s and latencies: a no-op endpoint,
    /// single-reaction POSTs, bulk JSON Lines ingest with campaign reads.
    Loadtest(loadtest::LoadtestArgs),
    /// Run a campaign simulation comparing policies (or many seeds with
    /// random faults) on the real engine under a virtual clock.
    Simulate(SimulateArgs),
    /// Show what a data directory holds: streams and versions, head,
    /// campaign, pending jobs, dead letters.
    Inspect {
        /// A simulation's data directory (or one policy's subdirectory).
        dir: PathBuf,
    },
    /// Write an embedded event log as JSON Lines (one envelope per event).
    Export {
        /// A log directory, a run's data directory (DIR/log) or a
        /// simulation's data directory with one run.
        dir: PathBuf,
        /// The JSON Lines file to write.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Read a JSON Lines log (from `export`) into a new data directory
    /// (the log lands in DIR/log); nothing is left behind on failure.
    Import {
        /// The JSON Lines file.
        file: PathBuf,
        /// The new (or empty) data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
    },
    /// Rebuild every campaign from a log (a data directory or an exported
    /// JSON Lines file), run each reaction pipeline again over its logged
    /// input, print summaries, check that replay reproduces what was
    /// recorded, and measure the replay rate.
    Replay {
        /// A log directory, a run's data directory, or a JSON Lines file.
        source: PathBuf,
        /// Ignored (kept for scripts of earlier versions): each pipeline's
        /// window length is in the log.
        #[arg(long, default_value_t = 60_000, value_name = "MS", hide = true)]
        window_ms: u64,
        /// Replay each log this many times and report the median rate.
        #[arg(long, default_value_t = 1, value_name = "N")]
        repeat: u32,
    },
    /// Estimate how target policies would have done from logged bandit
    /// feedback (a CSV, or a campaign log / exported JSON Lines file):
    /// DM, IPW, SNIPW, DR, SNDR, switch-DR with bootstrap CIs.
    Evaluate(Box<EvaluateArgs>),
}

#[derive(clap::Args, Debug)]
struct EvaluateArgs {
    /// Logged feedback: a CSV file (*.csv, columns named below), or a
    /// campaign's log (data directory or exported *.jsonl).
    #[arg(long, value_name = "FILE|DIR")]
    logged: PathBuf,
    /// Target: domain policies (comma-separated, or all), for campaign logs.
    #[arg(long, value_name = "NAME[,NAME..]|all")]
    policy: Option<String>,
    /// Target: per-row action probabilities, a CSV with one column per
    /// action and one row per logged row.
    #[arg(long, value_name = "FILE")]
    target_probs: Option<PathBuf>,
    /// CSV: timestamp column.
    #[arg(long, value_name = "COL")]
    timestamp_col: Option<String>,
    /// CSV: context feature columns (numeric, or categorical: one-hot).
    #[arg(long, value_name = "COL,..", value_delimiter = ',')]
    feature_cols: Vec<String>,
    /// CSV: action column.
    #[arg(long, value_name = "COL", default_value = "action")]
    action_col: String,
    /// CSV: slot / position column.
    #[arg(long, value_name = "COL")]
    slot_col: Option<String>,
    /// CSV: reward column.
    #[arg(long, value_name = "COL", default_value = "reward")]
    reward_col: String,
    /// CSV: propensity column.
    #[arg(long, value_name = "COL", default_value = "propensity")]
    propensity_col: String,
    /// CSV: the known actions (others are errors); default: those seen.
    #[arg(long, value_name = "A,..", value_delimiter = ',')]
    actions: Option<Vec<String>>,
    /// Campaign logs: evaluate each --policy as a whole (which users and
    /// which creative, batch by batch, weighted by the recorded joint
    /// propensities) instead of its creative choice on the logged users.
    #[arg(long)]
    slate: bool,
    /// Campaign logs: the run's scenario (file or built-in; default classic).
    #[arg(long, value_name = "FILE|NAME")]
    scenario: Option<String>,
    /// Campaign logs: the run's seed (when --seed was given to simulate).
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// Campaign logs: the population CSV (from --export-population);
    /// default: generated from the scenario, as simulate does.
    #[arg(long, value_name = "FILE.csv")]
    population: Option<PathBuf>,
    /// Monte Carlo draws per batch for domain policies.
    #[arg(long, value_name = "N", default_value_t = 20)]
    draws: usize,
    /// Bootstrap resamples.
    #[arg(long, value_name = "N", default_value_t = 500)]
    bootstrap: usize,
    /// Bootstrap seed.
    #[arg(long, value_name = "N", default_value_t = 0)]
    bootstrap_seed: u64,
    /// Confidence level.
    #[arg(long, value_name = "P", default_value_t = 0.95)]
    confidence: f64,
    /// Switch-DR threshold τ on the importance weight.
    #[arg(long, value_name = "TAU", default_value_t = 10.0)]
    switch_tau: f64,
    /// Ridge penalty of the reward model.
    #[arg(long, value_name = "L", default_value_t = 1.0)]
    ridge: f64,
    /// Fewest rows to estimate from.
    #[arg(long, value_name = "N", default_value_t = 20)]
    min_rows: usize,
    /// Write the results as JSON here.
    #[arg(long, value_name = "FILE", default_value = "evaluate.json")]
    out: PathBuf,
}

#[derive(clap::Args, Debug)]
struct SimulateArgs {
    /// Scenario file (.toml or .json), or a built-in: classic (the
    /// default; also linear), crm, nonlinear, sparse, delayed, small (the
    /// default with --seeds), or platform (many campaigns over one
    /// audience: --users, --campaigns).
    #[arg(long, value_name = "FILE")]
    scenario: Option<String>,
    /// Load the population (features and true probabilities) from a CSV
    /// file: user_id, x_0..x_{d-1}, p_0..p_{K-1}.
    #[arg(long, value_name = "FILE.csv")]
    population: Option<PathBuf>,
    /// Write the population to a CSV file.
    #[arg(long, value_name = "FILE.csv")]
    export_population: Option<PathBuf>,
    /// The policy to run: random, explore-then-commit, creative-thompson,
    /// targeting, integrated, oracle, or all.
    #[arg(long, value_name = "NAME|all", default_value = "all", value_parser = parse_policy)]
    policy: PolicyChoice,
    /// The seed (overrides the scenario's; with --seeds, the first seed).
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// Run N seeds with random faults and report any that breaks an
    /// invariant.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    seeds: Option<u64>,
    /// Keep the stores here (default: a temporary directory, removed).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Continue the simulation in --data-dir (killed before it finished)
    /// instead of starting over: every campaign resumes from its log, the
    /// simulated world is rebuilt from what the log says was sent.
    #[arg(long, requires = "data_dir")]
    resume: bool,
    /// Write report.json and chart.svg here.
    #[arg(long, value_name = "DIR", default_value = "smartmsg-report")]
    report: PathBuf,
    /// Use the in-memory delay queue instead of the on-disk timer wheel.
    #[arg(long)]
    in_memory_queue: bool,
    /// Worker threads (default: the number of cores).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    threads: Option<u32>,
    /// Print the scenario as TOML and exit.
    #[arg(long)]
    print_scenario: bool,
    /// With `--scenario platform`: subscribers in the shared audience
    /// (default 10,000,000).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    users: Option<u32>,
    /// With `--scenario platform`: campaigns over the audience (default
    /// 10).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    campaigns: Option<u32>,
}

#[derive(Debug, Clone, Copy)]
enum PolicyChoice {
    All,
    One(PolicyName),
}

fn parse_policy(s: &str) -> Result<PolicyChoice, String> {
    if s == "all" {
        return Ok(PolicyChoice::All);
    }
    s.parse::<PolicyName>()
        .map(PolicyChoice::One)
        .map_err(|e| format!("{e}, or all"))
}

/// Warnings and errors of the libraries (a torn tail cut at recovery, a
/// refused job, a failing sender) go to stderr; `RUST_LOG` selects more
/// (`RUST_LOG=info`, `RUST_LOG=smartmsg_service=debug`).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// An error and its causes, each said once: a cause whose text the message
/// before it already contains is left out (many errors embed their source's
/// message in their own).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    let mut last = out.clone();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !last.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
        last = c;
    }
    out
}

fn serve_cmd(
    config: Option<&Path>,
    data_dir: Option<PathBuf>,
    listen: Option<std::net::SocketAddr>,
    print_config: bool,
) -> Result<std::process::ExitCode> {
    use smartmsg_service::http::{serve_with, ServeConfig};
    let mut c = ServeConfig::load(config)?;
    if let Some(d) = data_dir {
        c.data_dir = d;
    }
    if let Some(l) = listen {
        c.listen = l;
    }
    if print_config {
        let mut shown = c;
        for t in &mut shown.tokens {
            t.token = "<redacted>".into();
        }
        print!("{}", shown.to_toml());
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // Signal handlers first: a SIGTERM while the backends open stops
        // the server cleanly.
        let shutdown = smartmsg_service::shutdown_signal();
        #[cfg(feature = "distributed")]
        if let smartmsg_service::http::BackendConfig::Cluster(cc) = &c.backend {
            let listener = tokio::net::TcpListener::bind(c.listen)
                .await
                .with_context(|| format!("listening on {}", c.listen))?;
            eprintln!(
                "smartmsg serve: listening on http://{} as an instance of the cluster {} ({} shards)",
                c.listen, cc.name, cc.shards
            );
            let evaluator = Arc::new(evaluator::SlateEvaluator);
            distributed::serve_cluster(c, listener, shutdown, Some(evaluator)).await?;
            return anyhow::Ok(());
        }
        #[cfg(feature = "distributed")]
        let (ports, sources) = distributed::backend(&c).await?;
        #[cfg(not(feature = "distributed"))]
        let (ports, sources) = smartmsg_service::http::embedded_backend(&c)?;
        let listener = tokio::net::TcpListener::bind(c.listen)
            .await
            .with_context(|| format!("listening on {}", c.listen))?;
        eprintln!(
            "smartmsg serve: listening on http://{} (data in {})",
            c.listen,
            c.data_dir.display()
        );
        let evaluator = Arc::new(evaluator::SlateEvaluator);
        serve_with(c, listener, shutdown, ports, sources, Some(evaluator)).await?;
        anyhow::Ok(())
    })?;
    Ok(std::process::ExitCode::SUCCESS)
}

fn main() -> std::process::ExitCode {
    init_tracing();
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Serve {
            config,
            data_dir,
            listen,
            print_config,
        } => serve_cmd(config.as_deref(), data_dir, listen, print_config),
        Command::Simulate(a) => simulate(a),
        Command::Loadtest(a) => loadtest::run(a),
        Command::Inspect { dir } => inspect_cmd(&dir),
        Command::Export { dir, out } => export_cmd(&dir, &out),
        Command::Import { file, data_dir } => import_cmd(&file, &data_dir),
        Command::Replay {
            source,
            window_ms,
            repeat,
        } => replay_cmd(&source, window_ms, repeat),
        Command::Evaluate(a) => evaluate_cmd(*a),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            std::process::ExitCode::from(1)
        }
    }
}

fn inspect_cmd(dir: &Path) -> Result<std::process::ExitCode> {
    let runs = inspect::inspect(dir).with_context(|| format!("inspecting {}", dir.display()))?;
    print!("{}", inspect::render(&runs));
    Ok(std::process::ExitCode::SUCCESS)
}

fn export_cmd(dir: &Path, out: &Path) -> Result<std::process::ExitCode> {
    let started = Instant::now();
    let n = portable::export(dir, out)?;
    println!(
        "exported {n} events to {} in {:.2} s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(std::process::ExitCode::SUCCESS)
}

fn import_cmd(file: &Path, dir: &Path) -> Result<std::process::ExitCode> {
    let started = Instant::now();
    let n = portable::import(file, dir)?;
    println!(
        "imported {n} events into {} in {:.2} s",
        dir.join("log").display(),
        started.elapsed().as_secs_f64()
    );
    Ok(std::process::ExitCode::SUCCESS)
}

fn replay_cmd(source: &Path, window_ms: u64, repeat: u32) -> Result<std::process::ExitCode> {
    let mut options = smartmsg_simulator::replay::ReplayOptions::default();
    options.window_ms = window_ms;
    let sources = if source.is_dir() {
        portable::find_logs(source)?
    } else {
        vec![source.to_owned()]
    };
    let mut violations = 0;
    for s in &sources {
        if sources.len() > 1 {
            println!("{}", s.display());
        }
        let mut rates = Vec::new();
        let mut report = None;
        for _ in 0..repeat.max(1) {
            let r = smartmsg_simulator::replay::replay_with_options(s, &options)
                .with_context(|| format!("replaying {}", s.display()))?;
            rates.push((r.rate(), r.read_s + r.fold_s));
            report = Some(r);
        }
        let Some(report) = report else {
            continue;
        };
        print!("{}", report.render());
        if rates.len() > 1 {
            rates.sort_by(|a, b| a.0.total_cmp(&b.0));
            let (rate, secs) = rates[rates.len() / 2];
            println!(
                "median of {} replays: {:.4} s, {:.0} events/s",
                rates.len(),
                secs,
                rate
            );
        }
        violations += report.violations().len();
    }
    Ok(if violations == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(2)
    })
}

fn evaluate_cmd(a: EvaluateArgs) -> Result<std::process::ExitCode> {
    use smartmsg_simulator::ope::{estimate, load, policy_target, slate, OpeError, TargetProbs};
    if a.policy.is_none() == a.target_probs.is_none() {
        bail!("give exactly one of --policy and --target-probs");
    }
    if a.slate && a.policy.is_none() {
        bail!("--slate evaluates domain policies (--policy) on a campaign log");
    }
    let opts = {
        let mut v = estimate::Options::default();
        v.bootstrap = a.bootstrap;
        v.confidence = a.confidence;
        v.seed = a.bootstrap_seed;
        v.switch_tau = a.switch_tau;
        v.ridge = a.ridge;
        v.min_rows = a.min_rows;
        v
    };
    let is_csv = a
        .logged
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    // (name, target, true value on the logged rows where known)
    let mut targets: Vec<(String, TargetProbs, Option<f64>)> = Vec::new();
    // Batch-level (--slate): (name, estimates or why not, true value).
    type Slate = (String, Result<Vec<estimate::Estimate>, OpeError>, f64);
    let mut slates: Vec<Slate> = Vec::new();
    let mut logged_truth = None;
    let data = if is_csv {
        let cols = load::Columns {
            timestamp: a.timestamp_col.clone(),
            features: a.feature_cols.clone(),
            action: a.action_col.clone(),
            slot: a.slot_col.clone(),
            reward: a.reward_col.clone(),
            propensity: a.propensity_col.clone(),
            actions: a.actions.clone(),
        };
        let data = load::read_csv(&a.logged, &cols)?;
        if a.policy.is_some() {
            bail!("--policy needs a campaign log as --logged (a CSV has no population to run a domain policy on); give --target-probs");
        }
        data
    } else {
        let events = if a.logged.is_file() {
            portable::read_file(&a.logged, &smartmsg_engine::Limits::default())?
        } else {
            let dir = portable::find_log(&a.logged)?;
            let rt = tokio::runtime::Builder::new_current_thread().build()?;
            rt.block_on(async {
                let log = smartmsg_embedded::EmbeddedLog::open(&dir)?;
                anyhow::Ok(portable::read_all(&log).await?)
            })?
        };
        let mut scenario = load_scenario(a.scenario.as_deref(), Scenario::classic)?;
        if let Some(seed) = a.seed {
            scenario.seed = seed;
        }
        let pop = match &a.population {
            Some(p) => SimPopulation::from_csv(p)?,
            None => SimPopulation::generate(&scenario)?,
        };
        let pop = Arc::new(pop);
        let (data, rows) =
            load::from_events(&events, pop.len(), pop.creatives(), pop.dim(), |u| {
                pop.features(u)
                    .map(|x| x.iter().map(|&v| f64::from(v)).collect())
            })?;
        if data.is_empty() {
            bail!("refusing to estimate: the log holds no planned batch");
        }
        let logged_true = rows
            .iter()
            .zip(&data.action)
            .map(|(r, &c)| pop.probability(r.user, c as u16))
            .sum::<f64>()
            / rows.len() as f64;
        logged_truth = Some((
            data.reward.iter().sum::<f64>() / data.len() as f64,
            logged_true,
        ));
        if let Some(names) = &a.policy {
            let names: Vec<PolicyName> = if names == "all" {
                PolicyName::ALL.to_vec()
            } else {
                names
                    .split(',')
                    .map(|n| {
                        n.trim()
                            .parse::<PolicyName>()
                            .map_err(|e| anyhow::anyhow!("{e}"))
                    })
                    .collect::<Result<_>>()?
            };
            for name in names {
                if a.slate {
                    let model = estimate::RewardModel::fit(&data, opts.ridge);
                    let t = slate::slate_target(
                        name,
                        &scenario,
                        &pop,
                        &data,
                        &rows,
                        &model,
                        a.draws,
                        a.bootstrap_seed,
                    );
                    match t {
                        Ok(t) => slates.push((
                            name.to_string(),
                            slate::estimate(&t, &opts),
                            t.true_value,
                        )),
                        Err(e) => slates.push((name.to_string(), Err(e), f64::NAN)),
                    }
                    continue;
                }
                let t = policy_target::policy_probs(
                    name,
                    &scenario,
                    &pop,
                    &data,
                    &rows,
                    a.draws,
                    a.bootstrap_seed,
                )?;
                let truth = policy_target::true_value(&pop, &rows, &t);
                targets.push((name.to_string(), t, Some(truth)));
            }
        }
        data
    };
    if let Some(path) = &a.target_probs {
        let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let t = load::read_target_probs(std::io::BufReader::new(f), path, &data)?;
        targets.push((path.display().to_string(), t, None));
    }
    println!(
        "logged: {} rows, {} actions, {} features{}",
        data.len(),
        data.actions.len(),
        data.dim(),
        logged_truth.map_or(String::new(), |(r, t)| format!(
            "; logged policy: mean reward {r:.4}, true value {t:.4}"
        ))
    );
    type Outcome = (
        String,
        Result<Vec<estimate::Estimate>, OpeError>,
        Option<f64>,
    );
    let mut results: Vec<Outcome> = targets
        .iter()
        .map(|(name, t, truth)| (name.clone(), estimate::estimate(&data, t, &opts), *truth))
        .collect();
    let level = if a.slate { "batch" } else { "row" };
    results.extend(
        slates
            .into_iter()
            .map(|(n, r, t)| (n, r, t.is_finite().then_some(t))),
    );
    let mut json = Vec::new();
    let mut refused = 0;
    for (name, result, truth) in &results {
        println!(
            "\ntarget {name}{}",
            truth.map_or(String::new(), |v| if a.slate {
                format!(" (true value of its own batches, per message {v:.4})")
            } else {
                format!(" (true value on the logged users {v:.4})")
            })
        );
        match result {
            Ok(est) => {
                println!(
                    "  {:<10} {:>9} {:>21} {:>9}",
                    "estimator",
                    "value",
                    format!("{:.0}% CI", opts.confidence * 100.0),
                    "ESS"
                );
                for e in est {
                    println!(
                        "  {:<10} {:>9.4} [{:>9.4}, {:>9.4}] {:>9.1}",
                        e.estimator, e.value, e.ci_low, e.ci_high, e.ess
                    );
                }
                json.push(serde_json::json!({
                    "target": name, "level": level, "true_value": truth, "estimates": est,
                }));
            }
            Err(e) => {
                refused += 1;
                println!("  {e}");
                json.push(serde_json::json!({
                    "target": name, "level": level, "true_value": truth, "refused": e.to_string(),
                }));
            }
        }
    }
    let out = serde_json::json!({
        "logged": a.logged.display().to_string(),
        "rows": data.len(),
        "actions": data.actions,
        "logged_mean_reward": logged_truth.map(|t| t.0),
        "logged_true_value": logged_truth.map(|t| t.1),
        "options": {
            "bootstrap": opts.bootstrap, "confidence": opts.confidence, "seed": opts.seed,
            "switch_tau": opts.switch_tau, "ridge": opts.ridge, "min_rows": opts.min_rows,
        },
        "targets": json,
    });
    std::fs::write(&a.out, serde_json::to_vec_pretty(&out)?)
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!("\nresults: {}", a.out.display());
    Ok(if refused == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(2)
    })
}

fn load_scenario(arg: Option<&str>, default: fn() -> Scenario) -> Result<Scenario> {
    let Some(name) = arg else {
        return Ok(default());
    };
    let path = Path::new(name);
    if !path.exists() {
        if let Some(s) = Scenario::builtin(name) {
            return Ok(s);
        }
        bail!(
            "scenario {name}: no such file (built-ins are {})",
            Scenario::BUILTINS.join(", ")
        );
    }
    Ok(Scenario::load(path)?)
}

fn threads(a: &SimulateArgs) -> usize {
    a.threads.map(|t| t as usize).unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    })
}

fn simulate(a: SimulateArgs) -> Result<std::process::ExitCode> {
    if a.scenario.as_deref() == Some("platform") {
        return platform(a);
    }
    if a.users.is_some() || a.campaigns.is_some() {
        bail!("--users and --campaigns go with --scenario platform");
    }
    if a.seeds.is_some() {
        return seeds(a);
    }
    let mut scenario = load_scenario(a.scenario.as_deref(), Scenario::classic)?;
    if let Some(seed) = a.seed {
        scenario.seed = seed;
    }
    let started = Instant::now();
    let pop = match &a.population {
        Some(path) => {
            let pop = SimPopulation::from_csv(path)?;
            scenario.population.subscribers = pop.len() as u32;
            scenario.population.features = pop.dim();
            scenario.campaign.creatives = pop.creatives();
            if let smartmsg_simulator::scenario::TruthSpec::Explicit { .. } = scenario.truth {
                scenario.truth = Default::default();
            }
            scenario.validate().with_context(|| {
                format!(
                    "the scenario does not fit the population of {} ({} users, {} features, {} creatives)",
                    path.display(),
                    pop.len(),
                    pop.dim(),
                    pop.creatives()
                )
            })?;
            eprintln!(
                "population {}: {} users, {} features, {} creatives (the scenario's population and truth are replaced)",
                path.display(),
                pop.len(),
                pop.dim(),
                pop.creatives()
            );
            pop
        }
        None => SimPopulation::generate(&scenario)?,
    };
    if a.print_scenario {
        print!("{}", scenario.to_toml());
        return Ok(std::process::ExitCode::SUCCESS);
    }
    if let Some(out) = &a.export_population {
        pop.write_csv(out)?;
        eprintln!("population written to {}", out.display());
    }
    let pop = Arc::new(pop);
    let policies = match a.policy {
        PolicyChoice::All => PolicyName::ALL.to_vec(),
        PolicyChoice::One(p) => vec![p],
    };
    // A temporary directory lives (and is removed) with `_temp`.
    let (data_dir, _temp) = data_dir_or_temp(a.data_dir.as_deref(), "smartmsg-sim-")?;
    let bar = progress_bar((policies.len() as u64) * u64::from(scenario.campaign.batches));
    let progress = bar.clone().map(|b| {
        Arc::new(move |_p: PolicyName, _batch: u32| b.inc(1))
            as Arc<smartmsg_simulator::sim::Progress>
    });
    let report = compare(&scenario, &pop, &{
        let mut o = CompareOptions::new(policies, data_dir.clone());
        o.queue = if a.in_memory_queue {
            QueueKind::InMemory
        } else {
            QueueKind::Embedded
        };
        o.threads = threads(&a);
        o.progress = progress;
        o.resume = a.resume;
        o
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    print!("{}", report.table(true));
    println!(
        "wall time {:.1} s on {} threads",
        started.elapsed().as_secs_f64(),
        threads(&a)
    );
    report.write(&a.report)?;
    println!(
        "report: {}, {}",
        a.report.join("report.json").display(),
        a.report.join("chart.svg").display()
    );
    if a.data_dir.is_some() {
        println!("data: {} (smartmsg inspect {0})", data_dir.display());
    }
    Ok(if report.violations().is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(2)
    })
}

/// `simulate --scenario platform`: many campaigns over one audience on one
/// runtime; prints time, peak memory and each campaign's lift, and writes
/// `platform.json` into the report directory.
fn platform(a: SimulateArgs) -> Result<std::process::ExitCode> {
    use smartmsg_simulator::platform::{run_platform, PlatformSpec};
    if a.population.is_some() || a.export_population.is_some() || a.seeds.is_some() {
        bail!("--scenario platform generates its own audience: no --population, --export-population or --seeds");
    }
    if a.resume || a.in_memory_queue || a.print_scenario {
        bail!("--scenario platform takes no --resume, --in-memory-queue or --print-scenario");
    }
    let mut spec = PlatformSpec::new(
        a.users.unwrap_or(PlatformSpec::DEFAULT_USERS),
        a.campaigns.unwrap_or(PlatformSpec::DEFAULT_CAMPAIGNS),
    );
    if let Some(seed) = a.seed {
        spec.seed = seed;
    }
    match a.policy {
        PolicyChoice::One(p) => spec.policy = p,
        PolicyChoice::All => {}
    }
    // A temporary directory lives (and is removed) with `_temp`.
    let (data_dir, _temp) = data_dir_or_temp(a.data_dir.as_deref(), "smartmsg-platform-")?;
    eprintln!(
        "platform: {} subscribers x {} features, {} campaigns of {} creatives, budget {} each in {} batches, policy {}",
        spec.users,
        spec.features,
        spec.campaigns,
        spec.creatives,
        spec.budget,
        spec.batches,
        spec.policy.as_str()
    );
    let total = u64::from(spec.campaigns) * u64::from(spec.batches);
    let bar = progress_bar(total);
    let sent = std::sync::Mutex::new(vec![0u32; spec.campaigns as usize]);
    let started = Instant::now();
    // Without a terminal (a log file, CI), a line per batch sent instead
    // of the bar, so that a long run shows where it is.
    let tick = |i: u32, n: u32| {
        let mut s = sent.lock().unwrap_or_else(|e| e.into_inner());
        let Some(old) = s.get_mut(i as usize) else {
            return;
        };
        let new = u64::from(n.saturating_sub(*old));
        *old = n;
        match &bar {
            Some(b) => b.inc(new),
            None if new > 0 => {
                let done: u64 = s.iter().map(|&x| u64::from(x)).sum();
                eprintln!(
                    "platform: {done}/{total} batches sent ({} batch {n}), {:.1} s, resident {}",
                    PlatformSpec::campaign_name(i),
                    started.elapsed().as_secs_f64(),
                    smartmsg_simulator::platform::rss_bytes().map_or("unknown".to_owned(), |b| {
                        format!("{:.2} GiB", b as f64 / f64::from(1u32 << 30))
                    })
                );
            }
            None => {}
        }
    };
    smartmsg_simulator::sim::prepare_data_dir(&data_dir, &["platform".to_owned()], false)?;
    let report = run_platform(&spec, &data_dir.join("platform"), Some(&tick))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    println!("| campaign | sent | reactions | expected | random | oracle | lift |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for c in &report.campaigns {
        println!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.1} % |",
            c.name,
            c.sent,
            c.reactions,
            c.expected,
            c.random_expected,
            c.oracle_expected,
            100.0 * c.lift
        );
    }
    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
    println!(
        "mean lift {:.1} %; generate {:.1} s, create {:.1} s, run {:.1} s (the simulated campaigns), references {:.1} s; wall {:.1} s",
        100.0 * report.mean_lift(),
        report.generate_ms as f64 / 1e3,
        report.create_ms as f64 / 1e3,
        report.run_ms as f64 / 1e3,
        report.reference_ms as f64 / 1e3,
        started.elapsed().as_secs_f64()
    );
    println!(
        "peak resident memory {}; {} events, {:.2} GiB on disk",
        report
            .peak_rss_bytes
            .map_or("unknown".to_owned(), |b| format!("{:.2} GiB", gib(b))),
        report.log_events,
        gib(report.data_bytes)
    );
    std::fs::create_dir_all(&a.report)
        .with_context(|| format!("creating {}", a.report.display()))?;
    let path = a.report.join("platform.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("report: {}", path.display());
    Ok(std::process::ExitCode::SUCCESS)
}

/// `dir`, or a new temporary directory named `prefix…` (returned too: it
/// is removed when dropped).
fn data_dir_or_temp(
    dir: Option<&Path>,
    prefix: &str,
) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    match dir {
        Some(d) => Ok((d.to_owned(), None)),
        None => {
            let temp = tempfile::Builder::new()
                .prefix(prefix)
                .tempdir()
                .context("creating a temporary data directory")?;
            Ok((temp.path().to_owned(), Some(temp)))
        }
    }
}

fn progress_bar(len: u64) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let b = indicatif::ProgressBar::new(len);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} {msg}")
    {
        b.set_style(style);
    }
    Some(b)
}

fn seeds(a: SimulateArgs) -> Result<std::process::ExitCode> {
    if a.population.is_some() || a.export_population.is_some() {
        bail!("--population and --export-population cannot be combined with --seeds (each seed draws its own population)");
    }
    if a.data_dir.is_some() {
        bail!(
            "--data-dir cannot be combined with --seeds (each seed runs in a temporary directory)"
        );
    }
    let base = load_scenario(a.scenario.as_deref(), Scenario::small)?;
    let count = a.seeds.unwrap_or(1);
    let first = a.seed.unwrap_or(1);
    let policy = match a.policy {
        PolicyChoice::All => None,
        PolicyChoice::One(p) => Some(p),
    };
    let started = Instant::now();
    let bar = progress_bar(count);
    let progress = bar.clone().map(|b| {
        Arc::new(move |o: &SeedOutcome| {
            if !o.ok() {
                b.println(format!("seed {} ({}) FAILED", o.seed, o.policy));
            }
            b.inc(1)
        }) as Arc<dyn Fn(&SeedOutcome) + Send + Sync>
    });
    let queue = if a.in_memory_queue {
        QueueKind::InMemory
    } else {
        QueueKind::Embedded
    };
    let outcomes = run_seeds(&base, &{
        let mut o = SeedsOptions::new(first, count);
        o.policy = policy;
        o.queue = queue;
        o.threads = threads(&a);
        o.progress = progress;
        o
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let failed: Vec<&SeedOutcome> = outcomes.iter().filter(|o| !o.ok()).collect();
    let crashes: u64 = outcomes.iter().map(|o| o.crashes).sum();
    println!(
        "{count} seeds ({first}..={}) on scenario {} with random faults: {} broke an invariant or failed; {crashes} crashes recovered; wall time {:.1} s",
        first + count - 1,
        base.name,
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    for o in &failed {
        let what = match &o.result {
            Ok(v) => v
                .iter()
                .map(|v| format!("{}: {}", v.invariant, v.detail))
                .collect::<Vec<_>>()
                .join("; "),
            Err(e) => format!("run failed: {e}"),
        };
        let mut cmd = format!(
            "smartmsg simulate --seeds 1 --seed {} --policy {}",
            o.seed,
            policy.unwrap_or_else(|| policy_for_seed(o.seed))
        );
        if let Some(s) = &a.scenario {
            cmd.push_str(&format!(" --scenario {s}"));
        }
        if a.in_memory_queue {
            cmd.push_str(" --in-memory-queue");
        }
        println!("seed {} ({}): {what}\n  reproduce: {cmd}", o.seed, o.policy);
    }
    Ok(if failed.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(2)
    })
}
