//! `teambot-sim`: a faithful simulator of the teambot server, with chaos and a scorecard.
//!
//! Serve [`TeambotSim`] like any protocol. The first connection to `/global` starts a scenario
//! generated from [`SimConfig::seed`]: `hello`, a `team.join` per team, `message` events at
//! [`SimConfig::message_rate`] (a [`SimConfig::props_share`] of them containing `props`),
//! `pong` for every `ping`, `team.left` for [`SimConfig::leaving_teams`] teams (on the team socket
//! or the global one), a `healthcheck` request every [`SimConfig::healthcheck_interval`], chaos
//! (dropped team and global sockets, delayed or refused connects) and, after
//! [`SimConfig::duration`], a quiet final healthcheck that must match exactly, then `goodbye`.
//!
//! Team sockets live at `/team/<id>?token=<one-time token>`; `team.connect` hands out that URL
//! with the `http://` scheme (as in the spec's example) built from the request's `Host` header.
//! `GET /scorecard` serves the [`Scorecard`] at any time; it is also logged when the scenario
//! ends. See `docs/protocols/teambot.md` for the comparison rules.

mod scorecard;
mod state;
mod web;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use switchboard_core::sync::lock;
use switchboard_core::{Context, Engine, Handshake, HttpRequest, HttpResponse, Protocol, Reject};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior, interval};
use tracing::{debug, warn};

pub use scorecard::{
    ChaosScore, GlobalScore, HealthcheckScore, Mismatch, Scorecard, TeamScore, Totals,
};
use state::{GlobalOpen, State, TeamAdmit, clip, error_frame};
pub use state::{
    LOG_CLIP_CHARS, MAX_PROBLEM_BYTES, MISMATCH_BYTES, TEAM_BYTES, TOKEN_BYTES,
    VALUE_BYTES_PER_BYTE,
};

/// The scheme of the `ws_url`s the simulator hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum UrlScheme {
    /// `http://host/...`, as in the spec's example; clients must map it to `ws://`.
    #[default]
    Http,
    /// `ws://host/...`.
    Ws,
    /// `https://host/...`: for a simulator served over TLS; clients map it to `wss://`.
    Https,
    /// `wss://host/...`: for a simulator served over TLS.
    Wss,
}

impl UrlScheme {
    /// `http`, `ws`, `https` or `wss`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Ws => "ws",
            Self::Https => "https",
            Self::Wss => "wss",
        }
    }
}

/// The scenario and its chaos.
///
/// With the `cli` feature this is also the `clap::Args` of `switchboard serve --protocol
/// teambot-sim`: each field's doc is its flag's help (`--sim-...`, environment twin
/// `SWITCHBOARD_SIM_...`) and [`SimConfig::default`] its default; see the docs.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[cfg_attr(feature = "cli", group(id = "teambot-sim"))]
#[cfg_attr(feature = "cli", command(next_help_heading = "teambot-sim"))]
pub struct SimConfig {
    /// Seeds every random choice: team ids, join and leave times, texts, chaos.
    #[cfg_attr(feature = "cli", arg(
        id = "sim-seed", long,
        env = "SWITCHBOARD_SIM_SEED", value_name = "N",
        default_value_t = SimConfig::default().seed,
    ))]
    pub seed: u64,
    /// Teams that join.
    #[cfg_attr(feature = "cli", arg(
        id = "sim-teams", long,
        env = "SWITCHBOARD_SIM_TEAMS", value_name = "N",
        default_value_t = SimConfig::default().teams,
    ))]
    pub teams: usize,
    /// Joins are spread over this window from the start (capped at half the duration).
    #[cfg_attr(feature = "cli", arg(
        id = "sim-join-window", long,
        env = "SWITCHBOARD_SIM_JOIN_WINDOW", value_name = "DURATION",
        value_parser = switchboard_core::duration::parse,
        default_value = switchboard_core::duration::format(SimConfig::default().join_window),
    ))]
    pub join_window: Duration,
    /// How long traffic (messages, leaves, healthchecks, chaos) runs before the final healthcheck
    /// and goodbye.
    #[cfg_attr(feature = "cli", arg(
        id = "sim-duration", long,
        env = "SWITCHBOARD_SIM_DURATION", value_name = "DURATION",
        value_parser = switchboard_core::duration::parse,
        default_value = switchboard_core::duration::format(SimConfig::default().duration),
    ))]
    pub duration: Duration,
    /// `message` events per second, over all connected teams.
    #[cfg_attr(feature = "cli", arg(
        id = "sim-message-rate", long,
        env = "SWITCHBOARD_SIM_MESSAGE_RATE", value_name = "RATE",
        default_value_t = SimConfig::default().message_rate,
    ))]
    pub message_rate: f64,
    /// Share of messages whose text contains "props" (0..1).
    #[cfg_attr(feature = "cli", arg(
        id = "sim-props-share", long,
        env = "SWITCHBOARD_SIM_PROPS_SHARE", value_name = "SHARE",
        default_value_t = SimConfig::default().props_share,
    ))]
    pub props_share: f64,
    /// Teams that get `team.left` mid-run (half on the team socket, half on the global one, by
    /// the seed).
    #[cfg_attr(feature = "cli", arg(
        id = "sim-leaving-teams", long,
        env = "SWITCHBOARD_SIM_LEAVING_TEAMS", value_name = "N",
        default_value_t = SimConfig::default().leaving_teams,
    ))]
    pub leaving_teams: usize,
    /// How often a `healthcheck` is requested during traffic.
    #[cfg_attr(feature = "cli", arg(
        id = "sim-healthcheck-interval", long,
        env = "SWITCHBOARD_SIM_HEALTHCHECK_INTERVAL", value_name = "DURATION",
        value_parser = switchboard_core::duration::parse,
        default_value =
            switchboard_core::duration::format(SimConfig::default().healthcheck_interval),
    ))]
    pub healthcheck_interval: Duration,
    /// How long a healthcheck reply may take; later it is a mismatch.
    #[cfg_attr(feature = "cli", arg(
        id = "sim-healthcheck-timeout", long,
        env = "SWITCHBOARD_SIM_HEALTHCHECK_TIMEOUT", value_name = "DURATION",
        value_parser = switchboard_core::duration::parse,
        default_value =
            switchboard_core::duration::format(SimConfig::default().healthcheck_timeout),
    ))]
    pub healthcheck_timeout: Duration,
    /// Chaos: team sockets dropped per second (on average, one random team at a time).
    #[cfg_attr(feature = "cli", arg(
        id = "sim-team-drop-rate", long,
        env = "SWITCHBOARD_SIM_TEAM_DROP_RATE", value_name = "RATE",
        default_value_t = SimConfig::default().team_drop_rate,
    ))]
    pub team_drop_rate: f64,
    /// Chaos: global socket drops per second (on average).
    #[cfg_attr(feature = "cli", arg(
        id = "sim-global-drop-rate", long,
        env = "SWITCHBOARD_SIM_GLOBAL_DROP_RATE", value_name = "RATE",
        default_value_t = SimConfig::default().global_drop_rate,
    ))]
    pub global_drop_rate: f64,
    /// Chaos: each `team.connect` answer is delayed by up to this much.
    #[cfg_attr(feature = "cli", arg(
        id = "sim-connect-delay-max", long,
        env = "SWITCHBOARD_SIM_CONNECT_DELAY_MAX", value_name = "DURATION",
        value_parser = switchboard_core::duration::parse,
        default_value = switchboard_core::duration::format(SimConfig::default().connect_delay_max),
    ))]
    pub connect_delay_max: Duration,
    /// Chaos: share of `team.connect` requests answered with an `error` instead of a URL (0..1).
    #[cfg_attr(feature = "cli", arg(
        id = "sim-refuse-connect-share", long,
        env = "SWITCHBOARD_SIM_REFUSE_CONNECT_SHARE", value_name = "SHARE",
        default_value_t = SimConfig::default().refuse_connect_share,
    ))]
    pub refuse_connect_share: f64,
    /// Chaos: share of team socket upgrades refused with HTTP 503 (0..1).
    #[cfg_attr(feature = "cli", arg(
        id = "sim-refuse-upgrade-share", long,
        env = "SWITCHBOARD_SIM_REFUSE_UPGRADE_SHARE", value_name = "SHARE",
        default_value_t = SimConfig::default().refuse_upgrade_share,
    ))]
    pub refuse_upgrade_share: f64,
    /// A team leaving over the global socket gets no messages for this long before `team.left`,
    /// so nothing is in flight on its team socket when the client closes it.
    #[cfg_attr(feature = "cli", arg(
        id = "sim-leave-quiet", long,
        env = "SWITCHBOARD_SIM_LEAVE_QUIET", value_name = "DURATION",
        value_parser = switchboard_core::duration::parse,
        default_value = switchboard_core::duration::format(SimConfig::default().leave_quiet),
    ))]
    pub leave_quiet: Duration,
    /// After traffic stops, how long to wait for every team to be connected before the final
    /// healthcheck goes out anyway (stragglers are mismatches).
    #[cfg_attr(feature = "cli", arg(
        id = "sim-settle-timeout", long,
        env = "SWITCHBOARD_SIM_SETTLE_TIMEOUT", value_name = "DURATION",
        value_parser = switchboard_core::duration::parse,
        default_value = switchboard_core::duration::format(SimConfig::default().settle_timeout),
    ))]
    pub settle_timeout: Duration,
    /// Silence between "everything connected" and the final healthcheck.
    #[cfg_attr(feature = "cli", arg(
        id = "sim-quiet-period", long,
        env = "SWITCHBOARD_SIM_QUIET_PERIOD", value_name = "DURATION",
        value_parser = switchboard_core::duration::parse,
        default_value = switchboard_core::duration::format(SimConfig::default().quiet_period),
    ))]
    pub quiet_period: Duration,
    /// Scheme of the handed-out `ws_url`s.
    #[cfg_attr(feature = "cli", arg(
        id = "sim-url-scheme", long,
        env = "SWITCHBOARD_SIM_URL_SCHEME", value_name = "SCHEME",
        value_enum, default_value_t = SimConfig::default().url_scheme,
    ))]
    pub url_scheme: UrlScheme,
    /// `host:port` for `ws_url`s instead of the request's `Host` header (behind a proxy).
    #[cfg_attr(
        feature = "cli",
        arg(
            id = "sim-public-host",
            long,
            env = "SWITCHBOARD_SIM_PUBLIC_HOST",
            value_name = "HOST:PORT",
        )
    )]
    pub public_host: Option<String>,
    /// How long a handed-out `ws_url` stays valid (each is single-use).
    #[cfg_attr(feature = "cli", arg(
        id = "sim-token-ttl", long,
        env = "SWITCHBOARD_SIM_TOKEN_TTL", value_name = "DURATION",
        value_parser = switchboard_core::duration::parse,
        default_value = switchboard_core::duration::format(SimConfig::default().token_ttl),
    ))]
    pub token_ttl: Duration,
    /// Outstanding `ws_url` tokens at most; more `team.connect`s get an `error`.
    #[cfg_attr(feature = "cli", arg(
        id = "sim-max-tokens", long,
        env = "SWITCHBOARD_SIM_MAX_TOKENS", value_name = "N",
        default_value_t = SimConfig::default().max_tokens,
    ))]
    pub max_tokens: usize,
    /// Scenario clock resolution.
    #[cfg_attr(feature = "cli", arg(
        id = "sim-tick", long,
        env = "SWITCHBOARD_SIM_TICK", value_name = "DURATION",
        value_parser = switchboard_core::duration::parse,
        default_value = switchboard_core::duration::format(SimConfig::default().tick),
    ))]
    pub tick: Duration,
    /// Messages sent per tick at most (bounds one tick's work).
    #[cfg_attr(feature = "cli", arg(
        id = "sim-max-messages-per-tick", long,
        env = "SWITCHBOARD_SIM_MAX_MESSAGES_PER_TICK", value_name = "N",
        default_value_t = SimConfig::default().max_messages_per_tick,
    ))]
    pub max_messages_per_tick: u64,
    /// Mismatches listed in the scorecard at most (all are counted).
    #[cfg_attr(feature = "cli", arg(
        id = "sim-max-listed-mismatches", long,
        env = "SWITCHBOARD_SIM_MAX_LISTED_MISMATCHES", value_name = "N",
        default_value_t = SimConfig::default().max_listed_mismatches,
    ))]
    pub max_listed_mismatches: usize,
    /// Byte budget for the simulator's state: the plan (charged whatever its size), outstanding
    /// tokens and listed mismatches. When spent, `team.connect` gets an `error` and further
    /// mismatches are counted but not listed. The binary sets it from the runtime's
    /// `--max-state-bytes`.
    #[cfg_attr(feature = "cli", arg(skip = SimConfig::default().max_state_bytes))]
    pub max_state_bytes: usize,
}

impl Default for SimConfig {
    /// The defaults, written only here: the `cli` flags take theirs from this.
    fn default() -> Self {
        Self {
            seed: 1,
            teams: 10,
            join_window: Duration::from_secs(2),
            duration: Duration::from_secs(30),
            message_rate: 50.0,
            props_share: 0.2,
            leaving_teams: 2,
            healthcheck_interval: Duration::from_secs(5),
            healthcheck_timeout: Duration::from_secs(3),
            team_drop_rate: 0.0,
            global_drop_rate: 0.0,
            connect_delay_max: Duration::ZERO,
            refuse_connect_share: 0.0,
            refuse_upgrade_share: 0.0,
            leave_quiet: Duration::from_millis(250),
            settle_timeout: Duration::from_secs(15),
            quiet_period: Duration::from_millis(500),
            url_scheme: UrlScheme::Http,
            public_host: None,
            token_ttl: Duration::from_secs(30),
            max_tokens: 10_000,
            tick: Duration::from_millis(10),
            max_messages_per_tick: 1_000,
            max_listed_mismatches: 100,
            max_state_bytes: 256 * 1024 * 1024,
        }
    }
}

/// Longest `Host` header a global socket may bring (a 253-byte DNS name, `:` and a port).
pub const MAX_HOST_BYTES: usize = 260;

/// Most teams a scenario may plan (ids are drawn from 1..=999 999).
pub const MAX_TEAMS: usize = 100_000;

/// Per-connection state.
#[derive(Debug)]
pub enum SimConn {
    /// The global socket, with the `Host` it was opened with (for `ws_url`s).
    Global {
        /// The `Host` header.
        host: Option<String>,
    },
    /// A team socket.
    Team {
        /// The team.
        id: u64,
    },
}

#[derive(Debug)]
struct Inner {
    config: SimConfig,
    state: Mutex<State>,
    done: watch::Sender<bool>,
}

/// The simulator. Cheap to clone; clones share one scenario.
#[derive(Debug, Clone)]
pub struct TeambotSim {
    inner: Arc<Inner>,
}

impl TeambotSim {
    /// A simulator for `config` (team count capped at [`MAX_TEAMS`], shares clamped to 0..=1).
    pub fn new(mut config: SimConfig) -> Self {
        config.teams = config.teams.min(MAX_TEAMS);
        config.props_share = config.props_share.clamp(0.0, 1.0);
        config.refuse_connect_share = config.refuse_connect_share.clamp(0.0, 1.0);
        config.refuse_upgrade_share = config.refuse_upgrade_share.clamp(0.0, 1.0);
        config.message_rate = config.message_rate.max(0.0);
        config.team_drop_rate = config.team_drop_rate.max(0.0);
        config.global_drop_rate = config.global_drop_rate.max(0.0);
        config.tick = config.tick.max(Duration::from_millis(1));
        let (done, _) = watch::channel(false);
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::new(config.clone())),
                config,
                done,
            }),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &SimConfig {
        &self.inner.config
    }

    /// Bytes charged to the state budget (`SimConfig::max_state_bytes`) now.
    pub fn state_bytes(&self) -> usize {
        lock(&self.inner.state).state_bytes()
    }

    /// `team.connect` tokens handed out and not yet used or expired.
    pub fn outstanding_tokens(&self) -> usize {
        lock(&self.inner.state).outstanding_tokens()
    }

    /// The worst-case bytes of simulator state, the formula of `docs/protocols/teambot.md`:
    /// `T·TEAM_BYTES + min(max_tokens·TOKEN_BYTES + L·MISMATCH_BYTES, max_state_bytes)`, where
    /// `T` is the number of teams and `L` is `max_listed_mismatches` (the plan is always
    /// charged; tokens and mismatches only within the budget), plus `T·24` for the set of teams
    /// a pending healthcheck must list.
    pub fn worst_case_bytes(&self) -> usize {
        let config = &self.inner.config;
        let plan = config.teams.saturating_mul(state::TEAM_BYTES);
        let pending = config.teams.saturating_mul(24);
        let work = config
            .max_tokens
            .saturating_mul(state::TOKEN_BYTES)
            .saturating_add(
                config
                    .max_listed_mismatches
                    .saturating_mul(state::MISMATCH_BYTES),
            );
        let budget_left = config.max_state_bytes.saturating_sub(plan);
        plan.saturating_add(pending)
            .saturating_add(work.min(budget_left))
    }

    /// The scorecard so far (final once [`Scorecard::finished`]).
    pub fn scorecard(&self) -> Scorecard {
        lock(&self.inner.state).scorecard()
    }

    /// Resolves with the final scorecard once the scenario has ended.
    pub async fn finished(&self) -> Scorecard {
        let mut done = self.inner.done.subscribe();
        // The sender lives in `self`, so this only ends once the flag is set.
        let _ = done.wait_for(|finished| *finished).await;
        self.scorecard()
    }

    fn start_driver(&self) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut ticker = interval(inner.config.tick);
            ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let finished = lock(&inner.state).tick(Instant::now());
                if finished {
                    inner.done.send_replace(true);
                    break;
                }
            }
        });
    }
}

impl Protocol for TeambotSim {
    type Conn = SimConn;

    fn name(&self) -> &'static str {
        "teambot-sim"
    }

    fn admit(&self, handshake: &Handshake<'_>) -> Result<SimConn, Reject> {
        if handshake.path == "/global" {
            // Single owner: a second global socket would take over the scenario (and answer
            // healthchecks for the bot), so it is refused while one is open.
            // The Host header goes into every ws_url handed out: keep it to a real host:port.
            if handshake
                .host
                .is_some_and(|host| host.len() > MAX_HOST_BYTES)
            {
                return Err(Reject::BadRequest("Host header too long".into()));
            }
            let mut state = lock(&self.inner.state);
            if state.global_taken() {
                state.global_refused();
                return Err(Reject::Forbidden(
                    "another global connection is open".into(),
                ));
            }
            return Ok(SimConn::Global {
                host: handshake.host.map(str::to_owned),
            });
        }
        let Some(id) = handshake.path.strip_prefix("/team/") else {
            return Err(Reject::NotFound);
        };
        let id: u64 = id.parse().map_err(|_| Reject::NotFound)?;
        let token = handshake
            .query_param("token")
            .ok_or_else(|| Reject::BadRequest("missing token".into()))?;
        match lock(&self.inner.state).admit_team(id, &token) {
            TeamAdmit::Ok => Ok(SimConn::Team { id }),
            TeamAdmit::BadToken => Err(Reject::Forbidden("unknown or expired token".into())),
            TeamAdmit::Left => Err(Reject::Forbidden("team has left".into())),
            TeamAdmit::Refused => Err(Reject::Unavailable("chaos: connect refused".into())),
        }
    }

    async fn on_open(&self, conn: &mut SimConn, cx: &Context<'_>) {
        let peer = cx.peer();
        match conn {
            SimConn::Global { .. } => {
                let opened = lock(&self.inner.state).global_opened(peer);
                if opened == GlobalOpen::Started {
                    self.start_driver();
                }
            }
            SimConn::Team { id } => lock(&self.inner.state).team_opened(*id, peer),
        }
    }

    async fn on_text(&self, conn: &mut SimConn, cx: &Context<'_>, text: &str) {
        let peer = cx.peer();
        let Ok(value) = serde_json::from_str::<Value>(text) else {
            let _ = peer.send(error_frame(
                "invalid JSON",
                &Value::String(text.to_owned()),
                &Value::Null,
            ));
            return;
        };
        let kind = value.get("type").and_then(Value::as_str).unwrap_or("");
        if matches!(conn, SimConn::Global { .. }) && !lock(&self.inner.state).is_global(peer) {
            // A refused (closing) second global socket: it must not touch the scenario.
            return;
        }
        match (conn, kind) {
            (SimConn::Global { host }, "team.connect") => {
                let reply = lock(&self.inner.state).team_connect(peer, host.as_deref(), &value);
                if reply.delay.is_zero() {
                    let _ = reply.peer.send(reply.frame);
                } else {
                    tokio::spawn(async move {
                        tokio::time::sleep(reply.delay).await;
                        let _ = reply.peer.send(reply.frame);
                    });
                }
            }
            (SimConn::Global { .. }, "healthcheck") => {
                lock(&self.inner.state).healthcheck_reply(peer.id(), &value);
            }
            (SimConn::Team { id }, "ping") => match value.get("unique_id") {
                Some(unique_id) => {
                    let pong = serde_json::json!({"type": "pong", "unique_id": unique_id});
                    let _ = peer.send(switchboard_core::Frame::text(pong.to_string()));
                }
                None => {
                    let _ = peer.send(error_frame(
                        "ping needs a unique_id",
                        &value,
                        &Value::from(*id),
                    ));
                }
            },
            (SimConn::Team { id }, "message") => {
                debug!(team = *id, "the bot sent a message");
                lock(&self.inner.state).bot_message();
            }
            (conn, _) => {
                let team = match conn {
                    SimConn::Team { id } => Value::from(*id),
                    SimConn::Global { .. } => Value::Null,
                };
                warn!(kind = %clip(kind), "unknown client event");
                let _ = peer.send(error_frame("unknown event type", &value, &team));
            }
        }
    }

    async fn on_close(&self, conn: SimConn, cx: &Context<'_>) {
        let peer = cx.peer();
        match conn {
            SimConn::Global { .. } => lock(&self.inner.state).global_closed(peer),
            SimConn::Team { id } => lock(&self.inner.state).team_closed(id, peer),
        }
    }

    async fn http(&self, _engine: &Engine, request: HttpRequest) -> Option<HttpResponse> {
        match (request.method.as_str(), request.path.as_str()) {
            ("GET", "/scorecard") => Some(HttpResponse::json(200, &self.scorecard())),
            (_, "/scorecard") => Some(HttpResponse::json_error(405, "method not allowed")),
            _ => web::serve(&request),
        }
    }
}
