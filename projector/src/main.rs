use anyhow::Context;
use projector::config::Settings;
use projector::startup::{self, Application};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    platform::telemetry::run_service("projector", run()).await
}

async fn run() -> anyhow::Result<()> {
    let settings = Settings::from_env().context("invalid settings")?;
    let args: Vec<String> = std::env::args().skip(1).collect();
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
        Some(other) => anyhow::bail!("unknown subcommand {other:?}; use run, retry [ID…]"),
    }
}
