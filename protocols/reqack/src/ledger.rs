//! What this node queued and is not known to be acknowledged: the node-local books behind the
//! per-client shares, the node's pending totals and the expiry of events for users that never
//! connected (sans-IO).
//!
//! The events themselves live in the recipients' outbox logs in the state engine; the ledger
//! only remembers, for each event this node appended, who caused it (the sender's
//! [`ClientKey`]), what it is charged and when it was created. An ack on this node settles its
//! entry at once; an ack on another node is found by [`crate::state`]'s pruning, which reads the
//! logs back when a bound is reached. On one node the books are exact.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use switchboard_core::{ClientKey, MemoryBudget};

use crate::cost;

/// One event this node queued.
#[derive(Debug, Clone, Copy)]
struct Queued {
    client: ClientKey,
    bytes: usize,
    created: Instant,
}

/// The events this node queued for one recipient.
#[derive(Debug, Default)]
struct Recipient {
    events: BTreeMap<u64, Queued>,
    /// The recipient had never connected when they were queued (and has not since, as far as
    /// this node knows): they expire, and they count against their senders' unclaimed shares.
    unclaimed: bool,
}

/// What one client (by address) made this node queue.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Usage {
    /// Events not acknowledged yet, and their charged bytes (reservations included).
    pub(crate) pending: usize,
    pub(crate) pending_bytes: usize,
    /// Users that never connected holding events of this client: name → how many.
    unclaimed: HashMap<String, usize>,
}

impl Usage {
    fn is_empty(&self) -> bool {
        self.pending == 0 && self.pending_bytes == 0 && self.unclaimed.is_empty()
    }

    /// Users that never connected this client wrote to (and whose events still wait).
    pub(crate) fn unclaimed_users(&self) -> usize {
        self.unclaimed.len()
    }
}

/// Why a reservation was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The node's total of pending events (items or bytes).
    Total {
        pending: usize,
        pending_bytes: usize,
    },
    /// The sending client's share of pending events.
    ClientShare {
        pending: usize,
        pending_bytes: usize,
    },
    /// The sending client's share of users that never connected.
    Unclaimed { held: usize },
    /// The protocol's memory budget.
    Budget,
}

/// Room taken for events about to be appended; settled by [`Ledger::commit`] per event and
/// [`Ledger::cancel`] for what is left.
#[derive(Debug)]
#[must_use = "a reservation holds room until it is committed or cancelled"]
pub(crate) struct Reservation {
    client: ClientKey,
    count: usize,
    bytes: usize,
    /// The charge reserved per event (an upper bound of the real one).
    each: usize,
}

/// The limits the ledger enforces.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_pending: usize,
    pub(crate) max_pending_bytes: usize,
    pub(crate) share: cost::Share,
    pub(crate) max_unclaimed_users_per_client: usize,
}

/// The node's books of queued, unacknowledged events.
#[derive(Debug)]
pub(crate) struct Ledger {
    limits: Limits,
    budget: Arc<MemoryBudget>,
    recipients: HashMap<String, Recipient>,
    clients: HashMap<ClientKey, Usage>,
    /// Events and charged bytes, reservations included.
    pending: usize,
    pending_bytes: usize,
}

impl Ledger {
    pub(crate) fn new(limits: Limits, budget: Arc<MemoryBudget>) -> Self {
        Self {
            limits,
            budget,
            recipients: HashMap::new(),
            clients: HashMap::new(),
            pending: 0,
            pending_bytes: 0,
        }
    }

    /// Events queued here and not known to be acknowledged (reservations included).
    pub(crate) fn pending(&self) -> usize {
        self.pending
    }

    /// Their charged bytes.
    pub(crate) fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    /// Clients holding a share.
    pub(crate) fn clients(&self) -> usize {
        self.clients.len()
    }

    /// Recipients with events queued here, and how many of them never connected.
    pub(crate) fn recipients(&self) -> (usize, usize) {
        let unclaimed = self.recipients.values().filter(|r| r.unclaimed).count();
        (self.recipients.len(), unclaimed)
    }

    /// `client`'s usage.
    #[cfg(test)]
    pub(crate) fn usage(&self, client: ClientKey) -> Usage {
        self.clients.get(&client).cloned().unwrap_or_default()
    }

    fn tidy(&mut self, client: ClientKey) {
        if self.clients.get(&client).is_some_and(Usage::is_empty) {
            self.clients.remove(&client);
        }
    }

    /// Takes room for one event of at most `each` charged bytes to each of `recipients` (name,
    /// and whether it never connected), caused by `client`: checks the node's totals, the
    /// client's shares and the budget, in that order.
    pub(crate) fn reserve(
        &mut self,
        client: ClientKey,
        recipients: &[(&str, bool)],
        each: usize,
    ) -> Result<Reservation, Refusal> {
        let count = recipients.len();
        let bytes = each.saturating_mul(count);
        let usage = self.clients.get(&client);
        let (held, held_bytes) = usage.map_or((0, 0), |u| (u.pending, u.pending_bytes));
        if self.pending.saturating_add(count) > self.limits.max_pending
            || self.pending_bytes.saturating_add(bytes) > self.limits.max_pending_bytes
        {
            return Err(Refusal::Total {
                pending: self.pending,
                pending_bytes: self.pending_bytes,
            });
        }
        if held.saturating_add(count) > self.limits.share.items
            || held_bytes.saturating_add(bytes) > self.limits.share.bytes
        {
            return Err(Refusal::ClientShare {
                pending: held,
                pending_bytes: held_bytes,
            });
        }
        let unclaimed_held = usage.map_or(0, Usage::unclaimed_users);
        let new_unclaimed = recipients
            .iter()
            .filter(|(name, unclaimed)| {
                *unclaimed && !usage.is_some_and(|u| u.unclaimed.contains_key(*name))
            })
            .count();
        if new_unclaimed > 0
            && unclaimed_held.saturating_add(new_unclaimed)
                > self.limits.max_unclaimed_users_per_client
        {
            return Err(Refusal::Unclaimed {
                held: unclaimed_held,
            });
        }
        if self.budget.try_reserve(bytes).is_err() {
            return Err(Refusal::Budget);
        }
        self.pending = self.pending.saturating_add(count);
        self.pending_bytes = self.pending_bytes.saturating_add(bytes);
        let usage = self.clients.entry(client).or_default();
        usage.pending = usage.pending.saturating_add(count);
        usage.pending_bytes = usage.pending_bytes.saturating_add(bytes);
        Ok(Reservation {
            client,
            count,
            bytes,
            each,
        })
    }

    /// One reserved event was appended to `user`'s outbox as `id`, with a frame of `frame_len`
    /// bytes: it is on the books until acknowledged (or expired, if `unclaimed`).
    pub(crate) fn commit(
        &mut self,
        reservation: &mut Reservation,
        user: &str,
        id: u64,
        frame_len: usize,
        unclaimed: bool,
        now: Instant,
    ) {
        if reservation.count == 0 {
            return;
        }
        let client = reservation.client;
        let charge = cost::event_bytes(frame_len, user).min(reservation.each);
        let surplus = reservation.each.saturating_sub(charge);
        reservation.count = reservation.count.saturating_sub(1);
        reservation.bytes = reservation.bytes.saturating_sub(reservation.each);
        self.give_back(client, 0, surplus);
        let recipient = self.recipients.entry(user.to_owned()).or_default();
        if recipient.events.is_empty() {
            recipient.unclaimed = unclaimed;
        }
        let counts_unclaimed = recipient.unclaimed;
        recipient.events.insert(
            id,
            Queued {
                client,
                bytes: charge,
                created: now,
            },
        );
        if counts_unclaimed {
            let usage = self.clients.entry(client).or_default();
            let held = usage.unclaimed.entry(user.to_owned()).or_default();
            *held = held.saturating_add(1);
        }
    }

    /// Gives back what is left of `reservation` (events that were not appended).
    pub(crate) fn cancel(&mut self, reservation: Reservation) {
        self.give_back(reservation.client, reservation.count, reservation.bytes);
    }

    fn give_back(&mut self, client: ClientKey, count: usize, bytes: usize) {
        self.pending = self.pending.saturating_sub(count);
        self.pending_bytes = self.pending_bytes.saturating_sub(bytes);
        self.budget.release(bytes);
        if let Some(usage) = self.clients.get_mut(&client) {
            usage.pending = usage.pending.saturating_sub(count);
            usage.pending_bytes = usage.pending_bytes.saturating_sub(bytes);
        }
        self.tidy(client);
    }

    /// Event `id` of `user` left the outbox (acknowledged, expired, rolled back); `false` if it
    /// was not on these books.
    pub(crate) fn settle(&mut self, user: &str, id: u64) -> bool {
        let Some(recipient) = self.recipients.get_mut(user) else {
            return false;
        };
        let Some(queued) = recipient.events.remove(&id) else {
            return false;
        };
        let unclaimed = recipient.unclaimed;
        if recipient.events.is_empty() {
            self.recipients.remove(user);
        }
        if unclaimed
            && let Some(usage) = self.clients.get_mut(&queued.client)
            && let Some(held) = usage.unclaimed.get_mut(user)
        {
            *held = held.saturating_sub(1);
            if *held == 0 {
                usage.unclaimed.remove(user);
            }
        }
        self.give_back(queued.client, 1, queued.bytes);
        true
    }

    /// `user` connected (here or, as found out later, elsewhere): its events are kept until
    /// acknowledged and no longer count as a client's unclaimed users.
    pub(crate) fn claimed(&mut self, user: &str) {
        let Some(recipient) = self.recipients.get_mut(user) else {
            return;
        };
        if !std::mem::take(&mut recipient.unclaimed) {
            return;
        }
        let clients: Vec<ClientKey> = recipient.events.values().map(|q| q.client).collect();
        for client in clients {
            if let Some(usage) = self.clients.get_mut(&client) {
                usage.unclaimed.remove(user);
            }
            self.tidy(client);
        }
    }

    /// Events for users that never connected created at or before `cutoff`, oldest first per
    /// user: candidates for expiry (the caller checks the user is still unclaimed).
    pub(crate) fn expired(&self, cutoff: Instant) -> Vec<(String, Vec<u64>)> {
        self.recipients
            .iter()
            .filter(|(_, r)| r.unclaimed)
            .filter_map(|(name, r)| {
                let ids: Vec<u64> = r
                    .events
                    .iter()
                    .take_while(|(_, q)| q.created <= cutoff)
                    .map(|(id, _)| *id)
                    .collect();
                (!ids.is_empty()).then(|| (name.clone(), ids))
            })
            .collect()
    }

    /// The events on the books, per recipient, caused by `client` (or by anybody): what a prune
    /// checks against the logs.
    pub(crate) fn queued_by(&self, client: Option<ClientKey>) -> Vec<(String, Vec<u64>)> {
        self.recipients
            .iter()
            .filter_map(|(name, r)| {
                let ids: Vec<u64> = r
                    .events
                    .iter()
                    .filter(|(_, q)| client.is_none_or(|c| q.client == c))
                    .map(|(id, _)| *id)
                    .collect();
                (!ids.is_empty()).then(|| (name.clone(), ids))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cost::Share;

    fn client(last: u8) -> ClientKey {
        ClientKey::from_ip(std::net::IpAddr::from([127, 0, 0, last]))
    }

    fn ledger(max_pending: usize, share: usize, unclaimed: usize) -> Ledger {
        Ledger::new(
            Limits {
                max_pending,
                max_pending_bytes: usize::MAX,
                share: Share {
                    items: share,
                    bytes: usize::MAX,
                },
                max_unclaimed_users_per_client: unclaimed,
            },
            Arc::default(),
        )
    }

    fn queue(l: &mut Ledger, from: ClientKey, to: &str, id: u64, unclaimed: bool, at: Instant) {
        let mut r = l.reserve(from, &[(to, unclaimed)], 1_000).unwrap();
        l.commit(&mut r, to, id, 100, unclaimed, at);
        l.cancel(r);
    }

    #[test]
    fn an_ack_settles_the_event_and_gives_back_its_charge() {
        let budget = Arc::new(MemoryBudget::new(10_000));
        let mut l = ledger(10, 10, 10);
        l.budget = budget.clone();
        let now = Instant::now();
        queue(&mut l, client(1), "bob", 1, false, now);
        assert_eq!(l.pending(), 1);
        assert_eq!(budget.used(), cost::event_bytes(100, "bob"));
        assert!(l.settle("bob", 1));
        assert!(!l.settle("bob", 1), "a second ack is a no-op");
        assert_eq!((l.pending(), l.pending_bytes(), l.clients()), (0, 0, 0));
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn totals_and_client_shares_refuse_before_anything_is_queued() {
        let mut l = ledger(3, 2, 10);
        let now = Instant::now();
        queue(&mut l, client(1), "a", 1, false, now);
        queue(&mut l, client(1), "b", 1, false, now);
        assert!(matches!(
            l.reserve(client(1), &[("c", false)], 10),
            Err(Refusal::ClientShare { pending: 2, .. })
        ));
        queue(&mut l, client(2), "c", 1, false, now);
        assert!(matches!(
            l.reserve(client(3), &[("d", false)], 10),
            Err(Refusal::Total { pending: 3, .. })
        ));
        // A reservation that is cancelled leaves nothing behind.
        l.settle("c", 1);
        let r = l.reserve(client(3), &[("d", false)], 10).unwrap();
        l.cancel(r);
        assert_eq!(l.pending(), 2);
    }

    #[test]
    fn unclaimed_users_count_per_client_until_they_connect() {
        let mut l = ledger(100, 100, 2);
        let now = Instant::now();
        queue(&mut l, client(1), "g1", 1, true, now);
        queue(&mut l, client(1), "g2", 1, true, now);
        queue(&mut l, client(1), "g2", 2, true, now);
        assert_eq!(l.usage(client(1)).unclaimed_users(), 2);
        assert!(matches!(
            l.reserve(client(1), &[("g3", true)], 10),
            Err(Refusal::Unclaimed { held: 2 })
        ));
        // Writing again to a ghost it already holds is fine; another client is not affected.
        let r = l.reserve(client(1), &[("g1", true)], 10).unwrap();
        l.cancel(r);
        queue(&mut l, client(2), "g3", 1, true, now);
        // g2 connects: it no longer counts.
        l.claimed("g2");
        assert_eq!(l.usage(client(1)).unclaimed_users(), 1);
        assert_eq!(l.recipients(), (3, 2));
        assert!(l.expired(now).iter().all(|(name, _)| name != "g2"));
    }

    #[test]
    fn expiry_candidates_are_the_old_events_of_unclaimed_users() {
        let mut l = ledger(100, 100, 100);
        let t0 = Instant::now();
        queue(&mut l, client(1), "ghost", 1, true, t0);
        queue(
            &mut l,
            client(1),
            "ghost",
            2,
            true,
            t0 + Duration::from_secs(30),
        );
        queue(&mut l, client(1), "bob", 1, false, t0);
        assert_eq!(l.expired(t0), vec![("ghost".to_owned(), vec![1])]);
        assert_eq!(
            l.expired(t0 + Duration::from_secs(30)),
            vec![("ghost".to_owned(), vec![1, 2])]
        );
        assert_eq!(l.queued_by(Some(client(2))), Vec::new());
        assert_eq!(l.queued_by(None).len(), 2);
    }
}
