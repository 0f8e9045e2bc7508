//! What can go wrong in the workflow services, and how each maps to a gRPC status.

use meshflow_kit::Violation;
use meshflow_kit::error as status;
use tonic::Status;

/// An error of the workflow, template or transformation-rule services.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request or the definition it carries is invalid.
    #[error("invalid request: {0:?}")]
    Invalid(Vec<Violation>),
    /// No workflow has this id.
    #[error("workflow {0} not found")]
    WorkflowNotFound(String),
    /// The workflow has no such version.
    #[error("workflow {id} has no version {version}")]
    VersionNotFound {
        /// Workflow id.
        id: String,
        /// Requested version.
        version: i64,
    },
    /// No template has this id.
    #[error("template {0} not found")]
    TemplateNotFound(String),
    /// No transformation rule has this id.
    #[error("transformation rule {0} not found")]
    RuleNotFound(String),
    /// A unique name is taken.
    #[error("a {kind} named {name} already exists")]
    NameTaken {
        /// Resource kind.
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// The etag sent does not match: someone else changed the resource.
    #[error("{kind} {id} changed since it was read")]
    StaleEtag {
        /// Resource kind.
        kind: &'static str,
        /// Resource id.
        id: String,
    },
    /// The workflow has executions that have not ended, and the delete did not ask to cancel them.
    #[error("workflow {id} has {} executions that have not ended", executions.len())]
    HasActiveExecutions {
        /// Workflow id.
        id: String,
        /// The executions, oldest first.
        executions: Vec<String>,
    },
    /// The execution records could not be read or written.
    #[error("execution records: {0}")]
    Executions(String),
    /// The database failed.
    #[error(transparent)]
    Storage(#[from] sea_orm::DbErr),
    /// A broken invariant.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// One violation.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::Invalid(vec![Violation::new(field, description)])
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::Invalid(violations) => status::invalid_argument("INVALID_ARGUMENT", &violations),
            Error::WorkflowNotFound(id) => status::not_found("WORKFLOW_NOT_FOUND", "workflow", &id),
            Error::VersionNotFound { id, version } => status::not_found(
                "WORKFLOW_VERSION_NOT_FOUND",
                "workflow version",
                &format!("{id}@{version}"),
            ),
            Error::TemplateNotFound(id) => {
                status::not_found("TEMPLATE_NOT_FOUND", "workflow template", &id)
            }
            Error::RuleNotFound(id) => {
                status::not_found("TRANSFORMATION_RULE_NOT_FOUND", "transformation rule", &id)
            }
            Error::NameTaken { kind, name } => status::name_taken(kind, &name),
            Error::StaleEtag { kind, id } => status::stale_etag(kind, &id),
            Error::HasActiveExecutions { id, executions } => {
                let named: Vec<&str> = executions.iter().take(5).map(String::as_str).collect();
                let more = executions.len().saturating_sub(named.len());
                status::failed_precondition(
                    "WORKFLOW_HAS_ACTIVE_EXECUTIONS",
                    format!(
                        "workflow {id} has {} executions that have not ended ({}{}); cancel them, \
                         or delete with cancel_executions",
                        executions.len(),
                        named.join(", "),
                        if more > 0 {
                            format!(" and {more} more")
                        } else {
                            String::new()
                        },
                    ),
                )
            }
            Error::Executions(err) => status::storage(&std::io::Error::other(err)),
            Error::Storage(err) => status::storage(&err),
            Error::Internal(msg) => status::internal(&msg),
        }
    }
}
