//! What survives: data written, the engine closed (or its process killed) and the directory
//! opened again; and how opening refuses a directory it must not use.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    reason = "tests fail by panicking; the crash child reports acknowledgements on stdout"
)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::TempDir;
use switchboard_core::engine::{
    Append, Appended, Expect, Position, Put, Read, ReadFrom, Retention,
};
use switchboard_core::{Engine, Frame};
use switchboard_engine_durable::{
    DurableEngine, DurableLimits, FORMAT_FILE, OpenError, STORE_FILE,
};

const BIG: Retention = Retention::trim(10_000, 1 << 24);

fn open(dir: &TempDir) -> Engine {
    DurableEngine::engine(dir.path(), DurableLimits::default()).unwrap()
}

fn done(appended: Appended) -> Position {
    match appended {
        Appended::Done(position) => position,
        Appended::Conflict(top) => panic!("unexpected conflict at {top:?}"),
    }
}

fn entries(read: Read) -> (Vec<(u64, String)>, Position) {
    match read {
        Read::Entries { entries, top } => (
            entries
                .into_iter()
                .map(|e| (e.offset, e.frame.as_str().to_owned()))
                .collect(),
            top,
        ),
        Read::Gone { top } => panic!("log gone (top {top:?})"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_acknowledged_is_there_after_a_reopen() {
    let dir = TempDir::new("reopen");
    let engine = open(&dir);
    let cluster_id = engine.cluster_id().await.unwrap();
    for text in ["a", "b", "c", "d"] {
        done(
            engine
                .append("log", Frame::text(text), Append::store(BIG))
                .await
                .unwrap(),
        );
    }
    assert!(engine.remove("log", 2).await.unwrap());
    // A trimming log keeps its newest two.
    let two = Retention::trim(2, 1 << 20);
    for text in ["1", "2", "3"] {
        done(
            engine
                .append("trim", Frame::text(text), Append::publish(two))
                .await
                .unwrap(),
        );
    }
    // A dropped log, and one appended transiently (numbered, never stored).
    done(
        engine
            .append("dropped", Frame::text("x"), Append::store(BIG))
            .await
            .unwrap(),
    );
    engine.drop_log("dropped").await.unwrap();
    done(
        engine
            .append("transient", Frame::text("t"), Append::transient())
            .await
            .unwrap(),
    );
    assert_eq!(
        engine
            .put("key", Bytes::from_static(b"v1"), Expect::Absent, None)
            .await
            .unwrap(),
        Put::Stored(1)
    );
    assert_eq!(
        engine
            .put("key", Bytes::from_static(b"v2"), Expect::Version(1), None)
            .await
            .unwrap(),
        Put::Stored(2)
    );
    engine
        .put(
            "short",
            Bytes::from_static(b"gone soon"),
            Expect::Any,
            Some(Duration::from_millis(100)),
        )
        .await
        .unwrap();
    engine
        .put(
            "long",
            Bytes::from_static(b"kept"),
            Expect::Any,
            Some(Duration::from_secs(3600)),
        )
        .await
        .unwrap();
    assert_eq!(engine.add("counter", 7, 0, 100).await.unwrap(), Ok(7));
    assert_eq!(
        engine
            .remember(
                "request-1",
                Bytes::from_static(b"answer"),
                Duration::from_secs(60)
            )
            .await
            .unwrap(),
        None
    );
    let (log_before, log_top) =
        entries(engine.read("log", ReadFrom::Latest(10), 10).await.unwrap());
    let (trim_before, trim_top) =
        entries(engine.read("trim", ReadFrom::Latest(10), 10).await.unwrap());
    drop(engine);

    tokio::time::sleep(Duration::from_millis(150)).await;
    let engine = open(&dir);
    assert_eq!(engine.cluster_id().await.unwrap(), cluster_id, "cluster id");
    let (log_after, top) = entries(engine.read("log", ReadFrom::Latest(10), 10).await.unwrap());
    assert_eq!(log_after, log_before);
    assert_eq!(
        log_after,
        [(1, "a".into()), (3, "c".into()), (4, "d".into())]
    );
    assert_eq!(
        top, log_top,
        "the same epoch and top: a client's position stays valid"
    );
    let first = Position {
        offset: 1,
        epoch: log_top.epoch,
    };
    let (continued, _) = entries(
        engine
            .read("log", ReadFrom::After(first), 10)
            .await
            .unwrap(),
    );
    assert_eq!(continued, [(3, "c".into()), (4, "d".into())]);
    let (trim_after, top) = entries(engine.read("trim", ReadFrom::Latest(10), 10).await.unwrap());
    assert_eq!((trim_after, top), (trim_before, trim_top));
    assert_eq!(
        done(
            engine
                .append("log", Frame::text("e"), Append::store(BIG))
                .await
                .unwrap()
        ),
        Position {
            offset: 5,
            epoch: log_top.epoch
        },
        "offsets continue in the same epoch"
    );
    let again = done(
        engine
            .append("dropped", Frame::text("y"), Append::store(BIG))
            .await
            .unwrap(),
    );
    assert_eq!(again.offset, 1, "a dropped log starts over");
    assert_ne!(again.epoch, log_top.epoch, "in an epoch never handed out");
    let transient = done(
        engine
            .append("transient", Frame::text("u"), Append::transient())
            .await
            .unwrap(),
    );
    assert_eq!(transient.offset, 2, "a transient offset is never reused");
    let key = engine.get("key").await.unwrap().unwrap();
    assert_eq!((key.version, &key.value[..]), (2, &b"v2"[..]));
    assert_eq!(
        engine.get("short").await.unwrap(),
        None,
        "expired while closed"
    );
    assert_eq!(
        &engine.get("long").await.unwrap().unwrap().value[..],
        b"kept"
    );
    assert_eq!(engine.add("counter", 1, 0, 100).await.unwrap(), Ok(8));
    assert_eq!(
        engine.recall("request-1").await.unwrap(),
        Some(Bytes::from_static(b"answer"))
    );
}

#[tokio::test]
async fn what_is_trimmed_or_expired_is_deleted_from_disk_too() {
    let dir = TempDir::new("bounded");
    let (engine, hub) = DurableEngine::open(dir.path(), DurableLimits::default()).unwrap();
    let engine_handle = Engine::new(engine, hub);
    let two = Retention::trim(2, 1 << 20);
    for i in 0..50 {
        done(
            engine_handle
                .append("t", Frame::text(format!("entry {i}")), Append::store(two))
                .await
                .unwrap(),
        );
    }
    engine_handle
        .put(
            "brief",
            Bytes::from_static(b"v"),
            Expect::Any,
            Some(Duration::from_millis(50)),
        )
        .await
        .unwrap();
    drop(engine_handle);
    // Past the key's expiry (wall clock, which keeps running while the engine is closed).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (engine, _hub) = DurableEngine::open(dir.path(), DurableLimits::default()).unwrap();
    // The log and its two entries; the expired key is still on disk until the first sweep.
    assert_eq!(engine.items_used(), 4);
    let engine = Engine::new(engine, _hub);
    // Any write runs the sweep, which deletes the expired key in the same commit.
    engine
        .put("other", Bytes::from_static(b"w"), Expect::Any, None)
        .await
        .unwrap();
    drop(engine);
    let (engine, _hub) = DurableEngine::open(dir.path(), DurableLimits::default()).unwrap();
    assert_eq!(
        engine.items_used(),
        4,
        "the log, two entries and the new key"
    );
}

#[tokio::test]
async fn a_full_engine_refuses_new_state_and_keeps_what_it_has() {
    let dir = TempDir::new("full");
    let limits = DurableLimits {
        max_items: 3,
        max_bytes: 1 << 20,
    };
    let engine = DurableEngine::engine(dir.path(), limits).unwrap();
    for text in ["a", "b"] {
        done(
            engine
                .append("t", Frame::text(text), Append::store(BIG))
                .await
                .unwrap(),
        );
    }
    assert!(matches!(
        engine
            .append("t", Frame::text("c"), Append::store(BIG))
            .await,
        Err(switchboard_core::engine::EngineError::Full(_))
    ));
    assert!(matches!(
        engine
            .put("k", Bytes::from_static(b"v"), Expect::Any, None)
            .await,
        Err(switchboard_core::engine::EngineError::Full(_))
    ));
    drop(engine);
    let engine = DurableEngine::engine(dir.path(), limits).unwrap();
    let (kept, _) = entries(engine.read("t", ReadFrom::Latest(10), 10).await.unwrap());
    assert_eq!(kept, [(1, "a".into()), (2, "b".into())]);
}

#[test]
fn a_second_open_of_a_directory_in_use_is_refused() {
    let dir = TempDir::new("locked");
    let (first, _hub) = DurableEngine::open(dir.path(), DurableLimits::default()).unwrap();
    let second = DurableEngine::open(dir.path(), DurableLimits::default());
    assert!(
        matches!(second, Err(OpenError::Locked { .. })),
        "{second:?}"
    );
    drop(first);
    DurableEngine::open(dir.path(), DurableLimits::default()).expect("free again once closed");
}

#[test]
fn a_directory_from_a_newer_format_is_refused() {
    let dir = TempDir::new("newer");
    drop(DurableEngine::open(dir.path(), DurableLimits::default()).unwrap());
    std::fs::write(
        dir.path().join(FORMAT_FILE),
        "switchboard durable engine format 2\n",
    )
    .unwrap();
    let opened = DurableEngine::open(dir.path(), DurableLimits::default());
    assert!(
        matches!(
            opened,
            Err(OpenError::NewerFormat {
                found: 2,
                supported: 1,
                ..
            })
        ),
        "{opened:?}"
    );
    assert!(opened.unwrap_err().to_string().contains("format version 2"));
}

/// Writes some state, closes the engine and hands back the directory.
async fn written(name: &str) -> TempDir {
    let dir = TempDir::new(name);
    let engine = open(&dir);
    for i in 0..200 {
        done(
            engine
                .append(
                    "t",
                    Frame::text(format!("entry {i} {}", "x".repeat(100))),
                    Append::store(BIG),
                )
                .await
                .unwrap(),
        );
    }
    drop(engine);
    dir
}

fn assert_corrupt(dir: &TempDir) {
    let opened = DurableEngine::open(dir.path(), DurableLimits::default());
    assert!(
        matches!(opened, Err(OpenError::Corrupt { .. })),
        "{opened:?}"
    );
}

#[tokio::test]
async fn a_truncated_store_is_refused_not_wiped() {
    let dir = written("truncated").await;
    let file = dir.path().join(STORE_FILE);
    let len = std::fs::metadata(&file).unwrap().len();
    let handle = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    handle.set_len(len / 2).unwrap();
    drop(handle);
    assert_corrupt(&dir);
    assert_eq!(
        std::fs::metadata(&file).unwrap().len(),
        len / 2,
        "nothing was rewritten"
    );
    // Emptied entirely, or deleted: still refused, because FORMAT says state was stored.
    std::fs::File::create(&file).unwrap();
    assert_corrupt(&dir);
    std::fs::remove_file(&file).unwrap();
    assert_corrupt(&dir);
}

#[tokio::test]
async fn a_garbled_store_is_refused() {
    let dir = written("garbled").await;
    let file = dir.path().join(STORE_FILE);
    let mut bytes = std::fs::read(&file).unwrap();
    // Garble everything past the header: every page's checksum fails.
    for byte in bytes.iter_mut().skip(4096) {
        *byte ^= 0x5a;
    }
    std::fs::write(&file, &bytes).unwrap();
    assert_corrupt(&dir);
    // A garbled header too.
    for byte in bytes.iter_mut().take(64) {
        *byte = 0xff;
    }
    std::fs::write(&file, &bytes).unwrap();
    assert_corrupt(&dir);
    std::fs::write(dir.path().join(FORMAT_FILE), "something else\n").unwrap();
    assert_corrupt(&dir);
}

/// Set for the child process of [`acknowledged_appends_survive_sigkill`]: its data directory.
const CHILD_DIR: &str = "SWITCHBOARD_DURABLE_CRASH_CHILD_DIR";

/// The child of [`acknowledged_appends_survive_sigkill`] (does nothing in a normal run): four
/// writers append and put as fast as they can, and every acknowledged write is reported on
/// stdout as `ack <topic> <offset> <text>` or `put <key> <version>`, until the parent kills it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let engine = DurableEngine::engine(&dir, DurableLimits::default()).unwrap();
    let (report, reports) = std::sync::mpsc::channel::<String>();
    let printer = std::thread::spawn(move || {
        let mut out = std::io::stdout().lock();
        for line in reports {
            writeln!(out, "{line}").unwrap();
            out.flush().unwrap();
        }
    });
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let engine = engine.clone();
            let report = report.clone();
            tokio::spawn(async move {
                for i in 0u64.. {
                    let topic = format!("topic-{w}");
                    let text = format!("w{w}-{i}");
                    let position = done(
                        engine
                            .append(&topic, Frame::text(text.clone()), Append::store(BIG))
                            .await
                            .unwrap(),
                    );
                    report
                        .send(format!("ack {topic} {} {text}", position.offset))
                        .unwrap();
                    let key = format!("key-{w}");
                    if let Put::Stored(version) = engine
                        .put(&key, Bytes::from(text), Expect::Any, None)
                        .await
                        .unwrap()
                    {
                        report.send(format!("put {key} {version}")).unwrap();
                    }
                }
            })
        })
        .collect();
    drop(report);
    for writer in writers {
        writer.await.unwrap();
    }
    printer.join().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_sigkill() {
    if std::env::var(CHILD_DIR).is_ok() {
        return;
    }
    let dir = TempDir::new("sigkill");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    // Let the child get a few hundred acknowledgements in, then kill it mid-stream.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut acked: Vec<(String, u64, String)> = Vec::new();
    let mut versions: std::collections::HashMap<String, u64> = Default::default();
    while acked.len() < 300 {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = received
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("only {} acknowledgements arrived", acked.len()));
        record(&line, &mut acked, &mut versions);
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // Whatever was acknowledged before the kill, up to the pipe's end.
    while let Ok(line) = received.recv_timeout(Duration::from_millis(500)) {
        record(&line, &mut acked, &mut versions);
    }

    let engine = open(&dir);
    let mut logs = std::collections::HashMap::new();
    for (topic, offset, text) in &acked {
        if !logs.contains_key(topic) {
            let (log, _) = entries(
                engine
                    .read(topic, ReadFrom::Latest(10_000), 10_000)
                    .await
                    .unwrap(),
            );
            logs.insert(topic.clone(), log);
        }
        assert!(
            logs[topic].contains(&(*offset, text.clone())),
            "acknowledged {topic}/{offset} {text} is lost"
        );
    }
    for (key, version) in &versions {
        let stored = engine.get(key).await.unwrap().unwrap();
        assert!(
            stored.version >= *version,
            "{key} went back from version {version} to {}",
            stored.version
        );
    }
}

fn record(
    line: &str,
    acked: &mut Vec<(String, u64, String)>,
    versions: &mut std::collections::HashMap<String, u64>,
) {
    let parts: Vec<&str> = line.split(' ').collect();
    match parts.as_slice() {
        ["ack", topic, offset, text] => {
            acked.push(((*topic).into(), offset.parse().unwrap(), (*text).into()));
        }
        ["put", key, version] => {
            versions.insert((*key).into(), version.parse().unwrap());
        }
        // libtest's own lines ("running 1 test", ...).
        _ => {}
    }
}
