//! Password hashing and checking with a bounded cost: argon2id (the argon2 crate's defaults:
//! 19 MiB, two passes, one lane) takes ~19 MiB and tens of milliseconds of a core per check, so
//! a crowd of sign-in attempts must not run them all at once.
//!
//! [`Passwords`] runs at most `at_once` hashes or checks at a time, each on the blocking pool in
//! a work area of its own that is mapped for it and unmapped when it ends ([`WorkArea`]): the
//! memory is back with the kernel after every check, whatever the allocator would have kept.
//! A caller that finds every slot taken waits up to `wait`, and only while fewer than
//! [`MAX_WAITING`] others wait; otherwise it is refused at once with [`PasswordError::Busy`]
//! (the sign-in answers 429 with `Retry-After`). So the peak memory of password work is
//! `at_once` × 19 MiB however many clients ask.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use argon2::password_hash::{Output, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use subtle::ConstantTimeEq;

/// Callers that may wait for a slot at once; more are refused without waiting.
pub const MAX_WAITING: usize = 64;

/// Why a hash or check did not run.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    /// Every slot stayed taken for the whole wait, or too many callers were already waiting.
    #[error("too many sign-ins at once: try again in a second")]
    Busy,
    /// The work area could not be mapped, or the hashing task died.
    #[error("password hashing failed: {0}")]
    Failed(String),
}

/// The bounded password worker (see the module docs).
pub struct Passwords {
    permits: tokio::sync::Semaphore,
    waiting: AtomicUsize,
    wait: Duration,
    /// Hashes and checks run since start.
    pub runs: AtomicU64,
    /// Callers refused because every slot was taken.
    pub busy: AtomicU64,
}

impl Passwords {
    /// At most `at_once` at a time; a caller waits at most `wait` for a slot.
    pub fn new(at_once: usize, wait: Duration) -> Passwords {
        Passwords {
            permits: tokio::sync::Semaphore::new(at_once.max(1)),
            waiting: AtomicUsize::new(0),
            wait,
            runs: AtomicU64::new(0),
            busy: AtomicU64::new(0),
        }
    }

    /// Runs `f` with a work area of `blocks` argon2 blocks, in a slot, on the blocking pool.
    async fn run<T: Send + 'static>(
        &self,
        blocks: usize,
        f: impl FnOnce(&mut [Block]) -> T + Send + 'static,
    ) -> Result<T, PasswordError> {
        let permit = match self.permits.try_acquire() {
            Ok(p) => p,
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::SeqCst) >= MAX_WAITING {
                    self.waiting.fetch_sub(1, Ordering::SeqCst);
                    self.busy.fetch_add(1, Ordering::Relaxed);
                    return Err(PasswordError::Busy);
                }
                let got = tokio::time::timeout(self.wait, self.permits.acquire()).await;
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                match got {
                    Ok(Ok(p)) => p,
                    _ => {
                        self.busy.fetch_add(1, Ordering::Relaxed);
                        return Err(PasswordError::Busy);
                    }
                }
            }
        };
        self.runs.fetch_add(1, Ordering::Relaxed);
        let r = tokio::task::spawn_blocking(move || {
            let mut area = WorkArea::map(blocks)?;
            Ok(f(area.blocks()))
        })
        .await
        .map_err(|e| PasswordError::Failed(format!("hashing task: {e}")))?;
        drop(permit);
        r
    }

    /// Runs other password work (the broker's PBKDF2 checks) in a slot, on the blocking pool.
    pub async fn run_cpu<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PasswordError> {
        self.run(1, move |_| f()).await
    }

    /// An argon2id hash of `password` in PHC string form, with a fresh salt.
    pub async fn hash(&self, password: String) -> Result<String, PasswordError> {
        let params = Params::default();
        self.run(params.block_count(), move |area| {
            hash_with(area, &params, password.as_bytes())
        })
        .await?
    }

    /// Whether `password` matches the PHC string `phc` (false for a string that is not one).
    pub async fn verify(&self, phc: String, password: String) -> Result<bool, PasswordError> {
        let Some(params) = PasswordHash::new(&phc)
            .ok()
            .and_then(|h| Params::try_from(&h).ok())
        else {
            return Ok(false);
        };
        // a stored hash asking for more than the defaults' memory is not ours: refuse it
        // rather than map whatever it asks for
        if params.block_count() > Params::default().block_count() * 4 {
            return Ok(false);
        }
        self.run(params.block_count(), move |area| {
            verify_with(area, &phc, password.as_bytes())
        })
        .await
    }
}

fn hash_with(
    area: &mut [Block],
    params: &Params,
    password: &[u8],
) -> Result<String, PasswordError> {
    let mut salt = [0u8; 16];
    rand::fill(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| PasswordError::Failed(e.to_string()))?;
    let mut raw = [0u8; 64];
    let salt_bytes = salt
        .as_salt()
        .decode_b64(&mut raw)
        .map_err(|e| PasswordError::Failed(e.to_string()))?;
    let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
    let a = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    a.hash_password_into_with_memory(password, salt_bytes, &mut out, area)
        .map_err(|e| PasswordError::Failed(format!("argon2: {e}")))?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: params
            .try_into()
            .map_err(|e: argon2::password_hash::Error| PasswordError::Failed(e.to_string()))?,
        salt: Some(salt.as_salt()),
        hash: Some(Output::new(&out).map_err(|e| PasswordError::Failed(e.to_string()))?),
    };
    Ok(phc.to_string())
}

fn verify_with(area: &mut [Block], phc: &str, password: &[u8]) -> bool {
    let Ok(h) = PasswordHash::new(phc) else {
        return false;
    };
    let (Ok(alg), Ok(params), Some(salt), Some(expected)) = (
        Algorithm::try_from(h.algorithm),
        Params::try_from(&h),
        h.salt,
        h.hash,
    ) else {
        return false;
    };
    let version = match h.version.map(Version::try_from).transpose() {
        Ok(v) => v.unwrap_or_default(),
        Err(_) => return false,
    };
    let mut raw = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut raw) else {
        return false;
    };
    let mut out = vec![0u8; expected.len()];
    let a = Argon2::new(alg, version, params);
    a.hash_password_into_with_memory(password, salt, &mut out, area)
        .is_ok()
        && bool::from(out.as_slice().ct_eq(expected.as_bytes()))
}

/// Anonymous memory mapped for one hash and unmapped when dropped, so that it goes back to the
/// kernel at once (a freed 19 MiB allocation may otherwise stay in the allocator's arenas).
struct WorkArea {
    ptr: *mut libc::c_void,
    len: usize,
    blocks: usize,
}

// The area is owned by one thread at a time (moved into the blocking task).
unsafe impl Send for WorkArea {}

impl WorkArea {
    fn map(blocks: usize) -> Result<WorkArea, PasswordError> {
        let len = blocks.max(1) * std::mem::size_of::<Block>();
        // SAFETY: a fresh private anonymous mapping; checked for failure below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(PasswordError::Failed(format!(
                "cannot map {len} bytes: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(WorkArea { ptr, len, blocks })
    }

    fn blocks(&mut self) -> &mut [Block] {
        // SAFETY: the mapping is page-aligned (Block needs 64), zero-filled (an all-zero Block
        // is valid: it is plain u64s), `blocks` Blocks long, and borrowed mutably through self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.cast::<Block>(), self.blocks) }
    }
}

impl Drop for WorkArea {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::PasswordVerifier;

    #[tokio::test]
    async fn hashes_check_their_password_and_no_other_and_read_as_the_crate_writes() {
        let p = Passwords::new(2, Duration::from_secs(5));
        let h = p.hash("correct horse".into()).await.unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(p.verify(h.clone(), "correct horse".into()).await.unwrap());
        assert!(!p.verify(h.clone(), "correct horsf".into()).await.unwrap());
        assert!(!p.verify("garbage".into(), "x".into()).await.unwrap());
        // the crate's own verifier agrees, and we check what the crate writes
        let parsed = PasswordHash::new(&h).unwrap();
        assert!(
            Argon2::default()
                .verify_password(b"correct horse", &parsed)
                .is_ok()
        );
        use argon2::PasswordHasher;
        let theirs = Argon2::default()
            .hash_password(b"pw12345678", &SaltString::encode_b64(&[7u8; 16]).unwrap())
            .unwrap()
            .to_string();
        assert!(p.verify(theirs.clone(), "pw12345678".into()).await.unwrap());
        assert!(!p.verify(theirs, "pw12345679".into()).await.unwrap());
        // one hash and four checks: "garbage" is no PHC string and runs nothing
        assert_eq!(p.runs.load(Ordering::Relaxed), 5);
    }

    #[tokio::test]
    async fn a_hash_asking_for_huge_memory_is_not_run() {
        let p = Passwords::new(1, Duration::from_secs(1));
        let huge = "$argon2id$v=19$m=4000000,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA";
        assert!(!p.verify(huge.into(), "x".into()).await.unwrap());
        assert_eq!(p.runs.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_beyond_the_slots_wait_then_are_refused() {
        let p = std::sync::Arc::new(Passwords::new(1, Duration::from_millis(1)));
        let h = p.hash("correct horse".into()).await.unwrap();
        let mut all = Vec::new();
        for _ in 0..8 {
            let p = p.clone();
            let h = h.clone();
            all.push(tokio::spawn(
                async move { p.verify(h, "wrong".into()).await },
            ));
        }
        let mut busy = 0;
        for t in all {
            if matches!(t.await.unwrap(), Err(PasswordError::Busy)) {
                busy += 1;
            }
        }
        assert!(
            busy >= 1,
            "with one slot and a 1 ms wait, some of 8 are refused"
        );
        assert_eq!(p.busy.load(Ordering::Relaxed), busy);
    }
}
