//! The tests of nodes running on a Redis engine, over real processes: one binary for all of
//! them (each file a protocol's cluster contract, plus `/readyz`), so CI links it once.

#[path = "../common/mod.rs"]
mod common;

mod collab;
mod fastchat;
mod ip_chat;
mod readyz;
mod reqack;
