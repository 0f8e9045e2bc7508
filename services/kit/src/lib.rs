//! The chassis every meshflow server stands on.
//!
//! - [`config`]: one typed configuration (defaults, then `MESHFLOW_*` environment, then flags);
//! - [`db`]: connect to SQLite or PostgreSQL and migrate at start;
//! - [`telemetry`]: logs (pretty or JSON) and OTLP traces when `OTEL_EXPORTER_OTLP_ENDPOINT` is set;
//! - [`server`]: the tonic server with health, reflection, tower layers and graceful shutdown;
//! - [`error`]: the one way a service error becomes a `tonic::Status` with `google.rpc` details;
//! - [`convert`], [`page`], [`id`], [`name`], [`request`]: small shared helpers for the gRPC adapters.

pub mod clock;
pub mod config;
pub mod convert;
pub mod db;
pub mod error;
pub mod id;
pub mod name;
pub mod page;
pub mod request;
pub mod server;
pub mod ssrf;
pub mod telemetry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use config::{Limits, ServerConfig};
pub use error::{FieldPath, Violation, Violations};
