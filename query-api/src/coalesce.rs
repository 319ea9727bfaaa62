//! Misses become PostgreSQL reads in batches. Concurrent misses of one user
//! share one read; and while `max_reads` reads are in flight, the misses that
//! arrive meanwhile wait and then go together, as one
//! `SELECT … WHERE id = ANY($1)`. At low load every miss is read at once (no
//! window, no timer); under load the batches grow, which saves PostgreSQL a
//! statement, and both sides a round trip and a wake-up, per user.
//!
//! A load leaves the table when its read finishes, so a request that
//! arrives later reads afresh, and a waiting miss is read by a statement that
//! starts after it arrived. Reads run as tasks of their own, so they finish
//! even if the requests that asked for them go away.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use events::UserView;
use futures::future::{BoxFuture, FutureExt, Shared};
use read_model::ViewRows;
use tokio::sync::oneshot;
use uuid::Uuid;

type Loaded = Result<Option<UserView>, Arc<sqlx::Error>>;
type Load = Shared<BoxFuture<'static, Loaded>>;

/// Most users read by one statement.
const MAX_BATCH: usize = 128;

#[derive(Clone)]
pub struct Loads {
    table: Arc<Mutex<Table>>,
    /// Reads in flight at most (the pool's size: more would only queue there).
    max_reads: usize,
}

#[derive(Default)]
struct Table {
    /// The load of each user being read or waiting to be.
    in_flight: HashMap<Uuid, Load>,
    /// Users waiting for a read, with where their view goes.
    waiting: Vec<(Uuid, oneshot::Sender<Loaded>)>,
    /// Reader tasks running.
    readers: usize,
}

impl Loads {
    pub fn new(max_reads: usize) -> Self {
        Self {
            table: Arc::default(),
            max_reads: max_reads.max(1),
        }
    }

    /// The view of `id` from PostgreSQL, shared with every concurrent caller.
    pub async fn load(&self, rows: &ViewRows, id: Uuid) -> Loaded {
        let (load, start_reader) = {
            let mut table = self.table.lock().expect("loads lock");
            match table.in_flight.get(&id) {
                Some(load) => (load.clone(), false),
                None => {
                    let (sender, receiver) = oneshot::channel();
                    let load = async move {
                        receiver.await.unwrap_or_else(|_| {
                            Err(Arc::new(sqlx::Error::Protocol(
                                "the view read ended".into(),
                            )))
                        })
                    }
                    .boxed()
                    .shared();
                    table.in_flight.insert(id, load.clone());
                    table.waiting.push((id, sender));
                    let start = table.readers < self.max_reads;
                    table.readers += usize::from(start);
                    (load, start)
                }
            }
        };
        if start_reader {
            tokio::spawn(self.clone().read_while_waiting(rows.clone()));
        }
        load.await
    }

    /// Reads what waits, batch after batch, until nothing does.
    async fn read_while_waiting(self, rows: ViewRows) {
        loop {
            let batch: Vec<(Uuid, oneshot::Sender<Loaded>)> = {
                let mut table = self.table.lock().expect("loads lock");
                if table.waiting.is_empty() {
                    table.readers -= 1;
                    return;
                }
                let take = table.waiting.len().min(MAX_BATCH);
                table.waiting.drain(..take).collect()
            };
            let ids: Vec<Uuid> = batch.iter().map(|(id, _)| *id).collect();
            metrics::counter!("query_view_loads_total").increment(1);
            metrics::histogram!("query_view_load_users").record(ids.len() as f64);
            let loaded = AssertUnwindSafe(rows.load_each(&ids))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| Err(sqlx::Error::Protocol("the view read panicked".into())));
            {
                let mut table = self.table.lock().expect("loads lock");
                for id in &ids {
                    table.in_flight.remove(id);
                }
            }
            match loaded {
                Ok(views) => {
                    let mut views: HashMap<Uuid, UserView> =
                        views.into_iter().map(|view| (view.id, view)).collect();
                    for (id, sender) in batch {
                        let _ = sender.send(Ok(views.remove(&id)));
                    }
                }
                Err(error) => {
                    let error = Arc::new(error);
                    for (_, sender) in batch {
                        let _ = sender.send(Err(Arc::clone(&error)));
                    }
                }
            }
        }
    }
}
