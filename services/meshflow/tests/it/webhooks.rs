//! WebhookService subscriptions end to end, and WEBHOOK_CALL steps delivering to them.

use meshflow::target::Target;
use meshflow_proto::execution::v1::{self as epb, ExecutionStatus};
use meshflow_proto::pbjson_types::FieldMask;
use meshflow_proto::webhook::v1 as pb;
use serde_json::json;
use tonic::Code;

use crate::support::{self, assert_reason, assert_violation};

fn webhook(doc: serde_json::Value) -> pb::Webhook {
    support::from_json(doc)
}

async fn create(server: &support::Server, doc: serde_json::Value) -> pb::Webhook {
    server
        .webhooks()
        .create_webhook(pb::CreateWebhookRequest {
            webhook: Some(webhook(doc)),
            request_id: String::new(),
        })
        .await
        .expect("created")
        .into_inner()
        .webhook
        .expect("webhook")
}

async fn update(
    server: &support::Server,
    w: pb::Webhook,
    paths: &[&str],
) -> Result<pb::Webhook, tonic::Status> {
    server
        .webhooks()
        .update_webhook(pb::UpdateWebhookRequest {
            webhook: Some(w),
            update_mask: Some(FieldMask {
                paths: paths.iter().map(|p| p.to_string()).collect(),
            }),
        })
        .await
        .map(|r| r.into_inner().webhook.expect("webhook"))
}

#[tokio::test]
async fn webhooks_are_created_read_listed_updated_and_deleted() {
    let server = support::start_services(support::config(), meshflow::ServiceName::ALL).await;
    let mut client = server.webhooks();

    // Created with a generated secret, returned once.
    let created = create(
        &server,
        json!({"name": "agent-notify", "url": "https://hooks.example.com/in",
               "eventTypes": ["lead.routed"], "headers": {"Authorization": "Bearer t"},
               "description": "agents"}),
    )
    .await;
    assert_eq!(
        meshflow_webhook::signature::check_secret(&created.secret),
        Ok(())
    );
    assert_eq!(created.status, pb::WebhookStatus::Active as i32);
    assert!(meshflow_kit::id::is_valid(&created.webhook_id));

    // Read back without the secret.
    let got = client
        .get_webhook(pb::GetWebhookRequest {
            webhook_id: created.webhook_id.clone(),
        })
        .await
        .expect("get")
        .into_inner()
        .webhook
        .expect("webhook");
    assert_eq!(got.secret, "");
    assert_eq!(
        pb::Webhook {
            secret: created.secret.clone(),
            ..got.clone()
        },
        created
    );

    // The same request_id returns the same webhook; another name is taken.
    let again = |request_id: &str, name: &str| pb::CreateWebhookRequest {
        webhook: Some(webhook(json!({"name": name, "url": "http://127.0.0.1:9/",
                                     "eventTypes": ["*"]}))),
        request_id: request_id.into(),
    };
    let first = client
        .create_webhook(again("r-1", "all-events"))
        .await
        .expect("create")
        .into_inner()
        .webhook
        .expect("webhook");
    let second = client
        .create_webhook(again("r-1", "all-events"))
        .await
        .expect("idempotent")
        .into_inner()
        .webhook
        .expect("webhook");
    assert_eq!(first, second);
    let taken = client
        .create_webhook(again("", "agent-notify"))
        .await
        .expect_err("name taken");
    assert_reason(&taken, Code::AlreadyExists, "NAME_TAKEN");

    // Listed by name, paged, and filtered by the event types they receive.
    let list = |page_size: i32, page_token: String, event_type: &str| pb::ListWebhooksRequest {
        page_size,
        page_token,
        event_type: event_type.into(),
    };
    let page = client
        .list_webhooks(list(1, String::new(), ""))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(page.webhooks[0].name, "agent-notify");
    assert!(page.webhooks.iter().all(|w| w.secret.is_empty()));
    let rest = client
        .list_webhooks(list(1, page.next_page_token, ""))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(rest.webhooks[0].name, "all-events");
    assert_eq!(rest.next_page_token, "");
    let names = |r: pb::ListWebhooksResponse| -> Vec<String> {
        r.webhooks.into_iter().map(|w| w.name).collect()
    };
    let routed = client
        .list_webhooks(list(0, String::new(), "lead.routed"))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(names(routed), ["agent-notify", "all-events"]);
    let other = client
        .list_webhooks(list(0, String::new(), "execution.completed"))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(names(other), ["all-events"]);

    // Updated through a mask, guarded by the etag.
    let mut patch = pb::Webhook {
        webhook_id: created.webhook_id.clone(),
        etag: created.etag.clone(),
        status: pb::WebhookStatus::Disabled as i32,
        disabled_reason: "maintenance".into(),
        description: "ignored: not in the mask".into(),
        ..Default::default()
    };
    let updated = update(&server, patch.clone(), &["status"])
        .await
        .expect("updated");
    assert_eq!(
        (
            updated.status,
            updated.disabled_reason.as_str(),
            updated.description.as_str()
        ),
        (pb::WebhookStatus::Disabled as i32, "maintenance", "agents")
    );
    assert_ne!(updated.etag, created.etag);
    let stale = update(&server, patch.clone(), &["status"])
        .await
        .expect_err("stale etag");
    assert_reason(&stale, Code::Aborted, "STALE_ETAG");
    patch.etag = updated.etag.clone();
    patch.name = "all-events".into();
    let clash = update(&server, patch.clone(), &["name"])
        .await
        .expect_err("name taken");
    assert_reason(&clash, Code::AlreadyExists, "NAME_TAKEN");
    let masked = update(&server, patch.clone(), &["secret", "etag"])
        .await
        .expect_err("bad mask");
    assert_violation(&masked, "update_mask.paths[1]");
    let secretless = update(&server, patch.clone(), &["secret"])
        .await
        .expect_err("secret needed");
    assert_violation(&secretless, "webhook.secret");
    patch.secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into();
    patch.status = pb::WebhookStatus::Active as i32;
    let rotated = update(&server, patch, &["secret", "status"])
        .await
        .expect("rotated");
    assert_eq!(
        (rotated.secret.as_str(), rotated.disabled_reason.as_str()),
        ("", "")
    );
    let endpoint = meshflow_webhook::Store::new(server.database(1).await)
        .endpoint("agent-notify")
        .await
        .expect("read")
        .expect("endpoint");
    assert_eq!(endpoint.secret, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");

    // Deleted, then gone.
    client
        .delete_webhook(pb::DeleteWebhookRequest {
            webhook_id: created.webhook_id.clone(),
            ..Default::default()
        })
        .await
        .expect("deleted");
    for status in [
        client
            .get_webhook(pb::GetWebhookRequest {
                webhook_id: created.webhook_id.clone(),
            })
            .await
            .expect_err("gone"),
        client
            .delete_webhook(pb::DeleteWebhookRequest {
                webhook_id: created.webhook_id.clone(),
                ..Default::default()
            })
            .await
            .expect_err("gone"),
    ] {
        assert_reason(&status, Code::NotFound, "WEBHOOK_NOT_FOUND");
    }
}

#[tokio::test]
async fn malformed_webhook_requests_get_field_violations() {
    let server = support::start_services(support::config(), meshflow::ServiceName::ALL).await;
    let mut client = server.webhooks();
    let bad = client
        .create_webhook(pb::CreateWebhookRequest {
            webhook: Some(webhook(json!({
                "name": "Bad Name", "url": "ftp://example.com", "eventTypes": ["Lead Routed"],
                "secret": "plain", "headers": {"Webhook-Signature": "forged"}}))),
            request_id: "r".repeat(200),
        })
        .await
        .expect_err("invalid");
    for field in [
        "request_id",
        "webhook.name",
        "webhook.url",
        "webhook.event_types[0]",
        "webhook.secret",
        "webhook.headers[\"Webhook-Signature\"]",
    ] {
        assert_violation(&bad, field);
    }
    let missing = client
        .create_webhook(pb::CreateWebhookRequest::default())
        .await
        .expect_err("no webhook");
    assert_violation(&missing, "webhook");
    let no_types = client
        .create_webhook(pb::CreateWebhookRequest {
            webhook: Some(webhook(json!({"name": "a", "url": "http://127.0.0.1:9/"}))),
            request_id: String::new(),
        })
        .await
        .expect_err("no event types");
    assert!(assert_violation(&no_types, "webhook.event_types").contains('*'));
    let bad_id = client
        .get_webhook(pb::GetWebhookRequest {
            webhook_id: "agent-notify".into(),
        })
        .await
        .expect_err("not an id");
    assert_violation(&bad_id, "webhook_id");
    let bad_page = client
        .list_webhooks(pb::ListWebhooksRequest {
            page_size: -1,
            page_token: "%%".into(),
            event_type: "Not A Type".into(),
        })
        .await
        .expect_err("bad list");
    for field in ["page_size", "page_token", "event_type"] {
        assert_violation(&bad_page, field);
    }
    let bad_token = client
        .list_webhooks(pb::ListWebhooksRequest {
            page_token: "%%".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad token");
    assert_violation(&bad_token, "page_token");
    let bad_type = client
        .list_webhooks(pb::ListWebhooksRequest {
            event_type: "Not A Type".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad type");
    assert_violation(&bad_type, "event_type");
    let bad_etag = client
        .update_webhook(pb::UpdateWebhookRequest {
            webhook: Some(pb::Webhook {
                webhook_id: meshflow_kit::id::new_id(),
                etag: "3".into(),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .expect_err("bad etag");
    assert_violation(&bad_etag, "webhook.etag");
    let unknown = client
        .update_webhook(pb::UpdateWebhookRequest {
            webhook: Some(webhook(json!({"webhookId": meshflow_kit::id::new_id(),
                                         "description": "x"}))),
            update_mask: Some(FieldMask {
                paths: vec!["description".into()],
            }),
        })
        .await
        .expect_err("unknown");
    assert_reason(&unknown, Code::NotFound, "WEBHOOK_NOT_FOUND");

    // Nothing was written by the refused requests.
    let all = client
        .list_webhooks(pb::ListWebhooksRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(all.webhooks.is_empty());
}

#[tokio::test]
async fn a_webhook_call_delivers_to_a_registered_webhook_by_name_or_id() {
    let target = Target::start().await.expect("target");
    let server =
        support::start_services(support::engine_config(), meshflow::ServiceName::ALL).await;
    let hook = create(
        &server,
        json!({"name": "agent-notify", "url": format!("{}/echo", target.base),
               "eventTypes": ["lead.routed"], "headers": {"Authorization": "Bearer t"}}),
    )
    .await;
    let id = server
        .active_workflow(json!({"name": "notify",
        "steps": [
          {"id": "by-name", "webhookCall": {"webhookId": "agent-notify", "eventType": "lead.routed",
             "payload": {"lead": "${input.lead}"}}},
          {"id": "by-id", "dependsOn": ["by-name"], "webhookCall": {"webhookId": hook.webhook_id,
             "eventType": "lead.routed", "payload": {"n": 2}}}
        ]}))
        .await;
    let (execution, _) = server.execute(&id, json!({"lead": "L-1"})).await;
    assert_eq!(
        ExecutionStatus::try_from(execution.status),
        Ok(ExecutionStatus::Completed),
        "{:?}",
        execution.error
    );
    let seen: Vec<_> = target
        .log()
        .into_iter()
        .filter(|s| s.uri == "/echo")
        .collect();
    assert_eq!(seen.len(), 2);
    for (delivery, data) in seen.iter().zip([json!({"lead": "L-1"}), json!({"n": 2})]) {
        // Signed with the registered secret, carrying the registered headers.
        let msg_id = delivery.headers.get("webhook-id").expect("webhook-id");
        let ts: i64 = delivery
            .headers
            .get("webhook-timestamp")
            .and_then(|t| t.parse().ok())
            .expect("timestamp");
        let expected = meshflow_webhook::signature::sign(&hook.secret, msg_id, ts, &delivery.body)
            .expect("sign");
        assert_eq!(delivery.headers.get("webhook-signature"), Some(&expected));
        assert_eq!(
            delivery.headers.get("authorization").map(String::as_str),
            Some("Bearer t")
        );
        let body: serde_json::Value = serde_json::from_str(&delivery.body).expect("json");
        assert_eq!(
            (body["type"].as_str(), &body["data"]),
            (Some("lead.routed"), &data)
        );
    }
    let out = meshflow_kit::convert::to_json(execution.output.as_ref().expect("output"));
    assert_eq!(
        out["by-name"]["endpoint"],
        json!({"webhookId": hook.webhook_id, "name": "agent-notify"})
    );
}

#[tokio::test]
async fn a_webhook_call_to_an_unusable_webhook_fails_with_the_reason() {
    let target = Target::start().await.expect("target");
    let server =
        support::start_services(support::engine_config(), meshflow::ServiceName::ALL).await;
    let url = format!("{}/echo", target.base);
    create(
        &server,
        json!({"name": "off", "url": url, "eventTypes": ["*"], "status": "WEBHOOK_STATUS_DISABLED",
               "disabledReason": "endpoint retired"}),
    )
    .await;
    create(
        &server,
        json!({"name": "narrow", "url": url, "eventTypes": ["lead.created"]}),
    )
    .await;
    for (name, code, words) in [
        ("off", "webhook_disabled", "endpoint retired"),
        ("narrow", "webhook_not_subscribed", "lead.created"),
        ("missing", "webhook_not_found", "missing"),
    ] {
        let id = server
            .active_workflow(json!({"name": format!("call-{name}"),
              "steps": [{"id": "ping", "webhookCall": {"webhookId": name, "eventType": "lead.routed"}}]}))
            .await;
        let (execution, events) = server.execute(&id, json!({})).await;
        assert_eq!(
            ExecutionStatus::try_from(execution.status),
            Ok(ExecutionStatus::Failed),
            "{name}"
        );
        let error = execution.error.expect("error");
        assert_eq!(error.code, code, "{name}: {}", error.message);
        assert!(error.message.contains(words), "{name}: {}", error.message);
        // No retry is spent on a failure no retry can fix.
        let failed = events
            .iter()
            .filter(|e| e.r#type == epb::EventType::StepFailed as i32)
            .count();
        assert_eq!(failed, 1, "{name}");
    }
    assert!(
        target.log().iter().all(|s| s.uri != "/echo"),
        "nothing sent"
    );
}

/// Lists the events of a webhook (newest first).
async fn events_of(server: &support::Server, webhook_id: &str) -> Vec<pb::WebhookEvent> {
    server
        .webhooks()
        .list_webhook_events(pb::ListWebhookEventsRequest {
            webhook_id: webhook_id.into(),
            ..Default::default()
        })
        .await
        .expect("events")
        .into_inner()
        .webhook_events
}

#[tokio::test]
async fn test_webhook_sends_a_signed_event_and_every_attempt_is_kept_and_redeliverable() {
    let target = Target::start().await.expect("target");
    let server =
        support::start_services(support::engine_config(), meshflow::ServiceName::ALL).await;
    let hook = create(
        &server,
        json!({"name": "flaky-endpoint", "url": format!("{}/status/503", target.base),
               "eventTypes": ["execution.completed"], "headers": {"x-team": "core"}}),
    )
    .await;

    // The endpoint fails: the attempt says so, with its status and what it answered.
    let first = server
        .webhooks()
        .test_webhook(pb::TestWebhookRequest {
            webhook_id: hook.webhook_id.clone(),
        })
        .await
        .expect("test")
        .into_inner()
        .attempt
        .expect("attempt");
    assert_eq!((first.attempt, first.response_code), (1, 503), "{first:?}");
    assert!(first.latency.is_some() && first.time.is_some());
    let events = events_of(&server, &hook.webhook_id).await;
    assert_eq!(events.len(), 1);
    let event = &events[0];
    assert_eq!(event.event_type, "webhook.test");
    assert_eq!(event.status, pb::DeliveryStatus::Failed as i32);
    assert_eq!(event.attempts, std::slice::from_ref(&first));

    // Fixed, the event is delivered again with its same webhook-id, a fresh signature and the
    // endpoint's headers.
    let mut moved = hook.clone();
    moved.url = format!("{}/echo", target.base);
    update(&server, moved, &["url"]).await.expect("move");
    let redelivered = server
        .webhooks()
        .redeliver_webhook_event(pb::RedeliverWebhookEventRequest {
            webhook_event_id: event.webhook_event_id.clone(),
        })
        .await
        .expect("redeliver")
        .into_inner()
        .webhook_event
        .expect("event");
    assert_eq!(redelivered.status, pb::DeliveryStatus::Succeeded as i32);
    let codes: Vec<(u32, u32)> = redelivered
        .attempts
        .iter()
        .map(|a| (a.attempt, a.response_code))
        .collect();
    assert_eq!(codes, [(1, 503), (2, 200)]);
    let seen = target.log();
    assert_eq!(seen.len(), 2);
    for request in &seen {
        assert_eq!(request.headers["webhook-id"], event.webhook_event_id);
        assert_eq!(request.headers["x-team"], "core");
        let timestamp: i64 = request.headers["webhook-timestamp"]
            .parse()
            .expect("timestamp");
        let expected = meshflow_webhook::signature::sign(
            &hook.secret,
            &event.webhook_event_id,
            timestamp,
            &request.body,
        )
        .expect("sign");
        assert_eq!(request.headers["webhook-signature"], expected);
        let body: serde_json::Value = serde_json::from_str(&request.body).expect("json");
        assert_eq!(body["type"], "webhook.test");
        assert_eq!(body["data"]["webhookId"], hook.webhook_id.as_str());
    }
    // The second attempt kept an excerpt of what the endpoint answered.
    assert!(
        redelivered.attempts[1].error.contains("webhook.test"),
        "{:?}",
        redelivered.attempts[1]
    );

    // Filters, paging and bad input.
    server
        .webhooks()
        .test_webhook(pb::TestWebhookRequest {
            webhook_id: hook.webhook_id.clone(),
        })
        .await
        .expect("test again");
    let page = server
        .webhooks()
        .list_webhook_events(pb::ListWebhookEventsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("page")
        .into_inner();
    assert_eq!(page.webhook_events.len(), 1);
    assert_ne!(
        page.webhook_events[0].webhook_event_id, event.webhook_event_id,
        "newest first"
    );
    let rest = server
        .webhooks()
        .list_webhook_events(pb::ListWebhookEventsRequest {
            page_size: 1,
            page_token: page.next_page_token,
            ..Default::default()
        })
        .await
        .expect("next page")
        .into_inner();
    assert_eq!(
        rest.webhook_events[0].webhook_event_id,
        event.webhook_event_id
    );
    let succeeded = server
        .webhooks()
        .list_webhook_events(pb::ListWebhookEventsRequest {
            status: pb::DeliveryStatus::Succeeded as i32,
            ..Default::default()
        })
        .await
        .expect("by status")
        .into_inner()
        .webhook_events;
    assert_eq!(succeeded.len(), 2);
    let err = server
        .webhooks()
        .list_webhook_events(pb::ListWebhookEventsRequest {
            page_size: -1,
            page_token: "%%".into(),
            webhook_id: "nope".into(),
            status: 99,
        })
        .await
        .expect_err("bad fields");
    for field in ["page_size", "page_token", "webhook_id", "status"] {
        assert_violation(&err, field);
    }
    let err = server
        .webhooks()
        .redeliver_webhook_event(pb::RedeliverWebhookEventRequest {
            webhook_event_id: meshflow_kit::id::new_id(),
        })
        .await
        .expect_err("unknown event");
    assert_reason(&err, Code::NotFound, "WEBHOOK_EVENT_NOT_FOUND");
    let err = server
        .webhooks()
        .test_webhook(pb::TestWebhookRequest {
            webhook_id: meshflow_kit::id::new_id(),
        })
        .await
        .expect_err("unknown webhook");
    assert_reason(&err, Code::NotFound, "WEBHOOK_NOT_FOUND");
}

#[tokio::test]
async fn a_test_delivery_to_a_refused_address_never_leaves() {
    let target = Target::start().await.expect("target");
    // Loopback is not allowed here.
    let server = support::start_services(support::config(), meshflow::ServiceName::ALL).await;
    let hook = create(
        &server,
        json!({"name": "local", "url": format!("{}/echo", target.base), "eventTypes": ["*"]}),
    )
    .await;
    let attempt = server
        .webhooks()
        .test_webhook(pb::TestWebhookRequest {
            webhook_id: hook.webhook_id.clone(),
        })
        .await
        .expect("test")
        .into_inner()
        .attempt
        .expect("attempt");
    assert_eq!(attempt.response_code, 0);
    assert!(attempt.error.contains("loopback"), "{attempt:?}");
    assert!(target.log().is_empty(), "nothing reached the endpoint");
    assert_eq!(
        events_of(&server, &hook.webhook_id).await[0].status,
        pb::DeliveryStatus::Failed as i32
    );
}

#[tokio::test]
async fn a_webhook_with_events_waiting_to_be_delivered_is_deleted_only_when_told_to_drop_them() {
    let target = Target::start().await.expect("target");
    let server =
        support::start_services(support::engine_config(), meshflow::ServiceName::ALL).await;
    let hook = create(
        &server,
        json!({"name": "busy", "url": format!("{}/echo", target.base), "eventTypes": ["*"]}),
    )
    .await;
    // A delivered event is history: it does not hold the webhook back.
    server
        .webhooks()
        .test_webhook(pb::TestWebhookRequest {
            webhook_id: hook.webhook_id.clone(),
        })
        .await
        .expect("test");
    // An event recorded and not yet sent: what a crash between the two leaves.
    let store = meshflow_webhook::Store::new(server.database(1).await);
    let waiting = store
        .record_event(
            &hook.webhook_id,
            "execution.completed",
            &json!({"executionId": "e-1"}),
            chrono::Utc::now(),
        )
        .await
        .expect("event");
    let delete = |discard_undelivered: bool| {
        let mut client = server.webhooks();
        let webhook_id = hook.webhook_id.clone();
        async move {
            client
                .delete_webhook(pb::DeleteWebhookRequest {
                    webhook_id,
                    discard_undelivered,
                })
                .await
        }
    };
    let err = delete(false).await.expect_err("refused");
    assert_reason(
        &err,
        Code::FailedPrecondition,
        "WEBHOOK_HAS_UNDELIVERED_EVENTS",
    );
    assert!(err.message().contains(&waiting.id), "{}", err.message());
    assert_eq!(
        events_of(&server, &hook.webhook_id).await.len(),
        2,
        "nothing deleted"
    );

    delete(true).await.expect("deleted, dropping the event");
    assert!(events_of(&server, &hook.webhook_id).await.is_empty());
}
