//! fastchat codec micro-benchmarks: envelope parsing, validation with tag stripping, encoding.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use switchboard_fastchat::messages::{parse_body, parse_envelope};
use switchboard_fastchat::sanitize::{display_name, strip_tags};

fn codec(c: &mut Criterion) {
    let msg = r#"{"type":"MSG","data":{"to":"0b9a3c5e-2f1d-4c3b-9a8e-7d6c5b4a3f2e","content":"hello there, this is a message","message_id":"m-1"}}"#;
    c.bench_function("fastchat/parse MSG", |b| {
        b.iter(|| parse_envelope(black_box(msg)).and_then(|(kind, data)| parse_body(kind, &data)))
    });
    c.bench_function("fastchat/strip tags (plain text)", |b| {
        b.iter(|| strip_tags(black_box("just a normal chat message")))
    });
    let html = "<b>bold</b> and <script>alert(1)</script> text with <i>tags</i>";
    c.bench_function("fastchat/strip tags (html)", |b| {
        b.iter(|| strip_tags(black_box(html)))
    });
    c.bench_function("fastchat/validate display_name", |b| {
        b.iter(|| display_name(black_box("  Alice <em>A.</em> ")))
    });
}

criterion_group!(benches, codec);
criterion_main!(benches);
