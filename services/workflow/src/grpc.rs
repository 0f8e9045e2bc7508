//! The gRPC adapters: each handler converts, calls [`Service`], and maps the error.

use std::sync::Arc;

use meshflow_kit::ServerConfig;
use meshflow_kit::server::Mounts;
use meshflow_proto::workflow::v1 as pb;
use pb::transformation_rule_service_server::{
    TransformationRuleService, TransformationRuleServiceServer,
};
use pb::workflow_service_server::{WorkflowService, WorkflowServiceServer};
use pb::workflow_template_service_server::{
    WorkflowTemplateService, WorkflowTemplateServiceServer,
};
use tonic::{Request, Response, Status};

use crate::service::Service;
use crate::store::Store;

/// Mounts WorkflowService, WorkflowTemplateService and TransformationRuleService.
pub fn mount(
    mounts: &mut Mounts,
    store: Store,
    executions: Arc<dyn crate::Executions>,
    config: &ServerConfig,
) {
    let service = Grpc(Arc::new(Service::new(
        store,
        executions,
        config.limits.clone(),
    )));
    let max = config.max_message_bytes;
    mounts
        .add(
            WorkflowServiceServer::new(service.clone())
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add(
            WorkflowTemplateServiceServer::new(service.clone())
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add(
            TransformationRuleServiceServer::new(service)
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
impl WorkflowService for Grpc {
    async fn create_workflow(
        &self,
        req: Request<pb::CreateWorkflowRequest>,
    ) -> Reply<pb::CreateWorkflowResponse> {
        let workflow = self.0.create_workflow(req.into_inner()).await?;
        ok(pb::CreateWorkflowResponse {
            workflow: Some(workflow),
        })
    }

    async fn get_workflow(
        &self,
        req: Request<pb::GetWorkflowRequest>,
    ) -> Reply<pb::GetWorkflowResponse> {
        let workflow = self.0.get_workflow(req.into_inner()).await?;
        ok(pb::GetWorkflowResponse {
            workflow: Some(workflow),
        })
    }

    async fn list_workflows(
        &self,
        req: Request<pb::ListWorkflowsRequest>,
    ) -> Reply<pb::ListWorkflowsResponse> {
        ok(self.0.list_workflows(req.into_inner()).await?)
    }

    async fn update_workflow(
        &self,
        req: Request<pb::UpdateWorkflowRequest>,
    ) -> Reply<pb::UpdateWorkflowResponse> {
        let workflow = self.0.update_workflow(req.into_inner()).await?;
        ok(pb::UpdateWorkflowResponse {
            workflow: Some(workflow),
        })
    }

    async fn delete_workflow(
        &self,
        req: Request<pb::DeleteWorkflowRequest>,
    ) -> Reply<pb::DeleteWorkflowResponse> {
        self.0.delete_workflow(req.into_inner()).await?;
        ok(pb::DeleteWorkflowResponse {})
    }

    async fn validate_workflow(
        &self,
        req: Request<pb::ValidateWorkflowRequest>,
    ) -> Reply<pb::ValidateWorkflowResponse> {
        ok(self.0.validate_workflow(req.into_inner()).await?)
    }

    async fn list_workflow_versions(
        &self,
        req: Request<pb::ListWorkflowVersionsRequest>,
    ) -> Reply<pb::ListWorkflowVersionsResponse> {
        ok(self.0.list_versions(req.into_inner()).await?)
    }
}

#[tonic::async_trait]
impl WorkflowTemplateService for Grpc {
    async fn create_workflow_template(
        &self,
        req: Request<pb::CreateWorkflowTemplateRequest>,
    ) -> Reply<pb::CreateWorkflowTemplateResponse> {
        let template = self.0.create_template(req.into_inner()).await?;
        ok(pb::CreateWorkflowTemplateResponse {
            template: Some(template),
        })
    }

    async fn get_workflow_template(
        &self,
        req: Request<pb::GetWorkflowTemplateRequest>,
    ) -> Reply<pb::GetWorkflowTemplateResponse> {
        let template = self.0.get_template(req.into_inner()).await?;
        ok(pb::GetWorkflowTemplateResponse {
            template: Some(template),
        })
    }

    async fn list_workflow_templates(
        &self,
        req: Request<pb::ListWorkflowTemplatesRequest>,
    ) -> Reply<pb::ListWorkflowTemplatesResponse> {
        ok(self.0.list_templates(req.into_inner()).await?)
    }

    async fn delete_workflow_template(
        &self,
        req: Request<pb::DeleteWorkflowTemplateRequest>,
    ) -> Reply<pb::DeleteWorkflowTemplateResponse> {
        self.0.delete_template(req.into_inner()).await?;
        ok(pb::DeleteWorkflowTemplateResponse {})
    }

    async fn instantiate_workflow_template(
        &self,
        req: Request<pb::InstantiateWorkflowTemplateRequest>,
    ) -> Reply<pb::InstantiateWorkflowTemplateResponse> {
        let workflow = self.0.instantiate(req.into_inner()).await?;
        ok(pb::InstantiateWorkflowTemplateResponse {
            workflow: Some(workflow),
        })
    }
}

#[tonic::async_trait]
impl TransformationRuleService for Grpc {
    async fn create_transformation_rule(
        &self,
        req: Request<pb::CreateTransformationRuleRequest>,
    ) -> Reply<pb::CreateTransformationRuleResponse> {
        let rule = self.0.create_rule(req.into_inner()).await?;
        ok(pb::CreateTransformationRuleResponse { rule: Some(rule) })
    }

    async fn get_transformation_rule(
        &self,
        req: Request<pb::GetTransformationRuleRequest>,
    ) -> Reply<pb::GetTransformationRuleResponse> {
        let rule = self.0.get_rule(req.into_inner()).await?;
        ok(pb::GetTransformationRuleResponse { rule: Some(rule) })
    }

    async fn list_transformation_rules(
        &self,
        req: Request<pb::ListTransformationRulesRequest>,
    ) -> Reply<pb::ListTransformationRulesResponse> {
        ok(self.0.list_rules(req.into_inner()).await?)
    }

    async fn update_transformation_rule(
        &self,
        req: Request<pb::UpdateTransformationRuleRequest>,
    ) -> Reply<pb::UpdateTransformationRuleResponse> {
        let rule = self.0.update_rule(req.into_inner()).await?;
        ok(pb::UpdateTransformationRuleResponse { rule: Some(rule) })
    }

    async fn delete_transformation_rule(
        &self,
        req: Request<pb::DeleteTransformationRuleRequest>,
    ) -> Reply<pb::DeleteTransformationRuleResponse> {
        self.0.delete_rule(req.into_inner()).await?;
        ok(pb::DeleteTransformationRuleResponse {})
    }

    async fn test_transformation_rule(
        &self,
        req: Request<pb::TestTransformationRuleRequest>,
    ) -> Reply<pb::TestTransformationRuleResponse> {
        ok(self.0.test_rule(req.into_inner()).await?)
    }
}
