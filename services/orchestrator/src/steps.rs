//! Executors of the leaf step types: HTTP_REQUEST, DATA_TRANSFORM, FUNCTION_CALL, VALIDATION and
//! WEBHOOK_CALL. Each resolves its templates over the scope, does its work, and returns its output or
//! a [`StepError`] saying whether a retry may help. Composite steps and WAIT live in the driver.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use meshflow_kit::convert::{struct_to_json, to_json};
use meshflow_proto::workflow::v1 as pb;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::eval::{self, Programs, Scope};
use crate::retry::{self, Policy};
use meshflow_kit::ssrf;
use meshflow_webhook::delivery;

/// Why a step attempt failed.
#[derive(Debug, Clone, PartialEq)]
pub struct StepError {
    /// Stable code: `http_status`, `transport`, `timeout`, `expression`, `validation`, `refused`, ...
    pub code: &'static str,
    /// What happened, redacted of secrets.
    pub message: String,
    /// Structured details.
    pub details: Value,
    /// Whether another attempt may succeed.
    pub retryable: bool,
    /// The server's pushback.
    pub retry_after: Option<Duration>,
}

impl StepError {
    /// A failure no retry can fix.
    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            details: Value::Null,
            retryable: false,
            retry_after: None,
        }
    }

    /// A failure a later attempt may not meet (the retry policy decides whether there is one).
    pub fn retryable(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            retryable: true,
            ..Self::fatal(code, message)
        }
    }

    /// The error as stored and sent (`ExecutionError` JSON).
    pub fn to_json(&self, step_path: &str) -> Value {
        let mut v = json!({"code": self.code, "message": self.message, "stepPath": step_path});
        if !self.details.is_null() {
            v["details"] = self.details.clone();
        }
        eval::redact(&mut v);
        v
    }
}

impl From<meshflow_workflow::expr::EvalError> for StepError {
    fn from(e: meshflow_workflow::expr::EvalError) -> Self {
        Self::fatal(e.code(), eval::redact_text(&e.to_string()))
    }
}

/// What leaf executors need from the engine.
pub struct Env {
    /// Compiled expressions.
    pub programs: Arc<Programs>,
    /// HTTP client whose resolver applies the address policy.
    pub http: reqwest::Client,
    /// Outbound address policy.
    pub ssrf: Arc<ssrf::Policy>,
    /// Largest JSON output of a step.
    pub max_output_bytes: usize,
    /// The time everything the engine schedules is read from.
    pub clock: Arc<dyn meshflow_kit::clock::Clock>,
}

pub use meshflow_kit::ssrf::http_client;

/// Checks a URL's literal IP host (the resolver sees only names).
fn check_url(env: &Env, url: &reqwest::Url) -> Result<(), StepError> {
    env.ssrf
        .check_url(url)
        .map_err(|refused| StepError::fatal("refused", refused.to_string()))
}

fn parse_url(text: &str) -> Result<reqwest::Url, StepError> {
    let url = reqwest::Url::parse(text)
        .map_err(|e| StepError::fatal("bad_url", format!("`{text}` is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(StepError::fatal(
            "bad_url",
            format!("`{text}` must use http or https"),
        ));
    }
    Ok(url)
}

/// Per-attempt facts an HTTP call sends.
pub struct CallContext<'a> {
    /// `Idempotency-Key`: the same for every attempt of a step path.
    pub idempotency_key: &'a str,
    /// W3C `traceparent`.
    pub traceparent: &'a str,
}

/// The resolved request, as recorded (headers redacted).
fn recorded_request(method: &str, url: &str, headers: &Map<String, Value>, body: &Value) -> Value {
    let mut v = json!({"method": method, "url": url, "headers": headers, "body": body});
    eval::redact(&mut v);
    v
}

/// HTTP_REQUEST: returns (the resolved request as recorded, the outcome).
pub async fn http(
    env: &Env,
    h: &pb::HttpRequestStep,
    scope: &Scope,
    call: &CallContext<'_>,
    policy: &Policy,
) -> (Value, Result<Value, StepError>) {
    let p = &env.programs;
    let prepared = (|| -> Result<_, StepError> {
        let url_text = eval::resolve_text(p, &h.url, scope)?;
        let mut url = parse_url(&url_text)?;
        if !h.query.is_empty() {
            let mut pairs: Vec<(&String, String)> = Vec::new();
            for (k, v) in &h.query {
                pairs.push((k, eval::resolve_text(p, v, scope)?));
            }
            pairs.sort();
            let mut q = url.query_pairs_mut();
            for (k, v) in pairs {
                q.append_pair(k, &v);
            }
        }
        let mut headers = Map::new();
        for (k, v) in &h.headers {
            headers.insert(k.clone(), Value::String(eval::resolve_text(p, v, scope)?));
        }
        let body = match &h.body {
            Some(b) => eval::resolve_value(p, &to_json(b), scope)?,
            None => Value::Null,
        };
        Ok((url, headers, body))
    })();
    let (url, headers, body) = match prepared {
        Ok(x) => x,
        Err(e) => return (Value::Null, Err(e)),
    };
    let method = h.method.clone();
    let recorded = recorded_request(&method, url.as_str(), &headers, &body);
    if let Err(e) = check_url(env, &url) {
        return (recorded, Err(e));
    }
    let timeout = h
        .timeout
        .as_ref()
        .and_then(meshflow_kit::convert::from_duration)
        .filter(|d| !d.is_zero())
        .unwrap_or(Duration::from_secs(30));
    let Ok(m) = reqwest::Method::from_bytes(method.as_bytes()) else {
        return (
            recorded,
            Err(StepError::fatal(
                "bad_method",
                format!("`{method}` is not an HTTP method"),
            )),
        );
    };
    let mut req = env
        .http
        .request(m, url)
        .timeout(timeout)
        .header("idempotency-key", call.idempotency_key)
        .header("traceparent", call.traceparent);
    for (k, v) in &headers {
        req = req.header(k.as_str(), v.as_str().unwrap_or_default());
    }
    if !body.is_null() {
        req = req.json(&body);
    }
    let response = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            let err = match ssrf::refused_in(&e) {
                Some(r) => StepError::fatal("refused", r.to_string()),
                None if e.is_timeout() => StepError::retryable(
                    "timeout",
                    format!("no response within {}ms", timeout.as_millis()),
                ),
                None => StepError::retryable("transport", eval::redact_text(&error_chain(&e))),
            };
            return (recorded, Err(err));
        }
    };
    let status = response.status().as_u16();
    let mut response_headers = Map::new();
    for (k, v) in response.headers() {
        if let Ok(text) = v.to_str() {
            response_headers.insert(k.as_str().to_string(), Value::String(text.to_string()));
        }
    }
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| retry::parse_retry_after(v, env.clock.now()));
    let bytes = match read_capped(response, env.max_output_bytes).await {
        Ok(Body::Complete(b)) => b,
        Ok(Body::TooLarge { read }) => {
            return (
                recorded,
                Err(StepError::fatal(
                    "response_too_large",
                    format!(
                        "response body exceeds the limit of {} bytes (stopped after reading {read})",
                        env.max_output_bytes
                    ),
                )),
            );
        }
        Err(e) => {
            return (
                recorded,
                Err(StepError::retryable("transport", error_chain(&e))),
            );
        }
    };
    let body = serde_json::from_slice::<Value>(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    let response_value = json!({"status": status, "headers": response_headers, "body": body});
    let response = [("response", &response_value)];
    let ok = if h.success_condition.is_empty() {
        (200..300).contains(&status)
    } else {
        match eval::eval_bool_with(p, &h.success_condition, scope, &response) {
            Ok(b) => b,
            Err(e) => return (recorded, Err(e.into())),
        }
    };
    if !ok {
        let retryable = policy.retries_status(status);
        let mut details = json!({"status": status});
        if let Value::String(s) = &response_value["body"] {
            details["body"] = Value::String(s.chars().take(512).collect());
        } else {
            details["body"] = response_value["body"].clone();
        }
        return (
            recorded,
            Err(StepError {
                code: "http_status",
                message: format!("HTTP {status}"),
                details,
                retryable,
                retry_after,
            }),
        );
    }
    let output = if h.extract.is_empty() {
        response_value
    } else {
        let mut out = Map::new();
        let mut names: Vec<&String> = h.extract.keys().collect();
        names.sort();
        for name in names {
            match eval::eval_with(p, &h.extract[name], scope, &response) {
                Ok(v) => {
                    out.insert(name.clone(), v);
                }
                Err(e) => return (recorded, Err(e.into())),
            }
        }
        Value::Object(out)
    };
    (recorded, Ok(output))
}

/// How long a WEBHOOK_CALL attempt waits for a response.
const WEBHOOK_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A response body read up to a limit.
enum Body {
    /// The whole body, at most the limit.
    Complete(Vec<u8>),
    /// The body went past the limit; reading stopped after `read` bytes (the limit plus at most
    /// one chunk), whatever `Content-Length` said.
    TooLarge { read: usize },
}

/// Reads a response body chunk by chunk, stopping as soon as it passes `limit` bytes.
async fn read_capped(mut response: reqwest::Response, limit: usize) -> reqwest::Result<Body> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Ok(Body::TooLarge { read: 0 });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        body.extend_from_slice(&chunk);
        if body.len() > limit {
            return Ok(Body::TooLarge { read: body.len() });
        }
    }
    Ok(Body::Complete(body))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cur = c.source();
    }
    text
}

/// DATA_TRANSFORM with inline assignments (a rule's assignments are passed the same way).
pub fn transform(
    programs: &Programs,
    assignments: &[pb::Assignment],
    scope: &Scope,
    vars: &mut Value,
) -> Result<Value, StepError> {
    meshflow_workflow::transform::apply_with(assignments, vars, |source, vars, output| {
        eval::eval_with(
            programs,
            source,
            scope,
            &[("vars", vars), ("output", output)],
        )
    })
    .map_err(|f| StepError {
        code: f.error.code(),
        message: eval::redact_text(&format!(
            "assignments[{}] ({}): {}",
            f.index, f.target, f.error
        )),
        details: json!({"index": f.index, "target": f.target}),
        retryable: false,
        retry_after: None,
    })
}

/// FUNCTION_CALL: evaluates the arguments and calls the built-in. `log` lines are returned for the
/// caller to record.
pub fn function_call(
    env: &Env,
    f: &pb::FunctionCallStep,
    scope: &Scope,
) -> Result<(Value, Vec<(String, String)>), StepError> {
    let args = match &f.arguments {
        Some(a) => eval::resolve_value(&env.programs, &struct_to_json(a), scope)?,
        None => Value::Object(Map::new()),
    };
    let arg = |name: &str| args.get(name).cloned().unwrap_or(Value::Null);
    let text = |name: &str| -> Result<String, StepError> {
        match arg(name) {
            Value::String(s) => Ok(s),
            other => Err(StepError::fatal(
                "argument",
                format!("`{name}` must be a string, got {other}"),
            )),
        }
    };
    let mut logs = Vec::new();
    let out = match f.function.as_str() {
        "uuid" => Value::String(meshflow_kit::id::new_id()),
        "now" => Value::String(
            env.clock
                .now()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        ),
        "sum" => {
            let Value::Array(items) = arg("values") else {
                return Err(StepError::fatal(
                    "argument",
                    "`values` must be a list of numbers",
                ));
            };
            let mut int_sum: i64 = 0;
            let mut float_sum = 0.0;
            let mut all_int = true;
            for item in &items {
                match (item.as_i64(), item.as_f64()) {
                    (Some(i), _) => {
                        int_sum = int_sum.saturating_add(i);
                        float_sum += i as f64;
                    }
                    (None, Some(x)) => {
                        all_int = false;
                        float_sum += x;
                    }
                    _ => {
                        return Err(StepError::fatal(
                            "argument",
                            format!("`values` holds {item}, not a number"),
                        ));
                    }
                }
            }
            if all_int {
                json!(int_sum)
            } else {
                json!(float_sum)
            }
        }
        "sha256" => Value::String(hex(&Sha256::digest(text("value")?.as_bytes()))),
        "hmac_sha256" => {
            let mut mac = Hmac::<Sha256>::new_from_slice(text("key")?.as_bytes())
                .map_err(|e| StepError::fatal("argument", e.to_string()))?;
            mac.update(text("value")?.as_bytes());
            Value::String(B64.encode(mac.finalize().into_bytes()))
        }
        "base64_encode" => Value::String(B64.encode(text("value")?.as_bytes())),
        "base64_decode" => {
            let bytes = B64
                .decode(text("value")?.as_bytes())
                .map_err(|e| StepError::fatal("argument", format!("not base64: {e}")))?;
            Value::String(
                String::from_utf8(bytes)
                    .map_err(|_| StepError::fatal("argument", "decoded bytes are not UTF-8"))?,
            )
        }
        "json_parse" => serde_json::from_str(&text("text")?)
            .map_err(|e| StepError::fatal("argument", format!("not JSON: {e}")))?,
        "json_stringify" => Value::String(arg("value").to_string()),
        "log" => {
            let level = match arg("level") {
                Value::String(l) if matches!(l.as_str(), "debug" | "info" | "warn" | "error") => l,
                _ => "info".to_string(),
            };
            logs.push((level, eval::redact_text(&text("message")?)));
            Value::Null
        }
        other => {
            return Err(StepError::fatal(
                "unknown_function",
                format!("no built-in function `{other}`"),
            ));
        }
    };
    Ok((out, logs))
}

/// Lowercase hex of `bytes`, written into one string.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// VALIDATION: every schema error and every rule that does not hold, listed.
pub fn validation(env: &Env, v: &pb::ValidationStep, scope: &Scope) -> Result<Value, StepError> {
    let source = if v.value.is_empty() {
        "input"
    } else {
        v.value.as_str()
    };
    let value = eval::eval(&env.programs, source, scope)?;
    let mut violations = Vec::new();
    if let Some(schema) = &v.json_schema {
        let schema = struct_to_json(schema);
        let validator = env
            .programs
            .schema(&schema)
            .map_err(|e| StepError::fatal("validation", format!("invalid JSON Schema: {e}")))?;
        for error in validator.iter_errors(&value) {
            violations.push(
                json!({"path": error.instance_path().to_string(), "message": error.to_string()}),
            );
        }
    }
    let rule_scope = [("value", &value)];
    for (i, rule) in v.rules.iter().enumerate() {
        match eval::eval_bool_with(&env.programs, &rule.expression, scope, &rule_scope) {
            Ok(true) => {}
            Ok(false) => violations.push(json!({"rule": i, "message": rule.message})),
            Err(e) => {
                violations.push(json!({"rule": i, "message": format!("{}: {e}", rule.message)}))
            }
        }
    }
    if violations.is_empty() {
        Ok(json!({"valid": true, "value": value}))
    } else {
        Err(StepError {
            code: "validation",
            message: format!("{} violation(s)", violations.len()),
            details: json!({"violations": violations}),
            retryable: false,
            retry_after: None,
        })
    }
}

/// The registered webhook a WEBHOOK_CALL names (by id or name), if it may receive `event_type`.
async fn registered_webhook(
    webhooks: &meshflow_webhook::Store,
    id_or_name: &str,
    event_type: &str,
) -> Result<meshflow_webhook::Endpoint, StepError> {
    let endpoint = match webhooks.endpoint(id_or_name).await {
        Ok(Some(e)) => e,
        Ok(None) => {
            return Err(StepError::fatal(
                "webhook_not_found",
                format!("no webhook has id or name `{id_or_name}`"),
            ));
        }
        // The database may be back at the next attempt.
        Err(e) => {
            return Err(StepError::retryable("webhook_lookup", e.to_string()));
        }
    };
    if endpoint.status != meshflow_proto::webhook::v1::WebhookStatus::Active {
        return Err(StepError::fatal(
            "webhook_disabled",
            format!(
                "webhook `{}` is disabled: {}",
                endpoint.name, endpoint.disabled_reason
            ),
        ));
    }
    if !endpoint.subscribes_to(event_type) {
        return Err(StepError::fatal(
            "webhook_not_subscribed",
            format!(
                "webhook `{}` does not receive `{event_type}` events; it receives {}",
                endpoint.name,
                endpoint.event_types.join(", ")
            ),
        ));
    }
    Ok(endpoint)
}

/// WEBHOOK_CALL: a signed Standard Webhooks POST to a registered endpoint of `webhooks` (its URL,
/// secret and headers) or to the step's URL with the step's secret. `message_id` is stable across
/// attempts.
pub async fn webhook_call(
    env: &Env,
    webhooks: &meshflow_webhook::Store,
    w: &pb::WebhookCallStep,
    scope: &Scope,
    message_id: &str,
    call: &CallContext<'_>,
    policy: &Policy,
) -> (Value, Result<Value, StepError>) {
    let endpoint = match w.webhook_id.as_str() {
        "" => None,
        id => match registered_webhook(webhooks, id, &w.event_type).await {
            Ok(e) => Some(e),
            Err(e) => return (Value::Null, Err(e)),
        },
    };
    let registered = endpoint.as_ref();
    let p = &env.programs;
    let prepared = (|| -> Result<_, StepError> {
        let (url, secret) = match registered {
            Some(e) => (parse_url(&e.url)?, e.secret.clone()),
            None => (
                parse_url(&eval::resolve_text(p, &w.url, scope)?)?,
                eval::resolve_text(p, &w.secret, scope)?,
            ),
        };
        let payload = match &w.payload {
            Some(v) => eval::resolve_value(p, &to_json(v), scope)?,
            None => Value::Null,
        };
        Ok((url, secret, payload))
    })();
    let (url, secret, payload) = match prepared {
        Ok(x) => x,
        Err(e) => return (Value::Null, Err(e)),
    };
    let now = env.clock.now();
    let body = delivery::envelope(&w.event_type, &payload, now);
    let recorded = recorded_request(
        "POST",
        url.as_str(),
        &Map::new(),
        &serde_json::from_str(&body).unwrap_or(Value::Null),
    );
    // The endpoint's own headers first: the delivery's, set after, are reserved to it.
    let mut headers: Vec<(&str, &str)> = registered
        .iter()
        .flat_map(|e| &e.headers)
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    headers.push(("idempotency-key", call.idempotency_key));
    headers.push(("traceparent", call.traceparent));
    let message = delivery::Message {
        id: message_id,
        body: &body,
        secret: &secret,
        headers,
    };
    let attempt = delivery::send(
        &env.http,
        &env.ssrf,
        url.as_str(),
        &message,
        WEBHOOK_CALL_TIMEOUT,
        now,
    )
    .await;
    let outcome = match attempt.result {
        Err(delivery::Failure::Refused(r)) => Err(StepError::fatal("refused", r.to_string())),
        Err(delivery::Failure::Invalid(e)) => Err(StepError::fatal("bad_secret", e)),
        Err(f @ delivery::Failure::Timeout(_)) => {
            Err(StepError::retryable("timeout", f.to_string()))
        }
        Err(delivery::Failure::Transport(e)) => {
            Err(StepError::retryable("transport", eval::redact_text(&e)))
        }
        Ok(r) if r.accepted() => {
            let mut out = json!({"status": r.status, "webhookId": message_id});
            if let Some(e) = registered {
                out["endpoint"] = json!({"webhookId": e.webhook_id, "name": e.name});
            }
            Ok(out)
        }
        Ok(r) => Err(StepError {
            code: "http_status",
            message: format!("HTTP {}", r.status),
            details: json!({"status": r.status, "body": r.excerpt}),
            retryable: policy.retries_status(r.status),
            retry_after: None,
        }),
    };
    (recorded, outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Env {
        let policy = Arc::new(ssrf::Policy::default());
        Env {
            programs: Arc::new(Programs::default()),
            http: http_client(policy.clone()).expect("client"),
            ssrf: policy,
            max_output_bytes: 1024,
            clock: meshflow_kit::clock::system(),
        }
    }

    #[test]
    fn functions() {
        let env = env();
        let call = |name: &str, args: Value| {
            let f = pb::FunctionCallStep {
                function: name.into(),
                arguments: Some(meshflow_kit::convert::struct_from_json(&args)),
            };
            function_call(&env, &f, &Scope::default())
        };
        assert_eq!(
            call("sum", json!({"values": [1, 2, 3]})).map(|r| r.0),
            Ok(json!(6))
        );
        assert_eq!(
            call("sum", json!({"values": [1, 2.5]})).map(|r| r.0),
            Ok(json!(3.5))
        );
        assert_eq!(
            call("sha256", json!({"value": "abc"})).map(|r| r.0),
            Ok(json!(
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
            ))
        );
        assert_eq!(
            call("base64_encode", json!({"value": "hi"})).map(|r| r.0),
            Ok(json!("aGk="))
        );
        assert_eq!(
            call("base64_decode", json!({"value": "aGk="})).map(|r| r.0),
            Ok(json!("hi"))
        );
        assert_eq!(
            call("json_parse", json!({"text": "{\"a\":1}"})).map(|r| r.0),
            Ok(json!({"a": 1}))
        );
        assert_eq!(
            call("json_stringify", json!({"value": {"a": [1]}})).map(|r| r.0),
            Ok(json!("{\"a\":[1]}"))
        );
        assert_eq!(
            call("log", json!({"message": "hello", "level": "warn"})).map(|r| r.1),
            Ok(vec![("warn".into(), "hello".into())])
        );
        assert!(call("sum", json!({"values": ["x"]})).is_err());
        assert!(call("nope", json!({})).is_err());
        let uuid = call("uuid", json!({})).expect("uuid").0;
        assert!(meshflow_kit::id::is_valid(
            uuid.as_str().unwrap_or_default()
        ));
    }

    #[test]
    fn validation_lists_every_violation() {
        let env = env();
        let mut scope = Scope::default();
        scope.set("input", json!({"age": -3}));
        let v = pb::ValidationStep {
            value: "input".into(),
            json_schema: Some(meshflow_kit::convert::struct_from_json(
                &json!({"type": "object", "required": ["name"], "properties": {"age": {"minimum": 0}}}),
            )),
            rules: vec![
                pb::ValidationRule {
                    expression: "value.age < 150".into(),
                    message: "too old".into(),
                },
                pb::ValidationRule {
                    expression: "has(value.name)".into(),
                    message: "needs a name".into(),
                },
            ],
        };
        let err = validation(&env, &v, &scope).expect_err("invalid");
        assert_eq!(err.code, "validation");
        assert_eq!(
            err.details["violations"].as_array().map(Vec::len),
            Some(3),
            "{}",
            err.details
        );
        scope.set("input", json!({"age": 30, "name": "n"}));
        assert!(validation(&env, &v, &scope).is_ok());
    }
}
