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
        config: ServerConfig,
    },
    /// Measures a server (started here unless --server is given) and prints `name: value` figures.
    Bench(meshflow::bench::BenchArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { services, config } => {
            let _telemetry = meshflow_kit::telemetry::init(config.log_format, &config.log)?;
            let (listener, mounts) =
                meshflow::prepare(&config, &services)
                    .await
                    .inspect_err(|err| {
                        tracing::error!(error = format!("{err:#}"), "cannot start");
                    })?;
            meshflow_kit::server::serve(
                listener,
                mounts,
                &config,
                meshflow_kit::server::shutdown_signal(),
            )
            .await
        }
        Command::Bench(args) => meshflow::bench::run(args).await,
    }
}
