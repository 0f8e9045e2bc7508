//! What can go wrong in ExecutionService, and how each maps to a gRPC status.

use meshflow_kit::Violation;
use meshflow_kit::error as status;
use tonic::Status;

use crate::store::StoreError;

/// An error of ExecutionService.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is invalid.
    #[error("invalid request: {0:?}")]
    Invalid(Vec<Violation>),
    /// No execution has this id.
    #[error("execution {0} not found")]
    ExecutionNotFound(String),
    /// No workflow ever had this id.
    #[error("workflow {0} not found")]
    WorkflowNotFound(String),
    /// The execution records could not be read.
    #[error(transparent)]
    Storage(#[from] StoreError),
    /// The workflow definitions could not be read.
    #[error(transparent)]
    Workflows(#[from] meshflow_workflow::Error),
}

impl From<Violation> for Error {
    fn from(v: Violation) -> Self {
        Self::Invalid(vec![v])
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::Invalid(violations) => status::invalid_argument("INVALID_ARGUMENT", &violations),
            Error::ExecutionNotFound(id) => {
                status::not_found("EXECUTION_NOT_FOUND", "execution", &id)
            }
            Error::WorkflowNotFound(id) => status::not_found("WORKFLOW_NOT_FOUND", "workflow", &id),
            Error::Storage(err) => status::storage(&err),
            Error::Workflows(err) => err.into(),
        }
    }
}
