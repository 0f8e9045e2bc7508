//! One delivery attempt of a Standard Webhooks message: the `{type, timestamp, data}` envelope
//! POSTed as JSON text, signed over exactly the bytes sent (`webhook-id`, `webhook-timestamp`,
//! `webhook-signature`), through the outbound client that applies the address policy. WEBHOOK_CALL
//! steps, TestWebhook and RedeliverWebhookEvent all send through [`send`].

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use meshflow_kit::ssrf;
use serde_json::{Value, json};

use crate::signature;

/// How much of a response body an attempt keeps.
pub const EXCERPT_BYTES: usize = 1024;

/// How long an attempt waits for a response.
pub const TIMEOUT: Duration = Duration::from_secs(15);

/// The JSON text of an event's envelope.
pub fn envelope(event_type: &str, data: &Value, now: DateTime<Utc>) -> String {
    json!({"type": event_type, "timestamp": now.to_rfc3339(), "data": data}).to_string()
}

/// A message to send: the same `id` on every attempt, a fresh timestamp and signature on each.
pub struct Message<'a> {
    /// `webhook-id`.
    pub id: &'a str,
    /// The envelope text ([`envelope`]).
    pub body: &'a str,
    /// The signing secret (`whsec_…`, or any text for an unregistered URL).
    pub secret: &'a str,
    /// Headers sent first (the endpoint's own), then those the delivery sets, which win.
    pub headers: Vec<(&'a str, &'a str)>,
}

/// What an endpoint answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// The first [`EXCERPT_BYTES`] of the body.
    pub excerpt: String,
}

impl Response {
    /// Whether the endpoint took the message (2xx).
    pub fn accepted(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Why no response arrived.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Failure {
    /// The outbound address policy refused the endpoint's address.
    #[error("{0}")]
    Refused(ssrf::Refused),
    /// No response within the timeout.
    #[error("no response within {}s", .0.as_secs())]
    Timeout(Duration),
    /// The connection failed.
    #[error("{0}")]
    Transport(String),
    /// The URL or the secret cannot be used.
    #[error("{0}")]
    Invalid(String),
}

/// One attempt: when it was sent, how long it took, and what came of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    /// When it was sent.
    pub time: DateTime<Utc>,
    /// Until the response (or the failure).
    pub latency: Duration,
    /// The response, or why there was none.
    pub result: Result<Response, Failure>,
}

impl Attempt {
    /// Whether the endpoint took the message.
    pub fn accepted(&self) -> bool {
        self.result.as_ref().is_ok_and(Response::accepted)
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cur = c.source();
    }
    text
}

/// Sends one attempt of `message` to `url` at `now`.
pub async fn send(
    client: &reqwest::Client,
    policy: &ssrf::Policy,
    url: &str,
    message: &Message<'_>,
    timeout: Duration,
    now: DateTime<Utc>,
) -> Attempt {
    let started = Instant::now();
    let result = attempt(client, policy, url, message, timeout, now).await;
    Attempt {
        time: now,
        latency: started.elapsed(),
        result,
    }
}

async fn attempt(
    client: &reqwest::Client,
    policy: &ssrf::Policy,
    url: &str,
    message: &Message<'_>,
    timeout: Duration,
    now: DateTime<Utc>,
) -> Result<Response, Failure> {
    let url = reqwest::Url::parse(url).map_err(|e| Failure::Invalid(format!("bad url: {e}")))?;
    policy.check_url(&url).map_err(Failure::Refused)?;
    let timestamp = now.timestamp();
    let signature = signature::sign(message.secret, message.id, timestamp, message.body)
        .map_err(|e| Failure::Invalid(e.to_string()))?;
    let mut req = client.post(url).timeout(timeout);
    for (name, value) in &message.headers {
        req = req.header(*name, *value);
    }
    let req = req
        .header("webhook-id", message.id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .header("content-type", "application/json")
        .body(message.body.to_string());
    let mut response = req.send().await.map_err(|e| {
        if let Some(refused) = ssrf::refused_in(&e) {
            Failure::Refused(refused)
        } else if e.is_timeout() {
            Failure::Timeout(timeout)
        } else {
            Failure::Transport(chain(&e))
        }
    })?;
    let status = response.status().as_u16();
    // Only an excerpt is kept, so only that much is read, whatever the endpoint sends.
    let mut body = Vec::new();
    while body.len() < EXCERPT_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(EXCERPT_BYTES);
    Ok(Response {
        status,
        excerpt: String::from_utf8_lossy(&body).into_owned(),
    })
}
