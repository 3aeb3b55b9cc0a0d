//! ip-chat behaviour over real sockets: history, broadcast, reactions, identity, errors, limits.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod common;

use serde_json::Value;
use switchboard_ip_chat::{Config, IpChat};
use switchboard_server::ServerConfig;
use switchboard_testkit::{Client, TestServer, json};

use common::{react, send};

async fn start(config: Config) -> TestServer {
    TestServer::start(IpChat::new(config), ServerConfig::default()).await
}

async fn expect_error(client: &mut Client) -> String {
    let frame = client.recv_type("error").await;
    frame["data"]["error"]
        .as_str()
        .expect("error text")
        .to_owned()
}

#[tokio::test]
async fn a_message_reaches_everyone_including_the_sender() {
    let server = start(Config::default()).await;
    let mut alice = server.connect("/ws").await;
    let mut bob = server.connect("/ws").await;
    alice
        .send_json(
            &json!({"type": "send_message", "data": {"text": "hello", "author_name": "Alice"}}),
        )
        .await;

    let seen_by_alice = alice.recv_type("message").await;
    let seen_by_bob = bob.recv_type("message").await;
    assert_eq!(seen_by_alice, seen_by_bob);
    let data = &seen_by_alice["data"];
    assert_eq!(data["text"], "hello");
    assert_eq!(data["author_name"], "Alice");
    assert_eq!(data["reactions"], json!({}));
    assert!(data["created_at"].is_i64());
    let id = data["id"].as_str().unwrap();
    assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 4);
}

#[tokio::test]
async fn a_missing_null_or_blank_author_name_is_anonymous() {
    let server = start(Config::default()).await;
    let mut client = server.connect("/ws").await;
    for data in [
        json!({"text": "a"}),
        json!({"text": "b", "author_name": null}),
        json!({"text": "c", "author_name": "  "}),
    ] {
        client
            .send_json(&json!({"type": "send_message", "data": data}))
            .await;
        assert_eq!(
            client.recv_type("message").await["data"]["author_name"],
            "Anonymous"
        );
    }
}

#[tokio::test]
async fn history_is_replayed_oldest_first_and_bounded() {
    let server = start(Config {
        history_limit: 3,
        ..Config::default()
    })
    .await;
    let mut writer = server.connect("/ws").await;
    for text in ["one", "two", "three", "four"] {
        send(&mut writer, text).await;
        writer.recv_type("message").await;
    }
    let mut late = server.connect("/ws").await;
    for expected in ["two", "three", "four"] {
        assert_eq!(late.recv_type("message").await["data"]["text"], expected);
    }
    late.expect_silence(std::time::Duration::from_millis(200))
        .await;
}

#[tokio::test]
async fn reactions_toggle_per_user_and_emoji() {
    let server = start(Config::default()).await;
    let mut alice = server.connect_from("/ws", [127, 0, 0, 1]).await;
    let mut bob = server.connect_from("/ws", [127, 0, 0, 2]).await;
    send(&mut alice, "react to me").await;
    let message = alice.recv_type("message").await;
    bob.recv_type("message").await;
    let id = message["data"]["id"].clone();

    react(&mut alice, &id, "👍").await;
    let update = bob.recv_type("reaction_updated").await;
    alice.recv_type("reaction_updated").await;
    let alice_id = message["data"]["author_id"].clone();
    assert_eq!(update["data"]["action"], "added");
    assert_eq!(update["data"]["emoji"], "👍");
    assert_eq!(update["data"]["user_id"], alice_id);
    assert_eq!(update["data"]["message_id"], id);
    assert_eq!(
        update["data"]["message"]["reactions"],
        json!({"👍": [alice_id]})
    );
    assert_eq!(update["data"]["message"]["text"], "react to me");

    react(&mut bob, &id, "👍").await;
    let update = alice.recv_type("reaction_updated").await;
    bob.recv_type("reaction_updated").await;
    let bob_id = update["data"]["user_id"].clone();
    assert_ne!(bob_id, alice_id);
    assert_eq!(
        update["data"]["message"]["reactions"]["👍"],
        json!([alice_id, bob_id])
    );

    react(&mut alice, &id, "👍").await;
    react(&mut bob, &id, "👍").await;
    alice.recv_type("reaction_updated").await;
    let last = alice.recv_type("reaction_updated").await;
    assert_eq!(last["data"]["action"], "removed");
    assert_eq!(
        last["data"]["message"]["reactions"],
        json!({}),
        "an emoji with no users disappears"
    );

    // Replays carry the current reactions.
    react(&mut bob, &id, "🎉").await;
    bob.recv_type("reaction_updated").await;
    let mut late = server.connect("/ws").await;
    assert_eq!(
        late.recv_type("message").await["data"]["reactions"],
        json!({"🎉": [bob_id]})
    );
}

#[tokio::test]
async fn identity_follows_the_ip_address() {
    let server = start(Config::default()).await;
    let mut first = server.connect_from("/ws", [127, 0, 0, 1]).await;
    let mut same_ip = server.connect_from("/ws", [127, 0, 0, 1]).await;
    let mut other_ip = server.connect_from("/ws", [127, 0, 0, 3]).await;
    let mut ids = Vec::new();
    for (i, client) in [&mut first, &mut same_ip, &mut other_ip]
        .into_iter()
        .enumerate()
    {
        let text = format!("who am I {i}");
        send(client, &text).await;
        let own = client
            .recv_until(|f| f["data"]["text"] == text.as_str())
            .await;
        ids.push(own["data"]["author_id"].clone());
    }
    assert_eq!(ids[0], ids[1]);
    assert_ne!(ids[0], ids[2]);
    assert!(
        !ids[0].as_str().unwrap().contains("127.0.0"),
        "the id must not disclose the IP"
    );
}

#[tokio::test]
async fn malformed_frames_get_the_format_error_and_the_socket_stays_open() {
    let server = start(Config::default()).await;
    let mut client = server.connect("/ws").await;
    let bad = [
        "not json",
        "{}",
        "[]",
        r#"{"type":"dance","data":{}}"#,
        r#"{"type":"send_message"}"#,
        r#"{"type":"send_message","data":{}}"#,
        r#"{"type":"send_message","data":{"text":42}}"#,
        r#"{"type":"send_message","data":{"text":"x","author_name":7}}"#,
        r#"{"type":"add_reaction","data":{"emoji":"x"}}"#,
        r#"{"type":"add_reaction","data":{"message_id":"x","emoji":""}}"#,
    ];
    for text in bad {
        client.send_text(text).await;
        assert_eq!(
            expect_error(&mut client).await,
            "Invalid message format",
            "for {text}"
        );
    }
    client
        .send(tokio_tungstenite::tungstenite::Message::binary(vec![
            0xff, 0x00,
        ]))
        .await;
    assert_eq!(expect_error(&mut client).await, "Invalid message format");
    send(&mut client, "still here").await;
    assert_eq!(
        client.recv_type("message").await["data"]["text"],
        "still here"
    );
}

#[tokio::test]
async fn text_must_be_non_blank_and_at_most_500_characters() {
    let server = start(Config::default()).await;
    let mut client = server.connect("/ws").await;
    for blank in ["", "   ", "\n\t"] {
        send(&mut client, blank).await;
        assert_eq!(
            expect_error(&mut client).await,
            "message text cannot be empty"
        );
    }
    // 500 four-byte characters are 2000 bytes: the limit counts characters.
    let exactly = "😀".repeat(500);
    send(&mut client, &exactly).await;
    assert_eq!(
        client.recv_type("message").await["data"]["text"],
        exactly.as_str()
    );
    send(&mut client, &"😀".repeat(501)).await;
    assert_eq!(
        expect_error(&mut client).await,
        "message too long (max 500 characters)"
    );
    send(&mut client, &"a".repeat(501)).await;
    assert_eq!(
        expect_error(&mut client).await,
        "message too long (max 500 characters)"
    );
}

#[tokio::test]
async fn reacting_to_an_unknown_message_says_not_found() {
    let server = start(Config::default()).await;
    let mut client = server.connect("/ws").await;
    for id in [json!(uuid::Uuid::new_v4().to_string()), json!("not-a-uuid")] {
        react(&mut client, &id, "👍").await;
        let error = expect_error(&mut client).await;
        assert!(error.contains("not found"), "{error}");
    }
}

#[tokio::test]
async fn the_rate_limit_is_per_user() {
    let server = start(Config {
        rate_limit: 60,
        ..Config::default()
    })
    .await;
    let mut spammer = server.connect_from("/ws", [127, 0, 0, 1]).await;
    let mut other = server.connect_from("/ws", [127, 0, 0, 2]).await;
    for i in 0..60 {
        send(&mut spammer, &format!("m{i}")).await;
        assert_eq!(
            spammer.recv_type("message").await["data"]["text"],
            format!("m{i}")
        );
    }
    send(&mut spammer, "one too many").await;
    assert_eq!(
        expect_error(&mut spammer).await,
        "Rate limit exceeded. Maximum 60 messages per minute."
    );

    let message = other
        .recv_until(|f| f["type"] == "message" && f["data"]["text"] == "m59")
        .await;
    assert_eq!(message["type"], "message");
    send(&mut other, "I am not limited").await;
    let seen = other.recv_type("message").await;
    assert_eq!(
        seen["data"]["text"], "I am not limited",
        "the spammer's rejected message was never broadcast"
    );
}

#[tokio::test]
async fn only_the_ws_path_is_served() {
    let server = start(Config::default()).await;
    let status = Client::refused_status(&server.ws_url("/elsewhere"), Default::default()).await;
    assert_eq!(status, 404);
    assert_eq!(server.http("GET", "/healthz", None).await.status, 200);
}

#[tokio::test]
async fn forwarded_for_counts_only_behind_a_trusted_proxy() {
    use switchboard_testkit::ConnectOptions;

    async fn author_id(server: &TestServer, forwarded: &str, text: &str) -> Value {
        let options = ConnectOptions {
            headers: vec![("x-forwarded-for".into(), forwarded.into())],
            ..ConnectOptions::default()
        };
        let mut client = Client::connect_with(&server.ws_url("/ws"), options)
            .await
            .unwrap();
        send(&mut client, text).await;
        client.recv_until(|f| f["data"]["text"] == text).await["data"]["author_id"].clone()
    }

    let direct = start(Config::default()).await;
    let a = author_id(&direct, "203.0.113.1", "a").await;
    let b = author_id(&direct, "203.0.113.2", "b").await;
    assert_eq!(a, b, "without --trust-proxy the header is ignored");

    let proxied = TestServer::start(
        IpChat::new(Config::default()),
        ServerConfig {
            trust_proxy: true,
            ..ServerConfig::default()
        },
    )
    .await;
    let a = author_id(&proxied, "198.51.100.7, 203.0.113.1", "a").await;
    let b = author_id(&proxied, "203.0.113.2", "b").await;
    let c = author_id(&proxied, "203.0.113.1", "c").await;
    assert_ne!(a, b, "different forwarded clients are different users");
    assert_eq!(
        a, c,
        "only the last entry, added by the trusted proxy, counts"
    );
}

// ---------------------------------------------------------------------------------------------
// Signed identity, in process (the server verified a token for `sub` before `admit`)

mod signed_in_process {
    use serde_json::{Map, Value};
    use switchboard_core::Identity;
    use switchboard_ip_chat::{Config, IpChat};
    use switchboard_testkit::{Driver, Session, json};

    fn identity(sub: &str) -> Identity {
        Identity::new(sub, None, Map::new())
    }

    fn messages(session: &mut Session<IpChat>) -> Vec<Value> {
        session
            .json_frames()
            .into_iter()
            .filter(|frame| frame["type"] == "message")
            .collect()
    }

    fn say(text: &str) -> Value {
        json!({"type": "send_message", "data": {"text": text}})
    }

    #[tokio::test]
    async fn the_author_id_comes_from_the_subject_not_the_address() {
        let driver = Driver::new(IpChat::new(Config::default()));
        let (protocol, engine) = (driver.protocol(), driver.engine());
        let alice_id = protocol.user_id_for_subject(engine, "alice").await.unwrap();
        let bob_id = protocol.user_id_for_subject(engine, "bob").await.unwrap();
        let address_id = protocol
            .user_id_for(engine, [127, 0, 0, 1].into())
            .await
            .unwrap();
        assert_ne!(alice_id, bob_id);
        assert_ne!(alice_id, address_id);
        // "sub:" + sub under the address namespace: an address written as a subject is not
        // that address.
        let spoof = protocol
            .user_id_for_subject(engine, "127.0.0.1")
            .await
            .unwrap();
        assert_ne!(spoof, address_id);
        assert_eq!(
            uuid::Uuid::parse_str(&alice_id).unwrap().get_version_num(),
            5
        );

        // Two users from one address are two authors; one user from two sockets is one.
        let mut alice = driver
            .open_as("/ws", Some(&identity("alice")))
            .await
            .unwrap();
        let mut again = driver
            .open_as("/ws", Some(&identity("alice")))
            .await
            .unwrap();
        let mut bob = driver.open_as("/ws", Some(&identity("bob"))).await.unwrap();
        let mut anonymous = driver.open_as("/ws", None).await.unwrap();
        for (session, text) in [(&mut alice, "a1"), (&mut again, "a2"), (&mut bob, "b1")] {
            session.json(&say(text)).await;
        }
        anonymous.json(&say("x1")).await;
        let seen = messages(&mut anonymous);
        let authors: Vec<(&str, &str)> = seen
            .iter()
            .map(|m| {
                (
                    m["data"]["text"].as_str().unwrap(),
                    m["data"]["author_id"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            authors,
            [
                ("a1", alice_id.as_str()),
                ("a2", alice_id.as_str()),
                ("b1", bob_id.as_str()),
                ("x1", address_id.as_str()),
            ]
        );
        // A reaction's user is the subject too.
        let id = seen[2]["data"]["id"].clone();
        alice
            .json(&json!({"type": "add_reaction", "data": {"message_id": id, "emoji": "👍"}}))
            .await;
        let update = alice
            .json_frames()
            .into_iter()
            .find(|frame| frame["type"] == "reaction_updated")
            .unwrap();
        assert_eq!(update["data"]["user_id"], alice_id.as_str());
        assert_eq!(
            update["data"]["message"]["reactions"]["👍"],
            json!([alice_id])
        );
    }

    #[tokio::test]
    async fn the_rate_limit_counts_per_subject_not_per_address() {
        let driver = Driver::new(IpChat::new(Config {
            rate_limit: 2,
            ..Config::default()
        }));
        // Every session comes from 127.0.0.1: alice's sockets share one limit, bob has his own.
        let mut alice = driver
            .open_as("/ws", Some(&identity("alice")))
            .await
            .unwrap();
        let mut again = driver
            .open_as("/ws", Some(&identity("alice")))
            .await
            .unwrap();
        let mut bob = driver.open_as("/ws", Some(&identity("bob"))).await.unwrap();
        alice.json(&say("1")).await;
        again.json(&say("2")).await;
        again.frames();
        again.json(&say("3")).await;
        let refused = again.json_frames();
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(refused[0]["type"], "error");
        assert!(
            refused[0]["data"]["error"]
                .as_str()
                .unwrap()
                .starts_with("Rate limit exceeded")
        );
        bob.frames();
        bob.json(&say("4")).await;
        bob.json(&say("5")).await;
        let bobs: Vec<Value> = bob.json_frames();
        assert!(
            bobs.iter().all(|frame| frame["type"] == "message"),
            "{bobs:?}"
        );
        assert_eq!(bobs.len(), 2);
    }
}

// ---------------------------------------------------------------------------------------------
// Signed identity over real sockets: the server verifies HS256 / RS256 tokens

mod signed_over_sockets {
    use std::sync::Arc;

    use switchboard_core::Engine;
    use switchboard_ip_chat::{Config, IpChat};
    use switchboard_server::ServerConfig;
    use switchboard_testkit::jwt::{Keys, claims, refused_tokens};
    use switchboard_testkit::{Client, ConnectOptions, TestServer, json};

    use super::common::send;
    use super::expect_error;

    async fn start_signed(keys: &Keys, config: Config) -> (Arc<IpChat>, Engine, TestServer) {
        let protocol = Arc::new(IpChat::new(config));
        let engine = Engine::default();
        let server_config = ServerConfig {
            auth: Some(keys.verifier()),
            engine: engine.clone(),
            ..ServerConfig::default()
        };
        let server = TestServer::start_shared(protocol.clone(), server_config).await;
        (protocol, engine, server)
    }

    async fn connect_as(server: &TestServer, keys: &Keys, sub: &str) -> Client {
        let token = keys.token(&claims(sub, 60));
        server.connect(&format!("/ws?token={token}")).await
    }

    #[tokio::test]
    async fn signed_tokens_make_the_author_the_subject_and_limit_each_subject() {
        for keys in [Keys::hs256(), Keys::rs256_shared()] {
            let config = Config {
                rate_limit: 2,
                ..Config::default()
            };
            let (protocol, engine, server) = start_signed(&keys, config).await;
            let status =
                Client::refused_status(&server.ws_url("/ws"), ConnectOptions::default()).await;
            assert_eq!(status, 401, "no token");
            for (what, token) in refused_tokens(&keys, "alice") {
                let url = server.ws_url(&format!("/ws?token={token}"));
                let status = Client::refused_status(&url, ConnectOptions::default()).await;
                assert_eq!(status, 401, "{what}");
            }
            let alice_id = protocol
                .user_id_for_subject(&engine, "alice")
                .await
                .unwrap();
            let bob_id = protocol.user_id_for_subject(&engine, "bob").await.unwrap();
            let address_id = protocol
                .user_id_for(&engine, [127, 0, 0, 1].into())
                .await
                .unwrap();

            // Both from 127.0.0.1. Alice tries to pass as bob with an author_id of her own:
            // the field is ignored, the author is her token's subject.
            let mut alice = connect_as(&server, &keys, "alice").await;
            let mut bob = connect_as(&server, &keys, "bob").await;
            alice
                .send_json(
                    &json!({"type": "send_message", "data": {"text": "a1", "author_id": bob_id}}),
                )
                .await;
            let message = bob.recv_type("message").await;
            assert_eq!(
                message["data"]["author_id"],
                alice_id.as_str(),
                "{:?}",
                keys.algorithm()
            );
            assert_ne!(alice_id, address_id);
            send(&mut bob, "b1").await;
            let message = alice
                .recv_until(|f| f["type"] == "message" && f["data"]["text"] == "b1")
                .await;
            assert_eq!(message["data"]["author_id"], bob_id.as_str());

            // The limit (2 a minute) is alice's, not the address's: bob still has his.
            send(&mut alice, "a2").await;
            alice
                .recv_until(|f| f["type"] == "message" && f["data"]["text"] == "a2")
                .await;
            send(&mut alice, "a3").await;
            let error = expect_error(&mut alice).await;
            assert!(error.starts_with("Rate limit exceeded"), "{error}");
            send(&mut bob, "b2").await;
            let message = bob
                .recv_until(|f| f["type"] == "message" && f["data"]["text"] == "b2")
                .await;
            assert_eq!(message["data"]["author_id"], bob_id.as_str());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics: the protocol's counters, seen by a recorder local to the test's thread

mod metrics_in_process {
    use metrics_util::debugging::DebuggingRecorder;
    use switchboard_ip_chat::telemetry::{HISTORY_REPLAYS, MESSAGES, REACTIONS, REFUSALS};
    use switchboard_ip_chat::{Config, IpChat};
    use switchboard_testkit::metrics::counter;
    use switchboard_testkit::{Driver, json};

    /// The driver runs every hook on this task, so a recorder set for this thread sees each
    /// event: joins, messages, reaction toggles and refusals by reason.
    #[tokio::test]
    async fn counters_follow_messages_reactions_refusals_and_replays() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _local = metrics::set_default_local_recorder(&recorder);

        let driver = Driver::new(IpChat::new(Config {
            rate_limit: 2,
            ..Config::default()
        }));
        let mut alice = driver.open("/ws").await.unwrap();
        alice
            .json(&json!({"type": "send_message", "data": {"text": "hi"}}))
            .await;
        let id = alice.json_frames()[0]["data"]["id"].clone();
        let react = json!({"type": "add_reaction", "data": {"message_id": id, "emoji": "👍"}});
        alice.json(&react).await;
        alice.json(&react).await;
        alice
            .json(&json!({"type": "send_message", "data": {"text": "  "}}))
            .await;
        alice.text("not json").await;
        alice
            .json(&json!({"type": "send_message", "data": {"text": "again"}}))
            .await;
        alice
            .json(&json!({"type": "send_message", "data": {"text": "too many"}}))
            .await;
        let _bob = driver.open("/ws").await.unwrap();

        let snapshot = snapshotter.snapshot().into_vec();
        assert_eq!(counter(&snapshot, MESSAGES, &[]), 2);
        assert_eq!(counter(&snapshot, REACTIONS, &[("action", "added")]), 1);
        assert_eq!(counter(&snapshot, REACTIONS, &[("action", "removed")]), 1);
        assert_eq!(counter(&snapshot, REFUSALS, &[("reason", "invalid")]), 2);
        assert_eq!(
            counter(&snapshot, REFUSALS, &[("reason", "rate_limited")]),
            1
        );
        assert_eq!(counter(&snapshot, HISTORY_REPLAYS, &[]), 2);
    }
}
