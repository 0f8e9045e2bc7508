//! Storage of executions, step attempts, events, signals and metrics.
//!
//! The engine writes through [`Store::commit`]: a batch of [`Commit`]s (from many executions) in one
//! transaction — group commit. Each commit is fenced by the execution's lease: if another replica took
//! the execution over, that commit is refused and the rest of the batch still lands.
//!
//! Reads are here; starting an execution is in `store/admission.rs`, the group commit in
//! `store/commit.rs` (with each backend's statements in `store/sqlite.rs` and
//! `store/postgres.rs`), leases in `store/leases.rs`, signals in `store/signals.rs`, and metrics
//! rows in `store/metric_rows.rs`.

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

mod admission;
mod commit;
pub mod entity;
mod leases;
mod metric_rows;
mod postgres;
mod signals;
mod sqlite;

pub use admission::active_statement;
use admission::*;
use commit::*;
use metric_rows::*;
pub use metric_rows::{Durations, quantile};

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
}

impl MetricsDelta {
    /// Adds `d`'s counts to these.
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
    /// The time commits stamp on their events and leases are judged by.
    clock: std::sync::Arc<dyn meshflow_kit::clock::Clock>,
}

impl Store {
    /// A store over a migrated database, on the system's clock.
    pub fn new(db: DatabaseConnection) -> Self {
        Self::with_clock(db, meshflow_kit::clock::system())
    }

    /// A store over a migrated database, reading the time from `clock`.
    pub fn with_clock(
        db: DatabaseConnection,
        clock: std::sync::Arc<dyn meshflow_kit::clock::Clock>,
    ) -> Self {
        Self {
            db,
            sqlite: Default::default(),
            postgres: Default::default(),
            clock,
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
    fn quantiles_are_observed_values_by_nearest_rank() {
        assert_eq!(quantile(&mut [], 0.5), None);
        let mut v = [900, 3, 40, 1, 3, 2500, 3, 40, 900, 900];
        assert_eq!(quantile(&mut v, 0.5), Some(40));
        assert_eq!(quantile(&mut v, 0.95), Some(2500));
        assert_eq!(
            quantile(&mut v, 0.99),
            Some(2500),
            "never above the maximum"
        );
        assert_eq!(quantile(&mut v, 0.1), Some(1));
        // 20 executions of 10 to 166 ms: the p95 and p99 are the slowest runs, not a bucket edge.
        let mut runs: Vec<i64> = (0..20)
            .map(|i| 10 + i * 8 + i64::from(i == 19) * 4)
            .collect();
        assert_eq!(runs.iter().max(), Some(&166));
        assert_eq!(quantile(&mut runs, 0.95), Some(154));
        assert_eq!(quantile(&mut runs, 0.99), Some(166));
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
        let first = next_metrics(None, "w", &delta, now);
        assert_eq!(
            (first.workflow_id.as_str(), first.step_id.as_str()),
            ("w", "get")
        );
        assert_eq!((first.total, first.completed, first.attempts), (0, 2, 3));
        let second = next_metrics(Some(first), "w", &delta, now);
        assert_eq!((second.completed, second.attempts), (4, 6));
    }
}
