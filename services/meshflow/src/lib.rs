//! The meshflow server: every implemented service in one process, or a chosen subset, over one
//! database. `main.rs` is the command line; tests start the same server in-process with [`start`].

use std::net::SocketAddr;
use std::sync::Arc;

pub mod bench;
pub mod target;

use anyhow::Context;
use meshflow_kit::ServerConfig;
use meshflow_kit::server::{self, Mounts};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A group of services `meshflow serve <name>` can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ServiceName {
    /// WorkflowService, WorkflowTemplateService, TransformationRuleService.
    Workflow,
    /// ExecutionService (read side of execution records).
    Execution,
    /// OrchestratorService (the engine).
    Orchestrator,
    /// WebhookService (subscriptions).
    Webhook,
    /// CircuitBreakerService (the shared breakers).
    Circuitbreaker,
}

impl ServiceName {
    /// Every service group that is built.
    pub const ALL: &[ServiceName] = &[
        ServiceName::Workflow,
        ServiceName::Execution,
        ServiceName::Orchestrator,
        ServiceName::Webhook,
        ServiceName::Circuitbreaker,
    ];
}

/// The address blocks outbound calls may reach besides public addresses (`--allow-http-to`).
fn allowed_blocks(config: &ServerConfig) -> anyhow::Result<Vec<meshflow_kit::ssrf::Cidr>> {
    config
        .allow_http_to
        .iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.parse()
                .map_err(|e: String| anyhow::anyhow!("--allow-http-to: {e}"))
        })
        .collect()
}

/// The engine settings from the server configuration, scheduling by `clock`.
pub fn engine_config(
    config: &ServerConfig,
    clock: Arc<dyn meshflow_kit::clock::Clock>,
) -> anyhow::Result<meshflow_orchestrator::Config> {
    let allow = allowed_blocks(config)?;
    Ok(meshflow_orchestrator::Config {
        owner: config
            .replica_id
            .clone()
            .filter(|id| !id.trim().is_empty())
            .unwrap_or_else(meshflow_kit::id::new_id),
        lease_ttl: config.lease_ttl,
        poll_interval: config.poll_interval,
        park_after: config.park_after,
        allow,
        limits: config.limits.clone(),
        clock,
    })
}

/// A workflow's executions for WorkflowService's deletes, through the execution crate's store. A
/// cancellation is stored as the engine's cancel signal, which whichever server drives the
/// execution acts on, as it does for CancelExecution through another server.
struct WorkflowExecutions {
    store: meshflow_execution::store::Store,
    clock: Arc<dyn meshflow_kit::clock::Clock>,
}

#[tonic::async_trait]
impl meshflow_workflow::Executions for WorkflowExecutions {
    async fn active(&self, workflow_id: &str) -> Result<Vec<String>, String> {
        self.store
            .active_of(workflow_id)
            .await
            .map_err(|e| e.to_string())
    }

    async fn cancel(&self, execution_ids: &[String], reason: &str) -> Result<(), String> {
        use meshflow_orchestrator::driver::CANCEL_SIGNAL;
        for id in execution_ids {
            self.store
                .add_signal(
                    id,
                    CANCEL_SIGNAL,
                    serde_json::Value::String(reason.to_string()),
                    Some(CANCEL_SIGNAL),
                    self.clock.now(),
                )
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// Where a database URL points, for an error message: the host and port (or the file), never the
/// user or password.
pub fn database_target(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) if u.scheme().starts_with("postgres") => format!(
            "{}:{}",
            u.host_str().unwrap_or("localhost"),
            u.port().unwrap_or(5432)
        ),
        Ok(u) if u.scheme() == "sqlite" => {
            let path = url.trim_start_matches("sqlite:").trim_start_matches("//");
            path.split('?').next().unwrap_or(path).to_string()
        }
        _ => "the configured database".to_string(),
    }
}

/// Binds the listener, then connects (and migrates) the database and mounts `services`: a taken
/// port fails at once, before the database is touched.
pub async fn prepare(
    config: &ServerConfig,
    services: &[ServiceName],
) -> anyhow::Result<(TcpListener, Mounts)> {
    prepare_with_clock(config, services, meshflow_kit::clock::system()).await
}

/// [`prepare`], with the engine scheduling by `clock` (tests drive a manual one).
pub async fn prepare_with_clock(
    config: &ServerConfig,
    services: &[ServiceName],
    clock: Arc<dyn meshflow_kit::clock::Clock>,
) -> anyhow::Result<(TcpListener, Mounts)> {
    let limits = &config.limits;
    meshflow_workflow::expr::cost::set_limits(meshflow_workflow::expr::cost::Limits {
        max_nesting: limits.max_expression_nesting,
        max_iterations: limits.max_expression_iterations,
        max_string_bytes: limits.max_expression_string_bytes,
        max_list_items: limits.max_expression_list_items,
    });
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let target = database_target(&config.database_url);
    if config.database_url.starts_with("postgres") {
        // The pool retries a refused connection until its timeout and then reports only that it
        // timed out; one plain connection first names the cause, at once.
        let reached = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            tokio::net::TcpStream::connect(&target),
        )
        .await;
        match reached {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => anyhow::bail!("cannot connect to the database at {target}: {e}"),
            Err(_) => anyhow::bail!("cannot connect to the database at {target}: no answer in 10s"),
        }
    }
    let db = meshflow_kit::db::connect(config)
        .await
        .with_context(|| format!("cannot connect to the database at {target}"))?;
    let mut mounts = Mounts::new();
    let services = if services.is_empty() {
        ServiceName::ALL
    } else {
        services
    };
    for service in services {
        match service {
            ServiceName::Workflow => meshflow_workflow::mount(
                &mut mounts,
                meshflow_workflow::store::Store::new(db.clone()),
                Arc::new(WorkflowExecutions {
                    store: meshflow_execution::store::Store::with_clock(db.clone(), clock.clone()),
                    clock: clock.clone(),
                }),
                config,
            ),
            ServiceName::Execution => meshflow_execution::mount(
                &mut mounts,
                meshflow_execution::store::Store::with_clock(db.clone(), clock.clone()),
                meshflow_workflow::store::Store::new(db.clone()),
                config,
            ),
            ServiceName::Orchestrator => {
                let engine = meshflow_orchestrator::Engine::start(
                    db.clone(),
                    engine_config(config, clock.clone())?,
                )?;
                meshflow_orchestrator::mount(&mut mounts, engine, config)
            }
            ServiceName::Webhook => {
                let policy = Arc::new(meshflow_kit::ssrf::Policy::new(allowed_blocks(config)?));
                let outbound = meshflow_webhook::Outbound {
                    client: meshflow_kit::ssrf::http_client(policy.clone())?,
                    policy,
                };
                meshflow_webhook::mount(
                    &mut mounts,
                    meshflow_webhook::Store::new(db.clone()),
                    outbound,
                    config,
                )
            }
            ServiceName::Circuitbreaker => {
                let store = meshflow_circuitbreaker::Store::new(db.clone(), clock.clone());
                let hub = meshflow_circuitbreaker::Hub::start(store.clone(), config.poll_interval)
                    .await
                    .context("reading circuit breaker transitions")?;
                meshflow_circuitbreaker::mount(
                    &mut mounts,
                    meshflow_circuitbreaker::Service::new(store, hub),
                    config,
                )
            }
        }
    }
    Ok((listener, mounts))
}

/// A server running in this process.
pub struct Running {
    /// The address it listens on.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Starts draining and waits for the server to stop.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await?
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts a server in the background (for tests and the benchmark).
pub async fn start(config: ServerConfig, services: &[ServiceName]) -> anyhow::Result<Running> {
    start_with_clock(config, services, meshflow_kit::clock::system()).await
}

/// [`start`], with the engine scheduling by `clock`.
pub async fn start_with_clock(
    config: ServerConfig,
    services: &[ServiceName],
    clock: Arc<dyn meshflow_kit::clock::Clock>,
) -> anyhow::Result<Running> {
    let (listener, mounts) = prepare_with_clock(&config, services, clock).await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server::serve(listener, mounts, &config, async move {
            let _ = stopped.await;
        })
        .await
    });
    Ok(Running {
        addr,
        stop: Some(stop),
        task,
    })
}
