//! Starting a server and asserting on statuses.

use epb::execution_service_client::ExecutionServiceClient;
use meshflow::{Running, ServiceName};
use meshflow_kit::ServerConfig;
use meshflow_proto::execution::v1 as epb;
use meshflow_proto::orchestrator::v1 as opb;
use meshflow_proto::webhook::v1 as whpb;
use meshflow_proto::workflow::v1 as pb;
use opb::orchestrator_service_client::OrchestratorServiceClient;
use pb::transformation_rule_service_client::TransformationRuleServiceClient;
use pb::workflow_service_client::WorkflowServiceClient;
use pb::workflow_template_service_client::WorkflowTemplateServiceClient;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;
use whpb::webhook_service_client::WebhookServiceClient;

/// A server in this process with a channel to it.
pub struct Server {
    pub running: Running,
    pub channel: Channel,
    /// The database it serves, for tests that write behind its back.
    pub database_url: String,
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

    /// A connection pool of `connections` to the database the server serves.
    pub async fn database(&self, connections: u32) -> sea_orm::DatabaseConnection {
        meshflow_kit::db::connect_url(
            &self.database_url,
            meshflow_kit::config::SqliteSynchronous::Normal,
            connections,
        )
        .await
        .expect("connect")
    }

    pub fn webhooks(&self) -> WebhookServiceClient<Channel> {
        WebhookServiceClient::new(self.channel.clone())
    }

    pub fn orchestrator(&self) -> OrchestratorServiceClient<Channel> {
        OrchestratorServiceClient::new(self.channel.clone())
    }

    pub fn executions(&self) -> ExecutionServiceClient<Channel> {
        ExecutionServiceClient::new(self.channel.clone())
    }

    /// Creates an ACTIVE workflow from proto3 JSON; returns its id.
    pub async fn active_workflow(&self, mut doc: serde_json::Value) -> String {
        doc["status"] = serde_json::json!("WORKFLOW_STATUS_ACTIVE");
        let w: pb::Workflow = from_json(doc);
        self.workflows()
            .create_workflow(pb::CreateWorkflowRequest {
                workflow: Some(w),
                request_id: String::new(),
            })
            .await
            .expect("create workflow")
            .into_inner()
            .workflow
            .expect("workflow")
            .workflow_id
    }

    /// Runs a workflow through ExecuteWorkflow; returns the execution and every streamed event.
    pub async fn execute(
        &self,
        workflow_id: &str,
        input: serde_json::Value,
    ) -> (epb::Execution, Vec<epb::ExecutionEvent>) {
        use opb::execute_workflow_response::Payload;
        let mut stream = self
            .orchestrator()
            .execute_workflow(opb::ExecuteWorkflowRequest {
                workflow_id: workflow_id.into(),
                input: Some(meshflow_kit::convert::from_json(&input)),
                ..Default::default()
            })
            .await
            .expect("execute")
            .into_inner();
        let mut execution = None;
        let mut events = Vec::new();
        while let Some(msg) = stream.message().await.expect("stream") {
            match msg.payload {
                Some(Payload::Execution(e)) => execution = Some(e),
                Some(Payload::Event(e)) => events.push(e),
                None => {}
            }
        }
        let id = execution.expect("the execution comes first").execution_id;
        (self.execution(&id).await, events)
    }

    /// Starts a workflow; returns the execution id.
    pub async fn start_execution(&self, workflow_id: &str, input: serde_json::Value) -> String {
        self.orchestrator()
            .start_execution(opb::StartExecutionRequest {
                workflow_id: workflow_id.into(),
                input: Some(meshflow_kit::convert::from_json(&input)),
                ..Default::default()
            })
            .await
            .expect("start")
            .into_inner()
            .execution
            .expect("execution")
            .execution_id
    }

    pub async fn metrics(&self, workflow_id: &str) -> epb::WorkflowMetrics {
        workflow_metrics(&self.channel, workflow_id).await
    }

    pub async fn execution(&self, id: &str) -> epb::Execution {
        self.executions()
            .get_execution(epb::GetExecutionRequest {
                execution_id: id.into(),
            })
            .await
            .expect("get execution")
            .into_inner()
            .execution
            .expect("execution")
    }

    /// A WatchExecution stream of the events after `after`.
    pub async fn watch_stream(
        &self,
        id: &str,
        after: i64,
    ) -> tonic::Streaming<opb::WatchExecutionResponse> {
        watch_stream(&self.channel, id, after).await
    }

    /// Every event after `after` until the terminal one.
    pub async fn watch(&self, id: &str, after: i64) -> Vec<epb::ExecutionEvent> {
        let mut stream = self.watch_stream(id, after).await;
        let mut events = Vec::new();
        while let Some(msg) = stream.message().await.expect("stream") {
            events.push(msg.event.expect("event"));
        }
        events
    }

    /// Watches until the `n`-th event of type `ty`; returns the events up to it.
    pub async fn watch_until_nth(
        &self,
        id: &str,
        ty: epb::EventType,
        n: usize,
    ) -> Vec<epb::ExecutionEvent> {
        let seen = std::cell::Cell::new(0);
        self.watch_until(id, |e| {
            if e.r#type == ty as i32 {
                seen.set(seen.get() + 1);
            }
            seen.get() == n
        })
        .await
    }

    /// Watches until an event matches; returns the events up to it.
    pub async fn watch_until(
        &self,
        id: &str,
        done: impl Fn(&epb::ExecutionEvent) -> bool,
    ) -> Vec<epb::ExecutionEvent> {
        let mut stream = self.watch_stream(id, 0).await;
        let mut events = Vec::new();
        while let Some(msg) = stream.message().await.expect("stream") {
            let e = msg.event.expect("event");
            let stop = done(&e);
            events.push(e);
            if stop {
                break;
            }
        }
        events
    }
}

/// A WatchExecution stream through `channel` of the events after `after`.
pub async fn watch_stream(
    channel: &Channel,
    id: &str,
    after: i64,
) -> tonic::Streaming<opb::WatchExecutionResponse> {
    OrchestratorServiceClient::new(channel.clone())
        .watch_execution(opb::WatchExecutionRequest {
            execution_id: id.into(),
            after_sequence: after,
        })
        .await
        .expect("watch")
        .into_inner()
}

/// GetWorkflowMetrics through `channel`.
pub async fn workflow_metrics(channel: &Channel, workflow_id: &str) -> epb::WorkflowMetrics {
    ExecutionServiceClient::new(channel.clone())
        .get_workflow_metrics(epb::GetWorkflowMetricsRequest {
            workflow_id: workflow_id.into(),
        })
        .await
        .expect("metrics")
        .into_inner()
        .metrics
        .expect("metrics")
}

pub fn config() -> ServerConfig {
    let mut config = ServerConfig::from_env().expect("default config");
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config
}

pub async fn start_with(config: ServerConfig) -> Server {
    start_services(config, &[ServiceName::Workflow]).await
}

/// A server running every service, steps allowed to reach loopback, due work found every 20ms.
pub fn engine_config() -> ServerConfig {
    let mut config = config();
    config.allow_http_to = vec!["127.0.0.0/8".into()];
    config.poll_interval = std::time::Duration::from_millis(20);
    config
}

pub async fn start_services(config: ServerConfig, services: &[ServiceName]) -> Server {
    start_services_with_clock(config, services, meshflow_kit::clock::system()).await
}

/// Every service, the engine scheduling by a clock the test advances: retries, waits and timeouts
/// happen when the test says, whatever the machine's load. Advance it by less than the lease
/// (15 s), which the engine renews by the same clock.
pub async fn start_with_manual_clock() -> (Server, std::sync::Arc<meshflow_kit::clock::ManualClock>)
{
    let clock = meshflow_kit::clock::ManualClock::starting_now();
    let server = start_services_with_clock(engine_config(), ServiceName::ALL, clock.clone()).await;
    (server, clock)
}

async fn start_services_with_clock(
    mut config: ServerConfig,
    services: &[ServiceName],
    clock: std::sync::Arc<dyn meshflow_kit::clock::Clock>,
) -> Server {
    config.database_url = meshflow_kit::testing::fresh_database_url()
        .await
        .expect("test database");
    start_services_on(config, services, clock).await
}

/// A second server on the database of another (`config.database_url`): a replica.
pub async fn start_services_on(
    config: ServerConfig,
    services: &[ServiceName],
    clock: std::sync::Arc<dyn meshflow_kit::clock::Clock>,
) -> Server {
    let database_url = config.database_url.clone();
    let running = meshflow::start_with_clock(config, services, clock)
        .await
        .expect("server starts");
    let channel = Channel::from_shared(format!("http://{}", running.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connects");
    Server {
        running,
        channel,
        database_url,
    }
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

/// Event types in order.
pub fn types(events: &[epb::ExecutionEvent]) -> Vec<epb::EventType> {
    events
        .iter()
        .map(|e| epb::EventType::try_from(e.r#type).unwrap_or_default())
        .collect()
}

/// Asserts sequences run 1, 2, 3, ... (or from `first`) without gap or duplicate.
#[track_caller]
pub fn assert_consecutive(events: &[epb::ExecutionEvent], first: i64) {
    let seqs: Vec<i64> = events.iter().map(|e| e.sequence).collect();
    let expected: Vec<i64> = (first..first + seqs.len() as i64).collect();
    assert_eq!(seqs, expected);
}
