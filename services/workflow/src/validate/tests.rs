use super::*;
use serde_json::json;

fn parse(doc: serde_json::Value) -> pb::Workflow {
    serde_json::from_value(doc).expect("valid proto3 JSON")
}

fn check(doc: serde_json::Value) -> Vec<(String, String)> {
    check_with(doc, &Limits::default())
}

fn check_with(doc: serde_json::Value, limits: &Limits) -> Vec<(String, String)> {
    workflow(&parse(doc), limits, &FieldPath::root("workflow"))
        .into_vec()
        .into_iter()
        .map(|v| (v.field, v.description))
        .collect()
}

fn fields(doc: serde_json::Value) -> Vec<String> {
    check(doc).into_iter().map(|(f, _)| f).collect()
}

/// The design's example definition, as a user writes it.
fn route_new_lead() -> serde_json::Value {
    json!({"name": "route-new-lead", "inputSchema": {"type": "object", "required": ["lead_id"]},
    "variables": {"crm_url": "http://127.0.0.1:8081", "scoring_url": "http://127.0.0.1:8082"},
    "defaultRetryPolicy": {"strategy": "RETRY_STRATEGY_EXPONENTIAL", "maxAttempts": 3, "initialDelay": "1s"},
    "steps": [
     {"id": "lead", "http": {"method": "GET", "url": "${vars.crm_url}/leads/${input.lead_id}"}},
     {"id": "score", "dependsOn": ["lead"], "http": {"method": "POST", "url": "${vars.scoring_url}/score",
        "body": {"lead": "${steps.lead.output.body}"}, "serviceId": "scoring"},
      "retryPolicy": {"strategy": "RETRY_STRATEGY_FIXED", "maxAttempts": 5, "initialDelay": "2s"}},
     {"id": "route", "dependsOn": ["score"], "conditional": {
        "branches": [{"condition": "steps.score.output.body.score >= 70",
                      "steps": [{"id": "assign", "http": {"method": "POST", "url": "${vars.crm_url}/assignments",
                                 "body": {"lead_id": "${input.lead_id}", "queue": "hot"}}}]}],
        "otherwise": [{"id": "nurture", "wait": {"signal": "lead_replied", "timeout": "259200s"}}]}},
     {"id": "notify", "dependsOn": ["route"], "forEach": {"items": "steps.lead.output.body.agents",
        "maxConcurrency": 5, "steps": [{"id": "ping", "webhookCall": {"webhookId": "agent-notify",
        "eventType": "lead.routed", "payload": {"agent": "${item.id}", "lead": "${input.lead_id}"}}}]}}
    ]})
}

#[test]
fn the_design_example_is_valid() {
    assert_eq!(check(route_new_lead()), vec![]);
}

#[test]
fn every_step_type_validates() {
    let doc = json!({"name": "all-types", "steps": [
        {"id": "get", "http": {"method": "GET", "url": "http://127.0.0.1:1/item/1", "extract": {"price": "response.body.price"},
            "successCondition": "response.status == 200", "headers": {"x-trace": "${execution.id}"}, "timeout": "5s"}},
        {"id": "double", "dependsOn": ["get"], "transform": {"assignments": [{"target": "total", "expression": "steps.get.output.price * 2"},
            {"target": "vars.seen", "expression": "output.total > 0"}]}},
        {"id": "fan", "dependsOn": ["double"], "parallel": {"maxConcurrency": 2, "failFast": true, "branches": [
            {"name": "a", "steps": [{"id": "a1", "functionCall": {"function": "uuid"}}]},
            {"name": "b", "steps": [{"id": "b1", "functionCall": {"function": "sum", "arguments": {"values": "${[1, 2]}"}}}]}]}},
        {"id": "each", "dependsOn": ["fan"], "forEach": {"items": "[1, 2, 3]", "steps": [
            {"id": "wait_a_bit", "wait": {"duration": "1s"}},
            {"id": "check", "dependsOn": ["wait_a_bit"], "validation": {"value": "item",
              "jsonSchema": {"type": "integer"}, "rules": [{"expression": "value < 10 && index >= 0", "message": "too big"}]}}]}},
        {"id": "until", "wait": {"until": "2030-01-01T00:00:00Z"}},
        {"id": "hook", "dependsOn": ["until"], "webhookCall": {"url": "https://example.invalid/hook", "secret": "${secrets.HOOK}",
            "eventType": "order.done", "payload": {"n": "${steps.until.output}"}}}
    ]});
    assert_eq!(check(doc), vec![]);
}

#[test]
fn duplicate_ids_are_reported_across_nesting() {
    let doc = json!({"name": "dup", "steps": [
        {"id": "a", "functionCall": {"function": "uuid"}},
        {"id": "f", "forEach": {"items": "[1]", "steps": [{"id": "a", "functionCall": {"function": "uuid"}}]}}]});
    let v = check(doc);
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].0, "workflow.steps[1].for_each.steps[0].id");
    assert!(v[0].1.contains("duplicate step id `a`"), "{}", v[0].1);
}

#[test]
fn unknown_and_foreign_depends_on() {
    let doc = json!({"name": "deps", "steps": [
        {"id": "a", "dependsOn": ["ghost"], "functionCall": {"function": "uuid"}},
        {"id": "f", "forEach": {"items": "[1]", "steps": [{"id": "inner", "dependsOn": ["a"], "functionCall": {"function": "uuid"}}]}}]});
    let v = check(doc);
    assert_eq!(
        v[0],
        (
            "workflow.steps[0].depends_on[0]".into(),
            "unknown step `ghost`".into()
        )
    );
    assert_eq!(v[1].0, "workflow.steps[1].for_each.steps[0].depends_on[0]");
    assert!(v[1].1.contains("not in this block"), "{}", v[1].1);
}

#[test]
fn cycles_are_named() {
    let doc = json!({"name": "cyc", "steps": [
        {"id": "a", "dependsOn": ["c"], "functionCall": {"function": "uuid"}},
        {"id": "b", "dependsOn": ["a"], "functionCall": {"function": "uuid"}},
        {"id": "c", "dependsOn": ["b"], "functionCall": {"function": "uuid"}},
        {"id": "self", "dependsOn": ["self"], "functionCall": {"function": "uuid"}}]});
    let v = check(doc);
    assert!(
        v.contains(&(
            "workflow.steps[0].depends_on".into(),
            "dependency cycle: a -> c -> b -> a".into()
        )),
        "{v:?}"
    );
    assert!(
        v.contains(&(
            "workflow.steps[3].depends_on[0]".into(),
            "step `self` depends on itself".into()
        )),
        "{v:?}"
    );
}

#[test]
fn expressions_must_compile_and_stay_in_scope() {
    let doc = json!({"name": "expr", "steps": [
        {"id": "a", "transform": {"assignments": [{"target": "x", "expression": "1 +"}]}},
        {"id": "b", "transform": {"assignments": [{"target": "x", "expression": "item.price"}]}},
        {"id": "c", "http": {"method": "GET", "url": "http://h/${nope.x}"}},
        {"id": "d", "conditional": {"branches": [{"condition": "", "steps": []}]}}]});
    let v = check(doc);
    assert_eq!(
        v[0].0,
        "workflow.steps[0].transform.assignments[0].expression"
    );
    assert!(v[0].1.contains("does not compile"), "{}", v[0].1);
    assert_eq!(
        v[1].0,
        "workflow.steps[1].transform.assignments[0].expression"
    );
    assert!(v[1].1.starts_with("`item` is not in scope"), "{}", v[1].1);
    assert_eq!(v[2].0, "workflow.steps[2].http.url");
    assert_eq!(
        v[3],
        (
            "workflow.steps[3].conditional.branches[0].condition".into(),
            "expression is required".into()
        )
    );
}

#[test]
fn step_references_must_have_run() {
    let doc = json!({"name": "refs", "steps": [
        {"id": "a", "functionCall": {"function": "uuid"}},
        {"id": "b", "transform": {"assignments": [{"target": "x", "expression": "steps.a.output"}]}},
        {"id": "c", "dependsOn": ["a"], "transform": {"assignments": [{"target": "x", "expression": "steps.c.output"}]}},
        {"id": "d", "dependsOn": ["c"], "transform": {"assignments": [{"target": "x", "expression": "steps.a.output + steps.ghost.output"}]}},
        {"id": "f", "dependsOn": ["a"], "forEach": {"items": "steps.a.output.list", "steps": [
            {"id": "g", "transform": {"assignments": [{"target": "x", "expression": "steps.a.output"}]}}]}},
        {"id": "h", "dependsOn": ["f"], "transform": {"assignments": [{"target": "x", "expression": "steps.g.output"}]}}]});
    let v = check(doc);
    let at = |f: &str| {
        v.iter()
            .filter(|(p, _)| p == f)
            .map(|(_, d)| d.clone())
            .collect::<Vec<_>>()
    };
    assert!(
        at("workflow.steps[1].transform.assignments[0].expression")[0].contains("may not have run"),
        "{v:?}"
    );
    assert!(
        at("workflow.steps[2].transform.assignments[0].expression")[0].contains("its own result"),
        "{v:?}"
    );
    assert!(
        at("workflow.steps[3].transform.assignments[0].expression")[0].contains("unknown step"),
        "{v:?}"
    );
    // A step nested in a FOR_EACH reads what its FOR_EACH may read; outside, nested steps are not in scope.
    assert!(
        at("workflow.steps[4].for_each.steps[0].transform.assignments[0].expression").is_empty(),
        "{v:?}"
    );
    assert!(
        at("workflow.steps[5].transform.assignments[0].expression")[0].contains("may not have run"),
        "{v:?}"
    );
    assert_eq!(v.len(), 4, "{v:?}");
}

#[test]
fn urls_methods_and_numbers() {
    let doc = json!({"name": "nums", "timeout": "-1s", "steps": [
        {"id": "a", "http": {"method": "FETCH", "url": "ftp://x/y"}},
        {"id": "b", "http": {"method": "GET", "url": "not a url", "timeout": "7200s"}},
        {"id": "c", "http": {"method": "GET", "url": "http://h/"}, "retryPolicy": {"strategy": "RETRY_STRATEGY_NONE", "maxAttempts": 3,
            "multiplier": 0.5, "initialDelay": "10s", "maxDelay": "1s", "retryableStatusCodes": [503, 700]}},
        {"id": "d", "forEach": {"items": "[1]", "maxConcurrency": 5000, "steps": [{"id": "e", "wait": {"duration": "0s"}}]}}]});
    let f = fields(doc);
    for expected in [
        "workflow.timeout",
        "workflow.steps[0].http.method",
        "workflow.steps[0].http.url",
        "workflow.steps[1].http.url",
        "workflow.steps[1].http.timeout",
        "workflow.steps[2].retry_policy.max_attempts",
        "workflow.steps[2].retry_policy.max_delay",
        "workflow.steps[2].retry_policy.multiplier",
        "workflow.steps[2].retry_policy.retryable_status_codes[1]",
        "workflow.steps[3].for_each.max_concurrency",
        "workflow.steps[3].for_each.steps[0].wait.duration",
    ] {
        assert!(
            f.contains(&expected.to_string()),
            "missing {expected} in {f:?}"
        );
    }
}

#[test]
fn names_enums_configs_and_schemas() {
    let mut doc = json!({"name": "Bad Name", "inputSchema": {"type": "no-such-type"},
        "tags": ["a", "a", ""], "steps": [{"id": "1x"}, {"id": "ok", "functionCall": {"function": "nope"}}]});
    // Unknown enum numbers arrive over the binary protocol; set them on the message.
    let mut w = parse(doc.clone());
    w.status = 42;
    w.steps[1].on_error = 9;
    let f: Vec<String> = workflow(&w, &Limits::default(), &FieldPath::root("workflow"))
        .into_vec()
        .into_iter()
        .map(|v| v.field)
        .collect();
    for expected in [
        "workflow.name",
        "workflow.status",
        "workflow.input_schema",
        "workflow.tags[1]",
        "workflow.tags[2]",
        "workflow.steps[0].id",
        "workflow.steps[0]",
        "workflow.steps[1].on_error",
        "workflow.steps[1].function_call.function",
    ] {
        assert!(
            f.contains(&expected.to_string()),
            "missing {expected} in {f:?}"
        );
    }
    doc["steps"] = json!([]);
    doc["name"] = json!("ok");
    doc["status"] = json!("WORKFLOW_STATUS_ACTIVE");
    doc["inputSchema"] = json!({"type": "object"});
    doc["tags"] = json!([]);
    assert_eq!(
        check(doc),
        vec![(
            "workflow.steps".to_string(),
            "a workflow needs at least one step".to_string()
        )]
    );
}

#[test]
fn function_arguments_are_checked() {
    let doc = json!({"name": "fns", "steps": [
        {"id": "a", "functionCall": {"function": "sha256", "arguments": {"valu": "x"}}}]});
    let f = fields(doc);
    assert_eq!(
        f,
        [
            "workflow.steps[0].function_call.arguments.value",
            "workflow.steps[0].function_call.arguments.valu"
        ]
    );
}

#[test]
fn triggers_are_checked() {
    let doc = json!({"name": "trig", "steps": [{"id": "a", "functionCall": {"function": "uuid"}}], "triggers": [
        {"id": "nightly", "cron": {"schedule": "0 3 * * *", "timeZone": "Europe/Paris"}},
        {"id": "bad", "cron": {"schedule": "every day", "timeZone": "Mars/Olympus"}},
        {"id": "bad", "event": {"eventType": "Education Done", "filter": "event.x && input.y"}},
        {"id": "hook", "webhook": {"path": "new-lead"}}]});
    let f = fields(doc);
    assert_eq!(
        f,
        [
            "workflow.triggers[1].cron.schedule",
            "workflow.triggers[1].cron.time_zone",
            "workflow.triggers[2].id",
            "workflow.triggers[2].event.event_type",
            "workflow.triggers[2].event.filter",
            "workflow.triggers[3].webhook.secret",
        ]
    );
}

#[test]
fn limits_are_enforced() {
    let limits = Limits {
        max_steps: 2,
        max_nesting_depth: 2,
        max_expression_bytes: 10,
        ..Limits::default()
    };
    let doc = json!({"name": "big", "steps": [
        {"id": "a", "transform": {"assignments": [{"target": "x", "expression": "1 + 1 + 1 + 1 + 1"}]}},
        {"id": "f1", "forEach": {"items": "[1]", "steps": [
            {"id": "f2", "forEach": {"items": "[1]", "steps": [{"id": "z", "functionCall": {"function": "uuid"}}]}}]}}]});
    let v = check_with(doc, &limits);
    let f: Vec<&str> = v.iter().map(|(f, _)| f.as_str()).collect();
    assert!(f.contains(&"workflow.steps"), "{v:?}");
    assert!(
        f.contains(&"workflow.steps[0].transform.assignments[0].expression"),
        "{v:?}"
    );
    assert!(f.contains(&"workflow.steps[1].for_each.steps[0]"), "{v:?}");

    let deep = format!("{}1{}", "int(".repeat(40), ")".repeat(40));
    let doc = json!({"name": "deep", "steps": [
        {"id": "a", "transform": {"assignments": [{"target": "x", "expression": deep}]}}]});
    let v = check_with(doc, &Limits::default());
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(
        v[0].0,
        "workflow.steps[0].transform.assignments[0].expression"
    );
    assert!(v[0].1.contains("expression_too_costly"), "{v:?}");

    let tiny = Limits {
        max_definition_bytes: 10,
        ..Limits::default()
    };
    let v = check_with(route_new_lead(), &tiny);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].0, "workflow");
}
