//! Property tests: random concurrent editing converges.
//!
//! Several simulated clients ([`ClientDocument`], the algorithm a real editor runs) edit one
//! server [`Document`] at once over FIFO links with random delivery order. Whatever the schedule,
//! once every message is delivered all clients and the server hold the same text.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

use std::collections::VecDeque;

use proptest::prelude::*;
use switchboard_collab::ot::{Operation, transform};
use switchboard_collab::{ClientDocument, Document, DocumentLimits, EditError, OutgoingEdit};

const ALPHABET: [&str; 6] = ["a", "b", "é", "🌍", "\n", "xy"];

/// A random operation on a document of `len` characters, driven by `seeds`.
fn random_op(len: usize, seeds: &[u16]) -> Operation {
    let mut op = Operation::new();
    let mut left = len;
    for seed in seeds {
        let amount = usize::from(seed / 8 % 4) + 1;
        match seed % 8 {
            0..=2 => {
                let n = amount.min(left);
                op = op.retain(n);
                left -= n;
            }
            3..=5 => op = op.insert(ALPHABET[usize::from(seed / 32) % ALPHABET.len()]),
            _ => {
                let n = amount.min(left);
                op = op.delete(n);
                left -= n;
            }
        }
    }
    op.retain(left)
}

fn initial_text() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(ALPHABET.to_vec()), 0..8).prop_map(|s| s.concat())
}

#[derive(Debug, Clone)]
enum Step {
    /// Client `c` makes a local edit.
    Edit(usize, Vec<u16>),
    /// The server takes the next frame client `c` sent.
    ServerReceives(usize),
    /// Client `c` reads the next frame the server sent it.
    ClientReceives(usize),
}

fn step(clients: usize) -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..clients, prop::collection::vec(any::<u16>(), 1..6)).prop_map(|(c, s)| Step::Edit(c, s)),
        (0..clients).prop_map(Step::ServerReceives),
        (0..clients).prop_map(Step::ClientReceives),
    ]
}

#[derive(Debug, Clone)]
enum ToClient {
    Ack(u64),
    Update(u64, Operation),
    Error,
    State(String, u64),
}

struct Simulation {
    server: Document,
    clients: Vec<ClientDocument>,
    uplinks: Vec<VecDeque<OutgoingEdit>>,
    downlinks: Vec<VecDeque<ToClient>>,
    refused: usize,
}

impl Simulation {
    fn new(text: &str, clients: usize, max_log_ops: usize) -> Self {
        let limits = DocumentLimits {
            max_bytes: 1 << 20,
            max_log_ops,
            max_log_bytes: 1 << 20,
        };
        Self {
            server: Document::new(text.to_owned(), limits),
            clients: (0..clients).map(|_| ClientDocument::new(text, 0)).collect(),
            uplinks: vec![VecDeque::new(); clients],
            downlinks: vec![VecDeque::new(); clients],
            refused: 0,
        }
    }

    fn run(&mut self, step: &Step) {
        match step {
            Step::Edit(c, seeds) => {
                let client = &mut self.clients[*c];
                let op = random_op(client.len_chars(), seeds);
                if let Some(out) = client.edit(op).unwrap() {
                    self.uplinks[*c].push_back(out);
                }
            }
            Step::ServerReceives(c) => {
                let Some(out) = self.uplinks[*c].pop_front() else {
                    return;
                };
                match self.server.apply_operation(out.base_version, out.op) {
                    Ok(applied) => {
                        for (i, link) in self.downlinks.iter_mut().enumerate() {
                            link.push_back(if i == *c {
                                ToClient::Ack(applied.version)
                            } else {
                                ToClient::Update(applied.version, applied.op.clone())
                            });
                        }
                    }
                    Err(EditError::StaleVersion { .. }) => {
                        // What the protocol does: an error, then a fresh session-state.
                        self.refused += 1;
                        let link = &mut self.downlinks[*c];
                        link.push_back(ToClient::Error);
                        link.push_back(ToClient::State(
                            self.server.text().to_owned(),
                            self.server.version(),
                        ));
                    }
                    Err(other) => panic!("unexpected refusal: {other}"),
                }
            }
            Step::ClientReceives(c) => {
                let Some(message) = self.downlinks[*c].pop_front() else {
                    return;
                };
                let client = &mut self.clients[*c];
                match message {
                    ToClient::Ack(version) => {
                        if let Some(out) = client.ack(version) {
                            self.uplinks[*c].push_back(out);
                        }
                    }
                    ToClient::Update(version, op) => client.remote(version, &op).unwrap(),
                    ToClient::Error => {}
                    ToClient::State(text, version) => client.reset(text, version),
                }
            }
        }
    }

    /// Delivers everything still in flight, in any order that respects each link's FIFO.
    fn settle(&mut self) {
        loop {
            let mut moved = false;
            for c in 0..self.clients.len() {
                while !self.uplinks[c].is_empty() {
                    self.run(&Step::ServerReceives(c));
                    moved = true;
                }
                while !self.downlinks[c].is_empty() {
                    self.run(&Step::ClientReceives(c));
                    moved = true;
                }
            }
            if !moved {
                break;
            }
        }
    }

    fn assert_converged(&self) {
        for (i, client) in self.clients.iter().enumerate() {
            assert!(
                client.is_synchronized(),
                "client {i} still has pending edits"
            );
            assert_eq!(client.text(), self.server.text(), "client {i} diverged");
            assert_eq!(
                client.version(),
                self.server.version(),
                "client {i} version"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Every client and the server end with the same text, whatever the schedule.
    #[test]
    fn concurrent_edits_converge(
        text in initial_text(),
        (clients, steps) in (2usize..=4).prop_flat_map(|n| (Just(n), prop::collection::vec(step(n), 0..60))),
    ) {
        let mut sim = Simulation::new(&text, clients, 1000);
        for s in &steps {
            sim.run(s);
        }
        sim.settle();
        prop_assert_eq!(sim.refused, 0);
        sim.assert_converged();
    }

    /// With a tiny operation log, lagging clients are refused and resync, and still converge.
    #[test]
    fn resyncing_clients_converge(
        text in initial_text(),
        (clients, steps) in (2usize..=4).prop_flat_map(|n| (Just(n), prop::collection::vec(step(n), 0..60))),
    ) {
        let mut sim = Simulation::new(&text, clients, 2);
        for s in &steps {
            sim.run(s);
        }
        sim.settle();
        sim.assert_converged();
    }

    /// When nobody deletes, no keystroke is lost: every inserted character is in the result.
    #[test]
    fn inserts_are_never_lost(
        text in initial_text(),
        steps in prop::collection::vec(
            prop_oneof![
                (0usize..3, any::<u16>(), 0usize..ALPHABET.len()).prop_map(|(c, at, i)| (c, Some((at, i)))),
                (0usize..3).prop_map(|c| (c, None)),
            ],
            0..60,
        ),
    ) {
        let mut sim = Simulation::new(&text, 3, 1000);
        let mut typed = text;
        for (n, (c, edit)) in steps.iter().enumerate() {
            match edit {
                Some((at, i)) => {
                    let client = &sim.clients[*c];
                    let len = client.len_chars();
                    let at = usize::from(*at) % (len + 1);
                    let op = Operation::new().retain(at).insert(ALPHABET[*i]).retain(len - at);
                    typed.push_str(ALPHABET[*i]);
                    if let Some(out) = sim.clients[*c].edit(op).unwrap() {
                        sim.uplinks[*c].push_back(out);
                    }
                }
                None if n % 2 == 0 => sim.run(&Step::ServerReceives(*c)),
                None => sim.run(&Step::ClientReceives(*c)),
            }
        }
        sim.settle();
        sim.assert_converged();
        let mut expected: Vec<char> = typed.chars().collect();
        let mut actual: Vec<char> = sim.server.text().chars().collect();
        expected.sort_unstable();
        actual.sort_unstable();
        prop_assert_eq!(actual, expected);
    }

    /// transform satisfies TP1: both orders of two concurrent edits give the same text.
    #[test]
    fn transform_converges(
        text in initial_text(),
        a in prop::collection::vec(any::<u16>(), 0..8),
        b in prop::collection::vec(any::<u16>(), 0..8),
    ) {
        let len = text.chars().count();
        let (a, b) = (random_op(len, &a), random_op(len, &b));
        let (a2, b2) = transform(&a, &b).unwrap();
        let left = b2.apply(&a.apply(&text).unwrap()).unwrap();
        let right = a2.apply(&b.apply(&text).unwrap()).unwrap();
        prop_assert_eq!(left, right);
    }

    /// compose(a, b) has the effect of a then b, and the wire form round-trips.
    #[test]
    fn compose_and_wire_form(
        text in initial_text(),
        a in prop::collection::vec(any::<u16>(), 0..8),
        b in prop::collection::vec(any::<u16>(), 0..8),
    ) {
        let a = random_op(text.chars().count(), &a);
        let after_a = a.apply(&text).unwrap();
        let b = random_op(after_a.chars().count(), &b);
        let ab = a.compose(&b).unwrap();
        prop_assert_eq!(ab.apply(&text).unwrap(), b.apply(&after_a).unwrap());
        let wire = serde_json::to_string(&ab).unwrap();
        prop_assert_eq!(serde_json::from_str::<Operation>(&wire).unwrap(), ab);
    }

    /// diff(old, new) turns old into new.
    #[test]
    fn diff_turns_old_into_new(old in initial_text(), new in initial_text()) {
        prop_assert_eq!(Operation::diff(&old, &new).apply(&old).unwrap(), new);
    }
}
