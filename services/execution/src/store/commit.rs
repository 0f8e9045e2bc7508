//! The group commit: many executions' state changes in one transaction, each fenced by its lease,
//! and the rows and events it writes.

use super::*;

/// Applies the merged row changes of one execution's commits, fenced by the lease; false when the
/// writer no longer holds it.
pub(super) async fn fence<'a, C: ConnectionTrait>(
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

/// The time a group commit stamps on its events: now, to the microsecond, the finest time every
/// backend stores, so an event read back from history equals the one sent live.
pub(super) fn commit_time(clock: &dyn meshflow_kit::clock::Clock) -> DateTime<Utc> {
    use chrono::SubsecRound;
    clock.now().trunc_subsecs(6)
}

/// Sets the time of every event to `at` in the commits of `batch` that `outcomes` marks written.
pub(super) fn stamp_written(batch: &mut [Commit], outcomes: &[CommitOutcome], at: DateTime<Utc>) {
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
pub(super) fn stamp<'a>(commits: impl Iterator<Item = &'a mut Commit>, at: DateTime<Utc>) {
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
pub(super) fn by_execution(batch: &[Commit]) -> Vec<(&str, Vec<usize>)> {
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
pub(super) struct Merged<'a> {
    pub(super) status: Option<pb::ExecutionStatus>,
    pub(super) variables: Option<&'a Value>,
    pub(super) output: Option<&'a Value>,
    pub(super) error: Option<&'a Value>,
    pub(super) wake_at: Option<Option<DateTime<Utc>>>,
    pub(super) start_time: Option<DateTime<Utc>>,
    pub(super) end_time: Option<DateTime<Utc>>,
    pub(super) release_lease: bool,
    /// The sequence of the last event.
    pub(super) last_sequence: Option<i64>,
}

impl Merged<'_> {
    /// Whether the change sets a column some index of the executions' table holds.
    pub(super) fn indexed(&self) -> bool {
        self.status.is_some() || self.wake_at.is_some() || self.release_lease
    }
}

/// Merges the row changes of one execution's commits, taken in the order they were queued.
pub(super) fn merged_patch<'a>(commits: impl Iterator<Item = &'a Commit>) -> Merged<'a> {
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
pub(super) fn last_writes<'a>(
    commits: impl IntoIterator<Item = &'a Commit>,
) -> Vec<(&'a str, &'a StepRow)> {
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

pub(super) fn duration_ms(s: &StepRow) -> Option<i64> {
    match (s.start_time, s.end_time) {
        (Some(a), Some(b)) => Some((b - a).num_milliseconds()),
        _ => None,
    }
}

pub(super) fn event_type_name(e: &pb::ExecutionEvent) -> &'static str {
    pb::EventType::try_from(e.r#type)
        .unwrap_or_default()
        .as_str_name()
}

pub(super) fn step_model(execution_id: &str, s: &StepRow) -> step::ActiveModel {
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

/// The event rows of the commits of `batch` that `written` keeps (by index): one per execution,
/// its commits' events in batch order. Each event is as it was after.
pub(super) fn event_rows(
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

pub(super) fn event_model(
    r: EventRow,
    time: DateTime<Utc>,
) -> Result<event::ActiveModel, StoreError> {
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
pub(super) fn merge_into(
    merged: &mut Vec<(String, MetricsDelta)>,
    workflow_id: &str,
    d: &MetricsDelta,
) -> usize {
    let found = merged
        .iter()
        .position(|(w, m)| w == workflow_id && m.step_id == d.step_id);
    let slot = found.unwrap_or_else(|| {
        merged.push((
            workflow_id.to_string(),
            MetricsDelta {
                step_id: d.step_id.clone(),
                ..Default::default()
            },
        ));
        merged.len() - 1
    });
    merged[slot].1.add(d);
    slot
}

/// How long the SQLite writer waits for the write lock, as long as a pooled connection would.
pub(super) const WRITER_BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long the SQLite writer retries at once, only yielding to the runtime, before it waits a
/// timer tick (a millisecond) between attempts. A pooled write holds the lock for a fraction of it.
pub(super) const WRITER_BUSY_YIELDING: std::time::Duration = std::time::Duration::from_millis(1);

/// Runs `write` on the SQLite writer's connection, and again while it finds the write lock taken
/// (by a pooled connection, a checkpoint resetting the WAL, or another process). Between attempts
/// the runtime thread is free, so a pooled connection holding the lock can hand over its results
/// and finish: waiting inside SQLite's busy handler instead, a start on a single-threaded runtime
/// waited out the whole timeout behind a connection that was waiting for that thread. For the first
/// [`WRITER_BUSY_YIELDING`] the retries only yield, so the commit goes on as soon as the lock is
/// free; later ones wait a millisecond each.
pub(super) async fn on_writer<T>(
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

impl Store {
    /// Writes a batch of commits in one transaction. Commits of one execution are merged: one fenced
    /// update of its row (a replica that lost the lease writes nothing for it), then every attempt row
    /// and every event of the batch. The metric increments of the written commits, merged per
    /// workflow and step, go in the same transaction, so metrics are exact across crashes.
    ///
    /// Every event's `time` is set to the time of its commit, taken as late before the commit as
    /// each backend allows.
    pub async fn commit(&self, batch: &mut [Commit]) -> Result<Vec<CommitOutcome>, StoreError> {
        if let Some(writer) = self.sqlite_writer().await? {
            let clock = &*self.clock;
            return on_writer(&writer, |w| sqlite::commit(w, batch, clock)).await;
        }
        let now = commit_time(&*self.clock);
        if self.db.get_database_backend() == DbBackend::Postgres {
            let system = self.clock.is_system();
            return postgres::commit(self.postgres_writer(), batch, now, system).await;
        }
        stamp(batch.iter_mut(), now);
        let txn = self.db.begin().await?;
        let mut outcomes = vec![CommitOutcome::Done; batch.len()];
        let mut written: Vec<&Commit> = Vec::new();
        let mut signals: Vec<(String, String)> = Vec::new();
        let mut metrics: Vec<(String, MetricsDelta)> = Vec::new();
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
        for (workflow_id, delta) in &metrics {
            upsert_metrics(&txn, workflow_id, delta, now).await?;
        }
        txn.commit().await?;
        Ok(outcomes)
    }
}
