//! One user's unacknowledged events, in id order, with the time each was last sent.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use switchboard_core::Frame;

#[derive(Debug)]
struct Pending {
    frame: Frame,
    last_sent: Instant,
}

/// Events waiting for an ack, keyed by event id (ascending = the order they were created).
///
/// The outbox never drops an event on its own: the caller checks [`Outbox::len`] against its
/// limit before pushing and refuses the request instead.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    pending: BTreeMap<u64, Pending>,
    /// No event is due for redelivery before this instant (a lower bound; `None` when empty).
    next_due: Option<Instant>,
}

impl Outbox {
    /// Number of unacknowledged events.
    pub(crate) fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether every event has been acknowledged.
    pub(crate) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Keeps event `id` (already encoded as `frame`), sent at `now` (or waiting, if the user is
    /// offline: it is sent on connect anyway).
    pub(crate) fn push(&mut self, id: u64, frame: Frame, now: Instant, timeout: Duration) {
        self.pending.insert(
            id,
            Pending {
                frame,
                last_sent: now,
            },
        );
        let due = now + timeout;
        self.next_due = Some(self.next_due.map_or(due, |d| d.min(due)));
    }

    /// Removes event `id`; `false` if it was not waiting (already acked, ephemeral, unknown).
    pub(crate) fn ack(&mut self, id: u64) -> bool {
        let removed = self.pending.remove(&id).is_some();
        if self.pending.is_empty() {
            self.next_due = None;
        }
        removed
    }

    /// Every waiting event in id order, marked as sent at `now` (a socket just connected).
    pub(crate) fn resend_all(&mut self, now: Instant, timeout: Duration) -> Vec<Frame> {
        let frames = self
            .pending
            .values_mut()
            .map(|p| {
                p.last_sent = now;
                p.frame.clone()
            })
            .collect();
        self.next_due = (!self.pending.is_empty()).then(|| now + timeout);
        frames
    }

    /// The events sent at least `timeout` ago and still not acked, in id order, marked as sent at
    /// `now`. Cheap when nothing is due.
    pub(crate) fn take_overdue(&mut self, now: Instant, timeout: Duration) -> Vec<Frame> {
        match self.next_due {
            Some(due) if due <= now => {}
            _ => return Vec::new(),
        }
        let mut frames = Vec::new();
        let mut next_due: Option<Instant> = None;
        for pending in self.pending.values_mut() {
            if now.saturating_duration_since(pending.last_sent) >= timeout {
                pending.last_sent = now;
                frames.push(pending.frame.clone());
            }
            let due = pending.last_sent + timeout;
            next_due = Some(next_due.map_or(due, |d| d.min(due)));
        }
        self.next_due = next_due;
        frames
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    fn texts(frames: &[Frame]) -> Vec<&str> {
        frames.iter().map(Frame::as_str).collect()
    }

    #[test]
    fn events_leave_only_when_acked() {
        let now = Instant::now();
        let mut outbox = Outbox::default();
        outbox.push(1, Frame::text("one"), now, T);
        outbox.push(2, Frame::text("two"), now, T);
        assert_eq!(outbox.len(), 2);
        assert!(outbox.ack(1));
        assert!(!outbox.ack(1), "a second ack is a no-op");
        assert!(!outbox.ack(99), "an unknown id is a no-op");
        assert_eq!(texts(&outbox.resend_all(now, T)), ["two"]);
        assert!(outbox.ack(2));
        assert!(outbox.is_empty());
        assert!(outbox.resend_all(now, T).is_empty());
    }

    #[test]
    fn resend_all_keeps_id_order_whatever_the_ack_order() {
        let now = Instant::now();
        let mut outbox = Outbox::default();
        for id in [3, 1, 2, 5, 4] {
            outbox.push(id, Frame::text(id.to_string()), now, T);
        }
        outbox.ack(4);
        assert_eq!(texts(&outbox.resend_all(now, T)), ["1", "2", "3", "5"]);
    }

    #[test]
    fn only_overdue_events_are_redelivered_and_the_clock_restarts() {
        let t0 = Instant::now();
        let mut outbox = Outbox::default();
        outbox.push(1, Frame::text("1"), t0, T);
        outbox.push(2, Frame::text("2"), t0 + Duration::from_secs(5), T);
        assert!(
            outbox
                .take_overdue(t0 + Duration::from_secs(9), T)
                .is_empty()
        );
        assert_eq!(
            texts(&outbox.take_overdue(t0 + Duration::from_secs(10), T)),
            ["1"]
        );
        assert_eq!(
            texts(&outbox.take_overdue(t0 + Duration::from_secs(15), T)),
            ["2"]
        );
        assert!(
            outbox
                .take_overdue(t0 + Duration::from_secs(19), T)
                .is_empty()
        );
        assert_eq!(
            texts(&outbox.take_overdue(t0 + Duration::from_secs(25), T)),
            ["1", "2"]
        );
    }

    #[test]
    fn a_reconnect_resets_the_redelivery_clock() {
        let t0 = Instant::now();
        let mut outbox = Outbox::default();
        outbox.push(1, Frame::text("1"), t0, T);
        outbox.resend_all(t0 + Duration::from_secs(8), T);
        assert!(
            outbox
                .take_overdue(t0 + Duration::from_secs(12), T)
                .is_empty()
        );
        assert_eq!(
            outbox.take_overdue(t0 + Duration::from_secs(18), T).len(),
            1
        );
    }

    #[test]
    fn acking_everything_clears_the_due_time() {
        let t0 = Instant::now();
        let mut outbox = Outbox::default();
        outbox.push(1, Frame::text("1"), t0, T);
        outbox.ack(1);
        assert!(outbox.next_due.is_none());
        assert!(outbox.take_overdue(t0 + T * 2, T).is_empty());
    }
}
