use anyhow::Context;
use query_api::config::Settings;
use query_api::startup::Application;

// Reads allocate many small, short-lived buffers on both cores; glibc's
// allocator spent about a sixth of a cached read's CPU (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
