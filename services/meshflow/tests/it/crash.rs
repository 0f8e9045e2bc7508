//! Durability under `kill -9`: executions caught mid-HTTP-step, mid-retry-backoff and mid-WAIT all
//! complete after a restart; no step that had SUCCEEDED is sent again; a step in flight at the kill is
//! sent again only with its same Idempotency-Key; WAIT deadlines and retry schedules hold. And two
//! replicas on one PostgreSQL: one is killed, the other completes its work.

use std::collections::HashMap;

use meshflow::target::Target;
use meshflow_proto::execution::v1::execution_service_client::ExecutionServiceClient;
use meshflow_proto::execution::v1::{self as epb, EventType as E, ExecutionStatus, StepStatus};
use meshflow_proto::orchestrator::v1 as opb;
use meshflow_proto::orchestrator::v1::orchestrator_service_client::OrchestratorServiceClient;
use meshflow_proto::workflow::v1 as wpb;
use meshflow_proto::workflow::v1::workflow_service_client::WorkflowServiceClient;
use serde_json::json;
use tonic::transport::Channel;

use crate::process::{Proc, shared_database_url};

const FLAGS: &[&str] = &[
    "--allow-http-to",
    "127.0.0.0/8",
    "--lease-ttl",
    "1s",
    "--poll-interval",
    "50ms",
    "--park-after",
    "200ms",
];

pub(crate) async fn active_workflow(channel: &Channel, doc: serde_json::Value) -> String {
    let mut doc = doc;
    doc["status"] = json!("WORKFLOW_STATUS_ACTIVE");
    let w: wpb::Workflow = serde_json::from_value(doc).expect("workflow json");
    WorkflowServiceClient::new(channel.clone())
        .create_workflow(wpb::CreateWorkflowRequest {
            workflow: Some(w),
            request_id: String::new(),
        })
        .await
        .expect("create")
        .into_inner()
        .workflow
        .expect("workflow")
        .workflow_id
}

pub(crate) async fn start(channel: &Channel, workflow_id: &str) -> String {
    OrchestratorServiceClient::new(channel.clone())
        .start_execution(opb::StartExecutionRequest {
            workflow_id: workflow_id.into(),
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner()
        .execution
        .expect("execution")
        .execution_id
}

/// Watches until an event matches.
async fn wait_for(channel: &Channel, id: &str, done: impl Fn(&epb::ExecutionEvent) -> bool) {
    let mut stream = crate::support::watch_stream(channel, id, 0).await;
    while let Some(m) = stream.message().await.expect("stream") {
        if done(&m.event.expect("event")) {
            return;
        }
    }
    panic!("execution {id} ended before the awaited event");
}

/// Watches to the end; returns every event.
pub(crate) async fn finish(channel: &Channel, id: &str) -> Vec<epb::ExecutionEvent> {
    let mut stream = crate::support::watch_stream(channel, id, 0).await;
    let mut events = Vec::new();
    while let Some(m) = stream.message().await.expect("stream") {
        events.push(m.event.expect("event"));
    }
    events
}

async fn attempts(channel: &Channel, id: &str) -> Vec<epb::StepExecution> {
    ExecutionServiceClient::new(channel.clone())
        .list_step_executions(epb::ListStepExecutionsRequest {
            execution_id: id.into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("steps")
        .into_inner()
        .step_executions
}

/// Where a test's driven clocks start: now, to the microsecond.
fn clock_start() -> chrono::DateTime<chrono::Utc> {
    use chrono::SubsecRound;
    chrono::Utc::now().trunc_subsecs(6)
}

fn ms(n: i64) -> chrono::Duration {
    chrono::Duration::milliseconds(n)
}

fn at(t: &Option<meshflow_proto::pbjson_types::Timestamp>) -> chrono::DateTime<chrono::Utc> {
    t.as_ref()
        .and_then(meshflow_kit::convert::from_timestamp)
        .expect("timestamp")
}

#[tokio::test]
async fn a_killed_server_resumes_every_execution_without_repeating_succeeded_steps() {
    let target = Target::start().await.expect("target");
    let url = shared_database_url().await;
    // Both servers run on a driven clock: the first stands still at `t0`; the second starts a
    // millisecond before the retries and waits are due (and past the first one's leases), and the
    // test moves it that last millisecond.
    let t0 = clock_start();
    let mut first = Proc::spawn_on_clock(&url, FLAGS, t0);
    let channel = first.channel().await;
    let base = &target.base;

    let in_flight = active_workflow(&channel, json!({"name": "in-flight", "steps": [
        {"id": "one", "http": {"method": "GET", "url": format!("{base}/item/1")}},
        {"id": "held", "dependsOn": ["one"], "http": {"method": "POST", "url": format!("{base}/gate"), "body": {"n": 1}}},
        {"id": "three", "dependsOn": ["held"], "http": {"method": "GET", "url": format!("{base}/item/3")}}]})).await;
    let backoff = active_workflow(&channel, json!({"name": "backoff", "steps": [
        {"id": "one", "http": {"method": "GET", "url": format!("{base}/item/1")}},
        {"id": "flaky", "dependsOn": ["one"], "http": {"method": "POST", "url": format!("{base}/flaky/1")},
         "retryPolicy": {"strategy": "RETRY_STRATEGY_FIXED", "maxAttempts": 3, "initialDelay": "2s"}},
        {"id": "three", "dependsOn": ["flaky"], "http": {"method": "GET", "url": format!("{base}/item/3")}}]})).await;
    let waits = active_workflow(&channel, json!({"name": "waits", "steps": [
        {"id": "one", "http": {"method": "GET", "url": format!("{base}/item/1")}},
        {"id": "nap", "dependsOn": ["one"], "wait": {"duration": "2s"}},
        {"id": "three", "dependsOn": ["nap"], "http": {"method": "GET", "url": format!("{base}/item/3")}}]})).await;

    let mut ids: HashMap<&str, Vec<String>> = HashMap::new();
    for (kind, workflow) in [
        ("in-flight", &in_flight),
        ("backoff", &backoff),
        ("waits", &waits),
    ] {
        for _ in 0..3 {
            ids.entry(kind)
                .or_default()
                .push(start(&channel, workflow).await);
        }
    }
    // Catch each where it should be at the kill.
    target.wait_for_requests(3 + 3 + 3 + 3 + 3).await;
    for id in &ids["in-flight"] {
        wait_for(&channel, id, |e| {
            e.step_path == "held" && e.r#type == E::StepStarted as i32
        })
        .await;
    }
    for id in &ids["backoff"] {
        wait_for(&channel, id, |e| {
            e.step_path == "flaky" && e.r#type == E::StepRetryScheduled as i32
        })
        .await;
    }
    for id in &ids["waits"] {
        wait_for(&channel, id, |e| {
            e.step_path == "nap" && e.r#type == E::StepWaiting as i32
        })
        .await;
    }
    drop(channel);
    first.signal_and_wait("KILL").await;
    let before_restart = target.counts();
    target.open_gate();

    let mut second = Proc::spawn_on_clock(&url, FLAGS, t0 + ms(1999));
    let channel = second.channel().await;
    second.advance(std::time::Duration::from_millis(1));
    for (kind, list) in &ids {
        for id in list {
            let events = finish(&channel, id).await;
            let last = events.last().expect("events");
            assert_eq!(
                last.r#type,
                E::ExecutionCompleted as i32,
                "{kind} {id}: {:?}",
                last
            );
            crate::support::assert_consecutive(&events, 1);
        }
    }

    let counts = target.counts();
    for (kind, list) in &ids {
        for id in list {
            let key = |path: &str| format!("{id}/{path}");
            assert_eq!(
                counts.get(&key("one")),
                Some(&1),
                "{kind}: a step that SUCCEEDED before the kill is not sent again"
            );
            assert_eq!(
                counts.get(&key("three")),
                Some(&1),
                "{kind}: later steps run once"
            );
            let steps = attempts(&channel, id).await;
            match *kind {
                "in-flight" => {
                    assert_eq!(before_restart.get(&key("held")), Some(&1));
                    assert_eq!(
                        counts.get(&key("held")),
                        Some(&2),
                        "the request in flight is sent again, with its same key"
                    );
                    let held: Vec<&epb::StepExecution> =
                        steps.iter().filter(|s| s.step_path == "held").collect();
                    assert_eq!(held.len(), 1, "re-sent as the same attempt");
                    assert_eq!(
                        (held[0].attempt, held[0].status),
                        (1, StepStatus::Succeeded as i32)
                    );
                }
                "backoff" => {
                    assert_eq!(
                        counts.get(&key("flaky")),
                        Some(&2),
                        "one failed attempt before, one after"
                    );
                    let flaky: Vec<&epb::StepExecution> =
                        steps.iter().filter(|s| s.step_path == "flaky").collect();
                    assert_eq!(flaky.len(), 2);
                    let due = at(&flaky[0].next_attempt_time);
                    assert_eq!(due, at(&flaky[0].end_time) + ms(2000));
                    assert_eq!(
                        at(&flaky[1].start_time),
                        due,
                        "the retry schedule held through the restart"
                    );
                }
                _ => {
                    let nap = steps.iter().find(|s| s.step_path == "nap").expect("nap");
                    assert_eq!(at(&nap.start_time), t0);
                    assert_eq!(
                        at(&nap.end_time),
                        t0 + ms(2000),
                        "the wait kept its deadline"
                    );
                }
            }
        }
    }
    // Metrics are written with each commit: exact through the kill. The attempt in flight at the
    // kill was sent twice but is one attempt.
    let metrics = crate::support::workflow_metrics(&channel, &in_flight).await;
    assert_eq!(
        (metrics.total, metrics.completed, metrics.active),
        (3, 3, 0)
    );
    for id in ["one", "held", "three"] {
        let step = metrics
            .steps
            .iter()
            .find(|s| s.step_id == id)
            .expect("per step");
        assert_eq!((step.attempts, step.succeeded), (3, 3), "{id}");
    }
    let execution = ExecutionServiceClient::new(channel.clone())
        .get_execution(epb::GetExecutionRequest {
            execution_id: ids["in-flight"][0].clone(),
        })
        .await
        .expect("get")
        .into_inner()
        .execution
        .expect("execution");
    assert_eq!(execution.status, ExecutionStatus::Completed as i32);
}

#[tokio::test]
async fn postgres_only_a_surviving_replica_takes_over_a_killed_ones_executions() {
    meshflow_kit::testing::require_postgres();
    let target = Target::start().await.expect("target");
    let url = shared_database_url().await;
    let t0 = clock_start();
    let mut doomed = Proc::spawn_on_clock(&url, FLAGS, t0);
    let mut survivor = Proc::spawn_on_clock(&url, FLAGS, t0);
    let doomed_channel = doomed.channel().await;
    let base = &target.base;
    let workflow = active_workflow(&doomed_channel, json!({"name": "shared", "steps": [
        {"id": "one", "http": {"method": "GET", "url": format!("{base}/item/1")}},
        {"id": "held", "dependsOn": ["one"], "http": {"method": "GET", "url": format!("{base}/gate")}},
        {"id": "three", "dependsOn": ["held"], "http": {"method": "GET", "url": format!("{base}/item/3")}}]})).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(start(&doomed_channel, &workflow).await);
    }
    target.wait_for_requests(10).await;
    drop(doomed_channel);
    doomed.signal_and_wait("KILL").await;
    target.open_gate();

    // The killed replica's leases (1 s, renewed at `t0`) expire on the survivor's clock.
    let channel = survivor.channel().await;
    survivor.advance(std::time::Duration::from_secs(2));
    for id in &ids {
        let events = finish(&channel, id).await;
        assert_eq!(
            events.last().map(|e| e.r#type),
            Some(E::ExecutionCompleted as i32),
            "{id}"
        );
        assert_eq!(target.counts().get(&format!("{id}/one")), Some(&1));
        assert_eq!(target.counts().get(&format!("{id}/three")), Some(&1));
    }
}

#[tokio::test]
async fn secrets_are_sent_but_never_stored_or_streamed() {
    const SECRET: &str = "s3cr3t-token-value";
    let target = Target::start().await.expect("target");
    let url = shared_database_url().await;
    let server = Proc::spawn_env(&url, FLAGS, &[("MESHFLOW_SECRET_TOKEN", SECRET)]);
    let channel = server.channel().await;
    let base = &target.base;
    let workflow = active_workflow(&channel, json!({"name": "secretive", "steps": [
        {"id": "call", "http": {"method": "POST", "url": format!("{base}/echo"),
            "headers": {"authorization": "Bearer ${secrets.TOKEN}"}, "body": {"token": "${secrets.TOKEN}"}}},
        {"id": "keep", "dependsOn": ["call"], "transform": {"assignments": [
            {"target": "vars.token", "expression": "secrets.TOKEN"},
            {"target": "echoed", "expression": "steps.call.output.body.headers.authorization"}]}}]})).await;
    let id = start(&channel, &workflow).await;
    let events = finish(&channel, &id).await;
    assert_eq!(
        events.last().map(|e| e.r#type),
        Some(E::ExecutionCompleted as i32)
    );

    let sent = target
        .log()
        .into_iter()
        .find(|s| s.uri == "/echo")
        .expect("request");
    assert_eq!(
        sent.headers.get("authorization").map(String::as_str),
        Some("Bearer s3cr3t-token-value")
    );

    let everything = format!(
        "{:?}{:?}{:?}",
        events,
        attempts(&channel, &id).await,
        ExecutionServiceClient::new(channel.clone())
            .get_execution(epb::GetExecutionRequest {
                execution_id: id.clone()
            })
            .await
            .expect("get")
            .into_inner()
    );
    assert!(!everything.contains(SECRET), "the secret leaked");
    assert!(everything.contains("Bearer [REDACTED]"));
}

#[tokio::test]
async fn a_step_timeout_keeps_its_deadline_through_a_restart() {
    let target = Target::start().await.expect("target");
    let url = shared_database_url().await;
    let t0 = clock_start();
    let mut first = Proc::spawn_on_clock(&url, FLAGS, t0);
    let channel = first.channel().await;
    let base = &target.base;
    // `held` never gets an answer (the gate stays shut); `tick` marks a second into it.
    let workflow = active_workflow(
        &channel,
        json!({"name": "step-timeout", "steps": [
        {"id": "held", "timeout": "3s", "onError": "ON_ERROR_CONTINUE",
         "http": {"method": "POST", "url": format!("{base}/gate")}},
        {"id": "tick", "wait": {"duration": "1s"}}]}),
    )
    .await;
    let id = start(&channel, &workflow).await;
    target.wait_for_requests(1).await;
    first.advance(std::time::Duration::from_secs(1));
    wait_for(&channel, &id, |e| {
        e.step_path == "tick" && e.r#type == E::StepSucceeded as i32
    })
    .await;
    drop(channel);
    first.signal_and_wait("KILL").await;

    // 2.5 s into the step, the second server resumes it (the first one's 1 s lease, last renewed
    // at t0 + 1 s, has expired on its clock) and sends its request again: half a second is left
    // of the step's timeout, counted from its first start. A timer started again on resuming
    // would end at t0 + 5.5 s.
    let mut second = Proc::spawn_on_clock(&url, FLAGS, t0 + ms(2500));
    let channel = second.channel().await;
    target.wait_for_requests(2).await;
    second.advance(std::time::Duration::from_millis(499));
    second.advance(std::time::Duration::from_millis(1));
    let events = tokio::time::timeout(std::time::Duration::from_secs(60), finish(&channel, &id))
        .await
        .expect("the step timed out 3 s after its first start");
    crate::support::assert_consecutive(&events, 1);
    assert_eq!(
        events.last().map(|e| e.r#type),
        Some(E::ExecutionCompleted as i32)
    );
    let held = |ty: E| {
        events
            .iter()
            .find(|e| e.step_path == "held" && e.r#type == ty as i32)
            .unwrap_or_else(|| panic!("held: no {ty:?}"))
    };
    let failed = held(E::StepFailed);
    assert_eq!(
        failed.error.as_ref().map(|e| e.code.as_str()),
        Some("timeout")
    );
    assert_eq!(at(&held(E::StepStarted).time), t0);
    assert_eq!(
        at(&failed.time),
        t0 + ms(3000),
        "the step timed out 3 s after it first started, not before"
    );
    assert_eq!(
        target.counts().get(&format!("{id}/held")),
        Some(&2),
        "sent once before the kill and once after it"
    );
}

/// A server restarted on its own work (the same SQLite file, or the same `--replica-id` on
/// PostgreSQL) takes its executions back at once: with a lease of an hour, waiting for the lease
/// to expire would never finish.
#[tokio::test]
async fn a_restarted_server_takes_its_executions_back_at_once() {
    let target = Target::start().await.expect("target");
    let url = shared_database_url().await;
    let flags = [
        "--allow-http-to",
        "127.0.0.0/8",
        "--lease-ttl",
        "1h",
        "--poll-interval",
        "50ms",
        "--replica-id",
        "pod-0",
    ];
    let mut first = Proc::spawn(&url, &flags);
    let channel = first.channel().await;
    let held = active_workflow(
        &channel,
        json!({"name": "held", "steps": [
        {"id": "held", "http": {"method": "POST", "url": format!("{}/gate", target.base)}}]}),
    )
    .await;
    let id = start(&channel, &held).await;
    wait_for(&channel, &id, |e| {
        e.step_path == "held" && e.r#type == E::StepStarted as i32
    })
    .await;
    target.wait_for_requests(1).await;
    drop(channel);
    first.signal_and_wait("KILL").await;
    target.open_gate();

    let second = Proc::spawn(&url, &flags);
    let channel = second.channel().await;
    let events = finish(&channel, &id).await;
    assert_eq!(
        events.last().map(|e| e.r#type),
        Some(E::ExecutionCompleted as i32)
    );
}
