//! Per-client quotas on the anonymous endpoints that cost an argon2 hash:
//! 429 with `Retry-After` once a client has made more such requests than its
//! quota.
//!
//! Each hash costs ~15 ms of a core and 19 MiB, so one client must not be able
//! to take the hashing threads from everyone else, nor guess passwords of many
//! accounts at the rate of the machine (the lockout counts per account). Two
//! quotas, each a GCRA token bucket per client from the `governor` crate:
//!
//! * registration (`POST /users`): `REGISTRATION_BURST` at once, then
//!   `REGISTRATION_RATE_PER_MINUTE`;
//! * sign-in (`grant_type=password` on `POST /oauth/token`, and both
//!   `/password-resets` endpoints): `SIGN_IN_BURST`, then
//!   `SIGN_IN_RATE_PER_MINUTE`. Refresh grants are not counted: they hash
//!   nothing, and one server-side client may refresh for many users.
//!
//! The client is the TCP peer address (an IPv6 peer by its /64, which one
//! host usually holds whole). Behind a reverse proxy every request comes from
//! the proxy, so the limit would be shared by all clients; such a deployment
//! should key on the client address the proxy sets in a header it overwrites
//! (not yet a setting), and never on a header clients can set themselves.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::error::ApiError;
use super::AppState;
use crate::config::ClientQuota;

/// One quota of every client; disabled when the rate is 0. Cheap to clone.
#[derive(Clone)]
pub struct ClientLimiter {
    /// What is limited, as the `limit` label of `rate_limited_total`.
    name: &'static str,
    limiter: Option<Arc<DefaultKeyedRateLimiter<IpAddr>>>,
}

impl ClientLimiter {
    pub fn new(name: &'static str, quota: ClientQuota) -> Self {
        let limiter = NonZeroU32::new(quota.per_minute).map(|per_minute| {
            let burst = NonZeroU32::new(quota.burst).unwrap_or(NonZeroU32::MIN);
            Arc::new(RateLimiter::keyed(
                Quota::per_minute(per_minute).allow_burst(burst),
            ))
        });
        Self { name, limiter }
    }

    /// Takes one request from `client`'s quota, or says in how many whole
    /// seconds (at least 1) the next one will be allowed.
    pub fn check(&self, client: IpAddr) -> Result<(), u64> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter.check_key(&client).map_err(|not_until| {
            let wait = not_until.wait_time_from(limiter.clock().now());
            (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
        })
    }

    /// [`Self::check`], answering 429 `rate_limited` (counted and logged) when
    /// the quota is used up.
    pub fn admit(&self, Client(client): Client) -> Result<(), ApiError> {
        self.check(client).map_err(|retry_after_secs| {
            metrics::counter!("rate_limited_total", "limit" => self.name).increment(1);
            tracing::info!(%client, limit = self.name, retry_after_secs, "rate limited");
            ApiError::RateLimited { retry_after_secs }
        })
    }

    /// Forgets clients whose quota is full again, so memory follows the
    /// clients active in the last minutes, not every address ever seen.
    pub fn forget_idle(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// The key a peer is counted under: its IPv4 address, or its IPv6 /64.
fn client_key(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        },
        v4 => v4,
    }
}

/// The client a request is counted under (see [`client_key`]).
#[derive(Debug, Clone, Copy)]
pub struct Client(IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for Client {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        // Served without connect info (only in-process tests), every request
        // shares one quota: stricter, never unlimited.
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::from([0, 0, 0, 0]), |info| info.0.ip());
        Ok(Self(client_key(peer)))
    }
}

/// Proof that the request was within its client's registration quota. An
/// extractor, so the check runs before the body is read.
pub struct WithinRegistrationQuota;

impl FromRequestParts<AppState> for WithinRegistrationQuota {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Ok(client) = Client::from_request_parts(parts, state).await;
        state.limits.registration.admit(client)?;
        Ok(Self)
    }
}

/// Proof that the request was within its client's sign-in quota (checked
/// before the body is read).
pub struct WithinSignInQuota;

impl FromRequestParts<AppState> for WithinSignInQuota {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Ok(client) = Client::from_request_parts(parts, state).await;
        state.limits.sign_in.admit(client)?;
        Ok(Self)
    }
}

/// The quotas the API enforces.
#[derive(Clone)]
pub struct Limits {
    pub registration: ClientLimiter,
    pub sign_in: ClientLimiter,
}

impl Limits {
    pub fn forget_idle(&self) {
        self.registration.forget_idle();
        self.sign_in.forget_idle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_over_its_burst_waits_and_others_do_not() {
        let limiter = ClientLimiter::new(
            "test",
            ClientQuota {
                per_minute: 6,
                burst: 2,
            },
        );
        let one = IpAddr::from([127, 0, 0, 1]);
        let two = IpAddr::from([127, 0, 0, 2]);
        assert!(limiter.check(one).is_ok());
        assert!(limiter.check(one).is_ok());
        let wait = limiter.check(one).unwrap_err();
        assert!((1..=10).contains(&wait), "one every 10 s: {wait}");
        assert!(limiter.check(two).is_ok());
    }

    #[test]
    fn a_rate_of_zero_disables_the_limit() {
        let limiter = ClientLimiter::new(
            "test",
            ClientQuota {
                per_minute: 0,
                burst: 1,
            },
        );
        assert!((0..100).all(|_| limiter.check(IpAddr::from([127, 0, 0, 1])).is_ok()));
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64_prefix() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(other));
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(client_key(mapped), IpAddr::from([10, 1, 2, 3]));
    }
}
