//! A step attempt is keyed by its place, `(execution_id, step_path, attempt)`, not by its id.
//!
//! Every attempt row is written by a group commit, which already finds it by that unique key; the
//! id kept an index of its own only to be unique, and every commit wrote a page of it. The id stays
//! as a column (UUIDv7, unique as generated): attempts are still listed in id order, by execution.
//!
//! SQLite cannot change a table's key in place, so the table is rebuilt; PostgreSQL makes the unique
//! index of the place the primary key.

use sea_orm::DatabaseBackend;
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// The rebuild of `step_executions` on SQLite, its columns as SQLite stores them; `{id_key}` and
/// `{place_key}` hold the key clause, on the id or on the place.
const SQLITE_TABLE: &str = r#"CREATE TABLE "step_executions_rebuilt" ( "id" varchar NOT NULL{id_key},
    "execution_id" varchar NOT NULL, "step_id" varchar NOT NULL, "step_path" varchar NOT NULL,
    "step_type" varchar NOT NULL, "status" varchar NOT NULL, "attempt" integer NOT NULL,
    "input" jsonb_text NULL, "output" jsonb_text NULL, "error" jsonb_text NULL,
    "logs" jsonb_text NOT NULL, "start_time" timestamp_with_timezone_text NULL,
    "end_time" timestamp_with_timezone_text NULL, "duration_ms" integer NULL,
    "next_attempt_at" timestamp_with_timezone_text NULL,{place_key}
    FOREIGN KEY ("execution_id") REFERENCES "workflow_executions" ("id") ON DELETE CASCADE );
INSERT INTO "step_executions_rebuilt" ("id", "execution_id", "step_id", "step_path", "step_type",
    "status", "attempt", "input", "output", "error", "logs", "start_time", "end_time",
    "duration_ms", "next_attempt_at")
    SELECT "id", "execution_id", "step_id", "step_path", "step_type", "status", "attempt",
    "input", "output", "error", "logs", "start_time", "end_time", "duration_ms",
    "next_attempt_at" FROM "step_executions";
DROP TABLE "step_executions";
ALTER TABLE "step_executions_rebuilt" RENAME TO "step_executions";"#;

const PLACE_INDEX: &str = r#"CREATE UNIQUE INDEX "uq_step_executions_attempt"
    ON "step_executions" ("execution_id", "step_path", "attempt")"#;

const POSTGRES_UP: &str = "ALTER TABLE step_executions DROP CONSTRAINT step_executions_pkey;
ALTER TABLE step_executions ADD CONSTRAINT step_executions_pkey
    PRIMARY KEY USING INDEX uq_step_executions_attempt;";

const POSTGRES_DOWN: &str = "ALTER TABLE step_executions DROP CONSTRAINT step_executions_pkey;
ALTER TABLE step_executions ADD PRIMARY KEY (id);";

fn sqlite_table(keyed_by_place: bool) -> String {
    let (id_key, place_key) = if keyed_by_place {
        (
            "",
            r#" PRIMARY KEY ("execution_id", "step_path", "attempt"),"#,
        )
    } else {
        (" PRIMARY KEY", "")
    };
    SQLITE_TABLE
        .replace("{id_key}", id_key)
        .replace("{place_key}", place_key)
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    /// In one transaction on SQLite too: a rebuild cut short leaves the table as it was.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        match manager.get_database_backend() {
            DatabaseBackend::Postgres => db.execute_unprepared(POSTGRES_UP).await.map(drop),
            _ => db.execute_unprepared(&sqlite_table(true)).await.map(drop),
        }
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        match manager.get_database_backend() {
            DatabaseBackend::Postgres => {
                db.execute_unprepared(POSTGRES_DOWN).await?;
            }
            _ => {
                db.execute_unprepared(&sqlite_table(false)).await?;
            }
        }
        db.execute_unprepared(PLACE_INDEX).await.map(drop)
    }
}
