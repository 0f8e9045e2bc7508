//! The gRPC adapter of CircuitBreakerService: each handler converts, calls [`Service`], and maps
//! the error.

use std::sync::Arc;

use meshflow_kit::ServerConfig;
use meshflow_kit::server::Mounts;
use meshflow_proto::circuitbreaker::v1 as pb;
use pb::circuit_breaker_service_server::{CircuitBreakerService, CircuitBreakerServiceServer};
use tonic::{Request, Response, Status};

use crate::service::{Service, WatchStream};

/// Mounts CircuitBreakerService.
pub fn mount(mounts: &mut Mounts, service: Service, config: &ServerConfig) {
    let max = config.max_message_bytes;
    mounts.add(
        CircuitBreakerServiceServer::new(Grpc(Arc::new(service)))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    );
}

/// The tonic face of [`Service`].
#[derive(Clone)]
pub struct Grpc(Arc<Service>);

type Reply<T> = Result<Response<T>, Status>;

fn ok<T>(value: T) -> Reply<T> {
    Ok(Response::new(value))
}

#[tonic::async_trait]
impl CircuitBreakerService for Grpc {
    async fn list_circuit_breakers(
        &self,
        req: Request<pb::ListCircuitBreakersRequest>,
    ) -> Reply<pb::ListCircuitBreakersResponse> {
        ok(self.0.list(req.into_inner()).await?)
    }

    async fn get_circuit_breaker(
        &self,
        req: Request<pb::GetCircuitBreakerRequest>,
    ) -> Reply<pb::GetCircuitBreakerResponse> {
        let circuit_breaker = Some(self.0.get(req.into_inner()).await?);
        ok(pb::GetCircuitBreakerResponse { circuit_breaker })
    }

    async fn update_circuit_breaker_config(
        &self,
        req: Request<pb::UpdateCircuitBreakerConfigRequest>,
    ) -> Reply<pb::UpdateCircuitBreakerConfigResponse> {
        let circuit_breaker = Some(self.0.update_config(req.into_inner()).await?);
        ok(pb::UpdateCircuitBreakerConfigResponse { circuit_breaker })
    }

    async fn reset_circuit_breaker(
        &self,
        req: Request<pb::ResetCircuitBreakerRequest>,
    ) -> Reply<pb::ResetCircuitBreakerResponse> {
        let circuit_breaker = Some(self.0.reset(req.into_inner()).await?);
        ok(pb::ResetCircuitBreakerResponse { circuit_breaker })
    }

    async fn delete_circuit_breaker(
        &self,
        req: Request<pb::DeleteCircuitBreakerRequest>,
    ) -> Reply<pb::DeleteCircuitBreakerResponse> {
        self.0.delete(req.into_inner()).await?;
        ok(pb::DeleteCircuitBreakerResponse {})
    }

    async fn force_open_circuit_breaker(
        &self,
        req: Request<pb::ForceOpenCircuitBreakerRequest>,
    ) -> Reply<pb::ForceOpenCircuitBreakerResponse> {
        let circuit_breaker = Some(self.0.force_open(req.into_inner()).await?);
        ok(pb::ForceOpenCircuitBreakerResponse { circuit_breaker })
    }

    async fn disable_circuit_breaker(
        &self,
        req: Request<pb::DisableCircuitBreakerRequest>,
    ) -> Reply<pb::DisableCircuitBreakerResponse> {
        let circuit_breaker = Some(self.0.disable(req.into_inner()).await?);
        ok(pb::DisableCircuitBreakerResponse { circuit_breaker })
    }

    type WatchCircuitBreakersStream = WatchStream;

    async fn watch_circuit_breakers(
        &self,
        req: Request<pb::WatchCircuitBreakersRequest>,
    ) -> Reply<Self::WatchCircuitBreakersStream> {
        ok(self.0.watch(req.into_inner()).await?)
    }
}
