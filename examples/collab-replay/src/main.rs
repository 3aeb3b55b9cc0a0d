//! Replays a scripted two-author editing session against a running collab server.
//!
//! Alice and Bob open the same session and type at the same time, one keystroke per operation,
//! without waiting for each other: Bob adds a header comment and renames an argument while Alice
//! rewrites the function body and appends a line. Each runs the client half of the OT algorithm
//! ([`ClientDocument`]): one operation in flight, later keystrokes buffered, incoming updates
//! transformed against both. At the end both texts and the server's (over REST) must be equal and
//! contain every edit; the program exits with status 1 otherwise.
//!
//! ```text
//! switchboard serve --protocol collab &
//! cargo run -p collab-replay -- 127.0.0.1:8000
//! ```
//!
//! Against a server with TLS, give an `https://` address (REST over https://, sockets over
//! wss://), and the CA of a self-signed certificate if the system does not trust it:
//!
//! ```text
//! cargo run -p collab-replay -- https://localhost:8443 --ca-file ca.pem
//! ```
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a terminal program"
)]

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use switchboard_collab::ot::Operation;
use switchboard_collab::{ClientDocument, OutgoingEdit};
use switchboard_teambot::client::tls::{self, ClientSocket as Socket, ClientTls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
type Error = Box<dyn std::error::Error + Send + Sync>;

const INITIAL: &str = "def greet(name):\n    pass\n\nprint(greet(\"world\"))\n";

/// Where a scripted edit happens in the author's current text.
#[derive(Debug, Clone, Copy)]
enum At {
    /// The start of the document.
    Start,
    /// The end of the document.
    End,
    /// Right after the first occurrence of this text.
    After(&'static str),
}

/// One scripted action.
#[derive(Debug, Clone, Copy)]
enum Action {
    /// Type `text` at `at`, one character (one operation) at a time.
    Type(At, &'static str),
    /// Select the first occurrence of the text and delete it (one operation).
    Erase(&'static str),
}

fn alice_script() -> Vec<Action> {
    vec![
        Action::Erase("pass"),
        Action::Type(At::After("(name):\n    "), "return f\"Hello, {name}!\""),
        Action::Type(At::End, "print(greet(\"OT\"))\n"),
    ]
}

fn bob_script() -> Vec<Action> {
    vec![
        Action::Type(At::Start, "# greeting.py, written by two people at once\n"),
        Action::Erase("world"),
        Action::Type(At::After("print(greet(\""), "collab"),
    ]
}

const EXPECTED: &str = "# greeting.py, written by two people at once\n\
def greet(name):\n    return f\"Hello, {name}!\"\n\nprint(greet(\"collab\"))\nprint(greet(\"OT\"))\n";

#[tokio::main]
async fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let tls = match ClientTls::from_args(&mut args) {
        Ok(tls) => tls,
        Err(error) => {
            eprintln!("{error}");
            std::process::exit(2);
        }
    };
    let arg = args
        .into_iter()
        .next()
        .unwrap_or_else(|| "127.0.0.1:8000".to_owned());
    let Some(server) = Server::parse(&arg, tls) else {
        eprintln!("usage: collab-replay [http[s]://]HOST:PORT [--ca-file FILE]");
        std::process::exit(2);
    };
    match run(&server).await {
        Ok(true) => println!("\nconverged: both authors and the server hold the same text"),
        Ok(false) => std::process::exit(1),
        Err(error) => {
            eprintln!("replay failed: {error}");
            std::process::exit(1);
        }
    }
}

/// The collab server: where it is and whether it speaks TLS.
struct Server {
    host: String,
    port: u16,
    secure: bool,
    tls: ClientTls,
}

impl Server {
    /// `HOST:PORT`, `http://HOST:PORT` or `https://HOST:PORT`.
    fn parse(arg: &str, tls: ClientTls) -> Option<Self> {
        let (secure, rest) = match arg.split_once("://") {
            Some(("https", rest)) => (true, rest),
            Some(("http", rest)) => (false, rest),
            Some(_) => return None,
            None => (false, arg),
        };
        let (host, port) = rest.trim_end_matches('/').rsplit_once(':')?;
        Some(Self {
            host: host.to_owned(),
            port: port.parse().ok()?,
            secure,
            tls,
        })
    }

    fn ws_url(&self, path: &str) -> String {
        let scheme = if self.secure { "wss" } else { "ws" };
        format!("{scheme}://{}:{}{path}", self.host, self.port)
    }
}

async fn run(server: &Server) -> Result<bool, Error> {
    let body = json!({"language": "python", "code": INITIAL}).to_string();
    let (status, created) = http(server, "POST", "/api/sessions", &body).await?;
    let id = created["sessionId"]
        .as_str()
        .ok_or_else(|| format!("POST /api/sessions answered {status}: {created}"))?
        .to_owned();
    println!(
        "session {id} created (python, {} lines)",
        INITIAL.lines().count()
    );

    let alice = tokio::spawn(author(
        server.ws_url(&format!("/ws/{id}")),
        server.tls.clone(),
        "alice",
        alice_script(),
        Duration::from_millis(15),
    ));
    let bob = tokio::spawn(author(
        server.ws_url(&format!("/ws/{id}")),
        server.tls.clone(),
        "bob",
        bob_script(),
        Duration::from_millis(22),
    ));
    let alice = alice.await??;
    let bob = bob.await??;
    let (_, stored) = http(server, "GET", &format!("/api/sessions/{id}"), "").await?;
    let server = stored["code"].as_str().unwrap_or_default().to_owned();

    println!("\n--- final text (server) ---\n{server}---------------------------");
    let mut ok = true;
    for (who, text) in [("alice", &alice), ("bob", &bob)] {
        if *text != server {
            eprintln!("{who} diverged from the server:\n{text}");
            ok = false;
        }
    }
    if server != EXPECTED {
        eprintln!("the server's text is not the expected merge of both scripts:\n{EXPECTED}");
        ok = false;
    }
    Ok(ok)
}

/// One author: joins, plays the script keystroke by keystroke while applying what arrives, then
/// waits until everything is acknowledged and the session has been quiet for a moment.
async fn author(
    url: String,
    tls: ClientTls,
    user: &'static str,
    script: Vec<Action>,
    pace: Duration,
) -> Result<String, Error> {
    let (mut socket, _) = tls::connect(&url, &tls, None).await?;
    let join = json!({"type": "join-session", "payload": {"userId": user, "username": user}});
    socket.send(Message::text(join.to_string())).await?;
    let mut doc = loop {
        let frame = next_frame(&mut socket).await?;
        if frame["type"] == "session-state" {
            let state = &frame["payload"];
            break ClientDocument::new(
                state["code"].as_str().unwrap_or_default(),
                state["version"].as_u64().unwrap_or_default(),
            );
        }
    };

    let (mut typed, mut concurrent) = (0usize, 0usize);
    for action in script {
        let steps = match action {
            Action::Erase(_) => 1,
            Action::Type(_, typed) => typed.chars().count(),
        };
        for step in 0..steps {
            // Each keystroke is computed on the text as it is now, remote edits included.
            let Some(op) = keystroke(doc.text(), action, step) else {
                continue;
            };
            if let Some(out) = doc.edit(op)? {
                send(&mut socket, &out).await?;
            }
            typed += 1;
            // Type in bursts of four keystrokes without reading: edits cross in flight.
            if typed % 4 == 0 {
                pump(&mut socket, &mut doc, user, pace, &mut concurrent).await?;
            }
        }
    }
    // Drain: every local edit acknowledged and nothing new for a while.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let quiet = pump(
            &mut socket,
            &mut doc,
            user,
            Duration::from_millis(400),
            &mut concurrent,
        )
        .await?;
        if quiet && doc.is_synchronized() {
            break;
        }
    }
    let _ = socket.close(None).await;
    println!(
        "{user:>5}: {typed} keystrokes; {concurrent} updates arrived while own edits were pending and were transformed"
    );
    Ok(doc.text().to_owned())
}

/// Keystroke `step` of `action` on the current `text`: typing inserts the next character right
/// after what was typed so far (found again each time, since others edit too); erasing deletes
/// the first occurrence of the word in one operation.
fn keystroke(text: &str, action: Action, step: usize) -> Option<Operation> {
    let len = text.chars().count();
    let chars_before = |byte: usize| text[..byte].chars().count();
    match action {
        Action::Erase(word) => {
            let at = chars_before(text.find(word)?);
            let n = word.chars().count();
            Some(Operation::new().retain(at).delete(n).retain(len - at - n))
        }
        Action::Type(at, typed) => {
            let done: String = typed.chars().take(step).collect();
            let next = typed.chars().nth(step)?;
            let position = match at {
                At::Start => step.min(len),
                At::End => len,
                At::After(anchor) => {
                    let typed_so_far = format!("{anchor}{done}");
                    chars_before(text.find(&typed_so_far)? + typed_so_far.len())
                }
            };
            Some(
                Operation::new()
                    .retain(position)
                    .insert(next.encode_utf8(&mut [0; 4]))
                    .retain(len - position),
            )
        }
    }
}

/// Applies incoming frames for `wait`; returns whether nothing arrived. Counts the updates that
/// were concurrent with a pending local edit in `concurrent`.
async fn pump(
    socket: &mut Socket,
    doc: &mut ClientDocument,
    user: &str,
    wait: Duration,
    concurrent: &mut usize,
) -> Result<bool, Error> {
    let until = Instant::now() + wait;
    let mut quiet = true;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let Ok(frame) = timeout(left, next_frame(socket)).await else {
            return Ok(quiet);
        };
        let frame = frame?;
        quiet = false;
        let payload = &frame["payload"];
        let version = payload["version"].as_u64().unwrap_or_default();
        match frame["type"].as_str().unwrap_or_default() {
            "code-ack" => {
                if let Some(out) = doc.ack(version) {
                    send(socket, &out).await?;
                }
            }
            "code-update" => {
                let op: Operation = serde_json::from_value(payload["ops"].clone())?;
                println!(
                    "{user:>5} <- v{version:<3} from {:<5} {}",
                    payload["userId"].as_str().unwrap_or("?"),
                    payload["ops"]
                );
                if !doc.is_synchronized() {
                    *concurrent += 1;
                }
                doc.remote(version, &op)?;
            }
            "session-state" => {
                // Sent after a refused edit: start over from the server's text.
                doc.reset(
                    payload["code"].as_str().unwrap_or_default(),
                    payload["version"].as_u64().unwrap_or_default(),
                );
            }
            "error" => eprintln!("{user} got an error: {}", payload["message"]),
            _ => {}
        }
    }
}

async fn send(socket: &mut Socket, out: &OutgoingEdit) -> Result<(), Error> {
    let frame = json!({"type": "code-change", "payload": {"changes": {"baseVersion": out.base_version, "ops": out.op}}});
    socket.send(Message::text(frame.to_string())).await?;
    Ok(())
}

async fn next_frame(socket: &mut Socket) -> Result<Value, Error> {
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(&text)?),
            Some(Ok(Message::Close(frame))) => return Err(format!("closed: {frame:?}").into()),
            Some(Ok(_)) => {}
            Some(Err(error)) => return Err(error.into()),
            None => return Err("connection ended".into()),
        }
    }
}

/// A minimal HTTP/1.1 exchange (the example needs no HTTP client crate).
async fn http(
    server: &Server,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, Value), Error> {
    let mut stream =
        tls::open_stream(&server.host, server.port, server.secure, &server.tls).await?;
    let addr = format!("{}:{}", server.host, server.port);
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    // Over TLS a server may close without close_notify once the response is sent: what arrived
    // is the response (an empty one fails below).
    if let Err(error) = stream.read_to_end(&mut raw).await
        && raw.is_empty()
    {
        return Err(error.into());
    }
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let json = match (body.find('{'), body.rfind('}')) {
        (Some(start), Some(end)) if start < end => serde_json::from_str(&body[start..=end])?,
        _ => Value::Null,
    };
    Ok((status, json))
}
