//! Workflow definitions: the definition language (validation, CEL expressions, templates), the
//! stores of workflows, versions, templates and transformation rules, and their gRPC services.

pub mod error;
pub mod executions;
pub mod expr;
pub mod functions;
pub mod grpc;
pub mod service;
pub mod store;
pub mod transform;
pub mod validate;

pub use error::Error;
pub use executions::Executions;
pub use grpc::mount;
