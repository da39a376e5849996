//! Feeds arbitrary bytes to the heartbeat datagram parser
//! (`tandem::liveness::frame`) and the receiver behind it
//! (`tandem::liveness::take_in`), through `tandem::liveness::fuzz_datagram`:
//! as received (header, key generation and tag checks: nothing unsealed may
//! open), and sealed with a valid tag, so that the fuzzer reaches the JSON
//! parser and the replay/freshness state without having to forge an HMAC.
//! Nothing may panic. Run: cargo +nightly fuzz run heartbeat_frame
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tandem::liveness::fuzz_datagram(data));
