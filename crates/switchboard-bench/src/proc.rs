//! Reading a server process's CPU time and resident memory from /proc (Linux).

use std::time::Duration;

/// CPU time and resident memory of a process at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ProcessSample {
    /// User + system CPU time.
    pub cpu: Duration,
    /// Whether `cpu` came from the nanosecond schedstat counters (else from 10 ms ticks).
    pub cpu_from_schedstat: bool,
    /// Resident set size in bytes.
    pub rss_bytes: u64,
}

/// CPU time of every thread of `pid` in nanoseconds, from `/proc/<pid>/task/*/schedstat`
/// (utime/stime in `/proc/<pid>/stat` only count 10 ms ticks, too coarse for sub-second runs).
/// A thread that exits between listing and reading is skipped rather than failing the whole
/// sum: its time is lost either way, and falling back to ticks would lose far more resolution.
fn schedstat_cpu(pid: u32) -> Option<Duration> {
    let mut total = 0u64;
    let mut read_any = false;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        let Some(ns) = stat
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        total = total.saturating_add(ns);
        read_any = true;
    }
    read_any.then(|| Duration::from_nanos(total))
}

/// Samples `pid`; `None` when /proc is unavailable or the process is gone.
pub fn sample_process(pid: u32) -> Option<ProcessSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after_name = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux target we run on; prefer the nanosecond counters.
    let schedstat = schedstat_cpu(pid).filter(|cpu| !cpu.is_zero());
    let cpu = schedstat.unwrap_or(Duration::from_millis(ticks.saturating_mul(10)));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(ProcessSample {
        cpu,
        cpu_from_schedstat: schedstat.is_some(),
        rss_bytes: rss_kib * 1024,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_this_process() {
        let sample = sample_process(std::process::id()).unwrap();
        assert!(sample.rss_bytes > 0);
        assert!(
            sample.cpu_from_schedstat,
            "schedstat gives nanosecond CPU time"
        );
    }
}
