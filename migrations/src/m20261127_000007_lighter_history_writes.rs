//! On PostgreSQL, makes the rows the group commit writes cheaper to write.
//!
//! - Attempts and events no longer carry foreign keys to their execution. Every one is written by
//!   the statement that updates its execution's row under the lease fence (the rows of an execution
//!   whose fence failed are filtered out), so the row exists and is locked when they are inserted;
//!   the per-row referential check cost a seventh of PostgreSQL's time in a FOR_EACH of 100 items.
//!   Deleting executions (through their workflow) still deletes their attempts and events: a
//!   statement-level trigger does it with the deleted rows as a transition table.
//! - The JSON columns that grow with a step's data are compressed with lz4 where the server has it:
//!   pglz took a twentieth of PostgreSQL's time compressing a FOR_EACH's collected outputs.
//!
//! SQLite checks a foreign key with one lookup of a page the commit already holds, and compresses
//! nothing, so it keeps its schema.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// The JSON columns compressed with lz4, per table.
const COMPRESSED: &[(&str, &[&str])] = &[
    (
        "workflow_executions",
        &["input", "variables", "output", "error"],
    ),
    ("step_executions", &["input", "output", "error", "logs"]),
    ("execution_events", &["payload"]),
];

const DROP_KEYS: &str = "
ALTER TABLE step_executions DROP CONSTRAINT fk_step_executions_execution;
ALTER TABLE execution_events DROP CONSTRAINT fk_execution_events_execution;
CREATE FUNCTION meshflow_delete_execution_history() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM step_executions AS s USING gone WHERE s.execution_id = gone.id;
    DELETE FROM execution_events AS e USING gone WHERE e.execution_id = gone.id;
    RETURN NULL;
END $$;
CREATE TRIGGER workflow_executions_delete_history AFTER DELETE ON workflow_executions
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT
    EXECUTE FUNCTION meshflow_delete_execution_history();";

const RESTORE_KEYS: &str = "
DROP TRIGGER workflow_executions_delete_history ON workflow_executions;
DROP FUNCTION meshflow_delete_execution_history();
ALTER TABLE step_executions ADD CONSTRAINT fk_step_executions_execution
    FOREIGN KEY (execution_id) REFERENCES workflow_executions (id) ON DELETE CASCADE;
ALTER TABLE execution_events ADD CONSTRAINT fk_execution_events_execution
    FOREIGN KEY (execution_id) REFERENCES workflow_executions (id) ON DELETE CASCADE;";

/// `ALTER TABLE … SET COMPRESSION method` for every compressed column, run only when the server
/// offers lz4 (PostgreSQL 14 or later, built with it).
fn compression(method: &str) -> String {
    let alters: String = COMPRESSED
        .iter()
        .map(|(table, columns)| {
            let columns: Vec<String> = columns
                .iter()
                .map(|c| format!("ALTER COLUMN {c} SET COMPRESSION {method}"))
                .collect();
            format!("ALTER TABLE {table} {};\n", columns.join(", "))
        })
        .collect();
    format!(
        "DO $$ BEGIN
    IF 'lz4' = ANY ((SELECT enumvals FROM pg_settings
                     WHERE name = 'default_toast_compression')::text[]) THEN
{alters}    END IF;
END $$;"
    )
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != sea_orm::DatabaseBackend::Postgres {
            return Ok(());
        }
        let db = manager.get_connection();
        db.execute_unprepared(DROP_KEYS).await?;
        db.execute_unprepared(&compression("lz4")).await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != sea_orm::DatabaseBackend::Postgres {
            return Ok(());
        }
        let db = manager.get_connection();
        db.execute_unprepared(&compression("DEFAULT")).await?;
        db.execute_unprepared(RESTORE_KEYS).await?;
        Ok(())
    }
}
