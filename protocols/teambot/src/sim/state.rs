//! The simulator's state machine: the plan, the truth, and the healthcheck comparison.
//!
//! Everything here runs under one mutex with no `.await`: sending to a [`Peer`] never waits.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use rand::rngs::{OsRng, StdRng};
use rand::{Rng, SeedableRng, TryRngCore};
use serde_json::{Value, json};
use switchboard_core::{CloseReason, ConnId, Frame, MemoryBudget, Peer};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::SimConfig;
use super::scorecard::{
    ChaosScore, GlobalScore, HealthcheckScore, Mismatch, Scorecard, TeamScore, Totals,
};

/// Close reasons the simulator gives start with this, so `on_close` can tell them apart from
/// closes the client started.
pub(crate) const CLOSE_PREFIX: &str = "teambot-sim: ";

/// Longest piece of client input a log line (or a stored mismatch) carries, in characters.
pub const LOG_CLIP_CHARS: usize = 256;

/// `text` cut to [`LOG_CLIP_CHARS`] characters, with a marker saying how long it was, so one
/// client frame cannot write a huge log line.
pub(crate) fn clip(text: &str) -> Cow<'_, str> {
    match text.char_indices().nth(LOG_CLIP_CHARS) {
        None => Cow::Borrowed(text),
        Some((end, _)) => Cow::Owned(format!(
            "{}…[cut, {} bytes in all]",
            text.get(..end).unwrap_or_default(),
            text.len()
        )),
    }
}

/// A JSON value from a client, kept as is when its encoding is short, otherwise replaced by the
/// clipped encoding (a string), so the scorecard's mismatch list stays small.
fn clip_value(value: Value) -> Value {
    let encoded = value.to_string();
    match clip(&encoded) {
        Cow::Borrowed(_) => value,
        Cow::Owned(cut) => Value::String(cut),
    }
}

/// A fresh single-use token from the operating system's RNG: 128 bits as 32 hex digits. Not
/// from the seeded RNG, so tokens cannot be predicted from the seed or repeated across runs.
fn fresh_token() -> Option<String> {
    let mut bytes = [0u8; 16];
    OsRng.try_fill_bytes(&mut bytes).ok()?;
    Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Bytes one outstanding token is charged: three hash-table slots (the table keeps 1/8 free and
/// at most doubles, so fewer than 16/7 slots per entry) plus the 32-byte token string and its
/// allocation.
pub const TOKEN_BYTES: usize = 3 * (std::mem::size_of::<(String, (u64, Instant))>() + 1) + 32 + 16;

/// Bytes one planned team is charged: its record and its index entry (three slots, as above).
pub const TEAM_BYTES: usize =
    std::mem::size_of::<SimTeam>() + 3 * (std::mem::size_of::<(u64, usize)>() + 1);

/// Most bytes one listed mismatch is charged: the record, a problem text of up to
/// [`MAX_PROBLEM_BYTES`] and two JSON values whose encoding is at most
/// [`LOG_CLIP_CHARS`] characters (4 bytes each) plus the cut marker, at [`VALUE_BYTES_PER_BYTE`]
/// bytes of memory per encoded byte.
pub const MISMATCH_BYTES: usize = std::mem::size_of::<Mismatch>()
    + MAX_PROBLEM_BYTES
    + 2 * VALUE_BYTES_PER_BYTE * (LOG_CLIP_CHARS * 4 + 64);

/// Longest problem text the simulator writes (they are its own words, plus a team id).
pub const MAX_PROBLEM_BYTES: usize = 128;

/// Memory a `serde_json::Value` may take per byte of its encoding (charged estimate: `[[],[]]`
/// costs a 32-byte value per 3 bytes; maps cost more per entry but need at least 6 bytes).
pub const VALUE_BYTES_PER_BYTE: usize = 16;

/// What a listed mismatch is charged.
fn mismatch_bytes(mismatch: &Mismatch) -> usize {
    let encoded = |v: &Value| v.to_string().len();
    std::mem::size_of::<Mismatch>()
        .saturating_add(mismatch.problem.len().min(MAX_PROBLEM_BYTES))
        .saturating_add(
            encoded(&mismatch.expected)
                .saturating_add(encoded(&mismatch.reported))
                .saturating_mul(VALUE_BYTES_PER_BYTE),
        )
}

/// What [`State::global_opened`] did with a new global socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GlobalOpen {
    /// It is the global socket now and it started the scenario.
    Started,
    /// It is the global socket now.
    Accepted,
    /// Another global socket is open: this one was closed (1008).
    Refused,
}

/// Which socket carries a team's `team.left`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
    Team,
    Global,
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Self::Team => "team",
            Self::Global => "global",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TeamPhase {
    Active,
    /// No more messages; `team.left` goes out on the global socket after `leave_quiet`.
    Leaving(Instant),
    Left(Via),
}

#[derive(Debug)]
struct SimTeam {
    id: u64,
    join_at: Duration,
    leave: Option<(Duration, Via)>,
    joined: bool,
    phase: TeamPhase,
    socket: Option<Peer>,
    delivered: u64,
    props: u64,
    connections: u64,
    connect_requests: u64,
    server_drops: u64,
    client_closes: u64,
    reported: Option<(u64, u64)>,
    reported_connected: Option<bool>,
}

impl SimTeam {
    fn live_socket(&self) -> Option<&Peer> {
        self.socket.as_ref().filter(|peer| !peer.is_closing())
    }
}

/// Where the scenario is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// No global socket yet.
    Waiting,
    /// Joins, messages, leaves, healthchecks, chaos.
    Running,
    /// Traffic and chaos stopped; waiting for every live team to be connected.
    Settling(Instant),
    /// Everything connected; a quiet period lets in-flight frames land.
    Quiet(Instant),
    /// The final healthcheck is out.
    FinalCheck,
    /// `goodbye` sent.
    Finished,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Running => "running",
            Self::Settling(_) => "settling",
            Self::Quiet(_) => "quiet",
            Self::FinalCheck => "final-check",
            Self::Finished => "finished",
        }
    }
}

#[derive(Debug)]
struct Pending {
    seq: u64,
    conn: ConnId,
    sent_at: Instant,
    /// Teams whose `team.join` was delivered before the request: each must be in the reply.
    required: BTreeSet<u64>,
    final_check: bool,
}

/// A `team.connect` answer to send, maybe later.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) peer: Peer,
    pub(crate) frame: Frame,
    pub(crate) delay: Duration,
}

/// Why a team socket upgrade is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TeamAdmit {
    Ok,
    BadToken,
    Left,
    Refused,
}

#[derive(Debug)]
pub(crate) struct State {
    config: SimConfig,
    rng: StdRng,
    pub(crate) phase: Phase,
    started: Option<Instant>,
    last_tick: Option<Instant>,
    teams: Vec<SimTeam>,
    index: HashMap<u64, usize>,
    global: Option<Peer>,
    global_connections: u64,
    global_refused: u64,
    tokens: HashMap<String, (u64, Instant)>,
    message_budget: f64,
    next_healthcheck: Option<Instant>,
    pending: Option<Pending>,
    healthchecks: HealthcheckScore,
    chaos: ChaosScore,
    bot_messages: u64,
    mismatches: Vec<Mismatch>,
    mismatch_count: u64,
    /// Charged with the plan, every outstanding token and every listed mismatch.
    budget: MemoryBudget,
    settle_reported: bool,
    final_timed_out: bool,
}

const NAMES: [&str; 8] = ["ana", "bo", "cy", "dee", "eli", "fay", "gus", "hal"];
const THINGS: [&str; 6] = [
    "the release",
    "the demo",
    "code review",
    "the hotfix",
    "the migration",
    "on-call",
];

impl State {
    pub(crate) fn new(config: SimConfig) -> Self {
        let mut rng = StdRng::seed_from_u64(config.seed);
        let mut teams = Vec::with_capacity(config.teams);
        let mut ids = BTreeSet::new();
        while ids.len() < config.teams {
            ids.insert(rng.random_range(1..=999_999u64));
        }
        let join_window = config.join_window.min(config.duration / 2);
        for id in ids {
            let join_at = join_window.mul_f64(rng.random_range(0.0..=1.0));
            teams.push(SimTeam {
                id,
                join_at,
                leave: None,
                joined: false,
                phase: TeamPhase::Active,
                socket: None,
                delivered: 0,
                props: 0,
                connections: 0,
                connect_requests: 0,
                server_drops: 0,
                client_closes: 0,
                reported: None,
                reported_connected: None,
            });
        }
        teams.sort_by_key(|team| (team.join_at, team.id));
        // Leaves happen in the middle of the run, once teams had time to connect and chat.
        let leaving = config.leaving_teams.min(teams.len());
        let mut chosen = BTreeSet::new();
        while chosen.len() < leaving {
            chosen.insert(rng.random_range(0..teams.len()));
        }
        for (nth, index) in chosen.into_iter().enumerate() {
            let team = &mut teams[index];
            let earliest = team.join_at.max(config.duration.mul_f64(0.3));
            let latest = config.duration.mul_f64(0.7).max(earliest);
            let at = earliest + (latest - earliest).mul_f64(rng.random_range(0.0..=1.0));
            // Alternating, so both ways are exercised whenever two or more teams leave.
            let via = if nth % 2 == 0 { Via::Team } else { Via::Global };
            team.leave = Some((at, via));
        }
        let index = teams
            .iter()
            .enumerate()
            .map(|(i, team)| (team.id, i))
            .collect();
        // The plan is the configuration: it is charged whether or not it fits, so later work
        // (tokens, mismatches) sees what is left.
        let budget = MemoryBudget::new(config.max_state_bytes);
        budget.force_reserve(teams.len().saturating_mul(TEAM_BYTES));
        Self {
            config,
            rng,
            phase: Phase::Waiting,
            started: None,
            last_tick: None,
            teams,
            index,
            global: None,
            global_connections: 0,
            global_refused: 0,
            tokens: HashMap::new(),
            message_budget: 0.0,
            next_healthcheck: None,
            pending: None,
            healthchecks: HealthcheckScore::default(),
            chaos: ChaosScore::default(),
            bot_messages: 0,
            mismatches: Vec::new(),
            mismatch_count: 0,
            budget,
            settle_reported: false,
            final_timed_out: false,
        }
    }

    fn team_mut(&mut self, id: u64) -> Option<&mut SimTeam> {
        let index = *self.index.get(&id)?;
        self.teams.get_mut(index)
    }

    fn global_live(&self) -> Option<&Peer> {
        self.global.as_ref().filter(|peer| !peer.is_closing())
    }

    fn mismatch(&mut self, mut mismatch: Mismatch) {
        // `reported` (and sometimes `expected`) is client input: keep and log it clipped.
        mismatch.reported = clip_value(mismatch.reported);
        mismatch.expected = clip_value(mismatch.expected);
        warn!(
            healthcheck = ?mismatch.healthcheck,
            team = ?mismatch.team,
            problem = %clip(&mismatch.problem),
            expected = %mismatch.expected,
            reported = %mismatch.reported,
            "scorecard mismatch"
        );
        self.mismatch_count += 1;
        // Every mismatch is counted; the list keeps the first ones while it and the budget allow.
        if self.mismatches.len() < self.config.max_listed_mismatches
            && self.budget.try_reserve(mismatch_bytes(&mismatch)).is_ok()
        {
            self.mismatches.push(mismatch);
        }
    }

    fn chaos_on(&self) -> bool {
        self.phase == Phase::Running
    }

    // ----- global socket -----

    /// Whether a global socket is open (and not being closed): a second one is refused, so only
    /// one client at a time drives the scenario and answers healthchecks.
    pub(crate) fn global_taken(&self) -> bool {
        self.global_live().is_some()
    }

    /// Counts a global upgrade refused because another global socket is open.
    pub(crate) fn global_refused(&mut self) {
        self.global_refused = self.global_refused.saturating_add(1);
        info!(
            refused = self.global_refused,
            "a second global connection was refused"
        );
    }

    /// Whether `peer` is the current global socket (frames from any other are ignored).
    pub(crate) fn is_global(&self, peer: &Peer) -> bool {
        self.global.as_ref().is_some_and(|g| g == peer)
    }

    /// A global socket opened. If another one is still open (two upgrades raced past
    /// [`State::global_taken`]), the newcomer is closed with 1008 and the owner keeps the role.
    pub(crate) fn global_opened(&mut self, peer: &Peer) -> GlobalOpen {
        if self.global_live().is_some_and(|live| live != peer) {
            self.global_refused();
            peer.close(CloseReason::new(
                CloseReason::POLICY,
                format!("{CLOSE_PREFIX}another global connection is open"),
            ));
            return GlobalOpen::Refused;
        }
        self.global_connections += 1;
        // A previous global socket here is already closing (chaos or the runtime closed it).
        self.global = Some(peer.clone());
        info!(conn = %peer.id(), connections = self.global_connections, "global socket open");
        let _ = peer.send(Frame::from_static(r#"{"type":"hello"}"#));
        match self.phase {
            Phase::Waiting => {
                let now = Instant::now();
                self.phase = Phase::Running;
                self.started = Some(now);
                self.last_tick = Some(now);
                self.next_healthcheck = Some(now + self.config.healthcheck_interval);
                info!(
                    seed = self.config.seed,
                    teams = self.teams.len(),
                    "scenario started"
                );
                GlobalOpen::Started
            }
            Phase::Finished => {
                let _ = peer.send(Frame::from_static(r#"{"type":"goodbye"}"#));
                GlobalOpen::Accepted
            }
            _ => GlobalOpen::Accepted,
        }
    }

    pub(crate) fn global_closed(&mut self, peer: &Peer) {
        if self.global.as_ref().is_some_and(|g| g == peer) {
            self.global = None;
        }
        if self.pending.as_ref().is_some_and(|p| p.conn == peer.id()) {
            // The reply can no longer arrive: not the client's fault.
            self.pending = None;
            self.healthchecks.lost += 1;
            debug!("healthcheck lost with its global socket");
        }
        info!(conn = %peer.id(), reason = ?peer.close_reason(), "global socket closed");
    }

    /// Answers a `team.connect` request: a URL (maybe delayed), or an `error`.
    pub(crate) fn team_connect(
        &mut self,
        peer: &Peer,
        host: Option<&str>,
        request: &Value,
    ) -> Reply {
        let now_reply = |frame| Reply {
            peer: peer.clone(),
            frame,
            delay: Duration::ZERO,
        };
        let raw_id = request.get("team_id").cloned().unwrap_or(Value::Null);
        let Some(id) = raw_id.as_u64() else {
            return now_reply(error_frame("team_id must be a number", request, &raw_id));
        };
        let chaos = self.chaos_on();
        let refuse = chaos && self.roll(self.config.refuse_connect_share);
        let delay = if chaos && !self.config.connect_delay_max.is_zero() {
            self.config
                .connect_delay_max
                .mul_f64(self.rng.random_range(0.0..=1.0))
        } else {
            Duration::ZERO
        };
        let Some(team) = self.team_mut(id).filter(|team| team.joined) else {
            return now_reply(error_frame("unknown team", request, &raw_id));
        };
        team.connect_requests += 1;
        if matches!(team.phase, TeamPhase::Left(_)) {
            return now_reply(error_frame("team has left", request, &raw_id));
        }
        if refuse {
            self.chaos.refused_connects += 1;
            debug!(team = id, "chaos: refusing team.connect");
            return now_reply(error_frame(
                "team is not available right now, try again",
                request,
                &raw_id,
            ));
        }
        let Some(host) = self.config.public_host.as_deref().or(host) else {
            return now_reply(error_frame(
                "no Host header to build a ws_url from",
                request,
                &raw_id,
            ));
        };
        let now = Instant::now();
        let before = self.tokens.len();
        self.tokens.retain(|_, (_, expires)| *expires > now);
        let expired = before.saturating_sub(self.tokens.len());
        self.budget.release(expired.saturating_mul(TOKEN_BYTES));
        if self.tokens.len() >= self.config.max_tokens
            || self.budget.try_reserve(TOKEN_BYTES).is_err()
        {
            return now_reply(error_frame(
                "too many outstanding connects, try again",
                request,
                &raw_id,
            ));
        }
        let Some(token) = fresh_token() else {
            self.budget.release(TOKEN_BYTES);
            warn!("the operating system's RNG failed: no token for team.connect");
            return now_reply(error_frame(
                "could not issue a token, try again",
                request,
                &raw_id,
            ));
        };
        let url = format!(
            "{}://{host}/team/{id}?token={token}",
            self.config.url_scheme.as_str()
        );
        self.tokens.insert(token, (id, now + self.config.token_ttl));
        if !delay.is_zero() {
            self.chaos.delayed_connects += 1;
        }
        debug!(team = id, url = %clip(&url), ?delay, "answering team.connect");
        let frame = frame(&json!({"type": "team.connect", "team_id": id, "ws_url": url}));
        Reply {
            peer: peer.clone(),
            frame,
            delay,
        }
    }

    /// Compares a `healthcheck` reply that arrived on global socket `conn`.
    pub(crate) fn healthcheck_reply(&mut self, conn: ConnId, reply: &Value) {
        let pending = match self.pending.take() {
            Some(pending) if pending.conn == conn => pending,
            other => {
                self.pending = other;
                self.mismatch(Mismatch {
                    healthcheck: None,
                    final_check: false,
                    team: None,
                    problem: "healthcheck reply nobody asked for (late or duplicate)".into(),
                    expected: Value::Null,
                    reported: reply.clone(),
                });
                return;
            }
        };
        self.healthchecks.answered += 1;
        let seq = Some(pending.seq);
        let final_check = pending.final_check;
        let mut found = Vec::new();
        let mut problems = Vec::new();
        let problem = |team: Option<u64>, what: &str, expected: Value, reported: Value| Mismatch {
            healthcheck: seq,
            final_check,
            team,
            problem: what.to_owned(),
            expected,
            reported,
        };
        let Some(stats) = reply.get("stats").and_then(Value::as_array) else {
            self.mismatch(problem(
                None,
                "stats is not an array",
                json!("array"),
                reply.clone(),
            ));
            return;
        };
        for entry in stats {
            let Some(id) = entry.get("id").and_then(Value::as_u64) else {
                problems.push(problem(
                    None,
                    "id is not a number",
                    json!("number"),
                    entry.clone(),
                ));
                continue;
            };
            if found.contains(&id) {
                problems.push(problem(
                    Some(id),
                    "duplicate entry",
                    json!(1),
                    entry.clone(),
                ));
                continue;
            }
            found.push(id);
            let messages = entry.get("message_count").and_then(Value::as_u64);
            let props = entry.get("props_count").and_then(Value::as_u64);
            let connected = entry.get("connected").and_then(Value::as_bool);
            let (Some(messages), Some(props), Some(connected)) = (messages, props, connected)
            else {
                problems.push(problem(
                    Some(id),
                    "entry needs message_count, props_count (numbers) and connected (bool)",
                    Value::Null,
                    entry.clone(),
                ));
                continue;
            };
            let Some(team) = self.index.get(&id).and_then(|&i| self.teams.get_mut(i)) else {
                problems.push(problem(
                    Some(id),
                    "unknown team",
                    Value::Null,
                    entry.clone(),
                ));
                continue;
            };
            if !team.joined {
                problems.push(problem(
                    Some(id),
                    "team never joined",
                    Value::Null,
                    entry.clone(),
                ));
                continue;
            }
            let expected_connected =
                team.socket.is_some() && !matches!(team.phase, TeamPhase::Left(_));
            let checks = [
                ("message_count", messages, team.delivered),
                ("props_count", props, team.props),
            ];
            for (field, reported, delivered) in checks {
                if final_check {
                    if reported != delivered {
                        problems.push(problem(
                            Some(id),
                            &format!("{field} differs"),
                            json!(delivered),
                            json!(reported),
                        ));
                    }
                } else if reported > delivered {
                    problems.push(problem(
                        Some(id),
                        &format!("{field} over-counts"),
                        json!(format!("<= {delivered}")),
                        json!(reported),
                    ));
                }
            }
            if let Some((last_messages, last_props)) = team.reported
                && (messages < last_messages || props < last_props)
            {
                problems.push(problem(
                    Some(id),
                    "counts went backwards",
                    json!({"message_count": last_messages, "props_count": last_props}),
                    json!({"message_count": messages, "props_count": props}),
                ));
            }
            if final_check && connected != expected_connected {
                problems.push(problem(
                    Some(id),
                    "connected differs",
                    json!(expected_connected),
                    json!(connected),
                ));
            }
            team.reported = Some((messages, props));
            team.reported_connected = Some(connected);
        }
        for id in &pending.required {
            if !found.contains(id) {
                problems.push(problem(
                    Some(*id),
                    "team missing from reply",
                    json!(id),
                    Value::Null,
                ));
            }
        }
        let clean = problems.is_empty();
        for mismatch in problems {
            self.mismatch(mismatch);
        }
        if final_check {
            self.healthchecks.final_answered = true;
        }
        info!(
            healthcheck = pending.seq,
            final_check,
            teams = found.len(),
            clean,
            "healthcheck compared"
        );
    }

    /// Bytes charged to the state budget now.
    pub(crate) fn state_bytes(&self) -> usize {
        self.budget.used()
    }

    /// Outstanding tokens now.
    pub(crate) fn outstanding_tokens(&self) -> usize {
        self.tokens.len()
    }

    // ----- team sockets -----

    pub(crate) fn admit_team(&mut self, id: u64, token: &str) -> TeamAdmit {
        let now = Instant::now();
        let used = self.tokens.remove(token);
        if used.is_some() {
            self.budget.release(TOKEN_BYTES);
        }
        match used {
            Some((team, expires)) if team == id && expires > now => {}
            _ => return TeamAdmit::BadToken,
        }
        let left = self
            .team_mut(id)
            .is_none_or(|team| matches!(team.phase, TeamPhase::Left(_)));
        if left {
            return TeamAdmit::Left;
        }
        if self.chaos_on() && self.roll(self.config.refuse_upgrade_share) {
            self.chaos.refused_upgrades += 1;
            debug!(team = id, "chaos: refusing a team socket upgrade");
            return TeamAdmit::Refused;
        }
        TeamAdmit::Ok
    }

    pub(crate) fn team_opened(&mut self, id: u64, peer: &Peer) {
        let Some(team) = self.team_mut(id) else {
            peer.close(CloseReason::normal(format!("{CLOSE_PREFIX}unknown team")));
            return;
        };
        if matches!(team.phase, TeamPhase::Left(_)) {
            peer.close(CloseReason::normal(format!("{CLOSE_PREFIX}team has left")));
            return;
        }
        if let Some(old) = team.socket.replace(peer.clone()) {
            old.close(CloseReason::normal(format!(
                "{CLOSE_PREFIX}replaced by a newer team connection"
            )));
        }
        team.connections += 1;
        info!(team = id, conn = %peer.id(), connections = team.connections, "team socket open");
        let _ = peer.send(Frame::from_static(r#"{"type":"hello"}"#));
    }

    pub(crate) fn team_closed(&mut self, id: u64, peer: &Peer) {
        let Some(team) = self.team_mut(id) else {
            return;
        };
        if team.socket.as_ref().is_some_and(|s| s == peer) {
            team.socket = None;
        }
        let ours = peer
            .close_reason()
            .is_some_and(|reason| reason.reason.starts_with(CLOSE_PREFIX));
        let gone = !matches!(team.phase, TeamPhase::Left(_));
        if !ours && gone {
            team.client_closes += 1;
        }
        info!(team = id, conn = %peer.id(), reason = ?peer.close_reason(), "team socket closed");
    }

    pub(crate) fn bot_message(&mut self) {
        self.bot_messages += 1;
    }

    // ----- the scenario clock -----

    /// One step of the scenario; returns `true` once it is finished.
    pub(crate) fn tick(&mut self, now: Instant) -> bool {
        let Some(started) = self.started else {
            return false;
        };
        let dt = now
            .saturating_duration_since(self.last_tick.unwrap_or(now))
            .as_secs_f64();
        self.last_tick = Some(now);
        let elapsed = now.saturating_duration_since(started);
        self.expire_healthcheck(now);
        match self.phase {
            Phase::Waiting | Phase::Finished => {}
            Phase::Running => {
                self.joins(elapsed);
                self.leaves(elapsed, now);
                self.messages(dt);
                self.request_healthcheck(now);
                self.chaos(dt);
                if elapsed >= self.config.duration {
                    info!("traffic over: settling before the final healthcheck");
                    self.phase = Phase::Settling(now);
                }
            }
            Phase::Settling(since) => {
                // Everything planned still happens, just without traffic or chaos.
                self.joins(Duration::MAX);
                self.leaves(Duration::MAX, now);
                if self.settled() {
                    self.phase = Phase::Quiet(now);
                } else if now.saturating_duration_since(since) >= self.config.settle_timeout
                    && self.global_live().is_some()
                    && self.pending.is_none()
                {
                    if !self.settle_reported {
                        self.settle_reported = true;
                        self.report_unsettled();
                    }
                    self.phase = Phase::Quiet(now);
                }
            }
            Phase::Quiet(since) => {
                if now.saturating_duration_since(since) >= self.config.quiet_period {
                    if self.pending.is_some() {
                        // Let an interim healthcheck finish first.
                    } else if self.global_live().is_some() {
                        self.send_healthcheck(now, true);
                        self.phase = Phase::FinalCheck;
                    } else {
                        self.phase = Phase::Settling(now);
                    }
                }
            }
            Phase::FinalCheck => {
                if self.healthchecks.final_answered || self.final_timed_out {
                    self.finish();
                } else if self.pending.is_none() {
                    // Lost with its global socket: settle again and ask again.
                    self.phase = Phase::Settling(now);
                }
            }
        }
        let limit = self.config.duration
            + self.config.settle_timeout * 2
            + self.config.quiet_period
            + self.config.healthcheck_timeout * 2;
        if self.phase != Phase::Finished && elapsed > limit {
            self.mismatch(Mismatch {
                healthcheck: None,
                final_check: true,
                team: None,
                problem: "the final healthcheck never completed".into(),
                expected: json!("an answered final healthcheck"),
                reported: Value::Null,
            });
            self.finish();
        }
        self.phase == Phase::Finished
    }

    fn roll(&mut self, share: f64) -> bool {
        share > 0.0 && self.rng.random_bool(share.min(1.0))
    }

    fn joins(&mut self, elapsed: Duration) {
        let Some(global) = self.global_live().cloned() else {
            return;
        };
        for team in &mut self.teams {
            if !team.joined && team.join_at <= elapsed {
                let join = frame(&json!({"type": "team.join", "team_id": team.id}));
                if global.send(join).is_queued() {
                    team.joined = true;
                    info!(team = team.id, "team.join sent");
                }
            }
        }
    }

    fn leaves(&mut self, elapsed: Duration, now: Instant) {
        let global = self.global_live().cloned();
        let quiet = self.config.leave_quiet;
        for team in &mut self.teams {
            let Some((at, via)) = team.leave else {
                continue;
            };
            if !team.joined || at > elapsed {
                continue;
            }
            match (team.phase, via) {
                (TeamPhase::Active, Via::Team) => {
                    // On the team socket itself: every message before it arrives first.
                    let Some(socket) = team.live_socket() else {
                        continue;
                    };
                    let left = frame(&json!({"type": "team.left", "team_id": team.id}));
                    if socket.send(left).is_queued() {
                        team.phase = TeamPhase::Left(Via::Team);
                        info!(team = team.id, "team.left sent on the team socket");
                    }
                }
                (TeamPhase::Active, Via::Global) => {
                    // Stop messages first, so none is in flight when the client closes.
                    team.phase = TeamPhase::Leaving(now);
                }
                (TeamPhase::Leaving(since), _) => {
                    if now.saturating_duration_since(since) < quiet {
                        continue;
                    }
                    let Some(global) = &global else {
                        continue;
                    };
                    let left = frame(&json!({"type": "team.left", "team_id": team.id}));
                    if global.send(left).is_queued() {
                        team.phase = TeamPhase::Left(Via::Global);
                        info!(team = team.id, "team.left sent on the global socket");
                    }
                }
                (TeamPhase::Left(_), _) => {}
            }
        }
    }

    fn messages(&mut self, dt: f64) {
        self.message_budget += self.config.message_rate * dt;
        let due = self.message_budget.floor();
        self.message_budget -= due;
        let due = (due as u64).min(self.config.max_messages_per_tick);
        for _ in 0..due {
            let live: Vec<usize> = self
                .teams
                .iter()
                .enumerate()
                .filter(|(_, team)| team.phase == TeamPhase::Active && team.live_socket().is_some())
                .map(|(i, _)| i)
                .collect();
            if live.is_empty() {
                self.message_budget = 0.0;
                return;
            }
            let index = live[self.rng.random_range(0..live.len())];
            let props = self.roll(self.config.props_share);
            let text = message_text(&mut self.rng, props);
            let team = &mut self.teams[index];
            let Some(socket) = team.live_socket() else {
                continue;
            };
            // Counted only when it is really queued on a live socket: a frame refused because
            // the socket is closing never reaches the client.
            if socket
                .send(frame(&json!({"type": "message", "text": text})))
                .is_queued()
            {
                team.delivered += 1;
                if props {
                    team.props += 1;
                }
            }
        }
    }

    fn request_healthcheck(&mut self, now: Instant) {
        if self.pending.is_some() || self.next_healthcheck.is_some_and(|at| now < at) {
            return;
        }
        if self.global_live().is_some() {
            self.send_healthcheck(now, false);
            self.next_healthcheck = Some(now + self.config.healthcheck_interval);
        }
    }

    fn send_healthcheck(&mut self, now: Instant, final_check: bool) {
        let Some(global) = self.global_live().cloned() else {
            return;
        };
        if global
            .send(Frame::from_static(r#"{"type":"healthcheck"}"#))
            .is_queued()
        {
            self.healthchecks.sent += 1;
            let required = self
                .teams
                .iter()
                .filter(|team| team.joined)
                .map(|team| team.id)
                .collect();
            self.pending = Some(Pending {
                seq: self.healthchecks.sent,
                conn: global.id(),
                sent_at: now,
                required,
                final_check,
            });
            debug!(
                seq = self.healthchecks.sent,
                final_check, "healthcheck sent"
            );
        }
    }

    fn expire_healthcheck(&mut self, now: Instant) {
        let expired = self.pending.as_ref().is_some_and(|pending| {
            now.saturating_duration_since(pending.sent_at) >= self.config.healthcheck_timeout
        });
        if !expired {
            return;
        }
        if let Some(pending) = self.pending.take() {
            self.healthchecks.unanswered += 1;
            if pending.final_check {
                self.final_timed_out = true;
            }
            self.mismatch(Mismatch {
                healthcheck: Some(pending.seq),
                final_check: pending.final_check,
                team: None,
                problem: format!(
                    "no healthcheck reply within {:?}",
                    self.config.healthcheck_timeout
                ),
                expected: json!("a reply"),
                reported: Value::Null,
            });
        }
    }

    fn chaos(&mut self, dt: f64) {
        if self.roll(self.config.team_drop_rate * dt) {
            let live: Vec<usize> = self
                .teams
                .iter()
                .enumerate()
                .filter(|(_, team)| team.phase == TeamPhase::Active && team.live_socket().is_some())
                .map(|(i, _)| i)
                .collect();
            if !live.is_empty() {
                let index = live[self.rng.random_range(0..live.len())];
                let team = &mut self.teams[index];
                if let Some(socket) = team.socket.take() {
                    socket.close(CloseReason::new(
                        CloseReason::GOING_AWAY,
                        format!("{CLOSE_PREFIX}chaos drop"),
                    ));
                    team.server_drops += 1;
                    self.chaos.team_drops += 1;
                    info!(team = team.id, "chaos: dropped a team socket");
                }
            }
        }
        if self.roll(self.config.global_drop_rate * dt)
            && let Some(global) = self.global.take()
        {
            global.close(CloseReason::new(
                CloseReason::GOING_AWAY,
                format!("{CLOSE_PREFIX}chaos drop"),
            ));
            self.chaos.global_drops += 1;
            info!("chaos: dropped the global socket");
        }
    }

    /// Every planned team joined; every team that has not left has a socket; every team that
    /// left has none; the global socket is up and no healthcheck is out.
    fn settled(&self) -> bool {
        self.global_live().is_some()
            && self.pending.is_none()
            && self.teams.iter().all(|team| {
                team.joined
                    && match team.phase {
                        TeamPhase::Active => team.live_socket().is_some(),
                        TeamPhase::Leaving(_) => false,
                        TeamPhase::Left(_) => team.socket.is_none(),
                    }
            })
    }

    fn report_unsettled(&mut self) {
        let stuck: Vec<(u64, &'static str)> = self
            .teams
            .iter()
            .filter_map(|team| match team.phase {
                _ if !team.joined => Some((team.id, "never joined (no global socket)")),
                TeamPhase::Active if team.live_socket().is_none() => {
                    Some((team.id, "not reconnected when traffic stopped"))
                }
                TeamPhase::Leaving(_) => Some((team.id, "team.left could not be delivered")),
                TeamPhase::Left(_) if team.socket.is_some() => {
                    Some((team.id, "socket still open after team.left"))
                }
                _ => None,
            })
            .collect();
        for (id, problem) in stuck {
            self.mismatch(Mismatch {
                healthcheck: None,
                final_check: true,
                team: Some(id),
                problem: format!(
                    "{problem} (within the {:?} settle timeout)",
                    self.config.settle_timeout
                ),
                expected: Value::Null,
                reported: Value::Null,
            });
        }
    }

    fn finish(&mut self) {
        if let Some(global) = self.global_live() {
            let _ = global.send(Frame::from_static(r#"{"type":"goodbye"}"#));
        }
        self.phase = Phase::Finished;
        let card = self.scorecard();
        // The scorecard quotes client input (mismatches): the log line carries a clipped copy;
        // the whole card is at GET /scorecard (and printed by the CLI).
        let encoded = serde_json::to_string(&card).unwrap_or_default();
        info!(
            perfect = card.perfect,
            mismatches = card.mismatch_count,
            scorecard = %clip(&encoded),
            "scenario finished: goodbye sent"
        );
    }

    pub(crate) fn scorecard(&self) -> Scorecard {
        let teams: Vec<TeamScore> = self
            .teams
            .iter()
            .map(|team| TeamScore {
                id: team.id,
                joined: team.joined,
                left_via: match team.phase {
                    TeamPhase::Left(via) => Some(via.name().to_owned()),
                    _ => None,
                },
                expected_messages: team.delivered,
                expected_props: team.props,
                connected: team.socket.is_some(),
                reported_messages: team.reported.map(|(m, _)| m),
                reported_props: team.reported.map(|(_, p)| p),
                reported_connected: team.reported_connected,
                connections: team.connections,
                reconnects: team.connections.saturating_sub(1),
                connect_requests: team.connect_requests,
                server_drops: team.server_drops,
                client_closes: team.client_closes,
            })
            .collect();
        let totals = Totals {
            messages: teams.iter().map(|t| t.expected_messages).sum(),
            props: teams.iter().map(|t| t.expected_props).sum(),
            team_reconnects: teams.iter().map(|t| t.reconnects).sum(),
            bot_messages: self.bot_messages,
        };
        let finished = self.phase == Phase::Finished;
        Scorecard {
            seed: self.config.seed,
            phase: self.phase.name().to_owned(),
            finished,
            perfect: finished && self.healthchecks.final_answered && self.mismatch_count == 0,
            teams,
            healthchecks: self.healthchecks.clone(),
            global: GlobalScore {
                connections: self.global_connections,
                reconnects: self.global_connections.saturating_sub(1),
                server_drops: self.chaos.global_drops,
                refused: self.global_refused,
            },
            chaos: self.chaos.clone(),
            totals,
            mismatch_count: self.mismatch_count,
            mismatches: self.mismatches.clone(),
        }
    }
}

fn frame(value: &Value) -> Frame {
    Frame::text(value.to_string())
}

/// `error {message, received_message, team_id}` as the spec describes it.
pub(crate) fn error_frame(message: &str, received: &Value, team_id: &Value) -> Frame {
    frame(&json!({
        "type": "error",
        "message": message,
        "received_message": received,
        "team_id": team_id,
    }))
}

/// A chat line; `props` lines contain the word, the others never do.
fn message_text(rng: &mut StdRng, props: bool) -> String {
    let name = NAMES[rng.random_range(0..NAMES.len())];
    let thing = THINGS[rng.random_range(0..THINGS.len())];
    let pattern = if props {
        rng.random_range(0..3)
    } else {
        3 + rng.random_range(0..4)
    };
    match pattern {
        0 => format!("props to {name} for {thing}"),
        1 => format!("big props, {name}!"),
        2 => format!("{name}: props for {thing} :tada:"),
        3 => format!("{name} shipped {thing}"),
        4 => format!("who has {thing}?"),
        5 => format!("ping {name} about {thing}"),
        _ => format!("{name} is out today"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail by panicking")]

    use super::*;

    fn peer() -> Peer {
        switchboard_core::peer_channel(([127, 0, 0, 1], 9).into(), 16).0
    }

    #[test]
    fn a_racing_second_global_socket_is_closed_and_the_owner_stays() {
        let mut state = State::new(SimConfig::default());
        let (owner, intruder) = (peer(), peer());
        assert_eq!(state.global_opened(&owner), GlobalOpen::Started);
        assert!(state.global_taken());
        assert_eq!(state.global_opened(&intruder), GlobalOpen::Refused);
        assert!(intruder.is_closing());
        assert_eq!(intruder.close_reason().unwrap().code, CloseReason::POLICY);
        assert!(state.is_global(&owner) && !state.is_global(&intruder));
        state.global_closed(&intruder);
        assert!(
            state.is_global(&owner),
            "the intruder's close changes nothing"
        );
        // Once the owner is closing (chaos, slow consumer), a new socket may take over.
        owner.close(CloseReason::normal("gone"));
        let next = peer();
        assert_eq!(state.global_opened(&next), GlobalOpen::Accepted);
        assert!(state.is_global(&next));
        assert_eq!(state.scorecard().global.refused, 1);
        assert_eq!(state.scorecard().global.connections, 2);
    }

    #[test]
    fn clipping_keeps_short_text_and_marks_long_text() {
        assert_eq!(clip("short"), "short");
        let long = "é".repeat(1000);
        let cut = clip(&long);
        assert!(cut.starts_with(&"é".repeat(LOG_CLIP_CHARS)));
        assert!(cut.ends_with("…[cut, 2000 bytes in all]"), "{cut}");
        assert!(cut.chars().count() < LOG_CLIP_CHARS + 40);
        assert_eq!(clip_value(json!(1)), json!(1));
        assert!(
            clip_value(json!(long))
                .as_str()
                .unwrap()
                .contains("…[cut, ")
        );
    }

    #[test]
    fn tokens_are_fresh_hex() {
        let a = fresh_token().unwrap();
        let b = fresh_token().unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn texts_contain_props_exactly_when_asked() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..500 {
            assert!(crate::messages::is_props(&message_text(&mut rng, true)));
            assert!(!crate::messages::is_props(&message_text(&mut rng, false)));
        }
    }

    #[test]
    fn the_plan_is_reproducible_from_the_seed() {
        let config = SimConfig {
            teams: 20,
            leaving_teams: 5,
            ..SimConfig::default()
        };
        let a = State::new(config.clone());
        let b = State::new(config.clone());
        let plan = |s: &State| {
            s.teams
                .iter()
                .map(|t| (t.id, t.join_at, t.leave))
                .collect::<Vec<_>>()
        };
        assert_eq!(plan(&a), plan(&b));
        assert_eq!(a.teams.len(), 20);
        assert_eq!(a.teams.iter().filter(|t| t.leave.is_some()).count(), 5);
        let other = State::new(SimConfig { seed: 99, ..config });
        assert_ne!(plan(&a), plan(&other));
    }
}
