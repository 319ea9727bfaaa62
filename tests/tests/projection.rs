//! The projector's batch against the real PostgreSQL and Redis, driven
//! directly: each event applied once, gaps healed from the log, messages that
//! cannot be applied parked for their user only, and Redis told of every batch
//! before it commits.

use std::time::Duration;

use chrono::{DateTime, Utc};
use command_api::store::EventStore;
use events::domain::{
    EventMetadata, RecordedEvent, UserDeactivated, UserReactivated, UserRegistered,
};
use events::{IntegrationEvent, PasswordHash, UserEvent, UserStatus};
use projector::batch::{Mode, ReadModel};
use projector::message::Message;
use projector::parked::{self, Reason};
use read_model::{state, Lookup, ViewCache, ViewRows};
use userstream_tests::{redis_url, TestEnv};
use uuid::Uuid;

fn model(env: &TestEnv, redis: &str) -> ReadModel {
    ReadModel::new(
        ViewRows::new(env.pool.clone()),
        ViewCache::new(
            redis,
            env.redis_prefix.clone(),
            Duration::from_secs(60),
            Duration::from_millis(500),
        )
        .unwrap(),
    )
}

fn metadata() -> EventMetadata {
    EventMetadata {
        actor: "test".into(),
        ..EventMetadata::default()
    }
}

/// Registers a user and appends `changes` (true: deactivate, false: reactivate).
async fn user(store: &EventStore, name: &str, changes: &[bool]) -> Uuid {
    let id = Uuid::new_v4();
    let registered = UserEvent::Registered(UserRegistered {
        username: name.into(),
        email: format!("{name}@example.com"),
        password_hash: PasswordHash::new("$argon2id$v=19$test".into()),
        sealed_code: None,
        code_expires_at: None,
    });
    let email = format!("{name}@example.com");
    store
        .register(id, name, &email, &[registered], &metadata(), None)
        .await
        .unwrap();
    for (i, deactivate) in changes.iter().enumerate() {
        let event = if *deactivate {
            UserEvent::Deactivated(UserDeactivated { reason: None })
        } else {
            UserEvent::Reactivated(UserReactivated { reason: None })
        };
        store
            .append(
                id,
                i as i32 + 1,
                &[event],
                &metadata(),
                None,
                command_api::sessions::Revoke::Nothing,
            )
            .await
            .unwrap();
    }
    id
}

#[derive(sqlx::FromRow)]
struct Stored {
    global_position: i64,
    stream_version: i32,
    event_id: Uuid,
    event_type: String,
    schema_version: i16,
    payload: serde_json::Value,
    recorded_at: DateTime<Utc>,
}

/// The messages the relay would publish for `user`, in version order.
async fn messages(env: &TestEnv, user: Uuid) -> Vec<Message> {
    let rows: Vec<Stored> = sqlx::query_as(
        "SELECT global_position, stream_version, event_id, event_type, schema_version, payload, \
                recorded_at FROM events WHERE stream_id = $1 ORDER BY stream_version",
    )
    .bind(user)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|r| {
            let event = IntegrationEvent::from_recorded(&RecordedEvent {
                global_position: r.global_position,
                stream_id: user,
                stream_version: r.stream_version,
                event_id: r.event_id,
                recorded_at: r.recorded_at,
                event: UserEvent::decode(&r.event_type, r.schema_version, r.payload).unwrap(),
            });
            message(&event, r.global_position)
        })
        .collect()
}

fn message(event: &IntegrationEvent, offset: i64) -> Message {
    Message {
        topic: "test".into(),
        partition: 0,
        offset,
        key: Some(event.key()),
        ce_id: Some(event.event_id.to_string()),
        ce_type: Some(event.ce_type().into()),
        body: event.body(),
    }
}

#[tokio::test]
async fn each_event_applies_once_and_a_gap_is_healed_from_the_log() {
    let env = TestEnv::new().await;
    let store = EventStore::new(env.pool.clone());
    let model = model(&env, &redis_url());
    let id = user(&store, "gwen", &[true, false, true]).await;
    let log = messages(&env, id).await;

    let first = model.apply_batch(&log[..1], Mode::Consume).await.unwrap();
    assert_eq!((first.applied, first.duplicates), (1, 0));
    let again = model.apply_batch(&log[..1], Mode::Consume).await.unwrap();
    assert_eq!((again.applied, again.duplicates), (0, 1));

    // Versions 2 and 3 never arrive; version 4 does: the log supplies them.
    let healed = model.apply_batch(&log[3..], Mode::Consume).await.unwrap();
    assert_eq!((healed.applied, healed.healed), (3, 2));
    assert!(healed.parked.is_empty());
    let view = model.rows.load(id).await.unwrap().unwrap();
    assert_eq!((view.version, view.status), (4, UserStatus::Deactivated));

    // Late copies of what was healed are duplicates, in one batch with a copy of itself.
    let late = [log[1].clone(), log[2].clone(), log[2].clone()];
    let late = model.apply_batch(&late, Mode::Consume).await.unwrap();
    assert_eq!((late.applied, late.duplicates), (0, 3));
    assert_eq!(model.rows.load(id).await.unwrap().unwrap().version, 4);
}

#[tokio::test]
async fn messages_that_cannot_be_applied_are_parked_and_every_other_user_goes_on() {
    let env = TestEnv::new().await;
    let store = EventStore::new(env.pool.clone());
    let model = model(&env, &redis_url());
    let alice = user(&store, "alice", &[true]).await;
    let bob = user(&store, "bob", &[]).await;
    let mut batch = messages(&env, alice).await;

    // A status change that is not in the log, at a version the log lacks.
    let forged = IntegrationEvent {
        event_id: Uuid::new_v4(),
        stream_version: 4,
        ..IntegrationEvent::decode(
            batch[1].ce_id.as_deref().unwrap(),
            IntegrationEvent::TYPE_REACTIVATED,
            &batch[1].body,
        )
        .unwrap()
    };
    batch.push(message(&forged, 10));
    let mut undecodable = message(&forged, 11);
    undecodable.body = b"{not json".to_vec();
    batch.push(undecodable);
    let mut unknown = message(&forged, 12);
    unknown.ce_type = Some("user.renamed.v1".into());
    batch.push(unknown);
    batch.extend(messages(&env, bob).await);

    let outcome = model.apply_batch(&batch, Mode::Consume).await.unwrap();
    let mut reasons: Vec<Reason> = outcome.parked.iter().map(|(_, r)| *r).collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [Reason::Undecodable, Reason::UnknownType, Reason::NotInLog]
    );
    assert_eq!(outcome.applied, 3, "alice v1, v2 and bob v1");
    assert_eq!(model.rows.load(alice).await.unwrap().unwrap().version, 2);
    assert_eq!(model.rows.load(bob).await.unwrap().unwrap().version, 1);
    let counts = parked::count_by_reason(&env.pool).await.unwrap();
    assert_eq!(counts.values().sum::<i64>(), 3, "{counts:?}");

    // The cause is not fixed: a retry keeps them parked and counts the attempt.
    let retried = parked::retry(&model, None).await.unwrap();
    assert_eq!((retried.resolved, retried.still_parked), (0, 3));
    let attempts: Vec<i32> = sqlx::query_scalar("SELECT attempts FROM projector_parked")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(attempts, [2, 2, 2]);
}

#[tokio::test]
async fn an_impossible_transition_in_the_log_parks_that_user_until_retried() {
    let env = TestEnv::new().await;
    let store = EventStore::new(env.pool.clone());
    let model = model(&env, &redis_url());
    let carl = user(&store, "carl", &[]).await;
    let dora = user(&store, "dora", &[]).await;
    // History this projector cannot fold: a second registration of carl.
    sqlx::query(
        "INSERT INTO events (stream_id, stream_version, event_id, event_type, schema_version, payload) \
         SELECT stream_id, 2, gen_random_uuid(), event_type, schema_version, payload \
         FROM events WHERE stream_id = $1",
    )
    .bind(carl)
    .execute(&env.pool)
    .await
    .unwrap();
    let mut batch = messages(&env, carl).await;
    batch.extend(messages(&env, dora).await);
    let outcome = model.apply_batch(&batch, Mode::Consume).await.unwrap();
    assert_eq!(outcome.parked.len(), 1);
    assert_eq!(outcome.parked[0].1, Reason::InvalidTransition);
    assert_eq!(model.rows.load(carl).await.unwrap().unwrap().version, 1);
    assert_eq!(model.rows.load(dora).await.unwrap().unwrap().version, 1);

    // Once the view can take it (here: an operator repaired the view by hand
    // to what a fixed projection would give), retrying resolves the message.
    sqlx::query("UPDATE user_views SET version = 2 WHERE id = $1")
        .bind(carl)
        .execute(&env.pool)
        .await
        .unwrap();
    let retried = parked::retry(&model, None).await.unwrap();
    assert_eq!((retried.resolved, retried.still_parked), (1, 0));
    assert!(parked::count_by_reason(&env.pool).await.unwrap().is_empty());
}

#[tokio::test]
async fn redis_is_told_of_a_batch_before_it_commits_or_stops_being_trusted() {
    let env = TestEnv::new().await;
    let store = EventStore::new(env.pool.clone());
    let model = model(&env, &redis_url());
    assert_eq!(
        projector::keeper::step(&model).await.unwrap(),
        projector::keeper::Check::Opened(
            state::load(&env.pool).await.unwrap().namespace().unwrap()
        )
    );
    let id = user(&store, "erin", &[true]).await;
    let cold = user(&store, "eric", &[true]).await;
    let log = messages(&env, id).await;
    let outcome = model.apply_batch(&log[..1], Mode::Consume).await.unwrap();
    assert!(outcome.cache_marked);
    // A reader reads erin and fills the cache: erin is hot.
    let ns = state::load(&env.pool).await.unwrap().namespace().unwrap();
    let Lookup::Miss { at } = model.cache.get(ns, id, 0).await.unwrap() else {
        panic!("nothing cached before a read");
    };
    let first = model.rows.load(id).await.unwrap().unwrap();
    assert!(model.cache.fill(ns, &first, Some(at)).await.unwrap());

    let mut batch = log[1..].to_vec();
    batch.extend(messages(&env, cold).await);
    let outcome = model.apply_batch(&batch, Mode::Consume).await.unwrap();
    assert!(outcome.cache_marked);
    model.flush_cache().await; // the put runs on after the batch returns
    let after = state::load(&env.pool).await.unwrap();
    let ns = after.namespace().expect("still trusted");
    let Lookup::Hit(hit) = model.cache.get(ns, id, after.batch_seq).await.unwrap() else {
        panic!("the hot view was rewritten in Redis");
    };
    assert_eq!(hit.version, 2);
    // The batch number recorded with the views is the one Redis was told of,
    // not an earlier one: Redis has no batch after it.
    assert!(matches!(
        model.cache.get(ns, id, after.batch_seq + 1).await.unwrap(),
        Lookup::Behind
    ));
    // Nobody read eric: only a short-lived mark, no view.
    assert!(matches!(
        model.cache.get(ns, cold, after.batch_seq).await.unwrap(),
        Lookup::Miss { .. }
    ));

    // The same batch applied by a projector that cannot reach Redis: the view
    // still moves, and the namespace is dropped in the same transaction.
    let blind = model_without_redis(&env);
    let again = user(&store, "fred", &[]).await;
    let outcome = blind
        .apply_batch(&messages(&env, again).await, Mode::Consume)
        .await
        .unwrap();
    assert!(!outcome.cache_marked);
    assert_eq!(blind.rows.load(again).await.unwrap().unwrap().version, 1);
    let dropped = state::load(&env.pool).await.unwrap();
    assert_eq!(dropped.cache_epoch, None);
    assert!(dropped.batch_seq > after.batch_seq);

    // Redis answers again: the keeper opens a fresh namespace at the last batch.
    let projector::keeper::Check::Opened(fresh) = projector::keeper::step(&model).await.unwrap()
    else {
        panic!("a fresh namespace");
    };
    assert_ne!(fresh, ns);
    assert_eq!(
        model.cache.through(fresh).await.unwrap(),
        Some(dropped.batch_seq)
    );
}

fn model_without_redis(env: &TestEnv) -> ReadModel {
    // Nothing listens on port 1.
    model(env, "redis://127.0.0.1:1")
}

/// Two projector instances overlapping (a rebalance) apply the same batches
/// at once: the state lock serialises them, so each event is applied once.
#[tokio::test]
async fn overlapping_projectors_commit_batches_one_at_a_time() {
    let env = TestEnv::new().await;
    let store = EventStore::new(env.pool.clone());
    let (a, b) = (model(&env, &redis_url()), model(&env, &redis_url()));
    let mut batches = Vec::new();
    for i in 0..40 {
        let id = user(&store, &format!("overlap{i}"), &[true]).await;
        batches.push(messages(&env, id).await);
    }
    let mut applied = 0;
    for pair in batches.chunks(2) {
        // The same two batches through both instances at once.
        let both: Vec<Message> = pair.concat();
        let (first, second) = tokio::join!(
            a.apply_batch(&both, Mode::Consume),
            b.apply_batch(&both, Mode::Consume)
        );
        let (first, second) = (first.unwrap(), second.unwrap());
        applied += first.applied + second.applied;
        assert_eq!(
            first.duplicates + second.duplicates,
            both.len(),
            "one instance applied, the other saw duplicates"
        );
    }
    assert_eq!(applied, 80, "each of the 80 events applied once");
}
