//! What can go wrong in the orchestrator, and how each maps to a gRPC status.

use meshflow_kit::Violation;
use meshflow_kit::error as status;
use tonic::Status;

/// An error of OrchestratorService.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is invalid.
    #[error("invalid request: {0:?}")]
    Invalid(Vec<Violation>),
    /// No execution has this id.
    #[error("execution {0} not found")]
    ExecutionNotFound(String),
    /// The workflow is not ACTIVE.
    #[error("workflow {id} is {status}")]
    NotActive {
        /// Workflow id.
        id: String,
        /// Its status.
        status: String,
    },
    /// The workflow's status or current version changed under each of a start's attempts.
    #[error("workflow {0} kept changing while the execution was started")]
    WorkflowChanging(String),
    /// The execution already reached a terminal status.
    #[error("execution {id} already ended ({status})")]
    AlreadyEnded {
        /// Execution id.
        id: String,
        /// Its status.
        status: String,
    },
    /// The concurrent-executions limit is reached.
    #[error("{0} executions are active, the limit")]
    TooManyExecutions(usize),
    /// From the workflow store (not found, ...).
    #[error(transparent)]
    Workflow(#[from] meshflow_workflow::Error),
    /// The database failed.
    #[error(transparent)]
    Storage(#[from] meshflow_execution::store::StoreError),
    /// A broken invariant.
    #[error("{0}")]
    Internal(String),
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::Invalid(v) => status::invalid_argument("INVALID_ARGUMENT", &v),
            Error::ExecutionNotFound(id) => {
                status::not_found("EXECUTION_NOT_FOUND", "execution", &id)
            }
            Error::NotActive { id, status: s } => status::failed_precondition(
                "WORKFLOW_NOT_ACTIVE",
                format!(
                    "workflow {id} is {s}; only WORKFLOW_STATUS_ACTIVE workflows start executions"
                ),
            ),
            Error::WorkflowChanging(id) => status::aborted(
                "WORKFLOW_CHANGING",
                format!("workflow {id} changed while the execution was started; start it again"),
            ),
            Error::AlreadyEnded { id, status: s } => status::failed_precondition(
                "EXECUTION_ENDED",
                format!("execution {id} already ended: {s}"),
            ),
            Error::TooManyExecutions(limit) => status::resource_exhausted(
                "TOO_MANY_EXECUTIONS",
                format!("{limit} executions are active, the configured limit"),
                Some(std::time::Duration::from_secs(1)),
            ),
            Error::Workflow(e) => e.into(),
            Error::Storage(e) => status::storage(&e),
            Error::Internal(msg) => status::internal(&msg),
        }
    }
}
