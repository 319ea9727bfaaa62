//! Background tasks that must live as long as the service.
//!
//! A task that ends before shutdown was asked for, or panics, leaves the
//! service unable to do its job while it may still answer HTTP. [`Tasks`]
//! notices: `/readyz` fails at once (through [`Tasks::check`]), and after
//! [`FAILURE_GRACE`] the service stops with an error, so the process exits
//! non-zero and a supervisor restarts it.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::shutdown::{Shutdown, Trigger};

/// How long a service whose task failed keeps answering (unready) before it
/// exits: long enough for probes and load balancers to see `/readyz` fail.
pub const FAILURE_GRACE: Duration = Duration::from_secs(2);

/// The tasks of one service and the first failure among them.
#[derive(Clone)]
pub struct Tasks {
    failure: Arc<Mutex<Option<String>>>,
    shutdown: Shutdown,
    trigger: Arc<Trigger>,
}

impl Tasks {
    /// Tasks that stop when `shutdown` is requested; a failure fires `trigger`.
    pub fn new(trigger: Trigger, shutdown: Shutdown) -> Self {
        Self {
            failure: Arc::default(),
            shutdown,
            trigger: Arc::new(trigger),
        }
    }

    /// The stop flag to hand to tasks.
    pub fn shutdown(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Asks everything to stop (a signal arrived).
    pub fn stop(&self) {
        self.trigger.fire();
    }

    /// Runs `task` and watches it; the handle is the watcher's.
    pub fn spawn(
        &self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let handle = tokio::spawn(task);
        let tasks = self.clone();
        tokio::spawn(async move {
            let ended = match handle.await {
                Ok(()) if tasks.shutdown.is_requested() => return,
                Ok(()) => format!("task {name} ended"),
                Err(error) if error.is_panic() => format!("task {name} panicked"),
                Err(error) => format!("task {name} was cancelled: {error}"),
            };
            tracing::error!(task = name, "{ended}; the service is unready and stops");
            metrics::counter!("service_task_failures_total", "task" => name).increment(1);
            tasks
                .failure
                .lock()
                .expect("task failure lock")
                .get_or_insert(ended);
            tokio::time::sleep(FAILURE_GRACE).await;
            tasks.trigger.fire();
        })
    }

    /// For `/readyz`: Err with the first failure, if any.
    pub fn check(&self) -> Result<serde_json::Value, String> {
        match &*self.failure.lock().expect("task failure lock") {
            Some(failure) => Err(failure.clone()),
            None => Ok(serde_json::json!("running")),
        }
    }

    /// The first failure, for the service's exit.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().expect("task failure lock").clone()
    }
}

/// Owns a value whose destructor may block for long, such as rdkafka's
/// consumer, which polls in `Drop` until it has left its group (as long as
/// the broker takes).
///
/// Dropped normally, the value is dropped in place: a graceful stop waits for
/// it. Dropped while a panic unwinds, it is dropped on a thread of its own.
/// Unwinding through an async task drops everything the task holds before
/// the task ends, so a blocking destructor there would hold back what
/// [`Tasks`] does on a panic (fail `/readyz`, then stop the process) for as
/// long as it blocks.
pub struct DropAwayOnPanic<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> DropAwayOnPanic<T> {
    pub fn new(value: T) -> Self {
        Self(Some(value))
    }
}

impl<T: Send + 'static> std::ops::Deref for DropAwayOnPanic<T> {
    type Target = T;

    fn deref(&self) -> &T {
        self.0.as_ref().expect("present until dropped")
    }
}

impl<T: Send + 'static> Drop for DropAwayOnPanic<T> {
    fn drop(&mut self) {
        let Some(value) = self.0.take() else { return };
        if std::thread::panicking() {
            // If no thread can be made, the value is dropped here after all.
            let _ = std::thread::Builder::new()
                .name("drop-after-panic".into())
                .spawn(move || drop(value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_task_makes_the_service_unready_then_stop() {
        let (trigger, shutdown) = crate::shutdown::channel();
        let tasks = Tasks::new(trigger, shutdown.clone());
        assert!(tasks.check().is_ok());
        tasks.spawn("worker", async { panic!("deliberate test panic") });
        let mut stop = shutdown.clone();
        tokio::time::timeout(FAILURE_GRACE * 3, stop.requested())
            .await
            .expect("the failure stops the service");
        assert_eq!(tasks.check().unwrap_err(), "task worker panicked");
    }

    /// Sends the id of the thread that drops it.
    struct ReportsDrop(std::sync::mpsc::Sender<std::thread::ThreadId>);

    impl Drop for ReportsDrop {
        fn drop(&mut self) {
            let _ = self.0.send(std::thread::current().id());
        }
    }

    #[test]
    fn a_value_dropped_by_a_panic_is_dropped_on_another_thread() {
        let (sender, dropped) = std::sync::mpsc::channel();
        let here = std::thread::current().id();
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _consumer = DropAwayOnPanic::new(ReportsDrop(sender));
            panic!("deliberate test panic");
        }));
        assert!(unwound.is_err());
        let on = dropped
            .recv_timeout(Duration::from_secs(5))
            .expect("dropped");
        assert_ne!(on, here, "dropped on the unwinding thread");
    }

    #[test]
    fn a_value_dropped_normally_is_dropped_in_place() {
        let (sender, dropped) = std::sync::mpsc::channel();
        drop(DropAwayOnPanic::new(ReportsDrop(sender)));
        assert_eq!(dropped.try_recv(), Ok(std::thread::current().id()));
    }

    #[tokio::test]
    async fn a_task_ending_on_shutdown_is_not_a_failure() {
        let (trigger, shutdown) = crate::shutdown::channel();
        let tasks = Tasks::new(trigger, shutdown.clone());
        let mut wait = shutdown.clone();
        let watcher = tasks.spawn("worker", async move { wait.requested().await });
        tasks.stop();
        watcher.await.unwrap();
        assert!(tasks.check().is_ok());
        assert!(tasks.failure().is_none());
    }
}
