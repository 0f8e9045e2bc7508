//! `meshflow`: the command line of the meshflow server.

use clap::{Parser, Subcommand};
use meshflow::ServiceName;
use meshflow_kit::ServerConfig;

/// Every step allocates (JSON values, events, rows): mimalloc's thread-local heaps cost far less than
/// glibc's arenas under the engine's many short-lived allocations.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// meshflow: durable workflow orchestration over gRPC.
#[derive(Parser)]
#[command(name = "meshflow", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the gRPC server: every service, or only those named.
    Serve {
        /// Service groups to run (default: all).
        #[arg(value_enum)]
        services: Vec<ServiceName>,
        #[command(flatten)]
        config: Box<ServerConfig>,
    },
    /// Measures a server (started here unless --server is given) and prints `name: value` figures.
    Bench(meshflow::bench::BenchArgs),
    /// Serves the demo items the README's walkthrough calls: `GET /item/{n}` answers
    /// `{"id": n, "price": n * 1.5, "ok": true}`.
    DemoItems {
        /// Address to listen on.
        #[arg(
            long,
            default_value = "127.0.0.1:8090",
            env = "MESHFLOW_DEMO_ITEMS_LISTEN"
        )]
        listen: std::net::SocketAddr,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // One line names what failed and why, once; no backtrace.
    match start(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("meshflow: {}", one_line(&err));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause once: database errors repeat their source's
/// text in their own.
fn one_line(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text.replace('\n', " ")
}

fn start(cli: Cli) -> anyhow::Result<()> {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Command::Serve { services, .. } = &cli.command
        && std::env::var_os("TOKIO_WORKER_THREADS").is_none()
    {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        runtime.worker_threads(rpc_threads(services, cores));
    }
    runtime.build()?.block_on(run(cli))
}

/// Worker threads of a server's runtime on `cores` cores. The runtime serves RPCs and streams
/// events; the orchestrator's engine runs on a thread of its own (see
/// `meshflow_orchestrator::thread`) and is given a core to itself, so the runtime takes the others,
/// at least one. Without the orchestrator it takes every core. (`TOKIO_WORKER_THREADS`, when set,
/// is left to Tokio.)
fn rpc_threads(services: &[ServiceName], cores: usize) -> usize {
    let engine = services.is_empty() || services.contains(&ServiceName::Orchestrator);
    if engine {
        cores.saturating_sub(1).max(1)
    } else {
        cores.max(1)
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { services, config } => {
            let _telemetry = meshflow_kit::telemetry::init(config.log_format, &config.log)?;
            let clock = meshflow_kit::clock::for_process()?;
            let (listener, mounts) =
                meshflow::prepare_with_clock(&config, &services, clock).await?;
            meshflow_kit::server::serve(
                listener,
                mounts,
                &config,
                meshflow_kit::server::shutdown_signal(),
            )
            .await
        }
        Command::Bench(args) => meshflow::bench::run(args).await,
        Command::DemoItems { listen } => {
            let target = meshflow::target::Target::start_on(listen)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
            println!("serving demo items on {}/item/{{n}}", target.base);
            meshflow_kit::server::shutdown_signal().await;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_is_said_once_on_one_line() {
        let err = anyhow::anyhow!("pool timed out")
            .context("Connection Error: pool timed out")
            .context("cannot connect to the database at db:5432");
        assert_eq!(
            one_line(&err),
            "cannot connect to the database at db:5432: Connection Error: pool timed out"
        );
    }

    #[test]
    fn the_engine_is_given_a_core_of_its_own() {
        assert_eq!(rpc_threads(&[], 2), 1);
        assert_eq!(rpc_threads(&[], 16), 15);
        assert_eq!(rpc_threads(&[], 1), 1);
        assert_eq!(
            rpc_threads(&[ServiceName::Workflow, ServiceName::Orchestrator], 4),
            3
        );
        // No engine in this server: every core serves RPCs.
        assert_eq!(
            rpc_threads(&[ServiceName::Workflow, ServiceName::Execution], 4),
            4
        );
    }
}
