//! The `meshflow` binary as a process: it serves on the address it logs, and SIGTERM stops it cleanly.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Starts `meshflow serve` on 127.0.0.1:0 and reads the bound address from its JSON log.
#[allow(
    clippy::zombie_processes,
    reason = "the caller owns the child and waits for it"
)]
pub fn spawn(
    database_url: &str,
) -> (
    std::process::Child,
    String,
    BufReader<std::process::ChildStderr>,
) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshflow"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--database-url",
            database_url,
        ])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn meshflow");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    loop {
        line.clear();
        let n = stderr.read_line(&mut line).expect("read log");
        if n == 0 {
            let status = child.wait();
            panic!("meshflow exited before serving: {status:?}");
        }
        let Ok(record) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if record["fields"]["message"] == "serving" {
            let addr = record["fields"]["addr"].as_str().expect("addr").to_string();
            return (child, addr, stderr);
        }
    }
}

#[tokio::test]
async fn the_binary_serves_and_stops_on_sigterm() {
    let url = meshflow_kit::testing::fresh_database_url()
        .await
        .expect("database");
    let (mut child, addr, mut stderr) = spawn(&url);

    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel);
    let status = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("check")
        .into_inner();
    assert_eq!(status.status, ServingStatus::Serving as i32);

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    // Wait off the runtime thread, so this test's client connection can still answer the server's GOAWAY.
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(exit.success(), "exit status {exit:?}");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).expect("read log");
    assert!(rest.contains("received sigterm"), "{rest}");
    assert!(rest.contains("\"stopped\""), "{rest}");
}
