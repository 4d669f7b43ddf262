//! WebSocket frame headers (RFC 6455 §5.2), tracked incrementally over a byte stream.
//!
//! The proxy never buffers a message: it parses each frame's header (at most 14 bytes),
//! then lets the payload stream through, counting bytes down to the next header. That is
//! enough to know where frames and messages end, so a Close frame can be written between
//! two frames and never inside one. Pure code: no I/O, no clock.

use thiserror::Error;

/// The longest frame header: 2 bytes, 8 bytes of extended length, 4 bytes of mask key.
pub const MAX_HEADER: usize = 14;
/// Control frames carry at most 125 bytes; a close reason at most 123 (after the code).
pub const MAX_CONTROL_PAYLOAD: u64 = 125;
pub use crate::drain::hint::MAX_REASON_BYTES as MAX_CLOSE_REASON;

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Who wrote the bytes: clients must mask every frame, servers must not (§5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    Client,
    Server,
}

/// A bad frame. Each one ends the session it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    #[error("reserved bits {0:#05b} set without a negotiated extension")]
    ReservedBits(u8),
    #[error("client frame not masked")]
    Unmasked,
    #[error("server frame masked")]
    Masked,
    #[error("control frame with {0} bytes of payload (at most 125)")]
    ControlTooLong(u64),
    #[error("fragmented control frame")]
    ControlFragmented,
    #[error("close frame with a 1-byte payload")]
    CloseOneByte,
    #[error("frame length {0} has the most significant bit set")]
    LengthTooLarge(u64),
    #[error("frame length {0} not in its shortest encoding")]
    LengthNotMinimal(u64),
    #[error("continuation frame outside a fragmented message")]
    StrayContinuation,
    #[error("new data frame inside a fragmented message")]
    MessageInterrupted,
    #[error("stream ended inside a frame")]
    Truncated,
}

/// One parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    /// RSV1..RSV3 as the low three bits.
    pub rsv: u8,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    /// Payload length.
    pub len: u64,
    /// Bytes the header itself takes (2 to 14).
    pub header_len: usize,
}

impl Header {
    pub fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }
}

/// Parses the header at the start of `buf`: `Ok(None)` when more bytes are needed.
/// Errors are found as early as the bytes allow (a reserved opcode in the first byte is
/// reported without waiting for the rest), so garbage is never forwarded.
pub fn parse_header(
    buf: &[u8],
    from: Writer,
    extensions: bool,
) -> Result<Option<Header>, FrameError> {
    let Some(&b0) = buf.first() else {
        return Ok(None);
    };
    let fin = b0 & 0x80 != 0;
    let rsv = (b0 >> 4) & 0x7;
    let opcode = b0 & 0x0F;
    if matches!(opcode, 0x3..=0x7 | 0xB..=0xF) {
        return Err(FrameError::ReservedOpcode(opcode));
    }
    let control = opcode & 0x8 != 0;
    // Extensions (permessage-deflate) may use RSV bits on data frames only.
    if rsv != 0 && (!extensions || control) {
        return Err(FrameError::ReservedBits(rsv));
    }
    if control && !fin {
        return Err(FrameError::ControlFragmented);
    }
    let Some(&b1) = buf.get(1) else {
        return Ok(None);
    };
    let masked = b1 & 0x80 != 0;
    match (from, masked) {
        (Writer::Client, false) => return Err(FrameError::Unmasked),
        (Writer::Server, true) => return Err(FrameError::Masked),
        _ => {}
    }
    let len7 = u64::from(b1 & 0x7F);
    if control && len7 > MAX_CONTROL_PAYLOAD {
        return Err(FrameError::ControlTooLong(len7));
    }
    let ext_len = match len7 {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask_len = if masked { 4 } else { 0 };
    let header_len = 2 + ext_len + mask_len;
    if buf.len() < header_len {
        return Ok(None);
    }
    let len = match ext_len {
        2 => {
            let l = u64::from(u16::from_be_bytes([buf[2], buf[3]]));
            if l < 126 {
                return Err(FrameError::LengthNotMinimal(l));
            }
            l
        }
        8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let l = u64::from_be_bytes(b);
            if l >> 63 != 0 {
                return Err(FrameError::LengthTooLarge(l));
            }
            if l <= 0xFFFF {
                return Err(FrameError::LengthNotMinimal(l));
            }
            l
        }
        _ => len7,
    };
    if opcode == OP_CLOSE && len == 1 {
        return Err(FrameError::CloseOneByte);
    }
    let mask = masked.then(|| {
        let at = 2 + ext_len;
        [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]
    });
    Ok(Some(Header {
        fin,
        rsv,
        opcode,
        mask,
        len,
        header_len,
    }))
}

/// Where a scan may stop early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Go through everything given.
    Never,
    /// Stop between two frames (a control frame may go there, even inside a message).
    FrameStart,
    /// Stop between two messages (no fragmented message in progress).
    MessageBoundary,
}

/// What one `scan` call went through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Scan {
    /// Bytes of the input that were validated and may be forwarded.
    pub used: usize,
    /// A Close frame ended at `used` (the scan stops right after it).
    pub close_ended: bool,
}

/// The position of one direction of a WebSocket connection between frames.
#[derive(Debug, Clone)]
pub struct Tracker {
    from: Writer,
    extensions: bool,
    /// Payload bytes left in the current frame; `None` between frames.
    payload_left: Option<u64>,
    /// The current frame is a Close frame.
    in_close: bool,
    /// A fragmented data message has started and not yet ended.
    in_message: bool,
}

impl Tracker {
    /// `extensions`: the handshake negotiated an extension (RSV bits allowed on data).
    pub fn new(from: Writer, extensions: bool) -> Tracker {
        Tracker {
            from,
            extensions,
            payload_left: None,
            in_close: false,
            in_message: false,
        }
    }

    pub fn at_frame_start(&self) -> bool {
        self.payload_left.is_none()
    }

    pub fn at_message_boundary(&self) -> bool {
        self.at_frame_start() && !self.in_message
    }

    pub fn reached(&self, stop: Stop) -> bool {
        match stop {
            Stop::Never => false,
            Stop::FrameStart => self.at_frame_start(),
            Stop::MessageBoundary => self.at_message_boundary(),
        }
    }

    /// Goes through `input` frame by frame until it is used up, `stop` is reached, a
    /// Close frame ended, or only part of a header is left (`used` then stops before it;
    /// feed those bytes again with more behind them).
    pub fn scan(&mut self, input: &[u8], stop: Stop) -> Result<Scan, FrameError> {
        let mut used = 0;
        loop {
            let left = match self.payload_left {
                Some(left) => left,
                None => {
                    if self.reached(stop) {
                        return Ok(Scan {
                            used,
                            close_ended: false,
                        });
                    }
                    let Some(h) = parse_header(&input[used..], self.from, self.extensions)? else {
                        return Ok(Scan {
                            used,
                            close_ended: false,
                        });
                    };
                    self.begin(&h)?;
                    used += h.header_len;
                    h.len
                }
            };
            let take = left.min((input.len() - used) as u64);
            used += take as usize;
            if left > take {
                self.payload_left = Some(left - take);
                return Ok(Scan {
                    used,
                    close_ended: false,
                });
            }
            // The frame is complete once its payload is through.
            self.payload_left = None;
            if std::mem::take(&mut self.in_close) {
                return Ok(Scan {
                    used,
                    close_ended: true,
                });
            }
        }
    }

    /// Checks a header against the message in progress and enters its payload.
    fn begin(&mut self, h: &Header) -> Result<(), FrameError> {
        if !h.is_control() {
            match (h.opcode == OP_CONTINUATION, self.in_message) {
                (true, false) => return Err(FrameError::StrayContinuation),
                (false, true) => return Err(FrameError::MessageInterrupted),
                _ => {}
            }
            self.in_message = !h.fin;
        }
        self.in_close = h.opcode == OP_CLOSE;
        self.payload_left = Some(h.len);
        Ok(())
    }
}

/// A Close frame with `code` and `reason` (cut to 123 bytes at a character boundary),
/// masked with `mask` when it goes to a server.
pub fn close_frame(code: u16, reason: &str, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut cut = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = Vec::with_capacity(2 + cut);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    let mut frame = Vec::with_capacity(6 + payload.len());
    frame.push(0x80 | OP_CLOSE);
    let len = payload.len() as u8; // ≤ 125
    match mask {
        Some(key) => {
            frame.push(0x80 | len);
            frame.extend_from_slice(&key);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => {
            frame.push(len);
            frame.extend_from_slice(&payload);
        }
    }
    frame
}

#[cfg(test)]
#[path = "frame_tests.rs"]
mod tests;
