//! argon2id hashing on a small pool of dedicated threads, never on the async
//! runtime's workers.
//!
//! A hash costs about 15 ms of one core and 19 MiB of memory. On a runtime
//! worker it would stall every other request on that worker, so requests queue
//! their passwords to one hashing thread per core (`HASH_CONCURRENCY`): a burst
//! of registrations waits in the queue instead of oversubscribing the CPU.
//! The queue is bounded (`HASH_QUEUE_CAPACITY`): when it is full a job is
//! refused at once with [`HashError::Overloaded`] (the API answers 503 with
//! `Retry-After`), so a flood neither grows memory nor makes every caller wait
//! longer than it will. Fixed threads also keep one work area each, reused hash
//! after hash (see [`WORK_AREA`]); a job whose request went away is skipped.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use argon2::password_hash::{rand_core::OsRng, Output, ParamsString, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use events::PasswordHash;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

/// OWASP's recommended argon2id parameters: m = 19 MiB, t = 2, p = 1.
pub const MEMORY_KIB: u32 = 19 * 1024;
pub const ITERATIONS: u32 = 2;
pub const PARALLELISM: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("argon2 failed")]
    Argon2(#[source] argon2::password_hash::Error),
    #[error("the hashing threads are gone")]
    Stopped,
    /// The queue is full: refuse now rather than make the caller wait in line.
    #[error("the hashing queue is full")]
    Overloaded,
}

enum Work {
    Hash(SecretString),
    Verify(SecretString, PasswordHash),
}

enum Done {
    Hashed(PasswordHash),
    Verified(bool),
}

struct Job {
    work: Work,
    reply: oneshot::Sender<Result<Done, HashError>>,
}

/// A handle on the hashing threads; cheap to clone. The threads end when the
/// last handle is dropped.
#[derive(Clone)]
pub struct Hasher {
    jobs: mpsc::Sender<Job>,
}

impl Hasher {
    /// Starts `threads` hashing threads fed by a queue of at most `capacity`
    /// waiting jobs.
    pub fn new(threads: usize, capacity: usize) -> Self {
        let (jobs, queue) = mpsc::channel::<Job>(capacity.max(1));
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..threads.max(1) {
            let queue = Arc::clone(&queue);
            let spawned = std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || work(&queue));
            if let Err(error) = spawned {
                tracing::error!(%error, "could not start a hashing thread");
            }
        }
        Self { jobs }
    }

    /// Takes a place in the queue now, or fails at once with
    /// [`HashError::Overloaded`]. A registration reserves its place before it
    /// spends anything else (a database look-up), so a full queue sheds load
    /// before it reaches PostgreSQL; dropping the slot unused frees it.
    pub fn reserve(&self) -> Result<Slot, HashError> {
        self.jobs
            .clone()
            .try_reserve_owned()
            .map(Slot)
            .map_err(|error| match error {
                TrySendError::Full(_) => {
                    metrics::counter!("argon2_jobs_refused_total").increment(1);
                    HashError::Overloaded
                }
                TrySendError::Closed(_) => HashError::Stopped,
            })
    }

    /// Hashes `password` with a fresh random salt into a PHC string.
    pub async fn hash(&self, password: SecretString) -> Result<PasswordHash, HashError> {
        self.reserve()?.hash(password).await
    }

    /// Checks `password` against a stored PHC string.
    #[tracing::instrument(name = "argon2_verify", skip_all)]
    pub async fn verify(
        &self,
        password: SecretString,
        hash: PasswordHash,
    ) -> Result<bool, HashError> {
        match self.reserve()?.run(Work::Verify(password, hash)).await? {
            Done::Verified(same) => Ok(same),
            Done::Hashed(_) => Err(HashError::Stopped),
        }
    }
}

/// A reserved place in the hashing queue (see [`Hasher::reserve`]).
pub struct Slot(mpsc::OwnedPermit<Job>);

impl Slot {
    async fn run(self, work: Work) -> Result<Done, HashError> {
        let (reply, answer) = oneshot::channel();
        self.0.send(Job { work, reply });
        answer.await.map_err(|_| HashError::Stopped)?
    }

    /// Hashes `password` with a fresh random salt into a PHC string.
    #[tracing::instrument(name = "argon2_hash", skip_all)]
    pub async fn hash(self, password: SecretString) -> Result<PasswordHash, HashError> {
        match self.run(Work::Hash(password)).await? {
            Done::Hashed(hash) => Ok(hash),
            Done::Verified(_) => Err(HashError::Stopped),
        }
    }
}

/// One hashing thread: takes jobs until every [`Hasher`] is dropped.
fn work(queue: &Mutex<mpsc::Receiver<Job>>) {
    yield_to_requests();
    loop {
        // Only the waiting thread holds the lock; it is released before hashing.
        let job = match queue.lock() {
            Ok(mut queue) => queue.blocking_recv(),
            Err(_) => return,
        };
        let Some(job) = job else { return };
        if job.reply.is_closed() {
            continue; // The request went away while queued: save the CPU.
        }
        // Counted so that tests and operators can see which requests cost a hash.
        let done = match job.work {
            Work::Hash(password) => {
                metrics::counter!("argon2_operations_total", "op" => "hash").increment(1);
                hash_blocking(password.expose_secret()).map(Done::Hashed)
            }
            Work::Verify(password, hash) => {
                metrics::counter!("argon2_operations_total", "op" => "verify").increment(1);
                verify_blocking(&password, &hash).map(Done::Verified)
            }
        };
        let _ = job.reply.send(done);
    }
}

/// The nice value of the hashing threads. Hashing is the one long CPU job
/// in the process; at nice 0 it competes on equal terms with the runtime's
/// workers, so when the cores are busy a health check or a cheap refusal
/// waits behind a hash for tens of milliseconds. At nice 10 the scheduler
/// gives a waking worker the core at once, and hashing still has every idle
/// cycle. Under sustained CPU pressure hashing slows first, the bounded queue
/// fills, and registration answers 503: the intended way to degrade.
const HASH_THREAD_NICE: i32 = 10;

fn yield_to_requests() {
    // Linux keeps the nice value per thread: naming this thread's id lowers
    // only this hashing thread.
    #[cfg(target_os = "linux")]
    if let Err(error) =
        rustix::process::setpriority_process(Some(rustix::thread::gettid()), HASH_THREAD_NICE)
    {
        tracing::warn!(%error, "could not lower the hashing thread's priority");
    }
}

/// Whether `hash` was made under other parameters than today's (another
/// algorithm, version, memory, iterations or lanes): a successful sign-in then
/// hashes the password again (`PasswordRehashed`).
pub fn needs_rehash(hash: &PasswordHash) -> bool {
    let Ok(parsed) = argon2::PasswordHash::new(hash.expose()) else {
        return true;
    };
    let current = params();
    parsed.algorithm != Algorithm::Argon2id.ident()
        || parsed.version != Some(Version::V0x13.into())
        || Params::try_from(&parsed).map_or(true, |p| {
            (p.m_cost(), p.t_cost(), p.p_cost())
                != (current.m_cost(), current.t_cost(), current.p_cost())
        })
}

/// Checks `password` against a PHC string by hashing it again with the
/// string's own parameters and salt in this thread's work area (see
/// [`WORK_AREA`]; argon2's `verify_password` allocates 19 MiB per call, which
/// made a verification cost about 1.4 hashes), then comparing the outputs in
/// constant time.
fn verify_blocking(password: &SecretString, hash: &PasswordHash) -> Result<bool, HashError> {
    let parsed = argon2::PasswordHash::new(hash.expose()).map_err(HashError::Argon2)?;
    let algorithm = Algorithm::try_from(parsed.algorithm).map_err(HashError::Argon2)?;
    let version = match parsed.version {
        Some(v) => Version::try_from(v).map_err(|e| HashError::Argon2(e.into()))?,
        None => Version::V0x13,
    };
    let params = Params::try_from(&parsed).map_err(HashError::Argon2)?;
    let expected = parsed
        .hash
        .ok_or(HashError::Argon2(argon2::password_hash::Error::Password))?;
    let salt = parsed.salt.ok_or(HashError::Argon2(
        argon2::password_hash::Error::SaltInvalid(
            argon2::password_hash::errors::InvalidValue::Malformed,
        ),
    ))?;
    let mut salt_buf = [0u8; 64];
    let salt_bytes = salt.decode_b64(&mut salt_buf).map_err(HashError::Argon2)?;
    let block_count = params.block_count();
    let argon2 = Argon2::new(algorithm, version, params);
    let mut output = vec![0u8; expected.len()];
    WORK_AREA
        .with(|area| {
            let mut blocks = area.borrow_mut();
            blocks.resize(block_count, Block::default());
            argon2.hash_password_into_with_memory(
                password.expose_secret().as_bytes(),
                salt_bytes,
                &mut output,
                &mut blocks[..block_count],
            )
        })
        .map_err(|e| HashError::Argon2(e.into()))?;
    Ok(bool::from(expected.as_bytes().ct_eq(&output)))
}

thread_local! {
    /// argon2's 19 MiB work area, kept per hashing thread and reused.
    /// Allocating, faulting in and unmapping 19 MiB for every hash costs a
    /// good share of the hash itself, and serialises threads that hash at once
    /// on the process's memory map. Every block is written before it is read,
    /// so a reused area needs no clearing.
    static WORK_AREA: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

fn params() -> Params {
    Params::new(MEMORY_KIB, ITERATIONS, PARALLELISM, None).expect("OWASP parameters are valid")
}

/// The synchronous hash into a PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`);
/// also what the benchmark times to find the machine's limit.
pub fn hash_blocking(password: &str) -> Result<PasswordHash, HashError> {
    let params = params();
    let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    let salt = SaltString::generate(&mut OsRng);
    let mut salt_buf = [0u8; 64];
    let salt_bytes = salt
        .as_salt()
        .decode_b64(&mut salt_buf)
        .map_err(HashError::Argon2)?;
    let mut output = [0u8; 32];
    let block_count = params.block_count();
    WORK_AREA
        .with(|area| {
            let mut blocks = area.borrow_mut();
            blocks.resize(block_count, Block::default());
            argon2.hash_password_into_with_memory(
                password.as_bytes(),
                salt_bytes,
                &mut output,
                &mut blocks[..block_count],
            )
        })
        .map_err(|e| HashError::Argon2(e.into()))?;
    let phc = argon2::PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).map_err(HashError::Argon2)?,
        salt: Some(salt.as_salt()),
        hash: Some(Output::new(&output).map_err(HashError::Argon2)?),
    };
    Ok(PasswordHash::new(phc.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_from_a_reused_work_area_are_correct_and_salted() {
        use argon2::password_hash::PasswordVerifier;
        let verify = |password: &str, hash: &PasswordHash| {
            let parsed = argon2::PasswordHash::new(hash.expose()).unwrap();
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        };
        let first = hash_blocking("first password 1").unwrap();
        let second = hash_blocking("second password 2").unwrap();
        let again = hash_blocking("first password 1").unwrap();
        assert!(verify("first password 1", &first));
        assert!(verify("second password 2", &second));
        assert!(!verify("second password 2", &first));
        assert_ne!(first, again, "a fresh salt every time");
        assert!(verify("first password 1", &again));
    }

    #[tokio::test]
    async fn hashes_are_argon2id_with_owasp_parameters_and_verify() {
        let hash = Hasher::new(1, 4)
            .hash(SecretString::from("correct horse battery"))
            .await
            .unwrap();
        let phc = hash.expose();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        let hasher = Hasher::new(1, 4);
        assert!(hasher
            .verify("correct horse battery".into(), hash.clone())
            .await
            .unwrap());
        assert!(!hasher
            .verify("wrong horse battery".into(), hash)
            .await
            .unwrap());
    }

    #[test]
    fn verification_in_the_work_area_agrees_with_argon2s_own() {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        let weaker = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(8 * 1024, 1, 1, None).unwrap(),
        );
        let salt = SaltString::generate(&mut OsRng);
        let old = weaker
            .hash_password(b"an older password", &salt)
            .unwrap()
            .to_string();
        let current = hash_blocking("a current password").unwrap();
        // Older (smaller) parameters after current ones: the area shrinks and grows.
        for (hash, right) in [
            (current.clone(), "a current password"),
            (PasswordHash::new(old), "an older password"),
            (current, "a current password"),
        ] {
            let parsed = argon2::PasswordHash::new(hash.expose()).unwrap();
            for (candidate, expected) in [(right, true), ("not the password", false)] {
                let ours = verify_blocking(&candidate.into(), &hash).unwrap();
                let theirs = Argon2::default()
                    .verify_password(candidate.as_bytes(), &parsed)
                    .is_ok();
                assert_eq!((ours, theirs), (expected, expected), "{candidate}");
            }
        }
        assert!(verify_blocking(&"x".into(), &PasswordHash::new("junk".into())).is_err());
    }

    #[test]
    fn hashes_under_older_parameters_need_a_rehash() {
        let current = hash_blocking("a password of some length").unwrap();
        assert!(!needs_rehash(&current));
        let weaker = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(8 * 1024, 1, 1, None).unwrap(),
        );
        let salt = SaltString::generate(&mut OsRng);
        let old = argon2::password_hash::PasswordHasher::hash_password(
            &weaker,
            b"a password of some length",
            &salt,
        )
        .unwrap()
        .to_string();
        assert!(needs_rehash(&PasswordHash::new(old)));
        assert!(needs_rehash(&PasswordHash::new("not a phc string".into())));
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once_instead_of_waiting() {
        let hasher = Hasher::new(1, 1);
        let jobs: Vec<_> = (0..8)
            .map(|i| {
                let hasher = hasher.clone();
                tokio::spawn(
                    async move { hasher.hash(format!("password number {i}").into()).await },
                )
            })
            .collect();
        let mut hashed = 0;
        let mut refused = 0;
        for job in jobs {
            match job.await.unwrap() {
                Ok(_) => hashed += 1,
                Err(HashError::Overloaded) => refused += 1,
                Err(other) => panic!("unexpected {other}"),
            }
        }
        // One thread busy and one waiting at most; the rest were refused.
        assert!(hashed >= 1, "{hashed} hashed");
        assert!(refused >= 1, "{refused} refused");
        assert_eq!(hashed + refused, 8);
    }
}
