//! `projector verify`, `rebuild` and `status` against the real stack: verify
//! names every view that departs from the log; rebuild switches to a new
//! generation under read and write load without a 5xx or a step back; the
//! fold stops only the user whose stream cannot be folded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use projector::fold::{Fold, ProblemKind};
use read_model::cache::Entry;
use read_model::{state, ViewCache, ViewRows};
use serde_json::Value;
use userstream_tests::read_side::{read_user, register, set_active};
use userstream_tests::{eventually, redis_url, Running, Service, TestEnv};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(90);
const COMMAND_DEADLINE: Duration = Duration::from_secs(180);

/// Views that are not at their user's last logged version (or missing, or extra).
async fn views_behind_the_log(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM \
           (SELECT stream_id, max(stream_version) AS version FROM events GROUP BY stream_id) l \
         FULL JOIN user_views v ON v.id = l.stream_id \
         WHERE v.id IS NULL OR l.stream_id IS NULL OR v.version <> l.version",
    )
    .fetch_one(pool)
    .await
    .expect("compare the views with the log")
}

/// Polls until the live projector has applied every logged event.
async fn await_caught_up(env: &TestEnv) {
    eventually(
        "the projector to catch up with the log",
        DEADLINE,
        || async { (views_behind_the_log(&env.pool).await == 0).then_some(()) },
    )
    .await;
}

/// Appends `users` users of three events each (registered, deactivated,
/// reactivated) straight into the log, in one transaction.
async fn append_users(pool: &sqlx::PgPool, users: i64) {
    sqlx::query(
        "WITH u AS (SELECT gen_random_uuid() AS id, n FROM generate_series(1, $1) AS n) \
         INSERT INTO events (stream_id, stream_version, event_id, event_type, schema_version, payload) \
         SELECT u.id, v.version, gen_random_uuid(), v.event_type, 1, \
                CASE WHEN v.version = 1 THEN jsonb_build_object( \
                       'username', 'bulk' || replace(u.id::text, '-', ''), \
                       'email', replace(u.id::text, '-', '') || '@example.com', \
                       'password_hash', '$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA') \
                     ELSE '{\"reason\": null}'::jsonb END \
         FROM u CROSS JOIN (VALUES (1, 'UserRegistered'), (2, 'UserDeactivated'), \
                                   (3, 'UserReactivated')) AS v(version, event_type) \
         ORDER BY u.n, v.version",
    )
    .bind(users)
    .execute(pool)
    .await
    .expect("append users to the log");
}

async fn verify(env: &TestEnv) -> userstream_tests::Finished {
    env.run(Service::Projector, &["verify"], &[], COMMAND_DEADLINE)
        .await
}

#[tokio::test]
async fn verify_passes_on_the_projected_views_and_names_a_tampered_row() {
    let env = TestEnv::new().await;
    let command = env.spawn(Service::CommandApi, &[]).await;
    let _projector = env.spawn(Service::Projector, &[]).await;
    let http = reqwest::Client::new();
    let alice = register(&http, &command, "alice").await;
    let bob = register(&http, &command, "bob").await;
    let carol = register(&http, &command, "carol").await;
    set_active(&http, &command, alice.id, false).await;
    await_caught_up(&env).await;

    let clean = verify(&env).await;
    clean.assert_success();
    assert!(clean.stdout.contains("0 difference(s)"), "{clean}");

    sqlx::query("UPDATE user_views SET status = 'deactivated' WHERE id = $1")
        .bind(bob.id)
        .execute(&env.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM user_views WHERE id = $1")
        .bind(carol.id)
        .execute(&env.pool)
        .await
        .unwrap();
    let tampered = verify(&env).await;
    assert!(!tampered.status.success(), "{tampered}");
    let line = |id: Uuid| {
        tampered
            .stdout
            .lines()
            .find(|l| l.contains(&id.to_string()))
            .unwrap_or_else(|| panic!("no line names {id}:\n{tampered}"))
            .to_owned()
    };
    assert!(line(bob.id).contains("status \"deactivated\" (log: \"active\")"));
    assert!(line(carol.id).contains("missing from user_views"));
    assert!(
        !tampered.stdout.contains(&alice.id.to_string()),
        "{tampered}"
    );
    assert!(tampered.stdout.contains("2 difference(s)"), "{tampered}");
}

#[tokio::test]
async fn verify_names_a_corrupted_redis_entry_but_not_a_pending_one() {
    let env = TestEnv::new().await;
    let command = env.spawn(Service::CommandApi, &[]).await;
    let _projector = env.spawn(Service::Projector, &[]).await;
    let http = reqwest::Client::new();
    let dora = register(&http, &command, "dora").await;
    let emil = register(&http, &command, "emil").await;
    let finn = register(&http, &command, "finn").await;
    set_active(&http, &command, dora.id, false).await;
    await_caught_up(&env).await;
    let ns = eventually("a trusted Redis namespace", DEADLINE, || async {
        state::load(&env.pool).await.ok()?.namespace()
    })
    .await;

    // Settle dora's and emil's entries the way the query API fills them after a miss.
    let cache = ViewCache::new(
        &redis_url(),
        env.redis_prefix.clone(),
        Duration::from_secs(600),
        Duration::from_secs(2),
    )
    .unwrap();
    let rows = ViewRows::new(env.pool.clone());
    for id in [dora.id, emil.id] {
        let view = rows.load(id).await.unwrap().expect("projected");
        cache.fill(ns, &view, None).await.unwrap();
    }
    let clean = verify(&env).await;
    clean.assert_success();
    // finn and the administrator who deactivated dora were never read: only
    // the marks of their last changes, pending.
    assert!(clean.stdout.contains("4 entries (2 pending)"), "{clean}");

    let mut redis = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let stored: Vec<u8> = redis::cmd("GET")
        .arg(cache.key(ns, dora.id))
        .query_async(&mut redis)
        .await
        .unwrap();
    let mut entry = Entry::decode(&stored).expect("a settled entry");
    let corrupted = entry.body.replace("\"deactivated\"", "\"active\"");
    assert_ne!(entry.body, corrupted, "the body names the status");
    entry.body = corrupted;
    let _: () = redis::cmd("SET")
        .arg(cache.key(ns, dora.id))
        .arg(entry.encode())
        .arg("KEEPTTL")
        .query_async(&mut redis)
        .await
        .unwrap();
    // A pending mark with a stale body: readers miss on it, so it is fine.
    let stored: Vec<u8> = redis::cmd("GET")
        .arg(cache.key(ns, emil.id))
        .query_async(&mut redis)
        .await
        .unwrap();
    let mut entry = Entry::decode(&stored).expect("a settled entry");
    entry.pending = true;
    entry.body = "{}".into();
    let _: () = redis::cmd("SET")
        .arg(cache.key(ns, emil.id))
        .arg(entry.encode())
        .arg("KEEPTTL")
        .query_async(&mut redis)
        .await
        .unwrap();

    // Absences: true of an id the log lacks; false of finn, who exists.
    let nobody = uuid::Uuid::new_v4();
    let absent = Entry {
        version: 0,
        pending: false,
        body: String::new(),
    };
    for id in [nobody, finn.id] {
        let _: () = redis::cmd("SET")
            .arg(cache.key(ns, id))
            .arg(absent.encode())
            .query_async(&mut redis)
            .await
            .unwrap();
    }

    let found = verify(&env).await;
    assert!(!found.status.success(), "{found}");
    assert!(!found.stdout.contains(&nobody.to_string()), "{found}");
    let finn_line = found
        .stdout
        .lines()
        .find(|l| l.contains(&finn.id.to_string()))
        .unwrap_or_else(|| panic!("finn is not named:\n{found}"));
    assert!(
        finn_line.contains("caches the user as absent"),
        "{finn_line}"
    );
    let dora_line = found
        .stdout
        .lines()
        .find(|l| l.contains(&dora.id.to_string()))
        .unwrap_or_else(|| panic!("dora is not named:\n{found}"));
    assert!(dora_line.contains("Redis"), "{dora_line}");
    assert!(
        dora_line.contains("status \"active\" (log: \"deactivated\")"),
        "{dora_line}"
    );
    assert!(!found.stdout.contains(&emil.id.to_string()), "{found}");
    // emil's mark, and the administrator's (never read).
    assert!(found.stdout.contains("2 pending"), "{found}");
}

/// What the readers saw during the rebuild.
#[derive(Default)]
struct Observed {
    reads: AtomicU64,
    writes: AtomicU64,
    server_errors: Mutex<Vec<String>>,
    regressions: Mutex<Vec<String>>,
}

/// Reads the users of `read_set` in turn until `stop`, checking every answer
/// against the highest version this reader was already served for that user.
async fn reader(
    query: Arc<Running>,
    read_set: Arc<Mutex<Vec<Uuid>>>,
    stop: Arc<AtomicBool>,
    seen: Arc<Observed>,
) {
    let http = reqwest::Client::new();
    let mut served: HashMap<Uuid, i64> = HashMap::new();
    for turn in 0.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let id = {
            let users = read_set.lock().unwrap();
            users[turn % users.len()]
        };
        let (status, body) = read_user(&http, &query, id).await;
        seen.reads.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            seen.server_errors
                .lock()
                .unwrap()
                .push(format!("{id}: {status} {body}"));
            continue;
        }
        // A 404 (not projected yet) counts as version 0: after a 200 it is a step back.
        let version = if status == 200 {
            body["version"].as_i64().unwrap_or(0)
        } else {
            0
        };
        let before = served.entry(id).or_insert(0);
        if version < *before {
            seen.regressions.lock().unwrap().push(format!(
                "{id}: served version {version} ({status}) after version {before}"
            ));
        }
        *before = (*before).max(version);
    }
}

/// Until `stop`: deactivates and reactivates `users` in turn, and every
/// fourth command registers a new user (then read and toggled too).
async fn writer(
    command_url: String,
    admin_token: String,
    mut users: Vec<Uuid>,
    read_set: Arc<Mutex<Vec<Uuid>>>,
    stop: Arc<AtomicBool>,
    seen: Arc<Observed>,
) {
    let http = reqwest::Client::new();
    let mut active: HashMap<Uuid, bool> = users.iter().map(|id| (*id, true)).collect();
    for turn in 1_usize.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        if turn % 4 == 0 {
            let name = format!("late{turn}");
            let response = http
                .post(format!("{command_url}/users"))
                .json(&serde_json::json!({
                    "username": name,
                    "email": format!("{name}@example.com"),
                    "password": "correct horse battery staple",
                }))
                .send()
                .await
                .expect("command API answers");
            assert_eq!(response.status(), 201, "register {name}");
            let body: Value = response.json().await.expect("json");
            let id: Uuid = body["id"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .expect("id");
            users.push(id);
            active.insert(id, true);
            read_set.lock().unwrap().push(id);
        } else {
            let id = users[turn % users.len()];
            let now_active = !active[&id];
            let action = if now_active {
                "reactivate"
            } else {
                "deactivate"
            };
            let response = http
                .post(format!("{command_url}/users/{id}/{action}"))
                .bearer_auth(&admin_token)
                .json(&serde_json::json!({}))
                .send()
                .await
                .expect("command API answers");
            assert_eq!(response.status(), 200, "{action} {id}");
            active.insert(id, now_active);
        }
        seen.writes.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::test]
async fn rebuild_switches_generations_under_load_without_errors_or_steps_back() {
    let env = TestEnv::new().await;
    let command = env.spawn(Service::CommandApi, &[]).await;
    let _projector = env.spawn(Service::Projector, &[]).await;
    let query = Arc::new(env.spawn(Service::QueryApi, &[]).await);
    let http = reqwest::Client::new();
    let mut users = Vec::new();
    for n in 0..12 {
        users.push(register(&http, &command, &format!("load{n}")).await.id);
    }
    // A log big enough that the rebuild takes a while under the readers.
    append_users(&env.pool, 5_000).await;
    await_caught_up(&env).await;
    let bulk: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT id FROM user_views WHERE username LIKE 'bulk%' LIMIT 20")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let mut read_set = users.clone();
    read_set.extend(bulk);
    let read_set = Arc::new(Mutex::new(read_set));

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Observed::default());
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(tokio::spawn(reader(
            Arc::clone(&query),
            Arc::clone(&read_set),
            Arc::clone(&stop),
            Arc::clone(&seen),
        )));
    }
    let admin = userstream_tests::identity::admin_token(&reqwest::Client::new(), &command).await;
    let writer = tokio::spawn(writer(
        command.url(""),
        admin,
        users.clone(),
        Arc::clone(&read_set),
        Arc::clone(&stop),
        Arc::clone(&seen),
    ));
    let progress = |reads: u64, writes: u64| {
        let seen = Arc::clone(&seen);
        async move {
            eventually("the load to make progress", DEADLINE, || async {
                (seen.reads.load(Ordering::Relaxed) >= reads
                    && seen.writes.load(Ordering::Relaxed) >= writes)
                    .then_some(())
            })
            .await
        }
    };
    progress(100, 5).await;

    let reads_before = seen.reads.load(Ordering::Relaxed);
    let rebuilt = env
        .run(Service::Projector, &["rebuild"], &[], COMMAND_DEADLINE)
        .await;
    rebuilt.assert_success();
    assert!(
        rebuilt.stdout.contains("rebuild: generation 2 serving"),
        "{rebuilt}"
    );
    assert!(
        seen.reads.load(Ordering::Relaxed) > reads_before,
        "the query API served reads during the rebuild"
    );
    let (reads, writes) = (
        seen.reads.load(Ordering::Relaxed),
        seen.writes.load(Ordering::Relaxed),
    );
    progress(reads + 200, writes + 10).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("reader");
    }
    writer.await.expect("writer");

    let errors = seen.server_errors.lock().unwrap().clone();
    let logged: Vec<String> = query
        .logs()
        .into_iter()
        .filter(|l| l.contains("\"ERROR\"") || l.contains("\"WARN\""))
        .collect();
    assert!(
        errors.is_empty(),
        "5xx from the query API: {errors:#?}\nits warnings and errors: {logged:#?}\nrebuild: {rebuilt}"
    );
    let regressions = seen.regressions.lock().unwrap().clone();
    assert!(regressions.is_empty(), "reads went back: {regressions:#?}");
    let current = state::load(&env.pool).await.unwrap();
    assert_eq!(current.projection_version, 2);
    let retired: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE tablename LIKE 'user\\_views\\_g%'",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert!(retired.is_empty(), "left behind: {retired:?}");

    await_caught_up(&env).await;
    verify(&env).await.assert_success();
    // The live projector opens a Redis namespace for the new generation.
    eventually("a namespace for generation 2", DEADLINE, || async {
        let ns = state::load(&env.pool).await.ok()?.namespace()?;
        (ns.projection_version == 2).then_some(())
    })
    .await;
}

/// Inserts events straight into the log: (user, version, type, payload).
async fn append(pool: &sqlx::PgPool, events: &[(Uuid, i32, &str, Value)]) {
    for (user, version, event_type, payload) in events {
        sqlx::query(
            "INSERT INTO events (stream_id, stream_version, event_id, event_type, schema_version, payload) \
             VALUES ($1, $2, gen_random_uuid(), $3, 1, $4)",
        )
        .bind(user)
        .bind(version)
        .bind(event_type)
        .bind(payload)
        .execute(pool)
        .await
        .unwrap();
    }
}

fn registered(name: &str) -> Value {
    serde_json::json!({
        "username": name,
        "email": format!("{name}@example.com"),
        "password_hash": "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA",
    })
}

#[tokio::test]
async fn the_fold_reports_an_impossible_transition_and_folds_everyone_else() {
    let env = TestEnv::new().await;
    let (ann, ben, cem, dan) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    let off = serde_json::json!({ "reason": "test" });
    let on = serde_json::json!({ "reason": null });
    append(
        &env.pool,
        &[
            (ann, 1, "UserRegistered", registered("ann")),
            (ben, 1, "UserRegistered", registered("ben")),
            (cem, 1, "UserRegistered", registered("cem")),
            // A second registration cannot follow the first.
            (ben, 2, "UserRegistered", registered("ben2")),
            (ann, 2, "UserDeactivated", off.clone()),
            (ben, 3, "UserDeactivated", off.clone()),
            (cem, 2, "UserDeactivated", off.clone()),
            (dan, 1, "UserRegistered", registered("dan")),
            (
                dan,
                2,
                "UserRenamed",
                serde_json::json!({ "username": "x" }),
            ),
            (cem, 3, "UserReactivated", on),
        ],
    )
    .await;

    // The fold reads only below xmin, which is cluster-wide: wait until no
    // transaction (of this or a parallel test) is older than these events.
    eventually("the events to be below xmin", DEADLINE, || async {
        let below: bool = sqlx::query_scalar(
            "SELECT max(transaction_id) < pg_snapshot_xmin(pg_current_snapshot()) FROM events",
        )
        .fetch_one(&env.pool)
        .await
        .ok()?;
        below.then_some(())
    })
    .await;
    // Batches of two: problems and users span batch boundaries.
    let mut conn = env.pool.acquire().await.unwrap();
    let mut fold = Fold::new();
    assert_eq!(fold.fold_log(&mut conn, 2).await.unwrap(), 10);
    let view = |id: &Uuid| {
        let v = &fold.views[id];
        (v.version, v.status.as_str(), v.username.as_str())
    };
    assert_eq!(view(&ann), (2, "deactivated", "ann"));
    assert_eq!(view(&cem), (3, "active", "cem"));
    assert_eq!(
        view(&ben),
        (1, "active", "ben"),
        "ben stops before the bad event"
    );
    assert_eq!(view(&dan), (1, "active", "dan"));
    assert_eq!(fold.problems.len(), 2);
    assert_eq!(fold.problems[&ben].stream_version, 2);
    assert_eq!(
        fold.problems[&ben].kind,
        ProblemKind::Invalid {
            current: 1,
            ce_type: "user.registered.v1"
        }
    );
    assert_eq!(
        fold.problems[&dan].kind,
        ProblemKind::UnknownType("UserRenamed".into())
    );
    drop(conn);

    // Leftovers of failed runs are replaced.
    // Leftovers of a failed run are the projector role's own tables.
    let projector_role = sqlx::PgPool::connect(&env.url_as(userstream_tests::Role::Projector))
        .await
        .unwrap();
    sqlx::query("CREATE TABLE user_views_g2 (junk int)")
        .execute(&projector_role)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE user_views_g0_retired (junk int)")
        .execute(&projector_role)
        .await
        .unwrap();
    let rebuilt = env
        .run(Service::Projector, &["rebuild"], &[], COMMAND_DEADLINE)
        .await;
    rebuilt.assert_success();
    assert!(
        rebuilt.stdout.contains("4 users, 2 with problems"),
        "{rebuilt}"
    );
    let stored: Vec<(Uuid, i32, String)> =
        sqlx::query_as("SELECT id, version, status FROM user_views")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let stored: HashMap<Uuid, (i32, String)> =
        stored.into_iter().map(|(id, v, s)| (id, (v, s))).collect();
    assert_eq!(stored[&ann], (2, "deactivated".into()));
    assert_eq!(stored[&ben], (1, "active".into()));
    assert_eq!(stored[&cem], (3, "active".into()));
    assert_eq!(stored[&dan], (1, "active".into()));
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE tablename = 'user_views' ORDER BY 1",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        indexes,
        [
            "user_views_g2_email_idx",
            "user_views_g2_pkey",
            "user_views_g2_status_id_idx",
            "user_views_g2_username_idx"
        ]
    );
    let constraints: Vec<String> = sqlx::query_scalar(
        "SELECT contype::text FROM pg_constraint WHERE conrelid = 'user_views'::regclass ORDER BY 1",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        constraints,
        ["c", "c", "c", "p"],
        "three CHECKs (status, version, preferences an object) and the primary key"
    );
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE tablename LIKE 'user\\_views\\_%'",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert!(tables.is_empty(), "left behind: {tables:?}");

    // The two users the log cannot fold are differences; the others are not.
    let verified = verify(&env).await;
    assert!(!verified.status.success(), "{verified}");
    for id in [ben, dan] {
        assert!(
            verified
                .stdout
                .lines()
                .any(|l| l.contains(&id.to_string()) && l.contains("cannot be folded")),
            "{id} is not reported:\n{verified}"
        );
    }
    for id in [ann, cem] {
        assert!(!verified.stdout.contains(&id.to_string()), "{verified}");
    }
    assert!(verified.stdout.contains("2 difference(s)"), "{verified}");
}

#[tokio::test]
async fn status_reports_the_projection_and_still_answers_without_kafka() {
    let env = TestEnv::new().await;
    let command = env.spawn(Service::CommandApi, &[]).await;
    let _projector = env.spawn(Service::Projector, &[]).await;
    let http = reqwest::Client::new();
    let fay = register(&http, &command, "fay").await;
    await_caught_up(&env).await;

    let status = eventually("status to show no lag", DEADLINE, || async {
        let out = env
            .run(
                Service::Projector,
                &["status", "--json"],
                &[],
                COMMAND_DEADLINE,
            )
            .await;
        out.assert_success();
        let status: Value = serde_json::from_str(&out.stdout).expect("stdout is JSON only");
        let partitions = status["partitions"].as_array()?;
        let settled = !partitions.is_empty()
            && partitions.iter().all(|p| p["lag"] == 0)
            && status["last_applied_position"].as_i64() >= Some(fay.position);
        settled.then_some(status)
    })
    .await;
    assert_eq!(status["projection_version"], 1);
    assert_eq!(status["kafka"]["reachable"], true);
    assert_eq!(status["kafka"]["topic"], env.topic.as_str());
    assert_eq!(status["parked_total"], 0);
    assert_eq!(status["log_position"], fay.position);

    let human = env
        .run(Service::Projector, &["status"], &[], COMMAND_DEADLINE)
        .await;
    human.assert_success();
    assert!(human.stdout.contains("projection version     1"), "{human}");

    let offline = env
        .run(
            Service::Projector,
            &["status", "--json"],
            &[("KAFKA_BROKERS", "127.0.0.1:1")],
            COMMAND_DEADLINE,
        )
        .await;
    offline.assert_success();
    let status: Value = serde_json::from_str(&offline.stdout).expect("stdout is JSON only");
    assert_eq!(status["kafka"]["reachable"], false);
    assert!(status["kafka"]["error"].is_string());
    assert_eq!(status["projection_version"], 1);
    assert!(
        !status["partitions"].as_array().unwrap().is_empty(),
        "PostgreSQL's progress is still shown"
    );
}
