//! The cluster rows of `cargo xtask bench`: the same loads on three `switchboard serve` nodes
//! sharing one redis-server (started here, on a free port), next to one node in the same run.
//! Also the pieces `cargo xtask bench-scale` starts its cluster with.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::bench::{
    close_codes, free_port, group, http_get, load, median_by_throughput, num, ratio, stop,
    wait_listening,
};

/// How Redis persists, stated in the doc next to the figures.
pub(crate) const REDIS_PERSISTENCE: &str = "`appendonly yes`, `appendfsync everysec`";

/// A redis-server on a free loopback port with a fresh directory, stopped (and its directory
/// removed) on drop.
pub(crate) struct Redis {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Redis {
    /// Starts one; `Ok(None)` when `redis-server` is not installed.
    pub(crate) fn start() -> Result<Option<Self>, String> {
        let installed = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            return Ok(None);
        }
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("switchboard-bench-redis-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("could not create {}: {e}", dir.display()))?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--appendonly", "yes", "--appendfsync", "everysec"])
            .args(["--save", "", "--daemonize", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("could not start redis-server: {e}"))?;
        let redis = Self { child, port, dir };
        wait_listening(SocketAddr::from(([127, 0, 0, 1], port)))?;
        Ok(Some(redis))
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        stop(&mut self.child);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One `switchboard serve` process, stopped on drop.
pub(crate) struct Node {
    child: Child,
    pub(crate) addr: SocketAddr,
}

impl Node {
    /// Starts `switchboard serve --protocol <protocol>` on a free port, on `engine` (a Redis
    /// URL and cluster name) or alone in memory, with `extra` flags; waits until `/readyz`
    /// answers 200. `log`: where its stderr goes (else nowhere).
    pub(crate) fn start(
        release: &Path,
        protocol: &str,
        engine: Option<(&str, &str)>,
        extra: &[&str],
        log: Option<&Path>,
    ) -> Result<Self, String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut command = Command::new(release.join("switchboard"));
        command.args([
            "serve",
            "--protocol",
            protocol,
            "--listen",
            &addr.to_string(),
        ]);
        if let Some((url, cluster)) = engine {
            command.args(["--engine", url, "--cluster-name", cluster]);
        }
        command
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null());
        match log {
            Some(path) => {
                let file = std::fs::File::create(path)
                    .map_err(|e| format!("could not create {}: {e}", path.display()))?;
                command.stderr(file);
            }
            None => {
                command.stderr(Stdio::null());
            }
        }
        let child = command
            .spawn()
            .map_err(|e| format!("could not start a node: {e}"))?;
        let node = Self { child, addr };
        node.wait_ready(Duration::from_secs(20))?;
        Ok(node)
    }

    pub(crate) fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_ready(&self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        while readyz(self.addr) != Some(200) {
            if Instant::now() > deadline {
                return Err(format!("node {} never became ready", self.addr));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// The status code of `GET /readyz`, or `None` when nothing answers.
fn readyz(addr: SocketAddr) -> Option<u16> {
    http_get(addr, "/readyz").ok().map(|(status, _)| status)
}

/// A fresh cluster name for every cluster started on the one Redis of a bench run, so no run
/// sees another's history or rate-limit windows.
pub(crate) fn cluster_name(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(1);
    format!("{prefix}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// `n` nodes of a fresh cluster on `redis`.
fn start_cluster(
    release: &Path,
    redis: &Redis,
    protocol: &str,
    n: usize,
    extra: &[&str],
) -> Result<Vec<Node>, String> {
    let cluster = cluster_name("bench");
    let url = redis.url();
    (0..n)
        .map(|_| Node::start(release, protocol, Some((&url, &cluster)), extra, None))
        .collect()
}

/// `/proc/loadavg`'s three load averages, e.g. `3.96 3.44 2.62`.
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// What the single-node rows of the same bench run measured, to put beside the cluster's.
pub(crate) struct OneNode {
    /// The median one-node run of `fanout_subscribers` subscribers × 500 messages.
    pub(crate) fanout: Value,
    pub(crate) fanout_subscribers: usize,
    /// The one-node reqack run.
    pub(crate) reqack: Value,
    pub(crate) reqack_users: usize,
    pub(crate) reqack_messages: usize,
}

/// Nodes in the cluster rows.
const NODES: usize = 3;
/// Flags every node of these rows gets, as the one-node rows (`Flags::Roomy`).
const ROOMY: [&str; 2] = ["--max-connections", "20000"];

/// `--url` for every node, then `--pid` for every node and for Redis.
fn target_args(nodes: &[Node], redis: Option<&Redis>) -> Vec<String> {
    let mut args = Vec::new();
    for node in nodes {
        args.extend(["--url".to_owned(), node.url()]);
    }
    for pid in nodes.iter().map(Node::pid).chain(redis.map(Redis::pid)) {
        args.extend(["--pid".to_owned(), pid.to_string()]);
    }
    args
}

/// The cluster section: fan-out, reqack and the cost of one publish, 3 nodes + Redis beside
/// one node. Without redis-server the section says so and the bench goes on.
pub(crate) fn section(
    out: &mut String,
    release: &Path,
    quick: bool,
    one: &OneNode,
) -> Result<(), String> {
    let _ = writeln!(out, "\n## Cluster: {NODES} nodes on one Redis\n");
    let Some(redis) = Redis::start()? else {
        eprintln!("xtask bench: redis-server is not installed: SKIPPED the cluster rows");
        let _ = writeln!(
            out,
            "Not measured: redis-server was not installed when this file was written.\n"
        );
        return Ok(());
    };
    let started = Instant::now();
    let _ = writeln!(
        out,
        "{NODES} `switchboard serve --engine redis://... --cluster-name bench-N` processes (release\n\
         builds, `--max-connections 20000` like the one-node rows) and one redis-server ({}),\n\
         all on this machine's {} cores together with the load generator; a fresh cluster name\n\
         for every run. Sockets are spread over the nodes in turn (`switchboard bench fanout\n\
         --url A --url B --url C`), so most deliveries cross Redis: a message is appended and\n\
         `PUBLISH`ed once by the node it was sent on, and every node delivers it to its own\n\
         sockets. CPU is summed over the {NODES} nodes and redis-server (every thread, from\n\
         /proc/<pid>/task/*/schedstat, as for one server). The one-node figures are this run's\n\
         rows above (in-memory engine). Load average when these rows started: {}.\n",
        REDIS_PERSISTENCE,
        std::thread::available_parallelism().map_or(0, usize::from),
        load_average(),
    );
    fanout_rows(out, release, &redis, quick, one)?;
    reqack_rows(out, release, &redis, one)?;
    publish_rows(out, release, &redis, quick)?;
    eprintln!(
        "  cluster rows took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `(CPU µs/delivery, Redis's share of it)` from a run whose last pid was Redis's.
fn cpu_split(run: &Value, per: f64) -> (String, String) {
    let per_unit = |ns: f64| {
        if per > 0.0 && ns.is_finite() {
            format!("{:.2}", ns / 1000.0 / per)
        } else {
            "–".into()
        }
    };
    let redis_ns = run["server_cpu_ns_each"]
        .as_array()
        .filter(|each| each.len() > 1)
        .and_then(|each| each.last())
        .and_then(Value::as_f64);
    (
        per_unit(num(run, &["server_cpu_ns"])),
        redis_ns.map_or_else(|| "–".into(), per_unit),
    )
}

fn fanout_rows(
    out: &mut String,
    release: &Path,
    redis: &Redis,
    quick: bool,
    one: &OneNode,
) -> Result<(), String> {
    let subscribers = one.fanout_subscribers;
    let runs = if quick { 1 } else { 3 };
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let nodes = start_cluster(release, redis, "ip-chat", NODES, &ROOMY)?;
        let mut args: Vec<String> = vec!["fanout".into()];
        args.extend(target_args(&nodes, Some(redis)));
        args.extend([
            "--subscribers".into(),
            subscribers.to_string(),
            "--messages".into(),
            "500".into(),
        ]);
        samples.push(load(release, &args)?);
    }
    let cluster = median_by_throughput(samples);
    let _ = writeln!(
        out,
        "### ip-chat fan-out\n\n{} subscribers × 500 messages from the load tool's default senders (the\n\
         one-node row of \"ip-chat fan-out\" above){}. CPU µs/delivery: every process's CPU\n\
         over the run ÷ deliveries to subscribers (the window also holds the subscribers closing).\n",
        group(subscribers),
        if runs > 1 {
            format!("; the cluster row is the median of {runs} runs by throughput")
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        out,
        "| setup | deliveries/s | p50 µs | p99 µs | max µs | CPU µs/delivery | of which Redis | subscribers closed | complete | runs (deliveries/s) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    for (setup, r) in [
        ("one node (in memory)", &one.fanout),
        ("3 nodes + Redis", &cluster),
    ] {
        let (cpu, redis_cpu) = cpu_split(r, num(r, &["deliveries"]));
        let _ = writeln!(
            out,
            "| {setup} | {:.0} | {:.0} | {:.0} | {:.0} | {cpu} | {redis_cpu} | {}{} | {} | {} |",
            num(r, &["deliveries_per_sec"]),
            num(r, &["latency_us", "p50"]),
            num(r, &["latency_us", "p99"]),
            num(r, &["latency_us", "max"]),
            r["closed_by_server"],
            close_codes(r),
            r["complete"],
            r["samples"].as_str().unwrap_or(""),
        );
    }
    let _ = writeln!(
        out,
        "\nCluster ÷ one node: throughput {}, CPU per delivery {}.",
        ratio(
            num(&cluster, &["deliveries_per_sec"]),
            num(&one.fanout, &["deliveries_per_sec"])
        ),
        ratio(
            num(&cluster, &["server_cpu_per_delivery_us"]),
            num(&one.fanout, &["server_cpu_per_delivery_us"])
        ),
    );
    let _ = writeln!(
        out,
        "\nWhy the cluster is slower: a node reads a socket's next message only after the previous\n\
         one is stored, and storing is now a script run in Redis, a round trip, instead of a write\n\
         to memory; so each sender's messages, and the broadcasts with them, come at a fraction of\n\
         the one-node rate (the latency is mostly messages waiting in their sender's socket). They\n\
         also reach the nodes spread out rather than in one burst, so each node writes few frames\n\
         per `send` to a socket: CPU per delivery is then near that of the one-node micro-burst\n\
         row above (a few frames per `send`), not of a burst (Redis's share is in its own column)."
    );
    Ok(())
}

fn reqack_rows(
    out: &mut String,
    release: &Path,
    redis: &Redis,
    one: &OneNode,
) -> Result<(), String> {
    let nodes = start_cluster(release, redis, "reqack", NODES, &ROOMY)?;
    let mut args: Vec<String> = vec!["reqack".into()];
    for node in &nodes {
        args.extend(["--url".to_owned(), node.url()]);
    }
    args.extend([
        "--users".into(),
        one.reqack_users.to_string(),
        "--messages".into(),
        one.reqack_messages.to_string(),
    ]);
    let cluster = load(release, &args)?;
    drop(nodes);
    let _ = writeln!(
        out,
        "\n### reqack across nodes\n\n\
         The reqack row above ({} users × {} messages, each a request, its response and an event\n\
         to ack) with the users spread over the {NODES} nodes in turn: user i writes to user i + 1,\n\
         so the producer of an event is on another node than its recipient ({} of {} pairs; the\n\
         last user's partner, user 0, can share its node). Each request is appended through\n\
         Redis and its event reaches the recipient's node by `PUBLISH`; a request's response\n\
         waits for its writes to Redis (each a script, a round trip) where one node writes memory.\n",
        one.reqack_users, one.reqack_messages, cluster["cross_node_pairs"], one.reqack_users,
    );
    let _ = writeln!(
        out,
        "| setup | request p50 µs | p99 µs | events/s | requests refused | duplicates after ack | missing | exactly once |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for (setup, r) in [
        ("one node (in memory)", &one.reqack),
        ("3 nodes + Redis", &cluster),
    ] {
        let _ = writeln!(
            out,
            "| {setup} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} |",
            num(r, &["request_latency_us", "p50"]),
            num(r, &["request_latency_us", "p99"]),
            num(r, &["events_per_sec"]),
            r["errors"],
            r["duplicates"],
            r["missing"],
            r["exactly_once"],
        );
    }
    Ok(())
}

/// One paced sender, one subscriber: on one node, and on two nodes of a cluster (the
/// subscriber on the first, the sender on the second), so every message is one append and one
/// `PUBLISH` through Redis and one delivery from the channel.
fn publish_rows(
    out: &mut String,
    release: &Path,
    redis: &Redis,
    quick: bool,
) -> Result<(), String> {
    let (messages, rate, runs) = if quick {
        (200, 500, 1)
    } else {
        (1_000, 500, 3)
    };
    // One sender at 500 messages/s is far past ip-chat's 60 per minute per client.
    let flags = ["--max-connections", "20000", "--ip-chat-rate-limit", "0"];
    let mut one_runs = Vec::new();
    let mut cluster_runs = Vec::new();
    for _ in 0..runs {
        let node = Node::start(release, "ip-chat", None, &flags, None)?;
        one_runs.push(publish_once(
            release,
            std::slice::from_ref(&node),
            None,
            messages,
            rate,
        )?);
        drop(node);
        let nodes = start_cluster(release, redis, "ip-chat", 2, &flags)?;
        cluster_runs.push(publish_once(release, &nodes, Some(redis), messages, rate)?);
    }
    let median = |mut runs: Vec<Value>| {
        runs.sort_by(|a, b| {
            num(a, &["latency_us", "p50"]).total_cmp(&num(b, &["latency_us", "p50"]))
        });
        let middle = runs.len() / 2;
        runs.swap_remove(middle)
    };
    let (one, cluster) = (median(one_runs), median(cluster_runs));
    let _ = writeln!(
        out,
        "\n### One publish through Redis\n\n\
         One sender sends {} messages at {rate} per second (nodes started with\n\
         `--ip-chat-rate-limit 0`) to one subscriber: on one node, and with the subscriber on one\n\
         node of a 2-node cluster and the sender on the other, so each message is one append\n\
         script and one `PUBLISH` in Redis and one delivery from the channel{}. CPU per message:\n\
         every process's CPU over the run (both nodes and Redis; the window also holds the\n\
         subscriber closing and the processes' idle work: heartbeats, Redis's timers) ÷ messages;\n\
         the sender's own copy of each broadcast is a second delivery on its node.\n",
        group(messages),
        if runs > 1 {
            format!("; median of {runs} runs by p50")
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        out,
        "| setup | p50 µs | p99 µs | max µs | CPU µs/message | of which Redis | complete |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for (setup, r) in [
        ("one node (in memory)", &one),
        ("sender and subscriber on 2 nodes + Redis", &cluster),
    ] {
        let (cpu, redis_cpu) = cpu_split(r, messages as f64);
        let _ = writeln!(
            out,
            "| {setup} | {:.0} | {:.0} | {:.0} | {cpu} | {redis_cpu} | {} |",
            num(r, &["latency_us", "p50"]),
            num(r, &["latency_us", "p99"]),
            num(r, &["latency_us", "max"]),
            r["complete"],
        );
    }
    Ok(())
}

fn publish_once(
    release: &Path,
    nodes: &[Node],
    redis: Option<&Redis>,
    messages: usize,
    rate: usize,
) -> Result<Value, String> {
    let mut args: Vec<String> = vec!["fanout".into()];
    args.extend(target_args(nodes, redis));
    args.extend(
        [
            "--subscribers",
            "1",
            "--senders",
            "1",
            "--messages",
            &messages.to_string(),
            "--rate",
            &rate.to_string(),
        ]
        .map(str::to_owned),
    );
    load(release, &args)
}
