//! Folding the log into views, straight from PostgreSQL: what `projector
//! rebuild` loads into a fresh table and what `projector verify` compares the
//! read model with.
//!
//! The log is read gap-safe ([`eventlog::read_batch`] over `events_public`,
//! below xmin, in (transaction id, position) order), which per user is version
//! order, and every event goes through the one pure projection,
//! [`events::project`], so a rebuilt view is exactly what the live projector
//! builds. An event that cannot be decoded or applied stops its user only: it
//! is recorded as a [`FoldProblem`], that user's later events are skipped (as
//! the live projector parks them), and everyone else is folded on.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

use eventlog::{Checkpoint, LogRow, Source};
use events::{project, DecodeError, IntegrationEvent, Projection, UserView};
use platform::telemetry::error_chain;
use sqlx::PgConnection;
use uuid::Uuid;

/// Events per read. Large batches keep the per-query cost (one index descent,
/// one round trip) negligible next to decoding; 20 000 rows are a few MiB.
pub const BATCH_SIZE: i64 = 20_000;

/// How often a long fold logs its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// Why one user's stream could not be folded past an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProblemKind {
    /// An event type this build does not know.
    UnknownType(String),
    /// A payload that cannot be read (malformed, or a newer schema).
    Undecodable(String),
    /// Versions are missing before the event.
    Gap { current: i32 },
    /// The event (of `ce_type`) cannot follow the view (e.g. a status change
    /// before registration, a second registration).
    Invalid { current: i32, ce_type: &'static str },
}

/// The first event of a user's stream that could not be folded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoldProblem {
    pub user_id: Uuid,
    pub stream_version: i32,
    pub global_position: i64,
    pub kind: ProblemKind,
}

impl fmt::Display for FoldProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "version {} (position {}) ",
            self.stream_version, self.global_position
        )?;
        match &self.kind {
            ProblemKind::UnknownType(t) => write!(f, "has an unknown event type {t:?}"),
            ProblemKind::Undecodable(why) => write!(f, "cannot be decoded: {why}"),
            ProblemKind::Gap { current } => write!(f, "follows a gap after version {current}"),
            ProblemKind::Invalid { current, ce_type } => write!(
                f,
                "({ce_type}) is an impossible transition from version {current}"
            ),
        }
    }
}

/// Views folded from the log so far, and where in the log the fold stands.
#[derive(Debug, Default)]
pub struct Fold {
    /// Every user's view, as of [`Self::checkpoint`].
    pub views: HashMap<Uuid, UserView>,
    /// The first problem of each user that has one; their later events are skipped.
    pub problems: HashMap<Uuid, FoldProblem>,
    /// The last event read.
    pub checkpoint: Checkpoint,
    /// Events read so far (applied, skipped or problematic).
    pub events: u64,
    /// Users whose view changed since the last [`Self::take_changed`], when tracked.
    changed: Option<HashSet<Uuid>>,
}

impl Fold {
    /// An empty fold from the start of the log.
    pub fn new() -> Self {
        Self::default()
    }

    /// From now on, remember which users' views change (rebuild's catch-up
    /// writes only those). Off for the first pass, where everyone changes.
    pub fn track_changes(&mut self) {
        self.changed.get_or_insert_with(HashSet::new);
    }

    /// The users changed since the last call; tracking goes on.
    pub fn take_changed(&mut self) -> HashSet<Uuid> {
        self.changed
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Puts users back as changed (their write was rolled back).
    pub fn restore_changed(&mut self, users: HashSet<Uuid>) {
        self.changed.get_or_insert_with(HashSet::new).extend(users);
    }

    /// Reads and folds every event after [`Self::checkpoint`] that is below
    /// xmin now, in batches of `batch_size`. Returns the number of events read.
    ///
    /// Reading and folding overlap: while one batch is folded on a blocking
    /// thread, the next is read and decoded here, and PostgreSQL produces it
    /// on its own core. If this future is dropped half-way, the fold is lost
    /// (left empty): callers run it to completion or start again.
    #[tracing::instrument(name = "fold_log", skip_all, fields(from_position = self.checkpoint.global_position))]
    pub async fn fold_log(
        &mut self,
        conn: &mut PgConnection,
        batch_size: i64,
    ) -> Result<u64, sqlx::Error> {
        let started = Instant::now();
        let mut logged = started;
        let mut read = 0_u64;
        let mut rows =
            eventlog::read_batch(conn, Source::Public, self.checkpoint, batch_size).await?;
        loop {
            let Some(last) = rows.last().map(LogRow::checkpoint) else {
                return Ok(read);
            };
            let full = rows.len() as i64 == batch_size;
            read += rows.len() as u64;
            let mut fold = std::mem::take(self);
            let folding = tokio::task::spawn_blocking(move || {
                for row in rows {
                    fold.apply_row(row);
                }
                fold
            });
            let next = if full {
                eventlog::read_batch(conn, Source::Public, last, batch_size).await
            } else {
                Ok(Vec::new())
            };
            *self = match folding.await {
                Ok(fold) => fold,
                Err(error) => std::panic::resume_unwind(error.into_panic()),
            };
            rows = next?;
            if logged.elapsed() >= PROGRESS_EVERY {
                logged = Instant::now();
                let rate = read as f64 / started.elapsed().as_secs_f64();
                tracing::info!(
                    events = read,
                    users = self.views.len(),
                    events_per_second = rate.round() as u64,
                    "folding the log"
                );
            }
        }
    }

    /// Folds one row of the log into the views.
    pub fn apply_row(&mut self, row: LogRow) {
        self.checkpoint = row.checkpoint();
        self.events += 1;
        let (user_id, stream_version, global_position) =
            (row.stream_id, row.stream_version, row.global_position);
        if !self.problems.is_empty() && self.problems.contains_key(&user_id) {
            return;
        }
        let problem = |kind| FoldProblem {
            user_id,
            stream_version,
            global_position,
            kind,
        };
        let event = match IntegrationEvent::from_public_row(row.into_public()) {
            Ok(event) => event,
            Err(DecodeError::UnknownType(t)) => {
                return self.record(problem(ProblemKind::UnknownType(t)));
            }
            Err(error) => {
                return self.record(problem(ProblemKind::Undecodable(error_chain(&error))))
            }
        };
        let outcome = match self.views.entry(user_id) {
            Entry::Occupied(mut slot) => match project(Some(slot.get()), &event) {
                Projection::Apply(view) => {
                    *slot.get_mut() = view;
                    None
                }
                other => Some(other),
            },
            Entry::Vacant(slot) => match project(None, &event) {
                Projection::Apply(view) => {
                    slot.insert(view);
                    None
                }
                other => Some(other),
            },
        };
        match outcome {
            None => {
                if let Some(changed) = &mut self.changed {
                    changed.insert(user_id);
                }
            }
            // The log holds each (user, version) once; an older version can
            // only be a repeat read, which has nothing left to do.
            Some(Projection::AlreadyApplied | Projection::Apply(_)) => {}
            Some(Projection::Gap { current, .. }) => {
                self.record(problem(ProblemKind::Gap { current }))
            }
            Some(Projection::Invalid { current, .. }) => {
                self.record(problem(ProblemKind::Invalid {
                    current,
                    ce_type: event.ce_type(),
                }))
            }
        }
    }

    fn record(&mut self, problem: FoldProblem) {
        tracing::warn!(user_id = %problem.user_id, problem = %problem, "cannot fold this user's stream any further");
        self.problems.insert(problem.user_id, problem);
    }
}
