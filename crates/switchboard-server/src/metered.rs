//! A socket wrapper that watches the bytes going through: write progress (for the write
//! timeout) and inbound messages still being received (for the message timeout and the
//! server-wide reassembly budget).
//!
//! tungstenite assembles fragmented messages internally and shows us nothing until a message is
//! complete, so the only place to see a half-received message is the byte stream itself.
//! [`InboundScanner`] is a small sans-IO parser of client frame headers: it skips payloads by
//! counting, so its cost is a few comparisons per frame, not per byte.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use switchboard_core::{ClientKey, MemoryBudget, Shares};

use crate::MAX_TRACKED_CLIENTS;
use crate::metrics::Traffic;
use crate::wire::{FRAMES_PER_WRITE, MAX_HEADER, Pending};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// The base instant of the millisecond marks below.
fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Milliseconds since [`base`], plus one (0 means "never" in the marks below), so a mark fits
/// in an atomic.
fn now_ms() -> u64 {
    u64::try_from(Instant::now().saturating_duration_since(base()).as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

fn instant_of(ms: u64) -> Instant {
    base() + Duration::from_millis(ms.saturating_sub(1))
}

/// What the connection loop reads about its socket's traffic; shared with the wrapper because
/// the loop's timers run while the read or write future holds the socket.
///
/// It is also the waker of the socket's read side and of the connection's timer: it records
/// that one of them woke the task, so the loop polls neither on the far more frequent wake-ups
/// for its queue (see the connection loop). One allocation for both jobs: every one the loop
/// touches on a wake-up is a cache miss at a large fan-out.
#[derive(Debug)]
pub(crate) struct Watch {
    /// When the write being watched last made progress (ms mark; 0: no write is watched, the
    /// fast path, where the socket took everything at once and no clock is read).
    write_progress: AtomicU64,
    /// When the inbound message now being received began (ms mark; 0: none).
    message_started: AtomicU64,
    /// The reassembly budget refused this socket's next bytes.
    over_budget: AtomicBool,
    /// The read side or the timer woke the task, or may have more to give at once.
    woken: AtomicBool,
    /// The connection task, woken in turn.
    task: AtomicWaker,
}

impl Default for Watch {
    fn default() -> Self {
        Self {
            write_progress: AtomicU64::new(0),
            message_started: AtomicU64::new(0),
            over_budget: AtomicBool::new(false),
            // The first pass must reach the socket and the timer, to register with both.
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        }
    }
}

impl std::task::Wake for Watch {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Watch {
    /// Registers the task to be woken for the read side and the timer, and says whether either
    /// woke it since the last call (clearing that).
    pub(crate) fn take_woken(&self, task: &std::task::Waker) -> bool {
        self.task.register(task);
        // A plain load first: on most wake-ups nothing is set, and the line stays unwritten.
        self.woken.load(Ordering::Acquire) && self.woken.swap(false, Ordering::AcqRel)
    }

    /// Makes the next pass of the loop poll the read side and the timer again (there may be
    /// more to read at once, or a deadline moved).
    pub(crate) fn look_again(&self) {
        self.woken.store(true, Ordering::Relaxed);
    }

    /// Starts watching a write that did not complete at once (progress counts from now).
    pub(crate) fn start_write(&self) {
        self.write_progress.store(now_ms(), Ordering::Relaxed);
    }

    /// Stops watching: the write completed or was abandoned.
    pub(crate) fn end_write(&self) {
        self.write_progress.store(0, Ordering::Relaxed);
    }

    /// The socket accepted bytes: a watched write made progress.
    fn wrote(&self) {
        if self.write_progress.load(Ordering::Relaxed) != 0 {
            self.start_write();
        }
    }

    /// When the write under way last made progress.
    pub(crate) fn write_progress(&self) -> Instant {
        instant_of(self.write_progress.load(Ordering::Relaxed))
    }

    /// When the inbound message being received began, if one is.
    pub(crate) fn message_started(&self) -> Option<Instant> {
        match self.message_started.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(instant_of(ms)),
        }
    }

    /// Whether the reassembly budget refused this socket.
    pub(crate) fn over_budget(&self) -> bool {
        self.over_budget.load(Ordering::Relaxed)
    }
}

/// Bytes of a partly received message each socket may hold without charging the pool: typical
/// chat messages that span two reads never touch the shared counters.
pub(crate) const REASSEMBLY_ALLOWANCE: usize = 8 * 1024;

/// How many bytes of memory one received byte of an unfinished message costs (see `on_read`).
pub(crate) const REASSEMBLY_FACTOR: usize = 2;

/// The server-wide pool of bytes held in partly received inbound messages, with a per-client
/// share so one client's unfinished messages cannot refuse everyone else's.
#[derive(Debug)]
pub(crate) struct ReassemblyPool {
    total: MemoryBudget,
    /// Each client's bytes; `None` is a share of zero bytes (`Shares` reads 0 as unlimited).
    per_client: Option<Shares<ClientKey>>,
}

impl ReassemblyPool {
    pub(crate) fn new(total: usize, per_client: usize) -> Self {
        Self {
            total: MemoryBudget::new(total),
            per_client: (per_client > 0).then(|| Shares::new(per_client, MAX_TRACKED_CLIENTS)),
        }
    }

    /// Bytes held now, server-wide.
    pub(crate) fn used(&self) -> usize {
        self.total.used()
    }

    fn try_charge(&self, key: ClientKey, bytes: usize) -> bool {
        let Some(per_client) = &self.per_client else {
            return false;
        };
        if per_client.try_acquire_n(&key, bytes).is_err() {
            return false;
        }
        if self.total.try_reserve(bytes).is_err() {
            per_client.release_n(&key, bytes);
            return false;
        }
        true
    }

    fn release(&self, key: ClientKey, bytes: usize) {
        if bytes == 0 {
            return;
        }
        self.total.release(bytes);
        if let Some(per_client) = &self.per_client {
            per_client.release_n(&key, bytes);
        }
    }
}

thread_local! {
    /// Small frames of one write are copied here, contiguous (see `Pending::coalesce`). One
    /// buffer per worker thread, reused by every connection that thread polls: a socket keeps
    /// no write buffer of its own, and the copy is only ever used within one poll.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A scratch buffer larger than this after a write is released (64 frames of the coalescing
/// limit fit).
const MAX_SCRATCH: usize = 256 * 1024;

/// Largest backlog of tungstenite's own writes (pongs, the reply to a peer's close) kept
/// until the connection loop sends it: tungstenite holds at most one pending pong, so more
/// than this means something is wrong and the connection ends.
const MAX_CONTROL_BYTES: usize = 4 * 1024;

/// The socket under tungstenite. Reads pass through and keep [`Watch`] current. Writes are
/// split: tungstenite only writes control replies (pongs, a close reply), which land in a
/// small buffer; the connection loop writes everything (its queued data frames, pre-encoded,
/// and that buffer) straight to the socket through [`Metered::poll_write_pending`] and
/// [`Metered::poll_send_control`], so no frame is re-encoded or copied per recipient.
#[derive(Debug)]
pub(crate) struct Metered<T> {
    inner: T,
    /// Control frames tungstenite wrote, not yet on the socket.
    control: Vec<u8>,
    /// Our close frame is queued: what tungstenite writes from now on (its reply to the peer's
    /// answer) must not follow it.
    close_sent: bool,
    watch: Arc<Watch>,
    scanner: InboundScanner,
    pool: Arc<ReassemblyPool>,
    client: ClientKey,
    /// Bytes of this socket's unfinished message charged to `pool` (beyond the allowance).
    charged: usize,
    /// Off once the connection closes: bytes still arriving are discarded, not buffered.
    counting: bool,
    /// This socket's frames and bytes, for the metrics and the access log.
    pub(crate) traffic: Traffic,
}

impl<T> Metered<T> {
    pub(crate) fn new(
        inner: T,
        watch: Arc<Watch>,
        pool: Arc<ReassemblyPool>,
        client: ClientKey,
    ) -> Self {
        Self {
            inner,
            control: Vec::new(),
            close_sent: false,
            watch,
            scanner: InboundScanner::default(),
            pool,
            client,
            charged: 0,
            counting: true,
            traffic: Traffic::default(),
        }
    }

    /// Stops charging the reassembly budget (what arrives from now on is read and discarded)
    /// and gives back what this socket holds.
    pub(crate) fn stop_counting(&mut self) {
        // The charge stays until the socket is dropped: tungstenite's buffers hold what was
        // already received until then.
        self.counting = false;
        self.watch.message_started.store(0, Ordering::Relaxed);
    }

    fn on_read(&mut self, bytes: &[u8]) {
        if !self.counting {
            return;
        }
        let was_open = self.scanner.message_open();
        self.scanner.feed(bytes);
        // Twice the payload received: tungstenite reserves each frame in its input buffer and,
        // for a fragmented message, copies every finished fragment into the message being
        // assembled, so a half-received message is held about twice (measured: 150 sockets with
        // 6 MB fragments grew the heap by 2x what a 1x charge admitted).
        let pending = usize::try_from(self.scanner.pending_bytes())
            .unwrap_or(usize::MAX)
            .saturating_mul(REASSEMBLY_FACTOR)
            .saturating_sub(REASSEMBLY_ALLOWANCE);
        if pending > self.charged {
            if self.pool.try_charge(self.client, pending - self.charged) {
                self.charged = pending;
            } else {
                self.watch.over_budget.store(true, Ordering::Relaxed);
            }
        } else if pending < self.charged {
            self.pool.release(self.client, self.charged - pending);
            self.charged = pending;
        }
        let restarted = self.scanner.take_restarted();
        match (was_open, self.scanner.message_open()) {
            (false, true) => self
                .watch
                .message_started
                .store(now_ms(), Ordering::Relaxed),
            (true, false) => self.watch.message_started.store(0, Ordering::Relaxed),
            (true, true) if restarted => {
                self.watch
                    .message_started
                    .store(now_ms(), Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

impl<T> Drop for Metered<T> {
    fn drop(&mut self) {
        self.pool.release(self.client, self.charged);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            let filled = buf.filled();
            if filled.len() > before {
                let read = filled.len() - before;
                this.traffic.bytes_in = this
                    .traffic
                    .bytes_in
                    .saturating_add(u64::try_from(read).unwrap_or(u64::MAX));
                this.on_read(&filled[before..]);
            }
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> Metered<T> {
    /// Queues a control frame of ours (a ping, our close frame) behind what tungstenite wrote.
    pub(crate) fn queue_control(&mut self, frame: &[u8], is_close: bool) {
        if self.close_sent {
            return;
        }
        self.control.extend_from_slice(frame);
        self.close_sent = is_close;
    }

    /// Whether control bytes wait to be sent.
    pub(crate) fn has_control(&self) -> bool {
        !self.control.is_empty()
    }

    /// What a write to the socket did: bytes it took (at least one, noted as write progress),
    /// an error (a socket that takes nothing is one), or `Pending`.
    fn progress(&mut self, result: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match result {
            Poll::Ready(Ok(0)) => Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => {
                self.traffic.bytes_out = self
                    .traffic
                    .bytes_out
                    .saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
                self.watch.wrote();
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }

    /// Writes the queued control bytes to the socket.
    pub(crate) fn poll_send_control(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.control.is_empty() {
            let result = Pin::new(&mut self.inner).poll_write(cx, &self.control);
            let n = std::task::ready!(self.progress(result))?;
            self.control.drain(..n.min(self.control.len()));
        }
        // A burst of pongs must not keep its buffer.
        if self.control.capacity() > 256 {
            self.control = Vec::new();
        }
        Poll::Ready(Ok(()))
    }

    /// Writes `pending` (queued frames) to the socket after any control bytes, one vectored
    /// write per up to [`FRAMES_PER_WRITE`] frames, until all is written or the socket is full.
    pub(crate) fn poll_write_pending(
        &mut self,
        cx: &mut Context<'_>,
        pending: &mut Pending,
    ) -> Poll<io::Result<()>> {
        if !self.control.is_empty() {
            std::task::ready!(self.poll_send_control(cx))?;
        }
        while !pending.is_done() {
            let copied = SCRATCH.with_borrow_mut(|scratch| {
                if pending.coalesce(scratch) == 0 {
                    return None;
                }
                let result = Pin::new(&mut self.inner).poll_write(cx, scratch);
                if scratch.capacity() > MAX_SCRATCH {
                    *scratch = Vec::new();
                }
                Some(result)
            });
            let result = copied.unwrap_or_else(|| {
                let mut headers = [[0u8; MAX_HEADER]; FRAMES_PER_WRITE];
                let mut slices = [io::IoSlice::new(&[]); 2 * FRAMES_PER_WRITE];
                let filled = pending.slices(&mut headers, &mut slices);
                Pin::new(&mut self.inner).poll_write_vectored(cx, &slices[..filled])
            });
            let n = std::task::ready!(self.progress(result))?;
            pending.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

/// tungstenite's side of the writes: only control replies reach here (the loop never sends
/// data through tungstenite), and they are buffered for the loop to send in order.
impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.close_sent {
            // Our close frame went first; the closing handshake is complete without this.
            return Poll::Ready(Ok(buf.len()));
        }
        if this.control.len().saturating_add(buf.len()) > MAX_CONTROL_BYTES {
            return Poll::Ready(Err(io::Error::other("control frame backlog")));
        }
        this.control.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Follows the frame structure of a client's byte stream (RFC 6455 section 5.2) just enough to
/// know whether a data message is partly received and how many payload bytes it holds so far.
/// Malformed input is tungstenite's to reject; the scanner only has to stay bounded.
#[derive(Debug, Default)]
pub(crate) struct InboundScanner {
    /// Header bytes of the frame being read (at most 14).
    header: [u8; 14],
    header_len: usize,
    /// Payload bytes of the current frame still to come (when `in_payload`).
    remaining: u64,
    in_payload: bool,
    /// The current frame is a data frame (text, binary, continuation).
    data_frame: bool,
    /// The current frame has FIN set.
    fin: bool,
    /// A data message has begun and its final frame has not fully arrived.
    open: bool,
    /// Payload bytes of the open message received so far.
    pending: u64,
    /// A message completed during the current `feed`.
    closed_in_feed: bool,
    /// A message completed and a new one opened within one `feed`.
    restarted: bool,
}

impl InboundScanner {
    /// Whether a data message is partly received.
    pub(crate) fn message_open(&self) -> bool {
        self.open
    }

    /// Payload bytes of the partly received message.
    pub(crate) fn pending_bytes(&self) -> u64 {
        self.pending
    }

    /// Whether, during the last `feed`, one message completed and the next began (so its start
    /// time is now, not the previous message's).
    pub(crate) fn take_restarted(&mut self) -> bool {
        std::mem::take(&mut self.restarted)
    }

    /// Consumes bytes read from the socket.
    pub(crate) fn feed(&mut self, mut bytes: &[u8]) {
        self.closed_in_feed = false;
        while !bytes.is_empty() {
            if self.in_payload {
                let available = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
                let take = self.remaining.min(available);
                if self.data_frame {
                    self.pending = self.pending.saturating_add(take);
                }
                self.remaining -= take;
                bytes = &bytes[usize::try_from(take).unwrap_or(bytes.len())..];
                if self.remaining == 0 {
                    self.end_frame();
                }
                continue;
            }
            let Some((&byte, rest)) = bytes.split_first() else {
                break;
            };
            bytes = rest;
            if self.header_len == 0 {
                let opcode = byte & 0x0f;
                self.data_frame = matches!(opcode, 0..=2);
                self.fin = byte & 0x80 != 0;
                if self.data_frame && !self.open {
                    self.restarted = self.closed_in_feed;
                    self.open = true;
                }
            }
            if let Some(slot) = self.header.get_mut(self.header_len) {
                *slot = byte;
            }
            self.header_len += 1;
            if let Some(length) = self.complete_header() {
                self.header_len = 0;
                self.remaining = length;
                self.in_payload = true;
                if length == 0 {
                    self.end_frame();
                }
            }
        }
    }

    /// The payload length once the header is complete.
    fn complete_header(&self) -> Option<u64> {
        if self.header_len < 2 {
            return None;
        }
        let masked = self.header[1] & 0x80 != 0;
        let short = self.header[1] & 0x7f;
        let extended = match short {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let needed = 2 + extended + if masked { 4 } else { 0 };
        if self.header_len < needed {
            return None;
        }
        Some(match short {
            126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
            127 => {
                let mut raw = [0u8; 8];
                raw.copy_from_slice(&self.header[2..10]);
                u64::from_be_bytes(raw)
            }
            n => u64::from(n),
        })
    }

    fn end_frame(&mut self) {
        self.in_payload = false;
        if self.data_frame && self.fin {
            self.open = false;
            self.pending = 0;
            self.closed_in_feed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame (mask key zero, so the payload is as given).
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        let len = payload.len();
        if len < 126 {
            out.push(0x80 | len as u8);
        } else if len <= 0xffff {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn a_whole_message_leaves_nothing_open() {
        let mut scanner = InboundScanner::default();
        scanner.feed(&frame(true, 1, b"hello"));
        assert!(!scanner.message_open());
        assert_eq!(scanner.pending_bytes(), 0);
    }

    #[test]
    fn fragments_stay_open_across_control_frames_until_the_final_one() {
        let mut scanner = InboundScanner::default();
        scanner.feed(&frame(false, 1, &[b'a'; 300]));
        assert!(scanner.message_open());
        assert_eq!(scanner.pending_bytes(), 300);
        scanner.feed(&frame(true, 9, b"ping"));
        assert!(scanner.message_open());
        assert_eq!(scanner.pending_bytes(), 300);
        scanner.feed(&frame(false, 0, &[b'b'; 70_000]));
        assert_eq!(scanner.pending_bytes(), 70_300);
        scanner.feed(&frame(true, 0, b"end"));
        assert!(!scanner.message_open());
        assert_eq!(scanner.pending_bytes(), 0);
    }

    #[test]
    fn a_large_frame_arriving_byte_by_byte_is_counted_as_it_comes() {
        let mut scanner = InboundScanner::default();
        let bytes = frame(true, 2, &[7u8; 1000]);
        for (i, byte) in bytes.iter().enumerate() {
            scanner.feed(std::slice::from_ref(byte));
            if i + 1 < bytes.len() {
                assert!(scanner.message_open(), "open at byte {i}");
            }
        }
        assert!(!scanner.message_open());
    }

    #[test]
    fn a_message_completing_and_the_next_starting_in_one_read_is_open() {
        let mut scanner = InboundScanner::default();
        let mut bytes = frame(true, 1, b"one");
        bytes.extend(frame(false, 1, b"two"));
        scanner.feed(&bytes);
        assert!(scanner.message_open());
        assert!(scanner.take_restarted());
        assert_eq!(scanner.pending_bytes(), 3);
    }

    #[test]
    fn hostile_lengths_stay_bounded() {
        let mut scanner = InboundScanner::default();
        scanner.feed(&[
            0x01, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0,
        ]);
        scanner.feed(&[1, 2, 3]);
        assert_eq!(scanner.pending_bytes(), 3);
        assert!(scanner.message_open());
    }
}
