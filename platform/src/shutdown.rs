//! Graceful shutdown on SIGINT and SIGTERM.

use tokio::sync::watch;

/// Resolves when the process is asked to stop (SIGINT or SIGTERM). The
/// handlers are installed when this is called, not when it is first awaited,
/// so a signal that arrives right after start-up is not lost: call it before
/// announcing that the service listens.
pub fn signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let interrupt = signal(SignalKind::interrupt());
        let terminate = signal(SignalKind::terminate());
        async move {
            match (interrupt, terminate) {
                (Ok(mut interrupt), Ok(mut terminate)) => {
                    tokio::select! {
                        _ = interrupt.recv() => {}
                        _ = terminate.recv() => {}
                    }
                }
                (Err(error), _) | (_, Err(error)) => {
                    tracing::error!(%error, "cannot listen for SIGINT/SIGTERM");
                    std::future::pending::<()>().await;
                }
            }
            tracing::info!("shutdown requested");
        }
    }
    #[cfg(not(unix))]
    async move {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutdown requested");
    }
}

/// A stop flag that many tasks can wait on.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// The sending half of [`Shutdown`].
pub struct Trigger(watch::Sender<bool>);

pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    pub fn fire(&self) {
        let _ = self.0.send(true);
    }
}

impl Shutdown {
    pub fn is_requested(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the stop was requested (at once if it already was).
    pub async fn requested(&mut self) {
        // An Err means the trigger is gone, which also means stop.
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}
