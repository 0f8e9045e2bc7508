//! Outbound webhooks (DESIGN §6): the subscriptions of WebhookService, the Standard Webhooks
//! signature, and [`Endpoint`]s, the registered destinations WEBHOOK_CALL steps deliver to.
//!
//! Other crates reach webhooks through this crate's API ([`Store::endpoint`], [`signature`]), never
//! through its tables.

pub mod delivery;
pub mod entity;
pub mod error;
pub mod grpc;
pub mod service;
pub mod signature;
pub mod store;

pub use error::Error;
pub use grpc::mount;
pub use service::Outbound;
pub use store::{Endpoint, Store};
