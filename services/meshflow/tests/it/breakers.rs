//! CircuitBreakerService over real gRPC: operators' controls, configuration updates with field
//! masks and etags, listing, and the watch stream.

use meshflow_proto::circuitbreaker::v1 as pb;
use meshflow_proto::circuitbreaker::v1::CircuitBreakerState as S;
use meshflow_proto::circuitbreaker::v1::circuit_breaker_service_client::CircuitBreakerServiceClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::support;

async fn start() -> support::Server {
    support::start_services(support::config(), &[meshflow::ServiceName::Circuitbreaker]).await
}

fn client(server: &support::Server) -> CircuitBreakerServiceClient<Channel> {
    CircuitBreakerServiceClient::new(server.channel.clone())
}

fn secs(s: i64) -> Option<meshflow_proto::pbjson_types::Duration> {
    Some(meshflow_proto::pbjson_types::Duration {
        seconds: s,
        nanos: 0,
    })
}

async fn force_open(c: &mut CircuitBreakerServiceClient<Channel>, id: &str) -> pb::CircuitBreaker {
    c.force_open_circuit_breaker(pb::ForceOpenCircuitBreakerRequest {
        service_id: id.into(),
        duration: None,
    })
    .await
    .expect("force open")
    .into_inner()
    .circuit_breaker
    .expect("breaker")
}

#[tokio::test]
async fn operators_force_open_reset_disable_and_delete_breakers() {
    let server = start().await;
    let mut c = client(&server);
    let missing = c
        .get_circuit_breaker(pb::GetCircuitBreakerRequest {
            service_id: "payments:443".into(),
        })
        .await
        .expect_err("none yet");
    support::assert_reason(&missing, Code::NotFound, "CIRCUIT_BREAKER_NOT_FOUND");

    let opened = force_open(&mut c, "payments:443").await;
    assert_eq!(opened.state, S::ForcedOpen as i32, "made on first use");
    assert_eq!(opened.open_until, None, "until reset");
    assert_eq!(opened.config.as_ref().map(|c| c.minimum_calls), Some(10));
    assert_eq!(opened.metrics.as_ref().map(|m| m.failure_rate), Some(-1.0));

    let timed = c
        .force_open_circuit_breaker(pb::ForceOpenCircuitBreakerRequest {
            service_id: "payments:443".into(),
            duration: secs(60),
        })
        .await
        .expect("force open for a minute")
        .into_inner()
        .circuit_breaker
        .expect("breaker");
    assert_eq!(timed.generation, opened.generation, "no new transition");
    assert!(timed.open_until.is_some());

    let reset = c
        .reset_circuit_breaker(pb::ResetCircuitBreakerRequest {
            service_id: "payments:443".into(),
        })
        .await
        .expect("reset")
        .into_inner()
        .circuit_breaker
        .expect("breaker");
    assert_eq!(reset.state, S::Closed as i32);
    assert!(reset.generation > opened.generation);

    let disabled = c
        .disable_circuit_breaker(pb::DisableCircuitBreakerRequest {
            service_id: "payments:443".into(),
        })
        .await
        .expect("disable")
        .into_inner()
        .circuit_breaker
        .expect("breaker");
    assert_eq!(disabled.state, S::Disabled as i32);

    c.delete_circuit_breaker(pb::DeleteCircuitBreakerRequest {
        service_id: "payments:443".into(),
    })
    .await
    .expect("delete");
    for status in [
        c.delete_circuit_breaker(pb::DeleteCircuitBreakerRequest {
            service_id: "payments:443".into(),
        })
        .await
        .expect_err("gone"),
        c.reset_circuit_breaker(pb::ResetCircuitBreakerRequest {
            service_id: "payments:443".into(),
        })
        .await
        .expect_err("gone"),
    ] {
        support::assert_reason(&status, Code::NotFound, "CIRCUIT_BREAKER_NOT_FOUND");
    }
    let bad = c
        .force_open_circuit_breaker(pb::ForceOpenCircuitBreakerRequest {
            service_id: "has space".into(),
            duration: secs(-5),
        })
        .await
        .expect_err("invalid");
    support::assert_violation(&bad, "service_id");
}

#[tokio::test]
async fn configuration_updates_take_a_mask_an_etag_and_are_range_checked() {
    let server = start().await;
    let mut c = client(&server);
    let created = c
        .update_circuit_breaker_config(pb::UpdateCircuitBreakerConfigRequest {
            service_id: "inventory".into(),
            config: Some(pb::CircuitBreakerConfig {
                minimum_calls: 4,
                wait_in_open: secs(5),
                ..Default::default()
            }),
            update_mask: Some(meshflow_proto::pbjson_types::FieldMask {
                paths: vec!["minimum_calls".into(), "config.wait_in_open".into()],
            }),
            etag: String::new(),
        })
        .await
        .expect("creates")
        .into_inner()
        .circuit_breaker
        .expect("breaker");
    let config = created.config.clone().expect("config");
    assert_eq!(config.minimum_calls, 4);
    assert_eq!(config.wait_in_open, secs(5));
    assert_eq!(
        config.failure_rate_threshold, 50.0,
        "unmasked fields keep their values"
    );

    let update = |etag: &str, threshold: f64| pb::UpdateCircuitBreakerConfigRequest {
        service_id: "inventory".into(),
        config: Some(pb::CircuitBreakerConfig {
            failure_rate_threshold: threshold,
            ..Default::default()
        }),
        update_mask: Some(meshflow_proto::pbjson_types::FieldMask {
            paths: vec!["failure_rate_threshold".into()],
        }),
        etag: etag.into(),
    };
    let updated = c
        .update_circuit_breaker_config(update(&created.etag, 25.0))
        .await
        .expect("with the etag read")
        .into_inner()
        .circuit_breaker
        .expect("breaker");
    assert_eq!(
        updated.config.as_ref().map(|c| c.failure_rate_threshold),
        Some(25.0)
    );
    assert_eq!(updated.config.as_ref().map(|c| c.minimum_calls), Some(4));
    let stale = c
        .update_circuit_breaker_config(update(&created.etag, 75.0))
        .await
        .expect_err("stale");
    support::assert_reason(&stale, Code::Aborted, "STALE_ETAG");

    let bad = c
        .update_circuit_breaker_config(pb::UpdateCircuitBreakerConfigRequest {
            service_id: "inventory".into(),
            config: Some(pb::CircuitBreakerConfig {
                failure_rate_threshold: 150.0,
                permitted_calls_in_half_open: 100_000,
                failure_statuses: vec![pb::StatusRange {
                    first: 700,
                    last: 0,
                }],
                ..Default::default()
            }),
            update_mask: Some(meshflow_proto::pbjson_types::FieldMask {
                paths: vec![
                    "failure_rate_threshold".into(),
                    "permitted_calls_in_half_open".into(),
                    "failure_statuses".into(),
                    "state".into(),
                ],
            }),
            etag: String::new(),
        })
        .await
        .expect_err("invalid");
    let details = tonic_types::StatusExt::get_details_bad_request(&bad).expect("field violations");
    let fields: Vec<&str> = details
        .field_violations
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    assert_eq!(
        fields,
        [
            "update_mask.paths[3]",
            "config.failure_rate_threshold",
            "config.permitted_calls_in_half_open",
            "config.failure_statuses[0].first",
        ]
    );
}

#[tokio::test]
async fn breakers_list_by_state_and_prefix_in_pages() {
    let server = start().await;
    let mut c = client(&server);
    for id in ["api-a", "api-b", "api-c", "db-1"] {
        force_open(&mut c, id).await;
    }
    c.reset_circuit_breaker(pb::ResetCircuitBreakerRequest {
        service_id: "api-b".into(),
    })
    .await
    .expect("reset");
    let list = |prefix: &str, state: S, token: String| pb::ListCircuitBreakersRequest {
        page_size: 1,
        page_token: token,
        state: state as i32,
        service_id_prefix: prefix.into(),
    };
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_circuit_breakers(list("api-", S::ForcedOpen, token))
            .await
            .expect("list")
            .into_inner();
        seen.extend(page.circuit_breakers.into_iter().map(|b| b.service_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ["api-a", "api-c"]);
    let bad = c
        .list_circuit_breakers(pb::ListCircuitBreakersRequest {
            page_size: -1,
            page_token: "???".into(),
            ..Default::default()
        })
        .await
        .expect_err("invalid");
    let details = tonic_types::StatusExt::get_details_bad_request(&bad).expect("violations");
    assert_eq!(
        details.field_violations.len(),
        2,
        "every bad paging field at once"
    );
}

#[tokio::test]
async fn watchers_get_the_current_states_then_every_transition() {
    let server = start().await;
    let mut c = client(&server);
    force_open(&mut c, "billing").await;
    force_open(&mut c, "other").await;
    let mut stream = c
        .watch_circuit_breakers(pb::WatchCircuitBreakersRequest {
            service_ids: vec!["billing".into()],
            service_id_prefix: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = stream.message().await.expect("stream").expect("message");
    let current = first.circuit_breaker.expect("the current state first");
    assert_eq!(
        (current.service_id.as_str(), current.state),
        ("billing", S::ForcedOpen as i32)
    );

    c.reset_circuit_breaker(pb::ResetCircuitBreakerRequest {
        service_id: "other".into(),
    })
    .await
    .expect("reset other");
    c.reset_circuit_breaker(pb::ResetCircuitBreakerRequest {
        service_id: "billing".into(),
    })
    .await
    .expect("reset");
    let next = stream.message().await.expect("stream").expect("message");
    let t = next.transition.expect("a transition");
    assert_eq!(t.service_id, "billing", "other breakers are filtered out");
    assert_eq!(
        (t.from_state, t.to_state, t.reason.as_str()),
        (S::ForcedOpen as i32, S::Closed as i32, "reset")
    );
    assert_eq!(
        t.circuit_breaker.map(|b| b.state),
        Some(S::Closed as i32),
        "with the breaker after it"
    );
}

#[tokio::test]
async fn a_transition_made_on_one_server_reaches_watchers_on_another() {
    let first = start().await;
    let mut config = support::config();
    config.database_url = first.database_url.clone();
    config.poll_interval = std::time::Duration::from_millis(20);
    let second = support::start_services_on(
        config,
        &[meshflow::ServiceName::Circuitbreaker],
        meshflow_kit::clock::system(),
    )
    .await;
    let mut stream = client(&second)
        .watch_circuit_breakers(pb::WatchCircuitBreakersRequest {
            service_ids: vec![],
            service_id_prefix: "shared".into(),
        })
        .await
        .expect("watch")
        .into_inner();
    force_open(&mut client(&first), "shared-api").await;
    let message = stream.message().await.expect("stream").expect("message");
    let t = message
        .transition
        .expect("the transition, read from the shared history");
    assert_eq!(
        (
            t.service_id.as_str(),
            t.from_state,
            t.to_state,
            t.reason.as_str()
        ),
        (
            "shared-api",
            S::Closed as i32,
            S::ForcedOpen as i32,
            "forced_open"
        )
    );
}
