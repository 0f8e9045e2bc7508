//! What can go wrong in CircuitBreakerService, and how each maps to a gRPC status.

use meshflow_kit::Violation;
use meshflow_kit::error as status;
use tonic::Status;

use crate::store::StoreError;

/// An error of the breaker service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is invalid.
    #[error("invalid request: {0:?}")]
    Invalid(Vec<Violation>),
    /// No breaker guards this service yet.
    #[error("circuit breaker {0} not found")]
    NotFound(String),
    /// The etag sent does not name the breaker's current configuration.
    #[error("circuit breaker {0} changed since it was read")]
    StaleEtag(String),
    /// The database failed, or other replicas kept the breaker changing.
    #[error(transparent)]
    Storage(#[from] StoreError),
}

impl From<Vec<Violation>> for Error {
    fn from(v: Vec<Violation>) -> Self {
        Self::Invalid(v)
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::Invalid(violations) => status::invalid_argument("INVALID_ARGUMENT", &violations),
            Error::NotFound(id) => {
                status::not_found("CIRCUIT_BREAKER_NOT_FOUND", "circuit breaker", &id)
            }
            Error::StaleEtag(id) => status::stale_etag("circuit breaker", &id),
            Error::Storage(StoreError::Contended(id)) => status::aborted(
                "CIRCUIT_BREAKER_CONTENDED",
                format!("circuit breaker {id} kept changing while it was being changed; retry"),
            ),
            Error::Storage(e) => status::storage(&e),
        }
    }
}
