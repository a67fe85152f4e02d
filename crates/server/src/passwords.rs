//! The password-hashing pool: a few long-lived threads that run argon2id, each reusing one
//! memory block, behind a bounded queue.
//!
//! Why (issue 14): each argon2id hash holds its memory cost in RAM (19 MiB with the default
//! `m=19456`). Run through `spawn_blocking`, 32 concurrent logins for unknown users took RSS
//! from 15 to 625 MiB: up to 512 blocking threads, each hashing with a fresh 19 MiB buffer in
//! its own malloc arena that was never given back. Here at most `workers` hashes run at once,
//! each worker keeps its buffer for its whole life (`Argon2::hash_password_into_with_memory`),
//! so hashing costs at most `workers × 19 MiB` however many requests arrive; at most `queue`
//! more wait, and beyond that a request is refused at once ([`Busy`]) instead of piling up.

use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use argon2::password_hash::{Output, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use rand::RngCore;
use tokio::sync::oneshot;

/// Hashes with a memory cost above this are not verified (ours use the default, 19 MiB): a
/// stored hash can't make a worker allocate without bound.
const MAX_M_COST_KIB: u32 = 256 * 1024;

/// The pool is full: `workers` hashes are running and `queue` more are waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

enum Job {
    Hash { password: String, reply: oneshot::Sender<String> },
    Verify { password: String, hash: String, reply: oneshot::Sender<bool> },
}

/// The pool. Dropping it (with the server) ends its threads once their queue is empty.
pub struct PasswordPool {
    tx: SyncSender<Job>,
    workers: usize,
}

impl PasswordPool {
    /// Starts `workers` threads (at least one) with room for `queue` waiting jobs.
    pub fn new(workers: usize, queue: usize) -> PasswordPool {
        let workers = workers.max(1);
        let (tx, rx) = mpsc::sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..workers {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("natter-argon2-{i}"))
                // argon2 keeps its state in the heap buffer; the stack needs little.
                .stack_size(256 * 1024)
                .spawn(move || worker(&rx))
                .expect("spawning a password-hashing thread");
        }
        PasswordPool { tx, workers }
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Hashes a password (argon2id, default parameters, a fresh salt) as a PHC string.
    pub async fn hash(&self, password: &str) -> Result<String, Busy> {
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Hash { password: password.to_owned(), reply })?;
        // The worker only drops the reply when the pool is gone (shutdown): say busy.
        rx.await.map_err(|_| Busy)
    }

    /// Checks a password against a stored PHC hash.
    pub async fn verify(&self, password: &str, hash: &str) -> Result<bool, Busy> {
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Verify { password: password.to_owned(), hash: hash.to_owned(), reply })?;
        rx.await.map_err(|_| Busy)
    }

    fn submit(&self, job: Job) -> Result<(), Busy> {
        self.tx.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) | TrySendError::Disconnected(_) => Busy,
        })
    }
}

fn worker(rx: &Mutex<Receiver<Job>>) {
    // Allocated on the first job and kept: the pages are touched once and reused after.
    let mut memory: Vec<Block> = Vec::new();
    loop {
        let job = {
            let Ok(rx) = rx.lock() else { return };
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        match job {
            Job::Hash { password, reply } => {
                // The caller went away (client disconnected, request timed out): skip the work.
                if reply.is_closed() {
                    continue;
                }
                let _ = reply.send(hash_with(&mut memory, &password));
            }
            Job::Verify { password, hash, reply } => {
                if reply.is_closed() {
                    continue;
                }
                let _ = reply.send(verify_with(&mut memory, &password, &hash));
            }
        }
    }
}

fn blocks<'a>(memory: &'a mut Vec<Block>, params: &Params) -> &'a mut [Block] {
    let n = params.block_count();
    if memory.len() < n {
        memory.resize(n, Block::default());
    }
    &mut memory[..n]
}

/// argon2id with the default parameters, as `Argon2::default().hash_password` writes it.
pub(crate) fn hash_with(memory: &mut Vec<Block>, password: &str) -> String {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt_string = SaltString::encode_b64(&salt).expect("16 bytes is a valid salt");
    let params = Params::default();
    let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
    argon2
        .hash_password_into_with_memory(password.as_bytes(), &salt, &mut out, blocks(memory, &params))
        .expect("argon2 with default parameters cannot fail");
    PasswordHash {
        algorithm: argon2::ARGON2ID_IDENT,
        version: Some(Version::V0x13.into()),
        params: (&params).try_into().expect("default parameters encode"),
        salt: Some(salt_string.as_salt()),
        hash: Some(Output::new(&out).expect("32 bytes is a valid output")),
    }
    .to_string()
}

/// Verifies as `PasswordVerifier::verify_password` does (same parameters as the stored hash,
/// constant-time comparison), in the worker's own memory.
pub(crate) fn verify_with(memory: &mut Vec<Block>, password: &str, hash: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else { return false };
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else { return false };
    let (Ok(algorithm), Ok(params)) = (Algorithm::try_from(parsed.algorithm), Params::try_from(&parsed)) else {
        return false;
    };
    let version = match parsed.version.map(Version::try_from).transpose() {
        Ok(v) => v.unwrap_or_default(),
        Err(_) => return false,
    };
    if params.m_cost() > MAX_M_COST_KIB {
        return false;
    }
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else { return false };
    let mut out = vec![0u8; expected.len()];
    let argon2 = Argon2::new(algorithm, version, params.clone());
    if argon2.hash_password_into_with_memory(password.as_bytes(), salt, &mut out, blocks(memory, &params)).is_err() {
        return false;
    }
    // `Output`'s equality is constant-time.
    Output::new(&out).is_ok_and(|computed| computed == expected)
}

/// A hash in the stored format that no password matches (random output bytes under the
/// default parameters): verified against for unknown users, so that a login for an unknown
/// user costs one full hash, like a wrong password for a known one.
pub fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| {
        let mut salt = [0u8; 16];
        let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
        rand::rng().fill_bytes(&mut salt);
        rand::rng().fill_bytes(&mut out);
        let salt_string = SaltString::encode_b64(&salt).expect("16 bytes is a valid salt");
        PasswordHash {
            algorithm: argon2::ARGON2ID_IDENT,
            version: Some(Version::V0x13.into()),
            params: (&Params::default()).try_into().expect("default parameters encode"),
            salt: Some(salt_string.as_salt()),
            hash: Some(Output::new(&out).expect("32 bytes is a valid output")),
        }
        .to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::{PasswordHasher, PasswordVerifier};

    #[test]
    fn the_pools_format_is_argon2s_own() {
        let mut mem = Vec::new();
        let ours = hash_with(&mut mem, "correct horse");
        assert!(ours.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{ours}");
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(Argon2::default().verify_password(b"correct horse", &parsed).is_ok());
        assert!(Argon2::default().verify_password(b"wrong horse", &parsed).is_err());
        // And hashes written by argon2 itself (every stored hash so far) verify here.
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let theirs = Argon2::default().hash_password(b"correct horse", &salt).unwrap().to_string();
        assert!(verify_with(&mut mem, "correct horse", &theirs));
        assert!(!verify_with(&mut mem, "wrong horse", &theirs));
        assert!(!verify_with(&mut mem, "x", "not a hash"));
        assert!(!verify_with(&mut mem, "", dummy_hash()));
        assert_eq!(mem.len(), Params::default().block_count(), "one buffer, reused");
        // A stored hash cannot make a worker allocate gigabytes.
        let huge = theirs.replace("m=19456", "m=4194304");
        assert!(!verify_with(&mut mem, "correct horse", &huge));
        assert_eq!(mem.len(), Params::default().block_count());
    }

    #[tokio::test]
    async fn a_full_pool_says_busy_at_once() {
        let pool = PasswordPool::new(1, 1);
        let h = pool.hash("pw-one-two").await.unwrap();
        assert!(pool.verify("pw-one-two", &h).await.unwrap());
        // One running, one waiting: the third is refused without waiting.
        let (a, b, c) = tokio::join!(pool.verify("x", &h), pool.verify("y", &h), async {
            tokio::task::yield_now().await;
            pool.verify("z", &h).await
        });
        let busy = [a, b, c].iter().filter(|r| **r == Err(Busy)).count();
        assert!(busy >= 1, "a third job beyond 1 worker + 1 queued is refused");
    }
}
