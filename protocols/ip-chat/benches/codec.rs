//! ip-chat codec micro-benchmarks: parsing client frames, encoding broadcasts, toggling.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use switchboard_ip_chat::messages::{
    ChatMessage, ClientMessage, ReactionLimits, Reactions, message_frame, reaction_frame,
    toggle_reaction,
};

fn message() -> ChatMessage {
    ChatMessage {
        id: uuid::Uuid::new_v4(),
        text: "hello everyone, how is it going today?".into(),
        author_id: uuid::Uuid::new_v4().to_string(),
        author_name: "Alice".into(),
        created_at: 1_700_000_000,
        reactions: Reactions::default(),
    }
}

fn codec(c: &mut Criterion) {
    let send = r#"{"type":"send_message","data":{"text":"hello everyone, how is it going today?","author_name":"Alice"}}"#;
    c.bench_function("ip-chat/parse send_message", |b| {
        b.iter(|| serde_json::from_str::<ClientMessage>(black_box(send)))
    });
    let msg = message();
    c.bench_function("ip-chat/encode message", |b| {
        b.iter(|| message_frame(black_box(&msg)))
    });
    let limits = ReactionLimits {
        max_distinct: 16,
        max_users_per_emoji: 100,
    };
    let mut reacted = message();
    for i in 0..20 {
        let _ = toggle_reaction(&mut reacted, "👍", uuid::Uuid::from_u128(i), limits);
    }
    c.bench_function("ip-chat/encode reaction_updated", |b| {
        b.iter(|| {
            reaction_frame(
                black_box(&reacted),
                "👍",
                uuid::Uuid::from_u128(1),
                switchboard_ip_chat::messages::ReactionAction::Added,
            )
        })
    });
    c.bench_function("ip-chat/toggle reaction twice", |b| {
        let mut m = message();
        b.iter(|| {
            let _ = toggle_reaction(&mut m, "👍", uuid::Uuid::from_u128(1), limits);
            toggle_reaction(&mut m, "👍", uuid::Uuid::from_u128(1), limits)
        })
    });
}

criterion_group!(benches, codec);
criterion_main!(benches);
