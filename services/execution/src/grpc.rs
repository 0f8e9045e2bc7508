//! ExecutionService: the read side of execution records.

use meshflow_kit::error as status;
use meshflow_kit::server::Mounts;
use meshflow_kit::{ServerConfig, Violation, Violations, page, request};
use meshflow_proto::execution::v1 as pb;
use pb::execution_service_server::{ExecutionService, ExecutionServiceServer};
use tonic::{Request, Response, Status};

use crate::convert;
use crate::store::{ExecutionFilter, Store, StoreError, quantile_ms};

/// Mounts ExecutionService; `workflows` tells which workflows exist (or existed).
pub fn mount(
    mounts: &mut Mounts,
    store: Store,
    workflows: meshflow_workflow::store::Store,
    config: &ServerConfig,
) {
    let max = config.max_message_bytes;
    mounts.add(
        ExecutionServiceServer::new(Grpc { store, workflows })
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    );
}

/// The tonic face of the execution store.
#[derive(Clone)]
pub struct Grpc {
    store: Store,
    workflows: meshflow_workflow::store::Store,
}

fn storage(e: StoreError) -> Status {
    status::storage(&e)
}

fn rejected(violations: &[Violation]) -> Status {
    status::invalid_argument("INVALID_ARGUMENT", violations)
}

fn stats(histogram: &serde_json::Value) -> pb::DurationStats {
    let h: Vec<i64> = serde_json::from_value(histogram.clone()).unwrap_or_default();
    let d = |q| {
        quantile_ms(&h, q)
            .map(|ms| meshflow_kit::convert::duration(std::time::Duration::from_millis(ms as u64)))
    };
    pb::DurationStats {
        p50: d(0.5),
        p95: d(0.95),
        p99: d(0.99),
    }
}

#[tonic::async_trait]
impl ExecutionService for Grpc {
    async fn get_execution(
        &self,
        req: Request<pb::GetExecutionRequest>,
    ) -> Result<Response<pb::GetExecutionResponse>, Status> {
        let req = req.into_inner();
        request::resource_id("execution_id", &req.execution_id).map_err(|v| rejected(&[v]))?;
        let row = self
            .store
            .execution(&req.execution_id)
            .await
            .map_err(storage)?;
        let row = row.ok_or_else(|| {
            status::not_found("EXECUTION_NOT_FOUND", "execution", &req.execution_id)
        })?;
        Ok(Response::new(pb::GetExecutionResponse {
            execution: Some(convert::execution(&row)),
        }))
    }

    async fn list_executions(
        &self,
        req: Request<pb::ListExecutionsRequest>,
    ) -> Result<Response<pb::ListExecutionsResponse>, Status> {
        let req = req.into_inner();
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
            return Err(rejected(v.as_slice()));
        };
        let rows = self
            .store
            .list_executions(&filter, after.as_deref(), size + 1)
            .await
            .map_err(storage)?;
        let (rows, next_page_token) = page::finish(rows, size, |r| r.id.clone());
        Ok(Response::new(pb::ListExecutionsResponse {
            executions: rows.iter().map(convert::execution).collect(),
            next_page_token,
        }))
    }

    async fn list_step_executions(
        &self,
        req: Request<pb::ListStepExecutionsRequest>,
    ) -> Result<Response<pb::ListStepExecutionsResponse>, Status> {
        let req = req.into_inner();
        let mut v = Violations::new();
        v.take(request::resource_id("execution_id", &req.execution_id));
        let size = v.take(page::size(req.page_size, 100, 1000));
        let after = v.take(page::decode::<String>(&req.page_token));
        let (Some(size), Some(after), true) = (size, after, v.is_empty()) else {
            return Err(rejected(v.as_slice()));
        };
        if self
            .store
            .execution(&req.execution_id)
            .await
            .map_err(storage)?
            .is_none()
        {
            return Err(status::not_found(
                "EXECUTION_NOT_FOUND",
                "execution",
                &req.execution_id,
            ));
        }
        let step_id = Some(req.step_id.as_str()).filter(|s| !s.is_empty());
        let rows = self
            .store
            .list_steps(&req.execution_id, step_id, after.as_deref(), size + 1)
            .await
            .map_err(storage)?;
        let (rows, next_page_token) = page::finish(rows, size, |r| r.id.clone());
        Ok(Response::new(pb::ListStepExecutionsResponse {
            step_executions: rows.iter().map(convert::step).collect(),
            next_page_token,
        }))
    }

    async fn get_workflow_metrics(
        &self,
        req: Request<pb::GetWorkflowMetricsRequest>,
    ) -> Result<Response<pb::GetWorkflowMetricsResponse>, Status> {
        let req = req.into_inner();
        request::resource_id("workflow_id", &req.workflow_id).map_err(|v| rejected(&[v]))?;
        let rows = self
            .store
            .metrics(&req.workflow_id)
            .await
            .map_err(storage)?;
        // A workflow without executions has no metrics rows yet: zeros if it exists (or was
        // deleted), NOT_FOUND if no workflow ever had the id.
        if rows.is_empty()
            && self
                .workflows
                .workflow_deleted(&req.workflow_id)
                .await
                .map_err(Status::from)?
                .is_none()
        {
            return Err(meshflow_workflow::Error::WorkflowNotFound(req.workflow_id).into());
        }
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
                metrics.duration = Some(stats(&r.duration_histogram));
                metrics.update_time = Some(meshflow_kit::convert::timestamp(r.update_time));
            } else {
                metrics.steps.push(pb::StepMetrics {
                    step_id: r.step_id,
                    attempts: r.attempts,
                    succeeded: r.completed,
                    failed: r.failed,
                    skipped: r.skipped,
                    duration: Some(stats(&r.duration_histogram)),
                });
            }
        }
        Ok(Response::new(pb::GetWorkflowMetricsResponse {
            metrics: Some(metrics),
        }))
    }
}
