//! The gRPC adapter of WebhookService: each handler converts, calls [`Service`], and maps the error.

use std::sync::Arc;

use meshflow_kit::ServerConfig;
use meshflow_kit::server::Mounts;
use meshflow_proto::webhook::v1 as pb;
use pb::webhook_service_server::{WebhookService, WebhookServiceServer};
use tonic::{Request, Response, Status};

use crate::service::{Outbound, Service};
use crate::store::Store;

/// Mounts WebhookService; deliveries leave through `outbound`.
pub fn mount(mounts: &mut Mounts, store: Store, outbound: Outbound, config: &ServerConfig) {
    let max = config.max_message_bytes;
    mounts.add(
        WebhookServiceServer::new(Grpc(Arc::new(Service::new(store, outbound))))
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
impl WebhookService for Grpc {
    async fn create_webhook(
        &self,
        req: Request<pb::CreateWebhookRequest>,
    ) -> Reply<pb::CreateWebhookResponse> {
        let webhook = self.0.create(req.into_inner()).await?;
        ok(pb::CreateWebhookResponse {
            webhook: Some(webhook),
        })
    }

    async fn get_webhook(
        &self,
        req: Request<pb::GetWebhookRequest>,
    ) -> Reply<pb::GetWebhookResponse> {
        let webhook = self.0.get(req.into_inner()).await?;
        ok(pb::GetWebhookResponse {
            webhook: Some(webhook),
        })
    }

    async fn list_webhooks(
        &self,
        req: Request<pb::ListWebhooksRequest>,
    ) -> Reply<pb::ListWebhooksResponse> {
        ok(self.0.list(req.into_inner()).await?)
    }

    async fn update_webhook(
        &self,
        req: Request<pb::UpdateWebhookRequest>,
    ) -> Reply<pb::UpdateWebhookResponse> {
        let webhook = self.0.update(req.into_inner()).await?;
        ok(pb::UpdateWebhookResponse {
            webhook: Some(webhook),
        })
    }

    async fn delete_webhook(
        &self,
        req: Request<pb::DeleteWebhookRequest>,
    ) -> Reply<pb::DeleteWebhookResponse> {
        self.0.delete(req.into_inner()).await?;
        ok(pb::DeleteWebhookResponse {})
    }

    async fn list_webhook_events(
        &self,
        req: Request<pb::ListWebhookEventsRequest>,
    ) -> Reply<pb::ListWebhookEventsResponse> {
        ok(self.0.list_events(req.into_inner()).await?)
    }

    async fn redeliver_webhook_event(
        &self,
        req: Request<pb::RedeliverWebhookEventRequest>,
    ) -> Reply<pb::RedeliverWebhookEventResponse> {
        let event = self.0.redeliver(req.into_inner()).await?;
        ok(pb::RedeliverWebhookEventResponse {
            webhook_event: Some(event),
        })
    }

    async fn test_webhook(
        &self,
        req: Request<pb::TestWebhookRequest>,
    ) -> Reply<pb::TestWebhookResponse> {
        let attempt = self.0.test(req.into_inner()).await?;
        ok(pb::TestWebhookResponse {
            attempt: Some(attempt),
        })
    }
}
