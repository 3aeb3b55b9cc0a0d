//! Bringing topics' publications to this node, in log order, without gaps or doubles.
//!
//! Every logged publication carries its offset and epoch. Per topic the node keeps a cursor (the
//! last offset it delivered) and the entries that arrived ahead of it. An entry arrives twice on
//! the node that appended it (once from the append itself, so its own sockets see it at once and
//! in the order of their own writes, once from the channel); the cursor drops the second. A gap
//! (the channel was lost, or a node's own append overtook the channel) is filled from the log
//! after a short wait; whatever the log no longer has (transient entries, removed or trimmed
//! ones) is skipped, because it is final once the log's top is past it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use redis::Client;
use switchboard_core::engine::{EngineError, EngineResult, Position, ReadFrom};
use switchboard_core::sync::lock;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use switchboard_core::{Backoff, Frame};

use crate::codec::{Body, Published, parse_published};
use crate::{Inner, Rows};

/// How long an entry may wait for an earlier one before the log is read to fill the gap.
const GAP_WAIT: Duration = Duration::from_millis(300);
/// Entries held ahead of a gap beyond which the log is read at once.
const MAX_PENDING: usize = 4096;
/// ...or bytes of entries.
const MAX_PENDING_BYTES: usize = 4 * 1024 * 1024;
/// Entries read from a log per round trip when filling a gap.
const FILL_PAGE: usize = 1000;
/// Nominal waits between attempts to reconnect the subscriber connection (core's `Backoff`:
/// doubling, jittered).
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(1);

/// One subscribed topic.
#[derive(Debug, Default)]
pub(crate) struct TopicState {
    /// (epoch, offset) of the last entry delivered; `None` until the subscription is confirmed.
    cursor: Option<(u64, u64)>,
    /// Entries that arrived ahead of the cursor, by offset, with their epoch.
    pending: Pending,
    /// Since when `pending` has waited for an earlier entry.
    gap_since: Option<Instant>,
}

/// Entries held ahead of a gap, by offset, with their epoch, and the bytes they hold.
#[derive(Debug, Default)]
struct Pending {
    entries: BTreeMap<u64, (u64, Body)>,
    bytes: usize,
}

fn body_bytes(body: &Body) -> usize {
    body.frame
        .len()
        .saturating_add(body.reply.as_ref().map_or(0, Frame::len))
}

impl Pending {
    fn insert(&mut self, offset: u64, epoch: u64, body: Body) {
        if self.entries.contains_key(&offset) {
            return;
        }
        self.bytes = self.bytes.saturating_add(body_bytes(&body));
        self.entries.insert(offset, (epoch, body));
    }

    /// The lowest entry, if its offset is at most `upto`.
    fn pop_first_upto(&mut self, upto: u64) -> Option<(u64, u64, Body)> {
        let entry = self.entries.first_entry()?;
        if *entry.key() > upto {
            return None;
        }
        let offset = *entry.key();
        let (epoch, body) = entry.remove();
        self.bytes = self.bytes.saturating_sub(body_bytes(&body));
        Some((offset, epoch, body))
    }

    fn first_offset(&self) -> Option<u64> {
        self.entries.keys().next().copied()
    }

    fn retain(&mut self, mut keep: impl FnMut(u64, u64) -> bool) {
        let mut freed = 0usize;
        self.entries.retain(|offset, (epoch, body)| {
            let kept = keep(*offset, *epoch);
            if !kept {
                freed = freed.saturating_add(body_bytes(body));
            }
            kept
        });
        self.bytes = self.bytes.saturating_sub(freed);
    }

    fn newest_epoch(&self) -> Option<u64> {
        self.entries.values().map(|(epoch, _)| *epoch).max()
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// What the engine asks of the subscriber connection.
#[derive(Debug)]
pub(crate) enum SubCommand {
    Subscribe(String, oneshot::Sender<EngineResult<()>>),
    Unsubscribe(String),
}

impl Inner {
    /// Delivers a logged entry in its place: now if it is the next one, later if earlier ones
    /// are missing, never if it was delivered already.
    pub(crate) fn offer(&self, topic: &str, epoch: u64, offset: u64, body: Body) {
        let mut subs = lock(&self.subs);
        let Some(state) = subs.get_mut(topic) else {
            return;
        };
        let Some((current_epoch, cursor)) = state.cursor else {
            state.pending.insert(offset, epoch, body);
            return;
        };
        if epoch < current_epoch || (epoch == current_epoch && offset <= cursor) {
            return;
        }
        state.pending.insert(offset, epoch, body);
        self.drain(topic, state);
    }

    /// Delivers the pending entries that follow the cursor without a gap.
    fn drain(&self, topic: &str, state: &mut TopicState) {
        let Some((mut epoch, mut cursor)) = state.cursor else {
            return;
        };
        // An entry of a newer epoch means the log was recreated since the cursor was set: the
        // new log is delivered from its start.
        if let Some(newest) = state.pending.newest_epoch()
            && newest > epoch
        {
            epoch = newest;
            cursor = 0;
        }
        state
            .pending
            .retain(|offset, e| e == epoch && offset > cursor);
        while state.pending.first_offset() == Some(cursor.saturating_add(1)) {
            let Some((offset, _, body)) = state.pending.pop_first_upto(cursor.saturating_add(1))
            else {
                break;
            };
            self.deliver(topic, Some(offset), &body);
            cursor = offset;
        }
        state.cursor = Some((epoch, cursor));
        if state.pending.is_empty() {
            state.gap_since = None;
        } else if state.gap_since.is_none() {
            state.gap_since = Some(Instant::now());
        }
    }

    pub(crate) fn deliver(&self, topic: &str, offset: Option<u64>, body: &Body) {
        self.hub
            .deliver(topic, offset, &body.frame, body.except, body.reply.as_ref());
    }

    /// Sets a topic's cursor once its subscription is confirmed: everything up to the log's
    /// `top` is what a joining subscriber reads from the log.
    pub(crate) fn start_cursor(&self, topic: &str, top: Position) {
        let mut subs = lock(&self.subs);
        if let Some(state) = subs.get_mut(topic)
            && state.cursor.is_none()
        {
            state.cursor = Some((top.epoch, top.offset));
            self.drain(topic, state);
        }
    }

    /// Reads what the log has after the topic's cursor and delivers it with what was pending,
    /// up to the log's top; offsets the log no longer has are final and skipped.
    pub(crate) async fn fill(&self, topic: &str) -> EngineResult<()> {
        loop {
            let cursor = lock(&self.subs).get(topic).and_then(|state| state.cursor);
            let Some((epoch, offset)) = cursor else {
                return Ok(());
            };
            let from = ReadFrom::After(Position { offset, epoch });
            let read = self.read_rows(topic, from, FILL_PAGE).await?;
            let mut subs = lock(&self.subs);
            let Some(state) = subs.get_mut(topic) else {
                return Ok(());
            };
            if state.cursor != cursor {
                // Delivered meanwhile; look again from where it is now.
                continue;
            }
            let (rows, top, more) = match read {
                Rows::Entries { rows, top } => {
                    let more = rows.len() >= FILL_PAGE
                        && rows.last().is_some_and(|(o, _)| *o < top.offset);
                    (rows, top, more)
                }
                Rows::Gone { top } => {
                    tracing::warn!(topic, "a gap in a topic could not be filled from its log");
                    (Vec::new(), top, false)
                }
            };
            if top.epoch != epoch {
                state.pending.retain(|_, e| e == top.epoch);
            }
            let upto = if more {
                rows.last().map_or(top.offset, |(o, _)| *o)
            } else {
                top.offset
            };
            for (offset, body) in rows {
                state.pending.insert(offset, top.epoch, body);
            }
            let mut cursor = if top.epoch == epoch { offset } else { 0 };
            while let Some((at, _, body)) = state.pending.pop_first_upto(upto) {
                if at > cursor {
                    self.deliver(topic, Some(at), &body);
                    cursor = at;
                }
            }
            state.cursor = Some((top.epoch, cursor.max(upto)));
            state.gap_since = None;
            self.drain(topic, state);
            if !more {
                return Ok(());
            }
        }
    }

    /// Topics whose gap waited long enough to be filled from the log.
    fn stale_gaps(&self) -> Vec<String> {
        let now = Instant::now();
        lock(&self.subs)
            .iter()
            .filter(|(_, state)| {
                state.pending.len() >= MAX_PENDING
                    || state.pending.bytes >= MAX_PENDING_BYTES
                    || state
                        .gap_since
                        .is_some_and(|since| now.saturating_duration_since(since) >= GAP_WAIT)
            })
            .map(|(topic, _)| topic.clone())
            .collect()
    }

    fn handle_message(&self, channel: &str, payload: &[u8]) {
        let Some(topic) = channel.strip_prefix(self.channel_prefix.as_str()) else {
            return;
        };
        match parse_published(payload) {
            Some(Published::Logged {
                offset,
                epoch,
                body,
            }) => self.offer(topic, epoch, offset, body),
            Some(Published::Ephemeral { origin, body }) => {
                // The publishing node delivered it to its own sockets already.
                if origin != self.node && lock(&self.subs).contains_key(topic) {
                    self.deliver(topic, None, &body);
                }
            }
            None => tracing::warn!(channel, "a message no node wrote was ignored"),
        }
    }
}

/// The subscriber connection: (re)connects, (re)subscribes every topic the node needs, fills
/// what was missed while it was away, then feeds every message to [`Inner::offer`]. Ends when
/// the engine is dropped.
pub(crate) async fn run(
    weak: Weak<Inner>,
    client: Client,
    mut commands: mpsc::Receiver<SubCommand>,
) {
    let mut backoff = Backoff::new(RECONNECT_MIN, RECONNECT_MAX);
    loop {
        let Some(inner) = weak.upgrade() else {
            return;
        };
        let timeout = inner.config.command_timeout;
        let connected = tokio::time::timeout(timeout, async {
            let (mut sink, stream) = client.get_async_pubsub().await?.split();
            let topics: Vec<String> = lock(&inner.subs).keys().cloned().collect();
            if !topics.is_empty() {
                let channels: Vec<String> = topics.iter().map(|t| inner.keys.channel(t)).collect();
                sink.subscribe(channels).await?;
            }
            Ok::<_, redis::RedisError>((sink, stream, topics))
        })
        .await;
        let (mut sink, mut stream, topics) = match connected {
            Ok(Ok(connected)) => connected,
            failed => {
                if let Ok(Err(error)) = failed {
                    tracing::debug!(%error, "redis subscriber connection failed");
                }
                drop(inner);
                if !wait_refusing(&weak, &mut commands, backoff.next_delay()).await {
                    return;
                }
                continue;
            }
        };
        backoff.reset();
        inner.pubsub_up.store(true, Ordering::Release);
        if inner.was_connected.swap(true, Ordering::AcqRel) {
            tracing::info!(
                topics = topics.len(),
                "redis subscriber reconnected; filling gaps from the logs"
            );
        }
        for topic in &topics {
            if let Err(error) = inner.fill(topic).await {
                tracing::warn!(topic, %error, "could not fill a topic's gap after a reconnect");
            }
        }
        drop(inner);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = stream.next() => {
                    let Some(message) = message else { break };
                    let Some(inner) = weak.upgrade() else { return };
                    inner.handle_message(message.get_channel_name(), message.get_payload_bytes());
                }
                command = commands.recv() => {
                    let Some(command) = command else { return };
                    let Some(inner) = weak.upgrade() else { return };
                    match command {
                        SubCommand::Subscribe(topic, done) => {
                            let channel = inner.keys.channel(&topic);
                            let result = match tokio::time::timeout(timeout, sink.subscribe(channel)).await {
                                Ok(Ok(())) => Ok(()),
                                Ok(Err(error)) => Err(EngineError::Unavailable(format!("redis subscribe: {error}"))),
                                Err(_) => Err(EngineError::Unavailable("redis subscribe timed out".into())),
                            };
                            let _ = done.send(result);
                        }
                        SubCommand::Unsubscribe(topic) => {
                            // A socket may have subscribed again since the last one left.
                            if inner.hub.local_subscribers(&topic) == 0 {
                                lock(&inner.subs).remove(&topic);
                                let channel = inner.keys.channel(&topic);
                                let _ = tokio::time::timeout(timeout, sink.unsubscribe(channel)).await;
                            }
                        }
                    }
                }
                _ = tick.tick() => {
                    let Some(inner) = weak.upgrade() else { return };
                    for topic in inner.stale_gaps() {
                        if let Err(error) = inner.fill(&topic).await {
                            tracing::debug!(topic, %error, "could not fill a topic's gap");
                        }
                    }
                }
            }
        }
        let Some(inner) = weak.upgrade() else {
            return;
        };
        inner.pubsub_up.store(false, Ordering::Release);
        tracing::warn!("lost the redis subscriber connection; reconnecting");
    }
}

/// Waits `pause` before the next connection attempt, refusing subscriptions meanwhile. `false`
/// once the engine is gone.
async fn wait_refusing(
    weak: &Weak<Inner>,
    commands: &mut mpsc::Receiver<SubCommand>,
    pause: Duration,
) -> bool {
    let deadline = Instant::now() + pause;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return true,
            command = commands.recv() => match command {
                None => return false,
                Some(SubCommand::Subscribe(_, done)) => {
                    let _ = done.send(Err(EngineError::Unavailable("redis is unreachable".into())));
                }
                Some(SubCommand::Unsubscribe(topic)) => {
                    // Not subscribed now; only forget the topic so the reconnect skips it.
                    if let Some(inner) = weak.upgrade()
                        && inner.hub.local_subscribers(&topic) == 0
                    {
                        lock(&inner.subs).remove(&topic);
                    }
                }
            }
        }
    }
}

/// What a node's subscriptions hold, for [`Inner::subs`].
pub(crate) type Subscriptions = HashMap<String, TopicState>;
