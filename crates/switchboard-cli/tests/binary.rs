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

// TLS: `serve --tls-cert FILE --tls-key FILE` (or the SWITCHBOARD_TLS_* twins), certificates
// generated in the test.

/// Starts the binary like [`start_with_env`] and also hands over every JSON log line, so a test
/// can wait for a line (bounded) instead of sleeping.
fn start_logging(
    args: &[&str],
    envs: &[(&str, &str)],
) -> (Child, SocketAddr, mpsc::Receiver<serde_json::Value>) {
    let (child, rx) = spawn_logging(args, envs);
    let listening = wait_log(&rx, "listening");
    let addr = listening["fields"]["local"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    (child, addr, rx)
}

/// The next log line whose message starts with `message` (within 10 s).
fn wait_log(logs: &mpsc::Receiver<serde_json::Value>, message: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match logs.recv_timeout(left) {
            Ok(entry)
                if entry["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(message)) =>
            {
                return entry;
            }
            Ok(_) => {}
            Err(_) => panic!("no log line {message:?} within 10 s"),
        }
    }
}

fn signal(child: &Child, name: &str) {
    let sent = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

async fn echo_over_wss(ws: &mut switchboard_testkit::tls::WssStream, text: &str) {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::text(text)).await.expect("send");
    let reply = tokio::time::timeout(switchboard_testkit::TIMEOUT, ws.next())
        .await
        .expect("echo in time")
        .expect("open")
        .expect("frame");
    assert_eq!(reply, Message::text(text));
}

#[tokio::test]
async fn tls_serves_wss_and_https_and_sighup_swaps_the_certificate_keeping_connections() {
    use switchboard_testkit::tls::{TestCa, connect_wss, https_request, temp_dir, try_connect_wss};
    let (ca_a, ca_b) = (TestCa::new("CA A"), TestCa::new("CA B"));
    let dir = temp_dir("cli-reload");
    let (cert, key) = ca_a.issue().write(&dir);
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    // The environment twins, so they are covered too.
    let (mut child, addr, logs) = start_logging(
        &["--protocol", "echo"],
        &[("SWITCHBOARD_TLS_CERT", cert), ("SWITCHBOARD_TLS_KEY", key)],
    );
    let (trust_a, trust_b) = (ca_a.client_config(), ca_b.client_config());
    let mut old = connect_wss(addr, "/ws", &trust_a).await;
    echo_over_wss(&mut old, "before").await;
    let health = https_request(addr, &trust_a, "GET", "/healthz").await;
    assert_eq!((health.status, health.body.as_str()), (200, "ok"));

    // Replace both files with a certificate of another CA, then SIGHUP.
    ca_b.issue().write(&dir);
    signal(&child, "HUP");
    let reloaded = wait_log(&logs, "TLS certificate reloaded");
    assert_eq!(reloaded["level"], "INFO");
    let mut new = connect_wss(addr, "/ws", &trust_b).await;
    echo_over_wss(&mut new, "after").await;
    // A fresh client config: one that connected before could resume its session, which
    // involves no certificate at all.
    assert!(
        try_connect_wss(addr, "/ws", &ca_a.client_config())
            .await
            .is_err(),
        "the old certificate is still presented"
    );
    echo_over_wss(&mut old, "still open").await;

    // A broken file: the reload fails with the reason logged, B stays in use.
    std::fs::write(dir.join("key.pem"), "garbage").unwrap();
    signal(&child, "HUP");
    let failed = wait_log(&logs, "TLS certificate reload failed");
    assert_eq!(failed["level"], "ERROR");
    let reason = failed["fields"]["message"].as_str().unwrap();
    assert!(reason.contains("key.pem"), "{reason}");
    connect_wss(addr, "/ws", &trust_b).await;
    echo_over_wss(&mut old, "and still").await;

    signal(&child, "TERM");
    assert_eq!(wait_exit(&mut child), 0);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn unusable_tls_files_exit_1_naming_the_file() {
    use switchboard_testkit::tls::{TestCa, temp_dir};
    let ca = TestCa::new("test CA");
    let dir = temp_dir("cli-bad");
    let (cert, key) = ca.issue().write(&dir);
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let missing = dir.join("nope.pem");
    let missing = missing.to_str().unwrap();

    let (code, stderr) = serve_until_exit(&["--tls-cert", missing, "--tls-key", key], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("cannot serve TLS: cannot read"), "{stderr}");
    assert!(stderr.contains(missing), "{stderr}");

    // The certificate given as the key: no private key in it.
    let (code, stderr) = serve_until_exit(&["--tls-cert", cert, "--tls-key", cert], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("no private key found"), "{stderr}");
    assert!(stderr.contains(cert), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // Another certificate's key.
    let other = dir.join("other-key.pem");
    std::fs::write(&other, ca.issue().key_pem).unwrap();
    let (code, stderr) = serve_until_exit(
        &["--tls-cert", cert, "--tls-key", other.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("does not belong to the certificate"),
        "{stderr}"
    );

    // One without the other is a usage error.
    let (code, stderr) = serve_until_exit(&["--tls-cert", cert], &[]);
    assert_eq!(code, 2, "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn auth_jwt_flags_require_a_token_signed_with_the_files_key() {
    use switchboard_testkit::jwt::{Keys, claims};
    use switchboard_testkit::tls::temp_dir;
    let dir = temp_dir("cli-jwt");
    for (flag, keys) in [
        ("--auth-jwt-secret-file", Keys::hs256()),
        ("--auth-jwt-public-key", Keys::es256()),
    ] {
        let file = dir.join("key");
        // A trailing newline, as editors write it, is not part of an HS256 secret.
        let mut contents = keys.verifying_key().to_vec();
        contents.push(b'\n');
        std::fs::write(&file, contents).unwrap();
        let (mut child, addr) = start(&["--protocol", "reqack", flag, file.to_str().unwrap()]);
        let url = format!("ws://{addr}/ws");
        let options = switchboard_testkit::ConnectOptions::default();
        assert_eq!(Client::refused_status(&url, options.clone()).await, 401);
        let token = keys.token(&claims("alice", 60));
        let as_bob = format!("{url}?userId=bob&token={token}");
        assert_eq!(Client::refused_status(&as_bob, options).await, 403);
        let mut alice = Client::connect(&format!("{url}?token={token}")).await;
        // Served as alice: a request is answered.
        alice
            .send_json(&json!({"type": "request", "id": "probe", "payload": {}}))
            .await;
        let reply = alice.recv_until(|v| v["id"] == "probe").await;
        assert_eq!(reply["type"], "response", "{reply}");
        signal(&child, "TERM");
        assert_eq!(wait_exit(&mut child), 0);
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn unusable_auth_flags_exit_1_naming_the_problem() {
    use switchboard_testkit::tls::temp_dir;
    let dir = temp_dir("cli-jwt-bad");
    let missing = dir.join("missing");
    let missing = missing.to_str().unwrap();
    let (code, stderr) = serve_until_exit(&["--auth-jwt-secret-file", missing], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("cannot use signed identity: cannot read"),
        "{stderr}"
    );
    assert!(stderr.contains(missing), "{stderr}");

    let short = dir.join("short");
    std::fs::write(&short, "hunter2").unwrap();
    let (code, stderr) =
        serve_until_exit(&["--auth-jwt-secret-file", short.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("at least 32 are required"), "{stderr}");
    assert!(
        !stderr.contains("hunter2"),
        "the secret is never printed: {stderr}"
    );

    let (code, stderr) = serve_until_exit(&["--auth-jwt-public-key", short.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("not an RSA or P-256 EC public key"),
        "{stderr}"
    );

    let (code, stderr) = serve_until_exit(&["--auth-jwt-audience", "x"], &[]);
    assert_eq!(code, 1, "{stderr}");

    let secret = dir.join("secret");
    std::fs::write(&secret, [b'k'; 32]).unwrap();
    let (code, stderr) = serve_until_exit(
        &[
            "--protocol",
            "teambot-sim",
            "--auth-jwt-secret-file",
            secret.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("not supported with --protocol teambot-sim"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

// Observability: `--metrics-listen`, the access log.

/// Spawns the binary with JSON logs and hands over every log line without waiting for anything
/// ([`start_logging`] waits for it to listen).
fn spawn_logging(
    args: &[&str],
    envs: &[(&str, &str)],
) -> (Child, mpsc::Receiver<serde_json::Value>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .envs(envs.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn switchboard");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) {
                let _ = tx.send(entry);
            }
        }
    });
    (child, rx)
}

/// The value of the exposition line `series` (name and labels exactly as rendered), if any.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

#[tokio::test]
async fn metrics_listen_serves_prometheus_and_sessions_and_refusals_are_access_log_lines() {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;

    let (mut child, logs) = spawn_logging(
        &[
            "--protocol",
            "echo",
            "--metrics-listen",
            "127.0.0.1:0",
            "--allowed-origins",
            "http://good.example",
        ],
        &[],
    );
    let metrics_line = wait_log(&logs, "serving metrics");
    let metrics: SocketAddr = metrics_line["fields"]["metrics"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let listening = wait_log(&logs, "listening");
    let addr: SocketAddr = listening["fields"]["local"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // The main listener does not serve metrics; the metrics listener serves nothing else.
    assert_eq!(
        switchboard_testkit::http_request(addr, "GET", "/metrics", None)
            .await
            .status,
        404
    );
    assert_eq!(
        switchboard_testkit::http_request(metrics, "GET", "/status", None)
            .await
            .status,
        404
    );

    // A session: one message each way, closed by the client with 1000. The query string (it
    // may hold a token) never reaches the log.
    let mut client = Client::connect(&format!("ws://{addr}/ws?token=not-for-logs")).await;
    client.send_text("hello").await;
    assert_eq!(client.recv().await, Message::text("hello"));
    let bye = CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    };
    client
        .inner()
        .send(Message::Close(Some(bye)))
        .await
        .unwrap();
    let session = wait_log(&logs, "session closed");
    assert_eq!(session["target"], "switchboard::access", "{session}");
    assert_eq!(session["level"], "INFO", "{session}");
    let fields = &session["fields"];
    assert_eq!(fields["protocol"], "echo", "{session}");
    assert_eq!(fields["path"], "/ws", "{session}");
    assert_eq!(fields["client_ip"], "127.0.0.1", "{session}");
    assert_eq!(fields["close_code"], 1000, "{session}");
    assert_eq!(fields["close_reason"], "bye", "{session}");
    assert_eq!(fields["closed_by"], "client", "{session}");
    assert_eq!(fields["frames_in"], 1, "{session}");
    assert_eq!(fields["frames_out"], 1, "{session}");
    assert!(fields["bytes_in"].as_u64().unwrap() > 5, "{session}");
    assert!(fields["bytes_out"].as_u64().unwrap() > 5, "{session}");
    assert!(fields["duration_seconds"].as_f64().is_some(), "{session}");
    assert!(fields["user"].is_null(), "no signed identity: {session}");
    assert!(
        fields["conn"].as_str().is_some_and(|c| !c.is_empty()),
        "{session}"
    );
    assert!(!session.to_string().contains("not-for-logs"), "{session}");

    // A refused upgrade.
    let evil = switchboard_testkit::ConnectOptions {
        origin: Some("http://evil.example".into()),
        ..Default::default()
    };
    let url = format!("ws://{addr}/ws?token=not-for-logs-either");
    assert_eq!(Client::refused_status(&url, evil).await, 403);
    let refused = wait_log(&logs, "upgrade refused");
    assert_eq!(refused["target"], "switchboard::access", "{refused}");
    assert_eq!(refused["fields"]["status"], 403, "{refused}");
    assert_eq!(refused["fields"]["reason"], "origin", "{refused}");
    assert_eq!(refused["fields"]["path"], "/ws", "{refused}");
    assert_eq!(refused["fields"]["client_ip"], "127.0.0.1", "{refused}");
    assert!(!refused.to_string().contains("not-for-logs"), "{refused}");

    // The scrape shows all of it.
    let reply = switchboard_testkit::http_request(metrics, "GET", "/metrics", None).await;
    assert_eq!(reply.status, 200);
    assert!(
        reply
            .headers
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{}",
        reply.headers
    );
    let text = reply.body;
    for (series, at_least) in [
        (
            r#"switchboard_connections_accepted_total{protocol="echo"}"#,
            1.0,
        ),
        (r#"switchboard_frames_in_total{protocol="echo"}"#, 1.0),
        (r#"switchboard_frames_out_total{protocol="echo"}"#, 1.0),
        (
            r#"switchboard_connections_closed_total{protocol="echo",code="1000",reason="client"}"#,
            1.0,
        ),
        (
            r#"switchboard_connections_rejected_total{protocol="echo",reason="origin"}"#,
            1.0,
        ),
        (
            r#"switchboard_build_info{protocol="echo",version="0.0.0"}"#,
            1.0,
        ),
        (r#"switchboard_process_open_fds{protocol="echo"}"#, 1.0),
        (
            r#"switchboard_process_resident_memory_bytes{protocol="echo"}"#,
            1.0,
        ),
    ] {
        let value = sample(&text, series).unwrap_or_else(|| panic!("{series} missing:\n{text}"));
        assert!(value >= at_least, "{series} = {value}\n{text}");
    }
    // The gauge comes down as the session's task ends, just after its log line.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = switchboard_testkit::http_request(metrics, "GET", "/metrics", None)
            .await
            .body;
        if sample(&text, r#"switchboard_connections_open{protocol="echo"}"#) == Some(0.0) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    signal(&child, "TERM");
    assert_eq!(wait_exit(&mut child), 0);
}

#[test]
fn metrics_are_off_unless_asked_for() {
    let (mut child, logs) = spawn_logging(&["--protocol", "echo"], &[]);
    let mut saw_metrics = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let entry = logs.recv_timeout(left).expect("the server starts");
        let message = entry["fields"]["message"].as_str().unwrap_or_default();
        saw_metrics |= message.starts_with("serving metrics");
        if message == "listening" {
            break;
        }
    }
    assert!(!saw_metrics, "no metrics listener without --metrics-listen");
    signal(&child, "TERM");
    assert_eq!(wait_exit(&mut child), 0);
}
