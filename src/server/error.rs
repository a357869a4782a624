//! The one error every service returns (firmware, devices, tasks, campaigns, deltas): what kind
//! of refusal it is and why, in words for the operator, or the failure underneath. The HTTP
//! layer maps it to a status and the envelope in exactly one place (`http::error`); the CLI
//! prints the message. Each service names it after itself (`FirmwareError`, `OtaError`, ...) so
//! signatures say where an error comes from, but there is nothing to translate between them.

use crate::server::store::StoreError;

/// Why a service operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Bad input (400).
    #[error("{0}")]
    Invalid(String),
    /// A signature or hash does not verify, or its key is not trusted (422).
    #[error("{0}")]
    Unverified(String),
    /// Too large for its limit (413).
    #[error("{0}")]
    TooLarge(String),
    /// No such thing (404).
    #[error("{0}")]
    NotFound(String),
    /// Conflicts with what is stored, or the wrong state for it (409).
    #[error("{0}")]
    Conflict(String),
    /// Wrong or missing credentials (401).
    #[error("{0}")]
    Unauthorized(String),
    /// Signed in, but the role does not allow it (403).
    #[error("{0}")]
    Forbidden(String),
    /// Too many attempts: wait `retry_after_secs` (429).
    #[error("{message}")]
    Throttled {
        /// Why, and how long to wait.
        message: String,
        /// Seconds until the next attempt is considered.
        retry_after_secs: u64,
    },
    /// Not now: a queue is full (503, try again later).
    #[error("{0}")]
    Busy(String),
    /// Stored data is damaged (500; logged).
    #[error("{0}")]
    Corrupt(String),
    /// The store failed: full disk (507), reopening (503) or worse (500).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// File I/O outside the store failed (500; logged).
    #[error("storage: {0}")]
    Io(#[from] std::io::Error),
}

impl From<crate::server::broker::users::UsersError> for ServiceError {
    fn from(e: crate::server::broker::users::UsersError) -> ServiceError {
        use crate::server::broker::users::UsersError as U;
        match e {
            U::BadName(_) | U::BadPassword => ServiceError::Invalid(e.to_string()),
            U::Exists(_) | U::InFile(_) => ServiceError::Conflict(e.to_string()),
            U::NotFound(_) => ServiceError::NotFound(e.to_string()),
            U::Busy(b) => ServiceError::Busy(b.to_string()),
            U::Store(s) => ServiceError::Store(s),
        }
    }
}
