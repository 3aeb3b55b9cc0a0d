//! Shared by the `--data-dir` and cluster tests: a node of the real binary that can be
//! SIGKILLed and started again on the same directory (or as one node of a cluster on a Redis
//! engine), and blocking WebSocket and HTTP clients for load
//! threads, which must end quietly (not panic) when the node dies under them.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking; not every test uses every helper"
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message, WebSocket};

/// How long any single wait of these tests may take.
pub(crate) const WAIT: Duration = Duration::from_secs(10);

/// A fresh directory, removed when dropped.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "switchboard-cli-{name}-{}-{nanos}",
            std::process::id()
        ));
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Spawns `command` (the binary with `--log-format json` serving on `127.0.0.1:0`), keeps
/// draining its stderr for its whole life (so it never blocks on a full pipe), and returns it
/// with the address it reports listening on; kills it and panics after [`WAIT`] without one.
pub(crate) fn spawn_listening(mut command: Command) -> (Child, SocketAddr) {
    let mut child = command
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn switchboard");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    // What the server said before it listened, for the panic message if it never does.
    let early = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let said = early.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(mut said) = said.lock()
                && said.len() < 50
            {
                said.push(line.clone());
            }
            let Ok(entry) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if entry["fields"]["message"] == "listening" {
                let _ = tx.send(
                    entry["fields"]["local"]
                        .as_str()
                        .unwrap()
                        .parse::<SocketAddr>()
                        .unwrap(),
                );
            }
        }
    });
    let Ok(addr) = rx.recv_timeout(WAIT) else {
        let status = child.try_wait();
        let _ = child.kill();
        let said = early
            .lock()
            .map(|lines| lines.join("\n"))
            .unwrap_or_default();
        panic!("the server did not report its address (exit: {status:?}); it said:\n{said}");
    };
    (child, addr)
}

/// `switchboard serve --protocol <protocol> --data-dir <dir>` on a free port; SIGKILLed when
/// dropped, so a failing test leaves no process behind.
pub(crate) struct Node {
    child: Child,
    pub(crate) addr: SocketAddr,
}

impl Node {
    /// Starts the node and waits (bounded) for the address it reports.
    pub(crate) fn start(dir: &Path, protocol: &str, extra: &[&str]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_switchboard"));
        command
            .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
            .args(["--protocol", protocol])
            .args(extra)
            .arg("--data-dir")
            .arg(dir);
        let (child, addr) = spawn_listening(command);
        Self { child, addr }
    }

    /// A node of cluster `cluster` on the Redis at `engine` (`redis://...`), started and ready:
    /// returns once its `/readyz` says 200 (bounded by [`WAIT`]).
    pub(crate) fn cluster(engine: &str, cluster: &str, protocol: &str, extra: &[&str]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_switchboard"));
        command
            .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
            .args(["--protocol", protocol])
            .args(["--engine", engine, "--cluster-name", cluster])
            .args(extra);
        let (child, addr) = spawn_listening(command);
        let node = Self { child, addr };
        node.wait_ready(true);
        node
    }

    /// Waits (bounded by [`WAIT`]) until `/readyz` answers 200 (`ready`) or 503 (`!ready`).
    pub(crate) fn wait_ready(&self, ready: bool) {
        let want = if ready { 200 } else { 503 };
        let deadline = Instant::now() + WAIT;
        loop {
            if readyz(self.addr) == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "/readyz of {} never said {want}",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no shutdown, no flush. Returns once the process is gone.
    pub(crate) fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking WebSocket client. Every read is bounded by [`WAIT`]; every failure (the node
/// died, a timeout) is an `Err`, so a load thread ends instead of panicking.
pub(crate) struct Ws {
    ws: WebSocket<TcpStream>,
}

/// Why a [`Ws`] call failed.
pub(crate) type WsResult<T> = Result<T, String>;

impl Ws {
    /// Connects to `url`, sending `headers` with the upgrade.
    pub(crate) fn connect(url: &str, headers: &[(&str, &str)]) -> WsResult<Self> {
        let mut request = url.into_client_request().map_err(|e| e.to_string())?;
        for (name, value) in headers {
            let name = tungstenite::http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| e.to_string())?;
            let value = HeaderValue::from_str(value).map_err(|e| e.to_string())?;
            request.headers_mut().append(name, value);
        }
        let host = request.uri().host().unwrap_or("127.0.0.1").to_owned();
        let port = request.uri().port_u16().unwrap_or(80);
        let stream = TcpStream::connect((host.as_str(), port)).map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(WAIT))
            .map_err(|e| e.to_string())?;
        stream
            .set_write_timeout(Some(WAIT))
            .map_err(|e| e.to_string())?;
        let (ws, _) = tungstenite::client(request, stream).map_err(|e| e.to_string())?;
        Ok(Self { ws })
    }

    /// Connects or panics (for the checks after a restart, where failing is a test failure).
    pub(crate) fn open(url: &str, headers: &[(&str, &str)]) -> Self {
        Self::connect(url, headers).unwrap_or_else(|e| panic!("connect {url}: {e}"))
    }

    pub(crate) fn send(&mut self, value: &Value) -> WsResult<()> {
        self.ws
            .send(Message::text(value.to_string()))
            .map_err(|e| e.to_string())
    }

    /// The next JSON text frame (pings, pongs and binary frames are skipped).
    pub(crate) fn recv(&mut self) -> WsResult<Value> {
        loop {
            match self.ws.read().map_err(|e| e.to_string())? {
                Message::Text(text) => {
                    return serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"));
                }
                Message::Close(frame) => return Err(format!("closed: {frame:?}")),
                _ => {}
            }
        }
    }

    /// Reads frames, handing each to `seen`, until one satisfies `accept` (within [`WAIT`]).
    pub(crate) fn recv_until(
        &mut self,
        mut seen: impl FnMut(&Value),
        mut accept: impl FnMut(&Value) -> bool,
    ) -> WsResult<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            if Instant::now() > deadline {
                return Err("no matching frame in time".into());
            }
            let value = self.recv()?;
            seen(&value);
            if accept(&value) {
                return Ok(value);
            }
        }
    }

    /// [`Ws::send`] then [`Ws::recv_until`], panicking on failure (checks after a restart).
    pub(crate) fn ask(&mut self, value: &Value, accept: impl FnMut(&Value) -> bool) -> Value {
        self.send(value).unwrap();
        self.recv_until(|_| {}, accept)
            .unwrap_or_else(|e| panic!("no answer to {value}: {e}"))
    }
}

/// The status of `GET /readyz`, or `None` when the node does not answer.
pub(crate) fn readyz(addr: SocketAddr) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(WAIT)).ok()?;
    write!(
        stream,
        "GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).ok()?;
    raw.split_whitespace().nth(1)?.parse().ok()
}

/// One HTTP/1.1 request with `Connection: close`: (status, body). Panics on failure.
pub(crate) fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).expect("connect for HTTP");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).expect("read HTTP response");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "chunked bodies are not expected here: {head}"
    );
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let body = serde_json::from_str(body).unwrap_or(Value::Null);
    (status, body)
}

/// Load threads report each acknowledgement here; the test kills the node once `count` have
/// arrived (bounded by [`WAIT`]), while the threads are still sending.
pub(crate) fn await_acks(progress: &mpsc::Receiver<()>, count: usize) {
    let deadline = Instant::now() + WAIT;
    for seen in 0..count {
        let left = deadline.saturating_duration_since(Instant::now());
        if progress.recv_timeout(left).is_err() {
            panic!("only {seen} of {count} acknowledgements before the deadline");
        }
    }
}

/// Starts `count` nodes of cluster `cluster` on the Redis at `engine` at the same time (each
/// started as [`Node::cluster`] does, ready when returned); for async tests.
pub(crate) async fn start_cluster(
    engine: &str,
    cluster: &str,
    protocol: &str,
    extra: &[&str],
    count: usize,
) -> Vec<Node> {
    let starts: Vec<_> = (0..count)
        .map(|_| {
            let (engine, cluster, protocol) =
                (engine.to_owned(), cluster.to_owned(), protocol.to_owned());
            let extra: Vec<String> = extra.iter().map(|arg| (*arg).to_owned()).collect();
            tokio::task::spawn_blocking(move || {
                let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
                Node::cluster(&engine, &cluster, &protocol, &extra)
            })
        })
        .collect();
    let mut nodes = Vec::with_capacity(count);
    for start in starts {
        nodes.push(start.await.expect("a node did not start"));
    }
    nodes
}

/// Polls `GET /readyz` of every address until all answer `status` in one round; returns how
/// long that took, or panics (naming each node's last answer) after `within`. For async tests.
pub(crate) async fn await_readyz_all(
    addrs: &[SocketAddr],
    status: u16,
    within: Duration,
) -> Duration {
    let start = Instant::now();
    let mut last = vec![None; addrs.len()];
    loop {
        for (addr, answer) in addrs.iter().zip(last.iter_mut()) {
            let addr = *addr;
            *answer = tokio::task::spawn_blocking(move || readyz(addr))
                .await
                .expect("readyz poll");
        }
        if last.iter().all(|answer| *answer == Some(status)) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "/readyz did not answer {status} on every node within {within:?}: {:?}",
            addrs.iter().zip(&last).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
