//! The one mapping from service errors to `tonic::Status`.
//!
//! Every service has its own `thiserror` enum saying what happened; its `From<Error> for Status`
//! calls the constructors here, which attach `google.rpc` details: `ErrorInfo` with a stable
//! `reason` and domain `meshflow` always, `BadRequest` field violations for bad input, `RetryInfo`
//! where trying again helps. The catalogue of reasons is in `docs/errors.md`.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo.domain` of every meshflow error.
pub const DOMAIN: &str = "meshflow";

/// Most characters of a request's value an error repeats.
pub const MAX_ECHO_CHARS: usize = 64;

/// A value for an error message to repeat: whole when short, else its first [`MAX_ECHO_CHARS`]
/// characters and an ellipsis, so an error about a huge input stays small.
pub fn echo(value: &str) -> std::borrow::Cow<'_, str> {
    cut(value, MAX_ECHO_CHARS)
}

/// `text` cut to at most `max` characters, the cut marked with an ellipsis.
fn cut(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(max) {
        None => std::borrow::Cow::Borrowed(text),
        Some((end, _)) => std::borrow::Cow::Owned(format!("{}…", &text[..end])),
    }
}

/// Bounds on what an error carries, whatever its input: gRPC clients refuse response metadata
/// past 8 to 16 KiB (grpcio's default is 16 KiB), and the message, the details (base64 in
/// `grpc-status-details-bin`) and the metadata all travel in the trailers.
const MAX_MESSAGE_CHARS: usize = 512;
const MAX_TEXT_CHARS: usize = 300;
const MAX_VIOLATION_BYTES: usize = 6 * 1024;

/// One problem with one field of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Path of the field, e.g. `workflow.steps[2].http.url`.
    pub field: String,
    /// What is wrong, lowercase, no trailing period.
    pub description: String,
}

impl Violation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }

    /// The same violation under a parent path (`workflow` + `steps[0].id`).
    pub fn under(mut self, parent: &str) -> Self {
        if !parent.is_empty() {
            self.field = if self.field.is_empty() {
                parent.to_string()
            } else if self.field.starts_with('[') {
                format!("{parent}{}", self.field)
            } else {
                format!("{parent}.{}", self.field)
            };
        }
        self
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.description)
    }
}

/// An accumulator of violations, so validation reports every problem at once.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Violations(Vec<Violation>);

impl Violations {
    /// No violations yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a violation at `path`.
    pub fn add(&mut self, path: &FieldPath, description: impl Into<String>) {
        self.0.push(Violation::new(path.to_string(), description));
    }

    /// Records a ready-made violation.
    pub fn push(&mut self, violation: Violation) {
        self.0.push(violation);
    }

    /// The value of `checked`, or `None` with its violation recorded: checks run one after another
    /// and the request is refused once, with every violation.
    pub fn take<T>(&mut self, checked: Result<T, Violation>) -> Option<T> {
        checked.map_err(|v| self.0.push(v)).ok()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Number of violations.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// `Ok(value)` when empty, the violations otherwise.
    pub fn into_result<T>(self, value: T) -> Result<T, Vec<Violation>> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(self.0)
        }
    }

    /// The violations.
    pub fn into_vec(self) -> Vec<Violation> {
        self.0
    }

    /// Borrows the violations.
    pub fn as_slice(&self) -> &[Violation] {
        &self.0
    }
}

impl Extend<Violation> for Violations {
    fn extend<I: IntoIterator<Item = Violation>>(&mut self, iter: I) {
        self.0.extend(iter);
    }
}

/// A field path being built while walking a message: `workflow.steps[2].http.url`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldPath(String);

impl FieldPath {
    /// A path starting at a top-level request field (empty for the request itself).
    pub fn root(field: &str) -> Self {
        Self(field.to_string())
    }

    /// A child field.
    pub fn field(&self, name: &str) -> Self {
        if self.0.is_empty() {
            Self(name.to_string())
        } else {
            Self(format!("{}.{name}", self.0))
        }
    }

    /// An element of a repeated field.
    pub fn index(&self, i: usize) -> Self {
        Self(format!("{}[{i}]", self.0))
    }

    /// A value of a map field.
    pub fn key(&self, key: &str) -> Self {
        Self(format!("{}[{key:?}]", self.0))
    }

    /// The path as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn status(
    code: Code,
    message: String,
    reason: &str,
    metadata: HashMap<String, String>,
    details: ErrorDetails,
) -> Status {
    let mut details = details;
    let metadata: HashMap<String, String> = metadata
        .into_iter()
        .map(|(k, v)| (k, cut(&v, MAX_TEXT_CHARS).into_owned()))
        .collect();
    details.set_error_info(reason, DOMAIN, metadata);
    Status::with_error_details(code, cut(&message, MAX_MESSAGE_CHARS).into_owned(), details)
}

/// INVALID_ARGUMENT with one `BadRequest` field violation per problem.
pub fn invalid_argument(reason: &str, violations: &[Violation]) -> Status {
    let mut details = ErrorDetails::new();
    let mut bytes = 0;
    for (i, v) in violations.iter().enumerate() {
        let field = cut(&v.field, MAX_TEXT_CHARS);
        let description = cut(&v.description, MAX_TEXT_CHARS);
        bytes += field.len() + description.len();
        if bytes > MAX_VIOLATION_BYTES {
            details.add_bad_request_violation(
                "",
                format!("{} more violations not listed", violations.len() - i),
            );
            break;
        }
        details.add_bad_request_violation(field, description);
    }
    let message = match violations {
        [] => "invalid request".to_string(),
        [one] => format!("invalid request: {one}"),
        [first, rest @ ..] => format!("invalid request: {first} (and {} more)", rest.len()),
    };
    status(
        Code::InvalidArgument,
        message,
        reason,
        HashMap::new(),
        details,
    )
}

/// NOT_FOUND for a resource kind and id.
pub fn not_found(reason: &str, resource: &str, id: &str) -> Status {
    let id = echo(id);
    let metadata = HashMap::from([
        ("resource".to_string(), resource.to_string()),
        ("id".to_string(), id.to_string()),
    ]);
    status(
        Code::NotFound,
        format!("{resource} {id} not found"),
        reason,
        metadata,
        ErrorDetails::new(),
    )
}

/// ALREADY_EXISTS, e.g. a unique name taken.
pub fn already_exists(reason: &str, message: impl Into<String>) -> Status {
    status(
        Code::AlreadyExists,
        message.into(),
        reason,
        HashMap::new(),
        ErrorDetails::new(),
    )
}

/// ALREADY_EXISTS `NAME_TAKEN`: another resource of `kind` has the name.
pub fn name_taken(kind: &str, name: &str) -> Status {
    already_exists(
        "NAME_TAKEN",
        format!("a {kind} named `{name}` already exists"),
    )
}

/// ABORTED `STALE_ETAG`: the resource changed since the client read it.
pub fn stale_etag(kind: &str, id: &str) -> Status {
    aborted(
        "STALE_ETAG",
        format!("{kind} {id} changed since it was read; read it again and retry with the new etag"),
    )
}

/// ABORTED, e.g. a stale etag: read again and retry.
pub fn aborted(reason: &str, message: impl Into<String>) -> Status {
    status(
        Code::Aborted,
        message.into(),
        reason,
        HashMap::new(),
        ErrorDetails::new(),
    )
}

/// FAILED_PRECONDITION: the request is valid but the system is not in a state that allows it.
pub fn failed_precondition(reason: &str, message: impl Into<String>) -> Status {
    status(
        Code::FailedPrecondition,
        message.into(),
        reason,
        HashMap::new(),
        ErrorDetails::new(),
    )
}

/// RESOURCE_EXHAUSTED: a configured limit is reached; `retry_after` when waiting helps.
pub fn resource_exhausted(
    reason: &str,
    message: impl Into<String>,
    retry_after: Option<Duration>,
) -> Status {
    let mut details = ErrorDetails::new();
    if retry_after.is_some() {
        details.set_retry_info(retry_after);
    }
    status(
        Code::ResourceExhausted,
        message.into(),
        reason,
        HashMap::new(),
        details,
    )
}

/// UNAVAILABLE for a storage failure: transient from the client's point of view, so worth a retry.
/// The cause is logged, not sent.
pub fn storage(err: &dyn std::error::Error) -> Status {
    tracing::error!(error = %err, "storage error");
    let mut details = ErrorDetails::new();
    details.set_retry_info(Some(Duration::from_secs(1)));
    status(
        Code::Unavailable,
        "storage unavailable".to_string(),
        "STORAGE_UNAVAILABLE",
        HashMap::new(),
        details,
    )
}

/// INTERNAL for a broken invariant (a bug). The cause is logged, not sent.
pub fn internal(err: &dyn fmt::Display) -> Status {
    tracing::error!(error = %err, "internal error");
    status(
        Code::Internal,
        "internal error".to_string(),
        "INTERNAL",
        HashMap::new(),
        ErrorDetails::new(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_compose() {
        let p = FieldPath::root("workflow")
            .field("steps")
            .index(2)
            .field("http")
            .field("url");
        assert_eq!(p.as_str(), "workflow.steps[2].http.url");
        assert_eq!(FieldPath::root("").field("x").key("a").as_str(), "x[\"a\"]");
        assert_eq!(
            Violation::new("steps[0].id", "d").under("workflow").field,
            "workflow.steps[0].id"
        );
        assert_eq!(Violation::new("[3]", "d").under("items").field, "items[3]");
    }

    #[test]
    fn echoes_are_cut_short() {
        assert_eq!(echo("short"), "short");
        let long = "é".repeat(70_000);
        let echoed = echo(&long);
        assert_eq!(echoed.chars().count(), MAX_ECHO_CHARS + 1);
        assert!(echoed.ends_with('…'));
    }

    #[test]
    fn an_error_stays_small_whatever_its_input() {
        let huge = "x".repeat(70_000);
        let violations: Vec<Violation> = (0..1_000)
            .map(|i| Violation::new(format!("{huge}{i}"), huge.clone()))
            .collect();
        let status = invalid_argument("INVALID_WORKFLOW", &violations);
        for status in [&status, &not_found("WORKFLOW_NOT_FOUND", "workflow", &huge)] {
            let mut trailers = tonic::metadata::MetadataMap::new().into_headers();
            status.add_header(&mut trailers).expect("headers");
            let size: usize = trailers
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len())
                .sum();
            assert!(size < 12 * 1024, "{size} bytes of trailers");
        }
        let details = status.get_error_details();
        let bad = details.bad_request().expect("bad request");
        let last = bad.field_violations.last().expect("violations");
        assert!(last.description.ends_with("more violations not listed"));
    }

    #[test]
    fn invalid_argument_carries_every_violation_and_reason() {
        let status = invalid_argument(
            "INVALID_WORKFLOW",
            &[
                Violation::new("workflow.name", "is required"),
                Violation::new("workflow.steps", "is empty"),
            ],
        );
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let bad = details.bad_request().expect("bad request");
        assert_eq!(bad.field_violations.len(), 2);
        assert_eq!(bad.field_violations[0].field, "workflow.name");
        let info = details.error_info().expect("error info");
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            ("INVALID_WORKFLOW", DOMAIN)
        );
    }
}
