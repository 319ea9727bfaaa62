//! A service's life after start-up, the same for all four. Its one log line,
//! `listening` (with `addr` and `service`), has this module's target, so a
//! service running at `RUST_LOG=warn,platform::service=info` still says where
//! it listens and nothing more.

/// A service's life after start-up: announces `listening`, serves until
/// SIGINT/SIGTERM or until one of `tasks` fails (which stops them all), then
/// drains, awaits `finish` (the service's last work: the relay handing its
/// lead back, a consumer committing its offsets), and ends with an error if a
/// task failed, so that the process exits non-zero.
pub async fn serve_until_stopped(
    service: &'static str,
    listener: tokio::net::TcpListener,
    router: axum::Router,
    tasks: &crate::tasks::Tasks,
    finish: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let addr = listener.local_addr()?;
    // Handlers first: a signal right after "listening" must not be lost.
    let signal = crate::shutdown::signal();
    tracing::info!(%addr, service, "listening");
    let stopper = tasks.clone();
    let mut stopped = tasks.shutdown();
    let served = crate::http::serve(listener, router, async move {
        tokio::select! {
            () = signal => stopper.stop(),
            () = stopped.requested() => {}
        }
    })
    .await;
    finish.await;
    if let Some(failure) = tasks.failure() {
        anyhow::bail!("{failure}");
    }
    served.context("the HTTP server failed")
}
