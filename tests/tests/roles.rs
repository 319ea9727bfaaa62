//! Least privilege (DESIGN.md invariant 10), on the real PostgreSQL: each
//! service's role tries what it must not do, and every attempt is refused.

use command_api::store::EventStore;
use events::domain::{EventMetadata, UserRegistered};
use events::{PasswordHash, UserEvent};
use sqlx::{Connection, PgConnection};
use userstream_tests::{Role, TestEnv};
use uuid::Uuid;

const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA";

async fn connect(env: &TestEnv, role: Role) -> PgConnection {
    PgConnection::connect(&env.url_as(role))
        .await
        .unwrap_or_else(|e| panic!("{} logs in: {e}", role.name()))
}

/// Runs `sql` as `role` and returns the SQLSTATE it failed with, if it failed.
async fn refused(env: &TestEnv, role: Role, sql: &str) -> Option<String> {
    let mut conn = connect(env, role).await;
    let result = sqlx::raw_sql(sql).execute(&mut conn).await;
    result.err().map(|e| {
        e.as_database_error()
            .and_then(|d| d.code())
            .map_or_else(|| e.to_string(), |c| c.into_owned())
    })
}

async fn seed(env: &TestEnv) -> Uuid {
    let id = Uuid::new_v4();
    let registered = UserEvent::Registered(UserRegistered {
        username: "rhea".into(),
        email: "rhea@example.com".into(),
        password_hash: PasswordHash::new(HASH.into()),
        sealed_code: None,
        code_expires_at: None,
    });
    let metadata = EventMetadata {
        actor: "test".into(),
        ..EventMetadata::default()
    };
    EventStore::new(env.pool.clone())
        .register(
            id,
            "rhea",
            "rhea@example.com",
            &[registered],
            &metadata,
            None,
        )
        .await
        .unwrap();
    id
}

/// SQLSTATE 42501: insufficient_privilege (also what "must be owner" raises).
const DENIED: &str = "42501";

#[tokio::test]
async fn no_service_role_can_change_history_or_escape_the_triggers() {
    let env = TestEnv::new().await;
    seed(&env).await;
    for role in [Role::Command, Role::Projector, Role::Query, Role::Notifier] {
        for sql in [
            "UPDATE events SET payload = '{}'",
            "DELETE FROM events",
            "TRUNCATE events",
            "ALTER TABLE events DISABLE TRIGGER ALL",
            "SET session_replication_role = replica",
            "DROP TABLE events",
        ] {
            assert_eq!(
                refused(&env, role, sql).await.as_deref(),
                Some(DENIED),
                "{} may run {sql}",
                role.name()
            );
        }
    }
    let history: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(history, 1, "the log is untouched");
}

#[tokio::test]
async fn no_role_is_superuser_and_no_service_role_owns_the_log() {
    let env = TestEnv::new().await;
    for role in [
        Role::Owner,
        Role::Command,
        Role::Projector,
        Role::Query,
        Role::Notifier,
    ] {
        let superuser: bool =
            sqlx::query_scalar("SELECT rolsuper FROM pg_roles WHERE rolname = $1")
                .bind(role.name())
                .fetch_one(&env.pool)
                .await
                .unwrap();
        assert!(!superuser, "{} is a superuser", role.name());
    }
    let owner: String =
        sqlx::query_scalar("SELECT tableowner::text FROM pg_tables WHERE tablename = 'events'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(owner, Role::Owner.name());
}

#[tokio::test]
async fn the_read_side_cannot_read_a_password_hash() {
    let env = TestEnv::new().await;
    seed(&env).await;
    for role in [Role::Projector, Role::Query] {
        assert_eq!(
            refused(&env, role, "SELECT payload FROM events")
                .await
                .as_deref(),
            Some(DENIED),
            "{} reads the raw log",
            role.name()
        );
    }
    // The projector reads the log through events_public, which has no hash.
    let mut projector = connect(&env, Role::Projector).await;
    let payloads: Vec<String> = sqlx::query_scalar("SELECT payload::text FROM events_public")
        .fetch_all(&mut projector)
        .await
        .unwrap();
    assert_eq!(payloads.len(), 1);
    assert!(
        payloads.iter().all(|p| !p.contains("argon2")),
        "{payloads:?}"
    );
    assert_eq!(
        refused(&env, Role::Query, "SELECT payload FROM events_public")
            .await
            .as_deref(),
        Some(DENIED),
        "the query API reads read models only"
    );
}

#[tokio::test]
async fn each_role_writes_only_its_own_tables() {
    let env = TestEnv::new().await;
    let id = seed(&env).await;
    let view = format!(
        "INSERT INTO user_views VALUES ('{}', 'x', 'x@example.com', 'active', 1, now(), now())",
        Uuid::new_v4()
    );
    let cases = [
        (Role::Command, view.as_str()),
        (Role::Command, "UPDATE projection_state SET batch_seq = 0"),
        (Role::Command, "DELETE FROM projector_parked"),
        (Role::Projector, "DELETE FROM user_identities"),
        (Role::Projector, "DELETE FROM idempotency_keys"),
        (Role::Projector, "UPDATE relay_checkpoints SET global_position = 0"),
        (Role::Projector, "INSERT INTO events (stream_id, stream_version, event_id, event_type, schema_version, payload) VALUES (gen_random_uuid(), 1, gen_random_uuid(), 'UserDeactivated', 1, '{}')"),
        (Role::Query, view.as_str()),
        (Role::Query, "UPDATE projection_state SET batch_seq = 0"),
        (Role::Query, "DELETE FROM user_views"),
        (Role::Query, "SELECT * FROM user_identities"),
    ];
    for (role, sql) in cases {
        assert_eq!(
            refused(&env, role, sql).await.as_deref(),
            Some(DENIED),
            "{} may run {sql}",
            role.name()
        );
    }
    // What each must do still works.
    let mut command = connect(&env, Role::Command).await;
    let versions: Vec<i32> =
        sqlx::query_scalar("SELECT stream_version FROM events WHERE stream_id = $1")
            .bind(id)
            .fetch_all(&mut command)
            .await
            .unwrap();
    assert_eq!(versions, [1]);
    assert_eq!(refused(&env, Role::Projector, &view).await, None);
    assert_eq!(
        refused(&env, Role::Query, "SELECT count(*) FROM user_views").await,
        None
    );
}

/// The notifier reads the sealed codes through `mail_codes` and nothing
/// else of the log or the read models; it writes only its own table.
#[tokio::test]
async fn the_notifier_reads_sealed_codes_only_and_writes_only_its_mails() {
    let env = TestEnv::new().await;
    seed(&env).await;
    for sql in [
        "SELECT payload FROM events",
        "SELECT * FROM events_public",
        "SELECT * FROM user_views",
        "SELECT * FROM user_identities",
        "INSERT INTO events (stream_id, stream_version, event_id, event_type, schema_version, payload) VALUES (gen_random_uuid(), 1, gen_random_uuid(), 'UserDeactivated', 1, '{}')",
        "DELETE FROM notifier_mails",
    ] {
        assert_eq!(
            refused(&env, Role::Notifier, sql).await.as_deref(),
            Some(DENIED),
            "the notifier may run {sql}"
        );
    }
    for sql in [
        "SELECT event_id, stream_id, sealed_code, code_expires_at FROM mail_codes",
        "SELECT count(*) FROM notifier_mails",
        "UPDATE notifier_mails SET status = 'pending' WHERE false",
    ] {
        assert_eq!(
            refused(&env, Role::Notifier, sql).await,
            None,
            "the notifier cannot run {sql}"
        );
    }
}
