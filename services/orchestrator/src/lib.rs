//! The orchestrator: durable executions of every step type, streamed live.
//!
//! - [`engine`]: starts and claims executions, keeps leases, streams events;
//! - [`driver`]: drives one execution by replaying its definition over stored attempts;
//! - [`steps`]: leaf step executors (HTTP, transform, function, validation, webhook);
//! - [`writer`] and [`hub`]: group commit, then live fan-out to watchers;
//! - [`thread`]: the thread the engine's tasks run on;
//! - [`retry`], [`ssrf`], [`eval`]: retry arithmetic, outbound address policy, expressions at run time.

pub mod driver;
pub mod engine;
pub mod error;
pub mod eval;
pub mod grpc;
pub mod hub;
pub mod retry;
pub use meshflow_kit::ssrf;
pub mod steps;
pub mod thread;
mod versions;
pub mod writer;

pub use engine::{Config, Engine};
pub use grpc::mount;
