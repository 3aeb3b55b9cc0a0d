//! Reading what a protocol recorded through the `metrics` facade, in tests that install
//! `metrics_util`'s `DebuggingRecorder` for their own thread (the in-process [`crate::Driver`]
//! runs every hook on the test's task, so such a recorder sees them all).
//!
//! ```no_run
//! let recorder = metrics_util::debugging::DebuggingRecorder::new();
//! let snapshotter = recorder.snapshotter();
//! let _local = metrics::set_default_local_recorder(&recorder);
//! // ... drive the protocol ...
//! let snapshot = snapshotter.snapshot().into_vec();
//! assert_eq!(switchboard_testkit::metrics::counter(&snapshot, "x_total", &[]), 0);
//! ```

use metrics::{SharedString, Unit};
use metrics_util::CompositeKey;
use metrics_util::debugging::DebugValue;

/// One entry of a `DebuggingRecorder` snapshot.
pub type Entry = (CompositeKey, Option<Unit>, Option<SharedString>, DebugValue);

/// The value recorded for `name` with exactly `labels`, if anything was.
pub fn value<'a>(
    snapshot: &'a [Entry],
    name: &str,
    labels: &[(&str, &str)],
) -> Option<&'a DebugValue> {
    snapshot
        .iter()
        .find(|(key, _, _, _)| {
            let key = key.key();
            key.name() == name
                && key.labels().count() == labels.len()
                && labels.iter().all(|(k, v)| {
                    key.labels()
                        .any(|label| label.key() == *k && label.value() == *v)
                })
        })
        .map(|(_, _, _, value)| value)
}

/// The value of counter `name` with exactly `labels`, 0 if it was never incremented.
pub fn counter(snapshot: &[Entry], name: &str, labels: &[(&str, &str)]) -> u64 {
    match value(snapshot, name, labels) {
        None => 0,
        Some(DebugValue::Counter(n)) => *n,
        Some(other) => panic!("{name} is not a counter: {other:?}"),
    }
}
