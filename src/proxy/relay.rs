//! One WebSocket session after both 101s: the two upgraded streams, relayed.
//!
//! client→app bytes go through unchanged; app→client bytes too, but frame-aware: the
//! tracker knows where each frame and message ends, so the drain's Close can be put on
//! the wire between two messages (or, after `boundary_wait`, between two frames: control
//! frames may sit inside a fragmented message) and never inside a frame. Both directions
//! are validated header by header before a byte is forwarded, so a bad frame ends the
//! session without reaching the other side.
//!
//! Memory: an idle session holds no buffer. A direction borrows one `BUF`-sized buffer
//! while bytes are in flight and returns it when they are written; it does not read
//! again until they are, so a slow reader pushes back on the writer (TCP flow control)
//! instead of filling memory, and a writer stalled for `write_stall` ends the session.
//!
//! Sockets are driven by readiness (`poll_read_ready`/`poll_write_ready`) and
//! `try_read`/`try_write`: one task serves both directions, the close order and the
//! timers, no operation is ever left half-done, and an idle session stores no future
//! per socket.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::frame::{self, FrameError, MAX_HEADER, Stop, Tracker, Writer};
use super::table::CloseOrder;

/// Largest amount of one direction's bytes held at a time.
pub const BUF: usize = 16 * 1024;

/// The close code the app gets when the proxy ends a session: the client side is going
/// away (1001 is fine towards the app; only clients misread it).
pub const APP_CLOSE_CODE: u16 = 1001;

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// How long the drain's Close waits for the end of the app's message in progress.
    pub boundary_wait: Duration,
    /// From the start of a close sequence until the TCP connections are dropped.
    pub close_timeout: Duration,
    /// A write that makes no progress this long ends the session (slow reader).
    pub write_stall: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            boundary_wait: Duration::from_secs(1),
            close_timeout: Duration::from_secs(3),
            write_stall: Duration::from_secs(30),
        }
    }
}

/// One side of the session: its socket and the bytes hyper had already read past the
/// handshake (a client may send its first frame right behind the request).
pub struct Peer {
    pub stream: TcpStream,
    pub early: Bytes,
}

/// Which side of the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    App,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::App => "app",
        }
    }
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The endpoints closed it (a close handshake or TCP), the proxy only relayed.
    Relayed,
    /// The drain closed it and both sides answered the Close in time.
    Drained,
    /// A close sequence (drain or failure) ran out of `close_timeout`: TCP dropped.
    CloseTimeout,
    /// A side sent a bad frame: 1002 to that side, the session closed.
    BadFrame(Side, FrameError),
    /// A side stopped reading for `write_stall`.
    Stalled(Side),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Pass every valid frame.
    Forward,
    /// Pass frames up to this point, then hold: our Close goes there.
    Hold(Stop),
    /// Our Close is out: read on, drop everything, note the peer's Close answer.
    Discard,
}

/// One direction: reads from `from`, writes to the other side.
struct Pipe {
    tracker: Tracker,
    /// `buf[sent..ready]` is validated and goes out next; `buf[ready..]` is not scanned
    /// yet (a partial header, or frames held back behind a stop point).
    buf: Vec<u8>,
    sent: usize,
    ready: usize,
    /// Our own Close frame, written once `buf[..ready]` is out.
    inject: Vec<u8>,
    injected: usize,
    mode: Mode,
    /// The reading side ended (EOF or error).
    eof: bool,
    /// Writing failed: the receiving side is gone; pending bytes are dropped.
    broken: bool,
    /// The write side was shut down (FIN sent).
    shut: bool,
    /// A Close frame came through from the reading side.
    close_seen: bool,
    /// The stream is corrupt: bytes are dropped without parsing.
    corrupt: bool,
    /// Last time a pending write made progress (or bytes became pending).
    progress_at: Instant,
}

impl Pipe {
    fn new(from: Writer, extensions: bool, early: Bytes) -> Pipe {
        Pipe {
            tracker: Tracker::new(from, extensions),
            buf: early.to_vec(),
            sent: 0,
            ready: 0,
            inject: Vec::new(),
            injected: 0,
            mode: Mode::Forward,
            eof: false,
            broken: false,
            shut: false,
            close_seen: false,
            corrupt: false,
            progress_at: Instant::now(),
        }
    }

    fn pending_write(&self) -> bool {
        !self.broken && (self.sent < self.ready || self.injected < self.inject.len())
    }

    fn wants_read(&self) -> bool {
        !self.eof && !self.pending_write() && (self.mode == Mode::Discard || self.buf.len() < BUF)
    }

    /// Scans what was read: validated bytes become ready, or are dropped once our Close
    /// is out. An error leaves the bad bytes unscanned (never forwarded).
    fn scan(&mut self) -> Result<(), FrameError> {
        loop {
            let input = &self.buf[self.ready..];
            if input.is_empty() {
                return Ok(());
            }
            let stop = match self.mode {
                Mode::Forward | Mode::Discard => Stop::Never,
                Mode::Hold(stop) => stop,
            };
            if self.mode == Mode::Discard && self.corrupt {
                self.buf.truncate(self.ready);
                return Ok(());
            }
            let scan = match self.tracker.scan(input, stop) {
                Ok(scan) => scan,
                Err(e) if self.mode == Mode::Discard => {
                    // After our Close nothing more is relayed: stop parsing, drop bytes.
                    tracing::debug!(error = %e, "bad frame after close; dropping the rest");
                    self.corrupt = true;
                    continue;
                }
                Err(e) => return Err(e),
            };
            self.close_seen |= scan.close_ended;
            if self.mode == Mode::Discard {
                self.buf.drain(self.ready..self.ready + scan.used);
            } else {
                if self.sent == self.ready && scan.used > 0 {
                    self.progress_at = Instant::now();
                }
                self.ready += scan.used;
            }
            if scan.used == 0 {
                return Ok(());
            }
        }
    }

    /// Reads once (nothing if the socket was not readable after all).
    fn read(&mut self, from: &TcpStream) {
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(BUF);
        }
        let room = BUF.saturating_sub(self.buf.len()).max(MAX_HEADER);
        let mut limited = (&mut self.buf).limit(room);
        match from.try_read_buf(&mut limited) {
            Ok(0) => self.eof = true,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::debug!(error = %e, "read failed; treating as end of stream");
                self.eof = true;
            }
        }
    }

    /// Writes what is pending without waiting.
    fn write(&mut self, to: &TcpStream) {
        while self.pending_write() {
            let chunk = if self.sent < self.ready {
                &self.buf[self.sent..self.ready]
            } else {
                &self.inject[self.injected..]
            };
            match to.try_write(chunk) {
                Ok(n) => {
                    if self.sent < self.ready {
                        self.sent += n;
                    } else {
                        self.injected += n;
                    }
                    self.progress_at = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!(error = %e, "write failed; the receiving side is gone");
                    self.broken = true;
                }
            }
        }
        if self.broken {
            self.sent = self.ready;
        }
        if self.sent == self.ready && self.ready > 0 {
            // Keep only unscanned bytes; give the buffer back when nothing is left.
            self.buf.drain(..self.ready);
            self.sent = 0;
            self.ready = 0;
            if self.buf.is_empty() {
                self.buf = Vec::new();
            }
        }
    }

    /// The reading side ended in the middle of a frame (or of a frame header).
    fn truncated(&self) -> bool {
        self.eof
            && !self.corrupt
            && self.mode == Mode::Forward
            && (!self.tracker.at_frame_start() || self.buf.len() > self.ready)
    }

    fn stalled(&self, now: Instant, limit: Duration) -> bool {
        self.pending_write() && now.duration_since(self.progress_at) >= limit
    }
}

use bytes::BufMut as _;

/// A close sequence in progress.
struct Closing {
    /// TCP dropped at this point.
    deadline: Instant,
    /// Until then the client's Close waits for a message boundary; after, a frame start.
    boundary_at: Instant,
    /// Frames waiting for their direction to reach its stop point.
    to_client: Option<Vec<u8>>,
    to_app: Option<Vec<u8>>,
    /// End the stream to that side right after our Close (it broke the protocol).
    fin_client: bool,
    fin_app: bool,
    /// What ends the session if both sides answer in time.
    ending: Ending,
}

enum Event {
    ClientReadable,
    AppReadable,
    ClientWritable,
    AppWritable,
    Order(Option<CloseOrder>),
    Timer,
    Stuck,
}

/// Relays one session until it ends; closes it on `order` with the drain's close code
/// and reason. `extensions`: the app's 101 negotiated an extension.
pub async fn run(
    client: Peer,
    app: Peer,
    extensions: bool,
    order: oneshot::Receiver<CloseOrder>,
    t: Timeouts,
) -> Ending {
    let Peer {
        stream: mut client,
        early: client_early,
    } = client;
    let Peer {
        stream: mut app,
        early: app_early,
    } = app;
    // up: client→app (masked frames); down: app→client (unmasked).
    let mut up = Pipe::new(Writer::Client, extensions, client_early);
    let mut down = Pipe::new(Writer::Server, extensions, app_early);
    let mut order = Some(order);
    let mut closing: Option<Closing> = None;
    let sleep = tokio::time::sleep_until(Instant::now() + Duration::from_secs(86_400));
    tokio::pin!(sleep);
    let mut turn = 0usize;

    loop {
        // Scan what came in; a bad frame starts a failure close sequence.
        let mut failure = None;
        for (side, pipe) in [(Side::Client, &mut up), (Side::App, &mut down)] {
            if let Err(e) = pipe.scan() {
                pipe.corrupt = true;
                pipe.eof = true; // read no more from a broken stream
                failure.get_or_insert(Ending::BadFrame(side, e));
            }
        }
        // A side that ended inside a frame: nothing whole can follow on either side.
        for (side, pipe) in [(Side::Client, &up), (Side::App, &down)] {
            if pipe.truncated() {
                return Ending::BadFrame(side, FrameError::Truncated);
            }
        }
        let now = Instant::now();
        if failure.is_none() && closing.is_none() {
            if up.stalled(now, t.write_stall) {
                failure = Some(Ending::Stalled(Side::App));
            } else if down.stalled(now, t.write_stall) {
                failure = Some(Ending::Stalled(Side::Client));
            }
        }
        if let Some(ending) = failure {
            match &mut closing {
                // Our Close is already on its way: the sequence goes on, reported as failed.
                Some(c) if c.to_client.is_none() || c.to_app.is_none() => c.ending = ending,
                _ => closing = Some(fail(ending, &mut up, &mut down, t)),
            }
        }
        if let Some(c) = &mut closing {
            if now >= c.deadline {
                return match &c.ending {
                    Ending::Drained | Ending::Relayed => Ending::CloseTimeout,
                    failed => failed.clone(),
                };
            }
            if now >= c.boundary_at && down.mode == Mode::Hold(Stop::MessageBoundary) {
                down.mode = Mode::Hold(Stop::FrameStart);
                down.scan().ok();
            }
            place_close(&mut down, &mut c.to_client);
            // The app's Close only after the client's is placed: the app's answer must
            // not overtake the client's Close on its way out.
            if c.to_client.is_none() {
                place_close(&mut up, &mut c.to_app);
            }
        }
        down.write(&client);
        up.write(&app);

        // Half-closes: pass an end of stream on, or end ours once the Close handshake
        // towards that side is done.
        let client_done = closing.as_ref().is_some_and(|c| {
            c.to_client.is_none()
                && down.mode == Mode::Discard
                && (c.fin_client || up.close_seen || up.eof)
        });
        let app_done = closing.as_ref().is_some_and(|c| {
            c.to_app.is_none()
                && up.mode == Mode::Discard
                && (c.fin_app || down.close_seen || down.eof)
        });
        if !down.shut
            && !down.pending_write()
            && ((down.eof && down.mode == Mode::Forward) || client_done || down.broken)
        {
            down.shut = true;
            let _ = client.shutdown().await;
        }
        if !up.shut
            && !up.pending_write()
            && ((up.eof && up.mode == Mode::Forward) || app_done || up.broken)
        {
            up.shut = true;
            let _ = app.shutdown().await;
        }
        // Towards the client we are the server: once its Close answer is in and our
        // FIN out, the session is over for it (RFC 6455 §7.1.1), without waiting for its
        // FIN. Towards the app we are the client: the app closes the TCP first.
        let client_finished = up.eof || (client_done && down.shut);
        if client_finished && down.eof && !up.pending_write() && !down.pending_write() {
            return match closing {
                Some(c) => c.ending,
                None => Ending::Relayed,
            };
        }

        let wake = next_wake(&closing, &up, &down, t);
        // Poll readiness directly rather than through `select!`: no future is stored per
        // branch, which keeps an idle session's task small. The starting branch rotates
        // so neither direction can starve the other.
        turn = turn.wrapping_add(1);
        let event = std::future::poll_fn(|cx| {
            let mut enabled = false;
            for k in 0..4 {
                let hit = match (turn + k) % 4 {
                    0 if up.wants_read() => {
                        enabled = true;
                        client
                            .poll_read_ready(cx)
                            .is_ready()
                            .then_some(Event::ClientReadable)
                    }
                    1 if down.wants_read() => {
                        enabled = true;
                        app.poll_read_ready(cx)
                            .is_ready()
                            .then_some(Event::AppReadable)
                    }
                    2 if up.pending_write() => {
                        enabled = true;
                        app.poll_write_ready(cx)
                            .is_ready()
                            .then_some(Event::AppWritable)
                    }
                    3 if down.pending_write() => {
                        enabled = true;
                        client
                            .poll_write_ready(cx)
                            .is_ready()
                            .then_some(Event::ClientWritable)
                    }
                    _ => None,
                };
                if let Some(e) = hit {
                    return Poll::Ready(e);
                }
            }
            if let Some(rx) = order.as_mut() {
                enabled = true;
                if let Poll::Ready(r) = Pin::new(rx).poll(cx) {
                    return Poll::Ready(Event::Order(r.ok()));
                }
            }
            // The timer is armed only while something is due (never for an idle session).
            if let Some(w) = wake {
                enabled = true;
                if sleep.deadline() != w {
                    sleep.as_mut().reset(w);
                }
                if sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Timer);
                }
            }
            // Nothing left that could make progress: the session is over.
            if enabled {
                Poll::Pending
            } else {
                Poll::Ready(Event::Stuck)
            }
        })
        .await;
        match event {
            Event::ClientReadable => {
                up.read(&client);
            }
            Event::AppReadable => {
                down.read(&app);
            }
            Event::ClientWritable | Event::AppWritable | Event::Timer => {}
            Event::Stuck => {
                return closing.map_or(Ending::Relayed, |c| c.ending);
            }
            Event::Order(o) => {
                order = None;
                if let Some(o) = o
                    && closing.is_none()
                {
                    closing = Some(drain(&o, &mut up, &mut down, t));
                }
            }
        }
    }
}

/// Puts `frame` on `pipe` once it stands at its stop point; the pipe then drops
/// everything after it.
fn place_close(pipe: &mut Pipe, frame: &mut Option<Vec<u8>>) {
    let Mode::Hold(stop) = pipe.mode else {
        return;
    };
    if pipe.close_seen {
        // The endpoint sent its own Close meanwhile (it may, between fragments): that
        // one stands, ours is not sent.
        frame.take();
        pipe.mode = Mode::Discard;
        return;
    }
    if pipe.tracker.reached(stop)
        && let Some(f) = frame.take()
    {
        if !pipe.pending_write() {
            pipe.progress_at = Instant::now();
        }
        pipe.inject = f;
        pipe.mode = Mode::Discard;
        // Frames read past the stop point are after our Close: dropped by the scan.
        let _ = pipe.scan();
    }
}

fn mask() -> Option<[u8; 4]> {
    Some(rand::random())
}

/// The drain's close: the client gets the code and hint at a message boundary, the app
/// a masked 1001. If an endpoint already started its own close, that one finishes.
fn drain(o: &CloseOrder, up: &mut Pipe, down: &mut Pipe, t: Timeouts) -> Closing {
    let now = Instant::now();
    let mut c = Closing {
        deadline: now + t.close_timeout,
        boundary_at: now + t.boundary_wait,
        to_client: None,
        to_app: None,
        fin_client: false,
        fin_app: false,
        ending: Ending::Drained,
    };
    if up.close_seen || down.close_seen || up.eof || down.eof {
        c.ending = Ending::Relayed;
        return c;
    }
    c.to_client = Some(frame::close_frame(o.code, &o.reason, None));
    c.to_app = Some(frame::close_frame(APP_CLOSE_CODE, "", mask()));
    down.mode = Mode::Hold(Stop::MessageBoundary);
    up.mode = Mode::Hold(Stop::FrameStart);
    c
}

/// A failure close: 1002 to the side that sent a bad frame (and its stream ended right
/// after), an ordinary close to the other side.
fn fail(ending: Ending, up: &mut Pipe, down: &mut Pipe, t: Timeouts) -> Closing {
    let now = Instant::now();
    let (client_code, client_reason, app_code) = match &ending {
        Ending::BadFrame(Side::Client, _) => (1002, "protocol error", APP_CLOSE_CODE),
        Ending::BadFrame(Side::App, _) => (1011, "upstream protocol error", 1002),
        Ending::Stalled(Side::Client) => (1008, "not reading", APP_CLOSE_CODE),
        _ => (1011, "upstream not reading", APP_CLOSE_CODE),
    };
    // A side that already sent its Close (or left) gets no second one.
    let client_open = !(down.close_seen || up.close_seen || down.broken);
    let app_open = !(up.close_seen || down.close_seen || up.broken);
    down.mode = Mode::Hold(Stop::FrameStart);
    up.mode = Mode::Hold(Stop::FrameStart);
    Closing {
        deadline: now + t.close_timeout,
        boundary_at: now,
        to_client: Some(if client_open {
            frame::close_frame(client_code, client_reason, None)
        } else {
            Vec::new()
        }),
        to_app: Some(if app_open {
            frame::close_frame(app_code, "", mask())
        } else {
            Vec::new()
        }),
        fin_client: matches!(ending, Ending::BadFrame(Side::Client, _)),
        fin_app: matches!(ending, Ending::BadFrame(Side::App, _)),
        ending,
    }
}

/// When a timer must fire: a stall check while writes are pending, the boundary wait
/// and the close deadline while closing; `None` for an open session with nothing pending
/// (most of them: no timer is armed then).
fn next_wake(closing: &Option<Closing>, up: &Pipe, down: &Pipe, t: Timeouts) -> Option<Instant> {
    let mut wake: Option<Instant> = None;
    let mut at = |i: Instant| wake = Some(wake.map_or(i, |w| w.min(i)));
    for p in [up, down] {
        if p.pending_write() {
            at(p.progress_at + t.write_stall);
        }
    }
    if let Some(c) = closing {
        at(c.deadline);
        if down.mode == Mode::Hold(Stop::MessageBoundary) {
            at(c.boundary_at);
        }
    }
    wake
}
