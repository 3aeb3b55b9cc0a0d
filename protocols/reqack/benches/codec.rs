//! reqack codec micro-benchmarks: parsing requests and acks, encoding events.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use switchboard_reqack::codec::{encode_new_event, parse_frame};

fn codec(c: &mut Criterion) {
    let request = r#"{"type":"request","timestamp":1700000000000,"id":"req001","payloadType":"new","payload":{"chatId":"User2","message":"Hi from User1!"}}"#;
    c.bench_function("reqack/parse request new", |b| {
        b.iter(|| parse_frame(black_box(request)))
    });
    let ack = r#"{"type":"ack","id":"23"}"#;
    c.bench_function("reqack/parse ack", |b| {
        b.iter(|| parse_frame(black_box(ack)))
    });
    c.bench_function("reqack/encode new event", |b| {
        b.iter(|| encode_new_event(black_box(23), 125, "User1", "Hi from User1!"))
    });
}

criterion_group!(benches, codec);
criterion_main!(benches);
