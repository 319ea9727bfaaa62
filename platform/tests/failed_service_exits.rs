//! A service that failed must end its process, even while a thread of its
//! runtime is still busy: a supervisor can only restart a process that exits.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Set in the child process this test starts.
const CHILD: &str = "PLATFORM_FAILED_SERVICE_CHILD";

#[test]
fn a_failed_service_exits_with_status_1_without_waiting_for_its_runtime() {
    let started = Instant::now();
    let mut child = Command::new(std::env::current_exe().expect("the test binary"))
        .args([
            "--exact",
            "child_service_that_fails_while_a_thread_is_busy",
            "--ignored",
        ])
        .env(CHILD, "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the child starts");
    let deadline = Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("child status") {
            break status;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the failed service did not exit within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(1), "exit status of a failed service");
}

/// The child: a service, run as `main` runs one, fails while a blocking
/// thread of its runtime is busy for a minute (as one closing a Kafka
/// consumer against a slow broker can be).
#[test]
#[ignore = "run as a child process by the test above"]
fn child_service_that_fails_while_a_thread_is_busy() {
    assert_eq!(std::env::var(CHILD).as_deref(), Ok("1"), "only as a child");
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let result = runtime.block_on(platform::telemetry::run_service("exit-test", async {
        tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_secs(60)));
        anyhow::bail!("deliberate test failure")
    }));
    // Only reached when run_service returned: dropping the runtime then
    // waits for the busy thread.
    drop(runtime);
    result.expect("the service failed");
}
