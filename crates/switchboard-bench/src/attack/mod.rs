//! `switchboard bench attack --row N`: the attacks listed in docs/hardening.md, scaled to run in seconds
//! against a running server, each checked against a documented bound.
//!
//! Every row measures the same three things and fails if one does not hold:
//!
//! - **memory**: the server's resident set (`VmRSS` of `/proc/<pid>/status`, sampled every
//!   10 ms) may grow by at most the row's bound, a formula of the limits documented in
//!   `docs/ARCHITECTURE.md` (Limits) and `docs/protocols/<name>.md`, stated in the report;
//! - **a bystander's latency**: a client on another address measures round trips on the idle
//!   server first, then during and right after the attack; the median under attack must stay
//!   within twice the idle median or 50 ms, whichever is larger, and every probe must be
//!   answered;
//! - **the row's own checks**: refusals carry the documented status or error, shared pools are
//!   not denied to others, nothing the attacker holds outlives its bound.
//!
//! Traffic stays on 127.0.0.0/8. Clients that the server's per-address limits would otherwise
//! count as one (crowds of users, reaction senders) each bind their own 127.x.y.z address, like
//! the other load generators; the attacker of a per-client row uses one address on purpose.

mod collab;
mod legit;
mod probe;
mod raw;
mod rows;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::{BenchError, Percentiles, Target, sample_process};
pub use probe::LatencyRule;
use probe::{Probe, ProbeLoop};

/// Bytes a WebSocket may hold in the runtime besides its queue: an idle socket (5 KiB), the free
/// partial-message allowance (8 KiB), the control-frame buffer (4 KiB) and 12 KiB of small
/// outbound frames queued or being written (docs/ARCHITECTURE.md has the full formula, whose
/// queue term each row adds where its traffic is large).
pub const SOCKET_BYTES: u64 = 29 * 1024;
/// A pending (not upgraded) HTTP connection: its header buffer and bookkeeping (16 KiB + ~2 KiB).
pub const PENDING_BYTES: u64 = 18 * 1024;
/// What every bound adds for the process itself rather than the attack: glibc malloc arenas of
/// worker threads that wake up, tokio's buffers, freed memory malloc has not returned yet.
pub const SLACK_BYTES: u64 = 16 * 1024 * 1024;
const MIB: u64 = 1024 * 1024;

/// What to run.
#[derive(Debug, Clone)]
pub struct AttackOptions {
    /// The row of the attack table (docs/hardening.md), 1 to 13; row 0 is the legitimate load the
    /// per-client defaults must let through.
    pub row: u8,
    /// The protocol the server runs (row 12 runs against each; other rows imply one).
    pub protocol: Option<String>,
    /// Any WebSocket URL of the server; only its address is used.
    pub target: Target,
    /// The server's pid, to read its resident memory. Without it the memory check fails.
    pub server_pid: Option<u32>,
}

/// One named check of a row.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What is checked.
    pub name: String,
    /// Whether it held.
    pub ok: bool,
    /// What was measured.
    pub detail: String,
}

/// What came out of one row.
#[derive(Debug, Clone, Serialize)]
pub struct AttackReport {
    /// The row.
    pub row: u8,
    /// The protocol attacked.
    pub protocol: String,
    /// What was done, in one sentence.
    pub attack: String,
    /// Server RSS before the row, bytes.
    pub rss_before_bytes: Option<u64>,
    /// Largest server RSS seen during the row, bytes.
    pub rss_peak_bytes: Option<u64>,
    /// Server RSS at the end of the row, bytes.
    pub rss_after_bytes: Option<u64>,
    /// `peak - before`, bytes.
    pub rss_growth_bytes: Option<u64>,
    /// The bound on that growth, bytes.
    pub rss_bound_bytes: u64,
    /// How the bound is computed, from the documented limits.
    pub rss_bound_formula: String,
    /// The bystander's round trips on the idle server, milliseconds.
    pub idle_rtt_ms: Percentiles,
    /// Its round trips during and right after the attack, milliseconds.
    pub attack_rtt_ms: Percentiles,
    /// The latency bound on the median under attack: max(2 × idle median, 50 ms).
    pub latency_bound_ms: f64,
    /// Probes not answered (or answered with an error).
    pub probe_failures: Vec<String>,
    /// Every check, the memory and latency ones included.
    pub checks: Vec<Check>,
    /// Whether every check held.
    pub passed: bool,
    /// Wall time of the row, seconds.
    pub duration_secs: f64,
}

/// The protocol a row attacks when none is given.
pub fn default_protocol(row: u8) -> &'static str {
    match row {
        0 | 8 => "ip-chat",
        1 | 2 | 4 | 6 | 7 => "collab",
        3 | 11 => "reqack",
        9 | 10 => "fastchat",
        13 => "teambot-sim",
        _ => "echo",
    }
}

/// Samples a pid's RSS every 10 ms and keeps the largest.
struct RssSampler {
    peak: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    fn start(pid: Option<u32>) -> Self {
        let peak = Arc::new(AtomicU64::new(0));
        let (stop, mut stopped) = watch::channel(false);
        let seen = peak.clone();
        let task = tokio::spawn(async move {
            let Some(pid) = pid else { return };
            loop {
                if let Some(sample) = sample_process(pid) {
                    seen.fetch_max(sample.rss_bytes, Ordering::Relaxed);
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                    _ = stopped.changed() => break,
                }
            }
        });
        Self { peak, stop, task }
    }

    async fn finish(self) -> u64 {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.peak.load(Ordering::Relaxed)
    }
}

/// The state one row builds up: its checks, its bystander samples and its memory bound.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) addr: SocketAddr,
    /// A token unique to this run, so ids never collide with an earlier run on the same server.
    pub(crate) run: String,
    protocol: String,
    attack: String,
    checks: Vec<Check>,
    idle: Vec<f64>,
    under_attack: Vec<f64>,
    failures: Vec<String>,
    bound: u64,
    formula: String,
}

impl Ctx {
    /// Records a check.
    pub(crate) fn check(&mut self, name: &str, ok: bool, detail: impl Into<String>) {
        self.checks.push(Check {
            name: name.to_owned(),
            ok,
            detail: detail.into(),
        });
    }

    /// Describes the attack.
    pub(crate) fn describe(&mut self, attack: impl Into<String>) {
        self.attack = attack.into();
    }

    /// Sets the memory bound and how it is computed.
    pub(crate) fn bound(&mut self, bytes: u64, formula: impl Into<String>) {
        self.bound = bytes;
        self.formula = formula.into();
    }

    /// Measures the bystander on the idle server: ten round trips, 50 ms apart.
    pub(crate) async fn baseline(&mut self, probe: &mut Probe) {
        for _ in 0..10 {
            match probe.round_trip().await {
                Ok(rtt) => self.idle.push(ms(rtt)),
                Err(e) => self.failures.push(format!("idle: {e}")),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs `attack` while the bystander measures every `every`, then five more round trips
    /// right after it; returns the probe and the attack's output.
    pub(crate) async fn under_attack<T>(
        &mut self,
        probe: Probe,
        every: Duration,
        attack: impl Future<Output = T>,
    ) -> (Probe, T) {
        let probing = ProbeLoop::start(probe, every);
        let output = attack.await;
        let (mut probe, samples, failures) = probing.stop().await;
        self.under_attack.extend(samples.into_iter().map(ms));
        self.failures.extend(failures);
        for _ in 0..5 {
            match probe.round_trip().await {
                Ok(rtt) => self.under_attack.push(ms(rtt)),
                Err(e) => self.failures.push(format!("after: {e}")),
            }
            tokio::time::sleep(every).await;
        }
        (probe, output)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs one row.
pub async fn run(options: AttackOptions) -> Result<AttackReport, BenchError> {
    let protocol = options
        .protocol
        .clone()
        .unwrap_or_else(|| default_protocol(options.row).to_owned());
    let run = format!(
        "{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() % 1_000_000_007)
    );
    let mut ctx = Ctx {
        addr: options.target.addr,
        run,
        protocol: protocol.clone(),
        attack: String::new(),
        checks: Vec::new(),
        idle: Vec::new(),
        under_attack: Vec::new(),
        failures: Vec::new(),
        bound: 0,
        formula: String::new(),
    };
    let started = Instant::now();
    let before = options.server_pid.and_then(sample_process);
    let sampler = RssSampler::start(options.server_pid);
    let outcome = tokio::time::timeout(
        Duration::from_secs(60),
        rows::run(options.row, &protocol, &mut ctx),
    )
    .await;
    match outcome {
        Err(_) => ctx.check("row finished in time", false, "gave up after 60 s"),
        Ok(Err(e)) => ctx.check("row ran", false, e),
        Ok(Ok(())) => {}
    }
    // Let the server finish what the attack left in flight before the last sample.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = options.server_pid.and_then(sample_process);
    let peak = sampler.finish().await;
    Ok(finish(ctx, options, before, peak, after, started))
}

fn finish(
    mut ctx: Ctx,
    options: AttackOptions,
    before: Option<crate::ProcessSample>,
    peak: u64,
    after: Option<crate::ProcessSample>,
    started: Instant,
) -> AttackReport {
    let rss_before = before.map(|s| s.rss_bytes);
    let rss_after = after.map(|s| s.rss_bytes);
    let rss_peak = rss_before.map(|b| b.max(peak).max(rss_after.unwrap_or(0)));
    let growth = rss_before.zip(rss_peak).map(|(b, p)| p.saturating_sub(b));
    match growth {
        Some(growth) => {
            let ok = growth <= ctx.bound;
            ctx.check(
                "server RSS growth within the bound",
                ok,
                format!(
                    "grew {:.1} MiB (peak), bound {:.1} MiB",
                    growth as f64 / MIB as f64,
                    ctx.bound as f64 / MIB as f64
                ),
            );
        }
        None => ctx.check(
            "server RSS growth within the bound",
            false,
            "no /proc sample of the server (give --pid)",
        ),
    }
    if after.is_none() && options.server_pid.is_some() {
        ctx.check("server still running", false, "the server process is gone");
    }
    let idle = Percentiles::of(&mut ctx.idle.clone());
    let attack = Percentiles::of(&mut ctx.under_attack.clone());
    let rule = LatencyRule::from_idle(idle.p50);
    if !ctx.under_attack.is_empty() && !ctx.idle.is_empty() {
        ctx.check(
            "bystander latency",
            rule.holds(attack.p50),
            format!(
                "median {:.2} ms under attack (p99 {:.2}, max {:.2}; {} samples) vs idle {:.2} ms; bound {:.2} ms",
                attack.p50,
                attack.p99,
                attack.max,
                ctx.under_attack.len(),
                idle.p50,
                rule.bound_ms
            ),
        );
    } else {
        ctx.check("bystander latency", false, "no samples");
    }
    ctx.check(
        "every bystander probe answered",
        ctx.failures.is_empty(),
        if ctx.failures.is_empty() {
            "all answered".to_owned()
        } else {
            ctx.failures.join("; ")
        },
    );
    let passed = ctx.checks.iter().all(|c| c.ok);
    AttackReport {
        row: options.row,
        protocol: ctx.protocol,
        attack: ctx.attack,
        rss_before_bytes: rss_before,
        rss_peak_bytes: rss_peak,
        rss_after_bytes: rss_after,
        rss_growth_bytes: growth,
        rss_bound_bytes: ctx.bound,
        rss_bound_formula: ctx.formula,
        idle_rtt_ms: idle,
        attack_rtt_ms: attack,
        latency_bound_ms: rule.bound_ms,
        probe_failures: ctx.failures,
        checks: ctx.checks,
        passed,
        duration_secs: started.elapsed().as_secs_f64(),
    }
}

/// Megabytes for the formulas in reports.
pub(crate) fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}
