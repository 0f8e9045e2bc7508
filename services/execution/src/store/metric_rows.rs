//! Metrics rows: counts by status per workflow and step; and the durations they count, read from
//! the history for exact percentiles.

use sea_orm::QueryTrait;

use super::*;

/// The durations a workflow's metrics count, in milliseconds ([`Store::durations`]).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Durations {
    /// Each ended execution's.
    pub executions: Vec<i64>,
    /// Each step's, by step id.
    pub steps: std::collections::HashMap<String, Vec<i64>>,
}

/// The exact `q` quantile (0..1) of `values` by nearest rank: a value that was observed, so never
/// outside their minimum and maximum. `None` when there are none.
pub fn quantile(values: &mut [i64], q: f64) -> Option<i64> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let rank = ((values.len() as f64) * q).ceil().max(1.0) as usize;
    values.get(rank.min(values.len()) - 1).copied()
}

/// The values of one metrics row (zero for a new row).
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Counts {
    pub(super) total: i64,
    pub(super) active: i64,
    pub(super) completed: i64,
    pub(super) failed: i64,
    pub(super) cancelled: i64,
    pub(super) timed_out: i64,
    pub(super) skipped: i64,
    pub(super) attempts: i64,
}

impl Counts {
    /// The values of a stored row.
    pub(super) fn of(m: &metrics::Model) -> Self {
        Self {
            total: m.total,
            active: m.active,
            completed: m.completed,
            failed: m.failed,
            cancelled: m.cancelled,
            timed_out: m.timed_out,
            skipped: m.skipped,
            attempts: m.attempts,
        }
    }

    /// These values with merged increments added.
    pub(super) fn plus(mut self, d: &MetricsDelta) -> Self {
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

/// A metrics row after adding merged increments to its current value (`None`: a new row).
pub(super) fn next_metrics(
    current: Option<metrics::Model>,
    workflow_id: &str,
    d: &MetricsDelta,
    now: DateTime<Utc>,
) -> metrics::Model {
    let next = current.as_ref().map(Counts::of).unwrap_or_default().plus(d);
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
        update_time: now,
    }
}

pub(super) async fn upsert_metrics<C: ConnectionTrait>(
    txn: &C,
    workflow_id: &str,
    d: &MetricsDelta,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let current = metrics::Entity::find_by_id((workflow_id.to_string(), d.step_id.clone()))
        .unique(txn)
        .await?;
    let m = next_metrics(current, workflow_id, d, now);
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
                    metrics::Column::UpdateTime,
                ])
                .to_owned(),
        )
        .exec_without_returning(txn)
        .await?;
    Ok(())
}

impl Store {
    /// Metrics rows of a workflow (the workflow row has `step_id == ""`).
    pub async fn metrics(&self, workflow_id: &str) -> Result<Vec<metrics::Model>, StoreError> {
        Ok(metrics::Entity::find()
            .filter(metrics::Column::WorkflowId.eq(workflow_id))
            .order_by_asc(metrics::Column::StepId)
            .all(&self.db)
            .await?)
    }

    /// Every duration the metrics of a workflow count, in milliseconds, from its retained
    /// history: each ended execution's, and each step's (by step id) as its last attempt took —
    /// succeeded, or failed with no retry to come — as the metrics rows count them.
    pub async fn durations(&self, workflow_id: &str) -> Result<Durations, StoreError> {
        use meshflow_proto::execution::v1::StepStatus;
        let executions: Vec<(DateTime<Utc>, DateTime<Utc>)> = execution::Entity::find()
            .select_only()
            .column(execution::Column::StartTime)
            .column(execution::Column::EndTime)
            .filter(execution::Column::WorkflowId.eq(workflow_id))
            .filter(execution::Column::StartTime.is_not_null())
            .filter(execution::Column::EndTime.is_not_null())
            .into_tuple()
            .all(&self.db)
            .await?;
        let of_workflow = execution::Entity::find()
            .select_only()
            .column(execution::Column::Id)
            .filter(execution::Column::WorkflowId.eq(workflow_id))
            .into_query();
        let ended = sea_orm::Condition::any()
            .add(step::Column::Status.eq(StepStatus::Succeeded.as_str_name()))
            .add(
                step::Column::Status
                    .eq(StepStatus::Failed.as_str_name())
                    .and(step::Column::NextAttemptAt.is_null()),
            );
        let steps: Vec<(String, i64)> = step::Entity::find()
            .select_only()
            .column(step::Column::StepId)
            .column(step::Column::DurationMs)
            .filter(step::Column::ExecutionId.in_subquery(of_workflow))
            .filter(step::Column::DurationMs.is_not_null())
            .filter(ended)
            .into_tuple()
            .all(&self.db)
            .await?;
        let mut by_step: std::collections::HashMap<String, Vec<i64>> = Default::default();
        for (step_id, ms) in steps {
            by_step.entry(step_id).or_default().push(ms);
        }
        Ok(Durations {
            executions: executions
                .into_iter()
                .map(|(start, end)| (end - start).num_milliseconds())
                .collect(),
            steps: by_step,
        })
    }
}
