//! The gRPC adapter of ExecutionService: each handler converts, calls [`Service`], and maps the
//! error.

use meshflow_kit::ServerConfig;
use meshflow_kit::server::Mounts;
use meshflow_proto::execution::v1 as pb;
use pb::execution_service_server::{ExecutionService, ExecutionServiceServer};
use tonic::{Request, Response, Status};

use crate::service::Service;
use crate::store::Store;

/// Mounts ExecutionService; `workflows` tells which workflows exist (or existed).
pub fn mount(
    mounts: &mut Mounts,
    store: Store,
    workflows: meshflow_workflow::store::Store,
    config: &ServerConfig,
) {
    let max = config.max_message_bytes;
    mounts.add(
        ExecutionServiceServer::new(Grpc(Service::new(store, workflows)))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    );
}

/// The tonic face of [`Service`].
#[derive(Clone)]
pub struct Grpc(Service);

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl ExecutionService for Grpc {
    async fn get_execution(
        &self,
        req: Request<pb::GetExecutionRequest>,
    ) -> Reply<pb::GetExecutionResponse> {
        let execution = self.0.get_execution(req.into_inner()).await?;
        Ok(Response::new(pb::GetExecutionResponse {
            execution: Some(execution),
        }))
    }

    async fn list_executions(
        &self,
        req: Request<pb::ListExecutionsRequest>,
    ) -> Reply<pb::ListExecutionsResponse> {
        Ok(Response::new(
            self.0.list_executions(req.into_inner()).await?,
        ))
    }

    async fn list_step_executions(
        &self,
        req: Request<pb::ListStepExecutionsRequest>,
    ) -> Reply<pb::ListStepExecutionsResponse> {
        Ok(Response::new(
            self.0.list_step_executions(req.into_inner()).await?,
        ))
    }

    async fn get_workflow_metrics(
        &self,
        req: Request<pb::GetWorkflowMetricsRequest>,
    ) -> Reply<pb::GetWorkflowMetricsResponse> {
        let metrics = self.0.get_workflow_metrics(req.into_inner()).await?;
        Ok(Response::new(pb::GetWorkflowMetricsResponse {
            metrics: Some(metrics),
        }))
    }
}
