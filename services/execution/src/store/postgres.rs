//! Group commit on PostgreSQL in one round trip.
//!
//! A batch is one statement: the fenced update of every execution's row, the attempt upserts and the
//! event inserts are data-modifying CTEs over `UNNEST`ed arrays, and the attempts and events of an
//! execution whose fence failed are filtered out by the update's `RETURNING`. Metric increments of
//! the fenced executions are added to their rows, so no row is read first. One statement is one transaction, and its text never changes with the batch's size, so it
//! is prepared once per connection.
//!
//! The statement comes in two texts, which differ only in how they sum the metric increments. When
//! no metric row of the batch is incremented by two executions (a batch of one execution, or of
//! executions of different workflows), the writer sums each row's increments itself and passes one
//! row each ([`COMMIT_KEYED`]). Otherwise the statement sums them per workflow and step
//! ([`COMMIT`]): increments must count only if their execution's fence held, and that is known only
//! inside the statement. Setting up aggregates costs PostgreSQL at every run (its 28, when the rows
//! still held duration histograms, took about 0.1 ms, a seventh of a small batch's statement).
//!
//! The writer has a connection of its own, with the pool's settings (generic plans: the statement's
//! plan does not depend on the batch, and a custom plan at every bind cost as much as running it).

use std::collections::HashSet;
use std::time::Instant;

use chrono::{DateTime, Utc};
use sea_orm::sqlx::{self, PgPool, Postgres, Row};
use serde_json::Value;

use super::{Commit, CommitOutcome, StoreError, json_text as json, time_text as time};

/// The batch statement, summing the metric increments per workflow and step ([`SUMMED_DELTAS`]).
///
/// Its result is the id of every execution whose fence held, then a row with the events' time.
/// The writes run in the order the final `UNION ALL` reads them (an append runs its branches in
/// turn): the executions' rows, the attempts, the signals, the metrics, and last the events, whose
/// time `clock_timestamp()` takes as they are inserted. Only those inserts and the commit itself
/// come after it, as on SQLite, so an event's time is its commit's as nearly as a stored time can
/// be; stamped before the statement was sent, it was a whole statement early (about 1 ms). The
/// order only decides how late the stamp is: PostgreSQL runs every data-modifying CTE to completion
/// whether or not anything reads it, and `stamp` is computed once. On a driven clock (`$48` false,
/// in tests) the events take the clock's reading, `$1`, instead.
static COMMIT: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| commit_statement(SUMMED_DELTAS));

/// [`COMMIT`] for a batch whose metric increments come one row per metric row, summed by the
/// writer: each is added as it is, if its execution's fence held.
static COMMIT_KEYED: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| commit_statement(KEYED_DELTAS));

/// The batch statement with `deltas`, the metric increments of the fenced executions, one row per
/// workflow and step.
fn commit_statement(deltas: &str) -> String {
    COMMIT_TEMPLATE.replace("{deltas}", deltas)
}

/// Increments, one row each, summed per workflow and step.
const SUMMED_DELTAS: &str =
    "    SELECT d.workflow_id, d.step_id, SUM(d.total) AS total, SUM(d.active) AS active,
        SUM(d.completed) AS completed, SUM(d.failed) AS failed, SUM(d.cancelled) AS cancelled,
        SUM(d.timed_out) AS timed_out, SUM(d.skipped) AS skipped, SUM(d.attempts) AS attempts
    FROM UNNEST($37::text[], $38::text[], $39::text[], $40::bigint[], $41::bigint[],
                $42::bigint[], $43::bigint[], $44::bigint[], $45::bigint[], $46::bigint[],
                $47::bigint[])
        AS d(execution_id, workflow_id, step_id, total, active, completed, failed, cancelled,
             timed_out, skipped, attempts)
    WHERE d.execution_id IN (SELECT id FROM fenced)
    GROUP BY d.workflow_id, d.step_id";

/// Increments summed already, one row per workflow and step.
const KEYED_DELTAS: &str =
    "    SELECT d.workflow_id, d.step_id, d.total, d.active, d.completed, d.failed, d.cancelled,
        d.timed_out, d.skipped, d.attempts
    FROM UNNEST($37::text[], $38::text[], $39::text[], $40::bigint[], $41::bigint[],
                $42::bigint[], $43::bigint[], $44::bigint[], $45::bigint[], $46::bigint[],
                $47::bigint[])
        AS d(execution_id, workflow_id, step_id, total, active, completed, failed, cancelled,
             timed_out, skipped, attempts)
    WHERE d.execution_id IN (SELECT id FROM fenced)";

const COMMIT_TEMPLATE: &str = "WITH fenced AS (
    UPDATE workflow_executions AS e SET
        update_time = $1::timestamptz,
        status = COALESCE(v.status, e.status),
        variables = COALESCE(v.variables::jsonb, e.variables),
        output = COALESCE(v.output::jsonb, e.output),
        error = COALESCE(v.error::jsonb, e.error),
        wake_at = CASE WHEN v.set_wake THEN v.wake_at::timestamptz ELSE e.wake_at END,
        start_time = COALESCE(v.start_time::timestamptz, e.start_time),
        end_time = COALESCE(v.end_time::timestamptz, e.end_time),
        last_sequence = COALESCE(v.last_sequence, e.last_sequence),
        lease_owner = CASE WHEN v.release THEN NULL ELSE e.lease_owner END,
        lease_expires_at = CASE WHEN v.release THEN NULL ELSE e.lease_expires_at END
    FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                $8::bool[], $9::text[], $10::text[], $11::text[], $12::bigint[], $13::bool[])
        AS v(id, owner, status, variables, output, error, set_wake, wake_at, start_time, end_time,
             last_sequence, release)
    WHERE e.id = v.id AND e.lease_owner = v.owner
    RETURNING e.id
), steps AS (
    INSERT INTO step_executions (id, execution_id, step_id, step_path, step_type, status, attempt,
        input, output, error, logs, start_time, end_time, duration_ms, next_attempt_at)
    SELECT s.id, s.execution_id, s.step_id, s.step_path, s.step_type, s.status, s.attempt,
        s.input::jsonb, s.output::jsonb, s.error::jsonb, s.logs::jsonb,
        s.start_time::timestamptz, s.end_time::timestamptz, s.duration_ms,
        s.next_attempt_at::timestamptz
    FROM UNNEST($14::text[], $15::text[], $16::text[], $17::text[], $18::text[], $19::text[],
                $20::int[], $21::text[], $22::text[], $23::text[], $24::text[], $25::text[],
                $26::text[], $27::bigint[], $28::text[])
        AS s(id, execution_id, step_id, step_path, step_type, status, attempt, input, output, error,
             logs, start_time, end_time, duration_ms, next_attempt_at)
    WHERE s.execution_id IN (SELECT id FROM fenced)
    ON CONFLICT (execution_id, step_path, attempt) DO UPDATE SET status = excluded.status, input = excluded.input,
        output = excluded.output, error = excluded.error, logs = excluded.logs,
        start_time = excluded.start_time, end_time = excluded.end_time,
        duration_ms = excluded.duration_ms, next_attempt_at = excluded.next_attempt_at
    RETURNING 1
), signals AS (
    UPDATE execution_signals AS g SET consumed_by = c.consumer
    FROM UNNEST($34::text[], $35::text[], $36::text[]) AS c(id, consumer, execution_id)
    WHERE g.id = c.id AND c.execution_id IN (SELECT id FROM fenced)
    RETURNING 1
), deltas AS (
{deltas}
), metrics AS (
    INSERT INTO orchestration_metrics AS m (workflow_id, step_id, total, active, completed, failed,
        cancelled, timed_out, skipped, attempts, update_time)
    SELECT a.workflow_id, a.step_id, a.total, a.active, a.completed, a.failed, a.cancelled,
        a.timed_out, a.skipped, a.attempts, $1::timestamptz
    FROM deltas AS a
    ON CONFLICT (workflow_id, step_id) DO UPDATE SET
        total = m.total + excluded.total, active = m.active + excluded.active,
        completed = m.completed + excluded.completed, failed = m.failed + excluded.failed,
        cancelled = m.cancelled + excluded.cancelled, timed_out = m.timed_out + excluded.timed_out,
        skipped = m.skipped + excluded.skipped, attempts = m.attempts + excluded.attempts,
        update_time = excluded.update_time
    RETURNING 1
), stamp AS MATERIALIZED (
    SELECT CASE WHEN $48::bool THEN clock_timestamp() ELSE $1::timestamptz END AS t
), events AS (
    INSERT INTO execution_events (execution_id, sequence, time, event_type, step_path, payload)
    SELECT x.execution_id, x.sequence, stamp.t, x.event_type, x.step_path, x.payload::json
    FROM UNNEST($29::text[], $30::bigint[], $31::text[], $32::text[], $33::text[])
        AS x(execution_id, sequence, event_type, step_path, payload), stamp
    WHERE x.execution_id IN (SELECT id FROM fenced)
    RETURNING 1
)
SELECT id, NULL::timestamptz FROM fenced
UNION ALL SELECT NULL, NULL FROM (SELECT count(*) FROM steps) AS s(n) WHERE n < 0
UNION ALL SELECT NULL, NULL FROM (SELECT count(*) FROM signals) AS g(n) WHERE n < 0
UNION ALL SELECT NULL, NULL FROM (SELECT count(*) FROM metrics) AS m(n) WHERE n < 0
UNION ALL SELECT NULL, (SELECT t FROM stamp) FROM (SELECT count(*) FROM events) AS v(n) WHERE n > 0";

/// The writer's own connection to the same server as the pool, with the pool's settings. Not a
/// pool of one: a pool pings its connection when it hands it out and again when it takes it back,
/// two round trips to the server beside each group commit's one. This connection is pinged only
/// when it has sat idle (see [`meshflow_kit::db::PING_IF_IDLE_FOR`]), and opened again after a
/// failed commit.
pub(super) struct Writer {
    options: sqlx::postgres::PgConnectOptions,
    conn: tokio::sync::Mutex<Option<(sqlx::PgConnection, Instant)>>,
}

impl Writer {
    /// A writer for the server `pool` connects to; it connects at its first commit.
    pub(super) fn new(pool: &PgPool) -> Self {
        Self {
            options: (*pool.connect_options()).clone(),
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// Runs `write` on the connection, opened or checked first as needed.
    async fn with<T>(
        &self,
        write: impl AsyncFnOnce(&mut sqlx::PgConnection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        use sqlx::Connection;
        let mut slot = self.conn.lock().await;
        let kept = match slot.take() {
            Some((conn, used)) if used.elapsed() < meshflow_kit::db::PING_IF_IDLE_FOR => Some(conn),
            Some((mut conn, _)) => conn.ping().await.is_ok().then_some(conn),
            None => None,
        };
        let mut conn = match kept {
            Some(conn) => conn,
            None => self.connect().await?,
        };
        let result = write(&mut conn).await;
        // After a failure the connection is opened again: the error may have ended it (the server
        // reports a terminated session as an error of the statement that finds it gone).
        if result.is_ok() {
            *slot = Some((conn, Instant::now()));
        }
        result
    }

    async fn connect(&self) -> Result<sqlx::PgConnection, StoreError> {
        use sqlx::ConnectOptions;
        self.options.connect().await.map_err(db)
    }
}

fn opt_json(v: &Option<Value>) -> Result<Option<String>, StoreError> {
    v.as_ref().map(json).transpose()
}

fn db(err: sqlx::Error) -> StoreError {
    StoreError::Db(sea_orm::DbErr::Exec(sea_orm::RuntimeErr::SqlxError(
        std::sync::Arc::new(err),
    )))
}

/// [`super::Store::commit`] on PostgreSQL: the same rows, fencing and metrics, in one statement.
/// The statement stamps the events itself, as its last step before it commits (see [`COMMIT`]);
/// the events of `batch` get that time.
pub(super) async fn commit(
    writer: &Writer,
    batch: &mut [Commit],
    now: DateTime<Utc>,
    system_clock: bool,
) -> Result<Vec<CommitOutcome>, StoreError> {
    // Every execution's rows: the statement leaves out those whose fence failed.
    let events = super::event_rows(batch, |_| true)?;
    let (outcomes, at) = {
        let batch = &*batch;
        let groups = super::by_execution(batch);
        let rows = writer
            .with(async |conn| {
                let mut attempt = 1;
                loop {
                    match batch_statement(batch, &groups, &events, now, system_clock)?
                        .fetch_all(&mut *conn)
                        .await
                    {
                        Ok(rows) => return Ok(rows),
                        Err(err) if attempt < ATTEMPTS && retryable(&err) => {
                            // The statement is its own transaction: nothing of it was written.
                            // The transaction it deadlocked with is waiting for the rows it held:
                            // give way for a moment, or running again at once may take them
                            // back first and deadlock with it again.
                            tracing::warn!(error = %err, attempt, "group commit retried");
                            tokio::time::sleep(RETRY_PAUSE * attempt).await;
                            attempt += 1;
                        }
                        Err(err) => return Err(db(err)),
                    }
                }
            })
            .await?;
        let (fenced, at) = read_outcome(&rows)?;
        let mut outcomes = vec![CommitOutcome::Done; batch.len()];
        for (execution_id, members) in groups {
            if !fenced.contains(execution_id) {
                for k in members {
                    outcomes[k] = CommitOutcome::LeaseLost;
                }
            }
        }
        (outcomes, at)
    };
    if let Some(at) = at {
        super::stamp_written(batch, &outcomes, at);
    }
    Ok(outcomes)
}

/// Most runs of a batch statement that PostgreSQL cancelled to break a deadlock or a
/// serialization conflict (with a transaction outside meshflow's own ordering, such as a
/// cascading delete), before the commit fails.
const ATTEMPTS: u32 = 3;

/// The pause before running a cancelled batch statement again, times the attempt.
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(10);

/// A deadlock victim (`40P01`) or a serialization failure (`40001`): running it again may succeed.
fn retryable(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "40P01" || code == "40001")
}

/// The ids of the executions whose fence held, and the time the events were stamped with (when
/// there were events).
fn read_outcome(
    rows: &[sqlx::postgres::PgRow],
) -> Result<(HashSet<&str>, Option<DateTime<Utc>>), StoreError> {
    let mut fenced = HashSet::new();
    let mut at = None;
    for r in rows {
        match r.try_get::<Option<&str>, _>(0).map_err(db)? {
            Some(id) => {
                fenced.insert(id);
            }
            None => at = r.try_get::<Option<DateTime<Utc>>, _>(1).map_err(db)?,
        }
    }
    Ok((fenced, at))
}

type Query<'q> = sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>;

fn batch_statement<'q>(
    batch: &[Commit],
    groups: &[(&str, Vec<usize>)],
    events: &[super::EventRow],
    now: DateTime<Utc>,
    system_clock: bool,
) -> Result<Query<'q>, StoreError> {
    // The fenced row update of each execution.
    let n = groups.len();
    let (mut id, mut owner, mut status) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut variables, mut output, mut error) = (Vec::new(), Vec::new(), Vec::new());
    let (mut set_wake, mut wake_at, mut start, mut end) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut last_sequence, mut release) = (Vec::new(), Vec::new());
    for (execution_id, members) in groups {
        let p = super::merged_patch(members.iter().map(|&k| &batch[k]));
        id.push(execution_id.to_string());
        owner.push(batch[members[0]].owner.clone());
        status.push(p.status.map(|s| s.as_str_name().to_string()));
        variables.push(p.variables.map(json).transpose()?);
        output.push(p.output.map(json).transpose()?);
        error.push(p.error.map(json).transpose()?);
        set_wake.push(p.wake_at.is_some());
        wake_at.push(p.wake_at.flatten().map(time));
        start.push(p.start_time.map(time));
        end.push(p.end_time.map(time));
        last_sequence.push(p.last_sequence);
        release.push(p.release_lease);
    }
    let rows = super::last_writes(batch);
    let (mut s_id, mut s_execution, mut s_step_id) = (Vec::new(), Vec::new(), Vec::new());
    let (mut s_path, mut s_type) = (Vec::new(), Vec::new());
    let (mut s_status, mut s_attempt) = (Vec::new(), Vec::new());
    let (mut s_input, mut s_output, mut s_error, mut s_logs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut s_start, mut s_end, mut s_duration, mut s_next) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (execution_id, r) in rows {
        s_id.push(r.id.clone());
        s_execution.push(execution_id.to_string());
        s_step_id.push(r.step_id.clone());
        s_path.push(r.step_path.clone());
        s_type.push(r.step_type.clone());
        s_status.push(r.status.as_str_name().to_string());
        s_attempt.push(r.attempt);
        s_input.push(opt_json(&r.input)?);
        s_output.push(opt_json(&r.output)?);
        s_error.push(opt_json(&r.error)?);
        s_logs.push(json(&r.logs)?);
        s_start.push(r.start_time.map(time));
        s_end.push(r.end_time.map(time));
        s_duration.push(super::duration_ms(r));
        s_next.push(r.next_attempt_at.map(time));
    }
    // Event rows.
    let now_text = time(now);
    let e_execution: Vec<&str> = events.iter().map(|r| r.execution_id.as_str()).collect();
    let e_sequence: Vec<i64> = events.iter().map(|r| r.sequence).collect();
    let e_type: Vec<&str> = events.iter().map(|r| r.event_type).collect();
    let e_path: Vec<Option<&str>> = events.iter().map(|r| r.step_path.as_deref()).collect();
    let e_payload: Vec<&str> = events.iter().map(|r| r.payload.as_str()).collect();
    // Signals consumed.
    let (mut g_id, mut g_consumer, mut g_execution) = (Vec::new(), Vec::new(), Vec::new());
    for c in batch {
        if let Some((signal_id, consumer)) = &c.consume_signal {
            g_id.push(signal_id.clone());
            g_consumer.push(consumer.clone());
            g_execution.push(c.execution_id.clone());
        }
    }
    let deltas = Deltas::of(batch);
    let query = sqlx::query(deltas.statement())
        .bind(now_text)
        .bind(id)
        .bind(owner)
        .bind(status)
        .bind(variables)
        .bind(output)
        .bind(error)
        .bind(set_wake)
        .bind(wake_at)
        .bind(start)
        .bind(end)
        .bind(last_sequence)
        .bind(release)
        .bind(s_id)
        .bind(s_execution)
        .bind(s_step_id)
        .bind(s_path)
        .bind(s_type)
        .bind(s_status)
        .bind(s_attempt)
        .bind(s_input)
        .bind(s_output)
        .bind(s_error)
        .bind(s_logs)
        .bind(s_start)
        .bind(s_end)
        .bind(s_duration)
        .bind(s_next)
        .bind(e_execution)
        .bind(e_sequence)
        .bind(e_type)
        .bind(e_path)
        .bind(e_payload)
        .bind(g_id)
        .bind(g_consumer)
        .bind(g_execution);
    Ok(deltas.bind(query).bind(system_clock))
}

/// The metric increments of a batch, as the statement takes them (`$37` to `$47`).
struct Deltas {
    execution: Vec<String>,
    workflow: Vec<String>,
    step: Vec<String>,
    /// Total, active, completed, failed, cancelled, timed out, skipped, attempts.
    counts: [Vec<i64>; 8],
    /// Whether the rows are summed per metric row already ([`COMMIT_KEYED`]) or one per increment
    /// ([`COMMIT`]).
    keyed: bool,
}

impl Deltas {
    /// One row per metric row and execution, summed here, if no metric row has increments from two
    /// executions; else one row per increment, for the statement to sum.
    fn of(batch: &[Commit]) -> Self {
        let mut merged = Vec::new();
        // The execution whose increments each merged row holds.
        let mut from: Vec<&str> = Vec::new();
        for c in batch {
            for d in &c.metrics {
                let row = super::merge_into(&mut merged, &c.workflow_id, d);
                match from.get(row) {
                    None => from.push(&c.execution_id),
                    Some(execution_id) if *execution_id != c.execution_id => {
                        return Self::unsummed(batch);
                    }
                    Some(_) => {}
                }
            }
        }
        let mut deltas = Self::empty(true);
        for ((workflow_id, d), execution_id) in merged.iter().zip(from) {
            deltas.push(execution_id, workflow_id, d);
        }
        deltas
    }

    fn unsummed(batch: &[Commit]) -> Self {
        let mut deltas = Self::empty(false);
        for c in batch {
            for d in &c.metrics {
                deltas.push(&c.execution_id, &c.workflow_id, d);
            }
        }
        deltas
    }

    fn empty(keyed: bool) -> Self {
        Self {
            execution: Vec::new(),
            workflow: Vec::new(),
            step: Vec::new(),
            counts: Default::default(),
            keyed,
        }
    }

    fn push(&mut self, execution_id: &str, workflow_id: &str, d: &super::MetricsDelta) {
        self.execution.push(execution_id.to_string());
        self.workflow.push(workflow_id.to_string());
        self.step.push(d.step_id.clone());
        let counts = [
            d.total,
            d.active,
            d.completed,
            d.failed,
            d.cancelled,
            d.timed_out,
            d.skipped,
            d.attempts,
        ];
        for (column, n) in self.counts.iter_mut().zip(counts) {
            column.push(n);
        }
    }

    /// The statement that takes these rows.
    fn statement(&self) -> &'static str {
        if self.keyed {
            COMMIT_KEYED.as_str()
        } else {
            COMMIT.as_str()
        }
    }

    fn bind(self, query: Query<'_>) -> Query<'_> {
        let mut query = query
            .bind(self.execution)
            .bind(self.workflow)
            .bind(self.step);
        for column in self.counts {
            query = query.bind(column);
        }
        query
    }
}
