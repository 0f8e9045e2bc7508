//! Circuit breakers (DESIGN §5): one per downstream service, shared by every replica through the
//! database. [`machine`] is the state machine, pure over (breaker, config, now, event); the store
//! persists it with compare-and-set on a version.

pub mod convert;
pub mod entity;
pub mod error;
pub mod grpc;
pub mod machine;
pub mod service;
pub mod store;
pub mod watch;
pub mod window;

pub use error::Error;
pub use grpc::mount;
pub use machine::{Breaker, Call, Config, Decision, Outcome, Permit, Reason, State, Transition};
pub use service::Service;
pub use store::{Store, StoreError, Stored};
pub use watch::Hub;
