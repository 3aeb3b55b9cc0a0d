//! teambot codec micro-benchmarks: parsing server events and building healthcheck replies.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use switchboard_teambot::messages::{ServerEvent, TeamId, TeamStat, healthcheck_reply, is_props};

fn codec(c: &mut Criterion) {
    let message = r#"{"type":"message","text":"great work, props to the team!"}"#;
    c.bench_function("teambot/parse message event", |b| {
        b.iter(|| ServerEvent::parse(black_box(message)))
    });
    c.bench_function("teambot/is_props", |b| {
        b.iter(|| is_props(black_box("great work, props to the team!")))
    });
    let stats: Vec<TeamStat> = (0..50)
        .map(|i| TeamStat {
            id: TeamId::number(i),
            connected: true,
            message_count: 1000 + i,
            props_count: i,
        })
        .collect();
    c.bench_function("teambot/healthcheck reply (50 teams)", |b| {
        b.iter(|| healthcheck_reply(black_box(&stats)))
    });
}

criterion_group!(benches, codec);
criterion_main!(benches);
