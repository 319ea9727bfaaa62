//! Concurrent misses for one user become one PostgreSQL read: the first
//! request starts the load, the others wait for its result. The load removes
//! itself from the table when it finishes, so a request that arrives later
//! reads afresh; any waiter can drive it, so it finishes even if the request
//! that started it goes away.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use events::UserView;
use futures::future::{BoxFuture, FutureExt, Shared};
use read_model::ViewRows;
use uuid::Uuid;

type Loaded = Result<Option<UserView>, Arc<sqlx::Error>>;
type Load = Shared<BoxFuture<'static, Loaded>>;

#[derive(Clone, Default)]
pub struct Loads {
    in_flight: Arc<Mutex<HashMap<Uuid, Load>>>,
}

impl Loads {
    /// The view of `id` from PostgreSQL, shared with every concurrent caller.
    pub async fn load(&self, rows: &ViewRows, id: Uuid) -> Loaded {
        let load = {
            let mut in_flight = self.in_flight.lock().expect("loads lock");
            in_flight
                .entry(id)
                .or_insert_with(|| {
                    let (rows, table) = (rows.clone(), Arc::clone(&self.in_flight));
                    async move {
                        metrics::counter!("query_view_loads_total").increment(1);
                        let loaded = rows.load(id).await.map_err(Arc::new);
                        table.lock().expect("loads lock").remove(&id);
                        loaded
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        load.await
    }
}
