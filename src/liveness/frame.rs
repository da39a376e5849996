//! The heartbeat datagram: a small binary header, the heartbeat as JSON,
//! and an HMAC-SHA256 tag over both, keyed by the cluster's heartbeat key.
//!
//! ```text
//! 0      4        5            9                 n-32        n
//! | TNHB | ver=1 | key gen u32 | JSON heartbeat  | HMAC tag  |
//! ```
//!
//! `open` checks the tag, in constant time, before a byte of the body is
//! parsed: nothing unauthenticated reaches the JSON parser. Pure: no
//! sockets, no clock; freshness and replays are [`super::freshness`]'s.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tandem_raft::state::{HeartbeatKeys, HeartbeatSecret};

use super::Heartbeat;

pub const MAGIC: [u8; 4] = *b"TNHB";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 9;
pub const TAG_LEN: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// Why a datagram was dropped before it was parsed as a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// Not a frame of this version, too short or too long, or (under a
    /// valid tag) not a heartbeat.
    Malformed,
    /// Sealed under a key generation this node does not hold (or it holds
    /// no key at all yet).
    UnknownKey,
    /// The tag does not match: not sealed by a holder of the key.
    Forged,
}

/// One heartbeat key with its generation. `Debug` hides the secret.
#[derive(Clone)]
pub struct Key {
    generation: u32,
    secret: [u8; HeartbeatSecret::LEN],
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key {{ generation: {}, secret: <hidden> }}", self.generation)
    }
}

impl Key {
    pub fn new(generation: u32, secret: [u8; HeartbeatSecret::LEN]) -> Key {
        Key { generation, secret }
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes a key of any length: this cannot fail.
        <HmacSha256 as KeyInit>::new_from_slice(&self.secret).expect("HMAC accepts any key length")
    }
}

/// The keys a node seals with (the current) and accepts (current and
/// previous, during a rotation).
#[derive(Debug, Clone)]
pub struct KeyRing {
    pub current: Key,
    pub previous: Option<Key>,
}

impl KeyRing {
    /// The replicated state's keys; None when the cluster has none yet (or
    /// its current one is malformed, which the state machine refuses).
    pub fn from_state(keys: &HeartbeatKeys) -> Option<KeyRing> {
        let current = Key::new(keys.generation, keys.current.as_ref()?.bytes()?);
        let previous = keys
            .previous
            .as_ref()
            .and_then(|p| p.bytes())
            .map(|secret| Key::new(keys.generation.wrapping_sub(1), secret));
        Some(KeyRing { current, previous })
    }

    fn by_generation(&self, generation: u32) -> Option<&Key> {
        std::iter::once(&self.current).chain(&self.previous).find(|k| k.generation == generation)
    }
}

/// The frame of `body` sealed with `key`.
pub fn seal(key: &Key, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + TAG_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&key.generation.to_be_bytes());
    out.extend_from_slice(body);
    let mut mac = key.mac();
    mac.update(&out);
    out.extend_from_slice(&mac.finalize().into_bytes());
    out
}

/// A heartbeat sealed as a frame.
pub fn encode(key: &Key, hb: &Heartbeat) -> Vec<u8> {
    // A struct of plain fields always serializes.
    seal(key, &serde_json::to_vec(hb).unwrap_or_default())
}

/// The authenticated body of `frame`: checks the header, then the tag under
/// the key its header names. Bounds and the tag are checked before the
/// body is looked at.
pub fn open<'a>(ring: &KeyRing, frame: &'a [u8]) -> Result<&'a [u8], Refusal> {
    if frame.len() < HEADER_LEN + TAG_LEN || frame.len() > super::MAX_DATAGRAM {
        return Err(Refusal::Malformed);
    }
    if frame[..4] != MAGIC || frame[4] != VERSION {
        return Err(Refusal::Malformed);
    }
    let generation = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]);
    let key = ring.by_generation(generation).ok_or(Refusal::UnknownKey)?;
    let (signed, tag) = frame.split_at(frame.len() - TAG_LEN);
    let mut mac = key.mac();
    mac.update(signed);
    // Constant time (the `subtle` comparison inside `verify_slice`).
    mac.verify_slice(tag).map_err(|_| Refusal::Forged)?;
    Ok(&signed[HEADER_LEN..])
}

/// The heartbeat in `frame`, authenticated (see [`open`]).
pub fn decode(ring: &KeyRing, frame: &[u8]) -> Result<Heartbeat, Refusal> {
    let body = open(ring, frame)?;
    serde_json::from_slice(body).map_err(|_| Refusal::Malformed)
}

/// Whether a datagram is a frame at all (by its magic) rather than a plain
/// JSON heartbeat of a cluster without a key.
pub fn looks_framed(datagram: &[u8]) -> bool {
    datagram.starts_with(&MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ring(generation: u32) -> KeyRing {
        KeyRing { current: Key::new(generation, [generation as u8; 32]), previous: None }
    }

    fn hb() -> Heartbeat {
        Heartbeat {
            cluster_id: "c".into(),
            from: 2,
            to: 1,
            pid: 42,
            version: "0.1.0".into(),
            sent_ms: 1000,
            echo_ms: 900,
            heard: vec![(3, 12)],
            incarnation: 7,
            echo_incarnation: 8,
            ack_ms: 900,
            via: Some("10.0.0.2".parse().unwrap()),
            to_addr: Some("10.0.0.1".parse().unwrap()),
            probe: false,
            authenticates: true,
            ticket_ms: 0,
        }
    }

    #[test]
    fn a_sealed_heartbeat_opens_under_the_current_or_previous_key_only() {
        let r1 = ring(1);
        let frame = encode(&r1.current, &hb());
        assert_eq!(decode(&r1, &frame), Ok(hb()));
        // Rotated: generation 2 is current, 1 still accepted.
        let r2 = KeyRing { current: Key::new(2, [9; 32]), previous: Some(r1.current.clone()) };
        assert_eq!(decode(&r2, &frame), Ok(hb()));
        // Rotated again: generation 1 is gone.
        let r3 = KeyRing { current: Key::new(3, [5; 32]), previous: Some(r2.current.clone()) };
        assert_eq!(decode(&r3, &frame), Err(Refusal::UnknownKey));
        // Another key under the same generation number: forged.
        let other = KeyRing { current: Key::new(1, [0xee; 32]), previous: None };
        assert_eq!(decode(&other, &frame), Err(Refusal::Forged));
        // The key never shows in Debug.
        assert!(!format!("{r2:?}").contains("9, 9"), "{r2:?}");
    }

    #[test]
    fn unframed_short_long_and_unparsable_datagrams_are_malformed() {
        let r = ring(1);
        let plain = serde_json::to_vec(&hb()).unwrap();
        assert!(!looks_framed(&plain));
        assert_eq!(decode(&r, &plain), Err(Refusal::Malformed));
        assert_eq!(decode(&r, b""), Err(Refusal::Malformed));
        assert_eq!(decode(&r, &MAGIC), Err(Refusal::Malformed));
        let big = seal(&r.current, &vec![b' '; super::super::MAX_DATAGRAM]);
        assert_eq!(decode(&r, &big), Err(Refusal::Malformed));
        // Authentic, but not a heartbeat.
        assert_eq!(decode(&r, &seal(&r.current, b"[1,2]")), Err(Refusal::Malformed));
        let mut v2 = encode(&r.current, &hb());
        v2[4] = 2;
        assert_eq!(decode(&r, &v2), Err(Refusal::Malformed));
    }

    proptest! {
        #[test]
        fn any_single_bit_flip_is_refused(bit in 0usize..4096, sent in any::<u64>(), heard in proptest::collection::vec((1u64..33, any::<u32>()), 0..8)) {
            let r = ring(1);
            let frame = encode(&r.current, &Heartbeat { sent_ms: sent, heard, ..hb() });
            let bit = bit % (frame.len() * 8);
            let mut bad = frame.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(decode(&r, &bad).is_err());
            prop_assert!(decode(&r, &frame).is_ok());
        }

        #[test]
        fn arbitrary_bytes_never_open_and_never_panic(data in proptest::collection::vec(any::<u8>(), 0..1500), framed in any::<bool>()) {
            let r = ring(1);
            let mut data = data;
            if framed && data.len() >= HEADER_LEN {
                // A right header, so that the tag check is what refuses.
                data[..4].copy_from_slice(&MAGIC);
                data[4] = VERSION;
                data[5..9].copy_from_slice(&1u32.to_be_bytes());
            }
            prop_assert!(decode(&r, &data).is_err());
        }

        #[test]
        fn sealed_arbitrary_bodies_open_to_the_same_bytes(body in proptest::collection::vec(any::<u8>(), 0..1300)) {
            let r = ring(4);
            let frame = seal(&r.current, &body);
            prop_assert_eq!(open(&r, &frame), Ok(&body[..]));
            let _ = decode(&r, &frame);
        }
    }
}
