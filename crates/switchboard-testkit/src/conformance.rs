//! The engine-conformance suite: the behaviour every [`switchboard_core::engine::StateEngine`]
//! must have, checked the same way for each implementation.
//!
//! An implementation plugs in with an [`EngineHarness`] (how to make nodes of one cluster and how
//! to lose one) and the [`engine_conformance!`](crate::engine_conformance) macro, which expands
//! to one `#[tokio::test]` per case:
//!
//! ```ignore
//! switchboard_testkit::engine_conformance!(MyHarness::start().await);
//! ```
//!
//! Every wait is bounded by [`TIMEOUT`]; deliveries are awaited, never slept
//! for, so the suite holds for engines whose publications travel over a network.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use switchboard_core::engine::{
    Append, Appended, EngineEvent, Expect, NodeId, Position, Put, RateDecision, Read, ReadFrom,
    Retention,
};
use switchboard_core::{Engine, Frame, Outgoing, Peer, PeerLink, peer_channel};
use tokio::time::timeout;

use crate::TIMEOUT;

/// How the suite gets engines: nodes of one fresh cluster (one isolated namespace per harness),
/// and node loss.
pub trait EngineHarness: Send + Sync {
    /// A new node of the cluster under test.
    fn node(&self) -> impl Future<Output = Engine> + Send;
    /// Makes `node` disappear as if its process died. Its presence must expire within
    /// [`EngineHarness::expiry_bound`].
    fn kill(&self, node: NodeId) -> impl Future<Output = ()> + Send;
    /// Whether the engine spans several nodes (cross-node cases are skipped when it does not).
    fn multi_node(&self) -> bool {
        true
    }
    /// How long a lost node's presence may take to expire.
    fn expiry_bound(&self) -> Duration {
        TIMEOUT
    }
}

/// Expands to one `#[tokio::test]` per conformance case, each with a fresh harness built by
/// `$harness` (an expression, awaited if it is `async`: write `MyHarness::start().await`).
#[macro_export]
macro_rules! engine_conformance {
    ($harness:expr) => {
        $crate::engine_conformance!(@cases $harness;
            log_positions_and_reads,
            log_trims_oldest_and_reports_gone,
            log_refuses_when_full,
            log_compare_and_set_append,
            log_remove_never_reuses_offsets,
            log_drop_starts_a_new_epoch,
            appends_reach_every_node_in_one_order,
            ephemeral_publish_skips_except,
            the_author_gets_its_reply_in_the_entrys_place,
            transient_entries_are_numbered_and_published_but_not_kept,
            join_replays_then_goes_live_without_gaps_or_doubles,
            unsubscribe_stops_delivery,
            presence_counts_members_across_nodes,
            presence_of_a_lost_node_expires,
            keyed_state_compare_and_set,
            keyed_state_expires,
            take_hands_a_value_to_exactly_one_taker,
            counters_add_within_bounds,
            scan_pages_by_prefix,
            rate_limit_is_a_shared_sliding_window,
            idempotency_first_answer_wins,
            cluster_id_is_shared,
        );
    };
    (@cases $harness:expr; $($case:ident),* $(,)?) => {
        $(
            // Two worker threads: the cases race writers against readers for real.
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let harness = $harness;
                $crate::conformance::$case(&harness).await;
            }
        )*
    };
}

fn peer() -> (Peer, PeerLink) {
    let remote: SocketAddr = ([127, 0, 0, 1], 9).into();
    peer_channel(remote, 1 << 16)
}

fn frame(text: &str) -> Frame {
    Frame::text(text)
}

/// Waits (bounded) for `n` frames on `link`, flattening batches.
pub async fn recv_frames(link: &mut PeerLink, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < n {
        let item = timeout(TIMEOUT, link.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} frames arrived: {out:?}", out.len()));
        match item {
            Some(Outgoing::Frame(frame)) => out.push(frame.as_str().to_owned()),
            Some(Outgoing::Batch(frames)) => {
                out.extend(frames.iter().map(|f| f.as_str().to_owned()));
            }
            Some(Outgoing::Binary(_)) => panic!("unexpected binary frame"),
            None => panic!("link ended"),
        }
    }
    out
}

/// Asserts nothing more arrives on `link` within a short grace.
async fn expect_nothing(link: &mut PeerLink) {
    let more = timeout(Duration::from_millis(200), link.recv()).await;
    assert!(more.is_err(), "unexpected delivery: {more:?}");
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

fn done(appended: Appended) -> Position {
    match appended {
        Appended::Done(position) => position,
        Appended::Conflict(top) => panic!("unexpected conflict at {top:?}"),
    }
}

/// A topic name unique to one case run, so cases can share an engine namespace.
fn topic(case: &str) -> String {
    format!("conformance:{case}:{}", rand_suffix())
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    u64::from(nanos) ^ (NEXT.fetch_add(1, Ordering::Relaxed) << 32)
}

const BIG: Retention = Retention::trim(10_000, 1 << 24);

/// Offsets count from 1 in one epoch; reads by latest and after a position.
pub async fn log_positions_and_reads(h: &impl EngineHarness) {
    let engine = h.node().await;
    let t = topic("positions");
    let (empty, top) = entries(engine.read(&t, ReadFrom::Latest(10), 10).await.unwrap());
    assert!(empty.is_empty());
    assert_eq!(top.offset, 0);
    let p1 = done(
        engine
            .append(&t, frame("a"), Append::store(BIG))
            .await
            .unwrap(),
    );
    let p2 = done(
        engine
            .append(&t, frame("b"), Append::store(BIG))
            .await
            .unwrap(),
    );
    let p3 = done(
        engine
            .append(&t, frame("c"), Append::store(BIG))
            .await
            .unwrap(),
    );
    assert_eq!((p1.offset, p2.offset, p3.offset), (1, 2, 3));
    assert!(p1.epoch == p2.epoch && p2.epoch == p3.epoch);
    let (latest, top) = entries(engine.read(&t, ReadFrom::Latest(2), 10).await.unwrap());
    assert_eq!(latest, [(2, "b".into()), (3, "c".into())]);
    assert_eq!(top, p3);
    let (after, _) = entries(engine.read(&t, ReadFrom::After(p1), 10).await.unwrap());
    assert_eq!(after, [(2, "b".into()), (3, "c".into())]);
    let (limited, _) = entries(engine.read(&t, ReadFrom::After(p1), 1).await.unwrap());
    assert_eq!(limited, [(2, "b".into())]);
    let (none, _) = entries(engine.read(&t, ReadFrom::After(p3), 10).await.unwrap());
    assert!(none.is_empty());
    let other_epoch = Position {
        offset: 1,
        epoch: p1.epoch.wrapping_add(1),
    };
    assert!(matches!(
        engine.read(&t, ReadFrom::After(other_epoch), 10).await.unwrap(),
        Read::Gone { top } if top == p3
    ));
}

/// A trimming log keeps its newest entries; a position before the trim is gone.
pub async fn log_trims_oldest_and_reports_gone(h: &impl EngineHarness) {
    let engine = h.node().await;
    let t = topic("trim");
    let retention = Retention::trim(3, 1 << 20);
    let mut positions = Vec::new();
    for text in ["1", "2", "3", "4", "5"] {
        positions.push(done(
            engine
                .append(&t, frame(text), Append::store(retention))
                .await
                .unwrap(),
        ));
    }
    let (kept, _) = entries(engine.read(&t, ReadFrom::Latest(10), 10).await.unwrap());
    assert_eq!(kept, [(3, "3".into()), (4, "4".into()), (5, "5".into())]);
    assert!(matches!(
        engine
            .read(&t, ReadFrom::After(positions[0]), 10)
            .await
            .unwrap(),
        Read::Gone { .. }
    ));
    let (continued, _) = entries(
        engine
            .read(&t, ReadFrom::After(positions[1]), 10)
            .await
            .unwrap(),
    );
    assert_eq!(continued.len(), 3, "nothing after offset 2 was trimmed");
    // The byte bound trims too.
    let t2 = topic("trim-bytes");
    let by_bytes = Retention::trim(100, 10);
    for text in ["aaaa", "bbbb", "cccc"] {
        done(
            engine
                .append(&t2, frame(text), Append::store(by_bytes))
                .await
                .unwrap(),
        );
    }
    let (kept, _) = entries(engine.read(&t2, ReadFrom::Latest(10), 10).await.unwrap());
    assert_eq!(kept, [(2, "bbbb".into()), (3, "cccc".into())]);
}

/// A refusing log answers `Full` at its bound and keeps what it has.
pub async fn log_refuses_when_full(h: &impl EngineHarness) {
    let engine = h.node().await;
    let t = topic("refuse");
    let retention = Retention::refuse(2, 1 << 20);
    done(
        engine
            .append(&t, frame("a"), Append::store(retention))
            .await
            .unwrap(),
    );
    done(
        engine
            .append(&t, frame("b"), Append::store(retention))
            .await
            .unwrap(),
    );
    let refused = engine
        .append(&t, frame("c"), Append::store(retention))
        .await;
    assert!(
        matches!(refused, Err(switchboard_core::engine::EngineError::Full(_))),
        "{refused:?}"
    );
    let (kept, _) = entries(engine.read(&t, ReadFrom::Latest(10), 10).await.unwrap());
    assert_eq!(kept, [(1, "a".into()), (2, "b".into())]);
    assert!(engine.remove(&t, 1).await.unwrap());
    let p = done(
        engine
            .append(&t, frame("c"), Append::store(retention))
            .await
            .unwrap(),
    );
    assert_eq!(
        p.offset, 3,
        "room made by a removal; offsets are not reused"
    );
}

/// `if_top` appends only on the expected top and reports the top on conflict.
pub async fn log_compare_and_set_append(h: &impl EngineHarness) {
    let engine = h.node().await;
    let t = topic("cas");
    let p1 = done(
        engine
            .append(&t, frame("first"), Append::store(BIG).if_top(0))
            .await
            .unwrap(),
    );
    assert_eq!(p1.offset, 1);
    let conflict = engine
        .append(&t, frame("stale"), Append::store(BIG).if_top(0))
        .await
        .unwrap();
    assert_eq!(conflict, Appended::Conflict(p1));
    let p2 = done(
        engine
            .append(&t, frame("second"), Append::store(BIG).if_top(1))
            .await
            .unwrap(),
    );
    assert_eq!(p2.offset, 2);
    let (all, _) = entries(engine.read(&t, ReadFrom::Latest(10), 10).await.unwrap());
    assert_eq!(all, [(1, "first".into()), (2, "second".into())]);
}

/// Removing an entry hides it from reads; offsets keep growing.
pub async fn log_remove_never_reuses_offsets(h: &impl EngineHarness) {
    let engine = h.node().await;
    let t = topic("remove");
    for text in ["a", "b", "c"] {
        done(
            engine
                .append(&t, frame(text), Append::store(BIG))
                .await
                .unwrap(),
        );
    }
    assert!(engine.remove(&t, 2).await.unwrap());
    assert!(!engine.remove(&t, 2).await.unwrap());
    assert!(!engine.remove(&t, 99).await.unwrap());
    let (left, top) = entries(engine.read(&t, ReadFrom::Latest(10), 10).await.unwrap());
    assert_eq!(left, [(1, "a".into()), (3, "c".into())]);
    assert_eq!(top.offset, 3);
    assert!(engine.remove(&t, 3).await.unwrap());
    let p = done(
        engine
            .append(&t, frame("d"), Append::store(BIG))
            .await
            .unwrap(),
    );
    assert_eq!(p.offset, 4);
}

/// A dropped log starts over in a new epoch, so old positions are recognisably stale.
pub async fn log_drop_starts_a_new_epoch(h: &impl EngineHarness) {
    let engine = h.node().await;
    let t = topic("drop");
    let old = done(
        engine
            .append(&t, frame("a"), Append::store(BIG))
            .await
            .unwrap(),
    );
    engine.drop_log(&t).await.unwrap();
    let (none, _) = entries(engine.read(&t, ReadFrom::Latest(10), 10).await.unwrap());
    assert!(none.is_empty());
    let new = done(
        engine
            .append(&t, frame("b"), Append::store(BIG))
            .await
            .unwrap(),
    );
    assert_eq!(new.offset, 1);
    assert_ne!(new.epoch, old.epoch);
    assert!(matches!(
        engine.read(&t, ReadFrom::After(old), 10).await.unwrap(),
        Read::Gone { .. }
    ));
}

/// Concurrent appends from two nodes reach every subscriber on both nodes in one order.
pub async fn appends_reach_every_node_in_one_order(h: &impl EngineHarness) {
    let a = h.node().await;
    let b = if h.multi_node() {
        h.node().await
    } else {
        a.clone()
    };
    let t = topic("order");
    let (pa, mut la) = peer();
    let (pb, mut lb) = peer();
    a.subscribe(&t, &pa).await.unwrap();
    b.subscribe(&t, &pb).await.unwrap();
    const EACH: usize = 50;
    let writer = |engine: Engine, name: &'static str| {
        let t = t.clone();
        tokio::spawn(async move {
            for i in 0..EACH {
                let text = format!("{name}{i}");
                done(
                    engine
                        .append(&t, Frame::text(text), Append::publish(BIG))
                        .await
                        .unwrap(),
                );
            }
        })
    };
    let (wa, wb) = (writer(a.clone(), "a"), writer(b.clone(), "b"));
    wa.await.unwrap();
    wb.await.unwrap();
    let seen_a = recv_frames(&mut la, 2 * EACH).await;
    let seen_b = recv_frames(&mut lb, 2 * EACH).await;
    assert_eq!(seen_a, seen_b, "both nodes see one order");
    let (log, _) = entries(a.read(&t, ReadFrom::Latest(1000), 1000).await.unwrap());
    let log: Vec<String> = log.into_iter().map(|(_, text)| text).collect();
    assert_eq!(seen_a, log, "delivery order is log order");
    for name in ["a", "b"] {
        let own: Vec<&String> = seen_a.iter().filter(|s| s.starts_with(name)).collect();
        let expected: Vec<String> = (0..EACH).map(|i| format!("{name}{i}")).collect();
        assert_eq!(
            own,
            expected.iter().collect::<Vec<_>>(),
            "{name}'s own order"
        );
    }
}

/// An ephemeral publish reaches every subscriber on every node except the one named.
pub async fn ephemeral_publish_skips_except(h: &impl EngineHarness) {
    let a = h.node().await;
    let b = if h.multi_node() {
        h.node().await
    } else {
        a.clone()
    };
    let t = topic("ephemeral");
    let (p1, mut l1) = peer();
    let (p2, mut l2) = peer();
    let (p3, mut l3) = peer();
    a.subscribe(&t, &p1).await.unwrap();
    a.subscribe(&t, &p2).await.unwrap();
    b.subscribe(&t, &p3).await.unwrap();
    b.publish(&t, frame("typing"), Some(a.conn_ref(p1.id())))
        .await
        .unwrap();
    assert_eq!(recv_frames(&mut l2, 1).await, ["typing"]);
    assert_eq!(recv_frames(&mut l3, 1).await, ["typing"]);
    expect_nothing(&mut l1).await;
    let (none, _) = entries(a.read(&t, ReadFrom::Latest(10), 10).await.unwrap());
    assert!(none.is_empty(), "an ephemeral publish leaves no log");
}

/// An appended entry's author receives its reply instead of the entry, in the entry's place
/// in the topic's order, on whichever node it is.
pub async fn the_author_gets_its_reply_in_the_entrys_place(h: &impl EngineHarness) {
    let a = h.node().await;
    let b = if h.multi_node() {
        h.node().await
    } else {
        a.clone()
    };
    let t = topic("reply");
    let (author, mut author_link) = peer();
    let (other, mut other_link) = peer();
    b.subscribe(&t, &author).await.unwrap();
    a.subscribe(&t, &other).await.unwrap();
    done(
        a.append(&t, frame("e1"), Append::publish(BIG))
            .await
            .unwrap(),
    );
    done(
        a.append_with_reply(
            &t,
            frame("e2"),
            Append::publish(BIG).except(b.conn_ref(author.id())),
            frame("ack2"),
        )
        .await
        .unwrap(),
    );
    done(
        a.append(&t, frame("e3"), Append::publish(BIG))
            .await
            .unwrap(),
    );
    assert_eq!(recv_frames(&mut author_link, 3).await, ["e1", "ack2", "e3"]);
    assert_eq!(recv_frames(&mut other_link, 3).await, ["e1", "e2", "e3"]);
    let (log, _) = entries(a.read(&t, ReadFrom::Latest(10), 10).await.unwrap());
    assert_eq!(
        log[1],
        (2, "e2".into()),
        "the log holds the entry, not the reply"
    );
}

/// A transient entry takes the next offset and is published in its place, but is never stored.
pub async fn transient_entries_are_numbered_and_published_but_not_kept(h: &impl EngineHarness) {
    let engine = h.node().await;
    let t = topic("transient");
    let (p, mut link) = peer();
    engine.subscribe(&t, &p).await.unwrap();
    let retention = Retention::refuse(1, 1 << 20);
    let p1 = done(
        engine
            .append(&t, frame("kept"), Append::publish(retention))
            .await
            .unwrap(),
    );
    // The log is full for kept entries, yet transient ones still go through.
    let p2 = done(
        engine
            .append(&t, frame("passing"), Append::transient())
            .await
            .unwrap(),
    );
    let p3 = done(
        engine
            .append(&t, frame("by"), Append::transient().if_top(2))
            .await
            .unwrap(),
    );
    assert_eq!((p1.offset, p2.offset, p3.offset), (1, 2, 3));
    assert_eq!(p1.epoch, p3.epoch);
    assert_eq!(recv_frames(&mut link, 3).await, ["kept", "passing", "by"]);
    let (kept, top) = entries(engine.read(&t, ReadFrom::Latest(10), 10).await.unwrap());
    assert_eq!(kept, [(1, "kept".into())]);
    assert_eq!(top.offset, 3);
    assert!(!engine.remove(&t, 2).await.unwrap(), "nothing to remove");
    assert!(matches!(
        engine
            .append(&t, frame("stale"), Append::transient().if_top(2))
            .await
            .unwrap(),
        Appended::Conflict(_)
    ));
}

/// A subscriber joining while entries are appended sees the replay and then every later entry,
/// each exactly once, in order.
pub async fn join_replays_then_goes_live_without_gaps_or_doubles(h: &impl EngineHarness) {
    let writer_node = h.node().await;
    let reader_node = if h.multi_node() {
        h.node().await
    } else {
        writer_node.clone()
    };
    let t = topic("join");
    const TOTAL: usize = 2000;
    const JOINERS: usize = 40;
    let writer = {
        let t = t.clone();
        tokio::spawn(async move {
            for i in 0..TOTAL {
                done(
                    writer_node
                        .append(&t, Frame::text(i.to_string()), Append::publish(BIG))
                        .await
                        .unwrap(),
                );
                tokio::task::yield_now().await;
            }
        })
    };
    // Joiners arrive one after another while the writer appends, so publications land in
    // every phase of a join (before, during and after its read).
    let mut links = Vec::new();
    for _ in 0..JOINERS {
        let (p, link) = peer();
        let joining = reader_node
            .join(&t, &p, ReadFrom::Latest(TOTAL), TOTAL)
            .await
            .unwrap();
        let replay: Vec<Frame> = match joining.read() {
            Read::Entries { entries, .. } => entries.iter().map(|e| e.frame.clone()).collect(),
            Read::Gone { .. } => panic!("a fresh log is never gone"),
        };
        joining.go_live(replay);
        links.push((p, link));
        tokio::task::yield_now().await;
    }
    writer.await.unwrap();
    let expected: Vec<String> = (0..TOTAL).map(|i| i.to_string()).collect();
    for (_, link) in &mut links {
        let seen = recv_frames(link, TOTAL).await;
        assert_eq!(seen, expected);
    }
    // Nothing doubled after the last entry either.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (_, link) in &mut links {
        assert!(link.try_recv().is_none(), "a frame arrived twice");
    }
}

/// After unsubscribing, a connection receives nothing more.
pub async fn unsubscribe_stops_delivery(h: &impl EngineHarness) {
    let engine = h.node().await;
    let t = topic("unsubscribe");
    let (p, mut link) = peer();
    engine.subscribe(&t, &p).await.unwrap();
    engine.publish(&t, frame("one"), None).await.unwrap();
    assert_eq!(recv_frames(&mut link, 1).await, ["one"]);
    engine.unsubscribe(&t, p.id());
    engine.publish(&t, frame("two"), None).await.unwrap();
    done(
        engine
            .append(&t, frame("three"), Append::publish(BIG))
            .await
            .unwrap(),
    );
    expect_nothing(&mut link).await;
}

/// First join and last leave are reported once per member, whichever node its sockets are on.
pub async fn presence_counts_members_across_nodes(h: &impl EngineHarness) {
    let a = h.node().await;
    let b = if h.multi_node() {
        h.node().await
    } else {
        a.clone()
    };
    let room = topic("presence");
    let (c1, c2, c3) = (
        a.conn_ref(peer().0.id()),
        b.conn_ref(peer().0.id()),
        a.conn_ref(peer().0.id()),
    );
    assert!(a.presence_join(&room, "carol", c1).await.unwrap());
    assert!(!b.presence_join(&room, "carol", c2).await.unwrap());
    assert!(
        !a.presence_join(&room, "carol", c1).await.unwrap(),
        "idempotent"
    );
    assert!(a.presence_join(&room, "alice", c3).await.unwrap());
    assert_eq!(a.presence_members(&room).await.unwrap(), ["carol", "alice"]);
    assert_eq!(b.presence_members(&room).await.unwrap(), ["carol", "alice"]);
    assert!(!a.presence_leave(&room, "carol", c1).await.unwrap());
    assert!(b.presence_contains(&room, "carol").await.unwrap());
    assert!(b.presence_leave(&room, "carol", c2).await.unwrap());
    assert!(!b.presence_leave(&room, "carol", c2).await.unwrap());
    assert!(!a.presence_contains(&room, "carol").await.unwrap());
    assert!(!a.presence_leave(&room, "nobody", c1).await.unwrap());
    assert_eq!(a.presence_members(&room).await.unwrap(), ["alice"]);
}

/// When a node is lost, members whose last connection it held leave, and exactly one live node
/// hears of each.
pub async fn presence_of_a_lost_node_expires(h: &impl EngineHarness) {
    if !h.multi_node() {
        return;
    }
    let a = h.node().await;
    let b = h.node().await;
    let room = topic("expiry");
    let on_b = b.conn_ref(peer().0.id());
    let also_b = b.conn_ref(peer().0.id());
    let on_a = a.conn_ref(peer().0.id());
    assert!(b.presence_join(&room, "bob", on_b).await.unwrap());
    assert!(b.presence_join(&room, "both", also_b).await.unwrap());
    assert!(!a.presence_join(&room, "both", on_a).await.unwrap());
    h.kill(b.node()).await;
    let event = timeout(h.expiry_bound(), async {
        loop {
            match a.next_event().await {
                Some(EngineEvent::MemberExpired { room: r, member }) if r == room => {
                    return member;
                }
                Some(_) => {}
                None => panic!("engine events ended"),
            }
        }
    })
    .await
    .expect("bob's presence expires");
    assert_eq!(event, "bob");
    assert_eq!(a.presence_members(&room).await.unwrap(), ["both"]);
    let more = timeout(Duration::from_millis(200), a.next_event()).await;
    if let Ok(Some(EngineEvent::MemberExpired { room: r, member })) = more {
        assert_ne!(
            r, room,
            "{member} expired, yet only bob lost his last connection"
        );
    }
}

/// Keyed state: versions from 1, conditional writes and deletes.
pub async fn keyed_state_compare_and_set(h: &impl EngineHarness) {
    let engine = h.node().await;
    let key = topic("kv");
    assert_eq!(engine.get(&key).await.unwrap(), None);
    let v1 = Bytes::from_static(b"one");
    assert_eq!(
        engine
            .put(&key, v1.clone(), Expect::Absent, None)
            .await
            .unwrap(),
        Put::Stored(1)
    );
    match engine
        .put(&key, Bytes::from_static(b"x"), Expect::Absent, None)
        .await
        .unwrap()
    {
        Put::Conflict(Some(current)) => assert_eq!((current.version, current.value), (1, v1)),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        engine
            .put(&key, Bytes::from_static(b"two"), Expect::Version(1), None)
            .await
            .unwrap(),
        Put::Stored(2)
    );
    assert!(matches!(
        engine
            .put(&key, Bytes::from_static(b"stale"), Expect::Version(1), None)
            .await
            .unwrap(),
        Put::Conflict(Some(_))
    ));
    assert_eq!(
        engine
            .put(&key, Bytes::from_static(b"three"), Expect::Any, None)
            .await
            .unwrap(),
        Put::Stored(3)
    );
    let got = engine.get(&key).await.unwrap().unwrap();
    assert_eq!((got.version, &got.value[..]), (3, &b"three"[..]));
    assert!(!engine.delete(&key, Expect::Version(2)).await.unwrap());
    assert!(engine.delete(&key, Expect::Version(3)).await.unwrap());
    assert_eq!(engine.get(&key).await.unwrap(), None);
    assert!(!engine.delete(&key, Expect::Any).await.unwrap());
}

/// A key written with a time-to-live is gone after it.
pub async fn keyed_state_expires(h: &impl EngineHarness) {
    let engine = h.node().await;
    let key = topic("ttl");
    engine
        .put(
            &key,
            Bytes::from_static(b"v"),
            Expect::Absent,
            Some(Duration::from_millis(300)),
        )
        .await
        .unwrap();
    assert!(engine.get(&key).await.unwrap().is_some());
    timeout(TIMEOUT, async {
        while engine.get(&key).await.unwrap().is_some() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the key expires");
    assert_eq!(
        engine
            .put(&key, Bytes::from_static(b"again"), Expect::Absent, None)
            .await
            .unwrap(),
        Put::Stored(1),
        "an expired key is absent"
    );
}

/// Of several concurrent takers of one key, exactly one gets its value.
pub async fn take_hands_a_value_to_exactly_one_taker(h: &impl EngineHarness) {
    let a = h.node().await;
    let b = if h.multi_node() {
        h.node().await
    } else {
        a.clone()
    };
    let key = topic("take");
    assert_eq!(a.take(&key, Expect::Any).await.unwrap(), None);
    a.put(&key, Bytes::from_static(b"v"), Expect::Any, None)
        .await
        .unwrap();
    assert_eq!(a.take(&key, Expect::Version(9)).await.unwrap(), None);
    let takers: Vec<_> = (0..8)
        .map(|i| {
            let engine = if i % 2 == 0 { a.clone() } else { b.clone() };
            let key = key.clone();
            tokio::spawn(async move { engine.take(&key, Expect::Any).await.unwrap() })
        })
        .collect();
    let mut got = Vec::new();
    for taker in takers {
        got.extend(taker.await.unwrap());
    }
    assert_eq!(got.len(), 1, "exactly one taker: {got:?}");
    assert_eq!(&got[0].value[..], b"v");
    assert_eq!(a.get(&key).await.unwrap(), None);
}

/// Counters add atomically within bounds, refuse beyond them, and vanish at zero.
pub async fn counters_add_within_bounds(h: &impl EngineHarness) {
    let a = h.node().await;
    let b = if h.multi_node() {
        h.node().await
    } else {
        a.clone()
    };
    let key = topic("counter");
    let adders: Vec<_> = (0..20)
        .map(|i| {
            let engine = if i % 2 == 0 { a.clone() } else { b.clone() };
            let key = key.clone();
            tokio::spawn(async move { engine.add(&key, 1, 0, 15).await.unwrap() })
        })
        .collect();
    let mut accepted = 0;
    for adder in adders {
        if adder.await.unwrap().is_ok() {
            accepted += 1;
        }
    }
    assert_eq!(accepted, 15, "the bound holds under concurrency");
    assert_eq!(a.add(&key, 1, 0, 15).await.unwrap(), Err(15));
    assert_eq!(&a.get(&key).await.unwrap().unwrap().value[..], b"15");
    assert_eq!(b.add(&key, -20, 0, 15).await.unwrap(), Err(15));
    assert_eq!(b.add(&key, -15, 0, 15).await.unwrap(), Ok(0));
    assert_eq!(a.get(&key).await.unwrap(), None, "a zero counter is gone");
    assert_eq!(a.add(&key, -1, -5, 5).await.unwrap(), Ok(-1));
}

/// `scan` lists one prefix in key order, in pages.
pub async fn scan_pages_by_prefix(h: &impl EngineHarness) {
    let engine = h.node().await;
    let prefix = format!("{}:", topic("scan"));
    for name in ["c", "a", "b", "d"] {
        engine
            .put(
                &format!("{prefix}{name}"),
                Bytes::from(name.to_owned()),
                Expect::Any,
                None,
            )
            .await
            .unwrap();
    }
    engine
        .put(&prefix, Bytes::from_static(b"bare"), Expect::Any, None)
        .await
        .unwrap();
    engine
        .put("zz-unrelated", Bytes::from_static(b"x"), Expect::Any, None)
        .await
        .unwrap();
    let first = engine.scan(&prefix, None, 3).await.unwrap();
    let keys: Vec<&str> = first.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [prefix.clone(), format!("{prefix}a"), format!("{prefix}b")]
    );
    let rest = engine
        .scan(&prefix, Some(&format!("{prefix}b")), 10)
        .await
        .unwrap();
    let keys: Vec<String> = rest.into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, [format!("{prefix}c"), format!("{prefix}d")]);
}

/// A rate limit is one sliding window for its key, whichever node counts.
pub async fn rate_limit_is_a_shared_sliding_window(h: &impl EngineHarness) {
    let a = h.node().await;
    let b = if h.multi_node() {
        h.node().await
    } else {
        a.clone()
    };
    let key = topic("rate");
    let window = Duration::from_secs(60);
    assert!(a.rate_limit(&key, 3, window).await.unwrap().is_allowed());
    assert!(b.rate_limit(&key, 3, window).await.unwrap().is_allowed());
    assert!(a.rate_limit(&key, 3, window).await.unwrap().is_allowed());
    match b.rate_limit(&key, 3, window).await.unwrap() {
        RateDecision::Limited { retry_after } => assert!(retry_after <= window),
        RateDecision::Allowed => panic!("the fourth in a window of three"),
    }
    let other = topic("rate-other");
    assert!(b.rate_limit(&other, 3, window).await.unwrap().is_allowed());
    // A short window frees up again.
    let short = topic("rate-short");
    let brief = Duration::from_millis(300);
    assert!(a.rate_limit(&short, 1, brief).await.unwrap().is_allowed());
    assert!(!a.rate_limit(&short, 1, brief).await.unwrap().is_allowed());
    timeout(TIMEOUT, async {
        while !a.rate_limit(&short, 1, brief).await.unwrap().is_allowed() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the window slides");
}

/// The first stored response for an idempotency key is the answer everywhere.
pub async fn idempotency_first_answer_wins(h: &impl EngineHarness) {
    let a = h.node().await;
    let b = if h.multi_node() {
        h.node().await
    } else {
        a.clone()
    };
    let key = topic("idem");
    let ttl = Duration::from_secs(60);
    assert_eq!(a.recall(&key).await.unwrap(), None);
    assert_eq!(
        a.remember(&key, Bytes::from_static(b"first"), ttl)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        b.remember(&key, Bytes::from_static(b"second"), ttl)
            .await
            .unwrap(),
        Some(Bytes::from_static(b"first"))
    );
    assert_eq!(
        b.recall(&key).await.unwrap(),
        Some(Bytes::from_static(b"first"))
    );
}

/// Every node of a cluster reports the same cluster id; nodes have distinct ids.
pub async fn cluster_id_is_shared(h: &impl EngineHarness) {
    let a = h.node().await;
    let id = a.cluster_id().await.unwrap();
    assert_eq!(a.cluster_id().await.unwrap(), id, "stable");
    if h.multi_node() {
        let b = h.node().await;
        assert_eq!(b.cluster_id().await.unwrap(), id);
        assert_ne!(a.node(), b.node());
    }
    let set: BTreeSet<_> = [a.node()].into_iter().collect();
    assert_eq!(set.len(), 1);
}
