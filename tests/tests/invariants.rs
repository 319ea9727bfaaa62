//! The invariants of DESIGN.md that live in the stores, tested against the
//! real PostgreSQL and Redis through the project's own store code.

use std::time::Duration;

use chrono::Utc;
use command_api::relay::{read_batch, Checkpoint};
use command_api::store::{AppendError, EventStore};
use events::domain::{EventMetadata, UserDeactivated, UserRegistered};
use events::{PasswordHash, UserEvent, UserStatus, UserView};
use read_model::cache::FILL_MAX_AGE;
use read_model::{Lookup, Namespace, ViewCache};
use sqlx::{Connection, PgConnection};
use userstream_tests::{redis_url, TestEnv};
use uuid::Uuid;

fn registered(name: &str) -> UserEvent {
    UserEvent::Registered(UserRegistered {
        username: name.into(),
        email: format!("{name}@example.com"),
        password_hash: PasswordHash::new("$argon2id$v=19$test".into()),
        sealed_code: None,
        code_expires_at: None,
    })
}

fn deactivated() -> UserEvent {
    UserEvent::Deactivated(UserDeactivated { reason: None })
}

fn meta() -> EventMetadata {
    EventMetadata {
        actor: "test".into(),
        ..EventMetadata::default()
    }
}

async fn count_events(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_database_refuses_update_delete_and_truncate_on_events() {
    let env = TestEnv::new().await;
    let store = EventStore::new(env.pool.clone());
    let id = Uuid::now_v7();
    store
        .register(
            id,
            "ann",
            "ann@example.com",
            &[registered("ann")],
            &meta(),
            None,
        )
        .await
        .unwrap();
    for statement in [
        "UPDATE events SET event_type = 'Tampered'",
        "DELETE FROM events",
        "TRUNCATE events",
    ] {
        let error = sqlx::query(statement)
            .execute(&env.pool)
            .await
            .expect_err(statement);
        assert!(
            error.to_string().contains("append-only"),
            "{statement}: {error}"
        );
    }
    assert_eq!(count_events(&env).await, 1);
}

#[tokio::test]
async fn two_appends_at_the_same_version_conflict_and_one_wins() {
    let env = TestEnv::new().await;
    let store = EventStore::new(env.pool.clone());
    let id = Uuid::now_v7();
    store
        .register(
            id,
            "bob",
            "bob@example.com",
            &[registered("bob")],
            &meta(),
            None,
        )
        .await
        .unwrap();
    let events = [deactivated()];
    let metadata = meta();
    let (a, b) = tokio::join!(
        store.append(
            id,
            1,
            &events,
            &metadata,
            None,
            command_api::sessions::Revoke::Nothing
        ),
        store.append(
            id,
            1,
            &events,
            &metadata,
            None,
            command_api::sessions::Revoke::Nothing
        )
    );
    let outcomes = [a, b];
    assert_eq!(outcomes.iter().filter(|r| r.is_ok()).count(), 1);
    assert!(outcomes
        .iter()
        .any(|r| matches!(r, Err(AppendError::VersionConflict))));
    let versions: Vec<i32> = sqlx::query_scalar(
        "SELECT stream_version FROM events WHERE stream_id = $1 ORDER BY stream_version",
    )
    .bind(id)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(versions, [1, 2]);
}

#[tokio::test]
async fn usernames_and_emails_are_reserved_in_the_appending_transaction() {
    let env = TestEnv::new().await;
    let store = EventStore::new(env.pool.clone());
    store
        .register(
            Uuid::now_v7(),
            "cat",
            "cat@example.com",
            &[registered("cat")],
            &meta(),
            None,
        )
        .await
        .unwrap();
    let same_name = store
        .register(
            Uuid::now_v7(),
            "cat",
            "other@example.com",
            &[registered("cat")],
            &meta(),
            None,
        )
        .await;
    assert!(matches!(same_name, Err(AppendError::UsernameTaken)));
    let same_email = store
        .register(
            Uuid::now_v7(),
            "other",
            "cat@example.com",
            &[registered("other")],
            &meta(),
            None,
        )
        .await;
    assert!(matches!(same_email, Err(AppendError::EmailTaken)));
    assert_eq!(
        count_events(&env).await,
        1,
        "refused registrations append nothing"
    );
}

/// Inserts one event for a new stream inside `tx` and returns its position.
async fn insert_in(tx: &mut PgConnection, name: &str) -> i64 {
    let event = registered(name);
    sqlx::query_scalar(
        "INSERT INTO events (stream_id, stream_version, event_id, event_type, schema_version, payload) \
         VALUES ($1, 1, $2, $3, 1, $4) RETURNING global_position",
    )
    .bind(Uuid::now_v7())
    .bind(Uuid::now_v7())
    .bind(event.event_type())
    .bind(event.payload())
    .fetch_one(tx)
    .await
    .unwrap()
}

async fn positions(reader: &mut PgConnection, after: Checkpoint) -> Vec<i64> {
    read_batch(reader, after, 100)
        .await
        .unwrap()
        .iter()
        .map(|(_, e)| e.global_position)
        .collect()
}

/// Reads until `count` events are readable (other tests' transactions, which
/// share the cluster-wide xmin, may briefly hold the horizon back).
async fn read_when_ready(reader: &mut PgConnection, after: Checkpoint, count: usize) -> Vec<i64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let read = positions(reader, after).await;
        if read.len() >= count || std::time::Instant::now() > deadline {
            return read;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_relay_never_reads_past_a_transaction_that_is_still_open() {
    let env = TestEnv::new().await;
    let mut slow = PgConnection::connect(&env.database_url).await.unwrap();
    let mut fast = PgConnection::connect(&env.database_url).await.unwrap();
    let mut reader = PgConnection::connect(&env.database_url).await.unwrap();

    // The slow transaction takes the lower position, the fast one commits first.
    sqlx::query("BEGIN").execute(&mut slow).await.unwrap();
    let low = insert_in(&mut slow, "slow").await;
    sqlx::query("BEGIN").execute(&mut fast).await.unwrap();
    let high = insert_in(&mut fast, "fast").await;
    sqlx::query("COMMIT").execute(&mut fast).await.unwrap();
    assert!(low < high);

    assert_eq!(
        positions(&mut reader, Checkpoint::default()).await,
        Vec::<i64>::new(),
        "nothing may be read while an older transaction is open"
    );
    sqlx::query("COMMIT").execute(&mut slow).await.unwrap();
    // xmin is cluster-wide: another test's open transaction may hold it back a moment.
    let read = read_when_ready(&mut reader, Checkpoint::default(), 2).await;
    assert_eq!(read, [low, high]);
}

#[tokio::test]
async fn the_relay_orders_by_transaction_so_a_late_lower_position_is_not_skipped() {
    let env = TestEnv::new().await;
    let mut early = PgConnection::connect(&env.database_url).await.unwrap();
    let mut late = PgConnection::connect(&env.database_url).await.unwrap();
    let mut reader = PgConnection::connect(&env.database_url).await.unwrap();

    // `early` gets the older transaction id but appends after `late`, so it
    // holds the higher position and commits last.
    sqlx::query("BEGIN").execute(&mut early).await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut early)
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut late).await.unwrap();
    let low = insert_in(&mut late, "late").await;
    let high = insert_in(&mut early, "early").await;
    sqlx::query("COMMIT").execute(&mut late).await.unwrap();
    assert!(positions(&mut reader, Checkpoint::default())
        .await
        .is_empty());
    sqlx::query("COMMIT").execute(&mut early).await.unwrap();

    read_when_ready(&mut reader, Checkpoint::default(), 2).await;
    let batch = read_batch(&mut reader, Checkpoint::default(), 100)
        .await
        .unwrap();
    let order: Vec<i64> = batch.iter().map(|(_, e)| e.global_position).collect();
    assert_eq!(order, [high, low], "transaction order, then position");
    // Resuming from the first event's checkpoint yields exactly the second.
    let (xid, first) = &batch[0];
    let after_first = Checkpoint {
        transaction_id: *xid,
        global_position: first.global_position,
    };
    assert_eq!(positions(&mut reader, after_first).await, [low]);
}

fn cache(env: &TestEnv) -> ViewCache {
    ViewCache::new(
        &redis_url(),
        env.redis_prefix.clone(),
        Duration::from_secs(60),
        Duration::from_secs(2),
    )
    .unwrap()
}

fn view(id: Uuid, version: i32, status: UserStatus) -> UserView {
    UserView {
        id,
        username: "dan".into(),
        email: "dan@example.com".into(),
        status,
        version,
        registered_at: Utc::now(),
        updated_at: Utc::now(),
        roles: Vec::new(),
        locked_until: None,
        email_verified: false,
        profile: Default::default(),
    }
}

#[tokio::test]
async fn redis_views_never_move_backwards_and_pending_marks_refuse_old_fills() {
    let env = TestEnv::new().await;
    let cache = cache(&env);
    let ns = Namespace {
        projection_version: 1,
        epoch: 7,
    };
    let id = Uuid::new_v4();
    assert!(cache.open(ns, 0).await.unwrap());
    assert!(!cache.open(ns, 0).await.unwrap(), "a namespace opens once");
    assert!(cache
        .fill(ns, &view(id, 2, UserStatus::Deactivated), None)
        .await
        .unwrap());
    assert!(!cache
        .fill(ns, &view(id, 1, UserStatus::Active), None)
        .await
        .unwrap());
    assert!(!cache
        .fill(ns, &view(id, 2, UserStatus::Active), None)
        .await
        .unwrap());
    let Lookup::Hit(cached) = cache.get(ns, id, 0).await.unwrap() else {
        panic!("expected a hit");
    };
    assert_eq!(cached.version, 2);
    assert!(cached.body.contains("deactivated"));

    // Batch 1 is about to commit version 3: readers miss, and a reader's fill
    // of what it read before the commit (version 2) is refused.
    assert_eq!(
        cache.mark(ns, 0, 1, &[(id, 3)]).await.unwrap(),
        Some(vec![true]),
        "the entry was cached: the projector rewrites it after the commit"
    );
    assert!(matches!(
        cache.get(ns, id, 1).await.unwrap(),
        Lookup::Miss { .. }
    ));
    assert!(!cache
        .fill(ns, &view(id, 2, UserStatus::Active), None)
        .await
        .unwrap());
    assert!(cache
        .fill(ns, &view(id, 3, UserStatus::Active), None)
        .await
        .unwrap());
    let Lookup::Hit(cached) = cache.get(ns, id, 1).await.unwrap() else {
        panic!("expected a hit");
    };
    assert_eq!(cached.version, 3);

    // A namespace that was not told of batch 2 is behind: nothing in it is served,
    // and it cannot be marked for later batches either.
    assert_eq!(cache.get(ns, id, 2).await.unwrap(), Lookup::Behind);
    assert_eq!(cache.mark(ns, 2, 3, &[(id, 4)]).await.unwrap(), None);
}

/// Only what readers fill is cached; an absence is cached briefly and can
/// never hide a user from the moment its registration is marked; a fill that
/// reaches Redis too long after its miss is refused, so it cannot outlive the
/// mark that would have refused it.
#[tokio::test]
async fn absences_and_cold_users_never_hide_a_view_and_late_fills_are_refused() {
    let env = TestEnv::new().await;
    let cache = cache(&env);
    let ns = Namespace {
        projection_version: 1,
        epoch: 8,
    };
    assert!(cache.open(ns, 0).await.unwrap());
    let (hot, cold, newcomer) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());

    // A reader missed the newcomer before it existed: the absence is cached.
    let Lookup::Miss { at } = cache.get(ns, newcomer, 0).await.unwrap() else {
        panic!("a miss");
    };
    assert!(cache.fill_absent(ns, newcomer, Some(at)).await.unwrap());
    assert_eq!(cache.get(ns, newcomer, 0).await.unwrap(), Lookup::Absent);
    let absent_ttl = ttl(&cache.key(ns, newcomer)).await;
    assert!(
        (1..=5).contains(&absent_ttl),
        "absences are short-lived: {absent_ttl}"
    );
    assert!(cache
        .fill(ns, &view(hot, 1, UserStatus::Active), Some(at))
        .await
        .unwrap());

    // A batch registers the newcomer and the cold user and changes the hot one.
    let marked = cache
        .mark(ns, 0, 1, &[(hot, 2), (cold, 1), (newcomer, 1)])
        .await
        .unwrap();
    assert_eq!(marked, Some(vec![true, false, false]));
    assert!(matches!(
        cache.get(ns, newcomer, 1).await.unwrap(),
        Lookup::Miss { .. }
    ));
    // The reader's absence, arriving late, loses to the registration's mark.
    assert!(!cache.fill_absent(ns, newcomer, Some(at)).await.unwrap());
    let mark_ttl = ttl(&cache.key(ns, cold)).await;
    assert!(
        (50..=60).contains(&mark_ttl),
        "a cold user's mark outlives any fill, then goes: {mark_ttl}"
    );

    // The projector rewrites what was cached and nothing else.
    let views = [view(hot, 2, UserStatus::Deactivated)];
    let refreshed: Vec<&UserView> = views.iter().collect();
    assert_eq!(cache.refresh_many(ns, &refreshed).await.unwrap(), 1);
    let Lookup::Hit(cached) = cache.get(ns, hot, 1).await.unwrap() else {
        panic!("the hot view is served");
    };
    assert_eq!(cached.version, 2);
    let gone = Uuid::new_v4();
    let views = [view(gone, 1, UserStatus::Active)];
    let refreshed: Vec<&UserView> = views.iter().collect();
    assert_eq!(
        cache.refresh_many(ns, &refreshed).await.unwrap(),
        0,
        "an entry that expired is not brought back by the projector"
    );

    // A fill whose miss is older than the limit is refused; a fresh one is not.
    let Lookup::Miss { at } = cache.get(ns, cold, 1).await.unwrap() else {
        panic!("a miss");
    };
    let stale = at - i64::try_from(FILL_MAX_AGE.as_millis()).unwrap() - 1_000;
    let cold_view = view(cold, 1, UserStatus::Active);
    assert!(!cache.fill(ns, &cold_view, Some(stale)).await.unwrap());
    assert!(cache.fill(ns, &cold_view, Some(at)).await.unwrap());
}

async fn ttl(key: &str) -> i64 {
    let mut redis = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("TTL")
        .arg(key)
        .query_async(&mut redis)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_relay_reads_a_backlog_in_index_order_without_sorting_it() {
    let env = TestEnv::new().await;
    // Enough rows that a sequential scan and sort would look cheap to a planner
    // that could not use the index for this ORDER BY.
    sqlx::query(
        "INSERT INTO events (stream_id, stream_version, event_id, event_type, schema_version, payload) \
         SELECT gen_random_uuid(), 1, gen_random_uuid(), 'UserDeactivated', 1, '{\"reason\": null}' \
         FROM generate_series(1, 20000)",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE events")
        .execute(&env.pool)
        .await
        .unwrap();
    let plan: Vec<String> =
        sqlx::query_scalar(&format!("EXPLAIN {}", command_api::relay::log::READ_BATCH))
            .bind(0_i64)
            .bind(0_i64)
            .bind(5000_i64)
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let plan = plan.join("\n");
    assert!(plan.contains("events_transaction_order_idx"), "{plan}");
    assert!(
        !plan.contains("Sort"),
        "the backlog must not be sorted:\n{plan}"
    );
}
