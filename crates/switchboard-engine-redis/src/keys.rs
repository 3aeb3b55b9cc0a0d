//! Every key and channel of one cluster, under its name. The part in braces is the Redis Cluster
//! hash tag: all keys of one topic, room or key share it, so every script touches one slot,
//! except that the keyed-state writes and the index janitor also touch the one key index.

use switchboard_core::engine::NodeId;

/// Builds the names of one cluster's keys.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    pub(crate) fn new(cluster_name: &str) -> Self {
        Self {
            prefix: cluster_name.to_owned(),
        }
    }

    fn join(&self, parts: &[&str]) -> String {
        let len = parts
            .iter()
            .fold(self.prefix.len(), |n, p| n.saturating_add(p.len()));
        let mut key = String::with_capacity(len);
        key.push_str(&self.prefix);
        for part in parts {
            key.push_str(part);
        }
        key
    }

    /// A log's position (top offset, epoch, bytes kept).
    pub(crate) fn log_meta(&self, topic: &str) -> String {
        self.join(&[":log:{", topic, "}:meta"])
    }

    /// A log's entries (a stream whose ids are `<offset>-1`).
    pub(crate) fn log_entries(&self, topic: &str) -> String {
        self.join(&[":log:{", topic, "}:entries"])
    }

    /// The channel of a topic's publications.
    pub(crate) fn channel(&self, topic: &str) -> String {
        self.join(&[":topic:", topic])
    }

    /// The channel prefix, to tell a topic from its channel name.
    pub(crate) fn channel_prefix(&self) -> String {
        self.join(&[":topic:"])
    }

    /// One key of keyed state (a hash of version and value).
    pub(crate) fn kv(&self, key: &str) -> String {
        self.join(&[":kv:{", key, "}"])
    }

    /// Every key of keyed state ever written, for scans by prefix (a sorted set read by lex).
    pub(crate) fn kv_index(&self) -> String {
        self.join(&[":kv-index"])
    }

    /// A rate limit's window.
    pub(crate) fn rate(&self, key: &str) -> String {
        self.join(&[":rate:{", key, "}"])
    }

    /// A presence room's keys: members by first join, connection counts, join sequence, and
    /// `node`'s connections there.
    pub(crate) fn room(&self, room: &str, node: NodeId) -> [String; 4] {
        let node = node.as_uuid().simple().to_string();
        [
            self.room_members(room),
            self.join(&[":presence:{", room, "}:counts"]),
            self.join(&[":presence:{", room, "}:seq"]),
            self.join(&[":presence:{", room, "}:node:", &node]),
        ]
    }

    /// A presence room's members by first join (what membership reads need).
    pub(crate) fn room_members(&self, room: &str) -> String {
        self.join(&[":presence:{", room, "}:members"])
    }

    /// The rooms where `node` has (or had) connections.
    pub(crate) fn node_rooms(&self, node: NodeId) -> String {
        let node = node.as_uuid().simple().to_string();
        self.join(&[":node:{", &node, "}:rooms"])
    }

    /// Taken by the one node that removes a lost node's presence.
    pub(crate) fn node_reaper(&self, node: NodeId) -> String {
        let node = node.as_uuid().simple().to_string();
        self.join(&[":node:{", &node, "}:reaper"])
    }

    /// Every live node and its last heartbeat (a sorted set by Redis time in ms).
    pub(crate) fn nodes(&self) -> String {
        self.join(&[":nodes"])
    }

    /// The cluster's id.
    pub(crate) fn cluster_id(&self) -> String {
        self.join(&[":cluster-id"])
    }
}
