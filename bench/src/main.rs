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
//! 4. Projection of a published 200,000-event backlog, and 5. `projector
//!    rebuild` of a 1,000,000-event log, each vs a plain client reading the
//!    same log from PostgreSQL.
//! 6. End-to-end visibility (command answered → query API shows it) at half
//!    the maximum command rate, with every service running.
//! 7. Reads: cached `GET /users/{id}` vs an axum handler doing one Redis GET,
//!    uncached vs pgbench doing the same SELECT; see `reads.rs`.
//! 8. Identity: password-grant sign-ins vs the argon2 limit, refresh-token
//!    grants vs pgbench running the same SQL, and access-token verifications
//!    by a downstream service with the JWKS cached; see `identity.rs`.
//!
//! Diagnostics of the visibility scenario (not needed for the figures):
//! `BENCH_PROBED_PER_SECOND` (default 50) commands probed per second,
//! `BENCH_VISIBILITY_RATE` paces at a fixed rate instead of half the maximum,
//! `BENCH_STAGES=1` also times the relay checkpoint and the PostgreSQL row
//! per probed command (one more query per probe round, so more load).

mod identity;
mod projection;
mod reads;
mod relay;
mod stats;
mod visibility;
mod writes;

use std::time::Duration;

use stats::median;

/// Settings of one bench run, from the environment.
pub struct Plan {
    /// `BENCH_RUNS`: repetitions of each scenario, default 3.
    pub runs: usize,
    /// `BENCH_SECONDS`: length of each timed load, default 10.
    pub seconds: u64,
    /// `BENCH_EVENTS`: backlog size for the relay and the projection, default 200,000.
    pub backlog: i64,
    /// `BENCH_REBUILD_EVENTS`: log size for `projector rebuild`, default 1,000,000.
    pub rebuild_events: i64,
    /// `BENCH_ONLY`: `registration`, `status`, `relay`, `projection`,
    /// `rebuild`, `visibility`, `reads` or `identity` to run one scenario.
    pub only: Option<String>,
    /// `BENCH_KEEP=1`: keep the read-side scenarios' databases and topics
    /// (they are dropped after each run otherwise).
    pub keep: bool,
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
        rebuild_events: env_or("BENCH_REBUILD_EVENTS", 1_000_000),
        only: std::env::var("BENCH_ONLY").ok(),
        keep: env_or("BENCH_KEEP", 0) == 1,
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
    let mut identities = Vec::new();
    for run in 1..=plan.runs("identity") {
        let r = identity::identity(&plan, run).await?;
        println!(
            "  identity run {run}: sign-ins {:.1}/s vs argon2 limit {:.1}/s = {:.0}%; refresh grants {:.0}/s vs pgbench {:.0}/s = {:.0}%; token verifications {:.0}/s on all cores",
            r.sign_ins,
            r.argon2_limit,
            100.0 * r.sign_ins / r.argon2_limit,
            r.refreshes,
            r.pgbench,
            100.0 * r.refreshes / r.pgbench,
            r.verifications
        );
        identities.push(r);
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
    let mut projections = Vec::new();
    for run in 1..=plan.runs("projection") {
        let r = projection::projection(&plan, run).await?;
        println!(
            "  projection run {run}: {:.0} events/s vs plain scan {:.0}/s = {:.1}% ({} events, {:.1} s, {} batches of {:.0} on average)",
            r.rate,
            r.scan,
            100.0 * r.rate / r.scan,
            r.events,
            r.seconds,
            r.batches,
            r.events as f64 / r.batches.max(1) as f64
        );
        println!("    load average {:.1}", load_average());
        projections.push(r);
    }
    let mut rebuilds = Vec::new();
    for run in 1..=plan.runs("rebuild") {
        let r = projection::rebuild(&plan, run).await?;
        println!(
            "  rebuild run {run}: {:.0} events/s vs plain scan {:.0}/s = {:.1}% ({} events in {:.1} s)",
            r.rate,
            r.scan,
            100.0 * r.rate / r.scan,
            r.events,
            r.seconds
        );
        println!("    load average {:.1}", load_average());
        rebuilds.push(r);
    }
    let mut visibilities = Vec::new();
    for run in 1..=plan.runs("visibility") {
        let r = visibility::visibility(&plan, run).await?;
        println!(
            "  visibility run {run}: max {:.0} commands/s ({:.0}/s until projected), paced at {:.0}/s (target {:.0}): visible after p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} of {} commands probed, {} timeouts, {} failed; probes read {:.0}/s; command p50 {:.2} ms, p99 {:.2} ms)",
            r.max_rate,
            r.sustained,
            r.rate,
            r.target,
            ms(r.p50),
            ms(r.p99),
            ms(r.max),
            r.probed,
            r.answered,
            r.timeouts,
            r.failures,
            r.probe_reads,
            ms(r.command_p50),
            ms(r.command_p99)
        );
        println!(
            "    write transactions of other databases open > 10 ms in {:.0}% of samples, oldest {:.0} ms; {} probes not held up by one: p50 {:.2} ms, p99 {:.2} ms; load average {:.1}",
            100.0 * r.foreign_busy,
            ms(r.foreign_max),
            r.undisturbed,
            ms(r.undisturbed_p50),
            ms(r.undisturbed_p99),
            load_average()
        );
        println!(
            "    relay: {:.0} batches/s ({:.1} events each), {:.1} ms from queued to checkpointed on average; projector: {:.0} batches/s ({:.1} events each)",
            r.relay_batches,
            r.rate / r.relay_batches.max(1e-9),
            ms(r.relay_batch_time),
            r.projector_batches,
            r.rate / r.projector_batches.max(1e-9)
        );
        if let Some((relayed, projected)) = r.stages {
            println!(
                "    stages (medians from the answer): relay checkpoint past the event {:.2} ms, view row in PostgreSQL {:.2} ms",
                ms(relayed),
                ms(projected)
            );
        }
        visibilities.push(r);
    }
    let mut reads = Vec::new();
    for run in 1..=plan.runs("reads") {
        let r = reads::reads(&plan, run).await?;
        let line = |what: &str, load: &reads::Load| {
            println!(
                "    {what:<34} {:>8.0}/s  p50 {:.2} ms, p99 {:.2} ms",
                load.rate,
                ms(load.p50),
                ms(load.p99)
            );
        };
        println!(
            "  reads run {run} (wrk, {} connections, a {}-byte view):",
            reads::WRK_CONNECTIONS,
            r.body_bytes
        );
        line("GET /users/{id}, cached", &r.cached);
        line("axum + one Redis GET (limit)", &r.limit);
        println!(
            "    redis-benchmark GET                {:>8.0}/s",
            r.redis_benchmark
        );
        line("GET /users?username=, Redis up", &r.by_username);
        line("GET /users?status=&limit=50, up", &r.page);
        line("GET /users/{id} (every user), down", &r.uncached);
        line("GET /users?username=, Redis down", &r.uncached_by_username);
        line("GET /users?status=&limit=50, down", &r.uncached_page);
        println!(
            "    pgbench, the same SELECT, {} clients {:>8.0}/s; load average {:.1}",
            reads::POOL,
            r.pgbench,
            load_average()
        );
        reads.push(r);
    }

    let verdict = |ok: bool| if ok { "meets goal" } else { "BELOW GOAL" };
    println!("\nmedians of {} runs:", plan.runs);
    if !identities.is_empty() {
        let of = |f: &dyn Fn(&identity::Identity) -> f64| {
            median(&identities.iter().map(f).collect::<Vec<_>>())
        };
        let sign_ins = of(&|r| r.sign_ins / r.argon2_limit);
        let refreshes = of(&|r| r.refreshes / r.pgbench);
        println!(
            "  sign-ins / argon2 limit            {:>6.1}%   goal >= 85%   {}",
            100.0 * sign_ins,
            verdict(sign_ins >= 0.85)
        );
        println!(
            "  refresh grants / pgbench           {:>6.1}%   goal >= 60%   {}",
            100.0 * refreshes,
            verdict(refreshes >= 0.60)
        );
        println!(
            "  token verifications, JWKS cached   {:>8.0}/s on all cores",
            of(&|r| r.verifications)
        );
    }
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
    if !projections.is_empty() {
        let rate = median(&projections.iter().map(|r| r.rate).collect::<Vec<_>>());
        let ratio = median(
            &projections
                .iter()
                .map(|r| r.rate / r.scan)
                .collect::<Vec<_>>(),
        );
        println!(
            "  projection rate                    {:>6.0}/s  goal >= 10000 {}",
            rate,
            verdict(rate >= 10_000.0)
        );
        println!(
            "  projection / plain log scan        {:>6.1}%   (context)",
            100.0 * ratio
        );
    }
    if !rebuilds.is_empty() {
        let rate = median(&rebuilds.iter().map(|r| r.rate).collect::<Vec<_>>());
        let ratio = median(&rebuilds.iter().map(|r| r.rate / r.scan).collect::<Vec<_>>());
        println!(
            "  rebuild rate                       {:>6.0}/s  goal >= 100000 {}",
            rate,
            verdict(rate >= 100_000.0)
        );
        println!(
            "  rebuild / plain log scan           {:>6.1}%   (context)",
            100.0 * ratio
        );
    }
    if !visibilities.is_empty() {
        let of = |f: fn(&visibility::Visibility) -> f64| {
            median(&visibilities.iter().map(f).collect::<Vec<_>>())
        };
        let p50 = of(|r| ms(r.p50));
        let p99 = of(|r| ms(r.p99));
        println!(
            "  max status commands/s (all running) {:>5.0}/s  paced at {:.0}/s",
            of(|r| r.max_rate),
            of(|r| r.rate)
        );
        println!(
            "  visibility p50                     {:>6.2} ms goal <= 10 ms {}",
            p50,
            verdict(p50 <= 10.0)
        );
        println!(
            "  visibility p99                     {:>6.2} ms goal <= 50 ms {}",
            p99,
            verdict(p99 <= 50.0)
        );
    }
    if !reads.is_empty() {
        let of = |f: fn(&reads::Reads) -> f64| median(&reads.iter().map(f).collect::<Vec<_>>());
        let cached = of(|r| r.cached.rate / r.limit.rate);
        let uncached = of(|r| r.uncached.rate / r.pgbench);
        println!(
            "  cached GET /users/{{id}} / axum+Redis GET {:>6.1}%   goal >= 80%   {}",
            100.0 * cached,
            verdict(cached >= 0.80)
        );
        println!(
            "  cached GET /users/{{id}} / redis-benchmark {:>5.1}%   (context)",
            100.0 * of(|r| r.cached.rate / r.redis_benchmark)
        );
        println!(
            "  cached GET p50 / p99                {:>6.2} / {:.2} ms",
            of(|r| ms(r.cached.p50)),
            of(|r| ms(r.cached.p99))
        );
        println!(
            "  uncached GET /users/{{id}} / pgbench  {:>6.1}%   goal >= 60%   {}",
            100.0 * uncached,
            verdict(uncached >= 0.60)
        );
    }
    Ok(())
}

/// The 1-minute load average: the machine is shared, and a figure taken
/// while others compile is worth less than one taken on a quiet machine.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// How long a bench waits for a service or a backlog before giving up.
pub const PATIENCE: Duration = Duration::from_secs(300);
