use anyhow::Context;
use projector::config::Settings;
use projector::startup::Application;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    platform::telemetry::run_service("projector", run()).await
}

async fn run() -> anyhow::Result<()> {
    let settings = Settings::from_env().context("invalid settings")?;
    match std::env::args().nth(1).as_deref() {
        None | Some("run") => {
            Application::build(settings)
                .await?
                .run_until_stopped()
                .await
        }
        Some(other) => anyhow::bail!("unknown subcommand {other:?}; use `run`"),
    }
}
