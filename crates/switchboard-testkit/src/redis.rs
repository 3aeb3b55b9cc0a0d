//! A real `redis-server` for tests of the cluster engine and of nodes running on it.
//!
//! [`RedisServer::start`] runs the installed `redis-server` on a free `127.0.0.1` port with its
//! own temporary data directory (append-only file, fsync on every write, no snapshots), and waits
//! until it answers `PING`. Tests can stop, kill, restart (same port, same data) and pause it, and
//! run commands through a small RESP client written here, so the testkit needs no Redis crate.
//! The process is killed and its directory removed on drop.
//!
//! Where `redis-server` is not installed, [`RedisServer::start`] says so loudly on stderr and
//! returns `None`, so the test can return early; with `SWITCHBOARD_REQUIRE_REDIS=1` (CI sets it)
//! it panics instead, so a missing Redis fails the build rather than skipping silently:
//!
//! ```no_run
//! # async fn test() {
//! use switchboard_testkit::redis::RedisServer;
//! let Some(redis) = RedisServer::start().await else { return };
//! assert_eq!(redis.cli(&["SET", "k", "v"]).await, "OK");
//! # }
//! ```

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Set to `1` to make a missing `redis-server` a test failure instead of a skip.
pub const REQUIRE_ENV: &str = "SWITCHBOARD_REQUIRE_REDIS";

/// The bound on starting, stopping and every command (longer than [`crate::TIMEOUT`]: a
/// restart replays the append-only file, and a command may sit behind a `CLIENT PAUSE`).
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the waits here look again.
const POLL: Duration = Duration::from_millis(20);

/// Fresh ports tried when `redis-server` cannot bind the one picked (another process took it
/// between our probe and Redis's bind).
const PORT_ATTEMPTS: usize = 3;

/// Makes data directories unique within this process.
static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

/// The lowest port handed to a test's Redis. Ports come from below the kernel's ephemeral range
/// (read from `/proc/sys/net/ipv4/ip_local_port_range`), so a server bound to `127.0.0.1:0` or
/// an outgoing connection never takes one while its Redis is stopped for a restart.
const PORT_FLOOR: u16 = 12_000;

/// Counts the ports handed out in this process, so concurrent tests never pick the same one.
static NEXT_PORT: AtomicU64 = AtomicU64::new(0);

/// Evaluates to a started [`RedisServer`], or returns from the enclosing function (a test
/// returning `()`) when `redis-server` is not installed; see [`RedisServer::start`].
///
/// ```no_run
/// # async fn test() {
/// let redis = switchboard_testkit::require_redis!();
/// # }
/// ```
#[macro_export]
macro_rules! require_redis {
    () => {
        match $crate::redis::RedisServer::start().await {
            ::std::option::Option::Some(redis) => redis,
            ::std::option::Option::None => return,
        }
    };
}

/// A `redis-server` process owned by a test; killed, and its data removed, on drop.
#[derive(Debug)]
pub struct RedisServer {
    binary: PathBuf,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts `redis-server` on a free port and waits (bounded) until it answers `PING`.
    ///
    /// Returns `None`, after a `SKIPPED: ...` line on stderr, when no `redis-server` is
    /// installed; panics instead when [`REQUIRE_ENV`] is `1`. Panics if an installed Redis does
    /// not come up within [`REDIS_TIMEOUT`].
    pub async fn start() -> Option<Self> {
        let Some(binary) = find_redis_server() else {
            if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
                panic!("redis-server not found on PATH and {REQUIRE_ENV}=1: install redis-server");
            }
            // Straight to the process's stderr, not `eprintln!`: the test harness captures the
            // macros' output of passing tests, and a skip must show.
            let _ = writeln!(
                io::stderr(),
                "SKIPPED: redis-server not found on PATH; this test needs a real Redis \
                 (apt-get install redis-server). Set {REQUIRE_ENV}=1 to fail instead of skip."
            );
            return None;
        };
        let dir = std::env::temp_dir().join(format!(
            "switchboard-redis-{}-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        ));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("create Redis data dir {}: {e}", dir.display()));
        let mut server = Self {
            binary,
            port: 0,
            dir,
            child: None,
        };
        let mut failures = Vec::new();
        for _ in 0..PORT_ATTEMPTS {
            server.port = pick_port();
            match server.spawn_and_wait().await {
                Ok(()) => return Some(server),
                Err(error) => failures.push(format!("port {}: {error}", server.port)),
            }
        }
        panic!("redis-server did not start: {}", failures.join("; "));
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port Redis listens on; it stays the same across [`RedisServer::restart`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory (append-only file and Redis's log).
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// SIGTERM, then waits (bounded) for the process to exit. Redis fsyncs its append-only file
    /// on every write, so everything acknowledged survives a [`RedisServer::restart`]. Does
    /// nothing if it is already stopped.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        if !status.is_ok_and(|s| s.success()) {
            let _ = child.kill();
        }
        if wait_exit(&mut child, REDIS_TIMEOUT).await.is_none() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("redis-server did not exit within {REDIS_TIMEOUT:?} of SIGTERM");
        }
    }

    /// SIGKILL (no shutdown at all), and waits for the process to be gone. Does nothing if it is
    /// already stopped.
    pub async fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = child.kill();
        if wait_exit(&mut child, REDIS_TIMEOUT).await.is_none() {
            panic!("redis-server did not exit within {REDIS_TIMEOUT:?} of SIGKILL");
        }
    }

    /// Starts Redis again on the same port with the same data directory (stopping it first if
    /// it runs), and waits (bounded) until it answers `PING` with its data loaded.
    pub async fn restart(&mut self) {
        self.stop().await;
        if let Err(error) = self.spawn_and_wait().await {
            panic!(
                "redis-server did not restart on port {}: {error}",
                self.port
            );
        }
    }

    /// `CLIENT PAUSE <ms> ALL`: every client's commands (ours too) wait until `duration` has
    /// passed; returns as soon as the pause is in place.
    pub async fn pause(&self, duration: Duration) {
        let millis = duration.as_millis().to_string();
        let reply = self.cli(&["CLIENT", "PAUSE", &millis, "ALL"]).await;
        assert_eq!(reply, "OK", "CLIENT PAUSE {millis} ALL");
    }

    /// `CLIENT KILL TYPE pubsub`: drops every subscriber connection; returns how many there were.
    pub async fn kill_pubsub(&self) -> i64 {
        match self.command(&["CLIENT", "KILL", "TYPE", "pubsub"]).await {
            Ok(Reply::Integer(killed)) => killed,
            other => panic!("CLIENT KILL TYPE pubsub: {other:?}"),
        }
    }

    /// Runs one command and returns its reply as text (see [`Reply`]'s `Display`): `OK`, a
    /// bulk string's content, `(nil)`, an integer, `(error) ...`. Panics if Redis cannot be
    /// reached or does not answer within [`REDIS_TIMEOUT`].
    pub async fn cli(&self, args: &[&str]) -> String {
        match self.command(args).await {
            Ok(reply) => reply.to_string(),
            Err(error) => panic!("redis {args:?}: {error}"),
        }
    }

    /// Runs one command on a fresh connection, bounded by [`REDIS_TIMEOUT`]; an error reply is
    /// `Ok(Reply::Error(..))`, a connection failure or timeout is `Err`.
    pub async fn command(&self, args: &[&str]) -> io::Result<Reply> {
        command(self.port, args, REDIS_TIMEOUT).await
    }

    /// Spawns `redis-server` on `self.port` and `self.dir` and waits for `PONG`; on failure the
    /// process is gone and the error carries the end of its log.
    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = self.dir.join("redis.log");
        let stderr = File::create(self.dir.join("stderr.log")).map_err(|e| e.to_string())?;
        let mut child = Command::new(&self.binary)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(["--save", ""])
            .args(["--daemonize", "no", "--protected-mode", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", self.binary.display()))?;
        let deadline = Instant::now() + REDIS_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("exited with {status}; {}", self.log_tail()));
            }
            // Until the append-only file is replayed Redis answers `-LOADING`: keep polling.
            if let Ok(Reply::Status(pong)) = command(self.port, &["PING"], POLL * 10).await
                && pong == "PONG"
            {
                // A PONG proves only that *a* Redis listens there: if ours could not bind the
                // port, another test's would answer, and two tests would share (and stop) one
                // server. Only our own process id makes it ours.
                match command(self.port, &["INFO", "server"], POLL * 10).await {
                    Ok(Reply::Bulk(Some(info))) if info_pid(&info) == Some(child.id()) => {
                        self.child = Some(child);
                        return Ok(());
                    }
                    Ok(Reply::Bulk(Some(info))) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(format!(
                            "port {} answers for another redis-server (process {:?}, ours {})",
                            self.port,
                            info_pid(&info),
                            child.id()
                        ));
                    }
                    // Not loaded yet, or a connection hiccup: look again.
                    _ => {}
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "no PONG within {REDIS_TIMEOUT:?}; {}",
                    self.log_tail()
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The last lines of Redis's log and stderr, for failure messages.
    fn log_tail(&self) -> String {
        let mut tail = String::new();
        for name in ["redis.log", "stderr.log"] {
            let text = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(10);
            tail.push_str(&format!("{name}: {}\n", lines[from..].join("\n")));
        }
        tail
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`, `+PONG`, ...
    Status(String),
    /// `-ERR ...`.
    Error(String),
    /// `:42`.
    Integer(i64),
    /// `$...`; `None` is the nil bulk string.
    Bulk(Option<Vec<u8>>),
    /// `*...`; `None` is the nil array.
    Array(Option<Vec<Reply>>),
}

impl fmt::Display for Reply {
    /// Like `redis-cli` piped: the status or bulk text, the number, `(nil)`, `(error) ...`,
    /// and an array's elements one per line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Status(text) => f.write_str(text),
            Self::Error(text) => write!(f, "(error) {text}"),
            Self::Integer(n) => write!(f, "{n}"),
            Self::Bulk(Some(bytes)) => f.write_str(&String::from_utf8_lossy(bytes)),
            Self::Bulk(None) | Self::Array(None) => f.write_str("(nil)"),
            Self::Array(Some(items)) => {
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str("\n")?;
                    }
                    write!(f, "{item}")?;
                }
                Ok(())
            }
        }
    }
}

/// Sends `args` as one command to `127.0.0.1:port` on a fresh connection and reads one reply,
/// all within `bound`.
async fn command(port: u16, args: &[&str], bound: Duration) -> io::Result<Reply> {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(&encode(args)).await?;
        let mut buf = Vec::new();
        let mut chunk = [0_u8; 4096];
        loop {
            if let Some((reply, _)) = parse(&buf).map_err(io::Error::other)? {
                return Ok(reply);
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "Redis closed the connection before replying",
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(bound, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no reply to {args:?} within {bound:?}"),
            ))
        })
}

/// A command as a RESP array of bulk strings.
fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// One reply from the start of `buf` and the bytes it took, or `None` if it is not all there.
fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    if end == 0 {
        return Err("a RESP line without a type byte".into());
    }
    let line = String::from_utf8_lossy(&buf[1..end]).into_owned();
    let mut used = end + 2;
    let number = |line: &str| {
        line.parse::<i64>()
            .map_err(|e| format!("bad RESP length or integer {line:?}: {e}"))
    };
    let reply = match buf[0] {
        b'+' => Reply::Status(line),
        b'-' => Reply::Error(line),
        b':' => Reply::Integer(number(&line)?),
        b'$' => match usize::try_from(number(&line)?) {
            Err(_) => Reply::Bulk(None),
            Ok(len) => {
                let Some(data_end) = used.checked_add(len) else {
                    return Err(format!("bulk length {len} overflows"));
                };
                if buf.len() < data_end + 2 {
                    return Ok(None);
                }
                let data = buf[used..data_end].to_vec();
                used = data_end + 2;
                Reply::Bulk(Some(data))
            }
        },
        b'*' => match usize::try_from(number(&line)?) {
            Err(_) => Reply::Array(None),
            Ok(count) => {
                let mut items = Vec::new();
                for _ in 0..count {
                    let Some((item, took)) = parse(&buf[used..])? else {
                        return Ok(None);
                    };
                    items.push(item);
                    used += took;
                }
                Reply::Array(Some(items))
            }
        },
        other => return Err(format!("unexpected RESP type byte {other:#04x}")),
    };
    Ok(Some((reply, used)))
}

/// `redis-server` on `PATH`.
fn find_redis_server() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("redis-server"))
        .find(|candidate| candidate.is_file())
}

/// A port for a new Redis that nothing listens on right now: the next one this process has not
/// handed out, below the ephemeral range (see [`PORT_FLOOR`]), starting at an offset taken from
/// the process id so that test binaries running side by side start apart. Falls back to the
/// kernel's pick for `127.0.0.1:0` where the ephemeral range cannot be read or leaves no room.
fn pick_port() -> u16 {
    let ceiling = ephemeral_floor().unwrap_or(PORT_FLOOR);
    let span = u64::from(ceiling.saturating_sub(PORT_FLOOR));
    if span >= 1_000 {
        let start = u64::from(std::process::id()).wrapping_mul(7_919) % span;
        for _ in 0..span {
            let n = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
            let offset = start.wrapping_add(n) % span;
            let Ok(port) = u16::try_from(u64::from(PORT_FLOOR) + offset) else {
                continue;
            };
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("bind 127.0.0.1:0 to find a free port")
}

/// The lowest port of the kernel's ephemeral range, on Linux.
fn ephemeral_floor() -> Option<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

/// The `process_id:` field of an `INFO server` reply.
fn info_pid(info: &[u8]) -> Option<u32> {
    String::from_utf8_lossy(info)
        .lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
}

/// Polls `child` until it exits or `bound` passes; the exit status, or `None` on timeout.
async fn wait_exit(child: &mut Child, bound: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + bound;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::{Reply, encode, info_pid, parse};

    #[test]
    fn reads_the_process_id_from_info_server() {
        let info = b"# Server\r\nredis_version:7.0.15\r\nprocess_id:4242\r\ntcp_port:1\r\n";
        assert_eq!(info_pid(info), Some(4242));
        assert_eq!(info_pid(b"# Server\r\n"), None);
    }

    #[test]
    fn encodes_commands_as_bulk_string_arrays() {
        assert_eq!(encode(&["GET", "k"]), b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
    }

    #[test]
    fn parses_every_reply_type_and_waits_for_the_rest() {
        let ok = parse(b"+OK\r\n").unwrap().unwrap();
        assert_eq!(ok, (Reply::Status("OK".into()), 5));
        assert_eq!(
            parse(b"-ERR no\r\n").unwrap().unwrap().0,
            Reply::Error("ERR no".into())
        );
        assert_eq!(parse(b":-3\r\n").unwrap().unwrap().0, Reply::Integer(-3));
        assert_eq!(parse(b"$-1\r\n").unwrap().unwrap().0, Reply::Bulk(None));
        assert_eq!(
            parse(b"$2\r\nhi\r\n").unwrap().unwrap().0,
            Reply::Bulk(Some(b"hi".to_vec()))
        );
        let array = parse(b"*2\r\n$1\r\na\r\n:1\r\n").unwrap().unwrap().0;
        assert_eq!(array.to_string(), "a\n1");
        assert_eq!(parse(b"$5\r\nhel").unwrap(), None);
        assert_eq!(parse(b"*2\r\n:1\r\n").unwrap(), None);
        assert_eq!(parse(b"+OK").unwrap(), None);
        assert!(parse(b"?x\r\n").is_err());
    }
}
