//! WorkflowTemplateService: typed parameters, instantiation, and its errors.

use meshflow_proto::workflow::v1 as pb;
use serde_json::json;
use tonic::Code;

use crate::support::{self, assert_reason, assert_violation, from_json};

fn template() -> pb::WorkflowTemplate {
    from_json(json!({
        "name": "poll-service",
        "description": "polls a URL",
        "tags": ["ops"],
        "parameters": [
            {"name": "base_url", "type": "PARAMETER_TYPE_STRING", "required": true, "description": "service root"},
            {"name": "attempts", "type": "PARAMETER_TYPE_INTEGER", "defaultValue": 3},
            {"name": "labels", "type": "PARAMETER_TYPE_ARRAY", "defaultValue": ["poll"]}
        ],
        "workflow": {
            "name": "poll",
            "tags": "${params.labels}",
            "steps": [{"id": "get", "http": {"method": "GET", "url": "${params.base_url}/health?since=${input.since}"},
                       "retryPolicy": {"strategy": "RETRY_STRATEGY_FIXED", "maxAttempts": "${params.attempts}"}}]
        }
    }))
}

fn instantiate(
    template_id: &str,
    parameters: serde_json::Value,
    name: &str,
) -> pb::InstantiateWorkflowTemplateRequest {
    pb::InstantiateWorkflowTemplateRequest {
        template_id: template_id.into(),
        parameters: Some(from_json(parameters)),
        workflow_name: name.into(),
        request_id: String::new(),
    }
}

#[tokio::test]
async fn templates_are_stored_listed_and_instantiated() {
    let server = support::start().await;
    let mut client = server.templates();
    let created = client
        .create_workflow_template(pb::CreateWorkflowTemplateRequest {
            template: Some(template()),
            request_id: "t-1".into(),
        })
        .await
        .expect("create")
        .into_inner()
        .template
        .expect("template");
    assert_eq!(created.parameters.len(), 3);
    let again = client
        .create_workflow_template(pb::CreateWorkflowTemplateRequest {
            template: Some(template()),
            request_id: "t-1".into(),
        })
        .await
        .expect("idempotent")
        .into_inner()
        .template
        .expect("template");
    assert_eq!(again.template_id, created.template_id);
    let got = client
        .get_workflow_template(pb::GetWorkflowTemplateRequest {
            template_id: created.template_id.clone(),
        })
        .await
        .expect("get")
        .into_inner()
        .template
        .expect("template");
    assert_eq!(got, created);
    let listed = client
        .list_workflow_templates(pb::ListWorkflowTemplatesRequest {
            tag: "ops".into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.templates.len(), 1);
    let none = client
        .list_workflow_templates(pb::ListWorkflowTemplatesRequest {
            tag: "other".into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert!(none.templates.is_empty());

    let w = client
        .instantiate_workflow_template(instantiate(
            &created.template_id,
            json!({"base_url": "http://127.0.0.1:8080"}),
            "poll-a",
        ))
        .await
        .expect("instantiate")
        .into_inner()
        .workflow
        .expect("workflow");
    assert_eq!(w.name, "poll-a");
    assert_eq!(w.tags, ["poll"], "an exact reference keeps the array type");
    let step = serde_json::to_value(&w.steps[0]).expect("json");
    assert_eq!(
        step["http"]["url"],
        "http://127.0.0.1:8080/health?since=${input.since}"
    );
    assert_eq!(
        step["retryPolicy"]["maxAttempts"], 3,
        "the default applies, as a number"
    );

    let w2 = client
        .instantiate_workflow_template(instantiate(
            &created.template_id,
            json!({"base_url": "https://svc.example", "attempts": 5, "labels": ["a", "b"]}),
            "poll-b",
        ))
        .await
        .expect("instantiate")
        .into_inner()
        .workflow
        .expect("workflow");
    assert_eq!(
        w2.steps[0].retry_policy.as_ref().map(|r| r.max_attempts),
        Some(5)
    );
    assert_eq!(w2.tags, ["a", "b"]);

    let mut workflows = server.workflows();
    let all = workflows
        .list_workflows(pb::ListWorkflowsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(all.workflows.len(), 2);

    client
        .delete_workflow_template(pb::DeleteWorkflowTemplateRequest {
            template_id: created.template_id.clone(),
        })
        .await
        .expect("delete");
    let err = client
        .get_workflow_template(pb::GetWorkflowTemplateRequest {
            template_id: created.template_id,
        })
        .await
        .expect_err("deleted");
    assert_reason(&err, Code::NotFound, "TEMPLATE_NOT_FOUND");
    let still = workflows
        .list_workflows(pb::ListWorkflowsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(
        still.workflows.len(),
        2,
        "workflows made from a template outlive it"
    );
}

#[tokio::test]
async fn parameters_are_checked() {
    let server = support::start().await;
    let mut client = server.templates();
    let created = client
        .create_workflow_template(pb::CreateWorkflowTemplateRequest {
            template: Some(template()),
            request_id: String::new(),
        })
        .await
        .expect("create")
        .into_inner()
        .template
        .expect("template");
    let id = created.template_id;

    let err = client
        .instantiate_workflow_template(instantiate(&id, json!({}), "p"))
        .await
        .expect_err("missing");
    assert_eq!(assert_violation(&err, "parameters.base_url"), "is required");

    let err = client
        .instantiate_workflow_template(instantiate(
            &id,
            json!({"base_url": 7, "attempts": 2.5, "color": "red"}),
            "p",
        ))
        .await
        .expect_err("mistyped");
    assert_eq!(
        assert_violation(&err, "parameters.base_url"),
        "must be a string, got 7"
    );
    assert_eq!(
        assert_violation(&err, "parameters.attempts"),
        "must be a integer, got 2.5"
    );
    assert!(assert_violation(&err, "parameters.color").contains("is not a parameter"));

    // A value that makes the workflow invalid is reported on the workflow it would make.
    let err = client
        .instantiate_workflow_template(instantiate(&id, json!({"base_url": "ftp://x"}), "p"))
        .await
        .expect_err("invalid workflow");
    assert_violation(&err, "workflow.steps[0].http.url");

    let err = client
        .instantiate_workflow_template(instantiate(&meshflow_kit::id::new_id(), json!({}), "p"))
        .await
        .expect_err("unknown template");
    assert_eq!(err.code(), Code::NotFound);

    let mut bad = template();
    bad.parameters[1].default_value = Some(meshflow_kit::convert::from_json(&json!("three")));
    bad.parameters.push(bad.parameters[0].clone());
    bad.workflow.as_mut().expect("workflow").fields.insert(
        "description".into(),
        meshflow_kit::convert::from_json(&json!("${params.nope}")),
    );
    let err = client
        .create_workflow_template(pb::CreateWorkflowTemplateRequest {
            template: Some(bad),
            request_id: String::new(),
        })
        .await
        .expect_err("bad template");
    assert_violation(&err, "template.parameters[1].default_value");
    assert_violation(&err, "template.parameters[3].name");
    assert!(assert_violation(&err, "template.workflow").contains("params.nope"));
}
