//! TransformationRuleService: CRUD, TestTransformationRule, and rules used by workflows.

use meshflow_proto::pbjson_types::FieldMask;
use meshflow_proto::workflow::v1 as pb;
use pb::test_transformation_rule_request::Source;
use serde_json::json;
use tonic::Code;

use crate::support::{self, assert_reason, assert_violation, from_json};

fn rule(name: &str) -> pb::TransformationRule {
    from_json(
        json!({"name": name, "description": "prices", "assignments": [
        {"target": "total", "expression": "input.price * input.qty"},
        {"target": "vars.big", "expression": "output.total > 100"},
        {"target": "summary.big", "expression": "vars.big"}]}),
    )
}

fn value(doc: serde_json::Value) -> meshflow_proto::pbjson_types::Value {
    meshflow_kit::convert::from_json(&doc)
}

#[tokio::test]
async fn rules_crud_and_test() {
    let server = support::start().await;
    let mut client = server.rules();
    let created = client
        .create_transformation_rule(pb::CreateTransformationRuleRequest {
            rule: Some(rule("pricing")),
            request_id: "r1".into(),
        })
        .await
        .expect("create")
        .into_inner()
        .rule
        .expect("rule");
    let again = client
        .create_transformation_rule(pb::CreateTransformationRuleRequest {
            rule: Some(rule("pricing")),
            request_id: "r1".into(),
        })
        .await
        .expect("idempotent")
        .into_inner()
        .rule
        .expect("rule");
    assert_eq!(again.rule_id, created.rule_id);
    client
        .create_transformation_rule(pb::CreateTransformationRuleRequest {
            rule: Some(rule("another")),
            request_id: String::new(),
        })
        .await
        .expect("create second");

    let page1 = client
        .list_transformation_rules(pb::ListTransformationRulesRequest {
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .expect("list")
        .into_inner();
    let page2 = client
        .list_transformation_rules(pb::ListTransformationRulesRequest {
            page_size: 1,
            page_token: page1.next_page_token,
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(page1.rules[0].name, "another");
    assert_eq!(page2.rules[0].name, "pricing");
    assert!(page2.next_page_token.is_empty());

    // Test the saved rule against sample input.
    let tested = client
        .test_transformation_rule(pb::TestTransformationRuleRequest {
            source: Some(Source::RuleId(created.rule_id.clone())),
            input: Some(value(json!({"price": 30, "qty": 4}))),
            vars: None,
            steps: None,
        })
        .await
        .expect("test")
        .into_inner();
    assert_eq!(tested.error, None);
    let output = meshflow_kit::convert::to_json(&tested.output.expect("output"));
    assert_eq!(output, json!({"total": 120, "summary": {"big": true}}));

    // A runtime failure names the assignment.
    let failed = client
        .test_transformation_rule(pb::TestTransformationRuleRequest {
            source: Some(Source::RuleId(created.rule_id.clone())),
            input: Some(value(json!({"price": 30}))),
            vars: None,
            steps: None,
        })
        .await
        .expect("test")
        .into_inner();
    let error = failed.error.expect("error");
    assert_eq!(
        (error.field.as_str(), error.target.as_str()),
        ("rule.assignments[0].expression", "total")
    );
    assert!(error.message.contains("qty"), "{}", error.message);

    // An unsaved rule reads steps and vars.
    let unsaved: pb::TransformationRule = from_json(json!({"assignments": [
        {"target": "n", "expression": "steps.fetch.output.count + vars.offset"}]}));
    let tested = client
        .test_transformation_rule(pb::TestTransformationRuleRequest {
            source: Some(Source::Rule(unsaved)),
            input: None,
            vars: Some(from_json(json!({"offset": 2}))),
            steps: Some(from_json(json!({"fetch": {"output": {"count": 40}}}))),
        })
        .await
        .expect("test")
        .into_inner();
    assert_eq!(
        meshflow_kit::convert::to_json(&tested.output.expect("output")),
        json!({"n": 42})
    );

    // An unsaved rule that does not compile is a bad request.
    let broken: pb::TransformationRule =
        from_json(json!({"assignments": [{"target": "n", "expression": "1 +"}]}));
    let err = client
        .test_transformation_rule(pb::TestTransformationRuleRequest {
            source: Some(Source::Rule(broken)),
            ..Default::default()
        })
        .await
        .expect_err("does not compile");
    assert_violation(&err, "rule.assignments[0].expression");
    let err = client
        .test_transformation_rule(pb::TestTransformationRuleRequest::default())
        .await
        .expect_err("no source");
    assert_violation(&err, "rule");

    // Update by mask with the etag; a stale etag is refused.
    let updated = client
        .update_transformation_rule(pb::UpdateTransformationRuleRequest {
            rule: Some(pb::TransformationRule {
                rule_id: created.rule_id.clone(),
                etag: created.etag.clone(),
                description: "new".into(),
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["description".into()],
            }),
        })
        .await
        .expect("update")
        .into_inner()
        .rule
        .expect("rule");
    assert_eq!(updated.description, "new");
    assert_eq!(updated.assignments, created.assignments);
    let err = client
        .update_transformation_rule(pb::UpdateTransformationRuleRequest {
            rule: Some(pb::TransformationRule {
                rule_id: created.rule_id.clone(),
                etag: created.etag.clone(),
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
        .update_transformation_rule(pb::UpdateTransformationRuleRequest {
            rule: Some(pb::TransformationRule {
                rule_id: created.rule_id.clone(),
                assignments: vec![pb::Assignment {
                    target: "bad target!".into(),
                    expression: "1".into(),
                }],
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["assignments".into()],
            }),
        })
        .await
        .expect_err("invalid assignment");
    assert_violation(&err, "rule.assignments[0].target");

    // A workflow may use the rule by id.
    let mut workflows = server.workflows();
    let w: pb::Workflow = from_json(
        json!({"name": "uses-rule", "steps": [{"id": "t", "transform": {"ruleId": created.rule_id}}]}),
    );
    workflows
        .create_workflow(pb::CreateWorkflowRequest {
            workflow: Some(w),
            request_id: String::new(),
        })
        .await
        .expect("workflow with a rule");

    let err = client
        .delete_transformation_rule(pb::DeleteTransformationRuleRequest {
            rule_id: created.rule_id.clone(),
            etag: created.etag.clone(),
        })
        .await
        .expect_err("stale delete");
    assert_reason(&err, Code::Aborted, "STALE_ETAG");
    client
        .delete_transformation_rule(pb::DeleteTransformationRuleRequest {
            rule_id: created.rule_id.clone(),
            etag: String::new(),
        })
        .await
        .expect("delete");
    let err = client
        .get_transformation_rule(pb::GetTransformationRuleRequest {
            rule_id: created.rule_id,
        })
        .await
        .expect_err("gone");
    assert_reason(&err, Code::NotFound, "TRANSFORMATION_RULE_NOT_FOUND");
}

#[tokio::test]
async fn rule_names_are_unique_and_checked() {
    let server = support::start().await;
    let mut client = server.rules();
    client
        .create_transformation_rule(pb::CreateTransformationRuleRequest {
            rule: Some(rule("same")),
            request_id: String::new(),
        })
        .await
        .expect("create");
    let err = client
        .create_transformation_rule(pb::CreateTransformationRuleRequest {
            rule: Some(rule("same")),
            request_id: String::new(),
        })
        .await
        .expect_err("taken");
    assert_reason(&err, Code::AlreadyExists, "NAME_TAKEN");
    let err = client
        .create_transformation_rule(pb::CreateTransformationRuleRequest {
            rule: Some(rule("Not OK")),
            request_id: String::new(),
        })
        .await
        .expect_err("bad name");
    assert_violation(&err, "rule.name");
    let err = client
        .create_transformation_rule(pb::CreateTransformationRuleRequest::default())
        .await
        .expect_err("no rule");
    assert_violation(&err, "rule");
}

/// Runs version `version` (0: the current one) of a workflow; returns the execution's output.
async fn run_version(
    server: &support::Server,
    workflow_id: &str,
    version: i64,
) -> Option<serde_json::Value> {
    use meshflow_proto::orchestrator::v1 as opb;
    let execution = server
        .orchestrator()
        .start_execution(opb::StartExecutionRequest {
            workflow_id: workflow_id.into(),
            version,
            input: Some(meshflow_kit::convert::from_json(&json!({"price": 10}))),
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner()
        .execution
        .expect("execution");
    server
        .watch(&execution.execution_id, 0)
        .await
        .last()
        .expect("terminal event");
    let done = server.execution(&execution.execution_id).await;
    assert!(done.error.is_none(), "{:?}", done.error);
    done.output
        .as_ref()
        .map(meshflow_kit::convert::to_json)
        .map(|o| o["t"]["total"].clone())
}

#[tokio::test]
async fn a_version_runs_the_rule_it_pinned_whatever_is_done_to_the_rule() {
    let server =
        support::start_services(support::engine_config(), meshflow::ServiceName::ALL).await;
    let mut rules = server.rules();
    let doubling: pb::TransformationRule = from_json(json!({"name": "pinned",
        "assignments": [{"target": "total", "expression": "input.price * 2"}]}));
    let created = rules
        .create_transformation_rule(pb::CreateTransformationRuleRequest {
            rule: Some(doubling),
            request_id: String::new(),
        })
        .await
        .expect("create rule")
        .into_inner()
        .rule
        .expect("rule");
    let workflow_id = server
        .active_workflow(json!({"name": "pins", "steps": [
            {"id": "t", "transform": {"ruleId": created.rule_id}}]}))
        .await;
    let v1 = server
        .workflows()
        .get_workflow(pb::GetWorkflowRequest {
            workflow_id: workflow_id.clone(),
            version: 0,
        })
        .await
        .expect("get")
        .into_inner()
        .workflow
        .expect("workflow");
    let Some(pb::step::Config::Transform(t)) = &v1.steps[0].config else {
        panic!("a transform");
    };
    assert_eq!(
        t.pinned_assignments.len(),
        1,
        "the version shows what it runs"
    );
    assert_eq!(run_version(&server, &workflow_id, 1).await, Some(json!(20)));

    // The rule changes: version 1 still doubles.
    rules
        .update_transformation_rule(pb::UpdateTransformationRuleRequest {
            rule: Some(from_json(json!({"ruleId": created.rule_id,
                "assignments": [{"target": "total", "expression": "input.price * 3"}]}))),
            update_mask: Some(FieldMask {
                paths: vec!["assignments".into()],
            }),
        })
        .await
        .expect("update rule");
    assert_eq!(run_version(&server, &workflow_id, 1).await, Some(json!(20)));

    // Sending the steps again makes version 2, which pins the rule as it is now.
    let updated = server
        .workflows()
        .update_workflow(pb::UpdateWorkflowRequest {
            workflow: Some(v1.clone()),
            update_mask: Some(FieldMask {
                paths: vec!["steps".into()],
            }),
        })
        .await
        .expect("update workflow")
        .into_inner()
        .workflow
        .expect("workflow");
    assert_eq!(updated.version, 2);
    assert_eq!(run_version(&server, &workflow_id, 2).await, Some(json!(30)));

    // The rule is deleted: both versions still run what they pinned.
    rules
        .delete_transformation_rule(pb::DeleteTransformationRuleRequest {
            rule_id: created.rule_id,
            etag: String::new(),
        })
        .await
        .expect("delete rule");
    assert_eq!(run_version(&server, &workflow_id, 1).await, Some(json!(20)));
    assert_eq!(run_version(&server, &workflow_id, 2).await, Some(json!(30)));
}
