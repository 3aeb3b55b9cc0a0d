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
        "autobahn" => autobahn::run(Profile::from_args(args)),
        "attack" => attack::run(Profile::from_args(args)),
        "prometheus" => prometheus::run(Profile::from_args(args)),
        _ => {
            eprintln!(
                "usage: cargo xtask ci | cargo xtask bench [--quick] | cargo xtask bench-scale [--nodes N] [--per-node N] [--no-write] | cargo xtask autobahn|attack|prometheus [--debug]"
            );
            ExitCode::from(2)
        }
    }
}

/// Which build of `switchboard` the server-running commands (attack, autobahn, prometheus) use.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Profile {
    /// `cargo build --release`: the shipped build (the default).
    Release,
    /// `--debug`: the binary `cargo test --workspace` builds (no compile after the tests; too
    /// slow for the attacks' latency bounds).
    Debug,
}

impl Profile {
    fn from_args(mut args: impl Iterator<Item = String>) -> Self {
        if args.any(|a| a == "--debug") {
            Self::Debug
        } else {
            Self::Release
        }
    }

    /// The target subdirectory the binary lands in.
    pub(crate) fn dir(self) -> &'static str {
        match self {
            Self::Release => "release",
            Self::Debug => "debug",
        }
    }

    /// Builds the binary (a no-op when it is up to date); false if the build failed.
    pub(crate) fn build(self) -> bool {
        match self {
            Self::Release => cargo(&["build", "--release", "-p", "switchboard-cli"]),
            // Not `cargo build -p switchboard-cli`: that resolves features without the
            // workspace's dev-dependencies (tokio's `test-util`) and would rebuild every crate
            // above tokio after `cargo test --workspace`.
            Self::Debug => cargo(&["test", "--workspace", "--no-run"]),
        }
    }

    /// Where the binary is: `$CARGO_TARGET_DIR` (or `target`) joined with [`Profile::dir`].
    pub(crate) fn bin_dir(self) -> std::path::PathBuf {
        bench::release_dir().with_file_name(self.dir())
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

/// Runs `cargo <args>` without the variables `cargo run` set for this xtask process
/// (`CARGO_PKG_NAME=xtask`, `CARGO_MANIFEST_DIR`, ...): build scripts such as ring's ask to rerun
/// when those change, so a nested build that inherited them rebuilt ring and everything above it
/// (about 3 minutes, of a release build CI had already made).
fn cargo(args: &[&str]) -> bool {
    eprintln!("$ cargo {}", args.join(" "));
    let mut command = Command::new(env!("CARGO"));
    for (name, _) in std::env::vars_os() {
        let set_by_cargo_run = name.to_str().is_some_and(|name| {
            [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_BIN_",
                "CARGO_CRATE_",
                "CARGO_PRIMARY_",
            ]
            .iter()
            .any(|prefix| name.starts_with(prefix))
        });
        if set_by_cargo_run {
            command.env_remove(name);
        }
    }
    let ok = command.args(args).status().is_ok_and(|s| s.success());
    if !ok {
        eprintln!("xtask: `cargo {}` failed", args.join(" "));
    }
    ok
}
