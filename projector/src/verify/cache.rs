//! The Redis half of `projector verify`: reading every entry of a namespace
//! and telling whether a settled one departs from the view it should hold.
//!
//! Pending entries (a version being committed) and missing ones (expired,
//! never filled) are fine: readers miss on them and read PostgreSQL. A
//! namespace whose `through` is behind the last committed batch is not
//! trusted by readers either, so its entries are not compared.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use events::UserView;
use read_model::{CacheSettings, Namespace, ViewCache};
use secrecy::ExposeSecret;
use uuid::Uuid;

use super::{describe, field_differences};

/// Deadline of one Redis call while scanning (a scan is a batch job, not a
/// request: it can afford more than the projector's per-write deadline).
const CALL_DEADLINE: Duration = Duration::from_secs(10);

/// Keys per SCAN step and per GET pipeline.
const SCAN_COUNT: usize = 1_000;

/// What was found in Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheCheck {
    /// `projection_state` names no namespace: readers skip Redis.
    Untrusted,
    /// The namespace misses committed batches: readers ignore it.
    Behind {
        ns: Namespace,
        through: Option<i64>,
        batch_seq: i64,
    },
    /// The namespace was compared.
    Compared {
        ns: Namespace,
        entries: usize,
        pending: usize,
    },
}

impl fmt::Display for CacheCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Untrusted => write!(f, "redis: no trusted namespace, not compared"),
            Self::Behind { ns, through, batch_seq } => write!(
                f,
                "redis p{}:e{}: behind (through {through:?} < batch {batch_seq}), readers ignore it, not compared",
                ns.projection_version, ns.epoch
            ),
            Self::Compared { ns, entries, pending } => write!(
                f,
                "redis p{}:e{}: {entries} entries ({pending} pending)",
                ns.projection_version, ns.epoch
            ),
        }
    }
}

/// A settled entry: the version and the body readers are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub version: i32,
    pub body: String,
}

/// A namespace read: the check, and its settled entries when it is trusted.
#[derive(Debug)]
pub struct Scan {
    pub check: CacheCheck,
    pub entries: Option<HashMap<Uuid, Entry>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("redis error")]
    Redis(#[from] redis::RedisError),
    #[error("invalid cache settings")]
    Settings(#[from] read_model::CacheError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
}

async fn deadline<T>(
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, ScanError> {
    Ok(tokio::time::timeout(CALL_DEADLINE, call)
        .await
        .map_err(|_| ScanError::Timeout(CALL_DEADLINE))??)
}

/// Reads every user entry of `ns`, unless the namespace is behind `batch_seq`.
#[tracing::instrument(name = "redis_scan_views", skip(settings))]
pub async fn scan(
    settings: &CacheSettings,
    ns: Namespace,
    batch_seq: i64,
) -> Result<Scan, ScanError> {
    // Only for the key names, so they are spelled in one place.
    let names = ViewCache::from_settings(settings)?;
    let client = redis::Client::open(settings.url.expose_secret())?;
    let mut conn = deadline(client.get_multiplexed_async_connection()).await?;
    let through: Option<i64> = deadline(
        redis::cmd("GET")
            .arg(names.through_key(ns))
            .query_async(&mut conn),
    )
    .await?;
    if through.is_none_or(|through| through < batch_seq) {
        return Ok(Scan {
            check: CacheCheck::Behind {
                ns,
                through,
                batch_seq,
            },
            entries: None,
        });
    }
    let prefix = format!("{}user:", names.namespace_prefix(ns));
    let pattern = format!("{}*", escape_glob(&prefix));
    let mut entries = HashMap::new();
    let mut pending = HashMap::new();
    let mut cursor = 0_u64;
    loop {
        let (next, keys): (u64, Vec<String>) = deadline(
            redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(&mut conn),
        )
        .await?;
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.cmd("GET").arg(key);
        }
        let values: Vec<Option<Vec<u8>>> = deadline(pipe.query_async(&mut conn)).await?;
        for (key, stored) in keys.iter().zip(values) {
            let Some(user_id) = key
                .strip_prefix(&prefix)
                .and_then(|id| Uuid::parse_str(id).ok())
            else {
                continue; // Not a user key of this namespace.
            };
            match stored.as_deref().map(read_model::cache::Entry::decode) {
                Some(Some(entry)) if entry.pending => {
                    pending.insert(user_id, ());
                }
                Some(Some(entry)) => {
                    entries.insert(
                        user_id,
                        Entry {
                            version: entry.version,
                            body: entry.body,
                        },
                    );
                }
                // Undecodable: readers treat it as a Redis error and never
                // serve it; shown as what it claims to be, nothing.
                Some(None) => {
                    entries.insert(
                        user_id,
                        Entry {
                            version: -1,
                            body: String::from_utf8_lossy(stored.as_deref().unwrap_or_default())
                                .into_owned(),
                        },
                    );
                }
                // Expired between SCAN and GET.
                None => {}
            }
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    Ok(Scan {
        check: CacheCheck::Compared {
            ns,
            entries: entries.len() + pending.len(),
            pending: pending.len(),
        },
        entries: Some(entries),
    })
}

/// Escapes Redis glob characters, so the key prefix matches literally.
fn escape_glob(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// How a settled entry departs from `expected`, if it does.
pub fn entry_difference(expected: &UserView, entry: &Entry) -> Option<String> {
    if entry.version != expected.version {
        return Some(format!(
            "Redis serves version {}, expected version {}",
            entry.version, expected.version
        ));
    }
    let Ok(served) = serde_json::from_str::<serde_json::Value>(&entry.body) else {
        return Some(format!("Redis body is not JSON: {:?}", entry.body));
    };
    let Ok(wanted) = serde_json::to_value(expected) else {
        return None; // A view always serialises; nothing to compare otherwise.
    };
    if served == wanted {
        return None;
    }
    let mut fields = match serde_json::from_value::<UserView>(served.clone()) {
        Ok(view) => field_differences(expected, &view),
        Err(error) => vec![format!("not a view ({error})")],
    };
    if let (Some(served), Some(wanted)) = (served.as_object(), wanted.as_object()) {
        fields.extend(
            served
                .keys()
                .filter(|key| !wanted.contains_key(*key))
                .map(|key| format!("unexpected field {key:?}")),
        );
        // A body cached before a field existed reads as a view with the
        // field's default, which may even be right: it is still not what
        // readers must be served.
        fields.extend(
            wanted
                .keys()
                .filter(|key| !served.contains_key(*key))
                .map(|key| format!("missing field {key:?}")),
        );
    }
    if fields.is_empty() {
        fields.push(format!("body {}", entry.body));
    }
    Some(format!(
        "Redis (version {}) differs from the log: {}",
        entry.version,
        describe(&fields)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> UserView {
        let at = "2026-11-21T10:00:00Z".parse().unwrap();
        UserView {
            id: Uuid::nil(),
            username: "ada".into(),
            email: "ada@example.com".into(),
            status: events::UserStatus::Active,
            version: 5,
            registered_at: at,
            updated_at: at,
            roles: vec!["admin".into()],
            locked_until: Some("2031-02-03T04:05:06Z".parse().unwrap()),
            email_verified: false,
            profile: Default::default(),
        }
    }

    fn entry(body: serde_json::Value) -> Entry {
        Entry {
            version: 5,
            body: body.to_string(),
        }
    }

    #[test]
    fn roles_and_locks_are_compared() {
        let expected = view();
        let same = serde_json::to_value(&expected).unwrap();
        assert_eq!(entry_difference(&expected, &entry(same.clone())), None);
        let mut other = same.clone();
        other["roles"] = serde_json::json!([]);
        other["locked_until"] = serde_json::Value::Null;
        let found = entry_difference(&expected, &entry(other)).unwrap();
        assert!(found.contains(r#"roles [] (log: ["admin"])"#), "{found}");
        assert!(
            found.contains("locked_until null (log: 2031-02-03T04:05:06+00:00)"),
            "{found}"
        );
    }

    #[test]
    fn a_body_cached_before_a_field_existed_is_a_difference() {
        let mut expected = view();
        expected.roles.clear();
        expected.locked_until = None;
        let mut old = serde_json::to_value(&expected).unwrap();
        let fields = old.as_object_mut().unwrap();
        fields.remove("roles");
        fields.remove("locked_until");
        // It reads as the same view (the fields default), yet is not what
        // readers must be served.
        let found = entry_difference(&expected, &entry(old)).unwrap();
        assert!(found.contains(r#"missing field "roles""#), "{found}");
        assert!(found.contains(r#"missing field "locked_until""#), "{found}");
    }

    #[test]
    fn glob_characters_match_literally() {
        assert_eq!(escape_glob("a*b?[c]:"), "a\\*b\\?\\[c\\]:");
    }
}
