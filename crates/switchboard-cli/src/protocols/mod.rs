//! `switchboard serve`: the protocol, where to listen, the runtime's flags, and every protocol's
//! `Config` as its flags (each protocol crate's `cli` feature derives `clap::Args` for it, so a
//! field, its help and its default are written once, in the protocol crate).
//!
//! All protocols' flags are defined together so that `--help` lists them all and every
//! environment twin parses; [`check_protocol_flags`] then refuses a flag of another protocol than
//! the one served, and leaves other protocols' environment twins unused.

mod collab;
mod echo;
mod fastchat;
mod ip_chat;
mod reqack;
mod teambot_sim;

use std::net::SocketAddr;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, ValueEnum};

use crate::CliError;
use crate::runtime::{RuntimeArgs, Server};

/// Protocols the binary can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ProtocolName {
    /// Broadcast chat, users identified by IP.
    IpChat,
    /// Direct one-to-one chat with HELLO identity, presence and delivery acks.
    Fastchat,
    /// Collaborative code editing with operational transformation.
    Collab,
    /// Request/response messaging with acknowledged, redelivered events.
    Reqack,
    /// Simulator of the teambot server: seeded scenario, chaos, healthcheck scorecard.
    TeambotSim,
    /// Diagnostics: echoes every message on /ws unchanged (runtime conformance testing).
    Echo,
}

impl ProtocolName {
    const ALL: [Self; 6] = [
        Self::IpChat,
        Self::Fastchat,
        Self::Collab,
        Self::Reqack,
        Self::TeambotSim,
        Self::Echo,
    ];

    /// The `--protocol` value, which is also the id of the argument group holding the
    /// protocol's flags (`#[group(id = ...)]` on its `Config`).
    fn name(self) -> &'static str {
        match self {
            Self::IpChat => "ip-chat",
            Self::Fastchat => "fastchat",
            Self::Collab => "collab",
            Self::Reqack => "reqack",
            Self::TeambotSim => "teambot-sim",
            Self::Echo => "echo",
        }
    }
}

/// `switchboard serve` flags: the protocol, where to listen, runtime limits, protocol options.
#[derive(Debug, clap::Args)]
pub(crate) struct ServeArgs {
    /// The protocol to serve.
    #[arg(
        long,
        value_enum,
        env = "SWITCHBOARD_PROTOCOL",
        default_value = "ip-chat"
    )]
    pub(crate) protocol: ProtocolName,
    /// Address to listen on.
    #[arg(long, env = "SWITCHBOARD_LISTEN", default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    #[command(flatten)]
    runtime: RuntimeArgs,
    #[command(flatten)]
    ip_chat: switchboard_ip_chat::Config,
    #[command(flatten)]
    fastchat: switchboard_fastchat::Config,
    #[command(flatten)]
    collab: switchboard_collab::Config,
    #[command(flatten)]
    reqack: switchboard_reqack::Config,
    #[command(flatten)]
    teambot_sim: switchboard_teambot::sim::SimConfig,
}

/// An environment twin of another protocol's flag: set for a shared deployment, not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UnusedEnv {
    /// The variable, e.g. `SWITCHBOARD_FASTCHAT_MAX_USERS`.
    pub(crate) env: String,
    /// The protocol it configures.
    pub(crate) protocol: &'static str,
}

/// Refuses flags of protocols other than `protocol` that were given on the command line (the
/// message names each flag and the protocol it belongs to), and returns the environment twins of
/// other protocols that are set, which are not used: one environment may serve several
/// deployments of different protocols.
pub(crate) fn check_protocol_flags(
    matches: &ArgMatches,
    protocol: ProtocolName,
) -> Result<Vec<UnusedEnv>, String> {
    let command = ServeArgs::augment_args(clap::Command::new("serve"));
    let mut foreign = Vec::new();
    let mut unused = Vec::new();
    for other in ProtocolName::ALL.into_iter().filter(|&p| p != protocol) {
        let Some(group) = command.get_groups().find(|g| g.get_id() == other.name()) else {
            continue;
        };
        for id in group.get_args() {
            let Some(arg) = command.get_arguments().find(|a| a.get_id() == id) else {
                continue;
            };
            match matches.value_source(id.as_str()) {
                Some(ValueSource::CommandLine) => foreign.push(format!(
                    "--{} belongs to --protocol {} and cannot be used with --protocol {}",
                    arg.get_long().unwrap_or(id.as_str()),
                    other.name(),
                    protocol.name()
                )),
                Some(ValueSource::EnvVariable) => unused.push(UnusedEnv {
                    env: arg
                        .get_env()
                        .map(|env| env.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    protocol: other.name(),
                }),
                _ => {}
            }
        }
    }
    if foreign.is_empty() {
        Ok(unused)
    } else {
        Err(foreign.join("; "))
    }
}

pub(crate) async fn serve(args: ServeArgs) -> Result<(), CliError> {
    let server = Server {
        listen: args.listen,
        config: args.runtime.config()?,
        max_state_bytes: args.runtime.max_state_bytes,
        tls: args.runtime.tls_files(),
    };
    match args.protocol {
        ProtocolName::IpChat => ip_chat::serve(args.ip_chat, server).await,
        ProtocolName::Fastchat => fastchat::serve(args.fastchat, server).await,
        ProtocolName::Collab => collab::serve(args.collab, server).await,
        ProtocolName::Reqack => reqack::serve(args.reqack, server).await,
        ProtocolName::TeambotSim => teambot_sim::serve(args.teambot_sim, server).await,
        ProtocolName::Echo => echo::serve(server).await,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::{CommandFactory, FromArgMatches, Parser};

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    /// Each protocol with flags: its name, its flag prefix, where its `Config` is defined, and the
    /// fields that are deliberately not flags (the runtime's `--max-state-bytes` and
    /// `--max-frame-bytes` set those two; ip-chat's character limits never were flags).
    const CONFIGS: [(ProtocolName, &str, &str, &str, &[&str]); 5] = [
        (
            ProtocolName::IpChat,
            "ip-chat",
            "protocols/ip-chat/src/lib.rs",
            "Config",
            &[
                "max_text_chars",
                "max_author_name_chars",
                "max_emoji_chars",
                "max_state_bytes",
            ],
        ),
        (
            ProtocolName::Fastchat,
            "fastchat",
            "protocols/fastchat/src/lib.rs",
            "Config",
            &["max_frame_bytes", "max_state_bytes"],
        ),
        (
            ProtocolName::Collab,
            "collab",
            "protocols/collab/src/lib.rs",
            "Config",
            &["max_state_bytes"],
        ),
        (
            ProtocolName::Reqack,
            "reqack",
            "protocols/reqack/src/config.rs",
            "Config",
            &["max_state_bytes"],
        ),
        (
            ProtocolName::TeambotSim,
            "sim",
            "protocols/teambot/src/sim/mod.rs",
            "SimConfig",
            &["max_state_bytes"],
        ),
    ];

    fn serve_command() -> clap::Command {
        ServeArgs::augment_args(clap::Command::new("serve"))
    }

    /// The ids of the flags in `protocol`'s argument group.
    fn group_args(command: &clap::Command, protocol: ProtocolName) -> Vec<String> {
        command
            .get_groups()
            .find(|g| g.get_id() == protocol.name())
            .unwrap_or_else(|| panic!("no argument group {}", protocol.name()))
            .get_args()
            .map(|id| id.as_str().to_owned())
            .collect()
    }

    fn check(args: &[&str]) -> Result<Vec<UnusedEnv>, String> {
        let matches = Cli::command()
            .try_get_matches_from(std::iter::once("test").chain(args.iter().copied()))
            .unwrap();
        let cli = Cli::from_arg_matches(&matches).unwrap();
        check_protocol_flags(&matches, cli.serve.protocol)
    }

    #[test]
    fn protocol_names_are_the_value_names() {
        for protocol in ProtocolName::ALL {
            let value = protocol.to_possible_value().unwrap();
            assert_eq!(value.get_name(), protocol.name());
        }
    }

    #[test]
    fn without_flags_every_protocol_gets_its_default_config() {
        let cli = Cli::try_parse_from(["test"]).unwrap();
        assert_eq!(cli.serve.ip_chat, switchboard_ip_chat::Config::default());
        assert_eq!(cli.serve.fastchat, switchboard_fastchat::Config::default());
        assert_eq!(cli.serve.collab, switchboard_collab::Config::default());
        assert_eq!(cli.serve.reqack, switchboard_reqack::Config::default());
        assert_eq!(
            cli.serve.teambot_sim,
            switchboard_teambot::sim::SimConfig::default()
        );
    }

    #[test]
    fn flags_and_old_names_set_the_config() {
        let cli = Cli::try_parse_from([
            "test",
            "--ip-chat-history-limit",
            "7",
            "--history-bytes",
            "1000",
            "--rate-limit-keys",
            "5",
            "--redelivery-timeout",
            "250ms",
            "--reqack-unclaimed-ttl",
            "5m",
            "--fastchat-rate-window",
            "1.5s",
            "--collab-default-language",
            "rust",
            "--sim-url-scheme",
            "ws",
            "--sim-public-host",
            "example.com:80",
        ])
        .unwrap();
        let serve = cli.serve;
        assert_eq!(serve.ip_chat.history_limit, 7);
        assert_eq!(serve.ip_chat.max_history_bytes, 1000);
        assert_eq!(serve.ip_chat.max_rate_limit_keys, 5);
        assert_eq!(serve.reqack.redelivery_timeout, Duration::from_millis(250));
        assert_eq!(serve.reqack.unclaimed_ttl, Duration::from_secs(300));
        assert_eq!(serve.fastchat.rate_window, Duration::from_millis(1500));
        assert_eq!(serve.collab.default_language, "rust");
        assert_eq!(
            serve.teambot_sim.url_scheme,
            switchboard_teambot::sim::UrlScheme::Ws
        );
        assert_eq!(
            serve.teambot_sim.public_host.as_deref(),
            Some("example.com:80")
        );
    }

    #[test]
    fn a_flag_of_another_protocol_is_refused_with_its_owner() {
        let error = check(&["--protocol", "ip-chat", "--fastchat-max-users", "5"]).unwrap_err();
        assert_eq!(
            error,
            "--fastchat-max-users belongs to --protocol fastchat and cannot be used with \
             --protocol ip-chat"
        );
        // An old name is reported under the flag's current name.
        let error = check(&["--protocol", "reqack", "--rate-limit", "5"]).unwrap_err();
        assert!(
            error.starts_with("--ip-chat-rate-limit belongs to --protocol ip-chat"),
            "{error}"
        );
        // Every offending flag is named, for the default protocol (ip-chat) too.
        let error = check(&["--sim-seed", "3", "--collab-max-sessions", "1"]).unwrap_err();
        assert!(
            error.contains("--sim-seed belongs to --protocol teambot-sim"),
            "{error}"
        );
        assert!(
            error.contains("--collab-max-sessions belongs to --protocol collab"),
            "{error}"
        );
        assert!(check(&["--protocol", "echo", "--reqack-max-users", "1"]).is_err());
    }

    #[test]
    fn the_served_protocols_flags_and_runtime_flags_are_accepted() {
        assert_eq!(
            check(&["--protocol", "fastchat", "--fastchat-max-users", "5"]),
            Ok(Vec::new())
        );
        assert_eq!(check(&["--history-limit", "5"]), Ok(Vec::new()));
        assert_eq!(
            check(&["--protocol", "echo", "--max-frame-bytes", "1024"]),
            Ok(Vec::new())
        );
    }

    /// Tidy: every flag of a protocol starts with the protocol's prefix, has help, a default
    /// (or is optional) and an environment twin named after the flag (`--collab-idle-ttl` /
    /// `SWITCHBOARD_COLLAB_IDLE_TTL`) or, for a renamed flag, after its old name, which stays
    /// as an alias (`--ip-chat-history-limit`, alias `--history-limit` /
    /// `SWITCHBOARD_HISTORY_LIMIT`).
    #[test]
    fn every_protocol_flag_has_the_prefix_and_an_env_twin() {
        let command = serve_command();
        let twin = |flag: &str| format!("SWITCHBOARD_{}", flag.to_uppercase().replace('-', "_"));
        let mut protocol_flags = 0;
        for (protocol, prefix, ..) in CONFIGS {
            for id in group_args(&command, protocol) {
                let arg = command.get_arguments().find(|a| a.get_id() == id.as_str());
                let arg = arg.unwrap();
                let long = arg
                    .get_long()
                    .unwrap_or_else(|| panic!("{id} has no --flag"));
                assert_eq!(long, id, "a protocol flag's id is its name");
                assert!(
                    long.starts_with(&format!("{prefix}-")),
                    "--{long}: not --{prefix}-..."
                );
                assert!(arg.get_help().is_some(), "--{long} has no help");
                assert!(
                    !arg.get_default_values().is_empty() || long == "sim-public-host",
                    "--{long} has no default"
                );
                let env = arg
                    .get_env()
                    .unwrap_or_else(|| panic!("--{long} has no env twin"));
                let env = env.to_str().unwrap();
                let aliases = arg.get_all_aliases().unwrap_or_default();
                for alias in &aliases {
                    assert_eq!(
                        long,
                        format!("{prefix}-{alias}"),
                        "an alias is the old name"
                    );
                }
                assert!(
                    env == twin(long) || aliases.iter().any(|alias| env == twin(alias)),
                    "--{long}: env twin {env} is named after neither the flag nor an old name"
                );
                protocol_flags += 1;
            }
        }
        // Nothing else but the runtime's flags, --protocol and --listen.
        let runtime = RuntimeArgs::augment_args(clap::Command::new("runtime"));
        let others = command
            .get_arguments()
            .filter(|a| {
                !["protocol", "listen"].contains(&a.get_id().as_str())
                    && runtime.get_arguments().all(|r| r.get_id() != a.get_id())
            })
            .count();
        assert_eq!(
            others, protocol_flags,
            "a flag outside every protocol's group"
        );
    }

    /// Tidy: every field of every protocol `Config` is a flag, except the listed ones, which
    /// are skipped explicitly (read from the source: a field without `arg(...)` under the `cli`
    /// feature would not compile as a flag, but a new `skip` would go unnoticed).
    #[test]
    fn every_config_field_is_a_flag() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../");
        let command = serve_command();
        for (protocol, _, path, name, not_flags) in CONFIGS {
            let source = std::fs::read_to_string(format!("{root}{path}")).unwrap();
            let body = source
                .split(&format!("pub struct {name} {{\n"))
                .nth(1)
                .and_then(|rest| rest.split("\n}\n").next())
                .unwrap_or_else(|| panic!("{name} in {path}"));
            let mut attributes = String::new();
            let mut flags = 0;
            for line in body.lines() {
                let line = line.trim();
                let Some(field) = line
                    .strip_prefix("pub ")
                    .and_then(|rest| rest.split(':').next())
                else {
                    attributes.push_str(line);
                    continue;
                };
                let skipped = attributes.contains("arg(skip");
                assert_eq!(
                    skipped,
                    not_flags.contains(&field),
                    "{path}: {name}::{field} must be a flag (or listed here as not one)"
                );
                if !skipped {
                    assert!(attributes.contains("long"), "{path}: {field} has no --flag");
                    flags += 1;
                }
                attributes.clear();
            }
            assert_eq!(flags, group_args(&command, protocol).len(), "{path}");
        }
    }
}
