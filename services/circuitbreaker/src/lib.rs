//! Circuit breakers (DESIGN §5): one per downstream service, shared by every replica through the
//! database. [`machine`] is the state machine, pure over (breaker, config, now, event); the store
//! persists it with compare-and-set on a version.

pub mod entity;
pub mod machine;
pub mod store;
pub mod window;

pub use machine::{Breaker, Call, Config, Decision, Outcome, Permit, Reason, State, Transition};
pub use store::{Store, StoreError, Stored};
