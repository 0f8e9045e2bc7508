//! Starting executions: the insert that checks the workflow's head and admits the execution under
//! `--max-concurrent-executions` (advisory locks on PostgreSQL, the single writer on SQLite).

use super::*;

/// The SQLite path's insert, before a duplicate is looked up.
pub(super) enum InsertOutcome {
    Created,
    Duplicate,
    AtCapacity,
    Stale,
}

/// A workflow's `(status, current_version)`, if it exists, read through `c` (the inserting
/// transaction) with the workflow crate's statement.
pub(super) async fn read_head<C: ConnectionTrait>(
    c: &C,
    workflow_id: &str,
) -> Result<Option<(String, i64)>, StoreError> {
    Ok(meshflow_workflow::store::head::read(c, workflow_id).await?)
}

/// Whether a workflow row read as `(status, current_version)` still matches `head`.
pub(super) fn head_holds(read: Option<(String, i64)>, head: Head) -> bool {
    read.is_some_and(|(status, current)| {
        status == wpb::WorkflowStatus::Active.as_str_name()
            && head.current_version.is_none_or(|v| v == current)
    })
}

/// Number of executions that are not terminal: those started (the maintained `active` counters)
/// and those not yet started. One statement, so one snapshot: an execution that starts meanwhile is
/// counted once, as PENDING or as active.
pub(super) async fn active_in<C: ConnectionTrait>(c: &C) -> Result<u64, StoreError> {
    let backend = c.get_database_backend();
    let active: i64 = c
        .query_one_raw(Statement::from_string(backend, active_statement(backend)))
        .await?
        .map(|row| row.try_get_by_index(0))
        .transpose()?
        .unwrap_or(0);
    Ok(u64::try_from(active).unwrap_or(0))
}

/// The statement [`active_in`] runs on `backend`: it reads each workflow's own metrics row through
/// a partial index, never the rows of its steps. Public so tests can check its plan.
pub fn active_statement(backend: DbBackend) -> &'static str {
    match backend {
        DbBackend::Postgres => ACTIVE_POSTGRES,
        _ => sqlite::ACTIVE,
    }
}

/// How a start is admitted under the concurrency limit.
///
/// On PostgreSQL, starts through other connections and other servers are not visible to a start's
/// count until they commit, so starts hold transaction-scoped advisory locks (per database).
/// Normally a start holds the admission lock shared and one of [`ADMISSION_SLOTS`] slot locks, so
/// no more starts than slots are in flight at once, and it is admitted only if the executions it
/// counts plus every slot stay within the limit. Of the starts admitted so, the one that counted
/// last saw each of the others either committed or holding a slot. Near the limit, or with every
/// slot taken, a start retries with the admission lock exclusive, which waits for the starts in
/// flight and counts exactly. No statement reads `pg_locks`, which would stall every lock taken in
/// the cluster while it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admission {
    /// No other writer (an in-memory SQLite database).
    Unlocked,
    Shared,
    Exclusive,
}

/// Starts admitted at once without the exclusive lock.
pub(super) const ADMISSION_SLOTS: u64 = 64;

/// Takes the admission lock (key `mflw`, 1) shared, then the first free slot lock (`mflw`, 2 on)
/// from a random one on; returns the slot, or NULL when all are taken. The slot search is a
/// subquery correlated with the shared lock's result, so it runs once that lock is held.
pub(super) static ADMISSION_SHARED: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let n = ADMISSION_SLOTS;
    format!(
        "SELECT (SELECT s % {n} FROM generate_series(r.first, r.first + {n} - 1) AS s
            WHERE pg_try_advisory_xact_lock(1835428983, 2 + s % {n}) LIMIT 1)
        FROM (SELECT pg_advisory_xact_lock_shared(1835428983, 1)::text AS held,
            floor(random() * {n})::int AS first OFFSET 0) AS r WHERE r.held IS NOT NULL"
    )
});

/// Takes the admission lock exclusive: waits for every start in flight.
pub(super) const ADMISSION_EXCLUSIVE: &str = "SELECT pg_advisory_xact_lock(1835428983, 1)";

/// [`sqlite::ACTIVE`] in PostgreSQL's terms.
pub(super) const ACTIVE_POSTGRES: &str = "SELECT CAST((SELECT COALESCE(SUM(GREATEST(active, 0)), 0)
    FROM orchestration_metrics WHERE step_id = '') + (SELECT COUNT(*) FROM workflow_executions
    WHERE status = 'EXECUTION_STATUS_PENDING') AS BIGINT)";

impl Store {
    /// Inserts a new execution's row (see [`NewExecution::row`]), unless its `request_id` was used
    /// before (the existing execution is returned) or `max_active` executions are active already
    /// (nothing is written; checked in the inserting transaction).
    pub async fn insert_execution(
        &self,
        row: execution::Model,
        max_active: u64,
        head: Head,
    ) -> Result<Inserted, StoreError> {
        if let Some(rid) = &row.request_id
            && let Some(existing) = self.execution_by_request(rid).await?
        {
            return Ok(Inserted::Existing(existing));
        }
        // The start is counted in the metrics by the commit that takes the execution out of
        // PENDING, so nothing here locks the workflow's metrics row.
        let outcome = match self.sqlite_writer().await? {
            Some(writer) => {
                on_writer(&writer, |w| {
                    sqlite::insert_execution(w, &row, max_active, head)
                })
                .await?
            }
            None => {
                let first = if self.db.get_database_backend() == DbBackend::Postgres {
                    Admission::Shared
                } else {
                    Admission::Unlocked
                };
                match self.admit(&row, max_active, head, first).await? {
                    Some(outcome) => outcome,
                    // Within reach of the limit: counted again, alone.
                    None => self
                        .admit(&row, max_active, head, Admission::Exclusive)
                        .await?
                        .ok_or_else(|| {
                            StoreError::Corrupt("an exclusive admission deferred".into())
                        })?,
                }
            }
        };
        match outcome {
            InsertOutcome::Created => Ok(Inserted::Created(row)),
            InsertOutcome::AtCapacity => Ok(Inserted::AtCapacity),
            InsertOutcome::Stale => Ok(Inserted::Stale),
            InsertOutcome::Duplicate => {
                // Started concurrently with the same request id: that execution is the answer.
                let existing = match &row.request_id {
                    Some(rid) => self.execution_by_request(rid).await?,
                    None => None,
                };
                existing
                    .map(Inserted::Existing)
                    .ok_or_else(|| StoreError::Corrupt(format!("execution {} exists", row.id)))
            }
        }
    }

    /// Inserts an execution's row in one transaction if fewer than `max_active` executions are
    /// active, under `admission`'s lock. `None`: a shared admission found the limit within reach of
    /// the starts in flight and took nothing; the caller retries exclusively.
    pub(super) async fn admit(
        &self,
        row: &execution::Model,
        max_active: u64,
        head: Head,
        admission: Admission,
    ) -> Result<Option<InsertOutcome>, StoreError> {
        let txn = self.db.begin().await?;
        let postgres = |sql: &str| Statement::from_string(DbBackend::Postgres, sql);
        let in_flight = match admission {
            Admission::Unlocked => 0,
            Admission::Exclusive => {
                txn.execute_raw(postgres(ADMISSION_EXCLUSIVE)).await?;
                0
            }
            Admission::Shared => {
                let slot: Option<i32> = txn
                    .query_one_raw(postgres(&ADMISSION_SHARED))
                    .await?
                    .map(|row| row.try_get_by_index(0))
                    .transpose()?
                    .flatten();
                if slot.is_none() {
                    // As many starts in flight as there are slots: this one waits its turn.
                    txn.rollback().await?;
                    return Ok(None);
                }
                ADMISSION_SLOTS - 1
            }
        };
        let active = active_in(&txn).await?;
        if active + in_flight >= max_active {
            // Released now, not when the connection is next used: an exclusive retry waits for it.
            txn.rollback().await?;
            return Ok((admission != Admission::Shared || active >= max_active)
                .then_some(InsertOutcome::AtCapacity));
        }
        if !head_holds(read_head(&txn, &row.workflow_id).await?, head) {
            txn.rollback().await?;
            return Ok(Some(InsertOutcome::Stale));
        }
        let model = sea_orm::ActiveModelTrait::reset_all(execution::ActiveModel::from(row.clone()));
        match execution::Entity::insert(model)
            .exec_without_returning(&txn)
            .await
        {
            Err(err) if meshflow_kit::db::is_unique_violation(&err) => {
                txn.rollback().await?;
                Ok(Some(InsertOutcome::Duplicate))
            }
            Err(err) => {
                txn.rollback().await?;
                Err(err.into())
            }
            Ok(_) => {
                txn.commit().await?;
                Ok(Some(InsertOutcome::Created))
            }
        }
    }

    /// A workflow's status and current version (its head), if it exists: what a start checks, and
    /// what its insert checks again.
    pub async fn workflow_head(
        &self,
        workflow_id: &str,
    ) -> Result<Option<(wpb::WorkflowStatus, i64)>, StoreError> {
        let read = match self.sqlite().await? {
            // The point-read connection's page cache starts over after every commit; an idle
            // writer's still holds the pages, so it reads in a fraction of the time.
            Some(s) => match s.writer.try_lock().map(|w| w.head(workflow_id)) {
                Ok(Err(e)) if !sqlite::is_busy(&e) => return Err(e),
                Ok(Ok(head)) => head,
                // Busy or not idle: the point-read connection waits for a checkpoint if need be.
                _ => s.reader.head(workflow_id)?,
            },
            None => read_head(&self.db, workflow_id).await?,
        };
        Ok(read.map(|(status, current)| {
            let status = wpb::WorkflowStatus::from_str_name(&status)
                .unwrap_or(wpb::WorkflowStatus::Unspecified);
            (status, current)
        }))
    }
}
