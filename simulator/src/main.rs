//! `smartmsg`: simulate campaigns on the real engine, inspect data
//! directories.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use smartmsg_simulator::runner::{policy_for_seed, CompareOptions, SeedsOptions};
use smartmsg_simulator::{
    compare, inspect, run_seeds, PolicyName, QueueKind, Scenario, SeedOutcome, SimPopulation,
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
    /// Run a campaign simulation comparing policies (or many seeds with
    /// random faults) on the real engine under a virtual clock.
    Simulate(SimulateArgs),
    /// Show what a data directory holds: streams and versions, head,
    /// campaign, pending jobs, dead letters.
    Inspect {
        /// A simulation's data directory (or one policy's subdirectory).
        dir: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct SimulateArgs {
    /// Scenario file (.toml or .json), or a built-in: classic (the
    /// default) or small (the default with --seeds).
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

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Simulate(a) => simulate(a),
        Command::Inspect { dir } => inspect_cmd(&dir),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

fn inspect_cmd(dir: &Path) -> Result<std::process::ExitCode> {
    let runs = inspect::inspect(dir).with_context(|| format!("inspecting {}", dir.display()))?;
    print!("{}", inspect::render(&runs));
    Ok(std::process::ExitCode::SUCCESS)
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
        bail!("scenario {name}: no such file (built-ins are classic and small)");
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
    let temp;
    let data_dir = match &a.data_dir {
        Some(d) => d.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("smartmsg-sim-")
                .tempdir()
                .context("creating a temporary data directory")?;
            temp.path().to_owned()
        }
    };
    let bar = progress_bar((policies.len() as u64) * u64::from(scenario.campaign.batches));
    let progress = bar.clone().map(|b| {
        Arc::new(move |_p: PolicyName, _batch: u32| b.inc(1))
            as Arc<smartmsg_simulator::sim::Progress>
    });
    let report = compare(
        &scenario,
        &pop,
        &CompareOptions {
            policies,
            data_dir: data_dir.clone(),
            queue: if a.in_memory_queue {
                QueueKind::InMemory
            } else {
                QueueKind::Embedded
            },
            threads: threads(&a),
            progress,
        },
    )?;
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
    let outcomes = run_seeds(
        &base,
        &SeedsOptions {
            first,
            count,
            policy,
            queue,
            threads: threads(&a),
            progress,
        },
    );
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
