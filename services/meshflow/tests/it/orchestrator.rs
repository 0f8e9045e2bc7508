//! OrchestratorService end to end: every step type, retries, timeouts, cancel, signals, SSRF.

use meshflow::target::Target;
use meshflow_proto::execution::v1::{self as epb, EventType as E, ExecutionStatus, StepStatus};
use meshflow_proto::orchestrator::v1 as opb;
use serde_json::json;
use tonic::Code;

use crate::support::{self, assert_consecutive, assert_reason, assert_violation, types};

fn status(e: &epb::Execution) -> ExecutionStatus {
    ExecutionStatus::try_from(e.status).unwrap_or_default()
}

fn output(e: &epb::Execution) -> serde_json::Value {
    e.output
        .as_ref()
        .map(meshflow_kit::convert::to_json)
        .unwrap_or_default()
}

#[tokio::test]
async fn all_nine_step_types_run_to_completion() {
    let target = Target::start().await.expect("target");
    let (server, clock) = support::start_with_manual_clock().await;
    let id = server
        .active_workflow(json!({"name": "nine", "variables": {"base": target.base, "factor": 2},
          "inputSchema": {"type": "object", "required": ["n"]},
          "steps": [
            {"id": "check", "validation": {"value": "input", "jsonSchema": {"properties": {"n": {"type": "integer", "minimum": 1}}},
               "rules": [{"expression": "value.n < 100", "message": "n too big"}]}},
            {"id": "fetch", "dependsOn": ["check"], "http": {"method": "GET", "url": "${vars.base}/item/${input.n}",
               "extract": {"price": "response.body.price", "status": "response.status"}}},
            {"id": "double", "dependsOn": ["fetch"], "transform": {"assignments": [
               {"target": "price", "expression": "steps.fetch.output.price * double(vars.factor)"},
               {"target": "vars.doubled", "expression": "output.price"}]}},
            {"id": "branch", "dependsOn": ["double"], "conditional": {"branches": [
               {"condition": "steps.double.output.price > 1000.0", "steps": [{"id": "big", "functionCall": {"function": "uuid"}}]},
               {"condition": "steps.double.output.price > 1.0", "steps": [{"id": "mid", "functionCall": {"function": "log", "arguments": {"message": "mid ${steps.double.output.price}"}}}]}],
               "otherwise": [{"id": "small", "functionCall": {"function": "uuid"}}]}},
            {"id": "fan", "dependsOn": ["branch"], "parallel": {"branches": [
               {"name": "a", "steps": [{"id": "pa", "http": {"method": "GET", "url": "${vars.base}/item/10"}}]},
               {"name": "b", "steps": [{"id": "pb", "functionCall": {"function": "sum", "arguments": {"values": [1, 2, 3]}}}]}]}},
            {"id": "each", "dependsOn": ["fan"], "forEach": {"items": "[1, 2, 3]", "maxConcurrency": 2, "steps": [
               {"id": "get", "http": {"method": "GET", "url": "${vars.base}/item/${item}"}},
               {"id": "tag", "dependsOn": ["get"], "transform": {"assignments": [{"target": "i", "expression": "index"}]}}]}},
            {"id": "total", "dependsOn": ["each"], "functionCall": {"function": "sum",
               "arguments": {"values": "${steps.each.output.map(o, o.get.body.price)}"}}},
            {"id": "pause", "dependsOn": ["total"], "wait": {"duration": "5s"}},
            {"id": "notify", "dependsOn": ["pause"], "webhookCall": {"url": "${vars.base}/echo", "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
               "eventType": "order.priced", "payload": {"total": "${steps.total.output}"}}}
          ]}))
        .await;

    // The pause ends when the clock is advanced past it, not before.
    let run = server.start_execution(&id, json!({"n": 4})).await;
    server.watch_until_nth(&run, E::StepWaiting, 1).await;
    clock.advance(std::time::Duration::from_secs(4));
    assert_ne!(
        status(&server.execution(&run).await),
        ExecutionStatus::Completed
    );
    clock.advance(std::time::Duration::from_secs(1));
    let events = server.watch(&run, 0).await;
    let execution = server.execution(&run).await;
    assert_eq!(
        status(&execution),
        ExecutionStatus::Completed,
        "{:?}",
        execution.error
    );
    assert_consecutive(&events, 1);
    let t = types(&events);
    assert_eq!(t.first(), Some(&E::ExecutionStarted));
    assert_eq!(t.last(), Some(&E::ExecutionCompleted));
    assert!(
        t.contains(&E::StepSkipped),
        "the branches not taken are skipped"
    );
    assert!(t.contains(&E::StepWaiting));
    assert!(t.contains(&E::Log));

    let out = output(&execution);
    // API values are protobuf Values (doubles); integral ones come back as integers.
    assert_eq!(out["fetch"], json!({"price": 6, "status": 200}));
    assert_eq!(out["double"], json!({"price": 12}));
    assert_eq!(out["branch"]["branch"], json!(1));
    assert_eq!(out["fan"]["b"]["pb"], json!(6));
    assert_eq!(
        out["each"][2]["tag"],
        json!({"i": 2}),
        "outputs in item order"
    );
    assert_eq!(out["total"], json!(9));
    let vars = meshflow_kit::convert::struct_to_json(execution.variables.as_ref().expect("vars"));
    assert_eq!(vars["doubled"], json!(12));

    // Every step's start and end is in the stream; the skipped ones are marked.
    let skipped: Vec<&str> = events
        .iter()
        .filter(|e| e.r#type == E::StepSkipped as i32)
        .map(|e| e.step_path.as_str())
        .collect();
    assert_eq!(skipped, ["branch/big", "branch/small"]);
    for step in [
        "check",
        "fetch",
        "double",
        "branch",
        "fan",
        "each",
        "total",
        "pause",
        "notify",
        "branch/mid",
        "fan[a]/pa",
        "each[0]/get",
        "each[2]/tag",
    ] {
        assert!(
            events
                .iter()
                .any(|e| e.step_path == step && e.r#type == E::StepSucceeded as i32),
            "{step} succeeded"
        );
    }

    // The webhook went out signed (Standard Webhooks), with a stable id.
    let hook = target
        .log()
        .into_iter()
        .find(|s| s.uri == "/echo")
        .expect("webhook delivered");
    let id_header = hook.headers.get("webhook-id").expect("webhook-id").clone();
    let ts: i64 = hook
        .headers
        .get("webhook-timestamp")
        .and_then(|t| t.parse().ok())
        .expect("timestamp");
    let expected = meshflow_webhook::signature::sign(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        &id_header,
        ts,
        &hook.body,
    )
    .expect("sign");
    assert_eq!(hook.headers.get("webhook-signature"), Some(&expected));
    let body: serde_json::Value = serde_json::from_str(&hook.body).expect("json");
    assert_eq!(
        (body["type"].as_str(), &body["data"]),
        (Some("order.priced"), &json!({"total": 9.0}))
    );

    // Attempts are listed with input, output and timings.
    let steps = server
        .executions()
        .list_step_executions(epb::ListStepExecutionsRequest {
            execution_id: execution.execution_id.clone(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("steps")
        .into_inner()
        .step_executions;
    let fetch = steps
        .iter()
        .find(|s| s.step_path == "fetch")
        .expect("fetch attempt");
    assert_eq!(
        (fetch.status, fetch.attempt),
        (StepStatus::Succeeded as i32, 1)
    );
    assert!(
        fetch.input.is_some()
            && fetch.output.is_some()
            && fetch.start_time.is_some()
            && fetch.duration.is_some()
    );
    let mid = steps
        .iter()
        .find(|s| s.step_path == "branch/mid")
        .expect("mid");
    assert_eq!(mid.logs.len(), 1);
    assert_eq!(mid.logs[0].message, "mid 12");
}

#[tokio::test]
async fn retries_reuse_the_idempotency_key_and_honour_the_policy() {
    let target = Target::start().await.expect("target");
    let (server, clock) = support::start_with_manual_clock().await;
    let id = server
        .active_workflow(json!({"name": "flaky", "steps": [
            {"id": "call", "http": {"method": "POST", "url": format!("{}/flaky/2", target.base), "body": {"x": 1}},
             "retryPolicy": {"strategy": "RETRY_STRATEGY_FIXED", "maxAttempts": 3, "initialDelay": "5s"}}]}))
        .await;
    // Each retry is sent when the clock reaches its time: 5 s after the failure, not before.
    let run = server.start_execution(&id, json!({})).await;
    for retry in 1..=2 {
        server
            .watch_until_nth(&run, E::StepRetryScheduled, retry)
            .await;
        clock.advance(std::time::Duration::from_millis(4_900));
        assert_eq!(target.log().len(), retry, "no retry before its time");
        clock.advance(std::time::Duration::from_millis(100));
        target.wait_for_requests(retry + 1).await;
    }
    let events = server.watch(&run, 0).await;
    let execution = server.execution(&run).await;
    assert_eq!(
        status(&execution),
        ExecutionStatus::Completed,
        "{:?}",
        execution.error
    );
    assert_eq!(
        types(&events),
        [
            E::ExecutionStarted,
            E::StepStarted,
            E::StepRetryScheduled,
            E::StepStarted,
            E::StepRetryScheduled,
            E::StepStarted,
            E::StepSucceeded,
            E::ExecutionCompleted
        ]
    );
    let attempts: Vec<u32> = events
        .iter()
        .filter(|e| e.r#type == E::StepStarted as i32)
        .map(|e| e.attempt)
        .collect();
    assert_eq!(attempts, [1, 2, 3]);
    let retry = events
        .iter()
        .find(|e| e.r#type == E::StepRetryScheduled as i32)
        .expect("retry");
    assert!(retry.next_attempt_time.is_some());
    assert_eq!(
        retry.error.as_ref().map(|e| e.code.as_str()),
        Some("http_status")
    );

    let key = format!("{}/call", execution.execution_id);
    assert_eq!(
        target.counts().get(&key),
        Some(&3),
        "three attempts, one key"
    );
    let traceparents: Vec<String> = target
        .log()
        .iter()
        .filter_map(|s| s.headers.get("traceparent").cloned())
        .collect();
    assert_eq!(traceparents.len(), 3);
    let trace_ids: std::collections::BTreeSet<&str> = traceparents
        .iter()
        .filter_map(|t| t.split('-').nth(1))
        .collect();
    assert_eq!(trace_ids.len(), 1, "one trace per execution");

    let steps = server
        .executions()
        .list_step_executions(epb::ListStepExecutionsRequest {
            execution_id: execution.execution_id.clone(),
            ..Default::default()
        })
        .await
        .expect("steps")
        .into_inner()
        .step_executions;
    let statuses: Vec<(u32, i32)> = steps.iter().map(|s| (s.attempt, s.status)).collect();
    assert_eq!(
        statuses,
        [
            (1, StepStatus::Failed as i32),
            (2, StepStatus::Failed as i32),
            (3, StepStatus::Succeeded as i32)
        ]
    );
}

#[tokio::test]
async fn failures_fail_the_execution_unless_continued() {
    let target = Target::start().await.expect("target");
    let server =
        support::start_services(support::engine_config(), meshflow::ServiceName::ALL).await;
    let failing = server
        .active_workflow(json!({"name": "fails", "steps": [
            {"id": "bad", "http": {"method": "GET", "url": format!("{}/status/404", target.base)}},
            {"id": "after", "dependsOn": ["bad"], "functionCall": {"function": "uuid"}}]}))
        .await;
    let (execution, events) = server.execute(&failing, json!({})).await;
    assert_eq!(status(&execution), ExecutionStatus::Failed);
    let error = execution.error.expect("error");
    assert_eq!(
        (error.code.as_str(), error.step_path.as_str()),
        ("http_status", "bad")
    );
    assert_eq!(types(&events).last(), Some(&E::ExecutionFailed));
    assert!(
        !events.iter().any(|e| e.step_path == "after"),
        "a 404 is not retried and nothing after it runs"
    );

    let continuing = server
        .active_workflow(json!({"name": "continues", "steps": [
            {"id": "bad", "onError": "ON_ERROR_CONTINUE", "http": {"method": "GET", "url": format!("{}/status/404", target.base)}},
            {"id": "after", "dependsOn": ["bad"], "transform": {"assignments": [{"target": "saw", "expression": "steps.bad.status"}]}}]}))
        .await;
    let (execution, _) = server.execute(&continuing, json!({})).await;
    assert_eq!(status(&execution), ExecutionStatus::Completed);
    assert_eq!(output(&execution)["after"], json!({"saw": "FAILED"}));
}

#[tokio::test]
async fn signals_wake_waits_and_carry_a_payload() {
    let server =
        support::start_services(support::engine_config(), meshflow::ServiceName::ALL).await;
    let id = server
        .active_workflow(json!({"name": "approval", "steps": [
            {"id": "approval", "wait": {"signal": "approved", "timeout": "3600s"}},
            {"id": "record", "dependsOn": ["approval"], "transform": {"assignments": [{"target": "by", "expression": "steps.approval.output.by"}]}}]}))
        .await;
    let execution_id = server.start_execution(&id, json!({})).await;
    server
        .watch_until(&execution_id, |e| e.r#type == E::StepWaiting as i32)
        .await;
    let mut orchestrator = server.orchestrator();
    for _ in 0..2 {
        // The same request_id delivers the signal once.
        orchestrator
            .signal_execution(opb::SignalExecutionRequest {
                execution_id: execution_id.clone(),
                signal_name: "approved".into(),
                payload: Some(meshflow_kit::convert::from_json(&json!({"by": "ana"}))),
                request_id: "sig-1".into(),
            })
            .await
            .expect("signal");
    }
    let events = server.watch(&execution_id, 0).await;
    assert_consecutive(&events, 1);
    assert_eq!(
        types(&events)
            .iter()
            .filter(|t| **t == E::SignalReceived)
            .count(),
        1
    );
    let execution = server.execution(&execution_id).await;
    assert_eq!(status(&execution), ExecutionStatus::Completed);
    assert_eq!(output(&execution)["record"], json!({"by": "ana"}));

    let err = orchestrator
        .signal_execution(opb::SignalExecutionRequest {
            execution_id: execution_id.clone(),
            signal_name: "approved".into(),
            ..Default::default()
        })
        .await
        .expect_err("ended");
    assert_reason(&err, Code::FailedPrecondition, "EXECUTION_ENDED");
    let err = orchestrator
        .signal_execution(opb::SignalExecutionRequest {
            execution_id,
            signal_name: "bad name".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad name");
    assert_violation(&err, "signal_name");
    // Every bad field at once, before the execution is looked up.
    let err = orchestrator
        .signal_execution(opb::SignalExecutionRequest {
            execution_id: String::new(),
            signal_name: "bad name".into(),
            request_id: "r".repeat(129),
            // Its payload would be its WAIT step's output: larger than a step's output may be.
            payload: Some(meshflow_kit::convert::from_json(&json!(
                "x".repeat(1024 * 1024)
            ))),
        })
        .await
        .expect_err("bad fields");
    for field in ["execution_id", "signal_name", "request_id", "payload"] {
        assert_violation(&err, field);
    }
}

/// A signal wakes the wait on its name even while other waits on other names run beside it, and
/// one sent before its wait began is found when the wait begins. The waits end within the park
/// threshold, so the execution stays with its driver, which hears of each signal from the signal.
#[tokio::test]
async fn every_signal_reaches_its_own_wait() {
    let mut config = support::engine_config();
    config.poll_interval = std::time::Duration::from_secs(3600);
    config.park_after = std::time::Duration::from_secs(3600);
    let server = support::start_services(config, meshflow::ServiceName::ALL).await;
    let id = server
        .active_workflow(json!({"name": "signals", "steps": [
            {"id": "both", "parallel": {"branches": [
                {"name": "a", "steps": [{"id": "wa", "wait": {"signal": "a", "timeout": "600s"}}]},
                {"name": "b", "steps": [{"id": "wb", "wait": {"signal": "b", "timeout": "600s"}}]}]}},
            {"id": "later", "dependsOn": ["both"], "wait": {"signal": "c", "timeout": "600s"}}]}))
        .await;
    let execution_id = server.start_execution(&id, json!({})).await;
    let waiting = std::cell::Cell::new(0);
    server
        .watch_until(&execution_id, |e| {
            if e.r#type == E::StepWaiting as i32 {
                waiting.set(waiting.get() + 1);
            }
            waiting.get() == 2
        })
        .await;
    let mut orchestrator = server.orchestrator();
    // "c" before its wait begins, then "b" and "a" to the waits running side by side.
    for name in ["c", "b", "a"] {
        orchestrator
            .signal_execution(opb::SignalExecutionRequest {
                execution_id: execution_id.clone(),
                signal_name: name.into(),
                ..Default::default()
            })
            .await
            .expect("signal");
    }
    let ended = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        server.watch_until(&execution_id, |e| e.r#type == E::ExecutionCompleted as i32),
    )
    .await
    .expect("every wait heard its signal");
    assert_eq!(
        types(&ended)
            .iter()
            .filter(|t| **t == E::SignalReceived)
            .count(),
        3
    );
}

#[tokio::test]
async fn cancel_stops_running_and_pending_steps() {
    let target = Target::start().await.expect("target");
    let server =
        support::start_services(support::engine_config(), meshflow::ServiceName::ALL).await;
    let id = server
        .active_workflow(json!({"name": "cancel-me", "steps": [
            {"id": "held", "http": {"method": "GET", "url": format!("{}/gate", target.base)}},
            {"id": "never", "dependsOn": ["held"], "functionCall": {"function": "uuid"}},
            {"id": "waiting", "wait": {"signal": "go"}}]}))
        .await;
    let execution_id = server.start_execution(&id, json!({})).await;
    target.wait_for_requests(1).await;
    server
        .watch_until(&execution_id, |e| e.r#type == E::StepWaiting as i32)
        .await;
    let cancelled = server
        .orchestrator()
        .cancel_execution(opb::CancelExecutionRequest {
            execution_id: execution_id.clone(),
            reason: "no longer needed".into(),
        })
        .await
        .expect("cancel")
        .into_inner()
        .execution
        .expect("execution");
    assert_eq!(status(&cancelled), ExecutionStatus::Cancelled);
    let events = server.watch(&execution_id, 0).await;
    assert_consecutive(&events, 1);
    let last = events.last().expect("events");
    assert_eq!(
        (last.r#type, last.reason.as_str()),
        (E::ExecutionCancelled as i32, "no longer needed")
    );
    let cancelled_steps: Vec<&str> = events
        .iter()
        .filter(|e| e.r#type == E::StepCancelled as i32)
        .map(|e| e.step_path.as_str())
        .collect();
    assert_eq!(cancelled_steps, ["held", "waiting"]);
    assert!(
        !events.iter().any(|e| e.step_path == "never"),
        "pending steps never start"
    );
    target.open_gate();

    let err = server
        .orchestrator()
        .cancel_execution(opb::CancelExecutionRequest {
            execution_id,
            reason: String::new(),
        })
        .await
        .expect_err("already ended");
    assert_reason(&err, Code::FailedPrecondition, "EXECUTION_ENDED");
}

/// Another replica stores a cancellation by setting the execution's wake-up, and a commit of the
/// driver that races with it can clear that wake-up. The poller still tells the driver.
#[tokio::test]
async fn a_cancellation_whose_wake_up_was_erased_still_reaches_the_driver() {
    let mut config = support::engine_config();
    // Never parked: parking would also notice the signal.
    config.park_after = std::time::Duration::from_secs(3600);
    let server = support::start_services(config, meshflow::ServiceName::ALL).await;
    let id = server
        .active_workflow(json!({"name": "erased-wake", "steps": [
            {"id": "hold", "wait": {"duration": "3600s"}}]}))
        .await;
    let execution_id = server.start_execution(&id, json!({})).await;
    let before = server
        .watch_until(&execution_id, |e| e.r#type == E::StepWaiting as i32)
        .await;

    // What the other replica writes, then what the racing commit undoes.
    let db = server.database(2).await;
    let store = meshflow_execution::store::Store::new(db);
    // The owner is read first: once the signal is stored, a poll may end the execution at once.
    let row = store
        .execution(&execution_id)
        .await
        .expect("read")
        .expect("row");
    let owner = row.lease_owner.expect("driven here");
    store
        .add_signal(
            &execution_id,
            meshflow_orchestrator::driver::CANCEL_SIGNAL,
            json!("from another replica"),
            None,
            chrono::Utc::now(),
        )
        .await
        .expect("signal");
    store
        .clear_wake(&execution_id, &owner)
        .await
        .expect("clear");

    let rest = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        server.watch(&execution_id, before.len() as i64),
    )
    .await
    .expect("the driver hears of the cancellation");
    let last = rest.last().expect("events");
    assert_eq!(
        (last.r#type, last.reason.as_str()),
        (E::ExecutionCancelled as i32, "from another replica")
    );
    assert_eq!(
        status(&server.execution(&execution_id).await),
        ExecutionStatus::Cancelled
    );
}

#[tokio::test]
async fn workflow_and_step_timeouts() {
    let target = Target::start().await.expect("target");
    let (server, clock) = support::start_with_manual_clock().await;
    let slow = server
        .active_workflow(json!({"name": "slow", "timeout": "10s", "steps": [{"id": "nap", "wait": {"duration": "3600s"}}]}))
        .await;
    let run = server.start_execution(&slow, json!({})).await;
    server.watch_until_nth(&run, E::StepWaiting, 1).await;
    clock.advance(std::time::Duration::from_secs(9));
    assert_ne!(
        status(&server.execution(&run).await),
        ExecutionStatus::TimedOut
    );
    clock.advance(std::time::Duration::from_secs(1));
    let events = server.watch(&run, 0).await;
    assert_eq!(
        status(&server.execution(&run).await),
        ExecutionStatus::TimedOut
    );
    assert_eq!(types(&events).last(), Some(&E::ExecutionTimedOut));

    // A step held by its downstream service times out by the clock, while its request waits.
    let held = server
        .active_workflow(json!({"name": "held", "steps": [
            {"id": "call", "timeout": "10s", "http": {"method": "GET", "url": format!("{}/gate", target.base)}}]}))
        .await;
    let run = server.start_execution(&held, json!({})).await;
    target.wait_for_requests(1).await;
    clock.advance(std::time::Duration::from_secs(10));
    server.watch(&run, 0).await;
    let execution = server.execution(&run).await;
    assert_eq!(status(&execution), ExecutionStatus::Failed);
    assert_eq!(execution.error.map(|e| e.code), Some("timeout".to_string()));
    target.open_gate();
}

#[tokio::test]
async fn steps_cannot_reach_loopback_unless_allowed() {
    let target = Target::start().await.expect("target");
    let mut config = support::engine_config();
    config.allow_http_to.clear();
    let server = support::start_services(config, meshflow::ServiceName::ALL).await;
    let id = server
        .active_workflow(json!({"name": "ssrf", "steps": [
            {"id": "call", "http": {"method": "GET", "url": format!("{}/item/1", target.base)}},
            {"id": "named", "http": {"method": "GET", "url": target.base.replace("127.0.0.1", "localhost") + "/item/1"}}]}))
        .await;
    let (execution, _) = server.execute(&id, json!({})).await;
    assert_eq!(status(&execution), ExecutionStatus::Failed);
    let error = execution.error.expect("error");
    assert_eq!(error.code, "refused", "{error:?}");
    assert!(error.message.contains("loopback"), "{}", error.message);
    assert!(target.log().is_empty(), "no request reached the target");
}

#[tokio::test]
async fn run_time_limits_are_enforced() {
    let target = Target::start().await.expect("target");
    let mut config = support::engine_config();
    config.limits.max_for_each_items = 5;
    config.limits.max_step_output_bytes = 64;
    config.limits.max_concurrent_executions = 2;
    let server = support::start_services(config, meshflow::ServiceName::ALL).await;

    let many = server
        .active_workflow(json!({"name": "many", "steps": [
            {"id": "each", "forEach": {"items": "input.items", "steps": [{"id": "f", "functionCall": {"function": "uuid"}}]}}]}))
        .await;
    let (execution, _) = server
        .execute(&many, json!({"items": [1, 2, 3, 4, 5, 6]}))
        .await;
    assert_eq!(status(&execution), ExecutionStatus::Failed);
    let error = execution.error.expect("error");
    assert_eq!(error.code, "too_many_items");
    assert!(
        error.message.contains("the limit is 5"),
        "{}",
        error.message
    );

    let big = server
        .active_workflow(json!({"name": "big", "steps": [
            {"id": "get", "http": {"method": "POST", "url": format!("{}/echo", target.base), "body": {"pad": "x".repeat(200)}}}]}))
        .await;
    let (execution, _) = server.execute(&big, json!({})).await;
    assert_eq!(
        execution.error.map(|e| e.code),
        Some("response_too_large".to_string())
    );

    // An expression whose work would be unbounded fails its step at once.
    let costly = server
        .active_workflow(json!({"name": "costly", "steps": [
            {"id": "t", "transform": {"assignments": [{"target": "n",
             "expression": "lists.range(100000).map(i, lists.range(100000).size())"}]}}]}))
        .await;
    let (execution, _) = server.execute(&costly, json!({})).await;
    let error = execution.error.expect("error");
    assert_eq!(error.code, "expression_too_costly", "{error:?}");

    // A body that never ends and names no length: reading stops past the limit.
    let endless = server
        .active_workflow(json!({"name": "endless", "steps": [
            {"id": "get", "http": {"method": "GET", "url": format!("{}/endless", target.base)}}]}))
        .await;
    let (execution, _) = server.execute(&endless, json!({})).await;
    let error = execution.error.expect("error");
    assert_eq!(error.code, "response_too_large", "{error:?}");
    let read: usize = error
        .message
        .rsplit("after reading ")
        .next()
        .and_then(|m| m.trim_end_matches(')').parse().ok())
        .expect("bytes read");
    assert!(
        read <= 64 + 64 * 1024,
        "read {read} bytes: one chunk past the limit at most"
    );

    let parked = server
        .active_workflow(
            json!({"name": "parked", "steps": [{"id": "w", "wait": {"signal": "go"}}]}),
        )
        .await;
    server.start_execution(&parked, json!({})).await;
    server.start_execution(&parked, json!({})).await;
    let err = server
        .orchestrator()
        .start_execution(opb::StartExecutionRequest {
            workflow_id: parked,
            ..Default::default()
        })
        .await
        .expect_err("over the limit");
    assert_reason(&err, Code::ResourceExhausted, "TOO_MANY_EXECUTIONS");
}

/// Starts `starts` parked executions at once under a limit of `limit`; how many were admitted.
async fn admitted_of_simultaneous_starts(limit: usize, starts: usize) -> usize {
    let mut config = support::engine_config();
    config.limits.max_concurrent_executions = limit;
    let server = support::start_services(config, meshflow::ServiceName::ALL).await;
    let parked = server
        .active_workflow(
            json!({"name": "parked", "steps": [{"id": "w", "wait": {"signal": "go"}}]}),
        )
        .await;
    let starts: Vec<_> = (0..starts)
        .map(|_| {
            let mut client = server.orchestrator();
            let workflow_id = parked.clone();
            tokio::spawn(async move {
                client
                    .start_execution(opb::StartExecutionRequest {
                        workflow_id,
                        ..Default::default()
                    })
                    .await
            })
        })
        .collect();
    let mut admitted = 0;
    for start in starts {
        match start.await.expect("task") {
            Ok(_) => admitted += 1,
            Err(err) => assert_reason(&err, Code::ResourceExhausted, "TOO_MANY_EXECUTIONS"),
        }
    }
    admitted
}

#[tokio::test]
async fn simultaneous_starts_never_pass_the_concurrency_limit() {
    // Every start near the limit: on PostgreSQL each is admitted alone.
    assert_eq!(admitted_of_simultaneous_starts(3, 24).await, 3);
    // Far from it at first: on PostgreSQL many are admitted at once, then one at a time.
    assert_eq!(admitted_of_simultaneous_starts(90, 140).await, 90);
}
