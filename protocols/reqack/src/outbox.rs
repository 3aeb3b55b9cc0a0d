//! Redelivery on a live socket: which of its user's unacknowledged events this socket must get
//! again, and when (sans-IO).
//!
//! A user's outbox is a log in the state engine (see `docs/protocols/reqack.md`, "State and the
//! engine"): its entries are exactly the events not acknowledged yet, on every node. What one
//! socket remembers is only when it last sent each of them, so each socket redelivers on its own
//! schedule; every socket of the user does so, which is "sent again to every open socket".

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use switchboard_core::Frame;
use switchboard_core::engine::Entry;

use crate::messages::is_ephemeral_frame;

/// When this socket last sent each pending event of its user, by event id (the log offset).
#[derive(Debug, Default)]
pub(crate) struct Redelivery {
    last_sent: BTreeMap<u64, Instant>,
}

impl Redelivery {
    /// Number of events this socket tracks.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.last_sent.len()
    }

    /// The socket was just sent `entries` (its replay on connect) at `now`.
    pub(crate) fn sent(&mut self, entries: &[Entry], now: Instant) {
        for entry in entries {
            self.last_sent.insert(entry.offset, now);
        }
    }

    /// Given what the outbox holds now (`entries`, in id order), the events this socket must send
    /// again: those it sent at least `timeout` ago, marked as sent at `now`. An event seen for
    /// the first time counts as sent now (it reached the socket live when it was appended, at
    /// most one tick ago). Events no longer in the outbox were acknowledged and are forgotten,
    /// so an acknowledged event is never sent again.
    pub(crate) fn overdue(
        &mut self,
        entries: &[Entry],
        now: Instant,
        timeout: Duration,
    ) -> Vec<Frame> {
        let mut frames = Vec::new();
        let mut kept = BTreeMap::new();
        for entry in entries {
            if is_ephemeral_frame(entry.frame.as_str()) {
                // Ephemeral events are transient (never stored); one read anyway is not redelivered.
                continue;
            }
            let last = self.last_sent.get(&entry.offset).copied().unwrap_or(now);
            let last = if now.saturating_duration_since(last) >= timeout {
                frames.push(entry.frame.clone());
                now
            } else {
                last
            };
            kept.insert(entry.offset, last);
        }
        self.last_sent = kept;
        frames
    }
}

/// The events of a replay: the outbox's entries without any ephemeral one.
pub(crate) fn durable(entries: &[Entry]) -> Vec<Entry> {
    entries
        .iter()
        .filter(|entry| !is_ephemeral_frame(entry.frame.as_str()))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    fn entry(offset: u64) -> Entry {
        Entry {
            offset,
            frame: Frame::text(format!(
                r#"{{"type":"event","id":{offset},"eventType":"new"}}"#
            )),
        }
    }

    fn ids(frames: &[Frame]) -> Vec<String> {
        frames
            .iter()
            .map(|f| {
                let v: serde_json::Value = serde_json::from_str(f.as_str()).unwrap();
                v["id"].to_string()
            })
            .collect()
    }

    #[test]
    fn only_overdue_events_are_redelivered_and_the_clock_restarts() {
        let t0 = Instant::now();
        let mut r = Redelivery::default();
        r.sent(&[entry(1)], t0);
        // Event 2 shows up at t0 + 5 s (delivered live, first seen at this tick).
        assert!(
            r.overdue(&[entry(1), entry(2)], t0 + Duration::from_secs(5), T)
                .is_empty()
        );
        assert!(
            r.overdue(&[entry(1), entry(2)], t0 + Duration::from_secs(9), T)
                .is_empty()
        );
        let again = r.overdue(&[entry(1), entry(2)], t0 + Duration::from_secs(10), T);
        assert_eq!(ids(&again), ["1"]);
        let again = r.overdue(&[entry(1), entry(2)], t0 + Duration::from_secs(15), T);
        assert_eq!(ids(&again), ["2"]);
        assert!(
            r.overdue(&[entry(1), entry(2)], t0 + Duration::from_secs(19), T)
                .is_empty()
        );
        let again = r.overdue(&[entry(1), entry(2)], t0 + Duration::from_secs(25), T);
        assert_eq!(ids(&again), ["1", "2"], "in id order");
    }

    #[test]
    fn acknowledged_events_are_forgotten_and_never_sent_again() {
        let t0 = Instant::now();
        let mut r = Redelivery::default();
        r.sent(&[entry(1), entry(2)], t0);
        // 1 was acked (on any socket, any node): it is no longer in the outbox.
        assert_eq!(ids(&r.overdue(&[entry(2)], t0 + T, T)), ["2"]);
        assert_eq!(r.len(), 1);
        assert!(r.overdue(&[], t0 + T * 5, T).is_empty());
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn a_reconnect_resets_the_redelivery_clock() {
        let t0 = Instant::now();
        let mut r = Redelivery::default();
        r.sent(&[entry(1)], t0 + Duration::from_secs(8));
        assert!(
            r.overdue(&[entry(1)], t0 + Duration::from_secs(12), T)
                .is_empty()
        );
        assert_eq!(
            r.overdue(&[entry(1)], t0 + Duration::from_secs(18), T)
                .len(),
            1
        );
    }

    #[test]
    fn ephemeral_events_caught_in_passing_are_never_redelivered() {
        let t0 = Instant::now();
        let typing = Entry {
            offset: 3,
            frame: Frame::text(r#"{"type":"event","id":3,"eventType":"typing"}"#),
        };
        let mut r = Redelivery::default();
        assert!(r.overdue(&[entry(1), typing.clone()], t0, T).is_empty());
        assert_eq!(
            ids(&r.overdue(&[entry(1), typing.clone()], t0 + T, T)),
            ["1"]
        );
        assert_eq!(durable(&[entry(1), typing]).len(), 1);
    }
}
