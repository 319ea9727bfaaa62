use anyhow::Context;
use notifier::config::Settings;
use notifier::startup::{self, Application};
use uuid::Uuid;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if matches!(args.first().map(String::as_str), None | Some("run")) {
        platform::telemetry::run_service("notifier", run(args)).await
    } else {
        // One-shot commands log to stderr: stdout is their output.
        platform::telemetry::run_command("notifier", run(args)).await
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
                .map(|id| Uuid::parse_str(id).with_context(|| format!("{id:?} is not an event id")))
                .collect::<anyhow::Result<Vec<Uuid>>>()?;
            let pool = startup::connect(&settings, "notifier retry").await?;
            let retried =
                notifier::store::retry_parked(&pool, (!ids.is_empty()).then_some(&ids[..]))
                    .await
                    .context("retry failed")?;
            println!("{retried} parked mail(s) pending again");
            Ok(())
        }
        Some(other) => anyhow::bail!("unknown subcommand {other:?}; use run, retry [EVENT_ID…]"),
    }
}
