//! Integration tests: the real server on 127.0.0.1:0 over real gRPC, on a new SQLite file per test or, when
//! `MESHFLOW_TEST_POSTGRES_URL` is set, on a fresh PostgreSQL database per test.

mod bad_input;
mod breakers;
mod chassis;
mod crash;
mod executions;
mod orchestrator;
mod process;
mod rules;
mod store;
mod support;
mod templates;
mod traces;
mod webhooks;
mod workflows;
