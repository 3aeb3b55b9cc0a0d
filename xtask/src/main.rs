//! Project automation, in Rust instead of shell scripts (the cargo-xtask convention).
//!
//! - `cargo xtask ci`: exactly what CI runs — fmt check, clippy with warnings denied, tests.
//! - `cargo xtask bench [--quick]`: release builds of the server and of two minimal yardsticks,
//!   a fixed matrix of load runs against all three, and the tables in `docs/performance.md`.
//! - `cargo xtask autobahn [--debug]`: the Autobahn|Testsuite fuzzing client (cases 1-7, 9, 10) against
//!   `switchboard serve --protocol echo`; fails unless every case passes.
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a command-line tool"
)]

mod attack;
mod autobahn;
mod bench;

use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let task = args.next().unwrap_or_default();
    match task.as_str() {
        "ci" => ci(),
        "bench" => bench::run(args.any(|a| a == "--quick")),
        "autobahn" => autobahn::run(args.any(|a| a == "--debug")),
        "attack" => attack::run(),
        _ => {
            eprintln!(
                "usage: cargo xtask ci | cargo xtask bench [--quick] | cargo xtask autobahn [--debug] | cargo xtask attack"
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
