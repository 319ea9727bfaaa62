//! argon2id hashing off the async runtime's worker threads, with bounded concurrency.
//!
//! A hash costs tens of milliseconds of one core. Computing it on a runtime
//! worker would stall every other request on that worker, so it runs on the
//! blocking pool; a semaphore caps how many run at once (default: one per core)
//! so a burst of registrations queues instead of oversubscribing the CPU.

use std::cell::RefCell;
use std::sync::Arc;

use argon2::password_hash::{
    rand_core::OsRng, Output, ParamsString, PasswordVerifier as _, SaltString,
};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use events::PasswordHash;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;

/// OWASP's recommended argon2id parameters: m = 19 MiB, t = 2, p = 1.
pub const MEMORY_KIB: u32 = 19 * 1024;
pub const ITERATIONS: u32 = 2;
pub const PARALLELISM: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("argon2 failed")]
    Argon2(#[source] argon2::password_hash::Error),
    #[error("the hashing task did not finish")]
    Task(#[from] tokio::task::JoinError),
    #[error("the hasher is shut down")]
    Closed(#[from] tokio::sync::AcquireError),
}

#[derive(Clone)]
pub struct Hasher {
    permits: Arc<Semaphore>,
}

impl Hasher {
    pub fn new(concurrency: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(concurrency)),
        }
    }

    /// Hashes `password` with a fresh random salt into a PHC string.
    #[tracing::instrument(name = "argon2_hash", skip_all)]
    pub async fn hash(&self, password: SecretString) -> Result<PasswordHash, HashError> {
        let permit = self.permits.clone().acquire_owned().await?;
        tokio::task::spawn_blocking(move || {
            // Held until the hash is done, even if the request is dropped meanwhile.
            let _permit = permit;
            hash_blocking(password.expose_secret())
        })
        .await?
    }
}

impl Hasher {
    /// Checks `password` against a stored PHC string, on the blocking pool.
    #[tracing::instrument(name = "argon2_verify", skip_all)]
    pub async fn verify(
        &self,
        password: SecretString,
        hash: PasswordHash,
    ) -> Result<bool, HashError> {
        let permit = self.permits.clone().acquire_owned().await?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let parsed = argon2::PasswordHash::new(hash.expose()).map_err(HashError::Argon2)?;
            Ok(Argon2::default()
                .verify_password(password.expose_secret().as_bytes(), &parsed)
                .is_ok())
        })
        .await?
    }
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
    WORK_AREA
        .with(|area| {
            let mut blocks = area.borrow_mut();
            blocks.resize(params.block_count(), Block::default());
            argon2.hash_password_into_with_memory(
                password.as_bytes(),
                salt_bytes,
                &mut output,
                blocks.as_mut_slice(),
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
        let hash = Hasher::new(1)
            .hash(SecretString::from("correct horse battery"))
            .await
            .unwrap();
        let phc = hash.expose();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        let hasher = Hasher::new(1);
        assert!(hasher
            .verify("correct horse battery".into(), hash.clone())
            .await
            .unwrap());
        assert!(!hasher
            .verify("wrong horse battery".into(), hash)
            .await
            .unwrap());
    }
}
