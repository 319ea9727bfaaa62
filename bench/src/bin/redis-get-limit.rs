//! The limit of the cached-read benchmark: the least an HTTP service can do
//! to answer from Redis. One axum route that does one `GET` of a fixed key on
//! a multiplexed connection and returns the bytes as JSON; no middleware.
//!
//! `redis-get-limit <listen address> <redis url> <key>`

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use redis::aio::MultiplexedConnection;

#[derive(Clone)]
struct Limit {
    redis: MultiplexedConnection,
    key: String,
}

async fn read(State(limit): State<Limit>) -> impl IntoResponse {
    let mut redis = limit.redis.clone();
    let body: Vec<u8> = redis::cmd("GET")
        .arg(&limit.key)
        .query_async(&mut redis)
        .await
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "application/json")], body)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(url), Some(key)) = (args.next(), args.next(), args.next()) else {
        anyhow::bail!("usage: redis-get-limit <listen address> <redis url> <key>");
    };
    let redis = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    let app = Router::new()
        .route("/", get(read))
        .with_state(Limit { redis, key });
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
