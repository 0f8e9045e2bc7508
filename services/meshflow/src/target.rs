//! A small local HTTP server for HTTP steps to call: the benchmark's JSON target and the tests'
//! downstream service. It binds 127.0.0.1:0 and serves:
//!
//! - `GET /item/{n}` → `{"id": n, "price": n * 1.5, "ok": true}`;
//! - `ANY /status/{code}` → that status (with `Retry-After: {retry_after}` when asked);
//! - `ANY /flaky/{fails}` → 503 for the first `fails` requests of each `Idempotency-Key`, then 200;
//! - `ANY /gate` → holds the request until [`Target::open_gate`] (to catch a step in flight);
//! - `ANY /echo` → the request's method, headers and JSON body;
//! - `GET /endless` → a body without `Content-Length` that never ends (64 KiB chunks of `x`),
//!   to prove a reader stops on its own.
//!
//! Every request is counted per `Idempotency-Key` and kept in a log.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};

/// One request the target received.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Method.
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// Lowercased headers.
    pub headers: HashMap<String, String>,
    /// Body text.
    pub body: String,
}

#[derive(Default)]
struct Inner {
    log: Mutex<Vec<Seen>>,
    by_key: Mutex<HashMap<String, usize>>,
    gate_open: watch::Sender<bool>,
    arrived: Notify,
}

/// A running target server.
#[derive(Clone)]
pub struct Target {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    inner: Arc<Inner>,
}

impl Target {
    /// Starts the server on 127.0.0.1:0.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts the server on `addr`.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr: SocketAddr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            gate_open: watch::channel(false).0,
            ..Default::default()
        });
        let app = axum::Router::new()
            .route("/item/{n}", get(item))
            .route("/status/{code}", any(status))
            .route("/flaky/{fails}", any(flaky))
            .route("/gate", any(gate))
            .route("/echo", any(echo))
            .route("/endless", get(endless))
            .with_state(inner.clone());
        tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                tracing::error!(error = %err, "target server stopped");
            }
        });
        Ok(Self {
            base: format!("http://{addr}"),
            inner,
        })
    }

    /// Requests seen so far.
    pub fn log(&self) -> Vec<Seen> {
        self.inner
            .log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Requests seen per `Idempotency-Key`.
    pub fn counts(&self) -> HashMap<String, usize> {
        self.inner
            .by_key
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Lets every held and future `/gate` request through.
    pub fn open_gate(&self) {
        self.inner.gate_open.send_replace(true);
    }

    /// Resolves once `n` requests in all have arrived.
    pub async fn wait_for_requests(&self, n: usize) {
        loop {
            let notified = self.inner.arrived.notified();
            if self
                .inner
                .log
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len()
                >= n
            {
                return;
            }
            notified.await;
        }
    }
}

fn record(inner: &Inner, method: &Method, uri: &Uri, headers: &HeaderMap, body: &str) -> usize {
    let headers: HashMap<String, String> = headers
        .iter()
        .filter_map(|(k, v)| {
            v.to_str()
                .ok()
                .map(|v| (k.as_str().to_string(), v.to_string()))
        })
        .collect();
    let key = headers.get("idempotency-key").cloned().unwrap_or_default();
    let count = {
        let mut by_key = inner.by_key.lock().unwrap_or_else(PoisonError::into_inner);
        let c = by_key.entry(key).or_default();
        *c += 1;
        *c
    };
    inner
        .log
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(Seen {
            method: method.to_string(),
            uri: uri.to_string(),
            headers,
            body: body.to_string(),
        });
    inner.arrived.notify_waiters();
    count
}

async fn item(
    State(inner): State<Arc<Inner>>,
    Path(n): Path<i64>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Json<Value> {
    record(&inner, &method, &uri, &headers, "");
    Json(json!({"id": n, "price": n as f64 * 1.5, "ok": true}))
}

async fn status(
    State(inner): State<Arc<Inner>>,
    Path(code): Path<u16>,
    Query(q): Query<HashMap<String, String>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> Response {
    record(&inner, &method, &uri, &headers, &body);
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (code, Json(json!({"status": code.as_u16()}))).into_response();
    if let Some(ra) = q.get("retry_after").and_then(|v| v.parse().ok()) {
        response.headers_mut().insert("retry-after", ra);
    }
    response
}

async fn flaky(
    State(inner): State<Arc<Inner>>,
    Path(fails): Path<usize>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> Response {
    let n = record(&inner, &method, &uri, &headers, &body);
    if n <= fails {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"attempt": n}))).into_response()
    } else {
        Json(json!({"attempt": n, "ok": true})).into_response()
    }
}

async fn gate(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> Json<Value> {
    let n = record(&inner, &method, &uri, &headers, &body);
    let mut open = inner.gate_open.subscribe();
    let _ = open.wait_for(|o| *o).await;
    Json(json!({"passed": true, "request": n}))
}

async fn echo(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> Json<Value> {
    record(&inner, &method, &uri, &headers, &body);
    let h: serde_json::Map<String, Value> = headers
        .iter()
        .filter_map(|(k, v)| {
            v.to_str()
                .ok()
                .map(|v| (k.as_str().to_string(), Value::String(v.to_string())))
        })
        .collect();
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::String(body));
    Json(json!({"method": method.as_str(), "headers": h, "body": body}))
}

async fn endless(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    record(&inner, &method, &uri, &headers, "");
    let chunk = axum::body::Bytes::from(vec![b'x'; 64 * 1024]);
    let chunks = futures::stream::repeat_with(move || Ok::<_, std::io::Error>(chunk.clone()));
    axum::body::Body::from_stream(chunks).into_response()
}
