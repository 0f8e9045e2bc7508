//! Logging and tracing: pretty or JSON logs to stderr, and OTLP trace export through
//! tracing-opentelemetry when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (service name from
//! `OTEL_SERVICE_NAME`, default `meshflow`). W3C `traceparent` is the propagation format.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::TextMapPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// Keeps the trace pipeline alive; dropping it flushes pending spans.
#[must_use = "dropping the guard stops trace export"]
pub struct Guard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(err) = provider.shutdown()
        {
            eprintln!("meshflow: flushing traces failed: {err}");
        }
    }
}

/// Installs the global subscriber. Call once, inside the Tokio runtime.
pub fn init(format: LogFormat, filter: &str) -> anyhow::Result<Guard> {
    let filter = EnvFilter::try_new(filter)?;
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let fmt = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed()
    };

    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty());
    let provider = match endpoint {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()?;
            let name =
                std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "meshflow".to_string());
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(name)
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
        None => None,
    };
    EXPORTING.store(provider.is_some(), Ordering::Relaxed);
    match &provider {
        // Spans are exported at INFO whatever the log filter says: quiet logs keep their traces.
        Some(p) => tracing_subscriber::registry()
            .with(fmt.with_filter(filter))
            .with(
                tracing_opentelemetry::layer()
                    .with_tracer(p.tracer("meshflow"))
                    .with_filter(LevelFilter::INFO),
            )
            .try_init()?,
        // One global filter: callsites it disables cost nothing at all.
        None => tracing_subscriber::registry()
            .with(fmt)
            .with(filter)
            .try_init()?,
    }
    Ok(Guard { provider })
}

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (`OTEL_EXPORTER_OTLP_ENDPOINT` was set at [`init`]).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Makes `span` a child of the remote span a W3C `traceparent` names, and returns the
/// `traceparent` that names `span` itself (for the requests it makes), or `None` when the span is
/// not exported.
pub fn continue_trace(span: &tracing::Span, parent: &str) -> Option<String> {
    let propagator = TraceContextPropagator::new();
    let carrier = HashMap::from([("traceparent".to_string(), parent.to_string())]);
    span.set_parent(propagator.extract(&carrier)).ok()?;
    let mut out: HashMap<String, String> = HashMap::new();
    propagator.inject_context(&span.context(), &mut out);
    out.remove("traceparent")
}

/// Reads a W3C trace context from request headers.
pub(crate) struct HeaderExtractor<'a>(pub &'a tonic::codegen::http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}
