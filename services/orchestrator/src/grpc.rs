//! OrchestratorService: thin handlers over the [`Engine`].

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use meshflow_execution::convert;
use meshflow_kit::server::Mounts;
use meshflow_kit::{ServerConfig, Violation, Violations, page, request};
use meshflow_proto::orchestrator::v1 as pb;
use pb::orchestrator_service_server::{OrchestratorService, OrchestratorServiceServer};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::engine::Engine;
use crate::error::Error;

/// Mounts OrchestratorService.
pub fn mount(mounts: &mut Mounts, engine: Arc<Engine>, config: &ServerConfig) {
    let max = config.max_message_bytes;
    mounts.add(
        OrchestratorServiceServer::new(Grpc(engine))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    );
}

/// The tonic face of the engine.
#[derive(Clone)]
pub struct Grpc(Arc<Engine>);

type Events<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl OrchestratorService for Grpc {
    async fn start_execution(
        &self,
        req: Request<pb::StartExecutionRequest>,
    ) -> Result<Response<pb::StartExecutionResponse>, Status> {
        let row = self.0.start_execution(req.into_inner()).await?;
        Ok(Response::new(pb::StartExecutionResponse {
            execution: Some(convert::execution(&row)),
        }))
    }

    type ExecuteWorkflowStream = Events<pb::ExecuteWorkflowResponse>;

    async fn execute_workflow(
        &self,
        req: Request<pb::ExecuteWorkflowRequest>,
    ) -> Result<Response<Self::ExecuteWorkflowStream>, Status> {
        let r = req.into_inner();
        let (row, live) = self
            .0
            .start_watched(
                pb::StartExecutionRequest {
                    workflow_id: r.workflow_id,
                    version: r.version,
                    input: r.input,
                    variables: r.variables,
                    request_id: r.request_id,
                },
                true,
            )
            .await?;
        let first = pb::ExecuteWorkflowResponse {
            payload: Some(pb::execute_workflow_response::Payload::Execution(
                convert::execution(&row),
            )),
            commit_time: None,
        };
        let events = self.0.watch(row.id, 0, live).map(|e| {
            e.map(|d| pb::ExecuteWorkflowResponse {
                payload: Some(pb::execute_workflow_response::Payload::Event(d.event)),
                commit_time: d.commit_time,
            })
        });
        Ok(Response::new(Box::pin(
            tokio_stream::once(Ok(first)).chain(events),
        )))
    }

    type WatchExecutionStream = Events<pb::WatchExecutionResponse>;

    async fn watch_execution(
        &self,
        req: Request<pb::WatchExecutionRequest>,
    ) -> Result<Response<Self::WatchExecutionStream>, Status> {
        let r = req.into_inner();
        if r.after_sequence < 0 {
            return Err(Error::Invalid(vec![Violation::new(
                "after_sequence",
                "must not be negative",
            )])
            .into());
        }
        let row = self.0.get(&r.execution_id).await?;
        let events = self.0.watch(row.id, r.after_sequence, None).map(|e| {
            e.map(|d| pb::WatchExecutionResponse {
                event: Some(d.event),
                commit_time: d.commit_time,
            })
        });
        Ok(Response::new(Box::pin(events)))
    }

    async fn cancel_execution(
        &self,
        req: Request<pb::CancelExecutionRequest>,
    ) -> Result<Response<pb::CancelExecutionResponse>, Status> {
        let r = req.into_inner();
        let row = self.0.cancel(&r.execution_id, &r.reason).await?;
        Ok(Response::new(pb::CancelExecutionResponse {
            execution: Some(convert::execution(&row)),
        }))
    }

    async fn signal_execution(
        &self,
        req: Request<pb::SignalExecutionRequest>,
    ) -> Result<Response<pb::SignalExecutionResponse>, Status> {
        self.0.signal(req.into_inner()).await?;
        Ok(Response::new(pb::SignalExecutionResponse {}))
    }

    async fn list_active_executions(
        &self,
        req: Request<pb::ListActiveExecutionsRequest>,
    ) -> Result<Response<pb::ListActiveExecutionsResponse>, Status> {
        use meshflow_proto::execution::v1::ExecutionStatus as S;
        let r = req.into_inner();
        let mut v = Violations::new();
        let size = v.take(page::size(r.page_size, 50, 500));
        let after = v.take(page::decode::<String>(&r.page_token));
        if !r.workflow_id.is_empty() {
            v.take(request::resource_id("workflow_id", &r.workflow_id));
        }
        let (Some(size), Some(after), true) = (size, after, v.is_empty()) else {
            return Err(Error::Invalid(v.into_vec()).into());
        };
        let filter = meshflow_execution::store::ExecutionFilter {
            statuses: vec![S::Pending, S::Running, S::Waiting],
            oldest_first: true,
            workflow_id: Some(r.workflow_id).filter(|w| !w.is_empty()),
            ..Default::default()
        };
        let rows = self
            .0
            .store()
            .list_executions(&filter, after.as_deref(), size + 1)
            .await
            .map_err(Error::from)?;
        let (rows, next_page_token) = page::finish(rows, size, |r| r.id.clone());
        Ok(Response::new(pb::ListActiveExecutionsResponse {
            executions: rows.iter().map(convert::execution).collect(),
            next_page_token,
        }))
    }
}
