//! The teambot wire format, shared by the client and the simulator (sans-IO).
//!
//! Every frame is a JSON object with a string `type`. Fields are read leniently: a missing or
//! mistyped optional field is treated as absent rather than failing the whole frame, because the
//! client must never die on a server quirk.

use std::fmt;
use std::hash::{Hash, Hasher};

use serde::{Serialize, Serializer};
use serde_json::{Value, json};

/// A team id exactly as the server sent it.
///
/// The spec's ids are numbers; strings are accepted too so a server that quotes its ids still
/// works. The original JSON value is kept and echoed back unchanged (a number stays a number), and
/// equality/hashing use its canonical JSON text, so `1` and `"1"` are different teams.
#[derive(Clone)]
pub struct TeamId {
    raw: Value,
    key: String,
}

impl TeamId {
    /// A team id from a JSON value; only numbers and strings are ids.
    pub fn from_json(value: &Value) -> Option<Self> {
        match value {
            Value::Number(_) | Value::String(_) => Some(Self {
                raw: value.clone(),
                key: value.to_string(),
            }),
            _ => None,
        }
    }

    /// A numeric team id.
    pub fn number(id: u64) -> Self {
        Self {
            raw: Value::from(id),
            key: id.to_string(),
        }
    }

    /// The id as the server sent it.
    pub fn as_json(&self) -> &Value {
        &self.raw
    }

    /// The id as a `u64`, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        self.raw.as_u64()
    }
}

impl PartialEq for TeamId {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for TeamId {}

impl Hash for TeamId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key.hash(state);
    }
}

impl fmt::Display for TeamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key)
    }
}

impl fmt::Debug for TeamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TeamId({})", self.key)
    }
}

impl Serialize for TeamId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.raw.serialize(serializer)
    }
}

/// An event the client reads from the global or a team socket.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerEvent {
    /// `hello`: the socket is open.
    Hello,
    /// `goodbye`: the test is over.
    Goodbye,
    /// `team.join {team_id}`.
    TeamJoin(TeamId),
    /// `team.left {team_id}`; on a team socket the id may be omitted.
    TeamLeft(Option<TeamId>),
    /// `team.connect {team_id, ws_url}`.
    TeamConnect {
        /// The team.
        team_id: TeamId,
        /// Where to open its socket (`http://` means `ws://`).
        ws_url: String,
    },
    /// `error {message, received_message, team_id}`.
    Error {
        /// Details, if given.
        message: Option<String>,
        /// The client frame the error is about, if given.
        received_message: Option<Value>,
        /// The team concerned, if any.
        team_id: Option<TeamId>,
    },
    /// `message {text}` on a team socket.
    Message {
        /// The text (empty when missing or not a string).
        text: String,
    },
    /// `pong {unique_id}`.
    Pong(Option<Value>),
    /// `healthcheck`: asks the client for its stats.
    Healthcheck,
    /// Valid JSON with a `type` this client does not know.
    Unknown(String),
}

/// Why a frame could not be read as a [`ServerEvent`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not JSON, or not an object with a string `type`.
    #[error("not a JSON object with a string \"type\"")]
    NotAnEvent,
    /// A required field is missing or has the wrong type.
    #[error("{kind}: missing or invalid {field}")]
    BadField {
        /// The event type.
        kind: String,
        /// The field.
        field: &'static str,
    },
}

impl ServerEvent {
    /// Parses one text frame.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let value: Value = serde_json::from_str(text).map_err(|_| ParseError::NotAnEvent)?;
        let kind = value
            .get("type")
            .and_then(Value::as_str)
            .ok_or(ParseError::NotAnEvent)?;
        let team = |field: &'static str| {
            value
                .get(field)
                .and_then(TeamId::from_json)
                .ok_or_else(|| ParseError::BadField {
                    kind: kind.to_owned(),
                    field,
                })
        };
        Ok(match kind {
            "hello" => Self::Hello,
            "goodbye" => Self::Goodbye,
            "team.join" => Self::TeamJoin(team("team_id")?),
            "team.left" => Self::TeamLeft(value.get("team_id").and_then(TeamId::from_json)),
            "team.connect" => {
                let ws_url = value.get("ws_url").and_then(Value::as_str).ok_or_else(|| {
                    ParseError::BadField {
                        kind: kind.to_owned(),
                        field: "ws_url",
                    }
                })?;
                Self::TeamConnect {
                    team_id: team("team_id")?,
                    ws_url: ws_url.to_owned(),
                }
            }
            "error" => Self::Error {
                message: value
                    .get("message")
                    .map(|m| m.as_str().map_or_else(|| m.to_string(), str::to_owned)),
                received_message: value.get("received_message").cloned(),
                team_id: value.get("team_id").and_then(TeamId::from_json),
            },
            "message" => Self::Message {
                text: value
                    .get("text")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
            },
            "pong" => Self::Pong(value.get("unique_id").cloned()),
            "healthcheck" => Self::Healthcheck,
            other => Self::Unknown(other.to_owned()),
        })
    }
}

/// Whether a message text counts toward `props_count`: it contains `props` (case-sensitive).
pub fn is_props(text: &str) -> bool {
    text.contains("props")
}

/// One entry of the client's `healthcheck` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TeamStat {
    /// The team id exactly as the server sent it.
    pub id: TeamId,
    /// Whether the team's websocket is connected right now.
    pub connected: bool,
    /// Every `message` event received by the team, across reconnects.
    pub message_count: u64,
    /// Those whose text contains `props`.
    pub props_count: u64,
}

/// The client's `healthcheck` reply: `{type: "healthcheck", stats: [...]}`.
pub fn healthcheck_reply(stats: &[TeamStat]) -> String {
    json!({ "type": "healthcheck", "stats": stats }).to_string()
}

/// `team.connect {team_id}` from the client.
pub fn team_connect_request(team_id: &TeamId) -> String {
    json!({ "type": "team.connect", "team_id": team_id }).to_string()
}

/// `ping {unique_id}` from the client.
pub fn ping(unique_id: u64) -> String {
    json!({ "type": "ping", "unique_id": unique_id }).to_string()
}

/// Maps a `ws_url` from `team.connect` to a WebSocket URL: `http://` becomes `ws://`, `https://`
/// becomes `wss://`, `ws://` and `wss://` are kept. Scheme matching ignores case.
pub fn websocket_url(url: &str) -> Result<String, UrlError> {
    let url = url.trim();
    let (scheme, rest) = url.split_once("://").ok_or(UrlError::NoScheme)?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" | "ws" => "ws",
        "https" | "wss" => "wss",
        other => return Err(UrlError::Scheme(other.to_owned())),
    };
    if rest.is_empty() {
        return Err(UrlError::NoHost);
    }
    Ok(format!("{scheme}://{rest}"))
}

/// Why a `ws_url` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// No `scheme://`.
    #[error("the URL has no scheme")]
    NoScheme,
    /// Nothing after `scheme://`.
    #[error("the URL has no host")]
    NoHost,
    /// A scheme other than http, https, ws, wss.
    #[error("unsupported URL scheme {0:?} (expected http, https, ws or wss)")]
    Scheme(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_server_event() {
        assert_eq!(
            ServerEvent::parse(r#"{"type":"hello"}"#),
            Ok(ServerEvent::Hello)
        );
        assert_eq!(
            ServerEvent::parse(r#"{"type":"team.join","team_id":7}"#),
            Ok(ServerEvent::TeamJoin(TeamId::number(7)))
        );
        assert_eq!(
            ServerEvent::parse(r#"{"type":"team.connect","team_id":7,"ws_url":"http://h/x"}"#),
            Ok(ServerEvent::TeamConnect {
                team_id: TeamId::number(7),
                ws_url: "http://h/x".into()
            })
        );
        assert_eq!(
            ServerEvent::parse(r#"{"type":"team.left"}"#),
            Ok(ServerEvent::TeamLeft(None))
        );
        assert_eq!(
            ServerEvent::parse(r#"{"type":"message","text":"props to you"}"#),
            Ok(ServerEvent::Message {
                text: "props to you".into()
            })
        );
        assert_eq!(
            ServerEvent::parse(r#"{"type":"pong","unique_id":3}"#),
            Ok(ServerEvent::Pong(Some(json!(3))))
        );
        assert_eq!(
            ServerEvent::parse(r#"{"type":"whatever","x":1}"#),
            Ok(ServerEvent::Unknown("whatever".into()))
        );
        assert!(matches!(
            ServerEvent::parse(r#"{"type":"error","message":"nope","team_id":2}"#),
            Ok(ServerEvent::Error { message: Some(m), team_id: Some(t), .. })
                if m == "nope" && t == TeamId::number(2)
        ));
        assert_eq!(ServerEvent::parse("[1]"), Err(ParseError::NotAnEvent));
        assert!(matches!(
            ServerEvent::parse(r#"{"type":"team.join","team_id":[1]}"#),
            Err(ParseError::BadField { .. })
        ));
    }

    #[test]
    fn team_ids_echo_as_sent() {
        let id = TeamId::from_json(&json!(42)).unwrap();
        let stat = TeamStat {
            id,
            connected: true,
            message_count: 3,
            props_count: 1,
        };
        let reply: Value = serde_json::from_str(&healthcheck_reply(&[stat])).unwrap();
        assert_eq!(
            reply,
            json!({"type": "healthcheck", "stats": [
                {"id": 42, "connected": true, "message_count": 3, "props_count": 1}
            ]})
        );
        assert!(reply["stats"][0]["id"].is_u64());
        let empty: Value = serde_json::from_str(&healthcheck_reply(&[])).unwrap();
        assert_eq!(empty, json!({"type": "healthcheck", "stats": []}));
        assert_ne!(TeamId::from_json(&json!(1)), TeamId::from_json(&json!("1")));
        assert_eq!(TeamId::from_json(&json!(null)), None);
    }

    #[test]
    fn maps_urls_to_websocket_schemes() {
        assert_eq!(websocket_url("http://h:1/a?b=c").unwrap(), "ws://h:1/a?b=c");
        assert_eq!(websocket_url("HTTPS://h/a").unwrap(), "wss://h/a");
        assert_eq!(websocket_url("ws://h").unwrap(), "ws://h");
        assert_eq!(websocket_url("wss://h").unwrap(), "wss://h");
        assert_eq!(websocket_url("h/a"), Err(UrlError::NoScheme));
        assert_eq!(
            websocket_url("ftp://h"),
            Err(UrlError::Scheme("ftp".into()))
        );
        assert_eq!(websocket_url("http://"), Err(UrlError::NoHost));
    }

    #[test]
    fn props_is_case_sensitive() {
        assert!(is_props("big props to the team"));
        assert!(!is_props("Props"));
    }
}
