//! Where the user read model lives: the `user_views` table in PostgreSQL (the
//! durable copy) and one Redis hash per user (the cached copy).
//!
//! Both writers (the projector, and the query API filling the cache on a miss)
//! go through the same guarded writes, so neither store ever moves backwards.

pub mod cache;
pub mod rows;
pub mod state;

pub use cache::{CacheError, CacheSettings, Lookup, Namespace, ViewCache};
pub use rows::ViewRows;
pub use state::ProjectionState;
