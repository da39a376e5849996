//! Feeds arbitrary bytes to the replication protocol's frame decoder
//! (`tandem::volume::wire`): as they come (header checks, length and crc
//! rejection), and with the crc made right so that every payload parser sees
//! them. Nothing may panic, and whatever decodes must encode back to a frame
//! that decodes to the same message (byte for byte for binary payloads).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem::volume::wire::{self, Kind, Message, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    // As received.
    let _ = wire::decode_frame(data);
    let Some(header_bytes) = data.first_chunk::<HEADER_LEN>() else {
        return;
    };
    if let Ok(header) = wire::decode_header(header_bytes) {
        let _ = wire::decode(&header, header_bytes, &data[HEADER_LEN..]);
    }

    // The same bytes made into a frame with a right length and crc, so that
    // the fuzzer reaches the payload parsers without having to find a crc.
    let mut frame = header_bytes.to_vec();
    let payload = &data[HEADER_LEN..];
    frame[8..12].copy_from_slice(&u32::try_from(payload.len()).unwrap_or(u32::MAX).to_be_bytes());
    frame.extend_from_slice(payload);
    let crc = crc32c(&frame[..28], payload);
    frame[28..32].copy_from_slice(&crc.to_be_bytes());
    let fixed: &[u8; HEADER_LEN] = frame.first_chunk().expect("a header");
    let Ok(header) = wire::decode_header(fixed) else {
        return;
    };
    let Ok(msg) = wire::decode(&header, fixed, payload) else {
        return;
    };
    assert_eq!(msg.kind(), header.kind);
    let mut again = Vec::new();
    wire::encode(header.seq, &msg, &mut again).expect("a decoded message encodes");
    let (seq, back, used) = wire::decode_frame(&again).expect("a re-encoded message decodes");
    assert_eq!((seq, &back, used), (header.seq, &msg, again.len()));
    if !matches!(msg, Message::Hello(_) | Message::HelloReply(_)) {
        // Binary layouts have one encoding (JSON may differ in spacing).
        assert_eq!(again, frame, "{:?}", Kind::from_u8(frame[5]));
    }
});

/// CRC-32C (Castagnoli) of `a` then `b`, bitwise: the fuzz crate does not
/// depend on the crc32c crate, and speed does not matter here.
fn crc32c(a: &[u8], b: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in a.iter().chain(b) {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}
