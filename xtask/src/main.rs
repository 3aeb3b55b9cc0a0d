//! Project automation, in Rust instead of shell scripts (the cargo-xtask convention).
//!
//! - `cargo xtask ci`: exactly what CI runs — fmt check, clippy with warnings denied, tests.
//! - `cargo xtask bench [--quick]`: release builds of the server and of two minimal yardsticks,
//!   a fixed matrix of load runs against all three, the same loads on a 3-node cluster sharing
//!   one redis-server, and the tables in `docs/performance.md`.
//! - `cargo xtask bench-scale [--nodes N] [--per-node N] [--no-write]`: one broadcast to ~95,000
//!   sockets held by 5 nodes on one Redis (not part of CI); its block in `docs/performance.md`.
//! - `cargo xtask autobahn [--debug]`: the Autobahn|Testsuite fuzzing client (cases 1-7, 9, 10) against
//!   `switchboard serve --protocol echo`; fails unless every case passes.
//! - `cargo xtask prometheus`: a real `prometheus` scrapes the release server's `--metrics-listen`
//!   while `switchboard bench fanout` drives it; fails unless the key series exist and move.
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a command-line tool"
)]

mod attack;
mod autobahn;
mod bench;
mod cluster;
mod prometheus;
mod scale;

use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let task = args.next().unwrap_or_default();
    match task.as_str() {
        "ci" => ci(),
        "bench" => bench::run(args.any(|a| a == "--quick")),
        "bench-scale" => scale::run(args),
        "autobahn" => autobahn::run(args.any(|a| a == "--debug")),
        "attack" => attack::run(args.any(|a| a == "--debug")),
        "prometheus" => prometheus::run(args.any(|a| a == "--debug")),
        _ => {
            eprintln!(
                "usage: cargo xtask ci | cargo xtask bench [--quick] | cargo xtask bench-scale [--nodes N] [--per-node N] [--no-write] | cargo xtask autobahn [--debug] | cargo xtask attack [--debug] | cargo xtask prometheus [--debug]"
            );
            ExitCode::from(2)
        }
    }
}

/// fmt check, clippy with warnings denied, and the README's test command, in that order.
fn ci() -> ExitCode {
    let steps: &[&[&str]] = &[
        &["fmt", "--all", "--", "--check"],
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &["test", "--workspace"],
    ];
    for step in steps {
        if !cargo(step) {
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn cargo(args: &[&str]) -> bool {
    eprintln!("$ cargo {}", args.join(" "));
    let ok = Command::new(env!("CARGO"))
        .args(args)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("xtask: `cargo {}` failed", args.join(" "));
    }
    ok
}
