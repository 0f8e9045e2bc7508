//! What can go wrong in WebhookService, and how each maps to a gRPC status.

use meshflow_kit::Violation;
use meshflow_kit::error as status;
use tonic::Status;

/// An error of the webhook service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is invalid.
    #[error("invalid request: {0:?}")]
    Invalid(Vec<Violation>),
    /// No webhook has this id.
    #[error("webhook {0} not found")]
    NotFound(String),
    /// Another webhook has the name.
    #[error("a webhook named {0} already exists")]
    NameTaken(String),
    /// The etag sent does not match: someone else changed the webhook.
    #[error("webhook {0} changed since it was read")]
    StaleEtag(String),
    /// Events wait to be delivered to the webhook, and the delete did not say to discard them.
    #[error("webhook {id} has {} events waiting to be delivered", events.len())]
    HasUndeliveredEvents {
        /// Webhook id.
        id: String,
        /// The events, oldest first.
        events: Vec<String>,
    },
    /// No webhook event has this id.
    #[error("webhook event {0} not found")]
    EventNotFound(String),
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

impl From<Violation> for Error {
    fn from(v: Violation) -> Self {
        Self::Invalid(vec![v])
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::Invalid(violations) => status::invalid_argument("INVALID_ARGUMENT", &violations),
            Error::NotFound(id) => status::not_found("WEBHOOK_NOT_FOUND", "webhook", &id),
            Error::NameTaken(name) => status::name_taken("webhook", &name),
            Error::StaleEtag(id) => status::stale_etag("webhook", &id),
            Error::HasUndeliveredEvents { id, events } => {
                let named: Vec<&str> = events.iter().take(5).map(String::as_str).collect();
                status::failed_precondition(
                    "WEBHOOK_HAS_UNDELIVERED_EVENTS",
                    format!(
                        "webhook {id} has {} events waiting to be delivered ({}{}); deliver them, or \
                         delete with discard_undelivered",
                        events.len(),
                        named.join(", "),
                        if events.len() > named.len() {
                            " and more"
                        } else {
                            ""
                        },
                    ),
                )
            }
            Error::EventNotFound(id) => {
                status::not_found("WEBHOOK_EVENT_NOT_FOUND", "webhook event", &id)
            }
            Error::Storage(err) => status::storage(&err),
            Error::Internal(msg) => status::internal(&msg),
        }
    }
}
