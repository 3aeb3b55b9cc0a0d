//! Adversarial ip-chat tests over real sockets: a reaction flood from many addresses on one
//! message, and a history filled past its byte cap and past the state budget. Each asserts the
//! bound through the protocol's own accounting (`IpChat::stats`) and that a bystander is still
//! served quickly.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchboard_core::Engine;
use switchboard_ip_chat::{Config, IpChat, Stats, errors};
use switchboard_server::ServerConfig;
use switchboard_testkit::{Client, TestServer};

use common::{react, send};

/// The chat, its server, and the server's state engine (where `IpChat::stats` reads the
/// history).
async fn start(config: Config) -> (Arc<IpChat>, TestServer, Engine) {
    let chat = Arc::new(IpChat::new(config));
    let server_config = ServerConfig::default();
    let engine = server_config.engine.clone();
    let server = TestServer::start_shared(chat.clone(), server_config).await;
    (chat, server, engine)
}

async fn read_stats(chat: &IpChat, engine: &Engine) -> Stats {
    chat.stats(engine).await.expect("the engine answers")
}

/// Sends `text` and waits for its own broadcast; returns the round trip.
async fn round_trip(client: &mut Client, text: &str) -> Duration {
    let started = Instant::now();
    send(client, text).await;
    client
        .recv_until(|f| f["type"] == "message" && f["data"]["text"] == text)
        .await;
    started.elapsed()
}

const EMOJI: [&str; 6] = ["👍", "🎉", "😀", "🔥", "👀", "🚀"];

#[tokio::test]
async fn a_reaction_flood_from_many_addresses_keeps_the_message_small_and_the_room_responsive() {
    let config = Config {
        max_distinct_reactions: 4,
        max_reactions_per_emoji: 20,
        max_message_bytes: 2048,
        ..Config::default()
    };
    let (chat, server, engine) = start(config).await;
    let mut author = server.connect_from("/ws", [127, 0, 0, 1]).await;
    send(&mut author, "react to me").await;
    let id = author.recv_type("message").await["data"]["id"].clone();
    drop(author);

    let mut bystander = server.connect_from("/ws", [127, 0, 0, 2]).await;
    bystander.recv_type("message").await;
    let mut baseline = Duration::ZERO;
    for n in 0..3 {
        baseline = baseline.max(round_trip(&mut bystander, &format!("idle {n}")).await);
    }

    // 60 addresses, each adding all 6 emoji: far more than 4 emoji x 20 users, and 4 x 20 user
    // ids would not fit in 2 KiB either, so every bound is hit.
    let mut attackers = Vec::new();
    for a in 0..60u8 {
        let mut client = server.connect_from("/ws", [127, 0, 1, a + 1]).await;
        let id = id.clone();
        attackers.push(tokio::spawn(async move {
            let mut refused = 0;
            for j in 0..EMOJI.len() {
                react(&mut client, &id, EMOJI[(usize::from(a) + j) % EMOJI.len()]).await;
            }
            let done = format!("done {a}");
            send(&mut client, &done).await;
            loop {
                let frame = client.recv_json().await;
                if frame["type"] == "error" {
                    refused += 1;
                }
                if frame["type"] == "message" && frame["data"]["text"] == done {
                    return refused;
                }
            }
        }));
    }
    // The bystander is served while the flood runs.
    let mut worst = Duration::ZERO;
    for n in 0..5 {
        worst = worst.max(round_trip(&mut bystander, &format!("busy {n}")).await);
    }
    let mut refused = 0;
    for attacker in attackers {
        refused += attacker.await.unwrap();
    }
    assert!(refused > 0, "the bounds refused some reactions");
    let after = round_trip(&mut bystander, "after").await;
    let allowed = Duration::from_millis(500).max(baseline * 20);
    eprintln!(
        "bystander round trips: idle {baseline:?}, during {worst:?}, after {after:?}; {:?}",
        read_stats(&chat, &engine).await
    );
    assert!(
        worst <= allowed && after <= allowed,
        "bystander round trips: idle {baseline:?}, during {worst:?}, after {after:?}"
    );

    // The message stayed within every bound, and so did the accounting.
    let stats = read_stats(&chat, &engine).await;
    assert!(stats.largest_message_bytes <= 2048, "{stats:?}");
    assert!(
        stats.largest_message_bytes > 2048 - 100,
        "the flood filled the message up to its byte cap: {stats:?}"
    );
    assert!(stats.state_bytes <= chat.worst_case_bytes(), "{stats:?}");
    assert_eq!(stats.state_bytes, stats.history_bytes);
    let mut late = server.connect_from("/ws", [127, 0, 2, 1]).await;
    let replayed = late.recv_type("message").await;
    assert!(replayed.to_string().len() <= 2048);
    let reactions = replayed["data"]["reactions"].as_object().unwrap();
    assert!(reactions.len() <= 4);
    assert!(
        reactions
            .values()
            .all(|users| users.as_array().unwrap().len() <= 20)
    );

    // Newcomers react until the message is full: then the reacting client gets the error and
    // every existing reaction is kept. At most 4 x 20 reactions fit, and fewer in 2 KiB.
    let mut refusal = None;
    for k in 0..90u8 {
        let mut prober = server.connect_from("/ws", [127, 0, 3, k + 1]).await;
        let before = prober.recv_type("message").await["data"]["reactions"].clone();
        react(&mut prober, &id, EMOJI[usize::from(k) % EMOJI.len()]).await;
        let reply = prober
            .recv_until(|f| f["type"] == "error" || f["type"] == "reaction_updated")
            .await;
        if reply["type"] == "error" {
            refusal = Some((reply["data"]["error"].as_str().unwrap().to_owned(), before));
            break;
        }
        assert!(reply.to_string().len() <= 2048 + 512, "a bounded broadcast");
    }
    let (text, before) = refusal.expect("a full message refuses more reactions");
    assert!(text.starts_with("too many"), "{text}");
    let mut check = server.connect_from("/ws", [127, 0, 4, 1]).await;
    assert_eq!(
        check.recv_type("message").await["data"]["reactions"],
        before,
        "the refused reaction changed nothing"
    );
}

#[tokio::test]
async fn the_history_byte_cap_drops_the_oldest_and_the_state_budget_refuses_new_messages() {
    // The byte cap: 20 kB of history, messages of about 1 kB each.
    let (chat, server, engine) = start(Config {
        rate_limit: 0,
        max_history_bytes: 20_000,
        ..Config::default()
    })
    .await;
    let mut writer = server.connect_from("/ws", [127, 0, 0, 1]).await;
    let text = "x".repeat(400);
    for n in 0..60 {
        let text = format!("{n} {text}");
        send(&mut writer, &text).await;
        writer.recv_until(|f| f["data"]["text"] == text).await;
    }
    let stats = read_stats(&chat, &engine).await;
    assert!(stats.history_bytes <= 20_000, "{stats:?}");
    assert!(stats.messages < 60 && stats.messages > 5, "{stats:?}");
    let mut late = server.connect_from("/ws", [127, 0, 0, 2]).await;
    let first = late.recv_type("message").await;
    assert!(
        first["data"]["text"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{} ", 60 - stats.messages)),
        "the oldest were dropped: {first}"
    );

    // The state budget: smaller than the history caps, so it refuses instead of dropping.
    let (chat, server, engine) = start(Config {
        rate_limit: 0,
        max_state_bytes: 10_000,
        ..Config::default()
    })
    .await;
    let mut writer = server.connect_from("/ws", [127, 0, 0, 1]).await;
    let mut stored = 0;
    let refusal = loop {
        let text = format!("{stored} {text}");
        send(&mut writer, &text).await;
        let frame = writer.recv_json().await;
        if frame["type"] == "error" {
            break frame["data"]["error"].as_str().unwrap().to_owned();
        }
        stored += 1;
        assert!(stored < 100, "the budget never refused");
    };
    assert_eq!(refusal, errors::STATE_FULL);
    let stats = read_stats(&chat, &engine).await;
    assert!(stats.state_bytes <= 10_000, "{stats:?}");
    assert_eq!(stats.messages, stored, "nothing stored was evicted");
    // A bystander is still served: replay of everything kept, and reactions still work.
    let mut bystander = server.connect_from("/ws", [127, 0, 0, 3]).await;
    let first = bystander.recv_type("message").await;
    assert!(first["data"]["text"].as_str().unwrap().starts_with("0 "));
    for _ in 1..stored {
        bystander.recv_type("message").await;
    }
    react(&mut bystander, &first["data"]["id"], "👍").await;
    let reply = bystander.recv_json().await;
    assert!(
        reply["type"] == "reaction_updated" || reply["data"]["error"] == errors::STATE_FULL,
        "{reply}"
    );
}
