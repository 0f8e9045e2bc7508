//! OpenTelemetry export: a server started with `OTEL_EXPORTER_OTLP_ENDPOINT` sends one span per
//! step attempt, all in the execution's trace, to an OTLP collector (a real gRPC one, on 127.0.0.1),
//! and each HTTP request carries its attempt's span as `traceparent`.

use std::sync::{Arc, Mutex, PoisonError};

use meshflow::target::Target;
use meshflow_proto::execution::v1::EventType as E;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::json;

use crate::crash::{active_workflow, finish, start};
use crate::process::{Proc, shared_database_url};

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap_or_else(PoisonError::into_inner);
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn every_step_attempt_is_a_span_of_the_executions_trace() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let target = Target::start().await.expect("target");
    let url = shared_database_url().await;
    let mut server = Proc::spawn_env(
        &url,
        &["--allow-http-to", "127.0.0.0/8"],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())],
    );
    let channel = server.channel().await;
    let base = &target.base;
    let workflow = active_workflow(&channel, json!({"name": "traced", "steps": [
        {"id": "get", "http": {"method": "GET", "url": format!("{base}/item/1")}},
        {"id": "flaky", "dependsOn": ["get"], "http": {"method": "POST", "url": format!("{base}/flaky/1")},
         "retryPolicy": {"strategy": "RETRY_STRATEGY_FIXED", "maxAttempts": 2, "initialDelay": "0.01s"}},
        {"id": "keep", "dependsOn": ["flaky"], "transform": {"assignments": [{"target": "n", "expression": "1"}]}}]}))
    .await;
    let id = start(&channel, &workflow).await;
    let events = finish(&channel, &id).await;
    assert_eq!(
        events.last().map(|e| e.r#type),
        Some(E::ExecutionCompleted as i32)
    );
    drop(channel);
    // SIGTERM drains the server, which flushes its spans before it exits.
    assert!(server.signal_and_wait("TERM").await.success());

    let trace_id = id.replace('-', "");
    let spans: Vec<Span> = collector
        .spans
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter(|s| s.name.starts_with("step "))
        .cloned()
        .collect();
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    let count = |name: &str| names.iter().filter(|n| **n == name).count();
    assert_eq!(
        (count("step get"), count("step flaky"), count("step keep")),
        (1, 2, 1),
        "one span per attempt: {names:?}"
    );
    for span in &spans {
        assert_eq!(
            hex(&span.trace_id),
            trace_id,
            "{} is in the execution's trace",
            span.name
        );
    }
    let failed = spans
        .iter()
        .filter(|s| s.name == "step flaky")
        .filter(|s| s.status.as_ref().is_some_and(|st| st.code == 2))
        .count();
    assert_eq!(failed, 1, "the failed attempt's span has status ERROR");

    // Each request names its attempt's span as the parent of whatever the callee does.
    let sent: Vec<String> = target
        .log()
        .iter()
        .filter_map(|seen| seen.headers.get("traceparent").cloned())
        .collect();
    assert_eq!(sent.len(), 3);
    for header in &sent {
        let parts: Vec<&str> = header.split('-').collect();
        assert_eq!(parts[1], trace_id);
        assert!(
            spans
                .iter()
                .any(|s| hex(&s.span_id) == parts[2] && s.name != "step keep"),
            "{header} names an exported span"
        );
    }
}
