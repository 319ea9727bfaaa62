use anyhow::Context;
use query_api::config::Settings;
use query_api::startup::Application;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    platform::telemetry::init();
    let result = async {
        let settings = Settings::from_env().context("invalid settings")?;
        Application::build(settings)
            .await?
            .run_until_stopped()
            .await
    }
    .await;
    if let Err(error) = &result {
        tracing::error!(
            error = format!("{error:#}"),
            "query-api stopped with an error"
        );
    }
    result
}
