//! Malformed requests get INVALID_ARGUMENT with the exact field path, NOT_FOUND, ALREADY_EXISTS or
//! ABORTED, never INTERNAL or UNKNOWN, and the server keeps serving.

use meshflow_proto::pbjson_types::FieldMask;
use meshflow_proto::workflow::v1 as pb;
use serde_json::json;
use tonic::Code;

use crate::support::{self, assert_reason, assert_violation, from_json, workflow};

fn create(w: pb::Workflow) -> pb::CreateWorkflowRequest {
    pb::CreateWorkflowRequest {
        workflow: Some(w),
        request_id: String::new(),
    }
}

#[tokio::test]
async fn missing_and_empty_fields() {
    let server = support::start().await;
    let mut client = server.workflows();

    let err = client
        .create_workflow(pb::CreateWorkflowRequest::default())
        .await
        .expect_err("no workflow");
    assert_eq!(assert_violation(&err, "workflow"), "is required");

    let mut w = workflow("x");
    w.name = String::new();
    let err = client
        .create_workflow(create(w))
        .await
        .expect_err("empty name");
    assert_eq!(assert_violation(&err, "workflow.name"), "is required");

    let mut w = workflow("x");
    w.steps.clear();
    let err = client
        .create_workflow(create(w))
        .await
        .expect_err("no steps");
    assert_violation(&err, "workflow.steps");

    let mut w = workflow("x");
    w.steps[1].config = None;
    let err = client
        .create_workflow(create(w))
        .await
        .expect_err("step without config");
    assert_violation(&err, "workflow.steps[1]");

    let err = client
        .get_workflow(pb::GetWorkflowRequest::default())
        .await
        .expect_err("no id");
    assert_eq!(assert_violation(&err, "workflow_id"), "is required");
    let err = client
        .get_workflow(pb::GetWorkflowRequest {
            workflow_id: "not-a-uuid".into(),
            version: 0,
        })
        .await
        .expect_err("bad id");
    assert_violation(&err, "workflow_id");
    let err = client
        .get_workflow(pb::GetWorkflowRequest {
            workflow_id: meshflow_kit::id::new_id(),
            version: -1,
        })
        .await
        .expect_err("negative version");
    assert_violation(&err, "version");
    let err = client
        .validate_workflow(pb::ValidateWorkflowRequest::default())
        .await
        .expect_err("nothing to validate");
    assert_violation(&err, "workflow");
}

#[tokio::test]
async fn unknown_and_zero_enums() {
    let server = support::start().await;
    let mut client = server.workflows();

    let mut w = workflow("x");
    w.status = 99;
    let err = client
        .create_workflow(create(w))
        .await
        .expect_err("unknown status");
    assert_eq!(
        assert_violation(&err, "workflow.status"),
        "unknown value 99"
    );

    let mut w = workflow("x");
    w.steps[0].on_error = 7;
    w.steps[0].retry_policy = Some(pb::RetryPolicy {
        strategy: 42,
        jitter: -3,
        ..Default::default()
    });
    let err = client
        .create_workflow(create(w))
        .await
        .expect_err("unknown enums");
    assert_violation(&err, "workflow.steps[0].on_error");
    assert_violation(&err, "workflow.steps[0].retry_policy.strategy");
    assert_violation(&err, "workflow.steps[0].retry_policy.jitter");

    let err = client
        .list_workflows(pb::ListWorkflowsRequest {
            status: 12,
            ..Default::default()
        })
        .await
        .expect_err("unknown filter");
    assert_violation(&err, "status");

    // A zero (UNSPECIFIED) status is rejected where it is required: an update that sets the status.
    let created = client
        .create_workflow(create(workflow("zero")))
        .await
        .expect("create")
        .into_inner()
        .workflow
        .expect("w");
    let err = client
        .update_workflow(pb::UpdateWorkflowRequest {
            workflow: Some(pb::Workflow {
                workflow_id: created.workflow_id,
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["status".into()],
            }),
        })
        .await
        .expect_err("zero status");
    assert_violation(&err, "workflow.status");

    let mut templates = server.templates();
    let t: pb::WorkflowTemplate = from_json(json!({"name": "t", "parameters": [{"name": "p"}],
        "workflow": {"name": "t", "steps": [{"id": "a", "functionCall": {"function": "uuid"}}]}}));
    let err = templates
        .create_workflow_template(pb::CreateWorkflowTemplateRequest {
            template: Some(t),
            request_id: String::new(),
        })
        .await
        .expect_err("zero parameter type");
    assert_eq!(
        assert_violation(&err, "template.parameters[0].type"),
        "is required"
    );
}

#[tokio::test]
async fn cycles_expressions_and_references() {
    let server = support::start().await;
    let mut client = server.workflows();
    let w: pb::Workflow = from_json(json!({"name": "bad", "steps": [
        {"id": "a", "functionCall": {"function": "uuid"}},
        {"id": "b", "dependsOn": ["c"], "functionCall": {"function": "uuid"}},
        {"id": "c", "dependsOn": ["b"], "transform": {"assignments": [{"target": "x", "expression": "steps.a.output +"}]}},
        {"id": "d", "dependsOn": ["a", "ghost"], "http": {"method": "GET", "url": "http://h/${steps.c.output}"}},
        {"id": "e", "transform": {"ruleId": "0190f0f0-0000-7000-8000-000000000000"}}]}));
    let err = client
        .create_workflow(create(w))
        .await
        .expect_err("invalid");
    assert_eq!(
        assert_violation(&err, "workflow.steps[1].depends_on"),
        "dependency cycle: b -> c -> b"
    );
    assert!(
        assert_violation(
            &err,
            "workflow.steps[2].transform.assignments[0].expression"
        )
        .contains("does not compile")
    );
    assert_eq!(
        assert_violation(&err, "workflow.steps[3].depends_on[1]"),
        "unknown step `ghost`"
    );
    assert!(assert_violation(&err, "workflow.steps[3].http.url").contains("may not have run"));
    assert!(
        assert_violation(&err, "workflow.steps[4].transform.rule_id")
            .contains("no transformation rule")
    );
    let listed = client
        .list_workflows(pb::ListWorkflowsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(listed.workflows.is_empty(), "nothing half-written");
}

#[tokio::test]
async fn conflicts_stale_etags_and_unknown_ids() {
    let server = support::start().await;
    let mut client = server.workflows();
    let created = client
        .create_workflow(create(workflow("taken")))
        .await
        .expect("create")
        .into_inner()
        .workflow
        .expect("w");

    let err = client
        .create_workflow(create(workflow("taken")))
        .await
        .expect_err("duplicate name");
    assert_reason(&err, Code::AlreadyExists, "NAME_TAKEN");

    let other = client
        .create_workflow(create(workflow("other")))
        .await
        .expect("create")
        .into_inner()
        .workflow
        .expect("w");
    let err = client
        .update_workflow(pb::UpdateWorkflowRequest {
            workflow: Some(pb::Workflow {
                workflow_id: other.workflow_id.clone(),
                name: "taken".into(),
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["name".into()],
            }),
        })
        .await
        .expect_err("rename onto a taken name");
    assert_reason(&err, Code::AlreadyExists, "NAME_TAKEN");

    let err = client
        .update_workflow(pb::UpdateWorkflowRequest {
            workflow: Some(pb::Workflow {
                workflow_id: created.workflow_id.clone(),
                etag: "\"999\"".into(),
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["description".into()],
            }),
        })
        .await
        .expect_err("stale");
    assert_reason(&err, Code::Aborted, "STALE_ETAG");

    let err = client
        .update_workflow(pb::UpdateWorkflowRequest {
            workflow: Some(pb::Workflow {
                workflow_id: created.workflow_id.clone(),
                etag: "garbage".into(),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .expect_err("malformed etag");
    assert_violation(&err, "workflow.etag");

    let err = client
        .update_workflow(pb::UpdateWorkflowRequest {
            workflow: Some(pb::Workflow {
                workflow_id: created.workflow_id.clone(),
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["version".into(), "colour".into()],
            }),
        })
        .await
        .expect_err("bad mask");
    assert!(assert_violation(&err, "update_mask.paths[0]").contains("output only"));
    assert!(assert_violation(&err, "update_mask.paths[1]").contains("unknown field"));

    let unknown = meshflow_kit::id::new_id();
    let err = client
        .get_workflow(pb::GetWorkflowRequest {
            workflow_id: unknown.clone(),
            version: 0,
        })
        .await
        .expect_err("unknown");
    assert_reason(&err, Code::NotFound, "WORKFLOW_NOT_FOUND");
    let err = client
        .update_workflow(pb::UpdateWorkflowRequest {
            workflow: Some(pb::Workflow {
                workflow_id: unknown.clone(),
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["description".into()],
            }),
        })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .delete_workflow(pb::DeleteWorkflowRequest {
            workflow_id: unknown,
            etag: String::new(),
            cancel_executions: false,
        })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn paging_input_is_checked() {
    let server = support::start().await;
    let mut client = server.workflows();
    let err = client
        .list_workflows(pb::ListWorkflowsRequest {
            page_size: -5,
            ..Default::default()
        })
        .await
        .expect_err("negative");
    assert_violation(&err, "page_size");
    let err = client
        .list_workflows(pb::ListWorkflowsRequest {
            page_token: "???".into(),
            ..Default::default()
        })
        .await
        .expect_err("garbage token");
    assert_violation(&err, "page_token");
}

#[tokio::test]
async fn oversized_messages_and_definitions() {
    let mut config = support::config();
    config.max_message_bytes = 64 * 1024;
    config.limits.max_definition_bytes = 16 * 1024;
    let server = support::start_with(config).await;
    let mut client = server.workflows();

    // Over the definition limit but under the transport limit: a field violation on the definition.
    let mut w = workflow("big");
    w.description = String::new();
    w.variables = Some(from_json(json!({"blob": "x".repeat(20 * 1024)})));
    let err = client
        .create_workflow(create(w))
        .await
        .expect_err("definition too large");
    assert!(assert_violation(&err, "workflow").contains("the limit is 16384 bytes"));

    // Over the transport limit: refused before decoding, with OUT_OF_RANGE.
    let mut w = workflow("huge");
    w.variables = Some(from_json(json!({"blob": "x".repeat(100 * 1024)})));
    let err = client
        .create_workflow(create(w))
        .await
        .expect_err("message too large");
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");

    // The server survives both.
    client
        .create_workflow(create(workflow("fine")))
        .await
        .expect("still serving");
}

#[tokio::test]
async fn no_malformed_request_gets_internal_or_unknown() {
    let server = support::start().await;
    let mut client = server.workflows();
    let garbage: Vec<pb::Workflow> = vec![
        pb::Workflow::default(),
        pb::Workflow {
            name: "ü".into(),
            status: -1,
            steps: vec![pb::Step::default()],
            ..Default::default()
        },
        pb::Workflow {
            name: "n".into(),
            timeout: Some(meshflow_proto::pbjson_types::Duration {
                seconds: -1,
                nanos: -5,
            }),
            steps: vec![pb::Step {
                id: "s".repeat(500),
                depends_on: vec![String::new(), "s".into()],
                config: Some(pb::step::Config::Wait(pb::WaitStep {
                    kind: None,
                    timeout: None,
                })),
                ..Default::default()
            }],
            ..Default::default()
        },
        from_json(
            json!({"name": "n", "steps": [{"id": "a", "http": {"method": "GET", "url": "${", "headers": {"bad header": "x"}}}]}),
        ),
        from_json(
            json!({"name": "n", "steps": [{"id": "a", "forEach": {"items": "", "steps": []}}]}),
        ),
        from_json(
            json!({"name": "n", "steps": [{"id": "a", "parallel": {"branches": [{"name": "", "steps": []}]}}]}),
        ),
    ];
    for w in garbage {
        let err = client
            .create_workflow(create(w.clone()))
            .await
            .expect_err("invalid");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        let report = client
            .validate_workflow(pb::ValidateWorkflowRequest { workflow: Some(w) })
            .await
            .expect("validate");
        assert!(!report.into_inner().valid);
    }
}

#[tokio::test]
async fn workflow_lists_report_every_bad_paging_field_at_once() {
    let server = support::start().await;
    let err = server
        .workflows()
        .list_workflows(pb::ListWorkflowsRequest {
            page_size: -1,
            page_token: "not a token".into(),
            status: 77,
            ..Default::default()
        })
        .await
        .expect_err("bad fields");
    for field in ["page_size", "page_token", "status"] {
        assert_violation(&err, field);
    }
    let err = server
        .workflows()
        .list_workflow_versions(pb::ListWorkflowVersionsRequest {
            workflow_id: "nope".into(),
            page_size: -1,
            page_token: "not a token".into(),
        })
        .await
        .expect_err("bad fields");
    for field in ["workflow_id", "page_size", "page_token"] {
        assert_violation(&err, field);
    }
    let err = server
        .templates()
        .list_workflow_templates(pb::ListWorkflowTemplatesRequest {
            page_size: -1,
            page_token: "not a token".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad fields");
    for field in ["page_size", "page_token"] {
        assert_violation(&err, field);
    }
    let err = server
        .rules()
        .list_transformation_rules(pb::ListTransformationRulesRequest {
            page_size: -1,
            page_token: "not a token".into(),
        })
        .await
        .expect_err("bad fields");
    for field in ["page_size", "page_token"] {
        assert_violation(&err, field);
    }
}
