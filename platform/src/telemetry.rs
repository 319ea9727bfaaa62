//! Logging and metrics set-up, done once per process.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{fmt, EnvFilter};

/// Installs the global tracing subscriber and the Prometheus recorder (before
/// any metric is recorded: metrics recorded earlier would be lost).
///
/// `RUST_LOG` filters (default `info`); `LOG_FORMAT=json` switches to one JSON
/// object per line, which is what the end-to-end tests and log shippers read.
pub fn init() {
    install(false);
}

/// [`init`] for one-shot commands (`projector status`, …): logs go to stderr,
/// so stdout carries only the command's own output (JSON a tool can parse).
pub fn init_for_command() {
    install(true);
}

fn install(to_stderr: bool) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = fmt().with_env_filter(filter).with_target(true);
    // A second init (tests in one process) is not an error worth failing over.
    let _ = match (json, to_stderr) {
        (true, false) => builder.json().flatten_event(true).try_init(),
        (true, true) => builder
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .try_init(),
        (false, false) => builder.try_init(),
        (false, true) => builder.with_writer(std::io::stderr).try_init(),
    };
    metrics_handle();
}

/// A service's `main`: sets up telemetry, runs `service`, and on a fatal
/// error logs it once, with its cause chain, and ends the process with
/// status 1 right there.
///
/// Returning the error instead would drop the runtime first, and that waits
/// for every worker thread. A task that panicked may still be unwinding on
/// one of them through a blocking destructor (rdkafka's consumer polls in
/// its `Drop` until it has left its group, which takes as long as the broker
/// does), so a failed service could hang instead of exiting for its
/// supervisor to restart it.
pub async fn run_service(
    name: &str,
    service: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    init();
    if log_failure(name, service.await).is_err() {
        std::process::exit(1);
    }
    Ok(())
}

/// [`run_service`] for a one-shot command: logs go to stderr
/// ([`init_for_command`]).
pub async fn run_command(
    name: &str,
    command: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    init_for_command();
    log_failure(name, command.await)
}

fn log_failure(name: &str, result: anyhow::Result<()>) -> anyhow::Result<()> {
    if let Err(error) = &result {
        tracing::error!(
            error = format!("{error:#}"),
            service = name,
            "stopped with an error"
        );
    }
    result
}

/// The process-wide Prometheus recorder; installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            const LATENCY_BUCKETS: &[f64] = &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ];
            // Histograms are latencies in seconds, except those named
            // `*_messages`, which count messages per batch.
            const COUNT_BUCKETS: &[f64] =
                &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];
            let builder = PrometheusBuilder::new()
                .set_buckets(LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_messages".into()), COUNT_BUCKETS)
                })
                .expect("bucket lists are not empty");
            let handle = match builder.install_recorder() {
                Ok(handle) => handle,
                // Another recorder is already global (only in tests that embed
                // several services); keep a detached one so /metrics still answers.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            };
            keep_up(handle.clone(), UPKEEP_EVERY);
            handle
        })
        .clone()
}

/// How often histogram samples are folded into their buckets.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Folds `handle`'s histogram samples into their buckets every `every`, on a
/// thread of its own, for the life of the process.
///
/// The recorder keeps each recorded sample until something drains it, and
/// only a scrape of /metrics or this upkeep does: a service nobody scrapes
/// would otherwise keep eight bytes per request (and per batch) for ever.
fn keep_up(handle: PrometheusHandle, every: Duration) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            handle.run_upkeep();
        });
    if let Err(error) = spawned {
        tracing::error!(error = %error, "cannot start the metrics upkeep thread; histograms grow until /metrics is scraped");
    }
}

/// `error: cause: cause…` on one line, for logging an error where it is handled.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident memory of this process, in bytes.
    fn resident() -> usize {
        let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
        let pages: usize = statm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .expect("resident pages");
        pages * 4096
    }

    #[test]
    fn histogram_samples_are_folded_in_without_a_scrape() {
        use metrics::{Key, Metadata, Recorder};
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[1.0])
            .expect("one bucket")
            .build_recorder();
        keep_up(recorder.handle(), Duration::from_millis(5));
        let histogram = recorder.register_histogram(
            &Key::from_name("upkeep_test_seconds"),
            &Metadata::new(module_path!(), metrics::Level::INFO, None),
        );
        const SAMPLES: usize = 30_000_000;
        let before = resident();
        for _ in 0..SAMPLES {
            histogram.record(0.5);
        }
        // Kept raw, the samples would take 240 MB.
        let grown = resident().saturating_sub(before);
        assert!(
            grown < 64 << 20,
            "{} MB kept for {SAMPLES} samples",
            grown >> 20
        );
        // Every sample is counted, give or take a handful: the recorder's
        // lock-free sample list can drop a few that land while it is
        // drained (7 of 30 million here), by a scrape as much as by upkeep.
        let text = recorder.handle().render();
        let counted: usize = text
            .lines()
            .find_map(|l| l.strip_prefix("upkeep_test_seconds_count "))
            .and_then(|n| n.parse().ok())
            .expect("the histogram's count");
        assert!(
            counted <= SAMPLES && SAMPLES - counted < SAMPLES / 10_000,
            "{counted} of {SAMPLES} counted"
        );
    }

    #[test]
    fn message_counts_get_count_buckets_and_latencies_second_buckets() {
        let handle = metrics_handle();
        metrics::histogram!("telemetry_test_batch_messages").record(300.0);
        metrics::histogram!("telemetry_test_seconds").record(0.003);
        let text = handle.render();
        assert!(
            text.contains("telemetry_test_batch_messages_bucket{le=\"500\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("telemetry_test_batch_messages_bucket{le=\"200\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("telemetry_test_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
    }
}
