//! Static checks of the Docker description of the stack: `docker-compose.yml`,
//! `Dockerfile` and `.dockerignore` at the project root. No Docker is needed;
//! the files are parsed and compared with what the project itself pins (the
//! Kafka version in `stack/kafka/pom.xml`, the binaries of the workspace).

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use serde_yaml_ng::Value;

const INFRASTRUCTURE: [&str; 3] = ["postgres", "redis", "kafka"];
/// The application services, the binary each runs and the port it serves.
const APPS: [(&str, u16); 4] = [
    ("command-api", 3001),
    ("query-api", 3002),
    ("projector", 3003),
    ("notifier", 3004),
];

/// The infrastructure each application service uses (the notifier has no
/// use for Redis, and is the only one that sends mail).
fn dependencies(app: &str) -> &'static [&'static str] {
    match app {
        "notifier" => &["postgres", "kafka", "smtp"],
        _ => &INFRASTRUCTURE,
    }
}

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn read(relative: &str) -> String {
    let path = root().join(relative);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn compose() -> Value {
    serde_yaml_ng::from_str(&read("docker-compose.yml"))
        .unwrap_or_else(|e| panic!("docker-compose.yml is not valid YAML: {e}"))
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    let service = &compose["services"][name];
    assert!(
        service.is_mapping(),
        "docker-compose.yml has no service {name:?}"
    );
    service
}

fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A service's environment, in either of compose's two spellings (map or `K=V` list).
fn environment(service: &Value) -> BTreeMap<String, String> {
    match &service["environment"] {
        Value::Mapping(map) => map
            .iter()
            .map(|(k, v)| {
                let key = scalar(k).expect("environment key");
                (key, scalar(v).unwrap_or_default())
            })
            .collect(),
        Value::Sequence(items) => items
            .iter()
            .map(|item| {
                let item = item.as_str().expect("environment entry is a string");
                let (k, v) = item.split_once('=').unwrap_or((item, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

fn env_var(compose: &Value, name: &str, var: &str) -> String {
    environment(service(compose, name))
        .remove(var)
        .unwrap_or_else(|| panic!("service {name} does not set {var}"))
}

/// (published host port, container port) pairs, short or long syntax.
fn published_ports(service: &Value) -> Vec<(u16, u16)> {
    let Some(ports) = service["ports"].as_sequence() else {
        return Vec::new();
    };
    ports
        .iter()
        .filter_map(|port| match port {
            Value::Mapping(_) => {
                let published = scalar(&port["published"])?.parse().ok()?;
                let target = scalar(&port["target"])?.parse().ok()?;
                Some((published, target))
            }
            other => {
                let text = scalar(other)?;
                let text = text.split('/').next().unwrap_or_default();
                let parts: Vec<&str> = text.rsplitn(3, ':').collect();
                match parts.as_slice() {
                    [target, published, ..] => {
                        Some((published.parse().ok()?, target.parse().ok()?))
                    }
                    _ => None,
                }
            }
        })
        .collect()
}

/// Splits `repository:tag`.
fn image(compose: &Value, name: &str) -> (String, String) {
    let image = service(compose, name)["image"]
        .as_str()
        .unwrap_or_else(|| panic!("service {name} has no image"))
        .to_owned();
    let (repository, tag) = image
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("image {image:?} of {name} has no tag"));
    (repository.to_owned(), tag.to_owned())
}

/// The host of `scheme://user:password@host:port/path` or of `host:port`.
fn host_of(address: &str) -> &str {
    let rest = address.split_once("://").map_or(address, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, rest)| rest);
    rest.split([':', '/']).next().unwrap_or_default()
}

fn pinned_kafka_version() -> String {
    let pom = read("stack/kafka/pom.xml");
    let start = pom
        .find("<kafka.version>")
        .expect("stack/kafka/pom.xml has no <kafka.version>")
        + "<kafka.version>".len();
    let end = start
        + pom[start..]
            .find("</kafka.version>")
            .expect("unterminated <kafka.version>");
    pom[start..end].trim().to_owned()
}

#[test]
fn compose_defines_the_eight_services() {
    let compose = compose();
    for name in INFRASTRUCTURE
        .into_iter()
        .chain(["smtp"])
        .chain(APPS.map(|(name, _)| name))
    {
        service(&compose, name);
    }
}

#[test]
fn compose_infrastructure_uses_the_official_images() {
    let compose = compose();
    let expected = [
        ("postgres", "postgres", "16"),
        ("redis", "redis", "7"),
        ("kafka", "apache/kafka", "4"),
    ];
    for (name, repository, major) in expected {
        let (actual_repository, tag) = image(&compose, name);
        assert_eq!(
            actual_repository, repository,
            "service {name} must use the official image"
        );
        assert!(
            tag == major
                || tag.starts_with(&format!("{major}."))
                || tag.starts_with(&format!("{major}-")),
            "service {name} uses {repository}:{tag}, expected major version {major}"
        );
    }
}

#[test]
fn compose_kafka_image_tag_equals_the_version_pinned_in_the_kafka_pom() {
    let pinned = pinned_kafka_version();
    assert!(
        pinned.starts_with("4."),
        "stack/kafka/pom.xml pins Kafka {pinned}, not 4.x"
    );
    let (_, tag) = image(&compose(), "kafka");
    assert_eq!(
        tag, pinned,
        "apache/kafka image tag and <kafka.version> in stack/kafka/pom.xml must be the same release"
    );
}

#[test]
fn compose_publishes_the_documented_ports() {
    let compose = compose();
    let expected = [
        ("postgres", 5432),
        ("redis", 6379),
        ("kafka", 9092),
        ("command-api", 3001),
        ("query-api", 3002),
        ("projector", 3003),
        ("notifier", 3004),
        ("smtp", 1025),
    ];
    for (name, port) in expected {
        let ports = published_ports(service(&compose, name));
        assert!(
            ports.contains(&(port, port)),
            "service {name} must publish {port}:{port}, publishes {ports:?}"
        );
    }
}

#[test]
fn compose_every_service_has_a_healthcheck() {
    let compose = compose();
    let services = compose["services"]
        .as_mapping()
        .expect("services is a mapping");
    assert!(!services.is_empty());
    for (name, service) in services {
        let name = scalar(name).unwrap_or_default();
        if service["restart"].as_str() == Some("no") {
            // A one-shot job (the migrations): it exits, it is never "healthy".
            continue;
        }
        let healthcheck = &service["healthcheck"];
        assert!(
            healthcheck.is_mapping(),
            "service {name} has no healthcheck"
        );
        assert_ne!(
            healthcheck["disable"].as_bool(),
            Some(true),
            "healthcheck of {name} is disabled"
        );
        let test: Vec<String> = match &healthcheck["test"] {
            Value::Sequence(items) => items.iter().filter_map(scalar).collect(),
            Value::String(command) => vec![command.clone()],
            _ => Vec::new(),
        };
        // ["CMD", ...] / ["CMD-SHELL", "..."] or a plain command string; ["NONE"] disables it.
        let command = match test.first().map(String::as_str) {
            Some("CMD" | "CMD-SHELL") => test[1..].join(" "),
            Some("NONE") | None => String::new(),
            Some(_) => test.join(" "),
        };
        assert!(
            !command.trim().is_empty(),
            "healthcheck of {name} has no test command: {test:?}"
        );
    }
}

#[test]
fn compose_app_services_wait_for_healthy_dependencies() {
    let compose = compose();
    for (name, _) in APPS {
        let depends_on = &service(&compose, name)["depends_on"];
        for &dependency in dependencies(name) {
            assert_eq!(
                depends_on[dependency]["condition"].as_str(),
                Some("service_healthy"),
                "{name} must wait until {dependency} is healthy"
            );
        }
    }
}

#[test]
fn compose_app_services_reach_the_stack_by_its_compose_service_hostnames() {
    let compose = compose();
    let advertised = env_var(&compose, "kafka", "KAFKA_ADVERTISED_LISTENERS");
    for (name, _) in APPS {
        let database_url = env_var(&compose, name, "DATABASE_URL");
        assert!(
            database_url.starts_with("postgres://"),
            "{name}: DATABASE_URL {database_url:?}"
        );
        assert_eq!(
            host_of(&database_url),
            "postgres",
            "{name}: DATABASE_URL {database_url:?}"
        );

        if dependencies(name).contains(&"redis") {
            let redis_url = env_var(&compose, name, "REDIS_URL");
            assert!(
                redis_url.starts_with("redis://"),
                "{name}: REDIS_URL {redis_url:?}"
            );
            assert_eq!(
                host_of(&redis_url),
                "redis",
                "{name}: REDIS_URL {redis_url:?}"
            );
        } else {
            assert!(
                env_var_opt(&compose, name, "REDIS_URL").is_none(),
                "{name} has no use for Redis"
            );
        }

        let brokers = env_var(&compose, name, "KAFKA_BROKERS");
        for broker in brokers.split(',') {
            assert_eq!(
                host_of(broker),
                "kafka",
                "{name}: KAFKA_BROKERS {brokers:?}"
            );
            // The address must be one the broker advertises, or clients get
            // redirected to an address they cannot reach.
            assert!(
                advertised.split(',').any(|listener| listener.ends_with(&format!("://{broker}"))),
                "{name}: KAFKA_BROKERS {broker:?} is not among the broker's advertised listeners {advertised:?}"
            );
        }

        assert_eq!(
            env_var(&compose, name, "KAFKA_TOPIC"),
            "users.events.v1",
            "{name}: KAFKA_TOPIC"
        );
    }
}

#[test]
fn compose_app_services_run_their_binary_on_all_interfaces_and_probe_healthz() {
    let compose = compose();
    for (name, port) in APPS {
        let service = service(&compose, name);
        let command: Vec<String> = match &service["command"] {
            Value::Sequence(items) => items.iter().filter_map(scalar).collect(),
            Value::String(command) => command.split_whitespace().map(str::to_owned).collect(),
            _ => Vec::new(),
        };
        assert_eq!(
            command.first().map(String::as_str),
            Some(name),
            "{name} must run its own binary"
        );
        assert_eq!(
            env_var(&compose, name, "BIND_ADDR"),
            format!("0.0.0.0:{port}"),
            "{name}: BIND_ADDR"
        );

        let probe: Vec<String> = match &service["healthcheck"]["test"] {
            Value::Sequence(items) => items.iter().filter_map(scalar).collect(),
            Value::String(command) => vec![command.clone()],
            _ => Vec::new(),
        };
        let probe = probe.join(" ");
        assert!(
            probe.contains(&format!(":{port}/healthz")),
            "{name}: healthcheck must hit /healthz on {port}, is {probe:?}"
        );

        let build = &service["build"];
        let context = build.as_str().or_else(|| build["context"].as_str());
        assert_eq!(
            context,
            Some("."),
            "{name} must be built from the project root"
        );
    }
}

#[test]
fn compose_gives_the_admin_token_to_the_command_api_only() {
    let compose = compose();
    let token = env_var(&compose, "command-api", "ADMIN_TOKEN");
    // command-api refuses to start with a token shorter than 16 characters.
    assert!(
        token.chars().count() >= 16,
        "ADMIN_TOKEN {token:?} is too short for command-api"
    );
    for name in ["query-api", "projector", "notifier"] {
        assert!(
            !environment(service(&compose, name)).contains_key("ADMIN_TOKEN"),
            "{name} has no use for ADMIN_TOKEN and must not get it"
        );
    }
}

#[test]
fn compose_gives_the_signing_key_to_the_command_api_only() {
    let compose = compose();
    let path = env_var(&compose, "command-api", "JWT_SIGNING_KEY_FILE");
    let mounts: Vec<String> = service(&compose, "command-api")["volumes"]
        .as_sequence()
        .map(|v| v.iter().filter_map(scalar).collect())
        .unwrap_or_default();
    let mount = mounts
        .iter()
        .find(|m| m.split(':').nth(1) == Some(path.as_str()))
        .unwrap_or_else(|| panic!("no volume puts a key at {path}: {mounts:?}"));
    let host = mount.split(':').next().unwrap();
    let pem = read(host.trim_start_matches("./"));
    assert!(
        pem.starts_with("-----BEGIN PRIVATE KEY-----"),
        "{host} is not a PEM key"
    );
    assert!(
        host.contains("DEVELOPMENT-ONLY"),
        "the committed key is marked as development-only"
    );
    for name in ["query-api", "projector", "notifier"] {
        let env = environment(service(&compose, name));
        assert!(
            !env.keys().any(|k| k.starts_with("JWT_")),
            "{name} has no use for the signing key and must not get it"
        );
    }
}

#[test]
fn compose_kafka_is_a_single_kraft_node() {
    let compose = compose();
    let env = environment(service(&compose, "kafka"));
    let get = |key: &str| {
        env.get(key)
            .cloned()
            .unwrap_or_else(|| panic!("kafka does not set {key}"))
    };
    let mut roles: Vec<String> = get("KAFKA_PROCESS_ROLES")
        .split(',')
        .map(|r| r.trim().to_owned())
        .collect();
    roles.sort();
    assert_eq!(roles, ["broker", "controller"], "combined KRaft mode");
    assert!(
        get("KAFKA_CONTROLLER_QUORUM_VOTERS").starts_with(&format!("{}@", get("KAFKA_NODE_ID")))
    );
    assert!(
        !get("CLUSTER_ID").is_empty(),
        "the storage needs a cluster id to be formatted"
    );
    for key in [
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
    ] {
        assert_eq!(get(key), "1", "{key} must be 1 on a single node");
    }
    assert!(
        get("KAFKA_ADVERTISED_LISTENERS")
            .split(',')
            .any(|l| l.ends_with("localhost:9092")),
        "the published port 9092 must be advertised as localhost:9092 for clients on the host"
    );
}

#[test]
fn dockerfile_builds_the_three_binaries_into_a_slim_non_root_image() {
    let dockerfile = read("Dockerfile");
    let lines: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#'))
        .collect();
    let text = lines.join("\n");
    assert!(
        text.contains("cargo build --release --locked --workspace --bins"),
        "the builder must build every binary of the workspace from the lock file"
    );

    let last_from = lines
        .iter()
        .rposition(|line| line.starts_with("FROM "))
        .expect("Dockerfile has no FROM");
    assert!(
        lines[last_from].starts_with("FROM debian:bookworm-slim"),
        "the runtime stage must be debian:bookworm-slim, is {:?}",
        lines[last_from]
    );
    let runtime = lines[last_from..].join("\n");

    for (binary, _) in APPS {
        assert!(
            root().join(binary).join("src/main.rs").is_file(),
            "{binary} is not a binary of the workspace"
        );
        assert!(
            runtime.lines().any(|line| line.starts_with("COPY")
                && line.contains(binary)
                && line.contains("/usr/local/bin")),
            "the runtime stage must copy {binary} into /usr/local/bin"
        );
    }

    let user = runtime
        .lines()
        .rfind(|line| line.starts_with("USER "))
        .expect("the runtime stage must switch to a non-root USER");
    let user = user
        .trim_start_matches("USER ")
        .split(':')
        .next()
        .unwrap_or_default()
        .trim();
    assert!(
        !["root", "0"].contains(&user),
        "the services must not run as root (USER {user})"
    );
}

#[test]
fn dockerignore_keeps_build_output_local_state_and_git_out_of_the_context() {
    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .map(|line| {
            line.trim()
                .trim_start_matches('/')
                .trim_end_matches('/')
                .to_owned()
        })
        .collect();
    for entry in ["target", ".state", ".git"] {
        assert!(
            ignored.iter().any(|line| line == entry),
            ".dockerignore must list {entry}"
        );
    }
}

#[test]
fn compose_migrates_as_the_owner_before_any_service_starts() {
    let compose = compose();
    let migrate = service(&compose, "migrate");
    let command: Vec<String> = migrate["command"]
        .as_sequence()
        .expect("migrate has a command")
        .iter()
        .filter_map(scalar)
        .collect();
    assert_eq!(command, ["command-api", "migrate"]);
    let url = env_var(&compose, "migrate", "MIGRATION_DATABASE_URL");
    assert!(url.starts_with("postgres://userstream_owner:"), "{url}");
    for (name, _) in APPS {
        assert_eq!(
            service(&compose, name)["depends_on"]["migrate"]["condition"].as_str(),
            Some("service_completed_successfully"),
            "{name} must start after the migrations"
        );
    }
    let init = read("stack/postgres/init-roles.sql");
    for role in [
        "userstream_owner",
        "userstream_command",
        "userstream_projector",
        "userstream_query",
        "userstream_notifier",
    ] {
        assert!(
            init.contains(&format!("CREATE ROLE {role} LOGIN")),
            "{role}"
        );
    }
}

#[test]
fn compose_gives_each_service_its_own_database_role() {
    let compose = compose();
    let expected = [
        ("command-api", "userstream_command"),
        ("query-api", "userstream_query"),
        ("projector", "userstream_projector"),
        ("notifier", "userstream_notifier"),
    ];
    for (name, role) in expected {
        let url = env_var(&compose, name, "DATABASE_URL");
        let user = url
            .trim_start_matches("postgres://")
            .split([':', '@'])
            .next()
            .unwrap_or_default();
        assert_eq!(user, role, "{name}: DATABASE_URL {url:?}");
        assert!(
            env_var_opt(&compose, name, "MIGRATION_DATABASE_URL").is_none(),
            "{name} must not hold the owner's credentials"
        );
    }
}

fn env_var_opt(compose: &Value, name: &str, var: &str) -> Option<String> {
    environment(service(compose, name)).get(var).cloned()
}

#[test]
fn compose_notifier_sends_to_the_mail_sink_with_the_command_apis_code_key() {
    let compose = compose();
    let (repository, _) = image(&compose, "smtp");
    assert_eq!(repository, "axllent/mailpit");
    assert_eq!(env_var(&compose, "notifier", "SMTP_HOST"), "smtp");
    let port: u16 = env_var(&compose, "notifier", "SMTP_PORT").parse().unwrap();
    assert!(
        published_ports(service(&compose, "smtp"))
            .iter()
            .any(|(_, target)| *target == port),
        "the notifier's SMTP_PORT {port} is not the mail sink's"
    );
    let key = env_var(&compose, "notifier", "MAIL_CODE_KEY");
    events::codes::CodeKey::from_base64(&key).expect("MAIL_CODE_KEY is a 32-byte key");
    assert_eq!(
        env_var(&compose, "command-api", "MAIL_CODE_KEY"),
        key,
        "the notifier opens what the command API seals"
    );
    assert_eq!(
        read("stack/dev-keys/mail-code-key.DEVELOPMENT-ONLY.b64").trim(),
        key,
        "the development key is the one in stack/dev-keys"
    );
    for name in ["query-api", "projector"] {
        assert!(
            env_var_opt(&compose, name, "MAIL_CODE_KEY").is_none(),
            "{name} has no use for the mail code key and must not get it"
        );
    }
}
