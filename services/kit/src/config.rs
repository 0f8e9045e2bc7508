//! One typed configuration for every server: built-in defaults, overridden by `MESHFLOW_*`
//! environment variables, overridden by command-line flags (clap resolves the three layers).
//! Each option is documented once, here; the README's table is generated from `meshflow serve --help`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Pretty when stderr is a terminal, JSON otherwise.
    Auto,
    /// Human-readable, coloured on a terminal.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// SQLite's `synchronous` pragma: what a commit waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SqliteSynchronous {
    /// WAL-safe: a commit survives a process crash (kill -9), not necessarily a power loss.
    Normal,
    /// Every commit is fsynced: survives power loss.
    Full,
}

/// Options of `meshflow serve`.
#[derive(Debug, Clone, Args)]
pub struct ServerConfig {
    /// Address the gRPC server listens on (port 0 picks a free port).
    #[arg(long, env = "MESHFLOW_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Database: `sqlite://PATH?mode=rwc` (embedded) or `postgres://USER@HOST:PORT/DB`.
    #[arg(
        long,
        env = "MESHFLOW_DATABASE_URL",
        default_value = "sqlite://meshflow.db?mode=rwc"
    )]
    pub database_url: String,

    /// SQLite durability: `normal` (survives kill -9) or `full` (survives power loss).
    #[arg(
        long,
        env = "MESHFLOW_SQLITE_SYNCHRONOUS",
        value_enum,
        default_value = "normal"
    )]
    pub sqlite_synchronous: SqliteSynchronous,

    /// Largest PostgreSQL connection pool.
    #[arg(long, env = "MESHFLOW_DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub database_max_connections: u32,

    /// Log format.
    #[arg(long, env = "MESHFLOW_LOG_FORMAT", value_enum, default_value = "auto")]
    pub log_format: LogFormat,

    /// Log filter, in `tracing` EnvFilter syntax (e.g. `info,meshflow_workflow=debug`).
    #[arg(long, env = "MESHFLOW_LOG", default_value = "info")]
    pub log: String,

    /// Deadline of a unary RPC (a client's shorter `grpc-timeout` wins).
    #[arg(long, env = "MESHFLOW_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// RPCs served at once across all connections; more wait.
    #[arg(long, env = "MESHFLOW_CONCURRENCY_LIMIT", default_value_t = 1024)]
    pub concurrency_limit: usize,

    /// Largest request or response message, in bytes (a larger one is refused with OUT_OF_RANGE).
    #[arg(long, env = "MESHFLOW_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// On SIGTERM/SIGINT: time to finish in-flight RPCs after turning NOT_SERVING.
    #[arg(long, env = "MESHFLOW_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Address blocks HTTP and webhook steps may reach besides public addresses, comma-separated
    /// (`127.0.0.0/8,10.1.0.0/16`). Loopback, private, link-local and metadata addresses are refused
    /// unless listed here.
    #[arg(long, env = "MESHFLOW_ALLOW_HTTP_TO", value_delimiter = ',')]
    pub allow_http_to: Vec<String>,

    /// How long an execution lease lasts without renewal; a dead replica's executions are resumed after it.
    #[arg(long, env = "MESHFLOW_LEASE_TTL", default_value = "15s", value_parser = parse_duration)]
    pub lease_ttl: Duration,

    /// This server's identity as a lease holder, stable across restarts (a StatefulSet pod name);
    /// unique among the servers sharing a database. A server restarting under the same identity
    /// takes its executions back at once instead of waiting for their leases to expire. Default: a
    /// new identity per process.
    #[arg(long, env = "MESHFLOW_REPLICA_ID")]
    pub replica_id: Option<String>,

    /// How often due executions (timers, retries, abandoned leases) and unconsumed signals are
    /// looked for.
    #[arg(long, env = "MESHFLOW_POLL_INTERVAL", default_value = "250ms", value_parser = parse_duration)]
    pub poll_interval: Duration,

    /// An execution with nothing running parks (leaves memory) when its next wake-up is further than this.
    #[arg(long, env = "MESHFLOW_PARK_AFTER", default_value = "2s", value_parser = parse_duration)]
    pub park_after: Duration,

    /// Limits on what users may define and run.
    #[command(flatten)]
    pub limits: Limits,
}

/// Limits on definitions and executions, each enforced with a precise error.
#[derive(Debug, Clone, Args)]
pub struct Limits {
    /// Steps in one workflow, counting nested ones.
    #[arg(long = "max-steps", env = "MESHFLOW_MAX_STEPS", default_value_t = 500)]
    pub max_steps: usize,

    /// Nesting depth of composite steps (CONDITIONAL, PARALLEL, FOR_EACH).
    #[arg(
        long = "max-nesting-depth",
        env = "MESHFLOW_MAX_NESTING_DEPTH",
        default_value_t = 8
    )]
    pub max_nesting_depth: usize,

    /// Encoded size of one workflow definition, in bytes.
    #[arg(long = "max-definition-bytes", env = "MESHFLOW_MAX_DEFINITION_BYTES", default_value_t = 1024 * 1024)]
    pub max_definition_bytes: usize,

    /// Length of one CEL expression, in bytes.
    #[arg(
        long = "max-expression-bytes",
        env = "MESHFLOW_MAX_EXPRESSION_BYTES",
        default_value_t = 4096
    )]
    pub max_expression_bytes: usize,

    /// Deepest nesting of brackets in one CEL expression.
    #[arg(
        long = "max-expression-nesting",
        env = "MESHFLOW_MAX_EXPRESSION_NESTING",
        default_value_t = 32
    )]
    pub max_expression_nesting: usize,

    /// Comprehension iterations (`all`, `exists`, `map`, `filter`, …) of one evaluation.
    #[arg(
        long = "max-expression-iterations",
        env = "MESHFLOW_MAX_EXPRESSION_ITERATIONS",
        default_value_t = 100_000
    )]
    pub max_expression_iterations: u64,

    /// Bytes of a string one evaluation builds or returns.
    #[arg(long = "max-expression-string-bytes", env = "MESHFLOW_MAX_EXPRESSION_STRING_BYTES", default_value_t = 1024 * 1024)]
    pub max_expression_string_bytes: usize,

    /// Items of a list one evaluation builds or returns.
    #[arg(
        long = "max-expression-list-items",
        env = "MESHFLOW_MAX_EXPRESSION_LIST_ITEMS",
        default_value_t = 100_000
    )]
    pub max_expression_list_items: usize,

    /// Longest execution: no workflow timeout, step timeout or wait may exceed it.
    #[arg(long = "max-execution-duration", env = "MESHFLOW_MAX_EXECUTION_DURATION", default_value = "30d", value_parser = parse_duration)]
    pub max_execution_duration: Duration,

    /// Items one FOR_EACH step may iterate.
    #[arg(
        long = "max-for-each-items",
        env = "MESHFLOW_MAX_FOR_EACH_ITEMS",
        default_value_t = 10_000
    )]
    pub max_for_each_items: usize,

    /// JSON size of one step's output (an HTTP response body included), in bytes.
    #[arg(long = "max-step-output-bytes", env = "MESHFLOW_MAX_STEP_OUTPUT_BYTES", default_value_t = 1024 * 1024)]
    pub max_step_output_bytes: usize,

    /// Executions running or waiting at once; StartExecution beyond it is RESOURCE_EXHAUSTED.
    #[arg(
        long = "max-concurrent-executions",
        env = "MESHFLOW_MAX_CONCURRENT_EXECUTIONS",
        default_value_t = 100_000
    )]
    pub max_concurrent_executions: usize,
}

#[derive(Parser)]
struct Defaults {
    #[command(flatten)]
    config: ServerConfig,
}

impl ServerConfig {
    /// The built-in defaults overlaid with `MESHFLOW_*` environment variables, without flags.
    pub fn from_env() -> Result<Self, clap::Error> {
        Defaults::try_parse_from(["meshflow"]).map(|d| d.config)
    }

    /// Whether the database is SQLite.
    pub fn is_sqlite(&self) -> bool {
        self.database_url.starts_with("sqlite:")
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_steps: 500,
            max_nesting_depth: 8,
            max_definition_bytes: 1024 * 1024,
            max_expression_bytes: 4096,
            max_expression_nesting: 32,
            max_expression_iterations: 100_000,
            max_expression_string_bytes: 1024 * 1024,
            max_expression_list_items: 100_000,
            max_execution_duration: Duration::from_secs(30 * 24 * 3600),
            max_for_each_items: 10_000,
            max_step_output_bytes: 1024 * 1024,
            max_concurrent_executions: 100_000,
        }
    }
}

/// Parses `250ms`, `30s`, `5m`, `2h`, `30d` (an integer and a unit).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 30s, 250ms, 5m, 2h or 1d"))?;
    let secs = |k: u64| n.checked_mul(k).map(Duration::from_secs);
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        _ => None,
    }
    .ok_or_else(|| format!("`{text}` is not a duration like 30s, 250ms, 5m, 2h or 1d"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5w").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn flags_override_defaults() {
        let d =
            Defaults::try_parse_from(["meshflow", "--listen", "127.0.0.1:0", "--max-steps", "7"])
                .expect("parse");
        assert_eq!(d.config.listen.port(), 0);
        assert_eq!(d.config.limits.max_steps, 7);
        assert_eq!(d.config.request_timeout, Duration::from_secs(30));
        assert!(d.config.is_sqlite());
    }
}
