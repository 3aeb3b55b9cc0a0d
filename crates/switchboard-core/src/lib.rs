//! The core of Switchboard: what every protocol crate plugs into.
//!
//! A protocol crate implements [`Protocol`] and keeps its shared state behind the store traits
//! here ([`Broadcaster`] for fan-out, [`Presence`] for who is where, [`History`] for bounded
//! logs), using the in-memory defaults unless an embedder supplies another backend. The runtime
//! (`switchboard-server`) owns sockets and hands each connection to the protocol as a [`Peer`]: a
//! bounded outbound queue whose overflow closes the peer as a slow consumer.
//!
//! This crate does no network IO and knows no HTTP framework, so protocol logic can be tested
//! without sockets and reused by clients (see [`Backoff`]).

mod backoff;
mod broadcast;
mod close;
mod context;
pub mod duration;
pub mod engine;
pub mod envelope;
mod error;
mod frame;
mod history;
pub mod limits;
mod peer;
mod presence;
mod protocol;
pub mod query;
mod rate_limit;
pub mod sync;
pub mod web;

pub use backoff::Backoff;
pub use broadcast::{Broadcaster, LocalBroadcaster};
pub use close::CloseReason;
pub use context::Context;
pub use engine::Engine;
pub use error::Error;
pub use frame::Frame;
pub use history::{History, MemoryHistory};
pub use limits::{
    BudgetExceeded, ClientKey, MemoryBudget, Rate, ShareGuard, ShareRefused, Shares, TokenBucket,
    TokenBuckets,
};
pub use peer::{
    ConnId, Delivery, LinkEvent, Outgoing, Peer, PeerLink, peer_channel, peer_channel_bounded,
};
pub use presence::{LocalPresence, Presence};
pub use protocol::{Handshake, HttpRequest, HttpResponse, Keepalive, Protocol, Reject};
pub use rate_limit::RateLimiter;
