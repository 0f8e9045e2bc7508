//! The behaviour of ExecutionService, free of transport concerns: requests in, responses or
//! [`Error`]s out.

use meshflow_kit::{Violation, Violations, page, request};
use meshflow_proto::execution::v1 as pb;

use crate::convert;
use crate::error::Error;
use crate::store::{ExecutionFilter, Store, quantile};

/// ExecutionService over the execution store; `workflows` tells which workflows exist (or
/// existed).
#[derive(Clone)]
pub struct Service {
    store: Store,
    workflows: meshflow_workflow::store::Store,
}

/// Exact percentiles of durations in milliseconds (nearest rank: each one an observed duration).
fn stats(mut durations: Vec<i64>) -> pb::DurationStats {
    let mut d = |q| {
        quantile(&mut durations, q).map(|ms| {
            meshflow_kit::convert::duration(std::time::Duration::from_millis(
                u64::try_from(ms).unwrap_or(0),
            ))
        })
    };
    pb::DurationStats {
        p50: d(0.5),
        p95: d(0.95),
        p99: d(0.99),
    }
}

impl Service {
    /// The service over `store`.
    pub fn new(store: Store, workflows: meshflow_workflow::store::Store) -> Self {
        Self { store, workflows }
    }

    /// GetExecution.
    pub async fn get_execution(
        &self,
        req: pb::GetExecutionRequest,
    ) -> Result<pb::Execution, Error> {
        request::resource_id("execution_id", &req.execution_id)?;
        let row = self
            .store
            .execution(&req.execution_id)
            .await?
            .ok_or(Error::ExecutionNotFound(req.execution_id))?;
        Ok(convert::execution(&row))
    }

    /// ListExecutions: every bad field at once.
    pub async fn list_executions(
        &self,
        req: pb::ListExecutionsRequest,
    ) -> Result<pb::ListExecutionsResponse, Error> {
        let mut v = Violations::new();
        let size = v.take(page::size(req.page_size, 50, 500));
        let after = v.take(page::decode::<String>(&req.page_token));
        let mut filter = ExecutionFilter::default();
        if !req.workflow_id.is_empty() {
            v.take(request::resource_id("workflow_id", &req.workflow_id));
            filter.workflow_id = Some(req.workflow_id);
        }
        match pb::ExecutionStatus::try_from(req.status) {
            Ok(pb::ExecutionStatus::Unspecified) => {}
            Ok(s) => filter.statuses = vec![s],
            Err(_) => v.push(Violation::new(
                "status",
                format!("unknown value {}", req.status),
            )),
        }
        let time = |field: &str, t: Option<&meshflow_proto::pbjson_types::Timestamp>| match t {
            None => Ok(None),
            Some(t) => meshflow_kit::convert::from_timestamp(t)
                .map(Some)
                .ok_or_else(|| Violation::new(field, "is not a valid timestamp")),
        };
        filter.from = v
            .take(time("start_time_from", req.start_time_from.as_ref()))
            .flatten();
        filter.to = v
            .take(time("start_time_to", req.start_time_to.as_ref()))
            .flatten();
        let (Some(size), Some(after), true) = (size, after, v.is_empty()) else {
            return Err(Error::Invalid(v.into_vec()));
        };
        let rows = self
            .store
            .list_executions(&filter, after.as_deref(), size + 1)
            .await?;
        let (rows, next_page_token) = page::finish(rows, size, |r| r.id.clone());
        Ok(pb::ListExecutionsResponse {
            executions: rows.iter().map(convert::execution).collect(),
            next_page_token,
        })
    }

    /// ListStepExecutions: every attempt of an execution's steps.
    pub async fn list_step_executions(
        &self,
        req: pb::ListStepExecutionsRequest,
    ) -> Result<pb::ListStepExecutionsResponse, Error> {
        let mut v = Violations::new();
        v.take(request::resource_id("execution_id", &req.execution_id));
        let size = v.take(page::size(req.page_size, 100, 1000));
        let after = v.take(page::decode::<String>(&req.page_token));
        let (Some(size), Some(after), true) = (size, after, v.is_empty()) else {
            return Err(Error::Invalid(v.into_vec()));
        };
        if self.store.execution(&req.execution_id).await?.is_none() {
            return Err(Error::ExecutionNotFound(req.execution_id));
        }
        let step_id = Some(req.step_id.as_str()).filter(|s| !s.is_empty());
        let rows = self
            .store
            .list_steps(&req.execution_id, step_id, after.as_deref(), size + 1)
            .await?;
        let (rows, next_page_token) = page::finish(rows, size, |r| r.id.clone());
        Ok(pb::ListStepExecutionsResponse {
            step_executions: rows.iter().map(convert::step).collect(),
            next_page_token,
        })
    }

    /// GetWorkflowMetrics: zeros for a workflow without executions, NOT_FOUND for an id no
    /// workflow ever had; a deleted workflow keeps its metrics.
    pub async fn get_workflow_metrics(
        &self,
        req: pb::GetWorkflowMetricsRequest,
    ) -> Result<pb::WorkflowMetrics, Error> {
        request::resource_id("workflow_id", &req.workflow_id)?;
        let rows = self.store.metrics(&req.workflow_id).await?;
        if rows.is_empty()
            && self
                .workflows
                .workflow_deleted(&req.workflow_id)
                .await?
                .is_none()
        {
            return Err(Error::WorkflowNotFound(req.workflow_id));
        }
        let mut durations = self.store.durations(&req.workflow_id).await?;
        let mut metrics = pb::WorkflowMetrics {
            workflow_id: req.workflow_id.clone(),
            ..Default::default()
        };
        for r in rows {
            if r.step_id.is_empty() {
                let terminal = r.completed + r.failed + r.cancelled + r.timed_out;
                metrics.total = r.total;
                metrics.active = r.active;
                metrics.completed = r.completed;
                metrics.failed = r.failed;
                metrics.cancelled = r.cancelled;
                metrics.timed_out = r.timed_out;
                metrics.success_rate = if terminal > 0 {
                    r.completed as f64 / terminal as f64
                } else {
                    0.0
                };
                metrics.duration = Some(stats(std::mem::take(&mut durations.executions)));
                metrics.update_time = Some(meshflow_kit::convert::timestamp(r.update_time));
            } else {
                let step_durations = durations.steps.remove(&r.step_id).unwrap_or_default();
                metrics.steps.push(pb::StepMetrics {
                    step_id: r.step_id,
                    attempts: r.attempts,
                    succeeded: r.completed,
                    failed: r.failed,
                    skipped: r.skipped,
                    duration: Some(stats(step_durations)),
                });
            }
        }
        Ok(metrics)
    }
}
