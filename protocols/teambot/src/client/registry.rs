//! Known teams and their counters: the one place stats live, so they survive reconnects.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::Serialize;
use switchboard_core::sync::lock;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::messages::{TeamId, TeamStat};

/// What the server answered to a `team.connect` request.
#[derive(Debug, Clone)]
pub(crate) enum UrlReply {
    /// `team.connect {team_id, ws_url}`.
    Url(String),
    /// An `error` event naming the team.
    Refused(String),
}

/// One team's stats, as [`super::BotHandle::stats`] reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TeamStats {
    /// The team id as the server sent it.
    pub id: TeamId,
    /// Whether the team socket is open right now.
    pub connected: bool,
    /// `message` events received, across reconnects.
    pub message_count: u64,
    /// Those whose text contains `props`.
    pub props_count: u64,
    /// Team sockets opened so far (reconnects are this minus one).
    pub connections: u64,
    /// Whether `team.left` was received.
    pub left: bool,
}

/// A known team.
#[derive(Debug)]
pub(crate) struct Team {
    pub(crate) id: TeamId,
    seq: u64,
    message_count: AtomicU64,
    props_count: AtomicU64,
    connections: AtomicU64,
    connected: AtomicBool,
    /// Set while the team waits for a `ws_url`; the global task re-sends `team.connect` for these
    /// after it reconnects.
    wants_url: AtomicBool,
    /// The global connection (1-based count) on which `team.connect` was last sent; 0 if the
    /// current request has not been sent yet. Keeps a request from going out twice.
    requested_on: AtomicU64,
    /// Cancelled by `team.left`.
    pub(crate) left: CancellationToken,
    url_tx: mpsc::Sender<UrlReply>,
}

impl Team {
    pub(crate) fn stats(&self) -> TeamStats {
        // props before messages (the reverse of counting), so props_count <= message_count.
        let props_count = self.props_count.load(Ordering::Acquire);
        TeamStats {
            id: self.id.clone(),
            connected: self.is_connected(),
            message_count: self.message_count.load(Ordering::Acquire),
            props_count,
            connections: self.connections.load(Ordering::Acquire),
            left: self.left.is_cancelled(),
        }
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    pub(crate) fn set_connected(&self, connected: bool) {
        if connected {
            self.connections.fetch_add(1, Ordering::AcqRel);
        }
        self.connected.store(connected, Ordering::Release);
    }

    /// Counts one `message` event.
    pub(crate) fn count_message(&self, props: bool) {
        // Messages first, so a concurrent snapshot never sees more props than messages.
        self.message_count.fetch_add(1, Ordering::AcqRel);
        if props {
            self.props_count.fetch_add(1, Ordering::AcqRel);
        }
    }

    pub(crate) fn wants_url(&self) -> bool {
        self.wants_url.load(Ordering::Acquire) && !self.left.is_cancelled()
    }

    pub(crate) fn set_wants_url(&self, wants: bool) {
        self.wants_url.store(wants, Ordering::Release);
    }

    /// Starts a new `ws_url` request: wanted, not sent yet.
    pub(crate) fn ask_again(&self) {
        self.requested_on.store(0, Ordering::Release);
        self.wants_url.store(true, Ordering::Release);
    }

    /// Records that `team.connect` goes out on global connection `generation`; `false` if the
    /// current request already went out on it.
    pub(crate) fn mark_requested(&self, generation: u64) -> bool {
        self.requested_on.swap(generation, Ordering::AcqRel) != generation
    }

    /// Hands a `team.connect` answer to the team's task; a stale answer nobody waits for is
    /// dropped when the one-slot-per-request queue is full.
    pub(crate) fn deliver(&self, reply: UrlReply) -> bool {
        self.url_tx.try_send(reply).is_ok()
    }
}

#[derive(Debug)]
struct Inner {
    next_seq: u64,
    teams: HashMap<TeamId, Arc<Team>>,
}

/// What [`Registry::join`] did.
#[derive(Debug)]
pub(crate) enum Joined {
    /// A new team: spawn its task with this receiver.
    New(Arc<Team>, mpsc::Receiver<UrlReply>),
    /// Already known (live or left).
    Known(Arc<Team>),
    /// `max_teams` reached.
    Full,
}

/// All known teams, plus global-socket facts for [`super::BotHandle`].
#[derive(Debug)]
pub(crate) struct Registry {
    max_teams: usize,
    inner: Mutex<Inner>,
    global_connected: AtomicBool,
    global_connections: AtomicU64,
}

impl Registry {
    pub(crate) fn new(max_teams: usize) -> Self {
        Self {
            max_teams,
            inner: Mutex::new(Inner {
                next_seq: 0,
                teams: HashMap::new(),
            }),
            global_connected: AtomicBool::new(false),
            global_connections: AtomicU64::new(0),
        }
    }

    pub(crate) fn join(&self, id: &TeamId) -> Joined {
        let mut inner = lock(&self.inner);
        if let Some(team) = inner.teams.get(id) {
            return Joined::Known(team.clone());
        }
        if inner.teams.len() >= self.max_teams {
            return Joined::Full;
        }
        let (url_tx, url_rx) = mpsc::channel(4);
        let seq = inner.next_seq;
        inner.next_seq += 1;
        let team = Arc::new(Team {
            id: id.clone(),
            seq,
            message_count: AtomicU64::new(0),
            props_count: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            wants_url: AtomicBool::new(false),
            requested_on: AtomicU64::new(0),
            left: CancellationToken::new(),
            url_tx,
        });
        inner.teams.insert(id.clone(), team.clone());
        Joined::New(team, url_rx)
    }

    pub(crate) fn get(&self, id: &TeamId) -> Option<Arc<Team>> {
        lock(&self.inner).teams.get(id).cloned()
    }

    pub(crate) fn len(&self) -> usize {
        lock(&self.inner).teams.len()
    }

    /// Every team, in join order.
    pub(crate) fn teams(&self) -> Vec<Arc<Team>> {
        let mut teams: Vec<_> = lock(&self.inner).teams.values().cloned().collect();
        teams.sort_by_key(|team| team.seq);
        teams
    }

    pub(crate) fn snapshot(&self) -> Vec<TeamStats> {
        self.teams().iter().map(|team| team.stats()).collect()
    }

    /// The `healthcheck` reply's entries, in join order.
    pub(crate) fn healthcheck(&self) -> Vec<TeamStat> {
        self.snapshot()
            .into_iter()
            .map(|stats| TeamStat {
                id: stats.id,
                connected: stats.connected,
                message_count: stats.message_count,
                props_count: stats.props_count,
            })
            .collect()
    }

    pub(crate) fn global_connected(&self) -> bool {
        self.global_connected.load(Ordering::Acquire)
    }

    pub(crate) fn global_connections(&self) -> u64 {
        self.global_connections.load(Ordering::Acquire)
    }

    pub(crate) fn set_global_connected(&self, connected: bool) {
        if connected {
            self.global_connections.fetch_add(1, Ordering::AcqRel);
        }
        self.global_connected.store(connected, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_survive_and_order_is_join_order() {
        let registry = Registry::new(2);
        let Joined::New(b, _rx_b) = registry.join(&TeamId::number(9)) else {
            panic!("new team expected")
        };
        let Joined::New(_a, _rx_a) = registry.join(&TeamId::number(3)) else {
            panic!("new team expected")
        };
        assert!(matches!(registry.join(&TeamId::number(4)), Joined::Full));
        assert!(matches!(
            registry.join(&TeamId::number(9)),
            Joined::Known(_)
        ));
        b.set_connected(true);
        b.count_message(true);
        b.count_message(false);
        b.set_connected(false);
        b.set_connected(true);
        let stats = registry.snapshot();
        assert_eq!(stats[0].id, TeamId::number(9));
        assert_eq!(stats[0].message_count, 2);
        assert_eq!(stats[0].props_count, 1);
        assert_eq!(stats[0].connections, 2);
        assert_eq!(stats[1].id, TeamId::number(3));
        assert!(!stats[1].connected);
    }
}
