//! `make bench`: userstream's throughput, each figure a ratio to a limit
//! measured in the same run on the same machine, repeated and reported as
//! medians (the machine is shared and noisy).
//!
//! 1. Registration vs the argon2 limit (cores ÷ time per hash), with the p99
//!    of `/healthz` measured alongside to show the runtime is never starved.
//! 2. Deactivate/reactivate vs pgbench running the same SQL transaction at the
//!    same concurrency.
//! 3. Relay drain of a 200,000-event backlog vs a plain librdkafka producer
//!    sending the same messages to the same broker.

mod relay;
mod stats;
mod writes;

use std::time::Duration;

use stats::median;

/// Settings of one bench run, from the environment.
pub struct Plan {
    /// `BENCH_RUNS`: repetitions of each scenario, default 3.
    pub runs: usize,
    /// `BENCH_SECONDS`: length of each timed load, default 10.
    pub seconds: u64,
    /// `BENCH_EVENTS`: backlog size for the relay, default 200,000.
    pub backlog: i64,
    /// `BENCH_ONLY`: `registration`, `status` or `relay` to run one scenario.
    pub only: Option<String>,
}

impl Plan {
    fn runs(&self, scenario: &str) -> usize {
        match &self.only {
            Some(only) if only != scenario => 0,
            _ => self.runs,
        }
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let plan = Plan {
        runs: env_or("BENCH_RUNS", 3),
        seconds: env_or("BENCH_SECONDS", 10),
        backlog: env_or("BENCH_EVENTS", 200_000),
        only: std::env::var("BENCH_ONLY").ok(),
    };
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    println!(
        "userstream bench: {} runs of {} s, {cores} cores, medians reported\n",
        plan.runs, plan.seconds
    );

    let mut registration = Vec::new();
    for run in 1..=plan.runs("registration") {
        let r = writes::registration(&plan, run).await?;
        println!(
            "  registration run {run}: {:.1}/s vs argon2 limit {:.1}/s = {:.0}% (vs {:.1}/s measured with all cores hashing = {:.0}%), /healthz p99 {:.2} ms ({} probes)",
            r.throughput,
            r.limit,
            100.0 * r.throughput / r.limit,
            r.parallel,
            100.0 * r.throughput / r.parallel,
            r.healthz_p99.as_secs_f64() * 1e3,
            r.probes
        );
        registration.push(r);
    }
    let mut status = Vec::new();
    for run in 1..=plan.runs("status") {
        let r = writes::status_changes(&plan, run).await?;
        println!(
            "  status run {run}: {:.0}/s vs pgbench {:.0}/s = {:.0}% ({} clients)",
            r.api,
            r.pgbench,
            100.0 * r.api / r.pgbench,
            r.clients
        );
        status.push(r);
    }
    let mut drains = Vec::new();
    for run in 1..=plan.runs("relay") {
        let r = relay::drain(&plan, run).await?;
        println!(
            "  relay run {run}: {:.0} events/s vs plain producer {:.0}/s = {:.0}% ({} events)",
            r.relay,
            r.plain,
            100.0 * r.relay / r.plain,
            r.events
        );
        drains.push(r);
    }

    let verdict = |ok: bool| if ok { "meets goal" } else { "BELOW GOAL" };
    println!("\nmedians of {} runs:", plan.runs);
    if !registration.is_empty() {
        let ratio = median(
            &registration
                .iter()
                .map(|r| r.throughput / r.limit)
                .collect::<Vec<_>>(),
        );
        let parallel = median(
            &registration
                .iter()
                .map(|r| r.throughput / r.parallel)
                .collect::<Vec<_>>(),
        );
        let p99 = median(
            &registration
                .iter()
                .map(|r| r.healthz_p99.as_secs_f64() * 1e3)
                .collect::<Vec<_>>(),
        );
        println!(
            "  registration / argon2 limit        {:>6.1}%   goal >= 85%   {}",
            100.0 * ratio,
            verdict(ratio >= 0.85)
        );
        println!(
            "  registration / all-cores hashing   {:>6.1}%   (context: what the cores sustain together)",
            100.0 * parallel
        );
        println!(
            "  /healthz p99 during registration   {:>6.2} ms goal < 10 ms  {}",
            p99,
            verdict(p99 < 10.0)
        );
    }
    if !status.is_empty() {
        let ratio = median(&status.iter().map(|r| r.api / r.pgbench).collect::<Vec<_>>());
        println!(
            "  deactivate+reactivate / pgbench    {:>6.1}%   goal >= 60%   {}",
            100.0 * ratio,
            verdict(ratio >= 0.60)
        );
    }
    if !drains.is_empty() {
        let rate = median(&drains.iter().map(|r| r.relay).collect::<Vec<_>>());
        let ratio = median(&drains.iter().map(|r| r.relay / r.plain).collect::<Vec<_>>());
        println!(
            "  relay drain rate                   {:>6.0}/s  goal >= 20000 {}",
            rate,
            verdict(rate >= 20_000.0)
        );
        println!(
            "  relay / plain librdkafka producer  {:>6.1}%   goal >= 50%   {}",
            100.0 * ratio,
            verdict(ratio >= 0.50)
        );
    }
    Ok(())
}

/// How long a bench waits for a service or a backlog before giving up.
pub const PATIENCE: Duration = Duration::from_secs(300);
