//! On PostgreSQL, stores event payloads as `json` rather than `jsonb`.
//!
//! The log is written once and read back whole; nothing queries inside a payload. `jsonb` parsed
//! every payload into its binary form on insert and printed it again on every read; `json` only
//! checks the text and keeps it as written. In a FOR_EACH of 100 items, parsing JSON was the
//! largest part of PostgreSQL's time, and the payloads most of that JSON.
//!
//! Changing the type rewrites the table and resets the column's compression, so lz4 is set again
//! where the server offers it. SQLite stores JSON as text already.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// The payload column as `kind`, compressed with lz4 where the server offers it.
fn payload_as(kind: &str) -> String {
    format!(
        "ALTER TABLE execution_events ALTER COLUMN payload TYPE {kind} USING payload::{kind};
DO $$ BEGIN
    IF 'lz4' = ANY ((SELECT enumvals FROM pg_settings
                     WHERE name = 'default_toast_compression')::text[]) THEN
        ALTER TABLE execution_events ALTER COLUMN payload SET COMPRESSION lz4;
    END IF;
END $$;"
    )
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != sea_orm::DatabaseBackend::Postgres {
            return Ok(());
        }
        manager
            .get_connection()
            .execute_unprepared(&payload_as("json"))
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != sea_orm::DatabaseBackend::Postgres {
            return Ok(());
        }
        manager
            .get_connection()
            .execute_unprepared(&payload_as("jsonb"))
            .await?;
        Ok(())
    }
}
