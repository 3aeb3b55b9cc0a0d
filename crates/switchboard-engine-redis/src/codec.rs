//! How entries and publications are written in Redis: one binary body per entry (the frame, the
//! connection it skips and that connection's reply), stored in the topic's stream and carried,
//! behind its offset and epoch, on the topic's channel.
//!
//! Body: one flag byte (bit 0: an `except` connection follows, bit 1: a reply follows), then the
//! except connection (16 bytes of node UUID, 8 bytes of connection id, big-endian), then the
//! reply (4-byte big-endian length and its text), then the frame's text to the end.

use switchboard_core::engine::{ConnRef, NodeId};
use switchboard_core::{ConnId, Frame};
use uuid::Uuid;

const HAS_EXCEPT: u8 = 1;
const HAS_REPLY: u8 = 2;

/// One entry or publication as every node delivers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Body {
    pub(crate) frame: Frame,
    pub(crate) except: Option<ConnRef>,
    pub(crate) reply: Option<Frame>,
}

impl Body {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let reply_len = self.reply.as_ref().map_or(0, |r| r.len().saturating_add(4));
        let mut out = Vec::with_capacity(
            1usize
                .saturating_add(24)
                .saturating_add(reply_len)
                .saturating_add(self.frame.len()),
        );
        let mut flags = 0;
        if self.except.is_some() {
            flags |= HAS_EXCEPT;
        }
        if self.reply.is_some() {
            flags |= HAS_REPLY;
        }
        out.push(flags);
        if let Some(except) = self.except {
            out.extend_from_slice(except.node.as_uuid().as_bytes());
            out.extend_from_slice(&except.conn.get().to_be_bytes());
        }
        if let Some(reply) = &self.reply {
            // A frame is bounded far below 4 GiB by every protocol; a longer one cannot be
            // stored and is cut to what the length field can say.
            let len = u32::try_from(reply.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(reply.as_str().as_bytes().get(..len as usize).unwrap_or(&[]));
        }
        out.extend_from_slice(self.frame.as_str().as_bytes());
        out
    }

    /// `None` for bytes no node wrote (a foreign or damaged value).
    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        let (&flags, mut rest) = bytes.split_first()?;
        let except = if flags & HAS_EXCEPT != 0 {
            let (node, after) = rest.split_at_checked(16)?;
            let (conn, after) = after.split_at_checked(8)?;
            rest = after;
            Some(ConnRef {
                node: NodeId::from_uuid(Uuid::from_slice(node).ok()?),
                conn: ConnId::from_raw(u64::from_be_bytes(conn.try_into().ok()?)),
            })
        } else {
            None
        };
        let reply = if flags & HAS_REPLY != 0 {
            let (len, after) = rest.split_at_checked(4)?;
            let len = usize::try_from(u32::from_be_bytes(len.try_into().ok()?)).ok()?;
            let (reply, after) = after.split_at_checked(len)?;
            rest = after;
            Some(Frame::text(String::from_utf8(reply.to_vec()).ok()?))
        } else {
            None
        };
        let frame = Frame::text(String::from_utf8(rest.to_vec()).ok()?);
        Some(Self {
            frame,
            except,
            reply,
        })
    }
}

/// A message of a topic's channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Published {
    /// An entry of the topic's log (stored or transient): its place and what to deliver.
    Logged { offset: u64, epoch: u64, body: Body },
    /// A publication without a log, and the node that published it.
    Ephemeral { origin: NodeId, body: Body },
}

/// The channel message of an ephemeral publication, `E<16 bytes of origin node><body>` (logged
/// ones are written by the append script: `L<offset> <epoch> <body>`).
pub(crate) fn ephemeral(origin: NodeId, body: &Body) -> Vec<u8> {
    let encoded = body.encode();
    let mut out = Vec::with_capacity(encoded.len().saturating_add(17));
    out.push(b'E');
    out.extend_from_slice(origin.as_uuid().as_bytes());
    out.extend_from_slice(&encoded);
    out
}

/// Parses a channel message; `None` for one no node wrote.
pub(crate) fn parse_published(payload: &[u8]) -> Option<Published> {
    let (&kind, rest) = payload.split_first()?;
    match kind {
        b'E' => {
            let (origin, rest) = rest.split_at_checked(16)?;
            Some(Published::Ephemeral {
                origin: NodeId::from_uuid(Uuid::from_slice(origin).ok()?),
                body: Body::decode(rest)?,
            })
        }
        b'L' => {
            let (offset, rest) = number_until_space(rest)?;
            let (epoch, rest) = number_until_space(rest)?;
            Some(Published::Logged {
                offset,
                epoch,
                body: Body::decode(rest)?,
            })
        }
        _ => None,
    }
}

fn number_until_space(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let space = bytes.iter().position(|&b| b == b' ')?;
    let (digits, rest) = bytes.split_at(space);
    let number = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some((number, rest.get(1..)?))
}

/// Parses an epoch or an offset that a script returned as text.
pub(crate) fn parse_u64(text: &[u8]) -> Option<u64> {
    std::str::from_utf8(text).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_round_trip() {
        let except = ConnRef {
            node: NodeId::random(),
            conn: ConnId::from_raw(42),
        };
        for body in [
            Body {
                frame: Frame::text("hello"),
                except: None,
                reply: None,
            },
            Body {
                frame: Frame::text("{\"a\":\"é\"}"),
                except: Some(except),
                reply: Some(Frame::text("ack")),
            },
            Body {
                frame: Frame::text(""),
                except: Some(except),
                reply: None,
            },
        ] {
            assert_eq!(Body::decode(&body.encode()), Some(body.clone()));
            let origin = NodeId::random();
            assert_eq!(
                parse_published(&ephemeral(origin, &body)),
                Some(Published::Ephemeral {
                    origin,
                    body: body.clone()
                })
            );
            let mut logged = b"L17 1764600000123456 ".to_vec();
            logged.extend_from_slice(&body.encode());
            assert_eq!(
                parse_published(&logged),
                Some(Published::Logged {
                    offset: 17,
                    epoch: 1_764_600_000_123_456,
                    body
                })
            );
        }
    }

    #[test]
    fn foreign_bytes_are_refused() {
        for bad in [
            &b""[..],
            b"X",
            b"L1",
            b"L1 2",
            b"Lx 2 \x00a",
            b"E0123456789abcdef\x01short",
            b"E0123456789abcdef\x02\x00\x00\x00\x09ab",
            b"E0123456789abcdef\x00\xff\xfe",
            b"Eshort",
        ] {
            assert_eq!(parse_published(bad), None, "{bad:?}");
        }
    }
}
