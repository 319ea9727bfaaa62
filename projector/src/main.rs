use std::time::Duration;

use anyhow::Context;
use projector::config::Settings;
use projector::startup::{self, Application};

/// The fold of `rebuild` and `verify` decodes and drops a few small values
/// per event: under glibc's malloc a third of its CPU time went to the
/// allocator; mimalloc halved the fold's CPU time on a 1,000,000-event log.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if matches!(args.first().map(String::as_str), None | Some("run")) {
        platform::telemetry::run_service("projector", run(args)).await
    } else {
        // One-shot commands log to stderr: stdout is their output.
        platform::telemetry::run_command("projector", run(args)).await
    }
}

async fn run(args: Vec<String>) -> anyhow::Result<()> {
    let settings = Settings::from_env().context("invalid settings")?;
    match args.first().map(String::as_str) {
        None | Some("run") => {
            Application::build(settings)
                .await?
                .run_until_stopped()
                .await
        }
        Some("retry") => {
            let ids = args[1..]
                .iter()
                .map(|id| {
                    id.parse::<i64>()
                        .with_context(|| format!("{id:?} is not a parked message id"))
                })
                .collect::<anyhow::Result<Vec<i64>>>()?;
            let model = startup::read_model(&settings).await?;
            let retried = projector::parked::retry(&model, (!ids.is_empty()).then_some(&ids[..]))
                .await
                .context("retry failed")?;
            println!(
                "{} parked message(s) resolved, {} still parked",
                retried.resolved, retried.still_parked
            );
            Ok(())
        }
        Some("rebuild") => rebuild(&settings).await,
        Some("verify") => verify(&settings).await,
        Some("status") => status(&settings, &args[1..]).await,
        Some(other) => anyhow::bail!(
            "unknown subcommand {other:?}; use run, retry [ID…], rebuild, verify, status [--json]"
        ),
    }
}

/// `projector rebuild`: prints a one-line summary.
async fn rebuild(settings: &Settings) -> anyhow::Result<()> {
    let pool = connect(settings, "rebuild").await?;
    let summary = projector::rebuild::rebuild(&pool)
        .await
        .context("rebuild failed")?;
    println!("{summary}");
    Ok(())
}

/// `projector verify`: one line per difference, then a summary; fails on any.
async fn verify(settings: &Settings) -> anyhow::Result<()> {
    let pool = connect(settings, "verify").await?;
    let report = projector::verify::verify(&pool, &settings.cache)
        .await
        .context("verify failed")?;
    for difference in &report.differences {
        println!("{difference}");
    }
    println!("{report}");
    anyhow::ensure!(
        report.is_consistent(),
        "{} difference(s) between the log and the read model",
        report.differences.len()
    );
    Ok(())
}

/// `projector status [--json]`.
async fn status(settings: &Settings, options: &[String]) -> anyhow::Result<()> {
    let json = match options {
        [] => false,
        [flag] if flag == "--json" => true,
        other => anyhow::bail!("unknown options {other:?}; use status [--json]"),
    };
    let pool = connect(settings, "status").await?;
    let status = projector::status::collect(&pool, settings)
        .await
        .context("cannot read the projection's state")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        println!("{status}");
    }
    Ok(())
}

/// A pool for a one-shot command, named after it in `pg_stat_activity`.
async fn connect(settings: &Settings, command: &str) -> anyhow::Result<sqlx::PgPool> {
    settings
        .database
        .connect(Duration::from_secs(10), &format!("projector {command}"))
        .await
}
