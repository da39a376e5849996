//! Feeds arbitrary bytes to the NBD server's pure parsing layer: request
//! headers, option headers, option data, client flags, and the request
//! validation and option answering behind them. None of it may panic, and a
//! parsed request or option must encode back to what was parsed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem::volume::nbd::proto::{
    self, answer_option, check_request, parse_client_flags, parse_option, parse_option_header, parse_request,
    ClientFlags, ExportInfo, OPTION_HEADER_LEN, REQUEST_HEADER_LEN,
};

fuzz_target!(|data: &[u8]| {
    // Whole input, as whatever a client might send at any point.
    let _ = parse_request(data);
    let _ = parse_option_header(data);
    let _ = parse_client_flags(data);

    // A request header followed by an export size picked by the input.
    if let Some(header) = data.get(..REQUEST_HEADER_LEN) {
        if let Ok(req) = parse_request(header) {
            assert_eq!(&req.encode()[..], header);
            let size = data.get(REQUEST_HEADER_LEN..REQUEST_HEADER_LEN + 8).map_or(1 << 30, |b| {
                let mut s = [0u8; 8];
                s[..b.len()].copy_from_slice(b);
                u64::from_be_bytes(s)
            });
            for read_only in [false, true] {
                if let Ok(info) = ExportInfo::new(size, (512, 4096, 1 << 20), read_only, true) {
                    let _ = check_request(&req, &info);
                }
            }
        }
    }

    // An option header followed by its data.
    if let Some(header) = data.get(..OPTION_HEADER_LEN) {
        if let Ok(h) = parse_option_header(header) {
            let _ = parse_option(h.option, &data[OPTION_HEADER_LEN..]);
        }
    }

    // A 4-byte option code followed by option data.
    if data.len() >= 4 {
        let option = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
        let body = &data[4..];
        if let Ok(parsed) = parse_option(option, body) {
            let wire = parsed.encode();
            assert_eq!(parse_option(parsed.code(), &wire[OPTION_HEADER_LEN..]), Ok(parsed));
        }
        let info = ExportInfo::new(1 << 20, (512, 4096, 1 << 20), false, false).expect("valid sizes");
        for no_zeroes in [false, true] {
            let mut out = Vec::new();
            let client = ClientFlags { fixed_newstyle: true, no_zeroes };
            let _ = answer_option("vol0", &info, client, option, body, &mut out);
            let _ = answer_option("", &info, client, option, body, &mut out);
        }
    }
    let _ = proto::encode_greeting();
});
