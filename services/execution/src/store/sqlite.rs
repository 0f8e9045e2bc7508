//! Group commit on an embedded SQLite file, on a connection of its own.
//!
//! Every state change of every execution goes through [`super::Store::commit`], so its cost is the
//! engine's cost per step. Through the pooled driver each statement of a transaction is a round trip
//! to the connection's worker thread, and each batch shape a fresh prepare. Here the transaction runs
//! on the calling thread, statement by statement, each prepared once and cached for the life of the
//! connection. The statements write the same rows, in the same formats, as the pooled path (which
//! PostgreSQL and in-memory SQLite databases keep using), so either path reads what the other wrote.
//!
//! The connection waits out a competing writer in short sleeps, not SQLite's default steps of
//! milliseconds: the competing writes (a new execution, a lease) are short.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::entity::execution;
use super::{
    Commit, CommitOutcome, Counts, Head, InsertOutcome, MetricsDelta, StoreError,
    json_text as json, time_text as time,
};

/// The point-read connection's busy handler. A read waits only while a checkpoint resets the WAL.
fn busy(count: i32) -> bool {
    // About ten seconds in all, like the pooled connections' busy timeout.
    let (pause, limit) = if count < 100 {
        (Duration::from_micros(50), true)
    } else {
        (Duration::from_millis(1), count < 100 + 10_000)
    };
    if limit {
        std::thread::sleep(pause);
    }
    limit
}

/// The writer's connection, and the metric rows as it last wrote or read them.
pub(super) struct Writer {
    conn: Connection,
    metrics: Metrics,
}

/// Metric rows the writer knows, so a commit adds to them without reading them first. Valid while
/// no other connection has committed: `PRAGMA data_version`, read inside each write transaction,
/// changes when one has (a workflow deleted, another process on the same file), and the rows are
/// read again.
#[derive(Default)]
struct Metrics {
    version: i64,
    rows: HashMap<(String, String), Counts>,
}

/// Most metric rows kept: a row not kept is read again by the commit that next adds to it.
const METRICS_KEPT: usize = 4096;

impl Writer {
    /// A workflow's status and current version, if it exists.
    pub(super) fn head(&self, workflow_id: &str) -> Result<Option<(String, i64)>, StoreError> {
        Ok(head_in(&self.conn, workflow_id)?)
    }
}

/// Opens the writer's connection to the database file at `path` (migrated already).
pub(super) fn open(path: &Path, synchronous: &str) -> Result<Writer, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    // No busy handler: a transaction that finds the write lock taken fails at once with
    // SQLITE_BUSY (see [`is_busy`]) and the store waits for it asynchronously. Waiting here would
    // block a runtime thread, and the lock's holder, a pooled connection's worker, may need that
    // very thread to take its statement's results before it can finish and release the lock.
    conn.busy_timeout(Duration::ZERO)?;
    // The journal mode is stored in the file; the rest is per connection. Checkpoints run in the
    // background (`meshflow_kit::db`), not inside a commit.
    conn.execute_batch(&format!(
        "PRAGMA foreign_keys = ON; PRAGMA synchronous = {synchronous}; \
         PRAGMA wal_autocheckpoint = 0;"
    ))?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(Writer {
        conn,
        metrics: Metrics::default(),
    })
}

/// A read-only connection for the point reads on a start's and a parking driver's path. Through
/// the pooled driver each is a round trip to a connection's worker thread, several times the read
/// itself, and a burst of parking drivers queues for the pool's few connections. Here a read runs
/// on the calling thread: a few microseconds, under a lock held for no longer. In WAL mode it
/// waits for no writer, and each read sees every transaction committed before it began.
pub(super) struct Reader(std::sync::Mutex<Connection>);

impl Reader {
    /// Opens the connection to the database file at `path` (migrated already).
    pub(super) fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_handler(Some(busy))?;
        // Point reads by key touch a handful of pages, and the cache starts over whenever the
        // writer has committed: 256 KiB, not SQLite's default 2 MiB.
        conn.execute_batch("PRAGMA cache_size = -256;")?;
        conn.set_prepared_statement_cache_capacity(8);
        Ok(Self(std::sync::Mutex::new(conn)))
    }

    fn with<T>(
        &self,
        read: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let conn = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(read(&conn)?)
    }

    /// A workflow's status and current version, if it exists.
    pub(super) fn head(&self, workflow_id: &str) -> Result<Option<(String, i64)>, StoreError> {
        self.with(|c| head_in(c, workflow_id))
    }

    /// Whether a signal of the execution is waiting to be consumed.
    pub(super) fn has_pending_signal(&self, execution_id: &str) -> Result<bool, StoreError> {
        self.with(|c| c.prepare_cached(PENDING_SIGNAL)?.exists([execution_id]))
    }
}

/// A workflow's `(status, current_version)`, if it exists, read through `c`.
fn head_in(c: &Connection, workflow_id: &str) -> rusqlite::Result<Option<(String, i64)>> {
    c.prepare_cached(meshflow_workflow::store::head::SQLITE)?
        .query_row([workflow_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
}

const PENDING_SIGNAL: &str =
    "SELECT 1 FROM execution_signals WHERE execution_id = ?1 AND consumed_by IS NULL";

const INSERT_EXECUTION: &str = "INSERT INTO workflow_executions (id, workflow_id,
    workflow_version, status, input, variables, output, error, request_id, last_sequence,
    lease_owner, lease_expires_at, wake_at, deadline_at, create_time, start_time, end_time,
    update_time) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
    ?17, ?18)";

/// Executions counted against the concurrency limit: those started and not ended (in the
/// workflows' own metrics rows, through their partial index), and those not yet started.
pub(super) const ACTIVE: &str =
    "SELECT (SELECT COALESCE(SUM(MAX(active, 0)), 0) FROM orchestration_metrics
    WHERE step_id = '') + (SELECT COUNT(*) FROM workflow_executions
    WHERE status = 'EXECUTION_STATUS_PENDING')";

const FENCE: &str = "UPDATE workflow_executions SET update_time = ?1,
    status = COALESCE(?2, status), variables = COALESCE(?3, variables),
    output = COALESCE(?4, output), error = COALESCE(?5, error),
    wake_at = CASE WHEN ?6 THEN ?7 ELSE wake_at END,
    start_time = COALESCE(?8, start_time), end_time = COALESCE(?9, end_time),
    last_sequence = COALESCE(?10, last_sequence),
    lease_owner = CASE WHEN ?11 THEN NULL ELSE lease_owner END,
    lease_expires_at = CASE WHEN ?11 THEN NULL ELSE lease_expires_at END
    WHERE id = ?12 AND lease_owner = ?13";

/// [`FENCE`] for a patch that leaves the status, the wake-up and the lease alone: it sets no indexed
/// column. SQLite rewrites the entries of every index whose columns an `UPDATE` sets, changed or
/// not, so [`FENCE`] would dirty three index pages besides the row's at every commit. It takes
/// [`FENCE`]'s parameters, and matches no row unless those of the status, the wake-up and the lease
/// are unset.
const FENCE_UNINDEXED: &str = "UPDATE workflow_executions SET update_time = ?1,
    variables = COALESCE(?3, variables), output = COALESCE(?4, output),
    error = COALESCE(?5, error), start_time = COALESCE(?8, start_time),
    end_time = COALESCE(?9, end_time), last_sequence = COALESCE(?10, last_sequence)
    WHERE id = ?12 AND lease_owner = ?13 AND (?2 IS NULL) AND NOT ?6 AND NOT ?11";

const STEP: &str = "INSERT INTO step_executions (id, execution_id, step_id, step_path, step_type,
    status, attempt, input, output, error, logs, start_time, end_time, duration_ms, next_attempt_at)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
    ON CONFLICT (execution_id, step_path, attempt) DO UPDATE SET status = excluded.status,
    input = excluded.input,
    output = excluded.output, error = excluded.error, logs = excluded.logs,
    start_time = excluded.start_time, end_time = excluded.end_time,
    duration_ms = excluded.duration_ms, next_attempt_at = excluded.next_attempt_at";

/// Most event rows one statement of [`EVENTS_INSERT`] writes.
const EVENTS_PER_INSERT: usize = 8;

/// The statements inserting 1 to [`EVENTS_PER_INSERT`] event rows of one group commit (see
/// [`events_insert`]).
static EVENTS_INSERT: std::sync::LazyLock<Vec<String>> =
    std::sync::LazyLock::new(|| (1..=EVENTS_PER_INSERT).map(events_insert).collect());

/// The statement inserting `n` event rows of one group commit (one per execution, see
/// [`super::EventRow`]), their shared time in `?1` and each row's execution id, sequence, type,
/// step path and payload in the five parameters after. One statement for a commit's rows, not one
/// per row, opens its cursors and binds its time once.
fn events_insert(n: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO execution_events (execution_id, sequence, time, event_type, step_path, \
         payload) VALUES ",
    );
    for i in 0..n {
        let p = 2 + 5 * i;
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!(
            "(?{p}, ?{}, ?1, ?{}, ?{}, ?{})",
            p + 1,
            p + 2,
            p + 3,
            p + 4
        ));
    }
    sql
}

const CONSUME: &str = "UPDATE execution_signals SET consumed_by = ?1 WHERE id = ?2";

const METRICS_READ: &str = "SELECT total, active, completed, failed, cancelled, timed_out,
    skipped, attempts FROM orchestration_metrics WHERE workflow_id = ?1 AND step_id = ?2";

/// Sets a metrics row's values.
const METRICS_SET: &str = "UPDATE orchestration_metrics SET total = ?3, active = ?4,
    completed = ?5, failed = ?6, cancelled = ?7, timed_out = ?8, skipped = ?9, attempts = ?10,
    update_time = ?11 WHERE workflow_id = ?1 AND step_id = ?2";

const METRICS_INSERT: &str = "INSERT INTO orchestration_metrics (workflow_id, step_id, total,
    active, completed, failed, cancelled, timed_out, skipped, attempts, update_time)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";

/// Inserts a new execution unless its workflow no longer matches `head`, `max_active`
/// executions are active or not yet started, or an execution with that id or request id exists.
pub(super) fn insert_execution(
    writer: &mut Writer,
    row: &execution::Model,
    max_active: u64,
    head: Head,
) -> Result<InsertOutcome, StoreError> {
    immediate(&mut writer.conn, |tx| insert_in(tx, row, max_active, head))
}

fn insert_in(
    tx: &Connection,
    row: &execution::Model,
    max_active: u64,
    head: Head,
) -> Result<InsertOutcome, StoreError> {
    if !super::head_holds(head_in(tx, &row.workflow_id)?, head) {
        return Ok(InsertOutcome::Stale);
    }
    let active: i64 = tx.prepare_cached(ACTIVE)?.query_row([], |r| r.get(0))?;
    if u64::try_from(active).unwrap_or(0) >= max_active {
        return Ok(InsertOutcome::AtCapacity);
    }
    let inserted = tx.prepare_cached(INSERT_EXECUTION)?.execute(params![
        row.id,
        row.workflow_id,
        row.workflow_version,
        row.status,
        json(&row.input)?,
        json(&row.variables)?,
        row.output.as_ref().map(json).transpose()?,
        row.error.as_ref().map(json).transpose()?,
        row.request_id,
        row.last_sequence,
        row.lease_owner,
        row.lease_expires_at.map(time),
        row.wake_at.map(time),
        row.deadline_at.map(time),
        time(row.create_time),
        row.start_time.map(time),
        row.end_time.map(time),
        time(row.update_time),
    ]);
    match inserted {
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::ConstraintViolation
                && e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE =>
        {
            return Ok(InsertOutcome::Duplicate);
        }
        other => {
            other?;
        }
    }
    Ok(InsertOutcome::Created)
}

/// [`super::Store::commit`] on the writer's connection: the same rows, fencing and metrics.
pub(super) fn commit(
    writer: &mut Writer,
    batch: &mut [Commit],
    clock: &dyn meshflow_kit::clock::Clock,
) -> Result<Vec<CommitOutcome>, StoreError> {
    let Writer { conn, metrics } = writer;
    match immediate(conn, |tx| write(tx, metrics, batch, clock)) {
        Ok((outcomes, written)) => {
            // Known only once committed.
            if metrics.rows.len() + written.len() > METRICS_KEPT {
                metrics.rows.clear();
            }
            metrics.rows.extend(written);
            Ok(outcomes)
        }
        // A transaction that found the lock taken wrote nothing: the rows known still stand.
        Err(e) if is_busy(&e) => Err(e),
        Err(e) => {
            metrics.rows.clear();
            Err(e)
        }
    }
}

/// Whether `err` is the writer finding the write lock taken: nothing was written, and the same
/// transaction may run again.
pub(super) fn is_busy(err: &StoreError) -> bool {
    matches!(err, StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _))
        if e.code == rusqlite::ErrorCode::DatabaseBusy)
}

/// Runs `body` in an immediate transaction (the write lock taken at its start), committing what it
/// wrote if it succeeds and rolling everything back if it fails. `BEGIN` and `COMMIT` are cached
/// statements like the rest, not parsed again for every transaction.
fn immediate<T>(
    conn: &mut Connection,
    body: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    let result = body(conn).and_then(|value| {
        conn.prepare_cached("COMMIT")?.execute([])?;
        Ok(value)
    });
    if result.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    result
}

/// The metric rows a commit wrote, by workflow and step id.
type Written = Vec<((String, String), Counts)>;

/// The statements of one group commit, and the metric rows it wrote. The events go last, stamped
/// with the time just before they are inserted: only their inserts and the commit itself come
/// between that time and their being durable.
fn write(
    tx: &Connection,
    known: &mut Metrics,
    batch: &mut [Commit],
    clock: &dyn meshflow_kit::clock::Clock,
) -> Result<(Vec<CommitOutcome>, Written), StoreError> {
    let now = clock.now();
    let now_text = time(now);
    let mut outcomes = vec![CommitOutcome::Done; batch.len()];
    let mut metrics: Vec<(String, MetricsDelta)> = Vec::new();
    for (execution_id, members) in super::by_execution(batch) {
        let patch = super::merged_patch(members.iter().map(|&k| &batch[k]));
        let fence = if patch.indexed() {
            FENCE
        } else {
            FENCE_UNINDEXED
        };
        let fenced = tx.prepare_cached(fence)?.execute(params![
            now_text,
            patch.status.map(|s| s.as_str_name()),
            patch.variables.map(json).transpose()?,
            patch.output.map(json).transpose()?,
            patch.error.map(json).transpose()?,
            patch.wake_at.is_some(),
            patch.wake_at.flatten().map(time),
            patch.start_time.map(time),
            patch.end_time.map(time),
            patch.last_sequence,
            patch.release_lease,
            execution_id,
            batch[members[0]].owner,
        ])?;
        if fenced == 0 {
            for k in members {
                outcomes[k] = CommitOutcome::LeaseLost;
            }
            continue;
        }
        let mut step = tx.prepare_cached(STEP)?;
        // An attempt changed by several commits of the batch (an instant step's start and end) is
        // written once.
        for (_, r) in super::last_writes(members.iter().map(|&k| &batch[k])) {
            step.execute(params![
                r.id,
                execution_id,
                r.step_id,
                r.step_path,
                r.step_type,
                r.status.as_str_name(),
                r.attempt,
                r.input.as_ref().map(json).transpose()?,
                r.output.as_ref().map(json).transpose()?,
                r.error.as_ref().map(json).transpose()?,
                json(&r.logs)?,
                r.start_time.map(time),
                r.end_time.map(time),
                super::duration_ms(r),
                r.next_attempt_at.map(time),
            ])?;
        }
        for &k in &members {
            let c = &batch[k];
            if let Some((signal_id, consumer)) = &c.consume_signal {
                tx.prepare_cached(CONSUME)?
                    .execute(params![consumer, signal_id])?;
            }
            for d in &c.metrics {
                super::merge_into(&mut metrics, &c.workflow_id, d);
            }
        }
    }
    let mut written = Written::new();
    if !metrics.is_empty() {
        let version: i64 = tx
            .prepare_cached("PRAGMA data_version")?
            .query_row([], |r| r.get(0))?;
        if version != known.version {
            known.version = version;
            known.rows.clear();
        }
        for (workflow_id, delta) in metrics {
            let key = (workflow_id, delta.step_id.clone());
            let counts = add_metrics(tx, known.rows.get(&key), &key, &delta, now)?;
            written.push((key, counts));
        }
    }
    // A stored event leaves the time out, so the rows are made before the stamp is taken.
    let rows = super::event_rows(batch, |k| outcomes[k] == CommitOutcome::Done)?;
    let at = super::commit_time(clock);
    let at_text = time(at);
    super::stamp_written(batch, &outcomes, at);
    for chunk in rows.chunks(EVENTS_PER_INSERT) {
        let mut insert = tx.prepare_cached(&EVENTS_INSERT[chunk.len() - 1])?;
        insert.raw_bind_parameter(1, &at_text)?;
        for (i, r) in chunk.iter().enumerate() {
            let p = 2 + 5 * i;
            insert.raw_bind_parameter(p, &r.execution_id)?;
            insert.raw_bind_parameter(p + 1, r.sequence)?;
            insert.raw_bind_parameter(p + 2, r.event_type)?;
            insert.raw_bind_parameter(p + 3, r.step_path.as_deref())?;
            insert.raw_bind_parameter(p + 4, &r.payload)?;
        }
        insert.raw_execute()?;
    }
    Ok((outcomes, written))
}

/// Adds merged increments to the metrics row `key` (workflow and step id), creating it, and
/// returns its new values. `known`: its values as the writer last wrote them, if still valid;
/// else the row is read.
fn add_metrics(
    tx: &Connection,
    known: Option<&Counts>,
    key: &(String, String),
    d: &MetricsDelta,
    now: DateTime<Utc>,
) -> Result<Counts, StoreError> {
    let (workflow_id, step_id) = key;
    let current = match known {
        Some(counts) => Some(counts.clone()),
        None => read_metrics(tx, workflow_id, step_id)?,
    };
    let exists = current.is_some();
    let next = current.unwrap_or_default().plus(d);
    let now = time(now);
    let write = |sql: &str| -> Result<usize, StoreError> {
        Ok(tx.prepare_cached(sql)?.execute(params![
            workflow_id,
            step_id,
            next.total,
            next.active,
            next.completed,
            next.failed,
            next.cancelled,
            next.timed_out,
            next.skipped,
            next.attempts,
            now,
        ])?)
    };
    // A row known to the writer is gone only if another connection deleted it unseen: then it is
    // created again.
    let set = exists && write(METRICS_SET)? == 1;
    if !set {
        write(METRICS_INSERT)?;
    }
    Ok(next)
}

/// The values of a metrics row, if it exists.
fn read_metrics(
    tx: &Connection,
    workflow_id: &str,
    step_id: &str,
) -> Result<Option<Counts>, StoreError> {
    Ok(tx
        .prepare_cached(METRICS_READ)?
        .query_row([workflow_id, step_id], |r| {
            Ok(Counts {
                total: r.get(0)?,
                active: r.get(1)?,
                completed: r.get(2)?,
                failed: r.get(3)?,
                cancelled: r.get(4)?,
                timed_out: r.get(5)?,
                skipped: r.get(6)?,
                attempts: r.get(7)?,
            })
        })
        .optional()?)
}
