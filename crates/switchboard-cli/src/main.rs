//! `switchboard`: serve any Switchboard protocol from the command line.
//!
//! `switchboard serve --protocol <name> --listen <addr>` runs one protocol on the shared runtime.
//! Every flag has an environment twin (`--listen` / `SWITCHBOARD_LISTEN`). Exit codes: 0 after a
//! clean shutdown, 1 when the server cannot start or fails, 2 for invalid arguments.

mod bench;
mod protocols;
mod runtime;
mod teambot;

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

/// Command-line errors, turned into a message and an exit code by `main`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    #[error("could not listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("server failed: {0}")]
    Serve(#[source] std::io::Error),
    #[error("cannot open the state engine: {0}")]
    DataDir(#[from] switchboard_engine_durable::OpenError),
    #[error(
        "--engine and --data-dir cannot be used together: a node keeps its state either in the \
         shared engine or in its own data directory"
    )]
    EngineWithDataDir,
    #[error(
        "unsupported --engine URL {0:?}: expected redis://HOST:PORT[/DB] (a Redis or Valkey \
         server)"
    )]
    UnsupportedEngine(String),
    #[error("cannot use the state engine: {0}")]
    Engine(#[from] switchboard_engine_redis::ConfigError),
    #[error("cannot use signed identity: {0}")]
    Auth(#[from] switchboard_server::auth::AuthConfigError),
    #[error("cannot serve TLS: {0}")]
    Tls(#[from] switchboard_server::tls::TlsError),
    #[error("{0}")]
    Failed(String),
}

#[derive(Debug, Parser)]
#[command(
    name = "switchboard",
    version,
    about = "A multi-protocol realtime WebSocket server"
)]
struct Cli {
    /// Log output format (filter with RUST_LOG, e.g. RUST_LOG=debug).
    #[arg(
        long,
        value_enum,
        env = "SWITCHBOARD_LOG_FORMAT",
        default_value = "pretty",
        global = true
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve one protocol over HTTP and WebSocket.
    Serve(Box<protocols::ServeArgs>),
    /// Load-test a running server (traffic stays on 127.0.0.0/8).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Run the teambot client against a teambot server (exits 0 on goodbye, SIGINT or SIGTERM).
    Teambot(Box<teambot::TeambotArgs>),
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)
        .unwrap_or_else(|error| error.format(&mut Cli::command()).exit());
    // `serve` defines every protocol's flags; only the served protocol's may be given.
    let unused_env = match (&cli.command, matches.subcommand_matches("serve")) {
        (Command::Serve(args), Some(serve)) => {
            match protocols::check_protocol_flags(serve, args.protocol) {
                Ok(unused) => unused,
                Err(message) => usage_error(message),
            }
        }
        _ => Vec::new(),
    };
    init_logging(cli.log_format);
    for unused in unused_env {
        tracing::debug!(
            env = unused.env,
            protocol = unused.protocol,
            "environment variable of another protocol ignored"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            return fail(&CliError::Failed(format!(
                "could not start the async runtime: {error}"
            )));
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => protocols::serve(*args).await,
            Command::Bench(command) => bench::run(command).await,
            Command::Teambot(args) => teambot::run(*args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&error),
    }
}

/// Reports invalid arguments the way clap does (message, usage) and exits with 2.
fn usage_error(message: String) -> ! {
    let mut command = Cli::command();
    command.build();
    match command.find_subcommand_mut("serve") {
        Some(serve) => serve.error(ErrorKind::ArgumentConflict, message).exit(),
        None => command.error(ErrorKind::ArgumentConflict, message).exit(),
    }
}

fn fail(error: &CliError) -> ExitCode {
    tracing::error!("{error}");
    #[allow(
        clippy::print_stderr,
        reason = "the binary reports fatal errors on stderr"
    )]
    {
        eprintln!("switchboard: error: {error}");
    }
    ExitCode::FAILURE
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Catches clashing flag names or argument groups between protocol modules, which would
    /// otherwise only panic when someone runs the binary.
    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
