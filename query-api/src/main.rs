use anyhow::Context;
use query_api::config::Settings;
use query_api::startup::Application;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    platform::telemetry::run_service("query-api", run()).await
}

async fn run() -> anyhow::Result<()> {
    let settings = Settings::from_env().context("invalid settings")?;
    Application::build(settings)
        .await?
        .run_until_stopped()
        .await
}
