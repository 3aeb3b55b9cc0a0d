//! Frame capture for the AsyncAPI check (`docs/asyncapi/README.md`).
//!
//! When `SWITCHBOARD_CAPTURE_FRAMES` names a directory (relative: to the workspace root), every
//! text frame a [`crate::Client`] receives is appended as one JSON line `{"path": "<ws path>", "frame": <frame>}` to
//! `<dir>/<CARGO_PKG_NAME>.jsonl`; `e2e/contract/asyncapi.test.mjs` then validates each frame
//! against the protocol's AsyncAPI document. Capture never fails a test: any error just drops
//! the line. Off (the default) it costs one cached environment lookup per frame.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use serde_json::Value;

/// The directory variable; unset or empty turns capture off.
const DIR_ENV: &str = "SWITCHBOARD_CAPTURE_FRAMES";

/// Frames of one `type` kept per test process: enough to see every variant (errors differ by
/// text, events by kind), while flood tests (slow consumers, rate limits) stay cheap.
const PER_KIND: u32 = 200;

/// A file stops growing at this size (checked before each write), so CI stays fast whatever
/// the number of test binaries appending to it.
const MAX_FILE_BYTES: u64 = 8 * 1024 * 1024;

/// Frames larger than this are not kept (size-limit tests send documents near the limits).
const MAX_FRAME_BYTES: usize = 256 * 1024;

struct Sink {
    file: File,
    /// Lines written per frame kind by this process.
    kinds: Mutex<HashMap<String, u32>>,
}

fn sink() -> Option<&'static Sink> {
    static SINK: OnceLock<Option<Sink>> = OnceLock::new();
    SINK.get_or_init(|| {
        let dir = PathBuf::from(std::env::var_os(DIR_ENV).filter(|d| !d.is_empty())?);
        // Cargo runs each test binary in its crate's directory: a relative directory is taken
        // from the workspace root instead, so `target/frames` means one place for every crate.
        let dir = if dir.is_relative() {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../..")
                .join(dir)
        } else {
            dir
        };
        // Cargo sets this for the test binaries of a crate: one file per protocol crate.
        let package = std::env::var("CARGO_PKG_NAME").unwrap_or_else(|_| "unknown".to_owned());
        std::fs::create_dir_all(&dir).ok()?;
        // O_APPEND: each line is one write at the end of the file, so the test binaries and
        // threads appending at once never interleave within a line.
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{package}.jsonl")))
            .ok()?;
        Some(Sink {
            file,
            kinds: Mutex::new(HashMap::new()),
        })
    })
    .as_ref()
}

/// The frame's kind for the per-kind cap: its `type` (and reqack's `eventType`), if any.
fn kind(frame: &Value) -> String {
    let field = |name: &str| frame.get(name).and_then(Value::as_str).unwrap_or("");
    let mut kind: String = field("type").chars().take(64).collect();
    kind.push('/');
    kind.extend(field("eventType").chars().take(64));
    kind
}

/// Appends `text`, received on `path`, if capture is on and the caps allow it.
pub(crate) fn record(path: &str, text: &str) {
    let Some(sink) = sink() else {
        return;
    };
    if text.len() > MAX_FRAME_BYTES {
        return;
    }
    let frame: Value =
        serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()));
    {
        let Ok(mut kinds) = sink.kinds.lock() else {
            return;
        };
        let seen = kinds.entry(kind(&frame)).or_insert(0);
        if *seen >= PER_KIND {
            return;
        }
        *seen += 1;
    }
    if !sink
        .file
        .metadata()
        .is_ok_and(|meta| meta.len() < MAX_FILE_BYTES)
    {
        return;
    }
    let line = serde_json::json!({ "path": path, "frame": frame });
    let mut bytes = line.to_string().into_bytes();
    bytes.push(b'\n');
    // One write call per line (regular files take it whole); an error only loses this line.
    let _ = (&sink.file).write_all(&bytes);
}
