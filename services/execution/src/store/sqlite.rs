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

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde_json::Value;

use super::entity::execution;
use super::{
    Commit, CommitOutcome, HEAD_SQLITE, Head, InsertOutcome, MetricsDelta, StoreError,
    json_text as json, time_text as time,
};

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

/// Opens the writer's connection to the database file at `path` (migrated already).
pub(super) fn open(path: &Path, synchronous: &str) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_handler(Some(busy))?;
    // The journal mode is stored in the file; the rest is per connection. Checkpoints run in the
    // background (`meshflow_kit::db`), not inside a commit.
    conn.execute_batch(&format!(
        "PRAGMA foreign_keys = ON; PRAGMA synchronous = {synchronous}; \
         PRAGMA wal_autocheckpoint = 0;"
    ))?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
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
    c.prepare_cached(HEAD_SQLITE)?
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

/// Executions counted against the concurrency limit: those started and not ended (in the metrics),
/// and those not yet started.
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
    ON CONFLICT (id) DO UPDATE SET status = excluded.status, input = excluded.input,
    output = excluded.output, error = excluded.error, logs = excluded.logs,
    start_time = excluded.start_time, end_time = excluded.end_time,
    duration_ms = excluded.duration_ms, next_attempt_at = excluded.next_attempt_at";

const EVENT: &str = "INSERT INTO execution_events (execution_id, sequence, time, event_type,
    step_path, payload) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

const CONSUME: &str = "UPDATE execution_signals SET consumed_by = ?1 WHERE id = ?2";

/// Adds increments to a metrics row (creating it). Counts add up in SQL; the histogram is read and
/// added to here, inside the transaction that holds the write lock.
const METRICS_ADD: &str = "INSERT INTO orchestration_metrics (workflow_id, step_id, total, active,
    completed, failed, cancelled, timed_out, skipped, attempts, duration_histogram, update_time)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
    ON CONFLICT (workflow_id, step_id) DO UPDATE SET total = total + excluded.total,
    active = active + excluded.active, completed = completed + excluded.completed,
    failed = failed + excluded.failed, cancelled = cancelled + excluded.cancelled,
    timed_out = timed_out + excluded.timed_out, skipped = skipped + excluded.skipped,
    attempts = attempts + excluded.attempts,
    duration_histogram = CASE WHEN ?13 THEN excluded.duration_histogram
        ELSE duration_histogram END,
    update_time = excluded.update_time";

const HISTOGRAM: &str = "SELECT duration_histogram FROM orchestration_metrics
    WHERE workflow_id = ?1 AND step_id = ?2";

/// Inserts a new execution unless its workflow no longer matches `head`, `max_active`
/// executions are active or not yet started, or an execution with that id or request id exists.
pub(super) fn insert_execution(
    conn: &mut Connection,
    row: &execution::Model,
    max_active: u64,
    head: Head,
) -> Result<InsertOutcome, StoreError> {
    immediate(conn, |tx| insert_in(tx, row, max_active, head))
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
    conn: &mut Connection,
    batch: &mut [Commit],
) -> Result<Vec<CommitOutcome>, StoreError> {
    immediate(conn, |tx| write(tx, batch))
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

/// The statements of one group commit. The events go last, stamped with the time just before
/// they are written: only their own inserts and the commit itself come between that time and
/// their being durable.
fn write(tx: &Connection, batch: &mut [Commit]) -> Result<Vec<CommitOutcome>, StoreError> {
    let now = Utc::now();
    let now_text = time(now);
    let mut outcomes = vec![CommitOutcome::Done; batch.len()];
    let mut metrics: Vec<(String, MetricsDelta, Vec<i64>)> = Vec::new();
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
        for &k in &members {
            let c = &batch[k];
            for r in &c.steps {
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
            if let Some((signal_id, consumer)) = &c.consume_signal {
                tx.prepare_cached(CONSUME)?
                    .execute(params![consumer, signal_id])?;
            }
            for d in &c.metrics {
                super::merge_into(&mut metrics, &c.workflow_id, d);
            }
        }
    }
    if !metrics.is_empty() {
        // Prepared once for every row: a cached statement's lookup hashes its whole text.
        let mut read = tx.prepare_cached(HISTOGRAM)?;
        let mut add = tx.prepare_cached(METRICS_ADD)?;
        for (workflow_id, delta, durations) in &metrics {
            add_metrics(&mut read, &mut add, workflow_id, delta, durations, now)?;
        }
    }
    let at = super::commit_time();
    let at_text = time(at);
    super::stamp_written(batch, &outcomes, at);
    let mut event = tx.prepare_cached(EVENT)?;
    for (c, outcome) in batch.iter_mut().zip(&outcomes) {
        if *outcome != CommitOutcome::Done {
            continue;
        }
        for e in &mut c.events {
            let payload = super::stored_payload(e)?;
            event.execute(params![
                c.execution_id,
                e.sequence,
                at_text,
                super::event_type_name(e),
                Some(e.step_path.as_str()).filter(|p| !p.is_empty()),
                payload,
            ])?;
        }
    }
    Ok(outcomes)
}

/// Adds merged increments to one metrics row, with `read` prepared from [`HISTOGRAM`] and `add`
/// from [`METRICS_ADD`].
fn add_metrics(
    read: &mut rusqlite::Statement<'_>,
    add: &mut rusqlite::Statement<'_>,
    workflow_id: &str,
    d: &MetricsDelta,
    durations: &[i64],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    // Without durations the stored histogram stays; a new row starts at zero.
    let stored: Option<String> = if durations.is_empty() {
        None
    } else {
        read.query_row(params![workflow_id, d.step_id], |r| r.get(0))
            .optional()?
    };
    let stored = match stored {
        Some(text) => serde_json::from_str(&text)
            .map_err(|e| StoreError::Corrupt(format!("duration histogram: {e}")))?,
        None => Vec::new(),
    };
    let histogram = Value::from(super::histogram_plus(stored, durations));
    add.execute(params![
        workflow_id,
        d.step_id,
        d.total,
        d.active,
        d.completed,
        d.failed,
        d.cancelled,
        d.timed_out,
        d.skipped,
        d.attempts,
        json(&histogram)?,
        time(now),
        !durations.is_empty(),
    ])?;
    Ok(())
}
