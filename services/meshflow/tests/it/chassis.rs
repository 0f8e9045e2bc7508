//! Health, reflection and draining: what every meshflow server offers besides its services.

use std::collections::BTreeSet;

use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1alpha;

use crate::support;

const WORKFLOW_SERVICES: &[&str] = &[
    "meshflow.workflow.v1.TransformationRuleService",
    "meshflow.workflow.v1.WorkflowService",
    "meshflow.workflow.v1.WorkflowTemplateService",
];

#[tokio::test]
async fn health_is_serving_for_every_mounted_service_and_the_server() {
    let server = support::start().await;
    let mut health = HealthClient::new(server.channel.clone());
    for service in WORKFLOW_SERVICES.iter().chain(&[""]) {
        let status = health
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .expect("check")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "meshflow.orchestrator.v1.OrchestratorService".into(),
        })
        .await
        .expect_err("not mounted");
    assert_eq!(unknown.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn reflection_lists_exactly_what_is_mounted_in_v1_and_v1alpha() {
    let server = support::start().await;
    let expected: BTreeSet<String> = WORKFLOW_SERVICES
        .iter()
        .chain(&[
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ])
        .map(|s| s.to_string())
        .collect();

    let mut v1 = ServerReflectionClient::new(server.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = v1
        .server_reflection_info(tokio_stream::once(request))
        .await
        .expect("v1")
        .into_inner();
    let response = stream.next().await.expect("a response").expect("ok");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected {response:?}")
    };
    let listed: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
    assert_eq!(listed, expected);

    // Every listed meshflow service can be described (its file is served), as grpcurl needs.
    let describe = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "meshflow.workflow.v1.WorkflowService".into(),
        )),
    };
    let mut stream = v1
        .server_reflection_info(tokio_stream::once(describe))
        .await
        .expect("v1")
        .into_inner();
    let response = stream.next().await.expect("a response").expect("ok");
    assert!(
        matches!(response.message_response, Some(MessageResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty())
    );

    let mut alpha =
        v1alpha::server_reflection_client::ServerReflectionClient::new(server.channel.clone());
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut stream = alpha
        .server_reflection_info(tokio_stream::once(request))
        .await
        .expect("v1alpha")
        .into_inner();
    let response = stream.next().await.expect("a response").expect("ok");
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("unexpected {response:?}")
    };
    let listed: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
    assert_eq!(listed, expected);
}

#[tokio::test]
async fn draining_turns_health_not_serving() {
    let mut config = support::config();
    config.shutdown_grace = std::time::Duration::from_secs(5);
    let server = support::start_with(config).await;
    let mut health = HealthClient::new(server.channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first: HealthCheckResponse = watch.next().await.expect("first").expect("ok");
    assert_eq!(first.status, ServingStatus::Serving as i32);

    let stopping = tokio::spawn(server.running.stop());
    let next = watch.next().await.expect("an update").expect("ok");
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    drop(watch);
    drop(server.channel);
    stopping.await.expect("join").expect("stops cleanly");
}
