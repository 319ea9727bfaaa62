//! Applying a batch of messages to the read model in one transaction.
//!
//! The log is the truth, Kafka only says what to look at: each message is
//! checked against the log (its event id must be there, at its user and
//! version) and the views are folded from the log's own rows, so a forged or
//! damaged message cannot change a view. A user whose view is behind the
//! message (a gap) is healed by folding the missing versions from the log.
//! What still cannot be applied is parked, one user at a time, and the batch
//! goes on for everyone else.
//!
//! Order inside the transaction: take the state lock (serialises batches,
//! rebuild switches and namespace changes) with `BEGIN`; read the state and
//! the users' views in one statement, while a second connection reads the
//! messages' events from the log; fold; mark the changed users pending in
//! Redis; write parked messages, then the views, the partition progress and
//! the batch record in one statement; commit; then put the new views in
//! Redis. Every round trip here delays each event queued behind the batch.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sqlx::{Postgres, QueryBuilder};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use events::{project, IntegrationEvent, Projection, UserView};
use platform::telemetry::error_chain;
use read_model::cache::MARK_COMMIT_WITHIN;
use read_model::{rows, state, Namespace, ViewCache, ViewRows};
use uuid::Uuid;

use crate::log;
use crate::message::{decode, Message, Unreadable};
use crate::parked::{self, Park, Reason};

/// The read model the projector writes.
#[derive(Clone)]
pub struct ReadModel {
    pub rows: ViewRows,
    pub cache: ViewCache,
    /// The Redis put of the last batch, which runs on while the next batch
    /// is applied (see [`Self::flush_cache`]).
    last_put: Arc<Mutex<Option<JoinHandle<()>>>>,
    /// Counts committed batches, for the frontier task ([`Self::commits`]).
    committed: Arc<watch::Sender<u64>>,
}

/// What one batch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Events applied to views, including healed ones.
    pub applied: usize,
    /// Of those, events taken from the log that no message of the batch carried.
    pub healed: usize,
    /// Messages whose event the view already had (redeliveries).
    pub duplicates: usize,
    /// Indexes (into the batch) of the messages parked, with why.
    pub parked: Vec<(usize, Reason)>,
    /// Whether Redis was told of the batch before it committed.
    pub cache_marked: bool,
}

/// How the batch is being run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Live consumption: partition progress is recorded.
    Consume,
    /// `projector retry`: parked messages again; progress is left alone.
    Retry,
}

impl ReadModel {
    pub fn new(rows: ViewRows, cache: ViewCache) -> Self {
        Self {
            rows,
            cache,
            last_put: Arc::default(),
            committed: Arc::new(watch::channel(0).0),
        }
    }

    /// Changes after every committed batch.
    pub fn commits(&self) -> watch::Receiver<u64> {
        self.committed.subscribe()
    }

    /// Waits for the last batch's Redis put (at shutdown, and for tests).
    pub async fn flush_cache(&self) {
        let put = match self.last_put.lock() {
            Ok(mut last) => last.take(),
            Err(_) => None,
        };
        if let Some(put) = put {
            let _ = put.await;
        }
    }

    /// Applies `messages` (in consumption order) in one transaction.
    #[tracing::instrument(name = "apply_batch", skip_all, fields(messages = messages.len()))]
    pub async fn apply_batch(
        &self,
        messages: &[Message],
        mode: Mode,
    ) -> Result<Outcome, sqlx::Error> {
        fail::fail_point!("projector::apply_batch", |_| Err(sqlx::Error::PoolTimedOut));
        let mut outcome = Outcome::default();
        let mut parks: Vec<Park> = Vec::new();
        let mut events: Vec<(usize, IntegrationEvent)> = Vec::new();
        for (index, message) in messages.iter().enumerate() {
            match decode(message) {
                Ok(event) => events.push((index, event)),
                Err(Unreadable::UnknownType(t)) => parks.push(Park::new(
                    index,
                    None,
                    Reason::UnknownType,
                    format!("unknown ce_type {t:?}"),
                )),
                Err(Unreadable::Undecodable(why)) => {
                    parks.push(Park::new(index, None, Reason::Undecodable, why))
                }
            }
        }

        // The log's rows of the messages' events are read on a second
        // connection while the transaction starts, takes the state lock and
        // reads the views of the users the messages name (a superset of those
        // that check out). The log is append-only: what `locate` finds has
        // committed and cannot change, so the transaction may fold it.
        let ids: Vec<Uuid> = events.iter().map(|(_, e)| e.event_id).collect();
        let named: Vec<Uuid> = events
            .iter()
            .map(|(_, e)| e.user_id)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let pool = self.rows.pool();
        let (in_log, (mut tx, projection, next_seq, mut views)) = tokio::try_join!(
            async {
                let mut conn = pool.acquire().await?;
                log::locate(&mut conn, &ids).await
            },
            async {
                let mut tx = pool.begin_with(state::BEGIN_LOCKED).await?;
                let start = state::load_for_batch(&mut tx, &named).await?;
                let views: HashMap<Uuid, UserView> =
                    start.views.into_iter().map(|v| (v.id, v)).collect();
                Ok::<_, sqlx::Error>((tx, start.state, start.next_seq, views))
            },
        )?;

        // Only events that are in the log, where the message says, count.
        events.retain(|(index, event)| {
            let found = in_log
                .get(&event.event_id)
                .map(|row| (row.stream_id, row.stream_version));
            if found == Some((event.user_id, event.stream_version)) {
                return true;
            }
            let detail = match found {
                None => format!("event {} is not in the log", event.event_id),
                Some((user, version)) => format!(
                    "event {} is in the log as version {version} of user {user}, not as version {} of user {}",
                    event.event_id, event.stream_version, event.user_id
                ),
            };
            parks.push(Park::new(*index, Some(event), Reason::NotInLog, detail));
            false
        });

        // Per user: the highest version the batch asks for.
        let mut wanted: BTreeMap<Uuid, i32> = BTreeMap::new();
        for (_, event) in &events {
            let v = wanted.entry(event.user_id).or_default();
            *v = (*v).max(event.stream_version);
        }
        let ranges: Vec<(Uuid, i32, i32)> = wanted
            .iter()
            .map(|(user, upto)| (*user, views.get(user).map_or(0, |v| v.version), *upto))
            .filter(|(_, after, upto)| upto > after)
            .collect();
        let carried: HashMap<(Uuid, i32), usize> = events
            .iter()
            .map(|(index, e)| ((e.user_id, e.stream_version), *index))
            .collect();

        // Fold each user's missing versions from the log.
        let mut blocked: HashMap<Uuid, (i32, Reason, String)> = HashMap::new();
        let mut changed: BTreeMap<Uuid, ()> = BTreeMap::new();
        // Usually the batch's own events are all a user misses, and `locate`
        // has read them already; only gaps are read from the log here.
        let (mut rows, gaps) = log::covered(&ranges, in_log);
        rows.extend(log::read_ranges(&mut tx, &gaps).await?);
        rows.sort_by_key(|row| (row.stream_id, row.stream_version));
        for row in rows {
            let user = row.stream_id;
            if blocked.contains_key(&user) {
                continue;
            }
            let version = row.stream_version;
            let step = match IntegrationEvent::from_public_row(row.into_public()) {
                Err(error) => Err((Reason::UnknownType, error_chain(&error))),
                Ok(event) => match project(views.get(&user), &event) {
                    Projection::Apply(view) => Ok(view),
                    Projection::AlreadyApplied => continue,
                    Projection::Gap { current, event } => Err((
                        Reason::Gap,
                        format!("the log misses versions between {current} and {event}"),
                    )),
                    Projection::Invalid { current, event } => Err((
                        Reason::InvalidTransition,
                        format!("version {event} cannot follow version {current}"),
                    )),
                },
            };
            match step {
                Ok(view) => {
                    views.insert(user, view);
                    changed.insert(user, ());
                    outcome.applied += 1;
                    if !carried.contains_key(&(user, version)) {
                        outcome.healed += 1;
                    }
                }
                Err((reason, detail)) => {
                    blocked.insert(user, (version, reason, detail));
                }
            }
        }

        // Classify the messages against the views before and after the fold.
        let before: HashMap<Uuid, i32> = ranges.iter().map(|(u, after, _)| (*u, *after)).collect();
        for (index, event) in &events {
            let reached = views.get(&event.user_id).map_or(0, |v| v.version);
            let had = before.get(&event.user_id).copied().unwrap_or(reached);
            if event.stream_version <= had {
                outcome.duplicates += 1;
                continue;
            }
            if event.stream_version <= reached {
                continue; // applied above
            }
            let (reason, detail) = match blocked.get(&event.user_id) {
                Some((at, reason, detail)) => {
                    (*reason, format!("user stuck before version {at}: {detail}"))
                }
                None => (
                    Reason::Gap,
                    format!(
                        "the log has no version {} of this user yet",
                        event.stream_version
                    ),
                ),
            };
            parks.push(Park::new(*index, Some(event), reason, detail));
        }

        let changed: Vec<&UserView> = changed.keys().filter_map(|id| views.get(id)).collect();

        // Redis is told of the batch before it commits (see `read_model::cache`).
        // Done before the writes: the transaction takes its xid with its first
        // write, and an open xid holds the relay back, so the writes and the
        // commit follow each other directly.
        let mut marked_ns = None;
        let mut hot = Vec::new();
        let marked_at = Instant::now();
        let mut epoch = projection.cache_epoch;
        if !changed.is_empty() {
            if let Some(ns) = projection.namespace() {
                let pending: Vec<(Uuid, i32)> = changed.iter().map(|v| (v.id, v.version)).collect();
                match self
                    .cache
                    .mark(ns, projection.batch_seq, next_seq, &pending)
                    .await
                {
                    Ok(Some(cached)) => {
                        marked_ns = Some(ns);
                        hot = changed
                            .iter()
                            .zip(cached)
                            .filter(|(_, cached)| *cached)
                            .map(|(view, _)| (*view).clone())
                            .collect();
                    }
                    Ok(None) => {
                        metrics::counter!("projector_cache_dropped_total", "why" => "behind")
                            .increment(1);
                        tracing::warn!(epoch = ns.epoch, "the Redis namespace lost writes; readers stop trusting it until a fresh one is opened");
                        epoch = None;
                    }
                    Err(error) => {
                        metrics::counter!("projector_cache_dropped_total", "why" => "unreachable")
                            .increment(1);
                        tracing::warn!(error = %error_chain(&error), "Redis could not be told of the batch; readers stop trusting it until a fresh namespace is opened");
                        epoch = None;
                    }
                }
            }
        }
        parked::insert(&mut tx, messages, &parks).await?;
        let progress = (mode == Mode::Consume).then_some(Progress {
            messages,
            events: &events,
        });
        write(&mut tx, &changed, (next_seq, epoch), progress).await?;
        if marked_ns.is_some() && marked_at.elapsed() > MARK_COMMIT_WITHIN {
            // The marks may expire before a reader's late fill would meet them.
            metrics::counter!("projector_cache_dropped_total", "why" => "slow").increment(1);
            tracing::warn!(elapsed = ?marked_at.elapsed(), "the batch took too long after marking Redis; readers stop trusting it until a fresh namespace is opened");
            marked_ns = None;
            state::set_cache_epoch(&mut tx, None).await?;
        }
        tx.commit().await?;
        self.committed.send_modify(|n| *n += 1);

        if !changed.is_empty() {
            // Between the commit of views and their Redis write.
            fail::fail_point!("projector::after_commit");
        }
        if let Some(ns) = marked_ns {
            outcome.cache_marked = true;
            // Only views a reader cached are rewritten; the others stay
            // pending until the next reader fills them (or the mark expires).
            let put = refresh_views(self.cache.clone(), ns, hot);
            match mode {
                // Readers see the batch from the commit on (pending entries
                // send them to PostgreSQL), so the next batch need not wait for
                // the put. Redis runs one connection's commands in order, and
                // the scripts compare versions, so a later batch's mark is
                // never undone by this put.
                Mode::Consume => {
                    let put = tokio::spawn(put);
                    if let Ok(mut last) = self.last_put.lock() {
                        *last = Some(put);
                    }
                }
                Mode::Retry => put.await,
            }
        }
        outcome.parked = parks.iter().map(|p| (p.index, p.reason)).collect();
        for park in &parks {
            metrics::counter!("projector_parked_total", "reason" => park.reason.as_str())
                .increment(1);
            tracing::error!(
                reason = park.reason.as_str(),
                detail = %park.detail,
                partition = messages[park.index].partition,
                offset = messages[park.index].offset,
                "parked a message that cannot be applied; other users go on"
            );
        }
        Ok(outcome)
    }
}

/// A consumed batch's messages and the events of theirs that are in the log,
/// for recording the partitions' progress.
struct Progress<'a> {
    messages: &'a [Message],
    events: &'a [(usize, IntegrationEvent)],
}

/// The batch's writes in one statement (one round trip, while the
/// transaction holds an xid, which holds the relay back). Changed `views`
/// come with the batch record (its number and trusted namespace, `batch`);
/// the partitions' `progress` is recorded when consuming. The upsert and the
/// progress run as data-modifying `WITH` parts of the batch record's
/// UPDATE; they touch different tables.
#[tracing::instrument(name = "sql_write_batch", skip_all, fields(views = views.len()))]
async fn write(
    tx: &mut sqlx::PgConnection,
    views: &[&UserView],
    (seq, epoch): (i64, Option<i64>),
    progress: Option<Progress<'_>>,
) -> Result<(), sqlx::Error> {
    let mut query = QueryBuilder::<Postgres>::new("");
    match (views.is_empty(), progress) {
        (true, None) => return Ok(()),
        (true, Some(Progress { messages, events })) => {
            log::push_progress(&mut query, messages, events);
        }
        (false, progress) => {
            query.push("WITH views AS (");
            rows::push_upsert(&mut query, "user_views", views);
            query.push(")");
            if let Some(Progress { messages, events }) = progress {
                query.push(", progress AS (");
                log::push_progress(&mut query, messages, events);
                query.push(")");
            }
            state::push_record_batch(&mut query, seq, epoch);
        }
    }
    query.build().execute(tx).await?;
    Ok(())
}

/// Rewrites a committed batch's cached views in Redis. On failure the
/// entries stay pending: readers miss and read PostgreSQL.
async fn refresh_views(cache: ViewCache, ns: Namespace, views: Vec<UserView>) {
    if views.is_empty() {
        return;
    }
    let views: Vec<&UserView> = views.iter().collect();
    if let Err(error) = cache.refresh_many(ns, &views).await {
        metrics::counter!("projector_cache_errors_total").increment(1);
        tracing::warn!(error = %error_chain(&error), "could not put views in Redis; they stay pending and readers use PostgreSQL");
    }
}
