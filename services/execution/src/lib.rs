//! Execution records: executions, step attempts, the event log, signals and metrics; their storage
//! (written by the orchestrator, read by everyone) and the read-side ExecutionService.

pub mod convert;
pub mod error;
pub mod grpc;
pub mod service;
pub mod state;
pub mod store;

pub use error::Error;
pub use grpc::mount;
