//! The gRPC server every meshflow process runs: the mounted services plus `grpc.health.v1.Health`
//! (SERVING per service and for `""`, NOT_SERVING while draining) and server reflection v1 and
//! v1alpha advertising exactly what is mounted; tower layers for the request deadline, a global
//! concurrency limit and one span per RPC (joined to the caller's `traceparent`); graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tower::Service;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::ServerConfig;
use crate::telemetry::HeaderExtractor;

/// The services a server mounts, each added as its generated tonic server.
#[derive(Default)]
pub struct Mounts {
    routes: RoutesBuilder,
    names: Vec<&'static str>,
}

impl Mounts {
    /// No services yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Mounts a generated tonic server; it becomes routable, healthy and reflected.
    pub fn add<S>(&mut self, svc: S) -> &mut Self
    where
        S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes.add_service(svc);
        self
    }

    /// Full names of the mounted services, e.g. `meshflow.workflow.v1.WorkflowService`.
    pub fn names(&self) -> &[&'static str] {
        &self.names
    }
}

const HEALTH: &str = "grpc.health.v1.Health";
const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";

fn reflection(names: &[&'static str]) -> tonic_reflection::server::Builder<'static> {
    let mut builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(meshflow_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    for name in names
        .iter()
        .copied()
        .chain([HEALTH, REFLECTION_V1, REFLECTION_V1ALPHA])
    {
        builder = builder.with_service_name(name);
    }
    builder
}

/// One span per RPC, named after it (`meshflow.workflow.v1.WorkflowService/GetWorkflow`) and joined
/// to the caller's W3C trace context.
fn rpc_span(request: &http::Request<()>) -> tracing::Span {
    let rpc = request.uri().path().trim_start_matches('/');
    let span =
        tracing::info_span!("rpc", otel.name = %rpc, otel.kind = "server", rpc.system = "grpc");
    let parent = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&HeaderExtractor(request.headers()))
    });
    // Without an OpenTelemetry layer there is nothing to join; that is not an error.
    let _ = span.set_parent(parent);
    span
}

/// Serves `mounts` on `listener` until `shutdown` resolves, then turns every service NOT_SERVING and
/// drains in-flight RPCs for at most `config.shutdown_grace`.
pub async fn serve(
    listener: TcpListener,
    mounts: Mounts,
    config: &ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let Mounts { mut routes, names } = mounts;
    let (reporter, health) = tonic_health::server::health_reporter();
    for name in names.iter().copied().chain([""]) {
        reporter
            .set_service_status(name, ServingStatus::Serving)
            .await;
    }
    routes
        .add_service(health)
        .add_service(reflection(&names).build_v1()?)
        .add_service(reflection(&names).build_v1alpha()?);

    let (draining_tx, mut draining_rx) = watch::channel(false);
    let signal = {
        let names = names.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down: not serving, draining in-flight rpcs");
            for name in names.iter().copied().chain([""]) {
                reporter
                    .set_service_status(name, ServingStatus::NotServing)
                    .await;
            }
            let _ = draining_tx.send(true);
        }
    };

    let addr = listener.local_addr()?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = tonic::transport::Server::builder()
        .timeout(config.request_timeout)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            config.concurrency_limit,
        ))
        .trace_fn(rpc_span)
        .add_routes(routes.routes())
        .serve_with_incoming_shutdown(incoming, signal);
    tracing::info!(%addr, services = ?names, "serving");

    let grace = config.shutdown_grace;
    let deadline = async move {
        let _ = draining_rx.wait_for(|draining| *draining).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = server.instrument(tracing::info_span!("server")) => result?,
        () = deadline => tracing::warn!(?grace, "shutdown grace elapsed with rpcs still in flight"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for sigterm");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("received sigint"),
        () = term => tracing::info!("received sigterm"),
    }
}
