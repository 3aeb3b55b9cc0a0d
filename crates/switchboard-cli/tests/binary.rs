//! The `switchboard` binary end to end: start on port 0, serve, stop on SIGTERM with exit 0.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use switchboard_testkit::{Client, json};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

mod common;

/// Starts the binary with JSON logs and returns it with the address it listens on.
fn start(args: &[&str]) -> (Child, SocketAddr) {
    start_with_env(args, &[])
}

/// [`start`] with environment variables set for the server.
fn start_with_env(args: &[&str], envs: &[(&str, &str)]) -> (Child, SocketAddr) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    command
        .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .envs(envs.iter().copied());
    common::spawn_listening(command)
}

fn wait_exit(child: &mut Child) -> i32 {
    for _ in 0..100 {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().expect("exited, not killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    panic!("the server did not exit within 5 s");
}

#[tokio::test]
async fn sigterm_closes_clients_with_1001_and_exits_0() {
    let (mut child, addr) = start(&["--protocol", "ip-chat"]);
    let mut client = Client::connect(&format!("ws://{addr}/ws")).await;
    client
        .send_json(&json!({"type": "send_message", "data": {"text": "hi"}}))
        .await;
    client.recv_type("message").await;

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let close = client.expect_close().await;
    assert_eq!(close.code, CloseCode::Away);
    assert_eq!(wait_exit(&mut child), 0);
}

#[test]
fn a_port_in_use_is_a_clear_error_with_exit_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--listen", &addr])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("could not listen on {addr}")),
        "{stderr}"
    );
}

#[test]
fn invalid_arguments_exit_2() {
    let output = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--listen", "nowhere"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
}

/// Waits (bounded) for a child to exit and returns its exit code.
fn wait_exit_within(child: &mut Child, limit: Duration) -> i32 {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().expect("exited, not killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    panic!("the process did not exit within {limit:?}");
}

fn teambot_sim() -> (Child, SocketAddr) {
    start(&[
        "--protocol",
        "teambot-sim",
        "--sim-teams",
        "3",
        "--sim-duration",
        "1500ms",
        "--sim-join-window",
        "300ms",
        "--sim-leaving-teams",
        "1",
        "--sim-message-rate",
        "60",
        "--sim-healthcheck-interval",
        "300ms",
        "--sim-quiet-period",
        "200ms",
    ])
}

#[tokio::test]
async fn the_teambot_client_exits_0_on_goodbye_with_a_perfect_scorecard() {
    let (mut sim, addr) = teambot_sim();
    let mut bot = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["teambot", "--url", &format!("ws://{addr}/global")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the teambot client");
    assert_eq!(
        wait_exit_within(&mut bot, Duration::from_secs(20)),
        0,
        "goodbye ends the client with 0"
    );

    let scorecard = switchboard_testkit::http_request(addr, "GET", "/scorecard", None)
        .await
        .json();
    assert_eq!(scorecard["perfect"], true, "{scorecard}");
    let _ = sim.kill();
    let _ = sim.wait();
}

#[tokio::test]
async fn the_teambot_client_exits_0_on_sigterm() {
    let (mut sim, addr) = teambot_sim();
    let mut bot = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args([
            "--log-format",
            "json",
            "teambot",
            "--url",
            &format!("ws://{addr}/global"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the teambot client");
    // Signal only once the client is connected, so the signal handler is certainly installed.
    let stderr = bot.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("global socket connected") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the client reported its global connection");
    let killed = Command::new("kill")
        .args(["-TERM", &bot.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert_eq!(wait_exit_within(&mut bot, Duration::from_secs(10)), 0);
    let _ = sim.kill();
    let _ = sim.wait();
}

#[tokio::test]
async fn running_out_of_file_descriptors_is_logged_and_survived() {
    // The server gets a soft and hard limit of 64 descriptors; 80 clients exhaust it.
    let mut child = Command::new("bash")
        .args([
            "-c",
            "ulimit -n 64 && exec \"$0\" --log-format json serve --listen 127.0.0.1:0",
        ])
        .arg(env!("CARGO_BIN_EXE_switchboard"))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn switchboard under ulimit");
    let stderr = child.stderr.take().unwrap();
    let (addr_tx, addr_rx) = mpsc::channel();
    let (error_tx, error_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let message = entry["fields"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if message == "listening" {
                let _ = addr_tx.send(
                    entry["fields"]["local"]
                        .as_str()
                        .unwrap()
                        .parse::<SocketAddr>()
                        .unwrap(),
                );
            } else if message.contains("accept error") {
                let _ = error_tx.send(message);
            }
        }
    });
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the server reported its address");

    let mut clients = Vec::new();
    for _ in 0..80 {
        // Past the limit the kernel still completes TCP handshakes into the backlog, so a
        // connect may succeed while the upgrade cannot; keep whatever we get.
        if let Ok(Ok(stream)) = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            clients.push(stream);
        }
    }
    let error = error_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the server logged the accept error");
    assert!(error.contains("Too many open files"), "{error}");
    assert!(
        child.try_wait().unwrap().is_none(),
        "the server must keep running"
    );

    // Once descriptors are free again, the server serves as before.
    drop(clients);
    let url = format!("ws://{addr}/ws");
    let mut client = None;
    for _ in 0..50 {
        if let Ok(c) = Client::connect_with(&url, Default::default()).await {
            client = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut client = client.expect("the server recovered after descriptors were released");
    client
        .send_json(&json!({"type": "send_message", "data": {"text": "back"}}))
        .await;
    assert_eq!(client.recv_type("message").await["data"]["text"], "back");
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs `switchboard serve` with `args` and `envs` until it exits (bounded) and returns its exit
/// code and stderr.
fn serve_until_exit(args: &[&str], envs: &[(&str, &str)]) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .envs(envs.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn switchboard");
    let code = wait_exit_within(&mut child, Duration::from_secs(10));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (code, stderr)
}

#[test]
fn a_flag_of_another_protocol_exits_2_naming_the_flag_and_its_protocol() {
    let (code, stderr) =
        serve_until_exit(&["--protocol", "ip-chat", "--fastchat-max-users", "5"], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(
            "--fastchat-max-users belongs to --protocol fastchat and cannot be used with \
             --protocol ip-chat"
        ),
        "{stderr}"
    );
    // ip-chat's old flag names are still ip-chat's.
    let (code, stderr) = serve_until_exit(&["--protocol", "reqack", "--rate-limit", "5"], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--ip-chat-rate-limit belongs to --protocol ip-chat"),
        "{stderr}"
    );
}

/// ip-chat's `SWITCHBOARD_RATE_LIMIT=1` lets one message through and refuses the next, while
/// other protocols' environment twins (one environment, several deployments) are ignored.
#[tokio::test]
async fn env_twins_apply_and_other_protocols_twins_are_ignored() {
    let (mut child, addr) = start_with_env(
        &["--protocol", "ip-chat"],
        &[
            ("SWITCHBOARD_RATE_LIMIT", "1"),
            ("SWITCHBOARD_FASTCHAT_MAX_USERS", "5"),
            ("SWITCHBOARD_REDELIVERY_TIMEOUT", "1s"),
            ("SWITCHBOARD_COLLAB_IDLE_TTL", "1m"),
            ("SWITCHBOARD_SIM_SEED", "7"),
        ],
    );
    let mut client = Client::connect(&format!("ws://{addr}/ws")).await;
    for text in ["one", "two"] {
        client
            .send_json(&json!({"type": "send_message", "data": {"text": text}}))
            .await;
    }
    assert_eq!(client.recv_type("message").await["data"]["text"], "one");
    client.recv_type("error").await;
    let _ = child.kill();
    let _ = child.wait();
}
