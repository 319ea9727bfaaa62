//! Helpers for userstream's end-to-end tests.
//!
//! Every test gets its own PostgreSQL database (migrated), Kafka topic, consumer
//! group and Redis key prefix, so tests run in parallel against one real stack
//! without seeing each other. Services are the real binaries, started as child
//! processes on port 0; their JSON log lines are kept for assertions.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::{ClientConfig, Message};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

pub mod identity;
pub mod mail;
pub mod read_side;
pub mod relay;

/// The stack the project's `scripts/stack up` starts; overridable for other hosts.
pub fn admin_database_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://userstream:userstream@127.0.0.1:5432/userstream".into())
}

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub fn kafka_brokers() -> String {
    std::env::var("TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// An admin client of the test broker.
pub fn kafka_admin() -> rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .create()
        .expect("a Kafka admin client")
}

/// Creates `topic` with `partitions` and the topic settings `config`, as a
/// test needs it before anything else would create it.
pub async fn create_topic(topic: &str, partitions: i32, config: &[(&str, &str)]) {
    use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
    let new = config.iter().fold(
        NewTopic::new(topic, partitions, TopicReplication::Fixed(1)),
        |new, (key, value)| new.set(key, value),
    );
    for created in kafka_admin()
        .create_topics([&new], &AdminOptions::new())
        .await
        .expect("Kafka answers")
    {
        created.unwrap_or_else(|(topic, code)| panic!("cannot create {topic}: {code}"));
    }
}

/// A development-only admin token for the services a test starts.
pub const TEST_ADMIN_TOKEN: &str = "test-admin-token-not-a-secret";

/// Polls `check` until it returns `Some`, or panics after `deadline` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < until,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One test's private slice of the stack.
pub struct TestEnv {
    pub database_name: String,
    pub database_url: String,
    pub pool: PgPool,
    pub topic: String,
    pub group_id: String,
    /// The notifier's own consumer group in this test.
    pub notifier_group_id: String,
    pub redis_prefix: String,
}

impl TestEnv {
    /// Creates and migrates a fresh database; names a fresh topic and prefix.
    pub async fn new() -> Self {
        let suffix = Uuid::new_v4().simple().to_string();
        let database_name = format!("test_{suffix}");
        let admin_url = admin_database_url();
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .expect("PostgreSQL is reachable (run `scripts/stack up`)");
        sqlx::query(&format!(
            "CREATE DATABASE {database_name} OWNER {}",
            Role::Owner.name()
        ))
        .execute(&mut admin)
        .await
        .expect("the test role may create databases");
        admin.close().await.ok();
        let database_url = match admin_url.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{database_name}"),
            None => panic!("TEST_DATABASE_URL has no database name: {admin_url}"),
        };
        // Migrations run as the owner role, as `command-api migrate` does.
        let owner = PgPool::connect(&role_url(&database_url, Role::Owner))
            .await
            .expect("the owner role logs in (scripts/stack creates it)");
        command_api::startup::migrate(&owner)
            .await
            .expect("migrations apply");
        owner.close().await;
        let pool = PgPool::connect(&database_url)
            .await
            .expect("connect to the test database");
        Self {
            database_name,
            database_url,
            pool,
            topic: format!("test.users.{suffix}"),
            group_id: format!("test-projector-{suffix}"),
            notifier_group_id: format!("test-notifier-{suffix}"),
            redis_prefix: format!("test:{suffix}:"),
        }
    }

    /// The URL of this test's database as `role`.
    pub fn url_as(&self, role: Role) -> String {
        role_url(&self.database_url, role)
    }

    /// The environment of `service` in this test: its own database role.
    fn service_env(&self, service: Service) -> BTreeMap<&'static str, String> {
        BTreeMap::from([
            ("DATABASE_URL", self.url_as(service.role())),
            ("REDIS_URL", redis_url()),
            ("REDIS_KEY_PREFIX", self.redis_prefix.clone()),
            ("KAFKA_BROKERS", kafka_brokers()),
            ("KAFKA_TOPIC", self.topic.clone()),
            ("KAFKA_GROUP_ID", self.group_id.clone()),
            ("NOTIFIER_GROUP_ID", self.notifier_group_id.clone()),
            ("MAIL_CODE_KEY", mail::TEST_MAIL_CODE_KEY.to_owned()),
            ("SMTP_HOST", mail::smtp_host()),
            ("SMTP_PORT", mail::smtp_port()),
            ("SMTP_TLS", "none".to_owned()),
            ("ADMIN_TOKEN", TEST_ADMIN_TOKEN.to_owned()),
            ("JWT_SIGNING_KEY", identity::TEST_SIGNING_KEY.to_owned()),
            // Admin tokens are made once per command API and kept.
            ("ACCESS_TOKEN_TTL_SECS", "3600".to_owned()),
            ("BIND_ADDR", "127.0.0.1:0".to_owned()),
            ("LOG_FORMAT", "json".to_owned()),
            ("RUST_LOG", "info".to_owned()),
            // Tests register many users from one address at once; the tests of
            // the rate limit and of the bounded hashing queue set their own.
            ("REGISTRATION_RATE_PER_MINUTE", "0".to_owned()),
            ("SIGN_IN_RATE_PER_MINUTE", "0".to_owned()),
            // Tests ask for email codes in quick succession; the test of the
            // resend interval sets its own.
            ("EMAIL_RESEND_SECS", "0".to_owned()),
            ("HASH_QUEUE_CAPACITY", "1024".to_owned()),
        ])
    }

    /// Starts a service binary that must refuse to start: waits (at most
    /// 30 s) for it to exit and returns its status and everything it printed.
    pub async fn start_refused(
        &self,
        service: Service,
        extra: &[(&str, &str)],
    ) -> (std::process::ExitStatus, String) {
        let mut child = self
            .command(service, extra)
            .spawn()
            .expect("start the service");
        let status = eventually(
            &format!("{} to refuse to start", service.binary()),
            Duration::from_secs(30),
            || {
                let status = child.try_wait().ok().flatten();
                async move { status }
            },
        )
        .await;
        let mut printed = String::new();
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read>),
        ]
        .into_iter()
        .flatten()
        {
            let mut stream = stream;
            let _ = stream.read_to_string(&mut printed);
        }
        (status, printed)
    }

    /// The command that runs a service binary with only this test's
    /// environment (plus `extra`), its output piped for the test to read.
    fn command(&self, service: Service, extra: &[(&str, &str)]) -> Command {
        let mut command = Command::new(binary(service.binary()));
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.service_env(service))
            .envs(extra.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        command
    }

    /// Starts a service binary with this test's environment (plus `extra`)
    /// and waits until it logs the address it listens on.
    pub async fn spawn(&self, service: Service, extra: &[(&str, &str)]) -> Running {
        let mut child = self
            .command(service, extra)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary(service.binary()).display()));
        let logs = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let logs = Arc::clone(&logs);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    logs.lock().expect("log lock").push(line);
                }
            });
        }
        let mut running = Running {
            service,
            child,
            addr: None,
            logs,
        };
        let addr = eventually(
            &format!("{} to listen", service.binary()),
            Duration::from_secs(30),
            || {
                let found = running.listening_addr();
                let exited = running.child.try_wait().ok().flatten();
                async move {
                    if let Some(status) = exited {
                        return Some(Err(status));
                    }
                    found.map(Ok)
                }
            },
        )
        .await;
        match addr {
            Ok(addr) => running.addr = Some(addr),
            Err(status) => panic!(
                "{} exited early with {status}:\n{}",
                service.binary(),
                running.logs().join("\n")
            ),
        }
        running
    }
}

impl TestEnv {
    /// Runs a service binary with `args` (a subcommand such as `verify`) and
    /// this test's environment (plus `extra`), and waits for it to exit,
    /// killing it after `deadline`.
    pub async fn run(
        &self,
        service: Service,
        args: &[&str],
        extra: &[(&str, &str)],
        deadline: Duration,
    ) -> Finished {
        let path = binary(service.binary());
        let mut command = tokio::process::Command::from(self.command(service, extra));
        command.args(args).kill_on_drop(true);
        let output = tokio::time::timeout(deadline, command.output())
            .await
            .unwrap_or_else(|_| panic!("{} {args:?} ran past {deadline:?}", service.binary()))
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
        Finished {
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

/// What a command run by [`TestEnv::run`] did.
#[derive(Debug)]
pub struct Finished {
    pub status: std::process::ExitStatus,
    /// The command's output (logs go to stderr).
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// Panics, showing the output, unless the command exited 0.
    pub fn assert_success(&self) {
        assert!(
            self.status.success(),
            "exited with {}:\n{self}",
            self.status
        );
    }
}

impl std::fmt::Display for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr)
    }
}

/// The PostgreSQL roles of migrations/*_roles.sql.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Owner,
    Command,
    Projector,
    Query,
    Notifier,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Self::Owner => "userstream_owner",
            Self::Command => "userstream_command",
            Self::Projector => "userstream_projector",
            Self::Query => "userstream_query",
            Self::Notifier => "userstream_notifier",
        }
    }
}

/// `database_url` with `role`'s credentials: the local development password
/// is the role's name (scripts/stack), `TEST_<ROLE>_PASSWORD` overrides it.
pub fn role_url(database_url: &str, role: Role) -> String {
    let (scheme, rest) = database_url.split_once("://").expect("a postgres:// URL");
    let server_and_db = rest.rsplit_once('@').map_or(rest, |(_, after)| after);
    let variable = format!(
        "TEST_{}_PASSWORD",
        role.name().trim_start_matches("userstream_").to_uppercase()
    );
    let password = std::env::var(variable).unwrap_or_else(|_| role.name().to_owned());
    format!("{scheme}://{}:{password}@{server_and_db}", role.name())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    CommandApi,
    Projector,
    QueryApi,
    Notifier,
}

impl Service {
    /// The database role the service connects as.
    pub fn role(self) -> Role {
        match self {
            Self::CommandApi => Role::Command,
            Self::Projector => Role::Projector,
            Self::QueryApi => Role::Query,
            Self::Notifier => Role::Notifier,
        }
    }

    pub fn binary(self) -> &'static str {
        match self {
            Self::CommandApi => "command-api",
            Self::Projector => "projector",
            Self::QueryApi => "query-api",
            Self::Notifier => "notifier",
        }
    }
}

/// The service binaries sit in `target/<profile>/`: beside a binary run from
/// there (the bench), or one level above a test binary in `deps/`.
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("own binary path");
    let mut dir = exe.parent().expect("binary has a folder").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the services first (`cargo build --workspace --bins`, which `make test` does)",
        path.display()
    );
    path
}

/// A service started by a test; killed when dropped.
pub struct Running {
    pub service: Service,
    child: Child,
    addr: Option<SocketAddr>,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Running {
    pub fn url(&self, path: &str) -> String {
        let addr = self.addr.expect("service is listening");
        format!("http://{addr}{path}")
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().expect("log lock").clone()
    }

    fn listening_addr(&self) -> Option<SocketAddr> {
        self.logs().iter().find_map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).ok()?;
            (value["message"] == "listening")
                .then(|| value["addr"].as_str()?.parse().ok())
                .flatten()
        })
    }

    /// Kills the process outright (SIGKILL): a crash, not a shutdown.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit by itself; if it does not, fails with
    /// the end of what it printed.
    pub async fn wait_exit(mut self, deadline: Duration) -> std::process::ExitStatus {
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().ok().flatten() {
                return status;
            }
            if started.elapsed() > deadline {
                let logs = self.logs();
                let tail = &logs[logs.len().saturating_sub(40)..];
                panic!(
                    "timed out after {deadline:?} waiting for the service to exit; its last lines:\n{}",
                    tail.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The metric samples whose line starts with `prefix`, summed.
    pub async fn metric(&self, prefix: &str) -> f64 {
        let text = reqwest::get(self.url("/metrics"))
            .await
            .expect("metrics answer")
            .text()
            .await
            .expect("metrics text");
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Asks the service to stop (SIGTERM) and waits for it to exit.
    pub async fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let status = eventually("service to exit", Duration::from_secs(15), || {
            let status = self.child.try_wait().ok().flatten();
            async move { status }
        })
        .await;
        status
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One message read back from Kafka.
#[derive(Debug, Clone)]
pub struct KafkaMessage {
    pub key: Option<String>,
    pub partition: i32,
    pub offset: i64,
    pub headers: BTreeMap<String, String>,
    pub body: serde_json::Value,
    pub raw: String,
}

/// Reads `topic` from the beginning until `done` holds for what was read.
pub async fn read_topic(
    topic: &str,
    deadline: Duration,
    done: impl Fn(&[KafkaMessage]) -> bool,
) -> Vec<KafkaMessage> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", format!("test-reader-{}", Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("kafka consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let until = Instant::now() + deadline;
    let mut seen = Vec::new();
    while !done(&seen) {
        let left = until.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "timed out after {deadline:?} reading {topic}; read {} messages",
            seen.len()
        );
        let Ok(received) = tokio::time::timeout(left, consumer.recv()).await else {
            continue;
        };
        // librdkafka reports transient broker states (a topic whose leader
        // is not elected yet right after a broker restart) as errors and
        // goes on consuming; the deadline above bounds them.
        let message = match received {
            Ok(message) => message,
            Err(error) => {
                eprintln!("reading {topic}: {error}, retrying");
                continue;
            }
        };
        let headers = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        let value = h.value.map(String::from_utf8_lossy).unwrap_or_default();
                        (h.key.to_owned(), value.into_owned())
                    })
                    .collect()
            })
            .unwrap_or_default();
        let raw = String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned();
        seen.push(KafkaMessage {
            key: message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
            partition: message.partition(),
            offset: message.offset(),
            headers,
            body: serde_json::from_str(&raw).unwrap_or(serde_json::Value::Null),
            raw,
        });
    }
    seen
}

/// The JSON Schema kept in `events/schema/` for a `ce_type`.
pub fn event_schema(ce_type: &str) -> Option<serde_json::Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../events/schema")
        .join(format!("{ce_type}.json"));
    let text = std::fs::read_to_string(path).ok()?;
    Some(serde_json::from_str(&text).expect("schema files are JSON"))
}

/// The compiled schema of a `ce_type`, compiled once per test binary.
fn event_validator(ce_type: &str) -> Option<&'static jsonschema::Validator> {
    static VALIDATORS: std::sync::OnceLock<BTreeMap<String, jsonschema::Validator>> =
        std::sync::OnceLock::new();
    VALIDATORS
        .get_or_init(|| {
            // Every type the events crate produces: a type added there
            // without a schema file is reported as having none.
            events::IntegrationEvent::TYPES
                .iter()
                .filter_map(|ce_type| {
                    let schema = event_schema(ce_type)?;
                    let validator = jsonschema::options()
                        .should_validate_formats(true)
                        .build(&schema)
                        .expect("event schemas compile");
                    Some(((*ce_type).to_owned(), validator))
                })
                .collect()
        })
        .get(ce_type)
}

/// How a message departs from the Kafka contract: CloudEvents headers in the
/// binary binding, key = user id = ce_subject, and a body valid under the
/// schema of its ce_type. Empty when it conforms.
pub fn contract_violations(message: &KafkaMessage) -> Vec<String> {
    let mut problems = Vec::new();
    let header = |name: &str| message.headers.get(name).map(String::as_str);
    if header("ce_specversion") != Some("1.0") {
        problems.push("ce_specversion is not 1.0".to_owned());
    }
    if header("content-type") != Some("application/json") {
        problems.push("content-type is not application/json".to_owned());
    }
    if header("ce_id")
        .and_then(|id| Uuid::parse_str(id).ok())
        .is_none()
    {
        problems.push("ce_id is not a UUID".to_owned());
    }
    if header("ce_source").is_none_or(str::is_empty) {
        problems.push("ce_source is missing".to_owned());
    }
    let time_ok = header("ce_time").is_some_and(chrono_rfc3339);
    if !time_ok {
        problems.push("ce_time is not an RFC 3339 time".to_owned());
    }
    let subject = header("ce_subject");
    if subject.is_none() || subject != message.key.as_deref() {
        problems.push("ce_subject is not the message key".to_owned());
    }
    if message.body["user_id"].as_str() != subject {
        problems.push("the body's user_id is not ce_subject".to_owned());
    }
    if message.body["occurred_at"].as_str() != header("ce_time") {
        // Same instant, maybe formatted differently: compare parsed values.
        let parse = |s: Option<&str>| s.and_then(|s| s.parse::<DateTime>().ok());
        if parse(message.body["occurred_at"].as_str()) != parse(header("ce_time")) {
            problems.push("the body's occurred_at is not ce_time".to_owned());
        }
    }
    let Some(validator) = header("ce_type").and_then(event_validator) else {
        problems.push(format!("no schema for ce_type {:?}", header("ce_type")));
        return problems;
    };
    problems.extend(
        validator
            .iter_errors(&message.body)
            .map(|e| format!("body: {e} at {}", e.instance_path())),
    );
    problems
}

type DateTime = chrono::DateTime<chrono::Utc>;

fn chrono_rfc3339(text: &str) -> bool {
    chrono::DateTime::parse_from_rfc3339(text).is_ok()
}

/// How `body` departs from the JSON schema that a documented OpenAPI response
/// (`spec.paths[p][method].responses[status]`) declares; empty when it conforms.
pub fn schema_errors(
    spec: &serde_json::Value,
    documented: &serde_json::Value,
    body: &serde_json::Value,
) -> Vec<String> {
    let schema = &documented["content"]["application/json"]["schema"];
    assert!(
        !schema.is_null(),
        "a documented response has no JSON body schema"
    );
    let root = serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "components": spec["components"],
        "allOf": [schema],
    });
    let validator = jsonschema::validator_for(&root).expect("documented schema compiles");
    validator.iter_errors(body).map(|e| e.to_string()).collect()
}
