//! One user's unacknowledged events, in id order, with the time each was last sent.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use switchboard_core::{ClientKey, Frame};

#[derive(Debug)]
struct Pending {
    frame: Frame,
    last_sent: Instant,
    created: Instant,
    charge: Charge,
}

/// Who an event is charged to and how much: given back when the event leaves the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Charge {
    /// The client whose request caused the event (its per-client share).
    pub(crate) sender: ClientKey,
    /// Bytes charged (frame plus overhead, see [`crate::cost::event_bytes`]).
    pub(crate) bytes: usize,
}

/// Events waiting for an ack, keyed by event id (ascending = the order they were created).
///
/// The outbox never drops an event on its own: the caller checks [`Outbox::len`] against its
/// limit before pushing and refuses the request instead.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    pending: BTreeMap<u64, Pending>,
    /// Sum of the charged bytes of the pending events.
    bytes: usize,
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

    /// Charged bytes of the pending events.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Keeps event `id` (already encoded as `frame`), created and sent at `now` (or waiting, if
    /// the user is offline: it is sent on connect anyway).
    pub(crate) fn push(
        &mut self,
        id: u64,
        frame: Frame,
        charge: Charge,
        now: Instant,
        timeout: Duration,
    ) {
        let replaced = self.pending.insert(
            id,
            Pending {
                frame,
                last_sent: now,
                created: now,
                charge,
            },
        );
        if let Some(old) = replaced {
            // Ids are never reused; if one were, its old charge must not leak.
            self.bytes = self.bytes.saturating_sub(old.charge.bytes);
        }
        self.bytes = self.bytes.saturating_add(charge.bytes);
        let due = now.checked_add(timeout).unwrap_or(now);
        self.next_due = Some(self.next_due.map_or(due, |d| d.min(due)));
    }

    /// Removes event `id` and returns its charge; `None` if it was not waiting (already acked,
    /// ephemeral, unknown).
    pub(crate) fn ack(&mut self, id: u64) -> Option<Charge> {
        let removed = self.pending.remove(&id).map(|p| p.charge);
        if let Some(charge) = removed {
            self.bytes = self.bytes.saturating_sub(charge.bytes);
        }
        if self.pending.is_empty() {
            self.next_due = None;
        }
        removed
    }

    /// When the oldest waiting event was created.
    pub(crate) fn oldest_created(&self) -> Option<Instant> {
        self.pending.values().next().map(|p| p.created)
    }

    /// Removes the events created at or before `cutoff` (the oldest first: ids grow with time)
    /// and returns their charges.
    pub(crate) fn expire(&mut self, cutoff: Instant) -> Vec<Charge> {
        let mut expired = Vec::new();
        while let Some(entry) = self.pending.first_entry() {
            if entry.get().created > cutoff {
                break;
            }
            let pending = entry.remove();
            self.bytes = self.bytes.saturating_sub(pending.charge.bytes);
            expired.push(pending.charge);
        }
        if self.pending.is_empty() {
            self.next_due = None;
        }
        expired
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
        self.next_due = (!self.pending.is_empty()).then(|| now.checked_add(timeout).unwrap_or(now));
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
            let due = pending
                .last_sent
                .checked_add(timeout)
                .unwrap_or(pending.last_sent);
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

    fn charge() -> Charge {
        Charge {
            sender: ClientKey::from_ip(std::net::IpAddr::from([127, 0, 0, 1])),
            bytes: 10,
        }
    }

    fn texts(frames: &[Frame]) -> Vec<&str> {
        frames.iter().map(Frame::as_str).collect()
    }

    #[test]
    fn events_leave_only_when_acked() {
        let now = Instant::now();
        let mut outbox = Outbox::default();
        outbox.push(1, Frame::text("one"), charge(), now, T);
        outbox.push(2, Frame::text("two"), charge(), now, T);
        assert_eq!(outbox.len(), 2);
        assert_eq!(outbox.bytes(), 20);
        assert_eq!(outbox.ack(1), Some(charge()));
        assert_eq!(outbox.ack(1), None, "a second ack is a no-op");
        assert_eq!(outbox.ack(99), None, "an unknown id is a no-op");
        assert_eq!(texts(&outbox.resend_all(now, T)), ["two"]);
        assert!(outbox.ack(2).is_some());
        assert!(outbox.is_empty());
        assert_eq!(outbox.bytes(), 0);
        assert!(outbox.resend_all(now, T).is_empty());
    }

    #[test]
    fn resend_all_keeps_id_order_whatever_the_ack_order() {
        let now = Instant::now();
        let mut outbox = Outbox::default();
        for id in [3, 1, 2, 5, 4] {
            outbox.push(id, Frame::text(id.to_string()), charge(), now, T);
        }
        outbox.ack(4);
        assert_eq!(texts(&outbox.resend_all(now, T)), ["1", "2", "3", "5"]);
    }

    #[test]
    fn only_overdue_events_are_redelivered_and_the_clock_restarts() {
        let t0 = Instant::now();
        let mut outbox = Outbox::default();
        outbox.push(1, Frame::text("1"), charge(), t0, T);
        outbox.push(
            2,
            Frame::text("2"),
            charge(),
            t0 + Duration::from_secs(5),
            T,
        );
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
        outbox.push(1, Frame::text("1"), charge(), t0, T);
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
    fn expiry_removes_the_oldest_events_and_gives_back_their_charges() {
        let t0 = Instant::now();
        let mut outbox = Outbox::default();
        outbox.push(1, Frame::text("1"), charge(), t0, T);
        outbox.push(
            2,
            Frame::text("2"),
            charge(),
            t0 + Duration::from_secs(5),
            T,
        );
        assert!(outbox.expire(t0 - Duration::from_secs(1)).is_empty());
        assert_eq!(outbox.expire(t0 + Duration::from_secs(1)), vec![charge()]);
        assert_eq!(outbox.oldest_created(), Some(t0 + Duration::from_secs(5)));
        assert_eq!(outbox.bytes(), 10);
        assert_eq!(outbox.expire(t0 + Duration::from_secs(5)).len(), 1);
        assert!(outbox.is_empty());
    }

    #[test]
    fn acking_everything_clears_the_due_time() {
        let t0 = Instant::now();
        let mut outbox = Outbox::default();
        outbox.push(1, Frame::text("1"), charge(), t0, T);
        outbox.ack(1);
        assert!(outbox.next_due.is_none());
        assert!(outbox.take_overdue(t0 + T * 2, T).is_empty());
    }
}
