use anyhow::Context;
use command_api::config::Settings;
use command_api::startup::{self, Application};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    platform::telemetry::run_service("command-api", run()).await
}

async fn run() -> anyhow::Result<()> {
    let settings = Settings::from_env().context("invalid settings")?;
    match std::env::args().nth(1).as_deref() {
        // `command-api migrate`: apply the migrations and exit.
        Some("migrate") => {
            let pool = startup::connect(&settings).await?;
            startup::migrate(&pool).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        None | Some("serve") => {
            Application::build(settings)
                .await?
                .run_until_stopped()
                .await
        }
        Some(other) => anyhow::bail!("unknown subcommand {other:?}; use `serve` or `migrate`"),
    }
}
