//! teambot: a resilient team-connection client, and a simulator of its server.
//!
//! The teambot spec (see `docs/protocols/teambot.md`) describes a bot that holds one *global*
//! WebSocket (team membership: `team.join`, `team.connect`, `team.left`, `healthcheck`,
//! `goodbye`) and one WebSocket per *team* (`hello`, `message`, `ping`/`pong`, `team.left`).
//!
//! - [`client`]: the bot as a library. [`client::TeamBot`] keeps every team connected through
//!   drops, dead sockets and global reconnects (exponential backoff with jitter), counts each
//!   team's `message` and `props` events exactly, answers `healthcheck`, and ends cleanly on
//!   `goodbye`. Embed it with your own [`client::TeamHandler`]; read stats through
//!   [`client::BotHandle`]. `switchboard teambot --url ...` is a thin wrapper around it.
//! - [`sim`]: the server side as a [`switchboard_core::Protocol`] (`teambot-sim`), serving
//!   `/global` and the team sockets it hands out, with seeded chaos (dropped sockets, delayed or
//!   refused connects). It knows what it really delivered, checks every `healthcheck` reply,
//!   and publishes a scorecard at `GET /scorecard`.
//! - [`messages`]: the wire format both halves share.

pub mod client;
pub mod messages;
pub mod sim;
