//! `meshflow bench`: measures a meshflow server the way a client sees it, and prints one
//! `name: value` line per figure (DESIGN §9).
//!
//! Unless `--server` is given it starts `meshflow serve` as a child process (embedded SQLite in a
//! temporary directory, or `--database-url`), so it can also read the server's memory and start time.
//! HTTP steps call a local JSON target it starts itself (or `--target`), serving
//! `GET /item/{n}` → `{"id": n, "price": n * 1.5, "ok": true}`.
//!
//! - W1: 10 sequential HTTP GETs, each followed by a transform keeping `price * 2`, then a condition
//!   on the total (22 steps).
//! - W2: a FOR_EACH over 100 items at concurrency 10, one GET each, then a sum.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use meshflow_proto::execution::v1::EventType;
use meshflow_proto::orchestrator::v1 as opb;
use meshflow_proto::orchestrator::v1::orchestrator_service_client::OrchestratorServiceClient;
use meshflow_proto::pbjson_types::Timestamp;
use meshflow_proto::workflow::v1 as wpb;
use meshflow_proto::workflow::v1::workflow_service_client::WorkflowServiceClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

/// Options of `meshflow bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Benchmark a running server at this address instead of starting one.
    #[arg(long)]
    pub server: Option<String>,
    /// Database of the server started here (default: SQLite in a temporary directory).
    #[arg(long)]
    pub database_url: Option<String>,
    /// Base URL of the JSON target (default: one started here on 127.0.0.1).
    #[arg(long)]
    pub target: Option<String>,
    /// Runs of W1 alone (latency and overhead percentiles).
    #[arg(long, default_value_t = 200)]
    pub samples: usize,
    /// Length of the sustained W1 run.
    #[arg(long, default_value = "10s", value_parser = meshflow_kit::config::parse_duration)]
    pub duration: Duration,
    /// Concurrent clients of the sustained run.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Runs of W2.
    #[arg(long, default_value_t = 30)]
    pub w2_samples: usize,
    /// Executions parked in WAIT for the memory figure.
    #[arg(long, default_value_t = 10_000)]
    pub parked: usize,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() as f64) * q).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

/// The machine's CPU time so far, in clock ticks, as Linux counts it in `/proc/stat`: all of it, and
/// the part a hypervisor gave to other guests while this one had work (steal).
#[derive(Debug, Clone, Copy, PartialEq)]
struct CpuTicks {
    total: u64,
    steal: u64,
}

impl CpuTicks {
    /// `None` where `/proc/stat` is missing (not Linux).
    fn read() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// From the `cpu` line: user, nice, system, idle, iowait, irq, softirq, steal (guest time is
    /// counted in user already).
    fn parse(stat: &str) -> Option<Self> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let ticks = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|f| f.parse::<u64>().ok())
            .collect::<Option<Vec<_>>>()?;
        (ticks.len() == 8).then(|| Self {
            total: ticks.iter().sum(),
            steal: ticks[7],
        })
    }

    /// The per cent of the CPU time since `earlier` that was stolen.
    fn steal_percent_since(self, earlier: Self) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total).filter(|&t| t > 0)?;
        Some(100.0 * self.steal.saturating_sub(earlier.steal) as f64 / total as f64)
    }
}

/// Prints `name: value` with the per cent of CPU time stolen since `earlier`, where it is known.
fn print_steal(name: &str, earlier: Option<CpuTicks>) {
    if let Some(p) = earlier
        .zip(CpuTicks::read())
        .and_then(|(e, now)| now.steal_percent_since(e))
    {
        println!("{name}: {p:.1}");
    }
}

/// A server child process.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn spawn(database_url: &str) -> anyhow::Result<(Self, Duration)> {
        let exe = std::env::current_exe()?;
        let started = Instant::now();
        let mut child = Command::new(exe)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--log",
                "warn,meshflow_kit=info",
            ])
            .args([
                "--database-url",
                database_url,
                "--allow-http-to",
                "127.0.0.0/8",
                "--park-after",
                "200ms",
            ])
            .args(["--max-concurrent-executions", "1000000"])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .context("starting meshflow serve")?;
        let mut stderr = BufReader::new(child.stderr.take().context("stderr")?);
        let mut line = String::new();
        let addr = loop {
            line.clear();
            if stderr.read_line(&mut line)? == 0 {
                bail!("the server exited before serving: {:?}", child.wait());
            }
            let Ok(record) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if record["fields"]["message"] == "serving" {
                break record["fields"]["addr"]
                    .as_str()
                    .context("addr")?
                    .to_string();
            }
        };
        let to_serving = started.elapsed();
        std::thread::spawn(move || {
            let mut line = String::new();
            while stderr.read_line(&mut line).is_ok_and(|n| n > 0) {
                line.clear();
            }
        });
        Ok((Self { child, addr }, to_serving))
    }

    /// A memory figure of the server's `/proc/PID/status` (`VmRSS`, `VmHWM`), in MiB.
    fn status_mib(&self, field: &str) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let kb: f64 = status
            .lines()
            .find(|l| l.starts_with(field))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(kb / 1024.0)
    }

    fn rss_mib(&self) -> Option<f64> {
        self.status_mib("VmRSS:")
    }

    /// The largest resident memory since the last [`Self::reset_peak`].
    fn peak_rss_mib(&self) -> Option<f64> {
        self.status_mib("VmHWM:")
    }

    /// Starts the peak over from the current resident memory (Linux `clear_refs`).
    fn reset_peak(&self) {
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.child.id()), "5");
    }

    /// The resident memory once it has stopped moving: readings 250 ms apart within 0.5 MiB of
    /// each other for 3 s, longer than the default `--park-after` (2 s) that executions wait in
    /// memory before they leave it; or the last reading after a minute.
    async fn settled_rss_mib(&self) -> Option<f64> {
        const WINDOW: usize = 12;
        let mut readings: Vec<f64> = Vec::new();
        for _ in 0..240 {
            readings.push(self.rss_mib()?);
            if readings.len() >= WINDOW {
                let last = &readings[readings.len() - WINDOW..];
                let (lo, hi) = last
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
                if hi - lo < 0.5 {
                    return last.last().copied();
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        readings.last().copied()
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// W1's condition: the total of the doubled prices of items `offset + 1 ..= offset + 10` is
/// `30 * offset + 165`, so offsets 0 to 4 take the `small` branch and 5 to 9 the `big` one.
const W1_THRESHOLD: f64 = 300.0;

/// What a W1 execution with this offset must answer: the total and the branch it takes.
fn w1_expected(offset: i64) -> (f64, &'static str) {
    let total: f64 = (1..=10).map(|i| (offset + i) as f64 * 1.5 * 2.0).sum();
    (total, if total > W1_THRESHOLD { "big" } else { "small" })
}

/// W2's sum: the prices of items 1 to 100.
const W2_SUM: f64 = 1.5 * 5050.0;

/// The input of the n-th W1 execution: offsets cycle through 0 to 9, so both branches run.
fn w1_input(n: u64) -> Value {
    json!({"offset": n % 10})
}

fn w1(base: &str) -> Value {
    let mut steps = Vec::new();
    let mut previous: Option<String> = None;
    for i in 1..=10 {
        let get = format!("get{i}");
        let keep = format!("keep{i}");
        let mut g = json!({"id": get, "http": {"method": "GET",
            "url": format!("{base}/item/${{input.offset + {i}}}")}});
        if let Some(p) = &previous {
            g["dependsOn"] = json!([p]);
        }
        steps.push(g);
        steps.push(
            json!({"id": keep, "dependsOn": [get], "transform": {"assignments": [
            {"target": "price", "expression": format!("steps.{get}.output.body.price * 2.0")}]}}),
        );
        previous = Some(keep);
    }
    let total: Vec<String> = (1..=10)
        .map(|i| format!("steps.keep{i}.output.price"))
        .collect();
    steps.push(json!({"id": "check", "dependsOn": ["keep10"], "conditional": {"branches": [
        {"condition": format!("{} > {W1_THRESHOLD:.1}", total.join(" + ")),
         "steps": [{"id": "big", "transform": {"assignments": [{"target": "big", "expression": "true"}]}}]}],
        "otherwise": [{"id": "small", "transform": {"assignments": [{"target": "big", "expression": "false"}]}}]}}));
    json!({"name": "bench-w1", "status": "WORKFLOW_STATUS_ACTIVE", "steps": steps})
}

fn w2(base: &str) -> Value {
    json!({"name": "bench-w2", "status": "WORKFLOW_STATUS_ACTIVE", "steps": [
        {"id": "each", "forEach": {"items": "input.items", "maxConcurrency": 10, "steps": [
            {"id": "get", "http": {"method": "GET", "url": format!("{base}/item/${{item}}")}}]}},
        {"id": "sum", "dependsOn": ["each"], "functionCall": {"function": "sum",
            "arguments": {"values": "${steps.each.output.map(o, o.get.body.price)}"}}}]})
}

fn parked() -> Value {
    json!({"name": "bench-parked", "status": "WORKFLOW_STATUS_ACTIVE", "steps": [
        {"id": "hold", "wait": {"signal": "release"}}]})
}

async fn create(channel: &Channel, doc: Value) -> anyhow::Result<String> {
    let name = doc["name"].as_str().unwrap_or_default().to_string();
    let mut w: wpb::Workflow = serde_json::from_value(doc)?;
    w.name = format!("{name}-{}", &meshflow_kit::id::new_id()[24..]);
    let created = WorkflowServiceClient::new(channel.clone())
        .create_workflow(wpb::CreateWorkflowRequest {
            workflow: Some(w),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    Ok(created.workflow.context("workflow")?.workflow_id)
}

/// How long after a time the client received each event, in milliseconds.
#[derive(Default)]
struct Lags {
    /// After the commit that wrote it returned (`commit_time`, set on events sent live).
    commit: Vec<f64>,
    /// After its own time, taken inside that commit (`time`).
    recorded: Vec<f64>,
}

impl Lags {
    fn extend(&mut self, other: Lags) {
        self.commit.extend(other.commit);
        self.recorded.extend(other.recorded);
    }
}

/// Runs one execution through ExecuteWorkflow; returns its latency, how long after their commit
/// and their own time the client received its events, and the outputs of its steps by path.
async fn execute(
    client: &mut OrchestratorServiceClient<Channel>,
    workflow_id: &str,
    input: &Value,
) -> anyhow::Result<(Duration, Lags, HashMap<String, Value>)> {
    use opb::execute_workflow_response::Payload;
    let started = Instant::now();
    let mut stream = client
        .execute_workflow(opb::ExecuteWorkflowRequest {
            workflow_id: workflow_id.into(),
            input: Some(meshflow_kit::convert::from_json(input)),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut lags = Lags::default();
    let mut outputs = HashMap::new();
    let mut ok = false;
    while let Some(m) = stream.message().await? {
        if let Some(Payload::Event(e)) = m.payload {
            let now = chrono::Utc::now();
            let since = |t: Option<&Timestamp>| {
                t.and_then(meshflow_kit::convert::from_timestamp)
                    .map(|t| (now - t).num_microseconds().unwrap_or(0) as f64 / 1000.0)
            };
            lags.commit.extend(since(m.commit_time.as_ref()));
            lags.recorded.extend(since(e.time.as_ref()));
            if e.r#type == EventType::ExecutionCompleted as i32 {
                ok = true;
            }
            if e.r#type == EventType::StepSucceeded as i32
                && let Some(output) = &e.output
            {
                outputs.insert(e.step_path.clone(), meshflow_kit::convert::to_json(output));
            }
        }
    }
    if !ok {
        bail!("an execution did not complete");
    }
    Ok((started.elapsed(), lags, outputs))
}

/// Checks a W1 execution's answer: each doubled price, the total, and the branch taken.
fn check_w1(offset: i64, outputs: &HashMap<String, Value>) -> anyhow::Result<()> {
    let (total, branch) = w1_expected(offset);
    let mut sum = 0.0;
    for i in 1..=10 {
        let price = outputs
            .get(&format!("keep{i}"))
            .and_then(|o| o["price"].as_f64())
            .with_context(|| format!("W1 offset {offset}: keep{i} has no price"))?;
        let expected = (offset + i) as f64 * 3.0;
        if (price - expected).abs() > 1e-9 {
            bail!("W1 offset {offset}: keep{i} answered {price}, not {expected}");
        }
        sum += price;
    }
    if (sum - total).abs() > 1e-9 {
        bail!("W1 offset {offset}: the total is {sum}, not {total}");
    }
    // A branch's steps run under the condition's path; the branch not taken is skipped.
    let taken = outputs
        .get(&format!("check/{branch}"))
        .and_then(|o| o["big"].as_bool());
    if taken != Some(branch == "big") {
        bail!("W1 offset {offset}: the {branch} branch did not run");
    }
    Ok(())
}

/// Checks a W2 execution's answer: the sum of 100 prices.
fn check_w2(outputs: &HashMap<String, Value>) -> anyhow::Result<()> {
    let sum = outputs
        .get("sum")
        .and_then(Value::as_f64)
        .context("W2: sum has no number")?;
    if (sum - W2_SUM).abs() > 1e-6 {
        bail!("W2: the sum is {sum}, not {W2_SUM}");
    }
    Ok(())
}

/// Runs one W1 execution with the n-th input and checks its answer.
async fn execute_w1(
    client: &mut OrchestratorServiceClient<Channel>,
    workflow_id: &str,
    n: u64,
) -> anyhow::Result<(Duration, Lags)> {
    let input = w1_input(n);
    let (latency, lags, outputs) = execute(client, workflow_id, &input).await?;
    check_w1(input["offset"].as_i64().unwrap_or_default(), &outputs)?;
    Ok((latency, lags))
}

/// How long the benchmark's client waits before each request of
/// `http_round_trip_after_idle_p50_ms`: about what a W1 step spends between a response and the
/// next request.
const IDLE_BEFORE_REQUEST: Duration = Duration::from_micros(250);

/// The median of 500 round trips of `GET /item/{n}` to `base`, each sent after `pause`.
///
/// The pause blocks this thread on purpose: the target and this client then wait on an idle
/// machine, as they do between W1's steps, and each request pays for waking them up.
async fn round_trip_p50(
    http: &reqwest::Client,
    base: &str,
    pause: Duration,
) -> anyhow::Result<f64> {
    let mut rtts = Vec::with_capacity(500);
    for i in 0..500 {
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
        let t = Instant::now();
        http.get(format!("{base}/item/{}", i % 10 + 1))
            .send()
            .await?
            .bytes()
            .await?;
        rtts.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(percentile(&sorted(rtts), 0.5))
}

/// Starts the local target on a thread and runtime of its own, as a separate service would run:
/// it answers the server's requests without waiting behind this client's work on the event
/// streams. Returns its base URL; it serves until the process exits.
async fn own_thread_target() -> anyhow::Result<String> {
    let (tx, rx) = tokio::sync::oneshot::channel::<anyhow::Result<String>>();
    std::thread::Builder::new()
        .name("bench-target".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(e.into()));
                    return;
                }
            };
            runtime.block_on(async move {
                match crate::target::Target::start().await {
                    Ok(target) => {
                        let _ = tx.send(Ok(target.base.clone()));
                        std::future::pending::<()>().await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.into()));
                    }
                }
            });
        })?;
    rx.await.context("the target thread ended")?
}

/// Runs the benchmark and prints its figures.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let base = match &args.target {
        Some(t) => t.trim_end_matches('/').to_string(),
        None => own_thread_target().await?,
    };
    let temp = std::env::temp_dir().join(format!("meshflow-bench-{}", meshflow_kit::id::new_id()));
    let mut server = None;
    let addr = match &args.server {
        Some(addr) => addr.clone(),
        None => {
            std::fs::create_dir_all(&temp)?;
            let url = args.database_url.clone().unwrap_or_else(|| {
                format!("sqlite://{}?mode=rwc", temp.join("meshflow.db").display())
            });
            // The first start creates the schema; the second, measured, starts as a restart would.
            let (first, _) = Server::spawn(&url)?;
            first.stop();
            let (s, to_serving) = Server::spawn(&url)?;
            println!(
                "start_to_serving_ms: {:.1}",
                to_serving.as_secs_f64() * 1000.0
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Some(rss) = s.rss_mib() {
                println!("idle_rss_mib: {rss:.1}");
            }
            let addr = s.addr.clone();
            server = Some(s);
            addr
        }
    };
    let channel = Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let w1_id = create(&channel, w1(&base)).await?;
    let w2_id = create(&channel, w2(&base)).await?;

    // The HTTP round trips W1 makes, measured from here: back to back (what the overhead figure
    // subtracts), and each after the CPUs sat idle about as long as a step's own work keeps them
    // waiting, as W1's requests are sent (for reading the overhead on a given machine).
    let http = reqwest::Client::builder().no_proxy().build()?;
    let rtt = round_trip_p50(&http, &base, Duration::ZERO).await?;
    println!("http_round_trip_p50_ms: {rtt:.3}");
    let idle = round_trip_p50(&http, &base, IDLE_BEFORE_REQUEST).await?;
    println!("http_round_trip_after_idle_p50_ms: {idle:.3}");

    // W1 alone.
    let mut client = OrchestratorServiceClient::new(channel.clone());
    for n in 0..10 {
        execute_w1(&mut client, &w1_id, n).await?;
    }
    let mut latencies = Vec::new();
    let mut lags = Lags::default();
    let ticks = CpuTicks::read();
    for n in 0..args.samples as u64 {
        let (latency, l) = execute_w1(&mut client, &w1_id, n).await?;
        latencies.push(latency.as_secs_f64() * 1000.0);
        lags.extend(l);
    }
    let latencies = sorted(latencies);
    let overheads = sorted(
        latencies
            .iter()
            .map(|l| ((l - 10.0 * rtt) / 10.0).max(0.0))
            .collect(),
    );
    println!("step_overhead_p50_ms: {:.3}", percentile(&overheads, 0.5));
    println!("step_overhead_p99_ms: {:.3}", percentile(&overheads, 0.99));
    println!("w1_latency_p50_ms: {:.2}", percentile(&latencies, 0.5));
    println!("w1_latency_p99_ms: {:.2}", percentile(&latencies, 0.99));
    for (name, lags) in [("commit", lags.commit), ("recorded", lags.recorded)] {
        let lags = sorted(lags);
        println!(
            "event_{name}_to_client_p50_ms: {:.3}",
            percentile(&lags, 0.5)
        );
        println!(
            "event_{name}_to_client_p99_ms: {:.3}",
            percentile(&lags, 0.99)
        );
    }
    print_steal("w1_cpu_steal_percent", ticks);

    // W1 sustained with concurrent clients.
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + args.duration;
    let started = Instant::now();
    let ticks = CpuTicks::read();
    let mut tasks = Vec::new();
    for _ in 0..args.clients {
        let mut client = OrchestratorServiceClient::new(channel.clone());
        let id = w1_id.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while Instant::now() < deadline {
                execute_w1(&mut client, &id, n).await?;
                n += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let executions = done.load(Ordering::Relaxed) as f64;
    println!("w1_sustained_executions_per_s: {:.1}", executions / elapsed);
    // Every step of W1 (10 HTTP, 10 transforms, the condition and its branch), and its HTTP
    // steps alone.
    println!(
        "w1_sustained_steps_per_s: {:.0}",
        executions * 22.0 / elapsed
    );
    println!(
        "w1_sustained_http_steps_per_s: {:.0}",
        executions * 10.0 / elapsed
    );
    print_steal("w1_sustained_cpu_steal_percent", ticks);

    // W2.
    let items: Vec<i64> = (1..=100).collect();
    let input = json!({"items": items});
    check_w2(&execute(&mut client, &w2_id, &input).await?.2)?;
    let mut w2 = Vec::new();
    for _ in 0..args.w2_samples {
        let (latency, _, outputs) = execute(&mut client, &w2_id, &input).await?;
        check_w2(&outputs)?;
        w2.push(latency.as_secs_f64() * 1000.0);
    }
    let w2 = sorted(w2);
    println!("w2_latency_p50_ms: {:.2}", percentile(&w2, 0.5));

    // Executions parked in WAIT.
    if args.parked > 0 {
        let parked_id = create(&channel, parked()).await?;
        if let Some(s) = &server {
            s.reset_peak();
        }
        let started = Instant::now();
        let mut ids = Vec::with_capacity(args.parked);
        for chunk in 0..args.parked.div_ceil(64) {
            let n = (args.parked - chunk * 64).min(64);
            let mut batch = Vec::new();
            for _ in 0..n {
                let mut c = client.clone();
                let id = parked_id.clone();
                batch.push(tokio::spawn(async move {
                    c.start_execution(opb::StartExecutionRequest {
                        workflow_id: id,
                        ..Default::default()
                    })
                    .await
                }));
            }
            for b in batch {
                ids.push(
                    b.await??
                        .into_inner()
                        .execution
                        .context("execution")?
                        .execution_id,
                );
            }
        }
        println!(
            "parked_start_rate_per_s: {:.0}",
            args.parked as f64 / started.elapsed().as_secs_f64()
        );
        // Wait until every one has parked (status WAITING).
        let executions =
            meshflow_proto::execution::v1::execution_service_client::ExecutionServiceClient::new(
                channel.clone(),
            );
        loop {
            let mut waiting = 0;
            let mut token = String::new();
            loop {
                let page = executions
                    .clone()
                    .list_executions(meshflow_proto::execution::v1::ListExecutionsRequest {
                        workflow_id: parked_id.clone(),
                        status: meshflow_proto::execution::v1::ExecutionStatus::Waiting as i32,
                        page_size: 500,
                        page_token: token,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                waiting += page.executions.len();
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            if waiting >= args.parked {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Parked executions leave memory `--park-after` after they start waiting: the figure is
        // read once the memory has settled, and the peak while they were started and parked
        // is printed beside it.
        if let Some(s) = &server {
            if let Some(rss) = s.settled_rss_mib().await {
                println!("parked_{}_rss_mib: {rss:.1}", args.parked);
            }
            if let Some(peak) = s.peak_rss_mib() {
                println!("parked_{}_peak_rss_mib: {peak:.1}", args.parked);
            }
        }
    }
    if let Some(s) = server {
        s.stop();
    }
    let _ = std::fs::remove_dir_all(&temp);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  2194917 2244 207834 1897287 27281 0 30820 41519 0 0
cpu0 1097458 1122 103917 948643 13640 0 15410 20759 0 0
intr 1 2 3
";

    fn w1_outputs(offset: i64, branch: &str, big: bool) -> HashMap<String, Value> {
        let mut outputs: HashMap<String, Value> = (1..=10)
            .map(|i| {
                (
                    format!("keep{i}"),
                    json!({"price": (offset + i) as f64 * 3.0}),
                )
            })
            .collect();
        outputs.insert(format!("check/{branch}"), json!({"big": big}));
        outputs
    }

    #[test]
    fn w1_answers_are_checked_and_both_branches_are_expected() {
        assert_eq!(w1_expected(0), (165.0, "small"));
        assert_eq!(w1_expected(5), (315.0, "big"));
        assert!(check_w1(0, &w1_outputs(0, "small", false)).is_ok());
        assert!(check_w1(7, &w1_outputs(7, "big", true)).is_ok());
        assert!(
            check_w1(7, &w1_outputs(7, "small", false)).is_err(),
            "wrong branch"
        );
        let mut wrong = w1_outputs(2, "small", false);
        wrong.insert("keep3".into(), json!({"price": 1.0}));
        assert!(check_w1(2, &wrong).is_err(), "wrong price");
        let branches: std::collections::BTreeSet<&str> = (0..10)
            .map(|n| w1_expected(w1_input(n)["offset"].as_i64().unwrap_or(0)).1)
            .collect();
        assert_eq!(
            branches.len(),
            2,
            "ten consecutive executions take both branches"
        );
        assert!(check_w2(&HashMap::from([("sum".to_string(), json!(7575.0))])).is_ok());
        assert!(check_w2(&HashMap::from([("sum".to_string(), json!(7574.0))])).is_err());
    }

    #[test]
    fn cpu_ticks_are_read_from_the_machine_wide_line() {
        assert_eq!(
            CpuTicks::parse(STAT),
            Some(CpuTicks {
                total: 2194917 + 2244 + 207834 + 1897287 + 27281 + 30820 + 41519,
                steal: 41519,
            })
        );
        assert_eq!(CpuTicks::parse("cpu  1 2 3\n"), None);
        assert_eq!(CpuTicks::parse("intr 1 2 3\n"), None);
    }

    #[test]
    fn steal_is_a_share_of_the_time_between_two_readings() {
        let before = CpuTicks {
            total: 1_000,
            steal: 10,
        };
        let after = CpuTicks {
            total: 1_400,
            steal: 60,
        };
        assert_eq!(after.steal_percent_since(before), Some(12.5));
        // No time passed: no share.
        assert_eq!(before.steal_percent_since(before), None);
    }
}
