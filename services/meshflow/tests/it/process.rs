//! The `meshflow` binary as a process: it serves on the address it logs, and SIGTERM stops it cleanly.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A `meshflow serve` child process and its log.
pub struct Proc {
    child: Option<Child>,
    /// The gRPC address it serves on.
    pub addr: String,
    log: Arc<Mutex<String>>,
    drain: Option<std::thread::JoinHandle<()>>,
    /// Where clock commands go, for a process on a driven clock.
    clock: Option<ChildStdin>,
}

impl Proc {
    /// Starts `meshflow serve` on 127.0.0.1:0 with extra flags; returns once it logs `serving`.
    pub fn spawn(database_url: &str, extra: &[&str]) -> Self {
        Self::spawn_env(database_url, extra, &[])
    }

    /// Like [`Proc::spawn`], with extra environment variables.
    pub fn spawn_env(database_url: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn_with(database_url, extra, env, None)
    }

    /// Like [`Proc::spawn`], on a clock that reads `start` and moves only by [`Proc::advance`]
    /// (`meshflow_kit::testing::driven_clock`).
    pub fn spawn_on_clock(
        database_url: &str,
        extra: &[&str],
        start: chrono::DateTime<chrono::Utc>,
    ) -> Self {
        Self::spawn_with(database_url, extra, &[], Some(start))
    }

    /// Moves the clock of a process started by [`Proc::spawn_on_clock`] forward.
    pub fn advance(&mut self, by: std::time::Duration) {
        let stdin = self.clock.as_mut().expect("a process on a driven clock");
        assert_eq!(by.subsec_nanos() % 1_000_000, 0, "whole milliseconds");
        writeln!(stdin, "advance {}ms", by.as_millis()).expect("clock command");
        stdin.flush().expect("clock command");
    }

    fn spawn_with(
        database_url: &str,
        extra: &[&str],
        env: &[(&str, &str)],
        clock: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_meshflow"));
        if let Some(start) = clock {
            command
                .env(
                    meshflow_kit::testing::CLOCK_ENV,
                    start.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                )
                .stdin(Stdio::piped());
        }
        let mut child = command
            .envs(env.iter().copied())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--log",
                "warn,meshflow_kit=info",
            ])
            .args(["--database-url", database_url])
            .args(extra)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn meshflow");
        let clock = child.stdin.take();
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
        let log = Arc::new(Mutex::new(String::new()));
        let mut line = String::new();
        let addr = loop {
            line.clear();
            let n = stderr.read_line(&mut line).expect("read log");
            if n == 0 {
                let status = child.wait();
                panic!("meshflow exited before serving: {status:?}");
            }
            log.lock().expect("log").push_str(&line);
            let Ok(record) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if record["fields"]["message"] == "serving" {
                break record["fields"]["addr"].as_str().expect("addr").to_string();
            }
        };
        // Keep reading, so a full pipe never blocks the server.
        let sink = log.clone();
        let drain = std::thread::spawn(move || {
            let mut line = String::new();
            while stderr.read_line(&mut line).is_ok_and(|n| n > 0) {
                sink.lock().expect("log").push_str(&line);
                line.clear();
            }
        });
        Self {
            child: Some(child),
            addr,
            log,
            drain: Some(drain),
            clock,
        }
    }

    /// A connected channel.
    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Channel::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }

    /// Sends a signal (`TERM`, `KILL`) and waits for the exit, off the runtime thread.
    pub async fn signal_and_wait(&mut self, signal: &str) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success());
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .expect("join")
            .expect("wait");
        if let Some(d) = self.drain.take() {
            let _ = tokio::task::spawn_blocking(move || d.join()).await;
        }
        status
    }

    /// Everything it logged.
    pub fn log(&self) -> String {
        self.log.lock().expect("log").clone()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A database URL several processes can share: a fresh PostgreSQL database, or a SQLite file.
pub async fn shared_database_url() -> String {
    if meshflow_kit::testing::on_postgres() {
        return meshflow_kit::testing::fresh_database_url()
            .await
            .expect("database");
    }
    // Under the tests' SQLite directory, which the test command removes.
    let dir = meshflow_kit::testing::sqlite_test_dir().join(meshflow_kit::id::new_id());
    std::fs::create_dir_all(&dir).expect("temp dir");
    format!("sqlite://{}?mode=rwc", dir.join("meshflow.db").display())
}

#[tokio::test]
async fn the_binary_serves_and_stops_on_sigterm() {
    let url = shared_database_url().await;
    let mut server = Proc::spawn(&url, &[]);
    let mut health = HealthClient::new(server.channel().await);
    let status = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("check")
        .into_inner();
    assert_eq!(status.status, ServingStatus::Serving as i32);

    // Wait off the runtime thread, so this test's client connection can still answer the server's GOAWAY.
    let exit = server.signal_and_wait("TERM").await;
    let log = server.log();
    assert!(exit.success(), "exit status {exit:?}; log: {log}");
    assert!(log.contains("received sigterm"), "{log}");
    assert!(log.contains("\"stopped\""), "{log}");
}

/// Runs `meshflow serve` expecting it to fail at start; returns its stderr.
fn failed_start(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_meshflow"))
        .arg("serve")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run meshflow");
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        !stderr.contains("backtrace") && !stderr.contains("Stack"),
        "{stderr}"
    );
    stderr
}

#[test]
fn a_taken_port_fails_at_once_in_one_line_without_touching_the_database() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let db = meshflow_kit::testing::sqlite_test_dir()
        .join(format!("never-{}.db", uuid::Uuid::now_v7().simple()));
    let url = format!("sqlite://{}?mode=rwc", db.display());
    let stderr = failed_start(&["--listen", &addr, "--database-url", &url]);
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
    assert!(stderr.to_lowercase().contains("in use"), "{stderr}");
    assert!(!db.exists(), "the database was not touched");
}

#[test]
fn an_unreachable_database_is_named_in_one_line() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let url = format!("postgres://meshflow:secret@{closed}/meshflow");
    let stderr = failed_start(&["--listen", "127.0.0.1:0", "--database-url", &url]);
    assert!(
        stderr.contains(&format!("cannot connect to the database at {closed}")),
        "{stderr}"
    );
    assert!(stderr.to_lowercase().contains("refused"), "{stderr}");
    assert!(!stderr.contains("secret"), "no password: {stderr}");
}
