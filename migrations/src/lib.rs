//! meshflow's one schema, as an append-only log of migrations.
//!
//! A migration is never edited after it lands and never imports an entity: it states the tables in
//! sea-query terms so it means the same thing forever. Ids are UUIDv7 strings; free-form JSON lives in
//! JSON columns (jsonb on PostgreSQL, text on SQLite); enums are stored by their name.

pub use sea_orm_migration::prelude::MigratorTrait;
use sea_orm_migration::prelude::*;

mod m20261126_000001_create_workflows;
mod m20261126_000002_create_executions;
mod m20261126_000003_create_circuit_breakers;
mod m20261126_000004_create_webhooks;
mod m20261126_000005_drop_unused_step_indexes;
mod m20261126_000006_index_pending_signals;
mod m20261127_000007_lighter_history_writes;
mod m20261127_000008_event_payloads_as_json;
mod m20261127_000009_index_workflow_metrics_rows;
mod m20261127_000010_key_step_attempts_by_place;
mod m20261205_000011_keep_deleted_workflows;
mod m20261205_000012_drop_duration_histograms;
mod m20261205_000013_circuit_breaker_transitions;

/// Applies and reverts every migration in order.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261126_000001_create_workflows::Migration),
            Box::new(m20261126_000002_create_executions::Migration),
            Box::new(m20261126_000003_create_circuit_breakers::Migration),
            Box::new(m20261126_000004_create_webhooks::Migration),
            Box::new(m20261126_000005_drop_unused_step_indexes::Migration),
            Box::new(m20261126_000006_index_pending_signals::Migration),
            Box::new(m20261127_000007_lighter_history_writes::Migration),
            Box::new(m20261127_000008_event_payloads_as_json::Migration),
            Box::new(m20261127_000009_index_workflow_metrics_rows::Migration),
            Box::new(m20261127_000010_key_step_attempts_by_place::Migration),
            Box::new(m20261205_000011_keep_deleted_workflows::Migration),
            Box::new(m20261205_000012_drop_duration_histograms::Migration),
            Box::new(m20261205_000013_circuit_breaker_transitions::Migration),
        ]
    }
}

/// A named index on `table(columns)`.
pub(crate) fn index<T, C>(
    name: &str,
    table: T,
    columns: impl IntoIterator<Item = C>,
) -> IndexCreateStatement
where
    T: IntoIden,
    C: IntoIden,
{
    let mut stmt = Index::create();
    stmt.name(name).table(table);
    for column in columns {
        stmt.col(column);
    }
    stmt.to_owned()
}
