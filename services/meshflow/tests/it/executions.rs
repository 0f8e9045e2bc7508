//! WatchExecution resumption, slow watchers, StartExecution input handling, and the read side
//! (GetExecution, ListExecutions, ListActiveExecutions, GetWorkflowMetrics).

use meshflow::target::Target;
use meshflow_proto::execution::v1::{self as epb, EventType as E, ExecutionStatus};
use meshflow_proto::orchestrator::v1 as opb;
use meshflow_proto::pbjson_types::FieldMask;
use meshflow_proto::workflow::v1 as wpb;
use serde_json::json;
use tonic::Code;

use crate::support::{self, assert_consecutive, assert_reason, assert_violation, types};

#[tokio::test]
async fn watch_resumes_at_every_sequence_of_a_finished_execution() {
    let target = Target::start().await.expect("target");
    let server =
        support::start_services(support::engine_config(), meshflow::ServiceName::ALL).await;
    let id = server
        .active_workflow(json!({"name": "w", "steps": [
            {"id": "a", "http": {"method": "GET", "url": format!("{}/item/1", target.base)}},
            {"id": "b", "dependsOn": ["a"], "forEach": {"items": "[1, 2, 3]", "steps": [{"id": "f", "functionCall": {"function": "uuid"}}]}}]}))
        .await;
    let (execution, all) = server.execute(&id, json!({})).await;
    assert_eq!(execution.status, ExecutionStatus::Completed as i32);
    assert_consecutive(&all, 1);
    let last = all.len() as i64;
    assert_eq!(execution.last_sequence, last);
    for after in 0..=last {
        let events = server.watch(&execution.execution_id, after).await;
        assert_consecutive(&events, after + 1);
        assert_eq!(events.len() as i64, last - after, "after {after}");
        assert_eq!(
            events,
            all[after as usize..].to_vec(),
            "the same events, after {after}"
        );
    }
}

#[tokio::test]
async fn watch_resumes_mid_run_without_gap_or_duplicate() {
    let target = Target::start().await.expect("target");
    let server =
        support::start_services(support::engine_config(), meshflow::ServiceName::ALL).await;
    let id = server
        .active_workflow(json!({"name": "w", "steps": [
            {"id": "first", "functionCall": {"function": "uuid"}},
            {"id": "held", "dependsOn": ["first"], "http": {"method": "GET", "url": format!("{}/gate", target.base)}},
            {"id": "after", "dependsOn": ["held"], "forEach": {"items": "input.items", "maxConcurrency": 50,
               "steps": [{"id": "f", "functionCall": {"function": "uuid"}}]}}]}))
        .await;
    // 600 items make over 1,200 events: more than the live buffer, so lagging watchers read history.
    let items: Vec<i64> = (0..600).collect();
    let execution_id = server.start_execution(&id, json!({"items": items})).await;
    target.wait_for_requests(1).await;
    let before = server
        .watch_until(&execution_id, |e| {
            e.r#type == E::StepStarted as i32 && e.step_path == "held"
        })
        .await;
    let k = before.len() as i64;
    // Every resume point while the execution is running; each stream then follows it live.
    let watchers: Vec<_> = (0..=k)
        .map(|after| {
            let orchestrator = server.orchestrator();
            let id = execution_id.clone();
            tokio::spawn(async move {
                let mut client = orchestrator;
                let mut stream = client
                    .watch_execution(opb::WatchExecutionRequest {
                        execution_id: id,
                        after_sequence: after,
                    })
                    .await
                    .expect("watch")
                    .into_inner();
                let mut events = Vec::new();
                while let Some(m) = stream.message().await.expect("stream") {
                    events.push(m.event.expect("event"));
                }
                (after, events)
            })
        })
        .collect();
    // A watcher that never reads: its buffer fills, the execution does not wait for it.
    let mut stalled = server.watch_stream(&execution_id, 0).await;
    target.open_gate();
    let all = server.watch(&execution_id, 0).await;
    assert_eq!(types(&all).last(), Some(&E::ExecutionCompleted));
    assert!(all.len() > 1200, "{} events", all.len());
    for w in watchers {
        let (after, events) = w.await.expect("join");
        assert_consecutive(&events, after + 1);
        assert_eq!(events, all[after as usize..].to_vec(), "after {after}");
    }
    // The stalled watcher still gets everything, in order, when it reads at last.
    let mut late = Vec::new();
    while let Some(m) = stalled.message().await.expect("stream") {
        late.push(m.event.expect("event"));
    }
    assert_eq!(late, all);
}

#[tokio::test]
async fn events_sent_live_carry_their_commit_time_and_history_does_not() {
    use meshflow_kit::convert::from_timestamp;
    let target = Target::start().await.expect("target");
    let server =
        support::start_services(support::engine_config(), meshflow::ServiceName::ALL).await;
    let id = server
        .active_workflow(json!({"name": "w", "steps": [
            {"id": "held", "http": {"method": "GET", "url": format!("{}/gate", target.base)}},
            {"id": "after", "dependsOn": ["held"], "functionCall": {"function": "uuid"}}]}))
        .await;
    let execution_id = server.start_execution(&id, json!({})).await;
    // Once the held step's start is committed, nothing more is until the gate opens.
    target.wait_for_requests(1).await;
    let before = server
        .watch_until(&execution_id, |e| {
            e.r#type == E::StepStarted as i32 && e.step_path == "held"
        })
        .await
        .len() as i64;
    let mut stream = server.watch_stream(&execution_id, 0).await;
    for sequence in 1..=before {
        let m = stream.message().await.expect("stream").expect("an event");
        assert_eq!(m.event.expect("event").sequence, sequence);
        assert_eq!(m.commit_time, None, "event {sequence} is read from history");
    }
    target.open_gate();
    let mut live = Vec::new();
    while let Some(m) = stream.message().await.expect("stream") {
        let arrived = chrono::Utc::now();
        let event = m.event.expect("event");
        let committed = m
            .commit_time
            .as_ref()
            .and_then(from_timestamp)
            .unwrap_or_else(|| panic!("event {} is sent live", event.sequence));
        let recorded = event.time.as_ref().and_then(from_timestamp).expect("time");
        assert!(recorded <= committed && committed <= arrived, "{event:?}");
        live.push(event);
    }
    assert_consecutive(&live, before + 1);
    assert_eq!(types(&live).last(), Some(&E::ExecutionCompleted));
    // Read again from history, the same events come without a commit time.
    let mut again = server.watch_stream(&execution_id, before).await;
    let mut replayed = Vec::new();
    while let Some(m) = again.message().await.expect("stream") {
        assert_eq!(m.commit_time, None);
        replayed.push(m.event.expect("event"));
    }
    assert_eq!(replayed, live);
}

#[tokio::test]
async fn start_checks_input_state_and_idempotency() {
    let server =
        support::start_services(support::engine_config(), meshflow::ServiceName::ALL).await;
    let id = server
        .active_workflow(json!({"name": "typed", "inputSchema": {"type": "object", "required": ["lead_id"],
            "properties": {"lead_id": {"type": "string"}, "score": {"type": "integer", "maximum": 100}}},
          "steps": [{"id": "a", "functionCall": {"function": "uuid"}}]}))
        .await;
    let mut orchestrator = server.orchestrator();
    let start = |input: serde_json::Value, request_id: &str| opb::StartExecutionRequest {
        workflow_id: id.clone(),
        input: Some(meshflow_kit::convert::from_json(&input)),
        request_id: request_id.into(),
        ..Default::default()
    };
    let err = orchestrator
        .start_execution(start(json!({"score": 500}), ""))
        .await
        .expect_err("bad input");
    assert!(assert_violation(&err, "input").contains("lead_id"));
    assert!(assert_violation(&err, "input.score").contains("100"));

    let first = orchestrator
        .start_execution(start(json!({"lead_id": "x"}), "req-1"))
        .await
        .expect("start")
        .into_inner()
        .execution
        .expect("e");
    let again = orchestrator
        .start_execution(start(json!({"lead_id": "x"}), "req-1"))
        .await
        .expect("start")
        .into_inner()
        .execution
        .expect("e");
    assert_eq!(
        first.execution_id, again.execution_id,
        "same request_id, same execution"
    );

    let err = orchestrator
        .start_execution(opb::StartExecutionRequest {
            workflow_id: meshflow_kit::id::new_id(),
            ..Default::default()
        })
        .await
        .expect_err("unknown");
    assert_reason(&err, Code::NotFound, "WORKFLOW_NOT_FOUND");
    let err = orchestrator
        .start_execution(opb::StartExecutionRequest::default())
        .await
        .expect_err("no id");
    assert_violation(&err, "workflow_id");

    // A DRAFT workflow does not start.
    let draft: wpb::Workflow = support::from_json(
        json!({"name": "draft", "steps": [{"id": "a", "functionCall": {"function": "uuid"}}]}),
    );
    let draft = server
        .workflows()
        .create_workflow(wpb::CreateWorkflowRequest {
            workflow: Some(draft),
            request_id: String::new(),
        })
        .await
        .expect("create")
        .into_inner()
        .workflow
        .expect("w");
    let err = orchestrator
        .start_execution(opb::StartExecutionRequest {
            workflow_id: draft.workflow_id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("draft");
    assert_reason(&err, Code::FailedPrecondition, "WORKFLOW_NOT_ACTIVE");

    let err = orchestrator
        .watch_execution(opb::WatchExecutionRequest {
            execution_id: meshflow_kit::id::new_id(),
            after_sequence: 0,
        })
        .await
        .expect_err("unknown execution");
    assert_reason(&err, Code::NotFound, "EXECUTION_NOT_FOUND");
    let err = orchestrator
        .watch_execution(opb::WatchExecutionRequest {
            execution_id: first.execution_id.clone(),
            after_sequence: -1,
        })
        .await
        .expect_err("negative");
    assert_violation(&err, "after_sequence");
    let err = orchestrator
        .cancel_execution(opb::CancelExecutionRequest {
            execution_id: "nope".into(),
            reason: String::new(),
        })
        .await
        .expect_err("bad id");
    assert_violation(&err, "execution_id");
}

/// A start whose caller gives up while its insert is committing (here the commit waits on a lock
/// this test holds, and the client's deadline passes) still ends with its execution driven to the
/// end, not written and left without a driver. PostgreSQL only: it needs a commit that waits.
#[tokio::test]
async fn a_start_abandoned_by_its_caller_mid_commit_still_runs() {
    use sea_orm::ConnectionTrait;
    let server =
        support::start_services(support::engine_config(), meshflow::ServiceName::ALL).await;
    if !server.database_url.starts_with("postgres") {
        return;
    }
    let id = server
        .active_workflow(json!({"name": "abandoned",
          "steps": [{"id": "a", "functionCall": {"function": "uuid"}}]}))
        .await;
    let db = server.database(1).await;
    // Every transaction that inserts an execution waits at its commit for lock 7, held here.
    db.execute_unprepared(
        "CREATE FUNCTION wait_for_test() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN PERFORM pg_advisory_xact_lock(7); RETURN NULL; END $$;
         CREATE CONSTRAINT TRIGGER held AFTER INSERT ON workflow_executions
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION wait_for_test();
         SELECT pg_advisory_lock(7);",
    )
    .await
    .expect("hold commits");
    let mut request = tonic::Request::new(opb::StartExecutionRequest {
        workflow_id: id.clone(),
        ..Default::default()
    });
    request.set_timeout(std::time::Duration::from_millis(300));
    let err = server
        .orchestrator()
        .start_execution(request)
        .await
        .expect_err("the caller gives up");
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    // Let the commit through, and take the lock back once it is done.
    db.execute_unprepared("SELECT pg_advisory_unlock(7); SELECT pg_advisory_lock(7);")
        .await
        .expect("release commits");
    let listed = server
        .executions()
        .list_executions(epb::ListExecutionsRequest {
            workflow_id: id,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .executions;
    assert_eq!(
        listed.len(),
        1,
        "the abandoned start's execution was written"
    );
    let ended = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        server.watch_until(&listed[0].execution_id, |e| {
            e.r#type == E::ExecutionCompleted as i32
        }),
    )
    .await
    .expect("a driver runs it");
    assert_eq!(
        types(&ended).last(),
        Some(&E::ExecutionCompleted),
        "{:?}",
        types(&ended)
    );
}

/// A start runs the workflow's current version and refuses a workflow that is not ACTIVE, even
/// when the workflow changed after an earlier start of the same server read it.
#[tokio::test]
async fn a_start_follows_every_change_of_the_workflow() {
    let server =
        support::start_services(support::engine_config(), meshflow::ServiceName::ALL).await;
    let id = server
        .active_workflow(json!({"name": "changing",
          "steps": [{"id": "a", "functionCall": {"function": "uuid"}}]}))
        .await;
    let mut orchestrator = server.orchestrator();
    let mut workflows = server.workflows();
    let start = || opb::StartExecutionRequest {
        workflow_id: id.clone(),
        ..Default::default()
    };
    let started = |r: tonic::Response<opb::StartExecutionResponse>| {
        r.into_inner()
            .execution
            .expect("execution")
            .workflow_version
    };
    let get = |workflows: &mut wpb::workflow_service_client::WorkflowServiceClient<_>| {
        let mut workflows = workflows.clone();
        let id = id.clone();
        async move {
            workflows
                .get_workflow(wpb::GetWorkflowRequest {
                    workflow_id: id,
                    version: 0,
                })
                .await
                .expect("get")
                .into_inner()
                .workflow
                .expect("workflow")
        }
    };
    let update = |workflows: &mut wpb::workflow_service_client::WorkflowServiceClient<_>,
                  patch: wpb::Workflow,
                  path: &str| {
        let mut workflows = workflows.clone();
        let path = path.to_string();
        async move {
            workflows
                .update_workflow(wpb::UpdateWorkflowRequest {
                    workflow: Some(patch),
                    update_mask: Some(FieldMask { paths: vec![path] }),
                })
                .await
                .expect("update");
        }
    };
    assert_eq!(
        started(orchestrator.start_execution(start()).await.expect("v1")),
        1
    );

    // A new version: the next start runs it.
    let mut w = get(&mut workflows).await;
    w.steps = vec![support::from_json(
        json!({"id": "b", "functionCall": {"function": "uuid"}}),
    )];
    update(&mut workflows, w, "steps").await;
    assert_eq!(
        started(orchestrator.start_execution(start()).await.expect("v2")),
        2
    );

    // INACTIVE: no start, until it is ACTIVE again.
    let mut w = get(&mut workflows).await;
    w.status = wpb::WorkflowStatus::Inactive as i32;
    update(&mut workflows, w, "status").await;
    let err = orchestrator
        .start_execution(start())
        .await
        .expect_err("inactive");
    assert_reason(&err, Code::FailedPrecondition, "WORKFLOW_NOT_ACTIVE");
    let mut w = get(&mut workflows).await;
    w.status = wpb::WorkflowStatus::Active as i32;
    update(&mut workflows, w, "status").await;
    assert_eq!(
        started(orchestrator.start_execution(start()).await.expect("active")),
        2
    );

    // A start that names a version runs it, however the current version moved.
    let named = orchestrator
        .start_execution(opb::StartExecutionRequest {
            version: 1,
            ..start()
        })
        .await
        .expect("named");
    assert_eq!(started(named), 1);
}

#[tokio::test]
async fn executions_are_listed_and_measured() {
    let target = Target::start().await.expect("target");
    let server =
        support::start_services(support::engine_config(), meshflow::ServiceName::ALL).await;
    let ok = server
        .active_workflow(json!({"name": "ok", "steps": [
            {"id": "get", "http": {"method": "GET", "url": format!("{}/item/2", target.base)}},
            {"id": "t", "dependsOn": ["get"], "transform": {"assignments": [{"target": "p", "expression": "steps.get.output.body.price"}]}}]}))
        .await;
    let bad = server
        .active_workflow(json!({"name": "bad", "steps": [{"id": "get", "http": {"method": "GET", "url": format!("{}/status/400", target.base)}}]}))
        .await;
    for _ in 0..3 {
        server.execute(&ok, json!({})).await;
    }
    let (failed, _) = server.execute(&bad, json!({})).await;
    let waiting = server
        .active_workflow(json!({"name": "waits", "steps": [{"id": "w", "wait": {"signal": "go"}}]}))
        .await;
    let parked = server.start_execution(&waiting, json!({})).await;
    server
        .watch_until(&parked, |e| e.r#type == E::StepWaiting as i32)
        .await;

    let mut executions = server.executions();
    let lister = server.executions();
    let list = |req: epb::ListExecutionsRequest| {
        let mut c = lister.clone();
        async move { c.list_executions(req).await.expect("list").into_inner() }
    };
    assert_eq!(
        list(epb::ListExecutionsRequest {
            workflow_id: ok.clone(),
            ..Default::default()
        })
        .await
        .executions
        .len(),
        3
    );
    let failed_only = list(epb::ListExecutionsRequest {
        status: ExecutionStatus::Failed as i32,
        ..Default::default()
    })
    .await;
    assert_eq!(
        failed_only
            .executions
            .iter()
            .map(|e| e.execution_id.clone())
            .collect::<Vec<_>>(),
        std::slice::from_ref(&failed.execution_id)
    );
    // Paging one by one visits all five, newest first.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = list(epb::ListExecutionsRequest {
            page_size: 1,
            page_token: token,
            ..Default::default()
        })
        .await;
        seen.extend(page.executions.into_iter().map(|e| e.execution_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 5);
    assert_eq!(seen[0], parked, "newest first");
    let future = meshflow_kit::convert::timestamp(chrono::Utc::now() + chrono::Duration::hours(1));
    assert!(
        list(epb::ListExecutionsRequest {
            start_time_from: Some(future),
            ..Default::default()
        })
        .await
        .executions
        .is_empty()
    );
    let err = executions
        .list_executions(epb::ListExecutionsRequest {
            status: 77,
            ..Default::default()
        })
        .await
        .expect_err("bad status");
    assert_violation(&err, "status");
    // Every bad field is reported at once.
    let err = executions
        .list_executions(epb::ListExecutionsRequest {
            workflow_id: "nope".into(),
            status: 77,
            page_size: -1,
            page_token: "not a token".into(),
            start_time_from: Some(meshflow_proto::pbjson_types::Timestamp {
                seconds: 0,
                nanos: -1,
            }),
            ..Default::default()
        })
        .await
        .expect_err("bad fields");
    for field in [
        "workflow_id",
        "status",
        "page_size",
        "page_token",
        "start_time_from",
    ] {
        assert_violation(&err, field);
    }
    let err = executions
        .list_step_executions(epb::ListStepExecutionsRequest {
            execution_id: String::new(),
            page_size: -1,
            page_token: "not a token".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad fields");
    for field in ["execution_id", "page_size", "page_token"] {
        assert_violation(&err, field);
    }

    let active = server
        .orchestrator()
        .list_active_executions(opb::ListActiveExecutionsRequest::default())
        .await
        .expect("active")
        .into_inner()
        .executions;
    assert_eq!(
        active
            .iter()
            .map(|e| e.execution_id.clone())
            .collect::<Vec<_>>(),
        std::slice::from_ref(&parked)
    );
    let err = server
        .orchestrator()
        .list_active_executions(opb::ListActiveExecutionsRequest {
            workflow_id: "nope".into(),
            page_size: -1,
            page_token: "not a token".into(),
        })
        .await
        .expect_err("bad fields");
    for field in ["workflow_id", "page_size", "page_token"] {
        assert_violation(&err, field);
    }

    let metrics = server.metrics(&ok).await;
    assert_eq!(
        (
            metrics.total,
            metrics.completed,
            metrics.failed,
            metrics.active
        ),
        (3, 3, 0, 0)
    );
    assert_eq!(metrics.success_rate, 1.0);
    assert!(
        metrics
            .duration
            .as_ref()
            .and_then(|d| d.p50.as_ref())
            .is_some()
    );
    let get = metrics
        .steps
        .iter()
        .find(|s| s.step_id == "get")
        .expect("per step");
    assert_eq!((get.attempts, get.succeeded), (3, 3));
    let bad_metrics = executions
        .get_workflow_metrics(epb::GetWorkflowMetricsRequest { workflow_id: bad })
        .await
        .expect("metrics")
        .into_inner()
        .metrics
        .expect("metrics");
    assert_eq!((bad_metrics.failed, bad_metrics.success_rate), (1, 0.0));

    // A workflow with no executions yet has zeros; an id no workflow ever had is NOT_FOUND.
    let idle = server
        .active_workflow(
            json!({"name": "idle", "steps": [{"id": "f", "functionCall": {"function": "uuid"}}]}),
        )
        .await;
    assert_eq!(server.metrics(&idle).await.total, 0);
    let err = executions
        .get_workflow_metrics(epb::GetWorkflowMetricsRequest {
            workflow_id: meshflow_kit::id::new_id(),
        })
        .await
        .expect_err("unknown workflow");
    assert_reason(&err, Code::NotFound, "WORKFLOW_NOT_FOUND");

    // Executions pin their version: changing the workflow does not change what ran.
    let w = server
        .workflows()
        .get_workflow(wpb::GetWorkflowRequest {
            workflow_id: ok.clone(),
            version: 0,
        })
        .await
        .expect("get")
        .into_inner()
        .workflow
        .expect("w");
    let mut patch = w.clone();
    patch.steps.truncate(1);
    server
        .workflows()
        .update_workflow(wpb::UpdateWorkflowRequest {
            workflow: Some(patch),
            update_mask: Some(FieldMask {
                paths: vec!["steps".into()],
            }),
        })
        .await
        .expect("update");
    let (e, _) = server.execute(&ok, json!({})).await;
    assert_eq!(e.workflow_version, 2);
    let old = list(epb::ListExecutionsRequest {
        workflow_id: ok,
        ..Default::default()
    })
    .await
    .executions;
    assert_eq!(old.iter().filter(|e| e.workflow_version == 1).count(), 3);
}

#[tokio::test]
async fn deleting_a_workflow_keeps_its_history_and_waits_for_its_executions() {
    let server =
        support::start_services(support::engine_config(), meshflow::ServiceName::ALL).await;
    let id = server
        .active_workflow(json!({"name": "doomed", "steps": [
            {"id": "f", "functionCall": {"function": "uuid"}},
            {"id": "w", "dependsOn": ["f"], "wait": {"signal": "go"}}]}))
        .await;
    let waiting = server.start_execution(&id, json!({})).await;
    server
        .watch_until(&waiting, |e| e.r#type == epb::EventType::StepWaiting as i32)
        .await;
    let delete = |cancel_executions: bool| {
        let mut workflows = server.workflows();
        let id = id.clone();
        async move {
            workflows
                .delete_workflow(wpb::DeleteWorkflowRequest {
                    workflow_id: id,
                    etag: String::new(),
                    cancel_executions,
                })
                .await
        }
    };

    // An execution has not ended: the delete is refused, naming it.
    let err = delete(false).await.expect_err("refused");
    support::assert_reason(
        &err,
        Code::FailedPrecondition,
        "WORKFLOW_HAS_ACTIVE_EXECUTIONS",
    );
    assert!(err.message().contains(&waiting), "{}", err.message());
    assert!(
        server
            .workflows()
            .get_workflow(wpb::GetWorkflowRequest {
                workflow_id: id.clone(),
                version: 0,
            })
            .await
            .is_ok(),
        "still there"
    );

    // Asked to, the delete cancels it; the workflow is gone, its history is not.
    delete(true).await.expect("delete");
    let events = server.watch(&waiting, 0).await;
    assert_eq!(
        events.last().map(|e| e.r#type),
        Some(epb::EventType::ExecutionCancelled as i32)
    );
    let err = server
        .workflows()
        .get_workflow(wpb::GetWorkflowRequest {
            workflow_id: id.clone(),
            version: 0,
        })
        .await
        .expect_err("deleted");
    support::assert_reason(&err, Code::NotFound, "WORKFLOW_NOT_FOUND");
    let err = server
        .orchestrator()
        .start_execution(opb::StartExecutionRequest {
            workflow_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("no new executions");
    assert_eq!(err.code(), Code::NotFound);

    let execution = server.execution(&waiting).await;
    assert_eq!(execution.status, epb::ExecutionStatus::Cancelled as i32);
    let steps = server
        .executions()
        .list_step_executions(epb::ListStepExecutionsRequest {
            execution_id: waiting.clone(),
            ..Default::default()
        })
        .await
        .expect("steps")
        .into_inner()
        .step_executions;
    assert_eq!(steps.len(), 2, "{steps:?}");
    let listed = server
        .executions()
        .list_executions(epb::ListExecutionsRequest {
            workflow_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .executions;
    assert_eq!(listed.len(), 1);
    let metrics = server.metrics(&id).await;
    assert_eq!(metrics.total, 1, "{metrics:?}");

    // The name is free again, and a second delete finds nothing.
    server
        .active_workflow(
            json!({"name": "doomed", "steps": [{"id": "f", "functionCall": {"function": "uuid"}}]}),
        )
        .await;
    let err = delete(false).await.expect_err("already deleted");
    support::assert_reason(&err, Code::NotFound, "WORKFLOW_NOT_FOUND");
}

#[tokio::test]
async fn metric_percentiles_are_observed_durations() {
    let server =
        support::start_services(support::engine_config(), meshflow::ServiceName::ALL).await;
    let id = server
        .active_workflow(json!({"name": "timed", "steps": [
            {"id": "f", "functionCall": {"function": "uuid"}},
            // A few tens of milliseconds, between the edges of any histogram bucket.
            {"id": "g", "dependsOn": ["f"], "wait": {"duration": "0.03s"}}]}))
        .await;
    for _ in 0..5 {
        server.execute(&id, json!({})).await;
    }
    let listed = server
        .executions()
        .list_executions(epb::ListExecutionsRequest {
            workflow_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .executions;
    let ms = |t: &Option<meshflow_proto::pbjson_types::Timestamp>| {
        t.as_ref()
            .and_then(meshflow_kit::convert::from_timestamp)
            .expect("time")
    };
    let mut observed: Vec<i64> = listed
        .iter()
        .map(|e| (ms(&e.end_time) - ms(&e.start_time)).num_milliseconds())
        .collect();
    observed.sort_unstable();
    let metrics = server.metrics(&id).await;
    let stats = metrics.duration.expect("duration");
    let millis = |d: Option<meshflow_proto::pbjson_types::Duration>| {
        let d = d.expect("percentile");
        d.seconds * 1000 + i64::from(d.nanos) / 1_000_000
    };
    let (p50, p95, p99) = (millis(stats.p50), millis(stats.p95), millis(stats.p99));
    assert!(observed.contains(&p50), "p50 {p50} of {observed:?}");
    assert_eq!(
        p99,
        *observed.last().expect("runs"),
        "p99 of five runs is the slowest"
    );
    assert_eq!(p95, p99);
    assert!(p50 <= p95);
    let step = metrics
        .steps
        .iter()
        .find(|s| s.step_id == "g")
        .expect("step g");
    let step_p99 = millis(step.duration.and_then(|d| d.p99));
    assert!(
        step_p99 <= *observed.last().expect("runs"),
        "a step is no longer than its run"
    );
}
