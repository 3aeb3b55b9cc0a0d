//! `switchboard bench`: load-test a running server (fan-out, idle sockets, reqack), and replay
//! the attacks listed in docs/hardening.md against it (`attack --row N`).
#![allow(clippy::print_stdout, reason = "the report is the command's output")]

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use serde::Serialize;
use switchboard_bench::{ClientTls, Target, attack, fanout, idle, reqack};

use crate::CliError;
use crate::runtime::parse_duration;

/// `switchboard bench` commands.
#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// N subscribers and S senders on ip-chat: deliveries/s, latency, completeness.
    Fanout(Box<FanoutArgs>),
    /// Hold N idle sockets: connect rate and server memory per connection.
    Idle(IdleArgs),
    /// reqack users exchanging messages: request latency, event throughput, exactly-once.
    Reqack(ReqackArgs),
    /// One row of the attacks listed in docs/hardening.md: server RSS against its documented bound, a
    /// bystander's latency, the row's checks. Exits 1 if a bound fails.
    Attack(AttackArgs),
}

#[derive(Debug, Args)]
pub(crate) struct AttackArgs {
    /// The row, 1 to 13, or 0 for the legitimate load (see docs/hardening.md).
    #[arg(long)]
    row: u8,
    /// Protocol the server runs (default: the row's; row 12 runs against any).
    #[arg(long)]
    protocol: Option<String>,
    /// Any WebSocket URL of the server on 127.0.0.0/8 (only its address is used).
    #[arg(long, default_value = "ws://127.0.0.1:8000/ws")]
    url: String,
    /// Server pid, to read its resident memory (required for the memory check).
    #[arg(long)]
    pid: Option<u32>,
}

#[derive(Debug, Args)]
pub(crate) struct FanoutArgs {
    /// Protocol under test (only ip-chat has a broadcast room).
    #[arg(long, default_value = "ip-chat", value_parser = ["ip-chat"])]
    protocol: String,
    /// WebSocket URL on 127.0.0.0/8. Repeat it for the nodes of a cluster: the sockets go to
    /// them in turn (subscribers first, then senders).
    #[arg(long = "url", default_value = "ws://127.0.0.1:8000/ws")]
    urls: Vec<String>,
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// Senders, each on its own loopback address (default: enough to stay within 60 messages
    /// per sender per minute). 0 only listens: the subscribers wait for --messages messages
    /// of --run-id sent by another `bench fanout`, e.g. one broadcast to sockets held by
    /// several processes.
    #[arg(long)]
    senders: Option<usize>,
    /// Messages in total, shared among the senders (with --senders 0: messages each
    /// subscriber waits for).
    #[arg(long, default_value_t = 500)]
    messages: usize,
    /// Messages each sender sends (instead of --messages: the total is senders × this, e.g.
    /// `--senders 100 --messages-per-sender 50` for a 5,000-message burst).
    #[arg(long, conflicts_with = "messages", requires = "senders")]
    messages_per_sender: Option<usize>,
    /// Messages per second across all senders (default: as fast as possible). The senders take
    /// turns: the server sees a steady stream.
    #[arg(long)]
    rate: Option<f64>,
    /// With --rate: every sender sends at the same instants, so the server gets a burst of one
    /// message per sender every senders/rate seconds.
    #[arg(long, requires = "rate")]
    in_phase: bool,
    /// Server pid, to measure its CPU per delivery (nanoseconds from /proc schedstat). Repeat
    /// it for every process that serves the run (each node, the Redis they share): their CPU
    /// is summed.
    #[arg(long = "pid")]
    pids: Vec<u32>,
    /// Bound on waiting for deliveries after the last send (with --senders 0: after every
    /// socket is connected).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    timeout: Duration,
    /// The run id written into every message (ASCII letters, digits, `-`, `_`; default: a
    /// fresh one): give a sending run and listen-only runs the same id.
    #[arg(long, value_parser = parse_run_id)]
    run_id: Option<String>,
    /// Subscribers connect from `127.<pool>.x.y` (senders use pool 2, idle 3, reqack 4):
    /// processes that each hold many sockets on the same node need different pools.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..))]
    source_pool: u8,
    /// Once every socket is connected, write a JSON line here (subscribers connected,
    /// connect failures).
    #[arg(long)]
    ready_file: Option<std::path::PathBuf>,
    /// Put every latency sample in the JSON report (to merge several processes' percentiles).
    #[arg(long)]
    latency_samples: bool,
    /// With --senders 0: keep the sockets open this long after the last one got its
    /// messages, e.g. 10s, so closing them does not overlap what other processes still get.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    hold: Duration,
    /// Verify wss:// servers with the CA certificates in this PEM file instead of the system's
    /// roots (e.g. a self-signed test certificate).
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
}

fn parse_run_id(id: &str) -> Result<String, String> {
    if fanout::valid_run_id(id) {
        Ok(id.to_owned())
    } else {
        Err("1 to 64 ASCII letters, digits, `-` or `_`".to_owned())
    }
}

#[derive(Debug, Args)]
pub(crate) struct IdleArgs {
    /// WebSocket URL on 127.0.0.0/8.
    #[arg(long, default_value = "ws://127.0.0.1:8000/ws")]
    url: String,
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Server pid, to measure its resident memory per connection.
    #[arg(long)]
    pid: Option<u32>,
    /// Time to hold the sockets before measuring.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    settle: Duration,
    /// Connection attempts in flight at once (raise it to test a connect burst).
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Verify wss:// servers with the CA certificates in this PEM file instead of the system's
    /// roots (e.g. a self-signed test certificate).
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct ReqackArgs {
    /// reqack WebSocket URL on 127.0.0.0/8 (without userId). Repeat it for the nodes of a
    /// cluster: users go to them in turn, so each user's partner is on another node.
    #[arg(long = "url", default_value = "ws://127.0.0.1:8000/ws")]
    urls: Vec<String>,
    #[arg(long, default_value_t = 100)]
    users: usize,
    /// Messages each user sends.
    #[arg(long, default_value_t = 100)]
    messages: usize,
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    timeout: Duration,
    /// Verify wss:// servers with the CA certificates in this PEM file instead of the system's
    /// roots (e.g. a self-signed test certificate).
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
}

pub(crate) async fn run(command: BenchCommand) -> Result<(), CliError> {
    let fd_limit = switchboard_bench::raise_fd_limit();
    tracing::info!(fd_limit, "open-file limit");
    let failed = |e: switchboard_bench::BenchError| CliError::Failed(e.to_string());
    match command {
        BenchCommand::Fanout(args) => {
            let senders = args
                .senders
                .unwrap_or_else(|| args.messages.div_ceil(60).max(1));
            let messages = args
                .messages_per_sender
                .map_or(args.messages, |each| each.saturating_mul(senders));
            let options = fanout::FanoutOptions {
                targets: targets(&args.urls, args.ca_file.as_deref())?,
                subscribers: args.subscribers,
                senders,
                messages,
                rate: args.rate,
                senders_in_phase: args.in_phase,
                server_pids: args.pids,
                timeout: args.timeout,
                connect_concurrency: 256,
                run_id: args.run_id,
                source_pool: args.source_pool,
                ready_file: args.ready_file,
                keep_latency_samples: args.latency_samples,
                hold: args.hold,
            };
            let report = fanout::run(options).await.map_err(failed)?;
            print_report("fanout", &report);
            if !report.complete {
                return Err(CliError::Failed(format!(
                    "{} of {} deliveries missing; the server closed {} subscribers; {} could not connect",
                    report.expected_deliveries.saturating_sub(report.deliveries),
                    report.expected_deliveries,
                    report.closed_by_server,
                    report.connect_failures
                )));
            }
        }
        BenchCommand::Idle(args) => {
            let options = idle::IdleOptions {
                target: Target::parse(&args.url)
                    .map_err(failed)?
                    .with_tls(client_tls(args.ca_file.as_deref())?),
                connections: args.connections,
                server_pid: args.pid,
                settle: args.settle,
                connect_concurrency: args.concurrency,
            };
            print_report("idle", &idle::run(options).await.map_err(failed)?);
        }
        BenchCommand::Reqack(args) => {
            let options = reqack::ReqackOptions {
                targets: targets(&args.urls, args.ca_file.as_deref())?,
                users: args.users.max(2),
                messages: args.messages,
                timeout: args.timeout,
            };
            let report = reqack::run(options).await.map_err(failed)?;
            print_report("reqack", &report);
            if !report.exactly_once {
                return Err(CliError::Failed(format!(
                    "{} events missing",
                    report.missing
                )));
            }
        }
        BenchCommand::Attack(args) => {
            let options = attack::AttackOptions {
                row: args.row,
                protocol: args.protocol,
                target: Target::parse(&args.url).map_err(failed)?,
                server_pid: args.pid,
            };
            let report = attack::run(options).await.map_err(failed)?;
            print_attack(&report);
            if !report.passed {
                let failing: Vec<&str> = report
                    .checks
                    .iter()
                    .filter(|c| !c.ok)
                    .map(|c| c.name.as_str())
                    .collect();
                return Err(CliError::Failed(format!(
                    "row {} failed: {}",
                    report.row,
                    failing.join("; ")
                )));
            }
        }
    }
    Ok(())
}

/// Every `--url`, parsed, verifying wss:// servers with `--ca-file` or the system's roots.
fn targets(urls: &[String], ca_file: Option<&Path>) -> Result<Vec<Target>, CliError> {
    let tls = client_tls(ca_file)?;
    urls.iter()
        .map(|url| {
            Target::parse(url)
                .map(|target| target.with_tls(tls.clone()))
                .map_err(|e| CliError::Failed(e.to_string()))
        })
        .collect()
}

/// `--ca-file`'s CA, or the system's roots (loaded on the first wss:// connect).
fn client_tls(ca_file: Option<&Path>) -> Result<ClientTls, CliError> {
    ClientTls::from_optional_ca_file(ca_file).map_err(|e| CliError::Failed(e.to_string()))
}

/// The attack report as a table of checks, then as one JSON line.
fn print_attack(report: &attack::AttackReport) {
    let mib = |b: Option<u64>| {
        b.map_or("?".to_owned(), |b| {
            format!("{:.1} MiB", b as f64 / 1048576.0)
        })
    };
    println!(
        "attack row {} ({}): {}",
        report.row, report.protocol, report.attack
    );
    println!(
        "  RSS before {} peak {} after {}; growth {} of {} allowed",
        mib(report.rss_before_bytes),
        mib(report.rss_peak_bytes),
        mib(report.rss_after_bytes),
        mib(report.rss_growth_bytes),
        mib(Some(report.rss_bound_bytes))
    );
    println!("  bound: {}", report.rss_bound_formula);
    println!(
        "  bystander median: idle {:.2} ms, under attack {:.2} ms (bound {:.2} ms)",
        report.idle_rtt_ms.p50, report.attack_rtt_ms.p50, report.latency_bound_ms
    );
    for check in &report.checks {
        println!(
            "  [{}] {}: {}",
            if check.ok { "ok" } else { "FAIL" },
            check.name,
            check.detail
        );
    }
    println!(
        "  {} in {:.1} s",
        if report.passed { "PASSED" } else { "FAILED" },
        report.duration_secs
    );
    let value = serde_json::to_value(report).unwrap_or_default();
    println!(
        "{}",
        serde_json::json!({ "bench": "attack", "report": value })
    );
}

/// A two-column table of the report's fields, then the report as one JSON line.
fn print_report<T: Serialize>(name: &str, report: &T) {
    let value = serde_json::to_value(report).unwrap_or_default();
    println!("{name}");
    if let Some(fields) = value.as_object() {
        // Latency samples (thousands of numbers) are for the JSON line only.
        for (key, field) in fields.iter().filter(|(_, f)| !f.is_array()) {
            println!("  {key:<28} {field}");
        }
    }
    println!("{}", serde_json::json!({ "bench": name, "report": value }));
}
