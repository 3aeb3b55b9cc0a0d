//! The core of Switchboard: what every protocol crate plugs into.
//!
//! A protocol crate implements [`Protocol`]. The runtime (`switchboard-server`) owns sockets and
//! hands each hook a [`Context`]: the connection as a [`Peer`] (a bounded outbound queue whose
//! overflow closes the peer as a slow consumer) and the node's state [`Engine`] (the [`engine`]
//! module: logs, fan-out, presence, keyed state, rate limits), where every piece of state that
//! clients share lives, so one protocol runs unchanged in memory, on a durable node or in a
//! cluster.
//!
//! This crate does no network IO and knows no HTTP framework, so protocol logic can be tested
//! without sockets and reused by clients (see [`Backoff`]).

mod backoff;
mod close;
mod context;
pub mod duration;
pub mod engine;
pub mod envelope;
mod error;
mod frame;
pub mod identity;
pub mod limits;
mod peer;
mod protocol;
pub mod query;
pub mod sync;
pub mod web;

pub use backoff::Backoff;
pub use close::CloseReason;
pub use context::Context;
pub use engine::Engine;
pub use error::Error;
pub use frame::Frame;
pub use identity::{Caller, Identity};
pub use limits::{
    BudgetExceeded, ClientKey, MemoryBudget, Rate, ShareGuard, ShareRefused, Shares, TokenBucket,
    TokenBuckets,
};
pub use peer::{
    ConnId, Delivery, LinkEvent, Outgoing, Peer, PeerLink, peer_channel, peer_channel_bounded,
};
pub use protocol::{Handshake, HttpRequest, HttpResponse, Keepalive, Protocol, Reject};
