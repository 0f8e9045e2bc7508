//! A workflow's head — its status and current version — as another crate reads it inside a
//! transaction of its own: starting an execution checks, in the transaction that inserts it, that
//! the workflow is still ACTIVE at the version the start read. The statements are this crate's,
//! so the schema of `workflows` stays known here only.

use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};

/// The head statement for SQLite (`?1`: the workflow id); deleted workflows have none.
pub const SQLITE: &str =
    "SELECT status, current_version FROM workflows WHERE id = ?1 AND delete_time IS NULL";

/// The head statement for PostgreSQL (`$1`: the workflow id).
pub const POSTGRES: &str =
    "SELECT status, current_version FROM workflows WHERE id = $1 AND delete_time IS NULL";

/// A workflow's `(status name, current version)`, if it exists and is not deleted, read through
/// `c` (a transaction of the caller's, or any connection).
pub async fn read<C: ConnectionTrait>(
    c: &C,
    workflow_id: &str,
) -> Result<Option<(String, i64)>, DbErr> {
    let backend = c.get_database_backend();
    let sql = if backend == DbBackend::Postgres {
        POSTGRES
    } else {
        SQLITE
    };
    c.query_one_raw(Statement::from_sql_and_values(
        backend,
        sql,
        [workflow_id.into()],
    ))
    .await?
    .map(|r| Ok((r.try_get_by_index(0)?, r.try_get_by_index(1)?)))
    .transpose()
}
