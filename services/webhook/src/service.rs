//! The behaviour of WebhookService, free of transport concerns: requests in, responses or
//! [`Error`]s out.

use std::collections::{BTreeSet, HashSet};

use meshflow_kit::error::echo;

use meshflow_kit::name::{check_event_type, check_name};
use meshflow_kit::{FieldPath, Violations, page, request};
use meshflow_proto::webhook::v1 as pb;
use tonic::codegen::http::{HeaderName, HeaderValue};

use crate::delivery;
use crate::error::Error;
use crate::signature;
use crate::store::{ALL_EVENTS, EventFilter, Store, TEST_EVENT_TYPE, test_payload};

const DEFAULT_PAGE: u64 = 50;
const MAX_PAGE: u64 = 500;
/// Longest endpoint URL.
pub const MAX_URL_LEN: usize = 2048;
/// Most event types one webhook subscribes to.
pub const MAX_EVENT_TYPES: usize = 64;
/// Most extra headers on one webhook.
pub const MAX_HEADERS: usize = 32;
/// Longest extra header value.
pub const MAX_HEADER_VALUE_LEN: usize = 4096;
/// Longest description or disabled reason.
pub const MAX_DESCRIPTION_LEN: usize = 4096;

/// Headers a delivery sets itself, which a webhook may not override.
pub const RESERVED_HEADERS: &[&str] = &[
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "content-type",
    "content-length",
    "content-encoding",
    "transfer-encoding",
    "connection",
    "host",
    "idempotency-key",
    "traceparent",
    "tracestate",
];

/// Fields UpdateWebhook may change.
const UPDATABLE: &[&str] = &[
    "name",
    "url",
    "event_types",
    "secret",
    "status",
    "headers",
    "description",
];
const OUTPUT_ONLY: &[&str] = &["webhook_id", "etag", "create_time", "update_time"];

/// WebhookService over a store.
#[derive(Clone)]
pub struct Service {
    store: Store,
    /// The outbound client and its address policy, shared with HTTP steps.
    outbound: Outbound,
}

/// How deliveries leave the server: the client that applies the outbound address policy.
#[derive(Clone)]
pub struct Outbound {
    /// The client ([`meshflow_kit::ssrf::http_client`]).
    pub client: reqwest::Client,
    /// The policy its resolver applies, checked on IP literals too.
    pub policy: std::sync::Arc<meshflow_kit::ssrf::Policy>,
}

fn check_url(url: &str) -> Result<(), String> {
    if url.is_empty() {
        return Err("is required".into());
    }
    if url.len() > MAX_URL_LEN {
        return Err(format!("is longer than {MAX_URL_LEN} bytes"));
    }
    let parsed = url::Url::parse(url).map_err(|e| format!("is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "has scheme `{}`; use http or https",
            parsed.scheme()
        ));
    }
    if parsed.host().is_none() {
        return Err("has no host".into());
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("carries credentials; put them in `headers`".into());
    }
    Ok(())
}

/// Every violation of the `fields` of `w`, under `root`.
fn check(w: &pb::Webhook, root: &FieldPath, fields: &BTreeSet<&str>) -> Violations {
    let mut v = Violations::new();
    if fields.contains("name")
        && let Err(e) = check_name(&w.name)
    {
        v.add(&root.field("name"), e);
    }
    if fields.contains("url")
        && let Err(e) = check_url(&w.url)
    {
        v.add(&root.field("url"), e);
    }
    if fields.contains("event_types") {
        let path = root.field("event_types");
        if w.event_types.is_empty() {
            v.add(&path, "is required; `*` subscribes to every event type");
        } else if w.event_types.len() > MAX_EVENT_TYPES {
            v.add(
                &path,
                format!(
                    "has {} entries; the limit is {MAX_EVENT_TYPES}",
                    w.event_types.len()
                ),
            );
        }
        let mut seen = HashSet::new();
        for (i, t) in w.event_types.iter().enumerate() {
            if t != ALL_EVENTS
                && let Err(e) = check_event_type(t)
            {
                v.add(&path.index(i), e);
            } else if !seen.insert(t.as_str()) {
                v.add(&path.index(i), format!("`{}` is listed twice", echo(t)));
            }
        }
    }
    if fields.contains("secret")
        && !w.secret.is_empty()
        && let Err(e) = signature::check_secret(&w.secret)
    {
        v.add(&root.field("secret"), e);
    }
    if fields.contains("status") {
        if pb::WebhookStatus::try_from(w.status).is_err() {
            v.add(
                &root.field("status"),
                format!("{} is not a WebhookStatus", w.status),
            );
        }
        if w.disabled_reason.len() > MAX_DESCRIPTION_LEN {
            v.add(&root.field("disabled_reason"), "is too long");
        }
    }
    if fields.contains("headers") {
        let path = root.field("headers");
        if w.headers.len() > MAX_HEADERS {
            v.add(
                &path,
                format!(
                    "has {} entries; the limit is {MAX_HEADERS}",
                    w.headers.len()
                ),
            );
        }
        let mut names: Vec<&String> = w.headers.keys().collect();
        names.sort();
        for name in names {
            let p = path.key(name);
            let value = &w.headers[name];
            if HeaderName::from_bytes(name.as_bytes()).is_err() {
                v.add(&p, format!("`{}` is not a valid header name", echo(name)));
            } else if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                v.add(
                    &p,
                    format!("`{}` is set by every delivery itself", echo(name)),
                );
            }
            if value.len() > MAX_HEADER_VALUE_LEN {
                v.add(&p, format!("is longer than {MAX_HEADER_VALUE_LEN} bytes"));
            } else if HeaderValue::from_str(value).is_err() {
                v.add(&p, "is not a valid header value");
            }
        }
    }
    if fields.contains("description") && w.description.len() > MAX_DESCRIPTION_LEN {
        v.add(&root.field("description"), "is too long");
    }
    v
}

fn check_webhook_id(field: &str, id: &str) -> Result<(), Error> {
    request::resource_id(field, id).map_err(Error::from)
}

impl Service {
    /// The service over `store`, delivering through `outbound`.
    pub fn new(store: Store, outbound: Outbound) -> Self {
        Self { store, outbound }
    }

    /// The endpoint of a webhook, as a delivery needs it.
    async fn endpoint(&self, webhook_id: &str) -> Result<crate::Endpoint, Error> {
        self.store
            .endpoint(webhook_id)
            .await?
            .ok_or_else(|| Error::NotFound(webhook_id.to_string()))
    }

    /// Sends one attempt of a recorded event to its endpoint now and keeps it.
    async fn attempt(
        &self,
        event: &crate::entity::event::Model,
        endpoint: &crate::Endpoint,
    ) -> Result<pb::DeliveryAttempt, Error> {
        let now = chrono::Utc::now();
        let body = delivery::envelope(&event.event_type, &event.payload, now);
        let message = delivery::Message {
            id: &event.id,
            body: &body,
            secret: &endpoint.secret,
            headers: endpoint
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
        };
        let attempt = delivery::send(
            &self.outbound.client,
            &self.outbound.policy,
            &endpoint.url,
            &message,
            delivery::TIMEOUT,
            now,
        )
        .await;
        self.store.record_attempt(&event.id, &attempt).await
    }

    /// TestWebhook: records a `webhook.test` event for the webhook, sends it now (whatever the
    /// webhook's status or event types) and answers with the attempt.
    pub async fn test(&self, req: pb::TestWebhookRequest) -> Result<pb::DeliveryAttempt, Error> {
        check_webhook_id("webhook_id", &req.webhook_id)?;
        let endpoint = self.endpoint(&req.webhook_id).await?;
        let event = self
            .store
            .record_event(
                &req.webhook_id,
                TEST_EVENT_TYPE,
                &test_payload(&req.webhook_id),
                chrono::Utc::now(),
            )
            .await?;
        self.attempt(&event, &endpoint).await
    }

    /// RedeliverWebhookEvent: one more attempt of an event now, with its same `webhook-id`.
    pub async fn redeliver(
        &self,
        req: pb::RedeliverWebhookEventRequest,
    ) -> Result<pb::WebhookEvent, Error> {
        check_webhook_id("webhook_event_id", &req.webhook_event_id)?;
        let event = self
            .store
            .event_row(&req.webhook_event_id)
            .await?
            .ok_or_else(|| Error::EventNotFound(req.webhook_event_id.clone()))?;
        let endpoint = self.endpoint(&event.webhook_id).await?;
        self.attempt(&event, &endpoint).await?;
        self.store.event(&event.id).await
    }

    /// ListWebhookEvents: deliveries newest first, with every attempt.
    pub async fn list_events(
        &self,
        req: pb::ListWebhookEventsRequest,
    ) -> Result<pb::ListWebhookEventsResponse, Error> {
        let mut v = Violations::new();
        let size = v.take(page::size(req.page_size, DEFAULT_PAGE, MAX_PAGE));
        let before: Option<String> = v.take(page::decode(&req.page_token)).flatten();
        let webhook_id = (!req.webhook_id.is_empty()).then_some(req.webhook_id);
        if let Some(id) = &webhook_id {
            v.take(request::resource_id("webhook_id", id));
        }
        let status = match pb::DeliveryStatus::try_from(req.status) {
            Ok(pb::DeliveryStatus::Unspecified) => None,
            Ok(s) => Some(s),
            Err(_) => {
                v.add(
                    &FieldPath::root("status"),
                    format!("unknown value {}", req.status),
                );
                None
            }
        };
        let size = v
            .into_result(size.unwrap_or(DEFAULT_PAGE))
            .map_err(Error::Invalid)?;
        let filter = EventFilter { webhook_id, status };
        let rows = self
            .store
            .list_events(&filter, before.as_deref(), size + 1)
            .await?;
        let (webhook_events, next_page_token) =
            page::finish(rows, size, |e| e.webhook_event_id.clone());
        Ok(pb::ListWebhookEventsResponse {
            webhook_events,
            next_page_token,
        })
    }

    /// CreateWebhook: the response carries the secret, generated when none was given.
    pub async fn create(&self, req: pb::CreateWebhookRequest) -> Result<pb::Webhook, Error> {
        let mut v = Violations::new();
        let request_id = request::request_id(&req.request_id, &mut v);
        let Some(mut w) = req.webhook else {
            v.add(&FieldPath::root("webhook"), "is required");
            return Err(Error::Invalid(v.into_vec()));
        };
        let all: BTreeSet<&str> = UPDATABLE.iter().copied().collect();
        v.extend(check(&w, &FieldPath::root("webhook"), &all).into_vec());
        if !v.is_empty() {
            return Err(Error::Invalid(v.into_vec()));
        }
        if w.secret.is_empty() {
            w.secret = signature::new_secret()
                .map_err(|e| Error::Internal(format!("generating a secret: {e}")))?;
        }
        self.store.create(&w, request_id.as_deref()).await
    }

    /// GetWebhook.
    pub async fn get(&self, req: pb::GetWebhookRequest) -> Result<pb::Webhook, Error> {
        check_webhook_id("webhook_id", &req.webhook_id)?;
        self.store.get(&req.webhook_id).await
    }

    /// ListWebhooks.
    pub async fn list(
        &self,
        req: pb::ListWebhooksRequest,
    ) -> Result<pb::ListWebhooksResponse, Error> {
        let mut v = Violations::new();
        let size = v.take(page::size(req.page_size, DEFAULT_PAGE, MAX_PAGE));
        let after: Option<String> = v.take(page::decode(&req.page_token)).flatten();
        let event_type = match req.event_type.as_str() {
            "" => None,
            t if t == ALL_EVENTS => Some(t),
            t => {
                if let Err(e) = check_event_type(t) {
                    v.add(&FieldPath::root("event_type"), e);
                }
                Some(t)
            }
        };
        let size = v
            .into_result(size.unwrap_or(DEFAULT_PAGE))
            .map_err(Error::Invalid)?;
        let rows = self
            .store
            .list(after.as_deref(), size + 1, event_type)
            .await?;
        let (webhooks, next_page_token) = page::finish(rows, size, |w| w.name.clone());
        Ok(pb::ListWebhooksResponse {
            webhooks,
            next_page_token,
        })
    }

    /// UpdateWebhook: the fields of the mask (all when it is empty), if the etag, when given,
    /// is current. A new secret must be given: one is generated only at creation.
    pub async fn update(&self, req: pb::UpdateWebhookRequest) -> Result<pb::Webhook, Error> {
        let Some(patch) = req.webhook else {
            return Err(Error::invalid("webhook", "is required"));
        };
        check_webhook_id("webhook.webhook_id", &patch.webhook_id)?;
        let fields = request::mask_fields(req.update_mask.as_ref(), UPDATABLE, OUTPUT_ONLY)
            .map_err(Error::Invalid)?;
        let wanted = request::expected_revision("webhook.etag", &patch.etag)?;
        let root = FieldPath::root("webhook");
        let mut v = check(&patch, &root, &fields);
        if fields.contains("secret") && patch.secret.is_empty() {
            v.add(
                &root.field("secret"),
                "give the new `whsec_` secret; one is generated only at creation",
            );
        }
        if !v.is_empty() {
            return Err(Error::Invalid(v.into_vec()));
        }
        let current = self.store.get(&patch.webhook_id).await?;
        let revision = request::parse_etag(&current.etag)
            .ok_or_else(|| Error::Internal("unparsable stored etag".into()))?;
        if wanted.is_some_and(|w| w != revision) {
            return Err(Error::StaleEtag(patch.webhook_id));
        }
        let mut merged = current;
        if fields.contains("name") {
            merged.name = patch.name;
        }
        if fields.contains("url") {
            merged.url = patch.url;
        }
        if fields.contains("event_types") {
            merged.event_types = patch.event_types;
        }
        if fields.contains("secret") {
            merged.secret = patch.secret;
        }
        if fields.contains("status") {
            merged.status = patch.status;
            merged.disabled_reason = patch.disabled_reason;
        }
        if fields.contains("headers") {
            merged.headers = patch.headers;
        }
        if fields.contains("description") {
            merged.description = patch.description;
        }
        self.store
            .update(
                &merged,
                revision,
                fields.contains("secret"),
                fields.contains("status"),
            )
            .await
    }

    /// DeleteWebhook.
    /// DeleteWebhook: refused while events wait to be delivered to the webhook, unless the
    /// request says to discard them.
    pub async fn delete(&self, req: pb::DeleteWebhookRequest) -> Result<(), Error> {
        check_webhook_id("webhook_id", &req.webhook_id)?;
        if !req.discard_undelivered {
            let undelivered = self.store.undelivered(&req.webhook_id).await?;
            if !undelivered.is_empty() {
                return Err(Error::HasUndeliveredEvents {
                    id: req.webhook_id,
                    events: undelivered,
                });
            }
        }
        self.store.delete(&req.webhook_id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> BTreeSet<&'static str> {
        UPDATABLE.iter().copied().collect()
    }

    fn fields_of(w: &pb::Webhook) -> Vec<String> {
        check(w, &FieldPath::root("webhook"), &all())
            .into_vec()
            .into_iter()
            .map(|v| v.field)
            .collect()
    }

    fn valid() -> pb::Webhook {
        pb::Webhook {
            name: "agent-notify".into(),
            url: "https://hooks.example.com/in".into(),
            event_types: vec!["lead.routed".into()],
            ..Default::default()
        }
    }

    #[test]
    fn a_valid_webhook_has_no_violation() {
        assert!(fields_of(&valid()).is_empty());
        let mut w = valid();
        w.event_types = vec!["*".into()];
        w.headers.insert("Authorization".into(), "Bearer t".into());
        w.secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into();
        assert!(fields_of(&w).is_empty());
    }

    #[test]
    fn every_bad_field_is_named() {
        let mut w = pb::Webhook {
            name: "Agent Notify".into(),
            url: "ftp://user:pw@example.com".into(),
            event_types: vec!["ok.type".into(), "Bad Type".into(), "ok.type".into()],
            secret: "plain".into(),
            status: 9,
            description: "d".repeat(MAX_DESCRIPTION_LEN + 1),
            ..Default::default()
        };
        w.headers.insert("webhook-signature".into(), "x".into());
        w.headers.insert("bad name".into(), "x".into());
        w.headers.insert("x-ok".into(), "line\nbreak".into());
        assert_eq!(
            fields_of(&w),
            [
                "webhook.name",
                "webhook.url",
                "webhook.event_types[1]",
                "webhook.event_types[2]",
                "webhook.secret",
                "webhook.status",
                "webhook.headers[\"bad name\"]",
                "webhook.headers[\"webhook-signature\"]",
                "webhook.headers[\"x-ok\"]",
                "webhook.description",
            ]
        );
    }

    #[test]
    fn urls_need_http_a_host_and_no_credentials() {
        assert!(check_url("http://127.0.0.1:9/x").is_ok());
        assert!(check_url("").is_err());
        assert!(check_url("not a url").is_err());
        assert!(check_url("mailto:a@b.c").is_err());
        assert!(
            check_url("https://u:p@example.com")
                .expect_err("credentials")
                .contains("headers")
        );
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN));
        assert!(check_url(&long).is_err());
    }

    #[test]
    fn no_event_types_is_a_violation() {
        let mut w = valid();
        w.event_types.clear();
        assert_eq!(fields_of(&w), ["webhook.event_types"]);
    }
}
