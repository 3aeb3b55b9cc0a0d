//! collab codec micro-benchmarks: parsing code-change, applying and transforming operations.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use switchboard_collab::ot::{Operation, transform};
use switchboard_collab::parse;

fn codec(c: &mut Criterion) {
    let frame = r#"{"type":"code-change","payload":{"userId":"u1","changes":{"baseVersion":41,"ops":[120,"x",-2,300]}}}"#;
    c.bench_function("collab/parse code-change op", |b| {
        b.iter(|| parse(black_box(frame)))
    });
    let doc = "fn main() {\n    println!(\"hello\");\n}\n".repeat(10);
    let len = doc.chars().count();
    let a = Operation::new()
        .retain(10)
        .insert("let x = 1;")
        .retain(len - 10);
    let b_op = Operation::new().retain(20).delete(5).retain(len - 25);
    c.bench_function("collab/apply insert", |b| {
        b.iter(|| a.apply(black_box(&doc)))
    });
    c.bench_function("collab/transform insert vs delete", |b| {
        b.iter(|| transform(black_box(&a), black_box(&b_op)))
    });
    let edited = doc.replacen("hello", "hello, world", 1);
    c.bench_function("collab/diff full-text change", |b| {
        b.iter(|| Operation::diff(black_box(&doc), black_box(&edited)))
    });
}

criterion_group!(benches, codec);
criterion_main!(benches);
