//! Presence: who is in a room, counting a member with several sockets once.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::ConnId;
use crate::sync::lock;

/// Tracks which members are present in which rooms, per connection.
///
/// A member joins once per connection; [`Presence::join`] reports the first connection and
/// [`Presence::leave`] the last, which is when protocols announce "joined" and "left".
pub trait Presence: Send + Sync + 'static {
    /// Records that `conn` of `member` is in `room`. Returns `true` if it is the member's first
    /// connection there.
    fn join(&self, room: &str, member: &str, conn: ConnId) -> bool;
    /// Removes `conn` of `member` from `room`. Returns `true` if it was the member's last one.
    fn leave(&self, room: &str, member: &str, conn: ConnId) -> bool;
    /// Members with at least one connection in `room`, in the order they first joined.
    fn members(&self, room: &str) -> Vec<String>;
    /// Whether `member` has a connection in `room`.
    fn is_present(&self, room: &str, member: &str) -> bool;
    /// How many distinct members are in `room`.
    fn member_count(&self, room: &str) -> usize;
}

#[derive(Debug, Default)]
struct Room {
    next_seq: u64,
    members: HashMap<String, (u64, Vec<ConnId>)>,
}

/// The in-process [`Presence`]: the embedded default.
#[derive(Debug, Default)]
pub struct LocalPresence {
    rooms: Mutex<HashMap<String, Room>>,
}

impl LocalPresence {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Presence for LocalPresence {
    fn join(&self, room: &str, member: &str, conn: ConnId) -> bool {
        let mut rooms = lock(&self.rooms);
        let room = rooms.entry(room.to_owned()).or_default();
        let seq = room.next_seq;
        let (_, conns) = room
            .members
            .entry(member.to_owned())
            .or_insert_with(|| (seq, Vec::new()));
        let first = conns.is_empty();
        if !conns.contains(&conn) {
            conns.push(conn);
        }
        if first {
            room.next_seq += 1;
        }
        first
    }

    fn leave(&self, room_name: &str, member: &str, conn: ConnId) -> bool {
        let mut rooms = lock(&self.rooms);
        let Some(room) = rooms.get_mut(room_name) else {
            return false;
        };
        let Some((_, conns)) = room.members.get_mut(member) else {
            return false;
        };
        let before = conns.len();
        conns.retain(|c| *c != conn);
        let last = before > 0 && conns.is_empty();
        if conns.is_empty() {
            room.members.remove(member);
        }
        if room.members.is_empty() {
            rooms.remove(room_name);
        }
        last
    }

    fn members(&self, room: &str) -> Vec<String> {
        let rooms = lock(&self.rooms);
        let Some(room) = rooms.get(room) else {
            return Vec::new();
        };
        let mut members: Vec<_> = room.members.iter().map(|(m, (seq, _))| (*seq, m)).collect();
        members.sort_unstable();
        members.into_iter().map(|(_, m)| m.clone()).collect()
    }

    fn is_present(&self, room: &str, member: &str) -> bool {
        lock(&self.rooms)
            .get(room)
            .is_some_and(|r| r.members.contains_key(member))
    }

    fn member_count(&self, room: &str) -> usize {
        lock(&self.rooms).get(room).map_or(0, |r| r.members.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_with_two_sockets_joins_once_and_leaves_once() {
        let presence = LocalPresence::new();
        let (c1, c2) = (ConnId::next(), ConnId::next());
        assert!(presence.join("s", "alice", c1));
        assert!(!presence.join("s", "alice", c2));
        assert_eq!(presence.member_count("s"), 1);
        assert!(!presence.leave("s", "alice", c1));
        assert!(presence.is_present("s", "alice"));
        assert!(presence.leave("s", "alice", c2));
        assert!(!presence.is_present("s", "alice"));
        assert!(!presence.leave("s", "alice", c2));
    }

    #[test]
    fn members_come_in_join_order() {
        let presence = LocalPresence::new();
        for name in ["carol", "alice", "bob"] {
            presence.join("s", name, ConnId::next());
        }
        assert_eq!(presence.members("s"), ["carol", "alice", "bob"]);
    }
}
