//! Starting a server and asserting on statuses.

use meshflow::{Running, ServiceName};
use meshflow_kit::ServerConfig;
use meshflow_proto::workflow::v1 as pb;
use pb::transformation_rule_service_client::TransformationRuleServiceClient;
use pb::workflow_service_client::WorkflowServiceClient;
use pb::workflow_template_service_client::WorkflowTemplateServiceClient;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// A server in this process with a channel to it.
pub struct Server {
    pub running: Running,
    pub channel: Channel,
}

impl Server {
    pub fn workflows(&self) -> WorkflowServiceClient<Channel> {
        WorkflowServiceClient::new(self.channel.clone())
    }

    pub fn templates(&self) -> WorkflowTemplateServiceClient<Channel> {
        WorkflowTemplateServiceClient::new(self.channel.clone())
    }

    pub fn rules(&self) -> TransformationRuleServiceClient<Channel> {
        TransformationRuleServiceClient::new(self.channel.clone())
    }
}

pub fn config() -> ServerConfig {
    let mut config = ServerConfig::from_env().expect("default config");
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config
}

pub async fn start_with(mut config: ServerConfig) -> Server {
    config.database_url = meshflow_kit::testing::fresh_database_url()
        .await
        .expect("test database");
    let running = meshflow::start(config, &[ServiceName::Workflow])
        .await
        .expect("server starts");
    let channel = Channel::from_shared(format!("http://{}", running.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connects");
    Server { running, channel }
}

pub async fn start() -> Server {
    start_with(config()).await
}

/// Asserts the code and that a field violation names exactly `field`; returns that violation's description.
#[track_caller]
pub fn assert_violation(status: &Status, field: &str) -> String {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let details = status.get_error_details();
    let info = details.error_info().expect("error info");
    assert_eq!(info.domain, "meshflow");
    let bad = details.bad_request().expect("bad request details");
    let found = bad.field_violations.iter().find(|v| v.field == field);
    match found {
        Some(v) => v.description.clone(),
        None => panic!(
            "no violation at {field}; got {:?}",
            bad.field_violations
                .iter()
                .map(|v| (&v.field, &v.description))
                .collect::<Vec<_>>()
        ),
    }
}

/// Asserts a status code and an ErrorInfo reason.
#[track_caller]
pub fn assert_reason(status: &Status, code: Code, reason: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    let details = status.get_error_details();
    let info = details.error_info().expect("error info");
    assert_eq!(
        (info.reason.as_str(), info.domain.as_str()),
        (reason, "meshflow"),
        "{status:?}"
    );
}

/// Parses proto3 JSON into a message, as a grpcurl user would type it.
pub fn from_json<T: serde::de::DeserializeOwned>(doc: serde_json::Value) -> T {
    serde_json::from_value(doc).expect("valid proto3 JSON")
}

/// A small valid workflow.
pub fn workflow(name: &str) -> pb::Workflow {
    from_json(serde_json::json!({
        "name": name,
        "tags": ["demo"],
        "inputSchema": {"type": "object", "required": ["id"]},
        "steps": [
            {"id": "fetch", "http": {"method": "GET", "url": "http://127.0.0.1:9/item/${input.id}"}},
            {"id": "total", "dependsOn": ["fetch"], "transform": {"assignments": [
                {"target": "total", "expression": "steps.fetch.output.body.price * 2"}]}}
        ]
    }))
}
