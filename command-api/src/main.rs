use anyhow::Context;
use command_api::config::Settings;
use command_api::startup::{self, Application};
use platform::db::DatabaseSettings;
use std::time::Duration;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    platform::telemetry::run_service("command-api", run()).await
}

async fn run() -> anyhow::Result<()> {
    match std::env::args().nth(1).as_deref() {
        // `command-api migrate`: apply the migrations as the owner role and exit.
        Some("migrate") => {
            let owner = DatabaseSettings {
                url: platform::config::string(
                    "MIGRATION_DATABASE_URL",
                    &platform::db::dev_database_url("userstream_owner"),
                )
                .into(),
                max_connections: 2,
            };
            let pool = owner
                .connect(Duration::from_secs(5), "command-api-migrate")
                .await?;
            startup::migrate(&pool).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        None | Some("serve") => {
            let settings = Settings::from_env().context("invalid settings")?;
            Application::build(settings)
                .await?
                .run_until_stopped()
                .await
        }
        Some(other) => anyhow::bail!("unknown subcommand {other:?}; use `serve` or `migrate`"),
    }
}
