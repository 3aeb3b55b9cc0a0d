//! `cargo xtask bench-scale`: one broadcast to more sockets than one process can hold.
//!
//! The open-file limit here is 20,000 per process, so one node holds ~19,000 sockets. This
//! starts 5 ip-chat nodes on one redis-server, 5 listen-only load processes (one per node, each
//! holding 19,000 subscribers from its own pool of loopback addresses), then sends one message
//! on the first node and measures how long every socket took to get it. The result goes into
//! `docs/performance.md` between the markers below, which `cargo xtask bench` keeps when it
//! rewrites the file. Not part of CI: it holds ~95,000 sockets for a minute or two.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::bench::{group, load, machine, num, release_dir, root};
use crate::cluster::{Node, REDIS_PERSISTENCE, Redis, load_average};

const START: &str = "<!-- bench-scale:start -->";
const END: &str = "<!-- bench-scale:end -->";

/// The measured block of `docs/performance.md` as it is now (markers included), or a
/// placeholder with the markers, for `cargo xtask bench` to write back unchanged.
pub(crate) fn kept_measurement() -> String {
    let text = std::fs::read_to_string(root().join("docs/performance.md")).unwrap_or_default();
    let block = match (text.find(START), text.find(END)) {
        (Some(start), Some(end)) if end > start => text[start..end + END.len()].to_owned(),
        _ => format!(
            "{START}\nNot measured yet: `cargo xtask bench-scale` writes its run here.\n{END}"
        ),
    };
    format!("\n{block}\n")
}

/// Options: `--nodes N` (default 5), `--per-node N` sockets (default 19,000), `--no-write`
/// (print the block instead of writing it into the doc).
struct Options {
    nodes: usize,
    per_node: usize,
    write: bool,
}

fn options(args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut options = Options {
        nodes: 5,
        per_node: 19_000,
        write: true,
    };
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|v| *v > 0)
                .ok_or(format!("{name} needs a positive number"))
        };
        match arg.as_str() {
            "--nodes" => options.nodes = value("--nodes")?.min(200),
            "--per-node" => options.per_node = value("--per-node")?,
            "--no-write" => options.write = false,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(options)
}

pub(crate) fn run(args: impl Iterator<Item = String>) -> ExitCode {
    let options = match options(args) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("xtask bench-scale: {e}");
            return ExitCode::from(2);
        }
    };
    if !crate::cargo(&["build", "--release", "-p", "switchboard-cli"]) {
        return ExitCode::FAILURE;
    }
    let block = match measure(&release_dir(), &options) {
        Ok(block) => block,
        Err(e) => {
            eprintln!("xtask bench-scale: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{block}");
    if options.write {
        let path = root().join("docs/performance.md");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let updated = match (text.find(START), text.find(END)) {
            (Some(start), Some(end)) if end > start => {
                format!("{}{block}{}", &text[..start], &text[end + END.len()..])
            }
            _ => format!("{}\n{block}\n", text.trim_end()),
        };
        if let Err(e) = std::fs::write(&path, updated) {
            eprintln!("xtask bench-scale: could not write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        eprintln!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}

/// CPU time in ns summed over every thread of `pid` (`/proc/<pid>/task/*/schedstat`).
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .fold(0u64, u64::saturating_add)
}

/// VmRSS of `pid` in bytes.
fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// Open file descriptors of `pid`.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn today() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn mib(bytes: f64) -> String {
    format!("{:.0} MiB", bytes / 1048576.0)
}

/// One listen-only load process.
struct Listener {
    child: Child,
    ready: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Drop for Listener {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Node CPU (all nodes and Redis) sampled every 20 ms on a thread, to read the CPU the
/// broadcast took once its last delivery's time is known.
struct CpuTrace {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<(u128, u64)>>>,
}

impl CpuTrace {
    fn start(pids: Vec<u32>) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            // Bounded: at most 10 minutes of samples.
            for _ in 0..30_000 {
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let cpu = pids.iter().map(|p| cpu_ns(*p)).fold(0, u64::saturating_add);
                samples.push((unix_ns(), cpu));
                std::thread::sleep(Duration::from_millis(20));
            }
            samples
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<(u128, u64)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

/// The first line of `path` that looks like an error or warning, for the report.
fn first_problem(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find(|l| l.contains("ERROR") || l.contains("WARN") || l.contains("error"))
        .map(|l| l.chars().take(300).collect())
}

/// What one broadcast to the sockets held on some nodes measured.
struct Broadcast {
    /// Per node: sockets held, open files, RSS before connecting and with every socket open.
    held: Vec<u64>,
    fds: Vec<usize>,
    rss_before: Vec<u64>,
    rss_after: Vec<u64>,
    /// Redis's RSS before and with every socket open, when there is a Redis.
    redis_rss: Option<(u64, u64)>,
    connect_secs: f64,
    load_before: String,
    load_connected: String,
    /// Sockets that got the broadcast, and its latency percentiles in µs.
    reached: usize,
    p50: f64,
    p99: f64,
    max: f64,
    /// CPU of every node (and Redis) from the send to the last delivery.
    cpu_ms: Option<f64>,
    /// The first error each node logged and each load process could not connect with.
    problems: Vec<String>,
    sender_error: Option<String>,
}

impl Broadcast {
    fn total_held(&self) -> u64 {
        self.held.iter().sum()
    }

    /// RSS growth per socket over every node.
    fn growth_per_socket(&self) -> f64 {
        let after: u64 = self.rss_after.iter().sum();
        let before: u64 = self.rss_before.iter().sum();
        after.saturating_sub(before) as f64 / self.total_held().max(1) as f64
    }

    fn cpu_per_socket_us(&self) -> Option<f64> {
        self.cpu_ms
            .map(|ms| ms * 1000.0 / self.reached.max(1) as f64)
            .filter(|v| v.is_finite())
    }
}

/// Holds `per_node` listen-only subscribers on each node (one load process per node), sends
/// one message on the first node, and measures who got it when.
fn broadcast(
    release: &Path,
    work: &Path,
    nodes: &[Node],
    node_logs: &[PathBuf],
    redis: Option<&Redis>,
    per_node: usize,
) -> Result<Broadcast, String> {
    let load_before = load_average();
    let rss_before: Vec<u64> = nodes.iter().map(|n| rss_bytes(n.pid())).collect();
    let redis_rss_before = redis.map(|r| rss_bytes(r.pid()));
    eprintln!(
        "  {} listeners × {per_node} sockets connecting",
        nodes.len()
    );
    let stamp = unix_ns() / 1_000_000;
    let run_id = format!("scale{stamp}");
    let connect_started = Instant::now();
    let mut listeners = Vec::with_capacity(nodes.len());
    for (k, node) in nodes.iter().enumerate() {
        let ready = work.join(format!("ready-{stamp}-{k}.json"));
        let stdout = work.join(format!("listen-{stamp}-{k}.out"));
        let stderr = work.join(format!("listen-{stamp}-{k}.err"));
        let file = |p: &Path| std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()));
        let child = Command::new(release.join("switchboard"))
            .args(["bench", "fanout", "--url", &node.url()])
            .args(["--subscribers", &per_node.to_string()])
            .args(["--senders", "0", "--messages", "1", "--run-id", &run_id])
            // Pools 10.. are nobody else's (senders 2, idle 3, reqack 4).
            .args(["--source-pool", &(10 + k).to_string()])
            .arg("--ready-file")
            .arg(&ready)
            // Held 15 s after this process's last delivery, so no process closes its
            // sockets while another is still getting the broadcast (and the CPU window below
            // holds the broadcast only).
            .args(["--latency-samples", "--timeout", "300s", "--hold", "15s"])
            .env("RUST_LOG", "warn")
            .stdout(file(&stdout)?)
            .stderr(file(&stderr)?)
            .spawn()
            .map_err(|e| format!("could not start a load process: {e}"))?;
        listeners.push(Listener {
            child,
            ready,
            stdout,
            stderr,
        });
    }

    // Every listener ready (or gone), within 5 minutes.
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut ready: Vec<Option<Value>> = vec![None; listeners.len()];
    loop {
        let mut pending = 0;
        for (k, listener) in listeners.iter_mut().enumerate() {
            if ready[k].is_some() {
                continue;
            }
            if let Ok(text) = std::fs::read_to_string(&listener.ready) {
                ready[k] = serde_json::from_str(&text).ok();
                continue;
            }
            if !matches!(listener.child.try_wait(), Ok(None)) {
                ready[k] = Some(serde_json::json!({
                    "connected": 0,
                    "exited": true,
                    "first_connect_error": first_problem(&listener.stderr)
                        .or_else(|| std::fs::read_to_string(&listener.stderr).ok()),
                }));
                continue;
            }
            pending += 1;
        }
        if pending == 0 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{pending} load processes never got connected in 300 s"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let connect_secs = connect_started.elapsed().as_secs_f64();
    // Let the nodes settle (their allocators return what connecting needed).
    std::thread::sleep(Duration::from_secs(2));
    let load_connected = load_average();
    let rss_after: Vec<u64> = nodes.iter().map(|n| rss_bytes(n.pid())).collect();
    let fds_now: Vec<usize> = nodes.iter().map(|n| fds(n.pid())).collect();
    let redis_rss_after = redis.map(|r| rss_bytes(r.pid()));
    let held: Vec<u64> = ready
        .iter()
        .map(|r| r.as_ref().map_or(0.0, |r| num(r, &["connected"])) as u64)
        .collect();
    eprintln!(
        "  {} sockets held after {connect_secs:.1} s; broadcasting",
        held.iter().sum::<u64>()
    );

    let mut pids: Vec<u32> = nodes.iter().map(Node::pid).collect();
    pids.extend(redis.map(Redis::pid));
    let trace = CpuTrace::start(pids);
    std::thread::sleep(Duration::from_millis(100));
    let first = nodes.first().ok_or("no node")?;
    let sender = load(
        release,
        &[
            "fanout",
            "--url",
            &first.url(),
            "--subscribers",
            "0",
            "--senders",
            "1",
            "--messages",
            "1",
            "--run-id",
            &run_id,
            "--timeout",
            "120s",
        ]
        .map(str::to_owned),
    );

    // Every listener done, within their own 300 s bound and a margin.
    let deadline = Instant::now() + Duration::from_secs(350);
    for listener in &mut listeners {
        while matches!(listener.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let cpu_trace = trace.finish();
    let reports: Vec<Value> = listeners
        .iter()
        .map(|l| {
            std::fs::read_to_string(&l.stdout)
                .ok()
                .and_then(|text| {
                    text.lines()
                        .find(|l| l.starts_with("{\"bench\""))
                        .and_then(|l| serde_json::from_str::<Value>(l).ok())
                })
                .map_or(Value::Null, |v| v["report"].clone())
        })
        .collect();
    let mut samples: Vec<f64> = reports
        .iter()
        .filter_map(|r| r["latency_samples_us"].as_array())
        .flatten()
        .filter_map(Value::as_f64)
        .collect();
    samples.sort_by(f64::total_cmp);
    let rank = |q: f64| {
        if samples.is_empty() {
            f64::NAN
        } else {
            let index = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[index]
        }
    };
    // CPU from the last sample before the message was sent to the first after the last
    // delivery (every process holds its sockets for a while after that).
    let stamp_of = |key: &str| {
        reports
            .iter()
            .filter_map(|r| r[key].as_u64())
            .map(u128::from)
            .collect::<Vec<_>>()
    };
    let sent_at = stamp_of("first_sent_unix_ns").into_iter().min();
    let last_delivery = stamp_of("last_delivery_unix_ns").into_iter().max();
    let before = sent_at.and_then(|at| cpu_trace.iter().rev().find(|(t, _)| *t <= at));
    let after = last_delivery.and_then(|at| cpu_trace.iter().find(|(t, _)| *t >= at));
    let cpu_ms = before
        .zip(after)
        .map(|((_, b), (_, a))| a.saturating_sub(*b) as f64 / 1e6);
    let problems = node_logs
        .iter()
        .enumerate()
        .filter_map(|(k, log)| first_problem(log).map(|p| format!("node {}: {p}", k + 1)))
        .chain(ready.iter().enumerate().filter_map(|(k, r)| {
            r.as_ref()
                .and_then(|r| r["first_connect_error"].as_str().map(str::to_owned))
                .map(|e| format!("load process {}: {e}", k + 1))
        }))
        .collect();
    Ok(Broadcast {
        held,
        fds: fds_now,
        rss_before,
        rss_after,
        redis_rss: redis_rss_before.zip(redis_rss_after),
        connect_secs,
        load_before,
        load_connected,
        reached: samples.len(),
        p50: rank(0.5),
        p99: rank(0.99),
        max: rank(1.0),
        cpu_ms,
        problems,
        sender_error: sender.err(),
    })
}

fn measure(release: &Path, options: &Options) -> Result<String, String> {
    let work = std::env::temp_dir().join(format!("switchboard-bench-scale-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let max_connections = (options.per_node + 1_000).to_string();
    let flags = ["--max-connections", max_connections.as_str()];

    // The cluster.
    let redis = Redis::start()?.ok_or("redis-server is not installed")?;
    let cluster_name = format!("scale-{}", unix_ns() / 1_000_000);
    let url = redis.url();
    let logs: Vec<PathBuf> = (0..options.nodes)
        .map(|k| work.join(format!("node-{k}.log")))
        .collect();
    let nodes = logs
        .iter()
        .map(|log| {
            Node::start(
                release,
                "ip-chat",
                Some((&url, &cluster_name)),
                &flags,
                Some(log),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    eprintln!("  {} nodes ready", nodes.len());
    let cluster = broadcast(
        release,
        &work,
        &nodes,
        &logs,
        Some(&redis),
        options.per_node,
    )?;
    drop(nodes);
    drop(redis);

    // The same broadcast to one node's share, on one node alone (in-memory engine).
    let log = work.join("single.log");
    let node = Node::start(release, "ip-chat", None, &flags, Some(&log))?;
    let single = broadcast(
        release,
        &work,
        std::slice::from_ref(&node),
        std::slice::from_ref(&log),
        None,
        options.per_node,
    )?;
    drop(node);
    let _ = std::fs::remove_dir_all(&work);
    Ok(render(options, &max_connections, &cluster, &single))
}

fn render(
    options: &Options,
    max_connections: &str,
    cluster: &Broadcast,
    single: &Broadcast,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{START}\n### Measured: {} nodes on one Redis, one broadcast\n",
        options.nodes
    );
    let _ = writeln!(
        out,
        "`cargo xtask bench-scale`, run once on {} ({}; load average {} before connecting, {}\n\
         with every socket open: other work was running on the machine). {n} `switchboard serve\n\
         --protocol ip-chat --engine redis://... --max-connections {max_connections}` release\n\
         nodes and one redis-server ({REDIS_PERSISTENCE}); {n} `switchboard bench fanout\n\
         --senders 0` load processes, each capped at 20,000 open files like the nodes and aimed\n\
         at one node, each holding {} subscribers from its own pool of loopback source\n\
         addresses (no per-IP limit needed raising: every subscriber has its own address, and\n\
         per-IP limits are per node). Then one `send_message` on the first node: one append and\n\
         one `PUBLISH` in Redis, which sends it to each node's subscriber connection once ({n}\n\
         copies, not one per socket), and every node writes it to its own sockets. Last row: the\n\
         same broadcast to one node's share of sockets on one node alone (in-memory engine), in\n\
         the same run.\n",
        today(),
        machine(),
        cluster.load_before,
        cluster.load_connected,
        group(options.per_node),
        n = options.nodes,
    );
    let _ = writeln!(
        out,
        "| node | sockets held | open files | RSS before | RSS with sockets | RSS ÷ sockets | (RSS − before) ÷ sockets |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for k in 0..cluster.held.len() {
        let held = cluster.held[k].max(1) as f64;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.2} KiB | {:.2} KiB |",
            k + 1,
            group(cluster.held[k] as usize),
            group(cluster.fds[k]),
            mib(cluster.rss_before[k] as f64),
            mib(cluster.rss_after[k] as f64),
            cluster.rss_after[k] as f64 / held / 1024.0,
            cluster.rss_after[k].saturating_sub(cluster.rss_before[k]) as f64 / held / 1024.0,
        );
    }
    let total_after: u64 = cluster.rss_after.iter().sum();
    let total_before: u64 = cluster.rss_before.iter().sum();
    let _ = writeln!(
        out,
        "| all | {} | {} | {} | {} | {:.2} KiB | {:.2} KiB |",
        group(cluster.total_held() as usize),
        group(cluster.fds.iter().sum()),
        mib(total_before as f64),
        mib(total_after as f64),
        total_after as f64 / cluster.total_held().max(1) as f64 / 1024.0,
        cluster.growth_per_socket() / 1024.0,
    );
    if let Some((before, after)) = cluster.redis_rss {
        let _ = writeln!(
            out,
            "\nRedis's RSS: {} before, {} with every socket open. Connecting took {:.1} s\n\
             (all load processes at once, 256 connects in flight each).\n",
            mib(before as f64),
            mib(after as f64),
            cluster.connect_secs,
        );
    }
    let _ = writeln!(
        out,
        "| setup | sockets held | got the broadcast | time until every socket had it | p50 latency | p99 latency | CPU of the broadcast | CPU per socket |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for (setup, b) in [
        (format!("{} nodes + Redis", options.nodes), cluster),
        ("one node, in memory".to_owned(), single),
    ] {
        let _ = writeln!(
            out,
            "| {setup} | {} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {} | {} |",
            group(b.total_held() as usize),
            group(b.reached),
            b.max / 1000.0,
            b.p50 / 1000.0,
            b.p99 / 1000.0,
            b.cpu_ms
                .map_or_else(|| "–".to_owned(), |ms| format!("{ms:.0} ms")),
            b.cpu_per_socket_us()
                .map_or_else(|| "–".to_owned(), |us| format!("{us:.1} µs")),
        );
    }
    let _ = writeln!(
        out,
        "\nCPU of the broadcast: every node's CPU (and Redis's), sampled every 20 ms, from the\n\
         sample before the message was sent to the first after the last socket had it. Almost\n\
         all of it is the kernel's: one `send` per socket, which on loopback also runs the\n\
         receiving side's TCP work in the sender's time, so it is the same per socket on one\n\
         node and on the cluster. The load processes reading every socket (and any other work\n\
         on the machine) share the same 2 cores, so the wall time is longer than the nodes' CPU."
    );
    let target = (options.nodes * options.per_node) as u64;
    for (setup, b, expected) in [
        ("the cluster", cluster, target),
        ("the single node", single, options.per_node as u64),
    ] {
        if b.total_held() < expected
            || (b.reached as u64) < b.total_held()
            || b.sender_error.is_some()
        {
            let _ = writeln!(
                out,
                "\nNot every socket was reached on {setup}: {} of {} held, {} of those got the broadcast{}.",
                group(b.total_held() as usize),
                group(expected as usize),
                group(b.reached),
                b.sender_error
                    .as_ref()
                    .map_or_else(String::new, |e| format!("; the sending run failed: {e}")),
            );
        }
        if !b.problems.is_empty() {
            let _ = writeln!(out, "\nWhat the processes of {setup} reported:\n");
            for problem in b.problems.iter().take(12) {
                let _ = writeln!(out, "- `{}`", problem.replace('`', "'"));
            }
        }
    }
    let per_socket = cluster.growth_per_socket().max(0.0);
    let million_gib = per_socket * 1e6 / (1024.0 * 1024.0 * 1024.0);
    let at_cap = 1_000_000usize.div_ceil(options.per_node);
    let cpu = cluster.cpu_per_socket_us();
    let _ = writeln!(
        out,
        "\nWhat 1,000,000 sockets would take, from this run: {at_cap} nodes of {} sockets (this\n\
         machine's 20,000 open files per process), or e.g. 10 nodes of 100,000 with the open-file\n\
         limit raised (see above); node memory {million_gib:.1} GiB in all at {:.2} KiB per socket\n\
         (the growth measured here), plus each node's base ({} here) and the kernel's socket\n\
         buffers; and enough load-generating source addresses or machines (see above). Redis's\n\
         part of a broadcast does not grow with sockets: one append and one `PUBLISH` per\n\
         message, copied once to each subscribed node ({at_cap} or 10 copies), so one Redis\n\
         carries the fan-out of a million-socket room. The per-socket work is the nodes': {}.\n{END}",
        group(options.per_node),
        per_socket / 1024.0,
        mib(total_before as f64 / options.nodes.max(1) as f64),
        cpu.map_or_else(
            || "about 20 µs of CPU per socket for one message on this machine, so ~20 s of CPU per broadcast to 1,000,000 sockets, spread over the nodes' cores".to_owned(),
            |us| format!(
                "{us:.1} µs of CPU per socket reached in this run, so one broadcast to 1,000,000 \
                 sockets costs ~{us:.0} s of CPU, spread over the nodes' cores (a rate of broadcasts \
                 to such a room is bounded by cores ÷ that)"
            )
        ),
    );
    out
}
