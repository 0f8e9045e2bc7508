//! WorkflowService end to end: every RPC, idempotency, paging, filters, versions, etags.

use meshflow_proto::pbjson_types::FieldMask;
use meshflow_proto::workflow::v1 as pb;
use serde_json::json;
use tonic::Code;

use crate::support::{self, assert_reason, from_json, workflow};

#[tokio::test]
async fn create_get_update_version_and_delete() {
    let server = support::start().await;
    let mut client = server.workflows();

    let created = client
        .create_workflow(pb::CreateWorkflowRequest {
            workflow: Some(workflow("orders")),
            request_id: "req-1".into(),
        })
        .await
        .expect("create")
        .into_inner()
        .workflow
        .expect("workflow");
    assert!(meshflow_kit::id::is_valid(&created.workflow_id));
    assert_eq!(created.version, 1);
    assert_eq!(
        created.status,
        pb::WorkflowStatus::Draft as i32,
        "status defaults to DRAFT"
    );
    assert_eq!(created.tags, ["demo"]);
    assert!(!created.etag.is_empty());
    assert!(created.create_time.is_some());

    // The same request_id returns the same workflow rather than a second one or a name conflict.
    let again = client
        .create_workflow(pb::CreateWorkflowRequest {
            workflow: Some(workflow("orders")),
            request_id: "req-1".into(),
        })
        .await
        .expect("idempotent create")
        .into_inner()
        .workflow
        .expect("workflow");
    assert_eq!(again.workflow_id, created.workflow_id);

    let got = client
        .get_workflow(pb::GetWorkflowRequest {
            workflow_id: created.workflow_id.clone(),
            version: 0,
        })
        .await
        .expect("get")
        .into_inner()
        .workflow
        .expect("workflow");
    assert_eq!(got, created);

    // A metadata-only update keeps the version.
    let mut patch = pb::Workflow {
        workflow_id: created.workflow_id.clone(),
        etag: created.etag.clone(),
        description: "order pipeline".into(),
        status: pb::WorkflowStatus::Active as i32,
        ..Default::default()
    };
    let updated = client
        .update_workflow(pb::UpdateWorkflowRequest {
            workflow: Some(patch.clone()),
            update_mask: Some(FieldMask {
                paths: vec!["description".into(), "status".into()],
            }),
        })
        .await
        .expect("update")
        .into_inner()
        .workflow
        .expect("workflow");
    assert_eq!(updated.version, 1);
    assert_eq!(updated.description, "order pipeline");
    assert_eq!(updated.status, pb::WorkflowStatus::Active as i32);
    assert_eq!(
        updated.steps, created.steps,
        "fields outside the mask are kept"
    );
    assert_ne!(updated.etag, created.etag);

    // The old etag is stale now.
    let stale = client
        .update_workflow(pb::UpdateWorkflowRequest {
            workflow: Some(patch.clone()),
            update_mask: Some(FieldMask {
                paths: vec!["description".into()],
            }),
        })
        .await
        .expect_err("stale etag");
    assert_reason(&stale, Code::Aborted, "STALE_ETAG");

    // Changing the steps makes version 2; version 1 stays readable, unchanged.
    patch.etag = updated.etag.clone();
    patch.steps = workflow("x").steps;
    patch.steps.truncate(1);
    let v2 = client
        .update_workflow(pb::UpdateWorkflowRequest {
            workflow: Some(patch),
            update_mask: Some(FieldMask {
                paths: vec!["steps".into()],
            }),
        })
        .await
        .expect("update steps")
        .into_inner()
        .workflow
        .expect("workflow");
    assert_eq!(v2.version, 2);
    assert_eq!(v2.steps.len(), 1);

    let v1 = client
        .get_workflow(pb::GetWorkflowRequest {
            workflow_id: created.workflow_id.clone(),
            version: 1,
        })
        .await
        .expect("get v1")
        .into_inner()
        .workflow
        .expect("workflow");
    assert_eq!((v1.version, v1.steps.len()), (1, 2));

    let versions = client
        .list_workflow_versions(pb::ListWorkflowVersionsRequest {
            workflow_id: created.workflow_id.clone(),
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .expect("versions")
        .into_inner();
    assert_eq!(
        versions
            .versions
            .iter()
            .map(|v| v.version)
            .collect::<Vec<_>>(),
        [2]
    );
    let rest = client
        .list_workflow_versions(pb::ListWorkflowVersionsRequest {
            workflow_id: created.workflow_id.clone(),
            page_size: 1,
            page_token: versions.next_page_token,
        })
        .await
        .expect("versions page 2")
        .into_inner();
    assert_eq!(
        rest.versions
            .iter()
            .map(|v| (v.version, v.steps.len()))
            .collect::<Vec<_>>(),
        [(1, 2)]
    );
    assert!(rest.next_page_token.is_empty());

    let missing_version = client
        .get_workflow(pb::GetWorkflowRequest {
            workflow_id: created.workflow_id.clone(),
            version: 9,
        })
        .await
        .expect_err("no version 9");
    assert_reason(
        &missing_version,
        Code::NotFound,
        "WORKFLOW_VERSION_NOT_FOUND",
    );

    // Delete with a stale etag is refused; with the current one (or none) it deletes.
    let refused = client
        .delete_workflow(pb::DeleteWorkflowRequest {
            workflow_id: created.workflow_id.clone(),
            etag: created.etag.clone(),
            cancel_executions: false,
        })
        .await
        .expect_err("stale delete");
    assert_reason(&refused, Code::Aborted, "STALE_ETAG");
    client
        .delete_workflow(pb::DeleteWorkflowRequest {
            workflow_id: created.workflow_id.clone(),
            etag: v2.etag.clone(),
            cancel_executions: false,
        })
        .await
        .expect("delete");
    let gone = client
        .get_workflow(pb::GetWorkflowRequest {
            workflow_id: created.workflow_id.clone(),
            version: 0,
        })
        .await
        .expect_err("deleted");
    assert_reason(&gone, Code::NotFound, "WORKFLOW_NOT_FOUND");
    let versions_gone = client
        .list_workflow_versions(pb::ListWorkflowVersionsRequest {
            workflow_id: created.workflow_id,
            ..Default::default()
        })
        .await
        .expect_err("versions deleted with it");
    assert_eq!(versions_gone.code(), Code::NotFound);
}

#[tokio::test]
async fn list_pages_and_filters() {
    let server = support::start().await;
    let mut client = server.workflows();
    for (name, tag, status) in [
        ("alpha", "billing", pb::WorkflowStatus::Active),
        ("beta", "billing", pb::WorkflowStatus::Draft),
        ("gamma-sync", "crm", pb::WorkflowStatus::Active),
        ("delta_like", "crm", pb::WorkflowStatus::Archived),
    ] {
        let mut w = workflow(&name.replace('_', "-"));
        w.tags = vec![tag.into()];
        w.status = status as i32;
        client
            .create_workflow(pb::CreateWorkflowRequest {
                workflow: Some(w),
                request_id: String::new(),
            })
            .await
            .expect("create");
    }

    // Paging by two visits every workflow once, in name order.
    let mut names = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_workflows(pb::ListWorkflowsRequest {
                page_size: 2,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        assert!(page.workflows.len() <= 2);
        names.extend(page.workflows.into_iter().map(|w| w.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(names, ["alpha", "beta", "delta-like", "gamma-sync"]);

    let list = |req: pb::ListWorkflowsRequest| {
        let mut client = client.clone();
        async move {
            client
                .list_workflows(req)
                .await
                .expect("list")
                .into_inner()
                .workflows
                .into_iter()
                .map(|w| w.name)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        list(pb::ListWorkflowsRequest {
            tag: "crm".into(),
            ..Default::default()
        })
        .await,
        ["delta-like", "gamma-sync"]
    );
    assert_eq!(
        list(pb::ListWorkflowsRequest {
            status: pb::WorkflowStatus::Active as i32,
            ..Default::default()
        })
        .await,
        ["alpha", "gamma-sync"]
    );
    assert_eq!(
        list(pb::ListWorkflowsRequest {
            name: "ta".into(),
            ..Default::default()
        })
        .await,
        ["beta", "delta-like"]
    );
    // LIKE wildcards in the filter are literal text.
    assert_eq!(
        list(pb::ListWorkflowsRequest {
            name: "%".into(),
            ..Default::default()
        })
        .await,
        Vec::<String>::new()
    );
    assert_eq!(
        list(pb::ListWorkflowsRequest {
            tag: "billing".into(),
            status: pb::WorkflowStatus::Active as i32,
            name: "al".into(),
            ..Default::default()
        })
        .await,
        ["alpha"]
    );
}

#[tokio::test]
async fn validate_reports_without_saving() {
    let server = support::start().await;
    let mut client = server.workflows();
    let ok = client
        .validate_workflow(pb::ValidateWorkflowRequest {
            workflow: Some(workflow("checked")),
        })
        .await
        .expect("validate")
        .into_inner();
    assert!(ok.valid);
    assert!(ok.violations.is_empty());

    let bad: pb::Workflow = from_json(json!({"name": "checked", "steps": [
        {"id": "a", "dependsOn": ["b"], "functionCall": {"function": "uuid"}},
        {"id": "b", "dependsOn": ["a"], "http": {"method": "GET", "url": "ftp://nope"}}]}));
    let report = client
        .validate_workflow(pb::ValidateWorkflowRequest {
            workflow: Some(bad),
        })
        .await
        .expect("validate")
        .into_inner();
    assert!(!report.valid);
    let fields: Vec<&str> = report.violations.iter().map(|v| v.field.as_str()).collect();
    assert!(
        fields.contains(&"workflow.steps[0].depends_on"),
        "{fields:?}"
    );
    assert!(fields.contains(&"workflow.steps[1].http.url"), "{fields:?}");
    let cycle = report
        .violations
        .iter()
        .find(|v| v.field == "workflow.steps[0].depends_on")
        .expect("cycle");
    assert_eq!(cycle.description, "dependency cycle: a -> b -> a");

    let listed = client
        .list_workflows(pb::ListWorkflowsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(listed.workflows.is_empty(), "validate saves nothing");
}

#[tokio::test]
async fn the_design_example_round_trips_through_json() {
    let server = support::start().await;
    let mut client = server.workflows();
    let doc = json!({"name": "route-new-lead", "inputSchema": {"type": "object", "required": ["lead_id"]},
     "variables": {"crm_url": "http://127.0.0.1:8081"},
     "defaultRetryPolicy": {"strategy": "RETRY_STRATEGY_EXPONENTIAL", "maxAttempts": 3, "initialDelay": "1s"},
     "steps": [
      {"id": "lead", "http": {"method": "GET", "url": "${vars.crm_url}/leads/${input.lead_id}"}},
      {"id": "route", "dependsOn": ["lead"], "conditional": {
         "branches": [{"condition": "steps.lead.output.body.score >= 70",
                       "steps": [{"id": "assign", "http": {"method": "POST", "url": "${vars.crm_url}/assignments",
                                  "body": {"lead_id": "${input.lead_id}", "queue": "hot"}}}]}],
         "otherwise": [{"id": "nurture", "wait": {"signal": "lead_replied", "timeout": "259200s"}}]}}]});
    let w: pb::Workflow = from_json(doc.clone());
    let created = client
        .create_workflow(pb::CreateWorkflowRequest {
            workflow: Some(w),
            request_id: String::new(),
        })
        .await
        .expect("create")
        .into_inner()
        .workflow
        .expect("workflow");
    let back = serde_json::to_value(&created).expect("json");
    assert_eq!(back["steps"], doc["steps"]);
    assert_eq!(back["defaultRetryPolicy"], doc["defaultRetryPolicy"]);
    assert_eq!(back["inputSchema"], doc["inputSchema"]);
}
