//! Storage of executions, step attempts, events, signals and metrics.
//!
//! The engine writes through [`Store::commit`]: a batch of [`Commit`]s (from many executions) in one
//! transaction — group commit. Each commit is fenced by the execution's lease: if another replica took
//! the execution over, that commit is refused and the rest of the batch still lands.

use chrono::{DateTime, Utc};
use meshflow_kit::db::SelectUnique;
use meshflow_proto::execution::v1 as pb;
use meshflow_proto::workflow::v1 as wpb;
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict, QueryStatementBuilder};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, DbErr,
    EntityTrait, QueryFilter, QueryOrder, QuerySelect, Statement, TransactionTrait,
};
use serde_json::Value;

pub mod entity;
mod postgres;
mod sqlite;

use entity::{event, execution, metrics, signal, step};

/// A new execution to persist.
#[derive(Debug, Clone)]
pub struct NewExecution {
    /// UUIDv7.
    pub id: String,
    /// The workflow.
    pub workflow_id: String,
    /// The pinned version.
    pub workflow_version: i64,
    /// The input.
    pub input: Value,
    /// Variables (defaults overlaid with overrides).
    pub variables: Value,
    /// Idempotency key.
    pub request_id: Option<String>,
    /// When it times out.
    pub deadline_at: Option<DateTime<Utc>>,
    /// Creation time.
    pub now: DateTime<Utc>,
    /// The replica that will drive it at once, and until when it holds the lease.
    pub lease: Option<(String, DateTime<Utc>)>,
}

impl NewExecution {
    /// Its row, as [`Store::insert_execution`] writes it: PENDING, due at once, leased as given.
    pub fn row(self) -> execution::Model {
        execution::Model {
            id: self.id,
            workflow_id: self.workflow_id,
            workflow_version: self.workflow_version,
            status: pb::ExecutionStatus::Pending.as_str_name().to_string(),
            input: self.input,
            variables: self.variables,
            output: None,
            error: None,
            request_id: self.request_id,
            last_sequence: 0,
            lease_expires_at: self.lease.as_ref().map(|l| l.1),
            lease_owner: self.lease.map(|l| l.0),
            wake_at: Some(self.now),
            deadline_at: self.deadline_at,
            create_time: self.now,
            start_time: None,
            end_time: None,
            update_time: self.now,
        }
    }
}

/// What [`Store::insert_execution`] came to.
#[derive(Debug, Clone)]
pub enum Inserted {
    /// A new execution.
    Created(execution::Model),
    /// The execution started earlier with the same request id.
    Existing(execution::Model),
    /// `max_active` executions are active: nothing was written.
    AtCapacity,
    /// The workflow is no longer what the start read: not ACTIVE, or with another current version
    /// than the one expected. Nothing was written.
    Stale,
}

/// The workflow's head as a start read it, checked again by the transaction that inserts the
/// execution: a start never runs a version the workflow stopped pointing at, or a workflow paused
/// in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// The current version the execution runs; `None` when the start named its version.
    pub current_version: Option<i64>,
}

/// The SQLite path's insert, before a duplicate is looked up.
enum InsertOutcome {
    Created,
    Duplicate,
    AtCapacity,
    Stale,
}

/// The workflow's status and current version, read by the inserting transaction.
const HEAD_SQLITE: &str =
    "SELECT status, current_version FROM workflows WHERE id = ?1 AND delete_time IS NULL";
const HEAD_POSTGRES: &str =
    "SELECT status, current_version FROM workflows WHERE id = $1 AND delete_time IS NULL";

/// A workflow's `(status, current_version)`, if it exists, read through `c`.
async fn read_head<C: ConnectionTrait>(
    c: &C,
    workflow_id: &str,
) -> Result<Option<(String, i64)>, StoreError> {
    let backend = c.get_database_backend();
    let sql = if backend == DbBackend::Postgres {
        HEAD_POSTGRES
    } else {
        HEAD_SQLITE
    };
    Ok(c.query_one_raw(Statement::from_sql_and_values(
        backend,
        sql,
        [workflow_id.into()],
    ))
    .await?
    .map(|r| -> Result<(String, i64), sea_orm::DbErr> {
        Ok((r.try_get_by_index(0)?, r.try_get_by_index(1)?))
    })
    .transpose()?)
}

/// Whether a workflow row read as `(status, current_version)` still matches `head`.
fn head_holds(read: Option<(String, i64)>, head: Head) -> bool {
    read.is_some_and(|(status, current)| {
        status == wpb::WorkflowStatus::Active.as_str_name()
            && head.current_version.is_none_or(|v| v == current)
    })
}

/// Changes to an execution row; `None` leaves a column as it is.
#[derive(Debug, Clone, Default)]
pub struct ExecutionPatch {
    /// New status.
    pub status: Option<pb::ExecutionStatus>,
    /// Variables after the change.
    pub variables: Option<Value>,
    /// Output (on completion).
    pub output: Option<Value>,
    /// Error (on failure).
    pub error: Option<Value>,
    /// When the execution next needs attention (`Some(None)` clears it).
    pub wake_at: Option<Option<DateTime<Utc>>>,
    /// Start time.
    pub start_time: Option<DateTime<Utc>>,
    /// End time.
    pub end_time: Option<DateTime<Utc>>,
    /// Release the lease (terminal executions, parked executions).
    pub release_lease: bool,
}

/// One step attempt as written (inserted, or replacing the attempt at its place).
#[derive(Debug, Clone)]
pub struct StepRow {
    /// UUIDv7 of the attempt.
    pub id: String,
    /// Step id.
    pub step_id: String,
    /// Step path.
    pub step_path: String,
    /// Step type name (`STEP_TYPE_HTTP_REQUEST`, ...).
    pub step_type: String,
    /// Status.
    pub status: pb::StepStatus,
    /// Attempt from 1.
    pub attempt: i32,
    /// Resolved input.
    pub input: Option<Value>,
    /// Output.
    pub output: Option<Value>,
    /// Error.
    pub error: Option<Value>,
    /// Log lines.
    pub logs: Value,
    /// Start.
    pub start_time: Option<DateTime<Utc>>,
    /// End.
    pub end_time: Option<DateTime<Utc>>,
    /// When the next attempt is due.
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// Atomic changes of one execution: the row, attempts, events, a consumed signal.
#[derive(Debug, Clone)]
pub struct Commit {
    /// The execution.
    pub execution_id: String,
    /// The workflow (for metrics).
    pub workflow_id: String,
    /// The lease holder writing; the commit is refused if it no longer holds the lease.
    pub owner: String,
    /// Changes to the execution row.
    pub patch: ExecutionPatch,
    /// Attempts to insert or replace.
    pub steps: Vec<StepRow>,
    /// Events to append, in sequence order.
    pub events: Vec<pb::ExecutionEvent>,
    /// A signal consumed by a step path.
    pub consume_signal: Option<(String, String)>,
    /// Metric increments.
    pub metrics: Vec<MetricsDelta>,
}

/// Increments of one metrics row.
#[derive(Debug, Clone, Default)]
pub struct MetricsDelta {
    /// `""` for the workflow, else a step id.
    pub step_id: String,
    /// Executions started.
    pub total: i64,
    /// Active executions (+1 on start, -1 on end).
    pub active: i64,
    /// Completed (executions) or succeeded (steps).
    pub completed: i64,
    /// Failed.
    pub failed: i64,
    /// Cancelled.
    pub cancelled: i64,
    /// Timed out.
    pub timed_out: i64,
    /// Skipped steps.
    pub skipped: i64,
    /// Step attempts.
    pub attempts: i64,
    /// A duration to record, in milliseconds.
    pub duration_ms: Option<i64>,
}

impl MetricsDelta {
    /// Adds `d`'s counts to these (not its duration: the caller keeps those).
    fn add(&mut self, d: &MetricsDelta) {
        self.total += d.total;
        self.active += d.active;
        self.completed += d.completed;
        self.failed += d.failed;
        self.cancelled += d.cancelled;
        self.timed_out += d.timed_out;
        self.skipped += d.skipped;
        self.attempts += d.attempts;
    }
}

/// Outcome of one commit of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Written.
    Done,
    /// The writer no longer holds the lease; nothing was written for this execution.
    LeaseLost,
}

/// Filters of [`Store::list_executions`].
#[derive(Debug, Clone, Default)]
pub struct ExecutionFilter {
    /// Only this workflow.
    pub workflow_id: Option<String>,
    /// Only these statuses.
    pub statuses: Vec<pb::ExecutionStatus>,
    /// Created at or after.
    pub from: Option<DateTime<Utc>>,
    /// Created before.
    pub to: Option<DateTime<Utc>>,
    /// Oldest first (else newest first).
    pub oldest_first: bool,
}

/// Storage errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbErr),
    /// The embedded database failed (the SQLite write path).
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// A stored value does not decode.
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

/// Histogram bucket upper bounds in milliseconds (log scale; the last bucket is open).
pub const BUCKETS_MS: &[i64] = &[
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000, 300_000,
    1_800_000, 3_600_000, 86_400_000,
];

fn bucket_of(ms: i64) -> usize {
    BUCKETS_MS
        .iter()
        .position(|b| ms <= *b)
        .unwrap_or(BUCKETS_MS.len())
}

/// The histogram of `durations` (milliseconds): a count per bucket of [`BUCKETS_MS`], and one for
/// longer ones.
fn histogram_of(durations: &[i64]) -> Vec<i64> {
    let mut histogram = vec![0; BUCKETS_MS.len() + 1];
    for ms in durations {
        histogram[bucket_of(*ms)] += 1;
    }
    histogram
}

/// The `q` quantile (0..1) of a histogram, as the upper bound of its bucket, in milliseconds.
pub fn quantile_ms(histogram: &[i64], q: f64) -> Option<i64> {
    let total: i64 = histogram.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as i64;
    let mut seen = 0;
    for (i, n) in histogram.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(
                BUCKETS_MS
                    .get(i)
                    .copied()
                    .unwrap_or(*BUCKETS_MS.last().unwrap_or(&0) * 2),
            );
        }
    }
    None
}

/// The connection of the SQLite write path, opened on first use.
type SqliteWriter = std::sync::Arc<tokio::sync::Mutex<sqlite::Writer>>;

/// The connections of a SQLite file's own paths: the writer's, and one for the point reads a
/// start or a parking driver makes (see [`sqlite::Reader`]).
struct Sqlite {
    writer: SqliteWriter,
    reader: sqlite::Reader,
}

/// The execution store.
#[derive(Clone)]
pub struct Store {
    db: DatabaseConnection,
    sqlite: std::sync::Arc<tokio::sync::OnceCell<Option<Sqlite>>>,
    postgres: std::sync::Arc<std::sync::OnceLock<postgres::Writer>>,
}

impl Store {
    /// A store over a migrated database.
    pub fn new(db: DatabaseConnection) -> Self {
        Self {
            db,
            sqlite: Default::default(),
            postgres: Default::default(),
        }
    }

    /// The writer's own PostgreSQL connection (see [`postgres::Writer`]).
    fn postgres_writer(&self) -> &postgres::Writer {
        self.postgres
            .get_or_init(|| postgres::Writer::new(self.db.get_postgres_connection_pool()))
    }

    /// The writer's own connection when the database is a SQLite file; `None` for PostgreSQL and
    /// in-memory SQLite (whose one pooled connection is the whole database).
    async fn sqlite_writer(&self) -> Result<Option<SqliteWriter>, StoreError> {
        Ok(self.sqlite().await?.map(|s| s.writer.clone()))
    }

    /// The connection for point reads when the database is a SQLite file.
    async fn sqlite_reader(&self) -> Result<Option<&sqlite::Reader>, StoreError> {
        Ok(self.sqlite().await?.map(|s| &s.reader))
    }

    async fn sqlite(&self) -> Result<Option<&Sqlite>, StoreError> {
        self.sqlite
            .get_or_try_init(|| async {
                if self.db.get_database_backend() != DbBackend::Sqlite {
                    return Ok(None);
                }
                let options = self.db.get_sqlite_connection_pool().connect_options();
                let path = options.get_filename();
                if !path.is_file() {
                    return Ok(None);
                }
                let synchronous = self
                    .db
                    .query_one_raw(Statement::from_string(
                        DbBackend::Sqlite,
                        "PRAGMA synchronous",
                    ))
                    .await?
                    .and_then(|row| row.try_get_by_index::<i32>(0).ok())
                    .unwrap_or(1);
                let mode = if synchronous >= 2 { "FULL" } else { "NORMAL" };
                let conn = sqlite::open(path, mode)?;
                Ok(Some(Sqlite {
                    writer: std::sync::Arc::new(tokio::sync::Mutex::new(conn)),
                    reader: sqlite::Reader::open(path)?,
                }))
            })
            .await
            .map(Option::as_ref)
    }

    /// The connection.
    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

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
    async fn admit(
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

    /// The ids of a workflow's executions that have not ended, oldest first.
    pub async fn active_of(&self, workflow_id: &str) -> Result<Vec<String>, StoreError> {
        use meshflow_proto::execution::v1::ExecutionStatus as S;
        let active = [S::Pending, S::Running, S::Waiting].map(|s| s.as_str_name());
        Ok(execution::Entity::find()
            .select_only()
            .column(execution::Column::Id)
            .filter(execution::Column::WorkflowId.eq(workflow_id))
            .filter(execution::Column::Status.is_in(active))
            .order_by_asc(execution::Column::Id)
            .into_tuple::<String>()
            .all(&self.db)
            .await?)
    }

    /// The execution started with `request_id`, if any.
    pub async fn execution_by_request(
        &self,
        request_id: &str,
    ) -> Result<Option<execution::Model>, StoreError> {
        Ok(execution::Entity::find()
            .filter(execution::Column::RequestId.eq(request_id))
            .unique(&self.db)
            .await?)
    }

    /// Reads an execution row.
    pub async fn execution(&self, id: &str) -> Result<Option<execution::Model>, StoreError> {
        Ok(execution::Entity::find_by_id(id.to_string())
            .unique(&self.db)
            .await?)
    }

    /// Lists executions by id (time order), after the cursor id, at most `limit`.
    pub async fn list_executions(
        &self,
        filter: &ExecutionFilter,
        after: Option<&str>,
        limit: u64,
    ) -> Result<Vec<execution::Model>, StoreError> {
        let mut query = execution::Entity::find().limit(limit);
        query = if filter.oldest_first {
            query.order_by_asc(execution::Column::Id)
        } else {
            query.order_by_desc(execution::Column::Id)
        };
        if let Some(after) = after {
            query = if filter.oldest_first {
                query.filter(execution::Column::Id.gt(after))
            } else {
                query.filter(execution::Column::Id.lt(after))
            };
        }
        if let Some(w) = &filter.workflow_id {
            query = query.filter(execution::Column::WorkflowId.eq(w.as_str()));
        }
        if !filter.statuses.is_empty() {
            query = query.filter(
                execution::Column::Status.is_in(filter.statuses.iter().map(|s| s.as_str_name())),
            );
        }
        if let Some(from) = filter.from {
            query = query.filter(execution::Column::CreateTime.gte(from));
        }
        if let Some(to) = filter.to {
            query = query.filter(execution::Column::CreateTime.lt(to));
        }
        Ok(query.all(&self.db).await?)
    }

    /// Every attempt of an execution in start order, after the cursor id, at most `limit`.
    pub async fn list_steps(
        &self,
        execution_id: &str,
        step_id: Option<&str>,
        after: Option<&str>,
        limit: u64,
    ) -> Result<Vec<step::Model>, StoreError> {
        let mut query = step::Entity::find()
            .filter(step::Column::ExecutionId.eq(execution_id))
            .order_by_asc(step::Column::Id)
            .limit(limit);
        if let Some(after) = after {
            query = query.filter(step::Column::Id.gt(after));
        }
        if let Some(step_id) = step_id {
            query = query.filter(step::Column::StepId.eq(step_id));
        }
        Ok(query.all(&self.db).await?)
    }

    /// Events with a sequence above `after`, in order, at most `limit`. Fewer than `limit` means
    /// there are no more (yet).
    pub async fn events_after(
        &self,
        execution_id: &str,
        after: i64,
        limit: u64,
    ) -> Result<Vec<pb::ExecutionEvent>, StoreError> {
        // A row holds a run of events (see [`EventRow`]): reading starts at the row holding event
        // `after + 1`, the last to start at or before it. Sequences have no gaps, so unless that
        // event is not written yet (and that row is the last), every row read holds an event past
        // `after`, and `limit` rows hold at least `limit` of them.
        let holding_next = sea_orm::sea_query::Query::select()
            .expr(event::Column::Sequence.max())
            .from(event::Entity)
            .and_where(event::Column::ExecutionId.eq(execution_id))
            .and_where(event::Column::Sequence.lte(after.saturating_add(1)))
            .to_owned();
        let start = sea_orm::sea_query::Func::coalesce([
            Expr::SubQuery(None, Box::new(holding_next.into_sub_query_statement())),
            Expr::val(after.saturating_add(1)),
        ]);
        let rows = event::Entity::find()
            .filter(event::Column::ExecutionId.eq(execution_id))
            .filter(Expr::col(event::Column::Sequence).gte(start))
            .order_by_asc(event::Column::Sequence)
            .limit(limit)
            .all(&self.db)
            .await?;
        let mut events = Vec::new();
        for row in rows {
            events.extend(from_stored(row)?.into_iter().filter(|e| e.sequence > after));
        }
        events.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        Ok(events)
    }

    /// Writes a batch of commits in one transaction. Commits of one execution are merged: one fenced
    /// update of its row (a replica that lost the lease writes nothing for it), then every attempt row
    /// and every event of the batch. The metric increments of the written commits, merged per
    /// workflow and step, go in the same transaction, so metrics are exact across crashes.
    ///
    /// Every event's `time` is set to the time of its commit, taken as late before the commit as
    /// each backend allows.
    pub async fn commit(&self, batch: &mut [Commit]) -> Result<Vec<CommitOutcome>, StoreError> {
        if let Some(writer) = self.sqlite_writer().await? {
            return on_writer(&writer, |w| sqlite::commit(w, batch)).await;
        }
        let now = commit_time();
        if self.db.get_database_backend() == DbBackend::Postgres {
            return postgres::commit(self.postgres_writer(), batch, now).await;
        }
        stamp(batch.iter_mut(), now);
        let txn = self.db.begin().await?;
        let mut outcomes = vec![CommitOutcome::Done; batch.len()];
        let mut written: Vec<&Commit> = Vec::new();
        let mut signals: Vec<(String, String)> = Vec::new();
        let mut metrics: Vec<(String, MetricsDelta, Vec<i64>)> = Vec::new();
        for (execution_id, members) in by_execution(batch) {
            let first = &batch[members[0]];
            if !fence(
                &txn,
                execution_id,
                &first.owner,
                members.iter().map(|&k| &batch[k]),
                now,
            )
            .await?
            {
                for k in members {
                    outcomes[k] = CommitOutcome::LeaseLost;
                }
                continue;
            }
            for &k in &members {
                let c = &batch[k];
                written.push(c);
                signals.extend(c.consume_signal.clone());
                for d in &c.metrics {
                    merge_into(&mut metrics, &c.workflow_id, d);
                }
            }
        }
        let steps: Vec<step::ActiveModel> = last_writes(written)
            .into_iter()
            .map(|(execution_id, r)| step_model(execution_id, r))
            .collect();
        if !steps.is_empty() {
            step::Entity::insert_many(steps)
                .on_conflict(
                    OnConflict::columns([
                        step::Column::ExecutionId,
                        step::Column::StepPath,
                        step::Column::Attempt,
                    ])
                    .update_columns([
                        step::Column::Status,
                        step::Column::Input,
                        step::Column::Output,
                        step::Column::Error,
                        step::Column::Logs,
                        step::Column::StartTime,
                        step::Column::EndTime,
                        step::Column::DurationMs,
                        step::Column::NextAttemptAt,
                    ])
                    .to_owned(),
                )
                .exec_without_returning(&txn)
                .await?;
        }
        let events = event_rows(batch, |k| outcomes[k] == CommitOutcome::Done)?
            .into_iter()
            .map(|r| event_model(r, now))
            .collect::<Result<Vec<_>, _>>()?;
        if !events.is_empty() {
            event::Entity::insert_many(events)
                .exec_without_returning(&txn)
                .await?;
        }
        for (signal_id, consumer) in signals {
            signal::Entity::update_many()
                .col_expr(signal::Column::ConsumedBy, Expr::value(consumer))
                .filter(signal::Column::Id.eq(signal_id))
                .exec(&txn)
                .await?;
        }
        for (workflow_id, delta, durations) in &metrics {
            upsert_metrics(&txn, workflow_id, delta, durations, now).await?;
        }
        txn.commit().await?;
        Ok(outcomes)
    }

    /// Ends the leases a server held before it restarted, so it takes those executions back at
    /// once: on SQLite every lease (one server drives a SQLite file, and it is starting), on
    /// PostgreSQL those of `owner` (this server's identity, when it is stable across restarts).
    /// Returns how many were ended.
    pub async fn reclaim_leases(&self, owner: &str) -> Result<u64, StoreError> {
        let statuses = &*UNFINISHED;
        let backend = self.db.get_database_backend();
        let (sql, values): (String, Vec<sea_orm::Value>) = if backend == DbBackend::Postgres {
            (
                format!(
                    "UPDATE workflow_executions SET lease_expires_at = $2 \
                     WHERE lease_owner = $1 AND status IN ({statuses})"
                ),
                vec![owner.into(), DateTime::<Utc>::UNIX_EPOCH.into()],
            )
        } else {
            (
                format!(
                    "UPDATE workflow_executions SET lease_expires_at = ?1 \
                     WHERE lease_owner IS NOT NULL AND status IN ({statuses})"
                ),
                vec![DateTime::<Utc>::UNIX_EPOCH.into()],
            )
        };
        Ok(self
            .db
            .execute_raw(Statement::from_sql_and_values(backend, sql, values))
            .await?
            .rows_affected())
    }

    /// Claims up to `limit` executions that need work, for `owner` until `until`: those due
    /// (`wake_at <= now`) whose lease is free or already `owner`'s, and those whose lease expired (a
    /// replica died while driving them). On PostgreSQL, rows another claimer has locked are skipped
    /// (`FOR UPDATE SKIP LOCKED`); SQLite serialises writers.
    pub async fn claim(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: u64,
    ) -> Result<Vec<String>, StoreError> {
        let backend = self.db.get_database_backend();
        if backend != DbBackend::Postgres {
            return self.claim_sqlite(owner, now, until, limit).await;
        }
        let sql = format!(
            "UPDATE workflow_executions SET lease_owner = $1, lease_expires_at = $2 WHERE id IN (\
               SELECT id FROM workflow_executions WHERE {} \
               ORDER BY id LIMIT {limit} FOR UPDATE SKIP LOCKED) RETURNING id",
            claimable("$1", "$3")
        );
        let values: Vec<sea_orm::Value> = vec![owner.into(), until.into(), now.into()];
        let rows = self
            .db
            .query_all_raw(Statement::from_sql_and_values(backend, sql, values))
            .await?;
        rows.iter()
            .map(|r| r.try_get::<String>("", "id").map_err(StoreError::from))
            .collect()
    }

    /// [`Self::claim`] on SQLite: the due executions are found by a read, through the indexes of
    /// wake-up and lease expiry (named: without statistics SQLite preferred the status index), and
    /// only those are updated. A write takes the database's one write lock, and the group commit
    /// waits for it: the single statement held it while it read every unfinished execution through
    /// the status index (about 5 ms with 10,000 parked, against 0.01 ms for this read), at every
    /// poll, whether or not any was due.
    async fn claim_sqlite(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: u64,
    ) -> Result<Vec<String>, StoreError> {
        let backend = DbBackend::Sqlite;
        // [`claimable`], one index per branch of its `OR`.
        let statuses = &*UNFINISHED;
        let due = format!(
            "SELECT id FROM workflow_executions INDEXED BY idx_workflow_executions_wake_at \
               WHERE wake_at <= ?2 AND status IN ({statuses}) \
               AND (lease_owner IS NULL OR lease_owner = ?1) \
             UNION SELECT id FROM workflow_executions INDEXED BY idx_workflow_executions_lease \
               WHERE lease_expires_at < ?2 AND lease_owner IS NOT NULL AND status IN ({statuses}) \
             ORDER BY id LIMIT {limit}"
        );
        let ids: Vec<String> = self
            .db
            .query_all_raw(Statement::from_sql_and_values(
                backend,
                due,
                [owner.into(), now.into()],
            ))
            .await?
            .iter()
            .map(|r| r.try_get::<String>("", "id"))
            .collect::<Result<_, _>>()?;
        if ids.is_empty() {
            return Ok(ids);
        }
        // The same conditions again, in the writing statement: another replica may have claimed
        // some of them since the read.
        let claim = format!(
            "UPDATE workflow_executions SET lease_owner = ?1, lease_expires_at = ?2 \
             WHERE id IN (SELECT value FROM json_each(?4)) AND {} RETURNING id",
            claimable("?1", "?3")
        );
        let rows = self
            .db
            .query_all_raw(Statement::from_sql_and_values(
                backend,
                claim,
                [
                    owner.into(),
                    until.into(),
                    now.into(),
                    json_text(&Value::from(ids))?.into(),
                ],
            ))
            .await?;
        rows.iter()
            .map(|r| r.try_get::<String>("", "id").map_err(StoreError::from))
            .collect()
    }

    /// Clears a wake-up that a running driver has been told about.
    pub async fn clear_wake(&self, execution_id: &str, owner: &str) -> Result<(), StoreError> {
        execution::Entity::update_many()
            .col_expr(
                execution::Column::WakeAt,
                Expr::value(Option::<DateTime<Utc>>::None),
            )
            .filter(execution::Column::Id.eq(execution_id))
            .filter(execution::Column::LeaseOwner.eq(owner))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// Extends until `until` the leases `owner` holds on `ids` (the executions it is driving).
    pub async fn renew(
        &self,
        owner: &str,
        ids: &[String],
        until: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let postgres = self.db.get_database_backend() == DbBackend::Postgres;
        let mut renewed = 0;
        for chunk in ids.chunks(500) {
            if postgres {
                // The rows are locked in id order, as the group commit locks them: locked in any
                // other order, a renewal and a commit could each hold a row the other waits for.
                let result = self
                    .db
                    .execute_raw(Statement::from_sql_and_values(
                        DbBackend::Postgres,
                        RENEW_POSTGRES,
                        [until.into(), owner.into(), chunk.to_vec().into()],
                    ))
                    .await?;
                renewed += result.rows_affected();
                continue;
            }
            let result = execution::Entity::update_many()
                .col_expr(execution::Column::LeaseExpiresAt, Expr::value(until))
                .filter(execution::Column::LeaseOwner.eq(owner))
                .filter(execution::Column::Id.is_in(chunk.iter().cloned()))
                .exec(&self.db)
                .await?;
            renewed += result.rows_affected;
        }
        Ok(renewed)
    }

    /// Takes the lease of one execution if it is free, expired, or already `owner`'s.
    pub async fn take_lease(
        &self,
        id: &str,
        owner: &str,
        until: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        use sea_orm::sea_query::Condition;
        let result = execution::Entity::update_many()
            .col_expr(execution::Column::LeaseOwner, Expr::value(owner))
            .col_expr(execution::Column::LeaseExpiresAt, Expr::value(until))
            .filter(execution::Column::Id.eq(id))
            .filter(
                Condition::any()
                    .add(execution::Column::LeaseOwner.is_null())
                    .add(execution::Column::LeaseOwner.eq(owner))
                    .add(execution::Column::LeaseExpiresAt.lt(Utc::now())),
            )
            .exec(&self.db)
            .await?;
        Ok(result.rows_affected == 1)
    }

    /// Records a signal for an execution; a repeated `request_id` records nothing. Wakes the execution.
    pub async fn add_signal(
        &self,
        execution_id: &str,
        name: &str,
        payload: Value,
        request_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let txn = self.db.begin().await?;
        let inserted = signal::Entity::insert(signal::ActiveModel {
            id: Set(meshflow_kit::id::new_id()),
            execution_id: Set(execution_id.to_string()),
            name: Set(name.to_string()),
            payload: Set(payload),
            request_id: Set(request_id.map(str::to_string)),
            receive_time: Set(now),
            consumed_by: Set(None),
        })
        .exec_without_returning(&txn)
        .await;
        match inserted {
            Err(err) if meshflow_kit::db::is_unique_violation(&err) => {
                return Ok(false);
            }
            other => {
                other?;
            }
        }
        execution::Entity::update_many()
            .col_expr(execution::Column::WakeAt, Expr::value(now))
            .filter(execution::Column::Id.eq(execution_id))
            .exec(&txn)
            .await?;
        txn.commit().await?;
        Ok(true)
    }

    /// Whether a signal with this `request_id` was already recorded for the execution.
    pub async fn signal_recorded(
        &self,
        execution_id: &str,
        request_id: &str,
    ) -> Result<bool, StoreError> {
        Ok(signal::Entity::find()
            .filter(signal::Column::ExecutionId.eq(execution_id))
            .filter(signal::Column::RequestId.eq(request_id))
            .unique(&self.db)
            .await?
            .is_some())
    }

    /// Whether any signal (a user signal or a cancellation) is waiting to be consumed.
    pub async fn has_pending_signal(&self, execution_id: &str) -> Result<bool, StoreError> {
        if let Some(reader) = self.sqlite_reader().await? {
            return reader.has_pending_signal(execution_id);
        }
        Ok(signal::Entity::find()
            .filter(signal::Column::ExecutionId.eq(execution_id))
            .filter(signal::Column::ConsumedBy.is_null())
            .one(&self.db)
            .await?
            .is_some())
    }

    /// The unconsumed signals of the executions `owner` holds the lease of, oldest first. Read from
    /// the index of pending signals, each checked against its execution's row.
    pub async fn signalled(&self, owner: &str) -> Result<Vec<signal::Model>, StoreError> {
        let backend = self.db.get_database_backend();
        let p = if backend == DbBackend::Postgres {
            "$1"
        } else {
            "?1"
        };
        let sql = format!(
            "SELECT s.* FROM execution_signals AS s \
             JOIN workflow_executions AS e ON e.id = s.execution_id \
             WHERE s.consumed_by IS NULL AND e.lease_owner = {p}"
        );
        // Sorted here: an ORDER BY would have SQLite walk every signal in id order instead.
        let mut signals = signal::Entity::find()
            .from_raw_sql(Statement::from_sql_and_values(backend, sql, [owner.into()]))
            .all(&self.db)
            .await?;
        signals.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(signals)
    }

    /// The oldest unconsumed signal of a name.
    pub async fn pending_signal(
        &self,
        execution_id: &str,
        name: &str,
    ) -> Result<Option<signal::Model>, StoreError> {
        Ok(signal::Entity::find()
            .filter(signal::Column::ExecutionId.eq(execution_id))
            .filter(signal::Column::Name.eq(name))
            .filter(signal::Column::ConsumedBy.is_null())
            .order_by_asc(signal::Column::Id)
            .one(&self.db)
            .await?)
    }

    /// Requests cancellation: wakes the execution so its driver sees it. The driver writes the outcome.
    pub async fn wake(&self, execution_id: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
        execution::Entity::update_many()
            .col_expr(execution::Column::WakeAt, Expr::value(now))
            .filter(execution::Column::Id.eq(execution_id))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// Metrics rows of a workflow (the workflow row has `step_id == ""`).
    pub async fn metrics(&self, workflow_id: &str) -> Result<Vec<metrics::Model>, StoreError> {
        Ok(metrics::Entity::find()
            .filter(metrics::Column::WorkflowId.eq(workflow_id))
            .order_by_asc(metrics::Column::StepId)
            .all(&self.db)
            .await?)
    }
}

/// Applies the merged row changes of one execution's commits, fenced by the lease; false when the
/// writer no longer holds it.
async fn fence<'a, C: ConnectionTrait>(
    txn: &C,
    execution_id: &str,
    owner: &str,
    commits: impl Iterator<Item = &'a Commit>,
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let p = merged_patch(commits);
    let mut update = execution::Entity::update_many()
        .col_expr(execution::Column::UpdateTime, Expr::value(now))
        .filter(execution::Column::Id.eq(execution_id))
        .filter(execution::Column::LeaseOwner.eq(owner));
    if let Some(status) = p.status {
        update = update.col_expr(execution::Column::Status, Expr::value(status.as_str_name()));
    }
    if let Some(v) = p.variables {
        update = update.col_expr(execution::Column::Variables, Expr::value(v.clone()));
    }
    if let Some(v) = p.output {
        update = update.col_expr(execution::Column::Output, Expr::value(v.clone()));
    }
    if let Some(v) = p.error {
        update = update.col_expr(execution::Column::Error, Expr::value(v.clone()));
    }
    if let Some(wake) = p.wake_at {
        update = update.col_expr(execution::Column::WakeAt, Expr::value(wake));
    }
    if let Some(t) = p.start_time {
        update = update.col_expr(execution::Column::StartTime, Expr::value(t));
    }
    if let Some(t) = p.end_time {
        update = update.col_expr(execution::Column::EndTime, Expr::value(t));
    }
    if let Some(seq) = p.last_sequence {
        update = update.col_expr(execution::Column::LastSequence, Expr::value(seq));
    }
    if p.release_lease {
        update = update
            .col_expr(
                execution::Column::LeaseOwner,
                Expr::value(Option::<String>::None),
            )
            .col_expr(
                execution::Column::LeaseExpiresAt,
                Expr::value(Option::<DateTime<Utc>>::None),
            );
    }
    Ok(update.exec(txn).await?.rows_affected > 0)
}

/// A time as text: as sqlx stores it in SQLite (so the SQLite path's rows compare and sort with the
/// pooled path's), and as PostgreSQL reads a `timestamptz`.
fn time_text(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false)
}

/// A JSON value as the text both write paths store.
fn json_text(v: &Value) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// The values of one metrics row (zero for a new row).
#[derive(Debug, Clone, Default, PartialEq)]
struct Counts {
    total: i64,
    active: i64,
    completed: i64,
    failed: i64,
    cancelled: i64,
    timed_out: i64,
    skipped: i64,
    attempts: i64,
    histogram: Vec<i64>,
}

impl Counts {
    /// The values of a stored row.
    fn of(m: &metrics::Model) -> Self {
        Self {
            total: m.total,
            active: m.active,
            completed: m.completed,
            failed: m.failed,
            cancelled: m.cancelled,
            timed_out: m.timed_out,
            skipped: m.skipped,
            attempts: m.attempts,
            histogram: serde_json::from_value(m.duration_histogram.clone()).unwrap_or_default(),
        }
    }

    /// These values with merged increments added, and `durations` added to the histogram bucket
    /// by bucket.
    fn plus(mut self, d: &MetricsDelta, durations: &[i64]) -> Self {
        self.histogram.resize(BUCKETS_MS.len() + 1, 0);
        for ms in durations {
            self.histogram[bucket_of(*ms)] += 1;
        }
        self.total += d.total;
        self.active += d.active;
        self.completed += d.completed;
        self.failed += d.failed;
        self.cancelled += d.cancelled;
        self.timed_out += d.timed_out;
        self.skipped += d.skipped;
        self.attempts += d.attempts;
        self
    }
}

/// The time a group commit stamps on its events: now, to the microsecond, the finest time every
/// backend stores, so an event read back from history equals the one sent live.
fn commit_time() -> DateTime<Utc> {
    use chrono::SubsecRound;
    Utc::now().trunc_subsecs(6)
}

/// Sets the time of every event to `at` in the commits of `batch` that `outcomes` marks written.
fn stamp_written(batch: &mut [Commit], outcomes: &[CommitOutcome], at: DateTime<Utc>) {
    stamp(
        batch
            .iter_mut()
            .zip(outcomes)
            .filter(|(_, o)| **o == CommitOutcome::Done)
            .map(|(c, _)| c),
        at,
    );
}

/// Sets the time of every event of `commits` to `at`.
fn stamp<'a>(commits: impl Iterator<Item = &'a mut Commit>, at: DateTime<Utc>) {
    let at = Some(meshflow_kit::convert::timestamp(at));
    for c in commits {
        for e in &mut c.events {
            e.time = at;
        }
    }
}

/// The executions of a batch in id order, each with the indexes of its commits in batch order.
///
/// In id order because on PostgreSQL every statement that locks several executions locks them in
/// id order (the fence follows this order), so two of them never wait for each other in a cycle.
fn by_execution(batch: &[Commit]) -> Vec<(&str, Vec<usize>)> {
    let mut order: Vec<usize> = (0..batch.len()).collect();
    // Stable: an execution's commits keep their batch order.
    order.sort_by(|&a, &b| batch[a].execution_id.cmp(&batch[b].execution_id));
    let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
    for k in order {
        let id = batch[k].execution_id.as_str();
        match groups.last_mut() {
            Some((last, members)) if *last == id => members.push(k),
            _ => groups.push((id, vec![k])),
        }
    }
    groups
}

/// The row changes of consecutive commits of one execution as one patch (later values win, the
/// start time is the first one), borrowing the commits' values, and the last event sequence among
/// them.
#[derive(Default)]
struct Merged<'a> {
    status: Option<pb::ExecutionStatus>,
    variables: Option<&'a Value>,
    output: Option<&'a Value>,
    error: Option<&'a Value>,
    wake_at: Option<Option<DateTime<Utc>>>,
    start_time: Option<DateTime<Utc>>,
    end_time: Option<DateTime<Utc>>,
    release_lease: bool,
    /// The sequence of the last event.
    last_sequence: Option<i64>,
}

impl Merged<'_> {
    /// Whether the change sets a column some index of the executions' table holds.
    fn indexed(&self) -> bool {
        self.status.is_some() || self.wake_at.is_some() || self.release_lease
    }
}

/// Merges the row changes of one execution's commits, taken in the order they were queued.
fn merged_patch<'a>(commits: impl Iterator<Item = &'a Commit>) -> Merged<'a> {
    let mut p = Merged::default();
    for c in commits {
        let q = &c.patch;
        p.status = q.status.or(p.status);
        p.variables = q.variables.as_ref().or(p.variables);
        p.output = q.output.as_ref().or(p.output);
        p.error = q.error.as_ref().or(p.error);
        p.wake_at = q.wake_at.or(p.wake_at);
        p.start_time = p.start_time.or(q.start_time);
        p.end_time = q.end_time.or(p.end_time);
        p.release_lease |= q.release_lease;
        p.last_sequence = c.events.last().map(|e| e.sequence).or(p.last_sequence);
    }
    p
}

/// The attempts `commits` write, each once, as the last commit to change it left it, in the order
/// they were first written. Every upsert of an attempt sets every column it changes, so writing
/// only the last is writing them all; and one PostgreSQL statement may touch a row only once.
/// Attempts are told apart by their place, the table's key.
fn last_writes<'a>(commits: impl IntoIterator<Item = &'a Commit>) -> Vec<(&'a str, &'a StepRow)> {
    let mut rows: Vec<(&str, &StepRow)> = Vec::new();
    let mut index: std::collections::HashMap<(&str, &str, i32), usize> =
        std::collections::HashMap::new();
    for c in commits {
        for r in &c.steps {
            let row = (c.execution_id.as_str(), r);
            match index.entry((row.0, r.step_path.as_str(), r.attempt)) {
                std::collections::hash_map::Entry::Occupied(at) => rows[*at.get()] = row,
                std::collections::hash_map::Entry::Vacant(at) => {
                    at.insert(rows.len());
                    rows.push(row);
                }
            }
        }
    }
    rows
}

fn duration_ms(s: &StepRow) -> Option<i64> {
    match (s.start_time, s.end_time) {
        (Some(a), Some(b)) => Some((b - a).num_milliseconds()),
        _ => None,
    }
}

fn event_type_name(e: &pb::ExecutionEvent) -> &'static str {
    pb::EventType::try_from(e.r#type)
        .unwrap_or_default()
        .as_str_name()
}

fn step_model(execution_id: &str, s: &StepRow) -> step::ActiveModel {
    step::ActiveModel {
        id: Set(s.id.clone()),
        execution_id: Set(execution_id.to_string()),
        step_id: Set(s.step_id.clone()),
        step_path: Set(s.step_path.clone()),
        step_type: Set(s.step_type.clone()),
        status: Set(s.status.as_str_name().to_string()),
        attempt: Set(s.attempt),
        input: Set(s.input.clone()),
        output: Set(s.output.clone()),
        error: Set(s.error.clone()),
        logs: Set(s.logs.clone()),
        start_time: Set(s.start_time),
        end_time: Set(s.end_time),
        duration_ms: Set(duration_ms(s)),
        next_attempt_at: Set(s.next_attempt_at),
    }
}

/// One stored row of events: the events of one execution that one group commit wrote, in order.
/// The row's sequence, type and step path are its first event's; its payload is a JSON array of
/// the events, each without its execution id and time, which the row's columns hold. Rows written
/// before events were grouped hold one event each, as a JSON object without any of the columns'
/// fields; [`from_stored`] reads both.
///
/// One row per commit and execution rather than per event: a step's commit writes about four
/// events, and each row costs its table and its key index an entry.
pub(crate) struct EventRow {
    pub execution_id: String,
    pub sequence: i64,
    pub event_type: &'static str,
    pub step_path: Option<String>,
    pub payload: String,
}

/// The event rows of the commits of `batch` that `written` keeps (by index): one per execution,
/// its commits' events in batch order. Each event is as it was after.
fn event_rows(
    batch: &mut [Commit],
    written: impl Fn(usize) -> bool,
) -> Result<Vec<EventRow>, StoreError> {
    let groups: Vec<(String, Vec<usize>)> = by_execution(batch)
        .into_iter()
        .map(|(id, members)| {
            let members = members.into_iter().filter(|&k| written(k)).collect();
            (id.to_string(), members)
        })
        .collect();
    let mut rows = Vec::with_capacity(groups.len());
    for (execution_id, members) in groups {
        let mut payload = Vec::new();
        let mut first: Option<(i64, &'static str, Option<String>)> = None;
        for k in members {
            for e in &mut batch[k].events {
                payload.push(if first.is_none() { b'[' } else { b',' });
                first.get_or_insert_with(|| {
                    (
                        e.sequence,
                        event_type_name(e),
                        Some(e.step_path.clone()).filter(|p| !p.is_empty()),
                    )
                });
                // The row's columns hold these.
                let kept = (std::mem::take(&mut e.execution_id), e.time.take());
                let serialized = serde_json::to_writer(&mut payload, &*e);
                (e.execution_id, e.time) = kept;
                serialized.map_err(|err| StoreError::Corrupt(err.to_string()))?;
            }
        }
        if let Some((sequence, event_type, step_path)) = first {
            payload.push(b']');
            rows.push(EventRow {
                execution_id,
                sequence,
                event_type,
                step_path,
                payload: String::from_utf8(payload)
                    .map_err(|err| StoreError::Corrupt(err.to_string()))?,
            });
        }
    }
    Ok(rows)
}

/// The events of a stored row: its payload with the fields its columns hold put back.
fn from_stored(r: event::Model) -> Result<Vec<pb::ExecutionEvent>, StoreError> {
    let corrupt = |what: String| {
        StoreError::Corrupt(format!("event {}#{}: {what}", r.execution_id, r.sequence))
    };
    let time = Some(meshflow_kit::convert::timestamp(r.time));
    match r.payload {
        Value::Array(items) => items
            .into_iter()
            .map(|item| {
                let mut e: pb::ExecutionEvent =
                    serde_json::from_value(item).map_err(|err| corrupt(err.to_string()))?;
                e.execution_id = r.execution_id.clone();
                e.time = time;
                Ok(e)
            })
            .collect(),
        payload => {
            let mut e: pb::ExecutionEvent =
                serde_json::from_value(payload).map_err(|err| corrupt(err.to_string()))?;
            e.r#type = pb::EventType::from_str_name(&r.event_type)
                .ok_or_else(|| corrupt(format!("unknown event type {}", r.event_type)))?
                as i32;
            e.execution_id = r.execution_id;
            e.sequence = r.sequence;
            e.time = time;
            e.step_path = r.step_path.unwrap_or_default();
            Ok(vec![e])
        }
    }
}

fn event_model(r: EventRow, time: DateTime<Utc>) -> Result<event::ActiveModel, StoreError> {
    Ok(event::ActiveModel {
        execution_id: Set(r.execution_id),
        sequence: Set(r.sequence),
        time: Set(time),
        event_type: Set(r.event_type.to_string()),
        step_path: Set(r.step_path),
        payload: Set(
            serde_json::from_str(&r.payload).map_err(|err| StoreError::Corrupt(err.to_string()))?
        ),
    })
}

/// Adds a delta into a list merged per (workflow, step id), collecting durations; returns the
/// place of the row it went into.
fn merge_into(
    merged: &mut Vec<(String, MetricsDelta, Vec<i64>)>,
    workflow_id: &str,
    d: &MetricsDelta,
) -> usize {
    let found = merged
        .iter()
        .position(|(w, m, _)| w == workflow_id && m.step_id == d.step_id);
    let slot = found.unwrap_or_else(|| {
        merged.push((
            workflow_id.to_string(),
            MetricsDelta {
                step_id: d.step_id.clone(),
                ..Default::default()
            },
            Vec::new(),
        ));
        merged.len() - 1
    });
    let (_, m, durations) = &mut merged[slot];
    m.add(d);
    durations.extend(d.duration_ms);
    slot
}

/// Number of executions that are not terminal: those started (the maintained `active` counters)
/// and those not yet started. One statement, so one snapshot: an execution that starts meanwhile is
/// counted once, as PENDING or as active.
async fn active_in<C: ConnectionTrait>(c: &C) -> Result<u64, StoreError> {
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

/// The statuses of executions that have not ended, as an SQL list.
static UNFINISHED: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    [
        pb::ExecutionStatus::Pending,
        pb::ExecutionStatus::Running,
        pb::ExecutionStatus::Waiting,
    ]
    .iter()
    .map(|s| format!("'{}'", s.as_str_name()))
    .collect::<Vec<_>>()
    .join(", ")
});

/// The condition under which `owner` may claim an execution at `now` (both placeholders): it has
/// not ended, and it is due (its wake-up has come, its lease free or `owner`'s) or abandoned (its
/// lease expired).
fn claimable(owner: &str, now: &str) -> String {
    format!(
        "status IN ({}) AND (\
           (wake_at IS NOT NULL AND wake_at <= {now} AND (lease_owner IS NULL OR lease_owner = {owner})) \
           OR (lease_owner IS NOT NULL AND lease_expires_at < {now}))",
        *UNFINISHED
    )
}

/// How long the SQLite writer waits for the write lock, as long as a pooled connection would.
const WRITER_BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long the SQLite writer retries at once, only yielding to the runtime, before it waits a
/// timer tick (a millisecond) between attempts. A pooled write holds the lock for a fraction of it.
const WRITER_BUSY_YIELDING: std::time::Duration = std::time::Duration::from_millis(1);

/// Runs `write` on the SQLite writer's connection, and again while it finds the write lock taken
/// (by a pooled connection, a checkpoint resetting the WAL, or another process). Between attempts
/// the runtime thread is free, so a pooled connection holding the lock can hand over its results
/// and finish: waiting inside SQLite's busy handler instead, a start on a single-threaded runtime
/// waited out the whole timeout behind a connection that was waiting for that thread. For the first
/// [`WRITER_BUSY_YIELDING`] the retries only yield, so the commit goes on as soon as the lock is
/// free; later ones wait a millisecond each.
async fn on_writer<T>(
    writer: &SqliteWriter,
    mut write: impl FnMut(&mut sqlite::Writer) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let began = std::time::Instant::now();
    loop {
        let result = write(&mut *writer.lock().await);
        match result {
            Err(e) if sqlite::is_busy(&e) && began.elapsed() < WRITER_BUSY_TIMEOUT => {
                if began.elapsed() < WRITER_BUSY_YIELDING {
                    tokio::task::yield_now().await;
                } else {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
            other => return other,
        }
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
enum Admission {
    /// No other writer (an in-memory SQLite database).
    Unlocked,
    Shared,
    Exclusive,
}

/// Starts admitted at once without the exclusive lock.
const ADMISSION_SLOTS: u64 = 64;

/// Takes the admission lock (key `mflw`, 1) shared, then the first free slot lock (`mflw`, 2 on)
/// from a random one on; returns the slot, or NULL when all are taken. The slot search is a
/// subquery correlated with the shared lock's result, so it runs once that lock is held.
static ADMISSION_SHARED: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let n = ADMISSION_SLOTS;
    format!(
        "SELECT (SELECT s % {n} FROM generate_series(r.first, r.first + {n} - 1) AS s
            WHERE pg_try_advisory_xact_lock(1835428983, 2 + s % {n}) LIMIT 1)
        FROM (SELECT pg_advisory_xact_lock_shared(1835428983, 1)::text AS held,
            floor(random() * {n})::int AS first OFFSET 0) AS r WHERE r.held IS NOT NULL"
    )
});
/// Takes the admission lock exclusive: waits for every start in flight.
const ADMISSION_EXCLUSIVE: &str = "SELECT pg_advisory_xact_lock(1835428983, 1)";

/// [`Store::renew`] on PostgreSQL: locks the rows in id order first.
const RENEW_POSTGRES: &str = "UPDATE workflow_executions SET lease_expires_at = $1
    WHERE id IN (SELECT id FROM workflow_executions WHERE id = ANY($3) AND lease_owner = $2
        ORDER BY id FOR UPDATE)";

/// [`sqlite::ACTIVE`] in PostgreSQL's terms.
const ACTIVE_POSTGRES: &str = "SELECT CAST((SELECT COALESCE(SUM(GREATEST(active, 0)), 0)
    FROM orchestration_metrics WHERE step_id = '') + (SELECT COUNT(*) FROM workflow_executions
    WHERE status = 'EXECUTION_STATUS_PENDING') AS BIGINT)";

/// A metrics row after adding merged increments to its current value (`None`: a new row).
fn next_metrics(
    current: Option<metrics::Model>,
    workflow_id: &str,
    d: &MetricsDelta,
    durations: &[i64],
    now: DateTime<Utc>,
) -> metrics::Model {
    let next = current
        .as_ref()
        .map(Counts::of)
        .unwrap_or_default()
        .plus(d, durations);
    metrics::Model {
        workflow_id: workflow_id.to_string(),
        step_id: d.step_id.clone(),
        total: next.total,
        active: next.active,
        completed: next.completed,
        failed: next.failed,
        cancelled: next.cancelled,
        timed_out: next.timed_out,
        skipped: next.skipped,
        attempts: next.attempts,
        duration_histogram: Value::from(next.histogram),
        update_time: now,
    }
}

async fn upsert_metrics<C: ConnectionTrait>(
    txn: &C,
    workflow_id: &str,
    d: &MetricsDelta,
    durations: &[i64],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let current = metrics::Entity::find_by_id((workflow_id.to_string(), d.step_id.clone()))
        .unique(txn)
        .await?;
    let m = next_metrics(current, workflow_id, d, durations, now);
    let model = metrics::ActiveModel {
        workflow_id: Set(m.workflow_id),
        step_id: Set(m.step_id),
        total: Set(m.total),
        active: Set(m.active),
        completed: Set(m.completed),
        failed: Set(m.failed),
        cancelled: Set(m.cancelled),
        timed_out: Set(m.timed_out),
        skipped: Set(m.skipped),
        attempts: Set(m.attempts),
        duration_histogram: Set(m.duration_histogram),
        update_time: Set(m.update_time),
    };
    metrics::Entity::insert(model)
        .on_conflict(
            OnConflict::columns([metrics::Column::WorkflowId, metrics::Column::StepId])
                .update_columns([
                    metrics::Column::Total,
                    metrics::Column::Active,
                    metrics::Column::Completed,
                    metrics::Column::Failed,
                    metrics::Column::Cancelled,
                    metrics::Column::TimedOut,
                    metrics::Column::Skipped,
                    metrics::Column::Attempts,
                    metrics::Column::DurationHistogram,
                    metrics::Column::UpdateTime,
                ])
                .to_owned(),
        )
        .exec_without_returning(txn)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(id: &str, path: &str, attempt: i32, status: pb::StepStatus) -> StepRow {
        StepRow {
            id: id.into(),
            step_id: path.into(),
            step_path: path.into(),
            step_type: "STEP_TYPE_DATA_TRANSFORM".into(),
            status,
            attempt,
            input: None,
            output: None,
            error: None,
            logs: Value::Array(Vec::new()),
            start_time: None,
            end_time: None,
            next_attempt_at: None,
        }
    }

    fn commit_of(execution_id: &str, steps: Vec<StepRow>) -> Commit {
        Commit {
            execution_id: execution_id.into(),
            workflow_id: "w".into(),
            owner: "me".into(),
            patch: ExecutionPatch::default(),
            steps,
            events: Vec::new(),
            consume_signal: None,
            metrics: Vec::new(),
        }
    }

    #[test]
    fn a_batch_writes_each_attempt_place_once_as_last_changed() {
        use pb::StepStatus::{Running, Succeeded};
        let batch = [
            commit_of("e1", vec![attempt("a", "keep", 1, Running)]),
            commit_of("e2", vec![attempt("b", "keep", 1, Running)]),
            // The same place under another id is the same row: the table is keyed by place.
            commit_of(
                "e1",
                vec![
                    attempt("c", "keep", 1, Succeeded),
                    attempt("d", "keep", 2, Running),
                ],
            ),
        ];
        let written: Vec<(&str, &str, i32, pb::StepStatus)> = last_writes(&batch)
            .into_iter()
            .map(|(e, r)| (e, r.id.as_str(), r.attempt, r.status))
            .collect();
        assert_eq!(
            written,
            [
                ("e1", "c", 1, Succeeded),
                ("e2", "b", 1, Running),
                ("e1", "d", 2, Running),
            ]
        );
    }

    #[test]
    fn histogram_quantiles() {
        let mut h = vec![0; BUCKETS_MS.len() + 1];
        assert_eq!(quantile_ms(&h, 0.5), None);
        for ms in [1, 3, 3, 3, 40, 40, 900, 900, 900, 2500] {
            h[bucket_of(ms)] += 1;
        }
        assert_eq!(quantile_ms(&h, 0.5), Some(50));
        assert_eq!(quantile_ms(&h, 0.95), Some(5_000));
        assert_eq!(quantile_ms(&h, 0.1), Some(1));
        assert_eq!(bucket_of(100_000_000), BUCKETS_MS.len());
    }

    #[test]
    fn metric_increments_add_to_a_stored_row_or_start_one() {
        let now = Utc::now();
        let delta = MetricsDelta {
            step_id: "get".into(),
            completed: 2,
            attempts: 3,
            ..Default::default()
        };
        let first = next_metrics(None, "w", &delta, &[3, 700], now);
        assert_eq!(
            (first.workflow_id.as_str(), first.step_id.as_str()),
            ("w", "get")
        );
        assert_eq!((first.total, first.completed, first.attempts), (0, 2, 3));
        let histogram: Vec<i64> =
            serde_json::from_value(first.duration_histogram.clone()).expect("histogram");
        assert_eq!(histogram.len(), BUCKETS_MS.len() + 1);
        assert_eq!((histogram[bucket_of(3)], histogram[bucket_of(700)]), (1, 1));

        let second = next_metrics(Some(first), "w", &delta, &[3], now);
        assert_eq!((second.completed, second.attempts), (4, 6));
        let histogram: Vec<i64> =
            serde_json::from_value(second.duration_histogram).expect("histogram");
        assert_eq!((histogram[bucket_of(3)], histogram[bucket_of(700)]), (2, 1));
        assert_eq!(histogram.iter().sum::<i64>(), 3);
    }
}
