use std::io::Cursor;

use proptest::prelude::*;
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, OpCode};

use super::*;

/// Encodes one frame with tungstenite (the oracle), payload bytes all `0xAB`.
fn encode(fin: bool, rsv1: bool, opcode: u8, len: u64, mask: Option<[u8; 4]>) -> Vec<u8> {
    let header = FrameHeader {
        is_final: fin,
        rsv1,
        rsv2: false,
        rsv3: false,
        opcode: OpCode::from(opcode),
        mask,
    };
    let mut out = Vec::new();
    header.format(len, &mut out).unwrap();
    out.resize(out.len() + len as usize, 0xAB);
    out
}

fn parse(buf: &[u8], from: Writer) -> Result<Option<Header>, FrameError> {
    parse_header(buf, from, false)
}

#[test]
fn header_lengths_in_all_three_encodings() {
    for (len, header_len) in [(0u64, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)] {
        let bytes = encode(true, false, OP_BINARY, len, None);
        let h = parse(&bytes, Writer::Server).unwrap().unwrap();
        assert_eq!(
            (h.len, h.header_len, h.fin, h.opcode),
            (len, header_len, true, OP_BINARY)
        );
        let masked = encode(false, false, OP_TEXT, len, Some([1, 2, 3, 4]));
        let h = parse(&masked, Writer::Client).unwrap().unwrap();
        assert_eq!(
            (h.len, h.header_len, h.mask),
            (len, header_len + 4, Some([1, 2, 3, 4]))
        );
    }
}

#[test]
fn incomplete_headers_ask_for_more() {
    let bytes = encode(true, false, OP_BINARY, 70_000, Some([9, 9, 9, 9]));
    for cut in 0..14 {
        assert_eq!(parse(&bytes[..cut], Writer::Client), Ok(None), "cut {cut}");
    }
    assert!(parse(&bytes[..14], Writer::Client).unwrap().is_some());
}

#[test]
fn each_bad_header_has_its_error() {
    use FrameError::*;
    let s = Writer::Server;
    assert_eq!(parse(&[0x83], s), Err(ReservedOpcode(3)));
    assert_eq!(parse(&[0x8F], s), Err(ReservedOpcode(0xF)));
    assert_eq!(parse(&[0xC2], s), Err(ReservedBits(0b100)));
    // RSV1 is fine on data frames once an extension was negotiated, never on control.
    assert!(parse_header(&[0xC2, 0x00], s, true).unwrap().is_some());
    assert_eq!(
        parse_header(&[0xC9, 0x00], s, true),
        Err(ReservedBits(0b100))
    );
    assert_eq!(parse(&[0x82, 0x00], Writer::Client), Err(Unmasked));
    assert_eq!(parse(&[0x82, 0x80], s), Err(Masked));
    assert_eq!(parse(&[0x89, 0x7E], s), Err(ControlTooLong(126)));
    assert_eq!(parse(&[0x09], s), Err(ControlFragmented));
    assert_eq!(parse(&[0x88, 0x01], s), Err(CloseOneByte));
    assert_eq!(
        parse(&[0x82, 0x7E, 0x00, 0x7D], s),
        Err(LengthNotMinimal(125))
    );
    let mut long = vec![0x82, 0x7F, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF];
    assert_eq!(parse(&long, s), Err(LengthNotMinimal(0xFFFF)));
    long[2] = 0x80;
    assert!(matches!(parse(&long, s), Err(LengthTooLarge(_))));
}

#[test]
fn fragmentation_rules() {
    let mut t = Tracker::new(Writer::Server, false);
    let stray = encode(true, false, OP_CONTINUATION, 1, None);
    assert_eq!(
        t.scan(&stray, Stop::Never),
        Err(FrameError::StrayContinuation)
    );

    let mut t = Tracker::new(Writer::Server, false);
    let mut s = encode(false, false, OP_TEXT, 3, None);
    assert_eq!(t.scan(&s, Stop::Never).unwrap().used, s.len());
    assert!(t.at_frame_start() && !t.at_message_boundary());
    // A ping in the middle of a fragmented message is fine (§5.4).
    s = encode(true, false, OP_PING, 4, None);
    assert_eq!(t.scan(&s, Stop::Never).unwrap().used, s.len());
    s = encode(true, false, OP_BINARY, 1, None);
    assert_eq!(t.scan(&s, Stop::Never), Err(FrameError::MessageInterrupted));
}

#[test]
fn scan_stops_after_a_close_frame_and_at_requested_points() {
    let mut stream = encode(false, false, OP_TEXT, 10, None);
    let first_frame = stream.len();
    stream.extend(close_frame(1000, "bye", None));
    let after_close = stream.len();
    stream.extend(encode(true, false, OP_CONTINUATION, 5, None));
    let mut t = Tracker::new(Writer::Server, false);
    let scan = t.scan(&stream, Stop::Never).unwrap();
    assert_eq!(
        scan,
        Scan {
            used: after_close,
            close_ended: true
        }
    );
    assert_eq!(
        t.scan(&stream[after_close..], Stop::Never).unwrap().used,
        stream.len() - after_close
    );

    let mut t = Tracker::new(Writer::Server, false);
    assert_eq!(t.scan(&stream, Stop::FrameStart).unwrap().used, 0);
    assert_eq!(t.scan(&stream[..3], Stop::Never).unwrap().used, 3);
    assert_eq!(
        t.scan(&stream[3..], Stop::FrameStart).unwrap().used,
        first_frame - 3
    );
}

#[test]
fn close_frames_parse_back_with_tungstenite() {
    let long = "é".repeat(100); // 200 bytes: cut to 122 (a character boundary below 123)
    for (reason, mask) in [
        ("{\"reconnect_after_ms\":1200}", None),
        (long.as_str(), Some([7, 1, 2, 3])),
    ] {
        let bytes = close_frame(1012, reason, mask);
        let mut cur = Cursor::new(&bytes);
        let (header, len) = FrameHeader::parse(&mut cur).unwrap().unwrap();
        assert_eq!(header.opcode, OpCode::Control(Control::Close));
        assert_eq!(header.mask, mask);
        let start = cur.position() as usize;
        let mut payload = bytes[start..start + len as usize].to_vec();
        if let Some(k) = mask {
            payload
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b ^= k[i % 4]);
        }
        assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1012);
        let got = std::str::from_utf8(&payload[2..]).unwrap();
        assert!(reason.starts_with(got) && got.len() <= MAX_CLOSE_REASON);
        assert_eq!(got.len(), reason.len().min(122));
    }
}

/// One frame of a generated valid stream.
#[derive(Debug, Clone)]
struct Spec {
    fin: bool,
    opcode: u8,
    len: u64,
}

/// A valid sequence of messages, some fragmented, with control frames between fragments.
fn valid_frames() -> impl Strategy<Value = Vec<Spec>> {
    let len = prop_oneof![4 => 0u64..130, 2 => 126u64..2000, 1 => 65_530u64..66_000];
    let control = (
        prop_oneof![Just(OP_PING), Just(OP_PONG), Just(OP_CLOSE)],
        0u64..=125,
    )
        .prop_map(|(opcode, len)| Spec {
            fin: true,
            opcode,
            len: if opcode == OP_CLOSE && len == 1 {
                2
            } else {
                len
            },
        });
    let message = (
        prop_oneof![Just(OP_TEXT), Just(OP_BINARY)],
        prop::collection::vec((len, prop::option::of(control)), 1..4),
    )
        .prop_map(|(opcode, parts)| {
            let n = parts.len();
            let mut frames = Vec::new();
            for (i, (len, ctl)) in parts.into_iter().enumerate() {
                let op = if i == 0 { opcode } else { OP_CONTINUATION };
                frames.push(Spec {
                    fin: i + 1 == n,
                    opcode: op,
                    len,
                });
                if let Some(c) = ctl {
                    frames.push(c);
                }
            }
            frames
        });
    prop::collection::vec(message, 1..6).prop_map(|m| m.concat())
}

/// Encodes specs; returns bytes, frame ends, message boundaries (frame starts outside a
/// message, including 0) and Close frame ends.
fn encode_all(specs: &[Spec], from: Writer) -> (Vec<u8>, Vec<usize>, Vec<usize>, Vec<usize>) {
    let (mut bytes, mut frame_ends, mut boundaries, mut closes) =
        (Vec::new(), vec![0], vec![0], vec![]);
    let mut in_message = false;
    for s in specs {
        let mask = (from == Writer::Client).then_some([1, 2, 3, 4]);
        bytes.extend(encode(s.fin, false, s.opcode, s.len, mask));
        frame_ends.push(bytes.len());
        if s.opcode & 0x8 == 0 {
            in_message = !s.fin;
        }
        if s.opcode == OP_CLOSE {
            closes.push(bytes.len());
        }
        if !in_message {
            boundaries.push(bytes.len());
        }
    }
    (bytes, frame_ends, boundaries, closes)
}

/// Feeds `bytes` in chunks cut at `cuts`, holding back unused partial headers like the
/// relay does; checks every stopping point against the known frame layout.
fn feed_in_chunks(
    bytes: &[u8],
    cuts: &[usize],
    from: Writer,
) -> Result<(Vec<usize>, Vec<usize>), FrameError> {
    let mut t = Tracker::new(from, false);
    let (mut at, mut frame_starts, mut closes) = (0usize, Vec::new(), Vec::new());
    let mut ends: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    ends.push(bytes.len());
    ends.sort_unstable();
    for end in ends {
        while at < end {
            let scan = t.scan(&bytes[at..end], Stop::Never)?;
            at += scan.used;
            if scan.close_ended {
                closes.push(at);
            }
            if t.at_frame_start() {
                frame_starts.push(at);
            }
            if scan.used == 0 {
                break; // a partial header: wait for the next chunk
            }
        }
    }
    assert_eq!(at, bytes.len(), "every byte of a valid stream is used");
    Ok((frame_starts, closes))
}

/// 200 cases per property in `make test`; `make fuzz` sets PROPTEST_CASES far higher.
fn config() -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = 200;
    }
    c
}

proptest! {
    #![proptest_config(config())]

    /// Any valid stream, cut anywhere: every byte is used, and the tracker only ever
    /// claims a frame start where one frame ends, and sees each Close where it ends.
    #[test]
    fn valid_streams_pass_whole_in_any_chunks(
        specs in valid_frames(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
        client in any::<bool>(),
    ) {
        let from = if client { Writer::Client } else { Writer::Server };
        let (bytes, frame_ends, _, closes) = encode_all(&specs, from);
        let (starts, seen_closes) = feed_in_chunks(&bytes, &cuts, from).unwrap();
        for s in &starts {
            prop_assert!(frame_ends.contains(s), "frame start claimed at {s}, not a frame end");
        }
        prop_assert_eq!(seen_closes, closes);
    }

    /// Scanning to a message boundary from any position stops at the first boundary at
    /// or after it: never inside a frame, never inside a fragmented message.
    #[test]
    fn stop_at_message_boundary_is_the_next_boundary(specs in valid_frames(), cut in any::<usize>()) {
        let (bytes, frame_ends, boundaries, _) = encode_all(&specs, Writer::Server);
        let cut = cut % (bytes.len() + 1);
        let mut t = Tracker::new(Writer::Server, false);
        let mut at = 0;
        while at < cut {
            let scan = t.scan(&bytes[at..cut], Stop::Never).unwrap();
            if scan.used == 0 { break; }
            at += scan.used;
        }
        // `at` is at or just before `cut` (before a partial header); search from there.
        let from = at;
        loop {
            let scan = t.scan(&bytes[at..], Stop::MessageBoundary).unwrap();
            at += scan.used;
            if t.reached(Stop::MessageBoundary) || at == bytes.len() { break; }
        }
        let want = *boundaries.iter().find(|b| **b >= from).unwrap();
        prop_assert!(frame_ends.contains(&at));
        prop_assert_eq!(at, want, "searching from {}", from);
    }

    /// Our header parser agrees with tungstenite's on every well-formed header.
    #[test]
    fn headers_agree_with_tungstenite(
        fin in any::<bool>(),
        opcode in prop_oneof![Just(OP_CONTINUATION), Just(OP_TEXT), Just(OP_BINARY)],
        len in prop_oneof![0u64..200, 200u64..70_000, (1u64 << 16)..(1u64 << 40)],
        mask in prop::option::of(any::<[u8; 4]>()),
        rsv1 in any::<bool>(),
    ) {
        let header = FrameHeader { is_final: fin, rsv1, rsv2: false, rsv3: false, opcode: OpCode::from(opcode), mask };
        let mut bytes = Vec::new();
        header.format(len, &mut bytes).unwrap();
        let from = if mask.is_some() { Writer::Client } else { Writer::Server };
        let ours = parse_header(&bytes, from, true).unwrap().unwrap();
        let (theirs, their_len) = FrameHeader::parse(&mut Cursor::new(&bytes)).unwrap().unwrap();
        prop_assert_eq!(ours.len, their_len);
        prop_assert_eq!(ours.header_len, bytes.len());
        prop_assert_eq!(ours.fin, theirs.is_final);
        prop_assert_eq!(ours.rsv, u8::from(rsv1) << 2);
        prop_assert_eq!(ours.mask, theirs.mask);
        prop_assert_eq!(OpCode::from(ours.opcode), theirs.opcode);
    }

    /// Arbitrary bytes in arbitrary chunks: no panic, no over-read, and once an error is
    /// found the same bytes keep failing.
    #[test]
    fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..400), cuts in prop::collection::vec(any::<usize>(), 0..6), client in any::<bool>(), ext in any::<bool>()) {
        let from = if client { Writer::Client } else { Writer::Server };
        let mut t = Tracker::new(from, ext);
        let mut at = 0;
        let mut ends: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        ends.push(bytes.len());
        ends.sort_unstable();
        'outer: for end in ends {
            while at < end {
                match t.scan(&bytes[at..end], Stop::Never) {
                    Ok(scan) => {
                        prop_assert!(scan.used <= end - at);
                        at += scan.used;
                        if scan.used == 0 { break; }
                    }
                    Err(_) => break 'outer,
                }
            }
        }
        prop_assert!(at <= bytes.len());
    }
}
