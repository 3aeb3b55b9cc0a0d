//! `cargo xtask prometheus`: a real Prometheus scrapes a real server.
//!
//! Starts the release `switchboard serve --protocol ip-chat --metrics-listen ...`, a
//! `prometheus` (Debian's package) scraping it every second, drives traffic with `switchboard
//! bench fanout`, and asks Prometheus's HTTP API, until each answers or 30 s pass, that the key
//! series exist and moved: connections accepted, frames out, bytes in, an engine latency
//! histogram, and a close counted by code. Fails (exit 1) otherwise, and when `prometheus` is
//! not installed.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::bench::{free_port, http_get, root, stop, wait_listening};

/// How long each query may take to show the series moving.
const QUERY_DEADLINE: Duration = Duration::from_secs(30);

/// PromQL queries that must each return a value above zero once traffic has run, with what
/// they prove.
const CHECKS: &[(&str, &str)] = &[
    (
        "sum(switchboard_connections_accepted_total)",
        "WebSocket connections were accepted",
    ),
    (
        "sum(increase(switchboard_frames_out_total[1m]))",
        "frames went out to subscribers",
    ),
    (
        "sum(switchboard_bytes_in_total)",
        "bytes came in from senders",
    ),
    (
        "sum(switchboard_engine_operation_duration_seconds_count)",
        "engine operations were timed",
    ),
    (
        "sum(switchboard_connections_closed_total)",
        "closes were counted by code",
    ),
    (
        "sum(switchboard_ip_chat_messages_total)",
        "ip-chat counted its messages",
    ),
    (
        "max(switchboard_process_resident_memory_bytes)",
        "the process reports its memory",
    ),
];

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        stop(&mut self.0);
    }
}

/// Runs the check against the `profile` build of `switchboard`.
pub(crate) fn run(profile: crate::Profile) -> ExitCode {
    match check(profile) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask prometheus: {error}");
            ExitCode::FAILURE
        }
    }
}

fn check(profile: crate::Profile) -> Result<(), String> {
    let prometheus = which("prometheus").ok_or(
        "`prometheus` is not installed (Debian: apt-get install --no-install-recommends \
         prometheus); this check needs a real one",
    )?;
    if !profile.build() {
        return Err(format!("the {} build failed", profile.dir()));
    }
    let release = profile.bin_dir();
    let work = root().join("target/prometheus-check");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;

    let server = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let _server = Running(
        Command::new(release.join("switchboard"))
            .args(["serve", "--protocol", "ip-chat"])
            .args(["--listen", &server.to_string()])
            .args(["--metrics-listen", &metrics.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("could not start the server: {e}"))?,
    );
    wait_listening(server)?;
    wait_listening(metrics)?;

    let web = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = work.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: switchboard\n    static_configs:\n      - targets: ['{metrics}']\n"
        ),
    )
    .map_err(|e| format!("{}: {e}", config.display()))?;
    let _prometheus = Running(
        Command::new(&prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                work.join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(work.join("prometheus.log"))
                    .map_or_else(|_| Stdio::null(), Stdio::from),
            )
            .spawn()
            .map_err(|e| format!("could not start prometheus: {e}"))?,
    );
    wait_ready(web)?;
    // One scrape before any traffic, so every counter has a sample from before the load and
    // `increase` sees it move (a series first scraped after the load shows no increase).
    wait_positive(web, "sum(up{job=\"switchboard\"})")?;
    println!("ok: prometheus scrapes the server before the load");

    // Traffic: 20 subscribers, 4 senders, 200 messages, through the real socket path.
    let url = format!("ws://{server}/ws");
    crate::bench::load(
        &release,
        &[
            "fanout".into(),
            "--url".into(),
            url,
            "--subscribers".into(),
            "20".into(),
            "--senders".into(),
            "4".into(),
            "--messages".into(),
            "200".into(),
        ],
    )?;

    for (query, proves) in CHECKS {
        let value = wait_positive(web, query)?;
        println!("ok: {proves}: {query} = {value}");
    }
    println!("prometheus scraped the server; every series is there and moved");
    Ok(())
}

/// The first `name` executable on `PATH`.
fn which(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Waits until Prometheus answers `/-/ready` with 200 (bounded).
fn wait_ready(web: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + QUERY_DEADLINE;
    loop {
        if let Ok((200, _)) = http_get(web, "/-/ready") {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(
                "prometheus did not become ready (see target/prometheus-check/prometheus.log)"
                    .into(),
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs `query` until it returns a value above zero, or fails after [`QUERY_DEADLINE`] with the
/// last answer.
fn wait_positive(web: SocketAddr, query: &str) -> Result<f64, String> {
    let deadline = Instant::now() + QUERY_DEADLINE;
    let path = format!("/api/v1/query?query={}", encode(query));
    loop {
        let last = match http_get(web, &path) {
            Ok((200, body)) => match first_value(&body) {
                Some(value) if value > 0.0 => return Ok(value),
                _ => body,
            },
            Ok((status, body)) => format!("HTTP {status}: {body}"),
            Err(error) => error,
        };
        if Instant::now() > deadline {
            return Err(format!(
                "{query} did not go above 0 within 30 s; last answer: {last}"
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The value of the first sample in an instant-query answer.
fn first_value(body: &str) -> Option<f64> {
    let answer: Value = serde_json::from_str(body).ok()?;
    let sample = answer["data"]["result"].as_array()?.first()?;
    sample["value"][1].as_str()?.parse().ok()
}

/// Percent-encodes a query parameter value.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_percent_encoded_and_answers_read() {
        assert_eq!(encode("sum(a_b[1m])"), "sum%28a_b%5B1m%5D%29");
        let body = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1.5,"42"]}]}}"#;
        assert_eq!(first_value(body), Some(42.0));
        assert_eq!(
            first_value(r#"{"status":"success","data":{"result":[]}}"#),
            None
        );
    }
}
