//! The scorecard: what the simulator delivered, what the client reported, and every mismatch.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The simulator's verdict, served at `GET /scorecard` and logged when the scenario ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scorecard {
    /// The seed the scenario was generated from.
    pub seed: u64,
    /// `waiting`, `running`, `settling`, `quiet`, `final-check` or `finished`.
    pub phase: String,
    /// Whether the scenario is over (`goodbye` sent).
    pub finished: bool,
    /// Finished, the final healthcheck was answered, and nothing mismatched.
    pub perfect: bool,
    /// One entry per planned team, in join order.
    pub teams: Vec<TeamScore>,
    /// Healthcheck requests and replies.
    pub healthchecks: HealthcheckScore,
    /// Global socket connections (1 + reconnects) and how many the simulator dropped.
    pub global: GlobalScore,
    /// What the chaos options did.
    pub chaos: ChaosScore,
    /// Sums over all teams.
    pub totals: Totals,
    /// Every mismatch found (the list below is capped; this count is not).
    pub mismatch_count: u64,
    /// The first mismatches, oldest first.
    pub mismatches: Vec<Mismatch>,
}

/// One team's truth and the client's last report about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeamScore {
    /// The team id (a number on the wire).
    pub id: u64,
    /// Whether `team.join` was delivered.
    pub joined: bool,
    /// Whether `team.left` was delivered, and on which socket (`team` or `global`).
    pub left_via: Option<String>,
    /// `message` events delivered to a live socket of this team.
    pub expected_messages: u64,
    /// Those containing `props`.
    pub expected_props: u64,
    /// Whether the simulator holds an open socket for the team right now.
    pub connected: bool,
    /// The client's latest `message_count`, if it reported this team yet.
    pub reported_messages: Option<u64>,
    /// The client's latest `props_count`.
    pub reported_props: Option<u64>,
    /// The client's latest `connected`.
    pub reported_connected: Option<bool>,
    /// Team sockets opened.
    pub connections: u64,
    /// `connections - 1`.
    pub reconnects: u64,
    /// `team.connect` requests received.
    pub connect_requests: u64,
    /// Team sockets the simulator dropped (chaos).
    pub server_drops: u64,
    /// Team sockets the client closed while the team had not left (e.g. a pong timeout). Frames
    /// queued at that instant may never reach the client, so a mismatch next to a non-zero count
    /// here is a possible in-flight loss rather than a counting bug.
    pub client_closes: u64,
}

/// Healthcheck statistics.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HealthcheckScore {
    /// Requests sent.
    pub sent: u64,
    /// Replies received and compared.
    pub answered: u64,
    /// Requests whose global socket dropped before the reply (not the client's fault).
    pub lost: u64,
    /// Requests not answered within the timeout on a live socket (each is also a mismatch).
    pub unanswered: u64,
    /// Whether the final, exact healthcheck was answered.
    pub final_answered: bool,
}

/// Global socket statistics.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GlobalScore {
    /// Global sockets opened.
    pub connections: u64,
    /// `connections - 1`.
    pub reconnects: u64,
    /// Global sockets the simulator dropped (chaos).
    pub server_drops: u64,
    /// Global sockets refused because another one was open (HTTP 403 at upgrade, or closed
    /// with 1008 right after opening when two upgrades raced).
    #[serde(default)]
    pub refused: u64,
}

/// What chaos did.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ChaosScore {
    /// Team sockets dropped.
    pub team_drops: u64,
    /// Global sockets dropped.
    pub global_drops: u64,
    /// `team.connect` requests answered with an `error` instead of a URL.
    pub refused_connects: u64,
    /// Team socket upgrades refused with HTTP 503.
    pub refused_upgrades: u64,
    /// `team.connect` answers that were delayed.
    pub delayed_connects: u64,
}

/// Sums over all teams.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Totals {
    /// Messages delivered.
    pub messages: u64,
    /// Props messages delivered.
    pub props: u64,
    /// Team reconnects.
    pub team_reconnects: u64,
    /// Frames of type `message` the client sent on team sockets (a bot talking back).
    pub bot_messages: u64,
}

/// One disagreement between the simulator's truth and the client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mismatch {
    /// Which healthcheck (1-based), if it came from one.
    pub healthcheck: Option<u64>,
    /// Whether that was the final, exact healthcheck.
    pub final_check: bool,
    /// The team concerned, if any.
    pub team: Option<u64>,
    /// What is wrong, e.g. `message_count over-counts`.
    pub problem: String,
    /// What the simulator expected.
    pub expected: Value,
    /// What the client said.
    pub reported: Value,
}
