//! How long a node takes to open a large data directory (open + load), for
//! `docs/durability.md`. Ignored: it writes about 1 GB. Run it in release mode:
//!
//! ```text
//! SWITCHBOARD_RECOVERY_MB=1024 cargo test --release -p switchboard-engine-durable \
//!     --test recovery_time -- --ignored --nocapture
//! ```
//!
//! With `SWITCHBOARD_RECOVERY_DIR=<dir>` it only times opening that existing directory (e.g. one
//! left by a fill that was SIGKILLed, which also makes the open a crash recovery), and keeps it.
//!
//! The directory is filled with what protocols store: chat-history entries (ip-chat `message`
//! frames of ~400 bytes, in 2,000 logs of 1,000 entries), records in keyed state (~300 bytes)
//! and counters, written by 1,024 concurrent writers (group commit), then closed and timed
//! while it opens again. It is deleted afterwards.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    reason = "a measurement that reports on stdout and fails by panicking"
)]

mod common;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use common::TempDir;
use switchboard_core::Frame;
use switchboard_core::engine::{Append, Expect, Read, ReadFrom, Retention, StateEngine};
use switchboard_engine_durable::{DurableEngine, DurableLimits, STORE_FILE};

const WRITERS: usize = 1024;
const LOGS: usize = 2000;
const HISTORY: Retention = Retention::trim(1000, 1 << 24);

fn chat_frame(i: usize) -> Frame {
    Frame::text(format!(
        r#"{{"type":"message","data":{{"id":"{:08x}-1c2d-4e5f-8a9b-{:012x}","text":"{}","author_id":"6f1e0c8a-9b7d-5c3e-8f2a-1d4b6e8c0a2f","author_name":"user {}","created_at":{},"reactions":{{}}}}}}"#,
        i,
        i,
        "lorem ipsum dolor sit amet, consectetur adipiscing elit ".repeat(4),
        i % 97,
        1_700_000_000 + i
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes about 1 GB; run in release mode for docs/durability.md"]
async fn open_time_of_a_large_data_dir() {
    if let Ok(dir) = std::env::var("SWITCHBOARD_RECOVERY_DIR") {
        let opening = Instant::now();
        let (engine, _hub) = DurableEngine::open(
            &dir,
            DurableLimits {
                max_items: usize::MAX,
                max_bytes: usize::MAX,
            },
        )
        .unwrap();
        let open = opening.elapsed();
        let file = std::fs::metadata(std::path::Path::new(&dir).join(STORE_FILE))
            .unwrap()
            .len();
        println!(
            "open + load of {dir} ({} MiB file, {} items, {} MiB charged): {open:?}",
            file >> 20,
            engine.items_used(),
            engine.bytes_used() >> 20
        );
        return;
    }
    let megabytes: usize = std::env::var("SWITCHBOARD_RECOVERY_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let target = megabytes << 20;
    let limits = DurableLimits {
        max_items: usize::MAX,
        max_bytes: usize::MAX,
    };
    let dir = TempDir::new("recovery");
    let (engine, _hub) = DurableEngine::open(dir.path(), limits).unwrap();
    let engine = Arc::new(engine);
    let started = Instant::now();
    let mut next = 0usize;
    while engine.bytes_used() < target {
        let writers: Vec<_> = (next..next + WRITERS)
            .map(|i| {
                let engine = engine.clone();
                tokio::spawn(async move {
                    if i % 8 == 7 {
                        // A record in keyed state (a reaction record, a user, a session).
                        let value = Bytes::from(format!(
                            "{{\"record\":{i},\"pad\":\"{}\"}}",
                            "x".repeat(280)
                        ));
                        engine
                            .put(&format!("record:{i:012}"), value, Expect::Any, None)
                            .await
                            .unwrap();
                    } else {
                        let topic = format!("chat:{}", i % LOGS);
                        engine
                            .append(&topic, chat_frame(i), Append::store(HISTORY), None)
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
        next += WRITERS;
    }
    let fill = started.elapsed();
    let (items, bytes, commits) = (engine.items_used(), engine.bytes_used(), engine.commits());
    drop(engine);
    let file = std::fs::metadata(dir.path().join(STORE_FILE))
        .unwrap()
        .len();
    println!(
        "filled {items} items, {} MiB charged, file {} MiB, in {fill:?} ({commits} commits, {:.0} writes/commit)",
        bytes >> 20,
        file >> 20,
        next as f64 / commits as f64
    );

    let opening = Instant::now();
    let (engine, _hub) = DurableEngine::open(dir.path(), limits).unwrap();
    let open = opening.elapsed();
    assert_eq!(engine.items_used(), items, "everything loaded");
    let read = engine.read("chat:1", ReadFrom::Latest(1), 1).await.unwrap();
    assert!(matches!(read, Read::Entries { ref entries, .. } if entries.len() == 1));
    println!(
        "open + load of {} MiB ({items} items): {open:?}",
        file >> 20
    );
}
