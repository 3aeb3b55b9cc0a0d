//! `cargo xtask bench`: the benchmark matrix behind `docs/performance.md`.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One server under test.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Server {
    /// `switchboard serve --protocol <name>`.
    Switchboard(&'static str),
    /// `benches/baseline-server` (ip-chat wire work only, tokio-tungstenite).
    Baseline,
    /// `benches/preencoded-server` (the same wire work, each broadcast encoded once and queued
    /// frames written with `write_vectored`).
    PreEncoded,
}

/// The ip-chat servers every comparison runs, in table order.
const IP_CHAT: [Server; 3] = [
    Server::Switchboard("ip-chat"),
    Server::Baseline,
    Server::PreEncoded,
];

impl Server {
    fn name(self) -> &'static str {
        match self {
            Self::Switchboard(_) => "switchboard",
            Self::Baseline => "baseline",
            Self::PreEncoded => "pre-encoded",
        }
    }
}

/// How a server is started.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flags {
    /// Room for the idle rows' sockets (`--max-connections 20000`).
    Roomy,
    /// The server's defaults, as an operator would run it.
    Defaults,
    /// Room for sockets, and the state engine durable in a fresh data directory
    /// (`--data-dir`), its log kept to read the group-commit summary.
    Durable,
}

struct Running {
    child: Child,
    url: String,
    /// With [`Flags::Durable`]: the data directory (removed on drop) and the server's log.
    durable: Option<(PathBuf, PathBuf)>,
}

impl Running {
    /// Stops the server gracefully and reads what its durable engine reported on closing:
    /// commits (one `fsync` each) and write operations.
    fn stop_durable(mut self) -> Option<(f64, f64)> {
        stop(&mut self.child);
        let (_, log) = self.durable.as_ref()?;
        let text = std::fs::read_to_string(log).ok()?;
        let line = text
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find(|v| v["fields"]["message"] == "durable engine writer stopped")?;
        Some((
            line["fields"]["commits"].as_f64()?,
            line["fields"]["writes"].as_f64()?,
        ))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        stop(&mut self.child);
        if let Some((dir, _)) = &self.durable {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Stops a server child: SIGTERM (a graceful stop), then SIGKILL after 5 s.
pub(crate) fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    for _ in 0..100 {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits up to 10 s until something listens on `addr`.
pub(crate) fn wait_listening(addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            return Err("the server did not start listening".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A plain HTTP/1.1 GET: status and body.
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).map_err(|e| e.to_string())?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Ok((
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_owned()
        },
    ))
}

/// The payload of a chunked body (sizes in hex, each chunk followed by CRLF).
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_or(18_000, |a| a.port())
}

/// Where `cargo build --release` put the binaries: `$CARGO_TARGET_DIR/release` when that is set
/// (cargo passes it on to the build `crate::cargo` runs), else `target/release`.
pub(crate) fn release_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map_or_else(
            || root().join("target"),
            |dir| {
                if dir.is_absolute() {
                    dir
                } else {
                    std::env::current_dir().unwrap_or_default().join(dir)
                }
            },
        );
    target.join("release")
}

fn start(server: Server, release: &Path, flags: Flags) -> Result<Running, String> {
    let addr: SocketAddr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut durable = None;
    let child = match server {
        Server::Switchboard(protocol) => {
            let mut command = Command::new(release.join("switchboard"));
            command.args([
                "serve",
                "--protocol",
                protocol,
                "--listen",
                &addr.to_string(),
            ]);
            if flags != Flags::Defaults {
                command.args(["--max-connections", "20000"]);
            }
            if flags == Flags::Durable {
                let dir = std::env::temp_dir().join(format!("switchboard-bench-{}", addr.port()));
                let _ = std::fs::remove_dir_all(&dir);
                let log = dir.with_extension("log");
                let file = std::fs::File::create(&log)
                    .map_err(|e| format!("could not create {}: {e}", log.display()))?;
                command
                    .arg("--data-dir")
                    .arg(&dir)
                    .args(["--log-format", "json"])
                    .env("RUST_LOG", "warn,switchboard_engine_durable=info")
                    .stdout(Stdio::null())
                    // The binary logs to stderr.
                    .stderr(file);
                durable = Some((dir, log));
            } else {
                command.env("RUST_LOG", "warn").stdout(Stdio::null());
            }
            command.spawn()
        }
        Server::Baseline => Command::new(release.join("baseline-server"))
            .arg(addr.to_string())
            .stderr(Stdio::null())
            .spawn(),
        Server::PreEncoded => Command::new(release.join("preencoded-server"))
            .arg(addr.to_string())
            .stderr(Stdio::null())
            .spawn(),
    }
    .map_err(|e| format!("could not start the server: {e}"))?;
    let running = Running {
        child,
        url: format!("ws://{addr}/ws"),
        durable,
    };
    wait_listening(addr)?;
    Ok(running)
}

/// Runs `switchboard bench <args>` and returns its JSON report.
pub(crate) fn load(release: &Path, args: &[String]) -> Result<Value, String> {
    eprintln!("  $ switchboard bench {}", args.join(" "));
    let output = Command::new(release.join("switchboard"))
        .arg("bench")
        .args(args)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("could not run the load tool: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("{\"bench\""))
        .ok_or("the load tool printed no report")?;
    let value: Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    Ok(value["report"].clone())
}

/// One fan-out run's shape.
#[derive(Clone, Copy)]
struct Scenario {
    subscribers: usize,
    /// `None`: the load tool's default (enough senders to stay within ip-chat's rate limit).
    senders: Option<usize>,
    /// Messages in total (with `senders`, split evenly among them).
    messages: usize,
    rate: Option<f64>,
    /// With `rate`: the senders send at the same instants (bursts), not in turn.
    in_phase: bool,
    flags: Flags,
    /// Bound on waiting for deliveries after the last send (`None`: the load tool's 60 s).
    timeout_secs: Option<u64>,
}

/// Fresh-server runs of each fan-out row per server: a single sub-second run on a shared 2-core
/// machine is too noisy to compare (runs of one server spread by about ±15% here).
const FANOUT_RUNS: usize = 5;

/// Runs per server of the two unpaced fan-out rows, which last 40 ms (100 subscribers) and
/// 0.3 s (1,000). Runs of one server there spread by ±25%, so the medians of 5 moved by up to
/// a tenth between bench runs of the same two servers: too much for a 0.95× target. 15 runs
/// take about two minutes more.
const UNPACED_FANOUT_RUNS: usize = 15;

/// Runs each fan-out contestant (a server and its scenario) `rounds` times, each on a fresh
/// server and the contestants taking turns, and keeps each one's median run, in the order
/// given: by throughput, or for a paced scenario by p99 latency.
fn fanout(
    release: &Path,
    contestants: &[(Server, Scenario)],
    rounds: usize,
) -> Result<Vec<Value>, String> {
    let runs = interleaved(contestants, rounds, |(server, scenario)| {
        fanout_once(release, server, scenario)
    })?;
    Ok(runs
        .into_iter()
        .zip(contestants)
        .map(|(runs, (_, scenario))| {
            // A paced run's throughput is the pace: its latency is what tells runs apart.
            median_by(
                runs,
                if scenario.rate.is_some() {
                    P99
                } else {
                    THROUGHPUT
                },
            )
        })
        .collect())
}

/// Every ip-chat server with the same `scenario`, in [`IP_CHAT`] order.
fn on_each_server(scenario: Scenario) -> [(Server, Scenario); 3] {
    IP_CHAT.map(|server| (server, scenario))
}

/// Runs `f` `rounds` times for each of `contestants`, taking turns (round `r` starts with
/// contestant `r mod n`), and returns each contestant's results in the order given.
///
/// Taking turns matters on a shared machine: its speed drifts over minutes (neighbours, clock),
/// and running one server's rounds after another's would hand that drift to the comparison.
fn interleaved<K: Copy, T>(
    contestants: &[K],
    rounds: usize,
    mut f: impl FnMut(K) -> Result<T, String>,
) -> Result<Vec<Vec<T>>, String> {
    let n = contestants.len();
    let mut results: Vec<Vec<T>> = contestants.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds.max(1) {
        for turn in 0..n {
            let index = (round + turn) % n;
            results[index].push(f(contestants[index])?);
        }
    }
    Ok(results)
}

/// The median run by deliveries/s, with every run's throughput in its `samples` field.
pub(crate) fn median_by_throughput(runs: Vec<Value>) -> Value {
    median_by(runs, THROUGHPUT)
}

/// A report's deliveries/s.
const THROUGHPUT: &[&str] = &["deliveries_per_sec"];
/// A report's p99 latency in µs.
const P99: &[&str] = &["latency_us", "p99"];

/// The median run by `figure` (a path into the report), with every run's figure in its
/// `samples` field.
fn median_by(mut runs: Vec<Value>, figure: &[&str]) -> Value {
    runs.sort_by(|a, b| num(a, figure).total_cmp(&num(b, figure)));
    let samples: Vec<String> = runs
        .iter()
        .map(|r| format!("{:.0}", num(r, figure)))
        .collect();
    let middle = runs.len() / 2;
    let mut median = runs.swap_remove(middle);
    median["samples"] = Value::from(samples.join(" / "));
    median
}

fn fanout_once(release: &Path, server: Server, scenario: Scenario) -> Result<Value, String> {
    let running = start(server, release, scenario.flags)?;
    let mut args: Vec<String> = [
        "fanout",
        "--url",
        &running.url,
        "--pid",
        &running.child.id().to_string(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(["--subscribers".into(), scenario.subscribers.to_string()]);
    match scenario.senders {
        // Messages per sender, so the command line reads as the row's label does.
        Some(senders) if senders > 0 && scenario.messages.is_multiple_of(senders) => {
            args.extend([
                "--senders".into(),
                senders.to_string(),
                "--messages-per-sender".into(),
                (scenario.messages / senders).to_string(),
            ]);
        }
        Some(senders) => args.extend([
            "--senders".into(),
            senders.to_string(),
            "--messages".into(),
            scenario.messages.to_string(),
        ]),
        None => args.extend(["--messages".into(), scenario.messages.to_string()]),
    }
    if let Some(rate) = scenario.rate {
        args.extend(["--rate".into(), rate.to_string()]);
        if scenario.in_phase {
            args.push("--in-phase".into());
        }
    }
    if let Some(secs) = scenario.timeout_secs {
        args.extend(["--timeout".into(), format!("{secs}s")]);
    }
    load(release, &args)
}

/// The burst row and the CPU-per-delivery figure of one server.
struct Burst {
    /// The median long run by throughput.
    run: Value,
    /// The median pair's (long − short) figures.
    cpu: CpuPair,
    /// Every pair's ns per delivery.
    samples: String,
}

/// A long and a short burst on fresh servers, reduced to CPU per delivery.
#[derive(Clone, Copy)]
struct CpuPair {
    long_cpu_ns: f64,
    long_frames: f64,
    short_cpu_ns: f64,
    short_frames: f64,
}

impl CpuPair {
    /// Message frames the server wrote: to subscribers and, since a broadcast reaches its
    /// sender too, to the senders.
    fn frames(run: &Value) -> f64 {
        num(run, &["deliveries"]) + num(run, &["sender_deliveries"])
    }

    fn of(long: &Value, short: &Value) -> Self {
        Self {
            long_cpu_ns: num(long, &["server_cpu_ns"]),
            long_frames: Self::frames(long),
            short_cpu_ns: num(short, &["server_cpu_ns"]),
            short_frames: Self::frames(short),
        }
    }

    /// (long CPU − short CPU) ÷ (long deliveries − short deliveries), in ns: what connecting,
    /// joining and closing cost appears in both runs and cancels out.
    fn ns_per_delivery(&self) -> f64 {
        let frames = self.long_frames - self.short_frames;
        if frames > 0.0 {
            (self.long_cpu_ns - self.short_cpu_ns) / frames
        } else {
            f64::NAN
        }
    }
}

/// `pairs` × (the long burst, then the short one) on every ip-chat server, each run on a fresh
/// server with default flags, the servers taking turns pair by pair.
fn bursts(
    release: &Path,
    long: Scenario,
    short: Scenario,
    pairs: usize,
) -> Result<Vec<Burst>, String> {
    let pairs = interleaved(&IP_CHAT, pairs, |server| {
        let long_run = fanout_once(release, server, long)?;
        let short_run = fanout_once(release, server, short)?;
        Ok((long_run, short_run))
    })?;
    Ok(pairs.into_iter().map(burst).collect())
}

/// One server's burst pairs reduced to its row and CPU per delivery.
fn burst(pairs: Vec<(Value, Value)>) -> Burst {
    let mut runs = Vec::with_capacity(pairs.len());
    let mut cpu = Vec::with_capacity(pairs.len());
    for (long_run, short_run) in pairs {
        cpu.push(CpuPair::of(&long_run, &short_run));
        runs.push(long_run);
    }
    cpu.sort_by(|a, b| a.ns_per_delivery().total_cmp(&b.ns_per_delivery()));
    let samples: Vec<String> = cpu
        .iter()
        .map(|c| format!("{:.0}", c.ns_per_delivery()))
        .collect();
    Burst {
        run: median_by_throughput(runs),
        cpu: cpu[cpu.len() / 2],
        samples: samples.join(" / "),
    }
}

fn idle(
    release: &Path,
    server: Server,
    connections: usize,
    in_flight: usize,
) -> Result<Value, String> {
    let running = start(server, release, Flags::Roomy)?;
    let pid = running.child.id().to_string();
    let args = [
        "idle",
        "--url",
        &running.url,
        "--pid",
        &pid,
        "--connections",
        &connections.to_string(),
        "--concurrency",
        &in_flight.to_string(),
    ];
    load(release, &args.map(str::to_owned))
}

fn reqack(release: &Path, users: usize, messages: usize) -> Result<Value, String> {
    reqack_on(release, users, messages, Flags::Roomy).map(|(report, _, _)| report)
}

/// The reqack load on a server started with `flags`: the report, the load's wall time, and
/// for a durable server its (commits, writes).
fn reqack_on(
    release: &Path,
    users: usize,
    messages: usize,
    flags: Flags,
) -> Result<(Value, Duration, Option<(f64, f64)>), String> {
    let running = start(Server::Switchboard("reqack"), release, flags)?;
    let args = [
        "reqack",
        "--url",
        &running.url,
        "--users",
        &users.to_string(),
        "--messages",
        &messages.to_string(),
    ];
    let started = Instant::now();
    let report = load(release, &args.map(str::to_owned))?;
    let took = started.elapsed();
    Ok((report, took, running.stop_durable()))
}

/// One fan-out scenario on the in-memory and the durable engine: two table rows.
fn durable_fanout_row(
    out: &mut String,
    release: &Path,
    label: &str,
    subscribers: usize,
    senders: Option<usize>,
) -> Result<(), String> {
    let scenario = |flags| Scenario {
        subscribers,
        senders,
        messages: 500,
        rate: None,
        in_phase: false,
        flags,
        timeout_secs: None,
    };
    let switchboard = Server::Switchboard("ip-chat");
    let runs = fanout(
        release,
        &[
            (switchboard, scenario(Flags::Roomy)),
            (switchboard, scenario(Flags::Durable)),
        ],
        FANOUT_RUNS,
    )?;
    let (memory, durable) = (&runs[0], &runs[1]);
    let ours = num(durable, &["deliveries_per_sec"]);
    let theirs = num(memory, &["deliveries_per_sec"]);
    for (engine, r) in [("in memory", memory), ("durable", durable)] {
        let verdict = match (engine, senders) {
            ("durable", Some(_)) => judged(ours, theirs, Target::AtLeast(0.8)),
            ("durable", None) => format!("{} (no target)", ratio(ours, theirs)),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "| {label} | {engine} | {:.0} | {:.0} | {:.0} | {} | {verdict} |",
            num(r, &["deliveries_per_sec"]),
            num(r, &["latency_us", "p50"]),
            num(r, &["latency_us", "p99"]),
            r["samples"].as_str().unwrap_or(""),
        );
    }
    Ok(())
}

/// The durable node (`--data-dir`) beside the in-memory engine, in the same run: ip-chat
/// fan-out and reqack's write-heavy request/ack load.
fn durable_section(out: &mut String, release: &Path, quick: bool) -> Result<(), String> {
    let subscribers = if quick { 200 } else { 1_000 };
    let _ = writeln!(out, "\n## Durable node (`--data-dir`)\n");
    let _ = writeln!(
        out,
        "The same loads on Switchboard with the in-memory engine and with the durable engine in a\n\
         fresh data directory, which acknowledges and delivers a write only after it is on disk\n\
         (one `fsync` per batch of concurrent writes). Fan-out rows: median of {FANOUT_RUNS} fresh\n\
         servers, the two engines taking turns.\n\
         A chat message is broadcast only once it is durable, and a socket's next message is read\n\
         after its previous one is stored, so one sender sends at most one message per `fsync`:\n\
         with 100 senders at once (the target row) their messages share `fsync`s and the fan-out\n\
         runs at full speed; with the load tool's default few senders (second row) the rate of\n\
         messages, not of deliveries, is the bound.\n"
    );
    let _ = writeln!(
        out,
        "| run | engine | deliveries/s | p50 µs | p99 µs | runs (deliveries/s) | ratio (target ≥ 0.8×) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for (label, senders) in [
        (
            format!("{} subs × 500 msgs from 100 senders", group(subscribers)),
            Some(100),
        ),
        (
            format!("{} subs × 500 msgs, default senders", group(subscribers)),
            None,
        ),
    ] {
        durable_fanout_row(out, release, &label, subscribers, senders)?;
    }
    let (users, messages) = if quick { (20, 20) } else { (100, 50) };
    let _ = writeln!(
        out,
        "\nreqack, {users} users × {messages} messages (each a request, its response and an event \
         to ack). A request refused with an error (`UNAVAILABLE` when a user's outbox changed 64\n\
         times during one append: every append to a busy outbox waits for a commit, so a hot\n\
         outbox is contended far longer than in memory) creates no event, and the load tool\n\
         then counts that event as missing; nothing that was acknowledged is lost. fsyncs/s is\n\
         over the time the events took.\n"
    );
    let _ = writeln!(
        out,
        "| engine | request p50 µs | p99 µs | events/s | requests refused | missing | duplicates | fsyncs | fsyncs/s | writes per fsync |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    for (engine, flags) in [("in memory", Flags::Roomy), ("durable", Flags::Durable)] {
        let (r, took, commits) = reqack_on(release, users, messages, flags)?;
        // The events' own span: the load's wall time also holds its wait for missing events.
        let active = num(&r, &["events"]) / num(&r, &["events_per_sec"]);
        let secs = if active.is_finite() && active > 0.0 {
            active
        } else {
            took.as_secs_f64().max(1e-9)
        };
        let (fsyncs, per_sec, batch) = match commits {
            Some((commits, writes)) => (
                format!("{commits:.0}"),
                format!("{:.0}", commits / secs),
                format!("{:.1}", writes / commits.max(1.0)),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let _ = writeln!(
            out,
            "| {engine} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {fsyncs} | {per_sec} | {batch} |",
            num(&r, &["request_latency_us", "p50"]),
            num(&r, &["request_latency_us", "p99"]),
            num(&r, &["events_per_sec"]),
            r["errors"],
            r["missing"],
            r["duplicates"],
        );
    }
    Ok(())
}

pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
        })
        .and_then(|kib| kib.parse::<u64>().ok())
        .map_or_else(
            || "?".into(),
            |kib| format!("{:.0} GiB", kib as f64 / 1048576.0),
        );
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} cores ({cpu}), {memory} RAM, Linux {}",
        kernel.trim()
    )
}

pub(crate) fn num(v: &Value, path: &[&str]) -> f64 {
    path.iter()
        .fold(v, |v, key| &v[*key])
        .as_f64()
        .unwrap_or(f64::NAN)
}

/// `ours ÷ theirs`, or `None` when either is missing.
fn quotient(ours: f64, theirs: f64) -> Option<f64> {
    (theirs.is_finite() && theirs > 0.0 && ours.is_finite()).then(|| ours / theirs)
}

pub(crate) fn ratio(ours: f64, theirs: f64) -> String {
    quotient(ours, theirs).map_or_else(|| "–".into(), |q| format!("{q:.2}×"))
}

/// A target a figure is held to.
#[derive(Clone, Copy)]
enum Target {
    AtMost(f64),
    AtLeast(f64),
}

impl Target {
    fn verdict(self, value: Option<f64>) -> &'static str {
        match (self, value) {
            (Self::AtMost(bound), Some(v)) if v <= bound => "pass",
            (Self::AtLeast(bound), Some(v)) if v >= bound => "pass",
            (_, Some(_)) => "FAIL",
            (_, None) => "–",
        }
    }
}

/// `ours ÷ theirs` with its pass/fail against `target`, e.g. `0.96× pass`.
fn judged(ours: f64, theirs: f64, target: Target) -> String {
    let q = quotient(ours, theirs);
    match q {
        Some(q) => format!("{q:.2}× {}", target.verdict(Some(q))),
        None => "–".into(),
    }
}

pub(crate) fn run(quick: bool) -> ExitCode {
    if !crate::cargo(&[
        "build",
        "--release",
        "-p",
        "switchboard-cli",
        "-p",
        "baseline-server",
        "-p",
        "preencoded-server",
    ]) {
        return ExitCode::FAILURE;
    }
    let release = release_dir();
    match matrix(&release, quick) {
        Ok(report) => {
            let path = root().join("docs/performance.md");
            if let Err(e) = std::fs::write(&path, report) {
                eprintln!("xtask bench: could not write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            eprintln!("wrote {}", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("xtask bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What the matrix measured that the target tables compare.
struct Measured {
    /// Fan-out rows: label and one median run per server, in [`IP_CHAT`] order.
    fanout: Vec<FanoutRow>,
    /// The burst of each server, in [`IP_CHAT`] order.
    burst: Vec<Burst>,
    /// Idle rows: sockets and one run per server, in [`IP_CHAT`] order.
    idle: Vec<(usize, [Value; 3])>,
}

/// Runs `f` for every ip-chat server, in [`IP_CHAT`] order.
fn each_server<T>(mut f: impl FnMut(Server) -> Result<T, String>) -> Result<[T; 3], String> {
    let [a, b, c] = IP_CHAT;
    Ok([f(a)?, f(b)?, f(c)?])
}

fn matrix(release: &Path, quick: bool) -> Result<String, String> {
    let (idle_sizes, big_fanout, pairs) = if quick {
        (vec![1_000], 200, 1)
    } else {
        (vec![10_000, 15_000], 1_000, 5)
    };
    let mut out = String::new();
    let _ = writeln!(out, "# Performance\n");
    let _ = writeln!(
        out,
        "Written by `cargo xtask bench{}` on {}. Server and load generator share the machine, so\n\
         every figure includes the load generator's competition for the same cores. Three ip-chat\n\
         servers run side by side: Switchboard; the baseline, `benches/baseline-server`, a minimal\n\
         tokio-tungstenite broadcast server doing the same wire work with none of the platform\n\
         around it; and the pre-encoded yardstick, `benches/preencoded-server`, the same wire work\n\
         done the cheapest way we know (each broadcast encoded once to its final wire bytes, shared\n\
         by every queue, and up to 64 queued frames handed to the kernel per `write_vectored`).\n\
         Ratios are Switchboard ÷ the server named.\n",
        if quick { " --quick" } else { "" },
        machine()
    );
    let _ = writeln!(out, "## What each figure is\n");
    let _ = writeln!(
        out,
        "- **deliveries/s**: message frames that reached subscribers, divided by the time from the\n  \
         first send to the last delivery, counted by the load generator (`switchboard bench fanout`).\n\
         - **p50 / p99 / max µs**: send-to-receipt latency of every delivery, from a timestamp the\n  \
         sender writes into the message text and the subscriber reads back (same clock, same machine).\n\
         - **CPU µs/delivery** (fan-out rows): the server's CPU time over the run, summed over its\n  \
         threads from /proc/<pid>/task/*/schedstat (nanoseconds), divided by the deliveries. The\n  \
         window also holds the subscribers closing, so short runs overstate it.\n\
         - **CPU ns/delivery (long − short)**: the server's CPU over a long burst minus its CPU over\n  \
         a short burst of the same shape (same subscribers and senders, on fresh servers), divided\n  \
         by the difference in message frames written (to subscribers, and to senders, who get every\n  \
         broadcast too). Setting up and closing the sockets costs the same in both runs and\n  \
         cancels out, leaving the cost of one more delivery, at nanosecond resolution.\n\
         - **subscribers closed**: subscribers the server disconnected before they had every\n  \
         message (close codes in parentheses), although every one keeps reading; the target is none.\n\
         - **server RSS per socket**: the server's resident memory with N idle sockets open minus\n  \
         before, divided by N (/proc/<pid>/status VmRSS).\n\
         - **connects/s** and **connect ms**: how fast the load generator opens upgraded sockets.\n"
    );

    let measured = fanout_section(&mut out, release, big_fanout)?;
    // The cluster section compares against the one-node run of the same scenario.
    let one_node_fanout = measured
        .get(1)
        .map_or(Value::Null, |row| row.runs[0].clone());
    let burst = burst_section(&mut out, release, pairs)?;
    let idle_rows = idle_section(&mut out, release, &idle_sizes)?;
    let per_socket = idle_rows.last().map_or(f64::NAN, |(_, runs)| {
        num(&runs[0], &["rss_per_connection_bytes"])
    });
    targets_section(
        &mut out,
        &Measured {
            fanout: measured,
            burst,
            idle: idle_rows,
        },
    );

    let connects = if quick { 1_000 } else { 10_000 };
    let in_flight = 2_000;
    let _ = writeln!(out, "\n## Connect burst\n");
    let _ = writeln!(
        out,
        "{connects} connections with {in_flight} in flight at once. A maximum connect time of a second or\n\
         more means a SYN was dropped and retransmitted (a stall); Switchboard listens with a backlog\n\
         of 4,096 through `TcpSocket::listen` instead of tokio's default `TcpListener::bind`.\n"
    );
    let _ = writeln!(
        out,
        "| server | connects/s | p50 ms | p99 ms | max ms | stalled |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for server in IP_CHAT {
        let r = idle(release, server, connects, in_flight)?;
        let max = num(&r, &["connect_ms", "max"]);
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.1} | {:.1} | {:.1} | {} |",
            server.name(),
            num(&r, &["connects_per_sec"]),
            num(&r, &["connect_ms", "p50"]),
            num(&r, &["connect_ms", "p99"]),
            max,
            if max >= 1000.0 { "yes" } else { "no" }
        );
    }

    out.push_str(&beyond_one_process(per_socket));
    out.push_str(&crate::scale::kept_measurement());

    let _ = writeln!(out, "\n## reqack\n");
    let (users, messages) = if quick { (20, 20) } else { (100, 50) };
    let r = reqack(release, users, messages)?;
    let _ = writeln!(
        out,
        "| users × messages | request p50 µs | p99 µs | events/s | duplicates after ack | missing | exactly once |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    let _ = writeln!(
        out,
        "| {users} × {messages} | {:.0} | {:.0} | {:.0} | {} | {} | {} |",
        num(&r, &["request_latency_us", "p50"]),
        num(&r, &["request_latency_us", "p99"]),
        num(&r, &["events_per_sec"]),
        r["duplicates"],
        r["missing"],
        r["exactly_once"]
    );
    durable_section(&mut out, release, quick)?;
    crate::cluster::section(
        &mut out,
        release,
        quick,
        &crate::cluster::OneNode {
            fanout: one_node_fanout,
            fanout_subscribers: big_fanout,
            reqack: r,
            reqack_users: users,
            reqack_messages: messages,
        },
    )?;
    Ok(out)
}

/// The fan-out rows, all three servers each.
fn fanout_section(
    out: &mut String,
    release: &Path,
    big_fanout: usize,
) -> Result<Vec<FanoutRow>, String> {
    let _ = writeln!(out, "## ip-chat fan-out\n");
    let _ = writeln!(
        out,
        "Each fan-out row is the median of several runs on fresh servers, the three servers \
         taking turns run by run: the median by throughput of {UNPACED_FANOUT_RUNS} runs, with \
         every run's throughput in the last column, except in the paced rows, whose throughput \
         is the pace itself: there it is the median by p99 latency of {FANOUT_RUNS} runs, with \
         every run's p99 (µs) in the last column. The unpaced rows last 40 ms and 0.3 s, and one \
         server's runs of them spread by ±25% on this machine, hence the more runs.\n\n\
         The two paced rows send the same 400 messages at 40 per second. In the steady row the \
         senders take turns, a message every 25 ms, so each broadcast goes out alone: a `send` \
         per delivery, which is why CPU per delivery is highest there. In the micro-burst row \
         8 senders send at the same instants, 8 messages at once every 200 ms: how many frames \
         a server gathers per `send` while a burst arrives then decides its CPU and its tail \
         latency. The micro-burst row has no target; it shows how a server batches.\n"
    );
    let _ = writeln!(
        out,
        "| run | server | deliveries/s | p50 µs | p99 µs | max µs | CPU µs/delivery | complete | runs (deliveries/s; paced: p99 µs) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    // The micro-burst row: the steady row's 400 messages at 40 msgs/s from 8 senders in phase,
    // so every 200 ms brings 8 messages at once.
    const IN_PHASE_SENDERS: usize = 8;
    for (label, subscribers, senders, messages, rate, in_phase) in [
        (
            "100 subs × 500 msgs".to_owned(),
            100,
            None,
            500,
            None,
            false,
        ),
        (
            format!("{} subs × 500 msgs", group(big_fanout)),
            big_fanout,
            None,
            500,
            None,
            false,
        ),
        (
            format!(
                "{} subs, steady 40 msgs/s ({} deliveries/s)",
                group(big_fanout),
                group(40 * big_fanout)
            ),
            big_fanout,
            None,
            400,
            Some(40.0),
            false,
        ),
        (
            format!(
                "{} subs, 40 msgs/s as bursts of {IN_PHASE_SENDERS} every 200 ms",
                group(big_fanout),
            ),
            big_fanout,
            Some(IN_PHASE_SENDERS),
            400,
            Some(40.0),
            true,
        ),
    ] {
        let scenario = Scenario {
            subscribers,
            senders,
            messages,
            rate,
            in_phase,
            flags: Flags::Roomy,
            timeout_secs: None,
        };
        let rounds = if rate.is_some() {
            FANOUT_RUNS
        } else {
            UNPACED_FANOUT_RUNS
        };
        let runs: [Value; 3] = fanout(release, &on_each_server(scenario), rounds)?
            .try_into()
            .map_err(|_| "one median run per server".to_owned())?;
        for (server, r) in IP_CHAT.iter().zip(&runs) {
            let _ = writeln!(
                out,
                "| {label} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {} | {} |",
                server.name(),
                num(r, &["deliveries_per_sec"]),
                num(r, &["latency_us", "p50"]),
                num(r, &["latency_us", "p99"]),
                num(r, &["latency_us", "max"]),
                num(r, &["server_cpu_per_delivery_us"]),
                r["complete"],
                r["samples"].as_str().unwrap_or("")
            );
        }
        rows.push(FanoutRow {
            label,
            paced: rate.is_some(),
            in_phase,
            runs,
        });
    }
    Ok(rows)
}

/// One fan-out row: its label, whether it is paced, and one median run per server in
/// [`IP_CHAT`] order.
struct FanoutRow {
    label: String,
    paced: bool,
    /// Paced senders in phase (micro-bursts): reported, without a target.
    in_phase: bool,
    runs: [Value; 3],
}

/// Burst subscribers, senders, and messages per sender in the long and the short run.
const BURST_SUBSCRIBERS: usize = 1_000;
const BURST_SENDERS: usize = 100;
const BURST_LONG_EACH: usize = 50;
const BURST_SHORT_EACH: usize = 5;

/// `5,000-message burst`.
fn burst_label() -> String {
    format!("{}-message burst", group(BURST_SENDERS * BURST_LONG_EACH))
}

/// The 5,000-message burst on default flags, and CPU per delivery from long − short.
fn burst_section(out: &mut String, release: &Path, pairs: usize) -> Result<Vec<Burst>, String> {
    let scenario = |each: usize| Scenario {
        subscribers: BURST_SUBSCRIBERS,
        senders: Some(BURST_SENDERS),
        messages: BURST_SENDERS * each,
        rate: None,
        in_phase: false,
        flags: Flags::Defaults,
        // A server that drops frames (the baseline's queue holds 1,024) leaves subscribers
        // waiting for the rest; 30 s after the last send is ample for the ones that arrive.
        timeout_secs: Some(30),
    };
    let (long, short) = (scenario(BURST_LONG_EACH), scenario(BURST_SHORT_EACH));
    let bursts = bursts(release, long, short, pairs)?;

    let _ = writeln!(out, "\n## Burst at the limit\n");
    let _ = writeln!(
        out,
        "{BURST_SENDERS} senders × {BURST_LONG_EACH} messages, as fast as they go, to \
         {} subscribers that all keep reading: {} message frames per run, each \
         server on its default flags. {} on fresh servers; the row shows the median by throughput. \
         A server may also drop frames without closing: the baseline's queue holds 1,024 frames \
         per socket and a broadcast skips a socket whose queue is full, so it shows as incomplete; \
         the pre-encoded yardstick's queue holds 16,384, Switchboard's default `--outbound-queue`.\n",
        group(BURST_SUBSCRIBERS),
        group(long.messages * (BURST_SUBSCRIBERS + BURST_SENDERS)),
        if pairs > 1 {
            format!("{pairs} runs (the servers taking turns)")
        } else {
            "One run".to_owned()
        }
    );
    let _ = writeln!(
        out,
        "| server | subscribers closed (target 0) | deliveries/s | p50 µs | p99 µs | max µs | complete | runs (deliveries/s) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for (server, b) in IP_CHAT.iter().zip(&bursts) {
        let r = &b.run;
        let _ = writeln!(
            out,
            "| {} | {}{} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} |",
            server.name(),
            r["closed_by_server"],
            close_codes(r),
            num(r, &["deliveries_per_sec"]),
            num(r, &["latency_us", "p50"]),
            num(r, &["latency_us", "p99"]),
            num(r, &["latency_us", "max"]),
            r["complete"],
            r["samples"].as_str().unwrap_or("")
        );
    }

    let _ = writeln!(out, "\n### CPU per delivery\n");
    let _ = writeln!(
        out,
        "The long run is the burst above ({BURST_LONG_EACH} messages per sender); the short run \
         has the same {} subscribers and {BURST_SENDERS} senders with \
         {BURST_SHORT_EACH} messages each. CPU per delivery = (long CPU − short CPU) ÷ (long \
         frames − short frames); the table shows the median pair{}.\n",
        group(BURST_SUBSCRIBERS),
        if pairs > 1 {
            format!(" of {pairs}, every pair's figure in the last column")
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        out,
        "| server | long: CPU ms | long: frames | short: CPU ms | short: frames | CPU ns/delivery | pairs (ns/delivery) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for (server, b) in IP_CHAT.iter().zip(&bursts) {
        let c = &b.cpu;
        let _ = writeln!(
            out,
            "| {} | {:.1} | {:.0} | {:.1} | {:.0} | {:.0} | {} |",
            server.name(),
            c.long_cpu_ns / 1e6,
            c.long_frames,
            c.short_cpu_ns / 1e6,
            c.short_frames,
            c.ns_per_delivery(),
            b.samples
        );
    }
    Ok(bursts)
}

/// ` (1008 × 3, none × 1)` from a run's `close_codes`, or nothing.
pub(crate) fn close_codes(run: &Value) -> String {
    let codes: Vec<String> = run["close_codes"]
        .as_object()
        .map(|codes| {
            codes
                .iter()
                .map(|(code, count)| format!("{code} × {count}"))
                .collect()
        })
        .unwrap_or_default();
    if codes.is_empty() {
        String::new()
    } else {
        format!(" ({})", codes.join(", "))
    }
}

/// `5500000` → `5,500,000`.
pub(crate) fn group(n: usize) -> String {
    let digits = n.to_string();
    let mut grouped = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

/// Idle memory per socket, all three servers.
fn idle_section(
    out: &mut String,
    release: &Path,
    sizes: &[usize],
) -> Result<Vec<(usize, [Value; 3])>, String> {
    let _ = writeln!(out, "\n## Idle sockets\n");
    let _ = writeln!(
        out,
        "| sockets | server | connects/s | server RSS per socket | ÷ baseline | Switchboard target ≤ 6 KiB |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    let per = |r: &Value| num(r, &["rss_per_connection_bytes"]);
    let mut rows = Vec::new();
    for &connections in sizes {
        let runs = each_server(|server| idle(release, server, connections, 256))?;
        for (server, r) in IP_CHAT.iter().zip(&runs) {
            let switchboard = matches!(server, Server::Switchboard(_));
            let _ = writeln!(
                out,
                "| {connections} | {} | {:.0} | {:.2} KiB | {} | {} |",
                server.name(),
                num(r, &["connects_per_sec"]),
                per(r) / 1024.0,
                if *server == Server::Baseline {
                    String::new()
                } else {
                    ratio(per(r), per(&runs[1]))
                },
                if switchboard {
                    Target::AtMost(6.0 * 1024.0).verdict(Some(per(r)).filter(|v| v.is_finite()))
                } else {
                    ""
                }
            );
        }
        rows.push((connections, runs));
    }
    Ok(rows)
}

/// The two target tables: against the pre-encoded yardstick, and the older one against the
/// tokio-tungstenite baseline.
fn targets_section(out: &mut String, m: &Measured) {
    let [ours, base, pre] = [0, 1, 2];
    let _ = writeln!(out, "\n## Targets\n");
    let _ = writeln!(
        out,
        "Against the pre-encoded yardstick (and, for idle memory, the tokio-tungstenite baseline).\n"
    );
    let _ = writeln!(
        out,
        "| figure | switchboard | baseline | pre-encoded | ratio | target | result |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    let mut row = |figure: String, values: [f64; 3], unit: &str, vs: usize, target: Target| {
        let q = quotient(values[ours], values[vs]);
        let (bound, direction) = match target {
            Target::AtMost(b) => (b, "≤"),
            Target::AtLeast(b) => (b, "≥"),
        };
        let vs_name = IP_CHAT[vs].name();
        let _ = writeln!(
            out,
            "| {figure} | {:.0}{unit} | {:.0}{unit} | {:.0}{unit} | {} | {direction} {bound:.2}× {vs_name} | {} |",
            values[ours],
            values[base],
            values[pre],
            q.map_or_else(|| "–".into(), |q| format!("{q:.2}×")),
            target.verdict(q),
        );
    };
    let cpu = |i: usize| m.burst.get(i).map_or(f64::NAN, |b| b.cpu.ns_per_delivery());
    row(
        "CPU per delivery (long − short burst)".into(),
        [cpu(ours), cpu(base), cpu(pre)],
        " ns",
        pre,
        Target::AtMost(1.1),
    );
    let burst_rate = |i: usize| {
        m.burst
            .get(i)
            .map_or(f64::NAN, |b| num(&b.run, &["deliveries_per_sec"]))
    };
    row(
        format!("deliveries/s, {}", burst_label()),
        [burst_rate(ours), burst_rate(base), burst_rate(pre)],
        "",
        pre,
        Target::AtLeast(0.95),
    );
    for FanoutRow {
        label,
        paced,
        in_phase,
        runs,
    } in &m.fanout
    {
        if *in_phase {
            continue;
        }
        let figure = |path: &[&str]| {
            [
                num(&runs[0], path),
                num(&runs[1], path),
                num(&runs[2], path),
            ]
        };
        if *paced {
            row(
                format!("p99 µs, {label}"),
                figure(&["latency_us", "p99"]),
                "",
                pre,
                Target::AtMost(1.1),
            );
        } else {
            row(
                format!("deliveries/s, {label}"),
                figure(&["deliveries_per_sec"]),
                "",
                pre,
                Target::AtLeast(0.95),
            );
        }
    }
    for (sockets, runs) in &m.idle {
        let per = |i: usize| num(&runs[i], &["rss_per_connection_bytes"]);
        row(
            format!("idle bytes per socket, {sockets} sockets"),
            [per(ours), per(base), per(pre)],
            " B",
            base,
            Target::AtMost(1.0),
        );
    }
    let closed: Vec<String> = m
        .burst
        .iter()
        .map(|b| format!("{}", b.run["closed_by_server"]))
        .collect();
    let _ = writeln!(
        out,
        "| subscribers closed, {} | {} | – | none | {} |",
        burst_label(),
        closed.join(" | "),
        if m.burst
            .first()
            .and_then(|b| b.run["closed_by_server"].as_u64())
            == Some(0)
        {
            "pass"
        } else {
            "FAIL"
        }
    );

    let _ = writeln!(out, "\nAgainst the tokio-tungstenite baseline.\n");
    let _ = writeln!(
        out,
        "| run | throughput ratio (target ≥ 0.9×) | CPU/delivery ratio (target ≤ 1.2×) | p99 ratio (target ≤ 2×) |"
    );
    let _ = writeln!(out, "|---|---|---|---|");
    for FanoutRow { label, runs, .. } in &m.fanout {
        let ratio_of =
            |path: &[&str], target| judged(num(&runs[ours], path), num(&runs[base], path), target);
        let _ = writeln!(
            out,
            "| {label} | {} | {} | {} |",
            ratio_of(&["deliveries_per_sec"], Target::AtLeast(0.9)),
            ratio_of(&["server_cpu_per_delivery_us"], Target::AtMost(1.2)),
            ratio_of(&["latency_us", "p99"], Target::AtMost(2.0)),
        );
    }
    if let (Some(o), Some(b)) = (m.burst.get(ours), m.burst.get(base)) {
        let _ = writeln!(
            out,
            "| {} (CPU: long − short) | {} | {} | {} |",
            burst_label(),
            judged(
                num(&o.run, &["deliveries_per_sec"]),
                num(&b.run, &["deliveries_per_sec"]),
                Target::AtLeast(0.9)
            ),
            judged(
                o.cpu.ns_per_delivery(),
                b.cpu.ns_per_delivery(),
                Target::AtMost(1.2)
            ),
            // The baseline drops what does not fit its queue, so its latency covers only the
            // frames it delivered: no fair comparison.
            if b.run["complete"] == Value::Bool(true) {
                judged(
                    num(&o.run, &["latency_us", "p99"]),
                    num(&b.run, &["latency_us", "p99"]),
                    Target::AtMost(2.0),
                )
            } else {
                "– (the baseline dropped frames)".into()
            },
        );
    }
}

/// What 100,000 and 1,000,000 sockets would take, from this run's measured memory per socket.
fn beyond_one_process(per_socket_bytes: f64) -> String {
    let gib = |sockets: f64| sockets * per_socket_bytes / (1024.0 * 1024.0 * 1024.0);
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open").unwrap_or_default();
    let ports =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let port_count = {
        let mut bounds = ports
            .split_whitespace()
            .filter_map(|p| p.parse::<u64>().ok());
        match (bounds.next(), bounds.next()) {
            (Some(low), Some(high)) if high >= low => high - low + 1,
            _ => 28_232,
        }
    };
    format!(
        "\n## Beyond one process\n\n\
         The open-file limit on these machines is 20,000 per process and cannot be raised, so the\n\
         largest single-process run here is ~19,000 sockets. Past the limit the server does not\n\
         crash or spin: accepting fails with `accept error: Too many open files`, logged at error\n\
         level, and is retried after a one-second pause while existing sockets keep being served\n\
         (test `running_out_of_file_descriptors_is_logged_and_survived` in\n\
         `crates/switchboard-cli/tests/binary.rs`).\n\n\
         | sockets | server user-space memory at {per:.2} KiB/socket | what else it needs |\n\
         |---|---|---|\n\
         | 100,000 | {m100k:.2} GiB | `ulimit -n` (soft and hard, e.g. systemd `LimitNOFILE`) above 100,000; `--max-connections 100000`; the load generator spread over ≥ {src100k} source addresses, because one source address reaches one server port from at most {port_count} ephemeral ports (`net.ipv4.ip_local_port_range` is {ports}) |\n\
         | 1,000,000 | {m1m:.2} GiB | `fs.nr_open` (here {nr_open}) and `ulimit -n` above 1,000,000; ≥ {src1m} source addresses or several load machines; kernel socket memory on top (a few KiB per idle TCP socket, bounded by `net.ipv4.tcp_mem`); and fan-out sharded across rooms or nodes: at ~0.5 µs of CPU per delivery one message to a million sockets costs ~0.5 s of CPU, so one 2-core node sustains only a few such broadcasts per second |\n",
        per = per_socket_bytes / 1024.0,
        m100k = gib(100_000.0),
        m1m = gib(1_000_000.0),
        src100k = 100_000u64.div_ceil(port_count),
        src1m = 1_000_000u64.div_ceil(port_count),
        ports = ports.split_whitespace().collect::<Vec<_>>().join("–"),
        nr_open = nr_open.trim(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
    }
}
