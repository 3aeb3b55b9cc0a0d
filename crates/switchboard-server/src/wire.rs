//! Outbound WebSocket framing without a codec: a server's frames are unmasked (RFC 6455
//! section 5.1), so a frame on the wire is a 2-, 4- or 10-byte header followed by the payload
//! exactly as the protocol encoded it. The payload of a broadcast is shared by every recipient
//! ([`switchboard_core::Frame`] is reference counted); only the few header bytes are written per
//! socket, and a batch of queued frames goes out in one vectored write.
//!
//! Sans-IO: [`Pending`] says which byte slices to write next and is told how many were written,
//! so partial writes and their resumption are plain logic with unit tests beside it.

use std::io::IoSlice;

use switchboard_core::Outgoing;

/// Frames one vectored write carries at most (two slices each: header and payload). Linux
/// accepts 1,024 slices per call; 64 frames keep the slice array on the stack small.
pub(crate) const FRAMES_PER_WRITE: usize = 64;

/// Frames with payloads up to this size are copied into one buffer per write (see
/// [`Pending::coalesce`]); larger ones are written from their shared payload.
pub(crate) const COALESCE_PAYLOAD: usize = 2048;

/// Longest header of an unmasked frame: 2 bytes plus a 64-bit length.
pub(crate) const MAX_HEADER: usize = 10;

/// WebSocket opcodes the server writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Opcode {
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
}

/// Writes the header of a final, unmasked frame of `len` payload bytes into `out` and returns
/// its length.
pub(crate) fn header(opcode: Opcode, len: usize, out: &mut [u8; MAX_HEADER]) -> usize {
    out[0] = 0x80 | opcode as u8;
    if len < 126 {
        // `len < 126` fits a byte.
        out[1] = len as u8;
        2
    } else if let Ok(short) = u16::try_from(len) {
        out[1] = 126;
        out[2..4].copy_from_slice(&short.to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// A whole control or data frame as one byte vector (pings and close frames: rare, small).
pub(crate) fn encode(opcode: Opcode, payload: &[u8]) -> Vec<u8> {
    let mut head = [0u8; MAX_HEADER];
    let n = header(opcode, payload.len(), &mut head);
    let mut frame = Vec::with_capacity(n.saturating_add(payload.len()));
    frame.extend_from_slice(&head[..n]);
    frame.extend_from_slice(payload);
    frame
}

/// A close frame with `code` and `reason` (the caller keeps the reason within 123 bytes).
pub(crate) fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = Vec::with_capacity(2usize.saturating_add(reason.len()));
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    encode(Opcode::Close, &payload)
}

/// The frames of one queue item, in order.
fn frame_count(item: &Outgoing) -> usize {
    match item {
        Outgoing::Frame(_) | Outgoing::Binary(_) => 1,
        Outgoing::Batch(frames) => frames.len(),
    }
}

/// Frame `index` of `item`: its opcode and payload.
fn frame_at(item: &Outgoing, index: usize) -> Option<(Opcode, &[u8])> {
    match item {
        Outgoing::Frame(frame) if index == 0 => Some((Opcode::Text, frame.as_str().as_bytes())),
        Outgoing::Binary(data) if index == 0 => Some((Opcode::Binary, data)),
        Outgoing::Batch(frames) => frames
            .get(index)
            .map(|frame| (Opcode::Text, frame.as_str().as_bytes())),
        _ => None,
    }
}

thread_local! {
    /// The item vector of the last batch written on this thread, emptied, for the next batch
    /// to fill: a batch of more than one item would otherwise allocate and free one per write.
    /// One per runtime thread, of at most twice [`FRAMES_PER_WRITE`] items' capacity.
    static SPARE_ITEMS: std::cell::Cell<Vec<Outgoing>> = const { std::cell::Cell::new(Vec::new()) };
}

/// An empty vector for a batch's items, with the capacity a previous batch on this thread
/// left (see [`Pending`]'s `Drop`).
pub(crate) fn spare_items() -> Vec<Outgoing> {
    SPARE_ITEMS
        .try_with(std::cell::Cell::take)
        .unwrap_or_default()
}

/// Queue items taken for writing and how far their wire bytes have been written.
#[derive(Debug)]
pub(crate) struct Pending {
    /// The first item, kept apart so a batch of one (the common case of a fan-out) allocates
    /// nothing.
    first: Outgoing,
    rest: Vec<Outgoing>,
    /// Position of the next byte to write: item, frame within the item, byte within the
    /// frame's wire form (header, then payload).
    item: usize,
    frame: usize,
    offset: usize,
}

impl Pending {
    /// Items to write in order: `first`, then `rest`.
    pub(crate) fn new(first: Outgoing, rest: Vec<Outgoing>) -> Self {
        let mut pending = Self {
            first,
            rest,
            item: 0,
            frame: 0,
            offset: 0,
        };
        pending.skip_empty_items();
        pending
    }

    fn item_at(&self, index: usize) -> Option<&Outgoing> {
        match index {
            0 => Some(&self.first),
            n => self.rest.get(n - 1),
        }
    }

    /// Data frames in the batch (a batch item counts its frames).
    pub(crate) fn frame_total(&self) -> u64 {
        let items = std::iter::once(&self.first).chain(&self.rest);
        items.fold(0u64, |sum, item| {
            sum.saturating_add(u64::try_from(frame_count(item)).unwrap_or(u64::MAX))
        })
    }

    /// What the batch counted against the socket's queue bound ([`Outgoing::cost`]).
    pub(crate) fn cost(&self) -> usize {
        let items = std::iter::once(&self.first).chain(&self.rest);
        items.fold(0usize, |sum, item| sum.saturating_add(item.cost()))
    }

    /// Whether every byte has been written.
    pub(crate) fn is_done(&self) -> bool {
        self.item_at(self.item).is_none()
    }

    /// Moves past items with no frames (an empty batch) so `item`/`frame` always name a frame
    /// while anything is left.
    fn skip_empty_items(&mut self) {
        while let Some(item) = self.item_at(self.item) {
            if self.frame < frame_count(item) {
                return;
            }
            self.item = self.item.saturating_add(1);
            self.frame = 0;
        }
    }

    /// The frames still to write, from the cursor on (the first may be partly written:
    /// `offset` says how much).
    fn frames(&self) -> impl Iterator<Item = (Opcode, &[u8])> {
        let first = self.item_at(self.item).into_iter().flat_map(move |item| {
            (self.frame..frame_count(item)).filter_map(move |index| frame_at(item, index))
        });
        let later =
            self.rest.iter().skip(self.item).flat_map(|item| {
                (0..frame_count(item)).filter_map(move |index| frame_at(item, index))
            });
        first.chain(later)
    }

    /// Fills `headers` and `slices` with the next bytes to write (up to [`FRAMES_PER_WRITE`]
    /// frames) and returns how many slices were filled.
    pub(crate) fn slices<'a>(
        &'a self,
        headers: &'a mut [[u8; MAX_HEADER]; FRAMES_PER_WRITE],
        slices: &mut [IoSlice<'a>; 2 * FRAMES_PER_WRITE],
    ) -> usize {
        // Headers first (they are written into `headers`), slices second (they borrow it).
        let mut frames: [(usize, &'a [u8]); FRAMES_PER_WRITE] = [(0, &[]); FRAMES_PER_WRITE];
        let mut count = 0;
        for ((opcode, payload), (head, slot)) in
            self.frames().zip(headers.iter_mut().zip(frames.iter_mut()))
        {
            *slot = (header(opcode, payload.len(), head), payload);
            count += 1;
        }
        let headers: &'a [[u8; MAX_HEADER]; FRAMES_PER_WRITE] = headers;
        let mut filled = 0;
        let mut skip = self.offset;
        for (head, (head_len, payload)) in headers.iter().zip(frames).take(count) {
            // Only the first frame can be partly written already.
            let head = &head[..head_len];
            if skip < head.len() {
                slices[filled] = IoSlice::new(&head[skip..]);
                filled += 1;
                skip = 0;
            } else {
                skip -= head.len();
            }
            if skip < payload.len() {
                slices[filled] = IoSlice::new(&payload[skip..]);
                filled += 1;
            }
            skip = 0;
        }
        filled
    }

    /// Copies the next frames into `scratch` while they are small (payload at most
    /// [`COALESCE_PAYLOAD`] bytes), up to [`FRAMES_PER_WRITE`] frames, and returns how many bytes
    /// it copied: 0 when the next frame is large (it goes out by [`Pending::slices`], from the
    /// shared payload itself). For chat-sized frames one copy into a buffer the thread reuses
    /// is cheaper than handing the kernel two slices per frame (measured: the kernel's copy of
    /// many small slices was the largest cost of a fan-out).
    pub(crate) fn coalesce(&self, scratch: &mut Vec<u8>) -> usize {
        scratch.clear();
        let mut skip = self.offset;
        for (opcode, payload) in self
            .frames()
            .take(FRAMES_PER_WRITE)
            .take_while(|(_, payload)| payload.len() <= COALESCE_PAYLOAD)
        {
            let mut head = [0u8; MAX_HEADER];
            let head_len = header(opcode, payload.len(), &mut head);
            // Only the first frame can be partly written already.
            if skip < head_len {
                scratch.extend_from_slice(&head[skip..head_len]);
                scratch.extend_from_slice(payload);
            } else {
                scratch.extend_from_slice(payload.get(skip - head_len..).unwrap_or_default());
            }
            skip = 0;
        }
        scratch.len()
    }

    /// Records that the next `written` bytes went out.
    pub(crate) fn advance(&mut self, mut written: usize) {
        while written > 0 {
            let Some((opcode, payload)) = self
                .item_at(self.item)
                .and_then(|item| frame_at(item, self.frame))
            else {
                return;
            };
            let mut head = [0u8; MAX_HEADER];
            let total = header(opcode, payload.len(), &mut head).saturating_add(payload.len());
            let left = total.saturating_sub(self.offset);
            if written < left {
                self.offset += written;
                return;
            }
            written -= left;
            self.offset = 0;
            self.frame += 1;
            self.skip_empty_items();
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut rest = std::mem::take(&mut self.rest);
        // Kept only at a batch's size: a larger one (never made by the connection) is freed.
        if rest.capacity() == 0 || rest.capacity() > 2 * FRAMES_PER_WRITE {
            return;
        }
        rest.clear();
        // A thread being torn down has no spare to keep: the vector is then simply freed.
        let _ = SPARE_ITEMS.try_with(|spare| spare.replace(rest));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_core::Frame;

    /// Everything `pending` would write, `chunk` bytes per write (a socket taking a few at a
    /// time), through the same choice of coalesced copy or slices as the connection makes.
    fn drain(mut pending: Pending, chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut scratch = Vec::new();
        while !pending.is_done() {
            let copied = pending.coalesce(&mut scratch);
            if copied > 0 {
                let take = copied.min(chunk);
                out.extend_from_slice(&scratch[..take]);
                pending.advance(take);
                continue;
            }
            let mut headers = [[0u8; MAX_HEADER]; FRAMES_PER_WRITE];
            let mut slices = [IoSlice::new(&[]); 2 * FRAMES_PER_WRITE];
            let n = pending.slices(&mut headers, &mut slices);
            let mut budget = chunk;
            let mut wrote = 0;
            for slice in &slices[..n] {
                let take = slice.len().min(budget);
                out.extend_from_slice(&slice[..take]);
                budget -= take;
                wrote += take;
                if budget == 0 {
                    break;
                }
            }
            pending.advance(wrote);
        }
        out
    }

    /// The same frames encoded by tungstenite, the reference.
    fn reference(items: &[(bool, Vec<u8>)]) -> Vec<u8> {
        use tokio_tungstenite::tungstenite::protocol::frame::Frame as WsFrame;
        use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
        let mut out = Vec::new();
        for (text, payload) in items {
            let op = if *text { Data::Text } else { Data::Binary };
            let frame = WsFrame::message(payload.clone(), OpCode::Data(op), true);
            frame.format(&mut out).unwrap();
        }
        out
    }

    #[test]
    fn headers_match_the_three_length_forms() {
        let mut out = [0u8; MAX_HEADER];
        assert_eq!(header(Opcode::Text, 125, &mut out), 2);
        assert_eq!(&out[..2], &[0x81, 125]);
        assert_eq!(header(Opcode::Text, 126, &mut out), 4);
        assert_eq!(&out[..4], &[0x81, 126, 0, 126]);
        assert_eq!(header(Opcode::Binary, 65_536, &mut out), 10);
        assert_eq!(&out[..10], &[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!(
            close_frame(1000, "ok"),
            vec![0x88, 4, 0x03, 0xe8, b'o', b'k']
        );
    }

    #[test]
    fn a_batch_written_in_any_chunking_is_the_reference_encoding() {
        let sizes = [0usize, 1, 125, 126, 300, 65_535, 65_536, 70_000];
        let text = |n: usize| "x".repeat(n);
        let mut expected = Vec::new();
        let mut rest = Vec::new();
        for &n in &sizes[1..] {
            rest.push(Outgoing::Frame(Frame::text(text(n))));
            expected.push((true, text(n).into_bytes()));
        }
        rest.push(Outgoing::Batch(vec![]));
        rest.push(Outgoing::Batch(
            (0..100).map(|i| Frame::text(text(i))).collect(),
        ));
        expected.extend((0..100).map(|i| (true, text(i).into_bytes())));
        rest.push(Outgoing::Binary(bytes::Bytes::from_static(b"\x00\x01")));
        expected.push((false, vec![0, 1]));
        let first = || Outgoing::Frame(Frame::text(text(sizes[0])));
        let mut all = vec![(true, Vec::new())];
        all.extend(expected);
        let want = reference(&all);
        for chunk in [1, 3, 7, 1000, usize::MAX] {
            let rest = rest
                .iter()
                .map(|item| match item {
                    Outgoing::Frame(f) => Outgoing::Frame(f.clone()),
                    Outgoing::Batch(v) => Outgoing::Batch(v.clone()),
                    Outgoing::Binary(b) => Outgoing::Binary(b.clone()),
                })
                .collect();
            assert_eq!(
                drain(Pending::new(first(), rest), chunk),
                want,
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn a_written_batch_leaves_its_item_vector_empty_for_the_next() {
        let mut rest = spare_items();
        rest.extend((0..10).map(|i| Outgoing::Frame(Frame::text(i.to_string()))));
        let capacity = rest.capacity();
        drop(Pending::new(Outgoing::Frame(Frame::text("a")), rest));
        let again = spare_items();
        assert!(again.is_empty());
        assert_eq!(again.capacity(), capacity);
        // Taken: the next caller on this thread starts from nothing.
        assert_eq!(spare_items().capacity(), 0);
        // Too large to keep.
        drop(Pending::new(
            Outgoing::Frame(Frame::text("a")),
            Vec::with_capacity(4 * FRAMES_PER_WRITE),
        ));
        assert_eq!(spare_items().capacity(), 0);
    }

    #[test]
    fn an_empty_first_batch_is_skipped() {
        let pending = Pending::new(
            Outgoing::Batch(vec![]),
            vec![Outgoing::Frame(Frame::text("a"))],
        );
        assert_eq!(drain(pending, 100), vec![0x81, 1, b'a']);
        assert!(Pending::new(Outgoing::Batch(vec![]), vec![]).is_done());
    }
}
